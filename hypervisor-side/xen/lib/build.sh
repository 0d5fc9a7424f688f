# shellcheck shell=bash
# build.sh -- the steps the Xen build scripts share (../build-xen.sh,
# ../arm64/build-xen-arm64-4.17.sh, ../arm64/build-xen-arm64.sh): a patched
# copy of a pristine source tree, the PV-IOMMU sources installed into it,
# and the check that the result has them. Sourced, not run.

XEN_LIB_XS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # hypervisor-side/xen

# series_patches DIR: appends to the array `patches` the patches DIR/series
# names, in order (blank lines and # comments skipped). Not a pipeline, so
# that a missing series fails the caller under set -e.
series_patches() {
    local l
    while read -r l; do
        case "$l" in ''|'#'*) continue ;; esac
        patches+=("$1/$l")
    done < "$1/series"
}

# patched_tree NAME SRC TREE STAMP_FILE STAMP PATCH_OPTS [PATCH...]: TREE
# is a copy of SRC with the PATCHes applied in order (patch -p1 --forward
# PATCH_OPTS, word-split: e.g. "-s -F0"), redone whenever TREE/STAMP_FILE
# does not hold STAMP (what the patch set and the source were). A fresh
# copy each time, because a changed patch cannot be applied over its old
# version; SRC stays pristine for patch dry-runs. NAME: the caller, for
# its messages.
patched_tree() {
    local name="$1" src="$2" tree="$3" stamp_file="$3/$4" stamp="$5" opts="$6" p
    shift 6
    [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || return 0
    echo "$name: preparing patched tree in $tree"
    rm -rf "$tree"
    cp -a "$src" "$tree"
    for p in "$@"; do
        echo "$name: applying $(basename "$p")"
        # shellcheck disable=SC2086 # opts: several options, split on purpose
        patch $opts -p1 --forward --no-backup-if-mismatch -d "$tree" < "$p" || return 1
    done
    echo "$stamp" > "$stamp_file"
}

# install_if_changed FROM TO: copies only a changed file, so that make's
# incremental build stays incremental.
install_if_changed() { cmp -s "$1" "$2" || cp "$1" "$2"; }

# install_pviommu_sources TREE GLUE SCRATCH: into Xen tree TREE, the
# public header (public/pv-iommu.h: Xen's form of abi/include/pviommu.h,
# same layout, checked with BUILD_BUG_ON), the engine boundary header and
# GLUE (the C glue) as xen/common/pviommu.c with the two files every glue
# includes: the code x86 and Arm share (pviommu-common.inc) and the
# table-frame code (pviommu-tables.inc); SCRATCH: a directory for the
# rewritten header.
install_pviommu_sources() {
    local tree="$1" glue="$2" scratch="$3"
    install_if_changed "$XEN_LIB_XS/public/pv-iommu.h" "$tree/xen/include/public/pv-iommu.h"
    # Xen has no <stdint.h>/<stddef.h>: its own types instead.
    sed -e 's/#include <stdint.h>/#include <xen\/types.h>/' -e '/#include <stddef.h>/d' \
        "$XEN_LIB_XS/include/pviommu_engine.h" > "$scratch/pviommu_engine.h"
    install_if_changed "$scratch/pviommu_engine.h" "$tree/xen/common/pviommu_engine.h"
    install_if_changed "$glue" "$tree/xen/common/pviommu.c"
    # What both glues include: the shared glue and the table-frame code
    # (one copy of those checks).
    install_if_changed "$XEN_LIB_XS/pviommu-common.inc" "$tree/xen/common/pviommu-common.inc"
    install_if_changed "$XEN_LIB_XS/pviommu-tables.inc" "$tree/xen/common/pviommu-tables.inc"
}

# xen_debug_config NAME WANT CONFIG MAKE...: the Xen tree's CONFIG (its
# .config) is a debug build if WANT is y, a release one if n, switched
# with `MAKE olddefconfig` only when it is not already (so a build dir
# goes back and forth cleanly, and a tree already right is not rebuilt).
# With EXPERT on, the options that follow DEBUG by default keep whatever
# a release build wrote for them, so they are switched with it:
# DEBUG_LOCKS, SCRUB_DEBUG (freed pages poisoned, the poison checked when
# they come back: a write into a freed table frame shows),
# XMEM_POOL_POISON, VERBOSE_DEBUG, FRAME_POINTER. A debug build that
# lacks one fails. NAME: the caller, for its messages.
xen_debug_config() {
    local name="$1" want="$2" config="$3" o have switch=n
    local opts="DEBUG DEBUG_LOCKS SCRUB_DEBUG XMEM_POOL_POISON VERBOSE_DEBUG FRAME_POINTER"
    shift 3
    for o in $opts; do
        have=n
        grep -q "^CONFIG_$o=y" "$config" && have=y
        [ "$have" = "$want" ] || switch=y
    done
    if [ "$switch" = y ]; then
        for o in $opts; do
            sed -i "/^CONFIG_$o=/d; /^# CONFIG_$o is not set\$/d" "$config"
            if [ "$want" = y ]; then
                echo "CONFIG_$o=y" >> "$config"
            else
                echo "# CONFIG_$o is not set" >> "$config"
            fi
        done
        "$@" olddefconfig > /dev/null
    fi
    if [ "$want" = y ]; then
        for o in $opts; do
            grep -q "^CONFIG_$o=y" "$config" ||
                { echo "$name: FAIL: CONFIG_$o not set in the debug build" >&2; return 1; }
        done
    fi
    echo "$name: CONFIG_DEBUG=$want"
}

# syms_present NAME NM_FILE SYM...: fails (saying which) unless every SYM
# is defined in NM_FILE (nm's output for xen-syms): a build that silently
# left the hypercall or the engine out must not pass.
syms_present() {
    local name="$1" nm_file="$2" s
    shift 2
    for s in "$@"; do
        grep -q " $s\$" "$nm_file" || { echo "$name: FAIL: $s not in xen-syms" >&2; return 1; }
    done
}

# xen_string_functions_own NAME NM_FILE: in the linked Xen (nm's output for
# xen-syms), memcmp, memcpy, memmove and memset are Xen's own, strong
# definitions, and no bcmp is global: a weak one is the engine object's
# compiler_builtins copy standing in for Xen's across the whole hypervisor
# (engine-symbols.sh's engine_only_entries_global keeps them local).
xen_string_functions_own() {
    local name="$1" nm_file="$2" s
    if grep -E ' [WwVv] (memcmp|memcpy|memmove|memset|bcmp)$' "$nm_file" >&2; then
        echo "$name: FAIL: a weak string function in xen-syms (the engine's, not Xen's)" >&2
        return 1
    fi
    for s in memcmp memcpy memmove memset; do
        grep -q " T $s\$" "$nm_file" || { echo "$name: FAIL: Xen's own $s not in xen-syms" >&2; return 1; }
    done
    echo "$name: memcmp, memcpy, memmove and memset are Xen's own"
}

# stack_paint_leaf_frameless NAME OBJDUMP OBJ: the glue's debug-build
# stack paint (pviommu-common.inc, pvx_stack_paint_below()) paints from the
# stack's floor to 64 bytes under its own stack pointer, so it must not
# store anything of its own below it: no frame, no push, no call (x86:
# push, sub/and of %rsp, call; arm64: stp/str to sp, sub sp, bl). Absent
# from a release build (nothing calls it): nothing to check.
stack_paint_leaf_frameless() {
    local name="$1" objdump="$2" obj="$3" body
    # (awk reads to the end: an early exit would kill objdump with SIGPIPE,
    # which the callers' pipefail takes for a failure.)
    body="$("$objdump" -d --no-show-raw-insn "$obj" |
        awk '/<pvx_stack_paint_below>:$/ { on = 1; next } on && /^$/ { on = 0 } on')"
    if [ -z "$body" ]; then
        echo "$name: no stack paint in this build (release)"
        return 0
    fi
    if grep -Eq '[[:space:]](push|call|bl)[[:space:]]|(sub|and)[[:space:]]+[^,]*,%rsp|[[:space:]](stp|str)[[:space:]][^[]*\[sp|sub[[:space:]]+sp,' <<< "$body"; then
        echo "$body" >&2
        echo "$name: FAIL: pvx_stack_paint_below() has a frame of its own, which its paint would overwrite" >&2
        return 1
    fi
    echo "$name: the stack paint is a leaf with no frame"
}

# symbol_names_fit NAME XEN_DIR: every name of Xen's symbol table (the maps
# its build writes from tools/symbols --all-symbols --xensyms: each name as
# Xen expands it) within KSYM_NAME_LEN, 127 bytes. Xen expands a name into
# a 128-byte buffer without a bound (symbols_lookup, %pS, XENPF_get_symbol):
# the engine's names are kept short (engine-symbols.sh), and this catches
# whatever reached the table another way (a prebuilt engine object, a
# section of the engine's the link made an output section, the C glue).
symbol_names_fit() {
    local name="$1" dir="$2" m found=0
    for m in "$dir/xen-syms.map" "$dir/xen.efi.map"; do
        [ -f "$m" ] || continue
        found=1
        if ! LC_ALL=C awk 'length($3) > 127 { print length($3), $3; bad = 1 } END { exit bad }' "$m" >&2; then
            echo "$name: FAIL: names longer than 127 bytes in Xen's symbol table ($m)" >&2
            return 1
        fi
    done
    [ "$found" = 1 ] || { echo "$name: FAIL: no symbol map in $dir" >&2; return 1; }
    echo "$name: every name in Xen's symbol table within 127 bytes"
}
