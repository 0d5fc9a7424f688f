#!/bin/bash
# run.sh -- PV-IOMMU integration test: Xen 4.17 (patched, with the engine) +
# Debian's 6.1 dom0 kernel in QEMU (TCG, q35, intel-iommu, dom0-iommu=strict,
# edu device). Prints PASS/FAIL/SKIP/MEASURE lines and "N passed, N failed";
# exits non-zero on any failure. Run as root on Debian 12.
#
#   PVIOMMU_BUILD_DIR     build dir (default <repo>/build)
#   PVIOMMU_ENGINE_CRATE  / PVIOMMU_ENGINE_OBJ: passed to build-xen.sh
#   SKIP_XEN_BUILD=1      reuse $PVIOMMU_BUILD_DIR/xen
#   XEN_BIN               boot this Xen instead of $PVIOMMU_BUILD_DIR/xen (the
#                         FLASK build of build-xen-flask.sh; with SKIP_XEN_BUILD=1)
#   XEN_EXTRA_ARGS        more Xen command-line options (flask=enforcing)
#   MEASURE_PAGES         pages for the MEASURE step (default 16384)
#   FUZZ_CALLS            hostile hypercalls from dom0 and from the domU (default 100000)
#   BIG_PAGES             mapped pages of the domain destroyed in one go (default 65536)
#   QEMU_TIMEOUT          seconds per boot (default 900: a VT-d boot whose 2 cores
#                         another job shared ran past 600, 2026-12-04)
#   BOOT_STALL_S          no first test line this long after QEMU start: the boot
#                         stalled (seen under TCG); retried once (default 150)
#   PVIOMMU_TOOL_BIN      prebuilt static `pviommu` binary (default: cargo build)
#   NO_DOMU=1             skip the domU checks (EPERM, fuzz, device model)
#   QEMU_EXTRA            more QEMU arguments for the x86 boot (profile/run-prof.sh:
#                         a TCG plugin)
#   PVIOMMU_QEMU_IOMMU    intel (default: intel-iommu, VT-d) or amd (amd-iommu,
#                         AMD-Vi: no engine-own contexts, init.sh checks they
#                         are refused and skips the VT-d-only checks)
#   PVIOMMU_XEN_TOOLS     an upstream toolstack installed under this root
#                         (`make install-tools DESTDIR=...`, --prefix=/usr), to
#                         go with a hypervisor of its version (build-xen-4.20.sh):
#                         the harness links its static libraries, dom0 runs its
#                         xl, xenstored, ... at their installed paths. Default:
#                         the host's libxen-dev and Debian's xen-utils-4.17 (a
#                         toolstack only drives a hypervisor of its own version:
#                         the domctl interface version must match)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export PVIOMMU_BUILD_DIR="${PVIOMMU_BUILD_DIR:-$REPO/build}"
mkdir -p "$PVIOMMU_BUILD_DIR/xen-qemu" "$PVIOMMU_BUILD_DIR/debs"
# Absolute: the initramfs steps write into it from under `cd` (a relative
# PVIOMMU_BUILD_DIR=build-4.20 failed there, "rootfs/domu/initrd.gz: No such
# file or directory").
PVIOMMU_BUILD_DIR="$(cd "$PVIOMMU_BUILD_DIR" && pwd)"
BUILD="$PVIOMMU_BUILD_DIR"
OUT="$BUILD/xen-qemu"
T0=$(date +%s)

# ---- host packages (nothing that touches the host kernel) ----
missing=""
for pair in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio; do
    command -v "${pair%%:*}" >/dev/null || missing="$missing ${pair#*:}"
done
XT="${PVIOMMU_XEN_TOOLS:-}"
if [ -n "$XT" ]; then
    XT="$(cd "$XT" && pwd)"
    [ -e "$XT/usr/lib/libxenctrl.a" ] || { echo "run: no $XT/usr/lib/libxenctrl.a (PVIOMMU_XEN_TOOLS)"; exit 1; }
else
    [ -e /usr/lib/x86_64-linux-gnu/libxenctrl.a ] || missing="$missing libxen-dev"
