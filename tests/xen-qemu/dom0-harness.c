/* SPDX-License-Identifier: MIT */
/*
 * dom0-harness.c -- static test tool for the PV-IOMMU QEMU test (dom0 and domU).
 *
 *   caps                        query caps; exit 0 iff version 1.1, translating, window above RAM
 *   mkdom N                     paused PV domain with N pages, page i filled with pat(i)
 *   mkhvm N                     paused HVM domain (shadow paging) with N pages, filled
 *   settarget DOMID TARGET      xc_domain_set_target: DOMID becomes TARGET's device model
 *   peek DOMID GFN              first bytes + checksum of a foreign page
 *   match DOMID GFN             like peek, and also compares with the page's pattern
 *   dma-read BUS                edu DMA 2048 bytes at BUS -> edu -> dom0 page; print them
 *   dma-write BUS BYTE          edu DMA 2048 bytes of BYTE to BUS
 *   destroy DOMID [TRIES]       destroy, wait (TRIES x 20 ms, default 100), print gone|zombie
 *   unpopulate DOMID GFN        remove one gfn from a domain (guest_remove_page path)
 *   rmphysmap DOMID GFN         XENMEM_remove_from_physmap of one gfn
 *   logdirty N                  HVM domain of N pages mapped writable; log-dirty on
 *                               revokes them all (timed), RW refused / RO ok while on
 *   hc caps | hc cmd N | hc map DOMID GFN FLAGS [CTX] | hc unmap BFN [CTX] | hc lookup BFN
 *   hc map-rohdr DOMID GFN      a map whose batch header is read-only, then writable
 *   hc map-xhdr DOMID GFN       a map whose header's first page only is read-only
 *   hc revoked-next | hc revoked-ack BFN
 *   hc ctx-create | hc ctx-destroy CTX | hc attach CTX SBDF | hc detach CTX SBDF
 *   hc entry DOMID CTX BFN      leaf entry of a BFN in DOMID's context CTX (address zeroed)
 *   assign SBDF DOMID           xc_assign_device: hand a PCI device to DOMID
 *   reclaim SBDF                xc_deassign_device from DOMID_IO: quarantine -> dom0
 *   (dma-read/dma-write use the edu device named by $EDU, e.g. 0000:00:07.0, else
 *    the lowest-numbered one; with $EDU_CTX=N the dom0 bounce page is mapped into
 *    context N and the device reaches it at that BFN)
 *   hc raw SUBOP FLAGS DOMID GFN BFN PAD RSVD [CONTEXT]
 *   drain-revoked               acknowledge every queued revocation (unmap -> ESTALE)
 *   measure N                   BFNs for N foreign pages: PV-IOMMU batches vs privcmd
 *   run2m [CTX] [extent]        a PV domain of one 2 MiB extent, mapped whole into dom0's
 *                               context CTX (0) in one batch (with "extent": by one
 *                               extent op, ABI 1.6): BFNs consecutive, aligned?
 *   unmaprun BFN N [CTX]        unmap [BFN, BFN + N) of dom0's context CTX (0), in batches
 *   perfc                       Xen's IOMMU page-table perf counters now (superpages split
 *                               and made by Xen's own VT-d/AMD-Vi code, context 0)
 *   bigdestroy N                map N pages of a fresh domain, destroy it, time the
 *                               destroy, check it is gone and its memory is back
 *   fuzz N SEED [DOMID...]      N hostile hypercalls; leaves what they mapped, recorded
 *                               in /tmp/fuzz.state (dom0: against its own fresh domain)
 *   fuzz-clean                  unmap what /tmp/fuzz.state records, destroy its domain
 *   ppgtt-setup BIG             paused PV domain holding a Gen8 PPGTT and buffers of known
 *                               bytes (plus a BIG-page buffer); prints the layout
 *   ppgtt-edit                  the guest moves one buffer and unmaps one page
 *   xs-write PATH VALUE | xs-wait PATH SECONDS    xenstore, for dom0 <-> domU hand-offs
 *
 * Hypercall results print as "rc=<ret> status=<op status>" (rc is the
 * hypercall's return: negative errno, 0, or 1 = batch incomplete).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
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
#include <xengnttab.h>
#include <xen/grant_table.h>
#include <xen/platform.h>
#include <xenstore.h>
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

/* The batch header and ops[], hypercall-safe (locked), made at first use. */
static void op_bufs(void)
{
    if ( !bat ) { bat = locked_buf(PAGE); ops = locked_buf(OPS_CAP * sizeof(*ops)); }
}

/* Run a batch of n ops already in ops[] to completion (re-issuing on 1). */
static long run_batch(unsigned int n, long *calls)
{
    long rc;
    op_bufs();
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
    op_bufs();
    ops[0] = *o;
    rc = run_batch(1, NULL);
    *o = ops[0];
    return rc;
}

/* "ssss:bb:dd.f" -> pci_sbdf_t value; ~0u if malformed. */
static uint32_t parse_sbdf(const char *s)
{
    unsigned int seg, bus, dev, fn;
    char end;
    if ( sscanf(s, "%x:%x:%x.%x%c", &seg, &bus, &dev, &fn, &end) != 4 ||
         seg > 0xffff || bus > 0xff || dev > 31 || fn > 7 )
        return ~0u;
    return seg << 16 | bus << 8 | dev << 3 | fn;
}

static int query_caps(struct pv_iommu_caps *out)
{
    struct pv_iommu_caps *c = locked_buf(PAGE);   /* zeroed: unwritten fields read 0 */
    long rc = hcall(PVIOMMU_CMD_query_caps, c);
    *out = *c;
    munmap(c, PAGE);
    return rc;
}

/*
 * One map of (domid, gfn) read from argv[1..2], with header `h` (ops in
 * `op`), run while dom0's page `ro` is read-only: the call's answer, and
 * caps.used before and after it in *c0, *c1. `ro` is writable again after.
 */
static long map_with_page_ro(struct pv_iommu_batch *h, void *ro, struct pv_iommu_op *op,
                             char **argv, struct pv_iommu_caps *c0, struct pv_iommu_caps *c1)
{
    long rc;
    op->subop = PVIOMMU_OP_map; op->flags = PVIOMMU_F_READ;
    op->domid = strtoul(argv[1], NULL, 0); op->gfn = strtoull(argv[2], NULL, 0);
    h->version = PVIOMMU_INTERFACE_VERSION; h->nr_ops = 1;
    h->ops = (uint64_t)(uintptr_t)op;
    if ( query_caps(c0) ) die("caps");
    if ( mprotect(ro, PAGE, PROT_READ) ) die("mprotect");
    rc = hcall(PVIOMMU_CMD_batch, h);
    if ( mprotect(ro, PAGE, PROT_READ | PROT_WRITE) ) die("mprotect");
    if ( query_caps(c1) ) die("caps");
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
               " nr_reserved=%u features=0x%x max_contexts=%u translation=%u quota=%" PRIu64
               " used=%" PRIu64 " revoked=%" PRIu64 "\n", rc, c.version, c.max_batch_ops,
               c.page_sizes, c.bfn_window_start, c.bfn_window_end, c.nr_reserved_regions,
               c.features, c.max_contexts, c.translation, c.quota, c.used, c.revoked);
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
    if ( !strcmp(argv[0], "map-rohdr") && argc >= 3 )
    {
        /*
         * A map of (domid, gfn) whose batch header is in a read-only page:
         * Xen cannot write its nr_done, so it must answer EFAULT before
         * the op acts (caps.used unchanged), not map and leave the caller
         * no record of it. Then, the page writable again, the same map.
         */
        struct pv_iommu_caps c0, c1;
        struct pv_iommu_batch *h = locked_buf(PAGE);
        struct pv_iommu_op *op = locked_buf(PAGE);
        long rc2;
        int status_ro;
        rc = map_with_page_ro(h, h, op, argv, &c0, &c1);
        status_ro = op->status;
        rc2 = hcall(PVIOMMU_CMD_batch, h);
        printf("rc=%ld used_before=%" PRIu64 " used_after=%" PRIu64 " status_ro=%d"
               " rc_writable=%ld nr_done=%u status=%d bfn=0x%" PRIx64 "\n",
               rc, c0.used, c1.used, status_ro, rc2, h->nr_done, op->status, op->bfn);
        return 0;
    }
    if ( !strcmp(argv[0], "map-xhdr") && argc >= 3 )
    {
        /*
         * A map whose batch header crosses a page boundary: version and
         * nr_ops on a page dom0 made read-only, nr_done and the rest on a
         * writable one. Xen writes back nr_done alone, so the call runs
         * and reports (before, the whole header was written back at the
         * end: EFAULT after the op had acted).
         */
        struct pv_iommu_caps c0, c1;
        char *two = locked_buf(2 * PAGE);
        struct pv_iommu_batch *h = (struct pv_iommu_batch *)(two + PAGE - 8);
        struct pv_iommu_op *op = locked_buf(PAGE);
        rc = map_with_page_ro(h, two, op, argv, &c0, &c1);
        printf("rc=%ld used_before=%" PRIu64 " used_after=%" PRIu64 " nr_done=%u status=%d"
               " bfn=0x%" PRIx64 "\n", rc, c0.used, c1.used, h->nr_done, op->status, op->bfn);
        return 0;
    }
    if ( !strcmp(argv[0], "limits") && argc >= 3 )
    {
        /* the toolstack's per-domain quota: PVIOMMU_CMD_set_limits */
        struct pv_iommu_limits *l = locked_buf(PAGE);
        l->version = PVIOMMU_INTERFACE_VERSION;
        l->domid = strtoul(argv[1], NULL, 0);
        l->quota = strtoull(argv[2], NULL, 0);
        rc = hcall(PVIOMMU_CMD_set_limits, l);
        printf("rc=%ld\n", rc);
        return 0;
    }
    if ( !strcmp(argv[0], "regions") )
    {
        struct pv_iommu_regions *r = locked_buf(PAGE);
        struct pv_iommu_region *e = locked_buf(PAGE);
        unsigned int i, listed = 0, total = 0, got;

        /* Every region, 64 a call (the glue's table holds 128). */
        do {
            r->version = PVIOMMU_INTERFACE_VERSION; r->start = listed; r->nr = 64;
            r->regions = (uint64_t)(uintptr_t)e;
            rc = hcall(PVIOMMU_CMD_reserved_regions, r);
            if ( rc )
                break;
            total = r->total;
            got = r->nr < 64 ? r->nr : 64;
            for ( i = 0; i < got; i++ )
                printf("region start=0x%" PRIx64 " nr=0x%" PRIx64 " kind=%u\n",
                       e[i].start_bfn, e[i].nr_frames, e[i].kind);
            listed += got;
        } while ( got && listed < total && listed < 4096 );
        printf("rc=%ld nr=%u total=%u\n", rc, listed, total);
        return 0;
    }
    if ( !strcmp(argv[0], "entry") && argc >= 4 )
    {
        struct pv_iommu_entry *en = locked_buf(PAGE);
        en->version = PVIOMMU_INTERFACE_VERSION;
        en->domid = strtoul(argv[1], NULL, 0);
        en->context = strtoul(argv[2], NULL, 0);
        en->bfn = strtoull(argv[3], NULL, 0);
        rc = hcall(PVIOMMU_CMD_entry, en);
        printf("rc=%ld level=%u format=%u bits=0x%" PRIx64 "\n", rc, en->level, en->format, en->bits);
        return 0;
    }
    if ( !strcmp(argv[0], "map") && argc >= 4 )
    {
        o.subop = PVIOMMU_OP_map; o.domid = strtoul(argv[1], NULL, 0);
        o.gfn = strtoull(argv[2], NULL, 0); o.flags = strtoul(argv[3], NULL, 0);
        if ( argc >= 5 ) o.context = strtoul(argv[4], NULL, 0);
    }
    else if ( (!strcmp(argv[0], "unmap") || !strcmp(argv[0], "lookup")) && argc >= 2 )
    {
        o.subop = argv[0][0] == 'u' ? PVIOMMU_OP_unmap : PVIOMMU_OP_lookup;
        o.bfn = strtoull(argv[1], NULL, 0);
        if ( argc >= 3 ) o.context = strtoul(argv[2], NULL, 0);
    }
    else if ( !strcmp(argv[0], "ctx-create") )
        o.subop = PVIOMMU_OP_context_create;
    else if ( !strcmp(argv[0], "ctx-destroy") && argc >= 2 )
    {
        o.subop = PVIOMMU_OP_context_destroy;
        o.context = strtoul(argv[1], NULL, 0);
    }
    else if ( (!strcmp(argv[0], "attach") || !strcmp(argv[0], "detach")) && argc >= 3 )
    {
        o.subop = argv[0][0] == 'a' ? PVIOMMU_OP_context_attach : PVIOMMU_OP_context_detach;
        o.context = strtoul(argv[1], NULL, 0);
        /* an unparsable SBDF goes out as is (> 32 bits): EINVAL from Xen */
        o.gfn = parse_sbdf(argv[2]) == ~0u ? ~0ull : parse_sbdf(argv[2]);
    }
    else if ( !strcmp(argv[0], "revoked-next") )
        o.subop = PVIOMMU_OP_revoked_next;
    else if ( !strcmp(argv[0], "revoked-ack") && argc >= 2 )
    {
        o.subop = PVIOMMU_OP_revoked_ack;
        o.bfn = strtoull(argv[1], NULL, 0);
    }
    else if ( !strcmp(argv[0], "raw") && argc >= 8 )
    {
        o.subop = strtoul(argv[1], NULL, 0); o.flags = strtoul(argv[2], NULL, 0);
        o.domid = strtoul(argv[3], NULL, 0); o.gfn = strtoull(argv[4], NULL, 0);
        o.bfn = strtoull(argv[5], NULL, 0); o._pad0 = strtoul(argv[6], NULL, 0);
        o.notice = strtoull(argv[7], NULL, 0);
        if ( argc >= 9 ) o.context = strtoul(argv[8], NULL, 0);
    }
    else
        return 2;
    rc = one_op(&o);
    printf("rc=%ld status=%d bfn=0x%" PRIx64 " domid=%u gfn=0x%" PRIx64 " flags=0x%x context=%u notice=%" PRIu64 "\n",
           rc, o.status, o.bfn, o.domid, o.gfn, o.flags, o.context, o.notice);
    return 0;
}

/* ---------------- domains ---------------- */
/*
 * The FLASK label of a domain made here: $MKDOM_LABEL, or domU_t, as the
 * toolstack labels a guest (an unlabelled domain may not be created under
 * FLASK's default policy). 0 (no label) without FLASK: the context cannot
 * be resolved, and Xen's dummy XSM ignores the field.
 */
static uint32_t dom_ssidref(void)
{
    const char *label = getenv("MKDOM_LABEL");
    char buf[128];
    uint32_t sid = 0;

    snprintf(buf, sizeof(buf), "%s", label ? label : "system_u:system_r:domU_t");
    if ( xc_flask_context_to_sid(xch, buf, strlen(buf), &sid) )
        sid = 0;
    return sid;
}

