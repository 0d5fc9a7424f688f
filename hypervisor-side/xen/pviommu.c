/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu.c -- PV-IOMMU, hypercall 43 (__HYPERVISOR_pv_iommu_op): Xen's side
 * on x86.
 *
 * Installed as xen/common/pviommu.c by hypervisor-side/xen/build-xen.sh
 * (CONFIG_PV_IOMMU, patches/). Policy, the BFN table and revocation live in
 * the Rust engine (rust_engine.o, entry points pviommu_engine_*); the glue is
 * the hypercall entry, the hooks Xen calls when a domain dies or a p2m
 * changes, the driver locks, and the pvx_* primitives of pviommu_engine.h,
 * each a thin wrapper over a Xen primitive. What x86 and Arm share is
 * pviommu-common.inc (locks: see there), the table-frame primitives
 * (pvx_table_*) pviommu-tables.inc; both are included here, as by the Arm
 * glue (arm64/pviommu-arm.c). This file has x86's own: the 32/64-bit
 * check, the log-dirty hook, reserved regions from e820, SRAT, RMRR/IVMD
 * and a PCI BAR walk, the page lookup on x86's p2m types (PV and HVM), the
 * IOMMU map/unmap of context 0, and iommu_sync_cache for table frames.
 */
#include <xen/acpi.h>
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
#include <xen/numa.h>
#include <xen/paging.h>
#include <xen/pci.h>
#include <xen/pci_regs.h>
#include <xen/pviommu.h>
#include <xen/random.h>
#include <xen/rangeset.h>
#include <xsm/xsm.h>
#include <asm/e820.h>
#include <asm/hpet.h>
#include <asm/p2m.h>
#include <asm/hvm/hvm.h>
#include <public/pv-iommu.h>

#include "pviommu_engine.h"

/*
 * PVIOMMU_X86_XEN: the Xen version this file is built into, 417 (default)
 * or 420 (build-xen.sh puts "#define PVIOMMU_X86_XEN 420" after the SPDX
 * line of the installed copy when the tree is 4.20). 4.20 takes an sbdf in
 * pci_find_ext_capability() and keeps a PF's VF BAR sizes in
 * pdev->physfn.vf_rlen.
 */
#ifndef PVIOMMU_X86_XEN
#define PVIOMMU_X86_XEN 417
#endif
#if PVIOMMU_X86_XEN >= 420
#define PVX_VF_RLEN(pdev) ((pdev)->physfn.vf_rlen)
#else
#define PVX_VF_RLEN(pdev) ((pdev)->vf_rlen)
#endif

/* Xen 4.17's VIRQ_PV_IOMMU is global (patches/). */
#define pvx_send_revoked_virq(d) send_guest_global_virq(d, VIRQ_PV_IOMMU)
/* lfence (unless the CPU needs none: Xen's alternative patches it out). */
#define pvx_block_speculation() block_speculation()
#include "pviommu-common.inc"

/* ---------------------------------------------------------------- */
/* x86                                                              */
/* ---------------------------------------------------------------- */

/*
 * The hypercall table routes 32-bit PV guests and HVM/PVH vCPUs not
 * executing in 64-bit mode here too.
 */
static bool pvx_caller_not_64bit(struct vcpu *v)
{
    return is_pv_32bit_domain(v->domain) ||
           (is_hvm_vcpu(v) && hvm_guest_x86_mode(v) != 8);
}

void pviommu_log_dirty_enabled(struct domain *d)
{
    /*
     * Called with log-dirty mode just turned on (paging_log_dirty_enable):
     * from here pvx_get_page refuses writable maps of d. The revocation of
     * the writable mappings d already has is the domctl's to drive, slice
     * by slice (pviommu_log_dirty_revoke): this only starts it, so a hook
     * costs nothing under domctl_lock whatever is mapped.
     */
    d->pviommu_log_dirty = 0;
    d->pviommu_log_dirty_slices = 0;
}

int pviommu_log_dirty_revoke(struct domain *d)
{
    unsigned long stack;
    int rc;

    if ( !pviommu_ready || d->pviommu_log_dirty == PVIOMMU_TEARDOWN_DONE )
        return 0;

    if ( d->pviommu_log_dirty == 0 )
    {
        /* Pairs with pvx_get_page(): increment, then paging_mode_log_dirty(). */
        smp_mb();
        if ( !pviommu_domain_in_use(d) )
        {
            d->pviommu_log_dirty = PVIOMMU_TEARDOWN_DONE;
            return 0;
        }
    }

    /*
     * Serialised by the caller: paging_domctl() under domctl_lock, and its
     * continuations, which d->arch.paging.preempt reserves for this one op.
     */
    stack = pvx_stack_paint();
    rc = pviommu_engine_revoke_writes(d->domain_id, &d->pviommu_log_dirty);
    pvx_stack_note(stack, "a log-dirty slice");
    d->pviommu_log_dirty_slices++;

    if ( rc == -ERESTART )
        return rc;

    if ( rc == -EIO )
    {
        /*
         * The IOMMU kept refusing: a device may still write d unseen, so
         * the enable must not answer success (the migration would lose
         * those writes). The stuck entries are retried in turn by the
         * flushes.
         */
        printk(XENLOG_WARNING
               "pviommu: %pd log-dirty: writable device mappings left after %u slices (IOMMU failures)\n",
               d, d->pviommu_log_dirty_slices);
        d->pviommu_log_dirty = PVIOMMU_TEARDOWN_DONE;
        return rc;
    }

    if ( rc )
    {
        /*
         * The engine promises 0, -ERESTART or -EIO. Anything else fails
         * closed as -EIO does: the enable must not answer success with
         * writable device mappings possibly left (a review of 2026-12-06).
         */
        printk(XENLOG_ERR "pviommu: %pd write revocation returned %d\n",
               d, rc);
        ASSERT_UNREACHABLE();
        d->pviommu_log_dirty = PVIOMMU_TEARDOWN_DONE;
        return -EIO;
    }
    else if ( d->pviommu_log_dirty_slices > 1 )
        printk(XENLOG_INFO
               "pviommu: %pd log-dirty: writable mappings revoked in %u slices\n",
               d, d->pviommu_log_dirty_slices);
    d->pviommu_log_dirty = PVIOMMU_TEARDOWN_DONE;

    return 0;
}

