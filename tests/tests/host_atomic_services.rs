//! The engine boundary's `[unlocked]` services called where Xen holds a
//! spinlock of its own around the engine: a domctl's slice (a teardown,
//! the log-dirty enable's revocation) under `domctl_lock`, a gfn hook
//! under a p2m lock. (In a test binary of its own, as
//! `unlocked_services.rs`: the violation count is the process's.)

use pviommu_abi::{DomId, Permissions};
use pviommu_hv::iommu::IommuBackend;
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Mfn;
use pviommu_tests::*;

/// Where Xen holds a spinlock of its own around the engine (a domctl's
/// slice under `domctl_lock`, a gfn hook under a p2m lock), the glue's
/// `ASSERT_NOT_IN_ATOMIC()` fires in an `[unlocked]` service as it does
/// under the devices lock: the simulator records each such call. Before (a
/// review of 2026-12-06) it checked those services only under an engine
/// lock or the devices lock, and an engine that called one from its
/// teardown or a hook would have passed here and crashed a debug Xen.
#[test]
fn unlocked_services_where_xen_holds_a_spinlock_are_violations() {
    let mut m = SimMachine::new(64, Format::Vtd, 64);
    let before = lock_check::violations();
    {
        let _slice = lock_check::HostAtomic::enter("domctl_lock");
        m.owns_devices(DomId::DOM0);
        let _ = m.domain_info(DomId::DOM0);
    }
    assert_eq!(lock_check::violations(), before + 2);
    {
        let _hook = lock_check::P2mHook::enter(DomId(1));
        m.note_non_coherent_write(Mfn(1));
    }
    assert_eq!(lock_check::violations(), before + 3);
    // Outside them: none.
    m.owns_devices(DomId::DOM0);
    let _ = m.domain_info(DomId::DOM0);
    assert_eq!(lock_check::violations(), before + 3);
}

/// The engine marks the slices Xen runs under `domctl_lock` (a target's
/// teardown, a log-dirty revocation), whoever calls them: the wake-ups
/// they send are seen under the mark. (Without the marks the check above
/// would guard nothing: a review of 2026-12-06.)
#[test]
fn the_engine_marks_its_domctl_slices() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let mut ops: Vec<_> = (0..8).map(|g| map_op(GUEST, g, Permissions::RW)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(m.wakeups_under_domctl_lock, 0);
    // Log-dirty on: the revocation's slices send dom0 its wake-up.
    m.set_log_dirty_mode(GUEST, true);
    let mut cursor = 0;
    while e.revoke_writes(&mut m, GUEST, &mut cursor).is_err() {}
    assert!(m.wakeups_under_domctl_lock > 0, "log-dirty slices unmarked");
    let after_log_dirty = m.wakeups_under_domctl_lock;
    // Read-only maps left: the guest's teardown revokes them.
    m.set_log_dirty_mode(GUEST, false);
    let mut ops: Vec<_> = (8..16).map(|g| map_op(GUEST, g, Permissions::RO)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    m.kill_domain(&e, GUEST);
    assert!(
        m.wakeups_under_domctl_lock > after_log_dirty,
        "teardown slices unmarked"
    );
    assert_eq!(lock_check::host_atomic(), None, "a mark outlived its slice");
}
