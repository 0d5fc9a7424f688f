/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dom0-test.c -- the dom0 half of the Xen 4.17 arm64 test (the CI fallback
 * of issue 13, run.sh): hypercall 43 through /dev/xen/privcmd's raw
 * IOCTL_PRIVCMD_HYPERCALL, no libxc. Static aarch64 program, run by the
 * initramfs' /init.
 *
 *   dom0-test DOMU_ID DOMU_GFN PATTERN RAM_END_PFN
 *
 * Xen runs with pviommu=dom0-p2m: context 0 of dom0 is dom0's own stage-2
 * p2m, written by Xen at gfn = BFN (no SMMU here: no device walks it; the
 * CPU does, which is how the bytes are checked). DOMU_ID is a dom0less
 * domU (domu-arm64.S) whose page DOMU_GFN holds words PATTERN ^ i.
 *
 * Prints "PVIOMMU-417: PASS|FAIL name detail" per check,
 * "PVIOMMU-417: KEY n after-..." before each debug-key dump it asks Xen for
 * (sysctl debug_keys DUMP_KEY; Xen numbers its dumps, run.sh reads dump n from
 * Xen's log), "PVIOMMU-417: MAPPED bfn=.. domid=.. gfn=.." for run.sh,
 * and "PVIOMMU-417: N passed, N failed". Exit status 0 iff none failed.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <sys/wait.h>

/* privcmd hypercalls, locked buffers, check(), op1(): shared with
 * hypervisor-side/xen/arm64/pviommu-dom0-arm64.c */
#define DOM0_TAG "PVIOMMU-417"
#include "dom0-privcmd.h"

#define HYPERVISOR_sysctl 35
/* Xen 4.17's public/sysctl.h */
#define XEN_SYSCTL_INTERFACE_VERSION 0x00000015
#define XEN_SYSCTL_debug_keys 7
struct xen_sysctl_debug_keys_417 {
    uint32_t cmd;
    uint32_t interface_version;
    uint64_t keys;      /* XEN_GUEST_HANDLE_64(const_char) */
    uint32_t nr_keys;
    uint8_t pad[124];   /* the union is 128 bytes */
};

#define HYPERVISOR_domctl 36
/* Xen 4.17's public/domctl.h */
#define XEN_DOMCTL_INTERFACE_VERSION 0x00000015
#define XEN_DOMCTL_destroydomain 2
#define XEN_DOMCTL_getdomaininfo 5
#define XEN_DOMINF_dying 1u
struct xen_domctl_417 {
    uint32_t cmd;
    uint32_t interface_version;
    uint16_t domain;
    uint16_t _pad[3];
    union {
        struct {
            uint16_t domain;
            uint16_t pad1;
            uint32_t flags;     /* XEN_DOMINF_* */
            uint64_t tot_pages;
        } getdomaininfo;
        uint8_t pad[128];
    } u;
};

static struct xen_sysctl_debug_keys_417 *gsys;
static char *gkeys;

/* Xen's debug key PVX_DUMP_KEY of pviommu-arm.c (pviommu=dom0-p2m): dumps
 * dom0's p2m entries in the BFN range PV-IOMMU wrote, numbered by Xen; n is
 * our count, run.sh checks they agree. run.sh passes -DDUMP_KEY="'c'" from
 * pviommu-arm.c's #define; a key nobody registered is silently ignored by
 * Xen (rc 0), and run.sh then finds no dump. */
#ifndef DUMP_KEY
#define DUMP_KEY 'B'
#endif
static void debug_key(unsigned int n, const char *when)
{
    long rc;

    printf("PVIOMMU-417: KEY %u %s\n", n, when);
    fflush(stdout);
    memset(gsys, 0, sizeof(*gsys));
    gsys->cmd = XEN_SYSCTL_debug_keys;
    gsys->interface_version = XEN_SYSCTL_INTERFACE_VERSION;
    gkeys[0] = DUMP_KEY;
    gsys->keys = (uint64_t)(uintptr_t)gkeys;
    gsys->nr_keys = 1;
    rc = raw_hcall(HYPERVISOR_sysctl, (uint64_t)(uintptr_t)gsys, 0);
    check(rc == 0, "debug-key", "dump %u (%s): sysctl debug_keys '%c' rc=%ld", n, when,
          DUMP_KEY, rc);
}

static struct xen_domctl_417 *gdom;

static long domctl(uint32_t cmd, uint16_t domid)
{
    memset(gdom, 0, sizeof(*gdom));
    gdom->cmd = cmd;
    gdom->interface_version = XEN_DOMCTL_INTERFACE_VERSION;
    gdom->domain = domid;
    return raw_hcall(HYPERVISOR_domctl, (uint64_t)(uintptr_t)gdom, 0);
}

/* Reads the 4 KiB at frame bfn through /dev/mem (dom0's CPU, through the
 * same stage-2 p2m entry Xen wrote). Returns words equal to the pattern. */
static int read_bfn_here(uint64_t bfn, uint64_t pattern, uint64_t *first)
{
    int fd = open("/dev/mem", O_RDONLY | O_SYNC);
    volatile uint64_t *w;
    int ok = 0;

    if ( fd < 0 )
        return -errno;
    w = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, (off_t)(bfn * PAGE));
    if ( w == MAP_FAILED )
    {
        ok = -errno;
        close(fd);
        return ok;
    }
    *first = w[0];
    for ( unsigned int i = 0; i < PAGE / 8; i++ )
        if ( w[i] == (pattern ^ i) )
            ok++;
    munmap((void *)w, PAGE);
    close(fd);
    return ok;
}

