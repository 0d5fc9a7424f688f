//! The simulated device's DMA through BFNs the engine handed out.

use pviommu_abi::{ContextId, DomId, Gfn, Permissions};
use pviommu_hv::sim::{FaultReason, Format};
use pviommu_tests::*;

fn dma_reads_foreign_bytes_and_faults_after_unmap(format: Format) {
    let (mut m, e) = machine(format, 64);
    let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, 7, Permissions::RW).unwrap();
    let caps = m.guest_query_caps(&e, DomId::DOM0).unwrap();
    assert!(bfn.0 >= caps.bfn_window_start && bfn.0 < caps.bfn_window_end);
    assert!(bfn.0 >= 0x10_0000, "BFN above 4 GiB and above RAM");

    let addr = bfn.0 << 12;
    let got = m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 64)
        .unwrap();
    assert_eq!(got, pattern(7));

    m.dma_write(
        DomId::DOM0,
        ContextId::DEFAULT,
        addr + 100,
        b"written by the device",
    )
    .unwrap();
    assert_eq!(
        m.read_guest(GUEST, Gfn(7), 100, 21).unwrap(),
        b"written by the device"
    );

    let mut ops = [unmap_op(bfn)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    let fault = m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 64)
        .unwrap_err();
    assert_eq!(fault.reason, FaultReason::NotPresent);
    assert_eq!(m.total_page_refs(), 0);
}

#[test]
fn vtd_dma_round_trip() {
    dma_reads_foreign_bytes_and_faults_after_unmap(Format::Vtd);
}

#[test]
fn lpae_dma_round_trip() {
    dma_reads_foreign_bytes_and_faults_after_unmap(Format::Lpae);
}

#[test]
fn write_through_read_only_mapping_faults() {
    for format in [Format::Vtd, Format::Lpae] {
        let (mut m, e) = machine(format, 16);
        let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RO).unwrap();
        let addr = bfn.0 << 12;
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, addr, 64)
                .unwrap(),
            pattern(3)
        );
        let f = m
            .dma_write(DomId::DOM0, ContextId::DEFAULT, addr, b"evil")
            .unwrap_err();
        assert_eq!(f.reason, FaultReason::WriteDenied);
        assert_eq!(
            m.read_guest(GUEST, Gfn(3), 0, 64).unwrap(),
            pattern(3),
            "page unchanged"
        );
    }
}

#[test]
fn mapping_twice_returns_same_bfn_and_needs_two_unmaps() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let a = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).unwrap();
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).unwrap();
    assert_eq!(a, b);
    let ro = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RO).unwrap();
    assert_ne!(a, ro, "different permissions get their own BFN");
    let mut ops = [unmap_op(a)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, a.0 << 12, 8)
            .is_ok(),
        "one reference left"
    );
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, a.0 << 12, 8)
        .is_err());
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, -2, "third unmap: ENOENT");
}

#[test]
fn one_flush_per_batch() {
    let (mut m, e) = machine(Format::Vtd, 600);
    let mut ops: Vec<_> = (0..512)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    let before = m.flushes;
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(m.flushes - before, 1);
    let mut unmaps: Vec<_> = ops
        .iter()
        .map(|o| unmap_op(pviommu_abi::Bfn(o.bfn)))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
    assert_eq!(m.flushes - before, 2);
    assert!(unmaps.iter().all(|o| o.status == 0));
}

/// A guest of 4096 pages after `dom0_pages` of dom0's (its frame of gfn g
/// is `dom0_pages + g`), each page starting with "gfn g"; two blocks' worth
/// mapped by dom0 (the first from gfn 7: BFNs not aligned as a later run's
/// gfns), the first unmapped in a shuffled order (a fixed permutation), the
/// second kept live (so the cell is not emptied and its slots do not start
/// over in order); then gfns `run` mapped: the machine, the engine and the
/// run's BFNs.
fn run_after_shuffled_unmaps(
    dom0_pages: u64,
    run: core::ops::Range<u64>,
) -> (pviommu_hv::sim::SimMachine, pviommu_hv::Engine, Vec<u64>) {
    let (mut m, e) = machine_after_dom0(Format::Vtd, 4096, dom0_pages);
    assert_eq!(m.mfn_of(GUEST, Gfn(0)).unwrap().0, dom0_pages);
    let map = |m: &mut pviommu_hv::sim::SimMachine, gfns: core::ops::Range<u64>| {
        let mut ops: Vec<_> = gfns.map(|g| map_op(GUEST, g, Permissions::RW)).collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        assert!(ops.iter().all(|o| o.status == 0));
        ops.iter().map(|o| o.bfn).collect::<Vec<u64>>()
    };
    let first = map(&mut m, 7..519);
    let _kept = map(&mut m, 519..1031);
    let mut shuffled = first.clone();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..shuffled.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shuffled.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut unmaps: Vec<_> = shuffled
        .iter()
        .map(|b| unmap_op(pviommu_abi::Bfn(*b)))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
    assert!(unmaps.iter().all(|o| o.status == 0));
    let bfns = map(&mut m, run);
    (m, e, bfns)
}

