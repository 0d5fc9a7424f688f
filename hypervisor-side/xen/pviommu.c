/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu.c -- PV-IOMMU, hypercall 43 (__HYPERVISOR_pv_iommu_op): Xen's side.
 *
 * Installed as xen/common/pviommu.c by hypervisor-side/xen/build-xen.sh
 * (CONFIG_PV_IOMMU, patches/). Policy, the BFN table and revocation live in
 * the Rust engine (rust_engine.o, entry points pviommu_engine_*); this file is
 * the glue: the hypercall entry, the hooks Xen calls when a domain dies or a
 * p2m changes, the driver locks, and the pvx_* primitives of
 * pviommu_engine.h, each a thin wrapper over a Xen primitive. The
 * table-frame primitives (pvx_table_*) are pviommu-tables.inc, which the
 * Arm glue includes too.
 *
 * Locks (design/xen-integration.md):
 *
 *   target's p2m lock  ->  one pvx_driver_locks[]  ->  driver domain's IOMMU
 *   (hooks only)           (never two at once)        mapping_lock, page_alloc,
 *                                                     heap_lock
 *
 * No lock of this file is held across a guest copy, a p2m lookup
 * (pvx_get_page), an XSM check or a domain lookup: do_pv_iommu_op enters the
 * engine with nothing held and the engine takes a driver lock only around
 * that driver domain's state. A hook entered with a p2m lock held can
 * therefore always take a driver lock.
 *
 * pvx_* functions are called directly from Rust (never through a pointer),
 * so none needs cf_check; the hooks are called directly from Xen.
 */
#include <xen/init.h>
#include <xen/lib.h>
#include <xen/param.h>
#include <xen/sched.h>
#include <xen/spinlock.h>
#include <xen/event.h>
#include <xen/guest_access.h>
#include <xen/hypercall.h>
#include <xen/iommu.h>
#include <xen/mm.h>
#include <xen/paging.h>
#include <xen/pci.h>
#include <xen/pci_regs.h>
#include <xen/pviommu.h>
#include <xen/random.h>
#include <xsm/xsm.h>
#include <asm/e820.h>
#include <asm/p2m.h>
#include <asm/hvm/hvm.h>
#include <public/pv-iommu.h>

#include "pviommu_engine.h"

/* Xen's public header and the engine boundary agree with abi/include/pviommu.h. */
static void __init pviommu_build_checks(void)
{
    BUILD_BUG_ON(sizeof(struct pv_iommu_caps) != 80);
    BUILD_BUG_ON(offsetof(struct pv_iommu_caps, page_sizes) != 8);
    BUILD_BUG_ON(offsetof(struct pv_iommu_caps, nr_reserved_regions) != 32);
    BUILD_BUG_ON(offsetof(struct pv_iommu_caps, translation) != 44);
    BUILD_BUG_ON(offsetof(struct pv_iommu_caps, quota) != 48);
    BUILD_BUG_ON(offsetof(struct pv_iommu_caps, revoked) != 64);
    BUILD_BUG_ON(sizeof(struct pv_iommu_op) != 40);
    BUILD_BUG_ON(offsetof(struct pv_iommu_op, status) != 4);
    BUILD_BUG_ON(offsetof(struct pv_iommu_op, context) != 8);
    BUILD_BUG_ON(offsetof(struct pv_iommu_op, domid) != 12);
    BUILD_BUG_ON(offsetof(struct pv_iommu_op, gfn) != 16);
    BUILD_BUG_ON(offsetof(struct pv_iommu_op, bfn) != 24);
    BUILD_BUG_ON(sizeof(struct pv_iommu_batch) != 24);
    BUILD_BUG_ON(offsetof(struct pv_iommu_batch, ops) != 16);
    BUILD_BUG_ON(sizeof(struct pv_iommu_region) != 24);
    BUILD_BUG_ON(offsetof(struct pv_iommu_region, kind) != 16);
    BUILD_BUG_ON(sizeof(struct pv_iommu_regions) != 24);
    BUILD_BUG_ON(sizeof(struct pv_iommu_limits) != 16);
    BUILD_BUG_ON(offsetof(struct pv_iommu_limits, domid) != 4);
    BUILD_BUG_ON(offsetof(struct pv_iommu_limits, quota) != 8);
    BUILD_BUG_ON(offsetof(struct pv_iommu_regions, regions) != 16);
    BUILD_BUG_ON(sizeof(struct pv_iommu_stats) != 152);
    BUILD_BUG_ON(offsetof(struct pv_iommu_stats, live) != 8);
    BUILD_BUG_ON(offsetof(struct pv_iommu_stats, ns_batches) != 96);
    BUILD_BUG_ON(offsetof(struct pv_iommu_stats, heap_bytes) != 144);
    BUILD_BUG_ON(sizeof(struct pv_iommu_entry) != 32);
    BUILD_BUG_ON(offsetof(struct pv_iommu_entry, bfn) != 16);
    BUILD_BUG_ON(offsetof(struct pv_iommu_entry, bits) != 24);

    BUILD_BUG_ON(PVIOMMU_ENGINE_PREEMPTED != PVIOMMU_BATCH_INCOMPLETE);
    BUILD_BUG_ON(PVIOMMU_GFN_REMOVED != PV_IOMMU_GFN_REMOVED);
    BUILD_BUG_ON(PVIOMMU_GFN_WRITE_LOST != PV_IOMMU_GFN_WRITE_LOST);
    BUILD_BUG_ON(PVX_XSM_QUERY != PV_IOMMU_XSM_QUERY);
    BUILD_BUG_ON(PVX_XSM_MAP != PV_IOMMU_XSM_MAP);
    BUILD_BUG_ON(PVX_XSM_MANAGE != PV_IOMMU_XSM_MANAGE);
    BUILD_BUG_ON(sizeof(struct pvx_domain_info) != 16);
}

