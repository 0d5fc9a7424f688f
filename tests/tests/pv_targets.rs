//! PV targets: a guest without `paging_mode_translate`, whose "gfns" are
//! machine frames (the simulator's `SimMachine::make_pv`, Xen's
//! `get_page_from_gfn()` for such a domain, then `pvx_accept_page()`).
//!
//! The rule the Xen-in-QEMU check `pv_foreign_frame_enxio` found broken on
//! Xen (a review of 2026-12-05): a frame that is not the target's own
//! answers `ENXIO` whoever holds it (Xen, another guest) and whether or not
//! it exists, so a device model of a PV guest learns nothing of the host's
//! machine frames. Until the simulator modelled PV targets it could not
//! show that defect; with the old rule (`EXDEV` for a frame that exists)
//! `foreign_and_missing_frames_all_answer_enxio_and_change_nothing` fails.
//!
//! Also here, since the page rule is the same for both: a frame Xen took
//! out of service (a memory error) is refused behind a PV "gfn" and
//! behind a p2m entry alike (`SimMachine::mark_frame_broken`).

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, Owner, SimMachine};
use pviommu_hv::{Engine, Errno, Mfn};

const PV_GUEST: DomId = DomId(1);
const OTHER: DomId = DomId(2);

fn req(frame: u64, perms: Permissions) -> MapRequest {
    MapRequest {
        context: ContextId::DEFAULT,
        domid: PV_GUEST,
        gfn: Gfn(frame),
        perms,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn spec(pages: u64) -> DomainSpec {
    DomainSpec {
        pages,
        privileged: false,
        device_model_of: None,
    }
}

/// A host with a PV guest and an HVM one, dom0 already mapping a page of
/// the HVM guest (so Xen holds table frames).
fn host() -> (SimMachine, Engine) {
    let mut m = SimMachine::new(8192, Format::Vtd, 64);
    m.create_domain(PV_GUEST, spec(16)).unwrap();
    m.create_domain(OTHER, spec(16)).unwrap();
    m.make_pv(PV_GUEST);
    let e = Engine::new(Default::default(), &m).unwrap();
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let hvm = MapRequest {
        domid: OTHER,
        ..req(3, Permissions::RW)
    };
    e.map(&mut m, DomId::DOM0, &dom0, &hvm).unwrap();
    e.finish(&mut m, DomId::DOM0);
    (m, e)
}

/// Map one op for dom0, the call finished.
fn map(m: &mut SimMachine, e: &Engine, r: &MapRequest) -> Result<Bfn, Errno> {
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let out = e.map(m, DomId::DOM0, &dom0, r);
    e.finish(m, DomId::DOM0);
    out
}

/// A frame of the PV guest's own is mapped as asked, and the device
/// reaches that very frame.
#[test]
fn an_own_frame_of_a_pv_guest_is_mapped_at_its_machine_frame() {
    let (mut m, e) = host();
    let frame = m.mfn_of(PV_GUEST, Gfn(5)).unwrap();
    let bfn = map(&mut m, &e, &req(frame.0, Permissions::RW)).unwrap();
    let (mfn, perms, _) = m.translate(DomId::DOM0, ContextId::DEFAULT, bfn).unwrap();
    assert_eq!(mfn, frame);
    assert_eq!(perms, Permissions::RW);
    // The gfn of the HVM numbering (5) is no frame of the guest's.
    assert_eq!(map(&mut m, &e, &req(5, Permissions::RO)), Err(Errno::Nxio));
}

/// Xen's frame, one Xen shares with the guest (its shared_info: `EXDEV`
/// on Xen before a review of 2026-12-05), another guest's frame, a free
/// frame and a frame past the end of RAM: one answer for all, `ENXIO`,
/// and nothing held or changed.
#[test]
fn foreign_and_missing_frames_all_answer_enxio_and_change_nothing() {
    let (mut m, e) = host();
    let xen = (0..8192u64)
        .find(|&f| m.frame_info(Mfn(f)).is_some_and(|i| i.owner == Owner::Xen))
        .expect("Xen holds a table frame");
    let others = m.mfn_of(OTHER, Gfn(7)).unwrap().0;
    let free = (0..8192u64)
        .rev()
        .find(|&f| m.frame_info(Mfn(f)).is_some_and(|i| i.owner == Owner::Free))
        .expect("a free frame");
    let shared = m.share_xen_frame(PV_GUEST).unwrap();
    let refs = m.total_page_refs();
    let live = e.state().live_mappings(DomId::DOM0).count();
    for frame in [xen, shared.0, others, free, 8192, 1 << 40, u64::MAX - 1] {
        for perms in [Permissions::RO, Permissions::RW] {
            assert_eq!(
                map(&mut m, &e, &req(frame, perms)),
                Err(Errno::Nxio),
                "frame {frame:#x}, {perms:?}"
            );
        }
    }
    // The same through a batch (one page lookup for the run).
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs = [
        req(others, Permissions::RW),
        req(others + 1, Permissions::RW),
    ];
    let mut out = [Err(Errno::Inval); 2];
    let n = e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out);
    e.finish(&mut m, DomId::DOM0);
    assert!(n >= 1);
    assert_eq!(out[0].map(|m| m.bfn), Err(Errno::Nxio));
    assert_eq!(m.total_page_refs(), refs, "no reference kept");
    assert_eq!(e.state().live_mappings(DomId::DOM0).count(), live);
}

/// A frame typed as a page table is never device-writable (Xen's
/// `get_page_type(PGT_writable_page)` fails on it), but may be read; in
/// log-dirty mode no frame is mapped writable.
#[test]
fn page_table_frames_and_log_dirty_refuse_write_access_only() {
    let (mut m, e) = host();
    let table = m.mfn_of(PV_GUEST, Gfn(2)).unwrap();
    m.set_pv_page_table(PV_GUEST, table, true).unwrap();
    let refs = m.total_page_refs();
    assert_eq!(
        map(&mut m, &e, &req(table.0, Permissions::RW)),
        Err(Errno::Acces)
    );
    assert_eq!(m.total_page_refs(), refs);
    map(&mut m, &e, &req(table.0, Permissions::RO)).unwrap();
    m.set_pv_page_table(PV_GUEST, table, false).unwrap();
    let bfn = map(&mut m, &e, &req(table.0, Permissions::RW)).unwrap();
    // A frame a device may write cannot become a page table (Xen's type
    // count: the pin answers EINVAL), until the unmap's flush released the
    // writable reference.
    assert_eq!(
        m.set_pv_page_table(PV_GUEST, table, true),
        Err(Errno::Inval)
    );
    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, bfn)
        .unwrap();
    assert_eq!(
        m.set_pv_page_table(PV_GUEST, table, true),
        Err(Errno::Inval),
        "released only by the flush"
    );
    e.finish(&mut m, DomId::DOM0);
    m.set_pv_page_table(PV_GUEST, table, true).unwrap();

    let page = m.mfn_of(PV_GUEST, Gfn(9)).unwrap();
    m.set_log_dirty_mode(PV_GUEST, true);
    assert_eq!(
        map(&mut m, &e, &req(page.0, Permissions::RW)),
        Err(Errno::Acces)
    );
    map(&mut m, &e, &req(page.0, Permissions::RO)).unwrap();
}

