/* SPDX-License-Identifier: MIT */
/*
 * pviommu.c -- Xen side of the PV-IOMMU (hypercall 43, __HYPERVISOR_pv_iommu_op).
 *
 * Copied to xen/common/pviommu.c by hypervisor-side/xen/build-xen.sh. The
 * policy and the BFN table live in the Rust engine (rust_engine.o, entry
 * points pviommu_engine_*); this file is the thin C glue: the hypercall
 * handler, one global engine lock, the domain-death and gfn-removal hooks,
 * and the pvx_* primitives the engine calls (see pviommu_engine.h).
 *
 * Every pvx_* function is called directly from Rust (never through a
 * pointer), so none is cf_check.
 */
#include <xen/init.h>
#include <xen/lib.h>
#include <xen/sched.h>
#include <xen/spinlock.h>
#include <xen/guest_access.h>
#include <xen/hypercall.h>
#include <xen/event.h>
#include <xen/iommu.h>
#include <xen/mm.h>
#include <xen/xmalloc.h>
#include <xen/pviommu.h>
#include <asm/p2m.h>
#include <asm/e820.h>
#include <public/pv-iommu.h>

#include "pviommu_engine.h"

#ifdef CONFIG_INTEL_IOMMU
/* For the VT-d address width and the RMRR list (best effort). */
#include "../drivers/passthrough/vtd/dmar.h"
#include "../drivers/passthrough/vtd/iommu.h"
#endif

/* Serialises every call into the engine (it is single-threaded). */
static DEFINE_SPINLOCK(pviommu_lock);
static bool __read_mostly pviommu_ready;
/*
 * Page references held for the engine (pvx_get_page minus pvx_put_page).
 * Every live mapping holds one, so when this is zero no mapping exists and
 * pviommu_gfn_removed() skips the engine (and its global lock):
 * guest_remove_page() runs for every ballooned page of every domain. (A map
 * racing with the removal of the same gfn can leave a stale mapping either
 * way, since the hook runs before the p2m change; it still holds its page
 * reference, so the frame is not reused, and domain death drops it.)
 */
static atomic_t pviommu_page_refs = ATOMIC_INIT(0);

/* ---------------------------------------------------------------- */
/* Hypercall handler and hooks                                       */
/* ---------------------------------------------------------------- */

long do_pv_iommu_op(unsigned int cmd, XEN_GUEST_HANDLE_PARAM(void) arg)
{
    long rc;

    if ( !pviommu_ready )
        return -ENOSYS;

    spin_lock(&pviommu_lock);
    rc = pviommu_engine_op(current->domain->domain_id, cmd,
                           (uint64_t)(uintptr_t)arg.p);
    spin_unlock(&pviommu_lock);

    if ( rc == PVIOMMU_ENGINE_PREEMPTED )
        rc = hypercall_create_continuation(__HYPERVISOR_pv_iommu_op, "ih",
                                           cmd, arg);
    return rc;
}

/* Called from domain_kill() once, when d becomes dying. */
void pviommu_domain_dying(struct domain *d)
{
    /*
     * No fast path here: taking the lock waits out a map of d's pages that
     * is in flight on another CPU (it saw d alive), so the engine drops it.
     */
    if ( !pviommu_ready )
        return;
    spin_lock(&pviommu_lock);
    pviommu_engine_domain_dying(d->domain_id);
    spin_unlock(&pviommu_lock);
}

/* Called from guest_remove_page() before the gfn leaves d's p2m. */
void pviommu_gfn_removed(struct domain *d, unsigned long gfn)
{
    if ( !pviommu_ready || !atomic_read(&pviommu_page_refs) )
        return;
    spin_lock(&pviommu_lock);
    pviommu_engine_gfn_removed(d->domain_id, gfn);
    spin_unlock(&pviommu_lock);
}

static int __init pviommu_init(void)
{
    int rc = pviommu_engine_init();

    if ( rc )
        printk(XENLOG_ERR "pviommu: engine init failed: %d\n", rc);
    else
    {
        pviommu_ready = true;
        printk(XENLOG_INFO "pviommu: PV-IOMMU hypercall %d ready\n",
               __HYPERVISOR_pv_iommu_op);
    }
    return 0;
}
__initcall(pviommu_init);

