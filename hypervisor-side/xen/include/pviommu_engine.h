/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu_engine.h -- the boundary between Xen's C glue (xen/common/pviommu.c)
 * and the Rust engine (crate pviommu-xen, a no_std staticlib over pviommu-hv).
 *
 * Direction 1, pviommu_engine_*: implemented in Rust, called by the C glue
 * with NO pviommu lock held. The engine takes one driver lock at a time
 * itself (pvx_driver_lock/unlock(cell)) around that driver domain's state,
 * and only there.
 *
 * Direction 2, pvx_*: implemented in C with Xen's own primitives, called
 * directly (never through a pointer) by the engine.
 *
 * Lock order (design/xen-integration.md, "Locks"):
 *
 *     target's p2m lock  ->  one driver lock  ->  hardware domain's IOMMU
 *     (hooks only)                                mapping_lock -> heap_lock
 *     pcidevs_lock       ->  one driver lock  ->  iommu->lock, QI lock
 *     (contexts, teardown, device_leaving)        (Arm: arm_smmu_devices_lock
 *                                                  -> smmu->cmdq.lock)
 *                            one driver lock  ->  tasklet_lock (the
 *                                                 revocation VIRQ is raised
 *                                                 later, with no lock held:
 *                                                 pvx_notify_revoked)
 *     (Arm, pviommu=dom0-p2m only: one driver lock -> dom0's p2m write
 *      lock; xen/pviommu.h says why that order has no cycle.)
 *
 * The engine never holds a driver lock across pvx_copy_*, pvx_get_page,
 * pvx_domain_info or pvx_xsm_check, so a hook entered with a p2m lock held
 * can always take a driver lock. Functions marked [locked] below are only
 * called with a driver lock held; [unlocked] only without any.
 *
 * Domain ids are Xen domid_t (uint16_t). Frame numbers are uint64_t.
 * None of these functions panics; failures are negative errnos.
 */
#ifndef PVIOMMU_ENGINE_H
#define PVIOMMU_ENGINE_H

#include <stdint.h>
#include <stddef.h>

/* ---- Rust -> C return codes ---- */
#define PVIOMMU_ENGINE_PREEMPTED 1 /* == PVIOMMU_BATCH_INCOMPLETE */
/*
 * A batch that ended in an error, its cells not all finished in that entry
 * (hypercall::BatchEnding): pviommu_engine_op() answers the command to
 * continue with, this bit set, the errno in bits 16-23 and the contexts in
 * bits 0-15, every other bit clear. The glue continues with that command
 * and the same arg; its entries run no op and the last answers -errno.
 */
#define PVIOMMU_ENGINE_BATCH_ENDING 0x40000000U
#define PVIOMMU_ENGINE_BATCH_ENDING_BITS 0x00ffffffU

/* ======== Implemented by the Rust engine ======== */

/* Called once at boot (initcall), before any other entry. 0 or -errno.
 * quota: BFNs per driver domain (0: default); max_batch: largest batch
 * (0: default); heap_bytes: the most the engine may ever hold from Xen's
 * heap, summed over all driver domains (an allocation past it fails, and
 * the op answers ENOMEM). All come from Xen's command line, "pviommu=".
 * cells: PVX_DRIVER_CELLS as this glue was built with; -EINVAL (and no
 * engine) unless the engine has as many driver cells, so the two can never
 * disagree on the driver locks or the layout of the held mask. Once only:
 * a second call answers -EBUSY and leaves the engine as it is. */
int pviommu_engine_init(uint64_t quota, uint32_t max_batch,
                        uint64_t heap_bytes, uint32_t cells);

/*
 * The hypercall body. `caller` is current->domain's id, `arg` the guest
 * address passed as the hypercall's second argument. Returns 0, -errno,
 * PVIOMMU_ENGINE_PREEMPTED when pvx_preempt_check() asked it to stop (the
 * progress is already in the guest's batch header, and the glue creates a
 * continuation with the same (cmd, arg)), or a batch ending's command
 * (PVIOMMU_ENGINE_BATCH_ENDING: the glue continues with it as cmd).
 */
