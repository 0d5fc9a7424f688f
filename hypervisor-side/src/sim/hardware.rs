//! The simulated IOMMU hardware: an IOTLB and a page walk that reads the
//! tables from RAM and decodes them straight from the VT-d and LPAE specs.
//! Deliberately independent of [`crate::pgtable`]'s decoder, so an encoding
//! bug there shows up as a wrong DMA here.

use std::collections::BTreeMap;

use super::machine::{Format, Ram};
use crate::{ContextId, DomId, Mfn};

/// Why a DMA was blocked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultReason {
    /// No context (device not attached).
    NoContext,
    /// An entry on the walk is not present.
    NotPresent,
    /// Read access not set.
    ReadDenied,
    /// Write access not set.
    WriteDenied,
    /// Address beyond the IOMMU's input width.
    AddressWidth,
    /// An entry on the walk has a reserved bit set (VT-d: SNP on an IOMMU
    /// without Snoop Control).
    ReservedBit,
    /// The device's bus mastering is off (Xen turned it off after
    /// [`PT_FAULT_THRESHOLD`] faults): its DMA never reaches the IOMMU, and
    /// nothing is recorded.
    BusMasterOff,
}

/// Xen's `PT_FAULT_THRESHOLD` (xen/pci.h): the faults, each at most
/// [`FAULT_DECAY_NS`] after the one before, after which
/// `pci_check_disable_device()` turns a device's bus mastering off.
pub const PT_FAULT_THRESHOLD: u32 = 10;
/// A gap longer than this between two faults halves the device's count
/// (Xen: `MILLISECS(10)`).
pub const FAULT_DECAY_NS: u64 = 10_000_000;

/// A recorded IOMMU fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DmaFault {
    /// Device owner.
    pub owner: DomId,
    /// Context.
    pub context: ContextId,
    /// Faulting bus address.
    pub addr: u64,
    /// Write access.
    pub write: bool,
    /// Reason.
    pub reason: FaultReason,
}

/// Cached translations: (owner, ctx, bfn) -> (mfn, read, write), and a
/// paging-structure cache of leaf-table pointers, (owner, ctx, bfn >> 9) ->
/// the level-1 table a walk went through (VT-d's PDE cache, Arm's walk
/// cache). Both survive table changes until a flush: a table freed before
/// the flush that drops its pointer is still walked.
#[derive(Default)]
pub struct Iotlb {
    entries: BTreeMap<(DomId, ContextId, u64), (Mfn, bool, bool)>,
    leaf_tables: BTreeMap<(DomId, ContextId, u64), Mfn>,
    /// 2 MiB translations, one entry per superpage as VT-d caches them:
    /// (owner, ctx, bfn >> 9) -> (first frame, read, write). An
    /// invalidation drops one only when its range covers the whole
    /// superpage (VT-d: "When invalidating mappings for super-pages,
    /// software must specify the appropriate mask value", at least 9 for
    /// 2 MiB): a split flushed at the page alone leaves the device its
    /// old 2 MiB translation.
    superpages: BTreeMap<(DomId, ContextId, u64), (Mfn, bool, bool)>,
    /// 1 GiB translations, the same way: (owner, ctx, bfn >> 18) -> (first
    /// frame, read, write), dropped only by an invalidation that covers
    /// the whole 1 GiB (a split of one, Xen's own tables' on AMD-Vi or
    /// VT-d with 1 GiB pages, flushed over 2 MiB leaves it).
    gigapages: BTreeMap<(DomId, ContextId, u64), (Mfn, bool, bool)>,
}

