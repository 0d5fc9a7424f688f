/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * dom0-privcmd.h -- what the arm64 dom0 test programs share: hypercalls
 * through /dev/xen/privcmd's raw IOCTL_PRIVCMD_HYPERCALL (no libxc, so the
 * programs link statically with nothing but libc), buffers Xen can copy
 * to and from, and the PASS/FAIL lines the test scripts count.
 *
 * Used by pviommu-dom0-arm64.c (test-arm64.sh, Xen 4.21) and
 * tests/xen-qemu-arm64/dom0-test.c (the Xen 4.17 test in CI); each is one
 * translation unit, so everything here is static. Before including it,
 * define DOM0_TAG, the prefix of every result line ("PVIOMMU-417").
 */
#ifndef PVIOMMU_DOM0_PRIVCMD_H
#define PVIOMMU_DOM0_PRIVCMD_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pviommu.h"

#ifndef DOM0_TAG
#error "define DOM0_TAG (the result lines' prefix) before including dom0-privcmd.h"
#endif

typedef struct { uint64_t op; uint64_t arg[5]; } privcmd_hypercall_t;
#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(privcmd_hypercall_t))
#define PAGE 4096

/* pfd: /dev/xen/privcmd, opened by main(); passed/failed: check()'s count. */
static int pfd = -1, passed, failed;

/* One result line, "DOM0_TAG: PASS|FAIL name detail", counted. */
static void check(int ok, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void check(int ok, const char *name, const char *fmt, ...)
{
    va_list ap;

    printf(DOM0_TAG ": %s %s ", ok ? "PASS" : "FAIL", name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    ok ? passed++ : failed++;
}

/* Any hypercall with two arguments: its return value, or -errno. */
static inline long raw_hcall(uint64_t op, uint64_t a0, uint64_t a1)
{
    privcmd_hypercall_t h = { op, { a0, a1 } };
    long r = ioctl(pfd, IOCTL_PRIVCMD_HYPERCALL, &h);

    return r < 0 ? -errno : r;
}

/* Hypercall 43: PV-IOMMU command cmd on the guest buffer at arg. */
static inline long hcall(unsigned int cmd, uint64_t arg)
{
    return raw_hcall(__HYPERVISOR_pv_iommu_op, cmd, arg);
}

/* Locked, populated, zeroed: the hypervisor's copies never fault on it. */
static inline void *locked_buf(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);

    if ( p == MAP_FAILED )
    {
        perror("mmap");
        exit(2);
    }
    /* Not copy-on-write in a forked child (dom0-test.c's read_bfn()
     * forks): Xen writes into these, and must write the parent's page. */
    if ( madvise(p, n, MADV_DONTFORK) )
    {
        perror("madvise");
        exit(2);
    }
    memset(p, 0, n);
    return p;
}

/* dom0 is direct-mapped: a page's frame in /proc/self/pagemap is its gfn
 * (and its machine frame). 0 if unknown. */
static inline uint64_t frame_of(const void *p)
{
    uint64_t e = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);

    if ( fd < 0 )
        return 0;
    if ( pread(fd, &e, 8, (off_t)((uintptr_t)p / PAGE) * 8) != 8 )
        e = 0;
    close(fd);
    return (e & (1ULL << 63)) ? e & ((1ULL << 55) - 1) : 0;
}

/* op1's batch and op: locked_buf pages that main() sets before op1. */
static struct pv_iommu_batch *gb;
static struct pv_iommu_op *gop;

/* One op in a batch of one, `notice` set too (ABI 1.5's numbered
 * revoked_ack): the op's status (or the call's error; -1000 if Xen did
 * not do it). Its results are left in *gop. */
static inline int op1_notice(uint16_t subop, uint32_t ctx, uint16_t flags, uint16_t domid,
                             uint64_t gfn, uint64_t bfn, uint64_t notice)
{
    long rc;

    memset(gop, 0, sizeof(*gop));
    gop->subop = subop;
    gop->flags = flags;
    gop->context = ctx;
    gop->domid = domid;
    gop->gfn = gfn;
    gop->bfn = bfn;
    gop->notice = notice;
    gop->status = 1;
    memset(gb, 0, sizeof(*gb));
    gb->version = PVIOMMU_INTERFACE_VERSION;
    gb->nr_ops = 1;
    gb->ops = (uint64_t)(uintptr_t)gop;
    rc = hcall(PVIOMMU_CMD_batch, (uint64_t)(uintptr_t)gb);
    if ( rc < 0 )
        return (int)rc;
    return gb->nr_done == 1 ? gop->status : -1000;
}

/* One op in a batch of one (op1_notice with notice 0). */
static inline int op1(uint16_t subop, uint32_t ctx, uint16_t flags, uint16_t domid,
                      uint64_t gfn, uint64_t bfn)
{
    return op1_notice(subop, ctx, flags, domid, gfn, bfn, 0);
}

#endif /* PVIOMMU_DOM0_PRIVCMD_H */
