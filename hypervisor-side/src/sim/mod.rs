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
pub mod reference;

pub use hardware::{DmaFault, FaultReason};
pub use machine::{
    CallEnd, DomainSpec, Format, FrameInfo, Owner, SimMachine, StaleTranslation, FAULTS_KEPT,
};
pub mod shared;
pub use shared::SharedSim;

use std::cell::Cell;

thread_local! {
    static HOST_DEPTH: Cell<u32> = const { Cell::new(0) };
    static CALLER_IS_HOST: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is running a hypercall of the control or hardware
/// domain ([`SimMachine::hypercall`] says so for the call's length): what
/// the engine heap's reserve asks of the current domain
/// ([`crate::heap_budget`]; Xen: `pvx_current_is_host()`). False outside a
/// hypercall.
pub fn caller_is_host() -> bool {
    CALLER_IS_HOST.with(|c| c.get())
}

/// Marks a hypercall of a host domain (or not) until dropped.
pub(crate) struct CallerGuard(bool);

impl CallerGuard {
    pub(crate) fn enter(is_host: bool) -> Self {
        CallerGuard(CALLER_IS_HOST.with(|c| c.replace(is_host)))
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        CALLER_IS_HOST.with(|c| c.set(self.0));
    }
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
    #[inline]
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
    #[inline]
    fn drop(&mut self) {
        HOST_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}