int pviommu_vram_revoke(struct domain *d, unsigned long first,
                        unsigned long nr)
{
    unsigned long stack;
    int rc;

    BUILD_BUG_ON(sizeof(d->pviommu_vram_sweep) !=
                 sizeof(struct pviommu_range_sweep));

    /*
     * No shortcut here for a domain nothing maps (the gfn hooks' one): the
     * engine returns at once then, and a sweep left from an abandoned
     * continuation goes with that call. Skipping the engine kept such a
     * sweep, and the next call for the same range resumed past cells that
     * had gained writable mappings meanwhile (left to the in-lock hook;
     * a review, 2026-12-03). The simulator calls the engine the same way.
     */
    if ( !pviommu_ready )
        return 0;

    /*
     * nr == 0: hap_track_dirty_vram() ends other than by continuing (the
     * type change made, a peek, tracking stopped, a failure): the range a
     * revocation refuses writable maps of is lifted (pvx_vram_sweeping()),
     * one an abandoned continuation left included. Skipped while another
     * vCPU's call is in the engine: that call's own end lifts it.
     */
    if ( !nr )
    {
        struct pviommu_range_sweep *s =
            (struct pviommu_range_sweep *)d->pviommu_vram_sweep;

        if ( test_and_set_bit(0, &d->pviommu_vram_busy) )
            return 0;
        /* last first: a lookup meanwhile sees an empty range, no other. */
        write_atomic(&s->last, 0);
        write_atomic(&s->first, 0);
        write_atomic(&s->cursor, 0);
        clear_bit(0, &d->pviommu_vram_busy);
        return 0;
    }

    /* Another vCPU of the device model is at it: come back (dm_op). */
    if ( test_and_set_bit(0, &d->pviommu_vram_busy) )
        return -ERESTART;

    stack = pvx_stack_paint();
    rc = pviommu_engine_revoke_writes_in(
             d->domain_id, first, nr,
             (struct pviommu_range_sweep *)d->pviommu_vram_sweep);
    pvx_stack_note(stack, "a VRAM slice");

    clear_bit(0, &d->pviommu_vram_busy);

    if ( rc == -EIO )
        /*
         * The IOMMU kept refusing: a device may still write the range, so
         * tracking must not move there (the type change's hook cannot
         * fail). The stuck entries are retried in turn by the flushes.
         */
        pvx_printk_limited(
            "pviommu: %pd VRAM %#lx+%#lx: writable device mappings left (IOMMU failures)\n",
            d, first, nr);
    else if ( rc && rc != -ERESTART )
    {
        /* The engine promises 0, -ERESTART or -EIO: fail closed. */
        printk(XENLOG_ERR "pviommu: %pd VRAM revocation returned %d\n", d, rc);
        ASSERT_UNREACHABLE();
        rc = -EIO;
    }

    return rc;
}

/* ---- Reserved BFN regions and limits (built once at boot) ---- */

/*
 * A range of mmio_ro_ranges (MFNs, both ends included), as MMIO: so the
 * IO-APIC pages and the like below 4 GiB merge into the hole reserved
 * there (regions merge only with their own kind). An MCFG window there
 * and in the MCFG table takes two slots; of the MCFG kind, every IO-APIC
 * took one of its own, and a large host could fill the table (a review
 * of 2026-12-07).
 */
