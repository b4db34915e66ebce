#!/usr/bin/env bash
# Compares mirrorpoint-bench (local, uring backend) with fio's io_uring engine
# on one file, one core: 4k randread/randwrite at QD1 and QD32.
#
# Both tools run in the same invocation, on the same pre-filled file, with
# O_DIRECT, registered (fixed) buffers and registered files, pinned to the
# same CPU. Tool order alternates per case (and per repeat) so that slow
# drift of the machine (other load, page cache, SSD/host state) does not
# always favour the same tool. Prints every command it runs, then a markdown
# table with both tools' IOPS and p50 latency and the ratios mirrorpoint/fio,
# the median ratio per case, and, where the disk answered in two latency
# modes (a gap of more than 20% between runs' p50s), the median over the
# pairs whose two runs got the same mode.
#
# Usage: bench/scripts/compare-fio.sh [options]
#   --file PATH     test file (default: ./build/compare-fio.img; use local disk, not tmpfs)
#   --size SIZE     file size for fio/mirrorpoint notation (default 1G)
#   --runtime N     measured seconds per run (default 20)
#   --ramp N        ramp seconds per run (default 2)
#   --cpu N         CPU to pin both tools to (default 1)
#   --repeat N      run the whole matrix N times (default 1)
#   --bin PATH      mirrorpoint-bench binary (default: build/release/mirrorpoint-bench)
#   --out DIR       where to keep the JSON outputs (default: a mktemp dir)
#   --mp-args ARGS  extra arguments for mirrorpoint-bench (e.g. "--busy-poll")
#   --nice N        run both tools under `nice -n N` (e.g. -10 on a shared
#                   machine, so neighbours preempt both tools less; needs root)
#   --keep-file     do not delete the test file at the end
set -euo pipefail

FILE=./build/compare-fio.img
SIZE=1G
RUNTIME=20
RAMP=2
CPU=1
REPEAT=1
BIN=./build/release/mirrorpoint-bench
OUT=
MP_ARGS=
NICE=
KEEP=0

die() { echo "compare-fio: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --file) FILE=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --cpu) CPU=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --mp-args) MP_ARGS=$2; shift 2 ;;
        --nice) NICE=$2; shift 2 ;;
        --keep-file) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "--runtime must be a positive integer"
[[ $RAMP =~ ^[0-9]+$ ]] || die "--ramp must be a non-negative integer"
[[ $CPU =~ ^[0-9]+$ ]] || die "--cpu must be a CPU id"
[[ $REPEAT =~ ^[0-9]+$ && $REPEAT -gt 0 ]] || die "--repeat must be a positive integer"
[[ -z $NICE || $NICE =~ ^-?[0-9]+$ ]] || die "--nice must be an integer"
PREFIX=()
if [ -n "$NICE" ]; then
    PREFIX=(nice -n "$NICE")
    "${PREFIX[@]}" true 2>/dev/null || die "cannot run under nice -n $NICE"
fi

command -v fio >/dev/null || die "fio not found (apt-get install -y fio)"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$BIN" ] || die "$BIN not found (cargo build --release -p mirrorpoint-bench)"
fio --enghelp=io_uring >/dev/null 2>&1 || die "this fio has no io_uring engine"

if [ -z "$OUT" ]; then
    OUT=$(mktemp -d /tmp/compare-fio.XXXXXX)
fi
mkdir -p "$OUT"

# Size in bytes, via mirrorpoint's own parser rules (K/M/G = 1024^n).
BYTES=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)([kKmMgGtT]?)(i?[bB])?", sys.argv[1])
if not m: sys.exit("bad --size " + sys.argv[1])
print(int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()])
' "$SIZE")

fstype=$(df -PT "$(dirname "$FILE")" | awk 'NR==2 {print $2}')
case "$fstype" in
    tmpfs|ramfs) die "$FILE is on $fstype; O_DIRECT needs a real disk file system" ;;
esac

run() {
    # Prints and runs a command; its stdout goes to the file in $1.
    local out=$1; shift
    { printf '+'; printf ' %q' "$@"; printf ' > %q\n' "$out"; } >&2
    "$@" > "$out"
}

# Create and pre-fill the file once (random data, so reads hit allocated
# blocks with real contents and writes overwrite allocated blocks).
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" -ne "$BYTES" ]; then
    echo "== creating $FILE ($BYTES bytes, pre-filled)" >&2
    rm -f "$FILE"
    run /dev/null fio --name=prefill --filename="$FILE" --size="$BYTES" --rw=write --bs=1M \
        --ioengine=io_uring --direct=1 --iodepth=8 --refill_buffers --output-format=terse
    sync
fi

fio_cmd() { # rw qd out
    run "$3" "${PREFIX[@]}" fio --name=job --filename="$FILE" --size="$BYTES" \
        --ioengine=io_uring --direct=1 --fixedbufs --registerfiles --hipri=0 \
        --thread --numjobs=1 --cpus_allowed="$CPU" \
        --rw="$1" --bs=4k --iodepth="$2" --norandommap --randrepeat=0 \
        --clat_percentiles=1 --lat_percentiles=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json
}

mp_cmd() { # rw qd out
    # shellcheck disable=SC2086 # MP_ARGS is a list of words on purpose
    run "$3" "${PREFIX[@]}" "$BIN" local --backend uring --file "$FILE" --cores "$CPU" \
        --workload "$1" --bs 4K --qd "$2" --time "$RUNTIME" --ramp "$RAMP" $MP_ARGS --json
}

