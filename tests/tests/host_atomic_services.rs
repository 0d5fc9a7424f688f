//! The engine boundary's `[unlocked]` services called where Xen holds a
//! spinlock of its own around the engine: a domctl's slice (a teardown,
//! the log-dirty enable's revocation) under `domctl_lock`, a gfn hook
//! under a p2m lock. (In a test binary of its own, as
//! `unlocked_services.rs`: the violation count is the process's.)

use pviommu_abi::DomId;
use pviommu_hv::iommu::IommuBackend;
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Mfn;

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
