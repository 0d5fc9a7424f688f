/* SPDX-License-Identifier: MIT */
/*
 * pviommu.h -- the PV-IOMMU hypercall ABI (interface version 1.7).
 *
 * A driver domain (dom0's GPU mediator) asks the hypervisor to map a foreign
 * domain's guest frame into one of the driver domain's IOMMU contexts; the
 * hypervisor picks a bus frame number (BFN) in a window above host RAM and
 * returns it. Machine frame numbers never cross this interface.
 *
 * This header is kept byte-identical in layout to the Rust crate
 * `pviommu-abi` (abi/src/lib.rs); tests/tests/c_abi.rs compiles a file of
 * offsetof/sizeof assertions against it. The prose specification is
 * design/abi.md.
 *
 * Hypercall: long HYPERVISOR_pv_iommu_op(unsigned int cmd, void *arg)
 *   cmd  one of PVIOMMU_CMD_*
 *   arg  guest address of the command's structure
 * Returns 0 on success, a negative Xen errno, or PVIOMMU_BATCH_INCOMPLETE
 * (only from PVIOMMU_CMD_batch, and only where the hypervisor did not
 * continue the call itself): re-issue the same call to resume.
 */
#ifndef PVIOMMU_ABI_H
#define PVIOMMU_ABI_H

#include <stdint.h>

#define __HYPERVISOR_pv_iommu_op 43

/* Major in the high 16 bits, minor in the low 16. Callers check the major. */
#define PVIOMMU_INTERFACE_VERSION 0x00010007u

/* ---- Commands (first hypercall argument) ---- */
#define PVIOMMU_CMD_query_caps       1u /* arg: struct pv_iommu_caps (out)   */
#define PVIOMMU_CMD_batch            2u /* arg: struct pv_iommu_batch (in/out) */
#define PVIOMMU_CMD_reserved_regions 3u /* arg: struct pv_iommu_regions      */
                                        /* (control domain only)           */
#define PVIOMMU_CMD_set_limits       4u /* arg: struct pv_iommu_limits (in)  */
                                        /* (control domain only)           */
#define PVIOMMU_CMD_stats            5u /* arg: struct pv_iommu_stats        */
                                        /* (control domain only; ABI 1.2)  */
#define PVIOMMU_CMD_entry            6u /* arg: struct pv_iommu_entry        */
                                        /* (control domain only; ABI 1.3)  */
/* Commands with this bit set are the hypervisor's own (a batch ending in an
 * error continues as one, carrying the error): no PVIOMMU_CMD_* has it. One
 * issued by a guest finishes its pending work and returns the errno it
 * carries (-EINVAL if malformed). */
#define PVIOMMU_CMD_RESERVED_FOR_CONTINUATIONS 0x40000000u

/* Global VIRQ raised in a driver domain when revocation notices are pending
 * for it: bind it (EVTCHNOP_bind_virq / Linux IOCTL_EVTCHN_BIND_VIRQ), then
 * drain with PVIOMMU_OP_revoked_next / _ack. */
#define PVIOMMU_VIRQ 14

/* Positive return of PVIOMMU_CMD_batch: work budget spent, call again. */
#define PVIOMMU_BATCH_INCOMPLETE 1

/* ---- Capabilities ---- */
#define PVIOMMU_FEAT_CONTEXTS    (1u << 0) /* more than the default context    */
#define PVIOMMU_FEAT_ATTR_UC     (1u << 1) /* PVIOMMU_ATTR_UC honoured         */
#define PVIOMMU_FEAT_ATTR_DEVICE (1u << 2) /* PVIOMMU_ATTR_DEVICE honoured     */
#define PVIOMMU_FEAT_GRANT       (1u << 3) /* PVIOMMU_F_GRANT maps accepted    */
#define PVIOMMU_FEAT_REVOCATION_QUEUE (1u << 4) /* revoked BFNs reserved until */
                                           /* acknowledged (OP_revoked_*)  */
#define PVIOMMU_FEAT_DEVICE_ATTACH (1u << 5) /* OP_context_attach/_detach     */
                                           /* (ABI 1.3)                    */
