//! The mediator's session on the simulated machine: real engine, real
//! IOMMU tables, the simulated device's DMA through the shadow's BFNs, and
//! revocations (ballooning, domain death) reaching the shadow before they
//! are acknowledged.

use crate::shadow::ppgtt_format::{PRESENT, RW};
use crate::shadow::*;
use crate::transport::in_process::{InProcess, SharedSim, SimGuestReader};
use crate::Client;
use pviommu_abi::ContextId;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};

const GUEST: DomId = DomId(1);
const ROOT: u64 = 0x10;
const PDP: u64 = 0x11;
const PD: u64 = 0x12;
const PT: u64 = 0x13;

fn put(m: &mut SimMachine, gfn: u64, index: u64, value: u64) {
    m.write_guest(GUEST, Gfn(gfn), (index * 8) as usize, &value.to_le_bytes())
        .unwrap();
}

/// A guest with a PPGTT mapping GMA page i (i < 8) to gfn 0x100 + i, each
/// page starting with "page i".
fn world() -> SharedSim {
    let mut m = SimMachine::new(4096, Format::Vtd, 64);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: 1024,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    put(&mut m, ROOT, 0, (PDP << 12) | PRESENT | RW);
    put(&mut m, PDP, 0, (PD << 12) | PRESENT | RW);
    put(&mut m, PD, 0, (PT << 12) | PRESENT | RW);
    for i in 0..8 {
        put(&mut m, PT, i, ((0x100 + i) << 12) | PRESENT | RW);
        m.write_guest(GUEST, Gfn(0x100 + i), 0, format!("page {i}").as_bytes())
            .unwrap();
    }
    SharedSim::new(m, Default::default()).unwrap()
}

fn session(sim: &SharedSim) -> ShadowSession<InProcess, SimGuestReader> {
    let client = Client::open(sim.transport(DomId::DOM0)).unwrap();
    ShadowSession::new(client, sim.reader(GUEST))
}

fn dma(sim: &SharedSim, bfn: Bfn) -> Option<Vec<u8>> {
    sim.lock()
        .0
        .dma_read(DomId::DOM0, ContextId::DEFAULT, bfn.0 << 12, 6)
        .ok()
}

#[test]
fn build_translate_and_dma_read_the_guest_bytes() {
    let sim = world();
    let mut s = session(&sim);
    let r = s.build(GUEST, Gfn(ROOT)).unwrap();
    assert_eq!(r.leaves_mapped, 8);
    for i in 0..8u64 {
        let bfn = s.translate(Gma(i << 12)).unwrap();
        assert_eq!(dma(&sim, bfn).unwrap(), format!("page {i}").as_bytes());
    }
    assert_eq!(s.translate(Gma(8 << 12)), None);
    assert_eq!(s.leaves().len(), 8);
    assert_eq!(s.leaves()[3].0, Gma(3 << 12));
    assert_eq!(s.teardown().unwrap(), 8);
    assert_eq!(s.client().refresh_caps().unwrap().used, 0);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let sim = world();
    let mut s = session(&sim);
    assert!(matches!(
        s.build(DomId::DOM0, Gfn(ROOT)),
        Err(SessionError::BadDomain(_))
    ));
    assert!(matches!(
        s.build(DomId(0x7ff0), Gfn(ROOT)),
        Err(SessionError::BadDomain(_))
    ));
    // Beyond the guest's memory: the root cannot be read.
    let e = s.build(GUEST, Gfn(0x5000)).unwrap_err();
    assert!(matches!(e, SessionError::RootUnreadable { .. }), "{e}");
    assert!(e.to_string().contains("0x5000"), "{e}");
    assert!(matches!(s.sync(&[]), Err(SessionError::NotBuilt)));
    assert!(matches!(s.teardown(), Err(SessionError::NotBuilt)));
    assert!(s.handle_revocations().unwrap().notices.is_empty());
    assert_eq!(sim.lock().1.state().mapped_pages(), 0);
    // A reader of the wrong domain: its root is unreadable.
    let client = Client::open(sim.transport(DomId::DOM0)).unwrap();
    let mut other = ShadowSession::new(client, sim.reader(DomId(9)));
    assert!(matches!(
        other.build(DomId(9), Gfn(ROOT)),
        Err(SessionError::RootUnreadable { .. })
    ));
    s.build(GUEST, Gfn(ROOT)).unwrap();
    assert!(matches!(
        s.build(GUEST, Gfn(ROOT)),
        Err(SessionError::AlreadyBuilt)
    ));
    assert_eq!(s.leaves().len(), 8);
}

