//! Context-0 IOMMU entries are written and cleared by the flush that ends
//! a call, a run of consecutive BFNs in one backend call (on Xen one
//! `iommu_map()` or `iommu_unmap()`: an aligned 2 MiB as one entry).
//!
//! An owner's unmap takes its mapping out of the books at once and leaves
//! the entry for that flush. Every flush clears those entries before it
//! releases a page, and a page whose entry the IOMMU will not clear is
//! never released.
//!
//! A map enters the books at once and hands its BFN out; the flush writes
//! its entry before the call returns. An entry the IOMMU will not write is
//! revoked (a notice), and a hook that takes a map down before the flush
//! finds nothing to clear.

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, Permissions};
use pviommu_hv::engine::Slot;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::Format;
use pviommu_tests::*;

/// The state of dom0's context-0 slot for `bfn`.
fn slot_of(e: &pviommu_hv::Engine, bfn: Bfn) -> Option<Slot> {
    let st = e.state();
    let slot = st
        .driver(DomId::DOM0)?
        .slots()
        .find(|(i, _)| e.space().bfn_of(*i) == Some(bfn))
        .map(|(_, s)| s);
    slot
}

/// Dom0's request to map the guest's `gfn` into context 0.
fn guest_map(gfn: u64, perms: Permissions) -> MapRequest {
    map_request_in(ContextId::DEFAULT, GUEST, gfn, perms)
}

/// The BFN is free: its slot is, or the cell let its slots go (emptied).
fn free(e: &pviommu_hv::Engine, bfn: Bfn) -> bool {
    matches!(slot_of(e, bfn), None | Some(Slot::Free { .. }))
}

/// Unmap the aligned 2 MiB run the map ops `ops` made, in one batch call,
/// and check that Xen was called once for it, cleared one entry and
/// allocated nothing (no split), and that every page went: the number of
/// hypercall entries the call took.
fn unmap_2m_run_whole(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    ops: &[pviommu_abi::PvIommuOp],
) -> u32 {
    let (calls, superpages, frames) = (m.unmap_calls, m.superpage_unmaps, m.xen_frames());
    let mut unmaps: Vec<_> = ops.iter().map(|o| unmap_op(Bfn(o.bfn))).collect();
    let entries = m.guest_batch_all(e, DomId::DOM0, &mut unmaps).unwrap();
    assert!(unmaps.iter().all(|o| o.status == 0));
    assert_eq!(m.unmap_calls - calls, 1, "one call for the run");
    assert_eq!(m.superpage_unmaps - superpages, 1, "one entry cleared");
    assert!(m.xen_frames() <= frames, "no table allocated (no split)");
    for o in ops.iter().step_by(37) {
        assert_eq!(
            m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn)),
            None
        );
        assert!(free(e, Bfn(o.bfn)));
    }
    assert_eq!(m.total_page_refs(), 0);
    entries
}

/// A mediator unmapping a guest's 2 MiB extent whole: before, 512 unmap
/// calls, the first of which split the superpage the run had folded into
/// (a table allocated, which Xen can fail and then crashes a driver domain
/// that is not the hardware domain). Now one call, one entry cleared.
#[test]
fn an_aligned_2m_run_is_unmapped_in_one_call_without_a_split() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (_, mut ops) = aligned_extent_ops(&m);
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let first = Bfn(ops[0].bfn);
    assert_eq!(first.0 % 512, 0);
    let (level, _) = m
        .context_leaf(DomId::DOM0, ContextId::DEFAULT, first)
        .unwrap();
    assert_eq!(level, 2, "the run folded into a superpage");

    assert_eq!(unmap_2m_run_whole(&mut m, &e, &ops), 1);
}

/// Unmaps in descending order, and runs broken by a BFN not unmapped, are
/// coalesced too: each stretch of consecutive BFNs is one call.
#[test]
fn consecutive_bfns_unmapped_in_any_order_make_one_call_each_stretch() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let mut ops: Vec<_> = (0..32).map(|g| map_op(GUEST, g, Permissions::RO)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    let bfns: Vec<u64> = ops.iter().map(|o| o.bfn).collect();
    assert!(bfns.windows(2).all(|w| w[1] == w[0] + 1));
    let calls = m.unmap_calls;
    // 31 down to 17, then 0 to 15: gfn 16 stays mapped between them.
    let mut unmaps: Vec<_> = (17..32)
        .rev()
        .chain(0..16)
        .map(|i| unmap_op(Bfn(bfns[i])))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
    assert!(unmaps.iter().all(|o| o.status == 0));
    // Neither stretch starts a 2 MiB block: Xen's mapping_order() takes
    // them a page a call inside `iommu_unmap()`, as the simulator counts.
    assert_eq!(m.unmap_calls - calls, 31);
    for (i, &b) in bfns.iter().enumerate() {
        let mapped = m
            .translate(DomId::DOM0, ContextId::DEFAULT, Bfn(b))
            .is_some();
        assert_eq!(mapped, i == 16, "BFN of gfn {i}");
    }
    assert_eq!(e.usage(DomId::DOM0).1, 1);
}

