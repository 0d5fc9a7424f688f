//! Hostile guest tables: shared pages, loops, self-references.

use super::fakes::*;
use super::ppgtt_sync_tests::assert_same_as_fresh;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;

const ROOT: Gfn = Gfn(0x10);
const P: u64 = fmt::PRESENT | fmt::RW;

#[test]
fn loops_and_self_references_terminate_and_are_reported() {
    let mut g = FakeGuest::default();
    // PML4[0] -> PML4 itself; PML4[1] -> PDP 0x20 whose [0] -> 0x20 again and
    // [1] -> PD 0x21 whose [0] -> PD 0x21 and [1] -> PML4.
    g.set(ROOT, 0, (ROOT.0 << 12) | P);
    g.set(ROOT, 1, (0x20 << 12) | P);
    g.set(Gfn(0x20), 0, (0x20 << 12) | P);
    g.set(Gfn(0x20), 1, (0x21 << 12) | P);
    g.set(Gfn(0x21), 0, (0x21 << 12) | P);
    g.set(Gfn(0x21), 1, (ROOT.0 << 12) | P);
    g.set(Gfn(0x21), 2, (0x22 << 12) | P);
    g.set(Gfn(0x22), 0, (0x5555 << 12) | P);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let dups = rep
        .anomalies
        .iter()
        .filter(|a| matches!(a, Anomaly::DuplicateTable { .. }))
        .count();
    assert_eq!(dups, 4, "{:?}", rep.anomalies);
    assert_eq!(rep.tables, 4);
    assert_eq!(rep.leaves_mapped, 1);
    let gma = (1u64 << 39) | (1 << 30) | (2 << 21);
    assert_eq!(
        m.gfn_of(gpu_translate(&mem, s.shadow_root().unwrap(), Gma(gma)).unwrap()),
        Some(Gfn(0x5555))
    );
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn shared_pt_goes_to_lowest_gma_and_is_handed_over() {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    let pd = g.pd_for(ROOT, &mut next, 0);
    let pt = Gfn(0x50);
    for i in 0..4 {
        g.set(pt, i, ((0x7000 + i as u64) << 12) | P);
    }
    g.set(pd, 5, (pt.0 << 12) | P);
    g.set(pd, 9, (pt.0 << 12) | P);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(
        rep.anomalies,
        vec![Anomaly::DuplicateTable {
            gma: Gma(9 << 21),
            level: 1,
            table: pt
        }]
    );
    let root = s.shadow_root().unwrap();
    assert!(gpu_translate(&mem, root, Gma(5 << 21)).is_some());
    assert!(gpu_translate(&mem, root, Gma(9 << 21)).is_none());

    // A new, lower reference takes the page over.
    g.set(pd, 1, (pt.0 << 12) | P);
    let rep = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!(rep.leaves_unmapped, 4);
    assert_eq!(rep.leaves_mapped, 4);
    assert!(gpu_translate(&mem, root, Gma(1 << 21)).is_some());
    assert!(gpu_translate(&mem, root, Gma(5 << 21)).is_none());
    assert_same_as_fresh(&g, &s, &m, &mem);

    // Owner removed: the next-lowest waiting reference adopts the page.
    g.set(pd, 1, 0);
    s.sync(&g, &mut m, &mut mem, &[pd]);
    assert!(gpu_translate(&mem, root, Gma(5 << 21)).is_some());
    assert_same_as_fresh(&g, &s, &m, &mem);

    // Edits of the shared page apply once, to the owner.
    g.set(pt, 7, (0x7777 << 12) | P);
    let rep = s.sync(&g, &mut m, &mut mem, &[pt]);
    assert_eq!(rep.leaves_mapped, 1);
    assert_same_as_fresh(&g, &s, &m, &mem);

    s.teardown(&mut m, &mut mem);
    assert!(m.live().is_empty());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn page_used_at_two_levels() {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    let pd = g.pd_for(ROOT, &mut next, 0);
    // PD[0] -> the PD itself as a PT: its entries would be leaves.
    g.set(pd, 0, (pd.0 << 12) | P);
    g.set(pd, 1, (0x60 << 12) | P);
    g.set(Gfn(0x60), 0, (0x6666 << 12) | P);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(rep.anomalies.len(), 1);
    assert_eq!(rep.leaves_mapped, 1);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn handover_when_owner_leaves_and_higher_reference_arrives_in_one_sync() {
    // Found by the property test: PML4[1] owns a PDP also waited on by
    // PML4[2]; one sync removes PML4[1] and adds PML4[3] -> PDP. PML4[2]
    // (lower than [3]) must win.
    let mut g = FakeGuest::default();
    let pdp = Gfn(0x20);
    g.set(pdp, 0, (0x21 << 12) | P);
    g.set(Gfn(0x21), 0, 0x20_0000 | P | fmt::PS);
    g.set(ROOT, 1, (pdp.0 << 12) | P);
    g.set(ROOT, 2, (pdp.0 << 12) | P);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    g.set(ROOT, 1, 0);
    g.set(ROOT, 3, (pdp.0 << 12) | P);
    let rep = s.sync(&g, &mut m, &mut mem, &[ROOT]);
    assert_eq!(rep.anomalies.len(), 1);
    assert!(gpu_translate(&mem, s.shadow_root().unwrap(), Gma(2 << 39)).is_some());
    assert_same_as_fresh(&g, &s, &m, &mem);
}
