//! Security review finding (regression test): undoing a map whose result
//! cannot be copied out found its mapping by BFN alone. Between the map and
//! the undo, other vCPUs of the caller could see the BFN revoked,
//! acknowledge it and get it again for another guest's page; the undo then
//! took that new mapping down (or dropped one of its references). The undo
//! now acts only on the very install it made or shared (its tag).
use pviommu_abi::{
    cmd, Bfn, ContextId, DomId, Gfn, Permissions, PvIommuBatch, Request, INTERFACE_VERSION,
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
    reused: Option<(Bfn, Bfn)>,
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
                // Another vCPU of the mediator: its notice thread acks b, its
                // map thread maps another guest's page and is told b.
                let (b, _, _) = revoked_next(self.m, self.e).unwrap();
                let mut ack = [Request::RevokedAck {
                    context: ContextId::DEFAULT,
                    bfn: b,
                }
                .encode()];
                self.m
                    .guest_batch_all(self.e, DomId::DOM0, &mut ack)
                    .unwrap();
                assert_eq!(ack[0].status, 0);
                let other =
                    map_one(self.m, self.e, DomId::DOM0, DomId(5), 7, Permissions::RW).unwrap();
                self.reused = Some((b, other));
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
fn undo_does_not_take_down_a_reused_bfn() {
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
    let base = m.scratch_addr(DomId::DOM0).unwrap();
    let ops_addr = base + 8192;
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
    let (ret, reused) = {
        let mut h = FailOut {
            m: &mut m,
            e: &e,
            fail_at: ops_addr,
            race: Some(Gfn(5)),
            reused: None,
        };
        let r = e.hypercall(&mut h, DomId::DOM0, cmd::BATCH, base);
        (r, h.reused)
    };
    assert_eq!(ret, -14);
    let (b, other) = reused.unwrap();
    eprintln!("unreported b={b:?}, other vCPU was told {other:?} for DomId(5) gfn 7");
    let l = e.lookup(DomId::DOM0, ContextId::DEFAULT, other);
    eprintln!("lookup(other) after the undo: {l:?}");
    assert!(
        l.is_ok(),
        "the undo took down a mapping another vCPU was told about"
    );
}
