#!/usr/bin/env bash
# 4k random read/write at QD1 and QD32 over iSCSI, mirrorpoint against tgt,
# on the same backing file, with fio's libiscsi engine (built by
# build-fio-libiscsi.sh). Reports IOPS, mean latency and each target's CPU
# time per I/O (utime+stime of the target process over the run, from
# /proc/PID/stat: the figure compared between the targets, the only one
# tgt has), for mirrorpoint also its reactors' busy time per I/O (busy_ns
# of framework_get_reactors, SPDK's way, idle spin excluded), and fio's own
# CPU (% of one core). Writes bench/results/compare-tgt-iscsi[-disk].md.
#
# Both targets run side by side on the same CPU, each idle while the other
# is measured, and every workload runs ROUNDS times per target, alternating
# between them (A B, then B A, ...). Why: the lab VM switches between a fast
# and a slow state every few seconds to tens of seconds (the same
# instructions take about twice the cycles, for both targets and for fio;
# BENCHMARKS.md has the evidence), so a target measured a minute after the
# other can be compared in another machine state. Alternating short runs
# gives both targets the same mix of states; the summary compares medians,
# and every run shows its slowest and fastest second (fio's IOPS log), which
# reveals a state switch inside the run.
#
# BACKING=tmpfs (default): the backing file on /dev/shm (page cache; tmpfs
# has no O_DIRECT: tgt reads and writes it with pread/pwrite, mirrorpoint
# maps it and copies, see target/src/volume/memory.rs). BACKING=disk: the file on the root file system
# (ext4 on the VM's virtio disk), mirrorpoint's uring backend with O_DIRECT
# and tgt's rdwr backing store with bsoflags=direct.
# MP_ARGS="--idle-timeout-us 0" passes extra options to `mirrorpoint serve`.
# NUMJOBS=N: N fio jobs, each its own iSCSI session.
# TARGETS="tgt mirrorpoint": which targets run, and which goes first in the
# odd rounds (default "mirrorpoint tgt").
# ROUNDS=N runs per target and workload (default 3), RUNTIME seconds each
# (default 5).
#
# MIRRORPOINT=path runs that binary instead of building one.
# Placement: the targets on CPU ${TARGET_CPU:-1}, fio on CPU ${FIO_CPU:-0}.
# Everything on 127.0.0.1; every run is bounded (RUNTIME seconds each).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
TARGET_CPU=${TARGET_CPU:-1}
FIO_CPU=${FIO_CPU:-0}
BACKING=${BACKING:-tmpfs}
NUMJOBS=${NUMJOBS:-1}
TARGETS=${TARGETS:-mirrorpoint tgt}
read -r -a ORDER <<<"$TARGETS"
for t in "${ORDER[@]}"; do
    case $t in
        mirrorpoint | tgt) ;;
        *) echo "TARGETS lists mirrorpoint and/or tgt, not $t" >&2; exit 2 ;;
    esac
done
case $BACKING in
    # tmpfs: both targets run on the page cache, so the comparison is of
    # the iSCSI stacks, not of a disk.
    tmpfs) BENCH_DIR=${BENCH_DIR:-/dev/shm}; OUT=bench/results/compare-tgt-iscsi.md; TGT_FLAGS=() ;;
    disk) BENCH_DIR=${BENCH_DIR:-/var/tmp}; OUT=bench/results/compare-tgt-iscsi-disk.md
        TGT_FLAGS=(--bstype rdwr --bsoflags direct) ;;
    *) echo "BACKING is tmpfs or disk" >&2; exit 2 ;;
esac
WORK=$(mktemp -d "$BENCH_DIR/mp-bench.XXXXXX")
IQN=iqn.2026-11.io.mirrorpoint:bench
PIDS=()
TGT_CTL=
cleanup() {
    if [ -n "$TGT_CTL" ]; then
        tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode target --tid 1 --force 2>/dev/null || true
        tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode system 2>/dev/null || true
    fi
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

FIO=$(./bench/scripts/build-fio-libiscsi.sh | tail -1)
command -v tgtd >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tgt >/dev/null; }
if [ -n "${MIRRORPOINT:-}" ]; then
    BIN=$MIRRORPOINT   # a release binary built earlier (A/B runs)
else
    echo "== building mirrorpoint (release)"
    cargo build -q --release -p mirrorpoint-target --bin mirrorpoint
    BIN=$ROOT/build/release/mirrorpoint
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
ticks() { # PID -> utime+stime in clock ticks (threads included)
    awk '{print $14 + $15}' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)
busy_ns() { # mirrorpoint's reactors' busy_ns, summed (0 for tgt)
    [ "$1" = mirrorpoint ] || { echo 0; return; }
    "$BIN" rpc -s "$WORK/rpc.sock" framework_get_reactors |
        python3 -c 'import json,sys; print(sum(r["busy_ns"] for r in json.load(sys.stdin)["reactors"]))'
}

START="$(date -u '+%F %T') load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== backing file $SIZE on $BACKING"
truncate -s "$SIZE" "$WORK/backing.img"
# Fill it once so neither target reads holes.
dd if=/dev/urandom of="$WORK/backing.img" bs=1M count=$(( $(stat -c %s "$WORK/backing.img") >> 20 )) conv=notrunc status=none

RESULTS=$WORK/results.tsv
: >"$RESULTS"

