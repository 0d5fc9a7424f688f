//! Where a hypercall enters: `HYPERVISOR_pv_iommu_op(cmd, arg)`.
//!
//! The shape of Xen's own handlers: copy the argument in, validate every
//! guest-controlled value, act, copy results out; a long batch stops when the
//! platform asks and reports how far it got in the guest's own batch header
//! (`nr_done`), so re-issuing the same call — by the guest, or by Xen as a
//! continuation — resumes exactly there. No op is applied twice: an op's
//! result is copied out before `nr_done` passes it, and an op whose result
//! cannot be copied out is undone.
//!
//! Guest copies happen with no engine lock held (for HVM/PVH callers they
//! take the caller's p2m lock and may fault): the ops are copied in a
//! window at a time (up to `MAP_CHUNK`, one guest copy), acted on under the
//! lock a run or an op at a time, and copied out.

use pviommu_abi::MapRequest;
use pviommu_abi::{
    cmd, feature, op_flags, revoked_next, stats_flag, subop, version_major, PvIommuBatch,
    PvIommuCaps, PvIommuEntry, PvIommuLimits, PvIommuOp, PvIommuRegion, PvIommuRegions,
    PvIommuStats, Request, BATCH_INCOMPLETE, INTERFACE_VERSION,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use lock_api::RawMutex;

use crate::config::{MAX_CONTEXTS, MAX_REGIONS_PER_CALL};
use crate::engine::{Engine, Hypervisor, Notice, CONTROL_RETRIES, MAP_CHUNK};
use crate::nospec::get_nospec;
use crate::permission::{
    device_refusal, may_call, may_control, may_read_regions, may_use_contexts, Caller,
};
use crate::platform::{DomainInfo, XsmAction};
use crate::{Bfn, ContextId, DomId, Errno};

const OP_SIZE: u64 = core::mem::size_of::<PvIommuOp>() as u64;

/// Copy a `T` in from guest address `addr`.
fn copy_in<T: FromBytes + IntoBytes>(h: &mut impl Hypervisor, addr: u64) -> Result<T, Errno> {
    let mut v = T::new_zeroed();
    h.copy_from_guest(addr, v.as_mut_bytes())?;
    Ok(v)
}

/// Write a notice `revoked_next` found (either form) into its op: BFN,
/// context (in the `IN_CONTEXT` form the one asked for: `revoked_in`
/// reports no other context's notice), domid, gfn, and
/// the number only for a caller that asked for it (an ABI 1.4 caller may
/// reuse the op with `notice` still set).
fn write_notice(op: &mut PvIommuOp, (bfn, n, number): (Bfn, Notice, u64), numbered: bool) {
    op.bfn = bfn.0;
    op.context = n.context.0;
    op.domid = n.domid.0;
    op.gfn = n.gfn.0;
    if numbered {
        op.notice = number;
    }
}

/// Filler for the window's places no op was copied into (never read as
/// an op of the batch): not all zero, so that filling the window is no
/// memset call (in Xen `rep stosb`: one TCG block per byte).
const UNUSED_OP: PvIommuOp = PvIommuOp {
    subop: u16::MAX,
    flags: 0,
    status: 0,
    context: 0,
    domid: 0,
    _pad0: 0,
    gfn: 0,
    bfn: 0,
    notice: 0,
};

/// The batch's ops copied in ahead of the batch loop: up to [`MAP_CHUNK`]
/// with one guest copy. `ops[..len]` are the batch's ops `base..base +
/// len`; each op is acted on from exactly one copy, this one (a run's ops
/// are parsed here and their results written back from here, in place).
/// An op may be copied in more than once before that: by the batch loop's
/// probe of an op after one `run_op` ran, or again with a window copied
/// from a run's first op (`cuts_run`); only the copy acted on counts.
// (The ops are the caller's local, filled with `UNUSED_OP` there: an
// array built in a constructor was built twice in the Xen object, once in
// a temporary and copied, 320 bytes more on the stack and a memcpy.)
struct Window<'a> {
    ops: &'a mut [PvIommuOp; MAP_CHUNK],
    base: u32,
    len: usize,
}

impl<'a> Window<'a> {
    /// An empty window over `ops`.
    fn over(ops: &'a mut [PvIommuOp; MAP_CHUNK]) -> Self {
        Self {
            ops,
            base: 0,
            len: 0,
        }
    }

    /// The window's place of the batch's op `i`, if it was copied in.
    fn place(&self, i: u32) -> Option<usize> {
        let k = i.checked_sub(self.base)? as usize;
        (k < self.len).then_some(k)
    }

    /// Whether a run starting at place `k` (not the first) might go on past
    /// the window's end: ops of the batch come after the window, and the
    /// window's ops from `k` are all of one run kind's subop and of one
    /// context. The window is then copied in again from `k`, so that the
    /// run is not cut short by the window (only a guess: the copy is
    /// parsed and dispatched afresh).
    fn cuts_run(&self, k: usize, nr_ops: u32) -> bool {
        if k == 0 || u64::from(self.base) + self.len as u64 >= u64::from(nr_ops) {
            return false;
        }
        let Some((first, rest)) = self.ops.get(k..self.len).and_then(|w| w.split_first()) else {
            return false;
        };
        may_start_run(first)
            && rest
                .iter()
                .all(|op| op.subop == first.subop && op.context == first.context)
    }

    /// Copy in the batch's ops from `at` (up to [`MAP_CHUNK`], not past the
    /// batch's end) with one guest copy; if that faults, op by op up to the
    /// fault (the op that faults is reported when the batch loop reaches
    /// it: the ops before it run first). `Err` only when op `at` itself
    /// cannot be copied in (the window is then empty).
    // (Called once, in the batch loop's `run_window`: inlined there.)
    #[inline(always)]
    fn fill(&mut self, h: &mut impl Hypervisor, hdr: &PvIommuBatch, at: u32) -> Result<(), Errno> {
        let want = (hdr.nr_ops.saturating_sub(at) as usize).min(MAP_CHUNK);
        self.base = at;
        self.len = 0;
        let Some(buf) = self.ops.get_mut(..want).filter(|b| !b.is_empty()) else {
            // Unreachable: the batch loop fills only for an op of the batch.
            return Err(Errno::Inval);
        };
        let addr = hdr.ops + u64::from(at) * OP_SIZE;
        if h.copy_from_guest(addr, buf.as_mut_bytes()).is_ok() {
            self.len = want;
            return Ok(());
        }
        for (k, op) in buf.iter_mut().enumerate() {
            if let Err(e) = h.copy_from_guest(addr + k as u64 * OP_SIZE, op.as_mut_bytes()) {
                return if k == 0 { Err(e) } else { Ok(()) };
            }
            self.len = k + 1;
        }
        // Copied op by op after all (the guest's memory changed between).
        Ok(())
    }
}

/// Whether `op` may start a run (maps, unmaps of a page,
/// acknowledgements, one context's notices): by its subop and flags alone,
/// a guess (a run parses its first op, and hands back one not of its
/// form).
fn may_start_run(op: &PvIommuOp) -> bool {
    match op.subop {
        subop::MAP | subop::UNMAP => op.flags & op_flags::EXTENT_2M == 0,
        subop::REVOKED_ACK => true,
        subop::REVOKED_NEXT => op.flags & revoked_next::IN_CONTEXT != 0,
        _ => false,
    }
}

/// Parse the ops of a run: `ops[0]` (already parsed into `head`) and the
/// ones after it while `take` accepts them, each into the same place of
/// `parsed`, up to `parsed.len()` (each op is parsed once). Returns how
/// many.
fn parse_run<T>(
    ops: &[PvIommuOp],
    head: T,
    parsed: &mut [T],
    take: impl Fn(&PvIommuOp) -> Option<T>,
) -> usize {
    let Some((slot0, slots)) = parsed.split_first_mut() else {
        return 0;
    };
    *slot0 = head;
    let mut n = 1;
    for (op, slot) in ops.iter().skip(1).zip(slots.iter_mut()) {
        match take(op) {
            Some(t) => *slot = t,
            None => break,
        }
        n += 1;
    }
    n.min(ops.len())
}

