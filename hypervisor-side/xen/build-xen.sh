#!/bin/bash
# build-xen.sh -- build Xen 4.17.5 (Debian source) with the PV-IOMMU:
# fetch the source, apply patches/*.patch to a fresh copy, install the public
# header, the C glue and the Rust engine object, then build the hypervisor.
#
#   PVIOMMU_BUILD_DIR     build directory (default <repo>/build)
#   PVIOMMU_ENGINE_CRATE  engine crate (default hypervisor-side/xen/engine-staticlib)
#   PVIOMMU_ENGINE_OBJ    use this prebuilt rust_engine.o instead of building one
#   JOBS                  make -j (default 2)
# Prints the path of the multiboot image (xen) at the end.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
BUILD="$PVIOMMU_BUILD_DIR"
SRC="$BUILD/xen-src"
WORK="$BUILD/xen-work"
JOBS="${JOBS:-2}"
t0=$(date +%s)

"$HERE/fetch-xen.sh"

# ---- fresh patched copy (redone whenever the patch series changes) ----
stamp="$(cat "$HERE"/patches/*.patch | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$WORK/.pviommu-patches" 2>/dev/null)" != "$stamp" ]; then
    echo "build-xen: preparing patched tree in $WORK"
    rm -rf "$WORK"
    cp -a "$SRC" "$WORK"
    for p in "$HERE"/patches/*.patch; do
        echo "build-xen: applying $(basename "$p")"
        patch -d "$WORK" -p1 --forward --no-backup-if-mismatch < "$p"
    done
    grep -q 'pviommu.o' "$WORK/xen/common/Makefile" ||
        echo 'obj-y += pviommu.o rust_engine.o' >> "$WORK/xen/common/Makefile"
    echo "$stamp" > "$WORK/.pviommu-patches"
fi

# Install a file only when it changed (keeps incremental builds incremental).
install_if_changed() { cmp -s "$1" "$2" || cp "$1" "$2"; }

tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
# Public header: the project's ABI header in Xen's public-header conventions.
sed -e 's/#include <stdint.h>/#include "xen.h"/' \
    -e 's/PVIOMMU_ABI_H/__XEN_PUBLIC_PV_IOMMU_H__/g' \
    -e 's/^#define __HYPERVISOR_pv_iommu_op 43$/#ifndef __HYPERVISOR_pv_iommu_op\n#define __HYPERVISOR_pv_iommu_op 43\n#endif/' \
    "$REPO/abi/include/pviommu.h" > "$tmp/pv-iommu.h"
install_if_changed "$tmp/pv-iommu.h" "$WORK/xen/include/public/pv-iommu.h"
# Engine boundary header: Xen has no <stdint.h>/<stddef.h>.
sed -e 's/#include <stdint.h>/#include <xen\/types.h>/' -e '/#include <stddef.h>/d' \
    "$HERE/include/pviommu_engine.h" > "$tmp/pviommu_engine.h"
install_if_changed "$tmp/pviommu_engine.h" "$WORK/xen/common/pviommu_engine.h"
install_if_changed "$HERE/pviommu.c" "$WORK/xen/common/pviommu.c"

# ---- Rust engine object ----
t1=$(date +%s)
if [ -n "${PVIOMMU_ENGINE_OBJ:-}" ]; then
    ENGINE_OBJ="$PVIOMMU_ENGINE_OBJ"
else
    "$HERE/build-engine.sh" "${PVIOMMU_ENGINE_CRATE:-$HERE/engine-staticlib}" "$BUILD/engine"
    ENGINE_OBJ="$BUILD/engine/rust_engine.o"
fi
install_if_changed "$ENGINE_OBJ" "$WORK/xen/common/rust_engine.o"
t2=$(date +%s)

# ---- hypervisor ----
[ -f "$WORK/xen/.config" ] || make -C "$WORK/xen" defconfig
if ! make -C "$WORK/xen" -j"$JOBS" > "$BUILD/xen-build.log" 2>&1; then
    grep -E -B2 -A2 'error|Error' "$BUILD/xen-build.log" | tail -30
    echo "build-xen: FAIL: make failed, see $BUILD/xen-build.log" >&2
    exit 1
fi
grep -iE 'warning' "$BUILD/xen-build.log" || echo "build-xen: no warnings"
t3=$(date +%s)
nm "$WORK/xen/xen-syms" > "$BUILD/xen-syms.nm"
grep -q ' do_pv_iommu_op$' "$BUILD/xen-syms.nm" || { echo "build-xen: FAIL: do_pv_iommu_op missing" >&2; exit 1; }
grep -q ' pviommu_engine_op$' "$BUILD/xen-syms.nm" || { echo "build-xen: FAIL: engine not linked" >&2; exit 1; }
cp "$WORK/xen/xen" "$BUILD/xen"
cp "$WORK/xen/xen-syms" "$BUILD/xen-syms"
echo "build-xen: engine $((t2-t1)) s, hypervisor $((t3-t2)) s, total $((t3-t0)) s"
echo "build-xen: XEN=$BUILD/xen"