#[test]
fn sync_maps_only_new_leaves_and_unmaps_only_removed_ones() {
    let sim = world();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let old = s.translate(Gma(2 << 12)).unwrap();
    {
        let mut g = sim.lock();
        // Move page 2 to gfn 0x200, unmap page 5.
        g.0.write_guest(GUEST, Gfn(0x200), 0, b"moved!").unwrap();
        put(&mut g.0, PT, 2, (0x200 << 12) | PRESENT | RW);
        put(&mut g.0, PT, 5, 0);
    }
    let r = s.sync(&[Gfn(PT)]).unwrap();
    assert_eq!((r.leaves_mapped, r.leaves_unmapped), (1, 2));
    let new = s.translate(Gma(2 << 12)).unwrap();
    assert_eq!(dma(&sim, new).unwrap(), b"moved!");
    assert_eq!(dma(&sim, old), None, "the old BFN faults");
    assert_eq!(s.translate(Gma(5 << 12)), None);
    // A full re-read finds nothing more to do.
    let r = s.sync_all().unwrap();
    assert_eq!(
        (r.leaves_mapped, r.leaves_unmapped, r.pages_read),
        (0, 0, 4)
    );
}

#[test]
fn ballooned_page_revokes_its_leaf_before_the_acknowledgement() {
    let sim = world();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let bfn = s.translate(Gma(4 << 12)).unwrap();
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(0x104)).unwrap();
    }
    assert_eq!(dma(&sim, bfn), None, "revoked by the hypervisor");
    // While the notice is pending, the BFN is not handed out again.
    let mut probe = Client::open(sim.transport(DomId::DOM0)).unwrap();
    let fresh = probe.map_foreign(
        GUEST,
        &[Gfn(0x300)],
        pviommu_abi::Permissions::RO,
        pviommu_abi::MemAttr::WriteBack,
        ContextId::DEFAULT,
    );
    assert_ne!(*fresh[0].as_ref().unwrap(), bfn);
    let r = s.handle_revocations().unwrap();
    assert_eq!(r.notices.len(), 1);
    assert_eq!(
        r.leaves,
        vec![RevokedLeaf {
            gma: Gma(4 << 12),
            domid: GUEST,
            gfn: Gfn(0x104),
            bfn
        }]
    );
    assert_eq!(s.translate(Gma(4 << 12)), None);
    assert_eq!(s.shadow().unwrap().mapped_leaves(), 7);
    assert_eq!(
        s.client().refresh_caps().unwrap().revoked,
        0,
        "acknowledged"
    );
    // Teardown unmaps the 7 others only (the revoked one is gone already).
    assert_eq!(s.teardown().unwrap(), 7);
}

#[test]
fn revocation_is_checked_against_the_leaf_before_ack() {
    // Two leaves of the same page share one BFN (the cache dedups): both go.
    let sim = world();
    {
        let mut g = sim.lock();
        put(&mut g.0, PT, 9, (0x101 << 12) | PRESENT | RW);
    }
    let mut s = session(&sim);
    assert_eq!(s.build(GUEST, Gfn(ROOT)).unwrap().leaves_mapped, 9);
    let b1 = s.translate(Gma(1 << 12)).unwrap();
    assert_eq!(s.translate(Gma(9 << 12)), Some(b1));
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(0x101)).unwrap();
    }
    let r = s.handle_revocations().unwrap();
    let gmas: Vec<Gma> = r.leaves.iter().map(|l| l.gma).collect();
    assert_eq!(gmas, vec![Gma(1 << 12), Gma(9 << 12)]);
    assert_eq!(s.shadow().unwrap().mapped_leaves(), 7);
}

#[test]
fn guest_death_revokes_every_leaf() {
    let sim = world();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.kill_domain(e, GUEST);
        assert_eq!(m.zombie_frames(), 0, "no frame kept by a mapping");
    }
    let r = s.handle_revocations().unwrap();
    assert_eq!(r.notices.len(), 8);
    assert_eq!(r.leaves.len(), 8);
    assert!(r.leaves.iter().all(|l| l.domid == GUEST));
    assert!(s.leaves().is_empty());
    assert_eq!(s.client().refresh_caps().unwrap().used, 0);
    assert_eq!(s.teardown().unwrap(), 0);
}

