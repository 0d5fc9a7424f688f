//! The IOMMU backend.
//!
//! A driver domain's *default* context is the host's own: on Xen,
//! `iommu_map`/`iommu_unmap`/`iommu_iotlb_flush` on the domain's tables; in
//! the simulator, tables it keeps the same way. Every *other* context is
//! the engine's: tables it writes itself with [`crate::pgtable`] into frames
//! the backend gives it (its [`TableMemory`]), tagged with an IOMMU
//! domain id the backend allocates ([`HwContext`]), invalidated through
//! [`IommuBackend::hw_flush`], and walked by the devices the caller points
//! at them ([`IommuBackend::device_attach`]).

use crate::config::MAX_CONTEXTS;
use crate::nospec::get_mut_nospec;
use crate::pgtable::TableMemory;
use crate::{Bfn, ContextId, DomId, Errno, MemAttr, Mfn, Permissions, Sbdf};

/// The entry format of the tables the engine writes for its contexts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TableFormat {
    /// Intel VT-d second level; `snoop_control`: the IOMMU has ECAP.SC, so
    /// write-back entries may force snooping (SNP) and uncached ones differ.
    Vtd {
        /// ECAP.SC on every IOMMU.
        snoop_control: bool,
    },
    /// Arm LPAE stage 2.
    Lpae,
}

/// How the engine may make contexts of its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OwnTables {
    /// Entry format.
    pub format: TableFormat,
    /// Levels the IOMMU walks (VT-d: from its AGAW).
    pub levels: u32,
}

/// The IOMMU's tag for one of the engine's contexts (Xen VT-d: a pseudo
/// domain id, which gets a DID on each IOMMU a device of it sits behind).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HwContext(pub u32);

/// What the host knows about a PCI device: the facts the attach rule in
/// [`crate::permission::may_attach`] is decided on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceFacts {
    /// The domain the device is assigned to (Xen: `pdev->domain`).
    pub owner: DomId,
    /// The device's DMA carries a requester id of its own: no phantom
    /// functions, not behind a PCIe-to-PCI bridge (whose devices share
    /// one). Otherwise re-pointing it would move its neighbours too.
    pub own_requester_id: bool,
    /// Firmware reserved memory (an RMRR) the device needs mapped 1:1; a
    /// context of the engine's has no such mapping.
    pub rmrr: bool,
    /// The device caches translations itself (ATS): the engine's flush
    /// does not reach its device IOTLB.
    pub ats: bool,
    /// The IOMMU unit in front of the device translates its DMA. Xen
    /// leaves some VT-d units off with only a warning (`iommu=no-igfx`,
    /// an IGD or Azalia unit the firmware did not set up): their context
    /// entries are never used, so a context of the engine's would isolate
    /// nothing and the device would DMA to the raw BFNs it is given.
    pub translated: bool,
}

/// What the backend can do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BackendCaps {
    /// Contexts per driver domain, the default one included.
    pub max_contexts: u32,
    /// [`abi::feature`](pviommu_abi::feature) bits.
    pub features: u32,
    /// Bit n: 2^n-byte pages.
    pub page_sizes: u64,
    /// Input address width of the IOMMU (bits).
    pub address_bits: u32,
    /// Whether, and how, the engine can make contexts of its own; `None`:
    /// the default context only.
    pub own_tables: Option<OwnTables>,
    /// The default context honours memory attributes other than
    /// write-back (Xen's `iommu_map` takes none: false there).
    pub default_context_attrs: bool,
    /// A device's writes through a write-back map of the default context
    /// snoop the CPU caches (Xen's VT-d tables only when every unit has
    /// snoop control; AMD-Vi's always). Where they do not, a writable
    /// map's page is marked for a cache flush before the host trusts its
    /// contents as a page table (`Platform::note_non_coherent_write`).
    pub default_context_snooped: bool,
}

/// One context's pending invalidation: a BFN range and backend flags.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FlushRange {
    /// Context.
    pub context: ContextId,
    /// First BFN changed.
    pub first: Bfn,
    /// Last BFN changed.
    pub last: Bfn,
    /// Backend-specific flags (Xen's `IOMMU_FLUSHF_*`).
    pub flags: u32,
}

