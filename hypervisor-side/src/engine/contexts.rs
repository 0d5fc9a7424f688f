//! IOMMU contexts other than the default one: page tables the engine writes
//! itself (with [`crate::pgtable`]) into frames the backend gives it, and the
//! caller's PCI devices pointed at them.
//!
//! The default context (0) is the host's: Xen's own tables of the driver
//! domain, written through `iommu_map`. A context the caller creates is the
//! engine's: an [`IoPageTable`] in the backend's [`TableMemory`], tagged with
//! an IOMMU domain id ([`HwContext`]) and flushed by that tag. A device
//! walks it only once attached ([`Engine::context_attach`]); maps into it
//! take the same checks, references, quota and revocation as the default
//! context, since both go through the one slot table of the driver domain.
//!
//! # Locks
//! Attach, detach, destroy and a driver domain's teardown take the
//! backend's devices lock (Xen's `pcidevs_lock`) *before* the driver cell's
//! lock, because Xen calls [`Engine::device_leaving`] with `pcidevs_lock`
//! held: the order is `devices lock -> driver lock` everywhere, and nothing
//! under a driver lock takes the devices lock.

use core::sync::atomic::Ordering;

use lock_api::RawMutex;

use super::{Driver, Engine, EngineBug, Hypervisor};
use crate::iommu::{FlushGather, HwContext, IommuBackend, OwnTables, TableFormat};
use crate::nospec::get_nospec;
use crate::permission::{may_attach, PolicyRefusals};
use crate::pgtable::lpae::Lpae;
use crate::pgtable::vtd::{Vtd, VtdNoSnoop};
use crate::pgtable::{IoPageTable, PageTableFormat, TableMemory, TableOptions};
use crate::platform::XsmAction;
use crate::storage::try_push;
use crate::{Bfn, ContextId, DomId, Errno, MemAttr, Mfn, Permissions, Sbdf};

/// Devices one context may have attached.
pub const MAX_DEVICES_PER_CONTEXT: usize = 8;

/// The tables of one of the engine's contexts, in the backend's format.
pub(crate) enum ContextTables {
    /// VT-d with snoop control.
    Vtd(IoPageTable<Vtd>),
    /// VT-d without snoop control.
    VtdNoSnoop(IoPageTable<VtdNoSnoop>),
    /// Arm LPAE stage 2.
    Lpae(IoPageTable<Lpae>),
}

macro_rules! each_format {
    ($tables:expr, $t:ident => $body:expr) => {
        match $tables {
            ContextTables::Vtd($t) => $body,
            ContextTables::VtdNoSnoop($t) => $body,
            ContextTables::Lpae($t) => $body,
        }
    };
}

impl ContextTables {
    fn new(mem: &mut impl TableMemory, own: OwnTables) -> Result<Self, Errno> {
        let options = TableOptions::engine_context(own.levels);
        Ok(match own.format {
            TableFormat::Vtd {
                snoop_control: true,
            } => ContextTables::Vtd(IoPageTable::with_options(mem, options)?),
            TableFormat::Vtd {
                snoop_control: false,
            } => ContextTables::VtdNoSnoop(IoPageTable::with_options(mem, options)?),
            // No superpages on an SMMU: changing a live table entry into a
            // block and back needs break-before-make there, unless the SMMU
            // has BBML 2 (SMMU_IDR3), which nothing reports yet; without it
            // a device may take TLB-conflict aborts on pages that stay
            // mapped (Linux's io-pgtable-arm stopped splitting blocks on
            // unmap for the same reason).
            TableFormat::Lpae => ContextTables::Lpae(IoPageTable::with_options(
                mem,
                TableOptions {
                    superpages: false,
                    ..options
                },
            )?),
        })
    }
    pub(crate) fn root(&self) -> Mfn {
        each_format!(self, t => t.root())
    }
    // (Always inlined into `iommu_map`, a page map's one call here: since
    // `map_superpage` joined it the compiler no longer does so itself, and
    // a page map cost 22 instructions more.)
    #[inline(always)]
    fn map(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        each_format!(self, t => t.map(mem, bfn, mfn, perms, attr))
    }
    fn unmap(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        each_format!(self, t => t.unmap(mem, bfn))
    }
    fn unmap_in_cached_leaf(&mut self, mem: &mut impl TableMemory, first: Bfn, count: u64) -> u64 {
        each_format!(self, t => t.unmap_in_cached_leaf(mem, first, count))
    }
    fn superpage_count(&self) -> usize {
        each_format!(self, t => t.superpage_count())
    }
    fn map_superpage(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<bool, Errno> {
        each_format!(self, t => t.map_superpage(mem, bfn, mfn, perms, attr))
    }
    fn unmap_superpage(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        each_format!(self, t => t.unmap_superpage(mem, bfn))
    }
    fn flush_came(&mut self, mem: &mut impl TableMemory) {
        each_format!(self, t => t.flush_came(mem))
    }
    fn free_flushed(&mut self, mem: &mut impl TableMemory, budget: &mut usize) -> bool {
        each_format!(self, t => t.free_flushed(mem, budget))
    }
    fn has_flushed(&self) -> bool {
        each_format!(self, t => t.has_flushed())
    }
    fn destroy(self, mem: &mut impl TableMemory) {
        each_format!(self, t => t.destroy(mem))
    }
    /// The leaf entry of `bfn` with its address field zeroed, its level and
    /// its [`entry_format`](pviommu_abi::entry_format).
    fn leaf_bits(&self, mem: &impl TableMemory, bfn: Bfn) -> Option<LeafBits> {
        fn shown<F: PageTableFormat>(
            t: &IoPageTable<F>,
            mem: &impl TableMemory,
            bfn: Bfn,
        ) -> Option<LeafBits> {
            t.leaf(mem, bfn).map(|(level, raw)| LeafBits {
                level,
                format: F::ENTRY_FORMAT,
                bits: raw & !F::ADDRESS_MASK,
            })
        }
        each_format!(self, t => shown(t, mem, bfn))
    }
    /// What the tables say about `bfn` (software walk).
    pub(crate) fn translate(
        &self,
        mem: &impl TableMemory,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        each_format!(self, t => t.translate(mem, bfn))
    }
}

/// A leaf entry as `PVIOMMU_CMD_entry` shows it: no machine address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafBits {
    /// Level of the leaf (1: 4 KiB, 2: 2 MiB).
    pub level: u32,
    /// An [`entry_format`](pviommu_abi::entry_format) code.
    pub format: u16,
    /// The entry with its address field zeroed.
    pub bits: u64,
}

