//! The engine inside Xen.
//!
//! `xen/pviommu.c` calls the `pviommu_engine_*` functions below with no
//! lock held (see `include/pviommu_engine.h`); the engine takes one of Xen's
//! driver spinlocks (`pvx_driver_lock(cell)`) itself, around one driver
//! domain's state only. Xen's
//! primitives come back in through the `pvx_*` functions, called directly
//! (never through a pointer, so Xen's CET-IBT needs no `cf_check` on them).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::{Cell, UnsafeCell};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use lock_api::RawMutex;
use pviommu_hv::abi::feature;
use pviommu_hv::config::Config;
use pviommu_hv::engine::{cell_mask_of_words, cells_in, Engine, EngineBug, GfnChange, RangeSweep};
use pviommu_hv::heap_budget::HeapBudget;
use pviommu_hv::iommu::{
    BackendCaps, DeviceFacts, FlushGather, HwContext, IommuBackend, OwnTables, TableFormat,
};
use pviommu_hv::pgtable::sync::DirtyLines;
use pviommu_hv::pgtable::{TableMemory, ENTRIES};
use pviommu_hv::platform::{
    CheckedTarget, DomainInfo, PageKind, PageLookup, PageRun, PageSlot, Platform, ReservedRange,
    XsmAction,
};
use pviommu_hv::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions, Sbdf};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod xen_model;

mod ffi {
    /// `struct pvx_checked_target` in pviommu_engine.h: the target's
    /// sequence number and its value at the map's checks.
    #[repr(C)]
    pub struct PvxCheckedTarget {
        pub seq: *const u32,
        pub checked: u32,
    }

    impl From<pviommu_hv::platform::CheckedTarget<'_>> for PvxCheckedTarget {
        fn from(t: pviommu_hv::platform::CheckedTarget<'_>) -> Self {
            let (seq, checked) = t.raw_parts();
            PvxCheckedTarget { seq, checked }
        }
    }

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
        pub fn pvx_driver_held_mask() -> *const u64;
        pub fn pvx_copy_from_guest(dst: *mut u8, guest_addr: u64, len: usize) -> i32;
        pub fn pvx_copy_to_guest(guest_addr: u64, src: *const u8, len: usize) -> i32;
        pub fn pvx_domain_info(domid: u16, info: *mut PvxDomainInfo);
        pub fn pvx_xsm_check(caller: u16, target: u16, action: u32) -> i32;
        pub fn pvx_xsm_attach(caller: u16, sbdf: u32) -> i32;
        pub fn pvx_get_page(
            domid: u16,
            gfn: u64,
            want_write: i32,
            target: *const PvxCheckedTarget,
            mfn: *mut u64,
            kind: *mut u32,
        ) -> i32;
        pub fn pvx_get_pages(
            domid: u16,
            nr: u32,
            want_write: i32,
            target: *const PvxCheckedTarget,
            frames: *mut u64,
            refused: *mut u32,
        ) -> u32;
        pub fn pvx_put_page(mfn: u64, writable: i32);
        pub fn pvx_ram_end_mfn() -> u64;
        pub fn pvx_iommu_address_bits() -> u32;
        pub fn pvx_reserved_region(
            index: u32,
            start: *mut u64,
            nr: *mut u64,
            kind: *mut u32,
        ) -> i32;
        pub fn pvx_iommu_map(
            owner: u16,
            bfn: u64,
            mfn: u64,
            count: u64,
            flags: u32,
            flush: *mut u32,
        ) -> i32;
        pub fn pvx_iommu_unmap(owner: u16, bfn: u64, count: u64, flush: *mut u32) -> i32;
        pub fn pvx_iommu_flush(owner: u16, bfn: u64, count: u64, flush: u32) -> i32;
        pub fn pvx_preempt_check() -> i32;
        pub fn pvx_random_seed() -> u64;
        pub fn pvx_now_ns() -> u64;
        pub fn pvx_notify_revoked(owner: u16);
        #[cfg_attr(test, allow(dead_code))]
        pub fn pvx_alloc(size: usize, align: usize) -> *mut u8;
        #[cfg_attr(test, allow(dead_code))]
        pub fn pvx_free(ptr: *mut u8);
        pub fn pvx_ctx_caps(levels: *mut u32, snoop_control: *mut i32) -> i32;
        pub fn pvx_page_non_coherent(mfn: u64);
        pub fn pvx_table_alloc(mfn: *mut u64) -> i32;
        pub fn pvx_table_free(mfn: u64) -> i32;
        pub fn pvx_table_map(mfn: u64) -> *mut u64;
        pub fn pvx_table_unmap(table: *const u64);
        pub fn pvx_table_sync(mfn: u64, lines: u64) -> i32;
        pub fn pvx_tables_coherent() -> i32;
        pub fn pvx_default_context_snooped() -> i32;
        pub fn pvx_ctx_alloc(tag: *mut u16) -> i32;
        pub fn pvx_ctx_free(tag: u16) -> i32;
        pub fn pvx_domain_has_devices(domid: u16) -> i32;
        pub fn pvx_current_is_host() -> i32;
        pub fn pvx_ctx_flush(tag: u16, bfn: u64, count: u64) -> i32;
        pub fn pvx_devices_lock();
        pub fn pvx_devices_unlock();
        pub fn pvx_device_facts(sbdf: u32, owner: *mut u16, flags: *mut u32) -> i32;
        pub fn pvx_device_attach(sbdf: u32, tag: u16, root_mfn: u64) -> i32;
        pub fn pvx_device_detach(sbdf: u32, tag: u16) -> i32;
        pub fn pvx_log(msg: *const u8, len: usize);
        pub fn pvx_log_error(msg: *const u8, len: usize) -> i32;
        /// Defined nowhere: a reference to it from any entry point is a
        /// link error (build-engine.sh checks the symbol).
        #[cfg(not(test))]
        pub fn pvx_unreachable_panic() -> !;
    }
}

/// Xen's allocator, with the engine's heap use counted.
#[cfg_attr(test, allow(dead_code))]
struct XenAlloc;

/// The most the engine may hold at once (`pviommu=heap=MiB`), so that all
/// driver domains together, device models included, cannot exhaust Xen's
/// heap through the engine: past it an allocation fails like Xen's own
/// would, and the engine answers ENOMEM with nothing changed. Its last
/// quarter is kept for the control and hardware domains
/// (`pviommu_hv::heap_budget`: the rule the simulator's tests use too).
static HEAP: HeapBudget = HeapBudget::new();

/// Whether the current domain, for which the engine allocates (it does
/// only in hypercalls and at boot), is the control or hardware domain.
fn current_is_host() -> bool {
    // SAFETY: plain call.
    unsafe { ffi::pvx_current_is_host() != 0 }
}

/// What the heap cap counts for `_xmalloc(size, align)` (the same for the
/// charge and the refund): at least the block Xen's allocator takes for
/// it. A request is padded for its alignment (`align - MEM_ALIGN`,
/// MEM_ALIGN 16). Below a page it comes from the TLSF pool
/// (`xmem_pool_alloc()`): rounded to 16 bytes (16 at least), then, from
/// `SMALL_BLOCK` up, to its size class's granule (`MAPPING_SEARCH()`: a
/// 32nd of the power of two below it), plus the 16-byte block header, plus
/// the tail of a free block the pool does not split (it splits only a tail
/// of a whole header, 32 bytes, or more: up to 16 bytes stay with the
/// block). A class larger than any block of a one-page pool region
/// (`PAGE - 2 * BHDR_OVERHEAD`) is never found there: `_xmalloc()` falls
/// back to whole pages. The pool grows a page at a time, so a block is
/// counted at least its share of a page among the blocks of its class that
/// fit in one (a class two of which cannot share a page: the whole page).
/// Anything else is whole pages too
/// (`xmalloc_whole_pages()`, which frees the tail past the request's last
/// page). What the count cannot see is the pool's fragmentation: a region
/// goes back to Xen only once all its blocks are freed. History: the cap
/// counted the requested bytes only until 2026-12-07 (a review: a
/// 64-byte-aligned request of 100 bytes takes up to 192); neither the class
/// rounding nor the unsplit tail until the 47th session (a 2000-byte
/// request takes up to 2048, not 2016), nor a block's share of its page
/// (reviews 152 and 153: a 2048-byte class was counted 2080 while two of
/// them took two pages; a 1376-byte one 1408 where two take a page).
fn xen_heap_bytes(layout: Layout) -> usize {
    const MEM_ALIGN: usize = 16;
    const BHDR_OVERHEAD: usize = 16;
    const UNSPLIT_TAIL: usize = 16;
    const SMALL_BLOCK: usize = 128;
    const MAX_LOG2_SLI: u32 = 5;
    const PAGE: usize = 4096;
    let whole_pages = layout
        .size()
        .checked_next_multiple_of(PAGE)
        .unwrap_or(usize::MAX);
    let padded = layout
        .size()
        .saturating_add(layout.align().max(MEM_ALIGN) - MEM_ALIGN);
    if padded >= PAGE {
        return whole_pages;
    }
    let rounded = padded.max(MEM_ALIGN).next_multiple_of(MEM_ALIGN);
    let class = if rounded < SMALL_BLOCK {
        rounded
    } else {
        // flsl(rounded) - 1 is the index of its top bit.
        let granule = 1usize << (usize::BITS - 1 - rounded.leading_zeros() - MAX_LOG2_SLI);
        rounded.next_multiple_of(granule)
    };
    // The free block of a fresh region: n blocks of a class fit in it with
    // the headers of all but the first (the region's own is outside it).
    const REGION_BLOCK: usize = PAGE - 2 * BHDR_OVERHEAD;
    if class > REGION_BLOCK {
        return whole_pages;
    }
    let per_region = (REGION_BLOCK + BHDR_OVERHEAD) / (class + BHDR_OVERHEAD);
    (class + BHDR_OVERHEAD + UNSPLIT_TAIL).max(PAGE.div_ceil(per_region.max(1)))
}

unsafe impl GlobalAlloc for XenAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let charged = xen_heap_bytes(layout);
        // Charge the bytes only if they fit: two CPUs cannot both pass the
        // cap, and a request that will fail never crowds out others.
        if !HEAP.charge(charged, current_is_host) {
            return core::ptr::null_mut();
        }
        // SAFETY: _xmalloc honours any power-of-two alignment; NULL on failure.
        let p = unsafe { ffi::pvx_alloc(layout.size(), layout.align()) };
        if p.is_null() {
            HEAP.refund(charged);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.refund(xen_heap_bytes(layout));
        // SAFETY: `ptr` came from pvx_alloc.
        unsafe { ffi::pvx_free(ptr) }
    }
}

