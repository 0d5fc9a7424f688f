/* SPDX-License-Identifier: MIT */
/* pviommu_guest.h -- C interface of the PV-IOMMU guest-side library
 * (libpviommu_guest.so.1 / libpviommu_guest.a; `pkg-config --cflags --libs
 * pviommu-guest`). Flags and errno values: pviommu.h.
 *
 * Return values. Every int function returns 0 (or a count where said) on
 * success and a negative errno on failure: the ABI's (pviommu.h), or
 * -ECOMM when the transport failed (daemon gone, protocol error, OS call;
 * -EIO before 1.2: hypervisor ABI 1.7 gives EIO the host's IOMMU failures).
 * pviommu_strerror() names any of them; pviommu_last_error() tells what
 * failed and why.
 *
 * Threads. A client may be used from several threads: each call takes the
 * client's lock for its duration, so calls on one client run one at a
 * time (a slow map blocks a lookup on the same client; open one client per
 * thread for parallelism). Distinct clients are independent. The message
 * of pviommu_last_error() is kept per thread, like errno.
 *
 * Ownership. A client from pviommu_open_*() belongs to the caller until
 * pviommu_close(), called exactly once, when no other thread uses it any
 * more. Arrays passed in are the caller's, read or written only during the
 * call, and must hold the stated number of elements; NULL for a required
 * pointer gives -EINVAL. Strings returned by pviommu_strerror() are static;
 * the string of pviommu_last_error() belongs to the library and stays valid
 * until the same thread's next failing call. Never free either. */
#ifndef PVIOMMU_GUEST_H
#define PVIOMMU_GUEST_H
#include <stddef.h>
#include <stdint.h>

/* Version of this C interface; the library's soname carries the major
 * (libpviommu_guest.so.1), which changes only when a program built against
 * an older header could break. 1.1 adds contexts, device attachment and
 * pviommu_entry (hypervisor ABI 1.3); 1.2 answers a transport failure
 * -ECOMM (it was -EIO, which hypervisor ABI 1.7 gives the host's IOMMU
 * failures). */
#define PVIOMMU_GUEST_VERSION_MAJOR 1
#define PVIOMMU_GUEST_VERSION_MINOR 2
#define PVIOMMU_GUEST_VERSION_PATCH 0

typedef struct pviommu_client pviommu_client;

/* Open a client; NULL on failure (pviommu_last_error(NULL) says why).
 * pviommu_open_xen: dom0 on Xen, through /dev/xen/privcmd.
 * pviommu_open_sim: an embedded simulated machine of its own with domain 1
 * of guest_pages pages (page g starts with the 8 bytes
 * 0x5049564f00000000 | g, little-endian) and dom0 owning the PCI devices
 * 0000:00:02.0 and 0000:00:03.0, called as dom0. */
pviommu_client *pviommu_open_xen(void);
pviommu_client *pviommu_open_sim(uint64_t guest_pages);
/* A client of the simulator daemon (`pviommu sim serve --socket PATH`),
 * calling as domain `caller` (0: the control domain). */
pviommu_client *pviommu_open_remote(const char *socket, uint16_t caller);
void pviommu_close(pviommu_client *c);
/* What this thread's last failing call (or open) said; "" if none. `c` may
 * be NULL. */
const char *pviommu_last_error(const pviommu_client *c);
/* "ENOENT: no such mapping or context" for -ENOENT or ENOENT; "unknown
 * error" for anything the library never returns. Static. */
const char *pviommu_strerror(int err);

/* Arrays and out-pointers: NULL or misaligned gives -EINVAL (the reason in
 * pviommu_last_error), except an array of n == 0 elements, which may be
 * NULL. */

/* Map n gfns of domid into context 0. flags: PVIOMMU_F_READ/WRITE and an
 * attribute (pviommu.h); any other bit, PVIOMMU_F_GRANT included, or n
 * above 16 Mi gives -EINVAL. Writes bfns[i] and status[i] (0 or -errno) for
 * each of the n pages; returns 0 if all mapped, else the first failure.
 * A page mapped again gets the same BFN (the library counts references). */
int pviommu_map(pviommu_client *c, uint16_t domid, const uint64_t *gfns, size_t n,
                uint32_t flags, uint64_t *bfns, int32_t *status);
