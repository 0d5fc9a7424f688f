//! Host RAM, domains and the platform/IOMMU services the engine calls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use crate::iommu::{
    BackendCaps, DeviceFacts, FlushGather, HwContext, IommuBackend, OwnTables, TableFormat,
};
use crate::pgtable::sync::{DirtyLines, LINE_BYTES};
use crate::pgtable::{
    clear_entries_one_by_one, lpae::Lpae, vtd::Vtd, Entry, IoPageTable, PageTableFormat,
    TableMemory, TableOptions,
};
use crate::platform::{
    CheckedTarget, DomainInfo, PageKind, PageLookup, PageRun, PageSlot, Platform, ReservedRange,
    XsmAction,
};
use crate::sim::hardware::{self, DmaFault, Iotlb};
use crate::sim::p2m::P2m;
use crate::sim::HostAllocations;
use crate::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions, Sbdf};
use pviommu_abi::{feature, region_kind};

/// Who owns a machine frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Owner {
    /// Unallocated.
    Free,
    /// The hypervisor (page tables, its own data).
    Xen,
    /// A domain.
    Domain(DomId),
}

/// Per-frame metadata, as Xen's `struct page_info`.
#[derive(Clone, Debug)]
pub struct FrameInfo {
    /// Owner.
    pub owner: Owner,
    /// General references held by others (mappings).
    pub refs: u32,
    /// Writable type references.
    pub writable_refs: u32,
    /// A device may have written it without snooping: its cache lines must
    /// be flushed before it is freed or used as anything but writable
    /// memory (Xen's `_PGT_non_coherent`).
    pub non_coherent: bool,
    /// Taken out of service while its owner may still hold it: Xen's
    /// `PGC_broken` (a memory error) or `PGC_state_offlining`. No new
    /// device access is given to it (the glue's `pvx_accept_page()`); once
    /// freed it is never handed out again (Xen offlines it).
    pub retired: bool,
}

/// IOMMU page-table format of the simulated IOMMU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// Intel VT-d second-level.
    Vtd,
    /// ARM LPAE stage-2.
    Lpae,
}

/// What a new domain looks like.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    /// RAM pages (gfn 0..pages).
    pub pages: u64,
    /// Privileged (control domain).
    pub privileged: bool,
    /// The guest this domain is the device model of: Xen's `d->target`,
    /// which lives on the device model and points at the guest.
    pub device_model_of: Option<DomId>,
}

/// How a call the simulator makes as a guest's hypercall would (one
/// entry of it) ends short of done.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallEnd {
    /// It continues (Xen: `-ERESTART`, a continuation): call again.
    Continues,
    /// The IOMMU kept refusing what the call needed undone (Xen: `-EIO`):
    /// nothing moved.
    GaveUp,
}

#[derive(Clone, Copy, Debug)]
enum P2mEntry {
    Ram { mfn: Mfn, read_only: bool },
    Mmio,
    PagedOut,
    Grant,
    Xen,
}

/// What a page lookup for `want_write` finds at `entry` (Xen's glue:
/// `pvx_lookup_page` and `pvx_accept_page`), and the frame it references:
/// RAM, read-only RAM only for a read-only map, no writable map while the
/// domain is in log-dirty mode. Paged-out pages reference nothing (the
/// lookup's paging in is `look_up_page`'s: `get_page`'s, and that of the
/// page a run stops at). The one rule of `get_page` and `get_pages`.
fn classify_entry(
    ram: &Ram,
    entry: Option<&P2mEntry>,
    want_write: bool,
    log_dirty: bool,
) -> (PageKind, Option<Mfn>) {
    // Log-dirty first, whatever the gfn holds, as the glue's
    // pvx_lookup_page() refuses before it looks the p2m up (no paging-in,
    // no populate, no unshare for a write it refuses anyway).
    if log_dirty && want_write {
        return (PageKind::LogDirty, None);
    }
    match entry {
        None => (PageKind::NotPresent, None),
        Some(P2mEntry::Mmio) => (PageKind::Mmio, None),
        Some(P2mEntry::PagedOut) => (PageKind::PagedOut, None),
        Some(P2mEntry::Grant) => (PageKind::Grant, None),
        Some(P2mEntry::Xen) => (PageKind::XenOwned, None),
        // A frame taken out of service: not present (the glue's
        // `pvx_accept_page()`, after the type).
        Some(&P2mEntry::Ram { mfn, .. }) if ram.is_retired(mfn) => (PageKind::NotPresent, None),
        Some(&P2mEntry::Ram {
            mfn,
            read_only: true,
        }) => (PageKind::RamRo, (!want_write).then_some(mfn)),
        Some(&P2mEntry::Ram {
            mfn,
            read_only: false,
        }) => (PageKind::RamRw, Some(mfn)),
    }
}

#[derive(Debug)]
struct Domain {
    p2m: P2m<P2mEntry>,
    /// RAM pages it was created with (gfn 0..ram_pages).
    ram_pages: u64,
    privileged: bool,
    /// Xen's `d->target`: set on a device model (stub domain), naming the
    /// guest it serves.
    target: Option<DomId>,
    dying: bool,
    /// A `pviommu_abi::translation` code for this domain's IOMMU context.
    translation: u32,
    log_dirty: bool,
    /// VRAM dirty tracking's range `[first, last)` (its gfns are of the
    /// logdirty type: device-read-only), and the revocation in progress
    /// before it moves (patch 0002b's `struct domain` fields).
    vram: (u64, u64),
    vram_sweep: crate::engine::RangeSweep,
    /// The gfns of the VRAM range that tracking turned from rw to its
    /// logdirty type: the only ones a move of the range makes rw again
    /// (Xen's `hap_track_dirty_vram` changes p2m_ram_logdirty back to
    /// p2m_ram_rw; a p2m_ram_ro page of the range stays read-only).
    vram_logdirty: BTreeSet<u64>,
    /// A FLASK-like policy refusal for this domain as a caller.
    xsm_denied: bool,
    /// Actions a FLASK-like policy refuses this domain (the others pass),
    /// each on any target or (`true`) only without one (host-wide).
    xsm_denied_actions: Vec<(XsmAction, bool)>,
    /// A FLASK-like label no other domain may act on: every action with
    /// this domain as its target is refused (a label belongs to the domain,
    /// not its domid: one created later at the same domid starts without).
    xsm_protected: bool,
    /// A PV guest (Xen: a domain without `paging_mode_translate`): what it
    /// and its device model call a gfn is a machine frame, and a lookup of
    /// one is a check of that frame ([`classify_pv_frame`]). Its p2m here
    /// still lists its frames (Xen's M2P), for tests to learn them.
    pv: bool,
    /// Frames of a PV guest typed as page tables or descriptor tables
    /// (pinned): Xen's `get_page_type(PGT_writable_page)` fails on them, so
    /// a device never gets to write one.
    pv_typed: BTreeSet<u64>,
    /// Frames Xen shares with a PV guest (Xen's heap, the guest their
    /// owner: its shared_info, its grant-table frames), not its RAM.
    pv_xen_shared: BTreeSet<u64>,
}

impl Domain {
    /// VRAM tracking leaves its range (it moves, or stops): the pages it
    /// made logdirty are rw again, and only those (Xen's
    /// `hap_track_dirty_vram` turns p2m_ram_logdirty back to p2m_ram_rw).
    fn end_vram_logdirty(&mut self) {
        for g in core::mem::take(&mut self.vram_logdirty) {
            if let Some(P2mEntry::Ram { read_only, .. }) = self.p2m.get_mut(&Gfn(g)) {
                *read_only = false;
            }
        }
    }
}

/// The simulated domains by domid. Ids below [`DENSE_DOMIDS`] (those of
/// every domain the tests, benches and the demo create, but the reserved
/// ids) sit in a flat table indexed by id, the others in an ordered map:
/// the page runs, the permission checks and the guest copies look a
/// domain up each call, and the index costs a few instructions where the
/// map's search cost about twenty-five (Xen's `rcu_lock_domain_by_id()`
/// walks a hash bucket, not a tree). Never iterated: no order to keep.
struct DomainTable<D> {
    /// Domids `0..dense.len()`, grown as domains are created there.
    dense: Vec<Option<D>>,
    /// Domids from [`DENSE_DOMIDS`] up.
    sparse: BTreeMap<DomId, D>,
}

/// Domids [`DomainTable`] keeps in its flat table.
const DENSE_DOMIDS: usize = 256;

impl<D> DomainTable<D> {
    fn new() -> Self {
        DomainTable {
            dense: Vec::new(),
            sparse: BTreeMap::new(),
        }
    }
    /// Where `domid` is in the flat table, if it belongs there.
    #[inline]
    fn dense_index(domid: DomId) -> Option<usize> {
        let i = usize::from(domid.0);
        (i < DENSE_DOMIDS).then_some(i)
    }
    #[inline]
    fn get(&self, domid: &DomId) -> Option<&D> {
        match Self::dense_index(*domid) {
            Some(i) => self.dense.get(i)?.as_ref(),
            None => self.sparse.get(domid),
        }
    }
    #[inline]
    fn get_mut(&mut self, domid: &DomId) -> Option<&mut D> {
        match Self::dense_index(*domid) {
            Some(i) => self.dense.get_mut(i)?.as_mut(),
            None => self.sparse.get_mut(domid),
        }
    }
    fn contains_key(&self, domid: &DomId) -> bool {
        self.get(domid).is_some()
    }
    /// Set `domid`'s domain; the one it replaces.
    fn insert(&mut self, domid: DomId, d: D) -> Option<D> {
        match Self::dense_index(domid) {
            Some(i) => {
                if self.dense.len() <= i {
                    self.dense.resize_with(i + 1, || None);
                }
                self.dense[i].replace(d)
            }
            None => self.sparse.insert(domid, d),
        }
    }
    /// Take `domid`'s domain out.
    fn remove(&mut self, domid: &DomId) -> Option<D> {
        match Self::dense_index(*domid) {
            Some(i) => self.dense.get_mut(i)?.take(),
            None => self.sparse.remove(domid),
        }
    }
}

/// Take the frames `classify` gives the first `limit` of `pages`, up to
/// the first it refuses, each referenced as it is taken (with `writable`
/// its writable type too): the refused one's index and gfn, if any. (A
/// reference changes nothing `classify` reads: taken here or after the
/// run, the run and the counts come out the same.)
#[inline(always)]
fn take_until_refused(
    ram: &mut Ram,
    pages: &mut [PageSlot],
    limit: usize,
    writable: bool,
    classify: impl Fn(&Ram, Gfn) -> (PageKind, Option<Mfn>),
) -> Option<(usize, Gfn)> {
    for (i, slot) in pages.iter_mut().enumerate().take(limit) {
        match classify(ram, slot.gfn()) {
            (_, Some(mfn)) => {
                slot.take(mfn);
                ram.reference(mfn, writable);
            }
            (_, None) => return Some((i, slot.gfn())),
        }
    }
    None
}

/// [`take_until_refused`] for a guest with a p2m (not PV) by the rule
/// [`classify_entry`] follows: the frame of a page the guest's RAM holds
/// as it is asked for (most pages), whose metadata the retired check and
/// the reference then look up once, taken here; any other page (refused,
/// or a frame past the RAM) as `take_until_refused` takes it.
#[inline(always)]
fn take_ram_until_refused(
    ram: &mut Ram,
    d: &Domain,
    pages: &mut [PageSlot],
    limit: usize,
    want_write: bool,
) -> Option<(usize, Gfn)> {
    // (A VRAM range being revoked is refused writes as log-dirty is.)
    let sweeping = want_write && !d.vram_sweep.is_idle();
    // Most runs have no page refused for log-dirty: a read (the rule asks
    // log-dirty only of a write), or a write with neither log-dirty mode
    // nor a VRAM range being revoked. Their loop asks it of no page, and
    // knows whether it writes: a loop each, with the same answers.
    match (want_write, d.log_dirty || sweeping) {
        (false, _) => take_ram_pages(ram, d, pages, limit, false, |_| false),
        (true, false) => take_ram_pages(ram, d, pages, limit, true, |_| false),
        (true, true) => take_ram_pages(ram, d, pages, limit, true, |gfn: Gfn| {
            d.log_dirty || (sweeping && d.vram_sweep.freezes_writes_to(gfn.0))
        }),
    }
}

/// [`take_ram_until_refused`]'s loop, with `log_dirty(gfn)` whether the
/// domain's log-dirty mode (or a VRAM range being revoked) refuses a write
/// of `gfn`.
#[inline(always)]
fn take_ram_pages(
    ram: &mut Ram,
    d: &Domain,
    pages: &mut [PageSlot],
    limit: usize,
    want_write: bool,
    log_dirty: impl Fn(Gfn) -> bool,
) -> Option<(usize, Gfn)> {
    // (The run's first `limit` pages, as `take(limit)` took them.)
    let n = limit.min(pages.len());
    for (i, slot) in pages[..n].iter_mut().enumerate() {
        let gfn = slot.gfn();
        let log_dirty = log_dirty(gfn);
        // `classify_entry`'s answer where it gives the frame: no write
        // refused for log-dirty, RAM (read-only only for a read), the
        // frame not retired. (The flat p2m's slot matched whole: one test
        // of it; a gfn past the flat table takes the full rule below.)
        if let (false, Some(&Some(P2mEntry::Ram { mfn, read_only }))) =
            (log_dirty && want_write, d.p2m.dense_slot(gfn))
        {
            if let Some(info) = ram.info.get_mut(mfn.0 as usize) {
                if !(info.retired || (read_only && want_write)) {
                    slot.take(mfn);
                    // (`Ram::reference`.)
                    info.refs += 1;
                    if want_write {
                        info.writable_refs += 1;
                    }
                    continue;
                }
            }
        }
        match classify_entry(ram, d.p2m.get(&gfn), want_write, log_dirty) {
            (_, Some(mfn)) => {
                slot.take(mfn);
                ram.reference(mfn, want_write);
            }
            (_, None) => return Some((i, gfn)),
        }
    }
    None
}

/// What a page lookup of PV guest `domid`'s "gfn" `frame` finds (Xen's
/// glue: `pvx_lookup_page()`, whose `get_page_from_gfn()` is a frame
/// check for a domain without `paging_mode_translate`, then
/// `pvx_accept_page()`). Write access is refused in log-dirty mode (asked
/// first, as the glue asks) and to a frame typed as a page table. A frame
/// that is not the guest's own RAM (Xen's, one Xen shares with the guest,
/// another domain's, free, or no frame at all) is not present in it, and
/// all of those answer alike: which machine frames exist, and whose, is
/// not a device model's to learn.
fn classify_pv_frame(
    ram: &Ram,
    domid: DomId,
    d: &Domain,
    frame: u64,
    want_write: bool,
) -> (PageKind, Option<Mfn>) {
    if want_write && d.log_dirty {
        return (PageKind::LogDirty, None);
    }
    let own = usize::try_from(frame)
        .ok()
        .and_then(|i| ram.info.get(i))
        .is_some_and(|f| f.owner == Owner::Domain(domid))
        && ram.is_present(Mfn(frame))
        && !d.pv_xen_shared.contains(&frame)
        && !ram.is_retired(Mfn(frame));
    if !own {
        return (PageKind::NotPresent, None);
    }
    if want_write && d.pv_typed.contains(&frame) {
        return (PageKind::RamRo, None);
    }
    (PageKind::RamRw, Some(Mfn(frame)))
}

/// A driver domain's default context: the host's own tables (Xen's).
enum Context {
    Vtd(IoPageTable<Vtd>),
    Lpae(IoPageTable<Lpae>),
}

/// `$body` with `$t` bound to a default context's tables, whichever their
/// format.
macro_rules! either_format {
    ($context:expr, $t:ident => $body:expr) => {
        match $context {
            Context::Vtd($t) => $body,
            Context::Lpae($t) => $body,
        }
    };
}

impl Context {
    /// Clear page `bfn` (`NoEnt` if nothing maps it), whichever the format.
    fn unmap(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        either_format!(self, t => t.unmap(mem, bfn))
    }
    /// See [`IoPageTable::level2_entry`].
    fn level2_entry(&self, mem: &impl TableMemory, bfn: Bfn) -> Entry {
        either_format!(self, t => t.level2_entry(mem, bfn))
    }
    /// See [`IoPageTable::queued_tables_marker`].
    fn queued_tables_marker(&self) -> (Option<Mfn>, usize) {
        either_format!(self, t => t.queued_tables_marker())
    }
    /// [`unlinked_between`] `before` and the tables' marker now.
    fn unlinked_since(&self, before: (Option<Mfn>, usize)) -> u32 {
        unlinked_between(before, self.queued_tables_marker())
    }
}

/// The [`flushf`] flags Xen's driver adds for a call that unlinked a
/// table (folded it into a superpage, or emptied it), queueing it to be
/// freed: `MODIFIED | ALL` if a table was queued between the two
/// [`queued_tables_marker`](IoPageTable::queued_tables_marker)s, else none.
#[inline]
fn unlinked_between(before: (Option<Mfn>, usize), after: (Option<Mfn>, usize)) -> u32 {
    if after != before {
        flushf::MODIFIED | flushf::ALL
    } else {
        0
    }
}

/// Xen's `IOMMU_FLUSHF_*` (xen/include/xen/iommu.h): what a call into the
/// IOMMU driver changed, accumulated by the driver into the caller's flags
/// and passed to `iommu_iotlb_flush()`, which decides from them what to
/// invalidate. The simulator's default contexts set and read them as Xen
/// 4.17's VT-d code does, so an engine that lost a flag shows a stale
/// translation here as it would on Xen.
pub mod flushf {
    /// A new present entry was written (`IOMMU_FLUSHF_added`).
    pub const ADDED: u32 = 1 << 0;
    /// A present entry was changed or cleared (`IOMMU_FLUSHF_modified`).
    pub const MODIFIED: u32 = 1 << 1;
    /// A table was unlinked and queued to be freed: flush everything
    /// (`IOMMU_FLUSHF_all`).
    pub const ALL: u32 = 1 << 2;
}

/// One of the engine's contexts as the IOMMU knows it: a tag and the
/// tables a device attached to it walks.
#[derive(Clone, Copy, Debug)]
struct HwCtx {
    owner: DomId,
    ctx: ContextId,
    root: Mfn,
}

/// A page the IOTLB still translates other than the tables do
/// ([`SimMachine::stale_iotlb_pages`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StaleTranslation {
    /// The context's owner.
    pub owner: DomId,
    /// The context.
    pub context: ContextId,
    /// The page's BFN.
    pub bfn: Bfn,
    /// The frame the IOTLB reaches there.
    pub mfn: Mfn,
    /// The IOTLB lets the device read it.
    pub read: bool,
    /// The IOTLB lets the device write it.
    pub write: bool,
}

impl StaleTranslation {
    /// Whether a page held as `mfn` with `perms` (an unmapped mapping still
    /// waiting for its flush) covers what the device reaches here: the same
    /// frame, and at least the device's access.
    pub fn held_as(&self, mfn: Mfn, perms: Permissions) -> bool {
        mfn == self.mfn && (perms.read || !self.read) && (perms.write || !self.write)
    }
}

/// A PCI device behind the simulated IOMMU.
#[derive(Clone, Copy, Debug)]
pub struct SimDevice {
    /// Assignment and what it allows (owner, requester id, RMRR, ATS).
    pub facts: DeviceFacts,
    /// The engine's context it walks (its tag); `None`: its owner's
    /// default context.
    pub attached: Option<HwContext>,
    /// Its context entry was cleared (a failed detach): DMA is blocked.
    pub blocked: bool,
    /// Xen turned its bus mastering off (`pci_check_disable_device()`,
    /// [`hardware::PT_FAULT_THRESHOLD`] faults close together): its DMA
    /// reaches nothing until its owner's driver turns it on again
    /// ([`SimMachine::set_bus_master`]).
    pub bus_master_off: bool,
    /// Xen's `pdev->fault.count`: faults counted against the device, halved
    /// after a gap of more than [`hardware::FAULT_DECAY_NS`].
    pub fault_count: u32,
    /// Xen's `pdev->fault.time`: when the last one was counted (the
    /// machine's DMA clock, [`SimMachine::dma_clock_ns`]).
    pub fault_time_ns: u64,
}

/// RAM frames and their metadata: the [`TableMemory`] the IOMMU tables live in.
/// Frame memory is reserved up front (zero pages from the OS until
/// touched), so allocating a frame never allocates host memory: an
/// allocation-failure test can fail the engine's allocations without the
/// simulated hardware aborting.
pub struct Ram {
    /// Each frame's bytes (a frame a step: one bounds check a look-up).
    bytes: Vec<[u8; 4096]>,
    /// Each frame's [`FrameBits`]: allocated, an unlinked table.
    frame_bits: FrameBits,
    info: Vec<FrameInfo>,
    free: VecDeque<Mfn>,
    /// Table allocations left before they fail (failure injection).
    pub(super) table_allocs_left: Option<u64>,
    /// Table frames unlinked from their parent since the last IOTLB flush:
    /// the IOMMU may still hold them in its paging-structure caches, so
    /// freeing one (and reusing it) before the flush lets a device walk a
    /// frame that is no longer a table.
    /// Each such frame with the root frame of the tree it hung in: only a
    /// flush of that context forgets it.
    unlinked_tables: UnlinkedTables,
    /// The table and entry each linked table frame hangs from (child ->
    /// (parent, index)), to find the tree an unlinked one hung in and the
    /// BFNs it translated.
    table_parent: BTreeMap<u64, (u64, usize)>,
    /// Tables freed, or made tables again, while still possibly cached
    /// (see `unlinked_tables`).
    pub(super) tables_freed_before_flush: u64,
    /// Tables given back to the host while memory (a non-coherent IOMMU's
    /// view) still held a present entry the CPU had cleared: machine frame
    /// numbers left in a frame that goes to its next owner (Xen's scrub of
    /// a debug build writes through the cache, so memory keeps them until
    /// the lines are evicted, for a device reading without snooping).
    pub(super) tables_freed_stale: u64,
    /// Present entries written into, or cleared in, a table while still
    /// possibly cached and not linked back where it hung (see
    /// `unlinked_tables`): a device walking it through the IOMMU's stale
    /// paging-structure caches would see the change before the flush (a
    /// fault where a mapping still stands, or a page another BFN maps).
    pub(super) unlinked_tables_rewritten: u64,
    /// Table frames linked (an entry made to point at them) while their
    /// memory, not yet written back, still held a present entry the CPU
    /// had cleared: the link may reach memory first (a cache line evicted
    /// early), and a device walking it then reaches what the stale entry
    /// maps. A table is written back whole before it is linked
    /// (`write_back_table`) unless all its stores since were clears of
    /// lines written back already.
    pub(super) tables_linked_over_stale_entries: u64,
    /// Pages whose cache lines were flushed because a device may have
    /// written them without snooping.
    pub(super) cache_flushes: u64,
    /// The IOMMU does not snoop the CPU caches when it walks tables (VT-d
    /// ECAP.C = 0, QEMU's intel-iommu): it reads table memory only as
    /// written back ([`Ram::sync_tables`]).
    pub(super) non_coherent_tables: bool,
    /// Table cache lines stored to and not yet written back, as memory
    /// still holds them: (frame, line) -> the line's bytes in memory. The
    /// simulated IOMMU walks these; the CPU sees `bytes`.
    stale_lines: BTreeMap<(u64, usize), [u8; LINE_BYTES]>,
    /// Which lines to write back: the same bookkeeping Xen's backend keeps.
    dirty: DirtyLines,
    /// Table cache lines written back.
    pub(super) lines_synced: u64,
    /// Lines written back, clean or not, while table walks are not
    /// coherent: what a non-coherent host pays (Xen writes back every line
    /// asked for, `clflush` each).
    line_writebacks: u64,
    /// Table frames allocated (each zeroed and written back whole).
    tables_allocated: u64,
    /// Table frames given back to the host.
    tables_freed: u64,
}

/// Whether a raw table entry is present, in either format (VT-d: R or W;
/// LPAE: valid, with bit 1 the table/page bit beside it).
#[inline]
fn entry_present(raw: u64) -> bool {
    raw & 3 != 0
}

/// A root no flush names (see [`UnlinkedTables::insert`]).
const NO_ROOT: u64 = u64::MAX;

/// Where an unlinked table frame hung (see `Ram::unlinked_tables`).
#[derive(Clone, Copy, Debug)]
struct Unlinked {
    /// The root frame of the tree: only a flush of that context forgets it.
    root: u64,
    /// The table and entry that pointed at it.
    parent: u64,
    index: usize,
    /// The BFNs it translated (first, last): only a flush of a range that
    /// meets them forgets it (a page-selective invalidation empties the
    /// paging-structure caches used for its range, VT-d's PSI with IH=0 or
    /// an SMMU's TLBI by address; it may do more, never less).
    first: u64,
    last: u64,
}

/// What a table store or read asks of a frame: whether it is allocated
/// ([`FrameBits::PRESENT`]), whether it is an unlinked table
/// ([`FrameBits::UNLINKED`], kept beside [`UnlinkedTables`]' map), and its
/// present entries when Xen owns it as a table. Together, a store's
/// questions about its table and the count it sets cost one index and one
/// bounds check.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
struct FrameState {
    /// [`FrameBits::PRESENT`], [`FrameBits::UNLINKED`].
    bits: u8,
    /// Page-table bookkeeping (present entries) when Xen owns it as a table.
    pt_count: u16,
}

/// Each frame's [`FrameState`].
#[derive(Clone, PartialEq, Debug)]
struct FrameBits(Vec<FrameState>);

impl FrameBits {
    /// The frame is allocated (its bytes are readable).
    const PRESENT: u8 = 1;
    /// The frame is in [`UnlinkedTables`]' map.
    const UNLINKED: u8 = 2;

    fn new(frames: u64) -> Self {
        FrameBits(vec![FrameState::default(); frames as usize])
    }
    /// `frame`'s bits, if the RAM has the frame.
    #[inline]
    fn get(&self, frame: u64) -> Option<u8> {
        usize::try_from(frame)
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|s| s.bits)
    }
    /// Whether `frame` is allocated (`false` past the RAM).
    #[inline]
    fn present(&self, frame: u64) -> bool {
        self.get(frame).is_some_and(|b| b & Self::PRESENT != 0)
    }
    /// Set or clear `bit` of `frame`, if the RAM has the frame.
    #[inline]
    fn set(&mut self, frame: u64, bit: u8, on: bool) {
        if let Some(s) = usize::try_from(frame).ok().and_then(|i| self.0.get_mut(i)) {
            s.bits = if on { s.bits | bit } else { s.bits & !bit };
        }
    }
}

/// The unlinked table frames (see `Ram::unlinked_tables`), with a flag per
/// frame beside the map ([`FrameBits::UNLINKED`]): the question every
/// table store asks, "is this table unlinked?", costs an index, not a tree
/// search. (With the map alone, a host whose unlinked set never empties,
/// the reference design's, which makes no flush, paid about 86
/// instructions a page more for the same stores.) The methods that change
/// the map take the frames' bits to keep the flags with it.
struct UnlinkedTables {
    map: BTreeMap<u64, Unlinked>,
}

impl UnlinkedTables {
    fn new() -> Self {
        UnlinkedTables {
            map: BTreeMap::new(),
        }
    }
    #[inline]
    fn contains(&self, bits: &FrameBits, frame: u64) -> bool {
        match bits.get(frame) {
            Some(b) => b & FrameBits::UNLINKED != 0,
            // (No table frame is past the RAM; the map answers all the same.)
            None => self.map.contains_key(&frame),
        }
    }
    /// `frame` is unlinked from where `u` says. A frame unlinked again
    /// from another place before a flush forgot it (linked elsewhere
    /// meanwhile, which `reuse_table` counts already) may be cached at both
    /// places: no flush forgets it then, nor a link back at either place
    /// (only its free, counted). Stricter than a host, never less.
    fn insert(&mut self, bits: &mut FrameBits, frame: u64, mut u: Unlinked) {
        if let Some(was) = self.map.get(&frame) {
            if (was.root, was.parent, was.index) != (u.root, u.parent, u.index) {
                u.root = NO_ROOT;
            }
        }
        self.map.insert(frame, u);
        bits.set(frame, FrameBits::UNLINKED, true);
    }
    fn remove(&mut self, bits: &mut FrameBits, frame: u64) -> Option<Unlinked> {
        let u = self.map.remove(&frame)?;
        bits.set(frame, FrameBits::UNLINKED, false);
        Some(u)
    }
    fn get(&self, frame: u64) -> Option<&Unlinked> {
        self.map.get(&frame)
    }
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Keep only the tables `keep` says to.
    fn retain(&mut self, bits: &mut FrameBits, mut keep: impl FnMut(&Unlinked) -> bool) {
        self.map.retain(|frame, u| {
            let kept = keep(u);
            if !kept {
                bits.set(*frame, FrameBits::UNLINKED, false);
            }
            kept
        });
    }
}

/// `frames` zeroed frames, from zeroed memory (`vec!` writes zeros into
/// an array element this large, touching every page of the RAM up front).
/// A failed allocation ends the process, as `vec!`'s does.
fn zeroed_frames(frames: usize) -> Vec<[u8; 4096]> {
    use zerocopy::FromZeros;
    <[u8; 4096]>::new_vec_zeroed(frames).unwrap_or_else(|_| {
        let layout = core::alloc::Layout::array::<[u8; 4096]>(frames)
            .unwrap_or(core::alloc::Layout::new::<[u8; 4096]>());
        std::alloc::handle_alloc_error(layout)
    })
}

