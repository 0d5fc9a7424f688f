#!/bin/bash
# build-engine.sh -- build the Rust engine staticlib into one relocatable
# object, rust_engine.o, ready to be linked into Xen (xen/common/).
#
#   build-engine.sh [CRATE_DIR] [OUT_DIR]
#   CRATE_DIR  default $PVIOMMU_ENGINE_CRATE or hypervisor-side/xen/engine-staticlib
#   OUT_DIR    default $PVIOMMU_BUILD_DIR/engine (PVIOMMU_BUILD_DIR: <repo>/build)
#
# Toolchain: Debian's rustc-web/cargo-web (1.96) at /usr/bin, core+alloc built
# from rust-web-src for x86_64-unknown-none (soft-float). See
# /work/shared/notes/xen-rust-build.md for why each flag is there.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib/engine-symbols.sh
. "$HERE/lib/engine-symbols.sh"
# shellcheck source-path=SCRIPTDIR source=lib/engine-barrier.sh
. "$HERE/lib/engine-barrier.sh"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${PVIOMMU_BUILD_DIR:-$REPO/build}"
CRATE="$(cd "${1:-${PVIOMMU_ENGINE_CRATE:-$HERE/engine-staticlib}}" && pwd)"
OUT="${2:-$BUILD/engine}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: cargo runs from the crate directory
TARGET_DIR="${PVIOMMU_ENGINE_TARGET_DIR:-$OUT/target}"

have_toolchain() {
    /usr/bin/rustc --version 2>/dev/null | grep -Eq '^rustc 1\.(9[6-9]|[1-9][0-9]{2,})\.' \
        && [ -e /usr/lib/rustlib/src/rust/library/core ] && [ -x /usr/bin/cargo ]
}
if ! have_toolchain; then
    # The index first: a machine's stale one offers an older rustc-web
    # (1.85 seen), which installs fine and then cannot build the engine.
    echo "build-engine: installing rustc-web cargo-web rust-web-src"
    # (A source that cannot be reached fails the update, not the build:
    # the check after the install says whether it got what it needs.)
    apt-get update -q || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        rustc-web cargo-web rust-web-src
    have_toolchain || { echo "build-engine: Debian's rustc-web is" \
        "'$(/usr/bin/rustc --version 2>&1)', 1.96 or later needed" >&2; exit 1; }
fi

export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$TARGET_DIR"
# No -Z cf-protection: Xen builds with -mmanual-endbr, so only cf_check
# functions are IBT landing pads. The engine is only ever called directly
# (and calls Xen directly), so it needs none; an endbr64 in it would be an
# extra indirect-branch target (checked below).
export RUSTFLAGS="-C relocation-model=pie -Z default-visibility=hidden -Z plt=yes \
-Z retpoline-external-thunk -Z function-return=thunk-extern"
unset CARGO_BUILD_TARGET RUSTC_WRAPPER || true
echo "build-engine: crate $CRATE"
# PVIOMMU_ENGINE_FEATURES: extra cargo features (panic-canary: prove the
# panic check below rejects a reachable panic).
( cd "$CRATE" && /usr/bin/cargo build --release -Z build-std=core,alloc \
      --target x86_64-unknown-none --manifest-path "$CRATE/Cargo.toml" \
      ${PVIOMMU_ENGINE_FEATURES:+--features "$PVIOMMU_ENGINE_FEATURES"} )

LIB="$(ls -t "$TARGET_DIR"/x86_64-unknown-none/release/lib*.a | head -1)"
echo "build-engine: staticlib $LIB"

RAW="$OUT/rust_engine.raw.o"
ENTRIES="pviommu_engine_init pviommu_engine_op pviommu_engine_domain_teardown pviommu_engine_revoke_writes pviommu_engine_revoke_writes_in pviommu_engine_gfn_changed pviommu_engine_device_leaving pviommu_engine_fault_expected pviommu_engine_window"
ld -r --gc-sections $(for s in $ENTRIES; do printf -- '-u %s ' "$s"; done) \
   -o "$RAW" "$LIB"

# Names as Xen's symbol table can hold them (lib/engine-symbols.sh).
MAP="$OUT/long-syms.map"
engine_short_symbols build-engine nm objcopy readelf "$RAW" "$OUT/rust_engine.o" "$MAP"

