#!/bin/bash
# The glue's calls of the IOMMU driver's pviommu_* ops (pviommu-common.inc),
# on the host with a driver that has none of them (AMD-Vi, an SMMU before
# patch 0009): each answers -EOPNOTSUPP and calls nothing, where Xen would
# have called through a NULL op (patched into a trap at boot: a host
# crash). A review of 2026-12-07 found the fault path reaching
# pviommu_device_facts on AMD-Vi that way. With the ops there, each call
# reaches its op with its arguments. The glue calls a pviommu_* op through
# pvx_iommu_op() only, but for pvx_ctx_caps() and the address width, which
# check the op first (checked below by reading the source). The guard cut
# out must crash, or this test could not fail.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

COMMON="$HERE/pviommu-common.inc"
sed -n '/^#define pvx_iommu_op(/,/-EOPNOTSUPP)$/p' "$COMMON" > "$WORK/guard.inc"
grep -q 'EOPNOTSUPP' "$WORK/guard.inc" || { echo "iommu-ops: no pvx_iommu_op()" >&2; exit 1; }
# The glue as it was: the op called whether the driver has it or not.
echo '#define pvx_iommu_op(op, args...) iommu_call(iommu_get_ops(), op, ## args)' > "$WORK/before.inc"
: > "$WORK/wrappers.inc"
for f in pvx_ctx_alloc pvx_ctx_free pvx_ctx_flush pvx_device_facts pvx_device_attach pvx_device_detach; do
    sed -n "/^int $f(/,/^}/p" "$COMMON" >> "$WORK/wrappers.inc"
    grep -q "^int $f(" "$WORK/wrappers.inc" || { echo "iommu-ops: no $f()" >&2; exit 1; }
done

