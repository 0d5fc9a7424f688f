//! Maps and unmaps of 2 MiB extents (ABI 1.6, [`op_flags::EXTENT_2M`]).
//!
//! A mediator that shadows a guest's 2 MiB GPU page wants one run of BFNs
//! it can write as one 2 MiB shadow entry: 512 in a row, on a 2 MiB
//! boundary. 512 page maps get that only as a preference (a run's BFNs
//! follow each other when the slots are free, `Engine::slot_wanted`); an
//! extent map gets it or fails, with nothing changed.
//!
//! Each page of an extent is a mapping of its own (its slot, its
//! reference, its revocation), so everything after the map (an unmap of
//! one of its BFNs, the gfn hooks, a teardown, the flush) is what it is for
//! page maps. What an extent saves is the per-op work of 512 maps: the
//! checks, the gate, the lock, the quota and the reservations are made
//! once, its books are one extent record instead of 512 page-index
//! entries (`driver::ExtentRecord`: a lookup by gfn finds its pages
//! through it), and its IOMMU entries go to the host as one run (in
//! context 0 one superpage entry where Xen folds it).
//!
//! The frames must be one run of machine frames, as Linux's GVT-g asks of
//! a 2 MiB DMA map (`gvt_pin_guest_page()`): only then can the IOMMU map
//! the 512 entries as one superpage, and only then does the map carry one
//! frame number, not 512, from the page lookups (made with no engine lock
//! held: a target's p2m lock comes before a cell's) to the install. A
//! caller learns from `EXDEV` that an extent of a domain it may map is not
//! one machine run, never which frames it has.
//!
//! [`op_flags::EXTENT_2M`]: pviommu_abi::op_flags::EXTENT_2M

use core::sync::atomic::Ordering;

use lock_api::RawMutex;
use pviommu_abi::{extent_aligned, Gfn, MapRequest, EXTENT_PAGES};

use super::driver::region_of;
use super::driver::PendingMap;
use super::map::{map_key, LookedUp};
use super::revoke::DEFER_LIMIT;
use super::unmap::UnmapKind;
use super::{Driver, Engine, Hypervisor, Mapped, TargetGate};
use super::{DriverDomain, Mapping, MAP_RETRIES};
use crate::permission::Caller;
use crate::platform::{DomainInfo, PageSlot};
use crate::{Bfn, ContextId, DomId, Errno, Mfn};

/// The last page of an extent, from its first.
const LAST: u64 = EXTENT_PAGES - 1;

/// Pages an extent's lookup asks the host for in one call
/// ([`Platform::get_pages`](crate::platform::Platform::get_pages)): their
/// frames wait on the engine's stack, which is small in Xen.
const EXTENT_RUN_LOOKUP: usize = 16;

/// An extent map's result: the first BFN with its install's tag (the
/// first page's; the others' follow it), and whether the extent was
/// mapped already and shared, for [`Engine::map_extent_undo`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ExtentMapped {
    /// The first BFN (on a 2 MiB boundary) and the first page's tag.
    pub mapped: Mapped,
    /// `Some(last)`: the extent's pages were mapped already, at these BFNs,
    /// and each got a reference more; `last` is the generation of the
    /// cell's last install then, so the undo tells the mappings it shared
    /// (installed no later) from ones made since at the same BFNs.
    pub shared: Option<u32>,
}

/// Page `i` of the extent `req` asks for.
#[inline(always)]
fn page_of(req: &MapRequest, i: u64) -> MapRequest {
    MapRequest {
        gfn: Gfn(req.gfn.0 + i),
        ..*req
    }
}

/// Page `i` of the extent `req` asks for, and its mapping's key over its
/// frame (`first_mfn` + `i`).
#[inline(always)]
fn page_key(req: &MapRequest, first_mfn: Mfn, i: u64) -> (MapRequest, Mapping) {
    let page = page_of(req, i);
    (page, map_key(&page, Mfn(first_mfn.0 + i)))
}