long pviommu_engine_op(uint16_t caller, unsigned int cmd, uint64_t arg);

/*
 * The engine's BFN window, once pviommu_engine_init() succeeded: its first
 * BFN and the one past its last. 0, or -EINVAL (also for a NULL or
 * misaligned pointer, nothing written). The glue refuses any IOMMU
 * run outside it (pvx_run_in_window()).
 */
int pviommu_engine_window(uint64_t *start, uint64_t *end);

/*
 * Domain teardown, from domain_kill() (restartable, like
 * domain_relinquish_resources): revoke every mapping that points at
 * `domid`'s pages (in all driver domains) and drop everything `domid` owns
 * as a driver domain, in bounded slices. *cursor starts at 0 (the glue keeps
 * it in struct domain) and is the engine's to update. Returns 0 when done,
 * -ERESTART when the caller must come back (the toolstack's destroydomain
 * continues), -EBUSY when its last restarts released nothing (an IOMMU
 * that keeps failing: the toolstack gets its destroy back, the domain
 * stays dying and a later destroy resumes), never anything else. A NULL
 * or misaligned cursor (a glue bug) answers -EBUSY, nothing done.
 */
int pviommu_engine_domain_teardown(uint16_t domid, uint64_t *cursor);
/* *cursor once the teardown finished: domain_kill() re-runs its dying stage
 * on every restart of a later step, and need not call the engine again. */
#define PVIOMMU_TEARDOWN_DONE (3ULL << 62)

/*
 * Log-dirty mode went on for `domid` (the shadow-op domctl): revoke every
 * writable mapping of its pages, read-only ones stay, in bounded slices (at
 * most 4096 slots visited and 256 mappings revoked each). The caller has
 * already made new writable maps of `domid` fail (pvx_get_page refuses them
 * in log-dirty mode); the first slice makes maps in flight look again.
 * *cursor starts at 0 (the glue keeps it in struct domain) and is the
 * engine's to update; PVIOMMU_TEARDOWN_DONE once finished. Returns 0 when
 * done, -ERESTART when the caller must come back (the domctl continues),
 * -EIO when it gave up: the IOMMU kept refusing an unmap or a flush through
 * 9 walks, so a device may still write (the entries stay stuck, retried at
 * every flush); the enable must then fail. Nothing else. A NULL or
 * misaligned cursor (a glue bug) answers -EIO, nothing done.
 */
int pviommu_engine_revoke_writes(uint16_t domid, uint64_t *cursor);

/*
 * VRAM dirty tracking is about to move to `domid`'s gfns [first, first +
 * nr) (hap_track_dirty_vram): one slice of revoking the writable mappings
 * of that range, bounded as above, so that the hook of the type change that
 * follows (under the p2m lock, in one go) finds only what was mapped
 * meanwhile. Writable maps of the range are refused while *sweep holds it
 * (the glue's page lookups: pvx_vram_sweeping()); the range is stored there
 * (word by word, atomically) before the first slice moves the target's
 * sequence number, and stays when done (cursor done) until the caller lifts
 * it, zeroing *sweep, after the type change or at any other end of its call
 * but a continuation (pviommu_vram_revoke(d, first, 0)).
 * *sweep (three uint64_t: first, last, cursor; all zero when idle) is the
 * caller's, kept between slices; a call for another range starts over for
 * its own. Returns 0 when done, -ERESTART when the dm_op must continue,
 * -EIO when it gave up as pviommu_engine_revoke_writes() does (tracking must
 * then not move there: the type change's hook cannot fail).
 */
struct pviommu_range_sweep {
    uint64_t first, last, cursor;
};
int pviommu_engine_revoke_writes_in(uint16_t domid, uint64_t first,
                                    uint64_t nr,
                                    struct pviommu_range_sweep *sweep);

