//! 2 MiB extents (ABI 1.6, `op_flags::EXTENT_2M`): a map of 512 frames of a
//! target at 512 BFNs in a row on a 2 MiB boundary, all or nothing; an
//! unmap of 512 BFNs, all checked first. Each page is a mapping of its own
//! afterwards: hooks revoke it, single unmaps drop it.

use pviommu_abi::{
    feature, op_flags, Bfn, ContextId, DomId, Errno, Gfn, MapRequest, Permissions, PvIommuOp,
    Request, EXTENT_PAGES,
};
use pviommu_hv::engine::GfnChange;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;

/// The guest's first aligned extent past dom0's frames: gfn 512 is frame
/// 1024 (dom0 has 512 pages), so its 512 frames are one aligned run.
const EXTENT: u64 = 512;

fn host() -> (SimMachine, Engine) {
    machine_after_dom0(Format::Vtd, 2048, 512)
}

fn extent_map(context: ContextId, gfn: u64, perms: Permissions) -> PvIommuOp {
    Request::MapExtent(map_request_in(context, GUEST, gfn, perms)).encode()
}

fn extent_unmap(context: ContextId, bfn: Bfn) -> PvIommuOp {
    Request::UnmapExtent { context, bfn }.encode()
}

/// Run one op as dom0: its status and the op as returned.
fn run(m: &mut SimMachine, e: &Engine, op: PvIommuOp) -> (i32, PvIommuOp) {
    let mut ops = [op];
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    (ops[0].status, ops[0])
}

fn create_context(m: &mut SimMachine, e: &Engine) -> ContextId {
    let (status, out) = run(m, e, Request::ContextCreate.encode());
    assert_eq!(status, 0);
    ContextId(out.context)
}

/// Dom0 maps the guest's extent from [`EXTENT`] in one batch whose result
/// cannot be copied out (`EFAULT`), `race` running at that moment (another
/// CPU): the hypercall's answer.
fn extent_map_with_failing_copy_out<'a>(
    m: &'a mut SimMachine,
    e: &'a Engine,
    race: Race<'a>,
) -> i64 {
    let op = extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW);
    let (base, ops_addr) = stage_batch(m, DomId::DOM0, &[op]);
    let mut h = Interposer::new(m, Service::CopyToGuestAt(ops_addr), race);
    e.hypercall(&mut h, DomId::DOM0, pviommu_abi::cmd::BATCH, base)
}

/// Every page of the extent from `gfn` at `bfn` translates to its frame in
/// `context`, and the device reads the guest's bytes there.
fn assert_mapped(m: &mut SimMachine, context: ContextId, bfn: Bfn, gfn: u64) {
    for i in (0..EXTENT_PAGES).step_by(73).chain([EXTENT_PAGES - 1]) {
        let at = Bfn(bfn.0 + i);
        assert_eq!(
            m.translate(DomId::DOM0, context, at).map(|t| t.0),
            m.mfn_of(GUEST, Gfn(gfn + i)),
            "page {i}"
        );
        assert_eq!(
            m.dma_read(DomId::DOM0, context, at.0 << 12, 64).unwrap(),
            pattern(gfn + i)
        );
    }
}

fn assert_unmapped(m: &SimMachine, context: ContextId, bfn: Bfn) {
    for i in 0..EXTENT_PAGES {
        assert_eq!(m.translate(DomId::DOM0, context, Bfn(bfn.0 + i)), None);
    }
}

#[test]
fn caps_offer_extents() {
    let (mut m, e) = host();
    let ci = pviommu_hv::platform::Platform::domain_info(&m, DomId::DOM0).unwrap();
    let caps = e.caps(&m, DomId::DOM0, &ci);
    assert_ne!(caps.features & feature::EXTENTS_2M, 0);
    let _ = &mut m;
}

/// In context 0 an extent is one Xen call, one superpage entry; its BFNs
/// are 512 in a row from a multiple of 512, each the page's; one unmap op
/// clears it in one call, and every reference goes with the flush.
#[test]
fn an_extent_maps_at_one_aligned_run_in_one_call_and_unmaps_in_one() {
    let (mut m, e) = host();
    let refs = m.total_page_refs();
    let (calls, superpages) = (m.map_calls, m.superpage_maps);
    let (status, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, 0);
    let bfn = Bfn(out.bfn);
    assert_eq!(bfn.0 % EXTENT_PAGES, 0, "on a 2 MiB boundary");
    assert_eq!(m.map_calls - calls, 1, "one call");
    assert_eq!(m.superpage_maps - superpages, 1, "one superpage entry");
    assert_mapped(&mut m, ContextId::DEFAULT, bfn, EXTENT);
    assert_eq!(m.total_page_refs(), refs + 2 * EXTENT_PAGES);
    check_invariants(&mut m, &e).unwrap();
    // Each BFN is a page of its own.
    let (status, look) = run(
        &mut m,
        &e,
        Request::Lookup {
            context: ContextId::DEFAULT,
            bfn: Bfn(bfn.0 + 7),
        }
        .encode(),
    );
    assert_eq!((status, look.domid, look.gfn), (0, GUEST.0, EXTENT + 7));

    let (calls, superpages) = (m.unmap_calls, m.superpage_unmaps);
    let (status, _) = run(&mut m, &e, extent_unmap(ContextId::DEFAULT, bfn));
    assert_eq!(status, 0);
    assert_eq!(m.unmap_calls - calls, 1);
    assert_eq!(m.superpage_unmaps - superpages, 1);
    assert_unmapped(&m, ContextId::DEFAULT, bfn);
    assert_eq!(m.total_page_refs(), refs);
    assert_eq!(e.target_active(GUEST), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// The same into a context of the engine's own tables, and the extent's
/// BFNs are taken again by the next extent once released.
#[test]
fn an_extent_maps_into_an_engine_context_and_its_bfns_come_back() {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    let refs = m.total_page_refs();
    let (status, out) = run(&mut m, &e, extent_map(ctx, EXTENT, Permissions::RO));
    assert_eq!(status, 0);
    let bfn = Bfn(out.bfn);
    assert_eq!(bfn.0 % EXTENT_PAGES, 0);
    assert_mapped(&mut m, ctx, bfn, EXTENT);
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(run(&mut m, &e, extent_unmap(ctx, bfn)).0, 0);
    assert_unmapped(&m, ctx, bfn);
    assert_eq!(m.total_page_refs(), refs);
    let (status, again) = run(&mut m, &e, extent_map(ctx, 2 * EXTENT, Permissions::RO));
    assert_eq!(status, 0);
    assert_eq!(again.bfn, bfn.0, "the released block is taken again");
    assert_mapped(&mut m, ctx, Bfn(again.bfn), 2 * EXTENT);
    check_invariants(&mut m, &e).unwrap();
}

/// After page maps took BFNs at random places, an extent still gets an
/// aligned run (fresh slots from the next multiple of 512; those skipped
/// stay free for page maps).
#[test]
fn an_extent_after_page_maps_still_gets_an_aligned_run() {
    let (mut m, e) = host();
    for g in [3, 40, 41, 1500] {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    let (status, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, 0);
    assert_eq!(out.bfn % EXTENT_PAGES, 0);
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(out.bfn), EXTENT);
    // A page map after it takes a skipped slot, below the extent.
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, 7, Permissions::RW).unwrap();
    assert!(b.0 < out.bfn, "{b:?}");
    check_invariants(&mut m, &e).unwrap();
}

/// Refused with nothing changed: frames that are not one machine run
/// (`EXDEV`), a page that is not the guest's RAM, another domain's guest
/// the caller may not map, an unaligned or grant extent, or one past the
/// frame numbers (`EINVAL`, at parsing).
#[test]
fn a_refused_extent_changes_nothing() {
    let (mut m, e) = host();
    // Gfn 600's frame replaced: the extent from 512 is no machine run.
    m.replace_page(&e, GUEST, Gfn(600)).unwrap();
    let before = observable(&m, &e);
    let active = e.target_active(GUEST);
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, Errno::XDev.negated());
    assert_eq!(observable(&m, &e), before);
    assert_eq!(e.target_active(GUEST), active);
    // Past the guest's RAM (it has 2048 pages).
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, 2048, Permissions::RW),
    );
    assert_eq!(
        status,
        Errno::Nxio.negated(),
        "as a page map of a gfn with no RAM"
    );
    assert_eq!(observable(&m, &e), before);
    // A stranger may not call at all; the guest's device model may not
    // map the stranger.
    let mut ops = [extent_map(ContextId::DEFAULT, EXTENT * 2, Permissions::RW)];
    assert_eq!(m.guest_batch_all(&e, STRANGER, &mut ops), Err(Errno::Perm));
    let mut ops = [Request::MapExtent(map_request_in(
        ContextId::DEFAULT,
        STRANGER,
        0,
        Permissions::RW,
    ))
    .encode()];
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!(ops[0].status, Errno::Perm.negated());
    assert_eq!(observable(&m, &e), before);
    let good = extent_map(ContextId::DEFAULT, EXTENT * 2, Permissions::RW);
    for bad in [
        PvIommuOp {
            gfn: EXTENT * 2 + 8,
            ..good
        },
        PvIommuOp {
            flags: good.flags | op_flags::GRANT,
            ..good
        },
        PvIommuOp {
            gfn: u64::MAX - EXTENT_PAGES + 1,
            ..good
        },
        PvIommuOp { bfn: 512, ..good },
    ] {
        assert_eq!(run(&mut m, &e, bad).0, Errno::Inval.negated(), "{bad:?}");
    }
    assert_eq!(observable(&m, &e), before);
    assert_eq!(e.target_active(GUEST), active);
    check_invariants(&mut m, &e).unwrap();
}

