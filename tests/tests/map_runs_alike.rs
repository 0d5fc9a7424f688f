//! The map path's straight path for a run whose ops ask the same of one
//! target (`Engine::map_alike`): the branches the general tests reach
//! rarely or not at all, each checked to fail when its part is broken (a
//! review of 2026-12-05 broke them and found every other test still
//! passing).

use std::sync::atomic::Ordering;

use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::engine::{DOM0_CELLS, MAX_DRIVER_DOMAINS};
use pviommu_hv::platform::{Platform, XsmAction};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Errno};

const GUEST: DomId = DomId(1);
const STRANGER: DomId = DomId(2);
const FIRST_DM: DomId = DomId(3);

fn req(domid: DomId, gfn: u64) -> MapRequest {
    MapRequest {
        context: ContextId::DEFAULT,
        domid,
        gfn: Gfn(gfn),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn domain(pages: u64, device_model_of: Option<DomId>) -> DomainSpec {
    DomainSpec {
        pages,
        privileged: false,
        device_model_of,
    }
}

/// A run whose cell lock cannot be had (every cell a device model may
/// take is taken) gives back every page reference and gate share its
/// lookup took, and leaves the target's gate bits as they were.
#[test]
fn an_alike_run_whose_lock_fails_gives_back_everything_it_took() {
    let others = (MAX_DRIVER_DOMAINS - DOM0_CELLS) as u16;
    let mut m = SimMachine::new(8192, Format::Vtd, 64);
    m.create_domain(GUEST, domain(64, None)).unwrap();
    for i in 0..=others {
        m.create_domain(DomId(FIRST_DM.0 + i), domain(4, Some(GUEST)))
            .unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    // Every cell but dom0's taken by a device model's one page.
    for i in 0..others {
        let dm = DomId(FIRST_DM.0 + i);
        let info = m.domain_info(dm).unwrap();
        e.map(&mut m, dm, &info, &req(GUEST, 1)).unwrap();
        e.finish(&mut m, dm);
    }
    let (refs, active, bits) = (
        m.total_page_refs(),
        e.target_active(GUEST),
        e.target_drivers(GUEST),
    );
    let last = DomId(FIRST_DM.0 + others);
    let info = m.domain_info(last).unwrap();
    let reqs = [
        req(GUEST, 10),
        req(GUEST, 11),
        req(GUEST, 12),
        req(GUEST, 13),
    ];
    let mut out = [Err(Errno::Inval); 4];
    assert_eq!(e.map_batch(&mut m, last, &info, &reqs, &mut out), 4);
    assert!(out.iter().all(|o| *o == Err(Errno::NoSpc)), "{out:?}");
    assert_eq!(m.total_page_refs(), refs, "page references kept");
    assert_eq!(e.target_active(GUEST), active, "gate shares kept");
    assert_eq!(e.target_drivers(GUEST), bits);
}

/// A run every op of which the locked map refuses (no quota left) takes
/// back the cell's bit in the target's gate it set: nothing of the target
/// is in the cell, and a bit left would send the target's hooks there.
/// With an unmap of another target waiting for its flush in the cell, so
/// that only the run's own undo (the bit was clear, the run set it) can
/// take the bit back: the rule for a bit found set keeps it while the cell
/// has work pending, and such a bit could outlive a target that dies
/// meanwhile.
#[test]
fn an_alike_run_refused_whole_under_the_lock_takes_its_gate_bit_back() {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    m.create_domain(GUEST, domain(64, None)).unwrap();
    m.create_domain(STRANGER, domain(32, None)).unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    // dom0 holds one page of another domain, and has unmapped a second
    // one whose entry waits for the flush; it may hold one.
    e.map(&mut m, DomId::DOM0, &dom0, &req(STRANGER, 1))
        .unwrap();
    let second = e
        .map(&mut m, DomId::DOM0, &dom0, &req(STRANGER, 2))
        .unwrap();
    e.finish(&mut m, DomId::DOM0);
    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, second)
        .unwrap();
    e.set_quota(&mut m, DomId::DOM0, Some(1)).unwrap();
    assert_eq!(e.target_drivers(GUEST), 0);
    let reqs = [req(GUEST, 3), req(GUEST, 4), req(GUEST, 5)];
    let mut out = [Err(Errno::Inval); 3];
    assert_eq!(e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out), 3);
    assert!(out.iter().all(|o| *o == Err(Errno::NoSpc)), "{out:?}");
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(e.target_drivers(GUEST), 0, "the run's bit left set");
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(e.target_drivers(GUEST), 0);
}

/// A run the security policy refuses is asked about once, and every op
/// gets the refusal (`EPERM`, whatever the policy answered): one denial
/// in FLASK's log a run, where the general path asked once an op.
#[test]
fn an_alike_run_the_policy_refuses_asks_it_once() {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    m.create_domain(GUEST, domain(64, None)).unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    m.xsm_deny_action(DomId::DOM0, XsmAction::Map);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs: Vec<MapRequest> = (1..=8).map(|g| req(GUEST, g)).collect();
    let mut out = [Err(Errno::Inval); 8];
    let before = m.xsm_checks.load(Ordering::Relaxed);
    assert_eq!(e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out), 8);
    assert!(out.iter().all(|o| *o == Err(Errno::Perm)), "{out:?}");
    assert_eq!(m.xsm_checks.load(Ordering::Relaxed) - before, 1);
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(m.total_page_refs(), 0);
}