impl<L: RawMutex> Engine<L> {
    /// Map the 2 MiB extent of `req.domid` from `req.gfn` (a multiple of
    /// 512, no grant) into `req.context` at 512 consecutive BFNs from the
    /// one answered, a multiple of 512: all of it, or nothing (but a stale
    /// mapping found on the way, revoked as a page map would). `EXDEV`:
    /// its frames are not one machine run; `EBUSY`: some of its pages are
    /// mapped in the context already, not as this extent; `ENOSPC`: over
    /// the quota, or no free aligned run of 512 BFNs.
    ///
    /// The protocol is a page map's ([`map`](Self::map)), for 512 pages
    /// at once: checks, the gate joined for all of them, the lookups with
    /// no lock held, the cell's lock, the target's number read again, and
    /// the install, which writes the books first and the IOMMU entries
    /// last.
    pub fn map_extent(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        caller_info: &DomainInfo,
        req: &MapRequest,
    ) -> Result<ExtentMapped, Errno> {
        self.map_extent_in(h, &Caller::new(caller, caller_info), req)
    }

    /// [`map_extent`](Self::map_extent) as an op of `caller`'s call (the
    /// policy's refusals so far in it are not asked again).
    pub(crate) fn map_extent_in(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        req: &MapRequest,
    ) -> Result<ExtentMapped, Errno> {
        if !extent_aligned(req.gfn.0) || req.gfn.0 > u64::MAX - EXTENT_PAGES || req.grant {
            return Err(Errno::Inval);
        }
        let caps = h.iommu_caps();
        for _ in 0..MAP_RETRIES {
            let checked_seq = self.checked_seq(req.domid);
            let gate = self.map_checks(h, caller, req, &caps, false)?;
            // As for a page map: the checks are resolved before any lookup.
            crate::nospec::block_speculation();
            gate.active.fetch_add(EXTENT_PAGES as u32, Ordering::SeqCst);
            let (first_mfn, ns) = match self.look_up_extent(h, req, gate, &caps, checked_seq) {
                (LookedUp::Page(mfn), ns) => (mfn, ns),
                // (Nothing held.)
                (LookedUp::Moved, _) => continue,
                (LookedUp::Refused(e), _) => return Err(e),
            };
            let mut d = match self.lock_for_map(caller.id, req.context) {
                Ok(d) => d,
                Err(e) => {
                    self.give_back_extent(h, req, first_mfn, 0);
                    return Err(e);
                }
            };
            d.dd.stats.ns_get_page += ns;
            // Mark, then re-read the target's number (see `map`).
            let newly = self.set_gate_bit(d.cell, req.domid, true);
            let locked = (gate.seq.load(Ordering::SeqCst) == checked_seq)
                .then(|| self.map_extent_locked(&mut d, h, req, first_mfn));
            // What the map kept of the lookups' references and shares.
            let (result, kept) = match locked {
                Some(Ok(m)) => {
                    // (A stale mapping revoked on the way may have been the
                    // cell's last page of the target: the bit stays.)
                    self.set_gate_bit(d.cell, req.domid, true);
                    if m.shared.is_some() {
                        d.dd.stats.shared += EXTENT_PAGES;
                        (Some(Ok(m)), 0)
                    } else {
                        d.dd.stats.maps += EXTENT_PAGES;
                        (Some(Ok(m)), EXTENT_PAGES)
                    }
                }
                Some(Err((e, 0))) => {
                    self.undo_gate_bit(d.cell, &d.dd, req.domid, newly);
                    (Some(Err(e)), 0)
                }
                // Failed once some entries existed: those wait for the
                // flush, entries of the target.
                Some(Err((e, consumed))) => {
                    self.clear_gate_bit_if_unused(d.cell, &d.dd, req.domid);
                    (Some(Err(e)), consumed)
                }
                None => {
                    self.undo_gate_bit(d.cell, &d.dd, req.domid, newly);
                    (None, 0)
                }
            };
            // (Stale mappings revoked on the way, up to 512: as in
            // `map_batch`.)
            if d.dd.deferred_entries >= DEFER_LIMIT {
                self.clear_deferred_entries_mid_call(&mut d.dd, h);
            }
            self.put_driver(d);
            self.give_back_extent(h, req, first_mfn, kept);
            if let Some(result) = result {
                return result;
            }
        }
        Err(Errno::Again)
    }

