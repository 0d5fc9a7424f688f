/* SPDX-License-Identifier: MIT */
/******************************************************************************
 * pv-iommu.h
 *
 * PV-IOMMU: a paravirtual IOMMU interface for driver domains (hypercall 43,
 * __HYPERVISOR_pv_iommu_op), interface version 1.7
 * (PVIOMMU_INTERFACE_VERSION).
 *
 * A driver domain (e.g. the hardware domain's GPU mediator), or the device
 * model of a guest, asks Xen to map a foreign domain's guest frame into the
 * caller's own IOMMU context. Xen picks a bus frame number (BFN) in a window
 * above host RAM and returns it; machine frame numbers never cross this
 * interface. Mappings are revoked when the foreign gfn changes or its domain
 * dies; a revoked BFN stays reserved until its owner acknowledges it.
 *
 * Byte layout identical to the project's abi/include/pviommu.h (the Rust
 * crate pviommu-abi): caps 80 bytes, op 40, batch 24, region 24, regions 24
 * (checked with BUILD_BUG_ON in xen/common/pviommu.c).
 *
 * long HYPERVISOR_pv_iommu_op(unsigned int cmd, void *arg)
 *   cmd  PVIOMMU_CMD_*
 *   arg  the command's structure
 * Returns 0, a negative errno (see the list at the end), or
 * PVIOMMU_BATCH_INCOMPLETE (PVIOMMU_CMD_batch only): re-issue the same call.
 * Xen continues a batch it preempts itself (a hypercall continuation), so a
 * guest sees PVIOMMU_BATCH_INCOMPLETE only from a transport without one.
 * Either way the batch's progress is its header's nr_done, written back at
 * each entry's end and read again at the next: a header whose nr_done does
 * not read back as written (memory the caller's p2m makes read-only, where
 * Xen drops writes without a fault) ends the call with -EFAULT, its ops
 * acted, never a continuation that would run them again.
 *
 * Only 64-bit callers are supported: a 32-bit PV guest, or an HVM/PVH vCPU
 * not executing in 64-bit mode, gets -ENOEXEC.
 *
 * Permission: the control domain, or a device model acting on its target
 * (d->target), subject to XSM (FLASK class pv_iommu: query, map, manage).
 * Maps need the caller's IOMMU context to translate BFNs (caps.translation).
 *
 * Permission is hereby granted, free of charge, to any person obtaining a copy
 * of this software and associated documentation files (the "Software"), to
 * deal in the Software without restriction, including without limitation the
 * rights to use, copy, modify, merge, publish, distribute, sublicense, and/or
 * sell copies of the Software, and to permit persons to whom the Software is
 * furnished to do so, subject to the following conditions:
 *
 * The above copyright notice and this permission notice shall be included in
 * all copies or substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 * IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 * FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 * AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 * LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING
 * FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
 * DEALINGS IN THE SOFTWARE.
 */

#ifndef __XEN_PUBLIC_PV_IOMMU_H__
#define __XEN_PUBLIC_PV_IOMMU_H__

#include "xen.h"

#if defined(__XEN__) || defined(__XEN_TOOLS__)

/* Major in the high 16 bits, minor in the low 16. Callers check the major. */
#define PVIOMMU_INTERFACE_VERSION 0x00010007U

/* ---- Commands (first hypercall argument) ---- */
#define PVIOMMU_CMD_query_caps       1U /* arg: struct pv_iommu_caps          */
#define PVIOMMU_CMD_batch            2U /* arg: struct pv_iommu_batch         */
#define PVIOMMU_CMD_reserved_regions 3U /* arg: struct pv_iommu_regions       */
                                        /* (control domain only)            */
#define PVIOMMU_CMD_set_limits       4U /* arg: struct pv_iommu_limits        */
                                        /* (control domain only)            */
#define PVIOMMU_CMD_stats            5U /* arg: struct pv_iommu_stats         */
                                        /* (control domain only; ABI 1.2)   */
#define PVIOMMU_CMD_entry            6U /* arg: struct pv_iommu_entry         */
                                        /* (control domain only; ABI 1.3)   */
/*
 * Commands with this bit set are Xen's own: a batch that ends in an error
 * with its end's work not done in that entry continues as one, carrying
 * the error to the entry that returns it. No PVIOMMU_CMD_* has it. A guest
 * issuing one gets its own pending work finished and the errno it carries
 * (or -EINVAL for one malformed).
 */
#define PVIOMMU_CMD_RESERVED_FOR_CONTINUATIONS 0x40000000U