/*
 * iommu_hwdom_strict is __hwdom_initdata: gone once init memory is freed.
 * Snapshot it at our initcall. The only later change Xen makes is
 * check_hwdom_reqs() forcing strict mode on a translated (PVH) hardware
 * domain, which pvx_translation() accounts for below.
 */
static bool __ro_after_init pvx_hwdom_strict;

static bool __read_mostly pviommu_ready;

/* Teardown statistics (printk on completion; diagnostics only). */
static atomic_t pviommu_teardown_restarts = ATOMIC_INIT(0);

/* ---------------------------------------------------------------- */
/* Command line: pviommu=[off|on][,quota:<n>][,batch:<n>][,heap:<MiB>] */
/* ---------------------------------------------------------------- */

/* Upper bound of quota: BFNs per driver domain (the engine's memory per
 * driver domain is about 100 bytes per BFN). */
#define PVX_MAX_QUOTA (1ULL << 24)

static bool __initdata opt_pviommu = true;
static uint64_t __initdata opt_pviommu_quota;  /* 0: engine default */
static uint32_t __initdata opt_pviommu_batch;  /* 0: engine default */
/* Cap on the engine's heap, MiB: a map that would exceed it gets ENOMEM. */
#define PVX_DEFAULT_HEAP_MIB 256
static uint32_t __initdata opt_pviommu_heap_mib = PVX_DEFAULT_HEAP_MIB;

static int __init cf_check parse_pviommu(const char *s)
{
    const char *ss, *e;
    int val, rc = 0;

    do {
        ss = strchr(s, ',');
        if ( !ss )
            ss = strchr(s, '\0');

        if ( (val = parse_bool(s, ss)) >= 0 )
            opt_pviommu = val;
        else if ( !strncmp(s, "quota:", 6) )
        {
            unsigned long long q = simple_strtoull(s + 6, &e, 0);

            /*
             * No digits, trailing junk, 0, more than 16 Mi BFNs, or more
             * characters than any valid value has (16 Mi is 0x1000000):
             * simple_strtoull wraps silently, ten characters cannot.
             */
            if ( e == s + 6 || e != ss || !q || q > PVX_MAX_QUOTA ||
                 e - (s + 6) > 10 )
                rc = -EINVAL;
            else
                opt_pviommu_quota = q;
        }
        else if ( !strncmp(s, "heap:", 5) )
        {
            unsigned long long m = simple_strtoull(s + 5, &e, 0);

            /* MiB, 1 .. 64 Gi; at most 7 characters (0x10000), so no wrap */
            if ( e == s + 5 || e != ss || !m || m > (1U << 16) ||
                 e - (s + 5) > 7 )
                rc = -EINVAL;
            else
                opt_pviommu_heap_mib = m;
        }
        else if ( !strncmp(s, "batch:", 6) )
        {
            unsigned long long b = simple_strtoull(s + 6, &e, 0);

            if ( e == s + 6 || e != ss || !b || b > UINT32_MAX )
                rc = -EINVAL;
            else
                opt_pviommu_batch = b;
        }
        else
            rc = -EINVAL;

        s = ss + 1;
    } while ( *ss );

    return rc;
}
custom_param("pviommu", parse_pviommu);

/* ---------------------------------------------------------------- */
/* Hypercall                                                         */
/* ---------------------------------------------------------------- */

long do_pv_iommu_op(unsigned int cmd, XEN_GUEST_HANDLE_PARAM(void) arg)
{
    struct vcpu *curr = current;
    long rc;

    if ( !pviommu_ready )
        return -ENOSYS;

    /*
     * The interface carries 64-bit guest addresses and has no compat
     * translation: refuse 32-bit PV guests and HVM/PVH vCPUs not executing
     * in 64-bit mode (the hypercall table routes them here too) with an
     * errno of their own, ENOEXEC ("wrong execution format").
     */
    if ( is_pv_32bit_domain(curr->domain) ||
         (is_hvm_vcpu(curr) && hvm_guest_x86_mode(curr) != 8) )
        return -ENOEXEC;

    /* No lock held: the engine locks around its own state only. */
    rc = pviommu_engine_op(curr->domain->domain_id, cmd,
                           (uint64_t)(unsigned long)arg.p);

    /* Progress is already in the guest's batch header (nr_done). */
    if ( rc == PVIOMMU_ENGINE_PREEMPTED )
        rc = hypercall_create_continuation(__HYPERVISOR_pv_iommu_op, "ih",
                                           cmd, arg);

    return rc;
}

/* ---------------------------------------------------------------- */
/* Hooks (xen/pviommu.h)                                             */
/* ---------------------------------------------------------------- */

int pviommu_domain_teardown(struct domain *d)
{
    int rc;

    /*
     * domain_kill() re-runs its whole dying stage whenever a later step
     * (domain_relinquish_resources) restarts: once done, stay done.
     */
    if ( !pviommu_ready || d->pviommu_teardown == PVIOMMU_TEARDOWN_DONE )
        return 0;

    /*
     * Called under domctl_lock from domain_kill() with d dying: no new map
     * of d's pages can start (pvx_get_page refuses dying domains); maps in
     * flight see the engine's sequence number move and retry.
     */
    rc = pviommu_engine_domain_teardown(d->domain_id, &d->pviommu_teardown);
    d->pviommu_teardown_slices++;

    if ( rc == -ERESTART )
    {
        atomic_inc(&pviommu_teardown_restarts);
        return rc;
    }

    if ( rc )
    {
        /*
         * The engine promises 0 or -ERESTART. Anything else must not wedge
         * domain destruction; whatever it still references keeps d a
         * (visible) zombie rather than freeing pages a device may reach.
         */
        printk(XENLOG_ERR "pviommu: %pd teardown returned %d\n", d, rc);
        ASSERT_UNREACHABLE();
    }
    else if ( d->pviommu_teardown_slices > 1 )
        printk(XENLOG_INFO "pviommu: %pd torn down in %u slices\n",
               d, d->pviommu_teardown_slices);
    d->pviommu_teardown = PVIOMMU_TEARDOWN_DONE;

    return 0;
}

