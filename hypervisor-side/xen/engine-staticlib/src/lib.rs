//! The engine inside Xen.
//!
//! `xen/pviommu.c` calls the `pviommu_engine_*` functions below with no
//! lock held (see `include/pviommu_engine.h`); the engine takes one of Xen's
//! driver spinlocks (`pvx_driver_lock(cell)`) itself, around one driver
//! domain's state only. Xen's
//! primitives come back in through the `pvx_*` functions, called directly
//! (never through a pointer, so Xen's CET-IBT needs no `cf_check` on them).
#![no_std]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use lock_api::RawMutex;
use pviommu_hv::config::Config;
use pviommu_hv::engine::{Engine, GfnChange};
use pviommu_hv::iommu::{BackendCaps, FlushGather, IommuBackend};
use pviommu_hv::platform::{DomainInfo, PageKind, PageLookup, Platform, ReservedRange, XsmAction};
use pviommu_hv::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions};

mod ffi {
    /// `struct pvx_domain_info` in pviommu_engine.h.
    #[repr(C)]
    #[derive(Default)]
    pub struct PvxDomainInfo {
        pub exists: u8,
        pub dying: u8,
        pub control: u8,
        pub hardware: u8,
        pub target: u16,
        pub _pad: u16,
        pub translation: u32,
        pub _pad2: u32,
    }

    extern "C" {
        pub fn pvx_driver_lock(cell: u32);
        pub fn pvx_driver_trylock(cell: u32) -> i32;
        pub fn pvx_driver_unlock(cell: u32);
        pub fn pvx_copy_from_guest(dst: *mut u8, guest_addr: u64, len: usize) -> i32;
        pub fn pvx_copy_to_guest(guest_addr: u64, src: *const u8, len: usize) -> i32;
        pub fn pvx_domain_info(domid: u16, info: *mut PvxDomainInfo);
        pub fn pvx_xsm_check(caller: u16, target: u16, action: u32) -> i32;
        pub fn pvx_get_page(domid: u16, gfn: u64, want_write: i32, mfn: *mut u64, kind: *mut u32) -> i32;
        pub fn pvx_put_page(mfn: u64, writable: i32);
        pub fn pvx_ram_end_mfn() -> u64;
        pub fn pvx_iommu_address_bits() -> u32;
        pub fn pvx_reserved_region(index: u32, start: *mut u64, nr: *mut u64, kind: *mut u32) -> i32;
        pub fn pvx_iommu_map(owner: u16, bfn: u64, mfn: u64, flags: u32, flush: *mut u32) -> i32;
        pub fn pvx_iommu_unmap(owner: u16, bfn: u64, flush: *mut u32) -> i32;
        pub fn pvx_iommu_flush(owner: u16, bfn: u64, count: u64, flush: u32) -> i32;
        pub fn pvx_preempt_check() -> i32;
        pub fn pvx_random_seed() -> u64;
        pub fn pvx_now_ns() -> u64;
        pub fn pvx_notify_revoked(owner: u16);
        pub fn pvx_alloc(size: usize, align: usize) -> *mut u8;
        pub fn pvx_free(ptr: *mut u8);
        pub fn pvx_log(msg: *const u8, len: usize);
        /// Defined nowhere: a reference to it from any entry point is a
        /// link error (build-engine.sh checks the symbol).
        pub fn pvx_unreachable_panic() -> !;
    }
}

/// Xen's allocator, with the engine's heap use counted.
struct XenAlloc;

static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);
/// The most the engine may hold at once (`pviommu=heap:MiB`), so that all
/// driver domains together, device models included, cannot exhaust Xen's
/// heap through the engine: past it an allocation fails like Xen's own
/// would, and the engine answers ENOMEM with nothing changed.
static HEAP_CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

unsafe impl GlobalAlloc for XenAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        let cap = HEAP_CAP.load(Ordering::Relaxed);
        // Reserve the bytes only if they fit: two CPUs cannot both pass the
        // cap, and a request that will fail never crowds out others.
        if HEAP_BYTES
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(size).filter(|n| *n <= cap)
            })
            .is_err()
        {
            return core::ptr::null_mut();
        }
        // SAFETY: _xmalloc honours any power-of-two alignment; NULL on failure.
        let p = unsafe { ffi::pvx_alloc(size, layout.align()) };
        if p.is_null() {
            HEAP_BYTES.fetch_sub(size, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from pvx_alloc.
        unsafe { ffi::pvx_free(ptr) }
    }
}

