#!/usr/bin/env bash
# Online consistency check (mirror_verify) throughput and what it costs the
# host, both sites on this machine, beside the loopback TCP throughput
# measured in the same run (issue #6 item 5).
#
# Starts two `mirrorpoint serve` processes: "east" (primary, master agent,
# 127.0.0.2) and "west" (remote, 127.0.0.3) whose storage server holds the
# leg of east's mirrored volume `m1` (on `l1`). Fills `m1` with a pattern
# through the mirror, then:
#   1. `mirrorpoint-bench tcp` 127.0.0.1 -> 127.0.0.3, 1 and 2 streams,
#      128 KiB sends: the loopback yardstick;
#   2. idle host: `mirror_verify` with no rate cap, --passes times; the
#      verify rate is the job's bytes over its started..finished time;
#   3. busy host: `mirrorpoint-bench nvmf` 4k randwrite QD32 on `m1` over
#      NVMe/TCP, without verify, then with verify running back to back at
#      --rate (capped), then uncapped; host IOPS of each, and the verify
#      rate reached meanwhile.
# Prints every command, then markdown tables.
#
# Usage: bench/scripts/verify-bench.sh [options]
#   --time N          measured seconds per host run (default 5)
#   --ramp N          ramp seconds per host run (default 1)
#   --size SIZE       volume size in MiB (default 256)
#   --rate MIB        verify rate cap for the busy run, MiB/s (default 64)
#   --passes N        idle verify passes (default 2)
#   --repeat N        rounds of the three busy-host runs (default 2; each
#                     round is compared with its own no-verify run)
#   --dir DIR         where volume files go (default ./build/verify-bench; not tmpfs)
#   --east-cpus L     CPUs of east's reactors (default 0)
#   --west-cpus L     CPUs of west's reactors (default 1)
#   --bench-cpus L    CPUs of the bench's reactors (default 1)
#   --bin DIR         where mirrorpoint and mirrorpoint-bench are (default build/release)
#   --out DIR         keep JSON outputs and logs there (default: mktemp)
#   --backend B       uring (files under --dir, the default) or malloc
#   --link-rate RATE  the sites talk over an emulated inter-site link (west in
#                     a network namespace behind a veth pair shaped with tc
#                     tbf, e.g. 10gbit; needs root; see lib/two-sites.sh);
#                     the yardstick also runs over that link and the idle
#                     verify rate is given against both
#   --quick           short runs (smoke test)
set -euo pipefail

TIME=5
RAMP=1
SIZE_MIB=256
RATE_MIB=64
PASSES=2
REPEAT=2
DIR=./build/verify-bench
EAST_CPUS=0
WEST_CPUS=1
BENCH_CPUS=1
OUT=
BACKEND=uring
LINK_RATE=
root=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$root/build/release

die() { echo "verify-bench: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case $1 in
    --time) TIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --size) SIZE_MIB=$2; shift 2 ;;
    --rate) RATE_MIB=$2; shift 2 ;;
    --passes) PASSES=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --east-cpus) EAST_CPUS=$2; shift 2 ;;
    --west-cpus) WEST_CPUS=$2; shift 2 ;;
    --bench-cpus) BENCH_CPUS=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --link-rate) LINK_RATE=$2; shift 2 ;;
    --quick) TIME=0.5; RAMP=0.2; SIZE_MIB=32; PASSES=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1" ;;
    esac
done
case $BACKEND in uring|malloc) ;; *) die "--backend: uring or malloc" ;; esac
MP=$BIN/mirrorpoint
BENCH=$BIN/mirrorpoint-bench
[ -x "$MP" ] && [ -x "$BENCH" ] ||
    die "build first: cargo build --release -p mirrorpoint-bench -p mirrorpoint-target"
