#!/bin/bash
# boot-qemu-arm64.sh -- boot a Xen arm64 hypervisor with a Debian arm64 dom0
# (busybox initramfs) in QEMU (TCG), virt machine with GICv3, EL2 and the
# SMMUv3, an `edu` PCIe device; dom0's kernel and initramfs are loaded with
# QEMU's guest-loader device. dom0's init prints what it sees of PCI and the
# IOMMU, then powers off. The serial log goes to $BUILD/logs/boot-$NAME.log.
#
#   boot-qemu-arm64.sh [XEN_IMAGE]   default: $BUILD/xen-4.20-tree/xen/xen
#
#   NAME            log name (default: xen420)
#   QEMU            qemu-system-aarch64 binary (default: QEMU 10 from
#                   bookworm-backports unpacked by fetch-xen-4.20.sh under
#                   $BUILD/qemu10, else the one in PATH). Debian 12's QEMU 7.2
#                   has a stage-1-only SMMUv3: Xen then logs "no stage-2
#                   translation support!" and runs with the IOMMU disabled.
#   SMMU_STAGE      SMMUv3 stage passed as -global arm-smmuv3.stage=... when
#                   the QEMU has that property (>= 8.1; default 2, the only
#                   stage Xen's SMMUv3 driver uses)
#   QEMU_EXTRA      extra QEMU arguments
#   PCI_PT          1: add pci-passthrough=on to Xen's command line. On 4.20
#                   (and up to master at 2026-08) Xen then hides the ECAM from
#                   dom0 but has no vPCI on Arm: dom0 oopses on its first
#                   config read. Default 0.
#   XEN_ARGS        Xen command line (default below)
#   DOM0_ARGS       dom0 kernel command line (default below)
#   QEMU_TIMEOUT    seconds before QEMU is killed (default 600)
#   DOM0_TEST       a static arm64 program put in the initramfs as
#                   /bin/dom0-test and run by /init (with DOM0_TEST_ARGS)
#                   right after the Xen modules are loaded
#   DOM0_PROBES     0: skip the PCI listing, edu DMA and dmesg part of /init
#                   (default 1)
#
# Prints "ARM64-BOOT: dom0 init running" when dom0's /init starts, and
# "ARM64-BOOT: result ..." at the end. Exit status 0 iff dom0's init ran.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
XEN="${1:-$BUILD/xen-4.20-tree/xen/xen}"
NAME="${NAME:-xen420}"
if [ -z "${QEMU:-}" ]; then
    QEMU=qemu-system-aarch64
    [ -x "$BUILD/qemu10/usr/bin/qemu-system-aarch64" ] && QEMU="$BUILD/qemu10/usr/bin/qemu-system-aarch64"
fi
SMMU_ARGS=""
if "$QEMU" -device arm-smmuv3,help 2>/dev/null | grep -q '^ *stage='; then
    SMMU_ARGS="-global arm-smmuv3.stage=${SMMU_STAGE:-2}"
else
    echo "boot-qemu-arm64: $QEMU has a stage-1-only SMMUv3 (no stage property)" >&2
fi
TIMEOUT="${QEMU_TIMEOUT:-600}"
LOGDIR="$BUILD/logs"; mkdir -p "$LOGDIR"
LOG="$LOGDIR/boot-$NAME.log"
D0="$BUILD/dom0-arm64"
[ -f "$D0/.fetched" ] || "$HERE/fetch-xen-4.20.sh"
[ -f "$XEN" ] || { echo "boot-qemu-arm64: no Xen image $XEN (run build-xen-arm64.sh)" >&2; exit 1; }
KERNEL="$(ls "$D0"/kernel/boot/vmlinuz-* | head -1)"
KVER="$(basename "$KERNEL" | sed 's/^vmlinuz-//')"
KMOD="$D0/kernel/usr/lib/modules/$KVER"
[ -d "$KMOD" ] || KMOD="$D0/kernel/lib/modules/$KVER"

XEN_ARGS="${XEN_ARGS:-dom0_mem=512M console=dtuart dtuart=/pl011@9000000 loglvl=all guest_loglvl=all iommu=yes noreboot}"
[ "${PCI_PT:-0}" = 1 ] && XEN_ARGS="$XEN_ARGS pci-passthrough=on"
DOM0_ARGS="${DOM0_ARGS:-console=hvc0 earlycon=xen earlyprintk=xen rdinit=/init loglevel=8}"