#[global_allocator]
static ALLOC: XenAlloc = XenAlloc;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The engine is panic-free by construction. This handler refers to a
    // symbol nothing defines, and build-engine.sh fails the build if the
    // linked object still references it: a reachable panic cannot ship.
    // SAFETY: never actually called (see above).
    unsafe { ffi::pvx_unreachable_panic() }
}

fn log(msg: &str) {
    // SAFETY: `msg` is valid for `len` bytes.
    unsafe { ffi::pvx_log(msg.as_ptr(), msg.len()) }
}

fn errno_from(rc: i32) -> Errno {
    Errno::from_code(rc).unwrap_or(Errno::Inval)
}

/// One of Xen's driver spinlocks (`pvx_driver_locks[cell]` in
/// xen/pviommu.c), as a `lock_api` raw mutex so the engine's
/// `Mutex<XenLock, DriverDomain>` guards use it. Made for each cell by
/// `Engine::with_locks`; `INIT` (cell 0) is never used by the engine.
struct XenLock {
    cell: u32,
}

// SAFETY: pvx_driver_lock/unlock are a real mutual-exclusion lock per cell;
// the guard is not Send (a Xen spinlock is released on the CPU that took it).
unsafe impl RawMutex for XenLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: XenLock = XenLock { cell: 0 };
    type GuardMarker = lock_api::GuardNoSend;
    fn lock(&self) {
        // SAFETY: plain call; the cell number is below PVX_DRIVER_CELLS.
        unsafe { ffi::pvx_driver_lock(self.cell) }
    }
    fn try_lock(&self) -> bool {
        // Only `Engine::state` uses it (nothing inside Xen calls that), but
        // a real try-lock keeps it from spinning forever if one ever does.
        // SAFETY: plain call; the cell number is below PVX_DRIVER_CELLS.
        unsafe { ffi::pvx_driver_trylock(self.cell) != 0 }
    }
    unsafe fn unlock(&self) {
        // SAFETY: the caller holds the lock.
        unsafe { ffi::pvx_driver_unlock(self.cell) }
    }
}

type XenEngine = Engine<XenLock>;

// pvx_driver_locks[] in xen/pviommu.c has PVX_DRIVER_CELLS (64) entries.
const _: () = assert!(pviommu_hv::engine::MAX_DRIVER_DOMAINS == 64);

const DOMID_NONE: u16 = 0xffff;

/// The hypervisor as the engine sees it: every method is one `pvx_*` call.
struct Xen;

