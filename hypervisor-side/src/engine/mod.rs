//! The engine's state and the operations that change it.
//!
//! # Locks (what protects what)
//!
//! * **Target gates** ([`TargetGate`], one per domid, atomics, no lock):
//!   how many live mappings or in-flight maps point at a domain's pages
//!   (`active`), and a sequence number bumped whenever the domain's p2m loses
//!   a page the engine may have looked up (`seq`). They let the gfn hook of a
//!   domain nobody maps return without touching any lock, and let a map that
//!   looked its page up *without* the engine lock detect that the page left
//!   in between.
//! * **The engine lock** (`state`, a platform lock: a Xen spinlock, or a
//!   `parking_lot` mutex in the simulator): everything in [`EngineState`]:
//!   every driver domain's slots, indices, lists and pending flush, and the
//!   target index.
//!
//! Lock order: `target p2m lock -> engine lock -> IOMMU mapping lock ->
//! heap lock`. The engine never holds its lock across a guest copy,
//! [`Platform::get_page`] or [`Platform::domain_info`] (those take p2m locks),
//! so a hook entered with a p2m lock held can always take the engine lock.
//!
//! # Storage
//!
//! Per driver domain, a slot array indexed by BFN (through [`BfnSpace`]), a
//! dedup index, and lists threaded through the slots (free, unmapping, stuck,
//! revocation notices): O(1) map, unmap, lookup and acknowledge. Across
//! driver domains, the target index (domid, gfn) -> chain of live mappings:
//! O(1) revocation from the gfn hook. Every allocation happens before any
//! state changes and fails with `ENOMEM`; nothing on a hypercall or hook
//! path can panic (`build-engine.sh` proves it for the Xen object).

mod driver;
mod revoke;

use core::sync::atomic::{AtomicU32, Ordering};

use alloc::vec::Vec;
use lock_api::{Mutex, MutexGuard, RawMutex};

pub use driver::{DriverDomain, Mapping, Notice, Slot};
pub use revoke::{GfnChange, Restart};

use crate::bfn_alloc::{BfnSpace, BfnWindow};
use crate::config::{Config, MAX_CONTEXTS, X86_MSI_WINDOW};
use crate::iommu::IommuBackend;
use crate::permission::{check_map, check_page};
use crate::platform::{DomainInfo, Platform, ReservedRange};
use crate::storage::{hash64, try_push, IndexTable};
use crate::{Bfn, ContextId, DomId, Errno, Gfn, Mfn};
use driver::NONE;
use pviommu_abi::{region_kind, MapRequest};

/// Everything the engine needs from the hypervisor.
pub trait Hypervisor: Platform + IommuBackend {}
impl<T: Platform + IommuBackend> Hypervisor for T {}

/// How often a map retries when the target's p2m changed under it.
const MAP_RETRIES: u32 = 4;

/// Per-domid atomics read without the engine lock (see the module docs).
#[derive(Debug, Default)]
pub struct TargetGate {
    active: AtomicU32,
    seq: AtomicU32,
}

/// A packed (owner domid, slot index): a mapping anywhere in the engine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Link {
    owner: DomId,
    slot: u64,
}

impl Link {
    const SLOT_BITS: u32 = 40;
    pub(crate) fn pack(self) -> u64 {
        (self.owner.0 as u64) << Self::SLOT_BITS | (self.slot & ((1 << Self::SLOT_BITS) - 1))
    }
    pub(crate) fn unpack(v: u64) -> Option<Link> {
        (v != NONE).then_some(Link {
            owner: DomId((v >> Self::SLOT_BITS) as u16),
            slot: v & ((1 << Self::SLOT_BITS) - 1),
        })
    }
}

/// The state behind the engine lock.
#[derive(Debug)]
pub struct EngineState {
    /// The boot-time quota (the rest of the configuration and the window
    /// live outside the lock, in [`Engine`]).
    default_quota: u64,
    space: BfnSpace,
    seed: u64,
    /// Few (the control domain and device models): scanned linearly.
    drivers: Vec<DriverDomain>,
    /// (target domid, gfn) -> first live mapping of it; the rest follow
    /// through [`Mapping::next_same_page`].
    target_index: IndexTable,
}

