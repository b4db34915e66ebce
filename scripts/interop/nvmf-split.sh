#!/bin/sh
# Split mirror with the Linux kernel's NVMe/TCP host (issue #7's interop):
# two `mirrorpoint serve` processes on this machine, site "east" (the
# primary, master agent, mirror links on 127.0.0.2) and site "west" (holds
# the mirror leg on its storage server, 127.0.0.3). East exports the mirrored
# volume m0 over NVMe/TCP on 127.0.0.1; the guest (guest/nvme-tcp-split.sh)
# makes ext4 on it and keeps writing files. When the guest says
# MP_SPLIT_NOW, this script calls mirror_split on east (while the guest
# writes), then west exports the split image in a second subsystem, and
# the guest attaches it over a second connection and checks it (journal
# replayed on a copy, e2fsck -fn clean, every file fsync'ed before the split
# request present with its checksum). Finally the leg is rejoined and must
# come back synced.
#
# Usage: scripts/interop/nvmf-split.sh
# Env:   MIRRORPOINT  binary (default build/debug/mirrorpoint, built if missing)
# Exit:  0 when the case passed; logs are kept on failure.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${MIRRORPOINT:-$root/build/debug/mirrorpoint}
if [ ! -x "$bin" ]; then
    (cd "$root" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build -p mirrorpoint-target --bin mirrorpoint)
fi
work=$(mktemp -d /tmp/mp-nvmf-split.XXXXXX)
freeport() { python3 -c 'import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));print(s.getsockname()[1])' "$1"; }
port=$(freeport 127.0.0.1)
image_port=$(freeport 127.0.0.1)
nqn=nqn.2026-11.io.mirrorpoint:split-volume
image_nqn=nqn.2026-11.io.mirrorpoint:split-image
secret=interop-split-shared-secret-0123456789
size=134217728  # 128 MiB: room for what the writer makes on a fast machine

pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for p in $pids; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
fail() {
    echo "nvmf-split: $*"
    for s in east west; do echo "--- $s log (tail)"; tail -n 30 "$work/$s.log" || true; done
    echo "logs in $work"
    exit 1
}
rpc() { # site method [params]
    s=$1
    shift
    "$bin" rpc -s "$work/$s.sock" "$@" || fail "rpc $s $*"
}
json_get() {
    python3 -c 'import json,sys;v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if k.isdigit() else v[k]
print(v)' "$@"
}
start_site() { # name cpus
    echo '{"subsystems": []}' >"$work/$1-config.json"
    mkdir -p "$work/$1-data"
    "$bin" serve --config "$work/$1-config.json" --rpc-socket "$work/$1.sock" \
        --data-dir "$work/$1-data" --cores "$2" --no-pin --buffers 256 >"$work/$1.log" 2>&1 &
    pids="$pids $!"
    i=0
    until grep -q "ready" "$work/$1.log" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le 100 ] || fail "$1 did not start"
        sleep 0.1
    done
}

start_site east 0,1
start_site west 0
east_addr=$(rpc east agent_set_site "{\"name\": \"east\", \"domain\": 1, \"listen\": \"127.0.0.2:0\", \"secret\": \"$secret\", \"master\": true}" | json_get listen)
west_addr=$(rpc west agent_set_site "{\"name\": \"west\", \"domain\": 2, \"listen\": \"127.0.0.3:0\", \"secret\": \"$secret\"}" | json_get listen)
rpc west bdev_uring_create "{\"name\": \"s1\", \"filename\": \"$work/west-s1.img\", \"size\": $size}" >/dev/null
rpc west agent_add_storage_server '{"name": "ss1", "id": 1, "volumes": ["s1"]}' >/dev/null
rpc east agent_add_peer "{\"name\": \"west\", \"domain\": 2, \"address\": \"$west_addr\"}" >/dev/null
rpc west agent_add_peer "{\"name\": \"east\", \"domain\": 1, \"address\": \"$east_addr\", \"master\": true}" >/dev/null
i=0
until [ "$(rpc east agent_get_sites | json_get peers 0 last_report_ms)" != None ]; do
    i=$((i + 1))
    [ $i -le 100 ] || fail "west never reported its capacity"
    sleep 0.1