    /// Look up the extent's 512 pages, its gate's shares joined for all
    /// of them, each as [`look_up_joined`](Self::look_up_joined) looks up a
    /// page: the first page's frame when every page is referenced and
    /// their frames are one run; otherwise what stopped it, with nothing
    /// held. Bounded: at most 512 runs of pages looked up together and 512
    /// pages looked up alone (each round takes a page, or stops); 32 runs
    /// where the host takes each run whole. Always inlined: the object's check
    /// wants the speculation barrier before a function's first lookup in
    /// that function's own text (`lib/engine-barrier.sh`).
    #[inline(always)]
    fn look_up_extent(
        &self,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        gate: &TargetGate,
        caps: &crate::iommu::BackendCaps,
        checked_seq: u32,
    ) -> (LookedUp, u64) {
        let mut ns = 0;
        let mut first = Mfn(0);
        let mut run = [PageSlot::default(); EXTENT_RUN_LOOKUP];
        // Pages before `i` are referenced, from frame `first` on.
        let mut i = 0;
        // (Bounded: each round takes at least one page, or stops.)
        let stop = loop {
            if i >= EXTENT_PAGES {
                return (LookedUp::Page(first), ns);
            }
            // The pages from `i` on by runs, as many as the host takes in
            // one call. A page a run stops at is refused if the run looked
            // it up; else it goes alone, and its own lookup says why (or
            // finds it after all).
            let want = (EXTENT_PAGES - i).min(EXTENT_RUN_LOOKUP as u64) as usize;
            let page = page_of(req, i);
            let (got, refused, t) = match run.get_mut(..want) {
                Some(pages) => {
                    for (k, slot) in (0..).zip(pages.iter_mut()) {
                        *slot = PageSlot::asking(Gfn(page.gfn.0 + k));
                    }
                    self.look_up_run(h, &page, gate, checked_seq, pages)
                }
                None => (0, None, 0),
            };
            ns += t;
            // (A page the run refused is not looked up again: below.)
            if got == 0 && refused.is_none() {
                let (looked_up, t) = self.look_up_joined(h, &page, gate, caps, checked_seq);
                ns += t;
                match looked_up {
                    LookedUp::Page(mfn) if i == 0 || first.0.checked_add(i) == Some(mfn.0) => {
                        first = if i == 0 { mfn } else { first };
                        i += 1;
                        continue;
                    }
                    LookedUp::Page(mfn) => {
                        h.put_page(mfn, req.perms.write);
                        self.gate_leave_many(req.domid, 1);
                        break LookedUp::Refused(Errno::XDev);
                    }
                    // (Its share given back.)
                    other => break other,
                }
            }
            // (Always `Some`: `look_up_run` caps `got` at the slots asked
            // for. Were it not, the round would take nothing: it stops.)
            let Some(taken) = run.get(..got) else {
                self.gate_leave_many(req.domid, 1);
                break LookedUp::Refused(Errno::XDev);
            };
            if i == 0 {
                first = taken.first().map_or(first, |p| p.mfn());
            }
            // A frame off the run from `first`: those from it on go back.
            let off = taken
                .iter()
                .enumerate()
                .position(|(k, p)| first.0.checked_add(i + k as u64) != Some(p.mfn().0));
            let kept = off.unwrap_or(taken.len());
            for p in taken.iter().skip(kept) {
                h.put_page(p.mfn(), req.perms.write);
            }
            if req.perms.write && !Self::snooped(caps, req) {
                for p in taken.iter().take(kept) {
                    h.note_non_coherent_write(p.mfn());
                }
            }
            i += kept as u64;
            if off.is_some() {
                // The share of the page at `i` (the one off the run).
                self.gate_leave_many(req.domid, 1);
                break LookedUp::Refused(Errno::XDev);
            }
            if let Some(e) = refused {
                // The page at `i`, after the run's (or the run's first),
                // refused by the run's own lookup: not looked up again.
                // (The share of the page at `i`.)
                self.gate_leave_many(req.domid, 1);
                break LookedUp::Refused(e);
            }
        };
        // Pages before `i` are referenced; the shares of those and of the
        // pages after `i` are still joined.
        for j in 0..i {
            h.put_page(Mfn(first.0 + j), req.perms.write);
        }
        self.gate_leave_many(req.domid, LAST);
        (stop, ns)
    }

