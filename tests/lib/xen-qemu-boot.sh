# shellcheck shell=bash
# xen-qemu-boot.sh -- booting Xen in QEMU under a watchdog, and counting
# results: the part tests/xen-qemu/run.sh (x86) and tests/xen-qemu-arm64/run.sh
# share. Sourced, not run; works with and without `set -e`.
#
# Why a retry: under QEMU TCG a boot occasionally stalls in dom0's early
# boot, before any test has run. That is the emulator's flakiness, not a
# result, so such a boot is tried once more (and reported). A stall after
# the first test line, a panic or a timeout is a result and is not retried.
#
# The caller sets, before qemu_boot:
#   LOG            serial log of the boot (emptied at each boot); a stalled
#                  boot's log is kept as ${LOG%.log}.stalled.log
#   START_LINE     dom0's first test line: once seen, the boot did not stall
#   END_LINE       dom0's last test line: once seen, the test is over
#   TMO            seconds one boot may take in all
#   STALL          seconds from QEMU's start to START_LINE before the boot
#                  counts as stalled
#   END_GRACE_S    seconds QEMU runs on after END_LINE, for the lines Xen and
#                  dom0 print after it (default 3)
#   PANIC_GRACE_S  seconds QEMU runs on after a panic line, for the rest of
#                  the backtrace (default 0)
#   HANG_KEYS      Xen debug keys typed on the serial console when the boot
#                  times out after its first test line, before QEMU is
#                  stopped, so the log says where it hung (default none:
#                  nothing typed). QEMU's serial input is a FIFO the
#                  watchdog holds open; three CTRL-a switch Xen's serial
#                  input from dom0 to Xen first.
#   HANG_DUMP_S    seconds given to the dump (default 20)

# qemu_boot CMD...: boots CMD (QEMU and its arguments) into $LOG; when the
# boot stalls before START_LINE, keeps its log and boots once more. Sets
#   verdict       "" when the test ran to END_LINE (or QEMU exited by itself),
#                 else panic | timeout | stall | "stall (again, after one retry)"
#   first_line_s  seconds from QEMU's start to START_LINE ("" if never seen)
qemu_boot() {
    local stalled="${LOG%.log}.stalled.log"
    rm -f "$stalled"
    qemu_boot_once "$@"
    if [ "$verdict" = stall ]; then
        cp "$LOG" "$stalled"
        echo "run: boot stalled before the first test line after $STALL s (log $stalled); retrying once"
        qemu_boot_once "$@"
        if [ "$verdict" = stall ]; then verdict="stall (again, after one retry)"; fi
    fi
}

# qemu_boot_once CMD...: one QEMU run into $LOG, polled once a second.
qemu_boot_once() {
    : > "$LOG"
    verdict=""; first_line_s=""
    local t0 el qpid input="${LOG%.log}.input"
    t0=$(date +%s)
    # The serial input: a FIFO held open read-write here (so QEMU never
    # reads end-of-file), written only to type HANG_KEYS.
    rm -f "$input"; mkfifo "$input"
    exec 9<>"$input"
    "$@" < "$input" > "$LOG" 2>&1 &
    qpid=$!
    while kill -0 "$qpid" 2>/dev/null; do
        sleep 1
        el=$(( $(date +%s) - t0 ))
        if grep -aqE 'Kernel panic|Panic on CPU|FATAL TRAP' "$LOG"; then
            verdict="panic"; sleep "${PANIC_GRACE_S:-0}"; break
        fi
        if [ -z "$first_line_s" ]; then
            if grep -aqF "$START_LINE" "$LOG"; then
                first_line_s=$el
                echo "run: first test line after $el s"
            elif [ "$el" -ge "$STALL" ]; then
                verdict="stall"; break
            fi
        fi
        if [ "$el" -ge "$TMO" ]; then verdict="timeout"; break; fi
        if grep -aqF "$END_LINE" "$LOG"; then sleep "${END_GRACE_S:-3}"; break; fi
    done
    if [ "$verdict" = timeout ] && [ -n "$first_line_s" ] && [ -n "${HANG_KEYS:-}" ] &&
       kill -0 "$qpid" 2>/dev/null; then
        echo "run: timed out after the first test line: typing Xen debug keys '$HANG_KEYS' (their dump is in $LOG)"
        printf '\001\001\001' >&9; sleep 2
        local k
        for k in $(echo "$HANG_KEYS" | fold -w1); do printf '%s' "$k" >&9; sleep 2; done
        sleep "${HANG_DUMP_S:-20}"
    fi
    if kill -0 "$qpid" 2>/dev/null; then kill "$qpid"; sleep 1; fi
    wait "$qpid" 2>/dev/null || true
    exec 9>&-
    rm -f "$input"
}

# Result counting: pass/fail print a result line and count it; a script
# that reads its results from the serial log sets passed/failed first.
passed=0; failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }

# results_summary: the "N passed, N failed" line that scripts/test-all.sh
# and CI read; returns 0 iff nothing failed and something passed (a run
# that checked nothing is not a pass).
results_summary() {
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
}
