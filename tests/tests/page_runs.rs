//! Runs of pages looked up together (`Platform::get_pages`): a batch's
//! maps of one target and access, whatever their gfns, and an extent's 512
//! pages, ask the host for their pages in one call (on Xen: one domain
//! lookup, and one p2m walk for the pages one p2m entry maps). A
//! host may stop a run anywhere; the engine then looks the rest up itself,
//! and what it maps, refuses and holds is the same as page by page.

use pviommu_abi::{ContextId, DomId, Errno, Gfn, Permissions, PvIommuOp, Request};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;
use zerocopy::IntoBytes;

/// References a page mapped writable holds (`total_page_refs`): the
/// page's and its writable type's.
const WRITABLE: u64 = 2;

fn host() -> (SimMachine, Engine) {
    machine_after_dom0(Format::Vtd, 2048, 512)
}

/// Map gfns `gfns` of the guest as dom0, one batch: each op's status and
/// BFN.
fn map_all(m: &mut SimMachine, e: &Engine, gfns: &[u64], perms: Permissions) -> Vec<(i32, u64)> {
    let mut ops: Vec<PvIommuOp> = gfns.iter().map(|&g| map_op(GUEST, g, perms)).collect();
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    ops.iter().map(|o| (o.status, o.bfn)).collect()
}

/// Every op's page is mapped at its BFN, and the device reads the guest's
/// bytes there.
fn assert_mapped(m: &mut SimMachine, gfns: &[u64], results: &[(i32, u64)]) {
    for (&g, &(status, bfn)) in gfns.iter().zip(results) {
        assert_eq!(status, 0, "gfn {g:#x}");
        assert_eq!(
            m.translate(DomId::DOM0, ContextId::DEFAULT, pviommu_abi::Bfn(bfn))
                .map(|t| t.0),
            m.mfn_of(GUEST, Gfn(g)),
            "gfn {g:#x}"
        );
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, bfn << 12, 64)
                .unwrap(),
            pattern(g)
        );
    }
}

#[test]
fn consecutive_gfns_are_looked_up_a_run_at_a_time() {
    let (mut m, e) = host();
    let gfns: Vec<u64> = (100..164).collect();
    let results = map_all(&mut m, &e, &gfns, Permissions::RW);
    assert_mapped(&mut m, &gfns, &results);
    // 64 pages, 8 ops a lock (`MAP_CHUNK`): one run each, no page alone.
    assert_eq!(m.page_runs, 64 / pviommu_hv::engine::MAP_CHUNK as u64);
    assert_eq!(m.page_lookups, 0);
    check_invariants(&mut m, &e).unwrap();
}

/// A mediator's maps are as often scattered, or falling, as rising: a
/// batch's ops of one target go to the host together whatever their gfns.
#[test]
fn scattered_and_falling_gfns_are_looked_up_together_too() {
    let scattered: Vec<u64> = (0..16).map(|i| 100 + 3 * i).collect();
    let falling: Vec<u64> = (0..16).map(|i| 700 - i).collect();
    for gfns in [scattered, falling] {
        let (mut m, e) = host();
        let results = map_all(&mut m, &e, &gfns, Permissions::RW);
        assert_mapped(&mut m, &gfns, &results);
        assert_eq!((m.page_runs, m.page_lookups), (2, 0), "{gfns:?}");
        check_invariants(&mut m, &e).unwrap();
    }
}

/// Ops of two targets in turn make no run (each run stays within one
/// target's ops): each page is looked up alone.
#[test]
fn ops_of_targets_in_turn_are_looked_up_one_by_one() {
    let (mut m, e) = host();
    let target = |i: usize| ([GUEST, STRANGER][i % 2], Gfn(10 + i as u64));
    let mut ops: Vec<PvIommuOp> = (0..8)
        .map(|i| map_op(target(i).0, target(i).1 .0, Permissions::RW))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    for (i, o) in ops.iter().enumerate() {
        let (domid, gfn) = target(i);
        assert_eq!(o.status, 0, "op {i}");
        // Each op's own target's page, never the other's.
        assert_eq!(
            m.translate(DomId::DOM0, ContextId::DEFAULT, pviommu_abi::Bfn(o.bfn))
                .map(|t| t.0),
            m.mfn_of(domid, gfn),
            "op {i}"
        );
    }
    assert_eq!((m.page_runs, m.page_lookups), (0, 8));
    check_invariants(&mut m, &e).unwrap();
}