/// A batch's run ends before the first repeat of a page, whichever way its
/// gfns go: a run that rises and then falls back onto a page, one that
/// falls and then climbs back onto one, one that falls back onto one after
/// a rise, and one that falls throughout (which no scan cuts) each map
/// exactly the ops before the repeat (the rest go in the caller's next
/// run).
#[test]
fn a_run_ends_before_a_repeated_page_whichever_way_its_gfns_go() {
    let cases: [(&[u64], usize); 6] = [
        (&[5, 6, 7, 6], 3),
        (&[9, 8, 7, 8], 3),
        (&[9, 8, 9], 2),
        (&[5, 6, 4, 6], 3),
        (&[6, 5, 4, 3, 2, 1], 6),
        (&[3, 3], 1),
    ];
    for (gfns, cut) in cases {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        m.create_domain(GUEST, domain(64, None)).unwrap();
        let e = Engine::new(Default::default(), &m).unwrap();
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        let reqs: Vec<MapRequest> = gfns.iter().map(|&g| req(GUEST, g)).collect();
        let mut out = vec![Err(Errno::Inval); reqs.len()];
        let n = e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out);
        assert_eq!(n, cut, "{gfns:?}");
        assert!(out[..n].iter().all(|o| o.is_ok()), "{gfns:?}: {out:?}");
        assert!(out[n..].iter().all(|o| *o == Err(Errno::Inval)), "{gfns:?}");
        e.finish(&mut m, DomId::DOM0);
    }
}

/// Review 161: a falling run's repeat at the step that stops its fall (an
/// equal gfn, not a lower one) ends the run, and so does one whose first
/// two ops are one page; mixed targets: the same gfn of another target is
/// no repeat (the run goes on, the general path maps it), the same page of
/// either target is one, wherever it falls. (The commit's test passes with
/// `fell_again` taking `<=` for `<`; the first case fails it.)
#[test]
fn a_falling_run_ends_at_an_equal_gfn_of_the_same_target() {
    let cases: [(&[(DomId, u64)], usize); 7] = [
        (&[(GUEST, 9), (GUEST, 8), (GUEST, 8)], 2),
        (&[(GUEST, 9), (GUEST, 8), (GUEST, 7), (GUEST, 7)], 3),
        (&[(GUEST, 9), (STRANGER, 8), (GUEST, 8)], 3),
        (&[(GUEST, 9), (STRANGER, 8), (STRANGER, 8)], 2),
        (&[(GUEST, 9), (STRANGER, 9)], 2),
        (&[(STRANGER, 9), (GUEST, 7), (STRANGER, 5), (GUEST, 7)], 3),
        (&[(GUEST, 4), (GUEST, 4), (GUEST, 3)], 1),
    ];
    for (ops, cut) in cases {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        m.create_domain(GUEST, domain(64, None)).unwrap();
        m.create_domain(STRANGER, domain(64, None)).unwrap();
        let e = Engine::new(Default::default(), &m).unwrap();
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        let reqs: Vec<MapRequest> = ops.iter().map(|&(d, g)| req(d, g)).collect();
        let mut out = vec![Err(Errno::Inval); reqs.len()];
        let n = e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out);
        assert_eq!(n, cut, "{ops:?}");
        assert!(out[..n].iter().all(|o| o.is_ok()), "{ops:?}: {out:?}");
        assert!(out[n..].iter().all(|o| *o == Err(Errno::Inval)), "{ops:?}");
        e.finish(&mut m, DomId::DOM0);
    }
}

/// Review 162: a run whose first op asks read-only and a later op asks
/// write-only is no alike run (`asked_of` packs read and write apart): the
/// later op's page is referenced writable, as its mapping is, so the
/// guest cannot type it as a page table while the device may write it.
/// Kills `asked_of` packing write where read is (`<< 24`).
#[test]
fn a_run_of_read_only_then_write_only_takes_a_writable_reference() {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    m.create_domain(GUEST, domain(64, None)).unwrap();
    let e = Engine::new(Default::default(), &m).unwrap();
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let mut ro = req(GUEST, 3);
    ro.perms = Permissions {
        read: true,
        write: false,
    };
    let mut wo = req(GUEST, 4);
    wo.perms = Permissions {
        read: false,
        write: true,
    };
    let reqs = [ro, wo];
    let mut out = [Err(Errno::Inval); 2];
    assert_eq!(e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out), 2);
    assert!(out.iter().all(|o| o.is_ok()), "{out:?}");
    let mfn = m.mfn_of(GUEST, Gfn(4)).unwrap();
    assert_eq!(
        m.set_pv_page_table(GUEST, mfn, true),
        Err(Errno::Inval),
        "a page a device may write typed as a page table: no writable reference"
    );
    let ro_mfn = m.mfn_of(GUEST, Gfn(3)).unwrap();
    assert_eq!(m.set_pv_page_table(GUEST, ro_mfn, true), Ok(()));
}
