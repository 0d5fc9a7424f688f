#!/bin/bash
# run.sh -- Xen 4.17 arm64 with PV-IOMMU in QEMU: the CI fallback of issue 13
# (design/arm64-bringup.md, "What CI runs").
#
# Builds Debian 12's Xen 4.17.5 for arm64 with the engine linked in
# (hypervisor-side/xen/arm64/build-xen-arm64-4.17.sh), boots it under
# Debian 12's qemu-system-aarch64 (virt, GICv3, EL2, cortex-a57, TCG; no
# SMMU: none Xen 4.17 could own, see the design doc) with
#   - dom0: Debian 12's arm64 kernel + a busybox initramfs running
#     dom0-test.c (static) through /dev/xen/privcmd;
#   - d1: a dom0less domU (domu-arm64.S, a 640-byte guest) that fills a
#     page with known words and calls hypercall 43 itself (unprivileged);
# and Xen's command line pviommu=dom0-p2m (context 0 of dom0 is its p2m,
# written at gfn = BFN). Checks: the dom0 program's lines, the domU's
# hypercall results, Xen's debug key (PVX_DUMP_KEY in pviommu-arm.c, 'B';
# checked free in the Xen tree built: register_keyhandler() ASSERTs a free
# slot) dumps of dom0's p2m (after a
# map: the BFN maps the same machine frame as d1's gfn; after the unmap, and
# after d1 is destroyed with a BFN mapped: nothing), plus Xen's health.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exit 0 iff none failed.
# Installs what it needs (apt: cross toolchain, qemu-system-arm,
# device-tree-compiler; rustc-web for the engine).
#
#   PVIOMMU_BUILD_DIR   shared build dir (xen-src; default <repo>/build)
#   PVIOMMU_ARM64_417   this test's build dir (default $PVIOMMU_BUILD_DIR/arm64-4.17)
#   PVIOMMU_XEN_DEBUG=1 a debug Xen (its ASSERTs, and the glue's measure of
#                       the stack under the engine), rebuilt in the same
#                       tree; its outputs in $PVIOMMU_ARM64_417/test-debug
#   QEMU_TIMEOUT        seconds for one boot (default 300)
#   BOOT_STALL_S        no first test line this long after QEMU start: the boot
#                       stalled (seen under TCG); retried once (default 150)
#   QEMU_WAIT_S         wait at most this long for another QEMU on the machine
#                       to finish before booting (default 1800)
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
X="$REPO/hypervisor-side/xen/arm64"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
export PVIOMMU_ARM64_417="${PVIOMMU_ARM64_417:-$PVIOMMU_BUILD_DIR/arm64-4.17}"
DEBUG=n
[ "${PVIOMMU_XEN_DEBUG:-0}" = 1 ] && DEBUG=y
mkdir -p "$PVIOMMU_BUILD_DIR" "$PVIOMMU_ARM64_417"
# Absolute: the initramfs is written from under `cd` (as tests/xen-qemu/run.sh).
PVIOMMU_BUILD_DIR="$(cd "$PVIOMMU_BUILD_DIR" && pwd)"
PVIOMMU_ARM64_417="$(cd "$PVIOMMU_ARM64_417" && pwd)"
B="$PVIOMMU_ARM64_417"
OUT="$B/test"
[ "$DEBUG" = y ] && OUT="$B/test-debug"
mkdir -p "$OUT"
T0=$(date +%s)
# pass/fail, the result count and the boot watchdog with its stall retry
# are tests/lib/xen-qemu-boot.sh's, shared with the x86 test.
# shellcheck source-path=SCRIPTDIR source=../lib/xen-qemu-boot.sh
. "$REPO/tests/lib/xen-qemu-boot.sh"
finish() {
    echo "run: timing: build $((T2 - T0)) s, boot+test $((T4 - T3)) s, total $(( $(date +%s) - T0 )) s"
    results_summary
    exit $?
}
T2=$T0; T3=$T0; T4=$T0

# ---- Xen 4.17 arm64 with the engine ----
if timeout 2400 "$X/build-xen-arm64-4.17.sh" > "$OUT/build.log" 2>&1; then
    grep -E '^build-(xen-arm64-4.17|engine-arm64): (no FP|panic path|a speculation barrier|config|CONFIG_DEBUG|xen-syms|fetch)' "$OUT/build.log"
    pass "build Xen 4.17.5 (debug=$DEBUG) (Debian 12 source) arm64 + patches-4.17-arm64 + engine object (aarch64-unknown-none-softfloat: no FP/SIMD, panic path unreachable, a speculation barrier before each page lookup)"
