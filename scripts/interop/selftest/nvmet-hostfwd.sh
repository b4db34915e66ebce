#!/bin/sh
# Guest script: the guest kernel's nvmet-tcp target on a brd RAM disk,
# listening on the guest's 10.0.2.15:4420, which run-guest.sh --hostfwd makes
# reachable from the host's 127.0.0.1. Prints MP_NVMET_READY when it listens,
# then waits (busybox nc on guest port 5000, also forwarded) until the host
# says DONE. A template for checking a userspace NVMe/TCP initiator of ours
# against the kernel's target.
set -eu
NQN=${NQN:-nqn.2024-01.io.mirrorpoint:hostfwd}
modprobe brd rd_nr=1 rd_size=16384
modprobe nvmet-tcp
C=/sys/kernel/config/nvmet
mkdir "$C/subsystems/$NQN"
echo 1 >"$C/subsystems/$NQN/attr_allow_any_host"
mkdir "$C/subsystems/$NQN/namespaces/1"
echo /dev/ram0 >"$C/subsystems/$NQN/namespaces/1/device_path"
echo 1 >"$C/subsystems/$NQN/namespaces/1/enable"
mkdir "$C/ports/1"
echo tcp >"$C/ports/1/addr_trtype"
echo ipv4 >"$C/ports/1/addr_adrfam"
echo 10.0.2.15 >"$C/ports/1/addr_traddr"
echo 4420 >"$C/ports/1/addr_trsvcid"
ln -s "$C/subsystems/$NQN" "$C/ports/1/subsystems/$NQN"
echo "MP_NVMET_READY nqn=$NQN"
msg=$(timeout 90 nc -l -p 5000 </dev/null || true)
echo "host said: $msg"
[ "$msg" = DONE ] || { echo "host did not finish"; exit 1; }
