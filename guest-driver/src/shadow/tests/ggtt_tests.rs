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