done
rpc east bdev_uring_create "{\"name\": \"l0\", \"filename\": \"$work/east-l0.img\", \"size\": $size}" >/dev/null
rpc east mirror_create '{"name": "m0", "volume": "l0", "resync_rate": 0}' >/dev/null
i=0
until [ "$(rpc east mirror_get_status '{"name": "m0"}' | json_get 0 legs 0 state)" = synced ]; do
    i=$((i + 1))
    [ $i -le 600 ] || fail "the mirror never synced"
    sleep 0.1
done
for s in east west; do
    rpc $s nvmf_create_transport '{"trtype": "TCP", "in_capsule_data_size": 4096}' >/dev/null
done
rpc east nvmf_create_subsystem "{\"nqn\": \"$nqn\", \"allow_any_host\": true, \"serial_number\": \"MPSPLIT0001\"}" >/dev/null
rpc east nvmf_subsystem_add_ns "{\"nqn\": \"$nqn\", \"namespace\": {\"bdev_name\": \"m0\", \"nsid\": 1}}" >/dev/null
rpc east nvmf_subsystem_add_listener "{\"nqn\": \"$nqn\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$port\"}}" >/dev/null

logdir="$work/guest"
"$here/run-guest.sh" "$here/guest/nvme-tcp-split.sh" --name nvmf-split --log-dir "$logdir" \
    --env NQN=$nqn --env IMAGE_NQN=$image_nqn --env TRSVCID=$port --env IMAGE_TRSVCID=$image_port \
    --timeout 600 &
gpid=$!
i=0
until grep -q MP_SPLIT_NOW "$logdir/console.log" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 6000 ] || ! kill -0 "$gpid" 2>/dev/null; then
        wait "$gpid" || true
        fail "the guest never asked for the split"
    fi
    sleep 0.1
done
echo "guest: $(grep -a MP_SPLIT_NOW "$logdir/console.log" | tail -n 1 | tr -d '\r')"
split=$(rpc east mirror_split '{"name": "m0", "leg": 0, "image_name": "m0_split"}')
echo "split while the guest writes: $split"
rpc west nvmf_create_subsystem "{\"nqn\": \"$image_nqn\", \"allow_any_host\": true, \"serial_number\": \"MPSPLIT0002\"}" >/dev/null
rpc west nvmf_subsystem_add_ns "{\"nqn\": \"$image_nqn\", \"namespace\": {\"bdev_name\": \"m0_split\", \"nsid\": 1}}" >/dev/null
rpc west nvmf_subsystem_add_listener "{\"nqn\": \"$image_nqn\", \"listen_address\": {\"trtype\": \"tcp\", \"adrfam\": \"ipv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$image_port\"}}" >/dev/null
guest_ok=1
wait "$gpid" || guest_ok=0
# What the guest did, for the log.
grep -a -E '^(==|connected|writer|all |file |image |MP_|nvme-tcp split|/dev/|/tmp/image|e2fsck|Pass )' \
    "$logdir/console.log" | tr -d '\r' | sed 's/^/  guest: /' || true
[ $guest_ok = 1 ] || fail "the guest's check of the split image failed (console: $logdir/console.log)"

# Merge the image back: the leg resyncs what was written since the split.
rpc west nvmf_delete_subsystem "{\"nqn\": \"$image_nqn\"}" >/dev/null
rpc east mirror_rejoin '{"name": "m0", "leg": 0}' >/dev/null
i=0
until [ "$(rpc east mirror_get_status '{"name": "m0"}' | json_get 0 legs 0 state)" = synced ]; do
    i=$((i + 1))
    [ $i -le 600 ] || fail "the leg did not come back synced after mirror_rejoin"
    sleep 0.1
done
echo "rejoined: the leg is synced again"
cleanup
trap - EXIT INT TERM
rm -rf "$work"
echo "case split: PASS"
