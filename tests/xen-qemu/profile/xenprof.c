/*
 * xenprof.c -- QEMU 7.2 TCG plugin (plugin API v1): per-TB execution counts
 * for code inside Xen (x86-64 vaddr range [lo, hi)), with phase snapshots.
 *
 * Every translated TB whose start vaddr is in [lo, hi) gets a counter of its
 * own (allocated at translation, never moved) that an inline
 * QEMU_PLUGIN_INLINE_ADD_U64 op bumps at each execution; the TB's vaddr and
 * instruction count are recorded beside it. TBs outside the range bump two
 * global counters (TB executions, guest instructions) inline.
 *
 * Phase marker: when the TB starting at `marker` executes (a plain exec
 * callback on that TB only), a snapshot of every non-zero per-TB counter
 * (aggregated by vaddr and instruction count) plus the global counters is
 * appended to `out`. Differences of consecutive snapshots are phases.
 * Also dumped at exit.
 *
 * args: out=FILE marker=0xADDR lo=0xADDR hi=0xADDR [percpu=1]
 * percpu=1: Xen TBs are counted per vCPU by a (non-inline) exec callback
 * instead of the inline add; rows then carry the counts of vCPUs 0 and 1.
 * Counters are not atomic (MTTCG may lose rare concurrent increments).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAXCPU 8
struct tbrec {
    uint64_t count;   /* bumped inline; first member */
    uint64_t vaddr;
    uint32_t ninsns;
    uint64_t percpu[MAXCPU]; /* percpu=1: bumped by an exec callback instead */
};

#define CHUNK 65536
struct chunk {
    struct tbrec rec[CHUNK];
    size_t used;
    struct chunk *next;
};

static struct chunk *chunks, *cur;
static size_t nrec;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t lo = 0xffff800000000000ULL, hi = 0xffff880000000000ULL;
static uint64_t marker;
static FILE *out;
static uint64_t nsnap;
static uint64_t other_tbs, other_insns;   /* bumped inline */
static uint64_t xen_translations;
static int percpu;      /* per-vCPU counts (exec callback per Xen TB, slower) */

static struct tbrec *new_rec(void)
{
    if (!cur || cur->used == CHUNK) {
        struct chunk *c = calloc(1, sizeof(*c));
        if (!c) {
            fprintf(stderr, "xenprof: out of memory\n");
            abort();
        }
        if (cur) cur->next = c; else chunks = c;
        cur = c;
    }
    nrec++;
    return &cur->rec[cur->used++];
}

/* aggregation at dump: by (vaddr, ninsns) */
struct agg { uint64_t vaddr; uint32_t ninsns; uint64_t count; uint64_t percpu[MAXCPU]; };

static int agg_cmp(const void *a, const void *b)
{
    const struct agg *x = a, *y = b;
    if (x->vaddr != y->vaddr) return x->vaddr < y->vaddr ? -1 : 1;
    if (x->ninsns != y->ninsns) return x->ninsns < y->ninsns ? -1 : 1;
    return 0;
}

static void dump(const char *why)
{
    struct chunk *c;
    struct agg *a;
    size_t n = 0, i, m;

    pthread_mutex_lock(&lock);
    a = malloc(sizeof(*a) * (nrec ? nrec : 1));
    for (c = chunks; c; c = c->next)
        for (i = 0; i < c->used; i++) {
            uint64_t v = __atomic_load_n(&c->rec[i].count, __ATOMIC_RELAXED);
            int k;
            for (k = 0; k < MAXCPU; k++) {
                a[n].percpu[k] = __atomic_load_n(&c->rec[i].percpu[k], __ATOMIC_RELAXED);
                v += a[n].percpu[k];
            }
            if (!v) continue;
            a[n].vaddr = c->rec[i].vaddr;
            a[n].ninsns = c->rec[i].ninsns;
            a[n].count = v;
            n++;
        }
    qsort(a, n, sizeof(*a), agg_cmp);
    for (i = 0, m = 0; i < n; i++) {
        if (m && a[m - 1].vaddr == a[i].vaddr && a[m - 1].ninsns == a[i].ninsns) {
            int k;
            a[m - 1].count += a[i].count;
            for (k = 0; k < MAXCPU; k++) a[m - 1].percpu[k] += a[i].percpu[k];
        } else
            a[m++] = a[i];
    }
    fprintf(out, "S %" PRIu64 " %s other_tbs=%" PRIu64 " other_insns=%" PRIu64
            " xen_translations=%" PRIu64 " rows=%zu\n",
            nsnap++, why, __atomic_load_n(&other_tbs, __ATOMIC_RELAXED),
            __atomic_load_n(&other_insns, __ATOMIC_RELAXED), xen_translations, m);
    for (i = 0; i < m; i++) {
        fprintf(out, "%" PRIx64 " %u %" PRIu64, a[i].vaddr, a[i].ninsns, a[i].count);
        if (percpu)
            fprintf(out, " %" PRIu64 " %" PRIu64, a[i].percpu[0], a[i].percpu[1]);
        fprintf(out, "\n");
    }
    fprintf(out, "E\n");
    fflush(out);
    pthread_mutex_unlock(&lock);
    free(a);
}

static void marker_exec(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index; (void)udata;
    dump("marker");
}

static void percpu_exec(unsigned int vcpu_index, void *udata)
{
    struct tbrec *r = udata;
    r->percpu[vcpu_index < MAXCPU ? vcpu_index : MAXCPU - 1]++;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;

    if (pc >= lo && pc < hi) {
        struct tbrec *r;
        pthread_mutex_lock(&lock);
        r = new_rec();
        r->vaddr = pc;
        r->ninsns = (uint32_t)n;
        xen_translations++;
        pthread_mutex_unlock(&lock);
        if (percpu)
            qemu_plugin_register_vcpu_tb_exec_cb(tb, percpu_exec, QEMU_PLUGIN_CB_NO_REGS, r);
        else
            qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &r->count, 1);
        if (pc == marker)
            qemu_plugin_register_vcpu_tb_exec_cb(tb, marker_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
    } else {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &other_tbs, 1);
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &other_insns, n);
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    (void)id; (void)p;
    dump("exit");
    fclose(out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    const char *path = "xenprof.out";
    int i;
    (void)info;
    for (i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4)) path = argv[i] + 4;
        else if (!strncmp(argv[i], "marker=", 7)) marker = strtoull(argv[i] + 7, NULL, 0);
        else if (!strncmp(argv[i], "lo=", 3)) lo = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "hi=", 3)) hi = strtoull(argv[i] + 3, NULL, 0);
        else if (!strncmp(argv[i], "percpu=", 7)) percpu = atoi(argv[i] + 7);
        else {
            fprintf(stderr, "xenprof: unknown arg %s\n", argv[i]);
            return -1;
        }
    }
    out = fopen(path, "w");
    if (!out) {
        perror(path);
        return -1;
    }
    fprintf(out, "# xenprof lo=%" PRIx64 " hi=%" PRIx64 " marker=%" PRIx64 " percpu=%d\n", lo, hi, marker, percpu);
    fflush(out);
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
