/* SPDX-License-Identifier: MIT */
/*
 * dom0-harness.c -- static dom0 test tool for the PV-IOMMU QEMU test.
 *
 *   caps                        query caps; exit 0 iff version 1.0 and window above RAM
 *   mkdom N                     paused PV domain with N pages, page i filled with pat(i)
 *   peek DOMID GFN              first bytes + checksum of a foreign page
 *   match DOMID GFN             like peek, and also compares with the page's pattern
 *   dma-read BUS                edu DMA 2048 bytes at BUS -> edu -> dom0 page; print them
 *   dma-write BUS BYTE          edu DMA 2048 bytes of BYTE to BUS
 *   destroy DOMID               destroy, wait, print gone|zombie
 *   unpopulate DOMID GFN        remove one gfn from a domain (guest_remove_page path)
 *   hc caps | hc cmd N | hc map DOMID GFN FLAGS | hc unmap BFN | hc lookup BFN
 *   hc raw SUBOP FLAGS DOMID GFN BFN PAD RSVD [CONTEXT]
 *   measure N                   BFNs for N foreign pages: PV-IOMMU batches vs privcmd
 *
 * Hypercall results print as "rc=<ret> status=<op status>" (rc is the
 * hypercall's return: negative errno, 0, or 1 = batch incomplete).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include "pviommu.h"

#define PAGE 4096
#define DMA_LEN 2048
#define EDU_BUF 0x40000

static xc_interface *xch;
static xenforeignmemory_handle *fmem;

static void die(const char *m) { perror(m); exit(2); }

static void open_xc(void)
{
    if ( !xch && !(xch = xc_interface_open(NULL, NULL, 0)) ) die("xc_interface_open");
    if ( !fmem && !(fmem = xenforeignmemory_open(NULL, 0)) ) die("xenforeignmemory_open");
}

static uint8_t pat(uint64_t page, unsigned int off)
{
    return (uint8_t)(0x5a + page * 0x11 + off * 3 + (off >> 8));
}

static uint32_t fnv(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    while ( n-- ) { h ^= *p++; h *= 16777619u; }
    return h;
}

static void show(const char *tag, const uint8_t *p)
{
    int i, zero = 1;
    for ( i = 0; i < DMA_LEN; i++ ) if ( p[i] ) zero = 0;
    printf("%s bytes=", tag);
    for ( i = 0; i < 16; i++ ) printf("%02x", p[i]);
    printf(" sum=%08x zero=%d\n", fnv(p, DMA_LEN), zero);
}

/* ---------------- hypercalls through privcmd ---------------- */
typedef struct { uint64_t op; uint64_t arg[5]; } privcmd_hypercall_t;
#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(privcmd_hypercall_t))
static int pfd = -1;
static long nr_hypercalls;

static void *locked_buf(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);
    if ( p == MAP_FAILED ) die("mmap locked");
    memset(p, 0, n);
    return p;
}

static long hcall(unsigned int cmd, void *arg)
{
    privcmd_hypercall_t h = { __HYPERVISOR_pv_iommu_op, { cmd, (uint64_t)(uintptr_t)arg } };
    long r;
    if ( pfd < 0 && (pfd = open("/dev/xen/privcmd", O_RDWR)) < 0 ) die("open privcmd");
    nr_hypercalls++;
    r = ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h);
    return r < 0 ? -errno : r;
}

static struct pv_iommu_batch *bat;
static struct pv_iommu_op *ops;
#define OPS_CAP 4096
static unsigned int max_ops = 512;

/* Run a batch of n ops already in ops[] to completion (re-issuing on 1). */
static long run_batch(unsigned int n, long *calls)
{
    long rc;
    if ( !bat ) { bat = locked_buf(PAGE); ops = locked_buf(OPS_CAP * sizeof(*ops)); }
    bat->version = PVIOMMU_INTERFACE_VERSION;
    bat->nr_ops = n; bat->nr_done = 0; bat->flags = 0;
    bat->ops = (uint64_t)(uintptr_t)ops;
    do { rc = hcall(PVIOMMU_CMD_batch, bat); if ( calls ) (*calls)++; }
    while ( rc == PVIOMMU_BATCH_INCOMPLETE );
    return rc;
}