/// A host that stops every run after `limit` pages (Xen's stops at the end
/// of a p2m entry): the ops past it look their pages up again, and all are
/// mapped as page by page.
#[test]
fn runs_cut_short_by_the_host_map_the_same() {
    for limit in [0, 1, 3, 7] {
        let (mut m, e) = host();
        m.page_run_limit = Some(limit);
        let gfns: Vec<u64> = (200..232).collect();
        let results = map_all(&mut m, &e, &gfns, Permissions::RW);
        assert_mapped(&mut m, &gfns, &results);
        assert_eq!(m.total_page_refs(), WRITABLE * 32, "limit {limit}");
        check_invariants(&mut m, &e).unwrap();
        // And all go again: nothing is held but the mappings' own.
        let mut unmaps: Vec<PvIommuOp> = results
            .iter()
            .map(|&(_, b)| unmap_op(pviommu_abi::Bfn(b)))
            .collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
        assert!(unmaps.iter().all(|o| o.status == 0));
        assert_eq!(m.total_page_refs(), 0, "limit {limit}");
        check_invariants(&mut m, &e).unwrap();
    }
}

/// A page in the middle of a run that cannot be mapped (each kind the host
/// refuses) fails alone, with its own error; the pages around it map, and
/// no reference is left over. The run's lookup of it is its only one (a
/// lookup may page in, populate or unshare: once a page, as Xen's glue
/// answers for the page its run stops at).
#[test]
fn a_page_a_run_stops_at_fails_alone_with_its_own_error() {
    type Spoil = fn(&mut SimMachine, Gfn);
    let cases: [(&str, Spoil, Errno); 6] = [
        (
            "removed",
            |m, g| {
                m.remove_gfn(GUEST, g).unwrap();
            },
            Errno::Nxio,
        ),
        ("mmio", |m, g| m.set_mmio(GUEST, g), Errno::NoDev),
        ("grant", |m, g| m.set_grant(GUEST, g), Errno::XDev),
        ("read-only", |m, g| m.set_read_only(GUEST, g), Errno::Acces),
        ("xen-owned", |m, g| m.set_xen_owned(GUEST, g), Errno::XDev),
        ("paged-out", |m, g| m.set_paged_out(GUEST, g), Errno::Again),
    ];
    for (what, spoil, errno) in cases {
        let (mut m, e) = host();
        spoil(&mut m, Gfn(303));
        let gfns: Vec<u64> = (300..308).collect();
        let results = map_all(&mut m, &e, &gfns, Permissions::RW);
        for (&g, &(status, _)) in gfns.iter().zip(&results) {
            if g == 303 {
                assert_eq!(status, errno.negated(), "{what}");
            } else {
                assert_eq!(status, 0, "{what}: gfn {g}");
            }
        }
        let ok: Vec<(u64, (i32, u64))> = gfns
            .iter()
            .copied()
            .zip(results.iter().copied())
            .filter(|(g, _)| *g != 303)
            .collect();
        let (g, r): (Vec<u64>, Vec<(i32, u64)>) = ok.into_iter().unzip();
        assert_mapped(&mut m, &g, &r);
        assert_eq!(m.total_page_refs(), WRITABLE * 7, "{what}");
        // 300-302 by a run that stops at 303 and answers for it, 304-307
        // by the next: no page looked up alone, the pager asked once.
        assert_eq!((m.page_runs, m.page_lookups), (2, 0), "{what}");
        let paged = u64::from(what == "paged-out");
        assert_eq!(m.paging_requests, paged, "{what}");
        check_invariants(&mut m, &e).unwrap();
    }
}

