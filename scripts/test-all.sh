#!/usr/bin/env bash
# The whole test suite: formatting, lints, the hosted tests (simulator,
# property tests, bounded fuzzing), the engine built for Xen's target
# (x86_64-unknown-none, no std, no SSE), and — when the Xen side is
# present — the Xen-in-QEMU integration test. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

step "disk"
# A whole run from nothing writes about 6 GiB (targets, Xen builds, QEMU
# images). Say up front how much there is, so that a "No space left on
# device" deep in a build is read for what it is; the run goes on either way.
# (The checkout holds the Rust targets; the Xen builds go to
# PVIOMMU_BUILD_DIR, ./build by default.)
build_dir="${PVIOMMU_BUILD_DIR:-$PWD/build}"
for dir in . "$build_dir"; do
  [ -d "$dir" ] || continue
  avail_kib="$(df -Pk "$dir" 2>/dev/null | awk 'NR==2 {print $4}')"
  avail_kib="${avail_kib:-0}"
  echo "free at $dir: $((avail_kib / 1048576)) GiB (a whole run from nothing writes about 6 GiB)"
  if [ "$avail_kib" -lt $((6 * 1048576)) ]; then
    echo "WARNING: less than 6 GiB free at $dir; builds may fail with ENOSPC" >&2
  fi
done

step "format"
cargo fmt --all -- --check
cargo fmt --manifest-path hypervisor-side/xen/engine-staticlib/Cargo.toml -- --check

step "clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
cargo clippy --manifest-path hypervisor-side/xen/engine-staticlib/Cargo.toml \
  --target-dir target/engine-staticlib --all-targets -q -- -D warnings

