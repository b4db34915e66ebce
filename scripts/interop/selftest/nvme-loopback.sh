#!/bin/sh
# Guest script: NVMe/TCP round trip inside the guest. The guest kernel's own
# nvmet-tcp target exports a brd RAM disk on 127.0.0.1:4420; the guest's
# nvme-tcp host connects to it through /dev/nvme-fabrics (no nvme-cli), then
# mkfs.ext4, mount, write, checksum, umount, fsck, disconnect.
# Template for front-end tests: replace the target part with our target on
# the host (traddr=10.0.2.2) and keep the host part.
set -eu
NQN=${NQN:-nqn.2024-01.io.mirrorpoint:selftest}
PORT=${PORT:-4420}

step() { echo "== $*"; }

step "target: brd + nvmet-tcp on 127.0.0.1:$PORT"
modprobe brd rd_nr=1 rd_size=65536          # 64 MiB /dev/ram0
modprobe nvmet
modprobe nvmet-tcp
C=/sys/kernel/config/nvmet
mkdir "$C/subsystems/$NQN"
echo 1 > "$C/subsystems/$NQN/attr_allow_any_host"
mkdir "$C/subsystems/$NQN/namespaces/1"
echo /dev/ram0 > "$C/subsystems/$NQN/namespaces/1/device_path"
echo 1 > "$C/subsystems/$NQN/namespaces/1/enable"
mkdir "$C/ports/1"
echo tcp > "$C/ports/1/addr_trtype"
echo ipv4 > "$C/ports/1/addr_adrfam"
echo 127.0.0.1 > "$C/ports/1/addr_traddr"
echo "$PORT" > "$C/ports/1/addr_trsvcid"
ln -s "$C/subsystems/$NQN" "$C/ports/1/subsystems/$NQN"

step "host: connect"
echo "transport=tcp,traddr=127.0.0.1,trsvcid=$PORT,nqn=$NQN" > /dev/nvme-fabrics
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/nvme0n1 ] || { echo "no /dev/nvme0n1"; ls /dev; exit 1; }
echo "subsysnqn: $(cat /sys/class/nvme/nvme0/subsysnqn)"
echo "transport: $(cat /sys/class/nvme/nvme0/transport) address: $(cat /sys/class/nvme/nvme0/address)"
echo "size: $(cat /sys/block/nvme0n1/size) sectors"

step "mkfs.ext4, mount, write, checksum"
mkfs.ext4 -q -F /dev/nvme0n1
mkdir -p /mnt/t
mount -t ext4 /dev/nvme0n1 /mnt/t
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
cp /tmp/data /mnt/t/data
sync
want=$(sha256sum < /tmp/data)
umount /mnt/t
# Drop the page cache so the read below really goes over NVMe/TCP.
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nvme0n1 /mnt/t
got=$(sha256sum < /mnt/t/data)
umount /mnt/t
[ "$want" = "$got" ] || { echo "checksum mismatch: $want vs $got"; exit 1; }
echo "checksum ok: $got"
fsck.ext4 -n -f /dev/nvme0n1

step "host: disconnect"
echo 1 > /sys/class/nvme/nvme0/delete_controller
i=0
while [ -e /sys/class/nvme/nvme0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ ! -e /sys/class/nvme/nvme0 ] || { echo "controller still there"; exit 1; }

step "target: teardown"
rm "$C/ports/1/subsystems/$NQN"
rmdir "$C/ports/1"
echo 0 > "$C/subsystems/$NQN/namespaces/1/enable"
rmdir "$C/subsystems/$NQN/namespaces/1"
rmdir "$C/subsystems/$NQN"
echo "nvme loopback ok"