/* Drop one reference to each of n BFNs (at most 16 Mi); the last one unmaps. status[i]
 * as for map. */
int pviommu_unmap(pviommu_client *c, const uint64_t *bfns, size_t n, int32_t *status);
/* What a BFN of context 0 maps: *domid, *gfn, *flags (never a machine
 * frame). -ENOENT if nothing live. */
int pviommu_lookup(pviommu_client *c, uint64_t bfn, uint16_t *domid, uint64_t *gfn,
                   uint32_t *flags);
/* pviommu_open_sim only: the simulated device reads len (at most 4096)
 * bytes at bus address bfn << 12 into buf; -EFAULT on an IOMMU fault,
 * -EINVAL on another transport. */
int pviommu_sim_dma_read(pviommu_client *c, uint64_t bfn, void *buf, size_t len);

/* ---- IOMMU contexts and the devices attached to them (1.1) ----
 * Context 0 is the host's own IOMMU tables of the caller; others are
 * tables the hypervisor's engine writes (PVIOMMU_FEAT_CONTEXTS; on Xen,
 * VT-d only). A device walks a context only once attached to it
 * (PVIOMMU_FEAT_DEVICE_ATTACH); maps into a context take the same checks,
 * quota and revocation as context 0. */
/* Create a context; its number goes to *context. -EOPNOTSUPP if the IOMMU
 * offers only context 0, -ENOSPC if max_contexts are in use. */
int pviommu_context_create(pviommu_client *c, uint32_t *context);
/* Destroy one: -EBUSY while it holds BFNs or has a device attached (detach
 * first: destroying never moves a device behind the caller's back),
 * -ENOENT for no such context. */
int pviommu_context_destroy(pviommu_client *c, uint32_t context);
/* Point the caller's PCI device sbdf (PVIOMMU_SBDF(seg, bus, dev, fn)) at
 * context (not 0): from then on its DMA sees only that context's BFNs.
 * -EPERM not the caller's device, -ENODEV no such device (not: MMIO, as
 * pviommu_strerror says for maps), -EBUSY already attached to a context,
 * -ENOENT no such context, -ENOSPC the context has its most devices,
 * -EOPNOTSUPP the device shares its requester id, has an RMRR or ATS, or
 * the IOMMU has no contexts of the engine's, -EINVAL context 0. */
int pviommu_context_attach(pviommu_client *c, uint32_t context, uint32_t sbdf);
/* Put sbdf back in the default context (its owner's own tables); -ENOENT
 * if it is not attached to context. */
int pviommu_context_detach(pviommu_client *c, uint32_t context, uint32_t sbdf);
/* pviommu_map / pviommu_unmap in context (0 or one created above). */
int pviommu_map_in_context(pviommu_client *c, uint32_t context, uint16_t domid,
                           const uint64_t *gfns, size_t n, uint32_t flags, uint64_t *bfns,
                           int32_t *status);
int pviommu_unmap_in_context(pviommu_client *c, uint32_t context, const uint64_t *bfns,
                             size_t n, int32_t *status);
/* ABI 1.6 (PVIOMMU_FEAT_EXTENTS_2M): map the 2 MiB extent of domid from gfn
 * (a multiple of PVIOMMU_EXTENT_PAGES) into context at 512 consecutive BFNs
 * from *bfn, a multiple of 512: all or nothing. flags as for pviommu_map.
 * -EXDEV: its frames are not one machine run (shadow it as 4 KiB pages);
 * -EBUSY: some of its pages are mapped already, not as this extent;
 * -EINVAL: gfn not a multiple of 512, bad flags, or no extents offered.
 * Each page is then a mapping of its own (pviommu_map of one of them is
 * answered from the cache). */
int pviommu_map_extent(pviommu_client *c, uint32_t context, uint16_t domid, uint64_t gfn,
                       uint32_t flags, uint64_t *bfn);
/* Release one reference to each of the 512 BFNs from bfn (a multiple of
 * 512) of context, as pviommu_unmap_in_context of them: one op when every
 * page's last reference goes, else a page at a time. */
