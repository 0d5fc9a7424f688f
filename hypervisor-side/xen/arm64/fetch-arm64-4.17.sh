#!/bin/bash
# fetch-arm64-4.17.sh -- what the Xen 4.17 arm64 fallback of issue 13 needs,
# all from the Debian 12 apt mirror (the only network CI has besides
# crates.io). Run as root on Debian 12 (amd64). Idempotent.
#
#  1. Host tools: the aarch64 cross toolchain (gcc, binutils, libc for the
#     static dom0 program), Debian 12's qemu-system-arm (7.2; this fallback
#     needs no SMMU), device-tree-compiler (the dom0less domU node), cpio.
#  2. Xen source: Debian 12's xen 4.17.5+72-g01140da4e8-1 through
#     ../fetch-xen.sh (apt-get source; the tree the x86 build uses, which
#     has xen/arch/arm too), into $PVIOMMU_BUILD_DIR/xen-src.
#  3. dom0 for arm64, not installed on the host: Debian 12's arm64 kernel
#     and busybox-static, downloaded with a private apt root under
#     $ARM64/apt-arm64 (APT::Architecture=arm64, so the host's dpkg gets no
#     foreign architecture) and unpacked into $ARM64/dom0-arm64.
#
#   PVIOMMU_BUILD_DIR    where ../fetch-xen.sh puts xen-src (default <repo>/build)
#   PVIOMMU_ARM64_417    this fallback's build dir (default $PVIOMMU_BUILD_DIR/arm64-4.17)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
ARM64="${PVIOMMU_ARM64_417:-$PVIOMMU_BUILD_DIR/arm64-4.17}"
mkdir -p "$ARM64"
export DEBIAN_FRONTEND=noninteractive
# apt steps shared with ../fetch-xen.sh and fetch-xen-4.20.sh
# shellcheck source-path=SCRIPTDIR source=../lib/fetch.sh
. "$HERE/../lib/fetch.sh"

# 1. host tools (dtc: the dom0less domU's device-tree node)
install_arm64_host_tools fetch-arm64-4.17 dtc:device-tree-compiler

# 2. Xen 4.17 source (Debian 12), shared with the x86 build
"$HERE/../fetch-xen.sh"

# 3. arm64 dom0 kernel and busybox (private apt root, arm64 only)
fetch_arm64_dom0 fetch-arm64-4.17 "$ARM64/apt-arm64" "$ARM64/dom0-arm64" bookworm