// Hosted tests (`cargo test`) run on std's allocator and panic handler,
// with xen_model.rs standing in for the pvx_* functions.
#[cfg(not(test))]
#[global_allocator]
static ALLOC: XenAlloc = XenAlloc;

#[cfg(not(test))]
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

/// A glue call's failure: [`pviommu_hv::platform::host_errno`] (the rule
/// the simulator's injected failures follow too).
fn errno_from(rc: i32) -> Errno {
    pviommu_hv::platform::host_errno(rc)
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

// pvx_driver_locks[] in xen/pviommu.c has PVX_DRIVER_CELLS (128) entries,
// and pvx_cells_held one word per 64 of them.
const _: () = assert!(pviommu_hv::engine::MAX_DRIVER_DOMAINS == 128);

const DOMID_NONE: u16 = 0xffff;

/// `PVX_PAGE_NONE` (pviommu_engine.h): `pvx_get_pages()` stopped without an
/// answer for the page after its run.
const PVX_PAGE_NONE: u32 = u32::MAX;

// The `PVX_PAGE_*` kinds of pviommu_engine.h (`tests.rs` reads the header
// and checks each of these constants against it).
const PVX_PAGE_RAM_RW: u32 = 0;
const PVX_PAGE_RAM_RO: u32 = 1;
const PVX_PAGE_GRANT: u32 = 2;
const PVX_PAGE_MMIO: u32 = 3;
const PVX_PAGE_NOT_PRESENT: u32 = 4;
const PVX_PAGE_PAGED_OUT: u32 = 5;
const PVX_PAGE_XEN: u32 = 6;
const PVX_PAGE_LOG_DIRTY: u32 = 7;

/// A `PVX_PAGE_*` kind (pviommu_engine.h). A code it does not know is
/// Xen-owned: never mapped.
fn page_kind(kind: u32) -> PageKind {
    match kind {
        PVX_PAGE_RAM_RW => PageKind::RamRw,
        PVX_PAGE_RAM_RO => PageKind::RamRo,
        PVX_PAGE_GRANT => PageKind::Grant,
        PVX_PAGE_MMIO => PageKind::Mmio,
        PVX_PAGE_NOT_PRESENT => PageKind::NotPresent,
        PVX_PAGE_PAGED_OUT => PageKind::PagedOut,
        PVX_PAGE_LOG_DIRTY => PageKind::LogDirty,
        PVX_PAGE_XEN => PageKind::XenOwned,
        _ => PageKind::XenOwned,
    }
}

// The `PVX_XSM_*` actions and `PVIOMMU_GFN_*` changes of pviommu_engine.h
// (checked against it as the page kinds are).
const PVX_XSM_QUERY: u32 = 0;
const PVX_XSM_MAP: u32 = 1;
const PVX_XSM_MANAGE: u32 = 2;
const PVX_XSM_CONTROL: u32 = 3;
#[cfg_attr(not(test), allow(dead_code))] // (any other value reads as it)
const PVIOMMU_GFN_REMOVED: u32 = 0;
const PVIOMMU_GFN_WRITE_LOST: u32 = 1;

// The structs shared with pviommu_engine.h, as its BUILD_BUG_ON()s in the
// glue see them (LP64: x86_64 and arm64, the only targets).
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ffi::PvxDomainInfo>() == 16);
    assert!(offset_of!(ffi::PvxDomainInfo, target) == 4);
    assert!(offset_of!(ffi::PvxDomainInfo, translation) == 8);
    assert!(size_of::<ffi::PvxCheckedTarget>() == 16);
    assert!(offset_of!(ffi::PvxCheckedTarget, checked) == 8);
    assert!(size_of::<pviommu_hv::engine::RangeSweep>() == 24);
};

/// The hypervisor as the engine sees it: every method is one `pvx_*` call,
/// but for table entries, which the engine reads and writes directly in
/// table frames it maps once per entry point (`maps`, unmapped on drop).
/// One per entry point, on one CPU (not `Send`: the mapped pointers).
struct Xen {
    /// Mapped table frames: (mfn, pointer); a null pointer is a free slot.
    maps: [Cell<(u64, *mut u64)>; MAPPED_TABLES],
    /// The slot the next new mapping replaces.
    next: Cell<usize>,
    /// The slot [`table`](Self::table) answered last, looked at first: a
    /// map or unmap reads and writes one leaf table several times.
    last: Cell<usize>,
    /// Cells (bit n: cell n) whose dirty set this entry point noted a store
    /// in: written back before it returns ([`Drop`]).
    touched: Cell<Cells>,
    /// A table frame was refused during this entry point (see
    /// [`Xen::refused`]).
    fault: Cell<bool>,
    /// This CPU's mask of the driver locks it holds
    /// (`pvx_driver_held_mask`), looked up at its first use; null before.
    held: Cell<*const u64>,
}

// `Xen` must stay `!Send` (its mapped-table pointers and the held-lock
// mask are this CPU's): this stops compiling if a field change made it
// `Send` (the trait method is ambiguous exactly when `Xen: Send`).
const _: fn() = || {
    trait AmbiguousIfSend<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    let _ = <Xen as AmbiguousIfSend<_>>::some_item;
};

/// Table frames mapped at once: a walk's four levels.
const MAPPED_TABLES: usize = 4;

impl Xen {
    const fn new() -> Self {
        Xen {
            maps: [const { Cell::new((0, core::ptr::null_mut())) }; MAPPED_TABLES],
            next: Cell::new(0),
            last: Cell::new(0),
            touched: Cell::new(0),
            fault: Cell::new(false),
            held: Cell::new(core::ptr::null()),
        }
    }

    /// The cells this CPU holds the lock of (bit n: cell n). Read from
    /// this CPU's mask, whose address is asked for once per entry point
    /// (every table store asks which cell's dirty set it goes in, and a
    /// call per store cost as much under TCG as the rest of the store).
    /// An entry point runs on one CPU from start to end, and `Xen` is not
    /// `Send`: nothing in it returns to the guest before it ends (the
    /// continuation is made after), and where it can sleep, an HVM/PVH
    /// caller's guest copy or page lookup waiting in x86 `wait()` for a
    /// paged-out page, Xen pins the vCPU to its CPU for the wait
    /// (`VCPU_AFFINITY_WAIT`), and a vCPU whose pin broke meanwhile is
    /// never resumed in its frame: `check_wakeup_from_wait()` crashes its
    /// domain instead (`common/wait.c`, 4.17 and 4.20 alike; Arm reaches no
    /// `wait()` from these paths). This cache rests on that rule.
    /// [`Xen::moved_cpu`] is only a tripwire for a Xen that broke it,
    /// asked at each flush, context creation and attach and at the entry
    /// point's end: between a move and its check, a store would be noted
    /// by the old CPU's mask, in a cell this CPU may not hold (undefined
    /// behaviour, not a closed failure: a review of 2026-12-07).
    #[inline(always)]
    fn held_cells(&self) -> Cells {
        let mut mask = self.held.get();
        if mask.is_null() {
            mask = self.held_mask();
        }
        if mask.is_null() {
            // Not expected. "None held" sends every store straight to
            // memory (note_store), the safe side.
            return 0;
        }
        // SAFETY: this CPU's per-CPU variable, CELLS / 64 words (valid
        // while Xen runs on it, which is the whole entry point); changed
        // only by this CPU's pvx_driver_lock/unlock, so plain loads see its
        // current value.
        cell_mask_of_words(
            (0..CELLS / 64).map(|w| unsafe { core::ptr::read_volatile(mask.add(w)) }),
        )
    }

    /// [`held_cells`](Self::held_cells)'s first use in an entry point.
    #[cold]
    #[inline(never)]
    fn held_mask(&self) -> *const u64 {
        // SAFETY: plain call: the address of this CPU's mask.
        let mask = unsafe { ffi::pvx_driver_held_mask() };
        self.held.set(mask);
        mask
    }

    /// Whether this entry point is no longer on the CPU whose mask it read
    /// (see [`held_cells`](Self::held_cells)): asked before every flush,
    /// context creation and attach ([`sync_tables`](Self::sync_tables)), and
    /// when the entry point ends (one call each; none if the mask was never
    /// read). Were it moved (a Xen that resumed a waiting vCPU elsewhere,
    /// which Xen 4.17 and 4.20 never do: see
    /// [`held_cells`](Self::held_cells)), its stores may have been noted in
    /// another CPU's cell without that cell's lock and a flush may miss
    /// them: this and every later flush, of every driver domain, then
    /// fails (as after a refused frame), so no page is released that the
    /// IOMMU may still reach from then on, for good: the host needs a
    /// reboot, and says so once. What happened between the move and this
    /// check is not undone.
    fn moved_cpu(&self) -> bool {
        let mask = self.held.get();
        if mask.is_null() {
            return false;
        }
        // SAFETY: plain call.
        if unsafe { ffi::pvx_driver_held_mask() } == mask {
            return false;
        }
        self.fault.set(true);
        ALL_FAULTED.store(true, Ordering::Release);
        say_fault(FAULT_MOVED_CPU);
        true
    }

