#!/usr/bin/env bash
# setup.sh - fetch and unpack what the QEMU interop harness needs.
#
# Usage: scripts/interop/setup.sh [--update-lock] [--force]
#
# Downloads Debian packages with `apt-get download` (nothing is installed on
# the host) and unpacks them with `dpkg-deb -x` into a cache directory:
#   $MP_INTEROP_DIR (default: <repo>/build/interop)
#     debs/         downloaded .deb files
#     host/         QEMU 7.2, its firmware and the shared libraries the host
#                   lacks (run with LD_LIBRARY_PATH, see env.sh)
#     guest/        Debian kernel + modules, busybox-static, open-iscsi,
#                   e2fsprogs and the libraries the host lacks
#     vmlinux       uncompressed ELF kernel (QEMU boots it via PVH: fast)
#     base.cpio     the initramfs minus /init and the test (run-guest.sh
#                   appends those per run)
#     env.sh        paths for run-guest.sh
#     packages.lock copy of the lock in use
#
# Exact versions are pinned in scripts/interop/packages.lock (override with
# MP_INTEROP_LOCK). Without a lock, or with --update-lock, the current apt
# candidates are resolved and the lock is (re)written. If a pinned version is
# no longer served by apt, setup warns loudly, re-resolves and rewrites the
# lock (the change shows up in `git diff`); with MP_INTEROP_STRICT=1 it fails
# instead.
#
# Idempotent: a stamp (lock + this script's hash) makes a second run a no-op.
# --force redoes the unpack. Needs root only for `apt-get update`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${MP_INTEROP_DIR:-$REPO/build/interop}
LOCK=${MP_INTEROP_LOCK:-$HERE/packages.lock}
STRICT=${MP_INTEROP_STRICT:-0}
UPDATE=0
FORCE=0

log() { echo "setup: $*" >&2; }
warn() { echo "setup: WARNING: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --update-lock) UPDATE=1 ;;
        --force) FORCE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

for tool in apt-get apt-cache dpkg-deb dpkg-query python3 ldd sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found; this needs a Debian 12 host"
done
[[ $(dpkg --print-architecture) == amd64 ]] || die "only amd64 hosts are supported"

# Packages named by the harness. The kernel is whatever linux-image-amd64
# points at unless MP_INTEROP_KERNEL_PKG names one (linux-image-6.1.0-N-amd64).
GUEST_TOP=(busybox-static open-iscsi e2fsprogs)
HOST_TOP=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)

# Kernel modules in the base initramfs (plus their dependencies). run-guest.sh
# loads MODULES_AUTOLOAD at boot; the others are there for `modprobe`.
MODULES_AUTOLOAD=(virtio_pci virtio_net configfs crc32c_generic nvme-tcp nvme-fabrics
    nvme-core iscsi_tcp libiscsi scsi_transport_iscsi sd_mod ext4)
MODULES_EXTRA=(crc32c-intel crct10dif_generic crct10dif-pclmul nvmet nvmet-tcp brd loop
    null_blk)
# Guest programs copied into the initramfs with their shared libraries.
GUEST_BINS=(sbin/iscsistart sbin/iscsiadm sbin/iscsid sbin/iscsi-iname sbin/mke2fs
    sbin/e2fsck sbin/tune2fs sbin/dumpe2fs sbin/debugfs)

STAMP_WANT=""
stamp_value() {
    { cat "$LOCK"; cat "$0" "$HERE/modules.py" "$HERE/extract-vmlinux.py"; } | sha256sum | cut -d' ' -f1
}

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# One setup at a time per cache directory (parallel run-guest.sh calls).
command -v flock >/dev/null || die "'flock' (util-linux) not found"
exec 9>"$DIR/.setup.lock"
flock 9

# ---------------------------------------------------------------- fast path
if [[ -f $LOCK && $UPDATE == 0 && $FORCE == 0 && -f $DIR/.stamp && -f $DIR/env.sh ]]; then
    STAMP_WANT=$(stamp_value)
    if [[ $(cat "$DIR/.stamp") == "$STAMP_WANT" ]]; then
        log "up to date in $DIR (lock $LOCK)"
        exit 0
    fi
