#!/bin/bash
# Which p2m type changes take device write access away (patch 0002's
# pviommu_write_lost(), in the 4.17 patch and its 4.20 variant): the
# function as each patch adds it, compiled on the host against x86's type
# names and put every change between the types a device can be given a
# page of. From log-dirty to read-only or ioreq-server is a loss too:
# writable device mappings made before log-dirty mode stay until its
# sliced revocation reaches them (a review of 2026-12-05; the rule was
# "from rw" only). Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"
failures=0
for patch in "$HERE/patches/0002-pviommu-kconfig-and-hooks.patch" \
             "$HERE/patches-4.20/0002-pviommu-kconfig-and-hooks-xen4.20.patch"; do
    sed -n '/^+static bool pviommu_write_lost/,/^+}/s/^+//p' "$patch" > "$WORK/rule.inc"
    grep -q 'pviommu_write_lost' "$WORK/rule.inc" ||
        { echo "write-lost: no pviommu_write_lost in $(basename "$patch")" >&2; exit 1; }
    # And both hooks decide by it: p2m_set_entry's (pviommu_p2m_change) and
    # p2m_change_type_range's.
    calls=$(grep -c '^+.*if ( pviommu_write_lost(ot, nt)' "$patch" || true)
    if [ "$calls" != 2 ]; then
        echo "write-lost: $(basename "$patch"): $calls hooks decide by the rule, want 2" >&2
        failures=$((failures + 1))
    fi
    cat > "$WORK/test.c" <<'C'
#include <stdbool.h>
#include <stdio.h>
/* x86's p2m types a device can be given a page of, and one it cannot. */
typedef enum { p2m_ram_rw, p2m_ram_logdirty, p2m_ram_ro, p2m_ioreq_server,
               p2m_ram_paging_out } p2m_type_t;
static const char *const name[] = { "rw", "logdirty", "ro", "ioreq_server",
                                    "paging_out" };
#include "rule.inc"
int main(void)
{
    /* want[ot][nt]: whether a device may have been writing and no longer may. */
    static const bool want[5][5] = {
        /* to:       rw     logdirty ro     ioreq  paging_out */
        /* rw */   { false, true,    true,  true,  true  },
        /* logd */ { false, false,   true,  true,  true  },
        /* ro */   { false, false,   false, false, false },
        /* ioreq */{ false, false,   false, false, false },
        /* pgout */{ false, false,   false, false, false },
    };
    int wrong = 0;
    for ( int ot = 0; ot < 5; ot++ )
        for ( int nt = 0; nt < 5; nt++ )
            if ( pviommu_write_lost(ot, nt) != want[ot][nt] )
            {
                printf("FAIL %s -> %s: %d, want %d\n", name[ot], name[nt],
                       pviommu_write_lost(ot, nt), want[ot][nt]);
                wrong++;
            }
    return wrong != 0;
}
C
    if gcc -std=gnu11 -Wall -Werror -o "$WORK/test" "$WORK/test.c" && "$WORK/test"; then
        echo "write-lost: $(basename "$patch"): all answers right"
    else
        failures=$((failures + 1))
    fi
done
exit $((failures != 0))