/// A PV guest's page ballooned out (`decrease_reservation` names the
/// machine frame) loses its mapping: the hook is told that frame, and the
/// frame, no longer the guest's, cannot be mapped again.
#[test]
fn a_ballooned_out_pv_frame_is_revoked_and_no_longer_maps() {
    let (mut m, e) = host();
    let frame = m.mfn_of(PV_GUEST, Gfn(4)).unwrap();
    let bfn = map(&mut m, &e, &req(frame.0, Permissions::RW)).unwrap();
    m.balloon_out(&e, PV_GUEST, Gfn(frame.0)).unwrap();
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert!(e
        .state()
        .live_mappings(DomId::DOM0)
        .all(|v| v.bfn != bfn && v.mapping.domid != PV_GUEST));
    assert_eq!(
        map(&mut m, &e, &req(frame.0, Permissions::RO)),
        Err(Errno::Nxio)
    );
    // A frame it no longer has is no removal at all: ENXIO for a frame
    // that exists, EINVAL for one that does not (`guest_remove_page`).
    assert_eq!(m.balloon_out(&e, PV_GUEST, Gfn(frame.0)), Err(Errno::Nxio));
    assert_eq!(m.balloon_out(&e, PV_GUEST, Gfn(1 << 40)), Err(Errno::Inval));
}

