#!/usr/bin/env bash
# selftest.sh - prove the QEMU interop harness works (no mirrorpoint target
# involved). Each case boots the Debian guest once:
#   modules     trivial script: modules loaded, /dev/nvme-fabrics, eth0 -> PASS
#   exit1       script exits 1 -> harness must report FAIL (exit 1)
#   kernlog     script writes "I/O error" to the kernel log -> FAIL (exit 3)
#   timeout     script sleeps past --timeout -> QEMU killed, exit 124
#   panic       script crashes the guest kernel -> FAIL (exit 1, kernel-panic)
#   nvmedigest  same with header+data digests (crc32c) and one I/O queue
#   nvme        guest nvmet-tcp target on brd + guest nvme-tcp host over the
#               guest's loopback, mkfs/mount/write/checksum/disconnect -> PASS
#   hostfwd     guest nvmet-tcp target reached from the host's 127.0.0.1 via
#               --hostfwd; the host sends an NVMe/TCP ICReq and checks ICResp
#   iscsi       tgtd on the host 127.0.0.1 (installs Debian's tgt if missing),
#               guest iscsid/iscsiadm via 10.0.2.2 -> PASS
#
# Usage: scripts/interop/selftest.sh [CASE...]   (default: all)
# Prints per-case wall and boot times and ends with "N passed, N failed".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN=$HERE/run-guest.sh
ALL=(modules exit1 kernlog timeout panic nvme nvmedigest hostfwd iscsi)
CASES=("$@")
[[ ${#CASES[@]} -gt 0 ]] || CASES=("${ALL[@]}")
for c in "${CASES[@]}"; do
    [[ " ${ALL[*]} " == *" $c "* ]] || { echo "selftest: unknown case '$c' (known: ${ALL[*]})" >&2; exit 2; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mp-selftest.XXXXXX")
TGTD_PID=""
TGT_CTL=""
stop_tgtd() {
    [[ -n $TGTD_PID ]] || return 0
    # tgtd ignores SIGTERM while targets exist: delete them first.
    tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$TGTD_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$TGTD_PID" 2>/dev/null; then
        echo "selftest: tgtd did not exit; killing it" >&2
        kill -KILL "$TGTD_PID" 2>/dev/null || true
    fi
    wait "$TGTD_PID" 2>/dev/null || true
    TGTD_PID=""
}
cleanup() {
    local rc=$?
    stop_tgtd
    rm -rf "$TMP"
    return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

PASSED=0
FAILED=0
RESULTS=()
T0=$(date +%s.%N)

# run_case NAME EXPECTED_EXIT GUEST_SCRIPT [run-guest options...]
run_case() {
    local name=$1 want=$2 script=$3
    shift 3
    local out rc=0 t0 t1 summary
    echo "---- $name (expect exit $want)"
    t0=$(date +%s.%N)
    out=$("$RUN" "$script" --name "selftest-$name" "$@" 2>"$TMP/$name.err") || rc=$?
    t1=$(date +%s.%N)
    summary=$(grep '^MP_INTEROP_RESULT=' <<<"$out" | tail -n1 || true)
    echo "     $summary"
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [[ $rc == "$want" && -n $summary ]]; then
        PASSED=$((PASSED + 1))
        RESULTS+=("ok   $name (exit $rc, ${secs}s)")
        echo "     ok: exit $rc in ${secs}s"
    else
        FAILED=$((FAILED + 1))
        RESULTS+=("FAIL $name (exit $rc, wanted $want, ${secs}s)")
        echo "     FAIL: exit $rc, wanted $want; harness stderr:"
        sed 's/^/       /' "$TMP/$name.err"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Guest runs nvmet-tcp; the host talks NVMe/TCP to it through --hostfwd.
run_hostfwd() {
    local p1 p2 logd rc=0 pid t0 t1 ok=0
    p1=$(free_port)
    p2=$(free_port)
    logd=${MP_INTEROP_DIR:-$HERE/../../build/interop}/logs/$(date -u +%Y%m%dT%H%M%SZ)-selftest-hostfwd-$$
    echo "---- hostfwd (expect exit 0; host 127.0.0.1:$p1 -> guest nvmet 4420)"
    t0=$(date +%s.%N)
    "$RUN" "$HERE/selftest/nvmet-hostfwd.sh" --name selftest-hostfwd --timeout 120 \
        --log-dir "$logd" --hostfwd "$p1:4420" --hostfwd "$p2:5000" \
        >"$TMP/hostfwd.out" 2>"$TMP/hostfwd.err" &
    pid=$!
    for _ in $(seq 600); do
        grep -q '^MP_NVMET_READY' "$logd/console.log" 2>/dev/null && { ok=1; break; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if [[ $ok == 1 ]]; then
        # ICReq (PDU type 0, HLEN 128, PLEN 128, PFV 0) -> expect ICResp (type 1).
        python3 - "$p1" "$p2" <<'PY' || ok=0
import socket, struct, sys
p1, p2 = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", p1), timeout=30)
icreq = struct.pack("<BBBBI", 0, 0, 128, 0, 128) + struct.pack("<HBBI", 0, 0, 0, 0)
s.sendall(icreq.ljust(128, b"\0"))
resp = b""
while len(resp) < 128:
    chunk = s.recv(128 - len(resp))
    if not chunk:
        break
    resp += chunk
s.close()
ok = len(resp) == 128 and resp[0] == 1 and resp[2] == 128
print("     ICResp from guest nvmet: %s (type=%s hlen=%s len=%d)"
      % ("ok" if ok else "BAD", resp[:1].hex(), resp[2:3].hex(), len(resp)))
d = socket.create_connection(("127.0.0.1", p2), timeout=30)
d.sendall(b"DONE" if ok else b"FAIL")
d.close()
sys.exit(0 if ok else 1)
PY
    fi
    wait "$pid" || rc=$?
    t1=$(date +%s.%N)
    echo "     $(grep '^MP_INTEROP_RESULT=' "$TMP/hostfwd.out" | tail -n1 || true)"
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [[ $ok == 1 && $rc == 0 ]]; then
        PASSED=$((PASSED + 1)); RESULTS+=("ok   hostfwd (exit 0, ${secs}s)"); echo "     ok: exit 0 in ${secs}s"
    else
        FAILED=$((FAILED + 1)); RESULTS+=("FAIL hostfwd (exit $rc, ready/icresp=$ok, ${secs}s)")
        echo "     FAIL: exit $rc, ready/icresp=$ok; harness stderr:"; sed 's/^/       /' "$TMP/hostfwd.err"
    fi
}

for c in "${CASES[@]}"; do
    case $c in
    modules)
        cat >"$TMP/modules.sh" <<'EOF'
set -eu
for m in nvme_tcp nvme_fabrics nvme_core iscsi_tcp libiscsi scsi_transport_iscsi sd_mod ext4 virtio_net crc32c_generic configfs dm_mod; do
    grep -q "^$m " /proc/modules || { echo "module $m not loaded"; exit 1; }
done
[ -c /dev/nvme-fabrics ] || { echo "no /dev/nvme-fabrics"; exit 1; }
ip -4 addr show eth0 | grep -q 'inet 10.0.2.15/24' || { echo "eth0 not configured"; exit 1; }
ip route | grep -q 'default via 10.0.2.2' || { echo "no default route"; exit 1; }
[ "$MP_SELFTEST_VAR" = "a b'c" ] || { echo "env not passed: '$MP_SELFTEST_VAR'"; exit 1; }
[ "$(cat /etc/mp-selftest)" = "hello" ] || { echo "--file not copied"; exit 1; }
for t in iscsistart iscsiadm iscsid mkfs.ext4 fsck.ext4 e2fsck modprobe; do
    command -v "$t" >/dev/null || { echo "missing $t"; exit 1; }
done
mkfs.ext4 -V 2>&1 | head -n1
iscsistart --version
echo "modules ok"
EOF
        echo hello >"$TMP/hello.txt"
        run_case modules 0 "$TMP/modules.sh" --timeout 60 \
            --env "MP_SELFTEST_VAR=a b'c" --file "$TMP/hello.txt:/etc/mp-selftest" --module dm-mod
        ;;
    exit1)
        printf 'echo "failing on purpose"\nexit 1\n' >"$TMP/exit1.sh"
        run_case exit1 1 "$TMP/exit1.sh" --timeout 60
        ;;
    kernlog)
        printf 'echo "<3>selftest: Buffer I/O error on dev fake, logical block 0" >/dev/kmsg\n' >"$TMP/kernlog.sh"
        run_case kernlog 3 "$TMP/kernlog.sh" --timeout 60
        ;;
    timeout)
        printf 'echo "sleeping past the timeout"\nsleep 600\n' >"$TMP/timeout.sh"
        run_case timeout 124 "$TMP/timeout.sh" --timeout 15
        ;;
    panic)
        printf 'echo "crashing the kernel on purpose"\necho c >/proc/sysrq-trigger\nsleep 60\n' >"$TMP/panic.sh"
        run_case panic 1 "$TMP/panic.sh" --timeout 60
        ;;
    nvme)
        run_case nvme 0 "$HERE/selftest/nvme-loopback.sh" --timeout 120 \
            --file "$HERE/guest/nvme-tcp-roundtrip.sh:/mp/lib/nvme-tcp-roundtrip.sh"
        ;;
    nvmedigest)
        run_case nvmedigest 0 "$HERE/selftest/nvme-loopback.sh" --timeout 120 \
            --file "$HERE/guest/nvme-tcp-roundtrip.sh:/mp/lib/nvme-tcp-roundtrip.sh" \
            --env CONNECT_OPTS=hdr_digest,data_digest,nr_io_queues=1
        ;;
    hostfwd)
        run_hostfwd
        ;;
    iscsi)
        if ! command -v tgtd >/dev/null || ! command -v tgtadm >/dev/null; then
            echo "     installing Debian's tgt (host iSCSI target) with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tgt \
                >"$TMP/apt-tgt.log" 2>&1 || { cat "$TMP/apt-tgt.log" >&2; echo "selftest: apt-get install tgt failed" >&2; exit 2; }
        fi
        # Free port on 127.0.0.1 and a private control socket number, so a
        # tgtd of someone else on this machine is not disturbed.
        PORT=$(free_port)
        TGT_CTL=$(( 1000 + $$ % 20000 ))
        IQN=iqn.2024-01.io.mirrorpoint:selftest-$$
        truncate -s 64M "$TMP/lun.img"
        tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$PORT" >"$TMP/tgtd.log" 2>&1 &
        TGTD_PID=$!
        ok=0
        for _ in $(seq 50); do
            if tgtadm -C "$TGT_CTL" --lld iscsi --op show --mode system >/dev/null 2>&1; then ok=1; break; fi
            kill -0 "$TGTD_PID" 2>/dev/null || break
            sleep 0.1
        done
        [[ $ok == 1 ]] || { cat "$TMP/tgtd.log" >&2; echo "selftest: tgtd did not start" >&2; exit 2; }
        tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode target --tid 1 -T "$IQN"
        tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$TMP/lun.img"
        tgtadm -C "$TGT_CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL
        echo "     tgtd pid $TGTD_PID on 127.0.0.1:$PORT, target $IQN"
        run_case iscsi 0 "$HERE/guest/iscsi-roundtrip.sh" --timeout 120 \
            --env "TARGET_IQN=$IQN" --env "TARGET_PORT=$PORT"
        stop_tgtd
        ;;
    esac
done

T1=$(date +%s.%N)
echo "==== selftest summary ($(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }')s total)"
printf '  %s\n' "${RESULTS[@]}"
echo "$PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
