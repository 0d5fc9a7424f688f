# Sourced first by every glue host test (this directory's *.sh but the
# sourced helpers): strict mode, HERE (hypervisor-side/xen, where the
# glue's sources are) and WORK, a scratch directory removed on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Compile $WORK/test.c into $WORK/$1 with the flags most of these tests
# share (any further arguments go to the compiler too).
build_test() {
    local out="$1"
    shift
    cc -std=gnu11 -Wall -Werror -Wno-unused-function -Wno-unused-variable -I"$WORK" "$@" \
        -o "$WORK/$out" "$WORK/test.c"
}