/// An unmap whose entry the IOMMU will not clear (no memory to split a
/// superpage) succeeds for its caller: the mapping is out of the books,
/// and the entry is retried as a stuck one is. Until it goes, the page
/// stays referenced and the BFN taken; then the BFN is free, with no
/// notice (the owner unmapped it; nothing was revoked).
#[test]
fn an_unmap_the_iommu_refuses_keeps_its_page_until_the_retry_then_frees_the_bfn() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RW).unwrap();
    let refs = m.total_page_refs();
    // The run's call, then the page's own.
    m.fail_unmaps = 2;
    let mut un = [unmap_op(bfn)];
    m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
    assert_eq!(un[0].status, 0);
    assert!(matches!(
        slot_of(&e, bfn),
        Some(Slot::Stuck {
            then_revoked: false,
            ..
        })
    ));
    assert!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn).is_some());
    assert_eq!(m.total_page_refs(), refs, "the page stays referenced");
    // A second unmap of it finds nothing of the caller's.
    let mut again = [unmap_op(bfn)];
    m.guest_batch_all(&e, DomId::DOM0, &mut again).unwrap();
    assert_eq!(again[0].status, pviommu_abi::Errno::NoEnt.negated());

    // The IOMMU behaves again: the next flush retries it.
    e.finish(&mut m, DomId::DOM0);
    assert!(free(&e, bfn));
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(e.usage(DomId::DOM0).2, 0, "no notice");
}

/// A hook that runs between an unmap and the batch's flush (another CPU
/// ballooning the page out) flushes the cell, as it did before: and that
/// flush clears the entry the unmap left before it releases the page.
#[test]
fn a_hook_before_the_flush_clears_the_entry_an_unmap_left() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).unwrap();
    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, bfn)
        .unwrap();
    assert!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, bfn).is_some(),
        "the entry waits for the flush"
    );
    assert!(m.total_page_refs() > 0);
    m.balloon_out(&e, GUEST, Gfn(5)).unwrap();
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert_eq!(
        m.total_page_refs(),
        0,
        "released, and only after the entry went"
    );
    assert_eq!(e.usage(DomId::DOM0).2, 0, "no notice: it was unmapped");
    assert!(free(&e, bfn));
}

/// However many unmaps come before a flush, no more than 1024 entries
/// wait for it (`DEFER_LIMIT`): the unmap that reaches the limit clears
/// them, between the batch's preemption points, and the flush that ends
/// the batch is left no more IOMMU work than a default batch's. Their
/// pages are still released only by that flush.
#[test]
fn at_most_1024_entries_wait_for_the_flush() {
    let (mut m, e) = machine(Format::Vtd, 1100);
    let mut ops: Vec<_> = (0..1100)
        .map(|g| map_op(GUEST, g, Permissions::RO))
        .collect();
    for chunk in ops.chunks_mut(512) {
        m.guest_batch_all(&e, DomId::DOM0, chunk).unwrap();
    }
    assert!(ops.iter().all(|o| o.status == 0));
    let refs = m.total_page_refs();
    for o in &ops[..1030] {
        e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn))
            .unwrap();
    }
    let mapped = |m: &pviommu_hv::sim::SimMachine, o: &pviommu_abi::PvIommuOp| {
        m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn))
            .is_some()
    };
    assert!(
        ops[..1024].iter().all(|o| !mapped(&m, o)),
        "cleared at 1024"
    );
    assert!(ops[1024..].iter().all(|o| mapped(&m, o)), "the rest wait");
    assert_eq!(
        m.total_page_refs(),
        refs,
        "nothing released before the flush"
    );
    e.finish(&mut m, DomId::DOM0);
    assert!(ops[..1030].iter().all(|o| !mapped(&m, o)));
    assert_eq!(e.usage(DomId::DOM0).1, 70);
}

/// A mediator mapping a guest's 2 MiB extent (gfns and frames aligned
/// alike): before, 512 calls into the IOMMU driver, whose last folded the
/// leaf table into a superpage. Now one call, writing the superpage.
#[test]
fn a_2m_run_of_maps_is_written_in_one_call_at_the_flush() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (g0, mut ops) = aligned_extent_ops(&m);
    let (calls, superpages) = (m.map_calls, m.superpage_maps);
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(m.map_calls - calls, 1, "one call for the run");
    assert_eq!(m.superpage_maps - superpages, 1);
    let (level, _) = m
        .context_leaf(DomId::DOM0, ContextId::DEFAULT, Bfn(ops[0].bfn))
        .unwrap();
    assert_eq!(level, 2);
    for (i, o) in ops.iter().enumerate().step_by(97) {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(g0 + i as u64)
        );
    }
}

/// The device reads each op's own page through its BFN (context 0).
fn reads_own_pages<'a>(
    m: &mut pviommu_hv::sim::SimMachine,
    ops: impl IntoIterator<Item = &'a pviommu_abi::PvIommuOp>,
) {
    for o in ops {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(o.gfn),
            "gfn {} at BFN {:#x}",
            o.gfn,
            o.bfn
        );
    }
}

/// The guest's 512 gfns from `g0`, highest first, mapped in one batch of
/// context 0; the backend's run calls they took.
fn map_falling(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    g0: u64,
) -> (Vec<pviommu_abi::PvIommuOp>, u64) {
    let mut ops: Vec<_> = (g0..g0 + 512)
        .rev()
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    let runs = m.map_runs;
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    reads_own_pages(m, ops.iter().step_by(37));
    (ops, m.map_runs - runs)
}

/// A mediator maps a guest's pages from the top down as often as from the
/// bottom up (and a PV guest's frames fall). Falling maps get falling
/// BFNs (a map asks for the slot below the last one's), and the flush
/// writes such maps as one rising run: one `iommu_map()` on Xen. Before,
/// each falling map was a run of its own: 512 calls for a 2 MiB block of
/// gfns, each a table walk from the root (about 1.5 us a page in Xen under
/// TCG). In a cell that maps other pages (a mediator's steady state), the
/// second time round, after an unmap of the first: two calls.
#[test]
fn a_falling_run_of_maps_is_written_in_one_call_at_the_flush() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    map_one(&mut m, &e, DomId::DOM0, STRANGER, 1, Permissions::RO).unwrap();
    let (first, _) = map_falling(&mut m, &e, 512);
    let mut unmaps: Vec<_> = first.iter().map(|o| unmap_op(Bfn(o.bfn))).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
    let (ops, runs) = map_falling(&mut m, &e, 512);
    // Gfns 1023-513 take the slots 511-1 of the block; slot 0 holds the
    // other page, so gfn 512 goes elsewhere.
    assert!(
        ops[..511].windows(2).all(|w| w[1].bfn + 1 == w[0].bfn),
        "the BFNs fall with the gfns"
    );
    assert_eq!(runs, 2, "one call for the run, one for the page after it");
}

