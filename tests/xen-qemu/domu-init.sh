#!/bin/sh
# /init of the two domUs the dom0 test starts (pviommu_role= on the kernel
# command line). xenstore data/pviommu carries dom0's domids once it has set
# up the device-model relation (xc_domain_set_target).
#   dm:     PV with an IOMMU context. Phase 1, unrelated to every domain:
#           xen_version works, query_caps, a map and a fuzz run are refused.
#           Phase 2, device model of T: maps T's page (then unmaps it) and an
#           unrelated domain X's page; then, as the driver domain of the PCI
#           device DEV dom0 assigned to it, creates a context, attaches DEV
#           and maps T's page there, and powers off without undoing any of
#           it (its death must). data/pviommu = "T TG X XG DEV".
#   target: PVH; dom0 makes a PV domain S its device model. Maps S's page
#           (a target must not map its device model's pages) and X's.
#           data/pviommu = "S SG X XG".
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/xen-privcmd.ko unrestricted=1
H=/bin/dom0-harness
ROLE=$(sed -n 's/.*pviommu_role=\([a-z]*\).*/\1/p' /proc/cmdline)
FUZZ=$(sed -n 's/.*pviommu_fuzz=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "DOMU role $ROLE"
echo "DOMU version $($H hc version)"
if [ "$ROLE" = dm ]; then
    echo "DOMU caps $($H hc caps)"
    echo "DOMU map $($H hc map 0 0x1000 1)"
    # refused-only fuzzing (-u): any success is a violation
    $H fuzz ${FUZZ:-100000} 2 -u 0 1 2 3 | sed 's/^/DOMU fuzz-out /'
    echo "DOMU phase1 done"
    v=$($H xs-wait data/pviommu 600)
    echo "DOMU phase2 $v"
    set -- $v
    if [ $# -ge 4 ]; then
        o=$($H hc map $1 $2 3)
        echo "DOMU dm-map $o"
        b=$(echo "$o" | sed -n 's/.* status=0 bfn=\([^ ]*\).*/\1/p')
        [ -n "$b" ] && echo "DOMU dm-unmap $($H hc unmap $b)"
        echo "DOMU unrelated-map $($H hc map $3 $4 3)"
        echo "DOMU dm-caps $($H hc caps)"
    fi
    if [ $# -ge 5 ]; then
        o=$($H hc ctx-create); echo "DOMU ctx-create $o"
        c=$(echo "$o" | sed -n 's/.* context=\([0-9]*\).*/\1/p')
        echo "DOMU ctx-attach $($H hc attach ${c:-0} $5)"
        echo "DOMU ctx-map $($H hc map $1 $2 1 ${c:-0})"
    fi
else
    v=$($H xs-wait data/pviommu 600)
    echo "DOMU phase2 $v"
    set -- $v
    if [ $# = 4 ]; then
        echo "DOMU target-map $($H hc map $1 $2 3)"
        echo "DOMU target-unrelated-map $($H hc map $3 $4 3)"
        echo "DOMU target-caps $($H hc caps)"
    fi
fi
echo "DOMU done"
poweroff -f
