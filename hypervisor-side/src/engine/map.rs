//! The map path: a run of maps checked, its pages looked up without a
//! lock, then installed under the cell's lock ([`Engine::map_batch`]), and
//! the single map it falls back on ([`Engine::map_tagged`]). Who may map
//! what is decided in [`crate::permission`] (called from `map_checks`);
//! the BFN is chosen in [`Engine::slot_wanted`] and the slot allocator
//! (`driver.rs`); the IOMMU entry is written by `contexts.rs` (an engine
//! context) or, for context 0, by the flush that ends the call
//! (`revoke.rs`, `write_pending_entries`). Locks: see the module above.

use core::sync::atomic::Ordering;

use lock_api::RawMutex;

use pviommu_abi::MapRequest;

use super::driver::{self, DriverDomain, Mapping, PageAt, NONE};
use super::{revoke, Driver, Engine, Hypervisor, Mapped, TargetGate, MAP_CHUNK, MAP_RETRIES};
use crate::config::MAX_CONTEXTS;
use crate::permission::{check_map_again, check_page, refusal, Caller};
use crate::platform::{CheckedTarget, DomainInfo, PageSlot};
use crate::{Bfn, ContextId, DomId, Errno, Mfn};

/// What a map's page lookup came to ([`Engine::look_up_page`]).
pub(super) enum LookedUp {
    /// The page, referenced, and the gate's share kept.
    Page(Mfn),
    /// The target's sequence number moved since the map's checks: not
    /// looked up, the share given back.
    Moved,
    /// Refused; nothing held.
    Refused(Errno),
}

/// What the locked part of a map did with the attempt's page reference
/// and its share of the target gate. The result the caller is told is
/// written into its slot by the locked part itself: built there field by
/// field, not carried back in this enum (a `Mapped` inside it went through
/// a stack temporary whose overlapping reload stalled store forwarding,
/// about 6 % of a map's time).
#[derive(Clone, Copy, PartialEq, Eq)]
enum MapOutcome {
    /// A new mapping holds both; the result is `Ok`.
    Installed,
    /// An existing mapping of the same frame got one more reference: the
    /// attempt's page reference and gate share are returned by the caller.
    /// The result is `Ok`.
    Shared,
    /// Nothing happened: the caller returns both. The result is `Err`.
    Refused,
    /// Failed after the IOMMU entry existed: the engine took both over and
    /// releases them after the flush. The caller must not touch them. The
    /// result is `Err`.
    Consumed,
}

/// What the locked map returns: its [`MapOutcome`], which only the
/// functions here give out, each together with the result it writes into
/// the caller's slot. So no path of the locked map can return an outcome
/// and leave the slot as it was (in `map_batch` a slot may still hold an
/// earlier op's result), and an `Ok` always goes with `Installed` or
/// `Shared`, an `Err` with `Refused` or `Consumed`.
mod report {
    use super::{Errno, MapOutcome, Mapped};

    /// An outcome whose result is written.
    #[must_use]
    pub(super) struct Reported(MapOutcome);

    impl Reported {
        pub(super) fn outcome(self) -> MapOutcome {
            self.0
        }
    }

    #[inline(always)]
    pub(super) fn installed(out: &mut Result<Mapped, Errno>, m: Mapped) -> Reported {
        *out = Ok(m);
        Reported(MapOutcome::Installed)
    }

    #[inline(always)]
    pub(super) fn shared(out: &mut Result<Mapped, Errno>, m: Mapped) -> Reported {
        *out = Ok(m);
        Reported(MapOutcome::Shared)
    }

    #[inline(always)]
    pub(super) fn refused(out: &mut Result<Mapped, Errno>, e: Errno) -> Reported {
        *out = Err(e);
        Reported(MapOutcome::Refused)
    }

    /// [`refused`], for the locked map's rare refusals: a call of its
    /// own marked cold, so the compiler lays the locked maps' loop out
    /// for the maps that go through.
    #[cold]
    #[inline(never)]
    pub(super) fn refused_rarely(out: &mut Result<Mapped, Errno>, e: Errno) -> Reported {
        refused(out, e)
    }

    #[inline(always)]
    pub(super) fn consumed(out: &mut Result<Mapped, Errno>, e: Errno) -> Reported {
        *out = Err(e);
        Reported(MapOutcome::Consumed)
    }
}
use report::Reported;

/// No domain: what a map refused at its checks may look a page up in
/// (Xen's `DOMID_INVALID`, 0x7ff4: no domain has it, and a lookup by id
/// finds none).
const NO_DOMAIN: DomId = DomId(0x7ff4);

/// The mapping a request asks for, over frame `mfn`.
pub(super) fn map_key(req: &MapRequest, mfn: Mfn) -> Mapping {
    Mapping {
        gfn: req.gfn,
        mfn,
        next_same_page: NONE,
        refs: 1,
        domid: req.domid,
        context: req.context,
        perms: req.perms,
        attr: req.attr,
        gen: 0,
    }
}

/// Whether `r` asks what `first`, of the same context, asks of the same
/// target (access, attribute; no grant), `first_asks` being
/// [`asked_of`]`(first)` for a `first` that asks no grant (its word then
/// says no grant, so an equal word does too): a run whose every op does
/// is what [`Engine::map_alike`] takes.
#[inline(always)]
fn asks_as(r: &MapRequest, first_asks: u64) -> bool {
    asked_of(r) == first_asks
}

/// What `r` asks of its target (domid, attribute, access, grant), packed
/// into one word, a field to a byte or two: two requests ask alike if
/// their words are equal, so the packing must be one to one
/// (`asked_of_is_one_to_one`; the asserts below hold its widths: a field
/// added to `Permissions` must be packed too). The compiler reads the
/// fields with one or two loads, where it compared them field by field
/// (with the pairwise walk of [`Engine::map_batch`]'s cut, 2 instructions
/// a map less, 51st session). A collision would let an alike run map an op
/// with access its page lookup did not take (review 162: a read-only op
/// then a write-only one, a writable entry on a read reference).
#[inline(always)]
fn asked_of(r: &MapRequest) -> u64 {
    const _: () = assert!(
        pviommu_abi::MemAttr::Device as u64 <= 0xff,
        "an attribute in a byte"
    );
    const _: () = assert!(
        core::mem::size_of::<pviommu_abi::Permissions>() == 2,
        "Permissions is read and write only: both packed"
    );
    u64::from(r.domid.0)
        | (r.attr as u64) << 16
        | u64::from(r.perms.read) << 24
        | u64::from(r.perms.write) << 32
        | u64::from(r.grant) << 40
}

/// Whether the gfns of a run fell at every step up to `req` (after the
/// op `last`), `falling` whether they did up to `last`, and recorded
/// there: [`Engine::map_batch`]'s cut of a run, once its gfns stopped
/// rising.
#[inline(always)]
fn fell_again(falling: &mut bool, last: &MapRequest, req: &MapRequest) -> bool {
    *falling = *falling && req.gfn < last.gfn;
    *falling
}

/// What a run's ops must share for the cut's straight case: the
/// context and what [`asked_of`] packs (domid, attribute, access, grant),
/// one to one, in two words (`run_key_is_one_to_one`). The fields are
/// packed in the order they lie in memory, so the compiler reads each
/// word with one load.
#[inline(always)]
fn run_key(r: &MapRequest) -> (u64, u16) {
    (
        u64::from(r.context.0)
            | u64::from(r.domid.0) << 32
            | (r.attr as u64) << 48
            | u64::from(r.perms.read) << 56,
        u16::from(r.perms.write) | u16::from(r.grant) << 8,
    )
}

/// [`Engine::map_batch`]'s cut of a run from `reqs`, `limit` the room
/// for results: how many ops it takes, and whether they all ask alike
/// ([`asks_as`]; never when the first asks a grant); `None` for no ops.
/// The run ends before the first repeat of a page, or the first op of
/// another context.
// Not inlined: a leaf, with registers of its own. Inlined into the
// hypercall's run of maps (through `map_batch_in`), its straight case
// grew that frame, on the way to a page lookup, by 16 bytes in the Xen
// object; called, the frame is 16 bytes smaller than with the walk
// inlined there before it.
#[inline(never)]
fn cut_run(reqs: &[MapRequest], limit: usize) -> Option<(usize, bool)> {
    let n = reqs.len().min(limit).min(MAP_CHUNK);
    let first = reqs.first()?;
    // The mediator's usual run: gfns rising, one context, every op asking
    // what the first asks. No op then repeats an earlier one's page, and
    // the walk would cut nothing and find them all alike: one compare of
    // two words and one of the gfns an op, where the walk kept its three
    // flags and cost each op about 27 instructions.
    let first_key = run_key(first);
    let mut last_gfn = first.gfn;
    let straight = reqs.get(..n).unwrap_or_default().iter().skip(1).all(|r| {
        let rises = r.gfn > last_gfn;
        last_gfn = r.gfn;
        rises && run_key(r) == first_key
    });
    if straight {
        return Some((n, !first.grant));
    }
    Some(cut_walk(reqs, n))
}

