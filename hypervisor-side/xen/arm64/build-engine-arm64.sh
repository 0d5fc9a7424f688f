#!/bin/bash
# build-engine-arm64.sh -- the arm64 twin of ../build-engine.sh: build the
# Rust engine staticlib for Xen on arm64 into one relocatable object,
# rust_engine.o, and check it the same way (no FP/SIMD, no reachable panic).
#
#   build-engine-arm64.sh [CRATE_DIR] [OUT_DIR]
#   CRATE_DIR  default: this worktree's hypervisor-side/xen/engine-staticlib
#   OUT_DIR    default: $PVIOMMU_ARM64_BUILD/engine-arm64 (/work/arm64-build/...)
#   PVIOMMU_ARM64_ENGINE_TARGET  aarch64-unknown-none-softfloat (default) or
#              aarch64-unknown-none (then -C target-feature=-neon,-fp-armv8 is
#              added; see design/arm64-bringup.md for what rustc says to that)
#   PVIOMMU_ENGINE_FEATURES      extra cargo features (panic-canary)
#   PVIOMMU_ARM64_KEEP_FP=1      with aarch64-unknown-none: keep FP/SIMD on, to
#              prove the FP/SIMD check refuses the object
#
# Toolchain: Debian's rustc-web/cargo-web at /usr/bin, core+alloc built from
# rust-web-src (-Z build-std). Xen's arm64 C is built with
# -mgeneral-regs-only (no FP/SIMD register anywhere in the hypervisor) and
# -fno-pie at a fixed link address; the soft-float target matches that.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/engine-symbols.sh
. "$HERE/../lib/engine-symbols.sh"
# shellcheck source-path=SCRIPTDIR source=../lib/engine-barrier.sh
. "$HERE/../lib/engine-barrier.sh"
REPO="$(cd "$HERE/../../.." && pwd)"
BUILD="${PVIOMMU_ARM64_BUILD:-/work/arm64-build}"
CRATE="$(cd "${1:-$REPO/hypervisor-side/xen/engine-staticlib}" && pwd)"
OUT="${2:-$BUILD/engine-arm64}"
TARGET="${PVIOMMU_ARM64_ENGINE_TARGET:-aarch64-unknown-none-softfloat}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TARGET_DIR="${PVIOMMU_ENGINE_TARGET_DIR:-$OUT/target}"
OBJDUMP=aarch64-linux-gnu-objdump; LD=aarch64-linux-gnu-ld
NM=aarch64-linux-gnu-nm; OBJCOPY=aarch64-linux-gnu-objcopy; READELF=aarch64-linux-gnu-readelf
command -v "$LD" >/dev/null || "$HERE/fetch-xen-4.20.sh"

if ! /usr/bin/rustc --version 2>/dev/null | grep -Eq '^rustc 1\.(9[6-9]|[1-9][0-9]{2,})\.' \
   || [ ! -e /usr/lib/rustlib/src/rust/library/core ] || [ ! -x /usr/bin/cargo ]; then
    echo "build-engine-arm64: installing rustc-web cargo-web rust-web-src"
    # The index first: a stale one offers an older rustc-web (1.85 seen).
    apt-get update -q || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        rustc-web cargo-web rust-web-src
    { /usr/bin/rustc --version 2>/dev/null | grep -Eq '^rustc 1\.(9[6-9]|[1-9][0-9]{2,})\.' \
        && [ -e /usr/lib/rustlib/src/rust/library/core ] && [ -x /usr/bin/cargo ]; } || {
        echo "build-engine-arm64: Debian's rustc-web is" \
            "'$(/usr/bin/rustc --version 2>&1)', 1.96 or later needed" >&2; exit 1; }
fi

export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$TARGET_DIR"
# static relocation model: Xen arm64 is linked at a fixed address with
# -fno-pie; aarch64's small code model (adrp/add, +-4 GiB) reaches it.
RUSTFLAGS="-C relocation-model=static -Z default-visibility=hidden"
# PVIOMMU_ARM64_KEEP_FP=1 (a test of the check below only): the hard-float
# target as is, which must be refused.
if [ "$TARGET" = aarch64-unknown-none ] && [ "${PVIOMMU_ARM64_KEEP_FP:-0}" != 1 ]; then
    RUSTFLAGS="$RUSTFLAGS -C target-feature=-neon,-fp-armv8"