/// Issue 10: BFN allocation prefers contiguous runs for consecutive gfns,
/// aligned as the gfns are, so that over a guest's 2 MiB extents (gfns and
/// frames aligned alike) the IOMMU can map a run as a superpage, also once
/// unmaps in another order have shuffled the free list. Before the free
/// list was doubly linked and a map asked for the slot after its run's
/// last, a run mapped after a shuffled unmap got BFNs in the free list's
/// order: no two consecutive, and no superpage.
#[test]
fn a_run_of_gfns_gets_a_contiguous_aligned_run_of_bfns_after_shuffled_unmaps() {
    // A run of 512 gfns that starts a 2 MiB block of the guest, whose
    // frames start one too (dom0's 512 pages first).
    let g0 = 2048;
    let (mut m, _e, run) = run_after_shuffled_unmaps(512, g0..g0 + 512);
    let consecutive = run.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert_eq!(consecutive, 511, "consecutive gfns, consecutive BFNs");
    assert_eq!(run[0] % 512, g0 % 512, "aligned as the gfns are");
    // The leaf table filled with contiguous, aligned entries: one 2 MiB
    // superpage maps the whole run.
    let (level, _) = m
        .context_leaf(DomId::DOM0, ContextId::DEFAULT, pviommu_abi::Bfn(run[0]))
        .unwrap();
    assert_eq!(level, 2, "the run is one superpage");
    for (i, b) in run.iter().enumerate().step_by(101) {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, b << 12, 64)
                .unwrap(),
            pattern(g0 + i as u64)
        );
    }
}

/// The BFNs a driver domain is handed depend only on what it knows (its
/// gfns, its own maps and unmaps), never on the machine frames behind them:
/// the same calls over a guest whose frames sit elsewhere give the same
/// BFNs (a BFN's low bits aligned as the frame would tell the caller the
/// frame's low bits).
#[test]
fn the_bfns_handed_out_do_not_depend_on_the_machine_frames() {
    for run in [2048..2560, 2100..2300, 1..2] {
        let (_, _, aligned) = run_after_shuffled_unmaps(512, run.clone());
        for dom0_pages in [64, 100, 511] {
            let (_, _, elsewhere) = run_after_shuffled_unmaps(dom0_pages, run.clone());
            assert!(
                aligned == elsewhere,
                "run {run:?}, frames from {dom0_pages}: BFNs from {:#x?} against {:#x?}",
                aligned.first(),
                elsewhere.first()
            );
        }
    }
}

#[test]
fn superpage_made_for_aligned_run_and_split_on_partial_unmap() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    // Find a guest gfn whose mfn is 2 MiB aligned, so an aligned BFN run can fold.
    let g0 = (0..1024)
        .find(|g| m.mfn_of(GUEST, Gfn(*g)).unwrap().0 % 512 == 0)
        .unwrap();
    let mut ops: Vec<_> = (g0..g0 + 512)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    let xen_before = m.xen_frames();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(ops[0].bfn % 512, 0);
    // The context's root plus the level-3 and level-2 tables: Xen's own
    // code frees the leaf table it folded into a superpage once flushed.
    assert_eq!(
        m.xen_frames() - xen_before,
        3,
        "leaf table freed after promotion"
    );
    let digest_folded = m.table_digest();
    for (i, o) in ops.iter().enumerate().step_by(97) {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(g0 + i as u64)
        );
    }
    // Unmapping one page splits the superpage, which in Xen's own tables
    // takes a new table (its "shatter"): with every allocation failing the
    // unmap still succeeds for its caller, but the entry stays (the page
    // referenced, the BFN taken) until a later flush can split it.
    let mut un = [unmap_op(pviommu_abi::Bfn(ops[10].bfn))];
    m.fail_table_allocs(Some(0));
    m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
    m.fail_table_allocs(None);
    assert_eq!(un[0].status, 0);
    assert_eq!(m.table_digest(), digest_folded, "nothing split");
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, ops[10].bfn << 12, 8)
        .is_ok());
    e.finish(&mut m, DomId::DOM0);
    assert_ne!(m.table_digest(), digest_folded);
    assert_eq!(m.xen_frames() - xen_before, 4, "the split took a new table");
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, ops[10].bfn << 12, 8)
        .is_err());
    assert_eq!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, ops[11].bfn << 12, 64)
            .unwrap(),
        pattern(g0 + 11)
    );
    let mut rest: Vec<_> = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 10)
        .map(|(_, o)| unmap_op(pviommu_abi::Bfn(o.bfn)))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut rest).unwrap();
    assert_eq!(
        m.xen_frames(),
        xen_before + 1,
        "empty tables freed, the root stays"
    );
    assert_eq!(m.total_page_refs(), 0);
}

