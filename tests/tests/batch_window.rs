//! The batch loop's window: the ops at and after `nr_done` come in up to
//! `MAP_CHUNK` (8) at a time, with one guest copy, and the runs are made of
//! them. A fault copying op k is answered when the loop reaches op k, the
//! ops before it done as in a batch that ends before op k; a run is not
//! cut where a window ends; preemption comes between runs as before; and a
//! malformed op answers `EINVAL` without touching the ops around it.

use pviommu_abi::{
    cmd, Bfn, ContextId, DomId, Permissions, PvIommuBatch, PvIommuOp, Request, BATCH_INCOMPLETE,
    INTERFACE_VERSION,
};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::*;
use zerocopy::{FromZeros, IntoBytes};

const RW: Permissions = Permissions::RW;
const OP: u64 = core::mem::size_of::<PvIommuOp>() as u64;

/// A machine whose guest has gfns 0..12 mapped in dom0's default context
/// (their BFNs), as every machine of these tests starts.
fn setup() -> (SimMachine, Engine, Vec<Bfn>) {
    let (mut m, e) = machine(Format::Vtd, 64);
    let mut maps: Vec<PvIommuOp> = (0..12).map(|g| map_op(GUEST, g, RW)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut maps).unwrap();
    assert!(maps.iter().all(|op| op.status == 0));
    let bfns = maps.iter().map(|op| Bfn(op.bfn)).collect();
    (m, e, bfns)
}

fn lookup(bfn: Bfn) -> PvIommuOp {
    Request::Lookup {
        context: ContextId::DEFAULT,
        bfn,
    }
    .encode()
}

/// Runs of each kind cut by a lookup, a malformed map, an unmap of another
/// context, and by the ends of windows wherever a batch starts: 35 ops.
fn mixed(bfns: &[Bfn]) -> Vec<PvIommuOp> {
    let mut ops = vec![lookup(bfns[0])];
    // 1..7: six maps, then a malformed one (7).
    ops.extend((20..26).map(|g| map_op(GUEST, g, RW)));
    let mut bad = map_op(GUEST, 26, RW);
    bad.flags = 0;
    ops.push(bad);
    // 8..18: ten maps (a run of eight and one of two).
    ops.extend((27..37).map(|g| map_op(GUEST, g, RW)));
    // 18..26: eight unmaps (one run, though a window copied from op 16
    // ends in it); 26: one of a context never made; 27..31: four.
    ops.extend(bfns[..8].iter().map(|&b| unmap_op(b)));
    ops.push(unmap_op_in(ContextId(5), bfns[8]));
    ops.extend(bfns[8..12].iter().map(|&b| unmap_op(b)));
    // 31: a lookup of a BFN unmapped before it (ENOENT); 32..35: maps.
    ops.push(lookup(bfns[11]));
    ops.extend((37..40).map(|g| map_op(GUEST, g, RW)));
    ops
}

/// `mixed`'s ops of one run's kind and context, back to back, as [first,
/// end): a run from op k takes the ops from k to the stretch's end, eight
/// at most.
const STRETCHES: [(usize, usize); 9] = [
    (0, 1),
    (1, 7),
    (7, 8),
    (8, 18),
    (18, 26),
    (26, 27),
    (27, 31),
    (31, 32),
    (32, 35),
];

/// How many runs (or ops no run takes) `mixed`'s ops from `start` make.
fn runs_from(start: usize) -> usize {
    let mut n = 0;
    let mut k = start;
    while let Some(&(_, end)) = STRETCHES.iter().find(|&&(f, e)| (f..e).contains(&k)) {
        n += 1;
        k = (k + 8).min(end);
    }
    n
}

/// The statuses `mixed`'s ops answer.
fn mixed_status(k: usize) -> i32 {
    match k {
        7 => Errno::Inval.negated(),
        26 | 31 => Errno::NoEnt.negated(),
        _ => 0,
    }
}

/// `cmd::BATCH` at `base` as dom0, issued again while it answers
/// `BATCH_INCOMPLETE` (a bounded number of times): its last answer, and
/// how many calls.
fn call_to_the_end(m: &mut SimMachine, e: &Engine, base: u64) -> (i64, u32) {
    for calls in 1..=1000 {
        let r = m.hypercall(e, DomId::DOM0, cmd::BATCH, base);
        if r != BATCH_INCOMPLETE {
            return (r, calls);
        }
    }
    panic!("a batch still incomplete after 1000 calls");
}

