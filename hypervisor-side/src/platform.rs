//! What the hypervisor provides to the engine: domains, privilege, pages,
//! guest memory, reserved ranges and preemption. Xen implements this in
//! `xen/pviommu.c` (the `pvx_*` functions); the simulator in [`crate::sim`].

use crate::{DomId, Errno, Gfn, Mfn};

/// How the target's p2m classifies a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageKind {
    /// Ordinary RAM the device may read and write.
    RamRw,
    /// RAM the device may only read (p2m read-only, or a PV page-table page
    /// that cannot take a writable type).
    RamRo,
    /// A grant or foreign mapping in the target's p2m: not the target's page.
    Grant,
    /// MMIO, not RAM.
    Mmio,
    /// Nothing at this gfn.
    NotPresent,
    /// Paged out or being shared.
    PagedOut,
    /// Owned by Xen or by another domain.
    XenOwned,
}

/// What [`Platform::get_page`] found; `mfn` is `Some` exactly when a page
/// reference (and, for `want_write`, a writable type reference) was taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PageLookup {
    /// The classification.
    pub kind: PageKind,
    /// The referenced machine frame.
    pub mfn: Option<Mfn>,
}

/// A BFN range no mapping may use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReservedRange {
    /// First frame.
    pub start: u64,
    /// Number of frames.
    pub nr: u64,
    /// An [`abi::region_kind`](pviommu_abi::region_kind) code.
    pub kind: u32,
}

/// The hypervisor's services.
pub trait Platform {
    /// Copy from the calling guest's buffer at `addr`; `Err(Fault)` if any byte
    /// is inaccessible.
    fn copy_from_guest(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Copy into the calling guest's buffer at `addr`.
    fn copy_to_guest(&mut self, addr: u64, buf: &[u8]) -> Result<(), Errno>;
    /// Whether the domain exists and is not dying.
    fn domain_exists(&self, domid: DomId) -> bool;
    /// Whether the domain is privileged (control / hardware domain).
    fn is_privileged(&self, domid: DomId) -> bool;
    /// Whether `caller` is the device model of `target`.
    fn is_device_model_of(&self, caller: DomId, target: DomId) -> bool;
    /// Classify `gfn` of `domid`; take references if it is usable RAM.
    fn get_page(&mut self, domid: DomId, gfn: Gfn, want_write: bool) -> Result<PageLookup, Errno>;
    /// Release what `get_page` took.
    fn put_page(&mut self, mfn: Mfn, writable: bool);
    /// One past the highest RAM machine frame.
    fn ram_end(&self) -> Mfn;
    /// Reserved range `index`, in any order; `None` past the last.
    fn reserved_range(&self, index: usize) -> Option<ReservedRange>;
    /// True when a long call should stop here and be continued.
    fn should_preempt(&mut self) -> bool;
}
