# Shared by the mirror benchmark scripts (sourced, bash): two `mirrorpoint
# serve` processes on this machine, site "east" (primary, master agent,
# 127.0.0.2) and site "west" (its storage server holds the legs,
# 127.0.0.3), driven over their admin sockets, and the loopback TCP
# yardstick. The caller sets MP, BENCH, OUT, DIR, SECRET, TIME, RAMP,
# EAST_CPUS, WEST_CPUS, BACKEND (uring or malloc), LINK_RATE (empty, or a
# tc rate such as 10gbit) and defines die().
#
# With LINK_RATE, the sites talk over an emulated inter-site link instead of
# loopback: west runs in a network namespace this file creates, joined to
# east by a veth pair whose two ends are shaped with
# `tc qdisc ... root tbf rate $LINK_RATE burst 1mb latency 10ms` (each
# direction capped at the rate; MTU 1500); east is $EAST_IP and west
# $WEST_IP on a /30, and stop_sites removes both. Admin sockets and the
# NVMe/TCP front end stay in the caller's namespace (127.0.0.2). The
# yardstick then also runs over that link (`mirrorpoint-bench tcp --netns`).

freeport() { python3 -c 'import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));print(s.getsockname()[1])' "$1"; }

json_get() { python3 -c 'import json,sys;v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if k.isdigit() else v[k]
print(v)' "$@"; }

# site method params path=value [timeout s]: polls over one admin connection
# (lib/rpc-wait.py) until the answer's value at the dotted path matches;
# prints the last answer. Cheap enough to run while a data mover is timed.
rpc_wait() {
    python3 "$(dirname "${BASH_SOURCE[0]}")/rpc-wait.py" "$OUT/$1.sock" "$2" "$3" "$4" "${5:-300}"
}

pids=()
EAST_IP=127.0.0.2
WEST_IP=127.0.0.3
LINK_NS=
LINK_DEV=
# Stops the daemons, removes the volume files and the emulated link.
stop_sites() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$DIR"/east-*.img "$DIR"/west-*.img
    link_down
}

# The emulated inter-site link (see the top of this file).
link_up() { # rate
    local rate=$1 net=$(($$ % 250 + 1))
    command -v ip >/dev/null && command -v tc >/dev/null || die "--link-rate needs ip and tc (iproute2)"
    [ "$(id -u)" = 0 ] || die "--link-rate needs root (ip netns, tc)"
    LINK_NS=mpbench-$$
    LINK_DEV=mpbe$$
    local peer=mpbw$$
    echo "# emulated link: netns $LINK_NS, veth $LINK_DEV <-> $peer, tbf rate $rate each way"
    ip netns add "$LINK_NS" || die "ip netns add $LINK_NS failed"
    ip link add "$LINK_DEV" type veth peer name "$peer" || die "ip link add (veth) failed"
    ip link set "$peer" netns "$LINK_NS"
    EAST_IP=10.213.$net.1
    WEST_IP=10.213.$net.2
    ip addr add "$EAST_IP/30" dev "$LINK_DEV"
    ip link set "$LINK_DEV" up
    ip -n "$LINK_NS" addr add "$WEST_IP/30" dev "$peer"
    ip -n "$LINK_NS" link set "$peer" up
    ip -n "$LINK_NS" link set lo up
    tc qdisc add dev "$LINK_DEV" root tbf rate "$rate" burst 1mb latency 10ms ||
        die "tc tbf rate $rate on $LINK_DEV failed"
    tc -n "$LINK_NS" qdisc add dev "$peer" root tbf rate "$rate" burst 1mb latency 10ms ||
        die "tc tbf rate $rate on $peer failed"
    # Reachable: a connection to a closed port there is refused, not lost.
    python3 -c 'import socket,sys
try: socket.create_connection((sys.argv[1], 9), timeout=3).close()
except ConnectionRefusedError: pass' "$WEST_IP" 2>/dev/null ||
        die "the emulated link does not answer ($EAST_IP -> $WEST_IP)"
}

link_down() {
    [ -n "$LINK_DEV" ] && ip link del "$LINK_DEV" 2>/dev/null
    [ -n "$LINK_NS" ] && ip netns del "$LINK_NS" 2>/dev/null
    LINK_DEV=
    LINK_NS=
    return 0
}

