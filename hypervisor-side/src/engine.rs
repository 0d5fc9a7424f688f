//! The engine's state: per driver domain, a mapping table BFN -> (domid, gfn,
//! mfn, perms, attr) and a reverse index (domid, gfn, context, flags) -> BFN
//! with a reference count; the ops that change them; and revocation.
//!
//! Page references are released only after the IOTLB flush that makes the
//! device forget the page ([`Engine::finish`]), never before.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::bfn_alloc::{BfnAllocator, BfnWindow};
use crate::config::{Config, MAX_CONTEXTS, X86_MSI_WINDOW};
use crate::iommu::{FlushGather, IommuBackend};
use crate::permission::{check_caller, check_page};
use crate::platform::{Platform, ReservedRange};
use crate::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions};
use pviommu_abi::{region_kind, MapRequest};

/// Everything the engine needs from the hypervisor.
pub trait Hypervisor: Platform + IommuBackend {}
impl<T: Platform + IommuBackend> Hypervisor for T {}

/// One live BFN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapping {
    /// Context holding it.
    pub context: ContextId,
    /// Foreign domain.
    pub domid: DomId,
    /// Foreign frame.
    pub gfn: Gfn,
    /// Machine frame (never leaves the hypervisor side).
    pub mfn: Mfn,
    /// Access.
    pub perms: Permissions,
    /// Memory attribute.
    pub attr: MemAttr,
    /// Map requests not yet unmapped.
    pub refs: u32,
}

type ReverseKey = (DomId, Gfn, ContextId, Permissions, MemAttr);

/// A driver domain's state.
#[derive(Debug)]
pub struct DriverDomain {
    contexts: BTreeSet<ContextId>,
    mappings: BTreeMap<Bfn, Mapping>,
    reverse: BTreeMap<ReverseKey, Bfn>,
    bfns: BfnAllocator,
}

