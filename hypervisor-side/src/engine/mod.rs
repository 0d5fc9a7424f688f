//! The engine's state and the operations that change it.
//!
//! # Locks (what protects what)
//!
//! * **Target gates** ([`TargetGate`], one per domid, atomics, no lock):
//!   how many live mappings or in-flight maps point at a domain's pages
//!   (`active`), a sequence number bumped whenever the domain's p2m loses a
//!   page the engine may have looked up (`seq`), and which driver cells map
//!   its pages (`drivers`). They let the gfn hook of a domain nobody maps
//!   return without touching any lock, send the hook of a mapped one only
//!   to the driver domains that map it, and let a map that looked its page
//!   up *without* a lock detect that the page left in between.
//! * **Cell table** (`cell_of`, `ctx_cells`, `owners`, atomics, no lock):
//!   which of the [`MAX_DRIVER_DOMAINS`] cells holds a driver domain's
//!   state for each of its contexts. A driver domain's *home cell* holds
//!   its context 0 (and the list of its contexts); each context it creates
//!   gets a cell of its own. A home cell is claimed by compare-and-swap on
//!   first use and given back when idle; a context's cell lives from the
//!   context's creation to its destruction. Every lookup is checked again
//!   under the cell's lock.
//! * **A driver lock per cell** (a platform lock: one of Xen's spinlocks
//!   `pvx_driver_locks[]`, or a checked `parking_lot` mutex hosted): that
//!   cell's [`DriverDomain`]: the slots, page index, lists and pending
//!   flush of one driver domain's mappings into one context. Two driver
//!   domains, or two vCPUs of one mapping into different contexts, map,
//!   unmap and flush in parallel; a hook takes the locks of the cells its
//!   target's gate names, one at a time.
//! * **Per driver domain, shared by its cells** (`DriverShared`, atomics
//!   in its home cell's slot): BFNs in use across its cells, for the quota.
//! * **Per domid** (`notice_counts`, `lives`, atomics): a driver domain's
//!   count of notices, which orders them across its cells and numbers them
//!   (ABI 1.5), and the domid's life number with the quota the toolstack
//!   set for that life (`DomidLife`, one word). Kept by domid, not in a
//!   cell, so that the numbers never repeat in a domain's life however
//!   often its cells are released and claimed, a cell's next owner does not
//!   inherit them, and setting a quota takes no cell (the pool of cells is
//!   for domains that map); the count and quota forgotten, and the life
//!   moved, when the domain's teardown ends.
//!
//! * **The backend's devices lock** (Xen's `pcidevs_lock`): taken before a
//!   driver lock by everything that points devices at contexts or takes
//!   contexts down ([`contexts`]), since Xen calls
//!   [`Engine::device_leaving`] with it held.
//!
//! Lock order: `devices lock -> target p2m lock -> one driver lock -> IOMMU
//! mapping lock -> heap lock` (Xen's device assignment can change a p2m,
//! and so run a gfn hook, under `pcidevs_lock`; both only ever come before
//! a driver lock). The engine never holds two driver locks (only the
//! inspection view [`Engine::state`] does, by `try_lock` in cell order),
//! and never holds one across a guest copy, [`Platform::get_page`] or
//! [`Platform::domain_info`] (those take p2m locks), so a hook entered with
//! a p2m lock held can always take a driver lock.
//!
//! # Storage
//!
//! Per driver domain and context, a slot array indexed by BFN (through
//! [`BfnSpace`]; each context is an address space of its own, with BFNs
//! numbered on their own), a
//! page index (target domid, gfn) -> chain of its live mappings of that
//! page, which serves both dedup and O(1) revocation from the gfn hook, and
//! lists threaded through the slots (free, unmapping, stuck, revocation
//! notices): O(1) map, unmap, lookup and acknowledge. Every allocation
//! happens before any state changes and fails with `ENOMEM`; nothing on a
//! hypercall or hook path can panic (`build-engine.sh` proves it for the
//! Xen object).

mod contexts;
mod driver;
mod extent;
mod map;
mod revoke;
mod unmap;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use alloc::vec::Vec;
use lock_api::{Mutex, MutexGuard, RawMutex};

pub use contexts::{
    LeafBits, MAX_DEVICES_PER_CONTEXT, REVOKED_FAULTS_PER_SECOND, REVOKED_FAULT_BURST,
};
pub use driver::{DriverDomain, DriverStats, Mapping, Notice, Slot, REGION_GFN_END};
pub use extent::ExtentMapped;
pub use revoke::{
    GfnChange, RangeSweep, Restart, PREEMPT_RELEASE_LIMIT, RELEASE_BUDGET, SLICE_REVOKES,
    SLICE_REVOKES_MOST, SLICE_VISITS, STUCK_RETRIES, TABLE_FREES_PER_CALL, TABLE_FREE_COST,
};

use crate::bfn_alloc::{BfnSpace, BfnWindow};
use crate::config::{Config, MAX_CONTEXTS, X86_MSI_WINDOW};
use crate::iommu::IommuBackend;
use crate::nospec::get_nospec;
use crate::platform::{Platform, ReservedRange};
use crate::storage::{try_from_fn, try_push};
use crate::{Bfn, ContextId, DomId, Errno};
use pviommu_abi::region_kind;

/// Everything the engine needs from the hypervisor.
pub trait Hypervisor: Platform + IommuBackend {}
impl<T: Platform + IommuBackend> Hypervisor for T {}

/// How often a map retries when the target's p2m changed under it.
const MAP_RETRIES: u32 = 4;

/// How often an op on another domain's state (`SET_LIMITS`, `STATS`,
/// `ENTRY`) starts again from its checks when the domid changed hands
/// meanwhile ([`DomidLife`]); then `EAGAIN`.
pub(crate) const CONTROL_RETRIES: u32 = 4;

/// Cells of driver state (one bit each in a target gate's `drivers` mask):
/// a driver domain takes one, plus one per context it creates. Cells 0 to
/// [`DOM0_CELLS`] - 1 are kept for dom0 (its home and its contexts), so
/// device models filling the rest cannot lock the control domain's
/// mediator out.
pub const MAX_DRIVER_DOMAINS: usize = 128;
/// Cells kept for dom0: its home cell (0) and one per context it can have.
pub const DOM0_CELLS: usize = MAX_CONTEXTS as usize;
/// Contexts (0 included) a driver domain other than dom0 may have: each
/// takes a cell from the pool the device models share, so one domain may
/// take at most this many of its [`MAX_DRIVER_DOMAINS`] - [`DOM0_CELLS`].
pub const OTHER_MAX_CONTEXTS: u32 = 4;
/// Free cells of that pool a context of a driver domain other than dom0
/// never takes: they are kept for home cells, so device models that
/// create contexts cannot keep others from mapping at all.
pub const HOME_RESERVE: usize = 16;
const _: () = assert!(HOME_RESERVE < MAX_DRIVER_DOMAINS - DOM0_CELLS);
/// A set of driver cells (bit n: cell n), as a target's gate names those
/// that map it.
pub type CellMask = u128;
const _: () = assert!(MAX_DRIVER_DOMAINS <= CellMask::BITS as usize);
/// 64-bit words of a gate's [`CellMask`].
const GATE_WORDS: usize = MAX_DRIVER_DOMAINS.div_ceil(64);

/// The cells of `mask`, lowest first: a walk costs the cells named, not
/// the number of cells.
pub fn cells_in(mask: CellMask) -> impl Iterator<Item = usize> {
    let mut left = mask;
    core::iter::from_fn(move || {
        (left != 0).then(|| {
            let cell = left.trailing_zeros() as usize;
            left &= left - 1;
            cell
        })
    })
}

/// The [`CellMask`] of its 64-bit words, lowest first (word w holds cells
/// 64w to 64w + 63): a gate's, or Xen's per-CPU mask of held cells. Words
/// past the mask's width are ignored.
pub fn cell_mask_of_words(words: impl IntoIterator<Item = u64>) -> CellMask {
    words
        .into_iter()
        .take(GATE_WORDS)
        .enumerate()
        .fold(0, |m, (w, x)| m | CellMask::from(x) << (64 * w))
}
/// `cell_of` entry of a domain without a cell.
const NO_CELL: u8 = u8::MAX;
// Every cell number fits in `cell_of`'s byte, below NO_CELL.
const _: () = assert!(MAX_DRIVER_DOMAINS <= NO_CELL as usize);
/// `owners` entry of a free cell.
const FREE_CELL: u32 = u32::MAX;

/// One cache line per element, so CPUs working on different driver cells do
/// not bounce each other's lines (false sharing).
#[repr(align(64))]
pub(crate) struct CacheLine<T>(T);

impl<T> core::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Where `domid`'s gate sits: two gates share a cache line, and a map
/// changes its target's `active` count, so neighbouring domids (guests
/// created one after another, served by different CPUs) are spread to
/// different quarters of the table rather than packed into one line.
/// A reserved domid (`DOMID_SELF`, `DOMID_IO`, ...) has no gate: its index
/// is past the table.
fn gate_index(domid: DomId) -> usize {
    const QUARTER: usize = DomId::FIRST_RESERVED as usize / 4;
    // (`is_multiple_of` is newer than Debian's rustc-web, which builds the
    // Xen object.)
    #[allow(clippy::manual_is_multiple_of)]
    const _: () = assert!(DomId::FIRST_RESERVED as usize % 4 == 0);
    let d = domid.0 as usize;
    if d >= DomId::FIRST_RESERVED as usize {
        return usize::MAX;
    }
    (d % 4) * QUARTER + d / 4
}

/// What a driver domain's cells share, kept in its home cell's slot.
#[derive(Debug, Default)]
pub(crate) struct DriverShared {
    /// BFNs in use across its cells, roughly: each cell adds its change
    /// once it has moved [`PUBLISH_SLACK`] since it last did
    /// (`DriverDomain::published_used`), so that cells busy in different
    /// contexts do not all write this line at every unlock. Together the
    /// changes not added yet stay below [`UNPUBLISHED_BOUND`]. A map far
    /// enough below its quota by this count needs nothing else; near it,
    /// it counts every cell (see [`Engine::over_quota`]).
    used: AtomicU64,
}

/// What a cell says of itself at each unlock, for its driver domain's
/// other cells.
#[derive(Debug, Default)]
pub(crate) struct CellState {
    /// Its BFNs in use (read by the other cells only near the quota).
    used: AtomicU64,
    /// It has work to retry: revocations the IOMMU refused, or a failed
    /// flush. A batch's end flushes such a cell even if the batch did not
    /// name its context, as before there were cells per context.
    retry: AtomicBool,
    /// Its owner's flush has work waiting (entries to write or clear,
    /// pages to release, invalidations gathered), as a batch that was
    /// preempted leaves it: the flush that ends the call, in a later entry,
    /// does it whichever contexts that entry names (and so does any later
    /// batch of the owner's, should the call never come back).
    unfinished: AtomicBool,
}

/// A [`DomidLife`]'s quota when none is set (the boot default applies).
const NO_QUOTA: u32 = u32::MAX;
// Every quota the toolstack may set fits below it.
const _: () = assert!(crate::config::MAX_QUOTA < NO_QUOTA as u64);

/// Per domid: which life of the domid this is (high 32 bits), and the BFN
/// quota the toolstack set for the domain of that life (`SET_LIMITS`), or
/// [`NO_QUOTA`] (low 32 bits). One word, so that a quota is stored only
/// into the life its checks saw (a compare-exchange on both), and a map
/// reads its quota with one load.
///
/// The life is moved as a domain's teardown ends (after the domain's
/// state here is gone, before Xen can destroy the domain and give its id
/// to another), and by nothing else. An op on another domain's state
/// (`SET_LIMITS`, `STATS`, `ENTRY`) reads it before its checks and again
/// where it acts: the same life there means the state it acts on is the
/// checked domain's, not a later domain's at the same domid, which can
/// only exist once the checked one's teardown has ended
/// ([`Engine::life_of`]). The ops take only a domain alive at their checks
/// (a dying one may be past its teardown already, and then nothing moves
/// the life when it goes), and one that only starts dying meanwhile is
/// still the one checked: its counters are still read and reset. (Not the
/// gate's `seq`: that also moves at every hook of a mapped domain.)
///
/// (The life was the gate's own word, the quota this one's, until a
/// `SET_LIMITS` whose store came just after its last read of the life
/// could overwrite the quota of a domain created meanwhile.)
#[derive(Debug)]
pub(crate) struct DomidLife(AtomicU64);

impl DomidLife {
    /// The first life, with no quota set.
    const fn new() -> Self {
        DomidLife(AtomicU64::new(NO_QUOTA as u64))
    }