/// `ops` as a batch of `nr_ops` ops placed so that op `ops.len()` starts at
/// the end of dom0's memory: copying it (and any op after it) faults.
/// Returns the header's address and the ops'.
fn stage_before_the_end(m: &mut SimMachine, ops: &[PvIommuOp], nr_ops: u32) -> (u64, u64) {
    let base = m.scratch_addr(DomId::DOM0).unwrap();
    let end = m.domain_ram_pages(DomId::DOM0).unwrap() * 4096;
    let ops_addr = end - ops.len() as u64 * OP;
    let hdr = PvIommuBatch {
        version: INTERFACE_VERSION,
        nr_ops,
        nr_done: 0,
        flags: 0,
        ops: ops_addr,
    };
    m.current = DomId::DOM0;
    m.copy_to_guest(base, hdr.as_bytes()).unwrap();
    m.copy_to_guest(ops_addr, ops.as_bytes()).unwrap();
    (base, ops_addr)
}

/// A batch whose op `f` cannot be copied in (past the end of the caller's
/// memory), for every `f`: wherever it falls in a window (the window's
/// first op, its middle, its last, a window copied again for a run that
/// may go on past it), the call answers `EFAULT` with `nr_done` at `f`,
/// and ops 0..f answered and acted on exactly as a batch of those ops
/// alone is, in another machine: the same statuses and results, the same
/// state. With and without preemption between runs.
#[test]
fn a_fault_copying_an_op_is_answered_at_that_op() {
    for budget in [None, Some(0), Some(1), Some(3)] {
        let (_, _, bfns) = setup();
        let all = mixed(&bfns);
        for f in 0..all.len() {
            let ops = &all[..f];
            // The batch of ops 0..f alone.
            let (mut b, eb, bfns_b) = setup();
            assert_eq!(bfns_b, bfns);
            let mut want = ops.to_vec();
            b.preempt_budget = budget;
            if !want.is_empty() {
                b.guest_batch_all(&eb, DomId::DOM0, &mut want).unwrap();
            }
            b.preempt_budget = None;
            // The batch of all, whose op f faults.
            let (mut a, ea, _) = setup();
            let (base, ops_addr) = stage_before_the_end(&mut a, ops, all.len() as u32);
            a.preempt_budget = budget;
            let (r, _) = call_to_the_end(&mut a, &ea, base);
            a.preempt_budget = None;
            assert_eq!(r, Errno::Fault.negated() as i64, "f {f}, budget {budget:?}");
            let mut hdr = PvIommuBatch::new_zeroed();
            a.copy_from_guest(base, hdr.as_mut_bytes()).unwrap();
            assert_eq!(hdr.nr_done, f as u32, "f {f}, budget {budget:?}");
            let mut got = vec![PvIommuOp::default(); f];
            a.copy_from_guest(ops_addr, got.as_mut_bytes()).unwrap();
            assert_eq!(got, want, "f {f}, budget {budget:?}");
            assert_eq!(
                observable(&a, &ea),
                observable(&b, &eb),
                "f {f}, budget {budget:?}"
            );
            check_invariants(&mut a, &ea).unwrap();
            check_invariants(&mut b, &eb).unwrap();
        }
    }
}

/// With the platform asking to stop after every run, each call does one
/// run (or one op that is no run's): the calls count the runs. A run is
/// cut by the ops of the batch (another kind, another context, a malformed
/// op, its chunk of eight), never where a window of copied ops ends.
#[test]
fn runs_end_where_the_ops_say() {
    let (mut m, e, bfns) = setup();
    let mut ops = mixed(&bfns);
    m.preempt_budget = Some(0);
    let calls = m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    // Lookup; 6 maps; the malformed map; 8 maps; 2 maps; 8 unmaps; the
    // unmap of context 5; 4 unmaps; the lookup; 3 maps.
    assert_eq!(calls, 10);
    assert_eq!(runs_from(0), 10);
    for (k, op) in ops.iter().enumerate() {
        assert_eq!(op.status, mixed_status(k), "op {k}");
    }
    check_invariants(&mut m, &e).unwrap();
}