fi

mkdir -p "$DIR/debs"

# ---------------------------------------------------------------- apt helpers
apt_updated=0
apt_update() {
    [[ $apt_updated == 1 ]] && return 0
    if [[ $(id -u) == 0 ]]; then
        log "apt-get update"
        apt-get update -q >"$DIR/apt-update.log" 2>&1 ||
            { cat "$DIR/apt-update.log" >&2; die "apt-get update failed"; }
    else
        warn "not root: skipping apt-get update (package lists may be stale)"
    fi
    apt_updated=1
}

# The helpers below take many package names per call: each apt-cache run
# loads the whole package cache (about a second), so batch them.
candidates() { # PKG... -> "PKG VERSION" for each one apt has a candidate for
    apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ].*:$/ { p = $0; sub(/:$/, "", p); sub(/:amd64$/, "", p); sub(/:all$/, "", p) }
        /^  Candidate:/ { if ($2 != "(none)") print p, $2 }'
}
available_versions() { # PKG... -> "PKG VERSION" for every version apt can download
    apt-cache madison "$@" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $1); gsub(/ /, "", $2); print $1, $2 }'
}
installed_pkgs() { # PKG... -> names of those installed on the host
    dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null | awk '$2 == "installed" { print $1 }' || true
}
depends_of() { # PKG=VERSION... -> "PKG DEP" (first alternative of each dependency)
    apt-cache show "$@" 2>/dev/null | awk '
        /^Package:/ { p = $2 }
        /^(Pre-)?Depends:/ {
            sub(/^[^:]*: /, "")
            n = split($0, a, ",")
            for (i = 1; i <= n; i++) {
                d = a[i]; sub(/\|.*/, "", d); sub(/\(.*\)/, "", d); sub(/:any/, "", d)
                gsub(/[ \t]/, "", d)
                if (d != "") print p, d
            }
        }' | sort -u
}

