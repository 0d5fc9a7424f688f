//! Full-build correctness of the PPGTT shadow.

use super::fakes::*;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;

const ROOT: Gfn = Gfn(0x10);

/// A guest with leaves spread over several PML4/PDP/PD indices, varied flags.
fn sample_guest() -> (FakeGuest, Vec<(u64, u64, u64)>) {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    let mut leaves = Vec::new();
    let gmas = [
        0u64,
        0x1000,
        0x1ff000,
        0x20_0000,
        0x4000_0000,
        0x80_0000_0000,
        0xffff_ffff_f000,
    ];
    for (k, &gma) in gmas.iter().enumerate() {
        let flags = match k % 4 {
            0 => fmt::RW,
            1 => 0,
            2 => fmt::RW | fmt::PCD | fmt::PTE_PAT,
            _ => fmt::PWT,
        } | fmt::PRESENT;
        let gfn = 0x5000 + k as u64 * 3;
        g.map_4k(ROOT, &mut next, gma, gfn, flags);
        leaves.push((gma, gfn, flags));
    }
    // A full PT.
    for i in 0..512u64 {
        let gma = 0x1_0000_0000 + i * 4096;
        g.map_4k(ROOT, &mut next, gma, 0x9000 + i, fmt::RW | fmt::PRESENT);
        leaves.push((gma, 0x9000 + i, fmt::RW | fmt::PRESENT));
    }
    (g, leaves)
}

#[test]
fn every_leaf_translates_with_guest_flags() {
    let (g, leaves) = sample_guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let cfg = ShadowConfig {
        batch: 7,
        ..ShadowConfig::default()
    };
    let (s, rep) = ShadowPpgtt::build_with(cfg, &g, &mut m, &mut mem, DOM, ROOT);
    assert!(
        rep.refused.is_empty() && rep.anomalies.is_empty(),
        "{rep:?}"
    );
    assert_eq!(rep.leaves_mapped, leaves.len() as u64);
    assert_eq!(s.mapped_leaves(), leaves.len() as u64);
    let root = s.shadow_root().unwrap();
    for &(gma, gfn, flags) in &leaves {
        let (entry, bfn) = gpu_walk(&mem, root, Gma(gma)).expect("translates");
        assert_eq!(m.gfn_of(bfn), Some(Gfn(gfn)), "gma {gma:#x}");
        assert_eq!(entry & !fmt::ADDR_MASK, flags, "flags kept at {gma:#x}");
        assert_eq!(gpu_translate(&mem, root, Gma(gma + 0x123)), Some(bfn));
    }
    assert_eq!(gpu_translate(&mem, root, Gma(0x2000)), None);
    assert_eq!(gpu_translate(&mem, root, Gma(1 << 48)), None);
    assert_eq!(enumerate(&mem, root, &m), guest_leaves(&g, ROOT));
    // Batched: ceil(n / 7) calls, none larger than 7.
    assert_eq!(m.map_calls, (leaves.len() as u64).div_ceil(7));
    assert_eq!(rep.map_calls, m.map_calls);
    assert!(m.max_batch <= 7);
    assert_eq!(rep.tables, mem.live_pages());
}

#[test]
fn refused_leaves_are_reported_and_non_present() {
    let (g, leaves) = sample_guest();
    let mut m = FakeMapper::refusing(&[(0x5003, 1), (0x9010, 12)]);
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let mut refused = rep.refused.clone();
    refused.sort_by_key(|r| r.gma);
    assert_eq!(
        refused,
        vec![
            RefusedLeaf {
                gma: Gma(0x1000),
                gfn: Gfn(0x5003),
                errno: 1
            },
            RefusedLeaf {
                gma: Gma(0x1_0001_0000),
                gfn: Gfn(0x9010),
                errno: 12
            },
        ]
    );
    let root = s.shadow_root().unwrap();
    assert_eq!(gpu_translate(&mem, root, Gma(0x1000)), None);
    assert_eq!(gpu_translate(&mem, root, Gma(0x1_0001_0000)), None);
    assert_eq!(rep.leaves_mapped, leaves.len() as u64 - 2);
    for &(gma, gfn, _) in &leaves {
        if gfn != 0x5003 && gfn != 0x9010 {
            assert_eq!(
                m.gfn_of(gpu_translate(&mem, root, Gma(gma)).unwrap()),
                Some(Gfn(gfn))
            );
        }
    }
}

