//! Guest 2 MiB pages shadowed by one 2 MiB entry over an extent of BFNs
//! (`FrameMapper::map_extent`), split back to a table by a revocation, and
//! unmapped with one extent op.

use super::fakes::*;
use super::ppgtt_sync_tests::assert_same_as_fresh;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;

const ROOT: Gfn = Gfn(0x10);
/// GMA of the guest's 2 MiB page: PD index 1 of the PD at 1 GiB.
const BIG_GMA: u64 = 0x4020_0000;
/// Its first frame.
const BIG_FRAME: u64 = 0x40200;

/// A guest with one 4 KiB leaf (GMA 0, frame 0x100) and one 2 MiB page
/// (`BIG_GMA`, frames from `BIG_FRAME`, writable, PAT and PCD set, and a
/// reserved bit of a 2 MiB entry set that the shadow must not copy).
fn guest() -> (FakeGuest, Gfn) {
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    g.map_4k(ROOT, &mut next, 0, 0x100, fmt::RW);
    let pd = g.pd_for(ROOT, &mut next, BIG_GMA);
    let reserved = 1 << 13;
    g.set(pd, 1, big_entry() | reserved);
    (g, pd)
}

fn big_entry() -> u64 {
    (BIG_FRAME << 12) | fmt::PRESENT | fmt::RW | fmt::PS | fmt::LARGE_PAT | fmt::PCD
}

/// The shadow's entry for the guest's 2 MiB page (its PD entry).
fn shadow_pde(mem: &HeapShadowMemory, s: &ShadowPpgtt) -> u64 {
    let root = s.shadow_root().unwrap();
    let mut table = root;
    for shift in [39u32, 30] {
        let e = mem
            .read_entry(table, ((BIG_GMA >> shift) & 0x1ff) as usize)
            .unwrap();
        table = Bfn((e & fmt::ADDR_MASK) >> 12);
    }
    mem.read_entry(table, 1).unwrap()
}

#[test]
fn a_2m_guest_page_is_shadowed_by_one_2m_entry_over_an_extent() {
    let (g, _) = guest();
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (513, 1));
    assert_eq!(
        (m.extent_maps, m.map_calls),
        (1, 1),
        "one extent, one batch of the leaf"
    );
    let pde = shadow_pde(&mem, &s);
    let first = (pde & fmt::ADDR_MASK_2M) >> 12;
    assert_eq!(first % 512, 0);
    // The guest's flags, its PAT bit where a 2 MiB entry has it, its
    // reserved bit not copied.
    assert_eq!(
        pde,
        (first << 12) | fmt::PRESENT | fmt::RW | fmt::PS | fmt::LARGE_PAT | fmt::PCD
    );
    let root = s.shadow_root().unwrap();
    for i in [0u64, 1, 300, 511] {
        let gma = Gma(BIG_GMA + (i << 12));
        assert_eq!(gpu_translate(&mem, root, gma), Some(Bfn(first + i)));
        assert_eq!(m.gfn_of(Bfn(first + i)), Some(Gfn(BIG_FRAME + i)));
    }
    // The same translations, flags and references as a page-by-page shadow.
    assert_same_as_fresh(&g, &s, &m, &mem);
    assert_eq!(s.leaves(&mem).len(), 513);
}

#[test]
fn a_mapper_without_extents_gets_the_page_by_page_shadow() {
    let (g, _) = guest();
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (513, 0));
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, 0, "a table pointer");
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn an_extent_refused_is_shadowed_page_by_page_with_only_the_refused_page_missing() {
    let (g, _) = guest();
    // Frame 7 of the page is refused: not one machine run (EXDEV) for the
    // extent, and that leaf alone for the page maps.
    let mut m = FakeMapper::with_extents();
    m.refuse.insert(Gfn(BIG_FRAME + 7), 1);
    let mut mem = HeapShadowMemory::new();
    let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(
        (r.leaves_mapped, r.extents_mapped, r.refused_total),
        (512, 0, 1)
    );
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, 0);
    assert_eq!(m.extent_maps, 0);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn an_extent_mapped_in_part_already_is_shadowed_page_by_page() {
    // The guest first maps frame BIG_FRAME + 3 alone; then the 2 MiB page.
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    g.map_4k(ROOT, &mut next, 0, BIG_FRAME + 3, fmt::RW);
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let pd = g.pd_for(ROOT, &mut next, BIG_GMA);
    g.set(pd, 1, big_entry());
    // (The new PD hangs off the PDP, page 0x20.)
    let r = s.sync(&g, &mut m, &mut mem, &[Gfn(0x20), pd]);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (512, 0), "{r:?}");
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, 0);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn removing_the_2m_page_unmaps_its_extent_with_one_call() {
    let (mut g, pd) = guest();
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    g.set(pd, 1, 0);
    let r = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!(
        (r.leaves_unmapped, r.extents_unmapped, r.unmap_calls),
        (512, 1, 1)
    );
    assert_eq!(m.extent_unmaps, 1);
    assert_eq!(m.live().len(), 1, "only the 4 KiB leaf's page");
    assert_same_as_fresh(&g, &s, &m, &mem);
    // And back: a fresh extent.
    g.set(pd, 1, big_entry());
    let r = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (512, 1));
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, fmt::PS);
    assert_eq!(s.teardown(&mut m, &mut mem), 513);
    assert!(m.live().is_empty());
    assert_eq!(m.extent_unmaps, 2);
}