/// One of the engine's contexts of a driver domain.
pub(crate) struct OwnContext {
    pub(crate) id: ContextId,
    pub(crate) tables: ContextTables,
    pub(crate) hw: HwContext,
    /// Attached devices.
    pub(crate) devices: [Option<Sbdf>; MAX_DEVICES_PER_CONTEXT],
}

impl core::fmt::Debug for OwnContext {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OwnContext")
            .field("id", &self.id)
            .field("root", &self.tables.root())
            .field("hw", &self.hw)
            .field("devices", &self.devices)
            .finish()
    }
}

impl OwnContext {
    fn attached(&self) -> impl Iterator<Item = Sbdf> + '_ {
        self.devices.iter().flatten().copied()
    }
}

/// Unmap `bfn` from `own`'s tables, its page already in `gather`. While
/// the tables hold a superpage (an extent mapped whole, or a fold), the
/// unmap may split it, so the gather takes the whole 2 MiB around the page
/// first: an IOTLB caches a superpage as one entry, which VT-d drops only
/// for a page-selective invalidation whose address mask covers it ("When
/// invalidating mappings for super-pages, software must specify the
/// appropriate mask value": 9 or more for 2 MiB). Flushed at the page
/// alone, the device kept the superpage's whole translation, the page
/// released after the flush among it. (A fold needs no more than its page:
/// it translates as before, and the invalidation there drops the cached
/// pointer to the folded table, kept whole until the flush.) The one way a
/// page leaves an engine context's tables on its own (a superpage cleared
/// whole is gathered whole by its caller).
#[inline(always)]
fn unmap_own_page(
    own: &mut OwnContext,
    gather: &mut FlushGather,
    h: &mut impl IommuBackend,
    ctx: ContextId,
    bfn: Bfn,
) -> Result<(), Errno> {
    if own.tables.superpage_count() != 0 {
        // (Never refused: the context's range is in the gather already.)
        const BLOCK: u64 = pviommu_abi::EXTENT_PAGES - 1;
        gather.add_range(ctx, Bfn(bfn.0 & !BLOCK), Bfn(bfn.0 | BLOCK), 0)?;
    }
    own.tables.unmap(h, bfn)
}

