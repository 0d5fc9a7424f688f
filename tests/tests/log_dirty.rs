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

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, Permissions, Request};
use pviommu_hv::engine::{SLICE_REVOKES, SLICE_REVOKES_MOST, SLICE_VISITS};
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{CallEnd, Format, SimMachine};
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

/// Map each of `gfns` of the guest writable as dom0, in one batch: each
/// map's status.
fn writable_map_statuses(m: &mut SimMachine, e: &Engine, gfns: &[u64]) -> Vec<i32> {
    let mut ops: Vec<_> = gfns
        .iter()
        .map(|&g| map_op(GUEST, g, Permissions::RW))
        .collect();
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    ops.iter().map(|o| o.status).collect()
}

fn notices(m: &mut SimMachine, e: &Engine) -> u64 {
    m.guest_stats(e, DomId::DOM0, DomId::DOM0, 0)
        .unwrap()
        .revoked
}

/// `who`'s revocations whose IOMMU unmap is still being retried.
fn stuck(e: &Engine, who: DomId) -> u64 {
    e.driver_state(who).unwrap().stuck()
}

/// Log-dirty on for the guest, and its revocation's slices run with every
/// IOMMU unmap refused until `walked` (the first walk has left what it
/// should stuck); then the IOMMU works again. The revocation's cursor.
fn first_walk_with_unmaps_refused(
    m: &mut SimMachine,
    e: &Engine,
    walked: impl Fn(&Engine) -> bool,
) -> u64 {
    m.set_log_dirty_mode(GUEST, true);
    m.fail_unmaps = u32::MAX;
    let mut cursor = 0;
    let mut slices = 0;
    while !walked(e) {
        slices += 1;
        assert!(slices < 100, "the first walk does not end");
        assert!(e.revoke_writes(m, GUEST, &mut cursor).is_err());
    }
    m.fail_unmaps = 0;
    cursor
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
            revoked <= SLICE_REVOKES_MOST as u64,
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
        slices >= 2 && slices as u64 >= RW / SLICE_REVOKES_MOST as u64,
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

/// VRAM dirty tracking (a device model's `XEN_DMOP_track_dirty_vram`, HAP
/// guests) moving its range makes the range's pages device-read-only, and
/// Xen's `p2m_change_type_range` hook revokes every writable mapping of the
/// range under the guest's p2m lock. Before 2026-12-03 that hook revoked
/// them all in that one hold, as often as the device model moved the range
/// (`move_vram_range` alone still shows it: 1200 in one call). Now the
/// dm_op revokes them first, in slices, continuing itself, and the hook
/// finds nothing left.
#[test]
fn a_vram_range_change_revokes_in_slices_before_the_hook() {
    const RW: u64 = 1200;
    let (mut m, e) = machine(Format::Vtd, 4096);
    map_all(&mut m, &e, 0..RW, Permissions::RW);
    // Outside the range: stays writable.
    let outside = map_all(&mut m, &e, 3000..3004, Permissions::RW);
    let range = (0, 2048);
    let mut attempts = 0u32;
    loop {
        let before = notices(&mut m, &e);
        let r = m.track_dirty_vram_once(&e, GUEST, range);
        attempts += 1;
        assert!(notices(&mut m, &e) - before <= SLICE_REVOKES_MOST as u64);
        if r.is_ok() {
            break;
        }
        assert!(attempts < 100, "no progress");
    }
    assert!(attempts >= 2, "{RW} revocations in {attempts} attempts");
    assert_eq!(notices(&mut m, &e), RW);
    // The range is device-read-only now; outside it writes still work.
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW),
        Err(EACCES)
    );
    for b in &outside {
        assert!(m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"x")
            .is_ok());
    }
    // The same range again is a peek: nothing to revoke, one attempt.
    assert_eq!(m.track_dirty_vram(&e, GUEST, range), 1);
    assert_eq!(lock_check::violations(), 0);
}