    /// The dirty set of the one cell this CPU holds, if it holds exactly
    /// one (the engine never holds two).
    fn sole_held_cell(&self) -> Option<&'static CellDirty> {
        let held = self.held_cells();
        if held.count_ones() == 1 {
            CELL_DIRTY.get(held.trailing_zeros() as usize)
        } else {
            None
        }
    }

    /// `table` mapped (map_domain_page), reusing a mapping of this entry
    /// point's; null if Xen refused it (not one of the engine's table
    /// frames: then the access is reported, see [`Xen::refused`]).
    #[inline]
    fn table(&self, table: Mfn) -> *mut u64 {
        if let Some(m) = self.maps.get(self.last.get()) {
            let (mfn, p) = m.get();
            if !p.is_null() && mfn == table.0 {
                return p;
            }
        }
        self.table_slow(table)
    }

    /// [`table`](Self::table) when it is not the one answered last.
    #[inline(never)]
    fn table_slow(&self, table: Mfn) -> *mut u64 {
        for (i, m) in self.maps.iter().enumerate() {
            let (mfn, p) = m.get();
            if !p.is_null() && mfn == table.0 {
                self.last.set(i);
                return p;
            }
        }
        // SAFETY: plain call; Xen checks the frame is one of the engine's
        // table frames (pvx_table_alloc) and answers NULL otherwise.
        let p = unsafe { ffi::pvx_table_map(table.0) };
        if p.is_null() {
            self.refused();
            return p;
        }
        let i = self.next.get() % MAPPED_TABLES;
        self.next.set((i + 1) % MAPPED_TABLES);
        self.last.set(i);
        if let Some(m) = self.maps.get(i) {
            let (_, old) = m.replace((table.0, p));
            if !old.is_null() {
                // SAFETY: a mapping pvx_table_map gave, no longer used.
                unsafe { ffi::pvx_table_unmap(old) }
            }
        }
        p
    }

    /// Drop every table mapping: at the entry point's end, and before each
    /// service that may run long or enter the engine again on this CPU (a
    /// guest copy, a page lookup; `Platform for Xen` calls this first). A PV
    /// caller's mappings come from its vCPU's mapcache, 16 entries in all
    /// (x86 `domain_page.c`, a debug build, or frames above the directmap),
    /// and a lookup of a PoD guest's page can map 16 of its own there and
    /// run the engine's gfn hook nested, which maps more: with this entry
    /// point's 4 held across, Xen's `BUG_ON()` fired (a review of
    /// 2026-12-07). The next store maps its table again; the directmap
    /// makes that a check and an address on a release build.
    #[inline(never)]
    fn unmap_tables(&self) {
        for m in &self.maps {
            if m.get().1.is_null() {
                continue;
            }
            let (_, p) = m.replace((0, core::ptr::null_mut()));
            // SAFETY: a mapping pvx_table_map gave, no longer used (the
            // engine keeps no table pointer: each access asks `table()`).
            unsafe { ffi::pvx_table_unmap(p) }
        }
    }

    /// Drop the mapping of `table`, if any (it is being freed).
    fn unmap_table(&self, table: Mfn) {
        for m in &self.maps {
            let (mfn, p) = m.get();
            if !p.is_null() && mfn == table.0 {
                m.set((0, core::ptr::null_mut()));
                // SAFETY: a mapping pvx_table_map gave, no longer used.
                unsafe { ffi::pvx_table_unmap(p) }
            }
        }
    }

    /// Xen refused a table frame (map or write-back): a read answered
    /// "empty" and a store or write-back was lost, so the tables may no
    /// longer say what the engine believes (a cleared leaf may still map a
    /// page in memory). The walker's `TableMemory` calls cannot fail, so
    /// the failure is reported where the backend can: every later flush,
    /// context creation and device attach of the cells this CPU holds (or
    /// of all cells, when it holds none) fails, and a page or table is
    /// released only after a successful flush. Nothing repairs the tables;
    /// the fault lasts until the cell has no context left (see
    /// `hw_context_create`). Logged once (Xen also logs the frame).
    fn refused(&self) {
        self.fault.set(true);
        let held = self.held_cells();
        if held == 0 {
            ALL_FAULTED.store(true, Ordering::Release);
        }
        for cell in cells_in(held) {
            if let Some(c) = CELL_DIRTY.get(cell) {
                c.faulted.store(true, Ordering::Release);
            }
        }
        say_fault(FAULT_TABLE_REFUSED);
    }

    /// `Err(Io)` if a table frame was refused in this entry point, in a
    /// cell this CPU holds, or with no cell held (see [`Xen::refused`]), or
    /// the entry point moved CPUs (found by [`sync_tables`](Self::sync_tables),
    /// which every caller runs first).
    fn tables_ok(&self) -> Result<(), Errno> {
        let faulted = self.fault.get()
            || ALL_FAULTED.load(Ordering::Acquire)
            || cells_in(self.held_cells()).any(|cell| {
                CELL_DIRTY
                    .get(cell)
                    .is_none_or(|c| c.faulted.load(Ordering::Acquire))
            });
        if faulted {
            // A fault whose line the log's limit held back is said now.
            say_faults_unsaid();
            Err(Errno::Io)
        } else {
            Ok(())
        }
    }

    /// Write back what waits in `c` (its cell's lock held by this CPU).
    fn drain(&self, c: &CellDirty) {
        if !c.pending.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: the caller holds the cell's lock (CellDirty's rule).
        let d = unsafe { &mut *c.lines.get() };
        d.drain(|t, lines| self.write_back(t, lines));
        // Release: a CPU that reads false without the lock (Drop) sees the
        // write-backs done.
        c.pending.store(false, Ordering::Release);
    }

    /// Every store of the cells this CPU holds in memory: before a flush,
    /// a context's creation or a device's attach, all made with the
    /// owning driver domain's cell lock held (a cell's tables are only
    /// written, flushed and attached under its lock). With no cell held
    /// (not done by the engine), every cell's, each under its lock.
    fn sync_tables(&self) {
        if self.moved_cpu() {
            // The mask is another CPU's, and this one holds a cell lock
            // (a flush runs under it): write back nothing here; the flush
            // fails (`tables_ok`), and the entry point's end writes every
            // touched set back, each under its lock.
            return;
        }
        if TABLES_COHERENT.load(Ordering::Relaxed) {
            return;
        }
        let held = self.held_cells();
        if held == 0 {
            self.sync_unheld(Cells::MAX);
            return;
        }
        for cell in cells_in(held) {
            if let Some(c) = CELL_DIRTY.get(cell) {
                self.drain(c);
            }
        }
    }

    /// Write back the sets of `cells`, none of whose locks this CPU holds:
    /// each taken in turn, only where something waits. One driver lock at
    /// a time, as everywhere, with whatever Xen held on entry: the order
    /// the engine's own entry points keep.
    fn sync_unheld(&self, cells: Cells) {
        for cell in cells_in(cells) {
            let Some(c) = CELL_DIRTY.get(cell) else {
                continue;
            };
            // Acquire, paired with drain's Release: false means whatever
            // this CPU noted there was written back since.
            if !c.pending.load(Ordering::Acquire) {
                continue;
            }
            // SAFETY: plain calls; cell < CELLS; nothing between them
            // takes another lock.
            unsafe { ffi::pvx_driver_lock(cell as u32) };
            self.drain(c);
            // SAFETY: taken above.
            unsafe { ffi::pvx_driver_unlock(cell as u32) };
        }
    }

    /// Drop `table`'s record from the cells' sets of lines to write back
    /// (it is about to be written back whole, or is freed): the held
    /// cells', and any other cell's with records pending, under that cell's
    /// lock. Nothing to do where the IOMMU is coherent (no records are
    /// made). Not on an entry point that moved CPUs (this CPU's mask would
    /// not say which cells it holds: taking one it holds would spin): false,
    /// and the record stays (its lines are written back once more; the
    /// caller must not free the frame).
    fn forget_dirty_lines(&self, table: Mfn) -> bool {
        if TABLES_COHERENT.load(Ordering::Relaxed) {
            return true;
        }
        if self.moved_cpu() {
            return false;
        }
        let held = self.held_cells();
        for cell in cells_in(if held != 0 { held } else { Cells::MAX }) {
            let Some(c) = CELL_DIRTY.get(cell) else {
                continue;
            };
            let locked = held & (1 << cell) != 0;
            if !locked && !c.pending.load(Ordering::Acquire) {
                continue;
            }
            if !locked {
                // SAFETY: plain call; no cell held (not done by the engine).
                unsafe { ffi::pvx_driver_lock(cell as u32) };
            }
            // SAFETY: this CPU holds the cell's lock.
            unsafe { &mut *c.lines.get() }.forget(table);
            if !locked {
                // SAFETY: taken above.
                unsafe { ffi::pvx_driver_unlock(cell as u32) };
            }
        }
        true
    }

    #[inline(never)]
    fn write_back(&self, table: Mfn, lines: u64) {
        // SAFETY: plain call; Xen refuses a frame not the engine's.
        if unsafe { ffi::pvx_table_sync(table.0, lines) } != 0 {
            self.refused();
        }
    }
}

impl Drop for Xen {
    fn drop(&mut self) {
        // Every table store of this entry point is in memory before it
        // returns (nothing to do when its last flush wrote them back or
        // another CPU's flush of the same cell did). The engine has let go
        // of every driver lock by now.
        // (Were this entry point moved to another CPU, the mask would be
        // that CPU's: every touched set is then taken under its lock.)
        let held = if self.moved_cpu() {
            0
        } else {
            self.held_cells()
        };
        for cell in cells_in(self.touched.get() & held) {
            if let Some(c) = CELL_DIRTY.get(cell) {
                self.drain(c);
            }
        }
        self.sync_unheld(self.touched.get() & !held);
        self.unmap_tables();
    }
}

/// Driver cells: `pvx_driver_locks[]` has one per cell.
const CELLS: usize = pviommu_hv::engine::MAX_DRIVER_DOMAINS;

/// A set of cells (bit n: cell n), as the per-CPU held mask reads.
type Cells = pviommu_hv::engine::CellMask;

/// Table cache lines stored to and not yet written back to memory (a
/// non-coherent IOMMU reads memory, not the cache), one set per driver
/// cell. Rule: a cell's set is touched only with the cell's driver lock
/// held by this CPU, and the engine writes a driver domain's tables, and
/// flushes, creates and attaches its contexts, only under that lock; so a
/// store of one driver domain waits in its own set, and the flush that
/// releases a page (whichever CPU and hypercall it runs in: the engine
/// keeps a gather across hypercalls when a flush fails) finds it there.
/// Written back ([`Xen::sync_tables`]) before every invalidation of the
/// engine's contexts (`hw_flush`), context creation and device attach,
/// and, for every cell an entry point noted in, before it returns
/// ([`Drop`]); a frame's record is dropped before the frame is freed. Not
/// at a driver lock's release: the engine drops it every few maps
/// (MAP_CHUNK), which would write back per chunk again. Two driver domains
/// writing their own tables share nothing (the old single set for all
/// cells behind one global spinlock serialised every store).
#[repr(align(64))]
struct CellDirty {
    lines: UnsafeCell<DirtyLines>,
    /// `lines` may hold something: set with the lock held when a store is
    /// noted, cleared (Release) with it held when the set is drained; read
    /// without the lock only to skip taking it when there is nothing.
    pending: AtomicBool,
    /// A table frame was refused with this cell's lock held: its contexts
    /// fail every later flush (see [`Xen::refused`]), until the cell has
    /// no context left and a creation clears it.
    faulted: AtomicBool,
    /// Hardware contexts created under this cell and not yet destroyed:
    /// when there are none, no table a lost store was meant for can still
    /// be walked, and the next creation clears `faulted` (see
    /// `hw_context_create`). Changed with the cell's lock held.
    contexts: AtomicU32,
}
// SAFETY: `lines` is only touched with the cell's driver lock held.
unsafe impl Sync for CellDirty {}

