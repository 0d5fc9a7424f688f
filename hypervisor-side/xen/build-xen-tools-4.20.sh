#!/bin/bash
# build-xen-tools-4.20.sh -- the toolstack of build-xen-4.20.sh's source (its
# libraries, xl, xenstored, xenconsoled, xen-init-dom0), installed under
# $PVIOMMU_BUILD_DIR/tools-dist for tests/xen-qemu/run.sh's
# PVIOMMU_XEN_TOOLS: a toolstack drives only a hypervisor of its own version
# (the domctl interface version must match: Debian 12's 4.17 libxenctrl gets
# "xc_domain_create: Permission denied" from 4.20). Run after
# build-xen-4.20.sh, as root on Debian 12; not in CI (CI has no 4.20
# source). No QEMU, firmware but hvmloader, stub domains or docs.
#
#   PVIOMMU_BUILD_DIR   build directory (default <repo>/build-4.20)
#   JOBS                make -j (default 2)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${PVIOMMU_BUILD_DIR:-$REPO/build-4.20}"
SRC="$BUILD/xen-src"
TREE="$BUILD/tools-src"
DIST="$BUILD/tools-dist"
JOBS="${JOBS:-2}"
[ -f "$SRC/.fetched" ] || { echo "build-xen-tools-4.20: no $SRC (run build-xen-4.20.sh first)" >&2; exit 1; }
# shellcheck source-path=SCRIPTDIR source=lib/fetch.sh
. "$HERE/lib/fetch.sh"
# iasl for hvmloader's ACPI tables, yajl for libxl; the rest of what the
# tools need is on the machine for the hypervisor's and QEMU's sake.
need=""
command -v iasl >/dev/null || need="$need acpica-tools"
[ -e /usr/include/yajl/yajl_gen.h ] || need="$need libyajl-dev"
for p in uuid-dev libncurses-dev libzstd-dev liblzma-dev zlib1g-dev libbz2-dev pkg-config python3-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
# shellcheck disable=SC2086 # a list of packages
[ -z "$need" ] || apt_install $need
if [ ! -x "$DIST/usr/sbin/xl" ] || [ "$(cat "$DIST/.origin" 2>/dev/null)" != "$(cat "$SRC/.origin")" ]; then
    rm -rf "$TREE" "$DIST"
    cp -a "$SRC" "$TREE"
    cd "$TREE"
    # (The top-level build-tools target: `make -C tools` alone skips the
    # public headers of tools/include/xen and compiles against the host's
    # 4.17 ones.)
    PYTHON=/usr/bin/python3 ./configure --prefix=/usr --disable-docs --disable-stubdom --disable-xen \
        --disable-qemu-traditional --with-system-qemu=/usr/bin/qemu-system-i386 --disable-seabios \
        --disable-rombios --disable-ipxe --disable-ovmf --disable-ocamltools --disable-golang \
        --disable-pvshim --disable-pygrub --disable-xsmpolicy > "$BUILD/tools-configure.log" 2>&1 ||
        { tail -20 "$BUILD/tools-configure.log"; exit 1; }
    nice -n 10 make -j"$JOBS" build-tools PYTHON=/usr/bin/python3 > "$BUILD/tools-build.log" 2>&1 ||
        { grep -E -B2 -A2 'error' "$BUILD/tools-build.log" | tail -30; exit 1; }
    make install-tools DESTDIR="$DIST" PYTHON=/usr/bin/python3 > "$BUILD/tools-install.log" 2>&1 ||
        { tail -20 "$BUILD/tools-install.log"; exit 1; }
    cp "$SRC/.origin" "$DIST/.origin"
fi
[ -e "$DIST/usr/lib/libxenctrl.a" ] && [ -x "$DIST/usr/sbin/xl" ] ||
    { echo "build-xen-tools-4.20: FAIL: no libxenctrl.a or xl under $DIST" >&2; exit 1; }
echo "build-xen-tools-4.20: PVIOMMU_XEN_TOOLS=$DIST"