/// A run whose first page is refused answers for it, and the ops after it
/// still go by runs (a refusal is an answer, not a host without runs).
#[test]
fn a_run_refused_at_its_first_page_answers_it_and_runs_on() {
    let (mut m, e) = host();
    m.set_paged_out(GUEST, Gfn(600));
    let gfns: Vec<u64> = (600..608).collect();
    let results = map_all(&mut m, &e, &gfns, Permissions::RW);
    assert_eq!(results[0].0, Errno::Again.negated());
    assert_mapped(&mut m, &gfns[1..], &results[1..]);
    assert_eq!((m.page_runs, m.page_lookups, m.paging_requests), (2, 0, 1));
    assert_eq!(m.total_page_refs(), WRITABLE * 7);
    check_invariants(&mut m, &e).unwrap();
}

/// Read-only pages may be a run's for a read-only map, not for a
/// writable one (which then fails page by page, each with `EACCES`).
#[test]
fn read_only_pages_run_for_read_only_maps_only() {
    let (mut m, e) = host();
    for g in 400..408 {
        m.set_read_only(GUEST, Gfn(g));
    }
    let gfns: Vec<u64> = (400..408).collect();
    let ro = map_all(&mut m, &e, &gfns, Permissions::RO);
    assert!(ro.iter().all(|&(s, _)| s == 0));
    assert_eq!((m.page_runs, m.page_lookups), (1, 0));
    let rw = map_all(&mut m, &e, &gfns, Permissions::RW);
    assert!(rw.iter().all(|&(s, _)| s == Errno::Acces.negated()));
    assert_eq!(m.total_page_refs(), 8);
    check_invariants(&mut m, &e).unwrap();
}

/// The target's p2m changes while a run's pages are held (another CPU,
/// right after the run's lookup, before the engine takes its lock): the
/// ops see the target moved under the lock and look their pages up again;
/// the page removed, which the run held, is not mapped.
#[test]
fn a_p2m_change_during_a_run_is_seen_by_its_ops() {
    let (mut m, e) = host();
    let gfns: Vec<u64> = (500..508).collect();
    let ops: Vec<PvIommuOp> = gfns
        .iter()
        .map(|&g| map_op(GUEST, g, Permissions::RW))
        .collect();
    let (base, ops_addr) = stage_batch(&mut m, DomId::DOM0, &ops);
    {
        // (Ballooned out: the hook runs, as Xen's after the p2m change.)
        let race: Race = Box::new(|m: &mut SimMachine| {
            m.balloon_out(&e, GUEST, Gfn(505)).unwrap();
        });
        let mut h = Interposer::new(&mut m, Service::GetPages, race);
        assert_eq!(
            e.hypercall(&mut h, DomId::DOM0, pviommu_abi::cmd::BATCH, base),
            0
        );
    }
    let mut out = ops.clone();
    m.copy_from_guest(ops_addr, out.as_mut_bytes()).unwrap();
    for (&g, o) in gfns.iter().zip(&out) {
        let want = if g == 505 { Errno::Nxio.negated() } else { 0 };
        assert_eq!(o.status, want, "gfn {g}");
    }
    assert_eq!(m.total_page_refs(), WRITABLE * 7);
    check_invariants(&mut m, &e).unwrap();
}

/// Dom0 maps the guest's writable extent from `gfn` into context 0: the
/// op's status.
fn map_extent(m: &mut SimMachine, e: &Engine, gfn: u64) -> i32 {
    let req = map_request_in(ContextId::DEFAULT, GUEST, gfn, Permissions::RW);
    let mut ops = [Request::MapExtent(req).encode()];
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    ops[0].status
}