/* Positive return of PVIOMMU_CMD_batch: work budget spent, call again. */
#define PVIOMMU_BATCH_INCOMPLETE 1

/* ---- PVIOMMU_CMD_query_caps ---- */
#define PVIOMMU_FEAT_CONTEXTS         (1U << 0) /* more than context 0      */
#define PVIOMMU_FEAT_ATTR_UC          (1U << 1) /* PVIOMMU_ATTR_UC honoured */
#define PVIOMMU_FEAT_ATTR_DEVICE      (1U << 2) /* PVIOMMU_ATTR_DEVICE      */
#define PVIOMMU_FEAT_GRANT            (1U << 3) /* PVIOMMU_F_GRANT maps     */
#define PVIOMMU_FEAT_REVOCATION_QUEUE (1U << 4) /* revoked BFNs reserved    */
                                                /* until acknowledged       */
#define PVIOMMU_FEAT_DEVICE_ATTACH    (1U << 5) /* OP_context_attach/detach */
#define PVIOMMU_FEAT_REVOKED_IN_CONTEXT (1U << 6) /* OP_revoked_next takes */
                                                /* REVOKED_IN_CONTEXT       */
#define PVIOMMU_FEAT_REVOKED_NUMBERED (1U << 7) /* revoked_next/ack take */
                                                /* REVOKED_NUMBERED        */
#define PVIOMMU_FEAT_EXTENTS_2M       (1U << 8) /* PVIOMMU_F_EXTENT_2M     */
#define PVIOMMU_FEAT_ALL              0x1ffU

/* caps.translation: does the caller's IOMMU context translate BFNs? */
#define PVIOMMU_TRANSLATES  0U /* yes: maps are accepted                    */
#define PVIOMMU_NO_IOMMU    1U /* IOMMU off, or no context for the caller   */
#define PVIOMMU_PASSTHROUGH 2U /* hardware domain bypasses the IOMMU        */
#define PVIOMMU_RELAXED     3U /* non-strict hardware domain: all RAM is    */
                               /* already device-reachable                  */
#define PVIOMMU_SHARED_PT   4U /* IOMMU shares the CPU's p2m (EPT) tables   */
#define PVIOMMU_MIRRORS_P2M 5U /* translated caller: IOMMU tables mirror   */
                               /* its p2m (dfn = gfn), no BFN space of its own */

struct pv_iommu_caps {
    uint32_t version;              /* OUT: PVIOMMU_INTERFACE_VERSION         */
    uint32_t max_batch_ops;        /* OUT: largest nr_ops in one batch       */
    uint64_aligned_t page_sizes;   /* OUT: bit n set: 2^n-byte IOMMU pages   */
    uint64_aligned_t bfn_window_start; /* OUT: first BFN handed out          */
    uint64_aligned_t bfn_window_end;   /* OUT: one past the last such BFN    */
    uint32_t nr_reserved_regions;  /* OUT: see PVIOMMU_CMD_reserved_regions  */
    uint32_t features;             /* OUT: PVIOMMU_FEAT_*                    */
    uint32_t max_contexts;         /* OUT: contexts per caller, incl. ctx 0  */
    uint32_t translation;          /* OUT: PVIOMMU_TRANSLATES or why not     */
    uint64_aligned_t quota;        /* OUT: caller's BFN quota                */
    uint64_aligned_t used;         /* OUT: BFNs in use: live + revoked-unacked */
    uint64_aligned_t revoked;      /* OUT: revocations not yet acknowledged  */
    uint64_aligned_t _rsvd;        /* OUT: 0                                 */
};
typedef struct pv_iommu_caps pv_iommu_caps_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_caps_t);

/* ---- PVIOMMU_CMD_batch ---- */
#define PVIOMMU_OP_map             1U /* IN: context, domid, gfn, flags;     */
                                      /* OUT: bfn                            */
#define PVIOMMU_OP_unmap           2U /* IN: context, bfn                    */
#define PVIOMMU_OP_lookup          3U /* IN: context, bfn;                   */
                                      /* OUT: domid, gfn, flags              */
#define PVIOMMU_OP_context_create  4U /* OUT: context                        */
#define PVIOMMU_OP_context_destroy 5U /* IN: context (no live mappings)      */
#define PVIOMMU_OP_revoked_next    6U /* OUT: bfn, context, domid, gfn of    */
                                      /* the oldest unacknowledged revocation */