#[test]
fn a_vram_range_the_mediator_maps_nothing_of_costs_a_probe_per_region() {
    let (mut m, e) = machine(Format::Vtd, 65536);
    // 3 * SLICE_VISITS mappings far from the range: the region counts let
    // the walk skip the cell instead of visiting every slot.
    map_all(&mut m, &e, 40000..40000 + 3 * SLICE_VISITS, Permissions::RW);
    assert_eq!(m.track_dirty_vram(&e, GUEST, (0, 4096)), 1);
    assert_eq!(notices(&mut m, &e), 0);
}

#[test]
fn a_new_range_while_another_is_in_progress_starts_over_for_its_own() {
    let (mut m, e) = machine(Format::Vtd, 4096);
    map_all(&mut m, &e, 0..1200, Permissions::RW);
    // The first range's revocation is left after one slice (its device
    // model asks for another range before continuing): that slice's walk
    // reached slots past the start of the second range's mappings.
    assert!(m.track_dirty_vram_once(&e, GUEST, (512, 1200)).is_err());
    let after_first = notices(&mut m, &e);
    // The second range starts its own walk from the first slot: each of
    // its attempts revokes within the bound, and its hook finds nothing.
    let mut attempts = 0;
    loop {
        let before = notices(&mut m, &e);
        let r = m.track_dirty_vram_once(&e, GUEST, (0, 1024));
        attempts += 1;
        assert!(
            notices(&mut m, &e) - before <= SLICE_REVOKES_MOST as u64,
            "attempt {attempts}"
        );
        if r.is_ok() {
            break;
        }
        assert!(attempts < 100);
    }
    assert!(attempts >= 2);
    // Every mapping of the second range went (the first slice's among
    // them: 256, and on to the next 2 MiB block of BFNs); the first
    // range's rest, past 1024, was left to its own call.
    assert!((SLICE_REVOKES as u64..=SLICE_REVOKES_MOST as u64).contains(&after_first));
    assert_eq!(notices(&mut m, &e), 1024);
}

/// An IOMMU that refuses an unmap, or a flush that fails, during the
/// revocation: the enable is not done until every writable entry is out of
/// the device's reach (a review of 2026-12-03: one walk then "done" left
/// them writable, and the domctl answered success).
#[test]
fn the_revocation_is_not_done_while_an_unmap_or_flush_failed() {
    // The simulator is deterministic: a first run counts the slices, a
    // second makes the IOMMU fail in the last one.
    let run = |fail_in_last: Option<(u32, u32)>, last: u32| {
        let (mut m, e) = machine(Format::Vtd, 1024);
        let rw = map_all(&mut m, &e, 0..600, Permissions::RW);
        // Every page read through the IOTLB, so a failed flush leaves it.
        for b in &rw {
            m.dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"y")
                .unwrap();
        }
        m.set_log_dirty_mode(GUEST, true);
        let mut cursor = 0;
        let mut slices = 0;
        loop {
            slices += 1;
            if let (Some((u, f)), true) = (fail_in_last, slices == last) {
                m.fail_unmaps = u;
                m.fail_flushes = f;
            }
            if e.revoke_writes(&mut m, GUEST, &mut cursor).is_ok() {
                break;
            }
            assert!(slices < 100);
        }
        let writable = rw
            .iter()
            .filter(|b| {
                m.dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"x")
                    .is_ok()
            })
            .count();
        (slices, writable)
    };
    let (n, writable) = run(None, 0);
    assert_eq!(writable, 0);
    // (An ordinary revocation never reports giving up.)
    {
        let (mut m, e) = machine(Format::Vtd, 64);
        map_all(&mut m, &e, 0..8, Permissions::RW);
        m.set_log_dirty_mode(GUEST, true);
        let mut cursor = 0;
        while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {}
        assert!(!Engine::revoke_writes_gave_up(cursor));
    }
    for fail in [(1, 0), (0, 1)] {
        let (_, writable) = run(Some(fail), n);
        assert_eq!(writable, 0, "{fail:?}: still writable after the enable");
    }
}