fi
[ -e /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q dynamic && missing="$missing busybox-static"
if [ -n "$missing" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

# ---- dom0 kernel, extracted (not installed) ----
KDIR="$BUILD/debs/kernel"
if [ ! -d "$KDIR/boot" ]; then
    KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    ( cd "$BUILD/debs" && apt-get download "$KPKG" )
    dpkg-deb -x "$BUILD/debs/$KPKG"_*.deb "$KDIR"
fi
VMLINUZ="$(ls "$KDIR"/boot/vmlinuz-* | head -1)"
KMOD="$(ls -d "$KDIR"/lib/modules/* | head -1)"

# ---- Xen ----
T1=$(date +%s)
if [ "${SKIP_XEN_BUILD:-0}" != 1 ]; then
    "$REPO/hypervisor-side/xen/build-xen.sh"
fi
XEN="${XEN_BIN:-$BUILD/xen}"
[ -f "$XEN" ] || { echo "no $XEN"; exit 1; }
T2=$(date +%s)

# ---- dom0 binaries ----
gcc -O2 -Wall -static ${XT:+-I "$XT/usr/include" -L "$XT/usr/lib"} -I "$REPO/abi/include" -o "$OUT/dom0-harness" "$HERE/dom0-harness.c" \
    -lxenforeignmemory -lxenctrl -lxenstore -lxencall -lxengnttab -lxenevtchn -lxendevicemodel \
    -lxentoolcore -lxentoollog -lpthread 2> "$OUT/harness-build.log" \
    || { cat "$OUT/harness-build.log"; exit 1; }

# ---- initramfs ----
R="$OUT/rootfs"
rm -rf "$R"; mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"
done
# xen-evtchn: the mediator binds VIRQ_PV_IOMMU through /dev/xen/evtchn.
for m in xen-privcmd xen-evtchn; do
    cp "$(find "$KMOD" -name "$m.ko*" | head -1)" "$R/lib/modules/"
done
cp "$OUT/dom0-harness" "$R/bin/"
# The project's own tool, static, so dom0 runs it with --backend xen
# (PVIOMMU_TOOL_BIN: a prebuilt static binary instead of building one).
if [ -n "${PVIOMMU_TOOL_BIN:-}" ]; then
    PVBIN="$PVIOMMU_TOOL_BIN"
    [ -x "$PVBIN" ] || { echo "run: PVIOMMU_TOOL_BIN=$PVBIN is not executable"; exit 1; }
else
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
        -p pviommu-tools --target x86_64-unknown-linux-gnu)
    PVBIN="$REPO/target/x86_64-unknown-linux-gnu/release/pviommu"
fi
cp "$PVBIN" "$R/bin/pviommu"; echo "run: included $PVBIN"
# A C mediator's shadow through the library's C API, linked statically
# against libpviommu_guest.a (built with the tool's flags, so its
# dependencies are the tool build's). Skipped with a prebuilt tool.
if [ -z "${PVIOMMU_TOOL_BIN:-}" ]; then
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" cargo rustc -q --release \
        -p pviommu-guest --lib --crate-type staticlib --target x86_64-unknown-linux-gnu)
    gcc -O2 -Wall -static -I "$REPO/guest-driver/include" -o "$OUT/shadow-c" "$HERE/shadow-c.c" \
        "$REPO/target/x86_64-unknown-linux-gnu/release/libpviommu_guest.a" -lpthread -ldl -lm \
        2> "$OUT/shadow-c-build.log" || { cat "$OUT/shadow-c-build.log"; exit 1; }
    cp "$OUT/shadow-c" "$R/bin/"
fi
install -m 755 "$HERE/init.sh" "$R/init"

# Toolstack + the domUs of the EPERM, fuzz and device-model checks (skipped if
# NO_DOMU=1). xen-utils is extracted, not installed; libraries come from
# the host (libxen-dev pulls them in) through each binary's ldd closure.
# With PVIOMMU_XEN_TOOLS, the binaries and Xen's own libraries come from
# that tree (same paths in dom0: libxl runs its helpers from where it was
# configured to find them), the other libraries from the host.
if [ "${NO_DOMU:-0}" != 1 ]; then
    if [ -n "$XT" ]; then
        XU="$XT"
        BINS="usr/sbin/xl usr/sbin/xenstored usr/sbin/xenconsoled usr/lib/xen/bin/xen-init-dom0 usr/lib/xen/bin/libxl-save-helper"
    else
        XU="$BUILD/debs/xenutils"
        if [ ! -x "$XU/usr/lib/xen-4.17/bin/xl" ]; then
            ( cd "$BUILD/debs" && apt-get download xen-utils-4.17 )
            dpkg-deb -x "$BUILD/debs"/xen-utils-4.17_*.deb "$XU"
        fi
        BINS=""
        for b in xl xenstored xen-init-dom0 xenconsoled libxl-save-helper; do BINS="$BINS usr/lib/xen-4.17/bin/$b"; done
    fi
    for b in $BINS; do
        mkdir -p "$R/$(dirname "$b")"; cp "$XU/$b" "$R/$b"
        ( [ -z "$XT" ] || export LD_LIBRARY_PATH="$XT/usr/lib"; ldd "$XU/$b" ) | awk '/=> \//{print $3} /^\t\/lib/{print $1}'
    done | sort -u > "$OUT/libs.txt"
    echo /lib/x86_64-linux-gnu/libgcc_s.so.1 >> "$OUT/libs.txt"
    while read -r l; do
        d="${l#"$XU"}"   # a library of the PVIOMMU_XEN_TOOLS tree goes to its installed path
        mkdir -p "$R$(dirname "$d")"; cp -L "$l" "$R$d"
    done < "$OUT/libs.txt"
    mkdir -p "$R/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
    for m in xen-gntdev xen-gntalloc xenfs; do
        cp "$(find "$KMOD" -name "$m.ko*" | head -1)" "$R/lib/modules/"
    done
    D="$OUT/domu-rootfs"
    rm -rf "$D"; mkdir -p "$D"/{bin,proc,sys,dev,lib/modules}
    cp /bin/busybox "$D/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$D/bin/$a"; done
    cp "$(find "$KMOD" -name xen-privcmd.ko | head -1)" "$D/lib/modules/"
    cp "$OUT/dom0-harness" "$D/bin/"
    install -m 755 "$HERE/domu-init.sh" "$D/init"
    mkdir -p "$R/domu"
    ( cd "$D" && find . | cpio -o -H newc --quiet | gzip -1 > "$R/domu/initrd.gz" )
    cp "$VMLINUZ" "$R/domu/vmlinuz"
fi
( cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 > "$OUT/initrd.gz" )

# ---- boot ----
# The watchdog and the stall retry are tests/lib/xen-qemu-boot.sh's, shared
# with the arm64 test.
# shellcheck source-path=SCRIPTDIR source=../lib/xen-qemu-boot.sh
. "$REPO/tests/lib/xen-qemu-boot.sh"
LOG="$OUT/serial.log"
N="${MEASURE_PAGES:-16384}"
TMO="${QEMU_TIMEOUT:-900}"
STALL="${BOOT_STALL_S:-150}"
START_LINE='=== pviommu dom0 test start ==='
END_LINE='=== pviommu dom0 test end ==='
END_GRACE_S=10
# A hang after the first test line: each CPU's registers and stack ('d'),
# dom0's vCPUs ('0'), the domains ('q') and the run queues ('r').
HANG_KEYS="${HANG_KEYS-d0qr}"

# AMD-Vi: Xen 4.17 sizes a PV domain's IOMMU tables by the host's RAM; with
# 2 GiB they have 3 levels (39 bits). With 1 GiB they have 2 (30 bits): the
# engine does not start (ENOSPC) and Xen crashes dom0 on its own identity
# maps of MMIO ("AMD-Vi: Error: invalid IO pagetable entry dfn = b0000").
IOMMU="${PVIOMMU_QEMU_IOMMU:-intel}"
case "$IOMMU" in
    intel) IOMMU_DEV=intel-iommu,intremap=on,caching-mode=on,snoop-control=on
           IOMMU_UP='Intel VT-d Queued Invalidation enabled' ;;
    amd)   IOMMU_DEV=amd-iommu,intremap=on
           IOMMU_UP='AMD-Vi: IOMMU 0 Enabled' ;;
    *) echo "run: PVIOMMU_QEMU_IOMMU must be intel or amd, not $IOMMU"; exit 1 ;;
