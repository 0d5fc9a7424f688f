//! The engine's heap budget (`pviommu=heap=MiB` on Xen): how many bytes the
//! engine may hold at once, and who may use the last of them.
//!
//! Every driver domain is bounded by its quota, but the quotas of many
//! driver domains together can exceed the cap: 48 device models at the
//! default quota hold more than the default 256 MiB, and 112 may hold
//! state at once. Were the cap shared
//! first come, first served, device models (each a stub domain its guest
//! may have taken over) could use it all, and the control domain's own
//! maps (the GPU mediator in dom0) would fail with `ENOMEM`. So the last
//! [`HOST_RESERVE_DIVISOR`]th of the cap is kept for allocations made on
//! behalf of the control or hardware domain: anyone may grow the engine's
//! heap up to the cap less that reserve, only they beyond it.
//!
//! Who counts as "the host" is Xen's `is_control_domain() ||
//! is_hardware_domain()` of the current domain, which is coarse: a device
//! model running in dom0 (QEMU) uses the reserve too, within dom0's quota;
//! a mediator in a domain that is neither (a disaggregated GPU domain)
//! never does; with no control domain (dom0less) the reserve goes unused.
//! At boot Xen runs the engine's init on the idle domain, privileged until
//! XSM marks the system active, and its tables (about 1.6 MiB) must fit
//! in the cap anyway: the glue refuses `heap=` below 8 MiB, where device
//! models would be left little or no room.
//!
//! One rule for both hosts: the Xen object's global allocator
//! (`engine-staticlib`) charges every allocation here, asking Xen whether
//! the current domain is the control or hardware domain only when an
//! allocation would reach into the reserve; the simulator's capped
//! allocator (`tests/tests/heap_budget.rs`) does the same with the
//! simulated caller. The engine allocates only in hypercalls, on behalf of
//! their caller, and at boot: hooks and teardown never allocate (the
//! allocation-failure sweep checks it), so "the current domain" is always
//! the one the bytes are for.

use core::sync::atomic::{AtomicUsize, Ordering};

/// The share of the cap kept for the control and hardware domains: one
/// quarter (64 MiB of the default 256 MiB, more than a mediator with 1 Mi
/// mappings holds: about 56 MiB).
pub const HOST_RESERVE_DIVISOR: usize = 4;

/// Bytes the engine holds, against its cap.
#[derive(Debug)]
pub struct HeapBudget {
    used: AtomicUsize,
    cap: AtomicUsize,
}

impl Default for HeapBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl HeapBudget {
    /// No bytes held, no cap (until [`set_cap`](Self::set_cap)).
    pub const fn new() -> Self {
        HeapBudget {
            used: AtomicUsize::new(0),
            cap: AtomicUsize::new(usize::MAX),
        }
    }

    /// Set the cap (Xen: once, at boot, before any driver domain maps).
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Bytes charged and not refunded.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// What anyone may hold together: the cap less the host's reserve.
    pub fn shared_limit(&self) -> usize {
        let cap = self.cap();
        cap - cap / HOST_RESERVE_DIVISOR
    }

    /// Charge `size` bytes for an allocation about to be made, if they fit:
    /// within [`shared_limit`](Self::shared_limit) for anyone, within the
    /// cap only if `for_host()` (asked only then) says the allocation is
    /// made for the control or hardware domain. `false`: nothing charged,
    /// and the allocation must fail. Two CPUs can never both pass a limit:
    /// the bytes are added only if they fit, in one atomic update.
    pub fn charge(&self, size: usize, for_host: impl FnOnce() -> bool) -> bool {
        self.charge_within(size, self.shared_limit())
            || (for_host() && self.charge_within(size, self.cap()))
    }

    fn charge_within(&self, size: usize, limit: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(size).filter(|n| *n <= limit)
            })
            .is_ok()
    }

    /// Give back `size` bytes charged earlier (an allocation freed, or one
    /// that failed after its charge). Never below 0: a refund without its
    /// charge (a bug) must not wrap the count and refuse every allocation.
    pub fn refund(&self, size: usize) {
        let before = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(size))
            })
            .unwrap_or(0);
        debug_assert!(before >= size, "refund of {size} bytes never charged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_stop_at_the_reserve_and_the_host_goes_on_to_the_cap() {
        let b = HeapBudget::new();
        b.set_cap(400);
        assert_eq!(b.shared_limit(), 300);
        assert!(b.charge(200, || panic!("not asked below the reserve")));
        assert!(b.charge(100, || panic!("not asked up to the reserve")));
        // Another driver domain: refused, nothing charged.
        assert!(!b.charge(1, || false));
        assert_eq!(b.used(), 300);
        // The host: into the reserve, up to the cap and not past it.
        assert!(b.charge(100, || true));
        assert!(!b.charge(1, || true));
        assert_eq!(b.used(), 400);
        // Freed, the shared part is open to anyone again.
        b.refund(150);
        assert!(b.charge(50, || false));
        assert!(!b.charge(1, || false));
        assert_eq!(b.used(), 300);
    }

    #[test]
    fn without_a_cap_nothing_is_refused() {
        let b = HeapBudget::new();
        assert!(b.charge(usize::MAX / 2, || false));
        assert!(
            !b.charge(usize::MAX, || true),
            "overflow refused, not wrapped"
        );
        assert_eq!(b.used(), usize::MAX / 2);
    }
}
