//! Revocation: a dying foreign domain, a gfn leaving the p2m, a dying driver
//! domain. Every BFN pointing at the page goes, DMA faults, references return.

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, Permissions, PvIommuOp, Request};
use pviommu_hv::sim::{DomainSpec, Format};
use pviommu_tests::*;

#[test]
fn foreign_domain_death_revokes_everywhere_and_frees_its_pages() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let b0 = map_one(&mut m, &e, DomId::DOM0, GUEST, 1, Permissions::RW).unwrap();
    let b_dm = map_one(&mut m, &e, DEVICE_MODEL, GUEST, 1, Permissions::RO).unwrap();
    let free_before = m.free_frames();
    m.kill_domain(&e, GUEST);
    assert_eq!(m.zombie_frames(), 0);
    assert_eq!(m.total_page_refs(), 0);
    assert!(m.free_frames() > free_before);
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, b0.0 << 12, 8)
        .is_err());
    assert!(m
        .dma_read(DEVICE_MODEL, ContextId::DEFAULT, b_dm.0 << 12, 8)
        .is_err());
    let st = e.state();
    let d0 = st.driver(DomId::DOM0).unwrap();
    assert_eq!(d0.live(), 0);
    // The owner is told, and the BFN stays reserved until it acknowledges.
    assert_eq!(d0.revoked(), 1);
}

#[test]
fn ballooned_out_gfn_is_revoked() {
    let (mut m, e) = machine(Format::Lpae, 16);
    let keep = map_one(&mut m, &e, DomId::DOM0, GUEST, 2, Permissions::RW).unwrap();
    let gone = map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RW).unwrap();
    m.balloon_out(&e, GUEST, Gfn(3)).unwrap();
    assert!(m
        .dma_read(DomId::DOM0, ContextId::DEFAULT, gone.0 << 12, 8)
        .is_err());
    assert_eq!(
        m.dma_read(DomId::DOM0, ContextId::DEFAULT, keep.0 << 12, 64)
            .unwrap(),
        pattern(2)
    );
    assert_eq!(m.zombie_frames(), 0);
}

/// How many times dom0, the owner in these tests, was woken (Xen: its
/// `VIRQ_PV_IOMMU` raised).
fn wakeups(m: &pviommu_hv::sim::SimMachine) -> u64 {
    m.revocation_wakeups.get(&DomId::DOM0).copied().unwrap_or(0)
}

/// A revocation wakes its owner when the call whose hook revoked returns
/// (Xen: the glue's VIRQ tasklet runs in that CPU's softirqs on the way
/// back to the guest), not at the next PV-IOMMU call: a mediator asleep on
/// its VIRQ makes none. Each kind of hooked call: a balloon, a type change
/// (a writable mapping of a page made read-only goes), a domctl's slices
/// (the target's death). Until 2026-12-07 the simulator delivered them
/// only at a PV-IOMMU call's softirq pass, so every count here was 0.
#[test]
fn a_revocation_wakes_its_owner_when_the_revoking_call_returns() {
    let (mut m, e) = machine(Format::Vtd, 16);
    for g in 1..=3 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    assert_eq!(wakeups(&m), 0);
    m.balloon_out(&e, GUEST, Gfn(1)).unwrap();
    assert_eq!(wakeups(&m), 1, "woken by the balloon's return");
    m.make_read_only(&e, GUEST, Gfn(2));
    assert_eq!(wakeups(&m), 2, "woken by the type change's return");
    m.kill_domain(&e, GUEST);
    assert_eq!(wakeups(&m), 3, "woken by the teardown's return");
    assert_eq!(m.revocation_wakeups_for_reserved_ids, 0);
    check_invariants(&mut m, &e).unwrap();
    // A wake-up asked for a reserved id reaches no one (the glue has no bit
    // for it): the books' check names it.
    pviommu_hv::platform::Platform::notify_revoked(&mut m, DomId(DomId::FIRST_RESERVED));
    m.run_softirqs();
    assert_eq!(wakeups(&m), 3);
    let verdict = check_invariants(&mut m, &e).unwrap_err();
    assert!(
        verdict.contains("revocation_wakeups_for_reserved_ids"),
        "{verdict}"
    );
}

/// The same for the simulator's other hooked calls, each on its return:
/// a page replaced, a guest's own move of its frames, VRAM tracking moved
/// (with and without the dm_op's revocation slices), log-dirty mode
/// turned on (its domctl's slices).
#[test]
fn each_hooked_call_wakes_the_owner_on_its_return() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let map = |m: &mut pviommu_hv::sim::SimMachine, g| {
        map_one(m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    };
    map(&mut m, 1);
    m.replace_page(&e, GUEST, Gfn(1)).unwrap();
    assert_eq!(wakeups(&m), 1, "a page replaced");
    map(&mut m, 2);
    m.add_to_physmap_range(&e, GUEST, Gfn(2), Gfn(40), 1)
        .unwrap();
    assert_eq!(wakeups(&m), 2, "the guest's move of its own frame");
    map(&mut m, 3);
    m.move_vram_range(&e, GUEST, (3, 4));
    assert_eq!(wakeups(&m), 3, "VRAM tracking moved, no slices");
    map(&mut m, 5);
    m.track_dirty_vram(&e, GUEST, (5, 6));
    assert_eq!(wakeups(&m), 4, "VRAM tracking moved by the dm_op");
    map(&mut m, 7);
    m.enable_log_dirty(&e, GUEST);
    assert_eq!(wakeups(&m), 5, "log-dirty mode on");
    check_invariants(&mut m, &e).unwrap();
}

/// Calls made of slices run this CPU's softirqs as each slice returns (Xen:
/// at each continuation), not only after the last: a target's death and
/// log-dirty mode over 1200 mappings take several slices of at most 256
/// revocations, each with its flush and notices, so the owner is woken more
/// than once. (The simulator ran them once, after the whole teardown, until
/// a review of 2026-12-07.)
#[test]
fn calls_made_of_slices_run_softirqs_between_them() {
    let (mut m, e) = machine(Format::Vtd, 1200);
    map_many(&mut m, &e, DomId::DOM0, GUEST, 1200);
    let slices = m.enable_log_dirty(&e, GUEST);
    assert!(slices > 1, "log-dirty in {slices} slice");
    assert_eq!(
        wakeups(&m),
        u64::from(slices),
        "woken at each log-dirty slice's return"
    );
    let (mut m, e) = machine(Format::Vtd, 1200);
    map_many(&mut m, &e, DomId::DOM0, GUEST, 1200);
    let slices = m.kill_domain(&e, GUEST);
    assert!(slices > 1, "teardown in {slices} slice");
    assert!(
        wakeups(&m) > 1,
        "woken {} times over {slices} teardown slices",
        wakeups(&m)
    );
    check_invariants(&mut m, &e).unwrap();
}