command -v python3 >/dev/null || die "python3 is needed to read the JSON"
OUT=${OUT:-$(mktemp -d /tmp/mp-verify-bench.XXXXXX)}
mkdir -p "$OUT"
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
mkdir -p "$DIR"
SIZE=$((SIZE_MIB * 1024 * 1024))
RATE=$((RATE_MIB * 1024 * 1024))
SECRET=verify-bench-shared-secret-0123456789
nqn=nqn.2026-11.io.mirrorpoint:verify-bench
# shellcheck source=lib/two-sites.sh
. "$root/bench/scripts/lib/two-sites.sh"
nvmf_port=$(freeport 127.0.0.2)
loop_pid=
cleanup() {
    [ -n "$loop_pid" ] && kill "$loop_pid" 2>/dev/null || true
    stop_sites
}
trap cleanup EXIT INT TERM

wait_verify() { # until the job is finished and idle; prints its JSON (the rate
    # comes from the job's own start/finish times; the polling, one process
    # on one admin connection, takes no measurable CPU from it)
    local v
    v=$(rpc_wait east mirror_verify_get '{"name": "m1"}' active=False 300) || die "verify never finished: $v"
    [ "$(echo "$v" | json_get state)" = finished ] || die "verify ended $(echo "$v" | json_get state): $v"
    echo "$v"
}

# 1. The yardstick.
tcp_yardstick

# 2. Two sites, the mirror, filled with data.
two_sites "$SIZE"
bdev east l1 "$SIZE"
rpc east mirror_create '{"name": "m1", "volume": "l1", "resync_rate": 0}' >/dev/null
rpc_wait east mirror_get_status '{"name": "m1"}' 0.legs.0.state=synced >/dev/null || die "m1 never synced"
rpc east bdev_write_pattern "{\"name\": \"m1\", \"offset\": 0, \"len\": $SIZE, \"seed\": 42}" >/dev/null
echo "# east pid ${pids[0]} (CPUs $EAST_CPUS), west pid ${pids[1]} (CPUs $WEST_CPUS), bench CPUs $BENCH_CPUS; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

# 3. Idle host: verify with no cap.
idle=()
for p in $(seq 1 "$PASSES"); do
    rpc east mirror_verify '{"name": "m1", "rate": 0}' >/dev/null
    wait_verify >"$OUT/idle-$p.json"
    idle+=("$OUT/idle-$p.json")
done

# 4. Busy host: 4k randwrite QD32 over NVMe/TCP, without and with verify.
rpc east nvmf_create_transport '{"trtype": "TCP", "in_capsule_data_size": 4096, "max_queue_depth": 128}' >/dev/null
rpc east nvmf_create_subsystem "{\"nqn\": \"$nqn\", \"allow_any_host\": true, \"serial_number\": \"MPVERIFY0001\"}" >/dev/null
rpc east nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"m1\", \"nsid\": 1}}" >/dev/null
rpc east nvmf_subsystem_add_listener "{\"nqn\": \"$nqn\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"127.0.0.2\", \"trsvcid\": \"$nvmf_port\"}}" >/dev/null
host_run() { # out-file
    local cmd=("$BENCH" nvmf --addr "127.0.0.2:$nvmf_port" --nqn "$nqn" --nsid 1
        --workload randwrite --bs 4K --qd 32 --connections 2 --cores "$BENCH_CPUS"
        --time "$TIME" --ramp "$RAMP" --target-pid "${pids[0]}" --json)
    echo "${cmd[*]} > $1"
    "${cmd[@]}" >"$1"
}
verify_loop() { # rate: verify back to back (one process, one admin connection); a line per finished pass in $OUT/loop-<rate>.txt
    exec python3 "$root/bench/scripts/lib/verify-loop.py" "$OUT/east.sock" m1 "$1" "$OUT/loop-$1.txt"
}
busy() { # label rate(or "none")
    local label=$1 rate=$2 after passes
    if [ "$rate" = none ]; then
        host_run "$OUT/host-$label.json"
        echo "{}" >"$OUT/verify-$label.json"
        return
    fi
    verify_loop "$rate" &
    loop_pid=$!
    local t0
    t0=$(date +%s.%N)
    host_run "$OUT/host-$label.json"
    local t1
    t1=$(date +%s.%N)
    after=$(qrpc east mirror_get_status '{"name": "m1"}' | json_get 0 verify checked_bytes)
    passes=0
    [ -f "$OUT/loop-$rate.txt" ] && passes=$(wc -l <"$OUT/loop-$rate.txt")
    rm -f "$OUT/loop-$rate.txt"
    kill "$loop_pid" 2>/dev/null || true
    wait "$loop_pid" 2>/dev/null || true
    loop_pid=
    qrpc east mirror_verify_cancel '{"name": "m1"}' >/dev/null 2>&1 || true
    sleep 0.5
    # Bytes checked over the whole host run (ramp included), per second.
    python3 -c "import json,sys; print(json.dumps({'rate_limit': $rate, 'checked_after': $after, 'passes_finished': $passes, 'seconds': $t1 - $t0}))" >"$OUT/verify-$label.json"
}
for r in $(seq 1 "$REPEAT"); do
    busy "none-$r" none
    busy "capped-$r" "$RATE"
    busy "uncapped-$r" 0
