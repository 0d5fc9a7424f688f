//! The gfn hook over a range of gfns (a superpage's change, log-dirty,
//! VRAM dirty tracking) looks up which 64 MiB regions of the range a cell
//! maps anything of, probes the page index once per gfn of those, or
//! passes over every slot, whichever is less work (`PROBE_COST_IN_SLOTS`).
//! Every way must revoke exactly the same mappings: the writable ones in
//! the range for a lost write permission, every one in the range for a
//! removal; and none may do more than a pass's worth of probes and a pass.

use pviommu_abi::{ContextId, DomId, Errno, Gfn, Permissions};
use pviommu_hv::engine::{GfnChange, Slot};
use pviommu_hv::sim::Format;
use pviommu_tests::*;

/// Map gfns 0..32 of the guest (odd ones read-only; even ones also
/// read-only, a chain of two) and of another domain (read-write), then
/// `extra` more guest pages (making the slot array long, so the hook
/// probes), change the guest's gfns 8..16 `how`, and list which of gfns
/// 0..32 are still live: (domain, gfn, writable).
fn survivors(extra: u64, how: GfnChange) -> Vec<(u16, u64, bool)> {
    let (mut m, e) = machine(Format::Vtd, 64 + extra);
    for g in 0..32 {
        let perms = if g % 2 == 1 {
            Permissions::RO
        } else {
            Permissions::RW
        };
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, perms).unwrap();
        if g % 2 == 0 {
            map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RO).unwrap();
        }
        map_one(&mut m, &e, DomId::DOM0, STRANGER, g, Permissions::RW).unwrap();
    }
    for g in 0..extra {
        map_one(&mut m, &e, DomId::DOM0, GUEST, 64 + g, Permissions::RO).unwrap();
    }
    e.gfn_changed(&mut m, GUEST, Gfn(8), 3, how);
    let st = e.state();
    let mut live: Vec<(u16, u64, bool)> = st
        .driver(DomId::DOM0)
        .unwrap()
        .slots()
        .filter_map(|(_, s)| match s {
            Slot::Live(mp) if mp.gfn.0 < 32 => Some((mp.domid.0, mp.gfn.0, mp.perms.write)),
            _ => None,
        })
        .collect();
    live.sort();
    live
}

#[test]
fn a_ranged_hook_revokes_the_same_mappings_by_probes_or_by_a_pass() {
    for how in [GfnChange::WriteLost, GfnChange::Removed] {
        // 80 slots: 8 gfns x 16 > 80, a pass. 80 + 300 slots: probes.
        let by_pass = survivors(0, how);
        let by_probes = survivors(300, how);
        assert_eq!(by_pass, by_probes, "{how:?}");
        let mut expected: Vec<(u16, u64, bool)> = Vec::new();
        for g in 0..32u64 {
            let hit = (8..16).contains(&g);
            // The guest's read-write mapping (even gfns).
            if g % 2 == 0 && !hit {
                expected.push((GUEST.0, g, true));
            }
            // Its read-only one (every gfn): lost only on removal.
            if !hit || how == GfnChange::WriteLost {
                expected.push((GUEST.0, g, false));
            }
            // The other domain's, never in the range.
            expected.push((STRANGER.0, g, true));
        }
        expected.sort();
        assert_eq!(by_pass, expected, "{how:?}");
    }
}

/// Gfns 64 MiB apart lie in different regions of the region counts.
const REGION: u64 = 1 << 14;

/// Every live mapping of the guest: (gfn, writable), sorted.
fn live_guest_gfns(e: &pviommu_hv::Engine) -> Vec<(u64, bool)> {
    let st = e.state();
    let mut live: Vec<(u64, bool)> = st
        .driver(DomId::DOM0)
        .unwrap()
        .slots()
        .filter_map(|(_, s)| match s {
            Slot::Live(mp) if mp.domid == GUEST => Some((mp.gfn.0, mp.perms.write)),
            _ => None,
        })
        .collect();
    live.sort();
    live
}

/// Pages at `gfns` (given frames where the guest has none), each mapped
/// read-write and read-only, and `extra` more read-only pages at gfns
/// 0..extra (long slot array: the hook can afford probes).
fn sparse_guest(gfns: &[u64], extra: u64) -> (pviommu_hv::sim::SimMachine, pviommu_hv::Engine) {
    let (mut m, e) = machine(Format::Vtd, extra.max(64));
    for &g in gfns {
        if m.mfn_of(GUEST, Gfn(g)).is_none() {
            m.put_new_frame(GUEST, Gfn(g)).unwrap();
        }
    }
    for &g in gfns {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RO).unwrap();
    }
    for g in 0..extra {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RO).unwrap();
    }
    (m, e)
}