step "packages the hosted tests use"
# pkg-config builds the C mediator example against the installed library;
# groff renders the generated man pages.
missing=""
command -v pkg-config >/dev/null || missing="$missing pkgconf"
command -v groff >/dev/null || missing="$missing groff-base"
if [ -n "$missing" ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
echo "pkg-config and groff present"

step "hosted tests"
cargo test --workspace -q

step "Xen backend (engine-staticlib) hosted tests"
cargo test -q --manifest-path hypervisor-side/xen/engine-staticlib/Cargo.toml --target-dir target/engine-staticlib

step "Xen glue: the pviommu= boot option parser, with Xen's number parsing"
hypervisor-side/xen/tests/parse-option.sh

step "Xen glue: an IOMMU run outside the engine's window is refused"
hypervisor-side/xen/tests/run-window.sh

step "Arm glue: PCI host bridge windows reserved at CPU and bus addresses, or PV-IOMMU off"
hypervisor-side/xen/tests/bridge-windows.sh

step "x86 glue: no BFN below an SRAT memory block, hot-pluggable or not"
hypervisor-side/xen/tests/srat-end.sh

step "Xen p2m hook: which type changes take device write access away"
hypervisor-side/xen/tests/write-lost.sh

step "x86 glue: a VRAM range read while the engine writes it is the old, the new or none"
hypervisor-side/xen/tests/vram-range.sh

step "glue: whether a map into context 0 isolates anything, by the caller's IOMMU set-up"
hypervisor-side/xen/tests/translation.sh

step "x86 glue: a PV target's foreign frames and typed pages refused without a log line"
hypervisor-side/xen/tests/pv-frames.sh

step "x86 glue: PV-IOMMU stays off with no IOMMU in use"
hypervisor-side/xen/tests/init-off.sh

step "glue: a batch ending in an error continues with the error it carries"
hypervisor-side/xen/tests/batch-ending.sh

step "glue: the IOMMU driver's pviommu_* ops called only where the driver has them"
hypervisor-side/xen/tests/iommu-ops.sh

step "glue: the revocation VIRQ raised later, with no lock held"
hypervisor-side/xen/tests/revoked-virq.sh

step "QEMU checks: a split of a 2 MiB measurement looked at again on its timed pass"
tests/xen-qemu/split-look.sh

step "engine for x86_64-unknown-none (Xen's target)"
scripts/build-engine-nostd.sh

step "engine object for Xen: no SIMD, no reachable panic"
BUILD="${PVIOMMU_BUILD_DIR:-$PWD/build}"
export PVIOMMU_ENGINE_TARGET_DIR="$BUILD/engine/target"
hypervisor-side/xen/build-engine.sh hypervisor-side/xen/engine-staticlib "$BUILD/engine"
# Each check must be able to fail: an engine built with canary FEATURE has
# to be refused with MESSAGE in the output of SCRIPT (build-engine.sh, or
# the arm64 one), built into OUT.
refused_canary() {
  local feature="$1" message="$2" what="$3"
  local script="${4:-hypervisor-side/xen/build-engine.sh}" out="${5:-$BUILD/engine-$1}"
  local name
  name="$(basename "$script")"
  if PVIOMMU_ENGINE_FEATURES="$feature" "$script" \
       hypervisor-side/xen/engine-staticlib "$out" > "$out.log" 2>&1; then
    echo "FAIL: $name accepted an engine with $what" >&2
    exit 1
  fi
  grep -q "$message" "$out.log"
  echo "$name refuses an engine with $what (canary rejected)"
}
# One infallible allocation on an entry path.
refused_canary panic-canary 'FAIL: a panic path is reachable' "a reachable panic"
# A page lookup with no speculation barrier before it (the map's checks
# could be bypassed under speculation).
refused_canary nospec-canary "looks a page up with no lfence before it" \
  "a page lookup with no speculation barrier"
# A cold function (in .text.unlikely.*) with a frame over the stack limit,
# on an entry path: it has to be counted.
refused_canary stack-canary "the stack use from an entry point is over the limit" \
  "a stack over its limit"
# Names Xen's symbol table cannot hold (its lookups would overflow a stack
# buffer): renaming too little has to be refused.
if PVIOMMU_ENGINE_SYM_RENAME=500 hypervisor-side/xen/build-engine.sh \
     hypervisor-side/xen/engine-staticlib "$BUILD/engine-symbols" > "$BUILD/engine-symbols.log" 2>&1; then
  echo "FAIL: build-engine.sh accepted names too long for Xen's symbol table" >&2
  exit 1
fi
grep -q "expand past 127 bytes" "$BUILD/engine-symbols.log"
echo "build-engine.sh refuses names too long for Xen's symbol table (canary rejected)"

# Each x86 boot writes build/xen-qemu/serial.log afresh: keep a copy under
# the boot's name (serial.NAME.log, its path printed), so a later boot does
# not take away an earlier one's (profile/run-prof.sh and a reader after a
# failure want the VT-d release boot's).
keep_serial_log() {
  local kept="$BUILD/xen-qemu/serial.$1.log"
  cp "$BUILD/xen-qemu/serial.log" "$kept"
  # A first boot that stalled and was retried left its log beside it.
  if [ -f "$BUILD/xen-qemu/serial.stalled.log" ]; then
    cp "$BUILD/xen-qemu/serial.stalled.log" "$BUILD/xen-qemu/serial.$1.stalled.log"
  fi
  printf '%s\n' "$kept"
}

# The boot whose kept serial log is LOG passed each CHECK named after it:
# a check init.sh skips where it does not fit (the host-window checks by
# the boot's options, amd_top_range_reserved by its CPU) must have run in
# the boot meant for it.
boot_passed() {
  local log="$1" c
  shift
  for c in "$@"; do
    grep -aqE "^PASS $c[[:space:]]*$" "$log" ||
      { echo "FAIL: the boot of $log did not pass $c" >&2; exit 1; }
  done
}

# The debug boot NAME just ran a debug Xen (its banner) that failed no
# assertion, and neither did a first boot of it that stalled.
debug_xen_held_up() {
  debug_log_held_up "$1" "$(keep_serial_log "$1")" "$BUILD/xen-qemu/serial.stalled.log"
}

# xen_log_trouble LOG...: prints the lines of those LOGs that exist which
# show a debug Xen's failed assertion, WARN, BUG, fatal trap or panic;
# true if there are any. A fatal trap is Xen's own line, "(XEN) FATAL
# TRAP" or "(XEN) FATAL PAGE FAULT" (and a panic after it): a guest's
# console line ("(d1) ... FATAL") or Xen's line about a guest's fault
# ("(XEN) d1v0 ... FATAL") is not Xen's trouble, and any "FATAL" after
# "(XEN)" counted until the 48th session. (A log named but absent, such
# as a stalled boot's that was not, is skipped: given to grep, it made
# grep answer 2 whatever it matched, and every debug boot's WARN went
# unseen until the 47th session's review.)
xen_log_trouble() {
  local f logs=()
  for f in "$@"; do [ -f "$f" ] && logs+=("$f"); done
  [ "${#logs[@]}" -gt 0 ] || return 1
  grep -aE "Assertion '.*' failed|Xen WARN at|Xen BUG at|\(XEN\) FATAL|Panic on CPU" "${logs[@]}"
}

# debug_log_held_up NAME LOG [STALLED_LOG]: the boot whose serial log is
# LOG (and the log of a first try that stalled, if any) ran a debug Xen
# that failed no assertion, warned of nothing and did not crash, and its
# stack under the engine left room (debug_stack_depth). NAME: the boot.
debug_log_held_up() {
  grep -aq "Xen version .* debug=y" "$2" ||
    { echo "FAIL: the Xen booted for the $1 checks is not a debug build" >&2; exit 1; }
  if xen_log_trouble "$2" "${3:-}"; then
    echo "FAIL: the debug Xen ($1) failed an assertion, warned or crashed" >&2
    exit 1
  fi
  echo "debug Xen ($1): no assertion failed, no WARN, BUG or panic"
  debug_stack_depth "$2"
}

# The check above must see a WARN in a boot that did not stall (its
# stalled log absent), as in one that did.
printf '(XEN) Xen WARN at drivers/passthrough/iommu.c:1\n' > "$BUILD/warn-canary.log"
xen_log_trouble "$BUILD/warn-canary.log" "$BUILD/no-such-stalled.log" > /dev/null ||
  { echo "FAIL: the debug boots' log check misses a WARN" >&2; exit 1; }
printf 'Xen: (XEN) FATAL TRAP: vector = 14 (page fault)\n' > "$BUILD/warn-canary.log"
xen_log_trouble "$BUILD/warn-canary.log" > /dev/null ||
  { echo "FAIL: the debug boots' log check misses a fatal trap" >&2; exit 1; }
printf '(XEN) Xen version 4.17.5 debug=y\n(d1) FATAL: a guest says so\n(XEN) d1v0 guest FATAL\n' \
  > "$BUILD/warn-canary.log"
! xen_log_trouble "$BUILD/warn-canary.log" "$BUILD/no-such-stalled.log" > /dev/null ||
  { echo "FAIL: the debug boots' log check finds trouble in a clean log" >&2; exit 1; }
echo "the debug boots' log check sees a WARN (canary rejected)"

# The deepest stack a debug Xen's glue measured under the engine's entry
# points (pviommu-common.inc, pvx_stack_note(): the engine, the C below it,
# what Xen stacked above the entry, interrupts meanwhile), at boot (a
# record of its own, a line at each new deepest: the engine's init first)
# and after (the deepest so far), leaves 1 KiB of the stack: Xen itself
# reports an overflow with under 512 bytes left, and an interrupt taken
# at another moment may stack deeper than any seen. The init's line and an
# after-boot line must be there: every boot starts the engine and makes
# hypercalls.
debug_stack_depth() {
  local log="$1" kind line deepest
  for kind in at after; do
    if [ "$kind" = at ]; then
      line='s/.*pviommu: stack \([0-9]*\) of \([0-9]*\) bytes (from .*, at boot).*/\1 \2/p'
    else
      line='s/.*pviommu: deepest stack \([0-9]*\) of \([0-9]*\) bytes.*/\1 \2/p'
    fi
    deepest="$(sed -n "$line" "$log" | sort -n | tail -1)"
    # (At boot, the init's line by name: the window's alone is no measure
    # of the engine's deepest entry.)
    [ "$kind" != at ] || grep -aq "pviommu: stack [0-9]* of [0-9]* bytes (from the engine's init, at boot)" "$log" ||
      { echo "FAIL: the debug Xen logged no stack depth under the engine's init" >&2; exit 1; }
    [ -n "$deepest" ] ||
      { echo "FAIL: the debug Xen logged no stack depth under the engine ($kind boot; pvx_stack_note)" >&2; exit 1; }
    set -- $deepest
    [ "$1" -le $(( $2 - 1024 )) ] ||
      { echo "FAIL: the debug Xen's stack reached $1 of $2 bytes under the engine ($kind boot)" >&2; exit 1; }
    echo "debug Xen: deepest stack under the engine $1 of $2 bytes ($kind boot)"
  done
}

if [[ -x tests/xen-qemu/run.sh && "${PVIOMMU_SKIP_XEN:-0}" != 1 ]]; then
  # With the root bus's 64-bit window reserved, as `pviommu host-windows`
  # tells an admin to (QEMU's q35 puts it at 4 GiB, on this 2 GiB host
  # where the BFN window starts): the tool must pass and every BFN lie past
  # the window. The AMD-Vi boot below goes without, and the tool must name
  # the window and the option (init.sh).
  step "Xen 4.17 in QEMU"
  XEN_EXTRA_ARGS="pviommu=reserve=0x100000000-0x8ffffffff" tests/xen-qemu/run.sh
  boot_passed "$(keep_serial_log vtd)" host_window_reserved host_window_skipped_by_bfns \
    revoked_bfn_fault_not_counted

  # The same Xen on QEMU's AMD IOMMU: the AMD-Vi side of the glue (patch
  # 0003's address width, maps and unmaps in Xen's AMD tables, device
  # reassignment). No engine-own contexts there (VT-d only): init.sh checks
  # they are refused and SKIPs the checks that need one. Fewer measured and
  # hostile calls, as for the FLASK boot.
  # On a CPU of family 17h with 48 physical address bits (QEMU's qemu64
  # with those set; -cpu EPYC does not boot under TCG), so that the check
  # of the top 12 GiB reserved on such hosts runs (amd_top_range_reserved);
  # the debug AMD-Vi boot below keeps QEMU's default, family 15.
  step "Xen 4.17 in QEMU with AMD-Vi (amd-iommu), a family-17h CPU"
  SKIP_XEN_BUILD=1 PVIOMMU_QEMU_IOMMU=amd QEMU_EXTRA="-cpu qemu64,family=23,phys-bits=48" \
    MEASURE_PAGES=4096 FUZZ_CALLS=20000 BIG_PAGES=16384 tests/xen-qemu/run.sh
  boot_passed "$(keep_serial_log amd)" host_window_reported amd_top_range_reserved

  step "Xen 4.17 with XSM/FLASK: the pv_iommu class in the built-in policy"
  hypervisor-side/xen/build-xen-flask.sh

  # The same checks on that Xen, FLASK enforcing: every PV-IOMMU call the
  # checks make passes the pv_iommu class's permissions (attach against the
  # device's label among them), and nothing of the class is denied but the
  # one attach the negative check makes on purpose (init.sh,
  # flask_attach_refused_by_label: edu A, 0000:00:06.0, labelled by
  # build-xen-flask.sh with a type dom0 has no pv_iommu attach on). That
  # denial must be there: without it FLASK did not refuse, or the check did
  # not run. Fewer measured and hostile calls than the first boot (the checks
  # are the same, one more).
  step "Xen 4.17 with XSM/FLASK enforcing in QEMU"
  SKIP_XEN_BUILD=1 XEN_BIN="$BUILD/xen-flask-test.bin" XEN_EXTRA_ARGS="flask=enforcing" \
    MEASURE_PAGES=4096 FUZZ_CALLS=20000 BIG_PAGES=16384 tests/xen-qemu/run.sh
  log="$(keep_serial_log flask)"
  grep -aq "Flask:  Starting in enforcing mode" "$log" ||
    { echo "FAIL: the Xen booted for the FLASK checks is not enforcing" >&2; exit 1; }
  # xen/xsm/flask/avc.c prints a device as device=<sbdf in hex> (0x30: bus
  # 0, devfn 6.0), after the caller (current=d0), one printk per denial.
  expected_denial='avc:  denied  [{] attach [}] for .*device=0x30 scontext=system_u:system_r:dom0_t tcontext=system_u:object_r:pviommu_noattach_dev_t tclass=pv_iommu'
  denials="$(grep -a "avc:  denied" "$log" | grep -a "tclass=pv_iommu" || true)"
  if printf '%s\n' "$denials" | grep -av -e "$expected_denial" | grep -a .; then
    echo "FAIL: FLASK denied a PV-IOMMU permission the checks needed (above)" >&2
    exit 1
  fi
  expected_seen="$(printf '%s\n' "$denials" | grep -ac -e "$expected_denial" || true)"
  if [ "$expected_seen" != 1 ]; then
    echo "FAIL: want exactly one denial of dom0's attach of 0000:00:06.0 (pviommu_noattach_dev_t), saw $expected_seen" >&2
    exit 1
  fi
  printf '%s\n' "$denials"
  echo "FLASK enforcing: no pv_iommu permission denied but the negative check's attach"
fi

if [[ -x tests/xen-qemu-arm64/run.sh && "${PVIOMMU_SKIP_XEN:-0}" != 1 ]]; then
  step "Xen 4.17 arm64 in QEMU (fallback of issue 13)"
  tests/xen-qemu-arm64/run.sh
  # The arm64 object's barrier check must be able to fail too: an engine
  # with no dsb nsh; isb before its page lookups is refused (with the
  # toolchain the build above installed).
  PVIOMMU_ARM64_BUILD="$BUILD/arm64-4.17" refused_canary nospec-canary \
    "looks a page up with no dsb nsh; isb before it" "a page lookup with no speculation barrier" \
    hypervisor-side/xen/arm64/build-engine-arm64.sh "$BUILD/arm64-4.17/engine-arm64-nospec-canary"

  # The same arm64 Xen as a debug build (rebuilt in its tree): Xen's
  # ASSERTs on the Arm glue's paths (the p2m and its locks, the domU's
  # teardown), and the stack under the engine measured on Arm too.
  step "Xen 4.17 arm64 debug build in QEMU: Xen's and the glue's assertions"
  PVIOMMU_XEN_DEBUG=1 tests/xen-qemu-arm64/run.sh
  debug_log_held_up arm64-debug "$BUILD/arm64-4.17/test-debug/serial.clean.log" \
    "$BUILD/arm64-4.17/test-debug/serial.stalled.log"
fi

# Last, as it rebuilds the x86 Xen above in debug mode: the same checks on a
# debug Xen, so its ASSERTs run (the glue's lock order among them: no spinlock
# held across a guest copy or a page lookup, one driver lock per CPU). A
# failed assertion panics Xen and the checks fail with it; a WARN does not,
# so the log must show none. Its MEASURE lines are a debug build's.
if [[ -x tests/xen-qemu/run.sh && "${PVIOMMU_SKIP_XEN:-0}" != 1 ]]; then
  step "Xen 4.17 debug build in QEMU: Xen's and the glue's assertions"
  # Built here whatever SKIP_XEN_BUILD says: the release Xen above must not
  # stand in for it (its banner is checked below).
  SKIP_XEN_BUILD= PVIOMMU_XEN_DEBUG=1 tests/xen-qemu/run.sh
  debug_xen_held_up debug

  # The same debug Xen on AMD-Vi (Xen's AMD-Vi code and the glue's AMD side
  # under their assertions), with the AMD boot's reduced sizes.
  step "Xen 4.17 debug build in QEMU with AMD-Vi (amd-iommu)"
  SKIP_XEN_BUILD=1 PVIOMMU_QEMU_IOMMU=amd \
    MEASURE_PAGES=4096 FUZZ_CALLS=20000 BIG_PAGES=16384 tests/xen-qemu/run.sh
  debug_xen_held_up debug-amd
fi