/// [`cut_run`] of a run that is not straight, `n` the most ops it may
/// take (at least one): how many it takes, and whether they all ask alike.
#[inline(always)]
fn cut_walk(reqs: &[MapRequest], mut n: usize) -> (usize, bool) {
    let Some(first) = reqs.first() else {
        return (0, false);
    };
    let context = first.context;
    let asked = reqs.get(..n).unwrap_or_default();
    // The run ends before the first repeat of a page, or the first op
    // of another context. While the gfns rise (a mediator's usual run),
    // an op above the one before it repeats none: no scan; nor while
    // they fall, an op below the one before it (the scans cost each map
    // of a falling run 16 instructions). The same pass tells whether
    // its ops all ask alike (`asks_as`).
    let mut rising = true;
    // (Whether they fell at every step so far. Asked only once they
    // stopped rising, which for a falling run is at its first step:
    // from there on at every step. Where they rose first, they never
    // fell at every step: false from the start.)
    let mut falling = reqs.get(1).is_some_and(|second| second.gfn < first.gfn);
    // (Never true for a first op that asks a grant: `asks_as` then
    // need not ask whether each op does.)
    let mut alike = !first.grant;
    let first_asks = asked_of(first);
    // (Each op with the one before it: one walk of the ops, where a
    // slice of the earlier ones cut for each op cost each op its
    // bounds checks. The earlier ones are cut only to scan them.)
    for (i, pair) in asked.windows(2).enumerate() {
        let [last, req] = pair else {
            break;
        };
        rising = rising && req.gfn > last.gfn;
        if req.context != context
            || (!rising
                && !fell_again(&mut falling, last, req)
                && asked
                    .get(..=i)
                    .is_some_and(|e| e.iter().any(|r| r.domid == req.domid && r.gfn == req.gfn)))
        {
            n = i + 1;
            break;
        }
        alike = alike && asks_as(req, first_asks);
    }
    (n, alike)
}

/// The mask of ops `0..n` of a run (bit `k` for op `k`), all of them
/// past 31: every "the first n ops" of `map_alike`'s masks.
#[inline(always)]
fn low_bits(n: usize) -> u32 {
    u32::try_from(n)
        .ok()
        .and_then(|n| 1u32.checked_shl(n))
        .map_or(u32::MAX, |b| b - 1)
}

/// What a path of [`Engine::map_batch`] did with a run: it answered its
/// first `n` ops, but those whose bit is set in `again` (op `k`, bit `k`),
/// whose target moved after their checks: nothing of theirs held, they
/// are mapped again on their own.
struct Answered {
    n: usize,
    again: u32,
}

/// What the maps of a run under one lock of the cell share, read once
/// under that lock: what [`Engine::map_locked`] read again for each op
/// (about 15 instructions a page).
#[derive(Clone, Copy)]
struct LockedRun {
    /// The quota of the cell's driver domain ([`Engine::quota_of`]), as
    /// the lock was taken. A quota set meanwhile (`set_limits` takes no
    /// cell lock) counts from the next run, as it would for a run that
    /// took the lock just before it was set.
    quota: u64,
    /// The cell's context, if the driver domain has it: the one context
    /// an op may map into under this lock (`None`: none may). Both change
    /// only under the lock.
    context: Option<ContextId>,
}

/// What [`Engine::map_locked_run`] did with the ops it was given: how
/// many it took, from the first, and of those, bit `k` for op `k`, which
/// were shared onto an existing mapping, refused (nothing happened), or
/// consumed (failed after their IOMMU entry existed). The others it took
/// were installed. (At most [`MAP_CHUNK`] ops: the bits fit.)
#[derive(Clone, Copy)]
struct LockedOps {
    n: usize,
    shared: u32,
    refused: u32,
    consumed: u32,
}

impl LockedOps {
    /// What the locked map did with op `k`: `None` if it was not taken.
    fn outcome(&self, k: usize) -> Option<MapOutcome> {
        if k >= self.n {
            return None;
        }
        let bit = 1u32.checked_shl(u32::try_from(k).ok()?)?;
        Some(if self.shared & bit != 0 {
            MapOutcome::Shared
        } else if self.refused & bit != 0 {
            MapOutcome::Refused
        } else if self.consumed & bit != 0 {
            MapOutcome::Consumed
        } else {
            MapOutcome::Installed
        })
    }
}

/// What [`Engine::map_prepare`] found.
enum Prepared {
    /// Deduplicated onto an existing mapping (the result written).
    Shared(Reported),
    /// Reserved: install, at the page's probe.
    Install,
}

impl<L: RawMutex> Engine<L> {
    /// Map a foreign frame for `caller` (whose facts are `caller_info`).
    /// The same (domid, gfn, context, perms, attr) mapped again returns the
    /// same BFN with one more reference, after checking that the gfn still
    /// points at the mapped frame.
    ///
    /// The page is looked up *without* any engine lock (that takes the
    /// target's p2m lock, which a gfn hook may hold while waiting for a
    /// driver lock). A removal of the same page in between is caught by the
    /// target's sequence number and the map is retried: the map marks its
    /// cell in the target's gate, then reads `seq`; the hook bumps `seq`,
    /// then reads the marks. One of the two sees the other.
    pub fn map(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        caller_info: &DomainInfo,
        req: &MapRequest,
    ) -> Result<Bfn, Errno> {
        self.map_tagged(h, caller, caller_info, req).map(|m| m.bfn)
    }

    /// [`map`](Self::map), with the install's tag for
    /// [`unmap_undo`](Self::unmap_undo).
    pub fn map_tagged(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        caller_info: &DomainInfo,
        req: &MapRequest,
    ) -> Result<Mapped, Errno> {
        self.map_tagged_in(h, &Caller::new(caller, caller_info), req)
    }