#[test]
fn driver_domain_death_drops_all_its_mappings() {
    let (mut m, e) = machine(Format::Vtd, 16);
    driver_domain(&mut m, 9);
    for g in 0..8 {
        map_one(&mut m, &e, DomId(9), GUEST, g, Permissions::RW).unwrap();
    }
    assert_eq!(m.total_page_refs(), 16);
    m.kill_domain(&e, DomId(9));
    assert_eq!(m.total_page_refs(), 0);
    assert!(e.state().driver(DomId(9)).is_none());
}

#[test]
fn quota_exhaustion_is_enospc_and_changes_nothing() {
    let (mut m, _) = machine(Format::Vtd, 16);
    let cfg = pviommu_hv::config::Config {
        quota: 4,
        ..Default::default()
    };
    let e = pviommu_hv::Engine::new(cfg, &m).unwrap();
    for g in 0..4 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    let before = observable(&m, &e);
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW),
        Err(-28)
    );
    assert_eq!(observable(&m, &e), before);
    // Re-mapping an existing page only takes a reference: still allowed.
    assert!(map_one(&mut m, &e, DomId::DOM0, GUEST, 0, Permissions::RW).is_ok());
}

/// The BFN `gfn` of GUEST got when mapped RW into `context` of dom0.
fn map_in(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    context: ContextId,
    gfn: u64,
) -> Bfn {
    let mut op = [map_op_in(context, GUEST, gfn, Permissions::RW)];
    m.guest_batch_all(e, DomId::DOM0, &mut op).unwrap();
    assert_eq!(op[0].status, 0);
    Bfn(op[0].bfn)
}

fn next_in(context: ContextId, skip: u32) -> PvIommuOp {
    Request::RevokedNextIn {
        context,
        skip,
        numbered: false,
    }
    .encode()
}

