#!/bin/bash
# fetch-xen.sh -- fetch Debian's Xen 4.17.5 source (the version the patches in
# patches/ apply to) and the hypervisor's build dependencies. Run as root on
# Debian 12. Idempotent: does nothing if the source is already unpacked.
#
#   PVIOMMU_BUILD_DIR   build directory (default: <repo>/build)
set -euo pipefail
XEN_VERSION="4.17.5+72-g01140da4e8-1"
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${PVIOMMU_BUILD_DIR:-$REPO/build}"
SRC="$BUILD/xen-src"
mkdir -p "$BUILD"
# apt steps shared with arm64/fetch-arm64-4.17.sh and arm64/fetch-xen-4.20.sh
# shellcheck source-path=SCRIPTDIR source=lib/fetch.sh
. "$HERE/lib/fetch.sh"

if [ -f "$SRC/.fetched" ]; then
    echo "fetch-xen: $SRC already present"
    exit 0
fi

need_deps=0
for t in bison flex gcc make python3 dpkg-source; do
    command -v "$t" >/dev/null 2>&1 || need_deps=1
done

if ! grep -rqsE '^(Types:.*deb-src|deb-src .*bookworm main)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "fetch-xen: adding deb-src entry for bookworm main"
    write_deb_src /etc/apt/sources.list.d/pviommu-deb-src.sources bookworm
    need_update=1
else
    need_update=${PVIOMMU_APT_UPDATE:-0}
fi
if [ "$need_update" = 1 ] || [ "$need_deps" = 1 ]; then
    apt-get update -q
fi
if [ "$need_deps" = 1 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        bison flex build-essential python3 dpkg-dev xz-utils
fi

tmp="$BUILD/xen-src.tmp"
rm -rf "$tmp"; mkdir -p "$tmp"
apt_source_xen "$XEN_VERSION" "$tmp"
rm -rf "$SRC"
mv "$tmp/src" "$SRC"
rm -rf "$tmp"
touch "$SRC/.fetched"
echo "fetch-xen: Xen $XEN_VERSION source in $SRC"
