#!/usr/bin/env bash
# tcg-cost.sh -- what the hypercall path as built into Xen costs per page
# (map + unmap, batch 512, engine context), without booting
# Xen: `engine_op_rounds` (engine-staticlib's ignored test: the Xen backend's
# real code over the hosted model of the pvx_* functions), counted
#   1. natively by callgrind: guest instructions and calls per page;
#   2. under qemu-user (TCG, the same translator as the Xen-in-QEMU test),
#      counted by callgrind on QEMU itself: host instructions per page, JIT
#      code and helpers included. Deterministic to about 1 %, so it can
#      compare two builds on a busy machine where times cannot.
# Under TCG a call and its return cost about 220 host instructions, about
# as much as 40 straight-line guest instructions (design/performance.md,
# "Calls, blocks and bytes under TCG"), which the native counts do not show.
#
#   scripts/tcg-cost.sh [TARGET_DIR]    (default target/tcg-cost)
#
# Needs valgrind, qemu-user and rustc-web (installed if missing). About a
# minute once built.
set -euo pipefail
cd "$(dirname "$0")/.."
TD="${1:-target/tcg-cost}"
for pair in valgrind:valgrind qemu-x86_64:qemu-user; do
    if ! command -v "${pair%%:*}" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pair#*:}" >/dev/null
    fi
done
# Built as the object linked into Xen is (build-engine.sh): Debian's
# rustc-web, return thunks, retpoline thunks, PLT calls. Only the target
# differs (x86_64-unknown-linux-gnu: std for the test harness); the model
# supplies the thunks. So the engine's functions are inlined, or not, as in
# Xen's build, and each pvx_* stays a call (the model's are not inlined).
if [ ! -x /usr/bin/rustc ] || ! /usr/bin/rustc --version | grep -q '^rustc 1\.9[6-9]'; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web cargo-web >/dev/null
fi
BIN=$(RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="-Z plt=yes -Z retpoline-external-thunk -Z function-return=thunk-extern \
-C unsafe-allow-abi-mismatch=retpoline,retpoline-external-thunk" \
    /usr/bin/cargo test --release --target x86_64-unknown-linux-gnu \
    --manifest-path hypervisor-side/xen/engine-staticlib/Cargo.toml \
    --target-dir "$TD" --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*pviommu_xen-[^"]*\)".*/\1/p' | tail -1)
[ -x "$BIN" ] || { echo "tcg-cost: no test binary" >&2; exit 1; }
TEST=(--ignored --exact tests::engine_op_rounds -q)
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# Native: the whole test process; rounds 120 minus rounds 20 leaves the
# steady state, with the test's own per-round work (building the ops,
# checking the results: about 5 %) in it. (callgrind's --toggle-collect
# loses track of functions that return through Xen's return thunk.)
count_native() {
    PVIOMMU_ROUNDS=$1 valgrind --tool=callgrind --callgrind-out-file="$OUT" \
        "$BIN" "${TEST[@]}" >/dev/null 2>&1
    awk '/^summary:/{i=$2} /^calls=/{split($1, a, "="); c += a[2]} END{print i, c}' "$OUT"
}
# Under qemu-user: everything QEMU runs; rounds 120 minus rounds 20 leaves
# the steady state (translation and set-up cancel out).
count_qemu() {
    PVIOMMU_ROUNDS=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        qemu-x86_64 "$BIN" "${TEST[@]}" 2>&1 >/dev/null | awk '/Collected/{print $4}'
}
read -r i20 c20 < <(count_native 20)
read -r i120 c120 < <(count_native 120)
q20=$(count_qemu 20)
q120=$(count_qemu 120)
pages=$((100 * 512))
echo "tcg-cost: $BIN"
echo "native: $(( (i120 - i20) / pages )) instructions, $(awk -v a="$c20" -v b="$c120" -v p=$pages 'BEGIN{printf "%.1f", (b - a) / p}') calls per page"
echo "qemu-user (TCG): $(( (q120 - q20) / pages )) host instructions per page"