/// What a hook over `[first, first + 2^order)` must leave of `before`.
fn expect_after(
    before: &[(u64, bool)],
    first: u64,
    order: u32,
    how: GfnChange,
) -> Vec<(u64, bool)> {
    let last = first.saturating_add(1u64.checked_shl(order).unwrap_or(u64::MAX));
    before
        .iter()
        .copied()
        .filter(|&(g, w)| !(g >= first && g < last && (how == GfnChange::Removed || w)))
        .collect()
}

#[test]
fn a_ranged_hook_revokes_every_mapping_in_its_range_whatever_regions_it_spans() {
    // Pages either side of region edges, in a far region, and at the last
    // gfn with a region number.
    let high = pviommu_hv::engine::REGION_GFN_END - 1;
    let pages = [
        7,
        3 * REGION - 1,
        3 * REGION,
        5 * REGION + 100,
        300 * REGION + 7,
        (1 << 30) + 3,
        high,
    ];
    // (first gfn, order): in empty regions, across edges, partial regions,
    // a range spanning more regions than probes are worth, and all.
    let ranges = [
        (4 * REGION, 14),
        (REGION, 1),
        (3 * REGION - 2, 2),
        (3 * REGION - 1, 0),
        (2 * REGION, 15),
        (3 * REGION + 1, 14),
        (5 * REGION + 64, 6),
        (5 * REGION + 64, 5),
        (256 * REGION, 22),
        (0, 31),
        (high - 1, 1),
        (high, 1),
        (0, 63),
    ];
    for how in [GfnChange::WriteLost, GfnChange::Removed] {
        // Short slot arrays (a pass) and long ones (region probes, then
        // gfn probes).
        for extra in [0, 600, 5000] {
            for &(first, order) in &ranges {
                let (mut m, e) = sparse_guest(&pages, extra);
                assert!(e.state().driver(DomId::DOM0).unwrap().regions_exact());
                let before = live_guest_gfns(&e);
                e.gfn_changed(&mut m, GUEST, Gfn(first), order, how);
                assert_eq!(
                    live_guest_gfns(&e),
                    expect_after(&before, first, order, how),
                    "{how:?}, {extra} extra, range {first:#x} order {order}"
                );
            }
        }
    }
}

#[test]
fn a_ranged_hook_without_exact_region_counts_still_revokes_everything_in_its_range() {
    // A page beyond the numbered regions stops the counts: hooks then probe
    // or pass as they did without them, over the whole range.
    let beyond = pviommu_hv::engine::REGION_GFN_END + 5;
    let pages = [7, 3 * REGION, 300 * REGION + 7, beyond];
    for how in [GfnChange::WriteLost, GfnChange::Removed] {
        for extra in [0, 5000] {
            for (first, order) in [(0, 15), (4 * REGION, 14), (beyond - 5, 3), (0, 63)] {
                let (mut m, e) = sparse_guest(&pages, extra);
                assert!(!e.state().driver(DomId::DOM0).unwrap().regions_exact());
                let before = live_guest_gfns(&e);
                e.gfn_changed(&mut m, GUEST, Gfn(first), order, how);
                let after = live_guest_gfns(&e);
                assert_eq!(
                    after,
                    expect_after(&before, first, order, how),
                    "{how:?}, {extra} extra, range {first:#x} order {order}"
                );
                // Exact again once the hook took the cell's last page (the
                // revoked ones wait as notices, which hold no page).
                let exact = e.state().driver(DomId::DOM0).unwrap().regions_exact();
                assert_eq!(
                    exact,
                    after.is_empty(),
                    "{how:?} {extra} {first:#x} {order}"
                );
            }
        }
    }
}

#[test]
fn a_region_keeps_counting_its_pages_as_others_of_it_go() {
    // Three pages in one region, two unmapped again (one by its last
    // reference, one twice mapped, so not yet), and the hook over the
    // third's range still finds it: the region's count went 1, 2, 3, 2.
    let (mut m, e) = machine(Format::Vtd, 64);
    let base = 3 * REGION;
    for g in [base, base + 9, base + 20] {
        m.put_new_frame(GUEST, Gfn(g)).unwrap();
    }
    for g in 0..64 {
        map_one(&mut m, &e, DomId::DOM0, STRANGER, g % 32, Permissions::RO).unwrap();
    }
    let a = map_one(&mut m, &e, DomId::DOM0, GUEST, base, Permissions::RW).unwrap();
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, base + 9, Permissions::RW).unwrap();
    map_one(&mut m, &e, DomId::DOM0, GUEST, base + 9, Permissions::RW).unwrap();
    map_one(&mut m, &e, DomId::DOM0, GUEST, base + 20, Permissions::RW).unwrap();
    let mut ops = [unmap_op(a), unmap_op(b)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|op| op.status == 0));
    assert_eq!(
        live_guest_gfns(&e),
        vec![(base + 9, true), (base + 20, true)]
    );
    e.gfn_changed(&mut m, GUEST, Gfn(base + 16), 3, GfnChange::Removed);
    assert_eq!(live_guest_gfns(&e), vec![(base + 9, true)]);
    e.gfn_changed(&mut m, GUEST, Gfn(base + 8), 1, GfnChange::WriteLost);
    assert_eq!(live_guest_gfns(&e), vec![]);
}

