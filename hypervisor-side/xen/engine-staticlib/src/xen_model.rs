//! Xen's side of `pviommu_engine.h`, modelled for hosted tests (`cargo
//! test`): the `pvx_*` functions the backend calls, as Rust `#[no_mangle]`
//! functions, so the backend's real code runs against them.
//!
//! What the model keeps, to find what the backend gets wrong:
//! * Each table frame twice: what the CPU sees (the page `pvx_table_map`
//!   hands out) and what a non-coherent IOMMU sees (memory), updated only
//!   by `pvx_table_sync`. `pvx_ctx_flush`, `pvx_ctx_alloc` and
//!   `pvx_device_attach` check that every frame of the cells the calling
//!   thread holds is in memory; [`check_all_written_back`] checks all.
//! * Which cell was held when a frame was allocated (its owner): a
//!   write-back of a frame whose cell the calling thread does not hold is a
//!   violation (the old single dirty set for all cells did that: a flush of
//!   one driver domain wrote back, and so depended on, another's stores).
//! * The driver locks as real spin locks with a per-thread held mask (Xen:
//!   per CPU), counted per cell.
//! * Only frames handed out and not freed are accepted, as the C glue's
//!   page mark: anything else is refused (NULL / -EINVAL) and counted.
//!
//! One model for the process: tests take [`serial`] first.
//!
//! Every `pvx_*` function is `#[inline(never)]`: in Xen each is a call into
//! the C glue, and a count of the backend's cost (`engine_op_rounds`,
//! `scripts/tcg-cost.sh`) must see those calls, which cost under TCG about
//! as much as 40 instructions each.

use std::boxed::Box;
use std::cell::Cell;
use std::collections::HashMap;
use std::format;
use std::string::String;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use std::vec::Vec;

use super::ffi::{PvxCheckedTarget, PvxDomainInfo};

const CELLS: usize = pviommu_hv::engine::MAX_DRIVER_DOMAINS;

/// One table frame.
pub struct Frame {
    /// The CPU's view (a stable heap page: the pointer handed out).
    pub cpu: Box<[u64; 512]>,
    /// What the IOMMU walks.
    pub mem: [u64; 512],
    /// The cell held by the allocating thread (`None`: none, or several).
    pub owner: Option<usize>,
    /// Mappings handed out and not given back.
    pub mapped: u32,
}

/// Something `pvx_table_sync` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sync {
    pub mfn: u64,
    pub lines: u64,
}

#[derive(Default)]
pub struct Model {
    pub frames: HashMap<u64, Frame>,
    /// Freed frames' CPU pages, kept so a stale pointer never dangles.
    pub graveyard: Vec<Box<[u64; 512]>>,
    pub next_mfn: u64,
    pub syncs: Vec<Sync>,
    pub flushes: u64,
    pub violations: Vec<String>,
    pub refused: u64,
    pub coherent: bool,
    /// What `pvx_ctx_caps` answers: 0 for "no contexts".
    pub ctx_levels: u32,
    /// `pvx_table_sync` of this frame waits (up to 2 s) for [`RELEASE`].
    pub block_sync_of: Option<u64>,
    pub block_timed_out: bool,
    /// Every frame `pvx_table_alloc` handed out, in order.
    pub allocs: Vec<u64>,
    /// Skip the write-back check at flushes, context creation and attach
    /// (a cost-counting run, not a check: its time then goes to the
    /// backend, as in Xen, not to the model's scan of every frame).
    pub unchecked: bool,
}

static MODEL: Mutex<Option<Model>> = Mutex::new(None);
static SERIAL: Mutex<()> = Mutex::new(());
static LOCKS: [AtomicBool; CELLS] = [const { AtomicBool::new(false) }; CELLS];
pub static LOCK_CALLS: [AtomicU64; CELLS] = [const { AtomicU64::new(0) }; CELLS];
/// Lets a blocked `pvx_table_sync` go on (see `Model::block_sync_of`).
pub static RELEASE: AtomicBool = AtomicBool::new(false);
/// A `pvx_table_sync` is waiting for [`RELEASE`].
pub static BLOCKED: AtomicBool = AtomicBool::new(false);