echo "== machine: $(nproc) CPUs, kernel $(uname -r), $FILE on $fstype; fio $(fio --version)" >&2
echo "== outputs in $OUT" >&2

results=()
n=0
for rep in $(seq 1 "$REPEAT"); do
    for rw in randread randwrite; do
        for qd in 1 32; do
            n=$((n + 1))
            f="$OUT/fio-$rw-qd$qd-r$rep.json"
            m="$OUT/mp-$rw-qd$qd-r$rep.json"
            # Flip the order per case and per repeat (4 cases per repeat).
            if [ $(((n + rep) % 2)) -eq 0 ]; then
                fio_cmd "$rw" "$qd" "$f"; mp_cmd "$rw" "$qd" "$m"; order="fio,mp"
            else
                mp_cmd "$rw" "$qd" "$m"; fio_cmd "$rw" "$qd" "$f"; order="mp,fio"
            fi
            results+=("$rw $qd $rep $order $f $m")
        done
    done
done

[ "$KEEP" -eq 1 ] || rm -f "$FILE"

printf '%s\n' "${results[@]}" | python3 -c '
import json, sys
rows = []
for line in sys.stdin:
    rw, qd, rep, order, f, m = line.split()
    fj = json.load(open(f))["jobs"][0]
    side = fj["read"] if rw == "randread" else fj["write"]
    f_iops = side["iops"]
    # Total latency (submission + completion), which is what mirrorpoint-bench
    # measures (from the task issuing to the task seeing the completion).
    pct = side.get("lat_ns", {}).get("percentile") or side["clat_ns"]["percentile"]
    f_p50 = pct["50.000000"] / 1000.0
    f_cpu = (fj["usr_cpu"] + fj["sys_cpu"]) / 100.0 * fj["job_runtime"] / 1000.0
    f_cpu_io = f_cpu * 1e6 / max(side["total_ios"], 1)
    mj = json.load(open(m))
    m_iops = mj["iops"]
    m_p50 = mj["lat_us"]["p50"]
    rx = mj["reactors"][0]
    m_calls = rx.get("submit_calls")
    m_calls_io = m_calls / max(rx["ops"], 1) if m_calls is not None else float("nan")
    rows.append((rw, int(qd), rep, order, f_iops, m_iops, f_p50, m_p50, f_cpu_io,
                 mj["cpu"]["us_per_io"], rx["busy_pct"], m_calls_io))
print("| workload | qd | run | order | fio IOPS | mp IOPS | IOPS mp/fio | fio p50 us | mp p50 us | p50 mp/fio | fio CPU us/IO | mp CPU us/IO | mp reactor busy % | mp submit calls/IO |")
print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rw, qd, rep, order, fi, mi, fp, mp, fc, mc, busy, calls = r
    print(f"| {rw} 4k | {qd} | {rep} | {order} | {fi:.0f} | {mi:.0f} | {mi/fi:.3f} | {fp:.1f} | {mp:.1f} | {mp/fp:.3f} | {fc:.2f} | {mc:.2f} | {busy:.1f} | {calls:.2f} |")
# Per case over the repeats: the median of the per-run ratios (each run pair
# measured back to back), which one noisy pair cannot move much.
import statistics
print()
print("| workload | qd | runs | IOPS mp/fio median (min-max) | p50 mp/fio median (min-max) |")
print("|---|---:|---:|---:|---:|")
cases = {}
for r in rows:
    cases.setdefault((r[0], r[1]), []).append(r)
modes = []
for (rw, qd), rs in cases.items():
    iops = [r[5] / r[4] for r in rs]
    p50 = [r[7] / r[6] for r in rs]
    print(f"| {rw} 4k | {qd} | {len(rs)} | {statistics.median(iops):.3f} ({min(iops):.3f}-{max(iops):.3f}) | {statistics.median(p50):.3f} ({min(p50):.3f}-{max(p50):.3f}) |")
    # A virtio disk can answer a whole run in one of two latency modes (e.g.
    # 10 or 14 us at QD 1) whatever the tool; a pair whose two runs got
    # different modes says nothing about the tools. Split the pooled p50s
    # at their largest relative gap (when it exceeds 20%) and compare the
    # pairs whose runs fell on the same side.
    pooled = sorted(x for r in rs for x in (r[6], r[7]))
    gaps = [(b / a, (a + b) / 2) for a, b in zip(pooled, pooled[1:]) if a > 0]
    if len(rs) >= 3 and gaps and max(gaps)[0] > 1.2:
        cut = max(gaps)[1]
        same = [r[7] / r[6] for r in rs if (r[6] < cut) == (r[7] < cut)]
        slow = (sum(r[6] >= cut for r in rs), sum(r[7] >= cut for r in rs))
        med = f"{statistics.median(same):.3f}" if same else "-"
        modes.append(f"| {rw} 4k | {qd} | {cut:.1f} | {slow[0]} / {slow[1]} | {len(same)} | {med} |")
if modes:
    print()
    print("Two latency modes (p50 split at the largest gap between runs):")
    print()
    print("| workload | qd | split at p50 us | slow-mode runs fio / mp | same-mode pairs | p50 mp/fio median over them |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(modes))
'