fi
export RUSTFLAGS
unset CARGO_BUILD_TARGET RUSTC_WRAPPER || true
echo "build-engine-arm64: crate $CRATE, target $TARGET, RUSTFLAGS $RUSTFLAGS"
start=$(date +%s)
( cd "$CRATE" && nice -n 19 /usr/bin/cargo build --release -j 2 -Z build-std=core,alloc \
      --target "$TARGET" --manifest-path "$CRATE/Cargo.toml" \
      ${PVIOMMU_ENGINE_FEATURES:+--features "$PVIOMMU_ENGINE_FEATURES"} )
echo "build-engine-arm64: cargo took $(( $(date +%s) - start )) s"

LIB="$(ls -t "$TARGET_DIR/$TARGET"/release/lib*.a | head -1)"
echo "build-engine-arm64: staticlib $LIB"
RAW="$OUT/rust_engine.raw.o"
ENTRIES="pviommu_engine_init pviommu_engine_op pviommu_engine_domain_teardown pviommu_engine_gfn_changed pviommu_engine_device_leaving pviommu_engine_window"
# One .text: rustc puts every function in a .text.<name> section, and Xen's
# Arm linker script only collects .text.* with CONFIG_CC_SPLIT_SECTIONS (off
# on Arm without LIVEPATCH). Left as they are, they become orphan sections
# placed after _etext, which Xen maps non-executable: the first call into
# the engine was an instruction abort (ESR_EL2 0x8600000f, permission fault)
# at pviommu_engine_init. --gc-sections still works per input section.
MERGE="$OUT/merge-text.lds"
printf 'SECTIONS {\n  .text : { *(.text .text.*) }\n}\n' > "$MERGE"
"$LD" -r --gc-sections -T "$MERGE" $(for s in $ENTRIES; do printf -- '-u %s ' "$s"; done) -o "$RAW" "$LIB"
if "$READELF" -SW "$RAW" | grep -q ' \.text\.'; then
    "$READELF" -SW "$RAW" | grep ' \.text\.' | head -3
    echo "build-engine-arm64: FAIL: .text.* sections left in the object (Xen would map them non-executable)" >&2
    exit 1
fi

# Names as Xen's symbol table can hold them (../lib/engine-symbols.sh).
MAP="$OUT/long-syms.map"
engine_short_symbols build-engine-arm64 "$NM" "$OBJCOPY" "$READELF" "$RAW" "$OUT/rust_engine.o" "$MAP"

# No FP/SIMD: no v/q/d/s/h/b register operand, no FP/SIMD system register,
# no fp/simd instruction. Xen's arm64 C has none (-mgeneral-regs-only) and
# does not save a guest's FP state on hypercall entry (lazy switch on
# context switch only).
"$OBJDUMP" -d "$OUT/rust_engine.o" > "$OUT/rust_engine.dis"
# objdump line: "addr:<TAB>hex<TAB>mnemonic<TAB>operands  // comment"; only
# mnemonic and operands are looked at (symbol names and hex would match).
awk -F'\t' 'NF >= 3 && $1 ~ /^ *[0-9a-f]+:$/ {
        m = $3; o = (NF >= 4) ? $4 : ""; sub(/ *\/\/.*$/, "", o); sub(/<.*>/, "", o)
        bad = (m ~ /^f/ || m ~ /^(ld[1-4]|st[1-4]|movi|mvni|dup|ins|umov|smov|cnt|addv|uaddlv|tbl|tbx|zip[12]|uzp[12]|trn[12]|ext|scvtf|ucvtf)$/)
        # branch/adr targets are bare hex addresses ("b0"): not registers
        if (m ~ /^(b|bl|b\..*|cbn?z|tbn?z|adrp?)$/) o = ""
        n = split(o, t, /[ ,\[\]{}!#]+/)
        for (k = 1; k <= n; k++)
            if (t[k] ~ /^(v[0-9]+(\.[0-9]*[bhsdq])?|[qdshbz][0-9]+|p[0-9]+(\/[mz])?|fpcr|fpsr)$/) bad = 1
        if (bad) print $1 " " m " " o }' "$OUT/rust_engine.dis" > "$OUT/fp-simd.txt"
if [ -s "$OUT/fp-simd.txt" ]; then
    head -10 "$OUT/fp-simd.txt"
    echo "build-engine-arm64: FAIL: FP/SIMD use in rust_engine.o ($(wc -l < "$OUT/fp-simd.txt") instructions in $OUT/fp-simd.txt)" >&2
    exit 1
fi
echo "build-engine-arm64: no FP/SIMD register or instruction"
# Nor a trap for an abort the panic check below cannot see (LLVM lowers an
# abort intrinsic to one without calling the panic handler), as on x86.
awk -F'\t' 'NF >= 3 && $1 ~ /^ *[0-9a-f]+:$/ { m = $3; sub(/ .*/, "", m)
        if (m ~ /^(udf|brk|hlt)$/) print $1 " " $3 }' "$OUT/rust_engine.dis" > "$OUT/traps.txt"