impl CellDirty {
    const fn new() -> Self {
        CellDirty {
            lines: UnsafeCell::new(DirtyLines::new()),
            pending: AtomicBool::new(false),
            faulted: AtomicBool::new(false),
            contexts: AtomicU32::new(0),
        }
    }
}

static CELL_DIRTY: [CellDirty; CELLS] = [const { CellDirty::new() }; CELLS];
/// A table frame was refused with no cell held: every cell's contexts fail
/// their flushes from then on.
static ALL_FAULTED: AtomicBool = AtomicBool::new(false);
/// The faults after which the host needs a reboot, each a bit: seen
/// (`FAULTS_SEEN`) and said on Xen's console (`FAULTS_SAID`).
static FAULTS_SEEN: AtomicU32 = AtomicU32::new(0);
static FAULTS_SAID: AtomicU32 = AtomicU32::new(0);
/// An entry point moved CPUs ([`Xen::moved_cpu`]).
const FAULT_MOVED_CPU: u32 = 1 << 0;
/// A table frame was refused ([`Xen::refused`]).
const FAULT_TABLE_REFUSED: u32 = 1 << 1;

/// Note fault `which` and say it once, through `pvx_log_error`: not the
/// guest class, whose host-wide rate limit a guest's own messages can use
/// up (an audit of 2026-12-06: these went through `pvx_log`, and one flag
/// for both was set whether or not the line was printed, so the only word
/// that the engine stopped releasing pages could be lost, and the second
/// fault was never said). Held back by that log's own limit (a line a
/// second), it is said at the next sighting of a fault
/// ([`Xen::tables_ok`], every flush of a faulted cell) or at the end of
/// the next entry point (`report_engine_bugs`), whichever comes first.
fn say_fault(which: u32) {
    FAULTS_SEEN.fetch_or(which, Ordering::Relaxed);
    say_faults_unsaid();
}

#[cold]
#[inline(never)]
fn say_faults_unsaid() {
    let unsaid = FAULTS_SEEN.load(Ordering::Relaxed) & !FAULTS_SAID.load(Ordering::Relaxed);
    if unsaid == 0 {
        return;
    }
    for (which, line) in [
        (
            FAULT_MOVED_CPU,
            "pviommu: an engine entry point moved CPUs; flushes refused from now on\n",
        ),
        (
            FAULT_TABLE_REFUSED,
            "pviommu: an engine table frame was refused; its contexts flush no more\n",
        ),
    ] {
        if unsaid & which == 0 {
            continue;
        }
        // Claimed first (one CPU says it), given back if not printed.
        if FAULTS_SAID.fetch_or(which, Ordering::Relaxed) & which != 0 {
            continue;
        }
        // SAFETY: `line` is valid for its length.
        if unsafe { ffi::pvx_log_error(line.as_ptr(), line.len()) } == 0 {
            FAULTS_SAID.fetch_and(!which, Ordering::Relaxed);
        }
    }
}
/// Back to the state at boot, for the next hosted test (the model's
/// `serial()` calls it with no cell lock held and no `Xen` alive).
#[cfg(test)]
fn reset_backend_state() {
    for c in &CELL_DIRTY {
        // SAFETY: no other test runs (serial) and no CPU holds a cell.
        unsafe { *c.lines.get() = DirtyLines::new() };
        c.pending.store(false, Ordering::Relaxed);
        c.faulted.store(false, Ordering::Relaxed);
        c.contexts.store(0, Ordering::Relaxed);
    }
    ALL_FAULTED.store(false, Ordering::Relaxed);
    FAULTS_SEEN.store(0, Ordering::Relaxed);
    FAULTS_SAID.store(0, Ordering::Relaxed);
    REPORT_FIRST.store(0, Ordering::Relaxed);
    // SAFETY: plain call (the model).
    TABLES_COHERENT.store(
        unsafe { ffi::pvx_tables_coherent() } != 0,
        Ordering::Relaxed,
    );
}

/// Every IOMMU unit walks tables coherently with the CPU caches
/// (`pvx_tables_coherent` at boot): stores are neither noted nor written
/// back.
static TABLES_COHERENT: AtomicBool = AtomicBool::new(false);

/// A device's writes through a write-back map of a driver domain's own
/// tables snoop the CPU caches (`pvx_default_context_snooped` at boot;
/// false until then, which only costs cache flushes).
static DEFAULT_CONTEXT_SNOOPED: AtomicBool = AtomicBool::new(false);

