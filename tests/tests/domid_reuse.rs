//! Review (domid reuse, 2026-12-06): the control domain's ops on another
//! domain's PV-IOMMU state (`SET_LIMITS`, `STATS`, `ENTRY`) ask XSM
//! `control` about the domain at a domid, then act on whatever state the
//! engine keeps for that domid. Between the two the checked domain can be
//! destroyed and a new one created at its domid (a label the caller may not
//! control): its quota is set, its counters read and reset, its entries
//! read, on a decision about another domain. Each test replaces the domain
//! right after the op's XSM check and fails before the fix.

use pviommu_abi::{
    cmd, stats_flag, Bfn, ContextId, DomId, Permissions, PvIommuEntry, PvIommuLimits, PvIommuStats,
    INTERFACE_VERSION,
};
use pviommu_hv::platform::{Platform, XsmAction};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;
use zerocopy::{FromZeros, IntoBytes};

const EPERM: i64 = -1;
const ESRCH: i64 = -3;

/// Another CPU (the toolstack): kill the device model, create a new one
/// at its domid that the caller's policy keeps out of reach (FLASK: a
/// label dom0 may not `control`), and let the new one map `pages` of
/// [`GUEST`] (in `context`, created first, if not the default). dom0's
/// call goes on as dom0.
fn replaced_device_model(e: &Engine, context: ContextId, pages: u64) -> pviommu_tests::Race<'_> {
    Box::new(move |m: &mut SimMachine| {
        m.kill_domain(e, DEVICE_MODEL);
        assert!(!m.has_domain(DEVICE_MODEL));
        protected_device_model(m, e, context, pages);
    })
}

/// A new device model at [`DEVICE_MODEL`]'s domid (gone), that dom0's
/// policy keeps out of reach, mapping `pages` of [`GUEST`] in `context`.
fn protected_device_model(m: &mut SimMachine, e: &Engine, context: ContextId, pages: u64) {
    {
        let spec = DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: Some(GUEST),
        };
        m.create_domain(DEVICE_MODEL, spec).unwrap();
        m.xsm_protect(DEVICE_MODEL);
        if context != ContextId::DEFAULT {
            assert_eq!(e.context_create(m, DEVICE_MODEL), Ok(context));
        }
        for g in 1..=pages {
            let mut ops = [map_op_in(context, GUEST, g, Permissions::RW)];
            m.guest_batch_all(e, DEVICE_MODEL, &mut ops).unwrap();
            assert_eq!(ops[0].status, 0);
        }
        m.current = DomId::DOM0;
    }
}

/// Where a new device model's first map into its context 1 lands (the
/// BFN [`replaced_device_model`] maps at), learnt on a twin machine.
fn successors_first_bfn() -> Bfn {
    let (mut m, e) = machine(Format::Vtd, 16);
    replaced_device_model(&e, ContextId(1), 1)(&mut m);
    let st = e.state();
    let view = st.live_mappings(DEVICE_MODEL).next().expect("mapped");
    assert_eq!(view.mapping.context, ContextId(1));
    view.bfn
}

/// An `ENTRY` request for [`DEVICE_MODEL`]'s context 1 at `bfn`.
fn entry_of_context_1(bfn: Bfn) -> PvIommuEntry {
    PvIommuEntry {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        context: 1,
        bfn: bfn.0,
        ..PvIommuEntry::default()
    }
}

/// dom0's call `command` with `req` in its scratch memory, `race` run
/// right after the op's XSM `control` check: the call's answer and what
/// it wrote back.
fn control_call_racing<'a, T: IntoBytes + FromZeros + zerocopy::FromBytes + zerocopy::Immutable>(
    m: &'a mut SimMachine,
    e: &'a Engine,
    command: u32,
    req: &T,
    race: pviommu_tests::Race<'a>,
) -> (i64, T) {
    control_call_racing_at(
        m,
        e,
        command,
        req,
        |_| Service::XsmCheck(XsmAction::Control),
        race,
    )
}

/// [`control_call_racing`] with `race` run at `at(address of the
/// argument)`.
fn control_call_racing_at<
    'a,
    T: IntoBytes + FromZeros + zerocopy::FromBytes + zerocopy::Immutable,