    /// Give back the lookups' page references and gate shares of the
    /// extent's pages from `from` on (those before it the map kept).
    fn give_back_extent(&self, h: &mut impl Hypervisor, req: &MapRequest, first: Mfn, from: u64) {
        for i in from..EXTENT_PAGES {
            h.put_page(Mfn(first.0 + i), req.perms.write);
        }
        self.gate_leave_many(req.domid, EXTENT_PAGES - from);
    }

    /// Leave `domid`'s gate `n` times at once.
    pub(crate) fn gate_leave_many(&self, domid: DomId, n: u64) {
        if let Some(g) = self.gate(domid) {
            g.active.fetch_sub(n as u32, Ordering::SeqCst);
        }
    }

    /// The locked part of an extent map, its pages referenced from frame
    /// `first_mfn` on: share the extent if the context maps all of it
    /// there already, else install it whole. `Err((error, n))`: refused;
    /// the first `n` pages' entries existed and wait for the flush, which
    /// releases their references and shares (`n` is 0 but for an IOMMU
    /// that refused an entry of one of the engine's own contexts).
    fn map_extent_locked(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        first_mfn: Mfn,
    ) -> Result<ExtentMapped, (Errno, u64)> {
        if d.dd.context != req.context || !d.dd.has_context(req.context) {
            return Err((Errno::NoEnt, 0));
        }
        let seed = self.seed;
        // 1. Dedup, as a page map dedups each page (same target, gfn,
        //    context, access and attribute): an extent whose first page the
        //    context maps already can only be shared whole (at one run) or
        //    refused. A mapping of a frame the gfn no longer has is a
        //    removal whose hook has not run yet: revoked now, as a page map
        //    revokes it. The other pages are looked at in 3.
        if let Some((idx, m)) = self.mapped_page(d, req, first_mfn, 0) {
            if m.mfn == first_mfn {
                return self
                    .share_extent(d, req, first_mfn, idx)
                    .ok_or((Errno::Busy, 0));
            }
            self.revoke_slot(d, h, idx);
        }
        // 2. Everything the install needs, before anything changes: the
        //    quota, room for the run's maps to wait (context 0), the slots.
        let quota = self.quota_of(d);
        if self.over_quota_by(d, quota, EXTENT_PAGES) {
            return Err((Errno::NoSpc, 0));
        }
        let deferred = req.context == ContextId::DEFAULT;
        if deferred {
            d.dd.reserve_pending_maps(DEFER_LIMIT as usize)
                .map_err(|e| (e, 0))?;
            // The run's maps wait together: those waiting are written
            // first if the run would take the list past its limit.
            if d.dd.pending_maps.len() as u64 + EXTENT_PAGES > DEFER_LIMIT {
                self.write_pending_entries_mid_call(d, h);
            }
        }
        // The slot array may hold up to 511 free slots more than the
        // quota: those an extent skipped to start on a 2 MiB boundary
        // (the quota counts the BFNs in use, checked above). A Live record
        // owns a block of those slots.
        let limit = quota.saturating_add(LAST).min(self.space.len());
        d.dd.reserve_extent(seed, limit / EXTENT_PAGES + 1)
            .map_err(|e| (e, 0))?;
        // 3. No other page of the extent may be mapped in the context
        //    already (page 0 was looked at in 1.): one over its current
        //    frame refuses the extent, one over a stale frame is revoked,
        //    as a page map revokes it. Skipped when the cell has no record
        //    of this extent and the region counts say it maps no page of
        //    the target on its own in the extent's 64 MiB (only records of
        //    other extents, say: a mediator maps a guest's 2 MiB pages one
        //    extent after another).
        let may_map = d.dd.extent_first(seed, req.domid, req.gfn).is_some()
            || region_of(req.gfn.0).is_none_or(|r| d.dd.may_map_pages_in(seed, req.domid, r));
        if may_map {
            for i in 1..EXTENT_PAGES {
                if let Some((idx, m)) = self.mapped_page(d, req, first_mfn, i) {
                    if m.mfn.0 == first_mfn.0 + i {
                        return Err((Errno::Busy, 0));
                    }
                    self.revoke_slot(d, h, idx);
                }
            }
        }
        // 4. The books: one extent record, its 512 pages Live in one
        //    aligned block of slots (no page-index entry each). Nothing
        //    changes on a failure.
        let (first, first_bfn) =
            d.dd.take_extent_slots(&self.space, limit)
                .map_err(|e| (e, 0))?;
        let (_, key) = page_key(req, first_mfn, 0);
        let tag = match d.dd.install_extent(seed, first, &key) {
            Ok(tag) => tag,
            Err(e) => {
                for j in 0..EXTENT_PAGES {
                    d.dd.free_slot(first + j);
                }
                return Err((e, 0));
            }
        };
        d.dd.run_hint = (req.domid, Gfn(req.gfn.0 + LAST), first + LAST);
        // 5. The IOMMU entries: in context 0 written together by the
        //    flush that ends the call (one run, `write_pending_entries`);
        //    in the engine's own tables now: one superpage entry where the
        //    frames are on a 2 MiB boundary, else 512 entries.
        if deferred {
            for i in 0..EXTENT_PAGES {
                let pending = PendingMap {
                    slot: (first + i) as u32,
                    gen: tag.wrapping_add(i as u32),
                };
                // (Room made above: never refused, nothing allocated.)
                let pushed = crate::storage::try_push(&mut d.dd.pending_maps, pending);
                // (Were it refused, the page would be mapped nowhere: a
                // device given the BFN faults, it reaches nothing.)
                debug_assert!(pushed.is_ok(), "room for an extent's waiting maps");
            }
            if d.dd.pending_maps.len() as u64 >= DEFER_LIMIT {
                self.write_pending_entries_mid_call(d, h);
            }
        } else {
            let t0 = self.clock(h);
            let whole =
                d.dd.iommu_map_extent(h, req.context, first_bfn, first_mfn, req.perms, req.attr);
            d.dd.stats.ns_iommu_map += self.since(h, t0);
            let by_pages = match whole {
                Ok(done) => !done,
                Err(e) => {
                    self.take_back_extent(d, h, first, 0);
                    return Err((e, 0));
                }
            };
            if by_pages {
                self.map_extent_pages(d, h, req, (first, first_bfn), first_mfn)?;
            }
        }
        Ok(ExtentMapped {
            mapped: Mapped::new(first_bfn, tag, d.cell),
            shared: None,
        })
    }

