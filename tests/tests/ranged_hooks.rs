//! The gfn hook over a range of gfns (a superpage's change, log-dirty)
//! either probes the page index once per gfn or passes over every slot,
//! whichever is less work (`PROBE_COST_IN_SLOTS`). Both ways must revoke
//! exactly the same mappings: the writable ones in the range for a lost
//! write permission, every one in the range for a removal.

use pviommu_abi::{DomId, Gfn, Permissions};
use pviommu_hv::engine::{GfnChange, Slot};
use pviommu_hv::sim::Format;
use pviommu_tests::*;

/// Map gfns 0..32 (odd ones read-only), then `extra` more pages (making the
/// slot array long, so the hook probes), change gfns 8..16 `how`, and list
/// which of gfns 0..32 are still live and how.
fn survivors(extra: u64, how: GfnChange) -> Vec<(u64, bool)> {
    let (mut m, e) = machine(Format::Vtd, 64 + extra);
    for g in 0..32 {
        let perms = if g % 2 == 1 {
            Permissions::RO
        } else {
            Permissions::RW
        };
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, perms).unwrap();
    }
    for g in 0..extra {
        map_one(&mut m, &e, DomId::DOM0, GUEST, 64 + g, Permissions::RO).unwrap();
    }
    e.gfn_changed(&mut m, GUEST, Gfn(8), 3, how);
    let st = e.state();
    let mut live: Vec<(u64, bool)> = st
        .driver(DomId::DOM0)
        .unwrap()
        .slots()
        .filter_map(|(_, s)| match s {
            Slot::Live(mp) if mp.gfn.0 < 32 => Some((mp.gfn.0, mp.perms.write)),
            _ => None,
        })
        .collect();
    live.sort();
    live
}

#[test]
fn a_ranged_hook_revokes_the_same_mappings_by_probes_or_by_a_pass() {
    for how in [GfnChange::WriteLost, GfnChange::Removed] {
        // 32 slots: 8 gfns x 16 > 32, a pass. 32 + 300 slots: probes.
        let by_pass = survivors(0, how);
        let by_probes = survivors(300, how);
        assert_eq!(by_pass, by_probes, "{how:?}");
        let expected: Vec<(u64, bool)> = (0..32u64)
            .filter(|g| !(8..16).contains(g) || (how == GfnChange::WriteLost && g % 2 == 1))
            .map(|g| (g, g % 2 == 0))
            .collect();
        assert_eq!(by_pass, expected, "{how:?}");
    }
}