/// The engine: target gates and the locked state. `L` is the platform's
/// lock (a Xen spinlock behind `pvx_engine_lock` inside Xen).
pub struct Engine<L: RawMutex> {
    /// Fixed at boot; read without the lock.
    config: Config,
    window: BfnWindow,
    gates: Vec<TargetGate>,
    state: Mutex<L, EngineState>,
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

impl EngineState {
    /// The usable BFNs, numbered.
    pub fn space(&self) -> &BfnSpace {
        &self.space
    }
    /// A driver domain's state, if it has any.
    pub fn driver(&self, domid: DomId) -> Option<&DriverDomain> {
        self.drivers.iter().find(|d| d.domid == domid)
    }
    /// Every driver domain with state.
    pub fn drivers(&self) -> impl Iterator<Item = &DriverDomain> {
        self.drivers.iter()
    }
    /// Live mappings of `owner` with their BFNs, in BFN-index order.
    pub fn live_mappings(&self, owner: DomId) -> impl Iterator<Item = MappingView> + '_ {
        self.driver(owner).into_iter().flat_map(move |d| {
            d.slots().filter_map(move |(i, s)| match s {
                Slot::Live(m) => Some(MappingView {
                    bfn: self.space.bfn_of(i)?,
                    mapping: *m,
                }),
                _ => None,
            })
        })
    }
    /// Entries in the target index (distinct mapped (domid, gfn) pairs).
    pub fn mapped_pages(&self) -> usize {
        self.target_index.len()
    }
    /// Heap bytes held by the engine's tables.
    pub fn heap_bytes(&self) -> usize {
        self.drivers.capacity() * core::mem::size_of::<DriverDomain>()
            + self.drivers.iter().map(|d| d.heap_bytes()).sum::<usize>()
            + self.target_index.heap_bytes()
    }

    fn driver_pos(&self, domid: DomId) -> Option<usize> {
        self.drivers.iter().position(|d| d.domid == domid)
    }

    /// The driver domain, created (fallibly) on first use.
    fn driver_pos_or_create(&mut self, domid: DomId) -> Result<usize, Errno> {
        if let Some(p) = self.driver_pos(domid) {
            return Ok(p);
        }
        try_push(&mut self.drivers, DriverDomain::new(domid))?;
        Ok(self.drivers.len() - 1)
    }

    fn target_hash(&self, domid: DomId, gfn: Gfn) -> u64 {
        hash64(self.seed, gfn.0, domid.0 as u64)
    }

    fn mapping_at(drivers: &[DriverDomain], link: Link) -> Option<&Mapping> {
        drivers
            .iter()
            .find(|d| d.domid == link.owner)
            .and_then(|d| d.live_at(link.slot))
    }

    /// Head of the chain of live mappings of (domid, gfn).
    fn target_head(&self, domid: DomId, gfn: Gfn) -> Option<Link> {
        let drivers = &self.drivers;
        let v = self.target_index.find(self.target_hash(domid, gfn), |v| {
            Link::unpack(v)
                .and_then(|l| Self::mapping_at(drivers, l))
                .is_some_and(|m| m.domid == domid && m.gfn == gfn)
        })?;
        Link::unpack(v)
    }

    fn reserve_target_entry(&mut self) -> Result<(), Errno> {
        let drivers = &self.drivers;
        let seed = self.seed;
        self.target_index.reserve_one(|v| {
            Link::unpack(v)
                .and_then(|l| Self::mapping_at(drivers, l))
                .map_or(0, |m| hash64(seed, m.gfn.0, m.domid.0 as u64))
        })
    }

    /// Link a freshly installed live mapping into the target index.
    fn target_link(&mut self, link: Link) -> Result<(), Errno> {
        let m = *Self::mapping_at(&self.drivers, link).ok_or(Errno::Inval)?;
        let hash = self.target_hash(m.domid, m.gfn);
        match self.target_head(m.domid, m.gfn) {
            Some(head) => {
                // New mapping becomes the head; the old head follows it.
                let pos = self.driver_pos(link.owner).ok_or(Errno::Inval)?;
                let d = self.drivers.get_mut(pos).ok_or(Errno::Inval)?;
                if let Some(nm) = d.live_at_mut(link.slot) {
                    nm.next_same_page = head.pack();
                }
                let drivers = &self.drivers;
                self.target_index.replace(
                    hash,
                    |v| Link::unpack(v) == Some(head) && Self::mapping_at(drivers, head).is_some(),
                    link.pack(),
                );
                Ok(())
            }
            None => self.target_index.insert(hash, link.pack()),
        }
    }