impl Ram {
    /// A page lookup's references on `mfn`: the page's, and with
    /// `writable` its writable type's (`get_page`, each page of
    /// `get_pages`; `put_page` drops them).
    fn reference(&mut self, mfn: Mfn, writable: bool) {
        if let Some(info) = self.info.get_mut(mfn.0 as usize) {
            info.refs += 1;
            if writable {
                info.writable_refs += 1;
            }
        }
    }
    fn new(frames: u64) -> Ram {
        Ram {
            bytes: zeroed_frames(frames as usize),
            frame_bits: FrameBits::new(frames),
            info: (0..frames)
                .map(|_| FrameInfo {
                    owner: Owner::Free,
                    refs: 0,
                    writable_refs: 0,
                    non_coherent: false,
                    retired: false,
                })
                .collect(),
            free: (0..frames).map(Mfn).collect(),
            table_allocs_left: None,
            unlinked_tables: UnlinkedTables::new(),
            table_parent: Default::default(),
            tables_freed_before_flush: 0,
            tables_freed_stale: 0,
            unlinked_tables_rewritten: 0,
            tables_linked_over_stale_entries: 0,
            cache_flushes: 0,
            non_coherent_tables: true,
            stale_lines: BTreeMap::new(),
            dirty: DirtyLines::new(),
            lines_synced: 0,
            line_writebacks: 0,
            tables_allocated: 0,
            tables_freed: 0,
        }
    }
    fn alloc(&mut self, owner: Owner) -> Result<Mfn, Errno> {
        let mfn = self.free.pop_front().ok_or(Errno::NoMem)?;
        self.take(mfn, owner);
        Ok(mfn)
    }
    /// The first free run of `n` frames (a power of two) whose first is a
    /// multiple of `n`, allocated to `owner`: what Xen's buddy allocator
    /// gives an order-9 request. `NoMem` where no such run is free.
    fn alloc_aligned(&mut self, owner: Owner, n: u64) -> Result<Mfn, Errno> {
        let free = |info: &[FrameInfo], first: u64| {
            (first..first + n).all(|f| info.get(f as usize).is_some_and(|i| i.owner == Owner::Free))
        };
        let first = (0..self.info.len() as u64)
            .step_by(n as usize)
            .find(|&f| free(&self.info, f))
            .ok_or(Errno::NoMem)?;
        self.free.retain(|m| !(first..first + n).contains(&m.0));
        for f in first..first + n {
            self.take(Mfn(f), owner);
        }
        Ok(Mfn(first))
    }
    /// Free frame `mfn` becomes `owner`'s, zeroed.
    fn take(&mut self, mfn: Mfn, owner: Owner) {
        let i = mfn.0 as usize;
        self.frame_bits.set(mfn.0, FrameBits::PRESENT, true);
        self.bytes[i].fill(0);
        self.info[i].owner = owner;
        self.frame_bits.0[i].pt_count = 0;
    }
    fn release(&mut self, mfn: Mfn) {
        let i = mfn.0 as usize;
        if self.info[i].non_coherent {
            // Xen's free path flushes the page's cache lines here.
            self.info[i].non_coherent = false;
            self.cache_flushes += 1;
        }
        self.frame_bits.set(mfn.0, FrameBits::PRESENT, false);
        self.info[i].owner = Owner::Free;
        // A retired frame is offlined once free: never allocated again.
        if !self.info[i].retired {
            self.free.push_back(mfn);
        }
    }
    /// Whether frame `mfn` was taken out of service ([`FrameInfo::retired`]).
    fn is_retired(&self, mfn: Mfn) -> bool {
        usize::try_from(mfn.0)
            .ok()
            .and_then(|i| self.info.get(i))
            .is_some_and(|f| f.retired)
    }
    /// The bytes of a frame (`None` for an unallocated one).
    #[inline]
    pub fn frame(&self, mfn: Mfn) -> Option<&[u8; 4096]> {
        let i = usize::try_from(mfn.0).ok()?;
        if !self.frame_bits.present(mfn.0) {
            return None;
        }
        self.bytes.get(i)
    }
    fn frame_mut(&mut self, mfn: Mfn) -> Option<&mut [u8; 4096]> {
        Self::frame_in(&self.frame_bits, &mut self.bytes, mfn)
    }
    /// [`frame_mut`](Self::frame_mut) from the fields it reads, for a
    /// caller that holds other fields of the RAM at the same time.
    #[inline]
    fn frame_in<'a>(
        frame_bits: &FrameBits,
        bytes: &'a mut [[u8; 4096]],
        mfn: Mfn,
    ) -> Option<&'a mut [u8; 4096]> {
        let i = usize::try_from(mfn.0).ok()?;
        if !frame_bits.present(mfn.0) {
            return None;
        }
        bytes.get_mut(i)
    }
    fn is_present(&self, mfn: Mfn) -> bool {
        self.frame_bits.present(mfn.0)
    }
    /// Read a 64-bit little-endian word at byte offset `off` of a frame.
    #[inline]
    pub fn read_u64(&self, mfn: Mfn, off: usize) -> u64 {
        match self.frame(mfn) {
            Some(f) => u64::from_le_bytes(f[off..off + 8].try_into().unwrap_or([0; 8])),
            None => 0,
        }
    }
    /// [`read_entry_and_count`](TableMemory::read_entry_and_count)'s
    /// answer. Apart from the trait's method so that the machine's own
    /// tables' reads take it inline wherever they are, and Xen's own
    /// tables' reads ([`WriteThrough`]) as the compiler sees fit.
    #[inline(always)]
    fn entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        let state = self.frame_bits.0[table.0 as usize];
        let entry = match self.bytes.get(table.0 as usize) {
            Some(f) if state.bits & FrameBits::PRESENT != 0 => {
                u64::from_le_bytes(f[index * 8..index * 8 + 8].try_into().unwrap_or([0; 8]))
            }
            _ => 0,
        };
        (entry, state.pt_count)
    }
    /// The word at `off` of a table frame as a table walk by the IOMMU
    /// reads it: from memory, where a store not yet written back is not.
    pub fn device_read_u64(&self, mfn: Mfn, off: usize) -> u64 {
        let line = off / LINE_BYTES;
        match self.stale_lines.get(&(mfn.0, line)) {
            Some(bytes) => {
                let o = off % LINE_BYTES;
                u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]))
            }
            None => self.read_u64(mfn, off),
        }
    }
    /// Whether memory still holds a present entry of `table` that the
    /// CPU's stores have not replaced there yet (a line not written back).
    fn holds_stale_present_entry(&self, table: u64) -> bool {
        self.stale_lines
            .range((table, 0)..=(table, usize::MAX))
            .any(|(_, bytes)| {
                bytes
                    .chunks_exact(8)
                    .any(|e| entry_present(u64::from_le_bytes(e.try_into().unwrap_or([0; 8]))))
            })
    }
    /// Write back the lines of `table` in the bitmap `lines` (Xen:
    /// `iommu_sync_cache` on each).
    fn sync_lines(&mut self, table: Mfn, lines: u64) {
        if self.non_coherent_tables {
            self.line_writebacks += u64::from(lines.count_ones());
        }
        self.lines_synced += self.drop_stale_lines(table.0, lines);
    }
    /// Forget the lines of `table` in the bitmap `lines` that memory holds
    /// stale: how many there were. Only those there are looked up, from a
    /// range of the map (none, most often: one look-up), not each of the
    /// 64 lines. (A table's lines are 0..64: `index * 8 / LINE_BYTES`.)
    fn drop_stale_lines(&mut self, table: u64, lines: u64) -> u64 {
        const LINES: usize = 4096 / LINE_BYTES;
        let mut dropped = 0;
        let mut from = 0;
        while let Some(line) = self
            .stale_lines
            .range((table, from)..(table, LINES))
            .map(|(&(_, line), _)| line)
            .find(|&line| lines & (1 << line) != 0)
        {
            self.stale_lines.remove(&(table, line));
            dropped += 1;
            from = line + 1;
        }
        dropped
    }
    /// Write back every table store noted since the last time: what a
    /// backend does before it invalidates the IOMMU's caches.
    pub(super) fn sync_tables(&mut self) {
        let mut dirty = core::mem::take(&mut self.dirty);
        dirty.drain(|t, lines| self.sync_lines(t, lines));
    }
}

impl TableMemory for Ram {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        match &mut self.table_allocs_left {
            Some(0) => return Err(Errno::NoMem),
            Some(n) => *n -= 1,
            None => {}
        }
        let t = self.alloc(Owner::Xen)?;
        self.tables_allocated += 1;
        self.table_parent.remove(&t.0);
        // Zeroed and written back whole (Xen: clear_page, iommu_sync_cache).
        self.sync_lines(t, u64::MAX);
        Ok(t)
    }
    fn free_table(&mut self, table: Mfn) {
        if self
            .unlinked_tables
            .remove(&mut self.frame_bits, table.0)
            .is_some()
        {
            self.tables_freed_before_flush += 1;
        }
        self.table_parent.remove(&table.0);
        // No IOMMU walks it any more (freed after the flush), but memory
        // may still hold frame numbers the CPU cleared: the frame's next
        // owner would find them there. (A review of 2026-12-06: the
        // simulator dropped those lines here as if written back, and the
        // Xen backend forgot them unwritten.)
        if self.holds_stale_present_entry(table.0) {
            self.tables_freed_stale += 1;
        }
        self.dirty.forget(table);
        self.drop_stale_lines(table.0, u64::MAX);
        self.tables_freed += 1;
        self.release(table)
    }
    fn reuse_table(&mut self, table: Mfn) {
        // Made a table again while the IOMMU may still cache it where it
        // hung: as wrong as freeing it then.
        if self.unlinked_tables.contains(&self.frame_bits, table.0) {
            self.tables_freed_before_flush += 1;
        }
    }
    fn table_is_clear(&self, table: Mfn) -> bool {
        // No early exit: the reduction vectorises.
        self.present_count(table) == 0
            && self
                .frame(table)
                .is_some_and(|f| f.iter().fold(0u8, |any, b| any | b) == 0)
    }
    #[inline]
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.read_u64(table, index * 8)
    }
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        self.note_unlink(table, index, raw);
        if self.non_coherent_tables && self.is_present(table) && index < 512 {
            // The line's memory keeps what it held until written back.
            let line = index * 8 / LINE_BYTES;
            if !self.stale_lines.contains_key(&(table.0, line)) {
                let mut bytes = [0; LINE_BYTES];
                if let Some(f) = self.frame(table) {
                    bytes.copy_from_slice(&f[line * LINE_BYTES..(line + 1) * LINE_BYTES]);
                }
                self.stale_lines.insert((table.0, line), bytes);
            }
            if let Some((t, lines)) = self.dirty.note(table, index) {
                self.sync_lines(t, lines);
            }
        }
        self.store(table, index, raw);
    }
    fn present_count(&self, table: Mfn) -> u16 {
        self.frame_bits.0[table.0 as usize].pt_count
    }
    /// [`read_entry`](TableMemory::read_entry) and
    /// [`present_count`](TableMemory::present_count), as the trait's (a
    /// frame past the RAM panics at the count), with one look-up of the
    /// frame's state for whether it is allocated and its count.
    #[inline]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        self.entry_and_count(table, index)
    }
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        self.frame_bits.0[table.0 as usize].pt_count = count;
    }
}

/// Xen's own IOMMU tables (every driver domain's context 0) as Xen's
/// VT-d and SMMU code writes them: each entry written back as it is
/// stored, so the IOMMU sees it at once. Only the engine's own contexts
/// leave stores in the CPU cache until their backend's flush.
struct WriteThrough<'a>(&'a mut Ram);

impl TableMemory for WriteThrough<'_> {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        self.0.alloc_table()
    }
    fn free_table(&mut self, table: Mfn) {
        self.0.free_table(table)
    }
    fn reuse_table(&mut self, table: Mfn) {
        self.0.reuse_table(table)
    }
    fn table_is_clear(&self, table: Mfn) -> bool {
        self.0.table_is_clear(table)
    }
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.0.read_entry(table, index)
    }
    #[inline]
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        if self.0.store_linking_no_table(table, index, raw, None) {
            return;
        }
        self.0.write_entry_through(table, index, raw)
    }
    #[inline]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        self.0.read_entry_and_count(table, index)
    }
    /// [`write_entry`](TableMemory::write_entry), then
    /// [`set_present_count`](TableMemory::set_present_count), as the
    /// trait's: a store that links no table sets the count with the same
    /// look-up of the frame.
    #[inline]
    fn write_entry_counted(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        if self
            .0
            .store_linking_no_table(table, index, raw, Some(count))
        {
            return;
        }
        self.0.write_entry_through(table, index, raw);
        self.0.set_present_count(table, count)
    }
    /// The trait's, with one look-up of the frame for the run's stores
    /// that link no table; one that unlinks a table is `write_entry`'s.
    #[inline]
    fn clear_entries_keeping_one(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        is_present: impl Fn(u64) -> bool,
    ) -> usize {
        self.0
            .clear_entries_keeping_one_with(table, indices, is_present, |ram, table, index| {
                WriteThrough(ram).write_entry(table, index, 0)
            })
    }
    fn present_count(&self, table: Mfn) -> u16 {
        self.0.present_count(table)
    }
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        self.0.set_present_count(table, count)
    }
}

/// A table memory that notes whether anything was stored through it (the
/// `bool`): whether a run of unmaps cleared a page.
struct NotingStores<'a, M>(&'a mut M, bool);

impl<M: TableMemory> TableMemory for NotingStores<'_, M> {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        self.0.alloc_table()
    }
    fn free_table(&mut self, table: Mfn) {
        self.0.free_table(table)
    }
    fn reuse_table(&mut self, table: Mfn) {
        self.0.reuse_table(table)
    }
    fn table_is_clear(&self, table: Mfn) -> bool {
        self.0.table_is_clear(table)
    }
    fn write_back_table(&mut self, table: Mfn) {
        self.0.write_back_table(table)
    }
    #[inline]
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.0.read_entry(table, index)
    }
    #[inline]
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        self.1 = true;
        self.0.write_entry(table, index, raw)
    }
    #[inline]
    fn present_count(&self, table: Mfn) -> u16 {
        self.0.present_count(table)
    }
    #[inline]
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        self.0.set_present_count(table, count)
    }
    #[inline(always)]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        self.0.read_entry_and_count(table, index)
    }
    #[inline(always)]
    fn write_entry_counted(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        self.1 = true;
        self.0.write_entry_counted(table, index, raw, count)
    }
    /// The inner memory's, which stores an entry exactly where it counts
    /// one out: a store was made where the count moved.
    #[inline]
    fn clear_entries_keeping_one(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        is_present: impl Fn(u64) -> bool,
    ) -> usize {
        let before = self.0.present_count(table);
        let done = self.0.clear_entries_keeping_one(table, indices, is_present);
        if self.0.present_count(table) != before {
            self.1 = true;
        }
        done
    }
}

impl Ram {
    /// The table frame a present entry points at, if it points at one
    /// (VT-d/LPAE: address bits 47:12; leaves point at domain frames).
    #[inline]
    fn table_target(&self, raw: u64) -> Option<u64> {
        Self::table_target_in(&self.info, raw)
    }
    /// [`table_target`](Self::table_target) from the frames' metadata.
    #[inline]
    fn table_target_in(info: &[FrameInfo], raw: u64) -> Option<u64> {
        // An empty entry (most writes clear or fill one) needs no lookup.
        if !entry_present(raw) {
            return None;
        }
        let target = (raw & 0x0000_FFFF_FFFF_F000) >> 12;
        info.get(target as usize)
            .is_some_and(|f| f.owner == Owner::Xen)
            .then_some(target)
    }
    /// Store `raw` as entry `index` of `table` where that is all a write
    /// does, and say whether it did. That is where the frame is present,
    /// and the entry names the same table frame before and after (most
    /// often none: a leaf written or cleared), so no table is linked or
    /// unlinked: then [`note_unlink`](Self::note_unlink) only counts a
    /// rewrite of an unlinked table, done here alike, and the store is
    /// [`store`](Self::store)'s. It allocates nothing. Anything else
    /// (and an index past the table, which panics there) changes nothing
    /// here and answers false: the caller runs the full bookkeeping. With
    /// `count`, a store made also sets the table's present count to it
    /// ([`set_present_count`](TableMemory::set_present_count)'s, here
    /// with the frame looked up once).
    #[inline]
    fn store_linking_no_table(
        &mut self,
        table: Mfn,
        index: usize,
        raw: u64,
        count: Option<u16>,
    ) -> bool {
        if index >= 512 {
            return false;
        }
        let Ram {
            bytes,
            frame_bits,
            info,
            unlinked_tables,
            unlinked_tables_rewritten,
            ..
        } = self;
        // The frame's state looked up once, for whether it is allocated,
        // whether it is unlinked and its count; its bytes once, for the
        // read and the store.
        let Some(state) = usize::try_from(table.0)
            .ok()
            .and_then(|i| frame_bits.0.get_mut(i))
        else {
            return false;
        };
        let bits = state.bits;
        let Some(frame) = usize::try_from(table.0)
            .ok()
            .filter(|_| bits & FrameBits::PRESENT != 0)
            .and_then(|i| bytes.get_mut(i))
        else {
            return false;
        };
        let unlinked = bits & FrameBits::UNLINKED != 0;
        let entry = &mut frame[index * 8..index * 8 + 8];
        let old_raw = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
        // (Compared as numbers, `NO_TABLE` for none: no frame is numbered
        // that.)
        const NO_TABLE: u64 = u64::MAX;
        let target = |raw| Self::table_target_in(info, raw).unwrap_or(NO_TABLE);
        if target(old_raw) != target(raw) {
            return false;
        }
        if !unlinked_tables.is_empty() && (entry_present(old_raw) || entry_present(raw)) && unlinked
        {
            *unlinked_tables_rewritten += 1;
        }
        entry.copy_from_slice(&raw.to_le_bytes());
        if let Some(count) = count {
            state.pt_count = count;
        }
        true
    }
    /// [`clear_entries_keeping_one`](TableMemory::clear_entries_keeping_one)
    /// of a table memory whose store of an entry is
    /// [`store_linking_no_table`](Self::store_linking_no_table)'s where that
    /// takes it, else `full_store` (the table memory's own
    /// [`write_entry`](TableMemory::write_entry) of 0): the run's stores
    /// that link no table made with the frame looked up once
    /// ([`clear_linking_no_table`](Self::clear_linking_no_table)), each
    /// entry where those stop as the default does it. The count is read
    /// first, as the default's (a frame past the RAM panics there).
    #[inline(always)]
    fn clear_entries_keeping_one_with(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        is_present: impl Fn(u64) -> bool,
        full_store: impl Fn(&mut Ram, Mfn, usize),
    ) -> usize {
        let before = self.present_count(table);
        let mut present = before;
        let mut at = indices.start;
        // (Bounded: each pass moves `at` on, or stops.)
        loop {
            at = self.clear_linking_no_table(table, at..indices.end, &mut present, &is_present);
            if at >= indices.end {
                break;
            }
            // The entry it stopped at, as the default does it: the table's
            // last, or one whose store unlinks a table (or the frame is no
            // allocated one), which the full store records.
            if is_present(self.read_entry(table, at)) {
                if present <= 1 {
                    break;
                }
                present -= 1;
                full_store(self, table, at);
            }
            at += 1;
        }
        if present != before {
            self.set_present_count(table, present);
        }
        at.saturating_sub(indices.start)
    }
    /// From the first of `indices`, clear each entry of `table` that
    /// `is_present` says is, counting it out of `present`, where the store
    /// of 0 is all a `write_entry` does
    /// ([`store_linking_no_table`](Self::store_linking_no_table)'s: the
    /// frame allocated, the entry naming no table frame), with the frame's
    /// state and bytes looked up once for the run. Answers the index it
    /// stopped at: the end, or a present entry where `present` is 1 or
    /// less (the table's last) or whose store would unlink a table. A run
    /// past the table, or a frame not allocated, stops at once. Each
    /// store records what `store_linking_no_table`'s does: a present
    /// entry cleared in an unlinked table is counted.
    #[inline]
    fn clear_linking_no_table(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        present: &mut u16,
        is_present: &impl Fn(u64) -> bool,
    ) -> usize {
        let start = indices.start;
        // (An empty or reversed run does nothing.)
        if indices.end > 512 || start >= indices.end {
            return start;
        }
        let Ram {
            bytes,
            frame_bits,
            info,
            unlinked_tables,
            unlinked_tables_rewritten,
            ..
        } = self;
        let Some(bits) = usize::try_from(table.0)
            .ok()
            .and_then(|i| frame_bits.0.get(i))
            .map(|state| state.bits)
        else {
            return start;
        };
        let Some(frame) = usize::try_from(table.0)
            .ok()
            .filter(|_| bits & FrameBits::PRESENT != 0)
            .and_then(|i| bytes.get_mut(i))
        else {
            return start;
        };
        // Nothing here links or unlinks a table: whether a store is
        // counted as one in an unlinked table holds for the whole run.
        let counts_rewrites = !unlinked_tables.is_empty() && bits & FrameBits::UNLINKED != 0;
        let mut left = *present;
        let mut rewritten = 0u64;
        let Some(run) = frame.get_mut(start * 8..indices.end * 8) else {
            return start;
        };
        let mut at = start;
        for entry in run.chunks_exact_mut(8) {
            let old_raw = u64::from_le_bytes((&*entry).try_into().unwrap_or([0; 8]));
            if is_present(old_raw) {
                if left <= 1 || Self::table_target_in(info, old_raw).is_some() {
                    break;
                }
                left -= 1;
                rewritten += u64::from(counts_rewrites && entry_present(old_raw));
                entry.copy_from_slice(&0u64.to_le_bytes());
            }
            at += 1;
        }
        *unlinked_tables_rewritten += rewritten;
        *present = left;
        at
    }
    /// Entry `index` of `table` is about to become `raw`. An entry that
    /// pointed at a table frame and stops: that table is unlinked until
    /// the next flush of the tree it hung in. An entry that starts to: the
    /// frame hangs from `table` (and is no longer unlinked if it hangs
    /// again where it did: what the IOMMU may have cached agrees). A
    /// present entry changed in an unlinked table is counted
    /// (`unlinked_tables_rewritten`).
    fn note_unlink(&mut self, table: Mfn, index: usize, raw: u64) {
        let old_raw = self.read_u64(table, index * 8);
        if !self.unlinked_tables.is_empty()
            && (entry_present(old_raw) || entry_present(raw))
            && self.unlinked_tables.contains(&self.frame_bits, table.0)
        {
            self.unlinked_tables_rewritten += 1;
        }
        let old = self.table_target(old_raw);
        let new = self.table_target(raw);
        if let Some(child) = old.filter(|c| Some(*c) != new) {
            self.table_parent.remove(&child);
            let (root, first, last) = self.place_of(table.0, index);
            self.unlinked_tables.insert(
                &mut self.frame_bits,
                child,
                Unlinked {
                    root,
                    parent: table.0,
                    index,
                    first,
                    last,
                },
            );
        }
        if let Some(child) = new.filter(|c| Some(*c) != old) {
            if self.holds_stale_present_entry(child) {
                self.tables_linked_over_stale_entries += 1;
            }
            self.table_parent.insert(child, (table.0, index));
            // (One unlinked from two places stays: it may still be cached
            // at the other.)
            if self
                .unlinked_tables
                .get(child)
                .is_some_and(|u| u.root != NO_ROOT && u.parent == table.0 && u.index == index)
            {
                self.unlinked_tables.remove(&mut self.frame_bits, child);
            }
        }
    }
    /// Where entry `index` of `table` is: the root frame of the tree
    /// `table` hangs in, and the first and last BFN the entry translates
    /// (the IOMMU walks every tree from a root of
    /// [`WALK_LEVELS`](hardware::WALK_LEVELS)). A tree deeper than that (no
    /// tree is) covers every BFN: any flush of its root forgets it. Under a
    /// table that is itself unlinked, the walk stops at that table, which
    /// no flush names as a root: the entry stays counted as possibly cached
    /// until it is freed or linked back (stricter than a host, never less).
    fn place_of(&self, table: u64, index: usize) -> (u64, u64, u64) {
        const LEVELS: usize = hardware::WALK_LEVELS as usize;
        // Entry indices from `table`'s up to the root's (a walk bounded at
        // twice the levels up: a deeper tree, or a cycle, is no tree).
        let mut path = [index as u64; LEVELS];
        let (mut at, mut depth) = (table, 1usize);
        while let Some(&(parent, i)) = self.table_parent.get(&at) {
            if depth > 2 * LEVELS {
                break;
            }
            if let Some(p) = path.get_mut(depth) {
                *p = i as u64;
            }
            depth += 1;
            at = parent;
        }
        if depth > LEVELS {
            return (at, 0, u64::MAX);
        }
        // The entry is at level WALK_LEVELS + 1 - depth: it translates
        // 512^(WALK_LEVELS - depth) pages.
        let span_bits = 9 * (LEVELS - depth);
        let first = path[..depth]
            .iter()
            .rev()
            .fold(0u64, |bfn, i| bfn << 9 | (i & 0x1ff))
            << span_bits;
        (at, first, first | ((1u64 << span_bits) - 1))
    }
    /// A flush of BFNs `first..=last` of the context whose tree is rooted
    /// at `root` came: the IOMMU caches none of the unlinked tables that
    /// translated any of them any more.
    fn forget_unlinked_under(&mut self, root: Option<Mfn>, first: u64, last: u64) {
        if let Some(root) = root {
            self.unlinked_tables.retain(&mut self.frame_bits, |u| {
                u.root != root.0 || u.last < first || u.first > last
            });
        }
    }
    /// A store to Xen's own tables ([`WriteThrough`]) with the full
    /// bookkeeping. Apart: the common store then saves fewer registers.
    #[inline(never)]
    fn write_entry_through(&mut self, table: Mfn, index: usize, raw: u64) {
        self.note_unlink(table, index, raw);
        self.store(table, index, raw);
    }
    /// Store an entry in the CPU's view of a table frame.
    fn store(&mut self, table: Mfn, index: usize, raw: u64) {
        if let Some(f) = self.frame_mut(table) {
            f[index * 8..index * 8 + 8].copy_from_slice(&raw.to_le_bytes());
        }
    }
}

/// Where a device's DMA goes (see `SimMachine::dma_route`).
#[derive(Clone, Copy)]
enum DmaRoute {
    /// Through this context's tables: (owner, context, root).
    Context(DomId, ContextId, Option<Mfn>),
    /// Behind an IOMMU unit that translates nothing: to the machine
    /// address itself.
    Untranslated,
}

/// What an injected flush failure answers: an IOMMU's `-ETIMEDOUT` (an
/// SMMUv3 sync, an AMD-Vi completion wait) through the rule Xen's glue
/// answers it by, [`crate::platform::host_errno`].
fn iommu_timed_out() -> Errno {
    const ETIMEDOUT: i32 = 110;
    crate::platform::host_errno(-ETIMEDOUT)
}

/// DMA faults a [`SimMachine`] keeps (the newest; older ones are counted
/// in `faults_total` only).
pub const FAULTS_KEPT: usize = 1024;

