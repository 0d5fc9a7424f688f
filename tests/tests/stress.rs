//! The whole engine under stress (first written for the security review of
//! 2026-12-02): many threads map, unmap and drain notices in several
//! contexts of dom0 and of device models (one with a device attached),
//! while other threads change the targets' p2m (removals, write loss,
//! single gfns and ranges), kill a target slice by slice and re-create it
//! with the same domid, and make IOMMU unmaps and flushes fail. After each
//! teardown nothing of the dead target may be held and its gate may name no
//! cell; at the end every mapping matches its page, none is writable on a
//! read-only page, revoked and free BFNs translate to nothing, page
//! references balance, no lock was taken out of order and no table was
//! freed or reused before its flush.
//!
//! `PVIOMMU_STRESS_SECS` (default 2) sets how long the threads run.
//! A campaign's knobs: `PVIOMMU_SEED` moves every thread's seed, and
//! `PVIOMMU_STRESS_BURST` makes an injected failure last up to that many
//! calls (backlogs of failed flushes; CI's is 1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, Sbdf};
use pviommu_hv::engine::{GfnChange, Slot};
use pviommu_hv::iommu::DeviceFacts;
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::{knob, seed, Rng};

const PAGES: u64 = 64;
const T1: DomId = DomId(1);
const T2: DomId = DomId(2);
const T3: DomId = DomId(3);
const DM1: DomId = DomId(11);
const DM2: DomId = DomId(12);

fn spec(pages: u64, dm_of: Option<DomId>) -> DomainSpec {
    DomainSpec {
        pages,
        privileged: false,
        device_model_of: dm_of,
    }
}

fn host() -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(65536, Format::Vtd, 64);
    for t in [T1, T2, T3] {
        m.create_domain(t, spec(PAGES, None)).unwrap();
    }
    m.create_domain(DM1, spec(32, Some(T1))).unwrap();
    m.create_domain(DM2, spec(32, Some(T2))).unwrap();
    m.add_device(
        Sbdf(0x0008),
        DeviceFacts {
            owner: DM1,
            own_requester_id: true,
            rmrr: false,
            ats: false,
            translated: true,
        },
    );
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

#[allow(clippy::too_many_arguments)]
fn mapper(
    sim: SharedSim,
    e: Arc<Engine>,
    caller: DomId,
    targets: Vec<DomId>,
    ctx: ContextId,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut h = sim.handle(caller);
    let info = h.domain_info(caller).unwrap();
    let mut rng = Rng(seed);
    let mut mine: Vec<Bfn> = vec![];
    let mut maps = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match rng.next() % 8 {
            0..=3 => {
                let n = 1 + (rng.next() % 8) as usize;
                let reqs: Vec<MapRequest> = (0..n)
                    .map(|_| MapRequest {
                        context: ctx,
                        domid: targets[(rng.next() % targets.len() as u64) as usize],
                        gfn: Gfn(rng.next() % PAGES),
                        perms: match rng.next() % 3 {
                            0 => Permissions::RW,
                            1 => Permissions::RO,
                            _ => Permissions {
                                read: false,
                                write: true,
                            },
                        },
                        attr: MemAttr::WriteBack,
                        grant: false,
                    })
                    .collect();
                let mut out = vec![Err(Errno::Inval); n];
                let done = e.map_batch(&mut h, caller, &info, &reqs, &mut out);
                for r in out.iter().take(done) {
                    match r {
                        Ok(m) => {
                            maps += 1;
                            mine.push(m.bfn)
                        }
                        Err(
                            Errno::Nxio
                            | Errno::Again
                            | Errno::Srch
                            | Errno::Acces
                            | Errno::NoSpc
                            | Errno::NoMem,
                        ) => {}
                        Err(other) => panic!("map by {caller:?}: {other:?}"),
                    }
                }
            }
            4 | 5 if !mine.is_empty() => {
                let n = 1 + (rng.next() % 8) as usize;
                let reqs: Vec<(ContextId, Bfn)> = (0..n.min(mine.len()))
                    .map(|_| {
                        let i = (rng.next() % mine.len() as u64) as usize;
                        (ctx, mine.swap_remove(i))
                    })
                    .collect();
                let mut out = vec![Ok(()); reqs.len()];
                e.unmap_batch(&mut h, caller, &reqs, &mut out);
                for r in &out {
                    match r {
                        Ok(()) | Err(Errno::Stale | Errno::NoEnt | Errno::Busy | Errno::NoMem) => {}
                        Err(other) => panic!("unmap by {caller:?}: {other:?}"),
                    }
                }
            }
            6 => {
                // Drain this context's notices by number.
                for skip in 0..4 {
                    match e.revoked_in(caller, ctx, skip) {
                        Ok((bfn, n, number)) => {
                            assert_eq!(n.context, ctx);
                            assert!(
                                [T1, T2, T3].contains(&n.domid)
                                    && (caller == DomId::DOM0 || targets.contains(&n.domid)),
                                "{caller:?} told of {n:?}"
                            );
                            let _ = e.revoked_ack(caller, ctx, bfn, Some(number));
                        }
                        Err(_) => break,
                    }
                }
            }
            _ => e.finish(&mut h, caller),
        }
    }
    e.finish(&mut h, caller);
    maps
}

