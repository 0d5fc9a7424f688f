//! The engine's own tables on an IOMMU that does not snoop the CPU caches
//! (QEMU's intel-iommu, ECAP.C = 0): the simulated IOMMU walks table
//! memory only as written back, and the backend writes table stores back
//! once per batch (per cache line), before it invalidates. A backend that
//! skipped that would let a device miss a new mapping, or worse, keep
//! walking an unmapped one after the flush that released its page.

use pviommu_abi::{ContextId, DomId, Permissions, PvIommuOp, Request, Sbdf};
use pviommu_hv::iommu::DeviceFacts;
use pviommu_hv::sim::{FaultReason, Format, SimMachine};
use pviommu_hv::{Bfn, Engine};
use pviommu_tests::*;
use std::ops::Range;

const DEV: Sbdf = Sbdf(0x10);

fn host(format: Format) -> (SimMachine, Engine, ContextId) {
    let (mut m, e) = machine(format, 2048);
    m.add_device(
        DEV,
        DeviceFacts {
            owner: DomId::DOM0,
            own_requester_id: true,
            rmrr: false,
            ats: false,
            translated: true,
        },
    );
    let mut ops = [Request::ContextCreate.encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    let ctx = ContextId(ops[0].context);
    let mut ops = [Request::ContextAttach {
        context: ctx,
        device: DEV,
    }
    .encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    (m, e, ctx)
}

fn dma(m: &mut SimMachine, bfn: u64) -> Result<Vec<u8>, FaultReason> {
    m.device_dma_read(DEV, bfn << 12, 8).map_err(|f| f.reason)
}

/// Map the guest's `gfns` into `ctx` in one batch; each BFN is then
/// visible to the device. The BFNs.
fn map_visible(m: &mut SimMachine, e: &Engine, ctx: ContextId, gfns: Range<u64>) -> Vec<u64> {
    let mut ops: Vec<PvIommuOp> = gfns
        .map(|g| map_op_in(ctx, GUEST, g, Permissions::RW))
        .collect();
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let bfns: Vec<u64> = ops.iter().map(|o| o.bfn).collect();
    for b in &bfns {
        assert!(dma(m, *b).is_ok(), "bfn {b:#x} not visible to the device");
    }
    bfns
}

/// Unmap `bfns` of `ctx` in one batch; every op succeeds.
fn unmap_all(m: &mut SimMachine, e: &Engine, ctx: ContextId, bfns: &[u64]) {
    let mut ops: Vec<PvIommuOp> = bfns
        .iter()
        .map(|b| {
            Request::Unmap {
                context: ctx,
                bfn: Bfn(*b),
            }
            .encode()
        })
        .collect();
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
}

fn non_coherent_walks_see_every_batch(format: Format) {
    let (mut m, e, ctx) = host(format);
    // One batch of 1000 consecutive pages (two leaf tables and a bit).
    let lines_before = m.table_lines().0;
    let bfns = map_visible(&mut m, &e, ctx, 0..1000);
    assert_eq!(
        m.table_lines().1,
        0,
        "a table line left unsynced after the batch"
    );
    let synced = m.table_lines().0 - lines_before;
    // Per cache line and batch, not per entry: 1000 leaf entries fill 125
    // lines, plus the present counts and the upper tables.
    assert!(synced < 200, "{synced} lines written back for 1000 entries");
    // Unmap them all in one batch: after the flush, the device must find
    // nothing, though its IOTLB held every one of them.
    unmap_all(&mut m, &e, ctx, &bfns);
    assert_eq!(m.table_lines().1, 0);
    for b in &bfns {
        assert_eq!(
            dma(&mut m, *b),
            Err(FaultReason::NotPresent),
            "bfn {b:#x} still reachable after its unmap was flushed"
        );
    }
    // And mapped again (tables freed after the flush come back zeroed).
    map_visible(&mut m, &e, ctx, 0..600);
}

#[test]
fn vtd_non_coherent_walks_see_every_batch() {
    non_coherent_walks_see_every_batch(Format::Vtd);
}

#[test]
fn lpae_non_coherent_walks_see_every_batch() {
    non_coherent_walks_see_every_batch(Format::Lpae);
}

/// A mediator maps and unmaps the same BFNs over and over. The tables an
/// unmap empties wait for its flush, then stay with the context (up to
/// `RECYCLED_TABLES`) for the next maps: once warm, a cycle takes no frame
/// from the host, and a device still sees exactly what is mapped. A flush
/// that fails keeps them waiting: none is made a table again before a
/// flush succeeded (the simulator counts any as freed before the flush).
fn map_unmap_cycles_reuse_their_tables(format: Format) {
    let (mut m, e, ctx) = host(format);
    let cycle = |m: &mut SimMachine, first: u64, fail_flush: bool| {
        let bfns = map_visible(m, &e, ctx, first..first + 1000);
        if fail_flush {
            m.fail_flushes = 1;
        }
        unmap_all(m, &e, ctx, &bfns);
        if !fail_flush {
            for b in &bfns {
                assert_eq!(dma(m, *b), Err(FaultReason::NotPresent));
            }
        }
    };
    cycle(&mut m, 0, false);
    let warm = (m.tables_allocated(), m.free_frames());
    for round in 1..6 {
        cycle(&mut m, 0, false);
        let now = (m.tables_allocated(), m.free_frames());
        assert_eq!(now, warm, "round {round} allocated tables");
    }
    // Other gfns, so other BFNs may come; then a flush that fails once.
    cycle(&mut m, 1000, true);
    cycle(&mut m, 0, false);
    cycle(&mut m, 0, false);
    assert_eq!(m.tables_freed_before_flush(), 0);
    assert_eq!(m.table_lines().1, 0);
}

#[test]
fn vtd_map_unmap_cycles_reuse_their_tables() {
    map_unmap_cycles_reuse_their_tables(Format::Vtd);
}

#[test]
fn lpae_map_unmap_cycles_reuse_their_tables() {
    map_unmap_cycles_reuse_their_tables(Format::Lpae);
}
