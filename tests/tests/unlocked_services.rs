//! The engine boundary's `[unlocked]` services (`pvx_page_non_coherent`,
//! `pvx_domain_has_devices`) assert `ASSERT_NOT_IN_ATOMIC()` in the glue,
//! which Xen's pcidevs_lock (a spinlock) trips as much as a driver lock:
//! the simulator records a call of either under the devices lock as a
//! lock-order violation, as it does one under an engine lock. (In a test
//! binary of its own: the violation count is the process's.)

use pviommu_abi::{ContextId, DomId, Errno};
use pviommu_hv::iommu::IommuBackend;
use pviommu_hv::lock_check;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Mfn;

#[test]
fn unlocked_services_under_the_devices_lock_are_violations() {
    let mut m = SimMachine::new(64, Format::Vtd, 64);
    // Unlocked: no violation.
    m.owns_devices(DomId::DOM0);
    m.note_non_coherent_write(Mfn(1));
    assert_eq!(lock_check::violations(), 0);
    m.devices_lock();
    m.owns_devices(DomId::DOM0);
    assert_eq!(lock_check::violations(), 1, "owns_devices under the lock");
    m.note_non_coherent_write(Mfn(1));
    assert_eq!(lock_check::violations(), 2, "a non-coherent mark under it");
    m.devices_unlock();
    m.owns_devices(DomId::DOM0);
    assert_eq!(lock_check::violations(), 2);

    // A context's tag is asked for with its one cell held, as the Xen
    // object requires (it counts the context on that cell, and refuses
    // otherwise): without one, refused and recorded. Before, the
    // simulator gave a tag to a caller holding no cell.
    m.devices_lock();
    let root = Mfn(2);
    assert_eq!(
        m.hw_context_create(DomId::DOM0, ContextId(1), root),
        Err(Errno::Inval)
    );
    m.devices_unlock();
    assert_eq!(lock_check::violations(), 3, "a tag with no cell held");
}
