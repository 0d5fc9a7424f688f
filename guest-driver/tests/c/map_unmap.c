/* A C mediator using libpviommu_guest against the embedded simulator:
 * map a guest's pages, let the simulated device read them through the
 * returned BFNs, look one up, unmap, and check the device faults. */
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include "pviommu.h"
#include "pviommu_guest.h"

#define N 8
#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL: " __VA_ARGS__); fprintf(stderr, "\n"); return 1; } } while (0)

int main(void)
{
    /* No socket path: NULL, and the thread's last error says why. */
    CHECK(pviommu_open_remote(NULL, 0) == NULL, "open_remote NULL");
    CHECK(strstr(pviommu_last_error(NULL), "NULL") != NULL, "open_remote NULL message: '%s'",
          pviommu_last_error(NULL));
    pviommu_client *c = pviommu_open_sim(64);
    CHECK(c, "open_sim");
    uint64_t gfns[N], bfns[N];
    int32_t status[N];
    for (int i = 0; i < N; i++)
        gfns[i] = 10 + i;
    int rc = pviommu_map(c, 1, gfns, N, PVIOMMU_F_READ | PVIOMMU_F_WRITE, bfns, status);
    CHECK(rc == 0, "map: %d %s", rc, pviommu_last_error(c));
    for (int i = 0; i < N; i++) {
        uint64_t word = 0;
        CHECK(status[i] == 0, "status %d", status[i]);
        CHECK(pviommu_sim_dma_read(c, bfns[i], &word, sizeof(word)) == 0, "dma %d", i);
        CHECK(word == (0x5049564f00000000ull | gfns[i]), "bytes of gfn %llu: %llx",
              (unsigned long long)gfns[i], (unsigned long long)word);
    }
    uint16_t domid; uint64_t gfn; uint32_t flags;
    CHECK(pviommu_lookup(c, bfns[3], &domid, &gfn, &flags) == 0, "lookup");
    CHECK(domid == 1 && gfn == 13 && (flags & PVIOMMU_F_WRITE), "lookup result");

    /* Bad input: unknown domain gives -ESRCH per page, with a message. */
    uint64_t bad_gfn = 1, bad_bfn; int32_t bad_status;
    rc = pviommu_map(c, 77, &bad_gfn, 1, PVIOMMU_F_READ, &bad_bfn, &bad_status);
    CHECK(rc == -3 && bad_status == -3, "unknown domain: %d", rc);
    CHECK(strstr(pviommu_last_error(c), "ESRCH") != NULL, "message: %s", pviommu_last_error(c));
    /* Error strings: by name, either sign, static; unknown values say so. */
    CHECK(strncmp(pviommu_strerror(-3), "ESRCH: ", 7) == 0, "strerror: %s", pviommu_strerror(-3));
    CHECK(pviommu_strerror(3) == pviommu_strerror(-3), "strerror sign");
    CHECK(strncmp(pviommu_strerror(-5), "EIO: the host", 13) == 0, "strerror EIO: %s",
          pviommu_strerror(-5));
    CHECK(strncmp(pviommu_strerror(-70), "ECOMM: the transport", 20) == 0, "strerror ECOMM: %s",
          pviommu_strerror(-70));
    CHECK(strcmp(pviommu_strerror(12345), "unknown error") == 0, "strerror unknown");
    CHECK(strcmp(pviommu_strerror(-2147483647 - 1), "unknown error") == 0, "strerror INT_MIN");
    /* Flags the call does not know, or a grant map, are refused. */
    CHECK(pviommu_map(c, 1, &bad_gfn, 1, PVIOMMU_F_READ | 0x10000, &bad_bfn, &bad_status) == -22,
          "flag above 16 bits");
    CHECK(pviommu_map(c, 1, &bad_gfn, 1, PVIOMMU_F_READ | 0x8, &bad_bfn, &bad_status) == -22,
          "unknown flag");
    CHECK(pviommu_map(c, 1, &bad_gfn, 1, PVIOMMU_F_READ | PVIOMMU_F_GRANT, &bad_bfn, &bad_status) == -22,
          "grant");
    CHECK(strstr(pviommu_last_error(c), "flags") != NULL, "flags message: %s", pviommu_last_error(c));
    /* NULL where an array is needed: -EINVAL, nothing touched. */
    CHECK(pviommu_map(c, 1, NULL, 1, PVIOMMU_F_READ, &bad_bfn, &bad_status) == -22, "NULL gfns");
    CHECK(strstr(pviommu_last_error(c), "gfns is NULL") != NULL, "NULL gfns message: %s",
          pviommu_last_error(c));
    CHECK(pviommu_map(c, 1, &bad_gfn, 1, PVIOMMU_F_READ, &bad_bfn, NULL) == -22, "NULL status");
    CHECK(strstr(pviommu_last_error(c), "status is NULL") != NULL, "NULL status message: %s",
          pviommu_last_error(c));
    /* A misaligned array is refused, not read. */
    CHECK(pviommu_map(c, 1, (const uint64_t *)((const char *)gfns + 1), 1, PVIOMMU_F_READ,
                      &bad_bfn, &bad_status) == -22, "misaligned gfns");
    CHECK(strstr(pviommu_last_error(c), "not aligned") != NULL, "misaligned message: %s",
          pviommu_last_error(c));
    /* A misaligned out-pointer is refused, not written. */
    {
        uint64_t words[2];
        uint16_t d16;
        uint32_t f32;
        CHECK(pviommu_lookup(c, bfns[0], &d16, (uint64_t *)((char *)words + 1), &f32) == -22,
              "misaligned gfn out-pointer");
    }
    /* A BFN past the bus is refused, not truncated to another page. */
    {
        uint64_t word;
        CHECK(pviommu_sim_dma_read(c, bfns[0] | (1ull << 52), &word, sizeof(word)) == -22,
              "bfn past the bus");
    }
    /* Empty arrays may be NULL (C's usual empty array): nothing to do. */
    CHECK(pviommu_map(c, 1, NULL, 0, PVIOMMU_F_READ, NULL, NULL) == 0, "empty map with NULLs");
    CHECK(pviommu_unmap(c, NULL, 0, NULL) == 0, "empty unmap with NULLs");
    CHECK(pviommu_unmap(c, NULL, 1, &bad_status) == -22, "NULL bfns");
    CHECK(pviommu_map(NULL, 1, &bad_gfn, 1, PVIOMMU_F_READ, &bad_bfn, &bad_status) == -22, "NULL client");
    /* An open that fails says why, through the thread's last error. */
    CHECK(pviommu_open_remote("/nonexistent/pviommu.sock", 0) == NULL, "open nothing");
    CHECK(strstr(pviommu_last_error(NULL), "/nonexistent/pviommu.sock") != NULL, "open reason: %s",
          pviommu_last_error(NULL));
    /* The in-process simulator has no push: the wait only checks. */
    CHECK(pviommu_wait_revocations(c, 10) == 0, "nothing pending");
    CHECK(pviommu_wait_revocations(c, -1) == -22, "negative timeout");

    /* The guest balloons a mapped page out: the hypervisor revokes its BFN,
     * the DMA faults, and the mediator hears of it exactly once. */
    CHECK(pviommu_sim_balloon_out(c, 1, gfns[5]) == 0, "balloon out");
    uint64_t w5;
    CHECK(pviommu_sim_dma_read(c, bfns[5], &w5, sizeof(w5)) == -14, "DMA at a revoked BFN must fault");
    CHECK(pviommu_wait_revocations(c, 0) == 1, "pending after the balloon");
    struct pviommu_revocation revs[4];
    rc = pviommu_drain_revocations(c, revs, 4);
    CHECK(rc == 1, "drain: %d %s", rc, pviommu_last_error(c));
    CHECK(revs[0].bfn == bfns[5] && revs[0].gfn == gfns[5] && revs[0].domid == 1,
          "revocation: bfn %llx gfn %llu", (unsigned long long)revs[0].bfn,
          (unsigned long long)revs[0].gfn);
    CHECK(pviommu_drain_revocations(c, revs, 4) == 0, "drained");
    /* One context's notices only: a second balloon's notice is in context
     * 0, so a drain of context 1 (none such) leaves it queued. */
    CHECK(pviommu_sim_balloon_out(c, 1, gfns[6]) == 0, "balloon out again");
    CHECK(pviommu_drain_revocations_in(c, 1, revs, 4) == 0, "context 1 has none");
    CHECK(pviommu_drain_revocations_in(c, 0, NULL, 4) == -22, "NULL out");
    rc = pviommu_drain_revocations_in(c, 0, revs, 4);
    CHECK(rc == 1 && revs[0].bfn == bfns[6] && revs[0].context == 0, "drain of context 0: %d %s", rc,
          pviommu_last_error(c));
    CHECK(pviommu_drain_revocations(c, revs, 4) == 0, "drained again");
    CHECK(pviommu_set_limits(c, 77, 10) == -3, "set_limits on no domain: ESRCH");

    /* Unmap the rest (the two revoked ones are gone from the cache already). */
    for (int i = 5; i < N - 2; i++)
        bfns[i] = bfns[i + 2];
    rc = pviommu_unmap(c, bfns, N - 2, status);
    CHECK(rc == 0, "unmap %d", rc);
    uint64_t word;
    CHECK(pviommu_sim_dma_read(c, bfns[0], &word, sizeof(word)) == -14, "DMA after unmap must fault");
    pviommu_close(c);

    /* A 2 MiB extent (ABI 1.6): 512 pages at 512 BFNs from a multiple of
     * 512, each readable by the device; a page of it from the cache; one
     * unmap of it all. Bad input: an unaligned gfn, grant flags, NULL. */
    {
        pviommu_client *x = pviommu_open_sim(1024);
        uint64_t first = 0, one = 0, page[1] = { 512 + 77 };
        int32_t st[1];
        CHECK(x, "open_sim 1024");
        rc = pviommu_map_extent(x, 0, 1, 512, PVIOMMU_F_READ, &first);
        CHECK(rc == 0, "map extent: %d %s", rc, pviommu_last_error(x));
        CHECK(first % PVIOMMU_EXTENT_PAGES == 0, "extent at %llx", (unsigned long long)first);
        CHECK(pviommu_sim_dma_read(x, first + 77, &word, sizeof(word)) == 0, "dma extent");
        CHECK(word == (0x5049564f00000000ull | (512 + 77)), "extent bytes: %llx",
              (unsigned long long)word);
        CHECK(pviommu_map(x, 1, page, 1, PVIOMMU_F_READ, &one, st) == 0 && one == first + 77,
              "page of the extent from the cache");
        CHECK(pviommu_unmap(x, &one, 1, st) == 0, "its page's reference");
        CHECK(pviommu_map_extent(x, 0, 1, 513, PVIOMMU_F_READ, &first) == -22, "unaligned gfn");
        CHECK(pviommu_map_extent(x, 0, 1, 0, PVIOMMU_F_READ | PVIOMMU_F_GRANT, &one) == -22,
              "grant extent");
        CHECK(pviommu_map_extent(x, 0, 1, 0, PVIOMMU_F_READ, NULL) == -22, "NULL bfn");
        CHECK(pviommu_unmap_extent(x, 0, first + 8) == -22, "unaligned bfn");
        CHECK(pviommu_unmap_extent(x, 0, first) == 0, "unmap extent: %s", pviommu_last_error(x));
        CHECK(pviommu_sim_dma_read(x, first + 77, &word, sizeof(word)) == -14,
              "DMA after the extent's unmap must fault");
        pviommu_close(x);
    }
    /* Extents in batches: two extents and an unaligned gfn in one call
     * (the bad one refused alone), then both unmapped in one call; a NULL
     * array or too many refused. */
    {
        pviommu_client *x = pviommu_open_sim(2048);
        uint64_t gfns[3] = { 0, 513, 1024 }, firsts[3] = { 0 }, two[2];
        int32_t st[3];
        CHECK(x, "open_sim 2048");
        rc = pviommu_map_extents(x, 0, 1, gfns, 3, PVIOMMU_F_READ, firsts, st);
        CHECK(rc == -22 && st[0] == 0 && st[1] == -22 && st[2] == 0, "map extents: %d %d %d %d",
              rc, st[0], st[1], st[2]);
        CHECK(firsts[0] % 512 == 0 && firsts[2] % 512 == 0 && firsts[0] != firsts[2],
              "extents at %llx %llx", (unsigned long long)firsts[0],
              (unsigned long long)firsts[2]);
        CHECK(pviommu_sim_dma_read(x, firsts[2] + 5, &word, sizeof(word)) == 0
              && word == (0x5049564f00000000ull | (1024 + 5)), "second extent's bytes");
        CHECK(pviommu_map_extents(x, 0, 1, NULL, 1, PVIOMMU_F_READ, firsts, st) == -22,
              "NULL gfns");
        CHECK(pviommu_map_extents(x, 0, 1, gfns, (size_t)1 << 16, PVIOMMU_F_READ, firsts, st)
              == -22, "too many extents");
        two[0] = firsts[0]; two[1] = firsts[2];
        rc = pviommu_unmap_extents(x, 0, two, 2, st);
        CHECK(rc == 0 && st[0] == 0 && st[1] == 0, "unmap extents: %d %s", rc,
              pviommu_last_error(x));
        CHECK(pviommu_sim_dma_read(x, firsts[2] + 5, &word, sizeof(word)) == -14,
              "DMA after the extents' unmap must fault");
        pviommu_close(x);
    }
    printf("C mediator: mapped, read, looked up, heard of a revocation, unmapped %d pages: OK\n", N);
    return 0;
}