fn p2m_changer(sim: SharedSim, e: Arc<Engine>, seed: u64, stop: Arc<AtomicBool>) {
    let mut h = sim.handle(DomId::DOM0);
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        let t = [T1, T2, T3][(rng.next() % 3) as usize];
        match rng.next() % 4 {
            0 => {
                let g = Gfn(rng.next() % PAGES);
                if sim.lock().put_new_frame(t, g).is_ok() {
                    e.gfn_removed(&mut h, t, g);
                }
            }
            1 => {
                let g = Gfn(rng.next() % PAGES);
                sim.lock().set_read_only(t, g);
                e.gfn_changed(&mut h, t, g, 0, GfnChange::WriteLost);
            }
            2 => {
                // An 8-page range made read-only.
                let base = (rng.next() % (PAGES / 8)) * 8;
                {
                    let mut m = sim.lock();
                    for g in base..base + 8 {
                        m.set_read_only(t, Gfn(g));
                    }
                }
                e.gfn_changed(&mut h, t, Gfn(base), 3, GfnChange::WriteLost);
            }
            _ => {
                // An 8-page range replaced by fresh (writable) frames.
                let base = (rng.next() % (PAGES / 8)) * 8;
                let mut ok = true;
                {
                    let mut m = sim.lock();
                    for g in base..base + 8 {
                        ok &= m.put_new_frame(t, Gfn(g)).is_ok();
                    }
                }
                if ok {
                    e.gfn_changed(&mut h, t, Gfn(base), 3, GfnChange::Removed);
                }
            }
        }
        std::thread::yield_now();
    }
}

fn killer(sim: SharedSim, e: Arc<Engine>, stop: Arc<AtomicBool>) -> u32 {
    let mut h = sim.handle(DomId::DOM0);
    let mut kills = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        sim.lock().mark_dying(T3);
        let mut cursor = 0;
        let mut slices = 0;
        while e.domain_teardown(&mut h, T3, &mut cursor).is_err() {
            slices += 1;
            assert!(slices < 100_000, "teardown of T3 makes no progress");
        }
        {
            // Every cell locked: no map holds a bit transiently.
            let st = e.state();
            let bits = e.target_drivers(T3);
            let active = e.target_active(T3);
            let held: Vec<_> = st
                .drivers()
                .flat_map(|d| d.slots().map(move |(i, s)| (d.domid(), d.context(), i, s)))
                .filter(|(_, _, _, s)| match s {
                    Slot::Live(m)
                    | Slot::Unmapping { mapping: m, .. }
                    | Slot::Stuck { mapping: m, .. } => m.domid == T3,
                    _ => false,
                })
                .collect();
            drop(st);
            assert!(
                held.is_empty(),
                "T3's teardown ended with its pages held: {held:?}"
            );
            assert_eq!(bits, 0, "a dead T3's gate still names cells");
            let _ = active;
        }
        {
            let mut m = sim.lock();
            m.destroy_domain(T3);
            m.create_domain(T3, spec(PAGES, None)).unwrap();
        }
        kills += 1;
    }
    kills
}

/// How many calls in a row an injected failure lasts: 1, or up to
/// `PVIOMMU_STRESS_BURST` in a campaign (backlogs of failed flushes).
fn burst(rng: &mut Rng) -> u32 {
    let most = knob("PVIOMMU_STRESS_BURST", 1).max(1);
    u32::try_from(1 + rng.next() % most).unwrap_or(u32::MAX)
}

