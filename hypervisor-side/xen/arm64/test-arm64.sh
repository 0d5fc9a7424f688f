#!/bin/bash
# test-arm64.sh -- PV-IOMMU on arm64, end to end: build the engine object and
# upstream Xen 4.21.2 with patches-4.21/ and the Arm glue (build-xen-arm64.sh
# PVIOMMU=1), boot it in QEMU 10 (virt, GICv3, SMMUv3 stage 2, edu) with a
# Debian arm64 dom0 (boot-qemu-arm64.sh), run pviommu-dom0-arm64 in dom0
# (hypercall 43 through /dev/xen/privcmd), and report.
#
#   test-arm64.sh
#
# Prints "PASS name ..." / "FAIL name ..." lines and "N passed, N failed";
# exit status 0 iff nothing failed. Installs what it needs through
# fetch-xen-4.20.sh (cross toolchain, dom0 kernel and busybox, QEMU 10
# unpacked under the build dir) and build-engine-arm64.sh (rustc-web).
#
#   PVIOMMU_ARM64_BUILD  build directory (default /work/arm64-build)
#   TEST_TIMEOUT         seconds for the build steps (default 1800)
#   QEMU_TIMEOUT         seconds for the boot (default 300)
# Timings of each step go to stdout and $BUILD/logs/test-arm64.times.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
export PVIOMMU_ARM64_BUILD="$BUILD"
VER=RELEASE-4.21.2
LOG="$BUILD/logs"; mkdir -p "$LOG"
TIMES="$LOG/test-arm64.times"; : > "$TIMES"
BT="${TEST_TIMEOUT:-1800}"
passed=0; failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
t_all=$(date +%s)
step() { # step NAME SECONDS
    echo "test-arm64: $1 took $2 s" | tee -a "$TIMES"
}
finish() {
    step total $(( $(date +%s) - t_all ))
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit $?
}

# ---- fetch (toolchain, dom0, QEMU 10) ----
t=$(date +%s)
if [ ! -f "$BUILD/dom0-arm64/.fetched" ] || ! command -v aarch64-linux-gnu-gcc >/dev/null \
   || [ ! -x "$BUILD/qemu10/usr/bin/qemu-system-aarch64" ]; then
    if ! timeout "$BT" "$HERE/fetch-xen-4.20.sh" > "$LOG/test-fetch.log" 2>&1; then
        tail -5 "$LOG/test-fetch.log"; fail "fetch see $LOG/test-fetch.log"; finish
    fi
fi
step fetch $(( $(date +%s) - t ))

# ---- engine + Xen ----
t=$(date +%s)
if timeout "$BT" env PVIOMMU=1 PVIOMMU_ARM64_XEN="$VER" "$HERE/build-xen-arm64.sh" \
       > "$LOG/test-build-xen.log" 2>&1; then
    grep -E '^build-xen-arm64: (engine|xen-syms|built|no compiler)' "$LOG/test-build-xen.log"
    pass "build engine object linked into Xen $VER arm64 xen-syms (do_pv_iommu_op, pviommu_engine_op)"
else
    tail -15 "$LOG/test-build-xen.log"
    fail "build see $LOG/test-build-xen.log"; finish
fi
step build-engine-and-xen $(( $(date +%s) - t ))
XEN="$BUILD/xen-$VER-pviommu-tree/xen/xen"

# ---- dom0 program ----
t=$(date +%s)
PROG="$BUILD/pviommu-dom0-arm64"
if aarch64-linux-gnu-gcc -O2 -Wall -Werror -static -I"$REPO/abi/include" \
       -o "$PROG" "$HERE/pviommu-dom0-arm64.c" > "$LOG/test-dom0-prog.log" 2>&1; then
    pass "dom0-program cross-compiled (static aarch64)"
else
    cat "$LOG/test-dom0-prog.log"; fail "dom0-program does not compile"; finish
fi
step dom0-program $(( $(date +%s) - t ))

# ---- boot ----
# Host RAM: QEMU virt, -m 2G from 0x40000000: RAM ends at frame 0xc0000.
t=$(date +%s)
NAME=pviommu-test QEMU_TIMEOUT="${QEMU_TIMEOUT:-300}" DOM0_TEST="$PROG" \
    DOM0_TEST_ARGS=0xc0000 DOM0_PROBES=0 \
    "$HERE/boot-qemu-arm64.sh" "$XEN" > "$LOG/test-boot.out" 2>&1
boot_rc=$?
step boot-qemu $(( $(date +%s) - t ))
BLOG="$LOG/boot-pviommu-test.log"
grep -a 'ARM64-BOOT: result' "$LOG/test-boot.out"

if grep -aq '(XEN) pviommu: engine ready' "$BLOG"; then
    pass "xen-log $(grep -a '(XEN) pviommu: engine ready' "$BLOG" | head -1 | tr -d '\r' | sed 's/^(XEN) //')"
else
    fail "xen-log no 'pviommu: engine ready' in $BLOG: $(grep -a 'pviommu' "$BLOG" | head -3 | tr -d '\r' | tr '\n' ' ')"
fi
if [ "$boot_rc" = 0 ]; then pass "boot dom0 init ran"; else fail "boot dom0 init did not run (see $BLOG)"; fi

# dom0 program results, as printed in dom0 (hvc0 goes to the serial log)
n=0
while IFS= read -r l; do
    n=$((n + 1))
    case "$l" in
        *"PVIOMMU-ARM64: PASS "*) pass "dom0 ${l#*PVIOMMU-ARM64: PASS }" ;;
        *"PVIOMMU-ARM64: FAIL "*) fail "dom0 ${l#*PVIOMMU-ARM64: FAIL }" ;;
    esac
done < <(grep -a 'PVIOMMU-ARM64: \(PASS\|FAIL\) ' "$BLOG" | tr -d '\r')
[ "$n" -gt 0 ] || fail "dom0 no result lines from pviommu-dom0-arm64 in $BLOG"
grep -a 'PVIOMMU-ARM64: \(caps\|region\|[0-9]* passed\)' "$BLOG" | tr -d '\r' | sed 's/^/info: /'
if grep -aqE '\(XEN\) (Assertion|Xen BUG|\*\*\*\*\*\*\*\*)|Panic on CPU' "$BLOG"; then
    fail "xen-health Xen assertion/BUG/panic in $BLOG"
else
    pass "xen-health no Xen assertion, BUG or panic in the log"
fi
finish
