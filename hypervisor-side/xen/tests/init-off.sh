#!/bin/bash
# pviommu_init() (pviommu-common.inc) with the x86 glue's
# pvx_arch_wanted(), compiled on the host with Xen's boot state as plain
# variables: with no IOMMU in use (iommu=off, no DMAR/IVRS, a failed set-up)
# PV-IOMMU stays off (pviommu_ready false, no engine made), since nothing
# could ever translate a BFN: before a review of 2026-12-07 the engine
# started, and the hypercall and hooks served nothing. The function with
# the check cut out must start, or this test could not fail.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

init() { sed -n '/^static int __init cf_check pviommu_init(/,/^}/p' "$HERE/pviommu-common.inc"; }
init > "$WORK/fixed.inc"
sed -n '/^static bool __init pvx_arch_wanted(/,/^}/p' "$HERE/pviommu.c" > "$WORK/wanted.inc"
grep -q 'pvx_arch_wanted()' "$WORK/fixed.inc" ||
    { echo "init-off: pviommu_init() does not ask pvx_arch_wanted()" >&2; exit 1; }
grep -q 'iommu_enabled' "$WORK/wanted.inc" ||
    { echo "init-off: x86's pvx_arch_wanted() does not ask iommu_enabled" >&2; exit 1; }
init | awk '/if \( !pvx_arch_wanted\(\) \)/ { getline; next } { print }' |
    sed 's/pviommu_init(/pviommu_init_before(/' > "$WORK/before.inc"
if grep -q pvx_arch_wanted "$WORK/before.inc"; then
    echo "init-off: could not cut the check out" >&2; exit 1
fi

cat > "$WORK/test.c" <<'C'
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <inttypes.h>

#define __init
#define cf_check
#define XENLOG_INFO ""
#define XENLOG_ERR ""
#define printk(...) ((void)0)

struct reserve { uint64_t first, last; };
static bool iommu_enabled, iommu_hwdom_strict, pvx_hwdom_strict, pviommu_ready;
static bool opt_pviommu = true, opt_pviommu_item_refused, pvx_regions_incomplete;
static unsigned int opt_pviommu_nr_reserve, opt_pviommu_batch, opt_pviommu_heap_mib;
static uint64_t opt_pviommu_quota, pvx_window_start, pvx_window_end;
static struct reserve opt_pviommu_reserve[1];
#define PVX_DRIVER_CELLS 128
#define PVIOMMU_REGION_MMIO 0
static unsigned int engines; /* engines made */
static void pviommu_build_checks(void) {}
static void pvx_add_range(uint64_t s, uint64_t n, unsigned int k) { (void)s; (void)n; (void)k; }
static void pvx_build_regions(void) {}
static void pvx_sort_regions(void) {}
static int pviommu_engine_init(uint64_t q, unsigned int b, uint64_t h, unsigned int c)
{
    (void)q; (void)b; (void)h; (void)c;
    engines++;
    return 0;
}
static int pviommu_engine_window(uint64_t *s, uint64_t *e) { *s = 1; *e = 2; return 0; }
static void pvx_arch_ready(void) {}
/* A release build: no stack measurement (a debug Xen's, pvx_stack_note()). */
static unsigned long pvx_stack_paint(void) { return 0; }
static void pvx_stack_note(unsigned long limit, const char *what) { (void)limit; (void)what; }
#define __initcall(f)

#include "wanted.inc"
#include "fixed.inc"
#include "before.inc"

int main(void)
{
    int failed = 0;

    iommu_enabled = false;
    pviommu_init();
    if ( pviommu_ready || engines )
    {
        printf("init-off: FAIL started with no IOMMU (ready %d, %u engines)\n", pviommu_ready, engines);
        failed = 1;
    }
    pviommu_init_before();
    if ( !pviommu_ready )
    {
        printf("init-off: FAIL the function as it was stayed off too (this test cannot fail)\n");
        failed = 1;
    }
    pviommu_ready = false;
    engines = 0;
    iommu_enabled = true;
    pviommu_init();
    if ( !pviommu_ready || engines != 1 )
    {
        printf("init-off: FAIL did not start with an IOMMU\n");
        failed = 1;
    }
    /* A pviommu= item refused (parse_pviommu()): off, IOMMU or not. */
    pviommu_ready = false;
    engines = 0;
    opt_pviommu_item_refused = true;
    pviommu_init();
    if ( pviommu_ready || engines )
    {
        printf("init-off: FAIL started with a pviommu= item refused (ready %d, %u engines)\n",
               pviommu_ready, engines);
        failed = 1;
    }
    if ( !failed )
        printf("init-off: ok (off with no IOMMU in use or an option item refused, on with one)\n");
    return failed;
}
C
build_test test
"$WORK/test"