/*
 * The read, in a child: with no p2m entry at the BFN the access faults
 * (Xen injects an abort, Linux kills the reader); the test goes on and
 * reports it. Returns words equal to the pattern, or -1000 - signal.
 */
static int read_bfn(uint64_t bfn, uint64_t pattern, uint64_t *first)
{
    struct { int n; uint64_t first; } r = { -999, 0 };
    int p[2], status = 0;
    pid_t pid;

    if ( pipe(p) )
        return -errno;
    fflush(stdout);
    pid = fork();
    if ( pid < 0 )
        return -errno;
    if ( pid == 0 )
    {
        close(p[0]);
        r.n = read_bfn_here(bfn, pattern, &r.first);
        _exit(write(p[1], &r, sizeof(r)) == sizeof(r) ? 0 : 1);
    }
    close(p[1]);
    if ( read(p[0], &r, sizeof(r)) != sizeof(r) )
        r.n = -999;
    close(p[0]);
    waitpid(pid, &status, 0);
    if ( WIFSIGNALED(status) )
        r.n = -1000 - WTERMSIG(status);
    *first = r.first;
    return r.n;
}

int main(int argc, char **argv)
{
    struct pv_iommu_caps *caps;
    struct pv_iommu_regions *rq;
    struct pv_iommu_region *regs;
    uint64_t ram_end, own, bfn = 0, first = 0, pattern;
    unsigned int domu, keyn = 0;
    uint64_t domu_gfn;
    long rc;
    int st, n;
    void *own_page;

    if ( argc != 5 )
    {
        fprintf(stderr, "usage: %s DOMU_ID DOMU_GFN PATTERN RAM_END_PFN\n", argv[0]);
        return 2;
    }
    domu = strtoul(argv[1], NULL, 0);
    domu_gfn = strtoull(argv[2], NULL, 0);
    pattern = strtoull(argv[3], NULL, 0);
    ram_end = strtoull(argv[4], NULL, 0);
    printf("=== pviommu arm64 4.17 dom0 test start ===\n");
    fflush(stdout);

    pfd = open("/dev/xen/privcmd", O_RDWR);
    if ( pfd < 0 )
    {
        check(0, "privcmd", "open /dev/xen/privcmd: %s", strerror(errno));
        goto out;
    }
    caps = locked_buf(PAGE);
    rq = locked_buf(PAGE);
    regs = locked_buf(PAGE);
    gb = locked_buf(PAGE);
    gop = locked_buf(PAGE);
    gsys = locked_buf(PAGE);
    gkeys = locked_buf(PAGE);
    own_page = locked_buf(PAGE);
    gdom = locked_buf(PAGE);

    /* 1. caps: context 0 translates (dom0-p2m), no contexts of its own */
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)caps);
    printf("PVIOMMU-417: caps rc=%ld version=%#x max_batch_ops=%u page_sizes=%#" PRIx64
           " window=[%#" PRIx64 ",%#" PRIx64 ") nr_reserved=%u features=%#x max_contexts=%u"
           " translation=%u quota=%" PRIu64 " used=%" PRIu64 "\n",
           rc, caps->version, caps->max_batch_ops, caps->page_sizes,
           caps->bfn_window_start, caps->bfn_window_end, caps->nr_reserved_regions,
           caps->features, caps->max_contexts, caps->translation, caps->quota, caps->used);
    check(rc == 0 && caps->version == PVIOMMU_INTERFACE_VERSION, "caps",
          "rc=%ld version=%#x (want %#x)", rc, caps->version, PVIOMMU_INTERFACE_VERSION);
    check(caps->translation == PVIOMMU_TRANSLATES, "caps-translation",
          "translation=%u (want %u: pviommu=dom0-p2m, context 0 is dom0's p2m)",
          caps->translation, PVIOMMU_TRANSLATES);
    check(!(caps->features & PVIOMMU_FEAT_CONTEXTS) && caps->max_contexts == 1,
          "caps-no-contexts", "features=%#x max_contexts=%u (no SMMU; none in dom0-p2m mode)",
          caps->features, caps->max_contexts);
    check(caps->bfn_window_start >= ram_end && caps->bfn_window_end > caps->bfn_window_start,
          "caps-window", "[%#" PRIx64 ",%#" PRIx64 ") above RAM end %#" PRIx64,
          caps->bfn_window_start, caps->bfn_window_end, ram_end);

    /* 2. reserved regions */
    rq->version = PVIOMMU_INTERFACE_VERSION;
    rq->nr = PAGE / sizeof(*regs);
    rq->regions = (uint64_t)(uintptr_t)regs;
    rc = hcall(PVIOMMU_CMD_reserved_regions, (uint64_t)(uintptr_t)rq);
    check(rc == 0 && rq->total == caps->nr_reserved_regions && rq->nr == rq->total,
          "reserved-regions", "rc=%ld total=%u written=%u", rc, rq->total, rq->nr);
    for ( unsigned int i = 0; rc == 0 && i < rq->nr && i < 16; i++ )
        printf("PVIOMMU-417: region %#" PRIx64 "+%#" PRIx64 " kind %u\n",
               regs[i].start_bfn, regs[i].nr_frames, regs[i].kind);

    /* 3. bad input, refused with its errno */
    rc = hcall(77, (uint64_t)(uintptr_t)caps);
    check(rc == -EOPNOTSUPP, "bad-unknown-cmd", "rc=%ld (want %d)", rc, -EOPNOTSUPP);
    rc = hcall(PVIOMMU_CMD_query_caps, 0x10);
    check(rc == -EFAULT, "bad-caps-buffer", "rc=%ld (want %d)", rc, -EFAULT);
    memset(gb, 0, sizeof(*gb));
    gb->version = 0x1234;
    gb->nr_ops = 1;
    gb->ops = (uint64_t)(uintptr_t)gop;
    rc = hcall(PVIOMMU_CMD_batch, (uint64_t)(uintptr_t)gb);
    check(rc == -EINVAL, "bad-batch-version", "rc=%ld (want %d)", rc, -EINVAL);
    own = frame_of(own_page);
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, 0, own, 0);
    check(st == -EINVAL, "bad-map-own-page-ctx0",
          "status=%d (want %d: dom0's own gfn %#" PRIx64 " is in its context 0 already)",
          st, -EINVAL, own);
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, 100, domu_gfn, 0);
    check(st == -ESRCH, "bad-map-no-domain", "status=%d (want %d)", st, -ESRCH);
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ | 0x80, domu, domu_gfn, 0);
    check(st == -EINVAL, "bad-map-flags", "status=%d (want %d)", st, -EINVAL);
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, domu, 0x10, 0);
    check(st == -ENXIO, "bad-map-gfn-not-present",
          "status=%d (want %d: d%u has no gfn 0x10)", st, -ENXIO, domu);
    st = op1(PVIOMMU_OP_unmap, 0, 0, 0, 0, caps->bfn_window_start);
    check(st == -ENOENT, "bad-unmap-not-mapped", "status=%d (want %d)", st, -ENOENT);

    /* 4. the map: the domU's known page into dom0's context 0 */
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, domu, domu_gfn, 0);
    bfn = gop->bfn;
    check(st == 0 && bfn >= caps->bfn_window_start && bfn < caps->bfn_window_end,
          "map-domu-page-ctx0", "status=%d d%u gfn %#" PRIx64 " -> bfn %#" PRIx64 " (read-only)",
          st, domu, domu_gfn, bfn);
    if ( st != 0 )
        goto out;
    printf("PVIOMMU-417: MAPPED bfn=%#" PRIx64 " domid=%u gfn=%#" PRIx64 "\n", bfn, domu, domu_gfn);
    st = op1(PVIOMMU_OP_lookup, 0, 0, 0, 0, bfn);
    check(st == 0 && gop->domid == domu && gop->gfn == domu_gfn, "lookup",
          "status=%d bfn %#" PRIx64 " -> d%u gfn %#" PRIx64, st, bfn, gop->domid, gop->gfn);
    n = read_bfn(bfn, pattern, &first);
    if ( n <= -1000 )
        check(0, "read-at-bfn", "dom0's read of bfn %#" PRIx64 " through its p2m (/dev/mem) faulted (signal %d)",
              bfn, -1000 - n);
    else
        check(n == PAGE / 8, "read-at-bfn",
              "dom0 reads bfn %#" PRIx64 " through its p2m (/dev/mem): %d of %d words are d%u's known words (first %#" PRIx64 ")",
              bfn, n, PAGE / 8, domu, first);
    debug_key(++keyn, "after-map");

    /* 5. unmap, and it is gone */
    st = op1(PVIOMMU_OP_unmap, 0, 0, 0, 0, bfn);
    check(st == 0, "unmap", "status=%d bfn %#" PRIx64, st, bfn);
    debug_key(++keyn, "after-unmap");
    st = op1(PVIOMMU_OP_lookup, 0, 0, 0, 0, bfn);
    check(st == -ENOENT, "lookup-after-unmap", "status=%d (want %d)", st, -ENOENT);
    st = op1(PVIOMMU_OP_unmap, 0, 0, 0, 0, bfn);
    check(st == -ENOENT, "unmap-again", "status=%d (want %d)", st, -ENOENT);
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)caps);
    check(rc == 0 && caps->used == 0, "caps-used-after-unmap", "rc=%ld used=%" PRIu64 " (want 0)",
          rc, caps->used);

    /*
     * 6. the domU dies with a page mapped (read-write): Xen's teardown hook
     * revokes the BFN (dom0's p2m entry goes, the page reference is
     * dropped), dom0 gets a revocation notice, and the domain is freed.
     */
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ | PVIOMMU_F_WRITE, domu, domu_gfn, 0);
    bfn = gop->bfn;
    check(st == 0, "map-domu-page-rw", "status=%d d%u gfn %#" PRIx64 " -> bfn %#" PRIx64 " (read-write)",
          st, domu, domu_gfn, bfn);
    if ( st != 0 )
        goto out;
    printf("PVIOMMU-417: MAPPED-RW bfn=%#" PRIx64 " domid=%u gfn=%#" PRIx64 "\n", bfn, domu, domu_gfn);
    debug_key(++keyn, "after-map-rw");
    rc = domctl(XEN_DOMCTL_destroydomain, domu);
    check(rc == 0, "destroy-domu", "domctl destroydomain d%u rc=%ld, with bfn %#" PRIx64 " mapped",
          domu, rc, bfn);
    debug_key(++keyn, "after-destroy");
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)caps);
    check(rc == 0 && caps->revoked == 1 && caps->used == 1, "caps-revoked",
          "rc=%ld revoked=%" PRIu64 " used=%" PRIu64 " (want 1 and 1: the BFN stays reserved until acknowledged)",
          rc, caps->revoked, caps->used);
    memset(gop, 0, sizeof(*gop));
    st = op1(PVIOMMU_OP_revoked_next, 0, 0, 0, 0, 0);
    check(st == 0 && gop->bfn == bfn && gop->domid == domu && gop->gfn == domu_gfn,
          "revoked-next", "status=%d bfn %#" PRIx64 " d%u gfn %#" PRIx64 " (want bfn %#" PRIx64 " d%u gfn %#" PRIx64 ")",
          st, gop->bfn, gop->domid, gop->gfn, bfn, domu, domu_gfn);
    /* ABI 1.4: the same notice asked of its context (skip 0); none after it */
    memset(gop, 0, sizeof(*gop));
    st = op1(PVIOMMU_OP_revoked_next, 0, PVIOMMU_REVOKED_IN_CONTEXT, 0, 0, 0);
    check(st == 0 && gop->bfn == bfn && gop->domid == domu && gop->gfn == domu_gfn,
          "revoked-next-in-context", "status=%d bfn %#" PRIx64 " d%u gfn %#" PRIx64 " (want bfn %#" PRIx64 " d%u gfn %#" PRIx64 ")",
          st, gop->bfn, gop->domid, gop->gfn, bfn, domu, domu_gfn);
    st = op1(PVIOMMU_OP_revoked_next, 0, PVIOMMU_REVOKED_IN_CONTEXT, 0, 1, 0);
    check(st == -ENOENT, "revoked-next-in-context-skip-1", "status=%d (want %d: one notice)", st, -ENOENT);
    st = op1(PVIOMMU_OP_revoked_next, 0, PVIOMMU_REVOKED_IN_CONTEXT, 0, PVIOMMU_REVOKED_MAX_SKIP + 1, 0);
    check(st == -EINVAL, "revoked-next-skip-past-bound", "status=%d (want %d)", st, -EINVAL);
    /* ABI 1.5: the notice's number; an ack naming another number is
     * refused and leaves the notice queued */
    st = op1(PVIOMMU_OP_revoked_next, 0, PVIOMMU_REVOKED_IN_CONTEXT | PVIOMMU_REVOKED_NUMBERED, 0, 0, 0);
    uint64_t number = gop->notice;
    check(st == 0 && gop->bfn == bfn && number != 0, "revoked-next-numbered",
          "status=%d bfn %#" PRIx64 " notice %" PRIu64 " (want bfn %#" PRIx64 ", a number from 1)",
          st, gop->bfn, number, bfn);
    st = op1_notice(PVIOMMU_OP_revoked_ack, 0, PVIOMMU_REVOKED_NUMBERED, 0, 0, bfn, number + 1);
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)caps);
    check(st == -ENOENT && rc == 0 && caps->revoked == 1, "revoked-ack-other-number",
          "status=%d revoked=%" PRIu64 " (want %d and 1: not that notice, still queued)",
          st, caps->revoked, -ENOENT);
    st = op1(PVIOMMU_OP_unmap, 0, 0, 0, 0, bfn);
    check(st == -ESTALE, "unmap-revoked", "status=%d (want %d: acknowledged)", st, -ESTALE);
    rc = hcall(PVIOMMU_CMD_query_caps, (uint64_t)(uintptr_t)caps);
    check(rc == 0 && caps->revoked == 0 && caps->used == 0, "caps-after-ack",
          "rc=%ld revoked=%" PRIu64 " used=%" PRIu64 " (want 0 and 0)", rc, caps->revoked, caps->used);
    /* freed: not even a dying (zombie) domain is left with its id */
    for ( n = 0; n < 50; n++ )
    {
        rc = domctl(XEN_DOMCTL_getdomaininfo, domu);
        if ( rc == -ESRCH || (rc == 0 && gdom->u.getdomaininfo.domain != domu) )
            break;
        usleep(100000);
    }
    check(rc == -ESRCH || (rc == 0 && gdom->u.getdomaininfo.domain != domu), "domu-freed",
          "getdomaininfo d%u rc=%ld after %d polls%s", domu, rc, n,
          rc == 0 && gdom->u.getdomaininfo.domain == domu
              ? ((gdom->u.getdomaininfo.flags & XEN_DOMINF_dying) ? " (still dying: a page reference is held)" : " (alive)")
              : " (gone)");
    st = op1(PVIOMMU_OP_map, 0, PVIOMMU_F_READ, domu, domu_gfn, 0);
    check(st == -ESRCH, "map-after-destroy", "status=%d (want %d)", st, -ESRCH);

out:
    printf("PVIOMMU-417: %d passed, %d failed\n", passed, failed);
    printf("=== pviommu arm64 4.17 dom0 test end ===\n");
    fflush(stdout);
    return failed ? 1 : 0;
}
