//! Per-context cells under concurrency (from the security review of the
//! per-context cells): contexts created and destroyed while other threads
//! map, unmap, churn the targets' p2m and a target dies, with the page
//! references, the gates, the cells and the shared quota count checked to
//! come back exactly afterwards; and the quota's bound when every context
//! maps at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::MAP_CHUNK;
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::Rng;
const PAGES: u64 = 64;
const T1: DomId = DomId(1);
const T2: DomId = DomId(2);
const QUOTA: u64 = 40;

fn host() -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(16384, Format::Vtd, 64);
    for t in [T1, T2] {
        let spec = DomainSpec {
            pages: PAGES,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(t, spec).unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

fn req(ctx: ContextId, t: DomId, gfn: u64) -> MapRequest {
    MapRequest {
        context: ctx,
        domid: t,
        gfn: Gfn(gfn),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

/// Unmap every BFN of `mine` (acks notices); retries `Busy`.
fn drain(sim: &SharedSim, e: &Engine, ctx: ContextId, mine: &mut Vec<Bfn>) {
    let mut h = sim.handle(DomId::DOM0);
    for _ in 0..1000 {
        mine.retain(|&b| {
            let r = e.unmap(&mut h, DomId::DOM0, ctx, b);
            matches!(r, Err(Errno::Busy))
        });
        e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
        if mine.is_empty() {
            return;
        }
        std::thread::yield_now();
    }
    panic!("could not drain {ctx:?}");
}

#[test]
fn context_churn_with_maps_hooks_and_target_death() {
    let (sim, e) = host();
    e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, Some(QUOTA))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let max_used = Arc::new(AtomicU64::new(0));
    let mut workers = vec![];
    // Three threads: create a context, map a run into it, unmap, destroy.
    for i in 0..3u64 {
        let (sim, e, max_used) = (sim.clone(), e.clone(), max_used.clone());
        workers.push(std::thread::spawn(move || {
            let mut rng = Rng(0x1234_5678 + i);
            let mut h = sim.handle(DomId::DOM0);
            let info = h.domain_info(DomId::DOM0).unwrap();
            for _ in 0..400 {
                let ctx = match e.context_create(&mut h, DomId::DOM0) {
                    Ok(c) => c,
                    Err(Errno::NoSpc) => continue,
                    Err(x) => panic!("create: {x:?}"),
                };
                let mut mine = vec![];
                let base = rng.next() % (PAGES - 8);
                let t = if rng.next().is_multiple_of(2) { T1 } else { T2 };
                let reqs: Vec<_> = (0..8).map(|k| req(ctx, t, base + k)).collect();
                let mut out = [Err(Errno::Inval); 8];
                let n = e.map_batch(&mut h, DomId::DOM0, &info, &reqs, &mut out);
                for r in out.iter().take(n) {
                    match r {
                        Ok(m) => mine.push(m.bfn),
                        Err(Errno::NoSpc | Errno::Nxio | Errno::Again | Errno::Srch) => {}
                        Err(x) => panic!("map: {x:?}"),
                    }
                }
                e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
                max_used.fetch_max(e.usage(DomId::DOM0).1, Ordering::SeqCst);
                drain(&sim, &e, ctx, &mut mine);
                let mut ok = false;
                for _ in 0..1000 {
                    match e.context_destroy(&mut h, DomId::DOM0, ctx) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(Errno::Busy) => std::thread::yield_now(),
                        Err(x) => panic!("destroy: {x:?}"),
                    }
                }
                assert!(ok, "context {ctx:?} never became destroyable");
            }
        }));
    }
    // One thread in context 0.
    {
        let (sim, e, max_used) = (sim.clone(), e.clone(), max_used.clone());
        workers.push(std::thread::spawn(move || {
            let mut rng = Rng(0xabcdef);
            let mut h = sim.handle(DomId::DOM0);
            let info = h.domain_info(DomId::DOM0).unwrap();
            for _ in 0..400 {
                let mut mine = vec![];
                let base = rng.next() % (PAGES - 8);
                let reqs: Vec<_> = (0..8)
                    .map(|k| req(ContextId::DEFAULT, T1, base + k))
                    .collect();
                let mut out = [Err(Errno::Inval); 8];
                let n = e.map_batch(&mut h, DomId::DOM0, &info, &reqs, &mut out);
                mine.extend(out.iter().take(n).flatten().map(|m| m.bfn));
                e.finish_contexts(&mut h, DomId::DOM0, 1);
                max_used.fetch_max(e.usage(DomId::DOM0).1, Ordering::SeqCst);
                drain(&sim, &e, ContextId::DEFAULT, &mut mine);
            }
        }));
    }
    // p2m churn on both targets.
    let mut revokers = vec![];
    for i in 0..2u64 {
        let (sim, e, stop) = (sim.clone(), e.clone(), stop.clone());
        revokers.push(std::thread::spawn(move || {
            let mut rng = Rng(0xdead_beef + i);
            let mut h = sim.handle(DomId::DOM0);
            while !stop.load(Ordering::SeqCst) {
                let t = if rng.next().is_multiple_of(2) { T1 } else { T2 };
                let g = Gfn(rng.next() % PAGES);
                if sim.lock().put_new_frame(t, g).is_ok() {
                    e.gfn_removed(&mut h, t, g);
                }
                std::thread::yield_now();
            }
        }));
    }
    // T2 dies part-way, with teardown slices racing everything above.
    std::thread::sleep(std::time::Duration::from_millis(200));
    {
        let mut h = sim.handle(DomId::DOM0);
        sim.lock().mark_dying(T2);
        e.domain_dying(&mut h, T2);
    }
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for r in revokers {
        r.join().unwrap();
    }
    assert_eq!(lock_check::violations(), 0);
    assert!(max_used.load(Ordering::SeqCst) <= QUOTA + 3 * MAP_CHUNK as u64);
    // Nothing left: every page back, every cell but dom0's home given back.
    assert_eq!(e.usage(DomId::DOM0), (QUOTA, 0, 0));
    assert_eq!(e.target_active(T2), 0);
    assert_eq!(e.target_active(T1), 0);
    assert_eq!(sim.lock().total_page_refs(), 0);
    let owned: Vec<_> = e
        .state()
        .drivers()
        .map(|d| (d.domid(), d.context()))
        .collect();
    assert_eq!(owned, [(DomId::DOM0, ContextId::DEFAULT)]);
    // The shared count did not drift: exactly QUOTA more fit, across
    // contexts.
    let mut h = sim.handle(DomId::DOM0);
    let info = h.domain_info(DomId::DOM0).unwrap();
    let c = e.context_create(&mut h, DomId::DOM0).unwrap();
    let mut got = 0;
    for g in 0..PAGES {
        let ctx = if g.is_multiple_of(2) {
            c
        } else {
            ContextId::DEFAULT
        };
        if e.map(&mut h, DomId::DOM0, &info, &req(ctx, T1, g)).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, QUOTA, "the shared quota count drifted");
}

/// Every context dom0 can have (0 and as many as it may create) maps runs
/// of MAP_CHUNK pages of T1 from gfn 0 on, all at once (a barrier starts
/// them), `runs` runs each or, with `stop_when_refused`, until a whole run
/// is refused. Returns how many contexts mapped.
fn map_in_every_context_at_once(
    sim: &SharedSim,
    e: &Arc<Engine>,
    runs: u64,
    stop_when_refused: bool,
) -> u64 {
    let max = pviommu_hv::iommu::IommuBackend::iommu_caps(&*sim.lock()).max_contexts;
    let ctxs: Vec<_> = (1..max)
        .map(|_| {
            e.context_create(&mut sim.handle(DomId::DOM0), DomId::DOM0)
                .unwrap()
        })
        .collect();
    let k = ctxs.len() as u64 + 1;
    let barrier = Arc::new(Barrier::new(k as usize));
    let mut ts = vec![];
    for ctx in std::iter::once(ContextId::DEFAULT).chain(ctxs) {
        let (sim, e, b) = (sim.clone(), e.clone(), barrier.clone());
        ts.push(std::thread::spawn(move || {
            let mut h = sim.handle(DomId::DOM0);
            let info = h.domain_info(DomId::DOM0).unwrap();
            b.wait();
            for run in 0..runs {
                let reqs: Vec<_> = (0..MAP_CHUNK as u64)
                    .map(|j| req(ctx, T1, run * MAP_CHUNK as u64 + j))
                    .collect();
                let mut out = [Err(Errno::Inval); MAP_CHUNK];
                let n = e.map_batch(&mut h, DomId::DOM0, &info, &reqs, &mut out);
                e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
                let refused = out[..n].iter().all(|r| matches!(r, Err(Errno::NoSpc)));
                if stop_when_refused && refused {
                    break;
                }
            }
        }));
    }
    for t in ts {
        t.join().unwrap();
    }
    k
}

#[test]
fn contexts_mapping_at_once_exceed_the_quota_by_at_most_one_run_each() {
    const Q: u64 = 8;
    for round in 0..20 {
        let (sim, e) = host();
        e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, Some(Q))
            .unwrap();
        let k = map_in_every_context_at_once(&sim, &e, 4, false);
        let used = e.usage(DomId::DOM0).1;
        assert!(
            used <= Q + (k - 1) * MAP_CHUNK as u64,
            "round {round}: {used} BFNs against a quota of {Q} in {k} contexts"
        );
    }
}

#[test]
fn far_below_the_quota_the_rough_count_keeps_the_bound_too() {
    // (Second security review.) A quota far above what the cells can hide
    // from the shared rough count: every context maps until refused; the
    // quota is reached, and exceeded by at most one run per other context.
    const Q: u64 = 2000;
    const G: u64 = 2100;
    for round in 0..5 {
        let mut m = SimMachine::new(16384, Format::Vtd, 64);
        let spec = DomainSpec {
            pages: G,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(T1, spec).unwrap();
        let e = Arc::new(Engine::new(Default::default(), &m).unwrap());
        let sim = SharedSim::new(m);
        e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, Some(Q))
            .unwrap();
        let k = map_in_every_context_at_once(&sim, &e, G / MAP_CHUNK as u64, true);
        let used = e.usage(DomId::DOM0).1;
        assert!(used >= Q, "round {round}: only {used} of {Q}");
        assert!(
            used <= Q + (k - 1) * MAP_CHUNK as u64,
            "round {round}: {used} BFNs against a quota of {Q} in {k} contexts"
        );
    }
}