/// The engine's own entry point checks what parsing checks.
#[test]
fn the_engine_refuses_an_unaligned_extent_itself() {
    let (mut m, e) = host();
    let ci = pviommu_hv::platform::Platform::domain_info(&m, DomId::DOM0).unwrap();
    for gfn in [EXTENT + 1, u64::MAX - 511] {
        let req = MapRequest {
            gfn: Gfn(gfn),
            ..map_request_in(ContextId::DEFAULT, GUEST, 0, Permissions::RW)
        };
        assert_eq!(
            e.map_extent(&mut m, DomId::DOM0, &ci, &req),
            Err(Errno::Inval)
        );
    }
}

/// An extent the context maps in part (a page map of one of its pages) is
/// `EBUSY`; one it maps whole at the same run is shared (each page one
/// reference more), and goes with its last unmap.
#[test]
fn an_extent_mapped_in_part_is_busy_and_whole_is_shared() {
    let (mut m, e) = host();
    let page = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 9, Permissions::RW).unwrap();
    let before = observable(&m, &e);
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, Errno::Busy.negated());
    assert_eq!(observable(&m, &e), before);
    // Another access is another mapping: not in the way.
    let (status, ro) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RO),
    );
    assert_eq!(status, 0);
    assert_eq!(run(&mut m, &e, unmap_op(page)).0, 0);

    let (status, first) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RO),
    );
    assert_eq!((status, first.bfn), (0, ro.bfn), "shared");
    let refs = m.total_page_refs();
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(ro.bfn))).0,
        0
    );
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(ro.bfn), EXTENT);
    assert_eq!(m.total_page_refs(), refs, "one reference each left");
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(ro.bfn))).0,
        0
    );
    assert_unmapped(&m, ContextId::DEFAULT, Bfn(ro.bfn));
    check_invariants(&mut m, &e).unwrap();
}

/// An extent unmap checks every BFN before it drops any: one already
/// unmapped on its own, or not the caller's, refuses the op whole.
#[test]
fn an_extent_unmap_checks_every_bfn_first() {
    let (mut m, e) = host();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let bfn = Bfn(out.bfn);
    assert_eq!(run(&mut m, &e, unmap_op(Bfn(bfn.0 + 300))).0, 0);
    let before = observable(&m, &e);
    let (status, _) = run(&mut m, &e, extent_unmap(ContextId::DEFAULT, bfn));
    assert_eq!(status, Errno::NoEnt.negated());
    assert_eq!(observable(&m, &e), before);
    // Not an extent's first BFN, past the window, in a context not made.
    for bad in [
        extent_unmap(ContextId::DEFAULT, Bfn(bfn.0 + 8)),
        extent_unmap(
            ContextId::DEFAULT,
            Bfn(e.window().end & !(EXTENT_PAGES - 1)),
        ),
        extent_unmap(ContextId::DEFAULT, Bfn(!(EXTENT_PAGES - 1))),
        extent_unmap(ContextId(3), bfn),
    ] {
        assert_ne!(run(&mut m, &e, bad).0, 0);
    }
    assert_eq!(observable(&m, &e), before);
    // Another driver domain cannot unmap it.
    let mut ops = [extent_unmap(ContextId::DEFAULT, bfn)];
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!(ops[0].status, Errno::NoEnt.negated());
    assert_eq!(observable(&m, &e), before);
    check_invariants(&mut m, &e).unwrap();
}

/// A page of an extent the guest gives up is revoked on its own (a
/// notice for its BFN); the extent's unmap then drops the rest and
/// acknowledges it (`ESTALE`), leaving no notice.
#[test]
fn a_revoked_page_of_an_extent_is_acknowledged_by_its_unmap() {
    let (mut m, e) = host();
    let refs = m.total_page_refs();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let bfn = Bfn(out.bfn);
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 88)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Ok((Bfn(bfn.0 + 88), GUEST, Gfn(EXTENT + 88)))
    );
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(bfn.0 + 88)),
        None
    );
    check_invariants(&mut m, &e).unwrap();
    let (status, _) = run(&mut m, &e, extent_unmap(ContextId::DEFAULT, bfn));
    assert_eq!(status, Errno::Stale.negated());
    assert_unmapped(&m, ContextId::DEFAULT, bfn);
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Err(Errno::NoEnt.negated())
    );
    // The ballooned page's frame is gone; the rest are released.
    assert_eq!(m.total_page_refs(), refs);
    check_invariants(&mut m, &e).unwrap();
}

