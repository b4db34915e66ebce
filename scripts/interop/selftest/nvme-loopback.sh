#!/bin/sh
# Guest script: NVMe/TCP round trip entirely inside the guest. The guest
# kernel's own nvmet-tcp target exports a brd RAM disk on 127.0.0.1:4420;
# guest/nvme-tcp-roundtrip.sh (put into the guest as /mp/lib/ by selftest.sh
# with --file) then connects the guest's nvme-tcp host to it and does the
# filesystem round trip. Front-end tests run the same round-trip script
# against our target on the host instead (TRADDR=10.0.2.2).
set -eu
NQN=${NQN:-nqn.2024-01.io.mirrorpoint:selftest}
PORT=${PORT:-4420}

echo "== target: brd RAM disk + nvmet-tcp on 127.0.0.1:$PORT"
modprobe brd rd_nr=1 rd_size=65536          # 64 MiB /dev/ram0
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
echo 127.0.0.1 >"$C/ports/1/addr_traddr"
echo "$PORT" >"$C/ports/1/addr_trsvcid"
ln -s "$C/subsystems/$NQN" "$C/ports/1/subsystems/$NQN"

NQN=$NQN TRADDR=127.0.0.1 TRSVCID=$PORT sh /mp/lib/nvme-tcp-roundtrip.sh

echo "== target: teardown"
rm "$C/ports/1/subsystems/$NQN"
rmdir "$C/ports/1"
echo 0 >"$C/subsystems/$NQN/namespaces/1/enable"
rmdir "$C/subsystems/$NQN/namespaces/1"
rmdir "$C/subsystems/$NQN"
rmmod nvmet-tcp nvmet brd
echo "nvme loopback ok"