/// An IOMMU that keeps refusing: the enable ends after a bounded number of
/// walks (a review of 2026-12-03: it continued for ever, holding the
/// domain's paging preempt state, so the toolstack could not even turn
/// log-dirty off), and a VRAM range's revocation as well: it walks again
/// as the enable does and then fails, tracking left where it was (a review
/// of 2026-12-06: it made one walk and moved tracking whatever that walk
/// left stuck and writable, since the type change's hook cannot fail).
#[test]
fn an_iommu_that_keeps_failing_does_not_keep_the_revocation_going() {
    let (mut m, e) = machine(Format::Vtd, 1024);
    map_all(&mut m, &e, 0..600, Permissions::RW);
    m.fail_unmaps = u32::MAX;
    m.set_log_dirty_mode(GUEST, true);
    let mut cursor = 0;
    let mut slices = 1;
    while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {
        slices += 1;
        assert!(slices < 200, "no end");
    }
    // It ends, and says it gave up (Xen: the enable fails with EIO rather
    // than answer success with a device still able to write).
    assert!(Engine::revoke_writes_gave_up(cursor));
    let (mut m, e) = machine(Format::Vtd, 1024);
    map_all(&mut m, &e, 0..600, Permissions::RW);
    m.fail_flushes = u32::MAX;
    let (end, attempts) = m.track_dirty_vram_to_end(&e, GUEST, (0, 1024));
    // (Walks of 600 mappings, slices of 256 and on to a block's end, and
    // retries between them.)
    assert!(attempts >= 2, "{attempts}");
    assert_eq!(end, Err(CallEnd::GaveUp));
    assert_eq!(m.vram_range(GUEST), Some((0, 0)), "tracking moved");
}

/// However many walks an IOMMU's failures last, the revocation reports
/// giving up exactly when a device may still write (with one target: a
/// cell's retry flag also covers other targets' stuck entries) (a re-read of
/// 2026-12-03: failures that ended in the last allowed walk were reported
/// as giving up, failing an enable that had succeeded).
#[test]
fn giving_up_is_reported_exactly_when_a_mapping_stays_writable() {
    let mut seen = (false, false);
    for fails in 0..40u32 {
        let (mut m, e) = machine(Format::Vtd, 64);
        let rw = map_all(&mut m, &e, 0..8, Permissions::RW);
        // Every page read through the IOTLB, so a failed flush leaves it.
        for b in &rw {
            m.dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"y")
                .unwrap();
        }
        m.set_log_dirty_mode(GUEST, true);
        m.fail_flushes = fails;
        let mut cursor = 0;
        let mut slices = 1;
        while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {
            slices += 1;
            assert!(slices < 200, "{fails} failed flushes: no end");
        }
        m.fail_flushes = 0;
        let writable = rw.iter().any(|b| {
            m.dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"x")
                .is_ok()
        });
        assert_eq!(
            Engine::revoke_writes_gave_up(cursor),
            writable,
            "{fails} failed flushes"
        );
        let gave_up = Engine::revoke_writes_gave_up(cursor);
        seen = (seen.0 || !gave_up, seen.1 || gave_up);
    }
    assert_eq!(seen, (true, true), "both outcomes happen in the sweep");
}

/// Review of the flush's bound on stuck retries (`STUCK_RETRIES` a flush):
/// the walks again were counted alone, and each flushes a cell once, so an
/// IOMMU that refused more unmaps than 9 walks retry (2304 of a cell), and
/// then recovered, made the enable give up (`EIO`) with nothing left
/// writable once retried. Retries now go in slices of their own, a walk
/// again spent only when a slice gets no further.
#[test]
fn a_long_stuck_list_of_an_iommu_that_recovered_is_retried_to_its_end() {
    use pviommu_hv::engine::STUCK_RETRIES;
    const N: u64 = 3000;
    let (mut m, e) = machine(Format::Vtd, N + 8);
    let rw = map_all(&mut m, &e, 0..N, Permissions::RW);
    m.set_log_dirty_mode(GUEST, true);
    // The IOMMU refuses every unmap through the first walk (N revocations,
    // `SLICE_REVOKES` a slice), then recovers.
    let first_walk = N.div_ceil(u64::from(SLICE_REVOKES));
    m.fail_unmaps = u32::MAX;
    let mut cursor = 0;
    let mut slices = 0u64;
    loop {
        if slices == first_walk {
            assert!(
                stuck(&e, DomId::DOM0) > 9 * STUCK_RETRIES,
                "more stuck than the walks again retry"
            );
            m.fail_unmaps = 0;
        }
        slices += 1;
        if e.revoke_writes(&mut m, GUEST, &mut cursor).is_ok() {
            break;
        }
        assert!(slices < 1000, "no end");
    }
    assert!(
        !Engine::revoke_writes_gave_up(cursor),
        "gave up after {slices} slices"
    );
    assert_eq!(stuck(&e, DomId::DOM0), 0);
    assert!(rw.iter().all(|b| m
        .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"x")
        .is_err()));
}