int pviommu_unmap_extent(pviommu_client *c, uint32_t context, uint64_t bfn);
/* pviommu_map_extent of each of n gfns (at most 32 Ki), as many extent ops
 * in one hypercall as the hypervisor takes: bfns[i] and status[i] (0 or
 * -errno) for each; returns 0 if all mapped, else the first failure. */
int pviommu_map_extents(pviommu_client *c, uint32_t context, uint16_t domid,
                        const uint64_t *gfns, size_t n, uint32_t flags, uint64_t *bfns,
                        int32_t *status);
/* pviommu_unmap_extent of each of n first BFNs (at most 32 Ki), batched as
 * pviommu_map_extents; status[i] for each; 0 or the first failure. */
int pviommu_unmap_extents(pviommu_client *c, uint32_t context, const uint64_t *bfns, size_t n,
                          int32_t *status);
/* Control domain only (PVIOMMU_CMD_entry): the leaf entry a device attached
 * to driver domain domid's context (not 0) finds for bfn, address bits
 * zeroed, in the IOMMU's format (VT-d: R bit 0, W 1, EMT 5:3, IPAT 6, PS 7,
 * SNP 11), and its level (1: 4 KiB). -EPERM for another caller, -EINVAL
 * context 0, -ENOENT no such context or nothing mapped at bfn. */
int pviommu_entry(pviommu_client *c, uint16_t domid, uint32_t context, uint64_t bfn,
                  uint32_t *level, uint64_t *bits);
/* pviommu_open_sim only: PCI device sbdf reads len (at most 4096) bytes at
 * bus address bfn << 12 through the context it is attached to now (its
 * owner's default one unless attached); -EFAULT on an IOMMU fault, -EINVAL
 * for an unknown device or another transport. */
int pviommu_sim_device_dma_read(pviommu_client *c, uint32_t sbdf, uint64_t bfn, void *buf,
                                size_t len);

/* A BFN the hypervisor revoked: its page left the foreign domain, lost
 * device-write access, or the domain died. The BFN reaches nothing and stays
 * reserved until acknowledged; drop it from your shadow tables. */
struct pviommu_revocation {
    uint64_t bfn;
    uint64_t gfn;
    uint32_t context;
    uint16_t domid;
    uint16_t pad;
};
/* Receive and acknowledge up to `max` pending revocations (caps.revoked
 * counts them); returns how many were written (call again while it returns
 * max) or -errno. The BFNs leave the mapping cache. */
int pviommu_drain_revocations(pviommu_client *c, struct pviommu_revocation *out,
                              size_t max);
/* The same for the notices of one context only; the others stay queued for
 * whoever owns them. A mediator that shares its driver domain with another
 * (each with contexts of its own) drains its contexts this way: draining
 * them all would take the other's notices, and it would never learn that
 * its BFNs were revoked. -EOPNOTSUPP from a hypervisor without
 * PVIOMMU_FEAT_REVOKED_IN_CONTEXT (ABI 1.4). */
int pviommu_drain_revocations_in(pviommu_client *c, uint32_t context,
                                 struct pviommu_revocation *out, size_t max);
/* Wait up to timeout_ms (at most 65535) until revocations are pending:
 * 1 when some are (then call pviommu_drain_revocations), 0 on timeout,
 * -errno on failure. A client of the daemon wakes as soon as the daemon
 * pushes a notice, and the pushed BFNs leave the mapping cache at once (a
 * map never returns them again). Other clients only check what is pending
 * now; on Xen, wait on VIRQ_PV_IOMMU (pviommu.h) first. */
int pviommu_wait_revocations(pviommu_client *c, int timeout_ms);
/* The toolstack's call (control domain only): set domid's BFN quota;
 * 0 returns it to the boot-time default. */
int pviommu_set_limits(pviommu_client *c, uint16_t domid, uint64_t quota);
/* Embedded simulator only: balloon gfn out of domid (the test's way to make
 * the hypervisor revoke). */
int pviommu_sim_balloon_out(pviommu_client *c, uint16_t domid, uint64_t gfn);

#endif