impl Platform for Xen {
    fn copy_from_guest(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        // SAFETY: `buf` is valid for writes of its length.
        match unsafe { ffi::pvx_copy_from_guest(buf.as_mut_ptr(), addr, buf.len()) } {
            0 => Ok(()),
            _ => Err(Errno::Fault),
        }
    }
    fn copy_to_guest(&mut self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        // SAFETY: `buf` is valid for reads of its length.
        match unsafe { ffi::pvx_copy_to_guest(addr, buf.as_ptr(), buf.len()) } {
            0 => Ok(()),
            _ => Err(Errno::Fault),
        }
    }
    fn domain_info(&self, domid: DomId) -> Option<DomainInfo> {
        let mut i = ffi::PvxDomainInfo::default();
        // SAFETY: out-pointer to a local of the C layout.
        unsafe { ffi::pvx_domain_info(domid.0, &mut i) };
        (i.exists != 0).then_some(DomainInfo {
            dying: i.dying != 0,
            control: i.control != 0,
            hardware: i.hardware != 0,
            target: (i.target != DOMID_NONE).then_some(DomId(i.target)),
            translation: i.translation,
        })
    }
    fn xsm_check(&self, caller: DomId, target: Option<DomId>, action: XsmAction) -> Result<(), Errno> {
        let action = match action {
            XsmAction::Query => 0,
            XsmAction::Map => 1,
            XsmAction::Manage => 2,
        };
        // SAFETY: plain value call.
        match unsafe { ffi::pvx_xsm_check(caller.0, target.map_or(DOMID_NONE, |t| t.0), action) } {
            0 => Ok(()),
            rc => Err(errno_from(rc)),
        }
    }
    fn get_page(&mut self, domid: DomId, gfn: Gfn, want_write: bool) -> Result<PageLookup, Errno> {
        let mut mfn = 0u64;
        let mut kind = 0u32;
        // SAFETY: out-pointers to locals.
        let rc = unsafe { ffi::pvx_get_page(domid.0, gfn.0, want_write as i32, &mut mfn, &mut kind) };
        if rc != 0 {
            return Err(errno_from(rc));
        }
        let kind = match kind {
            0 => PageKind::RamRw,
            1 => PageKind::RamRo,
            2 => PageKind::Grant,
            3 => PageKind::Mmio,
            4 => PageKind::NotPresent,
            5 => PageKind::PagedOut,
            7 => PageKind::LogDirty,
            _ => PageKind::XenOwned,
        };
        let referenced = matches!(kind, PageKind::RamRw) || (kind == PageKind::RamRo && !want_write);
        Ok(PageLookup { kind, mfn: referenced.then_some(Mfn(mfn)) })
    }
    fn put_page(&mut self, mfn: Mfn, writable: bool) {
        // SAFETY: releases a reference pvx_get_page took.
        unsafe { ffi::pvx_put_page(mfn.0, writable as i32) }
    }
    fn ram_end(&self) -> Mfn {
        // SAFETY: plain call.
        Mfn(unsafe { ffi::pvx_ram_end_mfn() })
    }
    fn reserved_range(&self, index: usize) -> Option<ReservedRange> {
        let (mut start, mut nr, mut kind) = (0u64, 0u64, 0u32);
        let index = u32::try_from(index).ok()?;
        // SAFETY: out-pointers to locals.
        let rc = unsafe { ffi::pvx_reserved_region(index, &mut start, &mut nr, &mut kind) };
        (rc == 0).then_some(ReservedRange { start, nr, kind })
    }
    fn should_preempt(&mut self) -> bool {
        // SAFETY: plain call.
        unsafe { ffi::pvx_preempt_check() != 0 }
    }
    fn notify_revoked(&mut self, owner: DomId) {
        // SAFETY: plain call.
        unsafe { ffi::pvx_notify_revoked(owner.0) }
    }
    fn random_seed(&self) -> u64 {
        // SAFETY: plain call (get_random(), RDRAND where available).
        unsafe { ffi::pvx_random_seed() }
    }
    fn now_ns(&self) -> u64 {
        // SAFETY: plain call (NOW()).
        unsafe { ffi::pvx_now_ns() }
    }
}

impl IommuBackend for Xen {
    fn iommu_caps(&self) -> BackendCaps {
        BackendCaps {
            // Xen 4.17 has one IOMMU context per domain, and x86 iommu_map()
            // takes no memory-type argument: WB (snooped) only.
            max_contexts: 1,
            features: 0,
            page_sizes: 1 << 12,
            // SAFETY: plain call.
            address_bits: unsafe { ffi::pvx_iommu_address_bits() },
        }
    }
    fn context_create(&mut self, _owner: DomId, _ctx: ContextId) -> Result<(), Errno> {
        Err(Errno::OpNotSupp)
    }
    fn context_destroy(&mut self, _owner: DomId, _ctx: ContextId) {}
    fn iommu_map(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        _attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        if ctx != ContextId::DEFAULT {
            return Err(Errno::NoEnt);
        }
        let mut flush = 0u32;
        // SAFETY: out-pointer to a local.
        let rc = unsafe { ffi::pvx_iommu_map(owner.0, bfn.0, mfn.0, perms.flag_bits() as u32, &mut flush) };
        if rc != 0 {
            return Err(errno_from(rc));
        }
        gather.add(ctx, bfn, flush)
    }
    fn iommu_unmap(&mut self, owner: DomId, ctx: ContextId, bfn: Bfn, gather: &mut FlushGather) -> Result<(), Errno> {
        let mut flush = 0u32;
        // SAFETY: out-pointer to a local.
        let rc = unsafe { ffi::pvx_iommu_unmap(owner.0, bfn.0, &mut flush) };
        if rc != 0 {
            return Err(errno_from(rc));
        }
        gather.add(ctx, bfn, flush)
    }
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather) -> Result<(), Errno> {
        let mut result = Ok(());
        for r in gather.ranges() {
            let count = r.last.0.wrapping_sub(r.first.0).wrapping_add(1);
            // SAFETY: plain call.
            let rc = unsafe { ffi::pvx_iommu_flush(owner.0, r.first.0, count, r.flags) };
            if rc != 0 {
                result = Err(errno_from(rc));
            }
        }
        result
    }
}

