//! A cell per (driver domain, context) (issue 10, "two vCPUs of one driver
//! domain working on different contexts map at the same time"): a context's
//! mappings have a lock and tables of their own, so a long batch in one
//! context holds up neither another context nor context 0; what a driver
//! domain's cells share (the quota, the order of its notices) still holds
//! across them; and dom0's contexts have cells device models cannot take.

use std::sync::mpsc;
use std::sync::Arc;

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::{DOM0_CELLS, MAX_DRIVER_DOMAINS};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::within_10s;

const GUEST: DomId = DomId(1);
const DM: DomId = DomId(3);

fn host(device_models: u16) -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    let spec = DomainSpec {
        pages: 64,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain(GUEST, spec).unwrap();
    for i in 0..device_models {
        let spec = DomainSpec {
            pages: 4,
            privileged: false,
            device_model_of: Some(GUEST),
        };
        m.create_domain(DomId(DM.0 + i), spec).unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

fn req(context: ContextId, gfn: u64) -> MapRequest {
    MapRequest {
        context,
        domid: GUEST,
        gfn: Gfn(gfn),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn map(sim: &SharedSim, e: &Engine, caller: DomId, ctx: ContextId, gfn: u64) -> Result<Bfn, Errno> {
    let mut h = sim.handle(caller);
    let info = h.domain_info(caller).unwrap();
    let r = e.map(&mut h, caller, &info, &req(ctx, gfn));
    e.finish_contexts(&mut h, caller, 1 << ctx.0);
    r
}

fn unmap(
    sim: &SharedSim,
    e: &Engine,
    caller: DomId,
    ctx: ContextId,
    bfn: Bfn,
) -> Result<(), Errno> {
    let mut h = sim.handle(caller);
    let r = e.unmap(&mut h, caller, ctx, bfn);
    e.finish_contexts(&mut h, caller, 1 << ctx.0);
    r
}

fn create(sim: &SharedSim, e: &Engine, caller: DomId) -> Result<ContextId, Errno> {
    e.context_create(&mut sim.handle(caller), caller)
}

#[test]
fn a_busy_context_holds_up_neither_another_context_nor_context_0() {
    let (sim, e) = host(0);
    let (c1, c2) = (
        create(&sim, &e, DomId::DOM0).unwrap(),
        create(&sim, &e, DomId::DOM0).unwrap(),
    );
    map(&sim, &e, DomId::DOM0, c1, 1).unwrap();
    assert_ne!(
        e.cell_of(DomId::DOM0, c1),
        e.cell_of(DomId::DOM0, c2),
        "each context has a cell of its own"
    );

    // Context 1's cell is locked, as during a long batch of another vCPU.
    let (locked_tx, locked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = {
        let e = e.clone();
        std::thread::spawn(move || {
            let guard = e
                .context_state(DomId::DOM0, c1)
                .expect("context 1 has a cell");
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(guard);
        })
    };
    locked_rx.recv().unwrap();

    // Maps and unmaps into context 2 and context 0, with their flushes,
    // and the caller's usage and stats, go through meanwhile.
    let (s, en) = (sim.clone(), e.clone());
    let done = within_10s(move || {
        for ctx in [c2, ContextId::DEFAULT] {
            let bfn = map(&s, &en, DomId::DOM0, ctx, 2).unwrap();
            unmap(&s, &en, DomId::DOM0, ctx, bfn).unwrap();
            map(&s, &en, DomId::DOM0, ctx, 3).unwrap();
        }
        // And so does a batch hypercall into context 2: its flush at the
        // end is of the contexts it touched.
        let mut ops = [pviommu_abi::Request::Map(req(c2, 4)).encode()];
        s.lock()
            .guest_batch_all(&en, DomId::DOM0, &mut ops)
            .unwrap();
        assert_eq!(ops[0].status, 0);
        let unmap = pviommu_abi::Request::Unmap {
            context: c2,
            bfn: Bfn(ops[0].bfn),
        };
        let mut ops = [unmap.encode()];
        s.lock()
            .guest_batch_all(&en, DomId::DOM0, &mut ops)
            .unwrap();
        assert_eq!(ops[0].status, 0);
        en.context_state(DomId::DOM0, c2).unwrap().live()
    });
    assert_eq!(
        done,
        Some(1),
        "a map into context 2 or 0 waited for context 1's lock"
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let st = e.state();
    let live: Vec<_> = st
        .live_mappings(DomId::DOM0)
        .map(|v| (v.mapping.context, v.mapping.gfn.0))
        .collect();
    assert_eq!(live, [(ContextId::DEFAULT, 3), (c1, 1), (c2, 3)]);
    drop(st);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

#[test]
fn the_quota_counts_every_context_and_comes_back_from_each() {
    let (sim, e) = host(0);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, Some(4))
        .unwrap();
    let a = map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 1).unwrap();
    map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 2).unwrap();
    let b = map(&sim, &e, DomId::DOM0, c1, 3).unwrap();
    map(&sim, &e, DomId::DOM0, c1, 4).unwrap();
    // Four in use across the two contexts: neither takes a fifth.
    assert_eq!(e.usage(DomId::DOM0), (4, 4, 0));
    assert_eq!(map(&sim, &e, DomId::DOM0, c1, 5), Err(Errno::NoSpc));
    assert_eq!(
        map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 5),
        Err(Errno::NoSpc)
    );
    // A BFN freed in one context is one the other may take.
    unmap(&sim, &e, DomId::DOM0, c1, b).unwrap();
    map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 5).unwrap();
    assert_eq!(map(&sim, &e, DomId::DOM0, c1, 6), Err(Errno::NoSpc));
    unmap(&sim, &e, DomId::DOM0, ContextId::DEFAULT, a).unwrap();
    map(&sim, &e, DomId::DOM0, c1, 6).unwrap();
    assert_eq!(e.usage(DomId::DOM0), (4, 4, 0));
    // Back to the default quota: room again in both.
    e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, None)
        .unwrap();
    map(&sim, &e, DomId::DOM0, c1, 7).unwrap();
    map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 7).unwrap();
    assert_eq!(e.usage(DomId::DOM0).1, 6);
}