/*
 * The p2m of `domid` changed for gfns [gfn, gfn + (1 << order)): called
 * AFTER the change succeeded, possibly with `domid`'s p2m lock held.
 *   how = PVIOMMU_GFN_REMOVED:   the gfns no longer point at the frames they
 *                                did (removed, replaced, moved, paged out,
 *                                reclaimed): revoke every mapping of them.
 *   how = PVIOMMU_GFN_WRITE_LOST: the gfns stay but lost write access for
 *                                devices (read-only, ioreq-server, log-dirty):
 *                                revoke writable mappings of them only.
 * `order` may be large (a range change of VRAM dirty tracking, a PoD
 * extent): the engine then scans its mappings of `domid` instead of looping
 * over gfns.
 * Hooks may also run with the target's PoD lock held; the engine's put_page
 * then reaches page_alloc_lock, which is consistent with the order above.
 * Returns nothing: revocation cannot fail (it needs no memory; an unmap the
 * IOMMU refuses keeps the page referenced and the BFN poisoned until a retry
 * succeeds). When no driver domain maps a page of `domid` and no map of
 * `domid` is in flight, this takes no lock at all.
 */
#define PVIOMMU_GFN_REMOVED    0
#define PVIOMMU_GFN_WRITE_LOST 1
void pviommu_engine_gfn_changed(uint16_t domid, uint64_t gfn,
                                unsigned int order, unsigned int how);

/*
 * Xen is about to move PCI device `sbdf` away from `owner` (reassignment or
 * removal), with pcidevs_lock held: if it is attached to one of owner's
 * contexts, the engine points it back at owner's own tables (through
 * pvx_device_detach) before returning. Takes one driver lock. 0, or
 * -EBUSY when the detach answered -EBUSY (the IOMMU may still cache the
 * context's entry for it: it stays on the context, and must not be moved).
 */
int pviommu_engine_device_leaving(uint16_t owner, uint32_t sbdf);

/*
 * Patch 0008: whether an IOMMU fault of device sbdf, owned by owner, at BFN
 * bfn is one a revocation made (the BFN revoked in the context the device
 * walks, its notice not yet acknowledged; one such fault in 64 a cell is
 * answered 0 all the same): 1, and Xen does not count it against the
 * device; else 0. From the IOMMU's fault tasklet, with pcidevs_lock held:
 * takes driver locks one at a time.
 */
int pviommu_engine_fault_expected(uint16_t owner, uint32_t sbdf, uint64_t bfn);

/* ======== Implemented by the C glue ======== */

/* The driver locks: one Xen spinlock per engine driver cell (a driver
 * domain's state), cell < PVX_DRIVER_CELLS. Not IRQ-safe: never taken in
 * IRQ context. The engine holds at most one at a time. */
#define PVX_DRIVER_CELLS 128
void pvx_driver_lock(unsigned int cell);
int pvx_driver_trylock(unsigned int cell);   /* 1: taken */
void pvx_driver_unlock(unsigned int cell);
/* The address of this CPU's mask of the cells whose lock it holds,
 * PVX_DRIVER_CELLS / 64 words (cell n: bit n % 64 of word n / 64), changed
 * only by this CPU's pvx_driver_lock/unlock: the engine
 * keeps its record of table stores not yet written back per cell, touched
 * only under the cell's lock, and reads here which cell that is at every
 * table store. It asks for the address once per entry point: an engine
 * entry point runs on one CPU from start to end (where it can sleep, an
 * HVM/PVH guest copy or page lookup waiting for a paged-out page, x86
 * wait() pins the vCPU to its CPU; Arm reaches no wait() here), and checks
 * so before each flush, context creation and attach, and when it ends. */
const uint64_t *pvx_driver_held_mask(void);

/* [unlocked] Guest copies for the current vCPU's guest: 0, or -EFAULT.
 * (Errnos that only the C glue returns: ENOEXEC for a 32-bit caller; ESTALE
 * is added to public/errno.h by patch 0001.) */
int pvx_copy_from_guest(void *dst, uint64_t guest_addr, size_t len);
int pvx_copy_to_guest(uint64_t guest_addr, const void *src, size_t len);

