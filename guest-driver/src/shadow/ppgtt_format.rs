//! Bit layout of Intel Gen8+ 4-level PPGTT entries (48-bit GMA).
//!
//! Each table is one 4 KiB page of 512 little-endian 64-bit entries. Levels,
//! top-down: PML4 (GMA bits 47:39), PDP (38:30), PD (29:21), PT (20:12).
//! Bit 0 = present, bit 1 = writable, bits 47:12 = frame address. Bit 7 (PS)
//! in a PDP entry maps a 1 GiB page, in a PD entry a 2 MiB page; in a PT
//! entry bit 7 is the PAT bit, which in large-page entries moves to bit 12.
//! Nothing here knows about shadowing.

/// Entries per table page.
pub const ENTRIES: usize = 512;
/// Present bit.
pub const PRESENT: u64 = 1 << 0;
/// Writable bit.
pub const RW: u64 = 1 << 1;
/// Page-write-through cache bit.
pub const PWT: u64 = 1 << 3;
/// Page-cache-disable bit.
pub const PCD: u64 = 1 << 4;
/// Page-size bit in PDP/PD entries (1 GiB / 2 MiB page).
pub const PS: u64 = 1 << 7;
/// PAT bit of a 4 KiB PT entry.
pub const PTE_PAT: u64 = 1 << 7;
/// PAT bit of a 2 MiB / 1 GiB large-page entry.
pub const LARGE_PAT: u64 = 1 << 12;
/// Address field of table pointers and 4 KiB leaves (bits 47:12).
pub const ADDR_MASK: u64 = 0x0000_FFFF_FFFF_F000;
/// Address field of a 2 MiB page entry (bits 47:21).
pub const ADDR_MASK_2M: u64 = 0x0000_FFFF_FFE0_0000;
/// Address field of a 1 GiB page entry (bits 47:30).
pub const ADDR_MASK_1G: u64 = 0x0000_FFFF_C000_0000;
/// Width of a GMA in bits.
pub const GMA_BITS: u32 = 48;
/// Largest frame number the address field can hold.
pub const MAX_FRAME: u64 = ADDR_MASK >> 12;

/// A PPGTT level, numbered as in the hardware walk (4 = PML4 ... 1 = PT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Page table: 4 KiB leaves.
    Pt = 1,
    /// Page directory: PT pointers or 2 MiB pages.
    Pd = 2,
    /// Page-directory-pointer table: PD pointers or 1 GiB pages.
    Pdp = 3,
    /// Top level.
    Pml4 = 4,
}

impl Level {
    /// Lowest GMA bit indexed by this level.
    pub const fn shift(self) -> u32 {
        12 + 9 * (self as u32 - 1)
    }
    /// Bytes of GMA covered by one entry of this level.
    pub const fn entry_span(self) -> u64 {
        1u64 << self.shift()
    }
    /// Index into a table of this level for `gma`.
    pub const fn index(self, gma: u64) -> usize {
        ((gma >> self.shift()) & 0x1ff) as usize
    }
    /// The level below (None for PT).
    pub const fn child(self) -> Option<Level> {
        match self {
            Level::Pml4 => Some(Level::Pdp),
            Level::Pdp => Some(Level::Pd),
            Level::Pd => Some(Level::Pt),
            Level::Pt => None,
        }
    }
    /// Level from its number (1..=4).
    pub const fn from_number(n: u8) -> Option<Level> {
        match n {
            1 => Some(Level::Pt),
            2 => Some(Level::Pd),
            3 => Some(Level::Pdp),
            4 => Some(Level::Pml4),
            _ => None,
        }
    }
}

/// What one entry means at a given level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Not present: translation faults.
    NotPresent,
    /// Pointer to the next-level table in frame `.0`.
    Table(u64),
    /// 4 KiB leaf mapping frame `.0`.
    Leaf4K(u64),
    /// 2 MiB page starting at frame `.0` (512 frames).
    Page2M(u64),
    /// 1 GiB page starting at frame `.0` (262144 frames).
    Page1G(u64),
}

