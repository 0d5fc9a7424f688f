#!/bin/bash
# do_pv_iommu_op() (pviommu-common.inc) on the host, with the engine's
# answers scripted: a batch that ended in an error, its cells not all
# finished in that entry, continues as the command the engine answered
# (hypercall::BatchEnding: the error and the named contexts ride in it, as
# memory_op carries its progress in cmd), and so do that command's own
# entries, until the engine answers the error. Before a review of
# 2026-12-07 the engine finished every cell in the failing entry,
# unbounded; the glue had no way to continue such a call. Anything else
# positive is still never continued. The function with the new branch cut
# out must fail here, or this test could not.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

op() { sed -n '/^long do_pv_iommu_op(/,/^}/p' "$HERE/pviommu-common.inc"; }
op > "$WORK/fixed.inc"
sed -n '/^static bool pvx_is_batch_ending(/,/^}/p' "$HERE/pviommu-common.inc" > "$WORK/ending.inc"
grep -q 'pvx_is_batch_ending(rc)' "$WORK/fixed.inc" ||
    { echo "batch-ending: do_pv_iommu_op() does not ask pvx_is_batch_ending()" >&2; exit 1; }
[ -s "$WORK/ending.inc" ] || { echo "batch-ending: no pvx_is_batch_ending()" >&2; exit 1; }
# The branch cut out: from its `else if` to the line before the next one.
op | awk '/else if \( pvx_is_batch_ending\(rc\)/ { skip = 1 }
          skip && /else if \( rc > 0 \)/ { skip = 0 }
          !skip { print }' |
    sed 's/do_pv_iommu_op(/do_pv_iommu_op_before(/' > "$WORK/before.inc"
if grep -q pvx_is_batch_ending "$WORK/before.inc"; then
    echo "batch-ending: could not cut the branch out" >&2; exit 1
fi

{
    grep -E '^#define PVIOMMU_ENGINE_(PREEMPTED|BATCH_ENDING(_BITS)?) ' "$HERE/include/pviommu_engine.h"
    grep -E '^#define PVIOMMU_CMD_(batch|stats) ' "$HERE/public/pv-iommu.h"
} > "$WORK/consts.h"
[ "$(wc -l < "$WORK/consts.h")" = 5 ] ||
    { echo "batch-ending: constants not found:" >&2; cat "$WORK/consts.h" >&2; exit 1; }

cat > "$WORK/test.c" <<'C'
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <errno.h>

#include "consts.h"
#define __HYPERVISOR_pv_iommu_op 43
#define ASSERT_UNREACHABLE() ((void)0)
typedef struct { void *p; } handle_t;
#define XEN_GUEST_HANDLE_PARAM(t) handle_t
struct domain { uint16_t domain_id; };
struct vcpu { struct domain *domain; };
static struct domain dom0;
static struct vcpu cpu0 = { &dom0 }, *current = &cpu0;
static bool pviommu_ready = true;
static bool pvx_caller_not_64bit(struct vcpu *v) { (void)v; return false; }
/* A release build: no stack measurement (a debug Xen's, pvx_stack_note()). */
static unsigned long pvx_stack_paint(void) { return 0; }
static void pvx_stack_note(unsigned long limit, const char *what) { (void)limit; (void)what; }

/* The engine's answer, scripted; the continuation made, recorded. */
static long engine_answer;
static unsigned int engine_cmd;
static long pviommu_engine_op(uint16_t caller, unsigned int cmd, uint64_t arg)
{
    (void)caller; (void)arg;
    engine_cmd = cmd;
    return engine_answer;
}
static int continued;
static unsigned int cont_cmd;
static void *cont_arg;
#define CONTINUATION 77 /* what hypercall_create_continuation() returns */
/* Xen's: the arguments by the format's letters ("ih": cmd, the handle). */
static long hypercall_create_continuation(unsigned int op, const char *fmt, ...)
{
    va_list ap;

    if ( op != __HYPERVISOR_pv_iommu_op || fmt[0] != 'i' || fmt[1] != 'h' || fmt[2] )
        return -999;
    va_start(ap, fmt);
    cont_cmd = va_arg(ap, unsigned int);
    cont_arg = va_arg(ap, handle_t).p;
    va_end(ap);
    continued++;
    return CONTINUATION;
}

