//! Revocation reaching the PPGTT shadow: leaves of split large pages, a BFN
//! held by two leaves, and an index that must not outlive a sync.

use super::fakes::*;
use crate::shadow::ppgtt_format as fmt;
use crate::shadow::*;

const ROOT: Gfn = Gfn(0x10);

#[test]
fn revoked_leaves_of_a_split_2m_page_report_their_own_gma_and_gfn() {
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    let pd = g.pd_for(ROOT, &mut next, 0x4000_0000);
    // A 2 MiB guest page at GMA 1 GiB + 2 MiB, frames 0x40200..
    g.set(pd, 1, (0x4020_0000) | fmt::PRESENT | fmt::RW | fmt::PS);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, r) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    assert_eq!(r.leaves_mapped, 512);
    let gma = Gma(0x4020_0000 + 5 * 4096);
    let b = gpu_translate(&mem, s.shadow_root().unwrap(), gma).unwrap();
    let out = s.revoke(&mut mem, b);
    assert_eq!(
        out,
        vec![RevokedLeaf {
            gma,
            domid: DOM,
            gfn: Gfn(0x40205),
            bfn: b
        }]
    );
    assert_eq!(gpu_translate(&mem, s.shadow_root().unwrap(), gma), None);
    assert_eq!(s.mapped_leaves(), 511);
    assert_eq!(s.leaves(&mem).len(), 511);
    // Teardown releases the 511 others only.
    assert_eq!(s.teardown(&mut m, &mut mem), 511);
}

#[test]
fn the_index_does_not_outlive_a_sync() {
    let mut g = FakeGuest::default();
    let mut next = 0x20;
    for i in 0..4u64 {
        g.map_4k(ROOT, &mut next, i << 12, 0x100 + i, fmt::RW);
    }
    let pt = Gfn(next - 1);
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DOM, ROOT);
    let root = s.shadow_root().unwrap();
    let b0 = gpu_translate(&mem, root, Gma(0)).unwrap();
    assert_eq!(s.revoke(&mut mem, b0).len(), 1); // builds the index
                                                 // The guest maps page 0x100 again at GMA 0x5000 and moves GMA 0x1000 to
                                                 // it too: both leaves get a (new) BFN the old index never saw.
    g.set(pt, 5, (0x100 << 12) | fmt::PRESENT | fmt::RW);
    g.set(pt, 1, (0x100 << 12) | fmt::PRESENT | fmt::RW);
    let r = s.sync(&g, &mut m, &mut mem, &[pt]);
    assert_eq!((r.leaves_mapped, r.leaves_unmapped), (2, 1));
    let b = gpu_translate(&mem, root, Gma(0x5000)).unwrap();
    assert_eq!(gpu_translate(&mem, root, Gma(0x1000)), Some(b));
    let gmas: Vec<Gma> = s.revoke(&mut mem, b).iter().map(|l| l.gma).collect();
    assert_eq!(gmas, vec![Gma(0x1000), Gma(0x5000)]);
    // Unknown BFN: nothing, nothing changed.
    assert!(s.revoke(&mut mem, Bfn(0xdead)).is_empty());
    assert_eq!(s.mapped_leaves(), 2);
}