# Every mention of a pviommu_* op in the glue, comments aside, is one of
# the forms the guard allows: a call through pvx_iommu_op(), the two calls
# that check their op first (pvx_ctx_caps(), the address width), a check
# that an op is there, the caps struct's name. Anything else fails: a call
# outside the guard by iommu_call or iommu_vcall, through the op's pointer
# (o->op(...), (*o->op)(...)), or the op saved in a pointer or passed on
# to be called later. (Over the sources joined into one line, so a
# mention split over lines counts; the scan before 2026-12-07 matched
# calls only, and missed the last two.)
OPS='ctx_caps|ctx_alloc|ctx_free|ctx_flush|device_facts|device_attach|device_detach|address_bits'
stray=$(cat "$COMMON" "$HERE/pviommu.c" "$HERE/arm64/pviommu-arm.c" "$HERE/pviommu-tables.inc" |
    OPS="$OPS" perl -0777 -ne '
        my $ops = $ENV{OPS};
        s{/\*.*?\*/}{ }gs; s{//[^\n]*}{ }g; s/\s+/ /g; s/\( /(/g; s/ \)/)/g;
        s/\bpvx_iommu_op\(pviommu_(?:$ops),//g;
        # The two checked calls once each, the width'"'"'s with its check right
        # before it: a second copy, or the call moved off its check, would
        # have none.
        my %once = (
            "pvx_ctx_caps()'"'"'s call" => qr/\biommu_call\(ops, pviommu_ctx_caps,/,
            "the width'"'"'s call, under its check" =>
                qr/\bif \(iommu_enabled && iommu_get_ops\(\)->pviommu_address_bits\) \w+ = iommu_call\(iommu_get_ops\(\), pviommu_address_bits\)/,
        );
        for my $what (sort keys %once) {
            my $n = s/$once{$what}/ /g || 0;
            print "$what: $n, want 1\n" if $n != 1;
        }
        s/!ops->pviommu_(?:$ops)(?= ?(?:\|\||\)))//g;
        s/\bstruct pviommu_ctx_caps\b//g;
        print "$1\n" while /(.{0,40}\bpviommu_(?:$ops)\b.{0,10})/g;')
if [ -n "$stray" ]; then
    echo "iommu-ops: a pviommu_* op reached outside pvx_iommu_op() and the two checked calls:" >&2
    echo "$stray" >&2; exit 1
fi
grep -q '!ops->pviommu_ctx_caps' "$COMMON" &&
    grep -q 'iommu_get_ops()->pviommu_address_bits )' "$HERE/pviommu.c" ||
    { echo "iommu-ops: pvx_ctx_caps() or the address width no longer checks its op" >&2; exit 1; }

cat > "$WORK/test.c" <<'C'
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define BUILD_BUG_ON(c) ((void)sizeof(char[1 - 2 * !!(c)]))
#define PVX_DEV_OWN_RID 1
#define PVX_DEV_RMRR 2
#define PVX_DEV_ATS 4
#define PVX_DEV_UNTRANSLATED 8
#define PVIOMMU_DEV_OWN_RID 1
#define PVIOMMU_DEV_RMRR 2
#define PVIOMMU_DEV_ATS 4
#define PVIOMMU_DEV_UNTRANSLATED 8
typedef uint16_t domid_t;
typedef struct { uint64_t dfn; } dfn_t;
#define _dfn(x) ((dfn_t){ (x) })
#define pfn_to_paddr(x) ((uint64_t)(x) << 12)
struct domain { domid_t domain_id; };
struct pci_dev { struct domain *domain; };
static struct domain owner = { 7 };
static struct pci_dev dev = { &owner };
static struct pci_dev *pvx_pdev(uint32_t sbdf) { (void)sbdf; return &dev; }
static bool pvx_table_page(uint64_t mfn, const char *what) { (void)mfn; (void)what; return true; }

static int called;
static int ctx_alloc(domid_t *t) { called++; *t = 5; return 0; }
static int ctx_free(domid_t t) { called++; return t == 5 ? 0 : -EINVAL; }
static int ctx_flush(domid_t t, dfn_t d, uint64_t n) { called++; return t == 5 && d.dfn == 9 && n == 3 ? 0 : -EINVAL; }
static int device_facts(const struct pci_dev *p, unsigned int *f) { called++; *f = PVX_DEV_ATS; return p == &dev ? 0 : -EINVAL; }
static int device_attach(struct pci_dev *p, domid_t t, uint64_t root) { called++; return p == &dev && t == 5 && root == 0x42000 ? 0 : -EINVAL; }
static int device_detach(struct pci_dev *p, domid_t t) { called++; return p == &dev && t == 5 ? 0 : -EINVAL; }

struct iommu_ops {
    int (*pviommu_ctx_alloc)(domid_t *);
    int (*pviommu_ctx_free)(domid_t);
    int (*pviommu_ctx_flush)(domid_t, dfn_t, uint64_t);
    int (*pviommu_device_facts)(const struct pci_dev *, unsigned int *);
    int (*pviommu_device_attach)(struct pci_dev *, domid_t, uint64_t);
    int (*pviommu_device_detach)(struct pci_dev *, domid_t);
};
static const struct iommu_ops none = { 0 }, vtd = {
    ctx_alloc, ctx_free, ctx_flush, device_facts, device_attach, device_detach,
};
static const struct iommu_ops *ops;
static const struct iommu_ops *iommu_get_ops(void) { return ops; }
#define iommu_call(o, fn, args...) ((o)->fn(args))

#ifdef BEFORE
#include "before.inc"
#else
#include "guard.inc"
#endif
#include "wrappers.inc"

static int failed;

static void all_six(const char *what, int want, int want_called)
{
    uint16_t tag = 0, owner_id = 0;
    uint32_t flags = 0;
    int rc[6];

    called = 0;
    rc[0] = pvx_ctx_alloc(&tag);
    rc[1] = pvx_ctx_free(5);
    rc[2] = pvx_ctx_flush(5, 9, 3);
    rc[3] = pvx_device_facts(0x10, &owner_id, &flags);
    rc[4] = pvx_device_attach(0x10, 5, 0x42);
    rc[5] = pvx_device_detach(0x10, 5);
    for ( int i = 0; i < 6; i++ )
        if ( rc[i] != want )
        {
            printf("iommu-ops: FAIL %s: call %d answered %d (want %d)\n", what, i, rc[i], want);
            failed = 1;
        }
    if ( called != want_called )
    {
        printf("iommu-ops: FAIL %s: %d ops called (want %d)\n", what, called, want_called);
        failed = 1;
    }
    if ( !want && (tag != 5 || owner_id != 7 || flags != PVX_DEV_ATS) )
    {
        printf("iommu-ops: FAIL %s: outputs tag %u owner %u flags %#x\n", what, tag, owner_id, flags);
        failed = 1;
    }
}

int main(void)
{
    ops = &none;
    all_six("a driver without the ops", -EOPNOTSUPP, 0);
    ops = NULL;
    all_six("no driver", -EOPNOTSUPP, 0);
    ops = &vtd;
    all_six("a driver with them", 0, 6);
    if ( !failed )
        printf("iommu-ops: ok (no op, -EOPNOTSUPP and no call; each op reached with its arguments)\n");
    return failed;
}
C
build_test test
build_test before -DBEFORE
"$WORK/test"
# The wrappers without the guard must crash on the first missing op, or
# the test above shows nothing.
rc=0
bash -c '"$1" > /dev/null' _ "$WORK/before" 2> /dev/null || rc=$?
if [ "$rc" -lt 128 ]; then
    echo "iommu-ops: FAIL the wrappers without the guard did not crash (rc $rc): this test cannot fail" >&2
    exit 1
fi