/* ======================================================================
 * Shadow GPU page tables (guest-driver/src/capi_shadow.rs)
 *
 * A pviommu_shadow shadows one guest's Gen8 4-level PPGTT: its leaves are
 * BFNs the PV-IOMMU mapped for the guest's frames, its table pages live in
 * the library's memory (pviommu_shadow_translate does the GPU's walk). The
 * handle owns its own PV-IOMMU client and its foreign mappings of the
 * guest's memory; it is used by one thread at a time. Functions return 0 (or
 * a count) or a negative errno; pviommu_shadow_last_error says why.
 * ====================================================================== */
#ifndef PVIOMMU_GUEST_SHADOW_H
#define PVIOMMU_GUEST_SHADOW_H
#include <stddef.h>
#include <stdint.h>

typedef struct pviommu_shadow pviommu_shadow;

struct pviommu_shadow_counts {
    uint64_t leaves_mapped;   /* made present by this call */
    uint64_t leaves_unmapped; /* removed by this call, BFNs released */
    uint64_t leaves_present;  /* present after the call */
    uint64_t tables;          /* shadow table pages in use */
    uint64_t pages_read;      /* guest table pages read (sync) */
    uint64_t refused;         /* leaves the hypervisor refused (non-present) */
    uint64_t anomalies;       /* malformed guest tables (entries non-present) */
};

/* A leaf made non-present because Xen revoked its BFN (the page left the
 * guest, or the guest died), before the BFN was acknowledged. */
struct pviommu_revoked_leaf {
    uint64_t gma;
    uint64_t gfn;
    uint64_t bfn;
    uint16_t domid;
    uint16_t pad[3];
};

/* Xen: hypercalls and guest `domid`'s memory through /dev/xen/privcmd. */
pviommu_shadow *pviommu_shadow_open_xen(uint16_t domid);
/* Embedded simulator with one zeroed guest (domid 1), for tests. */
pviommu_shadow *pviommu_shadow_open_sim(uint64_t guest_pages);
/* Tears the shadow down (BFNs unmapped) and frees the handle. */
void pviommu_shadow_close(pviommu_shadow *s);
/* Why the handle's last call failed; with NULL, this thread's last error
 * (pviommu_last_error: why the last open on this thread failed, among
 * others). */
const char *pviommu_shadow_last_error(const pviommu_shadow *s);

/* Build from the guest's PML4 frame; -EBUSY if built, the reader's -errno
 * if the root cannot be read (nothing mapped then). counts may be NULL. */
int pviommu_shadow_build(pviommu_shadow *s, uint64_t root_gfn,
                         struct pviommu_shadow_counts *counts);
/* Re-read the n changed guest table pages (n == 0: all; at most 16 Mi) and
 * apply the diff. */
int pviommu_shadow_sync(pviommu_shadow *s, const uint64_t *changed, size_t n,
                        struct pviommu_shadow_counts *counts);
/* The guest's 2 MiB GPU pages the last build or sync shadowed with one 2 MiB
 * entry over one PV-IOMMU extent (ABI 1.6), and those whose extent it
 * unmapped; 0 and 0 after a failed call. Either pointer may be NULL. */
int pviommu_shadow_last_extents(const pviommu_shadow *s, uint64_t *mapped,
                                uint64_t *unmapped);
/* GMA -> BFN through the shadow; -ENOENT if not present. */
int pviommu_shadow_translate(const pviommu_shadow *s, uint64_t gma, uint64_t *bfn);
/* Drain Xen's revocation notices: affected leaves go non-present, then the
 * BFNs are acknowledged. Writes up to max leaves, returns how many (call
 * again while it returns max). */
int pviommu_shadow_revocations(pviommu_shadow *s, struct pviommu_revoked_leaf *out,
                               size_t max);
/* Unmap every leaf; returns how many, or -ENOENT if not built. */
int64_t pviommu_shadow_teardown(pviommu_shadow *s);

/* Simulator only (-EINVAL on Xen): the guest writes its memory, balloons a
 * frame out; the simulated device reads at a BFN (-EFAULT: IOMMU fault). */
int pviommu_shadow_sim_write(pviommu_shadow *s, uint64_t gfn, size_t offset,
                             const void *buf, size_t len);
int pviommu_shadow_sim_balloon_out(pviommu_shadow *s, uint64_t gfn);
int pviommu_shadow_sim_dma_read(pviommu_shadow *s, uint64_t bfn, void *buf, size_t len);

#endif /* PVIOMMU_GUEST_SHADOW_H */