static long one_op(struct pv_iommu_op *o)
{
    long rc;
    if ( !bat ) { bat = locked_buf(PAGE); ops = locked_buf(OPS_CAP * sizeof(*ops)); }
    ops[0] = *o;
    rc = run_batch(1, NULL);
    *o = ops[0];
    return rc;
}

static int query_caps(struct pv_iommu_caps *out)
{
    struct pv_iommu_caps *c = locked_buf(PAGE);
    long rc = hcall(PVIOMMU_CMD_query_caps, c);
    *out = *c;
    munmap(c, PAGE);
    return rc;
}

static int cmd_hc(int argc, char **argv)
{
    struct pv_iommu_op o;
    long rc;
    memset(&o, 0, sizeof(o));
    if ( argc < 1 ) return 2;
    if ( !strcmp(argv[0], "caps") )
    {
        struct pv_iommu_caps c;
        rc = query_caps(&c);
        printf("rc=%ld version=0x%08x max_batch_ops=%u page_sizes=0x%" PRIx64
               " window_start=0x%" PRIx64 " window_end=0x%" PRIx64
               " nr_reserved=%u features=0x%x max_contexts=%u quota=%" PRIu64
               " used=%" PRIu64 "\n", rc, c.version, c.max_batch_ops, c.page_sizes,
               c.bfn_window_start, c.bfn_window_end, c.nr_reserved_regions,
               c.features, c.max_contexts, c.quota, c.used);
        return rc ? 1 : 0;
    }
    if ( !strcmp(argv[0], "version") )
    {
        /* xen_version(XENVER_version): tells a Linux-side EPERM from Xen's */
        privcmd_hypercall_t h = { 17, { 0, 0 } };
        long r;
        if ( pfd < 0 && (pfd = open("/dev/xen/privcmd", O_RDWR)) < 0 ) die("open privcmd");
        r = ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h);
        printf("rc=%ld\n", r < 0 ? -errno : r);
        return 0;
    }
    if ( !strcmp(argv[0], "cmd") && argc >= 2 )
    {
        void *b = locked_buf(PAGE);
        rc = hcall(strtoul(argv[1], NULL, 0), b);
        printf("rc=%ld\n", rc);
        return 0;
    }
    if ( !strcmp(argv[0], "regions") )
    {
        struct pv_iommu_regions *r = locked_buf(PAGE);
        struct pv_iommu_region *e = locked_buf(PAGE);
        unsigned int i;
        r->version = PVIOMMU_INTERFACE_VERSION; r->start = 0; r->nr = 64;
        r->regions = (uint64_t)(uintptr_t)e;
        rc = hcall(PVIOMMU_CMD_reserved_regions, r);
        printf("rc=%ld nr=%u total=%u\n", rc, r->nr, r->total);
        for ( i = 0; rc == 0 && i < r->nr && i < 64; i++ )
            printf("region start=0x%" PRIx64 " nr=0x%" PRIx64 " kind=%u\n",
                   e[i].start_bfn, e[i].nr_frames, e[i].kind);
        return 0;
    }
    if ( !strcmp(argv[0], "map") && argc >= 4 )
    {
        o.subop = PVIOMMU_OP_map; o.domid = strtoul(argv[1], NULL, 0);
        o.gfn = strtoull(argv[2], NULL, 0); o.flags = strtoul(argv[3], NULL, 0);
    }
    else if ( (!strcmp(argv[0], "unmap") || !strcmp(argv[0], "lookup")) && argc >= 2 )
    {
        o.subop = argv[0][0] == 'u' ? PVIOMMU_OP_unmap : PVIOMMU_OP_lookup;
        o.bfn = strtoull(argv[1], NULL, 0);
    }
    else if ( !strcmp(argv[0], "raw") && argc >= 8 )
    {
        o.subop = strtoul(argv[1], NULL, 0); o.flags = strtoul(argv[2], NULL, 0);
        o.domid = strtoul(argv[3], NULL, 0); o.gfn = strtoull(argv[4], NULL, 0);
        o.bfn = strtoull(argv[5], NULL, 0); o._pad0 = strtoul(argv[6], NULL, 0);
        o._rsvd = strtoull(argv[7], NULL, 0);
        if ( argc >= 9 ) o.context = strtoul(argv[8], NULL, 0);
    }
    else
        return 2;
    rc = one_op(&o);
    printf("rc=%ld status=%d bfn=0x%" PRIx64 " domid=%u gfn=0x%" PRIx64 " flags=0x%x\n",
           rc, o.status, o.bfn, o.domid, o.gfn, o.flags);
    return 0;
}