/*
 * PVIOMMU_OP_revoked_next with flags = PVIOMMU_REVOKED_IN_CONTEXT (ABI 1.4,
 * PVIOMMU_FEAT_REVOKED_IN_CONTEXT; for this subop only, bit 0 of flags
 * means this, not PVIOMMU_F_READ). IN: context (any of the caller's, 0
 * included), gfn = how many of that context's oldest notices to pass over
 * (<= PVIOMMU_REVOKED_MAX_SKIP, else -EINVAL), domid and bfn 0, flags
 * PVIOMMU_REVOKED_IN_CONTEXT (| PVIOMMU_REVOKED_NUMBERED). OUT: bfn, domid, gfn
 * (and notice, with PVIOMMU_REVOKED_NUMBERED) of the
 * next one (context is left as it was); -ENOENT when the context has no
 * more or is not the caller's. A batch of them with gfn 0, 1, 2, ...
 * reports that many notices in one call; acks earlier in the same batch
 * are done first.
 */
#define PVIOMMU_REVOKED_IN_CONTEXT (1U << 0)
#define PVIOMMU_REVOKED_MAX_SKIP   255U
/*
 * ABI 1.5 (PVIOMMU_FEAT_REVOKED_NUMBERED). PVIOMMU_OP_revoked_next with
 * this bit in flags (alone or with PVIOMMU_REVOKED_IN_CONTEXT) also
 * reports the notice's number in `notice` (from 1, rising, never reused
 * in the driver domain's life; IN: notice 0). For these two subops only, bit 1 of flags means this,
 * not PVIOMMU_F_WRITE. PVIOMMU_OP_revoked_ack with flags exactly this
 * acknowledges the BFN's notice only if its number is `notice`, else
 * -ENOENT: an ack of a notice another vCPU acknowledged first cannot
 * release a later revocation of the same BFN unseen (-ENOENT also while
 * the BFN is being revoked again; an unnumbered ack, as an unmap, gets
 * -EBUSY there). The op's last field, `notice`, was `_rsvd` (IN: 0)
 * before ABI 1.5: same layout, new name.
 */
#define PVIOMMU_REVOKED_NUMBERED   (1U << 1)
#define PVIOMMU_OP_revoked_ack     7U /* IN: context, bfn (flags 0; or     */
                                      /* REVOKED_NUMBERED and notice)       */
#define PVIOMMU_OP_context_attach  8U /* IN: context (not 0), gfn = the      */
                                      /* caller's device as a pci_sbdf_t     */
#define PVIOMMU_OP_context_detach  9U /* IN: context, gfn = pci_sbdf_t: back */
                                      /* to the default context              */

/* pv_iommu_op.flags */
#define PVIOMMU_F_READ      (1U << 0) /* device may read                     */
#define PVIOMMU_F_WRITE     (1U << 1) /* device may write                    */
#define PVIOMMU_F_GRANT     (1U << 2) /* gfn is a grant reference            */
#define PVIOMMU_ATTR_SHIFT  8
#define PVIOMMU_ATTR_MASK   (0x7U << PVIOMMU_ATTR_SHIFT)
#define PVIOMMU_ATTR_WB     0U        /* normal memory, cacheable (default)  */
#define PVIOMMU_ATTR_UC     1U        /* normal memory, non-cacheable        */
#define PVIOMMU_ATTR_DEVICE 2U        /* device memory                       */
#define PVIOMMU_F_VALID_MASK (PVIOMMU_F_READ | PVIOMMU_F_WRITE | \
                              PVIOMMU_F_GRANT | PVIOMMU_ATTR_MASK)
/* OP_map: the 512 frames from gfn (2 MiB aligned, one machine run) at 512
 * BFNs from the answered bfn (2 MiB aligned); OP_unmap with flags exactly
 * this: a reference to each of the 512 BFNs from bfn (ABI 1.6). */
#define PVIOMMU_F_EXTENT_2M (1U << 3)
#define PVIOMMU_EXTENT_PAGES 512U

struct pv_iommu_op {
    uint16_t subop;         /* IN: PVIOMMU_OP_*                              */
    uint16_t flags;         /* IN/OUT: PVIOMMU_F_* | attr << ATTR_SHIFT      */
    int32_t status;         /* OUT: 0 or -errno for this op                  */
    uint32_t context;       /* IN/OUT: caller's IOMMU context (0: default)   */
    domid_t domid;          /* IN/OUT: foreign domain                        */
    uint16_t _pad0;         /* IN: 0                                         */
    uint64_aligned_t gfn;   /* IN/OUT: foreign guest frame                   */
    uint64_aligned_t bfn;   /* IN/OUT: bus frame                             */
    uint64_aligned_t notice; /* IN/OUT: revoked_next/ack with              */
                             /* PVIOMMU_REVOKED_NUMBERED; else IN: 0      */
};
typedef struct pv_iommu_op pv_iommu_op_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_op_t);

