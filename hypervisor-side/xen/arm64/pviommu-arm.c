/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu-arm.c -- PV-IOMMU, hypercall 43 (__HYPERVISOR_pv_iommu_op): Xen's
 * side on Arm64 (upstream Xen 4.21.2, arm64/patches-4.21/series; Debian 12's
 * 4.17.5 with PVIOMMU_ARM_XEN 417, patches-4.17-arm64/series).
 *
 * Installed as xen/common/pviommu.c by arm64/build-xen-arm64.sh (PVIOMMU=1)
 * and build-xen-arm64-4.17.sh, in place of ../pviommu.c, the x86 glue.
 * Everything the engine sees is the same interface
 * (../include/pviommu_engine.h). What x86 and Arm share is
 * ../pviommu-common.inc (included below, as by ../pviommu.c; locks: see
 * there) and the table frames ../pviommu-tables.inc (with Arm's cache
 * cleaning passed in). This file has Arm's own: the hypercall's 32-bit
 * check, reserved regions from the host device tree and RAM banks (no
 * e820, no SRAT, no PCI walk at boot: Arm's dom0 adds PCI devices later),
 * address bits from the stage-2 IPA size, get_page on Arm's p2m types, the
 * IOMMU map/unmap of context 0 (dom0's translation is the shared p2m:
 * SHARED_PT, so maps are refused as the ABI says), the pviommu=dom0-p2m
 * mode with its debug key, and data-cache cleaning for table frames.
 * Contexts of the engine's own go through the SMMUv3 driver's iommu_ops
 * (patches-4.21/0009: unshared LPAE stage 2, a VMID per context; the same
 * ops as x86's 0005), the revocation VIRQ is 4.21's per-domain one.
 *
 * The p2m-change hook is patches-4.21/0008 (arch/arm/mmu/p2m.c
 * p2m_set_entry()); Arm has no log-dirty mode. pviommu_device_leaving() is
 * called by the SMMUv3 driver's reassign_device and assign_device (0009),
 * which fail the move when it answers -EBUSY.
 */
#include <xen/init.h>
#include <xen/lib.h>
#include <xen/param.h>
#include <xen/sched.h>
#include <xen/nospec.h>
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
#include <xen/acpi.h>
#include <xen/device_tree.h>
#include <xen/domain_page.h>
#include <xsm/xsm.h>
#include <asm/p2m.h>
#include <asm/page.h>
#include <public/pv-iommu.h>

#include "pviommu_engine.h"

/*
 * pviommu=dom0-p2m. Context 0 of the (direct-mapped) hardware domain
 * is its stage-2 p2m: a map writes dom0's p2m at gfn = BFN, type
 * p2m_iommu_map_ro/rw, and an unmap removes that entry. With an IOMMU that
 * shares the p2m (Arm's IOMMU_FORCE_PT_SHARE, e.g. 4.21's SMMUv3) that is
 * dom0's device translation; without one (Debian 12's 4.17 in QEMU, the CI
 * fallback of issue 13) no device walks it, and the boot message says so:
 * a test mode. Off by default. See pvx_dom0_p2m_map(). The shared glue
 * parses it and has pvx_translation() and pvx_ctx_caps() answer for it.
 */
#define PVX_DOM0_P2M
static bool __ro_after_init pvx_dom0_p2m;
/*
 * Xen's block_speculation() and evaluate_nospec() are empty on Arm: the
 * barrier the engine puts before its page lookups (dsb nsh; isb).
 */
#define pvx_block_speculation() do { dsb(nsh); isb(); } while ( 0 )
static bool pvx_is_dom0_p2m(const struct domain *d);
/* ../pviommu-common.inc, installed next to this file */
#include "pviommu-common.inc"

/* ---------------------------------------------------------------- */
/* Arm                                                              */
/* ---------------------------------------------------------------- */

/*
 * 32-bit (AArch32) domains. An AArch64 domain only calls from EL1 (HVC),
 * which is AArch64 whenever the domain is.
 */
static bool pvx_caller_not_64bit(struct vcpu *v)
{
    return is_32bit_domain(v->domain);
}

/*
 * pviommu_log_dirty_enabled() is not defined: Arm has no log-dirty
 * mode, nothing calls it.
 */

/* ---- Reserved BFN regions and limits (built once at boot) ---- */

/*
 * A PCI bus node, as Xen's device-tree code matches them (dt_bus_pci_match()):
 * device_type "pci" or "pciex", or a node named "pci" or "pcie" whatever its
 * device_type (Xen warns of a missing one, then drives it as a PCI bus all
 * the same: missing it left such a bridge's windows unreserved, a review of
 * 2026-12-06). A disabled one counts too: more reserved, or off, never less.
 */
static bool __init pvx_dt_is_pci(const struct dt_device_node *np)
{
    const char *name = dt_node_name(np);

    return dt_device_type_is_equal(np, "pci") ||
           dt_device_type_is_equal(np, "pciex") ||
           (name && (!strcmp(name, "pci") || !strcmp(name, "pcie")));
}

/*
 * A PCI-PCI bridge's node (under a host bridge): its windows lie within
 * its host bridge's, reserved there; its own `ranges` (often empty) adds
 * nothing.
 */
static bool __init pvx_pci_below_bridge(const struct dt_device_node *np)
{
    const struct dt_device_node *parent = dt_get_parent(np);

    return parent && pvx_dt_is_pci(parent);
}

/* A host bridge window at its CPU address (dt_for_each_range()). */
static int __init cf_check pvx_dt_range(const struct dt_device_node *dev,
                                        uint64_t addr, uint64_t len,
                                        void *data)
{
    /* (Xen's DT_BAD_ADDR, private to device-tree.c.) */
    if ( addr == ~(uint64_t)0 )
    {
        printk(XENLOG_ERR "pviommu: %s: a window's CPU address does not translate\n",
               dt_node_full_name(dev));
        pvx_regions_incomplete = true;
        return 0;
    }
    pvx_add_range(addr, len, PVIOMMU_REGION_MMIO);

    return 0;
}

/*
 * A PCI host bridge's memory windows at their bus addresses: the child
 * side of its `ranges`, where its devices' DMA meets them. Where the
 * bridge translates (bus != CPU address), dt_for_each_range() gives only
 * the CPU side; a BFN at a peer device's bus address would reach that
 * BAR, routed by the bridge, not the page behind the IOMMU. Each entry:
 * the PCI address (3 cells: space code in bits 25:24 of the first, the
 * address in the other two), the CPU address (the parent's
 * #address-cells), the size (2 cells). I/O and config space are no DMA
 * target. false (nothing is known of this bridge's windows) if `ranges`
 * is missing, empty or cannot be read.
 */
static bool __init pvx_pci_bus_windows(const struct dt_device_node *np)
{
    enum { PCI_ADDR_CELLS = 3, PCI_SIZE_CELLS = 2 };
    const __be32 *cells;
    uint32_t len, na = 0, ns = 0;
    int pna = dt_n_addr_cells(np);
    unsigned int one, left;

    /*
     * (An empty `ranges` on a host bridge names no window: nothing known
     * of where its BARs go.)
     */
    cells = dt_get_property(np, "ranges", &len);
    if ( !cells || !len ||
         !dt_property_read_u32(np, "#address-cells", &na) ||
         !dt_property_read_u32(np, "#size-cells", &ns) ||
         na != PCI_ADDR_CELLS || ns != PCI_SIZE_CELLS || pna < 1 || pna > 2 )
        return false;
    one = PCI_ADDR_CELLS + pna + PCI_SIZE_CELLS;
    if ( len % (4 * one) )
        return false;
    for ( left = len / 4; left >= one; left -= one, cells += one )
    {
        unsigned int space = (be32_to_cpu(cells[0]) >> 24) & 3;

        /* 2: 32-bit memory, 3: 64-bit memory. */
        if ( space >= 2 )
            pvx_add_range(dt_read_number(cells + 1, 2),
                          dt_read_number(cells + PCI_ADDR_CELLS + pna,
                                         PCI_SIZE_CELLS),
                          PVIOMMU_REGION_MMIO);
    }

    return true;
}

/*
 * Every address DMA may not be given as a BFN.
 *  - below the first RAM bank and between banks: MMIO (GIC, GICv3 ITS
 *    doorbells, UARTs, the low PCI windows of QEMU's virt machine);
 *  - GICv3 ITS translation registers (MSI doorbells) wherever they are;
 *  - every PCI host bridge's config space (reg) and memory windows
 *    (ranges), at their CPU and at their bus addresses, the high ones
 *    above RAM included; a bridge whose windows cannot be read leaves
 *    PV-IOMMU off (pvx_regions_incomplete), never a window unreserved;
 *  - any other device-tree reg above RAM (platform).
 * Only from the device tree: a host booted with ACPI leaves PV-IOMMU off.
 * RAM ends at max_page. Arm's dom0 adds PCI devices after boot (PHYSDEVOP),
 * so no device walk here: the bridge windows cover their BARs.
 */
static void __init pvx_build_regions(void)
{
    const pvx_membanks_t *mem = PVX_BOOT_MEM();
    const struct dt_device_node *np;
    uint64_t prev_end = 0;
    unsigned int i, j;

    /*
     * A host booted with ACPI describes its MSI doorbells and PCI windows
     * in the MADT and IORT, which this walk of the device tree does not
     * read: off, rather than BFNs over them (a review of 2026-12-06; 4.21's
     * SMMUv3 driver does not probe from ACPI anyway).
     */
    if ( !acpi_disabled )
    {
        printk(XENLOG_ERR
               "pviommu: booted with ACPI, whose device addresses the Arm glue does not read\n");
        pvx_regions_incomplete = true;
        return;
    }

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
        bool pci = pvx_dt_is_pci(np);

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
            /* (Without the sum, which a range ending at 2^64 wraps.) */
            else if ( addr >= pfn_to_paddr(max_page) ||
                      size > pfn_to_paddr(max_page) - addr )
                pvx_add_range(addr, size, PVIOMMU_REGION_PLATFORM);
        }
        if ( pci && !pvx_pci_below_bridge(np) &&
             (dt_for_each_range(np, pvx_dt_range, NULL) ||
              !pvx_pci_bus_windows(np)) )
        {
            printk(XENLOG_ERR "pviommu: %s: its `ranges` cannot be read\n",
                   dt_node_full_name(np));
            pvx_regions_incomplete = true;
        }
    }

    pvx_ram_end = max_page;

    /*
     * A domain's device context is its stage-2 translation (shared with the
     * CPU, IOMMU_FORCE_PT_SHARE): it takes p2m_ipa_bits of input address.
     */
    pvx_addr_bits = p2m_ipa_bits;
}

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