/// The engine's contexts of one driver domain, and the way every IOMMU
/// change of the driver domain goes: the default context to the backend,
/// the others to the engine's tables.
impl super::DriverDomain {
    fn own(&self, ctx: ContextId) -> Option<&OwnContext> {
        self.own.iter().find(|c| c.id == ctx)
    }
    fn own_mut(&mut self, ctx: ContextId) -> Option<&mut OwnContext> {
        self.own.iter_mut().find(|c| c.id == ctx)
    }
    /// The context `device` is attached to, if any.
    pub fn device_context(&self, device: Sbdf) -> Option<ContextId> {
        self.own
            .iter()
            .find(|c| c.attached().any(|d| d == device))
            .map(|c| c.id)
    }
    /// Devices attached to `ctx`.
    pub fn attached_devices(&self, ctx: ContextId) -> impl Iterator<Item = Sbdf> + '_ {
        self.own(ctx).into_iter().flat_map(OwnContext::attached)
    }
    /// The 4-level root of one of the engine's contexts (for tools that walk
    /// the raw tables).
    pub fn context_root(&self, ctx: ContextId) -> Option<Mfn> {
        self.own(ctx).map(|c| c.tables.root())
    }
    /// What the engine's tables of `ctx` say about `bfn`.
    pub fn context_translate(
        &self,
        mem: &impl TableMemory,
        ctx: ContextId,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        self.own(ctx)?.tables.translate(mem, bfn)
    }

    /// Map `bfn` -> `mfn` in `ctx`; the change goes into the gather.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn iommu_map(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        self.iommu_map_inlined(h, ctx, bfn, mfn, perms, attr)
    }

    /// [`iommu_map`](Self::iommu_map), always inlined: the page map's
    /// install (`Engine::map_install`) writes its entry through this, where
    /// the call cost each map into an engine context about 20 instructions
    /// (its arguments, frame and registers). The other callers (an
    /// extent's pages one by one, a refused run's retry) keep the call.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn iommu_map_inlined(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        if ctx == ContextId::DEFAULT {
            return h.iommu_map(self.domid, ctx, bfn, mfn, perms, attr, &mut self.gather);
        }
        let own = self
            .own
            .iter_mut()
            .find(|c| c.id == ctx)
            .ok_or(Errno::NoEnt)?;
        // A not-present -> present change needs a flush where the IOMMU
        // caches non-present entries (VT-d caching mode); always flushed.
        // Gathered before the entry is written: were it after, a gather
        // refusing the range would leave an entry its caller counts as
        // never made, and releases the page of (a flush of an entry that
        // was not written after all is harmless).
        self.gather.add(ctx, bfn, 0)?;
        own.tables.map(h, bfn, mfn, perms, attr)
    }

    /// Unmap `bfn` of `ctx`; the change goes into the gather.
    pub(crate) fn iommu_unmap(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        if ctx == ContextId::DEFAULT {
            return h.iommu_unmap(self.domid, ctx, bfn, &mut self.gather);
        }
        let own = self
            .own
            .iter_mut()
            .find(|c| c.id == ctx)
            .ok_or(Errno::NoEnt)?;
        // Gathered first, as a map is: the entry never goes unflushed.
        self.gather.add(ctx, bfn, 0)?;
        unmap_own_page(own, &mut self.gather, h, ctx, bfn)
    }

    /// Map the 2 MiB extent of BFNs from `bfn` to the frames from `mfn` in
    /// `ctx`, one of the engine's own contexts, with one superpage entry
    /// where its tables can ([`IoPageTable::map_superpage`]: frames on a
    /// 2 MiB boundary, superpages split without memory), into the gather.
    /// `Ok(false)`: nothing written, map the pages one by one.
    pub(crate) fn iommu_map_extent(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<bool, Errno> {
        let Some(own) = self.own.iter_mut().find(|c| c.id == ctx) else {
            return Ok(false);
        };
        let last = crate::iommu::run_last(bfn, pviommu_abi::EXTENT_PAGES).ok_or(Errno::Inval)?;
        // Gathered first, as a page's entry is.
        self.gather.add_range(ctx, bfn, last, 0)?;
        own.tables.map_superpage(h, bfn, mfn, perms, attr)
    }

    /// Map the `count` BFNs from `bfn` to the frames from `mfn` in the
    /// default context (entries maps left for the flush to write), into
    /// the gather: one call to the backend. On `Err` none of the run is
    /// mapped.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn iommu_map_run(
        &mut self,
        h: &mut impl IommuBackend,
        bfn: Bfn,
        mfn: Mfn,
        count: u64,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        h.iommu_map_run(
            self.domid,
            ContextId::DEFAULT,
            bfn,
            mfn,
            count,
            perms,
            attr,
            &mut self.gather,
        )
    }

    /// Unmap the `count` BFNs from `bfn` of `ctx` (entries an owner's
    /// unmaps left for the flush to clear), into the gather: the default
    /// context in one call to the backend, which clears an aligned 2 MiB
    /// with one entry; an engine context a page at a time, but for each
    /// aligned 2 MiB of the run that one superpage entry maps (an extent
    /// mapped whole, or a fold), cleared whole, never split. A page with no
    /// entry (its context gone meanwhile) is no error. On `Err` any page
    /// of the run may still be mapped.
    pub(crate) fn iommu_unmap_run(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
        count: u64,
    ) -> Result<(), Errno> {
        if ctx == ContextId::DEFAULT {
            return h.iommu_unmap_run(self.domid, ctx, bfn, count, &mut self.gather);
        }
        let last = crate::iommu::run_last(bfn, count).ok_or(Errno::Inval)?;
        // (The deferred runs never pass it: as for the host's own run.)
        if count > crate::iommu::MAX_IOMMU_RUN {
            return Err(Errno::Inval);
        }
        let Some(own) = self.own.iter_mut().find(|c| c.id == ctx) else {
            return Ok(());
        };
        // Gathered first, as a map is: the entries never go unflushed.
        self.gather.add_range(ctx, bfn, last, 0)?;
        // A 2 MiB block at a time: whole if the run covers it and one
        // superpage entry maps it, else its pages in the run one by one.
        // (Bounded: `count` pages.)
        let mut page = bfn.0;
        loop {
            let block_last = page | (pviommu_abi::EXTENT_PAGES - 1);
            let whole = pviommu_abi::extent_aligned(page) && block_last <= last.0;
            let cleared = match whole.then(|| own.tables.unmap_superpage(h, Bfn(page))) {
                Some(Ok(())) => true,
                // No superpage there: a leaf table, or nothing.
                Some(Err(Errno::NoEnt)) | None => false,
                Some(Err(e)) => return Err(e),
            };
            if !cleared {
                // What the cached leaf table holds at once, the rest (the
                // table's last entry, or a run the cache misses) one by one.
                let end = block_last.min(last.0);
                let done = own
                    .tables
                    .unmap_in_cached_leaf(h, Bfn(page), end - page + 1);
                for p in page.saturating_add(done)..=end {
                    match unmap_own_page(own, &mut self.gather, h, ctx, Bfn(p)) {
                        Ok(()) | Err(Errno::NoEnt) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            match block_last.checked_add(1) {
                Some(next) if next <= last.0 => page = next,
                _ => break,
            }
        }
        Ok(())
    }

    /// Flush everything gathered: the default context through the backend,
    /// each of the engine's contexts by its tag, after which the tables
    /// its unmaps emptied may go (a budget at a time:
    /// [`free_flushed_tables`](Self::free_flushed_tables)). On `Err` the
    /// gather is kept (flushing twice is harmless) and no page may be
    /// released.
    pub(crate) fn iommu_flush(&mut self, h: &mut impl IommuBackend) -> Result<(), Errno> {
        let mut result = Ok(());
        let mut default = FlushGather::default();
        for r in self.gather.ranges() {
            if r.context == ContextId::DEFAULT {
                // The whole 1 GiB blocks around the range: the host may
                // have split a superpage of its own tables to unmap a page
                // (Xen's VT-d and AMD-Vi code fold a full table into a 2
                // MiB entry, and on to 1 GiB where the IOMMU has those:
                // AMD-Vi always, VT-d with SPS 1 GiB), and says nothing of
                // it; its flush invalidates what it is asked to, and an
                // IOTLB drops a superpage's entry only for an invalidation
                // covering all of it (VT-d: an address mask of 18 for 1
                // GiB). One page-selective invalidation of 1 GiB where
                // there was one of a page (or the domain's, where a unit
                // takes no mask that wide).
                const BLOCK: u64 = (1 << 18) - 1;
                default.add(r.context, Bfn(r.first.0 & !BLOCK), r.flags)?;
                default.add(r.context, Bfn(r.last.0 | BLOCK), r.flags)?;
            } else if let Some(own) = self.own.iter().find(|c| c.id == r.context) {
                if let Err(e) = h.hw_flush(own.hw, r.first, r.last) {
                    result = Err(e);
                }
            } else {
                // A range of a context this cell no longer has cannot be
                // flushed: fail closed, so no page of it is released
                // (unreachable: `drop_context` flushes the whole context
                // and forgets its range before the context goes).
                result = Err(Errno::Busy);
            }
        }
        if !default.is_empty() {
            h.iommu_flush(self.domid, &default)?;
        }
        result?;
        for own in self.own.iter_mut() {
            own.tables.flush_came(h);
        }
        Ok(())
    }

    /// Free up to `budget` of the tables whose flush came, over this cell's
    /// contexts (each counted off it). Whether any is left.
    pub(crate) fn free_flushed_tables(
        &mut self,
        h: &mut impl IommuBackend,
        budget: &mut usize,
    ) -> bool {
        let mut left = false;
        for own in self.own.iter_mut() {
            left |= own.tables.free_flushed(h, budget);
        }
        left
    }

    /// Whether tables whose flush came wait to be freed
    /// ([`free_flushed_tables`](Self::free_flushed_tables)).
    pub(crate) fn has_flushed_tables(&self) -> bool {
        self.own.iter().any(|c| c.tables.has_flushed())
    }
}

/// Faults at revoked BFNs ([`Engine::fault_expected`]) a driver domain's
/// devices may have left uncounted at once: a burst of a device streaming
/// into a revoked buffer, thousands of faults before its owner can stop it
/// (at the few µs Xen takes a fault, about 80 ms of them).
pub const REVOKED_FAULT_BURST: u64 = 16_384;

/// How many more a second, up to [`REVOKED_FAULT_BURST`]: one a
/// millisecond. Past it every fault counts, so a device that keeps faulting
/// at revoked BFNs is turned off as any device that storms is, whatever
/// its owner revokes, creates or moves meanwhile.
pub const REVOKED_FAULTS_PER_SECOND: u64 = 1_000;

/// A token bucket of the faults at revoked BFNs Xen may leave uncounted,
/// one per domid (`Engine::fault_buckets`), packed into a word: the
/// tokens in the low 16 bits, the millisecond of the last refill (the
/// host's clock) above. Per domain, not per cell, so that no context the
/// domain creates, and no cell that goes idle and is claimed again,
/// brings a full one (a review of the fix: a bucket per cell let a device
/// model storm on while it rebuilt contexts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultBucket {
    tokens: u64,
    at_ms: u64,
}

impl FaultBucket {
    pub(crate) const FULL: FaultBucket = FaultBucket {
        tokens: REVOKED_FAULT_BURST,
        at_ms: 0,
    };
    const TOKEN_BITS: u32 = 16;

    pub(crate) fn bits(self) -> u64 {
        (self.at_ms << Self::TOKEN_BITS) | self.tokens
    }
    pub(crate) fn from_bits(bits: u64) -> FaultBucket {
        FaultBucket {
            tokens: bits & ((1 << Self::TOKEN_BITS) - 1),
            at_ms: bits >> Self::TOKEN_BITS,
        }
    }

    /// Take one at `now_ns`, if any is left once refilled (a token a
    /// millisecond) for the time since the last refill. A clock that went
    /// back refills nothing and moves nothing back.
    pub(crate) fn take(&mut self, now_ns: u64) -> bool {
        // (48 bits of milliseconds: 8900 years of uptime.)
        let now_ms = (now_ns / 1_000_000) & ((1 << (64 - Self::TOKEN_BITS)) - 1);
        if now_ms > self.at_ms {
            let refill = now_ms - self.at_ms;
            self.tokens = self.tokens.saturating_add(refill).min(REVOKED_FAULT_BURST);
            self.at_ms = now_ms;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

// The tokens fit their bits; the refill is a token a millisecond.
const _: () = assert!(REVOKED_FAULT_BURST < 1 << FaultBucket::TOKEN_BITS);
const _: () = assert!(REVOKED_FAULTS_PER_SECOND == 1_000);

#[cfg(test)]
mod fault_bucket_tests {
    use super::{FaultBucket, REVOKED_FAULT_BURST};

    #[test]
    fn a_bucket_gives_its_burst_then_a_token_a_millisecond() {
        let mut b = FaultBucket::FULL;
        let t = 5_000_000_000;
        assert!((0..REVOKED_FAULT_BURST).all(|_| b.take(t)));
        assert!(!b.take(t), "empty");
        assert!(!b.take(t + 999_999), "less than a millisecond");
        assert!(b.take(t + 1_000_000), "a millisecond: one");
        assert!(!b.take(t + 1_000_000));
        // Half a millisecond twice is one token, not none.
        assert!(!b.take(t + 1_500_000));
        assert!(b.take(t + 2_000_000));
        // A clock that goes back gives nothing and moves nothing back.
        assert!(!b.take(t));
        assert!(!b.take(t + 2_500_000));
        assert!(b.take(t + 3_000_000));
        // Packed and back.
        assert_eq!(FaultBucket::from_bits(b.bits()), b);
        // Ages later: full, no more.
        assert!((0..REVOKED_FAULT_BURST).all(|_| b.take(u64::MAX)));
        assert!(!b.take(u64::MAX));
    }
}

/// What [`Engine::teardown_contexts`] left, if anything.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ContextsLeft {
    /// Nothing: every context is gone, its cell given back.
    None,
    /// A context whose device could not be moved off its tables (kept).
    DeviceOn,
    /// A context's cell that still held a page (an engine bug, counted:
    /// kept, for the teardown's walk to take the page down).
    HoldingPages,
    /// A context whose emptied tables wait to be freed: the caller frees
    /// a budget of them (the devices lock dropped), and the next slice
    /// goes on.
    TablesLeft(ContextId),
}

impl<L: RawMutex> Engine<L> {
    /// Create a context for `caller`: tables of the engine's, tagged by
    /// the backend, in a cell of its own.
    ///
    /// Under the devices lock (which orders every context's creation,
    /// destruction and device changes), one cell lock at a time: the id is
    /// taken in the home cell's list first (so the home cell, no longer
    /// idle, stays), then a free cell is claimed and set up, and published
    /// last; a failure takes the id back.
    pub fn context_create(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
    ) -> Result<ContextId, Errno> {
        let id = self.context_create_unreported(h, caller)?;
        self.context_reported(caller, id);
        Ok(id)
    }

    /// [`context_create`](Self::context_create) for a hypercall, which
    /// must write the new id into the caller's op before anyone may use
    /// it: the context exists, but no op of the caller's finds it (maps,
    /// attaches, destroys answer `ENOENT`) until
    /// [`context_reported`](Self::context_reported). So if the id cannot
    /// be written, [`context_create_undo`](Self::context_create_undo)
    /// always succeeds: no other vCPU of the caller's, guessing the id,
    /// can have mapped into it or attached a device meanwhile (which made
    /// the undo's destroy `EBUSY`, and the op counted as done with its
    /// status never written: review).
    pub fn context_create_unreported(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
    ) -> Result<ContextId, Errno> {
        let caps = h.iommu_caps();
        let max = self.max_contexts_for(caps.max_contexts, caller);
        let Some(own_tables) = caps.own_tables.filter(|_| max > 1) else {
            return Err(Errno::OpNotSupp);
        };
        // Full already? Answered before the devices lock (checked again
        // under it).
        let full = self
            .lock_driver(caller)
            .is_some_and(|d| (1..max).all(|c| d.dd.has_context(ContextId(c))));
        if full {
            return Err(Errno::NoSpc);
        }
        // The tag is allocated under the devices lock, which comes first.
        h.devices_lock();
        let r = self.context_create_locked(h, caller, own_tables, max);
        h.devices_unlock();
        r
    }

    fn context_create_locked(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        own_tables: OwnTables,
        max: u32,
    ) -> Result<ContextId, Errno> {
        let mut home = self.lock_or_claim(caller)?;
        let Some(id) = (1..max).map(ContextId).find(|c| !home.dd.has_context(*c)) else {
            self.put_driver(home);
            return Err(Errno::NoSpc);
        };
        home.dd.contexts |= 1 << id.0;
        let home_cell = home.cell;
        self.put_driver(home);
        let r = self.claim_context_cell(h, caller, home_cell, id, own_tables);
        if r.is_err() {
            // Take the id back (the devices lock kept anyone else off it).
            self.forget_context(caller, id);
        }
        r.map(|()| id)
    }

    /// Claim a free cell for context `id` of `caller` (home cell
    /// `home_cell`), give it the context's tables and tag, and publish it.
    /// Holds no other cell's lock.
    fn claim_context_cell(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        home_cell: usize,
        id: ContextId,
        own_tables: OwnTables,
    ) -> Result<(), Errno> {
        let (first, last) = if caller == DomId::DOM0 {
            (1, super::DOM0_CELLS)
        } else {
            (super::DOM0_CELLS, super::MAX_DRIVER_DOMAINS)
        };
        let entry = self
            .ctx_cells
            .get(home_cell)
            .and_then(|e| get_nospec(e, id.0 as usize))
            .ok_or(Errno::Inval)?;
        if caller != DomId::DOM0 {
            // The last free cells of the shared pool are kept for homes.
            let free = (first..last)
                .filter_map(|c| self.owners.get(c))
                .filter(|o| o.load(Ordering::SeqCst) == super::FREE_CELL)
                .count();
            if free <= super::HOME_RESERVE {
                return Err(Errno::NoSpc);
            }
        }
        let Some(Driver { cell, mut dd }) = self.take_free_cell(first..last, caller) else {
            return Err(Errno::NoSpc);
        };
        // A free cell's state is idle: no slots, no context.
        dd.domid = caller;
        dd.context = id;
        dd.home = home_cell as u8;
        // Not the caller's to use until its id is reported
        // (`context_reported`).
        dd.contexts = 0;
        dd.stats = super::DriverStats::default();
        let mut d = Driver { cell, dd };
        let r = Self::set_up_context(&mut d, h, id, own_tables);
        match r {
            Ok(()) => entry.store(cell as u8, Ordering::SeqCst),
            Err(_) => self.release_context_cell(d),
        }
        r
    }

    /// Give the new context's cell `d` its tables and tag.
    fn set_up_context(
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        id: ContextId,
        own_tables: OwnTables,
    ) -> Result<(), Errno> {
        d.dd.own.try_reserve(1).map_err(|_| Errno::NoMem)?;
        let tables = ContextTables::new(h, own_tables)?;
        let hw = match h.hw_context_create(d.dd.domid, id, tables.root()) {
            Ok(hw) => hw,
            Err(e) => {
                // No device ever pointed at them: free at once.
                tables.destroy(h);
                return Err(e);
            }
        };
        // Cannot fail: reserved above.
        let _ = try_push(
            &mut d.dd.own,
            OwnContext {
                id,
                tables,
                hw,
                devices: [None; MAX_DEVICES_PER_CONTEXT],
            },
        );
        Ok(())
    }

    /// Take context `id` off `domid`'s list of contexts, in its home cell
    /// (the devices lock held, no cell: its cell is already given back, or
    /// was never published).
    fn forget_context(&self, domid: DomId, id: ContextId) {
        if let Some(mut home) = self.lock_driver(domid) {
            home.dd.contexts &= !(1 << id.0);
            self.put_driver(home);
        }
    }

    /// Give a context's cell back, its state reset to idle (nothing in it:
    /// no BFN in any state, no tables). Its install generations keep
    /// counting, as a home cell's do.
    fn release_context_cell(&self, d: Driver<'_, L>) {
        let Driver { cell, mut dd } = d;
        let (home, context) = (dd.home as usize, dd.context);
        if let Some(entry) = self
            .ctx_cells
            .get(home)
            .and_then(|e| get_nospec(e, context.0 as usize))
        {
            let _ = entry.compare_exchange(
                cell as u8,
                super::NO_CELL,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        dd.reset_to_idle();
        self.publish_bugs(&mut dd);
        // Whatever it still counted comes off its driver domain's count.
        self.publish_used(cell, &mut dd, true);
        if let Some(o) = self.owners.get(cell) {
            o.store(super::FREE_CELL, Ordering::SeqCst);
        }
        drop(dd);
    }

    /// Destroy an empty context (no BFN in any state, no device attached),
    /// for a caller of the engine's own: [`context_destroy_some`](Self::context_destroy_some)
    /// until it is done (each round frees tables).
    pub fn context_destroy(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        loop {
            match self.context_destroy_some(h, caller, context) {
                // (Each round frees a budget of tables, or fails: the
                // pile goes.)
                Err(Errno::Again) => {}
                r => return r,
            }
        }
    }

    /// Free up to [`TABLE_FREES_PER_CALL`](super::revoke::TABLE_FREES_PER_CALL)
    /// of the tables `context`'s flushes emptied, under its cell's lock
    /// alone (not under the devices lock, Xen's `pcidevs_lock`: a review
    /// of 2026-12-06). Whether any is left.
    pub(crate) fn free_tables_of(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> bool {
        let Some(mut d) = self.lock_cell(caller, context) else {
            return false;
        };
        // A whole release's budget: `TABLE_FREES_PER_CALL` of them.
        let mut budget = super::revoke::RELEASE_BUDGET;
        let (_, left) = Self::free_tables(&mut d.dd, h, &mut budget);
        self.put_driver(d);
        left
    }

    /// Destroy an empty context, as much of it as one call may do:
    /// `Err(Again)` when tables its unmaps emptied were still to be freed
    /// (left by failed flushes): up to [`TABLE_FREES_PER_CALL`](super::revoke::TABLE_FREES_PER_CALL)
    /// of them went, under the context's cell lock alone, and its devices
    /// are detached. A hypercall continues with the same op.
    pub fn context_destroy_some(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        let nothing_first = |_: &mut _| Ok(());
        let r = self.devices_then_cell(h, caller, context, nothing_first, |d, h| {
            Self::destroy_check_locked(&d.dd, context)?;
            Self::drop_context(d, h, context)?;
            Ok(true)
        });
        match r {
            // A budget of them goes now, the devices lock dropped; once the
            // last went, the next call destroys the context.
            Err(Errno::Again) => {
                self.free_tables_of(h, caller, context);
                Err(Errno::Again)
            }
            r => r.map(|_| ()),
        }
    }

    /// The id of `caller`'s context `id`, created by
    /// [`context_create_unreported`](Self::context_create_unreported), is
    /// in the caller's hands: its ops may use it from now on.
    pub fn context_reported(&self, caller: DomId, id: ContextId) {
        if let Some(mut d) = self.lock_cell(caller, id) {
            if d.dd.own(id).is_some() {
                d.dd.contexts = 1 << id.0;
            }
            self.put_driver(d);
        }
    }

    /// Take back context `id` of `caller`, created by
    /// [`context_create_unreported`](Self::context_create_unreported),
    /// whose id could not be reported. Nothing can be in it (no op of the
    /// caller's finds it), so only the backend can refuse (its flush or
    /// tag release failing, `EBUSY`): the hypercall then reports it
    /// (`context_reported`), the caller's to find and destroy.
    pub fn context_create_undo(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        id: ContextId,
    ) -> Result<(), Errno> {
        h.devices_lock();
        let r = match self.lock_cell(caller, id) {
            None => Err(Errno::NoEnt),
            // Reported (not by this call): the caller's to destroy.
            Some(d) if d.dd.has_context(id) => {
                self.put_driver(d);
                Err(Errno::Busy)
            }
            Some(mut d) => match Self::drop_context(&mut d, h, id) {
                Ok(()) => {
                    self.release_context_cell(d);
                    self.forget_context(caller, id);
                    Ok(())
                }
                Err(e) => {
                    self.put_driver(d);
                    Err(e)
                }
            },
        };
        h.devices_unlock();
        r
    }

    /// Whether `context` is one of the engine's contexts of `caller` (not
    /// context 0) whose id was reported, asked under its cell's lock alone.
    fn has_own_context(&self, caller: DomId, context: ContextId) -> bool {
        context != ContextId::DEFAULT
            && self
                .lock_cell(caller, context)
                .is_some_and(|d| d.dd.has_context(context) && d.dd.own(context).is_some())
    }

    /// Run `f` on the cell of `caller`'s `context` (one of the engine's)
    /// with the devices lock and then the cell's lock held: the order Xen's
    /// `pviommu_device_leaving()` hook (entered with `pcidevs_lock` held)
    /// needs. `ENOENT` if the caller has no such context: checked first
    /// without the devices lock, so such a caller cannot make Xen's
    /// `pcidevs_lock` busy (and again under it). `first` runs under the
    /// devices lock before the cell is locked (it may lock other cells,
    /// one at a time). When `f` answers `Ok(true)` the context is gone: its
    /// cell is given back and its id taken off the home cell's list, one
    /// lock at a time.
    fn devices_then_cell<H: Hypervisor>(
        &self,
        h: &mut H,
        caller: DomId,
        context: ContextId,
        first: impl FnOnce(&mut H) -> Result<(), Errno>,
        f: impl FnOnce(&mut Driver<'_, L>, &mut H) -> Result<bool, Errno>,
    ) -> Result<bool, Errno> {
        if !self.has_own_context(caller, context) {
            return Err(Errno::NoEnt);
        }
        h.devices_lock();
        let r = match first(h).and_then(|()| self.lock_cell(caller, context).ok_or(Errno::NoEnt)) {
            Err(e) => Err(e),
            Ok(mut d) => {
                let r = f(&mut d, h);
                if let Ok(true) = r {
                    self.release_context_cell(d);
                    self.forget_context(caller, context);
                } else {
                    self.put_driver(d);
                }
                r
            }
        };
        h.devices_unlock();
        r
    }

    /// Take `context` down: detach its devices, flush, free the tables and
    /// the tag. Devices lock and the context cell's lock held. `Err(Busy)`
    /// when a device could not be moved off the tables or the flush
    /// failed: then nothing is freed (the caller retries; a device never
    /// walks freed tables). `Err(Again)` when tables its unmaps emptied
    /// are still to be freed (failed flushes left them): the context
    /// stays with no device; the caller frees a budget of them
    /// ([`free_tables_of`](Self::free_tables_of)) and calls again.
    fn drop_context(
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        context: ContextId,
    ) -> Result<(), Errno> {
        // detach_locked's rule (EBUSY keeps the device and so the tables),
        // over every slot at once. Calling detach_locked per device instead
        // left swap_remove's bounds check below as a reachable panic in the
        // Xen object (build-engine.sh refuses it).
        let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
        for slot in own.devices.iter_mut() {
            if let Some(device) = *slot {
                if let Err(Errno::Busy) = h.device_detach(device, own.hw) {
                    return Err(Errno::Busy);
                }
                *slot = None;
            }
        }
        // Nothing is mapped (checked), but entries unmapped since the last
        // flush may still be cached under the tag: flush, and give the tag
        // back, before anything is freed; if either fails, keep it all.
        let hw = own.hw;
        if h.hw_flush(hw, Bfn(0), Bfn(u64::MAX >> 12)).is_err() {
            return Err(Errno::Busy);
        }
        // The tables its unmaps emptied go a budget at a time, as after
        // any flush (failed flushes can have left one per 512 BFNs of the
        // quota): `Again` (the context kept, its devices detached) while
        // any is left, for the caller to free a budget of them with the
        // devices lock dropped ([`free_tables_of`](Self::free_tables_of)).
        // The flush above covered them all, so each call frees a budget
        // whatever its other cells' flushes do (a review of 2026-12-06:
        // left to the call's end, a failing flush of the cell's gather or
        // another context's pages could take every entry's budget).
        own.tables.flush_came(h);
        if own.tables.has_flushed() {
            return Err(Errno::Again);
        }
        if h.hw_context_destroy(hw).is_err() {
            return Err(Errno::Busy);
        }
        // `swap_remove` by hand: its bound check, out of line, was a panic
        // path in the Xen object (build-engine.sh refuses one).
        let Some(pos) = d.dd.own.iter().position(|c| c.id == context) else {
            return Err(Errno::NoEnt);
        };
        let Some(last) = d.dd.own.pop() else {
            return Err(Errno::NoEnt);
        };
        let own = match d.dd.own.get_mut(pos) {
            Some(slot) => core::mem::replace(slot, last),
            // (It was the last.)
            None => last,
        };
        // The whole-context flush above covers what the gather held of it.
        d.dd.gather.forget(context);
        own.tables.destroy(h);
        d.dd.contexts &= !(1 << context.0);
        Ok(())
    }

    /// The leaf entry a device attached to `context` of driver domain
    /// `domid` finds for `bfn`, address field zeroed, and its level
    /// (`PVIOMMU_CMD_entry`). `ENOENT` for no such context (the default
    /// one is the host's) or no mapping there.
    pub fn entry_bits(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<LeafBits, Errno> {
        let d = self.lock_cell(domid, context).ok_or(Errno::NoEnt)?;
        d.dd.own(context)
            .and_then(|c| c.tables.leaf_bits(h, bfn))
            .ok_or(Errno::NoEnt)
    }

    /// The context of `owner` that `device` is attached to, if any (one
    /// cell lock at a time).
    pub fn device_context(&self, owner: DomId, device: Sbdf) -> Option<ContextId> {
        self.contexts_of(owner)
            .filter(|&c| c != ContextId::DEFAULT)
            .find(|&c| {
                self.lock_cell(owner, c)
                    .is_some_and(|d| d.dd.device_context(device).is_some())
            })
    }

    /// Point `device` (the caller's) at `context`.
    pub fn context_attach<H: Hypervisor>(
        &self,
        h: &mut H,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let refusals = PolicyRefusals::default();
        self.context_attach_in(h, caller, context, device, &refusals)
    }

    /// [`context_attach`](Self::context_attach) as an op of a call whose
    /// policy refusals so far are `refusals` (a device the policy refused
    /// is not asked about again in the call).
    pub(crate) fn context_attach_in<H: Hypervisor>(
        &self,
        h: &mut H,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
        refusals: &PolicyRefusals,
    ) -> Result<(), Errno> {
        // Whether the device may be the caller's to attach (under the
        // devices lock).
        let its_own = |h: &mut H| {
            h.device_facts(device)
                .ok_or(Errno::NoDev)
                .and_then(|facts| may_attach(caller, &facts))
        };
        // Attachments only change under the devices lock: whether the
        // device is on any of the caller's contexts is asked under it, one
        // cell at a time, before this context's cell is locked.
        let checks = |h: &mut H| {
            its_own(h)?;
            match self.device_context(caller, device) {
                Some(_) => Err(Errno::Busy),
                None => Ok(()),
            }
        };
        // The device's own XSM check (FLASK: its label), with no lock
        // held, once the context is known to exist (ENOENT comes first, as
        // for every context op) and the device is known to be the caller's
        // (asked under the devices lock, and again below): the policy is
        // asked only about the caller's own devices, so its answers (and
        // the denials FLASK logs) say nothing of anyone else's. A refusal
        // is EPERM; ENOMEM (FLASK making the device's SID) is passed on
        // (`xsm_allows`).
        if !self.has_own_context(caller, context) {
            return Err(Errno::NoEnt);
        }
        h.devices_lock();
        let own = its_own(h);
        h.devices_unlock();
        own?;
        refusals.xsm_allows(h, caller, None, XsmAction::Attach(device))?;
        self.devices_then_cell(h, caller, context, checks, |d, h| {
            let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
            let free = own
                .devices
                .iter()
                .position(Option::is_none)
                .ok_or(Errno::NoSpc)?;
            h.device_attach(device, own.hw, own.tables.root())?;
            if let Some(slot) = own.devices.get_mut(free) {
                *slot = Some(device);
            }
            Ok(false)
        })
        .map(|_| ())
    }

    /// Check that `device` is attached to `context` of `caller`.
    pub fn context_detach_check(
        &self,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        if context == ContextId::DEFAULT {
            return Err(Errno::NoEnt);
        }
        let d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        if d.dd.attached_devices(context).any(|x| x == device) {
            Ok(())
        } else {
            Err(Errno::NoEnt)
        }
    }

    /// Put `device`, attached to `context`, back in its owner's default
    /// context.
    pub fn context_detach(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let nothing_first = |_: &mut _| Ok(());
        self.devices_then_cell(h, caller, context, nothing_first, |d, h| {
            Self::detach_locked(d, h, context, device).map(|()| false)
        })
        .map(|_| ())
    }

    fn detach_locked(
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
        let hw = own.hw;
        let slot = own
            .devices
            .iter_mut()
            .find(|s| **s == Some(device))
            .ok_or(Errno::NoEnt)?;
        match h.device_detach(device, hw) {
            // Still on the tables: it stays recorded, so they stay too.
            Err(Errno::Busy) => Err(Errno::Busy),
            // Otherwise it walks none of them any more (on any other error
            // its context entry was cleared: its DMA is blocked).
            r => {
                *slot = None;
                r
            }
        }
    }

    /// Whether a DMA fault of `device` (owned by `owner`) at `bfn`, at time
    /// `now_ns` (the host's clock, [`Platform::now_ns`](crate::platform::Platform::now_ns):
    /// Xen's `NOW()` as its fault tasklet handles the fault),
    /// is one a revocation made: in the context the device walks (the one
    /// of its owner's it is attached to, else its owner's default context),
    /// `bfn` is being revoked, or is revoked and its notice not yet
    /// acknowledged. Xen then does not count the fault toward turning the
    /// device's bus mastering off (patch 0008; `pci_check_disable_device()`:
    /// 10 faults at most 10 ms apart): the target guest decided when its
    /// page went, not the device's owner, and a mediator's device serving
    /// other guests and the host must not stop for it (an audit of
    /// 2026-12-07). Every other fault counts, as before: the owner answers
    /// for its device's DMA to BFNs it unmapped itself, acknowledged, or
    /// never mapped.
    ///
    /// Bounded by a token bucket per owner ([`FaultBucket`]):
    /// [`REVOKED_FAULT_BURST`] faults at once, [`REVOKED_FAULTS_PER_SECOND`]
    /// a second sustained; past it every fault counts. Reviews of the fix
    /// shaped it: with no bound a device model could revoke its own guest's
    /// page on purpose, never acknowledge it and have its device fault for
    /// ever; bounded by count (one in 64), a device streaming into a
    /// revoked buffer was stopped in about a millisecond; a grace after
    /// each notice was renewed by the device model's own revocations; a
    /// bucket per cell, by the contexts it created.
    /// The caller decides for a dying or crashed owner (Xen: never
    /// expected, it acknowledges nothing).
    ///
    /// From Xen's fault tasklet (softirq context) with the devices lock
    /// held (so the device's owner and attachment stay): one cell at a
    /// time.
    pub fn fault_expected(&self, owner: DomId, device: Sbdf, bfn: Bfn, now_ns: u64) -> bool {
        let Some(idx) = self.space.index_of(bfn) else {
            return false;
        };
        let context = self
            .device_context(owner, device)
            .unwrap_or(ContextId::DEFAULT);
        let Some(d) = self.lock_cell(owner, context) else {
            return false;
        };
        // A revoked BFN is reserved (never handed out again) until its
        // owner acknowledges it; one being revoked answers `EBUSY` to an
        // unmap, and becomes revoked at its flush.
        let kind =
            d.dd.guest_slot(idx)
                .map(|i| Self::unmap_kind(&d.dd, context, i));
        let revoked = matches!(
            kind,
            Some(Ok(super::unmap::UnmapKind::Revoked) | Err(Errno::Busy))
        );
        self.put_driver(d);
        revoked && self.take_fault_token(owner, now_ns)
    }

    /// Take a token of `owner`'s bucket ([`FaultBucket`]) at `now_ns`: one
    /// compare-and-swap of its word, so that the reset at the end of the
    /// owner's teardown (`forget_domid`, no devices lock) is never undone
    /// by a take that read the word before it (a review of 2026-12-07).
    fn take_fault_token(&self, owner: DomId, now_ns: u64) -> bool {
        let Some(word) = self.fault_buckets.get(owner.0 as usize) else {
            return false;
        };
        let mut took = false;
        // (`fetch_update` retries its closure on a lost race: `took` is
        // the last attempt's, the one stored.)
        let _ = word.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| {
            let mut bucket = FaultBucket::from_bits(bits);
            took = bucket.take(now_ns);
            Some(bucket.bits())
        });
        took
    }

    /// Xen is about to move `device` away from `owner` (deassignment,
    /// hot-unplug): if it is attached to one of `owner`'s contexts, put it
    /// back in the default context first, so Xen finds the device where it
    /// left it. Called with the devices lock held. `Err(Busy)`: the IOMMU
    /// could not be made to forget the context's entry for it (a failed
    /// flush or sync); the device stays counted on the context, whose
    /// tables stay, and Xen must not move it (the glue's hook fails the
    /// assignment): moved, it could reach the context's mappings from its
    /// new owner through what the IOMMU still caches.
    pub fn device_leaving(
        &self,
        h: &mut impl Hypervisor,
        owner: DomId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let mut result = Ok(());
        for context in self.contexts_of(owner) {
            if context == ContextId::DEFAULT {
                continue;
            }
            let Some(mut d) = self.lock_cell(owner, context) else {
                continue;
            };
            if d.dd.device_context(device).is_some() {
                // (Any other error cleared its entry: its DMA is blocked.)
                if let Err(Errno::Busy) = Self::detach_locked(&mut d, h, context, device) {
                    result = Err(Errno::Busy);
                }
            }
            self.put_driver(d);
        }
        result
    }

    /// The last step of a driver domain's teardown: its contexts go, their
    /// devices back to the default context first, and their cells back.
    /// The caller holds the devices lock (and no cell's). What stopped it,
    /// if anything: the teardown is retried.
    pub(crate) fn teardown_contexts(&self, h: &mut impl Hypervisor, domid: DomId) -> ContextsLeft {
        for context in self.contexts_of(domid) {
            if context == ContextId::DEFAULT {
                continue;
            }
            let Some(mut d) = self.lock_cell(domid, context) else {
                continue;
            };
            // (Its tables and cell go next: never with a page held, which
            // the teardown's walk should have left none of.)
            if d.dd.holds_pages() {
                d.dd.note_bug(EngineBug::HeldAtReset);
                self.put_driver(d);
                return ContextsLeft::HoldingPages;
            }
            match Self::drop_context(&mut d, h, context) {
                Ok(()) => {}
                Err(Errno::Again) => {
                    // (The teardown's walk freed them before it came here:
                    // not reached while flushes succeed.)
                    self.put_driver(d);
                    return ContextsLeft::TablesLeft(context);
                }
                Err(_) => {
                    self.put_driver(d);
                    return ContextsLeft::DeviceOn;
                }
            }
            self.release_context_cell(d);
            self.forget_context(domid, context);
        }
        ContextsLeft::None
    }
}