/* Facts about a domain; the permission rule itself is the engine's
 * (hypervisor-side/src/permission.rs), so Xen and the simulator share it. */
#define PVX_DOMID_NONE 0xffffu
struct pvx_domain_info {
    uint8_t exists;        /* a struct domain with this id exists           */
    uint8_t dying;         /* d->is_dying != DOMDYING_alive                  */
    uint8_t control;       /* is_control_domain(d)                           */
    uint8_t hardware;      /* is_hardware_domain(d)                          */
    uint16_t target;       /* d->target's domain_id, or PVX_DOMID_NONE       */
    uint16_t _pad;
    uint32_t translation;  /* PVIOMMU_TRANSLATES or why d's IOMMU context    */
                           /* cannot use BFNs (public/pv-iommu.h)            */
    uint32_t _pad2;
};
/* [unlocked] Fill *info (exists = 0 if there is no such domain). */
void pvx_domain_info(uint16_t domid, struct pvx_domain_info *info);

/*
 * [unlocked] The XSM hook: may `caller` use PV-IOMMU on `target`
 * (PVX_DOMID_NONE: no target, e.g. query_caps)? 0 or -EPERM/-ESRCH. Under
 * the dummy policy this is XSM_DM_PRIV (control domain, or caller->target ==
 * target; with no target the glue passes the caller's own d->target, so a
 * device model may query and manage its own BFNs, except for PVX_XSM_CONTROL,
 * where it passes none: the control domain only); the engine has already
 * applied the same rule itself, so this only lets a FLASK policy refuse more.
 * (PVX_DOMID_NONE is not a Xen domid; no domain can have it.)
 */
#define PVX_XSM_QUERY   0 /* query_caps, reserved_regions                    */
#define PVX_XSM_MAP     1 /* map a page of target                            */
#define PVX_XSM_MANAGE  2 /* unmap/lookup/contexts/revocations of own BFNs   */
#define PVX_XSM_CONTROL 3 /* set_limits/stats/entry of target; no target:   */
                          /* host-wide (stats timing, heap): t stays NULL    */
int pvx_xsm_check(uint16_t caller, uint16_t target, unsigned int action);

/*
 * [unlocked] The XSM hook of an attach: may `caller` put PCI device `sbdf`
 * (segment << 16 | bus << 8 | devfn) behind one of its PV-IOMMU contexts?
 * 0, or an error (-EACCES from FLASK, -ESRCH for a caller that is gone).
 * FLASK checks pv_iommu attach against the device's label
 * (security_device_sid), so a policy can keep one device of a driver
 * domain out; the dummy policy is XSM_HOOK (the engine's rule, that the
 * device is the caller's own, decides). Asked before pcidevs_lock.
 */
int pvx_xsm_attach(uint16_t caller, uint32_t sbdf);

/*
 * The target of a page lookup as the map's checks passed it: the engine's
 * sequence number of its domid (`seq`) and its value before the checks
 * (`checked`). The engine's teardown of a domain moves the number first
 * and does not wait for maps in flight, so by the time of a lookup the
 * checked domain may be destroyed and another created at the domid. Once
 * pvx_get_page(s) hold the domain they found (and have raised its
 * pviommu_pages), a number other than `checked` means nothing is looked
 * up: no paging in, populating or unsharing in a domain no check has
 * seen. (One pointer, not two arguments: the calls keep to six.)
 */
struct pvx_checked_target {
    const uint32_t *seq;
    uint32_t checked;
};

/* Page kinds reported by pvx_get_page. */
#define PVX_PAGE_RAM_RW     0 /* reference (and writable type ref if asked) taken */
#define PVX_PAGE_RAM_RO     1 /* reference taken only if !want_write              */
#define PVX_PAGE_GRANT      2 /* a grant/foreign mapping in the target's p2m      */
#define PVX_PAGE_MMIO       3
#define PVX_PAGE_NOT_PRESENT 4
#define PVX_PAGE_PAGED_OUT  5 /* paged out or shared: paging-in / unsharing was   */
                              /* started where possible; retry (-EAGAIN)          */