void pviommu_gfn_changed(struct domain *d, unsigned long gfn,
                         unsigned int order, unsigned int how)
{
    if ( !pviommu_ready || how == PV_IOMMU_GFN_UNCHANGED )
        return;

    /*
     * Pairs with the atomic increment at the start of pvx_get_page(): either
     * we see that count, or that map sees the change (p2m entry, or the page
     * no longer PGC_allocated) and refuses.
     */
    smp_mb();
    if ( !pviommu_domain_in_use(d) )
        return;

    pviommu_engine_gfn_changed(d->domain_id, gfn, order, how);
}

void pviommu_log_dirty_enabled(struct domain *d)
{
    unsigned long max_gfn;

    if ( !pviommu_ready )
        return;

    /* Pairs with pvx_get_page(): increment, then paging_mode_log_dirty(). */
    smp_mb();
    if ( !pviommu_domain_in_use(d) )
        return;

    /*
     * Every gfn the domain may have: its p2m's top for translated domains,
     * any machine frame (gfn == mfn) for PV. Gfns added later cannot have a
     * writable mapping: pvx_get_page refuses while log-dirty mode is on.
     */
    max_gfn = paging_mode_translate(d) ? domain_get_maximum_gpfn(d)
                                       : max_page - 1;
    pviommu_engine_gfn_changed(d->domain_id, 0, flsl(max_gfn),
                               PVIOMMU_GFN_WRITE_LOST);
}

void pviommu_device_leaving(struct domain *owner, const struct pci_dev *pdev)
{
    ASSERT(pcidevs_locked());
    if ( !pviommu_ready || !owner )
        return;
    pviommu_engine_device_leaving(owner->domain_id, pdev->sbdf.sbdf);
}

/* ---------------------------------------------------------------- */
/* Reserved BFN regions and limits (built once at boot)              */
/* ---------------------------------------------------------------- */

#define PVX_MAX_REGIONS 128

struct pvx_region {
    uint64_t start, nr;
    uint32_t kind;
};

static struct pvx_region __read_mostly pvx_regions[PVX_MAX_REGIONS];
static unsigned int __read_mostly pvx_nr_regions;
static uint64_t __read_mostly pvx_ram_end;
static unsigned int __read_mostly pvx_addr_bits;

static void __init pvx_widen(struct pvx_region *r, uint64_t start,
                             uint64_t end)
{
    end = max(end, r->start + r->nr);
    r->start = min(r->start, start);
    r->nr = end - r->start;
}

/* Record [start, start + nr) frames; merges same-kind overlaps. */
static void __init pvx_add_region(uint64_t start, uint64_t nr, uint32_t kind)
{
    unsigned int i;

    if ( !nr || start + nr < start )
        return;

    for ( i = 0; i < pvx_nr_regions; i++ )
    {
        struct pvx_region *r = &pvx_regions[i];

        if ( r->kind == kind && start <= r->start + r->nr &&
             r->start <= start + nr )
        {
            pvx_widen(r, start, start + nr);
            return;
        }
    }

    if ( pvx_nr_regions == PVX_MAX_REGIONS )
    {
        /* Table full: reserve more (the last region widened), never less. */
        printk(XENLOG_WARNING
               "pviommu: reserved-region table full, widening the last one\n");
        pvx_widen(&pvx_regions[PVX_MAX_REGIONS - 1], start, start + nr);
        return;
    }

    pvx_regions[pvx_nr_regions].start = start;
    pvx_regions[pvx_nr_regions].nr = nr;
    pvx_regions[pvx_nr_regions].kind = kind;
    pvx_nr_regions++;
}

static void __init pvx_add_range(uint64_t base, uint64_t size, uint32_t kind)
{
    if ( size && base + size > base )
        pvx_add_region(PFN_DOWN(base), PFN_UP(base + size) - PFN_DOWN(base),
                       kind);
}

/* RMRRs (VT-d) / IVMDs (AMD), through the vendor-neutral IOMMU op. */
static int __init cf_check pvx_rdm_region(xen_pfn_t start, xen_ulong_t nr,
                                          uint32_t id, void *ctxt)
{
    pvx_add_region(start, nr, PVIOMMU_REGION_RMRR);

    return 1; /* once per region, not once per device in its scope */
}

/*
 * A device's 64-bit memory BARs, a bridge's prefetchable window and an
 * SR-IOV PF's VF BARs: DMA to these addresses can be routed peer-to-peer
 * and never reach the IOMMU. (32-bit ones lie in the hole below 4 GiB,
 * reserved as a whole.)
 */