/* ---------------------------------------------------------------- */
/* pvx_*: primitives for the engine (engine lock held)               */
/* ---------------------------------------------------------------- */

int pvx_copy_from_guest(void *dst, uint64_t guest_addr, size_t len)
{
    return raw_copy_from_guest(dst, (const void *)(uintptr_t)guest_addr, len)
           ? -EFAULT : 0;
}

int pvx_copy_to_guest(uint64_t guest_addr, const void *src, size_t len)
{
    return raw_copy_to_guest((void *)(uintptr_t)guest_addr, src, len)
           ? -EFAULT : 0;
}

int pvx_domain_exists(uint16_t domid)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    int ret;

    if ( !d )
        return 0;
    ret = !d->is_dying;
    rcu_unlock_domain(d);
    return ret;
}

int pvx_is_privileged(uint16_t domid)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    int ret;

    if ( !d )
        return 0;
    ret = is_control_domain(d) || is_hardware_domain(d);
    rcu_unlock_domain(d);
    return ret;
}

int pvx_is_device_model_of(uint16_t caller, uint16_t target)
{
    struct domain *t = rcu_lock_domain_by_id(target);
    int ret;

    if ( !t )
        return 0;
    ret = t->target && t->target->domain_id == caller;
    rcu_unlock_domain(t);
    return ret;
}

int pvx_get_page(uint16_t domid, uint64_t gfn, int want_write,
                 uint64_t *mfn, uint32_t *kind)
{
    struct domain *d = rcu_lock_domain_by_id(domid);
    struct page_info *pg;
    p2m_type_t t = p2m_invalid;

    *mfn = INVALID_MFN_RAW;
    if ( !d )
        return -ESRCH;
    if ( d->is_dying )
    {
        rcu_unlock_domain(d);
        return -ESRCH;
    }

    pg = get_page_from_gfn(d, gfn, &t, P2M_ALLOC);

    if ( p2m_is_paging(t) || p2m_is_shared(t) )
    {
        *kind = PVX_PAGE_PAGED_OUT;
        goto drop;
    }
    if ( p2m_is_grant(t) )
    {
        *kind = PVX_PAGE_GRANT;
        goto drop;
    }
    if ( p2m_is_mmio(t) )
    {
        *kind = PVX_PAGE_MMIO;
        goto drop;
    }
    if ( !pg )
    {
        /*
         * PV (untranslated) guest: the frame exists but is not the
         * domain's (Xen's or another domain's); else not present.
         */
        if ( !paging_mode_translate(d) && mfn_valid(_mfn(gfn)) )
            *kind = PVX_PAGE_XEN;
        else
            *kind = PVX_PAGE_NOT_PRESENT;
        goto out;
    }
    if ( !p2m_is_ram(t) || is_xen_heap_page(pg) ||
         page_get_owner(pg) != d )
    {
        *kind = PVX_PAGE_XEN;
        goto drop;
    }

    if ( t == p2m_ram_ro || p2m_is_readonly(t) )
    {
        *kind = PVX_PAGE_RAM_RO;
        if ( want_write )
            goto drop;
    }
    else
    {
        *kind = PVX_PAGE_RAM_RW;
        if ( want_write && !get_page_type(pg, PGT_writable_page) )
        {
            /*
             * A PV guest's page table or descriptor page: never
             * device-writable. Report it as read-only RAM.
             */
            *kind = PVX_PAGE_RAM_RO;
            goto drop;
        }
    }

    *mfn = mfn_x(page_to_mfn(pg));
    atomic_inc(&pviommu_page_refs);
    rcu_unlock_domain(d);
    return 0;

 drop:
    if ( pg )
        put_page(pg);
 out:
    rcu_unlock_domain(d);
    return 0;
}