#[test]
fn notices_of_several_contexts_come_oldest_first() {
    let (sim, e) = host(0);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    let c2 = create(&sim, &e, DomId::DOM0).unwrap();
    // One page of GUEST per context; revoked in the order c2, 0, c1.
    for (ctx, gfn) in [(c1, 1), (ContextId::DEFAULT, 2), (c2, 3)] {
        map(&sim, &e, DomId::DOM0, ctx, gfn).unwrap();
    }
    for gfn in [3, 2, 1] {
        sim.lock().put_new_frame(GUEST, Gfn(gfn)).unwrap();
        e.gfn_removed(&mut sim.handle(DomId::DOM0), GUEST, Gfn(gfn));
    }
    let mut order = Vec::new();
    while let Ok((bfn, n, _)) = e.revoked_next(DomId::DOM0) {
        order.push((n.context, n.gfn.0));
        e.revoked_ack(DomId::DOM0, n.context, bfn, None).unwrap();
        assert!(order.len() <= 3, "a notice came back after its ack");
    }
    assert_eq!(order, [(c2, 3), (ContextId::DEFAULT, 2), (c1, 1)]);
    assert_eq!(e.usage(DomId::DOM0), (e.config().quota, 0, 0));
}

#[test]
fn device_models_cannot_take_the_cells_kept_for_dom0s_contexts() {
    let others = (MAX_DRIVER_DOMAINS - DOM0_CELLS) as u16;
    let (sim, e) = host(others);
    // Device models hold every cell past dom0's: a context of one of them
    // finds none free.
    for i in 0..others {
        map(&sim, &e, DomId(DM.0 + i), ContextId::DEFAULT, 1).unwrap();
    }
    assert_eq!(create(&sim, &e, DM), Err(Errno::NoSpc));
    assert!(
        e.state().context(DM, ContextId(1)).is_none(),
        "the refused create left no context"
    );
    // dom0 still gets all its contexts, each in a cell of its own.
    let max = pviommu_hv::iommu::IommuBackend::iommu_caps(&*sim.lock()).max_contexts;
    let mut cells = Vec::new();
    for _ in 1..max {
        let ctx = create(&sim, &e, DomId::DOM0).unwrap();
        map(&sim, &e, DomId::DOM0, ctx, 2).unwrap();
        cells.push(e.cell_of(DomId::DOM0, ctx).unwrap());
    }
    assert!(
        cells.iter().all(|&c| (1..DOM0_CELLS).contains(&c)),
        "{cells:?}"
    );
    cells.sort_unstable();
    cells.dedup();
    assert_eq!(cells.len(), (max - 1) as usize);
    assert_eq!(create(&sim, &e, DomId::DOM0), Err(Errno::NoSpc));
}

