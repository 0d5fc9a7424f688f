//! Shadow PPGTT internals: walking, diffing, tearing down, batching.

use super::error::{ShadowError, ERRNO_BFN_TOO_WIDE, ERRNO_MAPPER_SHORT};
use super::gma::Gma;
use super::ppgtt::{EntryRef, Outcome, PendingExtent, PendingMap, ShadowPpgtt, SlotInfo, NO_CHILD};
use super::ppgtt_format::{self as fmt, EntryKind, Level, ENTRIES};
use super::report::{Anomaly, RefusedLeaf};
use super::traits::{FrameMapper, GuestTableReader, ShadowMemory};
use pviommu_abi::{Bfn, Gfn};
use std::cmp::Reverse;

/// Whether a 2 MiB shadow entry can hold the extent from `first`: on a
/// 2 MiB boundary, its last frame within the format's address field.
fn extent_fits(first: Bfn) -> bool {
    pviommu_abi::extent_aligned(first.0)
        && first
            .0
            .checked_add(pviommu_abi::EXTENT_PAGES - 1)
            .is_some_and(|last| last <= fmt::MAX_FRAME)
}

/// The environment of one build/sync/teardown call.
pub(super) struct Env<'a, R: ?Sized, M: ?Sized, S: ?Sized> {
    pub(super) reader: &'a R,
    pub(super) mapper: &'a mut M,
    pub(super) mem: &'a mut S,
    pub(super) out: Outcome,
}

/// Reader for calls that never read (teardown).
pub(super) struct NoReader;

impl GuestTableReader for NoReader {
    fn read_page(&self, gfn: Gfn, _buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        Err(ShadowError::GuestRead { gfn, errno: 5 })
    }
}

/// Diff guest table `new` against snapshot `snap`: push (index, old, new)
/// for every entry that differs, in index order, and copy it into `snap`.
pub(super) fn diff_page(
    snap: &mut [u64; ENTRIES],
    new: &[u64; ENTRIES],
    changes: &mut Vec<(u16, u64, u64)>,
) {
    if snap == new {
        return;
    }
    // Fixed-size lines compare inline (no memcmp call per line).
    let (lines, _) = snap.as_chunks_mut::<8>();
    let (new_lines, _) = new.as_chunks::<8>();
    for (c, (a, b)) in lines.iter_mut().zip(new_lines).enumerate() {
        if a == b {
            continue;
        }
        for k in 0..8 {
            if a[k] != b[k] {
                changes.push(((c * 8 + k) as u16, a[k], b[k]));
                a[k] = b[k];
            }
        }
    }
}

