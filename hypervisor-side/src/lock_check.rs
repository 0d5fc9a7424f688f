//! The hosted driver-domain lock, with lock-order checking.
//!
//! Xen's lock order puts the target's p2m lock *before* the engine's driver
//! locks (gfn hooks run with a p2m lock held and take driver locks), so the
//! engine must never call a service that takes a p2m lock (page lookup,
//! guest copy, domain lookup) while holding one of its locks: two pCPUs
//! would deadlock. Xen itself would only show that as a hang under the right
//! race; the simulator checks it on every call: [`CheckedLock`] counts the
//! engine locks the thread holds, and the simulated services record a
//! violation ([`violations`]) when called with any held. A blocking `lock`
//! while the thread already holds one is an inversion too (the engine takes
//! one driver lock at a time; only [`crate::engine::Engine::state`] holds
//! several, taken with `try_lock` in cell order): the lock panics, naming
//! the problem, instead of deadlocking the test.

use core::sync::atomic::{AtomicU64, Ordering};
use std::cell::Cell;

use lock_api::{GuardSend, RawMutex};

thread_local! {
    static HELD: Cell<u32> = const { Cell::new(0) };
    static P2M_HOOK: Cell<Option<u16>> = const { Cell::new(None) };
    static HOST_ATOMIC: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// The engine runs where Xen holds a spinlock of its own around it: a
/// domctl's slice under `domctl_lock` (a domain's teardown, the log-dirty
/// enable's revocation). A gfn hook (under a p2m lock, [`P2mHook`]) is one
/// too. The glue's `[unlocked]` services assert `ASSERT_NOT_IN_ATOMIC()`,
/// which fires there (a debug Xen crashes); the simulated ones record such
/// a call as a violation ([`note_unlocked`]). The engine marks these
/// entry points (hosted builds only), whoever calls them.
pub struct HostAtomic(Option<&'static str>);

impl HostAtomic {
    /// Mark the engine as running under Xen's lock `what` until the guard goes.
    pub fn enter(what: &'static str) -> Self {
        Self(HOST_ATOMIC.with(|h| h.replace(Some(what))))
    }
}

impl Drop for HostAtomic {
    fn drop(&mut self) {
        HOST_ATOMIC.with(|h| h.set(self.0));
    }
}

/// The Xen lock the engine runs under on this thread ([`HostAtomic`]), if any.
pub fn host_atomic() -> Option<&'static str> {
    HOST_ATOMIC.with(|h| h.get())
}

/// Record an `[unlocked]` service called where Xen holds a spinlock around
/// the engine ([`HostAtomic`], [`P2mHook`]): a violation. (Under an engine
/// lock or the devices lock is checked as well, by [`note_service`] and
/// the simulator.)
pub fn note_unlocked(name: &str) {
    if let Some(what) = HOST_ATOMIC.with(|h| h.get()) {
        note_violation(&std::format!("{name} called under {what}"));
    } else if let Some(d) = p2m_hook_of() {
        note_violation(&std::format!("{name} called from a p2m hook of d{}", d.0));
    }
}

/// The engine's gfn hook of a domain is running on this thread. Xen calls
/// it with that domain's p2m lock held (from `p2m_set_entry`,
/// `guest_remove_page` and the like), and its mm-lock order puts that lock
/// before every other: a page lookup or guest copy from the hook would take
/// a p2m lock again under it. The engine marks its hooks (hosted builds
/// only), whoever calls them, and the simulated services count such a call
/// (`SimMachine::services_under_p2m_lock`).
pub struct P2mHook(Option<u16>);

impl P2mHook {
    /// Mark a hook of `domid`'s p2m running until the guard goes.
    pub fn enter(domid: crate::DomId) -> Self {
        Self(P2M_HOOK.with(|h| h.replace(Some(domid.0))))
    }
}

impl Drop for P2mHook {
    fn drop(&mut self) {
        P2M_HOOK.with(|h| h.set(self.0));
    }
}

/// The domain whose p2m hook this thread runs, if any.
pub fn p2m_hook_of() -> Option<crate::DomId> {
    P2M_HOOK.with(|h| h.get()).map(crate::DomId)
}

static VIOLATIONS: AtomicU64 = AtomicU64::new(0);

/// Whether this thread holds an engine lock now.
pub fn engine_lock_held() -> bool {
    HELD.with(|h| h.get()) != 0
}

/// How many engine locks this thread holds now (the engine holds one cell
/// at a time on every path that reaches the host; only
/// [`crate::engine::Engine::state`] holds several).
pub fn engine_locks_held() -> u32 {
    HELD.with(|h| h.get())
}

/// Record a service called with the engine lock held (see module docs).
pub fn note_service(name: &str) {
    if engine_lock_held() {
        VIOLATIONS.fetch_add(1, Ordering::SeqCst);
        eprintln!("lock order violation: {name} called with the engine lock held");
    }
}

/// Record a service called under a host lock it must not be called under
/// (an `[unlocked]` service with the devices lock held: Xen's
/// `ASSERT_NOT_IN_ATOMIC()` fires under pcidevs_lock, a spinlock).
pub fn note_violation(what: &str) {
    VIOLATIONS.fetch_add(1, Ordering::SeqCst);
    eprintln!("lock order violation: {what}");
}

/// Lock-order violations recorded by this process so far.
pub fn violations() -> u64 {
    VIOLATIONS.load(Ordering::SeqCst)
}

/// `parking_lot`'s raw mutex, plus the holder mark.
pub struct CheckedLock(parking_lot::RawMutex);

// SAFETY: delegates mutual exclusion to parking_lot's RawMutex; the
// thread-local mark is only set by the thread that acquired it.
unsafe impl RawMutex for CheckedLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: CheckedLock = CheckedLock(<parking_lot::RawMutex as RawMutex>::INIT);
    type GuardMarker = GuardSend;
    fn lock(&self) {
        assert!(
            !engine_lock_held(),
            "a second engine lock taken on one thread: a hook re-entered the engine from \
             a service the engine called with a lock held, or the engine nested two \
             driver locks (lock-order inversion)"
        );
        self.0.lock();
        HELD.with(|h| h.set(h.get() + 1));
    }
    fn try_lock(&self) -> bool {
        let ok = self.0.try_lock();
        if ok {
            HELD.with(|h| h.set(h.get() + 1));
        }
        ok
    }
    unsafe fn unlock(&self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        // SAFETY: the caller holds the lock.
        unsafe { self.0.unlock() }
    }
}
