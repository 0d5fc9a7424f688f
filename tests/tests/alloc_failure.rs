//! Allocation-failure sweep (hardening issue, defects 4 and 11).
//!
//! A global allocator that fails the Nth allocation the *engine* makes
//! (allocations of the simulated hypervisor itself are exempt: Xen's own
//! failures reach the engine as errors from the IOMMU, tested elsewhere).
//! For every N over a mixed scenario of maps, dedup, contexts, unmaps,
//! revocations and a domain death: nothing aborts, every call refused with
//! ENOMEM leaves the engine and the machine exactly as they were, hooks
//! (revocation, teardown) make no allocation at all, and page references
//! always balance.
//!
//! Before the fix, the first failed `BTreeMap::insert` or `Vec::push`
//! aborted the process (Xen: `panic()` of the host), and a failed queueing
//! of a page release leaked the reference (defect 11).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use pviommu_abi::{ContextId, DomId, Gfn, Permissions, PvIommuOp, Request};
use pviommu_hv::engine::Slot;
use pviommu_hv::sim::{Format, HostAllocations, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;

struct FailNth;

thread_local! {
    /// Engine allocations left before one fails (`None`: never fail).
    static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether engine allocations are being counted on this thread.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    /// Engine allocations made while armed.
    static MADE: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for FailNth {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(|a| a.get()) && !HostAllocations::active() {
            MADE.with(|m| m.set(m.get() + 1));
            let fail = LEFT.with(|l| match l.get() {
                Some(0) => {
                    l.set(None);
                    true
                }
                Some(n) => {
                    l.set(Some(n - 1));
                    false
                }
                None => false,
            });
            if fail {
                return std::ptr::null_mut();
            }
        }
        // SAFETY: forwarding the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarding.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: FailNth = FailNth;

/// Run `f` with engine allocations counted (and the armed failure live).
fn armed<R>(f: impl FnOnce() -> R) -> R {
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    r
}

fn made() -> u64 {
    MADE.with(|m| m.get())
}

/// Page references held by mappings (live, unmapping, stuck).
fn held_refs(e: &Engine) -> u64 {
    let st = e.state();
    st.drivers()
        .flat_map(|d| d.slots())
        .map(|(_, s)| match s {
            Slot::Live(m) | Slot::Unmapping { mapping: m, .. } | Slot::Stuck { mapping: m, .. } => {
                1 + m.perms.write as u64
            }
            _ => 0,
        })
        .sum()
}

enum Step {
    Batch(DomId, PvIommuOp),
    Balloon(u64),
    Kill,
}

/// One run of the scenario with the `fail_at`-th engine allocation failing.
/// Returns how many engine allocations the run made, and how many calls
/// were refused with ENOMEM.
fn run(fail_at: Option<u64>) -> (u64, u32) {
    let (mut m, e) = machine(Format::Vtd, 32);
    MADE.with(|c| c.set(0));
    LEFT.with(|l| l.set(fail_at));
    let mut steps = vec![];
    for g in 0..6 {
        steps.push(Step::Batch(DomId::DOM0, map_op(GUEST, g, Permissions::RW)));
    }
    steps.push(Step::Batch(DEVICE_MODEL, map_op(GUEST, 1, Permissions::RO)));
    steps.push(Step::Batch(DomId::DOM0, map_op(GUEST, 0, Permissions::RW))); // dedup
    steps.push(Step::Batch(DomId::DOM0, Request::ContextCreate.encode()));
    steps.push(Step::Batch(
        DomId::DOM0,
        map_op_in(ContextId(1), GUEST, 2, Permissions::RO),
    ));
    steps.push(Step::Balloon(3));
    steps.push(Step::Batch(
        DomId::DOM0,
        Request::RevokedNext { numbered: false }.encode(),
    ));
    steps.push(Step::Batch(DomId::DOM0, map_op(GUEST, 7, Permissions::RO)));
    steps.push(Step::Batch(DEVICE_MODEL, map_op(GUEST, 8, Permissions::RW)));
    steps.push(Step::Kill);
    let mut bfns = vec![];
    let mut refusals = 0;
    for step in steps {
        let before = observable(&m, &e);
        match step {
            Step::Batch(caller, op) => {
                let mut ops = [op];
                let r = armed(|| m.guest_batch_all(&e, caller, &mut ops));
                let refused = r.is_err() || ops[0].status == -12;
                if refused {
                    refusals += 1;
                    assert_eq!(
                        observable(&m, &e),
                        before,
                        "ENOMEM changed state (fail_at {fail_at:?})"
                    );
                } else if ops[0].status == 0 && ops[0].bfn != 0 {
                    bfns.push((caller, ops[0].bfn));
                }
            }
            Step::Balloon(g) => {
                let n0 = made();
                armed(|| m.balloon_out(&e, GUEST, Gfn(g))).unwrap();
                assert_eq!(made(), n0, "revocation allocated");
            }
            Step::Kill => {
                let n0 = made();
                armed(|| m.kill_domain(&e, GUEST));
                assert_eq!(made(), n0, "domain teardown allocated");
                assert_eq!(m.zombie_frames(), 0);
            }
        }
        assert_eq!(
            m.total_page_refs(),
            held_refs(&e),
            "references out of balance"
        );
    }
    let total = made();
    LEFT.with(|l| l.set(None));
    // Clean up: every BFN unmapped or acknowledged, every reference back.
    for (caller, bfn) in bfns {
        let mut ops = [unmap_op(pviommu_abi::Bfn(bfn))];
        m.guest_batch_all(&e, caller, &mut ops).unwrap();
    }
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(m.zombie_frames(), 0);
    (total, refusals)
}

#[test]
fn d04_d11_every_engine_allocation_may_fail() {
    let (total, refused) = run(None);
    assert_eq!(refused, 0);
    assert!(total > 5, "the scenario allocates ({total})");
    for n in 0..total {
        let (_, refused) = run(Some(n));
        assert_eq!(
            refused, 1,
            "failing allocation {n} was not reported as ENOMEM"
        );
    }
    eprintln!("swept {} allocation failures", total + 1);
}

#[test]
fn d04_page_table_allocation_failure_is_enomem_and_leaves_no_mapping() {
    let (mut m, e) = machine(Format::Lpae, 16);
    for budget in 0..4 {
        m.fail_table_allocs(Some(budget));
        let before = observable(&m, &e);
        let mut ops = [map_op(GUEST, 9, Permissions::RW)];
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        if ops[0].status != 0 {
            assert_eq!(ops[0].status, -12);
            // Tables allocated on the way may stay (empty), as in Linux's
            // io-pgtable; mappings and references may not.
            assert_eq!(m.total_page_refs(), 0);
            assert!(e.state().live_mappings(DomId::DOM0).next().is_none());
            let _ = before;
        } else {
            break;
        }
    }
    m.fail_table_allocs(None);
    let _: &SimMachine = &m;
}

/// The engine's set-up (`Engine::new`: gates, cell tables, every cell)
/// fails each of its allocations in turn: each answers `ENOMEM`, never a
/// panic, and the next attempt starts from nothing (review of the
/// per-context cells: the set-up was outside this file's reach).
#[test]
fn every_allocation_of_the_engines_set_up_may_fail() {
    let m = SimMachine::new(4096 + 32, Format::Vtd, 64);
    let mut n = 0;
    loop {
        MADE.with(|c| c.set(0));
        LEFT.with(|l| l.set(Some(n)));
        let r = armed(|| Engine::new(Default::default(), &m));
        LEFT.with(|l| l.set(None));
        match r {
            Ok(_) => break,
            Err(e) => assert_eq!(e, pviommu_hv::Errno::NoMem, "allocation {n} of the set-up"),
        }
        n += 1;
        assert!(n < 1000, "the set-up never succeeded");
    }
    assert!(
        n >= 8,
        "only {n} allocations in the set-up: did the test reach it?"
    );
}

/// A falling run of maps into context 0 in a fresh cell asks for room for
/// the block it falls into (`take_fresh_ahead`), best effort: each engine
/// allocation of the run failing in turn, every call either maps its page
/// or answers ENOMEM with nothing changed, the engine's books hold
/// together (the free list among them), references balance, and the pages
/// mapped read back through their BFNs.
#[test]
fn a_falling_runs_room_may_fail_at_each_allocation() {
    let gfns: Vec<u64> = (0..12).map(|i| 700 - i).collect();
    let mut n = 0;
    loop {
        let (mut m, e) = machine(Format::Vtd, 1024);
        MADE.with(|c| c.set(0));
        LEFT.with(|l| l.set(Some(n)));
        let mut mapped = vec![];
        for &g in &gfns {
            let before = observable(&m, &e);
            let mut ops = [map_op(GUEST, g, Permissions::RW)];
            let r = armed(|| m.guest_batch_all(&e, DomId::DOM0, &mut ops));
            if r.is_err() || ops[0].status == -12 {
                assert_eq!(observable(&m, &e), before, "ENOMEM changed state (n {n})");
            } else {
                assert_eq!(ops[0].status, 0, "gfn {g} (n {n})");
                mapped.push(ops[0]);
            }
            check_invariants(&mut m, &e).unwrap_or_else(|err| panic!("n {n}: {err}"));
            assert_eq!(m.total_page_refs(), held_refs(&e), "n {n}");
        }
        let failed = LEFT.with(|l| l.get()).is_none();
        LEFT.with(|l| l.set(None));
        for o in &mapped {
            assert_eq!(
                m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                    .unwrap(),
                pattern(o.gfn),
                "n {n}"
            );
        }
        for o in &mapped {
            let mut ops = [unmap_op(pviommu_abi::Bfn(o.bfn))];
            m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
            assert_eq!(ops[0].status, 0);
        }
        assert_eq!(m.total_page_refs(), 0);
        if !failed {
            // The armed failure was never reached: every allocation swept.
            break;
        }
        n += 1;
        assert!(n < 1000, "never ran without a failure");
    }
    assert!(
        n >= 4,
        "only {n} allocations: did the run reach the engine?"
    );
}

/// Review 164: the simulator's own `clear_entries_keeping_one` (08d8b74)
/// makes a store that unlinks a table with the full bookkeeping, whose
/// record of the unlinked table allocates: as host code, as
/// `SimMachine::write_entry` (and so the trait's default, an entry at a
/// time) makes it. Without the host marker around that store, an
/// allocation-failure sweep would fail the host's allocation as if the
/// engine's (and abort there). On coherent and non-coherent tables.
#[test]
fn a_cleared_run_unlinking_a_table_allocates_as_the_host() {
    use pviommu_hv::pgtable::{clear_entries_one_by_one, TableMemory};
    use pviommu_hv::Mfn;
    for coherent in [true, false] {
        for by_default in [false, true] {
            let mut m = SimMachine::new(64, Format::Vtd, 16);
            m.set_coherent_table_walks(coherent);
            let leaf = TableMemory::alloc_table(&mut m).unwrap();
            let child = TableMemory::alloc_table(&mut m).unwrap();
            let other: Mfn = TableMemory::alloc_table(&mut m).unwrap();
            // Two present entries before the link, the link, one after
            // (the table's last, which the run leaves).
            TableMemory::write_entry(&mut m, leaf, 1, other.0 << 12 | 3);
            TableMemory::write_entry(&mut m, leaf, 2, 0x7000 | 3);
            TableMemory::write_entry(&mut m, leaf, 3, child.0 << 12 | 3);
            TableMemory::write_entry(&mut m, leaf, 7, 0x9000 | 3);
            TableMemory::set_present_count(&mut m, leaf, 4);
            MADE.with(|c| c.set(0));
            let done = armed(|| {
                if by_default {
                    clear_entries_one_by_one(&mut m, leaf, 0..512, |e| e & 3 != 0)
                } else {
                    m.clear_entries_keeping_one(leaf, 0..512, |e| e & 3 != 0)
                }
            });
            assert_eq!(done, 7, "coherent {coherent} default {by_default}");
            assert_eq!(TableMemory::present_count(&m, leaf), 1);
            assert_eq!(TableMemory::read_entry(&m, leaf, 3), 0);
            assert_eq!(TableMemory::read_entry(&m, leaf, 7), 0x9000 | 3);
            assert_eq!(
                made(),
                0,
                "coherent {coherent} default {by_default}: the unlinking store allocated as the engine"
            );
        }
    }
}