>(
    m: &'a mut SimMachine,
    e: &'a Engine,
    command: u32,
    req: &T,
    at: impl FnOnce(u64) -> Service,
    race: pviommu_tests::Race<'a>,
) -> (i64, T) {
    let base = m.scratch_addr(DomId::DOM0).unwrap();
    m.current = DomId::DOM0;
    m.copy_to_guest(base, req.as_bytes()).unwrap();
    let rc = {
        let mut h = Interposer::new(m, at(base), race);
        e.hypercall(&mut h, DomId::DOM0, command, base)
    };
    let mut out = T::new_zeroed();
    m.current = DomId::DOM0;
    m.copy_from_guest(base, out.as_mut_bytes()).unwrap();
    (rc, out)
}

/// `STATS` (with `RESET`) of the device model, which dies and is replaced
/// right after the XSM check. Before the fix dom0 read the new domain's
/// counters (3 live mappings, 3 maps) and reset them, with `control`
/// decided on the old domain.
#[test]
fn stats_of_a_domain_replaced_after_its_check_read_nothing_of_the_new_one() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let req = PvIommuStats {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        flags: stats_flag::RESET,
        ..PvIommuStats::default()
    };
    let race = replaced_device_model(&e, ContextId::DEFAULT, 3);
    let (rc, out) = control_call_racing(&mut m, &e, cmd::STATS, &req, race);
    assert_eq!(e.stats(DEVICE_MODEL).live, 3, "the new domain maps 3 pages");
    assert_eq!(
        e.stats(DEVICE_MODEL).counters.maps,
        3,
        "the new domain's counters were reset by a call checked on the old one"
    );
    assert_eq!(out.live, 0, "the new domain's counters were read");
    assert_eq!(rc, EPERM, "answered for a domain it may not control");
}

/// `ENTRY` of the device model's context 1, the domain replaced right
/// after the XSM check by one whose context 1 maps a page at that BFN.
/// Before the fix dom0 read the new domain's leaf entry.
#[test]
fn entry_of_a_domain_replaced_after_its_check_reads_nothing_of_the_new_one() {
    let bfn = successors_first_bfn();
    let (mut m, e) = machine(Format::Vtd, 16);
    let req = entry_of_context_1(bfn);
    let race = replaced_device_model(&e, ContextId(1), 1);
    let (rc, out) = control_call_racing(&mut m, &e, cmd::ENTRY, &req, race);
    assert!(
        e.entry_bits(&mut m, DEVICE_MODEL, ContextId(1), Bfn(bfn.0))
            .is_ok(),
        "the new domain maps that BFN"
    );
    assert_eq!(out.bits, 0, "the new domain's entry was read");
    assert_eq!(rc, EPERM, "answered for a domain it may not control");
}

/// `SET_LIMITS` of the device model, replaced right after the XSM check:
/// before the fix the new domain got the quota (`design/xen-integration.md`
/// "Known gaps" wrote it down).
#[test]
fn a_quota_set_for_a_domain_replaced_after_its_check_is_not_the_new_ones() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let default_quota = e.stats(DEVICE_MODEL).quota;
    let req = PvIommuLimits {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        _pad0: 0,
        quota: 7,
    };
    let race = replaced_device_model(&e, ContextId::DEFAULT, 0);
    let (rc, _) = control_call_racing(&mut m, &e, cmd::SET_LIMITS, &req, race);
    assert_eq!(
        e.stats(DEVICE_MODEL).quota,
        default_quota,
        "the new domain got a quota its checks never saw"
    );
    assert_eq!(rc, EPERM, "answered for a domain it may not control");
}

/// `SET_LIMITS` of the device model, which is replaced between the op's
/// last check of the domid's life and its store, the new domain's quota
/// set by the toolstack meanwhile (9): the store must not land on the new
/// domain. Before the fix (a quota kept apart from the life) it did, then
/// saw the life moved and took its store back to the default: the new
/// domain lost the quota it was given (`design/xen-integration.md`,
/// "Known gaps", until 2026-12-06).
#[test]
fn a_quota_stored_after_its_domain_was_replaced_leaves_the_new_ones() {
    use pviommu_hv::platform::RacePoint;
    let (mut m, e) = machine(Format::Vtd, 16);
    let req = PvIommuLimits {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        _pad0: 0,
        quota: 7,
    };
    let race: pviommu_tests::Race<'_> = Box::new(|m: &mut SimMachine| {
        replaced_device_model(&e, ContextId::DEFAULT, 0)(m);
        e.set_quota(m, DEVICE_MODEL, Some(9)).unwrap();
        m.current = DomId::DOM0;
    });
    let (rc, _) = control_call_racing_at(
        &mut m,
        &e,
        cmd::SET_LIMITS,
        &req,
        |_| Service::At(RacePoint::BeforeQuotaStore),
        race,
    );
    assert_eq!(
        e.stats(DEVICE_MODEL).quota,
        9,
        "the new domain's quota was overwritten by a call checked on the old one"
    );
    assert_eq!(rc, EPERM, "answered for a domain it may not control");
}