/// Second review of the retry slices: each started at the lowest cell
/// that had something to retry and stopped once `STUCK_RETRIES` unmaps
/// were tried, so a cell whose IOMMU lets one unmap in 256 through (always
/// some progress) took every slice, and another cell's stuck list, whose
/// IOMMU had recovered, waited behind it. They start at the target's
/// cells in turn now: the device model's list is through within a few
/// slices, while dom0's still trickles.
#[test]
fn retry_slices_take_the_targets_cells_in_turn() {
    const N: u64 = 600;
    let (mut m, e) = machine(Format::Vtd, 2 * N + 8);
    map_all(&mut m, &e, 0..N, Permissions::RW);
    let mut ops: Vec<_> = (N..2 * N)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    // The first walk: every unmap refused.
    let mut cursor = first_walk_with_unmaps_refused(&mut m, &e, |e| {
        stuck(e, DomId::DOM0) == N && stuck(e, DEVICE_MODEL) == N
    });
    // Then dom0's IOMMU lets one unmap in 256 through; the device
    // model's has recovered.
    m.fail_unmaps_of = Some((DomId::DOM0, 256));
    let mut slices = 0;
    while stuck(&e, DEVICE_MODEL) > 0 {
        slices += 1;
        assert!(
            slices <= 16,
            "the device model's {} stuck entries wait behind dom0's {}",
            stuck(&e, DEVICE_MODEL),
            stuck(&e, DomId::DOM0)
        );
        assert!(e.revoke_writes(&mut m, GUEST, &mut cursor).is_err());
    }
    assert!(stuck(&e, DomId::DOM0) > N / 2, "dom0's still trickles");
    // Both IOMMUs work again: it ends, having given up on nothing.
    m.fail_unmaps_of = None;
    while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {
        slices += 1;
        assert!(slices < 10_000, "no end");
    }
    assert!(!Engine::revoke_writes_gave_up(cursor));
    assert_eq!(stuck(&e, DomId::DOM0), 0);
}

/// Second review of the retry slices: the cursor's slot counts them only
/// once the cursor is past every cell. A walk that ended because the cell
/// it stood in stopped mapping the target (its bit gone between two
/// slices) kept that cell's slot, which was read as a count of retry
/// slices: from 4096 on, none was made. Here the cursor such a walk leaves
/// (phase 1, as a target; cell 100, which maps nothing; slot 5000, as the
/// layout in `revoke.rs` packs it) must still retry dom0's stuck entries.
#[test]
fn a_walk_that_ended_in_a_cell_gone_still_retries() {
    use pviommu_hv::engine::STUCK_RETRIES;
    const N: u64 = 600;
    let (mut m, e) = machine(Format::Vtd, N + 8);
    map_all(&mut m, &e, 0..N, Permissions::RW);
    first_walk_with_unmaps_refused(&mut m, &e, |e| stuck(e, DomId::DOM0) == N);
    let mut cursor = 1 << 62 | 100 << 40 | 5000;
    assert!(e.revoke_writes(&mut m, GUEST, &mut cursor).is_err());
    assert_eq!(stuck(&e, DomId::DOM0), N - STUCK_RETRIES, "a retry slice");
}

