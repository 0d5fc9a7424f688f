//! What [`Client::entry`](crate::Client::entry) reads back
//! (`PVIOMMU_CMD_entry`, ABI 1.3): the leaf entry a device attached to one
//! of a driver domain's own contexts finds for a BFN, with the address
//! field zeroed by the hypervisor, and the VT-d meaning of its bits.
//!
//! The ABI names the entry's format ([`pviommu_abi::entry_format`]);
//! [`IommuEntry::vtd`] decodes a VT-d one (on Xen the engine's contexts
//! exist only on VT-d so far).

use pviommu_abi::{Bfn, ContextId, DomId};

/// VT-d second-level entry bits (VT-d spec 3.x, section 9.8), the ones a
/// leaf can carry besides the address.
pub mod vtd_bits {
    /// Read.
    pub const R: u64 = 1 << 0;
    /// Write.
    pub const W: u64 = 1 << 1;
    /// Extended memory type, bits 5:3 (an IA-32 PAT memory type).
    pub const EMT_SHIFT: u32 = 3;
    /// The EMT field's mask, in place.
    pub const EMT_MASK: u64 = 7 << EMT_SHIFT;
    /// Ignore PAT: EMT alone gives the memory type.
    pub const IPAT: u64 = 1 << 6;
    /// Page size: a leaf above level 1 (a superpage).
    pub const PS: u64 = 1 << 7;
    /// Snoop: the device's accesses are cache-coherent whatever its
    /// no-snoop hint (valid only with Snoop Control).
    pub const SNP: u64 = 1 << 11;
    /// Every bit [`VtdEntry`](super::VtdEntry) decodes.
    pub const KNOWN: u64 = R | W | EMT_MASK | IPAT | PS | SNP;
}

/// A leaf entry read back through `PVIOMMU_CMD_entry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IommuEntry {
    /// The driver domain.
    pub domid: DomId,
    /// Its context (never the default one).
    pub context: ContextId,
    /// The BFN asked about.
    pub bfn: Bfn,
    /// Level of the leaf: 1 is a 4 KiB page, 2 a 2 MiB superpage.
    pub level: u32,
    /// The [`entry_format`](pviommu_abi::entry_format) of `bits`.
    pub format: u16,
    /// The entry in the IOMMU's format, address bits zeroed.
    pub bits: u64,
}

impl IommuEntry {
    /// Bytes the leaf maps (4 KiB at level 1, 2 MiB at level 2, ...).
    pub fn page_size(&self) -> u64 {
        let shift = 12 + 9 * u64::from(self.level.saturating_sub(1));
        1u64.checked_shl(shift as u32).unwrap_or(0)
    }

    /// The bits as a VT-d second-level leaf, if they are one.
    pub fn vtd(&self) -> Option<VtdEntry> {
        (self.format == pviommu_abi::entry_format::VTD_SECOND_LEVEL)
            .then(|| VtdEntry::decode(self.bits))
    }
}

/// An IA-32 memory type, as VT-d's EMT field holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// 0: uncacheable.
    Uc,
    /// 1: write-combining.
    Wc,
    /// 4: write-through.
    Wt,
    /// 5: write-protected.
    Wp,
    /// 6: write-back.
    Wb,
    /// 7: uncacheable, overridable by MTRRs (UC-).
    UcMinus,
    /// 2 or 3: reserved encodings.
    Reserved(u8),
}

impl MemoryType {
    /// From the 3-bit field.
    pub fn from_field(v: u8) -> MemoryType {
        match v & 7 {
            0 => MemoryType::Uc,
            1 => MemoryType::Wc,
            4 => MemoryType::Wt,
            5 => MemoryType::Wp,
            6 => MemoryType::Wb,
            7 => MemoryType::UcMinus,
            r => MemoryType::Reserved(r),
        }
    }
    /// `"UC"`, `"WC"`, `"WT"`, `"WP"`, `"WB"`, `"UC-"` or `"reserved"`.
    pub fn name(self) -> &'static str {
        match self {
            MemoryType::Uc => "UC",
            MemoryType::Wc => "WC",
            MemoryType::Wt => "WT",
            MemoryType::Wp => "WP",
            MemoryType::Wb => "WB",
            MemoryType::UcMinus => "UC-",
            MemoryType::Reserved(_) => "reserved",
        }
    }
}

