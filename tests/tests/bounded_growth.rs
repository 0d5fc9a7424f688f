//! The engine's tables grow a bounded piece at a time (issue 10).
//!
//! A driver domain's slot array and page index used to be one `Vec` and one
//! hash table each, doubled when full: at 1 Mi mappings one map call copied
//! 32 MiB of slots, rehashed 1 Mi index entries (127 ms, each rehash a
//! cache miss on the slot) and asked Xen's heap for 32 MiB blocks, all under
//! the driver lock that the gfn hooks of every mapped guest wait on. Now
//! slots grow by blocks of `CHUNK_LEN` and the index by one of its shards:
//! no engine allocation made by a map is larger than one block, however
//! many mappings are live. (Time per call is benchmarked, not asserted:
//! `cargo run --release --example` figures are in design/performance.md.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use pviommu_abi::{Bfn, ContextId, DomId, Permissions, PvIommuOp, Request};
use pviommu_hv::sim::{Format, HostAllocations};
use pviommu_tests::*;

struct LargestAlloc;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    /// Largest engine allocation made while armed.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(|a| a.get()) && !HostAllocations::active() {
            LARGEST.with(|l| l.set(l.get().max(layout.size())));
        }
        // SAFETY: forwarding the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarding.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

/// One block of slots: `storage::CHUNK_LEN` (4096) slots of 32 bytes.
const BLOCK: usize = 4096 * 32;

#[test]
fn a_block_is_what_the_engine_calls_one() {
    assert_eq!(BLOCK, pviommu_hv::storage::CHUNK_LEN * 32);
}

#[test]
fn no_map_allocates_more_than_one_block_however_many_mappings_are_live() {
    const PAGES: u64 = 64 * 1024;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let mut ops: Vec<PvIommuOp> = Vec::with_capacity(512);
    for first in (0..PAGES).step_by(512) {
        ops.clear();
        ops.extend((first..first + 512).map(|g| map_op(GUEST, g, Permissions::RW)));
        ARMED.with(|a| a.set(true));
        let r = m.guest_batch_all(&e, DomId::DOM0, &mut ops);
        ARMED.with(|a| a.set(false));
        r.unwrap();
        assert!(ops.iter().all(|op| op.status == 0), "map refused");
    }
    assert_eq!(e.driver_state(DomId::DOM0).unwrap().live(), PAGES);
    let largest = LARGEST.with(|l| l.get());
    // Before: the slot array alone reached 64 Ki x 32 bytes = 2 MiB in one
    // allocation, and the page index 256 Ki buckets x 8 bytes = 2 MiB.
    assert!(
        largest <= BLOCK,
        "a map allocated {largest} bytes at once (one block is {BLOCK})"
    );
}

/// Map `pages` pages of the guest into dom0's `ctx` in batches of 512:
/// their BFNs, in gfn order.
fn map_all_in(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    ctx: ContextId,
    pages: u64,
) -> Vec<Bfn> {
    let mut bfns = Vec::new();
    for first in (0..pages).step_by(512) {
        let mut ops: Vec<PvIommuOp> = (first..(first + 512).min(pages))
            .map(|g| map_op_in(ctx, GUEST, g, Permissions::RW))
            .collect();
        m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|op| op.status == 0), "map refused");
        bfns.extend(ops.iter().map(|op| Bfn(op.bfn)));
    }
    bfns
}

/// [`map_all_in`] dom0's default context.
fn map_all(m: &mut pviommu_hv::sim::SimMachine, e: &pviommu_hv::Engine, pages: u64) -> Vec<Bfn> {
    map_all_in(m, e, ContextId::DEFAULT, pages)
}

/// Unmap `bfns` of dom0's `ctx` in batches of 512.
fn unmap_all_in(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    ctx: ContextId,
    bfns: &[Bfn],
) {
    for chunk in bfns.chunks(512) {
        let mut ops: Vec<PvIommuOp> = chunk.iter().map(|&b| unmap_op_in(ctx, b)).collect();
        m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|op| op.status == 0), "unmap refused");
    }
}

/// [`unmap_all_in`] dom0's default context.
fn unmap_all(m: &mut pviommu_hv::sim::SimMachine, e: &pviommu_hv::Engine, bfns: &[Bfn]) {
    unmap_all_in(m, e, ContextId::DEFAULT, bfns)
}

/// A context of dom0's, created by a batch.
fn create_context(m: &mut pviommu_hv::sim::SimMachine, e: &pviommu_hv::Engine) -> ContextId {
    let mut ops = [Request::ContextCreate.encode()];
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    ContextId(ops[0].context)
}

fn dom0_heap(e: &pviommu_hv::Engine) -> (usize, usize) {
    let d = e.driver_state(DomId::DOM0).unwrap();
    (d.heap_bytes(), d.slot_capacity())
}