# Resolve the package set from apt's current candidates into lock lines
# ("ROLE PACKAGE VERSION"). Breadth-first, one batch of apt calls per level.
resolve() {
    local kpkg=${MP_INTEROP_KERNEL_PKG:-}
    if [[ -z $kpkg ]]; then
        local kmeta
        kmeta=$(candidates linux-image-amd64 | awk '{ print $2 }')
        [[ -n $kmeta ]] || die "apt has no candidate for linux-image-amd64 (apt-get update?)"
        kpkg=$(depends_of "linux-image-amd64=$kmeta" | awk '{ print $2 }' |
            grep -E '^linux-image-[0-9].*-amd64$' | head -n1 || true)
        [[ -n $kpkg ]] || die "cannot find the kernel package linux-image-amd64=$kmeta depends on"
    fi
    local -A seen=() cand=() inst=()
    local -a level=() next=() names=() specs=()
    local e role pkg dep p v
    for pkg in "$kpkg" "${GUEST_TOP[@]}"; do level+=("guest:$pkg"); seen[guest:$pkg]=1; done
    for pkg in "${HOST_TOP[@]}"; do level+=("host:$pkg"); seen[host:$pkg]=1; done
    while [[ ${#level[@]} -gt 0 ]]; do
        mapfile -t names < <(printf '%s\n' "${level[@]}" | cut -d: -f2 | sort -u)
        while read -r p v; do cand[$p]=$v; done < <(candidates "${names[@]}")
        specs=()
        for pkg in "${names[@]}"; do
            [[ -n ${cand[$pkg]:-} ]] || die "apt has no candidate version of '$pkg'"
            specs+=("$pkg=${cand[$pkg]}")
        done
        for e in "${level[@]}"; do
            echo "${e%%:*} ${e#*:} ${cand[${e#*:}]}"
        done
        # Follow library dependencies the host does not have. Libraries the
        # host has are used as they are (QEMU) or copied from the host into
        # the initramfs (guest tools); non-library dependencies (udev,
        # debconf, ...) are not needed to run the binaries.
        local -a deps=()
        mapfile -t deps < <(depends_of "${specs[@]}")
        local -a depnames=()
        for e in "${deps[@]}"; do
            dep=${e#* }
            [[ $dep == lib* && $dep != libc6 && $dep != libgcc-s1 ]] && depnames+=("$dep")
        done
        if [[ ${#depnames[@]} -gt 0 ]]; then
            while read -r p; do inst[$p]=1; done < <(installed_pkgs "${depnames[@]}")
        fi
        next=()
        for e in "${level[@]}"; do
            role=${e%%:*}
            pkg=${e#*:}
            for d in "${deps[@]}"; do
                [[ ${d%% *} == "$pkg" ]] || continue
                dep=${d#* }
                [[ $dep == lib* && $dep != libc6 && $dep != libgcc-s1 ]] || continue
                [[ -n ${inst[$dep]:-} || -n ${seen[$role:$dep]:-} ]] && continue
                seen[$role:$dep]=1
                next+=("$role:$dep")
            done
        done
        level=("${next[@]}")
    done
}

write_lock() { # lines on stdin
    local tmp
    tmp=$(mktemp "$LOCK.XXXXXX")
    {
        echo "# mirrorpoint interop harness: exact Debian package versions."
        echo "# Written by scripts/interop/setup.sh; refresh with --update-lock."
        echo "# role package version"
        sort -u
    } >"$tmp"
    mv "$tmp" "$LOCK"
    chmod 644 "$LOCK"
}

read_lock() {
    grep -Ev '^[[:space:]]*(#|$)' "$LOCK"
}

# ---------------------------------------------------------------- lock
apt_update
if [[ -f $LOCK && $UPDATE == 0 ]]; then
    missing=()
    declare -A avail=()
    mapfile -t lockpkgs < <(read_lock | awk '{ print $2 }' | sort -u)
    while read -r p v; do avail["$p $v"]=1; done < <(available_versions "${lockpkgs[@]}")
    while read -r role pkg ver; do
        [[ $role == host || $role == guest ]] || die "bad line in $LOCK: '$role $pkg $ver'"
        [[ -n ${avail["$pkg $ver"]:-} ]] || missing+=("$pkg=$ver")
    done < <(read_lock)
    if [[ ${#missing[@]} -gt 0 ]]; then
        [[ $STRICT == 1 ]] && die "pinned versions no longer served by apt: ${missing[*]} (MP_INTEROP_STRICT=1)"
        warn "pinned versions no longer served by apt: ${missing[*]}"
        warn "re-resolving from apt's candidates and rewriting $LOCK (commit the change)"
        UPDATE=1
    fi
fi
if [[ ! -f $LOCK || $UPDATE == 1 ]]; then
    log "resolving package versions from apt"
    lines=$(resolve)
    write_lock <<<"$lines"
    log "wrote $LOCK"
fi
STAMP_WANT=$(stamp_value)

# ---------------------------------------------------------------- download
deb_path() { # PKG VERSION -> path of the downloaded .deb, if present
    local f
    for f in "$DIR/debs/${1}_"*.deb; do
        [[ -f $f ]] || continue
        if [[ $(dpkg-deb -f "$f" Package) == "$1" && $(dpkg-deb -f "$f" Version) == "$2" ]]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

want=()
while read -r role pkg ver; do
    deb_path "$pkg" "$ver" >/dev/null || want+=("$pkg=$ver")
done < <(read_lock)
if [[ ${#want[@]} -gt 0 ]]; then
    log "downloading ${#want[@]} packages into $DIR/debs"
    # apt drops privileges to _apt for downloads; let it write there.
    if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$DIR/debs"; fi
    (cd "$DIR/debs" && apt-get download -q "${want[@]}") >"$DIR/apt-download.log" 2>&1 ||
        { cat "$DIR/apt-download.log" >&2; die "apt-get download failed"; }
fi

# ---------------------------------------------------------------- unpack
log "unpacking into $DIR/host and $DIR/guest"
rm -rf "$DIR/host" "$DIR/guest" "$DIR/.stamp"
mkdir -p "$DIR/host" "$DIR/guest"
KPKG=""
while read -r role pkg ver; do
    f=$(deb_path "$pkg" "$ver") || die "download of $pkg=$ver is missing from $DIR/debs"
    dpkg-deb -x "$f" "$DIR/$role"
    [[ $pkg == linux-image-[0-9]*-amd64 ]] && KPKG=$pkg
done < <(read_lock)
[[ -n $KPKG ]] || die "no linux-image-*-amd64 package in $LOCK"
KVER=${KPKG#linux-image-}

# Absolute symlinks inside the unpacked trees point at the host's /; make
# them point inside the tree instead.
for root in "$DIR/host" "$DIR/guest"; do
    while IFS= read -r -d '' link; do
        target=$(readlink "$link")
        [[ $target == /* ]] || continue
        ln -sfn "$root$target" "$link"
    done < <(find "$root" -type l -print0)
done

# ---------------------------------------------------------------- QEMU check
H=$DIR/host
QEMU=$H/usr/bin/qemu-system-x86_64
[[ -x $QEMU ]] || die "$QEMU missing after unpack"
HOST_LD=$H/lib/x86_64-linux-gnu:$H/usr/lib/x86_64-linux-gnu
notfound=$(LD_LIBRARY_PATH=$HOST_LD ldd "$QEMU" | grep 'not found' || true)
[[ -z $notfound ]] || die "QEMU lacks shared libraries (add their packages to HOST_TOP):
$notfound"
qv=$(LD_LIBRARY_PATH=$HOST_LD QEMU_MODULE_DIR=$H/usr/lib/x86_64-linux-gnu/qemu "$QEMU" --version | head -n1)
log "QEMU: $qv"

# ---------------------------------------------------------------- kernel
G=$DIR/guest
MDIR=$G/lib/modules/$KVER
[[ -d $MDIR ]] || die "$MDIR missing after unpack"
BUSYBOX=$G/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX missing after unpack"
log "depmod $KVER"
"$BUSYBOX" depmod -b "$G" "$KVER"
log "extracting vmlinux from /boot/vmlinuz-$KVER"
python3 "$HERE/extract-vmlinux.py" "$G/boot/vmlinuz-$KVER" "$DIR/vmlinux" >&2

# ---------------------------------------------------------------- base initramfs
log "building base initramfs"
STAGE=$(mktemp -d "$DIR/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
S=$STAGE
mkdir -p "$S"/{bin,sbin,usr/bin,usr/sbin,etc/iscsi,etc/mp,lib/x86_64-linux-gnu,lib64,proc,sys,dev,tmp,run,mnt,root,mp,var/lock/iscsi,var/lib/iscsi,"lib/modules/$KVER"}
ln -s ../run "$S/var/run"
cp "$BUSYBOX" "$S/bin/busybox"

# Guest programs and the shared libraries they load (from the unpacked tree
# first, else from the host, which runs the same Debian release).
GUEST_LD=$G/lib/x86_64-linux-gnu:$G/usr/lib/x86_64-linux-gnu
copy_lib() { # NAME-IN-GUEST HOST-PATH
    local dst
    dst=$S/lib/x86_64-linux-gnu/$(basename "$1")
    [[ $1 == /lib64/* ]] && dst=$S$1
    [[ -e $dst ]] || cp -L "$2" "$dst"
}
for b in "${GUEST_BINS[@]}"; do
    [[ -x $G/$b ]] || die "guest program $b missing from the unpacked packages"
    cp -L "$G/$b" "$S/$b"
    out=$(LD_LIBRARY_PATH=$GUEST_LD ldd "$G/$b") || die "ldd $b failed"
    if grep -q 'not found' <<<"$out"; then
        die "guest program $b lacks libraries:
$(grep 'not found' <<<"$out")"
    fi
    while read -r name arrow path _; do
        if [[ $arrow == "=>" && $path == /* ]]; then
            copy_lib "$name" "$path"
        elif [[ $name == /* ]]; then
            copy_lib "$name" "$name"
        fi
    done <<<"$out"
done
ln -s mke2fs "$S/sbin/mkfs.ext4"
ln -s mke2fs "$S/sbin/mkfs.ext2"
ln -s e2fsck "$S/sbin/fsck.ext4"
ln -s e2fsck "$S/sbin/fsck.ext2"
ln -s tune2fs "$S/sbin/e2label"
cp "$G/etc/mke2fs.conf" "$S/etc/mke2fs.conf"
cp "$G/etc/iscsi/iscsid.conf" "$S/etc/iscsi/iscsid.conf"
echo "InitiatorName=iqn.2024-01.io.mirrorpoint:interop-guest" >"$S/etc/iscsi/initiatorname.iscsi"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$S/etc/passwd"
printf 'root:x:0:\n' >"$S/etc/group"
printf '127.0.0.1 localhost\n10.0.2.2 host\n' >"$S/etc/hosts"
printf 'mp-guest\n' >"$S/etc/hostname"

# busybox applets as symlinks, where no real program is installed.
while read -r applet; do
    [[ -e $S/$applet || -L $S/$applet ]] && continue
    mkdir -p "$(dirname "$S/$applet")"
    ln -s /bin/busybox "$S/$applet"
done < <("$BUSYBOX" --list-full)

# Kernel modules: the listed ones and their dependencies, plus the module
# index files of the whole kernel so that `modprobe` works for them.
mods=$(python3 "$HERE/modules.py" "$MDIR" "${MODULES_AUTOLOAD[@]}" "${MODULES_EXTRA[@]}")
while read -r m; do
    mkdir -p "$(dirname "$S/lib/modules/$KVER/$m")"
    cp "$MDIR/$m" "$S/lib/modules/$KVER/$m"
done <<<"$mods"
cp "$MDIR"/modules.{dep,alias,symbols,builtin,order} "$S/lib/modules/$KVER/"
python3 "$HERE/modules.py" "$MDIR" "${MODULES_AUTOLOAD[@]}" >"$S/etc/mp/modules.load"
echo "$KVER" >"$S/etc/mp/kernel-version"

# Smoke-check the guest programs on the host inside the staged tree.
if [[ $(id -u) == 0 ]]; then
    chroot "$S" /sbin/iscsistart --version >/dev/null 2>&1 ||
        die "iscsistart does not run inside the staged initramfs (missing libraries?)"
    chroot "$S" /sbin/mke2fs -V >/dev/null 2>&1 ||
        die "mke2fs does not run inside the staged initramfs (missing libraries?)"
fi

(cd "$S" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) >"$DIR/base.cpio.tmp"
mv "$DIR/base.cpio.tmp" "$DIR/base.cpio"
rm -rf "$STAGE"
trap - EXIT
log "base initramfs: $(du -h "$DIR/base.cpio" | cut -f1)"

# ---------------------------------------------------------------- env + stamp
cp "$LOCK" "$DIR/packages.lock"
{
    echo "# written by scripts/interop/setup.sh"
    printf 'MP_QEMU=%q\n' "$QEMU"
    printf 'MP_QEMU_LD_LIBRARY_PATH=%q\n' "$HOST_LD"
    printf 'MP_QEMU_MODULE_DIR=%q\n' "$H/usr/lib/x86_64-linux-gnu/qemu"
    printf 'MP_QEMU_DATADIRS=(%q %q %q)\n' "$H/usr/share/qemu" "$H/usr/share/seabios" "$H/usr/lib/ipxe/qemu"
    printf 'MP_KERNEL_VERSION=%q\n' "$KVER"
    printf 'MP_VMLINUX=%q\n' "$DIR/vmlinux"
    printf 'MP_BASE_CPIO=%q\n' "$DIR/base.cpio"
    printf 'MP_GUEST_ROOT=%q\n' "$G"
    printf 'MP_BUSYBOX=%q\n' "$BUSYBOX"
} >"$DIR/env.sh"
echo "$STAMP_WANT" >"$DIR/.stamp"
log "done: kernel $KVER, $(read_lock | wc -l) packages pinned in $LOCK"
