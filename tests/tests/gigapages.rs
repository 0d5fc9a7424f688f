//! 1 GiB entries in context 0: Xen's own tables fold a level-2 table of
//! 2 MiB superpages of one aligned machine run into a 1 GiB entry (AMD-Vi
//! always, VT-d where every unit has 1 GiB pages), and split it again,
//! with a new table, when a page of it goes. The simulator's model of
//! those tables does the same (`TableOptions::xen_own`, `gigapages`), so
//! what the engine asks of them around a 1 GiB entry is tested here: that
//! its flush covers the whole 1 GiB (an IOTLB caches it as one entry), and
//! that a split short of memory leaves the page mapped and referenced
//! (stuck) until a later flush takes it down.
//!
//! Each test holds a guest of 1 GiB (its frames from 2^18, the machine's
//! RAM 2 GiB, half of it never touched).

use pviommu_abi::MemAttr;
use pviommu_abi::{Bfn, ContextId, DomId, Gfn, Permissions, Request, EXTENT_PAGES};
use pviommu_hv::config::Config;
use pviommu_hv::iommu::{FlushGather, IommuBackend};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Mfn};
use pviommu_tests::*;

/// Pages of a 1 GiB entry.
const GIGA: u64 = 1 << 18;

/// A machine whose guest holds one 1 GiB-aligned run of frames, an
/// engine whose quota takes all of it, and the guest mapped into dom0's
/// context 0 sixteen 2 MiB extents a call, in order: BFNs from the window's
/// start (4 GiB, a 1 GiB boundary), so Xen's tables fold each leaf table,
/// then the level-2 table, into one 1 GiB entry. A device of dom0 read at
/// page 5 (its IOTLB holds the 1 GiB entry). The first BFN.
fn guest_in_one_gigapage() -> (SimMachine, Engine, Bfn) {
    let mut m = SimMachine::new(2 * GIGA + 4096, Format::Vtd, 512);
    m.create_domain_in_gigapages(
        GUEST,
        DomainSpec {
            pages: GIGA,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    assert_eq!(m.mfn_of(GUEST, Gfn(0)), Some(Mfn(GIGA)), "1 GiB-aligned");
    for g in [0, 5, 6, 511, 512, GIGA - 1] {
        m.write_guest(GUEST, Gfn(g), 0, &pattern(g)).unwrap();
    }
    let config = Config {
        quota: 2 * GIGA,
        ..Config::default()
    };
    let e = Engine::new(config, &m).unwrap();
    let mut first = None;
    // (Sixteen a call, though the engine flushes each 1024 entries it
    // writes in context 0: two extents.)
    for call in 0..GIGA / EXTENT_PAGES / 16 {
        let mut ops: Vec<_> = (0..16)
            .map(|k| {
                let gfn = (call * 16 + k) * EXTENT_PAGES;
                let req = map_request_in(ContextId::DEFAULT, GUEST, gfn, Permissions::RW);
                Request::MapExtent(req).encode()
            })
            .collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
        for (k, op) in ops.iter().enumerate() {
            let k = call * 16 + k as u64;
            assert_eq!(op.status, 0, "extent {k}");
            let bfn = *first.get_or_insert(op.bfn);
            assert_eq!(op.bfn, bfn + k * EXTENT_PAGES, "BFNs in a row");
        }
    }
    let bfn = Bfn(first.unwrap());
    assert_eq!(bfn.0 % GIGA, 0, "the window starts on a 1 GiB boundary");
    assert_eq!(
        m.context_leaf(DomId::DOM0, ContextId::DEFAULT, bfn)
            .map(|l| l.0),
        Some(3),
        "one 1 GiB entry in Xen's tables"
    );
    check_invariants(&mut m, &e).unwrap();
    assert_eq!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, (bfn.0 + 5) << 12, 8)
            .unwrap(),
        pattern(5)[..8]
    );
    (m, e, bfn)
}

/// Dom0 unmaps the page at `page`: the op's status.
fn unmap(m: &mut SimMachine, e: &Engine, page: Bfn) -> i32 {
    let mut ops = [unmap_op_in(ContextId::DEFAULT, page)];
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    ops[0].status
}