/* An empty PV domain that may hold n pages. */
static uint32_t create_pv_domain(unsigned long n)
{
    struct xen_domctl_createdomain cfg;
    uint32_t domid = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.max_vcpus = 1; cfg.max_evtchn_port = 1023;
    cfg.max_grant_frames = -1; cfg.max_maptrack_frames = -1;
    cfg.grant_opts = XEN_DOMCTL_GRANT_version(1);
    cfg.ssidref = dom_ssidref();
    if ( xc_domain_create(xch, &domid, &cfg) ) die("xc_domain_create");
    if ( xc_domain_setmaxmem(xch, domid, (n + 64) * 4) ) die("setmaxmem");
    return domid;
}

static uint32_t make_domain(unsigned long n, xen_pfn_t *frames)
{
    uint32_t domid = create_pv_domain(n);
    unsigned long i;

    for ( i = 0; i < n; i++ ) frames[i] = i;
    if ( xc_domain_populate_physmap_exact(xch, domid, n, 0, 0, frames) ) die("populate");
    return domid;
}

/* An n-page PV domain (n a multiple of 512) given its memory in 2 MiB
 * extents, as a guest's memory mostly is (the toolstack populates an HVM
 * guest with superpages where it can): its gfns (a PV domain's are its
 * frames) run 512 at a time, each run 2 MiB aligned. Returns the domid,
 * frames[] filled, or -1 (nothing left behind) when Xen has no such
 * extents to give. */
static uint32_t make_domain_2m(unsigned long n, xen_pfn_t *frames)
{
    unsigned long extents = n / 512, i, j;
    xen_pfn_t *starts = calloc(extents ? extents : 1, sizeof(*starts));
    uint32_t domid;

    if ( !starts ) die("calloc");
    domid = create_pv_domain(n);
    if ( !extents || n % 512 || xc_domain_populate_physmap_exact(xch, domid, extents, 9, 0, starts) )
    {
        printf("populate 2M extents: n=%lu errno=%d\n", n, errno);
        xc_domain_destroy(xch, domid);
        free(starts);
        return (uint32_t)-1;
    }
    for ( i = 0; i < extents; i++ )
        for ( j = 0; j < 512; j++ ) frames[i * 512 + j] = starts[i] + j;
    free(starts);
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


/* An HVM domain (PVH-style: no device model needed) with room for n pages
 * and its p2m's pool, nothing populated yet. */
static uint32_t create_hvm_domain(unsigned long n)
{
    struct xen_domctl_createdomain cfg;
    uint32_t domid = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.flags = XEN_DOMCTL_CDF_hvm;
    cfg.arch.emulation_flags = XEN_X86_EMU_LAPIC;
    cfg.max_vcpus = 1; cfg.max_evtchn_port = 1023;
    cfg.max_grant_frames = -1; cfg.max_maptrack_frames = -1;
    cfg.grant_opts = XEN_DOMCTL_GRANT_version(1);
    cfg.ssidref = dom_ssidref();
    if ( xc_domain_create(xch, &domid, &cfg) ) die("xc_domain_create hvm");
    if ( xc_set_paging_mempool_size(xch, domid, 4 << 20) ) die("paging mempool");
    if ( xc_domain_setmaxmem(xch, domid, (n + 64) * 4) ) die("setmaxmem");
    return domid;
}

/*
 * An HVM domain, for the two things a PV domain cannot be: the target of a
 * device model (XEN_DOMCTL_set_target refuses a non-HVM target) and the
 * subject of XENMEM_remove_from_physmap (refused with EACCES unless
 * paging_mode_translate). QEMU's TCG emulates SVM without NPT, so no
 * CDF_hap: shadow paging, whose p2m pages come from the paging pool.
 * Its gfns stay 0..n-1 (populate_physmap writes back MFNs only for PV).
 */
static uint32_t make_hvm_domain(unsigned long n, xen_pfn_t *frames)
{
    uint32_t domid = create_hvm_domain(n);
    unsigned long i;

    for ( i = 0; i < n; i++ ) frames[i] = i;
    if ( xc_domain_populate_physmap_exact(xch, domid, n, 0, 0, frames) ) die("populate hvm");
    return domid;
}

/*
 * An n-page HVM domain (n a multiple of 512) given its RAM in 2 MiB
 * extents at gfns 0, 512, ...: Xen maps each with one 2 MiB p2m entry, as
 * it populates a GPU guest's RAM where it can (PV-IOMMU takes a run of
 * pages one entry maps with one p2m walk, patch 0006). frames[i] = gfn i.
 * (uint32_t)-1 if Xen has no such extents to give.
 */
static uint32_t make_hvm_domain_2m(unsigned long n, xen_pfn_t *frames)
{
    unsigned long extents = n / 512, i;
    xen_pfn_t *starts = calloc(extents ? extents : 1, sizeof(*starts));
    uint32_t domid;

    if ( !starts ) die("calloc");
    domid = create_hvm_domain(n);
    for ( i = 0; i < extents; i++ ) starts[i] = i * 512;
    if ( !extents || n % 512 || xc_domain_populate_physmap_exact(xch, domid, extents, 9, 0, starts) )
    {
        printf("populate hvm 2M extents: n=%lu errno=%d\n", n, errno);
        xc_domain_destroy(xch, domid);
        free(starts);
        return (uint32_t)-1;
    }
    for ( i = 0; i < n; i++ ) frames[i] = i;
    free(starts);
    return domid;
}

/* mkdom / mkhvm: an n-page PV or HVM domain with known bytes; prints its
 * domid and gfns. */
static int cmd_mkdom(unsigned long n, int hvm)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint32_t domid = hvm ? make_hvm_domain(n, frames) : make_domain(n, frames);
    unsigned long i;
    xc_domaininfo_t info;
    fill_domain(domid, n, frames);
    printf("domid=%u\ngfns=", domid);
    for ( i = 0; i < n; i++ ) printf("%s0x%lx", i ? "," : "", (unsigned long)frames[i]);
    printf("\n");
    /* A PV domain's shared_info frame: a machine frame Xen shares with it. */
    if ( !hvm && xc_domain_getinfolist(xch, domid, 1, &info) == 1 && info.domain == domid )
        printf("shared_info=0x%" PRIx64 "\n", (uint64_t)info.shared_info_frame);
    free(frames);
    return 0;
}

/* DOMID becomes the device model of TARGET (Xen sets DOMID->target = TARGET). */
static int cmd_settarget(uint32_t domid, uint32_t target)
{
    int r = xc_domain_set_target(xch, domid, target);
    printf("settarget dm=%u target=%u rc=%d\n", domid, target, r ? -errno : 0);
    return r ? 1 : 0;
}

