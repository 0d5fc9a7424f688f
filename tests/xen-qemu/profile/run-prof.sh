#!/bin/bash
# run-prof.sh -- where Xen's time goes under QEMU TCG during the
# integration test's MEASURE step: one boot of tests/xen-qemu/run.sh with
# the xenprof.so TCG plugin (per-TB execution counts inside Xen, snapshot at
# every entry of perfc_control, which the harness calls right before and
# after each measured pass), then per-function tables of guest instructions
# and TB executions per page for three passes: PV-IOMMU map into an engine
# context and into Xen's own tables (both untimed), and privcmd's foreign
# map. About 10 minutes. Run as root.
#
#   PVIOMMU_BUILD_DIR  build dir (default <repo>/build): reuses its xen and
#                      xen-syms (SKIP_XEN_BUILD=0 rebuilds them first)
#   PERCPU=1           count per vCPU with exec callbacks (exact, slower)
#                      instead of inline counters
#   MEASURE_PAGES      default 16384
# Output in $PVIOMMU_BUILD_DIR/xen-profile/: xenprof.out (snapshots),
# measure.txt (the boot's MEASURE lines), tables.md.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
BUILD="$PVIOMMU_BUILD_DIR"
OUT="$BUILD/xen-profile"
N="${MEASURE_PAGES:-16384}"
mkdir -p "$OUT/include"

# The plugin API header of the QEMU that runs the test (Debian 12: 7.2,
# plugin API 1), from its source package; no Debian patch touches it.
if [ ! -f "$OUT/include/qemu-plugin.h" ]; then
    ver=$(dpkg-query -W -f '${Version}' qemu-system-x86 | sed 's/^[0-9]*://; s/+dfsg.*//; s/-.*//')
    ( cd "$OUT" && apt-get source --download-only qemu >/dev/null &&
      tar -xJf qemu_*.orig.tar.xz --wildcards '*/include/qemu/qemu-plugin.h' &&
      cp qemu-*/include/qemu/qemu-plugin.h include/ ) ||
        { echo "run-prof: no qemu-plugin.h for QEMU $ver" >&2; exit 1; }
fi
gcc -O2 -Wall -Wextra -shared -fPIC -I"$OUT/include" -o "$OUT/xenprof.so" "$HERE/xenprof.c" -lpthread

if [ "${SKIP_XEN_BUILD:-1}" != 1 ]; then
    "$REPO/hypervisor-side/xen/build-xen.sh"
fi
MARKER=0x$(nm "$BUILD/xen-syms" | awk '$3 == "perfc_control" {print $1}')
[ "$MARKER" != 0x ] || { echo "run-prof: no perfc_control in $BUILD/xen-syms" >&2; exit 1; }

rm -f "$OUT/xenprof.out"
# The other QEMU boots of this machine (CI) take the same lock.
flock /tmp/pviommu-qemu.lock env SKIP_XEN_BUILD=1 NO_DOMU=1 FUZZ_CALLS=0 \
    BIG_PAGES="${BIG_PAGES:-1024}" MEASURE_PAGES="$N" QEMU_TIMEOUT="${QEMU_TIMEOUT:-1200}" \
    QEMU_EXTRA="-plugin $OUT/xenprof.so,out=$OUT/xenprof.out,marker=$MARKER,percpu=${PERCPU:-0}" \
    "$REPO/tests/xen-qemu/run.sh" > "$OUT/run.log" 2>&1 || true
grep -a '^MEASURE' "$BUILD/xen-qemu/serial.clean.log" > "$OUT/measure.txt" || true

# Snapshot k = the k-th entry of perfc_control. Each perfc_take() of
# dom0-harness.c enters it twice (xc_perfc_query_number, xc_perfc_query),
# and only cmd_measure calls perfc_take, in this order: pv_map_unmap of
# Xen's tables untimed (takes 0-3), timed (4-7), of an engine context
# untimed (8-11), timed (12-15), then privcmd's map (16-17). A pass runs
# from the second entry of its first take to the first entry of its next.
python3 "$HERE/analyze.py" "$OUT/xenprof.out" "$BUILD/xen-syms" "$BUILD/engine/long-syms.map" "$N" \
    --intervals --pass=pviommu_ctx_map_untimed:17:18 --pass=privcmd_foreign_map:33:34 \
    --pass=pviommu_map_untimed_default_ctx:1:2 > "$OUT/tables.md"
echo "run-prof: $OUT/tables.md"
