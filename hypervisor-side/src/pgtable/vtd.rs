//! Intel VT-d second-level paging entries (VT-d spec 3.x, section 9.8):
//! bit 0 Read, bit 1 Write, bits 5:3 EMT (memory type, used with IPAT),
//! bit 6 IPAT, bit 7 PS (superpage, at level 2 = 2 MiB), bit 11 SNP (snoop),
//! bits 51:12 address. Non-leaf entries carry R and W and the next table.
//!
//! SNP is only valid where the IOMMU reports Snoop Control (ECAP.SC);
//! elsewhere it is a reserved bit and the walk faults. [`Vtd`] is the format
//! for such an IOMMU (write-back maps force snooping, uncached ones leave
//! it to the device's no-snoop hint); [`VtdNoSnoop`] never sets SNP, so its
//! write-back and uncached entries differ only in the EMT/IPAT bits, which
//! legacy-mode translation ignores: it cannot honour attributes.

use super::{Entry, PageTableFormat};
use crate::{MemAttr, Mfn, Permissions};

/// Read.
pub const R: u64 = 1 << 0;
/// Write.
pub const W: u64 = 1 << 1;
/// Extended memory type field shift (3 bits).
pub const EMT_SHIFT: u32 = 3;
/// EMT value: uncacheable.
pub const EMT_UC: u64 = 0;
/// EMT value: write-back.
pub const EMT_WB: u64 = 6;
/// Ignore PAT.
pub const IPAT: u64 = 1 << 6;
/// Page size: a leaf above level 1.
pub const PS: u64 = 1 << 7;
/// Snoop: DMA is cache-coherent.
pub const SNP: u64 = 1 << 11;
/// Address bits 51:12.
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// The VT-d second-level format of an IOMMU with Snoop Control.
pub struct Vtd;

/// The VT-d second-level format of an IOMMU without Snoop Control.
pub struct VtdNoSnoop;

fn leaf(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32, snoop_control: bool) -> u64 {
    let mut e = (mfn.0 << 12) & ADDR_MASK;
    if perms.read {
        e |= R;
    }
    if perms.write {
        e |= W;
    }
    e |= match attr {
        MemAttr::WriteBack if snoop_control => SNP | (EMT_WB << EMT_SHIFT),
        MemAttr::WriteBack => EMT_WB << EMT_SHIFT,
        MemAttr::Uncached | MemAttr::Device => IPAT | (EMT_UC << EMT_SHIFT),
    };
    if level > 1 {
        e |= PS;
    }
    e
}

impl PageTableFormat for Vtd {
    const NAME: &'static str = "Intel VT-d second-level";
    const ADDRESS_MASK: u64 = ADDR_MASK;
    const ENTRY_FORMAT: u16 = pviommu_abi::entry_format::VTD_SECOND_LEVEL;

    #[inline]
    fn table_entry(table: Mfn) -> u64 {
        ((table.0 << 12) & ADDR_MASK) | R | W
    }

    #[inline]
    fn leaf_entry(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32) -> u64 {
        leaf(mfn, perms, attr, level, true)
    }

    #[inline]
    fn decode(raw: u64, level: u32) -> Entry {
        decode(raw, level)
    }
}

impl PageTableFormat for VtdNoSnoop {
    const NAME: &'static str = "Intel VT-d second-level (no snoop control)";
    const ADDRESS_MASK: u64 = ADDR_MASK;
    const ENTRY_FORMAT: u16 = pviommu_abi::entry_format::VTD_SECOND_LEVEL;

    #[inline]
    fn table_entry(table: Mfn) -> u64 {
        Vtd::table_entry(table)
    }

    #[inline]
    fn leaf_entry(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32) -> u64 {
        leaf(mfn, perms, attr, level, false)
    }

    #[inline]
    fn decode(raw: u64, level: u32) -> Entry {
        decode(raw, level)
    }
}

#[inline]
fn decode(raw: u64, level: u32) -> Entry {
    if raw & (R | W) == 0 {
        return Entry::Empty;
    }
    let mfn = Mfn((raw & ADDR_MASK) >> 12);
    if level == 1 || raw & PS != 0 {
        let attr = if raw & SNP != 0 || (raw >> EMT_SHIFT) & 7 == EMT_WB {
            MemAttr::WriteBack
        } else {
            // UC and Device share one encoding on VT-d; the engine's
            // mapping table remembers which the caller asked for.
            MemAttr::Uncached
        };
        Entry::Leaf {
            mfn,
            perms: Permissions {
                read: raw & R != 0,
                write: raw & W != 0,
            },
            attr,
        }
    } else {
        Entry::Table(mfn)
    }
}
