//! Security review finding (regression test): a map whose result cannot be
//! copied out is undone, and the undo used to be a plain unmap. When the
//! map had been answered with a BFN the caller already held (dedup) and a
//! hook revoked that BFN in between, the undo acknowledged the revocation
//! notice and freed the BFN, so the next map of another guest's page got
//! it while the mediator's shadow still pointed at it. The undo now drops
//! only a live reference.
use pviommu_abi::{
    cmd, Bfn, ContextId, DomId, Gfn, Permissions, PvIommuBatch, PvIommuOp, Request,
    INTERFACE_VERSION,
};
use pviommu_hv::iommu::{BackendCaps, FlushGather, IommuBackend};
use pviommu_hv::platform::{DomainInfo, PageLookup, Platform, ReservedRange, XsmAction};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Errno, MemAttr, Mfn};
use pviommu_tests::*;
use zerocopy::IntoBytes;

struct FailOut<'a> {
    m: &'a mut SimMachine,
    e: &'a Engine,
    fail_at: u64,
    race: Option<Gfn>,
}
impl Platform for FailOut<'_> {
    fn copy_from_guest(&mut self, a: u64, b: &mut [u8]) -> Result<(), Errno> {
        self.m.copy_from_guest(a, b)
    }
    fn copy_to_guest(&mut self, a: u64, b: &[u8]) -> Result<(), Errno> {
        if a == self.fail_at {
            if let Some(g) = self.race.take() {
                // Another CPU: the target balloons the page out; its hook revokes.
                self.m.balloon_out(self.e, GUEST, g).unwrap();
                self.m.current = DomId::DOM0;
                return Err(Errno::Fault);
            }
        }
        self.m.copy_to_guest(a, b)
    }
    fn domain_info(&self, d: DomId) -> Option<DomainInfo> {
        self.m.domain_info(d)
    }
    fn xsm_check(&self, c: DomId, t: Option<DomId>, a: XsmAction) -> Result<(), Errno> {
        self.m.xsm_check(c, t, a)
    }
    fn get_page(&mut self, d: DomId, g: Gfn, w: bool) -> Result<PageLookup, Errno> {
        self.m.get_page(d, g, w)
    }
    fn put_page(&mut self, mfn: Mfn, w: bool) {
        self.m.put_page(mfn, w)
    }
    fn ram_end(&self) -> Mfn {
        self.m.ram_end()
    }
    fn reserved_range(&self, i: usize) -> Option<ReservedRange> {
        self.m.reserved_range(i)
    }
    fn should_preempt(&mut self) -> bool {
        false
    }
    fn random_seed(&self) -> u64 {
        self.m.random_seed()
    }
    fn notify_revoked(&mut self, o: DomId) {
        self.m.notify_revoked(o)
    }
}
impl IommuBackend for FailOut<'_> {
    fn iommu_caps(&self) -> BackendCaps {
        self.m.iommu_caps()
    }
    fn context_create(&mut self, o: DomId, c: ContextId) -> Result<(), Errno> {
        self.m.context_create(o, c)
    }
    fn context_destroy(&mut self, o: DomId, c: ContextId) {
        self.m.context_destroy(o, c)
    }
    fn iommu_map(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        mfn: Mfn,
        p: Permissions,
        a: MemAttr,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.iommu_map(o, c, b, mfn, p, a, g)
    }
    fn iommu_unmap(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.iommu_unmap(o, c, b, g)
    }
    fn iommu_flush(&mut self, o: DomId, g: &FlushGather) -> Result<(), Errno> {
        self.m.iommu_flush(o, g)
    }
}

fn revoked_next(m: &mut SimMachine, e: &Engine) -> Result<(Bfn, DomId, Gfn), i32> {
    let mut ops = [Request::RevokedNext.encode()];
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    if ops[0].status != 0 {
        return Err(ops[0].status);
    }
    Ok((Bfn(ops[0].bfn), DomId(ops[0].domid), Gfn(ops[0].gfn)))
}

#[test]
fn undo_after_a_failed_copy_out_keeps_a_known_bfns_notice() {
    let (mut m, e) = machine(Format::Vtd, 16);
    m.create_domain(
        DomId(5),
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    // The mediator maps GUEST gfn 5 and is told BFN b (its shadow table holds b).
    let b = map_one(&mut m, &e, DomId::DOM0, GUEST, 5, Permissions::RW).unwrap();
    // A batch maps the same page again (Shared onto b); its result cannot be
    // copied out, and meanwhile the guest balloons the page out.
    let base = m.scratch_addr(DomId::DOM0).unwrap();
    let ops_addr = base + 4096;
    let ops = [map_op(GUEST, 5, Permissions::RW)];
    let hdr = PvIommuBatch {
        version: INTERFACE_VERSION,
        nr_ops: 1,
        nr_done: 0,
        flags: 0,
        ops: ops_addr,
    };
    m.current = DomId::DOM0;
    m.copy_to_guest(base, hdr.as_bytes()).unwrap();
    m.copy_to_guest(ops_addr, ops.as_bytes()).unwrap();
    let _: &[PvIommuOp] = &ops;
    let ret = {
        let mut h = FailOut {
            m: &mut m,
            e: &e,
            fail_at: ops_addr,
            race: Some(Gfn(5)),
        };
        e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base)
    };
    assert_eq!(ret, -14, "EFAULT");
    // The mediator must learn that b was revoked ...
    let notice = revoked_next(&mut m, &e);
    // ... and b must not be handed out for another guest's page meanwhile.
    let other = map_one(&mut m, &e, DomId::DOM0, DomId(5), 7, Permissions::RW).unwrap();
    eprintln!("notice={notice:?} b={b:?} other={other:?}");
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