# No SSE/AVX (or MMX) state may be touched in the hypervisor.
objdump -d "$OUT/rust_engine.o" > "$OUT/rust_engine.dis"
if grep -Eq '%[xyz]?mm[0-9]' "$OUT/rust_engine.dis"; then
    grep -E '%[xyz]?mm[0-9]' "$OUT/rust_engine.dis" | head -5
    echo "build-engine: FAIL: SIMD register use in rust_engine.o" >&2
    exit 1
fi
echo "build-engine: no mm/xmm/ymm/zmm register use"
# Nor x87 state (any f* mnemonic), nor a trap for an abort the panic check
# below cannot see: LLVM lowers an abort intrinsic to ud2 (a trap, so a
# host crash in Xen) without a call to the panic handler, and int3 and hlt
# have no place in it either. (A review of 2026-12-07; none today.)
awk -F'\t' 'NF >= 3 && $1 ~ /^ *[0-9a-f]+:$/ { m = $3; sub(/ .*/, "", m)
        if (m ~ /^f/ || m ~ /^(ud2|ud1|ud0|int3|int1|icebp|int|hlt|emms)$/) print $1 " " $3 }' \
    "$OUT/rust_engine.dis" > "$OUT/x87-traps.txt"
if [ -s "$OUT/x87-traps.txt" ]; then
    head -5 "$OUT/x87-traps.txt"
    echo "build-engine: FAIL: x87 or a trap instruction in rust_engine.o ($OUT/x87-traps.txt)" >&2
    exit 1
fi
echo "build-engine: no x87 instruction, no ud2/int3/hlt"

# IBT: no landing pads, and no indirect branch except through Xen's
# retpoline thunks (__x86_indirect_thunk_*).
if grep -Eq 'endbr64|(call|jmp)[a-z]*[[:space:]]+\*' "$OUT/rust_engine.dis"; then
    grep -En 'endbr64|(call|jmp)[a-z]*[[:space:]]+\*' "$OUT/rust_engine.dis" | head -5
    echo "build-engine: FAIL: endbr64 or a raw indirect branch in rust_engine.o" >&2
    exit 1
fi
echo "build-engine: no endbr64, no raw indirect branch"

# A speculation barrier before every page lookup (lib/engine-barrier.sh).
objdump -dr --no-show-raw-insn "$OUT/rust_engine.o" > "$OUT/rust_engine.disr"
check_barrier_before_lookups build-engine "$OUT/rust_engine.disr" lfence 'lfence([[:space:]]|$)' '' \
    'R_X86_64_(PLT32|PC32)[[:space:]]+pvx_get_pages?([-+]|$)'

nm "$OUT/rust_engine.o" > "$OUT/rust_engine.nm"
for s in $ENTRIES; do
    grep -q " T $s\$" "$OUT/rust_engine.nm" || { echo "build-engine: FAIL: $s not defined" >&2; exit 1; }
done
# Panic-freedom is the rule, not a report: the panic handler (and so the
# alloc-error handler, which panics) calls pvx_unreachable_panic, which
# nothing defines. If any entry point can still reach a panic after
# --gc-sections, the symbol is referenced and the build fails here, listing
# which engine functions reach which panic paths.
# (Relocations, not the symbol table: `ld -r` keeps an undefined symbol
# entry even after --gc-sections removed every reference to it.)
# panic-sites.txt exists only while a panic is reachable: a list left by an
# earlier, failing build must not outlive the fix.
rm -f "$OUT/panic-sites.txt"
readelf -rW "$OUT/rust_engine.o" > "$OUT/rust_engine.relocs"
if grep -q 'pvx_unreachable_panic' "$OUT/rust_engine.relocs"; then
    objdump -dr "$OUT/rust_engine.o" | awk -v map="$MAP" '
        BEGIN { while ((getline l < map) > 0) { split(l, a, " "); long[a[2]] = a[1] } }
        /^[0-9a-f]+ <.*>:$/ { f = substr($2, 2, length($2) - 3) }
        /R_X86_64_PLT32/ && /(panicking|unwrap_failed|expect_failed|handle_alloc_error|index_fail|len_mismatch|capacity_overflow|ord_violation|panic_bounds|pvx_unreachable_panic|slice_)/ {
            t = $NF; sub(/-0x4$/, "", t); n = (f in long) ? long[f] : f;
            print n " -> " t }' | sort | uniq -c | sort -rn > "$OUT/panic-sites.txt"
    head -40 "$OUT/panic-sites.txt" >&2
    echo "build-engine: FAIL: a panic path is reachable from the entry points ($(wc -l < "$OUT/panic-sites.txt") caller->panic edges in $OUT/panic-sites.txt)" >&2
    exit 1