/// A device model whose PV-IOMMU teardown has ended but which Xen has not
/// destroyed yet (a zombie: the teardown is early in `domain_kill()`, and
/// references can keep the domain in the hash for long after), replaced
/// right after the XSM check of a control op by a new device model, out
/// of dom0's reach, that maps a page in its context 1: the op's answer and
/// what it wrote back (`read`: the counters' `live`, the entry's bits, 0
/// for limits). The ops refuse a dying domain at their checks (`ESRCH`),
/// so none acts on the new one. Before, they took a dying domain, and the
/// life number, moved at the zombie's teardown end, did not move again:
/// dom0 read and reset the new domain's counters, read its entry and set
/// its quota (a review's finding; each test below failed).
fn control_op_on_a_replaced_zombie(command: u32) -> (i64, u64) {
    use std::cell::Cell;
    let bfn = successors_first_bfn();
    let (mut m, e) = machine(Format::Vtd, 16);
    zombie_device_model(&mut m, &e);
    let raced = Cell::new(false);
    let race: pviommu_tests::Race<'_> = Box::new(|m: &mut SimMachine| {
        raced.set(true);
        m.destroy_domain(DEVICE_MODEL);
        protected_device_model(m, &e, ContextId(1), 1);
    });
    let (rc, read) = match command {
        cmd::STATS => {
            let req = PvIommuStats {
                version: INTERFACE_VERSION,
                domid: DEVICE_MODEL.0,
                flags: stats_flag::RESET,
                ..PvIommuStats::default()
            };
            let (rc, out) = control_call_racing(&mut m, &e, command, &req, race);
            (rc, out.live)
        }
        cmd::ENTRY => {
            let req = entry_of_context_1(bfn);
            let (rc, out) = control_call_racing(&mut m, &e, command, &req, race);
            (rc, out.bits)
        }
        _ => {
            let req = PvIommuLimits {
                version: INTERFACE_VERSION,
                domid: DEVICE_MODEL.0,
                _pad0: 0,
                quota: 7,
            };
            (control_call_racing(&mut m, &e, command, &req, race).0, 0)
        }
    };
    assert!(
        !raced.get(),
        "command {command}: past the checks of a zombie"
    );
    (rc, read)
}

#[test]
fn stats_never_reads_the_successor_of_a_zombie() {
    assert_eq!(control_op_on_a_replaced_zombie(cmd::STATS), (ESRCH, 0));
}

#[test]
fn entry_never_reads_the_successor_of_a_zombie() {
    assert_eq!(control_op_on_a_replaced_zombie(cmd::ENTRY), (ESRCH, 0));
}

#[test]
fn set_limits_never_sets_the_successors_quota_of_a_zombie() {
    assert_eq!(control_op_on_a_replaced_zombie(cmd::SET_LIMITS), (ESRCH, 0));
}

/// [`DEVICE_MODEL`] maps a page of [`GUEST`] in its context 1, is marked
/// dying and its PV-IOMMU teardown runs to its end; Xen has not destroyed
/// it (it stays in the simulator's domains, dying).
fn zombie_device_model(m: &mut SimMachine, e: &Engine) {
    assert_eq!(e.context_create(m, DEVICE_MODEL), Ok(ContextId(1)));
    let mut ops = [map_op_in(ContextId(1), GUEST, 1, Permissions::RW)];
    m.guest_batch_all(e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    m.current = DomId::DOM0;
    m.mark_dying(DEVICE_MODEL);
    let mut cursor = 0;
    while e.domain_teardown(m, DEVICE_MODEL, &mut cursor).is_err() {}
    assert!(m.has_domain(DEVICE_MODEL));
}

/// Pages the test below maps: enough that its first teardown slice is not
/// the end.
const PAGES: u64 = 10_000;

/// A `STATS` reset of a device model that starts dying between the read
/// and the reset (another CPU's first teardown slice, right before the
/// copy-out): still the domain checked, whose counters it read, so the
/// reset takes them off. (With the life number moved at the teardown's
/// start too, as it first was, the reset found every cell of another life
/// and took nothing off, yet answered 0: a review's finding.)
#[test]
fn a_stats_reset_of_a_domain_starting_to_die_still_resets() {
    let (mut m, e) = machine(Format::Vtd, PAGES);
    for first in (0..PAGES).step_by(100) {
        let mut ops: Vec<_> = (first..first + 100)
            .map(|g| map_op(GUEST, g, Permissions::RW))
            .collect();
        m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    }
    m.current = DomId::DOM0;
    let req = PvIommuStats {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        flags: stats_flag::RESET,
        ..PvIommuStats::default()
    };
    let race: pviommu_tests::Race<'_> = Box::new(|m: &mut SimMachine| {
        m.mark_dying(DEVICE_MODEL);
        let mut cursor = 0;
        assert!(e.domain_teardown(m, DEVICE_MODEL, &mut cursor).is_err());
    });
    let (rc, out) = control_call_racing_at(
        &mut m,
        &e,
        cmd::STATS,
        &req,
        Service::CopyToGuestRacing,
        race,
    );
    assert_eq!(rc, 0);
    assert_eq!(out.maps, PAGES);
    assert_eq!(
        e.stats(DEVICE_MODEL).counters.maps,
        0,
        "reported, then not reset"
    );
}

