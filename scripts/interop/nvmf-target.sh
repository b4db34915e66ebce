#!/bin/sh
# The Linux kernel's NVMe/TCP host against our target: starts `mirrorpoint
# serve` on 127.0.0.1 (free port) with a file-backed volume exported in one
# subsystem, then boots the interop guest with guest/nvme-tcp-roundtrip.sh
# (connect, mkfs.ext4, write, drop caches, read back and compare, fsck,
# disconnect) once per case:
#
#   plain    no digests, 1 guest CPU (1 I/O queue), 8 MiB of files
#   digests  header and data digests, 2 guest CPUs (2 I/O queues on two
#            connections, spread over our two reactors), 16 MiB of files
#
# Both round trips reconnect before verifying the files, then write and
# verify an O_DIRECT pattern over the whole 48 MiB namespace at 128 KiB (far
# above the 8 KiB MAXH2CDATA configured here, so each R2T is answered with
# many H2CData PDUs) and at 4 KiB (the in-capsule data size).
#   events   guest/nvme-tcp-events.sh: a discovery controller, then a
#            namespace added over RPC while the host is connected must show
#            up (asynchronous event, changed namespace log, rescan)
#
# Usage: scripts/interop/nvmf-target.sh [CASE...]     (default: all)
# Env:   MIRRORPOINT  binary (default build/debug/mirrorpoint, built if missing)
#        VOLUME_DIR   where the volume's file lives (default: the work dir
#                     under /tmp). On tmpfs (VOLUME_DIR=/dev/shm) the uring
#                     backend maps the file and copies on the reactors; the
#                     script then also checks that bdev_get_bdevs says so.
# Exit:  0 when every case passed; the target log is kept on failure.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${MIRRORPOINT:-$root/build/debug/mirrorpoint}
if [ ! -x "$bin" ]; then
    (cd "$root" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build -p mirrorpoint-target --bin mirrorpoint)
fi
cases=${*:-plain digests events}
work=$(mktemp -d /tmp/mp-nvmf-interop.XXXXXX)
vol=${VOLUME_DIR:-$work}/mp-nvmf-interop-d0.$$.img
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
nqn=nqn.2026-11.io.mirrorpoint:interop
cat >"$work/config.json" <<EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
   {"method": "bdev_uring_create",
    "params": {"name": "d0", "filename": "$vol", "size": 50331648}},
   {"method": "bdev_malloc_create",
    "params": {"name": "m1", "num_blocks": 16384, "block_size": 4096}}]},
 {"subsystem": "nvmf", "config": [
   {"method": "nvmf_create_transport",
    "params": {"trtype": "TCP", "in_capsule_data_size": 4096, "io_unit_size": 8192, "max_io_size": 131072}},
   {"method": "nvmf_create_subsystem",
    "params": {"nqn": "$nqn", "allow_any_host": true, "serial_number": "MPINTEROP0001"}},
   {"method": "nvmf_subsystem_add_ns",
    "params": {"nqn": "$nqn", "namespace": {"bdev_name": "d0"}}},
   {"method": "nvmf_subsystem_add_listener",
    "params": {"nqn": "$nqn", "listen_address":
      {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "$port"}}}]}
]}
EOF
"$bin" serve --config "$work/config.json" --rpc-socket "$work/rpc.sock" \
    --cores 0,1 --no-pin --buffers 256 >"$work/target.log" 2>&1 &
tpid=$!
cleanup() {
    kill "$tpid" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    if [ -n "${VOLUME_DIR:-}" ]; then rm -f "$vol"; fi
}
trap cleanup EXIT INT TERM
i=0
until grep -q "ready" "$work/target.log" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 100 ] || ! kill -0 "$tpid" 2>/dev/null; then
        echo "target did not start:"; cat "$work/target.log"; exit 2
    fi
    sleep 0.1
done
if [ "$(stat -f -c %T "$(dirname "$vol")")" = tmpfs ]; then
    if ! "$bin" rpc -s "$work/rpc.sock" bdev_get_bdevs | grep -q '"memory_mapped": *true'; then
        echo "d0 is on tmpfs but bdev_get_bdevs does not report it memory-mapped"
        exit 1
    fi
    echo "d0 is on tmpfs: memory-mapped"
fi
pass=0
fail=0
events() {
    logdir="$work/guest-events"
    "$here/run-guest.sh" "$here/guest/nvme-tcp-events.sh" --name nvmf-events \
        --log-dir "$logdir" --env NQN=$nqn --env TRSVCID=$port --timeout 300 &
    gpid=$!
    i=0
    until grep -q MP_WAITING_FOR_NS2 "$logdir/console.log" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 2400 ] || ! kill -0 "$gpid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    "$bin" rpc -s "$work/rpc.sock" nvmf_subsystem_add_ns \
        "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"m1\", \"nsid\": 2}}" || true
    wait "$gpid"
}

for c in $cases; do
    case $c in
        plain) args="--env DATA_MB=8" ;;
        digests) args="--env CONNECT_OPTS=hdr_digest,data_digest --env DATA_MB=16 --smp 2" ;;
        events) args="" ;;
        *) echo "unknown case $c"; exit 2 ;;
    esac
    if [ "$c" = events ]; then
        run() { events; }
    else
        # shellcheck disable=SC2086
        run() {
            "$here/run-guest.sh" "$here/guest/nvme-tcp-roundtrip.sh" --name "nvmf-$c" \
                --env NQN=$nqn --env TRSVCID=$port $args --timeout 300
        }
    fi
    if run; then
        echo "case $c: PASS"
        pass=$((pass + 1))
    else
        echo "case $c: FAIL (target log: $work/target.log)"
        fail=$((fail + 1))
    fi
done
cleanup
trap - EXIT INT TERM
echo "$pass passed, $fail failed"
if [ $fail -eq 0 ]; then
    rm -rf "$work"
    exit 0
fi
exit 1