/// The simulated host.
pub struct SimMachine {
    ram: Ram,
    domains: DomainTable<Domain>,
    contexts: BTreeMap<(DomId, ContextId), Context>,
    format: Format,
    reserved: Vec<ReservedRange>,
    address_bits: u32,
    iotlb: Iotlb,
    /// The domain whose hypercall is running (guest copies use its memory).
    pub current: DomId,
    /// Ops allowed before `should_preempt` says stop; `None`: never.
    pub preempt_budget: Option<u32>,
    /// IOTLB flushes issued.
    pub flushes: u64,
    /// The last [`FAULTS_KEPT`] DMA faults, oldest first (a device, or a
    /// daemon's client asking for DMA in a loop, must not grow the
    /// simulator without bound).
    pub faults: VecDeque<DmaFault>,
    /// DMA faults since the machine was made, kept or not.
    pub faults_total: u64,
    /// Faults of devices the IOMMU recorded for Xen's fault tasklet (VT-d's
    /// fault recording registers, AMD-Vi's event log), oldest first, with
    /// their time: [`process_device_faults`](Self::process_device_faults)
    /// takes them. At most [`FAULTS_KEPT`]: a full log drops the newest,
    /// as the hardware's overflow does.
    device_faults: VecDeque<(Sbdf, u64, DmaFault)>,
    /// The DMA clock, in ns: each device access takes 1 µs of it; a test
    /// advances it for a gap between accesses.
    pub dma_clock_ns: u64,
    /// Faults Xen's fault tasklet did not count against their device: a
    /// revocation made them ([`crate::Engine::fault_expected`]).
    pub faults_expected: u64,
    /// IOMMU maps asked for past the address width (see
    /// [`set_address_bits`](Self::set_address_bits)): a domain crash on
    /// Xen's AMD-Vi. The engine must never make one.
    pub maps_past_width: u64,
    /// Maps of a default context over a present entry, which Xen's
    /// drivers overwrite (taking the BFN from whatever it mapped) and the
    /// simulator does too. The engine must never make one.
    pub maps_over_present: u64,
    /// Services that take a p2m lock (page lookups, guest copies) called
    /// from the engine's gfn hook ([`crate::lock_check::P2mHook`]), which
    /// Xen runs with the target's p2m lock held: its mm-lock order puts
    /// that lock first, and a second p2m lock, or the same one again from
    /// under the engine's locks, breaks it (Xen's `mm_lock` checks `BUG()`
    /// on it in debug builds). The engine's hook paths must take none.
    pub services_under_p2m_lock: u64,
    /// Revocation wake-ups sent from a slice the engine ran under Xen's
    /// `domctl_lock` (a teardown's, a log-dirty revocation's): they show
    /// that the engine marks those slices ([`crate::lock_check::HostAtomic`]).
    pub wakeups_under_domctl_lock: u64,
    /// IOMMU runs asked for longer than [`crate::iommu::MAX_IOMMU_RUN`]
    /// pages, which Xen's glue refuses (`PVX_IOMMU_RUN_MAX`: its loop over
    /// a run is not preemptible) and the simulator too. The engine must
    /// never make one.
    pub runs_too_long: u64,
    /// IOMMU maps and unmaps asked for outside the engine's window (below
    /// host RAM's end or 4 GiB, or over a reserved range), which Xen's glue
    /// refuses before they reach the driver (`pvx_run_in_window()`; the
    /// rule is [`crate::bfn_alloc::run_is_clear`]). The engine must never
    /// make one.
    pub runs_outside_window: u64,
    /// Questions put to the security policy (`Platform::xsm_check`), as
    /// FLASK would log a denial of each.
    pub xsm_checks: core::sync::atomic::AtomicU64,
    /// Calls into the IOMMU driver's unmap of a default context, as Xen's
    /// `iommu_unmap()` makes them: one a page, or one an aligned 2 MiB
    /// part of a run (`superpage_unmaps` of those).
    pub unmap_calls: u64,
    /// Of `unmap_calls`, those that took 2 MiB at once.
    pub superpage_unmaps: u64,
    /// Calls into the IOMMU driver's map of a default context, as Xen's
    /// `iommu_map()` makes them: one a page, or one an aligned 2 MiB of a
    /// run (`superpage_maps` of those).
    pub map_calls: u64,
    /// Of `map_calls`, those that mapped 2 MiB at once.
    pub superpage_maps: u64,
    /// Runs the engine asked to map into a default context
    /// (`iommu_map_run`): on Xen one `iommu_map()` call each, whose cost a
    /// call (a table walk from the root) is paid again by each run.
    pub map_runs: u64,
    /// The next this-many IOMMU unmaps fail with ENOMEM, as Xen's do when a
    /// superpage split finds no memory (failure injection).
    pub fail_unmaps: u32,
    /// The next this-many IOTLB flushes fail (failure injection).
    pub fail_flushes: u32,
    /// Xen's per-CPU `iommu_dont_flush_iotlb`: set while a batch of a
    /// domain's own p2m changes runs (`xenmem_add_to_physmap()` of a
    /// `XENMAPSPACE_gmfn_range`, [`add_to_physmap_range`](Self::add_to_physmap_range)),
    /// whose gfn hooks run with it. `iommu_legacy_unmap()` skips its flush
    /// while it is set: the batch flushes its own domain's entries at its
    /// end, no other domain's.
    pub dont_flush_iotlb: bool,
    /// Frames in a PV guest's own IOMMU context (Xen's identity map of a
    /// PV domain with a device, `need_iommu_pt_sync()`): frame -> guest.
    /// Freeing one unmaps it there ([`release_frame`](Self::release_frame)).
    pv_identity: BTreeMap<u64, DomId>,
    /// Identity entries unmapped with no flush (`dont_flush_iotlb` set):
    /// the guest's device may still reach the freed frame through its
    /// IOTLB. Tests require none.
    pub identity_unmaps_unflushed: u64,
    /// Owners whose last flush of their context 0 failed (see
    /// [`run_softirqs`](Self::run_softirqs)).
    flush_failed_for: BTreeSet<DomId>,
    /// Failure injection for one driver domain's IOMMU unmaps in its
    /// default context (after `fail_unmaps`): `(owner, n)`, its unmaps
    /// fail but every `n`-th (`n` = 0: all of them), as an IOMMU short of
    /// memory that finds some now and then, while others' succeed.
    pub fail_unmaps_of: Option<(DomId, u32)>,
    /// Unmaps of `fail_unmaps_of`'s owner so far.
    unmaps_of_seen: u32,
    /// Seed for the engine's hash tables.
    pub seed: u64,
    /// End of hot-pluggable memory (SRAT), in frames: RAM may grow to here.
    pub hotplug_end: u64,
    /// Revocation wake-ups delivered per driver domain (Xen: its
    /// `VIRQ_PV_IOMMU` raised).
    pub revocation_wakeups: BTreeMap<DomId, u64>,
    /// Driver domains the engine asked to wake, whose wake-up the next
    /// [`run_softirqs`](Self::run_softirqs) delivers (the asking call's
    /// return), once each: Xen's glue
    /// raises the VIRQ from a softirq tasklet, never under the locks the
    /// engine asks with (on Arm the VIRQ takes a lock the vITS holds around
    /// a p2m read: a review of 2026-12-07).
    revocation_wakeups_pending: BTreeSet<DomId>,
    /// Wake-ups the engine asked for a reserved domid (`DOMID_IO`, ...),
    /// which no driver domain has: the glue's bitmap has no bit for one
    /// and drops it, so each is an engine bug that would leave no trace.
    pub revocation_wakeups_for_reserved_ids: u64,
    /// The IOMMU has Snoop Control: SNP is a valid bit (otherwise a walk
    /// that meets it faults).
    pub snoop_control: bool,
    /// Levels the IOMMU walks for the engine's contexts (from its address
    /// width, as VT-d's AGAW).
    hw_contexts: BTreeMap<u32, HwCtx>,
    next_hw_context: u32,
    devices: BTreeMap<Sbdf, SimDevice>,
    /// Depth of the devices lock (Xen's recursive `pcidevs_lock`).
    devices_lock_depth: u32,
    /// Times the devices lock was taken (a hostile caller must not be able
    /// to keep Xen's `pcidevs_lock` busy for free).
    pub devices_lock_taken: u64,
    /// Table frames freed with the devices lock held: each is written back
    /// first on a non-coherent IOMMU, so a pile of them holds Xen's global
    /// `pcidevs_lock` that long (read by tests around a call).
    tables_freed_under_devices_lock: u64,
    /// Entries made for batch calls that ended in an error, after the one
    /// that met it (`hypercall::BatchEnding`; read by tests).
    pub ending_entries: u64,
    /// The next this-many device attaches fail (failure injection).
    pub fail_attaches: u32,
    /// The next this-many tags for a new context of the engine's are
    /// refused, with this errno (failure injection: Xen's VT-d has a
    /// bounded pool of pseudo domain ids, the SMMUv3 of VMIDs, and
    /// `ctx_alloc` fails when it is spent or its first flush does).
    pub fail_context_creates: (u32, Errno),
    /// The next this-many device detaches fail with the device still on
    /// the engine's tables (failure injection: a flush that fails twice).
    pub fail_detaches: u32,
    /// What those detaches answer: `Busy` (the default) keeps the device
    /// on the tables; any other error clears its context entry first (its
    /// DMA is blocked, as when Xen's unmap of the entry half-fails).
    pub fail_detaches_with: Errno,
    /// The IOMMU refills translations right after an invalidation of an
    /// engine context (see `refill_after_invalidation`; default on, the
    /// rule tests need). Benchmarks of the engine turn it off: the refill
    /// models hardware, it is no work of the engine's.
    pub speculative_refill: bool,
    /// Calls of `get_page` so far (a run's own lookups not counted).
    pub page_lookups: u64,
    /// Paging-ins started by page lookups (Xen's `p2m_mem_paging_populate`:
    /// a request on the pager's ring), a run's included.
    pub paging_requests: u64,
    /// Calls of `get_pages` (runs of pages looked up together) so far.
    pub page_runs: u64,
    /// Lookups (of a page or a run) that found the target's sequence
    /// number moved once they held the domain, and so looked nothing up:
    /// the domain at the domid may not be the one the map checked
    /// ([`CheckedTarget`]).
    pub lookups_of_moved_targets: u64,
    /// A run lookup takes at most this many pages (`None`: all it is
    /// asked for), as a host may stop a run anywhere: Xen's at the end of
    /// a p2m entry, and then goes on with a lookup of its own.
    pub page_run_limit: Option<usize>,
}

impl SimMachine {
    /// A host with `ram_frames` frames of RAM, an IOMMU of the given format
    /// (48-bit input addresses) and a privileged dom0 of `dom0_pages`.
    pub fn new(ram_frames: u64, format: Format, dom0_pages: u64) -> SimMachine {
        let mut m = SimMachine {
            ram: Ram::new(ram_frames),
            domains: DomainTable::new(),
            contexts: BTreeMap::new(),
            format,
            reserved: vec![ReservedRange {
                start: 0x100_0000,
                nr: 0x200,
                kind: region_kind::RMRR,
            }],
            address_bits: 48,
            iotlb: Iotlb::default(),
            current: DomId::DOM0,
            preempt_budget: None,
            flushes: 0,
            faults: VecDeque::new(),
            faults_total: 0,
            device_faults: VecDeque::new(),
            dma_clock_ns: 0,
            faults_expected: 0,
            maps_past_width: 0,
            maps_over_present: 0,
            services_under_p2m_lock: 0,
            wakeups_under_domctl_lock: 0,
            runs_too_long: 0,
            runs_outside_window: 0,
            xsm_checks: core::sync::atomic::AtomicU64::new(0),
            unmap_calls: 0,
            map_runs: 0,
            superpage_unmaps: 0,
            map_calls: 0,
            page_lookups: 0,
            paging_requests: 0,
            page_runs: 0,
            lookups_of_moved_targets: 0,
            page_run_limit: None,
            superpage_maps: 0,
            fail_unmaps: 0,
            fail_unmaps_of: None,
            unmaps_of_seen: 0,
            fail_flushes: 0,
            dont_flush_iotlb: false,
            pv_identity: BTreeMap::new(),
            identity_unmaps_unflushed: 0,
            flush_failed_for: BTreeSet::new(),
            seed: 0x5eed_f00d_5113,
            hotplug_end: 0,
            revocation_wakeups: BTreeMap::new(),
            revocation_wakeups_pending: BTreeSet::new(),
            revocation_wakeups_for_reserved_ids: 0,
            snoop_control: true,
            hw_contexts: BTreeMap::new(),
            next_hw_context: 1,
            devices: BTreeMap::new(),
            devices_lock_depth: 0,
            devices_lock_taken: 0,
            tables_freed_under_devices_lock: 0,
            ending_entries: 0,
            fail_attaches: 0,
            fail_context_creates: (0, Errno::NoSpc),
            fail_detaches: 0,
            fail_detaches_with: Errno::Busy,
            speculative_refill: true,
        };
        m.create_domain(
            DomId::DOM0,
            DomainSpec {
                pages: dom0_pages,
                privileged: true,
                device_model_of: None,
            },
        )
        .expect("dom0 fits in the simulated RAM");
        m
    }

    /// Create a domain with `spec.pages` RAM pages, each zeroed.
    pub fn create_domain(&mut self, domid: DomId, spec: DomainSpec) -> Result<(), Errno> {
        self.create_domain_with(domid, spec, 1)
    }

    /// Create a domain with `spec.pages` RAM pages, each zeroed, each whole
    /// 2 MiB of its gfns backed by a 2 MiB-aligned run of machine frames:
    /// as Xen populates an HVM guest's RAM where it can (order-9 extents,
    /// mapped by 2 MiB p2m entries), and what a 2 MiB IOMMU entry needs.
    /// `NoMem` (nothing made) where the free frames hold no such runs.
    pub fn create_domain_in_superpages(
        &mut self,
        domid: DomId,
        spec: DomainSpec,
    ) -> Result<(), Errno> {
        self.create_domain_with(domid, spec, pviommu_abi::EXTENT_PAGES)
    }

    /// The same with each whole 1 GiB of its gfns backed by a 1 GiB-aligned
    /// run of machine frames (Xen backs an HVM guest's RAM with 1 GiB
    /// extents where it can): what Xen's own tables fold into 1 GiB
    /// entries when a driver domain maps it in order. The first such run
    /// is the first free one: on a fresh machine, frames from 2^18 (dom0
    /// sits below), so RAM must reach past them; frames skipped over are
    /// never touched.
    pub fn create_domain_in_gigapages(
        &mut self,
        domid: DomId,
        spec: DomainSpec,
    ) -> Result<(), Errno> {
        self.create_domain_with(domid, spec, 1 << 18)
    }

