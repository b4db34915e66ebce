#!/usr/bin/env bash
# The Linux kernel initiator (open-iscsi iscsid/iscsiadm + iscsi_tcp, in a
# Debian 6.1 guest under QEMU) against mirrorpoint's iSCSI target: login,
# mkfs.ext4, write, read back and compare, fsck, logout; without and with
# CRC32C header and data digests, then with one-way CHAP, with mutual CHAP
# (and digests), and a login with a wrong secret that must be refused.
#
# Usage: [MIRRORPOINT=path/to/mirrorpoint] scripts/interop/iscsi-mirrorpoint.sh
#        (runs setup.sh first; root for apt)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
./scripts/interop/setup.sh >/dev/null
if [ -z "${MIRRORPOINT:-}" ]; then
    cargo build -q -p mirrorpoint-target --bin mirrorpoint
    MIRRORPOINT=$ROOT/build/debug/mirrorpoint
fi
WORK=$(mktemp -d /tmp/mp-kernel-iscsi.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
timeout 600 "$MIRRORPOINT" serve --no-pin --rpc-socket "$WORK/rpc.sock" \
    --data-dir "$WORK/data" --iscsi-listen "127.0.0.1:$PORT" >"$WORK/log" 2>&1 &
MP=$!
trap 'kill $MP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do grep -q ready "$WORK/log" && break; sleep 0.2; done
IQN=iqn.2026-11.io.mirrorpoint:vol0
rpc() { "$MIRRORPOINT" rpc -s "$WORK/rpc.sock" "$@" >/dev/null; }
guest() {
    local name=$1
    shift
    if ./scripts/interop/run-guest.sh scripts/interop/guest/iscsi-roundtrip.sh \
        --env TARGET_IQN=$IQN --env TARGET_PORT="$PORT" --env DATA_MB=16 \
        --timeout 240 --name "iscsi-mirrorpoint-$name" "$@" | tail -1; then
        echo "case $name: PASS"
        pass=$((pass + 1))
    else
        echo "case $name: FAIL (target log: $WORK/log)"
        fail=$((fail + 1))
    fi
}
pass=0
fail=0
guest plain --env DIGESTS=0
guest digests --env DIGESTS=1

# One-way CHAP: the target requires the initiator's secret.
rpc iscsi_target_node_set_auth "{\"name\": \"$IQN\", \"require_chap\": true,
    \"chap\": {\"user\": \"guest-initiator\", \"secret\": \"initiator-secret-16\"}}"
guest chap --env CHAP_USER=guest-initiator --env CHAP_SECRET=initiator-secret-16
guest chap-wrong-secret --env CHAP_USER=guest-initiator --env CHAP_SECRET=not-the-secret-16 \
    --env EXPECT_LOGIN_FAILURE=1 --error-pattern ''

# Mutual CHAP: the initiator also checks the target's answer.
rpc iscsi_target_node_set_auth "{\"name\": \"$IQN\", \"require_chap\": true, \"mutual_chap\": true,
    \"chap\": {\"user\": \"guest-initiator\", \"secret\": \"initiator-secret-16\",
              \"muser\": \"mirrorpoint-target\", \"msecret\": \"target-secret-0016\"}}"
guest mutual-chap-digests --env DIGESTS=1 --env CHAP_USER=guest-initiator \
    --env CHAP_SECRET=initiator-secret-16 --env CHAP_MUSER=mirrorpoint-target \
    --env CHAP_MSECRET=target-secret-0016

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