/// The same in a fresh cell (no free slot: fresh ones rise): the first
/// map takes the next fresh slot before the run is seen; the second finds
/// no free slot below it and asks for the slot of the next fresh block
/// where its gfn sits, and the maps after it fall into the slots that
/// skipped. Three runs (the first page, the 510 below it, the last one)
/// where there were 512.
#[test]
fn a_falling_run_of_maps_in_a_fresh_cell_falls_into_its_block() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (ops, runs) = map_falling(&mut m, &e, 512);
    assert_eq!(runs, 3);
    assert!(
        ops[1..511].windows(2).all(|w| w[1].bfn + 1 == w[0].bfn),
        "the BFNs fall with the gfns"
    );
}

/// The room a falling run's skip asks for stays within the quota and a
/// block less one, in memory as in length (as an extent's skip): before,
/// the array's block doubled up to the window's size (a review measured
/// room for about 4000 slots under a quota of 2000).
#[test]
fn a_falling_runs_room_stays_within_the_quota_and_a_block() {
    let (mut m, _) = machine(Format::Vtd, 4096);
    let quota = 2000;
    let e = pviommu_hv::Engine::new(
        pviommu_hv::config::Config {
            quota,
            ..Default::default()
        },
        &m,
    )
    .unwrap();
    // 1998 rising maps (the free list stays empty), then a falling pair.
    let mut ops: Vec<_> = (0..1998)
        .map(|g| map_op(GUEST, g, Permissions::RO))
        .collect();
    for chunk in ops.chunks_mut(512) {
        m.guest_batch_all(&e, DomId::DOM0, chunk).unwrap();
    }
    // (Gfn 3070 sits at 510 in its block: ahead of the next fresh slot,
    // 1999 at 463 in its own.)
    let mut falling = [
        map_op(GUEST, 3071, Permissions::RO),
        map_op(GUEST, 3070, Permissions::RO),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut falling).unwrap();
    assert!(ops.iter().chain(&falling).all(|o| o.status == 0));
    let st = e.state();
    let dd = st.driver(DomId::DOM0).unwrap();
    assert!(
        dd.slot_capacity() as u64 <= quota + 511,
        "room for {} slots under a quota of {quota}",
        dd.slot_capacity()
    );
    assert!(dd.slots().count() as u64 <= quota + 511);
    assert_eq!(falling[1].bfn % 512, 510, "the skip was taken");
}

/// Falling runs whose one-call write the IOMMU refuses (no memory for a
/// table, at budgets from none up) are written page by page: each page
/// that gets an entry maps its own frame, and the rest are revoked, the
/// books holding together. (A review's test, 2026-12-05. Here a refused
/// run's pages fail alike, its BFNs being in one leaf table; the offsets
/// of a falling run's pages are `revoke`'s unit test's.)
#[test]
fn a_refused_falling_run_maps_each_page_to_its_own_frame() {
    let mut fell_back = false;
    for budget in 0..16u64 {
        // Frames off a 2 MiB boundary (no superpage), or aligned alike.
        let (mut m, e) = if budget % 2 == 0 {
            machine_after_dom0(Format::Vtd, 4096, 67)
        } else {
            machine_after_dom0(Format::Vtd, 4096, 512)
        };
        map_one(&mut m, &e, DomId::DOM0, STRANGER, 1, Permissions::RO).unwrap();
        let mut ops: Vec<_> = (5..1105)
            .rev()
            .map(|g| map_op(GUEST, g, Permissions::RW))
            .collect();
        m.fail_table_allocs(Some(budget));
        for chunk in ops.chunks_mut(100) {
            m.guest_batch_all(&e, DomId::DOM0, chunk).unwrap();
        }
        m.fail_table_allocs(None);
        let mut live = 0;
        for o in ops.iter().filter(|o| o.status == 0) {
            if m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn))
                .is_some()
            {
                live += 1;
                assert_eq!(
                    m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                        .unwrap(),
                    pattern(o.gfn),
                    "budget {budget}: gfn {} at BFN {:#x}",
                    o.gfn,
                    o.bfn
                );
            }
        }
        fell_back |= live > 1 && live < ops.len();
        check_invariants(&mut m, &e).unwrap_or_else(|err| panic!("budget {budget}: {err}"));
    }
    assert!(fell_back, "no budget made a run fall back page by page");
}

/// Falling maps whose frames do not follow their BFNs (here every other
/// page of a run) are each written alone, and each maps its own frame: a
/// run never takes a page it does not continue.
#[test]
fn falling_maps_of_scattered_frames_each_map_their_own_frame() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (g0, _) = aligned_extent_ops(&m);
    let mut ops: Vec<_> = (0..64u64)
        .rev()
        .map(|i| map_op(GUEST, g0 + 2 * i, Permissions::RW))
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    reads_own_pages(&mut m, &ops);
}