// The guest copies and page lookups first drop every table mapping
// (`Xen::unmap_tables`): none is held across them.
impl Platform for Xen {
    fn copy_from_guest(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.unmap_tables();
        // SAFETY: `buf` is valid for writes of its length.
        match unsafe { ffi::pvx_copy_from_guest(buf.as_mut_ptr(), addr, buf.len()) } {
            0 => Ok(()),
            _ => Err(Errno::Fault),
        }
    }
    fn copy_to_guest(&mut self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        self.unmap_tables();
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
    fn xsm_check(
        &self,
        caller: DomId,
        target: Option<DomId>,
        action: XsmAction,
    ) -> Result<(), Errno> {
        let action = match action {
            XsmAction::Query => PVX_XSM_QUERY,
            XsmAction::Map => PVX_XSM_MAP,
            XsmAction::Manage => PVX_XSM_MANAGE,
            XsmAction::Control => PVX_XSM_CONTROL,
            XsmAction::Attach(device) => {
                // SAFETY: plain value call.
                return match unsafe { ffi::pvx_xsm_attach(caller.0, device.0) } {
                    0 => Ok(()),
                    rc => Err(errno_from(rc)),
                };
            }
        };
        // SAFETY: plain value call.
        match unsafe { ffi::pvx_xsm_check(caller.0, target.map_or(DOMID_NONE, |t| t.0), action) } {
            0 => Ok(()),
            rc => Err(errno_from(rc)),
        }
    }
    // Inlined: the build's check finds the speculation barrier in the
    // engine function that calls the glue.
    #[inline(always)]
    fn get_page(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        want_write: bool,
        target: CheckedTarget<'_>,
    ) -> Result<PageLookup, Errno> {
        self.unmap_tables();
        // What the glue must write over: unwritten, no page (kind 0 is
        // `PVX_PAGE_RAM_RW`, mfn 0 a frame: a glue that returned 0 without
        // writing them would have had frame 0 mapped writable).
        let mut mfn = u64::MAX;
        let mut kind = PVX_PAGE_NONE;
        let target = ffi::PvxCheckedTarget::from(target);
        // SAFETY: pointers to locals; the number `target` points at is the
        // engine's, which outlives the call (the glue only reads it).
        let rc = unsafe {
            ffi::pvx_get_page(
                domid.0,
                gfn.0,
                want_write as i32,
                &target,
                &mut mfn,
                &mut kind,
            )
        };
        if rc != 0 {
            return Err(errno_from(rc));
        }
        let kind = page_kind(kind);
        let referenced =
            matches!(kind, PageKind::RamRw) || (kind == PageKind::RamRo && !want_write);
        Ok(PageLookup {
            kind,
            mfn: referenced.then_some(Mfn(mfn)),
        })
    }
    // Inlined, as `get_page`: the build's check finds the speculation
    // barrier in the engine function that calls the glue.
    #[inline(always)]
    fn get_pages(
        &mut self,
        domid: DomId,
        want_write: bool,
        pages: &mut [PageSlot],
        target: CheckedTarget<'_>,
    ) -> PageRun {
        self.unmap_tables();
        let nr = u32::try_from(pages.len()).unwrap_or(u32::MAX);
        let mut refused = PVX_PAGE_NONE;
        let target = ffi::PvxCheckedTarget::from(target);
        // SAFETY: `pages` is `nr` (or more) frame numbers (`PageSlot` is a
        // transparent u64), gfns in; the glue writes at most `nr` frames
        // over them. The other pointers are to locals; the number `target`
        // points at is the engine's, which outlives the call (only read).
        let got = unsafe {
            ffi::pvx_get_pages(
                domid.0,
                nr,
                want_write as i32,
                &target,
                pages.as_mut_ptr().cast::<u64>(),
                &mut refused,
            )
        };
        // (The glue writes and references at most `nr`.)
        debug_assert!(got as usize <= pages.len());
        PageRun {
            taken: (got as usize).min(pages.len()),
            refused: (refused != PVX_PAGE_NONE).then(|| page_kind(refused)),
        }
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
    fn note_non_coherent_write(&mut self, mfn: Mfn) {
        // SAFETY: a frame pvx_get_page referenced (writable type held).
        unsafe { ffi::pvx_page_non_coherent(mfn.0) }
    }
    fn now_ns(&self) -> u64 {
        // SAFETY: plain call (NOW()).
        unsafe { ffi::pvx_now_ns() }
    }
}

/// What `pvx_ctx_caps` said at boot: 0 when the IOMMU offers no contexts
/// of the engine's own, else the levels its units walk, with bit 8 set
/// for snoop control. Read on every map, so kept rather than asked.
static CTX_CAPS: AtomicU32 = AtomicU32::new(0);
const CTX_SNOOP: u32 = 1 << 8;

/// What `pvx_iommu_address_bits` said at init (fixed from boot): read on
/// every writable map (the caps say whether the tables snoop), where a call
/// into the glue cost as much under TCG as 40 instructions. 0 before init:
/// asked then.
static ADDRESS_BITS: AtomicU32 = AtomicU32::new(0);

fn address_bits() -> u32 {
    match ADDRESS_BITS.load(Ordering::Relaxed) {
        // SAFETY: plain call.
        0 => unsafe { ffi::pvx_iommu_address_bits() },
        bits => bits,
    }
}

/// Contexts per driver domain when the IOMMU offers them.
const XEN_MAX_CONTEXTS: u32 = 8;

/// The engine's contexts on Xen/Arm are SMMU stage-2 tables in the Arm
/// LPAE format; on x86 they are VT-d second-level tables (AMD-Vi offers
/// none: `pvx_ctx_caps` fails there).
const LPAE: bool = cfg!(target_arch = "aarch64");

/// Where the walker's count of present entries in a table (0..=512, 10
/// bits) lives: bits the hardware ignores in every entry it may sit in,
/// present or not.
///
/// * VT-d: bits 52..61 of entry 0 are ignored in every second-level entry
///   (QEMU's intel-iommu: `VTD_SL_IGN_COM`).
/// * Arm LPAE stage 2: no 10 such bits in one entry. Bits 52..54 of a page
///   or block are Contiguous and XN, 59..62 PBHA, and 59..63 of a table
///   descriptor RES0; bits 55..58 are ignored in table descriptors and
///   reserved for software in pages and blocks (Arm ARM D8.3). So the
///   count is spread over bits 55..58 of entries 0, 1 and 2 (4 bits each).
#[derive(Clone, Copy, Debug)]
struct CountLayout {
    /// Entries 0..slots hold a part each.
    slots: usize,
    /// Where the part sits in its entry.
    shift: u32,
    /// Bits per part.
    bits: u32,
}

impl CountLayout {
    /// The part's bits in an entry.
    const fn mask(self) -> u64 {
        ((1 << self.bits) - 1) << self.shift
    }
    /// The count's bits in entry `index` (none past the first `slots`).
    const fn bits_at(self, index: usize) -> u64 {
        if index < self.slots {
            self.mask()
        } else {
            0
        }
    }
    /// The bits of `count` that entry `slot` holds, in place.
    fn part(self, count: u16, slot: usize) -> u64 {
        ((u64::from(count) >> (self.bits * slot as u32)) << self.shift) & self.mask()
    }
    /// Entry `slot`'s part of the count, from its raw value.
    fn share(self, raw: u64, slot: usize) -> u64 {
        ((raw & self.mask()) >> self.shift) << (self.bits * slot as u32)
    }
    /// Entry `index` of the table at `frame` without the count's bits,
    /// and the table's count.
    ///
    /// # Safety
    /// `frame` points to a mapped table of `ENTRIES` words, `index <
    /// ENTRIES`, and `self.slots <= ENTRIES` (asserted at build time).
    #[inline(always)]
    unsafe fn load_counted(self, frame: *const u64, index: usize) -> (u64, u16) {
        // SAFETY: as the caller's (index < ENTRIES).
        let entry = unsafe { core::ptr::read_volatile(frame.add(index)) };
        // SAFETY: as the caller's.
        (entry & !self.bits_at(index), unsafe {
            self.load_count(frame)
        })
    }
    /// The count of the table at `frame`, from its parts.
    ///
    /// # Safety
    /// `frame` points to a mapped table of `ENTRIES` words (and
    /// `self.slots <= ENTRIES`, asserted at build time).
    #[inline(always)]
    unsafe fn load_count(self, frame: *const u64) -> u16 {
        // SAFETY: only called with i < self.slots <= ENTRIES.
        let word = |i: usize| unsafe { core::ptr::read_volatile(frame.add(i)) };
        (0..self.slots).fold(0, |c, slot| c | self.share(word(slot), slot)) as u16
    }
    /// Store `count` into the count's parts of the table at `frame`, each
    /// entry's other bits kept as the CPU holds them; entry `except` (one
    /// just stored with its part, or none when `except >= slots`) is left.
    ///
    /// # Safety
    /// As [`load_count`](Self::load_count).
    #[inline(always)]
    unsafe fn store_count(self, frame: *mut u64, count: u16, except: usize) {
        for slot in (0..self.slots).filter(|&slot| slot != except) {
            // SAFETY: slot < self.slots <= ENTRIES.
            unsafe {
                let old = core::ptr::read_volatile(frame.add(slot));
                let raw = (old & !self.mask()) | self.part(count, slot);
                core::ptr::write_volatile(frame.add(slot), raw);
            }
        }
    }
    /// Store `raw` into entry `index` of the table at `frame` and `count`
    /// into the count's parts: the entry whole, in one 8-byte store (the
    /// IOMMU may walk it at any time), carrying its part when it holds
    /// one; then the other parts, each entry's other bits kept as the CPU
    /// holds them.
    ///
    /// # Safety
    /// As [`load_counted`](Self::load_counted).
    #[inline(always)]
    unsafe fn store_counted(self, frame: *mut u64, index: usize, raw: u64, count: u16) {
        let entry = if index < self.slots {
            (raw & !self.mask()) | self.part(count, index)
        } else {
            raw
        };
        // SAFETY: as the caller's (index < ENTRIES).
        unsafe {
            core::ptr::write_volatile(frame.add(index), entry);
            self.store_count(frame, count, index);
        }
    }
}

/// VT-d: bits 52..61 of entry 0.
const VTD_COUNT: CountLayout = CountLayout {
    slots: 1,
    shift: 52,
    bits: 10,
};
/// Arm LPAE: bits 55..58 of entries 0, 1 and 2.
const LPAE_COUNT: CountLayout = CountLayout {
    slots: 3,
    shift: 55,
    bits: 4,
};
/// This build's layout (both are tested on every host: `src/tests.rs`).
const COUNT: CountLayout = if LPAE { LPAE_COUNT } else { VTD_COUNT };
// Each layout holds 0..=ENTRIES, and `write_entry` keeps the count's bits of
// entries 0..slots and drops the engine's there: no format may put an
// address bit among them.
const _: () = {
    use pviommu_hv::pgtable::{lpae::Lpae, vtd::Vtd, vtd::VtdNoSnoop, PageTableFormat};
    assert!(1usize << (VTD_COUNT.slots as u32 * VTD_COUNT.bits) > ENTRIES);
    assert!(1usize << (LPAE_COUNT.slots as u32 * LPAE_COUNT.bits) > ENTRIES);
    assert!(VTD_COUNT.slots <= ENTRIES && LPAE_COUNT.slots <= ENTRIES);
    assert!(Vtd::ADDRESS_MASK & VTD_COUNT.mask() == 0);
    assert!(VtdNoSnoop::ADDRESS_MASK & VTD_COUNT.mask() == 0);
    assert!(Lpae::ADDRESS_MASK & LPAE_COUNT.mask() == 0);
};

impl Xen {
    fn table_read(&self, table: Mfn, index: usize) -> u64 {
        if index >= ENTRIES {
            return 0;
        }
        let p = self.table(table);
        if p.is_null() {
            // Refused, and reported (Xen::refused): "empty" names no frame,
            // so nothing is written elsewhere on the strength of it.
            return 0;
        }
        // SAFETY: a mapped table frame of ENTRIES entries; index checked.
        // One load: the IOMMU never writes the engine's tables, but keep
        // the access whole, as the store below.
        unsafe { core::ptr::read_volatile(p.add(index)) }
    }

    #[inline(always)]
    fn table_write(&self, table: Mfn, index: usize, raw: u64) {
        if self.table_store(table, index, raw) {
            self.note_store(table, index);
        }
    }

    /// The store of [`table_write`](Self::table_write) without its note:
    /// whether it was made (a refused frame's store is lost, and reported).
    #[inline]
    fn table_store(&self, table: Mfn, index: usize, raw: u64) -> bool {
        if index >= ENTRIES {
            return false;
        }
        let p = self.table(table);
        if p.is_null() {
            // Refused: the store is lost, and reported (Xen::refused).
            return false;
        }
        // SAFETY: as in table_read. One 8-byte store: the IOMMU may walk
        // the entry at any time.
        unsafe { core::ptr::write_volatile(p.add(index), raw) }
        true
    }

    /// Remember that a line of `table` must reach memory before the next
    /// flush (nothing on a coherent IOMMU). Noted in the set of the cell
    /// whose lock this CPU holds: no lock of its own, no atomic
    /// read-modify-write.
    #[inline(always)]
    fn note_store(&self, table: Mfn, index: usize) {
        if TABLES_COHERENT.load(Ordering::Relaxed) {
            return;
        }
        let held = self.held_cells();
        if held.count_ones() == 1 {
            let cell = held.trailing_zeros() as usize;
            if let Some(c) = CELL_DIRTY.get(cell) {
                self.touched.set(self.touched.get() | held);
                if !c.pending.load(Ordering::Relaxed) {
                    c.pending.store(true, Ordering::Relaxed);
                }
                // SAFETY: this CPU holds the cell's lock (CellDirty's rule).
                let d = unsafe { &mut *c.lines.get() };
                // A record pushed out of a full set is written back at
                // once, still under the cell's lock.
                if let Some((t, lines)) = d.note(table, index) {
                    self.write_back(t, lines);
                }
                return;
            }
        }
        // No cell lock held, or several (the engine does neither): which
        // set would the flush look in? Write the line back now.
        self.write_back(table, DirtyLines::line_bit(index));
    }
}

impl TableMemory for Xen {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        let mut mfn = 0u64;
        // SAFETY: out-pointer to a local.
        match unsafe { ffi::pvx_table_alloc(&mut mfn) } {
            0 => Ok(Mfn(mfn)),
            rc => Err(errno_from(rc)),
        }
    }
    fn free_table(&mut self, table: Mfn) {
        // Nothing of it is needed in memory any more (the flush is done),
        // and it must not be mapped or written back once it is Xen's.
        self.unmap_table(table);
        if !self.forget_dirty_lines(table) {
            // A record of it may stay in a cell's set, to be written back
            // later: the frame is kept (never given back to Xen) rather
            // than written back once it is someone else's. Only after an
            // entry point moved CPUs, which has already refused flushes
            // from then on.
            return;
        }
        // SAFETY: plain call; Xen refuses a frame that is not one of the
        // engine's table frames (a double free among them).
        if unsafe { ffi::pvx_table_free(table.0) } != 0 {
            self.refused();
        }
    }
    /// One mapping, one pass over the raw words (the count bits included:
    /// a recycled frame's count is 0). A refused frame is not clear.
    fn table_is_clear(&self, table: Mfn) -> bool {
        let p = self.table(table);
        if p.is_null() {
            return false;
        }
        let mut any = 0u64;
        for i in 0..ENTRIES {
            // SAFETY: a mapped table frame of ENTRIES entries.
            any |= unsafe { core::ptr::read_volatile(p.add(i)) };
        }
        any == 0
    }
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.table_read(table, index) & !COUNT.bits_at(index)
    }
    fn write_back_table(&mut self, table: Mfn) {
        // A split's table, before the entry that links it (the IOMMU reads
        // memory; Xen's own split does iommu_sync_cache first). Whole: so
        // its record in the cell's set of dirty lines goes (it was written
        // back a second time at the flush before). The record first, then
        // the write-back: a store noted in between is in memory either way.
        if !TABLES_COHERENT.load(Ordering::Relaxed) {
            // (Should the record stay, it is written back once more.)
            let _ = self.forget_dirty_lines(table);
            self.write_back(table, u64::MAX);
        }
    }
    #[inline(always)]
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        let count = COUNT.bits_at(index);
        let raw = if count != 0 {
            (raw & !count) | (self.table_read(table, index) & count)
        } else {
            raw
        };
        self.table_write(table, index, raw)
    }
    fn present_count(&self, table: Mfn) -> u16 {
        let p = self.table(table);
        if p.is_null() {
            // As table_read: a refused frame reads empty (and is reported).
            return 0;
        }
        // SAFETY: a mapped table frame of ENTRIES entries.
        unsafe { COUNT.load_count(p) }
    }
    /// One mapping of the frame for the entry and the count's parts.
    #[inline(always)]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        if index >= ENTRIES {
            return (0, self.present_count(table));
        }
        let p = self.table(table);
        if p.is_null() {
            // As table_read: a refused frame reads empty (and is reported).
            return (0, 0);
        }
        // SAFETY: a mapped table frame of ENTRIES entries; index checked.
        unsafe { COUNT.load_counted(p, index) }
    }
    /// One mapping of the frame for the entry and the count
    /// (`CountLayout::store_counted`). Only the entry's line is noted, as
    /// `write_entry` notes it; the count's stores need none, as in
    /// `set_present_count`.
    #[inline(always)]
    fn write_entry_counted(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        if index >= ENTRIES {
            // As the two calls: the entry store is dropped, the count not.
            self.set_present_count(table, count);
            return;
        }
        let p = self.table(table);
        if p.is_null() {
            // Refused: the stores are lost, and reported (Xen::refused).
            return;
        }
        // SAFETY: a mapped table frame of ENTRIES entries; index checked.
        unsafe { COUNT.store_counted(p, index, raw, count) };
        self.note_store(table, index);
    }
    /// The count goes into bits the IOMMU ignores, and nothing but the
    /// CPU reads it: the store needs no write-back, so it notes no dirty
    /// line (a map or an unmap stores the count as often as its entry;
    /// the note was a third of the backend's cost per page). The entry
    /// bits around it are rewritten as the CPU holds them; a translation
    /// change among them was noted by its own `write_entry`.
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        let p = self.table(table);
        if p.is_null() {
            // Refused: the stores are lost, and reported (Xen::refused).
            return;
        }
        // SAFETY: a mapped table frame of ENTRIES entries; ENTRIES is past
        // every slot, so no entry is left out.
        unsafe { COUNT.store_count(p, count, ENTRIES) }
    }
}

