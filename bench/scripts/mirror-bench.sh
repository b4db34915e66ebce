#!/usr/bin/env bash
# Mirror performance through the NVMe/TCP front end, both sites on this
# machine, beside the loopback TCP throughput measured in the same run.
#
# Starts two `mirrorpoint serve` processes: site "east" (primary, master
# agent, listens on 127.0.0.2) and site "west" (remote, 127.0.0.3) whose
# storage server holds the mirror leg. East has a local-only volume `l0` and
# a mirrored volume `m1` (on `l1`, sync policy), exported as namespaces 1 and
# 2 of one NVMe/TCP subsystem on 127.0.0.2. Then:
#   1. `mirrorpoint-bench tcp` 127.0.0.1 -> 127.0.0.3, 1 and 2 streams,
#      128 KiB sends: the loopback yardstick;
#   2. resync throughput: the initial full sync of `m1` (resync rate
#      unlimited), from mirror_create until the leg is synced;
#   3. `mirrorpoint-bench nvmf` on each namespace: 4k randwrite at QD1 and
#      QD32, 128k sequential write at QD4 (per connection, 2 connections);
#   4. with --split-at S: one more 4k randwrite QD32 run on `m1` with
#      `mirror_split` called at second S, writing the latency timeline plot
#      (--svg) — issue #7's measurement;
#   5. with --recover: recovery of the local device (issue #6 item 3) on a
#      second mirror `m2` over an error bdev `EE_l2`: (a) idle host: the
#      local device fails (bdev_error_inject_error), mirror_recover_local
#      rebuilds it onto a blank replacement at an unlimited rate, timed from
#      the call until the local leg is healthy; (b) busy host: 4k randrw
#      (70 % reads) QD32 on `m2` healthy, then with its local device failed
#      and no rebuild (reads served by the leg), then with a rebuild onto
#      another replacement started at second 0 and capped at --recover-rate
#      MiB/s.
# Prints every command, then markdown tables: mirrored/local IOPS, MiB/s
# against the loopback throughput, and the resync rate against it.
#
# Usage: bench/scripts/mirror-bench.sh [options]
#   --time N          measured seconds per run (default 5)
#   --ramp N          ramp seconds per run (default 1)
#   --size SIZE       volume size in MiB (default 256)
#   --backend B       uring (files under --dir, the default) or malloc
#   --dir DIR         where volume files go (default ./build/mirror-bench; not tmpfs)
#   --east-cpus L     CPUs of east's reactors (default 0)
#   --west-cpus L     CPUs of west's reactors (default 1)
#   --bench-cpus L    CPUs of the bench's reactors (default 1)
#   --split-at S      also run the split measurement, splitting at second S
#   --split-params J  extra JSON members for mirror_split (default: none)
#   --svg PATH        where the split timeline plot goes (default $OUT/split.svg)
#   --bin DIR         where mirrorpoint and mirrorpoint-bench are (default build/release)
#   --out DIR         keep JSON outputs and logs there (default: mktemp)
#   --recover         also run the local-device recovery measurement (5.)
#   --recover-rate N  rebuild cap in MiB/s for the busy-host run (default 32)
#   --link-rate RATE  the sites talk over an emulated inter-site link (west in
#                     a network namespace behind a veth pair shaped with tc
#                     tbf, e.g. 10gbit; needs root; see lib/two-sites.sh);
#                     the yardstick also runs over that link and every figure
#                     is given against both (loopback and the shaped link)
#   --quick           short runs (smoke test)
set -euo pipefail

TIME=5
RAMP=1
SIZE_MIB=256
BACKEND=uring
DIR=./build/mirror-bench
EAST_CPUS=0
WEST_CPUS=1
BENCH_CPUS=1
SPLIT_AT=
SPLIT_PARAMS=
SVG=
OUT=
RECOVER=
RECOVER_RATE=32
LINK_RATE=
root=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$root/build/release

