# shellcheck shell=bash
# engine-symbols.sh -- the engine object's symbol names as Xen's symbol
# table can hold them; shared by ../build-engine.sh and
# ../arm64/build-engine-arm64.sh. Sourced, not run.
#
# Xen's symbol table (xen/tools/symbols.c) names a local symbol
# "<file>#<name>", <file> being the STT_FILE symbol before it, and stores
# a name's length in one byte. At run time symbols_lookup() and
# symbols_lookup_by_name() expand a name into a buffer of KSYM_NAME_LEN + 1
# (128) bytes on the stack *without a bound*: a longer name overflows it
# whenever Xen symbolises an engine address (a stack trace after a crash or
# a WARN, the 'd' debug key, livepatch, the debug build's self-test of
# symbols at boot, which is how the overflow was found on 2026-12-02). Rust's
# names are long (v0 mangling, generic instances) and so are its file
# symbols (`pviommu_xen.78d0cfc59d272dd4-cgu.0`): 22 engine names expanded
# past 127 bytes before.

# Longest expanded name Xen can take (KSYM_NAME_LEN).
ENGINE_SYM_MAX=127
# Each file symbol becomes rust_engine_<8 hex> (the prefix of its local
# names), and each long name pviommu_rs_<16 hex>: hashes of the original
# name, so a short name means the same function in every build (crash
# triage, livepatch tools); long-syms.map lists them all.
ENGINE_SYM_FILE=rust_engine
# Names longer than this are renamed (with a prefix such as
# "rust_engine_0123abcd#" a local name then expands to at most 121 bytes).
# (PVIOMMU_ENGINE_SYM_RENAME: only for the canary in scripts/test-all.sh,
# which must see the check below refuse a build that renames too little.)
ENGINE_SYM_RENAME="${PVIOMMU_ENGINE_SYM_RENAME:-100}"

# hashed_names PREFIX DIGITS: each name read, once, as "name PREFIX<hex>",
# the first DIGITS hex digits of the name's SHA-256.
hashed_names() {
    local n
    sort -u | while read -r n; do
        echo "$n $1$(printf '%s' "$n" | sha256sum | cut -c1-"$2")"
    done
}

# engine_short_symbols NAME NM OBJCOPY READELF RAW OUT MAP: OUT is RAW with
# its file symbols renamed rust_engine_<hash> (ENGINE_SYM_FILE) and every name longer than
# ENGINE_SYM_RENAME renamed pviommu_rs_<hash>, as MAP lists ("long short"
# per line); fails the caller (NAME, for its messages) if any name of OUT
# would still expand past ENGINE_SYM_MAX in Xen's table.
engine_short_symbols() {
    local name="$1" nm="$2" objcopy="$3" readelf="$4" raw="$5" out="$6" map="$7"
    {
        "$readelf" -sW "$raw" | awk '$4 == "FILE" && NF >= 8 { print $8 }' |
            hashed_names "${ENGINE_SYM_FILE}_" 8
        "$nm" "$raw" | LC_ALL=C awk -v max="$ENGINE_SYM_RENAME" '{ n = $NF; if (length(n) > max) print n }' |
            hashed_names pviommu_rs_ 16
    } > "$map"
    if [ "$(cut -d' ' -f2 "$map" | sort | uniq -d | head -1)" != "" ]; then
        echo "$name: FAIL: two symbols hash to one short name" >&2
        return 1
    fi
    "$objcopy" --redefine-syms="$map" "$raw" "$out"
    # Each name as Xen's table will hold it: "<file>#<name>" for a local
    # symbol, "<name>" otherwise (section symbols are not in the table).
    local long
    long=$("$readelf" -sW "$out" | LC_ALL=C awk -v max="$ENGINE_SYM_MAX" '
        $4 == "FILE" { f = (NF >= 8) ? $8 : ""; next }
        $1 !~ /^[0-9]+:$/ || $4 == "SECTION" || NF < 8 { next }
        { n = $8; len = length(n); if ($5 == "LOCAL" && f != "") len += length(f) + 1
          if (len > max) print len, n }')
    if [ -n "$long" ]; then
        # (From a here-string, not a pipe: `echo | head` under pipefail
        # fails the script with SIGPIPE once the list outgrows echo's
        # buffer, before the verdict below is printed.)
        head -5 <<< "$long" >&2
        echo "$name: FAIL: $(wc -l <<< "$long") symbol names expand past $ENGINE_SYM_MAX bytes in Xen's symbol table" >&2
        return 1
    fi
    echo "$name: renamed $(wc -l < "$map") file and long symbols; every name within $ENGINE_SYM_MAX bytes in Xen's symbol table"
}

# engine_only_entries_global NAME NM OBJCOPY OBJECT ENTRY...: every symbol
# the object defines becomes local but the entry points, and the object
# must then define exactly those globally. The object carries Rust's own
# compiler_builtins, whose memcmp, bcmp, memcpy, memmove and memset are
# weak global definitions: global, they took part in Xen's link. Xen's x86
# memcmp lives only in its lib.a, pulled in for an undefined symbol, so
# the engine's weak one was taken for every memcmp of the whole hypervisor
# (a review of 2026-12-07, seen in xen-syms as "W memcmp"). Local, each
# side keeps its own. (Undefined symbols, the pvx_* services, stay as they
# are.) lib/build.sh's xen_string_functions_own checks the linked result.
engine_only_entries_global() {
    local name="$1" nm="$2" objcopy="$3" obj="$4" want got
    shift 4
    "$objcopy" $(for s in "$@"; do printf -- '--keep-global-symbol=%s ' "$s"; done) "$obj"
    want="$(printf '%s\n' "$@" | sort)"
    got="$("$nm" -g --defined-only "$obj" | awk '{ print $3 }' | sort)"
    if [ "$got" != "$want" ]; then
        echo "$name: FAIL: the engine object defines globally other than its entry points:" >&2
        comm -13 <(echo "$want") <(echo "$got") | head -10 >&2
        return 1
    fi
    echo "$name: only the $# entry points are global in the engine object"
}