#[test]
fn a_sync_after_a_revocation_maps_the_guests_new_frame() {
    let sim = world();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(0x103)).unwrap();
    }
    assert_eq!(s.handle_revocations().unwrap().leaves.len(), 1);
    {
        let mut g = sim.lock();
        g.0.write_guest(GUEST, Gfn(0x203), 0, b"again!").unwrap();
        put(&mut g.0, PT, 3, (0x203 << 12) | PRESENT | RW);
    }
    let r = s.sync(&[Gfn(PT)]).unwrap();
    assert_eq!((r.leaves_mapped, r.leaves_unmapped), (1, 0));
    let b = s.translate(Gma(3 << 12)).unwrap();
    assert_eq!(dma(&sim, b).unwrap(), b"again!");
}

#[test]
fn the_client_hands_each_notice_over_before_acknowledging_it() {
    let sim = world();
    let mut c = Client::open(sim.transport(DomId::DOM0)).unwrap();
    let gfns = [Gfn(0x100), Gfn(0x101)];
    let bfns: Vec<Bfn> = c
        .map_foreign(
            GUEST,
            &gfns,
            pviommu_abi::Permissions::RW,
            pviommu_abi::MemAttr::WriteBack,
            ContextId::DEFAULT,
        )
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, gfns[0]).unwrap();
        m.balloon_out(e, GUEST, gfns[1]).unwrap();
    }
    let mut pending_at_notice = Vec::new();
    let revs = c
        .drain_revocations_with(16, |n| {
            // Still reserved and queued while the handler runs.
            pending_at_notice.push((n.bfn, sim.lock().1.usage(DomId::DOM0).2));
        })
        .unwrap();
    assert_eq!(revs.len(), 2);
    assert_eq!(pending_at_notice, vec![(bfns[0], 2), (bfns[1], 1)]);
    let (_, used, revoked) = sim.lock().1.usage(DomId::DOM0);
    assert_eq!(
        (used, revoked),
        (0, 0),
        "both acknowledged after the handler"
    );
}

/// A reader that counts how often the session drops its cached mappings.
struct CountingReader {
    inner: SimGuestReader,
    invalidations: std::cell::Cell<u32>,
}

impl GuestTableReader for CountingReader {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        self.inner.read_page(gfn, buf)
    }
    fn invalidate(&self) {
        self.invalidations.set(self.invalidations.get() + 1);
    }
}

#[test]
fn the_reader_lets_go_of_the_guest_when_its_memory_changes() {
    // Cached foreign mappings would keep a dead guest a zombie: a notice of
    // the shadow's guest, a full re-read and the teardown drop them; a
    // notice of another guest, a plain sync and a quiet drain do not.
    let sim = world();
    {
        let mut g = sim.lock();
        g.0.create_domain(
            DomId(2),
            DomainSpec {
                pages: 16,
                privileged: false,
                device_model_of: None,
            },
        )
        .unwrap();
    }
    let client = Client::open(sim.transport(DomId::DOM0)).unwrap();
    let reader = CountingReader {
        inner: sim.reader(GUEST),
        invalidations: std::cell::Cell::new(0),
    };
    let mut s = ShadowSession::new(client, reader);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let n = |s: &ShadowSession<InProcess, CountingReader>| s.reader().invalidations.get();
    s.sync(&[Gfn(PT)]).unwrap();
    s.handle_revocations().unwrap();
    assert_eq!(n(&s), 0);
    // Another guest's page, mapped by this client and ballooned out.
    let other = s.client().map_foreign(
        DomId(2),
        &[Gfn(3)],
        pviommu_abi::Permissions::RO,
        pviommu_abi::MemAttr::WriteBack,
        ContextId::DEFAULT,
    );
    assert!(other[0].is_ok());
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, DomId(2), Gfn(3)).unwrap();
    }
    let r = s.handle_revocations().unwrap();
    assert_eq!((r.notices.len(), r.leaves.len()), (1, 0));
    assert_eq!(n(&s), 0, "not this shadow's guest");
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(0x106)).unwrap();
    }
    assert_eq!(s.handle_revocations().unwrap().leaves.len(), 1);
    assert_eq!(n(&s), 1);
    s.sync_all().unwrap();
    assert_eq!(n(&s), 2);
    s.teardown().unwrap();
    assert_eq!(n(&s), 3);
}

