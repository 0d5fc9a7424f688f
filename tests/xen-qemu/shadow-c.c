/* SPDX-License-Identifier: MIT */
/*
 * shadow-c.c -- a C mediator's shadow on real Xen, through the library's C
 * API (libpviommu_guest.a, pviommu_guest.h "shadow" section):
 *
 *   shadow-c DOMID ROOT GMA...   build the shadow of DOMID's PPGTT at ROOT,
 *                                print the counts and each GMA's BFN, tear
 *                                the shadow down, print how many leaves it
 *                                unmapped.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include "pviommu_guest.h"

int main(int argc, char **argv)
{
    struct pviommu_shadow_counts c;
    pviommu_shadow *s;
    int i, rc;
    if ( argc < 3 ) { fprintf(stderr, "usage: shadow-c DOMID ROOT GMA...\n"); return 2; }
    s = pviommu_shadow_open_xen((uint16_t)strtoul(argv[1], NULL, 0));
    if ( !s ) { printf("open failed\n"); return 1; }
    rc = pviommu_shadow_build(s, strtoull(argv[2], NULL, 0), &c);
    printf("build rc=%d leaves=%" PRIu64 " tables=%" PRIu64 " refused=%" PRIu64
           " anomalies=%" PRIu64 " error=%s\n", rc, c.leaves_mapped, c.tables, c.refused,
           c.anomalies, rc ? pviommu_shadow_last_error(s) : "");
    for ( i = 3; i < argc; i++ )
    {
        uint64_t bfn = 0;
        int r = pviommu_shadow_translate(s, strtoull(argv[i], NULL, 0), &bfn);
        printf("gma=%s rc=%d bfn=%" PRIu64 "\n", argv[i], r, bfn);
    }
    printf("teardown=%" PRId64 "\n", pviommu_shadow_teardown(s));
    pviommu_shadow_close(s);
    return rc ? 1 : 0;
}