#[test]
fn a_revoked_page_of_an_extent_splits_its_2m_entry() {
    let (g, _) = guest();
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let root = s.shadow_root().unwrap();
    let gma = Gma(BIG_GMA + 5 * 4096);
    let b = gpu_translate(&mem, root, gma).unwrap();
    let out = s.revoke(&mut mem, b);
    assert_eq!(
        out,
        vec![RevokedLeaf {
            gma,
            domid: DOM,
            gfn: Gfn(BIG_FRAME + 5),
            bfn: b
        }]
    );
    // Without the split the GPU still reached the revoked BFN through the
    // 2 MiB entry.
    assert_eq!(gpu_translate(&mem, root, gma), None);
    let pde = shadow_pde(&mem, &s);
    assert_eq!(pde & fmt::PS, 0, "a table pointer again");
    for i in [0u64, 4, 6, 511] {
        let gma = Gma(BIG_GMA + (i << 12));
        assert_eq!(gpu_translate(&mem, root, gma), Some(Bfn(b.0 - 5 + i)));
    }
    // The table's leaves keep the guest's flags, PAT as a 4 KiB leaf has it.
    let leaf = mem
        .read_entry(Bfn((pde & fmt::ADDR_MASK) >> 12), 4)
        .unwrap();
    assert_eq!(
        leaf,
        ((b.0 - 1) << 12) | fmt::PRESENT | fmt::RW | fmt::PTE_PAT | fmt::PCD
    );
    assert_eq!(s.mapped_leaves(), 512);
    // The rest go one by one: the revoked BFN is the hypervisor's.
    assert_eq!(s.teardown(&mut m, &mut mem), 512);
    assert_eq!(m.extent_unmaps, 0);
    assert_eq!(
        m.live().keys().copied().collect::<Vec<_>>(),
        vec![Gfn(BIG_FRAME + 5)]
    );
}

#[test]
fn a_1g_guest_page_is_shadowed_by_512_extents() {
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    g.map_4k(ROOT, &mut next, 0, 0x100, fmt::RW);
    let pdp = Gfn(0x20);
    assert_eq!(g.get(ROOT, 0) & fmt::ADDR_MASK, pdp.0 << 12);
    g.set(pdp, 1, (0x40000 << 12) | fmt::PRESENT | fmt::PS);
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (1 + 512 * 512, 512));
    let root = s.shadow_root().unwrap();
    let last = Gma(0x4000_0000 + (1 << 30) - 4096);
    let b = gpu_translate(&mem, root, last).unwrap();
    assert_eq!(m.gfn_of(b), Some(Gfn(0x40000 + 512 * 512 - 1)));
    assert_same_as_fresh(&g, &s, &m, &mem);
}

/// A mapper that answers an extent with a BFN off a 2 MiB boundary.
#[derive(Default)]
struct MisalignedExtents {
    inner: FakeMapper,
    given_back: Vec<Bfn>,
}

impl FrameMapper for MisalignedExtents {
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>> {
        self.inner.map(domid, gfns, writable)
    }
    fn unmap(&mut self, bfns: &[Bfn]) {
        for &b in bfns {
            if b.0 >= 0x900_0000 {
                self.given_back.push(b);
            } else {
                self.inner.unmap(&[b]);
            }
        }
    }
    fn maps_extents(&self) -> bool {
        true
    }
    fn map_extents(&mut self, _: DomId, gfns: &[Gfn], _: &[bool]) -> Vec<Result<Bfn, MapError>> {
        gfns.iter().map(|_| Ok(Bfn(0x900_0001))).collect()
    }
}

#[test]
fn an_extent_off_a_2m_boundary_is_given_back_and_the_page_shadowed_page_by_page() {
    let (g, _) = guest();
    let mut m = MisalignedExtents::default();
    let mut mem = HeapShadowMemory::new();
    let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.leaves_mapped, r.extents_mapped), (513, 0));
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, 0);
    let mut want: Vec<Bfn> = (0..512).map(|i| Bfn(0x900_0001 + i)).collect();
    want.sort();
    m.given_back.sort();
    assert_eq!(m.given_back, want);
    assert_same_as_fresh(&g, &s, &m.inner, &mem);
}

/// A guest of `n` 2 MiB pages at GMA k * 2 MiB, frames 0x1000 + 512 k.
fn guest_of_2m_pages(n: u64) -> (FakeGuest, Gfn) {
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    let pd = g.pd_for(ROOT, &mut next, 0);
    for k in 0..n {
        g.set(
            pd,
            k as usize,
            ((0x1000 + 512 * k) << 12) | fmt::PRESENT | fmt::PS,
        );
    }
    (g, pd)
}