/// A frame Xen shares with a PV guest (its shared_info): never typed as a
/// page table (Xen pins it writable); ballooned out it is Xen's answer,
/// success, and still no frame of the guest's; it goes with the guest, so
/// a later guest at the same domid never gets it as its own RAM (a review
/// of 2026-12-05 found it kept).
#[test]
fn a_frame_xen_shares_is_never_the_guests_ram() {
    let (mut m, e) = host();
    let shared = m.share_xen_frame(PV_GUEST).unwrap();
    assert_eq!(
        m.set_pv_page_table(PV_GUEST, shared, true),
        Err(Errno::Inval)
    );
    assert_eq!(m.balloon_out(&e, PV_GUEST, Gfn(shared.0)), Ok(()));
    assert_eq!(
        map(&mut m, &e, &req(shared.0, Permissions::RO)),
        Err(Errno::Nxio)
    );
    m.destroy_domain(PV_GUEST);
    m.create_domain(PV_GUEST, spec(16)).unwrap();
    m.make_pv(PV_GUEST);
    assert_eq!(
        map(&mut m, &e, &req(shared.0, Permissions::RO)),
        Err(Errno::Nxio)
    );
}

/// A memory error in a frame of a PV guest: Xen marks it broken and
/// crashes the guest, which is not destroyed (`on_crash=preserve`, or
/// until the toolstack gets to it), and changes no mapping. Its device
/// model gets no new device access to the frame, read or write, alone or
/// in a batch after a good one; what mapped it before stays (Xen's rule:
/// nothing revokes for a PV guest). On Xen before a review of 2026-12-06
/// `pvx_accept_page()` looked at neither `PGC_broken` nor offlining, and
/// the simulator had no such frame: both maps here succeeded.
#[test]
fn a_broken_frame_of_a_crashed_pv_guest_is_refused() {
    let (mut m, e) = host();
    let good = m.mfn_of(PV_GUEST, Gfn(5)).unwrap();
    let broken = m.mfn_of(PV_GUEST, Gfn(6)).unwrap();
    let before = map(&mut m, &e, &req(broken.0, Permissions::RO)).unwrap();
    assert_eq!(m.mark_frame_broken(PV_GUEST, Gfn(broken.0)), Ok(broken));
    let refs = m.total_page_refs();
    for perms in [Permissions::RO, Permissions::RW] {
        assert_eq!(
            map(&mut m, &e, &req(broken.0, perms)),
            Err(Errno::Nxio),
            "{perms:?}"
        );
    }
    assert_eq!(m.total_page_refs(), refs, "nothing held for a refusal");
    // In a batch, after a frame that maps (one page lookup for the run).
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs = [req(good.0, Permissions::RW), req(broken.0, Permissions::RW)];
    let mut out = [Err(Errno::Inval); 2];
    assert_eq!(e.map_batch(&mut m, DomId::DOM0, &dom0, &reqs, &mut out), 2);
    e.finish(&mut m, DomId::DOM0);
    assert!(out[0].is_ok());
    assert_eq!(out[1].map(|m| m.bfn), Err(Errno::Nxio));
    // The mapping made before the error is left as it was.
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, before)
            .map(|t| t.0),
        Some(broken)
    );
}