/// An extent counts 512 against the quota: refused whole past it.
#[test]
fn an_extent_over_the_quota_is_refused_whole() {
    let (mut m, e) = host();
    e.set_quota(&mut m, DomId::DOM0, Some(600)).unwrap();
    for g in 0..100 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    let before = observable(&m, &e);
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, Errno::NoSpc.negated());
    assert_eq!(observable(&m, &e), before);
    e.set_quota(&mut m, DomId::DOM0, Some(612)).unwrap();
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, 0, "100 + 512 fit a quota of 612");
    check_invariants(&mut m, &e).unwrap();
}

/// A context of the engine's own whose table cannot be allocated refuses
/// the extent with nothing changed (the page references and gate shares
/// of its 512 lookups given back).
#[test]
fn an_extent_whose_table_cannot_be_allocated_is_refused_whole() {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    let refs = m.total_page_refs();
    m.fail_table_allocs(Some(0));
    let (status, _) = run(&mut m, &e, extent_map(ctx, EXTENT, Permissions::RW));
    m.fail_table_allocs(None);
    assert_eq!(status, Errno::NoMem.negated());
    assert_eq!(m.total_page_refs(), refs);
    assert_eq!(e.target_active(GUEST), 0);
    assert_eq!(e.context_state(DomId::DOM0, ctx).unwrap().used(), 0);
    check_invariants(&mut m, &e).unwrap();
    let (status, _) = run(&mut m, &e, extent_map(ctx, EXTENT, Permissions::RW));
    assert_eq!(status, 0);
    check_invariants(&mut m, &e).unwrap();
}

/// An extent map whose result cannot be copied out is undone: its 512
/// references go, and a page the caller had mapped before keeps its own.
#[test]
fn an_extent_map_that_cannot_be_reported_is_undone() {
    let (mut m, e) = host();
    let refs = m.total_page_refs();
    let ret = extent_map_with_failing_copy_out(&mut m, &e, Box::new(|_: &mut SimMachine| {}));
    assert_eq!(ret, Errno::Fault.negated() as i64);
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.total_page_refs(), refs);
    assert_eq!(e.target_active(GUEST), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// A shared extent's failed report drops only the reference it added.
#[test]
fn a_shared_extent_map_that_cannot_be_reported_drops_one_reference() {
    let (mut m, e) = host();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let refs = m.total_page_refs();
    let before = observable(&m, &e);
    let ret = extent_map_with_failing_copy_out(&mut m, &e, Box::new(|_: &mut SimMachine| {}));
    assert_eq!(ret, Errno::Fault.negated() as i64);
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.total_page_refs(), refs);
    assert_eq!(observable(&m, &e), before);
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(out.bfn), EXTENT);
    check_invariants(&mut m, &e).unwrap();
}

/// Security review of ABI 1.6 (S1): the undo of a *shared* extent whose
/// report failed must leave alone a mapping made since at one of its BFNs.
/// Between the share and the failed copy-out the guest's page 5 of the
/// extent is replaced (its mapping revoked), another vCPU of the mediator
/// acknowledges the notice and maps the page's new frame, which the free
/// list puts in the same slot. Before, the undo matched that mapping by its
/// key and took it down: a BFN another vCPU was told, unmapped and freed
/// without a notice.
#[test]
fn a_shared_extents_undo_leaves_a_mapping_made_since_at_its_bfns() {
    let (mut m, e) = host();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let first = Bfn(out.bfn);
    let again = std::cell::Cell::new(None);
    let ret = extent_map_with_failing_copy_out(
        &mut m,
        &e,
        Box::new(|m: &mut SimMachine| {
            m.replace_page(&e, GUEST, Gfn(EXTENT + 5)).unwrap();
            m.current = DomId::DOM0;
            e.finish(m, DomId::DOM0);
            let (b, _, _) = revoked_next(m, &e, DomId::DOM0).unwrap();
            assert_eq!(ack_revoked(m, &e, DomId::DOM0, b), 0);
            again.set(Some(
                map_one(m, &e, DomId::DOM0, GUEST, EXTENT + 5, Permissions::RW).unwrap(),
            ));
            m.current = DomId::DOM0;
        }),
    );
    assert_eq!(ret, Errno::Fault.negated() as i64);
    e.finish(&mut m, DomId::DOM0);
    let b = again.get().expect("the race ran");
    assert_eq!(b, Bfn(first.0 + 5), "the other vCPU was given the same BFN");
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, b).map(|t| t.0),
        m.mfn_of(GUEST, Gfn(EXTENT + 5)),
        "the undo took down a mapping another vCPU was told about"
    );
    // The other pages are back to the first map's one reference each.
    let st = e.state();
    let dd = st.driver(DomId::DOM0).unwrap();
    let refs: Vec<u32> = dd
        .slots()
        .filter_map(|(_, s)| match s {
            pviommu_hv::engine::Slot::Live(m) => Some(m.refs),
            _ => None,
        })
        .collect();
    assert_eq!(refs.len(), 512);
    assert!(refs.iter().all(|&r| r == 1), "{refs:?}");
    drop(st);
    check_invariants(&mut m, &e).unwrap();
}

/// Second security review of ABI 1.6: a page of the extent whose gfn now
/// has another frame (its hook not run yet) is revoked on the way, as a
/// page map revokes it; a later page mapped already then refuses the
/// extent, and the books go back: the pages installed before it leave the
/// index, their slots go free, and nothing but that revocation is left.
#[test]
fn an_extent_refused_after_revoking_a_stale_page_leaves_only_that_revocation() {
    let (mut m, e) = host();
    // Page 3 mapped while its gfn had another frame, which then came back:
    // the mapping is of a frame the gfn no longer has, the extent is one
    // machine run again.
    m.swap_frames(GUEST, Gfn(EXTENT + 3), Gfn(1800)).unwrap();
    let stale = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 3, Permissions::RW).unwrap();
    m.swap_frames(GUEST, Gfn(EXTENT + 3), Gfn(1800)).unwrap();
    let kept = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 9, Permissions::RW).unwrap();
    let active = e.target_active(GUEST);
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, Errno::Busy.negated());
    // The stale mapping went (its page's reference with the flush), the
    // other stayed, nothing of the extent is left.
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, stale), None);
    assert!(m.translate(DomId::DOM0, ContextId::DEFAULT, kept).is_some());
    assert_eq!(e.target_active(GUEST), active - 1);
    let st = e.state();
    let dd = st.driver(DomId::DOM0).unwrap();
    assert_eq!(dd.live(), 1);
    drop(st);
    e.gfn_removed(&mut m, GUEST, Gfn(EXTENT + 3));
    m.current = DomId::DOM0;
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Ok((stale, GUEST, Gfn(EXTENT + 3)))
    );
    assert_eq!(ack_revoked(&mut m, &e, DomId::DOM0, stale), 0);
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Err(Errno::NoEnt.negated())
    );
    check_invariants(&mut m, &e).unwrap();
}

