//! Unmaps, and what the owner hears of revocations: an unmap drops a
//! reference, the last one takes the mapping out of the books and leaves
//! its IOMMU entry and page to the flush that ends the call (`revoke.rs`);
//! an unmap of a revoked BFN acknowledges its notice. Locks: see the
//! module above.

use lock_api::RawMutex;

use super::driver::{DriverDomain, Mapping, Notice, Slot, NONE};
use super::{revoke, Driver, Engine, Hypervisor, Mapped, MAP_CHUNK};
use crate::{Bfn, ContextId, DomId, Errno};

/// Why a slot was looked up for an unmap.
pub(super) enum UnmapKind {
    Live,
    Revoked,
}

impl<L: RawMutex> Engine<L> {
    /// The live mapping `bfn` of `context`, without changing anything.
    pub fn lookup(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<Mapping, Errno> {
        let idx = self.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        let d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        let idx = d.dd.guest_slot(idx).ok_or(Errno::NoEnt)?;
        match d.dd.live_at(idx) {
            Some(m) if m.context == context => Ok(m),
            _ => Err(Errno::NoEnt),
        }
    }

    /// What an unmap of `bfn` would do: `Ok(false)` drop a live reference,
    /// `Ok(true)` acknowledge a revocation (answered `ESTALE`).
    pub fn unmap_check(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<bool, Errno> {
        let idx = self.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        let d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        let idx = d.dd.guest_slot(idx).ok_or(Errno::NoEnt)?;
        Self::unmap_kind(&d.dd, context, idx).map(|k| matches!(k, UnmapKind::Revoked))
    }

    #[inline]
    pub(super) fn unmap_kind(
        dd: &DriverDomain,
        context: ContextId,
        idx: u64,
    ) -> Result<UnmapKind, Errno> {
        if dd.live_refs(idx).is_some_and(|(c, _)| c == context) {
            return Ok(UnmapKind::Live);
        }
        match dd.slot(idx) {
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
                | Slot::Stuck {
                    mapping,
                    then_revoked: true,
                },
            ) if mapping.context == context => Err(Errno::Busy),
            _ => Err(Errno::NoEnt),
        }
    }

    /// Drop one reference to `bfn`; the last one unmaps it. For a revoked
    /// BFN this acknowledges the revocation, releases the BFN and answers
    /// `Err(Stale)`. The IOMMU entry is cleared and the page released at
    /// [`finish`](Self::finish) (or here, once `DEFER_LIMIT`
    /// entries wait).
    pub fn unmap(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        let idx = self.space.index_of(bfn).ok_or(Errno::NoEnt)?;
        let mut d = self.lock_cell(caller, context).ok_or(Errno::NoEnt)?;
        let result = self.unmap_locked(&mut d, context, idx);
        if d.dd.deferred_entries >= revoke::DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        self.put_driver(d);
        result
    }

    /// How many of the first `reqs` (at most `out_len` and [`MAP_CHUNK`])
    /// make a run for one lock: those of the first one's context.
    fn unmap_run(reqs: &[(ContextId, Bfn)], out_len: usize) -> (usize, ContextId) {
        let n = reqs.len().min(out_len).min(MAP_CHUNK);
        let context = reqs.first().map_or(ContextId::DEFAULT, |r| r.0);
        let same = reqs.iter().take(n).take_while(|r| r.0 == context).count();
        (same, context)
    }

    /// [`unmap_check`](Self::unmap_check) of each of the first `reqs` (at
    /// most [`MAP_CHUNK`], and only while they are of the first one's
    /// context) under one lock; returns how many were checked. (Each is
    /// checked against the state as it is: an unmap past the references
    /// that earlier unmaps of the run pass for is refused by its act, and
    /// reported again. Counting them here, as the acknowledgements' check
    /// does, cost every unmap 30 instructions for a run no client sends.)
    pub fn unmap_check_batch(
        &self,
        caller: DomId,
        reqs: &[(ContextId, Bfn)],
        out: &mut [Result<bool, Errno>],
    ) -> usize {
        let (n, context) = Self::unmap_run(reqs, out.len());
        let d = self.lock_cell(caller, context);
        for (&(context, bfn), o) in reqs.iter().zip(out.iter_mut()).take(n) {
            *o = match (&d, self.space.index_of(bfn)) {
                (Some(d), Some(idx)) => match d.dd.guest_slot(idx) {
                    Some(idx) => Self::unmap_kind(&d.dd, context, idx)
                        .map(|k| matches!(k, UnmapKind::Revoked)),
                    None => Err(Errno::NoEnt),
                },
                _ => Err(Errno::NoEnt),
            };
        }
        n
    }

    /// Unmaps of a batch taken under one lock: [`unmap`](Self::unmap) of
    /// each of the first `reqs` (at most [`MAP_CHUNK`], and only while they
    /// are of the first one's context), in order, with `out[i]` the result
    /// of `reqs[i]`; returns how many were done. Results and state are
    /// those of unmapping them one by one.
    pub fn unmap_batch(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        reqs: &[(ContextId, Bfn)],
        out: &mut [Result<(), Errno>],
    ) -> usize {
        let context = reqs.first().map_or(ContextId::DEFAULT, |r| r.0);
        let Some(mut d) = self.lock_cell(caller, context) else {
            let (n, _) = Self::unmap_run(reqs, out.len());
            for o in out.iter_mut().take(n) {
                *o = Err(Errno::NoEnt);
            }
            return n;
        };
        // The run ([`unmap_run`](Self::unmap_run)) found as it is done: a
        // pass ahead to count it cost each unmap about 5 instructions.
        // (Both cut to the run's most first: zipped whole, the two walk
        // with one index, where a `take` counted a second.)
        let mut n = 0;
        let most = reqs.len().min(out.len()).min(MAP_CHUNK);
        let reqs = reqs.get(..most).unwrap_or(&[]);
        let out = out.get_mut(..most).unwrap_or(&mut []);
        for (&(ctx, bfn), o) in reqs.iter().zip(out.iter_mut()) {
            if ctx != context {
                break;
            }
            *o = match self.space.index_of(bfn) {
                Some(idx) => self.unmap_locked(&mut d, context, idx),
                None => Err(Errno::NoEnt),
            };
            n += 1;
        }
        if d.dd.deferred_entries >= revoke::DEFER_LIMIT {
            self.clear_deferred_entries_mid_call(&mut d.dd, h);
        }
        self.put_driver(d);
        n
    }

    // Inlined into both callers (the unmap runs and the extent's unmap): a
    // call here cost each unmap of a run 28 instructions.
    #[inline(always)]
    pub(super) fn unmap_locked(
        &self,
        d: &mut Driver<'_, L>,
        context: ContextId,
        idx: u64,
    ) -> Result<(), Errno> {
        let idx = d.dd.guest_slot(idx).ok_or(Errno::NoEnt)?;
        // A reference dropped; the last one takes the mapping out of the
        // books now. Its IOMMU entry is cleared by the flush that ends the
        // batch, with the entries of the batch's other unmaps, a run of
        // BFNs in one call (`clear_deferred_entries`). The device keeps its
        // access until that flush either way (the IOTLB), and the page
        // stays referenced until then. The target's gate share and bit
        // stay until the flush (`flush_and_release`): until then a hook
        // must still find it.
        if d.dd.unmap_owned(self.seed, idx, context).is_some() {
            return Ok(());
        }
        Self::unmap_not_live(&mut d.dd, context, idx)
    }

    /// The rest of [`unmap_locked`](Self::unmap_locked), for a slot that is
    /// not a Live mapping of `context`: an acknowledgement of its notice,
    /// or a refusal. Out of line: inlined, its decode of every state made
    /// the unmap's own test of its slot a jump through a table.
    #[cold]
    #[inline(never)]
    fn unmap_not_live(dd: &mut DriverDomain, context: ContextId, idx: u64) -> Result<(), Errno> {
        match Self::unmap_kind(dd, context, idx)? {
            UnmapKind::Revoked => {
                dd.ack_revoked(idx)?;
                Err(Errno::Stale)
            }
            // (A Live mapping of `context` was unmapped above.)
            UnmapKind::Live => Err(Errno::NoEnt),
        }
    }

    /// Undo a map whose result could not be reported to the caller: drop
    /// the reference that map took, if the very mapping it made or shared
    /// (`mapped.tag`) is still live at its BFN. Anything else is left
    /// alone: a BFN revoked meanwhile keeps its notice (it belongs to the
    /// references the caller does know about; acknowledging it here would
    /// free a BFN the caller still holds), and one revoked, acknowledged and
    /// handed out again (to another vCPU of the caller) is someone else's
    /// mapping now. If the IOMMU refuses the unmap, the mapping is taken
    /// down through the stuck list (retried in turn by the flushes), never
    /// left live and unreported: in one of the engine's contexts a notice
    /// follows; in context 0, whose entry the flush clears (as an owner's
    /// unmap's), the BFN is freed without one, as the caller was never
    /// given it.
    pub fn unmap_undo(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        mapped: Mapped,
    ) {
        let Some(idx) = self.space.index_of(mapped.bfn) else {
            return;
        };
        let Some(mut d) = self.lock_cell(caller, context) else {
            return;
        };
        if !mapped.made_in(d.cell) {
            // The domain went idle and came back elsewhere: not that install.
            self.put_driver(d);
            return;
        }
        let same = |m: &Mapping| m.context == context && m.gen == mapped.tag;
        if let Some(m) = d.dd.live_at(idx).filter(same) {
            if m.refs > 1 {
                d.dd.set_refs(idx, m.refs - 1);
            } else {
                // The gate bit goes at the flush (the batch's `finish`).
                self.take_down_live(&mut d, h, idx, false);
            }
        }
        self.put_driver(d);
    }

    /// Acknowledge a revoked BFN (`REVOKED_ACK`): its notice, or with
    /// `number` only the notice of that number (`ENOENT` for any other:
    /// that one was acknowledged, and this is a later revocation of the
    /// same BFN the caller has not been told of). `EBUSY` for a BFN whose
    /// revocation is not finished (unnumbered only), as an unmap.
    pub fn revoked_ack(
        &self,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
        number: Option<u64>,
    ) -> Result<(), Errno> {
        self.revoked_ack_or_check(caller, context, bfn, number, true)
    }

    /// What [`revoked_ack`](Self::revoked_ack) would do, changing nothing.
    pub fn revoked_ack_check(
        &self,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
        number: Option<u64>,
    ) -> Result<(), Errno> {
        self.revoked_ack_or_check(caller, context, bfn, number, false)
    }

    fn revoked_ack_or_check(
        &self,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
        number: Option<u64>,
        act: bool,
    ) -> Result<(), Errno> {
        let mut out = [Err(Errno::NoEnt)];
        self.revoked_ack_batch(caller, context, &[(bfn, number)], act, &mut out);
        let [r] = out;
        r
    }

    /// [`revoked_ack`](Self::revoked_ack) (`act`) or
    /// [`revoked_ack_check`](Self::revoked_ack_check) of each of the first
    /// `acks` (BFN, number) of `context`, at most [`MAP_CHUNK`], under one
    /// lock of the context's cell: `out[i]` is what `acks[i]` alone would
    /// answer after the ones before it (a check changes nothing, but
    /// answers a notice an earlier ack of the call passed for as taken:
    /// `ENOENT`). Returns how many were done.
    pub fn revoked_ack_batch(
        &self,
        caller: DomId,
        context: ContextId,
        acks: &[(Bfn, Option<u64>)],
        act: bool,
        out: &mut [Result<(), Errno>],
    ) -> usize {
        let n = acks.len().min(out.len()).min(MAP_CHUNK);
        let Some(mut d) = self.lock_cell(caller, context) else {
            for o in out.iter_mut().take(n) {
                *o = Err(Errno::NoEnt);
            }
            return n;
        };
        // The slots a check passed so far (as if taken).
        let mut passed = [NONE; MAP_CHUNK];
        for (k, (&(bfn, number), o)) in acks.iter().zip(out.iter_mut()).take(n).enumerate() {
            let Some(idx) = self.space.index_of(bfn).and_then(|i| d.dd.guest_slot(i)) else {
                *o = Err(Errno::NoEnt);
                continue;
            };
            let earlier = passed.get(..k).unwrap_or(&[]);
            *o = match Self::revoked_kind(&d.dd, context, idx, number) {
                Ok(true) if act => d.dd.ack_revoked(idx).map(|_| ()),
                Ok(true) if earlier.contains(&idx) => Err(Errno::NoEnt),
                Ok(true) => {
                    if let Some(p) = passed.get_mut(k) {
                        *p = idx;
                    }
                    Ok(())
                }
                Ok(false) => Err(Errno::NoEnt),
                Err(e) => Err(e),
            };
        }
        if act {
            self.put_driver(d);
        }
        n
    }

    /// Whether slot `idx` of `context` is a notice `revoked_ack` takes
    /// (with `number`, that notice's number): `Ok(false)` no such notice,
    /// `Err(Busy)` its revocation is not finished yet.
    fn revoked_kind(
        dd: &DriverDomain,
        context: ContextId,
        idx: u64,
        number: Option<u64>,
    ) -> Result<bool, Errno> {
        match Self::unmap_kind(dd, context, idx) {
            Ok(UnmapKind::Revoked) => Ok(Self::number_matches(dd, idx, number)),
            Ok(UnmapKind::Live) => Ok(false),
            // Still being revoked: it has no number yet, so it is not the
            // notice a number names (ENOENT), whatever an unnumbered ack
            // is told (EBUSY, as an unmap).
            Err(_) if number.is_some() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the notice in slot `idx` is the one `number` names (any,
    /// for `None`). Numbers start at 1: 0 names none.
    fn number_matches(dd: &DriverDomain, idx: u64, number: Option<u64>) -> bool {
        match number {
            None => true,
            Some(n) => n != 0 && dd.notice_number(idx) == Some(n),
        }
    }

    /// The oldest unacknowledged revocation of `caller`, over all its
    /// contexts: (BFN, notice, its number). Each context's cell is looked
    /// at under its own lock, one after the other.
    pub fn revoked_next(&self, caller: DomId) -> Result<(Bfn, Notice, u64), Errno> {
        let mut oldest: Option<(u64, Bfn, Notice)> = None;
        for context in self.contexts_of(caller) {
            let Some(d) = self.lock_cell(caller, context) else {
                continue;
            };
            if let Some((idx, notice, order)) = d.dd.oldest_revoked() {
                let older = oldest.is_none_or(|(o, _, _)| order < o);
                if let (true, Some(bfn)) = (older, self.space.bfn_of(idx)) {
                    oldest = Some((order, bfn, notice));
                }
            }
        }
        oldest.map(|(o, bfn, n)| (bfn, n, o)).ok_or(Errno::NoEnt)
    }

    /// The unacknowledged revocation of `caller`'s `context` after its
    /// `skip` oldest (`REVOKED_NEXT` with
    /// [`IN_CONTEXT`](pviommu_abi::revoked_next::IN_CONTEXT)): (BFN,
    /// notice), `ENOENT` when the context has no more or does not exist,
    /// `EINVAL` for a `skip` over
    /// [`MAX_SKIP`](pviommu_abi::revoked_next::MAX_SKIP). One cell lock;
    /// asked for in order (0, 1, 2, ...) each op walks one link.
    pub fn revoked_in(
        &self,
        caller: DomId,
        context: ContextId,
        skip: u32,
    ) -> Result<(Bfn, Notice, u64), Errno> {
        let mut out = [Err(Errno::NoEnt)];
        self.revoked_in_batch(caller, context, &[skip], &mut out);
        let [r] = out;
        r
    }

    /// [`revoked_in`](Self::revoked_in) of each of the first `skips` of
    /// `context`, at most [`MAP_CHUNK`], under one lock of the context's
    /// cell; returns how many were answered. The run ends before a skip
    /// lower than the one before it: a run of rising skips walks at most
    /// `MAX_SKIP` links in all and one more per op (each op goes on from
    /// where the one before found its notice, or from the last notice if it
    /// ran off the end), whatever the queue holds.
    pub fn revoked_in_batch(
        &self,
        caller: DomId,
        context: ContextId,
        skips: &[u32],
        out: &mut [Result<(Bfn, Notice, u64), Errno>],
    ) -> usize {
        let mut n = skips.len().min(out.len()).min(MAP_CHUNK);
        if let Some(fall) = skips
            .windows(2)
            .take(n)
            .position(|w| matches!(w, [a, b] if b < a))
        {
            n = fall + 1;
        }
        let mut d = self.lock_cell(caller, context);
        for (&skip, o) in skips.iter().zip(out.iter_mut()).take(n) {
            // Bounded here too, not only at parse: the walk runs under the
            // cell's lock, which the gfn hooks take.
            if u64::from(skip) > pviommu_abi::revoked_next::MAX_SKIP {
                *o = Err(Errno::Inval);
                continue;
            }
            // (A cell's notices are all of its context; checked as
            // `revoked_ack` does. The hypercall relies on it: it writes the
            // notice's context back into the op, which the ABI says comes
            // back as it was.)
            let found = d
                .as_mut()
                .and_then(|d| d.dd.revoked_after(skip))
                .filter(|(_, notice, _)| notice.context == context);
            *o = match found {
                Some((idx, notice, number)) => self
                    .space
                    .bfn_of(idx)
                    .map(|bfn| (bfn, notice, number))
                    .ok_or(Errno::NoEnt),
                None => Err(Errno::NoEnt),
            };
        }
        n
    }
}