start_site() { # name cpus
    local name=$1 cpus=$2
    echo '{"subsystems": []}' >"$OUT/$name-config.json"
    mkdir -p "$OUT/$name-data"
    local cmd=("$MP" serve --config "$OUT/$name-config.json" --rpc-socket "$OUT/$name.sock"
        --data-dir "$OUT/$name-data" --cores "$cpus" --buffers 1024)
    # West sits behind the emulated link, when there is one.
    [ "$name" = west ] && [ -n "$LINK_NS" ] && cmd=(ip netns exec "$LINK_NS" "${cmd[@]}")
    echo "# $name: ${cmd[*]}"
    "${cmd[@]}" >"$OUT/$name.log" 2>&1 &
    pids+=($!)
    local i=0
    until [ -S "$OUT/$name.sock" ] && "$MP" rpc -s "$OUT/$name.sock" spdk_get_version >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le 300 ] || { cat "$OUT/$name.log" >&2; die "$name did not start"; }
        sleep 0.1
    done
}

rpc() { # site method [params]: printed to stderr, then called
    local site=$1; shift
    echo "+ rpc $site $*" >&2
    "$MP" rpc -s "$OUT/$site.sock" "$@"
}

qrpc() { "$MP" rpc -s "$OUT/$1.sock" "${@:2}"; } # quiet: for polling

bdev() { # site name size
    if [ "${BACKEND:-uring}" = malloc ]; then
        rpc "$1" bdev_malloc_create "{\"name\": \"$2\", \"num_blocks\": $(($3 / 4096)), \"block_size\": 4096}" >/dev/null
    else
        rpc "$1" bdev_uring_create "{\"name\": \"$2\", \"filename\": \"$DIR/$1-$2.img\", \"size\": $3, \"block_size\": 4096}" >/dev/null
    fi
}

# The loopback yardstick: `mirrorpoint-bench tcp` with 1 and 2 streams;
# sets tcp_rows to the two JSON files. With LINK_RATE it first brings the
# emulated link up and measures it the same way: link_rows.
tcp_yardstick() {
    tcp_rows=()
    link_rows=()
    local s f cmd
    for s in 1 2; do
        f="$OUT/tcp-$s.json"
        cmd=("$BENCH" tcp --to 127.0.0.3 --streams "$s" --bs 128K --time "$TIME" --ramp "$RAMP" --json)
        echo "${cmd[*]} > $f"
        "${cmd[@]}" >"$f"
        tcp_rows+=("$f")
    done
    [ -n "${LINK_RATE:-}" ] || return 0
    link_up "$LINK_RATE"
    for s in 1 2; do
        f="$OUT/link-$s.json"
        cmd=("$BENCH" tcp --to "$WEST_IP" --netns "$LINK_NS" --streams "$s" --bs 128K --time "$TIME" --ramp "$RAMP" --json)
        echo "${cmd[*]} > $f"
        "${cmd[@]}" >"$f"
        link_rows+=("$f")
    done
}

# Starts both sites, gives west one storage server of $1 bytes (volume s1),
# makes them peers and waits for west's first capacity report.
two_sites() { # west_storage_bytes
    start_site east "$EAST_CPUS"
    start_site west "$WEST_CPUS"
    local east_addr west_addr i=0
    east_addr=$(rpc east agent_set_site "{\"name\": \"east\", \"domain\": 1, \"listen\": \"$EAST_IP:0\", \"secret\": \"$SECRET\", \"master\": true}" | json_get listen)
    west_addr=$(rpc west agent_set_site "{\"name\": \"west\", \"domain\": 2, \"listen\": \"$WEST_IP:0\", \"secret\": \"$SECRET\"}" | json_get listen)
    bdev west s1 "$1"
    rpc west agent_add_storage_server '{"name": "ss1", "id": 1, "volumes": ["s1"]}' >/dev/null
    rpc east agent_add_peer "{\"name\": \"west\", \"domain\": 2, \"address\": \"$west_addr\"}" >/dev/null
    rpc west agent_add_peer "{\"name\": \"east\", \"domain\": 1, \"address\": \"$east_addr\", \"master\": true}" >/dev/null
    until [ -n "$(qrpc east agent_get_sites | json_get peers 0 last_report_ms 2>/dev/null)" ] &&
        [ "$(qrpc east agent_get_sites | json_get peers 0 last_report_ms 2>/dev/null)" != None ]; do
        i=$((i + 1)); [ $i -le 100 ] || die "west never reported its capacity"; sleep 0.1
    done
}
