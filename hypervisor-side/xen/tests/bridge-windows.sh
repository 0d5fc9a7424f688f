#!/bin/bash
# The Arm glue's reserved regions from the device tree (arm64/pviommu-arm.c:
# pvx_build_regions() and the host bridge helpers before it, with
# pviommu-common.inc's region table), compiled on the host over a small
# fake of Xen's device-tree API, and put these cases:
#  - QEMU virt's bridge (bus = CPU address for memory, I/O space at bus 0):
#    its windows and config space reserved, RAM not;
#  - a bridge that translates (a 64-bit window at bus 16 GiB seen by the
#    CPU at 512 GiB, as on hosts with several root complexes): reserved at
#    both addresses (before 2026-12-06, only at the CPU one, where a BFN
#    equal to a peer BAR's bus address would reach that BAR);
#  - a PCI-PCI bridge node under it (an empty `ranges`, no cell counts):
#    nothing of its own, and no refusal;
#  - a host bridge whose `ranges` is missing, cut short, has other cell
#    counts, or whose CPU address does not translate: PV-IOMMU stays off
#    (pvx_regions_incomplete), where before its windows went unreserved;
#  - a host booted with ACPI (its MSI doorbells and windows are in the
#    MADT/IORT, not the device tree): off;
#  - a device's reg ending at the top of the address space: reserved;
#  - a bridge with no device_type named "pcie" (Xen drives it as PCI):
#    read as one; a host bridge with an empty `ranges`: off.
# Exits non-zero on a wrong answer.
# shellcheck source=prelude.sh
. "$(dirname "$0")/prelude.sh"

# The region table (as run-window.sh takes it) and the Arm builder.
# shellcheck source=glue-regions.sh
. "$HERE/tests/glue-regions.sh"
glue_regions bridge-windows "$WORK"
sed -n '/^\/\* ---- Reserved BFN regions and limits/,/^static void cf_check pvx_dump_dom0_p2m/{/^static void cf_check pvx_dump_dom0_p2m/!p}' \
    "$HERE/arm64/pviommu-arm.c" > "$WORK/build.inc"
grep -q 'pvx_build_regions(void)' "$WORK/build.inc" || { echo "bridge-windows: pvx_build_regions not found" >&2; exit 1; }

cat > "$WORK/test.c" <<'C'
#include <string.h>
#include "glue-host.h"

#define cf_check
#define PVIOMMU_REGION_MMIO 1
#define PVIOMMU_REGION_MSI 2
#define PVIOMMU_REGION_PLATFORM 3

/* ---- A fake of Xen's device tree: what the builder calls ---- */
typedef uint32_t __be32;
static uint32_t be32_to_cpu(__be32 v) { return __builtin_bswap32(v); }
static __be32 cpu_to_be32(uint32_t v) { return __builtin_bswap32(v); }
static uint64_t dt_read_number(const __be32 *cell, int size)
{
    uint64_t r = 0;

    while ( size-- )
        r = (r << 32) | be32_to_cpu(*cell++);
    return r;
}

struct dt_device_node {
    const char *full_name, *name, *type, *compatible;
    struct dt_device_node *parent, *allnext;
    /* Properties, big-endian cells; has_* false: absent. */
    bool has_ranges, has_cells;
    __be32 ranges[32];
    uint32_t ranges_len; /* bytes */
    uint32_t address_cells, size_cells;
    uint64_t reg[2][2];
    unsigned int nreg;
    bool translation_fails;
};
static struct dt_device_node *dt_host;
#define dt_for_each_device_node(dt, dn) for ( (dn) = (dt); (dn); (dn) = (dn)->allnext )

static const char *dt_node_full_name(const struct dt_device_node *np) { return np->full_name; }
static const char *dt_node_name(const struct dt_device_node *np) { return np->name; }
static bool dt_device_type_is_equal(const struct dt_device_node *np, const char *t)
{
    return np->type && !strcmp(np->type, t);
}
static bool dt_device_is_compatible(const struct dt_device_node *np, const char *c)
{
    return np->compatible && !strcmp(np->compatible, c);
}
static const struct dt_device_node *dt_get_parent(const struct dt_device_node *np) { return np->parent; }
static const void *dt_get_property(const struct dt_device_node *np, const char *name, uint32_t *len)
{
    if ( strcmp(name, "ranges") || !np->has_ranges )
        return NULL;
    *len = np->ranges_len;
    return np->ranges;
}
static bool dt_property_read_u32(const struct dt_device_node *np, const char *name, uint32_t *v)
{
    if ( !np->has_cells )
        return false;
    *v = !strcmp(name, "#address-cells") ? np->address_cells : np->size_cells;
    return true;
}
/* The parent's #address-cells (2 at the root, as on QEMU's virt). */
static int dt_n_addr_cells(const struct dt_device_node *np)
{
    return np->parent && np->parent->has_cells ? (int)np->parent->address_cells : 2;
}
static unsigned int dt_number_of_address(const struct dt_device_node *np) { return np->nreg; }
static int dt_device_get_address(const struct dt_device_node *np, unsigned int i,
                                 uint64_t *addr, uint64_t *size)
{
    *addr = np->reg[i][0];
    *size = np->reg[i][1];
    return 0;
}
/*
 * Xen's, for a bridge under the root (whose addresses need no further
 * translation): each entry's CPU address and size, or DT_BAD_ADDR where
 * translation fails; -EINVAL with no `ranges`.
 */