/// A map whose entry the IOMMU cannot write at the flush (no memory for a
/// table) was handed its BFN already: the mapping is revoked, with a
/// notice, as if the page had gone, and its page released. Before, the
/// map failed at once with `ENOMEM`.
#[test]
fn a_map_whose_entry_cannot_be_written_is_revoked_with_a_notice() {
    let (mut m, e) = machine(Format::Vtd, 16);
    m.fail_table_allocs(Some(0));
    let mut ops = [map_op(GUEST, 2, Permissions::RW)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    m.fail_table_allocs(None);
    assert_eq!(ops[0].status, 0, "handed out before the flush");
    let bfn = Bfn(ops[0].bfn);
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, bfn.0 << 12, 8)
        .is_err());
    assert_eq!(e.usage(DomId::DOM0).2, 1, "a notice");
    assert_eq!(m.total_page_refs(), 0);
    // Acknowledged, the BFN is free.
    let mut un = [unmap_op(bfn)];
    m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
    assert_eq!(un[0].status, pviommu_abi::Errno::Stale.negated());
    assert!(free(&e, bfn));
}

/// A hook that takes a map down before the flush wrote its entry (another
/// CPU ballooning the page out mid-call) finds no entry to clear: the
/// mapping is revoked at once, not left stuck retrying an unmap of
/// nothing, and no entry is written for it afterwards.
#[test]
fn a_hook_before_the_flush_revokes_a_map_whose_entry_was_never_written() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let req = guest_map(4, Permissions::RW);
    let bfn = e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap();
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, bfn),
        None,
        "written by the flush"
    );
    m.balloon_out(&e, GUEST, Gfn(4)).unwrap();
    assert!(matches!(slot_of(&e, bfn), Some(Slot::Revoked { .. })));
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(e.usage(DomId::DOM0).2, 1);
}

/// A map and an unmap of it in one call: no entry is ever written, none
/// is left, the BFN is free and nothing stays stuck.
#[test]
fn a_map_unmapped_before_its_flush_leaves_nothing() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let req = guest_map(6, Permissions::RO);
    let calls = m.map_calls;
    let bfn = e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap();
    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, bfn)
        .unwrap();
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.map_calls, calls, "no entry written");
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    assert!(free(&e, bfn));
    assert_eq!(m.total_page_refs(), 0);
    let (_, used, revoked) = e.usage(DomId::DOM0);
    assert_eq!((used, revoked), (0, 0));
}

/// A hook for one target flushes the cells that map it, but leaves the
/// maps of other targets pending there to the owner's call: a gfn hook,
/// which runs under its target's p2m lock, never makes IOMMU entries of
/// another domain (up to `DEFER_LIMIT` calls into the IOMMU, which can
/// crash a driver domain that is not the hardware domain when they fail).
#[test]
fn a_hook_for_one_target_leaves_the_pending_maps_of_another_to_their_call() {
    let (mut m, e) = machine(Format::Vtd, 16);
    map_one(&mut m, &e, DomId::DOM0, STRANGER, 1, Permissions::RW).unwrap();
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let req = guest_map(7, Permissions::RW);
    let calls = m.map_calls;
    let bfn = e.map(&mut m, DomId::DOM0, &dom0, &req).unwrap();
    m.balloon_out(&e, STRANGER, Gfn(1)).unwrap();
    assert_eq!(e.usage(DomId::DOM0).2, 1, "the hook's revocation");
    assert_eq!(m.map_calls, calls, "the guest's map still pending");
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.map_calls, calls + 1);
    assert!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn).is_some());
}

/// A pending map taken down by a hook, its notice acknowledged and its
/// slot installed again, all in one call: the slot is twice in the list of
/// pending maps, and only the mapping it holds now gets an entry, once
/// (each entry names the install it was made for).
#[test]
fn a_slot_installed_again_before_the_flush_gets_one_entry() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let req = |gfn| guest_map(gfn, Permissions::RW);
    // Something else stays mapped: the cell is never empty (an empty
    // cell drops its list).
    map_one(&mut m, &e, DomId::DOM0, STRANGER, 1, Permissions::RO).unwrap();
    let calls = m.map_calls;
    let first = e.map(&mut m, DomId::DOM0, &dom0, &req(8)).unwrap();
    m.balloon_out(&e, GUEST, Gfn(8)).unwrap();
    e.revoked_ack(DomId::DOM0, ContextId::DEFAULT, first, None)
        .unwrap();
    let again = e.map(&mut m, DomId::DOM0, &dom0, &req(9)).unwrap();
    assert_eq!(again, first, "the same slot");
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(m.map_calls, calls + 1, "one entry written");
    let (mfn, _, _) = m.translate(DomId::DOM0, ContextId::DEFAULT, again).unwrap();
    assert_eq!(Some(mfn), m.mfn_of(GUEST, Gfn(9)));
}

/// The guest's aligned 2 MiB extent, and dom0's ops mapping it whole.
fn aligned_extent_ops(m: &pviommu_hv::sim::SimMachine) -> (u64, Vec<pviommu_abi::PvIommuOp>) {
    let g0 = (0..1024)
        .find(|g| m.mfn_of(GUEST, Gfn(*g)).unwrap().0.is_multiple_of(512))
        .unwrap();
    let ops = (g0..g0 + 512)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    (g0, ops)
}

/// A batch that Xen preempts every run (a busy CPU: `BATCH_INCOMPLETE`
/// after each run of 8 ops) still maps an aligned 2 MiB in one call and
/// unmaps it in one, without a split: each entry leaves its entries to the
/// call's last, where the runs join again. Before, every entry's flush
/// wrote and cleared its own 8 pages: 512 calls each way, and the first
/// unmap split the superpage the maps had folded into (a table allocated,
/// which Xen can fail).
#[test]
fn a_preempted_batch_maps_and_unmaps_an_aligned_2m_run_in_one_call_each() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (g0, mut ops) = aligned_extent_ops(&m);
    m.preempt_budget = Some(0);
    let (calls, superpages) = (m.map_calls, m.superpage_maps);
    let entries = m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(entries, 64, "preempted after every run");
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(m.map_calls - calls, 1, "one call for the run");
    assert_eq!(m.superpage_maps - superpages, 1);
    for (i, o) in ops.iter().enumerate().step_by(97) {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(g0 + i as u64)
        );
    }

    assert_eq!(
        unmap_2m_run_whole(&mut m, &e, &ops),
        64,
        "preempted after every run"
    );
}