#[test]
fn a_destroyed_contexts_cell_goes_back_and_its_bfns_are_refused() {
    let (sim, e) = host(0);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    let cell = e.cell_of(DomId::DOM0, c1).unwrap();
    let bfn = map(&sim, &e, DomId::DOM0, c1, 1).unwrap();
    let mut h = sim.handle(DomId::DOM0);
    assert_eq!(e.context_destroy(&mut h, DomId::DOM0, c1), Err(Errno::Busy));
    unmap(&sim, &e, DomId::DOM0, c1, bfn).unwrap();
    e.context_destroy(&mut h, DomId::DOM0, c1).unwrap();
    assert_eq!(e.cell_of(DomId::DOM0, c1), None);
    assert!(e.state().context(DomId::DOM0, c1).is_none());
    assert_eq!(map(&sim, &e, DomId::DOM0, c1, 1), Err(Errno::NoEnt));
    assert_eq!(unmap(&sim, &e, DomId::DOM0, c1, bfn), Err(Errno::NoEnt));
    assert_eq!(e.target_drivers(GUEST) & (1 << cell), 0);
    // The same id comes back with a fresh cell, and works.
    assert_eq!(create(&sim, &e, DomId::DOM0), Ok(c1));
    let again = map(&sim, &e, DomId::DOM0, c1, 1).unwrap();
    unmap(&sim, &e, DomId::DOM0, c1, again).unwrap();
    assert_eq!(sim.lock().total_page_refs(), 0);
}

#[test]
fn a_dying_driver_domain_gives_back_every_context_cell() {
    let (sim, e) = host(1);
    let c1 = create(&sim, &e, DM).unwrap();
    let c2 = create(&sim, &e, DM).unwrap();
    for (ctx, gfn) in [(ContextId::DEFAULT, 1), (c1, 2), (c2, 3), (c2, 4)] {
        map(&sim, &e, DM, ctx, gfn).unwrap();
    }
    // One notice waiting in context 1.
    sim.lock().put_new_frame(GUEST, Gfn(2)).unwrap();
    e.gfn_removed(&mut sim.handle(DomId::DOM0), GUEST, Gfn(2));
    assert_eq!(e.usage(DM).2, 1);
    let owned = |e: &Engine| e.state().drivers().count();
    let before = owned(&e);
    e.domain_dying(&mut sim.handle(DomId::DOM0), DM);
    assert_eq!(before - owned(&e), 3, "home and two context cells");
    assert!(e.state().cells_of(DM).next().is_none());
    assert_eq!(e.target_drivers(GUEST), 0);
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(sim.lock().total_page_refs(), 0);
}

#[test]
fn near_its_quota_a_driver_domain_counts_every_contexts_bfns_exactly() {
    // Cells add small changes to the shared count lazily (issue 10: no
    // cache line written by every unlock of every context); near the quota
    // the other contexts' BFNs must still all count.
    let mut m = SimMachine::new(8192, Format::Vtd, 64);
    let spec = DomainSpec {
        pages: 1200,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain(GUEST, spec).unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    let sim = SharedSim::new(m);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    e.set_quota(&mut sim.handle(DomId::DOM0), DomId::DOM0, Some(1000))
        .unwrap();
    for gfn in 0..10 {
        map(&sim, &e, DomId::DOM0, c1, gfn).unwrap();
    }
    let mut mapped = 0;
    for gfn in 0..1200 {
        match map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, gfn) {
            Ok(_) => mapped += 1,
            Err(Errno::NoSpc) => break,
            Err(other) => panic!("map of gfn {gfn}: {other:?}"),
        }
    }
    assert_eq!(mapped, 990, "context 1's ten BFNs count against the quota");
    assert_eq!(e.usage(DomId::DOM0).1, 1000);
    assert_eq!(map(&sim, &e, DomId::DOM0, c1, 11), Err(Errno::NoSpc));
}