static int dt_for_each_range(const struct dt_device_node *dev,
                             int (*cb)(const struct dt_device_node *, uint64_t, uint64_t, void *),
                             void *data)
{
    int pna = dt_n_addr_cells(dev), one = 3 + pna + 2;
    const __be32 *r = dev->ranges;
    int left;

    if ( !dev->has_ranges )
        return -EINVAL;
    for ( left = dev->ranges_len / 4; left >= one; left -= one, r += one )
    {
        uint64_t a = dev->translation_fails ? ~(uint64_t)0 : dt_read_number(r + 3, pna);
        int rc = cb(dev, a, dt_read_number(r + 3 + pna, 2), data);

        if ( rc )
            return rc;
    }
    return 0;
}

/* Boot memory: one bank of 2 GiB at 1 GiB (QEMU virt). */
struct membanks { unsigned int nr_banks; struct { uint64_t start, size; } bank[2]; };
typedef struct membanks pvx_membanks_t;
static struct membanks test_mem = { 1, { { 0x40000000, 0x80000000 } } };
#define PVX_BOOT_MEM() (&test_mem)
static unsigned long max_page = (0x40000000 + 0x80000000) >> PAGE_SHIFT;
#define pfn_to_paddr(pfn) ((uint64_t)(pfn) << PAGE_SHIFT)
static unsigned int p2m_ipa_bits = 44;
static bool acpi_disabled = true;

#include "regions.inc"
#include "build.inc"

/* ---- The cases ---- */
static int failures;

/* A `ranges` entry of a PCI bridge under the root (pna 2). */
static void range(struct dt_device_node *n, uint32_t space, uint64_t bus, uint64_t cpu, uint64_t size)
{
    __be32 *r = n->ranges + n->ranges_len / 4;

    r[0] = cpu_to_be32(space << 24);
    r[1] = cpu_to_be32(bus >> 32); r[2] = cpu_to_be32((uint32_t)bus);
    r[3] = cpu_to_be32(cpu >> 32); r[4] = cpu_to_be32((uint32_t)cpu);
    r[5] = cpu_to_be32(size >> 32); r[6] = cpu_to_be32((uint32_t)size);
    n->ranges_len += 7 * 4;
    n->has_ranges = true;
}

static struct dt_device_node root = { .full_name = "/", .has_cells = true, .address_cells = 2, .size_cells = 2 };

static struct dt_device_node host_bridge(const char *name, const char *type)
{
    struct dt_device_node n = {
        .full_name = name, .type = type, .parent = &root,
        .has_cells = true, .address_cells = 3, .size_cells = 2,
        .reg = { { 0x4010000000, 0x10000000 } }, .nreg = 1,
    };
    return n;
}

/* Whether the byte at addr is in a reserved region. */
static bool reserved(uint64_t addr)
{
    for ( unsigned int i = 0; i < pvx_nr_regions; i++ )
        if ( PFN_DOWN(addr) >= pvx_regions[i].start &&
             PFN_DOWN(addr) - pvx_regions[i].start < pvx_regions[i].nr )
            return true;
    return false;
}

static void build(struct dt_device_node *first)
{
    pvx_nr_regions = 0;
    pvx_regions_incomplete = false;
    dt_host = first;
    pvx_build_regions();
    pvx_sort_regions();
}

static void expect(bool got, bool want, const char *what)
{
    printf("%s %s\n", got == want ? "ok  " : "FAIL", what);
    failures += got != want;
}

