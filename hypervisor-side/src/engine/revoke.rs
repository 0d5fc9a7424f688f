//! Revocation: a page leaves its domain (or loses device-write permission),
//! or a domain dies. Also the flush that ends every unmap.
//!
//! The protocol the owner sees (design/xen-integration.md, "Revocation"):
//! a revoked BFN is unmapped, flushed, its page released, and the BFN stays
//! reserved as a *notice* in the owner's queue until the owner acknowledges
//! it (`REVOKED_ACK`, or an unmap answered `ESTALE`). So a mediator whose
//! shadow tables still hold the BFN reaches nothing, and nothing another
//! guest maps can appear behind it.

use core::sync::atomic::Ordering;

use lock_api::RawMutex;

use super::contexts::ContextsLeft;
use super::driver::{
    region_of, DriverDomain, PendingMap, Slot, SlotAccess, CHAIN_BOUND, NONE, REGION_GFN_END,
    REGION_SHIFT,
};
use super::{cells_in, Driver, Engine, EngineBug, Hypervisor};
use crate::config::MAX_CONTEXTS;
use crate::{Bfn, ContextId, DomId, Errno, Gfn, Mfn};
use pviommu_abi::EXTENT_PAGES;

/// What one page-index probe of the gfn hook costs, in slots of a pass
/// over the slot array: measured 41 against 1.6 ns with 1 Mi live
/// (2026-11-30, an AMD EPYC VM), and on an Intel Xeon VM, with the pass
/// reading packed slots, 29-133 ns against 3.9-4.6 ns (2026-12-01): between
/// 7 and 29 slots, a probe waiting on memory more or less. A hook probes
/// only when that is clearly less work.
const PROBE_COST_IN_SLOTS: u64 = 16;

/// How a gfn changed ([`Engine::gfn_changed`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GfnChange {
    /// The gfn no longer points at the frame it did: revoke every mapping.
    Removed,
    /// The gfn lost device-write permission (read-only, ioreq server,
    /// log-dirty): revoke writable mappings only.
    WriteLost,
}

/// Domain teardown is not finished: call again (Xen: `-ERESTART`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Restart;

/// Slots a slice of a teardown or of [`Engine::revoke_writes`] visits
/// before it yields (at the next slot that starts a 2 MiB block of BFNs:
/// at most 511 more, see `Engine::slice_may_end_at`).
pub const SLICE_VISITS: u64 = 4096;
/// Revocations (IOMMU unmaps) such a slice makes before it yields (as
/// many as 511 more, likewise: [`SLICE_REVOKES_MOST`]).
pub const SLICE_REVOKES: u32 = 256;
/// The most revocations one slice makes: it ends at a 2 MiB block of BFNs.
pub const SLICE_REVOKES_MOST: u32 = SLICE_REVOKES + pviommu_abi::EXTENT_PAGES as u32 - 1;
/// Stuck revocations (unmaps the IOMMU refused before) one flush retries:
/// a call's work stays bounded however many there are (as a slice's
/// revocations are), and the oldest go first, so each is retried within
/// `stuck / STUCK_RETRIES` flushes. ([`Engine::revoke_writes`] retries
/// in slices of its own while they get further: `RETRY_SLICES`.)
pub const STUCK_RETRIES: u64 = SLICE_REVOKES as u64;

/// Stuck entries a write revocation looks at, over all the cells, to tell
/// whether one of them still lets a device write its range
/// (`Engine::writes_may_remain`): past them it assumes so.
const STUCK_LOOKS: u64 = 1024;

/// Every gfn: the range of a teardown and of [`Engine::revoke_writes`].
const ALL_GFNS: (u64, u64) = (0, u64::MAX);
/// Ranges of more regions than this are walked cell by cell without asking
/// the region counts first.
const SKIP_CHECK_REGIONS: u64 = 64;

/// A revocation of device write access over a gfn range, made in slices
/// by [`Engine::revoke_writes_in`] and kept by the caller between them
/// (Xen: in `struct domain`). Idle when `first == last`; from its first
/// slice until the caller lifts it (resets it to idle) writable maps of
/// the range are refused ([`RangeSweep::freezes_writes_to`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeSweep {
    /// First gfn of the range in progress.
    pub first: u64,
    /// End (exclusive) of the range in progress.
    pub last: u64,
    /// Where its walk is.
    pub cursor: u64,
}

impl RangeSweep {
    /// Whether a writable map of `gfn` is refused now: a gfn of the range
    /// whose revocation is in progress, between the slices its caller's
    /// continuations make. Without it, what was mapped writable meanwhile
    /// behind the walk was left to the type change's hook, which revoked
    /// it all in one hold of the p2m lock, as much as the quota allowed (a
    /// review of 2026-12-06). The rule of the page lookups: the glue's
    /// `pvx_vram_sweeping()` on Xen, the simulator's `get_page(s)`.
    pub fn freezes_writes_to(&self, gfn: u64) -> bool {
        self.first <= gfn && gfn < self.last
    }

    /// Whether it freezes nothing: no range (the glue's `pvx_page_run()`
    /// asks the same, `first < last`, for its fast path).
    pub fn is_idle(&self) -> bool {
        self.first >= self.last
    }

    /// Make it the revocation of `range`: one of another range (or none)
    /// starts over for it, from its first cell; whether it did. The one
    /// rule of [`Engine::revoke_writes_in`] and of the Xen object, which
    /// publishes such a start before the engine's first slice.
    pub fn aim_at(&mut self, (first, last): (u64, u64)) -> bool {
        let new = (self.first, self.last) != (first, last);
        if new {
            *self = RangeSweep {
                first,
                last,
                cursor: 0,
            };
        }
        new
    }
}

/// Walks [`Engine::revoke_writes`] makes again, at most, while a cell
/// that maps the target has an unmap or flush to retry: a failing IOMMU
/// must not keep the log-dirty domctl (and its preempt state) continuing
/// for ever.
const RETRY_PASSES: u8 = 8;

/// Slices of retries without a walk (each about [`STUCK_RETRIES`] unmaps)
/// [`Engine::revoke_writes`] makes before a walk again, while they make
/// progress: 1 Mi retried unmaps, a cell's whole stuck list at the default
/// quota, per walk. (Counted in the cursor's slot bits, its driver past
/// every cell.)
const RETRY_SLICES: u64 = 4096;

/// A cursor's driver past every cell: a walk from it visits none.
const PAST_CELLS: u16 = u16::MAX;

/// A teardown's restarts that made no progress (a walk over the target's
/// cells after which no fewer of its pages are held and whose flushes
/// unmapped no stuck entry; a retry of the dying domain's own entries
/// that got none of them further; a context whose device could not be
/// moved off), in a row, before it says it is stalled
/// ([`Engine::teardown_stalled`]): an IOMMU that keeps failing must not
/// keep the toolstack's destroy continuing for ever (Xen turns
/// `-ERESTART` into a continuation the caller cannot leave). Counted in
/// the cursor's `passes` bits (0 otherwise in a teardown).
const STALLED_RESTARTS: u8 = 8;
/// `passes` of a teardown: restarts without progress in a row (bits 0-3).
const STALL_COUNT: u8 = 0x0f;
/// `passes` of a teardown: said stalled at the last call (cleared by the
/// next, which tries again).
const STALLED: u8 = 0x10;
/// `passes` of a teardown: a flush of the walk under way unmapped a stuck
/// entry at last, or released unmapped pages (the target's own may wait
/// behind others' in the cell's queues: a queue moving is progress
/// towards them).
const RETRIED_STUCK: u8 = 0x20;
/// `passes` of a teardown's driver phase (the bit is the target phase's
/// `RETRIED_STUCK`): the walk is being made again because a cell still
/// held a page at its reset (`walk_again`). Only then does the count of
/// restarts without progress go on across contexts, so that the re-walk
/// reaches the stall; otherwise each context starts it afresh (a context
/// whose pending work another path finished between slices sees no
/// progress of its own: carrying its count stalled a flaky IOMMU early,
/// a review's finding).
const REWALKING: u8 = 0x20;

/// Cursor layout of a teardown and of [`Engine::revoke_writes`]: phase in
/// bits 62-63, retry passes (a teardown: its stall count and flags) in
/// 56-61, driver cell (as a target) or context (as a driver) in 40-55,
/// slot index in 0-39 (with the driver
/// [`PAST_CELLS`], [`Engine::revoke_writes`]'s count of retry slices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    phase: u64,
    driver: u16,
    slot: u64,
    /// Walks [`Engine::revoke_writes`] made again after work was left to
    /// retry (bits 56-61; 0 for a teardown).
    passes: u8,
}

const PHASE_START: u64 = 0;
const PHASE_AS_TARGET: u64 = 1;
const PHASE_AS_DRIVER: u64 = 2;
const PHASE_DONE: u64 = 3;

impl Cursor {
    /// Finished: packs to `PVIOMMU_TEARDOWN_DONE` (3 << 62).
    const DONE: Cursor = Cursor::start_of(PHASE_DONE);
    /// The start of `phase`: first cell or context, first slot, no pass.
    const fn start_of(phase: u64) -> Cursor {
        Cursor {
            phase,
            driver: 0,
            slot: 0,
            passes: 0,
        }
    }
    fn unpack(v: u64) -> Cursor {
        Cursor {
            phase: v >> 62,
            driver: (v >> 40) as u16,
            slot: v & ((1 << 40) - 1),
            passes: ((v >> 56) & 0x3f) as u8,
        }
    }
    fn pack(self) -> u64 {
        self.phase << 62
            | ((self.passes & 0x3f) as u64) << 56
            | (self.driver as u64) << 40
            | (self.slot & ((1 << 40) - 1))
    }
}

/// Whether an unmap's answer means the entry is gone. `NoEnt` does only in
/// context 0, whose tables are the host's: there it is the glue's refusal
/// of a page outside the window, which no map of the engine's reached.
/// (A missing entry there, a map the flush had still to write, Xen's
/// drivers answer with 0, as the simulator does.) In an engine context
/// the engine writes every entry at once, so `NoEnt` there means its
/// books and tables disagree: the page stays referenced (fail closed).
fn entry_gone(context: ContextId, answer: Result<(), Errno>) -> bool {
    match answer {
        Ok(()) => true,
        Err(Errno::NoEnt) => context == ContextId::DEFAULT,
        Err(_) => false,
    }
}

/// How many entries an owner's unmaps may leave for the flush before the
/// batch clears them itself (between its preemption points): the flush's
/// share of a batch's IOMMU work stays that of a default batch (1024
/// pages, two 2 MiB runs), however long the batch.
pub(super) const DEFER_LIMIT: u64 = 1024;

/// How many unmapped pages (and maps to write) may wait in a driver
/// domain's cells together when its batch is preempted, for the entry
/// that ends the call: a cell that would take the total to it is finished
/// at the preemption point ([`Engine::pause_contexts`]). The caller can
/// keep one call going for ever (it rewrites `nr_done` in its header
/// between entries), so without it the flushes that end the call could be
/// left release passes over its whole quota; with it they are left no
/// more than this plus one entry's ops.
pub const PREEMPT_RELEASE_LIMIT: u64 = 1024;

/// How many entries of unmapping lists (each a page put, or a move to the
/// stuck list) one hook, one teardown slice or one entry of an owner's
/// call lets go at most, over all the cells it flushes (a hook: beyond
/// what it revoked itself). The rest stay on their lists, flushed and
/// still referenced, for the cells' next flushes. While flushes succeed,
/// what waits at a call's end is at most [`PREEMPT_RELEASE_LIMIT`] and one
/// entry's ops: with a default batch of page unmaps
/// ([`MAX_BATCH_OPS`](crate::config::MAX_BATCH_OPS)) it is released whole,
/// as before; extent unmaps (512 pages an op) or a larger batch set at
/// boot can leave more, and the call then continues. But while an IOMMU's
/// flushes fail, the owner's unmaps pile up to its quota in each cell
/// (nothing may go before a flush succeeds), and once they succeeded
/// again, a cell's first flush, a hook of any target it maps (on Xen under
/// that target's p2m lock, at a time the target chooses), released the
/// whole pile at once (review). Now a hook or a teardown slice lets go of
/// this many and leaves the rest to the next flush, and the owner's call
/// continues (`BATCH_INCOMPLETE`) until they are gone.
pub const RELEASE_BUDGET: u64 = 4096;
// A default batch of page unmaps ends with one entry's release.
const _: () =
    assert!(RELEASE_BUDGET >= PREEMPT_RELEASE_LIMIT + crate::config::MAX_BATCH_OPS as u64);