if [ -s "$OUT/traps.txt" ]; then
    head -5 "$OUT/traps.txt"
    echo "build-engine-arm64: FAIL: a trap instruction in rust_engine.o ($OUT/traps.txt)" >&2
    exit 1
fi
echo "build-engine-arm64: no udf/brk/hlt"

# A speculation barrier before every page lookup (../lib/engine-barrier.sh):
# dsb nsh, then isb right after it.
"$OBJDUMP" -dr --no-show-raw-insn "$OUT/rust_engine.o" > "$OUT/rust_engine.disr"
check_barrier_before_lookups build-engine-arm64 "$OUT/rust_engine.disr" "dsb nsh; isb" \
    'dsb[[:space:]]+nsh([[:space:]]|$)' 'isb([[:space:]]|$)' \
    'R_AARCH64_(CALL26|JUMP26)[[:space:]]+pvx_get_pages?$'

"$NM" "$OUT/rust_engine.o" > "$OUT/rust_engine.nm"
for s in $ENTRIES; do
    grep -q " T $s\$" "$OUT/rust_engine.nm" || { echo "build-engine-arm64: FAIL: $s not defined" >&2; exit 1; }
done
# Panic-freedom, as in ../build-engine.sh: any relocation against the
# undefined pvx_unreachable_panic after --gc-sections is a reachable panic.
rm -f "$OUT/panic-sites.txt"
"$READELF" -rW "$OUT/rust_engine.o" > "$OUT/rust_engine.relocs"
if grep -q 'pvx_unreachable_panic' "$OUT/rust_engine.relocs"; then
    "$OBJDUMP" -dr "$OUT/rust_engine.o" | awk -v map="$MAP" '
        BEGIN { while ((getline l < map) > 0) { split(l, a, " "); long[a[2]] = a[1] } }
        /^[0-9a-f]+ <.*>:$/ { f = substr($2, 2, length($2) - 3) }
        /R_AARCH64_(CALL26|JUMP26)/ && /(panicking|unwrap_failed|expect_failed|handle_alloc_error|index_fail|len_mismatch|capacity_overflow|ord_violation|panic_bounds|pvx_unreachable_panic|slice_)/ {
            t = $NF; n = (f in long) ? long[f] : f; print n " -> " t }' \
        | sort | uniq -c | sort -rn > "$OUT/panic-sites.txt"
    head -40 "$OUT/panic-sites.txt" >&2
    echo "build-engine-arm64: FAIL: a panic path is reachable from the entry points ($(wc -l < "$OUT/panic-sites.txt") caller->panic edges in $OUT/panic-sites.txt)" >&2
    exit 1
fi
"$OBJCOPY" --strip-symbol=pvx_unreachable_panic "$OUT/rust_engine.o"
# shellcheck disable=SC2086 # one word an entry point
engine_only_entries_global build-engine-arm64 "$NM" "$OBJCOPY" "$OUT/rust_engine.o" $ENTRIES
"$NM" "$OUT/rust_engine.o" > "$OUT/rust_engine.nm"
echo "build-engine-arm64: panic path unreachable (no relocation against pvx_unreachable_panic)"
# Relocation kinds, for the Xen link (a GOT would be refused by Xen's
# linker script, as on x86).
echo "build-engine-arm64: relocation types: $(awk '/R_AARCH64_/ {print $3}' "$OUT/rust_engine.relocs" | sort | uniq -c | sort -rn | awk '{printf "%s:%s ", $2, $1}')"
if grep -q 'GOT' "$OUT/rust_engine.relocs"; then
    echo "build-engine-arm64: FAIL: GOT relocations in rust_engine.o" >&2; exit 1
fi
echo "build-engine-arm64: undefined symbols: $("$NM" -u "$OUT/rust_engine.o" | awk '{print $2}' | tr '\n' ' ')"
echo "build-engine-arm64: $OUT/rust_engine.o"