    /// Both halves, read together (`SeqCst`).
    fn word(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn life_in(word: u64) -> u32 {
        (word >> 32) as u32
    }

    /// The life (`SeqCst`).
    fn life(&self) -> u32 {
        Self::life_in(self.word())
    }

    /// The quota set for this life, or [`NO_QUOTA`] (`SeqCst`).
    fn quota(&self) -> u32 {
        self.word() as u32
    }

    /// Replace `seen` (a [`word`](Self::word) read) by `quota` in the same
    /// life: `false`, nothing stored, if the word changed since (the life
    /// ended, or another call set a quota).
    fn replace_quota(&self, seen: u64, quota: u32) -> bool {
        let new = (seen & !u64::from(u32::MAX)) | u64::from(quota);
        self.0
            .compare_exchange(seen, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// End the life: the next one starts with no quota. No loop: the life
    /// moves first, so no store of the ending life's can land after it, and
    /// none of the next life's is made before the domain is destroyed (its
    /// checks find it dying), which waits for this call's teardown to
    /// return. (The life wraps after 2^32 lives of one domid.)
    fn end(&self) {
        self.0.fetch_add(1 << 32, Ordering::SeqCst);
        self.0.fetch_or(u64::from(NO_QUOTA), Ordering::SeqCst);
    }
}

/// How far a cell's BFNs in use move before it adds the change to its
/// driver domain's count ([`DriverShared::used`]).
const PUBLISH_SLACK: u64 = 32;
/// More than a driver domain's cells can hold together beyond its count:
/// each cell's change is added at an unlock once it reaches the slack, and
/// one lock hold adds at most one run of maps or one 2 MiB extent.
const UNPUBLISHED_BOUND: u64 = MAX_CONTEXTS as u64 * (PUBLISH_SLACK + MOST_IN_ONE_HOLD);
/// The most BFNs one lock hold of a cell takes: a run of maps, or an
/// extent.
const MOST_IN_ONE_HOLD: u64 = if (MAP_CHUNK as u64) > pviommu_abi::EXTENT_PAGES {
    MAP_CHUNK as u64
} else {
    pviommu_abi::EXTENT_PAGES
};

/// Per-target-domid atomics read without any lock (see the module docs).
#[derive(Debug, Default)]
#[repr(align(32))]
pub struct TargetGate {
    /// Mappings of this domain's pages that hold a page reference (live,
    /// or unmapped but not yet flushed), plus maps of them in flight.
    active: AtomicU32,
    /// Bumped whenever the domain's p2m loses a page the engine may have
    /// looked up, and when the domain starts dying. 32 bits: a map reads it
    /// twice around its page lookup, with no lock but the target's p2m's
    /// and none at all between, so a wrap would need 2^32 hooks inside one
    /// map's window, each a p2m change of the target: not reachable (a
    /// review's note; the gate stays 32 bytes, 4 to a cache line).
    seq: AtomicU32,
    /// Bit n (of word n / 64): driver cell n maps pages of this domain (or
    /// is mapping one right now). Changed only under cell n's lock. Each
    /// word is read and changed on its own: the protocol with the map path
    /// (a map marks its bit, then reads `seq`; a hook bumps `seq`, then
    /// reads the marks) only ever needs the one bit, in one word.
    drivers: [AtomicU64; GATE_WORDS],
    /// `active` as the domain's teardown last saw it at the end of a walk
    /// over its cells (or at its start): a walk after which it is no lower
    /// released nothing, by the walk or anyone else meanwhile. Written by
    /// the teardown only (one slice at a time; in the gate's padding).
    teardown_active: AtomicU32,
}

const _: () = assert!(
    core::mem::size_of::<TargetGate>() == 32,
    "two gates a cache line"
);
// `active` never wraps: each cell holds at most its driver domain's quota
// of a target's pages, plus one extent (or run) in flight and an extent's
// take-back. A wrap would send the target's hooks down the "nobody maps
// it" path.
const _: () = assert!(
    (MAX_DRIVER_DOMAINS as u64) * (crate::config::MAX_QUOTA + 2 * pviommu_abi::EXTENT_PAGES)
        < u32::MAX as u64
);

// Xen keeps its own count of the same references, per target
// (`d->pviommu_pages`, which its p2m hook reads before calling the
// engine): an `atomic_t`, a signed int, so the bound is `i32::MAX` there.
// A quota is a driver domain's across its cells, and there are at most
// dom0 and one driver domain per cell of the shared pool (review: with
// the bound above alone, 128 quotas would pass `i32::MAX`).
const _: () = assert!(
    ((MAX_DRIVER_DOMAINS - DOM0_CELLS + 1) as u64) * crate::config::MAX_QUOTA
        + (MAX_DRIVER_DOMAINS as u64) * 2 * pviommu_abi::EXTENT_PAGES
        <= i32::MAX as u64
);

impl TargetGate {
    /// The cells named (each word read on its own, `SeqCst`).
    pub(crate) fn drivers(&self) -> CellMask {
        cell_mask_of_words(self.drivers.iter().map(|a| a.load(Ordering::SeqCst)))
    }

    /// Cell `cell`'s word, and its bit in it.
    fn driver_bit(&self, cell: usize) -> Option<(&AtomicU64, u64)> {
        self.drivers
            .get(cell / 64)
            .map(|w| (w, 1u64 << (cell % 64)))
    }
}

/// The engine: fixed tables read without locks, and one locked
/// [`DriverDomain`] per driver domain. `L` is the platform's lock (a
/// spinlock inside Xen, a checked `parking_lot` mutex hosted).
pub struct Engine<L: RawMutex> {
    /// Fixed at boot: read without a lock.
    config: Config,
    window: BfnWindow,
    space: BfnSpace,
    seed: u64,
    /// One per domid that can be a target.
    gates: Vec<TargetGate>,
    /// Domid -> the notices queued for it as a driver domain since its
    /// creation: each notice's number (from 1) and the order
    /// `revoked_next` reports them in.
    notice_counts: Vec<AtomicU64>,
    /// Domid -> its devices' faults at revoked BFNs Xen may still leave
    /// uncounted (a packed `contexts::FaultBucket`; full again when its
    /// teardown ends).
    fault_buckets: Vec<AtomicU64>,
    /// Domid -> its life and the BFN quota the toolstack set for it
    /// (`SET_LIMITS`). Set without any lock; the life moved and the quota
    /// reset when its teardown ends.
    lives: Vec<DomidLife>,
    /// Domid -> the cell holding its driver state, or [`NO_CELL`].
    cell_of: Vec<AtomicU8>,
    /// Cell -> the domid it belongs to, or [`FREE_CELL`].
    owners: Vec<CacheLine<AtomicU32>>,
    /// Home cell -> the cell of each of its driver domain's contexts (entry
    /// 0 unused), or [`NO_CELL`].
    ctx_cells: Vec<[AtomicU8; MAX_CONTEXTS as usize]>,
    /// Home cell -> what its driver domain's cells share.
    shared: Vec<CacheLine<DriverShared>>,
    /// Cell -> what others may ask of it without its lock, as of its last
    /// unlock (written by the cell's holder).
    cell_state: Vec<CacheLine<CellState>>,
    /// The driver domains' states, each behind its own lock.
    cells: Vec<CacheLine<Mutex<L, DriverDomain>>>,
    /// Whether services are timed for the stats (`PVIOMMU_STATS_TIMING_*`).
    timing: AtomicBool,
    /// Engine bugs found since the host last reported them, by
    /// [`EngineBug`] ([`Engine::take_unreported`]): added at each unlock
    /// from the cell's own counts.
    unreported: [AtomicU64; EngineBug::KINDS],
}

/// An engine bug the engine survives (the mapping concerned taken down, or
/// the map refused) and the host reports (Xen: a console line). Tests
/// require none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineBug {
    /// A live mapping the page index did not hold (taken down all the same;
    /// its cell's counts are no longer trusted).
    IndexMiss = 0,
    /// A map refused because its cell's free list did not hold together.
    FreeListBreak = 1,
    /// A driver domain's teardown about to reset a cell that still held a
    /// page reference (a mapping its walk missed, an entry waiting for a
    /// flush): the cell kept and the walk made again, the domain dying
    /// meanwhile, rather than the reference forgotten (a page never freed,
    /// a target that never dies).
    HeldAtReset = 2,
    /// A mapping taken out of the books whose move onto the unmapping or
    /// stuck list found no slot to write: its page reference is lost (the
    /// page is never freed, never put twice).
    ReferenceLost = 3,
}

impl EngineBug {
    /// How many kinds there are.
    pub const KINDS: usize = 4;
    /// Each kind, in the order of its number.
    pub const ALL: [EngineBug; Self::KINDS] = [
        EngineBug::IndexMiss,
        EngineBug::FreeListBreak,
        EngineBug::HeldAtReset,
        EngineBug::ReferenceLost,
    ];
}

// Each kind's number is its place in `ALL` (and below `KINDS`), and every
// kind is in `ALL` (the match below is exhaustive): the counters are
// indexed by it, and a kind out of place would be dropped.
const _: () = {
    let mut i = 0;
    while i < EngineBug::KINDS {
        assert!(EngineBug::ALL[i] as usize == i);
        i += 1;
    }
    const fn place(bug: EngineBug) -> usize {
        match bug {
            EngineBug::IndexMiss
            | EngineBug::FreeListBreak
            | EngineBug::HeldAtReset
            | EngineBug::ReferenceLost => bug as usize,
        }
    }
    assert!(place(EngineBug::ReferenceLost) + 1 == EngineBug::KINDS);
};

/// What `PVIOMMU_CMD_stats` reports about a driver domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsReport {
    /// Live mappings.
    pub live: u64,
    /// Notices not yet acknowledged.
    pub revoked: u64,
    /// BFNs counted against the quota.
    pub used: u64,
    /// The quota.
    pub quota: u64,
    /// Foreign pages mapped, in each context (a page mapped in two
    /// contexts, or in one both as a page of a 2 MiB extent and with other
    /// access, counts for each).
    pub mapped_pages: u64,
    /// Counters and times.
    pub counters: DriverStats,
    /// Engine heap in use, host-wide.
    pub heap_bytes: u64,
}

impl<L: RawMutex> core::fmt::Debug for Engine<L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Engine")
    }
}

/// A live mapping as seen from outside: its BFN and what it maps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MappingView {
    /// The BFN.
    pub bfn: Bfn,
    /// The mapping.
    pub mapping: Mapping,
}

/// Every driver domain's state, locked, to look at (tests, stats, the
/// simulator's tools): see [`Engine::state`].
pub struct StateView<'a, L: RawMutex> {
    space: &'a BfnSpace,
    /// The engine's hash seed, for lookups as the engine makes them.
    #[cfg(feature = "sim")]
    seed: u64,
    /// Every cell, with whether a driver domain owns it.
    guards: [Option<(bool, MutexGuard<'a, L, DriverDomain>)>; MAX_DRIVER_DOMAINS],
}

impl<L: RawMutex> StateView<'_, L> {
    /// The usable BFNs, numbered.
    pub fn space(&self) -> &BfnSpace {
        self.space
    }
    /// A driver domain's home cell (its context 0, and the list of its
    /// contexts), if it has one.
    pub fn driver(&self, domid: DomId) -> Option<&DriverDomain> {
        self.context(domid, ContextId::DEFAULT)
    }
    /// The cell of a driver domain's mappings into `context`, if any.
    pub fn context(&self, domid: DomId, context: ContextId) -> Option<&DriverDomain> {
        self.drivers()
            .find(|d| d.domid == domid && d.context == context)
    }
    /// Every owned cell: each driver domain's home cell and its contexts'.
    pub fn drivers(&self) -> impl Iterator<Item = &DriverDomain> {
        self.guards
            .iter()
            .flatten()
            .filter(|(owned, _)| *owned)
            .map(|(_, g)| &**g)
    }
    /// The cells of driver domain `domid`, in context order.
    pub fn cells_of(&self, domid: DomId) -> impl Iterator<Item = &DriverDomain> {
        (0..MAX_CONTEXTS).filter_map(move |c| self.context(domid, ContextId(c)))
    }
    /// Live mappings of `owner` with their BFNs: by context, then in
    /// BFN-index order (each context numbers its BFNs on its own).
    pub fn live_mappings(&self, owner: DomId) -> impl Iterator<Item = MappingView> + '_ {
        self.cells_of(owner).flat_map(move |d| {
            d.slots().filter_map(move |(i, s)| match s {
                Slot::Live(m) => Some(MappingView {
                    bfn: self.space.bfn_of(i)?,
                    mapping: m,
                }),
                _ => None,
            })
        })
    }
    /// Live mappings that a lookup of their page (by their dedup key, as a
    /// map or a gfn hook looks) does not find, in every cell, and extent
    /// records whose count of pages is not what their slots hold: 0 and 0
    /// unless the indices lost something. For tests and checkers.
    #[cfg(feature = "sim")]
    pub fn index_faults(&self) -> (u64, u64) {
        self.drivers().fold((0, 0), |(a, b), d| {
            (
                a + d.live_mappings_not_found(self.seed),
                b + d.extent_records_miscounted(),
            )
        })
    }
    /// Distinct (driver domain, target domid, gfn) pages mapped.
    pub fn mapped_pages(&self) -> usize {
        self.drivers().map(|d| d.mapped_pages()).sum()
    }
    /// Heap bytes held by the driver cells' tables, owned or kept empty in
    /// a free cell (the fixed boot-time tables are [`Engine::boot_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        self.guards
            .iter()
            .flatten()
            .map(|(_, g)| g.heap_bytes())
            .sum()
    }
}

/// Most maps [`Engine::map_batch`] (and unmaps [`Engine::unmap_batch`])
/// take under one lock. Their per-op state lives on the hypervisor's stack
/// (the batch hypercall's run buffers: ops, requests, results), so the
/// run stays short: 16 was at most a few percent faster than 8 and took
/// the deepest hypercall path from about 2.7 to 4.5 KiB of Xen's 8 KiB
/// stack.
pub const MAP_CHUNK: usize = 8;
// The map paths keep a bit per op of a run in a `u32` (`Answered::again`,
// `map_alike`'s give-back mask).
const _: () = assert!(MAP_CHUNK < 32);

/// A map's result: the BFN, and a tag naming this install of it, for
/// [`Engine::unmap_undo`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapped {
    /// The BFN the caller is told.
    pub bfn: Bfn,
    /// The mapping's install generation in its cell.
    pub tag: u32,
    /// The driver cell it was made in (a driver domain that went idle may
    /// come back in another cell, whose generations are its own). A byte:
    /// every cell number fits (checked below), and the results of a map
    /// run sit on Xen's stack, 8 of them, where each byte counts.
    pub cell: u8,
}

// Every cell's number fits `Mapped::cell`.
const _: () = assert!(MAX_DRIVER_DOMAINS <= 1 << u8::BITS);

impl Mapped {
    /// The result of a map made in `cell` (a cell number: below
    /// `MAX_DRIVER_DOMAINS`, so it fits a byte).
    pub(crate) fn new(bfn: Bfn, tag: u32, cell: usize) -> Self {
        debug_assert!(cell < MAX_DRIVER_DOMAINS, "cell {cell} is no cell");
        Mapped {
            bfn,
            tag,
            cell: cell as u8,
        }
    }

    /// Whether it was made in `cell`.
    pub(crate) fn made_in(&self, cell: usize) -> bool {
        usize::from(self.cell) == cell
    }
}

/// A driver domain's locked state and the cell it lives in.
pub(crate) struct Driver<'a, L: RawMutex> {
    cell: usize,
    dd: MutexGuard<'a, L, DriverDomain>,
}

impl<L: RawMutex> Engine<L> {
    /// An engine for the host `h` describes, its driver locks made by
    /// `L::INIT`.
    pub fn new(config: Config, h: &impl Hypervisor) -> Result<Self, Errno> {
        Self::with_locks(config, h, |_| L::INIT)
    }