#[test]
fn a_batch_in_one_context_retries_what_another_context_left_stuck() {
    // A batch flushes the contexts it named, and any other with work to
    // retry: a revocation the IOMMU refused waits for no batch of its own
    // context (as before there were cells per context).
    let (sim, e) = host(0);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 1).unwrap();
    // The revocation's unmap and the hook's own retry are both refused.
    sim.lock().fail_unmaps = 2;
    sim.lock().put_new_frame(GUEST, Gfn(1)).unwrap();
    e.gfn_removed(&mut sim.handle(DomId::DOM0), GUEST, Gfn(1));
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().stuck(), 1);
    // (A writable mapping holds a reference and a writable one.)
    assert_eq!(
        sim.lock().total_page_refs(),
        2,
        "a stuck page stays referenced"
    );
    // A batch in context 1 ends; context 0's stuck revocation goes through.
    let b = map(&sim, &e, DomId::DOM0, c1, 2).unwrap();
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().stuck(), 0);
    assert_eq!(e.usage(DomId::DOM0).2, 1, "the notice is queued");
    unmap(&sim, &e, DomId::DOM0, c1, b).unwrap();
    assert_eq!(sim.lock().total_page_refs(), 0);
}

#[test]
fn a_driver_domain_other_than_dom0_has_a_few_contexts_only() {
    // Each context takes a cell from the pool the device models share: one
    // device model must not take the cells others need (security review).
    let (sim, e) = host(1);
    let backend = pviommu_hv::iommu::IommuBackend::iommu_caps(&*sim.lock()).max_contexts;
    let allowed = e.max_contexts_for(backend, DM);
    assert_eq!(allowed, backend.min(pviommu_hv::engine::OTHER_MAX_CONTEXTS));
    for _ in 1..allowed {
        create(&sim, &e, DM).unwrap();
    }
    assert_eq!(create(&sim, &e, DM), Err(Errno::NoSpc));
    assert_eq!(e.state().cells_of(DM).count(), allowed as usize);
    assert_eq!(e.max_contexts_for(backend, DomId::DOM0), backend);
}

#[test]
fn a_failed_flush_in_one_context_is_retried_by_a_batch_in_another() {
    // (Second security review: the retry hint's failed-flush half had no
    // test.) Context 0's unmap is flushed, and the flush fails: its page
    // stays referenced until a flush succeeds, which a batch in context 1
    // brings about.
    let (sim, e) = host(0);
    let c1 = create(&sim, &e, DomId::DOM0).unwrap();
    let b = map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 1).unwrap();
    let refs = sim.lock().total_page_refs();
    assert!(refs > 0);
    sim.lock().fail_flushes = 1;
    unmap(&sim, &e, DomId::DOM0, ContextId::DEFAULT, b).unwrap();
    assert_eq!(
        sim.lock().total_page_refs(),
        refs,
        "kept until a flush succeeds"
    );
    let b1 = map(&sim, &e, DomId::DOM0, c1, 2).unwrap();
    unmap(&sim, &e, DomId::DOM0, c1, b1).unwrap();
    assert_eq!(
        sim.lock().total_page_refs(),
        0,
        "context 0's failed flush was retried"
    );
}