#[test]
fn contexts_are_separate_address_spaces() {
    let (mut m, e) = machine(Format::Lpae, 16);
    let mut ops = [pviommu_abi::Request::ContextCreate.encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    let ctx = ContextId(ops[0].context);
    assert_ne!(ctx, ContextId::DEFAULT);
    let mut map = map_op(GUEST, 4, Permissions::RW);
    map.context = ctx.0;
    // Context 0 maps one page more than `ctx`, so that one of its BFNs is
    // not `ctx`'s (each context numbers its BFNs on its own).
    let mut ops = [
        map,
        map_op(GUEST, 5, Permissions::RW),
        map_op(GUEST, 4, Permissions::RW),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    let (b1, b0) = (ops[0].bfn, ops[2].bfn);
    assert_eq!(
        m.dma_read(DomId::DOM0, ctx, b1 << 12, 64).unwrap(),
        pattern(4)
    );
    assert_eq!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, b0 << 12, 64)
            .unwrap(),
        pattern(4)
    );
    assert!(
        m.dma_read(DomId::DOM0, ctx, b0 << 12, 8).is_err(),
        "a BFN of the default context only is not in ctx"
    );
    assert_ne!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, b1 << 12, 64)
            .ok(),
        Some(pattern(4)),
        "ctx's BFN leads elsewhere (or nowhere) in the default context"
    );
    // A context with mappings cannot go.
    let mut d = [pviommu_abi::Request::ContextDestroy { context: ctx }.encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut d).unwrap();
    assert_eq!(d[0].status, -16);
    let mut u = [pviommu_abi::Request::Unmap {
        context: ctx,
        bfn: pviommu_abi::Bfn(b1),
    }
    .encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut u).unwrap();
    m.guest_batch_all(&e, DomId::DOM0, &mut d).unwrap();
    assert_eq!(d[0].status, 0);
}

#[test]
fn reserved_regions_and_caps() {
    let (mut m, e) = machine(Format::Vtd, 8);
    let caps = m.guest_query_caps(&e, DomId::DOM0).unwrap();
    assert_eq!(caps.version, pviommu_abi::INTERFACE_VERSION);
    let regions = m.guest_reserved_regions(&e, DomId::DOM0).unwrap();
    assert_eq!(regions.len() as u32, caps.nr_reserved_regions);
    assert!(regions
        .iter()
        .any(|r| r.start_bfn == 0xFEE00 && r.kind == pviommu_abi::region_kind::MSI));
    assert!(regions
        .iter()
        .any(|r| r.kind == pviommu_abi::region_kind::RMRR));
}

/// DMA that faults over and over (a device, or a daemon's client asking
/// for DMA reads in a loop) does not grow the simulator: the newest
/// `FAULTS_KEPT` faults are kept and the rest counted. Before, every fault
/// was kept, so a client of the daemon could grow it without bound (a
/// hostile-input audit of the guest side).
#[test]
fn faults_without_end_keep_a_bounded_log() {
    let (mut m, _e) = machine(Format::Vtd, 16);
    let n = pviommu_hv::sim::FAULTS_KEPT as u64 + 100;
    for i in 0..n {
        let at = (0x20_0000 + i) << 12;
        assert!(m.dma_read(DomId::DOM0, ContextId::DEFAULT, at, 1).is_err());
    }
    assert_eq!(m.faults_total, n);
    assert_eq!(m.faults.len(), pviommu_hv::sim::FAULTS_KEPT);
    let newest = m.faults.back().map(|f| f.addr);
    assert_eq!(
        newest,
        Some((0x20_0000 + n - 1) << 12),
        "the newest is kept"
    );
}
