//! Many CPUs at once (hardening issue): 10 threads map, unmap and revoke for
//! several driver domains (and two vCPUs of one driver domain on different
//! contexts) and several target domains, through the engine's real lock
//! protocol: page lookups and p2m changes happen outside the engine lock,
//! hooks run after the p2m change, as on Xen. Afterwards every invariant
//! holds, and tearing everything down returns every page reference.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::{check_invariants, Rng};

const PAGES: u64 = 64;
const TARGETS: [DomId; 3] = [DomId(1), DomId(2), DomId(3)];
const DM1: DomId = DomId(11); // device model of target 1
const DM2: DomId = DomId(12); // device model of target 2

fn host() -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(8192, Format::Vtd, 64);
    for t in TARGETS {
        m.create_domain(
            t,
            DomainSpec {
                pages: PAGES,
                privileged: false,
                device_model_of: None,
            },
        )
        .unwrap();
    }
    for (dm, t) in [(DM1, TARGETS[0]), (DM2, TARGETS[1])] {
        m.create_domain(
            dm,
            DomainSpec {
                pages: 32,
                privileged: false,
                device_model_of: Some(t),
            },
        )
        .unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

fn mapper(
    sim: SharedSim,
    e: Arc<Engine>,
    caller: DomId,
    targets: Vec<DomId>,
    ctx: ContextId,
    seed: u64,
    iters: u32,
) -> (u32, u32) {
    let mut h = sim.handle(caller);
    let info = h.domain_info(caller).unwrap();
    let mut rng = Rng(seed);
    let mut mine = vec![];
    let (mut maps, mut unmaps) = (0, 0);
    for _ in 0..iters {
        if !rng.next().is_multiple_of(3) || mine.is_empty() {
            let req = MapRequest {
                context: ctx,
                domid: targets[(rng.next() % targets.len() as u64) as usize],
                gfn: Gfn(rng.next() % PAGES),
                perms: if rng.next().is_multiple_of(2) {
                    Permissions::RW
                } else {
                    Permissions::RO
                },
                attr: MemAttr::WriteBack,
                grant: false,
            };
            match e.map(&mut h, caller, &info, &req) {
                Ok(b) => {
                    maps += 1;
                    mine.push(b)
                }
                // A page just ballooned out, or the map raced a removal.
                Err(Errno::Nxio | Errno::Again | Errno::Srch) => {}
                Err(other) => panic!("map by {caller:?}: {other:?}"),
            }
        } else {
            let b = mine.swap_remove((rng.next() % mine.len() as u64) as usize);
            match e.unmap(&mut h, caller, ctx, b) {
                // Live, or revoked meanwhile (acknowledged now).
                Ok(()) | Err(Errno::Stale) => unmaps += 1,
                // Revoked and acknowledged by an earlier unmap of a shared
                // (deduplicated) BFN, or being revoked right now.
                Err(Errno::NoEnt | Errno::Busy) => {}
                Err(other) => panic!("unmap by {caller:?}: {other:?}"),
            }
        }
        if rng.next().is_multiple_of(8) {
            e.finish(&mut h, caller);
        }
    }
    e.finish(&mut h, caller);
    (maps, unmaps)
}

fn revoker(sim: SharedSim, e: Arc<Engine>, seed: u64, stop: Arc<AtomicBool>) {
    let mut h = sim.handle(DomId::DOM0);
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let t = TARGETS[(rng.next() % 3) as usize];
        let g = Gfn(rng.next() % PAGES);
        // The p2m change, under the "p2m lock" (the machine lock) ...
        let changed = sim.lock().put_new_frame(t, g).is_ok();
        // ... then the hook, after the change succeeded.
        if changed {
            e.gfn_removed(&mut h, t, g);
        }
        std::thread::yield_now();
    }
}

#[test]
fn ten_threads_map_unmap_and_revoke_with_invariants() {
    let (sim, e) = host();
    // Two vCPUs of dom0 on different contexts need a second context.
    let mut h0 = sim.handle(DomId::DOM0);
    let ctx1 = e.context_create(&mut h0, DomId::DOM0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let iters = 3000;
    let mut workers = vec![];
    let plans: Vec<(DomId, Vec<DomId>, ContextId)> = vec![
        (DomId::DOM0, TARGETS.to_vec(), ContextId::DEFAULT),
        (DomId::DOM0, TARGETS.to_vec(), ctx1),
        (DM1, vec![TARGETS[0]], ContextId::DEFAULT),
        (DM2, vec![TARGETS[1]], ContextId::DEFAULT),
        (DomId::DOM0, vec![TARGETS[2]], ContextId::DEFAULT),
        (DM1, vec![TARGETS[0]], ContextId::DEFAULT),
        (DM2, vec![TARGETS[1]], ContextId::DEFAULT),
        (DomId::DOM0, vec![TARGETS[0], TARGETS[1]], ctx1),
    ];
    for (i, (caller, targets, ctx)) in plans.into_iter().enumerate() {
        let (sim, e) = (sim.clone(), e.clone());
        workers.push(std::thread::spawn(move || {
            mapper(sim, e, caller, targets, ctx, 0x9e37_79b9 + i as u64, iters)
        }));
    }
    let mut revokers = vec![];
    for i in 0..2 {
        let (sim, e, stop) = (sim.clone(), e.clone(), stop.clone());
        revokers.push(std::thread::spawn(move || {
            revoker(sim, e, 0xdead_beef + i, stop)
        }));
    }
    let (mut maps, mut unmaps) = (0, 0);
    for w in workers {
        let (m, u) = w.join().unwrap();
        maps += m;
        unmaps += u;
    }
    eprintln!("{maps} maps, {unmaps} unmaps by 8 mapper threads");
    assert!(
        maps > 8 * iters / 2 && unmaps > 8 * iters / 8,
        "{maps} maps, {unmaps} unmaps"
    );
    stop.store(true, Ordering::SeqCst);
    for r in revokers {
        r.join().unwrap();
    }
    // (The suite's whole check, with every thread stopped.)
    check_invariants(&mut sim.lock(), &e).unwrap();
    assert_eq!(lock_check::violations(), 0);
    let revoked: u64 = e.state().drivers().map(|d| d.revoked()).sum();
    eprintln!("{revoked} revocations pending acknowledgement");
    assert!(revoked > 0, "the revokers revoked something");

    // Tear everything down the way Xen would: targets die, then drivers.
    for t in TARGETS {
        let mut h = sim.handle(DomId::DOM0);
        sim.lock().mark_dying(t);
        e.domain_dying(&mut h, t);
        sim.lock().destroy_domain(t);
    }
    for d in [DomId::DOM0, DM1, DM2] {
        let mut h = sim.handle(d);
        e.domain_dying(&mut h, d);
    }
    let m = sim.lock();
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(m.zombie_frames(), 0);
    assert_eq!(e.state().drivers().count(), 0);
    assert_eq!(e.state().mapped_pages(), 0);
}
