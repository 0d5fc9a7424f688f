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

# check_glue_barrier TAG DISASSEMBLY BARRIER FIRST SECOND
#   The glue's own barrier: pvx_get_page and pvx_get_pages, once they hold
#   the domain they found by domid, check it is the one the map checked
#   (pvx_still_checked()) and fence that compare before any p2m walk (on
#   Arm, where Xen's evaluate_nospec() is empty, with the engine's dsb nsh;
#   isb). In each of the two, in address order, the barrier (FIRST, then
#   SECOND right after it, or FIRST alone if SECOND is empty) must come
#   before any call but the domain lookup's (rcu_lock_domain_by_id) and,
#   in a debug build, ASSERT_NOT_IN_ATOMIC's: the
#   p2m lookups (pvx_lookup_page, p2m_get_entry_pages) are calls in both
#   builds. (An inlined p2m access ahead of the barrier would pass: what
#   the text can show without knowing the p2m's code.)
#   DISASSEMBLY: `objdump -dr --no-show-raw-insn` of the glue's object.
check_glue_barrier() {
    awk -v tag="$1" -v barrier="$3" -v first="$4" -v second="$5" '
        /^[0-9a-f]+ <.*>:$/ {
            fn = $2; gsub(/[<>:]/, "", fn)
            mine = (fn == "pvx_get_page" || fn == "pvx_get_pages")
            if (mine) seen[fn] = 1
            half = 0; calling = 0
            next
        }
        !mine { next }
        # A relocation line: the target of the call just seen, if any.
        /^[[:space:]]+[0-9a-f]+: R_/ {
            if (calling) {
                target = $NF; sub(/[-+]0x[0-9a-f]+$/, "", target); sub(/^\.text\./, "", target)
                if (target !~ /^(rcu_lock_domain_by_id|ASSERT_NOT_IN_ATOMIC)$/ && !(fn in fenced) && !(fn in early)) {
                    early[fn] = target
                }
            }
            calling = 0
            next
        }
        /^ *[0-9a-f]+:/ {
            insn = $0; sub(/^ *[0-9a-f]+:[[:space:]]+/, "", insn)
            calling = (insn ~ /^(call|callq|bl|b)[[:space:]]/)
            if (half && insn ~ ("^(" second ")")) { fenced[fn] = 1; half = 0; next }
            half = 0
            if (insn ~ ("^(" first ")")) {
                if (second == "") fenced[fn] = 1; else half = 1
            }
        }
        END {
            n = split("pvx_get_page pvx_get_pages", want, " ")
            for (i = 1; i <= n; i++) {
                f = want[i]
                if (!(f in seen)) { print tag ": FAIL: " f " not in the glue object" > "/dev/stderr"; bad = 1 }
                else if (f in early) { print tag ": FAIL: " f " calls " early[f] " before its " barrier " (its domain re-check is not fenced)" > "/dev/stderr"; bad = 1 }
                else if (!(f in fenced)) { print tag ": FAIL: " f " has no " barrier " (its domain re-check is not fenced)" > "/dev/stderr"; bad = 1 }
            }
            if (bad) exit 1
            printf "%s: the glue fences its domain re-check (%s in pvx_get_page and pvx_get_pages, before their p2m lookups)\n", tag, barrier
        }' "$2"
}

# check_glue_object_barrier TAG ARCH OBJECT DISASSEMBLY
#   check_glue_barrier on the glue's object OBJECT (disassembled into
#   DISASSEMBLY) with ARCH's barrier: x86 (Xen's block_speculation(), an
#   lfence) or arm64 (dsb nsh; isb). The one place the builds name them.
check_glue_object_barrier() {
    local tag="$1" arch="$2" obj="$3" dis="$4"
    case "$arch" in
        x86)
            objdump -dr --no-show-raw-insn "$obj" > "$dis"
            check_glue_barrier "$tag" "$dis" lfence 'lfence([[:space:]]|$)' '' ;;
        arm64)
            aarch64-linux-gnu-objdump -dr --no-show-raw-insn "$obj" > "$dis"
            check_glue_barrier "$tag" "$dis" "dsb nsh; isb" \
                'dsb[[:space:]]+nsh([[:space:]]|$)' 'isb([[:space:]]|$)' ;;
        *) echo "$tag: FAIL: no glue barrier known for $arch" >&2; return 1 ;;
    esac
}