/// In log-dirty mode a writable map is refused (`EACCES`) whatever the gfn
/// holds, before the p2m is looked at, as the glue's `pvx_lookup_page()`
/// refuses: no paging-in started for a paged-out gfn, no `ENODEV` for an
/// MMIO one, no `ENXIO` for a hole; read-only maps are looked up as ever.
/// (The simulator answered by the p2m entry first: a paged-out gfn got
/// `EAGAIN` and a paging request, an MMIO one `ENODEV`; a review's
/// comparison with the glue.)
#[test]
fn log_dirty_refuses_a_writable_map_before_looking_the_gfn_up() {
    let (mut m, e) = machine(Format::Vtd, 64);
    m.set_paged_out(GUEST, pviommu_abi::Gfn(5));
    m.set_mmio(GUEST, pviommu_abi::Gfn(6));
    m.set_log_dirty_mode(GUEST, true);
    let before = m.paging_requests;
    let statuses = writable_map_statuses(&mut m, &e, &[5, 6, 1000, 7]);
    assert_eq!(statuses, [EACCES; 4]);
    assert_eq!(m.paging_requests, before, "a refused write paged a gfn in");
    // Read-only maps still look the gfn up: the paged-out one starts
    // paging in (EAGAIN), the MMIO one is no RAM.
    let mut ops = vec![
        map_op(GUEST, 5, Permissions::RO),
        map_op(GUEST, 6, Permissions::RO),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, Errno::Again.negated());
    assert_eq!(ops[1].status, Errno::NoDev.negated());
    assert_eq!(m.paging_requests, before + 1);
    assert_eq!(lock_check::violations(), 0);
}

/// Moving VRAM tracking's range gives write access back only to what the
/// tracking took it from: Xen's `hap_track_dirty_vram` changes the old
/// range's p2m_ram_logdirty pages back to p2m_ram_rw, and a p2m_ram_ro page
/// there (read-only before the tracking, or made so during it) stays
/// read-only. (The simulator made every RAM page of the old range
/// writable: a read-only page could then be mapped writable; a review's
/// comparison with Xen.)
#[test]
fn moving_vram_tracking_leaves_read_only_pages_read_only() {
    let (mut m, e) = machine(Format::Vtd, 256);
    m.set_read_only(GUEST, pviommu_abi::Gfn(5));
    assert_eq!(m.track_dirty_vram(&e, GUEST, (0, 16)), 1);
    // Read-only during the tracking too.
    m.make_read_only(&e, GUEST, pviommu_abi::Gfn(9));
    assert_eq!(m.track_dirty_vram(&e, GUEST, (100, 116)), 1);
    let statuses = writable_map_statuses(&mut m, &e, &[5, 9, 6, 100]);
    // 5 and 9 stay read-only, 6 is rw again, 100 is tracked now.
    assert_eq!(statuses, [EACCES, EACCES, 0, EACCES]);
    // Tracking stops: the tracked range is rw again, 5 and 9 still not.
    m.track_dirty_vram(&e, GUEST, (0, 0));
    let statuses = writable_map_statuses(&mut m, &e, &[101, 5]);
    assert_eq!(statuses, [0, EACCES]);
    assert_eq!(lock_check::violations(), 0);
}

/// `who`'s revocation notices so far.
fn revoked_of(m: &mut SimMachine, e: &Engine, who: DomId) -> u64 {
    m.guest_stats(e, DomId::DOM0, who, 0).unwrap().revoked
}

