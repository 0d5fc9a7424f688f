//! What the hypervisor provides to the engine: domains, privilege, pages,
//! guest memory, reserved ranges and preemption. Xen implements this in
//! `xen/pviommu.c` (the `pvx_*` functions); the simulator in [`crate::sim`].

use core::sync::atomic::{AtomicU32, Ordering};

use crate::{DomId, Errno, Gfn, Mfn, Sbdf};

/// What a host service's failure answers, from the host's negative errno
/// (Xen's glue functions return one): the ABI's errno of that value, and
/// anything else, a positive value no service returns or an errno the ABI
/// has no name for (an SMMU sync's `-ETIMEDOUT`), is [`Errno::Io`]: the
/// host failed, not the caller's arguments. Never read as a success or as
/// another errno. Before ABI 1.7 those answered `EINVAL`, which told the
/// caller its arguments were wrong. The simulator's injected IOMMU
/// failures answer what this makes of Xen's.
pub fn host_errno(rc: i32) -> Errno {
    if rc >= 0 {
        return Errno::Io;
    }
    Errno::from_code(rc).unwrap_or(Errno::Io)
}

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
    /// Writable access asked while the target is in log-dirty mode (device
    /// writes would escape dirty tracking and be lost on migration).
    LogDirty,
}

/// What the hypervisor knows about a domain: the facts the permission rule
/// in [`crate::permission`] is decided on. The rule itself lives in one
/// place, shared by Xen and the simulator; a platform only reports facts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DomainInfo {
    /// Dying (`d->is_dying`): no new mappings of its pages.
    pub dying: bool,
    /// The control domain (`is_control_domain`).
    pub control: bool,
    /// The hardware domain (`is_hardware_domain`).
    pub hardware: bool,
    /// The domain this one is the device model of (Xen's `d->target`, set
    /// on the *stub domain* and pointing at the guest it serves).
    pub target: Option<DomId>,
    /// A [`pviommu_abi::translation`] code: whether this domain's IOMMU
    /// context translates BFNs at all.
    pub translation: u32,
}

/// What an XSM check is asked about ([`Platform::xsm_check`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum XsmAction {
    /// Capabilities and reserved regions.
    Query,
    /// Map a page of the target.
    Map,
    /// Unmap, look up, contexts and revocations of the caller's own BFNs.
    Manage,
    /// Another domain's PV-IOMMU state: set its quota, read its counters
    /// or its IOMMU entries (control domain; its own XSM action, so a
    /// FLASK policy can refuse it apart from `Manage`). Without a target:
    /// the engine's host-wide controls (the stats timing).
    Control,
    /// Put this device, one of the caller's own (the engine's rule,
    /// `permission::may_attach`, decides that), behind a context of the
    /// caller's: FLASK checks the caller against the *device's* label, so
    /// a policy can keep one device of a driver domain out of PV-IOMMU
    /// contexts while the others go in. No target domain.
    Attach(Sbdf),
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

/// One page of a [`Platform::get_pages`] call, in and out, as the extent
/// arrays of Xen's memory ops are: the gfn asked for going in, the frame
/// referenced coming out, for each page the host took. A frame number's
/// eight bytes, so a call's slots are one array of frame numbers to Xen's
/// glue (nothing but the two to keep on the engine's stack).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(transparent)]
pub struct PageSlot(u64);

impl PageSlot {
    /// A slot asking for `gfn`.
    pub const fn asking(gfn: Gfn) -> PageSlot {
        PageSlot(gfn.0)
    }
    /// The gfn asked for, before the call (after it, a slot the host did
    /// not take holds no defined value).
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0)
    }
    /// The frame the host referenced: only in a slot it took.
    pub const fn mfn(self) -> Mfn {
        Mfn(self.0)
    }
    /// The host took the page: its frame replaces the gfn.
    pub fn take(&mut self, mfn: Mfn) {
        self.0 = mfn.0;
    }
}

