#!/usr/bin/env bash
# NVMe/TCP front end: `mirrorpoint serve` (release) pinned to one CPU,
# exporting a malloc volume (and, with --backends "malloc uring", a file
# through io_uring) over NVMe/TCP on 127.0.0.1; `mirrorpoint-bench nvmf`
# pinned to another CPU drives it with our userspace initiator: 4k randread
# and randwrite at QD1 and QD32 per connection, with one and with two
# connections (I/O queues), each case --repeat times. The bench is given
# the target's pid and admin socket, so every run reports the target's CPU
# per I/O two ways: process accounting (utime+stime from /proc/PID/stat over
# the measured window, idle spin included) and the reactors' own busy time
# (busy_ns from `framework_get_reactors`, SPDK's figure).
#
# Prints every command, then a markdown table: IOPS, p50/p99/p99.9 latency,
# target CPU us per I/O (process), reactor busy us per I/O, target IOPS per
# core-second (process), the target's share of a core and the share of the
# window its reactor was runnable but waiting for a CPU (preempted, from
# schedstat), each as the range over the repeats (min-max; one number when
# they agree). The target is stopped with SIGTERM and must
# report a clean stop.
#
# Usage: bench/scripts/nvmf-bench.sh [options]
#   --time N          measured seconds per run (default 5)
#   --ramp N          ramp seconds per run (default 1)
#   --repeat N        runs per case (default 2)
#   --target-cpu N    CPU for the target's single reactor (default 0)
#   --bench-cpu N     CPU for the bench's reactor (default 1)
#   --backends LIST   "malloc", "uring" or "malloc uring" (default malloc)
#   --file PATH       uring backing file (default ./build/nvmf-bench.img; not tmpfs)
#   --target-args A   extra `mirrorpoint serve` arguments (e.g. --busy-poll)
#   --bench-args A    extra `mirrorpoint-bench nvmf` arguments (e.g. --data-digest)
#   --out DIR         keep JSON outputs and the target log there (default: mktemp)
#   --qds LIST        queue depths per connection (default "1 32")
#   --target-bin PATH the `mirrorpoint` binary to serve with (default: this
#                     worktree's build/release; for A/B runs of two builds)
#   --quick           one short run per case (smoke test)
set -euo pipefail

TIME=5
RAMP=1
REPEAT=2
TCPU=0
BCPU=1
BACKENDS=malloc
FILE=./build/nvmf-bench.img
TARGET_ARGS=
BENCH_ARGS=
OUT=
QDS="1 32"
root=$(cd "$(dirname "$0")/../.." && pwd)
MP=$root/build/release/mirrorpoint
BENCH=$root/build/release/mirrorpoint-bench

die() { echo "nvmf-bench: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case $1 in
    --time) TIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --target-cpu) TCPU=$2; shift 2 ;;
    --bench-cpu) BCPU=$2; shift 2 ;;
    --backends) BACKENDS=$2; shift 2 ;;
    --file) FILE=$2; shift 2 ;;
    --target-args) TARGET_ARGS=$2; shift 2 ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --qds) QDS=$2; shift 2 ;;
    --target-bin) MP=$2; shift 2 ;;
    --quick) TIME=0.5; RAMP=0.2; REPEAT=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1" ;;
    esac
done
[ -x "$MP" ] && [ -x "$BENCH" ] ||
    die "build first: cargo build --release -p mirrorpoint-bench -p mirrorpoint-target"
