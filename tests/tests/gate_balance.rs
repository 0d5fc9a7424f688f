//! The target gates' bookkeeping under random operations (from the
//! security review): after every map, batch, unmap, undo, flush, hook (both
//! kinds), acknowledgement and injected IOMMU failure, a target's `active`
//! count equals its entries that can still reach a page (live, unmapped
//! but not flushed, stuck), and every cell holding one has its bit; after
//! both teardowns it is back to 0.
use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::{GfnChange, Mapped, Slot};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::Format;
use pviommu_hv::Engine;
use pviommu_tests::*;

fn req(gfn: u64, w: bool) -> MapRequest {
    MapRequest {
        context: ContextId::DEFAULT,
        domid: GUEST,
        gfn: Gfn(gfn),
        perms: if w { Permissions::RW } else { Permissions::RO },
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn check(e: &Engine, step: usize, what: &str) {
    let st = e.state();
    let mut n = 0u32;
    let mut cells: pviommu_hv::engine::CellMask = 0;
    for drv in [DomId::DOM0, DEVICE_MODEL] {
        let cell = e.cell_of(drv, ContextId::DEFAULT).unwrap_or(0);
        if let Some(d) = st.driver(drv) {
            let mut any = false;
            for (_, s) in d.slots() {
                match s {
                    Slot::Live(m)
                    | Slot::Unmapping { mapping: m, .. }
                    | Slot::Stuck { mapping: m, .. }
                        if m.domid == GUEST =>
                    {
                        n += 1;
                        any = true;
                    }
                    _ => {}
                }
            }
            if any {
                cells |= 1 << cell;
            }
        }
    }
    drop(st);
    assert_eq!(
        e.target_active(GUEST),
        n,
        "step {step} {what}: active vs page-holding entries"
    );
    let bits = e.target_drivers(GUEST);
    assert_eq!(
        bits & cells,
        cells,
        "step {step} {what}: a cell with entries lacks its bit ({bits:#x} vs {cells:#x})"
    );
}

#[test]
fn gate_balance_random() {
    for seed in 1..200u64 {
        let (mut m, e) = machine(Format::Vtd, 16);
        let mut rng = seed;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut known: Vec<(DomId, Mapped)> = Vec::new();
        for step in 0..300 {
            let r = next();
            let drv = if r & 1 == 0 {
                DomId::DOM0
            } else {
                DEVICE_MODEL
            };
            let ci = m.domain_info(drv).unwrap();
            let gfn = (r >> 8) % 6;
            let what;
            match (r >> 4) % 9 {
                0 | 1 => {
                    what = "map";
                    if let Ok(t) = e.map_tagged(&mut m, drv, &ci, &req(gfn, r & 0x1000 != 0)) {
                        known.push((drv, t));
                    }
                }
                2 => {
                    what = "unmap";
                    if !known.is_empty() {
                        let (d, t) = known.remove((r >> 16) as usize % known.len());
                        let _ = e.unmap(&mut m, d, ContextId::DEFAULT, t.bfn);
                    }
                }
                3 => {
                    what = "undo";
                    if !known.is_empty() {
                        let (d, t) = known.remove((r >> 16) as usize % known.len());
                        e.unmap_undo(&mut m, d, ContextId::DEFAULT, t);
                    }
                }
                4 => {
                    what = "finish";
                    e.finish(&mut m, drv);
                }
                5 => {
                    what = "hook";
                    let how = if r & 0x2000 != 0 {
                        GfnChange::Removed
                    } else {
                        GfnChange::WriteLost
                    };
                    e.gfn_changed(&mut m, GUEST, Gfn(gfn), 0, how);
                }
                6 => {
                    what = "ack";
                    if let Ok((b, _, _)) = e.revoked_next(drv) {
                        let _ = e.revoked_ack(drv, ContextId::DEFAULT, b, None);
                        known.retain(|(d, t)| !(*d == drv && t.bfn == b));
                    }
                }
                7 => {
                    what = "fail";
                    if r & 0x4000 != 0 {
                        m.fail_unmaps = 1 + (r >> 20) as u32 % 3
                    } else {
                        m.fail_flushes = 1 + (r >> 20) as u32 % 3
                    }
                }
                _ => {
                    what = "batch";
                    let reqs = [
                        req(gfn, true),
                        req((gfn + 1) % 6, false),
                        req((gfn + 2) % 6, true),
                    ];
                    let mut out = [Err(pviommu_hv::Errno::Inval); 3];
                    let n = e.map_batch(&mut m, drv, &ci, &reqs, &mut out);
                    for t in out.iter().take(n).flatten() {
                        known.push((drv, *t));
                    }
                }
            }
            check(&e, step, what);
        }
        m.fail_unmaps = 0;
        m.fail_flushes = 0;
        e.domain_dying(&mut m, DEVICE_MODEL);
        check(&e, 9999, "dm teardown");
        e.finish(&mut m, DomId::DOM0);
        e.domain_dying(&mut m, GUEST);
        check(&e, 10000, "guest teardown");
        assert_eq!(
            e.target_active(GUEST),
            0,
            "seed {seed}: leak after teardown"
        );
        assert_eq!(
            e.target_drivers(GUEST),
            0,
            "seed {seed}: a bit after teardown"
        );
        let _ = Bfn(0);
    }
}

/// A cell keeps its bit in a target's gate while it has work pending for
/// any target (an unflushed or stuck entry). A map that set the bit and
/// then lost its page (the target's p2m changed after the lookup) left it
/// set for that reason, though the cell held nothing of the target: once
/// the target died, its teardown's walk could be past, and a later domain
/// with the same id then had its hooks and teardown sent through the cell.
/// A map now takes back a bit it set when it installs nothing of the
/// target (and the teardown clears stale bits too: `review_tests` in the
/// engine).
/// `domid`'s page `gfn`, mapped writable.
fn of(domid: DomId, gfn: u64) -> MapRequest {
    MapRequest {
        domid,
        ..req(gfn, true)
    }
}

/// A host where dom0 has work pending for the stranger: an unmap of its
/// page not flushed yet (so dom0's cell keeps any bit it has).
fn pending_for_the_stranger() -> (
    pviommu_hv::sim::SimMachine,
    Engine,
    pviommu_hv::platform::DomainInfo,
) {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let s = e
        .map_tagged(&mut m, DomId::DOM0, &dom0, &of(STRANGER, 1))
        .unwrap();
    e.finish(&mut m, DomId::DOM0);
    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, s.bfn)
        .unwrap();
    (m, e, dom0)
}

#[test]
fn a_dead_targets_gate_names_no_cell() {
    // A map of the guest's page loses its page right after looking it up,
    // while dom0 has work pending for the stranger: the map marked its
    // cell in the guest's gate.
    let (mut m, e, dom0) = pending_for_the_stranger();
    let got = {
        let mut racer = Interposer::new(
            &mut m,
            Service::GetPage,
            Box::new(|m: &mut pviommu_hv::sim::SimMachine| {
                m.balloon_out(&e, GUEST, Gfn(2)).unwrap()
            }),
        );
        e.map_tagged(&mut racer, DomId::DOM0, &dom0, &of(GUEST, 2))
    };
    assert_eq!(got, Err(pviommu_hv::Errno::Nxio));
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(e.target_drivers(GUEST), 0, "the refused map left its bit");
    // The guest dies; its teardown ends with the gate naming no cell.
    m.mark_dying(GUEST);
    e.domain_dying(&mut m, GUEST);
    assert_eq!(
        e.target_drivers(GUEST),
        0,
        "a dead target's gate names a cell"
    );
    // The pending unmap is still flushed, and its page released.
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(e.target_active(STRANGER), 0);
    assert_eq!(e.target_drivers(STRANGER), 0);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

/// The same through a batch: a run of two maps of the guest, both losing
/// their page after the lookup, takes back the bit the run set.
#[test]
fn a_refused_run_of_maps_takes_back_the_bit_it_set() {
    let (mut m, e, dom0) = pending_for_the_stranger();
    let reqs = [of(GUEST, 2), of(GUEST, 3)];
    let mut out = [Err(pviommu_hv::Errno::Inval); 2];
    let n = {
        let mut racer = Interposer::new(
            &mut m,
            Service::GetPage,
            Box::new(|m: &mut pviommu_hv::sim::SimMachine| {
                m.balloon_out(&e, GUEST, Gfn(2)).unwrap();
                m.balloon_out(&e, GUEST, Gfn(3)).unwrap();
            }),
        );
        e.map_batch(&mut racer, DomId::DOM0, &dom0, &reqs, &mut out)
    };
    assert!(out[..n].iter().all(|o| o.is_err()), "{out:?}");
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(e.target_drivers(GUEST), 0, "the refused run left its bit");
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(e.target_drivers(STRANGER), 0);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

/// A run that comes back to a target after another (guest, stranger,
/// guest, guest), its first op refused at its checks and its last at the
/// page lookup: the run marks the cell in each target's gate once, and
/// the gates end as the ops left them (the guest's two live mappings and
/// the stranger's one counted, dom0's cell named in both gates). Marking
/// once per run of a target (30a5a62) left the bits and counts as marking
/// per op did; unmapped and flushed, both gates are empty again.
#[test]
fn a_run_back_and_forth_between_targets_marks_each_gate_once_and_balances() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    // (A grant reference: no backend offers them, refused at the checks.)
    let refused_at_checks = MapRequest {
        grant: true,
        ..of(GUEST, 2)
    };
    let reqs = [
        refused_at_checks,
        of(STRANGER, 1),
        of(GUEST, 3),
        of(GUEST, 4),
        of(GUEST, 0x7fff_ffff),
    ];
    let mut out = [Err(pviommu_hv::Errno::Inval); 5];
    let n = e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out);
    assert_eq!(n, 5);
    assert!(out[0].is_err() && out[4].is_err(), "{out:?}");
    assert!(out[1..4].iter().all(|o| o.is_ok()), "{out:?}");
    check(&e, 0, "after the run");
    assert_eq!(e.target_active(GUEST), 2);
    assert_eq!(e.target_active(STRANGER), 1);
    let cell = e.cell_of(DomId::DOM0, ContextId::DEFAULT).unwrap();
    assert_eq!(e.target_drivers(GUEST), 1 << cell);
    assert_eq!(e.target_drivers(STRANGER), 1 << cell);
    e.finish(&mut m, DomId::DOM0);
    for o in &out[1..4] {
        let bfn = o.as_ref().unwrap().bfn;
        e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, bfn)
            .unwrap();
    }
    e.finish(&mut m, DomId::DOM0);
    check(&e, 1, "after the unmaps");
    for t in [GUEST, STRANGER] {
        assert_eq!(e.target_active(t), 0);
        assert_eq!(e.target_drivers(t), 0);
    }
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}