/// The target of a page lookup as a map's checks passed it: its sequence
/// number as the map read it before them (the engine's gate of the domid).
/// A target's teardown moves the number first, and ends without waiting
/// for maps in flight; after that Xen may destroy the domain and give its
/// id to a new one, which no check of the map's has seen. A domain the
/// host finds at the domid that is not the checked one was put there
/// after that move, so the host, once it holds the domain it found (Xen:
/// `rcu_lock_domain_by_id()`), reads the number again: moved, it answers
/// as for a domain gone, with nothing looked up (no paging in, populating
/// or unsharing in a domain the caller may not map), and the engine maps
/// again from the checks.
#[derive(Clone, Copy, Debug)]
pub struct CheckedTarget<'a> {
    seq: &'a AtomicU32,
    checked: u32,
}

impl<'a> CheckedTarget<'a> {
    /// The target whose sequence number `seq` was `checked` at the checks.
    pub fn new(seq: &'a AtomicU32, checked: u32) -> Self {
        CheckedTarget { seq, checked }
    }
    /// Whether the number is still the one the checks saw. SeqCst: read
    /// after the host's hold of the domain (in Xen, after the full barrier
    /// that follows raising its `pviommu_pages`).
    pub fn still_checked(&self) -> bool {
        self.seq.load(Ordering::SeqCst) == self.checked
    }
    /// For a host in C: the number's address and the value the checks saw.
    pub fn raw_parts(&self) -> (*const u32, u32) {
        (self.seq.as_ptr().cast_const(), self.checked)
    }
}

/// What [`Platform::get_pages`] came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageRun {
    /// The pages referenced, from the first (their frames in the caller's
    /// `pages[..taken]`).
    pub taken: usize,
    /// Why the page after them was refused, when the host looked it up by
    /// [`Platform::get_page`]'s rule and it was not usable RAM for the
    /// access asked: what `get_page` would have answered, with nothing held.
    /// `None` when the run stopped without an answer for it (its end, a
    /// domain gone or dying, or anywhere the host chose to stop): the
    /// caller looks that page up alone.
    pub refused: Option<PageKind>,
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
    /// Facts about a domain; `None` if there is no such domain.
    fn domain_info(&self, domid: DomId) -> Option<DomainInfo>;
    /// The hypervisor's security module (Xen's XSM/FLASK) on top of the
    /// engine's own rule: it can only refuse more. `target` is `None` for
    /// queries that name no target.
    fn xsm_check(
        &self,
        caller: DomId,
        target: Option<DomId>,
        action: XsmAction,
    ) -> Result<(), Errno>;
    /// Classify `gfn` of `domid`; take references if it is usable RAM.
    /// Writable requests unshare shared pages; paged-out pages answer
    /// [`PageKind::PagedOut`], and start paging in unless `domid` is the
    /// calling domain (asking the pager for one's own page may sleep).
    /// Never called with the engine lock held: it takes the target's p2m
    /// lock. Looks nothing up, answering `Err(Srch)` as for a domain gone,
    /// unless `target`'s number is still the checked one once the host
    /// holds the domain ([`CheckedTarget`]).
    fn get_page(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        want_write: bool,
        target: CheckedTarget<'_>,
    ) -> Result<PageLookup, Errno>;
    /// [`get_page`](Self::get_page) for several pages of one target, the
    /// gfns in `pages` (any order; a map run's ops'): how many pages, from
    /// the first, it referenced as `get_page` references usable RAM for
    /// `want_write` (read-write RAM; read-only RAM too when `!want_write`),
    /// each one's frame written over its gfn ([`PageSlot`]). It may stop
    /// anywhere, and stops before any page it does not reference, leaving
    /// nothing of that page held. If it looked that page up and refused it,
    /// it says why ([`PageRun::refused`]), and the caller does not look it
    /// up again (a lookup's side effects, paging in or populating, happen
    /// once a page); otherwise the caller looks it up with `get_page`.
    /// (Xen: one domain lookup for them all, and one p2m walk for the
    /// pages one p2m entry maps, in any order.) Never called with the
    /// engine lock held. Takes nothing, with no answer, where `get_page`
    /// would look nothing up for `target`.
    fn get_pages(
        &mut self,
        domid: DomId,
        want_write: bool,
        pages: &mut [PageSlot],
        target: CheckedTarget<'_>,
    ) -> PageRun {
        get_pages_one_by_one(self, domid, want_write, pages, target)
    }
    /// Release what `get_page` took.
    fn put_page(&mut self, mfn: Mfn, writable: bool);
    /// One past the highest RAM machine frame.
    fn ram_end(&self) -> Mfn;
    /// Reserved range `index`, in any order; `None` past the last.
    fn reserved_range(&self, index: usize) -> Option<ReservedRange>;
    /// True when a long call should stop here and be continued.
    fn should_preempt(&mut self) -> bool;
    /// A per-boot secret for the engine's hash tables.
    fn random_seed(&self) -> u64;
    /// Revocation notices are pending for `owner`: wake it (Xen: its
    /// `VIRQ_PV_IOMMU`). Called with the engine lock held; must only take
    /// leaf locks.
    fn notify_revoked(&mut self, owner: DomId);
    /// A device may write `mfn` (referenced by [`Platform::get_page`] with
    /// `want_write`) without snooping the CPU caches (an uncached mapping):
    /// the host must flush the page's cache lines before it is used as
    /// anything but writable memory, or freed (Xen: `_PGT_non_coherent`,
    /// as for a CPU write-combining mapping).
    fn note_non_coherent_write(&mut self, _mfn: Mfn) {}
    /// A monotonic clock in nanoseconds (Xen: `NOW()`), read only while
    /// the stats' timing is on. 0 where there is none.
    fn now_ns(&self) -> u64 {
        0
    }
    /// A point in the engine's own code where another CPU may act between
    /// two steps that make no host call between them: a test host acts
    /// there ([`RacePoint`]). Simulated builds only; nothing on Xen.
    #[cfg(feature = "sim")]
    fn race_point(&mut self, _at: RacePoint) {}
}

