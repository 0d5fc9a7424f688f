# shellcheck shell=bash
# fetch.sh -- the apt steps the fetch scripts share (../fetch-xen.sh,
# ../arm64/fetch-arm64-4.17.sh, ../arm64/fetch-xen-4.20.sh). Sourced, not
# run. Everything comes from the Debian apt mirror: the only network CI
# has besides crates.io. Nothing here installs a foreign architecture on
# the host: arm64 packages are downloaded and unpacked, never installed.

# apt_install PKG...: installs PKGs; when that fails, the package lists may
# be stale (a CI image is built once and used for weeks): update, try again.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
        || { apt-get update -q \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}

# install_arm64_host_tools NAME [CMD:PKG...]: the host tools every arm64
# build and boot needs (the aarch64 cross toolchain with a libc for the
# static dom0 programs, qemu-system-aarch64, Xen's build tools, cpio and
# the compressors), plus each CMD (from PKG) asked for; installs what is
# missing. NAME: the calling script, for its message.
install_arm64_host_tools() {
    local name="$1" t m
    local missing=() pkgs=()
    shift
    command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
    [ -e /usr/aarch64-linux-gnu/lib/libc.a ] || missing+=(libc6-dev-arm64-cross)
    command -v aarch64-linux-gnu-objdump >/dev/null || missing+=(binutils-aarch64-linux-gnu)
    command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
    for t in "$@" bison flex make python3 dpkg-source cpio xz gzip; do
        command -v "${t%%:*}" >/dev/null || missing+=("$t")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    for m in "${missing[@]}"; do
        case "$m" in
            *:*) pkgs+=("${m#*:}") ;;
            make) pkgs+=(build-essential) ;;
            dpkg-source) pkgs+=(dpkg-dev) ;;
            xz) pkgs+=(xz-utils) ;;
            *) pkgs+=("$m") ;;
        esac
    done
    echo "$name: installing ${pkgs[*]}"
    apt_install "${pkgs[@]}"
}

# write_deb_src FILE SUITE: an apt source of SUITE main's source packages,
# signed by the Debian archive keyring (which has the keys of every
# current suite).
write_deb_src() {
    cat > "$1" <<SRCS
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $2
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
}

# apt_source_xen VERSION DIR: Debian's source package xen=VERSION,
# downloaded into DIR and unpacked as DIR/src (no build deps, no signature
# check: apt checked the files against the signed index). A failed
# download is retried once after an update (stale lists); then it fails.
apt_source_xen() {
    ( cd "$2" && { apt-get source -q --download-only "xen=$1" \
                   || { apt-get update -q && apt-get source -q --download-only "xen=$1"; }; } ) \
        || return 1
    ( cd "$2" && dpkg-source --no-check -x xen_*.dsc src >/dev/null )
}

# private_apt_root DIR SUITE ARCH STATUS [TYPES]: an apt configuration of
# its own under DIR (package lists, cache, DIR/debs for downloads) that sees
# only Debian SUITE main for ARCH (TYPES: deb, the default, or deb-src for
# sources), and takes STATUS as dpkg's status file; use
# it with APT_CONFIG=DIR/apt.conf. The host's apt setup and dpkg are left
# alone (ARCH arm64: the host's dpkg gets no foreign architecture).
private_apt_root() {
    local d="$1" suite="$2" arch="$3" status="$4" types="${5:-deb}"
    mkdir -p "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/state/lists/partial" \
             "$d/cache/archives/partial" "$d/debs"
    cat > "$d/etc/sources.list.d/debian.sources" <<SRCS
Types: $types
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Architectures: $arch
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
    cat > "$d/apt.conf" <<CONF
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$d/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$d/etc/preferences.d";
Dir::State "$d/state";
Dir::State::status "$status";
Dir::Cache "$d/cache";
CONF
    [ -e "$status" ] || touch "$status"
}

