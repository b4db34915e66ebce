# Shared by the mirror benchmark scripts (sourced, bash): two `mirrorpoint
# serve` processes on this machine, site "east" (primary, master agent,
# 127.0.0.2) and site "west" (its storage server holds the legs,
# 127.0.0.3), driven over their admin sockets, and the loopback TCP
# yardstick. The caller sets MP, BENCH, OUT, DIR, SECRET, TIME, RAMP,
# EAST_CPUS, WEST_CPUS, BACKEND (uring or malloc) and defines die().

freeport() { python3 -c 'import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));print(s.getsockname()[1])' "$1"; }

json_get() { python3 -c 'import json,sys;v=json.load(sys.stdin)
for k in sys.argv[1:]: v=v[int(k)] if k.isdigit() else v[k]
print(v)' "$@"; }

pids=()
# Stops the daemons and removes the volume files.
stop_sites() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$DIR"/east-*.img "$DIR"/west-*.img
}

start_site() { # name cpus
    local name=$1 cpus=$2
    echo '{"subsystems": []}' >"$OUT/$name-config.json"
    mkdir -p "$OUT/$name-data"
    local cmd=("$MP" serve --config "$OUT/$name-config.json" --rpc-socket "$OUT/$name.sock"
        --data-dir "$OUT/$name-data" --cores "$cpus" --buffers 1024)
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
# sets tcp_rows to the two JSON files.
tcp_yardstick() {
    tcp_rows=()
    local s f cmd
    for s in 1 2; do
        f="$OUT/tcp-$s.json"
        cmd=("$BENCH" tcp --to 127.0.0.3 --streams "$s" --bs 128K --time "$TIME" --ramp "$RAMP" --json)
        echo "${cmd[*]} > $f"
        "${cmd[@]}" >"$f"
        tcp_rows+=("$f")
    done
}

# Starts both sites, gives west one storage server of $1 bytes (volume s1),
# makes them peers and waits for west's first capacity report.
two_sites() { # west_storage_bytes
    start_site east "$EAST_CPUS"
    start_site west "$WEST_CPUS"
    local east_addr west_addr i=0
    east_addr=$(rpc east agent_set_site "{\"name\": \"east\", \"domain\": 1, \"listen\": \"127.0.0.2:0\", \"secret\": \"$SECRET\", \"master\": true}" | json_get listen)
    west_addr=$(rpc west agent_set_site "{\"name\": \"west\", \"domain\": 2, \"listen\": \"127.0.0.3:0\", \"secret\": \"$SECRET\"}" | json_get listen)
    bdev west s1 "$1"
    rpc west agent_add_storage_server '{"name": "ss1", "id": 1, "volumes": ["s1"]}' >/dev/null
    rpc east agent_add_peer "{\"name\": \"west\", \"domain\": 2, \"address\": \"$west_addr\"}" >/dev/null
    rpc west agent_add_peer "{\"name\": \"east\", \"domain\": 1, \"address\": \"$east_addr\", \"master\": true}" >/dev/null
    until [ -n "$(qrpc east agent_get_sites | json_get peers 0 last_report_ms 2>/dev/null)" ] &&
        [ "$(qrpc east agent_get_sites | json_get peers 0 last_report_ms 2>/dev/null)" != None ]; do
        i=$((i + 1)); [ $i -le 100 ] || die "west never reported its capacity"; sleep 0.1
    done
}