static int __init cf_check pvx_pdev_windows(struct pci_dev *pdev, void *arg)
{
    const pci_sbdf_t sbdf = pdev->sbdf;
    uint8_t type = pci_conf_read8(sbdf, PCI_HEADER_TYPE) & 0x7f;
    unsigned int i, nbars, pos;
    uint16_t cmd;

    /*
     * Xen's own devices (serial console, debug port): sizing a BAR would
     * cut Xen's console off for a moment; they do not do DMA for guests.
     */
    if ( pdev->domain == dom_xen )
        return 0;

    if ( type == PCI_HEADER_TYPE_BRIDGE )
    {
        uint16_t base = pci_conf_read16(sbdf, PCI_PREF_MEMORY_BASE);
        uint16_t limit = pci_conf_read16(sbdf, PCI_PREF_MEMORY_LIMIT);
        uint64_t b = (uint64_t)(base & PCI_PREF_RANGE_MASK) << 16;
        uint64_t l = ((uint64_t)(limit & PCI_PREF_RANGE_MASK) << 16) | 0xfffff;

        if ( (base & PCI_PREF_RANGE_TYPE_MASK) == PCI_PREF_RANGE_TYPE_64 )
        {
            b |= (uint64_t)pci_conf_read32(sbdf, PCI_PREF_BASE_UPPER32) << 32;
            l |= (uint64_t)pci_conf_read32(sbdf, PCI_PREF_LIMIT_UPPER32) << 32;
        }
        if ( l > b )
            pvx_add_range(b, l - b + 1, PVIOMMU_REGION_MMIO);
        /*
         * The window covers everything behind the bridge. Its own two BARs
         * are not sized: turning memory decode off on a bridge would cut
         * off every device behind it for a moment, Xen's console included.
         * A BAR is aligned to its size, so [addr, addr + lowest set bit)
         * covers it (perhaps more, never less).
         */
        if ( (pci_conf_read32(sbdf, PCI_BASE_ADDRESS_0) &
              (PCI_BASE_ADDRESS_SPACE | PCI_BASE_ADDRESS_MEM_TYPE_MASK)) ==
             PCI_BASE_ADDRESS_MEM_TYPE_64 )
        {
            uint64_t addr = (pci_conf_read32(sbdf, PCI_BASE_ADDRESS_0) &
                             PCI_BASE_ADDRESS_MEM_MASK) |
                            ((uint64_t)pci_conf_read32(sbdf,
                                                       PCI_BASE_ADDRESS_1) << 32);

            if ( addr )
                pvx_add_range(addr, addr & -addr, PVIOMMU_REGION_MMIO);
        }
        return 0;
    }
    else if ( type == PCI_HEADER_TYPE_NORMAL )
        nbars = 6;
    else
        return 0;

    /* Size with memory decode off, as vPCI does, then restore it. */
    cmd = pci_conf_read16(sbdf, PCI_COMMAND);
    if ( cmd & PCI_COMMAND_MEMORY )
        pci_conf_write16(sbdf, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);

    for ( i = 0; i < nbars; )
    {
        unsigned int reg = PCI_BASE_ADDRESS_0 + i * 4;
        uint32_t bar = pci_conf_read32(sbdf, reg);
        uint64_t addr, size;

        if ( (bar & PCI_BASE_ADDRESS_SPACE) == PCI_BASE_ADDRESS_SPACE_IO ||
             (bar & PCI_BASE_ADDRESS_MEM_TYPE_MASK) !=
             PCI_BASE_ADDRESS_MEM_TYPE_64 )
        {
            i++;
            continue;
        }
        i += pci_size_mem_bar(sbdf, reg, &addr, &size,
                              i == nbars - 1 ? PCI_BAR_LAST : 0);
        pvx_add_range(addr, size, PVIOMMU_REGION_MMIO);
    }

    if ( cmd & PCI_COMMAND_MEMORY )
        pci_conf_write16(sbdf, PCI_COMMAND, cmd);

    /* VF BARs: sizes were read by pci_add_device() (vf_rlen). */
    pos = pci_find_ext_capability(sbdf.seg, sbdf.bus, sbdf.devfn,
                                  PCI_EXT_CAP_ID_SRIOV);
    if ( pos && !pdev->info.is_virtfn )
    {
        uint16_t total = pci_conf_read16(sbdf, pos + PCI_SRIOV_TOTAL_VF);

        for ( i = 0; i < PCI_SRIOV_NUM_BARS; i++ )
        {
            uint32_t bar = pci_conf_read32(sbdf, pos + PCI_SRIOV_BAR + i * 4);
            uint64_t addr = bar & PCI_BASE_ADDRESS_MEM_MASK;

            if ( (bar & PCI_BASE_ADDRESS_MEM_TYPE_MASK) !=
                 PCI_BASE_ADDRESS_MEM_TYPE_64 )
                continue;
            if ( i + 1 < PCI_SRIOV_NUM_BARS )
                addr |= (uint64_t)pci_conf_read32(
                            sbdf, pos + PCI_SRIOV_BAR + (i + 1) * 4) << 32;
            if ( pdev->vf_rlen[i] && total )
                pvx_add_range(addr, pdev->vf_rlen[i] * total,
                              PVIOMMU_REGION_MMIO);
            i++; /* the upper half */
        }
    }

    return 0;
}

