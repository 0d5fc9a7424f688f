#!/bin/bash
# The PV half of the x86 glue's page lookup (pviommu.c), compiled on the
# host with Xen's page accounting as plain fields: a PV target's "gfn" is
# a machine frame the caller chose, and a frame that is not the target's
# must be refused *silently*. Xen's get_page() (what get_page_from_gfn()
# does for a PV domain) logs every such frame with no rate limit on a
# debug build or with guest_loglvl=all: a line a map op, 1024 a call, at
# the caller's will (a review of 2026-12-07). Likewise a writable map of a
# page whose type is in use (a PV page table) must be refused before
# get_page_type(), whose failure _get_page_type() logs on a debug build.
# The lookup with its PV branch cut out must log, or this test could not
# fail. Exits non-zero on a wrong answer or a logged line.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

fn() { sed -n "/^static [a-z_ ]*\*\{0,1\}$1(/,/^}/p" "$HERE/pviommu.c"; }
{ fn pvx_pv_frame_page; fn pvx_writable_type_refused; fn pvx_lookup_page; } > "$WORK/fixed.inc"
for f in pvx_pv_frame_page pvx_writable_type_refused 'return pvx_pv_frame_page(d, gfn)'; do
    grep -q "$f" "$WORK/fixed.inc" || { echo "pv-frames: pviommu.c has no $f" >&2; exit 1; }
done
# pvx_accept_page() asks before it takes the type.
grep -q 'pvx_writable_type_refused(pg) ||' "$HERE/pviommu-common.inc" ||
    { echo "pv-frames: pvx_accept_page() takes the writable type without asking first" >&2; exit 1; }
# The lookup as it was: the PV branch cut out (from its `if` to its `}`).
fn pvx_lookup_page |
    awk '/if \( !paging_mode_translate\(d\) \)/ { skip = 1 } !skip { print } skip && /^    }$/ { skip = 0 }' |
    sed 's/pvx_lookup_page(/pvx_lookup_page_before(/' > "$WORK/before.inc"
if grep -q pvx_pv_frame_page "$WORK/before.inc"; then
    echo "pv-frames: could not cut the PV branch out" >&2; exit 1
fi

cat > "$WORK/test.c" <<'C'
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define likely(x) (x)
#define unlikely(x) (x)
#define ACCESS_ONCE(x) (*(volatile __typeof__(x) *)&(x))

struct domain { int id; bool translated, log_dirty; };
/* count_info's reference count, the owner, type_info as x86 keeps it. */
struct page_info { unsigned long count; struct domain *owner; union { struct { unsigned long type_info; } inuse; } u; };
#define PGT_type_mask     (7UL << 61)
#define PGT_writable_page (7UL << 61)
#define PGT_l1_page_table (1UL << 61)
#define PGT_count_mask    ((1UL << 54) - 1)

typedef struct { unsigned long m; } mfn_t;
static mfn_t _mfn(unsigned long m) { return (mfn_t){ m }; }
#define NFRAMES 8
static struct page_info frames[NFRAMES];
static bool mfn_valid(mfn_t m) { return m.m < NFRAMES; }
static struct page_info *mfn_to_page(mfn_t m) { return &frames[m.m]; }

static unsigned int lines; /* what Xen would have logged */
static struct domain *page_get_owner_and_reference(struct page_info *pg)
{
    if ( !pg->count )
        return NULL;
    pg->count++;
    return pg->owner;
}
static void put_page(struct page_info *pg) { pg->count--; }
/* Xen's get_page(), its log line counted. */
static bool get_page(struct page_info *pg, const struct domain *d)
{
    struct domain *owner = page_get_owner_and_reference(pg);

    if ( owner == d )
        return true;
    lines++; /* gprintk(XENLOG_INFO, "Error mfn ...") */
    if ( owner )
        put_page(pg);
    return false;
}

