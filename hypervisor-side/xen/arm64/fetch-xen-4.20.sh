#!/bin/bash
# fetch-xen-4.20.sh -- everything the arm64 bring-up needs, fetched with apt.
# Run as root on Debian 12 (amd64). Idempotent: each step is skipped when its
# result is already there.
#
#  1. Host tools: the aarch64 cross toolchain, qemu-system-arm (for
#     qemu-system-aarch64), Xen's hypervisor build deps, cpio.
#  2. Xen 4.20 source from Debian 13 (trixie), unpacked into
#     $BUILD/xen-4.20-src (../lib/fetch.sh's fetch_xen_4_20: apt-get source
#     in a private apt configuration under $BUILD/apt-trixie-src, signed by
#     the Debian archive keyring, which has the trixie keys). If the mirror
#     does not serve the source files (it answered 404 on 2026-11-30),
#     upstream's RELEASE-4.20.4 tag is exported from a local git mirror
#     instead ($PVIOMMU_XEN_GIT).
#  3. dom0 pieces for arm64 (not installed on the host): the Debian arm64
#     kernel and busybox-static, downloaded with a private apt configuration
#     under $BUILD/apt-arm64 (APT::Architecture=arm64), so the host's dpkg
#     gets no foreign architecture; unpacked with dpkg-deb -x into
#     $BUILD/dom0-arm64/{kernel,busybox}.
#
#  4. QEMU 10 from bookworm-backports, unpacked under $BUILD/qemu10 (see below).
#
#   PVIOMMU_ARM64_BUILD  build directory (default /work/arm64-build)
#   PVIOMMU_DOM0_SUITE   suite for the dom0 kernel/busybox (default trixie)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
DOM0_SUITE="${PVIOMMU_DOM0_SUITE:-trixie}"
SRC="$BUILD/xen-4.20-src"
mkdir -p "$BUILD"
export DEBIAN_FRONTEND=noninteractive

# apt steps shared with ../fetch-xen.sh and fetch-arm64-4.17.sh
# shellcheck source-path=SCRIPTDIR source=../lib/fetch.sh
. "$HERE/../lib/fetch.sh"

# 1. host tools
install_arm64_host_tools fetch-xen-4.20

# 2. Xen 4.20 source (shared with the x86 build-xen-4.20.sh)
fetch_xen_4_20 fetch-xen-4.20 "$SRC" "$BUILD"

# 3. arm64 dom0 kernel and busybox (private apt root, arm64 only), and
#    xen-hypervisor-4.20-arm64: Debian's stock build, for comparison
fetch_arm64_dom0 fetch-xen-4.20 "$BUILD/apt-arm64" "$BUILD/dom0-arm64" "$DOM0_SUITE" \
    xen-hypervisor-4.20-arm64=xen-stock

# 4. QEMU >= 8.1 for an SMMUv3 with stage-2 (Debian 12's 7.2 has stage 1
#    only, and Xen's SMMUv3 driver needs stage 2). bookworm-backports has
#    10.0; it is unpacked, not installed, so the host's QEMU 7.2 (shared
#    qemu-system-common/-data with qemu-system-x86) is left alone. Its
#    binary runs with bookworm's libraries (checked with ldd).
Q="$BUILD/qemu10"
if [ -x "$Q/usr/bin/qemu-system-aarch64" ]; then
    echo "fetch-xen-4.20: $Q already present"
else
    AB="$BUILD/apt-bpo"
    # amd64 packages, but only downloaded: the host's dpkg status tells
    # apt what is installed
    private_apt_root "$AB" bookworm-backports amd64 /var/lib/dpkg/status
    export APT_CONFIG="$AB/apt.conf"
    apt-get update -q
    rm -f "$AB/debs"/*.deb
    ( cd "$AB/debs" && apt-get download -q qemu-system-arm qemu-system-common qemu-system-data )
    unset APT_CONFIG
    rm -rf "$Q"
    for d in "$AB/debs"/*.deb; do dpkg-deb -x "$d" "$Q"; done
    if ldd "$Q/usr/bin/qemu-system-aarch64" | grep -q 'not found'; then
        ldd "$Q/usr/bin/qemu-system-aarch64" | grep 'not found' >&2
        echo "fetch-xen-4.20: QEMU from backports misses libraries" >&2; exit 1
    fi
    echo "fetch-xen-4.20: $("$Q/usr/bin/qemu-system-aarch64" --version | head -1) in $Q"
fi