die() { echo "mirror-bench: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case $1 in
    --time) TIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --size) SIZE_MIB=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --east-cpus) EAST_CPUS=$2; shift 2 ;;
    --west-cpus) WEST_CPUS=$2; shift 2 ;;
    --bench-cpus) BENCH_CPUS=$2; shift 2 ;;
    --split-at) SPLIT_AT=$2; shift 2 ;;
    --split-params) SPLIT_PARAMS=$2; shift 2 ;;
    --svg) SVG=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --recover) RECOVER=1; shift ;;
    --recover-rate) RECOVER_RATE=$2; shift 2 ;;
    --link-rate) LINK_RATE=$2; shift 2 ;;
    --quick) TIME=0.5; RAMP=0.2; SIZE_MIB=32; shift ;;
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
OUT=${OUT:-$(mktemp -d /tmp/mp-mirror-bench.XXXXXX)}
mkdir -p "$OUT"
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
mkdir -p "$DIR"
SVG=${SVG:-$OUT/split.svg}
SIZE=$((SIZE_MIB * 1024 * 1024))
SECRET=mirror-bench-shared-secret-0123456789
nqn=nqn.2026-11.io.mirrorpoint:mirror-bench
# shellcheck source=lib/two-sites.sh
. "$root/bench/scripts/lib/two-sites.sh"
nvmf_port=$(freeport 127.0.0.2)
trap stop_sites EXIT INT TERM

# 1. The yardstick.
tcp_yardstick

# 2. Two sites, a leg on west's storage server, the mirror's initial sync.
# With --recover, west also holds m2's leg.
west_size=$SIZE
[ -z "$RECOVER" ] || west_size=$((2 * SIZE))
two_sites "$west_size"
bdev east l0 "$SIZE"
bdev east l1 "$SIZE"
t0=$(date +%s.%N)
rpc east mirror_create '{"name": "m1", "volume": "l1", "resync_rate": 0}' >/dev/null
rpc_wait east mirror_get_status '{"name": "m1"}' 0.legs.0.state=synced >/dev/null || die "m1 never synced"
t1=$(date +%s.%N)
copied=$(rpc east mirror_get_status '{"name": "m1"}' | json_get 0 legs 0 resync_copied_bytes 2>/dev/null || echo "$SIZE")
# The engine's own rate of the pass (bytes over the pass's time, no polling).
engine_bps=$(qrpc east mirror_get_status '{"name": "m1"}' | json_get 0 legs 0 resync_rate_bps 2>/dev/null || echo 0)
echo "{\"bytes\": $copied, \"seconds\": $(python3 -c "print($t1 - $t0)"), \"engine_bps\": $engine_bps}" >"$OUT/resync.json"

# 3. The front end.
rpc east nvmf_create_transport '{"trtype": "TCP", "in_capsule_data_size": 4096, "max_queue_depth": 128}' >/dev/null
rpc east nvmf_create_subsystem "{\"nqn\": \"$nqn\", \"allow_any_host\": true, \"serial_number\": \"MPMIRROR0001\"}" >/dev/null
rpc east nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"l0\", \"nsid\": 1}}" >/dev/null
rpc east nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"m1\", \"nsid\": 2}}" >/dev/null
rpc east nvmf_subsystem_add_listener "{\"nqn\": \"$nqn\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"127.0.0.2\", \"trsvcid\": \"$nvmf_port\"}}" >/dev/null
east_pid=${pids[0]}
echo "# east pid $east_pid (CPUs $EAST_CPUS), west pid ${pids[1]} (CPUs $WEST_CPUS), bench CPUs $BENCH_CPUS; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

