#!/usr/bin/env bash
# The whole test suite: formatting, lints, the hosted tests (simulator,
# property tests, bounded fuzzing), the engine built for Xen's target
# (x86_64-unknown-none, no std, no SSE), and — when the Xen side is
# present — the Xen-in-QEMU integration test. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -q -- -D warnings

step "hosted tests"
cargo test --workspace -q

step "engine for x86_64-unknown-none (Xen's target)"
scripts/build-engine-nostd.sh

if [[ -x tests/xen-qemu/run.sh && "${PVIOMMU_SKIP_XEN:-0}" != 1 ]]; then
  step "Xen 4.17 in QEMU"
  tests/xen-qemu/run.sh
fi
