//! Security review finding (regression test): an undo's tag (the install
//! generation) meant something only inside one driver cell, and a device
//! model that went idle between its map and the undo could come back in
//! another cell whose generations collide; the undo then took down a
//! mapping another vCPU had just been told about. The tag now names the
//! cell too, and a cell's generations never restart.
use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format};
use pviommu_tests::*;

fn req(gfn: u64) -> MapRequest {
    MapRequest {
        context: ContextId::DEFAULT,
        domid: GUEST,
        gfn: Gfn(gfn),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

#[test]
fn an_undo_tag_from_another_cell_matches_nothing() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dm2 = DomId(6);
    m.create_domain(
        dm2,
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: Some(GUEST),
        },
    )
    .unwrap();
    let ci = m.domain_info(DEVICE_MODEL).unwrap();
    let ci2 = m.domain_info(dm2).unwrap();
    // vCPU0 maps gfn 5 (reported); vCPU1 maps it again (Shared), its copy-out will fail.
    let first = e.map_tagged(&mut m, DEVICE_MODEL, &ci, &req(5)).unwrap();
    let shared = e.map_tagged(&mut m, DEVICE_MODEL, &ci, &req(5)).unwrap();
    eprintln!("first {first:?} shared {shared:?}");
    // Meanwhile: the guest balloons gfn 5 out; the DM's notice thread acks it.
    m.balloon_out(&e, GUEST, Gfn(5)).unwrap();
    e.revoked_ack(DEVICE_MODEL, ContextId::DEFAULT, first.bfn, None)
        .unwrap();
    // DM's cell is idle and released; another device model takes it.
    let _o = e.map_tagged(&mut m, dm2, &ci2, &req(7)).unwrap();
    // DM's map thread maps another page: a fresh cell, fresh counter.
    let other = e.map_tagged(&mut m, DEVICE_MODEL, &ci, &req(8)).unwrap();
    eprintln!("other {other:?}");
    // vCPU1's copy-out failed: undo.
    e.unmap_undo(&mut m, DEVICE_MODEL, ContextId::DEFAULT, shared);
    let l = e.lookup(DEVICE_MODEL, ContextId::DEFAULT, other.bfn);
    eprintln!("lookup(other) after undo: {l:?}");
    assert!(l.is_ok(), "undo took down another vCPU's mapping");
}