/// What freeing a table an unmap emptied costs of [`RELEASE_BUDGET`], in
/// page releases: it writes back its 64 cache lines first on an IOMMU
/// that does not snoop the CPU caches (a `clflush` each on Xen), and
/// gives a frame back to the host's heap, where a release puts a page
/// reference. Tables go after the
/// pages, with what the budget has left (a review of 2026-12-06: while
/// flushes failed, the emptied tables piled up, a table per 512 BFNs of
/// the quota, and the first flush to succeed freed them all).
pub const TABLE_FREE_COST: u64 = 64;
/// The tables one cell's flush frees at most (the end of an owner's call,
/// a teardown slice, a context's destroy), each from the call's budget: a
/// hook's budget, shared by the cells it visits, grows with what it
/// revoked, so a hook frees more only in proportion to its own work.
pub const TABLE_FREES_PER_CALL: usize = (RELEASE_BUDGET / TABLE_FREE_COST) as usize;
// A default batch of page unmaps empties a few tables (a leaf table per
// 512 of its ops, and what hangs above): they go at the call's end. (More,
// from extent unmaps or failed flushes, continue the call.)
const _: () = assert!(TABLE_FREES_PER_CALL >= 16);

/// What one [`Engine::flush_and_release`] did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Released {
    /// Stuck entries the IOMMU unmapped at last (retries that got further).
    pub unstuck: u64,
    /// Entries of the unmapping list let go (released, or moved to the
    /// stuck list).
    pub released: u64,
    /// Emptied tables freed (after the pages, with what the budget had
    /// left: [`TABLE_FREE_COST`] each).
    pub tables_freed: u64,
    /// The budget ran out with entries left on the list (the flush
    /// succeeded), or with tables earlier flushes emptied (whether this
    /// one succeeded or not): the cell's next flush goes on with them.
    pub left: bool,
}

// Every run of waiting entries fits one backend call: an unmap batch's
// run of `MAP_CHUNK` can take the count past the limit before it clears.
const _: () = assert!(DEFER_LIMIT + super::MAP_CHUNK as u64 <= crate::iommu::MAX_IOMMU_RUN);

/// Consecutive maps of `pending_maps` of consecutive BFNs and frames, one
/// access and attribute: written in one call. The maps may come in either
/// order: a mediator maps a guest's pages as often from the top down as
/// from the bottom up (and a PV guest's frames fall), and its BFNs follow
/// its gfns within a 2 MiB block (`Engine::slot_wanted`), so a falling
/// run's BFNs and frames fall together. Written as one rising run either
/// way, as Xen's `iommu_map()` takes it; before, each falling map was a
/// call of its own (on Xen a table walk each, about 1.5 us under TCG).
struct PendingRun {
    /// Lowest BFN.
    bfn: Bfn,
    /// Its frame: BFN `bfn + i` maps frame `mfn + i`.
    mfn: Mfn,
    pages: u64,
    /// Its maps' access and attribute, as their slots store them.
    access: SlotAccess,
    /// The maps came from the top down (`pending_maps[start]` has the
    /// highest BFN).
    falling: bool,
}

impl PendingRun {
    fn new(bfn: Bfn, mfn: Mfn, access: SlotAccess) -> Self {
        PendingRun {
            bfn,
            mfn,
            pages: 1,
            access,
            falling: false,
        }
    }

    /// Take the next map `n` in if it continues the run: one BFN and frame
    /// above its top, or (a run of one, or one already falling) one below
    /// its bottom.
    #[inline(always)]
    fn grow(&mut self, n: &PendingRun) -> bool {
        if self.access != n.access || self.pages >= crate::iommu::MAX_IOMMU_RUN {
            return false;
        }
        if !self.falling
            && self.bfn.0.checked_add(self.pages) == Some(n.bfn.0)
            && self.mfn.0.checked_add(self.pages) == Some(n.mfn.0)
        {
            self.pages += 1;
            return true;
        }
        if (self.falling || self.pages == 1)
            && n.bfn.0.checked_add(1) == Some(self.bfn.0)
            && n.mfn.0.checked_add(1) == Some(self.mfn.0)
        {
            self.bfn = n.bfn;
            self.mfn = n.mfn;
            self.falling = true;
            self.pages += 1;
            return true;
        }
        false
    }

    /// The offset from `bfn` of the run's `i`-th map (in `pending_maps`
    /// order).
    fn offset_of(&self, i: u64) -> Option<u64> {
        if self.falling {
            self.pages.checked_sub(1)?.checked_sub(i)
        } else {
            Some(i).filter(|&i| i < self.pages)
        }
    }
}

/// Consecutive slots of the unmapping list whose entries an owner's
/// unmaps left, of consecutive BFNs (in either order: the list runs from
/// the last unmap back): cleared in one call.
struct DeferredRun {
    context: ContextId,
    /// Lowest BFN.
    first: u64,
    /// How many BFNs (and slots: each BFN has one slot).
    pages: u64,
}

/// Where [`Engine::clear_deferred_entries`]' walk of the unmapping list
/// is.
struct DeferredWalk {
    /// Marked slots not yet found.
    left: u64,
    /// The next slot.
    at: u64,
    /// Steps left before the list is taken for a broken one.
    steps: usize,
}

impl DeferredRun {
    fn new(context: ContextId, bfn: u64) -> Self {
        DeferredRun {
            context,
            first: bfn,
            pages: 1,
        }
    }

    /// Take `bfn` of `context` in if it extends the run at either end, and
    /// the run stays within what one backend call takes
    /// ([`MAX_IOMMU_RUN`](crate::iommu::MAX_IOMMU_RUN)). Near that bound it
    /// ends where a 2 MiB block of BFNs starts, never inside one: a run cut
    /// inside a block the host mapped as one superpage clears part of it,
    /// a split that needs a table.
    ///
    /// Falling is asked first: the list runs from the last unmap back, so
    /// a batch unmapped from the bottom up (the usual order) falls. Where
    /// blocks start is asked only within a block of the bound (where a
    /// run may have to end short of one); below it any BFN that extends
    /// the run is taken.
    #[inline(always)]
    fn grow(&mut self, context: ContextId, bfn: u64) -> bool {
        const BLOCK: u64 = pviommu_abi::EXTENT_PAGES - 1;
        // Within a block of the bound: fewer than a block's pages of room
        // (one compare with a constant, where the room itself cost every
        // page five instructions).
        const NEAR_BOUND: u64 = crate::iommu::MAX_IOMMU_RUN - pviommu_abi::EXTENT_PAGES;
        const MAX: u64 = crate::iommu::MAX_IOMMU_RUN;
        if context != self.context {
            return false;
        }
        // Falling, with a path of its own: `bfn` is the one below `first`
        // (one subtraction, its borrow the test that `first` has one
        // below it). Both ways on one path, the fall asked twice, cost
        // 2 instructions a page.
        if self.first.checked_sub(1) == Some(bfn) {
            if self.pages > NEAR_BOUND && (self.pages >= MAX || bfn & BLOCK == BLOCK) {
                return false;
            }
            self.first = bfn;
            self.pages += 1;
            return true;
        }
        if self.first.checked_add(self.pages) != Some(bfn) {
            return false;
        }
        if self.pages > NEAR_BOUND && (self.pages >= MAX || bfn & BLOCK == 0) {
            return false;
        }
        self.pages += 1;
        true
    }
}

impl<L: RawMutex> Engine<L> {
    /// Revoke the live mapping in slot `idx` of driver `d`: unmap it in the
    /// IOMMU and queue it for the flush (then it becomes a notice), or, if
    /// the IOMMU refuses the unmap, mark it stuck with its page still
    /// referenced. Needs no memory. The caller clears the target's gate bit,
    /// if the cell no longer needs it, before it unlocks
    /// (`clear_gate_bit_if_unused`).
    pub(super) fn revoke_slot(&self, d: &mut Driver<'_, L>, h: &mut impl Hypervisor, idx: u64) {
        self.take_down_live(d, h, idx, true);
    }

    /// Take the live mapping in slot `idx` of driver `d` out of the index
    /// and the IOMMU, as the owner did not ask for: after the flush it
    /// becomes a notice (`then_revoked`) or, for a dying owner, free. An
    /// unmap the IOMMU refuses leaves it stuck, page referenced. Returns
    /// the target and whether this was `d`'s last page of it.
    ///
    /// In context 0 (the host's tables) the entry is left for the flush
    /// that follows, as an owner's unmap leaves it: that flush clears the
    /// entries it finds in runs (`clear_deferred_entries`), a whole 2 MiB
    /// with one call, which splits nothing (but a 1 GiB entry Xen folded
    /// them into, see `design/architecture.md`). Cleared here page by page, a
    /// revocation of a whole block the host folded into a superpage (a
    /// guest giving back a 2 MiB page, a target's or a driver domain's
    /// death) split it first, which needs a table: short of memory the
    /// 512 pages went Stuck, the device kept reaching frames the guest had
    /// given back, and a dying domain's teardown stalled, where the owner's
    /// own unmap of the same block needed nothing. Every caller flushes
    /// before the device may lose the page (a hook and a teardown slice
    /// before they unlock, a map's or an undo's the owner's call at its
    /// end), and the page stays referenced until that flush succeeded.
    ///
    /// It leaves the target's gate bit alone: a map that revokes a stale
    /// mapping and then installs the current frame must not clear its own
    /// bit in between (a hook reading the bits then would skip the cell).
    pub(super) fn take_down_live(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        idx: u64,
        then_revoked: bool,
    ) -> Option<(DomId, bool)> {
        let dd = &mut *d.dd;
        let m = dd.live_at(idx)?;
        let last_of_target = dd.unindex(self.seed, idx)?;
        if then_revoked {
            dd.stats.revocations += 1;
        }
        if m.context == ContextId::DEFAULT {
            // (A map whose entry the flush had still to write is cleared
            // all the same: the host answers a missing entry with 0.)
            dd.push_unmapping_at(idx, then_revoked, true);
            return Some((m.domid, last_of_target));
        }
        let t0 = self.clock(h);
        let unmapped = self
            .space
            .bfn_of(idx)
            .is_some_and(|bfn| entry_gone(m.context, dd.iommu_unmap(h, m.context, bfn)));
        dd.stats.ns_iommu_unmap += self.since(h, t0);
        // Its gate share goes with the page, after the flush.
        if unmapped {
            dd.push_unmapping_at(idx, then_revoked, false);
        } else {
            // A notice once unmapped, even for a caller that passed
            // `then_revoked` false (a dying owner, an undone map), in the
            // engine's own contexts. In context 0 the flush clears the
            // entry, and one it cannot clear is Stuck then free for those
            // callers, as an owner's unmap is (the release pass).
            dd.push_stuck(idx, m, true);
        }
        Some((m.domid, last_of_target))
    }

    /// Whether a slice of a walk over a cell's slots may end before slot
    /// `slot`: where its BFN starts a 2 MiB block (or it has none). The
    /// slice's flush then clears whole blocks of context 0 the walk took
    /// down, each with one call, never a part of one the host mapped as a
    /// superpage, whose split would need a table (see `take_down_live`).
    /// A slice runs at most 511 slots past its bounds.
    ///
    /// Also where a new segment of BFNs starts (a reserved range skipped:
    /// the block start may lie inside it, and a block holding a reserved
    /// BFN is no superpage of the host's), so the next place to end is
    /// never more than 511 slots on.
    pub(super) fn slice_may_end_at(&self, slot: u64) -> bool {
        const BLOCK: u64 = pviommu_abi::EXTENT_PAGES - 1;
        let Some(bfn) = self.space.bfn_of(slot) else {
            return true;
        };
        let segment_start = slot
            .checked_sub(1)
            .and_then(|s| self.space.bfn_of(s))
            .is_none_or(|before| before.0.checked_add(1) != Some(bfn.0));
        bfn.0 & BLOCK == 0 || segment_start
    }

    /// Whether a slice of a walk that has made `visits` visits and
    /// `revokes` revocations ends before slot `slot`: past its bounds, at
    /// a place [`slice_may_end_at`](Self::slice_may_end_at) allows, and
    /// in any case at the most a slice may make (a backstop).
    pub(super) fn slice_ends(&self, visits: u64, revokes: u32, slot: u64) -> bool {
        const PAST: u64 = pviommu_abi::EXTENT_PAGES - 1;
        (visits >= SLICE_VISITS || revokes >= SLICE_REVOKES)
            && (self.slice_may_end_at(slot)
                || visits >= SLICE_VISITS + PAST
                || revokes >= SLICE_REVOKES_MOST)
    }

    /// Clear the IOMMU entries of the owner's unmaps since the last flush,
    /// retry the IOMMU unmaps of stuck entries, flush what driver `d`
    /// gathered, and after a successful flush release every unmapped page:
    /// explicit unmaps free their BFN, revocations become notices. A failed
    /// flush releases nothing (retried next time). At most `budget`
    /// entries of the list go, taken off it: the caller's budget, shared by
    /// every cell it flushes (a hook, a teardown slice and the end of an
    /// owner's call each start from [`RELEASE_BUDGET`]), as what failed
    /// flushes left can be the quota in every cell. With none left the
    /// flush still runs (what the caller revoked must be out of the
    /// device's reach when it returns) and nothing is released.
    ///
    /// Every flush of a cell comes through here (the owner's `finish`, the
    /// hooks, teardown slices), so no page is released while an entry an
    /// unmap left still maps it.
    pub(super) fn flush_and_release(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        budget: &mut u64,
    ) -> Released {
        self.flush_and_release_as(d, h, false, budget)
    }

