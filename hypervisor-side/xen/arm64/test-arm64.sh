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
# What Xen's SMMUv3 driver logged for the context test. Xen prints SMMU
# events from a tasklet, and dom0's hvc0 output is buffered by Xen: the
# order of Xen and dom0 lines on the shared serial is not the order of
# events, so faults are told apart by the address in the event record
# (third dword: the input address), against the pages dom0 printed.
CLOG="$LOG/boot-pviommu-test.clean.log"
tr -d '\r' < "$BLOG" > "$CLOG"
# event records as "type page" (page = input address >> 12)
EVENTS="$LOG/boot-pviommu-test.events"
awk '/SMMUv3: [^ ]*: event 0x[0-9a-f]+ received:/ {
         match($0, /event 0x[0-9a-f]+/); t = substr($0, RSTART + 6, RLENGTH - 6); n = 0; next }
     t != "" && /SMMUv3: [^ ]*: \t0x[0-9a-f]+/ {
         match($0, /\t0x[0-9a-f]+/); n++
         if (n == 3) { v = substr($0, RSTART + 3, RLENGTH - 3); print t, substr(v, 1, length(v) - 3); t = "" } }' \
    "$CLOG" > "$EVENTS"
pg() { sed -n "s/.*PVIOMMU-ARM64: PAGES .*$1=0x\([0-9a-f]*\).*/\1/p" "$CLOG" | head -1; }
count_ev() { # count_ev TYPE PAGE(hex, no 0x; TYPE "*" = any)
    awk -v t="$1" -v p="$2" '{ q = $2; sub(/^0+/, "", q) } (t == "*" || $1 == t) && q == p' "$EVENTS" | wc -l
}
if grep -aq 'PVIOMMU-ARM64: PAGES' "$CLOG"; then
    fa=$(pg fa); fb=$(pg fb); ba=$(pg bfn_a); bb=$(pg bfn_b); bc=$(pg bfn_c)
    echo "info: $(wc -l < "$EVENTS") SMMU event records; by type: $(cut -d' ' -f1 "$EVENTS" | sort | uniq -c | tr '\n' ' ')"
    l="$(grep -a 'PV-IOMMU context vmid' "$CLOG" | head -1 | sed 's/.*(XEN) //')"
    if [ -n "$l" ]; then pass "xen-ste-attach $l"; else fail "xen-ste-attach no 'PV-IOMMU context vmid' line"; fi
    n=$(count_ev 0x13 "$bc")
    if [ "$n" -gt 0 ]; then pass "xen-fault-read-only $n F_PERMISSION (0x13) events at bfn 0x$bc (C, mapped read-only) in context 1"
    else fail "xen-fault-read-only no event 0x13 at bfn 0x$bc"; fi
    n=$(count_ev 0x10 "$fa")
    if [ "$n" -gt 0 ]; then pass "xen-fault-dom0-address $n F_TRANSLATION (0x10) events at 0x${fa}000 (A's dom0 address, not mapped in context 1)"
    else fail "xen-fault-dom0-address no event 0x10 at page 0x$fa"; fi
    n=$(count_ev 0x10 "$ba")
    if [ "$n" -gt 0 ]; then pass "xen-fault-unmapped $n F_TRANSLATION (0x10) events at bfn 0x$ba (A, unmapped)"
    else fail "xen-fault-unmapped no event 0x10 at bfn 0x$ba"; fi
    n=$(( $(count_ev '*' "$bb") + $(count_ev '*' "$fb") ))
    if [ "$n" = 0 ]; then pass "xen-no-fault-at-mapped no SMMU event at bfn 0x$bb (B in context 1) or at B's dom0 address 0x${fb}000"
    else fail "xen-no-fault-at-mapped $n SMMU events at B's bfn 0x$bb or dom0 address 0x${fb}000"; fi
    l="$(grep -a 'PV-IOMMU vmid .* detached' "$CLOG" | head -1 | sed 's/.*(XEN) //')"
    if [ -n "$l" ]; then pass "xen-ste-detach $l"; else fail "xen-ste-detach no 'PV-IOMMU vmid .. detached' line"; fi
    for t in 13 10; do
        echo "info: first event 0x$t record in Xen's log:"
        grep -a -A4 "event 0x$t received" "$CLOG" | head -5 | sed 's/.*(XEN)/info:   (XEN)/'
    done
else
    fail "xen-context-steps dom0 printed no PAGES line (context test did not reach its maps)"
fi
if grep -aqE '\(XEN\) (Assertion|Xen BUG|\*\*\*\*\*\*\*\*)|Panic on CPU' "$BLOG"; then
    fail "xen-health Xen assertion/BUG/panic in $BLOG"
else
    pass "xen-health no Xen assertion, BUG or panic in the log"
fi
finish
