#!/bin/sh
# /init of the interop guest (busybox sh). Put into the initramfs by
# run-guest.sh; not meant to run on the host.
#
# Mounts proc/sys/dev/configfs, loads /etc/mp/modules.load (+ extra), brings
# up eth0 with QEMU user-network defaults, runs /mp/guest.sh with /mp/env,
# then writes the kernel log and the result line to /dev/ttyS1 (the host's
# result channel) and powers off.
# shellcheck shell=sh disable=SC3037
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/lock/iscsi /var/lib/iscsi

RESULT_DEV=/dev/ttyS1
say() { echo "mp-init: $*"; }

finish() { # RESULT RC [REASON]
    rc=$2
    sync
    stty -F "$RESULT_DEV" raw -echo 2>/dev/null
    {
        echo "MP_DMESG_BEGIN"
        dmesg
        echo "MP_DMESG_END"
        echo "MP_GUEST_TIMES boot_s=${BOOT_S:-?} script_s=${SCRIPT_S:-?}"
        echo "MP_GUEST_RESULT=$1 rc=$rc${3:+ reason=$3}"
    } >"$RESULT_DEV"
    echo "MP_GUEST_RESULT=$1 rc=$rc${3:+ reason=$3}"
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
    reboot -f
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

say "booted at ${0}, uptime $(uptime_s)s, kernel $(uname -r)"

# ---- modules
cat /etc/mp/modules.load /etc/mp/modules.extra 2>/dev/null >/tmp/modules.all
while read -r m; do
    [ -n "$m" ] || continue
    name=${m##*/}
    name=${name%.ko}
    grep -q "^$(echo "$name" | tr - _) " /proc/modules && continue
    if ! insmod "/lib/modules/$(uname -r)/$m" 2>/tmp/insmod.err; then
        cat /tmp/insmod.err
        say "ERROR: cannot load module $m"
        finish FAIL 125 module-load
    fi
done </tmp/modules.all
mount -t configfs configfs /sys/kernel/config

# ---- network (QEMU user networking: we are 10.0.2.15, host is 10.0.2.2)
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then
    say "ERROR: eth0 did not appear"
    finish FAIL 125 network
fi
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
hostname mp-guest

# ---- the test
if [ -f /mp/env ]; then
    set -a
    # shellcheck source=/dev/null
    . /mp/env
    set +a
fi
BOOT_S=$(uptime_s)
echo "MP_GUEST_SCRIPT_START uptime=${BOOT_S}"
cd /root || true
t0=$(uptime_s)
sh /mp/guest.sh </dev/null
rc=$?
t1=$(uptime_s)
SCRIPT_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
echo "MP_GUEST_SCRIPT_END rc=$rc script_s=$SCRIPT_S"
cd /
if [ "$rc" -eq 0 ]; then
    finish PASS 0
else
    finish FAIL "$rc" script
fi
