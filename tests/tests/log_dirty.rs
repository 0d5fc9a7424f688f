//! Log-dirty mode takes device write access away from a domain: a device
//! write would bypass the dirty log (migration would lose it). On Xen the
//! shadow-op domctl turns the mode on (`paging_log_dirty_enable`), after
//! which writable maps of the domain are refused, and then revokes every
//! writable mapping of it through [`Engine::revoke_writes`], one bounded
//! slice per continuation of the domctl.
//!
//! Before 2026-12-03 the hook revoked them all in one call, under Xen's
//! global `domctl_lock` (every other domctl of the host waited): about
//! 1.5 µs a mapping under QEMU, some 400 ms for a guest whose 1 GiB was
//! mapped. These tests fail with that shape (the first: one call revoked
//! every mapping).

use pviommu_abi::{Bfn, ContextId, DomId, Permissions, Request};
use pviommu_hv::engine::{SLICE_REVOKES, SLICE_VISITS};
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::{Engine, Errno};
use pviommu_tests::*;

const EACCES: i32 = -13;

/// Map `gfns` of the guest as dom0 with `perms`, in batches; their BFNs.
fn map_all(
    m: &mut SimMachine,
    e: &Engine,
    gfns: std::ops::Range<u64>,
    perms: Permissions,
) -> Vec<Bfn> {
    let mut ops: Vec<_> = gfns.map(|g| map_op(GUEST, g, perms)).collect();
    for chunk in ops.chunks_mut(1024) {
        m.guest_batch_all(e, DomId::DOM0, chunk).unwrap();
    }
    ops.iter()
        .map(|o| {
            assert_eq!(o.status, 0);
            Bfn(o.bfn)
        })
        .collect()
}

fn notices(m: &mut SimMachine, e: &Engine) -> u64 {
    m.guest_stats(e, DomId::DOM0, DomId::DOM0, 0)
        .unwrap()
        .revoked
}

#[test]
fn writable_mappings_are_revoked_in_bounded_slices_and_read_only_ones_stay() {
    const RW: u64 = 1200;
    const RO: u64 = 100;
    let (mut m, e) = machine(Format::Vtd, 2048);
    let rw = map_all(&mut m, &e, 0..RW, Permissions::RW);
    let ro = map_all(&mut m, &e, RW..RW + RO, Permissions::RO);
    // The first writable page is also mapped read-only: that one stays.
    let ro_of_rw = map_one(&mut m, &e, DomId::DOM0, GUEST, 0, Permissions::RO).unwrap();

    // The mode alone (Xen's ops->enable) revokes nothing ...
    m.set_log_dirty_mode(GUEST, true);
    assert_eq!(notices(&mut m, &e), 0);
    // ... and from then on refuses writable maps.
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 1500, Permissions::RW),
        Err(EACCES)
    );

    let mut cursor = 0;
    let mut slices = 0u32;
    loop {
        let before = notices(&mut m, &e);
        let done = e.revoke_writes(&mut m, GUEST, &mut cursor);
        slices += 1;
        let revoked = notices(&mut m, &e) - before;
        assert!(
            revoked <= SLICE_REVOKES as u64,
            "slice {slices} revoked {revoked} mappings"
        );
        // Between slices (the domctl's continuations) writable maps stay
        // refused and read-only ones work.
        assert_eq!(
            map_one(&mut m, &e, DomId::DOM0, GUEST, 1500, Permissions::RW),
            Err(EACCES)
        );
        let extra = map_one(&mut m, &e, DomId::DOM0, GUEST, 1501, Permissions::RO).unwrap();
        let mut unmap = [unmap_op(extra)];
        m.guest_batch_all(&e, DomId::DOM0, &mut unmap).unwrap();
        assert_eq!(unmap[0].status, 0);
        if done.is_ok() {
            break;
        }
        assert!(slices < 100, "no progress");
    }
    // Bounded slices, not one call: at most 256 revocations each.
    const _: () = assert!(SLICE_REVOKES <= 256);
    assert!(
        slices >= 2 && slices as u64 >= RW / SLICE_REVOKES as u64,
        "{RW} revocations in {slices} slices"
    );
    assert_eq!(notices(&mut m, &e), RW);
    for b in &rw {
        assert!(m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"x")
            .is_err());
    }
    for b in ro.iter().chain([&ro_of_rw]) {
        assert!(m
            .dma_read(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, 8)
            .is_ok());
    }
    // A finished cursor stays finished.
    assert_eq!(e.revoke_writes(&mut m, GUEST, &mut cursor), Ok(()));
    assert_eq!(notices(&mut m, &e), RW);
    assert_eq!(lock_check::violations(), 0);
}

#[test]
fn a_slice_visits_a_bounded_number_of_slots_when_little_is_writable() {
    // Many read-only mappings, few writable ones: the walk's visits bound a
    // slice, not only its revocations.
    let (mut m, e) = machine(Format::Vtd, 16384);
    let n = 3 * SLICE_VISITS;
    map_all(&mut m, &e, 0..n, Permissions::RO);
    map_all(&mut m, &e, n..n + 8, Permissions::RW);
    m.set_log_dirty_mode(GUEST, true);
    let mut cursor = 0;
    let mut slices = 1;
    while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {
        slices += 1;
        assert!(slices < 100, "no progress");
    }
    assert!(slices >= 3, "{} slots walked in {slices} slices", n + 8);
    assert_eq!(notices(&mut m, &e), 8);
}

#[test]
fn a_writable_map_in_flight_when_the_mode_goes_on_installs_nothing() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let req = match Request::parse(&map_op(GUEST, 5, Permissions::RW)).unwrap() {
        Request::Map(r) => r,
        _ => unreachable!(),
    };
    let slices = std::cell::Cell::new(0);
    let got = {
        // The map looked gfn 5 up writable; before it reaches its cell the
        // toolstack turns log-dirty on and the revocation runs to its end.
        let mut racer = Interposer::new(
            &mut m,
            Service::GetPage,
            Box::new(|m: &mut SimMachine| slices.set(m.enable_log_dirty(&e, GUEST))),
        );
        e.map(&mut racer, DomId::DOM0, &dom0, &req)
    };
    assert!(slices.get() >= 1, "the race ran");
    // It saw the sequence number move, looked again and was refused.
    assert_eq!(got.map(|_| ()), Err(Errno::Acces));
    assert!(e.state().live_mappings(DomId::DOM0).next().is_none());
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(lock_check::violations(), 0);
}

#[test]
fn each_enable_starts_a_new_revocation_and_a_domain_nobody_maps_takes_one_slice() {
    let (mut m, e) = machine(Format::Vtd, 64);
    assert_eq!(
        m.enable_log_dirty(&e, GUEST),
        1,
        "nothing mapped: one slice"
    );
    m.set_log_dirty_mode(GUEST, false);
    let first = map_all(&mut m, &e, 0..4, Permissions::RW);
    m.enable_log_dirty(&e, GUEST);
    assert_eq!(notices(&mut m, &e), 4);
    for b in &first {
        let mut unmap = [unmap_op(*b)];
        m.guest_batch_all(&e, DomId::DOM0, &mut unmap).unwrap();
    }
    // Off, writable maps again, on again: the new ones go too.
    m.set_log_dirty_mode(GUEST, false);
    map_all(&mut m, &e, 8..12, Permissions::RW);
    m.enable_log_dirty(&e, GUEST);
    assert_eq!(notices(&mut m, &e), 4);
}