impl IommuBackend for Xen {
    fn iommu_caps(&self) -> BackendCaps {
        let ctx = CTX_CAPS.load(Ordering::Relaxed);
        let levels = ctx & 0xff;
        let snoop_control = ctx & CTX_SNOOP != 0;
        BackendCaps {
            // Context 0 is Xen's own tables of the driver domain (x86
            // iommu_map() takes no memory type: WB only there); the others
            // are the engine's, where UC is honoured with snoop control.
            max_contexts: if levels != 0 { XEN_MAX_CONTEXTS } else { 1 },
            features: if levels != 0 {
                feature::CONTEXTS
                    | feature::DEVICE_ATTACH
                    | if snoop_control { feature::ATTR_UC } else { 0 }
            } else {
                0
            },
            page_sizes: 1 << 12,
            address_bits: address_bits(),
            own_tables: (levels != 0).then_some(OwnTables {
                format: if LPAE {
                    TableFormat::Lpae
                } else {
                    TableFormat::Vtd { snoop_control }
                },
                levels,
            }),
            default_context_attrs: false,
            default_context_snooped: DEFAULT_CONTEXT_SNOOPED.load(Ordering::Relaxed),
        }
    }
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
        let rc = unsafe {
            ffi::pvx_iommu_map(
                owner.0,
                bfn.0,
                mfn.0,
                1,
                perms.flag_bits() as u32,
                &mut flush,
            )
        };
        // Gathered whatever the answer, as a run is: a failed call may
        // still have changed an entry (the glue marks it modified).
        gather.add(ctx, bfn, flush)?;
        if rc != 0 {
            return Err(errno_from(rc));
        }
        Ok(())
    }
    fn iommu_map_run(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        count: u64,
        perms: Permissions,
        _attr: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        if ctx != ContextId::DEFAULT {
            return Err(Errno::NoEnt);
        }
        let last = pviommu_hv::iommu::run_last(bfn, count).ok_or(Errno::Inval)?;
        let mut flush = 0u32;
        // SAFETY: out-pointer to a local. The run in the calls Xen's
        // `iommu_map()` makes (`pvx_map_run()`): each part aligned to 2 MiB
        // in both BFN and frame is one entry.
        let rc = unsafe {
            ffi::pvx_iommu_map(
                owner.0,
                bfn.0,
                mfn.0,
                count,
                perms.flag_bits() as u32,
                &mut flush,
            )
        };
        // Gathered whatever the answer: a failed run's entries existed
        // until the glue unmapped them again, and only this flush covers
        // them (the glue marks a failed run modified).
        gather.add_range(ctx, bfn, last, flush)?;
        if rc != 0 {
            return Err(errno_from(rc));
        }
        Ok(())
    }
    fn iommu_unmap(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let mut flush = 0u32;
        // SAFETY: out-pointer to a local.
        let rc = unsafe { ffi::pvx_iommu_unmap(owner.0, bfn.0, 1, &mut flush) };
        // (Gathered whatever the answer, as for a map.)
        gather.add(ctx, bfn, flush)?;
        if rc != 0 {
            return Err(errno_from(rc));
        }
        Ok(())
    }
    fn iommu_unmap_run(
        &mut self,
        owner: DomId,
        ctx: ContextId,
        bfn: Bfn,
        count: u64,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let last = pviommu_hv::iommu::run_last(bfn, count).ok_or(Errno::Inval)?;
        let mut flush = 0u32;
        // SAFETY: out-pointer to a local. The run in the calls Xen's
        // `iommu_unmap()` makes (`pvx_unmap_run()`): each aligned 2 MiB of it
        // is one entry cleared.
        let rc = unsafe { ffi::pvx_iommu_unmap(owner.0, bfn.0, count, &mut flush) };
        // Gathered whatever the answer: a failed run may have cleared some
        // of its entries (the glue tries every part), whose pages
        // the engine releases once its page-by-page retry finds them gone;
        // only a flush covering them may come first (the glue marks a
        // failed run modified, so that flush is made).
        gather.add_range(ctx, bfn, last, flush)?;
        if rc != 0 {
            return Err(errno_from(rc));
        }
        Ok(())
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
    fn hw_context_create(
        &mut self,
        _owner: DomId,
        _ctx: ContextId,
        _root: Mfn,
    ) -> Result<HwContext, Errno> {
        self.sync_tables();
        // The engine creates a context holding exactly its driver cell; a
        // context not counted could let a fault be cleared under it, so
        // anything else is refused (fail closed).
        let Some(cell) = self.sole_held_cell() else {
            return Err(Errno::Inval);
        };
        // A fault in a cell with no context left (a frame refused while its
        // last context's tables were freed, perhaps under a previous owner
        // of the cell) concerns no table a device can still walk, except
        // those of the context being created now, which the engine set up
        // in this cell and frees when this creation fails. So it fails
        // once, clearing the fault: the next creation starts on fresh
        // tables. Before, the fault stayed for good and was inherited by
        // the cell's next owner.
        if cell.contexts.load(Ordering::Relaxed) == 0 && cell.faulted.swap(false, Ordering::AcqRel)
        {
            return Err(Errno::Io);
        }
        // Not on tables a store went missing from.
        self.tables_ok()?;
        let mut tag = 0u16;
        // SAFETY: out-pointer to a local.
        match unsafe { ffi::pvx_ctx_alloc(&mut tag) } {
            0 => {
                cell.contexts.fetch_add(1, Ordering::Relaxed);
                Ok(HwContext(u32::from(tag)))
            }
            rc => Err(errno_from(rc)),
        }
    }
    fn hw_context_destroy(&mut self, hw: HwContext) -> Result<(), Errno> {
        let tag = u16::try_from(hw.0).map_err(|_| Errno::Inval)?;
        // SAFETY: plain call; a tag pvx_ctx_alloc gave.
        match unsafe { ffi::pvx_ctx_free(tag) } {
            0 => {
                if let Some(c) = self.sole_held_cell() {
                    let n = c.contexts.load(Ordering::Relaxed);
                    // Drift would be a bug; the hosted tests would see it.
                    debug_assert!(n > 0, "context count drift");
                    c.contexts.store(n.saturating_sub(1), Ordering::Relaxed);
                }
                Ok(())
            }
            rc => Err(errno_from(rc)),
        }
    }
    fn owns_devices(&self, domid: DomId) -> bool {
        // SAFETY: plain call.
        unsafe { ffi::pvx_domain_has_devices(domid.0) != 0 }
    }
    fn hw_flush(&mut self, hw: HwContext, first: Bfn, last: Bfn) -> Result<(), Errno> {
        let tag = u16::try_from(hw.0).map_err(|_| Errno::Inval)?;
        let count = last
            .0
            .checked_sub(first.0)
            .and_then(|n| n.checked_add(1))
            .ok_or(Errno::Inval)?;
        // Table stores reach memory before the IOMMU forgets what it cached.
        self.sync_tables();
        // SAFETY: plain call.
        let rc = unsafe { ffi::pvx_ctx_flush(tag, first.0, count) };
        // After a refused table frame the flush still runs (the IOMMU
        // forgets what it can) but fails: nothing may be released.
        self.tables_ok()?;
        match rc {
            0 => Ok(()),
            rc => Err(errno_from(rc)),
        }
    }
    fn devices_lock(&mut self) {
        // SAFETY: plain call (pcidevs_lock, recursive).
        unsafe { ffi::pvx_devices_lock() }
    }
    fn devices_unlock(&mut self) {
        // SAFETY: paired with devices_lock by the engine.
        unsafe { ffi::pvx_devices_unlock() }
    }
    fn device_facts(&self, device: Sbdf) -> Option<DeviceFacts> {
        // Unwritten: no owner (0 would be dom0) and no facts.
        let (mut owner, mut flags) = (DOMID_NONE, 0u32);
        // SAFETY: out-pointers to locals.
        if unsafe { ffi::pvx_device_facts(device.0, &mut owner, &mut flags) } != 0 {
            return None;
        }
        Some(device_facts_of(DomId(owner), flags))
    }
    fn device_attach(&mut self, device: Sbdf, hw: HwContext, root: Mfn) -> Result<(), Errno> {
        let tag = u16::try_from(hw.0).map_err(|_| Errno::Inval)?;
        // The device walks the tables from memory once attached.
        self.sync_tables();
        self.tables_ok()?;
        // SAFETY: plain call.
        match unsafe { ffi::pvx_device_attach(device.0, tag, root.0) } {
            0 => Ok(()),
            rc => Err(errno_from(rc)),
        }
    }
    fn device_detach(&mut self, device: Sbdf, hw: HwContext) -> Result<(), Errno> {
        let tag = u16::try_from(hw.0).map_err(|_| Errno::Inval)?;
        // SAFETY: plain call.
        match unsafe { ffi::pvx_device_detach(device.0, tag) } {
            0 => Ok(()),
            rc => Err(errno_from(rc)),
        }
    }
}