#include "ending.inc"
#include "fixed.inc"
#include "before.inc"

#define ENDING(errno_, contexts) \
    (PVIOMMU_ENGINE_BATCH_ENDING | (errno_) << 16 | (contexts))

static int failed;

/* One entry: cmd in, the engine answers `answer`; want `rc` back and a
 * continuation with `want_cmd` (0: none). */
static void entry(const char *what, long (*f)(unsigned int, handle_t),
                  unsigned int cmd, long answer, long rc, unsigned int want_cmd)
{
    handle_t arg = { (void *)0x1000 };
    long got;

    engine_answer = answer;
    continued = 0;
    cont_cmd = 0;
    cont_arg = NULL;
    got = f(cmd, arg);
    if ( got != rc || engine_cmd != cmd || (want_cmd ? continued != 1 || cont_cmd != want_cmd ||
                                            cont_arg != (void *)0x1000 : continued != 0) )
    {
        printf("batch-ending: FAIL %s: rc %ld (want %ld), %d continuations, cmd %#x (want %#x)\n",
               what, got, rc, continued, cont_cmd, want_cmd);
        failed = 1;
    }
}

int main(void)
{
    unsigned int ending = ENDING(EFAULT, 0x6);

    entry("a batch preempted", do_pv_iommu_op, PVIOMMU_CMD_batch,
          PVIOMMU_ENGINE_PREEMPTED, CONTINUATION, PVIOMMU_CMD_batch);
    entry("a batch ending in an error, cells left", do_pv_iommu_op, PVIOMMU_CMD_batch,
          ending, CONTINUATION, ending);
    entry("its ending, cells still left", do_pv_iommu_op, ending,
          ending, CONTINUATION, ending);
    entry("its ending, done", do_pv_iommu_op, ending, -EFAULT, -EFAULT, 0);
    entry("a batch ending in an error, done", do_pv_iommu_op, PVIOMMU_CMD_batch,
          -EFAULT, -EFAULT, 0);
    entry("stats answering an ending", do_pv_iommu_op, PVIOMMU_CMD_stats,
          ending, -EINVAL, 0);
    entry("stats answering PREEMPTED", do_pv_iommu_op, PVIOMMU_CMD_stats,
          PVIOMMU_ENGINE_PREEMPTED, -EINVAL, 0);
    entry("an ending with a reserved bit", do_pv_iommu_op, PVIOMMU_CMD_batch,
          ending | 1U << 24, -EINVAL, 0);
    entry("an ending past 32 bits", do_pv_iommu_op, PVIOMMU_CMD_batch,
          (long)ending | 1L << 32, -EINVAL, 0);
    entry("an ending's entry answering PREEMPTED", do_pv_iommu_op, ending,
          PVIOMMU_ENGINE_PREEMPTED, -EINVAL, 0);
    entry("the engine's flag alone", do_pv_iommu_op, PVIOMMU_CMD_batch,
          PVIOMMU_ENGINE_BATCH_ENDING, CONTINUATION, PVIOMMU_ENGINE_BATCH_ENDING);

    /* The function as it was: a batch ending in an error cannot continue. */
    engine_answer = ending;
    {
        handle_t arg = { (void *)0x1000 };
        continued = 0;
        if ( do_pv_iommu_op_before(PVIOMMU_CMD_batch, arg) != -EINVAL || continued )
        {
            printf("batch-ending: FAIL the function as it was continued the ending (this test cannot fail)\n");
            failed = 1;
        }
    }
    if ( !failed )
        printf("batch-ending: ok (an ending continues as the engine's command until it answers)\n");
    return failed;
}
C
build_test test
"$WORK/test"