/// Writable maps of a VRAM range are refused while its revocation is under
/// way (between the slices the device model's continuations make; Xen's
/// `pvx_vram_sweeping()`), read-only ones are not, and so no attempt, the
/// last with the type change's hook included, revokes more than a slice's
/// bound. Before (a review of 2026-12-06), dom0's 2000 maps made after the
/// first slice, in a cell the walk had passed, all went to the hook, which
/// revoked them in its one hold of the p2m lock: the last attempt here
/// revoked 2000, and the maps succeeded.
#[test]
fn writable_maps_of_a_vram_range_are_refused_while_its_revocation_is_under_way() {
    const DM_PAGES: u64 = 20_000;
    let (mut m, e) = machine(Format::Vtd, 65536);
    // The device model maps enough of the range that its revocation takes
    // slices; its cell comes after dom0's in the walk.
    let mut ops: Vec<_> = (40_000..40_000 + DM_PAGES)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    for chunk in ops.chunks_mut(1024) {
        m.guest_batch_all(&e, DEVICE_MODEL, chunk).unwrap();
    }
    assert!(ops.iter().all(|o| o.status == 0));
    let range = (0, 65536);
    let total =
        |m: &mut SimMachine| revoked_of(m, &e, DomId::DOM0) + revoked_of(m, &e, DEVICE_MODEL);
    assert!(m.track_dirty_vram_once(&e, GUEST, range).is_err());
    // Between the slices: dom0's writable maps of the range are refused
    // (as in log-dirty mode), its read-only ones and writable ones
    // outside the range are not.
    for first in [1, 1001] {
        let gfns: Vec<u64> = (first..first + 1000).collect();
        assert!(writable_map_statuses(&mut m, &e, &gfns)
            .iter()
            .all(|&s| s == EACCES));
    }
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RO).map(|_| ()),
        Ok(())
    );
    let mut attempts = 1;
    loop {
        let before = total(&mut m);
        let r = m.track_dirty_vram_once(&e, GUEST, range);
        attempts += 1;
        assert!(
            total(&mut m) - before <= SLICE_REVOKES_MOST as u64,
            "attempt {attempts} revoked {}",
            total(&mut m) - before
        );
        if r.is_ok() {
            break;
        }
        assert!(attempts < 1000, "no progress");
    }
    assert_eq!(total(&mut m), DM_PAGES);
    // Done: the range is device-read-only by its type now, and nothing is
    // refused by the sweep any more.
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).map(|_| ()),
        Err(EACCES)
    );
    assert_eq!(lock_check::violations(), 0);
}

/// A VRAM revocation's freeze ends with the call that finishes it, not
/// before: done, the engine keeps the range refused (its cursor done, a
/// call for the same range answers at once) until the caller lifts it after
/// the type change, so nothing mapped between the last slice and the type
/// change is left to the hook's lock hold. And every end of a later call
/// but a continuation lifts a freeze an abandoned continuation left: the
/// device model going back to its old range (a peek), or stopping. Before
/// (a review of 2026-12-06) the engine went idle when done, and nothing
/// lifted an abandoned range: writable maps of it were refused until the
/// domain died.
#[test]
fn a_vram_freeze_lasts_until_the_type_change_and_no_longer() {
    let (mut m, e) = machine(Format::Vtd, 4096);
    map_all(&mut m, &e, 0..1200, Permissions::RW);
    // The engine's contract: done, the range is still refused.
    let mut sweep = pviommu_hv::engine::RangeSweep::default();
    let mut slices = 0;
    while e
        .revoke_writes_in(&mut m, GUEST, (0, 2048), &mut sweep)
        .is_err()
    {
        slices += 1;
        assert!(slices < 100);
    }
    assert!(sweep.freezes_writes_to(0) && sweep.freezes_writes_to(2047));
    assert!(!sweep.freezes_writes_to(2048));
    // A call for the same range finds it done: nothing more to revoke.
    let before = notices(&mut m, &e);
    assert!(e
        .revoke_writes_in(&mut m, GUEST, (0, 2048), &mut sweep)
        .is_ok());
    assert_eq!(notices(&mut m, &e), before);

    // Through the device model's calls: tracking on (2048, 3072), then a
    // move to (0, 2048) abandoned after its first slice.
    let (mut m, e) = machine(Format::Vtd, 4096);
    m.track_dirty_vram(&e, GUEST, (2048, 3072));
    map_all(&mut m, &e, 0..1200, Permissions::RW);
    assert!(m.track_dirty_vram_once(&e, GUEST, (0, 2048)).is_err());
    assert_eq!(writable_map_statuses(&mut m, &e, &[1500]), [EACCES]);
    // It goes back to its old range (a peek): the freeze is lifted.
    assert!(m.track_dirty_vram_once(&e, GUEST, (2048, 3072)).is_ok());
    assert_eq!(writable_map_statuses(&mut m, &e, &[1500]), [0]);
    // Abandoned again, then tracking stops: lifted too.
    assert!(m.track_dirty_vram_once(&e, GUEST, (0, 2048)).is_err());
    assert_eq!(writable_map_statuses(&mut m, &e, &[1501]), [EACCES]);
    assert!(m.track_dirty_vram_once(&e, GUEST, (0, 0)).is_ok());
    assert_eq!(writable_map_statuses(&mut m, &e, &[1501]), [0]);
    assert_eq!(lock_check::violations(), 0);
}