/// A preempted call whose continuation never comes (the caller went
/// elsewhere) leaves its entries waiting, not lost: the caller's next
/// batch writes and clears them, even one that names no context (here an
/// empty one), and releases what its unmaps left.
#[test]
fn entries_a_call_left_at_preemption_are_finished_by_the_callers_next_batch() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let mut keep: Vec<_> = (0..8).map(|g| map_op(GUEST, g, Permissions::RW)).collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut keep).unwrap();
    let refs = m.total_page_refs();

    // A batch that unmaps the 8 and maps 9 more, preempted after each
    // run (the unmaps, then 8 of the maps), and never resumed.
    let mut ops: Vec<_> = keep
        .iter()
        .map(|o| unmap_op(Bfn(o.bfn)))
        .chain((8..17).map(|g| map_op(GUEST, g, Permissions::RW)))
        .collect();
    m.preempt_budget = Some(0);
    let (ret, done) = m.guest_batch(&e, DomId::DOM0, &mut ops, 0).unwrap();
    assert_eq!((ret, done), (1, 8), "stopped after the unmaps' run");
    // The second entry maps, and is preempted again before its end.
    let (ret, done) = m.guest_batch(&e, DomId::DOM0, &mut ops, done).unwrap();
    assert_eq!((ret, done), (1, 16));
    // The 8 pages unmapped are still held, beside the 8 mapped since.
    assert_eq!(m.total_page_refs(), 2 * refs, "nothing released yet");
    for o in &keep {
        assert!(m
            .translate(DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn))
            .is_some());
    }

    // The caller's next call: an empty batch.
    m.preempt_budget = None;
    let (ret, _) = m.guest_batch(&e, DomId::DOM0, &mut [], 0).unwrap();
    assert_eq!(ret, 0);
    for o in &keep {
        assert_eq!(
            m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(o.bfn)),
            None
        );
    }
    for (i, o) in ops[8..16].iter().enumerate() {
        assert_eq!(o.status, 0);
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(8 + i as u64)
        );
    }
    assert_eq!(m.total_page_refs(), refs, "the unmapped pages released");
}

/// A continuation that fails before any op (its batch header unreadable)
/// still ends the call: what the earlier entries left is written before
/// it returns its error, so no BFN an op was given outlives the call
/// without its entry.
#[test]
fn a_continuation_that_fails_at_once_still_writes_what_earlier_entries_left() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let mut ops: Vec<_> = (0..16).map(|g| map_op(GUEST, g, Permissions::RW)).collect();
    m.preempt_budget = Some(0);
    let (ret, done) = m.guest_batch(&e, DomId::DOM0, &mut ops, 0).unwrap();
    assert_eq!((ret, done), (1, 8));
    assert_eq!(
        m.translate(DomId::DOM0, ContextId::DEFAULT, Bfn(ops[0].bfn)),
        None,
        "written by the call's last entry"
    );
    // The continuation's header is past the caller's memory.
    m.preempt_budget = None;
    let ret = m.hypercall(&e, DomId::DOM0, pviommu_abi::cmd::BATCH, u64::MAX - 4095);
    assert_eq!(ret, pviommu_abi::Errno::Fault.negated() as i64);
    for (i, o) in ops[..8].iter().enumerate() {
        assert_eq!(
            m.dma_read(DomId::DOM0, ContextId::DEFAULT, o.bfn << 12, 64)
                .unwrap(),
            pattern(i as u64)
        );
    }
}

/// A caller can keep one call going for ever: between entries it rewrites
/// the header (or, here, issues entries that each stop for preemption).
/// What waits for the call's end stays bounded all the same: a cell
/// holding `PREEMPT_RELEASE_LIMIT` unmapped pages is finished at the
/// preemption point, so no flush is left a release pass over the quota.
/// Before, the pages of every unmap of such a call waited (here 2400).
#[test]
fn a_call_that_never_ends_holds_at_most_the_limit_of_pages_for_release() {
    use pviommu_hv::engine::PREEMPT_RELEASE_LIMIT;
    let (mut m, e) = machine(Format::Vtd, 64);
    let refs_per_page = {
        let bfn = map_one(&mut m, &e, DomId::DOM0, GUEST, 40, Permissions::RW).unwrap();
        let refs = m.total_page_refs();
        let mut un = [unmap_op(bfn)];
        m.guest_batch_all(&e, DomId::DOM0, &mut un).unwrap();
        assert_eq!(m.total_page_refs(), 0);
        refs
    };
    m.preempt_budget = Some(0);
    let mut most = 0;
    for _ in 0..300 {
        // Nine maps, the ninth never reached; then nine unmaps of the
        // eight, the same way.
        let mut maps: Vec<_> = (0..9).map(|g| map_op(GUEST, g, Permissions::RW)).collect();
        assert_eq!(
            m.guest_batch(&e, DomId::DOM0, &mut maps, 0).unwrap(),
            (1, 8)
        );
        let mut unmaps: Vec<_> = maps.iter().map(|o| unmap_op(Bfn(o.bfn))).collect();
        assert_eq!(
            m.guest_batch(&e, DomId::DOM0, &mut unmaps, 0).unwrap(),
            (1, 8)
        );
        assert!(unmaps[..8].iter().all(|o| o.status == 0));
        most = most.max(m.total_page_refs() / refs_per_page);
    }
    assert!(
        most <= PREEMPT_RELEASE_LIMIT + 16,
        "{most} pages held for release"
    );
    // The call's end releases them all.
    m.preempt_budget = None;
    assert_eq!(m.guest_batch(&e, DomId::DOM0, &mut [], 0).unwrap().0, 0);
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(e.usage(DomId::DOM0).1, 0);
}