esac
T3=$(date +%s)
qemu_boot qemu-system-x86_64 -accel tcg -machine q35,kernel-irqchip=split \
    -device "$IOMMU_DEV" \
    -m 2048 -smp 2 -nographic -serial stdio -monitor none -no-reboot \
    -kernel "$XEN" \
    -append "console=com1 com1=115200 dom0_mem=512M loglvl=all guest_loglvl=all iommu=1,verbose dom0-iommu=strict noreboot ${XEN_EXTRA_ARGS:-}" \
    -initrd "$VMLINUZ console=hvc0 earlyprintk=xen pviommu_measure=$N pviommu_fuzz=${FUZZ_CALLS:-100000} pviommu_big=${BIG_PAGES:-65536} pviommu_iommu=$IOMMU,$OUT/initrd.gz" \
    -device edu,dma_mask=0xffffffffffffffff,addr=06.0 \
    -device edu,dma_mask=0xffffffffffffffff,addr=07.0 ${QEMU_EXTRA:-}
T4=$(date +%s)

tr -d '\r' < "$LOG" > "$OUT/serial.clean.log"
grep -aE '^(PASS|FAIL|SKIP|MEASURE) ' "$OUT/serial.clean.log" || true
grep -aE 'pviommu|VT-D\]DMAR:\[' "$OUT/serial.clean.log" | grep -v '^ *+' | head -20 > "$OUT/xen-pviommu-lines.log" || true
passed=$(grep -acE '^PASS ' "$OUT/serial.clean.log" || true)
failed=$(grep -acE '^FAIL ' "$OUT/serial.clean.log" || true)
S=$(grep -acE '^SKIP ' "$OUT/serial.clean.log" || true)
# The IOMMU asked for is the one Xen drove, and the engine started on it.
if grep -aqF "$IOMMU_UP" "$OUT/serial.clean.log" &&
   grep -aqE '^\(XEN\) pviommu: hypercall 43 ready: .* address bits' "$OUT/serial.clean.log"; then
    pass "iommu_${IOMMU}_up_engine_ready"
else
    fail "iommu_${IOMMU}_up_engine_ready (no \"$IOMMU_UP\" or no pviommu ready line in $LOG)"
fi
# (A timeout is a failure even if the end line came while the hang keys'
# dump ran.)
if ! grep -aqF "$END_LINE" "$OUT/serial.clean.log" || [ "$verdict" = timeout ]; then
    fail "test_completed (${verdict:-qemu exited early}; see $LOG)"
fi
[ -n "$verdict" ] && echo "run: watchdog: $verdict"
echo "run: timing: xen build $((T2-T1)) s, qemu boot+test $((T4-T3)) s, total $((T4-T0)) s; log $LOG"
[ "$S" -gt 0 ] && echo "run: $S check(s) skipped (SKIP lines above say why)"
results_summary