#[test]
fn a_page_unmapped_out_of_a_1_gib_entry_in_context_0_is_unreachable_after_the_flush() {
    // Xen splits the 1 GiB entry (a level-2 table of 2 MiB entries), then
    // the 2 MiB one (a leaf table), and flushes what it is asked to. The
    // engine asks for the whole 1 GiB around what it unmapped: over 2 MiB
    // only, the device kept reaching the released page through its cached
    // 1 GiB translation.
    let (mut m, e, bfn) = guest_in_one_gigapage();
    let page = Bfn(bfn.0 + 5);
    let mfn = m.mfn_of(GUEST, Gfn(5)).unwrap();
    let refs = m.frame_info(mfn).unwrap().refs;
    assert_eq!(unmap(&mut m, &e, page), 0);
    let leaf = |m: &SimMachine, b: u64| {
        m.context_leaf(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
            .map(|l| l.0)
    };
    assert_eq!(leaf(&m, page.0), None, "split, page gone");
    assert_eq!(leaf(&m, bfn.0 + 6), Some(1), "its 2 MiB split into pages");
    assert_eq!(leaf(&m, bfn.0 + 512), Some(2), "the rest in 2 MiB entries");
    assert!(
        m.frame_info(mfn).unwrap().refs < refs,
        "its reference dropped"
    );
    assert!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, page.0 << 12, 8)
            .is_err(),
        "the device still reads a page the engine released"
    );
    // The rest still translates, through the tables the splits made.
    for g in [6, 512, GIGA - 1] {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, (bfn.0 + g) << 12, 8)
                .unwrap(),
            pattern(g)[..8],
            "page {g}"
        );
    }
    check_invariants(&mut m, &e).unwrap();
}

#[test]
fn a_1_gib_entry_that_cannot_split_keeps_its_page_mapped_until_a_later_flush() {
    // Short of memory Xen cannot split the 1 GiB entry (first table), or
    // splits it and cannot split the 2 MiB one (second): the unmap fails,
    // and the page must stay referenced while the device still reaches
    // it (fail closed), then go at a later flush once memory is back.
    for tables in [0, 1] {
        let (mut m, e, bfn) = guest_in_one_gigapage();
        let page = Bfn(bfn.0 + 5);
        let mfn = m.mfn_of(GUEST, Gfn(5)).unwrap();
        let refs = m.frame_info(mfn).unwrap().refs;
        m.fail_table_allocs(Some(tables));
        assert_eq!(unmap(&mut m, &e, page), 0, "the owner's unmap is taken");
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, page.0 << 12, 8)
                .unwrap(),
            pattern(5)[..8],
            "{tables} table(s): still mapped"
        );
        assert_eq!(
            m.frame_info(mfn).unwrap().refs,
            refs,
            "{tables} table(s): a page the device reaches stays referenced"
        );
        // No table: still the 1 GiB entry; one: split to 2 MiB entries,
        // the 2 MiB one not split (Xen's first split stays).
        assert_eq!(
            m.context_leaf(DomId::DOM0, ContextId::DEFAULT, page)
                .map(|l| l.0),
            Some(3 - tables as u32)
        );
        m.fail_table_allocs(None);
        // Any later call's flush retries it: here the unmap of another page.
        assert_eq!(unmap(&mut m, &e, Bfn(bfn.0 + 600)), 0);
        assert!(
            m.frame_info(mfn).unwrap().refs < refs,
            "{tables} table(s): released once unmapped"
        );
        assert!(m
            .dma_read(DomId::DOM0, ContextId::DEFAULT, page.0 << 12, 8)
            .is_err());
        check_invariants(&mut m, &e).unwrap();
    }
}

#[test]
fn xens_tables_fold_every_full_table_between_two_flushes() {
    // Xen queues every table it folds, to be freed after the flush, with
    // no limit; the model stopped at 8 (`FOLDED_BEFORE_FLUSH`), so a
    // ninth full leaf table stayed one. Sixteen 2 MiB runs written into
    // dom0's context 0 with no flush between: each one 2 MiB entry; then
    // one flush, and no table of theirs freed before it.
    let blocks = 16;
    let mut m = SimMachine::new(4096 + (blocks + 1) * EXTENT_PAGES, Format::Vtd, 512);
    let spec = DomainSpec {
        pages: blocks * EXTENT_PAGES,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain_in_superpages(GUEST, spec).unwrap();
    let (owner, ctx, first) = (DomId::DOM0, ContextId::DEFAULT, 1 << 20);
    let mut gather = FlushGather::default();
    for k in 0..blocks {
        let mfn = m.mfn_of(GUEST, Gfn(k * EXTENT_PAGES)).unwrap();
        let bfn = Bfn(first + k * EXTENT_PAGES);
        m.iommu_map_run(
            owner,
            ctx,
            bfn,
            mfn,
            EXTENT_PAGES,
            Permissions::RW,
            MemAttr::WriteBack,
            &mut gather,
        )
        .unwrap();
    }
    for k in 0..blocks {
        let bfn = Bfn(first + k * EXTENT_PAGES);
        assert_eq!(
            m.context_leaf(owner, ctx, bfn).map(|l| l.0),
            Some(2),
            "block {k}"
        );
    }
    m.iommu_flush(owner, &gather).unwrap();
    m.run_softirqs();
    assert_eq!(m.tables_freed_before_flush(), 0);
    assert_eq!(m.unlinked_tables_rewritten(), 0);
}