/* XENMEM_remove_from_physmap: one of the gfn-removal paths besides guest_remove_page. */
static int cmd_rmphysmap(uint32_t domid, xen_pfn_t gfn)
{
    int r = xc_domain_remove_from_physmap(xch, domid, gfn);
    printf("rmphysmap domid=%u gfn=0x%lx rc=%d\n", domid, (unsigned long)gfn, r ? -errno : 0);
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

/* Destroy DOMID and poll (TRIES x 20 ms) until Xen has freed it: 1 gone,
 * 0 still there (a zombie: *info says how it stands), -1 the destroy
 * failed. */
static int destroy_and_wait(uint32_t domid, int tries, xc_domaininfo_t *info)
{
    int i;
    if ( xc_domain_destroy(xch, domid) ) return -1;
    for ( i = 0; i < tries; i++ )
    {
        int n = xc_domain_getinfolist(xch, domid, 1, info);
        if ( n < 1 || info->domain != domid ) return 1;
        usleep(20000);
    }
    return 0;
}

static int cmd_destroy(uint32_t domid, int tries)
{
    xc_domaininfo_t info;
    int gone = destroy_and_wait(domid, tries, &info);
    if ( gone < 0 ) die("xc_domain_destroy");
    if ( gone ) { printf("destroy domid=%u gone\n", domid); return 0; }
    printf("destroy domid=%u zombie dying=%d tot_pages=%" PRIu64 "\n", domid,
           !!(info.flags & XEN_DOMINF_dying), (uint64_t)info.tot_pages);
    return 1;
}

/* ---------------- edu DMA ---------------- */
static volatile uint8_t *edu;

/* The edu device named by $EDU, else the lowest-numbered one. */
static void edu_open(void)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    char p[512], b[64], want[300] = "";
    const char *env = getenv("EDU");
    if ( !d ) die("opendir pci");
    if ( env && *env )
        snprintf(want, sizeof want, "%s", env);
    else
    {
        /* first pass: the lowest-numbered edu */
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
            if ( v == 0x1234 && dv == 0x11e8 && (!want[0] || strcmp(e->d_name, want) < 0) )
                snprintf(want, sizeof want, "%s", e->d_name);
        }
        rewinddir(d);
    }
    while ( (e = readdir(d)) )
    {
        FILE *f;
        unsigned v = 0, dv = 0;
        if ( e->d_name[0] == '.' || strcmp(e->d_name, want) ) continue;
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

/*
 * A dom0 page with a known bus address: its MFN in strict PV dom0's default
 * context, or, with $EDU_CTX=N (a device attached to context N reaches none
 * of dom0's memory by itself), the BFN it is given there.
 */
static xen_pfn_t own_mfn;
static uint64_t own_bus, own_ctx_bfn;
static uint32_t own_ctx;
static uint8_t *own_page(void)
{
    int err = 0;
    uint8_t *m;
    const char *ctx = getenv("EDU_CTX");
    if ( xc_domain_increase_reservation_exact(xch, 0, 1, 0, 0, &own_mfn) ) die("increase_reservation");
    m = xenforeignmemory_map(fmem, DOMID_SELF, PROT_READ | PROT_WRITE, 1, &own_mfn, &err);
    if ( !m || err ) die("map own page");
    own_bus = (uint64_t)own_mfn << 12;
    own_ctx = ctx ? strtoul(ctx, NULL, 0) : 0;
    if ( own_ctx )
    {
        struct pv_iommu_op o = { .subop = PVIOMMU_OP_map, .flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE,
                                 .context = own_ctx, .domid = 0, .gfn = own_mfn };
        long rc = one_op(&o);
        if ( rc || o.status ) { fprintf(stderr, "map own page into context %u: rc=%ld status=%d\n", own_ctx, rc, o.status); exit(2); }
        own_ctx_bfn = o.bfn;
        own_bus = o.bfn << 12;
    }
    return m;
}
static void own_free(uint8_t *m)
{
    if ( own_ctx )
    {
        struct pv_iommu_op o = { .subop = PVIOMMU_OP_unmap, .context = own_ctx, .bfn = own_ctx_bfn };
        one_op(&o);
    }
    xenforeignmemory_unmap(fmem, m, 1);
    xc_domain_decrease_reservation_exact(xch, 0, 1, 0, &own_mfn);
}

static int cmd_dma_read(uint64_t bus)
{
    uint8_t *m = own_page();
    memset(m, 0xee, PAGE);
    /* clear edu's buffer first so a blocked read cannot show stale data */
    memset(m, 0, DMA_LEN);
    edu_dma(own_bus, EDU_BUF, 0);
    memset(m, 0xee, PAGE);
    edu_dma(bus, EDU_BUF, 0);
    edu_dma(EDU_BUF, own_bus, 1);
    show("dma-read", m);
    own_free(m);
    return 0;
}

static int cmd_dma_write(uint64_t bus, uint8_t byte)
{
    uint8_t *m = own_page();
    memset(m, byte, PAGE);
    edu_dma(own_bus, EDU_BUF, 0);
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

/*
 * Hypercall counts, measured: Xen's own perf counters (the build turns on
 * CONFIG_PERF_COUNTERS), read through XEN_SYSCTL_perfc_op before and after
 * each phase. "hypercalls" counts guest hypercall entries by number (a
 * multicall once, as multicall); calls_to_mmu_update also counts the
 * mmu_updates inside multicalls, num_page_updates the PTEs they wrote.
 * Deltas include whatever else dom0 did meanwhile (timers, event
 * channels): the harness is the only busy process.
 */
struct perfc_snap {
    unsigned long hc[64];
    unsigned long mmu_update_calls, page_updates;
    /* x86: superpages Xen's IOMMU code split (shatters) and made. */
    unsigned long pt_shatters, pt_coalesces;
    int ok;
};

static void perfc_take(struct perfc_snap *s)
{
    DECLARE_HYPERCALL_BUFFER(xc_perfc_desc_t, pcd);
    DECLARE_HYPERCALL_BUFFER(xc_perfc_val_t, pcv);
    int nd = 0, nv = 0, i;
    unsigned int j;
    xc_perfc_val_t *v;

    memset(s, 0, sizeof(*s));
    if ( xc_perfc_query_number(xch, &nd, &nv) ) return;
    pcd = xc_hypercall_buffer_alloc(xch, pcd, sizeof(*pcd) * nd);
    pcv = xc_hypercall_buffer_alloc(xch, pcv, sizeof(*pcv) * nv);
    if ( pcd && pcv && !xc_perfc_query(xch, HYPERCALL_BUFFER(pcd), HYPERCALL_BUFFER(pcv)) )
    {
        s->ok = 1;
        for ( i = 0, v = pcv; i < nd; v += pcd[i].nr_vals, i++ )
        {
            if ( !strcmp(pcd[i].name, "hypercalls") )
                for ( j = 0; j < pcd[i].nr_vals && j < 64; j++ ) s->hc[j] = v[j];
            else if ( !strcmp(pcd[i].name, "calls to mmu_update") )
                for ( j = 0; j < pcd[i].nr_vals; j++ ) s->mmu_update_calls += v[j];
            else if ( !strcmp(pcd[i].name, "page updates") )
                for ( j = 0; j < pcd[i].nr_vals; j++ ) s->page_updates += v[j];
            else if ( !strcmp(pcd[i].name, "IOMMU page table shatters") )
                for ( j = 0; j < pcd[i].nr_vals; j++ ) s->pt_shatters += v[j];
            else if ( !strcmp(pcd[i].name, "IOMMU page table coalesces") )
                for ( j = 0; j < pcd[i].nr_vals; j++ ) s->pt_coalesces += v[j];
        }
    }
    xc_hypercall_buffer_free(xch, pcd);
    xc_hypercall_buffer_free(xch, pcv);
}

/* "measured=1 total=N mmu_update=N multicall=N pv_iommu_op=N ..." for a phase. */
static void perfc_print(const struct perfc_snap *a, const struct perfc_snap *b)
{
    unsigned long total = 0;
    int j;
    if ( !a->ok || !b->ok ) { printf(" measured=0"); return; }
    for ( j = 0; j < 64; j++ )
        if ( j != __HYPERVISOR_sysctl ) total += b->hc[j] - a->hc[j]; /* the query's own */
    printf(" measured=1 hypercalls_total=%lu pv_iommu_op=%lu mmu_update=%lu multicall=%lu"
           " mmuext_op=%lu memory_op=%lu mmu_update_calls=%lu page_updates=%lu",
           total, b->hc[__HYPERVISOR_pv_iommu_op] - a->hc[__HYPERVISOR_pv_iommu_op],
           b->hc[__HYPERVISOR_mmu_update] - a->hc[__HYPERVISOR_mmu_update],
           b->hc[__HYPERVISOR_multicall] - a->hc[__HYPERVISOR_multicall],
           b->hc[__HYPERVISOR_mmuext_op] - a->hc[__HYPERVISOR_mmuext_op],
           b->hc[__HYPERVISOR_memory_op] - a->hc[__HYPERVISOR_memory_op],
           b->mmu_update_calls - a->mmu_update_calls, b->page_updates - a->page_updates);
    printf(" shatters=%lu coalesces=%lu", b->pt_shatters - a->pt_shatters,
           b->pt_coalesces - a->pt_coalesces);
}

/* PVIOMMU_CMD_stats for dom0 with `flags`; 0 or the error. */
static long pv_stats(uint16_t flags, struct pv_iommu_stats *out)
{
    static struct pv_iommu_stats *st;
    long rc;
    if ( !st ) st = locked_buf(PAGE);
    memset(st, 0, sizeof(*st));
    st->version = PVIOMMU_INTERFACE_VERSION;
    st->domid = 0;
    st->flags = flags;
    rc = hcall(PVIOMMU_CMD_stats, st);
    if ( !rc && out ) *out = *st;
    return rc;
}

/*
 * The stock way a backend gets device addresses for foreign pages in strict
 * mode: the foreign domain grants them (here dom0 seeds the domain's grant
 * table itself, through the grant-table resource, as the toolstack seeds a
 * new guest's console and xenstore entries), and dom0 maps the grants
 * through gntdev. Xen then also maps each granted frame into dom0's IOMMU
 * context, 1:1 at its machine address: the device address *is* the MFN.
 */
static void grant_measure(uint32_t domid, unsigned long n, const xen_pfn_t *frames)
{
    unsigned long nr_gframes = (n + 511) / 512, i;
    void *gt = NULL, *m;
    xenforeignmemory_resource_handle *res;
    xengnttab_handle *xgt;
    uint32_t *refs = calloc(n, sizeof(*refs));
    struct perfc_snap a, b;
    double t0, t1, t2;

    res = xenforeignmemory_map_resource(fmem, domid, XENMEM_resource_grant_table,
                                        XENMEM_resource_grant_table_id_shared, 0,
                                        nr_gframes, &gt, PROT_READ | PROT_WRITE, 0);
    if ( !res || !refs )
    {
        printf("MEASURE grant_map skipped=1 reason=grant_table_resource errno=%d\n", errno);
        free(refs);
        return;
    }
    for ( i = 0; i < n; i++ )
    {
        grant_entry_v1_t *e = (grant_entry_v1_t *)gt + i;
        e->domid = 0;
        e->frame = frames[i];
        __atomic_store_n(&e->flags, GTF_permit_access, __ATOMIC_RELEASE);
        refs[i] = i;
    }
    xgt = xengnttab_open(NULL, 0);
    if ( !xgt )
    {
        printf("MEASURE grant_map skipped=1 reason=gntdev errno=%d\n", errno);
        xenforeignmemory_unmap_resource(fmem, res);
        free(refs);
        return;
    }
    xengnttab_set_max_grants(xgt, n);
    perfc_take(&a);
    t0 = now();
    m = xengnttab_map_domain_grant_refs(xgt, n, domid, refs, PROT_READ | PROT_WRITE);
    t1 = now();
    perfc_take(&b);
    printf("MEASURE grant_map pages=%lu ok=%d seconds=%.4f ioctls=1", n, m != NULL, t1 - t0);
    perfc_print(&a, &b);
    printf(" grant_table_op=%lu\n", b.hc[__HYPERVISOR_grant_table_op] - a.hc[__HYPERVISOR_grant_table_op]);
    if ( m )
    {
        perfc_take(&a);
        t1 = now();
        xengnttab_unmap(xgt, m, n);
        t2 = now();
        perfc_take(&b);
        printf("MEASURE grant_unmap pages=%lu seconds=%.4f", n, t2 - t1);
        perfc_print(&a, &b);
        printf(" grant_table_op=%lu\n", b.hc[__HYPERVISOR_grant_table_op] - a.hc[__HYPERVISOR_grant_table_op]);
    }
    else
        printf("grant_map errno=%d\n", errno);
    /* Revoke the grants again before the domain goes. */
    for ( i = 0; i < n; i++ )
        __atomic_store_n(&((grant_entry_v1_t *)gt + i)->flags, 0, __ATOMIC_RELEASE);
    xengnttab_close(xgt);
    xenforeignmemory_unmap_resource(fmem, res);
    free(refs);
}

/*
 * PV-IOMMU map of frames[0..n) of domid into context ctx, in batches of
 * max_ops: the BFNs land in bfns[], *bad counts refused ops, *calls the
 * hypercalls. Returns the ops run (n unless a batch failed).
 */
static unsigned long pv_map_pages(uint32_t ctx, uint32_t domid, const xen_pfn_t *frames,
                                  unsigned long n, uint64_t *bfns, long *calls,
                                  unsigned long *bad)
{
    unsigned long done = 0;
    long rc;

    op_bufs();
    while ( done < n )
    {
        unsigned int k = n - done > max_ops ? max_ops : n - done, j;
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ )
        {
            ops[j].subop = PVIOMMU_OP_map; ops[j].flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE;
            ops[j].context = ctx; ops[j].domid = domid; ops[j].gfn = frames[done + j];
        }
        rc = run_batch(k, calls);
        for ( j = 0; j < k; j++ ) { bfns[done + j] = ops[j].bfn; if ( ops[j].status ) (*bad)++; }
        if ( rc ) { printf("measure map batch rc=%ld at %lu\n", rc, done); break; }
        done += k;
    }
    return done;
}

/* The map of frames[0..n) (n a multiple of 512, each 512 one aligned
 * machine run, as make_domain_2m gives) by 2 MiB extents (ABI 1.6): one
 * op a 512 pages, in batches of max_ops ops. bfns[] gets each page's BFN
 * (the extent's first plus its place); *bad counts the pages of extents
 * refused, *unaligned the extents answered at a BFN not 2 MiB aligned. */
static unsigned long pv_map_extents(uint32_t ctx, uint32_t domid, const xen_pfn_t *frames,
                                    unsigned long n, uint64_t *bfns, long *calls,
                                    unsigned long *bad, unsigned long *unaligned)
{
    unsigned long extents = n / PVIOMMU_EXTENT_PAGES, done = 0, x, j;
    long rc;

    op_bufs();
    while ( done < extents )
    {
        unsigned int k = extents - done > max_ops ? max_ops : extents - done, i;
        memset(ops, 0, k * sizeof(*ops));
        for ( i = 0; i < k; i++ )
        {
            ops[i].subop = PVIOMMU_OP_map;
            ops[i].flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE | PVIOMMU_F_EXTENT_2M;
            ops[i].context = ctx; ops[i].domid = domid;
            ops[i].gfn = frames[(done + i) * PVIOMMU_EXTENT_PAGES];
        }
        rc = run_batch(k, calls);
        for ( i = 0; i < k; i++ )
        {
            x = done + i;
            for ( j = 0; j < PVIOMMU_EXTENT_PAGES; j++ )
                bfns[x * PVIOMMU_EXTENT_PAGES + j] = ops[i].status ? 0 : ops[i].bfn + j;
            if ( ops[i].status ) *bad += PVIOMMU_EXTENT_PAGES;
            else if ( ops[i].bfn % PVIOMMU_EXTENT_PAGES ) (*unaligned)++;
        }
        if ( rc ) { printf("measure extent batch rc=%ld at %lu\n", rc, done); break; }
        done += k;
    }
    return done * PVIOMMU_EXTENT_PAGES - *bad;
}

/* The unmap of the extents whose pages' BFNs are bfns[0..n) (n a multiple
 * of 512): one op an extent, its first BFN. How many pages were unmapped. */
static unsigned long pv_unmap_extents(uint32_t ctx, const uint64_t *bfns, unsigned long n,
                                      long *calls)
{
    unsigned long extents = n / PVIOMMU_EXTENT_PAGES, done = 0, i = 0;
    long rc;

    op_bufs();
    while ( i < extents )
    {
        unsigned int k = extents - i > max_ops ? max_ops : extents - i, j;
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ )
        {
            ops[j].subop = PVIOMMU_OP_unmap; ops[j].flags = PVIOMMU_F_EXTENT_2M;
            ops[j].context = ctx; ops[j].bfn = bfns[(i + j) * PVIOMMU_EXTENT_PAGES];
        }
        rc = run_batch(k, calls);
        if ( rc ) { printf("extent unmap batch rc=%ld\n", rc); break; }
        for ( j = 0; j < k; j++ ) if ( ops[j].status == 0 ) done += PVIOMMU_EXTENT_PAGES;
        i += k;
    }
    return done;
}

/* The unmap of bfns[0..n) from context ctx, in batches of max_ops: how many
 * were unmapped; *absent (if given) counts those that were not mapped
 * (ENOENT). A failed batch ends it, its rc in *failed (if given; else 0). */
static unsigned long pv_unmap_pages(uint32_t ctx, const uint64_t *bfns, unsigned long n,
                                    long *calls, unsigned long *absent, long *failed)
{
    unsigned long i, done = 0;
    long rc = 0;

    op_bufs();
    for ( i = 0; i < n; )
    {
        unsigned int k = n - i > max_ops ? max_ops : n - i, j;
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ ) { ops[j].subop = PVIOMMU_OP_unmap; ops[j].context = ctx; ops[j].bfn = bfns[i + j]; }
        rc = run_batch(k, calls);
        if ( rc ) { printf("unmap batch rc=%ld\n", rc); break; }
        for ( j = 0; j < k; j++ )
        {
            if ( ops[j].status == 0 ) done++;
            else if ( ops[j].status == -ENOENT && absent ) (*absent)++;
        }
        i += k;
    }
    if ( failed ) *failed = rc;
    return done;
}

/*
 * run2m [CTX]: a PV domain given one 2 MiB extent (512 contiguous frames,
 * 2 MiB aligned; a PV domain's gfns are its frames), with known bytes,
 * mapped whole into dom0's context CTX (default 0) in one batch. Prints the
 * domid, the first gfn and BFN, how many BFNs follow the one before, and
 * whether the BFNs are aligned as the gfns: if they are, the leaf table
 * is folded into a 2 MiB superpage, which an unmap of one page must split
 * again: in context 0 by Xen's own VT-d and AMD-Vi code (4.17: the
 * contiguous markers of intel_iommu_map_page and amd_iommu_map_page), in
 * an engine context by the engine. By one extent op (`extent`), the engine
 * writes its own context's superpage entry whole, with no fold.
 */
static int cmd_run2m(uint32_t ctx, bool extent)
{
    xen_pfn_t start = 0, frames[512];
    uint64_t bfns[512] = { 0 };
    unsigned long i, consecutive = 0, bad = 0, unaligned = 0, mapped;
    long calls = 0;
    uint32_t domid = create_pv_domain(512);

    if ( xc_domain_populate_physmap_exact(xch, domid, 1, 9, 0, &start) ) die("populate 2M");
    for ( i = 0; i < 512; i++ ) frames[i] = start + i;
    fill_domain(domid, 512, frames);
    mapped = extent ? pv_map_extents(ctx, domid, frames, 512, bfns, &calls, &bad, &unaligned)
                    : pv_map_pages(ctx, domid, frames, 512, bfns, &calls, &bad);
    if ( mapped != 512 || bad )
    {
        /* Leave nothing behind for the checks that follow. */
        unsigned long k = 0;
        for ( i = 0; i < 512; i++ )
            if ( bfns[i] ) bfns[k++] = bfns[i];
        pv_unmap_pages(ctx, bfns, k, &calls, NULL, NULL);
        xc_domain_destroy(xch, domid);
        printf("run2m domid=%u map failed bad=%lu\n", domid, bad);
        return 1;
    }
    for ( i = 1; i < 512; i++ ) consecutive += bfns[i] == bfns[i - 1] + 1;
    printf("run2m domid=%u gfn0=0x%lx bfn0=0x%" PRIx64 " consecutive=%lu aligned=%d\n", domid,
           (unsigned long)start, bfns[0], consecutive, (bfns[0] & 511) == (start & 511));
    return 0;
}

/*
 * hvmrun [falling]: an HVM domain of two 2 MiB p2m entries (gfns 0-1023), a hole
 * punched at gfn 515 (Xen splits that entry), then gfns 508-523 mapped into
 * dom0's context 0 in one batch: runs of pages the engine asks Xen for
 * together (pvx_get_pages: 508-511 with one p2m walk, the rest of the run
 * stopping at the hole, whose refusal it answers). `falling`: the same
 * gfns in descending order (523 first; 511-508 still one walk, patch
 * 0006 takes a run's pages of one p2m entry in any order). Prints the
 * domain, the hole's status and each page's BFN in gfn order (0 where
 * refused), for the device to read back and the test to unmap.
 */
#define HVMRUN_GFN0 508
#define HVMRUN_HOLE 515
#define HVMRUN_PAGES 16
static int cmd_hvmrun(bool falling)
{
    xen_pfn_t frames[1024], gfns[HVMRUN_PAGES], hole = HVMRUN_HOLE;
    uint64_t bfns[HVMRUN_PAGES] = { 0 };
    unsigned long i, bad = 0, mapped;
    long calls = 0;
    int hole_status = 0;
    uint32_t domid = make_hvm_domain_2m(1024, frames);
    /* The op of the i-th gfn from HVMRUN_GFN0 (the ops' order). */
#define HVMRUN_OP(i) (falling ? HVMRUN_PAGES - 1 - (i) : (i))

    if ( domid == (uint32_t)-1 ) { printf("hvmrun no 2M extents\n"); return 1; }
    fill_domain(domid, 1024, frames);
    if ( xc_domain_decrease_reservation_exact(xch, domid, 1, 0, &hole) ) die("hvmrun hole");
    for ( i = 0; i < HVMRUN_PAGES; i++ ) gfns[HVMRUN_OP(i)] = HVMRUN_GFN0 + i;
    mapped = pv_map_pages(0, domid, gfns, HVMRUN_PAGES, bfns, &calls, &bad);
    hole_status = ops[HVMRUN_OP(HVMRUN_HOLE - HVMRUN_GFN0)].status;
    printf("hvmrun domid=%u gfn0=0x%x ops=%lu refused=%lu hole_status=%d bfns=", domid, HVMRUN_GFN0,
           mapped, bad, hole_status);
    /* In gfn order, whatever the ops' order. */
    for ( i = 0; i < HVMRUN_PAGES; i++ )
        printf("%s0x%" PRIx64, i ? "," : "", ops[HVMRUN_OP(i)].status ? 0 : bfns[HVMRUN_OP(i)]);
    printf("\n");
#undef HVMRUN_OP
    return 0;
}