/// A context of dom0's own, made through the hypercall.
fn engine_context(m: &mut pviommu_hv::sim::SimMachine, e: &pviommu_hv::Engine) -> ContextId {
    let mut create = [pviommu_abi::Request::ContextCreate.encode()];
    m.guest_batch_all(e, DomId::DOM0, &mut create).unwrap();
    assert_eq!(create[0].status, 0);
    ContextId(create[0].context)
}

/// Unmaps of the BFNs the map ops `maps` were given (each in its op's
/// context), then 100 ops a batch preempted after every run never
/// reaches: a call that stops at each preemption point never ends.
fn unmaps_then_unreached(maps: &[pviommu_abi::PvIommuOp]) -> Vec<pviommu_abi::PvIommuOp> {
    maps.iter()
        .map(|o| {
            let mut u = unmap_op(Bfn(o.bfn));
            u.context = o.context;
            u
        })
        .chain((0..100).map(|_| unmap_op(Bfn(0))))
        .collect()
}

/// Dom0's maps of the guest's gfns 0..1400, read-only: the first
/// `in_context_0` into context 0, the rest into an engine context of
/// dom0's (made here). The ops, and the page references a mapped page
/// holds.
fn mapped_in_two_contexts(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    in_context_0: u64,
) -> (Vec<pviommu_abi::PvIommuOp>, u64) {
    let ctx = engine_context(m, e);
    let mut maps: Vec<_> = (0..in_context_0)
        .map(|g| map_op(GUEST, g, Permissions::RO))
        .chain((in_context_0..1400).map(|g| map_op_in(ctx, GUEST, g, Permissions::RO)))
        .collect();
    for chunk in maps.chunks_mut(700) {
        m.guest_batch_all(e, DomId::DOM0, chunk).unwrap();
    }
    assert!(maps.iter().all(|o| o.status == 0));
    (maps, m.total_page_refs() / 1400)
}

/// A map into an engine context writes its entry at once and leaves only
/// its invalidation for the flush (an IOMMU that caches non-present
/// entries needs it before the device may use the BFN). A call preempted
/// after such maps, whose last entry names another context (or none),
/// still flushes it before it returns. Before, only cells with entries to
/// write or clear counted as unfinished: the call returned its BFNs with
/// the invalidation never issued.
#[test]
fn a_preempted_call_flushes_the_maps_of_an_engine_context_its_last_entry_does_not_name() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let ctx = engine_context(&mut m, &e);
    let mut ops: Vec<_> = (0..9)
        .map(|g| map_op_in(ctx, GUEST, g, Permissions::RW))
        .collect();
    m.preempt_budget = Some(0);
    assert_eq!(m.guest_batch(&e, DomId::DOM0, &mut ops, 0).unwrap(), (1, 8));
    m.preempt_budget = None;
    let flushes = m.flushes;
    // The call's last entry, rewritten to name nothing.
    assert_eq!(m.guest_batch(&e, DomId::DOM0, &mut [], 0).unwrap().0, 0);
    assert!(m.flushes > flushes, "the context's maps were flushed");
}

/// What a preempted call leaves waiting is bounded for its caller as a
/// whole, not per context: spread over two contexts, each under the
/// limit, the two together still stay under it (plus a run) at every
/// preemption point. Before, each cell was held to the limit on its own,
/// so a caller with 16 contexts left 16 times as much for the call's end.
#[test]
fn what_a_preempted_call_leaves_is_bounded_across_its_contexts() {
    use pviommu_hv::engine::PREEMPT_RELEASE_LIMIT;
    let (mut m, e) = machine(Format::Vtd, 1600);
    // 700 pages mapped in each of context 0 and an engine context.
    let (maps, refs_per_page) = mapped_in_two_contexts(&mut m, &e, 700);
    // One call that never ends (its caller rewrites its header): the
    // unmaps of context 0, then those of `ctx`, one run an entry, every
    // entry preempted. (Each batch ends in ops never reached.)
    m.preempt_budget = Some(0);
    let mut most = 0;
    let mut unmapped = 0;
    for half in maps.chunks(700) {
        let mut unmaps = unmaps_then_unreached(half);
        let mut done = 0;
        while done < 700 {
            let (ret, d) = m.guest_batch(&e, DomId::DOM0, &mut unmaps, done).unwrap();
            assert_eq!(ret, 1);
            // (The last run of a half may reach into the ops never meant.)
            unmapped += d.min(700) - done;
            done = d.min(700);
            let held = m.total_page_refs() / refs_per_page - (1400 - u64::from(unmapped));
            most = most.max(held);
        }
        assert!(unmaps[..700].iter().all(|o| o.status == 0));
    }
    assert!(
        most <= PREEMPT_RELEASE_LIMIT + 8,
        "{most} pages held for release"
    );
    m.preempt_budget = None;
    assert_eq!(m.guest_batch(&e, DomId::DOM0, &mut [], 0).unwrap().0, 0);
    assert_eq!(m.total_page_refs(), 0);
}

