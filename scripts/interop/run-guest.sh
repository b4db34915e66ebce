#!/usr/bin/env bash
# run-guest.sh - boot a Debian kernel under QEMU (TCG) and run a script in it.
#
# Usage: scripts/interop/run-guest.sh GUEST_SCRIPT [options]
#
#   GUEST_SCRIPT             busybox-sh script run in the guest as /mp/guest.sh
#                            (exit 0 = PASS, anything else = FAIL)
#   --timeout S              kill QEMU after S seconds (default 180,
#                            MP_INTEROP_TIMEOUT)
#   --env K=V                export K=V to the script (repeatable)
#   --file HOST:GUEST        copy a host file into the guest (repeatable;
#                            GUEST is an absolute path)
#   --module NAME            also put kernel module NAME (+deps) into the guest
#                            and load it at boot (repeatable)
#   --hostfwd H:G            forward host 127.0.0.1:H to guest port G (TCP)
#                            (repeatable; e.g. to reach a guest nvmet target)
#   --mem MB                 guest memory (default 512)
#   --smp N                  guest CPUs (default 1)
#   --error-pattern RE       fail if the guest kernel log matches this
#                            extended regex (case-insensitive); '' disables
#                            (default: MP_INTEROP_ERROR_PATTERN or see below)
#   --log-dir DIR            where to keep the logs (default: a new directory
#                            under $MP_INTEROP_DIR/logs)
#   --name NAME              label for the log directory
#   -v, --verbose            stream the guest console to stderr while it runs
#
# Exit status: 0 guest PASS; 1 guest FAIL (script exit != 0, setup failure
# in the guest, or kernel panic); 3 kernel log matched the error pattern; 124 timeout; 2 bad
# usage or harness failure (QEMU did not start, no result).
# Once QEMU has run, the last line on stdout is
#   MP_INTEROP_RESULT=PASS|FAIL reason=... guest_rc=N boot_s=X script_s=Y wall_s=Z log=DIR
#
# The guest reaches the host's 127.0.0.1 as 10.0.2.2; the guest is 10.0.2.15.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${MP_INTEROP_DIR:-$REPO/build/interop}
DEFAULT_PATTERN='nvme.*error|I/O error|EXT4-fs error|blk_update_request|Buffer I/O error|iscsi.*(error|failed)|detected conn error'
# Kernel trouble that is a failure whatever the test expects.
DEFAULT_PATTERN+='|Call Trace:|BUG: |Oops: |WARNING: CPU|general protection fault|soft lockup|hung_task|rcu.*detected stall'

die() { echo "run-guest: error: $*" >&2; exit 2; }
log() { echo "run-guest: $*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case $1 in -h|--help) usage; exit 0 ;; esac
SCRIPT=$1
shift
[[ -f $SCRIPT ]] || die "guest script '$SCRIPT' not found"

TIMEOUT=${MP_INTEROP_TIMEOUT:-180}
MEM=512
SMP=1
PATTERN=${MP_INTEROP_ERROR_PATTERN-$DEFAULT_PATTERN}
LOGDIR=""
NAME=$(basename "$SCRIPT" .sh)
VERBOSE=0
ENVS=()
FILES=()
MODULES=()
FWDS=()

need() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --timeout) need "$1" $#; TIMEOUT=$2; shift ;;
        --env) need "$1" $#; ENVS+=("$2"); shift ;;
        --file) need "$1" $#; FILES+=("$2"); shift ;;
        --module) need "$1" $#; MODULES+=("$2"); shift ;;
        --hostfwd) need "$1" $#; FWDS+=("$2"); shift ;;
        --mem) need "$1" $#; MEM=$2; shift ;;
        --smp) need "$1" $#; SMP=$2; shift ;;
        --error-pattern) need "$1" $#; PATTERN=$2; shift ;;
        --log-dir) need "$1" $#; LOGDIR=$2; shift ;;
        --name) need "$1" $#; NAME=$2; shift ;;
        -v|--verbose) VERBOSE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (try --help)" ;;
    esac
    shift