/*
 * Always: pviommu=dom0-p2m serves a dom0 whose device DMA goes through no
 * IOMMU at all, and otherwise each domain's IOMMU set-up is asked per call
 * (pvx_translation()).
 */
static bool __init pvx_arch_wanted(void)
{
    return true;
}

static void __init pvx_arch_ready(void)
{
    unsigned int i;

    printk(XENLOG_INFO
           "pviommu: engine ready (arm64): hypercall %d, RAM end %#"PRIx64", %u address bits, %u reserved regions\n",
           __HYPERVISOR_pv_iommu_op, pvx_ram_end, pvx_addr_bits,
           pvx_nr_regions);
    for ( i = 0; i < pvx_nr_regions; i++ )
        printk(XENLOG_INFO "pviommu:  reserved %#"PRIx64"-%#"PRIx64" kind %u\n",
               pvx_regions[i].start,
               pvx_regions[i].start + pvx_regions[i].nr - 1,
               pvx_regions[i].kind);
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
}

/* ---- pvx_*: Arm's primitives for the engine ---- */

/* Types a device may be given a page of: the only ones looked up below. */
static bool pvx_type_readable(p2m_type_t t)
{
    return t == p2m_ram_rw || t == p2m_ram_ro;
}

/* Arm keeps no type counts: get_page_type() always succeeds, silently. */
static bool pvx_writable_type_refused(const struct page_info *pg)
{
    return false;
}

