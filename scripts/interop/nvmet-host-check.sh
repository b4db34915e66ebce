#!/usr/bin/env bash
# nvmet-host-check.sh - run mirrorpoint's userspace NVMe/TCP initiator
# (target/src/nvmf/host) against the Linux kernel's nvmet-tcp target.
#
# Usage: scripts/interop/nvmet-host-check.sh [--timeout S] [-v]
#
# Builds the ignored test target/tests/nvmf_host_nvmet.rs, boots the interop
# guest (run-guest.sh) running guest/nvmet-host.sh: nvmet-tcp exporting a
# 64 MiB brd RAM disk on guest port 4420, forwarded to 127.0.0.1:PORT on the
# host (QEMU hostfwd). Once the guest prints MP_NVMET_READY, the test runs
# against 127.0.0.1:PORT (connect, identify, discovery log, write/read/verify
# at QD 32 with digests off and on, in-capsule and R2T writes, SQ flow
# control off). The host then reports PASS/FAIL to the guest over HTTP on
# 10.0.2.2:DONE_PORT, the guest tears nvmet down and powers off, and
# run-guest.sh checks the guest kernel log for nvme/nvmet errors.
#
# Exit status: 0 when both the test and the guest passed; otherwise the
# test's status if it failed, else run-guest.sh's.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${MP_INTEROP_DIR:-$REPO/build/interop}
NQN=nqn.2024-01.io.mirrorpoint:nvmet-host
TIMEOUT=900
VERBOSE=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --timeout) TIMEOUT=$2; shift ;;
        -v|--verbose) VERBOSE=(-v) ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "nvmet-host-check: unknown option '$1'" >&2; exit 2 ;;
    esac
    shift
done
log() { echo "nvmet-host-check: $*" >&2; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cd "$REPO"
log "building the test binary"
BIN=$(CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo test -p mirrorpoint-target \
    --test nvmf_host_nvmet --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "nvmf_host_nvmet":
        print(m["executable"])' || true)
[[ -x $BIN ]] || { log "cannot build the test (run: cargo test -p mirrorpoint-target --test nvmf_host_nvmet --no-run)"; exit 2; }

"$HERE/setup.sh"
PORT=$(free_port)
DONE_PORT=$(free_port)
LOGDIR=$DIR/logs/$(date -u +%Y%m%dT%H%M%SZ)-nvmet-host-$$
mkdir -p "$LOGDIR"
GUEST_PID=""
SERVER_PID=""
cleanup() {
    [[ -z $SERVER_PID ]] || kill "$SERVER_PID" 2>/dev/null || true
    if [[ -n $GUEST_PID ]] && kill -0 "$GUEST_PID" 2>/dev/null; then
        kill -TERM "$GUEST_PID" 2>/dev/null || true
        wait "$GUEST_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

log "booting the guest (nvmet-tcp on guest :4420 -> 127.0.0.1:$PORT), log $LOGDIR"
"$HERE/run-guest.sh" "$HERE/guest/nvmet-host.sh" --name nvmet-host --log-dir "$LOGDIR" \
    --timeout "$TIMEOUT" --hostfwd "$PORT:4420" --env "NQN=$NQN" --env "DONE_PORT=$DONE_PORT" \
    "${VERBOSE[@]}" >"$LOGDIR/run-guest.out" 2>"$LOGDIR/run-guest.err" &
GUEST_PID=$!

deadline=$(( $(date +%s) + 180 ))
until grep -q MP_NVMET_READY "$LOGDIR/console.log" 2>/dev/null; do
    if ! kill -0 "$GUEST_PID" 2>/dev/null || [[ $(date +%s) -ge $deadline ]]; then
        log "the guest never got nvmet-tcp ready"
        cat "$LOGDIR/run-guest.err" >&2 || true
        tail -n 30 "$LOGDIR/console.log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
log "guest ready after $(( $(date +%s) - deadline + 180 )) s; running the initiator test"

TEST_RC=0
MP_NVMET_ADDR=127.0.0.1:$PORT MP_NVMET_NQN=$NQN "$BIN" --ignored --nocapture --test-threads=1 \
    2>&1 | tee "$LOGDIR/host-test.log" || TEST_RC=$?
[[ ${PIPESTATUS[0]} -eq 0 ]] || TEST_RC=${PIPESTATUS[0]}
RESULT=PASS
[[ $TEST_RC -eq 0 ]] || RESULT=FAIL
log "initiator test: $RESULT (rc $TEST_RC); telling the guest"

# Answer the guest's polls until it powers off.
python3 - "$DONE_PORT" "$RESULT" <<'PY' &
import http.server, sys
port, result = int(sys.argv[1]), sys.argv[2].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(result)))
        self.end_headers()
        self.wfile.write(result)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
SERVER_PID=$!

GUEST_RC=0
wait "$GUEST_PID" || GUEST_RC=$?
GUEST_PID=""
tail -n 1 "$LOGDIR/run-guest.out" >&2 || true
grep -E "host result|nvmet" "$LOGDIR/console.log" | tr -d '\r' | tail -n 20 >&2 || true
if [[ $TEST_RC -ne 0 ]]; then
    log "FAIL: initiator test failed (see $LOGDIR/host-test.log)"
    exit "$TEST_RC"
fi
if [[ $GUEST_RC -ne 0 ]]; then
    log "FAIL: guest reported rc $GUEST_RC (see $LOGDIR)"
    exit "$GUEST_RC"
fi
log "PASS: userspace initiator verified against Linux nvmet-tcp ($LOGDIR)"