done
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || die "--timeout must be a positive integer"
[[ $MEM =~ ^[0-9]+$ && $MEM -ge 128 ]] || die "--mem must be an integer >= 128"
[[ $SMP =~ ^[0-9]+$ && $SMP -ge 1 ]] || die "--smp must be a positive integer"
[[ $NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--name may only contain letters, digits, '.', '_', '-'"
for kv in "${ENVS[@]}"; do
    [[ $kv == *=* ]] || die "--env '$kv' is not K=V"
    [[ ${kv%%=*} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env name '${kv%%=*}' is not a valid variable name"
done
for hg in "${FILES[@]}"; do
    [[ $hg == *:* ]] || die "--file '$hg' is not HOST_PATH:GUEST_PATH"
    [[ -f ${hg%:*} ]] || die "--file: host file '${hg%:*}' not found"
    [[ ${hg##*:} == /* && ${hg##*:} != */ ]] || die "--file: guest path '${hg##*:}' must be an absolute file path"
done
for f in "${FWDS[@]}"; do
    [[ $f =~ ^[0-9]+:[0-9]+$ ]] || die "--hostfwd '$f' is not HOSTPORT:GUESTPORT"
done

# ---------------------------------------------------------------- setup
"$HERE/setup.sh" || die "setup.sh failed"
DIR=$(cd "$DIR" && pwd)
# shellcheck source=/dev/null
. "$DIR/env.sh"

T_START=$(date +%s.%N)
if [[ -z $LOGDIR ]]; then
    LOGDIR=$DIR/logs/$(date -u +%Y%m%dT%H%M%SZ)-$NAME-$$
    # Keep the newest MP_INTEROP_KEEP_LOGS (default 100) run directories.
    keep=${MP_INTEROP_KEEP_LOGS:-100}
    if [[ -d $DIR/logs && $keep =~ ^[0-9]+$ ]]; then
        find "$DIR/logs" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn |
            tail -n +"$((keep + 1))" | cut -d' ' -f2- | while IFS= read -r old; do rm -rf -- "$old"; done
    fi
fi
mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)
[[ $LOGDIR != *[,:]* ]] || die "log directory path must not contain ',' or ':' (QEMU option syntax)"
CONSOLE=$LOGDIR/console.log
RESULT=$LOGDIR/result.log
: >"$CONSOLE"
: >"$RESULT"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mp-interop.XXXXXX")
QEMU_PID=""
TAIL_PID=""
WATCHDOG_PID=""
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    local rc=$?
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [[ -n $TAIL_PID ]]; then kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true; fi
    if [[ -n $WATCHDOG_PID ]]; then kill "$WATCHDOG_PID" 2>/dev/null || true; wait "$WATCHDOG_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
    return "$rc"
}
trap cleanup EXIT
trap 'echo "run-guest: interrupted" >&2; exit 130' INT
trap 'echo "run-guest: terminated" >&2; exit 143' TERM HUP

# ---------------------------------------------------------------- per-run cpio
S=$WORK/stage
mkdir -p "$S/mp" "$S/etc/mp"
cp "$HERE/guest-init.sh" "$S/init"
chmod 755 "$S/init"
cp "$SCRIPT" "$S/mp/guest.sh"
chmod 755 "$S/mp/guest.sh"

: >"$S/mp/env"
for kv in "${ENVS[@]}"; do
    [[ $kv == *=* ]] || die "--env '$kv' is not K=V"
    k=${kv%%=*}
    v=${kv#*=}
    [[ $k =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env name '$k' is not a valid variable name"
    # single-quote for the guest's sh
    printf "%s='%s'\n" "$k" "${v//\'/\'\\\'\'}" >>"$S/mp/env"
done

for hg in "${FILES[@]}"; do
    [[ $hg == *:* ]] || die "--file '$hg' is not HOST_PATH:GUEST_PATH"
    h=${hg%:*}
    g=${hg##*:}
    [[ -f $h ]] || die "--file: host file '$h' not found"
    [[ $g == /* && $g != */ ]] || die "--file: guest path '$g' must be an absolute file path"
    mkdir -p "$S$(dirname "$g")"
    cp "$h" "$S$g"
done

if [[ ${#MODULES[@]} -gt 0 ]]; then
    MDIR=$MP_GUEST_ROOT/lib/modules/$MP_KERNEL_VERSION
    mods=$(python3 "$HERE/modules.py" "$MDIR" "${MODULES[@]}") || die "cannot resolve --module ${MODULES[*]}"
    while read -r m; do
        [[ -n $m ]] || continue
        mkdir -p "$(dirname "$S/lib/modules/$MP_KERNEL_VERSION/$m")"
        cp "$MDIR/$m" "$S/lib/modules/$MP_KERNEL_VERSION/$m"
        echo "$m" >>"$S/etc/mp/modules.extra"
    done <<<"$mods"
fi

INITRD=$WORK/initrd.cpio
(cd "$S" && find . -mindepth 1 | LC_ALL=C sort | "$MP_BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) >"$WORK/run.cpio"
cat "$MP_BASE_CPIO" "$WORK/run.cpio" >"$INITRD"

# ---------------------------------------------------------------- QEMU
NETDEV="user,id=n0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2"
for f in "${FWDS[@]}"; do
    [[ $f =~ ^([0-9]+):([0-9]+)$ ]] || die "--hostfwd '$f' is not HOSTPORT:GUESTPORT"
    NETDEV+=",hostfwd=tcp:127.0.0.1:${BASH_REMATCH[1]}-:${BASH_REMATCH[2]}"
done
APPEND="console=ttyS0 panic=-1 oops=panic mitigations=off tsc=reliable no_timer_check \
random.trust_cpu=on printk.devkmsg=on rdinit=/init"
# shellcheck disable=SC2054  # commas are QEMU option syntax
QARGS=(-accel tcg -machine pc -cpu max -smp "$SMP" -m "$MEM"
    -nodefaults -no-user-config -display none -no-reboot -monitor none
    -kernel "$MP_VMLINUX" -initrd "$INITRD" -append "$APPEND"
    -serial "file:$CONSOLE" -serial "file:$RESULT"
    -netdev "$NETDEV" -device virtio-net-pci,netdev=n0,romfile=)
for d in "${MP_QEMU_DATADIRS[@]}"; do QARGS+=(-L "$d"); done
printf '%q ' "$MP_QEMU" "${QARGS[@]}" >"$LOGDIR/qemu.cmdline"
echo >>"$LOGDIR/qemu.cmdline"

log "booting $MP_KERNEL_VERSION with $(basename "$SCRIPT") (timeout ${TIMEOUT}s, log $LOGDIR)"
T_QEMU=$(date +%s.%N)
LD_LIBRARY_PATH=$MP_QEMU_LD_LIBRARY_PATH QEMU_MODULE_DIR=$MP_QEMU_MODULE_DIR \
    "$MP_QEMU" "${QARGS[@]}" </dev/null >"$LOGDIR/qemu.out" 2>&1 &
QEMU_PID=$!
if [[ $VERBOSE == 1 ]]; then
    tail -n +1 -f "$CONSOLE" >&2 &
    TAIL_PID=$!
fi

# Wait for QEMU or the watchdog, whichever ends first. `wait` (unlike a
# foreground sleep) returns at once on a trapped signal, so Ctrl-C/TERM act
# immediately.
TIMED_OUT=0
QEMU_RC=0
sleep "$TIMEOUT" &
WATCHDOG_PID=$!
FINISHED=""
wrc=0
wait -n -p FINISHED "$QEMU_PID" "$WATCHDOG_PID" || wrc=$?
if [[ $FINISHED == "$QEMU_PID" ]]; then
    QEMU_RC=$wrc
    kill "$WATCHDOG_PID" 2>/dev/null || true
    wait "$WATCHDOG_PID" 2>/dev/null || true
else
    TIMED_OUT=1
    log "timeout after ${TIMEOUT}s: killing QEMU (pid $QEMU_PID)"
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    sleep 1
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
fi
WATCHDOG_PID=""
QEMU_PID=""
T_END=$(date +%s.%N)
if [[ -n $TAIL_PID ]]; then sleep 0.2; kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true; TAIL_PID=""; fi

# ---------------------------------------------------------------- verdict
tr -d '\r' <"$RESULT" | sed -n '/^MP_DMESG_BEGIN$/,/^MP_DMESG_END$/p' | sed '1d;$d' >"$LOGDIR/dmesg.log"
RLINE=$(tr -d '\r' <"$RESULT" | grep -E '^MP_GUEST_RESULT=(PASS|FAIL) rc=[0-9]+' | tail -n1 || true)
TLINE=$(tr -d '\r' <"$RESULT" | grep -E '^MP_GUEST_TIMES ' | tail -n1 || true)
BOOT_S=$(sed -n 's/.*boot_s=\([0-9.?]*\).*/\1/p' <<<"$TLINE")
SCRIPT_S=$(sed -n 's/.*script_s=\([0-9.?]*\).*/\1/p' <<<"$TLINE")
GUEST_RC=$(sed -n 's/.* rc=\([0-9]*\).*/\1/p' <<<"$RLINE")
WALL_S=$(awk -v a="$T_START" -v b="$T_END" 'BEGIN { printf "%.1f", b - a }')
QEMU_S=$(awk -v a="$T_QEMU" -v b="$T_END" 'BEGIN { printf "%.1f", b - a }')

VERDICT=FAIL
EXIT=1
if [[ $TIMED_OUT == 1 ]]; then
    REASON=timeout; EXIT=124
elif [[ -z $RLINE ]] && grep -q 'Kernel panic' "$CONSOLE"; then
    REASON=kernel-panic; EXIT=1
elif [[ -z $RLINE ]]; then
    REASON="no-result(qemu_rc=$QEMU_RC)"; EXIT=2
elif [[ $RLINE == MP_GUEST_RESULT=FAIL* ]]; then
    REASON=$(sed -n 's/.*reason=\([^ ]*\).*/\1/p' <<<"$RLINE"); REASON=guest-${REASON:-fail}
else
    VERDICT=PASS; REASON=ok; EXIT=0
fi
if [[ $VERDICT == PASS && -n $PATTERN ]]; then
    if grep -Ei -- "$PATTERN" "$LOGDIR/dmesg.log" >"$LOGDIR/dmesg-errors.log"; then
        VERDICT=FAIL; REASON=kernel-log; EXIT=3
        log "guest kernel log matches the error pattern '$PATTERN':"
        sed 's/^/    /' "$LOGDIR/dmesg-errors.log" | head -n 20 >&2
    fi
fi
[[ -s $LOGDIR/dmesg-errors.log ]] || rm -f "$LOGDIR/dmesg-errors.log"

if [[ $VERDICT != PASS ]]; then
    log "FAIL ($REASON); console log: $CONSOLE"
    log "---- last 40 lines of the guest console ----"
    tail -n 40 "$CONSOLE" | tr -d '\r' | sed 's/^/    /' >&2
    if [[ -s $LOGDIR/qemu.out ]]; then
        log "---- QEMU output ----"
        tail -n 20 "$LOGDIR/qemu.out" | sed 's/^/    /' >&2
    fi
fi
SUMMARY="MP_INTEROP_RESULT=$VERDICT reason=$REASON guest_rc=${GUEST_RC:-none} boot_s=${BOOT_S:-?} script_s=${SCRIPT_S:-?} qemu_s=$QEMU_S wall_s=$WALL_S log=$LOGDIR"
echo "$SUMMARY" >"$LOGDIR/summary"
echo "$SUMMARY"
exit "$EXIT"
