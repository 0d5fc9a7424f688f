//! Property tests over random op sequences against the simulated machine.

use proptest::prelude::*;
use pviommu_abi::{Bfn, ContextId, DomId, Permissions};
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;

#[derive(Clone, Debug)]
enum Step {
    Map { dm: bool, gfn: u64, write: bool },
    UnmapLive(usize),
    UnmapRandom(u64),
    RemoveGfn(u64),
    KillGuest,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<bool>(), 0u64..40, any::<bool>()).prop_map(|(dm, gfn, write)| Step::Map { dm, gfn, write }),
        4 => any::<usize>().prop_map(Step::UnmapLive),
        1 => any::<u64>().prop_map(Step::UnmapRandom),
        1 => (0u64..40).prop_map(Step::RemoveGfn),
        1 => Just(Step::KillGuest),
    ]
}

fn check_invariants(m: &mut SimMachine, e: &Engine) -> Result<(), TestCaseError> {
    let reserved = e.window().reserved.clone();
    let mut live_refs = 0u64;
    for (owner, dd) in e.drivers() {
        for (bfn, map) in dd.mappings() {
            prop_assert!(bfn.0 >= e.window().start && bfn.0 < e.window().end);
            prop_assert!(bfn.0 >= m.ram_end_frame(), "BFN above RAM");
            prop_assert!(!reserved
                .iter()
                .any(|r| bfn.0 >= r.start && bfn.0 < r.start + r.nr));
            // The page-table walk agrees with the mapping table.
            let t = m.translate(*owner, map.context, *bfn);
            prop_assert_eq!(t.map(|(mfn, p, _)| (mfn, p)), Some((map.mfn, map.perms)));
            live_refs += 1 + map.perms.write as u64;
        }
    }
    // Every page reference is accounted for by a live mapping.
    prop_assert_eq!(m.total_page_refs(), live_refs);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_op_sequences_keep_invariants(steps in proptest::collection::vec(step(), 1..60), lpae in any::<bool>()) {
        let (mut m, mut e) = machine(if lpae { Format::Lpae } else { Format::Vtd }, 48);
        let mut live: Vec<(DomId, Bfn)> = Vec::new();
        for s in steps {
            match s {
                Step::Map { dm, gfn, write } => {
                    let caller = if dm { DEVICE_MODEL } else { DomId::DOM0 };
                    let perms = if write { Permissions::RW } else { Permissions::RO };
                    let before = observable(&m, &e);
                    match map_one(&mut m, &mut e, caller, GUEST, gfn, perms) {
                        Ok(b) => live.push((caller, b)),
                        Err(_) => prop_assert_eq!(observable(&m, &e), before, "refused map changed state"),
                    }
                }
                Step::UnmapLive(i) if !live.is_empty() => {
                    let (caller, bfn) = live.remove(i % live.len());
                    let mut ops = [unmap_op(bfn)];
                    m.guest_batch_all(&mut e, caller, &mut ops).unwrap();
                    // It may already be revoked (domain death, removal).
                    prop_assert!(ops[0].status == 0 || ops[0].status == -2);
                }
                Step::UnmapLive(_) => {}
                Step::UnmapRandom(b) => {
                    let before = observable(&m, &e);
                    let mut ops = [unmap_op(Bfn(b))];
                    m.guest_batch_all(&mut e, DomId::DOM0, &mut ops).unwrap();
                    if ops[0].status != 0 {
                        prop_assert_eq!(observable(&m, &e), before);
                    } else {
                        // One reference dropped; stop tracking that BFN (the
                        // final sweep unmaps whatever the engine still holds).
                        live.retain(|l| *l != (DomId::DOM0, Bfn(b)));
                    }
                }
                Step::RemoveGfn(g) => {
                    m.remove_gfn(GUEST, pviommu_abi::Gfn(g));
                    e.gfn_removed(&mut m, GUEST, pviommu_abi::Gfn(g));
                }
                Step::KillGuest => {
                    m.destroy_domain(GUEST);
                    e.domain_dying(&mut m, GUEST);
                    prop_assert_eq!(m.zombie_frames(), 0);
                }
            }
            check_invariants(&mut m, &e)?;
        }
        // Unmapping everything balances every reference to zero.
        let all: Vec<(DomId, ContextId, Bfn, u32)> = e
            .drivers()
            .flat_map(|(d, dd)| dd.mappings().iter().map(move |(b, mp)| (*d, mp.context, *b, mp.refs)))
            .collect();
        for (caller, _, bfn, refs) in all {
            for _ in 0..refs {
                let mut ops = [unmap_op(bfn)];
                m.guest_batch_all(&mut e, caller, &mut ops).unwrap();
                prop_assert_eq!(ops[0].status, 0);
            }
        }
        prop_assert_eq!(m.total_page_refs(), 0);
        prop_assert_eq!(m.zombie_frames(), 0);
    }

    /// A batch run with a tiny work budget, resumed call after call, ends in
    /// the same state and with the same per-op results as one big call.
    #[test]
    fn budgeted_batches_resume_exactly(gfns in proptest::collection::vec(0u64..40, 1..200), budget in 0u32..7) {
        let mk_ops = |gfns: &[u64]| -> Vec<_> {
            let mut ops: Vec<_> = gfns.iter().map(|g| map_op(GUEST, *g, Permissions::RW)).collect();
            // Mix in unmaps of BFNs the first maps will get, and bad ops.
            ops.push(unmap_op(Bfn(0x10_0000)));
            ops.push(unmap_op(Bfn(0xdead)));
            ops
        };
        let (mut m1, mut e1) = machine(Format::Vtd, 48);
        let mut ops1 = mk_ops(&gfns);
        let calls1 = m1.guest_batch_all(&mut e1, DomId::DOM0, &mut ops1).unwrap();
        prop_assert_eq!(calls1, 1);

        let (mut m2, mut e2) = machine(Format::Vtd, 48);
        m2.preempt_budget = Some(budget);
        let mut ops2 = mk_ops(&gfns);
        let mut done = 0;
        let mut calls = 0;
        loop {
            m2.preempt_budget = Some(budget);
            let (ret, d) = m2.guest_batch(&mut e2, DomId::DOM0, &mut ops2, done).unwrap();
            calls += 1;
            prop_assert!(d > done || ret == 0, "every call makes progress");
            done = d;
            if ret == 0 { break; }
            prop_assert_eq!(ret, 1);
        }
        prop_assert!(calls as usize >= ops2.len() / (budget as usize + 1));
        prop_assert_eq!(ops1, ops2);
        prop_assert_eq!(observable(&m1, &e1), observable(&m2, &e2));
    }
}