    /// Unlink a live mapping from the target index (before its slot changes).
    fn target_unlink(&mut self, link: Link) {
        let Some(m) = Self::mapping_at(&self.drivers, link).copied() else {
            return;
        };
        let hash = self.target_hash(m.domid, m.gfn);
        let Some(head) = self.target_head(m.domid, m.gfn) else {
            return;
        };
        if head == link {
            match Link::unpack(m.next_same_page) {
                Some(next) => {
                    let drivers = &self.drivers;
                    self.target_index.replace(
                        hash,
                        |v| {
                            Link::unpack(v) == Some(head)
                                && Self::mapping_at(drivers, head).is_some()
                        },
                        next.pack(),
                    );
                }
                None => {
                    self.target_index.remove(hash, |v| v == head.pack());
                }
            }
            return;
        }
        // Walk the chain to the predecessor. Bounded: a chain holds one
        // entry per (driver domain, context, perms, attr) mapping this page.
        let mut at = head;
        for _ in 0..self
            .drivers
            .len()
            .saturating_mul(MAX_CONTEXTS as usize * 16)
        {
            let Some(cur) = Self::mapping_at(&self.drivers, at).copied() else {
                return;
            };
            let Some(next) = Link::unpack(cur.next_same_page) else {
                return;
            };
            if next == link {
                if let Some(d) = self.drivers.iter_mut().find(|d| d.domid == at.owner) {
                    if let Some(pm) = d.live_at_mut(at.slot) {
                        pm.next_same_page = m.next_same_page;
                    }
                }
                return;
            }
            at = next;
        }
        // A chain longer than one entry per (driver, context, perms, attr)
        // is a corrupted index. Tests catch it here; in Xen it is a stale
        // link to a slot that is no longer Live, which lookups skip.
        debug_assert!(false, "target chain longer than its bound");
    }
}

/// What the locked part of a map did with the attempt's page reference
/// and its share of the target gate.
enum MapOutcome {
    /// A new mapping holds both.
    Installed(Bfn),
    /// An existing mapping of the same frame got one more reference: the
    /// attempt's page reference and gate share are returned by the caller.
    Shared(Bfn),
    /// Nothing happened: the caller returns both.
    Refused(Errno),
    /// Failed after the IOMMU entry existed: the engine took both over and
    /// releases them after the flush. The caller must not touch them.
    Consumed(Errno),
}

enum Prepared {
    Shared(Bfn),
    Reserved(usize),
}

/// The mapping a request asks for, over frame `mfn`.
fn map_key(req: &MapRequest, mfn: Mfn) -> Mapping {
    Mapping {
        gfn: req.gfn,
        mfn,
        next_same_page: NONE,
        refs: 1,
        domid: req.domid,
        context: req.context,
        perms: req.perms,
        attr: req.attr,
    }
}

/// Why a slot was looked up for an unmap.
enum UnmapKind {
    Live,
    Revoked,
}

