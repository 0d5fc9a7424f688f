//! The embedded simulated machine: host RAM frames holding bytes, domains
//! with p2m tables and page types, a privileged dom0, device-model relations,
//! reserved ranges, the engine running against it, and a DMA device behind a
//! simulated IOMMU that walks the real-format page tables in RAM
//! ([`hardware`]) through an IOTLB that only a flush invalidates.
//!
//! Nothing here returns canned answers: a DMA reads what the page tables,
//! as written by [`crate::pgtable`], make it reach.

mod guest_call;
pub mod hardware;
mod machine;
mod p2m;

pub use hardware::{DmaFault, FaultReason};
pub use machine::{DomainSpec, Format, FrameInfo, Owner, SimMachine};
pub mod shared;
pub use shared::SharedSim;

use std::cell::Cell;

thread_local! {
    static HOST_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks the simulated *hypervisor's* own work (page tables, p2m, guest
/// copies) on this thread, as opposed to the engine's. An allocation-failure
/// test fails only the engine's allocations: the engine must survive every
/// one of them, while the host's allocator is the host's business (Xen's
/// page-table allocation failures are injected separately, as `ENOMEM` from
/// the IOMMU).
pub struct HostAllocations(());

impl HostAllocations {
    /// Enter host code until the value is dropped.
    pub fn begin() -> Self {
        HOST_DEPTH.with(|d| d.set(d.get() + 1));
        HostAllocations(())
    }
    /// Whether this thread is running host code now.
    pub fn active() -> bool {
        HOST_DEPTH.with(|d| d.get() > 0)
    }
}

impl Drop for HostAllocations {
    fn drop(&mut self) {
        HOST_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}