    /// [`map_tagged`](Self::map_tagged) as an op of `caller`'s call (the
    /// policy's refusals so far in it are not asked again).
    pub(crate) fn map_tagged_in(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        req: &MapRequest,
    ) -> Result<Mapped, Errno> {
        // (Xen's INVALID_GFN: see `map_locked`.)
        if req.gfn.0 == u64::MAX {
            return Err(Errno::Inval);
        }
        let caps = h.iommu_caps();
        for _ in 0..MAP_RETRIES {
            // The target's number before its checks: a lookup that finds
            // it moved may have found another domain at the same domid
            // (see `map_batch`), so every attempt starts at the checks.
            let checked_seq = self.checked_seq(req.domid);
            let gate = self.map_checks(h, caller, req, &caps, false)?;
            // The checks are resolved before the lookup under speculation
            // (see `map_batch`): the caller-and-target decision is a plain
            // branch, fenced only by some XSM policies' own hooks.
            crate::nospec::block_speculation();
            let (looked_up, ns_get_page) = self.look_up_page(h, req, gate, &caps, checked_seq);
            let mfn = match looked_up {
                LookedUp::Page(mfn) => mfn,
                // (Nothing held: the share was given back.)
                LookedUp::Moved => continue,
                LookedUp::Refused(e) => return Err(e),
            };
            let mut result = Err(Errno::Inval);
            let outcome = match self.lock_for_map(caller.id, req.context) {
                Err(e) => {
                    result = Err(e);
                    Some(MapOutcome::Refused)
                }
                Ok(mut d) => {
                    // Mark, then re-read seq (see above). An already set
                    // bit cannot be cleared while this lock is held.
                    let newly = self.set_gate_bit(d.cell, req.domid, true);
                    let run = self.locked_run(&d);
                    let out = (gate.seq.load(Ordering::SeqCst) == checked_seq)
                        .then(|| self.map_locked_one(&mut d, h, req, mfn, &run, &mut result));
                    self.write_pending_if_full(&mut d, h);
                    d.dd.stats.ns_get_page += ns_get_page;
                    match out {
                        // Mapped: the bit must stay (a stale mapping revoked
                        // on the way may have been the last one).
                        Some(MapOutcome::Installed | MapOutcome::Shared) => {
                            self.set_gate_bit(d.cell, req.domid, true);
                        }
                        // Failed once its entry existed: it waits for the
                        // flush, an entry of the target.
                        Some(MapOutcome::Consumed) => {
                            self.clear_gate_bit_if_unused(d.cell, &d.dd, req.domid)
                        }
                        Some(MapOutcome::Refused) | None => {
                            self.undo_gate_bit(d.cell, &d.dd, req.domid, newly)
                        }
                    }
                    // A stale mapping revoked on the way left its entry for
                    // the flush: bounded as the runs' are.
                    if d.dd.deferred_entries >= revoke::DEFER_LIMIT {
                        self.clear_deferred_entries_mid_call(&mut d.dd, h);
                    }
                    self.put_driver(d);
                    out
                }
            };
            let done = match outcome {
                // Installed: the mapping keeps the page reference and its
                // share of `active`. Consumed (failed after the IOMMU entry
                // existed): the engine released, or will release after the
                // flush, what this attempt took.
                Some(MapOutcome::Installed | MapOutcome::Consumed) => return result,
                Some(MapOutcome::Shared | MapOutcome::Refused) => Some(result),
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

    /// Maps of a batch taken under one lock: [`map`](Self::map) for the
    /// first of `reqs` (at most [`MAP_CHUNK`]), with `out[i]` the result of
    /// `reqs[i]`; returns how many were done. The run ends before an op
    /// that repeats an earlier op's page (dedup needs the earlier one
    /// installed): that one starts the next run. The pages are looked up
    /// first without a lock, then the caller's driver lock is taken once
    /// for all of them. Results and state are those of mapping them one by
    /// one in order, except that an op whose target's p2m moved meanwhile
    /// is mapped again on its own after the others. A run is of one
    /// context (the one cell it locks): it also ends before an op of
    /// another context.
    pub fn map_batch(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        caller_info: &DomainInfo,
        reqs: &[MapRequest],
        out: &mut [Result<Mapped, Errno>],
    ) -> usize {
        self.map_batch_in(h, &Caller::new(caller, caller_info), reqs, out)
    }

    /// [`map_batch`](Self::map_batch) for a run of `caller`'s call (the
    /// hypercall's batch: a target the policy refused a map of is not
    /// asked about again in the call).
    pub(crate) fn map_batch_in(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        reqs: &[MapRequest],
        out: &mut [Result<Mapped, Errno>],
    ) -> usize {
        let Some((n, alike)) = cut_run(reqs, out.len()) else {
            return 0;
        };
        let Some(run) = reqs.get(..n) else {
            return 0;
        };
        // The mediator's usual run asks the same of one target, op after
        // op: it takes the straight path, unless that path hands it back.
        // (Each path is a call of its own: their frames never add up on
        // Xen's stack.)
        let alike = (alike && run.len() > 1)
            .then(|| self.map_alike(h, caller, run, out))
            .flatten();
        let answered = alike.unwrap_or_else(|| self.map_run(h, caller, run, out));
        // The usual run has none to map again: no pass over it.
        if answered.again == 0 {
            return answered.n;
        }
        // The ops whose target moved after their checks, mapped again on
        // their own. Here, not in either path: the lookup of a page is then
        // no deeper in Xen's stack than a single map's.
        for (req, o) in run
            .iter()
            .zip(out.iter_mut())
            .enumerate()
            .filter(|(k, _)| answered.again & (1 << k) != 0)
            .map(|(_, pair)| pair)
        {
            *o = self.map_tagged_in(h, caller, req);
        }
        answered.n
    }

    /// [`map_batch`](Self::map_batch)'s path for any run: `reqs` is the
    /// run, already cut (one context, no page twice), at most
    /// [`MAP_CHUNK`] ops. Answers all of them.
    #[inline(never)]
    fn map_run(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        reqs: &[MapRequest],
        out: &mut [Result<Mapped, Errno>],
    ) -> Answered {
        let n = reqs.len().min(out.len()).min(MAP_CHUNK);
        let Some(context) = reqs.first().map(|r| r.context) else {
            return Answered { n: 0, again: 0 };
        };
        // Where each op stands; `out[i]` holds its result once it has one.
        #[derive(Clone, Copy)]
        enum Step {
            /// Not reached yet (no result).
            Pending,
            /// Has its result, and nothing of the attempt to give back.
            Done,
            /// Looked up: page `mfn` referenced, the gate joined, its
            /// number still the one read before the checks (`checked_seqs`).
            Locked(Mfn),
            /// Has its result (shared, or refused under the lock); the
            /// lookup's page reference and gate share go back.
            GiveBack(Mfn),
            /// The target's p2m moved since the lookup: give back, then
            /// map it again on its own.
            Moved(Mfn),
            /// The target's p2m moved between its checks and the lookup
            /// (which did not run; nothing held): map it again on its own.
            Again,
        }
        let mut steps = [Step::Pending; MAP_CHUNK];
        // A run of ops' pages, looked up together (step 3): their gfns in,
        // their frames out.
        let mut run_pages = [PageSlot::default(); MAP_CHUNK];
        let mut ns_get_page = 0;
        let caps = h.iommu_caps();
        // 1. The checks of the whole run, before any page is looked up:
        //    each op's target gate, or its error, and the domain each op
        //    may look a page up in (`NO_DOMAIN` for an op refused).
        let mut gates: [Option<&TargetGate>; MAP_CHUNK] = [None; MAP_CHUNK];
        let mut lookup_in = [NO_DOMAIN; MAP_CHUNK];
        // Each op's target's sequence number as read before its target's
        // checks: a lookup that finds it moved is mapped again from the
        // checks (the target may have died meanwhile and another domain
        // taken its domid, one the checks never saw).
        let mut checked_seqs = [0u32; MAP_CHUNK];
        // The last op that passed its checks, with its target's gate and
        // number.
        let mut passed: Option<(&MapRequest, &TargetGate, u32)> = None;
        for (((req, o), (step, gate)), (lookup_in, checked_seq)) in reqs
            .iter()
            .zip(out.iter_mut())
            .zip(steps.iter_mut().zip(gates.iter_mut()))
            .zip(lookup_in.iter_mut().zip(checked_seqs.iter_mut()))
            .take(n)
        {
            // An op asking what the last one that passed asked (target,
            // context, attribute, grant: all `map_checks` reads of an op)
            // passes too: the mediator's usual run is checked once. One of
            // the same target asking something else skips the target's part.
            let target_checked = passed.filter(|(p, _, _)| p.domid == req.domid);
            let same_as_passed = passed.filter(|(p, _, _)| {
                p.domid == req.domid
                    && p.context == req.context
                    && p.attr == req.attr
                    && p.grant == req.grant
            });
            let seq = match target_checked {
                Some((_, _, seq)) => seq,
                None => self.checked_seq(req.domid),
            };
            let checks = match same_as_passed {
                Some((_, g, _)) => Ok(g),
                None => {
                    let checked = target_checked.is_some();
                    self.map_checks(h, caller, req, &caps, checked)
                }
            };
            match checks {
                Ok(g) => {
                    passed = Some((req, g, seq));
                    *gate = Some(g);
                    *lookup_in = req.domid;
                    *checked_seq = seq;
                }
                Err(e) => {
                    *o = Err(e);
                    *step = Step::Done;
                }
            }
        }
        // 2. No lookup runs ahead of the checks under speculation: an op
        //    skips checks its target passed for an earlier op, and a
        //    mispredicted compare there must not look up another domain's
        //    page (Xen fences its XSM decisions the same way,
        //    `evaluate_nospec()`). One barrier for the run. After it, the
        //    domain a lookup goes to is data (`lookup_in`), not the
        //    outcome of a branch: a mispredicted "this op passed" below
        //    looks up nothing of any domain.
        crate::nospec::block_speculation_over(&mut lookup_in);
        // 3. Join and look up. Consecutive ops of one target that passed
        //    join its gate together, before the first of them looks its
        //    page up: one atomic per run. A map refused at its checks
        //    never raises the count (which decides whether a hook has
        //    anything to do, and which any caller could otherwise hold up
        //    with maps it may not make).
        // Ops that have joined their target's gate but not yet used the
        // share.
        let mut joined = 0u32;
        // Whether a run's lookup came back empty in this batch: the ops
        // after it go one by one (each op costs at most one lookup more).
        let mut runs_failed = false;
        for i in 0..n {
            let (Some(req), Some(&Some(gate)), Some(&domid), Some(&checked)) = (
                reqs.get(i),
                gates.get(i),
                lookup_in.get(i),
                checked_seqs.get(i),
            ) else {
                continue;
            };
            if joined == 0 {
                let same = (i..n)
                    .take_while(|&j| reqs.get(j).is_some_and(|r| r.domid == req.domid))
                    .filter(|&j| gates.get(j).is_some_and(Option::is_some))
                    .count();
                gate.active.fetch_add(same as u32, Ordering::SeqCst);
                joined = same as u32;
            }
            joined -= 1;
            // Its page came with an earlier op's run, or the run's lookup
            // refused it (below).
            if matches!(steps.get(i), Some(Step::Locked(_) | Step::Done)) {
                continue;
            }
            let req = &MapRequest { domid, ..*req };
            // The ops from this one on of the same target and access, each
            // past its checks (and joined: the run stays within this
            // target's ops), whatever their gfns: their pages in one call
            // to the host (on Xen one domain lookup, and one p2m walk for
            // the pages one p2m entry maps, in any order).
            let mut run = 0;
            for (k, slot) in run_pages.iter_mut().enumerate().take(n - i) {
                match reqs.get(i + k) {
                    Some(r)
                        if k == 0
                            || (lookup_in.get(i + k) == Some(&domid)
                                && r.perms.write == req.perms.write
                                && !r.grant) =>
                    {
                        *slot = PageSlot::asking(r.gfn);
                        run += 1;
                    }
                    _ => break,
                }
            }
            if run > 1 && !runs_failed && !req.grant {
                let (got, refused, ns) = match run_pages.get_mut(..run) {
                    Some(pages) => self.look_up_run(h, req, gate, checked, pages),
                    None => (0, None, 0),
                };
                ns_get_page += ns;
                runs_failed = got == 0 && refused.is_none();
                for (k, mfn) in run_pages.iter().map(|p| p.mfn()).enumerate().take(got) {
                    let (Some(step), Some(r)) = (steps.get_mut(i + k), reqs.get(i + k)) else {
                        // (Unreachable: `got` is at most `run`.) Not
                        // kept, so given back.
                        h.put_page(mfn, req.perms.write);
                        self.gate_leave(domid);
                        continue;
                    };
                    if r.perms.write && !Self::snooped(&caps, r) {
                        h.note_non_coherent_write(mfn);
                    }
                    *step = Step::Locked(mfn);
                }
                // The op after them, whose page the run's lookup refused:
                // answered, never looked up twice (a lookup may page in).
                if let (Some(e), Some(o), Some(step)) =
                    (refused, out.get_mut(i + got), steps.get_mut(i + got))
                {
                    *o = Err(e);
                    *step = Step::Done;
                    self.gate_leave(domid);
                }
                if got > 0 || refused.is_some() {
                    continue;
                }
            }
            let (Some(o), Some(step)) = (out.get_mut(i), steps.get_mut(i)) else {
                continue;
            };
            let (looked_up, ns) = self.look_up_joined(h, req, gate, &caps, checked);
            ns_get_page += ns;
            *step = match looked_up {
                LookedUp::Page(mfn) => Step::Locked(mfn),
                // Moved since the checks: mapped again from them, below.
                LookedUp::Moved => Step::Again,
                LookedUp::Refused(e) => {
                    *o = Err(e);
                    Step::Done
                }
            };
        }

        // Every share joined went to an op of the run (a share left over
        // would never be given back).
        debug_assert_eq!(joined, 0);
        if steps.iter().any(|s| matches!(s, Step::Locked(..))) {
            match self.lock_for_map(caller.id, context) {
                Err(e) => {
                    for (s, o) in steps.iter_mut().zip(out.iter_mut()) {
                        if let Step::Locked(mfn) = *s {
                            *o = Err(e);
                            *s = Step::GiveBack(mfn);
                        }
                    }
                }
                Ok(mut d) => {
                    d.dd.stats.ns_get_page += ns_get_page;
                    // Mark the cell in every target's gate, then re-read
                    // each op's seq (the protocol of `map`). Which ops set
                    // their target's bit (the first of each target). Once
                    // per run of one target: the bits of this cell change
                    // only under its lock, which is held, so a later op of
                    // the target would find the bit set and set nothing.
                    let mut newly = [false; MAP_CHUNK];
                    let mut marked = None;
                    for ((req, s), newly) in reqs.iter().zip(steps.iter()).zip(newly.iter_mut()) {
                        if matches!(s, Step::Locked(..)) && marked != Some(req.domid) {
                            *newly = self.set_gate_bit(d.cell, req.domid, true);
                            marked = Some(req.domid);
                        }
                    }
                    // Which ops left an entry of their target in the cell
                    // (installed, shared, or failed once the entry existed).
                    let mut entered = [false; MAP_CHUNK];
                    let run = self.locked_run(&d);
                    for ((((req, step), o), entered), (gate, &checked)) in reqs
                        .iter()
                        .zip(steps.iter_mut())
                        .zip(out.iter_mut())
                        .zip(entered.iter_mut())
                        .zip(gates.iter().zip(checked_seqs.iter()))
                    {
                        let Step::Locked(mfn) = *step else {
                            continue;
                        };
                        let moved = gate.is_none_or(|g| g.seq.load(Ordering::SeqCst) != checked);
                        if moved {
                            *step = Step::Moved(mfn);
                            continue;
                        }
                        let outcome = self.map_locked_one(&mut d, h, req, mfn, &run, o);
                        self.write_pending_if_full(&mut d, h);
                        *entered = !matches!(outcome, MapOutcome::Refused);
                        *step = match outcome {
                            // The engine took the page and share over.
                            MapOutcome::Installed | MapOutcome::Consumed => Step::Done,
                            MapOutcome::Shared | MapOutcome::Refused => Step::GiveBack(mfn),
                        };
                    }
                    // A target left with no page here loses the cell's bit:
                    // at once if this run set it and installed nothing of
                    // the target (no op of it done or shared).
                    for ((req, step), o) in reqs.iter().zip(steps.iter()).zip(out.iter()) {
                        let failed = match step {
                            Step::Moved(_) | Step::Again => true,
                            Step::GiveBack(_) => o.is_err(),
                            _ => false,
                        };
                        if !failed {
                            continue;
                        }
                        let of_target = || {
                            reqs.iter()
                                .zip(newly.iter().zip(entered.iter()))
                                .filter(|(r, _)| r.domid == req.domid)
                        };
                        let set_here = of_target().any(|(_, (&n, _))| n);
                        let kept = of_target().any(|(_, (_, &e))| e);
                        self.undo_gate_bit(d.cell, &d.dd, req.domid, set_here && !kept);
                    }
                    // Stale mappings revoked on the way leave their entries
                    // for the flush: no more than `DEFER_LIMIT` wait, as
                    // for unmaps.
                    if d.dd.deferred_entries >= revoke::DEFER_LIMIT {
                        self.clear_deferred_entries_mid_call(&mut d.dd, h);
                    }
                    self.put_driver(d);
                }
            }
        }

        let mut again = 0u32;
        for (i, ((req, step), o)) in reqs
            .iter()
            .zip(steps.iter())
            .zip(out.iter_mut())
            .enumerate()
            .take(n)
        {
            match *step {
                Step::Done => {}
                // Unreachable: every op of the run was reached above. Were
                // one not, it gets an error rather than whatever its slot
                // held.
                Step::Pending => *o = Err(Errno::Inval),
                Step::Locked(mfn) | Step::GiveBack(mfn) => {
                    h.put_page(mfn, req.perms.write);
                    self.gate_leave(req.domid);
                    // Unreachable: every looked-up op got an outcome above.
                    // Were one left, its slot gets an error of its own (it
                    // may hold an earlier op's result: `out` is the caller's).
                    if let Step::Locked(..) = *step {
                        *o = Err(Errno::Inval);
                    }
                }
                Step::Moved(mfn) => {
                    h.put_page(mfn, req.perms.write);
                    self.gate_leave(req.domid);
                    again |= 1 << i;
                }
                Step::Again => again |= 1 << i,
            }
        }
        Answered { n, again }
    }

    /// [`map_batch`](Self::map_batch)'s straight path for a run whose ops
    /// ask the same of one target ([`asks_as`]): the checks, the join of
    /// the gate, the re-read of its number and the cell's bit once for the
    /// run, its pages in one lookup, no per-op bookkeeping but the locked
    /// map. Returns how many ops it answered, from the first (the rest go
    /// in the caller's next run), or `None` with nothing done, nothing held
    /// and no result written: the run's lookup took no page and refused
    /// none (moved since the checks, or a host that looks pages up one by
    /// one). Refused at its checks, every op of the run has their error:
    /// they read nothing the first op's did not (the security policy is
    /// asked once, and FLASK logs one denial, not one an op). Results and
    /// state are those of the general path: an op whose target moved after
    /// its lookup is mapped again on its own.
    #[inline(never)]
    fn map_alike(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        reqs: &[MapRequest],
        out: &mut [Result<Mapped, Errno>],
    ) -> Option<Answered> {
        let first = reqs.first()?;
        let n = reqs.len().min(out.len()).min(MAP_CHUNK);
        let write = first.perms.write;
        // The target's gate, looked up once for the run (the table is
        // fixed at boot): what its number is read from before the checks,
        // what the checks pass, and what the run joins, leaves and marks.
        let target_gate = self.gate(first.domid);
        // As in `map_tagged`: the number before the checks, one barrier
        // between the checks and the lookup. (The backend's facts are
        // gone before the run's frames are there: Xen's stack at the
        // lookup holds one or the other.) (`checked_seq`, of the gate
        // looked up.)
        let checked_seq = target_gate.map_or(0, |g| g.seq.load(Ordering::SeqCst));
        let (gate, not_snooped) = {
            let caps = h.iommu_caps();
            match self.map_checks_in(h, caller, first, &caps, false, target_gate) {
                Ok(gate) => (gate, write && !Self::snooped(&caps, first)),
                Err(e) => {
                    for o in out.iter_mut().take(n) {
                        *o = Err(e);
                    }
                    return Some(Answered { n, again: 0 });
                }
            }
        };
        crate::nospec::block_speculation();
        // Every op joins before the first lookup; the shares of the ops
        // not answered here go back below.
        gate.active.fetch_add(n as u32, Ordering::SeqCst);
        // (Each slot from its op, past the run's end the first op's gfn,
        // never asked: built in one pass, where filling the array with the
        // first gfn and then the run's ops cost a run about 40
        // instructions. Only the run's `n` slots are passed.)
        let mut pages: [PageSlot; MAP_CHUNK] =
            core::array::from_fn(|k| PageSlot::asking(reqs.get(k).map_or(first.gfn, |r| r.gfn)));
        let (got, refused, ns_get_page) = match pages.get_mut(..n) {
            Some(run) => self.look_up_run(h, first, gate, checked_seq, run),
            None => (0, None, 0),
        };
        // The op after the pages taken, when the lookup refused its page:
        // answered here (a lookup may page in: never looked up twice).
        let answered = got + usize::from(refused.is_some());
        if let (Some(e), Some(o)) = (refused, out.get_mut(got)) {
            *o = Err(e);
        }
        // (`gate_leave_many`, the gate known.)
        gate.active.fetch_sub((n - got) as u32, Ordering::SeqCst);
        match (got, answered) {
            (_, 0) => return None,
            // Its first page refused: nothing to lock for.
            (0, _) => {
                return Some(Answered {
                    n: answered,
                    again: 0,
                })
            }
            _ => {}
        }
        if not_snooped {
            for p in pages.iter().take(got) {
                h.note_non_coherent_write(p.mfn());
            }
        }
        // Which pages go back after the lock: bit k for op k (shared, or
        // refused under the lock, or to be mapped again: `MAP_CHUNK` ops
        // fit).
        let mut give_back = 0u32;
        // Which ops are mapped again on their own (the target moved after
        // the lookup).
        let mut again = 0u32;
        match self.lock_for_map_inlined(caller.id, first.context) {
            Err(e) => {
                for o in out.iter_mut().take(got) {
                    *o = Err(e);
                }
                give_back = low_bits(got);
            }
            Ok(mut d) => {
                d.dd.stats.ns_get_page += ns_get_page;
                // Mark, then re-read the number (the protocol of `map`).
                let newly = self.set_bit_in_gate(gate, d.cell, true);
                if gate.seq.load(Ordering::SeqCst) != checked_seq {
                    // Moved since the lookup: nothing installed; each op
                    // is mapped again on its own, after the lock.
                    self.undo_gate_bit(d.cell, &d.dd, first.domid, newly);
                    again = low_bits(got);
                    give_back = again;
                } else {
                    let (mut entered, mut failed) = (false, false);
                    let run = self.locked_run(&d);
                    // The pages in one call, which stops early only for
                    // the context-0 entries waiting to be written. (Each
                    // pass takes an op at least.)
                    let mut k = 0;
                    for _ in 0..got {
                        let (Some(reqs), Some(pages), Some(outs)) =
                            (reqs.get(k..got), pages.get(k..got), out.get_mut(k..got))
                        else {
                            break;
                        };
                        let ops = self.map_locked_run(&mut d, h, reqs, pages, &run, outs);
                        self.write_pending_if_full(&mut d, h);
                        // (The engine took the page and share of a
                        // consumed op over.)
                        give_back |= (ops.shared | ops.refused) << k;
                        failed |= ops.refused != 0;
                        // (Some op entered unless every op taken was
                        // refused: the refused bits are all below `ops.n`,
                        // so that is the mask of `ops.n` bits. A mask
                        // compare, where the count of bits was a
                        // 20-instruction sequence on x86-64's baseline.)
                        entered |= ops.refused != low_bits(ops.n);
                        k += ops.n;
                        if k >= got || ops.n == 0 {
                            break;
                        }
                    }
                    // (Unreachable: each pass takes an op.) Ops left
                    // untaken are answered, their pages given back.
                    if k < got {
                        for o in out.iter_mut().take(got).skip(k) {
                            *o = Err(Errno::Inval);
                        }
                        give_back |= low_bits(got) & !low_bits(k);
                        failed = true;
                    }
                    // A bit this run set goes again if it left no entry of
                    // the target (the rule of `map_batch`).
                    if failed {
                        self.undo_gate_bit(d.cell, &d.dd, first.domid, newly && !entered);
                    }
                    if d.dd.deferred_entries >= revoke::DEFER_LIMIT {
                        self.clear_deferred_entries_mid_call(&mut d.dd, h);
                    }
                }
                self.put_driver(d);
            }
        }
        // (The usual run gives nothing back: no pass over its pages.)
        if give_back != 0 {
            for (k, p) in pages.iter().enumerate().take(got) {
                if give_back & (1 << k) != 0 {
                    h.put_page(p.mfn(), write);
                    self.gate_leave(first.domid);
                }
            }
        }
        Some(Answered { n: answered, again })
    }

    /// What every map checks before looking its page up: who may map
    /// whose pages into which context (the caller-and-target part, and
    /// whether the context exists, skipped when `target_checked`: an
    /// earlier op of the same run, of the same context, passed them for
    /// the same target; the context's attribute part never), what the
    /// backend can do, and the target's gate.
    #[inline(always)]
    pub(super) fn map_checks(
        &self,
        h: &impl Hypervisor,
        caller: &Caller<'_>,
        req: &MapRequest,
        caps: &crate::iommu::BackendCaps,
        target_checked: bool,
    ) -> Result<&TargetGate, Errno> {
        self.map_checks_in(h, caller, req, caps, target_checked, self.gate(req.domid))
    }

    /// [`map_checks`](Self::map_checks), `gate` the caller's lookup of
    /// `req.domid`'s gate ([`gate`](Self::gate)): passed, it is what the
    /// checks answer; none, they refuse with `ESRCH` after the others.
    #[inline(always)]
    fn map_checks_in<'e>(
        &'e self,
        h: &impl Hypervisor,
        caller: &Caller<'_>,
        req: &MapRequest,
        caps: &crate::iommu::BackendCaps,
        target_checked: bool,
        gate: Option<&'e TargetGate>,
    ) -> Result<&'e TargetGate, Errno> {
        check_map_again(h, caller, req.domid, req.context, target_checked)?;
        if req.grant {
            // Designed in the ABI; no backend offers PVIOMMU_FEAT_GRANT yet.
            return Err(Errno::OpNotSupp);
        }
        if caps.features & req.attr.required_feature() != req.attr.required_feature()
            || req.context.0 >= MAX_CONTEXTS
            || (req.context == ContextId::DEFAULT
                && req.attr != crate::MemAttr::WriteBack
                && !caps.default_context_attrs)
        {
            return Err(Errno::OpNotSupp);
        }
        // No such context of the caller's: refused before the page is
        // looked up (a lookup may start paging a page in). Asked once per
        // run and target, like the target's checks; `lock_for_map` is the
        // authority, this only spares the lookup.
        if !target_checked
            && req.context != ContextId::DEFAULT
            && self.cell_number(caller.id, req.context).is_none()
        {
            return Err(Errno::NoEnt);
        }
        gate.ok_or(Errno::Srch)
    }

    /// Join the target's gate, check that its sequence number is still
    /// `checked_seq` (read before the map's checks), and take a reference
    /// on the page (no engine lock held): what it came to, and the ns the
    /// lookup took. Unless it is a page, the reference and the gate share
    /// are already given back.
    fn look_up_page(
        &self,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        gate: &TargetGate,
        caps: &crate::iommu::BackendCaps,
        checked_seq: u32,
    ) -> (LookedUp, u64) {
        gate.active.fetch_add(1, Ordering::SeqCst);
        self.look_up_joined(h, req, gate, caps, checked_seq)
    }

    /// [`look_up_page`](Self::look_up_page) for a map whose share of the
    /// gate was joined already.
    #[inline(always)]
    pub(super) fn look_up_joined(
        &self,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        gate: &TargetGate,
        caps: &crate::iommu::BackendCaps,
        checked_seq: u32,
    ) -> (LookedUp, u64) {
        // This load, between the join and the lookup, is what orders them
        // on arm64 without LSE atomics: the join is an `ldaxr`/`stlxr` loop
        // with no barrier after it, and the `ldar` of a SeqCst load keeps
        // the lookup's reads (the domain's `is_dying`, its p2m) after the
        // join. A hook or teardown that bumps `seq` after its change is
        // seen here, or sees the join. Keep it SeqCst, and before the
        // lookup.
        if gate.seq.load(Ordering::SeqCst) != checked_seq {
            // Moved since the checks: the domid may name another domain
            // now, which must not see so much as a lookup (it may allocate,
            // unshare or page in) before its own checks.
            self.gate_leave(req.domid);
            return (LookedUp::Moved, 0);
        }
        let t0 = self.clock(h);
        let target = CheckedTarget::new(&gate.seq, checked_seq);
        let looked_up = h.get_page(req.domid, req.gfn, req.perms.write, target);
        let ns = self.since(h, t0);
        // Not looked up: the host found the number moved once it held the
        // domain (which may be a new one at the domid), or no domain. If it
        // moved, the map starts again from the checks.
        if looked_up.is_err() && !target.still_checked() {
            self.gate_leave(req.domid);
            return (LookedUp::Moved, ns);
        }
        let checked = looked_up.and_then(|page| {
            check_page(page.kind, req.perms)
                .and_then(|()| page.mfn.ok_or(Errno::XDev))
                .inspect_err(|_| {
                    if let Some(mfn) = page.mfn {
                        h.put_page(mfn, req.perms.write);
                    }
                })
        });
        match checked {
            // A device writing past the CPU caches (no snoop) could leave
            // stale lines behind: the host must flush them before the page
            // becomes anything but plain writable memory (XSA-402).
            Ok(mfn) if req.perms.write && !Self::snooped(caps, req) => {
                h.note_non_coherent_write(mfn)
            }
            Ok(_) => {}
            Err(_) => self.gate_leave(req.domid),
        }
        let looked_up = match checked {
            Ok(mfn) => LookedUp::Page(mfn),
            Err(e) => LookedUp::Refused(e),
        };
        (looked_up, ns)
    }

    /// [`look_up_joined`](Self::look_up_joined) for the pages of a run of
    /// ops of `req`'s target and access, the gfns in `pages` (`req`'s
    /// first), their shares joined: how many the host referenced, from the
    /// first (their frames in `pages`); the error of the page after them if
    /// the host looked it up and refused it (`None`: not looked up); and
    /// the time it took. Nothing is looked up, and nothing given back, if
    /// the target moved since the checks: the ops then go one by one, and
    /// the first finds it moved. The pages it did not reference hold
    /// nothing; an op whose page it refused has its error (its share still
    /// joined), the others look their own up. Inlined, as
    /// `look_up_joined`: the object's check finds the speculation barrier
    /// before the host's lookup in each function that calls it.
    #[inline(always)]
    pub(super) fn look_up_run(
        &self,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        gate: &TargetGate,
        checked_seq: u32,
        pages: &mut [PageSlot],
    ) -> (usize, Option<Errno>, u64) {
        // As in `look_up_joined`: SeqCst, between the join and the lookup.
        if gate.seq.load(Ordering::SeqCst) != checked_seq {
            return (0, None, 0);
        }
        let t0 = self.clock(h);
        // (A host that finds the number moved once it holds the domain
        // takes nothing and gives no answer: the ops then go one by one,
        // and the first finds it moved.)
        let target = CheckedTarget::new(&gate.seq, checked_seq);
        let run = h.get_pages(req.domid, req.perms.write, pages, target);
        let ns = self.since(h, t0);
        // (A host answering more than it was asked for: those are not
        // frames it wrote, and there is no page after them to refuse.)
        let taken = run.taken.min(pages.len());
        let refused = run
            .refused
            .filter(|_| taken < pages.len())
            .map(|kind| refusal(kind, req.perms));
        (taken, refused, ns)
    }

    /// Whether the device's writes through `req`'s mapping are forced to
    /// snoop the CPU caches: write-back into the host's own tables where
    /// the host says they snoop (Xen's VT-d: only with snoop control on
    /// every unit), or into the engine's VT-d tables with snoop control
    /// (SNP). Arm LPAE stage 2 with Normal write-back counts as coherent.
    pub(super) fn snooped(caps: &crate::iommu::BackendCaps, req: &MapRequest) -> bool {
        use crate::iommu::TableFormat;
        if req.attr != crate::MemAttr::WriteBack {
            return false;
        }
        if req.context == ContextId::DEFAULT {
            return caps.default_context_snooped;
        }
        match caps.own_tables.map(|t| t.format) {
            Some(TableFormat::Vtd { snoop_control }) => snoop_control,
            Some(TableFormat::Lpae) => true,
            None => false,
        }
    }

    /// Write the context-0 entries waiting for the flush now if
    /// `DEFER_LIMIT` of them wait (`map_prepare` reserves room for no more,
    /// and a map finding none left writes its own entry). Each caller of
    /// [`map_locked_run`](Self::map_locked_run) calls this right after it,
    /// never the locked maps themselves: the write's chain of calls (a
    /// refused run's pages taken down, down to the table walk) is the
    /// engine's deepest, and so does not carry the locked maps' frame on
    /// Xen's stack. (Measured when the entry's write was inlined into the
    /// install, `iommu_map_inlined`, in the 49th session: that frame grew by
    /// 64 bytes; from inside, the deepest chain went from 3872 to 3936
    /// bytes, from here it was 3832. `build-engine.sh` checks the bound.)
    #[inline(always)]
    fn write_pending_if_full(&self, d: &mut Driver<'_, L>, h: &mut impl Hypervisor) {
        if d.dd.pending_maps.len() >= revoke::DEFER_LIMIT as usize {
            self.write_pending_entries_mid_call(d, h);
        }
    }

    /// What the maps under `d`'s lock share ([`LockedRun`]).
    #[inline(always)]
    fn locked_run(&self, d: &Driver<'_, L>) -> LockedRun {
        LockedRun {
            quota: self.quota_of(d),
            context: Some(d.dd.context).filter(|&c| d.dd.has_context(c)),
        }
    }

    /// The locked maps of `reqs` in order ([`map_locked`](Self::map_locked)),
    /// op `k`'s page the frame in `pages[k]`, its result written into
    /// `out[k]`, counted in the cell's statistics. It stops after an op
    /// that left `DEFER_LIMIT` context-0 entries waiting: the caller writes
    /// them ([`write_pending_if_full`](Self::write_pending_if_full)), then
    /// goes on with the ops after. One call for a run of the straight path
    /// (`map_alike`): a call for each op cost each map about 10
    /// instructions (its arguments, frame and registers). The other paths
    /// give it one op ([`map_locked_one`](Self::map_locked_one)).
    #[inline(never)]
    fn map_locked_run(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        reqs: &[MapRequest],
        pages: &[PageSlot],
        run: &LockedRun,
        out: &mut [Result<Mapped, Errno>],
    ) -> LockedOps {
        let mut ops = LockedOps {
            n: 0,
            shared: 0,
            refused: 0,
            consumed: 0,
        };
        // The most slots the cell may hold: the quota, within the BFN
        // space (read once for the ops).
        let slot_limit = run.quota.min(self.space.len());
        // The ops it may take, counted once, the slices cut to them: the
        // loop then keeps one count. Zipped as they came, with the chunk's
        // `take`, it kept three, spilled around the locked map: each map
        // into an engine context cost 32 instructions more, into context
        // 0 13 (51st session).
        let n = reqs.len().min(pages.len()).min(out.len()).min(MAP_CHUNK);
        let (Some(reqs), Some(pages), Some(out)) =
            (reqs.get(..n), pages.get(..n), out.get_mut(..n))
        else {
            // (Unreachable: `n` is within each.)
            return ops;
        };
        for (k, ((req, page), o)) in reqs.iter().zip(pages).zip(out.iter_mut()).enumerate() {
            // (The op's bit is made in the arms that use it: made before
            // the locked map, it was kept across it on the stack.)
            match self
                .map_locked(d, h, req, page.mfn(), run, slot_limit, o)
                .outcome()
            {
                MapOutcome::Installed => d.dd.stats.maps += 1,
                MapOutcome::Shared => {
                    d.dd.stats.shared += 1;
                    ops.shared |= 1 << k;
                }
                MapOutcome::Refused => ops.refused |= 1 << k,
                MapOutcome::Consumed => ops.consumed |= 1 << k,
            }
            ops.n = k + 1;
            if d.dd.pending_maps.len() >= revoke::DEFER_LIMIT as usize {
                break;
            }
        }
        ops
    }

    /// [`map_locked_run`](Self::map_locked_run) for one op, `mfn` its page
    /// (the general path's and the single map's): what it did, its result
    /// written into `out`. A call of its own, so the one op's slices and
    /// answer are not in its callers' frames: `map_run`'s chain down to a
    /// page lookup is the engine's deepest at a call that may sleep.
    #[inline(never)]
    fn map_locked_one(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        mfn: Mfn,
        run: &LockedRun,
        out: &mut Result<Mapped, Errno>,
    ) -> MapOutcome {
        let mut page = PageSlot::default();
        page.take(mfn);
        let ops = self.map_locked_run(
            d,
            h,
            core::slice::from_ref(req),
            core::slice::from_ref(&page),
            run,
            core::slice::from_mut(out),
        );
        match ops.outcome(0) {
            Some(outcome) => outcome,
            // (Unreachable: it takes its one op.) Nothing happened.
            None => report::refused(out, Errno::Inval).outcome(),
        }
    }

    /// The locked part of a map: dedup or install, the result written
    /// into `out`. `run` is what the maps under this lock share, read
    /// under it ([`locked_run`](Self::locked_run)), `slot_limit` the most
    /// slots the cell may hold (the quota, within the BFN space). Only
    /// [`map_locked_run`](Self::map_locked_run) calls it, whose caller
    /// writes the context-0 entries waiting for the flush once they reached
    /// `DEFER_LIMIT` ([`write_pending_if_full`](Self::write_pending_if_full)).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn map_locked(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        req: &MapRequest,
        mfn: Mfn,
        run: &LockedRun,
        slot_limit: u64,
        out: &mut Result<Mapped, Errno>,
    ) -> Reported {
        // (The cell's context, and one the driver domain has.)
        if run.context != Some(req.context) {
            return report::refused_rarely(out, Errno::NoEnt);
        }
        // Xen's INVALID_GFN (~0) is no page of any p2m (a lookup of it
        // finds none there): refused, so a hook's range, its end saturated
        // at the top, and a dying target's whole range cover every gfn a
        // mapping can have. (Here, not at the checks: there it cost every
        // op of a run 27 instructions in the loop's code.)
        if req.gfn.0 == u64::MAX {
            return report::refused_rarely(out, Errno::Inval);
        }
        // The page's probe and the mapping's key are made once, here, and
        // go by reference: copied whole, the probe was reloaded wider than
        // it was stored, which stalls store forwarding.
        let at = d.dd.probe_page(self.seed, req.domid, req.gfn);
        let key = map_key(req, mfn);
        match self.map_prepare(d, h, &key, &at, run.quota, slot_limit, out) {
            Ok(Prepared::Shared(reported)) => reported,
            Ok(Prepared::Install) => self.map_install(d, h, &key, &at, out),
            Err(e) => report::refused_rarely(out, e),
        }
    }

