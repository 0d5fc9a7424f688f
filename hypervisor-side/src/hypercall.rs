//! Where a hypercall enters: `HYPERVISOR_pv_iommu_op(cmd, arg)`.
//!
//! The shape of Xen's own handlers: copy the argument in, validate every
//! guest-controlled value, act, copy results out; a long batch stops when the
//! platform asks and reports how far it got in the guest's own batch header
//! (`nr_done`), so re-issuing the same call — by the guest, or by Xen as a
//! continuation — resumes exactly there. No op is applied twice: an op's
//! result is copied out before `nr_done` passes it, and an op whose result
//! cannot be copied out is undone.

use pviommu_abi::{
    cmd, feature, version_major, PvIommuBatch, PvIommuCaps, PvIommuOp, PvIommuRegion,
    PvIommuRegions, Request, BATCH_INCOMPLETE, INTERFACE_VERSION,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::config::MAX_REGIONS_PER_CALL;
use crate::engine::{Engine, Hypervisor};
use crate::{ContextId, DomId, Errno};

const OP_SIZE: u64 = core::mem::size_of::<PvIommuOp>() as u64;

/// Copy a `T` in from guest address `addr`.
fn copy_in<T: FromBytes + IntoBytes>(h: &mut impl Hypervisor, addr: u64) -> Result<T, Errno> {
    let mut v = T::new_zeroed();
    h.copy_from_guest(addr, v.as_mut_bytes())?;
    Ok(v)
}

fn check_version(v: u32) -> Result<(), Errno> {
    if version_major(v) == version_major(INTERFACE_VERSION) {
        Ok(())
    } else {
        Err(Errno::Inval)
    }
}

impl Engine {
    /// The hypercall body. Returns 0, a negative errno, or
    /// [`BATCH_INCOMPLETE`] when the platform asked to stop (progress is in
    /// the guest's batch header).
    pub fn hypercall(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
        command: u32,
        arg: u64,
    ) -> i64 {
        let r = match command {
            cmd::QUERY_CAPS => self.query_caps(h, caller, arg),
            cmd::BATCH => self.batch(h, caller, arg),
            cmd::RESERVED_REGIONS => self.reserved_regions(h, arg),
            _ => Err(Errno::OpNotSupp),
        };
        match r {
            Ok(v) => v,
            Err(e) => e.negated() as i64,
        }
    }

    /// The capabilities `caller` sees.
    pub fn caps(&self, h: &impl Hypervisor, caller: DomId) -> PvIommuCaps {
        let b = h.iommu_caps();
        let contexts = b.max_contexts.clamp(1, crate::config::MAX_CONTEXTS);
        let features = (b.features & feature::ALL & !feature::CONTEXTS & !feature::GRANT)
            | if contexts > 1 { feature::CONTEXTS } else { 0 };
        PvIommuCaps {
            version: INTERFACE_VERSION,
            max_batch_ops: self.config().max_batch_ops,
            page_sizes: b.page_sizes,
            bfn_window_start: self.window().start,
            bfn_window_end: self.window().end,
            nr_reserved_regions: self.window().reserved.len() as u32,
            features,
            max_contexts: contexts,
            _pad0: 0,
            quota: self.config().quota,
            used: self.driver(caller).map_or(0, |d| d.mappings().len() as u64),
        }
    }

    fn query_caps(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
        arg: u64,
    ) -> Result<i64, Errno> {
        let caps = self.caps(h, caller);
        h.copy_to_guest(arg, caps.as_bytes())?;
        Ok(0)
    }

    fn reserved_regions(&mut self, h: &mut impl Hypervisor, arg: u64) -> Result<i64, Errno> {
        let mut hdr: PvIommuRegions = copy_in(h, arg)?;
        check_version(hdr.version)?;
        let total = self.window().reserved.len() as u32;
        let want = hdr.nr.min(MAX_REGIONS_PER_CALL);
        let mut written = 0u32;
        for (i, r) in self
            .window()
            .reserved
            .iter()
            .enumerate()
            .skip(hdr.start as usize)
            .take(want as usize)
        {
            let region = PvIommuRegion {
                start_bfn: r.start,
                nr_frames: r.nr,
                kind: r.kind,
                _pad0: 0,
            };
            let addr = (i as u64 - hdr.start as u64)
                .checked_mul(core::mem::size_of::<PvIommuRegion>() as u64)
                .and_then(|o| hdr.regions.checked_add(o))
                .ok_or(Errno::Fault)?;
            h.copy_to_guest(addr, region.as_bytes())?;
            written += 1;
        }
        hdr.nr = written;
        hdr.total = total;
        h.copy_to_guest(arg, hdr.as_bytes())?;
        Ok(0)
    }

    fn batch(&mut self, h: &mut impl Hypervisor, caller: DomId, arg: u64) -> Result<i64, Errno> {
        let mut hdr: PvIommuBatch = copy_in(h, arg)?;
        check_version(hdr.version)?;
        if hdr.flags != 0 || hdr.nr_done > hdr.nr_ops {
            return Err(Errno::Inval);
        }
        if hdr.nr_ops > self.config().max_batch_ops {
            return Err(Errno::TooBig);
        }
        if hdr.ops.checked_add(hdr.nr_ops as u64 * OP_SIZE).is_none() {
            return Err(Errno::Fault);
        }
        let first = hdr.nr_done;
        let mut result = Ok(0);
        while hdr.nr_done < hdr.nr_ops {
            if hdr.nr_done > first && h.should_preempt() {
                result = Ok(BATCH_INCOMPLETE);
                break;
            }
            let addr = hdr.ops + hdr.nr_done as u64 * OP_SIZE;
            if let Err(e) = self.run_op(h, caller, addr) {
                result = Err(e);
                break;
            }
            hdr.nr_done += 1;
        }
        // One flush for the whole batch (or the part of it done), then the
        // page references of unmapped pages go.
        self.finish(h, caller);
        h.copy_to_guest(arg, hdr.as_bytes())?;
        result
    }

    /// Run the op at guest address `addr` and write its status back.
    /// `Err` only when the guest's op array itself is inaccessible: then the
    /// op has no effect.
    fn run_op(&mut self, h: &mut impl Hypervisor, caller: DomId, addr: u64) -> Result<(), Errno> {
        let mut op: PvIommuOp = copy_in(h, addr)?;
        let request = Request::parse(&op);
        let outcome = match request {
            Err(e) => Err(e),
            Ok(Request::Map(m)) => self.map(h, caller, &m).map(|bfn| op.bfn = bfn.0),
            Ok(Request::Lookup { context, bfn }) => self.lookup(caller, context, bfn).map(|m| {
                op.domid = m.domid.0;
                op.gfn = m.gfn.0;
                op.flags =
                    m.perms.flag_bits() | (m.attr.field() << pviommu_abi::op_flags::ATTR_SHIFT);
            }),
            // Destructive ops: validate, report success, then act, so a
            // status that cannot be written leaves the state unchanged.
            Ok(Request::Unmap { context, bfn }) => self.lookup(caller, context, bfn).map(|_| ()),
            Ok(Request::ContextDestroy { context }) => self.context_destroy_check(caller, context),
            Ok(Request::ContextCreate) => self.context_create(h, caller).map(|c| op.context = c.0),
        };
        op.status = match outcome {
            Ok(()) => 0,
            Err(e) => e.negated(),
        };
        if let Err(e) = h.copy_to_guest(addr, op.as_bytes()) {
            // Undo what could not be reported.
            match (request, outcome) {
                (Ok(Request::Map(m)), Ok(())) => {
                    let _ = self.unmap(h, caller, m.context, pviommu_abi::Bfn(op.bfn));
                }
                (Ok(Request::ContextCreate), Ok(())) => {
                    let _ = self.context_destroy(h, caller, ContextId(op.context));
                }
                _ => {}
            }
            return Err(e);
        }
        if outcome.is_ok() {
            match request {
                Ok(Request::Unmap { context, bfn }) => {
                    // Checked above; the backend may still fail (e.g. no
                    // frame to split a superpage): report it in the status.
                    if let Err(e) = self.unmap(h, caller, context, bfn) {
                        op.status = e.negated();
                        h.copy_to_guest(addr, op.as_bytes())?;
                    }
                }
                Ok(Request::ContextDestroy { context }) => {
                    let _ = self.context_destroy(h, caller, context);
                }
                _ => {}
            }
        }
        Ok(())
    }
}