#define PVIOMMU_FEAT_REVOKED_IN_CONTEXT (1u << 6) /* OP_revoked_next takes  */
                                           /* PVIOMMU_REVOKED_IN_CONTEXT   */
                                           /* (ABI 1.4)                    */
#define PVIOMMU_FEAT_REVOKED_NUMBERED (1u << 7) /* revoked_next/ack take  */
                                              /* PVIOMMU_REVOKED_NUMBERED */
#define PVIOMMU_FEAT_EXTENTS_2M  (1u << 8) /* map/unmap take PVIOMMU_F_EXTENT_2M */
                                           /* (ABI 1.6)                    */
#define PVIOMMU_FEAT_ALL         0x1ffu

/* caps.translation: whether the caller's IOMMU context translates BFNs.
 * Anything but TRANSLATES makes maps into context 0 fail with EADDRNOTAVAIL
 * (contexts of the hypervisor's own always translate). */
#define PVIOMMU_TRANSLATES       0u /* tables PV-IOMMU writes are walked      */
#define PVIOMMU_NO_IOMMU         1u /* IOMMU off / no context for the caller */
#define PVIOMMU_PASSTHROUGH      2u /* hardware domain bypasses the IOMMU    */
#define PVIOMMU_RELAXED          3u /* non-strict hwdom: all RAM mapped       */
#define PVIOMMU_SHARED_PT        4u /* IOMMU shares the CPU's p2m tables      */
#define PVIOMMU_MIRRORS_P2M      5u /* translated caller whose IOMMU tables  */
                                    /* mirror its p2m (dfn = gfn)            */

struct pv_iommu_caps {
    uint32_t version;            /* PVIOMMU_INTERFACE_VERSION                */
    uint32_t max_batch_ops;      /* largest nr_ops accepted in one batch     */
    uint64_t page_sizes;         /* bit n set: 2^n-byte IOMMU pages          */
    uint64_t bfn_window_start;   /* first BFN the hypervisor may hand out    */
    uint64_t bfn_window_end;     /* one past the last such BFN               */
    uint32_t nr_reserved_regions;/* see PVIOMMU_CMD_reserved_regions         */
    uint32_t features;           /* PVIOMMU_FEAT_*                           */
    uint32_t max_contexts;       /* contexts per driver domain, incl. ctx 0  */
    uint32_t translation;        /* PVIOMMU_TRANSLATES or why not            */
    uint64_t quota;              /* caller's BFN quota                       */
    uint64_t used;               /* BFNs in use: live + revoked-unacked      */
    uint64_t revoked;            /* revocations not yet acknowledged         */
    uint64_t _rsvd;              /* written as 0                             */
};

/* ---- Batched operations ---- */
#define PVIOMMU_OP_map             1u /* in: context, domid, gfn, flags; out: bfn */
#define PVIOMMU_OP_unmap           2u /* in: context, bfn                        */
#define PVIOMMU_OP_lookup          3u /* in: context, bfn; out: domid, gfn, flags */
#define PVIOMMU_OP_context_create  4u /* out: context                            */
#define PVIOMMU_OP_context_destroy 5u /* in: context (no live mappings)          */
#define PVIOMMU_OP_revoked_next    6u /* out: bfn, context, domid, gfn of the    */
                                      /* oldest unacked revocation; ENOENT: none */
/* PVIOMMU_OP_revoked_next with flags = PVIOMMU_REVOKED_IN_CONTEXT (ABI 1.4,
 * PVIOMMU_FEAT_REVOKED_IN_CONTEXT): in: context, gfn = how many of that
 * context's oldest notices to pass over (<= PVIOMMU_REVOKED_MAX_SKIP, else
 * EINVAL); domid and bfn 0, flags this (| PVIOMMU_REVOKED_NUMBERED); out: bfn, domid, gfn
 * (and notice, with PVIOMMU_REVOKED_NUMBERED)
 * (context left as it was); ENOENT: no more, or not the caller's context.
 * For this subop only, flags bit 0 means this, not PVIOMMU_F_READ. A batch
 * of them with gfn 0, 1, 2, ... reports that many notices in one call; acks
 * earlier in the same batch are done first. */