    /// Dedup (`Shared`, its result written into `out`), or check the quota
    /// and reserve every byte the install needs (`Install`). `key` is the
    /// mapping asked for ([`map_key`]), `at` its page's probe, then the
    /// cell's quota and the most slots it may hold. On `Err` nothing
    /// changed (but a stale mapping found on the way).
    #[allow(clippy::too_many_arguments)]
    fn map_prepare(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        key: &Mapping,
        at: &PageAt,
        quota: u64,
        slot_limit: u64,
        out: &mut Result<Mapped, Errno>,
    ) -> Result<Prepared, Errno> {
        let seed = self.seed;
        let mfn = key.mfn;
        if let Some(idx) = d.dd.find_key_at(seed, at, key) {
            let bfn = self.space.bfn_of(idx).ok_or(Errno::Inval)?;
            let m = d.dd.live_at(idx).ok_or(Errno::Inval)?;
            if m.mfn == mfn {
                d.dd.set_refs(idx, m.refs.checked_add(1).ok_or(Errno::NoSpc)?);
                let m = Mapped::new(bfn, m.gen, d.cell);
                return Ok(Prepared::Shared(report::shared(out, m)));
            }
            // The gfn no longer points at the mapped frame: a removal
            // whose hook has not run yet. Revoke the stale mapping now
            // and map the current frame.
            self.revoke_stale(d, h, idx);
        }
        if self.over_quota(d, quota) {
            return Err(Errno::NoSpc);
        }
        d.dd.reserve_slot(seed, slot_limit, at)?;
        if key.context == ContextId::DEFAULT {
            d.dd.reserve_pending_maps(revoke::DEFER_LIMIT as usize)?;
        }
        // (`install_at` probes again if the revocation or the reservation
        // moved the page's bucket.)
        Ok(Prepared::Install)
    }

