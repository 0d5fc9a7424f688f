//! Where permission is decided: who may call at all, who may map whose
//! pages, and which pages may be mapped with which access.
//!
//! This is the one definition of the rule, for Xen and the simulator alike.
//! A platform only reports facts ([`DomainInfo`]: control domain, `target`);
//! the direction of the device-model relation is decided here. It is Xen's
//! `XSM_DM_PRIV` (`xsm_default_action` in `include/xsm/dummy.h`): the caller
//! may act on `target` if the caller is the control domain, or if the
//! *caller's* `target` field names `target` (Xen sets `stubdom->target =
//! guest`, so a device model maps its guest and never the reverse). The
//! platform's XSM hook ([`Platform::xsm_check`]) runs after this and can
//! only refuse more (a FLASK policy).

use core::cell::Cell;

use crate::iommu::DeviceFacts;
use crate::platform::{DomainInfo, PageKind, Platform, XsmAction};
use crate::{ContextId, DomId, Errno, Permissions};
use pviommu_abi::translation;

/// The caller's relation to the target that allows mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallerKind {
    /// The control domain.
    Privileged,
    /// The device model of the target (its `target` field names it).
    DeviceModel,
    /// Neither.
    Unrelated,
}

/// Classify a caller (described by `caller`) with respect to `target`.
pub fn caller_kind(caller: &DomainInfo, target: DomId) -> CallerKind {
    if caller.control {
        CallerKind::Privileged
    } else if caller.target == Some(target) {
        CallerKind::DeviceModel
    } else {
        CallerKind::Unrelated
    }
}

/// May this domain use PV-IOMMU at all? Only the control domain and device
/// models (domains with a `target`) may: everyone else is refused here,
/// before the engine takes any lock, so an unrelated domU cannot contend the
/// lock a mediator needs.
pub fn may_call(caller: Option<&DomainInfo>) -> Result<&DomainInfo, Errno> {
    match caller {
        Some(c) if !c.dying && (c.control || c.target.is_some()) => Ok(c),
        _ => Err(Errno::Perm),
    }
}

/// May `caller` map pages of `target`? Checks, in order: for the default
/// context, the caller's own IOMMU context translates BFNs
/// (`EADDRNOTAVAIL`; the engine's own contexts always do: their tables are
/// the engine's, whatever the default context is), the rule above
/// (`EPERM`, before anything about the target is revealed, so a device
/// model cannot probe which domains exist), the target exists and is alive
/// (`ESRCH`), is not the caller when mapping into the default context
/// (`EINVAL`), then the platform's XSM hook.
pub fn check_map(
    p: &impl Platform,
    caller_id: DomId,
    caller: &DomainInfo,
    target: DomId,
    context: ContextId,
) -> Result<(), Errno> {
    check_map_again(p, &Caller::new(caller_id, caller), target, context, false)
}

/// [`check_map`], for an op of a run whose earlier op of the same
/// (caller, target) passed it (`target_checked`): the parts that depend on
/// the caller and the target only (who may map whose pages, the target
/// alive, XSM) are not asked again; the parts that depend on the op's
/// context always are. Same errors, in the same order, as `check_map`.
pub fn check_map_again(
    p: &impl Platform,
    caller: &Caller<'_>,
    target: DomId,
    context: ContextId,
    target_checked: bool,
) -> Result<(), Errno> {
    if context == ContextId::DEFAULT && caller.info.translation != translation::TRANSLATES {
        return Err(Errno::AddrNotAvail);
    }
    if !target_checked {
        match caller_kind(caller.info, target) {
            CallerKind::Privileged | CallerKind::DeviceModel => {}
            CallerKind::Unrelated => return Err(Errno::Perm),
        }
        match p.domain_info(target) {
            Some(t) if !t.dying => {}
            _ => return Err(Errno::Srch),
        }
    }
    if target == caller.id && context == ContextId::DEFAULT {
        // A domain's own pages are already in its default context (strict
        // mode maps them 1:1); handing out a second address for them is
        // refused. Its other contexts start empty: a device attached to one
        // reaches the driver's own buffers (rings, descriptors) only
        // through BFNs mapped there.
        return Err(Errno::Inval);
    }
    if target_checked {
        return Ok(());
    }
    caller
        .refusals
        .xsm_allows(p, caller.id, Some(target), XsmAction::Map)
}