/// Second security review of ABI 1.6: a reserved range of the window
/// whose size is not a multiple of 512 shifts every later slot index
/// against its BFN. Fresh extent slots are taken where the BFN is aligned,
/// not the index: before, every extent past such a range was refused
/// (ENOSPC) whatever the quota.
#[test]
fn extents_past_a_reserved_range_of_odd_size_still_get_aligned_bfns() {
    let (mut m, probe) = host();
    let start = probe.window().start;
    drop(probe);
    m.add_reserved(pviommu_hv::platform::ReservedRange {
        start: start + 512,
        nr: 100,
        kind: pviommu_abi::region_kind::MMIO,
    });
    let e = Engine::new(pviommu_hv::config::Config::default(), &m).unwrap();
    let mut bfns = Vec::new();
    for gfn in [EXTENT, 2 * EXTENT] {
        let (status, out) = run(
            &mut m,
            &e,
            extent_map(ContextId::DEFAULT, gfn, Permissions::RW),
        );
        assert_eq!(status, 0, "extent from gfn {gfn:#x}");
        assert_eq!(out.bfn % EXTENT_PAGES, 0);
        assert!(out.bfn + EXTENT_PAGES <= start + 512 || out.bfn >= start + 612);
        assert_mapped(&mut m, ContextId::DEFAULT, Bfn(out.bfn), gfn);
        bfns.push(out.bfn);
    }
    assert_eq!(bfns, [start, start + 1024]);
    check_invariants(&mut m, &e).unwrap();
}

/// The cell's count of extent records and of mapped pages.
fn records(e: &Engine) -> (usize, usize) {
    let st = e.state();
    st.driver(DomId::DOM0)
        .map_or((0, 0), |d| (d.extent_records(), d.mapped_pages()))
}

/// An extent is one record in the index, not 512 page entries; a lookup by
/// gfn still finds each of its pages: a page map of the same access shares
/// the page's BFN, and the record goes with its last page.
#[test]
fn an_extent_is_one_record_whose_pages_a_page_map_shares() {
    let (mut m, e) = host();
    let (status, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, 0);
    assert_eq!(records(&e), (1, EXTENT_PAGES as usize));
    let shared = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 5, Permissions::RW).unwrap();
    assert_eq!(shared, Bfn(out.bfn + 5), "the extent's page, shared");
    // Another access is a mapping of its own, in the page index.
    let ro = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 5, Permissions::RO).unwrap();
    assert_ne!(ro.0 / EXTENT_PAGES, out.bfn / EXTENT_PAGES);
    assert_eq!(records(&e), (1, EXTENT_PAGES as usize + 1));
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(run(&mut m, &e, unmap_op(ro)).0, 0);
    assert_eq!(run(&mut m, &e, unmap_op(shared)).0, 0);
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(out.bfn), EXTENT);
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(out.bfn))).0,
        0
    );
    assert_eq!(records(&e), (0, 0));
    assert_eq!(e.target_active(GUEST), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// Two extents of the same guest range with other access are two records
/// of one chain: a removed page is revoked in both, and either record can
/// go first (the chain's second, then its head) with the other still found.
#[test]
fn two_records_of_one_extent_are_chained_and_each_is_revoked() {
    let (mut m, e) = host();
    let (_, rw) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let (status, ro) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RO),
    );
    assert_eq!(status, 0);
    assert_eq!(records(&e).0, 2);
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 3)).unwrap();
    m.current = DomId::DOM0;
    for bfn in [rw.bfn + 3, ro.bfn + 3] {
        assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(bfn)), None);
    }
    // Their other pages are still mapped.
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(rw.bfn), EXTENT);
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(ro.bfn), EXTENT);
    check_invariants(&mut m, &e).unwrap();
    // The first record (the chain's second) goes; the head is still found.
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(rw.bfn))).0,
        Errno::Stale.negated()
    );
    assert_eq!(records(&e).0, 1);
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 4)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(ro.bfn + 4)),
        None
    );
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0).map(|n| n.0),
        Ok(Bfn(ro.bfn + 3))
    );
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(ro.bfn))).0,
        Errno::Stale.negated()
    );
    // Both of its notices acknowledged by that unmap.
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Err(Errno::NoEnt.negated())
    );
    assert_eq!(records(&e), (0, 0));
    assert_eq!(e.target_active(GUEST), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// A page of an extent unmapped on its own frees its slot, which a page
/// map may take: that slot is then the new page's, never the extent's (a
/// lookup through the record checks the slot still is its page), so a
/// hook of the extent's page finds nothing and one of the new page
/// revokes it.
#[test]
fn a_slot_an_extent_gave_up_is_the_next_page_maps_not_the_extents() {
    let (mut m, e) = host();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let hole = Bfn(out.bfn + 10);
    assert_eq!(run(&mut m, &e, unmap_op(hole)).0, 0);
    assert_eq!(records(&e), (1, EXTENT_PAGES as usize - 1));
    // A page of another guest range takes the freed slot.
    let other = 40;
    let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, other, Permissions::RW).unwrap();
    assert_eq!(bfn, hole, "the freed slot, from the free list's head");
    check_invariants(&mut m, &e).unwrap();
    // The extent's old page: nothing of it is mapped any more.
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 10)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Err(Errno::NoEnt.negated())
    );
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, hole)
            .map(|t| t.0),
        m.mfn_of(GUEST, Gfn(other))
    );
    // The new page's removal revokes it at that BFN.
    m.balloon_out(&e, GUEST, Gfn(other)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Ok((hole, GUEST, Gfn(other)))
    );
    check_invariants(&mut m, &e).unwrap();
}

