#!/bin/bash
# The pviommu= boot option parser (pviommu-common.inc's parse_pviommu),
# compiled on the host with Xen's semantics for what it calls (parse_bool,
# and simple_strtoull, which wraps silently on overflow rather than
# saturating like the C library's strtoull), and run against good and
# hostile values. Exits non-zero on a wrong answer. (The Arm glue's extra
# `dom0-p2m` option, under PVX_DOM0_P2M, is not compiled here.)
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

# The option's variables and parser, as they are in the glue.
sed -n '/^#define PVX_MAX_QUOTA/,/^static int __init cf_check parse_pviommu/{/^static int __init cf_check parse_pviommu/!p}' \
    "$HERE/pviommu-common.inc" > "$WORK/vars.inc"
sed -n '/^static int __init cf_check parse_pviommu/,/^}/p' "$HERE/pviommu-common.inc" > "$WORK/parse.inc"
grep -q 'return rc;' "$WORK/parse.inc" || { echo "parse-option: parse_pviommu not found" >&2; exit 1; }

cat > "$WORK/test.c" <<'EOF'
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define __init
#define __initdata
#define cf_check
#define MAX_PARAM_SIZE 128

/* Xen 4.17's parse_bool (common/kernel.c). */
static int parse_bool(const char *s, const char *e)
{
    size_t len = e - s;
    if ( (len == 2 && !strncmp(s, "no", 2)) || (len == 3 && !strncmp(s, "off", 3)) ||
         (len == 5 && !strncmp(s, "false", 5)) || (len == 7 && !strncmp(s, "disable", 7)) ||
         (len == 1 && *s == '0') )
        return 0;
    if ( (len == 3 && !strncmp(s, "yes", 3)) || (len == 2 && !strncmp(s, "on", 2)) ||
         (len == 4 && !strncmp(s, "true", 4)) || (len == 6 && !strncmp(s, "enable", 6)) ||
         (len == 1 && *s == '1') )
        return 1;
    return -1;
}

/* Xen 4.17's simple_strtoull (common/vsprintf.c): base 0 takes 0x and 0
 * prefixes, base 16 skips a 0x; no overflow check. */
static unsigned long long simple_strtoull(const char *cp, const char **endp, unsigned int base)
{
    unsigned long long result = 0, value;
    if ( !base )
    {
        base = 10;
        if ( *cp == '0' )
        {
            base = 8;
            cp++;
            if ( (*cp == 'x' || *cp == 'X') &&
                 ((cp[1] >= '0' && cp[1] <= '9') || (cp[1] >= 'a' && cp[1] <= 'f') ||
                  (cp[1] >= 'A' && cp[1] <= 'F')) )
            {
                cp++;
                base = 16;
            }
        }
    }
    else if ( base == 16 && cp[0] == '0' && (cp[1] == 'x' || cp[1] == 'X') )
        cp += 2;
    for ( ;; cp++ )
    {
        if ( *cp >= '0' && *cp <= '9' ) value = *cp - '0';
        else if ( *cp >= 'a' && *cp <= 'f' ) value = *cp - 'a' + 10;
        else if ( *cp >= 'A' && *cp <= 'F' ) value = *cp - 'A' + 10;
        else break;
        if ( value >= base )
            break;
        result = result * base + value;
    }
    if ( endp )
        *endp = cp;
    return result;
}

#include "vars.inc"
#include "parse.inc"

static int failures;

/* Parse `opt` from the defaults; on success every option must be as given
 * (on, batch, quota, heap MiB). */
static void expect_all(const char *opt, int rc_want, bool on, unsigned long long batch,
                       unsigned long long quota, unsigned long long heap)
{
    opt_pviommu = true;
    opt_pviommu_batch = 0;
    opt_pviommu_quota = 0;
    opt_pviommu_heap_mib = PVX_DEFAULT_HEAP_MIB;
    opt_pviommu_item_refused = false;
    int rc = parse_pviommu(opt);
    /* Any refused item leaves PV-IOMMU off (fail closed); none, not. */
    if ( rc != rc_want || opt_pviommu_item_refused != (rc != 0) ||
         (rc == 0 && (opt_pviommu != on || opt_pviommu_batch != batch ||
                      opt_pviommu_quota != quota || opt_pviommu_heap_mib != heap)) )
    {
        printf("FAIL pviommu=%s: rc=%d on=%d batch=%u quota=%llu heap=%u (want rc=%d on=%d "
               "batch=%llu quota=%llu heap=%llu)\n",
               opt, rc, opt_pviommu, opt_pviommu_batch, (unsigned long long)opt_pviommu_quota,
               opt_pviommu_heap_mib, rc_want, on, batch, quota, heap);
        failures++;
    }
    else
        printf("ok   pviommu=%s\n", opt);
}

