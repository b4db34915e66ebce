#!/bin/sh
# Guest script (busybox sh): NVMe/TCP host round trip with the Linux kernel
# initiator against a target, by default one on the host (10.0.2.2).
#
# Environment (run-guest.sh --env):
#   NQN       subsystem NQN to connect to (required)
#   TRADDR    target address (default 10.0.2.2 = the host's 127.0.0.1)
#   TRSVCID   target port (default 4420)
#   HOSTNQN   host NQN (default: the kernel's)
#   CONNECT_OPTS  extra nvme-fabrics options, e.g. "nr_io_queues=1,hdr_digest,data_digest"
#   DATA_MB   size of the file written and read back (default 8)
#   KEEP_CONNECTED=1  skip the disconnect at the end
#
# Steps: connect via /dev/nvme-fabrics (no nvme-cli), find the new namespace,
# mkfs.ext4, mount, write DATA_MB of random data, umount, drop caches,
# remount read-only, compare sha256, umount, fsck -n, disconnect.
set -eu
: "${NQN:?NQN must be set}"
TRADDR=${TRADDR:-10.0.2.2}
TRSVCID=${TRSVCID:-4420}
DATA_MB=${DATA_MB:-8}

step() { echo "== $*"; }
nvme_blockdevs() {
    for b in /sys/block/nvme*n*; do
        b=${b##*/}
        case $b in nvme*c*) ;; "nvme*n*") ;; *) echo "$b" ;; esac
    done
}

before=$(nvme_blockdevs)
opts="transport=tcp,traddr=$TRADDR,trsvcid=$TRSVCID,nqn=$NQN"
[ -z "${HOSTNQN:-}" ] || opts="$opts,hostnqn=$HOSTNQN"
[ -z "${CONNECT_OPTS:-}" ] || opts="$opts,$CONNECT_OPTS"
step "connect: $opts"
exec 3<>/dev/nvme-fabrics
echo "$opts" >&3
read -r reply <&3 || true
exec 3>&-
echo "nvme-fabrics: $reply"           # instance=N,cntlid=M
inst=$(echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/\1/p')
[ -n "$inst" ] || { echo "connect failed (no instance in reply)"; exit 1; }
CTRL=/sys/class/nvme/nvme$inst
echo "controller nvme$inst: subsysnqn=$(cat "$CTRL/subsysnqn") transport=$(cat "$CTRL/transport")"
echo "  address: $(cat "$CTRL/address")  model: $(cat "$CTRL/model")  fw: $(cat "$CTRL/firmware_rev")"

dev=""
i=0
while [ -z "$dev" ] && [ $i -lt 100 ]; do
    for d in $(nvme_blockdevs); do
        echo "$before" | grep -qx "$d" || { dev=$d; break; }
    done
    [ -n "$dev" ] || { sleep 0.1; i=$((i + 1)); }
done
[ -n "$dev" ] || { echo "no new namespace block device appeared"; exit 1; }
echo "namespace /dev/$dev: $(cat "/sys/block/$dev/size") sectors of $(cat "/sys/block/$dev/queue/logical_block_size") bytes"

step "mkfs.ext4, mount, write ${DATA_MB} MiB, checksum"
mkfs.ext4 -q -F "/dev/$dev"
mkdir -p /mnt/nvme
mount -t ext4 "/dev/$dev" /mnt/nvme
dd if=/dev/urandom of=/tmp/nvme-data bs=1M count="$DATA_MB" 2>/dev/null
cp /tmp/nvme-data /mnt/nvme/data
sync
want=$(sha256sum </tmp/nvme-data)
umount /mnt/nvme
echo 3 >/proc/sys/vm/drop_caches      # the read below goes over the wire
mount -t ext4 -o ro "/dev/$dev" /mnt/nvme
got=$(sha256sum </mnt/nvme/data)
umount /mnt/nvme
[ "$want" = "$got" ] || { echo "checksum mismatch: wrote $want read $got"; exit 1; }
echo "checksum ok: ${got%% *}"
fsck.ext4 -n -f "/dev/$dev"

if [ "${KEEP_CONNECTED:-0}" != 1 ]; then
    step "disconnect nvme$inst"
    echo 1 >"$CTRL/delete_controller"
    i=0
    while [ -e "$CTRL" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ ! -e "$CTRL" ] || { echo "controller nvme$inst still present after delete"; exit 1; }
fi
echo "nvme-tcp round trip ok"