    /// [`revoke_slot`](Self::revoke_slot) of a stale mapping found by a
    /// map (rare: a removal whose hook has not run yet), out of line: the
    /// locked maps' loop then holds its values in fewer registers.
    #[cold]
    #[inline(never)]
    fn revoke_stale(&self, d: &mut Driver<'_, L>, h: &mut impl Hypervisor, idx: u64) {
        self.revoke_slot(d, h, idx);
    }

    /// The slot a new mapping would rather have (a preference: taken only
    /// if free, in O(1); see [`DriverDomain::take_slot_near`]). A map of the
    /// gfn after the last one installed here, of the same target, asks for
    /// the slot after that one's: a mediator's run of consecutive gfns gets
    /// consecutive BFNs however unmaps shuffled the free list, so its
    /// entries share leaf tables (and the IOMMU's caches of them). A map
    /// that starts a run asks for the slot, in the 2 MiB block of BFNs of
    /// the free list's head, that sits where its gfn sits in its own 2 MiB
    /// block: a guest's memory is mostly 2 MiB extents, gfns and frames
    /// aligned alike, so a run over one gets BFNs aligned as its frames, as
    /// an IOMMU needs to map the block as one superpage (Xen's own VT-d and
    /// AMD-Vi code folds such a leaf table; so do the engine's VT-d
    /// contexts, see `pgtable::TableOptions::superpages`).
    ///
    /// In context 0 a falling run (the gfn before the last one's) asks for
    /// the slot before the last one's, if free; with no free slot at all,
    /// for the slot of the next fresh ones' block where its gfn sits
    /// ([`DriverDomain::take_slot_near`] makes the slots below it free).
    /// Its BFNs then fall with its gfns (where fresh slots would rise
    /// against them), and the flush writes the run in one call
    /// (`revoke::PendingRun`): on Xen one `iommu_map()` where each falling
    /// page was a call of its own, a table walk from the root. Not in the
    /// engine's own contexts, whose entries are written one at a time:
    /// there the free list's work would buy nothing.
    ///
    /// Only what the caller already knows decides the BFN (its gfns, its
    /// own maps and unmaps), never the frame: a BFN's low bits must not
    /// tell a driver domain anything of a machine frame. (Whether the host
    /// gave the room a falling run's skip asks for also decides it: no
    /// frame's bits, and no more than the ENOMEM the caller may see
    /// anyway.) `NONE` when the free list is empty: a fresh slot is next.
    #[inline]
    fn slot_wanted(&self, dd: &DriverDomain, key: &Mapping) -> u64 {
        let (domid, gfn, last) = dd.run_hint;
        let after_last = last != NONE && domid == key.domid;
        if after_last && gfn.0.wrapping_add(1) == key.gfn.0 {
            return last + 1;
        }
        // (Context 0's: see above.)
        let falling =
            after_last && dd.context == ContextId::DEFAULT && key.gfn.0.wrapping_add(1) == gfn.0;
        if falling && last > 0 && dd.is_free_slot(last - 1) {
            return last - 1;
        }
        // BFNs of one 2 MiB block: those of one leaf table.
        const BLOCK: u64 = crate::pgtable::ENTRIES as u64 - 1;
        let near = if dd.free_head == NONE && falling {
            dd.slots.len() as u64
        } else {
            dd.free_head
        };
        self.space
            .bfn_of(near)
            .and_then(|b| self.space.index_of(Bfn(b.0 & !BLOCK | key.gfn.0 & BLOCK)))
            .unwrap_or(NONE)
    }