impl<L: RawMutex> Engine<L> {
    /// An engine for the host `h` describes.
    pub fn new(config: Config, h: &impl Hypervisor) -> Result<Self, Errno> {
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
        let mut gates = Vec::new();
        gates
            .try_reserve_exact(DomId::FIRST_RESERVED as usize)
            .map_err(|_| Errno::NoMem)?;
        for _ in 0..DomId::FIRST_RESERVED {
            try_push(&mut gates, TargetGate::default())?;
        }
        let state = EngineState {
            default_quota: config.quota,
            space,
            seed: h.random_seed(),
            drivers: Vec::new(),
            target_index: IndexTable::new(),
        };
        Ok(Engine {
            config,
            window,
            gates,
            state: Mutex::new(state),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The BFN window and its reserved ranges.
    pub fn window(&self) -> &BfnWindow {
        &self.window
    }

    /// Lock the state, to look at it (tests, stats, the simulator's tools).
    /// Never call an engine operation while holding the guard.
    pub fn state(&self) -> MutexGuard<'_, L, EngineState> {
        self.state.lock()
    }

    fn gate(&self, domid: DomId) -> Option<&TargetGate> {
        self.gates.get(domid.0 as usize)
    }

    /// Live mappings and in-flight maps pointing at `domid`'s pages.
    pub fn target_active(&self, domid: DomId) -> u32 {
        self.gate(domid)
            .map_or(0, |g| g.active.load(Ordering::SeqCst))
    }

    fn gate_leave(&self, domid: DomId) {
        if let Some(g) = self.gate(domid) {
            g.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Map a foreign frame for `caller` (whose facts are `caller_info`).
    /// The same (domid, gfn, context, perms, attr) mapped again returns the
    /// same BFN with one more reference, after checking that the gfn still
    /// points at the mapped frame.
    ///
    /// The page is looked up *without* the engine lock (that takes the
    /// target's p2m lock, which a gfn hook may hold while waiting for the
    /// engine lock). A removal of the same page in between is caught by the
    /// target's sequence number and the map is retried.
    pub fn map(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        caller_info: &DomainInfo,
        req: &MapRequest,
    ) -> Result<Bfn, Errno> {
        check_map(h, caller, caller_info, req.domid)?;
        if req.grant {
            // Designed in the ABI; no backend offers PVIOMMU_FEAT_GRANT yet.
            return Err(Errno::OpNotSupp);
        }
        let caps = h.iommu_caps();
        if caps.features & req.attr.required_feature() != req.attr.required_feature()
            || req.context.0 >= MAX_CONTEXTS
        {
            return Err(Errno::OpNotSupp);
        }
        let gate = self.gate(req.domid).ok_or(Errno::Srch)?;
        for _ in 0..MAP_RETRIES {
            gate.active.fetch_add(1, Ordering::SeqCst);
            let seq = gate.seq.load(Ordering::SeqCst);
            let page = match h.get_page(req.domid, req.gfn, req.perms.write) {
                Ok(p) => p,
                Err(e) => {
                    self.gate_leave(req.domid);
                    return Err(e);
                }
            };
            let checked =
                check_page(page.kind, req.perms).and_then(|()| page.mfn.ok_or(Errno::XDev));
            let mfn = match checked {
                Ok(mfn) => mfn,
                Err(e) => {
                    if let Some(mfn) = page.mfn {
                        h.put_page(mfn, req.perms.write);
                    }
                    self.gate_leave(req.domid);
                    return Err(e);
                }
            };
            let outcome = {
                let mut st = self.state.lock();
                if gate.seq.load(Ordering::SeqCst) != seq {
                    None
                } else {
                    Some(self.map_locked(&mut st, h, caller, req, mfn))
                }
            };
            let done = match outcome {
                // Installed: the mapping keeps the page reference and its
                // share of `active`.
                Some(MapOutcome::Installed(bfn)) => return Ok(bfn),
                // Failed after the IOMMU entry existed: the engine released
                // (or will release, after the flush) what this attempt took.
                Some(MapOutcome::Consumed(e)) => return Err(e),
                Some(MapOutcome::Shared(bfn)) => Some(Ok(bfn)),
                Some(MapOutcome::Refused(e)) => Some(Err(e)),
                // The target's p2m changed under us: look the page up again.
                None => None,
            };
            // Deduplicated, refused or retried: give back what this attempt
            // took.
            h.put_page(mfn, req.perms.write);
            self.gate_leave(req.domid);
            if let Some(result) = done {
                return result;
            }
        }
        Err(Errno::Again)
    }

    /// The locked part of a map: dedup or install.
    fn map_locked(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        caller: DomId,
        req: &MapRequest,
        mfn: Mfn,
    ) -> MapOutcome {
        match self.map_prepare(st, h, caller, req, mfn) {
            Ok(Prepared::Shared(bfn)) => MapOutcome::Shared(bfn),
            Ok(Prepared::Reserved(pos)) => self.map_install(st, h, caller, req, mfn, pos),
            Err(e) => MapOutcome::Refused(e),
        }
    }

    /// Dedup, or check the quota and reserve every byte the install needs.
    /// On `Err` nothing changed (but a stale mapping found on the way).
    fn map_prepare(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        caller: DomId,
        req: &MapRequest,
        mfn: Mfn,
    ) -> Result<Prepared, Errno> {
        let seed = st.seed;
        let pos = st.driver_pos_or_create(caller)?;
        let quota = st
            .drivers
            .get(pos)
            .and_then(|d| d.quota)
            .unwrap_or(st.default_quota);
        let key = map_key(req, mfn);
        {
            let dd = st.drivers.get_mut(pos).ok_or(Errno::Inval)?;
            if !dd.has_context(req.context) {
                return Err(Errno::NoEnt);
            }
            if let Some(idx) = dd.find_key(seed, &key) {
                let bfn = st.space.bfn_of(idx).ok_or(Errno::Inval)?;
                let m = dd.live_at_mut(idx).ok_or(Errno::Inval)?;
                if m.mfn == mfn {
                    m.refs = m.refs.checked_add(1).ok_or(Errno::NoSpc)?;
                    return Ok(Prepared::Shared(bfn));
                }
                // The gfn no longer points at the mapped frame: a removal
                // whose hook has not run yet. Revoke the stale mapping now
                // and map the current frame.
                self.revoke_slot(st, h, pos, idx);
            }
        }
        let limit = quota.min(st.space.len());
        {
            let dd = st.drivers.get_mut(pos).ok_or(Errno::Inval)?;
            if dd.used() >= quota {
                return Err(Errno::NoSpc);
            }
            dd.reserve_slot(seed, limit)?;
        }
        st.reserve_target_entry()?;
        Ok(Prepared::Reserved(pos))
    }

    /// Take a slot, write the IOMMU entry and index the mapping. Nothing
    /// allocates here. Once the IOMMU entry exists, every failure goes
    /// through the unmap-flush-release path (`Consumed`): the page reference
    /// is never dropped while the device may still reach the page.
    fn map_install(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        caller: DomId,
        req: &MapRequest,
        mfn: Mfn,
        pos: usize,
    ) -> MapOutcome {
        let seed = st.seed;
        let key = map_key(req, mfn);
        let Some(dd) = st.drivers.get_mut(pos) else {
            return MapOutcome::Refused(Errno::Inval);
        };
        let idx = match dd.take_slot() {
            Ok(i) => i,
            Err(e) => return MapOutcome::Refused(e),
        };
        let Some(bfn) = st.space.bfn_of(idx) else {
            dd.free_slot(idx);
            return MapOutcome::Refused(Errno::NoSpc);
        };
        if let Err(e) = h.iommu_map(
            caller,
            req.context,
            bfn,
            mfn,
            req.perms,
            req.attr,
            &mut dd.gather,
        ) {
            dd.free_slot(idx);
            return MapOutcome::Refused(e);
        }
        if let Err(e) = dd.install(seed, idx, key) {
            // Unreachable (capacity reserved). The entry exists: take it
            // down the way an unmap does, page released after the flush.
            match h.iommu_unmap(caller, req.context, bfn, &mut dd.gather) {
                Ok(()) => dd.push_unmapping(idx, key, false),
                Err(_) => dd.push_stuck(idx, key),
            }
            self.gate_leave(req.domid);
            return MapOutcome::Consumed(e);
        }
        if let Err(e) = st.target_link(Link {
            owner: caller,
            slot: idx,
        }) {
            // Unreachable too; revoke_slot releases page and gate share.
            self.revoke_slot(st, h, pos, idx);
            return MapOutcome::Consumed(e);
        }
        MapOutcome::Installed(bfn)
    }

    /// The live mapping `bfn` of `context`, without changing anything.
    pub fn lookup(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<Mapping, Errno> {
        let st = self.state.lock();
        let idx = st.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        match st.driver(caller).and_then(|d| d.live_at(idx)) {
            Some(m) if m.context == context => Ok(*m),
            _ => Err(Errno::NoEnt),
        }
    }

    /// What an unmap of `bfn` would do: `Ok(false)` drop a live reference,
    /// `Ok(true)` acknowledge a revocation (answered `ESTALE`).
    pub fn unmap_check(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<bool, Errno> {
        let st = self.state.lock();
        Self::unmap_kind(&st, caller, context, bfn).map(|k| matches!(k, UnmapKind::Revoked))
    }

    fn unmap_kind(
        st: &EngineState,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<UnmapKind, Errno> {
        let idx = st.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        match st.driver(caller).and_then(|d| d.slot(idx)) {
            Some(Slot::Live(m)) if m.context == context => Ok(UnmapKind::Live),
            Some(Slot::Revoked { notice, .. }) if notice.context == context => {
                Ok(UnmapKind::Revoked)
            }
            // Being revoked right now: the notice follows the flush.
            Some(
                Slot::Unmapping {
                    mapping,
                    then_revoked: true,
                    ..
                }
                | Slot::Stuck { mapping, .. },
            ) if mapping.context == context => Err(Errno::Busy),
            _ => Err(Errno::NoEnt),
        }
    }

    /// Drop one reference to `bfn`; the last one unmaps it. For a revoked
    /// BFN this acknowledges the revocation, releases the BFN and answers
    /// `Err(Stale)`. The page is released at [`finish`](Self::finish).
    pub fn unmap(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        let mut st = self.state.lock();
        let kind = Self::unmap_kind(&st, caller, context, bfn)?;
        let idx = st.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        let pos = st.driver_pos(caller).ok_or(Errno::NoEnt)?;
        let seed = st.seed;
        if let UnmapKind::Revoked = kind {
            let dd = st.drivers.get_mut(pos).ok_or(Errno::NoEnt)?;
            dd.ack_revoked(idx)?;
            dd.compact_if_empty();
            return Err(Errno::Stale);
        }
        {
            let dd = st.drivers.get_mut(pos).ok_or(Errno::NoEnt)?;
            let m = dd.live_at_mut(idx).ok_or(Errno::NoEnt)?;
            if m.refs > 1 {
                m.refs -= 1;
                return Ok(());
            }
            // Unmap first: if the IOMMU refuses (no memory to split a
            // superpage), nothing has changed and the caller may retry.
            h.iommu_unmap(caller, context, bfn, &mut dd.gather)?;
        }
        let domid = {
            st.target_unlink(Link {
                owner: caller,
                slot: idx,
            });
            let dd = st.drivers.get_mut(pos).ok_or(Errno::NoEnt)?;
            let m = dd.unindex(seed, idx).ok_or(Errno::NoEnt)?;
            dd.push_unmapping(idx, m, false);
            m.domid
        };
        drop(st);
        self.gate_leave(domid);
        Ok(())
    }

    /// Acknowledge a revoked BFN (`REVOKED_ACK`).
    pub fn revoked_ack(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<(), Errno> {
        let mut st = self.state.lock();
        let idx = st.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        let pos = st.driver_pos(caller).ok_or(Errno::NoEnt)?;
        let dd = st.drivers.get_mut(pos).ok_or(Errno::NoEnt)?;
        match dd.slot(idx) {
            Some(Slot::Revoked { notice, .. }) if notice.context == context => {
                let r = dd.ack_revoked(idx).map(|_| ());
                dd.compact_if_empty();
                r
            }
            _ => Err(Errno::NoEnt),
        }
    }

    /// The oldest unacknowledged revocation of `caller`: (BFN, notice).
    pub fn revoked_next(&self, caller: DomId) -> Result<(Bfn, Notice), Errno> {
        let st = self.state.lock();
        let (idx, n) = st
            .driver(caller)
            .and_then(|d| d.oldest_revoked())
            .ok_or(Errno::NoEnt)?;
        Ok((st.space.bfn_of(idx).ok_or(Errno::NoEnt)?, n))
    }

    /// (quota, used, revoked) of `caller`.
    pub fn usage(&self, caller: DomId) -> (u64, u64, u64) {
        let st = self.state.lock();
        let d = st.driver(caller);
        (
            d.and_then(|d| d.quota).unwrap_or(st.default_quota),
            d.map_or(0, |d| d.used()),
            d.map_or(0, |d| d.revoked()),
        )
    }

    /// The toolstack sets `domid`'s BFN quota (`None`: back to the boot
    /// default). Lowering it below what the domain holds refuses its new
    /// maps until it is back under; nothing is revoked. The caller has been
    /// checked to be the control domain.
    ///
    /// The domain is looked up without the engine lock, so its death could
    /// land in between and leave a quota behind for a later domain with the
    /// same id. Teardown moves the domain's sequence number under the lock
    /// before anything else: seen moved here, the lookup is redone.
    pub fn set_quota(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        quota: Option<u64>,
    ) -> Result<(), Errno> {
        if quota.is_some_and(|q| q > crate::config::MAX_QUOTA) {
            return Err(Errno::Inval);
        }
        let gate = self.gate(domid).ok_or(Errno::Srch)?;
        for _ in 0..MAP_RETRIES {
            let seq = gate.seq.load(Ordering::SeqCst);
            match h.domain_info(domid) {
                Some(d) if !d.dying => {}
                _ => return Err(Errno::Srch),
            }
            let mut st = self.state.lock();
            if gate.seq.load(Ordering::SeqCst) != seq {
                continue;
            }
            let pos = match (st.driver_pos(domid), quota) {
                (Some(p), _) => p,
                // Nothing to reset on a domain that never mapped.
                (None, None) => return Ok(()),
                (None, Some(_)) => st.driver_pos_or_create(domid)?,
            };
            if let Some(dd) = st.drivers.get_mut(pos) {
                dd.quota = quota;
            }
            return Ok(());
        }
        Err(Errno::Again)
    }

    /// Create a context for `caller`.
    pub fn context_create(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
    ) -> Result<ContextId, Errno> {
        let max = h.iommu_caps().max_contexts.min(MAX_CONTEXTS);
        if max <= 1 {
            return Err(Errno::OpNotSupp);
        }
        let mut st = self.state.lock();
        let pos = st.driver_pos_or_create(caller)?;
        let dd = st.drivers.get_mut(pos).ok_or(Errno::Inval)?;
        let id = (1..max)
            .map(ContextId)
            .find(|c| !dd.has_context(*c))
            .ok_or(Errno::NoSpc)?;
        h.context_create(caller, id)?;
        dd.contexts |= 1 << id.0;
        Ok(id)
    }

    /// Check that `context` of `caller` can be destroyed: it exists, is not
    /// the default, and holds no BFN in any state.
    pub fn context_destroy_check(&self, caller: DomId, context: ContextId) -> Result<(), Errno> {
        let st = self.state.lock();
        Self::destroy_check_locked(&st, caller, context)
    }

    fn destroy_check_locked(
        st: &EngineState,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        let dd = st.driver(caller).ok_or(Errno::NoEnt)?;
        if context == ContextId::DEFAULT || !dd.has_context(context) {
            return Err(Errno::NoEnt);
        }
        let busy = dd.slots().any(|(_, s)| match s {
            Slot::Free { .. } => false,
            Slot::Live(m) | Slot::Unmapping { mapping: m, .. } | Slot::Stuck { mapping: m, .. } => {
                m.context == context
            }
            Slot::Revoked { notice, .. } => notice.context == context,
        });
        if busy {
            return Err(Errno::Busy);
        }
        Ok(())
    }

    /// Destroy an empty context.
    pub fn context_destroy(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        let mut st = self.state.lock();
        Self::destroy_check_locked(&st, caller, context)?;
        h.context_destroy(caller, context);
        if let Some(pos) = st.driver_pos(caller) {
            if let Some(dd) = st.drivers.get_mut(pos) {
                dd.contexts &= !(1 << context.0);
            }
        }
        Ok(())
    }

    /// Flush the IOTLB for everything `caller` has gathered, then release
    /// the page references of unmapped pages (the device cannot reach them
    /// any more) and retry revocations the IOMMU refused before.
    pub fn finish(&self, h: &mut impl Hypervisor, caller: DomId) {
        let mut st = self.state.lock();
        if let Some(pos) = st.driver_pos(caller) {
            Self::flush_and_release(&mut st, h, pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_round_trips() {
        let l = Link {
            owner: DomId(0x7fef),
            slot: (1 << 40) - 2,
        };
        assert_eq!(Link::unpack(l.pack()), Some(l));
        assert_eq!(Link::unpack(NONE), None);
    }
}