/// `world()` with a 2 MiB guest page at GMA 2 MiB (PD entry 1): gfns
/// 0x200.. (512 frames in one machine run), page i starting "big i".
fn world_with_2m_page() -> SharedSim {
    let sim = world();
    {
        let mut g = sim.lock();
        put(
            &mut g.0,
            PD,
            1,
            (0x200 << 12) | PRESENT | RW | crate::shadow::ppgtt_format::PS,
        );
        for i in [0u64, 5, 6, 511] {
            g.0.write_guest(GUEST, Gfn(0x200 + i), 0, format!("big {i:<3}").as_bytes())
                .unwrap();
        }
    }
    sim
}

#[test]
fn a_2m_guest_page_is_one_extent_op_and_one_2m_shadow_entry() {
    let sim = world_with_2m_page();
    let mut s = session(&sim);
    let r = s.build(GUEST, Gfn(ROOT)).unwrap();
    assert_eq!((r.leaves_mapped, r.extents_mapped), (8 + 512, 1));
    let first = s.translate(Gma(2 << 20)).unwrap();
    assert_eq!(first.0 % 512, 0, "on a 2 MiB boundary");
    for i in [0u64, 5, 6, 511] {
        let gma = Gma((2 << 20) + (i << 12));
        assert_eq!(s.translate(gma), Some(Bfn(first.0 + i)));
        assert_eq!(
            dma(&sim, Bfn(first.0 + i)).unwrap(),
            format!("big {i:<3}").as_bytes()[..6]
        );
    }
    let stats = s.client().stats();
    assert_eq!(
        stats.hypercalls, 2,
        "one extent op, one batch of the 8 leaves"
    );
    // The guest drops the page: one extent unmap.
    {
        let mut g = sim.lock();
        put(&mut g.0, PD, 1, 0);
    }
    let r = s.sync(&[Gfn(PD)]).unwrap();
    assert_eq!((r.leaves_unmapped, r.extents_unmapped), (512, 1));
    assert_eq!(dma(&sim, first), None);
    assert_eq!(s.client().refresh_caps().unwrap().used, 8);
    assert_eq!(s.teardown().unwrap(), 8);
}

#[test]
fn a_ballooned_page_of_an_extent_splits_the_2m_shadow_entry() {
    let sim = world_with_2m_page();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let first = s.translate(Gma(2 << 20)).unwrap();
    {
        let mut g = sim.lock();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(0x205)).unwrap();
    }
    let r = s.handle_revocations().unwrap();
    assert_eq!(
        r.leaves,
        vec![RevokedLeaf {
            gma: Gma((2 << 20) + (5 << 12)),
            domid: GUEST,
            gfn: Gfn(0x205),
            bfn: Bfn(first.0 + 5)
        }]
    );
    // The GPU no longer reaches the revoked BFN; its neighbours it does.
    assert_eq!(s.translate(Gma((2 << 20) + (5 << 12))), None);
    assert_eq!(
        s.translate(Gma((2 << 20) + (6 << 12))),
        Some(Bfn(first.0 + 6))
    );
    assert_eq!(dma(&sim, Bfn(first.0 + 6)).unwrap(), b"big 6 ");
    assert_eq!(
        s.client().refresh_caps().unwrap().revoked,
        0,
        "acknowledged"
    );
    // The other 511 and the 8 go page by page.
    assert_eq!(s.teardown().unwrap(), 8 + 511);
    assert_eq!(s.client().refresh_caps().unwrap().used, 0);
}

#[test]
fn a_leaf_and_the_2m_page_of_its_frame_removed_together_go_as_one_extent_op() {
    // GMA page 10 maps gfn 0x203, a page of the 2 MiB page: the build maps
    // the extent, then the leaf from the cache (two references on the
    // page). Both go in one sync: the leaf's release first, so the
    // extent's last references go in one extent op, not 512 page ops.
    let sim = world_with_2m_page();
    {
        let mut g = sim.lock();
        put(&mut g.0, PT, 10, (0x203 << 12) | PRESENT | RW);
    }
    let mut s = session(&sim);
    let r = s.build(GUEST, Gfn(ROOT)).unwrap();
    assert_eq!((r.extents_mapped, r.leaves_mapped), (1, 8 + 1 + 512));
    let first = s.translate(Gma(2 << 20)).unwrap();
    assert_eq!(s.translate(Gma(10 << 12)), Some(Bfn(first.0 + 3)));
    {
        let mut g = sim.lock();
        put(&mut g.0, PT, 10, 0);
        put(&mut g.0, PD, 1, 0);
    }
    let ops = s.client().stats().ops;
    let r = s.sync(&[Gfn(PT), Gfn(PD)]).unwrap();
    assert_eq!((r.leaves_unmapped, r.extents_unmapped), (513, 1), "{r:?}");
    assert_eq!(s.client().stats().ops - ops, 1, "one extent op");
    assert_eq!(s.client().refresh_caps().unwrap().used, 8);
}