    /// Take a slot, write the IOMMU entry and index the mapping, the
    /// result written into `out`. Nothing allocates here but a falling
    /// run's room ahead of the fresh slots, best effort and before the
    /// entry exists (`DriverDomain::take_fresh_ahead`). Once the IOMMU
    /// entry exists, every failure goes through the unmap-flush-release
    /// path (`Consumed`): the page reference is never dropped while the
    /// device may still reach the page.
    fn map_install(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        key: &Mapping,
        at: &PageAt,
        out: &mut Result<Mapped, Errno>,
    ) -> Reported {
        let key = *key;
        let dd = &mut *d.dd;
        let idx = match dd.take_slot_near(self.slot_wanted(dd, &key)) {
            Ok(i) => i,
            Err(e) => return report::refused_rarely(out, e),
        };
        let Some(bfn) = self.space.bfn_of(idx) else {
            dd.free_slot(idx);
            return report::refused_rarely(out, Errno::NoSpc);
        };
        // Context 0 (the host's own tables, one backend call a run): the
        // entry is written by the flush that ends the owner's call, the
        // run's entries together (`write_pending_entries`). The BFN is in
        // the caller's op array before that (copied out a run at a time):
        // a device it is given before the call returns may fault (its own
        // caller's device only; the ABI says a BFN is good once the call
        // returned).
        let deferred =
            key.context == ContextId::DEFAULT && dd.pending_map_room(revoke::DEFER_LIMIT as usize);
        if !deferred {
            let t0 = self.clock(h);
            let mapped = dd.iommu_map_inlined(h, key.context, bfn, key.mfn, key.perms, key.attr);
            // (Timing off, `t0` is 0 and so is the time: nothing to add.)
            if t0 != 0 {
                dd.stats.ns_iommu_map += self.since(h, t0);
            }
            if let Err(e) = mapped {
                dd.free_slot(idx);
                return report::refused_rarely(out, e);
            }
        }
        match dd.install_at(self.seed, at, idx, key) {
            Ok(tag) => {
                dd.run_hint = (key.domid, key.gfn, idx);
                if deferred {
                    // (Room checked above: never refused, nothing allocated.)
                    let pending = driver::PendingMap {
                        slot: idx as u32,
                        gen: tag,
                    };
                    let pushed = crate::storage::try_push(&mut dd.pending_maps, pending);
                    // (Were it refused, the page would be mapped nowhere:
                    // a device given the BFN faults, it reaches nothing.)
                    debug_assert!(pushed.is_ok(), "room for a waiting map");
                    // (Written once `DEFER_LIMIT` wait, by the caller:
                    // `write_pending_if_full`.)
                }
                report::installed(out, Mapped::new(bfn, tag, d.cell))
            }
            Err(e) if deferred => {
                // Unreachable (capacity reserved); no entry was written.
                dd.free_slot(idx);
                report::refused(out, e)
            }
            Err(e) => {
                // Unreachable (capacity reserved). The entry exists: take it
                // down the way an unmap does, page released after the flush.
                // Its gate share goes with the page, after the flush. Should
                // the IOMMU refuse that unmap too, the slot is Stuck, and
                // its retry files a revocation notice for a BFN the caller
                // was told failed: acknowledged like any other, it frees
                // the slot, and the device was never given the BFN.
                take_down_unindexed(dd, h, idx, bfn, key);
                report::consumed(out, e)
            }
        }
    }
}