/* perfc: "perfc ok=1 shatters=N coalesces=N", Xen's counts of IOMMU
 * superpages split and made (ok=0: no perf counters in this build). */
static int cmd_perfc(void)
{
    struct perfc_snap s;

    perfc_take(&s);
    printf("perfc ok=%d shatters=%lu coalesces=%lu\n", s.ok, s.pt_shatters, s.pt_coalesces);
    return s.ok ? 0 : 1;
}

/* unmaprun BFN N [CTX]: unmap BFNs [BFN, BFN + N) of dom0's context CTX
 * (default 0) in batches; prints how many were unmapped and how many were
 * not mapped (ENOENT), and what Xen's perf counters saw meanwhile (taken
 * in this process right around the batches, so dom0's own page-type
 * changes of a process start do not count): IOMMU superpages split
 * (shatters) and tables freed or made superpages (coalesces), and
 * hypercall 43 entries (a continuation enters again). */
static int cmd_unmaprun(uint64_t bfn0, unsigned long n, uint32_t ctx)
{
    uint64_t *bfns = calloc(n, sizeof(*bfns));
    unsigned long i, done, absent = 0;
    long failed;
    struct perfc_snap a, b;

    if ( !bfns ) die("calloc");
    for ( i = 0; i < n; i++ ) bfns[i] = bfn0 + i;
    perfc_take(&a);
    done = pv_unmap_pages(ctx, bfns, n, NULL, &absent, &failed);
    perfc_take(&b);
    printf("unmaprun unmapped=%lu absent=%lu other=%lu rc=%ld perfc=%d shatters=%lu coalesces=%lu"
           " entries=%lu\n", done, absent, n - done - absent, failed, a.ok && b.ok,
           b.pt_shatters - a.pt_shatters, b.pt_coalesces - a.pt_coalesces,
           b.hc[__HYPERVISOR_pv_iommu_op] - a.hc[__HYPERVISOR_pv_iommu_op]);
    free(bfns);
    return failed ? 1 : 0;
}

/*
 * PV-IOMMU map then unmap of n pages of domid into context ctx, in batches
 * of max_ops, with Xen's perf counters and the in-Xen counters
 * (PVIOMMU_CMD_stats). `tag` names the MEASURE lines ("pviommu" for the
 * default context, Xen's own tables; "pviommu_ctx" for the engine's).
 *
 * `timed`: Xen also times each service (a clock read before and after each
 * page's lookup, entry write and flush) and the breakdown lines are
 * printed. Those clock reads are not free (under QEMU TCG each is a helper
 * call), so the pass compared with privcmd runs untimed, and a second pass
 * with timing on gives the breakdown ("..._timed_map" lines).
 * Returns the pages mapped.
 */
static unsigned long pv_map_unmap(const char *tag, uint32_t ctx, uint32_t domid,
                                  const xen_pfn_t *frames, unsigned long n, uint64_t *bfns,
                                  bool timed)
{
    struct pv_iommu_stats sm, su;
    struct perfc_snap p0, p1, p2, p3;
    unsigned long done, bad = 0, unaligned = 0, unmapped;
    /* "pviommu_2mx", "pviommu_ctx2mx": the pages by 2 MiB extents, one op
     * each (ABI 1.6), into context 0 or one of the engine's. */
    bool extents = strstr(tag, "2mx") != NULL;
    long calls = 0, ucalls = 0, rc;
    double t0, t1, t2, t3;
    /* The breakdown lines' prefix: "" for "pviommu", "ctx_" for
     * "pviommu_ctx", "2m_" for "pviommu_2m" and so on. */
    char bd[16];
    snprintf(bd, sizeof(bd), "%s%s", tag[7] == '_' ? tag + 8 : "", tag[7] == '_' ? "_" : "");

    /* Start the in-Xen counters from zero, timing on or off. */
    rc = pv_stats(PVIOMMU_STATS_RESET |
                  (timed ? PVIOMMU_STATS_TIMING_ON : PVIOMMU_STATS_TIMING_OFF), NULL);
    if ( rc ) printf("measure stats rc=%ld\n", rc);

    perfc_take(&p0);
    t0 = now();
    done = extents ? pv_map_extents(ctx, domid, frames, n, bfns, &calls, &bad, &unaligned)
                   : pv_map_pages(ctx, domid, frames, n, bfns, &calls, &bad);
    t1 = now();
    perfc_take(&p1);
    if ( pv_stats(PVIOMMU_STATS_RESET, &sm) ) memset(&sm, 0, sizeof(sm));
    perfc_take(&p2);
    t2 = now();
    unmapped = extents ? pv_unmap_extents(ctx, bfns, done, &ucalls)
                       : pv_unmap_pages(ctx, bfns, done, &ucalls, NULL, NULL);
    t3 = now();
    perfc_take(&p3);
    if ( pv_stats(PVIOMMU_STATS_RESET | PVIOMMU_STATS_TIMING_OFF, &su) ) memset(&su, 0, sizeof(su));
    printf("MEASURE %s%s_map pages=%lu ok=%lu failed=%lu seconds=%.4f hypercalls=%ld batch=%u",
           tag, timed ? "_timed" : "", n, done, bad, t1 - t0, calls, max_ops);
    perfc_print(&p0, &p1);
    if ( extents ) printf(" extents=%lu unaligned=%lu", n / PVIOMMU_EXTENT_PAGES, unaligned);
    printf("\nMEASURE %s%s_unmap pages=%lu seconds=%.4f hypercalls=%ld unmapped=%lu", tag,
           timed ? "_timed" : "", done, t3 - t2, ucalls, unmapped);
    perfc_print(&p2, &p3);
    printf("\n");
    /* The counters see every map and unmap either way; the times only
     * when timing is on. */
    if ( !strcmp(tag, "pviommu") )
        printf("stats%s maps=%" PRIu64 " unmaps=%" PRIu64 " ns_batches=%" PRIu64 "\n",
               timed ? "_timed" : "_untimed", sm.maps, su.unmaps, sm.ns_batches + su.ns_batches);
    if ( !timed )
        return done;
    /* Where the time inside Xen went (ns per page). */
    printf("MEASURE %sxen_breakdown_map pages=%lu maps=%" PRIu64 " batches=%" PRIu64 " flushes=%" PRIu64
           " ns_per_page_total=%.0f get_page=%.0f iommu_map=%.0f flush=%.0f engine_and_copies=%.0f\n",
           bd, done, sm.maps, sm.batches, sm.flushes, (double)sm.ns_batches / (done ? done : 1),
           (double)sm.ns_get_page / (done ? done : 1), (double)sm.ns_iommu_map / (done ? done : 1),
           (double)sm.ns_iommu_flush / (done ? done : 1),
           (double)(sm.ns_batches - sm.ns_get_page - sm.ns_iommu_map - sm.ns_iommu_flush - sm.ns_put_page)
               / (done ? done : 1));
    printf("MEASURE %sxen_breakdown_unmap pages=%lu unmaps=%" PRIu64 " batches=%" PRIu64 " flushes=%" PRIu64
           " ns_per_page_total=%.0f iommu_unmap=%.0f flush=%.0f put_page=%.0f engine_and_copies=%.0f\n",
           bd, done, su.unmaps, su.batches, su.flushes, (double)su.ns_batches / (done ? done : 1),
           (double)su.ns_iommu_unmap / (done ? done : 1), (double)su.ns_iommu_flush / (done ? done : 1),
           (double)su.ns_put_page / (done ? done : 1),
           (double)(su.ns_batches - su.ns_iommu_unmap - su.ns_iommu_flush - su.ns_put_page - su.ns_get_page)
               / (done ? done : 1));
    return done;
}

/* Sort v[0..n) in place (n at most ALT_MAX): then v[0] is the least,
 * v[n / 2] the median (n odd), v[n - 1] the greatest. */
static void sort_rounds(double *v, unsigned int n)
{
    unsigned int i, j;
    double x;

    for ( i = 1; i < n; i++ )
        for ( j = i; j > 0 && v[j - 1] > v[j]; j-- ) { x = v[j]; v[j] = v[j - 1]; v[j - 1] = x; }
}

#define ALT_MAX 15

/*
 * One pass of each does not settle a gap of a few percent under TCG:
 * privcmd's own map time varies by a quarter between boots. So privcmd and
 * PV-IOMMU (context ctx, untimed: no clock read in Xen) also map and unmap
 * the same n pages in alternation, `rounds` times, the order swapped each
 * round, and the medians and the fastest rounds are compared. One line
 * per round and a summary; ok=0 if any round failed to map or unmap every
 * page.
 */
static void alternate_with_privcmd(uint32_t ctx, uint32_t domid, const xen_pfn_t *frames,
                                   unsigned long n, uint64_t *bfns, int *errs,
                                   unsigned int rounds)
{
    double pm[ALT_MAX], pu[ALT_MAX], vm[ALT_MAX], vu[ALT_MAX], ratio[ALT_MAX];
    double t0, t1, t2;
    unsigned int r, half;
    unsigned long i, done, bad;
    bool ok = true;
    void *m;

    if ( rounds > ALT_MAX ) rounds = ALT_MAX;
    if ( pv_stats(PVIOMMU_STATS_RESET | PVIOMMU_STATS_TIMING_OFF, NULL) ) ok = false;
    for ( r = 0; r < rounds; r++ )
    {
        for ( half = 0; half < 2; half++ )
        {
            if ( (half == 0) == (r % 2 == 0) )
            {
                t0 = now();
                m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, n, frames, errs);
                t1 = now();
                for ( i = 0, bad = 0; m && i < n; i++ ) if ( errs[i] ) bad++;
                if ( !m || bad ) ok = false;
                if ( m ) xenforeignmemory_unmap(fmem, m, n);
                t2 = now();
                pm[r] = t1 - t0; pu[r] = t2 - t1;
            }
            else
            {
                bad = 0;
                t0 = now();
                done = pv_map_pages(ctx, domid, frames, n, bfns, NULL, &bad);
                t1 = now();
                pv_unmap_pages(ctx, bfns, done, NULL, NULL, NULL);
                t2 = now();
                if ( done != n || bad ) ok = false;
                vm[r] = t1 - t0; vu[r] = t2 - t1;
            }
        }
        ratio[r] = pm[r] > 0 ? vm[r] / pm[r] : 0;
        printf("MEASURE alternate round=%u first=%s privcmd_map=%.4f pviommu_ctx_map=%.4f ratio=%.3f"
               " privcmd_unmap=%.4f pviommu_ctx_unmap=%.4f\n", r + 1, r % 2 == 0 ? "privcmd" : "pviommu",
               pm[r], vm[r], ratio[r], pu[r], vu[r]);
    }
    if ( !rounds ) return;
    sort_rounds(pm, rounds); sort_rounds(vm, rounds); sort_rounds(ratio, rounds);
    sort_rounds(pu, rounds); sort_rounds(vu, rounds);
    /* The fastest round of each side too: a round only gets slower when
     * something else runs on the host (the other tenants of a shared VM),
     * so the ratio of the minima is the least disturbed comparison. */
    printf("MEASURE alternate_summary rounds=%u ok=%d pages=%lu privcmd_map_median=%.4f"
           " pviommu_ctx_map_median=%.4f map_ratio_median=%.3f map_ratio_min=%.3f map_ratio_max=%.3f"
           " privcmd_map_fastest=%.4f pviommu_ctx_map_fastest=%.4f map_ratio_of_fastest=%.3f"
           " privcmd_unmap_median=%.4f pviommu_ctx_unmap_median=%.4f\n",
           rounds, ok, n, pm[rounds / 2], vm[rounds / 2], ratio[rounds / 2], ratio[0],
           ratio[rounds - 1], pm[0], vm[0], pm[0] > 0 ? vm[0] / pm[0] : 0, pu[rounds / 2],
           vu[rounds / 2]);
}

/* A context of dom0's own where the IOMMU offers them (caps `c`): its
 * number, or 0 (none, or refused). */
static uint32_t own_context_create(const struct pv_iommu_caps *c)
{
    struct pv_iommu_op o;

    memset(&o, 0, sizeof(o));
    o.subop = PVIOMMU_OP_context_create;
    return c->max_contexts > 1 && one_op(&o) == 0 && o.status == 0 ? o.context : 0;
}

static void own_context_destroy(uint32_t ctx)
{
    struct pv_iommu_op o;

    memset(&o, 0, sizeof(o));
    o.subop = PVIOMMU_OP_context_destroy;
    o.context = ctx;
    one_op(&o);
}

/* privcmd's foreign map of frames[0..n) of domid and its unmap, timed:
 * "MEASURE <tag>_map" and "<tag>_unmap" with Xen's perf counters. */
static void privcmd_map_unmap(const char *tag, uint32_t domid, xen_pfn_t *frames,
                              unsigned long n, int *errs)
{
    struct perfc_snap p4, p5;
    unsigned long i, bad;
    double t2, t3, t4;
    void *m;

    perfc_take(&p4);
    t2 = now();
    m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, n, frames, errs);
    t3 = now();
    perfc_take(&p5);
    for ( i = 0, bad = 0; i < n; i++ ) if ( errs[i] ) bad++;
    printf("MEASURE %s_map pages=%lu ok=%d failed=%lu seconds=%.4f ioctls=1",
           tag, n, m != NULL, bad, t3 - t2);
    perfc_print(&p4, &p5);
    printf("\n");
    if ( m )
    {
        perfc_take(&p4);
        t3 = now();
        xenforeignmemory_unmap(fmem, m, n);
        t4 = now();
        perfc_take(&p5);
        printf("MEASURE %s_unmap pages=%lu seconds=%.4f", tag, n, t4 - t3);
        perfc_print(&p4, &p5);
        printf("\n");
    }
}