/// An extent unmap of a record one of whose pages has a second reference
/// (a page map shared it) goes page by page: that page stays mapped, the
/// record with it, until its last reference goes.
#[test]
fn an_extent_unmap_leaves_a_page_shared_since_and_its_record() {
    let (mut m, e) = host();
    let (_, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let shared = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 5, Permissions::RW).unwrap();
    assert_eq!(
        run(&mut m, &e, extent_unmap(ContextId::DEFAULT, Bfn(out.bfn))).0,
        0
    );
    assert_eq!(records(&e), (1, 1));
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, shared)
            .map(|t| t.0),
        m.mfn_of(GUEST, Gfn(EXTENT + 5))
    );
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(out.bfn + 6)),
        None
    );
    check_invariants(&mut m, &e).unwrap();
    // Its page is still found by gfn: a removal revokes it.
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 5)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(
        revoked_next(&mut m, &e, DomId::DOM0),
        Ok((shared, GUEST, Gfn(EXTENT + 5)))
    );
    assert_eq!(records(&e), (0, 0));
    assert_eq!(run(&mut m, &e, unmap_op(shared)).0, Errno::Stale.negated());
    check_invariants(&mut m, &e).unwrap();
}

/// A range hook over part of an extent mapped with two accesses (two
/// records of one chain) revokes the writable pages in the range, and only
/// those, with one look at the extent index for the range's 2 MiB block.
#[test]
fn a_range_hook_over_part_of_an_extent_revokes_its_pages_in_both_records() {
    let (mut m, e) = host();
    let (_, rw) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    let (_, ro) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RO),
    );
    let work = |e: &Engine| e.state().driver(DomId::DOM0).unwrap().range_work().0;
    let before = work(&e);
    // Gfns 64..68 of the extent lose write access (order 2: probed).
    e.gfn_changed(
        &mut m,
        GUEST,
        Gfn(EXTENT + 64),
        2,
        pviommu_hv::engine::GfnChange::WriteLost,
    );
    e.finish(&mut m, DomId::DOM0);
    for i in [63, 64, 66, 67, 68] {
        let revoked = (64..68).contains(&i);
        let at = |bfn: u64| m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(bfn + i));
        assert_eq!(at(rw.bfn).is_none(), revoked, "RW page {i}");
        assert!(at(ro.bfn).is_some(), "RO page {i} kept");
    }
    // One region probe, 4 page probes, one extent-index probe.
    assert_eq!(work(&e) - before, 1 + 4 + 1);
}

/// The engine's heap per page mapped by extents, at 16 Ki pages: a slot
/// each and a 512th of a record and of its index bucket, no page-index
/// entry (page maps: about 56 bytes, `hardening.rs` `d14_*`).
#[test]
fn an_extent_page_costs_its_slot_and_little_more() {
    let extents = 32u64;
    let (mut m, e) = machine_after_dom0(Format::Vtd, (extents + 1) * EXTENT_PAGES, 512);
    let mut ops: Vec<_> = (0..extents)
        .map(|i| {
            extent_map(
                ContextId::DEFAULT,
                EXTENT + i * EXTENT_PAGES,
                Permissions::RW,
            )
        })
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let pages = extents * EXTENT_PAGES;
    let st = e.state();
    let per = st.heap_bytes() as f64 / pages as f64;
    eprintln!(
        "engine heap: {} bytes for {pages} extent pages = {per:.1} B/page",
        st.heap_bytes()
    );
    assert!(per <= 36.0, "{per} bytes per page");
    assert_eq!(
        st.driver(DomId::DOM0).unwrap().extent_records(),
        extents as usize
    );
}

/// The level of the entry that maps `bfn` in dom0's `context` (2: a 2 MiB
/// superpage entry).
fn leaf_level(m: &SimMachine, context: ContextId, bfn: Bfn) -> Option<u32> {
    m.context_leaf(DomId::DOM0, context, bfn)
        .map(|(level, _)| level)
}

/// In a context of the engine's own, an extent of one aligned machine run
/// is one superpage entry. A page of it the guest gives up is revoked
/// with no memory to spare (the split takes the spare the map kept), the
/// other pages staying where they were; an owner's unmap of one page
/// splits the same way; the extent's unmap then drops the rest.
#[test]
fn an_aligned_extent_is_one_superpage_entry_in_an_engine_context() {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    let refs = m.total_page_refs();
    let (status, out) = run(&mut m, &e, extent_map(ctx, EXTENT, Permissions::RW));
    assert_eq!(status, 0);
    let bfn = Bfn(out.bfn);
    for i in [0, 300, EXTENT_PAGES - 1] {
        assert_eq!(leaf_level(&m, ctx, Bfn(bfn.0 + i)), Some(2), "page {i}");
    }
    assert_mapped(&mut m, ctx, bfn, EXTENT);
    check_invariants(&mut m, &e).unwrap();
    // Revoked with no table to be had.
    m.fail_table_allocs(Some(0));
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 300)).unwrap();
    m.fail_table_allocs(None);
    m.current = DomId::DOM0;
    assert_eq!(m.translate(DomId::DOM0, ctx, Bfn(bfn.0 + 300)), None);
    assert_eq!(leaf_level(&m, ctx, Bfn(bfn.0 + 301)), Some(1), "split");
    for i in [0, 299, 301, EXTENT_PAGES - 1] {
        assert_eq!(
            m.translate(DomId::DOM0, ctx, Bfn(bfn.0 + i)).map(|t| t.0),
            m.mfn_of(GUEST, Gfn(EXTENT + i)),
            "page {i}"
        );
    }
    assert_eq!(
        m.dma_read(DomId::DOM0, ctx, (bfn.0 + 301) << 12, 64)
            .unwrap(),
        pattern(EXTENT + 301)
    );
    check_invariants(&mut m, &e).unwrap();
    // A second extent, one of whose pages its owner unmaps alone.
    let (status, two) = run(&mut m, &e, extent_map(ctx, 2 * EXTENT, Permissions::RO));
    assert_eq!(status, 0);
    let two = Bfn(two.bfn);
    assert_eq!(leaf_level(&m, ctx, two), Some(2));
    m.fail_table_allocs(Some(0));
    let mut ops = [unmap_op_in(ctx, Bfn(two.0 + 5))];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    m.fail_table_allocs(None);
    assert_eq!(ops[0].status, 0);
    assert_eq!(m.translate(DomId::DOM0, ctx, Bfn(two.0 + 5)), None);
    assert_eq!(leaf_level(&m, ctx, Bfn(two.0 + 6)), Some(1));
    check_invariants(&mut m, &e).unwrap();
    // The first extent's unmap: the rest dropped, the revoked page
    // acknowledged.
    let (status, _) = run(&mut m, &e, extent_unmap(ctx, bfn));
    assert_eq!(status, Errno::Stale.negated());
    assert_unmapped(&m, ctx, bfn);
    // The second's pages one by one (its unmap op is refused: page 5 is
    // no mapping any more).
    assert_eq!(
        run(&mut m, &e, extent_unmap(ctx, two)).0,
        Errno::NoEnt.negated()
    );
    let mut ops: Vec<_> = (0..EXTENT_PAGES)
        .filter(|&i| i != 5)
        .map(|i| unmap_op_in(ctx, Bfn(two.0 + i)))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_unmapped(&m, ctx, two);
    assert_eq!(m.total_page_refs(), refs);
    check_invariants(&mut m, &e).unwrap();
}