#define PVX_PAGE_XEN        6 /* Xen-owned, special, or not owned by the domain   */
#define PVX_PAGE_LOG_DIRTY  7 /* target in log-dirty mode and want_write: refused */
/* pvx_get_pages(): the page after its run was not looked up (no answer). */
#define PVX_PAGE_NONE       0xffffffffU

/*
 * [unlocked] Classify target `domid`'s `gfn` and, when it is RAM usable with
 * the asked access, take a general page reference (plus a PGT_writable_page
 * type reference when want_write) and return its MFN in *mfn. Writable
 * requests unshare a shared page first (P2M_UNSHARE); another domain's
 * paged-out pages start paging in (never the caller's own: that may sleep).
 * Returns 0 with *kind set (a reference is held iff *kind is
 * RAM_RW, or RAM_RO with !want_write), or -ESRCH if the domain is gone or
 * dying, or is maybe not the one the map checked (`target`, below). Takes
 * (and drops) the target's p2m lock.
 */
int pvx_get_page(uint16_t domid, uint64_t gfn, int want_write,
                 const struct pvx_checked_target *target,
                 uint64_t *mfn, uint32_t *kind);
/*
 * [unlocked] pvx_get_page() for nr pages of domid (nr at most 64 taken),
 * their gfns in frames[0..nr) (any order), in order, stopping before the
 * first that would not come back referenced as RAM_RW (or RAM_RO with
 * !want_write): returns how many were, each one's MFN written over its
 * gfn in frames[] (IN: gfns, OUT: MFNs, as XENMEM extent arrays), holding
 * nothing of the page it stopped at (the slots from that one on hold no
 * defined value). If it looked that page up (with pvx_get_page()'s side
 * effects: PoD populate, unsharing, paging in), *refused is
 * pvx_get_page()'s kind for it and the engine does not look it up again;
 * else PVX_PAGE_NONE, and the engine's own pvx_get_page() of it says why.
 * May stop anywhere; 0 if the domain is gone or dying, or maybe not the
 * one checked (`target`, as pvx_get_page()). One domain lookup
 * for them all and, on x86 HVM, one p2m walk for the pages of the run one
 * p2m entry maps, in any order (read lock held across their references,
 * as get_page_from_gfn()'s fast path).
 */
uint32_t pvx_get_pages(uint16_t domid, uint32_t nr, int want_write,
                       const struct pvx_checked_target *target,
                       uint64_t *frames, uint32_t *refused);
/* [unlocked] A device may write `mfn` (writable type reference held by
 * pvx_get_page) without snooping the CPU caches: mark it _PGT_non_coherent,
 * so Xen flushes it before any other type or the free (XSA-402). */
void pvx_page_non_coherent(uint64_t mfn);
/* [either] Release what pvx_get_page took. May free the page. */
void pvx_put_page(uint64_t mfn, int writable);

/* Highest RAM machine frame + 1 (including hot-pluggable ranges), and the
 * IOMMU's usable address width. Boot only. */
uint64_t pvx_ram_end_mfn(void);
unsigned int pvx_iommu_address_bits(void);

/* Reserved region `index`: 0 and filled, or -ENOENT past the last one.
 * Boot only. Covers the MSI window, the low MMIO hole, every PCI host-bridge
 * / BAR window Xen knows of, RMRRs, and SRAT hot-pluggable memory. */
int pvx_reserved_region(unsigned int index, uint64_t *start_frame,
                        uint64_t *nr_frames, uint32_t *kind);

/*
 * [locked] The driver domain's IOMMU context (Xen 4.17 has one per domain:
 * context 0). flags: PVIOMMU_F_READ | PVIOMMU_F_WRITE. *flush accumulates
 * Xen's IOMMU_FLUSHF_* bits; pvx_iommu_flush issues one IOTLB flush for a
 * range and returns its result: a page reference is only dropped after a
 * flush covering it returned 0.
 */
int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn, uint64_t count,
                  unsigned int flags, unsigned int *flush);
