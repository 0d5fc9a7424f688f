//! ARM LPAE stage-2 descriptors, 4 KiB granule, 48-bit IPA, start level 0
//! (Arm ARM D8.3): bits 1:0 = 0b11 table (levels 0-2) or page (level 3),
//! 0b01 block (2 MiB at level 2); MemAttr[5:2], S2AP[7:6], SH[9:8], AF[10];
//! output address bits 47:12. This is the format an unshared SMMU/IPMMU
//! stage-2 context uses.

use super::{Entry, PageTableFormat};
use crate::{MemAttr, Mfn, Permissions};

/// Valid.
pub const VALID: u64 = 1 << 0;
/// Table (levels 0-2) / page (level 3).
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// MemAttr field shift (4 bits).
pub const MEMATTR_SHIFT: u32 = 2;
/// Normal memory, outer and inner write-back.
pub const MEMATTR_NORMAL_WB: u64 = 0b1111;
/// Normal memory, outer and inner non-cacheable.
pub const MEMATTR_NORMAL_NC: u64 = 0b0101;
/// Device-nGnRE.
pub const MEMATTR_DEVICE_NGNRE: u64 = 0b0001;
/// S2AP read.
pub const S2AP_R: u64 = 1 << 6;
/// S2AP write.
pub const S2AP_W: u64 = 1 << 7;
/// Inner shareable.
pub const SH_INNER: u64 = 0b11 << 8;
/// Access flag.
pub const AF: u64 = 1 << 10;
/// Output address bits 47:12.
pub const ADDR_MASK: u64 = 0x0000_FFFF_FFFF_F000;

/// The LPAE stage-2 format.
pub struct Lpae;

impl PageTableFormat for Lpae {
    const NAME: &'static str = "ARM LPAE stage-2";
    const ADDRESS_MASK: u64 = 0x0000_FFFF_FFFF_F000;
    const ENTRY_FORMAT: u16 = pviommu_abi::entry_format::ARM_LPAE_STAGE2;

    #[inline]
    fn table_entry(table: Mfn) -> u64 {
        ((table.0 << 12) & ADDR_MASK) | VALID | TABLE_OR_PAGE
    }

    #[inline]
    fn leaf_entry(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32) -> u64 {
        let mut e = ((mfn.0 << 12) & ADDR_MASK) | VALID | AF;
        if level == 1 {
            e |= TABLE_OR_PAGE;
        }
        if perms.read {
            e |= S2AP_R;
        }
        if perms.write {
            e |= S2AP_W;
        }
        e |= match attr {
            MemAttr::WriteBack => (MEMATTR_NORMAL_WB << MEMATTR_SHIFT) | SH_INNER,
            MemAttr::Uncached => (MEMATTR_NORMAL_NC << MEMATTR_SHIFT) | SH_INNER,
            MemAttr::Device => MEMATTR_DEVICE_NGNRE << MEMATTR_SHIFT,
        };
        e
    }

    #[inline]
    fn decode(raw: u64, level: u32) -> Entry {
        if raw & VALID == 0 {
            return Entry::Empty;
        }
        let mfn = Mfn((raw & ADDR_MASK) >> 12);
        let is_leaf = if level == 1 {
            raw & TABLE_OR_PAGE != 0
        } else {
            raw & TABLE_OR_PAGE == 0
        };
        if !is_leaf {
            return if level == 1 {
                Entry::Empty
            } else {
                Entry::Table(mfn)
            };
        }
        let attr = match (raw >> MEMATTR_SHIFT) & 0xf {
            MEMATTR_NORMAL_WB => MemAttr::WriteBack,
            MEMATTR_NORMAL_NC => MemAttr::Uncached,
            _ => MemAttr::Device,
        };
        Entry::Leaf {
            mfn,
            perms: Permissions {
                read: raw & S2AP_R != 0,
                write: raw & S2AP_W != 0,
            },
            attr,
        }
    }
}