impl DriverDomain {
    /// Live mappings (distinct BFNs).
    pub fn mappings(&self) -> &BTreeMap<Bfn, Mapping> {
        &self.mappings
    }
    /// Contexts, the default one included.
    pub fn contexts(&self) -> &BTreeSet<ContextId> {
        &self.contexts
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    window: BfnWindow,
    drivers: BTreeMap<DomId, DriverDomain>,
    /// Page references to drop after the next flush.
    pending_release: Vec<(Mfn, bool)>,
    gather: FlushGather,
}

impl Engine {
    /// An engine for the host `h` describes.
    pub fn new(config: Config, h: &impl Hypervisor) -> Result<Engine, Errno> {
        let mut reserved = Vec::new();
        let msi = ReservedRange {
            start: X86_MSI_WINDOW.0,
            nr: X86_MSI_WINDOW.1,
            kind: region_kind::MSI,
        };
        reserved.try_reserve(8).map_err(|_| Errno::NoMem)?;
        reserved.push(msi);
        // Bounded: a platform reports a handful of ranges.
        for i in 0..256 {
            match h.reserved_range(i) {
                Some(r) if r != msi => {
                    reserved.try_reserve(1).map_err(|_| Errno::NoMem)?;
                    reserved.push(r)
                }
                Some(_) => {}
                None => break,
            }
        }
        let window = BfnWindow::new(h.ram_end().0, h.iommu_caps().address_bits, reserved)?;
        Ok(Engine {
            config,
            window,
            drivers: BTreeMap::new(),
            pending_release: Vec::new(),
            gather: FlushGather::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The BFN window.
    pub fn window(&self) -> &BfnWindow {
        &self.window
    }
    /// A driver domain's state, if it has any.
    pub fn driver(&self, domid: DomId) -> Option<&DriverDomain> {
        self.drivers.get(&domid)
    }
    /// Every driver domain with state.
    pub fn drivers(&self) -> impl Iterator<Item = (&DomId, &DriverDomain)> {
        self.drivers.iter()
    }

    fn driver_mut<'a>(
        drivers: &'a mut BTreeMap<DomId, DriverDomain>,
        window: &BfnWindow,
        caller: DomId,
    ) -> &'a mut DriverDomain {
        drivers.entry(caller).or_insert_with(|| DriverDomain {
            contexts: BTreeSet::from([ContextId::DEFAULT]),
            mappings: BTreeMap::new(),
            reverse: BTreeMap::new(),
            bfns: BfnAllocator::new(window.clone()),
        })
    }

    /// Map a foreign frame for `caller`. The same (domid, gfn, context,
    /// perms, attr) mapped again returns the same BFN with one more reference.
    pub fn map(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
        req: &MapRequest,
    ) -> Result<Bfn, Errno> {
        check_caller(h, caller, req.domid)?;
        if req.grant {
            // Designed in the ABI; no backend offers PVIOMMU_FEAT_GRANT yet.
            return Err(Errno::OpNotSupp);
        }
        let caps = h.iommu_caps();
        if caps.features & req.attr.required_feature() != req.attr.required_feature() {
            return Err(Errno::OpNotSupp);
        }
        let quota = self.config.quota;
        let dd = Self::driver_mut(&mut self.drivers, &self.window, caller);
        if !dd.contexts.contains(&req.context) {
            return Err(Errno::NoEnt);
        }
        let key = (req.domid, req.gfn, req.context, req.perms, req.attr);
        if let Some(&bfn) = dd.reverse.get(&key) {
            let m = dd.mappings.get_mut(&bfn).ok_or(Errno::Inval)?;
            m.refs = m.refs.checked_add(1).ok_or(Errno::NoSpc)?;
            return Ok(bfn);
        }
        if dd.mappings.len() as u64 >= quota {
            return Err(Errno::NoSpc);
        }
        let page = h.get_page(req.domid, req.gfn, req.perms.write)?;
        if let Err(e) = check_page(page.kind, req.perms) {
            if let Some(mfn) = page.mfn {
                h.put_page(mfn, req.perms.write);
            }
            return Err(e);
        }
        let Some(mfn) = page.mfn else {
            return Err(Errno::XDev);
        };
        let bfn = match dd.bfns.alloc() {
            Ok(b) => b,
            Err(e) => {
                h.put_page(mfn, req.perms.write);
                return Err(e);
            }
        };
        if let Err(e) = h.iommu_map(
            caller,
            req.context,
            bfn,
            mfn,
            req.perms,
            req.attr,
            &mut self.gather,
        ) {
            dd.bfns.free(bfn);
            h.put_page(mfn, req.perms.write);
            return Err(e);
        }
        let mapping = Mapping {
            context: req.context,
            domid: req.domid,
            gfn: req.gfn,
            mfn,
            perms: req.perms,
            attr: req.attr,
            refs: 1,
        };
        dd.mappings.insert(bfn, mapping);
        dd.reverse.insert(key, bfn);
        Ok(bfn)
    }

    /// Check that `bfn` is live in `context` of `caller` (what an unmap will
    /// act on), without changing anything.
    pub fn lookup(&self, caller: DomId, context: ContextId, bfn: Bfn) -> Result<Mapping, Errno> {
        let dd = self.drivers.get(&caller).ok_or(Errno::NoEnt)?;
        match dd.mappings.get(&bfn) {
            Some(m) if m.context == context => Ok(*m),
            _ => Err(Errno::NoEnt),
        }
    }

    /// Drop one reference to `bfn`; the last one unmaps it.
    pub fn unmap(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        self.lookup(caller, context, bfn)?;
        let dd = self.drivers.get_mut(&caller).ok_or(Errno::NoEnt)?;
        let m = dd.mappings.get_mut(&bfn).ok_or(Errno::NoEnt)?;
        if m.refs > 1 {
            m.refs -= 1;
            return Ok(());
        }
        h.iommu_unmap(caller, context, bfn, &mut self.gather)?;
        Self::forget(dd, &mut self.pending_release, bfn)
    }

    /// Remove a mapping whose IOMMU entry is already gone; its page is
    /// released after the next flush.
    fn forget(
        dd: &mut DriverDomain,
        pending: &mut Vec<(Mfn, bool)>,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        let m = dd.mappings.remove(&bfn).ok_or(Errno::NoEnt)?;
        dd.reverse
            .remove(&(m.domid, m.gfn, m.context, m.perms, m.attr));
        dd.bfns.free(bfn);
        pending.try_reserve(1).map_err(|_| Errno::NoMem)?;
        pending.push((m.mfn, m.perms.write));
        Ok(())
    }

    /// Create a context for `caller`.
    pub fn context_create(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
    ) -> Result<ContextId, Errno> {
        let max = h.iommu_caps().max_contexts.min(MAX_CONTEXTS);
        if max <= 1 {
            return Err(Errno::OpNotSupp);
        }
        let dd = Self::driver_mut(&mut self.drivers, &self.window, caller);
        let id = (1..max)
            .map(ContextId)
            .find(|c| !dd.contexts.contains(c))
            .ok_or(Errno::NoSpc)?;
        h.context_create(caller, id)?;
        dd.contexts.insert(id);
        Ok(id)
    }

    /// Check that `context` of `caller` can be destroyed.
    pub fn context_destroy_check(&self, caller: DomId, context: ContextId) -> Result<(), Errno> {
        let dd = self.drivers.get(&caller).ok_or(Errno::NoEnt)?;
        if context == ContextId::DEFAULT || !dd.contexts.contains(&context) {
            return Err(Errno::NoEnt);
        }
        if dd.mappings.values().any(|m| m.context == context) {
            return Err(Errno::Busy);
        }
        Ok(())
    }

    /// Destroy an empty context.
    pub fn context_destroy(
        &mut self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        self.context_destroy_check(caller, context)?;
        h.context_destroy(caller, context);
        if let Some(dd) = self.drivers.get_mut(&caller) {
            dd.contexts.remove(&context);
        }
        Ok(())
    }

    /// Flush the IOTLB for everything gathered, then release the page
    /// references of unmapped pages: the device cannot reach them any more.
    pub fn finish(&mut self, h: &mut impl Hypervisor, caller: DomId) {
        if !self.gather.is_empty() {
            h.iommu_flush(caller, &self.gather);
            self.gather.ranges.clear();
        }
        for (mfn, writable) in self.pending_release.drain(..) {
            h.put_page(mfn, writable);
        }
    }

    /// Revoke every BFN in every driver domain that points at `domid`'s page
    /// `gfn` (the page left the p2m).
    pub fn gfn_removed(&mut self, h: &mut impl Hypervisor, domid: DomId, gfn: Gfn) {
        self.revoke_where(h, |m| m.domid == domid && m.gfn == gfn);
    }

    /// A domain is dying: revoke every BFN pointing at its pages, and drop
    /// everything it held as a driver domain.
    pub fn domain_dying(&mut self, h: &mut impl Hypervisor, domid: DomId) {
        self.revoke_where(h, |m| m.domid == domid);
        self.revoke_in(h, domid, |_| true);
        if let Some(dd) = self.drivers.remove(&domid) {
            for ctx in dd.contexts.iter().filter(|c| **c != ContextId::DEFAULT) {
                h.context_destroy(domid, *ctx);
            }
        }
    }

    /// Revoke, in every driver domain, the mappings `pred` selects.
    fn revoke_where(&mut self, h: &mut impl Hypervisor, pred: impl Fn(&Mapping) -> bool) {
        let owners: Vec<DomId> = self.drivers.keys().copied().collect();
        for owner in owners {
            self.revoke_in(h, owner, &pred);
        }
    }

    /// Revoke `owner`'s mappings that `pred` selects: unmap, flush once,
    /// then release their pages.
    fn revoke_in(
        &mut self,
        h: &mut impl Hypervisor,
        owner: DomId,
        pred: impl Fn(&Mapping) -> bool,
    ) {
        let Some(dd) = self.drivers.get_mut(&owner) else {
            return;
        };
        let victims: Vec<(Bfn, ContextId)> = dd
            .mappings
            .iter()
            .filter(|(_, m)| pred(m))
            .map(|(b, m)| (*b, m.context))
            .collect();
        if victims.is_empty() {
            return;
        }
        for (bfn, ctx) in victims {
            let _ = h.iommu_unmap(owner, ctx, bfn, &mut self.gather);
            let _ = Self::forget(dd, &mut self.pending_release, bfn);
        }
        self.finish(h, owner);
    }
}