/* x86's p2m types and queries, as far as the lookup asks. */
typedef enum { p2m_ram_rw, p2m_ram_ro, p2m_mmio_dm, p2m_invalid } p2m_type_t;
#define P2M_ALLOC 1
#define P2M_UNSHARE 2
#define p2m_is_paging(t) false
#define p2m_is_shared(t) false
#define p2m_is_grant(t) false
#define p2m_is_foreign(t) false
#define p2m_is_mmio(t) false
#define paging_mode_translate(d) ((d)->translated)
#define paging_mode_log_dirty(d) ((d)->log_dirty)
static bool pvx_vram_sweeping(const struct domain *d, uint64_t gfn) { (void)d; (void)gfn; return false; }
/* x86's get_page_from_gfn() for a PV domain (asm/p2m.h). */
static struct page_info *get_page_from_gfn(struct domain *d, unsigned long gfn,
                                           p2m_type_t *t, int q)
{
    (void)q;
    *t = p2m_ram_rw;
    return mfn_valid(_mfn(gfn)) && get_page(mfn_to_page(_mfn(gfn)), d) ? mfn_to_page(_mfn(gfn)) : NULL;
}
enum { PVX_PAGE_NOT_PRESENT, PVX_PAGE_LOG_DIRTY, PVX_PAGE_PAGED_OUT, PVX_PAGE_GRANT, PVX_PAGE_MMIO };

#include "fixed.inc"
#include "before.inc"

static struct domain target = { 1, false, false }, other = { 2, false, false };
static int failed;
static void expect(const char *what, bool ok)
{
    if ( !ok )
    {
        printf("pv-frames: FAIL %s\n", what);
        failed = 1;
    }
}

int main(void)
{
    unsigned long refs[NFRAMES];
    p2m_type_t t;
    uint32_t kind = PVX_PAGE_NOT_PRESENT;
    unsigned int i;
    struct page_info *pg;

    /* 0-1 the target's, 2 another domain's, 3 free (no owner, no count). */
    frames[0] = (struct page_info){ 1, &target, { { PGT_writable_page | 1 } } };
    frames[1] = (struct page_info){ 2, &target, { { PGT_l1_page_table | 1 } } };
    frames[2] = (struct page_info){ 1, &other, { { 0 } } };
    frames[3] = (struct page_info){ 0, NULL, { { 0 } } };
    for ( i = 0; i < NFRAMES; i++ )
        refs[i] = frames[i].count;

    pg = pvx_lookup_page(&target, 0, 1, &t, &kind);
    expect("the target's frame is found, referenced", pg == &frames[0] && frames[0].count == refs[0] + 1 && t == p2m_ram_rw);
    put_page(pg);
    for ( i = 2; i < 5; i++ )
    {
        char what[80];

        snprintf(what, sizeof(what), "frame %u: not present, nothing taken", i);
        expect(what, !pvx_lookup_page(&target, i, 0, &t, &kind) && frames[i].count == refs[i] &&
                     kind == PVX_PAGE_NOT_PRESENT);
    }
    expect("a frame of another domain's logged no line", lines == 0);
    /* A PV page table (type in use) is refused writable before get_page_type(). */
    expect("a typed page table refuses writable", pvx_writable_type_refused(&frames[1]));
    expect("a writable page does not", !pvx_writable_type_refused(&frames[0]));
    frames[1].u.inuse.type_info = PGT_l1_page_table; /* count 0: the type can change */
    expect("an unused type does not", !pvx_writable_type_refused(&frames[1]));
    /* The lookup as it was logs a line for another domain's frame. */
    expect("the old lookup refused it too", !pvx_lookup_page_before(&target, 2, 0, &t, &kind));
    expect("the old lookup logged (this test can fail)", lines == 1);
    if ( !failed )
        printf("pv-frames: ok (a PV target's foreign frames refused without a log line)\n");
    return failed;
}
C
cc -std=gnu11 -Wall -Werror -Wno-unused-function -I"$WORK" -o "$WORK/test" "$WORK/test.c"
"$WORK/test"