/// A device's facts from `pvx_device_facts`'s flags (`PVX_DEV_*`).
fn device_facts_of(owner: DomId, flags: u32) -> DeviceFacts {
    DeviceFacts {
        owner,
        own_requester_id: flags & PVX_DEV_OWN_RID != 0,
        rmrr: flags & PVX_DEV_RMRR != 0,
        ats: flags & PVX_DEV_ATS != 0,
        translated: flags & PVX_DEV_UNTRANSLATED == 0,
    }
}

const PVX_DEV_OWN_RID: u32 = 1 << 0;
const PVX_DEV_RMRR: u32 = 1 << 1;
const PVX_DEV_ATS: u32 = 1 << 2;
const PVX_DEV_UNTRANSLATED: u32 = 1 << 3;

/// The engine, created once at boot. After that it is only read through a
/// shared reference: the engine locks its own state.
struct EngineCell(UnsafeCell<Option<XenEngine>>);
// SAFETY: written once, by the one pviommu_engine_init that claims
// `ENGINE_CLAIMED` (the initcall, before any hypercall or hook can run),
// before `ENGINE_READY` is set; read only after it is seen set, then only
// shared; the engine is Sync (checked below).
unsafe impl Sync for EngineCell {}
static ENGINE: EngineCell = EngineCell(UnsafeCell::new(None));
/// Taken by the first pviommu_engine_init: a second call is refused
/// (`-EBUSY`) and never replaces the engine under references other CPUs
/// hold (a review of 2026-12-07: one initcall calls it, but the symbol is
/// Xen's to call).
static ENGINE_CLAIMED: AtomicBool = AtomicBool::new(false);
/// Set (Release) once `ENGINE` holds the engine.
static ENGINE_READY: AtomicBool = AtomicBool::new(false);
// What EngineCell's `Sync` rests on: this stops compiling if the engine
// stopped being `Sync`.
const _: fn() = || {
    fn shared_across_cpus<T: Sync>() {}
    shared_across_cpus::<XenEngine>();
};

fn engine() -> Option<&'static XenEngine> {
    if !ENGINE_READY.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: see EngineCell: written before ENGINE_READY, never again.
    unsafe { (*ENGINE.0.get()).as_ref() }
}

/// The stack canary: a cold function (placed in `.text.unlikely.*`) with a
/// frame larger than the stack check's limit.
#[cfg(feature = "stack-canary")]
#[cold]
#[inline(never)]
fn stack_canary(seed: u64) -> u64 {
    let big = core::hint::black_box([seed; 640]);
    big.iter().fold(0, |a, b| a ^ b)
}

/// Create the engine. 0 or -errno. `quota`/`max_batch` of 0 mean default.
/// `cells` is the glue's `PVX_DRIVER_CELLS`: anything but [`CELLS`] is
/// refused (its locks and held mask would not be the engine's).
#[no_mangle]
pub extern "C" fn pviommu_engine_init(
    quota: u64,
    max_batch: u32,
    heap_bytes: u64,
    cells: u32,
) -> i32 {
    #[cfg(feature = "stack-canary")]
    if quota == u64::MAX {
        core::hint::black_box(stack_canary(quota));
    }
    #[cfg(feature = "panic-canary")]
    {
        let mut v = alloc::vec::Vec::new();
        v.push(quota);
        core::hint::black_box(&v);
    }
    if cells as usize != CELLS {
        // (At boot: no guest's messages can have used the log's limit.)
        let line = "pviommu: the glue's PVX_DRIVER_CELLS is not the engine's cell count\n";
        // SAFETY: `line` is valid for its length.
        unsafe { ffi::pvx_log_error(line.as_ptr(), line.len()) };
        return Errno::Inval.negated();
    }
    if ENGINE_CLAIMED.swap(true, Ordering::AcqRel) {
        return Errno::Busy.negated();
    }
    // SAFETY: plain call (set by the glue at boot, before this).
    ADDRESS_BITS.store(unsafe { ffi::pvx_iommu_address_bits() }, Ordering::Relaxed);
    let (mut levels, mut snoop) = (0u32, 0i32);
    // SAFETY: out-pointers to locals.
    if unsafe { ffi::pvx_ctx_caps(&mut levels, &mut snoop) } == 0 && (2..=4).contains(&levels) {
        CTX_CAPS.store(
            levels | if snoop != 0 { CTX_SNOOP } else { 0 },
            Ordering::Relaxed,
        );
    }
    // SAFETY: plain call.
    TABLES_COHERENT.store(
        unsafe { ffi::pvx_tables_coherent() } != 0,
        Ordering::Relaxed,
    );
    // SAFETY: plain call.
    DEFAULT_CONTEXT_SNOOPED.store(
        unsafe { ffi::pvx_default_context_snooped() } != 0,
        Ordering::Relaxed,
    );
    let mut config = Config::default();
    if heap_bytes != 0 {
        HEAP.set_cap(usize::try_from(heap_bytes).unwrap_or(usize::MAX));
    }
    if quota != 0 {
        config.quota = quota;
    }
    if max_batch != 0 {
        config.max_batch_ops = max_batch.min(pviommu_hv::config::MAX_BATCH_OPS_LIMIT);
    }
    match XenEngine::with_locks(config, &Xen::new(), |cell| XenLock { cell: cell as u32 }) {
        Ok(e) => {
            // SAFETY: this call claimed ENGINE_CLAIMED: the only writer,
            // and no reader before ENGINE_READY.
            unsafe { *ENGINE.0.get() = Some(e) };
            ENGINE_READY.store(true, Ordering::Release);
            log("pviommu: engine ready\n");
            0
        }
        Err(e) => e.negated(),
    }
}

/// After an entry point: the engine bugs it survived ([`EngineBug`]: live
/// mappings found missing from the page index, each taken down all the
/// same; maps refused because a free list did not hold together; a dying
/// driver domain's cell holding a page at its reset; a page reference
/// lost on the way to a flush list), by this
/// call or another, go to Xen's console with their number. The line is at
/// a level no guest's own messages can rate-limit away, with a limit of its
/// own in the glue; what it holds back waits for the next line.
/// The kinds take turns at the head of the report (the glue's rate limit
/// lets one line a second through): one kind found every second never
/// keeps another off the console.
#[inline]
fn report_engine_bugs(e: &XenEngine) {
    // A fault whose line the log's limit held back, said now: the faulted
    // cell may never flush again (a review of 2026-12-06).
    if FAULTS_SEEN.load(Ordering::Relaxed) & !FAULTS_SAID.load(Ordering::Relaxed) != 0 {
        say_faults_unsaid();
    }
    let first = REPORT_FIRST.load(Ordering::Relaxed) as usize;
    for k in 0..EngineBug::KINDS {
        let Some(&bug) = EngineBug::ALL.get((first + k) % EngineBug::KINDS) else {
            continue;
        };
        let n = e.take_unreported(bug);
        if n != 0 && report_engine_bug_slow(e, bug, n) {
            REPORT_FIRST.store(
                ((first + k + 1) % EngineBug::KINDS) as u32,
                Ordering::Relaxed,
            );
        }
    }
}

/// Which [`EngineBug`] kind the next report tries first.
static REPORT_FIRST: AtomicU32 = AtomicU32::new(0);

const BUG_LINE_START: &[u8] = b"pviommu: ";
const INDEX_MISS_LINE: &[u8] =
    b" live mapping(s) were missing from the page index (an engine bug): \
    taken down; their cells' counts are no longer trusted\n";
const FREE_LIST_BREAK_LINE: &[u8] =
    b" map(s) refused because a cell's list of free BFNs did not hold \
    together (an engine bug): nothing was handed out\n";
const HELD_AT_RESET_LINE: &[u8] =
    b" time(s) a dying driver domain's cell still held a page at its reset \
    (an engine bug): kept, and its teardown walks again\n";
const REFERENCE_LOST_LINE: &[u8] =
    b" page reference(s) lost moving a mapping to a flush list (an engine \
    bug): those pages are never freed\n";
/// A report line: the start, up to 20 digits, the kind's words.
const BUG_LINE_BYTES: usize = 160;
const _: () = assert!(BUG_LINE_START.len() + 20 + INDEX_MISS_LINE.len() <= BUG_LINE_BYTES);
const _: () = assert!(BUG_LINE_START.len() + 20 + FREE_LIST_BREAK_LINE.len() <= BUG_LINE_BYTES);
const _: () = assert!(BUG_LINE_START.len() + 20 + HELD_AT_RESET_LINE.len() <= BUG_LINE_BYTES);
const _: () = assert!(BUG_LINE_START.len() + 20 + REFERENCE_LOST_LINE.len() <= BUG_LINE_BYTES);

