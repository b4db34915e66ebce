#!/bin/sh
# Guest script (busybox sh): discovery controller and namespace change
# events with the Linux kernel initiator.
#
# Environment (run-guest.sh --env):
#   NQN       subsystem NQN to connect to (required; starts with namespace 1 only)
#   TRADDR    target address (default 10.0.2.2 = the host's 127.0.0.1)
#   TRSVCID   target port (default 4420)
#
# Steps: connect to the discovery subsystem and delete that controller;
# connect to NQN; print "MP_WAITING_FOR_NS2" (the host then adds namespace 2
# over RPC); wait for the kernel to rescan after the asynchronous event and
# show a second namespace block device; write and read back 1 MiB on it;
# reset the controller (the kernel tears the association down and connects
# a new controller) and read it back again; disconnect.
set -eu
: "${NQN:?NQN must be set}"
TRADDR=${TRADDR:-10.0.2.2}
TRSVCID=${TRSVCID:-4420}

connect() {
    exec 3<>/dev/nvme-fabrics
    echo "$1" >&3
    read -r reply <&3 || true
    exec 3>&-
    echo "$reply" | sed -n 's/.*instance=\([0-9]*\).*/\1/p'
}

echo "== discovery controller"
d=$(connect "transport=tcp,traddr=$TRADDR,trsvcid=$TRSVCID,nqn=nqn.2014-08.org.nvmexpress.discovery")
[ -n "$d" ] || { echo "discovery connect failed"; exit 1; }
echo "discovery controller nvme$d: $(cat /sys/class/nvme/nvme$d/subsysnqn)"
echo 1 >/sys/class/nvme/nvme$d/delete_controller

echo "== connect $NQN"
inst=$(connect "transport=tcp,traddr=$TRADDR,trsvcid=$TRSVCID,nqn=$NQN")
[ -n "$inst" ] || { echo "connect failed"; exit 1; }
i=0
while [ ! -e /sys/block/nvme${inst}n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /sys/block/nvme${inst}n1 ] || { echo "namespace 1 missing"; exit 1; }
echo "MP_WAITING_FOR_NS2"
i=0
while [ ! -e /sys/block/nvme${inst}n2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /sys/block/nvme${inst}n2 ] || { echo "namespace 2 did not appear"; exit 1; }
echo "namespace 2 appeared: $(cat /sys/block/nvme${inst}n2/size) sectors"
dd if=/dev/urandom of=/tmp/d bs=64k count=16 2>/dev/null
dd if=/tmp/d of=/dev/nvme${inst}n2 bs=64k conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/nvme${inst}n2 of=/tmp/r bs=64k count=16 2>/dev/null
[ "$(sha256sum </tmp/d)" = "$(sha256sum </tmp/r)" ] || { echo "namespace 2 data mismatch"; exit 1; }
echo "namespace 2 read back ok"

echo "== reset controller nvme$inst"
cntlid_before=$(cat /sys/class/nvme/nvme$inst/cntlid)
echo 1 >/sys/class/nvme/nvme$inst/reset_controller
i=0
while [ "$(cat /sys/class/nvme/nvme$inst/state)" != live ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
state=$(cat /sys/class/nvme/nvme$inst/state)
[ "$state" = live ] || { echo "controller state after reset: $state"; exit 1; }
echo "live again: cntlid $cntlid_before -> $(cat /sys/class/nvme/nvme$inst/cntlid)"
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/nvme${inst}n2 of=/tmp/r2 bs=64k count=16 2>/dev/null
[ "$(sha256sum </tmp/d)" = "$(sha256sum </tmp/r2)" ] || { echo "data mismatch after reset"; exit 1; }
echo "read back ok after reset"
echo 1 >/sys/class/nvme/nvme$inst/delete_controller
echo "nvme-tcp events ok"
