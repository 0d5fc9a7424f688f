//! GGTT shadow: build, refusals, sync vs rebuild, teardown.

use super::fakes::*;
use crate::shadow::ggtt_format as fmt;
use crate::shadow::*;
use std::collections::BTreeMap;

const FIRST: u64 = 0x100;

fn view(mem: &HeapShadowMemory, s: &ShadowGgtt, m: &FakeMapper) -> BTreeMap<u64, (Gfn, u64)> {
    let mut out = BTreeMap::new();
    for i in 0..s.len() as u64 {
        let gma = (FIRST + i) * 4096;
        if let Some(b) = gpu_translate_ggtt(mem, s.pages(), s.first_entry(), Gma(gma + 7)) {
            let page = s.pages()[(i / 512) as usize];
            let e = mem.read_entry(page, (i % 512) as usize).unwrap();
            out.insert(gma, (m.gfn_of(b).unwrap(), e & !fmt::ADDR_MASK));
        }
    }
    out
}

fn entries() -> Vec<u64> {
    (0..1300u64)
        .map(|i| {
            if i % 5 == 0 {
                0
            } else {
                ((0x8000 + i) << 12) | fmt::PRESENT | ((i % 4) << 1)
            }
        })
        .collect()
}

#[test]
fn ggtt_build_sync_teardown() {
    let mut guest = entries();
    let mut m = FakeMapper::refusing(&[(0x8003, 22)]);
    let mut mem = HeapShadowMemory::new();
    let cfg = ShadowConfig {
        batch: 100,
        ..ShadowConfig::default()
    };
    let (mut s, rep) = ShadowGgtt::build_with(cfg, &mut m, &mut mem, DOM, FIRST, &guest);
    assert_eq!(rep.tables, 3);
    assert_eq!(
        rep.refused,
        vec![RefusedLeaf {
            gma: Gma((FIRST + 3) * 4096),
            gfn: Gfn(0x8003),
            errno: 22
        }]
    );
    assert_eq!(rep.leaves_mapped, 1300 - 260 - 1);
    assert!(m.max_batch <= 100);
    let v = view(&mem, &s, &m);
    assert_eq!(v.len() as u64, rep.leaves_mapped);
    assert_eq!(
        v[&((FIRST + 7) * 4096)],
        (Gfn(0x8007), fmt::PRESENT | (3 << 1))
    );
    assert_eq!(gpu_translate_ggtt(&mem, s.pages(), FIRST, Gma(0)), None);

    let updates = [
        (FIRST + 1, 0),                             // remove
        (FIRST + 5, (0x9999 << 12) | fmt::PRESENT), // add
        (FIRST + 6, (0x9998 << 12) | fmt::PRESENT), // change...
        (FIRST + 6, (0x9997 << 12) | fmt::PRESENT), // ...last write wins
        (FIRST + 8, guest[8]),                      // unchanged
        (FIRST + 5000, 1),                          // out of range
    ];
    let rep = s.sync(&mut m, &mut mem, &updates);
    assert_eq!(
        rep.anomalies,
        vec![Anomaly::EntryOutOfRange {
            index: FIRST + 5000
        }]
    );
    assert_eq!(
        (rep.entries_changed, rep.leaves_mapped, rep.leaves_unmapped),
        (3, 2, 2)
    );
    assert_eq!((rep.map_calls, rep.unmap_calls), (1, 1));
    for &(i, v) in &updates[..5] {
        guest[(i - FIRST) as usize] = v;
    }
    let mut fm = FakeMapper::refusing(&[(0x8003, 22)]);
    let mut fmem = HeapShadowMemory::new();
    let (fresh, _) = ShadowGgtt::build(&mut fm, &mut fmem, DOM, FIRST, &guest);
    assert_eq!(view(&mem, &s, &m), view(&fmem, &fresh, &fm));
    assert_eq!(m.live(), fm.live());
    assert_eq!(s.mapped_leaves(), fresh.mapped_leaves());

    let n = s.teardown(&mut m, &mut mem);
    assert_eq!(n, fresh.mapped_leaves());
    assert!(m.live().is_empty());
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn ggtt_revocation_clears_every_entry_of_the_bfn_and_only_those() {
    // Entries 1 and 700 map the same guest frame: the mapper dedups them
    // onto one BFN, and its revocation clears both.
    let mut guest = entries();
    guest[700] = guest[1];
    let mut m = FakeMapper::default();
    let mut mem = HeapShadowMemory::new();
    let (mut s, r) = ShadowGgtt::build(&mut m, &mut mem, DomId(7), FIRST, &guest);
    let before = r.leaves_mapped;
    let b = gpu_translate_ggtt(&mem, s.pages(), FIRST, Gma((FIRST + 1) * 4096)).unwrap();
    let revoked = s.revoke(&mut mem, b);
    let gmas: Vec<Gma> = revoked.iter().map(|l| l.gma).collect();
    assert_eq!(
        gmas,
        vec![Gma((FIRST + 1) * 4096), Gma((FIRST + 700) * 4096)]
    );
    assert!(revoked
        .iter()
        .all(|l| l.domid == DomId(7) && l.gfn == Gfn(0x8001) && l.bfn == b));
    assert_eq!(s.mapped_leaves(), before - 2);
    assert_eq!(
        gpu_translate_ggtt(&mem, s.pages(), FIRST, Gma((FIRST + 700) * 4096)),
        None
    );
    assert!(
        s.revoke(&mut mem, b).is_empty(),
        "a second notice finds nothing"
    );
    // A guest write after the revocation maps the entry afresh.
    let r = s.sync(
        &mut m,
        &mut mem,
        &[(FIRST + 1, (0x9000 << 12) | fmt::PRESENT)],
    );
    assert_eq!((r.leaves_mapped, r.leaves_unmapped), (1, 0));
    // Teardown unmaps what is present, not the revoked BFN.
    assert_eq!(s.teardown(&mut m, &mut mem), before - 1);
}

/// A first entry past any GMA (the caller's) with a leaf the mapper
/// refuses: the refusal's GMA saturates instead of overflowing (a debug
/// build panicked; a hostile-input audit of the guest side).
#[test]
fn a_first_entry_past_any_gma_saturates_its_report() {
    let mut m = FakeMapper::refusing(&[(0x8001, 13)]);
    let mut mem = HeapShadowMemory::new();
    let (s, rep) = ShadowGgtt::build(
        &mut m,
        &mut mem,
        DOM,
        1 << 52,
        &[(0x8001 << 12) | fmt::PRESENT],
    );
    assert_eq!(rep.refused.len(), 1);
    assert_eq!(rep.refused[0].gma, Gma(u64::MAX));
    s.teardown(&mut m, &mut mem);
}