/*
 * pvx_iommu_map maps the count pages from bfn to the frames from mfn
 * (count >= 1, at most PVX_IOMMU_RUN_MAX): one iommu_map(), which maps each
 * part of the run aligned to 2 MiB in both with one entry. On failure Xen
 * unmaps what the run mapped, as far as it can (an unmap that must split
 * a superpage may fail, and is ignored for the hardware domain; another
 * domain is crashed): the engine retries each page, which rewrites an
 * entry left with the same values, and keeps any page it gives up on
 * referenced until its revocation is flushed.
 *
 * pvx_iommu_unmap unmaps the count pages from bfn (count >= 1, at most
 * PVX_IOMMU_RUN_MAX):
 * one iommu_unmap(), which clears each aligned 2 MiB of the run with one
 * entry (mapping_order()), so never splits a superpage there. A page with
 * no entry is no error. On failure any page of the run may still be
 * mapped; the engine then unmaps them one by one.
 */
#define PVX_IOMMU_RUN_MAX (1UL << 11)
int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int *flush);
int pvx_iommu_flush(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int flush);

/*
 * Contexts other than the default: tables the engine writes itself, in
 * frames from here, tagged by the vendor IOMMU code (xen/iommu.h's
 * pviommu_ctx_* ops, VT-d only).
 *
 * pvx_ctx_caps: 0 and the levels every unit walks and whether SNP is valid
 * (snoop control), or -EOPNOTSUPP when the IOMMU offers no such contexts.
 * Boot only.
 */
int pvx_ctx_caps(unsigned int *levels, int *snoop_control);
/* [locked] Table frames: a zeroed frame, already written back to memory
 * (0 and *mfn, or -ENOMEM), and given back. The engine reads and stores
 * entries itself through pvx_table_map (a few at once, all unmapped before
 * it returns) and writes its stores back for a non-coherent IOMMU with
 * pvx_table_sync: `lines` is a bitmap of the frame's 64-byte lines (bit n:
 * bytes 64n..64n+63), each run written back with iommu_sync_cache. The
 * engine does that before every pvx_ctx_flush, pvx_ctx_alloc and
 * pvx_device_attach, and before it returns; never for a frame it has freed.
 *
 * Only frames pvx_table_alloc handed out and not yet freed are accepted (a
 * mark in the frame's page_info): pvx_table_map returns NULL, and
 * pvx_table_sync and pvx_table_free -EINVAL, for any other, and log once.
 * The engine then has lost a store (or a read answered empty): it fails
 * every later flush, context creation and device attach of that driver
 * domain's engine contexts, so no page or table behind them is ever
 * released (design/xen-table-writes.md, "A refused frame"). */
int pvx_table_alloc(uint64_t *mfn);
int pvx_table_free(uint64_t mfn);
uint64_t *pvx_table_map(uint64_t mfn);
void pvx_table_unmap(const uint64_t *t);
int pvx_table_sync(uint64_t mfn, uint64_t lines);
/* Boot only: 1 if every IOMMU unit walks tables coherently with the CPU
 * caches (VT-d ECAP.C), so the engine need not note or write back its
 * table stores at all; 0 otherwise. */
int pvx_tables_coherent(void);
/* Boot only: 1 if a device's writes through a write-back map of a driver
 * domain's own IOMMU tables (context 0) snoop the CPU caches (VT-d: SNP set
 * on every leaf, iommu_snoop; AMD-Vi: FC on every leaf); 0 otherwise, and
 * the engine marks such a page for a cache flush before Xen reads it as a
 * page table (pvx_page_non_coherent, as for its own contexts). */
int pvx_default_context_snooped(void);
/* [devices locked, locked] A context's tag (a pseudo domid); [locked] its
 * IOTLB invalidation (page-selective for [bfn, bfn + count) where it can). */
int pvx_ctx_alloc(uint16_t *tag);
int pvx_ctx_free(uint16_t tag);  /* -errno: the tag stays taken */
int pvx_ctx_flush(uint16_t tag, uint64_t bfn, uint64_t count);
/* [unlocked] Has domid any PCI device assigned? (A hint, for refusing
 * contexts to callers that could attach nothing before pcidevs_lock.) */