    /// An engine whose driver cell `n` is guarded by `lock_for(n)` (inside
    /// Xen: the n-th of the glue's spinlocks).
    pub fn with_locks(
        mut config: Config,
        h: &impl Hypervisor,
        lock_for: impl Fn(usize) -> L,
    ) -> Result<Self, Errno> {
        // The storage relies on it (32-bit slot links, shard sizes): not
        // only on the boot option's parser.
        config.quota = config.quota.min(crate::config::MAX_QUOTA);
        let mut reserved = Vec::new();
        let msi = ReservedRange {
            start: X86_MSI_WINDOW.0,
            nr: X86_MSI_WINDOW.1,
            kind: region_kind::MSI,
        };
        try_push(&mut reserved, msi)?;
        // Bounded: a platform reports a handful of ranges.
        for i in 0..256 {
            match h.reserved_range(i) {
                Some(r) if r != msi => try_push(&mut reserved, r)?,
                Some(_) => {}
                None => break,
            }
        }
        let window = BfnWindow::new(h.ram_end().0, h.iommu_caps().address_bits, reserved)?;
        let space = BfnSpace::new(&window)?;
        let domids = DomId::FIRST_RESERVED as usize;
        let gates = try_from_fn(domids, |_| TargetGate::default())?;
        let notice_counts = try_from_fn(domids, |_| AtomicU64::new(0))?;
        let full = contexts::FaultBucket::FULL.bits();
        let fault_buckets = try_from_fn(domids, |_| AtomicU64::new(full))?;
        let lives = try_from_fn(domids, |_| DomidLife::new())?;
        let cell_of = try_from_fn(domids, |_| AtomicU8::new(NO_CELL))?;
        let owners = try_from_fn(MAX_DRIVER_DOMAINS, |_| CacheLine(AtomicU32::new(FREE_CELL)))?;
        let ctx_cells = try_from_fn(MAX_DRIVER_DOMAINS, |_| {
            core::array::from_fn(|_| AtomicU8::new(NO_CELL))
        })?;
        let shared = try_from_fn(MAX_DRIVER_DOMAINS, |_| CacheLine(DriverShared::default()))?;
        let cell_state = try_from_fn(MAX_DRIVER_DOMAINS, |_| CacheLine(CellState::default()))?;
        let mut cells = Vec::new();
        cells
            .try_reserve_exact(MAX_DRIVER_DOMAINS)
            .map_err(|_| Errno::NoMem)?;
        for n in 0..MAX_DRIVER_DOMAINS {
            Self::push_cell(&mut cells, lock_for(n))?;
        }
        Ok(Engine {
            config,
            window,
            space,
            seed: h.random_seed(),
            gates,
            notice_counts,
            fault_buckets,
            lives,
            cell_of,
            owners,
            ctx_cells,
            shared,
            cell_state,
            cells,
            timing: AtomicBool::new(false),
            unreported: [const { AtomicU64::new(0) }; EngineBug::KINDS],
        })
    }

    /// Add an idle cell behind `lock` to `cells`, within the capacity the
    /// caller reserved (`NoMem`, nothing changed, without it). Out of line,
    /// and built straight into its place: a cell's state is about 1.2 KiB,
    /// and each copy on the way into the table (a value passed to
    /// [`try_push`] made two) sat in this frame, the engine's deepest
    /// from an entry point (4016 of 4096 bytes at boot).
    #[inline(never)]
    fn push_cell(cells: &mut Vec<CacheLine<Mutex<L, DriverDomain>>>, lock: L) -> Result<(), Errno> {
        let len = cells.len();
        let slot = cells.spare_capacity_mut().first_mut().ok_or(Errno::NoMem)?;
        slot.write(CacheLine(Mutex::from_raw(
            lock,
            DriverDomain::new(DomId(0)),
        )));
        // SAFETY: the element at `len` was just initialised, within capacity.
        unsafe { cells.set_len(len + 1) };
        Ok(())
    }

    /// The clock for the stats' times: 0 (and no clock read) unless timing
    /// is on.
    pub(crate) fn clock(&self, h: &impl Hypervisor) -> u64 {
        if self.timing.load(Ordering::Relaxed) {
            h.now_ns()
        } else {
            0
        }
    }

    /// Nanoseconds since `t0` (from [`clock`](Self::clock)); 0 if timing
    /// was off at `t0` (switched on meanwhile, it would count the uptime).
    pub(crate) fn since(&self, h: &impl Hypervisor, t0: u64) -> u64 {
        if t0 == 0 {
            return 0;
        }
        self.clock(h).saturating_sub(t0)
    }

    /// Whether the timing of services is on.
    pub fn timing(&self) -> bool {
        self.timing.load(Ordering::Relaxed)
    }

    /// Turn the timing of services on or off (host-wide).
    pub fn set_timing(&self, on: bool) {
        self.timing.store(on, Ordering::Relaxed);
    }

    /// `domid`'s counters and usage, and the host's engine heap.
    pub fn stats(&self, domid: DomId) -> StatsReport {
        StatsReport {
            heap_bytes: self.heap_bytes_host(),
            ..self.stats_of_domain(domid)
        }
    }

    /// [`stats`](Self::stats) without the host-wide part: `heap_bytes`
    /// (which takes every cell's lock in turn, [`heap_bytes_host`]) reads 0.
    ///
    /// [`heap_bytes_host`]: Self::heap_bytes_host
    pub fn stats_of_domain(&self, domid: DomId) -> StatsReport {
        self.stats_of_cells(domid, None, false)
    }

    /// [`stats_of_domain`](Self::stats_of_domain) over the cells of
    /// `domid`'s life `life` only, each read under its lock and, with
    /// `take`, its counters zeroed in the same hold: a reset takes exactly
    /// what it reports, once, however many resets run at once and whatever
    /// cells come and go meanwhile (a review of 2026-12-07: the reset took
    /// the values read off the cells found afterwards, so two resets took
    /// the same counts twice, and a cell claimed in between lost counts
    /// nobody was told).
    pub(crate) fn stats_of_life(&self, domid: DomId, life: u32, take: bool) -> StatsReport {
        self.stats_of_cells(domid, Some(life), take)
    }

    fn stats_of_cells(&self, domid: DomId, life: Option<u32>, take: bool) -> StatsReport {
        let mut r = StatsReport {
            quota: self.quota_of_domain(domid),
            ..StatsReport::default()
        };
        for context in self.contexts_of(domid) {
            let cell = match life {
                None => self.lock_cell(domid, context),
                Some(life) => self.lock_cell_of_life(domid, context, life),
            };
            let Some(mut d) = cell else {
                continue;
            };
            r.live += d.dd.live();
            r.revoked += d.dd.revoked();
            r.used += d.dd.used();
            r.mapped_pages += d.dd.mapped_pages() as u64;
            for (sum, have) in r
                .counters
                .counters_mut()
                .into_iter()
                .zip(d.dd.stats.counters_mut())
            {
                *sum = sum.saturating_add(*have);
                if take {
                    *have = 0;
                }
            }
            self.put_driver(d);
        }
        r
    }

    /// The engine's heap in use, host-wide (takes every cell's lock in
    /// turn).
    pub(crate) fn heap_bytes_host(&self) -> u64 {
        let mut heap = self.boot_bytes() as u64;
        for cell in self.cells.iter() {
            heap += cell.lock().heap_bytes() as u64;
        }
        heap
    }

    /// Give back `taken`, counts a reset took
    /// ([`stats_of_life`](Self::stats_of_life)) and could not deliver (the
    /// copy-out failed): added to the first cell of `domid`'s life `life`
    /// (counters are summed over the cells). Lost only if the domain has
    /// no cell left, as a cell's counts are when it goes idle.
    pub(crate) fn stats_give_back_of_life(&self, domid: DomId, taken: &DriverStats, life: u32) {
        let mut taken = *taken;
        for context in self.contexts_of(domid) {
            let Some(mut d) = self.lock_cell_of_life(domid, context, life) else {
                continue;
            };
            for (have, back) in
                d.dd.stats
                    .counters_mut()
                    .into_iter()
                    .zip(taken.counters_mut())
            {
                *have = have.saturating_add(*back);
            }
            self.put_driver(d);
            return;
        }
    }

    /// Count a batch hypercall of `caller` that took `ns`, in the cell of
    /// its `context` (or, if it has none there, its home cell; counters
    /// are summed over the cells).
    pub(crate) fn note_batch(&self, caller: DomId, context: ContextId, ns: u64) {
        let cell = self
            .lock_cell(caller, context)
            .or_else(|| self.lock_driver(caller));
        if let Some(mut d) = cell {
            d.dd.stats.batches += 1;
            d.dd.stats.ns_batches += ns;
            self.put_driver(d);
        }
    }

    /// How many contexts (0 included) `caller` may have on a backend that
    /// offers `backend_max`: dom0 all of them, another driver domain at
    /// most [`OTHER_MAX_CONTEXTS`].
    pub fn max_contexts_for(&self, backend_max: u32, caller: DomId) -> u32 {
        let max = backend_max.clamp(1, MAX_CONTEXTS);
        if caller == DomId::DOM0 {
            max
        } else {
            max.min(OTHER_MAX_CONTEXTS)
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The BFN window and its reserved ranges.
    pub fn window(&self) -> &BfnWindow {
        &self.window
    }

    /// The usable BFNs, numbered.
    pub fn space(&self) -> &BfnSpace {
        &self.space
    }

    /// Bytes of the tables allocated once at boot (gates and cells).
    pub fn boot_bytes(&self) -> usize {
        self.gates.capacity() * core::mem::size_of::<TargetGate>()
            + self.notice_counts.capacity() * core::mem::size_of::<AtomicU64>()
            + self.fault_buckets.capacity() * core::mem::size_of::<AtomicU64>()
            + self.lives.capacity() * core::mem::size_of::<DomidLife>()
            + self.cell_of.capacity()
            + self.owners.capacity() * core::mem::size_of::<CacheLine<AtomicU32>>()
            + self.ctx_cells.capacity() * MAX_CONTEXTS as usize
            + self.shared.capacity() * core::mem::size_of::<CacheLine<DriverShared>>()
            + self.cell_state.capacity() * core::mem::size_of::<CacheLine<CellState>>()
            + self.cells.capacity() * core::mem::size_of::<CacheLine<Mutex<L, DriverDomain>>>()
    }

    /// Lock every driver domain's state, in cell order, to look at it
    /// (tests, stats, the simulator's tools). Never call an engine
    /// operation while holding the view. Uses `try_lock` so a checked lock
    /// can tell this (ordered, inspection-only) nesting from a real
    /// inversion; it spins while an operation holds a cell.
    pub fn state(&self) -> StateView<'_, L> {
        StateView {
            space: &self.space,
            #[cfg(feature = "sim")]
            seed: self.seed,
            guards: core::array::from_fn(|i| {
                let cell = self.cells.get(i)?;
                let g = loop {
                    if let Some(g) = cell.try_lock() {
                        break g;
                    }
                    core::hint::spin_loop();
                };
                let owned = self
                    .owners
                    .get(i)
                    .is_some_and(|o| o.load(Ordering::SeqCst) != FREE_CELL);
                Some((owned, g))
            }),
        }
    }

    /// One driver domain's state, locked, to look at (stats, tests). Never
    /// call an engine operation while holding it.
    pub fn driver_state(&self, domid: DomId) -> Option<MutexGuard<'_, L, DriverDomain>> {
        self.lock_driver(domid).map(|d| d.dd)
    }

