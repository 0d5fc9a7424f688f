//! Property: after any sequence of guest edits, sync equals a fresh build
//! (translations, flags, live mapper references, table count).

use super::fakes::*;
use super::ppgtt_sync_tests::assert_same_as_fresh;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;
use proptest::prelude::*;

const ROOT: Gfn = Gfn(1);
const PDPS: [u64; 3] = [10, 11, 12];
const PDS: [u64; 4] = [20, 21, 22, 23];
const PTS: [u64; 5] = [30, 31, 32, 33, 34];

/// One guest edit.
#[derive(Clone, Debug)]
enum Edit {
    /// PML4[idx] -> PDP pool page.
    Pml4(usize, usize),
    /// PDP[idx] -> PD pool page.
    Pdp(usize, usize, usize),
    /// PD[idx] -> PT pool page.
    Pd(usize, usize, usize),
    /// PD[idx] -> 2 MiB page.
    Big(usize, usize, u64),
    /// PT[idx] -> 4 KiB leaf of frame `leaf_frame(f)` with some flags
    /// (never bit 7).
    Leaf(usize, usize, u64, u64),
    /// Clear an entry of any pool page.
    Clear(usize, usize),
    /// Point an entry of any pool page at the root, a PDP or a PT page
    /// (loops, cross-level use).
    Wild(usize, usize, usize),
}

/// Leaf frame `f` (0..6): frames no 2 MiB page holds, and one (f = 5)
/// inside the first 2 MiB page, so that an extent of it can be mapped in
/// part already.
fn leaf_frame(f: u64) -> u64 {
    if f == 5 {
        0x401
    } else {
        0x5000 + f
    }
}

fn all_tables() -> Vec<Gfn> {
    std::iter::once(ROOT.0)
        .chain(PDPS)
        .chain(PDS)
        .chain(PTS)
        .map(Gfn)
        .collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    let idx = 0usize..4;
    prop_oneof![
        (idx.clone(), 0..PDPS.len()).prop_map(|(i, t)| Edit::Pml4(i, t)),
        (0..PDPS.len(), idx.clone(), 0..PDS.len()).prop_map(|(a, i, t)| Edit::Pdp(a, i, t)),
        (0..PDS.len(), idx.clone(), 0..PTS.len()).prop_map(|(a, i, t)| Edit::Pd(a, i, t)),
        (0..PDS.len(), idx.clone(), 0u64..4).prop_map(|(a, i, b)| Edit::Big(a, i, b)),
        (0..PTS.len(), idx.clone(), 0u64..6, 0u64..4)
            .prop_map(|(a, i, f, fl)| Edit::Leaf(a, i, f, fl)),
        (0..13usize, idx.clone()).prop_map(|(t, i)| Edit::Clear(t, i)),
        (0..13usize, idx, 0..9usize).prop_map(|(t, i, w)| Edit::Wild(t, i, w)),
    ]
}

fn apply(g: &mut FakeGuest, e: &Edit) -> (Gfn, usize, u64) {
    let tables = all_tables();
    let ptr = |gfn: u64| (gfn << 12) | fmt::PRESENT | fmt::RW;
    let (t, i, v) = match *e {
        Edit::Pml4(i, t) => (ROOT, i, ptr(PDPS[t])),
        Edit::Pdp(a, i, t) => (Gfn(PDPS[a]), i, ptr(PDS[t])),
        Edit::Pd(a, i, t) => (Gfn(PDS[a]), i, ptr(PTS[t])),
        Edit::Big(a, i, b) => (
            Gfn(PDS[a]),
            i,
            ((0x400 + b * 512) << 12) | fmt::PRESENT | fmt::PS,
        ),
        Edit::Leaf(a, i, f, fl) => {
            let flags = [fmt::RW, 0, fmt::PCD, fmt::PWT | fmt::RW][fl as usize];
            (Gfn(PTS[a]), i, (leaf_frame(f) << 12) | fmt::PRESENT | flags)
        }
        Edit::Clear(t, i) => (tables[t], i, 0),
        Edit::Wild(t, i, w) => {
            let targets = [
                ROOT.0, PDPS[0], PDPS[1], PDPS[2], PTS[0], PTS[1], PTS[2], PTS[3], PTS[4],
            ];
            (tables[t], i, ptr(targets[w]))
        }
    };
    g.set(t, i, v);
    (t, i, v)
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn sync_equals_rebuild(
        initial in prop::collection::vec(edit(), 0..20),
        rounds in prop::collection::vec(prop::collection::vec(edit(), 1..8), 1..5),
        batch in 1usize..40,
        refuse in prop::option::of(0u64..6),
        extents in any::<bool>(),
    ) {
        let mut g = FakeGuest::default();
        for t in all_tables() {
            g.pages.insert(t, [0; 512]);
        }
        for e in &initial {
            apply(&mut g, e);
        }
        // With extents, 2 MiB pages get 2 MiB shadow entries where they
        // can (a refused frame in one, or one of its pages mapped already,
        // and it is shadowed page by page); the fresh build they are
        // compared with has none.
        let mut m = FakeMapper::default();
        m.extents = extents;
        if let Some(f) = refuse {
            m.refuse.insert(Gfn(leaf_frame(f)), 1);
        }
        let mut mem = HeapShadowMemory::new();
        let cfg = ShadowConfig { batch, ..ShadowConfig::default() };
        let (mut s, _) = ShadowPpgtt::build_with(cfg, &g, &mut m, &mut mem, DOM, ROOT);
        assert_same_as_fresh(&g, &s, &m, &mem);
        for (n, round) in rounds.iter().enumerate() {
            let writes: Vec<(Gfn, usize, u64)> = round.iter().map(|e| apply(&mut g, e)).collect();
            let rep = if n % 2 == 0 {
                let changed: Vec<Gfn> = writes.iter().map(|w| w.0).collect();
                s.sync(&g, &mut m, &mut mem, &changed)
            } else {
                s.sync_writes(&g, &mut m, &mut mem, &writes)
            };
            prop_assert!(m.max_batch <= batch);
            prop_assert!(rep.pages_read <= 13 + 64, "{rep:?}");
            assert_same_as_fresh(&g, &s, &m, &mem);
        }
        s.teardown(&mut m, &mut mem);
        prop_assert!(m.live().is_empty());
        prop_assert_eq!(mem.live_pages(), 0);
    }
}