struct pv_iommu_batch {
    uint32_t version;       /* IN: PVIOMMU_INTERFACE_VERSION                 */
    uint32_t nr_ops;        /* IN: entries in ops, <= caps.max_batch_ops     */
    uint32_t nr_done;       /* IN/OUT: ops completed; processing starts here */
    uint32_t flags;         /* IN: 0                                         */
    XEN_GUEST_HANDLE_64(pv_iommu_op_t) ops; /* IN: pv_iommu_op_t[nr_ops]     */
};
typedef struct pv_iommu_batch pv_iommu_batch_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_batch_t);

/* ---- PVIOMMU_CMD_reserved_regions: BFN ranges never handed out ---- */
#define PVIOMMU_REGION_MSI      1U /* interrupt/MSI window                   */
#define PVIOMMU_REGION_RMRR     2U /* firmware-reserved (RMRR / IVMD)        */
#define PVIOMMU_REGION_MMIO     3U /* PCI MMIO hole, BAR or bridge window    */
#define PVIOMMU_REGION_PLATFORM 4U /* other (e.g. hot-pluggable memory)      */

struct pv_iommu_region {
    uint64_aligned_t start_bfn; /* OUT                                       */
    uint64_aligned_t nr_frames; /* OUT                                       */
    uint32_t kind;              /* OUT: PVIOMMU_REGION_*                     */
    uint32_t _pad0;             /* OUT: 0                                    */
};
typedef struct pv_iommu_region pv_iommu_region_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_region_t);

struct pv_iommu_regions {
    uint32_t version;       /* IN: PVIOMMU_INTERFACE_VERSION                 */
    uint32_t start;         /* IN: index of the first region wanted          */
    uint32_t nr;            /* IN: capacity of regions; OUT: entries written */
    uint32_t total;         /* OUT: number of reserved regions               */
    XEN_GUEST_HANDLE_64(pv_iommu_region_t) regions; /* IN: region_t[nr]      */
};
typedef struct pv_iommu_regions pv_iommu_regions_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_regions_t);

/* ---- PVIOMMU_CMD_set_limits: the toolstack's per-domain quota ---- */
struct pv_iommu_limits {
    uint32_t version;       /* IN: PVIOMMU_INTERFACE_VERSION                 */
    domid_t  domid;         /* IN: the driver domain (exists, not dying)     */
    uint16_t _pad0;         /* IN: must be 0                                 */
    uint64_aligned_t quota; /* IN: its BFN quota; 0: the boot-time default   */
};
typedef struct pv_iommu_limits pv_iommu_limits_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_limits_t);

/* ---- PVIOMMU_CMD_stats: counters and the in-Xen time breakdown ---- */
#define PVIOMMU_STATS_RESET      (1U << 0) /* zero the counters after reading */
#define PVIOMMU_STATS_TIMING_ON  (1U << 1) /* time the services (host-wide)   */
#define PVIOMMU_STATS_TIMING_OFF (1U << 2) /* stop timing                     */

/*
 * A driver domain's counters since its engine state was created or reset
 * (dom0's lives as long as the host; another domain's goes when it holds
 * nothing). ns_* accumulate only while timing is on.
 */
