#!/bin/bash
# build-xen.sh -- build Xen 4.17.5 (Debian source) with the PV-IOMMU:
# fetch the source, apply patches/*.patch to a fresh copy (they add
# CONFIG_PV_IOMMU, opt-in and switched on here, and its Makefile line), install the public
# header (public/pv-iommu.h), the C glue and the Rust engine object, then
# build the hypervisor.
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
    echo "$stamp" > "$WORK/.pviommu-patches"
fi

# Install a file only when it changed (keeps incremental builds incremental).
install_if_changed() { cmp -s "$1" "$2" || cp "$1" "$2"; }

tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
# Public header: Xen's form of abi/include/pviommu.h (same layout; pviommu.c
# checks it with BUILD_BUG_ON).
install_if_changed "$HERE/public/pv-iommu.h" "$WORK/xen/include/public/pv-iommu.h"
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
# PV-IOMMU is new attack surface, so the option is off by default (opt-in):
# this build opts in explicitly.
if [ ! -f "$WORK/xen/.config" ] || ! grep -q '^CONFIG_PV_IOMMU=y' "$WORK/xen/.config"; then
    [ -f "$WORK/xen/.config" ] || make -C "$WORK/xen" defconfig > /dev/null
    sed -i '/^# CONFIG_PV_IOMMU is not set$/d' "$WORK/xen/.config"
    echo 'CONFIG_PV_IOMMU=y' >> "$WORK/xen/.config"
    make -C "$WORK/xen" olddefconfig > /dev/null
fi
grep -q '^CONFIG_PV_IOMMU=y' "$WORK/xen/.config" ||
    { echo "build-xen: FAIL: CONFIG_PV_IOMMU is not set in $WORK/xen/.config" >&2; exit 1; }
# The integration test counts hypercalls with Xen's own perf counters
# (xenperf's data; the option sits behind EXPERT in 4.17). A test build
# only: a production Xen leaves them off.
if ! grep -q '^CONFIG_PERF_COUNTERS=y' "$WORK/xen/.config"; then
    sed -i '/^# CONFIG_EXPERT is not set$/d; /^# CONFIG_PERF_COUNTERS is not set$/d' "$WORK/xen/.config"
    printf 'CONFIG_EXPERT=y\nCONFIG_PERF_COUNTERS=y\n' >> "$WORK/xen/.config"
    make -C "$WORK/xen" olddefconfig > /dev/null
fi
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