/// The device model's maps of the guest's gfns `gfns`, every one
/// succeeding: their BFNs.
fn device_model_maps(m: &mut SimMachine, e: &Engine, gfns: std::ops::Range<u64>) -> Vec<Bfn> {
    let mut ops: Vec<_> = gfns.map(|g| map_op(GUEST, g, Permissions::RW)).collect();
    m.guest_batch_all(e, DEVICE_MODEL, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    ops.iter().map(|o| Bfn(o.bfn)).collect()
}

/// A review of 2026-12-07: a STATS reset takes exactly what it reports.
/// The device model made 4 maps; dom0's reset reads them, and `race` runs
/// before its copy-out; then the device model's maps counted since. Before,
/// the reset took the values it read off the cells it found afterwards, so
/// a second reset in between took the same 4 again, and a cell given back
/// and claimed again in between had 4 of its own new counts taken unseen.
fn maps_counted_after_a_reset_raced_by(race: impl FnOnce(&mut SimMachine, &Engine, &[Bfn])) -> u64 {
    let (mut m, e) = machine(Format::Vtd, 16);
    let bfns = device_model_maps(&mut m, &e, 0..4);
    let req = PvIommuStats {
        version: INTERFACE_VERSION,
        domid: DEVICE_MODEL.0,
        flags: stats_flag::RESET,
        ..PvIommuStats::default()
    };
    let e2 = &e;
    let bfns2 = &bfns;
    let race: pviommu_tests::Race<'_> = Box::new(move |m: &mut SimMachine| {
        race(m, e2, bfns2);
        // (The reset's copy-out is dom0's.)
        m.current = DomId::DOM0;
    });
    let (rc, out) = control_call_racing_at(
        &mut m,
        &e,
        cmd::STATS,
        &req,
        Service::CopyToGuestRacing,
        race,
    );
    assert_eq!((rc, out.maps), (0, 4));
    e.stats(DEVICE_MODEL).counters.maps
}

#[test]
fn two_stats_resets_at_once_take_each_count_once() {
    let maps = maps_counted_after_a_reset_raced_by(|m, e, _| {
        let other = m.scratch_addr(DomId::DOM0).unwrap() + 0x800;
        let req = PvIommuStats {
            version: INTERFACE_VERSION,
            domid: DEVICE_MODEL.0,
            flags: stats_flag::RESET,
            ..PvIommuStats::default()
        };
        m.current = DomId::DOM0;
        m.copy_to_guest(other, req.as_bytes()).unwrap();
        assert_eq!(e.hypercall(m, DomId::DOM0, cmd::STATS, other), 0);
        device_model_maps(m, e, 4..9);
    });
    assert_eq!(maps, 5, "maps made after both resets were taken");
}

#[test]
fn a_stats_reset_takes_nothing_of_a_cell_claimed_since_its_read() {
    let maps = maps_counted_after_a_reset_raced_by(|m, e, bfns| {
        let mut ops: Vec<_> = bfns.iter().map(|&b| unmap_op(b)).collect();
        m.guest_batch_all(e, DEVICE_MODEL, &mut ops).unwrap();
        assert!(ops.iter().all(|o| o.status == 0));
        e.finish(m, DEVICE_MODEL);
        assert_eq!(e.stats(DEVICE_MODEL).counters.maps, 0, "the cell went idle");
        device_model_maps(m, e, 4..9);
    });
    assert_eq!(maps, 5, "maps of the cell claimed since were taken");
}