/// The fields of a map op [`Request::parse_map`] reads but its gfn,
/// its bfn and notice (which a map has zero), packed one to one into two
/// words, in the order they lie in memory (the compiler reads each with
/// one load): subop and flags; context, domid and padding.
#[inline(always)]
fn map_op_key(op: &PvIommuOp) -> (u32, u64) {
    (
        u32::from(op.subop) | u32::from(op.flags) << 16,
        u64::from(op.context) | u64::from(op.domid) << 32 | u64::from(op._pad0) << 48,
    )
}

/// Whether `op` is a run's head op, a well-formed map whose
/// [`map_op_key`] is `head_key`, in every field [`Request::parse_map`]
/// reads but the gfn (the head's bfn and notice are zero, or it would not
/// have parsed): it then parses as the head's request with its own gfn
/// (`maps_as_parses_as_the_head`). The mediator's run of maps is such
/// ops: two compares and a test an op, where the parse cost each op about
/// 40 instructions. The status is an out field, never read.
#[inline(always)]
fn maps_as(op: &PvIommuOp, head_key: (u32, u64)) -> bool {
    map_op_key(op) == head_key && op.bfn | op.notice == 0
}

/// The address of `nr_done` in the batch header at `arg`.
fn nr_done_at(arg: u64) -> u64 {
    arg.wrapping_add(core::mem::offset_of!(PvIommuBatch, nr_done) as u64)
}

/// Write back the `nr_done` of `hdr`, the batch header read whole from
/// `arg` (so the 4 bytes lie within what was read), and nothing else of it.
fn write_nr_done(h: &mut impl Hypervisor, arg: u64, hdr: &PvIommuBatch) -> Result<(), Errno> {
    h.copy_to_guest(nr_done_at(arg), hdr.nr_done.as_bytes())
}

/// `Err(Fault)` unless `written`, just copied to the guest at `addr`, reads
/// back as written. Xen drops an HVM or PVH caller's writes into memory
/// its p2m makes read-only (p2m_ram_ro: `__hvm_copy()`) without a fault;
/// where acting on a write the caller never got would lose something (a
/// batch continued from the `nr_done` it was sent with, a `STATS` reset
/// of counters never seen), the write is read back first (a review,
/// 2026-12-06).
fn reads_back<T: FromBytes + IntoBytes + Immutable>(
    h: &mut impl Hypervisor,
    addr: u64,
    written: &T,
) -> Result<(), Errno> {
    let back: T = copy_in(h, addr)?;
    if back.as_bytes() == written.as_bytes() {
        Ok(())
    } else {
        Err(Errno::Fault)
    }
}

/// Write `ops` back to the guest at `addr`, in one copy if it can be done;
/// otherwise op by op, to find the first that cannot be written:
/// `Err((its index, error))` (the ones before it are written).
fn write_back(h: &mut impl Hypervisor, addr: u64, ops: &[PvIommuOp]) -> Result<(), (usize, Errno)> {
    if h.copy_to_guest(addr, ops.as_bytes()).is_ok() {
        return Ok(());
    }
    for (k, op) in ops.iter().enumerate() {
        h.copy_to_guest(addr + k as u64 * OP_SIZE, op.as_bytes())
            .map_err(|e| (k, e))?;
    }
    // Written one by one after all (the guest's memory changed between).
    Ok(())
}

/// The status an op reports for `r`.
fn status_of(r: &Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.negated(),
    }
}

/// What a run answers: `Ok(ops done)`, at least one; or `Err((ops done
/// before the failure, error))`, which ends the batch.
type RunResult = Result<u32, (u32, Errno)>;

/// Run a run of destructive ops (unmaps, acknowledgements) starting at
/// `hdr.nr_done`: of `ops`, copied in (the batch loop's window from there;
/// `ops[0]` already parsed into `head`), the first and up to
/// [`MAP_CHUNK`] - 1 more that `take` accepts, each parsed once into a
/// `T`, as `run_op` runs each: check, report, act, report again what
/// changed. `step(h, ops, act, out)` is the engine's batch call for the
/// kind: it checks (`act` false) or acts on `ops` and fills each one's
/// (status, whether it passed), taking the caller's cell lock once for
/// the run; no lock is held across the guest copies. Returns how many
/// were done (their statuses written into `ops` too). If a status cannot
/// be written, the ops before it are acted on and reported, that one and
/// the rest are left alone, and `Err((done, error))` is returned (if a
/// changed status cannot be written after the acts, every reported op
/// counts as done: it was acted on).
// Inlined into each run (which is not inlined), so that its engine calls
// are inlined there as they were before it was shared.
#[inline(always)]
fn run_checked<H: Hypervisor, T: Copy>(
    h: &mut H,
    hdr: &PvIommuBatch,
    ops: &mut [PvIommuOp],
    head: T,
    take: impl Fn(&PvIommuOp) -> Option<T>,
    mut step: impl FnMut(&mut H, &[T], bool, &mut [(i32, bool)]) -> usize,
) -> RunResult {
    // Filled from `head`, not zeroed (see `Window`).
    let mut reqs = [head; MAP_CHUNK];
    let n = parse_run(ops, head, &mut reqs, take);
    let addr_of = |k: usize| hdr.ops + (hdr.nr_done as u64 + k as u64) * OP_SIZE;
    // Check and report.
    let mut checks = [(Errno::NoEnt.negated(), false); MAP_CHUNK];
    let checked = step(h, reqs.get(..n).unwrap_or(&[]), false, &mut checks);
    if checked == 0 {
        // Unreachable (a run checks at least its first op); never loop on
        // it.
        return Err((0, Errno::Inval));
    }
    for (op, &(status, _)) in ops.iter_mut().zip(checks.iter()).take(checked) {
        op.status = status;
    }
    let (reported, failure) = match write_back(h, addr_of(0), ops.get(..checked).unwrap_or(&[])) {
        Ok(()) => (checked, None),
        Err((k, e)) => (k, Some(e)),
    };
    // Act on the reported ones that passed their check (only those: a BFN
    // refused at the check may be someone's new mapping by now), then
    // report what changed (another CPU may have revoked or acknowledged a
    // BFN since, or the IOMMU refused the unmap).
    // (The ones to act on are moved to the front of `reqs`, in order;
    // `which[i]` is the op of the i-th.)
    let mut which = [0u8; MAP_CHUNK];
    let mut m = 0;
    for (k, &(_, pass)) in checks.iter().enumerate().take(reported) {
        if let (true, Some(&req), Some(w)) = (pass, reqs.get(k), which.get_mut(m)) {
            if let Some(p) = reqs.get_mut(m) {
                *p = req;
            }
            *w = k as u8;
            m += 1;
        }
    }
    let mut acts = [(0, false); MAP_CHUNK];
    let acted = if m > 0 {
        step(h, reqs.get(..m).unwrap_or(&[]), true, &mut acts)
    } else {
        0
    };
    let mut failure = failure;
    for (&k, &(status, _)) in which.iter().zip(acts.iter()).take(acted) {
        let k = usize::from(k);
        let Some(op) = ops.get_mut(k) else {
            continue;
        };
        if status != op.status {
            op.status = status;
            // Every reported op was acted on: a status that cannot be
            // written again fails the batch (EFAULT), and the other changed
            // ones are still written.
            if let Err(e) = h.copy_to_guest(addr_of(k), op.as_bytes()) {
                failure.get_or_insert(e);
            }
        }
    }
    // A run checked short of what was parsed (not done today: the check
    // takes every op it is given) goes on at the first op not checked,
    // from the window (its status is not written here).
    // Every op reported as passing its check must have been acted on
    // (today each act step acts on all it is given): one that was not
    // would count in `nr_done` with a success written, an unmap believed
    // done while its BFN stays mapped. Fail closed: `nr_done` stops before
    // it (its status, and the later ones', are then undefined, as after
    // any failure), and the batch ends.
    if let Some(&first_not_acted) = which.get(acted).filter(|_| acted < m) {
        return Err((u32::from(first_not_acted), failure.unwrap_or(Errno::Inval)));
    }
    match failure {
        Some(e) => Err((reported as u32, e)),
        None => Ok(checked as u32),
    }
}

