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
 * What is expected on Arm (design/arm64-bringup.md): dom0's device
 * translation (context 0) is its own stage-2 p2m shared with Xen's SMMUv3,
 * so caps say SHARED_PT and a map into context 0 is refused with
 * EADDRNOTAVAIL. Contexts of the engine's own (patches-4.21/0009) are
 * unshared LPAE stage-2 tables the SMMUv3's STE of an attached device
 * points at: with the edu device (found in sysfs) attached to context 1,
 * dom0's own pages mapped there are what its DMA reaches, at their BFNs
 * only ("PVIOMMU-ARM64: MARK name" lines let the test script find the Xen
 * log lines (SMMU events) each step caused).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <inttypes.h>

/* privcmd hypercalls, locked buffers, check(), op1(): shared with
 * tests/xen-qemu-arm64/dom0-test.c */
#define DOM0_TAG "PVIOMMU-ARM64"
#include "dom0-privcmd.h"

/* ---- edu (QEMU's educational PCI device) ---- */
#define EDU_BUF 0x40000u
#define COUNT 2048u
static volatile uint8_t *bar;

static uint64_t rd64(unsigned off) { return *(volatile uint64_t *)(bar + off); }
static void wr64(unsigned off, uint64_t v) { *(volatile uint64_t *)(bar + off) = v; }

/* One edu DMA of len bytes; to_ram: edu buffer -> RAM. 0 when done. */
static int dma_n(uint64_t src, uint64_t dst, int to_ram, unsigned int len)
{
    wr64(0x80, src); wr64(0x88, dst); wr64(0x90, len);
    wr64(0x98, 1 | (to_ram ? 2 : 0));
    for ( int i = 0; i < 500; i++ )           /* each DMA: ~100 ms virtual */
    {
        if ( !(rd64(0x98) & 1) )
            return 0;
        usleep(10000);
    }
    return -1;
}

static int dma(uint64_t src, uint64_t dst, int to_ram)
{
    return dma_n(src, dst, to_ram, COUNT);
}

/*
 * Where a fault is expected: FAULT_LEN bytes only. The SMMU reports one
 * event per access edu makes (4 bytes), and Xen prints each: 512 records
 * for a 2048-byte DMA would flood the serial log.
 */
#define FAULT_LEN 64u

/* A faulted read leaves zeros in edu's buffer, which the next DMA wrote to
 * p: FAULT_LEN zero bytes, then the fill (fill) untouched. */
static int faulted(const uint8_t *p, uint8_t fill)
{
    for ( unsigned int i = 0; i < PAGE; i++ )
        if ( p[i] != (i < FAULT_LEN ? 0 : fill) )
            return 0;
    return 1;
}

/* The edu device's sysfs name and SBDF; bus mastering on, BAR 0 mapped. */
static int edu_open(char *name, size_t n, uint64_t *sbdf)
{
    char path[600];
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *de;
    unsigned int seg, bus, dev, fn;
    uint16_t cmd = 0;
    int fd;

    name[0] = 0;
    while ( d && (de = readdir(d)) )
    {
        unsigned int v = 0, id = 0;
        FILE *f;

        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", de->d_name);
        if ( !(f = fopen(path, "r")) )
            continue;
        if ( fscanf(f, "%x", &v) != 1 )
            v = 0;
        fclose(f);
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", de->d_name);
        if ( !(f = fopen(path, "r")) )
            continue;
        if ( fscanf(f, "%x", &id) != 1 )
            id = 0;
        fclose(f);
        if ( v == 0x1234 && id == 0x11e8 )
            snprintf(name, n, "%s", de->d_name);
    }
    if ( d )
        closedir(d);
    if ( !name[0] || sscanf(name, "%x:%x:%x.%x", &seg, &bus, &dev, &fn) != 4 )
        return -1;
    *sbdf = PVIOMMU_SBDF(seg, bus, dev, fn);

    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", name);
    fd = open(path, O_RDWR);
    if ( fd < 0 || pread(fd, &cmd, 2, 4) != 2 )
        return -1;
    cmd |= 0x6;                                   /* memory space, bus master */
    if ( pwrite(fd, &cmd, 2, 4) != 2 )
        return -1;
    close(fd);
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", name);
    fd = open(path, O_RDWR | O_SYNC);
    if ( fd < 0 )
        return -1;
    bar = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return bar == MAP_FAILED ? -1 : 0;
}

