#!/bin/bash
# build-xen-4.20.sh -- build upstream Xen 4.20 (x86) with the PV-IOMMU: the
# same hypervisor build as build-xen.sh, from patches-4.20/series, in its
# own build directory. It keeps the x86 series portable between Debian 12's
# 4.17 (what CI builds and boots) and 4.20 (Debian 13's).
#
# The source: Debian 13's xen 4.20, or upstream's RELEASE-4.20.4 from a
# local git mirror of xen.git ($PVIOMMU_XEN_GIT) when the mirror does not
# serve Debian's (lib/fetch.sh's fetch_xen_4_20, shared with the arm64
# bring-up). CI has neither, so CI does not run this;
# design/xen-integration.md ("Xen 4.20") records the last build and boot.
#
#   PVIOMMU_BUILD_DIR   build directory (default <repo>/build-4.20)
#   PVIOMMU_XEN_GIT     git directory holding the RELEASE-4.20.4 tag
#                       (default /work/.mirror/xen-project+xen/repo)
#   and build-xen.sh's other variables.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build-4.20}"
mkdir -p "$PVIOMMU_BUILD_DIR"
# shellcheck source-path=SCRIPTDIR source=lib/fetch.sh
. "$HERE/lib/fetch.sh"
fetch_xen_4_20 build-xen-4.20 "$PVIOMMU_BUILD_DIR/xen-src" "$PVIOMMU_BUILD_DIR"
exec "$HERE/build-xen.sh"