static int __init cf_check pvx_ro_mmio_region(unsigned long s, unsigned long e,
                                              void *unused)
{
    pvx_add_region(s, e - s + 1, PVIOMMU_REGION_MMIO);

    return 0;
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
/*
 * The 64-bit memory BAR at config register `reg` (and `reg` + 4), not
 * sized: a BAR is aligned to its size, so [addr, addr + lowest set bit)
 * covers it (perhaps more, never less). Address 0: unassigned, nothing.
 */
static void __init pvx_add_unsized_bar(pci_sbdf_t sbdf, unsigned int reg)
{
    uint64_t addr = (pci_conf_read32(sbdf, reg) & PCI_BASE_ADDRESS_MEM_MASK) |
                    ((uint64_t)pci_conf_read32(sbdf, reg + 4) << 32);

    if ( addr )
        pvx_add_range(addr, addr & -addr, PVIOMMU_REGION_MMIO);
}

/* PCI class of a host bridge (drivers/passthrough/pci.c keeps it private). */
#define PVX_CLASS_BRIDGE_HOST 0x0600
/* PCI base class of a display controller (no Xen header names it). */
#define PVX_BASE_CLASS_DISPLAY 0x03

static int __init cf_check pvx_pdev_windows(struct pci_dev *pdev, void *arg)
{
    const pci_sbdf_t sbdf = pdev->sbdf;
    uint8_t type = pci_conf_read8(sbdf, PCI_HEADER_TYPE) & 0x7f;
    unsigned int i, nbars, pos;
    uint16_t cmd, class;
    bool sized, has64;

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
         */
        if ( !pdev->ignore_bars &&
             (pci_conf_read32(sbdf, PCI_BASE_ADDRESS_0) &
              (PCI_BASE_ADDRESS_SPACE | PCI_BASE_ADDRESS_MEM_TYPE_MASK)) ==
             PCI_BASE_ADDRESS_MEM_TYPE_64 )
            pvx_add_unsized_bar(sbdf, PCI_BASE_ADDRESS_0);
        return 0;
    }
    else if ( type == PCI_HEADER_TYPE_NORMAL )
        nbars = 6;
    else
        return 0;

    /*
     * Xen's quirks list devices whose BAR registers are not BARs (a CSR at
     * the offset, or junk: apply_quirks()); vPCI leaves them alone too. (A
     * bridge's window above is not a BAR: it stays reserved.)
     */
    if ( pdev->ignore_bars )
        return 0;

    /*
     * Memory decode goes off only to size a 64-bit memory BAR (the window
     * is above 4 GiB: 32-bit BARs are below its floor), and never on:
     * - a host bridge (Linux's mmio_always_on: it may decode more than its
     *   BARs);
     * - one of Xen's own devices (dom_xen's: its serial console, debug
     *   port or xHCI DbC), which would cut Xen's console off for a moment.
     *   Their BARs are reserved all the same (a review of 2026-12-05: they
     *   were skipped, and one above RAM's end was a BFN the engine could
     *   hand out, a peer's DMA to it reaching Xen's debug controller);
     * - a display controller, whose framebuffer may be Xen's console.
     * Their BARs are taken from their addresses, as a bridge's are
     * (pvx_add_unsized_bar: perhaps more than the BAR, never less).
     */
    class = pci_conf_read16(sbdf, PCI_CLASS_DEVICE);
    sized = pdev->domain != dom_xen && class != PVX_CLASS_BRIDGE_HOST &&
            (class >> 8) != PVX_BASE_CLASS_DISPLAY;
    for ( i = 0, has64 = false; i < nbars; i++ )
    {
        uint32_t bar = pci_conf_read32(sbdf, PCI_BASE_ADDRESS_0 + i * 4);

        if ( (bar & (PCI_BASE_ADDRESS_SPACE | PCI_BASE_ADDRESS_MEM_TYPE_MASK)) !=
             PCI_BASE_ADDRESS_MEM_TYPE_64 )
            continue;
        /*
         * A 64-bit BAR needs the next register for its upper half: one in
         * the last slot is malformed, and pci_size_mem_bar() would write
         * ~0 into it before refusing it (PCI_BAR_LAST) and never restore
         * it. It is neither sized nor counted.
         */
        if ( i + 1 >= nbars )
            break;
        has64 = true;
        if ( !sized )
            pvx_add_unsized_bar(sbdf, PCI_BASE_ADDRESS_0 + i * 4);
        i++; /* the upper half */
    }
    if ( !has64 || !sized )
        goto vf_bars;

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
        if ( i + 1 >= nbars )
            break; /* malformed (above): never written */
        addr = size = 0;
        i += pci_size_mem_bar(sbdf, reg, &addr, &size, 0);
        if ( addr ) /* an unassigned BAR decodes nothing */
            pvx_add_range(addr, size, PVIOMMU_REGION_MMIO);
    }

    if ( cmd & PCI_COMMAND_MEMORY )
        pci_conf_write16(sbdf, PCI_COMMAND, cmd);

 vf_bars:
    /*
     * VF BARs, by the sizes pci_add_device() reads into vf_rlen. That runs
     * when dom0 reports the device (PHYSDEVOP_pci_device_add), after this
     * initcall: at boot vf_rlen is still 0 and no VF BAR is reserved here
     * (a review against 4.17's drivers/passthrough/pci.c found this; the
     * comment used to say the sizes were read). VFs behind a switch are
     * covered by the switch's downstream-port windows reserved above,
     * which is where peer-to-peer routing happens; sizing VF BARs here as
     * pci_add_device does (VFE clear only) is left, untested without an
     * SR-IOV device under QEMU 7.2.
     */
#if PVIOMMU_X86_XEN >= 420
    pos = pci_find_ext_capability(sbdf, PCI_EXT_CAP_ID_SRIOV);
#else
    pos = pci_find_ext_capability(sbdf.seg, sbdf.bus, sbdf.devfn,
                                  PCI_EXT_CAP_ID_SRIOV);
#endif
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
            /* (A product past 64 bits reserves to the top.) */
            if ( addr && PVX_VF_RLEN(pdev)[i] && total )
                pvx_add_range(addr,
                              PVX_VF_RLEN(pdev)[i] > ~(uint64_t)0 / total
                              ? ~(uint64_t)0 : PVX_VF_RLEN(pdev)[i] * total,
                              PVIOMMU_REGION_MMIO);
            i++; /* the upper half */
        }
    }

    return 0;
}

/*
 * The frame below which RAM may be hot-added later. memory_add() takes a
 * hot-add inside any SRAT memory block, hot-pluggable or not
 * (valid_numa_range()), so the end of the highest block bounds it
 * (numa_memblks_end(), patch 0003), not only mem_hotplug (the end of the
 * hot-pluggable ones, which was all the glue reserved before 2026-12-06).
 * Rounded up to a frame without wrapping, whatever the firmware says.
 * (Tested on the host: tests/srat-end.sh.)
 */
static uint64_t __init pvx_hotadd_end_pfn(void)
{
    uint64_t end = max_t(uint64_t, mem_hotplug, numa_memblks_end());

    return end ? PFN_DOWN(end - 1) + 1 : 0;
}