/// Take down the entry of a map whose indexing failed (unreachable:
/// capacity is reserved) the way an unmap does: slot `idx`, BFN `bfn`,
/// mapping `key`, its page released after the flush. Out of line: the
/// locked maps' loop then holds its values in fewer registers.
#[cold]
#[inline(never)]
fn take_down_unindexed(
    dd: &mut DriverDomain,
    h: &mut impl Hypervisor,
    idx: u64,
    bfn: Bfn,
    key: Mapping,
) {
    match dd.iommu_unmap(h, key.context, bfn) {
        Ok(()) => dd.push_unmapping(idx, key, false),
        Err(_) => dd.push_stuck(idx, key, true),
    }
}

/// Review 162: 3c45945's cut of a run (`windows(2)`, `asked_of`) and
/// `map_alike`'s entered test against the forms before it.
#[cfg(test)]
mod run_cut_tests {
    use super::*;
    use crate::{Gfn, MemAttr, Permissions};

    /// The cut of `map_batch_in` before 3c45945: `(n, alike)`.
    fn cut_before(reqs: &[MapRequest], limit: usize) -> (usize, bool) {
        let mut n = reqs.len().min(limit).min(MAP_CHUNK);
        let first = &reqs[0];
        let context = first.context;
        let fell_again = |falling: &mut bool, earlier: &[MapRequest], req: &MapRequest| {
            *falling = *falling && earlier.last().is_some_and(|last| req.gfn < last.gfn);
            *falling
        };
        let asks_as = |r: &MapRequest, first: &MapRequest| {
            r.domid == first.domid && r.perms == first.perms && r.attr == first.attr && !r.grant
        };
        let mut rising = true;
        let mut falling = reqs.get(1).is_some_and(|second| second.gfn < first.gfn);
        let mut alike = !first.grant;
        for i in 1..n {
            let (Some(req), Some(earlier)) = (reqs.get(i), reqs.get(..i)) else {
                break;
            };
            rising = rising && earlier.last().is_some_and(|last| req.gfn > last.gfn);
            if req.context != context
                || (!rising
                    && !fell_again(&mut falling, earlier, req)
                    && earlier
                        .iter()
                        .any(|r| r.domid == req.domid && r.gfn == req.gfn))
            {
                n = i;
                break;
            }
            alike = alike && asks_as(req, first);
        }
        (n, alike)
    }

    /// The cut of `map_batch_in` at 3c45945, copied as it stands.
    fn cut_now(reqs: &[MapRequest], limit: usize) -> (usize, bool) {
        let mut n = reqs.len().min(limit).min(MAP_CHUNK);
        let first = &reqs[0];
        let context = first.context;
        let mut rising = true;
        let mut falling = reqs.get(1).is_some_and(|second| second.gfn < first.gfn);
        let mut alike = !first.grant;
        let first_asks = asked_of(first);
        let asked = reqs.get(..n).unwrap_or_default();
        for (i, pair) in asked.windows(2).enumerate() {
            let [last, req] = pair else {
                break;
            };
            rising = rising && req.gfn > last.gfn;
            if req.context != context
                || (!rising
                    && !fell_again(&mut falling, last, req)
                    && asked.get(..=i).is_some_and(|e| {
                        e.iter().any(|r| r.domid == req.domid && r.gfn == req.gfn)
                    }))
            {
                n = i + 1;
                break;
            }
            alike = alike && asks_as(req, first_asks);
        }
        (n, alike)
    }

