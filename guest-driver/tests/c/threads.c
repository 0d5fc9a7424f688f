/* One client shared by several threads, as the header allows: each thread
 * maps, looks up and unmaps its own pages concurrently; calls serialise on
 * the client's lock, results stay per thread, and each thread's last error
 * is its own. */
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include "pviommu.h"
#include "pviommu_guest.h"

#define THREADS 4
#define PAGES 32
#define ROUNDS 20

static pviommu_client *client;

struct job { int id; int failed; char why[160]; };

static void *work(void *arg)
{
    struct job *j = arg;
    uint64_t gfns[PAGES], bfns[PAGES];
    int32_t status[PAGES];
    for (int i = 0; i < PAGES; i++)
        gfns[i] = (uint64_t)(j->id * PAGES + i);
    for (int r = 0; r < ROUNDS && !j->failed; r++) {
        int rc = pviommu_map(client, 1, gfns, PAGES, PVIOMMU_F_READ, bfns, status);
        if (rc) { snprintf(j->why, sizeof j->why, "map %d", rc); j->failed = 1; break; }
        for (int i = 0; i < PAGES; i++) {
            uint16_t d; uint64_t g; uint32_t f;
            if (pviommu_lookup(client, bfns[i], &d, &g, &f) || d != 1 || g != gfns[i]) {
                snprintf(j->why, sizeof j->why, "lookup of bfn %llx", (unsigned long long)bfns[i]);
                j->failed = 1;
            }
        }
        /* A failure of this thread's own: its message, not another's. */
        uint64_t none = (1ull << 40) + (uint64_t)j->id; uint16_t d; uint64_t g; uint32_t f;
        char mine[64];
        snprintf(mine, sizeof mine, "lookup bfn %#llx:", (unsigned long long)none);
        if (pviommu_lookup(client, none, &d, &g, &f) != -2 ||
            strstr(pviommu_last_error(client), mine) == NULL) {
            snprintf(j->why, sizeof j->why, "own error: %s", pviommu_last_error(client));
            j->failed = 1;
        }
        rc = pviommu_unmap(client, bfns, PAGES, status);
        if (rc) { snprintf(j->why, sizeof j->why, "unmap %d", rc); j->failed = 1; }
    }
    return NULL;
}

int main(void)
{
    client = pviommu_open_sim(THREADS * PAGES);
    if (!client) { fprintf(stderr, "FAIL: open: %s\n", pviommu_last_error(NULL)); return 1; }
    pthread_t t[THREADS];
    struct job jobs[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (struct job){ .id = i };
        pthread_create(&t[i], NULL, work, &jobs[i]);
    }
    int failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        if (jobs[i].failed) { fprintf(stderr, "FAIL: thread %d: %s\n", i, jobs[i].why); failed = 1; }
    }
    uint64_t gfn = 0, bfn; int32_t st;
    /* Everything was unmapped: the first page maps to a BFN again. */
    if (!failed && pviommu_map(client, 1, &gfn, 1, PVIOMMU_F_READ, &bfn, &st) != 0) failed = 1;
    pviommu_close(client);
    if (failed) return 1;
    printf("threads: %d threads x %d rounds on one client: OK\n", THREADS, ROUNDS);
    return 0;
}