static void __init pvx_build_regions(void)
{
    uint64_t low_end = 0, hotadd_pfn;
    unsigned int i;

    /* The interrupt (MSI) window. */
    pvx_add_region(PFN_DOWN(0xfee00000UL), 0x100, PVIOMMU_REGION_MSI);

    /*
     * AMD and Hygon hosts: the HyperTransport range, the 12 GiB below
     * 1 TiB (0xfd00000000-0xffffffffff). A DMA there is never a
     * translated memory access: the IOMMU handles its parts as interrupt,
     * system-management, EOI or legacy requests, or aborts it (the AMD
     * IOMMU specification's special address ranges). Linux reserves it in
     * every AMD-Vi domain on every family (amd_iommu_get_resv_regions()),
     * unless the IOMMU says it ignores the range (EFR2 HT-range-ignore;
     * reserving it there too costs only those BFNs),
     * and QEMU moves a guest's RAM past it on AMD CPUs. A BFN window that
     * reaches it (RAM ending within a quota of 1 TiB) must skip it, or a
     * device's DMA to such a BFN raises an interrupt request instead of
     * reaching the page. On family 17h and later the CPU-side range moved
     * to the top 12 GiB of the physical address space, which Xen keeps
     * out of dom0's reach (dom0_build.c, the same test). The IOMMU does
     * not decode that one specially (Linux reserves only the first); it
     * is reserved as a precaution that follows Xen's own choice, at the
     * cost of 12 GiB of BFNs far above any window a host's RAM needs.
     */
    if ( boot_cpu_data.x86_vendor & (X86_VENDOR_AMD | X86_VENDOR_HYGON) )
    {
        pvx_add_range(0xfd00000000UL, 0x10000000000UL - 0xfd00000000UL,
                      PVIOMMU_REGION_PLATFORM);
        if ( boot_cpu_data.x86 >= 0x17 )
            pvx_add_range((1UL << paddr_bits) - (3UL << 32), 3UL << 32,
                          PVIOMMU_REGION_PLATFORM);
    }

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

    /*
     * Anything firmware reserves above 4 GiB (e.g. MMCONFIG). (Its end
     * compared without the sum, which a range ending at 2^64 wraps.)
     */
    for ( i = 0; i < e820.nr_map; i++ )
        if ( e820.map[i].type != E820_RAM &&
             (e820.map[i].addr >= GB(4) ||
              e820.map[i].size > GB(4) - e820.map[i].addr) )
            pvx_add_range(e820.map[i].addr, e820.map[i].size,
                          PVIOMMU_REGION_PLATFORM);

    /*
     * PCI config space (MMCFG/ECAM), every window the MCFG table lists,
     * whether Xen uses it yet or not (dom0 may confirm one later), and
     * whatever Xen keeps read-only for devices by now (mmio_ro_ranges: the
     * MMCFG windows it uses, IO-APIC pages), and the HPET's pages, which
     * dom0's build adds to it after this runs (dom0_setup_permissions():
     * read-only to dom0, or denied, 16 pages where the table says
     * ACPI_HPET_PAGE_PROTECT64; below 4 GiB on every host we know, in the
     * hole reserved above, so no slot of its own there). Xen 4.20
     * identity-maps these into a PV dom0's context 0 wherever they are,
     * and takes an MMCFG window in a memory hole the E820 leaves out
     * (4.20's mmconfig-shared.c): above 4 GiB one could lie in the BFN
     * window, where a map would replace dom0's identity entry and its
     * unmap leave the entry empty (a review of 2026-12-07; 4.17 maps only
     * the E820's reserved items, above).
     */
    for ( i = 0; i < pci_mmcfg_config_num; i++ )
    {
        const struct acpi_mcfg_allocation *c = &pci_mmcfg_config[i];

        if ( c->end_bus_number >= c->start_bus_number )
            pvx_add_range(c->address + ((uint64_t)c->start_bus_number << 20),
                          ((uint64_t)(c->end_bus_number -
                                      c->start_bus_number) + 1) << 20,
                          PVIOMMU_REGION_PLATFORM);
    }
    rangeset_report_ranges(mmio_ro_ranges, 0, ~0UL, pvx_ro_mmio_region, NULL);
    if ( hpet_address )
        pvx_add_range(hpet_address & PAGE_MASK, 16 * PAGE_SIZE,
                      PVIOMMU_REGION_MMIO);

    /* SRAT memory blocks: RAM may appear there later. */
    hotadd_pfn = pvx_hotadd_end_pfn();
    if ( hotadd_pfn > max_page )
        pvx_add_region(max_page, hotadd_pfn - max_page,
                       PVIOMMU_REGION_PLATFORM);

    if ( iommu_get_reserved_device_memory(pvx_rdm_region, NULL) < 0 )
        printk(XENLOG_WARNING "pviommu: could not list RMRR/IVMD ranges\n");

    pcidevs_lock();
    pci_for_each_pdev(pvx_pdev_windows, NULL);
    pcidevs_unlock();

    /* RAM, including what may be hot-added later, ends here. */
    pvx_ram_end = max_t(uint64_t, max_page, hotadd_pfn);

    /*
     * The IOMMU driver knows how many address bits a context translates
     * (VT-d and AMD-Vi say, patch 0003); 39 (3-level VT-d, the narrowest
     * common width) for a driver that does not.
     */
    pvx_addr_bits = 39;
    if ( iommu_enabled && iommu_get_ops()->pviommu_address_bits )
        pvx_addr_bits = iommu_call(iommu_get_ops(), pviommu_address_bits);
}

/*
 * An IOMMU in use. With iommu=off, no DMAR or IVRS table, or an IOMMU
 * set-up that failed (iommu_setup() ran before the initcalls), nothing
 * could ever translate a BFN: every map would answer EADDRNOTAVAIL and
 * every context op EOPNOTSUPP. The hypercall and the hooks stay off rather
 * than serve nothing, and the engine's boot tables are not made (a review
 * of 2026-12-07).
 */