/// The caller of one call: who it is, the facts the call read of it once,
/// and what the security policy refused it so far in the call. One is made
/// per call (the hypercall's batch) and lent to each op, so the ops share
/// the refusals; an engine entry point called on its own makes a fresh one.
pub struct Caller<'a> {
    /// The calling domain.
    pub id: DomId,
    /// Its facts, read at the call's start.
    pub info: &'a DomainInfo,
    /// What the policy refused it in this call.
    pub(crate) refusals: PolicyRefusals,
}

impl<'a> Caller<'a> {
    /// A call of `id`'s, whose facts are `info`, with nothing refused yet.
    pub fn new(id: DomId, info: &'a DomainInfo) -> Self {
        Caller {
            id,
            info,
            refusals: PolicyRefusals::default(),
        }
    }
}

/// What the security policy refused during one hypercall, so that the
/// call's other ops asking the same are refused (`EPERM`) without asking
/// again. FLASK audits every denial on Xen's console with no rate limit,
/// and a run's ops share their target's check only while they ask alike,
/// so a batch of 1024 maps of a target the policy refuses (alternating
/// access) logged 1024 lines a call, and a batch of attaches of a device
/// it refuses as many (an audit of 2026-12-06). The answer cannot change
/// within the call: the map hook reads only the caller and the target,
/// the attach hook the caller and the device (a policy reloaded during
/// the call is the next call's). The last [`REMEMBERED`] refusals are
/// kept, maps' targets and attaches' devices alike: a device model may
/// map one target only (any other is `EPERM` by the rule, before the
/// policy is asked), and a caller alternating more refused devices than
/// that still asks once an op (a review of the change: with one kept,
/// two alternating devices were enough). Only a refusal is kept
/// (`ENOMEM`, `ESRCH` are asked again); a kept refusal mispredicted is a
/// question asked, and one predicted where there is none is a refusal.
#[derive(Default)]
pub struct PolicyRefusals {
    /// Keys of refused questions ([`refusal_key`]); 0: none.
    refused: Cell<[u64; REMEMBERED]>,
    /// Where the next refusal goes (the oldest is overwritten).
    next: Cell<u8>,
}

/// Refusals a call keeps ([`PolicyRefusals`]): 40 bytes on the stack of
/// the batch's entry, under the deepest path's budget.
pub const REMEMBERED: usize = 4;

/// The key of a question the policy refused: what it was asked about,
/// tagged by kind (never 0).
fn refusal_key(target: Option<DomId>, action: XsmAction) -> Option<u64> {
    match action {
        XsmAction::Map => target.map(|t| 1 << 32 | u64::from(t.0)),
        XsmAction::Attach(device) => Some(2 << 32 | u64::from(device.0)),
        _ => None,
    }
}

impl PolicyRefusals {
    /// [`xsm_allows`], unless the call was refused the same already.
    pub(crate) fn xsm_allows(
        &self,
        p: &impl Platform,
        caller: DomId,
        target: Option<DomId>,
        action: XsmAction,
    ) -> Result<(), Errno> {
        let key = refusal_key(target, action);
        if let Some(k) = key {
            if self.refused.get().contains(&k) {
                return Err(Errno::Perm);
            }
        }
        let answer = xsm_allows(p, caller, target, action);
        if let (Some(k), Err(Errno::Perm)) = (key, answer) {
            let mut refused = self.refused.get();
            let at = usize::from(self.next.get()) % REMEMBERED;
            if let Some(slot) = refused.get_mut(at) {
                *slot = k;
            }
            self.refused.set(refused);
            self.next.set(((at + 1) % REMEMBERED) as u8);
        }
        answer
    }
}

/// The host's security module's answer ([`Platform::xsm_check`]) in the
/// ABI's terms, the one rule every caller of the engine goes through: a
/// refusal is `EPERM` ("no privilege over the target or device"),
/// whatever the module said. Xen's FLASK answers `-EACCES`, which the ABI
/// gives to a read-only page or a guest in log-dirty mode: passed on, a
/// policy's denial would read as a migration. Passed on as they are:
/// `ENOMEM` (the policy could not be asked) and `ESRCH` (the caller or
/// target is gone).
pub(crate) fn xsm_allows(
    p: &impl Platform,
    caller: DomId,
    target: Option<DomId>,
    action: XsmAction,
) -> Result<(), Errno> {
    p.xsm_check(caller, target, action).map_err(|e| match e {
        Errno::NoMem | Errno::Srch => e,
        _ => Errno::Perm,
    })
}