fn injector(sim: SharedSim, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(1));
        let mut m = sim.lock();
        match rng.next() % 4 {
            0 => m.fail_unmaps = burst(&mut rng),
            1 => m.fail_flushes = burst(&mut rng),
            _ => {}
        }
    }
}

fn check(sim: &SharedSim, e: &Engine) {
    let mut m = sim.lock();
    m.fail_unmaps = 0;
    m.fail_flushes = 0;
    pviommu_tests::check_invariants(&mut m, e).unwrap();
    // And a device reaches no revoked BFN.
    let st = e.state();
    let mut revoked = vec![];
    for d in st.drivers() {
        for (idx, s) in d.slots() {
            if let Slot::Revoked { notice, .. } = s {
                revoked.push((d.domid(), notice.context, st.space().bfn_of(idx).unwrap()));
            }
        }
    }
    drop(st);
    for (owner, ctx, bfn) in revoked {
        assert!(
            m.dma_read(owner, ctx, bfn.0 << 12, 8).is_err(),
            "DMA reaches revoked {bfn:?}"
        );
    }
}

#[test]
fn maps_hooks_target_deaths_and_iommu_failures_keep_every_invariant() {
    let (sim, e) = host();
    let c0 = e
        .context_create(&mut sim.handle(DomId::DOM0), DomId::DOM0)
        .unwrap();
    let c_dm1 = e.context_create(&mut sim.handle(DM1), DM1).unwrap();
    e.context_attach(&mut sim.handle(DM1), DM1, c_dm1, Sbdf(0x0008))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let plans: Vec<(DomId, Vec<DomId>, ContextId)> = vec![
        (DomId::DOM0, vec![T1, T2, T3], ContextId::DEFAULT),
        (DomId::DOM0, vec![T1, T3], c0),
        (DM1, vec![T1], ContextId::DEFAULT),
        (DM1, vec![T1], c_dm1),
        (DM2, vec![T2], ContextId::DEFAULT),
        (DomId::DOM0, vec![T3], ContextId::DEFAULT),
    ];
    let mut workers = vec![];
    for (i, (caller, targets, ctx)) in plans.into_iter().enumerate() {
        let (sim, e, stop) = (sim.clone(), e.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            mapper(
                sim,
                e,
                caller,
                targets,
                ctx,
                seed(0x1234_5678 + i as u64),
                stop,
            )
        }));
    }
    let mut others = vec![];
    for i in 0..2 {
        let (sim, e, stop) = (sim.clone(), e.clone(), stop.clone());
        others.push(std::thread::spawn(move || {
            p2m_changer(sim, e, seed(0xfeed + i), stop)
        }));
    }
    {
        let (sim, stop) = (sim.clone(), stop.clone());
        others.push(std::thread::spawn(move || injector(sim, seed(0xabc), stop)));
    }
    let k = {
        let (sim, e, stop) = (sim.clone(), e.clone(), stop.clone());
        std::thread::spawn(move || killer(sim, e, stop))
    };
    std::thread::sleep(std::time::Duration::from_secs(
        std::env::var("PVIOMMU_STRESS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    ));
    stop.store(true, Ordering::SeqCst);
    let maps: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    for o in others {
        o.join().unwrap();
    }
    let kills = k.join().unwrap();
    eprintln!("{maps} maps, {kills} kills of T3");
    // Quiesce: no more failures; flush every driver until nothing is stuck.
    {
        let mut m = sim.lock();
        m.fail_unmaps = 0;
        m.fail_flushes = 0;
    }
    for _ in 0..3 {
        for d in [DomId::DOM0, DM1, DM2] {
            e.finish(&mut sim.handle(d), d);
        }
    }
    check(&sim, &e);
    assert_eq!(lock_check::violations(), 0);
    // Tear down: the device off DM1's context first (as Xen would), then
    // targets die, then drivers.
    for t in [T1, T2, T3] {
        sim.lock().mark_dying(t);
        e.domain_dying(&mut sim.handle(DomId::DOM0), t);
        sim.lock().destroy_domain(t);
    }
    for d in [DM1, DM2, DomId::DOM0] {
        sim.lock().mark_dying(d);
        e.domain_dying(&mut sim.handle(d), d);
    }
    let m = sim.lock();
    assert_eq!(
        m.tables_freed_before_flush(),
        0,
        "a table freed or reused before its flush"
    );
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(m.zombie_frames(), 0);
}
