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
#   DATA_MB   size of the files written and read back (default 8)
#   PATTERN_BS  block sizes of the direct-I/O pattern passes over the whole
#             namespace (default "131072 4096"; empty to skip)
#   PARALLEL_4K=0  skip the pass of eight parallel 4 KiB O_DIRECT writers
#   KEEP_CONNECTED=1  skip the disconnect at the end
#
# Steps: connect via /dev/nvme-fabrics (no nvme-cli), find the new namespace,
# mkfs.ext4, mount, write two files, umount, DISCONNECT, RECONNECT, mount
# read-only, compare sha256, umount, fsck -n; then for each PATTERN_BS write a
# fresh random pattern over the whole namespace with O_DIRECT at that block
# size and read it back with O_DIRECT, comparing checksums; eight parallel
# 4 KiB O_DIRECT writers on the first 8 MiB, read back and compared;
# disconnect.
set -eu
: "${NQN:?NQN must be set}"
TRADDR=${TRADDR:-10.0.2.2}
TRSVCID=${TRSVCID:-4420}
DATA_MB=${DATA_MB:-8}
PATTERN_BS=${PATTERN_BS-131072 4096}

step() { echo "== $*"; }
nvme_blockdevs() {
    for b in /sys/block/nvme*n*; do
        b=${b##*/}
        case $b in nvme*c*) ;; "nvme*n*") ;; *) echo "$b" ;; esac
    done
}

opts="transport=tcp,traddr=$TRADDR,trsvcid=$TRSVCID,nqn=$NQN"
[ -z "${HOSTNQN:-}" ] || opts="$opts,hostnqn=$HOSTNQN"
[ -z "${CONNECT_OPTS:-}" ] || opts="$opts,$CONNECT_OPTS"

# connect: sets $inst, $CTRL and $dev (the namespace block device).
connect() {
    before=$(nvme_blockdevs)
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
    echo "namespace /dev/$dev: $(cat "/sys/block/$dev/size") sectors of $(cat "/sys/block/$dev/queue/logical_block_size") bytes, max I/O $(cat "/sys/block/$dev/queue/max_hw_sectors_kb") KiB"
}

disconnect() {
    step "disconnect nvme$inst"
    echo 1 >"$CTRL/delete_controller"
    i=0
    while [ -e "$CTRL" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ ! -e "$CTRL" ] || { echo "controller nvme$inst still present after delete"; exit 1; }
}

connect

step "mkfs.ext4, mount, write two files (${DATA_MB} MiB and 1 MiB)"
mkfs.ext4 -q -F "/dev/$dev"
mkdir -p /mnt/nvme
mount -t ext4 "/dev/$dev" /mnt/nvme
dd if=/dev/urandom of=/tmp/nvme-data bs=1M count="$DATA_MB" 2>/dev/null
dd if=/dev/urandom of=/tmp/nvme-small bs=4k count=256 2>/dev/null
cp /tmp/nvme-data /mnt/nvme/data
mkdir -p /mnt/nvme/dir
cp /tmp/nvme-small /mnt/nvme/dir/small
sync
want=$(cat /tmp/nvme-data /tmp/nvme-small | sha256sum)
rm -f /tmp/nvme-data /tmp/nvme-small
umount /mnt/nvme

# A fresh connection: nothing can come from the host's page cache or from
# state of the old queues.
disconnect
connect
mount -t ext4 -o ro "/dev/$dev" /mnt/nvme
got=$(cat /mnt/nvme/data /mnt/nvme/dir/small | sha256sum)
umount /mnt/nvme
[ "$want" = "$got" ] || { echo "checksum mismatch after reconnect: wrote $want read $got"; exit 1; }
echo "checksums ok after reconnect: ${got%% *}"
fsck.ext4 -n -f "/dev/$dev"

sectors=$(cat "/sys/block/$dev/size")
ns_bytes=$((sectors * 512))
for bs in $PATTERN_BS; do
    count=$((ns_bytes / bs))
    step "direct-I/O pattern over the whole namespace: $count x $bs bytes"
    dd if=/dev/urandom of=/tmp/pattern bs="$bs" count="$count" 2>/dev/null
    want=$(sha256sum </tmp/pattern)
    dd if=/tmp/pattern of="/dev/$dev" bs="$bs" count="$count" oflag=direct conv=fsync 2>/dev/null
    rm -f /tmp/pattern
    got=$(dd if="/dev/$dev" bs="$bs" count="$count" iflag=direct 2>/dev/null | sha256sum)
    [ "$want" = "$got" ] || { echo "pattern mismatch at bs=$bs: wrote $want read $got"; exit 1; }
    echo "pattern ok at bs=$bs: ${got%% *}"
done

# Eight writers at once, 4 KiB O_DIRECT each, on disjoint 1 MiB slices: the
# queue then carries back-to-back in-capsule writes of one size, the shape
# the target takes with batch receives (with the 4 KiB in-capsule size).
if [ "${PARALLEL_4K:-1}" = 1 ] && [ "$ns_bytes" -ge $((8 * 1048576)) ]; then
    step "8 parallel direct-I/O writers, 4096 bytes each, 8 x 1 MiB"
    dd if=/dev/urandom of=/tmp/par bs=1M count=8 2>/dev/null
    want=$(sha256sum </tmp/par)
    pids=
    for i in 0 1 2 3 4 5 6 7; do
        dd if=/tmp/par of="/dev/$dev" bs=4096 skip=$((i * 256)) seek=$((i * 256)) count=256 \
            oflag=direct 2>/dev/null &
        pids="$pids $!"
    done
    for p in $pids; do wait "$p" || { echo "parallel writer failed"; exit 1; }; done
    rm -f /tmp/par
    got=$(dd if="/dev/$dev" bs=1M count=8 iflag=direct 2>/dev/null | sha256sum)
    [ "$want" = "$got" ] || { echo "parallel 4 KiB writes mismatch: wrote $want read $got"; exit 1; }
    echo "parallel 4 KiB writes ok: ${got%% *}"
fi

if [ "${KEEP_CONNECTED:-0}" != 1 ]; then
    disconnect
fi
echo "nvme-tcp round trip ok"
