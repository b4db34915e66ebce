#!/bin/sh
# Guest script: iSCSI round trip against a target on the host (reached as
# 10.0.2.2). Needs TARGET_IQN and TARGET_PORT in the environment (run-guest.sh
# --env). Uses the real initiator stack: iscsid + iscsiadm (login, logout),
# iscsi_tcp, sd_mod, then mkfs.ext4, mount, write, checksum, umount, fsck.
set -eu
: "${TARGET_IQN:?}" "${TARGET_PORT:?}"
PORTAL=10.0.2.2:$TARGET_PORT

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
# No SendTargets discovery: the target would advertise its own 127.0.0.1.
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
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
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

step "logout"
iscsiadm -m node -T "$TARGET_IQN" -p "$PORTAL" --logout
i=0
while [ -b /dev/sda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ ! -b /dev/sda ] || { echo "/dev/sda still there after logout"; exit 1; }
echo "iscsi ok"