static int cmd_measure(unsigned long n)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint64_t *bfns = calloc(n, sizeof(*bfns));
    int *errs = calloc(n, sizeof(int));
    struct pv_iommu_caps c;
    uint32_t domid;

    if ( query_caps(&c) == 0 && c.max_batch_ops ) max_ops = c.max_batch_ops < OPS_CAP ? c.max_batch_ops : OPS_CAP;
    domid = make_domain(n, frames);
    printf("measure domid=%u pages=%lu batch=%u\n", domid, n, max_ops);
    pv_map_unmap("pviommu", 0, domid, frames, n, bfns, false);
    pv_map_unmap("pviommu", 0, domid, frames, n, bfns, true);
    /* The same number of pages of a domain given 2 MiB extents, into
     * context 0: the engine writes and clears consecutive BFNs and frames
     * a run at a time, and Xen maps each aligned 2 MiB of a run as one
     * entry (the domain above has none: Xen hands its order-0 frames out
     * in descending order). */
    {
        xen_pfn_t *f2 = calloc(n, sizeof(*f2));
        uint32_t d2 = f2 ? make_domain_2m(n, f2) : (uint32_t)-1;
        if ( d2 != (uint32_t)-1 )
        {
            printf("measure_2m domid=%u pages=%lu first_frame=0x%lx\n", d2, n, (unsigned long)f2[0]);
            pv_map_unmap("pviommu_2m", 0, d2, f2, n, bfns, false);
            pv_map_unmap("pviommu_2m", 0, d2, f2, n, bfns, true);
            /* The same extents, one op each (ABI 1.6). */
            pv_map_unmap("pviommu_2mx", 0, d2, f2, n, bfns, false);
            pv_map_unmap("pviommu_2mx", 0, d2, f2, n, bfns, true);
            /* And into a context of the engine's own, where it writes one
             * superpage entry an extent itself. */
            uint32_t ctx = own_context_create(&c);
            if ( ctx )
            {
                pv_map_unmap("pviommu_ctx2mx", ctx, d2, f2, n, bfns, false);
                pv_map_unmap("pviommu_ctx2mx", ctx, d2, f2, n, bfns, true);
                own_context_destroy(ctx);
            }
            xc_domain_destroy(xch, d2);
        }
        free(f2);
    }
    /* The same pages into a context of the engine's own (its VT-d tables,
     * its flush) where the IOMMU offers one. */
    uint32_t ctx = own_context_create(&c);
    if ( ctx )
    {
        pv_map_unmap("pviommu_ctx", ctx, domid, frames, n, bfns, false);
        pv_map_unmap("pviommu_ctx", ctx, domid, frames, n, bfns, true);
        alternate_with_privcmd(ctx, domid, frames, n, bfns, errs, 11);
        own_context_destroy(ctx);
    }

    /* The stock way: privcmd foreign mapping of the same frames (PV dom0:
     * mmu_update hypercalls from the kernel, counted by Xen). */
    privcmd_map_unmap("privcmd_foreign", domid, frames, n, errs);
    grant_measure(domid, n, frames);

    /* A GPU guest is an HVM guest: the same number of pages of an HVM
     * domain whose RAM is 2 MiB p2m entries, page ops into context 0
     * (runs of pages one p2m walk finds, patch 0006), beside privcmd's
     * map of the same gfns. */
    {
        xen_pfn_t *fh = calloc(n, sizeof(*fh));
        uint32_t dh = fh ? make_hvm_domain_2m(n, fh) : (uint32_t)-1;
        if ( dh != (uint32_t)-1 )
        {
            printf("measure_hvm domid=%u pages=%lu\n", dh, n);
            pv_map_unmap("pviommu_hvm", 0, dh, fh, n, bfns, false);
            pv_map_unmap("pviommu_hvm", 0, dh, fh, n, bfns, true);
            /* The same pages in descending gfn order: no two ops ask for
             * consecutive gfns, but a run's pages of one p2m entry still
             * share its walk (patch 0006: in any order; the breakdown's
             * get_page against the rising runs' above). */
            {
                xen_pfn_t *rev = calloc(n, sizeof(*rev));
                unsigned long k;

                if ( rev )
                {
                    for ( k = 0; k < n; k++ ) rev[k] = fh[n - 1 - k];
                    pv_map_unmap("pviommu_hvm_desc", 0, dh, rev, n, bfns, false);
                    pv_map_unmap("pviommu_hvm_desc", 0, dh, rev, n, bfns, true);
                    free(rev);
                }
            }
            privcmd_map_unmap("privcmd_hvm", dh, fh, n, errs);
            xc_domain_destroy(xch, dh);
        }
        free(fh);
    }
    cmd_destroy(domid, 100);
    return 0;
}

/* ---------------- revocations ---------------- */
/* Acknowledge every queued revocation with OP_revoked_ack, oldest first;
 * print each (bfn, domid, gfn) and how many. */
static int cmd_drain_revoked(void)
{
    struct pv_iommu_op o;
    long rc = 0;
    unsigned long n = 0;
    uint64_t b;
    uint32_t ctx;
    for ( ;; )
    {
        memset(&o, 0, sizeof(o));
        o.subop = PVIOMMU_OP_revoked_next;
        rc = one_op(&o);
        if ( rc || o.status ) break;
        printf("revoked bfn=0x%" PRIx64 " domid=%u gfn=0x%" PRIx64 "\n", o.bfn, o.domid, o.gfn);
        /* a fresh op: revoked_ack takes only context and bfn, the rest must be 0 */
        b = o.bfn; ctx = o.context;
        memset(&o, 0, sizeof(o));
        o.subop = PVIOMMU_OP_revoked_ack; o.context = ctx; o.bfn = b;
        rc = one_op(&o);
        if ( rc || o.status ) break;
        if ( ++n > (1ul << 20) ) break;   /* the queue cannot be this long */
    }
    printf("drain-revoked acked=%lu last_rc=%ld last_status=%d\n", n, rc, o.status);
    return 0;
}

/* ---------------- destroying a domain with many mappings ---------------- */
static uint64_t free_pages(void)
{
    xc_physinfo_t pi;
    memset(&pi, 0, sizeof(pi));
    if ( xc_physinfo(xch, &pi) ) die("xc_physinfo");
    return pi.free_pages;
}

/* Map in batches of max_ops; returns how many mapped, BFNs in bfns[]. */
static unsigned long map_all(uint32_t domid, const xen_pfn_t *frames, unsigned long n,
                             uint64_t *bfns, long *calls, long *batches)
{
    unsigned long done = 0, ok = 0;
    while ( done < n )
    {
        unsigned int k = n - done > max_ops ? max_ops : n - done, j;
        long rc;
        memset(ops, 0, k * sizeof(*ops));
        for ( j = 0; j < k; j++ )
        {
            ops[j].subop = PVIOMMU_OP_map; ops[j].flags = PVIOMMU_F_READ | PVIOMMU_F_WRITE;
            ops[j].domid = domid; ops[j].gfn = frames[done + j];
        }
        rc = run_batch(k, calls);
        (*batches)++;
        for ( j = 0; j < k; j++ )
        {
            bfns[done + j] = ops[j].status ? 0 : ops[j].bfn;
            if ( !ops[j].status ) ok++;
        }
        if ( rc ) { printf("map batch rc=%ld at %lu\n", rc, done); break; }
        done += k;
    }
    return ok;
}

/*
 * A domain holding N mapped pages is destroyed: Xen's domain_kill must give
 * them back in preemptible slices (-ERESTART, continued) and the domain must
 * be freed (a page reference left behind makes it a zombie). Afterwards the
 * revoked BFNs are acknowledged by unmapping them (ESTALE) so the quota is
 * free again for the next check.
 */
static int cmd_bigdestroy(unsigned long n)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint64_t *bfns = calloc(n, sizeof(*bfns));
    xc_domaininfo_t info;
    struct pv_iommu_caps c;
    uint32_t domid;
    unsigned long mapped, i, hist[4] = { 0 };
    uint64_t free0, free1 = 0;
    long calls = 0, batches = 0, used0, used_mapped, used_after;
    int gone = 0, dying = 0;
    double t0, t1, t2 = 0;

    if ( !frames || !bfns ) die("calloc");
    op_bufs();
    if ( query_caps(&c) == 0 && c.max_batch_ops ) max_ops = c.max_batch_ops < OPS_CAP ? c.max_batch_ops : OPS_CAP;
    used0 = c.used;
    free0 = free_pages();
    domid = make_domain(n, frames);
    mapped = map_all(domid, frames, n, bfns, &calls, &batches);
    query_caps(&c); used_mapped = c.used;

    t0 = now();
    if ( xc_domain_destroy(xch, domid) ) die("xc_domain_destroy");
    t1 = now();
    for ( i = 0; i < 3000; i++ )   /* up to 60 s */
    {
        int r = xc_domain_getinfolist(xch, domid, 1, &info);
        if ( r < 1 || info.domain != domid ) { gone = 1; t2 = now(); break; }
        dying = !!(info.flags & XEN_DOMINF_dying);
        usleep(20000);
    }
    /* Freed pages come back through an RCU callback: poll a little. */
    for ( i = 0; i < 250; i++ )
    {
        free1 = free_pages();
        if ( free1 + 64 >= free0 ) break;
        usleep(20000);
    }
    /* Acknowledge the revocations: unmap every BFN the domain held. */
    for ( i = 0; i < n; )
    {
        unsigned int k = 0, j;
        while ( i < n && k < max_ops )
        {
            if ( bfns[i] )
            {
                memset(&ops[k], 0, sizeof(ops[k]));
                ops[k].subop = PVIOMMU_OP_unmap; ops[k].bfn = bfns[i]; k++;
            }
            i++;
        }
        if ( !k ) continue;
        run_batch(k, NULL);
        for ( j = 0; j < k; j++ )
            hist[ops[j].status == -116 ? 0 : ops[j].status == -2 ? 1 : ops[j].status == 0 ? 2 : 3]++;
    }
    query_caps(&c); used_after = c.used;
    printf("MEASURE destroy_mapped pages=%lu mapped=%lu map_batches=%ld destroy_call_seconds=%.4f freed_seconds=%.4f\n",
           n, mapped, batches, t1 - t0, gone ? t2 - t0 : -1.0);
    printf("bigdestroy domid=%u mapped=%lu used_before=%ld used_mapped=%ld %s dying=%d"
           " free_before=%" PRIu64 " free_after=%" PRIu64 " free_delta=%" PRId64
           " unmap_estale=%lu unmap_enoent=%lu unmap_ok=%lu unmap_other=%lu used_after=%ld\n",
           domid, mapped, used0, used_mapped, gone ? "gone" : "zombie", dying, free0, free1,
           (int64_t)(free1 - free0), hist[0], hist[1], hist[2], hist[3], used_after);
    return 0;
}

/* One map of (domid, gfn) with `flags` through the batch path: its status
 * (the hypercall's error if the batch itself failed); the BFN in *bfn when
 * it succeeded. */
static int map_one(uint32_t domid, xen_pfn_t gfn, uint32_t flags, uint64_t *bfn)
{
    long rc;
    memset(&ops[0], 0, sizeof(ops[0]));
    ops[0].subop = PVIOMMU_OP_map; ops[0].flags = flags;
    ops[0].domid = domid; ops[0].gfn = gfn;
    rc = run_batch(1, NULL);
    *bfn = 0;
    if ( rc < 0 ) return (int)rc;
    if ( !ops[0].status ) *bfn = ops[0].bfn;
    return ops[0].status;
}

/* One unmap of `bfn` in context 0: its status (or the hypercall's error). */
static int unmap_one(uint64_t bfn)
{
    long rc;
    memset(&ops[0], 0, sizeof(ops[0]));
    ops[0].subop = PVIOMMU_OP_unmap; ops[0].bfn = bfn;
    rc = run_batch(1, NULL);
    return rc < 0 ? (int)rc : ops[0].status;
}

/*
 * Log-dirty mode over an HVM domain whose N pages dom0 maps writable (and
 * its first page also read-only). A device write bypasses the dirty log, so
 * Xen's paging_log_dirty_enable() calls pviommu_log_dirty_enabled(), which
 * must revoke every writable mapping of the domain, within the enable
 * domctl (caps.revoked rises by N across it), and no read-only one (its
 * unmap afterwards answers 0, not ESTALE); each revoked BFN is acknowledged
 * by an unmap answered ESTALE. While the mode is on a writable map is
 * refused (EACCES: the domain uses shadow paging, so the page's p2m type
 * stays ram_rw and the refusal is the glue's log-dirty test, not a type's)
 * and a read-only one is not; once it is off, writable maps work again.
 * Then the domain is destroyed and must be freed, and dom0's BFNs in use
 * are back where they started. The enable is timed with the N pages mapped
 * and again with nothing of the domain mapped: the difference is the hook's
 * revocations, done in one go.
 */
/*
 * The slices Xen's console reports for d's last log-dirty revocation
 * ("pviommu: dN log-dirty: writable mappings revoked in N slices"), read
 * from Xen's console ring (xl is not in dom0's PATH when this runs); -1 if
 * none.
 */
static long console_log_dirty_slices(uint32_t domid)
{
    static char ring[1 << 20];
    unsigned int size = sizeof(ring) - 1;
    char key[64];
    const char *p;
    long slices = -1;

    if ( xc_readconsolering(xch, ring, &size, 0, 0, NULL) )
        return -1;
    ring[size] = '\0';
    snprintf(key, sizeof(key), "pviommu: d%u log-dirty: writable mappings revoked in ", domid);
    for ( p = strstr(ring, key); p; p = strstr(p + 1, key) )
        slices = strtol(p + strlen(key), NULL, 10);
    return slices;
}

/*
 * xen-log: Xen's console ring (what `xl dmesg` prints; xl is not in dom0's
 * PATH for most of init.sh), up to its last MiB, on stdout.
 */
static int cmd_xen_log(void)
{
    static char ring[1 << 20];
    unsigned int size = sizeof(ring) - 1;

    if ( xc_readconsolering(xch, ring, &size, 0, 0, NULL) )
    {
        printf("error=%d\n", -errno);
        return 1;
    }
    fwrite(ring, 1, size, stdout);
    return 0;
}