/// A cell whose flush fails keeps its pages (none may go before a flush
/// does), and counts, with all of them, towards what the caller may leave
/// waiting: the caller's other cells are finished at each preemption
/// point instead. Before, a cell whose flush failed counted for nothing,
/// and the other cells piled up beside it as if it were empty.
#[test]
fn a_cell_whose_flush_fails_still_counts_towards_what_a_preempted_call_leaves() {
    use pviommu_hv::engine::PREEMPT_RELEASE_LIMIT;
    let (mut m, e) = machine(Format::Vtd, 1500);
    let (maps, refs_per_page) = mapped_in_two_contexts(&mut m, &e, 1100);
    // One call that never ends: context 0's 1100 unmaps, its flushes
    // failing throughout, then `ctx`'s 300, the first flush of each
    // preemption point failing (context 0's, which comes first).
    m.preempt_budget = Some(0);
    let mut held_in_ctx = 0;
    // (Batches of at most 1024 ops: context 0's in two.)
    for (part, of_ctx) in [
        (&maps[..600], false),
        (&maps[600..1100], false),
        (&maps[1100..], true),
    ] {
        let mut unmaps = unmaps_then_unreached(part);
        let n = part.len() as u32;
        let mut done = 0;
        while done < n {
            m.fail_flushes = if of_ctx { 1 } else { 1000 };
            let (ret, d) = m.guest_batch(&e, DomId::DOM0, &mut unmaps, done).unwrap();
            assert_eq!(ret, 1);
            done = d.min(n);
            if of_ctx {
                // Held beyond the live pages and context 0's 1100.
                let live = u64::from(300 - done);
                held_in_ctx = held_in_ctx.max(m.total_page_refs() / refs_per_page - live - 1100);
            }
        }
    }
    assert!(
        held_in_ctx <= 8,
        "{held_in_ctx} pages of the other context held beside {} waiting",
        PREEMPT_RELEASE_LIMIT
    );
    m.fail_flushes = 0;
    m.preempt_budget = None;
    assert_eq!(m.guest_batch(&e, DomId::DOM0, &mut [], 0).unwrap().0, 0);
    assert_eq!(m.total_page_refs(), 0);
}

/// Xen 4.17's `iommu_map()` crashes a driver domain other than the
/// hardware domain when a call into the IOMMU driver fails, and AMD-Vi's
/// driver crashed any domain, the hardware domain (the host) included, when
/// it had no memory for a table. The glue calls the driver without
/// `iommu_map()`, and with patch 0007 AMD-Vi's driver answers the error
/// too: such a map fails for the engine to answer, for dom0 as for a device
/// model's stub domain. The map's BFN, handed out already, is revoked with
/// a notice and its page released.
#[test]
fn a_driver_domain_whose_entry_the_iommu_cannot_write_gets_a_notice() {
    for caller in [DomId::DOM0, DEVICE_MODEL] {
        let (mut m, e) = machine(Format::Vtd, 16);
        m.fail_table_allocs(Some(0));
        let mut ops = [map_op(GUEST, 2, Permissions::RW)];
        m.guest_batch_all(&e, caller, &mut ops).unwrap();
        m.fail_table_allocs(None);
        assert_eq!(ops[0].status, 0, "handed out before the flush");
        assert_eq!(e.usage(caller).2, 1, "revoked, with a notice");
        assert_eq!(m.total_page_refs(), 0);
    }
}

/// The same for an unmap that splits a superpage Xen folded: the split
/// needs a table; without one the unmap fails (AMD-Vi's driver crashed the
/// domain there, before patch 0007). The engine keeps the page referenced
/// and the BFN taken until a flush clears the entry.
#[test]
fn an_unmap_whose_split_the_iommu_cannot_make_waits_for_a_later_flush() {
    let (mut m, e) = machine(Format::Vtd, 2048);
    let (_, mut ops) = aligned_extent_ops(&m);
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let (level, _) = m
        .context_leaf(DEVICE_MODEL, ContextId::DEFAULT, Bfn(ops[0].bfn))
        .unwrap();
    assert_eq!(level, 2, "folded");
    m.fail_table_allocs(Some(0));
    let mut un = [unmap_op(Bfn(ops[10].bfn))];
    m.guest_batch_all(&e, DEVICE_MODEL, &mut un).unwrap();
    m.fail_table_allocs(None);
    assert_eq!(un[0].status, 0);
    assert!(m
        .translate(DEVICE_MODEL, ContextId::DEFAULT, Bfn(ops[10].bfn))
        .is_some());
    // The next flush, with memory, splits it.
    e.finish(&mut m, DEVICE_MODEL);
    assert_eq!(
        m.translate(DEVICE_MODEL, ContextId::DEFAULT, Bfn(ops[10].bfn)),
        None
    );
}

/// (A security review's finding.) A map batch writes its waiting entries
/// in the middle of the call once `DEFER_LIMIT` wait; Xen may then free a
/// table of its own (a leaf table folded into a superpage, here the one
/// the first page's map made), queued for a tasklet that runs as soon as
/// the CPU processes softirqs: on the way back to the guest when the call
/// is preempted, or in a guest copy that waits. The flush waited for the
/// call's end, so the IOMMU could still walk the freed table through its
/// caches. Now a flush follows each such write at once.
#[test]
fn a_preempted_batch_flushes_the_entries_it_wrote_before_xen_frees_a_table() {
    // Guest gfn g is frame 512 + g: gfns from 512 are 2 MiB-aligned runs.
    let (mut m, e) = machine_after_dom0(Format::Vtd, 2048, 512);
    // The first page of an aligned 2 MiB: a leaf table in dom0's context 0.
    let mut first = [map_op(GUEST, 512, Permissions::RW)];
    m.guest_batch_all(&e, DomId::DOM0, &mut first).unwrap();
    assert_eq!(first[0].status, 0);
    // The rest of that 2 MiB (600 maps, waiting), then an extent, whose
    // 512 would take the waiting maps past DEFER_LIMIT: they are written
    // first (the leaf table folds into a superpage, and Xen queues it to
    // be freed), and the call is preempted at the check after the extent.
    let mut ops: Vec<_> = (513..1113)
        .map(|g| map_op(GUEST, g, Permissions::RW))
        .collect();
    let extent = map_request_in(ContextId::DEFAULT, GUEST, 1536, Permissions::RW);
    ops.push(pviommu_abi::Request::MapExtent(extent).encode());
    ops.extend((1113..1121).map(|g| map_op(GUEST, g, Permissions::RW)));
    m.preempt_budget = Some(75);
    let (rc, done) = m.guest_batch(&e, DomId::DOM0, &mut ops, 0).unwrap();
    m.preempt_budget = None;
    assert_eq!((rc, done), (1, 601), "preempted after the extent");
    assert_eq!(ops[600].status, 0);
    assert_eq!(
        m.context_leaf(DomId::DOM0, ContextId::DEFAULT, Bfn(first[0].bfn))
            .map(|l| l.0),
        Some(2),
        "folded"
    );
    assert_eq!(
        m.tables_freed_before_flush(),
        0,
        "a table freed before its flush"
    );
    let mut done = done;
    while let Ok((1, d)) = m.guest_batch(&e, DomId::DOM0, &mut ops, done) {
        done = d;
    }
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(m.tables_freed_before_flush(), 0);
}

