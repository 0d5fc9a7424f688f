#!/bin/sh
# /init of the PVH domU started by the dom0 test. Phase 1: unrelated to every
# domain, everything it asks PV-IOMMU must be refused. Phase 2: after dom0 has
# made it a device model (xenstore data/pviommu = "T TG S SG X XG"), it maps
# its target T's page, the page of S (whose target it is) and of X (unrelated).
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/xen-privcmd.ko unrestricted=1
H=/bin/dom0-harness
FUZZ=$(sed -n 's/.*pviommu_fuzz=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "DOMU version $($H hc version)"
echo "DOMU caps $($H hc caps)"
echo "DOMU map $($H hc map 0 0x1000 1)"
# refused-only fuzzing (-u): any success is a violation
$H fuzz ${FUZZ:-100000} 2 -u 0 1 2 3 | sed 's/^/DOMU fuzz-out /'
echo "DOMU phase1 done"
v=$($H xs-wait data/pviommu 120)
echo "DOMU phase2 $v"
set -- $v
if [ $# = 6 ]; then
    o=$($H hc map $1 $2 3)
    echo "DOMU dm-map $o"
    b=$(echo "$o" | sed -n 's/.* status=0 bfn=\([^ ]*\).*/\1/p')
    [ -n "$b" ] && echo "DOMU dm-unmap $($H hc unmap $b)"
    echo "DOMU target-map $($H hc map $3 $4 3)"
    echo "DOMU unrelated-map $($H hc map $5 $6 3)"
    echo "DOMU dm-caps $($H hc caps)"
fi
echo "DOMU done"
poweroff -f
