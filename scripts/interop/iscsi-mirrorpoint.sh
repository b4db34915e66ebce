#!/usr/bin/env bash
# The Linux kernel initiator (open-iscsi iscsid/iscsiadm + iscsi_tcp, in a
# Debian 6.1 guest under QEMU) against mirrorpoint's iSCSI target: login,
# mkfs.ext4, write, read back and compare, fsck, logout; once without and
# once with CRC32C header and data digests.
#
# Usage: scripts/interop/iscsi-mirrorpoint.sh   (runs setup.sh first; root for apt)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
./scripts/interop/setup.sh >/dev/null
cargo build -q -p mirrorpoint-target --bin mirrorpoint
WORK=$(mktemp -d /tmp/mp-kernel-iscsi.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
timeout 600 "$ROOT/build/debug/mirrorpoint" serve --no-pin --rpc-socket "$WORK/rpc.sock" \
    --data-dir "$WORK/data" --iscsi-listen "127.0.0.1:$PORT" >"$WORK/log" 2>&1 &
MP=$!
trap 'kill $MP 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do grep -q ready "$WORK/log" && break; sleep 0.2; done
rc=0
for digests in 0 1; do
    ./scripts/interop/run-guest.sh scripts/interop/guest/iscsi-roundtrip.sh \
        --env TARGET_IQN=iqn.2026-11.io.mirrorpoint:vol0 --env TARGET_PORT="$PORT" \
        --env DATA_MB=16 --env DIGESTS=$digests --timeout 240 \
        --name "iscsi-mirrorpoint-digests$digests" | tail -1 || rc=1
done
exit $rc