done

echo
python3 - "$OUT" "$SIZE" "$REPEAT" "${LINK_RATE:-}" "${tcp_rows[@]}" -- "${link_rows[@]}" -- "${idle[@]}" <<'PY'
import json, sys
args = sys.argv[1:]
out, size, repeat, link_rate = args[0], int(args[1]), int(args[2]), args[3]
sep = args.index("--")
sep2 = args.index("--", sep + 1)
tcps = [json.load(open(f)) for f in args[4:sep]]
links = [json.load(open(f)) for f in args[sep + 1:sep2]]
idle = [json.load(open(f)) for f in args[sep2 + 1:]]
loop = max(t["mib_s"] for t in tcps)
link = max(t["mib_s"] for t in links) if links else None
print("| yardstick (mirrorpoint-bench tcp, 128 KiB sends) | MiB/s |")
print("|---|---:|")
for t in tcps:
    print(f"| loopback TCP, {t['streams']} stream(s) | {t['mib_s']:,.0f} |")
for t in links:
    print(f"| emulated link (veth, tbf {link_rate}), {t['streams']} stream(s) | {t['mib_s']:,.0f} |")
print()
print("| idle host: verify pass | bytes | seconds | MiB/s | verify/loopback (best) |" + (" verify/link (best) |" if link else ""))
print("|---|---:|---:|---:|---:|" + ("---:|" if link else ""))
for i, v in enumerate(idle):
    s = (v["finished_unix_ms"] - v["started_unix_ms"]) / 1000
    mib = v["checked_bytes"] / s / 2**20
    print(f"| {i + 1} | {v['checked_bytes']:,} | {s:.2f} | {mib:,.0f} | {mib / loop:.3f} |" + (f" {mib / link:.3f} |" if link else ""))
print()
print("| busy host (4k randwrite QD32 x 2 connections) | round | host IOPS | vs no verify (same round) | p99 µs | verify MiB/s during the run | verify cap MiB/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r, label in [(r, l) for r in range(1, repeat + 1) for l in ("none", "capped", "uncapped")]:
    h = json.load(open(f"{out}/host-{label}-{r}.json"))
    v = json.load(open(f"{out}/verify-{label}-{r}.json"))
    if label == "none":
        base = h["iops"]
    if v:
        # checked_bytes restarts at each pass: whole passes + the current one.
        done = v["passes_finished"] * size + v["checked_after"]
        vr = f"{done / v['seconds'] / 2**20:,.0f}"
        cap = "none" if v["rate_limit"] == 0 else f"{v['rate_limit'] / 2**20:,.0f}"
    else:
        vr, cap = "-", "-"
    print(f"| verify {label if v else 'not running'} | {r} | {h['iops']:,.0f} | {h['iops'] / base:.3f} | {h['lat_us']['p99']:.0f} | {vr} | {cap} |")
PY
echo "# outputs in $OUT"