static void __init pvx_build_regions(void)
{
    uint64_t low_end = 0;
    unsigned int i, j;

    /* The interrupt (MSI) window. */
    pvx_add_region(PFN_DOWN(0xfee00000UL), 0x100, PVIOMMU_REGION_MSI);

    /* The hole below 4 GiB: low MMIO, 32-bit BARs and bridge windows. */
    for ( i = 0; i < e820.nr_map; i++ )
    {
        uint64_t s = e820.map[i].addr, e = s + e820.map[i].size;

        if ( e820.map[i].type != E820_RAM || s >= GB(4) )
            continue;
        low_end = max(low_end, min_t(uint64_t, e, GB(4)));
    }
    pvx_add_region(PFN_UP(low_end), PFN_DOWN(GB(4)) - PFN_UP(low_end),
                   PVIOMMU_REGION_MMIO);

    /* Anything firmware reserves above 4 GiB (e.g. MMCONFIG). */
    for ( i = 0; i < e820.nr_map; i++ )
        if ( e820.map[i].type != E820_RAM &&
             e820.map[i].addr + e820.map[i].size > GB(4) )
            pvx_add_range(e820.map[i].addr, e820.map[i].size,
                          PVIOMMU_REGION_PLATFORM);

    /* SRAT hot-pluggable memory: RAM may appear there later. */
    if ( PFN_UP(mem_hotplug) > max_page )
        pvx_add_region(max_page, PFN_UP(mem_hotplug) - max_page,
                       PVIOMMU_REGION_PLATFORM);

    if ( iommu_get_reserved_device_memory(pvx_rdm_region, NULL) < 0 )
        printk(XENLOG_WARNING "pviommu: could not list RMRR/IVMD ranges\n");

    pcidevs_lock();
    pci_for_each_pdev(pvx_pdev_windows, NULL);
    pcidevs_unlock();

    /* Sorted by start (insertion sort; boot only, small). */
    for ( i = 1; i < pvx_nr_regions; i++ )
    {
        struct pvx_region r = pvx_regions[i];

        for ( j = i; j && pvx_regions[j - 1].start > r.start; j-- )
            pvx_regions[j] = pvx_regions[j - 1];
        pvx_regions[j] = r;
    }

    /* RAM, including SRAT hot-pluggable ranges, ends here. */
    pvx_ram_end = max_t(uint64_t, max_page, PFN_UP(mem_hotplug));

    /*
     * The IOMMU driver knows how many address bits a context translates;
     * 39 (3-level VT-d, the narrowest common width) when it does not say.
     */
    pvx_addr_bits = 39;
    if ( iommu_enabled && iommu_get_ops()->pviommu_address_bits )
        pvx_addr_bits = iommu_call(iommu_get_ops(), pviommu_address_bits);
}

static int __init cf_check pviommu_init(void)
{
    int rc;

    pviommu_build_checks();
    pvx_hwdom_strict = iommu_hwdom_strict;

    if ( !opt_pviommu )
    {
        printk(XENLOG_INFO "pviommu: disabled on the command line\n");
        return 0;
    }

    pvx_build_regions();

    rc = pviommu_engine_init(opt_pviommu_quota, opt_pviommu_batch,
                             (uint64_t)opt_pviommu_heap_mib << 20);
    if ( rc )
    {
        printk(XENLOG_ERR "pviommu: engine init failed: %d\n", rc);
        return 0;
    }

    pviommu_ready = true;
    printk(XENLOG_INFO
           "pviommu: hypercall %d ready: RAM end %#"PRIx64", %u address bits, %u reserved regions\n",
           __HYPERVISOR_pv_iommu_op, pvx_ram_end, pvx_addr_bits,
           pvx_nr_regions);

    return 0;
}
__initcall(pviommu_init);

uint64_t pvx_ram_end_mfn(void)
{
    return pvx_ram_end;
}

unsigned int pvx_iommu_address_bits(void)
{
    return pvx_addr_bits;
}

int pvx_reserved_region(unsigned int index, uint64_t *start_frame,
                        uint64_t *nr_frames, uint32_t *kind)
{
    if ( index >= pvx_nr_regions )
        return -ENOENT;

    *start_frame = pvx_regions[index].start;
    *nr_frames = pvx_regions[index].nr;
    *kind = pvx_regions[index].kind;

    return 0;
}

/* ---------------------------------------------------------------- */
/* pvx_*: primitives for the engine                                  */
/* ---------------------------------------------------------------- */

/*
 * One lock per driver cell of the engine (a driver domain's state); the
 * engine holds at most one at a time. The cell number comes from the
 * engine, never from a guest, and is below PVX_DRIVER_CELLS.
 */
/* One cache line each: CPUs working for different driver domains must not
 * bounce one line between them. */
struct pvx_driver_lock {
    spinlock_t lock;
} __cacheline_aligned;

static struct pvx_driver_lock pvx_driver_locks[PVX_DRIVER_CELLS] = {
    [0 ... PVX_DRIVER_CELLS - 1] = { .lock = SPIN_LOCK_UNLOCKED },
};

/*
 * The cells this CPU holds (bit n: pvx_driver_locks[n]), for the engine's
 * table write-back (pvx_driver_held): its record of table stores not yet
 * in memory is kept per cell, touched only under that cell's lock, so two
 * driver domains writing their own tables share no lock. Updated only by
 * the holder, on its own CPU, with the lock held: a Xen spinlock is
 * released on the CPU that took it and the engine is never preempted
 * between the two.
 */
static DEFINE_PER_CPU(uint64_t, pvx_cells_held);

void pvx_driver_lock(unsigned int cell)
{
    ASSERT(cell < PVX_DRIVER_CELLS);
    spin_lock(&pvx_driver_locks[cell % PVX_DRIVER_CELLS].lock);
    this_cpu(pvx_cells_held) |= 1ULL << (cell % PVX_DRIVER_CELLS);
}

int pvx_driver_trylock(unsigned int cell)
{
    ASSERT(cell < PVX_DRIVER_CELLS);
    if ( !spin_trylock(&pvx_driver_locks[cell % PVX_DRIVER_CELLS].lock) )
        return 0;
    this_cpu(pvx_cells_held) |= 1ULL << (cell % PVX_DRIVER_CELLS);

    return 1;
}

void pvx_driver_unlock(unsigned int cell)
{
    ASSERT(this_cpu(pvx_cells_held) & (1ULL << (cell % PVX_DRIVER_CELLS)));
    this_cpu(pvx_cells_held) &= ~(1ULL << (cell % PVX_DRIVER_CELLS));
    spin_unlock(&pvx_driver_locks[cell % PVX_DRIVER_CELLS].lock);
}

uint64_t pvx_driver_held(void)
{
    return this_cpu(pvx_cells_held);
}

/*
 * raw_copy_*_guest: PV copies check the range is guest space
 * (access_ok); HVM/PVH copies go through the caller's p2m (and may wait for
 * paging), which is why no PV-IOMMU lock may be held here. The PV path
 * takes an unsigned int length.
 */