    /// The entries of an extent installed from slot `first` at `first_bfn`,
    /// in one of the engine's own contexts that could not take it as one
    /// superpage entry: page by page. `Err((error, n))`: the IOMMU refused
    /// page `n`; the extent is taken back (the first `n` entries wait for
    /// the flush).
    fn map_extent_pages(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        (first, first_bfn): (u64, Bfn),
        first_mfn: Mfn,
    ) -> Result<(), (Errno, u64)> {
        for i in 0..EXTENT_PAGES {
            let t0 = self.clock(h);
            let mapped = d.dd.iommu_map(
                h,
                req.context,
                Bfn(first_bfn.0 + i),
                Mfn(first_mfn.0 + i),
                req.perms,
                req.attr,
            );
            d.dd.stats.ns_iommu_map += self.since(h, t0);
            if let Err(e) = mapped {
                self.take_back_extent(d, h, first, i);
                return Err((e, i));
            }
        }
        Ok(())
    }

    /// The live mapping, in the locked cell `d`, with the dedup key of page
    /// `i` of the extent `req` asks for (over its frame, `first_mfn` + `i`).
    #[inline(always)]
    fn mapped_page(
        &self,
        d: &Driver<'_, L>,
        req: &MapRequest,
        first_mfn: Mfn,
        i: u64,
    ) -> Option<(u64, Mapping)> {
        let (page, key) = page_key(req, first_mfn, i);
        let at = d.dd.probe_page(self.seed, page.domid, page.gfn);
        let idx = d.dd.find_key_at(self.seed, &at, &key)?;
        Some((idx, d.dd.live_at(idx)?))
    }