int main(void)
{
    struct dt_device_node a, b, c;

    /* QEMU virt: I/O at bus 0 (CPU 0x3eff0000), 32-bit and 64-bit memory identity. */
    a = host_bridge("/pcie@10000000", "pci");
    range(&a, 1, 0, 0x3eff0000, 0x10000);
    range(&a, 2, 0x10000000, 0x10000000, 0x2eff0000);
    range(&a, 3, 0x8000000000, 0x8000000000, 0x8000000000);
    build(&a);
    expect(pvx_regions_incomplete, false, "virt: the bridge is read");
    expect(reserved(0x8000000000) && reserved(0xffffffffff), true, "virt: the 64-bit window reserved");
    expect(reserved(0x4010000000), true, "virt: config space (reg) reserved");
    expect(reserved(0x3eff0000), true, "virt: the I/O window's CPU address reserved");
    expect(reserved(0x40000000) || reserved(0xbfffffff), false, "virt: RAM not reserved");

    /* A bridge that translates, with a PCI-PCI bridge node below it. */
    a = host_bridge("/pcie@4010000000", "pci");
    range(&a, 3, 0x400000000, 0x8000000000, 0x400000000);
    b = (struct dt_device_node){ .full_name = "/pcie@4010000000/pci@0", .type = "pci", .parent = &a,
                                  .has_ranges = true, .ranges_len = 0 };
    a.allnext = &b;
    build(&a);
    expect(pvx_regions_incomplete, false, "offset: the bridge and the one below it are read");
    expect(reserved(0x8000000000) && reserved(0x83ffffffff), true, "offset: the window at its CPU address");
    expect(reserved(0x400000000) && reserved(0x7ffffffff), true, "offset: the window at its bus address");
    expect(reserved(0x800000000), false, "offset: nothing past the bus window");

    /* The same as "pciex". */
    a = host_bridge("/pcie@4010000000", "pciex");
    range(&a, 2, 0x100000000, 0x8000000000, 0x40000000);
    build(&a);
    expect(reserved(0x100000000) && reserved(0x13fffffff), true, "pciex: the window at its bus address");

    /* Bridges whose windows cannot be read: off. */
    a = host_bridge("/pcie@4010000000", "pci");
    build(&a);
    expect(pvx_regions_incomplete, true, "no ranges: off");

    a = host_bridge("/pcie@4010000000", "pci");
    range(&a, 3, 0x400000000, 0x8000000000, 0x400000000);
    a.ranges_len -= 4;
    build(&a);
    expect(pvx_regions_incomplete, true, "ranges cut short: off");

    a = host_bridge("/pcie@4010000000", "pci");
    range(&a, 3, 0x400000000, 0x8000000000, 0x400000000);
    a.has_cells = false;
    build(&a);
    expect(pvx_regions_incomplete, true, "no #address-cells: off");

    a = host_bridge("/pcie@4010000000", "pci");
    range(&a, 3, 0x400000000, 0x8000000000, 0x400000000);
    a.translation_fails = true;
    build(&a);
    expect(pvx_regions_incomplete, true, "a CPU address that does not translate: off");

    /* A second bridge after a good one: its failure is not hidden. */
    a = host_bridge("/pcie@10000000", "pci");
    range(&a, 2, 0x10000000, 0x10000000, 0x2eff0000);
    c = host_bridge("/pcie@4010000000", "pci");
    a.allnext = &c;
    build(&a);
    expect(pvx_regions_incomplete, true, "the second bridge of two unreadable: off");

    /*
     * A device's reg that ends at the top of the address space: reserved
     * (its end was a sum, which wrapped to 0, "below RAM's end").
     */
    c = (struct dt_device_node){ .full_name = "/soc/top", .reg = { { 0xfffffffffff00000ULL, 0x100000 } }, .nreg = 1 };
    build(&c);
    expect(reserved(0xfffffffffff00000ULL) && reserved(0xffffffffffffffffULL), true,
           "a reg ending at 2^64 reserved");

    /*
     * A bridge with no device_type, named "pcie" (Xen drives it as PCI,
     * dt_bus_pci_match()): read as one. Before, not a PCI node to the glue:
     * its windows went unreserved and PV-IOMMU on.
     */
    a = host_bridge("/pcie@4010000000", NULL);
    a.name = "pcie";
    range(&a, 3, 0x400000000, 0x8000000000, 0x400000000);
    build(&a);
    expect(pvx_regions_incomplete, false, "no device_type, named pcie: read");
    expect(reserved(0x8000000000) && reserved(0x400000000), true,
           "no device_type, named pcie: its window at both addresses");

    /* A host bridge with an empty `ranges`: nothing known of its windows. */
    a = host_bridge("/pcie@4010000000", "pci");
    a.has_ranges = true;
    a.ranges_len = 0;
    build(&a);
    expect(pvx_regions_incomplete, true, "an empty ranges on a host bridge: off");

    /* A host booted with ACPI: its addresses are not in the device tree. */
    a = host_bridge("/pcie@10000000", "pci");
    range(&a, 2, 0x10000000, 0x10000000, 0x2eff0000);
    acpi_disabled = false;
    build(&a);
    acpi_disabled = true;
    expect(pvx_regions_incomplete, true, "booted with ACPI: off");

    if ( failures )
        printf("bridge-windows: %d FAILED\n", failures);
    else
        printf("bridge-windows: all passed\n");
    return failures != 0;
}
C
cc -std=gnu11 -Wall -Wextra -Wno-unused-function -Wno-unused-parameter -Werror \
    -I"$WORK" -I"$HERE/tests" -o "$WORK/test" "$WORK/test.c"
"$WORK/test"