static int cmd_logdirty(unsigned long n)
{
    xen_pfn_t *frames = calloc(n, sizeof(*frames));
    uint64_t *bfns = calloc(n, sizeof(*bfns));
    struct pv_iommu_caps c;
    xc_domaininfo_t info;
    uint32_t domid;
    unsigned long mapped, i, estale = 0, other = 0;
    long calls = 0, batches = 0;
    uint64_t used0, revoked0, revoked1, ro_bfn, rw_bfn, ro_keep_bfn;
    int on_rc, ro_keep, rw_on, ro_on, ro_unmap, ro_keep_unmap, off_rc, rw_off, rw_unmap, on2_rc, off2_rc;
    int gone;
    long slices;
    double t0, t1, t2, t3;

    if ( !frames || !bfns ) die("calloc");
    op_bufs();
    if ( query_caps(&c) || !c.max_batch_ops ) die("query_caps");
    max_ops = c.max_batch_ops < OPS_CAP ? c.max_batch_ops : OPS_CAP;
    used0 = c.used;
    domid = make_hvm_domain(n, frames);
    /* Paging domctls refuse a domain without vCPU 0 (paging_domctl: EINVAL). */
    if ( xc_domain_max_vcpus(xch, domid, 1) ) { xc_domain_destroy(xch, domid); die("xc_domain_max_vcpus"); }
    mapped = map_all(domid, frames, n, bfns, &calls, &batches);
    ro_keep = map_one(domid, frames[0], PVIOMMU_F_READ, &ro_keep_bfn);

    query_caps(&c); revoked0 = c.revoked;
    t0 = now();
    on_rc = xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, NULL, 0) ? -errno : 0;
    t1 = now();
    slices = console_log_dirty_slices(domid);
    query_caps(&c); revoked1 = c.revoked;
    rw_on = map_one(domid, frames[0], PVIOMMU_F_READ | PVIOMMU_F_WRITE, &rw_bfn);
    if ( rw_bfn ) unmap_one(rw_bfn);
    ro_on = map_one(domid, frames[1 % n], PVIOMMU_F_READ, &ro_bfn);
    ro_unmap = ro_bfn ? unmap_one(ro_bfn) : 1;
    ro_keep_unmap = ro_keep_bfn ? unmap_one(ro_keep_bfn) : 1;
    /* Every writable mapping was revoked: each unmap acknowledges one. */
    for ( i = 0; i < n; i++ )
        if ( bfns[i] )
        {
            if ( unmap_one(bfns[i]) == -ESTALE ) estale++; else other++;
        }
    off_rc = xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_OFF, NULL, 0) ? -errno : 0;
    rw_off = map_one(domid, frames[0], PVIOMMU_F_READ | PVIOMMU_F_WRITE, &rw_bfn);
    rw_unmap = rw_bfn ? unmap_one(rw_bfn) : 1;

    /* The same enable with nothing of the domain mapped. */
    t2 = now();
    on2_rc = xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, NULL, 0) ? -errno : 0;
    t3 = now();
    off2_rc = xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_OFF, NULL, 0) ? -errno : 0;

    /* Freed once its pages' references are all back (no zombie). */
    gone = destroy_and_wait(domid, 500, &info) == 1;   /* up to 10 s */
    query_caps(&c);

    printf("logdirty domid=%u slices=%ld pages=%lu mapped=%lu ro_kept=%d on_rc=%d revoked_in_enable=%" PRIu64
           " rw_while_on=%d ro_while_on=%d ro_unmap=%d ro_kept_unmap=%d estale=%lu other=%lu off_rc=%d"
           " rw_after_off=%d rw_unmap=%d on2_rc=%d off2_rc=%d freed=%d used_back=%d\n",
           domid, slices, n, mapped, ro_keep, on_rc, revoked1 - revoked0, rw_on, ro_on, ro_unmap, ro_keep_unmap,
           estale, other, off_rc, rw_off, rw_unmap, on2_rc, off2_rc, gone, c.used == used0);
    printf("MEASURE logdirty_enable pages=%lu mapped=%lu seconds_mapped=%.4f seconds_nothing_mapped=%.4f\n",
           n, mapped, t1 - t0, t3 - t2);
    free(frames); free(bfns);
    return 0;
}

/* ---------------- hostile-input fuzzer ---------------- */
/*
 * Random commands, batch headers and op arrays, including garbage guest
 * addresses, from dom0 or from an unprivileged domU. Every answer must be
 * one of the ABI's errnos (or 0, or 1 = incomplete for a batch); from an
 * unprivileged caller nothing may succeed. In dom0 the fuzzer keeps a model
 * of what its successful maps and unmaps should have left (BFN -> domain,
 * gfn, references), checks it against lookups and caps.used, and writes it to
 * /tmp/fuzz.state for `pviommu list` and `fuzz-clean`.
 *
 * Bad pointers never name memory of the caller that is mapped: Xen would
 * read or write it on the caller's behalf (a PV kernel's addresses are
 * reachable from a hypercall). They are the NULL page, non-canonical
 * addresses, the range Xen reserves for itself (a hole in Linux as well, so
 * also unmapped in a PVH domU) and a PROT_NONE guard page after the fuzz
 * buffer; structures that straddle into the guard page test partial copies.
 */
static uint64_t rs;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }
static int chance(unsigned int pct) { return below(100) < pct; }

#define FZ_BUF (2 * PAGE)          /* fuzz buffer; a PROT_NONE page follows */
#define FZ_SENTINEL 0x7eadbeef     /* status no hypervisor writes */
#define FZ_MODEL 8192
#define FZ_STATE "/tmp/fuzz.state"

struct fz_map { uint32_t ctx; uint16_t domid; uint64_t bfn, gfn; long refs; };
static struct fz_map model[FZ_MODEL];
static unsigned int nmodel;
static uint32_t fz_ctx[64];
static unsigned int nctx;
static unsigned long violations;

static void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void violation(const char *fmt, ...)
{
    va_list ap;
    if ( violations++ < 8 )
    {
        va_start(ap, fmt);
        printf("fuzz violation: ");
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
    }
}

static int abi_errno(long e)
{
    static const int ok[] = { 0, -1, -2, -3, -5, -6, -7, -11, -12, -13, -14, -16, -18, -19,
                              -22, -28, -95, -99, -116 };
    unsigned int i;
    for ( i = 0; i < sizeof(ok) / sizeof(ok[0]); i++ ) if ( e == ok[i] ) return 1;
    return 0;
}

static struct fz_map *model_find(uint32_t ctx, uint64_t bfn)
{
    unsigned int i;
    for ( i = 0; i < nmodel; i++ )
        if ( model[i].bfn == bfn && model[i].ctx == ctx && model[i].refs > 0 ) return &model[i];
    return NULL;
}

static uint8_t *fz_buf, *fz_guard;
static uint64_t win_start, win_end;

static uint64_t bad_addr(void)
{
    static const uint64_t fixed[] = {
        0, 1, 0xff8,                 /* NULL page */
        0x0000800000000000ull,       /* first non-canonical address */
        0x8000000000000000ull,       /* non-canonical */
        0xffff800000000000ull,       /* Xen's reserved range (PV guests cannot reach it) */
        0xffff82d040000000ull,       /* Xen's text, inside that range */
    };
    if ( chance(40) ) return (uint64_t)(uintptr_t)fz_guard + below(PAGE);
    return fixed[below(sizeof(fixed) / sizeof(fixed[0]))];
}

/* A pointer for a structure of `size` bytes: valid, straddling the guard, or bad. */
static uint64_t some_ptr(size_t size, int pct_valid)
{
    if ( chance(pct_valid) ) return (uint64_t)(uintptr_t)(fz_buf + below(FZ_BUF - size + 1));
    if ( chance(50) ) return (uint64_t)(uintptr_t)(fz_guard - 1 - below(size - 1));
    return bad_addr();
}

static uint16_t fz_domid(const uint16_t *cand, unsigned int ncand)
{
    static const uint16_t special[] = { 0, 0x7ff0, 0x7ff1, 0x7ff2, 0x7ff3, 0x7ff4, 0x7fff, 0xffff };
    if ( ncand && chance(75) ) return cand[below(ncand)];
    if ( chance(70) ) return special[below(sizeof(special) / sizeof(special[0]))];
    return rnd();
}

static uint64_t fz_bfn(void)
{
    if ( nmodel && chance(45) ) return model[below(nmodel)].bfn;
    if ( chance(55) ) return win_start + below(8192);
    switch ( below(4) )
    {
    case 0: return 0;
    case 1: return win_start - 1;
    case 2: return win_end - below(2);
    default: return rnd();
    }
}

/* One random op in *o (status = sentinel, so untouched ops are recognisable). */
static void fz_op(struct pv_iommu_op *o, const uint16_t *cand, unsigned int ncand,
                  const xen_pfn_t *gfns, unsigned long ngfns)
{
    /* weights: unmaps outnumber maps so that references drain to zero now
     * and then and BFNs are freed and handed out again */
    static const uint16_t subops[] = { 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                       3, 3, 4, 5, 6, 7, 8, 9, 0, 99, 0xffff };
    memset(o, 0, sizeof(*o));
    o->subop = chance(95) ? subops[below(sizeof(subops) / sizeof(subops[0]))] : rnd();
    o->flags = chance(85) ? 1 + below(3) : chance(50) ? (rnd() & 0x7ff) : rnd();
    if ( chance(3) ) o->flags |= PVIOMMU_F_GRANT;
    o->context = chance(85) ? 0 : (nctx && chance(50)) ? fz_ctx[below(nctx)] : chance(50) ? below(8) : rnd();
    o->domid = fz_domid(cand, ncand);
    if ( ngfns && chance(75) ) o->gfn = gfns[below(ngfns)];
    else o->gfn = chance(50) ? below(0x100000) : rnd();
    o->bfn = fz_bfn();
    if ( chance(80) )
    {
        /* well-formed for its subop (unused fields 0), so that unmap, lookup
         * and the revocation ops get past parsing and change state too */
        switch ( o->subop )
        {
        case PVIOMMU_OP_map: o->bfn = 0; break;
        case PVIOMMU_OP_unmap: case PVIOMMU_OP_lookup: case PVIOMMU_OP_revoked_ack:
            o->flags = 0; o->domid = 0; o->gfn = 0; break;
        case PVIOMMU_OP_context_create: case PVIOMMU_OP_revoked_next:
            o->context = 0; /* fall through */
        case PVIOMMU_OP_context_destroy:
            o->flags = 0; o->domid = 0; o->gfn = 0; o->bfn = 0; break;
        case PVIOMMU_OP_context_attach: case PVIOMMU_OP_context_detach:
            o->flags = 0; o->domid = 0; o->bfn = 0; break;
        }
    }
    /* Devices: only segments no host has (ENODEV), never one of the test's
     * edu devices or the chipset's, which later checks and dom0 itself use. */
    if ( o->subop == PVIOMMU_OP_context_attach || o->subop == PVIOMMU_OP_context_detach )
        o->gfn = chance(80) ? (0x10000 | below(0x10000)) : (rnd() | (1ull << 32));
    if ( chance(3) ) o->_pad0 = rnd();
    if ( chance(3) ) o->notice = rnd();
    o->status = FZ_SENTINEL;
}

/* What a processed op tells the model (dom0) or must never say (domU). */
static void fz_account(const struct pv_iommu_op *o, int refused_only, unsigned long *stats)
{
    struct fz_map *m;
    if ( o->status == FZ_SENTINEL ) return;
    if ( !abi_errno(o->status) ) violation("op subop=%u status=%d not an ABI errno", o->subop, o->status);
    if ( o->status ) return;
    if ( refused_only ) { violation("unprivileged op subop=%u succeeded", o->subop); return; }
    switch ( o->subop )
    {
    case PVIOMMU_OP_map:
        stats[0]++;
        if ( o->bfn < win_start || o->bfn >= win_end )
            violation("map returned bfn 0x%" PRIx64 " outside the window", o->bfn);
        if ( (m = model_find(o->context, o->bfn)) )
        {
            if ( m->domid != o->domid || m->gfn != o->gfn )
                violation("bfn 0x%" PRIx64 " handed out for d%u:0x%" PRIx64 " while live for d%u:0x%" PRIx64,
                          o->bfn, o->domid, o->gfn, m->domid, m->gfn);
            m->refs++;
        }
        else
        {
            /* a slot whose references are all gone, or a new one */
            unsigned int k;
            for ( k = 0; k < nmodel && model[k].refs > 0; k++ ) ;
            if ( k == nmodel && nmodel < FZ_MODEL ) nmodel++;
            if ( k < nmodel ) model[k] = (struct fz_map){ o->context, o->domid, o->bfn, o->gfn, 1 };
            else violation("fuzz model full");
        }
        break;
    case PVIOMMU_OP_unmap:
        stats[1]++;
        if ( !(m = model_find(o->context, o->bfn)) )
            violation("unmap of bfn 0x%" PRIx64 " the fuzzer never mapped succeeded", o->bfn);
        else
            m->refs--;
        break;
    case PVIOMMU_OP_context_create:
        if ( nctx < 64 ) fz_ctx[nctx++] = o->context;
        break;
    case PVIOMMU_OP_context_destroy:
    {
        /* ids are reused: forget the destroyed one (fuzz-clean destroys
         * the rest) */
        unsigned int k;
        for ( k = 0; k < nctx && fz_ctx[k] != o->context; k++ ) ;
        if ( k < nctx ) fz_ctx[k] = fz_ctx[--nctx];
        else violation("destroy of context %u the fuzzer never created succeeded", o->context);
        break;
    }
    default:
        break;
    }
}

static long fz_call(unsigned int cmd, uint64_t arg, long *hypercalls)
{
    privcmd_hypercall_t h = { __HYPERVISOR_pv_iommu_op, { cmd, arg } };
    long r;
    if ( pfd < 0 && (pfd = open("/dev/xen/privcmd", O_RDWR)) < 0 ) die("open privcmd");
    (*hypercalls)++;
    r = ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h);
    return r < 0 ? -errno : r;
}

/* One random batch hypercall (re-issued while it answers "incomplete"). */
static void fz_batch(struct pv_iommu_batch *hdr_page, int refused_only, long *hc,
                     const uint16_t *cand, unsigned int ncand, const xen_pfn_t *gfns,
                     unsigned long ngfns, unsigned long *stats)
{
    struct pv_iommu_batch *hdr = hdr_page;
    struct pv_iommu_op *o;
    uint64_t hdr_addr = (uint64_t)(uintptr_t)hdr_page, ops_addr;
    unsigned int cap, nr, i, nvalid;
    long rc;
    int spin = 0;

    /* where the ops live: buffer start, or ending across the guard page */
    if ( chance(90) ) { o = (struct pv_iommu_op *)fz_buf; cap = FZ_BUF / sizeof(*o); }
    else
    {
        cap = 1 + below(8);
        o = (struct pv_iommu_op *)(fz_guard - cap * sizeof(*o) + sizeof(*o) / 2);
        cap--;                      /* the last one straddles the guard */
    }
    ops_addr = (uint64_t)(uintptr_t)o;
    switch ( below(20) )
    {
    case 0: nr = 0; break;
    case 1: nr = max_ops + below(3); break;
    case 2: nr = rnd(); break;
    case 3: nr = cap + 1 + below(4); break;
    case 4: case 5: case 6: nr = 9 + below(56); break;
    default: nr = 1 + below(8); break;
    }
    nvalid = nr < cap ? nr : cap;
    for ( i = 0; i < nvalid; i++ ) fz_op(&o[i], cand, ncand, gfns, ngfns);
    if ( chance(5) ) ops_addr = bad_addr();
    memset(hdr, 0, sizeof(*hdr));
    hdr->version = chance(93) ? PVIOMMU_INTERFACE_VERSION : chance(40) ? 0x00010000u : (uint32_t)rnd();
    hdr->nr_ops = nr;
    hdr->nr_done = chance(90) ? 0 : chance(50) ? below((uint64_t)nr + 2) : (uint32_t)rnd();
    hdr->flags = chance(95) ? 0 : rnd();
    hdr->ops = ops_addr;
    if ( chance(4) ) hdr_addr = some_ptr(sizeof(*hdr), 0);   /* header itself bad */
    do rc = fz_call(PVIOMMU_CMD_batch, hdr_addr, hc);
    while ( rc == PVIOMMU_BATCH_INCOMPLETE && ++spin < 10000 );
    if ( !abi_errno(rc) ) violation("batch rc=%ld not an ABI errno", rc);
    if ( refused_only && rc >= 0 ) violation("unprivileged batch rc=%ld", rc);
    if ( ops_addr == (uint64_t)(uintptr_t)o )
        for ( i = 0; i < nvalid; i++ ) fz_account(&o[i], refused_only, stats);
}