rows=()
for spec in "randwrite 4K 1" "randwrite 4K 32" "write 128K 4"; do
    set -- $spec
    for nsid in 1 2; do
        f="$OUT/ns$nsid-$1-$2-qd$3.json"
        cmd=("$BENCH" nvmf --addr "127.0.0.2:$nvmf_port" --nqn "$nqn" --nsid "$nsid"
            --workload "$1" --bs "$2" --qd "$3" --connections 2 --cores "$BENCH_CPUS"
            --time "$TIME" --ramp "$RAMP" --target-pid "$east_pid" --json)
        echo "${cmd[*]} > $f"
        "${cmd[@]}" >"$f"
    done
    rows+=("$1 $2 QD$3|$OUT/ns1-$1-$2-qd$3.json|$OUT/ns2-$1-$2-qd$3.json")
done

# 4. Latency around a split.
split_file=
if [ -n "$SPLIT_AT" ]; then
    params="{\"name\": \"m1\"${SPLIT_PARAMS:+, $SPLIT_PARAMS}}"
    split_file="$OUT/split.json"
    cmd=("$BENCH" nvmf --addr "127.0.0.2:$nvmf_port" --nqn "$nqn" --nsid 2
        --workload randwrite --bs 4K --qd 32 --connections 2 --cores "$BENCH_CPUS"
        --time "$TIME" --ramp "$RAMP" --target-pid "$east_pid" --json
        --timeline-ms 10 --timeline-svg "$SVG"
        --event "$SPLIT_AT:$MP rpc -s $OUT/east.sock mirror_split '$params'")
    echo "${cmd[*]} > $split_file"
    "${cmd[@]}" >"$split_file"
fi

# 5. Recovery of the local device.
recover_file=
local_state() { rpc east mirror_get_status '{"name": "m2"}' | json_get 0 local state; }
wait_healthy() {
    rpc_wait east mirror_get_status '{"name": "m2"}' 0.local.state=healthy 600 >/dev/null ||
        die "m2's local device was never rebuilt"
}
if [ -n "$RECOVER" ]; then
    bdev east l2 "$SIZE"
    rpc east bdev_error_create '{"base_name": "l2"}' >/dev/null
    rpc east mirror_create '{"name": "m2", "volume": "EE_l2", "resync_rate": 0}' >/dev/null
    rpc_wait east mirror_get_status '{"name": "m2"}' 0.legs.0.state=synced >/dev/null || die "m2 never synced"
    # (a) Idle host: fail the device (one write hits the error), rebuild
    # onto a blank replacement, unlimited rate.
    rpc east bdev_error_inject_error '{"name": "EE_l2", "io_type": "all", "permanent": true}' >/dev/null
    rpc east bdev_write_pattern '{"name": "m2", "offset": 0, "len": 4096, "seed": 1}' >/dev/null
    [ "$(local_state)" = failed ] || die "m2's local device did not fail"
    # The replacement sits on an error bdev too, so (b) can fail it again.
    bdev east r2 "$SIZE"
    rpc east bdev_error_create '{"base_name": "r2"}' >/dev/null
    t0=$(date +%s.%N)
    rpc east mirror_recover_local '{"name": "m2", "replacement_bdev": "EE_r2"}' >/dev/null
    wait_healthy
    t1=$(date +%s.%N)
    idle_bytes=$(rpc east mirror_get_status '{"name": "m2"}' | json_get 0 local rebuild_copied_bytes)
    idle_bps=$(qrpc east mirror_get_status '{"name": "m2"}' | json_get 0 local rebuild_rate_bps)
    # (b) Busy host: the same load on the healthy mirror; with the local
    # device failed and no rebuild (every read served by the leg: what the
    # host gets until someone rebuilds); and with a rebuild onto another
    # replacement, capped, started at second 0 from that failed state.
    rpc east mirror_set_resync_rate "{\"name\": \"m2\", \"bytes_per_second\": $((RECOVER_RATE * 1024 * 1024))}" >/dev/null
    rpc east nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"m2\", \"nsid\": 3}}" >/dev/null
    bdev east r3 "$SIZE"
    for phase in base degraded rebuild; do
        f="$OUT/recover-$phase.json"
        cmd=("$BENCH" nvmf --addr "127.0.0.2:$nvmf_port" --nqn "$nqn" --nsid 3
            --workload randrw --rwmixread 70 --bs 4K --qd 32 --connections 2 --cores "$BENCH_CPUS"
            --time "$TIME" --ramp "$RAMP" --target-pid "$east_pid" --json)
        if [ $phase = degraded ]; then
            rpc east bdev_error_inject_error '{"name": "EE_r2", "io_type": "all", "permanent": true}' >/dev/null
            rpc east bdev_write_pattern '{"name": "m2", "offset": 0, "len": 4096, "seed": 2}' >/dev/null
            [ "$(local_state)" = failed ] || die "m2's replacement device did not fail"
        fi
        if [ $phase = rebuild ]; then
            rpc east mirror_recover_local '{"name": "m2", "replacement_bdev": "r3"}' >/dev/null
        fi
        echo "${cmd[*]} > $f"
        "${cmd[@]}" >"$f"
        if [ $phase = rebuild ]; then
            rpc east mirror_get_status '{"name": "m2"}' >"$OUT/recover-status.json"
            [ "$(local_state)" = rebuilding ] ||
                echo "# warning: the rebuild ended before the measured run did (raise --size or lower --recover-rate)" >&2
        fi
    done
    wait_healthy
    recover_file="$OUT/recover.json"
    echo "{\"idle_bytes\": $idle_bytes, \"idle_seconds\": $(python3 -c "print($t1 - $t0)"), \"rate_mib_s\": $RECOVER_RATE, \"engine_bps\": $idle_bps}" >"$recover_file"
