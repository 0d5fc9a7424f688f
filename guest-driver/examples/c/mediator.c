/* SPDX-License-Identifier: MIT */
/* A GPU mediator's PV-IOMMU life cycle in C, against the installed library:
 *
 *   cc mediator.c $(pkg-config --cflags --libs pviommu-guest)   (or: make)
 *   pviommu sim serve --socket /tmp/pviommu.sock &
 *   ./mediator /tmp/pviommu.sock 1 0x100 16
 *
 * It connects to the simulator daemon as dom0, maps COUNT pages of guest
 * DOMID from GFN for the device, checks each BFN with a lookup, then waits
 * for the hypervisor to revoke one (e.g. `pviommu --backend remote sim
 * balloon-out --domid 1 --gfn 0x105` from another shell), drops it from its
 * own tables, acknowledges it, and unmaps the rest. Every failure is
 * reported with pviommu_strerror() and pviommu_last_error(). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <pviommu.h>
#include <pviommu_guest.h>

#define MAX_PAGES 4096

static int fail(const char *what, int rc)
{
    fprintf(stderr, "mediator: %s: %s (%s)\n", what, pviommu_strerror(rc),
            pviommu_last_error(NULL));
    return 1;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *s == '\0' || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t domid, first, count;
    if (argc != 5 || parse_u64(argv[2], &domid) || domid > 0x7fef ||
        parse_u64(argv[3], &first) || parse_u64(argv[4], &count) || count == 0 ||
        count > MAX_PAGES) {
        fprintf(stderr, "usage: mediator SOCKET DOMID FIRST_GFN COUNT (COUNT <= %d)\n",
                MAX_PAGES);
        return 2;
    }

    pviommu_client *c = pviommu_open_remote(argv[1], 0);
    if (!c) {
        fprintf(stderr, "mediator: connect to %s: %s\n", argv[1], pviommu_last_error(NULL));
        return 1;
    }

    static uint64_t gfns[MAX_PAGES], bfns[MAX_PAGES];
    static int32_t status[MAX_PAGES];
    for (uint64_t i = 0; i < count; i++)
        gfns[i] = first + i;
    int rc = pviommu_map(c, (uint16_t)domid, gfns, count, PVIOMMU_F_READ | PVIOMMU_F_WRITE,
                         bfns, status);
    if (rc < 0)
        return fail("map", rc);

    /* The shadow tables would point at these BFNs; check what each one
     * reaches, as the hypervisor sees it (never a machine frame). */
    for (uint64_t i = 0; i < count; i++) {
        uint16_t d;
        uint64_t g;
        uint32_t flags;
        rc = pviommu_lookup(c, bfns[i], &d, &g, &flags);
        if (rc < 0)
            return fail("lookup", rc);
        if (d != domid || g != gfns[i] || !(flags & PVIOMMU_F_WRITE)) {
            fprintf(stderr, "mediator: bfn %#" PRIx64 " maps d%u gfn %#" PRIx64 "\n", bfns[i],
                    d, g);
            return 1;
        }
        printf("gfn %#" PRIx64 " -> bfn %#" PRIx64 "\n", gfns[i], bfns[i]);
    }
    printf("READY %" PRIu64 " pages mapped\n", count);
    fflush(stdout);

    /* Wait for a revocation: the daemon pushes it, the library drops the
     * BFN from its cache at once, and we acknowledge it after dropping it
     * from our own tables. */
    rc = pviommu_wait_revocations(c, 30000);
    if (rc < 0)
        return fail("wait for revocations", rc);
    if (rc == 0) {
        fprintf(stderr, "mediator: no revocation within 30 s\n");
        return 1;
    }
    struct pviommu_revocation revs[16];
    int n = pviommu_drain_revocations(c, revs, 16);
    if (n < 0)
        return fail("drain revocations", n);
    uint64_t remaining = 0;
    for (uint64_t i = 0; i < count; i++) {
        int revoked = 0;
        for (int r = 0; r < n; r++)
            revoked |= revs[r].bfn == bfns[i] && revs[r].context == 0;
        if (revoked)
            printf("REVOKED bfn %#" PRIx64 " (was d%u gfn %#" PRIx64 ")\n", bfns[i],
                   (unsigned)domid, gfns[i]);
        else
            bfns[remaining++] = bfns[i];
    }
    if (remaining + (uint64_t)n != count) {
        fprintf(stderr, "mediator: %d notice(s) for BFNs this mediator does not hold\n", n);
        return 1;
    }

    rc = pviommu_unmap(c, bfns, remaining, status);
    if (rc < 0)
        return fail("unmap", rc);
    /* Bad input gets a clear error, not a crash. */
    rc = pviommu_unmap(c, NULL, 1, status);
    if (rc != -EINVAL) {
        fprintf(stderr, "mediator: unmap(NULL) answered %d\n", rc);
        return 1;
    }
    pviommu_close(c);
    printf("OK: mapped %" PRIu64 ", revoked %d, unmapped %" PRIu64 "\n", count, n, remaining);
    return 0;
}