/// A review of 2026-12-06: a cell gave its slot array and page index back
/// only once empty, so a driver domain that mapped 16 Ki pages and kept
/// one kept the memory of all 16 Ki (a device model with 4 cells, about 4
/// quotas' worth). Now the blocks above its highest slot in use go, one
/// an unlock, and the page index's empty shards with them; the BFN kept
/// still reaches its page, and the cell maps as before.
#[test]
fn a_cell_that_keeps_one_bfn_gives_back_the_blocks_above_it() {
    const PAGES: u64 = 16 * 1024;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let bfns = map_all(&mut m, &e, PAGES);
    let (peak, peak_slots) = dom0_heap(&e);
    assert_eq!(peak_slots, PAGES as usize);
    // Keep the lowest; unmap the rest (32 calls: the blocks empty from
    // the top in the last 8), then one more call of dom0's: a block each.
    unmap_all(&mut m, &e, &bfns[1..]);
    assert_eq!(
        dom0_heap(&e).1,
        3 * BLOCK / 32,
        "the last call gave one block back"
    );
    e.finish(&mut m, DomId::DOM0);
    let (kept, kept_slots) = dom0_heap(&e);
    eprintln!("dom0's cell: {peak} bytes with {PAGES} mapped, {kept} with one");
    // Before: 16 Ki slots and every shard, as at the peak. Now the first
    // block, and the free one above it that a trim always leaves.
    assert_eq!(kept_slots, 2 * BLOCK / 32, "two blocks of four kept");
    // And of the page index, the one shard in use and the shards' table.
    assert!(kept <= 2 * BLOCK + 16 * 1024, "{kept} bytes kept of {peak}");
    assert!(e.driver_state(DomId::DOM0).unwrap().free_list_is_whole());
    check_invariants(&mut m, &e).unwrap();
    let gfn0 = m.translate(DomId::DOM0, ContextId::DEFAULT, bfns[0]);
    assert!(gfn0.is_some(), "the BFN kept still reaches its page");
    // The cell maps again, as many as before, and empties as before.
    let again = map_all(&mut m, &e, PAGES);
    check_invariants(&mut m, &e).unwrap();
    unmap_all(&mut m, &e, &again);
    unmap_all(&mut m, &e, &bfns[..1]);
    check_invariants(&mut m, &e).unwrap();
    assert!(dom0_heap(&e).0 <= BLOCK + 64 * 1024);
    assert_eq!(pviommu_hv::lock_check::violations(), 0);
}

/// A BFN never moves: one held in the last block keeps every block below
/// it, and only its unmap lets the cell's memory go.
#[test]
fn a_bfn_held_in_the_last_block_keeps_the_blocks_below_it() {
    const PAGES: u64 = 16 * 1024;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let bfns = map_all(&mut m, &e, PAGES);
    let last = bfns.len() - 1;
    unmap_all(&mut m, &e, &bfns[..last]);
    assert_eq!(dom0_heap(&e).1, PAGES as usize);
    assert!(m
        .translate(DomId::DOM0, ContextId::DEFAULT, bfns[last])
        .is_some());
    check_invariants(&mut m, &e).unwrap();
    unmap_all(&mut m, &e, &bfns[last..]);
    assert!(dom0_heap(&e).1 <= BLOCK / 32);
    check_invariants(&mut m, &e).unwrap();
}

/// The free block kept below a trimmed one is the hysteresis: a working
/// set that swings by a block over 8 Ki pages kept mapped neither gives
/// memory back nor asks for it again, round after round.
#[test]
fn a_working_set_that_swings_by_a_block_keeps_its_memory() {
    let (mut m, e) = machine(Format::Vtd, 16 * 1024);
    let _kept = map_all(&mut m, &e, 8 * 1024);
    let mut before = None;
    for _ in 0..4 {
        let mut ops: Vec<PvIommuOp> = (8 * 1024..12 * 1024)
            .map(|g| map_op(GUEST, g, Permissions::RW))
            .collect();
        for chunk in ops.chunks_mut(512) {
            m.guest_batch_all(&e, DomId::DOM0, chunk).unwrap();
        }
        let swing: Vec<Bfn> = ops.iter().map(|op| Bfn(op.bfn)).collect();
        unmap_all(&mut m, &e, &swing);
        let now = dom0_heap(&e);
        assert_eq!(*before.get_or_insert(now), now, "the memory moved");
    }
    check_invariants(&mut m, &e).unwrap();
}