/// A VT-d second-level leaf, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdEntry {
    /// R: the device may read.
    pub read: bool,
    /// W: the device may write.
    pub write: bool,
    /// SNP: accesses snoop the CPU caches whatever the device asks.
    pub snoop: bool,
    /// IPAT: the memory type is EMT alone (the guest PAT is ignored).
    pub ipat: bool,
    /// EMT, bits 5:3.
    pub emt: MemoryType,
    /// PS: a superpage leaf.
    pub superpage: bool,
    /// Set bits that are none of the above (ignored or reserved bits).
    pub other: u64,
}

impl VtdEntry {
    /// Decode `bits` (address field ignored).
    pub fn decode(bits: u64) -> VtdEntry {
        use vtd_bits::*;
        VtdEntry {
            read: bits & R != 0,
            write: bits & W != 0,
            snoop: bits & SNP != 0,
            ipat: bits & IPAT != 0,
            emt: MemoryType::from_field(((bits & EMT_MASK) >> EMT_SHIFT) as u8),
            superpage: bits & PS != 0,
            other: bits & !KNOWN & !ADDRESS_MASK,
        }
    }

    /// `"R W SNP EMT=WB"`: the set flags, then the memory type.
    pub fn flags_text(&self) -> String {
        let mut parts: Vec<String> = [
            (self.read, "R"),
            (self.write, "W"),
            (self.superpage, "PS"),
            (self.snoop, "SNP"),
            (self.ipat, "IPAT"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, n)| n.to_string())
        .collect();
        parts.push(format!("EMT={}", self.emt.name()));
        if self.other != 0 {
            parts.push(format!("other={:#x}", self.other));
        }
        parts.join(" ")
    }
}

/// Address bits 51:12 of a VT-d entry (zero in what `CMD_entry` returns).
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_engine_writes() {
        // Write-back with snoop control: R W, EMT=WB, SNP.
        let wb = VtdEntry::decode(0x1 | 0x2 | (6 << 3) | (1 << 11));
        assert!(wb.read && wb.write && wb.snoop && !wb.ipat && !wb.superpage);
        assert_eq!(wb.emt, MemoryType::Wb);
        assert_eq!(wb.flags_text(), "R W SNP EMT=WB");
        // Uncached: IPAT, EMT=UC, no SNP.
        let uc = VtdEntry::decode(0x1 | (1 << 6));
        assert_eq!(uc.emt, MemoryType::Uc);
        assert_eq!(uc.flags_text(), "R IPAT EMT=UC");
        assert_eq!(VtdEntry::decode(2 << 3).emt, MemoryType::Reserved(2));
        assert_eq!(VtdEntry::decode(1 << 62).other, 1 << 62);
    }

    #[cfg(feature = "sim")]
    #[test]
    fn bit_positions_match_the_engine_s_vtd_format() {
        use pviommu_hv::pgtable::vtd;
        assert_eq!(vtd_bits::R, vtd::R);
        assert_eq!(vtd_bits::W, vtd::W);
        assert_eq!(vtd_bits::EMT_SHIFT, vtd::EMT_SHIFT);
        assert_eq!(vtd_bits::IPAT, vtd::IPAT);
        assert_eq!(vtd_bits::PS, vtd::PS);
        assert_eq!(vtd_bits::SNP, vtd::SNP);
        assert_eq!(ADDRESS_MASK, vtd::ADDR_MASK);
    }

    #[test]
    fn page_size_by_level() {
        let e = |level| IommuEntry {
            domid: DomId(0),
            context: ContextId(1),
            bfn: Bfn(0),
            level,
            format: pviommu_abi::entry_format::VTD_SECOND_LEVEL,
            bits: 0,
        };
        assert_eq!(e(1).page_size(), 4096);
        assert_eq!(e(2).page_size(), 2 << 20);
    }
}