/// Dom0's (probes, passes) by range hooks so far.
fn range_work(e: &pviommu_hv::Engine) -> (u64, u64) {
    e.state().driver(DomId::DOM0).unwrap().range_work()
}

#[test]
fn a_ranged_hook_does_at_most_a_pass_worth_of_probes_then_one_pass() {
    // 5000 extra pages at gfns 0..5000 (region 0) and two at
    // 300R + 7: 5004 slots, a budget of 312 probes.
    let (mut m, e) = sparse_guest(&[300 * REGION + 7], 5000);
    let slots = e.state().driver(DomId::DOM0).unwrap().slots().count() as u64;
    let budget = slots / 16;
    let mut last = range_work(&e);
    let mut hook = |m: &mut pviommu_hv::sim::SimMachine, first: u64, order: u32| {
        e.gfn_changed(m, GUEST, Gfn(first), order, GfnChange::WriteLost);
        let now = range_work(&e);
        let did = (now.0 - last.0, now.1 - last.1);
        last = now;
        did
    };
    // 1 GiB nobody mapped: a probe per region, no pass.
    assert_eq!(hook(&mut m, 1 << 30, 18), (16, 0));
    // 16 MiB of a region with one mapped page (4096 gfns, over the
    // budget): its region probe, then the pass.
    assert_eq!(hook(&mut m, 300 * REGION, 12), (1, 1));
    // 1 GiB over the mapped regions: their probes and no gfns, then the pass.
    let (probes, passes) = hook(&mut m, 0, 18);
    assert!(
        probes <= budget && passes == 1,
        "{probes} probes, {passes} passes"
    );
    // 64 gfns of a mapped region: a region probe and 64 gfn probes.
    assert_eq!(hook(&mut m, 4096 + 64, 6), (65, 0));
    // A range of more regions than the budget: the pass after the budget.
    let (probes, passes) = hook(&mut m, 1 << 30, 30);
    assert_eq!((probes, passes), (budget, 1));
}

#[test]
fn the_top_gfn_is_never_mapped_so_every_range_covers_what_is() {
    // (A security review's finding.) A hook's range is [gfn, gfn + n) with
    // its end saturated at u64::MAX, and a dying target's is [0, u64::MAX):
    // a mapping of gfn u64::MAX survived a removal over the top, a
    // read-only change and the target's death (whose teardown then never
    // finished). That gfn is Xen's INVALID_GFN, no page of any p2m: a map
    // of it is refused, by the single op and in a batch, nothing changed.
    use pviommu_hv::platform::Platform;
    let (mut m, e) = machine(Format::Vtd, 16);
    let top = Gfn(u64::MAX);
    m.put_new_frame(GUEST, top).unwrap();
    m.put_new_frame(GUEST, Gfn(u64::MAX - 1)).unwrap();
    let before = m.total_page_refs();
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, top.0, Permissions::RW),
        Err(Errno::Inval.negated())
    );
    let info = m.domain_info(DomId::DOM0).unwrap();
    let req = map_request_in(ContextId::DEFAULT, GUEST, top.0, Permissions::RW);
    assert_eq!(e.map(&mut m, DomId::DOM0, &info, &req), Err(Errno::Inval));
    assert_eq!((m.total_page_refs(), e.usage(DomId::DOM0).1), (before, 0));
    // The gfn below it is mapped, and a hook over the top revokes it.
    let bfn = map_one(
        &mut m,
        &e,
        DomId::DOM0,
        GUEST,
        u64::MAX - 1,
        Permissions::RW,
    )
    .unwrap();
    m.put_new_frame(GUEST, Gfn(u64::MAX - 1)).unwrap();
    e.gfn_changed(&mut m, GUEST, Gfn(u64::MAX - 1), 4, GfnChange::Removed);
    assert_eq!(m.translate(DomId::DOM0, ContextId::DEFAULT, bfn), None);
    check_invariants(&mut m, &e).unwrap();
}