/// A mediator's cycle in its GPU context, by extents or by 512 page maps
/// that fold into a superpage: each unmap clears the superpage entry
/// whole, and the context's table frames stay as many cycle after cycle
/// (the spare a superpage keeps for its split goes with it: before, every
/// fold that was unmapped whole left one more behind).
#[test]
fn superpage_cycles_in_an_engine_context_keep_its_frames_flat() {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    let pages: Vec<_> = (0..EXTENT_PAGES)
        .map(|i| map_op_in(ctx, GUEST, EXTENT + i, Permissions::RW))
        .collect();
    let mut frames = Vec::new();
    for cycle in 0..8 {
        let bfn = if cycle % 2 == 0 {
            let (status, out) = run(&mut m, &e, extent_map(ctx, EXTENT, Permissions::RW));
            assert_eq!(status, 0);
            Bfn(out.bfn)
        } else {
            let mut ops = pages.clone();
            m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
            assert!(ops.iter().all(|o| o.status == 0));
            Bfn(ops[0].bfn)
        };
        assert_eq!(
            leaf_level(&m, ctx, Bfn(bfn.0 + 9)),
            Some(2),
            "cycle {cycle}"
        );
        assert_mapped(&mut m, ctx, bfn, EXTENT);
        check_invariants(&mut m, &e).unwrap();
        let mut ops: Vec<_> = (0..EXTENT_PAGES)
            .map(|i| unmap_op_in(ctx, Bfn(bfn.0 + i)))
            .collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|o| o.status == 0));
        assert_unmapped(&m, ctx, bfn);
        check_invariants(&mut m, &e).unwrap();
        frames.push(m.xen_frames());
    }
    assert!(
        frames.windows(2).skip(1).all(|w| w[0] == w[1]),
        "table frames by cycle: {frames:?}"
    );
}

/// A folded table whose superpage was unmapped whole is zeroed after the
/// flush and given back for reuse: written back first. On an IOMMU that
/// does not snoop the CPU caches (QEMU's, the simulator's default) its
/// memory still held the 512 entries of pages since released, and the next
/// table made from it was linked over them (the link could reach memory
/// first, and a device walk through it reach those frames).
#[test]
fn a_folded_table_given_back_is_written_back_before_it_is_a_table_again() {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    // One batch: 512 page maps that fold into a superpage, then their
    // unmaps (at the BFNs a fresh context hands out first), so the fold
    // and its clearing fall between the same two flushes.
    let first = e.window().start;
    assert_eq!(first % EXTENT_PAGES, 0);
    let mut ops: Vec<_> = (0..EXTENT_PAGES)
        .map(|i| map_op_in(ctx, GUEST, EXTENT + i, Permissions::RW))
        .chain((0..EXTENT_PAGES).map(|i| unmap_op_in(ctx, Bfn(first + i))))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert!(ops[..EXTENT_PAGES as usize]
        .iter()
        .enumerate()
        .all(|(i, o)| o.bfn == first + i as u64));
    assert_unmapped(&m, ctx, Bfn(first));
    // Pages mapped again: their tables come from the frames given back.
    for g in [3, 700, 1500] {
        let mut op = [map_op_in(ctx, GUEST, g, Permissions::RW)];
        m.guest_batch_all(&e, DomId::DOM0, &mut op).unwrap();
        assert_eq!(op[0].status, 0);
    }
    check_invariants(&mut m, &e).unwrap();
}

/// Beside a record of another extent in the same 64 MiB region (a
/// mediator maps a guest's 2 MiB pages one extent after another), an
/// extent map skips the check of its other 511 pages only while the cell
/// maps no page of the target there on its own: a page mapped alone with
/// the extent's access still makes it busy, one over a stale frame is
/// still revoked on the way, one with other access is no conflict.
#[test]
fn an_extent_beside_another_extents_record_still_finds_its_pages_mapped_alone() {
    let (mut m, e) = host();
    let next = EXTENT + EXTENT_PAGES;
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, next, Permissions::RW),
    );
    assert_eq!(status, 0, "the other extent, same region");
    // Its page 7 mapped alone, as the extent would map it: busy.
    let alone = map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 7, Permissions::RW).unwrap();
    let (status, _) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, Errno::Busy.negated());
    check_invariants(&mut m, &e).unwrap();
    let mut op = [unmap_op(alone)];
    m.guest_batch_all(&e, DomId::DOM0, &mut op).unwrap();
    assert_eq!(op[0].status, 0);
    // Read-only alone: another mapping, no conflict.
    map_one(&mut m, &e, DomId::DOM0, GUEST, EXTENT + 7, Permissions::RO).unwrap();
    // Page 9 mapped alone while its gfn had another frame, which then
    // came back before the hooks ran: the extent map revokes it.
    let (page, lender) = (Gfn(EXTENT + 9), Gfn(3));
    m.swap_frames(GUEST, page, lender).unwrap();
    let stale = map_one(&mut m, &e, DomId::DOM0, GUEST, page.0, Permissions::RW).unwrap();
    m.swap_frames(GUEST, page, lender).unwrap();
    let (status, out) = run(
        &mut m,
        &e,
        extent_map(ContextId::DEFAULT, EXTENT, Permissions::RW),
    );
    assert_eq!(status, 0);
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, stale),
        None,
        "revoked"
    );
    assert_mapped(&mut m, ContextId::DEFAULT, Bfn(out.bfn), EXTENT);
    e.gfn_removed(&mut m, GUEST, page);
    e.gfn_removed(&mut m, GUEST, lender);
    check_invariants(&mut m, &e).unwrap();
}