# fetch_arm64_dom0 NAME AR D0 SUITE [PKG=DIR...]: Debian SUITE's arm64
# kernel and busybox-static (and each extra PKG), downloaded through the
# private apt root AR and unpacked into D0/kernel, D0/busybox (D0/DIR),
# with the kernel's package name in D0/kernel-package. Skipped when
# D0/.fetched says it was done. NAME: the calling script, for its messages.
fetch_arm64_dom0() {
    local name="$1" ar="$2" d0="$3" suite="$4" kpkg e
    local extra=()
    shift 4
    if [ -f "$d0/.fetched" ]; then
        echo "$name: $d0 already present"
        return 0
    fi
    for e in "$@"; do extra+=("${e%%=*}"); done
    private_apt_root "$ar" "$suite" arm64 "$ar/state/status"
    # APT_CONFIG for these apt calls only, not for the caller's later ones
    local apt=(env APT_CONFIG="$ar/apt.conf")
    "${apt[@]}" apt-get update -q
    # the meta package names the versioned image package
    kpkg="$("${apt[@]}" apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    [ -n "$kpkg" ] || { echo "$name: no linux-image for arm64 in $suite" >&2; return 1; }
    rm -f "$ar/debs"/*.deb
    ( cd "$ar/debs" && "${apt[@]}" apt-get download -q "$kpkg" busybox-static "${extra[@]}" )
    rm -rf "$d0"; mkdir -p "$d0"
    dpkg-deb -x "$ar/debs/${kpkg}"_*.deb "$d0/kernel"
    dpkg-deb -x "$ar/debs"/busybox-static_*.deb "$d0/busybox"
    for e in "$@"; do dpkg-deb -x "$ar/debs/${e%%=*}"_*.deb "$d0/${e#*=}"; done
    echo "$kpkg" > "$d0/kernel-package"
    touch "$d0/.fetched"
    echo "$name: dom0 kernel $kpkg and busybox-static in $d0"
}

# export_xen_tag NAME TAG DEST: upstream Xen's TAG exported from a local git
# mirror of xen.git ($PVIOMMU_XEN_GIT, default the tool library's mirror)
# into DEST/src, with DEST/src/.origin naming the tag and its commit: the
# fallback of the scripts that fetch a Xen source Debian does not serve.
# NAME: the caller, for its messages.
export_xen_tag() {
    local name="$1" tag="$2" dest="$3"
    local git="${PVIOMMU_XEN_GIT:-/work/.mirror/xen-project+xen/repo}"
    echo "$name: using $tag from $git" >&2
    git --git-dir="$git" rev-parse -q --verify "$tag^{commit}" >/dev/null ||
        { echo "$name: no $tag in $git (set PVIOMMU_XEN_GIT)" >&2; return 1; }
    mkdir -p "$dest/src"
    git --git-dir="$git" archive "$tag" | tar -x -C "$dest/src"
    echo "upstream $tag $(git --git-dir="$git" rev-parse "$tag^{commit}")" > "$dest/src/.origin"
}

# fetch_xen_4_20 NAME SRC WORK: Xen 4.20's source in SRC, for the x86 build
# (../build-xen-4.20.sh) and the arm64 bring-up (../arm64/fetch-xen-4.20.sh)
# alike. Debian 13's (apt_source_xen in a private apt configuration under
# WORK/apt-trixie-src: nothing added to the host's apt setup), or, when the
# mirror does not serve it (404 for the .dsc and tarballs, seen 2026-11-30
# and 2026-12-05), upstream's RELEASE-4.20.4 tag (export_xen_tag; Debian's
# +63 are stable-4.20 commits after it). SRC/.origin says which. Nothing
# done if SRC/.fetched exists. NAME: the caller, for its messages.
XEN_4_20_DEBIAN="4.20.4+63-g7abfd2bce2-0+deb13u1"
XEN_4_20_TAG="RELEASE-4.20.4"
fetch_xen_4_20() {
    local name="$1" src="$2" work="$3"
    local tmp="$3/xen-4.20-src.tmp" apt="$3/apt-trixie-src" log="$3/apt-source-xen.log"
    if [ -f "$src/.fetched" ]; then
        echo "$name: $src ($(cat "$src/.origin")) already present"
        return 0
    fi
    rm -rf "$tmp"; mkdir -p "$tmp"
    private_apt_root "$apt" trixie amd64 /var/lib/dpkg/status deb-src
    if ( export APT_CONFIG="$apt/apt.conf"
         apt-get update -q && apt_source_xen "$XEN_4_20_DEBIAN" "$tmp" ) > "$log" 2>&1; then
        echo "debian $XEN_4_20_DEBIAN" > "$tmp/src/.origin"
    else
        echo "$name: apt-get source xen=$XEN_4_20_DEBIAN failed" \
             "($(grep -m1 -E '^E: ' "$log" || echo "see $log"))" >&2
        export_xen_tag "$name" "$XEN_4_20_TAG" "$tmp" || return 1
    fi
    rm -rf "$src"
    mv "$tmp/src" "$src"
    rm -rf "$tmp"
    touch "$src/.fetched"
    echo "$name: Xen source ($(cat "$src/.origin")) in $src"
}