/* ---------------- domains ---------------- */
static uint32_t make_domain(unsigned long n, xen_pfn_t *frames)
{
    struct xen_domctl_createdomain cfg;
    uint32_t domid = 0;
    unsigned long i;

    memset(&cfg, 0, sizeof(cfg));
    cfg.max_vcpus = 1; cfg.max_evtchn_port = 1023;
    cfg.max_grant_frames = -1; cfg.max_maptrack_frames = -1;
    cfg.grant_opts = XEN_DOMCTL_GRANT_version(1);
    if ( xc_domain_create(xch, &domid, &cfg) ) die("xc_domain_create");
    if ( xc_domain_setmaxmem(xch, domid, (n + 64) * 4) ) die("setmaxmem");
    for ( i = 0; i < n; i++ ) frames[i] = i;
    if ( xc_domain_populate_physmap_exact(xch, domid, n, 0, 0, frames) ) die("populate");
    return domid;
}

static void fill_domain(uint32_t domid, unsigned long n, xen_pfn_t *frames)
{
    int *errs = calloc(n, sizeof(int));
    uint8_t *m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, n, frames, errs);
    unsigned long i; unsigned int o;
    if ( !m ) die("xenforeignmemory_map");
    for ( i = 0; i < n; i++ )
        for ( o = 0; o < PAGE; o++ ) m[i * PAGE + o] = pat(frames[i], o);
    xenforeignmemory_unmap(fmem, m, n);
    free(errs);
}

static int cmd_mkdom(unsigned long n)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint32_t domid = make_domain(n, frames);
    unsigned long i;
    fill_domain(domid, n, frames);
    printf("domid=%u\ngfns=", domid);
    for ( i = 0; i < n; i++ ) printf("%s0x%lx", i ? "," : "", (unsigned long)frames[i]);
    printf("\n");
    return 0;
}

static int cmd_peek(uint32_t domid, xen_pfn_t gfn, int compare)
{
    int err = 0, ok = 1;
    unsigned int o;
    uint8_t *m = xenforeignmemory_map(fmem, domid, PROT_READ, 1, &gfn, &err);
    if ( !m || err ) { printf("peek error map=%p err=%d errno=%d\n", (void *)m, err, errno); return 1; }
    show("peek", m);
    if ( compare )
    {
        for ( o = 0; o < PAGE; o++ ) if ( m[o] != pat(gfn, o) ) ok = 0;
        printf("pattern=%s\n", ok ? "intact" : "changed");
    }
    xenforeignmemory_unmap(fmem, m, 1);
    return 0;
}

static int cmd_destroy(uint32_t domid)
{
    xc_domaininfo_t info;
    int i, n = 0;
    if ( xc_domain_destroy(xch, domid) ) die("xc_domain_destroy");
    for ( i = 0; i < 100; i++ )
    {
        n = xc_domain_getinfolist(xch, domid, 1, &info);
        if ( n < 1 || info.domain != domid ) { printf("destroy domid=%u gone\n", domid); return 0; }
        usleep(20000);
    }
    printf("destroy domid=%u zombie dying=%d tot_pages=%" PRIu64 "\n", domid,
           !!(info.flags & XEN_DOMINF_dying), (uint64_t)info.tot_pages);
    return 1;
}

/* ---------------- edu DMA ---------------- */
static volatile uint8_t *edu;

static void edu_open(void)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    char p[512], b[64];
    if ( !d ) die("opendir pci");
    while ( (e = readdir(d)) )
    {
        FILE *f;
        unsigned v = 0, dv = 0;
        if ( e->d_name[0] == '.' ) continue;
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if ( !(f = fopen(p, "r")) ) continue;
        if ( fgets(b, sizeof b, f) ) v = strtoul(b, NULL, 0);
        fclose(f);
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/device", e->d_name);
        if ( !(f = fopen(p, "r")) ) continue;
        if ( fgets(b, sizeof b, f) ) dv = strtoul(b, NULL, 0);
        fclose(f);
        if ( v == 0x1234 && dv == 0x11e8 )
        {
            int fd; uint16_t cmd;
            snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/config", e->d_name);
            if ( (fd = open(p, O_RDWR)) < 0 ) die("open config");
            if ( pread(fd, &cmd, 2, 4) != 2 ) die("read cmd");
            cmd |= 0x6;  /* memory space + bus master */
            if ( pwrite(fd, &cmd, 2, 4) != 2 ) die("write cmd");
            close(fd);
            snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/resource0", e->d_name);
            if ( (fd = open(p, O_RDWR | O_SYNC)) < 0 ) die("open resource0");
            edu = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if ( edu == MAP_FAILED ) die("mmap resource0");
            closedir(d);
            if ( *(volatile uint32_t *)edu != 0x010000ed ) { fprintf(stderr, "edu ident?\n"); exit(2); }
            return;
        }
    }
    fprintf(stderr, "edu device not found\n");
    exit(2);
}