/// Where [`Platform::race_point`] is called.
#[cfg(feature = "sim")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RacePoint {
    /// `SET_LIMITS`, after its last check that the domid's life is the
    /// checked one, before its quota is stored.
    BeforeQuotaStore,
}

/// [`Platform::get_pages`] by [`Platform::get_page`], a page at a time:
/// the default, for a host with nothing faster.
pub fn get_pages_one_by_one<P: Platform + ?Sized>(
    host: &mut P,
    domid: DomId,
    want_write: bool,
    pages: &mut [PageSlot],
    target: CheckedTarget<'_>,
) -> PageRun {
    for (i, slot) in pages.iter_mut().enumerate() {
        let stop = |refused| PageRun { taken: i, refused };
        match host.get_page(domid, slot.gfn(), want_write, target) {
            Ok(PageLookup {
                kind: PageKind::RamRw,
                mfn: Some(mfn),
            }) => slot.take(mfn),
            Ok(PageLookup {
                kind: PageKind::RamRo,
                mfn: Some(mfn),
            }) if !want_write => slot.take(mfn),
            // Referenced, but not as a run's page (a host breaking
            // `get_page`'s contract): given back with no answer, and the
            // caller's own lookup decides (a kind `check_page` passes would
            // map there, so an answer could not say what that lookup will).
            Ok(PageLookup { mfn: Some(mfn), .. }) => {
                host.put_page(mfn, want_write);
                return stop(None);
            }
            Ok(PageLookup { kind, mfn: None }) => return stop(Some(kind)),
            // (No such domain, dying, or not the one checked: nothing was
            // looked up.)
            Err(_) => return stop(None),
        }
    }
    PageRun {
        taken: pages.len(),
        refused: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's errno the ABI names is that errno; anything else is the
    /// host's failure (`EIO` since ABI 1.7; it was `EINVAL`, the caller's
    /// argument), and no positive value reads as a success.
    #[test]
    fn a_host_errno_the_abi_lacks_is_the_hosts_failure() {
        assert_eq!(host_errno(-12), Errno::NoMem);
        assert_eq!(host_errno(-16), Errno::Busy);
        assert_eq!(host_errno(-1), Errno::Perm);
        for rc in [-110, -5, -9999, i32::MIN, 0, 1, i32::MAX] {
            assert_eq!(host_errno(rc), Errno::Io, "{rc}");
        }
    }
}
