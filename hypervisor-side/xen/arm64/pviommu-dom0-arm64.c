/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * pviommu-dom0-arm64.c -- hypercall 43 from an arm64 dom0, through
 * /dev/xen/privcmd's raw IOCTL_PRIVCMD_HYPERCALL (no libxc): a static
 * program for the test initramfs (test-arm64.sh).
 *
 *   pviommu-dom0-arm64 [RAM_END_PFN]
 *
 * RAM_END_PFN: the host's RAM end as a frame number (QEMU virt, -m 2G:
 * 0xc0000); the BFN window must start at or above it. Prints one
 * "PVIOMMU-ARM64: PASS|FAIL name detail" line per check and
 * "PVIOMMU-ARM64: N passed, N failed". Exit status 0 iff none failed.
 *
 * What is expected on Arm today (design/arm64-bringup.md): dom0's device
 * translation is its own stage-2 p2m shared with Xen's SMMUv3, so caps say
 * SHARED_PT and a map into context 0 is refused with EADDRNOTAVAIL; no
 * contexts of the engine's own (features without CONTEXTS).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pviommu.h"

typedef struct { uint64_t op; uint64_t arg[5]; } privcmd_hypercall_t;
#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(privcmd_hypercall_t))
#define PAGE 4096

static int pfd = -1, passed, failed;

static void check(int ok, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#include <stdarg.h>
static void check(int ok, const char *name, const char *fmt, ...)
{
    va_list ap;

    printf("PVIOMMU-ARM64: %s %s ", ok ? "PASS" : "FAIL", name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    ok ? passed++ : failed++;
}

static long hcall(unsigned int cmd, uint64_t arg)
{
    privcmd_hypercall_t h = { __HYPERVISOR_pv_iommu_op, { cmd, arg } };
    long r = ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h);

    return r < 0 ? -errno : r;
}

/* Locked, populated, zeroed: the hypervisor's copy never faults on it. */
static void *locked_buf(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);

    if ( p == MAP_FAILED )
    {
        perror("mmap");
        exit(2);
    }
    memset(p, 0, n);
    return p;
}