static bool __init pvx_arch_wanted(void)
{
    if ( iommu_enabled )
        return true;
    printk(XENLOG_INFO "pviommu: no IOMMU in use: off\n");
    return false;
}

static void __init pvx_arch_ready(void)
{
    printk(XENLOG_INFO
           "pviommu: hypercall %d ready: RAM end %#"PRIx64", %u address bits, %u reserved regions\n",
           __HYPERVISOR_pv_iommu_op, pvx_ram_end, pvx_addr_bits,
           pvx_nr_regions);
}

/* ---- pvx_*: x86's primitives for the engine ---- */

/* Types a device may be given a page of, and which of them it may write. */
static bool pvx_type_readable(p2m_type_t t)
{
    return t == p2m_ram_rw || t == p2m_ram_ro || t == p2m_ram_logdirty ||
           t == p2m_ioreq_server;
}

/*
 * The VRAM range the engine published for its revocation
 * (pviommu_vram_revoke()), [*first, *last): the one published, or empty.
 * The engine writes it with no lock, a word at a time: last = 0, then
 * first, then last (a lift: last = 0, then first = 0). Two loads, first
 * then last, could see first from before and last from after a new range
 * was written, a range neither old nor new (an audit of 2026-12-06: a map
 * outside both refused for a moment, or one inside the new range let
 * past the freeze to the walk). Reading last on both sides of first and
 * answering empty unless the two agree gives the old range, the new one,
 * or empty, as the engine's comment says (empty: a map let through is the
 * walk's, which starts after these stores), for a reader that one
 * publication overlaps. Two or more inside the three loads (A, then B,
 * then C whose last is A's, lifts between them or not) can still give
 * B's first with C's last: a stall across two dm_ops. That is harmless
 * as an empty answer is: the freeze only bounds the work left to the type
 * change's hook, and a map let through meets the moved sequence number
 * or the walk (a lift between two ranges ending on the same last is such
 * a pair: old last, the lift's first 0, new last). tests/vram-range.sh
 * tries every interleaving of the loads with one publication, from a
 * range or from a lifted one.
 */
static void pvx_vram_range(const struct domain *d, uint64_t *first,
                           uint64_t *last)
{
    const struct pviommu_range_sweep *s =
        (const struct pviommu_range_sweep *)d->pviommu_vram_sweep;
    uint64_t l = ACCESS_ONCE(s->last), f;

    smp_rmb();
    f = ACCESS_ONCE(s->first);
    smp_rmb();
    if ( ACCESS_ONCE(s->last) != l )
        l = f = 0;
    *first = f;
    *last = l;
}

/*
 * Whether gfn is in the VRAM range whose device write access is being
 * revoked (pviommu_vram_revoke(), between hap_track_dirty_vram()'s
 * continuations; the engine writes the range before its first slice moves
 * the target's sequence number, which a map checks again after its
 * lookup). Writable maps of it are refused meanwhile: what the walk had
 * passed would otherwise be left to the type change's hook, which revokes
 * it all in one hold of the p2m lock (a review of 2026-12-06). The
 * engine's RangeSweep::freezes_writes_to(), which the simulator asks.
 */
static bool pvx_vram_sweeping(const struct domain *d, uint64_t gfn)
{
    uint64_t first, last;

    pvx_vram_range(d, &first, &last);
    return first <= gfn && gfn < last;
}

/*
 * A PV domain's "gfn" is a machine frame its caller chose: the frame
 * referenced if d owns it, else NULL with nothing taken. get_page() without
 * its log line, which get_page_from_gfn() would print (the frame's owner
 * and counts) for every frame that is not d's, with no rate limit on a
 * debug build or with guest_loglvl=all: a line a map op, 1024 a call, at
 * the caller's will (a review of 2026-12-07).
 */
static struct page_info *pvx_pv_frame_page(const struct domain *d,
                                           uint64_t mfn)
{
    struct page_info *pg;
    const struct domain *owner;

    /* (mfn_valid() resolves its bound under speculation.) */
    if ( !mfn_valid(_mfn(mfn)) )
        return NULL;
    pg = mfn_to_page(_mfn(mfn));
    owner = page_get_owner_and_reference(pg);
    if ( likely(owner == d) )
        return pg;
    if ( owner )
        put_page(pg);

    return NULL;
}

/*
 * Whether get_page_type(pg, PGT_writable_page) would fail for a type in use
 * other than writable (a PV page table or descriptor page): asked first,
 * because _get_page_type() logs that failure on a debug build, a line a map
 * op at the caller's will (the same review). A type taken after this look
 * still fails there, logged once: the guest's own race.
 */
static bool pvx_writable_type_refused(const struct page_info *pg)
{
    unsigned long x = ACCESS_ONCE(pg->u.inuse.type_info);

    return (x & PGT_count_mask) && (x & PGT_type_mask) != PGT_writable_page;
}

/*
 * Patch 0008 (xen/pviommu.h): an IOMMU fault of seg:bdf at DMA address
 * addr, from VT-d's or AMD-Vi's fault tasklet, is one a revocation made.
 * The device is the real one behind a phantom function, as
 * pci_check_disable_device() counts it; its owner comes from Xen's own
 * books (no vendor op: AMD-Vi has none of PV-IOMMU's, a review of
 * 2026-12-07). Never for an owner dying or shut down (crashed, or kept
 * with on_crash=preserve): it will acknowledge nothing, and Xen's rule
 * stands as for any device.
 */