    /// The cell of `domid`'s mappings into `context`, locked, to look at
    /// (stats, tests). Never call an engine operation while holding it.
    pub fn context_state(
        &self,
        domid: DomId,
        context: ContextId,
    ) -> Option<MutexGuard<'_, L, DriverDomain>> {
        self.lock_cell(domid, context).map(|d| d.dd)
    }

    /// The driver cells whose hooks `domid`'s p2m changes reach (bit n:
    /// cell n maps its pages or is mapping one now).
    pub fn target_drivers(&self, domid: DomId) -> CellMask {
        self.gate(domid).map_or(0, TargetGate::drivers)
    }

    /// The cell holding `domid`'s mappings into `context` (its bit in a
    /// target's [`target_drivers`](Self::target_drivers)), if it has one
    /// (read without a lock: for inspection).
    pub fn cell_of(&self, domid: DomId, context: ContextId) -> Option<usize> {
        self.cell_number(domid, context)
    }

    /// `domid`'s gate (the only way to one: the table is permuted).
    pub(crate) fn gate(&self, domid: DomId) -> Option<&TargetGate> {
        // (The domid is a guest's: clamped under speculation.)
        get_nospec(&self.gates, gate_index(domid))
    }

    /// `domid`'s sequence number as a map reads it before its target's
    /// checks (0 for a domid with no gate, which its checks refuse). A
    /// target's teardown moves it after the domain is marked dying, which
    /// the checks refuse: so a lookup that still finds this number looked
    /// up a page of the domain the checks passed, not of one created later
    /// at its domid. SeqCst: the checks' reads (the domain's `is_dying`)
    /// come after it.
    fn checked_seq(&self, domid: DomId) -> u32 {
        self.gate(domid).map_or(0, |g| g.seq.load(Ordering::SeqCst))
    }

    /// `domid`'s life number ([`DomidLife`]; 0 for a domid past the
    /// table). SeqCst: read before the checks of an op on the domain's
    /// state, and again under the lock of each cell it acts on (a later
    /// domain's cell is claimed after the earlier domain's teardown moved
    /// the number, and the lock orders the two).
    pub(crate) fn life_of(&self, domid: DomId) -> u32 {
        // (The domid is a guest's: clamped under speculation.)
        get_nospec(&self.lives, domid.0 as usize).map_or(0, DomidLife::life)
    }

    /// `read`, something read of `domid`'s state, if `domid`'s life number
    /// is still `life` (the number read before the read's checks); else
    /// `Err(Again)`: it may be a later domain's at the domid.
    pub(crate) fn read_of_life<T>(&self, domid: DomId, life: u32, read: T) -> Result<T, Errno> {
        if self.life_of(domid) != life {
            return Err(Errno::Again);
        }
        Ok(read)
    }

    /// [`lock_cell`](Self::lock_cell) for an op on `domid`'s state checked
    /// while its life number was `life`: `None` as well if the number has
    /// moved (the cell may be a later domain's at the domid).
    pub(crate) fn lock_cell_of_life(
        &self,
        domid: DomId,
        context: ContextId,
        life: u32,
    ) -> Option<Driver<'_, L>> {
        let d = self.lock_cell(domid, context)?;
        if self.life_of(domid) != life {
            self.put_driver(d);
            return None;
        }
        Some(d)
    }

    /// Mappings holding a page of `domid` (live, or unmapped and not yet
    /// flushed) and maps of its pages in flight.
    pub fn target_active(&self, domid: DomId) -> u32 {
        self.gate(domid)
            .map_or(0, |g| g.active.load(Ordering::SeqCst))
    }

    pub(crate) fn gate_leave(&self, domid: DomId) {
        if let Some(g) = self.gate(domid) {
            g.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Lock `domid`'s home cell (its context 0, and the list of its
    /// contexts), if it has one. The cell is checked again under its lock:
    /// it may have been released (and even taken by another domain) between
    /// the lookup and the lock. A cell's owner and context only change
    /// under its lock, so the check is exact.
    pub(crate) fn lock_driver(&self, domid: DomId) -> Option<Driver<'_, L>> {
        self.lock_cell(domid, ContextId::DEFAULT)
    }

    /// Lock the cell holding `domid`'s mappings into `context`, if it has
    /// one (checked again under the lock, as [`lock_driver`](Self::lock_driver)).
    // (Not inlined: its callers' frames stay as they were when it was
    // the body itself; the map run inlines that body instead.)
    #[inline(never)]
    pub(crate) fn lock_cell(&self, domid: DomId, context: ContextId) -> Option<Driver<'_, L>> {
        self.lock_cell_inlined(domid, context)
    }

    /// [`lock_cell`](Self::lock_cell), inlined into the caller.
    #[inline(always)]
    fn lock_cell_inlined(&self, domid: DomId, context: ContextId) -> Option<Driver<'_, L>> {
        for _ in 0..MAP_RETRIES {
            let d = self.lock_cell_number(self.cell_number(domid, context)?)?;
            if self.owner_is(d.cell, domid) && d.dd.domid == domid && d.dd.context == context {
                return Some(d);
            }
        }
        None
    }

    /// Lock cell number `cell` whoever holds it (the walks over the cells a
    /// target's gate names); `None` past the last cell.
    pub(crate) fn lock_cell_number(&self, cell: usize) -> Option<Driver<'_, L>> {
        let dd = self.cells.get(cell)?.lock();
        Some(Driver { cell, dd })
    }

    /// Which cell holds `domid`'s mappings into `context` (no lock: a hint
    /// to check under the cell's lock).
    fn cell_number(&self, domid: DomId, context: ContextId) -> Option<usize> {
        let home = get_nospec(&self.cell_of, domid.0 as usize)?.load(Ordering::SeqCst);
        if home == NO_CELL {
            return None;
        }
        let cell = match context {
            ContextId::DEFAULT => home,
            // (The context id is a guest's: clamped under speculation.)
            c => {
                get_nospec(self.ctx_cells.get(home as usize)?, c.0 as usize)?.load(Ordering::SeqCst)
            }
        };
        (cell != NO_CELL).then_some(cell as usize)
    }

    /// The contexts `domid` has cells for, context 0 first (no lock: each
    /// is checked under its cell's lock by [`lock_cell`](Self::lock_cell)).
    fn contexts_of(&self, domid: DomId) -> impl Iterator<Item = ContextId> + '_ {
        (0..MAX_CONTEXTS)
            .map(ContextId)
            .filter(move |&c| self.cell_number(domid, c).is_some())
    }

    /// Lock the cell `req.context` of `caller` maps into: its home cell,
    /// claimed if need be, for context 0; that context's cell otherwise
    /// (`ENOENT` if it has none: the context does not exist).
    fn lock_for_map(&self, caller: DomId, context: ContextId) -> Result<Driver<'_, L>, Errno> {
        if context == ContextId::DEFAULT {
            self.lock_or_claim(caller)
        } else {
            self.lock_cell(caller, context).ok_or(Errno::NoEnt)
        }
    }

    /// [`lock_for_map`](Self::lock_for_map) for the straight path's run,
    /// the cell looked up and locked inline: two calls less a run (about
    /// 50 instructions into context 0, 25 into another). A cell the caller
    /// has is locked here (for context 0 its home cell, which
    /// [`lock_or_claim`](Self::lock_or_claim) locks first); only a caller
    /// with no home cell yet goes on to `lock_or_claim`, to claim one
    /// (which looks for the cell first, as when another vCPU claimed it
    /// meanwhile).
    #[inline(always)]
    fn lock_for_map_inlined(
        &self,
        caller: DomId,
        context: ContextId,
    ) -> Result<Driver<'_, L>, Errno> {
        match self.lock_cell_inlined(caller, context) {
            Some(d) => Ok(d),
            None if context == ContextId::DEFAULT => self.lock_or_claim(caller),
            None => Err(Errno::NoEnt),
        }
    }

    /// Whether the driver domain of the locked cell `d` holds its quota of
    /// BFNs (or more), across its cells. With no context but 0 its home
    /// cell is all there is. Otherwise its rough count ([`DriverShared::used`],
    /// with `d`'s part current) answers when it is below the quota by more
    /// than the other cells can hide. Near the quota the count is exact:
    /// see [`over_quota_by`](Self::over_quota_by).
    #[inline(always)]
    fn over_quota(&self, d: &Driver<'_, L>, quota: u64) -> bool {
        self.over_quota_by(d, quota, 1)
    }

    /// Whether `more` BFNs (at least 1) would take the driver domain of the
    /// locked cell `d` past its quota, as [`over_quota`](Self::over_quota)
    /// tells for one.
    ///
    /// Near the quota, the cell first claims the BFNs in its own line
    /// (`CellState::used`, what it will hold once they are installed),
    /// then counts every other cell's line. Of two cells doing so at once
    /// (each holding its own lock: maps into two contexts on two vCPUs),
    /// at least one sees the other's claim (sequentially consistent store
    /// before loads, on both sides), so the two never pass together what
    /// one alone would not: the quota holds across contexts exactly. (A
    /// line counted as of its last unlock let an extent in each context
    /// pass it by 512.) A refused claim is taken back; one whose install
    /// fails later stays until the cell's unlock writes what it holds
    /// (`publish_used`), refusing others a little early meanwhile.
    #[inline(always)]
    fn over_quota_by(&self, d: &Driver<'_, L>, quota: u64, more: u64) -> bool {
        let own = d.dd.used().saturating_add(more.saturating_sub(1));
        if d.dd.context == ContextId::DEFAULT && d.dd.contexts == 1 {
            return own >= quota;
        }
        let rough = self
            .shared
            .get(d.dd.home as usize)
            .map_or(0, |s| s.used.load(Ordering::SeqCst))
            .wrapping_sub(d.dd.published_used)
            .wrapping_add(own);
        if rough.saturating_add(UNPUBLISHED_BOUND) < quota {
            return false;
        }
        self.over_quota_near(d, quota, own)
    }

    /// [`over_quota_by`](Self::over_quota_by) near the quota: claim, then
    /// count every cell. `own` is what the cell would hold, less one.
    #[cold]
    #[inline(never)]
    fn over_quota_near(&self, d: &Driver<'_, L>, quota: u64, own: u64) -> bool {
        let mine = self.cell_state.get(d.cell);
        if let Some(c) = mine {
            c.used.store(own.saturating_add(1), Ordering::SeqCst);
        }
        let domid = d.dd.domid;
        let others: u64 = (0..MAX_CONTEXTS)
            .map(ContextId)
            .filter(|&c| c != d.dd.context)
            .filter_map(|c| self.cell_number(domid, c))
            .filter_map(|cell| self.cell_state.get(cell))
            .map(|c| c.used.load(Ordering::SeqCst))
            .fold(0u64, u64::saturating_add);
        let over = own.saturating_add(others) >= quota;
        if over {
            if let Some(c) = mine {
                c.used.store(d.dd.used(), Ordering::SeqCst);
            }
        }
        over
    }

    /// The quota of the driver domain locked cell `d` belongs to.
    ///
    /// Its domid is the engine's own, recorded when the cell was claimed:
    /// no clamp under speculation on the map path.
    #[inline]
    fn quota_of(&self, d: &Driver<'_, L>) -> u64 {
        self.quota_from(self.lives.get(d.dd.domid.0 as usize))
    }

    /// `domid`'s quota (a domid a caller chose: clamped under speculation).
    fn quota_of_domain(&self, domid: DomId) -> u64 {
        self.quota_from(get_nospec(&self.lives, domid.0 as usize))
    }

    /// The quota a `lives` entry says: the toolstack's, or the boot default.
    #[inline]
    fn quota_from(&self, slot: Option<&DomidLife>) -> u64 {
        match slot.map(DomidLife::quota) {
            Some(q) if q != NO_QUOTA => u64::from(q),
            _ => self.config.quota,
        }
    }

    /// Record cell `cell`'s state at an unlock (its lock held): in its own
    /// line, and its BFNs in use in its driver domain's rough count once
    /// the change reaches the slack, or always when `all` (the cell is
    /// given back).
    // (Inlined into every unlock, `put_driver`: called, its saving and
    // restoring of registers was a fifth of it.)
    #[inline(always)]
    pub(crate) fn publish_used(&self, cell: usize, dd: &mut DriverDomain, all: bool) {
        let used = dd.used();
        if let Some(c) = self.cell_state.get(cell) {
            if c.used.load(Ordering::Relaxed) != used {
                c.used.store(used, Ordering::SeqCst);
            }
            let retry = dd.stuck() != 0 || dd.refused_clears != 0 || dd.flush_failed;
            if c.retry.load(Ordering::Relaxed) != retry {
                c.retry.store(retry, Ordering::SeqCst);
            }
            // Anything the owner's flush would do: entries to write or
            // clear, pages to release, invalidations gathered (a map into
            // an engine context writes its entry at once and leaves only
            // its invalidation; a map past `DEFER_LIMIT` too), emptied
            // tables to free.
            let unfinished = !dd.pending_maps.is_empty()
                || dd.unmapping_head != driver::NONE
                || !dd.gather.is_empty()
                || dd.has_flushed_tables();
            if c.unfinished.load(Ordering::Relaxed) != unfinished {
                c.unfinished.store(unfinished, Ordering::SeqCst);
            }
        }
        let moved = used.abs_diff(dd.published_used);
        if moved >= PUBLISH_SLACK || (all && moved != 0) {
            if let Some(s) = self.shared.get(dd.home as usize) {
                s.used
                    .fetch_add(used.wrapping_sub(dd.published_used), Ordering::SeqCst);
            }
            dd.published_used = used;
        }
    }

    fn owner_is(&self, cell: usize, domid: DomId) -> bool {
        self.owners
            .get(cell)
            .is_some_and(|o| o.load(Ordering::SeqCst) == domid.0 as u32)
    }

    /// Lock the first free cell of `cells` and make `domid` its owner
    /// (compare-and-swap under the cell's lock, so of two claimers of one
    /// cell the loser moves on to the next); `None` if none is free. Holds
    /// no other cell: the lock is a blocking one, so a free cell a hook
    /// holds for a moment is not passed over as busy. The caller sets the
    /// state up for its new owner before it unlocks.
    pub(crate) fn take_free_cell(
        &self,
        cells: core::ops::Range<usize>,
        domid: DomId,
    ) -> Option<Driver<'_, L>> {
        for cell in cells {
            let (Some(owner), Some(m)) = (self.owners.get(cell), self.cells.get(cell)) else {
                continue;
            };
            if owner.load(Ordering::SeqCst) != FREE_CELL {
                continue;
            }
            let dd = m.lock();
            let claimed = owner
                .compare_exchange(
                    FREE_CELL,
                    domid.0 as u32,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok();
            if claimed {
                return Some(Driver { cell, dd });
            }
        }
        None
    }

    /// Lock `domid`'s driver state, giving it a free cell first if it has
    /// none. Cell 0 only ever goes to dom0.
    ///
    /// A cell is claimed entirely under its lock: owner, state and the
    /// `cell_of` entry change together, so no other vCPU of the domain, and
    /// no hook, can see a cell that is owned but not yet set up for its
    /// owner (whose IOMMU context the state names).
    pub(crate) fn lock_or_claim(&self, domid: DomId) -> Result<Driver<'_, L>, Errno> {
        let slot = get_nospec(&self.cell_of, domid.0 as usize).ok_or(Errno::Srch)?;
        let first = if domid == DomId::DOM0 { 0 } else { DOM0_CELLS };
        let last = if domid == DomId::DOM0 {
            1
        } else {
            MAX_DRIVER_DOMAINS
        };
        let mut full = true;
        for _ in 0..MAP_RETRIES {
            if let Some(d) = self.lock_driver(domid) {
                return Ok(d);
            }
            full = true;
            if let Some(Driver { cell, mut dd }) = self.take_free_cell(first..last, domid) {
                full = false;
                // Publish it, unless another vCPU of the domain published a
                // cell meanwhile: then give this one back and use theirs.
                if slot
                    .compare_exchange(NO_CELL, cell as u8, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    if let Some(owner) = self.owners.get(cell) {
                        owner.store(FREE_CELL, Ordering::SeqCst);
                    }
                    continue;
                }
                // A free cell's state is idle (no slots); it needs its new
                // owner and fresh counters (cell 0 is only ever dom0's: its
                // counters live as long as the host).
                if cell != 0 {
                    dd.stats = DriverStats::default();
                }
                // What its cells share starts afresh. (No cell adds to it:
                // a home goes only once its contexts' cells are gone, and
                // every cell takes its part off when it goes.)
                if let Some(s) = self.shared.get(cell) {
                    debug_assert_eq!(s.used.load(Ordering::SeqCst), 0);
                    debug_assert_eq!(dd.published_used, 0);
                    s.used.store(0, Ordering::SeqCst);
                }
                dd.published_used = 0;
                dd.domid = domid;
                dd.context = ContextId::DEFAULT;
                dd.home = cell as u8;
                return Ok(Driver { cell, dd });
            }
            // All owned: try again (a cell may only have looked owned while
            // another claimer gave it back), then report the table full.
        }
        Err(if full { Errno::NoSpc } else { Errno::Again })
    }

    /// Unlock a driver state. A state left idle (nothing mapped, revoked
    /// or pending) gives its memory back and, unless it is dom0's (cell
    /// 0, kept so dom0's counters last), its cell. Only the cell's real
    /// owner's state releases it: a hook that locked a cell its target's
    /// gate still named may find it free, or someone else's.
    pub(crate) fn put_driver(&self, d: Driver<'_, L>) {
        let Driver { cell, mut dd } = d;
        self.publish_bugs(&mut dd);
        dd.compact_if_empty();
        self.publish_used(cell, &mut dd, false);
        // (A context's cell is never idle: its context is in `contexts`.)
        if cell == 0 || !dd.is_idle() {
            return;
        }
        let domid = dd.domid;
        let Some(slot) = self.cell_of.get(domid.0 as usize) else {
            return;
        };
        if !self.owner_is(cell, domid) || slot.load(Ordering::SeqCst) != cell as u8 {
            return;
        }
        // What it still counts in its driver domain's rough count goes: a
        // free cell adds nothing to anyone's (the next owner's home may be
        // another cell).
        self.publish_used(cell, &mut dd, true);
        // Both under the cell's lock (held until `dd` drops, after this).
        slot.store(NO_CELL, Ordering::SeqCst);
        if let Some(o) = self.owners.get(cell) {
            o.store(FREE_CELL, Ordering::SeqCst);
        }
    }

    /// The cell's engine bugs since its last unlock go to the host-wide
    /// counts the host reports (a compare a kind per unlock otherwise).
    #[inline]
    pub(crate) fn publish_bugs(&self, dd: &mut DriverDomain) {
        if let Some(new) = dd.take_new_bugs() {
            for (count, n) in self.unreported.iter().zip(new) {
                if n != 0 {
                    count.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Engine bugs of kind `bug` found and not yet reported, host-wide,
    /// claimed by the caller (0 for whoever asks next). Each was survived
    /// (see [`EngineBug`]); the host reports them (Xen: a console line,
    /// rate-limited), or gives back what it could not report
    /// ([`give_back_unreported`](Self::give_back_unreported)). Claimed, not
    /// read: two CPUs reporting at once never report one bug twice.
    pub fn take_unreported(&self, bug: EngineBug) -> u64 {
        let Some(count) = self.unreported.get(bug as usize) else {
            return 0;
        };
        if count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        count.swap(0, Ordering::Relaxed)
    }

    /// `n` claimed bugs of kind `bug` the host could not report yet: the
    /// next report has them.
    pub fn give_back_unreported(&self, bug: EngineBug, n: u64) {
        if let Some(count) = self.unreported.get(bug as usize) {
            count.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Give `domid`'s cell back after its teardown (dom0's too), its state
    /// reset to idle.
    pub(crate) fn release_driver(&self, d: Driver<'_, L>) {
        let Driver { cell, mut dd } = d;
        self.publish_bugs(&mut dd);
        self.publish_used(cell, &mut dd, true);
        let domid = dd.domid;
        if let Some(slot) = self.cell_of.get(domid.0 as usize) {
            if self.owner_is(cell, domid) && slot.load(Ordering::SeqCst) == cell as u8 {
                slot.store(NO_CELL, Ordering::SeqCst);
                if let Some(o) = self.owners.get(cell) {
                    o.store(FREE_CELL, Ordering::SeqCst);
                }
            }
        }
        drop(dd);
    }

    /// Clear driver cell `cell`'s bit in target `domid`'s gate once the
    /// cell maps none of its pages. Called under the cell's lock after
    /// anything that may have unmapped some. While the cell has unmapped but
    /// unflushed (or stuck) entries the bit stays: a hook must still reach
    /// the cell to flush them (a page turned read-only must not stay
    /// writable through the IOTLB until the owner's batch ends).
    ///
    /// It never sets the bit: only a map does, explicitly, under the lock
    /// and before its re-check of the target's sequence number. So once a
    /// dying target's teardown has cleared the bits
    /// (`clear_stale_gate_bits`), no hook that read the gate before can set
    /// one again because its cell has work pending for another target.
    pub(crate) fn clear_gate_bit_if_unused(&self, cell: usize, dd: &DriverDomain, domid: DomId) {
        if dd.pages_of(self.seed, domid) == 0 && !dd.has_pending() {
            self.set_gate_bit(cell, domid, false);
        }
    }

    /// Set or clear cell `cell`'s bit in `domid`'s gate (under the cell's
    /// lock, so nobody else changes that bit meanwhile: a plain load tells
    /// whether the read-modify-write is needed at all). Whether it changed.
    pub(crate) fn set_gate_bit(&self, cell: usize, domid: DomId, on: bool) -> bool {
        let Some(g) = self.gate(domid) else {
            return false;
        };
        self.set_bit_in_gate(g, cell, on)
    }

    /// [`set_gate_bit`](Self::set_gate_bit), `g` the domid's gate as the
    /// caller looked it up (a run of maps of one target looks it up once).
    #[inline(always)]
    pub(crate) fn set_bit_in_gate(&self, g: &TargetGate, cell: usize, on: bool) -> bool {
        // Cell numbers come from the engine's own tables, all below
        // MAX_DRIVER_DOMAINS.
        debug_assert!(cell < MAX_DRIVER_DOMAINS);
        let Some((word, bit)) = g.driver_bit(cell) else {
            return false;
        };
        if (word.load(Ordering::SeqCst) & bit != 0) == on {
            return false;
        }
        if on {
            word.fetch_or(bit, Ordering::SeqCst);
        } else {
            word.fetch_and(!bit, Ordering::SeqCst);
        }
        true
    }

    /// After a map that set cell `cell`'s bit for `domid` (`newly`: it was
    /// clear) and then installed nothing of `domid` (refused, or the target
    /// changed under it): a bit this map set goes again, whatever else the
    /// cell has pending. It was clear, so the cell held no entry of the
    /// target, live or pending, and the map added none. (Left to
    /// [`clear_gate_bit_if_unused`](Self::clear_gate_bit_if_unused), which
    /// keeps a bit while the cell has work pending for any target, such a
    /// bit could outlive a target that died meanwhile, its teardown's walk
    /// already past.) A bit that was already set is that rule's to clear.
    fn undo_gate_bit(&self, cell: usize, dd: &DriverDomain, domid: DomId, newly: bool) {
        if newly && dd.pages_of(self.seed, domid) == 0 {
            // The invariant this rests on (a cell holding any entry of a
            // target has its bit), checked in tests: no entry of the
            // target waits for a flush or is stuck.
            debug_assert!(
                !dd.slots().any(|(_, s)| matches!(s,
                    Slot::Unmapping { mapping: m, .. } | Slot::Stuck { mapping: m, .. }
                        if m.domid == domid)),
                "a bit taken back while an entry of d{} is pending",
                domid.0
            );
            self.set_gate_bit(cell, domid, false);
        } else {
            self.clear_gate_bit_if_unused(cell, dd, domid);
        }
    }

    /// Forget what is kept by `domid` (its teardown has ended): its count
    /// of notices (a later domain with its id numbers from 1 again) and its
    /// quota (a later domain with its id starts with the boot default).
    pub(crate) fn forget_domid(&self, domid: DomId) {
        // The domid's life ends here, and its quota with it: an op on this
        // domain's state checked before acts on nothing of a later
        // domain's ([`DomidLife`]).
        if let Some(l) = self.lives.get(domid.0 as usize) {
            l.end();
        }
        if let Some(n) = self.notice_counts.get(domid.0 as usize) {
            n.store(0, Ordering::SeqCst);
        }
        if let Some(b) = self.fault_buckets.get(domid.0 as usize) {
            b.store(contexts::FaultBucket::FULL.bits(), Ordering::SeqCst);
        }
    }

    /// (quota, used, revoked) of `caller`.
    pub fn usage(&self, caller: DomId) -> (u64, u64, u64) {
        let quota = self.quota_of_domain(caller);
        let (mut used, mut revoked) = (0, 0);
        for context in self.contexts_of(caller) {
            if let Some(d) = self.lock_cell(caller, context) {
                used += d.dd.used();
                revoked += d.dd.revoked();
            }
        }
        (quota, used, revoked)
    }

    /// The toolstack sets `domid`'s BFN quota (`None`: back to the boot
    /// default). Lowering it below what the domain holds refuses its new
    /// maps until it is back under; nothing is revoked. A map run already
    /// holding one of the domain's cells counts the quota it read for its
    /// (at most `MAP_CHUNK`) maps under that lock. The caller has been
    /// checked to be the control domain. The quota is kept by domid
    /// (`DomidLife`): it takes no cell, so quotas set for domains that
    /// never map cannot fill the pool of cells.
    ///
    /// The domain is looked up without any engine lock, so its death could
    /// land in between, its whole teardown run, and a later domain take its
    /// id: the quota is stored only into the life read before the lookup
    /// (`EAGAIN` if each of [`CONTROL_RETRIES`] rounds finds it moved).
    pub fn set_quota(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        quota: Option<u64>,
    ) -> Result<(), Errno> {
        // (Refused before any lookup: a malformed quota is `Inval` whatever
        // the domain.)
        Self::quota_value(quota)?;
        // (A move means the domain's teardown ended: the next round finds it
        // gone, or a later domain, alive, whose own quota it is.)
        for _ in 0..CONTROL_RETRIES {
            let life = self.life_of(domid);
            // Alive after `life` was read: a domain of that life (a dying
            // one may be a zombie past its teardown, whose end moves
            // nothing). The hypercall's checks make the same one
            // (`on_checked_domain`).
            if !matches!(Platform::domain_info(h, domid), Some(d) if !d.dying) {
                return Err(Errno::Srch);
            }
            match self.set_quota_of_life(h, domid, quota, life) {
                Err(Errno::Again) => continue,
                r => return r,
            }
        }
        Err(Errno::Again)
    }

    /// The word a quota is kept as (`None`: [`NO_QUOTA`]); `Inval` past
    /// [`MAX_QUOTA`](crate::config::MAX_QUOTA).
    fn quota_value(quota: Option<u64>) -> Result<u32, Errno> {
        match quota {
            None => Ok(NO_QUOTA),
            Some(q) if q <= crate::config::MAX_QUOTA => u32::try_from(q).map_err(|_| Errno::Inval),
            Some(_) => Err(Errno::Inval),
        }
    }

    /// [`set_quota`](Self::set_quota) for a caller whose checks of `domid`
    /// came after it read the domid's life number `life`
    /// ([`life_of`](Self::life_of)), and found the domain alive:
    /// `Err(Again)`, nothing stored, if the life is another by the time
    /// the quota is stored (the checked domain's teardown ended, and a
    /// later domain may hold the domid now: its label was never checked),
    /// or another call stored a quota meanwhile; the caller checks again.
    /// Otherwise the quota is stored in the checked domain's life, as one
    /// compare-exchange of the life and the quota together, and the end of
    /// that life (its teardown's) forgets it, whenever it comes.
    pub(crate) fn set_quota_of_life(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        quota: Option<u64>,
        life: u32,
    ) -> Result<(), Errno> {
        let value = Self::quota_value(quota)?;
        let slot = get_nospec(&self.lives, domid.0 as usize).ok_or(Errno::Srch)?;
        let seen = slot.word();
        if DomidLife::life_in(seen) != life {
            return Err(Errno::Again);
        }
        // (Only the simulated host has a race point here.)
        #[cfg(feature = "sim")]
        h.race_point(crate::platform::RacePoint::BeforeQuotaStore);
        #[cfg(not(feature = "sim"))]
        let _ = h;
        if !slot.replace_quota(seen, value) {
            return Err(Errno::Again);
        }
        Ok(())
    }

    /// Check that `context` of `caller` can be destroyed: it exists, is not
    /// the default, and holds no BFN in any state.
    pub fn context_destroy_check(&self, caller: DomId, context: ContextId) -> Result<(), Errno> {
        if context == ContextId::DEFAULT {
            return Err(Errno::NoEnt);
        }
        let d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        Self::destroy_check_locked(&d.dd, context)
    }

    fn destroy_check_locked(dd: &DriverDomain, context: ContextId) -> Result<(), Errno> {
        if context == ContextId::DEFAULT || !dd.has_context(context) {
            return Err(Errno::NoEnt);
        }
        // Refused rather than detached behind the caller's back: its device
        // would silently change address space (design/abi.md).
        if dd.attached_devices(context).next().is_some() {
            return Err(Errno::Busy);
        }
        // A context's cell holds that context's slots only (a map checks
        // its context against the cell's): any BFN in use there (live,
        // waiting for its flush, stuck, or a notice not yet acknowledged)
        // is one of this context. O(1): this is asked under
        // `pcidevs_lock`, as often as the caller likes (a pass over the
        // slots cost up to a quota's worth of them a call).
        if dd.context != context || dd.used() != 0 {
            return Err(Errno::Busy);
        }
        Ok(())
    }

    /// Flush the IOTLB for everything `caller` has gathered, then release
    /// the page references of unmapped pages (the device cannot reach them
    /// any more) and retry revocations the IOMMU refused before: in each of
    /// its contexts, one cell at a time. All of them: for a caller of the
    /// engine's own (a test, the simulator's tools), each round lets go of
    /// up to [`RELEASE_BUDGET`](revoke::RELEASE_BUDGET) pages over the
    /// cells and the next goes on (a hypercall instead continues:
    /// [`finish_contexts`](Self::finish_contexts)). Bounded: each round
    /// but the last releases pages.
    pub fn finish(&self, h: &mut impl Hypervisor, caller: DomId) {
        while self.finish_contexts(h, caller, u32::MAX) {}
    }

    /// At a preemption point of `caller`'s batch (the call continues in a
    /// later entry): its cells keep what waits for the flush (entries to
    /// write and clear, pages to release) for the entry that ends the call,
    /// so runs cut here join again, while all of its cells together hold
    /// less than [`PREEMPT_RELEASE_LIMIT`]: a cell that would take the
    /// total to it is finished now. So, while flushes succeed, the flushes
    /// that end the call (one per cell, none preemptible) are left that
    /// much plus one entry's ops, however many entries the call has and
    /// however many contexts it spreads its work over. (A cell whose flush
    /// fails keeps its pages until one succeeds, as it does between calls.)
    pub fn pause_contexts(&self, h: &mut impl Hypervisor, caller: DomId) {
        let mut waiting = 0u64;
        let mut budget = revoke::RELEASE_BUDGET;
        for context in self.contexts_of(caller) {
            if let Some(mut d) = self.lock_cell(caller, context) {
                let held = |dd: &DriverDomain| dd.unmapping_len + dd.pending_maps.len() as u64;
                let here = held(&d.dd);
                // (A cell with nothing waiting is left alone even past the
                // limit: a cell whose flush failed can hold the total
                // there, and finishing the others each entry then would
                // only cut their runs.)
                if here != 0 && waiting + here >= PREEMPT_RELEASE_LIMIT {
                    self.flush_and_release_as(&mut d, h, true, &mut budget);
                }
                // (All of it still, if the flush failed: its pages cannot
                // go before a flush does, and the other cells are finished
                // instead.)
                waiting += held(&d.dd);
                self.put_driver(d);
            }
        }
    }

    /// [`finish`](Self::finish) in the contexts of `caller` whose bits are
    /// set in `contexts` (bit n: context n), and in any other that has
    /// work to retry (a refused revocation, a failed flush) or entries a
    /// preempted batch left to write or clear: a batch that touched only
    /// some contexts leaves the others' cells (and whoever works in them)
    /// alone. Whether the call must continue, as a preempted one (its cells
    /// say they are unfinished): a cell's flush succeeded and left pages to
    /// release ([`RELEASE_BUDGET`](revoke::RELEASE_BUDGET)), or a cell was
    /// left for the entry's budget of entry writes and clears (below).
    ///
    /// The writes and clears before the flushes are not preemptible: an
    /// entry makes at most [`PREEMPT_RELEASE_LIMIT`] plus one batch's ops
    /// of them, and always all of at least one cell's (so the call goes
    /// on). The named cells come first. With one vCPU they fit in that
    /// ([`pause_contexts`](Self::pause_contexts) keeps the rest below the
    /// limit); the bound is for the cells other vCPUs of the caller are
    /// filling meanwhile, which an entry finishes when it meets them
    /// unfinished (a review of 2026-12-07: k vCPUs in k contexts left the
    /// first call to end k times `DEFER_LIMIT` clears). A call that ends
    /// in an error is bound the same way and continues too, the error
    /// carried in its continuation (`hypercall::BatchEnding`): it answers
    /// only once no cell waits, as one that ends well: every op it
    /// reported done has its entry written or cleared and flushed, or,
    /// where the IOMMU refused a clear or a flush, its page kept referenced
    /// until a later flush succeeds (a review of 2026-12-07: a first bound
    /// left them; the next finished every cell unbounded).
    pub fn finish_contexts(&self, h: &mut impl Hypervisor, caller: DomId, contexts: u32) -> bool {
        let mut left = false;
        // (Shared by the cells: an entry releases at most this many, and
        // gives back at most this many blocks of slots.)
        let mut budget = revoke::RELEASE_BUDGET;
        let mut trims = driver::TRIM_BLOCKS_PER_CALL;
        let mut shrinks = driver::SHARD_REBUILDS_PER_CALL;
        let mut entry_work = PREEMPT_RELEASE_LIMIT + u64::from(self.config.max_batch_ops);
        let mut finished_any = false;
        let named = |context: ContextId| contexts & (1 << context.0) != 0;
        for named_pass in [true, false] {
            for context in self.contexts_of(caller) {
                if named(context) != named_pass {
                    continue;
                }
                let waits = || {
                    self.cell_number(caller, context)
                        .and_then(|cell| self.cell_state.get(cell))
                        .is_some_and(|c| {
                            c.retry.load(Ordering::SeqCst) || c.unfinished.load(Ordering::SeqCst)
                        })
                };
                if !named_pass && !waits() {
                    continue;
                }
                let Some(mut d) = self.lock_cell(caller, context) else {
                    continue;
                };
                let work = d.dd.pending_maps.len() as u64 + d.dd.deferred_entries;
                if finished_any && work > entry_work {
                    // Its writes and clears wait for the next entry (it
                    // stays unfinished).
                    self.put_driver(d);
                    left = true;
                    continue;
                }
                entry_work = entry_work.saturating_sub(work);
                finished_any = true;
                left |= self.flush_and_release_as(&mut d, h, true, &mut budget).left;
                // The owner's own call gives back a block its unmaps freed
                // (no hook or teardown slice pays for that pass).
                while trims != 0 && d.dd.trim_free_tail() {
                    trims -= 1;
                }
                if shrinks != 0 && d.dd.shrink_index() {
                    shrinks -= 1;
                }
                self.put_driver(d);
            }
        }
        left
    }
}

#[cfg(test)]
mod gate_index_tests {
    use super::*;

    #[test]
    fn every_domid_has_its_own_gate_and_reserved_ones_none() {
        let mut seen = alloc::vec![false; DomId::FIRST_RESERVED as usize];
        for d in 0..DomId::FIRST_RESERVED {
            let i = gate_index(DomId(d));
            assert!(!seen[i], "domid {d} shares gate {i}");
            seen[i] = true;
        }
        for d in DomId::FIRST_RESERVED..=u16::MAX {
            assert_eq!(gate_index(DomId(d)), usize::MAX);
        }
        // Neighbours land on different cache lines (4 gates per line).
        for d in 0..100u16 {
            assert_ne!(gate_index(DomId(d)) / 4, gate_index(DomId(d + 1)) / 4);
        }
    }
}

/// Regression tests of review findings that reach into the engine's
/// internals (a gate's count, a cell's gather, the boot config), outside
/// the cell-claim races below.
#[cfg(all(test, feature = "sim"))]
mod review_tests {
    use super::*;
    use crate::platform::Platform;
    use crate::sim::{DomainSpec, Format, SimMachine};
    use crate::{Gfn, MemAttr, Permissions};
    use pviommu_abi::MapRequest;

    const GUEST: DomId = DomId(1);
    /// A device model of [`GUEST`] (`device_model_mapping`).
    const DM: DomId = DomId(3);

    /// The straight path's lock, `lock_for_map_inlined`, locks the cell
    /// `lock_for_map` locks, or answers its error, call for call on two
    /// engines over one host: a caller with no cell yet (context 0
    /// claims its home cell; any other context is `ENOENT`), with a home
    /// cell, with a context of its own, a context it does not have, a
    /// context id past the table, a domid past the table.
    #[test]
    fn the_inlined_map_lock_locks_what_lock_for_map_locks() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: 16,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(GUEST, spec).unwrap();
        let plain = crate::Engine::new(Default::default(), &m).unwrap();
        let inlined = crate::Engine::new(Default::default(), &m).unwrap();
        let outcome = |e: &crate::Engine, r: Result<Driver<'_, _>, Errno>| {
            r.map(|d| {
                let seen = (d.cell, d.dd.domid, d.dd.context);
                e.put_driver(d);
                seen
            })
        };
        let callers = [DomId::DOM0, GUEST, DomId(0x7ff0), DomId(u16::MAX)];
        let contexts = [0u32, 1, 2, MAX_CONTEXTS - 1, MAX_CONTEXTS, u32::MAX];
        let compare = || {
            for caller in callers {
                for c in contexts {
                    let c = ContextId(c);
                    let a = outcome(&plain, plain.lock_for_map(caller, c));
                    let b = outcome(&inlined, inlined.lock_for_map_inlined(caller, c));
                    assert_eq!(a, b, "{caller:?} {c:?}");
                }
            }
            // Each engine's cells as the other's.
            for caller in callers {
                for c in contexts {
                    let c = ContextId(c);
                    assert_eq!(plain.cell_of(caller, c), inlined.cell_of(caller, c));
                }
            }
        };
        compare();
        // A context each (the home cells then stay theirs).
        for e in [&plain, &inlined] {
            for caller in [DomId::DOM0, GUEST] {
                let created = e.context_create(&mut m, caller);
                assert!(created.is_ok(), "{caller:?} {created:?}");
            }
        }
        compare();
    }

    /// Review of the gate bits: a bit a cell keeps for a target it no
    /// longer holds anything of (kept while the cell has work pending for
    /// another target) is cleared by the target's teardown, under the
    /// cell's lock, once nothing holds a page of it; the cell's pending
    /// work stays and is flushed.
    #[test]
    fn a_dying_targets_stale_bits_go_with_its_teardown() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: 16,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(GUEST, spec.clone()).unwrap();
        m.create_domain(DomId(2), spec).unwrap();
        let e = crate::Engine::new(Default::default(), &m).unwrap();
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        let req = MapRequest {
            context: ContextId::DEFAULT,
            domid: DomId(2),
            gfn: Gfn(1),
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        let b = e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap();
        e.finish(&mut m, DomId::DOM0);
        e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, b).unwrap();
        // Cell 0 has work pending (the other domain's unmap) and a bit for
        // GUEST it holds nothing of; the dying guest has a share of its
        // gate (a map in flight).
        assert!(e.set_gate_bit(0, GUEST, true));
        m.mark_dying(GUEST);
        e.gate(GUEST).unwrap().active.fetch_add(1, Ordering::SeqCst);
        let mut cursor = 0;
        // The first slice walks the named cell and keeps the bit (the
        // cell still has pending work); with the share given back, the
        // next one clears it.
        assert!(e.domain_teardown(&mut m, GUEST, &mut cursor).is_err());
        e.gate_leave(GUEST);
        while e.domain_teardown(&mut m, GUEST, &mut cursor).is_err() {}
        assert_eq!(e.target_drivers(GUEST), 0);
        e.finish(&mut m, DomId::DOM0);
        assert_eq!(e.target_drivers(DomId(2)), 0);
        assert_eq!(e.target_active(DomId(2)), 0);
    }

    /// Security review: the storage's 32-bit slot links and shard sizes
    /// hold only up to `MAX_QUOTA`, which only the C boot-option parser
    /// enforced.
    #[test]
    fn a_boot_quota_past_what_the_storage_holds_is_clamped() {
        let m = SimMachine::new(64, Format::Vtd, 64);
        let config = crate::config::Config {
            quota: u64::MAX,
            ..Default::default()
        };
        let e = crate::Engine::new(config, &m).unwrap();
        assert_eq!(e.config().quota, crate::config::MAX_QUOTA);
    }

    /// Review (defence in depth, unreachable through the engine): a
    /// gathered range of a context the cell no longer has was skipped and
    /// the flush answered `Ok`, so the pages of that range would have been
    /// released unflushed. It fails closed now, and keeps the gather.
    #[test]
    fn a_flush_of_a_range_of_a_context_the_cell_lacks_fails_closed() {
        let mut m = SimMachine::new(64, Format::Vtd, 64);
        let mut dd = DriverDomain::new(DomId::DOM0);
        dd.gather.add(ContextId(3), Bfn(0x10_0000), 0).unwrap();
        assert_eq!(dd.iommu_flush(&mut m), Err(Errno::Busy));
        assert!(!dd.gather.is_empty());
        // Forgotten (as `drop_context` does once its whole-context flush
        // succeeded), the flush goes through.
        dd.gather.forget(ContextId(3));
        assert_eq!(dd.iommu_flush(&mut m), Ok(()));
    }

    /// Review of the teardown restart: a target's teardown waited for
    /// `target_active` to read 0, a count that maps in flight raise too
    /// (then, any caller could start one: a map refused at its checks
    /// joined the gate first), so a device model of another guest looping
    /// refused maps of the dying domain could hold its teardown off. A count that never
    /// comes back to 0 (here: a share joined and not yet given back) must
    /// not stop the teardown once no cell holds a page of the domain.
    #[test]
    fn a_share_of_the_gate_held_elsewhere_does_not_hold_a_teardown_off() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: 16,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(GUEST, spec).unwrap();
        let e = crate::Engine::new(Default::default(), &m).unwrap();
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        let req = MapRequest {
            context: ContextId::DEFAULT,
            domid: GUEST,
            gfn: Gfn(1),
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap();
        e.finish(&mut m, DomId::DOM0);
        // A map in flight elsewhere, joined and not yet given back.
        e.gate(GUEST).unwrap().active.fetch_add(1, Ordering::SeqCst);
        let slices = m.kill_domain(&e, GUEST);
        assert!(slices < 16, "{slices} slices");
        assert_eq!(e.target_drivers(GUEST), 0);
        assert_eq!(m.zombie_frames(), 0);
        e.gate_leave(GUEST);
    }

    /// Review of the teardown's reset (2026-12-06): a driver domain's cell
    /// was reset at the end of its teardown whatever it still held. A Live
    /// mapping the walk missed (here hidden from it, as a bug would) had
    /// its page reference forgotten: the teardown ended, the page was never
    /// put (a target that never dies). Now the cell is kept, the bug
    /// counted, and the teardown walks again, said stalled (`-EBUSY` to
    /// the toolstack on Xen) after `STALLED_RESTARTS`
    /// walks that found nothing (a second review: the walk's advance to
    /// each context reset the count, so it never stalled and the destroy
    /// was continued for ever); once the walk finds the mapping it takes
    /// it down and ends with nothing held. In the home cell (context 0)
    /// and in a context's own cell.
    #[test]
    fn a_teardown_never_resets_a_cell_holding_a_page() {
        for context in [ContextId::DEFAULT, ContextId(1)] {
            teardown_with_a_hidden_page(context);
        }
    }

    /// A review of the re-walk's stall count (2026-12-06): the count of a
    /// teardown's restarts without progress went on across contexts
    /// whatever the walk was. A context whose failed flush another path
    /// retried between slices (here the target's write revocation) then
    /// passed its count of 5 on, and the teardown said it was stalled
    /// after 3 more failures (a flaky IOMMU's `-EBUSY` too early). Only a
    /// walk made again for a page held at a reset carries it now.
    #[test]
    fn a_context_finished_by_another_path_passes_no_stall_count_on() {
        let (mut m, e) = device_model_mapping(ContextId(1), ContextId::DEFAULT, &[1]);
        m.mark_dying(DM);
        m.fail_flushes = 1000;
        let mut cursor = 0;
        for _ in 0..6 {
            assert!(e.domain_teardown(&mut m, DM, &mut cursor).is_err());
        }
        assert!(!crate::Engine::teardown_stalled(cursor));
        // Another path retries context 0's flush, which now succeeds.
        m.fail_flushes = 0;
        let mut revoking = 0;
        for _ in 0..50 {
            if e.revoke_writes(&mut m, GUEST, &mut revoking).is_ok() {
                break;
            }
        }
        m.fail_flushes = 1000;
        let mut slices = 0;
        while !crate::Engine::teardown_stalled(cursor) {
            assert!(e.domain_teardown(&mut m, DM, &mut cursor).is_err());
            slices += 1;
            assert!(slices < 32);
        }
        assert!(
            slices >= 8,
            "said stalled after {slices} slices failing afresh (STALLED_RESTARTS is 8)"
        );
    }

    /// [`DM`], a device model of [`GUEST`] (16 pages), with its contexts
    /// up to `last` (none but 0 for the default), having mapped `gfns` of
    /// the guest into `into`, the call's flush done.
    fn device_model_mapping(
        last: ContextId,
        into: ContextId,
        gfns: &[u64],
    ) -> (SimMachine, crate::Engine) {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let guest = DomainSpec {
            pages: 16,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(GUEST, guest).unwrap();
        let dm = DomainSpec {
            pages: 4,
            privileged: false,
            device_model_of: Some(GUEST),
        };
        m.create_domain(DM, dm).unwrap();
        let e = crate::Engine::new(Default::default(), &m).unwrap();
        for id in 1..=last.0 {
            assert_eq!(e.context_create(&mut m, DM), Ok(ContextId(id)));
        }
        let info = m.domain_info(DM).unwrap();
        for &gfn in gfns {
            let req = MapRequest {
                context: into,
                domid: GUEST,
                gfn: Gfn(gfn),
                perms: Permissions::RW,
                attr: MemAttr::WriteBack,
                grant: false,
            };
            e.map(&mut m, DM, &info, &req).unwrap();
        }
        e.finish(&mut m, DM);
        (m, e)
    }

    fn teardown_with_a_hidden_page(context: ContextId) {
        let (mut m, e) = device_model_mapping(context, context, &[1, 2]);
        let (idx, bits) = {
            let mut d = e.lock_cell(DM, context).unwrap();
            let idx =
                d.dd.slots()
                    .find_map(|(i, s)| matches!(s, Slot::Live(m) if m.gfn == Gfn(1)).then_some(i))
                    .unwrap();
            let bits = d.dd.hide_slot_for_test(idx);
            e.put_driver(d);
            (idx, bits)
        };
        m.mark_dying(DM);
        let mut cursor = 0;
        let mut slices = 0;
        while !crate::Engine::teardown_stalled(cursor) {
            assert!(
                e.domain_teardown(&mut m, DM, &mut cursor).is_err(),
                "{context:?}: the teardown ended with a page held"
            );
            slices += 1;
            assert!(slices <= 16, "{context:?}: never said stalled");
        }
        assert!(e.take_unreported(EngineBug::HeldAtReset) > 0);
        assert!(m.total_page_refs() > 0, "gfn 1's reference is still held");
        let mut d = e.lock_cell(DM, context).unwrap();
        d.dd.restore_slot_for_test(idx, bits);
        e.put_driver(d);
        let mut slices = 0;
        while e.domain_teardown(&mut m, DM, &mut cursor).is_err() {
            slices += 1;
            assert!(slices < 16);
        }
        assert_eq!(m.total_page_refs(), 0);
        assert!(e.state().driver(DM).is_none());
    }
}

/// Regression tests from the security review of the per-driver locks: a
/// cell claimed by one vCPU of a device model while another vCPU of it maps
/// (the claim used to publish the cell before setting it up, so the second
/// vCPU's entry went into the previous owner's or dom0's IOMMU context), and
/// a hook that visits a cell its target's gate still names after the cell
/// was given back (it used to free the cell from under a new claimer).
#[cfg(all(test, feature = "sim"))]
mod claim_race_tests {
    use super::*;
    use crate::platform::Platform;
    use crate::sim::{DomainSpec, Format, SharedSim, SimMachine};
    use crate::{Gfn, MemAttr, Permissions};
    use pviommu_abi::MapRequest;

    const GUEST: DomId = DomId(1);
    const OTHER: DomId = DomId(2);
    const DM: DomId = DomId(3); // device model of GUEST
    const DM2: DomId = DomId(4); // device model of OTHER

    fn host() -> (SharedSim, crate::Engine) {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        for (d, pages, dm_of) in [
            (GUEST, 64, None),
            (OTHER, 64, None),
            (DM, 4, Some(GUEST)),
            (DM2, 4, Some(OTHER)),
        ] {
            let spec = DomainSpec {
                pages,
                privileged: false,
                device_model_of: dm_of,
            };
            m.create_domain(d, spec).unwrap();
        }
        let e = crate::Engine::new(Default::default(), &m).unwrap();
        (SharedSim::new(m), e)
    }

    /// A guest of 16 600 pages (gfns past the first 64 MiB region) and
    /// nothing else.
    fn host_past_a_region() -> (SharedSim, crate::Engine) {
        let mut m = SimMachine::new(16_600 + 4096, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: 16_600,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(GUEST, spec).unwrap();
        let e = crate::Engine::new(Default::default(), &m).unwrap();
        (SharedSim::new(m), e)
    }

    fn map(
        sim: &SharedSim,
        e: &crate::Engine,
        caller: DomId,
        target: DomId,
        gfn: u64,
    ) -> Result<Bfn, Errno> {
        map_with(sim, e, caller, target, gfn, Permissions::RW)
    }

    fn map_with(
        sim: &SharedSim,
        e: &crate::Engine,
        caller: DomId,
        target: DomId,
        gfn: u64,
        perms: Permissions,
    ) -> Result<Bfn, Errno> {
        let mut h = sim.handle(caller);
        let info = h.domain_info(caller).unwrap();
        let req = MapRequest {
            context: ContextId::DEFAULT,
            domid: target,
            gfn: Gfn(gfn),
            perms,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        let r = e.map(&mut h, caller, &info, &req);
        e.finish(&mut h, caller);
        r
    }

    /// The state the old claim left visible between publishing a cell and
    /// setting it up: owner and `cell_of` say `who`, the state is the
    /// previous owner's.
    fn half_claimed(e: &crate::Engine, who: DomId, cell: usize) {
        e.owners[cell].store(who.0 as u32, Ordering::SeqCst);
        e.cell_of[who.0 as usize].store(cell as u8, Ordering::SeqCst);
    }

    /// Where `bfn` leads in each domain's default IOMMU context.
    fn contexts(sim: &SharedSim, bfn: Bfn) -> [Option<u64>; 3] {
        let m = sim.lock();
        [DM, DM2, DomId::DOM0].map(|d| m.translate(d, ContextId::DEFAULT, bfn).map(|t| t.0 .0))
    }

    #[test]
    fn a_half_set_up_cell_never_maps_into_the_previous_owners_context() {
        let (sim, e) = host();
        // DM2 used the first cell past dom0's and gave it back: the idle
        // state still says DM2.
        let b = map(&sim, &e, DM2, OTHER, 5).unwrap();
        let mut h = sim.handle(DM2);
        e.unmap(&mut h, DM2, ContextId::DEFAULT, b).unwrap();
        e.finish(&mut h, DM2);
        assert_eq!(e.owners[DOM0_CELLS].load(Ordering::SeqCst), FREE_CELL);
        half_claimed(&e, DM, DOM0_CELLS);
        // Refused (the state is not DM's), never mapped for DM2 or dom0.
        if let Ok(bfn) = map(&sim, &e, DM, GUEST, 1) {
            let [_, in_dm2, in_dom0] = contexts(&sim, bfn);
            assert_eq!((in_dm2, in_dom0), (None, None));
        }
        assert!(e.state().live_mappings(DM).next().is_none());
    }

    #[test]
    fn a_half_set_up_fresh_cell_never_maps_into_dom0s_context() {
        let (sim, e) = host();
        half_claimed(&e, DM, DOM0_CELLS); // a never-used cell's state says dom0
        if let Ok(bfn) = map(&sim, &e, DM, GUEST, 1) {
            let [_, _, in_dom0] = contexts(&sim, bfn);
            assert_eq!(
                in_dom0, None,
                "a device model's map landed in dom0's context"
            );
        }
        assert!(e.state().live_mappings(DomId::DOM0).next().is_none());
    }

    #[test]
    fn a_hook_visiting_a_given_back_cell_leaves_its_next_owner_alone() {
        let (sim, e) = host();
        map(&sim, &e, DomId::DOM0, GUEST, 9).unwrap();
        let b = map(&sim, &e, DM, GUEST, 2).unwrap();
        let stale_mask = e.target_drivers(GUEST);
        let bit = 1 << DOM0_CELLS;
        assert_eq!(stale_mask & bit, bit);
        // DM unmaps its last page: its cell goes back, its bit is cleared.
        let mut h = sim.handle(DM);
        e.unmap(&mut h, DM, ContextId::DEFAULT, b).unwrap();
        e.finish(&mut h, DM);
        // DM2 takes that cell.
        let b2 = map(&sim, &e, DM2, OTHER, 5).unwrap();
        let mut h2 = sim.handle(DM2);
        e.unmap(&mut h2, DM2, ContextId::DEFAULT, b2).unwrap();
        // A GUEST hook that read the mask before all this reaches the cell.
        for (w, word) in e.gates[gate_index(GUEST)].drivers.iter().enumerate() {
            word.fetch_or((stale_mask >> (64 * w)) as u64, Ordering::SeqCst);
        }
        e.gfn_removed(&mut sim.handle(DomId::DOM0), GUEST, Gfn(40));
        // DM2 still owns its cell and keeps working.
        e.finish(&mut h2, DM2);
        for g in 0..4 {
            map(&sim, &e, DM2, OTHER, g).expect("DM2 wedged");
        }
        assert_eq!(e.target_drivers(GUEST) & bit, 0);
    }

    /// A map refused because the free list did not hold together (an
    /// engine bug) reaches the host's report, as index misses do. Before,
    /// the cell counted it and nothing else saw it.
    #[test]
    fn a_free_list_break_is_reported_to_the_host() {
        let (sim, e) = host();
        let kept = map(&sim, &e, DomId::DOM0, GUEST, 5).unwrap();
        let gone = map(&sim, &e, DomId::DOM0, GUEST, 6).unwrap();
        let mut h = sim.handle(DomId::DOM0);
        e.unmap(&mut h, DomId::DOM0, ContextId::DEFAULT, gone)
            .unwrap();
        e.finish(&mut h, DomId::DOM0);
        // The free list's head names the slot still in use.
        {
            let mut d = e.lock_driver(DomId::DOM0).unwrap();
            let live =
                d.dd.slots()
                    .find(|(_, s)| matches!(s, Slot::Live(_)))
                    .map(|(i, _)| i)
                    .unwrap();
            d.dd.free_head = live;
        }
        assert_eq!(e.take_unreported(EngineBug::FreeListBreak), 0);
        assert_eq!(map(&sim, &e, DomId::DOM0, GUEST, 7), Err(Errno::NoSpc));
        assert_eq!(e.take_unreported(EngineBug::FreeListBreak), 1);
        assert_eq!(
            e.take_unreported(EngineBug::FreeListBreak),
            0,
            "claimed once"
        );
        assert_eq!(e.take_unreported(EngineBug::IndexMiss), 0);
        // Nothing was handed out: the page kept is as it was.
        assert!(contexts(&sim, kept)[2].is_some());
        let st = e.state();
        assert_eq!(st.driver(DomId::DOM0).unwrap().free_list_breaks(), 1);
    }

    /// A revocation that finds a live mapping the page index lost (an
    /// engine bug, or memory corrupted) still takes it down. Before the fix
    /// `take_down_live` stopped at the failed unindex, before the IOMMU
    /// unmap, and its callers carried on as if it had revoked: here a
    /// range hook's pass over the slots left the device its access to a
    /// page the guest gave away (review, 2026-12-03).
    #[test]
    fn a_live_mapping_the_index_lost_is_still_revoked() {
        let (sim, e) = host();
        let b = map(&sim, &e, DomId::DOM0, GUEST, 5).unwrap();
        let other = map(&sim, &e, DomId::DOM0, OTHER, 5).unwrap();
        assert!(contexts(&sim, b)[2].is_some());
        {
            let mut d = e.lock_driver(DomId::DOM0).unwrap();
            d.dd.pages.clear();
        }
        // GUEST's gfns 0..512 are gone (one hook over the range: a pass
        // over the cell's slots, which finds the mapping the index lost).
        let mut h = sim.handle(DomId::DOM0);
        e.gfn_changed(&mut h, GUEST, Gfn(0), 9, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(contexts(&sim, b)[2], None, "the device kept the page");
        // Reported to the host once (Xen warns on its console).
        assert_eq!(e.take_unreported(EngineBug::IndexMiss), 1);
        assert_eq!(e.take_unreported(EngineBug::IndexMiss), 0, "claimed once");
        let st = e.state();
        let dd = st.driver(DomId::DOM0).unwrap();
        assert_eq!(dd.index_misses(), 1);
        assert!(!dd.regions_exact(), "counts no longer trusted");
        assert_eq!(
            dd.slots()
                .filter(|(_, s)| matches!(s, Slot::Live(_)))
                .count(),
            1,
            "OTHER's mapping only"
        );
        drop(st);
        assert!(contexts(&sim, other)[2].is_some());
    }

    /// The same with a page that has two mappings (read-write and
    /// read-only) lost from the index, and another page of the target
    /// still indexed. The counts are one per page: taking one off per
    /// lost mapping (the first version of the fix) brought the target's
    /// count to 0 with a page still mapped, the cell's gate bit went, and
    /// a later hook for that page skipped the cell (review, 2026-12-03).
    #[test]
    fn a_lost_page_never_takes_the_cells_gate_bit_with_it() {
        let (sim, e) = host();
        let mut h = sim.handle(DomId::DOM0);
        let info = h.domain_info(DomId::DOM0).unwrap();
        let req = |gfn, perms| MapRequest {
            context: ContextId::DEFAULT,
            domid: GUEST,
            gfn: Gfn(gfn),
            perms,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        let rw = e
            .map(&mut h, DomId::DOM0, &info, &req(5, Permissions::RW))
            .unwrap();
        let ro = e
            .map(&mut h, DomId::DOM0, &info, &req(5, Permissions::RO))
            .unwrap();
        let kept = e
            .map(&mut h, DomId::DOM0, &info, &req(40, Permissions::RW))
            .unwrap();
        e.finish(&mut h, DomId::DOM0);
        e.lock_driver(DomId::DOM0)
            .unwrap()
            .dd
            .lose_page_for_test(e.seed, GUEST, Gfn(5));
        // Gfns 0..16 go: a pass finds both mappings of gfn 5.
        e.gfn_changed(&mut h, GUEST, Gfn(0), 4, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(contexts(&sim, rw)[2], None);
        assert_eq!(contexts(&sim, ro)[2], None);
        assert_eq!(e.state().driver(DomId::DOM0).unwrap().index_misses(), 2);
        assert_eq!(
            e.take_unreported(EngineBug::IndexMiss),
            2,
            "for the host to report"
        );
        assert_ne!(e.target_drivers(GUEST) & 1, 0, "dom0's cell keeps its bit");
        // Gfn 40 goes: its hook must still reach dom0's cell.
        e.gfn_removed(&mut h, GUEST, Gfn(40));
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(contexts(&sim, kept)[2], None, "the device kept gfn 40");
    }

    /// Once an index has lost a mapping (an engine bug, counted), a hook
    /// for one gfn passes over the cell's slots instead of trusting the
    /// index: a second lost page is still revoked. The first version went
    /// by the index for one gfn, and the device kept the page (review of
    /// the extent records, 2026-12-04: a record its chain lost left up to
    /// 512 pages so).
    #[test]
    fn after_an_index_miss_a_hook_for_one_gfn_still_finds_a_lost_page() {
        let (sim, e) = host();
        let [first_lost, second_lost] =
            [1, 20].map(|g| map(&sim, &e, DomId::DOM0, GUEST, g).unwrap());
        e.lock_driver(DomId::DOM0)
            .unwrap()
            .dd
            .lose_page_for_test(e.seed, GUEST, Gfn(1));
        let mut h = sim.handle(DomId::DOM0);
        // A range hook's pass finds gfn 1, and counts the miss.
        e.gfn_changed(&mut h, GUEST, Gfn(0), 2, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(contexts(&sim, first_lost)[2], None);
        assert_eq!(e.state().driver(DomId::DOM0).unwrap().index_misses(), 1);
        e.lock_driver(DomId::DOM0)
            .unwrap()
            .dd
            .lose_page_for_test(e.seed, GUEST, Gfn(20));
        e.gfn_removed(&mut h, GUEST, Gfn(20));
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(
            contexts(&sim, second_lost)[2],
            None,
            "the device kept gfn 20"
        );
    }

    /// After an index miss a range hook makes one pass over the cell at
    /// most, whatever the region counts say. The first fallback passed
    /// once per region the counts named (they are trusted again once the
    /// cell has no live mapping, while the miss stayed counted): a pass per
    /// region under the lock instead of one (second review, 2026-12-04).
    #[test]
    fn after_an_index_miss_a_range_hook_makes_one_pass() {
        let (sim, e) = host_past_a_region();
        // 200 slots: a budget of 12 probes.
        for g in 0..200 {
            map(&sim, &e, DomId::DOM0, GUEST, g).unwrap();
        }
        e.lock_driver(DomId::DOM0)
            .unwrap()
            .dd
            .lose_page_for_test(e.seed, GUEST, Gfn(5));
        let mut h = sim.handle(DomId::DOM0);
        // Every page goes (a pass finds gfn 5: the miss is counted); the
        // cell has no live mapping left, so its counts are trusted again.
        e.gfn_changed(&mut h, GUEST, Gfn(0), 8, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(e.state().driver(DomId::DOM0).unwrap().index_misses(), 1);
        assert!(e.state().driver(DomId::DOM0).unwrap().regions_exact());
        // A page each side of a region boundary, and a hook over both.
        for g in [16_380, 16_386] {
            map(&sim, &e, DomId::DOM0, GUEST, g).unwrap();
        }
        let passes = |e: &crate::Engine| e.state().driver(DomId::DOM0).unwrap().range_work().1;
        let before = passes(&e);
        let mut h = sim.handle(DomId::DOM0);
        e.gfn_changed(&mut h, GUEST, Gfn(16_380), 3, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        // (No pass at all: nothing was Live after the miss, so nothing
        // could be lost, and the indices are trusted again.)
        assert!(passes(&e) - before <= 1, "one pass over the cell at most");
        assert!(e.state().live_mappings(DomId::DOM0).next().is_none());
    }

    /// A hook that meets a broken page chain (a link to a slot that is not
    /// Live: an engine bug) notes the miss and passes over the cell for
    /// what the chain no longer leads to, for one gfn or a range. The
    /// first version stopped at the break quietly, and the mapping past it
    /// kept its entry (third review, 2026-12-04).
    #[test]
    fn a_hook_that_meets_a_broken_chain_still_revokes_past_it() {
        for range in [false, true] {
            let (sim, e) = host_past_a_region();
            // 200 slots besides: a range of 8 is probed, not passed.
            for g in 100..300 {
                map(&sim, &e, DomId::DOM0, GUEST, g).unwrap();
            }
            let rw = map(&sim, &e, DomId::DOM0, GUEST, 5).unwrap();
            let ro = map_with(&sim, &e, DomId::DOM0, GUEST, 5, Permissions::RO).unwrap();
            {
                let mut d = e.lock_driver(DomId::DOM0).unwrap();
                let head = d.dd.page_head(e.seed, GUEST, Gfn(5)).unwrap();
                // The chain's head (the RO map, the later) names no slot.
                d.dd.set_chain_link_for_test(head, 10_000);
            }
            let passes = |e: &crate::Engine| e.state().driver(DomId::DOM0).unwrap().range_work().1;
            let before = passes(&e);
            let mut h = sim.handle(DomId::DOM0);
            if range {
                e.gfn_changed(&mut h, GUEST, Gfn(0), 3, GfnChange::Removed);
            } else {
                e.gfn_removed(&mut h, GUEST, Gfn(5));
            }
            e.finish(&mut h, DomId::DOM0);
            assert_eq!(contexts(&sim, ro)[2], None, "range {range}");
            assert_eq!(
                contexts(&sim, rw)[2],
                None,
                "range {range}: the device kept gfn 5"
            );
            // (Noted at the break, and again when the pass takes out the
            // mapping the index no longer holds.)
            assert_ne!(e.state().driver(DomId::DOM0).unwrap().index_misses(), 0);
            assert_eq!(passes(&e) - before, 1, "range {range}: one pass");
        }
    }

    /// Once a lost mapping has made the region counts untrusted, they are
    /// trusted again only when no live mapping is left: the first version
    /// went by the index alone, so the owner's unmap of the last page the
    /// index held made them exact (and empty) with a lost mapping still
    /// live, and a range hook over it then skipped the cell (review,
    /// 2026-12-03).
    #[test]
    fn counts_a_lost_mapping_made_untrusted_stay_so_while_it_lives() {
        let (sim, e) = host();
        let [first_lost, still_lost, indexed] =
            [1, 20, 40].map(|g| map(&sim, &e, DomId::DOM0, GUEST, g).unwrap());
        {
            let mut d = e.lock_driver(DomId::DOM0).unwrap();
            d.dd.lose_page_for_test(e.seed, GUEST, Gfn(1));
            d.dd.lose_page_for_test(e.seed, GUEST, Gfn(20));
        }
        let mut h = sim.handle(DomId::DOM0);
        // A hook over gfns 0..4 finds gfn 1 by its pass: counts untrusted.
        e.gfn_changed(&mut h, GUEST, Gfn(0), 2, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(contexts(&sim, first_lost)[2], None);
        // The owner unmaps gfn 40, the last page the index holds.
        e.unmap(&mut h, DomId::DOM0, ContextId::DEFAULT, indexed)
            .unwrap();
        e.finish(&mut h, DomId::DOM0);
        assert!(!e.state().driver(DomId::DOM0).unwrap().regions_exact());
        // Gfns 0..32 go: the hook must still search the cell.
        e.gfn_changed(&mut h, GUEST, Gfn(0), 5, GfnChange::Removed);
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(
            contexts(&sim, still_lost)[2],
            None,
            "the device kept gfn 20"
        );
    }

    /// The target counts a lost mapping left too high are put right as soon
    /// as the cell holds no live mapping, not only once it is empty of
    /// notices too: until then the cell kept its bit in the target's gate
    /// (extra work for every hook of the target, and carried over to the
    /// next domain with its domid) (review, 2026-12-03).
    #[test]
    fn counts_a_lost_mapping_left_too_high_go_with_the_last_live_mapping() {
        // Either order: the lost mapping revoked first (a range hook's pass)
        // and the owner's unmap of the indexed one last, or the other way
        // round (the last live mapping then goes through the miss).
        for lost_last in [false, true] {
            let (sim, e) = host();
            let _lost = map(&sim, &e, DomId::DOM0, GUEST, 1).unwrap();
            let indexed = map(&sim, &e, DomId::DOM0, GUEST, 40).unwrap();
            e.lock_driver(DomId::DOM0)
                .unwrap()
                .dd
                .lose_page_for_test(e.seed, GUEST, Gfn(1));
            let mut h = sim.handle(DomId::DOM0);
            let revoke_lost = |h: &mut _| {
                e.gfn_changed(h, GUEST, Gfn(0), 2, GfnChange::Removed);
                e.finish(h, DomId::DOM0);
            };
            if !lost_last {
                revoke_lost(&mut h);
            }
            e.unmap(&mut h, DomId::DOM0, ContextId::DEFAULT, indexed)
                .unwrap();
            e.finish(&mut h, DomId::DOM0);
            if lost_last {
                revoke_lost(&mut h);
            }
            // The lost mapping is a notice now (not acknowledged).
            let st = e.state();
            let dd = st.driver(DomId::DOM0).unwrap();
            let order = if lost_last { "lost last" } else { "lost first" };
            assert_eq!(
                (dd.live(), dd.revoked(), dd.index_misses()),
                (0, 1, 1),
                "{order}"
            );
            assert_eq!(dd.pages_of(e.seed, GUEST), 0, "{order}");
            assert!(dd.regions_exact(), "{order}");
            drop(st);
            assert_eq!(
                e.target_drivers(GUEST) & 1,
                0,
                "{order}: dom0's cell lets go of GUEST"
            );
        }
    }

    /// Whether a context may be destroyed is decided without a pass over
    /// its cell's slots: `context_destroy` asks it under `pcidevs_lock`, at
    /// a rate the caller chooses, and a device model that mapped its quota
    /// into a context and unmapped all but the highest slot (so the array
    /// is not compacted) made every refused destroy decode the whole array
    /// (review, 2026-12-03; here 192 slots a call before the fix).
    #[test]
    fn a_refused_context_destroy_visits_no_slot() {
        let (sim, e) = host();
        let mut h = sim.handle(DomId::DOM0);
        let ctx = e.context_create(&mut h, DomId::DOM0).unwrap();
        let info = h.domain_info(DomId::DOM0).unwrap();
        let mut bfns = alloc::vec::Vec::new();
        for gfn in 0..2000u64 {
            let req = MapRequest {
                context: ctx,
                domid: if gfn < 64 { GUEST } else { OTHER },
                gfn: Gfn(gfn % 64),
                perms: if gfn < 1000 {
                    Permissions::RW
                } else {
                    Permissions::RO
                },
                attr: MemAttr::WriteBack,
                grant: false,
            };
            bfns.push(e.map(&mut h, DomId::DOM0, &info, &req).unwrap());
        }
        bfns.sort();
        for &b in &bfns[..bfns.len() - 1] {
            e.unmap(&mut h, DomId::DOM0, ctx, b).unwrap();
        }
        e.finish(&mut h, DomId::DOM0);
        let before = driver::SLOTS_DECODED.with(|n| n.get());
        assert_eq!(e.context_destroy_check(DomId::DOM0, ctx), Err(Errno::Busy));
        assert_eq!(
            e.context_destroy(&mut h, DomId::DOM0, ctx),
            Err(Errno::Busy)
        );
        assert_eq!(driver::SLOTS_DECODED.with(|n| n.get()) - before, 0);
        // Once empty, it goes.
        e.unmap(&mut h, DomId::DOM0, ctx, bfns[bfns.len() - 1])
            .unwrap();
        e.finish(&mut h, DomId::DOM0);
        assert_eq!(e.context_destroy(&mut h, DomId::DOM0, ctx), Ok(()));
    }

    /// Each home cell's rough count is the sum of what its driver domain's
    /// cells say they added, and a free cell says it added nothing.
    fn rough_counts_add_up(e: &crate::Engine) {
        let st = e.state();
        for home in 0..MAX_DRIVER_DOMAINS {
            let added: u64 = st
                .guards
                .iter()
                .flatten()
                .filter(|(owned, d)| *owned && d.home as usize == home)
                .map(|(_, d)| d.published_used)
                .sum();
            let shared = e.shared[home].used.load(Ordering::SeqCst);
            assert_eq!(shared, added, "home cell {home}'s rough count");
        }
        for (owned, d) in st.guards.iter().flatten() {
            if !owned {
                assert_eq!(d.published_used, 0, "a free cell still counts");
            }
        }
    }

    /// Review of the per-context cells: a home cell given back idle kept
    /// what it had added to its rough count (a count that fell from 64 to
    /// 4 in one flush adds 4, and the last 4 unmaps are below the slack), and
    /// reused as another domain's context cell it then took that off its
    /// new home's count: each such reuse could lower a driver domain's
    /// count for good, and the quota check trusts a low count.
    #[test]
    fn a_cell_given_back_idle_takes_its_part_off_the_rough_count() {
        let (sim, e) = host();
        map(&sim, &e, DM2, OTHER, 0).unwrap();
        let mut bfns = Vec::new();
        for g in 0..64 {
            bfns.push(map(&sim, &e, DM, GUEST, g).unwrap());
        }
        rough_counts_add_up(&e);
        let mut h = sim.handle(DM);
        for (i, b) in bfns.into_iter().enumerate() {
            e.unmap(&mut h, DM, ContextId::DEFAULT, b).unwrap();
            if i >= 59 {
                e.finish(&mut h, DM);
            }
        }
        assert_eq!(
            e.cell_of(DM, ContextId::DEFAULT),
            None,
            "DM's cell went back"
        );
        rough_counts_add_up(&e);
        // DM2 takes that cell for a context of its own.
        let ctx = e.context_create(&mut sim.handle(DM2), DM2).unwrap();
        rough_counts_add_up(&e);
        let mut h2 = sim.handle(DM2);
        let info = h2.domain_info(DM2).unwrap();
        let req = MapRequest {
            context: ctx,
            domid: OTHER,
            gfn: Gfn(1),
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        let b = e.map(&mut h2, DM2, &info, &req).unwrap();
        e.unmap(&mut h2, DM2, ctx, b).unwrap();
        e.finish(&mut h2, DM2);
        e.context_destroy(&mut h2, DM2, ctx).unwrap();
        rough_counts_add_up(&e);
    }
}