#define PVIOMMU_REVOKED_IN_CONTEXT (1u << 0)
#define PVIOMMU_REVOKED_MAX_SKIP   255u
/* ABI 1.5 (PVIOMMU_FEAT_REVOKED_NUMBERED). PVIOMMU_OP_revoked_next with
 * this bit in flags (alone or with PVIOMMU_REVOKED_IN_CONTEXT) also reports
 * the notice's number in `notice` (from 1, rising, never reused in the
 * driver domain's life; in: notice 0). For these two subops only, flags bit 1 means this, not
 * PVIOMMU_F_WRITE. PVIOMMU_OP_revoked_ack with flags exactly this acknowledges
 * the BFN's notice only if its number is `notice`, else ENOENT: an ack of a
 * notice another thread acknowledged first cannot release a later
 * revocation of the same BFN unseen (ENOENT also while the BFN is being
 * revoked again; an unnumbered ack, as an unmap, gets EBUSY there). The
 * op's last field, `notice`, was `_rsvd` (always 0) before ABI 1.5: same
 * layout, new name. */
#define PVIOMMU_REVOKED_NUMBERED   (1u << 1)
#define PVIOMMU_OP_revoked_ack     7u /* in: context, bfn (flags 0; or       */
                                      /* PVIOMMU_REVOKED_NUMBERED and notice): */
                                      /* release a revoked BFN                 */
#define PVIOMMU_OP_context_attach  8u /* in: context (not 0), gfn = device's    */
                                      /* SBDF: its DMA now uses that context   */
#define PVIOMMU_OP_context_detach  9u /* in: context, gfn = SBDF: the device   */
                                      /* goes back to the default context      */
/* A PCI device as carried in pv_iommu_op.gfn by context_attach/_detach. */
#define PVIOMMU_SBDF(seg, bus, dev, fn) \
    ((uint64_t)(seg) << 16 | (uint64_t)(bus) << 8 | (uint64_t)(dev) << 3 | (fn))

/* op.flags */
#define PVIOMMU_F_READ   (1u << 0)  /* device may read                          */
#define PVIOMMU_F_WRITE  (1u << 1)  /* device may write                         */
#define PVIOMMU_F_GRANT  (1u << 2)  /* gfn holds a grant reference (designed;   */
                                    /* EOPNOTSUPP without PVIOMMU_FEAT_GRANT)   */
#define PVIOMMU_ATTR_SHIFT 8
#define PVIOMMU_ATTR_MASK  (0x7u << PVIOMMU_ATTR_SHIFT)
#define PVIOMMU_ATTR_WB     0u      /* normal memory, cacheable (default)      */
#define PVIOMMU_ATTR_UC     1u      /* normal memory, non-cacheable            */
#define PVIOMMU_ATTR_DEVICE 2u      /* device memory (no speculation/merging)  */
#define PVIOMMU_F_VALID_MASK (PVIOMMU_F_READ | PVIOMMU_F_WRITE | \
                              PVIOMMU_F_GRANT | PVIOMMU_ATTR_MASK)
/* ABI 1.6 (PVIOMMU_FEAT_EXTENTS_2M). OP_map with this flag too maps the
 * PVIOMMU_EXTENT_PAGES frames from gfn (a multiple of 512; not a grant;
 * one run of machine frames, else EXDEV) at 512 consecutive BFNs from the
 * bfn answered (a multiple of 512): all or nothing. Each page is a mapping
 * of its own (its reference, its revocation). An extent whose pages are
 * all mapped already (same target, context, permissions, attribute) at one
 * such run shares it; one mapped in part, or elsewhere, answers EBUSY.
 * OP_unmap with flags exactly this drops a reference to each of the 512
 * BFNs from bfn (a multiple of 512): none unless each is a mapping of the
 * context or a revoked BFN (acknowledged; the op then answers ESTALE). */
