//! The engine inside Xen.
//!
//! `xen/pviommu.c` calls the `pviommu_engine_*` functions below with its
//! global engine spinlock held (see `include/pviommu_engine.h`), so the engine
//! state here is only ever touched by one vCPU at a time. Xen's primitives
//! come back in through the `pvx_*` functions, called directly (never through
//! a pointer, so Xen's CET-IBT needs no `cf_check` on them).
#![no_std]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

use pviommu_hv::config::Config;
use pviommu_hv::iommu::{BackendCaps, FlushGather, IommuBackend};
use pviommu_hv::platform::{PageKind, PageLookup, Platform, ReservedRange};
use pviommu_hv::{Bfn, ContextId, DomId, Engine, Errno, Gfn, MemAttr, Mfn, Permissions};

mod ffi {
    extern "C" {
        pub fn pvx_copy_from_guest(dst: *mut u8, guest_addr: u64, len: usize) -> i32;
        pub fn pvx_copy_to_guest(guest_addr: u64, src: *const u8, len: usize) -> i32;
        pub fn pvx_domain_exists(domid: u16) -> i32;
        pub fn pvx_is_privileged(domid: u16) -> i32;
        pub fn pvx_is_device_model_of(caller: u16, target: u16) -> i32;
        pub fn pvx_get_page(domid: u16, gfn: u64, want_write: i32, mfn: *mut u64, kind: *mut u32) -> i32;
        pub fn pvx_put_page(mfn: u64, writable: i32);
        pub fn pvx_ram_end_mfn() -> u64;
        pub fn pvx_iommu_address_bits() -> u32;
        pub fn pvx_reserved_region(index: u32, start: *mut u64, nr: *mut u64, kind: *mut u32) -> i32;
        pub fn pvx_iommu_map(owner: u16, bfn: u64, mfn: u64, flags: u32, flush: *mut u32) -> i32;
        pub fn pvx_iommu_unmap(owner: u16, bfn: u64, flush: *mut u32) -> i32;
        pub fn pvx_iommu_flush(owner: u16, bfn: u64, count: u64, flush: u32) -> i32;
        pub fn pvx_preempt_check() -> i32;
        pub fn pvx_alloc(size: usize, align: usize) -> *mut u8;
        pub fn pvx_free(ptr: *mut u8);
        pub fn pvx_log(msg: *const u8, len: usize);
        pub fn pvx_panic(msg: *const u8, len: usize) -> !;
    }
}

/// Xen's allocator.
struct XenAlloc;

unsafe impl GlobalAlloc for XenAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: _xmalloc honours any power-of-two alignment; NULL on failure.
        unsafe { ffi::pvx_alloc(layout.size(), layout.align()) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from pvx_alloc.
        unsafe { ffi::pvx_free(ptr) }
    }
}

#[global_allocator]
static ALLOC: XenAlloc = XenAlloc;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The engine is panic-free by construction; build-engine.sh reports
    // whether this handler is still reachable from the entry points.
    const MSG: &[u8] = b"pviommu: engine panic";
    // SAFETY: static message; pvx_panic does not return.
    unsafe { ffi::pvx_panic(MSG.as_ptr(), MSG.len()) }
}

fn log(msg: &str) {
    // SAFETY: `msg` is valid for `len` bytes.
    unsafe { ffi::pvx_log(msg.as_ptr(), msg.len()) }
}

fn errno_from(rc: i32) -> Errno {
    Errno::from_code(rc).unwrap_or(Errno::Inval)
}

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
    fn domain_exists(&self, domid: DomId) -> bool {
        // SAFETY: plain value call.
        unsafe { ffi::pvx_domain_exists(domid.0) == 1 }
    }
    fn is_privileged(&self, domid: DomId) -> bool {
        // SAFETY: plain value call.
        unsafe { ffi::pvx_is_privileged(domid.0) == 1 }
    }
    fn is_device_model_of(&self, caller: DomId, target: DomId) -> bool {
        // SAFETY: plain value call.
        unsafe { ffi::pvx_is_device_model_of(caller.0, target.0) == 1 }
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
    fn iommu_flush(&mut self, owner: DomId, gather: &FlushGather) {
        for (_, first, last, flags) in &gather.ranges {
            // SAFETY: plain call.
            unsafe { ffi::pvx_iommu_flush(owner.0, first.0, last.0 - first.0 + 1, *flags) };
        }
    }
}

/// The engine state. Only touched with the C glue's engine lock held.
struct EngineCell(UnsafeCell<Option<Engine>>);
// SAFETY: every access happens under xen/pviommu.c's global spinlock.
unsafe impl Sync for EngineCell {}
static ENGINE: EngineCell = EngineCell(UnsafeCell::new(None));

fn with_engine<R>(f: impl FnOnce(&mut Engine) -> R) -> Option<R> {
    // SAFETY: the caller (the C glue) holds the engine lock, so no other
    // reference to ENGINE exists while `f` runs.
    let slot = unsafe { &mut *ENGINE.0.get() };
    slot.as_mut().map(f)
}

/// Create the engine. 0 or -errno.
#[no_mangle]
pub extern "C" fn pviommu_engine_init() -> i32 {
    match Engine::new(Config::default(), &Xen) {
        Ok(e) => {
            // SAFETY: called once at boot with the engine lock held.
            unsafe { *ENGINE.0.get() = Some(e) };
            log("pviommu: engine ready\n");
            0
        }
        Err(e) => e.negated(),
    }
}

/// The hypercall body.
#[no_mangle]
pub extern "C" fn pviommu_engine_op(caller: u16, cmd: u32, arg: u64) -> i64 {
    with_engine(|e| e.hypercall(&mut Xen, DomId(caller), cmd, arg)).unwrap_or(Errno::OpNotSupp.negated() as i64)
}

/// A domain is dying.
#[no_mangle]
pub extern "C" fn pviommu_engine_domain_dying(domid: u16) {
    with_engine(|e| e.domain_dying(&mut Xen, DomId(domid)));
}

/// A gfn left a domain's p2m.
#[no_mangle]
pub extern "C" fn pviommu_engine_gfn_removed(domid: u16, gfn: u64) {
    with_engine(|e| e.gfn_removed(&mut Xen, DomId(domid), Gfn(gfn)));
}
