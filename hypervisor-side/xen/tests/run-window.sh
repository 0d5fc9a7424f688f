#!/bin/bash
# The glue's check of each IOMMU run the engine asks for (pviommu-common.inc:
# the reserved-region table, pvx_sort_regions() and pvx_run_in_window()),
# compiled on the host and put the cases of the engine's own rule
# (bfn_alloc.rs, a_run_is_clear_only_above_the_floor_and_outside_every_range),
# plus the table's own shapes: regions added unsorted and overlapping, a
# long region that starts before shorter ones and reaches past them, runs
# touching a region's either end, a host whose RAM ends below 4 GiB (the
# check the glue made before, bfn >= RAM's end, let the MSI window and the
# hole below 4 GiB through there), and one whose RAM ends above it; and
# what the glue's unmap answers the engine for a run outside the window
# (pvx_unmap_refused(), x86's and Arm's). Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

# shellcheck source=glue-regions.sh
. "$HERE/tests/glue-regions.sh"
glue_regions run-window "$WORK"

cat > "$WORK/test.c" <<'C'
#include "glue-host.h"
#include "regions.inc"

static int failures;

/* An empty table, and the engine's window [start, end) as it reports it. */
static void reset(uint64_t start, uint64_t end)
{
    pvx_nr_regions = 0;
    pvx_window_start = start;
    pvx_window_end = end;
}

/* How many regions hold all of [start, start + nr). */
static unsigned int covering(uint64_t start, uint64_t nr)
{
    unsigned int k, n = 0;

    for ( k = 0; k < pvx_nr_regions; k++ )
        if ( pvx_regions[k].start <= start && start + nr <= pvx_regions[k].start + pvx_regions[k].nr )
            n++;
    return n;
}

/* A full table of 128 regions holding `want` frames in all. */
static void expect_full_table(uint64_t want, const char *what)
{
    uint64_t reserved = 0;

    for ( unsigned int k = 0; k < pvx_nr_regions; k++ )
        reserved += pvx_regions[k].nr;
    if ( pvx_nr_regions != PVX_MAX_REGIONS || reserved != want )
    {
        printf("FAIL %s: %u regions, %#" PRIx64 " frames reserved, want %#" PRIx64 "\n", what,
               pvx_nr_regions, reserved, want);
        failures++;
    }
}

static void expect(uint64_t bfn, uint64_t count, bool want, const char *what)
{
    bool got = pvx_run_in_window(bfn, count);

    if ( got != want )
    {
        printf("FAIL %s: %#" PRIx64 "+%" PRIu64 " in window: %d, want %d\n", what, bfn, count,
               got, want);
        failures++;
    }
    else
        printf("ok   %s\n", what);
}

