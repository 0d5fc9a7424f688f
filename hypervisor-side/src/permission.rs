//! Where permission is decided: who may map whose pages, and which pages
//! may be mapped with which access.

use crate::platform::{PageKind, Platform};
use crate::{DomId, Errno, Permissions};

/// The caller's relation to the target that allows mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallerKind {
    /// A privileged domain (control or hardware domain).
    Privileged,
    /// The device model of the target.
    DeviceModel,
    /// Neither.
    Unrelated,
}

/// Classify `caller` with respect to `target`.
pub fn caller_kind(p: &impl Platform, caller: DomId, target: DomId) -> CallerKind {
    if p.is_privileged(caller) {
        CallerKind::Privileged
    } else if p.is_device_model_of(caller, target) {
        CallerKind::DeviceModel
    } else {
        CallerKind::Unrelated
    }
}

/// May `caller` map pages of `target`? ESRCH if the target does not exist.
pub fn check_caller(p: &impl Platform, caller: DomId, target: DomId) -> Result<(), Errno> {
    if !p.domain_exists(target) {
        return Err(Errno::Srch);
    }
    if target == caller {
        // A domain's own pages are already in its context (strict mode maps
        // them 1:1); handing out a second address for them is refused.
        return Err(Errno::Inval);
    }
    match caller_kind(p, caller, target) {
        CallerKind::Privileged | CallerKind::DeviceModel => Ok(()),
        CallerKind::Unrelated => Err(Errno::Perm),
    }
}

/// May a page of this kind be mapped with these permissions?
pub fn check_page(kind: PageKind, perms: Permissions) -> Result<(), Errno> {
    match kind {
        PageKind::RamRw => Ok(()),
        PageKind::RamRo if perms.write => Err(Errno::Acces),
        PageKind::RamRo => Ok(()),
        PageKind::Grant | PageKind::XenOwned => Err(Errno::XDev),
        PageKind::Mmio => Err(Errno::NoDev),
        PageKind::NotPresent => Err(Errno::Nxio),
        PageKind::PagedOut => Err(Errno::Again),
    }
}