struct pv_iommu_stats {
    uint32_t version;                /* IN: PVIOMMU_INTERFACE_VERSION        */
    domid_t  domid;                  /* IN: the driver domain described      */
    uint16_t flags;                  /* IN: PVIOMMU_STATS_*                  */
    uint64_aligned_t live;           /* OUT: live mappings                   */
    uint64_aligned_t revoked;        /* OUT: notices not yet acknowledged    */
    uint64_aligned_t used;           /* OUT: BFNs counted against the quota  */
    uint64_aligned_t quota;          /* OUT: the quota                       */
    uint64_aligned_t mapped_pages;   /* OUT: distinct foreign pages mapped   */
    uint64_aligned_t maps;           /* OUT: maps that wrote an IOMMU entry  */
    uint64_aligned_t shared;         /* OUT: maps given an existing BFN      */
    uint64_aligned_t unmaps;         /* OUT: unmaps that cleared an entry    */
    uint64_aligned_t revocations;    /* OUT: mappings revoked                */
    uint64_aligned_t flushes;        /* OUT: IOTLB flushes                   */
    uint64_aligned_t batches;        /* OUT: batch hypercalls                */
    uint64_aligned_t ns_batches;     /* OUT: ns in batch hypercalls          */
    uint64_aligned_t ns_get_page;    /* OUT: ns taking page references       */
    uint64_aligned_t ns_put_page;    /* OUT: ns releasing them after flushes */
    uint64_aligned_t ns_iommu_map;   /* OUT: ns in iommu_map                 */
    uint64_aligned_t ns_iommu_unmap; /* OUT: ns in iommu_unmap               */
    uint64_aligned_t ns_iommu_flush; /* OUT: ns in iommu_iotlb_flush         */
    uint64_aligned_t heap_bytes;     /* OUT: engine heap in use, host-wide   */
};
typedef struct pv_iommu_stats pv_iommu_stats_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_stats_t);

/* ---- PVIOMMU_CMD_entry ---- */
struct pv_iommu_entry {
    uint32_t version;       /* IN: PVIOMMU_INTERFACE_VERSION                 */
    domid_t domid;          /* IN: the driver domain                         */
    uint16_t _pad0;         /* IN: 0                                         */
    uint32_t context;       /* IN: one of its own contexts (not 0)           */
    uint16_t level;         /* OUT: leaf level (1: 4 KiB, 2: 2 MiB)          */
    uint16_t format;        /* OUT: PVIOMMU_ENTRY_* format of bits           */
    uint64_aligned_t bfn;   /* IN                                            */
    uint64_aligned_t bits;  /* OUT: the leaf entry, address bits zeroed      */
};
#define PVIOMMU_ENTRY_VTD_SECOND_LEVEL 1U
#define PVIOMMU_ENTRY_ARM_LPAE_STAGE2  2U
typedef struct pv_iommu_entry pv_iommu_entry_t;
DEFINE_XEN_GUEST_HANDLE(pv_iommu_entry_t);

/*
 * Errors (negative; one meaning each):
 *   EPERM          caller may not use PV-IOMMU on the target (incl. XSM)
 *   ENOENT         no such mapping (BFN), context, or pending revocation
 *   ESRCH          no such domain, or a dying one
 *   EIO            the host's IOMMU failed the op (a table write, an IOTLB
 *                  flush, a device's context entry) or a table frame could
 *                  not be written: not the arguments; refused, and a retry
 *                  may succeed (interface 1.7; EINVAL before); an attach
 *                  or detach whose undo failed too leaves the device's DMA
 *                  blocked
 *   ENXIO          gfn not present in the target's p2m
 *   ENOEXEC        32-bit caller (PV32, or HVM/PVH vCPU not in 64-bit mode)
 *   E2BIG          batch larger than max_batch_ops
 *   EAGAIN         retry later: gfn paged out or shared (paging-in or
 *                  unsharing started), or the target changed under the
 *                  call 4 times running (a map: its p2m or the domain
 *                  at its domid; set_limits, stats, entry: the domain at
 *                  its domid)
 *   ENOMEM         hypervisor out of memory (state unchanged)
 *   EACCES         write access asked for a page that is not device-writable
 *                  (read-only, ioreq-server, log-dirty mode)
 *   EFAULT         a guest buffer could not be read or written (or, for
 *                  a batch header's nr_done or a stats reset's copy-out,
 *                  did not read back as written: Xen dropped the write)
 *   EBUSY          context still has live mappings
 *   EXDEV          frame not owned by the target (Xen-owned, special,
 *                  granted, foreign) behind a translated target's gfn
 *                  (a PV target's frame not its own RAM, Xen's
 *                  shared ones included: ENXIO)
 *   ENODEV         frame is MMIO, not RAM
 *   EINVAL         malformed argument
 *   ENOSPC         quota, context table or BFN window exhausted
 *   EOPNOTSUPP     unknown command or subop, or feature not offered
 *   EADDRNOTAVAIL  caller's IOMMU context does not translate BFNs
 *   ESTALE         unmap of a revoked BFN: acknowledged, BFN released
 */

#endif /* __XEN__ || __XEN_TOOLS__ */

#endif /* __XEN_PUBLIC_PV_IOMMU_H__ */

/*
 * Local variables:
 * mode: C
 * c-file-style: "BSD"
 * c-basic-offset: 4
 * tab-width: 4
 * indent-tabs-mode: nil
 * End:
 */
