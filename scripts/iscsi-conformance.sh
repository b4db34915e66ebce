#!/usr/bin/env bash
# libiscsi's conformance suite (iscsi-test-cu -t ALL) against mirrorpoint,
# optionally against tgt too, recorded in docs/iscsi-conformance.md.
#
#   scripts/iscsi-conformance.sh            run against mirrorpoint, fail when passes
#                                           drop below the floor; raw output and
#                                           table go to build/iscsi-conformance/
#   scripts/iscsi-conformance.sh --record   also write them into docs/ (the table
#                                           in docs/iscsi-conformance.md)
#   scripts/iscsi-conformance.sh --tgt      also (re)run against tgt (tgtd) and
#                                           record its raw output in docs/
#
# Needs root for apt (libiscsi-bin, and tgt with --tgt). Everything listens
# on 127.0.0.1 on ephemeral ports; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WITH_TGT=0
RECORD=0
for arg in "$@"; do
    case $arg in
        --tgt) WITH_TGT=1; RECORD=1 ;;
        --record) RECORD=1 ;;
        *) echo "usage: $0 [--record] [--tgt]" >&2; exit 2 ;;
    esac
done
OUT=build/iscsi-conformance
mkdir -p "$OUT"

INIT1=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test
INIT2=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2
IQN=iqn.2026-11.io.mirrorpoint:conformance
SUITE_TIMEOUT=${SUITE_TIMEOUT:-1200}
FLOOR_FILE=scripts/iscsi-conformance.floor
DOC=docs/iscsi-conformance.md
TGT_RAW=docs/iscsi-conformance-tgt.txt

need_pkg() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "== installing $2"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
}
need_pkg iscsi-test-cu libiscsi-bin

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

WORK=$(mktemp -d /tmp/mp-conformance.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    if [ "$WITH_TGT" = 1 ] && command -v tgtadm >/dev/null 2>&1 && [ -n "${TGT_CTL:-}" ]; then
        tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode target --tid 1 --force 2>/dev/null || true
        tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode system 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

run_suite() { # URL OUT
    timeout "$SUITE_TIMEOUT" iscsi-test-cu -d -t ALL -i "$INIT1" -I "$INIT2" "$1" >"$2" 2>&1 || true
}

echo "== building mirrorpoint (${PROFILE:-dev})"
if [ "${PROFILE:-dev}" = release ]; then
    cargo build -q --release -p mirrorpoint-target --bin mirrorpoint
    BIN=$ROOT/build/release/mirrorpoint
else
    cargo build -q -p mirrorpoint-target --bin mirrorpoint
    BIN=$ROOT/build/debug/mirrorpoint
fi

PORT=$(free_port)
cat >"$WORK/config.json" <<EOF
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512}},
    {"method": "bdev_malloc_create", "params": {"name": "Malloc1", "num_blocks": 131072, "block_size": 512}}
  ]},
  {"subsystem": "iscsi", "config": [
    {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": "$PORT"}]}},
    {"method": "iscsi_create_initiator_group", "params": {"tag": 1, "initiators": ["$INIT1", "$INIT2"], "netmasks": ["127.0.0.1/32"]}},
    {"method": "iscsi_create_target_node", "params": {"name": "$IQN", "alias_name": "conformance",
      "luns": [{"bdev_name": "Malloc0", "lun_id": 0}, {"bdev_name": "Malloc1", "lun_id": 1}],
      "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 64, "disable_chap": true}}
  ]}
]}
EOF

echo "== starting mirrorpoint on 127.0.0.1:$PORT"
timeout $((SUITE_TIMEOUT + 120)) "$BIN" serve --config "$WORK/config.json" \
    --rpc-socket "$WORK/rpc.sock" --data-dir "$WORK/data" --no-pin >"$WORK/mirrorpoint.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    grep -q ready "$WORK/mirrorpoint.log" && break
    sleep 0.2
done
grep -q ready "$WORK/mirrorpoint.log" || { cat "$WORK/mirrorpoint.log"; echo "mirrorpoint did not start"; exit 1; }

echo "== iscsi-test-cu -t ALL against mirrorpoint (LUN 1)"
run_suite "iscsi://127.0.0.1:$PORT/$IQN/1" "$WORK/ours.txt"
kill "${PIDS[0]}" 2>/dev/null || true
cp "$WORK/ours.txt" "$OUT/mirrorpoint.txt"
[ "$RECORD" = 0 ] || cp "$WORK/ours.txt" docs/iscsi-conformance-mirrorpoint.txt

if [ "$WITH_TGT" = 1 ]; then
    need_pkg tgtd tgt
    TPORT=$(free_port)
    TGT_CTL=$((TPORT % 1000 + 100))
    truncate -s 64M "$WORK/tgt.img"
    echo "== starting tgtd on 127.0.0.1:$TPORT"
    timeout $((SUITE_TIMEOUT + 120)) tgtd -f -C "$TGT_CTL" --iscsi portal=127.0.0.1:$TPORT >"$WORK/tgtd.log" 2>&1 &
    PIDS+=($!)
    sleep 1
    TIQN=iqn.2026-11.io.mirrorpoint:tgt-peer
    tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode target --tid 1 -T "$TIQN"
    tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tgt.img"
    tgtadm -C "$TGT_CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL
    echo "== iscsi-test-cu -t ALL against tgt (LUN 1)"
    run_suite "iscsi://127.0.0.1:$TPORT/$TIQN/1" "$WORK/tgt.txt"
    cp "$WORK/tgt.txt" "$TGT_RAW"
fi

TGT_ARG=()
[ -f "$TGT_RAW" ] && TGT_ARG=("$TGT_RAW")
python3 scripts/iscsi_conformance_report.py markdown "$WORK/ours.txt" "${TGT_ARG[@]}" >"$OUT/report.md"
if [ "$RECORD" = 1 ]; then
    cp "$OUT/report.md" "$DOC"
else
    DOC=$OUT/report.md
fi
read -r PASS FAIL SKIP TOTAL < <(python3 scripts/iscsi_conformance_report.py summary "$WORK/ours.txt")
FLOOR=$(grep -v '^#' "$FLOOR_FILE" | head -1)
echo "== mirrorpoint: $PASS passed, $FAIL failed, $SKIP skipped of $TOTAL (floor $FLOOR); table in $DOC"
if [ "$PASS" -lt "$FLOOR" ]; then
    echo "conformance regression: $PASS real passes, floor is $FLOOR" >&2
    exit 1
fi