#[test]
fn extents_go_to_the_mapper_in_batches() {
    let (mut g, pd) = guest_of_2m_pages(64);
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.extents_mapped, r.map_calls), (64, 1));
    assert_eq!((m.extent_calls, m.map_calls), (1, 0));
    for k in 0..64 {
        g.set(pd, k, 0);
    }
    let r = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!((r.extents_unmapped, r.unmap_calls), (64, 1));
    assert!(m.live().is_empty());
    // Batches of 10: 7 calls for 64 extents.
    let (g, _) = guest_of_2m_pages(64);
    let mut m = FakeMapper::with_extents();
    let cfg = ShadowConfig {
        batch: 10,
        ..ShadowConfig::default()
    };
    let (_, r) = ShadowPpgtt::build_with(cfg, &g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!((r.extents_mapped, m.extent_calls), (64, 7));
}

#[test]
fn an_extent_whose_page_went_before_its_batch_was_sent_is_given_back() {
    // The guest writes the 2 MiB page, then clears it, in one batch of
    // trapped writes: the extent queued for the first write is mapped
    // with the batch, and unmapped, nothing left.
    let (mut g, pd) = guest_of_2m_pages(0);
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let big = (0x1000 << 12) | fmt::PRESENT | fmt::PS;
    g.set(pd, 0, 0);
    let r = s.sync_writes(&g, &mut m, &mut mem, &[(pd, 0, big), (pd, 0, 0)]);
    assert_eq!(r.leaves_mapped, 0, "{r:?}");
    assert_eq!(s.mapped_leaves(), 0);
    assert!(m.live().is_empty(), "given back: {:?}", m.live().len());
    assert_eq!((m.extent_maps, m.extent_unmaps), (1, 1));
    assert_same_as_fresh(&g, &s, &m, &mem);
}

#[test]
fn a_table_replaced_by_a_2m_page_in_one_sync_gets_its_extent() {
    // A PT whose one leaf maps a frame inside the 2 MiB page that replaces
    // it: the leaf's unmap goes before the extent, which would otherwise
    // be refused as mapped in part (and the page shadowed page by page for
    // good, where a fresh build maps one extent).
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    g.map_4k(ROOT, &mut next, BIG_GMA + 3 * 4096, BIG_FRAME + 3, fmt::RW);
    let pd = g.pd_for(ROOT, &mut next, BIG_GMA);
    let mut m = FakeMapper::with_extents();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    g.set(pd, 1, big_entry());
    let r = s.sync(&g, &mut m, &mut mem, &[pd]);
    assert_eq!((r.extents_mapped, r.leaves_unmapped), (1, 1), "{r:?}");
    assert_eq!(shadow_pde(&mem, &s) & fmt::PS, fmt::PS);
    assert_same_as_fresh(&g, &s, &m, &mem);
}

/// A mapper whose extent answers are one short (mode 0) or one too many
/// (mode 1).
struct OddAnswers {
    inner: FakeMapper,
    surplus: bool,
}

impl FrameMapper for OddAnswers {
    fn map(&mut self, d: DomId, g: &[Gfn], w: &[bool]) -> Vec<Result<Bfn, MapError>> {
        self.inner.map(d, g, w)
    }
    fn unmap(&mut self, b: &[Bfn]) {
        self.inner.unmap(b)
    }
    fn maps_extents(&self) -> bool {
        true
    }
    fn map_extents(&mut self, d: DomId, g: &[Gfn], w: &[bool]) -> Vec<Result<Bfn, MapError>> {
        if self.surplus {
            let mut r = self.inner.map_extents(d, g, w);
            r.extend(self.inner.map_extents(d, &[Gfn(0x80000)], &[true]));
            r
        } else {
            let n = g.len() - 1;
            self.inner.map_extents(d, &g[..n], &w[..n])
        }
    }
    fn unmap_extents(&mut self, f: &[Bfn]) {
        self.inner.unmap_extents(f)
    }
}

#[test]
fn short_and_surplus_extent_answers_leak_nothing() {
    for surplus in [false, true] {
        let (g, _) = guest_of_2m_pages(2);
        let mut m = OddAnswers {
            inner: FakeMapper::with_extents(),
            surplus,
        };
        let mut mem = HeapShadowMemory::new();
        let (s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
        // Short: the last page unanswered is shadowed page by page.
        assert_eq!(r.leaves_mapped, 1024, "surplus {surplus}");
        assert_eq!(r.extents_mapped, if surplus { 2 } else { 1 });
        assert_eq!(s.teardown(&mut m, &mut mem), 1024);
        assert!(
            m.inner.live().is_empty(),
            "surplus {surplus}: {:?}",
            m.inner.live().len()
        );
    }
}