/// The same within one call, from any op (a continuation's `nr_done`):
/// the platform is asked whether to stop once before each run after the
/// first, so the questions count the runs. The windows start wherever the
/// call does, and a run that starts inside one and goes on past its end
/// (the eight unmaps from op 18, after the maps 16-17 of the window from
/// op 16) is still one run.
#[test]
fn runs_within_one_call_are_not_cut_by_windows() {
    const BUDGET: u32 = 1000;
    for start in 0..35 {
        let (mut m, e, bfns) = setup();
        let mut ops = mixed(&bfns);
        m.preempt_budget = Some(BUDGET);
        let (ret, done) = m
            .guest_batch(&e, DomId::DOM0, &mut ops, start as u32)
            .unwrap();
        assert_eq!((ret, done), (0, 35), "start {start}");
        let asked = BUDGET - m.preempt_budget.unwrap();
        assert_eq!(asked as usize, runs_from(start) - 1, "start {start}");
        for (k, op) in ops.iter().enumerate().skip(start) {
            // (Op 31 looks up the BFN op 30 unmaps: mapped still if the
            // call starts after op 30.)
            let want = if k == 31 && start > 30 {
                0
            } else {
                mixed_status(k)
            };
            assert_eq!(op.status, want, "start {start}, op {k}");
        }
        m.preempt_budget = None;
        check_invariants(&mut m, &e).unwrap();
    }
}

/// Every op done once, whatever the budget: the same statuses, results
/// and state as without preemption, and the call made of as many entries
/// as the budget allows.
#[test]
fn preemption_between_windows_and_runs_does_each_op_once() {
    let (mut m, e, bfns) = setup();
    let mut want = mixed(&bfns);
    m.guest_batch_all(&e, DomId::DOM0, &mut want).unwrap();
    let state = observable(&m, &e);
    for budget in 0..12 {
        let (mut m, e, _) = setup();
        let mut ops = mixed(&bfns);
        m.preempt_budget = Some(budget);
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        m.preempt_budget = None;
        assert_eq!(ops, want, "budget {budget}");
        assert_eq!(observable(&m, &e), state, "budget {budget}");
        check_invariants(&mut m, &e).unwrap();
    }
}

/// A long batch of maps, then one of their unmaps, each of runs of eight
/// filling whole windows; the unmaps again answer `ENOENT` each (none was
/// done twice, none skipped).
#[test]
fn whole_windows_of_maps_and_unmaps() {
    let (mut m, e) = machine(Format::Vtd, 128);
    for budget in [None, Some(2), Some(7)] {
        let mut ops: Vec<PvIommuOp> = (0..100).map(|g| map_op(GUEST, g, RW)).collect();
        m.preempt_budget = budget;
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|op| op.status == 0), "budget {budget:?}");
        let mut unmaps: Vec<PvIommuOp> = ops.iter().map(|op| unmap_op(Bfn(op.bfn))).collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
        assert!(unmaps.iter().all(|op| op.status == 0), "budget {budget:?}");
        m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
        assert!(
            unmaps.iter().all(|op| op.status == Errno::NoEnt.negated()),
            "budget {budget:?}"
        );
        m.preempt_budget = None;
        check_invariants(&mut m, &e).unwrap();
    }
}