int pvx_domain_has_devices(uint16_t domid);
/* [any] 1 if the current domain is the control or hardware domain: the
 * engine's allocator lets only those reach into the last quarter of the
 * heap cap (pviommu=heap=MiB), asked only when an allocation would. The
 * engine allocates only in hypercalls, for their caller, and at boot. */
int pvx_current_is_host(void);
/* pcidevs_lock, taken BEFORE any driver lock (Xen calls
 * pviommu_engine_device_leaving with it held): the order is
 * pcidevs_lock -> one driver lock. Recursive. */
void pvx_devices_lock(void);
void pvx_devices_unlock(void);
/* [devices locked] Facts about device `sbdf`: its owner's domid (or a
 * reserved id for dom_io/dom_xen) and PVX_DEV_* flags; -ENODEV if Xen knows
 * no such device or no IOMMU unit covers it. */
#define PVX_DEV_OWN_RID (1u << 0) /* its DMA carries its own requester id   */
#define PVX_DEV_RMRR    (1u << 1) /* needs an RMRR identity mapping          */
#define PVX_DEV_ATS     (1u << 2) /* caches translations itself (ATS)        */
#define PVX_DEV_UNTRANSLATED (1u << 3) /* its IOMMU unit translates nothing:
                                          Xen left it off (VT-d no-igfx and
                                          firmware quirks) */
int pvx_device_facts(uint32_t sbdf, uint16_t *owner, uint32_t *flags);
/* [devices locked, locked] Point `sbdf` at the context tagged `tag` whose
 * 4-level root is `root_mfn` (context-cache and IOTLB invalidated), or back
 * at its owner's tables. A failed detach blocks the device's DMA. */
int pvx_device_attach(uint32_t sbdf, uint16_t tag, uint64_t root_mfn);
int pvx_device_detach(uint32_t sbdf, uint16_t tag);

/* [locked] Tell `owner` that revocation notices are pending for it: its
 * VIRQ_PV_IOMMU (a global VIRQ; nothing happens if it has not bound it) is
 * raised soon after, from a softirq tasklet with no lock held (on Arm the
 * VIRQ takes the vCPU's vgic.lock, which the vITS holds around a p2m
 * read). Here only a bit of a domid bitmap and the tasklet lock. */
void pvx_notify_revoked(uint16_t owner);

/* Boot only: a per-boot secret for the engine's hash tables (get_random()). */
uint64_t pvx_random_seed(void);

/* [locked or unlocked] Xen system time in ns (NOW()); read only while the
 * stats' timing is on (PVIOMMU_STATS_TIMING_ON). */
uint64_t pvx_now_ns(void);

/* [either] 1 when the hypercall should stop and be continued. Only on a
 * vCPU's own work (a hypercall, a teardown slice, a sweep), never from a
 * hook: a hook can run in softirq context with the idle vCPU current. */
int pvx_preempt_check(void);

/* Xen's allocator (_xmalloc/xfree); NULL on failure. [either] */
void *pvx_alloc(size_t size, size_t align);
void pvx_free(void *ptr);

/* printk a message of `len` bytes (not NUL-terminated). */
void pvx_log(const char *msg, size_t len);
/* The same at XENLOG_ERR, for an engine fault the host must see, with a
 * rate limit of its own (a guest's messages cannot use it up): 1 printed,
 * 0 held back (the engine reports it with the next line). */
int pvx_log_error(const char *msg, size_t len);

/*
 * Never called, and never to be defined (the Rust side declares it as not
 * returning): the Rust panic handler refers to this symbol, and through it
 * allocation failure that nothing answers (the engine has no
 * alloc_error_handler: handle_alloc_error panics). build-engine.sh links
 * the engine from its entry points with --gc-sections and FAILS if the
 * symbol is still referenced, so any reachable panic is a build error.
 */
void pvx_unreachable_panic(void);

#endif /* PVIOMMU_ENGINE_H */