/// Whether the line went out (else the count is given back for the next
/// report).
#[cold]
#[inline(never)]
fn report_engine_bug_slow(e: &XenEngine, bug: EngineBug, n: u64) -> bool {
    let what = match bug {
        EngineBug::IndexMiss => INDEX_MISS_LINE,
        EngineBug::FreeListBreak => FREE_LIST_BREAK_LINE,
        EngineBug::HeldAtReset => HELD_AT_RESET_LINE,
        EngineBug::ReferenceLost => REFERENCE_LOST_LINE,
    };
    let mut digits = [0u8; 20];
    let parts: [&[u8]; 3] = [BUG_LINE_START, decimal(n, &mut digits), what];
    let mut line = [0u8; BUG_LINE_BYTES];
    let mut len = 0usize;
    for (dst, src) in line.iter_mut().zip(parts.iter().flat_map(|p| p.iter())) {
        *dst = *src;
        len = len.saturating_add(1);
    }
    let line = line.get(..len).unwrap_or(&[]);
    // SAFETY: `line` is valid for its length.
    if unsafe { ffi::pvx_log_error(line.as_ptr(), line.len()) } == 0 {
        e.give_back_unreported(bug, n);
        return false;
    }
    true
}

/// `n` in decimal, at the end of `buf`: the digits (no panic path).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        start = start.saturating_sub(1);
        if n == 0 {
            break;
        }
    }
    buf.get(start..).unwrap_or(&[])
}

/// The hypercall body (no lock held by the caller).
#[no_mangle]
pub extern "C" fn pviommu_engine_op(caller: u16, cmd: u32, arg: u64) -> i64 {
    match engine() {
        Some(e) => {
            let ret = e.hypercall(&mut Xen::new(), DomId(caller), cmd, arg);
            report_engine_bugs(e);
            ret
        }
        None => Errno::OpNotSupp.negated() as i64,
    }
}

/// One slice of a dying domain's teardown: 0 done, -ERESTART call again,
/// -EBUSY stalled (call again later).
// Called from C only, with a pointer into struct domain (null or
// misaligned, a glue bug, is checked and fails closed).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn pviommu_engine_domain_teardown(domid: u16, cursor: *mut u64) -> i32 {
    const ERESTART: i32 = -85;
    let Some(e) = engine() else { return 0 };
    // A glue bug, failing closed: stalled, so the domain stays dying with
    // its memory kept (before 2026-12-07 a null cursor answered "done",
    // with nothing revoked).
    if !cursor.is_aligned() {
        return Errno::Busy.negated();
    }
    // SAFETY: the glue passes a pointer to the cursor in struct domain,
    // which only this domain's serialised teardown touches; aligned.
    let Some(cursor) = (unsafe { cursor.as_mut() }) else {
        return Errno::Busy.negated();
    };
    let slice = e.domain_teardown(&mut Xen::new(), DomId(domid), cursor);
    report_engine_bugs(e);
    match slice {
        Ok(()) => 0,
        // Restarts that released nothing, in a row: the IOMMU keeps
        // failing. The toolstack gets its destroy back (the domain stays
        // dying, its cursor kept) rather than a continuation for ever.
        Err(_) if XenEngine::teardown_stalled(*cursor) => Errno::Busy.negated(),
        Err(_) => ERESTART,
    }
}

/// One slice of revoking every writable mapping of `domid` (log-dirty mode
/// went on): 0 done, -ERESTART call again.
// Called from C only, with a pointer into struct domain (null or
// misaligned, a glue bug, is checked and fails closed).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn pviommu_engine_revoke_writes(domid: u16, cursor: *mut u64) -> i32 {
    const ERESTART: i32 = -85;
    const EIO: i32 = -5;
    let Some(e) = engine() else { return 0 };
    // A glue bug, failing closed: gave up, so log-dirty mode is not
    // turned on (before 2026-12-07 a null cursor answered "done").
    if !cursor.is_aligned() {
        return EIO;
    }
    // SAFETY: the glue passes a pointer to the cursor in struct domain,
    // which only the serialised paging domctl touches; aligned.
    let Some(cursor) = (unsafe { cursor.as_mut() }) else {
        return EIO;
    };
    let slice = e.revoke_writes(&mut Xen::new(), DomId(domid), cursor);
    report_engine_bugs(e);
    match slice {
        Ok(()) if XenEngine::revoke_writes_gave_up(*cursor) => EIO,
        Ok(()) => 0,
        Err(_) => ERESTART,
    }
}

/// One slice of revoking the writable mappings of `domid`'s gfns
/// `[first, first + nr)` before VRAM dirty tracking moves there: 0 done,
/// -ERESTART call again, -EIO gave up (the IOMMU kept refusing: a device
/// may still write the range). `sweep` is the caller's (three u64s in struct
/// domain: [`RangeSweep`]'s layout), which other CPUs' page lookups read
/// (`pvx_vram_sweeping()`, with `ACCESS_ONCE`) while this runs: it is
/// read and written here word by word, atomically, never through a Rust
/// reference, and a new range is in it before the slice moves the
/// target's sequence number (the SeqCst read-modify-write orders these
/// stores before it).
// Called from C only, with a pointer into struct domain or NULL (checked),
// under the caller's `pviommu_vram_busy` bit (one call at a time).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn pviommu_engine_revoke_writes_in(
    domid: u16,
    first: u64,
    nr: u64,
    sweep: *mut RangeSweep,
) -> i32 {
    const ERESTART: i32 = -85;
    const EIO: i32 = -5;
    let Some(e) = engine() else { return 0 };
    if sweep.is_null() || !sweep.cast::<AtomicU64>().is_aligned() {
        return 0;
    }
    // SAFETY: three u64 words in struct domain (RangeSweep is repr(C),
    // 24 bytes: asserted), aligned (checked), alive for the call; the
    // other CPUs only read them, each word atomically.
    let words = unsafe {
        [
            AtomicU64::from_ptr(core::ptr::addr_of_mut!((*sweep).first)),
            AtomicU64::from_ptr(core::ptr::addr_of_mut!((*sweep).last)),
            AtomicU64::from_ptr(core::ptr::addr_of_mut!((*sweep).cursor)),
        ]
    };
    let range = (first, first.saturating_add(nr));
    let mut local = RangeSweep {
        first: words[0].load(Ordering::SeqCst),
        last: words[1].load(Ordering::SeqCst),
        cursor: words[2].load(Ordering::SeqCst),
    };
    // A new range: published (what the engine's call makes of it,
    // `RangeSweep::aim_at`) before the engine can move the sequence number.
    if first < range.1 && local.aim_at(range) {
        // `last` emptied first: a reader between the stores sees an
        // empty range, never one that is neither the old nor the new (a
        // map it lets through is the walk's, which starts after these),
        // as long as it reads `last` on both sides of `first` and takes
        // the range only when they agree (`pvx_vram_range()` in
        // pviommu.c; two loads, `first` then `last`, could see `first`
        // from before these stores and `last` from after: an audit of
        // 2026-12-06).
        words[1].store(0, Ordering::SeqCst);
        words[2].store(0, Ordering::SeqCst);
        words[0].store(local.first, Ordering::SeqCst);
        words[1].store(local.last, Ordering::SeqCst);
    }
    let slice = e.revoke_writes_in(&mut Xen::new(), DomId(domid), range, &mut local);
    // (The range is the one published above: only the cursor moved.)
    words[2].store(local.cursor, Ordering::SeqCst);
    report_engine_bugs(e);
    match slice {
        Ok(()) if XenEngine::revoke_writes_gave_up(local.cursor) => EIO,
        Ok(()) => 0,
        Err(_) => ERESTART,
    }
}

/// A p2m change of `domid` succeeded: revoke what it invalidated.
#[no_mangle]
pub extern "C" fn pviommu_engine_gfn_changed(domid: u16, gfn: u64, order: u32, how: u32) {
    let Some(e) = engine() else { return };
    // (Anything but the two: a removal, the stronger.)
    let how = match how {
        PVIOMMU_GFN_WRITE_LOST => GfnChange::WriteLost,
        _ => GfnChange::Removed,
    };
    e.gfn_changed(&mut Xen::new(), DomId(domid), Gfn(gfn), order, how);
    report_engine_bugs(e);
}

/// The engine's BFN window, its first BFN and the one past its last, for
/// the glue's check of every IOMMU run (`pvx_run_in_window()`): written
/// into `*start` and `*end`. 0, or -EINVAL before the engine exists (or for
/// a null pointer).
// Called from C only, with pointers to the glue's variables or NULL
// (checked).
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn pviommu_engine_window(start: *mut u64, end: *mut u64) -> i32 {
    let Some(e) = engine() else {
        return Errno::Inval.negated();
    };
    if start.is_null() || end.is_null() || !start.is_aligned() || !end.is_aligned() {
        return Errno::Inval.negated();
    }
    let w = e.window();
    // SAFETY: non-null, aligned pointers the glue passes to two variables
    // of its own; written, no reference made (the two may not alias then
    // either).
    unsafe {
        start.write(w.start);
        end.write(w.end);
    }
    0
}

/// Patch 0008: 1 if an IOMMU fault of device `sbdf`, owned by `owner`, at
/// `bfn` is one a revocation made (Xen then does not count it against the
/// device), else 0. From the IOMMU's fault tasklet, pcidevs_lock held.
#[no_mangle]
pub extern "C" fn pviommu_engine_fault_expected(owner: u16, sbdf: u32, bfn: u64) -> i32 {
    let Some(e) = engine() else { return 0 };
    let expected = e.fault_expected(DomId(owner), Sbdf(sbdf), Bfn(bfn), Xen::new().now_ns());
    report_engine_bugs(e);
    i32::from(expected)
}

/// Xen is about to move device `sbdf` away from `owner` (pcidevs_lock
/// held): 0, or -EBUSY when the device could not be taken off a context
/// (Xen must not move it then).
#[no_mangle]
pub extern "C" fn pviommu_engine_device_leaving(owner: u16, sbdf: u32) -> i32 {
    let Some(e) = engine() else { return 0 };
    let r = e.device_leaving(&mut Xen::new(), DomId(owner), Sbdf(sbdf));
    report_engine_bugs(e);
    match r {
        Ok(()) => 0,
        Err(err) => err.negated(),
    }
}
