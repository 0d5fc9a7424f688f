#!/bin/bash
# build-xen-arm64-4.17.sh -- cross-build Debian 12's Xen 4.17.5 for arm64
# with PV-IOMMU: the CI fallback of issue 13 (design/arm64-bringup.md).
#
#   build-xen-arm64-4.17.sh
#
# Source: ../fetch-xen.sh's tree ($PVIOMMU_BUILD_DIR/xen-src, apt-get source
# xen=4.17.5+72-g01140da4e8-1, the one the x86 build uses), copied to
# $ARM64/xen-tree and patched with patches-4.17-arm64/series; installs the
# public header (../public/pv-iommu.h), the engine boundary header, the Arm
# glue pviommu-arm.c as xen/common/pviommu.c (with "#define PVIOMMU_ARM_XEN
# 417" in front: its two named version differences) and the engine object
# (build-engine-arm64.sh: aarch64-unknown-none-softfloat, checked: no
# FP/SIMD, panic path unreachable); arm64_defconfig + CONFIG_PV_IOMMU=y.
# Heavy steps run under nice 19 with make -j2 at most (2-core machine).
#
#   PVIOMMU_BUILD_DIR   where ../fetch-xen.sh keeps xen-src (default <repo>/build)
#   PVIOMMU_ARM64_417   this build's dir (default $PVIOMMU_BUILD_DIR/arm64-4.17)
#   PVIOMMU_ENGINE_OBJ  a prebuilt arm64 rust_engine.o instead of building one
#   PVIOMMU_XEN_DEBUG=1 a debug Xen (CONFIG_DEBUG and the options that go
#                       with it, as ../build-xen.sh's), in the same tree
# Prints the Xen image's path last.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
ARM64="${PVIOMMU_ARM64_417:-$PVIOMMU_BUILD_DIR/arm64-4.17}"
export PVIOMMU_ARM64_417="$ARM64"
SRC="$PVIOMMU_BUILD_DIR/xen-src"
TREE="$ARM64/xen-tree"
LOG="$ARM64/logs"
JOBS="${PVIOMMU_JOBS:-2}"; [ "$JOBS" -le 2 ] || JOBS=2
mkdir -p "$LOG"
t0=$(date +%s)

"$HERE/fetch-arm64-4.17.sh" > "$LOG/fetch.log" 2>&1 \
    || { tail -20 "$LOG/fetch.log" >&2; echo "build-xen-arm64-4.17: FAIL: fetch, see $LOG/fetch.log" >&2; exit 1; }
[ -f "$SRC/.fetched" ] || { echo "build-xen-arm64-4.17: no Xen source in $SRC" >&2; exit 1; }

# patched tree, PV-IOMMU sources, symbol check: shared with ../build-xen.sh
# and build-xen-arm64.sh
# shellcheck source-path=SCRIPTDIR source=../lib/build.sh
. "$HERE/../lib/build.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/engine-barrier.sh
. "$HERE/../lib/engine-barrier.sh"

# ---- patched copy, redone when the series or a patch changes ----
patches=()
series_patches "$HERE/patches-4.17-arm64"
stamp="$(cat "$HERE/patches-4.17-arm64/series" "${patches[@]}" | sha256sum | cut -c1-16)"
# no fuzz (-F0): every patch of the series applies to this exact tree
patched_tree build-xen-arm64-4.17 "$SRC" "$TREE" .tree-stamp "$stamp" "-s -F0" "${patches[@]}"

# ---- headers, glue, engine (installed only when changed) ----
# the glue with its two named 4.17 differences switched on
{ echo "#define PVIOMMU_ARM_XEN 417 /* build-xen-arm64-4.17.sh */"; cat "$HERE/pviommu-arm.c"; } > "$LOG/pviommu.c"
install_pviommu_sources "$TREE" "$LOG/pviommu.c" "$LOG"
t1=$(date +%s)
if [ -n "${PVIOMMU_ENGINE_OBJ:-}" ]; then
    ENGINE_OBJ="$PVIOMMU_ENGINE_OBJ"
else
    PVIOMMU_ARM64_BUILD="$ARM64" "$HERE/build-engine-arm64.sh" "$REPO/hypervisor-side/xen/engine-staticlib" \
        "$ARM64/engine-arm64" > "$LOG/engine-arm64.log" 2>&1 \
        || { tail -20 "$LOG/engine-arm64.log" >&2; echo "build-xen-arm64-4.17: FAIL: engine, see $LOG/engine-arm64.log" >&2; exit 1; }
    grep -E '^build-engine-arm64: (no FP|panic path|a speculation barrier|cargo took)' "$LOG/engine-arm64.log"
    ENGINE_OBJ="$ARM64/engine-arm64/rust_engine.o"
