#!/bin/sh
# Guest script (busybox sh): iSCSI round trip with the Linux kernel initiator
# (iscsid + iscsiadm + iscsi_tcp + sd_mod) against a target, by default one
# on the host (10.0.2.2).
#
# Environment (run-guest.sh --env):
#   TARGET_IQN    target IQN (required)
#   TARGET_ADDR   target address (default 10.0.2.2 = the host's 127.0.0.1)
#   TARGET_PORT   target port (default 3260)
#   DATA_MB       size of the file written and read back (default 8)
#   KEEP_LOGGED_IN=1  skip the logout at the end
#
# No SendTargets discovery: a target listening on the host's 127.0.0.1 would
# advertise that address, which the guest cannot reach; the node record is
# created by hand. Then login, mkfs.ext4, mount, write, umount, drop caches,
# remount read-only, compare sha256, fsck -n, logout.
set -eu
: "${TARGET_IQN:?TARGET_IQN must be set}"
TARGET_ADDR=${TARGET_ADDR:-10.0.2.2}
TARGET_PORT=${TARGET_PORT:-3260}
DATA_MB=${DATA_MB:-8}
PORTAL=$TARGET_ADDR:$TARGET_PORT

step() { echo "== $*"; }

step "iscsid"
iscsid
i=0
while :; do
    rc=0
    iscsiadm -m session >/dev/null 2>&1 || rc=$?
    # 0: sessions listed, 21: no sessions; anything else: iscsid not ready
    if [ $rc -eq 0 ] || [ $rc -eq 21 ]; then break; fi
    [ $i -lt 50 ] || { echo "iscsid does not answer (iscsiadm rc=$rc)"; exit 1; }
    sleep 0.1; i=$((i + 1))
done

step "login to $TARGET_IQN at $PORTAL"
iscsiadm -m node -o new -T "$TARGET_IQN" -p "$PORTAL"
iscsiadm -m node -T "$TARGET_IQN" -p "$PORTAL" --login
i=0
while [ ! -b /dev/sda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/sda ] || { echo "no /dev/sda"; exit 1; }
iscsiadm -m session
echo "size: $(cat /sys/block/sda/size) sectors, vendor: $(cat /sys/block/sda/device/vendor)"

step "mkfs.ext4, mount, write, checksum"
mkfs.ext4 -q -F /dev/sda
mkdir -p /mnt/t
mount -t ext4 /dev/sda /mnt/t
dd if=/dev/urandom of=/tmp/data bs=1M count="$DATA_MB" 2>/dev/null
cp /tmp/data /mnt/t/data
sync
want=$(sha256sum < /tmp/data)
umount /mnt/t
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/sda /mnt/t
got=$(sha256sum < /mnt/t/data)
umount /mnt/t
[ "$want" = "$got" ] || { echo "checksum mismatch: $want vs $got"; exit 1; }
echo "checksum ok: $got"
fsck.ext4 -n -f /dev/sda

if [ "${KEEP_LOGGED_IN:-0}" != 1 ]; then
    step "logout"
    iscsiadm -m node -T "$TARGET_IQN" -p "$PORTAL" --logout
    i=0
    while [ -b /dev/sda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    [ ! -b /dev/sda ] || { echo "/dev/sda still there after logout"; exit 1; }
fi
echo "iscsi round trip ok"