int pvx_copy_from_guest(void *dst, uint64_t guest_addr, size_t len)
{
    if ( len > UINT_MAX )
        return -EFAULT;

    return raw_copy_from_guest(dst, (const void *)(unsigned long)guest_addr,
                               len) ? -EFAULT : 0;
}

int pvx_copy_to_guest(uint64_t guest_addr, const void *src, size_t len)
{
    if ( len > UINT_MAX )
        return -EFAULT;

    return raw_copy_to_guest((void *)(unsigned long)guest_addr, src,
                             len) ? -EFAULT : 0;
}

/*
 * Does d's IOMMU context translate what PV-IOMMU writes? iommu_map() is a
 * silent no-op without an IOMMU for d (iommu_map), for a passthrough hardware
 * domain and with tables shared with EPT (intel_iommu_map_page); a non-strict
 * hardware domain has all RAM mapped already, so a BFN isolates nothing.
 */
static uint32_t pvx_translation(const struct domain *d)
{
    if ( !is_iommu_enabled(d) )
        return PVIOMMU_NO_IOMMU;
    if ( is_hardware_domain(d) && iommu_hwdom_passthrough )
        return PVIOMMU_PASSTHROUGH;
    if ( iommu_use_hap_pt(d) )
        return PVIOMMU_SHARED_PT;
    /*
     * A translated caller with its own IOMMU tables gets them kept in sync
     * with its p2m (dfn = gfn, ept_set_entry / p2m_pt_set_entry): it picks
     * its gfns itself, grant and foreign maps included, so a BFN in the
     * window could overwrite, or be overwritten by, one of those entries.
     */
    if ( paging_mode_translate(d) )
        return PVIOMMU_MIRRORS_P2M;
    if ( is_hardware_domain(d) && !pvx_hwdom_strict )
        return PVIOMMU_RELAXED;

    return PVIOMMU_TRANSLATES;
}

void pvx_domain_info(uint16_t domid, struct pvx_domain_info *info)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    const struct domain *t;

    memset(info, 0, sizeof(*info));
    info->target = PVX_DOMID_NONE;
    info->translation = PVIOMMU_NO_IOMMU;
    if ( !d )
        return;

    info->exists = 1;
    info->dying = d->is_dying != DOMDYING_alive;
    info->control = is_control_domain(d);
    info->hardware = is_hardware_domain(d);
    /* Set once (XEN_DOMCTL_set_target), with a reference on the target. */
    t = ACCESS_ONCE(d->target);
    if ( t )
        info->target = t->domain_id;
    info->translation = pvx_translation(d);

    rcu_unlock_domain(d);
}

int pvx_xsm_check(uint16_t caller, uint16_t target, unsigned int action)
{
    struct domain *c, *t = NULL, *tt;
    int rc;

    if ( action > PVX_XSM_MANAGE )
        return -EPERM;

    c = rcu_lock_domain_by_id(caller);
    if ( !c )
        return -ESRCH;

    if ( target != PVX_DOMID_NONE )
    {
        t = rcu_lock_domain_by_id(target);
        if ( !t )
        {
            rcu_unlock_domain(c);
            return -ESRCH;
        }
        tt = t;
    }
    else if ( action == PVX_XSM_MAP )
    {
        rcu_unlock_domain(c);
        return -EPERM;
    }
    else
        /*
         * No target (query, own BFNs): a device model answers for the domain
         * it serves (c->target holds a reference), so XSM_DM_PRIV admits it;
         * an unrelated domU gets t == NULL and only the control domain passes.
         */
        tt = ACCESS_ONCE(c->target);

    rc = xsm_pv_iommu_op(XSM_DM_PRIV, c, tt, action);

    if ( t )
        rcu_unlock_domain(t);
    rcu_unlock_domain(c);

    return rc;
}

/* Types a device may be given a page of, and which of them it may write. */
static bool pvx_type_readable(p2m_type_t t)
{
    return t == p2m_ram_rw || t == p2m_ram_ro || t == p2m_ram_logdirty ||
           t == p2m_ioreq_server;
}