/// IOTLB invalidations gathered over a batch, one range per context (the
/// way Linux's `iommu_iotlb_gather` works): the engine passes it to every
/// map/unmap and flushes once. Fixed size, so gathering never allocates;
/// a driver domain has at most [`MAX_CONTEXTS`] contexts.
#[derive(Clone, Debug, Default)]
pub struct FlushGather {
    ranges: [Option<FlushRange>; MAX_CONTEXTS as usize],
}

/// The last BFN of the run of `count` from `first`: `None` for an empty
/// run, or one that would go past the end of the BFN space.
#[inline]
pub fn run_last(first: Bfn, count: u64) -> Option<Bfn> {
    count
        .checked_sub(1)
        .and_then(|n| first.0.checked_add(n))
        .map(Bfn)
}

impl FlushGather {
    /// Record that BFNs `first..=last` of `ctx` changed (a run).
    #[inline]
    pub fn add_range(
        &mut self,
        ctx: ContextId,
        first: Bfn,
        last: Bfn,
        flags: u32,
    ) -> Result<(), Errno> {
        self.add(ctx, first, flags)?;
        self.add(ctx, last, flags)
    }

    /// Record that `bfn` of `ctx` changed; `flags` are backend-specific.
    #[inline]
    pub fn add(&mut self, ctx: ContextId, bfn: Bfn, flags: u32) -> Result<(), Errno> {
        let slot = get_mut_nospec(&mut self.ranges, ctx.0 as usize).ok_or(Errno::Inval)?;
        match slot {
            Some(r) => {
                r.first = Bfn(r.first.0.min(bfn.0));
                r.last = Bfn(r.last.0.max(bfn.0));
                r.flags |= flags;
            }
            None => {
                *slot = Some(FlushRange {
                    context: ctx,
                    first: bfn,
                    last: bfn,
                    flags,
                })
            }
        }
        Ok(())
    }
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(Option::is_none)
    }
    /// The pending ranges.
    pub fn ranges(&self) -> impl Iterator<Item = &FlushRange> {
        self.ranges.iter().flatten()
    }
    /// Forget what was gathered of `ctx` (a flush of all of it succeeded).
    pub fn forget(&mut self, ctx: ContextId) {
        if let Some(slot) = get_mut_nospec(&mut self.ranges, ctx.0 as usize) {
            *slot = None;
        }
    }
    /// Forget everything (after a successful flush).
    pub fn clear(&mut self) {
        self.ranges = Default::default();
    }
}

/// The most pages the engine asks [`IommuBackend::iommu_unmap_run`] or
/// [`IommuBackend::iommu_map_run`] for at once (the Xen glue refuses more:
/// `PVX_IOMMU_RUN_MAX`): above the entries maps or unmaps may leave
/// waiting (`DEFER_LIMIT` plus a run of `MAP_CHUNK`), so a run is never
/// cut short, and not far above, as Xen's loop over it is not
/// preemptible.
pub const MAX_IOMMU_RUN: u64 = 1 << 11;