/// A step of the revocation property: a guest edit, or the hypervisor
/// revoking the BFN of the k-th present leaf (mod their number).
#[derive(Clone, Debug)]
enum Step {
    Edit(Edit),
    Revoke(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => edit().prop_map(Step::Edit),
        1 => any::<usize>().prop_map(Step::Revoke),
    ]
}

/// What the GPU reaches is what the shadow says it maps, all of it live in
/// the mapper (`enumerate` asserts that every reachable BFN is live).
fn assert_reachable_is_live(s: &ShadowPpgtt, m: &FakeMapper, mem: &HeapShadowMemory) {
    let root = s.shadow_root().unwrap();
    let walked = enumerate(mem, root, m);
    let leaves = s.leaves(mem);
    assert_eq!(leaves.len() as u64, s.mapped_leaves());
    assert_eq!(walked.len(), leaves.len());
    for (gma, b) in &leaves {
        assert_eq!(gpu_translate(mem, root, *gma), Some(*b), "at {gma:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Revocations mixed with edits, 2 MiB pages shadowed by extents: no
    /// revoked BFN stays reachable (a 2 MiB entry is split first), the
    /// counts hold, and the teardown releases every reference.
    #[test]
    fn revocations_with_extents_leave_nothing_dead_reachable(
        initial in prop::collection::vec(edit(), 0..20),
        rounds in prop::collection::vec(prop::collection::vec(step(), 1..8), 1..5),
        batch in 1usize..40,
        refuse in prop::option::of(0u64..6),
    ) {
        let mut g = FakeGuest::default();
        for t in all_tables() {
            g.pages.insert(t, [0; 512]);
        }
        for e in &initial {
            apply(&mut g, e);
        }
        let mut m = FakeMapper::with_extents();
        if let Some(f) = refuse {
            m.refuse.insert(Gfn(leaf_frame(f)), 1);
        }
        let mut mem = HeapShadowMemory::new();
        let cfg = ShadowConfig { batch, ..ShadowConfig::default() };
        let (mut s, _) = ShadowPpgtt::build_with(cfg, &g, &mut m, &mut mem, DOM, ROOT);
        assert_reachable_is_live(&s, &m, &mem);
        for (n, round) in rounds.iter().enumerate() {
            let mut writes = Vec::new();
            for st in round {
                match st {
                    Step::Revoke(k) => {
                        let leaves = s.leaves(&mem);
                        if let Some(&(_, b)) = leaves.get(k % leaves.len().max(1)) {
                            m.revoke_bfn(b);
                            s.revoke(&mut mem, b);
                            assert_reachable_is_live(&s, &m, &mem);
                        }
                    }
                    Step::Edit(e) => writes.push(apply(&mut g, e)),
                }
            }
            if n % 2 == 0 {
                let changed: Vec<Gfn> = writes.iter().map(|w| w.0).collect();
                s.sync(&g, &mut m, &mut mem, &changed);
            } else {
                s.sync_writes(&g, &mut m, &mut mem, &writes);
            }
            assert_reachable_is_live(&s, &m, &mem);
        }
        s.teardown(&mut m, &mut mem);
        prop_assert!(m.live().is_empty(), "{:?}", m.live());
        prop_assert_eq!(mem.live_pages(), 0);
    }
}
