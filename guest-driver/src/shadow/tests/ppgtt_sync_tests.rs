//! Incremental sync of the PPGTT shadow against a fresh build.

use super::fakes::*;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;
use std::collections::BTreeMap;

const ROOT: Gfn = Gfn(0x10);

/// Check that `s` (built and synced with `m`/`mem`) equals a fresh build of
/// `g`: same translations and flags, same live mapper references.
pub fn assert_same_as_fresh(
    g: &FakeGuest,
    s: &ShadowPpgtt,
    m: &FakeMapper,
    mem: &HeapShadowMemory,
) {
    let mut fm = FakeMapper::default();
    fm.refuse = m.refuse.clone();
    let mut fmem = HeapShadowMemory::new();
    let (fresh, _) = ShadowPpgtt::build(g, &mut fm, &mut fmem, DOM, s.guest_root());
    let a = enumerate(mem, s.shadow_root().unwrap(), m);
    let b = enumerate(&fmem, fresh.shadow_root().unwrap(), &fm);
    assert_eq!(a, b, "synced shadow differs from a fresh build");
    assert_eq!(
        m.live(),
        fm.live(),
        "live mappings differ from a fresh build"
    );
    assert_eq!(s.mapped_leaves(), fresh.mapped_leaves());
    assert_eq!(s.table_count(), fresh.table_count());
    assert_eq!(mem.live_pages(), fmem.live_pages());
}

fn guest() -> (FakeGuest, u64) {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    for pt in 0..8u64 {
        for i in (0..512u64).step_by(3) {
            let gma = (pt << 21) + (i << 12);
            g.map_4k(
                ROOT,
                &mut next,
                gma,
                0x10000 + pt * 512 + i,
                fmt::PRESENT | fmt::RW,
            );
        }
    }
    g.map_4k(ROOT, &mut next, 0x7f00_0000_0000, 0x3333, fmt::PRESENT);
    (g, next)
}

fn pt_of(g: &FakeGuest, gma: u64) -> Gfn {
    let mut t = ROOT;
    for shift in [39, 30, 21] {
        t = Gfn((g.get(t, ((gma >> shift) & 511) as usize) & fmt::ADDR_MASK) >> 12);
    }
    t
}

#[test]
fn sync_add_remove_change_replace() {
    let (mut g, mut next) = guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);

    let pt0 = pt_of(&g, 0);
    let pt1 = pt_of(&g, 0x20_0000);
    let pt2 = pt_of(&g, 0x40_0000);
    let pd = Gfn((g.get(Gfn((g.get(ROOT, 0) & fmt::ADDR_MASK) >> 12), 0) & fmt::ADDR_MASK) >> 12);
    // Add a leaf, remove a leaf, change a leaf's frame, change flags only.
    g.set(pt0, 1, (0xaaaa << 12) | fmt::PRESENT);
    g.set(pt0, 3, 0);
    g.set(pt1, 6, (0xbbbb << 12) | fmt::PRESENT | fmt::RW);
    g.set(pt1, 9, g.get(pt1, 9) & !fmt::RW);
    // Replace a whole PT with a new page.
    let new_pt = Gfn(next);
    next += 1;
    for i in 0..512u64 {
        g.set(
            new_pt,
            i as usize,
            ((0x20000 + i) << 12) | fmt::PRESENT | fmt::RW,
        );
    }
    g.set(pd, 2, (new_pt.0 << 12) | fmt::PRESENT | fmt::RW);
    // Flags-only change of a directory entry pointing at the same table.
    g.set(pd, 3, g.get(pd, 3) | fmt::PCD);
    // A new subtree far away and removal of another one.
    g.map_4k(
        ROOT,
        &mut next,
        0x1_0000_0000_0000 - 0x1000,
        0x4444,
        fmt::PRESENT,
    );
    g.set(ROOT, 0xfe, 0);

    let removed_pt2_leaves = (0..512u64).step_by(3).count() as u64;
    let rep = s.sync(
        &g,
        &mut m,
        &mut mem,
        &[pt0, pt1, pd, ROOT, pt0, Gfn(0xdead), pt2],
    );
    // pt2 was dropped by the PD change before its own turn came.
    assert_eq!(rep.ignored, vec![pt2, Gfn(0xdead)]);
    assert!(
        rep.anomalies.is_empty() && rep.refused.is_empty(),
        "{rep:?}"
    );
    // Unmapped: pt0[3], pt1[6], pt1[9] (flags), old pt2 leaves, the lone leaf.
    assert_eq!(rep.leaves_unmapped, 3 + removed_pt2_leaves + 1);
    // Mapped: pt0[1], pt1[6], pt1[9], 512 new PT leaves, 1 new far leaf.
    assert_eq!(rep.leaves_mapped, 3 + 512 + 1);
    assert_same_as_fresh(&g, &s, &m, &mem);

    // Everything unmapped exactly once: the mapper would have panicked on a
    // double unmap; teardown leaves nothing behind.
    let n = s.teardown(&mut m, &mut mem);
    assert_eq!(n, guest_leaves(&g, ROOT).len() as u64);
    assert_eq!(m.live(), BTreeMap::new());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn sync_of_unchanged_pages_costs_no_mapper_calls() {
    let (g, _) = guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let calls = m.map_calls;
    let all: Vec<Gfn> = s.guest_table_gfns().collect();
    let rep = s.sync(&g, &mut m, &mut mem, &all);
    assert_eq!(rep.entries_changed, 0);
    assert_eq!((rep.map_calls, rep.unmap_calls), (0, 0));
    assert_eq!(m.map_calls, calls);
}

