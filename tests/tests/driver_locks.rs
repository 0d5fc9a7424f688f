//! Per-driver-domain locks (scale issue): a driver domain's state has its
//! own lock, so a mediator busy in a long batch does not hold up another
//! driver domain's maps, nor the p2m hooks of targets it does not map; and
//! the cell table that holds the states cannot be filled by device models
//! so as to lock dom0 out.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::{DOM0_CELLS, MAX_DRIVER_DOMAINS};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::within_10s;

const GUEST: DomId = DomId(1);
const OTHER: DomId = DomId(2);
const DM: DomId = DomId(3);

fn host(extra_device_models: u16) -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    for t in [GUEST, OTHER] {
        let spec = DomainSpec {
            pages: 64,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(t, spec).unwrap();
    }
    for i in 0..=extra_device_models {
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

fn map(sim: &SharedSim, e: &Engine, caller: DomId, target: DomId, gfn: u64) -> Result<(), Errno> {
    let mut h = sim.handle(caller);
    let info = h.domain_info(caller).unwrap();
    let req = MapRequest {
        context: ContextId::DEFAULT,
        domid: target,
        gfn: Gfn(gfn),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    };
    let r = e.map(&mut h, caller, &info, &req).map(|_| ());
    e.finish(&mut h, caller);
    r
}

#[test]
fn a_busy_driver_domain_holds_up_neither_another_nor_unrelated_hooks() {
    let (sim, e) = host(0);
    map(&sim, &e, DM, GUEST, 1).unwrap();
    map(&sim, &e, DomId::DOM0, OTHER, 1).unwrap();

    // The device model's state is locked (as during a long batch of its own).
    let (locked_tx, locked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = {
        let e = e.clone();
        std::thread::spawn(move || {
            let guard = e.driver_state(DM).expect("the device model has state");
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(guard);
        })
    };
    locked_rx.recv().unwrap();

    // dom0 maps and unmaps, and OTHER's p2m changes, all without waiting.
    let (s, en) = (sim.clone(), e.clone());
    let done = within_10s(move || {
        map(&s, &en, DomId::DOM0, OTHER, 2).unwrap();
        s.lock().put_new_frame(OTHER, Gfn(1)).unwrap();
        let mut h = s.handle(DomId::DOM0);
        en.gfn_removed(&mut h, OTHER, Gfn(1));
        en.driver_state(DomId::DOM0).unwrap().revoked()
    });
    assert_eq!(
        done,
        Some(1),
        "dom0's map and the hook of a target only dom0 maps waited for the device model's lock"
    );

    // A hook of GUEST, which the device model maps, does need its lock.
    let (s, en) = (sim.clone(), e.clone());
    let (hook_tx, hook_rx) = mpsc::channel();
    std::thread::spawn(move || {
        s.lock().put_new_frame(GUEST, Gfn(1)).unwrap();
        let mut h = s.handle(DomId::DOM0);
        en.gfn_removed(&mut h, GUEST, Gfn(1));
        hook_tx.send(()).unwrap();
    });
    assert!(hook_rx.recv_timeout(Duration::from_millis(300)).is_err());
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    hook_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(e.driver_state(DM).unwrap().revoked(), 1);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

#[test]
fn a_target_gate_names_exactly_the_driver_domains_that_map_it() {
    let (sim, e) = host(0);
    assert_eq!(e.target_drivers(GUEST), 0);
    map(&sim, &e, DM, GUEST, 1).unwrap();
    map(&sim, &e, DomId::DOM0, GUEST, 2).unwrap();
    map(&sim, &e, DomId::DOM0, OTHER, 2).unwrap();
    assert_eq!(e.target_drivers(GUEST).count_ones(), 2);
    assert_eq!(e.target_drivers(OTHER), 1, "dom0 lives in cell 0");

    // dom0 unmaps its GUEST page: only the device model is left on GUEST.
    let mut h = sim.handle(DomId::DOM0);
    let bfn = e
        .state()
        .live_mappings(DomId::DOM0)
        .find(|v| v.mapping.domid == GUEST)
        .unwrap()
        .bfn;
    e.unmap(&mut h, DomId::DOM0, ContextId::DEFAULT, bfn)
        .unwrap();
    e.finish(&mut h, DomId::DOM0);
    assert_eq!(e.target_drivers(GUEST).count_ones(), 1);
    assert_eq!(e.target_drivers(GUEST) & 1, 0);

    // A revocation that empties the device model's state gives its cell back.
    sim.lock().put_new_frame(GUEST, Gfn(1)).unwrap();
    e.gfn_removed(&mut h, GUEST, Gfn(1));
    assert_eq!(e.target_drivers(GUEST), 0);
    let mut hd = sim.handle(DM);
    let (bfn, _, _) = e.revoked_next(DM).unwrap();
    assert_eq!(
        e.unmap(&mut hd, DM, ContextId::DEFAULT, bfn),
        Err(Errno::Stale)
    );
    assert!(
        e.state().driver(DM).is_none(),
        "an idle state keeps no cell"
    );
}

#[test]
fn device_models_cannot_take_the_cell_kept_for_dom0() {
    // One more device model than the cells past dom0's.
    let n = (MAX_DRIVER_DOMAINS - DOM0_CELLS) as u16 + 1;
    let (sim, e) = host(n - 1);
    for i in 0..n - 1 {
        map(&sim, &e, DomId(DM.0 + i), GUEST, 1).unwrap();
    }
    let last = DomId(DM.0 + n - 1);
    let before = e.state().drivers().count();
    assert_eq!(map(&sim, &e, last, GUEST, 1), Err(Errno::NoSpc));
    assert_eq!(
        e.state().drivers().count(),
        before,
        "the refused map left no state"
    );
    map(&sim, &e, DomId::DOM0, GUEST, 1).expect("cell 0 is dom0's");

    // One device model unmaps everything: its cell goes to the last one.
    let first = DM;
    let bfn = e.state().live_mappings(first).next().unwrap().bfn;
    let mut h = sim.handle(first);
    e.unmap(&mut h, first, ContextId::DEFAULT, bfn).unwrap();
    e.finish(&mut h, first);
    map(&sim, &e, last, GUEST, 1).unwrap();
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

/// A map that finds its page's old mapping stale (the gfn moved and the
/// hook has not run yet) revokes it and maps the new frame. That old one was
/// dom0's last page of the target: the gate must still name dom0 afterwards,
/// or the next removal of the gfn would skip dom0 and leave the device
/// reaching a page the guest gave away.
#[test]
fn a_stale_last_mapping_replaced_by_a_map_keeps_the_gate_bit() {
    let (sim, e) = host(0);
    map(&sim, &e, DomId::DOM0, GUEST, 5).unwrap();
    // The p2m changes; its hook is late.
    sim.lock().put_new_frame(GUEST, Gfn(5)).unwrap();
    map(&sim, &e, DomId::DOM0, GUEST, 5).unwrap();
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().revoked(), 1);
    assert_eq!(e.target_drivers(GUEST) & 1, 1, "dom0 still maps GUEST");
    // The next removal reaches the new mapping.
    sim.lock().put_new_frame(GUEST, Gfn(5)).unwrap();
    let mut h = sim.handle(DomId::DOM0);
    e.gfn_removed(&mut h, GUEST, Gfn(5));
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().revoked(), 2);
    assert!(e.state().live_mappings(DomId::DOM0).next().is_none());
}

/// Security review finding (regression test): a p2m hook that revokes
/// nothing in a driver domain's cell used to skip the flush, and an unmap
/// that removed the domain's last page of a target cleared the target's
/// gate bit before that unmap was flushed. Either way a page just made
/// read-only (log-dirty, ioreq) could stay writable through the IOTLB after
/// the hook returned, until the owner's batch ended. Now the bit stays
/// until the flush, and a hook flushes whatever the cell has pending.
#[test]
fn a_write_lost_hook_flushes_an_unmap_still_pending() {
    use pviommu_hv::engine::GfnChange;
    let (sim, e) = host(0);
    let mut h = sim.handle(DomId::DOM0);
    let info = h.domain_info(DomId::DOM0).unwrap();
    let req = MapRequest {
        context: ContextId::DEFAULT,
        domid: OTHER,
        gfn: Gfn(3),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    };
    let refs_before = sim.lock().total_page_refs();
    let bfn = e.map(&mut h, DomId::DOM0, &info, &req).unwrap();
    e.finish(&mut h, DomId::DOM0);
    // The mediator's batch unmaps its last page of OTHER; its flush (at the
    // end of the batch) has not happened yet.
    e.unmap(&mut h, DomId::DOM0, ContextId::DEFAULT, bfn)
        .unwrap();
    assert_eq!(
        e.target_drivers(OTHER) & 1,
        1,
        "the bit stays until the unmap is flushed"
    );
    // OTHER's gfn 3 turns read-only for devices (log-dirty): the hook must
    // leave no writable entry behind, flushed or not.
    e.gfn_changed(&mut h, OTHER, Gfn(3), 0, GfnChange::WriteLost);
    assert_eq!(
        sim.lock().total_page_refs(),
        refs_before,
        "the hook flushed the pending unmap (its page references went)"
    );
    assert_eq!(e.target_drivers(OTHER), 0, "and then the bit went");
}
