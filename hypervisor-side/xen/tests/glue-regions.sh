# Sourced by the tests that compile the glue's reserved-region table on
# the host (run-window.sh, bridge-windows.sh). glue_regions NAME WORK:
# pviommu-common.inc from the table's definition to the end of
# pvx_run_refused() (everything before pviommu_init), as in the glue, into
# WORK/regions.inc, checked to hold what the tests use; a test's C file
# includes "glue-host.h" (this directory) before it. NAME: the caller,
# for its messages.
glue_regions() {
    local name="$1" work="$2" want
    local src
    src="$(dirname "${BASH_SOURCE[0]}")/../pviommu-common.inc"
    sed -n '/^#define PVX_MAX_REGIONS/,/^static int __init cf_check pviommu_init/{/^static int __init cf_check pviommu_init/!p}' \
        "$src" > "$work/regions.inc"
    for want in pvx_run_in_window pvx_run_refused pvx_regions_incomplete; do
        grep -q "$want" "$work/regions.inc" || { echo "$name: $want not found" >&2; return 1; }
    done
}