    /// A domain whose every whole `run` pages of gfns (1: none) are backed
    /// by a `run`-aligned run of machine frames.
    fn create_domain_with(
        &mut self,
        domid: DomId,
        spec: DomainSpec,
        run_pages: u64,
    ) -> Result<(), Errno> {
        if self.domains.contains_key(&domid) || !domid.is_valid() {
            return Err(Errno::Inval);
        }
        if (self.ram.free.len() as u64) < spec.pages {
            return Err(Errno::NoMem);
        }
        let mut p2m = P2m::with_dense(spec.pages);
        let whole = run_pages.max(1);
        // Every frame taken, to give back should a run not be found.
        let mut taken = Vec::new();
        let mut run = Mfn(0);
        for g in 0..spec.pages {
            let in_superpage = whole > 1 && g / whole < spec.pages / whole;
            let allocated = if !in_superpage {
                self.ram.alloc(Owner::Domain(domid))
            } else if g % whole == 0 {
                self.ram
                    .alloc_aligned(Owner::Domain(domid), whole)
                    .inspect(|&first| {
                        run = first;
                    })
            } else {
                // (In the run taken at the 2 MiB's first gfn.)
                Ok(Mfn(run.0 + g % whole))
            };
            let mfn = match allocated {
                Ok(mfn) => mfn,
                Err(e) => {
                    for mfn in taken {
                        self.ram.release(mfn);
                    }
                    return Err(e);
                }
            };
            if !in_superpage || g % whole == 0 {
                taken.extend((0..if in_superpage { whole } else { 1 }).map(|i| Mfn(mfn.0 + i)));
            }
            p2m.insert(
                Gfn(g),
                P2mEntry::Ram {
                    mfn,
                    read_only: false,
                },
            );
        }
        self.domains.insert(
            domid,
            Domain {
                p2m,
                ram_pages: spec.pages,
                privileged: spec.privileged,
                target: spec.device_model_of,
                dying: false,
                translation: pviommu_abi::translation::TRANSLATES,
                log_dirty: false,
                vram: (0, 0),
                vram_sweep: Default::default(),
                vram_logdirty: BTreeSet::new(),
                xsm_denied: false,
                xsm_denied_actions: Vec::new(),
                xsm_protected: false,
                pv: false,
                pv_typed: BTreeSet::new(),
                pv_xen_shared: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// One past the last RAM frame.
    pub fn ram_end_frame(&self) -> u64 {
        self.ram.info.len() as u64
    }

    /// RAM pages the domain was created with.
    pub fn domain_ram_pages(&self, domid: DomId) -> Option<u64> {
        self.domains.get(&domid).map(|d| d.ram_pages)
    }

    /// Whether the domain exists.
    pub fn has_domain(&self, domid: DomId) -> bool {
        self.domains.contains_key(&domid)
    }

    /// Report another reserved range (a PCI bridge window, say) to engines
    /// created after this.
    pub fn add_reserved(&mut self, range: ReservedRange) {
        self.reserved.push(range);
    }

    /// Let only the next `n` page-table allocations succeed (`None`: all),
    /// as a host out of memory would.
    pub fn fail_table_allocs(&mut self, n: Option<u64>) {
        self.ram.table_allocs_left = n;
    }

    /// The DMA address width the host's IOMMU driver reports for a
    /// domain's own context (a boot fact: set it before the engine starts).
    /// Xen's AMD-Vi driver gives a PV domain's tables only the levels its
    /// host's frames need (30 bits on a host of 1 GiB), VT-d its units'
    /// width. A map past it is refused and counted in `maps_past_width`.
    pub fn set_address_bits(&mut self, bits: u32) {
        self.address_bits = bits;
    }

    /// Xen's glue, before an IOMMU run reaches the driver: only BFNs of the
    /// engine's window, outside every reserved range
    /// (`pvx_run_in_window()`). Anything else is refused and counted in
    /// `runs_outside_window`: a map with `Inval`, an unmap of one page
    /// with `NoEnt` (no entry of the engine's can be there, its map having
    /// been refused: so the engine releases the slot rather than keep it
    /// stuck), of a run with `Inval` (its other pages may be mapped).
    fn glue_admits(&mut self, first: u64, count: u64) -> bool {
        let admitted = crate::bfn_alloc::BfnWindow::bounds(self.ram_end().0, self.address_bits)
            .is_ok_and(|(start, end)| {
                crate::bfn_alloc::run_is_clear(first, count, start, end, &self.reserved)
            });
        if !admitted {
            self.runs_outside_window += 1;
        }
        admitted
    }

    /// Set the IOMMU-mode fact Xen would report for `domid` (a
    /// `pviommu_abi::translation` code).
    pub fn set_translation(&mut self, domid: DomId, code: u32) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.translation = code;
        }
    }

    /// Make the simulated XSM policy refuse every PV-IOMMU call of `domid`.
    pub fn xsm_deny(&mut self, domid: DomId) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.xsm_denied = true;
        }
    }

    /// A FLASK-like policy refuses `domid` one action (each a permission
    /// of the `pv_iommu` class), the others still pass.
    pub fn xsm_deny_action(&mut self, domid: DomId, action: XsmAction) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.xsm_denied_actions.push((action, false));
        }
    }

    /// A FLASK-like policy refuses every other domain any action on
    /// `domid` (a label such as one the default policy keeps dom0 from
    /// mapping). The label is the domain's: it goes with it.
    pub fn xsm_protect(&mut self, domid: DomId) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.xsm_protected = true;
        }
    }

    /// The same, only where the action has no target domain (a host-wide
    /// one: FLASK checks it against `xen_t`).
    pub fn xsm_deny_host_wide(&mut self, domid: DomId, action: XsmAction) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.xsm_denied_actions.push((action, true));
        }
    }

    /// Set `d->target` of `domid` (Xen's `XEN_DOMCTL_set_target`).
    pub fn set_target(&mut self, domid: DomId, target: Option<DomId>) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.target = target;
        }
    }

    /// Turn log-dirty mode on or off for `domid`, as the paging mode's bit
    /// alone (Xen: `ops->enable`/`ops->disable`): writable maps of its pages
    /// are refused while it is on. Nothing is revoked: turning it on is
    /// [`enable_log_dirty`](Self::enable_log_dirty).
    pub fn set_log_dirty_mode(&mut self, domid: DomId, on: bool) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.log_dirty = on;
        }
    }

    /// Make `domid` a PV guest: from now on a lookup of one of its "gfns"
    /// is one of the machine frame of that number ([`classify_pv_frame`]).
    /// Its frames are those [`mfn_of`](Self::mfn_of) lists.
    pub fn make_pv(&mut self, domid: DomId) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.pv = true;
        }
    }

    /// Give PV guest `domid` a device: Xen then keeps the guest's own
    /// IOMMU context (its context 0 here) as an identity map of its
    /// writable frames, bus address = machine address
    /// (`need_iommu_pt_sync()`, `arch_iommu_hwdom_init()` for dom0 and
    /// `_get_page_type()` for any PV domain with a device), and a frame
    /// freed at last leaves it (`cleanup_page_mappings()`). The frames it
    /// has now are mapped; its typed frames are not (a page table is not
    /// writable).
    pub fn give_pv_guest_a_device(&mut self, domid: DomId) -> Result<(), Errno> {
        let d = self
            .domains
            .get(&domid)
            .filter(|d| d.pv)
            .ok_or(Errno::Inval)?;
        let frames: Vec<u64> = d
            .p2m
            .values()
            .filter_map(|e| match e {
                P2mEntry::Ram {
                    mfn,
                    read_only: false,
                } if !d.pv_typed.contains(&mfn.0) => Some(mfn.0),
                _ => None,
            })
            .collect();
        for f in frames {
            self.map_page(
                domid,
                ContextId::DEFAULT,
                Bfn(f),
                Mfn(f),
                Permissions::RW,
                MemAttr::WriteBack,
            )?;
            self.pv_identity.insert(f, domid);
        }
        Ok(())
    }

    /// A domain frame is freed, nothing referencing it any more (Xen's
    /// `put_page()` at the last reference): a PV owner's own IOMMU entry
    /// for it goes first (`cleanup_page_mappings()`), its IOTLB flushed
    /// unless this CPU suppresses flushes (`iommu_legacy_unmap()`). An
    /// unmap that fails leaks the frame, as Xen's "Leaking mfn".
    fn release_frame(&mut self, mfn: Mfn) {
        if let Some(&owner) = self.pv_identity.get(&mfn.0) {
            let mut gather = FlushGather::default();
            match self.unmap_page(owner, ContextId::DEFAULT, Bfn(mfn.0), false) {
                Ok(flags) => {
                    let _ = gather.add(ContextId::DEFAULT, Bfn(mfn.0), flags);
                }
                Err(Errno::NoEnt) => {}
                Err(_) => return,
            }
            self.pv_identity.remove(&mfn.0);
            if self.dont_flush_iotlb {
                self.identity_unmaps_unflushed += 1;
            } else if self.iommu_flush(owner, &gather).is_err() {
                // `cleanup_page_mappings()` answers the flush's error and
                // `put_page()` leaks the frame ("Leaking mfn"): never
                // freed while the IOTLB may hold it.
                return;
            }
        }
        self.ram.release(mfn);
    }

    /// Type frame `frame` of PV guest `domid` as a page table (`on`, as a
    /// pin does), or take the type off: a typed frame is never mapped
    /// writable. As Xen's `get_page_type(PGT_l1_page_table)`, typing fails
    /// (`Inval`, what the pin answers) while anything holds a writable
    /// reference to the frame (a device mapping it writable, until its
    /// unmap's flush releases it), and for a frame Xen shares with the
    /// guest (pinned writable by Xen).
    pub fn set_pv_page_table(&mut self, domid: DomId, frame: Mfn, on: bool) -> Result<(), Errno> {
        let writable = self
            .ram
            .info
            .get(frame.0 as usize)
            .map_or(0, |f| f.writable_refs);
        let d = self.domains.get_mut(&domid).ok_or(Errno::Srch)?;
        if on {
            if writable != 0 || d.pv_xen_shared.contains(&frame.0) {
                return Err(Errno::Inval);
            }
            d.pv_typed.insert(frame.0);
        } else {
            d.pv_typed.remove(&frame.0);
        }
        Ok(())
    }

    /// A frame Xen shares with PV guest `domid` (as its shared_info or a
    /// grant-table frame: Xen's heap, the guest its owner), not in its
    /// RAM. A lookup of it answers as every frame that is not the guest's
    /// own RAM does: not present.
    pub fn share_xen_frame(&mut self, domid: DomId) -> Result<Mfn, Errno> {
        if !self.domains.contains_key(&domid) {
            return Err(Errno::Srch);
        }
        let mfn = self.ram.alloc(Owner::Domain(domid))?;
        if let Some(d) = self.domains.get_mut(&domid) {
            d.pv_xen_shared.insert(mfn.0);
        }
        Ok(mfn)
    }

    /// A memory error in the frame behind `domid`'s `gfn` (a PV guest's
    /// "gfn" is the frame), as Xen's machine-check handler marks it
    /// (`offline_page(mfn, broken)`: `PGC_broken`, and offlining until it
    /// is freed). Nothing else changes: Xen changes the p2m of HAP guests
    /// only (`p2m_ram_broken`, which is an entry's removal to the hook; a
    /// test makes that with [`remove_gfn`](Self::remove_gfn)), crashes a
    /// PV guest without destroying it, and leaves the hardware domain's
    /// page where it is. No new device access is given to the frame; what
    /// maps it already stays until revoked or unmapped.
    pub fn mark_frame_broken(&mut self, domid: DomId, gfn: Gfn) -> Result<Mfn, Errno> {
        let d = self.domains.get(&domid).ok_or(Errno::Srch)?;
        let mfn = if d.pv {
            Mfn(gfn.0)
        } else {
            match d.p2m.get(&gfn) {
                Some(&P2mEntry::Ram { mfn, .. }) => mfn,
                _ => return Err(Errno::NoEnt),
            }
        };
        let info = usize::try_from(mfn.0)
            .ok()
            .and_then(|i| self.ram.info.get_mut(i))
            .filter(|f| f.owner == Owner::Domain(domid))
            .ok_or(Errno::NoEnt)?;
        info.retired = true;
        Ok(mfn)
    }

    /// Turn log-dirty mode on for `domid` as Xen's shadow-op domctl does:
    /// the mode, then every writable mapping of its pages revoked in
    /// slices ([`Engine::revoke_writes`](crate::Engine::revoke_writes)),
    /// one per continuation of the domctl. Returns the slices it took.
    pub fn enable_log_dirty(&mut self, engine: &crate::Engine, domid: DomId) -> u32 {
        self.set_log_dirty_mode(domid, true);
        let mut cursor = 0;
        let mut slices = 1;
        // Each slice makes progress (a bounded number of slots visited),
        // and returns to the toolstack's CPU: its softirqs run.
        while engine.revoke_writes(self, domid, &mut cursor).is_err() {
            self.run_softirqs();
            slices += 1;
            assert!(slices < 1_000_000, "the revocation makes no progress");
        }
        self.run_softirqs();
        slices
    }

    /// One attempt of a device model's `XEN_DMOP_track_dirty_vram` moving
    /// `domid`'s tracked VRAM to gfns `[first, last)`, as Xen's
    /// `hap_track_dirty_vram` makes it with patch 0002b: while the range
    /// changes, the writable device mappings of the new one are revoked
    /// first, a slice per attempt (`Err(Restart)`: the dm_op continues);
    /// then the old range's pages go back to rw, the new range's become
    /// logdirty (device-read-only) and the engine's hook runs over it as
    /// `p2m_change_type_range`'s does (over-covered to a power of two), in
    /// the same call. An unchanged range is a peek: nothing here.
    pub fn track_dirty_vram_once(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        range: (u64, u64),
    ) -> Result<(), CallEnd> {
        let call = self.track_dirty_vram_call(engine, domid, range);
        self.run_softirqs();
        // Every end of the call but a continuation lifts the freeze of a
        // revocation (Xen: `out:` of `hap_track_dirty_vram()`), one left
        // by an abandoned continuation included.
        if call != Err(CallEnd::Continues) {
            if let Some(d) = self.domains.get_mut(&domid) {
                d.vram_sweep = Default::default();
            }
        }
        call
    }

    /// [`track_dirty_vram_once`](Self::track_dirty_vram_once) up to its
    /// end (Xen's `out:`).
    fn track_dirty_vram_call(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        (first, last): (u64, u64),
    ) -> Result<(), CallEnd> {
        let Some(d) = self.domains.get_mut(&domid) else {
            return Ok(());
        };
        if d.vram == (first, last) {
            return Ok(());
        }
        if first >= last {
            // Tracking stops (Xen's nr_frames == 0): nothing is newly
            // read-only, so nothing to revoke and no hook.
            d.end_vram_logdirty();
            d.vram = (0, 0);
            return Ok(());
        }
        let mut sweep = d.vram_sweep;
        let slice = engine.revoke_writes_in(self, domid, (first, last), &mut sweep);
        if let Some(d) = self.domains.get_mut(&domid) {
            d.vram_sweep = sweep;
        }
        slice.map_err(|_| CallEnd::Continues)?;
        // The IOMMU kept refusing: a device may still write the range, and
        // the type change's hook cannot fail, so the call fails first
        // (0002b: `-EIO`, tracking where it was).
        if crate::Engine::revoke_writes_gave_up(sweep.cursor) {
            return Err(CallEnd::GaveUp);
        }
        // (The range stays refused writes until its type has changed.)
        self.move_vram_range(engine, domid, (first, last));
        Ok(())
    }

    /// The gfns `[first, last)` of `domid`'s tracked VRAM (empty: none).
    pub fn vram_range(&self, domid: DomId) -> Option<(u64, u64)> {
        self.domains.get(&domid).map(|d| d.vram)
    }

    /// VRAM dirty tracking's range moves to `[first, last)`: the p2m type
    /// changes and the engine's hook over the new range, with nothing
    /// revoked before (Xen's `hap_track_dirty_vram` without 0002b's
    /// slices, for comparison).
    pub fn move_vram_range(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        (first, last): (u64, u64),
    ) {
        let Some(d) = self.domains.get_mut(&domid) else {
            return;
        };
        d.vram = (first, last);
        // (A page read-only before the tracking, or made so since, stays so.)
        d.end_vram_logdirty();
        for g in first..last {
            if let Some(P2mEntry::Ram { read_only, .. }) = d.p2m.get_mut(&Gfn(g)) {
                if !*read_only {
                    *read_only = true;
                    d.vram_logdirty.insert(g);
                }
            }
        }
        let n = last - first;
        let order = if n > 1 {
            64 - (n - 1).leading_zeros()
        } else {
            0
        };
        engine.gfn_changed(
            self,
            domid,
            Gfn(first),
            order,
            crate::engine::GfnChange::WriteLost,
        );
        self.run_softirqs();
    }

    /// [`track_dirty_vram_once`](Self::track_dirty_vram_once) until it
    /// ends, as the dm_op's continuations make it; the attempts it took
    /// (whether it failed: the range it tracks, [`vram_range`](Self::vram_range)).
    pub fn track_dirty_vram(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        range: (u64, u64),
    ) -> u32 {
        self.track_dirty_vram_to_end(engine, domid, range).1
    }

    /// [`track_dirty_vram`](Self::track_dirty_vram), with how the call
    /// ended (done, or gave up) beside the attempts.
    pub fn track_dirty_vram_to_end(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        range: (u64, u64),
    ) -> (Result<(), CallEnd>, u32) {
        let mut attempts = 1;
        loop {
            match self.track_dirty_vram_once(engine, domid, range) {
                Err(CallEnd::Continues) => attempts += 1,
                end => return (end, attempts),
            }
            assert!(attempts < 1_000_000, "the revocation makes no progress");
        }
    }

    /// Mark a RAM gfn read-only and run the engine's hook after the change,
    /// as Xen's p2m type-change hook does.
    pub fn make_read_only(&mut self, engine: &crate::Engine, domid: DomId, gfn: Gfn) {
        self.set_read_only(domid, gfn);
        engine.gfn_changed(self, domid, gfn, 0, crate::engine::GfnChange::WriteLost);
        self.run_softirqs();
    }

    /// Balloon a gfn out (`guest_remove_page`) and run the engine's hook
    /// after the removal succeeded, as Xen does.
    ///
    /// For a PV guest `gfn` is the machine frame, as its `gmfn` is to Xen's
    /// `decrease_reservation`, and the hook is told that frame.
    pub fn balloon_out(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        let removed = self.remove_page_and_hook(engine, domid, gfn);
        self.run_softirqs();
        removed
    }

    /// [`balloon_out`](Self::balloon_out) up to the guest's return.
    fn remove_page_and_hook(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        if let Some(d) = self.domains.get(&domid).filter(|d| d.pv) {
            // A frame Xen shares with it: Xen's `guest_remove_page` takes
            // the guest's allocation reference and succeeds; the frame stays
            // Xen's heap, never the guest's RAM.
            if d.pv_xen_shared.contains(&gfn.0) {
                engine.gfn_removed(self, domid, gfn);
                return Ok(());
            }
            let listed = d.p2m.iter().find_map(|(g, e)| match e {
                P2mEntry::Ram { mfn, .. } if mfn.0 == gfn.0 => Some(g),
                _ => None,
            });
            return match listed {
                Some(listed) => {
                    self.remove_gfn(domid, listed);
                    // Its type goes with it (Xen 4.17 keeps a pinned page
                    // allocated until it is unpinned; the simulator frees
                    // it: either way it is no longer the guest's RAM, and
                    // a lookup answers not present).
                    if let Some(d) = self.domains.get_mut(&domid) {
                        d.pv_typed.remove(&gfn.0);
                    }
                    engine.gfn_removed(self, domid, gfn);
                    Ok(())
                }
                // As `guest_remove_page`: EINVAL for no frame at all,
                // ENXIO ("bad page free") for a frame not the guest's.
                None if gfn.0 < self.ram.info.len() as u64 => Err(Errno::Nxio),
                None => Err(Errno::Inval),
            };
        }
        match self.mfn_of(domid, gfn) {
            Some(_) => {
                self.remove_gfn(domid, gfn);
                engine.gfn_removed(self, domid, gfn);
                Ok(())
            }
            // Nothing there: the removal fails and no hook runs.
            None => Err(Errno::Inval),
        }
    }

    /// Replace what `gfn` points at with a fresh page (`add_to_physmap`
    /// over a mapped gfn), then run the hook.
    pub fn replace_page(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        gfn: Gfn,
    ) -> Result<(), Errno> {
        self.put_new_frame(domid, gfn)?;
        engine.gfn_removed(self, domid, gfn);
        self.run_softirqs();
        Ok(())
    }

    /// Xen's `XENMEM_add_to_physmap` of a `XENMAPSPACE_gmfn_range` by
    /// `domid` (a translated guest moving its own pages): page by page,
    /// the frame at `idx + i` moves to `gpfn + i` (what was there goes),
    /// the gfn hooks running for both, all with this CPU's IOTLB flushes
    /// suppressed (`this_cpu(iommu_dont_flush_iotlb)`), which the batch
    /// lifts at its end and then flushes its own domain's entries only.
    /// (The simulator keeps no IOMMU context of a translated guest: that
    /// flush has nothing to reach.) `Inval` at the first gfn that holds no
    /// RAM, the pages before it moved.
    pub fn add_to_physmap_range(
        &mut self,
        engine: &crate::Engine,
        domid: DomId,
        idx: Gfn,
        gpfn: Gfn,
        size: u64,
    ) -> Result<(), Errno> {
        let before = core::mem::replace(&mut self.dont_flush_iotlb, true);
        let mut r = Ok(());
        for i in 0..size {
            let (from, to) = (Gfn(idx.0 + i), Gfn(gpfn.0 + i));
            let entry = self.domains.get_mut(&domid).and_then(|d| {
                if !matches!(d.p2m.get(&from), Some(P2mEntry::Ram { .. })) {
                    return None;
                }
                d.vram_logdirty.remove(&from.0);
                d.p2m.remove(&from)
            });
            let Some(entry) = entry else {
                r = Err(Errno::Inval);
                break;
            };
            self.replace_p2m(domid, to, entry);
            engine.gfn_removed(self, domid, from);
            engine.gfn_removed(self, domid, to);
        }
        self.dont_flush_iotlb = before;
        self.run_softirqs();
        r
    }

    /// Put a fresh frame behind `gfn` (whatever was there goes) without
    /// telling the engine: the caller runs the hook afterwards, as Xen's
    /// p2m code does once the change succeeded.
    pub fn put_new_frame(&mut self, domid: DomId, gfn: Gfn) -> Result<(), Errno> {
        if !self.domains.contains_key(&domid) {
            return Err(Errno::Srch);
        }
        let mfn = self.ram.alloc(Owner::Domain(domid))?;
        self.replace_p2m(
            domid,
            gfn,
            P2mEntry::Ram {
                mfn,
                read_only: false,
            },
        );
        Ok(())
    }

    /// Swap the frames behind two gfns of a domain (as an exchange of its
    /// memory would) without telling the engine: the caller runs the hooks
    /// afterwards, as Xen's p2m code does once the change succeeded. A test
    /// uses it to leave a mapping of a frame its gfn no longer has while
    /// the gfn's extent stays one machine run.
    pub fn swap_frames(&mut self, domid: DomId, a: Gfn, b: Gfn) -> Result<(), Errno> {
        let d = self.domains.get_mut(&domid).ok_or(Errno::Srch)?;
        let (Some(&ea), Some(&eb)) = (d.p2m.get(&a), d.p2m.get(&b)) else {
            return Err(Errno::Nxio);
        };
        d.p2m.insert(a, eb);
        d.p2m.insert(b, ea);
        Ok(())
    }

    /// Destroy a domain the way Xen's `domain_kill` does: mark it dying, run
    /// the engine's restartable teardown to the end (one slice per call, as
    /// the toolstack's continuations do), then relinquish its memory.
    /// Returns the number of teardown slices. A teardown that stalls (the
    /// IOMMU keeps refusing its unmaps or flushes) ends the kill there, as
    /// Xen's `-EBUSY` to the toolstack does: the domain stays dying, its
    /// memory kept (it used to be destroyed all the same after a bound).
    pub fn kill_domain(&mut self, engine: &crate::Engine, domid: DomId) -> u32 {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.dying = true;
        }
        // This CPU's softirqs run as each slice returns (Xen: between
        // slices, not only after the last; a review of 2026-12-07).
        let (slices, done) = engine.run_teardown(self, domid, true, Self::run_softirqs);
        if done {
            self.destroy_domain(domid);
        }
        slices
    }

    /// An IOMMU may walk and cache any translation at any moment, even with
    /// no DMA in flight (speculative refill): the simulated one does so
    /// right after an invalidation of an engine context, for the first 4096
    /// BFNs of the range, from table memory as written back. A backend that
    /// wrote its table stores back only after the invalidation leaves those
    /// refilled, stale entries behind, as real hardware could.
    fn refill_after_invalidation(&mut self, h: HwCtx, first: Bfn, last: Bfn) {
        const REFILL: u64 = 4096;
        let end = last.0.min(first.0.saturating_add(REFILL - 1));
        for bfn in first.0..=end {
            let _ = hardware::translate(
                &self.ram,
                &mut self.iotlb,
                self.format,
                self.snoop_control,
                h.owner,
                h.ctx,
                Some(h.root),
                bfn << 12,
                false,
            );
        }
    }

    /// Mark a domain dying without tearing anything down (the first step of
    /// `domain_kill`).
    pub fn mark_dying(&mut self, domid: DomId) {
        if let Some(d) = self.domains.get_mut(&domid) {
            d.dying = true;
        }
    }

    /// Mark a RAM gfn read-only in the p2m.
    pub fn set_read_only(&mut self, domid: DomId, gfn: Gfn) {
        if let Some(P2mEntry::Ram { read_only, .. }) = self.p2m_entry_mut(domid, gfn) {
            *read_only = true;
        }
        // p2m_ram_ro now, not logdirty: a move of the VRAM range leaves it.
        if let Some(d) = self.domains.get_mut(&domid) {
            d.vram_logdirty.remove(&gfn.0);
        }
    }
    /// Put an MMIO entry at `gfn`.
    pub fn set_mmio(&mut self, domid: DomId, gfn: Gfn) {
        self.replace_p2m(domid, gfn, P2mEntry::Mmio);
    }
    /// Mark `gfn` paged out.
    pub fn set_paged_out(&mut self, domid: DomId, gfn: Gfn) {
        self.replace_p2m(domid, gfn, P2mEntry::PagedOut);
    }
    /// Put a grant mapping at `gfn`.
    pub fn set_grant(&mut self, domid: DomId, gfn: Gfn) {
        self.replace_p2m(domid, gfn, P2mEntry::Grant);
    }
    /// Put a Xen-owned frame at `gfn` (like a shared-info page).
    pub fn set_xen_owned(&mut self, domid: DomId, gfn: Gfn) {
        if self.ram.alloc(Owner::Xen).is_ok() {
            self.replace_p2m(domid, gfn, P2mEntry::Xen);
        }
    }

    fn p2m_entry_mut(&mut self, domid: DomId, gfn: Gfn) -> Option<&mut P2mEntry> {
        self.domains.get_mut(&domid)?.p2m.get_mut(&gfn)
    }

    fn replace_p2m(&mut self, domid: DomId, gfn: Gfn, entry: P2mEntry) {
        let Some(d) = self.domains.get_mut(&domid) else {
            return;
        };
        // (A new entry has its own type.)
        d.vram_logdirty.remove(&gfn.0);
        if let Some(P2mEntry::Ram { mfn, .. }) = d.p2m.insert(gfn, entry) {
            self.free_domain_frame(mfn);
        }
    }

    /// A domain frame leaves its owner; it is freed once nothing references it.
    fn free_domain_frame(&mut self, mfn: Mfn) {
        let info = &mut self.ram.info[mfn.0 as usize];
        info.owner = Owner::Free;
        if info.refs == 0 {
            self.release_frame(mfn);
        }
        // Otherwise it lingers as a "zombie" frame until the last put_page,
        // exactly what a leaked reference looks like in Xen.
    }

    /// Remove `gfn` from the domain's p2m (ballooning out). The engine must
    /// be told through [`crate::engine::Engine::gfn_removed`]; [`Self::balloon_out`] does both, in Xen's order.
    pub fn remove_gfn(&mut self, domid: DomId, gfn: Gfn) -> Option<()> {
        let d = self.domains.get_mut(&domid)?;
        d.vram_logdirty.remove(&gfn.0);
        if let Some(P2mEntry::Ram { mfn, .. }) = d.p2m.remove(&gfn) {
            self.free_domain_frame(mfn);
        }
        Some(())
    }

    /// Destroy a domain: its frames are freed as soon as nothing references them.
    pub fn destroy_domain(&mut self, domid: DomId) {
        if let Some(d) = self.domains.remove(&domid) {
            for e in d.p2m.values() {
                if let P2mEntry::Ram { mfn, .. } = *e {
                    self.free_domain_frame(mfn);
                }
            }
            // Xen frees the pages it shared with the domain with it
            // (`xenpage_list`): none stays the domid's for its next domain.
            for &frame in &d.pv_xen_shared {
                self.free_domain_frame(Mfn(frame));
            }
        }
    }

    /// The machine frame behind a domain's gfn (for tests and the demo; the
    /// engine's callers never see it).
    pub fn mfn_of(&self, domid: DomId, gfn: Gfn) -> Option<Mfn> {
        match self.domains.get(&domid)?.p2m.get(&gfn)? {
            P2mEntry::Ram { mfn, .. } => Some(*mfn),
            _ => None,
        }
    }

    /// Whether a domain's gfn is RAM marked read-only in its p2m.
    pub fn is_read_only(&self, domid: DomId, gfn: Gfn) -> bool {
        self.domains
            .get(&domid)
            .and_then(|d| d.p2m.get(&gfn))
            .is_some_and(|e| {
                matches!(
                    e,
                    P2mEntry::Ram {
                        read_only: true,
                        ..
                    }
                )
            })
    }

    /// Write bytes into a domain's page (as the domain itself would).
    pub fn write_guest(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        offset: usize,
        data: &[u8],
    ) -> Result<(), Errno> {
        let mfn = self.mfn_of(domid, gfn).ok_or(Errno::Fault)?;
        let f = self.ram.frame_mut(mfn).ok_or(Errno::Fault)?;
        let end = offset
            .checked_add(data.len())
            .filter(|e| *e <= 4096)
            .ok_or(Errno::Fault)?;
        f[offset..end].copy_from_slice(data);
        Ok(())
    }

    /// Read bytes of a domain's page.
    pub fn read_guest(
        &self,
        domid: DomId,
        gfn: Gfn,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, Errno> {
        let mfn = self.mfn_of(domid, gfn).ok_or(Errno::Fault)?;
        let f = self.ram.frame(mfn).ok_or(Errno::Fault)?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= 4096)
            .ok_or(Errno::Fault)?;
        Ok(f[offset..end].to_vec())
    }

    /// Metadata of a machine frame.
    pub fn frame_info(&self, mfn: Mfn) -> Option<&FrameInfo> {
        self.ram.info.get(mfn.0 as usize)
    }

    /// Sum of page references held on all frames (0 when nothing is mapped).
    pub fn total_page_refs(&self) -> u64 {
        self.ram
            .info
            .iter()
            .map(|i| i.refs as u64 + i.writable_refs as u64)
            .sum()
    }

    /// Frames neither free nor owned: freed by their owner but still
    /// referenced (a leak if it outlives the mappings).
    pub fn zombie_frames(&self) -> usize {
        self.ram
            .info
            .iter()
            .enumerate()
            .filter(|(i, f)| f.owner == Owner::Free && self.ram.frame_bits.present(*i as u64))
            .count()
    }

    /// A digest (FNV-1a) of every hypervisor-owned frame's number and bytes:
    /// equal digests mean the IOMMU page tables are bit-identical. Tests use
    /// it to show a refused call left the tables unchanged.
    pub fn table_digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (i, f) in self.ram.info.iter().enumerate() {
            if f.owner != Owner::Xen {
                continue;
            }
            let bytes = self.ram.frame(Mfn(i as u64)).map_or(&[][..], |b| &b[..]);
            for b in (i as u64).to_le_bytes().iter().chain(bytes) {
                h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    }

    /// The root table frame of every IOMMU context, for outside tools that
    /// walk the raw tables (with [`Self::frame_bytes`]).
    pub fn context_roots(&self) -> Vec<(DomId, ContextId, Mfn)> {
        let mut roots: Vec<_> = self
            .contexts
            .iter()
            .map(|(&(d, c), ctx)| {
                let root = either_format!(ctx, t => t.root());
                (d, c, root)
            })
            .chain(self.hw_contexts.values().map(|h| (h.owner, h.ctx, h.root)))
            .collect();
        roots.sort();
        roots
    }

    /// Add a PCI device assigned to `owner`, with its own requester id, no
    /// RMRR and no ATS unless `facts` says otherwise.
    pub fn add_device(&mut self, device: Sbdf, facts: DeviceFacts) {
        self.devices.insert(
            device,
            SimDevice {
                facts,
                attached: None,
                blocked: false,
                bus_master_off: false,
                fault_count: 0,
                fault_time_ns: 0,
            },
        );
    }

    /// A device's state.
    pub fn device(&self, device: Sbdf) -> Option<SimDevice> {
        self.devices.get(&device).copied()
    }

    /// Reassign `device` to `new_owner`, as Xen's `deassign_device` /
    /// `reassign_device_ownership` does: the engine hears of it first
    /// ([`crate::Engine::device_leaving`], with the devices lock held), then
    /// the device's context entry is pointed at the new owner's tables.
    /// Refused, nothing moved, when the engine could not take the device
    /// off its context (the glue's hook fails Xen's assignment so).
    pub fn reassign_device(
        &mut self,
        engine: &crate::Engine,
        device: Sbdf,
        new_owner: DomId,
    ) -> Result<(), Errno> {
        let moved = self.reassign_under_devices_lock(engine, device, new_owner);
        self.run_softirqs();
        moved
    }

    /// [`reassign_device`](Self::reassign_device) up to the domctl's return.
    fn reassign_under_devices_lock(
        &mut self,
        engine: &crate::Engine,
        device: Sbdf,
        new_owner: DomId,
    ) -> Result<(), Errno> {
        let old = self
            .devices
            .get(&device)
            .map(|d| d.facts.owner)
            .ok_or(Errno::NoDev)?;
        self.devices_lock();
        if let Err(e) = engine.device_leaving(self, old, device) {
            self.devices_unlock();
            return Err(e);
        }
        if let Some(d) = self.devices.get_mut(&device) {
            // Xen's reassign finds the context entry naming a domain it
            // knows; one still naming an engine tag would fail (ESRCH).
            assert!(
                d.attached.is_none(),
                "Xen would find {device} still in an engine context and fail"
            );
            d.facts.owner = new_owner;
            d.blocked = false;
        }
        self.devices_unlock();
        Ok(())
    }

    /// Where a device's DMA goes now: through the context its context
    /// entry names (owner, context, root); with no root (every DMA faults)
    /// for a device that does not exist, whose entry is cleared, or names a
    /// tag that is gone; straight to the machine address behind a unit
    /// that translates nothing (Xen left it off: `iommu=no-igfx`, firmware
    /// quirks), whatever its context entry says.
    fn dma_route(&self, device: Sbdf) -> DmaRoute {
        if self
            .devices
            .get(&device)
            .is_some_and(|d| !d.facts.translated)
        {
            return DmaRoute::Untranslated;
        }
        let (owner, ctx, root) =
            self.device_route(device)
                .unwrap_or((DomId(u16::MAX), ContextId::DEFAULT, None));
        DmaRoute::Context(owner, ctx, root)
    }

    fn device_route(&self, device: Sbdf) -> Option<(DomId, ContextId, Option<Mfn>)> {
        let d = self.devices.get(&device)?;
        if d.blocked {
            return Some((d.facts.owner, ContextId::DEFAULT, None));
        }
        Some(match d.attached {
            Some(hw) => {
                let h = self.hw_contexts.get(&hw.0)?;
                (h.owner, h.ctx, Some(h.root))
            }
            None => (
                d.facts.owner,
                ContextId::DEFAULT,
                self.context_root(d.facts.owner, ContextId::DEFAULT),
            ),
        })
    }

    /// `device` reads `len` bytes at bus address `addr` through the
    /// context its context entry names. Faults are recorded and returned.
    pub fn device_dma_read(
        &mut self,
        device: Sbdf,
        addr: u64,
        len: usize,
    ) -> Result<Vec<u8>, DmaFault> {
        self.device_access(device, addr, false)?;
        let route = self.dma_route(device);
        let r = self.dma_read_via(route, addr, len);
        self.note_device_fault(device, &r);
        r
    }

    /// `device` writes `data` at bus address `addr`.
    pub fn device_dma_write(
        &mut self,
        device: Sbdf,
        addr: u64,
        data: &[u8],
    ) -> Result<(), DmaFault> {
        self.device_access(device, addr, true)?;
        let route = self.dma_route(device);
        let r = self.dma_write_via(route, addr, data);
        self.note_device_fault(device, &r);
        r
    }

    /// A device access starts: 1 µs of the DMA clock; none at all from a
    /// device whose bus mastering Xen turned off.
    fn device_access(&mut self, device: Sbdf, addr: u64, write: bool) -> Result<(), DmaFault> {
        self.dma_clock_ns += 1_000;
        match self.devices.get(&device) {
            Some(d) if d.bus_master_off => Err(DmaFault {
                owner: d.facts.owner,
                context: ContextId::DEFAULT,
                addr,
                write,
                reason: hardware::FaultReason::BusMasterOff,
            }),
            _ => Ok(()),
        }
    }

    /// A device's fault goes to Xen's fault tasklet.
    fn note_device_fault<T>(&mut self, device: Sbdf, r: &Result<T, DmaFault>) {
        if let Err(f) = r {
            if self.device_faults.len() < FAULTS_KEPT {
                self.device_faults
                    .push_back((device, self.dma_clock_ns, *f));
            }
        }
    }

    /// Xen's IOMMU fault tasklet (VT-d `__do_iommu_page_fault()`, AMD-Vi
    /// `parse_event_log_entry()`), over the faults recorded since it last
    /// ran: each is counted against its device by
    /// `pci_check_disable_device()`, which turns the device's bus mastering
    /// off at the [`hardware::PT_FAULT_THRESHOLD`]th fault close together,
    /// unless the engine says a revocation made it (patch 0008,
    /// [`crate::Engine::fault_expected`]). How many devices it turned off.
    pub fn process_device_faults(&mut self, engine: &crate::Engine) -> u32 {
        let mut turned_off = 0;
        while let Some((device, at, f)) = self.device_faults.pop_front() {
            let Some(owner) = self.devices.get(&device).map(|d| d.facts.owner) else {
                continue;
            };
            // The glue asks under `pcidevs_lock`, for an owner neither
            // dying nor shut down (crashed): one that will never
            // acknowledge a notice gets Xen's rule as it stands.
            let alive = self.domains.get(&owner).is_some_and(|d| !d.dying);
            // One clock for both, as Xen's tasklet reads `NOW()` for both:
            // the machine's DMA clock at the fault.
            self.devices_lock();
            let expected = alive && engine.fault_expected(owner, device, Bfn(f.addr >> 12), at);
            self.devices_unlock();
            if expected {
                self.faults_expected += 1;
                continue;
            }
            let Some(d) = self.devices.get_mut(&device) else {
                continue;
            };
            if at < d.fault_time_ns || at - d.fault_time_ns > hardware::FAULT_DECAY_NS {
                d.fault_count >>= 1;
            }
            d.fault_time_ns = at;
            d.fault_count += 1;
            if d.fault_count >= hardware::PT_FAULT_THRESHOLD && !d.bus_master_off {
                d.bus_master_off = true;
                turned_off += 1;
            }
        }
        turned_off
    }

    /// The device's owner turns its bus mastering on (or off) again: its
    /// PCI command register.
    pub fn set_bus_master(&mut self, device: Sbdf, on: bool) {
        if let Some(d) = self.devices.get_mut(&device) {
            d.bus_master_off = !on;
        }
    }

    /// The raw bytes of a machine frame, if allocated.
    pub fn frame_bytes(&self, mfn: Mfn) -> Option<&[u8; 4096]> {
        self.ram.frame(mfn)
    }

    /// The pages a device reaches, through the IOTLB and the
    /// paging-structure cache as they are, other than the tables map them
    /// now (another frame, or an access the tables no longer give; a
    /// cached pointer to a leaf table since unlinked reaches what that
    /// table still holds): what a device can still reach because a flush
    /// has not come, or never will. Each is safe only while whoever
    /// unmapped it still holds the page it reaches (the engine: until its
    /// flush), so a test checks them against the pages the engine holds
    /// ([`StaleTranslation::held_as`]); one it does not hold is a device
    /// reaching memory the host may have given to someone else.
    pub fn stale_iotlb_pages(&self) -> Vec<StaleTranslation> {
        let tables_leaf = |owner, ctx, bfn| {
            let (level, _) = self.context_leaf(owner, ctx, Bfn(bfn))?;
            let (mfn, p, _) = self.translate(owner, ctx, Bfn(bfn))?;
            Some((level, (mfn, p.read, p.write)))
        };
        let mut stale: Vec<_> = super::hardware::stale_pages(
            &self.ram,
            &self.iotlb,
            self.format,
            self.snoop_control,
            |owner, ctx| self.context_root(owner, ctx),
            tables_leaf,
        )
        .into_iter()
        .map(
            |(owner, context, bfn, (mfn, read, write))| StaleTranslation {
                owner,
                context,
                bfn: Bfn(bfn),
                mfn,
                read,
                write,
            },
        )
        .collect();
        stale.sort_by_key(|t| (t.owner, t.context, t.bfn.0));
        stale.dedup();
        stale
    }

    /// Page-table frames freed, or reused as tables, while the IOMMU could
    /// still have cached them (unlinked, not yet flushed): each one a
    /// use-after-free a real IOMMU could walk into.
    pub fn tables_freed_before_flush(&self) -> u64 {
        self.ram.tables_freed_before_flush
    }

    /// Page-table frames given back to the host while memory still held a
    /// present entry the CPU had cleared (a store not written back on a
    /// non-coherent IOMMU): machine frame numbers left for the frame's next
    /// owner.
    pub fn tables_freed_stale(&self) -> u64 {
        self.ram.tables_freed_stale
    }

    /// Present entries changed in table frames the IOMMU could still walk
    /// through its caches from where they were unlinked (not yet flushed):
    /// each a translation a device could see change before the flush.
    pub fn unlinked_tables_rewritten(&self) -> u64 {
        self.ram.unlinked_tables_rewritten
    }

    /// Table frames linked while memory still held a present entry of
    /// theirs the CPU had cleared (not written back): each a window in
    /// which a device could walk the stale entry through the new link.
    pub fn tables_linked_over_stale_entries(&self) -> u64 {
        self.ram.tables_linked_over_stale_entries
    }

    /// Pages flushed from the CPU caches when freed because a device may
    /// have written them without snooping.
    pub fn cache_flushes(&self) -> u64 {
        self.ram.cache_flushes
    }

    /// Whether the IOMMU's table walks snoop the CPU caches (default: no,
    /// as QEMU's intel-iommu: table stores count only once written back).
    pub fn set_coherent_table_walks(&mut self, coherent: bool) {
        self.ram.non_coherent_tables = !coherent;
        if coherent {
            self.ram.sync_tables();
            self.ram.stale_lines.clear();
        }
    }

    /// Table cache lines written back so far, and lines stored to and not
    /// yet written back.
    pub fn table_lines(&self) -> (u64, usize) {
        (self.ram.lines_synced, self.ram.stale_lines.len())
    }

    /// Table cache lines written back so far while table walks are not
    /// coherent, clean or not (each one a `clflush` on Xen).
    pub fn table_line_writebacks(&self) -> u64 {
        self.ram.line_writebacks
    }

    /// Frames the hypervisor holds for page tables and its own data.
    pub fn xen_frames(&self) -> usize {
        self.ram
            .info
            .iter()
            .filter(|f| f.owner == Owner::Xen)
            .count()
    }

    /// Table frames allocated so far, for Xen's tables and the engine's.
    pub fn tables_allocated(&self) -> u64 {
        self.ram.tables_allocated
    }

    /// Table frames given back to the host so far, Xen's tables' and the
    /// engine's: a call's work of freeing tables, read around it.
    pub fn tables_freed(&self) -> u64 {
        self.ram.tables_freed
    }

    /// Of [`tables_freed`](Self::tables_freed), those freed with the
    /// devices lock (Xen's `pcidevs_lock`) held.
    pub fn tables_freed_under_devices_lock(&self) -> u64 {
        self.tables_freed_under_devices_lock
    }

    /// Free RAM frames.
    pub fn free_frames(&self) -> usize {
        self.ram.free.len()
    }

    /// The IOMMU format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Software translation of `bfn` in a context through the engine's own
    /// page-table walker (the device uses the independent hardware walker).
    pub fn translate(
        &self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        if ctx != ContextId::DEFAULT {
            let root = self.context_root(owner, ctx)?;
            return match self.format {
                Format::Vtd => crate::pgtable::walk::<Vtd>(&self.ram, root, bfn),
                Format::Lpae => crate::pgtable::walk::<Lpae>(&self.ram, root, bfn),
            };
        }
        either_format!(self.contexts.get(&(owner, ctx))?, t => t.translate(&self.ram, bfn))
    }

    /// The raw leaf entry that maps `bfn` in `owner`'s context `ctx` (0:
    /// Xen's own tables; others: the engine's) and its level: 1 for a 4 KiB
    /// page, 2 for a 2 MiB superpage. What outside tools read to see
    /// whether a run of maps became a superpage.
    pub fn context_leaf(&self, owner: DomId, ctx: ContextId, bfn: Bfn) -> Option<(u32, u64)> {
        let root = self.context_root(owner, ctx)?;
        match self.format {
            Format::Vtd => crate::pgtable::leaf_at::<Vtd>(&self.ram, root, bfn),
            Format::Lpae => crate::pgtable::leaf_at::<Lpae>(&self.ram, root, bfn),
        }
    }

    fn context_root(&self, owner: DomId, ctx: ContextId) -> Option<Mfn> {
        if ctx != ContextId::DEFAULT {
            return self
                .hw_contexts
                .values()
                .find(|h| h.owner == owner && h.ctx == ctx)
                .map(|h| h.root);
        }
        Some(either_format!(self.contexts.get(&(owner, ctx))?, t => t.root()))
    }

    /// The DMA device of `owner` (attached to context `ctx`) reads `len`
    /// bytes at bus address `addr`. Faults are recorded and returned.
    pub fn dma_read(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        addr: u64,
        len: usize,
    ) -> Result<Vec<u8>, DmaFault> {
        let root = self.context_root(owner, ctx);
        self.dma_read_via(DmaRoute::Context(owner, ctx, root), addr, len)
    }

    /// (A frame that is not RAM reads as zeros.)
    fn dma_read_via(
        &mut self,
        route: DmaRoute,
        addr: u64,
        len: usize,
    ) -> Result<Vec<u8>, DmaFault> {
        let mut out = Vec::with_capacity(len);
        let mut a = addr;
        while out.len() < len {
            let mfn = self.dma_translate(route, a, false)?;
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(len - out.len());
            let frame = self.ram.frame(mfn).copied().unwrap_or([0; 4096]);
            out.extend_from_slice(&frame[off..off + n]);
            a += n as u64;
        }
        Ok(out)
    }

    /// The DMA device writes `data` at bus address `addr`.
    pub fn dma_write(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        addr: u64,
        data: &[u8],
    ) -> Result<(), DmaFault> {
        let root = self.context_root(owner, ctx);
        self.dma_write_via(DmaRoute::Context(owner, ctx, root), addr, data)
    }

    /// (A write to a frame that is not RAM goes nowhere.)
    fn dma_write_via(&mut self, route: DmaRoute, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        let mut a = addr;
        while done < data.len() {
            let mfn = self.dma_translate(route, a, true)?;
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(data.len() - done);
            if let Some(f) = self.ram.frame_mut(mfn) {
                f[off..off + n].copy_from_slice(&data[done..done + n]);
            }
            done += n;
            a += n as u64;
        }
        Ok(())
    }

    fn dma_translate(&mut self, route: DmaRoute, addr: u64, write: bool) -> Result<Mfn, DmaFault> {
        let DmaRoute::Context(owner, ctx, root) = route else {
            // Straight to the machine address, whoever's frame it is.
            return Ok(Mfn(addr >> 12));
        };
        let r = hardware::translate(
            &self.ram,
            &mut self.iotlb,
            self.format,
            self.snoop_control,
            owner,
            ctx,
            root,
            addr,
            write,
        );
        if let Err(f) = &r {
            if self.faults.len() >= FAULTS_KEPT {
                self.faults.pop_front();
            }
            self.faults.push_back(*f);
            self.faults_total += 1;
        }
        r
    }

    /// `owner`'s default context, made on first use, and the RAM its
    /// tables live in (one search of the context map per call: it is
    /// simulator bookkeeping, not a cost Xen has).
    fn context_mut_or_create(
        &mut self,
        owner: DomId,
        ctx: ContextId,
    ) -> Result<(&mut Context, &mut Ram), Errno> {
        Self::context_in(&mut self.contexts, &mut self.ram, self.format, owner, ctx)
    }

    /// [`context_mut_or_create`](Self::context_mut_or_create) from the
    /// fields it uses, for a caller that counts in others meanwhile.
    fn context_in<'a>(
        contexts: &'a mut BTreeMap<(DomId, ContextId), Context>,
        ram: &'a mut Ram,
        format: Format,
        owner: DomId,
        ctx: ContextId,
    ) -> Result<(&'a mut Context, &'a mut Ram), Errno> {
        if ctx != ContextId::DEFAULT {
            return Err(Errno::NoEnt);
        }
        let c = match contexts.entry((owner, ctx)) {
            std::collections::btree_map::Entry::Occupied(c) => c.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Self::new_context(format, ram)?)
            }
        };
        Ok((c, ram))
    }

    fn new_context(format: Format, ram: &mut Ram) -> Result<Context, Errno> {
        Ok(match format {
            Format::Vtd => Context::Vtd(IoPageTable::with_options(
                &mut WriteThrough(ram),
                TableOptions::xen_own(),
            )?),
            Format::Lpae => Context::Lpae(IoPageTable::with_options(
                &mut WriteThrough(ram),
                TableOptions::xen_own(),
            )?),
        })
    }

    /// Run a hypercall of `caller` through `engine`, as the hypervisor's
    /// entry stub would (it sets the current domain first).
    pub fn hypercall(&mut self, engine: &crate::Engine, caller: DomId, cmd: u32, arg: u64) -> i64 {
        self.current = caller;
        // Xen: is_control_domain() || is_hardware_domain().
        let is_host = self
            .domain_info(caller)
            .is_some_and(|d| d.control || d.hardware);
        let _caller = super::CallerGuard::enter(is_host);
        // A batch that ended in an error continues, as Xen continues it,
        // without the guest, by the glue's rule (`do_pv_iommu_op()`): a
        // batch or an ending whose answer is an ending's command. Each
        // entry finishes a share of the caller's cells (at least one), the
        // last answers the error. (Bounded here all the same, so an engine
        // bug shows as the command returned.)
        use crate::hypercall::BatchEnding;
        let continues =
            cmd == pviommu_abi::cmd::BATCH || BatchEnding::is_ending_command(cmd.into());
        let mut command = cmd;
        let mut endings = 0;
        loop {
            let rc = engine.hypercall(self, caller, command, arg);
            self.run_softirqs();
            if !continues
                || !BatchEnding::is_ending_command(rc)
                || endings == Self::ENDING_ENTRIES_MAX
            {
                return rc;
            }
            command = rc as u32;
            endings += 1;
            self.ending_entries += 1;
        }
    }

    /// The most entries [`hypercall`](Self::hypercall) makes for a batch
    /// that ended in an error, after the one that met it.
    pub const ENDING_ENTRIES_MAX: u32 = 1 << 20;

    /// What runs as this CPU processes softirqs, on the way back to the
    /// guest (a call that returns, or is preempted to continue later) or
    /// in a wait. The simulator runs them at the end of every call of its
    /// own that can reach the engine: a PV-IOMMU call, and each hooked
    /// call (a balloon, a type change, a slice of a domctl, a device
    /// reassignment), so that what a hook asked for comes when Xen's
    /// would, not at the next PV-IOMMU call. They are the glue's
    /// revocation VIRQ tasklet (the wake-ups the engine asked for since),
    /// and Xen's `free_pgt_tasklet`, which frees the tables its IOMMU code
    /// queued (`iommu_queue_free_pgtable()`: a leaf table folded into a
    /// superpage, one an order-9 map or unmap took down), flushed or not.
    /// Xen's own batches flush before they get there; a table the
    /// engine's calls had Xen unlink and left unflushed is counted in
    /// [`tables_freed_before_flush`](Self::tables_freed_before_flush) as
    /// it goes. (Until this model the simulator freed them at the flush,
    /// and hid a batch preempted between a mid-call write of its entries
    /// and its flush.)
    ///
    /// Not for an owner whose last flush of its context 0 failed: what Xen
    /// frees then is Xen's own failure (a queued invalidation that times
    /// out panics VT-d's Xen), out of the engine's hands, and the
    /// simulator's injected failures test what the engine does about its
    /// own pages.
    pub fn run_softirqs(&mut self) {
        // The glue's tasklet: each owner asked for since, woken once.
        let host = HostAllocations::begin();
        for owner in core::mem::take(&mut self.revocation_wakeups_pending) {
            // As `rcu_lock_domain_by_id()` there: a domain gone meanwhile
            // is not woken (one at its domid since would be, spuriously).
            if self.domains.contains_key(&owner) {
                *self.revocation_wakeups.entry(owner).or_insert(0) += 1;
            }
        }
        drop(host);
        for (&(owner, _), c) in self.contexts.iter_mut() {
            if self.flush_failed_for.contains(&owner) {
                continue;
            }
            let mut mem = WriteThrough(&mut self.ram);
            either_format!(c, t => t.release_freed(&mut mem))
        }
    }

    /// Visit the calling domain's RAM behind guest-physical `addr..addr+len`
    /// page by page: `f(mfn, offset in frame, offset in buffer, length)`.
    /// Run `f(ram, frame, offset in it, bytes done, bytes here, writable)`
    /// over each page of the calling guest's `[addr, addr + len)`, in
    /// order; `writable` is false where Xen drops a copy's writes without
    /// a fault: an HVM or PVH caller's p2m_ram_ro page on x86
    /// (`__hvm_copy()`'s `p2m_is_discard_write()`; the VRAM range's
    /// logdirty pages are written, and marked dirty). On Arm (the LPAE
    /// machine) a copy to the guest (`writes`) faults there instead:
    /// `get_page_from_gva()` with `GV2M_WRITE` finds stage 2 read-only.
    fn for_guest_span(
        &mut self,
        addr: u64,
        len: usize,
        writes: bool,
        mut f: impl FnMut(&mut Ram, Mfn, usize, usize, usize, bool) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        let d = self.domains.get(&self.current).ok_or(Errno::Fault)?;
        addr.checked_add(len as u64).ok_or(Errno::Fault)?;
        // Page by page, as Xen's copies go (`hvm_copy_*` by page, a PV
        // copy until its first fault): a fault part-way leaves the pages
        // before it copied. The engine must not rely on a failed copy
        // having copied nothing.
        let mut done = 0;
        let mut a = addr;
        while done < len {
            let Some(&P2mEntry::Ram { mfn, read_only }) = d.p2m.get(&Gfn(a >> 12)) else {
                return Err(Errno::Fault);
            };
            if read_only && writes && self.format == Format::Lpae {
                return Err(Errno::Fault);
            }
            let discards = read_only && !d.pv && !d.vram_logdirty.contains(&(a >> 12));
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(len - done);
            f(&mut self.ram, mfn, off, done, n, !discards)?;
            done += n;
            a += n as u64;
        }
        Ok(())
    }

    /// Service `name`, which takes a p2m lock, is called: a violation
    /// under an engine lock ([`crate::lock_check::note_service`]), and
    /// counted from the engine's gfn hook (`services_under_p2m_lock`).
    fn note_p2m_service(&mut self, name: &str) {
        crate::lock_check::note_service(name);
        if let Some(held) = crate::lock_check::p2m_hook_of() {
            self.services_under_p2m_lock += 1;
            eprintln!("lock order: {name} called from a hook of d{}", held.0);
        }
    }
}