static void mark(const char *name)
{
    printf("PVIOMMU-ARM64: MARK %s\n", name);
    fflush(stdout);
}

static int pattern_ok(const uint8_t *p)
{
    for ( unsigned int i = 0; i < COUNT; i++ )
        if ( p[i] != (uint8_t)(i * 7 + 0x5a) )
            return 0;
    return 1;
}

static const char *what(const uint8_t *p)
{
    unsigned int i;

    if ( pattern_ok(p) )
        return "A's bytes";
    for ( i = 0; i < COUNT && !p[i]; i++ )
        ;
    if ( i == COUNT )
        return "all zero";
    for ( i = 0; i < COUNT && p[i] == p[0]; i++ )
        ;
    return i == COUNT ? "unchanged fill" : "other bytes";
}

/*
 * Context 1 on the SMMUv3: edu attached, dom0's own pages mapped there.
 * A: known bytes, mapped read-only; B: mapped read-write (DMA target); C:
 * mapped read-only, the device's write must be refused.
 */
static void contexts(void)
{
    struct pv_iommu_entry *en = locked_buf(PAGE);
    uint8_t *pg = locked_buf(3 * PAGE), *a = pg, *b = pg + PAGE, *cc = pg + 2 * PAGE;
    uint64_t sbdf = 0, fa, fb, fc, bfn_a = 0, bfn_b = 0, bfn_c = 0;
    char name[256];
    uint32_t ctx = 0;
    int st, ok;
    long rc;

    if ( edu_open(name, sizeof(name), &sbdf) )
    {
        check(0, "edu-found", "no edu device (1234:11e8) usable in sysfs");
        return;
    }
    for ( unsigned int i = 0; i < PAGE; i++ )
        a[i] = (uint8_t)(i * 7 + 0x5a);
    fa = frame_of(a); fb = frame_of(b); fc = frame_of(cc);
    printf("PVIOMMU-ARM64: edu %s sbdf %#" PRIx64 "; pages A %#" PRIx64 " B %#" PRIx64
           " C %#" PRIx64 " (dom0 frames = bus frames in context 0)\n", name, sbdf, fa, fb, fc);
    if ( !fa || !fb || !fc )
    {
        check(0, "pagemap", "no frame for the test pages");
        return;
    }

    /* context 0 first: dom0's p2m, the device reaches the pages 1:1 */
    memset(b, 0, PAGE);
    ok = !dma(fa << 12, EDU_BUF, 0) && !dma(EDU_BUF, fb << 12, 1);
    check(ok && pattern_ok(b), "ctx0-dma-1to1",
          "A -> edu -> B at dom0's own addresses before any context: B has %s", what(b));

    mark("ctx-create");
    st = op1(PVIOMMU_OP_context_create, 0, 0, 0, 0, 0);
    ctx = gop->context;
    check(st == 0 && ctx != 0, "ctx-create", "status=%d context=%u", st, ctx);
    if ( st )
        return;

    mark("ctx-attach");
    st = op1(PVIOMMU_OP_context_attach, ctx, 0, 0, sbdf, 0);
    check(st == 0, "ctx-attach", "status=%d edu %s -> context %u", st, name, ctx);
    st = op1(PVIOMMU_OP_context_attach, ctx, 0, 0, sbdf, 0);
    check(st == -EBUSY, "ctx-attach-twice", "status=%d (want %d)", st, -EBUSY);

    st = op1(PVIOMMU_OP_map, ctx, PVIOMMU_F_READ, 0, fa, 0);
    bfn_a = gop->bfn;
    check(st == 0, "ctx-map-own-ro", "status=%d A gfn %#" PRIx64 " -> bfn %#" PRIx64, st, fa, bfn_a);
    st = op1(PVIOMMU_OP_map, ctx, PVIOMMU_F_READ | PVIOMMU_F_WRITE, 0, fb, 0);
    bfn_b = gop->bfn;
    check(st == 0, "ctx-map-own-rw", "status=%d B gfn %#" PRIx64 " -> bfn %#" PRIx64, st, fb, bfn_b);
    st = op1(PVIOMMU_OP_map, ctx, PVIOMMU_F_READ, 0, fc, 0);
    bfn_c = gop->bfn;
    check(st == 0, "ctx-map-own-ro-c", "status=%d C gfn %#" PRIx64 " -> bfn %#" PRIx64, st, fc, bfn_c);
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, 0, fa, 0);
    check(st == -EADDRNOTAVAIL, "ctx0-map-still-refused", "status=%d (want %d)", st, -EADDRNOTAVAIL);

    /* for the test script: which SMMU event addresses belong to which step */
    printf("PVIOMMU-ARM64: PAGES fa=%#" PRIx64 " fb=%#" PRIx64 " bfn_a=%#" PRIx64
           " bfn_b=%#" PRIx64 " bfn_c=%#" PRIx64 "\n", fa, fb, bfn_a, bfn_b, bfn_c);

    /* the engine's LPAE leaves, read back (address bits zeroed) */
    memset(en, 0, sizeof(*en));
    en->version = PVIOMMU_INTERFACE_VERSION;
    en->domid = 0;
    en->context = ctx;
    en->bfn = bfn_b;
    rc = hcall(PVIOMMU_CMD_entry, (uint64_t)(uintptr_t)en);
    /* valid|page 0x3, MemAttr Normal WB 0xf<<2, S2AP RW 0xc0, SH inner 0x300, AF 0x400 */
    check(rc == 0 && en->format == PVIOMMU_ENTRY_ARM_LPAE_STAGE2 && en->level == 1 &&
          en->bits == 0x7ff, "ctx-entry-rw",
          "rc=%ld format=%u level=%u bits=%#" PRIx64 " (want 0x7ff: page, Normal WB, S2AP RW, inner shareable, AF)",
          rc, en->format, en->level, (uint64_t)en->bits);
    memset(en, 0, sizeof(*en));
    en->version = PVIOMMU_INTERFACE_VERSION;
    en->context = ctx;
    en->bfn = bfn_a;
    rc = hcall(PVIOMMU_CMD_entry, (uint64_t)(uintptr_t)en);
    check(rc == 0 && en->bits == 0x77f, "ctx-entry-ro",
          "rc=%ld bits=%#" PRIx64 " (want 0x77f: S2AP R only)", rc, (uint64_t)en->bits);

    /* edu reads A at its BFN and writes B at its BFN, through the engine's tables */
    mark("ctx-dma");
    memset(b, 0, PAGE);
    ok = !dma(bfn_a << 12, EDU_BUF, 0) && !dma(EDU_BUF, bfn_b << 12, 1);
    check(ok && pattern_ok(b), "ctx-dma-read-write-at-bfn",
          "A at bfn %#" PRIx64 " -> edu -> B at bfn %#" PRIx64 ": B has %s (%u bytes)",
          bfn_a, bfn_b, what(b), COUNT);

    /* dom0's own address of A is not mapped in the context */
    mark("ctx-dma-dom0-address");
    memset(b, 0xee, PAGE);
    ok = !dma_n(fa << 12, EDU_BUF, 0, FAULT_LEN) && !dma_n(EDU_BUF, bfn_b << 12, 1, FAULT_LEN);
    check(ok && faulted(b, 0xee), "ctx-isolates-dom0-address",
          "read of A's dom0 address %#" PRIx64 " in the context (%u bytes): B has %s",
          fa << 12, FAULT_LEN, faulted(b, 0xee) ? "zeros (the read faulted)" : what(b));

    /* a read-only mapping refuses the device's write */
    mark("ctx-dma-write-ro");
    memset(cc, 0x33, PAGE);
    ok = !dma(bfn_a << 12, EDU_BUF, 0) && !dma_n(EDU_BUF, bfn_c << 12, 1, FAULT_LEN);
    check(ok && cc[0] == 0x33 && !strcmp(what(cc), "unchanged fill"), "ctx-ro-refuses-write",
          "edu -> C at bfn %#" PRIx64 " (read-only): C has %s", bfn_c, what(cc));
    mark("ctx-dma-write-ro-done");

    st = op1(PVIOMMU_OP_context_destroy, ctx, 0, 0, 0, 0);
    check(st == -EBUSY, "ctx-destroy-busy", "status=%d (want %d: mappings and a device)", st, -EBUSY);

    /* unmap: the device faults at the old BFN */
    st = op1(PVIOMMU_OP_unmap, ctx, 0, 0, 0, bfn_a);
    check(st == 0, "ctx-unmap", "status=%d bfn %#" PRIx64, st, bfn_a);
    mark("ctx-dma-after-unmap");
    memset(b, 0xee, PAGE);
    ok = !dma_n(bfn_a << 12, EDU_BUF, 0, FAULT_LEN) && !dma_n(EDU_BUF, bfn_b << 12, 1, FAULT_LEN);
    check(ok && faulted(b, 0xee), "ctx-unmap-faults",
          "read at unmapped bfn %#" PRIx64 " (%u bytes): B has %s", bfn_a, FAULT_LEN,
          faulted(b, 0xee) ? "zeros (the read faulted)" : what(b));
    mark("ctx-dma-after-unmap-done");
    st = op1(PVIOMMU_OP_unmap, ctx, 0, 0, 0, bfn_b);
    st = st ?: op1(PVIOMMU_OP_unmap, ctx, 0, 0, 0, bfn_c);
    check(st == 0, "ctx-unmap-rest", "status=%d", st);

    /* detach: back on dom0's p2m, the 1:1 addresses work again */
    mark("ctx-detach");
    st = op1(PVIOMMU_OP_context_detach, ctx, 0, 0, sbdf, 0);
    check(st == 0, "ctx-detach", "status=%d", st);
    memset(b, 0, PAGE);
    ok = !dma(fa << 12, EDU_BUF, 0) && !dma(EDU_BUF, fb << 12, 1);
    check(ok && pattern_ok(b), "ctx-detach-restores-dom0-p2m",
          "A -> edu -> B at dom0's own addresses: B has %s", what(b));

    mark("ctx-destroy");
    st = op1(PVIOMMU_OP_context_destroy, ctx, 0, 0, 0, 0);
    check(st == 0, "ctx-destroy", "status=%d", st);
    st = op1(PVIOMMU_OP_context_destroy, ctx, 0, 0, 0, 0);
    check(st == -ENOENT, "ctx-destroy-again", "status=%d (want %d)", st, -ENOENT);
    mark("ctx-end");
    sleep(3); /* Xen prints SMMU events from a tasklet: let it catch up */
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

    /* 1. query_caps answered by the engine: the header's version, a translation code */
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
    check(rc == 0 && (c->features & PVIOMMU_FEAT_CONTEXTS) &&
          (c->features & PVIOMMU_FEAT_DEVICE_ATTACH) && c->max_contexts > 1,
          "caps-contexts", "features=%#x max_contexts=%u (SMMUv3 stage-2 contexts of the engine's)",
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

    /* 8. contexts of the engine's own on the SMMUv3 */
    gb = b;
    gop = op;
    contexts();

    /* 9. nothing left behind */
    st->version = PVIOMMU_INTERFACE_VERSION;
    st->domid = 0;
    st->flags = 0;
    rc = hcall(PVIOMMU_CMD_stats, (uint64_t)(uintptr_t)st);
    check(rc == 0 && st->live == 0, "stats-after-contexts",
          "rc=%ld live=%" PRIu64 " maps=%" PRIu64 " unmaps=%" PRIu64 " flushes=%" PRIu64,
          rc, st->live, st->maps, st->unmaps, st->flushes);

    printf("PVIOMMU-ARM64: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
