//! The IOMMU backend: map/unmap/flush in a driver domain's context.
//! On Xen it is `iommu_map`/`iommu_unmap`/`iommu_iotlb_flush` on the
//! hardware domain; in the simulator, the real-format tables of
//! [`crate::pgtable`] in simulated RAM.

use alloc::vec::Vec;

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

/// IOTLB invalidations gathered over a batch, one range per context: the
/// engine passes it to every map/unmap and flushes once at the end (the way
/// Linux's `iommu_iotlb_gather` works).
#[derive(Default, Debug)]
pub struct FlushGather {
    /// (context, first bfn, last bfn, backend flags).
    pub ranges: Vec<(ContextId, Bfn, Bfn, u32)>,
}

impl FlushGather {
    /// Record that `bfn` of `ctx` changed; `flags` are backend-specific.
    pub fn add(&mut self, ctx: ContextId, bfn: Bfn, flags: u32) -> Result<(), Errno> {
        if let Some(r) = self.ranges.iter_mut().find(|r| r.0 == ctx) {
            r.1 = r.1.min(bfn);
            r.2 = r.2.max(bfn);
            r.3 |= flags;
            return Ok(());
        }
        self.ranges.try_reserve(1).map_err(|_| Errno::NoMem)?;
        self.ranges.push((ctx, bfn, bfn, flags));
        Ok(())
    }
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
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
    /// Unmap one 4 KiB page.
    fn iommu_unmap(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno>;
    /// Invalidate the IOTLB for everything gathered.
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather);
}