#[test]
fn sync_large_page_changes_and_refusals() {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    let pd = g.pd_for(ROOT, &mut next, 0);
    g.set(pd, 0, 0x20_0000 | fmt::PRESENT | fmt::PS);
    let mut m = FakeMapper::refusing(&[(0x205, 13)]);
    let mut mem = HeapShadowMemory::new();
    let (mut s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(
        rep.refused,
        vec![RefusedLeaf {
            gma: Gma(0x5000),
            gfn: Gfn(0x205),
            errno: 13
        }]
    );
    // Move the 2 MiB page and add a PT next to it.
    g.set(pd, 0, 0x60_0000 | fmt::PRESENT | fmt::PS | fmt::RW);
    g.map_4k(ROOT, &mut next, 0x20_0000, 0x9999, fmt::PRESENT);
    let rep = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!(rep.leaves_unmapped, 511);
    assert_eq!(rep.leaves_mapped, 513);
    assert_same_as_fresh(&g, &s, &m, &mem);
    // Back to a PT pointer.
    g.set(pd, 0, 0);
    let rep = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!(rep.leaves_unmapped, 512);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn diff_page_finds_every_changed_entry_in_order() {
    use crate::shadow::ppgtt_engine::diff_page;
    let old: [u64; 512] = std::array::from_fn(|i| (i as u64) << 12 | 3);
    let mut snap = old;
    let mut changes = Vec::new();
    diff_page(&mut snap, &old, &mut changes);
    assert!(changes.is_empty());

    let mut new = old;
    for i in [0usize, 7, 8, 9, 255, 504, 511] {
        new[i] ^= 0x1000 * (i as u64 + 1);
    }
    new[100] = 0;
    diff_page(&mut snap, &new, &mut changes);
    let want: Vec<(u16, u64, u64)> = (0..512)
        .filter(|&i| old[i] != new[i])
        .map(|i| (i as u16, old[i], new[i]))
        .collect();
    assert_eq!(changes, want);
    assert_eq!(snap, new);
}

/// Every kind of leaf change in one PT, with a map batch of 3 so batches
/// are flushed in the middle of the page's changes (the shadow leaves are
/// read ahead of them), and a refused frame.
#[test]
fn sync_of_many_leaf_changes_in_one_pt_with_small_batches() {
    let (mut g, _) = guest();
    let mut m = FakeMapper::refusing(&[(0xcc05, 13)]);
    let mut mem = HeapShadowMemory::new();
    let config = ShadowConfig {
        batch: 3,
        ..ShadowConfig::default()
    };
    let (mut s, _) = ShadowPpgtt::build_with(config, &g, &mut m, &mut mem, DOM, ROOT);
    let pt = pt_of(&g, 0x20_0000);
    for i in 0..512usize {
        let e = g.get(pt, i);
        let v = match i % 5 {
            0 if e != 0 => 0,                                                 // removed
            0 => (0xcc00 + i as u64 % 16) << 12 | fmt::PRESENT,               // added
            1 if e != 0 => e ^ fmt::RW,                                       // flags only
            2 if e != 0 => (e & !fmt::ADDR_MASK) | (0xdd00 + i as u64) << 12, // moved
            _ => e,
        };
        g.set(pt, i, v);
    }
    let rep = s.sync(&g, &mut m, &mut mem, &[pt]);
    assert!(rep.entries_changed > 150, "{rep:?}");
    assert!(rep
        .refused
        .iter()
        .all(|r| r.gfn == Gfn(0xcc05) && r.errno == 13));
    assert!(!rep.refused.is_empty());
    assert_same_as_fresh(&g, &s, &m, &mem);
    // And back again.
    let (g0, _) = guest();
    for i in 0..512usize {
        g.set(pt, i, g0.get(pt, i));
    }
    s.sync(&g, &mut m, &mut mem, &[pt]);
    assert_same_as_fresh(&g, &s, &m, &mem);
    s.teardown(&mut m, &mut mem);
    assert_eq!(m.live(), BTreeMap::new());
}

/// `sync` applies a PT's changes one dirty page late (after the next page's
/// diff); a directory change in the same sync must see them applied first,
/// even when it removes that PT, and the result must equal a fresh build.
#[test]
fn held_pt_changes_are_applied_before_a_directory_change_removes_the_pt() {
    let (mut g, _) = guest();
    let pd = Gfn((g.get(Gfn((g.get(ROOT, 0) & fmt::ADDR_MASK) >> 12), 0) & fmt::ADDR_MASK) >> 12);
    // Two PTs whose frames sort before the PD, so they are diffed first.
    let (low_a, low_b) = (Gfn(0x20), Gfn(0x21));
    for (pt, pd_idx) in [(low_a, 9), (low_b, 10)] {
        for i in 0..512u64 {
            g.set(
                pt,
                i as usize,
                ((0x30000 + pt.0 * 512 + i) << 12) | fmt::PRESENT,
            );
        }
        g.set(pd, pd_idx, (pt.0 << 12) | fmt::PRESENT | fmt::RW);
    }
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let pt0 = pt_of(&g, 0);

    // Leaf changes in both low PTs and in a PT after the PD; the PD drops
    // the first low PT.
    for pt in [low_a, low_b, pt0] {
        g.set(pt, 0, (0x5000 + pt.0) << 12 | fmt::PRESENT | fmt::RW);
        g.set(pt, 5, 0);
        g.set(pt, 300, (0x6000 + pt.0) << 12 | fmt::PRESENT);
    }
    g.set(pd, 9, 0);
    let rep = s.sync(&g, &mut m, &mut mem, &[pt0, pd, low_b, low_a]);
    assert!(
        rep.ignored.is_empty() && rep.anomalies.is_empty(),
        "{rep:?}"
    );
    assert_eq!(rep.pages_read, 4);
    assert_same_as_fresh(&g, &s, &m, &mem);

    // And with a batch of 1, so the held changes flush in the middle.
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    g.set(pd, 9, (low_a.0 << 12) | fmt::PRESENT | fmt::RW);
    let config = ShadowConfig {
        batch: 1,
        ..ShadowConfig::default()
    };
    let (mut s, _) = ShadowPpgtt::build_with(config, &g, &mut m, &mut mem, DOM, ROOT);
    for pt in [low_a, low_b, pt0] {
        g.set(pt, 7, (0x7000 + pt.0) << 12 | fmt::PRESENT);
    }
    g.set(pd, 9, 0);
    s.sync(&g, &mut m, &mut mem, &[pt0, pd, low_b, low_a]);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn sync_finds_owners_through_a_stale_owner_index() {
    let (mut g, next) = guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let pt1 = pt_of(&g, 0x20_0000);
    let pd = Gfn((g.get(Gfn((g.get(ROOT, 0) & fmt::ADDR_MASK) >> 12), 0) & fmt::ADDR_MASK) >> 12);
    // A long dirty list: sync walks (and builds) the owner index.
    let mut all: Vec<Gfn> = s.guest_table_gfns().collect();
    let rep = s.sync(&g, &mut m, &mut mem, &all);
    assert!(rep.ignored.is_empty() && rep.entries_changed == 0);

    // The PD (sorted first) moves PT 1 to a new page, which takes PT 1's
    // freed slot: the index still names that slot for the old page, and
    // lacks the new page.
    let new_pt = Gfn(next);
    for i in 0..512 {
        g.set(new_pt, i, g.get(pt1, i));
    }
    g.set(new_pt, 2, (0xdddd << 12) | fmt::PRESENT);
    g.set(pd, 1, (new_pt.0 << 12) | fmt::PRESENT | fmt::RW);
    all.push(new_pt);
    let rep = s.sync(&g, &mut m, &mut mem, &all);
    assert_eq!(rep.ignored, vec![pt1], "{rep:?}");
    assert_same_as_fresh(&g, &s, &m, &mem);

    // The next long sync rebuilds the index; a short one probes the map.
    g.set(new_pt, 4, (0xeeee << 12) | fmt::PRESENT);
    let rep = s.sync(&g, &mut m, &mut mem, &all);
    assert_eq!(rep.ignored, vec![pt1]);
    assert_eq!(rep.entries_changed, 1);
    g.set(new_pt, 5, (0xffff << 12) | fmt::PRESENT);
    assert!(s.table_count() > 8);
    let rep = s.sync(&g, &mut m, &mut mem, &[new_pt]);
    assert!(rep.ignored.is_empty() && rep.entries_changed == 1);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

/// A leaf replaced by another present leaf is settled in one access when
/// its map batch returns: the old BFN is released there, whether the new
/// map succeeds, is refused, comes back too wide or does not come back.
#[test]
fn replaced_leaves_release_their_old_bfn_whatever_the_map_returns() {
    let (mut g, _) = guest();
    let mut m = FakeMapper::refusing(&[(0xdd0c, 13)]);
    let mut mem = HeapShadowMemory::new();
    let config = ShadowConfig {
        batch: 3,
        ..ShadowConfig::default()
    };
    let (mut s, _) = ShadowPpgtt::build_with(config, &g, &mut m, &mut mem, DOM, ROOT);
    let pt = pt_of(&g, 0x20_0000);
    let mut replaced = 0;
    for i in 0..512usize {
        let e = g.get(pt, i);
        if e != 0 && i % 2 == 0 {
            // Moved to another frame (0xdd0c is refused), or flags only.
            let v = match i % 4 {
                0 => (e & !fmt::ADDR_MASK) | (0xdd00 + i as u64) << 12,
                _ => e ^ fmt::RW,
            };
            g.set(pt, i, v);
            replaced += 1;
        }
    }
    let before = s.mapped_leaves();
    let rep = s.sync(&g, &mut m, &mut mem, &[pt]);
    assert_eq!(rep.entries_changed, replaced);
    assert_eq!(rep.leaves_unmapped, replaced);
    assert_eq!(rep.leaves_mapped, replaced - 1);
    assert_eq!(rep.refused.len(), 1);
    assert_eq!(
        (rep.refused[0].gfn, rep.refused[0].errno),
        (Gfn(0xdd0c), 13)
    );
    assert_eq!(s.mapped_leaves(), before - 1);
    assert_same_as_fresh(&g, &s, &m, &mem);

    /// Maps as `inner` until `bad`; then returns too-wide BFNs and one
    /// result too few, and takes the too-wide ones back.
    struct Flaky {
        inner: FakeMapper,
        bad: bool,
        given_back: Vec<Bfn>,
    }
    impl FrameMapper for Flaky {
        fn map(&mut self, d: DomId, gfns: &[Gfn], w: &[bool]) -> Vec<Result<Bfn, MapError>> {
            if !self.bad {
                return self.inner.map(d, gfns, w);
            }
            gfns.iter().skip(1).map(|_| Ok(Bfn(1 << 40))).collect()
        }
        fn unmap(&mut self, bfns: &[Bfn]) {
            for &b in bfns {
                if b.0 >= 1 << 40 {
                    self.given_back.push(b);
                } else {
                    self.inner.unmap(&[b]);
                }
            }
        }
    }
    let (mut g, _) = guest();
    let mut m = Flaky {
        inner: FakeMapper::default(),
        bad: false,
        given_back: Vec::new(),
    };
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let before = (s.mapped_leaves(), m.inner.live().values().sum::<u32>());
    let pt = pt_of(&g, 0x20_0000);
    let mut replaced = 0;
    for i in 0..512usize {
        let e = g.get(pt, i);
        if e != 0 {
            g.set(pt, i, (e & !fmt::ADDR_MASK) | (0xee00 + i as u64) << 12);
            replaced += 1;
        }
    }
    m.bad = true;
    let rep = s.sync(&g, &mut m, &mut mem, &[pt]);
    assert_eq!(rep.leaves_mapped, 0);
    assert_eq!(rep.leaves_unmapped, replaced);
    assert_eq!(rep.refused.len() as u64, replaced);
    assert_eq!(
        rep.refused
            .iter()
            .filter(|r| r.errno == ERRNO_MAPPER_SHORT)
            .count(),
        1
    );
    assert_eq!(m.given_back.len() as u64, replaced - 1);
    // Every old BFN is released and every replaced leaf is empty.
    assert_eq!(s.mapped_leaves(), before.0 - replaced);
    assert_eq!(
        m.inner.live().values().sum::<u32>() as u64,
        u64::from(before.1) - replaced
    );
    let root = s.shadow_root().unwrap();
    for i in 0..512u64 {
        assert_eq!(gpu_translate(&mem, root, Gma(0x20_0000 + (i << 12))), None);
    }
    s.teardown(&mut m, &mut mem);
    assert_eq!(m.inner.live(), BTreeMap::new());
}

/// A replacement still waiting in its map batch when the same entry
/// changes again (trapped writes), is removed, or loses its PT: the leaf
/// holds the old BFN until then, and every BFN is released exactly once.
#[test]
fn a_replacement_changed_again_before_its_batch_settles() {
    let (mut g, _) = guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let pt = pt_of(&g, 0x20_0000);
    let (a, b, c) = (0usize, 3usize, 6usize);
    let mut writes = Vec::new();
    for (i, seq) in [
        (a, [0xf000u64, 0xf001, 0xf002]), // replaced three times
        (b, [0xf100, 0, 0xf101]),         // replaced, removed, added
        (c, [0xf200, 0, 0]),              // replaced, then removed
    ] {
        for f in seq {
            let v = if f == 0 {
                0
            } else {
                f << 12 | fmt::PRESENT | fmt::RW
            };
            writes.push((pt, i, v));
        }
    }
    // The last write to each entry is what the guest holds.
    for &(p, i, v) in &writes {
        g.set(p, i, v);
    }
    let rep = s.sync_writes(&g, &mut m, &mut mem, &writes);
    assert!(
        rep.refused.is_empty() && rep.anomalies.is_empty(),
        "{rep:?}"
    );
    assert_same_as_fresh(&g, &s, &m, &mem);

    // A page diff replaces leaves of a PT whose directory entry the same
    // sync clears: the PT goes, its old and new BFNs with it.
    let pd = Gfn((g.get(Gfn((g.get(ROOT, 0) & fmt::ADDR_MASK) >> 12), 0) & fmt::ADDR_MASK) >> 12);
    for i in 0..512usize {
        let e = g.get(pt, i);
        if e != 0 {
            g.set(pt, i, (e & !fmt::ADDR_MASK) | (0xf300 + i as u64) << 12);
        }
    }
    g.set(pd, 1, 0);
    s.sync(&g, &mut m, &mut mem, &[pt, pd]);
    assert_same_as_fresh(&g, &s, &m, &mem);
    s.teardown(&mut m, &mut mem);
    assert_eq!(m.live(), BTreeMap::new());
}

/// Replacements from page diffs and the leaves of a PT attached by the
/// same sync share map batches (of 4): the replaced leaves are released
/// whichever queueing fills the batch, and nothing else is.
#[test]
fn replacements_share_batches_with_a_newly_attached_pt() {
    let (mut g, mut next) = guest();
    let config = ShadowConfig {
        batch: 4,
        ..ShadowConfig::default()
    };
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build_with(config, &g, &mut m, &mut mem, DOM, ROOT);
    let pd = g.pd_for(ROOT, &mut next, 0);
    let (a, b) = (pt_of(&g, 0x20_0000), pt_of(&g, 0x60_0000));
    for pt in [a, b] {
        for i in (0..512usize).step_by(3).take(7) {
            let e = g.get(pt, i);
            g.set(
                pt,
                i,
                (e & !fmt::ADDR_MASK) | (0x9000 + pt.0 * 32 + i as u64) << 12,
            );
        }
    }
    // A new PT under the same PD (entry 8), with 10 leaves.
    for i in 0..10u64 {
        g.map_4k(ROOT, &mut next, (8 << 21) + (i << 12), 0xa000 + i, fmt::RW);
    }
    let rep = s.sync(&g, &mut m, &mut mem, &[b, pd, a]);
    assert!(
        rep.anomalies.is_empty() && rep.refused.is_empty(),
        "{rep:?}"
    );
    assert_eq!(rep.leaves_unmapped, 14);
    assert_eq!(rep.leaves_mapped, 24);
    assert_same_as_fresh(&g, &s, &m, &mem);
    s.teardown(&mut m, &mut mem);
    assert_eq!(m.live(), BTreeMap::new());
}