/// An unmap's answer as its op reports it: a revoked BFN it acknowledged
/// is `ESTALE`.
fn stale_if_revoked(r: Result<bool, Errno>) -> Result<(), Errno> {
    match r {
        Ok(true) => Err(Errno::Stale),
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The command a batch's continuation re-enters with when the call ended
/// in an error but its cells' writes, clears and flushes did not all fit
/// in that entry (`Engine::finish_contexts` bounds an entry's share). A
/// call that ends in an error cannot answer `BATCH_INCOMPLETE` (the
/// caller would re-issue it and run its ops again), and finishing every
/// cell at once let a caller choose an unbounded entry (a review of
/// 2026-12-07). So the error travels in the continuation's command, as
/// Xen's `memory_op` carries its progress in its `cmd`: the entries it
/// makes run no op, finish the cells, and the last answers the error.
///
/// Layout (never zero, never [`BATCH_INCOMPLETE`]): bit 30 set, the errno
/// in bits 16-23, the contexts the call's ops named in bits 0-15 (bit n:
/// context n; finished first), every other bit clear. A guest may issue
/// it itself: it finishes the guest's own cells and answers the errno it
/// chose, as a batch of no ops that failed would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEnding {
    /// What the call answers once its cells are finished.
    pub errno: Errno,
    /// The contexts the call's ops named (bit n: context n).
    pub contexts: u16,
}

// Every context's bit fits in the command, and every errno of the ABI in
// its eight bits (`BatchEnding::ERRNO_MASK`).
const _: () = {
    assert!(MAX_CONTEXTS <= 16);
    let mut i = 0;
    while i < Errno::ALL.len() {
        let code = Errno::ALL[i].code();
        assert!(code > 0 && code <= 0xff);
        i += 1;
    }
};

impl BatchEnding {
    /// The bit that marks the command as a batch's ending: the ABI's
    /// commands reserved for continuations.
    pub const FLAG: u32 = cmd::RESERVED_FOR_CONTINUATIONS;
    /// The bits beside the flag that carry the errno and the contexts.
    pub const BITS: u32 = Self::ERRNO_MASK << Self::ERRNO_SHIFT | 0xffff;
    const ERRNO_SHIFT: u32 = 16;
    const ERRNO_MASK: u32 = 0xff;

    /// The continuation's command.
    pub fn command(self) -> u32 {
        // (Every errno of the ABI fits: asserted above.)
        let errno = self.errno.code() as u32 & Self::ERRNO_MASK;
        Self::FLAG | errno << Self::ERRNO_SHIFT | u32::from(self.contexts)
    }

    /// Whether a host continues a call that answered `value` as a batch's
    /// ending (Xen's glue: `pvx_is_batch_ending()`, the same rule): the
    /// flag and no bit outside [`BITS`](Self::BITS). Only for a call that
    /// was a batch or an ending itself.
    pub fn is_ending_command(value: i64) -> bool {
        value > 0 && value as u64 & !u64::from(Self::BITS) == u64::from(Self::FLAG)
    }

    /// `None` for a command that is not a batch's ending; `EINVAL` for one
    /// with the flag and a reserved bit set or an errno the ABI lacks.
    pub fn parse(command: u32) -> Option<Result<Self, Errno>> {
        if command & Self::FLAG == 0 {
            return None;
        }
        let reserved = !(Self::FLAG | Self::BITS);
        let code = (command >> Self::ERRNO_SHIFT) & Self::ERRNO_MASK;
        let errno = Errno::from_code(code as i32).filter(|_| command & reserved == 0);
        Some(errno.map_or(Err(Errno::Inval), |errno| {
            Ok(Self {
                errno,
                contexts: command as u16,
            })
        }))
    }
}

fn check_version(v: u32) -> Result<(), Errno> {
    if version_major(v) == version_major(INTERFACE_VERSION) {
        Ok(())
    } else {
        Err(Errno::Inval)
    }
}

impl<L: RawMutex> Engine<L> {
    /// The hypercall body. Returns 0, a negative errno,
    /// [`BATCH_INCOMPLETE`] when the platform asked to stop (progress is in
    /// the guest's batch header: the call continues with the same command
    /// and argument), or the command of a [`BatchEnding`] (at least
    /// `BatchEnding::FLAG`): the call continues with that command, its
    /// argument unchanged. Xen makes either a continuation; a host without
    /// continuations re-issues the call ([`BATCH_INCOMPLETE`] is the
    /// guest's to see) or enters again with the ending's command (the
    /// simulator: `SimMachine::hypercall`).
    ///
    /// A caller that is neither the control domain nor a device model is
    /// refused here, before any guest copy and before any engine lock.
    pub fn hypercall(&self, h: &mut impl Hypervisor, caller: DomId, command: u32, arg: u64) -> i64 {
        let info = h.domain_info(caller);
        let r = match may_call(info.as_ref()) {
            Err(e) => Err(e),
            Ok(ci) => match command {
                cmd::QUERY_CAPS => self.query_caps(h, caller, ci, arg),
                cmd::BATCH => self.batch(h, caller, ci, arg),
                cmd::RESERVED_REGIONS => {
                    may_read_regions(ci).and_then(|()| self.reserved_regions(h, caller, arg))
                }
                cmd::SET_LIMITS => self.set_limits(h, caller, ci, arg),
                cmd::STATS => self.stats_cmd(h, caller, ci, arg),
                cmd::ENTRY => self.entry_cmd(h, caller, ci, arg),
                c => match BatchEnding::parse(c) {
                    Some(ending) => ending.and_then(|ending| self.batch_ending(h, caller, ending)),
                    None => Err(Errno::OpNotSupp),
                },
            },
        };
        match r {
            Ok(v) => v,
            Err(e) => e.negated() as i64,
        }
    }

    /// The capabilities `caller` (described by `ci`) sees.
    pub fn caps(&self, h: &impl Hypervisor, caller: DomId, ci: &DomainInfo) -> PvIommuCaps {
        let b = h.iommu_caps();
        let contexts = self.max_contexts_for(b.max_contexts, caller);
        let features = (b.features & feature::ALL & !feature::CONTEXTS & !feature::GRANT)
            | if contexts > 1 { feature::CONTEXTS } else { 0 }
            | feature::REVOCATION_QUEUE
            | feature::REVOKED_IN_CONTEXT
            | feature::REVOKED_NUMBERED
            | feature::EXTENTS_2M;
        let (quota, used, revoked) = self.usage(caller);
        PvIommuCaps {
            version: INTERFACE_VERSION,
            max_batch_ops: self.config().max_batch_ops,
            page_sizes: b.page_sizes,
            bfn_window_start: self.window().start,
            bfn_window_end: self.window().end,
            // The host's physical layout is the control domain's business.
            nr_reserved_regions: if ci.control {
                self.window().reserved.len() as u32
            } else {
                0
            },
            features,
            max_contexts: contexts,
            translation: ci.translation,
            quota,
            used,
            revoked,
            _rsvd: 0,
        }
    }

    fn query_caps(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
    ) -> Result<i64, Errno> {
        crate::permission::xsm_allows(h, caller, None, XsmAction::Query)?;
        let caps = self.caps(h, caller, ci);
        h.copy_to_guest(arg, caps.as_bytes())?;
        Ok(0)
    }

    fn reserved_regions(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        arg: u64,
    ) -> Result<i64, Errno> {
        crate::permission::xsm_allows(h, caller, None, XsmAction::Query)?;
        let mut hdr: PvIommuRegions = copy_in(h, arg)?;
        check_version(hdr.version)?;
        // The window is fixed after boot and lives outside the lock.
        let reserved = &self.window().reserved;
        let total = reserved.len() as u32;
        let want = hdr.nr.min(MAX_REGIONS_PER_CALL);
        let mut written = 0u32;
        // The guest's `start` clamped under speculation where it meets the
        // array (it was an iterator's skip: a bounds check and an offset).
        let first = hdr.start as usize;
        for r in (0..want as usize).map_while(|k| get_nospec(reserved, first.saturating_add(k))) {
            let region = PvIommuRegion {
                start_bfn: r.start,
                nr_frames: r.nr,
                kind: r.kind,
                _pad0: 0,
            };
            let addr = (written as u64)
                .checked_mul(core::mem::size_of::<PvIommuRegion>() as u64)
                .and_then(|o| hdr.regions.checked_add(o))
                .ok_or(Errno::Fault)?;
            h.copy_to_guest(addr, region.as_bytes())?;
            written += 1;
        }
        hdr.nr = written;
        hdr.total = total;
        h.copy_to_guest(arg, hdr.as_bytes())?;
        Ok(0)
    }

    /// `SET_LIMITS`: the toolstack (the control domain) sets a driver
    /// domain's quota.
    // Not inlined: the control domain's commands keep their frames out
    // of the batch path's (Xen's stack at a page lookup).
    #[inline(never)]
    fn set_limits(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
    ) -> Result<i64, Errno> {
        may_control(ci)?;
        let req: PvIommuLimits = copy_in(h, arg)?;
        check_version(req.version)?;
        let domid = DomId(req.domid);
        if req._pad0 != 0 || !domid.is_valid() {
            return Err(Errno::Inval);
        }
        let quota = (req.quota != 0).then_some(req.quota);
        self.on_checked_domain(h, caller, domid, |e, h, life| {
            e.set_quota_of_life(h, domid, quota, life)
        })?;
        Ok(0)
    }

    /// The checks of an op on another domain's PV-IOMMU state (`SET_LIMITS`,
    /// `STATS`, `ENTRY`), then `act` on it, as a map checks its target:
    /// `domid`'s life number ([`Engine::life_of`]) is read first, then the
    /// domain must be there and alive (`ESRCH`), and XSM must allow
    /// `control` over it. `act` gets the number and acts only on what is
    /// still of that life; it answers `Again` when the number moved (the
    /// checked domain's teardown ended, and a later domain, whose label no
    /// check saw, may hold the domid), and the op starts again from the
    /// checks (`EAGAIN` after [`CONTROL_RETRIES`]).
    ///
    /// Alive, because the number moves as the domain's PV-IOMMU teardown
    /// ends, which is early in Xen's `domain_kill()`: a dying domain may
    /// be past it, a zombie held in the domain hash for as long as
    /// references keep it there, and its destruction and a new domain's
    /// creation at its domid then move nothing. A domain alive at the
    /// checks has not begun that teardown, so nothing can replace it
    /// without moving the number. (A review found the first form, which
    /// took a dying domain, acting on the next domain at a zombie's domid.)
    fn on_checked_domain<H: Hypervisor, T>(
        &self,
        h: &mut H,
        caller: DomId,
        domid: DomId,
        mut act: impl FnMut(&Self, &mut H, u32) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        for _ in 0..CONTROL_RETRIES {
            let life = self.life_of(domid);
            if h.domain_info(domid).is_none_or(|d| d.dying) {
                return Err(Errno::Srch);
            }
            crate::permission::xsm_allows(h, caller, Some(domid), XsmAction::Control)?;
            match act(self, h, life) {
                Err(Errno::Again) => continue,
                r => return r,
            }
        }
        Err(Errno::Again)
    }

    /// `STATS`: a driver domain's counters and the time breakdown, for the
    /// control domain (they say how busy other domains are).
    // Not inlined: the control domain's commands keep their frames out
    // of the batch path's (Xen's stack at a page lookup).
    #[inline(never)]
    fn stats_cmd(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
    ) -> Result<i64, Errno> {
        may_control(ci)?;
        let req: PvIommuStats = copy_in(h, arg)?;
        check_version(req.version)?;
        let domid = DomId(req.domid);
        let both = stats_flag::TIMING_ON | stats_flag::TIMING_OFF;
        if req.flags & !stats_flag::ALL != 0 || req.flags & both == both || !domid.is_valid() {
            return Err(Errno::Inval);
        }
        // The counters of the domain the checks passed, read (and, for a
        // reset, taken) in its cells of the life number read before them
        // (`on_checked_domain`): a later domain's at the domid are neither
        // read nor reset. Taken cell by cell in the hold that reads them,
        // so a reset takes exactly what it reports; given back if the call
        // then fails.
        let reset = req.flags & stats_flag::RESET != 0;
        let (r, life) = self.on_checked_domain(h, caller, domid, |e, _, life| {
            e.read_of_life(domid, life, (e.stats_of_life(domid, life, reset), life))
        })?;
        let give_back = |e: Errno| {
            if reset {
                self.stats_give_back_of_life(domid, &r.counters, life);
            }
            e
        };
        // The timing and the heap figure are the engine's, host-wide, not
        // `domid`'s: asked of the host itself (FLASK: `control` on
        // `xen_t`), so control over one domain does not carry them. Without
        // it the timing flags are refused and `heap_bytes` reads 0 (nor are
        // all cells locked to sum it).
        let host_wide = crate::permission::xsm_allows(h, caller, None, XsmAction::Control);
        if req.flags & both != 0 {
            host_wide.map_err(give_back)?;
        }
        let heap_bytes = if host_wide.is_ok() {
            self.heap_bytes_host()
        } else {
            0
        };
        let c = r.counters;
        let out = PvIommuStats {
            version: INTERFACE_VERSION,
            domid: domid.0,
            flags: req.flags,
            live: r.live,
            revoked: r.revoked,
            used: r.used,
            quota: r.quota,
            mapped_pages: r.mapped_pages,
            maps: c.maps,
            shared: c.shared,
            unmaps: c.unmaps,
            revocations: c.revocations,
            flushes: c.flushes,
            batches: c.batches,
            ns_batches: c.ns_batches,
            ns_get_page: c.ns_get_page,
            ns_put_page: c.ns_put_page,
            ns_iommu_map: c.ns_iommu_map,
            ns_iommu_unmap: c.ns_iommu_unmap,
            ns_iommu_flush: c.ns_iommu_flush,
            heap_bytes,
        };
        // A reset keeps only what the caller has: a failed copy-out, or
        // one Xen dropped (it does not read back), gives the counts back.
        h.copy_to_guest(arg, out.as_bytes())
            .and_then(|()| {
                if reset {
                    reads_back(h, arg, &out)
                } else {
                    Ok(())
                }
            })
            .map_err(give_back)?;
        if req.flags & stats_flag::TIMING_ON != 0 {
            self.set_timing(true);
        }
        if req.flags & stats_flag::TIMING_OFF != 0 {
            self.set_timing(false);
        }
        Ok(0)
    }

    /// `ENTRY`: a leaf entry of one of a driver domain's own contexts,
    /// address field zeroed (control domain only: it shows another
    /// domain's device mappings).
    // Not inlined: the control domain's commands keep their frames out
    // of the batch path's (Xen's stack at a page lookup).
    #[inline(never)]
    fn entry_cmd(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
    ) -> Result<i64, Errno> {
        may_control(ci)?;
        let req: PvIommuEntry = copy_in(h, arg)?;
        check_version(req.version)?;
        let domid = DomId(req.domid);
        if req._pad0 != 0
            || req.level != 0
            || req.format != 0
            || req.bits != 0
            || !domid.is_valid()
            || req.context == 0
        {
            return Err(Errno::Inval);
        }
        // The entry of the domain the checks passed (`on_checked_domain`).
        let leaf = self.on_checked_domain(h, caller, domid, |e, h, life| {
            let leaf = e.entry_bits(h, domid, ContextId(req.context), crate::Bfn(req.bfn));
            e.read_of_life(domid, life, leaf)?
        })?;
        let out = PvIommuEntry {
            version: INTERFACE_VERSION,
            level: u16::try_from(leaf.level).unwrap_or(u16::MAX),
            format: leaf.format,
            bits: leaf.bits,
            ..req
        };
        h.copy_to_guest(arg, out.as_bytes())?;
        Ok(0)
    }

    fn batch(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
    ) -> Result<i64, Errno> {
        let t0 = self.clock(h);
        // The contexts the batch's ops named (bit n: context n).
        let mut touched = 0u32;
        let r = self.batch_timed(h, caller, ci, arg, &mut touched);
        // One flush for the whole call (or the part of it done), then the
        // page references of unmapped pages go: at its end, whatever that
        // end is. An entry that stops for preemption leaves its entries to
        // write and clear to the call's last entry, where runs cut at the
        // preemption point join again (on Xen an aligned 2 MiB stays one
        // superpage entry, mapped or cleared, rather than split by a flush
        // of half of it). The cells they wait in are finished by that
        // entry whichever contexts it names, and by any later batch of the
        // caller's should the call never come back (`finish_contexts`).
        // What the caller's cells hold for it stays under
        // `PREEMPT_RELEASE_LIMIT` at each preemption point all the same
        // (`pause_contexts`): the caller can keep one call going for ever,
        // and the flushes that end it are not preemptible.
        // The flushes that end the call let go of at most `RELEASE_BUDGET`
        // pages over the caller's cells (failed flushes can have left the
        // quota waiting in each): what is left continues the call, as a
        // preemption does, with every op done. Its next entry runs no op
        // and finishes the cells again (they say they are unfinished),
        // until they are done.
        // A call that ended in an error continues as a `BatchEnding`,
        // which carries the error to the entry that answers it.
        let ran = r.is_ok();
        let mut r = r;
        if r == Ok(BATCH_INCOMPLETE) {
            self.pause_contexts(h, caller);
        } else if self.finish_contexts(h, caller, touched) {
            r = match r {
                Ok(_) => Ok(BATCH_INCOMPLETE),
                Err(errno) => Ok(i64::from(
                    BatchEnding {
                        errno,
                        contexts: touched as u16,
                    }
                    .command(),
                )),
            };
        }
        if ran {
            // Counted in the first context it named (its cell was just
            // used), not always the home cell, which another vCPU working
            // in context 0 may hold.
            let context = ContextId(touched.trailing_zeros().min(MAX_CONTEXTS - 1));
            self.note_batch(caller, context, self.since(h, t0));
        }
        r
    }

    /// An entry of a batch call that ended in an error (`BatchEnding`):
    /// no op runs; the caller's cells are finished, named ones first, for
    /// an entry's share, and the call continues until they are, then
    /// answers the error. (As in a call that ends well, every cell that
    /// waits is finished before the answer, not only those of the call's
    /// own ops: another vCPU of the caller can keep it going, bounded per
    /// entry, on its own vCPU.)
    ///
    /// No XSM check: it acts on the caller's own cells only, which any
    /// batch call's end does whatever XSM answered for its ops (`batch`
    /// finishes them after a refused `batch_timed` too), and a caller that
    /// may not call at all was refused before (`may_call`).
    fn batch_ending(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ending: BatchEnding,
    ) -> Result<i64, Errno> {
        if self.finish_contexts(h, caller, u32::from(ending.contexts)) {
            Ok(i64::from(ending.command()))
        } else {
            Err(ending.errno)
        }
    }

    fn batch_timed(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        ci: &DomainInfo,
        arg: u64,
        touched: &mut u32,
    ) -> Result<i64, Errno> {
        crate::permission::xsm_allows(h, caller, None, XsmAction::Manage)?;
        let mut hdr: PvIommuBatch = copy_in(h, arg)?;
        check_version(hdr.version)?;
        if hdr.flags != 0 || hdr.nr_done > hdr.nr_ops {
            return Err(Errno::Inval);
        }
        if hdr.nr_ops > self.config().max_batch_ops {
            return Err(Errno::TooBig);
        }
        if hdr.ops.checked_add(hdr.nr_ops as u64 * OP_SIZE).is_none() {
            return Err(Errno::Fault);
        }
        // The header's `nr_done` is the only record of what this entry
        // does: it must be writable before any op acts, or a header in
        // memory the caller cannot write (read-only, unmapped after the
        // read) would have its ops run and never reported (the caller,
        // told `EFAULT`, would take them as not run: maps leaked, unmaps
        // believed undone). Written as read, and the entry's end writes
        // the same 4 bytes and no others; only the caller changing its
        // own memory during the call can still lose it (design/abi.md).
        write_nr_done(h, arg, &hdr)?;
        let first = hdr.nr_done;
        // The caller, with what the policy refused in this entry (not asked
        // about again in it).
        let me = Caller::new(caller, ci);
        let mut result = Ok(0);
        // Whether the op before `nr_done` was `run_op`'s: ops that are no
        // run's tend to come together, so the next op is copied in alone
        // first (as each op was before the window), and a window is copied
        // in only when it may start a run.
        let mut after_op = false;
        // The op `run_op` runs (one place for it in this frame, which is
        // under `run_op`'s deepest calls).
        let mut op = UNUSED_OP;
        while hdr.nr_done < hdr.nr_ops {
            let mut asked = false;
            let mut single = false;
            if after_op {
                if hdr.nr_done > first && h.should_preempt() {
                    result = Ok(BATCH_INCOMPLETE);
                    break;
                }
                asked = true;
                let addr = hdr.ops + hdr.nr_done as u64 * OP_SIZE;
                if let Err(e) = h.copy_from_guest(addr, op.as_mut_bytes()) {
                    result = Err(e);
                    break;
                }
                // Else copied in again, with the ops after it, for its run.
                single = !may_start_run(&op);
                if single {
                    // Only the cells of the contexts named are flushed at
                    // the end.
                    *touched |= 1u32.checked_shl(op.context).unwrap_or(0);
                }
            }
            // Else the runs from `nr_done` on, up to an op that is not a
            // run's.
            if !single {
                match self.run_window(h, &me, &mut hdr, first, asked, touched) {
                    Ok(Next::Op(next)) => op = next,
                    Ok(Next::End) => break,
                    Ok(Next::Preempted) => {
                        result = Ok(BATCH_INCOMPLETE);
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let addr = hdr.ops + hdr.nr_done as u64 * OP_SIZE;
            match self.run_op(h, &me, addr, op) {
                Ok(OpDone::Yes) => hdr.nr_done += 1,
                // Work left in the op itself (a destroy whose tables go a
                // budget at a time): the call continues with it, as a
                // preempted one does.
                Ok(OpDone::NotYet) => {
                    result = Ok(BATCH_INCOMPLETE);
                    break;
                }
                Err((acted, e)) => {
                    // (An op that acted counts as done even when its final
                    // status could not be written: reissued, it would be
                    // run again and answer for a state it made itself.)
                    hdr.nr_done += u32::from(acted);
                    result = Err(e);
                    break;
                }
            }
            after_op = true;
        }
        // (The flush is the caller's, `batch`: a run of maps or unmaps is
        // all of its first op's context, named in `touched`.) Only
        // `nr_done` goes back, to the bytes written before the ops: the
        // other fields are the caller's (a header across a page boundary
        // whose other page cannot be written would otherwise fail here,
        // after the ops, with nothing reported).
        write_nr_done(h, arg, &hdr)?;
        // Read back when it moved: a header whose writes Xen drops keeps
        // the `nr_done` it was sent with, and a continuation
        // (`BATCH_INCOMPLETE`) would run this entry's ops again, each over
        // the status of what it did, for as long as the host preempts it.
        // Answered as a header that cannot be written: `EFAULT`, ops acted
        // (design/abi.md). The write before the ops cannot tell (it writes
        // what was read).
        if hdr.nr_done != first {
            reads_back(h, nr_done_at(arg), &hdr.nr_done)?;
        }
        result
    }

    /// The batch loop's runs from `hdr.nr_done` on: each run (maps,
    /// unmaps, acknowledgements, one context's notices) of the ops copied
    /// in a window at a time (one guest copy for up to [`MAP_CHUNK`] ops),
    /// `nr_done` moved past it, until an op that is not a run's: handed
    /// back (`Next::Op`, copied in, its context named in `touched`) for
    /// `run_op`, with `nr_done` at it. The platform is asked whether to
    /// stop before each run once an op is done in this entry (`first`:
    /// `nr_done` at the entry), as before each op the batch loop runs
    /// (`asked`: it was asked already at `nr_done`, by the batch loop).
    /// `Err` when the op at `nr_done` cannot be copied in, or a run failed
    /// (`nr_done` moved past the ops it did).
    // Not inlined: the window is out of the batch loop's frame, which is
    // under `run_op`'s deepest calls (a context's destroy).
    #[inline(never)]
    fn run_window(
        &self,
        h: &mut impl Hypervisor,
        me: &Caller<'_>,
        hdr: &mut PvIommuBatch,
        first: u32,
        asked: bool,
        touched: &mut u32,
    ) -> Result<Next, Errno> {
        let caller = me.id;
        let mut ops = [UNUSED_OP; MAP_CHUNK];
        let mut win = Window::over(&mut ops);
        // Whether to ask before the next run: once an op is done in this
        // entry, and not at the `nr_done` the batch loop asked at (after a
        // run, an op is done).
        let mut ask = hdr.nr_done > first && !asked;
        while hdr.nr_done < hdr.nr_ops {
            if ask && h.should_preempt() {
                return Ok(Next::Preempted);
            }
            ask = true;
            // The op at `nr_done` is in the window, or the window is copied
            // in from it (also when a run starting there might go on past
            // the window's end).
            let k = match win.place(hdr.nr_done) {
                Some(k) if !win.cuts_run(k, hdr.nr_ops) => k,
                _ => {
                    win.fill(h, hdr, hdr.nr_done)?;
                    0
                }
            };
            let len = win.len;
            let Some(ops) = win.ops.get_mut(k..len) else {
                // Unreachable: the op at `nr_done` was copied in above.
                return Err(Errno::Inval);
            };
            let Some(&op) = ops.first() else {
                // Unreachable, as above.
                return Err(Errno::Inval);
            };
            // Only the cells of the contexts named are flushed at the end.
            *touched |= 1u32.checked_shl(op.context).unwrap_or(0);
            // A run parses its first op and answers `None` if it is not of
            // its form (then `run_op` runs it, and answers any error the
            // op's form has): the kinds' parsed ops stay out of this frame
            // (they grew the batch loop's in the Xen object by 150 bytes, on
            // the way to a guest copy).
            let hdr_now: &PvIommuBatch = hdr;
            let run = match op.subop {
                subop::MAP => self.run_maps(h, me, hdr_now, ops),
                subop::UNMAP => self.run_unmaps(h, caller, hdr_now, ops),
                subop::REVOKED_ACK => self.run_acks(h, caller, hdr_now, ops),
                subop::REVOKED_NEXT => self.run_notices(h, caller, hdr_now, ops),
                _ => None,
            };
            match run {
                // Unreachable (a run does at least its first op, or fails);
                // never loop on it.
                Some(Ok(0)) => return Err(Errno::Inval),
                Some(Ok(k)) => hdr.nr_done += k,
                Some(Err((k, e))) => {
                    hdr.nr_done += k;
                    return Err(e);
                }
                None => return Ok(Next::Op(op)),
            }
        }
        Ok(Next::End)
    }

    /// Run the map ops starting at `hdr.nr_done`: `ops`, copied in (the
    /// batch loop's window from there), the first and up to [`MAP_CHUNK`] -
    /// 1 more, stopping at the first op that is not a well-formed map of
    /// the first one's context, and where [`Engine::map_batch`] ends its
    /// run; and write their results back in order (from `ops`, where they
    /// are written). `None` if the first op is not a well-formed map (not
    /// run: the batch loop's `run_op` answers it). Returns how many were
    /// done. If a result cannot be written back, that op and the ones after
    /// it in the run are undone and `Err((done before it, error))` is
    /// returned.
    // Not inlined: the run buffers of the two never share a stack frame.
    #[inline(never)]
    fn run_maps(
        &self,
        h: &mut impl Hypervisor,
        caller: &Caller<'_>,
        hdr: &PvIommuBatch,
        ops: &mut [PvIommuOp],
    ) -> Option<RunResult> {
        let head_op = ops.first()?;
        let head = Request::parse_map(head_op)?;
        // Filler for the unused tail (never passed to the engine).
        const UNUSED: MapRequest = MapRequest {
            context: ContextId::DEFAULT,
            // A reserved domid: refused by every check, were it ever run.
            domid: DomId(DomId::FIRST_RESERVED),
            gfn: pviommu_abi::Gfn(0),
            perms: pviommu_abi::Permissions::RO,
            attr: pviommu_abi::MemAttr::WriteBack,
            grant: false,
        };
        // Filled, not zeroed (see `Window`): only the run's requests are
        // read.
        let mut reqs = [UNUSED; MAP_CHUNK];
        // A run is of one context (the engine locks that context's cell).
        // An op that differs from the first only in its gfn (and status)
        // is the first's request with its gfn: not parsed field by field.
        // (Each op parsed once, into its place, as `parse_run` does: a loop
        // of its own, where `parse_run` took the head by value, copied
        // twice through this frame.)
        let head_key = map_op_key(head_op);
        let mut n = 0;
        for (k, (op, slot)) in ops.iter().zip(reqs.iter_mut()).enumerate() {
            let req = if k == 0 {
                head
            } else if maps_as(op, head_key) {
                MapRequest {
                    gfn: pviommu_abi::Gfn(op.gfn),
                    ..head
                }
            } else {
                match Request::parse_map(op).filter(|m| m.context == head.context) {
                    Some(m) => m,
                    None => break,
                }
            };
            *slot = req;
            n = k + 1;
        }
        let mut results = [Err(Errno::Inval); MAP_CHUNK];
        let run = reqs.get(..n).unwrap_or(&[]);
        let done = self.map_batch_in(h, caller, run, &mut results);
        if done == 0 {
            // Unreachable (a run's first op is never a repeat); never loop
            // on it.
            return Some(Err((0, Errno::Inval)));
        }
        // (A run that ended early goes on at the next op, a map not yet
        // run, from the window.) The ops and results cut to the ops done
        // first: the loop then keeps one count, where zipped and taken it
        // kept three (about 4 instructions an op).
        let done_ops = done.min(ops.len()).min(results.len());
        let (Some(written), Some(results_done)) =
            (ops.get_mut(..done_ops), results.get(..done_ops))
        else {
            // (Unreachable: `done_ops` is within each.)
            return Some(Err((0, Errno::Inval)));
        };
        for (op, result) in written.iter_mut().zip(results_done) {
            match result {
                Ok(m) => {
                    op.bfn = m.bfn.0;
                    op.status = 0;
                }
                Err(e) => op.status = e.negated(),
            }
        }
        let addr = hdr.ops + hdr.nr_done as u64 * OP_SIZE;
        if let Err((k, e)) = write_back(h, addr, ops.get(..done).unwrap_or(&[])) {
            // Undo what cannot be reported: this op and the rest.
            let undo = reqs.iter().zip(results.iter()).take(done).skip(k);
            for (req, result) in undo {
                if let Ok(m) = result {
                    self.unmap_undo(h, caller.id, req.context, *m);
                }
            }
            return Some(Err((k as u32, e)));
        }
        Some(Ok(done as u32))
    }

    /// Run the unmap ops starting at `hdr.nr_done` (`ops`, the batch
    /// loop's window from there: the first and up to [`MAP_CHUNK`] - 1 more
    /// of its context) as [`run_checked`] runs a run: a revoked BFN is
    /// acknowledged and reported `ESTALE`. `None` if the first op is not a
    /// well-formed unmap of a page.
    // Not inlined: the run buffers of the runs never share a stack frame.
    #[inline(never)]
    fn run_unmaps(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        hdr: &PvIommuBatch,
        ops: &mut [PvIommuOp],
    ) -> Option<RunResult> {
        let head = Request::parse_unmap(ops.first()?)?;
        let context = head.0;
        Some(run_checked(
            h,
            hdr,
            ops,
            head,
            |op| Request::parse_unmap(op).filter(|&(c, _)| c == context),
            |h, reqs, act, out| {
                if act {
                    let mut acts = [Ok(()); MAP_CHUNK];
                    let n = self.unmap_batch(h, caller, reqs, &mut acts);
                    for (o, r) in out.iter_mut().zip(acts.iter()).take(n) {
                        *o = (status_of(r), r.is_ok());
                    }
                    return n;
                }
                let mut checks = [Err(Errno::NoEnt); MAP_CHUNK];
                let n = self.unmap_check_batch(caller, reqs, &mut checks);
                for (o, check) in out.iter_mut().zip(checks.iter()).take(n) {
                    *o = match check {
                        Ok(false) => (0, true),
                        Ok(true) => (Errno::Stale.negated(), true),
                        Err(e) => (e.negated(), false),
                    };
                }
                n
            },
        ))
    }

    /// Run the `revoked_ack` ops starting at `hdr.nr_done` (`ops`, the
    /// batch loop's window from there: the first and up to [`MAP_CHUNK`] -
    /// 1 more of its context) as [`run_checked`] runs a run: one lock of
    /// the context's cell for the checks, one for the acknowledgements.
    /// `None` if the first op is not a well-formed acknowledgement.
    #[inline(never)]
    fn run_acks(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        hdr: &PvIommuBatch,
        ops: &mut [PvIommuOp],
    ) -> Option<RunResult> {
        let (context, bfn, number) = Request::parse_revoked_ack(ops.first()?)?;
        Some(run_checked(
            h,
            hdr,
            ops,
            (bfn, number),
            |op| {
                Request::parse_revoked_ack(op)
                    .filter(|&(c, _, _)| c == context)
                    .map(|(_, bfn, number)| (bfn, number))
            },
            |_, acks, act, out| {
                let mut results = [Ok(()); MAP_CHUNK];
                let n = self.revoked_ack_batch(caller, context, acks, act, &mut results);
                for (o, r) in out.iter_mut().zip(results.iter()).take(n) {
                    *o = (status_of(r), r.is_ok());
                }
                n
            },
        ))
    }

    /// Run the `revoked_next` ops of one context (`IN_CONTEXT`) starting at
    /// `hdr.nr_done` (`ops`, the batch loop's window from there: the first
    /// and up to [`MAP_CHUNK`] - 1 more of its context) under one lock of
    /// the context's cell, and write them back with one copy. They change
    /// nothing, so an op whose answer cannot be written is simply not done:
    /// `Err((done before it, error))`. `None` if the first op is not a
    /// well-formed `revoked_next` of one context (the global form is
    /// `run_op`'s).
    #[inline(never)]
    fn run_notices(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        hdr: &PvIommuBatch,
        ops: &mut [PvIommuOp],
    ) -> Option<RunResult> {
        let (context, skip, numbered) = Request::parse_revoked_in(ops.first()?)?;
        let mut asks = [(0u32, false); MAP_CHUNK];
        let n = parse_run(ops, (skip, numbered), &mut asks, |op| {
            Request::parse_revoked_in(op)
                .filter(|&(c, _, _)| c == context)
                .map(|(_, skip, numbered)| (skip, numbered))
        });
        let mut skips = [0u32; MAP_CHUNK];
        for (s, &(skip, _)) in skips.iter_mut().zip(asks.iter()).take(n) {
            *s = skip;
        }
        let mut found = [Err(Errno::NoEnt); MAP_CHUNK];
        let done =
            self.revoked_in_batch(caller, context, skips.get(..n).unwrap_or(&[]), &mut found);
        if done == 0 {
            // Unreachable (a run answers at least its first op); never loop
            // on it.
            return Some(Err((0, Errno::Inval)));
        }
        for ((op, f), &(_, numbered)) in
            ops.iter_mut().zip(found.iter()).zip(asks.iter()).take(done)
        {
            op.status = match f {
                Ok(notice) => {
                    write_notice(op, *notice, numbered);
                    0
                }
                Err(e) => e.negated(),
            };
        }
        let addr = hdr.ops + hdr.nr_done as u64 * OP_SIZE;
        if let Err((k, e)) = write_back(h, addr, ops.get(..done).unwrap_or(&[])) {
            return Some(Err((k as u32, e)));
        }
        Some(Ok(done as u32))
    }

    /// Run `op`, copied in from guest address `addr`, and write its status
    /// back. `Err` only when the guest's op array itself is inaccessible:
    /// then the op has no effect, except when it says it acted (`true`: a
    /// destroy or detach whose act changed state, and whose changed status
    /// could not be written). `Ok(NotYet)`: the op did part of its work
    /// and runs again in the call's next entry (its status, written as
    /// checked, is written again then). No engine lock is held across the
    /// guest copies.
    fn run_op(
        &self,
        h: &mut impl Hypervisor,
        me: &Caller<'_>,
        addr: u64,
        mut op: PvIommuOp,
    ) -> Result<OpDone, (bool, Errno)> {
        let (caller, ci) = (me.id, me.info);
        let request = Request::parse(&op);
        // An extent map's result, for its undo.
        let mut extent = None;
        let outcome = match request {
            Err(e) => Err(e),
            // The batch loop hands every map, unmap, acknowledgement and
            // `IN_CONTEXT` notice to its run (a run of one at the least):
            // never here.
            Ok(
                Request::Map(_)
                | Request::Unmap { .. }
                | Request::RevokedAck { .. }
                | Request::RevokedNextIn { .. },
            ) => Err(Errno::Inval),
            Ok(Request::Lookup { context, bfn }) => self.lookup(caller, context, bfn).map(|m| {
                op.domid = m.domid.0;
                op.gfn = m.gfn.0;
                op.flags =
                    m.perms.flag_bits() | (m.attr.field() << pviommu_abi::op_flags::ATTR_SHIFT);
            }),
            Ok(Request::RevokedNext { numbered }) => self
                .revoked_next(caller)
                .map(|found| write_notice(&mut op, found, numbered)),
            // Undone if its result cannot be written (as a run's maps).
            Ok(Request::MapExtent(req)) => self.map_extent_in(h, me, &req).map(|m| {
                op.bfn = m.mapped.bfn.0;
                extent = Some(m);
            }),
            Ok(Request::UnmapExtent { context, bfn }) => {
                stale_if_revoked(self.unmap_extent_check(caller, context, bfn))
            }
            // Destructive ops: validate, report the outcome, then act, so a
            // status that cannot be written leaves the state unchanged.
            Ok(Request::ContextDestroy { context }) => self.context_destroy_check(caller, context),
            // Unusable (its ops answer `ENOENT`) until its id is written,
            // so that an undo always succeeds.
            Ok(Request::ContextCreate) => may_use_contexts(ci, || h.owns_devices(caller))
                .and_then(|()| self.context_create_unreported(h, caller))
                .map(|c| op.context = c.0),
            // Undone (detached) if its status cannot be written.
            Ok(Request::ContextAttach { context, device }) => {
                may_use_contexts(ci, || h.owns_devices(caller))
                    .and_then(|()| self.context_attach_in(h, caller, context, device, &me.refusals))
                    .map_err(|e| device_refusal(ci, e))
            }
            Ok(Request::ContextDetach { context, device }) => {
                self.context_detach_check(caller, context, device)
            }
        };
        op.status = match outcome {
            Ok(()) => 0,
            Err(e) => e.negated(),
        };
        if let Err(e) = h.copy_to_guest(addr, op.as_bytes()) {
            // Undo what could not be reported. An undo that fails leaves the
            // op acted on: counted as done, as a destroy or detach that
            // acted (reissued, it would answer `EBUSY` for a context or an
            // attach the caller made itself, and a created context would
            // hold a cell under an id nobody was told).
            let undone = match (request, outcome) {
                (Ok(Request::ContextCreate), Ok(())) => {
                    let id = ContextId(op.context);
                    let undone = self.context_create_undo(h, caller, id).is_ok();
                    if !undone {
                        // Kept (the host's IOMMU refused the undo's flush):
                        // the caller's to find (`stats`) and destroy, as any
                        // context it made, not hidden for good (review).
                        self.context_reported(caller, id);
                    }
                    undone
                }
                (Ok(Request::ContextAttach { context, device }), Ok(())) => {
                    self.context_detach(h, caller, context, device).is_ok()
                }
                (Ok(Request::MapExtent(req)), Ok(())) => {
                    if let Some(done) = extent {
                        self.map_extent_undo(h, caller, &req, done);
                    }
                    true
                }
                _ => true,
            };
            return Err((!undone, e));
        }
        let acted = match (request, outcome) {
            (Ok(Request::ContextCreate), Ok(())) => {
                self.context_reported(caller, ContextId(op.context));
                None
            }
            (Ok(Request::ContextDestroy { context }), Ok(())) => {
                match self.context_destroy_some(h, caller, context) {
                    // Tables freed, more left: the same op again, next entry.
                    Err(Errno::Again) => return Ok(OpDone::NotYet),
                    r => Some(r),
                }
            }
            (Ok(Request::ContextDetach { context, device }), Ok(())) => {
                Some(self.context_detach(h, caller, context, device))
            }
            // Reported as checked: `ESTALE` (some BFNs revoked) or 0.
            (Ok(Request::UnmapExtent { context, bfn }), Ok(()) | Err(Errno::Stale)) => {
                Some(stale_if_revoked(self.unmap_extent(h, caller, context, bfn)))
            }
            _ => None,
        };
        // Checked above, but another CPU (a revocation) may have changed the
        // state since: report what happened.
        if let Some(r) = acted {
            let status = match r {
                Ok(()) => 0,
                Err(e) => e.negated(),
            };
            if status != op.status {
                op.status = status;
                // Nothing there (ENOENT) or kept as it was (EBUSY): the act
                // changed nothing; anything else did. (An extent's unmap
                // refused changed nothing: it checks all before any.)
                let changed = match request {
                    Ok(Request::UnmapExtent { .. }) => matches!(r, Ok(()) | Err(Errno::Stale)),
                    _ => !matches!(r, Err(Errno::NoEnt | Errno::Busy)),
                };
                h.copy_to_guest(addr, op.as_bytes())
                    .map_err(|e| (changed, e))?;
            }
        }
        Ok(OpDone::Yes)
    }
}

/// Whether [`Engine::run_op`] finished its op.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpDone {
    /// Done: `nr_done` moves past it.
    Yes,
    /// Part of its work done, the rest in the call's next entry (a destroy
    /// whose emptied tables go a budget at a time).
    NotYet,
}

/// Where [`Engine::run_window`] stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Next {
    /// The op at `nr_done` (copied in) is not a run's: `run_op`'s.
    Op(PvIommuOp),
    /// Every op of the batch is done.
    End,
    /// The platform asked to stop (`BATCH_INCOMPLETE`).
    Preempted,
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::platform::Platform;
    use crate::sim::{Format, SimMachine};

    /// `maps_as`: an op that passes it against a head that parses as a
    /// map parses as that head's request with the op's gfn; and the parse
    /// of a run's op `run_maps` makes (the compare first, then the parse)
    /// is the parse alone, filtered to the head's context, for ops near a
    /// head in every field (each changed alone or a few at once).
    #[test]
    fn maps_as_parses_as_the_head() {
        let mut s = 0x5eed_u64;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let flag_values = [
            op_flags::READ,
            op_flags::WRITE,
            op_flags::READ | op_flags::WRITE,
            op_flags::READ | op_flags::GRANT,
            op_flags::WRITE | 1 << op_flags::ATTR_SHIFT,
            op_flags::READ | 2 << op_flags::ATTR_SHIFT,
            op_flags::READ | 3 << op_flags::ATTR_SHIFT,
            op_flags::READ | op_flags::EXTENT_2M,
            0,
            u16::MAX,
        ];
        let mut checked = 0;
        for _ in 0..200_000 {
            let head = PvIommuOp {
                subop: subop::MAP,
                flags: flag_values[(r() % 7) as usize],
                status: r() as i32,
                context: (r() % 3) as u32,
                domid: [0u16, 1, 5, 0x7fef][(r() % 4) as usize],
                _pad0: 0,
                gfn: r(),
                bfn: 0,
                notice: 0,
            };
            let Some(h) = Request::parse_map(&head) else {
                continue;
            };
            let mut op = PvIommuOp {
                gfn: r(),
                status: r() as i32,
                ..head
            };
            for _ in 0..(r() % 3) {
                match r() % 9 {
                    0 => op.subop = [subop::UNMAP, subop::MAP, 0, u16::MAX][(r() % 4) as usize],
                    1 => op.flags = flag_values[(r() % flag_values.len() as u64) as usize],
                    2 => op.flags ^= 1 << (r() % 16),
                    3 => op.context = [0u32, 1, 2, u32::MAX][(r() % 4) as usize],
                    4 => op.domid = [0u16, 1, 5, 0x7fef, 0x7ff0, u16::MAX][(r() % 6) as usize],
                    5 => op._pad0 = (r() % 3) as u16,
                    6 => op.bfn = r() % 3,
                    7 => op.notice = r() % 3,
                    _ => op.gfn = r(),
                }
            }
            let parsed = Request::parse_map(&op);
            if maps_as(&op, map_op_key(&head)) {
                checked += 1;
                assert_eq!(
                    parsed,
                    Some(MapRequest {
                        gfn: pviommu_abi::Gfn(op.gfn),
                        ..h
                    }),
                    "{op:?} {head:?}"
                );
            }
            let run_parse = if maps_as(&op, map_op_key(&head)) {
                Some(MapRequest {
                    gfn: pviommu_abi::Gfn(op.gfn),
                    ..h
                })
            } else {
                parsed.filter(|m| m.context == h.context)
            };
            assert_eq!(
                run_parse,
                parsed.filter(|m| m.context == h.context),
                "{op:?} {head:?}"
            );
        }
        assert!(checked > 10_000, "{checked}");
    }

    /// A window copies up to [`MAP_CHUNK`] ops in; across a fault, op by
    /// op up to it (the ops before it are the window); `Err` only when its
    /// first op faults. It is copied again for a run that starts inside it
    /// when that run might go on past its end.
    #[test]
    fn a_window_stops_before_a_fault_and_is_copied_again_for_a_run() {
        let mut m = SimMachine::new(64, Format::Vtd, 32);
        m.current = DomId::DOM0;
        let end = m.domain_ram_pages(DomId::DOM0).unwrap() * 4096;
        let unmap = |bfn: u64, context: u32| PvIommuOp {
            subop: subop::UNMAP,
            context,
            bfn,
            ..PvIommuOp::default()
        };
        // Five ops before the end of dom0's memory, of a batch of twelve.
        let mut ops: Vec<PvIommuOp> = (0..5).map(|k| unmap(k, 0)).collect();
        let addr = end - 5 * OP_SIZE;
        m.copy_to_guest(addr, ops.as_bytes()).unwrap();
        let hdr = PvIommuBatch {
            nr_ops: 12,
            ops: addr,
            ..PvIommuBatch::default()
        };
        let mut buf = [UNUSED_OP; MAP_CHUNK];
        let mut win = Window::over(&mut buf);
        assert_eq!(win.fill(&mut m, &hdr, 0), Ok(()));
        assert_eq!((win.base, win.len), (0, 5));
        assert_eq!(&win.ops[..5], &ops[..]);
        assert_eq!((win.place(4), win.place(5)), (Some(4), None));
        // Ops 1-4 are unmaps of one context to the window's end, and the
        // batch goes on after it: a run from op 1 might too.
        assert!(win.cuts_run(1, hdr.nr_ops));
        // Not from the window's first op (it has all it can hold), nor
        // where the batch ends with the window.
        assert!(!win.cuts_run(0, hdr.nr_ops));
        assert!(!win.cuts_run(1, 5));
        assert_eq!(win.fill(&mut m, &hdr, 3), Ok(()));
        assert_eq!((win.base, win.len), (3, 2));
        assert_eq!(
            (win.place(2), win.place(3), win.place(4)),
            (None, Some(0), Some(1))
        );
        assert_eq!(win.fill(&mut m, &hdr, 5), Err(Errno::Fault));
        assert_eq!((win.place(5), win.len), (None, 0));
        // An op of another kind or context ends the run inside the window.
        ops[3] = unmap(3, 1);
        m.copy_to_guest(addr, ops.as_bytes()).unwrap();
        assert_eq!(win.fill(&mut m, &hdr, 0), Ok(()));
        assert!(!win.cuts_run(1, hdr.nr_ops));
        assert!(win.cuts_run(4, hdr.nr_ops));
        ops[4].subop = subop::LOOKUP;
        m.copy_to_guest(addr, ops.as_bytes()).unwrap();
        assert_eq!(win.fill(&mut m, &hdr, 0), Ok(()));
        assert!(!win.cuts_run(4, hdr.nr_ops));
    }

    /// A run whose act step acts on fewer ops than passed their check
    /// (no step does so today) stops `nr_done` before the first one left:
    /// before, the run counted every op it reported, the ones never acted
    /// on among them (security review).
    #[test]
    fn a_run_acted_on_short_stops_before_the_first_op_left() {
        let mut m = SimMachine::new(64, Format::Vtd, 32);
        let base = m.scratch_addr(DomId::DOM0).unwrap();
        m.current = DomId::DOM0;
        let mut ops = [PvIommuOp::default(); 3];
        m.copy_to_guest(base, ops.as_bytes()).unwrap();
        let hdr = PvIommuBatch {
            nr_ops: 3,
            ops: base,
            ..PvIommuBatch::default()
        };
        // Ops 0 and 2 pass their check, op 1 fails it; the act step, given
        // ops 0 and 2, acts on op 0 alone.
        let step = |_: &mut SimMachine, reqs: &[()], act: bool, out: &mut [(i32, bool)]| {
            for (k, o) in out.iter_mut().enumerate().take(reqs.len()) {
                *o = (0, k != 1);
            }
            if act {
                1
            } else {
                reqs.len()
            }
        };
        let r = run_checked(&mut m, &hdr, &mut ops, (), |_| Some(()), step);
        assert_eq!(r, Err((2, Errno::Inval)));
    }
}
