/* A C mediator with two devices (ABI 1.3 through libpviommu_guest 1.1):
 * device B attached to a context of its own, one guest page mapped in
 * context 0 (for A) and in the new context (for B); each device reads it at
 * its own BFN only; the entry the IOMMU walks is read back; every refusal
 * of attach, detach and destroy comes back as its errno. */
#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include "pviommu.h"
#include "pviommu_guest.h"

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL: " __VA_ARGS__); fprintf(stderr, "\n"); return 1; } } while (0)

int main(void)
{
    const uint32_t A = PVIOMMU_SBDF(0, 0, 2, 0), B = PVIOMMU_SBDF(0, 0, 3, 0);
    const uint32_t NOBODY = PVIOMMU_SBDF(0, 0, 9, 0);
    pviommu_client *c = pviommu_open_sim(64);
    CHECK(c, "open_sim");

    uint32_t ctx = 0;
    CHECK(pviommu_context_create(c, &ctx) == 0 && ctx != 0, "create: %s", pviommu_last_error(c));
    CHECK(pviommu_context_create(c, NULL) == -EINVAL, "create NULL");
    CHECK(pviommu_context_attach(c, ctx, B) == 0, "attach B: %s", pviommu_last_error(c));

    /* Bad input, each its own errno, nothing changed. */
    CHECK(pviommu_context_attach(c, ctx, B) == -EBUSY, "double attach");
    CHECK(pviommu_context_attach(c, ctx, NOBODY) == -ENODEV, "unknown device");
    CHECK(strstr(pviommu_last_error(c), "0000:00:09.0") != NULL, "message: %s",
          pviommu_last_error(c));
    CHECK(pviommu_context_attach(c, 0, A) == -EINVAL, "context 0");
    CHECK(pviommu_context_attach(c, 7, A) == -ENOENT, "no such context");
    CHECK(pviommu_context_detach(c, ctx, A) == -ENOENT, "detach what is not attached");
    CHECK(pviommu_context_destroy(c, ctx) == -EBUSY, "destroy with B attached");

    /* Each context is an address space with BFNs of its own: A's page in
     * context 0, B's in ctx, and neither device ever reaches the other's
     * page, whatever numbers the two BFNs have. */
    uint64_t gfn = 5, gfn_b = 9, in0, in1;
    const uint64_t page_a = 0x5049564f00000000ull | 5, page_b = 0x5049564f00000000ull | 9;
    int32_t st;
    CHECK(pviommu_map(c, 1, &gfn, 1, PVIOMMU_F_READ | PVIOMMU_F_WRITE, &in0, &st) == 0, "map 0");
    CHECK(pviommu_map_in_context(c, ctx, 1, &gfn_b, 1, PVIOMMU_F_READ | PVIOMMU_F_WRITE, &in1, &st) == 0,
          "map ctx: %s", pviommu_last_error(c));
    uint64_t word = 0;
    CHECK(pviommu_sim_device_dma_read(c, A, in0, &word, 8) == 0 && word == page_a, "A reads at its BFN");
    CHECK(pviommu_sim_device_dma_read(c, B, in1, &word, 8) == 0 && word == page_b, "B reads at its BFN");
    word = 0;
    CHECK(pviommu_sim_device_dma_read(c, B, in0, &word, 8) != 0 || word != page_a,
          "B never reaches A's page");
    word = 0;
    CHECK(pviommu_sim_device_dma_read(c, A, in1, &word, 8) != 0 || word != page_b,
          "A never reaches B's page");
    CHECK(pviommu_sim_device_dma_read(c, B, in1 + 1, &word, 8) == -EFAULT, "B faults past its BFN");
    CHECK(pviommu_sim_device_dma_read(c, NOBODY, in0, &word, 8) == -EINVAL, "unknown device reads");

    uint32_t level = 0;
    uint64_t bits = 0;
    CHECK(pviommu_entry(c, 0, ctx, in1, &level, &bits) == 0, "entry: %s", pviommu_last_error(c));
    /* R, W, EMT = WB (6), SNP: write-back on an IOMMU with snoop control. */
    CHECK(level == 1 && bits == (0x3 | 6u << 3 | 1u << 11), "entry %u %#llx", level,
          (unsigned long long)bits);
    CHECK(pviommu_entry(c, 0, 0, in0, &level, &bits) == -EINVAL, "entry of context 0");
    CHECK(pviommu_entry(c, 0, ctx, in1 + 1, &level, &bits) == -ENOENT, "entry not mapped there");
    CHECK(pviommu_entry(c, 0, ctx, in1, NULL, &bits) == -EINVAL, "entry NULL");

    CHECK(pviommu_unmap_in_context(c, ctx, &in1, 1, &st) == 0, "unmap ctx");
    CHECK(pviommu_context_detach(c, ctx, B) == 0, "detach: %s", pviommu_last_error(c));
    /* Back in the default context: B now sees context 0's BFN. */
    CHECK(pviommu_sim_device_dma_read(c, B, in0, &word, 8) == 0, "B back in context 0");
    CHECK(pviommu_context_destroy(c, ctx) == 0, "destroy: %s", pviommu_last_error(c));
    CHECK(pviommu_context_destroy(c, ctx) == -ENOENT, "destroy twice");
    pviommu_close(c);
    printf("OK\n");
    return 0;
}
