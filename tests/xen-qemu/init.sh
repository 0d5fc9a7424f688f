#!/bin/sh
# /init of the dom0 initramfs for tests/xen-qemu/run.sh: runs the PV-IOMMU
# checks with dom0-harness and prints PASS/FAIL/MEASURE lines.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
H=/bin/dom0-harness
pass=0; fail=0
ok() { echo "PASS $1"; pass=$((pass+1)); }
ko() { echo "FAIL $1 $2"; fail=$((fail+1)); }
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
# errno_is OUTPUT EXPECTED: the hypercall or the op status carries EXPECTED
errno_is() { [ "$(field "$1" rc)" = "$2" ] || [ "$(field "$1" status)" = "$2" ]; }
run() { out=$("$@" 2>&1); echo "+ ${*#/bin/} -> $out" | sed 's/^/  /' >&2; echo "$out"; }

echo "=== pviommu dom0 test start ==="
[ -c /dev/xen/privcmd ] || echo "no /dev/xen/privcmd"

# 1) caps
out=$(run $H caps); if [ $? = 0 ]; then ok caps_version_window; else ko caps_version_window "$out"; fi
run $H hc regions >/dev/null

# 2) map + DMA read/write
mk=$(run $H mkdom 4)
D=$(echo "$mk" | sed -n 's/^domid=//p')
G=$(echo "$mk" | sed -n 's/^gfns=//p' | tr ',' ' ')
set -- $G; G0=$1; G1=$2; G2=$3; G3=$4
echo "domain $D gfns $G"
o=$(run $H hc map $D $G0 3); B0=$(field "$o" bfn)
o1=$(run $H hc map $D $G1 1); B1=$(field "$o1" bfn)
if [ "$(field "$o" rc)" = 0 ] && [ "$(field "$o1" rc)" = 0 ]; then ok map_rc; else ko map_rc "$o / $o1"; fi
A0=$(printf '0x%x' $((B0 << 12))); A1=$(printf '0x%x' $((B1 << 12)))
p=$(run $H peek $D $G0); r=$(run $H dma-read $A0)
if [ "$(field "$r" sum)" = "$(field "$p" sum)" ] && [ "$(field "$r" zero)" = 0 ]; then ok dma_read_foreign_bytes; else ko dma_read_foreign_bytes "$r vs $p"; fi
# The pviommu tool itself, --backend xen: caps, map, device read, lookup, unmap.
o=$(run pviommu --backend xen caps --json)
if echo "$o" | grep -q '"version": 65536'; then ok cli_caps; else ko cli_caps "$o"; fi
o=$(run pviommu --backend xen map --domid $D --gfn $G3 --read-only --json)
BC=$(echo "$o" | sed -n 's/.*"bfn": \([0-9]*\).*/\1/p' | head -1)
if [ -n "$BC" ]; then
    AC=$(printf '0x%x' $((BC << 12)))
    p=$(run $H peek $D $G3); r=$(run $H dma-read $AC)
    l=$(run pviommu --backend xen lookup --bfn $BC)
    if [ "$(field "$r" sum)" = "$(field "$p" sum)" ] && echo "$l" | grep -q "^d$D "; then ok cli_map_dma_lookup; else ko cli_map_dma_lookup "$r vs $p / $l"; fi
    o=$(run pviommu --backend xen unmap --bfn $BC)
    if [ $? = 0 ]; then ok cli_unmap; else ko cli_unmap "$o"; fi
else
    ko cli_map_dma_lookup "$o"; ko cli_unmap "no bfn"
fi
o=$(run $H hc lookup $B0)
if [ "$(field "$o" rc)" = 0 ] && [ "$(field "$o" domid)" = "$D" ] && [ $(($(field "$o" gfn))) = $(($G0)) ]; then ok lookup; else ko lookup "$o"; fi
run $H dma-write $A0 0xc3 >/dev/null
p=$(run $H peek $D $G0)
case "$(field "$p" bytes)" in c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3) ok dma_write_lands;; *) ko dma_write_lands "$p";; esac
p=$(run $H peek $D $G1); r=$(run $H dma-read $A1)
if [ "$(field "$r" sum)" = "$(field "$p" sum)" ]; then ok ro_dma_read; else ko ro_dma_read "$r vs $p"; fi
run $H dma-write $A1 0x3c >/dev/null
p=$(run $H match $D $G1)
case "$p" in *pattern=intact*) ok ro_refuses_device_write;; *) ko ro_refuses_device_write "$p";; esac

# 3) unmap revokes
o=$(run $H hc unmap $B0)
r=$(run $H dma-read $A0)
if [ "$(field "$o" rc)" = 0 ] && [ "$(field "$r" zero)" = 1 ]; then ok unmap_revokes_dma; else ko unmap_revokes_dma "$o / $r"; fi

