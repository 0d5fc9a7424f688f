#!/bin/bash
# build-xen-arm64.sh -- cross-build the Xen 4.20 hypervisor (only) for arm64.
#
#   build-xen-arm64.sh            (after fetch-xen-4.20.sh)
#
# Config: arm64_defconfig plus
#   CONFIG_EXPERT=y        (ARM_SMMU_V3 and PCI_PASSTHROUGH are `if EXPERT`)
#   CONFIG_ARM_SMMU_V3=y   (xen/drivers/passthrough/Kconfig; tech preview)
#   CONFIG_PCI_PASSTHROUGH=y -- this symbol does NOT exist in 4.20 (it first
#       appears in 4.21, upstream 163c6b589879); with PVIOMMU_ARM64_PCI=1
#       (default) patches-4.20/0001-*.patch backports it, which makes arm64
#       select HAS_VPCI_GUEST_SUPPORT -> HAS_VPCI -> HAS_PCI. With
#       PVIOMMU_ARM64_PCI=0 the stock 4.20 Kconfig is built (no PCI on arm).
#   CONFIG_DEBUG=y / verbose: only with PVIOMMU_ARM64_DEBUG=1.
#
# The pristine source ($BUILD/xen-4.20-src) is copied to $BUILD/xen-4.20-tree
# and patched there, so the pristine tree stays usable for patch dry-runs.
# Heavy steps run under `nice -n 19`, make -j2 at most (shared 2-core box).
#
#   PVIOMMU_ARM64_BUILD  build directory (default /work/arm64-build)
#   PVIOMMU_ARM64_XEN    4.20 (default: Debian 13's version, fetch-xen-4.20.sh)
#                        or an upstream tag such as RELEASE-4.21.2, exported
#                        from $PVIOMMU_XEN_GIT (default: the local mirror) into
#                        $BUILD/xen-<tag>-src; such a tree gets no patches-4.20/
#                        (4.21 has PCI_PASSTHROUGH and the HAS_PCI fix).
#   PVIOMMU=1            build PV-IOMMU in (upstream tags >= 4.21 only): a
#                        separate tree $BUILD/xen-<tag>-pviommu-tree gets
#                        patches-4.21/series, the public header
#                        (../public/pv-iommu.h), the engine boundary header,
#                        the Arm glue pviommu-arm.c as xen/common/pviommu.c and
#                        the engine object (build-engine-arm64.sh, or
#                        $PVIOMMU_ENGINE_OBJ), and CONFIG_PV_IOMMU=y.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
VER="${PVIOMMU_ARM64_XEN:-4.20}"
if [ "$VER" = 4.20 ]; then
    SRC="$BUILD/xen-4.20-src"; TREE="$BUILD/xen-4.20-tree"; PATCHDIR="$HERE/patches-4.20"
else
    SRC="$BUILD/xen-$VER-src"; TREE="$BUILD/xen-$VER-tree"; PATCHDIR=""
    if [ ! -f "$SRC/.fetched" ]; then
        GIT="${PVIOMMU_XEN_GIT:-/work/.mirror/xen-project+xen/repo}"
        rm -rf "$SRC"; mkdir -p "$SRC"
        git --git-dir="$GIT" archive "$VER" | tar -x -C "$SRC"
        echo "upstream $VER $(git --git-dir="$GIT" rev-parse "$VER^{commit}")" > "$SRC/.origin"
        touch "$SRC/.fetched"
    fi
fi
PCI="${PVIOMMU_ARM64_PCI:-1}"
PVI="${PVIOMMU:-0}"
if [ "$PVI" = 1 ]; then
    [ "$VER" != 4.20 ] || { echo "build-xen-arm64: PVIOMMU=1 needs an upstream 4.21 tag (patches-4.21/)" >&2; exit 1; }
    TREE="$BUILD/xen-$VER-pviommu-tree"; PATCHDIR=""
fi
JOBS="${PVIOMMU_JOBS:-2}"; [ "$JOBS" -le 2 ] || JOBS=2
LOG="$BUILD/logs"
mkdir -p "$LOG"
[ -f "$SRC/.fetched" ] || "$HERE/fetch-xen-4.20.sh"
echo "build-xen-arm64: source $(cat "$SRC/.origin")"

# patched tree, PV-IOMMU sources, symbol check: shared with ../build-xen.sh
# and build-xen-arm64-4.17.sh
# shellcheck source-path=SCRIPTDIR source=../lib/build.sh
. "$HERE/../lib/build.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/engine-barrier.sh
. "$HERE/../lib/engine-barrier.sh"