/// Decode `entry` found in a table of `level`. Bit 7 of a PML4 entry is
/// reserved; it is ignored (treated as a table pointer).
pub const fn decode(level: Level, entry: u64) -> EntryKind {
    if entry & PRESENT == 0 {
        return EntryKind::NotPresent;
    }
    match level {
        Level::Pt => EntryKind::Leaf4K((entry & ADDR_MASK) >> 12),
        Level::Pd if entry & PS != 0 => EntryKind::Page2M((entry & ADDR_MASK_2M) >> 12),
        Level::Pdp if entry & PS != 0 => EntryKind::Page1G((entry & ADDR_MASK_1G) >> 12),
        _ => EntryKind::Table((entry & ADDR_MASK) >> 12),
    }
}

/// Shadow table pointer: the guest entry's flags (PS cleared) pointing to
/// shadow table frame `frame`.
pub const fn table_entry(guest_entry: u64, frame: u64) -> u64 {
    (guest_entry & !ADDR_MASK & !PS) | ((frame << 12) & ADDR_MASK)
}

/// Shadow 4 KiB leaf: the guest PT entry's flags (RW, PWT, PCD, PAT, ...)
/// with the address replaced by `frame`.
pub const fn leaf_entry(guest_pte: u64, frame: u64) -> u64 {
    (guest_pte & !ADDR_MASK) | ((frame << 12) & ADDR_MASK)
}

/// Shadow 2 MiB page: the guest PD entry's flags (PS, RW, PWT, PCD, the
/// large-page PAT bit, ...) with the address replaced by `frame`, a
/// multiple of 512. Bits 20:13 of the guest's entry, reserved in a 2 MiB
/// entry, are not copied.
pub const fn large_entry_2m(guest_pde: u64, frame: u64) -> u64 {
    (guest_pde & !ADDR_MASK) | (guest_pde & LARGE_PAT) | ((frame << 12) & ADDR_MASK_2M)
}

/// The `i`-th piece of a large-page entry one level down, as the guest would
/// have written it had it used the smaller size: a 1 GiB entry yields 2 MiB
/// entries (PS kept), a 2 MiB entry yields 4 KiB PT entries (PAT moved from
/// bit 12 to bit 7, PS cleared). `level` is the level holding `entry`.
pub const fn split_large(level: Level, entry: u64, i: usize) -> u64 {
    match level {
        Level::Pdp => {
            let base = entry & ADDR_MASK_1G;
            let flags = entry & !ADDR_MASK;
            flags | (entry & LARGE_PAT) | ((base + ((i as u64) << 21)) & ADDR_MASK_2M)
        }
        _ => {
            let base = entry & ADDR_MASK_2M;
            let mut flags = entry & !ADDR_MASK & !PS;
            if entry & LARGE_PAT != 0 {
                flags |= PTE_PAT;
            }
            flags | ((base + ((i as u64) << 12)) & ADDR_MASK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_index_gma() {
        let gma = (3u64 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123;
        assert_eq!(Level::Pml4.index(gma), 3);
        assert_eq!(Level::Pdp.index(gma), 5);
        assert_eq!(Level::Pd.index(gma), 7);
        assert_eq!(Level::Pt.index(gma), 9);
        assert_eq!(Level::Pd.entry_span(), 2 << 20);
    }

    #[test]
    fn decode_and_split() {
        assert_eq!(decode(Level::Pt, 0x1234_5003), EntryKind::Leaf4K(0x12345));
        assert_eq!(decode(Level::Pd, 0x4020_0083), EntryKind::Page2M(0x40200));
        assert_eq!(decode(Level::Pdp, 0x4000_0083), EntryKind::Page1G(0x40000));
        assert_eq!(decode(Level::Pd, 0x4000_0002), EntryKind::NotPresent);
        let big = 0x4020_0000 | PRESENT | RW | PS | LARGE_PAT | PCD;
        let pte = split_large(Level::Pd, big, 3);
        assert_eq!(pte, 0x4020_3000 | PRESENT | RW | PTE_PAT | PCD);
        let g = 0x4000_0000 | PRESENT | PS | LARGE_PAT;
        assert_eq!(
            split_large(Level::Pdp, g, 2),
            0x4040_0000 | PRESENT | PS | LARGE_PAT
        );
    }
}