static int cmd_fuzz(int argc, char **argv)
{
    unsigned long n = strtoul(argv[0], NULL, 0), i, stats[2] = { 0 }, live = 0, refs = 0, mism = 0;
    uint16_t cand[16];
    unsigned int ncand = 0;
    int refused_only = 0, a;
    xen_pfn_t gfns[32];
    unsigned long ngfns = 0;
    uint32_t fdom = 0;
    struct pv_iommu_caps c;
    struct pv_iommu_batch *hdr;
    long hc = 0, rc, used0 = -1, used1 = -1;
    double t0, t1;
    uint64_t bmin = ~0ull, bmax = 0;
    FILE *f;

    rs = strtoull(argv[1], NULL, 0) * 2654435761u + 1;
    for ( a = 2; a < argc; a++ )
    {
        if ( !strcmp(argv[a], "-u") ) refused_only = 1;
        else if ( ncand < 16 ) cand[ncand++] = strtoul(argv[a], NULL, 0);
    }
    /* fuzz buffer: FZ_BUF bytes, then a PROT_NONE page (unmapped for Xen too) */
    fz_buf = locked_buf(FZ_BUF + PAGE);
    fz_guard = fz_buf + FZ_BUF;
    if ( mprotect(fz_guard, PAGE, PROT_NONE) ) die("mprotect");
    hdr = locked_buf(PAGE);
    rc = query_caps(&c);
    win_start = rc ? 0x100000 : c.bfn_window_start;
    win_end = rc ? 0x8000000 : c.bfn_window_end;
    if ( rc == 0 && c.max_batch_ops ) max_ops = c.max_batch_ops;
    if ( rc == 0 ) used0 = c.used;
    if ( !refused_only )
    {
        /* dom0: a fresh 32-page domain of the fuzzer's own is the main target */
        open_xc();
        ngfns = 32;
        fdom = make_domain(ngfns, gfns);
        for ( a = 0; a < 3 && ncand < 16; a++ )
            cand[ncand++] = fdom;    /* three entries: mostly this domain */
    }

    t0 = now();
    for ( i = 0; i < n; i++ )
    {
        unsigned int what = below(100);
        if ( what < 80 )
            fz_batch(hdr, refused_only, &hc, cand, ncand, gfns, ngfns, stats);
        else if ( what < 90 )
        {
            /* query_caps into a valid, straddling or bad buffer */
            uint64_t p = some_ptr(sizeof(struct pv_iommu_caps), 60);
            rc = fz_call(PVIOMMU_CMD_query_caps, p, &hc);
            if ( !abi_errno(rc) || rc > 0 ) violation("query_caps rc=%ld", rc);
            if ( refused_only && rc == 0 ) violation("unprivileged query_caps succeeded");
        }
        else if ( what < 95 )
        {
            /* reserved_regions: random window into the table, entries at a random place */
            struct pv_iommu_regions *r = (struct pv_iommu_regions *)hdr;
            uint64_t p = (uint64_t)(uintptr_t)r;
            memset(r, 0, sizeof(*r));
            r->version = chance(90) ? PVIOMMU_INTERFACE_VERSION : rnd();
            r->start = chance(80) ? below(4) : rnd();
            r->nr = chance(80) ? below(FZ_BUF / sizeof(struct pv_iommu_region)) : rnd();
            r->regions = some_ptr(sizeof(struct pv_iommu_region), 70);
            if ( chance(5) ) p = some_ptr(sizeof(*r), 0);
            rc = fz_call(PVIOMMU_CMD_reserved_regions, p, &hc);
            if ( !abi_errno(rc) || rc > 0 ) violation("reserved_regions rc=%ld", rc);
            if ( refused_only && rc == 0 ) violation("unprivileged reserved_regions succeeded");
        }
        else
        {
            /* an unknown or random command with a random argument */
            unsigned int cmd = chance(50) ? below(16) : rnd();
            uint64_t p = chance(50) ? (uint64_t)(uintptr_t)fz_buf : bad_addr();
            /* the known ones are fuzzed above; set_limits (4) is left out:
             * a valid random call would change a domain's quota for real */
            if ( cmd >= 1 && cmd <= 4 ) cmd += 8;
            rc = fz_call(cmd, p, &hc);
            if ( cmd == PVIOMMU_CMD_stats )
            {
                /* random stats requests: an ABI errno or success, and
                 * never success for a caller that is not the toolstack */
                if ( rc > 0 || (rc < 0 && !abi_errno(rc)) ) violation("stats rc=%ld", rc);
                if ( refused_only && rc == 0 ) violation("unprivileged stats succeeded");
            }
            else if ( !abi_errno(rc) || rc >= 0 ) violation("cmd %u rc=%ld", cmd, rc);
        }
    }
    t1 = now();

    /* The model against the hypervisor: every live BFN looks up as recorded. */
    for ( i = 0; i < nmodel; i++ )
    {
        struct pv_iommu_op o;
        if ( model[i].refs <= 0 ) continue;
        live++; refs += model[i].refs;
        if ( model[i].bfn < bmin ) bmin = model[i].bfn;
        if ( model[i].bfn > bmax ) bmax = model[i].bfn;
        memset(&o, 0, sizeof(o));
        o.subop = PVIOMMU_OP_lookup; o.context = model[i].ctx; o.bfn = model[i].bfn;
        rc = one_op(&o);
        if ( rc || o.status || o.domid != model[i].domid || o.gfn != model[i].gfn )
        {
            mism++;
            if ( mism <= 4 ) printf("fuzz lookup bfn=0x%" PRIx64 " rc=%ld status=%d d%u:0x%" PRIx64 " (model d%u:0x%" PRIx64 ")\n",
                                    model[i].bfn, rc, o.status, o.domid, o.gfn, model[i].domid, model[i].gfn);
        }
    }
    if ( query_caps(&c) == 0 ) used1 = c.used;
    if ( !refused_only )
    {
        if ( !(f = fopen(FZ_STATE, "w")) ) die("fopen state");
        fprintf(f, "domain %u\n", fdom);
        for ( i = 0; i < nmodel; i++ )
            if ( model[i].refs > 0 )
                fprintf(f, "map %u 0x%" PRIx64 " %u 0x%" PRIx64 " %ld\n", model[i].ctx,
                        model[i].bfn, model[i].domid, model[i].gfn, model[i].refs);
        for ( i = 0; i < nctx; i++ ) fprintf(f, "ctx %u\n", fz_ctx[i]);
        fclose(f);
    }
    printf("MEASURE fuzz_%s calls=%lu hypercalls=%ld seconds=%.2f us_per_call=%.1f\n",
           refused_only ? "unprivileged" : "dom0", n, hc, t1 - t0, (t1 - t0) * 1e6 / (hc ? hc : 1));
    printf("fuzz calls=%lu maps_ok=%lu unmaps_ok=%lu live=%lu refs=%lu contexts=%u"
           " lookup_mismatch=%lu used_before=%ld used_after=%ld bfn_min=%" PRIu64
           " bfn_max=%" PRIu64 " violations=%lu\n", n, stats[0], stats[1], live, refs, nctx,
           mism, used0, used1, live ? bmin : 0, live ? bmax : 0, violations);
    return 0;
}

/* Undo what FZ_STATE records: each BFN unmapped refs times (live until the
 * last), contexts destroyed, the fuzzer's domain destroyed. */
static int cmd_fuzz_clean(void)
{
    FILE *f = fopen(FZ_STATE, "r");
    char line[256];
    unsigned long unmapped = 0, errors = 0;
    uint32_t fdom = 0;
    struct pv_iommu_caps c;
    long used = -1;
    int gone = 0;
    uint32_t ctxs[64];
    unsigned int nctxs = 0, i;

    if ( !f ) die("fopen state");
    while ( fgets(line, sizeof line, f) )
    {
        unsigned int ctx, domid;
        uint64_t bfn, gfn;
        long refs, k;
        struct pv_iommu_op o;
        if ( sscanf(line, "domain %u", &fdom) == 1 ) continue;
        if ( sscanf(line, "ctx %u", &ctx) == 1 )
        {
            /* destroyed once their mappings are gone (EBUSY before) */
            if ( nctxs < 64 ) ctxs[nctxs++] = ctx;
            continue;
        }
        if ( sscanf(line, "map %u %" SCNx64 " %u %" SCNx64 " %ld", &ctx, &bfn, &domid, &gfn, &refs) != 5 )
            continue;
        for ( k = 0; k < refs; k++ )
        {
            memset(&o, 0, sizeof(o));
            o.subop = PVIOMMU_OP_unmap; o.context = ctx; o.bfn = bfn;
            if ( one_op(&o) || o.status ) { errors++; break; }
            unmapped++;
            memset(&o, 0, sizeof(o));
            o.subop = PVIOMMU_OP_lookup; o.context = ctx; o.bfn = bfn;
            one_op(&o);
            /* live until its last reference is dropped, gone after */
            if ( (k + 1 < refs) != (o.status == 0) ) errors++;
        }
    }
    fclose(f);
    for ( i = 0; i < nctxs; i++ )
    {
        struct pv_iommu_op o = { .subop = PVIOMMU_OP_context_destroy, .context = ctxs[i] };
        if ( one_op(&o) || o.status ) errors++;
    }
    if ( query_caps(&c) == 0 ) used = c.used;
    if ( fdom ) gone = cmd_destroy(fdom, 100) == 0;
    printf("fuzz-clean unmapped=%lu errors=%lu used=%ld domain=%s\n", unmapped, errors, used,
           gone ? "gone" : "zombie");
    return 0;
}

/* ---------------- xenstore hand-offs between dom0 and the domU ---------------- */
static int cmd_xs_write(const char *path, const char *val)
{
    struct xs_handle *h = xs_open(0);
    int ok = h && xs_write(h, XBT_NULL, path, val, strlen(val));
    printf("xs-write %s=%s %s\n", path, val, ok ? "ok" : "failed");
    if ( h ) xs_close(h);
    return !ok;
}

/* Poll PATH (relative paths are under the caller's /local/domain/<id>). */
static int cmd_xs_wait(const char *path, unsigned int seconds)
{
    struct xs_handle *h = xs_open(0);
    unsigned int i, len;
    char *v;
    if ( !h ) { printf("xs-wait open failed errno=%d\n", errno); return 1; }
    for ( i = 0; i < seconds * 10; i++ )
    {
        if ( (v = xs_read(h, XBT_NULL, path, &len)) )
        {
            printf("%s\n", v);
            free(v); xs_close(h);
            return 0;
        }
        usleep(100000);
    }
    xs_close(h);
    printf("xs-wait %s timeout\n", path);
    return 1;
}

/*
 * Every name in Xen's symbol table as dom0 reads them (XENPF_get_symbol,
 * what Linux's /proc/xen/xensyms does). Xen expands each name into a buffer
 * of KSYM_NAME_LEN + 1 (128) bytes without a bound, here and in every stack
 * trace it prints (%pS), so no name may be longer than 127 bytes; the
 * engine's long Rust names were (lib/engine-symbols.sh). Prints
 * "symbols=N longest=L pviommu=P engine=E name=<the longest>" (E: the
 * engine's local names, rust_engine_<hash>#...).
 */
static int cmd_xen_symbols(void)
{
    struct xen_platform_op *op = locked_buf(PAGE);
    char *name = locked_buf(PAGE);
    char longest_name[PAGE];
    unsigned int n = 0, longest = 0, ours = 0, engine = 0;
    uint32_t symnum = 0;

    longest_name[0] = '\0';
    if ( pfd < 0 && (pfd = open("/dev/xen/privcmd", O_RDWR)) < 0 ) die("open privcmd");
    for ( ;; )
    {
        privcmd_hypercall_t h = { __HYPERVISOR_platform_op, { (uint64_t)(uintptr_t)op } };
        uint32_t len;

        memset(op, 0, sizeof(*op));
        memset(name, 0, PAGE);
        op->cmd = XENPF_get_symbol;
        op->interface_version = XENPF_INTERFACE_VERSION;
        op->u.symdata.namelen = PAGE - 1;
        op->u.symdata.symnum = symnum;
        set_xen_guest_handle_raw(op->u.symdata.name, name);
        if ( ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h) < 0 )
        {
            printf("error=%d symbols=%u\n", -errno, n);
            return 1;
        }
        if ( !name[0] || op->u.symdata.symnum == symnum || n > 1000000 )
            break;
        symnum = op->u.symdata.symnum;
        n++;
        len = strlen(name);
        if ( strstr(name, "pviommu") || strstr(name, "rust_engine") )
            ours++;
        /* The engine's local names (their file symbol renamed). */
        if ( !strncmp(name, "rust_engine_", 12) )
            engine++;
        if ( len > longest )
        {
            longest = len;
            snprintf(longest_name, sizeof(longest_name), "%s", name);
        }
    }
    printf("symbols=%u longest=%u pviommu=%u engine=%u name=%s\n",
           n, longest, ours, engine, longest_name);
    return 0;
}

static int cmd_caps(void)
{
    struct pv_iommu_caps c;
    unsigned long maxram = 0;
    long rc = query_caps(&c);
    xc_maximum_ram_page(xch, &maxram);
    printf("caps rc=%ld version=0x%08x window_start=0x%" PRIx64 " window_end=0x%" PRIx64
           " ram_end=0x%lx max_batch_ops=%u nr_reserved=%u translation=%u\n", rc, c.version,
           c.bfn_window_start, c.bfn_window_end, maxram, c.max_batch_ops,
           c.nr_reserved_regions, c.translation);
    /* dom0 boots with dom0-iommu=strict: its context must translate BFNs */
    return !(rc == 0 && c.version == PVIOMMU_INTERFACE_VERSION && c.translation == PVIOMMU_TRANSLATES &&
             c.bfn_window_start >= maxram && c.bfn_window_start >= 0x100000 &&
             c.bfn_window_end > c.bfn_window_start);
}

static int cmd_unpopulate(uint32_t domid, xen_pfn_t gfn)
{
    int r = xc_domain_decrease_reservation_exact(xch, domid, 1, 0, &gfn);
    printf("unpopulate rc=%d\n", r ? -errno : 0);
    return r ? 1 : 0;
}

/* ---------------- a guest GPU driver's PPGTT (issue 11) ---------------- */
/*
 * ppgtt-setup BIG lays out, in a fresh paused PV domain, what a guest's GPU
 * driver would: a Gen8 4-level PPGTT (PML4, PDP, PD, page tables) and
 * buffers of known bytes, entries in the format of
 * guest-driver/src/shadow/ppgtt_format.rs (bit 0 present, bit 1 writable,
 * bits 47:12 the guest frame; for a PV guest the frame is its MFN).
 * Frame i of the domain is f[i]: f0 PML4, f1 PDP, f2 PD, f3 PT for GMA
 * 0-2 MiB, f4 PT for 2-4 MiB, f5.. PTs of the big buffer at 16 MiB;
 * buffers from f32. Past them, a 2 MiB extent of the domain (populated
 * with order 9: one aligned machine run) mapped as one 2 MiB page at GMA
 * 8 MiB (PD entry 4, bit 7 set), texture 'E', the way a guest driver uses
 * 2 MiB GPU pages: "ext_pages=512", or "ext_pages=0" when Xen has no
 * such extent to give. ppgtt-edit then edits it as the guest would.
 */