#define PVIOMMU_F_EXTENT_2M (1u << 3)
#define PVIOMMU_EXTENT_PAGES 512u

struct pv_iommu_op {
    uint16_t subop;     /* PVIOMMU_OP_*                                         */
    uint16_t flags;     /* PVIOMMU_F_* | attribute << PVIOMMU_ATTR_SHIFT        */
    int32_t  status;    /* out: 0 or -errno for this op                         */
    uint32_t context;   /* IOMMU context of the caller (0 = default)            */
    uint16_t domid;     /* foreign domain                                       */
    uint16_t _pad0;     /* must be 0                                            */
    uint64_t gfn;       /* foreign guest frame (or grant reference)             */
    uint64_t bfn;       /* bus frame                                            */
    uint64_t notice;    /* revoked_next/ack with PVIOMMU_REVOKED_NUMBERED: the  */
                        /* notice's number; must be 0 otherwise               */
};

struct pv_iommu_batch {
    uint32_t version;   /* in: PVIOMMU_INTERFACE_VERSION                        */
    uint32_t nr_ops;    /* in: entries in ops[], <= caps.max_batch_ops          */
    uint32_t nr_done;   /* in/out: ops completed; processing starts here        */
    uint32_t flags;     /* in: must be 0                                        */
    uint64_t ops;       /* in: guest address of struct pv_iommu_op[nr_ops]      */
};

/* ---- Reserved regions (BFN ranges never handed out) ---- */
#define PVIOMMU_REGION_MSI      1u /* interrupt/MSI window                      */
#define PVIOMMU_REGION_RMRR     2u /* firmware-reserved (RMRR / IVMD)           */
#define PVIOMMU_REGION_MMIO     3u /* PCI MMIO hole or bridge window            */
#define PVIOMMU_REGION_PLATFORM 4u /* anything else the platform reports        */

struct pv_iommu_region {
    uint64_t start_bfn;
    uint64_t nr_frames;
    uint32_t kind;      /* PVIOMMU_REGION_*                                     */
    uint32_t _pad0;
};

struct pv_iommu_regions {
    uint32_t version;   /* in: PVIOMMU_INTERFACE_VERSION                        */
    uint32_t start;     /* in: index of the first region wanted                 */
    uint32_t nr;        /* in: capacity of regions[]; out: entries written      */
    uint32_t total;     /* out: number of reserved regions                      */
    uint64_t regions;   /* in: guest address of struct pv_iommu_region[nr]      */
};

/* ---- Per-domain limits, set by the toolstack ---- */
struct pv_iommu_limits {
    uint32_t version;   /* in: PVIOMMU_INTERFACE_VERSION                        */
    uint16_t domid;     /* in: the driver domain (exists, not dying)            */
    uint16_t _pad0;     /* in: must be 0                                        */
    uint64_t quota;     /* in: its BFN quota (0: the boot-time default)         */
};

/* ---- Counters and the in-hypervisor time breakdown (ABI 1.2) ---- */
#define PVIOMMU_STATS_RESET      (1u << 0) /* zero the domain's counters after reading */
#define PVIOMMU_STATS_TIMING_ON  (1u << 1) /* time the services (host-wide)            */
#define PVIOMMU_STATS_TIMING_OFF (1u << 2) /* stop timing                              */

/* A driver domain's counters since its engine state was created or reset
 * (dom0's lives as long as the host; another domain's goes when it holds
 * nothing). ns_* accumulate only while timing is on. */