#[test]
fn two_mib_page_becomes_512_leaves() {
    let mut g = FakeGuest::default();
    let mut next = 0x100;
    let pd = g.pd_for(ROOT, &mut next, 0x4000_0000);
    let big = 0x4060_0000 | fmt::PRESENT | fmt::RW | fmt::PS | fmt::LARGE_PAT | fmt::PCD;
    g.set(pd, 3, big); // GMA 0x4000_0000 + 3 * 2 MiB
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(rep.leaves_mapped, 512);
    assert_eq!(rep.map_calls, 1);
    let root = s.shadow_root().unwrap();
    for i in 0..512u64 {
        let gma = 0x4060_0000 + i * 4096;
        let (entry, bfn) = gpu_walk(&mem, root, Gma(gma)).unwrap();
        assert_eq!(m.gfn_of(bfn), Some(Gfn(0x40600 + i)));
        assert_eq!(
            entry & !fmt::ADDR_MASK,
            fmt::PRESENT | fmt::RW | fmt::PTE_PAT | fmt::PCD
        );
    }
    assert_eq!(enumerate(&mem, root, &m), guest_leaves(&g, ROOT));
    // PML4, PDP, PD, shadow-only PT.
    assert_eq!(rep.tables, 4);
    let n = s.teardown(&mut m, &mut mem);
    assert_eq!(n, 512);
    assert!(m.live().is_empty());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn one_gib_page_becomes_262144_leaves() {
    let mut g = FakeGuest::default();
    g.set(ROOT, 0, (0x20 << 12) | fmt::PRESENT | fmt::RW);
    g.set(Gfn(0x20), 2, 0x4000_0000 | fmt::PRESENT | fmt::PS);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(rep.leaves_mapped, 262144);
    assert_eq!(rep.tables, 2 + 1 + 512);
    let root = s.shadow_root().unwrap();
    for gma in [0x8000_0000u64, 0x8000_1000, 0x9234_5000, 0xbfff_f000] {
        let b = gpu_translate(&mem, root, Gma(gma)).unwrap();
        assert_eq!(
            m.gfn_of(b),
            Some(Gfn(0x40000 + ((gma - 0x8000_0000) >> 12)))
        );
    }
    assert_eq!(gpu_translate(&mem, root, Gma(0xc000_0000)), None);
    s.teardown(&mut m, &mut mem);
    assert!(m.live().is_empty());
}

#[test]
fn table_budget_and_memory_exhaustion_are_reported() {
    let (g, _) = sample_guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::with_limit(3);
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert!(rep
        .anomalies
        .iter()
        .any(|a| matches!(a, Anomaly::OutOfShadowMemory { .. })));
    assert_eq!(mem.live_pages(), 3);
    s.teardown(&mut m, &mut mem);
    assert!(m.live().is_empty());

    let cfg = ShadowConfig {
        max_tables: 2,
        ..ShadowConfig::default()
    };
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build_with(cfg, &g, &mut m, &mut mem, DOM, ROOT);
    assert!(rep
        .anomalies
        .iter()
        .any(|a| matches!(a, Anomaly::TableBudgetExceeded { .. })));
    assert_eq!(s.table_count(), 2);
    assert_eq!(rep.leaves_mapped, 0);
}

#[test]
fn unreadable_table_and_misbehaving_mapper() {
    let mut g = FakeGuest::default();
    g.set(ROOT, 0, (0x777 << 12) | fmt::PRESENT); // not a readable page
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (_s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(
        rep.anomalies,
        vec![Anomaly::ReadFailed {
            table: Gfn(0x777),
            errno: 14
        }]
    );

    /// Returns too-wide BFNs and too few results.
    struct Bad(Vec<Bfn>);
    impl FrameMapper for Bad {
        fn map(&mut self, _: DomId, gfns: &[Gfn], _: &[bool]) -> Vec<Result<Bfn, MapError>> {
            gfns.iter().skip(1).map(|_| Ok(Bfn(1 << 40))).collect()
        }
        fn unmap(&mut self, bfns: &[Bfn]) {
            self.0.extend_from_slice(bfns);
        }
    }
    let (g, leaves) = sample_guest();
    let mut bad = Bad(Vec::new());
    let (s, rep) = ShadowPpgtt::build_with(
        ShadowConfig {
            batch: 1000,
            ..ShadowConfig::default()
        },
        &g,
        &mut bad,
        &mut mem,
        DOM,
        ROOT,
    );
    assert_eq!(rep.leaves_mapped, 0);
    assert_eq!(rep.refused.len(), leaves.len());
    assert_eq!(
        rep.refused
            .iter()
            .filter(|r| r.errno == ERRNO_MAPPER_SHORT)
            .count(),
        1
    );
    assert_eq!(
        bad.0.len(),
        leaves.len() - 1,
        "too-wide BFNs are given back"
    );
    assert_eq!(s.mapped_leaves(), 0);
}

/// A guest whose 1 GiB page the mapper refuses whole: every refusal is
/// counted, the first `REPORT_KEPT` are listed. Before, each was kept, so
/// 1 GiB pages outside the guest's RAM under one table page (128 of them
/// within the table budget) made 33 M records (a hostile-input audit of
/// the guest side).
#[test]
fn refusals_of_a_1gib_page_are_counted_and_the_first_kept() {
    let mut g = FakeGuest::default();
    g.set(ROOT, 0, (0x20 << 12) | fmt::PRESENT | fmt::RW);
    g.set(Gfn(0x20), 2, 0x4000_0000 | fmt::PRESENT | fmt::PS);
    let mut m = FakeMapper::default();
    m.refuse = (0x40000..0x40000 + 262144).map(|g| (Gfn(g), 14)).collect();
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(rep.leaves_mapped, 0);
    assert_eq!(rep.refused_total, 262144);
    assert_eq!(rep.refused.len(), crate::shadow::REPORT_KEPT);
    assert_eq!(rep.refused[0].gma, Gma(0x8000_0000), "the first are kept");
    s.teardown(&mut m, &mut mem);
}