# patched copy, redone when the patch set or the PCI choice changes
patches=()
if [ "$PCI" = 1 ] && [ -n "$PATCHDIR" ]; then patches=("$PATCHDIR"/*.patch); fi
if [ "$PVI" = 1 ]; then series_patches "$HERE/patches-4.21"; fi
psum=none
if [ ${#patches[@]} -gt 0 ]; then psum="$(cat "${patches[@]}" | sha256sum | cut -c1-16)"; fi
stamp="pci=$PCI $(cat "$SRC/.origin") patches=$psum"
# -F0: no fuzz, as the x86 builds (a hunk whose context moved fails here
# instead of landing by guess; a helper's 4.21 build found two patches
# fuzzed in silence).
patched_tree build-xen-arm64 "$SRC" "$TREE" .tree-stamp "$stamp" "-s -F0" "${patches[@]}"

if [ "$PVI" = 1 ]; then
    install_pviommu_sources "$TREE" "$HERE/pviommu-arm.c" "$LOG"
    if [ -n "${PVIOMMU_ENGINE_OBJ:-}" ]; then ENGINE_OBJ="$PVIOMMU_ENGINE_OBJ"
    else
        t_e=$(date +%s)
        "$HERE/build-engine-arm64.sh" > "$LOG/engine-arm64.log" 2>&1 \
            || { tail -20 "$LOG/engine-arm64.log" >&2; echo "build-xen-arm64: FAIL: engine, see $LOG/engine-arm64.log" >&2; exit 1; }
        echo "build-xen-arm64: engine object in $(( $(date +%s) - t_e )) s ($(grep -c . "$LOG/engine-arm64.log") log lines, $LOG/engine-arm64.log)"
        ENGINE_OBJ="$BUILD/engine-arm64/rust_engine.o"
    fi
    install_if_changed "$ENGINE_OBJ" "$TREE/xen/common/rust_engine.o"
fi

MK=(make -C "$TREE/xen" XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
start=$(date +%s)
# The config is redone only when its inputs change: a fresh defconfig
# rewrites .config and makes make rebuild every file.
cfgstamp="pci=$PCI debug=${PVIOMMU_ARM64_DEBUG:-0} pviommu=$PVI"
if [ ! -f "$TREE/xen/.config" ] || [ "$(cat "$TREE/.config-stamp" 2>/dev/null)" != "$cfgstamp" ]; then
    "${MK[@]}" defconfig > "$LOG/xen-arm64-config.log" 2>&1 \
        || { grep -E 'error|unknown|Error' "$LOG/xen-arm64-config.log" | head -5 >&2
             echo "build-xen-arm64: FAIL: defconfig, see $LOG/xen-arm64-config.log" >&2; exit 1; }
    {
        echo "CONFIG_EXPERT=y"
        echo "CONFIG_ARM_SMMU_V3=y"
        if [ "$PCI" = 1 ]; then echo "CONFIG_PCI_PASSTHROUGH=y"; fi
        if [ "${PVIOMMU_ARM64_DEBUG:-0}" = 1 ]; then echo "CONFIG_DEBUG=y"; fi
        if [ "$PVI" = 1 ]; then echo "CONFIG_PV_IOMMU=y"; fi
    } >> "$TREE/xen/.config"
    "${MK[@]}" olddefconfig >> "$LOG/xen-arm64-config.log" 2>&1
    echo "$cfgstamp" > "$TREE/.config-stamp"
fi
CFGNAME="xen-$VER-arm64"; [ "$PVI" = 1 ] && CFGNAME="xen-$VER-pviommu-arm64"
cp "$TREE/xen/.config" "$BUILD/$CFGNAME.config"

want=(CONFIG_EXPERT CONFIG_ARM_SMMU_V3)
if [ "$PCI" = 1 ]; then want+=(CONFIG_PCI_PASSTHROUGH CONFIG_HAS_PCI CONFIG_HAS_VPCI); fi
if [ "$PVI" = 1 ]; then want+=(CONFIG_PV_IOMMU); fi
for s in "${want[@]}"; do
    grep -q "^$s=y" "$TREE/xen/.config" \
        || { echo "build-xen-arm64: FAIL: $s not set after olddefconfig" >&2; exit 1; }
done
echo "build-xen-arm64: config: $(grep -E '^CONFIG_(PV_IOMMU|EXPERT|ARM_SMMU|ARM_SMMU_V3|PCI_PASSTHROUGH|HAS_PCI|HAS_VPCI|HAS_VPCI_GUEST_SUPPORT|IOMMU_FORCE_PT_SHARE|HAS_PASSTHROUGH|DEBUG)=' "$TREE/xen/.config" | tr '\n' ' ')"

if ! nice -n 19 "${MK[@]}" -j"$JOBS" > "$LOG/xen-arm64-build.log" 2>&1; then
    grep -E 'error|Error' "$LOG/xen-arm64-build.log" | head -20 >&2
    echo "build-xen-arm64: FAIL: see $LOG/xen-arm64-build.log" >&2
    exit 1
fi
end=$(date +%s)
if [ "$PVI" = 1 ]; then
    aarch64-linux-gnu-nm "$TREE/xen/xen-syms" > "$LOG/xen-syms-pviommu.nm"
    syms_present build-xen-arm64 "$LOG/xen-syms-pviommu.nm" do_pv_iommu_op pviommu_engine_op pviommu_engine_init
    symbol_names_fit build-xen-arm64 "$TREE/xen"
    xen_string_functions_own build-xen-arm64 "$LOG/xen-syms-pviommu.nm"
    stack_paint_leaf_frameless build-xen-arm64 aarch64-linux-gnu-objdump "$TREE/xen/common/pviommu.o"
    # The glue's own speculation barrier, as build-xen-arm64-4.17.sh checks.
    check_glue_object_barrier build-xen-arm64 arm64 "$TREE/xen/common/pviommu.o" "$LOG/pviommu-glue.dis"
    echo "build-xen-arm64: xen-syms has do_pv_iommu_op and the engine ($(grep -c ' pviommu_rs_\| pviommu_engine_' "$LOG/xen-syms-pviommu.nm") engine symbols)"
    if grep -qiE 'warning:|orphan' "$LOG/xen-arm64-build.log"; then grep -iE 'warning:|orphan' "$LOG/xen-arm64-build.log" | head -5
    else echo "build-xen-arm64: no compiler/linker warnings"; fi
fi
echo "build-xen-arm64: built in $((end - start)) s (make -j$JOBS, nice 19)"
file "$TREE/xen/xen"
echo "build-xen-arm64: $TREE/xen/xen"