static void edu_dma(uint64_t src, uint64_t dst, int to_ram)
{
    int i;
    *(volatile uint64_t *)(edu + 0x80) = src;
    *(volatile uint64_t *)(edu + 0x88) = dst;
    *(volatile uint64_t *)(edu + 0x90) = DMA_LEN;
    *(volatile uint64_t *)(edu + 0x98) = 1 | (to_ram ? 2 : 0);
    for ( i = 0; i < 2000; i++ )
    {
        if ( !(*(volatile uint64_t *)(edu + 0x98) & 1) ) return;
        usleep(5000);
    }
    fprintf(stderr, "edu DMA timeout\n");
    exit(2);
}

/* A dom0 page with a known bus address (== MFN in strict PV dom0). */
static xen_pfn_t own_mfn;
static uint8_t *own_page(void)
{
    int err = 0;
    uint8_t *m;
    if ( xc_domain_increase_reservation_exact(xch, 0, 1, 0, 0, &own_mfn) ) die("increase_reservation");
    m = xenforeignmemory_map(fmem, DOMID_SELF, PROT_READ | PROT_WRITE, 1, &own_mfn, &err);
    if ( !m || err ) die("map own page");
    return m;
}
static void own_free(uint8_t *m)
{
    xenforeignmemory_unmap(fmem, m, 1);
    xc_domain_decrease_reservation_exact(xch, 0, 1, 0, &own_mfn);
}

static int cmd_dma_read(uint64_t bus)
{
    uint8_t *m = own_page();
    memset(m, 0xee, PAGE);
    /* clear edu's buffer first so a blocked read cannot show stale data */
    memset(m, 0, DMA_LEN);
    edu_dma((uint64_t)own_mfn << 12, EDU_BUF, 0);
    memset(m, 0xee, PAGE);
    edu_dma(bus, EDU_BUF, 0);
    edu_dma(EDU_BUF, (uint64_t)own_mfn << 12, 1);
    show("dma-read", m);
    own_free(m);
    return 0;
}

static int cmd_dma_write(uint64_t bus, uint8_t byte)
{
    uint8_t *m = own_page();
    memset(m, byte, PAGE);
    edu_dma((uint64_t)own_mfn << 12, EDU_BUF, 0);
    edu_dma(EDU_BUF, bus, 1);
    printf("dma-write done bus=0x%" PRIx64 " byte=0x%02x\n", bus, byte);
    own_free(m);
    return 0;
}