/*
 * For pvx_get_pages(): no walk for a run here (Arm's p2m lookups answer a
 * page at a time): each page is looked up on its own, under the one
 * domain lookup of the run.
 */
static uint32_t pvx_page_run(struct domain *d, uint64_t *frames, uint32_t nr,
                             int want_write, p2m_type_t *t)
{
    return 0;
}

/*
 * For pvx_get_page(): the lookup on Arm's p2m types (asm/p2m.h); Arm has no
 * paging, sharing, PoD, log-dirty.
 */
static struct page_info *pvx_lookup_page(struct domain *d, uint64_t gfn,
                                         int want_write, p2m_type_t *t,
                                         uint32_t *kind)
{
    struct page_info *pg = get_page_from_gfn(d, gfn, t, P2M_ALLOC);

    switch ( *t )
    {
    case p2m_ram_rw:
    case p2m_ram_ro:
        return pg;
    case p2m_map_foreign_rw:
    case p2m_map_foreign_ro:
    case p2m_grant_map_rw:
    case p2m_grant_map_ro:
    /* 1:1 grant mappings of a direct-mapped domain (arm_iommu_map_page). */
    case p2m_iommu_map_rw:
    case p2m_iommu_map_ro:
        *kind = PVX_PAGE_GRANT;
        break;
    case p2m_mmio_direct_dev:
    case p2m_mmio_direct_nc:
    case p2m_mmio_direct_c:
        *kind = PVX_PAGE_MMIO;
        break;
    default:
        break; /* NOT_PRESENT */
    }
    if ( pg )
        put_page(pg);

    return NULL;
}