/// An IOMMU: the host's default context of each driver domain, and what
/// the engine needs for contexts of its own.
///
/// Its [`TableMemory`] is where the engine's own tables live.
pub trait IommuBackend: TableMemory {
    /// Capabilities.
    fn iommu_caps(&self) -> BackendCaps;
    /// Map one 4 KiB page into `owner`'s default context; the change is
    /// recorded in `gather`.
    #[allow(clippy::too_many_arguments)]
    fn iommu_map(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno>;
    /// Unmap one 4 KiB page of the default context. Must not need memory where the backend can
    /// help it; an `Err` leaves the entry in place (the engine keeps the page
    /// referenced and retries).
    fn iommu_unmap(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno>;
    /// Map the `count` 4 KiB pages from `bfn` to the frames from `mfn` in
    /// the default context, as Xen's `iommu_map(d, bfn, mfn, count)` does:
    /// one call, which maps each part of the run where both are aligned to
    /// 2 MiB (or more) with one entry where the IOMMU has that size. On
    /// `Err` what the run mapped is unmapped again as far as the IOMMU lets
    /// it (an entry may stay: the caller's page-by-page retry finds it),
    /// and the range goes into `gather` all the same. This default goes a
    /// page at a time.
    #[allow(clippy::too_many_arguments)]
    fn iommu_map_run(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        count: u64,
        perms: Permissions,
        attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        for i in 0..count {
            let page = bfn.0.checked_add(i).ok_or(Errno::Inval)?;
            let frame = mfn.0.checked_add(i).ok_or(Errno::Inval)?;
            if let Err(e) = self.iommu_map(owner, ctx, Bfn(page), Mfn(frame), perms, attr, gather) {
                for j in 0..i {
                    let _ = self.iommu_unmap(owner, ctx, Bfn(bfn.0 + j), gather);
                }
                return Err(e);
            }
        }
        Ok(())
    }
    /// Unmap the `count` 4 KiB pages from `bfn` of the default context,
    /// as Xen's `iommu_unmap(d, bfn, count)` does: one call, which clears
    /// a 2 MiB (or larger) aligned part of the run with one entry where
    /// the IOMMU has that size, so it never splits a superpage there. A
    /// page with no entry is no error. An `Err`, whatever its errno
    /// (`NoEnt` included), may leave any page of the run mapped: the
    /// engine then unmaps each on its own. This default
    /// goes a page at a time.
    fn iommu_unmap_run(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        count: u64,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        for i in 0..count {
            let page = bfn.0.checked_add(i).ok_or(Errno::Inval)?;
            match self.iommu_unmap(owner, ctx, Bfn(page), gather) {
                Ok(()) | Err(Errno::NoEnt) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Invalidate the IOTLB for what `gather` holds of the default
    /// context. Only after `Ok` may the page references of unmapped pages
    /// be dropped.
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather) -> Result<(), Errno>;

    /// Tag a new context of the engine's whose tables start at `root`
    /// (the 4-level root; see [`crate::pgtable::TableOptions`]).
    fn hw_context_create(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        root: Mfn,
    ) -> Result<HwContext, Errno>;
    /// Give the tag back: no device points at the context any more, and
    /// its tables are about to be freed. `Err`: the IOMMU may still hold
    /// entries under the tag (a flush failed): the tag stays taken and the
    /// tables must be kept.
    fn hw_context_destroy(&mut self, hw: HwContext) -> Result<(), Errno>;
    /// Invalidate the IOTLB (and paging-structure caches) of `hw` for BFNs
    /// `first..=last`.
    fn hw_flush(&mut self, hw: HwContext, first: Bfn, last: Bfn) -> Result<(), Errno>;

    /// Serialise device assignment (Xen: `pcidevs_lock`). Taken before any
    /// driver cell's lock, never inside one: Xen calls
    /// [`crate::Engine::device_leaving`] with it held. Re-entrant.
    fn devices_lock(&mut self);
    /// Release [`Self::devices_lock`].
    fn devices_unlock(&mut self);
    /// Whether `domid` has any PCI device assigned: a hint, read without
    /// the devices lock, to refuse contexts to a caller that could attach
    /// nothing before it takes that lock.
    fn owns_devices(&self, domid: DomId) -> bool;
    /// Facts about a device; `None` if there is none. Under the devices lock.
    fn device_facts(&self, device: Sbdf) -> Option<DeviceFacts>;
    /// Point `device` at the engine's context `hw` (root `root`), with the
    /// context-cache and IOTLB invalidations that needs. On `Err` the
    /// device translates through its owner's default context, or not at
    /// all: never through tables it was not given. Under the devices lock.
    fn device_attach(&mut self, device: Sbdf, hw: HwContext, root: Mfn) -> Result<(), Errno>;
    /// Point `device` back at its owner's default context (`Ok` too when
    /// it no longer walks `hw`). `Err(Busy)`: it may still walk `hw`'s
    /// tables (the hardware refused both the move and clearing its entry),
    /// which must then be kept. Any other `Err`: its DMA is blocked (the
    /// context entry is cleared). Under the devices lock.
    fn device_detach(&mut self, device: Sbdf, hw: HwContext) -> Result<(), Errno>;
}