    /// [`flush_and_release`](Self::flush_and_release), for the owner's own
    /// call (`owner_call`): then the maps' pending entries are written
    /// first. A hook or a teardown leaves them to the owner's call, whose
    /// end writes them (a pending map is Live with no entry: the device
    /// reaches nothing through it, and a hook takes it down as any other),
    /// so a hook of one target never makes IOMMU entries of another.
    pub(super) fn flush_and_release_as(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        owner_call: bool,
        budget: &mut u64,
    ) -> Released {
        let space = &self.space;
        let owner = d.dd.domid;
        if owner_call && !d.dd.pending_maps.is_empty() {
            self.write_pending_entries(d, h);
        }
        let dd = &mut *d.dd;
        let t0 = self.clock(h);
        if dd.deferred_entries != 0 {
            self.clear_deferred_entries(dd, h);
        }
        // Stuck entries: at most `STUCK_RETRIES` of them, oldest first;
        // a failure goes back to the tail. (Retrying the whole list made
        // one call's work grow with every unmap the IOMMU had refused, up
        // to the quota's million, on a hypercall or a hook.)
        let mut unstuck = 0;
        for _ in 0..dd.stuck().min(STUCK_RETRIES) {
            let Some((at, mapping, then_revoked)) = dd.pop_stuck() else {
                break;
            };
            let unmapped = space.bfn_of(at).is_some_and(|bfn| {
                entry_gone(mapping.context, dd.iommu_unmap(h, mapping.context, bfn))
            });
            if unmapped {
                dd.push_unmapping_at(at, then_revoked, false);
                unstuck += 1;
            } else {
                dd.push_stuck(at, mapping, then_revoked);
            }
        }
        dd.stats.ns_iommu_unmap += self.since(h, t0);
        if !self.flush_gathered(dd, h) {
            // Nothing waits for this flush but the tables an earlier one
            // covered: a budget of them goes all the same.
            let (tables_freed, left) = Self::free_tables(dd, h, budget);
            return Released {
                unstuck,
                tables_freed,
                left,
                ..Released::default()
            };
        }
        let t2 = self.clock(h);
        let cell = d.cell;
        // The list's head follows the releases (each entry leaves it before
        // its page is released), so `has_pending()` holds while any entry
        // is left: a target's bit goes (`end_release_run`) only once no page
        // of it is left here. Emptied up front, the head let a run of one
        // target clear its bit while a later entry of the same target still
        // held its page, and a teardown reading the bits could end while
        // that reference was still held (review).
        let mut at = dd.unmapping_head;
        let mut notices = false;
        // Consecutive releases of one target leave its gate together: one
        // atomic per run rather than per page. Leaving later than each
        // page's release is safe: a share held longer only sends a hook
        // through the locks it would have skipped.
        let mut run: Option<(DomId, u32)> = None;
        let before = *budget;
        // Whether the last step freed its slot, linked back to `at` as if
        // `at` were freed next (`take_released`).
        let mut linked = false;
        while *budget != 0 {
            // (An entry freed here, the usual owner's unmap, is freed by
            // this one access to its slot; its page goes just after.)
            let Some(u) = dd.take_released(at, linked) else {
                break;
            };
            let freed = !u.entry_present && !u.then_revoked;
            if linked && !freed {
                dd.unset_free_head_link();
            }
            linked = freed;
            *budget -= 1;
            // (Its length follows after the loop, by the entries taken:
            // nothing in it reads the length.)
            dd.unmapping_head = u.next;
            if u.entry_present {
                // The IOMMU refused to clear its entry (above): the page
                // stays referenced, the BFN taken, and the unmap is retried
                // as a stuck one is; once it goes, the slot is free (no
                // notice: the owner unmapped it).
                // (Every marked slot a release pass meets was tried by
                // the clearing pass before it: `check_invariants` holds
                // the count to the slots.)
                debug_assert!(dd.refused_clears != 0, "a marked slot no clear tried");
                dd.refused_clears = dd.refused_clears.saturating_sub(1);
                if let Some(Slot::Unmapping {
                    mapping,
                    then_revoked,
                    ..
                }) = dd.slot(at)
                {
                    dd.push_stuck(at, mapping, then_revoked);
                }
                at = u.next;
                continue;
            }
            let domid = u.domid;
            run = match run {
                Some((d, n)) if d == domid => Some((d, n + 1)),
                other => {
                    if let Some((d, n)) = other {
                        self.end_release_run(cell, dd, d, n);
                    }
                    Some((domid, 1))
                }
            };
            if u.then_revoked {
                notices = true;
                // From 1: a number of 0 is never a notice's, so a caller
                // can tell a number from a field nobody wrote (and 0, were
                // the owner's count missing, is one no ack can name).
                let order = self
                    .notice_counts
                    .get(owner.0 as usize)
                    .map_or(0, |n| n.fetch_add(1, Ordering::SeqCst).wrapping_add(1));
                dd.push_revoked_unmapped(at, order);
            }
            at = u.next;
            // The page last: the host's call is the step's one call, and
            // nothing above reads or changes the page (the run ended above
            // is of pages released before). Made first, it kept the step's
            // values on the stack around it.
            h.put_page(u.mfn, u.writable);
            // What usually follows, plain releases of the same target, in
            // a loop of its own (`release_plain`): this one's values held
            // across each page's call cost every page about 30
            // instructions of stack. It makes the very steps this loop
            // would (the step above freed its slot: `linked`), and leaves
            // the next one that is not plain to it.
            if let (true, Some((d, n))) = (linked, run.as_mut()) {
                let (stop, left) = Self::release_plain(dd, h, at, *d, *budget);
                let taken = *budget - left;
                *budget = left;
                at = stop;
                dd.unmapping_head = at;
                // (Wrapping, as the step's `+ 1`: at most the budget.)
                *n = n.wrapping_add(taken as u32);
            }
        }
        if linked {
            dd.unset_free_head_link();
        }
        // The list's end reached: empty (already so, unless a link led to
        // a slot that is not Unmapping). Else the budget left `at` on.
        let released = before - *budget;
        dd.unmapping_len = dd.unmapping_len.saturating_sub(released);
        let pages_left = *budget == 0 && dd.unmapping_at(at).is_some();
        if !pages_left {
            dd.unmapping_head = NONE;
            dd.unmapping_len = 0;
        }
        // Then the tables the flushes emptied, with what is left.
        let (tables_freed, tables_left) = Self::free_tables(dd, h, budget);
        let left = pages_left || tables_left;
        if let Some((domid, n)) = run {
            self.end_release_run(cell, dd, domid, n);
        }
        dd.stats.ns_put_page += self.since(h, t2);
        if notices {
            // Once per flush, not per notice: the owner drains the queue.
            h.notify_revoked(owner);
        }
        Released {
            unstuck,
            released,
            tables_freed,
            left,
        }
    }

    /// The release pass's plain steps from slot `at` on, while `budget`
    /// lasts: each slot an owner's unmap left (its entry cleared, no
    /// notice to follow) of `domid`, the target of the run the step before
    /// it released, and that step freed its slot (`take_released` with
    /// `linked`). Each is freed and its page released, as the pass's step
    /// does ([`DriverDomain::take_released_plain_before`]); the first that
    /// is not such a slot is left as it is. Returns where it stopped and
    /// the budget left. (The unmapping list's head and the run's count are
    /// the caller's to move: nothing here reads them.)
    #[inline(never)]
    fn release_plain(
        dd: &mut DriverDomain,
        h: &mut impl Hypervisor,
        mut at: u64,
        domid: DomId,
        mut budget: u64,
    ) -> (u64, u64) {
        // The free list's head held here and stored once after the loop,
        // with the count of slots freed (what the budget went down by):
        // stored at each step, both cost each page a store. (Nothing reads
        // them in between: `dd` is this loop's until it ends.)
        let mut head = dd.free_head;
        let before = budget;
        while budget != 0 {
            let Some((mfn, writable, next)) = dd.take_released_plain_before(at, domid, head) else {
                break;
            };
            head = at;
            budget -= 1;
            at = next;
            h.put_page(mfn, writable);
        }
        dd.free_head = head;
        dd.free += before - budget;
        (at, budget)
    }

    /// Free the tables `dd`'s flushes emptied, [`TABLE_FREE_COST`] of
    /// `budget` each, while it lasts and at most [`TABLE_FREES_PER_CALL`]
    /// (a hook's budget grows with what it revoked: a review of
    /// 2026-12-06): how many went, and whether any is left. The one way
    /// the engine frees them outside a context's destroy.
    pub(super) fn free_tables(
        dd: &mut DriverDomain,
        h: &mut impl Hypervisor,
        budget: &mut u64,
    ) -> (u64, bool) {
        let mut tables = usize::try_from(*budget / TABLE_FREE_COST)
            .unwrap_or(usize::MAX)
            .min(TABLE_FREES_PER_CALL);
        let before = tables;
        let left = dd.free_flushed_tables(h, &mut tables);
        let freed = before.saturating_sub(tables) as u64;
        *budget = budget.saturating_sub(freed.saturating_mul(TABLE_FREE_COST));
        (freed, left)
    }

    /// [`write_pending_entries`](Self::write_pending_entries) in the
    /// middle of a call (`DEFER_LIMIT` reached), and the IOTLB flush at
    /// once: see [`flush_gathered`](Self::flush_gathered).
    pub(super) fn write_pending_entries_mid_call(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
    ) {
        self.write_pending_entries(d, h);
        self.flush_gathered(&mut d.dd, h);
    }

    /// [`clear_deferred_entries`](Self::clear_deferred_entries) in the
    /// middle of a call, and the IOTLB flush at once (see
    /// [`flush_gathered`](Self::flush_gathered)); the pages still wait
    /// for the call's end.
    pub(super) fn clear_deferred_entries_mid_call(
        &self,
        dd: &mut DriverDomain,
        h: &mut impl Hypervisor,
    ) {
        self.clear_deferred_entries(dd, h);
        self.flush_gathered(dd, h);
    }

    /// Flush what `dd` gathered, if anything, releasing nothing: false if
    /// the flush failed (the gather kept, `flush_failed` set). Every flush
    /// of a cell's gather: `flush_and_release`'s, and the one at once after
    /// context-0 entries were written or cleared in the middle of a call. Xen may have taken
    /// a table of its own down on the way (a leaf table folded into a
    /// superpage, one an order-9 map or unmap replaced) and queued it for a
    /// tasklet that frees it as soon as this CPU processes softirqs: on the
    /// way back to the guest when the call is preempted, or in a guest copy
    /// or page lookup that waits. Until the IOTLB flush the IOMMU may still
    /// walk it through its caches, and a freed frame may be anyone's by
    /// then (Xen's own batches flush before they can get there too). The
    /// flush covers everything gathered so far, so the release pass at the
    /// call's end may go by it; a failed one is kept, as at the end.
    fn flush_gathered(&self, dd: &mut DriverDomain, h: &mut impl Hypervisor) -> bool {
        if dd.gather.is_empty() {
            return true;
        }
        let t0 = self.clock(h);
        let flushed = dd.iommu_flush(h);
        dd.stats.ns_iommu_flush += self.since(h, t0);
        dd.stats.flushes += 1;
        dd.flush_failed = flushed.is_err();
        if !dd.flush_failed {
            dd.gather.clear();
        }
        !dd.flush_failed
    }

    /// The first step of every flush: write the context-0 entries maps
    /// left (`pending_maps`, in map order), a run of consecutive BFNs and
    /// frames of one access and attribute in one call: on Xen one
    /// `iommu_map()`, which maps each part of the run aligned to 2 MiB in
    /// both with one entry. A run the IOMMU refuses is mapped a page at a
    /// time; a page it still refuses is revoked (its owner was handed the
    /// BFN: it gets a notice, as if the page had gone). A slot no longer
    /// live with its generation (unmapped or revoked meanwhile, or installed
    /// again: that install has its own entry in the list) is skipped. Bounded by
    /// `DEFER_LIMIT` (a map that reaches it writes them at once).
    pub(super) fn write_pending_entries(&self, d: &mut Driver<'_, L>, h: &mut impl Hypervisor) {
        let pending = core::mem::take(&mut d.dd.pending_maps);
        let t0 = self.clock(h);
        // A run is grown in a loop of its own, its fields in registers, and
        // written once the next map does not continue it; that map, read
        // again after the write, may start the next run. (The write, a
        // refused page's take-down included, changes nothing
        // `pending_entry` reads of a slot outside the run, whose links it
        // may rewrite; and each (slot, generation) waits once.) (One loop with the run an `Option` kept
        // it on the stack: 13 instructions a map more.) Bounded: `i` rises
        // each time round either loop.
        let mut i = 0;
        while i < pending.len() {
            let start = i;
            i += 1;
            let Some(mut run) = pending.get(start).and_then(|p| self.pending_run(&d.dd, p)) else {
                continue;
            };
            while let Some(n) = pending.get(i).and_then(|p| self.pending_run(&d.dd, p)) {
                if !run.grow(&n) {
                    break;
                }
                i += 1;
            }
            self.write_run(d, h, &run, pending.get(start..i).unwrap_or(&[]));
        }
        d.dd.stats.ns_iommu_map += self.since(h, t0);
        // The capacity stays for the next call's maps.
        let mut pending = pending;
        pending.clear();
        d.dd.pending_maps = pending;
    }