fi

echo
python3 - "$OUT/resync.json" "$split_file" "$recover_file" "$OUT" "${LINK_RATE:-}" "${tcp_rows[@]}" -- "${link_rows[@]}" -- "${rows[@]}" <<'PY'
import json, sys
args = sys.argv[1:]
resync = json.load(open(args[0]))
split_file = args[1]
recover_file, out, link_rate = args[2], args[3], args[4]
sep = args.index("--")
sep2 = args.index("--", sep + 1)
tcps = [json.load(open(f)) for f in args[5:sep]]
links = [json.load(open(f)) for f in args[sep + 1:sep2]]
rows = args[sep2 + 1:]
loop = max(t["mib_s"] for t in tcps)
link = max(t["mib_s"] for t in links) if links else None
print("| yardstick (mirrorpoint-bench tcp, 128 KiB sends) | MiB/s |")
print("|---|---:|")
for t in tcps:
    print(f"| loopback TCP, {t['streams']} stream(s) | {t['mib_s']:,.0f} |")
for t in links:
    print(f"| emulated link (veth, tbf {link_rate}), {t['streams']} stream(s) | {t['mib_s']:,.0f} |")
def vs(x):
    """x MiB/s against the best loopback figure, and against the link."""
    s = f"{x / loop:.3f}x the best loopback figure"
    if link:
        s += f", {x / link:.3f}x the best emulated-link figure"
    return s
rs = resync["bytes"] / resync["seconds"] / 2**20
print()
print(f"Resync (initial full sync, unlimited rate): {resync['bytes'] / 2**20:,.0f} MiB in "
      f"{resync['seconds']:.2f} s = {rs:,.0f} MiB/s = {vs(rs)}")
ers = resync.get("engine_bps", 0) / 2**20
if ers:
    print(f"  (the engine's own rate of the pass, mirror_get_status resync_rate_bps: {ers:,.0f} MiB/s = {vs(ers)})")
