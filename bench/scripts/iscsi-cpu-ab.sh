#!/usr/bin/env bash
# A/B of mirrorpoint's iSCSI CPU per I/O: runs the same fio libiscsi
# workloads as compare-tgt-iscsi.sh against each mirrorpoint binary given,
# alternating (A B A B ...) ROUNDS times, so machine noise hits both alike.
# Prints one line per run: binary, workload, QD, IOPS, mean latency (us),
# target CPU per I/O (us). With PERF=1 the first run of each binary also
# records a call graph (perf record -g) into $WORK/perf-<n>.data (kept).
#
# usage: ROUNDS=2 RUNTIME=10 bench/scripts/iscsi-cpu-ab.sh BIN_A [BIN_B ...]
# Everything on 127.0.0.1; each fio run is bounded (RUNTIME seconds).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-2}
SIZE=${SIZE:-1G}
TARGET_CPU=${TARGET_CPU:-1}
FIO_CPU=${FIO_CPU:-0}
WORKLOADS=${WORKLOADS:-"randread:1 randread:32 randwrite:1 randwrite:32"}
KEEP=${KEEP:-/dev/shm/mp-ab}
[ $# -ge 1 ] || { echo "usage: $0 BIN_A [BIN_B ...]" >&2; exit 2; }
FIO=$(./bench/scripts/build-fio-libiscsi.sh | tail -1)
WORK=$(mktemp -d "${BENCH_DIR:-/dev/shm}/mp-ab.XXXXXX")
mkdir -p "$KEEP"
IQN=iqn.2026-11.io.mirrorpoint:bench
MP=
cleanup() {
    [ -n "$MP" ] && kill "$MP" 2>/dev/null || true
    sleep 0.3
    rm -rf "$WORK"
}
trap cleanup EXIT
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
truncate -s "$SIZE" "$WORK/backing.img"
dd if=/dev/urandom of="$WORK/backing.img" bs=1M count=$(( $(stat -c %s "$WORK/backing.img") >> 20 )) conv=notrunc status=none

run_bin() { # BIN LABEL PERF
    local bin=$1 label=$2 perf=$3 port
    port=$(free_port)
    cat >"$WORK/mp.json" <<JSON
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_uring_create", "params": {"name": "bench", "filename": "$WORK/backing.img", "block_size": 512}}
  ]},
  {"subsystem": "iscsi", "config": [
    {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": "$port"}]}},
    {"method": "iscsi_create_initiator_group", "params": {"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}},
    {"method": "iscsi_create_target_node", "params": {"name": "$IQN", "luns": [{"bdev_name": "bench", "lun_id": 1}],
      "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 64, "disable_chap": true}}
  ]}
]}
JSON
    rm -rf "$WORK/data"
    "$bin" serve --config "$WORK/mp.json" --cores "$TARGET_CPU" \
        --rpc-socket "$WORK/rpc.sock" --data-dir "$WORK/data" >"$WORK/mp.log" 2>&1 &
    MP=$!
    for _ in $(seq 50); do grep -q ready "$WORK/mp.log" && break; sleep 0.2; done
    local url="iscsi://127.0.0.1:$port/$IQN/1"
    url=${url//:/\\:}
    for w in $WORKLOADS; do
        local rw=${w%%:*} qd=${w##*:} before after pp=
        if [ "$perf" = 1 ]; then
            perf record -g -p "$MP" -o "$KEEP/perf-$label-$rw-$qd.data" -- sleep "$((RUNTIME - 2))" >/dev/null 2>&1 &
            pp=$!
        fi
        before=$(ticks "$MP")
        taskset -c "$FIO_CPU" "$FIO" --name=job --ioengine=libiscsi --filename="$url" \
            --rw="$rw" --bs=4k --iodepth="$qd" --runtime="$RUNTIME" --time_based \
            --size="$SIZE" --randrepeat=0 --norandommap --output-format=json \
            --output="$WORK/fio.json" >/dev/null 2>"$WORK/fio.err" || { cat "$WORK/fio.err"; return 1; }
        after=$(ticks "$MP")
        [ -n "$pp" ] && wait "$pp" || true
        python3 - "$WORK/fio.json" "$label" "$rw" "$qd" "$((after - before))" "$HZ" <<'PY'
import json, sys
path, name, rw, qd, dticks, hz = sys.argv[1:]
j = json.load(open(path))["jobs"][0]
d = j["read"] if "read" in rw else j["write"]
ios = d["total_ios"]
cpu_us = int(dticks) / int(hz) * 1e6 / max(ios, 1)
print(f"{name}\t{rw}\t{qd}\t{d['iops']:.0f}\t{d['clat_ns']['mean']/1000:.1f}\t{cpu_us:.2f}", flush=True)
PY
    done
    kill "$MP"; wait "$MP" 2>/dev/null || true; MP=
}

echo "# $(date -u '+%F %T') load: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
    i=0
    for bin in "$@"; do
        i=$((i + 1))
        p=0; [ "${PERF:-0}" = 1 ] && [ "$r" = 1 ] && p=1
        run_bin "$bin" "$(basename "$(dirname "$bin")")$i" "$p"
    done
done
echo "# end $(date -u '+%F %T') load: $(cut -d' ' -f1-3 /proc/loadavg)"