#[test]
fn contexts_of_device_models_leave_cells_for_other_device_models() {
    // (Second and third security reviews.) A context of a device model
    // never takes a cell when HOME_RESERVE or fewer are free: those go to
    // device models' first maps.
    use pviommu_hv::engine::HOME_RESERVE;
    let pool = MAX_DRIVER_DOMAINS - DOM0_CELLS;
    let (sim, e) = host(pool as u16 + 1);
    // Homes only, until HOME_RESERVE + 1 cells are free.
    let homes = pool - HOME_RESERVE - 1;
    for i in 0..homes as u16 {
        map(&sim, &e, DomId(DM.0 + i), ContextId::DEFAULT, 1).unwrap();
    }
    // One context still fits; the next would leave fewer than the reserve.
    create(&sim, &e, DM).unwrap();
    assert_eq!(pool - e.state().drivers().count(), HOME_RESERVE);
    assert_eq!(create(&sim, &e, DM), Err(Errno::NoSpc));
    assert_eq!(create(&sim, &e, DomId(DM.0 + 1)), Err(Errno::NoSpc));
    // Each reserved cell still goes to a device model's first map.
    for i in 0..HOME_RESERVE as u16 {
        let dm = DomId(DM.0 + homes as u16 + i);
        map(&sim, &e, dm, ContextId::DEFAULT, 1).unwrap();
    }
    let last = DomId(DM.0 + (homes + HOME_RESERVE) as u16);
    assert_eq!(
        map(&sim, &e, last, ContextId::DEFAULT, 1),
        Err(Errno::NoSpc)
    );
}

