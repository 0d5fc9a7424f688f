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

use pviommu_abi::{DomId, Permissions, PvIommuOp};
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
