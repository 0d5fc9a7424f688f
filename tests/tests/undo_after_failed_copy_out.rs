//! Security review findings (regression tests): a map whose result cannot
//! be copied out to the caller's op array is undone, and the undo must touch
//! only the install that map made or shared.
//!
//! * It used to be a plain unmap. When the map had been answered with a BFN
//!   the caller already held (dedup) and a hook revoked that BFN in
//!   between, the undo acknowledged the revocation notice and freed the
//!   BFN, so the next map of another guest's page got it while the
//!   mediator's shadow still pointed at it.
//! * Then it found its mapping by BFN alone. Between the map and the undo,
//!   other vCPUs of the caller could see the BFN revoked, acknowledge it
//!   and get it again for another guest's page; the undo took that new
//!   mapping down. Each map now carries a tag (cell and install
//!   generation).
//!
//! And the batch header, whose `nr_done` is the only record of what a call
//! did: one the caller cannot write used to have its ops run and the call
//! answer `EFAULT` with `nr_done` as sent, so the caller took ops that had
//! acted as never run. Its `nr_done` is now written (as read) before any op
//! acts.

use std::cell::Cell;

use pviommu_abi::{cmd, Bfn, ContextId, DomId, Gfn, Permissions, PvIommuBatch, PvIommuOp};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;
use zerocopy::{FromZeros, IntoBytes};

/// A domain besides the guest, whose page another map may get.
const OTHER: DomId = DomId(5);

fn host() -> (SimMachine, Engine) {
    let (mut m, e) = machine(Format::Vtd, 16);
    let spec = DomainSpec {
        pages: 32,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain(OTHER, spec).unwrap();
    (m, e)
}

/// dom0 runs a batch that maps GUEST's gfn 5; copying its result back fails,
/// and `race` (another CPU) runs at that moment. Returns the hypercall's
/// answer.
fn map_with_failing_copy_out<'a>(m: &'a mut SimMachine, e: &'a Engine, race: Race<'a>) -> i64 {
    let (base, ops_addr) = stage_batch(m, DomId::DOM0, &[map_op(GUEST, 5, Permissions::RW)]);
    let mut h = Interposer::new(m, Service::CopyToGuestAt(ops_addr), race);
    e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base)
}

#[test]
fn undo_after_a_failed_copy_out_keeps_a_known_bfns_notice() {
    let (mut m, e) = host();
    // The mediator maps GUEST gfn 5 and is told BFN b (its shadow holds b).
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).unwrap();
    // A batch maps the same page again (shared onto b); its result cannot
    // be copied out, and meanwhile the guest balloons the page out.
    let ret = map_with_failing_copy_out(
        &mut m,
        &e,
        Box::new(|m: &mut SimMachine| {
            m.balloon_out(&e, GUEST, Gfn(5)).unwrap();
            m.current = DomId::DOM0;
        }),
    );
    assert_eq!(ret, -14, "EFAULT");
    // The mediator must learn that b was revoked ...
    let notice = revoked_next(&mut m, &e, DomId::DOM0);
    // ... and b must not be handed out for another guest's page meanwhile.
    let other = map_one(&mut m, &e, DomId::DOM0, OTHER, 7, Permissions::RW).unwrap();
    assert_eq!(
        notice,
        Ok((b, GUEST, Gfn(5))),
        "b's revocation notice was consumed by the undo"
    );
    assert_ne!(
        other, b,
        "b reused for another guest's page while the mediator still holds it"
    );
}

#[test]
fn undo_does_not_take_down_a_reused_bfn() {
    let (mut m, e) = host();
    let reused: Cell<Option<(Bfn, Bfn)>> = Cell::new(None);
    // The batch's map of GUEST gfn 5 gets a fresh BFN b; its result cannot
    // be copied out. Meanwhile the guest balloons the page out, another
    // vCPU of the mediator acknowledges b's notice, and a third maps
    // another guest's page and is told b.
    let ret = map_with_failing_copy_out(
        &mut m,
        &e,
        Box::new(|m: &mut SimMachine| {
            m.balloon_out(&e, GUEST, Gfn(5)).unwrap();
            let (b, _, _) = revoked_next(m, &e, DomId::DOM0).unwrap();
            assert_eq!(ack_revoked(m, &e, DomId::DOM0, b), 0);
            let other = map_one(m, &e, DomId::DOM0, OTHER, 7, Permissions::RW).unwrap();
            reused.set(Some((b, other)));
            m.current = DomId::DOM0;
        }),
    );
    assert_eq!(ret, -14, "EFAULT");
    let (b, other) = reused.get().expect("the race ran");
    assert_eq!(other, b, "the other vCPU was given the same BFN");
    assert!(
        e.lookup(DomId::DOM0, ContextId::DEFAULT, other).is_ok(),
        "the undo took down a mapping another vCPU was told about"
    );
}