/*
 * The engine calls this only for a writable map with a memory type
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
 * Context 0 is the owner's stage-2 p2m itself (IOMMU_FORCE_PT_SHARE),
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

int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn, uint64_t count,
                  unsigned int flags, unsigned int *flush)
{
    struct domain *d;
    uint32_t tr;
    uint64_t i;
    int rc = 0;

    /* As on x86: the run's ends are frames (a check of the arithmetic). */
    if ( !count || count > PVX_IOMMU_RUN_MAX || bfn + count < bfn ||
         mfn + count < mfn || pvx_run_refused("map", bfn, count) ||
         !mfn_valid(_mfn(mfn)) || !mfn_valid(_mfn(mfn + count - 1)) ||
         !pvx_run_frames_held(mfn, count) )
        return -EINVAL;
    d = rcu_lock_domain_by_id(owner);
    if ( !d )
        return -ESRCH;
    if ( pvx_is_dom0_p2m(d) )
    {
        /*
         * A page at a time; on failure what the run mapped goes again
         * (as Xen's multi-page iommu_map() does), so the engine sees
         * nothing of it mapped.
         */
        for ( i = 0; i < count; i++ )
        {
            rc = pvx_dom0_p2m_map(d, bfn + i, mfn + i, flags, flush);
            if ( rc )
                break;
        }
        /* Only the pages this call mapped, [bfn, bfn + i). */
        if ( rc )
            while ( i-- > 0 )
                pvx_dom0_p2m_unmap(d, bfn + i, flush);
        rcu_unlock_domain(d);
        return rc;
    }
    tr = pvx_translation(d);
    rcu_unlock_domain(d);

    return tr == PVIOMMU_TRANSLATES ? -EOPNOTSUPP : -EADDRNOTAVAIL;
}

int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int *flush)
{
    struct domain *d;
    uint64_t i;
    int rc = -EOPNOTSUPP, refused;

    if ( !count || count > PVX_IOMMU_RUN_MAX || bfn + count < bfn )
        return -EINVAL;
    refused = pvx_unmap_refused(bfn, count);
    if ( refused )
        return refused;
    d = rcu_lock_domain_by_id(owner);
    if ( !d )
        return -ESRCH;
    /*
     * A page at a time: each page's p2m type is checked before it is
     * cleared (only the engine's own entries go). The first failure is
     * the answer; the engine then retries each page.
     */
    if ( pvx_is_dom0_p2m(d) )
        for ( i = 0, rc = 0; i < count; i++ )
        {
            int err = pvx_dom0_p2m_unmap(d, bfn + i, flush);

            if ( err && !rc )
                rc = err;
        }
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

/*
 * Whether an SMMU walks coherently is a per-SMMU firmware property
 * (dma-coherent) that this glue does not see: answer no, so the engine
 * writes its stores back (a clean is harmless on a coherent SMMU).
 */
int pvx_tables_coherent(void)
{
    return 0;
}

/*
 * Arm has no PV page tables, so a page a device wrote without snooping
 * needs no flush before Xen trusts it as one (pvx_page_non_coherent() is
 * unreachable here, and asserts so): answer snooped. (Not because stage 2
 * Normal write-back makes a non-coherent device's writes coherent: it
 * does not.)
 */
int pvx_default_context_snooped(void)
{
    return 1;
}

/* How a table store reaches memory the SMMU reads. */
#define PVX_TABLE_WRITEBACK(va, len) clean_dcache_va_range(va, len)
#include "pviommu-tables.inc"
