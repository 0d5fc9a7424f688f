#!/bin/bash
# build-xen-4.20.sh -- build upstream Xen 4.20 (x86) with the PV-IOMMU: the
# same hypervisor build as build-xen.sh, from patches-4.20/series, in its
# own build directory. It keeps the x86 series portable between Debian 12's
# 4.17 (what CI builds and boots) and 4.20 (Debian 13's).
#
# The source: Debian 13's xen 4.20 (apt-get source, a deb-src entry for
# trixie in a private apt configuration, nothing added to the host's), or,
# when the mirror does not serve it (404 for the .dsc and tarballs, seen
# 2026-11-30 and 2026-12-05), upstream's RELEASE-4.20.4 tag exported from a
# local git mirror of xen.git ($PVIOMMU_XEN_GIT). CI has neither, so CI
# does not run this; design/xen-integration.md ("Xen 4.20") records the
# last build and boot.
#
#   PVIOMMU_BUILD_DIR   build directory (default <repo>/build-4.20)
#   PVIOMMU_XEN_GIT     git directory holding the RELEASE-4.20.4 tag
#                       (default /work/.mirror/xen-project+xen/repo)
#   and build-xen.sh's other variables.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build-4.20}"
DEBIAN_VERSION="4.20.4+63-g7abfd2bce2-0+deb13u1"
UPSTREAM_TAG="RELEASE-4.20.4"
SRC="$PVIOMMU_BUILD_DIR/xen-src"
mkdir -p "$PVIOMMU_BUILD_DIR"
# shellcheck source-path=SCRIPTDIR source=lib/fetch.sh
. "$HERE/lib/fetch.sh"

if [ -f "$SRC/.fetched" ]; then
    echo "build-xen-4.20: $SRC ($(cat "$SRC/.origin")) already present"
else
    tmp="$PVIOMMU_BUILD_DIR/xen-src.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp"
    apt_dir="$PVIOMMU_BUILD_DIR/apt-trixie-src"
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    write_deb_src "$apt_dir/sources.list.d/trixie-src.sources" trixie
    apt_opts=(-o "Dir::Etc::SourceList=/dev/null"
              -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
              -o "Dir::State::Lists=$apt_dir/lists"
              -o "Dir::Cache=$apt_dir/cache")
    if apt-get "${apt_opts[@]}" update -q > "$PVIOMMU_BUILD_DIR/apt-source-xen.log" 2>&1 &&
        (cd "$tmp" && apt-get "${apt_opts[@]}" source -q "xen=$DEBIAN_VERSION") \
            >> "$PVIOMMU_BUILD_DIR/apt-source-xen.log" 2>&1; then
        src_dir="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'xen-*' | head -1)"
        mv "$src_dir" "$tmp/src"
        echo "debian $DEBIAN_VERSION" > "$tmp/src/.origin"
    else
        echo "build-xen-4.20: apt-get source xen=$DEBIAN_VERSION failed" \
             "($(grep -m1 -E '^E: ' "$PVIOMMU_BUILD_DIR/apt-source-xen.log" || echo 'see apt-source-xen.log'))" >&2
        export_xen_tag build-xen-4.20 "$UPSTREAM_TAG" "$tmp"
    fi
    rm -rf "$SRC"
    mv "$tmp/src" "$SRC"
    rm -rf "$tmp"
    touch "$SRC/.fetched"
    echo "build-xen-4.20: Xen source ($(cat "$SRC/.origin")) in $SRC"
fi
exec "$HERE/build-xen.sh"
