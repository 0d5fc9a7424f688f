/* SPDX-License-Identifier: MIT */
/*
 * pviommu_engine.h -- the boundary between Xen's C glue (xen/common/pviommu.c)
 * and the Rust engine (crate pviommu-xen, a no_std staticlib over pviommu-hv).
 *
 * Direction 1, pviommu_engine_*: implemented in Rust, called by the C glue.
 * Every call into the engine is made with the glue's global engine lock held
 * (a spinlock): the engine is single-threaded by construction and never
 * blocks. None of these functions panics; failures are negative errnos.
 *
 * Direction 2, pvx_*: implemented in C with Xen's own primitives, called
 * directly (never through a pointer) by the engine while that lock is held.
 *
 * Domain ids are Xen domid_t (uint16_t). Frame numbers are uint64_t.
 */
#ifndef PVIOMMU_ENGINE_H
#define PVIOMMU_ENGINE_H

#include <stdint.h>
#include <stddef.h>

/* ---- Rust -> C return code for a batch that must be continued ---- */
#define PVIOMMU_ENGINE_PREEMPTED 1 /* == PVIOMMU_BATCH_INCOMPLETE */

/* ======== Implemented by the Rust engine ======== */

/* Called once at boot (initcall). 0 or -errno. */
int pviommu_engine_init(void);

/*
 * The hypercall body. `caller` is current->domain's id, `arg` the guest
 * address passed as the hypercall's second argument. Returns 0, -errno, or
 * PVIOMMU_ENGINE_PREEMPTED when pvx_preempt_check() asked it to stop: the
 * progress is already in the guest's batch header, and the glue creates a
 * continuation with the same (cmd, arg).
 */
long pviommu_engine_op(uint16_t caller, unsigned int cmd, uint64_t arg);

/*
 * Domain teardown: drop every mapping that points at `domid`'s pages (in all
 * driver domains) and every mapping `domid` owns as a driver domain. Unmaps,
 * flushes and releases page references before returning.
 */
void pviommu_engine_domain_dying(uint16_t domid);

/* A gfn of `domid` left its p2m (ballooned out, remapped): revoke its BFNs. */
void pviommu_engine_gfn_removed(uint16_t domid, uint64_t gfn);

/* ======== Implemented by the C glue ======== */

/* Guest copies for the current vCPU's guest: 0, or -EFAULT. */
int pvx_copy_from_guest(void *dst, uint64_t guest_addr, size_t len);
int pvx_copy_to_guest(uint64_t guest_addr, const void *src, size_t len);

/* 1 if the domain exists (and is not dying), else 0. */
int pvx_domain_exists(uint16_t domid);
/* 1 if `domid` is privileged (is_control_domain / hardware domain). */
int pvx_is_privileged(uint16_t domid);
/* 1 if `caller` is the device model of `target` (target->target == caller). */
int pvx_is_device_model_of(uint16_t caller, uint16_t target);

/* Page kinds reported by pvx_get_page. */
#define PVX_PAGE_RAM_RW     0 /* reference (and writable type ref if asked) taken */
#define PVX_PAGE_RAM_RO     1 /* reference taken only if !want_write              */
#define PVX_PAGE_GRANT      2 /* a grant/foreign mapping in the target's p2m      */
#define PVX_PAGE_MMIO       3
#define PVX_PAGE_NOT_PRESENT 4
#define PVX_PAGE_PAGED_OUT  5
#define PVX_PAGE_XEN        6 /* Xen-owned or not owned by the domain             */

/*
 * Classify target `domid`'s `gfn` and, when it is RAM usable with the asked
 * access, take a general page reference (plus a PGT_writable_page type
 * reference when want_write) and return its MFN in *mfn. Returns 0 with
 * *kind set (a reference is held iff *kind is RAM_RW, or RAM_RO with
 * !want_write), or -ESRCH if the domain vanished.
 */
int pvx_get_page(uint16_t domid, uint64_t gfn, int want_write,
                 uint64_t *mfn, uint32_t *kind);
/* Release what pvx_get_page took. */
void pvx_put_page(uint64_t mfn, int writable);

/* Highest RAM machine frame + 1, and the IOMMU's usable address width. */
uint64_t pvx_ram_end_mfn(void);
unsigned int pvx_iommu_address_bits(void);

/* Reserved region `index`: 0 and filled, or -ENOENT past the last one. */
int pvx_reserved_region(unsigned int index, uint64_t *start_frame,
                        uint64_t *nr_frames, uint32_t *kind);

/*
 * The driver domain's IOMMU context (Xen 4.17 has one per domain: context 0).
 * flags: PVIOMMU_F_READ | PVIOMMU_F_WRITE. *flush accumulates Xen's
 * IOMMU_FLUSHF_* bits; pvx_iommu_flush issues one IOTLB flush for a range.
 */
int pvx_iommu_map(uint16_t owner, uint64_t bfn, uint64_t mfn,
                  unsigned int flags, unsigned int *flush);
int pvx_iommu_unmap(uint16_t owner, uint64_t bfn, unsigned int *flush);
int pvx_iommu_flush(uint16_t owner, uint64_t bfn, uint64_t count,
                    unsigned int flush);

/* 1 when the hypercall should stop and be continued. */
int pvx_preempt_check(void);

/* Xen's allocator (_xmalloc/xfree); NULL on failure. */
void *pvx_alloc(size_t size, size_t align);
void pvx_free(void *ptr);

/* printk a message of `len` bytes (not NUL-terminated). */
void pvx_log(const char *msg, size_t len);

/* Called by the Rust panic handler: printk the message and panic(). The
 * engine is panic-free by construction; build-engine.sh reports whether
 * this path is reachable from the entry points at all. Never returns. */
void pvx_panic(const char *msg, size_t len);

#endif /* PVIOMMU_ENGINE_H */
