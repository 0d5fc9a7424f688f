//! Revocation: a dying foreign domain, a gfn leaving the p2m, a dying driver
//! domain. Every BFN pointing at the page goes, DMA faults, references return.

use pviommu_abi::{ContextId, DomId, Gfn, Permissions};
use pviommu_hv::sim::{DomainSpec, Format};
use pviommu_tests::*;

#[test]
fn foreign_domain_death_revokes_everywhere_and_frees_its_pages() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let b0 = map_one(&mut m, &e, DomId::DOM0, GUEST, 1, Permissions::RW).unwrap();
    let b_dm = map_one(&mut m, &e, DEVICE_MODEL, GUEST, 1, Permissions::RO).unwrap();
    let free_before = m.free_frames();
    m.kill_domain(&e, GUEST);
    assert_eq!(m.zombie_frames(), 0);
    assert_eq!(m.total_page_refs(), 0);
    assert!(m.free_frames() > free_before);
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, b0.0 << 12, 8)
        .is_err());
    assert!(m
        .dma_read(DEVICE_MODEL, ContextId::DEFAULT, b_dm.0 << 12, 8)
        .is_err());
    let st = e.state();
    let d0 = st.driver(DomId::DOM0).unwrap();
    assert_eq!(d0.live(), 0);
    // The owner is told, and the BFN stays reserved until it acknowledges.
    assert_eq!(d0.revoked(), 1);
}

#[test]
fn ballooned_out_gfn_is_revoked() {
    let (mut m, e) = machine(Format::Lpae, 16);
    let keep = map_one(&mut m, &e, DomId::DOM0, GUEST, 2, Permissions::RW).unwrap();
    let gone = map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RW).unwrap();
    m.balloon_out(&e, GUEST, Gfn(3)).unwrap();
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, gone.0 << 12, 8)
        .is_err());
    assert_eq!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, keep.0 << 12, 64)
            .unwrap(),
        pattern(2)
    );
    assert_eq!(m.zombie_frames(), 0);
}

#[test]
fn driver_domain_death_drops_all_its_mappings() {
    let (mut m, e) = machine(Format::Vtd, 16);
    m.create_domain(
        DomId(9),
        DomainSpec {
            pages: 32,
            privileged: true,
            device_model_of: None,
        },
    )
    .unwrap();
    for g in 0..8 {
        map_one(&mut m, &e, DomId(9), GUEST, g, Permissions::RW).unwrap();
    }
    assert_eq!(m.total_page_refs(), 16);
    m.kill_domain(&e, DomId(9));
    assert_eq!(m.total_page_refs(), 0);
    assert!(e.state().driver(DomId(9)).is_none());
}

#[test]
fn quota_exhaustion_is_enospc_and_changes_nothing() {
    let (mut m, _) = machine(Format::Vtd, 16);
    let cfg = pviommu_hv::config::Config {
        quota: 4,
        ..Default::default()
    };
    let e = pviommu_hv::Engine::new(cfg, &m).unwrap();
    for g in 0..4 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    let before = observable(&m, &e);
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW),
        Err(-28)
    );
    assert_eq!(observable(&m, &e), before);
    // Re-mapping an existing page only takes a reference: still allowed.
    assert!(map_one(&mut m, &e, DomId::DOM0, GUEST, 0, Permissions::RW).is_ok());
}