/* ---------------- measurement ---------------- */
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmd_measure(unsigned long n)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint64_t *bfns = calloc(n, sizeof(*bfns));
    int *errs = calloc(n, sizeof(int));
    struct pv_iommu_caps c;
    uint32_t domid;
    unsigned long i, done = 0, bad = 0;
    long calls = 0, ucalls = 0, rc;
    double t0, t1, t2, t3;
    void *m;

    if ( query_caps(&c) == 0 && c.max_batch_ops ) max_ops = c.max_batch_ops < OPS_CAP ? c.max_batch_ops : OPS_CAP;
    domid = make_domain(n, frames);
    printf("measure domid=%u pages=%lu batch=%u\n", domid, n, max_ops);

    t0 = now();
    while ( done < n )
    {
        unsigned int k = n - done > max_ops ? max_ops : n - done, j;
        if ( !bat ) { bat = locked_buf(PAGE); ops = locked_buf(OPS_CAP * sizeof(*ops)); }
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ )
        {
            ops[j].subop = PVIOMMU_OP_map; ops[j].flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE;
            ops[j].domid = domid; ops[j].gfn = frames[done + j];
        }
        rc = run_batch(k, &calls);
        for ( j = 0; j < k; j++ ) { bfns[done + j] = ops[j].bfn; if ( ops[j].status ) bad++; }
        if ( rc ) { printf("measure map batch rc=%ld at %lu\n", rc, done); break; }
        done += k;
    }
    t1 = now();
    for ( i = 0; i < done; )
    {
        unsigned int k = done - i > max_ops ? max_ops : done - i, j;
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ ) { ops[j].subop = PVIOMMU_OP_unmap; ops[j].bfn = bfns[i + j]; }
        rc = run_batch(k, &ucalls);
        if ( rc ) { printf("measure unmap batch rc=%ld\n", rc); break; }
        i += k;
    }
    t2 = now();
    printf("MEASURE pviommu_map pages=%lu ok=%lu failed=%lu seconds=%.4f hypercalls=%ld batch=%u\n",
           n, done, bad, t1 - t0, calls, max_ops);
    printf("MEASURE pviommu_unmap pages=%lu seconds=%.4f hypercalls=%ld\n", done, t2 - t1, ucalls);

    t2 = now();
    m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, n, frames, errs);
    t3 = now();
    for ( i = 0, bad = 0; i < n; i++ ) if ( errs[i] ) bad++;
    /* Linux 6.1 PV privcmd: xen_remap_pfn batches REMAP_BATCH_SIZE=16 mmu_updates per hypercall. */
    printf("MEASURE privcmd_foreign_map pages=%lu ok=%d failed=%lu seconds=%.4f ioctls=1 hypercalls_est=%lu (mmu_update, 16 per call in Linux 6.1 PV)\n",
           n, m != NULL, bad, t3 - t2, (n + 15) / 16);
    if ( m ) xenforeignmemory_unmap(fmem, m, n);
    cmd_destroy(domid);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if ( argc < 2 ) { fprintf(stderr, "usage: see source\n"); return 2; }
    if ( strcmp(argv[1], "hc") && strcmp(argv[1], "hypercall") )
        open_xc();
    if ( !strcmp(argv[1], "caps") )
    {
        struct pv_iommu_caps c;
        unsigned long maxram = 0;
        long rc = query_caps(&c);
        xc_maximum_ram_page(xch, &maxram);
        printf("caps rc=%ld version=0x%08x window_start=0x%" PRIx64 " window_end=0x%" PRIx64
               " ram_end=0x%lx max_batch_ops=%u nr_reserved=%u\n", rc, c.version,
               c.bfn_window_start, c.bfn_window_end, maxram, c.max_batch_ops, c.nr_reserved_regions);
        return !(rc == 0 && c.version == PVIOMMU_INTERFACE_VERSION &&
                 c.bfn_window_start >= maxram && c.bfn_window_start >= 0x100000 &&
                 c.bfn_window_end > c.bfn_window_start);
    }
    if ( !strcmp(argv[1], "mkdom") && argc >= 3 ) return cmd_mkdom(strtoul(argv[2], NULL, 0));
    if ( !strcmp(argv[1], "peek") && argc >= 4 ) return cmd_peek(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0), 0);
    if ( !strcmp(argv[1], "match") && argc >= 4 ) return cmd_peek(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0), 1);
    if ( !strcmp(argv[1], "unpopulate") && argc >= 4 )
    {
        xen_pfn_t g = strtoull(argv[3], NULL, 0);
        int r = xc_domain_decrease_reservation_exact(xch, strtoul(argv[2], NULL, 0), 1, 0, &g);
        printf("unpopulate rc=%d\n", r ? -errno : 0);
        return r ? 1 : 0;
    }
    if ( !strcmp(argv[1], "destroy") && argc >= 3 ) return cmd_destroy(strtoul(argv[2], NULL, 0));
    if ( !strcmp(argv[1], "dma-read") && argc >= 3 ) { edu_open(); return cmd_dma_read(strtoull(argv[2], NULL, 0)); }
    if ( !strcmp(argv[1], "dma-write") && argc >= 4 ) { edu_open(); return cmd_dma_write(strtoull(argv[2], NULL, 0), strtoul(argv[3], NULL, 0)); }
    if ( !strcmp(argv[1], "hc") || !strcmp(argv[1], "hypercall") ) return cmd_hc(argc - 2, argv + 2);
    if ( !strcmp(argv[1], "measure") && argc >= 3 ) return cmd_measure(strtoul(argv[2], NULL, 0));
    fprintf(stderr, "bad command\n");
    return 2;
}