else
    tail -25 "$OUT/build.log"
    fail "build see $OUT/build.log"; finish
fi
# The image this run boots, kept with its outputs: the release and debug
# runs build in one tree, and each qemu.cmd must name what it booted.
cp "$B/xen-tree/xen/xen" "$OUT/xen"
XEN="$OUT/xen"
T2=$(date +%s)

# ---- the debug key: free in the tree just built ----
# register_keyhandler() ASSERTs the slot is empty (a debug build dies at
# boot) and a release build silently replaces the old handler; 'P' was
# perfc_reset (key_table[], CONFIG_PERF_COUNTERS), which the defconfig
# does not build, so only the source can tell.
KEY="$(sed -n "s/^#define PVX_DUMP_KEY '\(.\)'.*/\1/p" "$X/pviommu-arm.c")"
if [ -z "$KEY" ]; then
    fail "debug-key-free no '#define PVX_DUMP_KEY' in $X/pviommu-arm.c"; KEY=B
else
    clash="$(grep -rnE "(register_keyhandler|register_irq_keyhandler|KEYHANDLER)\([[:space:]]*'[$KEY]'" \
                 --include='*.c' "$B/xen-tree/xen" | grep -v '/common/pviommu\.c:')"
    if [ -z "$clash" ]; then
        pass "debug-key-free '$KEY' (PVX_DUMP_KEY) is not taken by any other key handler of the Xen 4.17 tree (key_table[], register_{,irq_}keyhandler)"
    else
        fail "debug-key-free '$KEY' is already Xen's: $(echo "$clash" | head -2 | tr '\n' ' ')"
    fi
fi

# ---- dom0 program, domU guest ----
if aarch64-linux-gnu-gcc -O2 -Wall -Werror -static -I"$REPO/abi/include" -I"$X" -DDUMP_KEY="'$KEY'" \
       -o "$OUT/dom0-test" "$HERE/dom0-test.c" > "$OUT/cc.log" 2>&1 \
   && aarch64-linux-gnu-gcc -c -o "$OUT/domu.o" "$HERE/domu-arm64.S" >> "$OUT/cc.log" 2>&1 \
   && aarch64-linux-gnu-ld -Ttext=0 -o "$OUT/domu.elf" "$OUT/domu.o" >> "$OUT/cc.log" 2>&1 \
   && aarch64-linux-gnu-objcopy -O binary "$OUT/domu.elf" "$OUT/domu.bin" >> "$OUT/cc.log" 2>&1; then
    pass "programs dom0-test (static aarch64) and the domU guest ($(stat -c %s "$OUT/domu.bin") bytes, arm64 Image header)"
else
    cat "$OUT/cc.log"; fail "programs do not build"; finish
fi
DOMU_GFN=0x40400
PATTERN=0x5056494f4d4d5500
RAM_END=0xc0000   # QEMU virt, -m 2G from 0x40000000

# ---- initramfs ----
D0="$B/dom0-arm64"
KERNEL="$(ls "$D0"/kernel/boot/vmlinuz-* | head -1)"
KVER="$(basename "$KERNEL" | sed 's/^vmlinuz-//')"
KMOD="$D0/kernel/lib/modules/$KVER"
R="$OUT/initramfs"
rm -rf "$R"; mkdir -p "$R"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$(find "$D0/busybox" -path '*bin/busybox' | head -1)" "$R/bin/busybox"
for m in xen-privcmd xenfs; do
    f="$(find "$KMOD" -name "$m.ko*" | head -1)"
    [ -n "$f" ] || { fail "initramfs no $m module in $KMOD"; finish; }
    cp "$f" "$R/lib/modules/"
done
cp "$OUT/dom0-test" "$R/bin/dom0-test"
cat > "$R/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
echo "ARM64-417: dom0 init running: \$(uname -r)"
for m in /lib/modules/*.ko*; do
    case "\$m" in *.xz) xz -dc "\$m" > /tmp/m.ko && insmod /tmp/m.ko ;; *) insmod "\$m" ;; esac \
        || echo "ARM64-417: insmod \$m failed"
done
/bin/dom0-test 1 $DOMU_GFN $PATTERN $RAM_END 2>&1
echo "ARM64-417: dom0-test exit \$?"
poweroff -f
INIT
chmod +x "$R/init"
( cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 > "$OUT/initrd.gz" )

# ---- device tree: QEMU's own, plus a dom0less domU node ----
QEMU=qemu-system-aarch64
XEN_ARGS="dom0_mem=512M console=dtuart dtuart=/pl011@9000000 loglvl=all guest_loglvl=all noreboot pviommu=dom0-p2m"
DOM0_ARGS="console=hvc0 earlycon=xen earlyprintk=xen rdinit=/init loglevel=4"
DOMU_ADDR=0x5a000000
# dom0's kernel at 0x50000000 (Image, ~30 MiB), the initramfs at 0x5c000000,
# the domU at 0x5a000000: all above QEMU's DTB at 0x48000000 (RAM base +
# 128 MiB: a module there is dropped by Xen, design/arm64-bringup.md).
QARGS=( -machine virt,virtualization=on,gic-version=3 -cpu cortex-a57 -smp 2 -m 2G -accel tcg
        -nographic -serial mon:stdio -monitor none -no-reboot
        -kernel "$XEN" -append "$XEN_ARGS"
        -device "guest-loader,addr=0x50000000,kernel=$KERNEL,bootargs=$DOM0_ARGS"
        -device "guest-loader,addr=0x5c000000,initrd=$OUT/initrd.gz"
        -device "loader,file=$OUT/domu.bin,addr=$DOMU_ADDR,force-raw=on" )
rm -f "$OUT/virt.dtb"
"$QEMU" "${QARGS[@]}" -machine dumpdtb="$OUT/virt.dtb" > "$OUT/dumpdtb.log" 2>&1 || true
if [ ! -s "$OUT/virt.dtb" ]; then cat "$OUT/dumpdtb.log"; fail "dtb QEMU did not dump its device tree"; finish; fi
dtc -q -I dtb -O dts -o "$OUT/virt.dts" "$OUT/virt.dtb"
cat "$OUT/virt.dts" - > "$OUT/xen.dts" <<DTS

/ {
	chosen {
		domU1 {
			compatible = "xen,domain";
			#address-cells = <0x2>;
			#size-cells = <0x2>;
			memory = <0x0 0x8000>;
			cpus = <0x1>;
			vpl011;
			module@5a000000 {
				compatible = "multiboot,kernel", "multiboot,module";
				reg = <0x0 $DOMU_ADDR 0x0 $(printf '%#x' "$(stat -c %s "$OUT/domu.bin")")>;
			};
		};
	};
};
DTS
if dtc -q -I dts -O dtb -o "$OUT/xen.dtb" "$OUT/xen.dts" 2> "$OUT/dtc.log" \
   && grep -q 'multiboot,kernel' "$OUT/virt.dts"; then
    pass "dtb QEMU's device tree (dom0 modules from guest-loader) + dom0less node domU1 (32 MiB, 1 vCPU, vpl011)"
else
    cat "$OUT/dtc.log"; fail "dtb (no guest-loader module nodes, or dtc failed)"; finish
fi

# ---- boot, one QEMU at a time on this machine ----
waited=0
while command -v pgrep > /dev/null && pgrep -f 'qemu-system' > /dev/null && [ "$waited" -lt "${QEMU_WAIT_S:-1800}" ]; do
    [ "$waited" = 0 ] && echo "run: another QEMU is running; waiting"
    sleep 5; waited=$((waited + 5))
done
[ "$waited" -gt 0 ] && echo "run: waited $waited s for another QEMU"
LOG="$OUT/serial.log"
TMO="${QEMU_TIMEOUT:-300}"
STALL="${BOOT_STALL_S:-150}"
START_LINE='=== pviommu arm64 4.17 dom0 test start ==='
END_LINE='=== pviommu arm64 4.17 dom0 test end ==='
printf '%q ' "$QEMU" "${QARGS[@]}" -dtb "$OUT/xen.dtb" > "$OUT/qemu.cmd"; echo >> "$OUT/qemu.cmd"
PANIC_GRACE_S=2
END_GRACE_S=3
T3=$(date +%s)
qemu_boot nice -n 10 "$QEMU" "${QARGS[@]}" -dtb "$OUT/xen.dtb"
T4=$(date +%s)
[ -n "$verdict" ] && echo "run: watchdog: $verdict"
C="$OUT/serial.clean.log"
tr -d '\r' < "$LOG" > "$C"

# ---- Xen's side ----
l="$(grep -a 'Xen version ' "$C" | head -1 | sed 's/.*(XEN) //')"
if printf '%s\n' "$l" | grep -q "debug=$DEBUG"; then
    pass "xen-build the Xen booted is the one asked for (debug=$DEBUG): $l"
else
    fail "xen-build want debug=$DEBUG, the banner says: '${l:-nothing}'"
fi
l="$(grep -a 'pviommu: engine ready (arm64)' "$C" | head -1 | sed 's/.*(XEN) //')"
if [ -n "$l" ]; then pass "xen-engine $l"; else fail "xen-engine no 'pviommu: engine ready (arm64)' line in $LOG"; fi
l="$(grep -a 'pviommu: dom0-p2m:' "$C" | head -1 | sed 's/.*(XEN) //')"
if [ -n "$l" ]; then pass "xen-mode $l"; else fail "xen-mode no 'pviommu: dom0-p2m:' line"; fi
l="$(grep -a 'LOADING DOMU' "$C" | head -1 | sed 's/.*(XEN) //')"
if [ -n "$l" ]; then pass "xen-domu dom0less domain built: $l"; else fail "xen-domu no 'LOADING DOMU' line"; fi

# ---- the domU (unprivileged caller) ----
if grep -aq 'PVIOMMU-DOMU: known page at gfn 0x40400 filled' "$C"; then
    pass "domu-known-page d1 filled gfn $DOMU_GFN before dom0's test"
else
    fail "domu-known-page no line from d1"
fi
l="$(grep -a 'PVIOMMU-DOMU: unprivileged hypercall 43' "$C" | head -1 | sed 's/.*PVIOMMU-DOMU: //')"
if [ "$l" = "unprivileged hypercall 43 query_caps rc=0xffffffffffffffff batch rc=0xffffffffffffffff" ]; then
    pass "domu-eperm d1 (not control, no target): query_caps and batch rc=-1 (EPERM)"
else
    fail "domu-eperm d1 said: '${l:-nothing}' (want both rc=0xffffffffffffffff, -EPERM)"
fi

# ---- dom0's checks ----
n=0
while IFS= read -r l; do
    n=$((n + 1))
    case "$l" in
        *"PVIOMMU-417: PASS "*) pass "dom0 ${l#*PVIOMMU-417: PASS }" ;;
        *"PVIOMMU-417: FAIL "*) fail "dom0 ${l#*PVIOMMU-417: FAIL }" ;;
    esac
done < <(grep -a 'PVIOMMU-417: \(PASS\|FAIL\) ' "$C")
[ "$n" -gt 0 ] || fail "dom0 no result lines from dom0-test in $LOG"
# (A timeout fails even if the end line came while HANG_KEYS' dump ran.)
if ! grep -aq "$END_LINE" "$C" || [ "$verdict" = timeout ]; then
    fail "dom0 test did not complete (${verdict:-QEMU exited early}; see $LOG)"
fi
grep -a 'PVIOMMU-417: caps ' "$C" | head -1 | sed 's/.*PVIOMMU-417: /info: /'

# ---- the debug key: dom0's p2m at the BFN, and d1's gfn, the same frame ----
bfn="$(sed -n 's/.*PVIOMMU-417: MAPPED bfn=\(0x[0-9a-f]*\) .*/\1/p' "$C" | head -1)"
dump() { # dump N: Xen's lines of debug-key dump N
    awk -v n="$1" '/pviommu-p2m: dump [0-9]+:/ { match($0, /dump [0-9]+:/); cur = substr($0, RSTART + 5, RLENGTH - 6) }
                   cur == n && /pviommu-p2m:/ { sub(/.*\(XEN\) /, ""); print }' "$C"
}
# keep_dumps N...: dumps N... into $OUT/dumpN.txt, and shown
keep_dumps() {
    local n
    for n in "$@"; do
        dump "$n" > "$OUT/dump$n.txt"
        sed "s/^/info: key $n: /" "$OUT/dump$n.txt"
    done
}
# dom0_mfn N BFN TYPE: the frame dump N shows at dom0's gfn BFN, mapped
# TYPE from a page of d1; domu_mfn N BFN: d1's gfn $DOMU_GFN's frame, the
# source of that entry.
dom0_mfn() { sed -n "s/^pviommu-p2m:  d0 gfn $2 mfn \(0x[0-9a-f]*\) type $3 owner d1$/\1/p" "$OUT/dump$1.txt"; }
domu_mfn() { sed -n "s/^pviommu-p2m:   d1 gfn $DOMU_GFN mfn \(0x[0-9a-f]*\) type ram_rw (source of d0 gfn $2)$/\1/p" "$OUT/dump$1.txt"; }
# emptied N: dump N shows no PV-IOMMU entry left in dom0's p2m;
# entries_line N: its count line.
emptied() { grep -q ': 0 valid entries' "$OUT/dump$1.txt" && ! grep -q '^pviommu-p2m:  d0 gfn' "$OUT/dump$1.txt"; }
entries_line() { grep 'valid entries' "$OUT/dump$1.txt" | sed 's/^pviommu-p2m: //'; }

if [ -n "$bfn" ]; then
    keep_dumps 1 2
    m0="$(dom0_mfn 1 "$bfn" iommu_map_ro)"
    m1="$(domu_mfn 1 "$bfn")"
    if [ -n "$m0" ] && [ "$m0" = "$m1" ]; then
        pass "p2m-after-map debug key '$KEY' dump 1: dom0's p2m maps bfn $bfn -> mfn $m0 (iommu_map_ro, page of d1) = d1's gfn $DOMU_GFN -> mfn $m1"
    else
        fail "p2m-after-map dump 1: d0 gfn $bfn -> '${m0:-none}', d1 gfn $DOMU_GFN -> '${m1:-none}' (want the same mfn)"
    fi
    if emptied 2; then
        pass "p2m-after-unmap debug key '$KEY' dump 2: $(entries_line 2)"
    else
        fail "p2m-after-unmap dump 2: $(tr '\n' ' ' < "$OUT/dump2.txt")"
    fi
else
    fail "p2m-debug-key dom0 printed no MAPPED line (the map did not happen)"
fi
# the read-write map, then the domU's destruction with it live
bfn="$(sed -n 's/.*PVIOMMU-417: MAPPED-RW bfn=\(0x[0-9a-f]*\) .*/\1/p' "$C" | head -1)"
if [ -n "$bfn" ]; then
    keep_dumps 3 4
    m0="$(dom0_mfn 3 "$bfn" iommu_map_rw)"
    m1="$(domu_mfn 3 "$bfn")"
    if [ -n "$m0" ] && [ "$m0" = "$m1" ]; then
        pass "p2m-after-map-rw debug key '$KEY' dump 3: bfn $bfn -> mfn $m0 (iommu_map_rw) = d1's gfn $DOMU_GFN -> mfn $m1"
    else
        fail "p2m-after-map-rw dump 3: d0 gfn $bfn -> '${m0:-none}', d1 gfn $DOMU_GFN -> '${m1:-none}'"
    fi
    l="$(grep -a 'pviommu: d1 torn down' "$C" | head -1 | sed 's/.*(XEN) //')"
    if emptied 4; then
        pass "p2m-after-destroy debug key '$KEY' dump 4: the teardown revoked bfn $bfn from dom0's p2m (${l:-no teardown line}): $(entries_line 4)"
    else
        fail "p2m-after-destroy dump 4: $(tr '\n' ' ' < "$OUT/dump4.txt")"
    fi
else
    fail "p2m-destroy dom0 printed no MAPPED-RW line"
fi

if grep -aqE '\(XEN\) (Assertion|Xen BUG|\*\*\*\*\*\*\*\*)|Panic on CPU|Unexpected Trap' "$C"; then
    fail "xen-health Xen assertion/BUG/panic/trap in $LOG: $(grep -aE 'Assertion|Xen BUG|Panic on CPU|Unexpected Trap' "$C" | head -2 | tr '\n' ' ')"
else
    pass "xen-health no Xen assertion, BUG, trap or panic in the log"
fi
echo "run: QEMU $("$QEMU" --version | head -1); log $LOG; command $OUT/qemu.cmd"
finish