impl Platform for SimMachine {
    fn copy_from_guest(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        self.note_p2m_service("copy_from_guest (takes the caller's p2m lock)");
        self.for_guest_span(addr, buf.len(), false, |ram, mfn, off, done, n, _| {
            let f = ram.frame(mfn).ok_or(Errno::Fault)?;
            buf[done..done + n].copy_from_slice(&f[off..off + n]);
            Ok(())
        })
    }
    fn copy_to_guest(&mut self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        self.note_p2m_service("copy_to_guest (takes the caller's p2m lock)");
        self.for_guest_span(addr, buf.len(), true, |ram, mfn, off, done, n, writable| {
            let f = ram.frame_mut(mfn).ok_or(Errno::Fault)?;
            if writable {
                f[off..off + n].copy_from_slice(&buf[done..done + n]);
            }
            Ok(())
        })
    }
    fn domain_info(&self, domid: DomId) -> Option<DomainInfo> {
        let _host = HostAllocations::begin();
        crate::lock_check::note_service("domain_info (RCU domain lookup)");
        crate::lock_check::note_unlocked("domain_info");
        let d = self.domains.get(&domid)?;
        Some(DomainInfo {
            dying: d.dying,
            control: d.privileged,
            hardware: domid == DomId::DOM0,
            target: d.target,
            translation: d.translation,
        })
    }
    fn xsm_check(
        &self,
        caller: DomId,
        target: Option<DomId>,
        action: XsmAction,
    ) -> Result<(), Errno> {
        // (Xen's pvx_xsm_check() asserts no engine lock is held: FLASK's
        // checks may take the AVC's locks.)
        crate::lock_check::note_service("xsm_check (FLASK: the AVC's locks)");
        crate::lock_check::note_unlocked("xsm_check");
        self.xsm_checks
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        // As Xen's glue (`pvx_xsm_check()`): no caller or no target domain
        // is `ESRCH`, a map with no target `EPERM`, before any policy.
        // (The simulator allowed a missing target before: the engine's
        // ops on another domain's state then read as zeros what Xen
        // refused.)
        // (Each domain looked up once.)
        let Some(c) = self.domains.get(&caller) else {
            return Err(Errno::Srch);
        };
        let target_domain = match target {
            Some(t) => Some((t, self.domains.get(&t).ok_or(Errno::Srch)?)),
            None if action == XsmAction::Map => return Err(Errno::Perm),
            None => None,
        };
        let denied = |d: &Domain| {
            d.xsm_denied
                || d.xsm_denied_actions
                    .iter()
                    .any(|&(a, host_wide)| a == action && (!host_wide || target.is_none()))
        };
        let protected = target_domain.is_some_and(|(t, d)| t != caller && d.xsm_protected);
        // A refusal is FLASK's errno (`avc_has_perm()`: `-EACCES`), which
        // the ABI gives to a read-only page: the engine answers the caller
        // `EPERM` whatever the policy said (`permission::xsm_allows`).
        if !denied(c) && !protected {
            Ok(())
        } else {
            Err(Errno::Acces)
        }
    }
    fn get_page(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        want_write: bool,
        target: CheckedTarget<'_>,
    ) -> Result<PageLookup, Errno> {
        let _host = HostAllocations::begin();
        self.note_p2m_service("get_page (takes the target's p2m lock)");
        self.page_lookups += 1;
        self.look_up_page(domid, gfn, want_write, Some(target))
    }
    fn get_pages(
        &mut self,
        domid: DomId,
        want_write: bool,
        pages: &mut [PageSlot],
        target: CheckedTarget<'_>,
    ) -> PageRun {
        let _host = HostAllocations::begin();
        self.note_p2m_service("get_pages (takes the target's p2m lock)");
        self.page_runs += 1;
        // One domain lookup for them all, as Xen's glue (whose x86 side
        // also walks a p2m entry once for the pages it maps, in any order);
        // each page referenced by the rule `get_page` follows.
        let limit = self.page_run_limit.unwrap_or(usize::MAX).min(pages.len());
        let Some(d) = self.domains.get(&domid).filter(|d| !d.dying) else {
            return PageRun::default();
        };
        // As Xen's glue: the number read again once the domain is held.
        if !target.still_checked() {
            self.lookups_of_moved_targets += 1;
            return PageRun::default();
        }
        // (A loop each for PV and p2m guests: no test of which a page.)
        let ram = &mut self.ram;
        let stop = if d.pv {
            take_until_refused(ram, pages, limit, want_write, |ram, gfn| {
                classify_pv_frame(ram, domid, d, gfn.0, want_write)
            })
        } else {
            take_ram_until_refused(ram, d, pages, limit, want_write)
        };
        let taken = stop.map_or(limit, |(i, _)| i);
        // The page it stopped at, looked up as `get_page` looks one up
        // (Xen's glue: `pvx_lookup_page()`, side effects and all: paging
        // in), with the run's pages held: its refusal is the run's answer.
        // A run cut at `page_run_limit` stops without looking.
        // (Its number not read again: the glue checks it once a run, with
        // the domain held throughout.)
        let refused = match stop.map(|(_, gfn)| self.look_up_page(domid, gfn, want_write, None)) {
            Some(Ok(PageLookup { kind, mfn: None })) => Some(kind),
            // (Never: the same rule referenced nothing a moment ago.)
            Some(Ok(PageLookup { mfn: Some(mfn), .. })) => {
                self.put_page(mfn, want_write);
                None
            }
            Some(Err(_)) | None => None,
        };
        PageRun { taken, refused }
    }
    fn put_page(&mut self, mfn: Mfn, writable: bool) {
        // A reference that is not the last one of a freed frame frees
        // nothing and allocates nothing: dropped here, with no host marker.
        if let Some(info) = self.ram.info.get_mut(mfn.0 as usize) {
            if info.refs > 1 || info.owner != Owner::Free {
                info.refs = info.refs.saturating_sub(1);
                if writable {
                    info.writable_refs = info.writable_refs.saturating_sub(1);
                }
                return;
            }
        }
        self.put_page_tracked(mfn, writable)
    }
    fn ram_end(&self) -> Mfn {
        Mfn((self.ram.info.len() as u64).max(self.hotplug_end))
    }
    fn reserved_range(&self, index: usize) -> Option<ReservedRange> {
        self.reserved.get(index).copied()
    }
    fn should_preempt(&mut self) -> bool {
        match &mut self.preempt_budget {
            None => false,
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
        }
    }
    fn random_seed(&self) -> u64 {
        self.seed
    }
    fn now_ns(&self) -> u64 {
        // Host monotonic time since the first reading, from 1 (0 is the
        // engine's "timing was off").
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(std::time::Instant::now);
        u64::try_from(start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
    fn notify_revoked(&mut self, owner: DomId) {
        let _host = HostAllocations::begin();
        // The glue's bitmap has no bit for a reserved id.
        if owner.0 < DomId::FIRST_RESERVED {
            self.revocation_wakeups_pending.insert(owner);
        } else {
            self.revocation_wakeups_for_reserved_ids += 1;
        }
        // (That the engine marks its domctl slices: what the checks of
        // `[unlocked]` services under them rest on.)
        if crate::lock_check::host_atomic().is_some() {
            self.wakeups_under_domctl_lock += 1;
        }
    }
    fn note_non_coherent_write(&mut self, mfn: Mfn) {
        // [unlocked] on Xen (the glue's pvx_page_non_coherent asserts it).
        self.note_unlocked_service("note_non_coherent_write");
        if let Some(f) = self.ram.info.get_mut(mfn.0 as usize) {
            f.non_coherent = true;
        }
    }
}

impl TableMemory for SimMachine {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        let _host = HostAllocations::begin();
        self.ram.alloc_table()
    }
    fn free_table(&mut self, table: Mfn) {
        let _host = HostAllocations::begin();
        if self.devices_lock_depth > 0 {
            self.tables_freed_under_devices_lock += 1;
        }
        self.ram.free_table(table)
    }
    fn reuse_table(&mut self, table: Mfn) {
        self.ram.reuse_table(table)
    }
    fn table_is_clear(&self, table: Mfn) -> bool {
        self.ram.table_is_clear(table)
    }
    #[inline]
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.ram.read_entry(table, index)
    }
    #[inline]
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        // A store that links no table and keeps no line for a non-coherent
        // IOMMU allocates nothing: it needs no host marker.
        if !self.ram.non_coherent_tables && self.ram.store_linking_no_table(table, index, raw, None)
        {
            return;
        }
        self.write_entry_tracked(table, index, raw)
    }
    #[inline(always)]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        self.ram.entry_and_count(table, index)
    }
    /// [`write_entry`](TableMemory::write_entry), then
    /// [`set_present_count`](TableMemory::set_present_count), as the
    /// trait's: a store that links no table sets the count with the same
    /// look-up of the frame.
    #[inline]
    fn write_entry_counted(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        if !self.ram.non_coherent_tables
            && self
                .ram
                .store_linking_no_table(table, index, raw, Some(count))
        {
            return;
        }
        self.write_entry_counted_tracked(table, index, raw, count)
    }
    /// The trait's, with one look-up of the frame for the run's stores
    /// that link no table on coherent tables; a store that keeps a line
    /// for a non-coherent IOMMU, or unlinks a table, is `write_entry`'s.
    #[inline]
    fn clear_entries_keeping_one(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        is_present: impl Fn(u64) -> bool,
    ) -> usize {
        if self.ram.non_coherent_tables {
            return clear_entries_one_by_one(self, table, indices, is_present);
        }
        self.ram
            .clear_entries_keeping_one_with(table, indices, is_present, |ram, table, index| {
                // `write_entry`'s on coherent tables.
                if !ram.store_linking_no_table(table, index, 0, None) {
                    let _host = HostAllocations::begin();
                    ram.write_entry(table, index, 0)
                }
            })
    }
    fn write_back_table(&mut self, table: Mfn) {
        // Whole: its record in the set of dirty lines goes (as on Xen),
        // else the next flush writes the same lines back again.
        self.ram.dirty.forget(table);
        self.ram.sync_lines(table, u64::MAX)
    }
    fn present_count(&self, table: Mfn) -> u16 {
        self.ram.present_count(table)
    }
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        self.ram.set_present_count(table, count)
    }
}

impl SimMachine {
    /// [`write_entry`](TableMemory::write_entry) with the full bookkeeping
    /// of the table memory, as host code. Apart: the common store then
    /// saves fewer registers.
    #[inline(never)]
    fn write_entry_tracked(&mut self, table: Mfn, index: usize, raw: u64) {
        let _host = HostAllocations::begin();
        self.ram.write_entry(table, index, raw)
    }
    /// [`write_entry_counted`](TableMemory::write_entry_counted) with the
    /// full bookkeeping of the table memory. Apart, as
    /// [`write_entry_tracked`](Self::write_entry_tracked).
    #[inline(never)]
    fn write_entry_counted_tracked(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        self.write_entry_tracked(table, index, raw);
        self.ram.set_present_count(table, count)
    }
    /// [`put_page`](Platform::put_page) of a frame's last reference, or
    /// one the RAM lacks (the index panics, as host code): the frame may
    /// be freed.
    #[inline(never)]
    fn put_page_tracked(&mut self, mfn: Mfn, writable: bool) {
        let _host = HostAllocations::begin();
        let info = &mut self.ram.info[mfn.0 as usize];
        info.refs = info.refs.saturating_sub(1);
        if writable {
            info.writable_refs = info.writable_refs.saturating_sub(1);
        }
        if info.refs == 0 && info.owner == Owner::Free && self.ram.is_present(mfn) {
            // The glue suspends this CPU's flush suppression around its
            // put (`pvx_put_page()`, as `guest_remove_page()` does): the
            // put may free another domain's frame, whose own IOMMU entry
            // goes with it, inside a hook that a batch of the suppressing
            // domain's p2m changes runs (a review of 2026-12-06).
            let dont_flush = core::mem::replace(&mut self.dont_flush_iotlb, false);
            self.release_frame(mfn);
            self.dont_flush_iotlb = dont_flush;
        }
    }
    /// An `[unlocked]` service of the engine boundary was called: neither
    /// an engine lock nor the devices lock may be held (the glue asserts
    /// `ASSERT_NOT_IN_ATOMIC()`, which pcidevs_lock, a spinlock, trips too).
    fn note_unlocked_service(&self, name: &str) {
        crate::lock_check::note_service(name);
        crate::lock_check::note_unlocked(name);
        if self.devices_lock_depth > 0 {
            crate::lock_check::note_violation(&alloc::format!(
                "{name} called with the devices lock held"
            ));
        }
    }

    /// A page lookup by `get_page`'s rule, the one of `get_page` and of the
    /// page a run stops at (Xen's `pvx_lookup_page()` and
    /// `pvx_accept_page()`): the page referenced if usable, else why not;
    /// another domain's paged-out page starts paging in. Nothing is looked
    /// up unless `target`'s number is still the one the map checked (`None`:
    /// checked already in this hold of the domain), read once the domain
    /// is found (Xen's glue: after `rcu_lock_domain_by_id()`
    /// and the barrier after raising the domain's `pviommu_pages`). A domain
    /// at the domid other than the checked one came there after the checked
    /// one's kill ended, whose teardown moved the number first: read after
    /// the hold, the number tells. A moved one is counted
    /// (`lookups_of_moved_targets`).
    fn look_up_page(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        want_write: bool,
        target: Option<CheckedTarget<'_>>,
    ) -> Result<PageLookup, Errno> {
        let d = self.domains.get(&domid).ok_or(Errno::Srch)?;
        if d.dying {
            return Err(Errno::Srch);
        }
        if target.is_some_and(|t| !t.still_checked()) {
            self.lookups_of_moved_targets += 1;
            return Err(Errno::Srch);
        }
        // A PV guest's "gfn" is a machine frame: no p2m, no pager.
        let (kind, mfn) = if d.pv {
            classify_pv_frame(&self.ram, domid, d, gfn.0, want_write)
        } else if want_write && (d.log_dirty || d.vram_sweep.freezes_writes_to(gfn.0)) {
            // (Before the pager: see `classify_entry`. A VRAM range being
            // revoked: `RangeSweep::freezes_writes_to`.)
            classify_entry(&self.ram, None, want_write, true)
        } else {
            match d.p2m.get(&gfn) {
                // The caller's own page: Xen's glue does not start paging it
                // in (that may sleep for the pager's ring with the lookup's
                // locks held, xen/pviommu.c); the domain pages it in by
                // touching it.
                Some(P2mEntry::PagedOut) if domid == self.current => {
                    return Ok(PageLookup {
                        kind: PageKind::PagedOut,
                        mfn: None,
                    });
                }
                // Xen starts paging the frame in and answers EAGAIN; the
                // simulator's pager finishes at once, so a retry finds it.
                Some(P2mEntry::PagedOut) => {
                    self.paging_requests += 1;
                    if let Ok(mfn) = self.ram.alloc(Owner::Domain(domid)) {
                        if let Some(d) = self.domains.get_mut(&domid) {
                            d.p2m.insert(
                                gfn,
                                P2mEntry::Ram {
                                    mfn,
                                    read_only: false,
                                },
                            );
                        }
                    }
                    return Ok(PageLookup {
                        kind: PageKind::PagedOut,
                        mfn: None,
                    });
                }
                entry => classify_entry(&self.ram, entry, want_write, d.log_dirty),
            }
        };
        if let Some(m) = mfn {
            self.ram.reference(m, want_write);
        }
        Ok(PageLookup { kind, mfn })
    }

