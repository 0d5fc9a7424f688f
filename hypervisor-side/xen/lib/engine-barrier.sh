# shellcheck shell=bash
# engine-barrier.sh -- the engine object's speculation barrier before its
# page lookups; shared by ../build-engine.sh and
# ../arm64/build-engine-arm64.sh. Sourced, not run.
#
# A map passes its checks, then a speculation barrier
# (nospec::block_speculation, as Xen's evaluate_nospec() fences its XSM
# decisions), then looks its page up. Every function of the object that
# calls pvx_get_page or pvx_get_pages must have the barrier before its first call to one (in
# the text: a weaker check than every path, but one a dropped barrier
# fails; scripts/test-all.sh builds the nospec-canary engine to show it).

# check_barrier_before_lookups TAG DISASSEMBLY BARRIER FIRST SECOND CALL
#   TAG          prefix of the messages (build-engine, build-engine-arm64)
#   DISASSEMBLY  `objdump -dr --no-show-raw-insn` of the object
#   BARRIER      the barrier's name in the messages
#   FIRST        ERE of the barrier's (first) instruction
#   SECOND       ERE of the instruction that must follow FIRST directly,
#                or empty for a one-instruction barrier
#   CALL         ERE of a relocation calling pvx_get_page or pvx_get_pages
check_barrier_before_lookups() {
    awk -v tag="$1" -v barrier="$3" -v first="$4" -v second="$5" -v call="$6" '
        /^Disassembly of section/ { fn = ""; half = 0; fenced = 0; next }
        /^[0-9a-f]+ <.*>:$/ { fn = $2; half = 0; fenced = 0; next }
        # An instruction line ("  addr:<TAB>insn"; relocations start with tabs).
        /^ *[0-9a-f]+:/ {
            insn = $0; sub(/^ *[0-9a-f]+:[[:space:]]+/, "", insn)
            if (half && insn ~ ("^(" second ")")) { fenced = 1; fences++; half = 0; next }
            half = 0
            if (insn ~ ("^(" first ")")) {
                if (second == "") { fenced = 1; fences++ } else half = 1
            }
            next
        }
        $0 ~ call {
            calls++
            if (!fenced) { print tag ": FAIL: " fn " looks a page up with no " barrier " before it" > "/dev/stderr"; bad = 1 }
        }
        END {
            if (calls == 0) { print tag ": FAIL: no call to pvx_get_page(s) found" > "/dev/stderr"; bad = 1 }
            if (bad) exit 1
            printf "%s: a speculation barrier (%s) before each function'"'"'s first page lookup (%d lookups, %d barriers)\n", tag, barrier, calls, fences
        }' "$2"
}