/// The same for an HVM guest whose p2m Xen does not change on the error
/// (a shadow-paged guest is crashed; the hardware domain keeps the page):
/// the page is refused by its frame, whatever its p2m entry says. (A HAP
/// guest's entry becomes `p2m_ram_broken`, an entry's removal to the hook:
/// `remove_gfn`.)
#[test]
fn a_broken_frame_behind_a_p2m_entry_is_refused() {
    let (mut m, e) = host();
    let hvm = |gfn, perms| MapRequest {
        domid: OTHER,
        ..req(gfn, perms)
    };
    let frame = m.mark_frame_broken(OTHER, Gfn(9)).unwrap();
    assert_eq!(m.mfn_of(OTHER, Gfn(9)), Some(frame), "the p2m unchanged");
    for perms in [Permissions::RO, Permissions::RW] {
        assert_eq!(
            map(&mut m, &e, &hvm(9, perms)),
            Err(Errno::Nxio),
            "{perms:?}"
        );
    }
    // Its neighbour is not affected.
    assert!(map(&mut m, &e, &hvm(10, Permissions::RW)).is_ok());
    // Only frames a domain owns can be marked by it.
    assert_eq!(m.mark_frame_broken(OTHER, Gfn(1 << 40)), Err(Errno::NoEnt));
    assert_eq!(
        m.mark_frame_broken(PV_GUEST, Gfn(frame.0)),
        Err(Errno::NoEnt)
    );
}

/// A review of 2026-12-06 (the glue's `pvx_put_page()`): a gfn hook run
/// inside a batch of a translated guest's own p2m changes
/// (`XENMAPSPACE_gmfn_range`, which suppresses this CPU's IOTLB flushes
/// for that batch) releases what waits in the mediator's cell, and that
/// may be the last reference to a page a PV guest with a device gave
/// back. Freeing the page unmaps the guest's own identity entry for it,
/// which must be flushed all the same: before the glue suspended the
/// suppression around its put, the guest's device could still reach the
/// freed page through its IOTLB. The simulator models Xen's side since
/// (`SimMachine::give_pv_guest_a_device`, `add_to_physmap_range`); with
/// the suspension taken out of its `put_page`, this test fails.
#[test]
fn a_page_freed_by_a_hook_inside_another_domains_batch_leaves_no_stale_identity_entry() {
    let (mut m, e) = host();
    m.give_pv_guest_a_device(PV_GUEST).unwrap();
    let frame = m.mfn_of(PV_GUEST, Gfn(5)).unwrap();
    map(&mut m, &e, &req(frame.0, Permissions::RO)).unwrap();
    // The guest's device reads its own page: its IOTLB holds the identity
    // translation.
    assert!(m
        .dma_read(PV_GUEST, ContextId::DEFAULT, frame.0 << 12, 8)
        .is_ok());
    // The guest gives the page back. The hook revokes dom0's mapping but
    // cannot flush: the page waits in dom0's cell, referenced, and the
    // guest's identity entry stays with it.
    m.fail_flushes = 1;
    m.balloon_out(&e, PV_GUEST, Gfn(frame.0)).unwrap();
    assert!(m
        .frame_info(frame)
        .is_some_and(|f| f.refs > 0 && f.owner == Owner::Free));
    assert!(m
        .dma_read(PV_GUEST, ContextId::DEFAULT, frame.0 << 12, 8)
        .is_ok());
    // The HVM guest moves gfn 3, which dom0 maps, in one batch: its hook
    // flushes dom0's cell and releases what waits there, the page's last
    // reference among it.
    m.add_to_physmap_range(&e, OTHER, Gfn(3), Gfn(12), 1)
        .unwrap();
    assert!(
        m.frame_info(frame).is_some_and(|f| f.refs == 0),
        "the page was released inside the batch"
    );
    assert_eq!(
        m.identity_unmaps_unflushed, 0,
        "an identity unmap went unflushed"
    );
    assert!(
        m.dma_read(PV_GUEST, ContextId::DEFAULT, frame.0 << 12, 8)
            .is_err(),
        "the guest's device still reaches the freed page"
    );
    pviommu_tests::check_invariants(&mut m, &e).unwrap();
}