/// The engine, created once at boot. After that it is only read through a
/// shared reference: the engine locks its own state.
struct EngineCell(UnsafeCell<Option<XenEngine>>);
// SAFETY: written once by pviommu_engine_init (the initcall, before any
// hypercall or hook can run), then only shared; the engine is Sync.
unsafe impl Sync for EngineCell {}
static ENGINE: EngineCell = EngineCell(UnsafeCell::new(None));

fn engine() -> Option<&'static XenEngine> {
    // SAFETY: see EngineCell: no writer exists after init.
    unsafe { (*ENGINE.0.get()).as_ref() }
}

/// Create the engine. 0 or -errno. `quota`/`max_batch` of 0 mean default.
#[no_mangle]
pub extern "C" fn pviommu_engine_init(quota: u64, max_batch: u32, heap_bytes: u64) -> i32 {
    #[cfg(feature = "panic-canary")]
    {
        let mut v = alloc::vec::Vec::new();
        v.push(quota);
        core::hint::black_box(&v);
    }
    let mut config = Config::default();
    if heap_bytes != 0 {
        HEAP_CAP.store(usize::try_from(heap_bytes).unwrap_or(usize::MAX), Ordering::Relaxed);
    }
    if quota != 0 {
        config.quota = quota;
    }
    if max_batch != 0 {
        config.max_batch_ops = max_batch.min(pviommu_hv::config::MAX_BATCH_OPS_LIMIT);
    }
    match XenEngine::with_locks(config, &Xen, |cell| XenLock { cell: cell as u32 }) {
        Ok(e) => {
            // SAFETY: called once at boot, before any other entry point.
            unsafe { *ENGINE.0.get() = Some(e) };
            log("pviommu: engine ready\n");
            0
        }
        Err(e) => e.negated(),
    }
}

/// The hypercall body (no lock held by the caller).
#[no_mangle]
pub extern "C" fn pviommu_engine_op(caller: u16, cmd: u32, arg: u64) -> i64 {
    match engine() {
        Some(e) => e.hypercall(&mut Xen, DomId(caller), cmd, arg),
        None => Errno::OpNotSupp.negated() as i64,
    }
}

/// One slice of a dying domain's teardown: 0 done, -ERESTART call again.
#[no_mangle]
pub extern "C" fn pviommu_engine_domain_teardown(domid: u16, cursor: *mut u64) -> i32 {
    const ERESTART: i32 = -85;
    let Some(e) = engine() else { return 0 };
    // SAFETY: the glue passes a pointer to the cursor in struct domain.
    let Some(cursor) = (unsafe { cursor.as_mut() }) else { return 0 };
    match e.domain_teardown(&mut Xen, DomId(domid), cursor) {
        Ok(()) => 0,
        Err(_) => ERESTART,
    }
}

/// A p2m change of `domid` succeeded: revoke what it invalidated.
#[no_mangle]
pub extern "C" fn pviommu_engine_gfn_changed(domid: u16, gfn: u64, order: u32, how: u32) {
    let Some(e) = engine() else { return };
    let how = if how == 1 { GfnChange::WriteLost } else { GfnChange::Removed };
    e.gfn_changed(&mut Xen, DomId(domid), Gfn(gfn), order, how);
}