impl Iotlb {
    /// Drop cached translations for bfns `first..=last`.
    pub fn invalidate(&mut self, owner: DomId, ctx: ContextId, first: u64, last: u64) {
        let keys: Vec<_> = self
            .entries
            .range((owner, ctx, first)..=(owner, ctx, last))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.entries.remove(&k);
        }
        let keys: Vec<_> = self
            .leaf_tables
            .range((owner, ctx, first >> 9)..=(owner, ctx, last >> 9))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.leaf_tables.remove(&k);
        }
        // 2 MiB and 1 GiB entries: only blocks the range covers whole (a
        // flush the caller widened to the block, or a domain-wide one).
        drop_covered_blocks(&mut self.superpages, owner, ctx, first, last, 9);
        drop_covered_blocks(&mut self.gigapages, owner, ctx, first, last, 18);
    }
    /// What one VT-d page-selective invalidation of `first..=last`
    /// reaches, as patch 0005's `intel_iommu_pviommu_ctx_flush` issues it:
    /// the naturally aligned block of 2^order pages holding the range
    /// (ADDR, AM = order); domain-wide past order 36.
    /// Returns the BFNs it reached, first and last.
    pub fn invalidate_psi(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        first: u64,
        last: u64,
    ) -> (u64, u64) {
        let mut order = 0;
        while order < 36 && (first >> order) != (last >> order) {
            order += 1;
        }
        if (first >> order) != (last >> order) {
            self.invalidate_context(owner, ctx);
            return (0, u64::MAX);
        }
        let start = first & !((1u64 << order) - 1);
        let end = start | ((1u64 << order) - 1);
        self.invalidate(owner, ctx, start, end);
        (start, end)
    }
    /// Drop everything cached for a context.
    pub fn invalidate_context(&mut self, owner: DomId, ctx: ContextId) {
        self.invalidate(owner, ctx, 0, u64::MAX);
    }
}

/// Drop the entries of `blocks` (keyed by (owner, ctx, bfn >> `shift`))
/// whose whole block of 2^`shift` pages lies in `first..=last`.
fn drop_covered_blocks(
    blocks: &mut BTreeMap<(DomId, ContextId, u64), (Mfn, bool, bool)>,
    owner: DomId,
    ctx: ContextId,
    first: u64,
    last: u64,
    shift: u32,
) {
    let mask = (1u64 << shift) - 1;
    let keys: Vec<_> = blocks
        .range((owner, ctx, first >> shift)..=(owner, ctx, last >> shift))
        .map(|(k, _)| *k)
        .filter(|k| k.2 << shift >= first && (k.2 << shift | mask) <= last)
        .collect();
    for k in keys {
        blocks.remove(&k);
    }
}

/// A translation: frame, read, write.
pub type Translation = (Mfn, bool, bool);

/// Why a walk found nothing usable.
enum WalkFault {
    NotPresent,
    ReservedBit,
}

/// Levels of every table tree the simulated IOMMU walks (the root's).
pub(super) const WALK_LEVELS: u32 = 4;

/// One entry at `level` as the IOMMU reads it: (present, a leaf, the
/// frame it names, read, write).
fn decode(format: Format, e: u64, level: u32) -> (bool, bool, u64, bool, bool) {
    match format {
        Format::Vtd => {
            let present = e & 0b11 != 0;
            let leaf = level == 1 || (level <= 3 && e & (1 << 7) != 0);
            (
                present,
                leaf,
                (e & 0x000F_FFFF_FFFF_F000) >> 12,
                e & 1 != 0,
                e & 2 != 0,
            )
        }
        Format::Lpae => {
            let valid = e & 1 != 0;
            let table_bit = e & 2 != 0;
            let present = valid && (level != 1 || table_bit);
            let leaf = if level == 1 { table_bit } else { !table_bit };
            (
                present,
                leaf,
                (e & 0x0000_FFFF_FFFF_F000) >> 12,
                e & (1 << 6) != 0,
                e & (1 << 7) != 0,
            )
        }
    }
}

/// The level-1 table linked at the 2 MiB of `bfn` in the tree at `root`,
/// where the device's walk would find it (memory, not the CPU's cache).
fn linked_leaf_table(ram: &Ram, format: Format, root: Mfn, bfn: u64) -> Option<Mfn> {
    let mut table = root;
    for level in (2..=WALK_LEVELS).rev() {
        let idx = ((bfn >> (9 * (level - 1))) & 0x1ff) as usize;
        let (present, leaf, addr, ..) = decode(format, ram.device_read_u64(table, idx * 8), level);
        if !present || leaf {
            return None;
        }
        table = Mfn(addr);
    }
    Some(table)
}

