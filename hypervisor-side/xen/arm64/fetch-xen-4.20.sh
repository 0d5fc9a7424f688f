#!/bin/bash
# fetch-xen-4.20.sh -- everything the arm64 bring-up needs, fetched with apt.
# Run as root on Debian 12 (amd64). Idempotent: each step is skipped when its
# result is already there.
#
#  1. Host tools: the aarch64 cross toolchain, qemu-system-arm (for
#     qemu-system-aarch64), Xen's hypervisor build deps, cpio.
#  2. Xen 4.20 source from Debian 13 (trixie): a deb-src entry for trixie
#     main (signed by the Debian archive keyring, which has the trixie keys),
#     `apt-get update`, `apt-get source xen=$XEN_VERSION`, unpacked into
#     $BUILD/xen-4.20-src. If the mirror does not serve the source files
#     (it answered 404 on 2026-11-30), upstream's RELEASE-4.20.4 tag is
#     exported from a local git mirror instead ($PVIOMMU_XEN_GIT).
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
XEN_VERSION="4.20.4+63-g7abfd2bce2-0+deb13u1"
UPSTREAM_TAG="RELEASE-4.20.4"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
DOM0_SUITE="${PVIOMMU_DOM0_SUITE:-trixie}"
SRC="$BUILD/xen-4.20-src"
mkdir -p "$BUILD"
export DEBIAN_FRONTEND=noninteractive

# 1. host tools
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/libc.a ] || missing+=(libc6-dev-arm64-cross)  # static dom0 test programs
command -v aarch64-linux-gnu-objdump >/dev/null || missing+=(binutils-aarch64-linux-gnu)
command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
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
    echo "fetch-xen-4.20: installing ${pkgs[*]}"
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; }
fi

# 2. Xen 4.20 source
if [ -f "$SRC/.fetched" ]; then
    echo "fetch-xen-4.20: $SRC already present"
else
    LIST=/etc/apt/sources.list.d/pviommu-trixie-src.sources
    if [ ! -f "$LIST" ]; then
        echo "fetch-xen-4.20: adding deb-src entry for trixie main ($LIST)"
        cat > "$LIST" <<'SRCS'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
        apt-get update -q
    fi
    tmp="$BUILD/xen-4.20-src.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp"
    if ( cd "$tmp" && { apt-get source -q --download-only "xen=$XEN_VERSION" \
            || { apt-get update -q && apt-get source -q --download-only "xen=$XEN_VERSION"; }; } ) \
            > "$BUILD/apt-source-xen.log" 2>&1; then
        ( cd "$tmp" && dpkg-source --no-check -x xen_*.dsc src >/dev/null )
        echo "debian $XEN_VERSION" > "$tmp/src/.origin"
    else
        # Observed 2026-11-30: the mirror has trixie's indices and binaries
        # but answers 404 for xen_4.20.4+63-g7abfd2bce2-0+deb13u1.dsc,
        # .orig.tar.xz and .debian.tar.xz (and for forky's 4.20.4+39 too).
        # Fall back to upstream's RELEASE-4.20.4 tag from a local git
        # mirror (Debian's +63 are stable-4.20 commits after that tag).
        grep -E '^E:' "$BUILD/apt-source-xen.log" >&2 || true
        GIT="${PVIOMMU_XEN_GIT:-/work/.mirror/xen-project+xen/repo}"
        echo "fetch-xen-4.20: apt-get source failed; using $UPSTREAM_TAG from $GIT" >&2
        git --git-dir="$GIT" rev-parse -q --verify "$UPSTREAM_TAG^{commit}" >/dev/null \
            || { echo "fetch-xen-4.20: no $UPSTREAM_TAG in $GIT (set PVIOMMU_XEN_GIT)" >&2; exit 1; }
        mkdir -p "$tmp/src"
        git --git-dir="$GIT" archive "$UPSTREAM_TAG" | tar -x -C "$tmp/src"
        echo "upstream $UPSTREAM_TAG $(git --git-dir="$GIT" rev-parse "$UPSTREAM_TAG^{commit}")" > "$tmp/src/.origin"
    fi
    rm -rf "$SRC"
    mv "$tmp/src" "$SRC"
    rm -rf "$tmp"
    touch "$SRC/.fetched"
    echo "fetch-xen-4.20: Xen source ($(cat "$SRC/.origin")) in $SRC"
fi

# 3. arm64 dom0 kernel and busybox (private apt root, arm64 only)
D0="$BUILD/dom0-arm64"
if [ -f "$D0/.fetched" ]; then
    echo "fetch-xen-4.20: $D0 already present"
else
    AR="$BUILD/apt-arm64"
    mkdir -p "$AR/etc/sources.list.d" "$AR/etc/preferences.d" "$AR/state/lists/partial" \
             "$AR/cache/archives/partial" "$AR/debs"
    cat > "$AR/etc/sources.list.d/debian.sources" <<SRCS
Types: deb
URIs: http://deb.debian.org/debian
Suites: $DOM0_SUITE
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
    [ -n "$kpkg" ] || { echo "fetch-xen-4.20: no linux-image for arm64 in $DOM0_SUITE" >&2; exit 1; }
    # xen-hypervisor-4.20-arm64: Debian's stock build, for comparison
    ( cd "$AR/debs" && apt-get download -q "$kpkg" busybox-static xen-hypervisor-4.20-arm64 )
    unset APT_CONFIG
    rm -rf "$D0"; mkdir -p "$D0"
    dpkg-deb -x "$AR/debs/${kpkg}"_*.deb "$D0/kernel"
    dpkg-deb -x "$AR/debs"/busybox-static_*.deb "$D0/busybox"
    dpkg-deb -x "$AR/debs"/xen-hypervisor-4.20-arm64_*.deb "$D0/xen-stock"
    echo "$kpkg" > "$D0/kernel-package"
    touch "$D0/.fetched"
    echo "fetch-xen-4.20: dom0 kernel $kpkg and busybox-static in $D0"
fi

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
    mkdir -p "$AB/etc/sources.list.d" "$AB/state/lists/partial" "$AB/cache/archives/partial" "$AB/debs"
    cat > "$AB/etc/sources.list.d/debian.sources" <<SRCS
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
    cat > "$AB/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$AB/etc/sources.list.d";
Dir::State "$AB/state";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$AB/cache";
CONF
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