/// A call of dom0's preempted while it holds pending context-0 maps and
/// deferred unmaps of [`GUEST`]; the guest is killed (with 0, 1, 3 and 20
/// failed flushes on the way) and the call never comes back; then dom0 is
/// torn down. Each reference the call took is given back once: the guest
/// goes, no frame is left a zombie, nothing stays referenced (a review's
/// probe of the paths no other test reaches, 2026-12-06).
#[test]
fn a_target_killed_while_its_mappers_call_is_suspended_leaves_nothing_held() {
    for failed_flushes in [0u32, 1, 3, 20] {
        let (mut m, e) = machine(Format::Vtd, 256);
        let mut kept: Vec<_> = (0..40).map(|g| map_op(GUEST, g, Permissions::RW)).collect();
        m.guest_batch_all(&e, DomId::DOM0, &mut kept).unwrap();
        let mut ops: Vec<_> = kept
            .iter()
            .take(16)
            .map(|o| unmap_op(Bfn(o.bfn)))
            .chain((100..140).map(|g| map_op(GUEST, g, Permissions::RW)))
            .collect();
        m.preempt_budget = Some(0);
        let (ret, done) = m.guest_batch(&e, DomId::DOM0, &mut ops, 0).unwrap();
        assert_eq!(ret, 1, "preempted");
        let (ret, _) = m.guest_batch(&e, DomId::DOM0, &mut ops, done).unwrap();
        assert_eq!(ret, 1, "preempted again, and never continued");
        m.preempt_budget = None;
        m.fail_flushes = failed_flushes;
        m.kill_domain(&e, GUEST);
        m.fail_flushes = 0;
        if m.has_domain(GUEST) {
            m.kill_domain(&e, GUEST);
        }
        assert!(
            !m.has_domain(GUEST),
            "{failed_flushes}: the guest is still dying"
        );
        check_invariants(&mut m, &e).unwrap();
        assert_eq!(m.zombie_frames(), 0, "{failed_flushes}");
        e.domain_dying(&mut m, DomId::DOM0);
        assert_eq!(m.total_page_refs(), 0, "{failed_flushes}");
    }
}

/// Dom0's context-0 maps wait for the flush at the call's end, at most
/// `DEFER_LIMIT` (1024, the engine's own) of them: the map that makes
/// them that many writes them at once, in the middle of the call, on each
/// path a map takes (a run asking alike, a run asking otherwise, one map
/// on its own). The maps after it wait again. (The write follows the
/// locked map, by its caller: without it the maps past the room write
/// their own entries, and the first 1024 would still wait.)
#[test]
fn the_map_that_fills_the_waiting_room_writes_the_waiting_entries_on_every_path() {
    const DEFER_LIMIT: u64 = 1024;
    let total = DEFER_LIMIT + 8;
    for path in ["alike", "alternating", "one by one"] {
        let (mut m, e) = machine(Format::Vtd, 2048);
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        // (Alternating access: no run asks alike.)
        let reqs: Vec<_> = (0..total)
            .map(|g| {
                let write = path != "alternating" || g % 2 == 0;
                let perms = if write {
                    Permissions::RW
                } else {
                    Permissions::RO
                };
                guest_map(g, perms)
            })
            .collect();
        let mut bfns = vec![];
        if path == "one by one" {
            for r in &reqs {
                bfns.push(e.map(&mut m, DomId::DOM0, &dom0, r).unwrap());
            }
        } else {
            for run in reqs.chunks(8) {
                let mut out = [Err(pviommu_hv::Errno::Inval); 8];
                let n = e.map_batch(&mut m, DomId::DOM0, &dom0, run, &mut out);
                assert_eq!(n, run.len(), "{path}");
                bfns.extend(out.iter().map(|o| o.unwrap().bfn));
            }
        }
        let written = |m: &pviommu_hv::sim::SimMachine, k: usize| {
            m.translate(DomId::DOM0, ContextId::DEFAULT, bfns[k])
                .is_some()
        };
        assert!(written(&m, 0), "{path}: the first map written mid-call");
        assert!(
            written(&m, DEFER_LIMIT as usize - 1),
            "{path}: the map that filled the room written"
        );
        assert!(
            !written(&m, total as usize - 1),
            "{path}: the maps after it wait again"
        );
        e.finish(&mut m, DomId::DOM0);
        assert!(
            (0..total as usize).all(|k| written(&m, k)),
            "{path}: all written by the flush"
        );
    }
}