#[test]
fn a_stale_cached_page_inside_a_2m_page_keeps_its_bfn_until_its_notice() {
    // Two leaves share the BFN of gfn 0x203 while it has another frame;
    // the frame comes back with its hook not yet run, and the guest maps
    // the 2 MiB page 0x200..: the client refuses the extent (a page of it
    // is cached) and the page is shadowed page by page from the cache, so
    // the stale BFN stays counted for both leaves; dropping one leaf then
    // cannot acknowledge the notice behind the other's back.
    let sim = world();
    {
        let mut g = sim.lock();
        g.0.swap_frames(GUEST, Gfn(0x203), Gfn(0x180)).unwrap();
        put(&mut g.0, PT, 8, (0x203 << 12) | PRESENT | RW);
        put(&mut g.0, PT, 9, (0x203 << 12) | PRESENT | RW);
    }
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let stale = s.translate(Gma(8 << 12)).unwrap();
    assert_eq!(s.translate(Gma(9 << 12)), Some(stale));
    {
        let mut g = sim.lock();
        g.0.swap_frames(GUEST, Gfn(0x203), Gfn(0x180)).unwrap();
        put(
            &mut g.0,
            PD,
            1,
            (0x200 << 12) | PRESENT | RW | crate::shadow::ppgtt_format::PS,
        );
    }
    let r = s.sync(&[Gfn(PD)]).unwrap();
    {
        let mut g = sim.lock();
        put(&mut g.0, PT, 8, 0);
    }
    s.sync(&[Gfn(PT)]).unwrap();
    s.handle_revocations().unwrap();
    // Another page is mapped: it must not get a BFN a leaf still holds.
    {
        let mut g = sim.lock();
        g.0.write_guest(GUEST, Gfn(0x8), 0, b"other ").unwrap();
        put(&mut g.0, PT, 10, (0x8 << 12) | PRESENT | RW);
    }
    s.sync(&[Gfn(PT)]).unwrap();
    if let Some(b) = s.translate(Gma(9 << 12)) {
        let l = s.client().lookup(b, ContextId::DEFAULT).ok().map(|l| l.gfn);
        assert_eq!(l, Some(Gfn(0x203)), "GMA page 9 reaches BFN {b:?} of {l:?}");
    }
    assert_ne!(s.translate(Gma(10 << 12)), s.translate(Gma(9 << 12)));
    assert_eq!((r.extents_mapped, r.leaves_mapped), (0, 512), "{r:?}");
}

#[test]
fn a_2m_page_moved_in_one_sync_keeps_its_extent_with_no_op() {
    // The guest moves its 2 MiB PDE from index 1 to 2 in one sync: the
    // cache answers the extent whole (the old entry's unmap waits for the
    // flush), so nothing is unmapped and mapped again (a review: flushing
    // unmaps before every extent batch cost 2 ops here).
    let sim = world_with_2m_page();
    let mut s = session(&sim);
    s.build(GUEST, Gfn(ROOT)).unwrap();
    let first = s.translate(Gma(2 << 20)).unwrap();
    {
        let mut g = sim.lock();
        put(&mut g.0, PD, 1, 0);
        put(
            &mut g.0,
            PD,
            2,
            (0x200 << 12) | PRESENT | RW | crate::shadow::ppgtt_format::PS,
        );
    }
    let ops = s.client().stats().ops;
    let r = s.sync(&[Gfn(PD)]).unwrap();
    assert_eq!((r.extents_mapped, r.extents_unmapped), (1, 1), "{r:?}");
    assert_eq!(s.client().stats().ops - ops, 0);
    assert_eq!(s.translate(Gma(4 << 20)), Some(first));
    assert_eq!(s.translate(Gma(2 << 20)), None);
}