bool pviommu_fault_expected(uint16_t seg, uint16_t bdf, uint64_t addr)
{
    static s_time_t last;
    const struct pci_dev *pdev;
    const struct domain *owner;
    pci_sbdf_t sbdf = PCI_SBDF(seg, bdf);
    unsigned long stack;
    bool expected = false;

    ASSERT(!in_irq());
    /* No BFN outside the window: asked before the global lock. */
    if ( !pviommu_ready || !pvx_run_in_window(addr >> PAGE_SHIFT, 1) )
        return false;

    pvx_devices_lock();
    pdev = pci_get_real_pdev(sbdf);
    owner = pdev ? pdev->domain : NULL;
    if ( owner && !owner->is_dying && !owner->is_shutting_down )
    {
        sbdf = pdev->sbdf;
        stack = pvx_stack_paint();
        expected = pviommu_engine_fault_expected(owner->domain_id, sbdf.sbdf,
                                                 addr >> PAGE_SHIFT);
        pvx_stack_note(stack, "a fault");
    }
    pvx_devices_unlock();

    /*
     * Why Xen left the device on, said a line a second at most host-wide:
     * a limit of its own, since the faults' own lines spend
     * printk_ratelimit()'s.
     */
    if ( expected && pvx_once_a_second(&last) )
        printk(XENLOG_INFO
               "pviommu: %pp DMA fault at BFN %#"PRIx64" after its revocation: not counted against the device\n",
               &sbdf, addr >> PAGE_SHIFT);

    return expected;
}

/* For pvx_get_page(): the lookup on x86's p2m types, PV and HVM. */
static struct page_info *pvx_lookup_page(struct domain *d, uint64_t gfn,
                                         int want_write, p2m_type_t *t,
                                         uint32_t *kind)
{
    struct page_info *pg;

    /*
     * Device writes would escape dirty logging (migration); and a VRAM
     * range being revoked is refused them as log-dirty is.
     */
    if ( want_write &&
         (paging_mode_log_dirty(d) || pvx_vram_sweeping(d, gfn)) )
    {
        *kind = PVX_PAGE_LOG_DIRTY;
        return NULL;
    }

    /*
     * PV: no p2m, so no paging, sharing or PoD. The "gfn" is a machine
     * frame, and one that is not d's (Xen's, another domain's, or none) is
     * simply not present in d: answering EXDEV for a frame that exists,
     * ENXIO for one that does not, told a device model of a PV guest which
     * machine frames exist (a review of 2026-12-05). The caller's initial
     * NOT_PRESENT stands.
     */
    if ( !paging_mode_translate(d) )
    {
        *t = p2m_ram_rw;
        return pvx_pv_frame_page(d, gfn);
    }

    /*
     * As get_paged_frame() (grant_table.c): populate PoD, unshare. Shared
     * pages are unshared for read-only maps too, so the page's owner is d
     * (revocation and the reference count above key on the owner).
     */
    pg = get_page_from_gfn(d, gfn, t, P2M_ALLOC | P2M_UNSHARE);

    if ( p2m_is_paging(*t) )
    {
        if ( pg )
            put_page(pg);
#ifdef CONFIG_MEM_PAGING
        /*
         * Ask the pager for another domain's page only. For the caller's
         * own page p2m_mem_paging_populate() may sleep for a ring slot
         * (vm_event_claim_slot() waits only when d is current->domain) and
         * pauses this vCPU, while pvx_get_page() holds d's RCU read lock
         * and the engine a map run's earlier page references. (Reaching it
         * needs a caller whose own memory is paged: with an IOMMU Xen
         * refuses paging, -EMLINK, so only a control domain that is not
         * the hardware domain, on a host with the IOMMU off, could.) A
         * domain pages its own page in by touching it; until then the map
         * answers EAGAIN. The simulator follows the same rule.
         */
        if ( d != current->domain )
            p2m_mem_paging_populate(d, _gfn(gfn));
#endif
        *kind = PVX_PAGE_PAGED_OUT;
        return NULL;
    }
    if ( p2m_is_shared(*t) )
    {
        /* Unsharing failed for lack of memory: retry later, as grants do. */
        *kind = PVX_PAGE_PAGED_OUT;
        goto drop;
    }
    if ( p2m_is_grant(*t) || p2m_is_foreign(*t) )
    {
        *kind = PVX_PAGE_GRANT;
        goto drop;
    }
    /*
     * An HVM gfn with nothing behind it reads back as p2m_mmio_dm (emulated
     * by the device model; the default for holes), or p2m_invalid: that is
     * "not present", not MMIO.
     */
    if ( *t == p2m_mmio_dm || *t == p2m_invalid )
    {
        *kind = PVX_PAGE_NOT_PRESENT;
        goto drop;
    }
    if ( p2m_is_mmio(*t) )
    {
        *kind = PVX_PAGE_MMIO;
        goto drop;
    }
    return pg;

 drop:
    if ( pg )
        put_page(pg);
    return NULL;
}

/* For pvx_get_pages(): the run's pages frames[0]'s p2m entry maps (patch 0006). */
static uint32_t pvx_page_run(struct domain *d, uint64_t *frames, uint32_t nr,
                             int want_write, p2m_type_t *t)
{
    uint64_t first, last;

    /*
     * PV: no p2m (each page's own lookup is a frame check). Log-dirty, or
     * a VRAM range being revoked (pvx_vram_sweeping()): pvx_lookup_page()
     * refuses writable maps page by page, and says so.
     */
    if ( !paging_mode_translate(d) )
        return 0;
    if ( want_write )
    {
        if ( paging_mode_log_dirty(d) )
            return 0;
        pvx_vram_range(d, &first, &last);
        if ( first < last )
            return 0;
    }
    return p2m_get_entry_pages(p2m_get_hostp2m(d), frames, nr, t);
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
     *
     * mfn_valid() (its bound is evaluate_nospec()) as pvx_put_page(): the
     * frame_table index stays in bounds, even under speculation. (The
     * engine passes only frames it was given and still holds; a run's
     * slots past those hold gfns, or frames already handed back after a
     * refusal mid-run, and are never passed.)
     */
    ASSERT_NOT_IN_ATOMIC();
    if ( !mfn_valid(_mfn(mfn)) )
    {
        ASSERT_UNREACHABLE();
        return;
    }
    set_bit(_PGT_non_coherent, &mfn_to_page(_mfn(mfn))->u.inuse.type_info);
}

