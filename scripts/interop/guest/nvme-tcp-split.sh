#!/bin/sh
# Guest script (busybox sh): split a mirrored volume while ext4 on it is
# being written, then check the split image from a second connection.
#
# Environment (run-guest.sh --env):
#   NQN            subsystem exporting the mirrored volume (required)
#   IMAGE_NQN      subsystem the host exports the split image in (required)
#   TRADDR         target address (default 10.0.2.2 = the host's 127.0.0.1)
#   TRSVCID        port of NQN (default 4420)
#   IMAGE_TRSVCID  port of IMAGE_NQN (default TRSVCID)
#
# Steps: connect to NQN, mkfs.ext4, mount; a writer keeps creating files
# (random data, each fsync'ed, then its name and sha256 appended to a
# manifest); after a few seconds the manifest is copied (every file in that
# copy was durable before the split was asked for) and "MP_SPLIT_NOW" is
# printed: the host then splits the mirror and exports the image in
# IMAGE_NQN. Writing goes on while the guest connects to IMAGE_NQN (retrying
# until it exists) — the second connection. The writer stops; the mirrored
# volume is unmounted and must fsck clean. The image is read once (it is
# never written: a copy in guest RAM is what gets checked), the copy's
# journal is replayed as a mount after a crash would, `e2fsck -fn` on it
# must be clean, and every file of the manifest copy must be in it with its
# checksum.
set -eu
: "${NQN:?NQN must be set}"
: "${IMAGE_NQN:?IMAGE_NQN must be set}"
TRADDR=${TRADDR:-10.0.2.2}
TRSVCID=${TRSVCID:-4420}
IMAGE_TRSVCID=${IMAGE_TRSVCID:-$TRSVCID}

step() { echo "== $*"; }
nvme_blockdevs() {
    for b in /sys/block/nvme*n*; do
        b=${b##*/}
        case $b in nvme*c*) ;; "nvme*n*") ;; *) echo "$b" ;; esac
    done
}

# try_connect NQN PORT: sets $dev to the new namespace's block device, or
# returns 1 when the connect is refused (the subsystem does not exist yet).
try_connect() {
    before=$(nvme_blockdevs)
    reply=$( (exec 3<>/dev/nvme-fabrics && echo "transport=tcp,traddr=$TRADDR,trsvcid=$2,nqn=$1" >&3 &&
        read -r r <&3 && echo "$r") 2>/dev/null) || return 1
    inst=$(echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/\1/p')
    [ -n "$inst" ] || return 1
    dev=""
    i=0
    while [ -z "$dev" ] && [ $i -lt 100 ]; do
        for d in $(nvme_blockdevs); do
            echo "$before" | grep -qx "$d" || { dev=$d; break; }
        done
        [ -n "$dev" ] || { sleep 0.1; i=$((i + 1)); }
    done
    [ -n "$dev" ] || { echo "controller nvme$inst has no namespace"; exit 1; }
    echo "connected nvme$inst to $1: /dev/$dev, $(cat "/sys/block/$dev/size") sectors"
}

step "connect $NQN, mkfs.ext4, mount"
try_connect "$NQN" "$TRSVCID" || { echo "connect to $NQN failed"; exit 1; }
vol=$dev
mkfs.ext4 -q -F "/dev/$vol"
mkdir -p /mnt/vol
mount -t ext4 "/dev/$vol" /mnt/vol

step "writer: files of 4-128 KiB, each fsync'ed, then listed in the manifest"
: >/tmp/manifest
(
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        # A failed write (the file system full, on a fast machine) ends the
        # writer; only files written and fsync'ed whole are listed.
        dd if=/dev/urandom of="/mnt/vol/f$n" bs=4k count=$((1 + n % 32)) conv=fsync 2>/dev/null || {
            echo "writer: f$n could not be written, stopping"
            break
        }
        echo "f$n $(sha256sum <"/mnt/vol/f$n" | cut -d' ' -f1)" >>/tmp/manifest
    done
) &
writer=$!
sleep 4
cp /tmp/manifest /tmp/before-split
echo "MP_SPLIT_NOW after $(wc -l </tmp/before-split) durable files"

step "connect $IMAGE_NQN (the split image) while the writer goes on"
i=0
until try_connect "$IMAGE_NQN" "$IMAGE_TRSVCID"; do
    i=$((i + 1))
    [ $i -lt 240 ] || { echo "the split image never appeared in $IMAGE_NQN"; exit 1; }
    sleep 0.5
done
img=$dev
sleep 1
touch /tmp/stop
wait "$writer"
echo "writer stopped after $(wc -l </tmp/manifest) files"

step "the mirrored volume: umount, fsck"
umount /mnt/vol
fsck.ext4 -n -f "/dev/$vol"

step "the split image: copy it, replay its journal on the copy, fsck -fn"
dd if="/dev/$img" of=/tmp/image bs=1M 2>/dev/null
e2fsck -E journal_only -p /tmp/image || true
fsck.ext4 -n -f /tmp/image
missing=0
while read -r name sum; do
    got=$(debugfs -R "cat /$name" /tmp/image 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$sum" ]; then
        echo "file $name, durable before the split, is not in the image as written"
        missing=$((missing + 1))
    fi
done </tmp/before-split
[ $missing -eq 0 ] || exit 1
# The image holds the files durable before the split, maybe a few more that
# were being written at the split point, and none written after the writer
# was seen running past it. (The superblock's free counts e2fsck prints are
# those of the crash image: ext4 updates them lazily.)
in_image=$(debugfs -R "ls /" /tmp/image 2>/dev/null | tr -s ' \t' '\n\n' | grep -c '^f[0-9][0-9]*$' || true)
before=$(wc -l </tmp/before-split)
total=$(wc -l </tmp/manifest)
echo "image holds $in_image files: $before were durable before the split request, $total were written in all"
[ "$in_image" -ge "$before" ] && [ "$in_image" -le $((total + 1)) ] || {
    echo "the image's file count is outside [$before, $((total + 1))]"
    exit 1
}
echo "all $before files durable before the split are in the image"
echo "nvme-tcp split ok"