command -v python3 >/dev/null || die "python3 is needed to read the JSON"
case $FILE in /*) ;; *) FILE=$PWD/$FILE ;; esac  # the target resolves it from its own cwd
OUT=${OUT:-$(mktemp -d /tmp/mp-nvmf-bench.XXXXXX)}
mkdir -p "$OUT"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
nqn=nqn.2026-11.io.mirrorpoint:bench

bdevs='{"method": "bdev_malloc_create", "params": {"name": "m0", "num_blocks": 65536, "block_size": 4096}}'
nss='{"method": "nvmf_subsystem_add_ns", "params": {"nqn": "'$nqn'", "namespace": {"bdev_name": "m0", "nsid": 1}}}'
case " $BACKENDS " in *" uring "*)
    bdevs="$bdevs,"'
   {"method": "bdev_uring_create", "params": {"name": "u0", "filename": "'$FILE'", "size": 268435456}}'
    nss="$nss,"'
   {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "'$nqn'", "namespace": {"bdev_name": "u0", "nsid": 2}}}'
esac
cat >"$OUT/config.json" <<JSON
{"subsystems": [
 {"subsystem": "bdev", "config": [
   $bdevs]},
 {"subsystem": "nvmf", "config": [
   {"method": "nvmf_create_transport",
    "params": {"trtype": "TCP", "in_capsule_data_size": 4096, "max_queue_depth": 128}},
   {"method": "nvmf_create_subsystem",
    "params": {"nqn": "$nqn", "allow_any_host": true, "serial_number": "MPBENCH0001"}},
   $nss,
   {"method": "nvmf_subsystem_add_listener",
    "params": {"nqn": "$nqn", "listen_address":
      {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "$port"}}}]}
]}
JSON

serve=("$MP" serve --config "$OUT/config.json" --rpc-socket "$OUT/rpc.sock" \
    --cores "$TCPU" --buffers 1024 --nvmf-listen none $TARGET_ARGS)
echo "# target: ${serve[*]}"
"${serve[@]}" >"$OUT/target.log" 2>&1 &
tpid=$!
stop_target() {
    if kill -0 "$tpid" 2>/dev/null; then
        kill -TERM "$tpid"
        wait "$tpid" || true
    fi
}
trap stop_target EXIT INT TERM
i=0
until grep -q "ready" "$OUT/target.log" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 300 ] || ! kill -0 "$tpid" 2>/dev/null; then
        cat "$OUT/target.log" >&2; die "target did not start"
    fi
    sleep 0.1
done
echo "# target pid $tpid on CPU $TCPU; bench on CPU $BCPU; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

rows=()
for backend in $BACKENDS; do
    nsid=1; [ "$backend" = uring ] && nsid=2
    for conns in 1 2; do
        for qd in $QDS; do
            for w in randread randwrite; do
                files=()
                for r in $(seq 1 "$REPEAT"); do
                    f="$OUT/$backend-$w-qd$qd-c$conns-$r.json"
                    cmd=("$BENCH" nvmf --addr "127.0.0.1:$port" --nqn "$nqn" --nsid "$nsid"
                        --workload "$w" --bs 4K --qd "$qd" --connections "$conns"
                        --cores "$BCPU" --time "$TIME" --ramp "$RAMP"
                        --target-pid "$tpid" --target-rpc "$OUT/rpc.sock" --json $BENCH_ARGS)
                    echo "${cmd[*]} > $f"
                    "${cmd[@]}" >"$f"
                    files+=("$f")
                done
                rows+=("$backend|$w|$qd|$conns|${files[*]}")
            done
        done
    done
done

echo
python3 - "${rows[@]}" <<'PY'
import json, sys
def rng(vals, fmt):
    lo, hi = min(vals), max(vals)
    a, b = fmt.format(lo), fmt.format(hi)
    return a if a == b else f"{a}–{b}"
print("| backend | workload | QD/conn | conns | IOPS | p50 µs | p99 µs | p99.9 µs | target CPU µs/IO (process) | reactor busy µs/IO | target IOPS/core-s (process) | target core % | reactor runnable, not running % |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for row in sys.argv[1:]:
    backend, w, qd, conns, files = row.split("|")
    rs = [json.load(open(f)) for f in files.split()]
    t = [r["target_cpu"] for r in rs]
    b = [r["target_reactors"] for r in rs]
    # Share of the window the target's reactor thread was preempted.
    wait = [100 * sum(th.get("runqueue_wait_s") or 0 for th in x["threads"]
                      if th["name"].startswith("reactor")) / r["time_s"]
            for x, r in zip(t, rs)]
    print(f"| {backend} | {w} | {qd} | {conns} "
          f"| {rng([r['iops'] for r in rs], '{:,.0f}')} "
          f"| {rng([r['lat_us']['p50'] for r in rs], '{:.1f}')} "
          f"| {rng([r['lat_us']['p99'] for r in rs], '{:.1f}')} "
          f"| {rng([r['lat_us']['p99_9'] for r in rs], '{:.1f}')} "
          f"| {rng([x['us_per_io'] for x in t], '{:.2f}')} "
          f"| {rng([x['busy_us_per_io'] for x in b], '{:.2f}')} "
          f"| {rng([x['iops_per_core_s'] for x in t], '{:,.0f}')} "
          f"| {rng([x['core_pct'] for x in t], '{:.0f}')} "
          f"| {rng(wait, '{:.0f}')} |")
PY
echo
stop_target
trap - EXIT INT TERM
tail -n 2 "$OUT/target.log"
grep -q "stopped cleanly" "$OUT/target.log" || die "target did not stop cleanly (log: $OUT/target.log)"
echo "# outputs in $OUT"