/// An extent's 512 pages come in runs too; a run that stops (here: every
/// few pages) changes nothing of the all-or-nothing map, and a page that
/// cannot be mapped fails the extent with nothing held.
#[test]
fn an_extent_looks_its_pages_up_in_runs() {
    for limit in [None, Some(5)] {
        let (mut m, e) = host();
        m.page_run_limit = limit;
        assert_eq!(map_extent(&mut m, &e, 512), 0, "{limit:?}");
        assert_eq!(m.total_page_refs(), WRITABLE * 512);
        if limit.is_none() {
            // 16 pages a run (`EXTENT_RUN_LOOKUP`), none alone.
            assert_eq!((m.page_runs, m.page_lookups), (32, 0));
        }
        check_invariants(&mut m, &e).unwrap();

        // The next extent with a hole: refused, nothing held for it.
        m.remove_gfn(GUEST, Gfn(1024 + 300)).unwrap();
        assert_eq!(
            map_extent(&mut m, &e, 1024),
            Errno::Nxio.negated(),
            "{limit:?}"
        );
        assert_eq!(m.total_page_refs(), WRITABLE * 512, "{limit:?}");
        check_invariants(&mut m, &e).unwrap();

        // One with a page paged out: refused (`EAGAIN`), the pager asked
        // once, by the run that stopped at it (or, where runs are cut
        // before it, by its own lookup), never twice.
        m.set_paged_out(GUEST, Gfn(1536 + 300));
        let lookups = m.page_lookups;
        assert_eq!(
            map_extent(&mut m, &e, 1536),
            Errno::Again.negated(),
            "{limit:?}"
        );
        assert_eq!(m.paging_requests, 1, "{limit:?}");
        if limit.is_none() {
            assert_eq!(m.page_lookups, lookups, "{limit:?}");
        }
        assert_eq!(m.total_page_refs(), WRITABLE * 512, "{limit:?}");
        check_invariants(&mut m, &e).unwrap();
    }
}

/// A run of writable maps a device writes without snooping (uncached,
/// into a context of the engine's own) marks every page of the run for a
/// cache flush before reuse (XSA-402 class), as a page looked up alone is;
/// a read-only run marks none.
#[test]
fn every_page_of_an_uncached_writable_run_is_marked_non_coherent() {
    use pviommu_abi::{op_flags, MemAttr};
    let (mut m, e) = host();
    let mut create = [Request::ContextCreate.encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut create).unwrap();
    let ctx = ContextId(create[0].context);
    let uncached = |g: u64, perms| {
        let mut o = map_op_in(ctx, GUEST, g, perms);
        o.flags |= MemAttr::Uncached.field() << op_flags::ATTR_SHIFT;
        o
    };
    let mut ops: Vec<PvIommuOp> = (600..608)
        .map(|g| uncached(g, Permissions::RW))
        .chain((700..708).map(|g| uncached(g, Permissions::RO)))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!((m.page_runs, m.page_lookups), (2, 0));
    let marked = |m: &SimMachine, g| {
        let mfn = m.mfn_of(GUEST, Gfn(g)).unwrap();
        m.frame_info(mfn).unwrap().non_coherent
    };
    for g in 600..608 {
        assert!(marked(&m, g), "writable gfn {g}");
    }
    for g in 700..708 {
        assert!(!marked(&m, g), "read-only gfn {g}");
    }
    // An extent's pages, looked up 16 at a time, likewise.
    let mut ext = Request::MapExtent(map_request_in(ctx, GUEST, 1024, Permissions::RW)).encode();
    ext.flags |= MemAttr::Uncached.field() << op_flags::ATTR_SHIFT;
    let mut ops = [ext];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    for g in 1024..1536 {
        assert!(marked(&m, g), "extent gfn {g}");
    }
    check_invariants(&mut m, &e).unwrap();
}

/// Consecutive gfns asked for with different access are two runs: a
/// writable map's page is looked up for writing (its writable type
/// reference taken), never as part of a read-only run.
#[test]
fn a_run_never_mixes_read_only_and_writable_maps() {
    let (mut m, e) = host();
    let mut ops: Vec<PvIommuOp> = (800..808)
        .map(|g| {
            let perms = if g < 804 {
                Permissions::RO
            } else {
                Permissions::RW
            };
            map_op(GUEST, g, perms)
        })
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!((m.page_runs, m.page_lookups), (2, 0));
    // Four read-only (a reference each), four writable (two each).
    assert_eq!(m.total_page_refs(), 4 + WRITABLE * 4);
    check_invariants(&mut m, &e).unwrap();
}