    /// The run of one that waiting map `p` starts, if its slot still holds
    /// the mapping it installed (Live, context 0, its generation): a slot
    /// unmapped or revoked meanwhile, or installed again (that install has
    /// its own entry in the list), is skipped. Only the fields the entry
    /// takes are read from the slot: decoding the whole mapping was most of
    /// the cost of writing a map.
    #[inline(always)]
    fn pending_run(&self, dd: &DriverDomain, p: &PendingMap) -> Option<PendingRun> {
        let idx = u64::from(p.slot);
        let (mfn, access) = dd.pending_entry(idx, p.gen)?;
        Some(PendingRun::new(self.space.bfn_of(idx)?, mfn, access))
    }

    /// Write `run` (whose slots are `slots`, in its order); on refusal page
    /// by page, revoking what the IOMMU still refuses.
    fn write_run(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        run: &PendingRun,
        slots: &[PendingMap],
    ) {
        let (perms, attr) = (run.access.perms(), run.access.attr());
        if d.dd
            .iommu_map_run(h, run.bfn, run.mfn, run.pages, perms, attr)
            .is_ok()
        {
            return;
        }
        for (i, p) in (0u64..).zip(slots.iter()) {
            let Some(off) = run.offset_of(i) else {
                break;
            };
            let (Some(bfn), Some(mfn)) = (run.bfn.0.checked_add(off), run.mfn.0.checked_add(off))
            else {
                break;
            };
            let mapped =
                d.dd.iommu_map(h, ContextId::DEFAULT, Bfn(bfn), Mfn(mfn), perms, attr);
            if mapped.is_err() {
                // The gate bit goes at this flush's release, with the page.
                self.take_down_live(d, h, u64::from(p.slot), true);
            }
        }
    }

    /// The first step of every flush: clear the IOMMU entries the owner's
    /// unmaps left (Unmapping slots with `entry_present`), a run of
    /// consecutive BFNs in one call: on Xen one `iommu_unmap()`, which
    /// clears an aligned 2 MiB with one entry and so never splits a
    /// superpage there. A run the IOMMU refuses is cleared a page at a
    /// time; a page it still refuses keeps its mark, and the release pass
    /// moves it to the stuck list. Walks the head of the unmapping list
    /// that holds the `deferred_entries` marked since the last pass (each
    /// slot once, and a run the IOMMU refused once more): bounded by the
    /// unmaps since then, which an unmap batch keeps below
    /// [`DEFER_LIMIT`] plus a run.
    ///
    /// A slot's mark goes as the walk takes it into a run, before the
    /// run's call (the lock is held throughout, and nothing reads the
    /// marks in between): the usual run, cleared whole, is then not walked
    /// again. A run the IOMMU refuses is walked again, page by page, and a
    /// page it still refuses is marked again ([`clear_refused_run`]).
    ///
    /// [`clear_refused_run`]: Self::clear_refused_run
    pub(super) fn clear_deferred_entries(&self, dd: &mut DriverDomain, h: &mut impl Hypervisor) {
        let mut walk = DeferredWalk {
            left: core::mem::take(&mut dd.deferred_entries),
            at: dd.unmapping_head,
            // A list longer than the slots is a broken one: stop (what it
            // left marked is never released, see above).
            steps: dd.slots.len(),
        };
        // A run is grown in a loop of its own, its fields in registers,
        // and cleared once the next slot does not extend it; that slot,
        // already unmarked, starts the next run if it can (`carried`). (One
        // loop with the run an `Option` kept it on the stack: 5
        // instructions a page more.) Bounded:
        // each step of the walk takes one of `walk.steps`, and either loop
        // takes a step each time round.
        let mut carried: Option<DeferredRun> = None;
        loop {
            let mut run = match carried.take() {
                Some(r) => r,
                None => match self.next_deferred(dd, &mut walk) {
                    Some(Some((context, bfn))) => DeferredRun::new(context, bfn),
                    Some(None) => continue,
                    None => break,
                },
            };
            let mut walked_all = false;
            loop {
                match self.next_deferred(dd, &mut walk) {
                    Some(Some((context, bfn))) if run.grow(context, bfn) => {}
                    Some(Some((context, bfn))) => {
                        carried = Some(DeferredRun::new(context, bfn));
                        break;
                    }
                    Some(None) => break,
                    None => {
                        walked_all = true;
                        break;
                    }
                }
            }
            self.clear_run(dd, h, run);
            if walked_all {
                break;
            }
        }
    }

    /// One step of [`clear_deferred_entries`](Self::clear_deferred_entries)'
    /// walk: the slot at `walk.at`, its mark taken off (only with a BFN: a
    /// marked slot without one joins no run and keeps its mark, as
    /// before). `Some(Some((context, bfn)))` for an entry to clear,
    /// `Some(None)` for a slot that joins no run (no entry left, or no
    /// BFN), `None` once the walk is over: every mark found, the steps
    /// spent, or a slot off the unmapping list (a broken list). Not to be
    /// called again after `None` (a broken list's step is spent).
    #[inline(always)]
    fn next_deferred(
        &self,
        dd: &mut DriverDomain,
        walk: &mut DeferredWalk,
    ) -> Option<Option<(ContextId, u64)>> {
        if walk.left == 0 || walk.steps == 0 {
            return None;
        }
        walk.steps -= 1;
        // A slot with a BFN (every slot the space handed out has one) is
        // the loop's case, unmarked with no test of whether to; one
        // without is out of line. (With one path for both, whether to
        // unmark was tested again after the slot's state: 5 instructions
        // a page.)
        let Some(bfn) = self.space.bfn_of(walk.at) else {
            let (present, next) = Self::deferred_step_without_bfn(dd, walk.at)?;
            walk.left -= u64::from(present);
            walk.at = next;
            return Some(None);
        };
        let (present, context, next) = dd.unmapping_link_unmark(walk.at, true)?;
        walk.left -= u64::from(present);
        walk.at = next;
        Some(present.then_some((context, bfn.0)))
    }

    /// [`next_deferred`](Self::next_deferred)'s step at a slot without a
    /// BFN: it keeps its mark and joins no run. (Whether it was marked,
    /// and the next slot; `None` off the unmapping list.)
    #[cold]
    #[inline(never)]
    fn deferred_step_without_bfn(dd: &mut DriverDomain, at: u64) -> Option<(bool, u64)> {
        let (present, _, next) = dd.unmapping_link_unmark(at, false)?;
        Some((present, next))
    }

    /// Clear the entries of `run`, whose slots' marks the walk took off
    /// (see [`clear_deferred_entries`](Self::clear_deferred_entries)).
    fn clear_run(&self, dd: &mut DriverDomain, h: &mut impl Hypervisor, run: DeferredRun) {
        if dd
            .iommu_unmap_run(h, run.context, Bfn(run.first), run.pages)
            .is_err()
        {
            self.clear_refused_run(dd, h, run);
        }
    }

    /// A run the IOMMU refused whole: its pages one at a time, each it
    /// still refuses marked again. By BFN, not by the list's links: the
    /// run is every BFN from `first` on (a run grows only at its ends),
    /// each BFN has one slot, and the walk had taken every one of their
    /// marks off, so none may be missed here (one left unmarked would be
    /// released with its entry present: review 155).
    #[cold]
    #[inline(never)]
    fn clear_refused_run(&self, dd: &mut DriverDomain, h: &mut impl Hypervisor, run: DeferredRun) {
        // (At most `MAX_IOMMU_RUN` pages: `DeferredRun::grow`.)
        for bfn in (run.first..).take(run.pages as usize).map(Bfn) {
            // (`NoEnt` here, in any context, is an entry the failed run
            // cleared before it stopped: unlike `entry_gone`'s, this slot's
            // entry was known to exist until this run.)
            if matches!(
                dd.iommu_unmap(h, run.context, bfn),
                Ok(()) | Err(Errno::NoEnt)
            ) {
                continue;
            }
            // Marked again: the release pass moves it to the stuck list;
            // until then the retry flag counts it.
            dd.refused_clears += 1;
            let marked = self
                .space
                .index_of(bfn)
                .is_some_and(|idx| dd.entry_marked_again(idx));
            debug_assert!(marked, "a refused run's BFN {bfn:?} has no unmapping slot");
        }
    }

    /// `n` released pages of `domid` are out of the device's reach: their
    /// gate shares go, and a target this cell no longer maps loses its bit.
    fn end_release_run(&self, cell: usize, dd: &DriverDomain, domid: DomId, n: u32) {
        if let Some(g) = self.gate(domid) {
            g.active.fetch_sub(n, Ordering::SeqCst);
        }
        if dd.pages_of(self.seed, domid) == 0 && !dd.has_pending() {
            self.set_gate_bit(cell, domid, false);
        }
    }

    /// The p2m of `domid` changed for gfns `[gfn, gfn + 2^order)` (called
    /// after the change, possibly with `domid`'s p2m lock held; also after a
    /// change that failed half-way: revoking only ever removes access).
    /// When nothing maps `domid` and no map of it is in flight this takes no
    /// lock. Otherwise it visits only the driver domains whose cells the
    /// target's gate names, one lock at a time, and every affected mapping
    /// is revoked and flushed (out of the device's reach) before returning,
    /// and released too, unless failed flushes left a cell more pages
    /// waiting than the hook's budget (see `budget` below): those stay
    /// referenced until the cell's next flush. In-flight maps of `domid`
    /// see the sequence number move and look their page up again.
    pub fn gfn_changed(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        gfn: Gfn,
        order: u32,
        how: GfnChange,
    ) {
        // (Hosted builds: Xen holds `domid`'s p2m lock for the hook, which
        // the simulated services check no page lookup or guest copy takes
        // again.)
        #[cfg(feature = "std")]
        let _p2m = crate::lock_check::P2mHook::enter(domid);
        let Some(gate) = self.gate(domid) else {
            return;
        };
        if gate.active.load(Ordering::SeqCst) == 0 {
            return;
        }
        gate.seq.fetch_add(1, Ordering::SeqCst);
        let mask = gate.drivers();
        let count = 1u64.checked_shl(order).unwrap_or(u64::MAX);
        // The cells whose bit is set, lowest first: a hook's cost follows
        // the driver domains that map the target, not the number of cells
        // (testing every bit was half of a hook for an unmapped gfn).
        // What the hook releases: as many as it revoked itself and as the
        // flush may retry stuck entries (which go on the list ahead of
        // them, newest first, if the IOMMU unmaps them at last), and at
        // most `RELEASE_BUDGET` more of what waited, over all its cells.
        // A cell's list is released newest first: the hook's own pages go
        // first, the oldest of a backlog last.
        let mut budget = RELEASE_BUDGET;
        for cell in cells_in(mask) {
            // (Every bit names a cell: there are at most 128, checked at
            // build time.)
            let Some(mut d) = self.lock_cell_number(cell) else {
                break;
            };
            let revoked_before = d.dd.stats.revocations;
            if count == 1 {
                self.revoke_gfn(&mut d, h, domid, gfn, how);
            } else {
                self.revoke_range(&mut d, h, domid, (gfn.0, gfn.0.saturating_add(count)), how);
            }
            // Nothing of this gfn here and nothing pending (the common case
            // of a ballooned page nobody mapped): nothing to flush. Pending
            // unmaps of the owner's batch are flushed, so no entry of the
            // page stays reachable through the IOTLB after the hook. The
            // bit is cleared if the cell no longer needs it (never set: a
            // teardown may have cleared it since this hook read the gate).
            let revoked = d.dd.stats.revocations.wrapping_sub(revoked_before);
            if revoked != 0 || d.dd.has_pending() {
                let retried = d.dd.stuck().min(STUCK_RETRIES);
                let mut here = budget.saturating_add(revoked).saturating_add(retried);
                self.flush_and_release(&mut d, h, &mut here);
                budget = budget.min(here);
            }
            self.clear_gate_bit_if_unused(cell, &d.dd, domid);
            self.put_driver(d);
        }
    }