    /// What the cut must give, from `map_batch`'s doc: the longest prefix
    /// (within the chunk) of one context with no (domid, gfn) twice;
    /// `alike` iff every op of it asks exactly what the first asks and
    /// none asks a grant.
    fn cut_spec(reqs: &[MapRequest], limit: usize) -> (usize, bool) {
        let max = reqs.len().min(limit).min(MAP_CHUNK);
        let mut n = max.min(1);
        while n < max {
            let r = &reqs[n];
            if r.context != reqs[0].context
                || reqs[..n]
                    .iter()
                    .any(|e| e.domid == r.domid && e.gfn == r.gfn)
            {
                break;
            }
            n += 1;
        }
        let f = &reqs[0];
        let alike = reqs[..n]
            .iter()
            .all(|r| !r.grant && r.domid == f.domid && r.perms == f.perms && r.attr == f.attr);
        (n, alike)
    }

    fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    const ATTRS: [MemAttr; 3] = [MemAttr::WriteBack, MemAttr::Uncached, MemAttr::Device];

    fn req(r: &mut impl FnMut() -> u64, base: u64, variety: u64) -> MapRequest {
        let v = |r: &mut dyn FnMut() -> u64, k| r() % variety < k;
        MapRequest {
            context: ContextId(if v(r, 1) { 1 } else { 0 }),
            domid: DomId(if v(r, 1) {
                [0, 1, 0x7fef, u16::MAX][(r() % 4) as usize]
            } else {
                5
            }),
            gfn: Gfn(match r() % 6 {
                0 => base.wrapping_add(r() % 4),
                1 => base.wrapping_sub(r() % 4),
                2 => [0, 1, u64::MAX, u64::MAX - 1][(r() % 4) as usize],
                _ => base.wrapping_add(r() % 12).wrapping_sub(6),
            }),
            perms: Permissions {
                read: !v(r, 1),
                write: v(r, 3),
            },
            attr: if v(r, 1) {
                ATTRS[(r() % 3) as usize]
            } else {
                MemAttr::WriteBack
            },
            grant: v(r, 1),
        }
    }

    #[test]
    fn the_cut_is_the_same_as_before_and_as_its_spec() {
        let mut r = xorshift(0x162);
        for round in 0..400_000u64 {
            let len = (r() % 11) as usize + 1;
            let base = match round % 3 {
                0 => r(),
                1 => r() % 8,
                _ => u64::MAX - r() % 8,
            };
            let variety = 2 + r() % 40;
            let mut reqs: Vec<MapRequest> = (0..len).map(|_| req(&mut r, base, variety)).collect();
            // Runs that rise or fall strictly, then break the pattern.
            match r() % 4 {
                0 => {
                    for (k, q) in reqs.iter_mut().enumerate() {
                        q.gfn = Gfn(base.wrapping_add(k as u64));
                    }
                }
                1 => {
                    for (k, q) in reqs.iter_mut().enumerate() {
                        q.gfn = Gfn(base.wrapping_sub(k as u64));
                    }
                }
                _ => {}
            }
            if r().is_multiple_of(3) {
                let (a, b) = ((r() as usize) % len, (r() as usize) % len);
                reqs[b].gfn = reqs[a].gfn;
                reqs[b].domid = reqs[a].domid;
            }
            let limit = if r().is_multiple_of(5) {
                (r() % 10) as usize
            } else {
                usize::MAX
            };
            if limit == 0 {
                continue;
            }
            let old = cut_before(&reqs, limit);
            let new = cut_now(&reqs, limit);
            assert_eq!(new, old, "{reqs:?} limit {limit}");
            assert_eq!(new, cut_spec(&reqs, limit), "{reqs:?} limit {limit}");
            // And the cut `map_batch_in` makes, with its straight case.
            assert_eq!(cut_run(&reqs, limit), Some(new), "{reqs:?} limit {limit}");
        }
    }

    /// `asked_of` is one-to-one over every field it packs: two requests
    /// pack alike iff they ask alike (domid, attr, read, write, grant),
    /// whatever their context and gfn.
    #[test]
    fn asked_of_is_one_to_one() {
        let mut all = Vec::new();
        for domid in [0u16, 1, 0xff, 0x100, 0x7fef, 0x7ff0, 0xfffe, u16::MAX] {
            for attr in ATTRS {
                for read in [false, true] {
                    for write in [false, true] {
                        for grant in [false, true] {
                            all.push(MapRequest {
                                context: ContextId(u32::from(domid)),
                                domid: DomId(domid),
                                gfn: Gfn(u64::from(domid) * 7),
                                perms: Permissions { read, write },
                                attr,
                                grant,
                            });
                        }
                    }
                }
            }
        }
        for a in &all {
            for b in &all {
                let same = a.domid == b.domid
                    && a.attr == b.attr
                    && a.perms == b.perms
                    && a.grant == b.grant;
                assert_eq!(asked_of(a) == asked_of(b), same, "{a:?} {b:?}");
                // And the old per-op test, for a first that asks no grant.
                if !a.grant {
                    let before =
                        b.domid == a.domid && b.perms == a.perms && b.attr == a.attr && !b.grant;
                    assert_eq!(asks_as(b, asked_of(a)), before, "{a:?} {b:?}");
                }
            }
        }
    }

    /// `run_key` is one to one over the context and every field
    /// `asked_of` packs: two requests have one key iff they are of one
    /// context and ask alike, whatever their gfn. (A collision would let
    /// the cut's straight case take an op of another context into the
    /// run, or call ops alike that are not.)
    #[test]
    fn run_key_is_one_to_one() {
        let mut all = Vec::new();
        for context in [0u32, 1, 0xff, 0x100, 0xffff, 0x1_0000, u32::MAX] {
            for domid in [0u16, 1, 0xff, 0x100, 0x7fef, u16::MAX] {
                for attr in ATTRS {
                    for read in [false, true] {
                        for write in [false, true] {
                            for grant in [false, true] {
                                all.push(MapRequest {
                                    context: ContextId(context),
                                    domid: DomId(domid),
                                    gfn: Gfn(u64::from(context) ^ u64::from(domid)),
                                    perms: Permissions { read, write },
                                    attr,
                                    grant,
                                });
                            }
                        }
                    }
                }
            }
        }
        for a in &all {
            for b in &all {
                let same = a.context == b.context && asked_of(a) == asked_of(b);
                assert_eq!(run_key(a) == run_key(b), same, "{a:?} {b:?}");
            }
        }
    }

    /// The cut's straight case on runs made to take it: gfns rising (by
    /// one, or with gaps, to the top of the gfns), one context, all asking
    /// alike; and the same runs with one op changed in each field the key
    /// packs, which the walk then cuts or finds not alike, as its spec.
    #[test]
    fn the_straight_cut_is_its_spec() {
        let base = MapRequest {
            context: ContextId(3),
            domid: DomId(7),
            gfn: Gfn(0),
            perms: Permissions {
                read: true,
                write: true,
            },
            attr: MemAttr::WriteBack,
            grant: false,
        };
        for start in [0u64, 1, 1 << 40, u64::MAX - 20] {
            for step in [1u64, 2] {
                for len in 1..=10usize {
                    let run: Vec<MapRequest> = (0..len)
                        .map(|k| MapRequest {
                            gfn: Gfn(start + k as u64 * step),
                            ..base
                        })
                        .collect();
                    assert_eq!(cut_run(&run, usize::MAX), Some((len.min(MAP_CHUNK), true)));
                    assert_eq!(cut_run(&run, usize::MAX), Some(cut_spec(&run, usize::MAX)));
                    for k in 0..len {
                        for change in 0..7 {
                            let mut v = run.clone();
                            let r = &mut v[k];
                            match change {
                                0 => r.context.0 ^= 1,
                                1 => r.domid.0 ^= 1,
                                2 => r.attr = MemAttr::Device,
                                3 => r.perms.read = false,
                                4 => r.perms.write = false,
                                5 => r.grant = true,
                                _ => r.gfn = Gfn(start),
                            }
                            assert_eq!(
                                cut_run(&v, usize::MAX),
                                Some(cut_spec(&v, usize::MAX)),
                                "{v:?}"
                            );
                            assert_eq!(cut_run(&v, usize::MAX), Some(cut_now(&v, usize::MAX)));
                        }
                    }
                }
            }
        }
    }

    /// `low_bits(n)` compared with the refused bits of `n` ops says what
    /// `ops.n > ops.refused.count_ones()` said, for every `n` up to
    /// `MAP_CHUNK` and every `refused` within those ops (all 2^n of them);
    /// and the two differ only outside that (bits at or past `n`, or more
    /// than 32 ops), which `map_locked_run` never answers.
    #[test]
    fn entered_mask_is_the_count_within_the_chunk() {
        for n in 0..=MAP_CHUNK {
            for refused in 0..(1u32 << n) {
                assert_eq!(
                    refused != low_bits(n),
                    n > refused.count_ones() as usize,
                    "n {n} refused {refused:#b}"
                );
            }
        }
        for n in 0..=64usize {
            let m = low_bits(n);
            assert_eq!(m.count_ones() as usize, n.min(32), "n {n}");
            assert_eq!(m.trailing_ones() as usize, n.min(32), "n {n}");
        }
        // Where they would differ (never answered): a bit past `n`...
        assert_ne!(0b10 != low_bits(1), 1 > 1);
        // ... or more than 32 ops all refused.
        assert_ne!(u32::MAX != low_bits(33), 33 > 32);
    }
}