fi
install_if_changed "$ENGINE_OBJ" "$TREE/xen/common/rust_engine.o"
t2=$(date +%s)

# ---- hypervisor ----
MK=(make -C "$TREE/xen" XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
# The config is made once per tree: a fresh defconfig rewrites .config
# and makes make rebuild every file.
if [ ! -f "$TREE/xen/.config" ] || ! grep -q '^CONFIG_PV_IOMMU=y' "$TREE/xen/.config"; then
    "${MK[@]}" defconfig > "$LOG/xen-config.log" 2>&1
    sed -i '/^# CONFIG_PV_IOMMU is not set$/d' "$TREE/xen/.config"
    echo 'CONFIG_PV_IOMMU=y' >> "$TREE/xen/.config"
    "${MK[@]}" olddefconfig >> "$LOG/xen-config.log" 2>&1
fi
grep -q '^CONFIG_PV_IOMMU=y' "$TREE/xen/.config" \
    || { echo "build-xen-arm64-4.17: FAIL: CONFIG_PV_IOMMU not set after olddefconfig" >&2; exit 1; }
# Debug or release, as asked (../lib/build.sh), in the same tree: the
# debug boot of ../../../scripts/test-all.sh comes after the release one.
want_debug=n
[ "${PVIOMMU_XEN_DEBUG:-0}" = 1 ] && want_debug=y
xen_debug_config build-xen-arm64-4.17 "$want_debug" "$TREE/xen/.config" "${MK[@]}"
cp "$TREE/xen/.config" "$ARM64/xen-4.17-arm64-pviommu.config"
echo "build-xen-arm64-4.17: config: $(grep -E '^CONFIG_(PV_IOMMU|ARM_64|HAS_PASSTHROUGH|IOMMU_FORCE_PT_SHARE|ARM_SMMU|ARM_SMMU_V3|HAS_PCI|DEBUG|EXPERT)=' "$TREE/xen/.config" | tr '\n' ' ')"
if ! nice -n 19 "${MK[@]}" -j"$JOBS" > "$LOG/xen-build.log" 2>&1; then
    grep -E -B2 -A2 'error|Error' "$LOG/xen-build.log" | head -40 >&2
    echo "build-xen-arm64-4.17: FAIL: make, see $LOG/xen-build.log" >&2
    exit 1
fi
if grep -qiE 'warning:|orphan' "$LOG/xen-build.log"; then
    grep -iE 'warning:|orphan' "$LOG/xen-build.log" | head -10 >&2
    echo "build-xen-arm64-4.17: FAIL: compiler/linker warnings (Xen builds with -Werror; an orphan section would be mapped non-executable)" >&2
    exit 1
fi
t3=$(date +%s)
aarch64-linux-gnu-nm "$TREE/xen/xen-syms" > "$LOG/xen-syms.nm"
syms_present build-xen-arm64-4.17 "$LOG/xen-syms.nm" \
    do_pv_iommu_op pviommu_engine_op pviommu_engine_init pvx_dump_dom0_p2m
symbol_names_fit build-xen-arm64-4.17 "$TREE/xen"
xen_string_functions_own build-xen-arm64-4.17 "$LOG/xen-syms.nm"
stack_paint_leaf_frameless build-xen-arm64-4.17 aarch64-linux-gnu-objdump "$TREE/xen/common/pviommu.o"
# The glue's own speculation barrier (../lib/engine-barrier.sh): Xen's
# evaluate_nospec() is empty on Arm, so the glue has the engine's.
check_glue_object_barrier build-xen-arm64-4.17 arm64 "$TREE/xen/common/pviommu.o" "$LOG/pviommu-glue.dis"
echo "build-xen-arm64-4.17: xen-syms has do_pv_iommu_op, the engine ($(grep -c ' pviommu_rs_\| pviommu_engine_' "$LOG/xen-syms.nm") engine symbols) and the debug key"
echo "build-xen-arm64-4.17: fetch $((t1 - t0)) s, engine $((t2 - t1)) s, hypervisor $((t3 - t2)) s (make -j$JOBS, nice 19)"
# (file(1) may be missing on a clean CI machine)
if command -v file > /dev/null; then file "$TREE/xen/xen" | sed 's/^/build-xen-arm64-4.17: /'; fi
echo "build-xen-arm64-4.17: XEN=$TREE/xen/xen"