/// A review of 2026-12-06: moving VRAM tracking on to a range whose
/// writable device mappings the IOMMU would not unmap (stuck: Xen's heap
/// exhausted, a folded superpage that cannot split) answered success, the
/// type change following, while the device could still write every page
/// of the range: writes the device model was told are tracked went
/// unseen. The log-dirty enable answers `-EIO` there; now the move does
/// too, before the type change, tracking left where it was and its freeze
/// lifted. Once the IOMMU recovers, the same move succeeds and leaves no
/// page device-writable.
#[test]
fn a_vram_move_the_iommu_will_not_revoke_fails_before_the_type_change() {
    let (mut m, e) = machine(Format::Vtd, 4096);
    let rw = map_all(&mut m, &e, 0..64, Permissions::RW);
    m.fail_unmaps = u32::MAX;
    let (end, _) = m.track_dirty_vram_to_end(&e, GUEST, (0, 2048));
    assert_eq!(end, Err(CallEnd::GaveUp), "moved with pages still writable");
    assert_eq!(m.vram_range(GUEST), Some((0, 0)));
    // The freeze went with the call: writable maps of the range again.
    assert!(map_one(&mut m, &e, DomId::DOM0, GUEST, 100, Permissions::RW).is_ok());
    // The IOMMU recovers: the move succeeds, and no device writes the range.
    m.fail_unmaps = 0;
    m.track_dirty_vram(&e, GUEST, (0, 2048));
    assert_eq!(m.vram_range(GUEST), Some((0, 2048)));
    for b in &rw {
        assert!(m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"z")
            .is_err());
    }
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(lock_check::violations(), 0);
}

/// A review of 2026-12-06: whether a VRAM move gave up was decided by the
/// retry flags of the cells that map the guest, which a stuck entry of
/// any domain's page sets: one page of another guest's folded 2 MiB run
/// whose unmap could not split (Xen's heap short) failed the move of a
/// range whose writable mappings had all gone. Now the revocation looks at
/// the stuck entries themselves (`writes_may_remain`): the guest's own
/// writable ones count, wherever they are (a re-review: their gfn may no
/// longer be their frame's), another domain's do not.
#[test]
fn another_domains_stuck_entry_does_not_fail_a_vram_move() {
    use pviommu_hv::sim::DomainSpec;
    const OTHER: DomId = DomId(4);
    // dom0's 512 frames, the guest's 4096, then the other guest's 512:
    // each 2 MiB aligned in gfns and frames alike.
    let mut m = SimMachine::new(8192, Format::Vtd, 512);
    for (d, pages) in [(GUEST, 4096), (OTHER, 512)] {
        let spec = DomainSpec {
            pages,
            privileged: false,
            device_model_of: None,
        };
        m.create_domain(d, spec).unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    let mut big: Vec<_> = (0..512)
        .map(|g| map_op(OTHER, g, Permissions::RW))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut big).unwrap();
    assert!(big.iter().all(|o| o.status == 0));
    let vram = map_all(&mut m, &e, 0..64, Permissions::RW);
    // Heap short: the unmap of one page of the other's folded run cannot
    // split.
    m.fail_table_allocs(Some(0));
    let mut un = [unmap_op(Bfn(big[40].bfn))];
    m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().stuck(), 1);
    let (end, _) = m.track_dirty_vram_to_end(&e, GUEST, (0, 2048));
    assert_eq!(end, Ok(()), "refused for another domain's stuck entry");
    assert_eq!(m.vram_range(GUEST), Some((0, 2048)));
    for b in &vram {
        assert!(m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"z")
            .is_err());
    }
    // The other guest's log-dirty enable still fails for it.
    let mut cursor = 0;
    m.set_log_dirty_mode(OTHER, true);
    while e.revoke_writes(&mut m, OTHER, &mut cursor).is_err() {}
    assert!(Engine::revoke_writes_gave_up(cursor));
}