/// The cells a thread (Xen: a CPU) holds, in the C glue's layout: one
/// word per 64 cells, cell n at bit n % 64 of word n / 64.
type HeldWords = [u64; CELLS / 64];

thread_local! {
    static HELD: Cell<HeldWords> = const { Cell::new([0; CELLS / 64]) };
}

/// Change this thread's held mask.
fn update_held(f: impl FnOnce(u128) -> u128) {
    HELD.with(|h| h.set(words_of(f(mask_of(h.get())))));
}

fn mask_of(w: HeldWords) -> u128 {
    pviommu_hv::engine::cell_mask_of_words(w)
}

fn words_of(m: u128) -> HeldWords {
    core::array::from_fn(|i| (m >> (64 * i)) as u64)
}

/// Hold the process-wide test lock and start from a fresh model.
pub fn serial() -> MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    *model_lock() = Some(Model {
        next_mfn: 0x1000,
        ctx_levels: 3,
        ..Model::default()
    });
    for c in &LOCK_CALLS {
        c.store(0, Ordering::Relaxed);
    }
    RELEASE.store(false, Ordering::Relaxed);
    BLOCKED.store(false, Ordering::Relaxed);
    ELSEWHERE.store(false, Ordering::Relaxed);
    XSM_ATTACH_DENIED.store(u32::MAX, Ordering::Relaxed);
    XSM_ATTACH_ASKED.store(u64::MAX, Ordering::Relaxed);
    super::reset_backend_state();
    g
}