struct pv_iommu_stats {
    uint32_t version;        /* in: PVIOMMU_INTERFACE_VERSION                   */
    uint16_t domid;          /* in: the driver domain described                 */
    uint16_t flags;          /* in: PVIOMMU_STATS_*                             */
    uint64_t live;           /* out: live mappings                              */
    uint64_t revoked;        /* out: notices not yet acknowledged               */
    uint64_t used;           /* out: BFNs counted against the quota             */
    uint64_t quota;          /* out: the quota                                  */
    uint64_t mapped_pages;   /* out: foreign pages mapped, in each context      */
    uint64_t maps;           /* out: maps that installed an IOMMU entry         */
    uint64_t shared;         /* out: maps answered with an existing BFN         */
    uint64_t unmaps;         /* out: unmaps that removed an IOMMU entry         */
    uint64_t revocations;    /* out: mappings revoked                           */
    uint64_t flushes;        /* out: IOTLB flushes                              */
    uint64_t batches;        /* out: batch hypercalls                           */
    uint64_t ns_batches;     /* out: ns inside batch hypercalls (all below too) */
    uint64_t ns_get_page;    /* out: ns taking page references                  */
    uint64_t ns_put_page;    /* out: ns releasing them after flushes            */
    uint64_t ns_iommu_map;   /* out: ns writing IOMMU entries                   */
    uint64_t ns_iommu_unmap; /* out: ns clearing IOMMU entries                  */
    uint64_t ns_iommu_flush; /* out: ns in IOTLB flushes                        */
    uint64_t heap_bytes;     /* out: engine heap in use, host-wide              */
};

/* PVIOMMU_CMD_entry: the leaf entry a device walking one of the driver
 * domain's own contexts finds for a BFN, address field zeroed (no machine
 * frame crosses the interface): permissions, memory type, snoop. */
struct pv_iommu_entry {
    uint32_t version;   /* in: PVIOMMU_INTERFACE_VERSION                        */
    uint16_t domid;     /* in: the driver domain                                */
    uint16_t _pad0;     /* must be 0                                            */
    uint32_t context;   /* in: one of its own contexts (not 0)                  */
    uint16_t level;     /* out: level of the leaf (1: 4 KiB, 2: 2 MiB)          */
    uint16_t format;    /* out: PVIOMMU_ENTRY_* format of bits                  */
    uint64_t bfn;       /* in                                                   */
    uint64_t bits;      /* out: the entry, IOMMU format, address bits zeroed    */
};
#define PVIOMMU_ENTRY_VTD_SECOND_LEVEL 1u
#define PVIOMMU_ENTRY_ARM_LPAE_STAGE2  2u

/* ---- Errors (negative Xen errno values; one meaning each in this ABI) ---- */
/* EPERM      1  caller has no privilege over the target domain or device    */
/* ENOENT     2  no such mapping (BFN) or context; device not attached there */
/* ESRCH      3  no such domain, or a dying one                              */
/* EIO        5  the host's IOMMU failed the op (a table write, a flush, a   */
/*               device's context entry): not the arguments; refused, retry */
/*               may succeed (ABI 1.7; EINVAL before); an attach or detach */
/*               whose undo failed too leaves the device's DMA blocked      */
/* ENXIO      6  gfn not present in the target's p2m                         */
/* ENOEXEC    8  32-bit caller: the interface is 64-bit only                 */
/* E2BIG      7  batch larger than max_batch_ops                             */
/* EAGAIN    11  retry later: gfn paged out or being shared, or the target  */
/*               changed under the call 4 times running (a map: its p2m or */
/*               its domain; set_limits, stats, entry: the domain at its   */
/*               domid)                                                    */
/* ENOMEM    12  hypervisor out of memory                                    */
/* EACCES    13  write access asked for a read-only page                     */
/* EFAULT    14  a guest buffer could not be read or written                 */
/* EBUSY     16  in use: context with mappings/devices, device attached      */
/* EXDEV     18  frame not owned by the target (Xen-owned, granted, foreign) */
/*               behind a translated target's gfn (PV target: ENXIO)         */
/* ENODEV    19  frame is MMIO, not RAM; or no such PCI device               */
/* EINVAL    22  malformed argument (flags, padding, version, context 0 ...) */
/* ENOSPC    28  quota, context table or BFN window exhausted                */
/* EOPNOTSUPP 95 unknown command/subop, or feature not offered               */
/* EADDRNOTAVAIL 99 caller's IOMMU context does not translate BFNs           */
/* ESTALE   116  unmap of a revoked BFN: acknowledged, BFN released          */

#endif /* PVIOMMU_ABI_H */