/*
 * Xen's mapping_order() (static in drivers/passthrough/iommu.c): the
 * largest page size the IOMMU has at which dfn and mfn are both aligned and
 * that the nr pages left cover. (ffsl() - 1 for 4.17's find_first_set_bit(),
 * which 4.19 removed; 4.20's mapping_order() reads the same.)
 */
static unsigned int pvx_mapping_order(const struct domain_iommu *hd, dfn_t dfn,
                                      mfn_t mfn, unsigned long nr)
{
    unsigned long res = dfn_x(dfn) | mfn_x(mfn);
    unsigned long sizes = hd->platform_ops->page_sizes;
    unsigned int bit = ffsl(sizes) - 1, order = 0;

    ASSERT(bit == PAGE_SHIFT);

    while ( (sizes = (sizes >> bit) & ~1) )
    {
        unsigned long mask;

        bit = ffsl(sizes) - 1;
        mask = (1UL << bit) - 1;
        if ( nr <= mask || (res & mask) )
            break;
        order += bit;
        nr >>= bit;
        res >>= bit;
    }

    return order;
}

/*
 * iommu_unmap() and iommu_map() of a run, the same calls into the IOMMU
 * driver (one unmap_page or map_page per part, mapping_order()), without
 * their domain_crash(): Xen 4.17 crashes a domain other than the hardware
 * domain when a call fails (no memory for a table, or for a split), and a
 * driver domain may be a device model's stub domain. Here the failure is
 * the engine's to answer, as for dom0: a map it retries page by page and
 * revokes (a notice), an unmap whose entry it keeps, the page referenced,
 * and retries at its next flush. VT-d's driver answers -ENOMEM; AMD-Vi's
 * amd_iommu_map_page() and amd_iommu_unmap_page() crashed any domain,
 * the hardware domain (the host) included, when they could not allocate a
 * table or split a superpage, and do not while pviommu_driver_call is set
 * on this CPU (patches/0007; these loops set it, and neither sleep nor run
 * from an interrupt). A failed IOTLB flush (iommu_iotlb_flush()) still
 * crashes a domain other than the hardware domain: the engine fails closed
 * all the same, and that domain's teardown releases everything. Failures
 * are logged, rate limited, as Xen's loops log them.
 * The caller checked the run (window, width, frames) and that the
 * domain's IOMMU is enabled. Not preemptible: runs are at most
 * PVX_IOMMU_RUN_MAX pages.
 */
DEFINE_PER_CPU(bool, pviommu_driver_call);

static int pvx_unmap_run(struct domain *d, dfn_t dfn0, unsigned long count,
                         unsigned int *flush)
{
    const struct domain_iommu *hd = dom_iommu(d);
    bool outer = this_cpu(pviommu_driver_call);
    unsigned long i;
    unsigned int order;
    int rc = 0;

    ASSERT(!in_irq());
    this_cpu(pviommu_driver_call) = true;

    /* As Xen's for the hardware domain: every part is tried. */
    for ( i = 0; i < count; i += 1UL << order )
    {
        dfn_t dfn = dfn_add(dfn0, i);
        int err;

        order = pvx_mapping_order(hd, dfn, _mfn(0), count - i);
        err = iommu_call(hd->platform_ops, unmap_page, d, dfn,
                         IOMMUF_order(order), flush);
        if ( likely(!err) )
            continue;
        pvx_printk_limited(
            "pviommu: d%d: IOMMU unmap of dfn %"PRI_dfn" order %u failed: %d\n",
            d->domain_id, dfn_x(dfn), order, err);
        if ( !rc )
            rc = err;
    }
    this_cpu(pviommu_driver_call) = outer;

    return rc;
}

static int pvx_map_run(struct domain *d, dfn_t dfn0, mfn_t mfn0,
                       unsigned long count, unsigned int flags,
                       unsigned int *flush)
{
    const struct domain_iommu *hd = dom_iommu(d);
    bool outer = this_cpu(pviommu_driver_call);
    unsigned long i;
    unsigned int order;
    int rc = 0;

    ASSERT(!in_irq());
    this_cpu(pviommu_driver_call) = true;
    for ( i = 0; i < count; i += 1UL << order )
    {
        dfn_t dfn = dfn_add(dfn0, i);
        mfn_t mfn = mfn_add(mfn0, i);

        order = pvx_mapping_order(hd, dfn, mfn, count - i);
        rc = iommu_call(hd->platform_ops, map_page, d, dfn, mfn,
                        flags | IOMMUF_order(order), flush);
        if ( likely(!rc) )
            continue;
        pvx_printk_limited(
            "pviommu: d%d: IOMMU map of dfn %"PRI_dfn" order %u failed: %d\n",
            d->domain_id, dfn_x(dfn), order, rc);
        /*
         * What the run mapped goes again (as Xen's iommu_map(): a failure
         * there leaves entries the engine's page-by-page retry finds).
         */
        pvx_unmap_run(d, dfn0, i, flush);
        break;
    }
    this_cpu(pviommu_driver_call) = outer;

    return rc;
}

