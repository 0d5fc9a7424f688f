/* SPDX-License-Identifier: MIT */
/* pviommu_guest.h -- C interface of the PV-IOMMU guest-side library
 * (libpviommu_guest.so / .a). Flags and errno values: pviommu.h. */
#ifndef PVIOMMU_GUEST_H
#define PVIOMMU_GUEST_H
#include <stddef.h>
#include <stdint.h>

typedef struct pviommu_client pviommu_client;

pviommu_client *pviommu_open_xen(void);
pviommu_client *pviommu_open_sim(uint64_t guest_pages);
pviommu_client *pviommu_open_remote(const char *socket, uint16_t caller);
void pviommu_close(pviommu_client *c);
const char *pviommu_last_error(const pviommu_client *c);

int pviommu_map(pviommu_client *c, uint16_t domid, const uint64_t *gfns, size_t n,
                uint32_t flags, uint64_t *bfns, int32_t *status);
int pviommu_unmap(pviommu_client *c, const uint64_t *bfns, size_t n, int32_t *status);
int pviommu_lookup(pviommu_client *c, uint64_t bfn, uint16_t *domid, uint64_t *gfn,
                   uint32_t *flags);
int pviommu_sim_dma_read(pviommu_client *c, uint64_t bfn, void *buf, size_t len);

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
/* The toolstack's call (control domain only): set domid's BFN quota;
 * 0 returns it to the boot-time default. */
int pviommu_set_limits(pviommu_client *c, uint16_t domid, uint64_t quota);
/* Embedded simulator only: balloon gfn out of domid (the test's way to make
 * the hypervisor revoke). */
int pviommu_sim_balloon_out(pviommu_client *c, uint16_t domid, uint64_t gfn);

#endif