#define PG_STATE "/tmp/ppgtt.state"
#define PG_PTE_P 1ULL
#define PG_PTE_RW 2ULL
#define PG_FIRST_BUF 32
#define PG_BIG_FIRST 48
#define PG_BIG_GMA 0x1000000ULL
#define PG_MAX_BIG_PTS 27
#define PG_BAD_FRAME 0x7ffff00ULL   /* ~512 GiB: beyond the 2 GiB of host RAM */
#define PG_EXT_GMA 0x800000ULL       /* the 2 MiB page: PD entry 4 */
#define PG_PDE_PS 0x80ULL
struct pg_buf { char tag; uint64_t gma; unsigned int first, pages; };
static const struct pg_buf pg_bufs[] = {
    { 'A', 0x000000, 32, 2 },   /* ring */
    { 'B', 0x010000, 34, 3 },   /* batch: moved to f42..f44 by ppgtt-edit */
    { 'C', 0x200000, 37, 4 },   /* texture, in the second page table */
    { 'D', 0x3ff000, 41, 1 },   /* cursor, last entry of that table */
};
#define PG_B_MOVED 42

static void pg_fill(uint8_t *page, char tag, unsigned int i, unsigned int gen)
{
    unsigned int o;
    for ( o = 0; o < PAGE; o++ )
        page[o] = (uint8_t)(tag * 7 + i * 13 + gen * 101 + o * 5 + (o >> 8));
    snprintf((char *)page, 32, "pviommu buffer %c%u gen%u", tag, i, gen);
}

static void pg_entry(uint8_t *map, unsigned int table, unsigned int idx, uint64_t value)
{
    memcpy(map + (size_t)table * PAGE + idx * 8, &value, 8);
}

static void pg_print(char tag, unsigned int i, uint64_t gma, xen_pfn_t gfn, const uint8_t *page)
{
    printf("page tag=%c i=%u gma=0x%" PRIx64 " gfn=0x%lx sum=%08x\n", tag, i, gma,
           (unsigned long)gfn, fnv(page, DMA_LEN));
}

static int pg_load(uint32_t *domid, unsigned long *n, xen_pfn_t **frames)
{
    FILE *f = fopen(PG_STATE, "r");
    unsigned long i;
    if ( !f || fscanf(f, "%u %lu", domid, n) != 2 ) { fprintf(stderr, "no " PG_STATE "\n"); return -1; }
    *frames = calloc(*n, sizeof(**frames));
    for ( i = 0; i < *n; i++ )
        if ( fscanf(f, "%lx", &(*frames)[i]) != 1 ) { fclose(f); return -1; }
    fclose(f);
    return 0;
}

static int cmd_ppgtt_setup(unsigned long big)
{
    unsigned long nbigpt = (big + 511) / 512, n = PG_BIG_FIRST + big, i;
    unsigned int b, k;
    xen_pfn_t *f, ext = 0;
    uint32_t domid;
    uint8_t *m;
    int *errs, have_ext;
    FILE *st;
    if ( nbigpt > PG_MAX_BIG_PTS ) { fprintf(stderr, "BIG too large\n"); return 2; }
    f = calloc(n, sizeof(*f)); errs = calloc(n > 512 ? n : 512, sizeof(int));
    domid = create_pv_domain(n + 512);
    for ( i = 0; i < n; i++ ) f[i] = i;
    if ( xc_domain_populate_physmap_exact(xch, domid, n, 0, 0, f) ) die("populate");
    have_ext = !xc_domain_populate_physmap_exact(xch, domid, 1, 9, 0, &ext);
    if ( !have_ext ) printf("populate 2M extent: errno=%d\n", errno);
    m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, n, f, errs);
    if ( !m ) die("xenforeignmemory_map ppgtt");
    memset(m, 0, n * PAGE);
    pg_entry(m, 0, 0, (f[1] << 12) | PG_PTE_P | PG_PTE_RW);       /* PML4[0] -> PDP */
    pg_entry(m, 1, 0, (f[2] << 12) | PG_PTE_P | PG_PTE_RW);       /* PDP[0]  -> PD */
    pg_entry(m, 2, 0, (f[3] << 12) | PG_PTE_P | PG_PTE_RW);       /* PD[0]   -> PT 0-2M */
    pg_entry(m, 2, 1, (f[4] << 12) | PG_PTE_P | PG_PTE_RW);       /* PD[1]   -> PT 2-4M */
    printf("domid=%u\nroot=0x%lx\npt0=0x%lx\npt1=0x%lx\n", domid, (unsigned long)f[0],
           (unsigned long)f[3], (unsigned long)f[4]);
    for ( b = 0; b < sizeof(pg_bufs) / sizeof(pg_bufs[0]); b++ )
        for ( k = 0; k < pg_bufs[b].pages; k++ )
        {
            const struct pg_buf *p = &pg_bufs[b];
            uint64_t gma = p->gma + (uint64_t)k * PAGE;
            unsigned int fi = p->first + k;
            pg_fill(m + (size_t)fi * PAGE, p->tag, k, 0);
            pg_entry(m, 3 + (unsigned int)(gma >> 21), (gma >> 12) & 511,
                     (f[fi] << 12) | PG_PTE_P | PG_PTE_RW);
            pg_print(p->tag, k, gma, f[fi], m + (size_t)fi * PAGE);
        }
    for ( i = 0; i < nbigpt; i++ )
        pg_entry(m, 2, 8 + i, (f[5 + i] << 12) | PG_PTE_P | PG_PTE_RW);
    /* Two entries a buggy or hostile guest driver could write, both naming
     * a frame beyond host RAM (not the guest's): a PD entry (GMA 6 MiB)
     * pointing at it as a page table, and a leaf (GMA 0x3f4000) mapping it.
     * The shadow must leave both non-present and say why. */
    pg_entry(m, 2, 3, (PG_BAD_FRAME << 12) | PG_PTE_P | PG_PTE_RW);
    pg_entry(m, 4, 500, (PG_BAD_FRAME << 12) | PG_PTE_P | PG_PTE_RW);
    printf("bad_frame=0x%llx bad_table_gma=0x600000 bad_leaf_gma=0x3f4000\n", PG_BAD_FRAME);
    for ( i = 0; i < big; i++ )
    {
        uint64_t gma = PG_BIG_GMA + i * PAGE;
        pg_fill(m + (size_t)(PG_BIG_FIRST + i) * PAGE, 'F', i, 0);
        /* read-only for the device: a guest's texture */
        pg_entry(m, 5 + i / 512, i % 512, (f[PG_BIG_FIRST + i] << 12) | PG_PTE_P);
        if ( i == 0 || i == big - 1 )
            pg_print('F', i, gma, f[PG_BIG_FIRST + i], m + (size_t)(PG_BIG_FIRST + i) * PAGE);
    }
    printf("leaves=%lu tables=%lu\n", 10 + big, 5 + nbigpt);
    xenforeignmemory_unmap(fmem, m, n);
    if ( have_ext )
    {
        xen_pfn_t ef[512];
        uint8_t *em, *pd;
        uint64_t pde = (ext << 12) | PG_PTE_P | PG_PTE_RW | PG_PDE_PS;
        for ( k = 0; k < 512; k++ ) ef[k] = ext + k;
        em = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, 512, ef, errs);
        if ( !em ) die("xenforeignmemory_map 2M page");
        for ( k = 0; k < 512; k++ ) pg_fill(em + (size_t)k * PAGE, 'E', k, 0);
        pg_print('E', 0, PG_EXT_GMA, ext, em);
        pg_print('E', 511, PG_EXT_GMA + 511 * PAGE, ext + 511, em + 511 * PAGE);
        xenforeignmemory_unmap(fmem, em, 512);
        pd = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, 1, &f[2], errs);
        if ( !pd ) die("xenforeignmemory_map PD");
        pg_entry(pd, 0, (unsigned int)(PG_EXT_GMA >> 21), pde);
        xenforeignmemory_unmap(fmem, pd, 1);
    }
    printf("ext_pages=%d\n", have_ext ? 512 : 0);
    if ( !(st = fopen(PG_STATE, "w")) ) die(PG_STATE);
    fprintf(st, "%u %lu\n", domid, n);
    for ( i = 0; i < n; i++ ) fprintf(st, "%lx\n", (unsigned long)f[i]);
    fclose(st);
    free(f); free(errs);
    return 0;
}

/* The guest moves buffer B to other frames (new bytes there) and unmaps
 * page 1 of buffer A: one table page (f3) changes, 3 leaves new, 4 gone. */
static int cmd_ppgtt_edit(void)
{
    uint32_t domid; unsigned long n; xen_pfn_t *f;
    xen_pfn_t pick[4];
    int errs[4];
    uint8_t *m;
    unsigned int k;
    if ( pg_load(&domid, &n, &f) ) return 2;
    pick[0] = f[3]; pick[1] = f[PG_B_MOVED]; pick[2] = f[PG_B_MOVED + 1]; pick[3] = f[PG_B_MOVED + 2];
    m = xenforeignmemory_map(fmem, domid, PROT_READ | PROT_WRITE, 4, pick, errs);
    if ( !m || errs[0] || errs[1] || errs[2] || errs[3] ) die("map for ppgtt-edit");
    for ( k = 0; k < 3; k++ )
    {
        uint64_t gma = pg_bufs[1].gma + (uint64_t)k * PAGE;
        pg_fill(m + (size_t)(1 + k) * PAGE, 'B', k, 1);
        pg_entry(m, 0, (gma >> 12) & 511, (pick[1 + k] << 12) | PG_PTE_P | PG_PTE_RW);
        pg_print('B', k, gma, pick[1 + k], m + (size_t)(1 + k) * PAGE);
    }
    pg_entry(m, 0, 1, 0);
    printf("removed gma=0x1000\nchanged=0x%lx\n", (unsigned long)f[3]);
    xenforeignmemory_unmap(fmem, m, 4);
    free(f);
    return 0;
}

int main(int argc, char **argv)
{
    const char *c = argc >= 2 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if ( argc < 2 ) { fprintf(stderr, "usage: see source\n"); return 2; }
    /* Commands a domU runs must not need libxenctrl's privileged interfaces. */
    if ( !strcmp(c, "hc") || !strcmp(c, "hypercall") ) return cmd_hc(argc - 2, argv + 2);
    if ( !strcmp(c, "xs-write") && argc >= 4 ) return cmd_xs_write(argv[2], argv[3]);
    if ( !strcmp(c, "xs-wait") && argc >= 4 ) return cmd_xs_wait(argv[2], strtoul(argv[3], NULL, 0));
    if ( !strcmp(c, "fuzz") && argc >= 4 ) return cmd_fuzz(argc - 2, argv + 2);
    if ( !strcmp(c, "drain-revoked") ) return cmd_drain_revoked();
    open_xc();
    if ( !strcmp(c, "caps") ) return cmd_caps();
    if ( !strcmp(c, "xen-symbols") ) return cmd_xen_symbols();
    if ( !strcmp(c, "mkdom") && argc >= 3 ) return cmd_mkdom(strtoul(argv[2], NULL, 0), 0);
    if ( !strcmp(c, "run2m") )
        return cmd_run2m(argc >= 3 ? strtoul(argv[2], NULL, 0) : 0,
                         argc >= 4 && !strcmp(argv[3], "extent"));
    if ( !strcmp(c, "hvmrun") ) return cmd_hvmrun(argc > 2 && !strcmp(argv[2], "falling"));
    if ( !strcmp(c, "perfc") ) return cmd_perfc();
    if ( !strcmp(c, "unmaprun") && argc >= 4 )
        return cmd_unmaprun(strtoull(argv[2], NULL, 0), strtoul(argv[3], NULL, 0),
                            argc >= 5 ? strtoul(argv[4], NULL, 0) : 0);
    if ( !strcmp(c, "mkhvm") && argc >= 3 ) return cmd_mkdom(strtoul(argv[2], NULL, 0), 1);
    if ( !strcmp(c, "settarget") && argc >= 4 ) return cmd_settarget(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0));
    if ( !strcmp(c, "peek") && argc >= 4 ) return cmd_peek(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0), 0);
    if ( !strcmp(c, "match") && argc >= 4 ) return cmd_peek(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0), 1);
    if ( !strcmp(c, "unpopulate") && argc >= 4 ) return cmd_unpopulate(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
    if ( !strcmp(c, "logdirty") && argc >= 3 ) return cmd_logdirty(strtoul(argv[2], NULL, 0));
    if ( !strcmp(c, "xen-log") ) return cmd_xen_log();
    if ( !strcmp(c, "rmphysmap") && argc >= 4 ) return cmd_rmphysmap(strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
    if ( !strcmp(c, "destroy") && argc >= 3 ) return cmd_destroy(strtoul(argv[2], NULL, 0), argc >= 4 ? atoi(argv[3]) : 100);
    if ( !strcmp(c, "ppgtt-setup") && argc >= 3 ) return cmd_ppgtt_setup(strtoul(argv[2], NULL, 0));
    if ( !strcmp(c, "ppgtt-edit") ) return cmd_ppgtt_edit();
    if ( !strcmp(c, "assign") && argc >= 4 )
    {
        uint32_t sbdf = parse_sbdf(argv[2]);
        int r;
        if ( sbdf == ~0u ) return 2;
        r = xc_assign_device(xch, strtoul(argv[3], NULL, 0), sbdf, XEN_DOMCTL_DEV_RDM_RELAXED);
        printf("rc=%d\n", r ? -errno : 0);
        return 0;
    }
    if ( !strcmp(c, "reclaim") && argc >= 3 )
    {
        /* out of quarantine, back to dom0 (xl pci-assignable-remove) */
        uint32_t sbdf = parse_sbdf(argv[2]);
        int r;
        if ( sbdf == ~0u ) return 2;
        r = xc_deassign_device(xch, DOMID_IO, sbdf);
        printf("rc=%d\n", r ? -errno : 0);
        return 0;
    }
    if ( !strcmp(c, "dma-read") && argc >= 3 ) { edu_open(); return cmd_dma_read(strtoull(argv[2], NULL, 0)); }
    if ( !strcmp(c, "dma-write") && argc >= 4 ) { edu_open(); return cmd_dma_write(strtoull(argv[2], NULL, 0), strtoul(argv[3], NULL, 0)); }
    if ( !strcmp(c, "measure") && argc >= 3 ) return cmd_measure(strtoul(argv[2], NULL, 0));
    if ( !strcmp(c, "bigdestroy") && argc >= 3 ) return cmd_bigdestroy(strtoul(argv[2], NULL, 0));
    if ( !strcmp(c, "fuzz-clean") ) return cmd_fuzz_clean();
    fprintf(stderr, "bad command\n");
    return 2;
}
