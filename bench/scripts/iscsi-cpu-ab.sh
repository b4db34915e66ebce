#!/usr/bin/env bash
# A/B of mirrorpoint's iSCSI CPU per I/O: runs the same fio libiscsi
# workloads as compare-tgt-iscsi.sh against each mirrorpoint binary given,
# alternating (A B A B ...) ROUNDS times, so machine noise hits both alike.
# Prints one line per run: binary, workload, QD, IOPS, mean latency (us),
# target CPU per I/O (us) two ways: OS accounting (utime+stime of the whole
# process, io-wq workers and the reactor's idle spin included) and the
# reactors' own busy time (sum of busy_ns from framework_get_reactors over
# the run, SPDK's way: turns that found work; wall time, so it also counts
# time the reactor thread was preempted), and fio's CPU (usr+sys, % of one
# core: how close the client is to its own ceiling), and the ring ops the
# reactors submitted per I/O (ios_submitted: receives, sends, disk I/O).
# With PERF=1 the first
# run of each binary also records a call graph (perf record -g) into
# $KEEP/perf-<label>-<rw>-<qd>.data (kept).
#
# BACKING=tmpfs (default: a file on /dev/shm, page cache, buffered I/O) or
# BACKING=disk (a file on the root file system, ext4 here, opened with
# O_DIRECT by the uring backend). NUMJOBS=N runs N fio jobs (N sessions).
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
BACKING=${BACKING:-tmpfs}
NUMJOBS=${NUMJOBS:-1}
[ $# -ge 1 ] || { echo "usage: $0 BIN_A [BIN_B ...]" >&2; exit 2; }
FIO=$(./bench/scripts/build-fio-libiscsi.sh | tail -1)
case $BACKING in
    tmpfs) BENCH_DIR=${BENCH_DIR:-/dev/shm} ;;
    disk) BENCH_DIR=${BENCH_DIR:-/var/tmp} ;;
    *) echo "BACKING is tmpfs or disk" >&2; exit 2 ;;
esac
WORK=$(mktemp -d "$BENCH_DIR/mp-ab.XXXXXX")
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
busy_ns() { # BIN SOCKET -> the reactors' busy_ns and ios_submitted, summed
    "$1" rpc -s "$2" framework_get_reactors |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["reactors"]; print(sum(x["busy_ns"] for x in r), sum(x["ios_submitted"] for x in r))'
}
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
        --rpc-socket "$WORK/rpc.sock" --data-dir "$WORK/data" ${MP_ARGS:-} >"$WORK/mp.log" 2>&1 &
    MP=$!
    for _ in $(seq 150); do grep -qs ready "$WORK/mp.log" && break; sleep 0.2; done
    grep -qs ready "$WORK/mp.log" || { echo "$bin did not start:" >&2; cat "$WORK/mp.log" >&2; return 1; }
    local url="iscsi://127.0.0.1:$port/$IQN/1"
    url=${url//:/\\:}
    for w in $WORKLOADS; do
        local rw=${w%%:*} qd=${w##*:} before after pp=
        if [ "$perf" = 1 ]; then
            perf record -g -p "$MP" -o "$KEEP/perf-$label-$rw-$qd.data" -- sleep "$((RUNTIME - 2))" >/dev/null 2>&1 &
            pp=$!
        fi
        before=$(ticks "$MP")
        bbefore=$(busy_ns "$bin" "$WORK/rpc.sock")
        taskset -c "$FIO_CPU" "$FIO" --name=job --ioengine=libiscsi --filename="$url" \
            --rw="$rw" --bs=4k --iodepth="$qd" --runtime="$RUNTIME" --time_based \
            --numjobs="$NUMJOBS" --group_reporting \
            --size="$SIZE" --randrepeat=0 --norandommap --output-format=json \
            --output="$WORK/fio.json" >/dev/null 2>"$WORK/fio.err" || { cat "$WORK/fio.err"; return 1; }
        after=$(ticks "$MP")
        bafter=$(busy_ns "$bin" "$WORK/rpc.sock")
        [ -n "$pp" ] && wait "$pp" || true
        python3 - "$WORK/fio.json" "$label" "$rw" "$qd" "$((after - before))" "$HZ" "$bbefore" "$bafter" <<'PY'
import json, sys
path, name, rw, qd, dticks, hz, bb, ba = sys.argv[1:]
(b0, o0), (b1, o1) = map(int, bb.split()), map(int, ba.split())
dbusy, dops = b1 - b0, o1 - o0
j = json.load(open(path))["jobs"][0]
d = j["read"] if "read" in rw else j["write"]
ios = max(d["total_ios"], 1)
cpu_us = int(dticks) / int(hz) * 1e6 / ios
busy_us = int(dbusy) / 1e3 / ios
fio_cpu = j["usr_cpu"] + j["sys_cpu"]
ops = dops / ios
print(f"{name}\t{rw}\t{qd}\t{d['iops']:.0f}\t{d['clat_ns']['mean']/1000:.1f}\t{cpu_us:.2f}\t{busy_us:.2f}\t{fio_cpu:.0f}\t{ops:.2f}", flush=True)
PY
    done
    kill "$MP"; wait "$MP" 2>/dev/null || true; MP=
}

echo "# $(date -u '+%F %T') load: $(cut -d' ' -f1-3 /proc/loadavg) backing: $BACKING ($(df -T "$WORK" | awk 'NR==2{print $2}')) numjobs: $NUMJOBS serve options: ${MP_ARGS:-(defaults)}"
echo "# binary workload QD IOPS lat_us cpu_per_io_os_us cpu_per_io_busy_us fio_cpu_pct ring_ops_per_io"
for r in $(seq "$ROUNDS"); do
    i=0
    for bin in "$@"; do
        i=$((i + 1))
        p=0; [ "${PERF:-0}" = 1 ] && [ "$r" = 1 ] && p=1
        run_bin "$bin" "$(basename "$(dirname "$bin")")$i" "$p"
    done
done
echo "# end $(date -u '+%F %T') load: $(cut -d' ' -f1-3 /proc/loadavg)"