#[test]
fn extents_into_two_contexts_at_once_stay_within_the_quota() {
    // Two vCPUs of dom0 map an extent each into a context of its own near
    // the quota: the second checks its quota while the first holds its
    // cell's lock past its own check, its 512 BFNs not yet counted in its
    // cell's line. Together they would take 1024 of a quota of 1000: one
    // must be refused (before, both were mapped: the quota counted the
    // other cells as of their last unlock).
    let (mut m, e) = host();
    let (c1, c2) = (create_context(&mut m, &e), create_context(&mut m, &e));
    e.set_quota(&mut m, DomId::DOM0, Some(1000)).unwrap();
    let info = pviommu_hv::platform::Platform::domain_info(&m, DomId::DOM0).unwrap();
    let extent = |c, gfn| map_request_in(c, GUEST, gfn, Permissions::RW);
    let (first, second) = racing_at_first_table_write(
        &mut m,
        |h| e.map_extent(h, DomId::DOM0, &info, &extent(c1, EXTENT)),
        |m| e.map_extent(m, DomId::DOM0, &info, &extent(c2, 2 * EXTENT)),
    );
    let first = first.map(|x| x.mapped.bfn);
    let second = second
        .expect("the second map ran inside the first")
        .map(|x| x.mapped.bfn);
    assert!(
        matches!(
            (&first, &second),
            (Ok(_), Err(Errno::NoSpc)) | (Err(Errno::NoSpc), Ok(_))
        ),
        "one extent mapped, one refused: {first:?}, {second:?}"
    );
    assert_eq!(e.usage(DomId::DOM0).1, EXTENT_PAGES);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

/// An engine context with the guest's aligned extent from [`EXTENT`]
/// mapped as one superpage entry, and a device that has read one of its
/// pages (the IOTLB holds the 2 MiB translation, as VT-d caches it).
fn superpage_in_use() -> (SimMachine, Engine, ContextId, Bfn) {
    let (mut m, e) = host();
    let ctx = create_context(&mut m, &e);
    let bfn = superpage_read_in(&mut m, &e, ctx);
    (m, e, ctx, bfn)
}

/// Dom0 maps the guest's aligned extent from [`EXTENT`] into `ctx`, where
/// it is one superpage entry (the engine's, or Xen's in context 0), and a
/// device reads one of its pages: its BFN.
fn superpage_read_in(m: &mut SimMachine, e: &Engine, ctx: ContextId) -> Bfn {
    let (status, out) = run(m, e, extent_map(ctx, EXTENT, Permissions::RW));
    assert_eq!(status, 0);
    let bfn = Bfn(out.bfn);
    assert_eq!(
        m.context_leaf(DomId::DOM0, ctx, bfn).map(|l| l.0),
        Some(2),
        "one superpage entry"
    );
    assert_eq!(
        m.dma_read(DomId::DOM0, ctx, (bfn.0 + 1) << 12, 8).unwrap(),
        pattern(EXTENT + 1)[..8]
    );
    bfn
}

/// Dom0 unmaps page 5 of the superpage at `bfn` of `ctx`: it is gone from
/// the tables, its reference dropped, and the device reaches it no more.
fn unmap_a_page_of_the_superpage(m: &mut SimMachine, e: &Engine, ctx: ContextId, bfn: Bfn) {
    let page = Bfn(bfn.0 + 5);
    let mfn = m.mfn_of(GUEST, Gfn(EXTENT + 5)).unwrap();
    let refs = m.frame_info(mfn).unwrap().refs;
    let (status, _) = run(m, e, unmap_op_in(ctx, page));
    assert_eq!(status, 0);
    assert_eq!(
        m.context_leaf(DomId::DOM0, ctx, page),
        None,
        "split, page gone"
    );
    assert!(
        m.frame_info(mfn).unwrap().refs < refs,
        "its reference was dropped"
    );
    assert!(
        m.dma_read(DomId::DOM0, ctx, page.0 << 12, 8).is_err(),
        "the device still reads a page the engine released"
    );
}

#[test]
fn a_page_unmapped_out_of_a_superpage_is_unreachable_after_the_flush() {
    // (A security review's finding.) The owner unmaps one page of a
    // superpage: the engine splits it and releases the page after the
    // flush, which must cover the whole 2 MiB (VT-d: a page-selective
    // invalidation drops a superpage's IOTLB entry only with an address
    // mask of at least 9). Before, it covered the page alone, and the
    // device still reached the released page through the 2 MiB entry.
    let (mut m, e, ctx, bfn) = superpage_in_use();
    unmap_a_page_of_the_superpage(&mut m, &e, ctx, bfn);
    // The rest of the superpage still translates, through its split table.
    assert_eq!(
        m.dma_read(DomId::DOM0, ctx, (bfn.0 + 6) << 12, 8).unwrap(),
        pattern(EXTENT + 6)[..8]
    );
}

#[test]
fn a_revoked_page_of_a_superpage_is_unreachable_once_freed() {
    // The same through a revocation: the guest balloons a page of the
    // extent out, and its frame goes back to the host's heap.
    let (mut m, e, ctx, bfn) = superpage_in_use();
    let page = Bfn(bfn.0 + 88);
    let mfn = m.mfn_of(GUEST, Gfn(EXTENT + 88)).unwrap();
    m.balloon_out(&e, GUEST, Gfn(EXTENT + 88)).unwrap();
    m.current = DomId::DOM0;
    assert_eq!(m.context_leaf(DomId::DOM0, ctx, page), None, "revoked");
    assert_eq!(
        m.frame_info(mfn).map(|f| f.owner),
        Some(pviommu_hv::sim::Owner::Free),
        "the frame is free for anyone"
    );
    assert!(
        m.dma_write(DomId::DOM0, ctx, page.0 << 12, b"overwrite")
            .is_err(),
        "the device writes a freed frame"
    );
}

#[test]
fn a_page_unmapped_out_of_a_superpage_in_context_0_is_unreachable_after_the_flush() {
    // The same in context 0, Xen's own tables: Xen maps an aligned
    // extent's run as one superpage and splits it when one page goes, but
    // flushes what it is asked to (`iommu_iotlb_flush()`: the page alone,
    // a page-selective invalidation whose mask covers no superpage). The
    // engine asks for the whole 2 MiB around what it unmapped.
    let (mut m, e) = host();
    let ctx = ContextId::DEFAULT;
    let bfn = superpage_read_in(&mut m, &e, ctx);
    unmap_a_page_of_the_superpage(&mut m, &e, ctx, bfn);
}

/// A device model's aligned extent in its context 0: one 2 MiB entry in
/// the host's tables (Xen writes the run as one superpage).
fn device_models_extent_in_context_0(m: &mut SimMachine, e: &Engine) -> Bfn {
    let req = map_request_in(ContextId::DEFAULT, GUEST, EXTENT, Permissions::RO);
    let mut ops = [Request::MapExtent(req).encode()];
    m.guest_batch_all(e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    assert_eq!(m.superpage_maps, 1, "one 2 MiB entry in the host's tables");
    Bfn(ops[0].bfn)
}

#[test]
fn an_extent_in_context_0_goes_without_table_memory_whoever_takes_it_down() {
    // (A security review's hardening point.) The owner's extent unmap
    // clears the block with one 2 MiB call, which splits nothing. A
    // revocation of the whole block (the guest gives its 2 MiB page back)
    // and a dying device model's teardown took it down a page at a time,
    // the first page's unmap splitting the host's superpage, which needs
    // a table: short of memory the pages went Stuck, the device kept
    // reaching the frames the guest gave back, and the teardown stalled.
    // Now they leave the entries to the flush that follows, which clears
    // them in runs, as it does the owner's.
    let (mut m, e) = host();
    let bfn = device_models_extent_in_context_0(&mut m, &e);
    m.fail_table_allocs(Some(0));
    let mut ops = [extent_unmap(ContextId::DEFAULT, bfn)];
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    assert_eq!(m.total_page_refs(), 0, "the owner's unmap");
    m.fail_table_allocs(None);

    // A hook over the whole block.
    let (mut m, e) = host();
    let bfn = device_models_extent_in_context_0(&mut m, &e);
    for g in EXTENT..EXTENT + EXTENT_PAGES {
        m.put_new_frame(GUEST, Gfn(g)).unwrap();
    }
    m.fail_table_allocs(Some(0));
    e.gfn_changed(&mut m, GUEST, Gfn(EXTENT), 9, GfnChange::Removed);
    assert!(
        m.dma_read(DEVICE_MODEL, ContextId::DEFAULT, bfn.0 << 12, 8)
            .is_err(),
        "the device still reaches the frames the guest gave back"
    );
    assert_eq!(m.total_page_refs(), 0, "a hook");
    assert_eq!(e.usage(DEVICE_MODEL).2, EXTENT_PAGES, "each page a notice");
    m.fail_table_allocs(None);

    // A dying device model.
    let (mut m, e) = host();
    device_models_extent_in_context_0(&mut m, &e);
    m.fail_table_allocs(Some(0));
    m.mark_dying(DEVICE_MODEL);
    let (mut cursor, mut slices) = (0, 0);
    while e
        .domain_teardown(&mut m, DEVICE_MODEL, &mut cursor)
        .is_err()
    {
        slices += 1;
        assert!(
            !Engine::teardown_stalled(cursor) && slices < 10_000,
            "stalled"
        );
    }
    assert_eq!(m.total_page_refs(), 0, "a teardown");
    m.fail_table_allocs(None);

    // A dying target (its slices end on 2 MiB boundaries of the BFNs, so
    // each flush clears whole blocks).
    let (mut m, e) = host();
    let bfn = device_models_extent_in_context_0(&mut m, &e);
    m.fail_table_allocs(Some(0));
    let slices = m.kill_domain(&e, GUEST);
    assert!(slices < 10_000, "stalled");
    assert_eq!(m.total_page_refs(), 0, "the target's teardown");
    assert!(m
        .dma_read(DEVICE_MODEL, ContextId::DEFAULT, bfn.0 << 12, 8)
        .is_err());
}

#[test]
fn a_revocation_longer_than_a_backend_run_is_cut_between_superpages() {
    // (A review's hardening point.) A flush clears the entries it finds in
    // runs of at most MAX_IOMMU_RUN (2048) BFNs. A hook that revokes more,
    // starting inside a 2 MiB block, had its run cut inside a block the
    // host mapped as one superpage: clearing part of it splits it, which
    // needs a table. Now a run that nears the bound ends where a block
    // starts.
    let (mut m, e) = machine_after_dom0(Format::Vtd, 4096, 512);
    // Gfn g is frame 512 + g, and the maps from gfn 512 get BFNs from a
    // block's start: every whole 2 MiB of them one superpage in dom0's
    // tables, but the first, where gfn 600 is mapped read-only.
    let mut bfns = Vec::new();
    for chunk in (512..3328u64).collect::<Vec<_>>().chunks(1024) {
        let mut ops: Vec<_> = chunk
            .iter()
            .map(|&g| {
                let perms = if g == 600 {
                    Permissions::RO
                } else {
                    Permissions::RW
                };
                map_op(GUEST, g, perms)
            })
            .collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|o| o.status == 0));
        bfns.extend(ops.iter().map(|o| o.bfn));
    }
    assert!(bfns.windows(2).all(|w| w[1] == w[0] + 1), "one run of BFNs");
    let superpages = bfns
        .iter()
        .filter(|&&b| b & 511 == 0)
        .filter(|&&b| {
            m.context_leaf(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
                .map(|l| l.0)
                == Some(2)
        })
        .count();
    assert_eq!(superpages, 4, "gfns 1024-3071");
    assert_eq!(
        m.context_leaf(DomId::DOM0, ContextId::DEFAULT, Bfn(bfns[0]))
            .map(|l| l.0),
        Some(1),
        "gfns 512-1023: a leaf table"
    );
    // The guest gives gfns 768-3327 back at once (2560 pages, from the
    // middle of a leaf table); the host has no table to spare.
    for g in 768..3328 {
        m.put_new_frame(GUEST, Gfn(g)).unwrap();
    }
    m.fail_table_allocs(Some(0));
    e.gfn_changed(&mut m, GUEST, Gfn(768), 12, GfnChange::Removed);
    m.fail_table_allocs(None);
    assert_eq!(
        e.driver_state(DomId::DOM0).unwrap().stuck(),
        0,
        "none stuck"
    );
    assert_eq!(e.usage(DomId::DOM0).2, 2560, "each a notice");
}

/// An extent of a target replaced, by a domain dom0 may not map with its
/// pages paged out, right after the map's XSM check or right before its
/// lookup (after the map's last check of the target's number): the engine
/// or the host finds the number moved and looks nothing up (the host once
/// it holds the new domain: one lookup of 512 pages, as for a run of page
/// maps, `hardening.rs::a_target_replaced_after_the_last_check_sees_no_lookup`),
/// and the extent's checks, made again, refuse it. Without the host's check
/// the new domain's first page was paged in and the extent answered
/// `EAGAIN`.
#[test]
fn an_extent_of_a_target_replaced_after_its_checks_sees_no_lookup() {
    use pviommu_hv::platform::{Platform, XsmAction};
    use pviommu_hv::sim::DomainSpec;
    for at in [Service::XsmCheck(XsmAction::Map), Service::BeforeGetPage] {
        let (mut m, e) = host();
        let pages = m.domain_ram_pages(GUEST).unwrap();
        let race: Race<'_> = Box::new(|m: &mut SimMachine| {
            m.kill_domain(&e, GUEST);
            let spec = DomainSpec {
                pages,
                privileged: false,
                device_model_of: None,
            };
            m.create_domain(GUEST, spec).unwrap();
            m.xsm_protect(GUEST);
            for g in EXTENT..EXTENT + EXTENT_PAGES {
                m.set_paged_out(GUEST, Gfn(g));
            }
        });
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        let req = map_request_in(ContextId::DEFAULT, GUEST, EXTENT, Permissions::RW);
        let got = {
            let mut h = Interposer::new(&mut m, at, race);
            e.map_extent(&mut h, DomId::DOM0, &dom0, &req)
        };
        assert_eq!(got.err(), Some(Errno::Perm), "{at:?}");
        assert_eq!(m.paging_requests, 0, "{at:?}: the new domain paged in");
        assert_eq!(
            m.lookups_of_moved_targets > 0,
            at == Service::BeforeGetPage,
            "{at:?}: who saw the number moved"
        );
        assert_eq!(m.total_page_refs(), 0, "{at:?}");
        assert_eq!(e.target_active(GUEST), 0, "{at:?}");
        assert_eq!(e.usage(DomId::DOM0).1, 0, "{at:?}: no BFN in use");
        check_invariants(&mut m, &e).unwrap();
    }
}
