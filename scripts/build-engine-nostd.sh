#!/usr/bin/env bash
# Build the engine (pviommu-hv, no simulator) for x86_64-unknown-none with
# Debian's rustc-web and -Z build-std, the way it is built into Xen
# (../shared notes: xen-rust-build.md), and check it has no SSE/AVX.
set -euo pipefail
cd "$(dirname "$0")/.."
have_toolchain() {
  /usr/bin/rustc --version 2>/dev/null | grep -Eq '^rustc 1\.(9[6-9]|[1-9][0-9]{2,})\.' \
    && [[ -e /usr/lib/rustlib/src/rust/library/core && -x /usr/bin/cargo ]]
}
if ! have_toolchain; then
  echo "installing Debian's rustc-web, cargo-web, rust-web-src"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web cargo-web rust-web-src binutils >/dev/null
  have_toolchain || {
    echo "Debian's rustc-web is '$(/usr/bin/rustc --version 2>&1)', 1.96 or later needed" >&2; exit 1; }
fi
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target/xen
export RUSTFLAGS="-C relocation-model=pie -Z default-visibility=hidden -Z plt=yes -Z retpoline-external-thunk -Z function-return=thunk-extern"
/usr/bin/cargo build -q --release -Z build-std=core,alloc --target x86_64-unknown-none -p pviommu-hv
rlib=$(ls target/xen/x86_64-unknown-none/release/libpviommu_hv.rlib)
disasm=$(objdump -d "$rlib" 2>/dev/null)
if [[ $(grep -c '^ ' <<<"$disasm") -lt 1000 ]]; then
  echo "FAIL: could not disassemble $rlib" >&2
  exit 1
fi
if grep -qE '%[xy]mm[0-9]' <<<"$disasm"; then
  echo "FAIL: SSE/AVX register use in the engine object" >&2
  exit 1
fi
echo "engine builds for x86_64-unknown-none; no SSE/AVX instructions in $rlib"