    /// One 4 KiB entry of a default context written (made on first use,
    /// as Xen's tables are with the domain), as Xen 4.17's VT-d
    /// `intel_iommu_map_page()` writes it, and the [`flushf`] flags it
    /// sets: `ADDED`, and `MODIFIED | ALL` where a full table folded into
    /// a superpage. Over a present entry Xen's drivers do not refuse:
    /// they overwrite it (`MODIFIED` too), taking the BFN from whatever it
    /// mapped, so the simulator does the same and counts it in
    /// `maps_over_present`, which the engine must keep at zero. The same
    /// entry again writes nothing and sets no flag (Xen returns early).
    fn map_page(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<u32, Errno> {
        let (c, ram) = self.context_mut_or_create(owner, ctx)?;
        let (written, overwrote) = Self::map_page_in(c, ram, bfn, mfn, perms, attr);
        self.maps_over_present += u64::from(overwrote);
        written
    }

    /// [`map_page`](Self::map_page) into context `c`, found already: its
    /// answer, and whether it overwrote a present entry (for
    /// `maps_over_present`). (Inlined: in a run's loop the context, the
    /// RAM and the attributes then stay in registers from page to page.)
    #[inline(always)]
    fn map_page_in(
        c: &mut Context,
        ram: &mut Ram,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> (Result<u32, Errno>, bool) {
        either_format!(c, t => Self::map_page_in_table(t, ram, bfn, mfn, perms, attr))
    }

    /// [`map_page_in`](Self::map_page_in) into a context's tables, of
    /// either format. (Generic: a run's loop picks the format once, and
    /// the tables' map inlines into it.)
    #[inline(always)]
    fn map_page_in_table<F: PageTableFormat>(
        c: &mut IoPageTable<F>,
        ram: &mut Ram,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> (Result<u32, Errno>, bool) {
        // Xen's own tables: its VT-d code writes back each entry it stores.
        let mut mem = WriteThrough(ram);
        let before = c.queued_tables_marker();
        let mut overwrote = false;
        let written = match c.map(&mut mem, bfn, mfn, perms, attr) {
            Ok(()) => Ok(flushf::ADDED),
            Err(Errno::Inval) => match c.translate(&mem, bfn) {
                // (`Inval` is also a frame or BFN the format cannot hold:
                // then nothing maps `bfn` here and the answer stands.)
                None => Err(Errno::Inval),
                Some(old) if old == (mfn, perms, attr) => Ok(0),
                Some(_) => {
                    // Counted whether or not the overwrite then succeeds:
                    // the engine asked for it.
                    overwrote = true;
                    // A 4 KiB entry is rewritten in place; a superpage over
                    // it is split first (the page's unmap), with the
                    // allocation Xen's walk makes there, which can fail
                    // (nothing changed then). An encoding the format lacks
                    // is refused before anything changes.
                    match c.overwrite_leaf(&mut mem, bfn, mfn, perms, attr) {
                        Err(Errno::NoEnt) => c
                            .unmap(&mut mem, bfn)
                            .and_then(|()| c.map(&mut mem, bfn, mfn, perms, attr)),
                        other => other,
                    }
                    .map(|()| flushf::ADDED | flushf::MODIFIED)
                }
            },
            Err(e) => Err(e),
        };
        let unlinked = unlinked_between(before, c.queued_tables_marker());
        (written.map(|w| w | unlinked), overwrote)
    }

    /// What [`whole_map_flags`](Self::whole_map_flags) needs from before a
    /// 2 MiB call at `bfn`: the level-2 entry it replaces, and the marker
    /// of tables queued to be freed.
    fn before_whole_map(
        &self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
    ) -> (Entry, (Option<Mfn>, usize)) {
        let marker = self
            .contexts
            .get(&(owner, ctx))
            .map(Context::queued_tables_marker);
        (
            self.level2_entry_at(owner, ctx, bfn),
            marker.unwrap_or((None, 0)),
        )
    }

    /// The level-2 entry over `bfn` in `owner`'s default context (`Empty`
    /// before the context is made).
    fn level2_entry_at(&self, owner: DomId, ctx: ContextId, bfn: Bfn) -> Entry {
        self.contexts
            .get(&(owner, ctx))
            .map_or(Entry::Empty, |c| c.level2_entry(&self.ram, bfn))
    }

    /// The [`flushf`] flags of one 2 MiB call (Xen's order-9 `map_page`)
    /// that the simulator made of 512 page writes: Xen writes one entry,
    /// so the leaf table the simulator built and folded on the way is not
    /// Xen's. `ADDED`; `MODIFIED` where the entry it replaced was present
    /// (a table Xen then frees with `queue_free_pt()`, or a superpage);
    /// `MODIFIED | ALL` where more folded (into 1 GiB) or was freed; none
    /// for the same superpage again (Xen returns early).
    fn whole_map_flags(
        &self,
        owner: DomId,
        ctx: ContextId,
        (replaced, (freed, folded)): (Entry, (Option<Mfn>, usize)),
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> u32 {
        if replaced == (Entry::Leaf { mfn, perms, attr }) {
            return 0;
        }
        let mut flags = flushf::ADDED;
        if replaced != Entry::Empty {
            flags |= flushf::MODIFIED;
        }
        let (freed_now, folded_now) = match self.contexts.get(&(owner, ctx)) {
            Some(c) => c.queued_tables_marker(),
            None => (freed, folded),
        };
        // (The one fold expected: the simulator's own leaf table, or the
        // table it replaced.)
        if freed_now != freed || folded_now > folded + 1 {
            flags |= flushf::MODIFIED | flushf::ALL;
        }
        flags
    }

    /// One call into the IOMMU driver's unmap of a default context, as
    /// Xen's `unmap_page`: page `bfn`, or with `whole` the 2 MiB from it
    /// (aligned), one entry where a superpage maps it, each 4 KiB entry of
    /// the table there otherwise (Xen clears the directory entry and frees
    /// the table: the same translations gone, nothing split). `NoEnt`: no
    /// entry (a page) or nothing mapped (the default context not made).
    /// `Ok`: the [`flushf`] flags Xen's `intel_iommu_unmap_page()` sets:
    /// `MODIFIED`, and `ALL` where a page's unmap emptied a table, which
    /// Xen unlinks and queues to be freed (a 2 MiB unmap frees the leaf
    /// table it clears under `MODIFIED` alone: the 2 MiB flush covers it).
    fn unmap_page(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        whole: bool,
    ) -> Result<u32, Errno> {
        self.unmap_calls += 1;
        if self.fail_unmaps > 0 {
            self.fail_unmaps -= 1;
            return Err(Errno::NoMem);
        }
        if let Some((_, n)) = self.fail_unmaps_of.filter(|&(who, _)| who == owner) {
            self.unmaps_of_seen = self.unmaps_of_seen.wrapping_add(1);
            if n == 0 || !self.unmaps_of_seen.is_multiple_of(n) {
                return Err(Errno::NoMem);
            }
        }
        let Some(c) = self.contexts.get_mut(&(owner, ctx)) else {
            return Err(Errno::NoEnt);
        };
        let mut mem = WriteThrough(&mut self.ram);
        if !whole {
            let before = c.queued_tables_marker();
            c.unmap(&mut mem, bfn)?;
            return Ok(flushf::MODIFIED | c.unlinked_since(before));
        }
        let superpage = either_format!(c, t => t.unmap_superpage(&mut mem, bfn));
        if superpage.is_ok() {
            self.superpage_unmaps += 1;
            return Ok(flushf::MODIFIED);
        }
        // The leaf table's entries up to its last one first, where the
        // table is the cached one: `unmap_in_cached_leaf` clears them as
        // `unmap` of each page would, with one look-up of the table, and
        // stores only where an entry was present (a page cleared). The
        // rest (all of them where the table is not the cached one) one by
        // one: the last entry's unmap frees the table.
        let mut noting = NotingStores(&mut mem, false);
        let done = either_format!(c, t => t.unmap_in_cached_leaf(&mut noting, bfn, 0x200));
        let mut cleared = noting.1;
        for page in bfn.0 + done..bfn.0 + 0x200 {
            match c.unmap(&mut mem, Bfn(page)) {
                Ok(()) => cleared = true,
                Err(Errno::NoEnt) => {}
                Err(e) => return Err(e),
            }
        }
        // (Xen: nothing present under the directory entry, nothing done.)
        if cleared {
            Ok(flushf::MODIFIED)
        } else {
            Err(Errno::NoEnt)
        }
    }
}

impl SimMachine {
    /// Xen 4.17's `iommu_unmap()` of BFNs `first..=last` of a default
    /// context: each call takes the largest size the IOMMU has (here 4 KiB
    /// and 2 MiB) that starts aligned and that the rest of the run covers
    /// (`mapping_order()`), as the glue's `pvx_unmap_run()` makes them: a
    /// failed call does not stop it. The first error is the answer.
    /// (Nothing mapped is no error: Xen's drivers answer 0.) The calls'
    /// [`flushf`] flags go into `flags`.
    fn xen_unmap_pages(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        first: u64,
        last: u64,
        flags: &mut u32,
    ) -> Result<(), Errno> {
        let mut result = Ok(());
        let mut at = first;
        while at <= last {
            let whole = at & 0x1ff == 0 && last - at >= 0x1ff;
            match self.unmap_page(owner, ctx, Bfn(at), whole) {
                Ok(set) => *flags |= set,
                Err(Errno::NoEnt) => {}
                Err(e) => result = result.and(Err(e)),
            }
            at = match at.checked_add(if whole { 0x200 } else { 1 }) {
                Some(next) => next,
                None => break,
            };
        }
        result
    }

    /// Clear the entries of the `pages` BFNs from `first` that a failed
    /// call into the IOMMU driver wrote before it failed (the simulator
    /// writes a 2 MiB a page at a time; Xen's call writes nothing when it
    /// fails): no call counted, no failure injected.
    fn take_back_pages(&mut self, owner: DomId, ctx: ContextId, first: u64, pages: u64) {
        let Some(c) = self.contexts.get_mut(&(owner, ctx)) else {
            return;
        };
        let mut mem = WriteThrough(&mut self.ram);
        for page in first..first.saturating_add(pages) {
            let _ = c.unmap(&mut mem, Bfn(page));
        }
    }
}

impl IommuBackend for SimMachine {
    fn iommu_caps(&self) -> BackendCaps {
        let (attrs, format) = match self.format {
            // VT-d has one non-snooped encoding, and only with snoop
            // control: UC only.
            Format::Vtd => (
                if self.snoop_control {
                    feature::ATTR_UC
                } else {
                    0
                },
                TableFormat::Vtd {
                    snoop_control: self.snoop_control,
                },
            ),
            Format::Lpae => (feature::ATTR_UC | feature::ATTR_DEVICE, TableFormat::Lpae),
        };
        BackendCaps {
            max_contexts: 8,
            features: feature::CONTEXTS | feature::DEVICE_ATTACH | attrs,
            // What a map op takes, as the Xen object says: 4 KiB pages
            // (2 MiB entries are the IOMMU's own folding of runs of them).
            page_sizes: 1 << 12,
            address_bits: self.address_bits,
            own_tables: Some(OwnTables {
                format,
                levels: self.address_bits.saturating_sub(12).div_ceil(9).clamp(2, 4),
            }),
            // Xen's `iommu_map()` takes no memory type (the Xen object
            // says false too): the default context maps write-back only.
            default_context_attrs: false,
            // Xen's VT-d tables set SNP only with snoop control on every
            // unit, as the engine's own do.
            default_context_snooped: match self.format {
                Format::Vtd => self.snoop_control,
                Format::Lpae => true,
            },
        }
    }
    fn iommu_map(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        // Past the width the driver built the tables for: Xen's AMD-Vi
        // driver finds no table level and crashes the domain (the host,
        // for the hardware domain). Counted, so tests can require none.
        let width = self.address_bits.saturating_sub(12);
        if width < 64 && bfn.0 >> width != 0 {
            self.maps_past_width += 1;
            return Err(Errno::Inval);
        }
        if !self.glue_admits(bfn.0, 1) {
            return Err(Errno::Inval);
        }
        self.map_calls += 1;
        // (A failure is the engine's to answer, on VT-d as on AMD-Vi with
        // patch 0007: the driver crashes no domain for it. The glue marks
        // a failed run modified, as `pvx_iommu_map()` does.)
        match self.map_page(owner, ctx, bfn, mfn, perms, attr) {
            Ok(flags) => gather.add(ctx, bfn, flags),
            Err(e) => {
                gather.add(ctx, bfn, flushf::MODIFIED)?;
                Err(e)
            }
        }
    }
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
        let _host = HostAllocations::begin();
        self.map_runs += 1;
        // (An empty run too, as Xen's glue answers one.)
        let Some(Bfn(last)) = crate::iommu::run_last(bfn, count) else {
            return Err(Errno::Inval);
        };
        if count > crate::iommu::MAX_IOMMU_RUN {
            self.runs_too_long += 1;
            return Err(Errno::Inval);
        }
        if mfn.0.checked_add(count).is_none() {
            return Err(Errno::Inval);
        }
        let width = self.address_bits.saturating_sub(12);
        if width < 64 && last >> width != 0 {
            self.maps_past_width += 1;
            return Err(Errno::Inval);
        }
        if !self.glue_admits(bfn.0, count) {
            return Err(Errno::Inval);
        }
        // Xen 4.17's `iommu_map()`: each call takes the largest size the
        // IOMMU has (here 4 KiB and 2 MiB) where both the BFN and the frame
        // start aligned and the rest of the run covers it
        // (`mapping_order()`). At the first failure it unmaps what the
        // calls before mapped (`iommu_unmap(d, dfn0, i)`, its own failure
        // ignored), flushes, and answers the error.
        let mut result = Ok(());
        let mut flags = 0;
        let mut done = 0u64;
        let whole_at =
            |done: u64| ((bfn.0 + done) | (mfn.0 + done)) & 0x1ff == 0 && count - done >= 0x200;
        while done < count {
            let (b, f) = (bfn.0 + done, mfn.0 + done);
            let whole = whole_at(done);
            if !whole {
                // 4 KiB calls, up to the next that can be 2 MiB (or the
                // run's end): each as `map_page` makes it, counted as the
                // loop below counts it, with the context looked up (made)
                // once for them. A failure ends the run as below, at the
                // call that failed (which wrote nothing).
                self.map_calls += 1;
                let failed = match Self::context_in(
                    &mut self.contexts,
                    &mut self.ram,
                    self.format,
                    owner,
                    ctx,
                ) {
                    Err(e) => Some(e),
                    // (The format picked once for the stretch.)
                    Ok((c, ram)) => either_format!(c, t => loop {
                        let at = (Bfn(bfn.0 + done), Mfn(mfn.0 + done));
                        let (written, overwrote) =
                            Self::map_page_in_table(t, ram, at.0, at.1, perms, attr);
                        self.maps_over_present += u64::from(overwrote);
                        match written {
                            Ok(set) => flags |= set,
                            Err(e) => break Some(e),
                        }
                        done += 1;
                        if done == count || whole_at(done) {
                            break None;
                        }
                        self.map_calls += 1;
                    }),
                };
                if let Some(e) = failed {
                    if let Some(last_done) = done.checked_sub(1) {
                        let _ =
                            self.xen_unmap_pages(owner, ctx, bfn.0, bfn.0 + last_done, &mut flags);
                    }
                    flags |= flushf::MODIFIED;
                    result = Err(e);
                    break;
                }
                continue;
            }
            let pages = if whole { 0x200 } else { 1 };
            self.map_calls += 1;
            self.superpage_maps += u64::from(whole);
            // What a 2 MiB call's flags depend on: what it replaces, and
            // the tables queued before it.
            let before = whole.then(|| self.before_whole_map(owner, ctx, Bfn(b)));
            let mut written = 0;
            let mut page_flags = 0;
            let mut mapped = Ok(());
            // The leaf table the simulator builds for a 2 MiB call into an
            // empty slot, and folds by its last page: never Xen's (its call
            // writes the one entry), never seen by a device (no DMA runs
            // within the call), so not one the IOMMU may have cached.
            let mut scaffold = None;
            while written < pages {
                match self.map_page(owner, ctx, Bfn(b + written), Mfn(f + written), perms, attr) {
                    Ok(set) => page_flags |= set,
                    Err(e) => {
                        mapped = Err(e);
                        break;
                    }
                }
                if written == 0 && matches!(before, Some((Entry::Empty, _))) {
                    scaffold = match self.level2_entry_at(owner, ctx, Bfn(b)) {
                        Entry::Table(t) => Some(t),
                        _ => None,
                    };
                }
                written += 1;
            }
            if let (Some(t), Ok(())) = (scaffold, &mapped) {
                let ram = &mut self.ram;
                ram.unlinked_tables.remove(&mut ram.frame_bits, t.0);
            }
            flags |= match before {
                Some(before) if mapped.is_ok() => {
                    self.whole_map_flags(owner, ctx, before, Mfn(f), perms, attr)
                }
                _ => page_flags,
            };
            if let Err(e) = mapped {
                // Xen's order-9 `map_page` fails whole (its table is
                // allocated before any entry is written); here the pages
                // went in one by one: those this call wrote go, as part of
                // the failed call (not one of Xen's unmaps, and not one a
                // test's unmap failure is meant for).
                self.take_back_pages(owner, ctx, b, written);
                if let Some(last_done) = done.checked_sub(1) {
                    let _ = self.xen_unmap_pages(owner, ctx, bfn.0, bfn.0 + last_done, &mut flags);
                }
                // (And the glue marks a failed run modified.)
                flags |= flushf::MODIFIED;
                result = Err(e);
                break;
            }
            done += pages;
        }
        gather.add_range(ctx, bfn, Bfn(last), flags)?;
        result
    }
    fn iommu_unmap(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        if !self.glue_admits(bfn.0, 1) {
            return Err(Errno::NoEnt);
        }
        let flags = match self.unmap_page(owner, ctx, bfn, false) {
            // Xen's drivers answer a missing entry 0 and set no flag (the
            // glue refuses a BFN outside the window, above, with ENOENT).
            Err(Errno::NoEnt) => 0,
            Err(e) => {
                // (The glue marks a failed unmap modified.)
                gather.add(ctx, bfn, flushf::MODIFIED)?;
                return Err(e);
            }
            Ok(set) => set,
        };
        gather.add(ctx, bfn, flags)
    }
    fn iommu_unmap_run(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        count: u64,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        // (An empty run too, as Xen's glue answers one.)
        let Some(Bfn(last)) = crate::iommu::run_last(bfn, count) else {
            return Err(Errno::Inval);
        };
        if count > crate::iommu::MAX_IOMMU_RUN {
            self.runs_too_long += 1;
            return Err(Errno::Inval);
        }
        if !self.glue_admits(bfn.0, count) {
            // (A run's other pages may be mapped: the engine unmaps them
            // one by one then.)
            return Err(if count == 1 {
                Errno::NoEnt
            } else {
                Errno::Inval
            });
        }
        let mut flags = 0;
        let result = self.xen_unmap_pages(owner, ctx, bfn.0, last, &mut flags);
        if result.is_err() {
            // (As `pvx_iommu_unmap()` marks a failed run.)
            flags |= flushf::MODIFIED;
        }
        gather.add_range(ctx, bfn, Bfn(last), flags)?;
        result
    }
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        if self.fail_flushes > 0 {
            self.fail_flushes -= 1;
            self.flush_failed_for.insert(owner);
            return Err(iommu_timed_out());
        }
        self.flush_failed_for.remove(&owner);
        let root = self.context_root(owner, ContextId::DEFAULT);
        for r in gather.ranges() {
            // No flag, no call: the glue's `pvx_iommu_flush()` returns
            // before Xen's `iommu_iotlb_flush()` for a range whose calls
            // set none (and Xen's would return at once).
            if r.flags == 0 {
                continue;
            }
            self.flushes += 1;
            // Only entries added: nothing to invalidate. AMD-Vi's driver
            // makes no invalidation without `IOMMU_FLUSHF_modified`
            // (`amd_iommu_flush_iotlb_pages()`, before it looks at
            // `_all`); VT-d's makes a page-selective one of non-present
            // entries, which a unit without caching mode skips
            // (`flush_iotlb_qi()`'s `flush_non_present_entry`; QEMU's
            // intel-iommu has it off unless asked). The simulated IOTLB
            // caches no non-present entry, so nothing stale is left; and
            // never invalidating more than either driver would, the
            // simulator hides no lost flag.
            if r.flags & flushf::MODIFIED == 0 {
                continue;
            }
            // What both drivers invalidate for the range, never more than
            // either: everything with `IOMMU_FLUSHF_all` (both); the range
            // itself where it is a power-of-two count of pages on its own
            // boundary (VT-d's page-selective invalidation; AMD-Vi's
            // covers at least that); else the smallest of the 2 MiB and
            // 1 GiB blocks holding it, or everything (AMD-Vi's
            // `amd_iommu_flush_iotlb_pages()`; VT-d's is domain-wide
            // then). Neither widens it for a superpage its unmap split
            // (`addr_to_dma_page_maddr()` shatters it, flagging only
            // `IOMMU_FLUSHF_modified`): whoever asks must cover the 2 MiB.
            let count = r.last.0.wrapping_sub(r.first.0).wrapping_add(1);
            let reach = if r.flags & flushf::ALL != 0 {
                None
            } else if count.is_power_of_two() && r.first.0 % count == 0 {
                Some((r.first.0, r.last.0))
            } else {
                [9u32, 18]
                    .into_iter()
                    .find(|&shift| r.first.0 >> shift == r.last.0 >> shift)
                    .map(|shift| {
                        let start = r.first.0 >> shift << shift;
                        (start, start | ((1u64 << shift) - 1))
                    })
            };
            let (first, last) = match reach {
                Some((first, last)) => self.iotlb.invalidate_psi(owner, r.context, first, last),
                None => {
                    self.iotlb.invalidate_context(owner, r.context);
                    (0, u64::MAX)
                }
            };
            // The paging-structure caches of what it reached only: a table
            // unlinked elsewhere may still be cached (Xen's own code
            // unlinks a table with `IOMMU_FLUSHF_all`, for a flush of the
            // whole domain, or clears 2 MiB whose flush covers it).
            self.ram.forget_unlinked_under(root, first, last);
        }
        // The tables its unmaps emptied or its maps folded go now (Xen's
        // `free_queued_pgtables()` runs on its own, whatever was flushed);
        // one the IOMMU may still walk from its caches (no invalidation
        // reached its range) is counted in `tables_freed_before_flush`.
        if let Some(c) = self.contexts.get_mut(&(owner, ContextId::DEFAULT)) {
            either_format!(c, t => t.release_freed(&mut WriteThrough(&mut self.ram)))
        }
        Ok(())
    }
    fn hw_context_create(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        root: Mfn,
    ) -> Result<HwContext, Errno> {
        let _host = HostAllocations::begin();
        assert!(
            self.devices_lock_depth > 0,
            "hw_context_create without the devices lock"
        );
        // The Xen object counts a context on the one cell the CPU holds
        // (a fault in that cell must fail the context's flushes) and
        // refuses a creation without exactly one held (fail closed): so
        // does the simulator, recording it as the engine's defect.
        if crate::lock_check::engine_locks_held() != 1 {
            crate::lock_check::note_violation(
                "hw_context_create without exactly one driver cell held",
            );
            return Err(Errno::Inval);
        }
        // The engine's tables go to memory before the IOMMU knows them.
        self.ram.sync_tables();
        if self.fail_context_creates.0 > 0 {
            self.fail_context_creates.0 -= 1;
            return Err(self.fail_context_creates.1);
        }
        let id = self.next_hw_context;
        self.next_hw_context = id.checked_add(1).ok_or(Errno::NoSpc)?;
        self.hw_contexts.insert(id, HwCtx { owner, ctx, root });
        Ok(HwContext(id))
    }
    fn hw_context_destroy(&mut self, hw: HwContext) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        assert!(
            self.devices_lock_depth > 0,
            "hw_context_destroy without the devices lock"
        );
        assert!(
            self.devices.values().all(|d| d.attached != Some(hw)),
            "a device still points at the tables of {hw:?}, about to be freed"
        );
        if self.fail_flushes > 0 {
            // The flush before the tag goes failed: it stays taken.
            self.fail_flushes -= 1;
            return Err(iommu_timed_out());
        }
        if let Some(h) = self.hw_contexts.remove(&hw.0) {
            self.iotlb.invalidate_context(h.owner, h.ctx);
            self.ram.forget_unlinked_under(Some(h.root), 0, u64::MAX);
        }
        Ok(())
    }
    fn owns_devices(&self, domid: DomId) -> bool {
        // [unlocked] on Xen (an RCU domain lookup; the glue asserts it).
        self.note_unlocked_service("owns_devices");
        self.devices.values().any(|d| d.facts.owner == domid)
    }
    fn hw_flush(&mut self, hw: HwContext, first: Bfn, last: Bfn) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        // Every table store is written back before the invalidation (also
        // when it then fails), as Xen's backend does.
        self.ram.sync_tables();
        if self.fail_flushes > 0 {
            self.fail_flushes -= 1;
            return Err(iommu_timed_out());
        }
        let h = *self.hw_contexts.get(&hw.0).ok_or(Errno::NoEnt)?;
        self.iotlb.invalidate_psi(h.owner, h.ctx, first.0, last.0);
        if self.speculative_refill {
            self.refill_after_invalidation(h, first, last);
        }
        // This context's paging-structure caches for this range only:
        // another context's unlinked tables, and this one's that translated
        // none of the range, wait for a flush of their own.
        self.ram
            .forget_unlinked_under(Some(h.root), first.0, last.0);
        self.flushes += 1;
        Ok(())
    }
    fn devices_lock(&mut self) {
        crate::lock_check::note_service("devices_lock (pcidevs_lock comes before driver locks)");
        self.devices_lock_depth += 1;
        self.devices_lock_taken += 1;
    }
    fn devices_unlock(&mut self) {
        self.devices_lock_depth = self.devices_lock_depth.saturating_sub(1);
    }
    fn device_facts(&self, device: Sbdf) -> Option<DeviceFacts> {
        assert!(
            self.devices_lock_depth > 0,
            "device_facts without the devices lock"
        );
        self.devices.get(&device).map(|d| d.facts)
    }
    fn device_attach(&mut self, device: Sbdf, hw: HwContext, _root: Mfn) -> Result<(), Errno> {
        assert!(
            self.devices_lock_depth > 0,
            "device_attach without the devices lock"
        );
        // The device may walk the tables from now: in memory first.
        self.ram.sync_tables();
        if self.fail_attaches > 0 {
            self.fail_attaches -= 1;
            return Err(Errno::NoMem);
        }
        self.hw_contexts.get(&hw.0).ok_or(Errno::NoEnt)?;
        let d = self.devices.get_mut(&device).ok_or(Errno::NoDev)?;
        // Only from the owner's own tables (0005: an entry naming anything
        // else, or none, is EBUSY): a device whose entry a failed detach
        // cleared stays blocked until reassigned. (The SMMUv3's attach
        // takes a device whose STEs abort; its detach never answers other
        // than 0 or EBUSY, so none is left so.)
        if d.blocked || d.attached.is_some() {
            return Err(Errno::Busy);
        }
        d.attached = Some(hw);
        d.blocked = false;
        // What the driver invalidates, and never more: the simulator would
        // hide a page released before its flush. VT-d (0005, through
        // domain_context_mapping_one()) flushes the context cache and IOTLB
        // of the device's previous domain id, its owner's, not the tag's
        // (whose DID may already cache the context's entries for another
        // device); SMMUv3 (0009) writes the device's STEs with CFGI_STE and
        // invalidates no TLB. (Before a review of 2026-12-06 the simulator
        // also forgot everything cached under the tag here.)
        let owner = d.facts.owner;
        if self.format == Format::Vtd {
            self.iotlb.invalidate_context(owner, ContextId::DEFAULT);
        }
        Ok(())
    }
    fn device_detach(&mut self, device: Sbdf, hw: HwContext) -> Result<(), Errno> {
        assert!(
            self.devices_lock_depth > 0,
            "device_detach without the devices lock"
        );
        let d = self.devices.get_mut(&device).ok_or(Errno::NoDev)?;
        if d.attached != Some(hw) {
            return Ok(()); // not on the tag (any more)
        }
        if self.fail_detaches > 0 {
            self.fail_detaches -= 1;
            if self.fail_detaches_with != Errno::Busy {
                // Its context entry cleared (0005's detach unmaps it when
                // the move back failed): DMA blocked until Xen reassigns it.
                // No invalidation assumed: among 0005's failures is the
                // unmap's flush (a review of 2026-12-06: the simulator
                // forgot the tag's entries here, more lenient than Xen).
                d.attached = None;
                d.blocked = true;
            }
            return Err(self.fail_detaches_with);
        }
        d.attached = None;
        // VT-d's move back to the owner flushes the tag's domain id (the
        // device's previous one); SMMUv3's STE rewrite invalidates no TLB,
        // so what the tag's VMID caches stays for the devices still on it.
        if self.format == Format::Vtd {
            if let Some(h) = self.hw_contexts.get(&hw.0) {
                self.iotlb.invalidate_context(h.owner, h.ctx);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::vtd::Vtd;
    use crate::pgtable::{Entry, PageTableFormat};

    /// A test's random numbers from `seed` (xorshift): `next(n)` is below `n`.
    fn below_from(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    /// Every frame's references (all, writable), to compare two machines.
    fn page_refs(m: &SimMachine) -> Vec<(u32, u32)> {
        m.ram
            .info
            .iter()
            .map(|f| (f.refs, f.writable_refs))
            .collect()
    }

    /// While the engine's hook runs (its target's p2m lock held, as on
    /// Xen) a page lookup or a guest copy is counted (the invariants then
    /// fail); none is outside a hook, and the mark goes with the hook.
    #[test]
    fn a_service_taking_a_p2m_lock_from_a_hook_is_counted() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: 16,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(DomId(1), spec).unwrap();
        let seq = core::sync::atomic::AtomicU32::new(0);
        let target = CheckedTarget::new(&seq, 0);
        let _ = m.get_page(DomId(1), Gfn(3), false, target);
        assert_eq!(m.services_under_p2m_lock, 0);
        {
            let _hook = crate::lock_check::P2mHook::enter(DomId(1));
            let _ = m.get_page(DomId(1), Gfn(3), false, target);
            let mut buf = [0u8; 8];
            let _ = m.copy_from_guest(0, &mut buf);
        }
        assert_eq!(m.services_under_p2m_lock, 2);
        assert_eq!(crate::lock_check::p2m_hook_of(), None);
        let _ = m.get_page(DomId(1), Gfn(3), false, target);
        assert_eq!(m.services_under_p2m_lock, 2);
    }

    /// A map run that fails is undone as Xen's `iommu_map()` undoes it:
    /// one `iommu_unmap()` of what the calls before the failed one mapped
    /// (an aligned 2 MiB in one call), and nothing of the failed call,
    /// which in Xen wrote nothing. Before, the simulator unmapped every
    /// page up to the end of the failed call one by one, counting each as
    /// a call of Xen's and using up the unmap failures a test had set up
    /// for later.
    #[test]
    fn a_failed_map_run_is_taken_back_as_xen_takes_it_back() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let base = 0x10_0000u64; // (the floor of the window, 4 GiB)
        let run = |allocs: u64, fail_unmaps: u32| {
            let mut m = SimMachine::new(4096, Format::Vtd, 64);
            m.fail_table_allocs(Some(allocs));
            m.fail_unmaps = fail_unmaps;
            let mut gather = FlushGather::default();
            let r = m.iommu_map_run(
                DomId::DOM0,
                ContextId::DEFAULT,
                Bfn(base),
                Mfn(0x400),
                1024,
                rw,
                wb,
                &mut gather,
            );
            m.fail_table_allocs(None);
            let mapped = (base..base + 1024)
                .filter(|&b| {
                    m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
                        .is_some()
                })
                .count();
            (r, m, mapped)
        };
        let mut seen = [false; 2];
        for allocs in 0..16 {
            let (r, m, mapped) = run(allocs, 1);
            if r.is_ok() {
                break;
            }
            match m.map_calls {
                // The first 2 MiB failed: nothing to take back, and the
                // unmap failure waits for the unmap it was meant for.
                1 => {
                    seen[0] = true;
                    assert_eq!((mapped, m.unmap_calls, m.fail_unmaps), (0, 0, 1));
                }
                // The second failed: the first goes in one call.
                2 => {
                    seen[1] = true;
                    let (_, m, mapped) = run(allocs, 0);
                    assert_eq!((mapped, m.unmap_calls, m.superpage_unmaps), (0, 1, 1));
                }
                calls => panic!("{calls} calls for two aligned 2 MiB"),
            }
        }
        assert_eq!(seen, [true, true], "both failures reached");
    }

    /// Map `bfn` to `mfn` read-write, write-back, in dom0's default
    /// context, gathering the change in `gather`.
    fn map_rw(
        m: &mut SimMachine,
        bfn: Bfn,
        mfn: Mfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        m.iommu_map(
            DomId::DOM0,
            ContextId::DEFAULT,
            bfn,
            mfn,
            Permissions::RW,
            MemAttr::WriteBack,
            gather,
        )
    }

    /// A failed run takes back the pages its calls mapped, and only those:
    /// the entry before it stays, and the run's range is marked modified
    /// for the flush (as the glue marks a failed run). The failure: the
    /// leaf table of the run's second 2 MiB cannot be allocated.
    #[test]
    fn a_failed_map_run_takes_back_only_what_it_mapped() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let base = 0x10_0000u64;
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        let there = (Bfn(base + 0x1f0), Mfn(0x905));
        m.iommu_map_run(
            DomId::DOM0,
            ContextId::DEFAULT,
            there.0,
            there.1,
            1,
            rw,
            wb,
            &mut gather,
        )
        .unwrap();
        gather.clear();
        m.fail_table_allocs(Some(0));
        let first = base + 0x1fc;
        let r = m.iommu_map_run(
            DomId::DOM0,
            ContextId::DEFAULT,
            Bfn(first),
            Mfn(0x400),
            8,
            rw,
            wb,
            &mut gather,
        );
        assert_eq!(r, Err(Errno::NoMem));
        let at = |m: &SimMachine, b: u64| {
            m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
                .map(|t| t.0)
        };
        assert_eq!(
            at(&m, there.0 .0),
            Some(there.1),
            "the entry that was there"
        );
        for b in first..first + 8 {
            assert_eq!(at(&m, b), None, "BFN {b:#x}");
        }
        let range = gather.ranges().next().copied().unwrap();
        assert_eq!((range.first, range.last), (Bfn(first), Bfn(first + 7)));
        assert_ne!(range.flags & flushf::MODIFIED, 0);
    }

    /// What the IOTLB still translates other than the tables is listed, a
    /// page at a time, until a flush that covers it: a page unmapped
    /// before its flush; a page unmapped out of a cached superpage and
    /// flushed on its own (the superpage's entry stays, and only that page
    /// now differs from the tables).
    #[test]
    fn stale_iotlb_pages_lists_what_a_flush_has_not_reached() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let dom0 = DomId::DOM0;
        let ctx = ContextId::DEFAULT;
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        let (bfn, mfn) = (Bfn(0x10_0005), Mfn(0x905));
        map_rw(&mut m, bfn, mfn, &mut gather).unwrap();
        map_rw(&mut m, Bfn(bfn.0 + 1), Mfn(0x906), &mut gather).unwrap();
        m.iommu_flush(dom0, &gather).unwrap();
        m.dma_read(dom0, ctx, bfn.0 << 12, 8).unwrap();
        assert!(m.stale_iotlb_pages().is_empty());
        let mut unmapped = FlushGather::default();
        m.iommu_unmap(dom0, ctx, bfn, &mut unmapped).unwrap();
        let stale = StaleTranslation {
            owner: dom0,
            context: ctx,
            bfn,
            mfn,
            read: true,
            write: true,
        };
        assert_eq!(m.stale_iotlb_pages(), [stale]);
        m.iommu_flush(dom0, &unmapped).unwrap();
        assert!(m.stale_iotlb_pages().is_empty());

        // A 2 MiB superpage, cached whole; one page unmapped (split) and
        // flushed alone.
        let base = Bfn(0x10_0200);
        let mut gather = FlushGather::default();
        m.iommu_map_run(dom0, ctx, base, Mfn(0x1000), 512, rw, wb, &mut gather)
            .unwrap();
        m.iommu_flush(dom0, &gather).unwrap();
        assert_eq!(m.context_leaf(dom0, ctx, base).map(|l| l.0), Some(2));
        m.dma_read(dom0, ctx, (base.0 + 9) << 12, 8).unwrap();
        assert!(m.stale_iotlb_pages().is_empty());
        let page = Bfn(base.0 + 7);
        m.iommu_unmap(dom0, ctx, page, &mut FlushGather::default())
            .unwrap();
        let mut narrow = FlushGather::default();
        narrow.add(ctx, page, flushf::MODIFIED).unwrap();
        m.iommu_flush(dom0, &narrow).unwrap();
        let stale = m.stale_iotlb_pages();
        assert_eq!(stale.len(), 1);
        assert_eq!((stale[0].bfn, stale[0].mfn), (page, Mfn(0x1007)));
    }