/// The page index's shards grew for a peak of 16 Ki pages; with one page
/// in 64 kept (scattered over every shard, and the highest slot still in
/// use, so no block of slots goes), each shard holds a value or two in
/// buckets sized for 64. The owner's own calls rebuild the sparse ones
/// smaller, one shard a call (before, a shard kept its peak's size for as
/// long as it held a value).
#[test]
fn a_page_index_that_grew_for_a_peak_shrinks_once_most_pages_go() {
    const PAGES: u64 = 16 * 1024;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let bfns = map_all(&mut m, &e, PAGES);
    let gone: Vec<Bfn> = (0..bfns.len())
        .filter(|i| i % 64 != 63)
        .map(|i| bfns[i])
        .collect();
    unmap_all(&mut m, &e, &gone);
    // (One shard rebuilt a call: 256 calls at most.)
    for _ in 0..256 {
        e.finish(&mut m, DomId::DOM0);
    }
    let (after, slots) = dom0_heap(&e);
    assert_eq!(slots, PAGES as usize, "the highest slot is in use");
    let slot_bytes = slots * 32;
    // 256 shards of 16 buckets (32 KiB) and the shards' table, where the
    // peak's shards held 64 or more buckets each (128 KiB and up).
    assert!(
        after - slot_bytes <= 48 * 1024,
        "the index kept {} bytes for {} pages",
        after - slot_bytes,
        PAGES / 64
    );
    check_invariants(&mut m, &e).unwrap();
    // The kept BFNs still reach their pages, and the index still finds
    // them: a map of the same page shares the BFN.
    let kept = bfns[63];
    assert!(m.translate(DomId::DOM0, ContextId::DEFAULT, kept).is_some());
    let mut op = [map_op(GUEST, 63, Permissions::RW)];
    m.guest_batch_all(&e, DomId::DOM0, &mut op).unwrap();
    assert_eq!(Bfn(op[0].bfn), kept);
}

/// A review of 2026-12-06: the bound on what a call gives back was per
/// cell, so one call that ended in 4 cells gave back 12 blocks (49 152
/// slots taken off scattered free lists, in a call end that is not
/// preemptible; dom0 has up to 16 cells). Now it is one block a call over
/// all of the caller's cells.
#[test]
fn a_call_gives_back_one_block_over_all_its_cells() {
    const PAGES: u64 = 5 * 4096;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let mut contexts = vec![ContextId::DEFAULT];
    for _ in 0..3 {
        contexts.push(create_context(&mut m, &e));
    }
    // Each context: 5 blocks mapped, all but the lowest and the highest
    // BFN unmapped (the highest keeps the blocks below it).
    let mut tops = Vec::new();
    for &ctx in &contexts {
        let bfns = map_all_in(&mut m, &e, ctx, PAGES);
        let last = bfns.len() - 1;
        unmap_all_in(&mut m, &e, ctx, &bfns[1..last]);
        tops.push((ctx, bfns[last]));
    }
    let slots = |e: &pviommu_hv::Engine| -> usize {
        contexts
            .iter()
            .map(|&c| e.context_state(DomId::DOM0, c).unwrap().slot_capacity())
            .sum()
    };
    let before = slots(&e);
    // One call unmaps the highest BFN of each: every cell could give back
    // 3 blocks.
    let mut ops: Vec<PvIommuOp> = tops.iter().map(|&(c, b)| unmap_op_in(c, b)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let given = (before - slots(&e)) / (BLOCK / 32);
    assert_eq!(given, 1, "{given} blocks given back in one call");
    // The next calls go on, a block each, until each cell keeps two.
    for _ in 0..11 {
        e.finish(&mut m, DomId::DOM0);
    }
    assert_eq!(slots(&e), 4 * 2 * BLOCK / 32);
    check_invariants(&mut m, &e).unwrap();
}

/// A re-review of 2026-12-06: a context cell trimmed under its
/// keep-when-empty size (16 Ki slots) stopped shrinking its index, since
/// both decided by the slot array's size, and once emptied kept the
/// peak's index (1 647 232 bytes for a cell that had held 64 Ki pages).
/// Now the index's own size decides.
#[test]
fn a_trimmed_context_cell_gives_its_peak_index_back() {
    const PAGES: u64 = 64 * 1024;
    let (mut m, e) = machine(Format::Vtd, PAGES + 8);
    let ctx = create_context(&mut m, &e);
    let bfns = map_all_in(&mut m, &e, ctx, PAGES);
    let heap = |e: &pviommu_hv::Engine| {
        let d = e.context_state(DomId::DOM0, ctx).unwrap();
        (d.heap_bytes(), d.slot_capacity(), d.live())
    };
    // Unmap from the top down, keeping the lowest 1024.
    let rest: Vec<Bfn> = bfns[1024..].iter().rev().copied().collect();
    unmap_all_in(&mut m, &e, ctx, &rest);
    for _ in 0..1000 {
        e.finish_contexts(&mut m, DomId::DOM0, 1 << ctx.0);
    }
    let (kept, _, live) = heap(&e);
    assert_eq!(live, 1024);
    // Two blocks of slots (256 KiB) and an index no larger than what the
    // context's cell keeps when empty (512 KiB); 1 778 304 bytes before.
    assert!(kept <= 800 * 1024, "{kept} bytes for 1024 pages");
    unmap_all_in(&mut m, &e, ctx, &bfns[..1024]);
    let (h, _, l) = heap(&e);
    assert_eq!(l, 0);
    assert!(h <= 1024 * 1024, "emptied context cell keeps {h} bytes");
    check_invariants(&mut m, &e).unwrap();
}