/// Walk from `root` (level 4), or from the level-1 table `leaf_table` when
/// the paging-structure cache holds it. Returns the translation, the
/// level-1 table it went through, if it reached one, and the level of the
/// leaf it ended at (2 for a superpage).
fn walk(
    ram: &Ram,
    format: Format,
    snoop_control: bool,
    root: Mfn,
    leaf_table: Option<Mfn>,
    bfn: u64,
) -> Result<(Translation, Option<Mfn>, u32), WalkFault> {
    let (mut table, top) = match leaf_table {
        Some(t) => (t, 1),
        None => (root, WALK_LEVELS),
    };
    for level in (1..=top).rev() {
        let idx = ((bfn >> (9 * (level - 1))) & 0x1ff) as usize;
        // Memory, not the CPU cache (Ram::device_read_u64).
        let e = ram.device_read_u64(table, idx * 8);
        let (present, leaf, addr, r, w) = decode(format, e, level);
        if !present {
            return Err(WalkFault::NotPresent);
        }
        if leaf {
            // VT-d: SNP (bit 11) is reserved unless the IOMMU has Snoop
            // Control (QEMU's intel-iommu faults on it the same way).
            if format == Format::Vtd && !snoop_control && e & (1 << 11) != 0 {
                return Err(WalkFault::ReservedBit);
            }
            let offset = bfn & ((1u64 << (9 * (level - 1))) - 1);
            let through = (level == 1).then_some(table);
            return Ok(((Mfn(addr + offset), r, w), through, level));
        }
        table = Mfn(addr);
    }
    Err(WalkFault::NotPresent)
}

/// What a lookup of one page found: a translation the IOTLB held, or one
/// walked (from the cached leaf table where the paging-structure cache
/// held one) with the level-1 table it went through and its level.
enum LookedUp {
    Cached(Translation),
    Walked(Translation, Option<Mfn>, u32),
}

/// The lookup of page `bfn` for the device of (`owner`, `ctx`), as the
/// IOMMU makes it, changing nothing: the IOTLB's page entry first, then
/// its 2 MiB and 1 GiB entries, then a walk.
#[allow(clippy::too_many_arguments)]
fn look_up(
    ram: &Ram,
    iotlb: &Iotlb,
    format: Format,
    snoop_control: bool,
    owner: DomId,
    ctx: ContextId,
    root: Option<Mfn>,
    bfn: u64,
) -> Result<LookedUp, FaultReason> {
    let sp = iotlb
        .superpages
        .get(&(owner, ctx, bfn >> 9))
        .map(|&(m, r, w)| (Mfn(m.0 + (bfn & 0x1ff)), r, w));
    let gp = iotlb
        .gigapages
        .get(&(owner, ctx, bfn >> 18))
        .map(|&(m, r, w)| (Mfn(m.0 + (bfn & 0x3ffff)), r, w));
    if let Some(t) = iotlb.entries.get(&(owner, ctx, bfn)).copied().or(sp).or(gp) {
        return Ok(LookedUp::Cached(t));
    }
    let root = root.ok_or(FaultReason::NoContext)?;
    let cached = iotlb.leaf_tables.get(&(owner, ctx, bfn >> 9)).copied();
    let (t, through, level) =
        walk(ram, format, snoop_control, root, cached, bfn).map_err(|f| match f {
            WalkFault::NotPresent => FaultReason::NotPresent,
            WalkFault::ReservedBit => FaultReason::ReservedBit,
        })?;
    Ok(LookedUp::Walked(t, through, level))
}

/// Translate bus address `addr` for the device of (`owner`, `ctx`).
#[allow(clippy::too_many_arguments)]
pub fn translate(
    ram: &Ram,
    iotlb: &mut Iotlb,
    format: Format,
    snoop_control: bool,
    owner: DomId,
    ctx: ContextId,
    root: Option<Mfn>,
    addr: u64,
    write: bool,
) -> Result<Mfn, DmaFault> {
    let fault = |reason| DmaFault {
        owner,
        context: ctx,
        addr,
        write,
        reason,
    };
    let bfn = addr >> 12;
    if bfn >> 36 != 0 {
        return Err(fault(FaultReason::AddressWidth));
    }
    let looked_up = look_up(ram, iotlb, format, snoop_control, owner, ctx, root, bfn);
    let (mfn, r, w) = match looked_up.map_err(fault)? {
        LookedUp::Cached(t) => t,
        LookedUp::Walked(t, through, level) => {
            if level == 2 {
                iotlb.superpages.insert(
                    (owner, ctx, bfn >> 9),
                    (Mfn(t.0 .0 - (bfn & 0x1ff)), t.1, t.2),
                );
            } else if level == 3 {
                iotlb.gigapages.insert(
                    (owner, ctx, bfn >> 18),
                    (Mfn(t.0 .0 - (bfn & 0x3ffff)), t.1, t.2),
                );
            } else {
                iotlb.entries.insert((owner, ctx, bfn), t);
            }
            if let Some(leaf) = through {
                iotlb.leaf_tables.insert((owner, ctx, bfn >> 9), leaf);
            }
            t
        }
    };
    match (write, r, w) {
        (false, false, _) => Err(fault(FaultReason::ReadDenied)),
        (true, _, false) => Err(fault(FaultReason::WriteDenied)),
        _ => Ok(mfn),
    }
}

