/* A C mediator's shadow through the library on the embedded simulator: lay
 * out a guest PPGTT, build, translate, DMA, sync after an edit, receive a
 * revocation, bad input. Prints OK on success. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include "pviommu_guest.h"

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (%s)\n", __LINE__, #c, \
                                          pviommu_shadow_last_error(s)); return 1; } } while (0)

static int put(pviommu_shadow *s, uint64_t table, unsigned idx, uint64_t value)
{
    return pviommu_shadow_sim_write(s, table, idx * 8, &value, 8);
}

int main(void)
{
    pviommu_shadow *s = pviommu_shadow_open_sim(1024);
    struct pviommu_shadow_counts c;
    struct pviommu_revoked_leaf rl[4];
    uint64_t bfn, old, changed = 0x13;
    char buf[16];
    unsigned i;
    CHECK(s != NULL);
    /* An open that fails (no Xen here) says why. */
    {
        pviommu_shadow *x = pviommu_shadow_open_xen(5);
        if (x == NULL)
            CHECK(strstr(pviommu_shadow_last_error(NULL), "shadow open") != NULL);
        else
            pviommu_shadow_close(x);
    }
    /* an all-zero root is a valid, empty PPGTT */
    CHECK(pviommu_shadow_build(s, 0x10, &c) == 0 && c.leaves_mapped == 0 && c.tables == 1);
    pviommu_shadow_close(s);

    s = pviommu_shadow_open_sim(1024);
    CHECK(pviommu_shadow_build(s, 0x99999, &c) == -EFAULT); /* not the guest's frame */
    CHECK(strstr(pviommu_shadow_last_error(s), "0x99999") != NULL);
    CHECK(put(s, 0x10, 0, (0x11ULL << 12) | 3) == 0);
    CHECK(put(s, 0x11, 0, (0x12ULL << 12) | 3) == 0);
    CHECK(put(s, 0x12, 0, (0x13ULL << 12) | 3) == 0);
    for (i = 0; i < 4; i++) {
        char tag[16];
        snprintf(tag, sizeof tag, "page %u", i);
        CHECK(pviommu_shadow_sim_write(s, 0x100 + i, 0, tag, strlen(tag) + 1) == 0);
        CHECK(put(s, 0x13, i, ((0x100ULL + i) << 12) | 3) == 0);
    }
    CHECK(pviommu_shadow_build(s, 0x10, &c) == 0);
    CHECK(c.leaves_mapped == 4 && c.tables == 4 && c.refused == 0 && c.anomalies == 0);
    CHECK(pviommu_shadow_build(s, 0x10, &c) == -EBUSY);
    CHECK(pviommu_shadow_translate(s, 0x2000, &bfn) == 0);
    CHECK(pviommu_shadow_sim_dma_read(s, bfn, buf, 7) == 0 && memcmp(buf, "page 2", 7) == 0);
    CHECK(pviommu_shadow_translate(s, 0x5000, &bfn) == -ENOENT);
    CHECK(pviommu_shadow_translate(s, 0x2000, NULL) == -EINVAL);

    /* the guest unmaps page 3: one leaf goes, its BFN faults */
    CHECK(pviommu_shadow_translate(s, 0x3000, &old) == 0);
    CHECK(put(s, 0x13, 3, 0) == 0);
    CHECK(pviommu_shadow_sync(s, &changed, 1, &c) == 0);
    CHECK(c.leaves_mapped == 0 && c.leaves_unmapped == 1 && c.leaves_present == 3 && c.pages_read == 1);
    CHECK(pviommu_shadow_sim_dma_read(s, old, buf, 7) == -EFAULT);
    /* A BFN past the bus names no address: refused, not read at the top. */
    CHECK(pviommu_shadow_sim_dma_read(s, UINT64_MAX, buf, 7) == -EINVAL);
    CHECK(pviommu_shadow_sync(s, NULL, 1, &c) == -EINVAL);
    CHECK(strstr(pviommu_shadow_last_error(s), "changed is NULL") != NULL);
    /* A length no array has is refused before anything is read. */
    CHECK(pviommu_shadow_sync(s, &changed, (size_t)-1, &c) == -EINVAL);
    CHECK(strstr(pviommu_shadow_last_error(s), "at most") != NULL);
    CHECK(pviommu_shadow_sim_write(s, 0x13, 0, NULL, 0) == 0);

    /* page 1 is ballooned out: its leaf goes non-present, reported */
    CHECK(pviommu_shadow_translate(s, 0x1000, &old) == 0);
    CHECK(pviommu_shadow_sim_balloon_out(s, 0x101) == 0);
    CHECK(pviommu_shadow_revocations(s, rl, 4) == 1);
    CHECK(rl[0].gma == 0x1000 && rl[0].gfn == 0x101 && rl[0].bfn == old && rl[0].domid == 1);
    CHECK(pviommu_shadow_translate(s, 0x1000, &bfn) == -ENOENT);
    CHECK(pviommu_shadow_revocations(s, rl, 4) == 0);
    CHECK(pviommu_shadow_revocations(s, NULL, 4) == -EINVAL);

    CHECK(pviommu_shadow_teardown(s) == 2);
    CHECK(pviommu_shadow_teardown(s) == -ENOENT);
    pviommu_shadow_close(s);
    pviommu_shadow_close(NULL);

    /* A 2 MiB GPU page (PD[1], PS, at gfns 0x200..0x3ff): one extent op,
     * one 2 MiB shadow entry; gone again in one. */
    {
        uint64_t mapped = 9, unmapped = 9, base;
        changed = 0x12;
        s = pviommu_shadow_open_sim(1024);
        CHECK(s != NULL);
        CHECK(put(s, 0x10, 0, (0x11ULL << 12) | 3) == 0);
        CHECK(put(s, 0x11, 0, (0x12ULL << 12) | 3) == 0);
        CHECK(put(s, 0x12, 1, (0x200ULL << 12) | 0x80 | 3) == 0);
        CHECK(pviommu_shadow_sim_write(s, 0x203, 0, "big 3", 6) == 0);
        CHECK(pviommu_shadow_build(s, 0x10, &c) == 0 && c.leaves_mapped == 512);
        CHECK(pviommu_shadow_last_extents(s, &mapped, &unmapped) == 0);
        CHECK(mapped == 1 && unmapped == 0);
        CHECK(pviommu_shadow_translate(s, 0x200000, &base) == 0 && base % 512 == 0);
        CHECK(pviommu_shadow_translate(s, 0x203000, &bfn) == 0 && bfn == base + 3);
        CHECK(pviommu_shadow_sim_dma_read(s, bfn, buf, 6) == 0 && memcmp(buf, "big 3", 6) == 0);
        CHECK(put(s, 0x12, 1, 0) == 0);
        CHECK(pviommu_shadow_sync(s, &changed, 1, &c) == 0 && c.leaves_unmapped == 512);
        CHECK(pviommu_shadow_last_extents(s, &mapped, NULL) == 0 && mapped == 0);
        CHECK(pviommu_shadow_last_extents(s, NULL, &unmapped) == 0 && unmapped == 1);
        CHECK(pviommu_shadow_sim_dma_read(s, bfn, buf, 6) == -EFAULT);
        CHECK(pviommu_shadow_last_extents(NULL, &mapped, &unmapped) == -EINVAL);
        CHECK(pviommu_shadow_last_extents(s, (uint64_t *)((char *)&mapped + 1), NULL) == -EINVAL);
        pviommu_shadow_close(s);
    }
    CHECK(pviommu_shadow_build(NULL, 0x10, &c) == -EINVAL);
    printf("OK\n");
    return 0;
}
