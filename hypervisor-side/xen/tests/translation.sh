#!/bin/bash
# What pvx_translation() (pviommu-common.inc) answers for each IOMMU
# set-up, compiled on the host with Xen's predicates as plain fields:
# whether a map into the caller's context 0 isolates anything. The case
# a review of 2026-12-06 found: dom0 created relaxed or passthrough, then
# no longer the hardware domain (a late hardware domain, hardware_dom=),
# keeps that set-up, so it must not be told TRANSLATES. The function with
# the fix cut out must get that case wrong, or this test could not fail.
# Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

sed -n '/^static uint32_t pvx_translation(/,/^}/p' "$HERE/pviommu-common.inc" > "$WORK/fixed.inc"
grep -q 'need_iommu_pt_sync(d)' "$WORK/fixed.inc" ||
    { echo "translation: pvx_translation() does not ask need_iommu_pt_sync()" >&2; exit 1; }
# The function as it was: the set-up's test (and its comment) cut out.
# (Each line is held back one, so the comment's opening line goes too.)
awk 'NR > 1 && !skip && !/A domain.s IOMMU set-up is decided/ { print held }
     /A domain.s IOMMU set-up is decided/ { skip = 1 }
     skip && /need_iommu_pt_sync/ { getline; skip = 0; held = ""; next }
     { held = $0 }
     END { print held }' "$WORK/fixed.inc" |
    sed 's/pvx_translation(/pvx_translation_before(/' > "$WORK/before.inc"
if grep -q need_iommu_pt_sync "$WORK/before.inc"; then
    echo "translation: could not cut the fix out" >&2; exit 1
fi

cat > "$WORK/test.c" <<'C'
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define PVIOMMU_TRANSLATES  0U
#define PVIOMMU_NO_IOMMU    1U
#define PVIOMMU_PASSTHROUGH 2U
#define PVIOMMU_RELAXED     3U
#define PVIOMMU_SHARED_PT   4U
#define PVIOMMU_MIRRORS_P2M 5U

struct domain {
    bool iommu, hwdom, hap_pt, translated, need_sync;
};
/* Boot options, as Xen's iommu_hwdom_init() leaves them. */
static bool iommu_hwdom_passthrough, pvx_hwdom_strict;
#define is_iommu_enabled(d) ((d)->iommu)
#define is_hardware_domain(d) ((d)->hwdom)
#define iommu_use_hap_pt(d) ((d)->hap_pt)
#define paging_mode_translate(d) ((d)->translated)
#define need_iommu_pt_sync(d) ((d)->need_sync)

#include "fixed.inc"
#include "before.inc"

static const char *const names[] = {
    "TRANSLATES", "NO_IOMMU", "PASSTHROUGH", "RELAXED", "SHARED_PT", "MIRRORS_P2M",
};

struct case_ {
    const char *what;
    bool passthrough, strict;
    struct domain d;
    uint32_t want;
    bool before_wrong; /* the old function got it wrong */
};

int main(void)
{
    /* need_sync as iommu_domain_init() sets it: !hwdom || strict, and not with shared tables. */
    static const struct case_ cases[] = {
        { "PV dom0, strict", false, true, { true, true, false, false, true }, PVIOMMU_TRANSLATES, false },
        { "PV dom0, relaxed", false, false, { true, true, false, false, false }, PVIOMMU_RELAXED, false },
        { "PV dom0, passthrough", true, false, { true, true, false, false, false }, PVIOMMU_PASSTHROUGH, false },
        { "PV dom0 relaxed, late hwdom up", false, false, { true, false, false, false, false }, PVIOMMU_RELAXED, true },
        { "PV dom0 passthrough, late hwdom up", true, false, { true, false, false, false, false }, PVIOMMU_PASSTHROUGH, true },
        { "PV dom0 strict, late hwdom up", false, true, { true, false, false, false, true }, PVIOMMU_TRANSLATES, false },
        { "PV domU with an IOMMU", false, false, { true, false, false, false, true }, PVIOMMU_TRANSLATES, false },
        { "PV domU with an IOMMU, host passthrough", true, false, { true, false, false, false, true }, PVIOMMU_TRANSLATES, false },
        { "domain without an IOMMU", false, false, { false, false, false, false, false }, PVIOMMU_NO_IOMMU, false },
        { "PVH dom0, shared tables", false, true, { true, true, true, true, false }, PVIOMMU_SHARED_PT, false },
        { "HVM stub domain, own tables", false, false, { true, false, false, true, true }, PVIOMMU_MIRRORS_P2M, false },
    };
    int bad = 0;

    for ( unsigned int i = 0; i < sizeof(cases) / sizeof(cases[0]); i++ )
    {
        const struct case_ *c = &cases[i];
        uint32_t got, old;

        iommu_hwdom_passthrough = c->passthrough;
        pvx_hwdom_strict = c->strict;
        got = pvx_translation(&c->d);
        old = pvx_translation_before(&c->d);
        if ( got != c->want )
        {
            printf("translation: %s: %s, want %s\n", c->what, names[got], names[c->want]);
            bad = 1;
        }
        if ( (old != c->want) != c->before_wrong )
        {
            printf("translation: %s: the function before the fix said %s\n", c->what, names[old]);
            bad = 1;
        }
    }
    if ( !bad )
        printf("translation: %u set-ups answered; the two late-hwdom ones were TRANSLATES before\n",
               (unsigned int)(sizeof(cases) / sizeof(cases[0])));
    return bad;
}
C
cc -std=gnu11 -Wall -Werror -o "$WORK/test" "$WORK/test.c"
"$WORK/test"