    /// Revoke what one cell maps of `domid` in gfns `[first, last)` (at
    /// least two) by page-index probes, or by one pass over every slot
    /// (the slot array's length, not the live ones) where probes would
    /// cost more. A probe costs about [`PROBE_COST_IN_SLOTS`] slots of the
    /// pass, so a pass's worth of probes is the budget:
    /// * where the cell's region counts are exact, one probe per region
    ///   tells whether the cell maps anything there, and only the gfns of
    ///   those that it does are probed: a range it maps nothing of (VRAM
    ///   dirty tracking, a superpage elsewhere) costs a probe per 64 MiB.
    ///   Once the budget is spent, the pass does the rest;
    /// * otherwise every gfn is probed, if the budget allows.
    ///
    /// So under the lock a range costs at most a pass's worth of probes
    /// and then a pass, whatever its length (the pass finds only what the
    /// probes left: revoking a mapping twice is not possible).
    fn revoke_range(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        (first, last): (u64, u64),
        how: GfnChange,
    ) {
        // After an index miss the indices are not trusted (see
        // `revoke_gfn`): one pass, whatever the counts say.
        if d.dd.indices_suspect() {
            return self.pass_over_range(d, h, domid, (first, last), how);
        }
        let budget = d.dd.slots.len() as u64 / PROBE_COST_IN_SLOTS;
        if d.dd.regions_exact() {
            // Exact counts: no page at or beyond the numbered regions.
            let last = last.min(REGION_GFN_END);
            let mut left = budget;
            let mut at = first;
            // Bounded: `at` rises by a region each time round, and each
            // time costs one of `left`.
            while let (true, Some(region)) = (at < last, region_of(at)) {
                let end = ((region + 1) << REGION_SHIFT).min(last);
                let Some(after_region) = left.checked_sub(1) else {
                    return self.pass_over_range(d, h, domid, (at, last), how);
                };
                left = after_region;
                d.dd.range_work.0 += 1;
                if d.dd.may_map_in(self.seed, domid, region) {
                    let Some(after_gfns) = left.checked_sub(end - at) else {
                        return self.pass_over_range(d, h, domid, (at, last), how);
                    };
                    left = after_gfns;
                    self.probe_each_gfn(d, h, domid, (at, end), how);
                    // A broken index met on the way: one pass over the
                    // whole range (gfns probed before it included).
                    if d.dd.indices_suspect() {
                        return self.pass_over_range(d, h, domid, (first, last), how);
                    }
                }
                at = end;
            }
        } else if last - first <= budget {
            self.probe_each_gfn(d, h, domid, (first, last), how);
            if d.dd.indices_suspect() {
                self.pass_over_range(d, h, domid, (first, last), how);
            }
        } else {
            self.pass_over_range(d, h, domid, (first, last), how);
        }
    }

    /// Revoke what one cell maps of `domid` in `[first, last)` by one
    /// page-index probe per gfn.
    fn probe_each_gfn(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        (first, last): (u64, u64),
        how: GfnChange,
    ) {
        d.dd.range_work.0 += last - first;
        for g in first..last {
            self.revoke_page_chain(d, h, domid, Gfn(g), how);
        }
        // The extent records once per 2 MiB block of the range, not once
        // per gfn (a probe each, counted as one).
        if d.dd.has_extent_records() {
            let mut at = first;
            while at < last {
                let block_end = (at | (EXTENT_PAGES - 1)).saturating_add(1).min(last);
                d.dd.range_work.0 += 1;
                self.revoke_extent_pages(d, h, domid, (at, block_end), how);
                at = block_end;
            }
        }
    }

    /// Revoke what one cell maps of `domid` in `[first, last)` by one pass
    /// over its slots: for a range larger than everything mapped
    /// (log-dirty over the whole domain, a 1 GiB extent of a mapped
    /// region). Bounded: `from` only rises, up to the slot count.
    fn pass_over_range(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        range: (u64, u64),
        how: GfnChange,
    ) {
        d.dd.range_work.1 += 1;
        let any = how == GfnChange::Removed;
        let mut from = 0;
        while let Some(idx) = d.dd.next_live_in(from, domid, range, any) {
            self.revoke_slot(d, h, idx);
            from = idx + 1;
        }
    }

    /// Revoke what one cell maps of (domid, gfn): the mappings in the
    /// page's chain, then its pages in the records of its 2 MiB extent.
    /// After an engine bug that lost a mapping from an index (counted in
    /// `index_misses`) a pass over the slots finds it instead: the cell's
    /// hooks cost a pass each until it has no live mapping left, and no
    /// lost page stays mapped.
    fn revoke_gfn(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        gfn: Gfn,
        how: GfnChange,
    ) {
        if d.dd.indices_suspect() {
            return self.pass_over_range(d, h, domid, (gfn.0, gfn.0.saturating_add(1)), how);
        }
        self.revoke_page_chain(d, h, domid, gfn, how);
        self.revoke_extent_pages(d, h, domid, (gfn.0, gfn.0.saturating_add(1)), how);
        // A broken chain met on the way (noted): what it no longer leads
        // to is found by a pass.
        if d.dd.indices_suspect() {
            self.pass_over_range(d, h, domid, (gfn.0, gfn.0.saturating_add(1)), how);
        }
    }

    /// Revoke the mappings in the page index's chain of (domid, gfn).
    fn revoke_page_chain(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        gfn: Gfn,
        how: GfnChange,
    ) {
        // Bounded by the chain's bound. Each step saves the next link
        // before revoking: revoking unlinks the slot and reuses its link
        // field, while the next one stays live and chained.
        let mut at = d.dd.page_head(self.seed, domid, gfn);
        for _ in 0..CHAIN_BOUND {
            let Some(idx) = at else {
                return;
            };
            let Some(m) = d.dd.live_at(idx) else {
                // A chain holds Live slots only (a slot leaves it before
                // it leaves Live): a link to any other is a broken index.
                d.dd.note_index_miss();
                return;
            };
            at = (m.next_same_page != NONE).then_some(m.next_same_page);
            if how == GfnChange::Removed || m.perms.write {
                self.revoke_slot(d, h, idx);
            }
        }
        if at.is_some() {
            // Longer than any chain can be: broken.
            d.dd.note_index_miss();
        }
    }

    /// Revoke the pages of gfns `[first, last)` of `domid` (within one
    /// 2 MiB extent) in the records of that extent: one probe of the
    /// extent index for all of them, then each record of its chain,
    /// walked as a page chain is (revoking a record's last page frees it,
    /// so its next link is read first). Bounded by the chain's bound
    /// times the gfns.
    fn revoke_extent_pages(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        domid: DomId,
        (first, last): (u64, u64),
        how: GfnChange,
    ) {
        let mut rec = d.dd.extent_first(self.seed, domid, Gfn(first));
        for _ in 0..CHAIN_BOUND {
            let Some(r) = rec else {
                return;
            };
            // The next record, read before any page of this one goes.
            let Some((next, _)) = d.dd.extent_step(r, domid, Gfn(first)) else {
                // The first record is the index's (checked); a link to a
                // record of another extent, or a free one, is a broken
                // chain (only the record walked can go during the walk).
                d.dd.note_index_miss();
                return;
            };
            rec = next;
            for g in first..last {
                let member = d.dd.extent_step(r, domid, Gfn(g)).and_then(|(_, m)| m);
                let Some((idx, m)) = member.and_then(|i| Some((i, d.dd.live_at(i)?))) else {
                    continue;
                };
                if how == GfnChange::Removed || m.perms.write {
                    self.revoke_slot(d, h, idx);
                }
            }
        }
        if rec.is_some() {
            // Longer than any chain can be: broken.
            d.dd.note_index_miss();
        }
    }

    /// Convenience for a single removed gfn.
    pub fn gfn_removed(&self, h: &mut impl Hypervisor, domid: DomId, gfn: Gfn) {
        self.gfn_changed(h, domid, gfn, 0, GfnChange::Removed)
    }

    /// One slice of the teardown of a dying domain (Xen: from `domain_kill`,
    /// restartable like `domain_relinquish_resources`). `cursor` starts at 0
    /// and is the engine's; `Err(Restart)` means call again. Phases: stop
    /// in-flight maps of the domain; revoke, in every driver domain that
    /// maps it, the mappings of its pages (their owners get notices); drop
    /// everything it owned as a driver domain. Each slice visits at most
    /// [`SLICE_VISITS`] slots and unmaps at most [`SLICE_REVOKES`] pages,
    /// and on to where a 2 MiB block of BFNs starts (at most 511 slots
    /// more: [`SLICE_REVOKES_MOST`] unmaps).
    ///
    /// A teardown that keeps failing to make progress (an IOMMU refusing
    /// its unmaps or flushes) restarts with
    /// [`teardown_stalled`](Self::teardown_stalled) saying so after
    /// [`STALLED_RESTARTS`] of them in a row; Xen then answers the
    /// toolstack `-EBUSY` and leaves the domain dying. The next call
    /// starts counting again.
    pub fn domain_teardown(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        cursor: &mut u64,
    ) -> Result<(), Restart> {
        // (Hosted builds: Xen runs each slice under `domctl_lock`, a
        // spinlock: no `[unlocked]` service may be called from it.)
        #[cfg(feature = "std")]
        let _atomic = crate::lock_check::HostAtomic::enter("domctl_lock (a teardown slice)");
        let mut c = Cursor::unpack(*cursor);
        if c.passes & STALLED != 0 {
            c.passes = 0;
        }
        let result = self.teardown_slice(h, domid, &mut c);
        *cursor = c.pack();
        result
    }

    /// Whether the teardown slice that left `cursor` restarted as stalled:
    /// its last [`STALLED_RESTARTS`] restarts released nothing.
    pub fn teardown_stalled(cursor: u64) -> bool {
        let c = Cursor::unpack(cursor);
        c.phase != PHASE_DONE && c.passes & STALLED != 0
    }

    /// A restart that made progress (`true`), or one more without: the
    /// cursor's count, said stalled once it reaches [`STALLED_RESTARTS`].
    fn count_restart(c: &mut Cursor, progress: bool) {
        let stalled = if progress {
            0
        } else {
            (c.passes & STALL_COUNT) + 1
        };
        c.passes = if stalled >= STALLED_RESTARTS {
            STALLED
        } else {
            stalled
        };
    }

    fn teardown_slice(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        if c.phase == PHASE_START {
            // Maps of this domain that looked a page up before it started
            // dying retry, and then find it dying.
            if let Some(g) = self.gate(domid) {
                g.seq.fetch_add(1, Ordering::SeqCst);
                let active = g.active.load(Ordering::SeqCst);
                g.teardown_active.store(active, Ordering::Relaxed);
            }
            *c = Cursor::start_of(PHASE_AS_TARGET);
        }
        if c.phase == PHASE_AS_TARGET {
            if self.target_active(domid) == 0 {
                self.clear_stale_gate_bits(domid);
                *c = Cursor::start_of(PHASE_AS_DRIVER);
            } else {
                return self.teardown_as_target(h, domid, c);
            }
        }
        if c.phase == PHASE_AS_DRIVER {
            let done = self.teardown_as_driver(h, domid, c);
            if done.is_ok() {
                self.forget_domid(domid);
            }
            return done;
        }
        // Done (the glue does not call again; if it does, nothing to do).
        Ok(())
    }

    /// Clear the bits a dying domain's gate still has although nothing
    /// holds a page of it (`target_active` is 0): a cell keeps its bit while
    /// it has work pending for *any* target (see
    /// [`clear_gate_bit_if_unused`](Engine::clear_gate_bit_if_unused)), so
    /// a bit set while the cell held an entry of the domain can outlive that
    /// entry's flush if other work is pending then (a map that set a clear
    /// bit and left no entry takes it back itself). Left set, a later domain with
    /// the same id would have its hooks, and its own teardown, sent through
    /// that cell. Each bit is cleared under its cell's lock, as every
    /// change of it is, unless the cell still maps a page of the domain
    /// (it cannot: live mappings count in `target_active`). No map sets a
    /// bit again: a map sets its bit only after its page lookup, and the
    /// lookup of a dying domain's page fails. At most one lock per cell.
    fn clear_stale_gate_bits(&self, domid: DomId) {
        for cell in cells_in(self.target_drivers(domid)) {
            let Some(d) = self.lock_cell_number(cell) else {
                break;
            };
            self.set_gate_bit(cell, domid, d.dd.pages_of(self.seed, domid) != 0);
        }
    }

    /// Revoke the dying domain's pages in each driver cell its gate names,
    /// cell by cell (the cursor's `driver` is a cell number), walking again
    /// until no cell holds a page of it.
    fn teardown_as_target(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        let mut retried = false;
        let walked =
            self.walk_cells_of_target(h, domid, GfnChange::Removed, ALL_GFNS, c, &mut retried);
        if retried {
            c.passes |= RETRIED_STUCK;
        }
        walked?;
        // Walked every cell. A cell keeps its bit in the gate while it holds
        // a page of the domain (a flush that failed, an unmap the IOMMU
        // refused): then the walk starts again, flushing again, until it
        // succeeds. (Moving on regardless finished the teardown with the
        // pages still referenced until the driver's next flush: the domain
        // stayed a zombie for as long as its driver stayed idle.) The bits,
        // not `target_active`, decide: that count also has maps in flight
        // (a map that passed its checks, until it gives its share back),
        // which a teardown has no reason to wait for; before maps joined
        // only after their checks, any caller could raise it.
        // No map installs a page of the domain after the first slice moved
        // its sequence number; one in flight sets a bit only while it holds
        // the cell's lock, and clears it before letting go.
        // Progress: fewer of its pages held than at the last walk's end,
        // released by this walk or by anyone between its slices (the
        // owners' own flushes, their retries of stuck entries).
        let released = self.gate(domid).is_some_and(|g| {
            let now = g.active.load(Ordering::SeqCst);
            let before = g.teardown_active.swap(now, Ordering::Relaxed);
            now < before
        });
        let progress = released || c.passes & RETRIED_STUCK != 0;
        let passes = c.passes;
        if self.target_drivers(domid) == 0 {
            *c = Cursor::start_of(PHASE_AS_DRIVER);
        } else {
            *c = Cursor {
                passes,
                ..Cursor::start_of(PHASE_AS_TARGET)
            };
            Self::count_restart(c, progress);
        }
        Err(Restart)
    }

