/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu-arm.c -- PV-IOMMU, hypercall 43 (__HYPERVISOR_pv_iommu_op): Xen's
 * side on Arm64 (upstream Xen 4.21.2, arm64/patches-4.21/series).
 *
 * Installed as xen/common/pviommu.c by arm64/build-xen-arm64.sh (PVIOMMU=1),
 * in place of ../pviommu.c, the x86 glue. Everything the engine sees is the
 * same interface (../include/pviommu_engine.h); this file differs from
 * ../pviommu.c only where Arm does:
 *
 *   COMMON  sections copied verbatim from ../pviommu.c (build checks,
 *           "pviommu=" parsing, the teardown/gfn hooks, the region table,
 *           driver locks, domain facts, XSM, put_page,
 *           allocator/log/time/random/preempt). A later merge makes them
 *           one file again with the ARM/X86 sections below as per-arch
 *           parts, as the table frames already are: ../pviommu-tables.inc,
 *           included by both glues, with Arm's cache cleaning passed in.
 *   ARM     Arm's own: hypercall entry (32-bit check), reserved regions from
 *           the host device tree and RAM banks (no e820, no SRAT, no PCI
 *           walk at boot: Arm's dom0 adds PCI devices later), address bits
 *           from the stage-2 IPA size, get_page on Arm's p2m types, the
 *           IOMMU map/unmap of context 0 (dom0's translation is the shared
 *           p2m: SHARED_PT, so maps are refused as the ABI says), contexts
 *           of the engine's own through the SMMUv3 driver's iommu_ops
 *           (patches-4.21/0009: unshared LPAE stage 2, a VMID per
 *           context; the same ops as x86's 0005), the revocation VIRQ
 *           (4.21's send_guest_domain_virq), data-cache cleaning for
 *           table frames.
 *
 * The p2m-change hook is patches-4.21/0008 (arch/arm/mmu/p2m.c
 * p2m_set_entry()); Arm has no log-dirty mode. pviommu_device_leaving() is
 * called by the SMMUv3 driver's reassign_device (0009).
 *
 * Locks: as ../pviommu.c (design/xen-integration.md).
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
#include <xen/pviommu.h>
#include <xen/random.h>
#include <xen/keyhandler.h>
#include <xen/softirq.h>
/*
 * PVIOMMU_ARM_XEN: the Xen version this file is built into, 421 (default,
 * upstream 4.21.2, patches-4.21/) or 417 (Debian 12's 4.17.5, the CI
 * fallback of issue 13, patches-4.17-arm64/; build-xen-arm64-4.17.sh puts
 * "#define PVIOMMU_ARM_XEN 417" in front of the installed copy). The named
 * differences: where the RAM banks are (4.21 <xen/bootinfo.h>
 * bootinfo_get_mem(), 4.17 <asm/setup.h> bootinfo.mem, same fields) and
 * how VIRQ_PV_IOMMU is raised (4.21 per-domain send_guest_domain_virq(),
 * patches-4.21/0007; 4.17 global send_guest_global_virq(), as x86).
 */
#ifndef PVIOMMU_ARM_XEN
#define PVIOMMU_ARM_XEN 421
#endif
#if PVIOMMU_ARM_XEN >= 421
#include <xen/bootinfo.h>
#define PVX_BOOT_MEM() bootinfo_get_mem()
typedef struct membanks pvx_membanks_t;
#define pvx_send_revoked_virq(d) send_guest_domain_virq(d, VIRQ_PV_IOMMU)
#else
#include <asm/setup.h>
#define PVX_BOOT_MEM() (&bootinfo.mem)
typedef struct meminfo pvx_membanks_t;
#define pvx_send_revoked_virq(d) send_guest_global_virq(d, VIRQ_PV_IOMMU)
#endif
#include <xen/device_tree.h>
#include <xen/domain_page.h>
#include <xsm/xsm.h>
#include <asm/p2m.h>
#include <asm/page.h>
#include <public/pv-iommu.h>

#include "pviommu_engine.h"

/* COMMON */
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

/* COMMON (x86: snapshot of iommu_hwdom_strict, see ../pviommu.c) */
static bool __ro_after_init pvx_hwdom_strict;

static bool __read_mostly pviommu_ready;

/* Teardown statistics (printk on completion; diagnostics only). */
static atomic_t pviommu_teardown_restarts = ATOMIC_INIT(0);

/* COMMON */
/* ---------------------------------------------------------------- */
/* Command line: pviommu=[off|on][,quota:<n>][,batch:<n>][,heap:<MiB>]  */
/*               [,dom0-p2m] (ARM)                                    */
/* ---------------------------------------------------------------- */

/* Upper bound of quota: BFNs per driver domain (the engine's memory per
 * driver domain is about 100 bytes per BFN). */
#define PVX_MAX_QUOTA (1ULL << 24)

static bool __initdata opt_pviommu = true;
/*
 * ARM: pviommu=dom0-p2m. Context 0 of the (direct-mapped) hardware domain
 * is its stage-2 p2m: a map writes dom0's p2m at gfn = BFN, type
 * p2m_iommu_map_ro/rw, and an unmap removes that entry. With an IOMMU that
 * shares the p2m (Arm's IOMMU_FORCE_PT_SHARE, e.g. 4.21's SMMUv3) that is
 * dom0's device translation; without one (Debian 12's 4.17 in QEMU, the CI
 * fallback of issue 13) no device walks it, and the boot message says so:
 * a test mode. Off by default. See pvx_dom0_p2m_map().
 */
static bool __ro_after_init pvx_dom0_p2m;
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
        else if ( (val = parse_boolean("dom0-p2m", s, ss)) >= 0 )
            pvx_dom0_p2m = val;
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

/* ARM */
long do_pv_iommu_op(unsigned int cmd, XEN_GUEST_HANDLE_PARAM(void) arg)
{
    struct vcpu *curr = current;
    long rc;

    if ( !pviommu_ready )
        return -ENOSYS;

    /*
     * The interface carries 64-bit guest addresses and has no compat
     * translation: refuse 32-bit (AArch32) domains with an errno of their
     * own, ENOEXEC. An AArch64 domain only calls from EL1 (HVC), which is
     * AArch64 whenever the domain is.
     */
    if ( is_32bit_domain(curr->domain) )
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

/* COMMON */
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

/* COMMON */
void pviommu_device_leaving(struct domain *owner, const struct pci_dev *pdev)
{
#ifdef CONFIG_HAS_PCI
    ASSERT(pcidevs_locked());
#endif
    if ( !pviommu_ready || !owner )
        return;
    pviommu_engine_device_leaving(owner->domain_id, pdev->sbdf.sbdf);
}

/*
 * ARM: pviommu_log_dirty_enabled() is not defined: Arm has no log-dirty
 * mode, nothing calls it.
 */

/* ---------------------------------------------------------------- */
/* Reserved BFN regions and limits (built once at boot)              */
/* ---------------------------------------------------------------- */

/* COMMON */
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

/* ARM: the host device tree's view of what is not RAM. */
static int __init cf_check pvx_dt_range(const struct dt_device_node *dev,
                                        uint64_t addr, uint64_t len,
                                        void *data)
{
    pvx_add_range(addr, len, PVIOMMU_REGION_MMIO);

    return 0;
}

/*
 * ARM: every address DMA may not be given as a BFN.
 *  - below the first RAM bank and between banks: MMIO (GIC, GICv3 ITS
 *    doorbells, UARTs, the low PCI windows of QEMU's virt machine);
 *  - GICv3 ITS translation registers (MSI doorbells) wherever they are;
 *  - every PCI host bridge's config space (reg) and windows (ranges), the
 *    high ones above RAM included;
 *  - any other device-tree reg above RAM (platform).
 * RAM ends at max_page. Arm's dom0 adds PCI devices after boot (PHYSDEVOP),
 * so no device walk here: the bridge windows cover their BARs.
 */
static void __init pvx_build_regions(void)
{
    const pvx_membanks_t *mem = PVX_BOOT_MEM();
    const struct dt_device_node *np;
    uint64_t prev_end = 0;
    unsigned int i, j;

    /* RAM banks, in address order (boot only, small). */
    for ( i = 0; i < mem->nr_banks; i++ )
    {
        uint64_t lowest = ~(uint64_t)0, s, e;

        for ( j = 0; j < mem->nr_banks; j++ )
        {
            s = mem->bank[j].start;
            if ( s >= prev_end && s < lowest )
                lowest = s;
        }
        if ( lowest == ~(uint64_t)0 )
            break;
        for ( j = 0; j < mem->nr_banks; j++ )
            if ( mem->bank[j].start == lowest )
                break;
        e = mem->bank[j].start + mem->bank[j].size;
        pvx_add_range(prev_end, lowest - prev_end, PVIOMMU_REGION_MMIO);
        prev_end = max(prev_end, e);
    }

    dt_for_each_device_node ( dt_host, np )
    {
        unsigned int naddr = dt_number_of_address(np);
        bool its = dt_device_is_compatible(np, "arm,gic-v3-its");
        bool pci = dt_device_type_is_equal(np, "pci");

        if ( dt_device_type_is_equal(np, "memory") )
            continue;
        for ( i = 0; i < naddr; i++ )
        {
            uint64_t addr, size;

            if ( dt_device_get_address(np, i, &addr, &size) || !size )
                continue;
            if ( its )
                pvx_add_range(addr, size, PVIOMMU_REGION_MSI);
            else if ( pci )
                pvx_add_range(addr, size, PVIOMMU_REGION_MMIO);
            else if ( addr + size > pfn_to_paddr(max_page) )
                pvx_add_range(addr, size, PVIOMMU_REGION_PLATFORM);
        }
        if ( pci )
            dt_for_each_range(np, pvx_dt_range, NULL);
    }

    /* Sorted by start (insertion sort; boot only, small). */
    for ( i = 1; i < pvx_nr_regions; i++ )
    {
        struct pvx_region r = pvx_regions[i];

        for ( j = i; j && pvx_regions[j - 1].start > r.start; j-- )
            pvx_regions[j] = pvx_regions[j - 1];
        pvx_regions[j] = r;
    }

    pvx_ram_end = max_page;

    /*
     * A domain's device context is its stage-2 translation (shared with the
     * CPU, IOMMU_FORCE_PT_SHARE): it takes p2m_ipa_bits of input address.
     */
    pvx_addr_bits = p2m_ipa_bits;
}

/* COMMON, but for the region walk above and the init message */
static void cf_check pvx_dump_dom0_p2m(unsigned char key);

/*
 * ARM, pviommu=dom0-p2m: the debug key that dumps dom0's BFN entries. It
 * must be free in every Xen this file is built into: register_keyhandler()
 * ASSERTs that the slot is empty (a debug build dies at boot) and a release
 * build silently replaces the old handler. 'P' was perfc_reset in 4.17 and
 * 4.21 (CONFIG_PERF_COUNTERS). 'B' is neither in key_table[] nor passed to
 * register_{,irq_}keyhandler() in 4.17.5 (01140da4e8), 4.21.2 or master;
 * tests/xen-qemu-arm64/run.sh checks it against the tree it builds.
 */
#define PVX_DUMP_KEY 'B'

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
           "pviommu: engine ready (arm64): hypercall %d, RAM end %#"PRIx64", %u address bits, %u reserved regions\n",
           __HYPERVISOR_pv_iommu_op, pvx_ram_end, pvx_addr_bits,
           pvx_nr_regions);
    for ( rc = 0; rc < pvx_nr_regions; rc++ )
        printk(XENLOG_INFO "pviommu:  reserved %#"PRIx64"-%#"PRIx64" kind %u\n",
               pvx_regions[rc].start,
               pvx_regions[rc].start + pvx_regions[rc].nr - 1,
               pvx_regions[rc].kind);
    if ( pvx_dom0_p2m )
    {
        printk(XENLOG_WARNING
               "pviommu: dom0-p2m: context 0 of the hardware domain is its p2m, written at gfn = BFN; %s; no contexts; debug key '%c' dumps it\n",
               iommu_enabled ? "the IOMMU shares that p2m"
                             : "IOMMU off: no device walks it (test mode)",
               PVX_DUMP_KEY);
        register_keyhandler(PVX_DUMP_KEY, pvx_dump_dom0_p2m,
                            "dump dom0's PV-IOMMU p2m entries (pviommu=dom0-p2m)",
                            true);
    }

    return 0;
}
__initcall(pviommu_init);

/* COMMON */
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
 * ARM: raw_copy_*_guest translate the guest virtual address through the
 * current vCPU's stage 1 and the domain's stage 2 (no PV case); they take an
 * unsigned int length.
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

/* COMMON (on Arm, iommu_use_hap_pt() holds for every domain with an IOMMU:
 * the answer is SHARED_PT) */
/*
 * Does d's IOMMU context translate what PV-IOMMU writes? iommu_map() is a
 * silent no-op without an IOMMU for d (iommu_map), for a passthrough hardware
 * domain and with tables shared with EPT (intel_iommu_map_page); a non-strict
 * hardware domain has all RAM mapped already, so a BFN isolates nothing.
 */
static bool pvx_is_dom0_p2m(const struct domain *d);

static uint32_t pvx_translation(const struct domain *d)
{
    /* ARM: pviommu=dom0-p2m, context 0 is dom0's p2m written at gfn = BFN */
    if ( pvx_is_dom0_p2m(d) )
        return PVIOMMU_TRANSLATES;
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

/* ARM: Arm's p2m types (asm/p2m.h); Arm has no paging, sharing, PoD. */
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
     * ARM, pviommu=dom0-p2m: the hardware domain's own pages are never
     * mapped (defence in depth). Its pviommu_pages must stay 0, so the p2m
     * hook on dom0's p2m never waits for a driver cell: a cell in
     * pvx_dom0_p2m_map() holds its driver lock and waits for dom0's p2m
     * write lock (see the lock order there). The engine already refuses
     * self-maps into context 0 and, for a device model of dom0, answers
     * from the translation check before it gets here; this does not rely
     * on that order.
     */
    if ( pvx_dom0_p2m && is_hardware_domain(d) )
    {
        *kind = PVX_PAGE_XEN;
        rcu_unlock_domain(d);
        return 0;
    }

    /* Announce the map before looking at d's p2m (see ../pviommu.c). */
    atomic_inc(&d->pviommu_pages);

    /* Takes d's p2m read lock; a page of d's RAM comes back referenced. */
    pg = get_page_from_gfn(d, gfn, &t, P2M_ALLOC);

    switch ( t )
    {
    case p2m_ram_rw:
    case p2m_ram_ro:
        break;
    case p2m_map_foreign_rw:
    case p2m_map_foreign_ro:
    case p2m_grant_map_rw:
    case p2m_grant_map_ro:
    /* 1:1 grant mappings of a direct-mapped domain (arm_iommu_map_page). */
    case p2m_iommu_map_rw:
    case p2m_iommu_map_ro:
        *kind = PVX_PAGE_GRANT;
        goto drop;
    case p2m_mmio_direct_dev:
    case p2m_mmio_direct_nc:
    case p2m_mmio_direct_c:
        *kind = PVX_PAGE_MMIO;
        goto drop;
    default:
        goto drop; /* NOT_PRESENT */
    }
    if ( !pg )
        goto out;
    if ( is_special_page(pg) || is_xen_heap_page(pg) ||
         page_get_owner(pg) != d )
    {
        *kind = PVX_PAGE_XEN;
        goto drop;
    }
    /* A page being released is no longer the guest's. */
    if ( !(ACCESS_ONCE(pg->count_info) & PGC_allocated) )
        goto drop;

    if ( t != p2m_ram_rw )
    {
        *kind = PVX_PAGE_RAM_RO;
        if ( want_write )
            goto drop;
    }
    else
    {
        *kind = PVX_PAGE_RAM_RW;
        /* Arm keeps no type counts (always succeeds); pairs with
         * put_page_and_type() in pvx_put_page(). */
        if ( want_write && !get_page_type(pg, PGT_writable_page) )
        {
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

/* COMMON */
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

/*
 * ARM: the engine calls this only for a writable map with a memory type
 * other than write-back, which needs PVIOMMU_FEAT_ATTR_UC/_DEVICE; Arm
 * advertises neither yet (stage-2 MemAttr is written by the engine, but
 * what a device's non-cacheable write leaves in the CPU caches, and the
 * clean before the page is reused, is not done on Arm yet).
 */
void pvx_page_non_coherent(uint64_t mfn)
{
    ASSERT_UNREACHABLE();
}

/*
 * ARM: context 0 is the owner's stage-2 p2m itself (IOMMU_FORCE_PT_SHARE),
 * so pvx_translation() is never TRANSLATES: the engine answers
 * EADDRNOTAVAIL before asking, and these refuse for the same reason.
 * (iommu_map() on Arm only serves 1:1 grant maps and BUG_ONs dfn != mfn.)
 * The exception is pviommu=dom0-p2m: the hardware domain's context 0 is
 * its p2m, written here at gfn = BFN.
 */

/* ARM, pviommu=dom0-p2m: the BFN range ever written (under the p2m write
 * lock), the only range the debug key reads. */
static unsigned long pvx_dom0_p2m_lo = ~0UL, pvx_dom0_p2m_hi;

static bool pvx_is_dom0_p2m(const struct domain *d)
{
    return pvx_dom0_p2m && is_hardware_domain(d) && is_domain_direct_mapped(d);
}

/*
 * Lock order: the engine calls this under d's driver lock and it takes d's
 * p2m write lock, the reverse of the p2m hook's order (p2m lock -> the
 * driver locks of the cells that map the p2m owner's pages, 0008). No
 * cycle: only d's own cell can be waiting here for d's p2m, and no cell
 * ever maps d's own pages, so the hook on d's p2m never waits for a cell
 * (d's pviommu_pages stays 0): pvx_get_page() refuses the hardware
 * domain's pages in this mode, the engine refuses self-maps into context 0
 * (EINVAL) anyway, and other contexts are not offered in this mode
 * (pvx_ctx_caps). Full order: owner X's p2m (write, in the hook) -> dom0's
 * driver cell -> dom0's p2m (write) -> dom0's arch.paging.lock (table
 * allocation) -> heap. The page lookup (pvx_get_page, a p2m read lock) is
 * done by the engine before it takes the driver lock.
 *
 * Only an empty p2m entry is written (a BFN never replaces what dom0 has at
 * that gfn; the engine's window lies above RAM and its reserved regions,
 * but dom0 may have put a foreign or grant map there): -EBUSY otherwise.
 * No reference is taken for the entry: the engine holds the page's
 * reference from pvx_get_page() until after the unmap and flush, and the
 * p2m drops references only for foreign entries (p2m_put_l3_page).
 *
 * IOTLB flushes belong to the engine (pviommu_engine.h: a page reference
 * is dropped only after a pvx_iommu_flush() covering it returned 0).
 * p2m_set_entry() writes the entry first and then, with an IOMMU, flushes
 * the IOTLB itself (__p2m_set_entry -> iommu_iotlb_flush), so its error
 * can mean "written, flush failed". Returning that error from a map would
 * make the engine drop the page reference with the entry still in dom0's
 * stage 2 (an entry to a page that may be freed and reused); returning 0
 * from an unmap retry that finds the entry already gone, with no flush
 * asked for, would let the engine release the page without any successful
 * flush. So both re-read the entry after an error and decide by what is in
 * the p2m: once the entry is written (map) or gone (unmap) they return 0
 * and add IOMMU_FLUSHF_added / _modified to *flush, and the engine's flush
 * (retried until it succeeds, page kept until then) decides when the page
 * goes. An unmap always asks for the flush, even when it finds nothing:
 * an earlier attempt may have removed the entry and failed its flush. Only
 * when the p2m is unchanged (nothing written; entry still there) is the
 * error returned: the engine then frees the BFN and puts the page (map)
 * or keeps the mapping stuck, page referenced, and retries (unmap).
 */
static int pvx_dom0_p2m_map(struct domain *d, uint64_t bfn, uint64_t mfn,
                            unsigned int flags, unsigned int *flush)
{
    struct p2m_domain *p2m = p2m_get_hostp2m(d);
    p2m_type_t ot, nt = (flags & PVIOMMU_F_WRITE) ? p2m_iommu_map_rw
                                                  : p2m_iommu_map_ro;
    mfn_t omfn;
    int rc;

    if ( p2m_ipa_bits <= PAGE_SHIFT || p2m_ipa_bits >= 64 ||
         bfn >= (1ULL << (p2m_ipa_bits - PAGE_SHIFT)) || !mfn_valid(_mfn(mfn)) )
        return -EINVAL;

    p2m_write_lock(p2m);
    omfn = p2m_get_entry(p2m, _gfn(bfn), &ot, NULL, NULL, NULL);
    if ( ot != p2m_invalid || !mfn_eq(omfn, INVALID_MFN) )
        rc = -EBUSY;
    else
    {
        rc = p2m_set_entry(p2m, _gfn(bfn), 1, _mfn(mfn), nt,
                           p2m->default_access);
        if ( rc )
        {
            /* Written but not flushed? Then it is the engine's to flush. */
            omfn = p2m_get_entry(p2m, _gfn(bfn), &ot, NULL, NULL, NULL);
            if ( ot == nt && mfn_eq(omfn, _mfn(mfn)) )
                rc = 0;
        }
        if ( !rc )
        {
            *flush |= IOMMU_FLUSHF_added;
            pvx_dom0_p2m_lo = min_t(unsigned long, pvx_dom0_p2m_lo, bfn);
            pvx_dom0_p2m_hi = max_t(unsigned long, pvx_dom0_p2m_hi, bfn);
        }
    }
    p2m_write_unlock(p2m);

    return rc;
}

/*
 * Removes the entry at BFN if it is still one of ours (p2m_iommu_map_*: on
 * Arm only arm_iommu_map_page() writes those otherwise, 1:1 at gfn = mfn
 * below RAM end, never in the BFN window). If dom0 replaced it, what dom0
 * put there is left alone: the BFN is released all the same. A removal
 * passes p2m_access_rwx, as Xen's own do (__p2m_set_entry ASSERTs it for
 * INVALID_MFN). Flush: see above.
 */
static int pvx_dom0_p2m_unmap(struct domain *d, uint64_t bfn,
                              unsigned int *flush)
{
    struct p2m_domain *p2m = p2m_get_hostp2m(d);
    p2m_type_t ot;
    int rc = 0;

    if ( p2m_ipa_bits <= PAGE_SHIFT || p2m_ipa_bits >= 64 ||
         bfn >= (1ULL << (p2m_ipa_bits - PAGE_SHIFT)) )
        return -EINVAL;

    p2m_write_lock(p2m);
    p2m_get_entry(p2m, _gfn(bfn), &ot, NULL, NULL, NULL);
    if ( ot == p2m_iommu_map_rw || ot == p2m_iommu_map_ro )
    {
        rc = p2m_set_entry(p2m, _gfn(bfn), 1, INVALID_MFN, p2m_invalid,
                           p2m_access_rwx);
        if ( rc )
        {
            /* Removed but not flushed? Then it is the engine's to flush. */
            p2m_get_entry(p2m, _gfn(bfn), &ot, NULL, NULL, NULL);
            if ( ot != p2m_iommu_map_rw && ot != p2m_iommu_map_ro )
                rc = 0;
        }
    }
    if ( !rc )
        *flush |= IOMMU_FLUSHF_modified;
    p2m_write_unlock(p2m);

    return rc;
}

int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn,
                  unsigned int flags, unsigned int *flush)
{
    struct domain *d = rcu_lock_domain_by_id(owner);
    uint32_t tr;
    int rc;

    if ( !d )
        return -ESRCH;
    if ( pvx_is_dom0_p2m(d) )
    {
        rc = pvx_dom0_p2m_map(d, bfn, mfn, flags, flush);
        rcu_unlock_domain(d);
        return rc;
    }
    tr = pvx_translation(d);
    rcu_unlock_domain(d);

    return tr == PVIOMMU_TRANSLATES ? -EOPNOTSUPP : -EADDRNOTAVAIL;
}

int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, unsigned int *flush)
{
    struct domain *d = rcu_lock_domain_by_id(owner);
    int rc = -EOPNOTSUPP;

    if ( !d )
        return -ESRCH;
    if ( pvx_is_dom0_p2m(d) )
        rc = pvx_dom0_p2m_unmap(d, bfn, flush);
    rcu_unlock_domain(d);

    return rc;
}

/*
 * ARM, pviommu=dom0-p2m: debug key PVX_DUMP_KEY reads (only reads) dom0's
 * p2m over the BFN range the map above ever wrote (at most PVX_DUMP_SCAN
 * gfns), and prints each valid entry with the owner of its frame; for a
 * frame of another domain, it then looks that domain's p2m up for the
 * first gfn that maps the same frame (at most PVX_DUMP_OWNER_STEPS lookups,
 * one per p2m block or hole, so a domain's RAM is a few thousand steps;
 * the owner shapes its p2m, so a fragmented one only gets "not found").
 * Locks: one p2m read lock at a time, none between owners, where pending
 * softirqs are processed (at most PVX_DUMP_MAX walks). No allocation, no
 * guest memory. Each dump is numbered, so a test can tell which one it is
 * reading.
 */
#define PVX_DUMP_SCAN         4096UL
#define PVX_DUMP_MAX          16
#define PVX_DUMP_OWNER_STEPS  (1UL << 14)

static const char *pvx_p2m_type_name(p2m_type_t t)
{
    switch ( t )
    {
    case p2m_invalid:       return "invalid";
    case p2m_ram_rw:        return "ram_rw";
    case p2m_ram_ro:        return "ram_ro";
    case p2m_map_foreign_rw: return "foreign_rw";
    case p2m_map_foreign_ro: return "foreign_ro";
    case p2m_grant_map_rw:  return "grant_rw";
    case p2m_grant_map_ro:  return "grant_ro";
    case p2m_iommu_map_rw:  return "iommu_map_rw";
    case p2m_iommu_map_ro:  return "iommu_map_ro";
    default:                return "other";
    }
}

static void pvx_dump_owner_gfns(domid_t domid, unsigned long mfn,
                                unsigned long d0_gfn)
{
    struct domain *o = rcu_lock_domain_by_id(domid);
    struct p2m_domain *p2m;
    unsigned long gfn, end, steps = 0;
    bool hit = false;

    if ( !o )
    {
        printk("pviommu-p2m:   d%u gone\n", domid);
        return;
    }
    p2m = p2m_get_hostp2m(o);
    p2m_read_lock(p2m);
    gfn = gfn_x(p2m->lowest_mapped_gfn);
    end = gfn_x(p2m->max_mapped_gfn);
    while ( gfn <= end && steps < PVX_DUMP_OWNER_STEPS && !hit )
    {
        unsigned int order = 0;
        p2m_type_t t;
        mfn_t m = p2m_get_entry(p2m, _gfn(gfn), &t, NULL, &order, NULL);
        unsigned long span = 1UL << min(order, 30U);
        /*
         * The block (or hole) holding gfn: p2m_get_entry() returned the mfn
         * of gfn itself, which need not be the block's first (the walk
         * starts at lowest_mapped_gfn, maybe inside a block).
         */
        unsigned long base = gfn & ~(span - 1), off = gfn - base;

        steps++;
        /* a block entry: is the frame inside it? */
        if ( t != p2m_invalid && !mfn_eq(m, INVALID_MFN) &&
             mfn_x(m) >= off && mfn >= mfn_x(m) - off &&
             mfn - (mfn_x(m) - off) < span )
        {
            printk("pviommu-p2m:   d%u gfn %#lx mfn %#lx type %s (source of d0 gfn %#lx)\n",
                   domid, base + (mfn - (mfn_x(m) - off)), mfn,
                   pvx_p2m_type_name(t), d0_gfn);
            hit = true;
        }
        /* next block: p2m_get_entry() reports the order of entry or hole */
        gfn = (gfn | (span - 1)) + 1;
        if ( !gfn )
            break;
    }
    p2m_read_unlock(p2m);
    if ( !hit )
        printk("pviommu-p2m:   d%u: no gfn maps mfn %#lx (%lu lookups)\n",
               domid, mfn, steps);
    rcu_unlock_domain(o);
}

static void cf_check pvx_dump_dom0_p2m(unsigned char key)
{
    static atomic_t nr_dumps = ATOMIC_INIT(0);
    unsigned int dumps = atomic_inc_return(&nr_dumps);
    struct {
        unsigned long gfn, mfn;
        p2m_type_t t;
        domid_t owner;
    } e[PVX_DUMP_MAX];
    struct domain *d = hardware_domain;
    struct p2m_domain *p2m;
    unsigned long lo, hi, gfn, n = 0;
    unsigned int i, nr = 0;

    if ( !d || !pvx_dom0_p2m )
    {
        printk("pviommu-p2m: dump %u: no hardware domain in dom0-p2m mode\n",
               dumps);
        return;
    }
    p2m = p2m_get_hostp2m(d);
    p2m_read_lock(p2m);
    lo = pvx_dom0_p2m_lo;
    hi = pvx_dom0_p2m_hi;
    for ( gfn = lo; lo <= hi && gfn <= hi && n < PVX_DUMP_SCAN; gfn++, n++ )
    {
        p2m_type_t t;
        mfn_t m = p2m_get_entry(p2m, _gfn(gfn), &t, NULL, NULL, NULL);
        const struct domain *owner;

        if ( t == p2m_invalid || mfn_eq(m, INVALID_MFN) )
            continue;
        if ( nr == PVX_DUMP_MAX )
        {
            nr++;
            break;
        }
        owner = mfn_valid(m) ? page_get_owner(mfn_to_page(m)) : NULL;
        e[nr].gfn = gfn;
        e[nr].mfn = mfn_x(m);
        e[nr].t = t;
        e[nr].owner = owner ? owner->domain_id : DOMID_INVALID;
        nr++;
    }
    p2m_read_unlock(p2m);

    if ( lo > hi )
        printk("pviommu-p2m: dump %u: d0 window: nothing written yet\n", dumps);
    else
        printk("pviommu-p2m: dump %u: d0 gfns [%#lx, %#lx] (%lu read): %u valid entries%s\n",
               dumps, lo, hi, n, min(nr, (unsigned int)PVX_DUMP_MAX),
               nr > PVX_DUMP_MAX ? " (more not shown)" : "");
    for ( i = 0; i < nr && i < PVX_DUMP_MAX; i++ )
    {
        printk("pviommu-p2m:  d0 gfn %#lx mfn %#lx type %s owner d%u\n",
               e[i].gfn, e[i].mfn, pvx_p2m_type_name(e[i].t), e[i].owner);
        if ( e[i].owner != DOMID_INVALID && e[i].owner != d->domain_id )
        {
            /* No lock held here: let timers, tasklets, RCU etc. run. */
            process_pending_softirqs();
            pvx_dump_owner_gfns(e[i].owner, e[i].mfn, e[i].gfn);
        }
    }
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

/*
 * COMMON (the iommu_ops are the SMMUv3 driver's on Arm, patches-4.21/0009:
 * the engine's tables are LPAE stage 2 there, chosen by the engine for
 * aarch64; levels 4 from level 0, no snoop control).
 */
int pvx_ctx_caps(unsigned int *levels, int *snoop_control)
{
    const struct iommu_ops *ops = iommu_get_ops();
    struct pviommu_ctx_caps caps = {};
    int rc;

    /*
     * ARM, pviommu=dom0-p2m: no contexts of the engine's own, because
     * dom0's cell could then map dom0's own pages (into context n) and
     * wait in pvx_dom0_p2m_map() for the p2m lock that the p2m hook holds
     * while it waits for that cell: see the lock order there.
     */
    if ( pvx_dom0_p2m )
        return -EOPNOTSUPP;
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

/* COMMON but for the cache maintenance (x86: iommu_sync_cache) */
/*
 * ARM: whether an SMMU walks coherently is a per-SMMU firmware property
 * (dma-coherent) that this glue does not see: answer no, so the engine
 * writes its stores back (a clean is harmless on a coherent SMMU).
 */
int pvx_tables_coherent(void)
{
    return 0;
}

/* How a table store reaches memory the SMMU reads. */
#define PVX_TABLE_WRITEBACK(va, len) clean_dcache_va_range(va, len)
#include "pviommu-tables.inc"

/* COMMON (tag: a VMID on Arm, a pseudo domain id on x86) */
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

/*
 * The engine boundary's pvx_ctx_free() returns -errno (the tag then stays
 * taken): x86's 0005 op does. 4.21's SMMUv3 op (patches-4.21/0009) cannot
 * fail and returns nothing.
 */
int pvx_ctx_free(uint16_t tag)
{
#if PVIOMMU_ARM_XEN >= 421
    iommu_vcall(iommu_get_ops(), pviommu_ctx_free, tag);
    return 0;
#else
    return iommu_call(iommu_get_ops(), pviommu_ctx_free, tag);
#endif
}

/* COMMON (a hint, read without pcidevs_lock; no PCI on Arm without HAS_PCI) */
int pvx_domain_has_devices(uint16_t domid)
{
#ifdef CONFIG_HAS_PCI
    struct domain *d = rcu_lock_domain_by_id(domid);
    int has;

    if ( !d )
        return 0;
    has = has_arch_pdevs(d);
    rcu_unlock_domain(d);

    return has;
#else
    return 0;
#endif
}

int pvx_ctx_flush(uint16_t tag, uint64_t bfn, uint64_t count)
{
    return iommu_call(iommu_get_ops(), pviommu_ctx_flush, tag, _dfn(bfn),
                      count);
}

/*
 * COMMON with HAS_PCI. ARM without it (Xen 4.17: nothing on Arm selects
 * HAS_PCI, so no pcidevs_lock and no PCI device Xen knows): the devices
 * lock is a lock of our own, kept so the engine's lock order is the same,
 * and every SBDF is unknown (-ENODEV).
 */
#ifdef CONFIG_HAS_PCI
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
#else
static DEFINE_SPINLOCK(pvx_devices_nopci_lock);

void pvx_devices_lock(void)
{
    spin_lock(&pvx_devices_nopci_lock);
}

void pvx_devices_unlock(void)
{
    spin_unlock(&pvx_devices_nopci_lock);
}

static struct pci_dev *pvx_pdev(uint32_t sbdf)
{
    return NULL;
}
#endif

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

/* ARM (and x86 from Xen 4.21): patches-4.21/0007 makes VIRQ_PV_IOMMU a
 * per-domain VIRQ, raised with send_guest_domain_virq() (4.17's
 * send_guest_global_virq()). Locks as in ../pviommu.c. */
void pvx_notify_revoked(uint16_t owner)
{
    struct domain *d = rcu_lock_domain_by_id(owner);

    if ( !d )
        return;
    pvx_send_revoked_virq(d);
    rcu_unlock_domain(d);
}

/* COMMON */
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