/// Where a batch header's `nr_done` is, from the header's address.
fn nr_done_at(base: u64) -> u64 {
    base + core::mem::offset_of!(PvIommuBatch, nr_done) as u64
}

/// dom0's batch with its header at `header`, on a host whose copies to
/// dom0 fail as `failing` says: the hypercall's answer.
fn dom0_batch_failing(m: &mut SimMachine, e: &Engine, header: u64, failing: Service) -> i64 {
    let mut h = Interposer::new(m, failing, Box::new(|_| {}));
    e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, header)
}

/// dom0's unmaps of three BFNs it holds, staged as one batch: the batch's
/// header address, the ops' address, the BFNs.
fn stage_three_unmaps(m: &mut SimMachine, e: &Engine) -> (u64, u64, Vec<Bfn>) {
    let bfns: Vec<Bfn> = (0..3)
        .map(|g| map_one(m, e, DomId::DOM0, GUEST, g, Permissions::RW).unwrap())
        .collect();
    let unmaps: Vec<PvIommuOp> = bfns.iter().map(|b| unmap_op(*b)).collect();
    let (base, ops_addr) = stage_batch(m, DomId::DOM0, &unmaps);
    (base, ops_addr, bfns)
}

#[test]
fn a_header_the_caller_cannot_write_runs_no_op() {
    let (mut m, e) = host();
    let (base, _, bfns) = stage_three_unmaps(&mut m, &e);
    let before = observable(&m, &e);
    let ret = dom0_batch_failing(&mut m, &e, base, Service::CopyToGuestAt(nr_done_at(base)));
    assert_eq!(ret, -14, "EFAULT");
    // Before the fix all three unmaps acted, unreported.
    assert_eq!(observable(&m, &e), before, "an op acted");
    for b in bfns {
        assert!(e.lookup(DomId::DOM0, ContextId::DEFAULT, b).is_ok());
    }
    check_invariants(&mut m, &e).unwrap();
}

/// What is left: the header lost while the call runs (the caller unmaps
/// its own buffer meanwhile). The ops act and each status is written, as
/// design/abi.md says; only `nr_done` is as sent.
#[test]
fn a_header_lost_during_the_call_leaves_the_statuses_written() {
    let (mut m, e) = host();
    let (base, ops_addr, bfns) = stage_three_unmaps(&mut m, &e);
    // Statuses the call must overwrite (answers are 0 or -errno).
    let mut ops = [PvIommuOp::new_zeroed(); 3];
    m.copy_from_guest(ops_addr, ops.as_mut_bytes()).unwrap();
    ops.iter_mut().for_each(|op| op.status = 1);
    m.copy_to_guest(ops_addr, ops.as_bytes()).unwrap();
    let written_once = Service::CopyToGuestAtAfter(nr_done_at(base), 1);
    let ret = dom0_batch_failing(&mut m, &e, base, written_once);
    assert_eq!(ret, -14, "EFAULT");
    let mut hdr = PvIommuBatch::new_zeroed();
    m.copy_from_guest(base, hdr.as_mut_bytes()).unwrap();
    assert_eq!(hdr.nr_done, 0, "the header's nr_done is as sent");
    m.copy_from_guest(ops_addr, ops.as_mut_bytes()).unwrap();
    assert_eq!(ops.iter().map(|o| o.status).collect::<Vec<_>>(), [0, 0, 0]);
    for b in bfns {
        assert!(e.lookup(DomId::DOM0, ContextId::DEFAULT, b).is_err());
    }
    check_invariants(&mut m, &e).unwrap();
}

/// A header across a page boundary whose first page (`version`, `nr_ops`)
/// the caller cannot write, `nr_done` on a writable one: the call writes
/// back `nr_done` alone, so it runs and reports. (When the end of an entry
/// wrote the whole header, the ops ran and the call answered `EFAULT` with
/// `nr_done` as sent, the check before the ops having passed.)
#[test]
fn a_header_across_pages_writes_back_nr_done_alone() {
    let (mut m, e) = host();
    let (base, _, bfns) = stage_three_unmaps(&mut m, &e);
    let mut hdr = PvIommuBatch::new_zeroed();
    m.copy_from_guest(base, hdr.as_mut_bytes()).unwrap();
    let hdr_at = base + 4096 - 8; // `version`, `nr_ops` on one page, the rest on the next
    assert!(nr_done_at(hdr_at) >= base + 4096);
    m.copy_to_guest(hdr_at, hdr.as_bytes()).unwrap();
    let ret = dom0_batch_failing(&mut m, &e, hdr_at, Service::CopyToGuestAt(hdr_at));
    assert_eq!(ret, 0);
    let mut after = PvIommuBatch::new_zeroed();
    m.copy_from_guest(hdr_at, after.as_mut_bytes()).unwrap();
    assert_eq!(after.nr_done, 3);
    for b in bfns {
        assert!(e.lookup(DomId::DOM0, ContextId::DEFAULT, b).is_err());
    }
    check_invariants(&mut m, &e).unwrap();
}
