#!/bin/sh
# /init of the unprivileged PV domU started by the dom0 test (EPERM check).
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/xen-privcmd.ko unrestricted=1
H=/bin/dom0-harness
echo "DOMU version $($H hc version)"
echo "DOMU caps $($H hc caps)"
echo "DOMU map $($H hc map 0 0x1000 1)"
echo "DOMU done"
poweroff -f
