#!/bin/bash
# build-xen.sh -- build Xen 4.17.5 (Debian source; 4.20 from build-xen-4.20.sh) with the PV-IOMMU:
# fetch the source, apply patches/*.patch to a fresh copy (they add
# CONFIG_PV_IOMMU, opt-in and switched on here, and its Makefile line), install the public
# header (public/pv-iommu.h), the C glue and the Rust engine object, then
# build the hypervisor.
#
#   PVIOMMU_BUILD_DIR     build directory (default <repo>/build)
#   PVIOMMU_ENGINE_CRATE  engine crate (default hypervisor-side/xen/engine-staticlib)
#   PVIOMMU_ENGINE_OBJ    use this prebuilt rust_engine.o instead of building one
#   PVIOMMU_XEN_DEBUG=1   a debug Xen (CONFIG_DEBUG, DEBUG_LOCKS, SCRUB_DEBUG,
#                         XMEM_POOL_POISON, VERBOSE_DEBUG, FRAME_POINTER): its
#                         ASSERTs, the glue's lock-order checks among them, run
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
# patched tree, PV-IOMMU sources, symbol check: shared with the arm64 builds
# shellcheck source-path=SCRIPTDIR source=lib/build.sh
. "$HERE/lib/build.sh"
# shellcheck source-path=SCRIPTDIR source=lib/engine-barrier.sh
. "$HERE/lib/engine-barrier.sh"

# ---- fresh patched copy (redone whenever the patch series changes) ----
# The source's version (its xen/Makefile) picks the series: patches/ for
# 4.17, patches-4.20/series for 4.20 or later (build-xen-4.20.sh), whose
# glue also gets "#define PVIOMMU_X86_XEN 420" (pviommu.c says why).
xen_version="$(awk '/^export XEN_VERSION /{v=$NF} /^export XEN_SUBVERSION /{s=$NF} END{print v*100+s}' "$SRC/xen/Makefile")"
patches=()
if [ "$xen_version" -ge 420 ]; then
    series_patches "$HERE/patches-4.20"
    patch_opts="-F0"
else
    patches=("$HERE"/patches/*.patch)
    patch_opts=""
fi
stamp="$(cat "${patches[@]}" | sha256sum | cut -d' ' -f1)"
patched_tree build-xen "$SRC" "$WORK" .pviommu-patches "$stamp" "$patch_opts" "${patches[@]}"

tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
if [ "$xen_version" -ge 420 ]; then
    # (After the SPDX line, which stays the file's first.)
    sed "1a #define PVIOMMU_X86_XEN 420 /* build-xen.sh: Xen source $xen_version */" \
        "$HERE/pviommu.c" > "$tmp/pviommu-$xen_version.c"
    install_pviommu_sources "$WORK" "$tmp/pviommu-$xen_version.c" "$tmp"
else
    install_pviommu_sources "$WORK" "$HERE/pviommu.c" "$tmp"
fi

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
# Shadow paging: QEMU's TCG emulates SVM without NPT, so the test's HVM
# domains and its PVH domU (hap = 0) run on shadow paging. 4.17 builds it by
# default; 4.20's Kconfig gives it no default (defconfig leaves it out, and
# creating such a domain answers EOPNOTSUPP).
if ! grep -q '^CONFIG_SHADOW_PAGING=y' "$WORK/xen/.config"; then
    sed -i '/^# CONFIG_SHADOW_PAGING is not set$/d' "$WORK/xen/.config"
    echo 'CONFIG_SHADOW_PAGING=y' >> "$WORK/xen/.config"
    make -C "$WORK/xen" olddefconfig > /dev/null
fi
grep -q '^CONFIG_SHADOW_PAGING=y' "$WORK/xen/.config" ||
    { echo "build-xen: FAIL: CONFIG_SHADOW_PAGING is not set in $WORK/xen/.config" >&2; exit 1; }
# Debug or release, as asked (lib/build.sh).
want_debug=n
[ "${PVIOMMU_XEN_DEBUG:-0}" = 1 ] && want_debug=y
xen_debug_config build-xen "$want_debug" "$WORK/xen/.config" make -C "$WORK/xen"
if ! make -C "$WORK/xen" -j"$JOBS" > "$BUILD/xen-build.log" 2>&1; then
    grep -E -B2 -A2 'error|Error' "$BUILD/xen-build.log" | tail -30
    echo "build-xen: FAIL: make failed, see $BUILD/xen-build.log" >&2
    exit 1
fi
grep -iE '(^|[^[:alnum:]_.])warning:' "$BUILD/xen-build.log" || echo "build-xen: no warnings"
t3=$(date +%s)
nm "$WORK/xen/xen-syms" > "$BUILD/xen-syms.nm"
syms_present build-xen "$BUILD/xen-syms.nm" do_pv_iommu_op pviommu_engine_op
symbol_names_fit build-xen "$WORK/xen"
xen_string_functions_own build-xen "$BUILD/xen-syms.nm"
stack_paint_leaf_frameless build-xen objdump "$WORK/xen/common/pviommu.o"
# The glue's own speculation barrier (lib/engine-barrier.sh): Xen's
# block_speculation(), an lfence unless branch hardening is configured out
# (then Xen's own checks have none either).
if grep -q '^CONFIG_SPECULATIVE_HARDEN_BRANCH=y' "$WORK/xen/.config"; then
    check_glue_object_barrier build-xen x86 "$WORK/xen/common/pviommu.o" "$BUILD/pviommu-glue.dis"
else
    echo "build-xen: CONFIG_SPECULATIVE_HARDEN_BRANCH unset: the glue's barrier is empty, as Xen's own"
fi
cp "$WORK/xen/xen" "$BUILD/xen"
cp "$WORK/xen/xen-syms" "$BUILD/xen-syms"
echo "build-xen: engine $((t2-t1)) s, hypervisor $((t3-t2)) s, total $((t3-t0)) s"
echo "build-xen: XEN=$BUILD/xen"