/// The batch loop copies an op after one `run_op` ran alone (the probe),
/// then again with a window when it may start a run; a window may be
/// copied again from a run's first op. The guest rewrites op 1 before
/// each of those copies in turn (into an unmap in an engine context, a
/// lookup, a context's destroy): the engine acts on exactly one copy, the
/// op written back is that copy's, and what it unmapped is flushed by the
/// call's end (a device that read the page before faults after).
/// (Review 157.)
#[test]
fn an_op_rewritten_between_its_copies_is_acted_on_from_one() {
    use pviommu_abi::subop;
    for (first, second) in [("lookup", "map"), ("lookup", "lookup"), ("map", "map")] {
        for n in 0..4u32 {
            for to in ["unmap_c1", "lookup", "destroy_c2"] {
                let (mut m, e) = machine(Format::Vtd, 64);
                let c1 = e.context_create(&mut m, DomId::DOM0).unwrap();
                let c2 = e.context_create(&mut m, DomId::DOM0).unwrap();
                let mut setup = [map_op_in(c1, GUEST, 5, RW)];
                m.guest_batch_all(&e, DomId::DOM0, &mut setup).unwrap();
                assert_eq!(setup[0].status, 0);
                let b1 = Bfn(setup[0].bfn);
                // A device of c1 reads the page: the IOTLB holds it.
                assert!(m.dma_read(DomId::DOM0, c1, b1.0 << 12, 8).is_ok());
                // The references one writable mapping holds.
                let refs = m.total_page_refs();
                let lookup = |b| {
                    Request::Lookup {
                        context: ContextId::DEFAULT,
                        bfn: Bfn(b),
                    }
                    .encode()
                };
                let op0 = if first == "lookup" {
                    lookup(0)
                } else {
                    map_op(GUEST, 9, RW)
                };
                let op1 = if second == "map" {
                    map_op(GUEST, 7, RW)
                } else {
                    lookup(1)
                };
                let new1 = match to {
                    "unmap_c1" => unmap_op_in(c1, b1),
                    "lookup" => lookup(2),
                    _ => Request::ContextDestroy { context: c2 }.encode(),
                };
                let (base, ops_addr) = stage_batch(&mut m, DomId::DOM0, &[op0, op1]);
                let at = ops_addr + OP;
                let r = {
                    let race = Box::new(move |m: &mut pviommu_hv::sim::SimMachine| {
                        m.current = DomId::DOM0;
                        m.copy_to_guest(at, new1.as_bytes()).unwrap();
                    });
                    let mut h = Interposer::new(&mut m, Service::CopyFromGuestAt(at, n), race);
                    let mut r = e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base);
                    while r == pviommu_abi::BATCH_INCOMPLETE {
                        r = e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base);
                    }
                    r
                };
                let tag = format!("{first}/{second}, rewritten before copy {n} into {to}");
                assert_eq!(r, 0, "{tag}");
                m.current = DomId::DOM0;
                let mut hdr = PvIommuBatch::default();
                m.copy_from_guest(base, hdr.as_mut_bytes()).unwrap();
                assert_eq!(hdr.nr_done, 2, "{tag}");
                let mut got = [PvIommuOp::default(); 2];
                m.copy_from_guest(ops_addr, got.as_mut_bytes()).unwrap();
                let o = got[1];
                // What op 1 did is what the op written back says it is.
                let unmapped = m.translate(DomId::DOM0, c1, b1).is_none();
                match o.subop {
                    subop::UNMAP => {
                        assert_eq!(o.status, 0, "{tag}");
                        assert!(unmapped, "{tag}");
                        // Flushed: the device's cached translation is gone.
                        let read = m.dma_read(DomId::DOM0, c1, b1.0 << 12, 8);
                        assert!(read.is_err(), "{tag}");
                    }
                    subop::MAP => {
                        assert_eq!(o.status, 0, "{tag}");
                        assert!(!unmapped, "{tag}");
                    }
                    _ => assert!(!unmapped, "{tag}"),
                }
                // Nothing acted twice, or from a mix of the copies.
                let maps = u64::from(first == "map") + u64::from(o.subop == subop::MAP);
                let unmaps = u64::from(o.subop == subop::UNMAP);
                assert_eq!(
                    m.total_page_refs(),
                    refs + refs * maps - refs * unmaps,
                    "{tag}: references"
                );
                check_invariants(&mut m, &e).unwrap_or_else(|err| panic!("{tag}: {err}"));
            }
        }
    }
}