fi
# Drop the now unreferenced symbol-table entry so Xen's link never sees it.
objcopy --strip-symbol=pvx_unreachable_panic "$OUT/rust_engine.o"
# shellcheck disable=SC2086 # one word an entry point
engine_only_entries_global build-engine nm objcopy "$OUT/rust_engine.o" $ENTRIES
nm "$OUT/rust_engine.o" > "$OUT/rust_engine.nm"
echo "build-engine: panic path unreachable (no relocation against pvx_unreachable_panic)"

# IBT, continued: the engine has no endbr64, so it must make no indirect
# call at all. On eIBRS (CET) hardware Xen's retpoline thunks become a plain
# `jmp *%reg`, so a call through __x86_indirect_thunk_* into Rust code
# (a vtable, a fn pointer) would fault the host.
if grep -q '__x86_indirect_thunk_' "$OUT/rust_engine.relocs"; then
    grep '__x86_indirect_thunk_' "$OUT/rust_engine.relocs" | head -5
    echo "build-engine: FAIL: an indirect call in rust_engine.o (it has no IBT landing pads)" >&2
    exit 1
fi
echo "build-engine: no indirect call (nothing needs an IBT landing pad)"

# Stack: Xen's stack is 8 KiB and interrupts nest on it. The deepest chain
# of engine frames from an entry point (each function's `sub $N,%rsp`, its
# pushes and the return address; calls found through the relocations,
# which are all of them: there is no indirect call, checked above) must
# stay under STACK_LIMIT. The C glue's own frames come on top.
#
# And a second budget, at the calls that may sleep: a guest copy or page
# lookup for an HVM/PVH caller can wait in x86 wait() for a paged-out page,
# and wait() saves at most a page of the stack (from cpu_info down), the
# hypercall entry's and the paging path's frames included (a deeper stack
# crashes the caller). The engine's frames above such a call must leave
# room for those: SLEEP_STACK_LIMIT.
STACK_LIMIT="${PVIOMMU_ENGINE_STACK_LIMIT:-4096}"
SLEEP_STACK_LIMIT="${PVIOMMU_ENGINE_SLEEP_STACK_LIMIT:-2560}"
objdump -dr --no-show-raw-insn "$OUT/rust_engine.o" | awk -v entries="$ENTRIES" -v limit="$STACK_LIMIT" \
    -v sleep_limit="$SLEEP_STACK_LIMIT" -v map="$MAP" '
    BEGIN { while ((getline l < map) > 0) { split(l, a, " "); short[a[1]] = a[2] }
            sleeper["pvx_copy_from_guest"] = 1; sleeper["pvx_copy_to_guest"] = 1; sleeper["pvx_get_page"] = 1; sleeper["pvx_get_pages"] = 1 }
    /^[0-9a-f]+ <.*>:$/ { f = substr($2, 2, length($2) - 3); frame[f] = 8; sub_max[f] = 0; next }
    f == "" { next }
    /sub +\$0x[0-9a-f]+,%rsp/ {
        v = $0; sub(/.*\$0x/, "", v); sub(/,.*/, "", v);
        n = 0; for (i = 1; i <= length(v); i++) n = n * 16 + index("0123456789abcdef", substr(v, i, 1)) - 1;
        if (n > sub_max[f]) { frame[f] += n - sub_max[f]; sub_max[f] = n }
    }
    /[[:space:]]push[[:space:]]/ { frame[f] += 8 }
    # A realignment (and $-A,%rsp, for a local aligned to A) may drop the
    # stack by up to A - 8 bytes more.
    /[[:space:]]and +\$0x[0-9a-f]+,%rsp$/ {
        v = $0; sub(/.*\$0x/, "", v); sub(/,.*/, "", v);
        hexd = "0123456789abcdef"
        align = 256 - (index(hexd, substr(v, 15, 1)) - 1) * 16 - (index(hexd, substr(v, 16, 1)) - 1)
        if (length(v) != 16 || substr(v, 1, 14) != "ffffffffffffff") unknown = unknown " " f
        else frame[f] += align - 8
    }
    # Any other change of %rsp but the restoring epilogue (from %rbp) is
    # one this count cannot size: a dynamic allocation. Refused.
    /,%rsp$/ && !/[[:space:]](sub|add|and) +\$0x[0-9a-f]+,%rsp$/ && !/[[:space:]]lea +-?0x[0-9a-f]+\(%rbp\),%rsp$/ && !/[[:space:]]mov +%rbp,%rsp$/ {
        unknown = unknown " " f
    }
    /R_X86_64_(PLT32|PC32)/ {
        # A call names its target by section: .text.<fn>, or, for a cold
        # function, .text.unlikely.<fn> (missing that prefix once left the
        # cold paths, the set-up of the engine included, out of the sum).
        t = $NF; sub(/[-+]0x[0-9a-f]+$/, "", t); sub(/^\.text\.(unlikely\.|hot\.|startup\.|exit\.)?/, "", t);
        if (t in short) t = short[t]
        if (t != f) calls[f] = calls[f] " " t
    }
    function depth(fn, seen,   best, n, i, c, d) {
        if (fn in memo) return memo[fn]
        best = 0; n = split(calls[fn], c, " ")
        for (i = 1; i <= n; i++) {
            if (!(c[i] in frame) || index(seen, " " c[i] " ")) continue
            d = depth(c[i], seen " " c[i] " ")
            if (d > best) { best = d; via[fn] = c[i] }
        }
        memo[fn] = frame[fn] + best
        return memo[fn]
    }
    # The deepest chain of engine frames ending in a call to a sleeper; -1
    # if none is reached from fn.
    function sdepth(fn, seen,   best, n, i, c, d) {
        if (fn in smemo) return smemo[fn]
        best = -1; n = split(calls[fn], c, " ")
        for (i = 1; i <= n; i++) {
            if (c[i] in sleeper) d = 0
            else if (!(c[i] in frame) || index(seen, " " c[i] " ")) continue
            else { d = sdepth(c[i], seen " " c[i] " "); if (d < 0) continue }
            if (d > best) { best = d; svia[fn] = c[i] }
        }
        smemo[fn] = best < 0 ? -1 : frame[fn] + best
        return smemo[fn]
    }
    END {
        if (unknown != "") {
            print "build-engine: a stack adjustment this check cannot size in:" unknown > "/dev/stderr"
            exit 1
        }
        n = split(entries, e, " "); worst = 0
        for (i = 1; i <= n; i++) { d = depth(e[i], " " e[i] " "); if (d > worst) { worst = d; top = e[i] } }
        printf "build-engine: deepest engine stack %d bytes (from %s; limit %d)\n", worst, top, limit
        if (worst > limit) {
            print "build-engine: the stack use from an entry point is over the limit:" > "/dev/stderr"
            for (fn = top; fn != ""; fn = via[fn]) printf "  %6d %s\n", frame[fn], fn > "/dev/stderr"
            exit 1
        }
        sworst = -1
        for (i = 1; i <= n; i++) { d = sdepth(e[i], " " e[i] " "); if (d > sworst) { sworst = d; stop = e[i] } }
        printf "build-engine: deepest engine stack at a guest copy or page lookup %d bytes (from %s; limit %d)\n", sworst, stop, sleep_limit
        if (sworst < 0) {
            # The hypercall copies from the guest: a renamed glue call
            # must not turn this check off.
            print "build-engine: no entry point reaches a guest copy or page lookup" > "/dev/stderr"
            exit 1
        }
        if (sworst > sleep_limit) {
            print "build-engine: the stack at a call that may sleep is over the limit:" > "/dev/stderr"
            for (fn = stop; fn in frame; fn = svia[fn]) printf "  %6d %s\n", frame[fn], fn > "/dev/stderr"
            exit 1
        }
    }' || { echo "build-engine: FAIL: the engine's stack check (above): over $STACK_LIMIT bytes from an entry point, over $SLEEP_STACK_LIMIT at a call that may sleep, or a stack adjustment it cannot size" >&2; exit 1; }
echo "build-engine: undefined symbols: $(nm -u "$OUT/rust_engine.o" | awk '{print $2}' | tr '\n' ' ')"
echo "build-engine: $OUT/rust_engine.o"
