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

#endif
