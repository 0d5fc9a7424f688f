#!/bin/bash
# The VRAM range the engine publishes for a device model's revocation
# (pviommu_vram_revoke_in in the staticlib: last = 0, cursor = 0, first,
# last, one word at a time, no lock) as a page lookup on another CPU reads
# it: pvx_vram_range() (pviommu.c), compiled on the host and run against
# every interleaving of its loads with one publication's stores (from a
# range, or from a lifted one: [0, 0)). Each read must give the old
# range, the new one, or an empty one (the engine's comment:
# a map an empty range lets through is the walk's, which starts after the
# stores). The same enumeration run on the two-load reader the glue had
# before (first, then last) must find a range that is neither, or this
# test could not fail. Two publications inside one read (a stall across
# two dm_ops) can still mix them; pvx_vram_range()'s comment says why
# that is harmless. Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

sed -n '/^static void pvx_vram_range(/,/^}/p' "$HERE/pviommu.c" > "$WORK/reader.inc"
grep -q 'ACCESS_ONCE(s->last)' "$WORK/reader.inc" ||
    { echo "vram-range: no pvx_vram_range() reading s->last in pviommu.c" >&2; exit 1; }
# Both of the glue's readers go through it.
for f in pvx_vram_sweeping pvx_page_run; do
    sed -n "/^static [a-z0-9_ ]*$f(/,/^}/p" "$HERE/pviommu.c" | grep -q 'pvx_vram_range(d, &first, &last);' ||
        { echo "vram-range: $f() does not read the range through pvx_vram_range()" >&2; exit 1; }
done
if sed -n '/^static bool pvx_vram_sweeping(/,/^}/p;/^static uint32_t pvx_page_run(/,/^}/p' "$HERE/pviommu.c" |
       grep -q 'ACCESS_ONCE(s->'; then
    echo "vram-range: a reader of the range loads its words itself" >&2; exit 1
fi

cat > "$WORK/test.c" <<'C'
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>

struct pviommu_range_sweep { uint64_t first, last, cursor; };
struct domain { void *pviommu_vram_sweep; };

/* The engine's stores, in its order, from the old range to the new. */
static struct pviommu_range_sweep sweep;
static uint64_t new_first, new_last;
static unsigned int done; /* engine stores made so far */
static const unsigned int *plan; /* stores to have made before load i */
static unsigned int loads;

static void engine_until(unsigned int n)
{
    for ( ; done < n; done++ )
        switch ( done )
        {
        case 0: sweep.last = 0; break;
        case 1: sweep.cursor = 0; break;
        case 2: sweep.first = new_first; break;
        case 3: sweep.last = new_last; break;
        }
}
#define STORES 4

static const void *before_load(const void *p)
{
    engine_until(plan[loads++]);
    return p;
}
#define ACCESS_ONCE(x) (*(volatile __typeof__(x) *)before_load(&(x)))
#define smp_rmb() do { } while ( 0 )

#include "reader.inc"

/* What the glue read before the audit: first, then last. */
static void two_loads(const struct domain *d, uint64_t *first, uint64_t *last)
{
    const struct pviommu_range_sweep *s = d->pviommu_vram_sweep;

    *first = ACCESS_ONCE(s->first);
    *last = ACCESS_ONCE(s->last);
}

/* Every interleaving of up to three loads with the four stores, for old
 * and new ranges in either order: how many reads gave a range that was
 * neither old, nor new, nor empty. */
static int torn_reads(void (*read)(const struct domain *, uint64_t *, uint64_t *),
                      const char *who, int quiet)
{
    static const uint64_t ranges[][4] = {
        /* old first, old last, new first, new last */
        { 100, 200, 300, 400 }, { 300, 400, 100, 200 }, { 100, 400, 200, 300 },
        { 200, 300, 100, 400 }, { 0, 0, 100, 200 }, { 100, 200, 150, 200 },
    };
    struct domain d = { &sweep };
    unsigned int r, a, b, c;
    int torn = 0;

    for ( r = 0; r < sizeof(ranges) / sizeof(ranges[0]); r++ )
        for ( a = 0; a <= STORES; a++ )
            for ( b = a; b <= STORES; b++ )
                for ( c = b; c <= STORES; c++ )
                {
                    const unsigned int at[3] = { a, b, c };
                    uint64_t f, l;

                    sweep = (struct pviommu_range_sweep){ ranges[r][0], ranges[r][1], 7 };
                    new_first = ranges[r][2];
                    new_last = ranges[r][3];
                    done = 0;
                    loads = 0;
                    plan = at;
                    read(&d, &f, &l);
                    if ( f >= l ||
                         (f == ranges[r][0] && l == ranges[r][1]) ||
                         (f == new_first && l == new_last) )
                        continue;
                    if ( !quiet )
                        printf("FAIL %s: [%" PRIu64 ", %" PRIu64 ") from [%" PRIu64 ", %" PRIu64
                               ") to [%" PRIu64 ", %" PRIu64 "), loads after %u/%u/%u stores\n",
                               who, f, l, ranges[r][0], ranges[r][1], new_first, new_last, a, b, c);
                    torn++;
                }
    return torn;
}

int main(void)
{
    int torn = torn_reads(pvx_vram_range, "pvx_vram_range", 0);
    int old = torn_reads(two_loads, "two loads", 1);

    printf("vram-range: pvx_vram_range: %d torn reads; the two-load reader: %d\n", torn, old);
    if ( old == 0 )
    {
        printf("FAIL the enumeration finds nothing wrong with the two-load reader either\n");
        return 1;
    }
    return torn != 0;
}
C
gcc -std=gnu11 -Wall -Werror -o "$WORK/test" "$WORK/test.c"
"$WORK/test"
echo "vram-range: every read gives the old range, the new one, or none"