/// May this caller read the host's reserved-region layout (RMRRs, PCI
/// windows, RAM holes)? The control domain only: a device model needs the
/// BFN window's bounds (in the capabilities), not the host's physical map.
pub fn may_read_regions(caller: &DomainInfo) -> Result<(), Errno> {
    may_control(caller)
}

/// The control domain's commands (the host's layout, other domains'
/// quotas, counters and entries): the control domain only, the check
/// resolved under speculation before what it guards runs (it is a plain
/// branch, fenced by some XSM policies' hooks, and only on x86).
pub fn may_control(caller: &DomainInfo) -> Result<(), Errno> {
    if !caller.control {
        return Err(Errno::Perm);
    }
    crate::nospec::block_speculation();
    Ok(())
}

/// May a page of this kind be mapped with these permissions?
pub fn check_page(kind: PageKind, perms: Permissions) -> Result<(), Errno> {
    match kind {
        PageKind::RamRw => Ok(()),
        PageKind::RamRo | PageKind::LogDirty if perms.write => Err(Errno::Acces),
        PageKind::RamRo | PageKind::LogDirty => Ok(()),
        PageKind::Grant | PageKind::XenOwned => Err(Errno::XDev),
        PageKind::Mmio => Err(Errno::NoDev),
        PageKind::NotPresent => Err(Errno::Nxio),
        PageKind::PagedOut => Err(Errno::Again),
    }
}

/// The error of a page the host looked up and did not reference: its
/// kind's, or `EXDEV` for a kind [`check_page`] passes (as a lookup that
/// classified a page usable but took no reference on it answers).
pub fn refusal(kind: PageKind, perms: Permissions) -> Errno {
    check_page(kind, perms).err().unwrap_or(Errno::XDev)
}

/// May `caller` point `device` at one of its contexts? Only a device
/// assigned to the caller (`EPERM` otherwise: it is someone else's DMA),
/// and only one the engine's context can fully describe (`EOPNOTSUPP`): its
/// own requester id (re-pointing a shared one would move its neighbours
/// too), no RMRR (its firmware's DMA would fault), no ATS (the device's own
/// translation cache would outlive the engine's flushes), and an IOMMU unit
/// that translates at all (Xen leaves some VT-d units off: the device would
/// DMA to the raw BFNs).
pub fn may_attach(caller: DomId, device: &DeviceFacts) -> Result<(), Errno> {
    if device.owner != caller {
        return Err(Errno::Perm);
    }
    if !device.own_requester_id || device.rmrr || device.ats || !device.translated {
        return Err(Errno::OpNotSupp);
    }
    Ok(())
}

/// May this caller create contexts or attach devices at all? The control
/// domain may; anyone else only with a PCI device of its own (`EPERM`
/// otherwise): it could attach nothing, and each attempt would make the
/// host take its device-assignment lock (Xen's `pcidevs_lock`) on its
/// behalf. `owns_devices` is asked only for such a caller.
pub fn may_use_contexts(
    caller: &DomainInfo,
    owns_devices: impl FnOnce() -> bool,
) -> Result<(), Errno> {
    if caller.control || owns_devices() {
        Ok(())
    } else {
        Err(Errno::Perm)
    }
}

/// What a refused attach tells `caller`: a caller other than the control
/// domain learns nothing of the host's devices, so a device that does not
/// exist is refused as one that is not its own (`EPERM`).
pub fn device_refusal(caller: &DomainInfo, e: Errno) -> Errno {
    match e {
        Errno::NoDev if !caller.control => Errno::Perm,
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(control: bool, target: Option<u16>) -> DomainInfo {
        DomainInfo {
            control,
            target: target.map(DomId),
            ..Default::default()
        }
    }

    /// Regression for the inverted device-model check on Xen (the C glue
    /// tested `target->target == caller`): the stub domain carries the
    /// relation, and only it may act on its guest.
    #[test]
    fn device_model_direction_is_the_callers_target() {
        let stubdom = info(false, Some(5));
        let guest = info(false, None);
        assert_eq!(caller_kind(&stubdom, DomId(5)), CallerKind::DeviceModel);
        assert_eq!(caller_kind(&stubdom, DomId(6)), CallerKind::Unrelated);
        assert_eq!(caller_kind(&guest, DomId(7)), CallerKind::Unrelated);
        assert!(may_call(Some(&guest)).is_err());
        assert!(may_call(Some(&stubdom)).is_ok());
        assert!(may_call(Some(&info(true, None))).is_ok());
        assert!(may_call(None).is_err());
    }
}
