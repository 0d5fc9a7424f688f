//! The IOMMU backend: map/unmap/flush in a driver domain's context.
//! On Xen it is `iommu_map`/`iommu_unmap`/`iommu_iotlb_flush` on the
//! hardware domain; in the simulator, the real-format tables of
//! [`crate::pgtable`] in simulated RAM.

use crate::config::MAX_CONTEXTS;
use crate::{Bfn, ContextId, DomId, Errno, MemAttr, Mfn, Permissions};

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

impl FlushGather {
    /// Record that `bfn` of `ctx` changed; `flags` are backend-specific.
    pub fn add(&mut self, ctx: ContextId, bfn: Bfn, flags: u32) -> Result<(), Errno> {
        let slot = self.ranges.get_mut(ctx.0 as usize).ok_or(Errno::Inval)?;
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
    /// Forget everything (after a successful flush).
    pub fn clear(&mut self) {
        self.ranges = Default::default();
    }
}

/// An IOMMU that holds one or more translation contexts per driver domain.
pub trait IommuBackend {
    /// Capabilities.
    fn iommu_caps(&self) -> BackendCaps;
    /// Make a new, empty context.
    fn context_create(&mut self, owner: DomId, ctx: ContextId) -> Result<(), Errno>;
    /// Remove an empty context.
    fn context_destroy(&mut self, owner: DomId, ctx: ContextId);
    /// Map one 4 KiB page; the change is recorded in `gather`.
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
    /// Unmap one 4 KiB page. Must not need memory where the backend can
    /// help it; an `Err` leaves the entry in place (the engine keeps the page
    /// referenced and retries).
    fn iommu_unmap(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno>;
    /// Invalidate the IOTLB for everything gathered. Only after `Ok` may
    /// the page references of unmapped pages be dropped.
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather) -> Result<(), Errno>;
}