# 4) errors
o=$(run $H hc unmap $B0); if errno_is "$o" -2; then ok unmap_unmapped_enoent; else ko unmap_unmapped_enoent "$o"; fi
o=$(run $H hc raw 9 0 $D $G0 0 0 0); if errno_is "$o" -95; then ok unknown_subop_eopnotsupp; else ko unknown_subop_eopnotsupp "$o"; fi
o=$(run $H hc raw 1 1 $D $G0 0 1 0); if errno_is "$o" -22; then ok nonzero_padding_einval; else ko nonzero_padding_einval "$o"; fi
o=$(run $H hc raw 1 1 $D $G0 0 0 1); if errno_is "$o" -22; then ok nonzero_reserved_einval; else ko nonzero_reserved_einval "$o"; fi
o=$(run $H hc map 4000 $G0 1); if errno_is "$o" -3; then ok unknown_domid_esrch; else ko unknown_domid_esrch "$o"; fi
o=$(run $H hc cmd 99); if errno_is "$o" -95; then ok unknown_cmd_eopnotsupp; else ko unknown_cmd_eopnotsupp "$o"; fi

# 5) destroying the foreign domain revokes its BFNs and frees it
o=$(run $H hc map $D $G2 3); B2=$(field "$o" bfn); A2=$(printf '0x%x' $((B2 << 12)))
o3=$(run $H hc map $D $G3 1)
r=$(run $H dma-read $A2)
[ "$(field "$r" zero)" = 0 ] || echo "note: pre-destroy read of B2 returned zeros"
# 5a) removing a gfn from the foreign domain's p2m revokes its BFN
B3=$(field "$o3" bfn); A3=$(printf '0x%x' $((B3 << 12)))
r0=$(run $H dma-read $A3)
u=$(run $H unpopulate $D $G3)
r=$(run $H dma-read $A3)
o=$(run $H hc lookup $B3)
if [ "$(field "$r0" zero)" = 0 ] && [ "$(field "$u" rc)" = 0 ] && [ "$(field "$r" zero)" = 1 ] && errno_is "$o" -2; then
    ok gfn_removed_revokes_bfn; else ko gfn_removed_revokes_bfn "$r0 / $u / $r / $o"; fi
o=$(run $H destroy $D)
case "$o" in *gone*) ok destroy_frees_domain;; *) ko destroy_frees_domain "$o";; esac
r=$(run $H dma-read $A2)
if [ "$(field "$r" zero)" = 1 ]; then ok destroy_revokes_bfn; else ko destroy_revokes_bfn "$r"; fi
o=$(run $H hc lookup $B2); if errno_is "$o" -2; then ok destroy_lookup_enoent; else ko destroy_lookup_enoent "$o"; fi

# measurements
N=$(sed -n 's/.*pviommu_measure=\([0-9]*\).*/\1/p' /proc/cmdline); N=${N:-16384}
$H measure $N 2>&1
run $H hc caps >/dev/null

# 6) EPERM for an unprivileged caller: a PV domU (privcmd unrestricted=1)
if [ -x /usr/lib/xen-4.17/bin/xl ]; then
    export PATH=$PATH:/usr/lib/xen-4.17/bin
    mkdir -p /dev/pts /run /var/run /proc/xen
    mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /var/run
    mount -t xenfs xenfs /proc/xen
    mkdir -p /var/run/xen /var/lib/xen /var/log/xen/console /etc/xen; touch /etc/xen/xl.conf
    xenstored --pid-file /var/run/xen/xenstored.pid
    xen-init-dom0 >/dev/null 2>&1
    xenconsoled --pid-file=/var/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
    cat > /tmp/domu.cfg <<EOC
name = "unpriv"
type = "pv"
kernel = "/domu/vmlinuz"
ramdisk = "/domu/initrd.gz"
extra = "console=hvc0 quiet"
memory = 256
on_poweroff = "destroy"
on_crash = "destroy"
EOC
    xl create /tmp/domu.cfg 2>&1 | tail -2
    i=0
    while xl list unpriv >/dev/null 2>&1 && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
    sleep 1
    L=/var/log/xen/console/guest-unpriv.log
    grep DOMU $L 2>/dev/null | sed 's/^/  domU: /'
    v=$(sed -n 's/.*DOMU version rc=\([-0-9]*\).*/\1/p' $L 2>/dev/null | head -1)
    m=$(grep 'DOMU map' $L 2>/dev/null | head -1)
    if [ -z "$v" ]; then ko eperm_unprivileged "no domU output (waited ${i}s)"
    elif [ "$v" -le 0 ]; then ko eperm_unprivileged "xen_version from domU rc=$v: Linux privcmd refused, Xen not reached"
    elif errno_is "${m#*DOMU map }" -1; then ok eperm_unprivileged
    else ko eperm_unprivileged "$m"; fi
fi

echo "$pass passed, $fail failed"
echo "=== pviommu dom0 test end ==="
sync
poweroff -f
