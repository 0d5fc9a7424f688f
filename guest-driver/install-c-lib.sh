#!/bin/sh
# Install the C library of pviommu-guest under a prefix, the way a
# distribution package lays it out:
#
#   PREFIX/lib/libpviommu_guest.so.MAJOR.MINOR.PATCH   (soname libpviommu_guest.so.MAJOR)
#   PREFIX/lib/libpviommu_guest.so.MAJOR -> .so.MAJOR.MINOR.PATCH
#   PREFIX/lib/libpviommu_guest.so       -> .so.MAJOR   (for -lpviommu_guest)
#   PREFIX/lib/libpviommu_guest.a
#   PREFIX/lib/pkgconfig/pviommu-guest.pc
#   PREFIX/include/pviommu_guest.h, PREFIX/include/pviommu.h
#
# Usage: install-c-lib.sh [--debug] [--no-build] PREFIX
#   --debug     install the debug build (target/debug) instead of release
#   --no-build  do not run cargo; install what is already built
# The version comes from pviommu_guest.h (PVIOMMU_GUEST_VERSION_*).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
profile=release
build=yes
while [ $# -gt 1 ]; do
    case "$1" in
        --debug) profile=debug ;;
        --no-build) build=no ;;
        *) echo "install-c-lib.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ $# -eq 1 ] || { echo "usage: install-c-lib.sh [--debug] [--no-build] PREFIX" >&2; exit 2; }
case "$1" in
    /*) prefix=$1 ;;
    *) prefix=$(pwd)/$1 ;;
esac

header="$here/include/pviommu_guest.h"
ver() { sed -n "s/^#define PVIOMMU_GUEST_VERSION_$1 \([0-9][0-9]*\)\$/\1/p" "$header"; }
major=$(ver MAJOR); minor=$(ver MINOR); patch=$(ver PATCH)
[ -n "$major" ] && [ -n "$minor" ] && [ -n "$patch" ] || {
    echo "install-c-lib.sh: no PVIOMMU_GUEST_VERSION_* in $header" >&2; exit 1; }
version="$major.$minor.$patch"

target="${CARGO_TARGET_DIR:-$repo/target}/$profile"
if [ "$build" = yes ]; then
    flag=; [ "$profile" = release ] && flag=--release
    (cd "$repo" && cargo build -q -p pviommu-guest --lib $flag)
fi
for f in libpviommu_guest.so libpviommu_guest.a; do
    [ -f "$target/$f" ] || { echo "install-c-lib.sh: $target/$f not built" >&2; exit 1; }
done

libdir="$prefix/lib"
includedir="$prefix/include"
mkdir -p "$libdir/pkgconfig" "$includedir"
install -m 0755 "$target/libpviommu_guest.so" "$libdir/libpviommu_guest.so.$version"
ln -sf "libpviommu_guest.so.$version" "$libdir/libpviommu_guest.so.$major"
ln -sf "libpviommu_guest.so.$major" "$libdir/libpviommu_guest.so"
install -m 0644 "$target/libpviommu_guest.a" "$libdir/libpviommu_guest.a"
install -m 0644 "$header" "$repo/abi/include/pviommu.h" "$includedir/"
# What a static link of a Rust library needs from the C library (rustc
# --print native-static-libs for linux-gnu).
sed -e "s|@PREFIX@|$prefix|" -e "s|@LIBDIR@|\${exec_prefix}/lib|" \
    -e "s|@INCLUDEDIR@|\${prefix}/include|" -e "s|@VERSION@|$version|" \
    -e "s|@PRIVATE_LIBS@|-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc|" \
    "$here/pviommu-guest.pc.in" > "$libdir/pkgconfig/pviommu-guest.pc"
echo "installed libpviommu_guest $version under $prefix"