/// The contexts a batch names (`touched`, bit n: context n) are those of
/// the ops it reached: every run's and every op's that no run takes,
/// wherever it was copied in (a window, or alone after such an op), and
/// none of the ops it did not reach. A review of the window (157) found
/// that dropping the bit in either place failed only one test of the
/// whole suite; the call's end finishes every waiting cell anyway, so the
/// bits decide only which cells go first and what a `BatchEnding` names.
/// Here every call ends in an error with a cell left waiting (dom0's
/// default context holds more writes and clears than one entry makes,
/// and no op names it), so each answers a `BatchEnding` whose contexts are
/// the bits, checked against the ops for many batches of runs and single
/// ops of several contexts (one never made; one past the 16 bits the
/// ending carries), cut by a status that cannot be written at each op,
/// or by an op that cannot be copied in.
#[test]
fn a_batch_names_the_contexts_of_the_ops_it_reached_and_no_others() {
    use pviommu_hv::config::Config;
    use pviommu_hv::hypercall::BatchEnding;
    const WAITING: u64 = 600;
    let (mut m, _) = machine(Format::Vtd, 4096);
    // An entry finishes the named cells and then at most 1024 + 32
    // entries' work more: less than the default context waits with.
    let e = Engine::new(
        Config {
            quota: 1 << 16,
            max_batch_ops: 32,
        },
        &m,
    )
    .unwrap();
    let contexts: Vec<ContextId> = (0..3)
        .map(|_| {
            let mut op = [Request::ContextCreate.encode()];
            m.guest_batch_all(&e, DomId::DOM0, &mut op).unwrap();
            assert_eq!(op[0].status, 0);
            ContextId(op[0].context)
        })
        .collect();
    // The default context's cell waits with WAITING clears and WAITING
    // writes, from calls that have not ended.
    let mut maps: Vec<PvIommuOp> = (0..WAITING).map(|g| map_op(GUEST, g, RW)).collect();
    for batch in maps.chunks_mut(32) {
        m.guest_batch_all(&e, DomId::DOM0, batch).unwrap();
    }
    for op in &maps {
        assert_eq!(op.status, 0);
        e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, Bfn(op.bfn))
            .unwrap();
    }
    let info = m.domain_info(DomId::DOM0).unwrap();
    for g in WAITING..2 * WAITING {
        let req = map_request_in(ContextId::DEFAULT, GUEST, g, RW);
        e.map(&mut m, DomId::DOM0, &info, &req).unwrap();
    }
    // Contexts made, one never made, one past the ending's 16 bits.
    let mut choices = contexts.clone();
    choices.extend([ContextId(9), ContextId(20)]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let ending = |contexts| {
        BatchEnding {
            errno: Errno::Fault,
            contexts,
        }
        .command()
    };
    let mut endings = 0;
    for case in 0..48 {
        // Stretches of one kind and context (runs, or ops no run takes),
        // the first in a context made (so a named cell is finished
        // first, and the waiting one is left).
        let mut ops = Vec::new();
        while ops.len() < 20 {
            let context = if ops.is_empty() {
                contexts[next(3) as usize]
            } else {
                choices[next(5) as usize]
            };
            let kind = next(6);
            for _ in 0..1 + next(4) {
                let gfn = 2 * WAITING + next(512);
                let bfn = Bfn(next(1 << 20));
                ops.push(match kind {
                    0 => map_op_in(context, GUEST, gfn, RW),
                    1 => unmap_op_in(context, bfn),
                    2 => Request::Lookup { context, bfn }.encode(),
                    3 => {
                        let mut bad = map_op_in(context, GUEST, gfn, RW);
                        bad.flags = 0;
                        bad
                    }
                    4 => Request::RevokedNextIn {
                        context,
                        skip: 0,
                        numbered: false,
                    }
                    .encode(),
                    _ => Request::RevokedAck {
                        context,
                        bfn,
                        notice: None,
                    }
                    .encode(),
                });
            }
        }
        let named = |reached: &[PvIommuOp]| {
            reached.iter().fold(0u32, |bits, op| {
                bits | 1u32.checked_shl(op.context).unwrap_or(0)
            }) as u16
        };
        // A status that cannot be written at op p: ops 0..=p reached.
        let p = next(ops.len() as u64) as usize;
        let (base, ops_addr) = stage_batch(&mut m, DomId::DOM0, &ops);
        let status = ops_addr + p as u64 * OP + 4;
        let r = {
            let mut h = Interposer::new(&mut m, Service::CopyToGuestAt(status), Box::new(|_| {}));
            e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base)
        };
        assert_eq!(
            r,
            i64::from(ending(named(&ops[..=p]))),
            "case {case}, status of op {p}"
        );
        endings += 1;
        // An op that cannot be copied in at f: ops 0..f reached.
        let f = 1 + next(ops.len() as u64 - 1) as usize;
        let (base, _) = stage_before_the_end(&mut m, &ops[..f], ops.len() as u32);
        let r = e.hypercall(&mut m, DomId::DOM0, cmd::BATCH, base);
        assert_eq!(
            r,
            i64::from(ending(named(&ops[..f]))),
            "case {case}, op {f} not copied"
        );
        endings += 1;
    }
    assert_eq!(endings, 96);
    // The waiting cell is still there; the call that ends it finishes it.
    assert!(e
        .state()
        .drivers()
        .any(|d| d.domid() == DomId::DOM0 && d.entries_to_clear().0 != 0));
    let r = loop {
        let r = e.hypercall(&mut m, DomId::DOM0, ending(0), 0);
        if r != i64::from(ending(0)) {
            break r;
        }
    };
    assert_eq!(r, Errno::Fault.negated() as i64);
    check_invariants(&mut m, &e).unwrap();
}