    /// One more reference to each page of the extent, if the context maps
    /// all of it, over its current frames, at one aligned run of BFNs from
    /// slot `first` (its first page's); `None` (nothing changed) otherwise.
    /// Bounded: 512 probes.
    fn share_extent(
        &self,
        d: &mut Driver<'_, L>,
        req: &MapRequest,
        first_mfn: Mfn,
        first: u64,
    ) -> Option<ExtentMapped> {
        let bfn = self.space.aligned_run_at(first, EXTENT_PAGES)?;
        for i in 0..EXTENT_PAGES {
            let (idx, m) = self.mapped_page(d, req, first_mfn, i)?;
            if idx != first + i || m.mfn.0 != first_mfn.0 + i || m.refs == u32::MAX {
                return None;
            }
        }
        let mut tag = 0;
        for i in 0..EXTENT_PAGES {
            let idx = first + i;
            if let Some(m) = d.dd.live_at(idx) {
                d.dd.set_refs(idx, m.refs + 1);
                if i == 0 {
                    tag = m.gen;
                }
            }
        }
        Some(ExtentMapped {
            mapped: Mapped::new(bfn, tag, d.cell),
            shared: Some(d.dd.next_gen),
        })
    }

    /// An engine context's IOMMU refused the entry of page `failed` of an
    /// extent installed from slot `first`: the pages before it have
    /// entries, and go as unmaps go (cleared and released after the
    /// flush); the rest never had one, and leave the books and their slots.
    fn take_back_extent(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        first: u64,
        failed: u64,
    ) {
        let seed = self.seed;
        if d.dd.deferred_entries + failed > DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        for i in 0..EXTENT_PAGES {
            let idx = first + i;
            let _ = d.dd.unindex(seed, idx);
            if i < failed {
                d.dd.push_unmapping_at(idx, false, true);
            } else {
                d.dd.free_slot(idx);
            }
        }
    }