/// A re-review of 2026-12-06: a stuck writable entry recorded under a gfn
/// outside the new VRAM range, whose frame the guest has since moved into
/// the range (`XENMEM_add_to_physmap`: the hook of its old gfn made it
/// stuck), still lets the device write a page of the tracked range. The
/// first form of `writes_may_remain` matched the entry's recorded gfn and
/// let the move succeed; now any writable stuck entry of the guest's
/// fails it.
#[test]
fn a_stuck_entry_whose_page_moved_into_the_vram_range_fails_its_move() {
    let (mut m, e) = machine(Format::Vtd, 4096);
    let [b] = map_all(&mut m, &e, 3000..3001, Permissions::RW)[..] else {
        unreachable!()
    };
    let frame = m.mfn_of(GUEST, Gfn(3000)).unwrap();
    m.fail_unmaps = u32::MAX;
    m.add_to_physmap_range(&e, GUEST, Gfn(3000), Gfn(100), 1)
        .unwrap();
    assert_eq!(m.mfn_of(GUEST, Gfn(100)), Some(frame));
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().stuck(), 1);
    let (end, _) = m.track_dirty_vram_to_end(&e, GUEST, (0, 2048));
    assert!(m
        .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"dirty")
        .is_ok());
    assert_eq!(
        end,
        Err(CallEnd::GaveUp),
        "tracked while its frame stays writable"
    );
}

/// The same re-review: an owner's unmap whose clear the IOMMU refused
/// stays an Unmapping slot marked present (not on the stuck list, no
/// longer counted as deferred) until a release pass reaches it; with more
/// than a release budget of newer entries ahead of it, the sweep's flush
/// did not reach it, the retry flag was clear, and the move succeeded
/// while the page stayed device-writable. Refused clears are counted now
/// (`refused_clears`, in the retry flag); the log-dirty enable, whose
/// slices flush until the list drains, agreed with the device either way.
#[test]
fn a_refused_clear_deep_in_the_unmapping_list_fails_a_vram_move_while_it_lasts() {
    const FAR: u64 = 16 * 1024;
    const MANY: u64 = 8 * 1024 + 512;
    for log_dirty in [false, true] {
        let (mut m, e) = machine(Format::Vtd, FAR + MANY);
        let [b] = map_all(&mut m, &e, 100..101, Permissions::RW)[..] else {
            unreachable!()
        };
        let others = map_all(&mut m, &e, FAR..FAR + MANY, Permissions::RW);
        m.fail_flushes = u32::MAX;
        // The run's clear and the page's own both refused.
        m.fail_unmaps = 2;
        let mut un = [unmap_op(b)];
        m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
        m.fail_unmaps = 0;
        for chunk in others.chunks(512) {
            let mut ops: Vec<_> = chunk.iter().map(|&b| unmap_op(b)).collect();
            m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        }
        m.fail_flushes = 0;
        let done = if log_dirty {
            m.set_log_dirty_mode(GUEST, true);
            let mut cursor = 0;
            while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {}
            !Engine::revoke_writes_gave_up(cursor)
        } else {
            let (end, _) = m.track_dirty_vram_to_end(&e, GUEST, (0, 2048));
            end == Ok(())
        };
        let writable = m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, b"dirty")
            .is_ok();
        assert!(
            !(done && writable),
            "log-dirty {log_dirty}: done while gfn 100 stays device-writable"
        );
        check_invariants(&mut m, &e).unwrap();
    }
}
