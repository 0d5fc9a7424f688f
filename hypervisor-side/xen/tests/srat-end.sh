#!/bin/bash
# Where x86's glue lets BFNs start above RAM that may be hot-added later:
# patch 0003's numa_memblks_end() (4.17's arch/x86/srat.c, 4.20's
# common/numa.c), as each patch adds it, and the glue's
# pvx_hotadd_end_pfn() (pviommu.c) over it, compiled on the host and put
# SRAT block tables. memory_add() takes a hot-add inside any SRAT memory
# block (valid_numa_range()), hot-pluggable or not; before 2026-12-06 the
# glue reserved up to mem_hotplug only (the hot-pluggable blocks' end), so
# a block that is not hot-pluggable past all of e820's RAM was left to
# BFNs. Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

sed -n '/^static uint64_t __init pvx_hotadd_end_pfn/,/^}/p' "$HERE/pviommu.c" > "$WORK/glue.inc"
grep -q 'numa_memblks_end()' "$WORK/glue.inc" ||
    { echo "srat-end: pvx_hotadd_end_pfn() in pviommu.c does not read numa_memblks_end()" >&2; exit 1; }
grep -q 'hotadd_pfn = pvx_hotadd_end_pfn();' "$HERE/pviommu.c" ||
    { echo "srat-end: pvx_build_regions() does not reserve up to pvx_hotadd_end_pfn()" >&2; exit 1; }

failures=0
for patch in "$HERE/patches/0003-iommu-pci-pviommu-platform-facts.patch" \
             "$HERE/patches-4.20/0003-iommu-pci-pviommu-platform-facts-xen4.20.patch"; do
    sed -n '/^+paddr_t __init numa_memblks_end/,/^+}/s/^+//p' "$patch" > "$WORK/memblks.inc"
    grep -q 'node_memblk_range' "$WORK/memblks.inc" ||
        { echo "srat-end: no numa_memblks_end in $(basename "$patch")" >&2; exit 1; }
    cat > "$WORK/test.c" <<'C'
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#define __init
#define PAGE_SHIFT 12
#define PFN_DOWN(x) ((x) >> PAGE_SHIFT)
#define max(a, b) ((a) > (b) ? (a) : (b))
#define max_t(t, a, b) ((t)(a) > (t)(b) ? (t)(a) : (t)(b))
typedef uint64_t paddr_t;
/* srat.c's table of SRAT memory blocks (sorted by start, as Xen keeps it). */
struct node { paddr_t start, end; };
static struct node node_memblk_range[8];
static NR_T num_node_memblks; /* int on 4.17, unsigned int on 4.20 */
/* The hot-pluggable blocks' end, as srat.c sets it. */
static paddr_t mem_hotplug;
#include "memblks.inc"
#include "glue.inc"

static int failures;

static void expect(const char *what, uint64_t want)
{
    uint64_t got = pvx_hotadd_end_pfn();

    if ( got != want )
    {
        printf("FAIL %s: hot-add may reach frame %#" PRIx64 ", want %#" PRIx64 "\n", what, got, want);
        failures++;
    }
    else
        printf("ok   %s\n", what);
}

static void blocks(paddr_t hotplug, unsigned int n, const struct node *b)
{
    mem_hotplug = hotplug;
    num_node_memblks = n;
    for ( unsigned int i = 0; i < n; i++ ) /* n within the table */
        node_memblk_range[i] = b[i];
}

int main(void)
{
    const paddr_t G = 1ULL << 30;

    blocks(0, 0, NULL);
    expect("no SRAT", 0);

    /* Two nodes of RAM, as e820 lists it: nothing past it. */
    blocks(0, 2, (const struct node[]){ { 0, 4 * G }, { 4 * G, 8 * G } });
    expect("RAM only", PFN_DOWN(8 * G));

    /* A hot-pluggable block past RAM: mem_hotplug's end. */
    blocks(12 * G, 2, (const struct node[]){ { 0, 8 * G }, { 8 * G, 12 * G } });
    expect("a hot-pluggable block", PFN_DOWN(12 * G));

    /*
     * A block that is not hot-pluggable past RAM (and not in e820):
     * memory_add() takes a hot-add there too. The rule before
     * (mem_hotplug's end only) answered 8 GiB.
     */
    blocks(8 * G, 2, (const struct node[]){ { 0, 8 * G }, { 16 * G, 20 * G } });
    expect("a block that is not hot-pluggable, past RAM", PFN_DOWN(20 * G));

    /* The highest end is not the last block's (sorted by start). */
    blocks(0, 3, (const struct node[]){ { 0, 64 * G }, { 4 * G, 8 * G }, { 8 * G, 9 * G } });
    expect("a long first block", PFN_DOWN(64 * G));

    /* An end off a page boundary rounds up; one at 2^64 does not wrap. */
    blocks(0, 1, (const struct node[]){ { 0, 8 * G + 1 } });
    expect("an end off a page", PFN_DOWN(8 * G) + 1);
    blocks(0, 1, (const struct node[]){ { 16 * G, 0xfffffffffffff800ULL } });
    expect("an end in the last page", 1ULL << 52);

    return failures ? 1 : 0;
}
C
    nr_t="unsigned int"; case "$patch" in */patches/*) nr_t=int ;; esac
    echo "srat-end: $(basename "$patch")"
    cc -std=gnu11 -DNR_T="$nr_t" -Wall -Wextra -Werror -O1 -I"$WORK" -o "$WORK/test" "$WORK/test.c"
    "$WORK/test" || failures=$((failures + 1))
done
[ "$failures" = 0 ] || { echo "srat-end: wrong answers" >&2; exit 1; }
echo "srat-end: all answers right"