    /// A flush whose range misses an unmapped page (too short, or a page
    /// left out of the gather) leaves the device that page, however wide
    /// the range's own block: a range that is no aligned power of two
    /// reaches the 2 MiB (or 1 GiB) block holding it, as AMD-Vi's flush
    /// does, not the whole context as VT-d's would. Before, any such range
    /// invalidated the whole context and hid the miss.
    #[test]
    fn a_flush_that_misses_a_page_leaves_it_cached() {
        let (dom0, ctx) = (DomId::DOM0, ContextId::DEFAULT);
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        for (b, f) in [(0x10_0005, 0x905), (0x10_0006, 0x906), (0x10_0601, 0x1601)] {
            map_rw(&mut m, Bfn(b), Mfn(f), &mut gather).unwrap();
        }
        m.iommu_flush(dom0, &gather).unwrap();
        for b in [0x10_0005u64, 0x10_0601] {
            m.dma_read(dom0, ctx, b << 12, 8).unwrap();
        }
        m.iommu_unmap(dom0, ctx, Bfn(0x10_0005), &mut FlushGather::default())
            .unwrap();
        m.iommu_unmap(dom0, ctx, Bfn(0x10_0601), &mut FlushGather::default())
            .unwrap();
        // Three pages around the second unmap, flagged modified.
        let mut short = FlushGather::default();
        short
            .add_range(ctx, Bfn(0x10_0601), Bfn(0x10_0603), flushf::MODIFIED)
            .unwrap();
        m.iommu_flush(dom0, &short).unwrap();
        assert!(m.dma_read(dom0, ctx, 0x10_0601 << 12, 8).is_err());
        assert!(m.dma_read(dom0, ctx, 0x10_0005 << 12, 8).is_ok(), "missed");
        let stale = m.stale_iotlb_pages();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].bfn, Bfn(0x10_0005));
    }

    /// A 2 MiB call into an empty slot is one entry written on Xen
    /// (`ADDED` only); the simulator's own 512 writes, and the leaf table
    /// it folds on the way, must not add `MODIFIED | ALL`, or its flush
    /// would invalidate the whole context and cover an unmap whose
    /// `MODIFIED` the engine lost. Before, the fold set them.
    #[test]
    fn a_2mib_map_into_an_empty_slot_is_added_only() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let (dom0, ctx) = (DomId::DOM0, ContextId::DEFAULT);
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        // A page elsewhere, read by the device, then unmapped.
        let page = Bfn(0x10_0005);
        map_rw(&mut m, page, Mfn(0x905), &mut gather).unwrap();
        map_rw(&mut m, Bfn(page.0 + 1), Mfn(0x906), &mut gather).unwrap();
        m.iommu_flush(dom0, &gather).unwrap();
        m.dma_read(dom0, ctx, page.0 << 12, 8).unwrap();
        let mut unmapped = FlushGather::default();
        m.iommu_unmap(dom0, ctx, page, &mut unmapped).unwrap();
        // An aligned 2 MiB run mapped in the same batch.
        let mut run = FlushGather::default();
        m.iommu_map_run(
            dom0,
            ctx,
            Bfn(0x10_0200),
            Mfn(0x1000),
            512,
            rw,
            wb,
            &mut run,
        )
        .unwrap();
        assert_eq!(run.ranges().next().unwrap().flags, flushf::ADDED);
        assert_eq!(
            m.context_leaf(dom0, ctx, Bfn(0x10_0200)).map(|l| l.0),
            Some(2)
        );
        // The engine's gather with the unmap's MODIFIED lost: the run's
        // flags flush nothing, and the device still reaches the page.
        let mut lost = FlushGather::default();
        lost.add(ctx, page, flushf::ADDED).unwrap();
        lost.add(ctx, Bfn(0x10_0200), flushf::ADDED).unwrap();
        lost.add(ctx, Bfn(0x10_03ff), flushf::ADDED).unwrap();
        m.iommu_flush(dom0, &lost).unwrap();
        assert!(
            m.dma_read(dom0, ctx, page.0 << 12, 8).is_ok(),
            "still cached"
        );
        assert_eq!(m.stale_iotlb_pages().len(), 1);
        assert_eq!(
            m.tables_freed_before_flush(),
            0,
            "the scaffold was never Xen's"
        );
        m.iommu_flush(dom0, &unmapped).unwrap();
        assert!(m.stale_iotlb_pages().is_empty());
    }

    /// A map over a present entry is counted even when the overwrite then
    /// fails (the split of a superpage over it, for want of a table): the
    /// engine asked for it; and the entry there stays. Before, the failure
    /// returned before the count.
    #[test]
    fn a_failed_map_over_a_present_entry_is_still_counted() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let (dom0, ctx) = (DomId::DOM0, ContextId::DEFAULT);
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        let base = Bfn(0x10_0200);
        m.iommu_map_run(dom0, ctx, base, Mfn(0x1000), 512, rw, wb, &mut gather)
            .unwrap();
        m.iommu_flush(dom0, &gather).unwrap();
        m.fail_table_allocs(Some(0));
        let r = map_rw(&mut m, Bfn(base.0 + 3), Mfn(0x905), &mut gather);
        assert_eq!(r, Err(Errno::NoMem));
        assert_eq!(m.maps_over_present, 1);
        assert_eq!(
            m.translate(dom0, ctx, Bfn(base.0 + 3)).map(|t| t.0),
            Some(Mfn(0x1003))
        );
    }

    /// A cached pointer to a leaf table that is no longer linked (folded
    /// into a superpage, then the superpage unmapped, no flush yet) still
    /// reaches what the table holds: `stale_iotlb_pages` lists those pages
    /// too, not only the IOTLB's own entries. Before, it listed only the
    /// entries.
    #[test]
    fn stale_iotlb_pages_follows_a_cached_leaf_table() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let (dom0, ctx) = (DomId::DOM0, ContextId::DEFAULT);
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let base = Bfn(0x10_0200);
        let mut gather = FlushGather::default();
        for i in 0..511 {
            m.iommu_map(
                dom0,
                ctx,
                Bfn(base.0 + i),
                Mfn(0x1000 + i),
                rw,
                wb,
                &mut gather,
            )
            .unwrap();
        }
        m.iommu_flush(dom0, &gather).unwrap();
        // The device walks through the leaf table (caching a pointer to it
        // and page 3's translation).
        m.dma_read(dom0, ctx, (base.0 + 3) << 12, 8).unwrap();
        // The last page folds the table into a superpage (kept whole until
        // a flush), and the superpage is then cleared: no flush yet.
        let mut changes = FlushGather::default();
        m.iommu_map(
            dom0,
            ctx,
            Bfn(base.0 + 511),
            Mfn(0x11ff),
            rw,
            wb,
            &mut changes,
        )
        .unwrap();
        assert_eq!(m.context_leaf(dom0, ctx, base).map(|l| l.0), Some(2));
        m.iommu_unmap_run(dom0, ctx, base, 512, &mut changes)
            .unwrap();
        let stale = m.stale_iotlb_pages();
        assert_eq!(
            stale.len(),
            512,
            "page 3 by its entry, the rest by the table"
        );
        assert!(stale
            .iter()
            .any(|t| t.bfn == Bfn(base.0 + 5) && t.mfn == Mfn(0x1005)));
        m.iommu_flush(dom0, &changes).unwrap();
        assert!(m.stale_iotlb_pages().is_empty());
    }

    /// A page unmap of a missing entry is answered 0 with no flag, as Xen's
    /// drivers answer it (VT-d's `dma_pte_clear_one` finds nothing present;
    /// AMD-Vi's `clear_iommu_pte_present` nothing to clear). Before, the
    /// simulator answered `ENOENT`, which on Xen comes only from the glue's
    /// refusal of a page outside the window.
    #[test]
    fn a_page_unmap_of_a_missing_entry_is_answered_0() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        map_rw(&mut m, Bfn(0x10_0005), Mfn(0x905), &mut gather).unwrap();
        let mut unmapped = FlushGather::default();
        let r = m.iommu_unmap(
            DomId::DOM0,
            ContextId::DEFAULT,
            Bfn(0x10_0009),
            &mut unmapped,
        );
        assert_eq!(r, Ok(()));
        assert!(unmapped.ranges().all(|r| r.flags == 0));
        // Outside the window: the glue's refusal.
        let r = m.iommu_unmap(DomId::DOM0, ContextId::DEFAULT, Bfn(0x5), &mut unmapped);
        assert_eq!(r, Err(Errno::NoEnt));
        m.runs_outside_window = 0;
    }

    /// A run longer than the glue takes (`PVX_IOMMU_RUN_MAX`, whose loop
    /// is not preemptible) is refused, mapping or unmapping nothing, and
    /// counted; the longest it takes is mapped. Before, the simulator took
    /// a run of any length.
    #[test]
    fn a_run_longer_than_the_glue_takes_is_refused() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let max = crate::iommu::MAX_IOMMU_RUN;
        let base = Bfn(0x10_0000);
        let mut m = SimMachine::new(8192, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        let r = m.iommu_map_run(
            DomId::DOM0,
            ContextId::DEFAULT,
            base,
            Mfn(0x400),
            max + 1,
            rw,
            wb,
            &mut gather,
        );
        assert_eq!(r, Err(Errno::Inval));
        assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, base), None);
        assert_eq!(m.runs_too_long, 1);
        m.iommu_map_run(
            DomId::DOM0,
            ContextId::DEFAULT,
            base,
            Mfn(0x400),
            max,
            rw,
            wb,
            &mut gather,
        )
        .unwrap();
        let r = m.iommu_unmap_run(DomId::DOM0, ContextId::DEFAULT, base, max + 1, &mut gather);
        assert_eq!(r, Err(Errno::Inval));
        assert_eq!(m.runs_too_long, 2);
        for b in [base.0, base.0 + max - 1] {
            assert!(m
                .translate(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
                .is_some());
        }
    }

    /// Over a present entry Xen's drivers overwrite (`MODIFIED` for the
    /// flush), and the same entry again is nothing at all; the simulator
    /// does the same and counts the overwrite, which the engine must never
    /// make. Before, it refused the map (`Inval`), so an engine that
    /// reused a BFN still mapped got an error here where on Xen it would
    /// silently have taken the BFN from the page it mapped.
    #[test]
    fn a_map_over_a_present_entry_overwrites_it_as_xen_does() {
        let bfn = Bfn(0x10_0005);
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        map_rw(&mut m, bfn, Mfn(0x905), &mut gather).unwrap();
        assert_eq!(gather.ranges().next().unwrap().flags, flushf::ADDED);
        // The same entry again: nothing written, no flag, not counted.
        gather.clear();
        map_rw(&mut m, bfn, Mfn(0x905), &mut gather).unwrap();
        assert_eq!(gather.ranges().next().unwrap().flags, 0);
        assert_eq!(m.maps_over_present, 0);
        // Another frame: overwritten, modified, counted.
        gather.clear();
        map_rw(&mut m, bfn, Mfn(0x906), &mut gather).unwrap();
        assert_eq!(
            gather.ranges().next().unwrap().flags,
            flushf::ADDED | flushf::MODIFIED
        );
        assert_eq!(m.maps_over_present, 1);
        assert_eq!(
            m.translate(DomId::DOM0, ContextId::DEFAULT, bfn)
                .map(|t| t.0),
            Some(Mfn(0x906))
        );
    }

    /// The flush does what Xen's does with the flags it is given: a range
    /// with none is not flushed at all (the glue calls nothing), and one of
    /// entries only added invalidates nothing (VT-d without caching mode;
    /// AMD-Vi). So an engine that lost an unmap's `MODIFIED` leaves the
    /// device its old translation here, as it would on Xen. Before, every
    /// range was invalidated whatever its flags.
    #[test]
    fn a_flush_invalidates_only_what_its_flags_ask_for() {
        let bfn = Bfn(0x10_0005);
        let addr = bfn.0 << 12;
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let mut gather = FlushGather::default();
        map_rw(&mut m, bfn, Mfn(0x905), &mut gather).unwrap();
        // (A neighbour, so the unmap empties no table: no `ALL`.)
        let next = Bfn(bfn.0 + 1);
        map_rw(&mut m, next, Mfn(0x906), &mut gather).unwrap();
        m.iommu_flush(DomId::DOM0, &gather).unwrap();
        // The device's read caches the translation.
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 8)
            .unwrap();
        let flushes = m.flushes;
        let mut unmapped = FlushGather::default();
        m.iommu_unmap(DomId::DOM0, ContextId::DEFAULT, bfn, &mut unmapped)
            .unwrap();
        let r = *unmapped.ranges().next().unwrap();
        assert_eq!(r.flags, flushf::MODIFIED);
        // The flags lost, or only `ADDED` kept (over a range of a power of
        // two, and over one of three pages, which VT-d would invalidate
        // domain-wide but AMD-Vi not at all): the old translation stays.
        for (flags, pages) in [(0, 1), (flushf::ADDED, 1), (flushf::ADDED, 3)] {
            let mut lost = FlushGather::default();
            lost.add_range(r.context, r.first, Bfn(r.first.0 + pages - 1), flags)
                .unwrap();
            m.iommu_flush(DomId::DOM0, &lost).unwrap();
            assert!(
                m.dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 8).is_ok(),
                "flags {flags:#x}: still cached"
            );
        }
        assert_eq!(
            m.flushes,
            flushes + 2,
            "the flag-less range reached no flush"
        );
        m.iommu_flush(DomId::DOM0, &unmapped).unwrap();
        assert!(m
            .dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 8)
            .is_err());
    }

    /// A table folded away is forgotten only by a flush of BFNs it
    /// translated (a page-selective invalidation empties the
    /// paging-structure caches of its range), not by any flush of its
    /// context: before, a flush elsewhere hid a later store into it, which
    /// a real IOMMU could walk through its stale cache.
    #[test]
    fn an_unlinked_table_is_forgotten_only_by_a_flush_of_its_range() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let mut ram = Ram::new(64);
        let mut t = IoPageTable::<Vtd>::new(&mut ram).unwrap();
        let root = t.root();
        // Pages 0x8000200..=0x80003ff (pointing at frames past the RAM,
        // none a table): below the root's second entry, so the
        // leaf table's place takes every level's index to work out.
        let base = 1u64 << 27 | 0x200;
        let leaf = |ram: &Ram| {
            let mut table = root;
            for level in [4u32, 3, 2] {
                let i = ((base >> (9 * (level - 1))) & 0x1ff) as usize;
                match Vtd::decode(ram.read_entry(table, i), level) {
                    Entry::Table(n) => table = n,
                    _ => return None,
                }
            }
            Some(table)
        };
        for i in 0..511 {
            t.map(&mut ram, Bfn(base + i), Mfn(0x1000 + i), rw, wb)
                .unwrap();
        }
        let table = leaf(&ram).unwrap();
        t.map(&mut ram, Bfn(base + 511), Mfn(0x11ff), rw, wb)
            .unwrap();
        assert_eq!(leaf(&ram), None, "folded");
        let u = *ram.unlinked_tables.get(table.0).unwrap();
        assert_eq!((u.root, u.first, u.last), (root.0, base, base + 511));
        // Flushes of other BFNs, and of another tree, leave it unlinked and
        // possibly cached: a present entry changed in it is counted.
        ram.forget_unlinked_under(Some(root), 0, base - 1);
        ram.forget_unlinked_under(Some(root), base + 512, u64::MAX);
        ram.forget_unlinked_under(Some(Mfn(root.0 + 1)), 0, u64::MAX);
        ram.write_entry(table, 5, 0);
        assert_eq!(ram.unlinked_tables_rewritten, 1);
        // A flush of one page of its range forgets it.
        ram.forget_unlinked_under(Some(root), base + 7, base + 7);
        ram.write_entry(table, 6, 0);
        assert_eq!(ram.unlinked_tables_rewritten, 1);
        assert!(ram.unlinked_tables.is_empty());
    }

    /// A table unlinked from one place, linked at another before the flush
    /// and unlinked there too may still be cached at the first: a flush of
    /// the second place's range does not forget it. Before, the second
    /// unlink's record replaced the first's, and that flush forgot it.
    #[test]
    fn a_table_unlinked_from_two_places_is_not_forgotten_by_one_flush() {
        let mut ram = Ram::new(16);
        let table = |t: Mfn| t.0 << 12 | 3;
        let [root, a, b, c] = [(); 4].map(|()| ram.alloc_table().unwrap());
        ram.write_entry(root, 1, table(a));
        ram.write_entry(root, 2, table(b));
        ram.write_entry(a, 3, table(c));
        ram.write_entry(a, 3, 0);
        // Linked elsewhere before the flush (a host defect of its own),
        // then unlinked there.
        ram.write_entry(b, 4, table(c));
        ram.write_entry(b, 4, 0);
        // A flush of the second place's range (root entry 2, entry 4).
        let second = 2u64 << 27 | 4 << 18;
        ram.forget_unlinked_under(Some(root), second, second + (1 << 18) - 1);
        assert!(
            ram.unlinked_tables.contains(&ram.frame_bits, c.0),
            "still cached at the first"
        );
        ram.write_entry(c, 0, 0x5003);
        assert_eq!(ram.unlinked_tables_rewritten, 1);
        // Nor does a link back at the second place.
        ram.write_entry(b, 4, table(c));
        assert!(
            ram.unlinked_tables.contains(&ram.frame_bits, c.0),
            "still cached at the first"
        );
    }

    /// A chain of tables deeper than the walk's levels (no real tree is)
    /// covers every BFN, and its place is found up to twice the levels
    /// above the table: a flush of the root that far up forgets an entry
    /// unlinked at its bottom.
    #[test]
    fn a_table_unlinked_under_a_deep_chain_is_placed_under_its_root() {
        let mut ram = Ram::new(16);
        let table = |t: Mfn| t.0 << 12 | 3;
        // `chain[0]` holds the child; `chain[8]`, eight steps above it, is
        // the root.
        let chain: Vec<Mfn> = (0..9).map(|_| ram.alloc_table().unwrap()).collect();
        for w in chain.windows(2) {
            ram.write_entry(w[1], 1, table(w[0]));
        }
        let child = ram.alloc_table().unwrap();
        ram.write_entry(chain[0], 2, table(child));
        ram.write_entry(chain[0], 2, 0);
        let u = *ram.unlinked_tables.get(child.0).unwrap();
        assert_eq!((u.root, u.first, u.last), (chain[8].0, 0, u64::MAX));
        ram.forget_unlinked_under(Some(chain[8]), 5, 5);
        assert!(!ram.unlinked_tables.contains(&ram.frame_bits, child.0));
    }

    /// A 2 MiB unmap of Xen's own tables page by page, as `unmap_page`
    /// made it before it cleared the cached leaf table's run at once.
    fn whole_unmap_page_by_page(m: &mut SimMachine, bfn: Bfn) -> Result<u32, Errno> {
        m.unmap_calls += 1;
        let Some(c) = m.contexts.get_mut(&(DomId::DOM0, ContextId::DEFAULT)) else {
            return Err(Errno::NoEnt);
        };
        let mut mem = WriteThrough(&mut m.ram);
        if either_format!(c, t => t.unmap_superpage(&mut mem, bfn)).is_ok() {
            m.superpage_unmaps += 1;
            return Ok(flushf::MODIFIED);
        }
        let mut cleared = false;
        for page in bfn.0..bfn.0 + 0x200 {
            match c.unmap(&mut mem, Bfn(page)) {
                Ok(()) => cleared = true,
                Err(Errno::NoEnt) => {}
                Err(e) => return Err(e),
            }
        }
        if cleared {
            Ok(flushf::MODIFIED)
        } else {
            Err(Errno::NoEnt)
        }
    }

    /// A 2 MiB unmap of a default context that clears the cached leaf
    /// table's run at once (`unmap_in_cached_leaf`) leaves everything as
    /// the unmap of each page did, and answers the same: over random maps
    /// and unmaps of two 2 MiB regions, full leaf tables folded into
    /// superpages, splits whose allocation fails, in both formats.
    #[test]
    fn a_whole_unmap_through_the_cached_leaf_does_what_page_by_page_did() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let base = 0x10_0000u64;
        let mut next = below_from(0x9e37_79b9_7f4a_7c15u64);
        let mut after_maps = 0;
        let mut cleared_any = 0;
        for format in [Format::Vtd, Format::Lpae] {
            // (Leaves point past the RAM: Xen's tables take any frame.)
            let mut fast = SimMachine::new(256, format, 16);
            let mut slow = SimMachine::new(256, format, 16);
            let mut last_mapped = None;
            for step in 0..1500 {
                let region = base + 0x200 * next(2);
                let allocs = (next(8) == 0).then(|| next(2));
                for m in [&mut fast, &mut slow] {
                    m.fail_table_allocs(allocs);
                }
                match next(10) {
                    // A few pages mapped (some over present ones).
                    0..=4 => {
                        for _ in 0..1 + next(40) {
                            let page = next(0x200);
                            let mfn = Mfn(0x400 + next(0x400));
                            let perms = if next(2) == 0 { rw } else { Permissions::RO };
                            let a = fast.map_page(
                                DomId::DOM0,
                                ContextId::DEFAULT,
                                Bfn(region + page),
                                mfn,
                                perms,
                                wb,
                            );
                            let b = slow.map_page(
                                DomId::DOM0,
                                ContextId::DEFAULT,
                                Bfn(region + page),
                                mfn,
                                perms,
                                wb,
                            );
                            assert_eq!(a, b, "step {step}");
                        }
                        last_mapped = Some(region);
                    }
                    // The region mapped whole, aligned and contiguous: it
                    // folds into a superpage.
                    5 => {
                        let mfn = 0x400 * (1 + next(2));
                        for page in 0..0x200 {
                            let at = (Bfn(region + page), Mfn(mfn + page));
                            let a =
                                fast.map_page(DomId::DOM0, ContextId::DEFAULT, at.0, at.1, rw, wb);
                            let b =
                                slow.map_page(DomId::DOM0, ContextId::DEFAULT, at.0, at.1, rw, wb);
                            assert_eq!(a, b, "step {step}");
                        }
                        last_mapped = Some(region);
                    }
                    // A page unmapped (a superpage over it split).
                    6 => {
                        let bfn = Bfn(region + next(0x200));
                        let a = fast.unmap_page(DomId::DOM0, ContextId::DEFAULT, bfn, false);
                        let b = slow.unmap_page(DomId::DOM0, ContextId::DEFAULT, bfn, false);
                        assert_eq!(a, b, "step {step}");
                        last_mapped = None;
                    }
                    // The region unmapped whole.
                    _ => {
                        after_maps += u32::from(last_mapped == Some(region));
                        let a = fast.unmap_page(DomId::DOM0, ContextId::DEFAULT, Bfn(region), true);
                        let b = whole_unmap_page_by_page(&mut slow, Bfn(region));
                        assert_eq!(a, b, "step {step}");
                        cleared_any += u32::from(a.is_ok());
                        last_mapped = None;
                    }
                }
                if step % 16 == 0 {
                    let (a, b) = (table_memory_state(&fast.ram), table_memory_state(&slow.ram));
                    assert_eq!(a, b, "step {step}");
                }
                let counters =
                    |m: &SimMachine| (m.unmap_calls, m.superpage_unmaps, m.maps_over_present);
                assert_eq!(counters(&fast), counters(&slow), "step {step}");
                let marker = |m: &SimMachine| {
                    m.contexts
                        .get(&(DomId::DOM0, ContextId::DEFAULT))
                        .map(Context::queued_tables_marker)
                };
                assert_eq!(marker(&fast), marker(&slow), "step {step}");
                for page in (base..base + 0x400).step_by(1 + next(64) as usize) {
                    let t =
                        |m: &SimMachine| m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(page));
                    assert_eq!(t(&fast), t(&slow), "step {step}");
                }
            }
        }
        // The cached run was there to take, and pages were cleared.
        assert!(
            after_maps > 100 && cleared_any > 200,
            "{after_maps} {cleared_any}"
        );
    }

    /// Stale lines dropped from a range of the map (`drop_stale_lines`)
    /// are those, and as many, as a look-up of each line in the bitmap
    /// dropped: over random lines of neighbouring tables and random
    /// bitmaps, the whole table's too.
    #[test]
    fn stale_lines_dropped_from_a_range_are_those_each_look_up_dropped() {
        let mut ram = SimMachine::new(16, Format::Vtd, 4).ram;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut dropped_some = 0;
        for step in 0..2000 {
            for _ in 0..next() % 24 {
                let (table, line) = (3 + next() % 3, (next() % 64) as usize);
                ram.stale_lines
                    .insert((table, line), [line as u8; LINE_BYTES]);
            }
            let table = 3 + next() % 3;
            let lines = match next() % 4 {
                0 => u64::MAX,
                1 => 1 << (next() % 64),
                _ => next() & next(),
            };
            let mut want = ram.stale_lines.clone();
            let mut want_dropped = 0;
            for line in 0..64 {
                if lines & (1 << line) != 0 && want.remove(&(table, line)).is_some() {
                    want_dropped += 1;
                }
            }
            assert_eq!(
                ram.drop_stale_lines(table, lines),
                want_dropped,
                "step {step}"
            );
            assert_eq!(ram.stale_lines, want, "step {step}");
            dropped_some += u32::from(want_dropped > 0);
        }
        assert!(dropped_some > 500, "{dropped_some}");
    }

    /// The domain table answers as the ordered map it replaced: random
    /// inserts, replacements, removals and look-ups of domids in its flat
    /// table, past it and at its edge, reserved ones and the last.
    #[test]
    fn the_domain_table_answers_as_an_ordered_map() {
        let mut next = below_from(0x853c_49e6_748f_ea9bu64);
        let ids = [
            0u16,
            1,
            2,
            7,
            254,
            255,
            256,
            257,
            1000,
            0x7ff0,
            0x7ff2,
            u16::MAX,
        ];
        let mut table = DomainTable::new();
        let mut model = BTreeMap::new();
        let mut dense_hits = 0;
        for step in 0..20_000u64 {
            let id = DomId(ids[next(ids.len() as u64) as usize]);
            match next(5) {
                0 | 1 => assert_eq!(table.insert(id, step), model.insert(id, step), "{step}"),
                2 => assert_eq!(table.remove(&id), model.remove(&id), "{step}"),
                3 => {
                    let (a, b) = (table.get_mut(&id), model.get_mut(&id));
                    assert_eq!(a, b, "{step}");
                    if let (Some(a), Some(b)) = (a, b) {
                        *a += 1;
                        *b += 1;
                    }
                }
                _ => {}
            }
            for id in ids.map(DomId) {
                assert_eq!(table.get(&id), model.get(&id), "{step}");
                assert_eq!(table.contains_key(&id), model.contains_key(&id), "{step}");
            }
            dense_hits += u32::from(DomainTable::<u64>::dense_index(id).is_some());
        }
        assert!(table.dense.len() == DENSE_DOMIDS && !table.sparse.is_empty());
        assert!(dense_hits > 5000, "{dense_hits}");
    }

    /// The p2m guest's page run that takes its RAM pages with one look-up
    /// of their frames (`take_ram_until_refused`) takes, references and
    /// stops where the general rule (`take_until_refused` by
    /// `classify_entry`) does: over random p2m entries (read-write and
    /// read-only RAM, frames retired or past the RAM, MMIO, paged-out,
    /// granted, Xen's, none), log-dirty on and off, a VRAM range being
    /// revoked or none (each loop of the run's: a read, a write refused
    /// for log-dirty nowhere, a write that may be), reads and writes.
    #[test]
    fn a_ram_page_run_takes_what_the_general_rule_takes() {
        let mut next = below_from(0x9e37_79b9_7f4a_7c15u64);
        let guest = DomId(1);
        let spec = DomainSpec {
            pages: 64,
            privileged: false,
            device_model_of: None,
        };
        let (mut fast, mut slow) = (
            SimMachine::new(256, Format::Vtd, 16),
            SimMachine::new(256, Format::Vtd, 16),
        );
        for m in [&mut fast, &mut slow] {
            m.create_domain(guest, spec.clone()).unwrap();
        }
        let (mut fast_taken, mut stops, mut swept) = (0, 0, 0);
        for step in 0..3000 {
            // Some entries and frames changed, alike in both.
            for _ in 0..next(6) {
                let gfn = Gfn(next(80));
                let entry = match next(16) {
                    0 => None,
                    1 => Some(P2mEntry::Mmio),
                    2 => Some(P2mEntry::PagedOut),
                    3 => Some(P2mEntry::Grant),
                    4 => Some(P2mEntry::Xen),
                    _ => Some(P2mEntry::Ram {
                        mfn: Mfn(next(300)),
                        read_only: next(3) == 0,
                    }),
                };
                let retire = (next(8) == 0).then(|| next(256) as usize);
                let log_dirty = next(16) == 0;
                // Now and then a VRAM range starts or stops being revoked
                // (an empty one too: idle).
                let sweep = match next(24) {
                    0 => Some(Default::default()),
                    1 => {
                        let first = next(80);
                        Some(crate::engine::RangeSweep {
                            first,
                            last: first + next(24),
                            cursor: 0,
                        })
                    }
                    _ => None,
                };
                for m in [&mut fast, &mut slow] {
                    let d = m.domains.get_mut(&guest).unwrap();
                    match entry {
                        Some(e) => {
                            d.p2m.insert(gfn, e);
                        }
                        None => {
                            d.p2m.remove(&gfn);
                        }
                    }
                    if log_dirty {
                        d.log_dirty = !d.log_dirty;
                    }
                    if let Some(sweep) = sweep {
                        d.vram_sweep = sweep;
                    }
                    if let Some(f) = retire {
                        m.ram.info[f].retired = !m.ram.info[f].retired;
                    }
                }
            }
            let want_write = next(2) == 0;
            let first = next(80);
            let asked: Vec<PageSlot> = (0..1 + next(24))
                .map(|k| PageSlot::asking(Gfn((first + k * (1 + next(3))) % 80)))
                .collect();
            let limit = next(asked.len() as u64 + 2) as usize;
            let (mut a, mut b) = (asked.clone(), asked);
            let da = fast.domains.get(&guest).unwrap();
            let got = take_ram_until_refused(&mut fast.ram, da, &mut a, limit, want_write);
            let db = slow.domains.get(&guest).unwrap();
            let sweeping = want_write && !db.vram_sweep.is_idle();
            let want = take_until_refused(&mut slow.ram, &mut b, limit, want_write, |ram, gfn| {
                let log_dirty =
                    db.log_dirty || (sweeping && db.vram_sweep.freezes_writes_to(gfn.0));
                classify_entry(ram, db.p2m.get(&gfn), want_write, log_dirty)
            });
            assert_eq!(got, want, "step {step}");
            assert_eq!(a, b, "step {step}");
            assert_eq!(page_refs(&fast), page_refs(&slow), "step {step}");
            fast_taken += a
                .iter()
                .take(got.map_or(limit.min(a.len()), |(i, _)| i))
                .count();
            stops += u32::from(got.is_some());
            swept += u32::from(sweeping && !db.log_dirty);
        }
        assert!(fast_taken > 800 && stops > 1000, "{fast_taken} {stops}");
        assert!(swept > 200, "{swept}");
    }

    /// Everything a table store may change in the RAM, to compare.
    /// The first frame of a 64-frame test machine that `owner` holds.
    fn first_frame_owned_by(m: &SimMachine, owner: Owner) -> u64 {
        (0..64)
            .find(|&f| m.ram.info[f as usize].owner == owner)
            .unwrap()
    }

    fn table_memory_state(ram: &Ram) -> impl PartialEq + core::fmt::Debug {
        let unlinked: Vec<_> = ram
            .unlinked_tables
            .map
            .iter()
            .map(|(f, u)| (*f, u.root, u.parent, u.index, u.first, u.last))
            .collect();
        (
            (ram.bytes.clone(), unlinked, ram.frame_bits.clone()),
            ram.table_parent.clone(),
            (
                ram.unlinked_tables_rewritten,
                ram.tables_linked_over_stale_entries,
                ram.tables_freed_before_flush,
                ram.tables_freed_stale,
            ),
            (ram.stale_lines.len(), ram.lines_synced, ram.line_writebacks),
        )
    }

    /// The store that links no table (`store_linking_no_table`, which the
    /// machine's and Xen's own tables' stores take first on coherent
    /// tables) leaves the RAM as the full bookkeeping does, store by
    /// store: entries cleared and filled, tables linked, unlinked, linked
    /// back and rewritten while unlinked, frames that are no tables, free
    /// or past the RAM, and stores into a frame that is not allocated.
    #[test]
    fn a_store_linking_no_table_changes_what_the_full_bookkeeping_does() {
        let mut fast = SimMachine::new(64, Format::Vtd, 16);
        let mut full = SimMachine::new(64, Format::Vtd, 16);
        let mut through = SimMachine::new(64, Format::Vtd, 16);
        for m in [&mut fast, &mut full, &mut through] {
            m.set_coherent_table_walks(true);
        }
        let tables: Vec<Mfn> = (0..6).map(|_| fast.alloc_table().unwrap()).collect();
        for m in [&mut full, &mut through] {
            for &t in &tables {
                assert_eq!(m.alloc_table(), Ok(t));
            }
        }
        let dom0_frame = first_frame_owned_by(&fast, Owner::Domain(DomId::DOM0));
        let free_frame = first_frame_owned_by(&fast, Owner::Free);
        // Where a store goes, and what it stores.
        let places: Vec<Mfn> = tables.iter().copied().chain([Mfn(free_frame)]).collect();
        let mut values = vec![
            0u64,
            0x7000,
            0x1,
            dom0_frame << 12 | 3,
            free_frame << 12 | 3,
        ];
        values.extend([1000 << 12 | 3, 1 << 47 | 3]);
        values.extend(tables.iter().map(|t| t.0 << 12 | 3));
        values.extend(tables.iter().map(|t| t.0 << 12 | 1));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut fast_taken = 0;
        for step in 0..20_000 {
            let table = places[next(places.len())];
            let index = [0, 1, 2, 511][next(4)];
            let raw = values[next(values.len())];
            let old = full.ram.read_entry(table, index);
            if full.ram.is_present(table)
                && full.ram.table_target(old) == full.ram.table_target(raw)
            {
                fast_taken += 1;
            }
            TableMemory::write_entry(&mut fast, table, index, raw);
            full.ram.note_unlink(table, index, raw);
            full.ram.store(table, index, raw);
            WriteThrough(&mut through.ram).write_entry(table, index, raw);
            let want = table_memory_state(&full.ram);
            assert_eq!(table_memory_state(&fast.ram), want, "step {step}");
            assert_eq!(table_memory_state(&through.ram), want, "step {step}");
            // Now and then a flush forgets what was unlinked.
            if next(64) == 0 {
                for m in [&mut fast, &mut full, &mut through] {
                    m.ram.forget_unlinked_under(Some(tables[0]), 0, u64::MAX);
                }
            }
        }
        // Both ways were taken, and stores counted in unlinked tables.
        assert!(fast_taken > 1000 && fast_taken < 19_000, "{fast_taken}");
        assert!(full.ram.unlinked_tables_rewritten > 0);
    }

    /// A table memory with only the trait's required services forwarded:
    /// its `read_entry_and_count`, `write_entry_counted` and
    /// `clear_entries_keeping_one` are the trait's defaults, the rule the
    /// machine's own forms must follow.
    struct TraitDefaults<'a, M>(&'a mut M);

    impl<M: TableMemory> TableMemory for TraitDefaults<'_, M> {
        fn alloc_table(&mut self) -> Result<Mfn, Errno> {
            self.0.alloc_table()
        }
        fn free_table(&mut self, table: Mfn) {
            self.0.free_table(table)
        }
        fn read_entry(&self, table: Mfn, index: usize) -> u64 {
            self.0.read_entry(table, index)
        }
        fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
            self.0.write_entry(table, index, raw)
        }
        fn present_count(&self, table: Mfn) -> u16 {
            self.0.present_count(table)
        }
        fn set_present_count(&mut self, table: Mfn, count: u16) {
            self.0.set_present_count(table, count)
        }
    }

    /// The machine's and Xen's own tables' `write_entry_counted` (the
    /// count set with the store's one look-up of the frame) and
    /// `read_entry_and_count` (one look-up for both answers) do what the
    /// trait's defaults do, a store and its count at a time: on coherent
    /// and non-coherent tables, entries cleared and filled, tables linked,
    /// unlinked and rewritten while unlinked, frames free or not tables.
    #[test]
    fn counted_stores_and_reads_are_the_trait_defaults() {
        for coherent in [true, false] {
            let mut own = SimMachine::new(64, Format::Vtd, 16);
            let mut by_default = SimMachine::new(64, Format::Vtd, 16);
            let mut through = SimMachine::new(64, Format::Vtd, 16);
            let mut through_by_default = SimMachine::new(64, Format::Vtd, 16);
            let mut machines = [
                &mut own,
                &mut by_default,
                &mut through,
                &mut through_by_default,
            ];
            for m in machines.iter_mut() {
                m.set_coherent_table_walks(coherent);
            }
            let tables: Vec<Mfn> = (0..4).map(|_| own.alloc_table().unwrap()).collect();
            for m in [&mut by_default, &mut through, &mut through_by_default] {
                for &t in &tables {
                    assert_eq!(m.alloc_table(), Ok(t));
                }
            }
            let dom0_frame = first_frame_owned_by(&own, Owner::Domain(DomId::DOM0));
            let free_frame = first_frame_owned_by(&own, Owner::Free);
            let places: Vec<Mfn> = tables.iter().copied().chain([Mfn(free_frame)]).collect();
            let mut values = vec![0u64, 0x1, dom0_frame << 12 | 3, free_frame << 12 | 3];
            values.extend(tables.iter().map(|t| t.0 << 12 | 3));
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            for step in 0..5_000 {
                let table = places[next(places.len())];
                let index = [0, 1, 511][next(3)];
                let raw = values[next(values.len())];
                let count = [0u16, 1, 2, 512][next(4)];
                TableMemory::write_entry_counted(&mut own, table, index, raw, count);
                TraitDefaults(&mut by_default).write_entry_counted(table, index, raw, count);
                WriteThrough(&mut through.ram).write_entry_counted(table, index, raw, count);
                TraitDefaults(&mut WriteThrough(&mut through_by_default.ram))
                    .write_entry_counted(table, index, raw, count);
                let want = table_memory_state(&by_default.ram);
                assert_eq!(table_memory_state(&own.ram), want, "{coherent} step {step}");
                let want_through = table_memory_state(&through_by_default.ram);
                assert_eq!(
                    table_memory_state(&through.ram),
                    want_through,
                    "{coherent} step {step}"
                );
                for &t in &places {
                    for i in [0, 1, 511] {
                        let want = TraitDefaults(&mut by_default).read_entry_and_count(t, i);
                        assert_eq!(own.read_entry_and_count(t, i), want, "step {step}");
                        let want = TraitDefaults(&mut WriteThrough(&mut through_by_default.ram))
                            .read_entry_and_count(t, i);
                        let got = WriteThrough(&mut through.ram).read_entry_and_count(t, i);
                        assert_eq!(got, want, "step {step}");
                    }
                }
                if next(64) == 0 {
                    for m in [
                        &mut own,
                        &mut by_default,
                        &mut through,
                        &mut through_by_default,
                    ] {
                        m.ram.sync_tables();
                        m.ram.forget_unlinked_under(Some(tables[0]), 0, u64::MAX);
                    }
                }
            }
            // Counts were set, and stores counted in unlinked tables.
            assert!(own.ram.frame_bits.0.iter().any(|s| s.pt_count == 512));
            assert!(own.ram.unlinked_tables_rewritten > 0);
        }
    }

    /// The machine's and Xen's own tables' `clear_entries_keeping_one` (a
    /// run's stores that link no table made with one look-up of the
    /// frame) do what the trait's default does, an entry at a time: the
    /// same entries cleared, the same run done, the same count, the same
    /// records (stale lines, unlinked tables, rewrites of unlinked ones),
    /// and through `NotingStores` the same note of a store; on coherent
    /// and non-coherent tables, over random runs of tables holding leaves,
    /// entries that are not present, links to tables and counts that do
    /// or do not match them, and frames that are not tables or are free.
    #[test]
    fn a_run_cleared_at_once_is_the_entries_cleared_one_by_one() {
        let (mut runs_stopped_last, mut runs_unlinking, mut runs_fast) = (0, 0, 0);
        for coherent in [true, false] {
            let mut own = SimMachine::new(64, Format::Vtd, 16);
            let mut by_default = SimMachine::new(64, Format::Vtd, 16);
            let mut through = SimMachine::new(64, Format::Vtd, 16);
            let mut through_by_default = SimMachine::new(64, Format::Vtd, 16);
            for m in [
                &mut own,
                &mut by_default,
                &mut through,
                &mut through_by_default,
            ] {
                m.set_coherent_table_walks(coherent);
            }
            let tables: Vec<Mfn> = (0..5).map(|_| own.alloc_table().unwrap()).collect();
            for m in [&mut by_default, &mut through, &mut through_by_default] {
                for &t in &tables {
                    assert_eq!(m.alloc_table(), Ok(t));
                }
            }
            let dom0_frame = first_frame_owned_by(&own, Owner::Domain(DomId::DOM0));
            let free_frame = first_frame_owned_by(&own, Owner::Free);
            let places: Vec<Mfn> = tables.iter().copied().chain([Mfn(free_frame)]).collect();
            // Leaves (most), entries that are not present, links to tables.
            let mut values = vec![
                0u64,
                0x7000,
                0x4,
                dom0_frame << 12 | 3,
                dom0_frame << 12 | 1,
            ];
            values.extend([dom0_frame << 12 | 3, free_frame << 12 | 3, 1 << 47 | 2]);
            values.extend(tables.iter().map(|t| t.0 << 12 | 3));
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut next = |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            let present: [fn(u64) -> bool; 3] = [
                |e| Vtd::decode(e, 1) != Entry::Empty,
                |e| e != 0,
                |e| e & 1 != 0,
            ];
            for step in 0..3_000 {
                let table = places[next(places.len())];
                // Fill some entries first (the same stores everywhere).
                for _ in 0..next(24) {
                    let index = next(512);
                    let raw = values[next(values.len())];
                    for m in [&mut own, &mut by_default] {
                        TableMemory::write_entry(m, table, index, raw);
                    }
                    for m in [&mut through, &mut through_by_default] {
                        WriteThrough(&mut m.ram).write_entry(table, index, raw);
                    }
                }
                let count = [0u16, 1, 2, 3, 7, 512][next(6)];
                for m in [
                    &mut own,
                    &mut by_default,
                    &mut through,
                    &mut through_by_default,
                ] {
                    m.ram.set_present_count(table, count);
                }
                let start = [0, 1, next(512), 509][next(4)];
                let end = (start + [0, 1, 3, next(512), 512][next(5)]).min(512);
                // Now and then a reversed run (nothing done).
                let (start, end) = if next(16) == 0 {
                    (end, start)
                } else {
                    (start, end)
                };
                let is_present = present[next(present.len())];
                // Whether the run holds a link to a table (its store unlinks
                // it, with the full bookkeeping, if the run gets there).
                if (start..end).any(|i| {
                    let raw = own.ram.read_entry(table, i);
                    is_present(raw) && own.ram.table_target(raw).is_some()
                }) {
                    runs_unlinking += 1;
                }
                let done = own.clear_entries_keeping_one(table, start..end, is_present);
                let want = TraitDefaults(&mut by_default).clear_entries_keeping_one(
                    table,
                    start..end,
                    is_present,
                );
                assert_eq!(done, want, "{coherent} step {step}");
                let mut noting = NotingStores(&mut WriteThrough(&mut through.ram), false);
                let done = noting.clear_entries_keeping_one(table, start..end, is_present);
                let noted = noting.1;
                let mut inner = WriteThrough(&mut through_by_default.ram);
                let mut noting_by_default = NotingStores(&mut inner, false);
                let want = TraitDefaults(&mut noting_by_default).clear_entries_keeping_one(
                    table,
                    start..end,
                    is_present,
                );
                assert_eq!(done, want, "{coherent} step {step}");
                assert_eq!(noted, noting_by_default.1, "{coherent} step {step}");
                let want = table_memory_state(&by_default.ram);
                assert_eq!(table_memory_state(&own.ram), want, "{coherent} step {step}");
                let want = table_memory_state(&through_by_default.ram);
                assert_eq!(
                    table_memory_state(&through.ram),
                    want,
                    "{coherent} step {step}"
                );
                let dirty = format!("{:?}", by_default.ram.dirty);
                assert_eq!(
                    format!("{:?}", own.ram.dirty),
                    dirty,
                    "{coherent} step {step}"
                );
                // What the runs met.
                if start + done < end {
                    runs_stopped_last += 1;
                }
                if done > 0 && noted {
                    runs_fast += 1;
                }
                if next(32) == 0 {
                    for m in [
                        &mut own,
                        &mut by_default,
                        &mut through,
                        &mut through_by_default,
                    ] {
                        m.ram.sync_tables();
                        m.ram.forget_unlinked_under(Some(tables[0]), 0, u64::MAX);
                    }
                }
            }
            assert!(own.ram.unlinked_tables_rewritten > 0);
            assert!(through.ram.unlinked_tables_rewritten > 0);
        }
        assert!(runs_stopped_last > 100, "{runs_stopped_last}");
        assert!(runs_fast > 100, "{runs_fast}");
        assert!(runs_unlinking > 100, "{runs_unlinking}");
    }

    /// Review 163: a table frame freed with entries still in it (a frame
    /// is zeroed when taken, not when freed) reads as `read_entry` and
    /// `present_count` read it, entry 0, through the machine's own
    /// `read_entry_and_count` and Xen's own tables' (`WriteThrough`): the
    /// frame's allocated bit is asked, not only its bytes. (Kills the
    /// mutant that drops the `FrameBits::PRESENT` test from
    /// `Ram::entry_and_count`; `counted_stores_and_reads_are_the_trait_defaults`
    /// reads only a free frame that never held anything.)
    #[test]
    fn a_freed_table_reads_as_the_trait_defaults() {
        for coherent in [true, false] {
            let mut m = SimMachine::new(64, Format::Vtd, 16);
            m.set_coherent_table_walks(coherent);
            let dom0_frame = first_frame_owned_by(&m, Owner::Domain(DomId::DOM0));
            let leaf = dom0_frame << 12 | 3;
            let t = m.alloc_table().unwrap();
            for (k, i) in [0usize, 5, 511].into_iter().enumerate() {
                TableMemory::write_entry_counted(&mut m, t, i, leaf, k as u16 + 1);
            }
            assert_eq!(m.read_entry_and_count(t, 5), (leaf, 3));
            m.free_table(t);
            assert!(!m.ram.is_present(t));
            for i in [0usize, 5, 511] {
                let want = TraitDefaults(&mut m).read_entry_and_count(t, i);
                assert_eq!(want.0, 0, "{coherent} {i}");
                assert_eq!(m.read_entry_and_count(t, i), want, "{coherent} {i}");
                let through = WriteThrough(&mut m.ram).read_entry_and_count(t, i);
                assert_eq!(through, want, "{coherent} {i}");
            }
        }
    }

    /// Xen's map run as 6ad3524 modelled it, verbatim: one `map_page` a
    /// call, the context looked up each time (review 160).
    #[allow(clippy::too_many_arguments)]
    fn old_iommu_map_run(
        m: &mut SimMachine,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        count: u64,
        perms: Permissions,
        attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let _host = HostAllocations::begin();
        m.map_runs += 1;
        // (An empty run too, as Xen's glue answers one.)
        let Some(Bfn(last)) = crate::iommu::run_last(bfn, count) else {
            return Err(Errno::Inval);
        };
        if count > crate::iommu::MAX_IOMMU_RUN {
            m.runs_too_long += 1;
            return Err(Errno::Inval);
        }
        if mfn.0.checked_add(count).is_none() {
            return Err(Errno::Inval);
        }
        let width = m.address_bits.saturating_sub(12);
        if width < 64 && last >> width != 0 {
            m.maps_past_width += 1;
            return Err(Errno::Inval);
        }
        if !m.glue_admits(bfn.0, count) {
            return Err(Errno::Inval);
        }
        // Xen 4.17's `iommu_map()`: each call takes the largest size the
        // IOMMU has (here 4 KiB and 2 MiB) where both the BFN and the frame
        // start aligned and the rest of the run covers it
        // (`mapping_order()`). At the first failure it unmaps what the
        // calls before mapped (`iommu_unmap(d, dfn0, i)`, its own failure
        // ignored), flushes, and answers the error.
        let mut result = Ok(());
        let mut flags = 0;
        let mut done = 0u64;
        while done < count {
            let (b, f) = (bfn.0 + done, mfn.0 + done);
            let whole = (b | f) & 0x1ff == 0 && count - done >= 0x200;
            let pages = if whole { 0x200 } else { 1 };
            m.map_calls += 1;
            m.superpage_maps += u64::from(whole);
            // What a 2 MiB call's flags depend on: what it replaces, and
            // the tables queued before it.
            let before = whole.then(|| m.before_whole_map(owner, ctx, Bfn(b)));
            let mut written = 0;
            let mut page_flags = 0;
            let mut mapped = Ok(());
            // The leaf table the simulator builds for a 2 MiB call into an
            // empty slot, and folds by its last page: never Xen's (its call
            // writes the one entry), never seen by a device (no DMA runs
            // within the call), so not one the IOMMU may have cached.
            let mut scaffold = None;
            while written < pages {
                match m.map_page(owner, ctx, Bfn(b + written), Mfn(f + written), perms, attr) {
                    Ok(set) => page_flags |= set,
                    Err(e) => {
                        mapped = Err(e);
                        break;
                    }
                }
                if written == 0 && matches!(before, Some((Entry::Empty, _))) {
                    scaffold = match m.level2_entry_at(owner, ctx, Bfn(b)) {
                        Entry::Table(t) => Some(t),
                        _ => None,
                    };
                }
                written += 1;
            }
            if let (Some(t), Ok(())) = (scaffold, &mapped) {
                let ram = &mut m.ram;
                ram.unlinked_tables.remove(&mut ram.frame_bits, t.0);
            }
            flags |= match before {
                Some(before) if mapped.is_ok() => {
                    m.whole_map_flags(owner, ctx, before, Mfn(f), perms, attr)
                }
                _ => page_flags,
            };
            if let Err(e) = mapped {
                // Xen's order-9 `map_page` fails whole (its table is
                // allocated before any entry is written); here the pages
                // went in one by one: those this call wrote go, as part of
                // the failed call (not one of Xen's unmaps, and not one a
                // test's unmap failure is meant for).
                m.take_back_pages(owner, ctx, b, written);
                if let Some(last_done) = done.checked_sub(1) {
                    let _ = m.xen_unmap_pages(owner, ctx, bfn.0, bfn.0 + last_done, &mut flags);
                }
                // (And the glue marks a failed run modified.)
                flags |= flushf::MODIFIED;
                result = Err(e);
                break;
            }
            done += pages;
        }
        gather.add_range(ctx, bfn, Bfn(last), flags)?;
        result
    }

    /// Review 160: the run's 4 KiB stretches (context and format looked up
    /// once) against 6ad3524's per-call loop, over random runs, holes,
    /// overwrites, table-allocation failures, contexts made on first use.
    #[test]
    fn xens_map_run_by_stretches_does_what_the_call_by_call_loop_did() {
        let base = 0x10_0000u64;
        let mut next = below_from(0x1234_5678_9abc_def1u64);
        let (mut runs, mut fails, mut overwrites) = (0u64, 0u64, 0u64);
        for format in [Format::Vtd, Format::Lpae] {
            let mut fast = SimMachine::new(512, format, 32);
            let mut slow = SimMachine::new(512, format, 32);
            for step in 0..3000 {
                let owner = if next(16) == 0 {
                    DomId(1 + next(3) as u16)
                } else {
                    DomId::DOM0
                };
                let ctx = if next(64) == 0 {
                    ContextId(1)
                } else {
                    ContextId::DEFAULT
                };
                let allocs = (next(6) == 0).then(|| next(3));
                for m in [&mut fast, &mut slow] {
                    m.fail_table_allocs(allocs);
                }
                match next(8) {
                    0 => {
                        // Holes: a page or a 2 MiB unmapped.
                        let whole = next(3) == 0;
                        let b = Bfn(base + if whole { 0x200 * next(4) } else { next(0x800) });
                        let a = fast.unmap_page(owner, ContextId::DEFAULT, b, whole);
                        let c = slow.unmap_page(owner, ContextId::DEFAULT, b, whole);
                        assert_eq!(a, c, "step {step}");
                    }
                    _ => {
                        let aligned = next(3) == 0;
                        let bfn = base
                            + if aligned {
                                0x200 * next(4) + next(4)
                            } else {
                                next(0x800)
                            };
                        let mfn = if next(2) == 0 {
                            0x400 + (bfn & 0x1ff) + 0x200 * next(3)
                        } else {
                            0x400 + next(0x600)
                        };
                        let count = match next(4) {
                            0 => 1 + next(4),
                            1 => 0x200 + next(0x300),
                            _ => 1 + next(0x200),
                        };
                        let perms = if next(4) == 0 {
                            Permissions::RO
                        } else {
                            Permissions::RW
                        };
                        let attr = MemAttr::WriteBack;
                        let (mut ga, mut gb) = (FlushGather::default(), FlushGather::default());
                        let a = fast.iommu_map_run(
                            owner,
                            ctx,
                            Bfn(bfn),
                            Mfn(mfn),
                            count,
                            perms,
                            attr,
                            &mut ga,
                        );
                        let b = old_iommu_map_run(
                            &mut slow,
                            owner,
                            ctx,
                            Bfn(bfn),
                            Mfn(mfn),
                            count,
                            perms,
                            attr,
                            &mut gb,
                        );
                        assert_eq!(a, b, "step {step}");
                        assert_eq!(format!("{ga:?}"), format!("{gb:?}"), "step {step}");
                        runs += 1;
                        fails += u64::from(a.is_err());
                    }
                }
                let counters = |m: &SimMachine| {
                    (
                        m.map_calls,
                        m.superpage_maps,
                        m.maps_over_present,
                        m.unmap_calls,
                        m.superpage_unmaps,
                        m.map_runs,
                    )
                };
                assert_eq!(counters(&fast), counters(&slow), "step {step}");
                overwrites = fast.maps_over_present;
                if step % 8 == 0 {
                    assert_eq!(
                        table_memory_state(&fast.ram),
                        table_memory_state(&slow.ram),
                        "step {step}"
                    );
                    for page in (base..base + 0x800).step_by(1 + next(32) as usize) {
                        for o in [DomId::DOM0, DomId(1)] {
                            let t = |m: &SimMachine| m.translate(o, ContextId::DEFAULT, Bfn(page));
                            assert_eq!(t(&fast), t(&slow), "step {step}");
                        }
                    }
                }
            }
        }
        eprintln!("review160 runs {runs} fails {fails} overwrites {overwrites}");
        assert!(
            runs > 1000 && fails > 50 && overwrites > 50,
            "{runs} {fails} {overwrites}"
        );
    }

    /// A PV guest's page run (`get_pages`' PV loop: each frame referenced
    /// as it is taken) takes what the rule took before the 50th session:
    /// every page classified by [`classify_pv_frame`] up to the first it
    /// refuses, the taken ones referenced after. Frames typed as page
    /// tables, shared by Xen, retired, another domain's, free or past the
    /// RAM, log-dirty on and off, reads and writes (review 160's F2: the
    /// p2m guests' loop had this test, the PV one not).
    #[test]
    fn a_pv_page_run_takes_what_classifying_then_referencing_took() {
        let mut next = below_from(0x2545_f491_4f6c_dd1du64);
        let (guest, other) = (DomId(1), DomId(2));
        let spec = |pages| DomainSpec {
            pages,
            privileged: false,
            device_model_of: None,
        };
        let (mut fast, mut slow) = (
            SimMachine::new(256, Format::Vtd, 16),
            SimMachine::new(256, Format::Vtd, 16),
        );
        for m in [&mut fast, &mut slow] {
            m.create_domain(guest, spec(64)).unwrap();
            m.create_domain(other, spec(32)).unwrap();
            m.make_pv(guest);
        }
        let (mut taken, mut stops, mut writes_refused) = (0, 0, 0);
        for step in 0..3000 {
            // Some frames marked or unmarked, alike in both (each kind on
            // about an eighth of the frames, log-dirty a quarter of the time).
            for _ in 0..next(3) {
                let frame = next(300);
                let (what, on) = (next(4), next(8) == 0);
                for m in [&mut fast, &mut slow] {
                    let d = m.domains.get_mut(&guest).unwrap();
                    let mark = |set: &mut BTreeSet<u64>| {
                        if on {
                            set.insert(frame);
                        } else {
                            set.remove(&frame);
                        }
                    };
                    match what {
                        0 => mark(&mut d.pv_typed),
                        1 => mark(&mut d.pv_xen_shared),
                        2 => d.log_dirty = frame.is_multiple_of(4),
                        _ => {
                            if let Some(f) = m.ram.info.get_mut(frame as usize) {
                                f.retired = on;
                            }
                        }
                    }
                }
            }
            let want_write = next(2) == 0;
            // Mostly about the guest's own frames (from 16, after dom0's).
            let (first, span) = if next(8) == 0 { (0, 300) } else { (10, 80) };
            let start = next(span);
            let asked: Vec<PageSlot> = (0..1 + next(24))
                .map(|k| PageSlot::asking(Gfn(first + (start + k * (1 + next(3))) % span)))
                .collect();
            let limit = next(asked.len() as u64 + 2) as usize;
            let (mut a, mut b) = (asked.clone(), asked);
            let d = fast.domains.get(&guest).unwrap();
            let got = take_until_refused(&mut fast.ram, &mut a, limit, want_write, |ram, gfn| {
                classify_pv_frame(ram, guest, d, gfn.0, want_write)
            });
            // The rule as it was: classify the run, then reference it.
            let d = slow.domains.get(&guest).unwrap();
            let mut want = None;
            let mut kinds = Vec::new();
            for (i, slot) in b.iter_mut().enumerate().take(limit) {
                let (kind, mfn) = classify_pv_frame(&slow.ram, guest, d, slot.gfn().0, want_write);
                kinds.push(kind);
                match mfn {
                    Some(mfn) => slot.take(mfn),
                    None => {
                        want = Some((i, slot.gfn()));
                        break;
                    }
                }
            }
            let took = want.map_or(limit.min(b.len()), |(i, _)| i);
            for slot in &b[..took] {
                slow.ram.reference(Mfn(slot.gfn().0), want_write);
            }
            assert_eq!(got, want, "step {step}");
            assert_eq!(a, b, "step {step}");
            assert_eq!(page_refs(&fast), page_refs(&slow), "step {step}");
            taken += took;
            stops += u32::from(got.is_some());
            writes_refused += u32::from(kinds.last() == Some(&PageKind::RamRo) && want_write);
        }
        assert!(
            taken > 4000 && stops > 1000 && writes_refused > 30,
            "{taken} {stops} {writes_refused}"
        );
    }
}
