#!/bin/sh
# Guest script for ../nvmet-host-check.sh: export a brd RAM disk with the
# kernel's nvmet-tcp target on 0.0.0.0:4420 (reached from the host through
# QEMU hostfwd), announce readiness on the console, then wait until the host
# reports its test result over HTTP on 10.0.2.2:$DONE_PORT, and exit with it.
set -eu
NQN=${NQN:-nqn.2024-01.io.mirrorpoint:nvmet-host}
PORT=4420
WAIT_S=${WAIT_S:-900}

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
echo 0.0.0.0 > "$C/ports/1/addr_traddr"
echo "$PORT" > "$C/ports/1/addr_trsvcid"
ln -s "$C/subsystems/$NQN" "$C/ports/1/subsystems/$NQN"
echo "MP_NVMET_READY nqn=$NQN port=$PORT"

i=0
result=""
while [ -z "$result" ]; do
    result=$(wget -q -O - "http://10.0.2.2:$DONE_PORT/" 2>/dev/null || true)
    [ -n "$result" ] && break
    i=$((i + 1))
    [ "$i" -lt $((WAIT_S * 2)) ] || { echo "host never reported a result"; exit 1; }
    sleep 0.5
done
echo "host result: $result"
dmesg | grep -i nvmet | tail -n 20 || true

rm "$C/ports/1/subsystems/$NQN"
rmdir "$C/ports/1"
echo 0 > "$C/subsystems/$NQN/namespaces/1/enable"
rmdir "$C/subsystems/$NQN/namespaces/1"
rmdir "$C/subsystems/$NQN"
[ "$result" = PASS ]