/// ABI 1.4: `revoked_next` of one context (`IN_CONTEXT`, skip 0, 1, 2, ...)
/// reports that context's notices oldest first, many in one call; acks
/// before them in a batch are done first; any other context's, another
/// domain's or an unknown context's notices are not reported; a skip past
/// the bound is refused at parse and changes nothing.
#[test]
fn a_batch_of_revoked_next_in_one_context_reports_its_notices_oldest_first() {
    let (mut m, e) = machine(Format::Vtd, 64);
    let c1 = e.context_create(&mut m, DomId::DOM0).unwrap();
    let bfn: Vec<(ContextId, Bfn)> = (0..=7u64)
        .map(|g| {
            let ctx = if (1..=5).contains(&g) {
                c1
            } else {
                ContextId::DEFAULT
            };
            (
                ctx,
                if g == 0 {
                    Bfn(0)
                } else {
                    map_in(&mut m, &e, ctx, g)
                },
            )
        })
        .collect();
    for g in [4, 6, 2, 5, 7, 1, 3] {
        m.balloon_out(&e, GUEST, Gfn(g)).unwrap();
    }
    let reported = |ops: &[PvIommuOp]| -> Vec<Result<u64, i32>> {
        ops.iter()
            .map(|o| {
                if o.status != 0 {
                    return Err(o.status);
                }
                assert_eq!(o.domid, GUEST.0);
                assert_eq!(bfn[o.gfn as usize].1 .0, o.bfn, "the BFN of gfn {}", o.gfn);
                assert_eq!(ContextId(o.context), bfn[o.gfn as usize].0);
                Ok(o.gfn)
            })
            .collect()
    };
    // One call, c1's five notices in the order they were queued.
    let mut ops: Vec<PvIommuOp> = (0..7).map(|k| next_in(c1, k)).collect();
    assert_eq!(m.guest_batch_all(&e, DomId::DOM0, &mut ops), Ok(1));
    assert_eq!(
        reported(&ops),
        [Ok(4), Ok(2), Ok(5), Ok(1), Ok(3), Err(-2), Err(-2)]
    );
    let mut ops = [
        next_in(ContextId::DEFAULT, 0),
        next_in(ContextId::DEFAULT, 1),
        next_in(ContextId::DEFAULT, 2),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(reported(&ops), [Ok(6), Ok(7), Err(-2)]);

    // Nobody else's: a context dom0 does not have, and dom0's c1 asked by
    // the device model (which has no context c1).
    let before = observable(&m, &e);
    let mut ops = [next_in(ContextId(9), 0)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, -2);
    let mut ops = [next_in(c1, 0), next_in(ContextId::DEFAULT, 0)];
    m.guest_batch_all(&e, DEVICE_MODEL, &mut ops).unwrap();
    assert_eq!((ops[0].status, ops[1].status), (-2, -2));
    // Past the bound, or with other inputs set: refused, nothing reported.
    let mut bad = [
        PvIommuOp {
            gfn: pviommu_abi::revoked_next::MAX_SKIP + 1,
            ..next_in(c1, 0)
        },
        PvIommuOp {
            gfn: u64::MAX,
            ..next_in(c1, 0)
        },
        PvIommuOp {
            bfn: bfn[4].1 .0,
            ..next_in(c1, 0)
        },
        PvIommuOp {
            domid: GUEST.0,
            ..next_in(c1, 0)
        },
        PvIommuOp {
            flags: 5,
            ..next_in(c1, 0)
        },
        // The number is an output of revoked_next.
        PvIommuOp {
            notice: 1,
            ..next_in(c1, 0)
        },
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut bad).unwrap();
    assert!(bad.iter().all(|o| o.status == -22), "{bad:?}");
    assert_eq!(
        bad[0].gfn,
        pviommu_abi::revoked_next::MAX_SKIP + 1,
        "an input was overwritten"
    );
    assert_eq!(
        (bad[2].bfn, bad[3].domid),
        (bfn[4].1 .0, GUEST.0),
        "an input was overwritten"
    );
    assert_eq!(observable(&m, &e), before);

    // Acks first, then the next notices, in one call: the two acked are
    // gone, the rest come from skip 0 again.
    let ack = |g: usize| {
        Request::RevokedAck {
            context: bfn[g].0,
            bfn: bfn[g].1,
            notice: None,
        }
        .encode()
    };
    let mut ops = [
        ack(4),
        ack(2),
        next_in(c1, 0),
        next_in(c1, 1),
        next_in(c1, 2),
        next_in(c1, 3),
    ];
    assert_eq!(m.guest_batch_all(&e, DomId::DOM0, &mut ops), Ok(1));
    assert_eq!((ops[0].status, ops[1].status), (0, 0));
    assert_eq!(reported(&ops[2..]), [Ok(5), Ok(1), Ok(3), Err(-2)]);
    // The last op ended at skip 2 (gfn 3). A notice acked out of the
    // middle moves the ones after it: skip 2 is now past the end, and the
    // rest are found again from the head.
    let mut ops = [ack(1), next_in(c1, 2), next_in(c1, 1), next_in(c1, 0)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    assert_eq!(reported(&ops[1..]), [Err(-2), Ok(3), Ok(5)]);
    // A notice queued after the walk's last stop is found from there.
    let b8 = map_in(&mut m, &e, c1, 8);
    m.balloon_out(&e, GUEST, Gfn(8)).unwrap();
    let mut ops = [next_in(c1, 1), next_in(c1, 2), next_in(c1, 3)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(
        (ops[0].gfn, ops[1].gfn, ops[1].bfn, ops[2].status),
        (3, 8, b8.0, -2)
    );
    let ack8 = Request::RevokedAck {
        context: c1,
        bfn: b8,
        notice: None,
    }
    .encode();
    let mut ops = [ack(5), ack(3), ack(6), ack(7), ack8];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(e.usage(DomId::DOM0).2, 0);
    let mut ops = [next_in(c1, 0), next_in(ContextId::DEFAULT, 0)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!((ops[0].status, ops[1].status), (-2, -2));
}

/// The bound end to end: skip 255 reaches a context's 256th notice, 256 is
/// refused. A notice acknowledged between two asks moves the rest towards
/// the head: the next ask passes one over, and asking from 0 finds it.
#[test]
fn revoked_next_in_a_context_reaches_its_256th_notice_and_not_past_it() {
    let (mut m, e) = machine(Format::Vtd, 300);
    let bfn: Vec<Bfn> = (0..300)
        .map(|g| map_in(&mut m, &e, ContextId::DEFAULT, g))
        .collect();
    for g in 0..300 {
        m.balloon_out(&e, GUEST, Gfn(g)).unwrap();
    }
    let mut ops = [
        next_in(ContextId::DEFAULT, 255),
        PvIommuOp {
            gfn: 256,
            ..next_in(ContextId::DEFAULT, 0)
        },
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(
        (ops[0].status, ops[0].gfn, ops[0].bfn),
        (0, 255, bfn[255].0)
    );
    assert_eq!((ops[1].status, ops[1].gfn), (-22, 256));
    // The engine's own entry point holds the bound too (its walk runs under
    // the cell's lock), not only the parser.
    assert_eq!(
        e.revoked_in(DomId::DOM0, ContextId::DEFAULT, 256),
        Err(pviommu_hv::Errno::Inval)
    );
    assert!(e.revoked_in(DomId::DOM0, ContextId::DEFAULT, 255).is_ok());
    let ack = |g: usize| {
        Request::RevokedAck {
            context: ContextId::DEFAULT,
            bfn: bfn[g],
            notice: None,
        }
        .encode()
    };
    let mut ops = [
        next_in(ContextId::DEFAULT, 0),
        ack(0),
        next_in(ContextId::DEFAULT, 1),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!((ops[0].gfn, ops[1].status, ops[2].gfn), (0, 0, 2));
    let mut ops = [next_in(ContextId::DEFAULT, 0)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!((ops[0].status, ops[0].gfn), (0, 1));
}

/// ABI 1.5: `revoked_next` with `NUMBERED` reports each notice's number;
/// `revoked_ack` with `NUMBERED` takes only the notice of that number.
/// The case it exists for: a notice acknowledged by another vCPU, its BFN
/// handed out again and revoked again. An acknowledgement of the first
/// notice by number is refused (ENOENT) and changes nothing; the second
/// notice stays queued with its own number. Without `NUMBERED` nothing is
/// written into `notice` (a 1.4 caller may reuse the op as it came back).
#[test]
fn a_numbered_acknowledgement_takes_only_the_notice_of_its_number() {
    use pviommu_abi::revoked_next::NUMBERED;
    let (mut m, e) = machine(Format::Vtd, 64);
    let x = map_in(&mut m, &e, ContextId::DEFAULT, 5);
    m.balloon_out(&e, GUEST, Gfn(5)).unwrap();
    let next = |numbered| Request::RevokedNext { numbered }.encode();
    let next_in_numbered = |skip| {
        Request::RevokedNextIn {
            context: ContextId::DEFAULT,
            skip,
            numbered: true,
        }
        .encode()
    };
    let mut ops = [
        next(false),
        next(true),
        next_in_numbered(0),
        next_in(ContextId::DEFAULT, 0),
    ];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops
        .iter()
        .all(|o| o.status == 0 && o.bfn == x.0 && o.gfn == 5));
    assert_eq!(ops[0].notice, 0, "not asked for, not written");
    assert_eq!(ops[3].notice, 0, "not asked for, not written");
    assert_ne!(ops[1].notice, 0, "numbers start at 1");
    let first = ops[1].notice;
    assert_eq!(ops[2].notice, first, "both forms report the same number");
    assert_eq!(ops[1].flags, NUMBERED);

    // Another vCPU acknowledges it; the BFN comes back for gfn 6, which
    // then leaves the guest too.
    e.revoked_ack(DomId::DOM0, ContextId::DEFAULT, x, Some(first))
        .unwrap();
    assert_eq!(map_in(&mut m, &e, ContextId::DEFAULT, 6), x);
    m.balloon_out(&e, GUEST, Gfn(6)).unwrap();
    let mut ops = [next(true)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    let second = ops[0].notice;
    assert_eq!((ops[0].bfn, ops[0].gfn), (x.0, 6));
    assert!(second > first, "numbers rise: {first} then {second}");

    // The late acknowledgement of the first notice: through the engine
    // and through the hypercall, refused, nothing changed.
    let before = observable(&m, &e);
    assert_eq!(
        e.revoked_ack(DomId::DOM0, ContextId::DEFAULT, x, Some(first)),
        Err(pviommu_hv::Errno::NoEnt)
    );
    assert_eq!(
        e.revoked_ack_check(DomId::DOM0, ContextId::DEFAULT, x, Some(first)),
        Err(pviommu_hv::Errno::NoEnt)
    );
    let late = |n| {
        Request::RevokedAck {
            context: ContextId::DEFAULT,
            bfn: x,
            notice: Some(n),
        }
        .encode()
    };
    let mut ops = [late(first), next(true)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, -2);
    assert_eq!(observable(&m, &e), before);
    assert_eq!((ops[1].status, ops[1].gfn, ops[1].notice), (0, 6, second));
    assert_eq!(e.state().driver(DomId::DOM0).unwrap().revoked(), 1);

    // By its own number it goes.
    let mut ops = [late(second), next(true)];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!((ops[0].status, ops[1].status), (0, -2));
    assert_eq!(e.state().driver(DomId::DOM0).unwrap().revoked(), 0);
}

/// Map `gfns` of GUEST into `d`, revoke them all (ballooned out), and
/// drain `d`'s notices by number: the (BFN, number) pairs, in order.
fn revoke_and_drain(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    d: DomId,
    gfns: std::ops::Range<u64>,
) -> Vec<(u64, u64)> {
    for g in gfns {
        map_one(m, e, d, GUEST, g, Permissions::RW).unwrap();
        m.balloon_out(e, GUEST, Gfn(g)).unwrap();
    }
    let mut seen = Vec::new();
    // Bounded: each round acknowledges one.
    for _ in 0..64 {
        let Ok((bfn, n)) = revoked_next_numbered(m, e, d) else {
            break;
        };
        seen.push((bfn.0, n));
        e.revoked_ack(d, ContextId::DEFAULT, bfn, Some(n)).unwrap();
    }
    seen
}

/// A privileged domain `d` of 32 pages: a driver domain beside dom0.
fn driver_domain(m: &mut pviommu_hv::sim::SimMachine, d: u16) {
    m.create_domain(
        DomId(d),
        DomainSpec {
            pages: 32,
            privileged: true,
            device_model_of: None,
        },
    )
    .unwrap();
}

/// Acknowledging a driver domain's last notice gives its cell back at
/// once (the ack's unlock does what every unlock does), not at its next
/// call.
#[test]
fn the_last_acknowledgement_gives_the_cell_back() {
    let (mut m, e) = machine(Format::Vtd, 64);
    driver_domain(&mut m, 9);
    map_one(&mut m, &e, DomId(9), GUEST, 0, Permissions::RW).unwrap();
    m.balloon_out(&e, GUEST, Gfn(0)).unwrap();
    assert!(e.state().driver(DomId(9)).is_some(), "its notice keeps it");
    let (bfn, _, n) = e.revoked_in(DomId(9), ContextId::DEFAULT, 0).unwrap();
    e.revoked_ack(DomId(9), ContextId::DEFAULT, bfn, Some(n))
        .unwrap();
    assert!(e.state().driver(DomId(9)).is_none(), "d9's cell kept");
}

/// Notice numbers are a domain's, not its cell's (security review of ABI
/// 1.5). A driver domain that empties its state gives its cell back; the
/// next domain to claim that cell numbers from 1 (it does not learn how
/// many notices the other had), and when the first one comes back, in
/// another cell, its numbers go on from where they were: a (BFN, number)
/// pair is never reported twice in a domain's life, so a numbered ack
/// still in flight cannot take a new notice.
#[test]
fn notice_numbers_belong_to_the_domain_not_to_its_cell() {
    let (mut m, e) = machine(Format::Vtd, 64);
    driver_domain(&mut m, 9);
    driver_domain(&mut m, 10);
    map_one(&mut m, &e, DomId(9), GUEST, 0, Permissions::RW).unwrap();
    let d9_cell = e.cell_of(DomId(9), ContextId::DEFAULT);
    assert!(d9_cell.is_some());
    let first = revoke_and_drain(&mut m, &e, DomId(9), 0..3);
    assert_eq!(first.iter().map(|&(_, n)| n).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(e.state().driver(DomId(9)).is_none(), "d9's cell went back");
    // d10 takes d9's cell and numbers from 1.
    map_one(&mut m, &e, DomId(10), GUEST, 10, Permissions::RW).unwrap();
    assert_eq!(e.cell_of(DomId(10), ContextId::DEFAULT), d9_cell);
    let theirs = revoke_and_drain(&mut m, &e, DomId(10), 10..12);
    assert_eq!(theirs.iter().map(|&(_, n)| n).collect::<Vec<_>>(), [1, 2]);
    // d10 keeps a page mapped, so its cell stays; d9 comes back in
    // another.
    map_one(&mut m, &e, DomId(10), GUEST, 20, Permissions::RW).unwrap();
    let again = revoke_and_drain(&mut m, &e, DomId(9), 3..6);
    assert_eq!(again.iter().map(|&(_, n)| n).collect::<Vec<_>>(), [4, 5, 6]);
    assert!(again.iter().all(|a| !first.contains(a)));
    assert_ne!(e.cell_of(DomId(9), ContextId::DEFAULT), d9_cell);
}

/// A domain's count ends with its teardown: a later domain with the same
/// id numbers from 1.
#[test]
fn a_new_domain_with_an_old_id_numbers_its_notices_from_1() {
    let (mut m, e) = machine(Format::Vtd, 64);
    driver_domain(&mut m, 9);
    assert_eq!(revoke_and_drain(&mut m, &e, DomId(9), 0..2).len(), 2);
    m.kill_domain(&e, DomId(9));
    driver_domain(&mut m, 9);
    let seen = revoke_and_drain(&mut m, &e, DomId(9), 2..4);
    assert_eq!(seen.iter().map(|&(_, n)| n).collect::<Vec<_>>(), [1, 2]);
}

/// A numbered ack of a notice acknowledged elsewhere, whose BFN is being
/// revoked again right now (the IOMMU refused the unmap: Stuck), is
/// ENOENT like any other number, not EBUSY: a slot not yet a notice has
/// no number, so it is not the notice named (security review of ABI 1.5;
/// the client takes anything but ENOENT on its own ack as fatal). An
/// unnumbered ack still answers EBUSY there.
#[test]
fn a_stale_numbered_ack_of_a_bfn_being_revoked_again_is_enoent() {
    let (mut m, e) = machine(Format::Vtd, 16);
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, 3, Permissions::RW).unwrap();
    m.balloon_out(&e, GUEST, Gfn(3)).unwrap();
    let (bfn, n) = revoked_next_numbered(&mut m, &e, DomId::DOM0).unwrap();
    assert_eq!(bfn, b);
    e.revoked_ack(DomId::DOM0, ContextId::DEFAULT, b, Some(n))
        .unwrap();
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, GUEST, 4, Permissions::RW).unwrap(),
        b
    );
    // The IOMMU keeps refusing: the slot stays Stuck through the batch's
    // own retry at its end.
    m.fail_unmaps = 1000;
    m.balloon_out(&e, GUEST, Gfn(4)).unwrap();
    let ack = |notice| {
        Request::RevokedAck {
            context: ContextId::DEFAULT,
            bfn: b,
            notice,
        }
        .encode()
    };
    let before = observable(&m, &e);
    let mut ops = [ack(Some(n)), ack(None), ack(Some(0))];
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(
        ops.map(|o| o.status),
        [-2, -16, -2],
        "stale number, unnumbered, number 0"
    );
    assert_eq!(observable(&m, &e), before);
}

/// Review of the per-call bound: every flush retried every revocation the
/// IOMMU had refused to unmap (the stuck list), so one hypercall's or one
/// hook's work grew with the refusals, up to the quota. A flush retries
/// at most `STUCK_RETRIES` now, oldest first, failures back at the tail:
/// once the IOMMU unmaps again, each becomes a notice within
/// `stuck / STUCK_RETRIES` flushes, none twice and none lost.
#[test]
fn a_flush_retries_a_bounded_number_of_stuck_revocations_in_turn() {
    use pviommu_hv::engine::STUCK_RETRIES;
    const N: u64 = 600;
    let (mut m, e) = machine(Format::Vtd, N + 8);
    let mut bfns: Vec<Bfn> = (1..=N)
        .map(|g| map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap())
        .collect();
    m.fail_unmaps = u32::MAX;
    for g in 1..=N {
        m.balloon_out(&e, GUEST, Gfn(g)).unwrap();
    }
    let stuck = |e: &pviommu_hv::Engine| e.driver_state(DomId::DOM0).unwrap().stuck();
    assert_eq!(stuck(&e), N);
    let before = m.fail_unmaps;
    e.finish(&mut m, DomId::DOM0);
    assert_eq!(
        u64::from(before - m.fail_unmaps),
        STUCK_RETRIES,
        "IOMMU unmaps one flush tried"
    );
    assert_eq!(stuck(&e), N);
    // The IOMMU unmaps again.
    m.fail_unmaps = 0;
    let mut flushes = 0;
    while stuck(&e) > 0 {
        e.finish(&mut m, DomId::DOM0);
        flushes += 1;
        assert!(
            flushes <= N.div_ceil(STUCK_RETRIES),
            "a stuck one was passed over"
        );
    }
    let mut noticed = Vec::new();
    while let Ok((bfn, _, number)) = e.revoked_next(DomId::DOM0) {
        e.revoked_ack(DomId::DOM0, ContextId::DEFAULT, bfn, Some(number))
            .unwrap();
        noticed.push(bfn);
        assert!(noticed.len() as u64 <= N, "a notice came twice");
    }
    noticed.sort();
    bfns.sort();
    assert_eq!(noticed, bfns);
    assert_eq!(m.total_page_refs(), 0);
}

/// Call `domid`'s teardown slice by slice, as Xen's toolstack does, until
/// it is done or says it is stalled (at most `bound` slices): `Ok(slices)`
/// once done, `Err(slices)` once stalled.
fn teardown_until_done_or_stalled(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    domid: DomId,
    cursor: &mut u64,
    bound: u32,
) -> Result<u32, u32> {
    for slice in 1..=bound {
        if e.domain_teardown(m, domid, cursor).is_ok() {
            return Ok(slice);
        }
        if pviommu_hv::Engine::teardown_stalled(*cursor) {
            return Err(slice);
        }
    }
    panic!("neither done nor stalled after {bound} slices");
}

/// A target's teardown against an IOMMU that refuses every unmap of the
/// driver domain that maps it: each walk over that cell releases nothing.
/// After a few such walks it says so (Xen answers the toolstack `-EBUSY`,
/// the domain stays dying) instead of restarting for ever (which Xen turns
/// into a destroy the toolstack cannot leave). Called again once the
/// IOMMU works, it resumes and finishes. Before the fix it never said so.
/// The same for a dying driver domain whose own unmaps keep failing.
#[test]
fn a_teardown_that_releases_nothing_says_it_is_stalled_and_resumes_later() {
    let (mut m, e) = machine(Format::Vtd, 16);
    for g in 0..4 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    m.fail_unmaps_of = Some((DomId::DOM0, 0));
    m.mark_dying(GUEST);
    let mut cursor = 0;
    let stalled = teardown_until_done_or_stalled(&mut m, &e, GUEST, &mut cursor, 100);
    assert!(matches!(stalled, Err(n) if n <= 12), "{stalled:?}");
    assert_eq!(m.total_page_refs(), 8, "nothing released under the device");
    // Asked again (a later destroy), still failing: stalled again.
    let again = teardown_until_done_or_stalled(&mut m, &e, GUEST, &mut cursor, 100);
    assert!(again.is_err(), "{again:?}");
    // The IOMMU works again: the next destroy finishes.
    m.fail_unmaps_of = None;
    let done = teardown_until_done_or_stalled(&mut m, &e, GUEST, &mut cursor, 100);
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(m.total_page_refs(), 0);

    // A driver domain whose own unmaps fail while it dies.
    let (mut m, e) = machine(Format::Vtd, 16);
    driver_domain(&mut m, 9);
    for g in 0..4 {
        map_one(&mut m, &e, DomId(9), GUEST, g, Permissions::RW).unwrap();
    }
    m.fail_unmaps_of = Some((DomId(9), 0));
    m.mark_dying(DomId(9));
    let mut cursor = 0;
    let stalled = teardown_until_done_or_stalled(&mut m, &e, DomId(9), &mut cursor, 100);
    assert!(matches!(stalled, Err(n) if n <= 12), "{stalled:?}");
    m.fail_unmaps_of = None;
    let done = teardown_until_done_or_stalled(&mut m, &e, DomId(9), &mut cursor, 100);
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(m.total_page_refs(), 0);
}

/// Map `target`'s gfns `0..n` for `owner`, in batches.
fn map_many(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    owner: DomId,
    target: DomId,
    n: u64,
) {
    let ops: Vec<PvIommuOp> = (0..n).map(|g| map_op(target, g, Permissions::RW)).collect();
    for chunk in ops.chunks(100) {
        let mut chunk = chunk.to_vec();
        m.guest_batch_all(e, owner, &mut chunk).unwrap();
        assert!(chunk.iter().all(|o| o.status == 0));
    }
}

/// A dying driver domain's 3000 stuck unmaps, the IOMMU working again: each
/// restart retries 256 of them and they go, so the teardown is moving and
/// must not say it is stalled. The first version went by `used()` alone,
/// which such a retry does not lower (the entry becomes a notice first),
/// and said stalled after 8 restarts (2048 entries) although every one
/// released pages (review, 2026-12-03).
#[test]
fn a_dying_drivers_long_stuck_list_that_now_unmaps_is_progress() {
    let (mut m, e) = machine(Format::Vtd, 3000);
    driver_domain(&mut m, 9);
    map_many(&mut m, &e, DomId(9), GUEST, 3000);
    m.fail_unmaps_of = Some((DomId(9), 0));
    m.mark_dying(DomId(9));
    let mut cursor = 0;
    let stalled = teardown_until_done_or_stalled(&mut m, &e, DomId(9), &mut cursor, 1000);
    assert!(stalled.is_err(), "{stalled:?}");
    assert_eq!(e.state().driver(DomId(9)).unwrap().stuck(), 3000);
    m.fail_unmaps_of = None;
    let done = teardown_until_done_or_stalled(&mut m, &e, DomId(9), &mut cursor, 1000);
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(m.total_page_refs(), 0);
}

/// A dying target's pages held by dom0's stuck entries, which only dom0's
/// own flushes manage to unmap (the IOMMU fails the teardown's retries and
/// recovers for dom0's calls in between): the teardown's walks release
/// nothing themselves, yet the pages go, 256 a round. That is progress: the
/// first version looked only within each slice and said stalled after 8
/// walks with most of the pages still to go (review, 2026-12-03).
#[test]
fn pages_released_between_a_teardowns_slices_are_progress() {
    let (mut m, e) = machine(Format::Vtd, 3000);
    map_many(&mut m, &e, DomId::DOM0, GUEST, 3000);
    m.fail_unmaps_of = Some((DomId::DOM0, 0));
    m.mark_dying(GUEST);
    let mut cursor = 0;
    // The first walk revokes all 3000, each unmap refused: all stuck
    // (slices of 256 revocations and on to a 2 MiB block's end).
    for _ in 0..12 {
        assert!(e.domain_teardown(&mut m, GUEST, &mut cursor).is_err());
        if e.state().driver(DomId::DOM0).unwrap().stuck() == 3000 {
            break;
        }
    }
    assert_eq!(e.state().driver(DomId::DOM0).unwrap().stuck(), 3000);
    let mut done = false;
    for _ in 0..100 {
        m.fail_unmaps_of = Some((DomId::DOM0, 0));
        let r = e.domain_teardown(&mut m, GUEST, &mut cursor);
        assert!(
            !pviommu_hv::Engine::teardown_stalled(cursor),
            "stalled with {} page references left",
            m.total_page_refs()
        );
        if r.is_ok() {
            done = true;
            break;
        }
        // dom0's own call in between: its flush retries 256 stuck entries.
        m.fail_unmaps_of = None;
        e.finish(&mut m, DomId::DOM0);
    }
    assert!(done);
    assert_eq!(m.total_page_refs(), 0);
}

/// A dying target's stuck entries wait in dom0's cell behind 2400 stuck
/// entries of another domain (a cell's stuck list is one queue, retried
/// 256 a flush, oldest first). The IOMMU works again: each walk's flush
/// retries the others' entries, releasing none of the dying domain's
/// pages, but the queue moves towards them. That is progress: the first
/// version counted only the dying domain's own pages released, and said
/// stalled after 8 walks (2048 of the others' entries) (review, 2026-12-03).
#[test]
fn a_queue_of_others_stuck_entries_moving_is_progress() {
    let (mut m, e) = machine(Format::Vtd, 16);
    const OTHER: DomId = DomId(20);
    m.create_domain(
        OTHER,
        DomainSpec {
            pages: 2400,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    map_many(&mut m, &e, DomId::DOM0, OTHER, 2400);
    for g in 0..10 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    m.fail_unmaps_of = Some((DomId::DOM0, 0));
    // OTHER's pages leave (one hook over them): all 2400 stuck.
    e.gfn_changed(
        &mut m,
        OTHER,
        Gfn(0),
        12,
        pviommu_hv::engine::GfnChange::Removed,
    );
    m.mark_dying(GUEST);
    let mut cursor = 0;
    // The first walk: GUEST's 10 stuck too, at the queue's tail.
    assert!(e.domain_teardown(&mut m, GUEST, &mut cursor).is_err());
    assert_eq!(e.state().driver(DomId::DOM0).unwrap().stuck(), 2410);
    m.fail_unmaps_of = None;
    let done = teardown_until_done_or_stalled(&mut m, &e, GUEST, &mut cursor, 1000);
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(e.target_active(GUEST), 0);
}

/// `SimMachine::kill_domain` against an IOMMU that refuses every unmap of
/// the driver domain mapping the target: the teardown stalls, and the kill
/// ends there, the domain dying and its memory kept, as Xen's `-EBUSY` to
/// the toolstack leaves it. Once the IOMMU works, a later kill finishes.
/// (The helper destroyed the domain all the same after a bound of slices:
/// its frames were freed with device mappings of them still live; a review
/// comparing the simulator with Xen.)
#[test]
fn a_kill_whose_teardown_stalls_leaves_the_domain_dying() {
    let (mut m, e) = machine(Format::Vtd, 16);
    for g in 0..4 {
        map_one(&mut m, &e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap();
    }
    m.fail_unmaps_of = Some((DomId::DOM0, 0));
    let slices = m.kill_domain(&e, GUEST);
    assert!(slices <= 12, "{slices} slices");
    assert!(m.mfn_of(GUEST, Gfn(0)).is_some(), "destroyed while stalled");
    assert_eq!(m.total_page_refs(), 8, "nothing released under the device");
    m.fail_unmaps_of = None;
    m.kill_domain(&e, GUEST);
    assert!(m.mfn_of(GUEST, Gfn(0)).is_none());
    assert_eq!(m.total_page_refs(), 0);
    assert_eq!(m.zombie_frames(), 0);
}

/// Pages a cell could not release while its flushes failed: `n` mapped
/// writable by dom0 (in batches of 500), then unmapped while every flush
/// fails, then flushes succeed again. Returns the page references held
/// before the maps.
fn backlog_of_failed_flushes(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    n: u64,
) -> u64 {
    let base = m.total_page_refs();
    let dom0 = (DomId::DOM0, ContextId::DEFAULT);
    let bfns = map_range(m, e, dom0, GUEST, 0..n);
    m.fail_flushes = u32::MAX;
    unmap_range(m, e, dom0, &bfns);
    assert_eq!(
        m.total_page_refs(),
        base + 2 * n,
        "nothing released while flushes fail"
    );
    m.fail_flushes = 0;
    base
}

/// A hook is bounded whatever a cell holds: a backlog that failed flushes
/// left (up to the quota) is released `RELEASE_BUDGET` pages a flush, not
/// all at once by the first hook of any target the cell maps (on Xen
/// under that target's p2m lock, at a time the target chooses). The rest
/// stays referenced, and the hooks after it go on with it.
#[test]
fn a_hook_releases_a_failed_flushes_backlog_a_budget_at_a_time() {
    use pviommu_hv::engine::{GfnChange, RELEASE_BUDGET};
    let n = RELEASE_BUDGET + RELEASE_BUDGET / 2;
    let (mut m, e) = machine(Format::Vtd, n + 16);
    let base = backlog_of_failed_flushes(&mut m, &e, n);
    // The guest balloons out a page nobody maps.
    let held = m.total_page_refs();
    e.gfn_changed(&mut m, GUEST, Gfn(n + 1), 0, GfnChange::Removed);
    // (A writable page holds a reference and a type reference.)
    assert_eq!(held - m.total_page_refs(), 2 * RELEASE_BUDGET);
    check_invariants(&mut m, &e).unwrap();
    e.gfn_changed(&mut m, GUEST, Gfn(n + 2), 0, GfnChange::Removed);
    assert_eq!(m.total_page_refs(), base);
    check_invariants(&mut m, &e).unwrap();
}

/// The owner's call that ends with such a backlog continues
/// (`BATCH_INCOMPLETE`, with every op done) until it is released: when
/// the call returns, every page it unmapped is let go, as with no backlog.
#[test]
fn the_owners_call_continues_until_a_backlog_is_released() {
    use pviommu_hv::engine::RELEASE_BUDGET;
    let n = 2 * RELEASE_BUDGET + 100;
    let (mut m, e) = machine(Format::Vtd, n + 16);
    let base = backlog_of_failed_flushes(&mut m, &e, n);
    let mut ops = vec![map_op(GUEST, n + 1, Permissions::RO)];
    let calls = m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert_eq!(ops[0].status, 0);
    assert_eq!(calls, 3, "each entry lets go of a budget's worth");
    assert_eq!(m.total_page_refs(), base + 1);
    check_invariants(&mut m, &e).unwrap();
}

/// dom0's (or `caller`'s) maps of `dom`'s gfns into `ctx`, writable, in
/// batches of 500: their BFNs.
fn map_range(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    (caller, ctx): (DomId, ContextId),
    dom: DomId,
    gfns: std::ops::Range<u64>,
) -> Vec<Bfn> {
    let mut bfns = Vec::new();
    for chunk in gfns.collect::<Vec<_>>().chunks(500) {
        let mut ops: Vec<_> = chunk
            .iter()
            .map(|&g| map_op_in(ctx, dom, g, Permissions::RW))
            .collect();
        m.guest_batch_all(e, caller, &mut ops).unwrap();
        bfns.extend(ops.iter().map(|o| {
            assert_eq!(o.status, 0);
            Bfn(o.bfn)
        }));
    }
    bfns
}

/// Their unmaps, in batches of 500, whatever each answers.
fn unmap_range(
    m: &mut pviommu_hv::sim::SimMachine,
    e: &pviommu_hv::Engine,
    (caller, ctx): (DomId, ContextId),
    bfns: &[Bfn],
) {
    for chunk in bfns.chunks(500) {
        let mut ops: Vec<_> = chunk.iter().map(|&b| unmap_op_in(ctx, b)).collect();
        let _ = m.guest_batch_all(e, caller, &mut ops);
    }
}

/// The budget is the hook's, not each cell's: a target three cells map
/// (dom0's context 0 and context 1, the device model's), each holding a
/// backlog failed flushes left, gets one hook's worth released, not three
/// (a second review: the first form gave each cell a budget of its own).
/// Every cell is still flushed, and later hooks go on with the rest.
#[test]
fn a_hook_releases_one_budget_over_all_its_cells() {
    use pviommu_hv::engine::{GfnChange, RELEASE_BUDGET};
    let n = RELEASE_BUDGET + 64;
    let (mut m, e) = machine(Format::Vtd, 3 * n + 16);
    m.add_device(
        pviommu_abi::Sbdf(0x10),
        pviommu_hv::iommu::DeviceFacts {
            owner: DomId::DOM0,
            own_requester_id: true,
            rmrr: false,
            ats: false,
            translated: true,
        },
    );
    let mut create = [Request::ContextCreate.encode()];
    m.guest_batch_all(&e, DomId::DOM0, &mut create).unwrap();
    let ctx1 = ContextId(create[0].context);
    let base = m.total_page_refs();
    let cells = [
        (DomId::DOM0, ContextId::DEFAULT),
        (DomId::DOM0, ctx1),
        (DEVICE_MODEL, ContextId::DEFAULT),
    ];
    let bfns: Vec<_> = (0..3)
        .map(|i| {
            map_range(
                &mut m,
                &e,
                cells[i],
                GUEST,
                i as u64 * n..(i as u64 + 1) * n,
            )
        })
        .collect();
    m.fail_flushes = u32::MAX;
    for (cell, b) in cells.iter().zip(&bfns) {
        unmap_range(&mut m, &e, *cell, b);
    }
    m.fail_flushes = 0;
    let held = m.total_page_refs();
    assert_eq!(held, base + 6 * n);
    e.gfn_changed(&mut m, GUEST, Gfn(3 * n + 1), 0, GfnChange::Removed);
    // (A writable page holds a reference and a type reference.)
    assert_eq!((held - m.total_page_refs()) / 2, RELEASE_BUDGET);
    check_invariants(&mut m, &e).unwrap();
    for gfn in 3 * n + 2..3 * n + 6 {
        e.gfn_changed(&mut m, GUEST, Gfn(gfn), 0, GfnChange::Removed);
    }
    assert_eq!(m.total_page_refs(), base);
    check_invariants(&mut m, &e).unwrap();
}

/// What a hook revokes itself is released with it, beyond the budget: an
/// order-13 removal of 8192 mapped pages returns with none of them still
/// referenced (with the budget alone, 4096 stayed so until the owner's
/// next call: a second review).
#[test]
fn a_range_hook_releases_what_it_revoked_beyond_the_budget() {
    use pviommu_hv::engine::{GfnChange, RELEASE_BUDGET};
    let n = 2 * RELEASE_BUDGET;
    assert_eq!(n, 1 << 13);
    let (mut m, e) = machine(Format::Vtd, n + 16);
    let base = m.total_page_refs();
    let bfns = map_range(&mut m, &e, (DomId::DOM0, ContextId::DEFAULT), GUEST, 0..n);
    e.gfn_changed(&mut m, GUEST, Gfn(0), 13, GfnChange::Removed);
    assert_eq!(m.total_page_refs(), base);
    for b in bfns.iter().step_by(97) {
        assert!(m
            .dma_read(DomId::DOM0, ContextId::DEFAULT, b.0 << 12, 8)
            .is_err());
    }
    check_invariants(&mut m, &e).unwrap();
}

/// Extent unmaps put 512 pages each on the list: a batch of 16 leaves
/// 8192 for the call's end with every flush succeeding, and the call
/// continues (released a budget an entry) rather than releasing them in
/// one entry.
#[test]
fn extent_unmaps_past_the_budget_continue_the_call() {
    const EXT: u64 = pviommu_abi::EXTENT_PAGES;
    let (mut m, e) = machine_after_dom0(Format::Vtd, 17 * EXT + 512, 512);
    let mut ops: Vec<_> = (0..16)
        .map(|i| {
            Request::MapExtent(map_request_in(
                ContextId::DEFAULT,
                GUEST,
                EXT + i * EXT,
                Permissions::RW,
            ))
            .encode()
        })
        .collect();
    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    let mut ops: Vec<_> = ops
        .iter()
        .map(|o| {
            Request::UnmapExtent {
                context: ContextId::DEFAULT,
                bfn: Bfn(o.bfn),
            }
            .encode()
        })
        .collect();
    let calls = m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == 0));
    assert_eq!(calls, 2, "8192 pages: two entries' budgets");
    assert_eq!(m.total_page_refs(), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// A dying target whose pages wait behind another target's backlog in an
/// idle owner's cell (failed flushes left both): its teardown goes on,
/// the other target's pages released counting as progress, and ends with
/// none of its pages held, not stalled.
#[test]
fn a_dying_target_behind_another_targets_backlog_is_torn_down() {
    use pviommu_hv::engine::RELEASE_BUDGET;
    let n = 3 * RELEASE_BUDGET;
    let (mut m, e) = machine(Format::Vtd, n + 16);
    let dying = DEVICE_MODEL;
    let base = m.total_page_refs();
    let dom0 = (DomId::DOM0, ContextId::DEFAULT);
    let its = map_range(&mut m, &e, dom0, dying, 0..32);
    let others = map_range(&mut m, &e, dom0, GUEST, 0..n);
    m.fail_flushes = u32::MAX;
    unmap_range(&mut m, &e, dom0, &its);
    unmap_range(&mut m, &e, dom0, &others);
    m.fail_flushes = 0;
    assert_eq!(m.total_page_refs(), base + 2 * (n + 32));
    m.kill_domain(&e, dying);
    assert_eq!(m.zombie_frames(), 0);
    assert_eq!(e.target_active(dying), 0);
    check_invariants(&mut m, &e).unwrap();
}

/// References held on guest page `g` (and its type's).
fn refs_of(m: &pviommu_hv::sim::SimMachine, g: u64) -> u32 {
    let mfn = m.mfn_of(GUEST, Gfn(g)).unwrap();
    let i = m.frame_info(mfn).unwrap();
    i.refs + i.writable_refs
}

/// With the hook's budget used up by an earlier cell (dom0's backlog),
/// the later cell's flush still releases the hook's own revocation there,
/// although that flush first unmaps stuck entries at last, which go on the
/// list ahead of it: the hook's allowance has room for them too (before,
/// they took it, and the hook returned with its own page referenced: a
/// third review).
#[test]
fn a_hooks_own_page_is_released_behind_entries_unstuck_by_its_flush() {
    use pviommu_hv::engine::{GfnChange, RELEASE_BUDGET};
    let n = RELEASE_BUDGET + 64;
    let x = n + 200;
    let (mut m, e) = machine(Format::Vtd, n + 300);
    let dom0 = (DomId::DOM0, ContextId::DEFAULT);
    let dm = (DEVICE_MODEL, ContextId::DEFAULT);
    let b0 = map_range(&mut m, &e, dom0, GUEST, 0..n);
    let stuck_bfns = map_range(&mut m, &e, dm, GUEST, n..n + 20);
    let bx = map_range(&mut m, &e, dm, GUEST, x..x + 1)[0];
    // The device model's unmaps: the IOMMU refuses to clear the entries,
    // so they stay stuck (referenced).
    m.fail_unmaps_of = Some((DEVICE_MODEL, 0));
    unmap_range(&mut m, &e, dm, &stuck_bfns);
    m.fail_unmaps_of = None;
    assert!((n..n + 20).all(|g| refs_of(&m, g) != 0));
    m.fail_flushes = u32::MAX;
    unmap_range(&mut m, &e, dom0, &b0);
    m.fail_flushes = 0;
    e.gfn_changed(&mut m, GUEST, Gfn(x), 0, GfnChange::Removed);
    assert!(m
        .dma_read(DEVICE_MODEL, ContextId::DEFAULT, bx.0 << 12, 8)
        .is_err());
    assert_eq!(refs_of(&m, x), 0, "the hook's own page is released");
    check_invariants(&mut m, &e).unwrap();
}
