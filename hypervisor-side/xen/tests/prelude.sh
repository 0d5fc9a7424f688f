# Sourced first by every glue host test (this directory's *.sh but the
# sourced helpers): strict mode, HERE (hypervisor-side/xen, where the
# glue's sources are) and WORK, a scratch directory removed on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
