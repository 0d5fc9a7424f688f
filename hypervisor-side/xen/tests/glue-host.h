/*
 * What the glue's reserved-region table (pviommu-common.inc, from
 * PVX_MAX_REGIONS to pviommu_init) takes from Xen, on the host: for the
 * tests that compile it (run-window.sh, bridge-windows.sh, through
 * glue-regions.sh).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define __init
#define __initdata
#define __ro_after_init
#define XENLOG_WARNING ""
#define XENLOG_ERR ""
#define PAGE_SHIFT 12
#define PFN_DOWN(x) ((x) >> PAGE_SHIFT)
#define PFN_UP(x) (((x) + (1UL << PAGE_SHIFT) - 1) >> PAGE_SHIFT)
/* Xen's max()/min() (type-checked there), max_t(). */
#define max(a, b) ((a) > (b) ? (a) : (b))
#define min(a, b) ((a) < (b) ? (a) : (b))
#define max_t(t, a, b) ((t)(a) > (t)(b) ? (t)(a) : (t)(b))
#define printk printf
typedef struct { int counter; } atomic_t;
#define ATOMIC_INIT(i) { (i) }
static int atomic_inc_return(atomic_t *v) { return ++v->counter; }