/// The pages whose lookup through the IOTLB and the paging-structure cache
/// as they are now reaches something the tables (`tables_leaf`: the leaf's
/// level and the translation there, as the CPU sees them) do not give: a
/// frame they do not map there, or an access they no longer allow. Only
/// pages something cached can change are looked up, and a cached block
/// the tables still map the same way is passed whole. `root_of`: each
/// context's root.
pub fn stale_pages(
    ram: &Ram,
    iotlb: &Iotlb,
    format: Format,
    snoop_control: bool,
    root_of: impl Fn(DomId, ContextId) -> Option<Mfn>,
    tables_leaf: impl Fn(DomId, ContextId, u64) -> Option<(u32, Translation)>,
) -> Vec<(DomId, ContextId, u64, Translation)> {
    let grants = |tables: Option<Translation>, got: Translation| {
        tables.is_some_and(|(m, r, w)| m == got.0 && (r || !got.1) && (w || !got.2))
    };
    let mut stale = Vec::new();
    let mut check = |owner, ctx, first: u64, pages: u64| {
        let root = root_of(owner, ctx);
        for bfn in first..first + pages {
            // (Where the device's lookup would fault, it reaches nothing.)
            let looked_up = look_up(ram, iotlb, format, snoop_control, owner, ctx, root, bfn);
            if let Ok(LookedUp::Cached(got) | LookedUp::Walked(got, ..)) = looked_up {
                if !grants(tables_leaf(owner, ctx, bfn).map(|l| l.1), got) {
                    stale.push((owner, ctx, bfn, got));
                }
            }
        }
    };
    // A block cached whole, which the tables still map whole (level) at
    // least as the cache does: every page of it the lookup reaches through
    // that entry agrees (pages with entries of their own are checked as
    // such).
    let same_block = |owner, ctx, first: u64, level: u32, cached: Translation| {
        tables_leaf(owner, ctx, first).is_some_and(|(l, t)| l == level && grants(Some(t), cached))
    };
    for &(owner, ctx, bfn) in iotlb.entries.keys() {
        check(owner, ctx, bfn, 1);
    }
    for (&(owner, ctx, k), &t) in &iotlb.superpages {
        if !same_block(owner, ctx, k << 9, 2, t) {
            check(owner, ctx, k << 9, 1 << 9);
        }
    }
    for (&(owner, ctx, k), &(m, r, w)) in &iotlb.gigapages {
        if same_block(owner, ctx, k << 18, 3, (m, r, w)) {
            continue;
        }
        // By 2 MiB: one a cached superpage shadows is that entry's; one
        // the tables map whole, as this entry does there, agrees.
        for sub in 0..1u64 << 9 {
            let first = k << 18 | sub << 9;
            let here = (Mfn(m.0 + (sub << 9)), r, w);
            if !iotlb.superpages.contains_key(&(owner, ctx, first >> 9))
                && !same_block(owner, ctx, first, 2, here)
            {
                check(owner, ctx, first, 1 << 9);
            }
        }
    }
    // A cached leaf-table pointer to the table still linked there walks as
    // a fresh walk does; one to any other table, page by page.
    for (&(owner, ctx, region), &table) in &iotlb.leaf_tables {
        let linked =
            root_of(owner, ctx).and_then(|root| linked_leaf_table(ram, format, root, region << 9));
        if linked != Some(table) {
            check(owner, ctx, region << 9, 1 << 9);
        }
    }
    stale
}