# ---- initramfs: static arm64 busybox, a few Xen modules, /init ----
R="$BUILD/dom0-arm64/initramfs"
rm -rf "$R"; mkdir -p "$R"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$(find "$D0/busybox" -path '*bin/busybox' | head -1)" "$R/bin/busybox"
for m in xen-privcmd xen-evtchn xen-gntdev xenfs; do
    f="$(find "$KMOD" -name "$m.ko*" | head -1)"
    [ -n "$f" ] && cp "$f" "$R/lib/modules/"
done
# the edu DMA test program (needs libc6-dev-arm64-cross for a static link)
if aarch64-linux-gnu-gcc -O2 -Wall -static -o "$R/bin/edu-dma" "$HERE/edu-dma-arm64.c"; then :
else echo "boot-qemu-arm64: edu-dma not built (apt-get install libc6-dev-arm64-cross)" >&2; fi
if [ -n "${DOM0_TEST:-}" ]; then cp "$DOM0_TEST" "$R/bin/dom0-test"; fi
printf 'DOM0_TEST_ARGS="%s"\nDOM0_PROBES=%s\n' "${DOM0_TEST_ARGS:-}" "${DOM0_PROBES:-1}" > "$R/init.conf"
cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || [ -e /bin/$a ] || /bin/busybox ln -s busybox /bin/$a
done
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
echo "ARM64-BOOT: dom0 init running"
echo "ARM64-BOOT: uname $(uname -a)"
for m in /lib/modules/*.ko*; do
    case "$m" in *.xz) xz -dc "$m" > /tmp/m.ko && insmod /tmp/m.ko ;; *) insmod "$m" ;; esac \
        && echo "ARM64-BOOT: insmod $(basename $m) ok" || echo "ARM64-BOOT: insmod $(basename $m) failed"
done
. /init.conf
if [ -x /bin/dom0-test ]; then
    echo "ARM64-BOOT: running dom0-test $DOM0_TEST_ARGS"
    /bin/dom0-test $DOM0_TEST_ARGS 2>&1
    echo "ARM64-BOOT: dom0-test exit $?"
fi
if [ "$DOM0_PROBES" = 1 ]; then
echo "ARM64-BOOT: pci devices:"
n=0
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    n=$((n+1))
    grp=""; [ -e "$d/iommu_group" ] && grp="iommu_group=$(basename $(readlink $d/iommu_group))"
    drv=""; [ -e "$d/driver" ] && drv="driver=$(basename $(readlink $d/driver))"
    echo "ARM64-BOOT: pci $(basename $d) $(cat $d/vendor):$(cat $d/device) class=$(cat $d/class) $grp $drv"
done
echo "ARM64-BOOT: $n pci devices"
echo "ARM64-BOOT: /sys/class/iommu: $(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')"
echo "ARM64-BOOT: /dev/xen: $(ls /dev/xen 2>/dev/null | tr '\n' ' ')"
if [ -x /bin/edu-dma ]; then
    echo "ARM64-BOOT: running edu-dma"
    /bin/edu-dma 2>&1 | sed 's/^/ARM64-BOOT: /'
else
    # edu DMA probe: enable bus mastering, start one RAM -> edu DMA (8 bytes
    # from dom0's first RAM page; dom0 is 1:1 mapped, so its guest physical
    # address is the bus address an identity/bypass SMMU would use). Whether
    # the data arrives cannot be read back without /dev/mem access to RAM; the
    # decisive output is Xen's log (an SMMUv3 event means Xen's SMMU is in the
    # path and refused it).
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x11e8" ] || continue
        bar=$(head -1 $d/resource | cut -d' ' -f1)
        printf '\007\001' | dd of=$d/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null
        echo "ARM64-BOOT: edu $(basename $d) bar0=$bar ident=$(devmem $((bar)) 32) cmd=$(dd if=$d/config bs=1 skip=4 count=2 2>/dev/null | od -An -tx2 | tr -d ' ')"
        src=$(awk '/System RAM/ {split($1,a,"-"); print "0x" a[1]; exit}' /proc/iomem)
        devmem $((bar + 0x80)) 64 $((src + 0x1000)); devmem $((bar + 0x88)) 64 0x40000
        devmem $((bar + 0x90)) 64 8; devmem $((bar + 0x98)) 64 1
        sleep 1
        echo "ARM64-BOOT: edu DMA RAM($((src + 0x1000)))->edu started, status=$(devmem $((bar + 0x98)) 32) (bit0 clear = done)"
        # control: a bus address outside dom0's RAM (dom0 has 0x60000000-0x7fffffff
        # with dom0_mem=512M); a translating SMMU must fault it
        echo "ARM64-BOOT: edu DMA from 0xb0000000 (not dom0's) starting"
        devmem $((bar + 0x80)) 64 0xb0000000; devmem $((bar + 0x88)) 64 0x40000
        devmem $((bar + 0x90)) 64 8; devmem $((bar + 0x98)) 64 1
        sleep 1
        echo "ARM64-BOOT: edu DMA from 0xb0000000 status=$(devmem $((bar + 0x98)) 32)"
    done
fi
echo "ARM64-BOOT: dom0 dmesg (iommu/smmu/pci/xen lines):"
dmesg | grep -i -E 'iommu|smmu|pci|xen|arm-smmu' | sed 's/^/ARM64-BOOT: dmesg: /'
fi
echo "ARM64-BOOT: dom0 init done"
poweroff -f
INIT
chmod +x "$R/init"
( cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 > "$BUILD/dom0-arm64/initrd.gz" )

# ---- QEMU ----
# RAM starts at 0x40000000; Xen (an arm64 Image) is loaded at 0x40200000.
# With no -initrd, QEMU puts the DTB at RAM base + min(RAM/2, 128 MiB) =
# 0x48000000: a guest-loader module there overlaps the DTB, and Xen silently
# drops it ("Missing kernel boot module?", seen with the kernel at 0x48000000).
# The dom0 kernel (uncompressed Image, ~38 MiB) and its initramfs go above.
echo "boot-qemu-arm64: Xen $XEN; dom0 kernel $KVER; $("$QEMU" --version | head -1); log $LOG"
cmd=( nice -n 19 "$QEMU" -machine virt,virtualization=on,gic-version=3,iommu=smmuv3
      -cpu cortex-a57 -smp 2 -m 2G -accel tcg
      -nographic -serial mon:stdio -monitor none -no-reboot
      -kernel "$XEN" -append "$XEN_ARGS"
      -device "guest-loader,addr=0x50000000,kernel=$KERNEL,bootargs=$DOM0_ARGS"
      -device "guest-loader,addr=0x5c000000,initrd=$BUILD/dom0-arm64/initrd.gz"
      -device edu,dma_mask=0xffffffffffffffff -nic none
      $SMMU_ARGS ${QEMU_EXTRA:-} )
printf '%q ' "${cmd[@]}" > "$LOGDIR/boot-$NAME.cmd"; echo >> "$LOGDIR/boot-$NAME.cmd"
start=$(date +%s)
: > "$LOG"
"${cmd[@]}" < /dev/null > "$LOG" 2>&1 &
qpid=$!
result="timeout after ${TIMEOUT}s"
while kill -0 "$qpid" 2>/dev/null; do
    sleep 2
    now=$(date +%s)
    if grep -q 'ARM64-BOOT: dom0 init done' "$LOG"; then result="dom0 init done"; sleep 5; fi
    if grep -qE 'Kernel panic|Panic on CPU|\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*\*' "$LOG"; then
        result="panic"; sleep 3; kill "$qpid" 2>/dev/null || true; break
    fi
    if [ "$result" = "dom0 init done" ]; then kill "$qpid" 2>/dev/null || true; break; fi
    if [ $((now - start)) -ge "$TIMEOUT" ]; then kill "$qpid" 2>/dev/null || true; break; fi
done
wait "$qpid" 2>/dev/null || true
grep -q 'ARM64-BOOT: dom0 init done' "$LOG" && result="dom0 init done"
end=$(date +%s)
grep -a 'ARM64-BOOT: dom0 init running' "$LOG" | head -1 || true
echo "ARM64-BOOT: result $result after $((end - start)) s (log $LOG)"
grep -aq 'ARM64-BOOT: dom0 init running' "$LOG"