static void expect(const char *opt, int rc_want, unsigned long long batch, unsigned long long quota)
{
    expect_all(opt, rc_want, true, batch, quota, PVX_DEFAULT_HEAP_MIB);
}

/*
 * reserve=: parse `opt` with no range recorded before; want rc, and on
 * success the `n` ranges given (first, last pairs), nothing else changed.
 */
static void expect_reserve(const char *opt, int rc_want, unsigned int n, const uint64_t *ranges)
{
    opt_pviommu = true;
    opt_pviommu_batch = 0;
    opt_pviommu_quota = 0;
    opt_pviommu_nr_reserve = 0;
    opt_pviommu_item_refused = false;
    int rc = parse_pviommu(opt);
    bool ok = rc == rc_want;
    /* Any refused item turns PV-IOMMU off (fail closed); none, not. */
    ok = ok && opt_pviommu_item_refused == (rc != 0);
    if ( ok && rc == 0 )
    {
        ok = opt_pviommu_nr_reserve == n;
        for ( unsigned int i = 0; ok && i < n; i++ )
            ok = opt_pviommu_reserve[i].first == ranges[2 * i] &&
                 opt_pviommu_reserve[i].last == ranges[2 * i + 1];
    }
    /* A refused item records nothing of itself. */
    if ( ok && rc != 0 )
        ok = opt_pviommu_nr_reserve <= n;
    if ( !ok )
    {
        printf("FAIL pviommu=%s: rc=%d, %u ranges (want rc=%d, %u)\n", opt, rc,
               opt_pviommu_nr_reserve, rc_want, n);
        failures++;
    }
    else
        printf("ok   pviommu=%s\n", opt);
}

/*
 * The series' first spelling, name:value, or a misspelt item: refused
 * (Xen reports the value invalid), every limit left at its default, and
 * PV-IOMMU turned off (review 155: a refused heap: had run the host on
 * the default heap, and "reserv=" had left a window open).
 */
static void expect_old_spelling(const char *opt, bool off_want)
{
    opt_pviommu = true;
    opt_pviommu_batch = 0;
    opt_pviommu_quota = 0;
    opt_pviommu_heap_mib = PVX_DEFAULT_HEAP_MIB;
    opt_pviommu_nr_reserve = 0;
    opt_pviommu_item_refused = false;
    int rc = parse_pviommu(opt);
    if ( rc != -EINVAL || opt_pviommu_batch || opt_pviommu_quota ||
         opt_pviommu_heap_mib != PVX_DEFAULT_HEAP_MIB || opt_pviommu_nr_reserve ||
         opt_pviommu_item_refused != off_want )
    {
        printf("FAIL pviommu=%s: rc=%d batch=%u quota=%llu heap=%u ranges=%u refused=%d "
               "(want rc=%d, defaults, refused=%d)\n",
               opt, rc, opt_pviommu_batch, (unsigned long long)opt_pviommu_quota,
               opt_pviommu_heap_mib, opt_pviommu_nr_reserve, opt_pviommu_item_refused,
               -EINVAL, off_want);
        failures++;
    }
    else
        printf("ok   pviommu=%s (old spelling refused)\n", opt);
}