run_fio() { # NAME RW QD ROUND
    local name=$1 rw=$2 qd=$3 round=$4
    local pid url
    case $name in
        mirrorpoint) pid=$MPPID; url="iscsi://127.0.0.1:$PORT/$IQN/1" ;;
        tgt) pid=$TGTPID; url="iscsi://127.0.0.1:$TPORT/$IQN/1" ;;
    esac
    local esc=${url//:/\\:}
    local before after bbefore bafter
    before=$(ticks "$pid")
    bbefore=$(busy_ns "$name")
    rm -f "$WORK"/persec_iops.*.log
    taskset -c "$FIO_CPU" "$FIO" --name=job --ioengine=libiscsi --filename="$esc" \
        --rw="$rw" --bs=4k --iodepth="$qd" --runtime="$RUNTIME" --time_based \
        --numjobs="$NUMJOBS" --group_reporting \
        --size="$SIZE" --randrepeat=0 --norandommap \
        --write_iops_log="$WORK/persec" --log_avg_msec=1000 --output-format=json \
        --output="$WORK/fio.json" >/dev/null 2>"$WORK/fio.err" || { cat "$WORK/fio.err"; return 1; }
    after=$(ticks "$pid")
    bafter=$(busy_ns "$name")
    python3 "$ROOT/bench/scripts/lib/fio_run_row.py" "$WORK/fio.json" "$name" "$rw" "$qd" "$round" \
        "$((after - before))" "$HZ" "$((bafter - bbefore))" "$WORK"/persec_iops.*.log >>"$RESULTS"
    tail -1 "$RESULTS"
}

start_mirrorpoint() {
echo "== mirrorpoint on cpu $TARGET_CPU"
PORT=$(free_port)
cat >"$WORK/mp.json" <<EOF
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_uring_create", "params": {"name": "bench", "filename": "$WORK/backing.img", "block_size": 512}}
  ]},
  {"subsystem": "iscsi", "config": [
    {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": "$PORT"}]}},
    {"method": "iscsi_create_initiator_group", "params": {"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}},
    {"method": "iscsi_create_target_node", "params": {"name": "$IQN", "luns": [{"bdev_name": "bench", "lun_id": 1}],
      "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 64, "disable_chap": true}}
  ]}
]}
EOF
local limit=$(( (RUNTIME + 3) * 8 * ROUNDS + 120 ))
timeout "$limit" "$BIN" serve --config "$WORK/mp.json" --cores "$TARGET_CPU" \
    --rpc-socket "$WORK/rpc.sock" --data-dir "$WORK/data" ${MP_ARGS:-} >"$WORK/mp.log" 2>&1 &
MP=$!
PIDS+=("$MP")
for _ in $(seq 150); do grep -qs ready "$WORK/mp.log" && break; sleep 0.2; done
grep -qs ready "$WORK/mp.log" || { echo "mirrorpoint did not start:" >&2; cat "$WORK/mp.log" >&2; exit 1; }
MPPID=$(pgrep -P "$MP" -n)   # the daemon itself, not the timeout wrapper
}

start_tgt() {
echo "== tgt on cpu $TARGET_CPU"
TPORT=$(free_port)
TGT_CTL=$((TPORT % 1000 + 100))
local limit=$(( (RUNTIME + 3) * 8 * ROUNDS + 120 ))
timeout "$limit" taskset -c "$TARGET_CPU" tgtd -f -C "$TGT_CTL" \
    --iscsi portal=127.0.0.1:$TPORT >"$WORK/tgtd.log" 2>&1 &
TG=$!
PIDS+=("$TG")
sleep 1
TGTPID=$(pgrep -P "$TG" -n -x tgtd)
tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode target --tid 1 -T "$IQN"
tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/backing.img" "${TGT_FLAGS[@]}"
tgtadm -C "$TGT_CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL
}

for t in "${ORDER[@]}"; do
    case $t in
        mirrorpoint) start_mirrorpoint ;;
        tgt) start_tgt ;;
    esac
done

for rw in randread randwrite; do
    for qd in 1 32; do
        for round in $(seq "$ROUNDS"); do
            if [ $((round % 2)) = 1 ]; then order=("${ORDER[@]}"); else
                order=(); for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do order+=("${ORDER[$i]}"); done
            fi
            for t in "${order[@]}"; do run_fio "$t" "$rw" "$qd" "$round"; done
        done
    done
done

mkdir -p "$(dirname "$OUT")"
{
    echo "# iSCSI: mirrorpoint vs tgt, 4k random I/O (fio libiscsi engine)"
    echo
    echo "$(date -u '+%F %T') UTC (start $START), load average at the end $(cut -d' ' -f1-3 /proc/loadavg),"
    echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
    echo "targets side by side on CPU $TARGET_CPU, fio on CPU $FIO_CPU ($NUMJOBS job(s)), same ${SIZE} backing file on $BACKING ($(df -T "$WORK" | awk 'NR==2{print $2}')),"
    echo "$ROUNDS round(s) of ${RUNTIME}s per target and workload, alternating (odd rounds: $TARGETS first),"
    echo "mirrorpoint serve options: ${MP_ARGS:-(defaults)}."
    echo "CPU/IO (OS) = target process utime+stime over the run / I/Os completed;"
    echo "busy/IO = mirrorpoint's reactors' busy_ns over the run / I/Os; fio CPU = fio's usr+sys, % of one core;"
    echo "slowest-fastest second = fio's per-second IOPS (a wide range is a machine state switch inside the run)."
    echo
    python3 "$ROOT/bench/scripts/lib/fio_run_row.py" --summary "$RESULTS"
} >"$OUT"
cat "$OUT"
