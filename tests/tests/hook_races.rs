//! Map runs (map_alike, map_run), extents and single maps racing
//! gfn hooks (removal, write loss, ranges) and a target's teardown, on
//! real threads. After every write-loss hook returns, no cell may hold a
//! writable Live mapping of that gfn; after every removal hook, no Live
//! mapping of the old frame. At the end the usual invariants.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::{GfnChange, Slot};
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::{check_invariants, seed, Rng};

const PAGES: u64 = 2048;
const T1: DomId = DomId(1);
const T2: DomId = DomId(2);
const DM1: DomId = DomId(11);

fn host() -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(4 * PAGES + 16384, Format::Vtd, 64);
    for t in [T1, T2] {
        m.create_domain_in_superpages(
            t,
            DomainSpec {
                pages: PAGES,
                privileged: false,
                device_model_of: None,
            },
        )
        .unwrap();
    }
    m.create_domain(
        DM1,
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: Some(T1),
        },
    )
    .unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

fn req(ctx: ContextId, t: DomId, gfn: u64, write: bool) -> MapRequest {
    MapRequest {
        context: ctx,
        domid: t,
        gfn: Gfn(gfn),
        perms: if write {
            Permissions::RW
        } else {
            Permissions::RO
        },
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn ok_map_err(e: Errno) -> bool {
    matches!(
        e,
        Errno::Nxio
            | Errno::Again
            | Errno::Srch
            | Errno::Acces
            | Errno::XDev
            | Errno::Busy
            | Errno::NoSpc
    )
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
    let mut mine: Vec<pviommu_abi::Bfn> = vec![];
    let mut extents: Vec<pviommu_abi::Bfn> = vec![];
    let mut done = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let t = targets[(rng.next() % targets.len() as u64) as usize];
        let write = rng.next().is_multiple_of(2);
        let pick = if mine.len() > 1500 {
            9
        } else {
            rng.next() % 10
        };
        match pick {
            // A run of one target, one access (map_alike), or a mixed run
            // (map_run).
            0..=4 => {
                let reqs: Vec<_> = if pick <= 2 {
                    let g0 = rng.next() % (PAGES - 8);
                    (0..8).map(|k| req(ctx, t, g0 + k, write)).collect()
                } else {
                    (0..8)
                        .map(|_| {
                            let t = targets[(rng.next() % targets.len() as u64) as usize];
                            req(ctx, t, rng.next() % PAGES, rng.next().is_multiple_of(2))
                        })
                        .collect()
                };
                let mut out = [Err(Errno::Inval); 8];
                let mut at = 0;
                while at < reqs.len() {
                    let n = e.map_batch(&mut h, caller, &info, &reqs[at..], &mut out[at..]);
                    assert!(n > 0);
                    at += n;
                }
                for o in out {
                    match o {
                        Ok(m) => mine.push(m.bfn),
                        Err(x) => assert!(ok_map_err(x), "{x:?}"),
                    }
                }
            }
            5 => {
                let g0 = (rng.next() % (PAGES / 512)) * 512;
                match e.map_extent(&mut h, caller, &info, &req(ctx, t, g0, write)) {
                    Ok(m) => {
                        extents.push(m.mapped.bfn);
                        if extents.len() > 4 {
                            let b = extents.remove(0);
                            let _ = e.unmap_extent(&mut h, caller, ctx, b);
                        }
                    }
                    Err(x) => assert!(ok_map_err(x), "{x:?}"),
                }
            }
            6 => {
                if let Some(b) = extents.pop() {
                    match e.unmap_extent(&mut h, caller, ctx, b) {
                        Ok(_) => {}
                        Err(Errno::NoEnt | Errno::Busy) => {}
                        Err(x) => panic!("{x:?}"),
                    }
                }
            }
            _ => {
                for _ in 0..16 {
                    if mine.is_empty() {
                        break;
                    }
                    let b = mine.swap_remove((rng.next() % mine.len() as u64) as usize);
                    match e.unmap(&mut h, caller, ctx, b) {
                        Ok(()) | Err(Errno::Stale) | Err(Errno::NoEnt | Errno::Busy) => {}
                        Err(x) => panic!("{x:?}"),
                    }
                }
            }
        }
        if rng.next().is_multiple_of(3) {
            e.finish(&mut h, caller);
        }
        done += 1;
        // Four mappers re-taking the host's and their cells' locks at once
        // would starve the revokers (a few hundred hooks a second against
        // 500 000 a second alone): each step lets the others run.
        std::thread::yield_now();
    }
    e.finish(&mut h, caller);
    done
}

/// The cells the mappers map in: (driver domain, context), each once.
type Cells = Vec<(DomId, ContextId)>;

/// No Live mapping of t's gfns `g0..` with write access in any cell
/// (`write_lost`); none of the old frames (`olds[k]` of gfn `g0 + k`). Each
/// cell is looked at under its own lock, one at a time (a mapper holding
/// one is waited for, not spun on): what a hook took away cannot come back
/// while the gfn stays read-only or the frame gone, so a snapshot of all
/// cells at once is not needed (and without it the revokers made 1.5-3x
/// the hooks in a 3 s run).
fn check_after_hook(
    e: &Engine,
    cells: &[(DomId, ContextId)],
    t: DomId,
    g0: u64,
    olds: &[Option<pviommu_hv::Mfn>],
    write_lost: bool,
) {
    for &(driver, context) in cells {
        let Some(d) = e.context_state(driver, context) else {
            continue;
        };
        for (idx, s) in d.slots() {
            let Slot::Live(m) = s else { continue };
            let Some(k) = m.gfn.0.checked_sub(g0).filter(|k| *k < olds.len() as u64) else {
                continue;
            };
            if m.domid != t {
                continue;
            }
            let g = m.gfn.0;
            if write_lost {
                assert!(
                    !m.perms.write,
                    "writable Live mapping of d{} gfn {g} after its write-lost hook: slot {idx} of cell d{} ctx {:?}",
                    t.0,
                    d.domid().0,
                    d.context()
                );
            }
            if let Some(old) = olds[k as usize] {
                assert_ne!(
                    m.mfn, old,
                    "Live mapping of d{} gfn {g}'s old frame after its removal hook",
                    t.0
                );
            }
        }
    }
}

fn revoker(sim: SharedSim, e: Arc<Engine>, cells: Cells, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut h = sim.handle(DomId::DOM0);
    let mut rng = Rng(seed);
    let mut n = 0;
    // Each revoker has its own blocks of 8 gfns (bit 3 of the gfn): a page
    // another revoker made writable again between a hook and its check
    // could be mapped writable anew, legitimately.
    let lane = seed & 1;
    while !stop.load(Ordering::SeqCst) {
        let t = if rng.next().is_multiple_of(2) { T1 } else { T2 };
        let g = (rng.next() % PAGES) & !8 | lane << 3;
        match rng.next() % 4 {
            0 => {
                // Removal of one gfn.
                let old = sim.lock().mfn_of(t, Gfn(g));
                let changed = sim.lock().put_new_frame(t, Gfn(g)).is_ok();
                if changed {
                    e.gfn_removed(&mut h, t, Gfn(g));
                    check_after_hook(&e, &cells, t, g, &[old], false);
                }
            }
            1 | 2 => {
                // Write loss; then the page is replaced (writable again).
                sim.lock().set_read_only(t, Gfn(g));
                e.gfn_changed(&mut h, t, Gfn(g), 0, GfnChange::WriteLost);
                check_after_hook(&e, &cells, t, g, &[None], true);
                std::thread::yield_now();
                check_after_hook(&e, &cells, t, g, &[None], true);
                let old = sim.lock().mfn_of(t, Gfn(g));
                if sim.lock().put_new_frame(t, Gfn(g)).is_ok() {
                    e.gfn_removed(&mut h, t, Gfn(g));
                    check_after_hook(&e, &cells, t, g, &[old], false);
                }
            }
            _ => {
                // A range removal (order 3).
                let g0 = g & !7;
                let olds: Vec<_> = (g0..g0 + 8).map(|x| sim.lock().mfn_of(t, Gfn(x))).collect();
                {
                    let mut m = sim.lock();
                    for x in g0..g0 + 8 {
                        let _ = m.put_new_frame(t, Gfn(x));
                    }
                }
                e.gfn_changed(&mut h, t, Gfn(g0), 3, GfnChange::Removed);
                check_after_hook(&e, &cells, t, g0, &olds, false);
            }
        }
        n += 1;
    }
    n
}

#[test]
fn runs_and_extents_racing_hooks_leave_no_access_past_a_hook() {
    let (sim, e) = host();
    let mut h0 = sim.handle(DomId::DOM0);
    let ctx1 = e.context_create(&mut h0, DomId::DOM0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let plans: Vec<(DomId, Vec<DomId>, ContextId)> = vec![
        (DomId::DOM0, vec![T1, T2], ContextId::DEFAULT),
        (DomId::DOM0, vec![T1, T2], ctx1),
        (DM1, vec![T1], ContextId::DEFAULT),
        (DomId::DOM0, vec![T1], ContextId::DEFAULT),
    ];
    let mut cells: Cells = plans
        .iter()
        .map(|(caller, _, ctx)| (*caller, *ctx))
        .collect();
    cells.sort_by_key(|(d, c)| (d.0, c.0));
    cells.dedup();
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
    let mut revokers = vec![];
    for i in 0..2 {
        let (sim, e, stop, cells) = (sim.clone(), e.clone(), stop.clone(), cells.clone());
        revokers.push(std::thread::spawn(move || {
            revoker(sim, e, cells, seed(0xfeed + i), stop)
        }));
    }
    std::thread::sleep(std::time::Duration::from_secs(
        std::env::var("PVIOMMU_RACE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    ));
    stop.store(true, Ordering::SeqCst);
    let ops: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let hooks: u64 = revokers.into_iter().map(|r| r.join().unwrap()).sum();
    eprintln!("{ops} mapper steps, {hooks} hooks");
    // (The suite's whole check, with every thread stopped.)
    check_invariants(&mut sim.lock(), &e).unwrap();
    assert_eq!(lock_check::violations(), 0);
    for t in [T1, T2] {
        let mut h = sim.handle(DomId::DOM0);
        sim.lock().mark_dying(t);
        e.domain_dying(&mut h, t);
        sim.lock().destroy_domain(t);
    }
    for d in [DomId::DOM0, DM1] {
        let mut h = sim.handle(d);
        e.domain_dying(&mut h, d);
    }
    let m = sim.lock();
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(m.zombie_frames(), 0);
}