fn model_lock() -> MutexGuard<'static, Option<Model>> {
    MODEL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` on the model.
pub fn with<R>(f: impl FnOnce(&mut Model) -> R) -> R {
    let mut g = model_lock();
    f(g.as_mut().expect("serial() first"))
}

pub fn held() -> u128 {
    HELD.with(|h| mask_of(h.get()))
}

/// Frames whose CPU view has a line memory lacks, with the lines.
fn unwritten(m: &Model, cells: Option<u128>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (mfn, f) in &m.frames {
        if let (Some(mask), Some(o)) = (cells, f.owner) {
            if mask & (1 << o) == 0 {
                continue;
            }
        }
        let mut lines = 0u64;
        for (i, (c, d)) in f.cpu.iter().zip(f.mem.iter()).enumerate() {
            // The walker's present count sits in bits the IOMMU ignores:
            // only the CPU reads it, so it need not be in memory.
            if (c ^ d) & !super::COUNT.bits_at(i) != 0 {
                lines |= 1 << (i / 8);
            }
        }
        if lines != 0 {
            out.push((*mfn, lines));
        }
    }
    out
}

fn check_held_written_back(what: &str) {
    let mask = held();
    with(|m| {
        if m.coherent || m.unchecked {
            return;
        }
        let u = unwritten(m, Some(mask));
        if !u.is_empty() {
            m.violations
                .push(format!("{what} with lines not in memory: {u:x?}"));
        }
    });
}

/// Every frame's stores are in memory (what "before it returns" means).
pub fn check_all_written_back() -> Vec<(u64, u64)> {
    with(|m| unwritten(m, None))
}

/// A fresh table frame owned by `cell` (allocated with its lock held).
pub fn frame_of(cell: u32) -> pviommu_hv::Mfn {
    pvx_driver_lock(cell);
    let mut mfn = 0;
    assert_eq!(pvx_table_alloc(&mut mfn), 0);
    pvx_driver_unlock(cell);
    pviommu_hv::Mfn(mfn)
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_driver_lock(cell: u32) {
    let c = cell as usize % CELLS;
    LOCK_CALLS[c].fetch_add(1, Ordering::Relaxed);
    // The clock only once the lock is found taken: an uncontended lock
    // costs what Xen's does, one atomic.
    let mut start = None;
    while LOCKS[c]
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        let start = *start.get_or_insert_with(Instant::now);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cell {c} lock never released"
        );
        std::thread::yield_now();
    }
    update_held(|h| h | 1 << c);
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_driver_trylock(cell: u32) -> i32 {
    let c = cell as usize % CELLS;
    if LOCKS[c]
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return 0;
    }
    LOCK_CALLS[c].fetch_add(1, Ordering::Relaxed);
    update_held(|h| h | 1 << c);
    1
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_driver_unlock(cell: u32) {
    let c = cell as usize % CELLS;
    update_held(|h| {
        assert!(h & (1 << c) != 0, "unlock of cell {c} not held");
        h & !(1 << c)
    });
    LOCKS[c].store(false, Ordering::Release);
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_driver_held_mask() -> *const u64 {
    if ELSEWHERE.load(Ordering::Relaxed) {
        // As if the thread now ran on another CPU (see ELSEWHERE).
        return OTHER_CPU_MASK.as_ptr().cast::<u64>();
    }
    // The thread's mask (Xen: the CPU's), valid for the thread's life.
    HELD.with(|h| h.as_ptr().cast::<u64>().cast_const())
}

/// `pvx_driver_held_mask` answers another CPU's mask: what a Xen that
/// resumed a waiting vCPU on another CPU would look like to the backend.
pub static ELSEWHERE: AtomicBool = AtomicBool::new(false);
static OTHER_CPU_MASK: [AtomicU64; CELLS / 64] = [const { AtomicU64::new(0) }; CELLS / 64];

/// What the C glue's page mark accepts: a frame handed out, not freed.
fn accepted(m: &mut Model, mfn: u64) -> bool {
    let ok = m.frames.contains_key(&mfn);
    if !ok {
        m.refused += 1;
    }
    ok
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_table_alloc(mfn: *mut u64) -> i32 {
    let h = held();
    let owner = (h.count_ones() == 1).then_some(h.trailing_zeros() as usize);
    with(|m| {
        let n = m.next_mfn;
        m.next_mfn += 1;
        m.allocs.push(n);
        m.frames.insert(
            n,
            Frame {
                cpu: Box::new([0; 512]),
                mem: [0; 512],
                owner,
                mapped: 0,
            },
        );
        // SAFETY: the backend passes a pointer to a local.
        unsafe { *mfn = n };
    });
    0
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_table_free(mfn: u64) -> i32 {
    with(|m| {
        if !accepted(m, mfn) {
            return -22;
        }
        let f = m.frames.remove(&mfn).expect("accepted");
        if f.mapped != 0 {
            m.violations
                .push(format!("frame {mfn:#x} freed while mapped"));
        }
        m.graveyard.push(f.cpu);
        0
    })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_table_map(mfn: u64) -> *mut u64 {
    with(|m| {
        if !accepted(m, mfn) {
            return core::ptr::null_mut();
        }
        let f = m.frames.get_mut(&mfn).expect("accepted");
        f.mapped += 1;
        f.cpu.as_mut_ptr()
    })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_table_unmap(t: *const u64) {
    with(|m| {
        match m
            .frames
            .values_mut()
            .find(|f| f.cpu.as_ptr() == t && f.mapped > 0)
        {
            Some(f) => f.mapped -= 1,
            None => m.violations.push(format!("unmap of {t:p}, not a mapping")),
        }
    })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_table_sync(mfn: u64, lines: u64) -> i32 {
    let block = with(|m| m.block_sync_of == Some(mfn));
    if block {
        BLOCKED.store(true, Ordering::Release);
        let start = Instant::now();
        while !RELEASE.load(Ordering::Acquire) {
            if start.elapsed() > Duration::from_secs(2) {
                with(|m| m.block_timed_out = true);
                break;
            }
            std::thread::yield_now();
        }
    }
    let h = held();
    with(|m| {
        if !accepted(m, mfn) {
            return -22;
        }
        let f = m.frames.get_mut(&mfn).expect("accepted");
        if let Some(o) = f.owner {
            if h & (1 << o) == 0 {
                m.violations.push(format!(
                    "write-back of {mfn:#x} (cell {o}) without its lock (held {h:#x})"
                ));
            }
        }
        for i in 0..512 {
            if lines & (1 << (i / 8)) != 0 {
                f.mem[i] = f.cpu[i];
            }
        }
        m.syncs.push(Sync { mfn, lines });
        0
    })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_tables_coherent() -> i32 {
    with(|m| m.coherent as i32)
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_default_context_snooped() -> i32 {
    1
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_ctx_caps(levels: *mut u32, snoop_control: *mut i32) -> i32 {
    let l = with(|m| m.ctx_levels);
    if l == 0 {
        return -95;
    }
    // SAFETY: pointers to the caller's locals.
    unsafe {
        *levels = l;
        *snoop_control = 0;
    }
    0
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_ctx_flush(_tag: u16, _bfn: u64, _count: u64) -> i32 {
    check_held_written_back("pvx_ctx_flush");
    with(|m| m.flushes += 1);
    0
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_ctx_alloc(tag: *mut u16) -> i32 {
    check_held_written_back("pvx_ctx_alloc");
    // SAFETY: pointer to the caller's local.
    unsafe { *tag = 0x7ff0 };
    0
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_device_attach(_sbdf: u32, _tag: u16, root_mfn: u64) -> i32 {
    check_held_written_back("pvx_device_attach");
    // The root is a table frame, as the C glue's page mark checks.
    with(|m| if accepted(m, root_mfn) { 0 } else { -22 })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_ctx_free(_tag: u16) -> i32 {
    0
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_device_detach(_sbdf: u32, _tag: u16) -> i32 {
    0
}

// What these tests do not reach: plain answers.

// Guests, for the tests that enter the engine through its hypercall: a
// guest address is a host address, d0 is the control and hardware domain
// (it owns devices), d1 an ordinary guest whose gfn g is RAM at MFN
// GUEST_MFN + g.

/// MFN of d1's gfn 0.
pub const GUEST_MFN: u64 = 0x8_0000;

/// A service that may run long or nest other entries on this CPU (a guest
/// copy, a page lookup: x86's PoD sweep maps 16 pages of its own there and
/// may run the engine's gfn hook) finds no table frame of the engine's
/// mapped: a PV caller's mapcache has 16 entries a vCPU, and a debug
/// build's `BUG_ON()` fires past them (a review of 2026-12-07).
fn no_table_mapped_across(what: &str) {
    with(|m| {
        let held: u32 = m.frames.values().map(|f| f.mapped).sum();
        if held != 0 {
            m.violations
                .push(format!("{held} table mappings held across {what}"));
        }
    })
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_copy_from_guest(dst: *mut u8, guest_addr: u64, len: usize) -> i32 {
    no_table_mapped_across("pvx_copy_from_guest");
    // SAFETY: the tests pass addresses of live host buffers of `len` bytes.
    unsafe { core::ptr::copy_nonoverlapping(guest_addr as *const u8, dst, len) };
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_copy_to_guest(guest_addr: u64, src: *const u8, len: usize) -> i32 {
    no_table_mapped_across("pvx_copy_to_guest");
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(src, guest_addr as *mut u8, len) };
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_domain_info(domid: u16, info: *mut PvxDomainInfo) {
    if domid > 1 {
        return;
    }
    // SAFETY: pointer to the caller's local.
    let i = unsafe { &mut *info };
    i.exists = 1;
    i.control = (domid == 0) as u8;
    i.hardware = (domid == 0) as u8;
    i.target = 0xffff;
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_xsm_check(_caller: u16, _target: u16, _action: u32) -> i32 {
    0
}
/// The device (raw SBDF) Xen's XSM refuses every caller to attach, and the
/// last (caller, SBDF) asked about.
pub static XSM_ATTACH_DENIED: AtomicU32 = AtomicU32::new(u32::MAX);
pub static XSM_ATTACH_ASKED: AtomicU64 = AtomicU64::new(u64::MAX);
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_xsm_attach(caller: u16, sbdf: u32) -> i32 {
    XSM_ATTACH_ASKED.store(u64::from(caller) << 32 | u64::from(sbdf), Ordering::Relaxed);
    if sbdf == XSM_ATTACH_DENIED.load(Ordering::Relaxed) {
        -13 // -EACCES, FLASK's answer
    } else {
        0
    }
}
/// A glue that answers `pvx_get_page()` with 0 and writes neither the
/// frame nor the kind (no glue does: a review's what-if of 2026-12-06).
pub static GET_PAGE_WRITES_NOTHING: AtomicBool = AtomicBool::new(false);

#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_get_page(
    domid: u16,
    gfn: u64,
    _w: i32,
    target: *const PvxCheckedTarget,
    mfn: *mut u64,
    kind: *mut u32,
) -> i32 {
    no_table_mapped_across("pvx_get_page");
    if domid != 1 || gfn >= 0x1000 {
        return -22;
    }
    // As the glue: the number read again with the domain held.
    // SAFETY: the caller's local, pointing at the engine's number (alive
    // across the call).
    if unsafe { core::ptr::read_volatile((*target).seq) != (*target).checked } {
        return -3; // -ESRCH
    }
    if GET_PAGE_WRITES_NOTHING.load(Ordering::SeqCst) {
        return 0;
    }
    // SAFETY: pointers to the caller's locals.
    unsafe {
        *mfn = GUEST_MFN + gfn;
        *kind = 0;
    }
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_get_pages(
    domid: u16,
    nr: u32,
    w: i32,
    target: *const PvxCheckedTarget,
    frames: *mut u64,
    refused: *mut u32,
) -> u32 {
    no_table_mapped_across("pvx_get_pages");
    let mut kind = 0u32;
    // SAFETY: a pointer to the caller's local.
    unsafe { *refused = u32::MAX };
    for i in 0..nr {
        // SAFETY: the engine passes `nr` frame numbers, gfns in.
        let slot = unsafe { &mut *frames.add(i as usize) };
        let gfn = *slot;
        if pvx_get_page(domid, gfn, w, target, slot, &mut kind) != 0 {
            *slot = gfn;
            return i;
        }
        // (Taken as the glue takes it: read-write RAM, or read-only RAM
        // for a read-only map; this model answers read-write RAM only.)
        if kind != 0 && !(kind == 1 && w == 0) {
            *slot = gfn;
            // SAFETY: as above.
            unsafe { *refused = kind };
            return i;
        }
    }
    nr
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_put_page(_mfn: u64, _writable: i32) {}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_ram_end_mfn() -> u64 {
    0x10_0000
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_iommu_address_bits() -> u32 {
    39
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_reserved_region(_i: u32, _s: *mut u64, _n: *mut u64, _k: *mut u32) -> i32 {
    -2
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_iommu_map(
    _o: u16,
    _bfn: u64,
    _mfn: u64,
    _count: u64,
    _flags: u32,
    _flush: *mut u32,
) -> i32 {
    -95
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_iommu_unmap(_o: u16, _bfn: u64, _count: u64, flush: *mut u32) -> i32 {
    let (rc, flags) = UNMAP_ANSWER.with(|a| a.get());
    // SAFETY: the glue passes a pointer to its local.
    unsafe { *flush |= flags };
    rc
}
std::thread_local! {
    /// What `pvx_iommu_unmap` answers, and the flush flags it sets.
    pub static UNMAP_ANSWER: std::cell::Cell<(i32, u32)> = const { std::cell::Cell::new((-95, 0)) };
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_iommu_flush(_o: u16, _bfn: u64, _count: u64, _flush: u32) -> i32 {
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_preempt_check() -> i32 {
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_random_seed() -> u64 {
    1
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_now_ns() -> u64 {
    0
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_notify_revoked(_owner: u16) {}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_alloc(size: usize, align: usize) -> *mut u8 {
    // Xen's _xmalloc, on the host's allocator; the layout is kept for the
    // free, which gets the pointer only.
    let Ok(layout) = std::alloc::Layout::from_size_align(size.max(1), align.max(1)) else {
        return core::ptr::null_mut();
    };
    // SAFETY: a non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if !p.is_null() {
        ALLOCATIONS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((p as usize, layout));
    }
    p
}
/// Blocks `pvx_alloc` handed out: (address, layout).
static ALLOCATIONS: Mutex<Vec<(usize, std::alloc::Layout)>> = Mutex::new(Vec::new());
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_free(ptr: *mut u8) {
    let mut blocks = ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = blocks.iter().position(|&(a, _)| a == ptr as usize) {
        let (_, layout) = blocks.swap_remove(i);
        // SAFETY: allocated by pvx_alloc with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_page_non_coherent(_mfn: u64) {}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_domain_has_devices(_domid: u16) -> i32 {
    1
}
/// Whether the model's current domain is the control or hardware domain
/// (Xen: `current->domain`); the tests set it.
pub static CURRENT_IS_HOST: AtomicBool = AtomicBool::new(true);
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_current_is_host() -> i32 {
    CURRENT_IS_HOST.load(Ordering::Relaxed) as i32
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_devices_lock() {}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_devices_unlock() {}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_device_facts(_sbdf: u32, _owner: *mut u16, _flags: *mut u32) -> i32 {
    -19
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_log(_msg: *const u8, _len: usize) {}
std::thread_local! {
    /// The last line this thread logged through `pvx_log_error`.
    pub static LOGGED_ERROR: std::cell::RefCell<std::vec::Vec<u8>> =
        const { std::cell::RefCell::new(std::vec::Vec::new()) };
    /// Whether `pvx_log_error` prints (false: its rate limit holds it back).
    pub static LOG_ERROR_ALLOWED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    /// Lines `pvx_log_error` still prints before its rate limit holds the
    /// rest back (`None`: no limit).
    pub static LOG_ERROR_BUDGET: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}
#[no_mangle]
#[inline(never)]
pub extern "C" fn pvx_log_error(msg: *const u8, len: usize) -> i32 {
    if !LOG_ERROR_ALLOWED.with(|a| a.get()) {
        return 0;
    }
    match LOG_ERROR_BUDGET.with(|b| b.get()) {
        Some(0) => return 0,
        Some(n) => LOG_ERROR_BUDGET.with(|b| b.set(Some(n - 1))),
        None => {}
    }
    // SAFETY: the engine passes a message valid for `len` bytes.
    let line = unsafe { std::slice::from_raw_parts(msg, len) };
    LOGGED_ERROR.with(|l| *l.borrow_mut() = line.to_vec());
    1
}

// Xen's return and indirect-call thunks (plain `ret` and `jmp *%r11`, what
// Xen patches them to on hardware that needs no mitigation), for a hosted
// build made with Xen's `-Z function-return=thunk-extern
// -Z retpoline-external-thunk` (scripts/tcg-cost.sh: the same calls per page
// as the object linked into Xen). Weak: unused by an ordinary build.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .text.pviommu_model_thunks, \"ax\"",
    ".weak __x86_return_thunk",
    "__x86_return_thunk:",
    "ret",
    ".weak __x86_indirect_thunk_r11",
    "__x86_indirect_thunk_r11:",
    "jmp *%r11",
    ".popsection",
    options(att_syntax)
);