int pvx_get_page(uint16_t domid, uint64_t gfn, int want_write,
                 uint64_t *mfn, uint32_t *kind)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    struct page_info *pg;
    p2m_type_t t = p2m_invalid;

    *mfn = INVALID_MFN_RAW;
    *kind = PVX_PAGE_NOT_PRESENT;
    if ( !d )
        return -ESRCH;
    if ( d->is_dying )
    {
        rcu_unlock_domain(d);
        return -ESRCH;
    }

    /*
     * Announce the map before looking at d's p2m (a locked instruction, so
     * a full barrier): a p2m change or page removal after our lookup sees
     * the count and calls the engine (see pviommu_gfn_changed()).
     */
    atomic_inc(&d->pviommu_pages);

    /* Device writes would escape dirty logging (migration). */
    if ( want_write && paging_mode_log_dirty(d) )
    {
        *kind = PVX_PAGE_LOG_DIRTY;
        goto out;
    }

    /*
     * As get_paged_frame() (grant_table.c): populate PoD, unshare. Shared
     * pages are unshared for read-only maps too, so the page's owner is d
     * (revocation and the reference count above key on the owner).
     */
    pg = get_page_from_gfn(d, gfn, &t, P2M_ALLOC | P2M_UNSHARE);

    if ( p2m_is_paging(t) )
    {
        if ( pg )
            put_page(pg);
#ifdef CONFIG_MEM_PAGING
        p2m_mem_paging_populate(d, _gfn(gfn));
#endif
        *kind = PVX_PAGE_PAGED_OUT;
        goto out;
    }
    if ( p2m_is_shared(t) )
    {
        /* Unsharing failed for lack of memory: retry later, as grants do. */
        *kind = PVX_PAGE_PAGED_OUT;
        goto drop;
    }
    if ( p2m_is_grant(t) || p2m_is_foreign(t) )
    {
        *kind = PVX_PAGE_GRANT;
        goto drop;
    }
    /*
     * An HVM gfn with nothing behind it reads back as p2m_mmio_dm (emulated
     * by the device model; the default for holes), or p2m_invalid: that is
     * "not present", not MMIO.
     */
    if ( t == p2m_mmio_dm || t == p2m_invalid )
    {
        *kind = PVX_PAGE_NOT_PRESENT;
        goto drop;
    }
    if ( p2m_is_mmio(t) )
    {
        *kind = PVX_PAGE_MMIO;
        goto drop;
    }
    if ( !pg )
    {
        /* PV: the frame exists but is not d's (Xen's or another domain's). */
        if ( !paging_mode_translate(d) && mfn_valid(_mfn(gfn)) )
            *kind = PVX_PAGE_XEN;
        goto out;
    }
    if ( is_special_page(pg) || is_xen_heap_page(pg) ||
         page_get_owner(pg) != d )
    {
        *kind = PVX_PAGE_XEN;
        goto drop;
    }
    if ( !pvx_type_readable(t) )
        goto drop; /* NOT_PRESENT */

    /*
     * A PV page being released (guest_remove_page() dropped PGC_allocated
     * before its hook ran): no longer the guest's. Checked after the
     * reference and the count, pairing with that hook's barrier.
     */
    if ( !(ACCESS_ONCE(pg->count_info) & PGC_allocated) )
        goto drop;

    if ( t != p2m_ram_rw )
    {
        /* ram_ro, ioreq-server (writes go to the emulator), log-dirty. */
        *kind = PVX_PAGE_RAM_RO;
        if ( want_write )
            goto drop;
    }
    else
    {
        *kind = PVX_PAGE_RAM_RW;
        if ( want_write && !get_page_type(pg, PGT_writable_page) )
        {
            /* A PV page table or descriptor page: never device-writable. */
            *kind = PVX_PAGE_RAM_RO;
            goto drop;
        }
    }

    *mfn = mfn_x(page_to_mfn(pg));
    rcu_unlock_domain(d);
    return 0;

 drop:
    if ( pg )
        put_page(pg);
 out:
    atomic_dec(&d->pviommu_pages);
    rcu_unlock_domain(d);
    return 0;
}

void pvx_put_page(uint64_t mfn, int writable)
{
    struct page_info *pg;
    struct domain *owner;

    if ( !mfn_valid(_mfn(mfn)) )
    {
        ASSERT_UNREACHABLE();
        return;
    }
    pg = mfn_to_page(_mfn(mfn));

    /*
     * The reference we drop keeps the page, and so its owner (a domain
     * with pages is not freed), alive until here.
     */
    owner = page_get_owner(pg);
    if ( owner )
    {
        ASSERT(atomic_read(&owner->pviommu_pages) > 0);
        atomic_dec(&owner->pviommu_pages);
    }

    if ( writable )
        put_page_and_type(pg);
    else
        put_page(pg);
}

void pvx_page_non_coherent(uint64_t mfn)
{
    /*
     * As get_page_from_l1e() does for a writable WC mapping (XSA-402): a
     * device writing without snooping can leave stale cache lines, so the
     * page is flushed before it gets any type but PGT_writable_page, or is
     * freed. Unlike the CPU's WC case, the CPU's self-snoop does not help:
     * a device's no-snoop write never snoops the CPU caches, so always.
     * Its writable type reference is held by the caller.
     */
    set_bit(_PGT_non_coherent, &mfn_to_page(_mfn(mfn))->u.inuse.type_info);
}

int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn,
                  unsigned int flags, unsigned int *flush)
{
    struct domain *d = rcu_lock_domain_by_id(owner);
    unsigned int iflags = 0;
    long rc;

    if ( !d )
        return -ESRCH;
    /* iommu_map() would succeed without mapping anything. */
    if ( pvx_translation(d) != PVIOMMU_TRANSLATES )
    {
        rcu_unlock_domain(d);
        return -EADDRNOTAVAIL;
    }
    if ( flags & PVIOMMU_F_READ )
        iflags |= IOMMUF_readable;
    if ( flags & PVIOMMU_F_WRITE )
        iflags |= IOMMUF_writable;

    rc = iommu_map(d, _dfn(bfn), _mfn(mfn), 1, iflags, flush);
    rcu_unlock_domain(d);

    return rc < 0 ? rc : 0;
}

int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, unsigned int *flush)
{
    struct domain *d = rcu_lock_domain_by_id(owner);
    long rc;

    if ( !d )
        return -ESRCH;
    /*
     * PV-IOMMU only ever maps 4k entries, but Xen 4.17's VT-d code folds a
     * full, contiguous 512-entry run into a superpage, and unmapping a page
     * of it must split it again: that can fail with -ENOMEM. The engine
     * then keeps the page referenced and the BFN poisoned and retries at
     * its next flush. (For a driver domain other than the hardware domain,
     * iommu_unmap() crashes the domain on failure; its teardown then
     * releases everything.)
     */
    rc = iommu_unmap(d, _dfn(bfn), 1, 0, flush);
    rcu_unlock_domain(d);

    return rc < 0 ? rc : 0;
}

int pvx_iommu_flush(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int flush)
{
    struct domain *d;
    int rc;

    if ( !flush || !count )
        return 0;
    d = rcu_lock_domain_by_id(owner);
    if ( !d )
        return -ESRCH;
    rc = iommu_iotlb_flush(d, _dfn(bfn), count, flush);
    rcu_unlock_domain(d);

    return rc;
}

/* ---- Contexts of the engine's own (xen/iommu.h pviommu_ctx_* ops) ---- */