/// Start loading the cache line of `e`. Only a hint: a no-op off x86-64.
#[inline(always)]
fn prefetch(e: &u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p: *const u64 = e;
        // SAFETY: a prefetch never faults and has no architectural effect;
        // SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// True if PT entry `old` -> `new` removes a present leaf without replacing
/// it: the only change whose shadow leaf is read when it is applied (see
/// `apply_pt_changes`).
#[inline]
fn is_removal(old: u64, new: u64) -> bool {
    old & fmt::PRESENT != 0 && new & fmt::PRESENT == 0
}

/// Start loading the shadow leaves that applying `changes` will read, from
/// `table` (when the memory hands it out).
#[inline]
fn prefetch_leaves(table: Option<&[u64; ENTRIES]>, changes: &[(u16, u64, u64)]) {
    if let Some(t) = table {
        for &(idx, old, new) in changes {
            if is_removal(old, new) {
                prefetch(&t[idx as usize]);
            }
        }
    }
}

/// Ordering key of a reference: lower owns a shared table page.
type RefKey = (u64, Reverse<u8>);

impl ShadowPpgtt {
    fn key(&self, r: EntryRef) -> RefKey {
        (
            self.entry_gma(r).0,
            Reverse(self.slots[r.slot as usize].level as u8),
        )
    }

    /// Allocate a slot and its shadow page; None (reported) on budget or
    /// memory exhaustion.
    pub(super) fn new_slot<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        level: Level,
        gfn: Option<Gfn>,
        gma: u64,
        parent: Option<EntryRef>,
    ) -> Option<u32>
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        if self.live_slots >= self.config.max_tables {
            Self::note(&mut env.out, Anomaly::TableBudgetExceeded { gma: Gma(gma) });
            return None;
        }
        let Ok(page) = env.mem.alloc_table() else {
            Self::note(&mut env.out, Anomaly::OutOfShadowMemory { gma: Gma(gma) });
            return None;
        };
        // A new slot needs a snapshot page too (slot i's snapshot is page i).
        if self.free_slots.is_empty() && self.guest.push_zeroed().is_none() {
            env.mem.free_table(page);
            Self::note(&mut env.out, Anomaly::OutOfShadowMemory { gma: Gma(gma) });
            return None;
        }
        self.live_slots += 1;
        let info = |gen| SlotInfo {
            level,
            gfn,
            page,
            gma,
            parent,
            gen,
            live: true,
            dying: false,
            populated: false,
            extent: None,
        };
        let slot = if let Some(s) = self.free_slots.pop() {
            let i = s as usize;
            self.slots[i] = info(self.slots[i].gen);
            // The guest snapshot is overwritten by the caller.
            match (&mut self.children[i], level) {
                (_, Level::Pt) => self.children[i] = None,
                (Some(c), _) => c.fill(NO_CHILD),
                (c, _) => *c = Some(Box::new([NO_CHILD; ENTRIES])),
            }
            s
        } else {
            self.slots.push(info(0));
            debug_assert_eq!(self.guest.len(), self.slots.len());
            self.children
                .push((level != Level::Pt).then(|| Box::new([NO_CHILD; ENTRIES])));
            (self.slots.len() - 1) as u32
        };
        Some(slot)
    }

    /// Process queued work and adoptions, then flush both batches.
    pub(super) fn finish<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        loop {
            if let Some((slot, gen)) = self.work.pop() {
                let s = &self.slots[slot as usize];
                if s.live && s.gen == gen {
                    self.populate(env, slot);
                }
            } else if let Some(g) = self.adopt.pop() {
                self.adopt_table(env, g);
            } else {
                break;
            }
        }
        // (A refused extent's table queues its leaves here.)
        self.flush_extents(env);
        self.flush_maps(env);
        self.flush_unmaps(env);
        // Leaves moved: the revocation index is stale.
        self.leaf_index = None;
    }

    /// Act on every present entry of a freshly read slot.
    fn populate<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let i = slot as usize;
        self.slots[i].populated = true;
        if self.slots[i].level == Level::Pt {
            self.queue_pt(env, slot);
        } else {
            for idx in 0..ENTRIES {
                let e = self.guest[i][idx];
                if e & fmt::PRESENT != 0 {
                    self.add_entry(env, slot, idx, e);
                }
            }
        }
    }

    /// Queue every present leaf of PT `slot` for mapping, straight from its
    /// snapshot: one tight loop per batch rather than a call per leaf (a
    /// full build queues 1 Mi leaves this way).
    fn queue_pt<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let (i, gen) = (slot as usize, self.slots[slot as usize].gen);
        let mut idx = 0;
        while idx < ENTRIES {
            let snap = &self.guest[i];
            while idx < ENTRIES && self.maps.len() < self.config.batch {
                let e = snap[idx];
                if e & fmt::PRESENT != 0 {
                    self.maps.push(PendingMap {
                        slot,
                        gen,
                        idx: idx as u16,
                        entry: e,
                        replace: false,
                    });
                    self.map_gfns.push(Gfn((e & fmt::ADDR_MASK) >> 12));
                    self.map_writable.push(e & fmt::RW != 0);
                }
                idx += 1;
            }
            if self.maps.len() >= self.config.batch {
                self.flush_maps(env);
            }
        }
    }

    /// Shadow guest entry `e`, now at `slot[idx]`.
    fn add_entry<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32, idx: usize, e: u64)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let level = self.slots[slot as usize].level;
        match fmt::decode(level, e) {
            EntryKind::NotPresent => {}
            EntryKind::Leaf4K(_) => {
                let gen = self.slots[slot as usize].gen;
                self.queue_map(env, slot, gen, idx, e, false);
            }
            kind => self.attach(
                env,
                EntryRef {
                    slot,
                    idx: idx as u16,
                },
                e,
                kind,
            ),
        }
    }

    /// Give directory entry `parent` (guest value `e`) its child table.
    fn attach<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        parent: EntryRef,
        e: u64,
        kind: EntryKind,
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let plevel = self.slots[parent.slot as usize].level;
        let Some(clevel) = plevel.child() else { return };
        let gma = self.entry_gma(parent);
        let child = match kind {
            EntryKind::Table(frame) => {
                let g = Gfn(frame);
                if let Some(&owner) = self.owners.get(&g) {
                    let displaced = match self.slots[owner as usize].parent {
                        Some(op) if self.key(parent) < self.key(op) => op,
                        _ => {
                            self.waiting.entry(g).or_default().push(parent);
                            Self::note(
                                &mut env.out,
                                Anomaly::DuplicateTable {
                                    gma,
                                    level: clevel as u8,
                                    table: g,
                                },
                            );
                            return;
                        }
                    };
                    self.teardown_subtree(env, owner);
                    self.waiting.entry(g).or_default().push(displaced);
                    let dgma = self.entry_gma(displaced);
                    Self::note(
                        &mut env.out,
                        Anomaly::DuplicateTable {
                            gma: dgma,
                            level: clevel as u8,
                            table: g,
                        },
                    );
                } else if let Some(refs) = self.waiting.get(&g) {
                    // Unowned but claimed by waiting references (its owner
                    // went away earlier in this call): the lowest one wins.
                    let k = self.key(parent);
                    if refs
                        .iter()
                        .any(|&r| r != parent && self.waiting_valid(r, g) && self.key(r) < k)
                    {
                        self.waiting.entry(g).or_default().push(parent);
                        self.adopt.push(g);
                        Self::note(
                            &mut env.out,
                            Anomaly::DuplicateTable {
                                gma,
                                level: clevel as u8,
                                table: g,
                            },
                        );
                        return;
                    }
                }
                let Some(s) = self.new_slot(env, clevel, Some(g), gma.0, Some(parent)) else {
                    return;
                };
                self.set_owner(g, s);
                self.read_guest(env.reader, &mut env.out, s, g);
                s
            }
            EntryKind::Page2M(_) | EntryKind::Page1G(_) => {
                let Some(s) = self.new_slot(env, clevel, None, gma.0, Some(parent)) else {
                    return;
                };
                let snap = &mut self.guest[s as usize];
                for (i, v) in snap.iter_mut().enumerate() {
                    *v = fmt::split_large(plevel, e, i);
                }
                s
            }
            EntryKind::NotPresent | EntryKind::Leaf4K(_) => return,
        };
        let (p, idx) = (parent.slot as usize, parent.idx as usize);
        if let Some(c) = &mut self.children[p] {
            c[idx] = child;
        }
        let page = self.slots[child as usize].page;
        let value = fmt::table_entry(e, page.0);
        env.mem.write_entry(self.slots[p].page, idx, value);
        if let (EntryKind::Page2M(frame), true) = (kind, env.mapper.maps_extents()) {
            // One extent for the page, at the next flush; its table is
            // populated page by page only if the extent is refused.
            self.queue_extent(env, child, Gfn(frame), e & fmt::RW != 0);
        } else if clevel == Level::Pt {
            // A PT only queues its leaves (it attaches nothing), so it can
            // be populated at once, while its snapshot, just read, and its
            // shadow page, just allocated, are still in the cache. Queued,
            // a PD's 512 PTs would be read 4 MiB before their population.
            self.populate(env, child);
        } else {
            self.work.push((child, self.slots[child as usize].gen));
        }
    }

    /// Queue the extent that shadows the guest's 2 MiB page of frames
    /// from `frame` (a multiple of 512), whose shadow-only PT is `slot`,
    /// for the next [`flush_extents`](Self::flush_extents).
    fn queue_extent<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        frame: Gfn,
        writable: bool,
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let gen = self.slots[slot as usize].gen;
        self.extent_maps.push(PendingExtent { slot, gen });
        self.extent_gfns.push(frame);
        self.extent_writable.push(writable);
        if self.extent_maps.len() >= self.config.batch {
            self.flush_extents(env);
        }
    }

    /// Map the queued extents with one mapper call and settle each: a
    /// 2 MiB shadow entry where it was mapped and is still wanted (its
    /// table's slot unchanged since it was queued), its table populated
    /// page by page where it was refused, its BFNs given back where the
    /// slot went meanwhile.
    pub(super) fn flush_extents<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        if self.extent_maps.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.extent_maps);
        let gfns = std::mem::take(&mut self.extent_gfns);
        let writable = std::mem::take(&mut self.extent_writable);
        let mut results = env.mapper.map_extents(self.domid, &gfns, &writable);
        env.out.report.map_calls += 1;
        // Refused ones while leaves removed in this call still wait for
        // their unmap: a leaf of a page inside the extent (a table
        // replaced by a 2 MiB page in one sync) makes it refused as mapped
        // in part. Those unmaps go, and the refused extents are asked once
        // more. (Unmapping first always would unmap and map again what a
        // sync moves, which the cache otherwise answers with no op.)
        let refused: Vec<usize> = (0..pending.len())
            .filter(|&k| !matches!(results.get(k), Some(Ok(_))))
            .collect();
        let unmaps_waiting = !self.unmaps.is_empty() || !self.extent_unmaps.is_empty();
        if !refused.is_empty() && unmaps_waiting {
            self.flush_unmaps(env);
            let again_gfns: Vec<Gfn> = refused.iter().map(|&k| gfns[k]).collect();
            let again_writable: Vec<bool> = refused.iter().map(|&k| writable[k]).collect();
            let again = env
                .mapper
                .map_extents(self.domid, &again_gfns, &again_writable);
            env.out.report.map_calls += 1;
            let mut again = again.into_iter();
            for &k in &refused {
                let answer = again.next();
                match results.get_mut(k) {
                    Some(slot) => {
                        if let Some(a) = answer {
                            *slot = a;
                        }
                    }
                    None => {
                        if let Some(a) = answer {
                            results.push(a);
                        }
                    }
                }
            }
            // Surplus answers of the second call go with the first's.
            results.extend(again);
        }
        let mut results = results.into_iter();
        for pe in &pending {
            let info = &self.slots[pe.slot as usize];
            let wanted = info.live && info.gen == pe.gen;
            match results.next() {
                Some(Ok(first)) if !extent_fits(first) => {
                    // A mapper that broke its contract: its BFNs back as
                    // pages (an extent unmap would refuse them).
                    self.give_back_pages(env, first);
                    if wanted {
                        self.populate(env, pe.slot);
                    }
                }
                Some(Ok(first)) if wanted => self.settle_extent(env, pe.slot, first),
                Some(Ok(first)) => self.extent_unmaps.push(first),
                // Refused (or no answer): page by page.
                _ if wanted => self.populate(env, pe.slot),
                _ => {}
            }
        }
        // Surplus results (a misbehaving mapper) must not leak.
        for first in results.flatten() {
            if extent_fits(first) {
                self.extent_unmaps.push(first);
            } else {
                self.give_back_pages(env, first);
            }
        }
        self.extent_maps = pending;
        self.extent_maps.clear();
        self.extent_gfns = gfns;
        self.extent_gfns.clear();
        self.extent_writable = writable;
        self.extent_writable.clear();
    }

    /// Unmap, as pages, the 512 BFNs from `first` a mapper answered an
    /// extent with but no 2 MiB entry can hold.
    fn give_back_pages<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, first: Bfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        for i in 0..pviommu_abi::EXTENT_PAGES {
            if let Some(b) = first.0.checked_add(i) {
                self.push_unmap(env, Bfn(b));
            }
        }
    }

    /// Shadow the guest's 2 MiB page whose shadow-only PT is `slot` as the
    /// GPU would have it (GVT-g's shadow of a 2 MiB guest page, whose DMA
    /// map must be one 2 MiB run): one 2 MiB shadow entry at the extent
    /// from `first` (aligned, fitting the format), in its parent's entry.
    /// The 512 leaves also go into `slot`, which the parent then no longer
    /// points at: a revocation of one of them points it back there
    /// ([`split_extent`](Self::split_extent)) without allocating.
    fn settle_extent<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32, first: Bfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let i = slot as usize;
        let (page, snap) = (self.slots[i].page, &self.guest[i]);
        let leaf = |idx: usize| fmt::leaf_entry(snap[idx], first.0 + idx as u64);
        match env.mem.table_mut(page) {
            Some(t) => t.iter_mut().enumerate().for_each(|(idx, v)| *v = leaf(idx)),
            None => (0..ENTRIES).for_each(|idx| env.mem.write_entry(page, idx, leaf(idx))),
        }
        let info = &mut self.slots[i];
        info.populated = true;
        info.extent = Some(first);
        let pages = pviommu_abi::EXTENT_PAGES;
        self.mapped_leaves += pages;
        env.out.report.leaves_mapped += pages;
        env.out.report.extents_mapped += 1;
        // The parent is live: a change of its entry would have torn this
        // table down (and changed its slot's generation).
        if let Some(p) = self.slots[i].parent {
            let (ps, pidx) = (p.slot as usize, p.idx as usize);
            let value = fmt::large_entry_2m(self.guest[ps][pidx], first.0);
            env.mem.write_entry(self.slots[ps].page, pidx, value);
        }
    }

    /// Undo the shadowing of guest entry `old`, formerly at `slot[idx]`.
    fn remove_entry<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32, idx: usize, old: u64)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let i = slot as usize;
        match fmt::decode(self.slots[i].level, old) {
            EntryKind::NotPresent => {}
            EntryKind::Leaf4K(_) => self.drop_leaf(env, slot, idx),
            kind => {
                let child = self.children[i].as_ref().map_or(NO_CHILD, |c| c[idx]);
                if child != NO_CHILD {
                    self.teardown_subtree(env, child);
                } else if let EntryKind::Table(frame) = kind {
                    self.unwait(
                        Gfn(frame),
                        EntryRef {
                            slot,
                            idx: idx as u16,
                        },
                    );
                }
            }
        }
    }

    /// Clear a present shadow leaf and queue its BFN for unmapping.
    fn drop_leaf<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, slot: u32, idx: usize)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let page = self.slots[slot as usize].page;
        let s = env.mem.read_entry(page, idx).unwrap_or(0);
        if s & fmt::PRESENT != 0 {
            env.mem.write_entry(page, idx, 0);
            self.queue_unmap(env, Bfn((s & fmt::ADDR_MASK) >> 12));
        }
    }

    fn unwait(&mut self, g: Gfn, r: EntryRef) {
        if let Some(v) = self.waiting.get_mut(&g) {
            v.retain(|w| *w != r);
            if v.is_empty() {
                self.waiting.remove(&g);
            }
        }
    }

    /// Remove slot `top` and everything below it: unmap leaves, free pages,
    /// release table pages (queueing waiting references for adoption) and
    /// clear the parent's shadow entry.
    pub(super) fn teardown_subtree<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, top: u32)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut list = std::mem::take(&mut self.subtree);
        list.clear();
        list.push(top);
        let mut k = 0;
        while k < list.len() {
            let s = list[k] as usize;
            k += 1;
            self.slots[s].dying = true;
            if let Some(c) = &self.children[s] {
                list.extend(c.iter().copied().filter(|&c| c != NO_CHILD));
            }
        }
        if let Some(p) = self.slots[top as usize].parent {
            let pi = p.slot as usize;
            if self.slots[pi].live && !self.slots[pi].dying {
                if let Some(c) = &mut self.children[pi] {
                    c[p.idx as usize] = NO_CHILD;
                }
                env.mem.write_entry(self.slots[pi].page, p.idx as usize, 0);
            }
        }
        for &s in &list {
            let i = s as usize;
            let level = self.slots[i].level;
            if let (Level::Pt, Some(first)) = (level, self.slots[i].extent) {
                // Every leaf present, leaf i at first + i: one unmap.
                self.queue_extent_unmap(env, first);
            } else if level == Level::Pt {
                let page = self.slots[i].page;
                for idx in 0..ENTRIES {
                    let v = match env.mem.table(page) {
                        Some(t) => t[idx],
                        None => env.mem.read_entry(page, idx).unwrap_or(0),
                    };
                    if v & fmt::PRESENT != 0 {
                        self.queue_unmap(env, Bfn((v & fmt::ADDR_MASK) >> 12));
                    }
                }
            } else if !self.waiting.is_empty() {
                for idx in 0..ENTRIES {
                    let no_child = self.children[i].as_ref().is_none_or(|c| c[idx] == NO_CHILD);
                    if let (true, EntryKind::Table(f)) =
                        (no_child, fmt::decode(level, self.guest[i][idx]))
                    {
                        self.unwait(
                            Gfn(f),
                            EntryRef {
                                slot: s,
                                idx: idx as u16,
                            },
                        );
                    }
                }
            }
            if let Some(g) = self.slots[i].gfn {
                if self.owners.get(&g) == Some(&s) {
                    self.owners.remove(&g);
                    if self.waiting.contains_key(&g) {
                        self.adopt.push(g);
                    }
                }
            }
            env.mem.free_table(self.slots[i].page);
            let info = &mut self.slots[i];
            info.live = false;
            info.dying = false;
            info.gen = info.gen.wrapping_add(1);
            self.free_slots.push(s);
            self.live_slots -= 1;
        }
        self.subtree = list;
    }

    /// True if waiting reference `r` still names table page `g` from a live
    /// table.
    fn waiting_valid(&self, r: EntryRef, g: Gfn) -> bool {
        let info = &self.slots[r.slot as usize];
        info.live
            && !info.dying
            && self.children[r.slot as usize]
                .as_ref()
                .is_some_and(|c| c[r.idx as usize] == NO_CHILD)
            && fmt::decode(info.level, self.guest[r.slot as usize][r.idx as usize])
                == EntryKind::Table(g.0)
    }

    /// Hand unowned table page `g` to its lowest waiting reference.
    fn adopt_table<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, g: Gfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        if self.owners.contains_key(&g) {
            return;
        }
        let Some(refs) = self.waiting.remove(&g) else {
            return;
        };
        let mut best: Option<(RefKey, EntryRef)> = None;
        let mut keep = Vec::with_capacity(refs.len());
        for r in refs {
            if !self.waiting_valid(r, g) {
                continue;
            }
            keep.push(r);
            let k = self.key(r);
            if best.is_none_or(|(bk, _)| k < bk) {
                best = Some((k, r));
            }
        }
        let Some((_, winner)) = best else { return };
        keep.retain(|r| *r != winner);
        if !keep.is_empty() {
            self.waiting.insert(g, keep);
        }
        let e = self.guest[winner.slot as usize][winner.idx as usize];
        self.attach(env, winner, e, EntryKind::Table(g.0));
    }

    /// Re-read owned table `slot` (guest page `g`) and act on what changed.
    ///
    /// The changes of a populated PT are not applied here but held, and
    /// the PT returned: applying them reads the shadow leaves of removed
    /// entries (replaced ones are read when their map batch settles, see
    /// [`apply_pt_changes`](Self::apply_pt_changes)), which a sync of many
    /// dirty pages finds cold (it streams guest pages and snapshots
    /// through the cache). So their lines are prefetched now and the
    /// changes applied when the next
    /// dirty page has been read and diffed (pass the returned PT back as
    /// `held`), or before anything else is applied, or by
    /// [`apply_held`](Self::apply_held) at the end. Only diffs happen in
    /// between, which change no structure, so the held PT is still live
    /// and the queued work comes out in the same order.
    pub(super) fn diff_slot<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        g: Gfn,
        held: Option<u32>,
    ) -> Option<u32>
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let i = slot as usize;
        env.out.report.pages_read += 1;
        let buf = &mut self.read_buf.0;
        if let Err(e) = env.reader.read_page(g, buf) {
            *buf = [0; ENTRIES];
            let errno = match e {
                ShadowError::GuestRead { errno, .. } => errno,
                ShadowError::OutOfShadowMemory => 12,
            };
            Self::note(&mut env.out, Anomaly::ReadFailed { table: g, errno });
        }
        // Most dirty pages of a large table change in a few cache lines (or
        // none): compare the whole page first (a vectorised memcmp), then
        // find the changed entries line by line, updating the snapshot.
        let mut changes = std::mem::take(&mut self.changes);
        changes.clear();
        diff_page(&mut self.guest[i], &self.read_buf.0, &mut changes);
        env.out.report.entries_changed += changes.len() as u64;
        let info = &self.slots[i];
        if changes.is_empty() {
            self.changes = changes;
            return held;
        }
        if info.level == Level::Pt && info.populated {
            prefetch_leaves(env.mem.table(info.page), &changes);
            self.apply_held(env, held);
            self.changes = std::mem::replace(&mut self.held_changes, changes);
            return Some(slot);
        }
        self.apply_held(env, held);
        for &(idx, old, new) in &changes {
            self.apply_change(env, slot, idx as usize, old, new);
        }
        self.changes = changes;
        None
    }

    /// Apply the changes [`diff_slot`](Self::diff_slot) held for PT `held`.
    pub(super) fn apply_held<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, held: Option<u32>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let Some(slot) = held else { return };
        debug_assert!(self.slots[slot as usize].live && self.slots[slot as usize].populated);
        let changes = std::mem::take(&mut self.held_changes);
        self.apply_pt_changes(env, slot, &changes);
        self.held_changes = changes;
    }

    /// [`apply_change`](Self::apply_change) for every change of populated
    /// PT `slot`, touching each changed shadow leaf once:
    ///
    /// * A leaf replaced by another present leaf is not read here: its map
    ///   is queued as a replacement, and when the batch's map call returns
    ///   the old leaf is read (the BFN to release), cleared and written
    ///   with the new one, prefetched before the call and hot after it
    ///   ([`release_replaced`](Self::release_replaced), then the settle
    ///   loop). Cleared here and written again a batch later, the leaf was
    ///   a cache miss twice over in a sync of many dirty pages. Until then
    ///   the leaf keeps the old BFN, still mapped (the GPU is kept off the
    ///   shadow during a sync); the old BFN is released whether the new
    ///   map succeeds or not.
    /// * Removed leaves are read first (the loads are independent, so their
    ///   misses overlap), then cleared and their BFNs queued for unmapping.
    fn apply_pt_changes<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        changes: &[(u16, u64, u64)],
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let (page, gen) = {
            let s = &self.slots[slot as usize];
            (s.page, s.gen)
        };
        let mut shadow = std::mem::take(&mut self.shadow_buf);
        shadow.clear();
        let table = env.mem.table(page);
        shadow.extend(
            changes
                .iter()
                .map(|&(idx, old, new)| match (is_removal(old, new), table) {
                    (false, _) => 0,
                    (true, Some(t)) => t[idx as usize],
                    (true, None) => env.mem.read_entry(page, idx as usize).unwrap_or(0),
                }),
        );
        // Only this slot's own entries are written below (each index once),
        // so every value read above is still current when it is used.
        for (&(idx, old, new), &s) in changes.iter().zip(&shadow) {
            let idx = idx as usize;
            if s & fmt::PRESENT != 0 {
                env.mem.write_entry(page, idx, 0);
                self.queue_unmap(env, Bfn((s & fmt::ADDR_MASK) >> 12));
            }
            if new & fmt::PRESENT != 0 {
                // Neither a replaced nor an added leaf was read here: the
                // batch must prefetch it (and release what it replaces).
                self.maps_scattered = true;
                self.queue_map(env, slot, gen, idx, new, old & fmt::PRESENT != 0);
            }
        }
        self.shadow_buf = shadow;
    }

    /// Apply one trapped guest write to owned table `slot`.
    pub(super) fn apply_write<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        idx: usize,
        new: u64,
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let old = self.guest[slot as usize][idx];
        if old == new {
            return;
        }
        env.out.report.entries_changed += 1;
        self.guest[slot as usize][idx] = new;
        self.apply_change(env, slot, idx, old, new);
    }

    /// Act on `slot[idx]` having changed from `old` to `new` (the snapshot
    /// already holds `new`).
    fn apply_change<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        idx: usize,
        old: u64,
        new: u64,
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let i = slot as usize;
        if !self.slots[i].populated {
            // Still queued: population will act on the snapshot's final value.
            return;
        }
        let level = self.slots[i].level;
        // A directory entry that still points at the same table only needs
        // its flags refreshed.
        if let (EntryKind::Table(a), EntryKind::Table(b)) =
            (fmt::decode(level, old), fmt::decode(level, new))
        {
            let child = self.children[i].as_ref().map_or(NO_CHILD, |c| c[idx]);
            if a == b && child != NO_CHILD {
                let value = fmt::table_entry(new, self.slots[child as usize].page.0);
                env.mem.write_entry(self.slots[i].page, idx, value);
                return;
            }
        }
        self.remove_entry(env, slot, idx, old);
        self.add_entry(env, slot, idx, new);
    }

    #[inline]
    fn queue_map<R, M, S>(
        &mut self,
        env: &mut Env<'_, R, M, S>,
        slot: u32,
        gen: u32,
        idx: usize,
        e: u64,
        replace: bool,
    ) where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        self.maps.push(PendingMap {
            slot,
            gen,
            idx: idx as u16,
            entry: e,
            replace,
        });
        self.map_gfns.push(Gfn((e & fmt::ADDR_MASK) >> 12));
        self.map_writable.push(e & fmt::RW != 0);
        if self.maps.len() >= self.config.batch {
            self.flush_maps(env);
        }
    }

    #[inline]
    fn queue_unmap<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, bfn: Bfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        self.mapped_leaves -= 1;
        env.out.report.leaves_unmapped += 1;
        self.push_unmap(env, bfn);
    }

    /// Queue the unmap of a whole extent's 512 leaves, from `first`.
    fn queue_extent_unmap<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, first: Bfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let pages = pviommu_abi::EXTENT_PAGES;
        self.mapped_leaves -= pages;
        env.out.report.leaves_unmapped += pages;
        env.out.report.extents_unmapped += 1;
        self.extent_unmaps.push(first);
        if self.extent_unmaps.len() >= self.config.batch {
            self.flush_unmaps(env);
        }
    }

    #[inline]
    fn push_unmap<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, bfn: Bfn)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        self.unmaps.push(bfn);
        if self.unmaps.len() >= self.config.batch {
            self.flush_unmaps(env);
        }
    }

    /// Map the queued leaves with one mapper call and write the results.
    /// Results for leaves that changed or vanished meanwhile are unmapped.
    pub(super) fn flush_maps<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        if self.maps.is_empty() {
            return;
        }
        // Settling reads each leaf's snapshot entry and shadow entry. For
        // the leaves of a sync's page diffs (a few per dirty page, queued
        // by `apply_pt_changes` without reading them) both were last
        // touched up to a batch of pages ago and have left the nearest
        // caches since: start loading them now, so the misses overlap each
        // other and the mapper call instead of stalling the settle loop
        // one by one. Leaves queued a table at a time by `queue_pt` were
        // read just now, and those of `apply_change` were cleared just now
        // (trapped writes): they need no prefetch.
        let scattered = std::mem::take(&mut self.maps_scattered);
        if scattered {
            self.prefetch_settle(env);
        }
        let results = env
            .mapper
            .map(self.domid, &self.map_gfns, &self.map_writable);
        env.out.report.map_calls += 1;
        let maps = std::mem::take(&mut self.maps);
        let mut results = results.into_iter();
        let mut mapped = 0;
        // BFNs to give back (rare: a stale leaf or a BFN too wide); pushed
        // after the loop, which holds the shadow table borrowed.
        let mut give_back = Vec::new();
        if scattered {
            self.release_replaced(env, &maps);
        }
        let report = &mut env.out.report;
        // Leaves are queued a table at a time: settle each run of one slot
        // with one look-up of the slot, its snapshot and its shadow table.
        for run in maps.chunk_by(|a, b| a.slot == b.slot && a.gen == b.gen) {
            let i = run[0].slot as usize;
            let info = &self.slots[i];
            let (page, base) = (info.page, info.gma);
            // A slot freed (or reused) since its leaves were queued.
            let slot_ok = info.live && info.gen == run[0].gen;
            let snap = &self.guest[i];
            // The value to write for leaf `p`, given its current shadow
            // entry; None leaves the shadow entry alone. A leaf still wants
            // its BFN if the guest entry is unchanged and the shadow leaf
            // still empty.
            let mut settle = |p: &PendingMap, shadow: Option<u64>| {
                let idx = p.idx as usize;
                let valid = slot_ok
                    && snap[idx] == p.entry
                    && shadow.is_some_and(|v| v & fmt::PRESENT == 0);
                let errno = match results.next() {
                    Some(Ok(bfn)) if valid && bfn.0 <= fmt::MAX_FRAME => {
                        mapped += 1;
                        return Some(fmt::leaf_entry(p.entry, bfn.0));
                    }
                    Some(Ok(bfn)) => {
                        give_back.push(bfn);
                        ERRNO_BFN_TOO_WIDE
                    }
                    Some(Err(e)) => e.errno,
                    None => ERRNO_MAPPER_SHORT,
                };
                if valid {
                    report.note_refused(RefusedLeaf {
                        gma: Gma(base + (idx as u64) * Level::Pt.entry_span()),
                        gfn: Gfn((p.entry & fmt::ADDR_MASK) >> 12),
                        errno,
                    });
                }
                None
            };
            match env.mem.table_mut(page).filter(|_| slot_ok) {
                Some(table) => {
                    for p in run {
                        let e = &mut table[p.idx as usize];
                        if let Some(v) = settle(p, Some(*e)) {
                            *e = v;
                        }
                    }
                }
                None => {
                    for p in run {
                        let idx = p.idx as usize;
                        let shadow = env.mem.read_entry(page, idx);
                        if let Some(v) = settle(p, shadow) {
                            env.mem.write_entry(page, idx, v);
                        }
                    }
                }
            }
        }
        // Surplus results (a misbehaving mapper) must not leak.
        give_back.extend(results.flatten());
        self.mapped_leaves += mapped;
        env.out.report.leaves_mapped += mapped;
        for bfn in give_back {
            self.push_unmap(env, bfn);
        }
        self.maps = maps;
        self.maps.clear();
        self.map_gfns.clear();
        self.map_writable.clear();
    }

    /// Prefetch what settling the map batch reads (see `flush_maps`).
    #[inline(never)]
    fn prefetch_settle<R, M, S>(&self, env: &Env<'_, R, M, S>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        for run in self.maps.chunk_by(|a, b| a.slot == b.slot) {
            let i = run[0].slot as usize;
            let table = env.mem.table(self.slots[i].page);
            let snap = &self.guest[i];
            for p in run {
                let idx = p.idx as usize;
                prefetch(&snap[idx]);
                if let Some(t) = table {
                    prefetch(&t[idx]);
                }
            }
        }
    }

    /// For every replacement in map batch `maps` (see
    /// [`apply_pt_changes`](Self::apply_pt_changes)) whose leaf is still
    /// wanted (slot live, guest entry unchanged): clear the leaf it
    /// replaces and release that BFN, so settling finds the leaf empty as
    /// for any other map. Runs after the mapper call, when the prefetched
    /// leaves have arrived; settling then writes them while they are hot.
    /// Out of line: a build never needs it, and inlined it made the settle
    /// loop of every build slower.
    #[inline(never)]
    fn release_replaced<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>, maps: &[PendingMap])
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut released = std::mem::take(&mut self.released);
        for run in maps.chunk_by(|a, b| a.slot == b.slot && a.gen == b.gen) {
            let i = run[0].slot as usize;
            let info = &self.slots[i];
            if !(info.live && info.gen == run[0].gen) {
                continue;
            }
            let (page, snap) = (info.page, &self.guest[i]);
            for p in run {
                let idx = p.idx as usize;
                if !p.replace || snap[idx] != p.entry {
                    continue;
                }
                let leaf = env.mem.read_entry(page, idx).unwrap_or(0);
                if leaf & fmt::PRESENT != 0 {
                    env.mem.write_entry(page, idx, 0);
                    released.push(Bfn((leaf & fmt::ADDR_MASK) >> 12));
                }
            }
        }
        for &bfn in &released {
            self.queue_unmap(env, bfn);
        }
        released.clear();
        self.released = released;
    }

    /// Unmap the queued BFNs with one mapper call, and the queued extents
    /// with one more.
    pub(super) fn flush_unmaps<R, M, S>(&mut self, env: &mut Env<'_, R, M, S>)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        // Pages first: a leaf of a page inside an extent, removed in the
        // same call, then leaves the extent's page with one reference, so
        // the extent goes as one op.
        if !self.unmaps.is_empty() {
            env.mapper.unmap(&self.unmaps);
            env.out.report.unmap_calls += 1;
            self.unmaps.clear();
        }
        if !self.extent_unmaps.is_empty() {
            env.mapper.unmap_extents(&self.extent_unmaps);
            env.out.report.unmap_calls += 1;
            self.extent_unmaps.clear();
        }
    }
}