/// An engine context's cell keeps its page index when a mediator empties
/// the context (the next fill allocates no index), within a bound; context
/// 0's cell gives a large one back as before (a guest's death must not
/// leave megabytes in the driver domain's home cell).
#[test]
fn an_emptied_context_keeps_its_index() {
    const N: u64 = 16 * 1024;
    let mut m = SimMachine::new(3 * N, Format::Vtd, 64);
    let spec = DomainSpec {
        pages: N,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain(GUEST, spec).unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    let sim = SharedSim::new(m);
    let ctx = create(&sim, &e, DomId::DOM0).unwrap();
    // Fill a context with the guest's N pages, in batches of 1024 (the
    // BFNs in gfn order); empty it again.
    let fill = |ctx: ContextId| -> Vec<Bfn> {
        let mut h = sim.handle(DomId::DOM0);
        let info = h.domain_info(DomId::DOM0).unwrap();
        let mut bfns = Vec::new();
        for base in (0..N).step_by(1024) {
            for gfn in base..base + 1024 {
                bfns.push(e.map(&mut h, DomId::DOM0, &info, &req(ctx, gfn)).unwrap());
            }
            e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
        }
        bfns
    };
    let empty = |ctx: ContextId, bfns: &[Bfn]| {
        let mut h = sim.handle(DomId::DOM0);
        for chunk in bfns.chunks(1024) {
            for &bfn in chunk {
                e.unmap(&mut h, DomId::DOM0, ctx, bfn).unwrap();
            }
            e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
        }
    };
    let cycle = |ctx: ContextId| empty(ctx, &fill(ctx));
    let heap = |ctx: ContextId| {
        e.context_state(DomId::DOM0, ctx)
            .map_or(0, |dd| dd.heap_bytes())
    };
    cycle(ctx);
    let kept = heap(ctx);
    eprintln!("context cell emptied after {N} mappings keeps {kept} bytes");
    assert!(kept > 64 * 1024, "the index was given back: {kept} bytes");
    assert!(kept <= 1024 * 1024, "{kept} bytes kept");
    // Filled again, the index does not grow (only slot blocks come back).
    cycle(ctx);
    assert_eq!(heap(ctx), kept);
    cycle(ContextId::DEFAULT);
    let home = heap(ContextId::DEFAULT);
    assert!(home < 64 * 1024, "context 0 keeps {home} bytes");
    // The cleared (and still sharded) index finds what is mapped after it:
    // a second map of a page shares its BFN, and the guest's death revokes
    // every mapping.
    let bfns = fill(ctx);
    let mut h = sim.handle(DomId::DOM0);
    let info = h.domain_info(DomId::DOM0).unwrap();
    for gfn in (0..N).step_by(97) {
        let again = e.map(&mut h, DomId::DOM0, &info, &req(ctx, gfn)).unwrap();
        assert_eq!(
            again, bfns[gfn as usize],
            "gfn {gfn} not found in the index"
        );
    }
    e.finish_contexts(&mut h, DomId::DOM0, 1 << ctx.0);
    drop(h);
    sim.lock().kill_domain(&e, GUEST);
    let dd = e.context_state(DomId::DOM0, ctx).unwrap();
    assert_eq!((dd.live(), dd.revoked()), (0, N));
}

/// The capacity plan's host with one mediator per GPU guest (issue 10):
/// 64 device models and dom0 hold mapping state at once, and a hook for
/// the guest they all map reaches every one of them. With 64 cells (16 of
/// them dom0's) the 49th device model got `ENOSPC`; the gates now name
/// cells in two words, so 128 cells leave 112 to device models.
#[test]
fn sixty_four_device_models_map_at_once_and_a_hook_reaches_each() {
    let models = 64u16;
    let (sim, e) = host(models);
    map(&sim, &e, DomId::DOM0, ContextId::DEFAULT, 7).unwrap();
    for i in 0..models {
        map(&sim, &e, DomId(DM.0 + i), ContextId::DEFAULT, 7).unwrap();
    }
    let cells: Vec<usize> = (0..models)
        .map(|i| e.cell_of(DomId(DM.0 + i), ContextId::DEFAULT).unwrap())
        .collect();
    assert!(cells.iter().any(|&c| c >= 64), "{cells:?}");
    let named = e.target_drivers(GUEST);
    assert!(cells.iter().all(|&c| named & (1 << c) != 0));
    // The guest's page goes: every one of them gets its notice.
    sim.lock().put_new_frame(GUEST, Gfn(7)).unwrap();
    e.gfn_removed(&mut sim.handle(DomId::DOM0), GUEST, Gfn(7));
    for i in 0..models {
        let dm = DomId(DM.0 + i);
        let (_, notice, _) = e.revoked_next(dm).unwrap();
        assert_eq!(notice.gfn, Gfn(7), "device model {i}");
    }
    assert!(e.revoked_next(DomId::DOM0).is_ok());
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(e.target_drivers(GUEST), 0);
    // Room for the rest of the pool: 112 cells for device models in all.
    assert_eq!(MAX_DRIVER_DOMAINS - DOM0_CELLS, 112);
}

#[test]
fn page_maps_into_two_contexts_at_once_stay_within_the_quota() {
    // As `extents_into_two_contexts_at_once_stay_within_the_quota`, for
    // single pages: one BFN left under the quota, and two vCPUs map a page
    // each into a context of its own, the second while the first holds its
    // cell's lock past its quota check. One is refused (before, both were
    // mapped: a run of page maps passed the quota by up to 8 a context).
    use pviommu_tests::{machine_after_dom0, map_request_in, racing_at_first_table_write};
    let (mut m, e) = machine_after_dom0(Format::Vtd, 64, 64);
    let (c1, c2) = (
        e.context_create(&mut m, DomId::DOM0).unwrap(),
        e.context_create(&mut m, DomId::DOM0).unwrap(),
    );
    e.set_quota(&mut m, DomId::DOM0, Some(10)).unwrap();
    let info = Platform::domain_info(&m, DomId::DOM0).unwrap();
    for gfn in 0..9 {
        let req = map_request_in(c1, GUEST, gfn, Permissions::RW);
        e.map(&mut m, DomId::DOM0, &info, &req).unwrap();
    }
    let page = |c, gfn| map_request_in(c, GUEST, gfn, Permissions::RW);
    let (first, second) = racing_at_first_table_write(
        &mut m,
        |h| e.map(h, DomId::DOM0, &info, &page(c1, 10)),
        |m| e.map(m, DomId::DOM0, &info, &page(c2, 20)),
    );
    let second = second.expect("the second map ran inside the first");
    assert!(
        matches!(
            (&first, &second),
            (Ok(_), Err(Errno::NoSpc)) | (Err(Errno::NoSpc), Ok(_))
        ),
        "one page mapped, one refused: {first:?}, {second:?}"
    );
    assert_eq!(e.usage(DomId::DOM0).1, 10);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}