    /// One slice of a walk over the cells `domid`'s gate names, from the
    /// cursor's cell and slot on, revoking the mappings of `domid`'s pages
    /// in gfns `[first, last)` that `how` takes away (every one, or the
    /// writable ones). `Ok` once the walk has passed the last cell (the
    /// cursor then points past it); `Err(Restart)` when the slice's budget
    /// ran out first. Each cell is flushed before its lock is let go, so
    /// what a slice revoked is out of the device's reach when it returns.
    /// A cell whose region counts say it maps nothing of the range is
    /// skipped for a probe per region (a range of up to
    /// [`SKIP_CHECK_REGIONS`] regions).
    fn walk_cells_of_target(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        how: GfnChange,
        (first, last): (u64, u64),
        c: &mut Cursor,
        retried: &mut bool,
    ) -> Result<(), Restart> {
        // Whether a cell's flush unmapped a stuck entry at last, or let go
        // of unmapped pages (of any target: a cell's stuck list is one
        // queue, retried in turn, and its unmapping list another, released
        // [`RELEASE_BUDGET`] at a time).
        let mut budget = RELEASE_BUDGET;
        let mut flush = |d: &mut Driver<'_, L>, h: &mut _| {
            let r = self.flush_and_release(d, h, &mut budget);
            *retried |= r.unstuck != 0 || r.released != 0;
        };
        let mask = self.target_drivers(domid);
        let mut visits = 0u64;
        let mut revokes = 0u32;
        while let Some(cell) = (c.driver as usize..self.cells.len()).find(|&i| mask & (1 << i) != 0)
        {
            if c.driver as usize != cell {
                *c = Cursor {
                    phase: c.phase,
                    passes: c.passes,
                    driver: cell as u16,
                    slot: 0,
                };
            }
            let Some(mut d) = self.lock_cell_number(cell) else {
                break;
            };
            let n = if c.slot == 0 && !self.may_map_in_range(&d.dd, domid, (first, last)) {
                visits += 1;
                0
            } else {
                d.dd.slots.len() as u64
            };
            while c.slot < n {
                if self.slice_ends(visits, revokes, c.slot) {
                    flush(&mut d, h);
                    self.clear_gate_bit_if_unused(cell, &d.dd, domid);
                    self.put_driver(d);
                    return Err(Restart);
                }
                visits += 1;
                if d.dd.live_at(c.slot).is_some_and(|m| {
                    m.domid == domid
                        && (first..last).contains(&m.gfn.0)
                        && (how == GfnChange::Removed || m.perms.write)
                }) {
                    self.revoke_slot(&mut d, h, c.slot);
                    revokes += 1;
                }
                c.slot += 1;
            }
            flush(&mut d, h);
            self.clear_gate_bit_if_unused(cell, &d.dd, domid);
            self.put_driver(d);
            *c = Cursor {
                phase: c.phase,
                passes: c.passes,
                driver: cell as u16 + 1,
                slot: 0,
            };
        }
        Ok(())
    }

    /// Whether cell `dd` may map a page of `domid` in gfns `[first, last)`:
    /// `false` only when its region counts are exact and name none of the
    /// range's regions, checked for a range of at most
    /// [`SKIP_CHECK_REGIONS`] regions (bounded: one probe a region).
    fn may_map_in_range(&self, dd: &DriverDomain, domid: DomId, (first, last): (u64, u64)) -> bool {
        if first >= last {
            return false;
        }
        let (Some(r0), Some(r1)) = (region_of(first), region_of(last - 1)) else {
            return true;
        };
        if !dd.regions_exact() || r1 - r0 >= SKIP_CHECK_REGIONS {
            return true;
        }
        (r0..=r1).any(|r| dd.may_map_in(self.seed, domid, r))
    }

    /// One slice of taking device write access away from every page of
    /// `domid` (Xen: log-dirty mode went on, and the shadow-op domctl that
    /// turned it on continues until this is done). `cursor` starts at 0 and
    /// is the caller's to keep between slices; `Err(Restart)` means call
    /// again. Each slice visits at most [`SLICE_VISITS`] slots and revokes
    /// at most [`SLICE_REVOKES`] mappings, and on to where a 2 MiB block of
    /// BFNs starts (at most 511 slots more: [`SLICE_REVOKES_MOST`]
    /// revocations), so no call holds its CPU (or the
    /// caller's locks) for long, however much of the domain is mapped.
    ///
    /// The caller has already made new writable maps of `domid` fail (Xen:
    /// `pvx_get_page` refuses them once `paging_mode_log_dirty`); the first
    /// slice moves the target's sequence number, so a map that looked its
    /// page up before that installs nothing and looks again (and is
    /// refused). What the walk has passed therefore gains no writable
    /// mapping, and once it has passed every cell none is left. Read-only
    /// mappings stay.
    pub fn revoke_writes(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        cursor: &mut u64,
    ) -> Result<(), Restart> {
        // (Hosted builds: under `domctl_lock`, as a teardown slice.)
        #[cfg(feature = "std")]
        let _atomic =
            crate::lock_check::HostAtomic::enter("domctl_lock (a log-dirty revocation slice)");
        let mut c = Cursor::unpack(*cursor);
        let result = self.revoke_writes_slice(h, domid, ALL_GFNS, true, &mut c);
        *cursor = c.pack();
        result
    }

    /// One slice of taking device write access away from `domid`'s gfns
    /// `[first, last)` (Xen: before VRAM dirty tracking moves to a new
    /// range, `hap_track_dirty_vram`, whose `dm_op` continues itself until
    /// this is done; the type change that follows makes its hook over the
    /// range, which then finds only what was mapped meanwhile). `sweep` is
    /// the caller's, kept between slices: a call for another range than
    /// the one in progress starts over for its own. Bounded as
    /// [`revoke_writes`](Self::revoke_writes). Writable maps of the range
    /// are refused by the page lookups from the first slice
    /// ([`RangeSweep::freezes_writes_to`]; the range is in `sweep` before
    /// that slice moves the target's sequence number, so a map that looked
    /// its page up before installs nothing and looks again) until the
    /// caller lifts it, resetting `sweep` to idle: after the type change,
    /// or at any other end of its call but a continuation (Xen:
    /// `hap_track_dirty_vram()`'s exit, `pviommu_vram_revoke(d, first,
    /// 0)`). Done, it stays set (its cursor done, a call for the same range
    /// answers at once), so the type change's hook finds nothing mapped
    /// since (a review of 2026-12-06: it went idle when done, and maps
    /// made before the type change went to the hook).
    pub fn revoke_writes_in(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        (first, last): (u64, u64),
        sweep: &mut RangeSweep,
    ) -> Result<(), Restart> {
        // (Hosted builds: Xen calls it from the dm_op inside the target's
        // RCU read section, where `ASSERT_NOT_IN_ATOMIC()` fires: no
        // `[unlocked]` service may be called from it. An audit of
        // 2026-12-06 found it unmarked, so the simulator would not have
        // flagged one.)
        #[cfg(feature = "std")]
        let _atomic =
            crate::lock_check::HostAtomic::enter("rcu_read_lock (a VRAM revocation slice)");
        if first >= last {
            return Ok(());
        }
        sweep.aim_at((first, last));
        let mut c = Cursor::unpack(sweep.cursor);
        // Walks again while the IOMMU refuses, as the log-dirty enable's:
        // the type change's hook cannot fail, so a stuck writable entry
        // left to it stayed writable under a range the device model was
        // told is tracked (a review of 2026-12-06: the walk ended done
        // whatever it left stuck). Given up, the cursor says so
        // ([`revoke_writes_gave_up`](Self::revoke_writes_gave_up)) and the
        // caller fails its call before the type change (Xen: `-EIO`).
        let result = self.revoke_writes_slice(h, domid, (first, last), true, &mut c);
        // (Done: the cursor says so, and the range stays refused until
        // the caller lifts it.)
        sweep.cursor = c.pack();
        result
    }

    fn revoke_writes_slice(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        range: (u64, u64),
        walk_again_for_retries: bool,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        if c.phase == PHASE_START {
            let Some(gate) = self.gate(domid) else {
                *c = Cursor::DONE;
                return Ok(());
            };
            // Nothing of it mapped and no map of it in flight: any map that
            // starts now finds the new mode (as `gfn_changed`).
            if gate.active.load(Ordering::SeqCst) == 0 {
                *c = Cursor::DONE;
                return Ok(());
            }
            gate.seq.fetch_add(1, Ordering::SeqCst);
            *c = Cursor::start_of(PHASE_AS_TARGET);
        }
        if c.phase == PHASE_AS_TARGET {
            self.walk_cells_of_target(h, domid, GfnChange::WriteLost, range, c, &mut false)?;
            // An unmap the IOMMU refused (the entry stays, writable) or a
            // failed flush (the IOTLB may hold it) leaves a device able to
            // write: walk again, retrying and flushing, until no cell that
            // maps the target has such work left for the range, as the
            // teardown does (`writes_may_remain`). At most `RETRY_PASSES` more
            // walks: an IOMMU that keeps failing leaves its entries stuck,
            // retried in turn by the cell's flushes, as an explicit unmap's.
            let pending = walk_again_for_retries && self.writes_may_remain(domid);
            if pending && c.passes < RETRY_PASSES {
                // Retry what waits first, without a walk, a slice at a
                // time: a walk again is spent only when such a slice
                // made no progress. A flush retries at most
                // `STUCK_RETRIES` of a cell's stuck entries, so counting
                // walks alone gave up on a long stuck list of an IOMMU
                // that had recovered (review).
                // (The slot counts retry slices only once the cursor is
                // past every cell: a walk that ended because the cell it
                // stood in stopped mapping the target leaves its slot.)
                let retries = if c.driver == PAST_CELLS { c.slot } else { 0 };
                if retries < RETRY_SLICES && self.retry_pending_of_target(h, domid, retries) {
                    *c = Cursor {
                        phase: PHASE_AS_TARGET,
                        passes: c.passes,
                        driver: PAST_CELLS,
                        slot: retries + 1,
                    };
                    return Err(Restart);
                }
                *c = Cursor {
                    phase: PHASE_AS_TARGET,
                    driver: 0,
                    slot: 0,
                    passes: c.passes + 1,
                };
                return Err(Restart);
            }
            // Done, or gave up with work still to retry: then the cursor
            // says so ([`revoke_writes_gave_up`](Self::revoke_writes_gave_up)).
            *c = Cursor {
                passes: if pending { RETRY_PASSES } else { 0 },
                ..Cursor::DONE
            };
        }
        Ok(())
    }

    /// Whether cell `cell` has work to retry (its retry flag: stuck
    /// entries, refused clears, a failed flush), as its last unlock
    /// published it.
    fn cell_retries(&self, cell: usize) -> bool {
        self.cell_state
            .get(cell)
            .is_some_and(|s| s.retry.load(Ordering::SeqCst))
    }

    /// Whether a device may still write a page of `domid` through a cell
    /// that maps it: the cell's last flush failed (its IOTLB may hold any
    /// of its entries), the IOMMU refused to clear an owner's unmap there
    /// (`refused_clears`), or its stuck list holds a writable entry of
    /// `domid`'s, whatever its gfn (the page may have moved since it was
    /// mapped: a re-review of 2026-12-06). Looks at most [`STUCK_LOOKS`]
    /// stuck entries over all the cells, only of cells whose retry flag is
    /// set; past that it answers yes (fail closed). Before (a review of
    /// 2026-12-06) any cell's retry flag answered yes, so another target's
    /// stuck entry in dom0's cell failed a guest's VRAM move that had
    /// nothing of its own left writable.
    fn writes_may_remain(&self, domid: DomId) -> bool {
        let mut looks = STUCK_LOOKS;
        for cell in cells_in(self.target_drivers(domid)) {
            if !self.cell_retries(cell) {
                continue;
            }
            let Some(d) = self.lock_cell_number(cell) else {
                return true;
            };
            let may = d.dd.flush_failed
                || d.dd.refused_clears != 0
                || d.dd.stuck_write_of(domid, &mut looks);
            self.put_driver(d);
            if may {
                return true;
            }
        }
        false
    }

    /// One slice of retrying what the cells that map `domid` left to
    /// retry (stuck unmaps, a failed flush), no walk: cells in turn until
    /// [`STUCK_RETRIES`] unmaps were tried (under twice that: the last
    /// cell's flush may add as many), starting at the cell the slice's
    /// number `n` names, so that every waiting cell comes first in turn
    /// (one cell getting further in every slice never holds the others
    /// off). Whether any of them got further (fewer stuck, or a flush
    /// that failed went through).
    fn retry_pending_of_target(&self, h: &mut impl Hypervisor, domid: DomId, n: u64) -> bool {
        let mask = self.target_drivers(domid);
        // The (n mod cells)-th cell of the target first.
        let k = n % u64::from(mask.count_ones().max(1));
        let from = cells_in(mask).nth(k as usize).unwrap_or(0);
        let mut progress = false;
        let mut budget = RELEASE_BUDGET;
        let mut tried = 0u64;
        let wrapped = cells_in(mask).filter(move |&c| c >= from);
        for cell in wrapped.chain(cells_in(mask).filter(move |&c| c < from)) {
            if tried >= STUCK_RETRIES {
                break;
            }
            if !self.cell_retries(cell) {
                continue;
            }
            let Some(mut d) = self.lock_cell_number(cell) else {
                continue;
            };
            let (stuck, flush_failed) = (d.dd.stuck(), d.dd.flush_failed);
            let unstuck = self.flush_and_release(&mut d, h, &mut budget).unstuck;
            progress |= unstuck != 0 || (flush_failed && !d.dd.flush_failed);
            tried += stuck.min(STUCK_RETRIES) + 1;
            self.clear_gate_bit_if_unused(cell, &d.dd, domid);
            self.put_driver(d);
        }
        progress
    }

    /// Whether a [`revoke_writes`](Self::revoke_writes) (or a
    /// [`revoke_writes_in`](Self::revoke_writes_in), its sweep's cursor)
    /// that returned `Ok` with this cursor gave up: an IOMMU kept refusing
    /// an unmap or a flush through every walk, so a device may still write
    /// (Xen: the enable, or the move of VRAM tracking, fails with `-EIO`
    /// rather than answer success).
    pub fn revoke_writes_gave_up(cursor: u64) -> bool {
        let c = Cursor::unpack(cursor);
        c.phase == PHASE_DONE && c.passes != 0
    }

    /// Take down everything the dying domain holds as a driver domain,
    /// context by context (the cursor's `driver` is a context number); then
    /// its contexts (tables, devices) and its home cell.
    fn teardown_as_driver(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        let mut visits = 0u64;
        let mut revokes = 0u32;
        let mut budget = RELEASE_BUDGET;
        while (c.driver as u32) < MAX_CONTEXTS {
            let context = ContextId(c.driver as u32);
            let Some(mut d) = self.lock_cell(domid, context) else {
                *c = Cursor {
                    phase: PHASE_AS_DRIVER,
                    driver: c.driver + 1,
                    slot: 0,
                    passes: Self::passes_on_advance(c.passes, false),
                };
                continue;
            };
            let n = d.dd.slots.len() as u64;
            let (used, flush_failed) = (d.dd.used(), d.dd.flush_failed);
            while c.slot < n {
                if self.slice_ends(visits, revokes, c.slot) {
                    self.flush_and_release(&mut d, h, &mut budget);
                    self.put_driver(d);
                    return Err(Restart);
                }
                visits += 1;
                match d.dd.slot(c.slot) {
                    Some(Slot::Live(_)) => {
                        // The gate bits go at the flush.
                        self.take_down_live(&mut d, h, c.slot, false);
                        revokes += 1;
                    }
                    Some(Slot::Revoked { .. }) => {
                        let _ = d.dd.ack_revoked(c.slot);
                    }
                    _ => {}
                }
                c.slot += 1;
            }
            let flushed = self.flush_and_release(&mut d, h, &mut budget);
            // Anything not yet flushed and released keeps the teardown
            // going, not only the lists: a gather or a failed flush the
            // reset below would throw away (today they come with entries
            // on the lists; the test no longer rests on that).
            let pending = d.dd.has_pending() || d.dd.flush_failed || d.dd.has_flushed_tables();
            // (A stuck entry that unmaps at last becomes a notice, which
            // still counts in `used()`: its retry is progress too.)
            let progress = revokes != 0
                || d.dd.used() < used
                || flushed.unstuck != 0
                || flushed.released != 0
                || flushed.tables_freed != 0
                || (flush_failed && !d.dd.flush_failed);
            self.put_driver(d);
            if pending {
                // The IOMMU refused an unmap or the flush failed, or the
                // release budget left pages: they stay referenced; try
                // again on the next call rather than leak them.
                Self::count_restart(c, progress);
                return Err(Restart);
            }
            *c = Cursor {
                phase: PHASE_AS_DRIVER,
                driver: c.driver + 1,
                slot: 0,
                passes: Self::passes_on_advance(c.passes, progress),
            };
        }
        let Some(d) = self.lock_driver(domid) else {
            *c = Cursor::DONE;
            return Ok(());
        };
        if d.dd.contexts != 1 {
            // Its contexts go under the devices lock, which comes before
            // the cells' locks: let go of the home cell (it stays claimed:
            // not idle) and take them in order. A dying domain runs no
            // hypercall meanwhile.
            self.put_driver(d);
            h.devices_lock();
            let left = self.teardown_contexts(h, domid);
            h.devices_unlock();
            match left {
                ContextsLeft::None => {}
                ContextsLeft::DeviceOn => {
                    // A device is still on a context's tables: keep them,
                    // and the domain dying, until it can be moved off.
                    Self::count_restart(c, false);
                    return Err(Restart);
                }
                ContextsLeft::HoldingPages => return Err(Self::walk_again(c)),
                ContextsLeft::TablesLeft(context) => {
                    self.free_tables_of(h, domid, context);
                    Self::count_restart(c, true);
                    return Err(Restart);
                }
            }
            let Some(again) = self.lock_driver(domid) else {
                *c = Cursor::DONE;
                return Ok(());
            };
            return self.reset_and_release(again, c);
        }
        self.reset_and_release(d, c)
    }

    /// The end of a driver domain's teardown: its home cell back to an
    /// idle state and given back (dom0's too); what it still counted
    /// against its driver domain's quota comes off there on release. Not
    /// while the cell holds a page (an engine bug: the walk missed it):
    /// the reset would forget the reference. Then the cell is kept, the
    /// bug counted, and the teardown walks the domain's cells again.
    fn reset_and_release(&self, mut d: Driver<'_, L>, c: &mut Cursor) -> Result<(), Restart> {
        if d.dd.holds_pages() {
            d.dd.note_bug(EngineBug::HeldAtReset);
            self.put_driver(d);
            return Err(Self::walk_again(c));
        }
        d.dd.reset_to_idle();
        self.release_driver(d);
        *c = Cursor::DONE;
        Ok(())
    }

    /// A driver domain's teardown found a cell holding a page where its
    /// walk should have left none: start the walk again from its first
    /// context (counted as a slice that made no progress, and marked
    /// [`REWALKING`] so that the count survives the walk's advances).
    #[cold]
    fn walk_again(c: &mut Cursor) -> Restart {
        *c = Cursor {
            phase: PHASE_AS_DRIVER,
            driver: 0,
            slot: 0,
            passes: c.passes,
        };
        Self::count_restart(c, false);
        if c.passes & STALLED == 0 {
            c.passes |= REWALKING;
        }
        Restart
    }

    /// The driver phase's `passes` as its walk moves on to the next
    /// context: afresh, unless the walk is being made again
    /// ([`REWALKING`]) and this context's made no progress (a re-walk
    /// that keeps finding the page must reach the stall: a review found
    /// the toolstack's destroy continued for ever).
    fn passes_on_advance(passes: u8, progress: bool) -> u8 {
        if !progress && passes & REWALKING != 0 {
            passes & (STALL_COUNT | REWALKING)
        } else {
            0
        }
    }

    /// Run a domain's teardown to the end, as Xen's toolstack does through
    /// continuations; returns the number of slices it took.
    pub fn domain_dying(&self, h: &mut impl Hypervisor, domid: DomId) -> u32 {
        self.run_teardown(h, domid, false, |_| {}).0
    }

    /// Run `domid`'s teardown slice by slice from its start: the slices
    /// called, and whether it is done. With `until_stalled` it also ends
    /// once the teardown says it is stalled (Xen then answers the toolstack
    /// `-EBUSY` and the domain stays dying). Bounded by the number of slots
    /// (each slice makes progress) unless the IOMMU keeps refusing: it
    /// gives up after a generous bound then. `after_slice` runs as each
    /// slice returns (the simulator's softirqs: Xen runs them at each
    /// continuation).
    pub fn run_teardown<H: Hypervisor>(
        &self,
        h: &mut H,
        domid: DomId,
        until_stalled: bool,
        mut after_slice: impl FnMut(&mut H),
    ) -> (u32, bool) {
        let mut cursor = 0;
        let mut slices = 1;
        loop {
            let slice = self.domain_teardown(h, domid, &mut cursor);
            after_slice(h);
            if slice.is_ok() {
                break;
            }
            if until_stalled && Self::teardown_stalled(cursor) {
                return (slices, false);
            }
            slices += 1;
            if slices > 1_000_000 {
                return (slices, false);
            }
        }
        (slices, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Notice;

    /// A run of pending maps grows one way, and names each map's place:
    /// the fallback that writes a refused run page by page gives each map
    /// its own BFN and frame, falling runs too.
    #[test]
    fn a_pending_run_grows_one_way_and_names_each_maps_offset() {
        use crate::{MemAttr, Permissions};
        let one = |bfn, mfn| PendingRun {
            bfn: Bfn(bfn),
            mfn: Mfn(mfn),
            pages: 1,
            access: SlotAccess::of(Permissions::RW, MemAttr::WriteBack),
            falling: false,
        };
        let mut up = one(10, 100);
        assert!(up.grow(&one(11, 101)));
        assert!(!up.grow(&one(9, 99)), "a rising run takes nothing below");
        assert!(!up.grow(&one(12, 103)), "nor a frame that does not follow");
        assert_eq!((up.bfn, up.mfn, up.pages), (Bfn(10), Mfn(100), 2));
        assert_eq!(
            [up.offset_of(0), up.offset_of(1), up.offset_of(2)],
            [Some(0), Some(1), None]
        );
        // Pending in the order BFN 10, 9, 8.
        let mut down = one(10, 100);
        assert!(down.grow(&one(9, 99)));
        assert!(down.grow(&one(8, 98)));
        assert!(
            !down.grow(&one(11, 101)),
            "a falling run takes nothing above"
        );
        assert!(!down.grow(&one(7, 90)), "nor a frame that does not follow");
        let ro = PendingRun {
            access: SlotAccess::of(Permissions::RO, MemAttr::WriteBack),
            ..one(7, 97)
        };
        assert!(!down.grow(&ro), "nor another access");
        assert_eq!((down.bfn, down.mfn, down.pages), (Bfn(8), Mfn(98), 3));
        assert_eq!(
            [0, 1, 2, 3].map(|i| down.offset_of(i)),
            [Some(2), Some(1), Some(0), None]
        );
        // No wrap below 0.
        let mut zero = one(0, 0);
        assert!(!zero.grow(&one(u64::MAX, u64::MAX)));
    }

    #[test]
    fn a_stored_slot_is_32_bytes() {
        // The engine's memory per mapping is dominated by the slot.
        assert_eq!(core::mem::size_of::<super::super::driver::RawSlot>(), 32);
    }

    #[test]
    fn every_slot_state_round_trips_through_its_stored_form() {
        use crate::{ContextId, Gfn, MemAttr, Mfn, Permissions};
        let m = super::super::Mapping {
            gfn: Gfn((1 << 52) - 1),
            mfn: Mfn((1 << 52) - 3),
            next_same_page: (1 << 24) - 1,
            refs: u32::MAX,
            domid: DomId(0x7fef),
            context: ContextId(15),
            perms: Permissions::RW,
            attr: MemAttr::Device,
            gen: u32::MAX,
        };
        let ro = super::super::Mapping {
            perms: Permissions::RO,
            attr: MemAttr::Uncached,
            next_same_page: NONE,
            ..m
        };
        for s in [
            Slot::Free { next: NONE },
            Slot::Free { next: 7 },
            Slot::Live(m),
            Slot::Live(ro),
            Slot::Unmapping {
                mapping: m,
                then_revoked: true,
                entry_present: false,
            },
            Slot::Unmapping {
                mapping: ro,
                then_revoked: false,
                entry_present: false,
            },
            Slot::Unmapping {
                mapping: m,
                then_revoked: false,
                entry_present: true,
            },
            Slot::Stuck {
                mapping: m,
                then_revoked: true,
            },
            Slot::Stuck {
                mapping: ro,
                then_revoked: false,
            },
            Slot::Revoked {
                notice: Notice {
                    domid: DomId(3),
                    gfn: Gfn(9),
                    context: ContextId(2),
                },
                prev: NONE,
                next: 5,
            },
        ] {
            let raw = super::super::driver::RawSlot::encode(&s);
            assert_eq!(raw.decode(), s);
        }
    }

    #[test]
    fn done_cursor_is_the_value_the_c_glue_checks() {
        // PVIOMMU_TEARDOWN_DONE in xen/include/pviommu_engine.h.
        assert_eq!(Cursor::DONE.pack(), 3u64 << 62);
        let c = Cursor {
            phase: PHASE_AS_TARGET,
            driver: 0x7fef,
            slot: (1 << 40) - 1,
            passes: 0,
        };
        assert_eq!(Cursor::unpack(c.pack()), c);
    }

    /// The clearing walk before a flush leaves a slot marked wherever it
    /// leaves its IOMMU entry. A broken unmapping list (a link to a live
    /// slot, out of range, or back into the list) ends the walk: the slots
    /// past the break keep their marks and their entries, so no release
    /// takes their pages while a device can still reach them. A count of
    /// marks above what the list holds walks the list to its end. (Review
    /// 158: histories the engine makes never reach these branches.)
    #[cfg(feature = "sim")]
    #[test]
    fn the_clearing_walk_leaves_a_mark_wherever_it_leaves_an_entry() {
        use crate::platform::Platform;
        use crate::sim::{DomainSpec, Format, SimMachine};
        use crate::{MemAttr, Permissions};
        const GUEST: DomId = DomId(1);
        for case in ["live slot", "out of range", "cycle", "over-count"] {
            let mut m = SimMachine::new(4096 + 256, Format::Vtd, 512);
            let guest = DomainSpec {
                pages: 256,
                privileged: false,
                device_model_of: None,
            };
            m.create_domain(GUEST, guest).unwrap();
            let e = crate::Engine::new(crate::config::Config::default(), &m).unwrap();
            let dom0 = m.domain_info(DomId::DOM0).unwrap();
            let bfns: Vec<Bfn> = (0..16)
                .map(|g| {
                    let req = pviommu_abi::MapRequest {
                        context: ContextId::DEFAULT,
                        domid: GUEST,
                        gfn: Gfn(g),
                        perms: Permissions::RW,
                        attr: MemAttr::WriteBack,
                        grant: false,
                    };
                    e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap()
                })
                .collect();
            e.finish(&mut m, DomId::DOM0);
            let idx: Vec<u64> = bfns.iter().map(|&b| e.space.index_of(b).unwrap()).collect();
            let mut g = e.driver_state(DomId::DOM0).unwrap();
            let dd = &mut *g;
            // Twelve unmapped, each marked; the list runs from the last
            // back, so the walk meets 11, 10, ..., 0.
            for &i in &idx[..12] {
                assert!(dd.unmap_owned(e.seed, i, ContextId::DEFAULT).is_some());
            }
            assert_eq!(dd.deferred_entries, 12);
            let past_break = match case {
                "over-count" => {
                    dd.deferred_entries += 3;
                    0
                }
                _ => {
                    // Slot 6 links on to the break, not to slot 5.
                    let to = match case {
                        "live slot" => idx[12],
                        "out of range" => dd.slots.len() as u64 + 5,
                        _ => idx[11],
                    };
                    let Some(Slot::Unmapping {
                        mut mapping,
                        then_revoked,
                        entry_present,
                    }) = dd.slot(idx[6])
                    else {
                        panic!("{case}: slot 6 is not Unmapping");
                    };
                    mapping.next_same_page = to;
                    assert!(dd.set_slot(
                        idx[6],
                        Slot::Unmapping {
                            mapping,
                            then_revoked,
                            entry_present,
                        },
                    ));
                    6
                }
            };
            e.clear_deferred_entries(dd, &mut m);
            let mut marked = 0;
            for (k, (&i, &b)) in idx.iter().zip(&bfns).take(12).enumerate() {
                let mark = matches!(
                    dd.slot(i),
                    Some(Slot::Unmapping {
                        entry_present: true,
                        ..
                    })
                );
                let entry = m.translate(DomId::DOM0, ContextId::DEFAULT, b).is_some();
                assert_eq!(mark, entry, "{case}: slot {k}'s mark and entry");
                assert_eq!(mark, k < past_break, "{case}: slot {k}");
                marked += u64::from(mark);
            }
            // (Those it left marked go to the stuck list at the release,
            // their pages still referenced: see the function's doc.)
            assert_eq!(marked, past_break as u64, "{case}");
            // The live slots keep their entries.
            for &b in &bfns[12..] {
                assert!(m.translate(DomId::DOM0, ContextId::DEFAULT, b).is_some());
            }
        }
    }
}

/// Review 162: `DeferredRun::grow` (b33e847) against the form before it,
/// over the corners (bfn 0 and `u64::MAX`, runs at and around
/// `MAX_IOMMU_RUN` and its near bound, 2 MiB block starts and ends, another
/// context) and random inputs.
#[cfg(test)]
mod run_growth_tests {
    use super::*;

    /// `grow` as it was at ed7d66f.
    fn grow_before(run: &mut DeferredRun, context: ContextId, bfn: u64) -> bool {
        const BLOCK: u64 = pviommu_abi::EXTENT_PAGES - 1;
        if context != run.context {
            return false;
        }
        let falling = bfn.checked_add(1) == Some(run.first);
        if !falling && run.first.checked_add(run.pages) != Some(bfn) {
            return false;
        }
        const NEAR_BOUND: u64 = crate::iommu::MAX_IOMMU_RUN - pviommu_abi::EXTENT_PAGES;
        if run.pages > NEAR_BOUND {
            let starts_block = if falling {
                bfn & BLOCK == BLOCK
            } else {
                bfn & BLOCK == 0
            };
            if run.pages >= crate::iommu::MAX_IOMMU_RUN || starts_block {
                return false;
            }
        }
        if falling {
            run.first = bfn;
        }
        run.pages += 1;
        true
    }

    /// What `grow` is for, written from its doc: `bfn` extends the run at
    /// either end, the run stays within `MAX_IOMMU_RUN`, and near that
    /// bound it never takes a BFN that starts a new block (rising: a block
    /// start; falling: a block end).
    fn grow_spec(run: &mut DeferredRun, context: ContextId, bfn: u64) -> bool {
        let (first, pages) = (u128::from(run.first), u128::from(run.pages));
        let b = u128::from(bfn);
        let max = u128::from(crate::iommu::MAX_IOMMU_RUN);
        let near = max - u128::from(pviommu_abi::EXTENT_PAGES);
        let blk = u128::from(pviommu_abi::EXTENT_PAGES);
        if context != run.context || pages >= max {
            return false;
        }
        let (falling, rising) = (
            b + 1 == first,
            b == first + pages && b <= u128::from(u64::MAX),
        );
        if !(falling || rising) {
            return false;
        }
        if pages > near && ((rising && b % blk == 0) || (falling && b % blk == blk - 1)) {
            return false;
        }
        if falling {
            run.first = bfn;
        }
        run.pages += 1;
        true
    }

    fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn check(first: u64, pages: u64, same_ctx: bool, bfn: u64, cases: &mut u64) {
        let ctx = ContextId(3);
        let asked = if same_ctx { ctx } else { ContextId(4) };
        let mut new = DeferredRun::new(ctx, first);
        new.pages = pages;
        let mut old = DeferredRun::new(ctx, first);
        old.pages = pages;
        let mut spec = DeferredRun::new(ctx, first);
        spec.pages = pages;
        let a = new.grow(asked, bfn);
        let b = grow_before(&mut old, asked, bfn);
        assert_eq!(
            (a, new.first, new.pages),
            (b, old.first, old.pages),
            "first {first:#x} pages {pages} bfn {bfn:#x} ctx {same_ctx}"
        );
        // The spec only for runs that a walk can build (pages >= 1, the
        // run's end within u64).
        if pages >= 1 && first.checked_add(pages - 1).is_some() {
            let c = grow_spec(&mut spec, asked, bfn);
            assert_eq!(
                (a, new.first, new.pages),
                (c, spec.first, spec.pages),
                "spec: first {first:#x} pages {pages} bfn {bfn:#x} ctx {same_ctx}"
            );
        }
        *cases += 1;
    }

    #[test]
    fn grow_is_the_same_as_before_at_every_corner() {
        let max = crate::iommu::MAX_IOMMU_RUN;
        let blk = pviommu_abi::EXTENT_PAGES;
        let near = max - blk;
        let mut firsts = vec![0, 1, 2, blk - 1, blk, blk + 1, 2 * blk - 1, 2 * blk];
        for top in [
            u64::MAX,
            u64::MAX - blk + 1,
            u64::MAX - max,
            u64::MAX - max + 1,
        ] {
            for d in 0..3u64 {
                firsts.push(top.wrapping_sub(d));
                firsts.push(top.wrapping_add(d));
            }
        }
        for k in [3u64, 1000, 1 << 40] {
            for d in [0u64, 1, 2, blk - 1, blk - 2] {
                firsts.push(k * blk + d);
                firsts.push((k * blk).wrapping_sub(d));
            }
        }
        let mut pages_set = vec![0, 1, 2, 3, blk - 1, blk, blk + 1, u64::MAX, u64::MAX - 1];
        for p in [
            near - 1,
            near,
            near + 1,
            near + 2,
            max - 2,
            max - 1,
            max,
            max + 1,
        ] {
            pages_set.push(p);
        }
        let mut cases = 0;
        for &first in &firsts {
            for &pages in &pages_set {
                let mut bfns = vec![0, 1, u64::MAX, u64::MAX - 1];
                for d in 0..3u64 {
                    bfns.push(first.wrapping_sub(d));
                    bfns.push(first.wrapping_add(d));
                    bfns.push(first.wrapping_add(pages).wrapping_add(d));
                    bfns.push(first.wrapping_add(pages).wrapping_sub(d));
                }
                for &bfn in &bfns {
                    check(first, pages, true, bfn, &mut cases);
                    check(first, pages, false, bfn, &mut cases);
                }
            }
        }
        // Every run length up to the bound and past it, at every offset in
        // a block, both ends.
        for pages in 0..=max + 2 {
            for off in [0, 1, blk - 2, blk - 1] {
                for base in [blk * 7, blk * 7 + off, u64::MAX - pages] {
                    let first = base;
                    check(first, pages, true, first.wrapping_sub(1), &mut cases);
                    check(first, pages, true, first.wrapping_add(pages), &mut cases);
                }
            }
        }
        let mut r = xorshift(0x1620_1620_dead_beef);
        for _ in 0..2_000_000 {
            let first = match r() % 4 {
                0 => r(),
                1 => r() % 4096,
                2 => u64::MAX - r() % 4096,
                _ => (r() % 1000) * blk + r() % 3,
            };
            let pages = match r() % 3 {
                0 => r() % (max + 4),
                1 => near - 2 + r() % 6,
                _ => max - 2 + r() % 4,
            };
            let bfn = match r() % 4 {
                0 => first.wrapping_sub(1),
                1 => first.wrapping_add(pages),
                2 => first
                    .wrapping_add(pages)
                    .wrapping_add(r() % 3)
                    .wrapping_sub(1),
                _ => r(),
            };
            check(first, pages, !r().is_multiple_of(8), bfn, &mut cases);
        }
        assert!(cases > 2_000_000);
    }

    /// A run built from one BFN by the walk's order (falling from the top
    /// of a block range) stops exactly at a block boundary near the bound,
    /// and never passes it: a chain of grows, old and new in step.
    #[test]
    fn grown_runs_end_at_the_same_block_boundaries() {
        let blk = pviommu_abi::EXTENT_PAGES;
        let max = crate::iommu::MAX_IOMMU_RUN;
        for start in [
            0u64,
            1,
            blk - 1,
            blk,
            5 * blk + 17,
            9 * blk - 1,
            u64::MAX,
            u64::MAX - blk,
        ] {
            for falling in [true, false] {
                let ctx = ContextId(0);
                let mut new = DeferredRun::new(ctx, start);
                let mut old = DeferredRun::new(ctx, start);
                let mut bfn = start;
                loop {
                    bfn = if falling {
                        bfn.wrapping_sub(1)
                    } else {
                        bfn.wrapping_add(1)
                    };
                    let a = new.grow(ctx, bfn);
                    let b = grow_before(&mut old, ctx, bfn);
                    assert_eq!((a, new.first, new.pages), (b, old.first, old.pages));
                    if !a {
                        break;
                    }
                }
                assert!(new.pages <= max);
                // Stopped at a wrap, or at the bound's block boundary.
                let stopped_at_block = if falling {
                    new.first.is_multiple_of(blk)
                } else {
                    new.first
                        .checked_add(new.pages)
                        .is_some_and(|e| e % blk == 0)
                };
                assert!(
                    new.pages == max
                        || (new.pages > max - blk && stopped_at_block)
                        || (falling && new.first == 0)
                        || (!falling && new.first.checked_add(new.pages).is_none()),
                    "start {start:#x} falling {falling}: first {:#x} pages {}",
                    new.first,
                    new.pages
                );
            }
        }
    }
}
