//! The gfn hook over a range of gfns (a superpage's change, log-dirty)
//! either probes the page index once per gfn or passes over every slot,
//! whichever is less work (`PROBE_COST_IN_SLOTS`). Both ways must revoke
//! exactly the same mappings: the writable ones in the range for a lost
//! write permission, every one in the range for a removal.

use pviommu_abi::{DomId, Gfn, Permissions};
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