    /// Undo an extent map whose result could not be reported to the
    /// caller: drop the reference it took to each of its pages, if that
    /// page's mapping is still the one it made or shared. Installed: the
    /// mapping of its install (their tags follow each other). Shared: the
    /// mapping of the same page and request installed no later than the
    /// share (the first page's by its tag): one made since at the same BFN
    /// (the page revoked, acknowledged and mapped again by another vCPU
    /// of the caller, which the free list hands the same slot) is someone
    /// else's. Anything else is left alone, as
    /// [`unmap_undo`](Self::unmap_undo) leaves it. A reference dropped is
    /// an unmap ([`unmap_locked`](Self::unmap_locked)): the entries of the
    /// last ones are cleared by the flush that ends the call, a run at a
    /// time (no split of a superpage the maps made).
    pub fn map_extent_undo(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        req: &MapRequest,
        done: ExtentMapped,
    ) {
        let Some(first) = self.space.index_of(done.mapped.bfn) else {
            return;
        };
        let Some(mut d) = self.lock_cell(caller, req.context) else {
            return;
        };
        if !done.mapped.made_in(d.cell) {
            self.put_driver(d);
            return;
        }
        if d.dd.deferred_entries + EXTENT_PAGES > DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        let now = d.dd.next_gen;
        for i in 0..EXTENT_PAGES {
            let Some(idx) = first.checked_add(i).and_then(|i| d.dd.guest_slot(i)) else {
                break;
            };
            let tag = done.mapped.tag.wrapping_add(i as u32);
            let ours = |m: &Mapping| {
                m.context == req.context
                    && match done.shared {
                        None => m.gen == tag,
                        // Installed at or before `last`: no later than the
                        // share (wrap-safe while fewer than 2^32 installs
                        // come between the share and this undo; one shared
                        // more than 2^32 installs before may fail it, and
                        // keeps a reference too many: the caller's own page,
                        // within its quota).
                        Some(last) => {
                            m.domid == req.domid
                                && m.gfn.0 == req.gfn.0 + i
                                && m.perms == req.perms
                                && m.attr == req.attr
                                && now.wrapping_sub(m.gen) >= now.wrapping_sub(last)
                                && (i > 0 || m.gen == tag)
                        }
                    }
            };
            if d.dd.live_at(idx).is_some_and(|m| ours(&m)) {
                let _ = self.unmap_locked(&mut d, req.context, idx);
            }
        }
        if d.dd.deferred_entries >= DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        self.put_driver(d);
    }

    /// The first slot of the extent of BFNs from `bfn` in `context`, and
    /// whether any of them is revoked: `Err` unless every one is a mapping
    /// of the context or a revoked BFN of it (as an unmap checks one).
    fn extent_to_unmap(
        &self,
        dd: &DriverDomain,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<(u64, bool), Errno> {
        if !extent_aligned(bfn.0) {
            return Err(Errno::Inval);
        }
        let first = self.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        if self.space.aligned_run_at(first, EXTENT_PAGES) != Some(bfn) {
            return Err(Errno::NoEnt);
        }
        // The guest's index, clamped under speculation like each page's:
        // what is returned indexes slots (`unmap_whole_extent`).
        let first = dd.guest_slot(first).ok_or(Errno::NoEnt)?;
        let mut revoked = false;
        for i in 0..EXTENT_PAGES {
            let idx = dd.guest_slot(first + i).ok_or(Errno::NoEnt)?;
            revoked |= matches!(Self::unmap_kind(dd, context, idx)?, UnmapKind::Revoked);
        }
        Ok((first, revoked))
    }

    /// [`unmap_extent`](Self::unmap_extent)'s check, changing nothing:
    /// whether it would answer `ESTALE` (`Ok(true)`), or its error.
    pub fn unmap_extent_check(
        &self,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<bool, Errno> {
        let d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        self.extent_to_unmap(&d.dd, context, bfn).map(|(_, r)| r)
    }

    /// Drop a reference to each of the 512 BFNs from `bfn` (a multiple of
    /// 512) in `context`, as 512 unmaps under one lock, after checking
    /// them all: nothing is done unless each is a mapping of the context
    /// or a revoked BFN (acknowledged here: `Ok(true)`, which the op
    /// reports as `ESTALE`). The BFNs need not be one extent map's.
    pub fn unmap_extent(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<bool, Errno> {
        let mut d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        let result = self.extent_to_unmap(&d.dd, context, bfn);
        if let Ok((first, _)) = result {
            // The entries left for the flush stay within `DEFER_LIMIT`.
            if d.dd.deferred_entries + EXTENT_PAGES > DEFER_LIMIT {
                self.clear_deferred_entries_mid_call(&mut d.dd, h);
            }
            // The usual case, one extent map's record unmapped whole, in
            // one step; anything else page by page.
            if !d.dd.unmap_whole_extent(self.seed, first) {
                for i in 0..EXTENT_PAGES {
                    // (Checked under this lock: unmapped, or acknowledged.)
                    let _ = self.unmap_locked(&mut d, context, first + i);
                }
            }
        }
        if d.dd.deferred_entries >= DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        self.put_driver(d);
        result.map(|(_, revoked)| revoked)
    }
}