int pvx_ctx_caps(unsigned int *levels, int *snoop_control)
{
    const struct iommu_ops *ops = iommu_get_ops();
    struct pviommu_ctx_caps caps = {};
    int rc;

    if ( !iommu_enabled || !ops->pviommu_ctx_caps ||
         !ops->pviommu_ctx_alloc || !ops->pviommu_ctx_free ||
         !ops->pviommu_ctx_flush || !ops->pviommu_device_facts ||
         !ops->pviommu_device_attach || !ops->pviommu_device_detach )
        return -EOPNOTSUPP;
    rc = iommu_call(ops, pviommu_ctx_caps, &caps);
    if ( rc )
        return rc;
    *levels = caps.levels;
    *snoop_control = caps.snoop_control;

    return 0;
}

/*
 * Do the IOMMU's table walks snoop the CPU caches? VT-d units each report
 * ECAP.C; Xen's VT-d setup (iommu_setup(), before initcalls) sets
 * iommu_non_coherent if any does not, and only there. Boot only (the
 * engine asks once, in its initcall): no unit is added later.
 */
int pvx_tables_coherent(void)
{
    return !iommu_non_coherent;
}

/* How a table store reaches memory the IOMMU reads (ECAP.C clear). */
#define PVX_TABLE_WRITEBACK(va, len) iommu_sync_cache(va, len)
#include "pviommu-tables.inc"

int pvx_ctx_alloc(uint16_t *tag)
{
    domid_t t;
    int rc;

    /* The engine took pcidevs_lock (pvx_devices_lock) before its own. */
    rc = iommu_call(iommu_get_ops(), pviommu_ctx_alloc, &t);
    if ( !rc )
        *tag = t;

    return rc;
}

int pvx_ctx_free(uint16_t tag)
{
    return iommu_call(iommu_get_ops(), pviommu_ctx_free, tag);
}

int pvx_ctx_flush(uint16_t tag, uint64_t bfn, uint64_t count)
{
    return iommu_call(iommu_get_ops(), pviommu_ctx_flush, tag, _dfn(bfn),
                      count);
}

int pvx_domain_has_devices(uint16_t domid)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    int has;

    if ( !d )
        return 0;
    /* A hint read without pcidevs_lock: attach checks ownership under it. */
    has = has_arch_pdevs(d);
    rcu_unlock_domain(d);

    return has;
}

void pvx_devices_lock(void)
{
    pcidevs_lock();
}

void pvx_devices_unlock(void)
{
    pcidevs_unlock();
}

static struct pci_dev *pvx_pdev(uint32_t sbdf)
{
    ASSERT(pcidevs_locked());
    return pci_get_pdev(NULL, PCI_SBDF(sbdf >> 16, (sbdf >> 8) & 0xff,
                                       PCI_SLOT(sbdf & 0xff),
                                       PCI_FUNC(sbdf & 0xff)));
}

int pvx_device_facts(uint32_t sbdf, uint16_t *owner, uint32_t *flags)
{
    const struct pci_dev *pdev = pvx_pdev(sbdf);
    unsigned int f;
    int rc;

    if ( !pdev || !pdev->domain )
        return -ENODEV;
    rc = iommu_call(iommu_get_ops(), pviommu_device_facts, pdev, &f);
    if ( rc )
        return rc;
    /* dom_io / dom_xen report their reserved ids: nobody's to attach. */
    *owner = pdev->domain->domain_id;
    *flags = f;

    return 0;
}

int pvx_device_attach(uint32_t sbdf, uint16_t tag, uint64_t root_mfn)
{
    struct pci_dev *pdev = pvx_pdev(sbdf);

    if ( !pdev )
        return -ENODEV;

    return iommu_call(iommu_get_ops(), pviommu_device_attach, pdev, tag,
                      pfn_to_paddr(root_mfn));
}

int pvx_device_detach(uint32_t sbdf, uint16_t tag)
{
    struct pci_dev *pdev = pvx_pdev(sbdf);

    if ( !pdev )
        return -ENODEV;

    return iommu_call(iommu_get_ops(), pviommu_device_detach, pdev, tag);
}

void pvx_notify_revoked(uint16_t owner)
{
    struct domain *d = rcu_lock_domain_by_id(owner);

    if ( !d )
        return;
    /*
     * Read-locks v->virq_lock, trylocks the channel, then the FIFO queue
     * lock or scheduler locks (vcpu_kick), or for an HVM callback the
     * domain's irq_lock: none of them is held around a p2m lock or a
     * driver lock, so this is safe under a hook's p2m lock. Xen does the
     * same from alloc_heap_pages (VIRQ_ENOMEM under heap_lock).
     */
    send_guest_global_virq(d, VIRQ_PV_IOMMU);
    rcu_unlock_domain(d);
}

uint64_t pvx_random_seed(void)
{
    /* RDRAND where the CPU has it (get_random()), else time-derived. */
    return ((uint64_t)get_random() << 32) ^ get_random();
}

uint64_t pvx_now_ns(void)
{
    /* System time in ns; read only while PV-IOMMU stats timing is on. */
    return NOW();
}

int pvx_preempt_check(void)
{
    return !!hypercall_preempt_check();
}

void *pvx_alloc(size_t size, size_t align)
{
    if ( !align )
        align = 1;
    if ( align & (align - 1) )
        return NULL;

    return _xmalloc(size, align);
}

void pvx_free(void *ptr)
{
    xfree(ptr);
}

void pvx_log(const char *msg, size_t len)
{
    /* Guest-triggerable: guest class (rate-limited), shown by default. */
    printk(XENLOG_G_WARNING "%.*s", (int)min_t(size_t, len, 512), msg);
}

/* pvx_unreachable_panic() is deliberately not defined (pviommu_engine.h). */
