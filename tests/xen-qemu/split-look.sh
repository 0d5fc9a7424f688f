#!/bin/sh
# init.sh's unmapped_without_a_split, run on the host against measurement
# output of each shape: a pass with no split, a Xen without perf counters,
# a split the untimed pass alone counted (judged on the timed pass, with a
# MEASURE line), a split in both passes, and a split with no timed pass.
# Exits non-zero on a wrong answer.
set -eu
INIT="$(dirname "$0")/init.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
{
    grep '^field() ' "$INIT"
    sed -n '/^unmapped_without_a_split() {/,/^}/p' "$INIT"
} > "$WORK/fns.sh"
grep -q 'return 1' "$WORK/fns.sh" || { echo "split-look: the function was not found in init.sh" >&2; exit 1; }
. "$WORK/fns.sh"

failures=0
# case NAME WANT(0|1) WANT_MEASURE(ok|ko|none) OUTPUT
case_() {
    got=0
    out=$(unmapped_without_a_split "$4" pviommu_2m) || got=1
    line=$(echo "$out" | sed -n 's/^MEASURE pviommu_2m_split_retried second=\([a-z]*\).*/\1/p')
    [ -n "$line" ] || line=none
    if [ "$got" = "$2" ] && [ "$line" = "$3" ]; then
        echo "ok   $1"
    else
        echo "FAIL $1: status $got, MEASURE $line (want $2, $3): $out"
        failures=$((failures + 1))
    fi
}
u() { echo "MEASURE pviommu_2m$1_unmap pages=16384 seconds=0.1 hypercalls=32 unmapped=16384 measured=$2 shatters=$3 coalesces=0"; }
nl='
'
case_ "no split" 0 none "$(u "" 1 0)$nl$(u _timed 1 0)"
case_ "no perf counters" 0 none "$(u "" 0 0)$nl$(u _timed 0 0)"
case_ "a split in the untimed pass only" 0 ok "$(u "" 1 1)$nl$(u _timed 1 0)"
case_ "a split in both passes" 1 ko "$(u "" 1 32)$nl$(u _timed 1 32)"
case_ "a split, and the timed pass without counters" 1 ko "$(u "" 1 1)$nl$(u _timed 0 0)"
case_ "a split, and no timed pass" 1 ko "$(u "" 1 1)"
# Another measurement's split is not this one's.
case_ "a split in another measurement" 0 none \
    "$(u "" 1 0)$nl$(u _timed 1 0)${nl}MEASURE pviommu_2mx_unmap pages=16384 measured=1 shatters=5"
[ "$failures" = 0 ] || { echo "split-look: $failures wrong"; exit 1; }
