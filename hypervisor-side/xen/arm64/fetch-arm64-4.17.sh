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

# 1. host tools
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/libc.a ] || missing+=(libc6-dev-arm64-cross)
command -v aarch64-linux-gnu-objdump >/dev/null || missing+=(binutils-aarch64-linux-gnu)
command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
command -v dtc >/dev/null || missing+=(device-tree-compiler)
for t in bison flex make python3 dpkg-source cpio xz gzip; do
    command -v "$t" >/dev/null || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=()
    for m in "${missing[@]}"; do
        case "$m" in
            make) pkgs+=(build-essential) ;;
            dpkg-source) pkgs+=(dpkg-dev) ;;
            xz) pkgs+=(xz-utils) ;;
            *) pkgs+=("$m") ;;
        esac
    done
    echo "fetch-arm64-4.17: installing ${pkgs[*]}"
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; }
fi

# 2. Xen 4.17 source (Debian 12), shared with the x86 build
"$HERE/../fetch-xen.sh"

# 3. arm64 dom0 kernel and busybox (private apt root, arm64 only)
D0="$ARM64/dom0-arm64"
if [ -f "$D0/.fetched" ]; then
    echo "fetch-arm64-4.17: $D0 already present"
    exit 0
fi
AR="$ARM64/apt-arm64"
mkdir -p "$AR/etc/sources.list.d" "$AR/etc/preferences.d" "$AR/state/lists/partial" \
         "$AR/cache/archives/partial" "$AR/debs"
cat > "$AR/etc/sources.list.d/debian.sources" <<SRCS
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Architectures: arm64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
cat > "$AR/apt.conf" <<CONF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$AR/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$AR/etc/preferences.d";
Dir::State "$AR/state";
Dir::State::status "$AR/state/status";
Dir::Cache "$AR/cache";
CONF
touch "$AR/state/status"
export APT_CONFIG="$AR/apt.conf"
apt-get update -q
# the meta package names the versioned image package
kpkg="$(apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$kpkg" ] || { echo "fetch-arm64-4.17: no linux-image for arm64 in bookworm" >&2; exit 1; }
rm -f "$AR/debs"/*.deb
( cd "$AR/debs" && apt-get download -q "$kpkg" busybox-static )
unset APT_CONFIG
rm -rf "$D0"; mkdir -p "$D0"
dpkg-deb -x "$AR/debs/${kpkg}"_*.deb "$D0/kernel"
dpkg-deb -x "$AR/debs"/busybox-static_*.deb "$D0/busybox"
echo "$kpkg" > "$D0/kernel-package"
touch "$D0/.fetched"
echo "fetch-arm64-4.17: dom0 kernel $kpkg and busybox-static in $D0"