int main(int argc, char **argv)
{
    uint64_t ram_end = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
    struct pv_iommu_caps *c = locked_buf(PAGE);
    struct pv_iommu_regions *rq = locked_buf(PAGE);
    struct pv_iommu_region *rg = locked_buf(PAGE);
    struct pv_iommu_batch *b = locked_buf(PAGE);
    struct pv_iommu_op *op = locked_buf(PAGE);
    struct pv_iommu_stats *st = locked_buf(PAGE);
    uint64_t *probe = locked_buf(PAGE), ent = 0;
    long rc;
    unsigned int i;
    int pm;

    pfd = open("/dev/xen/privcmd", O_RDWR);
    if ( pfd < 0 )
    {
        perror("open /dev/xen/privcmd");
        printf("PVIOMMU-ARM64: FAIL privcmd open: %s\nPVIOMMU-ARM64: 0 passed, 1 failed\n",
               strerror(errno));
        return 1;
    }

    /* 1. query_caps answered by the engine: version 1.3, a translation code */
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)c);
    printf("PVIOMMU-ARM64: caps rc=%ld version=0x%08x max_batch_ops=%u page_sizes=%#" PRIx64
           " window=[%#" PRIx64 ",%#" PRIx64 ") nr_reserved=%u features=%#x max_contexts=%u"
           " translation=%u quota=%" PRIu64 " used=%" PRIu64 "\n",
           rc, c->version, c->max_batch_ops, c->page_sizes, c->bfn_window_start,
           c->bfn_window_end, c->nr_reserved_regions, c->features, c->max_contexts,
           c->translation, c->quota, c->used);
    check(rc == 0 && c->version == PVIOMMU_INTERFACE_VERSION, "caps-version",
          "rc=%ld version=0x%08x (want 0x%08x)", rc, c->version, PVIOMMU_INTERFACE_VERSION);
    check(rc == 0 && c->translation == PVIOMMU_SHARED_PT, "caps-translation-shared-pt",
          "translation=%u (want %u: Xen's SMMUv3 walks dom0's own p2m)",
          c->translation, PVIOMMU_SHARED_PT);
    check(rc == 0 && c->bfn_window_end > c->bfn_window_start &&
          c->bfn_window_start >= ram_end && (c->page_sizes & PAGE),
          "caps-window", "window=[%#" PRIx64 ",%#" PRIx64 ") ram_end=%#" PRIx64 " page_sizes=%#" PRIx64,
          c->bfn_window_start, c->bfn_window_end, ram_end, c->page_sizes);
    check(rc == 0 && !(c->features & (PVIOMMU_FEAT_CONTEXTS | PVIOMMU_FEAT_DEVICE_ATTACH)),
          "caps-no-contexts", "features=%#x max_contexts=%u (no SMMUv3 contexts yet)",
          c->features, c->max_contexts);

    /* 2. reserved regions: as many as caps says, printed */
    rq->version = PVIOMMU_INTERFACE_VERSION;
    rq->start = 0;
    rq->nr = PAGE / sizeof(*rg);
    rq->regions = (uint64_t)(uintptr_t)rg;
    rc = hcall(PVIOMMU_CMD_reserved_regions, (uint64_t)(uintptr_t)rq);
    for ( i = 0; rc == 0 && i < rq->nr; i++ )
        printf("PVIOMMU-ARM64: region %u bfn [%#" PRIx64 ",%#" PRIx64 ") kind %u\n",
               i, rg[i].start_bfn, rg[i].start_bfn + rg[i].nr_frames, rg[i].kind);
    check(rc == 0 && rq->total == c->nr_reserved_regions && rq->nr == rq->total,
          "reserved-regions", "rc=%ld nr=%u total=%u caps=%u", rc, rq->nr, rq->total,
          c->nr_reserved_regions);

    /* 3. an unknown command */
    rc = hcall(99, (uint64_t)(uintptr_t)c);
    check(rc == -EOPNOTSUPP, "unknown-cmd", "rc=%ld (want %d)", rc, -EOPNOTSUPP);

    /* 4. a map into context 0 (dom0's own page, dom0 is 1:1 so its frame is
     *    the gfn): refused, the context does not translate BFNs */
    pm = open("/proc/self/pagemap", O_RDONLY);
    probe[0] = 0x5a5a5a5a;
    if ( pm >= 0 &&
         pread(pm, &ent, sizeof(ent), (off_t)((uintptr_t)probe / PAGE) * 8) != sizeof(ent) )
        ent = 0;
    b->version = PVIOMMU_INTERFACE_VERSION;
    b->nr_ops = 1;
    b->ops = (uint64_t)(uintptr_t)op;
    op->subop = PVIOMMU_OP_map;
    op->flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE;
    op->domid = 0;
    op->gfn = ent & ((1ULL << 55) - 1);
    op->status = 1;
    rc = hcall(PVIOMMU_CMD_batch, (uint64_t)(uintptr_t)b);
    check(rc == 0 && b->nr_done == 1 && op->status == -EADDRNOTAVAIL, "map-ctx0-refused",
          "rc=%ld nr_done=%u status=%d (want %d) gfn=%#" PRIx64, rc, b->nr_done, op->status,
          -EADDRNOTAVAIL, (uint64_t)op->gfn);

    /* 5. a malformed batch: another major version (only the major counts) */
    b->version = 0x00020000;
    b->nr_done = 0;
    rc = hcall(PVIOMMU_CMD_batch, (uint64_t)(uintptr_t)b);
    check(rc == -EINVAL, "batch-bad-version", "rc=%ld (want %d)", rc, -EINVAL);

    /* 6. a buffer the hypervisor cannot write */
    rc = hcall(PVIOMMU_CMD_query_caps, 0x10);
    check(rc == -EFAULT, "caps-bad-buffer", "rc=%ld (want %d)", rc, -EFAULT);

    /* 7. stats of dom0 */
    st->version = PVIOMMU_INTERFACE_VERSION;
    st->domid = 0;
    rc = hcall(PVIOMMU_CMD_stats, (uint64_t)(uintptr_t)st);
    check(rc == 0 && st->live == 0 && st->maps == 0, "stats",
          "rc=%ld live=%" PRIu64 " maps=%" PRIu64 " batches=%" PRIu64 " heap_bytes=%" PRIu64,
          rc, st->live, st->maps, st->batches, st->heap_bytes);

    printf("PVIOMMU-ARM64: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