int main(void)
{
    expect("on", 0, 0, 0);
    expect_all("off", 0, false, 0, 0, PVX_DEFAULT_HEAP_MIB);
    expect_all("off,batch=8,heap=64", 0, false, 8, 0, 64);
    expect_all("heap=0x10000", 0, true, 0, 0, 0x10000);
    expect_all("heap=0x10001", -EINVAL, true, 0, 0, 0);
    expect_all("heap=8", 0, true, 0, 0, 8);
    expect_all("heap=7", -EINVAL, true, 0, 0, 0);
    expect_all("heap=1", -EINVAL, true, 0, 0, 0);
    expect("batch=64,quota=0x1000", 0, 64, 0x1000);
    expect("batch=4294967295", 0, 4294967295u, 0);
    expect("batch=0xffffffff", 0, 0xffffffffu, 0);
    expect("batch=4294967296", -EINVAL, 0, 0);
    /* 2^64 + 1 wraps to 1 in simple_strtoull: refused by its length. */
    expect("batch=0x10000000000000001", -EINVAL, 0, 0);
    expect("batch=18446744073709551617", -EINVAL, 0, 0);
    expect("batch=0", -EINVAL, 0, 0);
    expect("batch=", -EINVAL, 0, 0);
    expect("batch=12x", -EINVAL, 0, 0);
    expect("quota=0x1000000", 0, 0, 0x1000000);
    expect("quota=0x1000001", -EINVAL, 0, 0);
    expect("quota=0x10000000000000001", -EINVAL, 0, 0);
    expect("heap=0x100000000000000001", -EINVAL, 0, 0);
    expect("nonsense", -EINVAL, 0, 0);
    /* Xen's name=value only: the series' first spelling is refused. */
    expect_old_spelling("quota:0x1000", true);
    expect_old_spelling("batch:64", true);
    expect_old_spelling("heap:64", true);
    expect_old_spelling("reserve:0x100000000-0x8ffffffff", true);
    expect_old_spelling("reserve-0x100000000-0x8ffffffff", true);
    expect_old_spelling("reserve", true);
    expect_old_spelling("reserv=0x100000000-0x8ffffffff", true);
    expect_old_spelling("Reserve=0x100000000-0x8ffffffff", true);
    expect_all("on,heap=64,nonsense", -EINVAL, true, 0, 0, 64);

    /* reserve=<first>-<last>: bytes, both ends included, hexadecimal as
     * /proc/iomem prints them, 0x or not. */
    const uint64_t qemu[] = { 0x100000000ULL, 0x8ffffffffULL };
    expect_reserve("reserve=0x100000000-0x8ffffffff", 0, 1, qemu);
    expect_reserve("reserve=100000000-8ffffffff", 0, 1, qemu);
    expect_reserve("reserve=0X100000000-8FFFFFFFF", 0, 1, qemu);
    expect_reserve("reserve=0x-0x10", -EINVAL, 0, NULL);
    /* simple_strtoull with base 16 skips a 0x itself: a second is refused. */
    expect_reserve("reserve=0x0x10-0x20", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x0x-0x0x", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x10-0x0x20", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x10-0X0X20", -EINVAL, 0, NULL);
    expect_reserve("reserve=12g-13", -EINVAL, 0, NULL);
    const uint64_t two[] = { 0x100000000ULL, 0x8ffffffffULL, 0x3800000000ULL, 0x3fffffffffULL };
    expect_reserve("reserve=0x100000000-0x8ffffffff,batch=8,reserve=0x3800000000-0x3fffffffff", 0, 2, two);
    const uint64_t one_byte[] = { 0x4096, 0x4096 };
    expect_reserve("reserve=4096-4096", 0, 1, one_byte);
    const uint64_t top[] = { 0xfffffffffffffULL, 0xfffffffffffffULL };
    expect_reserve("reserve=0xfffffffffffff-0xfffffffffffff", 0, 1, top);
    expect_reserve("reserve=0x10000000000000-0x10000000000000", -EINVAL, 0, NULL); /* 2^52 */
    expect_reserve("reserve=0x8ffffffff-0x100000000", -EINVAL, 0, NULL);           /* last < first */
    expect_reserve("reserve=0x100000000", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x100000000-", -EINVAL, 0, NULL);
    expect_reserve("reserve=-0x100000000", -EINVAL, 0, NULL);
    expect_reserve("reserve=", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x1000-0x2000x", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x1000+0x2000", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x1000--0x2000", -EINVAL, 0, NULL);
    /* 2^64 + 0x1000 wraps to 0x1000 in simple_strtoull: refused by length. */
    expect_reserve("reserve=0x10000000000001000-0x10000000000002000", -EINVAL, 0, NULL);
    expect_reserve("reserve=0x00000000000000001000-0x2000", -EINVAL, 0, NULL);
    expect_reserve("reserve=10000000000001000-10000000000002000", -EINVAL, 0, NULL);
    /*
     * Xen cuts each option at 127 characters: what is left of an item
     * ("reser", "reserve=0x1") is refused, so PV-IOMMU stays off.
     */
    expect_reserve("reserve=0x100000000-0x8ffffffff,reser", -EINVAL, 1, qemu);
    expect_reserve("reserve=0x100000000-0x8ffffffff,reserve=0x1", -EINVAL, 1, qemu);
    expect_reserve("reserve=0x100000000-0x8ffffffff,r", -EINVAL, 1, qemu);
    /* Eight are kept; a ninth is refused (and PV-IOMMU off). */
    const uint64_t eight[] = { 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8 };
    expect_reserve("reserve=1-1,reserve=2-2,reserve=3-3,reserve=4-4,"
                   "reserve=5-5,reserve=6-6,reserve=7-7,reserve=8-8", 0, 8, eight);
    expect_reserve("reserve=1-1,reserve=2-2,reserve=3-3,reserve=4-4,"
                   "reserve=5-5,reserve=6-6,reserve=7-7,reserve=8-8,reserve=9-9", -EINVAL, 8, eight);

    /*
     * What Xen's cut of an option at 127 characters (parse_params(),
     * MAX_PARAM_SIZE) leaves of longer ones: cut right after a comma,
     * inside the last number (a window cut short, accepted before), and
     * inside an item. Each keeps PV-IOMMU off.
     */
    {
        static const char *full[] = {
            "pviommu=on,quota=0x00100000,heap=0x0400,batch=0x00001000,reserve=0x100000000-0x8ffffffff,reserve=0x380000000000-0x3807ffffffff,reserve=0x4000000000-0x7fffffffff",
            "pviommu=on,quota=0x00100000,heap=0x0400,batch=0x00001000,reserve=0x380000000000-0x3807ffffffff,reserve=0x100000000-0x3fffffffffff",
            "pviommu=on,quota=0x00100000,heap=0x0400,batch=0x0000100,reserve=0x100000000-0x8ffffffff,reserve=0x380000000000-0x3807ffffffff,reserve=0x4000000000-0x7fffffffff",
        };
        for ( unsigned int k = 0; k < 3; k++ )
        {
            char opt[128];
            snprintf(opt, sizeof(opt), "%s", full[k]);   /* Xen's cut */
            opt_pviommu = true; opt_pviommu_nr_reserve = 0;
            opt_pviommu_item_refused = false;
            int rc = parse_pviommu(opt + 8);
            printf("%s cut: value \"%s\" rc=%d refused=%d items=%u",
                   opt_pviommu_item_refused ? "ok  " : "FAIL", opt + 8, rc,
                   opt_pviommu_item_refused, opt_pviommu_nr_reserve);
            for ( unsigned int i = 0; i < opt_pviommu_nr_reserve; i++ )
                printf(" [%#llx-%#llx]", (unsigned long long)opt_pviommu_reserve[i].first,
                       (unsigned long long)opt_pviommu_reserve[i].last);
            printf("\n");
            if ( !opt_pviommu_item_refused ) failures++;
        }
    }
    if ( failures )
        printf("parse-option: %d wrong\n", failures);
    return failures != 0;
}
EOF
gcc -std=gnu11 -Wall -Wno-unused-function -Werror -I"$WORK" -o "$WORK/test" "$WORK/test.c"
"$WORK/test"

# The option's description (patch 0009, docs/misc/xen-command-line.pandoc)
# names each item the parser takes, spelled as it takes it (name=value):
# the docs said `quota:` while the parser, and Xen's other options, take
# name=value only.
DOCS="$HERE/patches/0009-docs-pviommu-option-and-support-status.patch"
items=$(grep -o '!strncmp(s, "[a-z0-9-]*=", [0-9]*)' "$WORK/parse.inc" | sed 's/.*"\([a-z0-9-]*=\)".*/\1/')
[ "$(echo "$items" | wc -w)" = 4 ] || { echo "parse-option: want 4 name= items in the parser: $items" >&2; exit 1; }
for item in $items; do
    grep -q "^+\*   \`$item<" "$DOCS" || { echo "FAIL docs: no \`$item<...>\` item in $DOCS" >&2; exit 1; }
    grep -q "^+>.* $item<" "$DOCS" || { echo "FAIL docs: \`$item\` not in the option's synopsis" >&2; exit 1; }
done
if grep -Eq '^\+.*`(quota|batch|heap|reserve):' "$DOCS"; then
    echo "FAIL docs: an item spelled name: in $DOCS" >&2; exit 1
fi
echo "ok   docs: $(echo $items) described as parsed"