int main(void)
{
    /* (pvx_build_regions()'s verdict: bridge-windows.sh tests it.) */
    (void)pvx_regions_incomplete;

    /*
     * The engine's cases (bfn_alloc.rs), its floor 0x80 and end 2^64 - 1
     * standing for the window's, shifted above 4 GiB here by BASE.
     */
    const uint64_t FLOOR = 0x100000, BASE = FLOOR - 0x80;

    (void)pvx_ram_end;
    reset(FLOOR, UINT64_MAX);
    pvx_add_region(BASE + 0x300, 0x10, 1);
    pvx_add_region(BASE + 0x100, 0x180, 2);
    pvx_add_region(BASE + 0x120, 4, 3);
    pvx_add_region(BASE + 0x500, 0, 1); /* empty: never recorded */
    pvx_sort_regions();
    expect(BASE + 0x80, 0x80, true, "up to the first region");
    expect(BASE + 0x7f, 1, false, "below the floor (4 GiB)");
    expect(BASE + 0x80, 0x81, false, "its last page on the first region");
    expect(BASE + 0x200, 1, false, "inside the long region, past the short one");
    expect(BASE + 0x27f, 1, false, "the long region's last page");
    expect(BASE + 0x280, 0x80, true, "between two regions, touching both");
    expect(BASE + 0x2ff, 2, false, "over the next one's first page");
    expect(BASE + 0x30f, 1, false, "its last page");
    expect(BASE + 0x310, 0x1000, true, "past every region (and the empty one)");

    /*
     * A host whose RAM ends at 2 GiB, with the regions x86's glue adds:
     * the engine's window starts at 4 GiB and ends at its 39 bits. (The
     * glue's old check, a BFN at or above RAM's end, let the MSI window
     * and the hole below 4 GiB through here.)
     */
    reset(FLOOR, 1ULL << 27);
    pvx_add_region(PFN_DOWN(0xfee00000UL), 0x100, 1);           /* MSI */
    pvx_add_region(0x80000, PFN_DOWN(1UL << 32) - 0x80000, 2);   /* hole below 4 GiB */
    pvx_add_region(0x100400, 0x10, 3);                          /* an RMRR above */
    pvx_sort_regions();
    expect(0xfee00, 1, false, "2 GiB host: the MSI window");
    expect(0x80000, 1, false, "2 GiB host: RAM's end");
    expect(0xfffff, 2, false, "2 GiB host: across 4 GiB");
    expect(0x100000, 0x400, true, "2 GiB host: from 4 GiB to the RMRR");
    expect(0x1003f0, 0x11, false, "2 GiB host: a run ending on the RMRR");
    expect(0x10040f, 4, false, "2 GiB host: a run starting inside it");
    expect(0x100410, 2, true, "2 GiB host: right after it");
    expect((1ULL << 27) - 2, 2, true, "2 GiB host: up to the window's end");
    expect((1ULL << 27) - 2, 3, false, "2 GiB host: past the window's end");
    expect(1ULL << 27, 1, false, "2 GiB host: beyond the window");

    /*
     * A host whose RAM ends at 16 GiB: the floor is RAM's end. With the
     * AMD HyperTransport range, added as the glue adds it (bytes).
     */
    reset(0x400000, 1ULL << 36);
    pvx_add_range(0xfd00000000UL, 0x10000000000UL - 0xfd00000000UL, 4);
    pvx_sort_regions();
    expect(0x3fffff, 1, false, "16 GiB host: RAM's last frame");
    expect(0x400000, 512, true, "16 GiB host: RAM's end");
    expect(0xfcfffff, 1, true, "16 GiB host: below the HT range");
    expect(0xfcfffff, 2, false, "16 GiB host: into the HT range");
    expect(0x10000000, 1, true, "16 GiB host: above it (1 TiB)");

    /*
     * A range whose size runs past the top of the address space (a VF
     * BAR's size times the VFs, wrapped): reserved up to the top, never
     * dropped (it was, before a review of 2026-12-05).
     */
    reset(0x400000, 1ULL << 36);
    pvx_add_range(0x800000000UL, ~0ULL - 0xfffUL, 3);
    pvx_sort_regions();
    expect(0x7fffff, 1, true, "a wrapping range: the frame below it");
    expect(0x800000, 1, false, "a wrapping range: its first frame");
    expect((1ULL << 36) - 1, 1, false, "a wrapping range: the window's last frame");
    (void)pvx_addr_bits;

    /* A full table, sorted from the last region down. */
    reset(FLOOR, UINT64_MAX);
    for ( unsigned int i = 0; i < PVX_MAX_REGIONS; i++ )
        pvx_add_region(FLOOR + 0x1000 * (PVX_MAX_REGIONS - i), 0x10, i & 1);
    pvx_sort_regions();
    int before = failures;
    for ( unsigned int i = 1; i <= PVX_MAX_REGIONS; i++ )
    {
        uint64_t r = FLOOR + 0x1000 * i;

        if ( pvx_run_in_window(r + 0xf, 1) || !pvx_run_in_window(r + 0x10, 0xff0) ||
             pvx_run_in_window(r - 1, 2) )
        {
            printf("FAIL full table: region %u\n", i);
            failures++;
        }
    }
    if ( failures == before )
        printf("ok   full table\n");

    /*
     * An over-full table: 128 ranges of 16 frames a page apart below the
     * window, then one past its end (a high MCFG window, say). The two
     * closest regions become one, the new range takes the slot freed; the
     * window stays whole, every range stays reserved, and only the frames
     * between the two merged are reserved besides. (The table's last
     * slot took the new range before 2026-12-07: it grew across the whole
     * window.)
     */
    reset(FLOOR + 0x100000, FLOOR + 0x200000);
    for ( unsigned int i = 0; i < PVX_MAX_REGIONS; i++ )
        pvx_add_region(FLOOR + 0x1000 * i + (i == 7 ? 0xff0 : 0), 0x10, i & 1);
    pvx_add_region(FLOOR + 0x300000, 0x100, 2);
    pvx_sort_regions();
    before = failures;
    expect(FLOOR + 0x100000, 0x100000, true, "over-full table: the whole window");
    for ( unsigned int i = 0; i <= PVX_MAX_REGIONS; i++ )
    {
        uint64_t r = i < PVX_MAX_REGIONS ? FLOOR + 0x1000 * i + (i == 7 ? 0xff0 : 0)
                                         : FLOOR + 0x300000;
        unsigned int covered = covering(r, i < PVX_MAX_REGIONS ? 0x10 : 0x100);

        if ( covered != 1 )
        {
            printf("FAIL over-full table: range %u in %u regions\n", i, covered);
            failures++;
        }
    }
    /* Regions 7 (moved to the end of its page) and 8 merged: 0 between. */
    expect_full_table(0x10 * PVX_MAX_REGIONS + 0x100, "over-full table");
    if ( failures == before )
        printf("ok   over-full table\n");

    /*
     * And where the new range is one of the closest pair: 128 ranges 0xff0
     * frames apart, then one 8 frames past region 5's end. Region 5 takes
     * it (0x20 frames now), no slot changes hands, and only the 8 frames
     * between are reserved besides. (A rule that dropped the new range,
     * less reserved, passed the case above: a review of 2026-12-07.)
     */
    reset(FLOOR + 0x100000, FLOOR + 0x200000);
    for ( unsigned int i = 0; i < PVX_MAX_REGIONS; i++ )
        pvx_add_region(FLOOR + 0x1000 * i, 0x10, i & 1);
    pvx_add_region(FLOOR + 0x1000 * 5 + 0x18, 8, 2);
    pvx_sort_regions();
    before = failures;
    expect(FLOOR + 0x100000, 0x100000, true, "over-full table, new range merged: the window");
    if ( covering(FLOOR + 0x1000 * 5 + 0x18, 8) != 1 || covering(FLOOR + 0x1000 * 5 + 0x10, 8) != 1 )
    {
        printf("FAIL over-full table, new range merged: it or the frames before it unreserved\n");
        failures++;
    }
    expect_full_table(0x10 * PVX_MAX_REGIONS + 0x10, "over-full table, new range merged");
    if ( failures == before )
        printf("ok   over-full table, new range merged\n");

    /* Before the engine reported its window, nothing passes. */
    reset(0, 0);
    expect(FLOOR, 1, false, "no window yet");

    /*
     * What the glue's map and unmap call: refuses, and says so at the 1st,
     * 2nd, 4th... refusal (10 refusals: 4 lines, counted by the caller).
     */
    reset(FLOOR, UINT64_MAX);
    pvx_add_region(FLOOR + 0x1000, 0x10, 1);
    pvx_sort_regions();
    if ( pvx_run_refused("map", FLOOR + 0x1010, 1) )
    {
        printf("FAIL pvx_run_refused: a run in the window\n");
        failures++;
    }
    for ( unsigned int i = 0; i < 10; i++ )
        if ( !pvx_run_refused("map", FLOOR + 0x1005, 1) )
        {
            printf("FAIL pvx_run_refused: a run on a region\n");
            failures++;
        }
    /*
     * What the glue's unmap answers the engine (5 more refusals, no line:
     * the 16th would print one): nothing in the window; -ENOENT for one
     * page outside it (the engine releases the slot), -EINVAL for a run
     * (it retries page by page). At the region's edges: a run that ends
     * right below it passes, one whose last page is its first does not,
     * nor its last page.
     */
    if ( pvx_unmap_refused(FLOOR + 0x1010, 4) != 0 ||
         pvx_unmap_refused(FLOOR + 0x1005, 1) != -ENOENT ||
         pvx_unmap_refused(FLOOR + 0x100e, 4) != -EINVAL ||
         pvx_unmap_refused(FLOOR - 1, 1) != -ENOENT ||
         pvx_unmap_refused(FLOOR + 0x1000 - 4, 4) != 0 ||
         pvx_unmap_refused(FLOOR + 0x1000 - 3, 4) != -EINVAL ||
         pvx_unmap_refused(FLOOR + 0x100f, 1) != -ENOENT )
    {
        printf("FAIL pvx_unmap_refused\n");
        failures++;
    }

    if ( failures )
    {
        printf("run-window: %d wrong answers\n", failures);
        return 1;
    }
    printf("run-window: all answers right\n");
    return 0;
}
C
cc -std=gnu11 -Wall -Wextra -Werror -O1 -I"$WORK" -I"$HERE/tests" -o "$WORK/test" "$WORK/test.c"
"$WORK/test" | tee "$WORK/out"
lines=$(grep -c "outside the window, refused" "$WORK/out" || true)
[ "$lines" = 4 ] || { echo "run-window: $lines refusal lines for 10 refusals, want 4 (1st, 2nd, 4th, 8th)" >&2; exit 1; }