int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn, uint64_t count,
                  unsigned int flags, unsigned int *flush)
{
    struct domain *d;
    unsigned int iflags = 0;
    long rc;

    /*
     * The engine's runs: its window's BFNs (above host RAM), frames it
     * holds a reference to each of (so the first and last being valid
     * frames is a check of the arithmetic, not of each frame), at most
     * the entries it lets wait.
     */
    if ( !count || count > PVX_IOMMU_RUN_MAX || bfn + count < bfn ||
         mfn + count < mfn || pvx_run_refused("map", bfn, count) ||
         !mfn_valid(_mfn(mfn)) || !mfn_valid(_mfn(mfn + count - 1)) ||
         !pvx_run_frames_held(mfn, count) )
        return -EINVAL;
    d = rcu_lock_domain_by_id(owner);
    if ( !d )
        return -ESRCH;
    /*
     * iommu_map() would succeed without mapping anything; or, past the
     * width the driver built the domain's tables for, fail in a way the
     * driver may answer with domain_crash() (AMD-Vi: no PDE for the DFN).
     * The engine's window already ends below 2^pvx_addr_bits.
     */
    if ( pvx_translation(d) != PVIOMMU_TRANSLATES || !is_iommu_enabled(d) ||
         pvx_addr_bits < PAGE_SHIFT || pvx_addr_bits - PAGE_SHIFT >= 64 ||
         ((bfn + count - 1) >> (pvx_addr_bits - PAGE_SHIFT)) != 0 )
    {
        rcu_unlock_domain(d);
        return -EADDRNOTAVAIL;
    }
    if ( flags & PVIOMMU_F_READ )
        iflags |= IOMMUF_readable;
    if ( flags & PVIOMMU_F_WRITE )
        iflags |= IOMMUF_writable;

    /*
     * Each part aligned to 2 MiB in both BFN and frame is one order-9
     * map_page (mapping_order()). On failure what the run mapped is
     * unmapped again as far as it can be (an unmap that must split a
     * superpage may fail), and the run's range is marked for the engine's
     * flush, which covers it. No domain_crash() here, nor in AMD-Vi's
     * driver (patches/0007): see pvx_map_run(). Not preemptible: runs are
     * bounded by the engine's DEFER_LIMIT.
     */
    rc = pvx_map_run(d, _dfn(bfn), _mfn(mfn), count, iflags, flush);
    rcu_unlock_domain(d);
    if ( rc )
        *flush |= IOMMU_FLUSHF_modified;

    /* (Any non-zero answer is a failure: a positive one too, never 0.) */
    return rc;
}

int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int *flush)
{
    struct domain *d;
    long rc;
    int refused;

    /*
     * The engine's runs are of its window's BFNs, above host RAM and below
     * 2^pvx_addr_bits (pvx_iommu_map() refuses any other), and no longer
     * than the entries it lets wait: anything else is a bug to refuse, not
     * to unmap (it could reach the domain's own mappings below the window).
     */
    if ( !count || count > PVX_IOMMU_RUN_MAX || bfn + count < bfn )
        return -EINVAL;
    /* (Before the width checks: the window ends below the width.) */
    refused = pvx_unmap_refused(bfn, count);
    if ( refused )
        return refused;
    if ( pvx_addr_bits < PAGE_SHIFT || pvx_addr_bits - PAGE_SHIFT >= 64 ||
         ((bfn + count - 1) >> (pvx_addr_bits - PAGE_SHIFT)) != 0 )
        return -EINVAL;
    d = rcu_lock_domain_by_id(owner);
    if ( !d )
        return -ESRCH;
    if ( !is_iommu_enabled(d) )
    {
        /* (Nothing was mapped: pvx_iommu_map() refuses such a domain.) */
        rcu_unlock_domain(d);
        return 0;
    }
    /*
     * PV-IOMMU maps 4k entries, but Xen 4.17's VT-d code folds a full,
     * contiguous 512-entry run into a superpage, and unmapping one page of
     * it must split it again: that can fail with -ENOMEM. A run that
     * covers the whole aligned 2 MiB is cleared with one order-9 call
     * (mapping_order(), where the IOMMU reports 2 MiB pages: VT-d's
     * SLLPS, always on AMD-Vi), which splits nothing. On failure the engine
     * retries page by page, and keeps a page it still cannot unmap
     * referenced, its BFN poisoned, retried at each flush: for every
     * driver domain, as for dom0 (no domain_crash() here, nor in AMD-Vi's
     * driver with patches/0007, see pvx_map_run()).
     * Not preemptible: the engine's runs are bounded by its batches (its
     * DEFER_LIMIT), as the page-at-a-time loop it replaces was.
     */
    rc = pvx_unmap_run(d, _dfn(bfn), count, flush);
    rcu_unlock_domain(d);
    /*
     * A failed run may have cleared some of its entries (every part is
     * tried), and the driver may not have set a flag for the part that
     * failed. The engine's page-by-page retry finds those entries gone and
     * releases their pages after its own flush, which must then not be
     * skipped for want of a flag.
     */
    if ( rc )
        *flush |= IOMMU_FLUSHF_modified;

    /* (Any non-zero answer is a failure: a positive one too, never 0.) */
    return rc;
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

/*
 * Does a device's write through a write-back map of a driver domain's own
 * tables snoop the CPU caches? VT-d sets SNP on leaves only when every unit
 * has snoop control (iommu_snoop, cleared by the VT-d setup otherwise; a
 * client platform's graphics unit often lacks it); AMD-Vi sets FC on every
 * leaf, and iommu_snoop, VT-d's, stays set there. Boot only.
 */
int pvx_default_context_snooped(void)
{
    return iommu_snoop;
}

/* How a table store reaches memory the IOMMU reads (ECAP.C clear). */
#define PVX_TABLE_WRITEBACK(va, len) iommu_sync_cache(va, len)
#include "pviommu-tables.inc"