void pvx_put_page(uint64_t mfn, int writable)
{
    struct page_info *pg;

    if ( !mfn_valid(_mfn(mfn)) )
        return;
    pg = mfn_to_page(_mfn(mfn));
    atomic_dec(&pviommu_page_refs);
    if ( writable )
        put_page_and_type(pg);
    else
        put_page(pg);
}

uint64_t pvx_ram_end_mfn(void)
{
    return max_page;
}

unsigned int pvx_iommu_address_bits(void)
{
    unsigned int bits = 0;

#ifdef CONFIG_INTEL_IOMMU
    const struct acpi_drhd_unit *drhd;

    if ( iommu_enabled )
        list_for_each_entry ( drhd, &acpi_drhd_units, list )
        {
            const struct vtd_iommu *iommu = drhd->iommu;
            unsigned int w;

            if ( !iommu )
                continue;
            /* Page-table levels the unit walks, capped by its MGAW. */
            w = iommu->nr_pt_levels ? 12 + 9 * iommu->nr_pt_levels : 39;
            if ( cap_mgaw(iommu->cap) < w )
                w = cap_mgaw(iommu->cap);
            if ( !bits || w < bits )
                bits = w;
        }
#endif

    /* Unknown (AMD, or no unit seen): QEMU intel-iommu's default. */
    return bits ? bits : 39;
}

/*
 * Reserved BFN regions:
 *   0  the MSI/interrupt window 0xfee00000-0xfeefffff
 *   1  the hole below 4 GiB, from the end of low RAM to 4 GiB
 *   2.. RMRRs (VT-d), when reachable
 */
int pvx_reserved_region(unsigned int index, uint64_t *start_frame,
                        uint64_t *nr_frames, uint32_t *kind)
{
    if ( index == 0 )
    {
        *start_frame = 0xfee00;
        *nr_frames = 0x100;
        *kind = PVIOMMU_REGION_MSI;
        return 0;
    }
    if ( index == 1 )
    {
        uint64_t low_end = 0;
        unsigned int i;

        for ( i = 0; i < e820.nr_map; i++ )
        {
            uint64_t s = e820.map[i].addr, e = s + e820.map[i].size;

            if ( e820.map[i].type != E820_RAM || s >= GB(4) )
                continue;
            if ( e > GB(4) )
                e = GB(4);
            if ( e > low_end )
                low_end = e;
        }
        low_end = PFN_UP(low_end);
        *start_frame = low_end;
        *nr_frames = PFN_DOWN(GB(4)) - low_end;
        *kind = PVIOMMU_REGION_MMIO;
        return 0;
    }

#ifdef CONFIG_INTEL_IOMMU
    {
        const struct acpi_rmrr_unit *rmrr;
        unsigned int i = 2;

        list_for_each_entry ( rmrr, &acpi_rmrr_units, list )
        {
            if ( i++ != index )
                continue;
            *start_frame = PFN_DOWN(rmrr->base_address);
            *nr_frames = PFN_DOWN(rmrr->end_address) + 1 -
                         PFN_DOWN(rmrr->base_address);
            *kind = PVIOMMU_REGION_RMRR;
            return 0;
        }
    }
#endif

    return -ENOENT;
}

int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn,
                  unsigned int flags, unsigned int *flush)
{
    struct domain *d = rcu_lock_domain_by_id(owner);
    unsigned int iflags = 0;
    long rc;

    if ( !d )
        return -ESRCH;
    if ( !is_iommu_enabled(d) )
    {
        rcu_unlock_domain(d);
        return -ENODEV;
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

int pvx_preempt_check(void)
{
    return !!hypercall_preempt_check();
}

void *pvx_alloc(size_t size, size_t align)
{
    if ( !align )
        align = 1;
    return _xmalloc(size, align);
}

void pvx_free(void *ptr)
{
    xfree(ptr);
}

void pvx_log(const char *msg, size_t len)
{
    printk("%.*s", (int)len, msg);
}

/* The engine's panic handler (unreachable in a panic-free engine build). */
void pvx_panic(const char *msg, size_t len)
{
    panic("pviommu: engine panic: %.*s\n", (int)len, msg);
}
