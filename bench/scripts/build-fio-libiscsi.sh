#!/usr/bin/env bash
# Builds Debian's fio with the libiscsi engine (Debian's fio package has
# none) into build/fio-libiscsi/fio. Needs root for apt (deb-src, libiscsi-dev).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$PWD/build/fio-libiscsi
if [ -x "$OUT/fio" ] && "$OUT/fio" --enghelp 2>/dev/null | grep -q libiscsi; then
    echo "$OUT/fio"
    exit 0
fi
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat >/etc/apt/sources.list.d/mirrorpoint-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libiscsi-dev dpkg-dev build-essential >&2
mkdir -p "$OUT/src"
cd "$OUT/src"
[ -d fio-*/ ] 2>/dev/null || apt-get source -qq fio >&2
cd fio-*/
./configure --enable-libiscsi --disable-native >&2
make -j"${JOBS:-2}" >&2
cp fio "$OUT/fio"
echo "$OUT/fio"