print()
lcol = " mirrored/link |" if link else ""
print("| workload (2 connections) | local IOPS | mirrored IOPS | mirrored/local | local MiB/s | mirrored MiB/s | mirrored/loopback |" + lcol + " local p99 µs | mirrored p99 µs | target CPU µs/IO local | mirrored |")
print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if link else "") + "---:|---:|---:|---:|")
for row in rows:
    name, a, b = row.split("|")
    l, m = json.load(open(a)), json.load(open(b))
    lt, mt = l.get("target_cpu", {}), m.get("target_cpu", {})
    print(f"| {name} | {l['iops']:,.0f} | {m['iops']:,.0f} | {m['iops'] / l['iops']:.3f} "
          f"| {l['mib_s']:,.1f} | {m['mib_s']:,.1f} | {m['mib_s'] / loop:.4f} "
          + (f"| {m['mib_s'] / link:.3f} " if link else "")
          + f"| {l['lat_us']['p99']:.0f} | {m['lat_us']['p99']:.0f} "
          f"| {lt.get('us_per_io', 0):.2f} | {mt.get('us_per_io', 0):.2f} |")
if split_file:
    s = json.load(open(split_file))
    t = s["timeline"]
    st = t["steady"]
    print()
    print(f"Split under 4k randwrite QD32 x 2 connections: steady ({st['ios']:,} I/Os) p99 {st['p99_us']:.0f} µs, "
          f"p99.9 {st['p99_9_us']:.0f} µs, max {st['max_us']:.0f} µs")
    for e in t["events"]:
        a = e["around"]
        print(f"- split requested at {e['started_s']:.3f} s, answered after {e['duration_ms']:.2f} ms (exit {e['exit_code']}); "
              f"{a['ios']:,} I/Os within {t['window_ms']:.0f} ms: p99 {a['p99_us']:.0f} µs, p99.9 {a['p99_9_us']:.0f} µs, "
              f"max {a['max_us']:.0f} µs = {e['max_over_steady_p99_9']:.2f}x steady p99.9")
        print(f"  answer: {e['output']}")
if recover_file:
    r = json.load(open(recover_file))
    rb = r["idle_bytes"] / r["idle_seconds"] / 2**20
    print()
    print(f"Rebuild of the local device, idle host, unlimited rate: {r['idle_bytes'] / 2**20:,.0f} MiB in "
          f"{r['idle_seconds']:.2f} s = {rb:,.0f} MiB/s = {vs(rb)} (goal >= 0.8x loopback)")
    erb = r.get("engine_bps", 0) / 2**20
    if erb:
        print(f"  (the engine's own rate of the pass, rebuild_rate_bps: {erb:,.0f} MiB/s = {vs(erb)})")
    base = json.load(open(f"{out}/recover-base.json"))
    deg = json.load(open(f"{out}/recover-degraded.json"))
    reb = json.load(open(f"{out}/recover-rebuild.json"))
    st = json.load(open(f"{out}/recover-status.json"))[0]["local"]
    print()
    print(f"| 4k randrw 70 % read, QD32 x 2 connections, on m2 | IOPS | MiB/s | p99 µs |")
    print("|---|---:|---:|---:|")
    print(f"| healthy | {base['iops']:,.0f} | {base['mib_s']:,.1f} | {base['lat_us']['p99']:.0f} |")
    print(f"| local device failed, no rebuild | {deg['iops']:,.0f} | {deg['mib_s']:,.1f} | {deg['lat_us']['p99']:.0f} |")
    print(f"| failed, rebuild capped at {r['rate_mib_s']} MiB/s | {reb['iops']:,.0f} | {reb['mib_s']:,.1f} | {reb['lat_us']['p99']:.0f} |")
    print(f"Host IOPS during the rebuild: {reb['iops'] / deg['iops']:.3f}x the failed device's without a rebuild, "
          f"{reb['iops'] / base['iops']:.3f}x the healthy mirror's; rebuild measured at "
          f"{st['rebuild_rate_bps'] / 2**20:,.1f} MiB/s (cap {r['rate_mib_s']}), "
          f"{st['remote_reads']:,} host reads served by the leg")
PY
echo "# outputs in $OUT"
