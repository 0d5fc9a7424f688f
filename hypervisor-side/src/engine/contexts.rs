//! IOMMU contexts other than the default one: page tables the engine writes
//! itself (with [`crate::pgtable`]) into frames the backend gives it, and the
//! caller's PCI devices pointed at them.
//!
//! The default context (0) is the host's: Xen's own tables of the driver
//! domain, written through `iommu_map`. A context the caller creates is the
//! engine's: an [`IoPageTable`] in the backend's [`TableMemory`], tagged with
//! an IOMMU domain id ([`HwContext`]) and flushed by that tag. A device
//! walks it only once attached ([`Engine::context_attach`]); maps into it
//! take the same checks, references, quota and revocation as the default
//! context, since both go through the one slot table of the driver domain.
//!
//! # Locks
//! Attach, detach, destroy and a driver domain's teardown take the
//! backend's devices lock (Xen's `pcidevs_lock`) *before* the driver cell's
//! lock, because Xen calls [`Engine::device_leaving`] with `pcidevs_lock`
//! held: the order is `devices lock -> driver lock` everywhere, and nothing
//! under a driver lock takes the devices lock.

use lock_api::RawMutex;

use super::{Driver, Engine, Hypervisor};
use crate::iommu::{FlushGather, HwContext, IommuBackend, OwnTables, TableFormat};
use crate::permission::may_attach;
use crate::pgtable::lpae::Lpae;
use crate::pgtable::vtd::{Vtd, VtdNoSnoop};
use crate::pgtable::{IoPageTable, PageTableFormat, TableMemory, TableOptions};
use crate::storage::try_push;
use crate::{Bfn, ContextId, DomId, Errno, MemAttr, Mfn, Permissions, Sbdf};

/// Devices one context may have attached.
pub const MAX_DEVICES_PER_CONTEXT: usize = 8;

/// The tables of one of the engine's contexts, in the backend's format.
pub(crate) enum ContextTables {
    /// VT-d with snoop control.
    Vtd(IoPageTable<Vtd>),
    /// VT-d without snoop control.
    VtdNoSnoop(IoPageTable<VtdNoSnoop>),
    /// Arm LPAE stage 2.
    Lpae(IoPageTable<Lpae>),
}

macro_rules! each_format {
    ($tables:expr, $t:ident => $body:expr) => {
        match $tables {
            ContextTables::Vtd($t) => $body,
            ContextTables::VtdNoSnoop($t) => $body,
            ContextTables::Lpae($t) => $body,
        }
    };
}

impl ContextTables {
    fn new(mem: &mut impl TableMemory, own: OwnTables) -> Result<Self, Errno> {
        let options = TableOptions {
            levels: own.levels,
            // See TableOptions::superpages: not on tables a real IOMMU walks.
            superpages: false,
        };
        Ok(match own.format {
            TableFormat::Vtd {
                snoop_control: true,
            } => ContextTables::Vtd(IoPageTable::with_options(mem, options)?),
            TableFormat::Vtd {
                snoop_control: false,
            } => ContextTables::VtdNoSnoop(IoPageTable::with_options(mem, options)?),
            TableFormat::Lpae => ContextTables::Lpae(IoPageTable::with_options(mem, options)?),
        })
    }
    pub(crate) fn root(&self) -> Mfn {
        each_format!(self, t => t.root())
    }
    fn map(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        each_format!(self, t => t.map(mem, bfn, mfn, perms, attr))
    }
    fn unmap(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        each_format!(self, t => t.unmap(mem, bfn))
    }
    fn release_freed(&mut self, mem: &mut impl TableMemory) {
        each_format!(self, t => t.release_freed(mem))
    }
    fn destroy(self, mem: &mut impl TableMemory) {
        each_format!(self, t => t.destroy(mem))
    }
    /// The leaf entry of `bfn` with its address field zeroed, its level and
    /// its [`entry_format`](pviommu_abi::entry_format).
    fn leaf_bits(&self, mem: &impl TableMemory, bfn: Bfn) -> Option<LeafBits> {
        fn shown<F: PageTableFormat>(
            t: &IoPageTable<F>,
            mem: &impl TableMemory,
            bfn: Bfn,
        ) -> Option<LeafBits> {
            t.leaf(mem, bfn).map(|(level, raw)| LeafBits {
                level,
                format: F::ENTRY_FORMAT,
                bits: raw & !F::ADDRESS_MASK,
            })
        }
        each_format!(self, t => shown(t, mem, bfn))
    }
    /// What the tables say about `bfn` (software walk).
    pub(crate) fn translate(
        &self,
        mem: &impl TableMemory,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        each_format!(self, t => t.translate(mem, bfn))
    }
}

/// A leaf entry as `PVIOMMU_CMD_entry` shows it: no machine address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafBits {
    /// Level of the leaf (1: 4 KiB).
    pub level: u32,
    /// An [`entry_format`](pviommu_abi::entry_format) code.
    pub format: u16,
    /// The entry with its address field zeroed.
    pub bits: u64,
}

/// One of the engine's contexts of a driver domain.
pub(crate) struct OwnContext {
    pub(crate) id: ContextId,
    pub(crate) tables: ContextTables,
    pub(crate) hw: HwContext,
    /// Attached devices.
    pub(crate) devices: [Option<Sbdf>; MAX_DEVICES_PER_CONTEXT],
}

impl core::fmt::Debug for OwnContext {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OwnContext")
            .field("id", &self.id)
            .field("root", &self.tables.root())
            .field("hw", &self.hw)
            .field("devices", &self.devices)
            .finish()
    }
}

impl OwnContext {
    fn attached(&self) -> impl Iterator<Item = Sbdf> + '_ {
        self.devices.iter().flatten().copied()
    }
}

/// The engine's contexts of one driver domain, and the way every IOMMU
/// change of the driver domain goes: the default context to the backend,
/// the others to the engine's tables.
impl super::DriverDomain {
    fn own(&self, ctx: ContextId) -> Option<&OwnContext> {
        self.own.iter().find(|c| c.id == ctx)
    }
    fn own_mut(&mut self, ctx: ContextId) -> Option<&mut OwnContext> {
        self.own.iter_mut().find(|c| c.id == ctx)
    }
    /// The context `device` is attached to, if any.
    pub fn device_context(&self, device: Sbdf) -> Option<ContextId> {
        self.own
            .iter()
            .find(|c| c.attached().any(|d| d == device))
            .map(|c| c.id)
    }
    /// Devices attached to `ctx`.
    pub fn attached_devices(&self, ctx: ContextId) -> impl Iterator<Item = Sbdf> + '_ {
        self.own(ctx).into_iter().flat_map(OwnContext::attached)
    }
    /// The 4-level root of one of the engine's contexts (for tools that walk
    /// the raw tables).
    pub fn context_root(&self, ctx: ContextId) -> Option<Mfn> {
        self.own(ctx).map(|c| c.tables.root())
    }
    /// What the engine's tables of `ctx` say about `bfn`.
    pub fn context_translate(
        &self,
        mem: &impl TableMemory,
        ctx: ContextId,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        self.own(ctx)?.tables.translate(mem, bfn)
    }

    /// Map `bfn` -> `mfn` in `ctx`; the change goes into the gather.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn iommu_map(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        if ctx == ContextId::DEFAULT {
            return h.iommu_map(self.domid, ctx, bfn, mfn, perms, attr, &mut self.gather);
        }
        let own = self
            .own
            .iter_mut()
            .find(|c| c.id == ctx)
            .ok_or(Errno::NoEnt)?;
        own.tables.map(h, bfn, mfn, perms, attr)?;
        // A not-present -> present change needs a flush where the IOMMU
        // caches non-present entries (VT-d caching mode); always flushed.
        self.gather.add(ctx, bfn, 0)
    }

    /// Unmap `bfn` of `ctx`; the change goes into the gather.
    pub(crate) fn iommu_unmap(
        &mut self,
        h: &mut impl IommuBackend,
        ctx: ContextId,
        bfn: Bfn,
    ) -> Result<(), Errno> {
        if ctx == ContextId::DEFAULT {
            return h.iommu_unmap(self.domid, ctx, bfn, &mut self.gather);
        }
        let own = self
            .own
            .iter_mut()
            .find(|c| c.id == ctx)
            .ok_or(Errno::NoEnt)?;
        own.tables.unmap(h, bfn)?;
        self.gather.add(ctx, bfn, 0)
    }

    /// Flush everything gathered: the default context through the backend,
    /// each of the engine's contexts by its tag, after which the tables
    /// its unmaps emptied are freed. On `Err` the gather is kept (flushing
    /// twice is harmless) and no page may be released.
    pub(crate) fn iommu_flush(&mut self, h: &mut impl IommuBackend) -> Result<(), Errno> {
        let mut result = Ok(());
        let mut default = FlushGather::default();
        for r in self.gather.ranges() {
            if r.context == ContextId::DEFAULT {
                default.add(r.context, r.first, r.flags)?;
                default.add(r.context, r.last, r.flags)?;
            } else if let Some(own) = self.own.iter().find(|c| c.id == r.context) {
                if let Err(e) = h.hw_flush(own.hw, r.first, r.last) {
                    result = Err(e);
                }
            }
        }
        if !default.is_empty() {
            h.iommu_flush(self.domid, &default)?;
        }
        result?;
        for own in self.own.iter_mut() {
            own.tables.release_freed(h);
        }
        Ok(())
    }
}

impl<L: RawMutex> Engine<L> {
    /// Create a context for `caller`: tables of the engine's, tagged by
    /// the backend.
    pub fn context_create(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
    ) -> Result<ContextId, Errno> {
        let caps = h.iommu_caps();
        let max = caps.max_contexts.min(crate::config::MAX_CONTEXTS);
        let Some(own_tables) = caps.own_tables.filter(|_| max > 1) else {
            return Err(Errno::OpNotSupp);
        };
        // Full already? Answered before the devices lock (checked again
        // under it).
        let full = self
            .lock_driver(caller)
            .is_some_and(|d| (1..max).all(|c| d.dd.has_context(ContextId(c))));
        if full {
            return Err(Errno::NoSpc);
        }
        // The tag is allocated under the devices lock, which comes first.
        h.devices_lock();
        let r = match self.lock_or_claim(caller) {
            Ok(mut d) => {
                let r = self.context_create_locked(&mut d, h, own_tables, max);
                self.put_driver(d);
                r
            }
            Err(e) => Err(e),
        };
        h.devices_unlock();
        r
    }

    fn context_create_locked(
        &self,
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        own_tables: OwnTables,
        max: u32,
    ) -> Result<ContextId, Errno> {
        let id = (1..max)
            .map(ContextId)
            .find(|c| !d.dd.has_context(*c))
            .ok_or(Errno::NoSpc)?;
        d.dd.own.try_reserve(1).map_err(|_| Errno::NoMem)?;
        let tables = ContextTables::new(h, own_tables)?;
        let hw = match h.hw_context_create(d.dd.domid, id, tables.root()) {
            Ok(hw) => hw,
            Err(e) => {
                // No device ever pointed at them: free at once.
                tables.destroy(h);
                return Err(e);
            }
        };
        // Cannot fail: reserved above.
        let _ = try_push(
            &mut d.dd.own,
            OwnContext {
                id,
                tables,
                hw,
                devices: [None; MAX_DEVICES_PER_CONTEXT],
            },
        );
        d.dd.contexts |= 1 << id.0;
        Ok(id)
    }

    /// Destroy an empty context (no BFN in any state, no device attached).
    pub fn context_destroy(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
    ) -> Result<(), Errno> {
        self.devices_then_driver(h, caller, context, |d, h| {
            Self::destroy_check_locked(&d.dd, context)?;
            Self::drop_context(d, h, context)
        })
    }

    /// Run `f` on `caller`'s state with the devices lock and then its
    /// cell's lock held: the order Xen's `pviommu_device_leaving()` hook
    /// (entered with `pcidevs_lock` held) needs. `ENOENT` if the caller has
    /// no context `context` of the engine's: checked first without the
    /// devices lock, so such a caller cannot make Xen's `pcidevs_lock` busy
    /// (and again under it, by `f`).
    fn devices_then_driver<H: Hypervisor, R>(
        &self,
        h: &mut H,
        caller: DomId,
        context: ContextId,
        f: impl FnOnce(&mut Driver<'_, L>, &mut H) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        if self
            .lock_driver(caller)
            .is_none_or(|d| d.dd.own(context).is_none())
        {
            return Err(Errno::NoEnt);
        }
        h.devices_lock();
        let r = match self.lock_driver(caller) {
            Some(mut d) => {
                let r = f(&mut d, h);
                self.put_driver(d);
                r
            }
            None => Err(Errno::NoEnt),
        };
        h.devices_unlock();
        r
    }

    /// Take `context` down: detach its devices, flush, free the tables and
    /// the tag. Devices lock and the cell's lock held. `Err(Busy)` when a
    /// device could not be moved off the tables: then nothing is freed
    /// (the caller retries; a device never walks freed tables).
    fn drop_context(
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        context: ContextId,
    ) -> Result<(), Errno> {
        // detach_locked's rule (EBUSY keeps the device and so the tables),
        // over every slot at once. Calling detach_locked per device instead
        // left swap_remove's bounds check below as a reachable panic in the
        // Xen object (build-engine.sh refuses it).
        let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
        for slot in own.devices.iter_mut() {
            if let Some(device) = *slot {
                if let Err(Errno::Busy) = h.device_detach(device, own.hw) {
                    return Err(Errno::Busy);
                }
                *slot = None;
            }
        }
        // Nothing is mapped (checked), but entries unmapped since the last
        // flush may still be cached under the tag: flush, and give the tag
        // back, before anything is freed; if either fails, keep it all.
        let hw = own.hw;
        if h.hw_flush(hw, Bfn(0), Bfn(u64::MAX >> 12)).is_err() || h.hw_context_destroy(hw).is_err()
        {
            return Err(Errno::Busy);
        }
        let Some(pos) = d.dd.own.iter().position(|c| c.id == context) else {
            return Err(Errno::NoEnt);
        };
        let own = d.dd.own.swap_remove(pos);
        own.tables.destroy(h);
        d.dd.contexts &= !(1 << context.0);
        Ok(())
    }

    /// The leaf entry a device attached to `context` of driver domain
    /// `domid` finds for `bfn`, address field zeroed, and its level
    /// (`PVIOMMU_CMD_entry`). `ENOENT` for no such context (the default
    /// one is the host's) or no mapping there.
    pub fn entry_bits(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<LeafBits, Errno> {
        let d = self.lock_driver(domid).ok_or(Errno::NoEnt)?;
        d.dd.own(context)
            .and_then(|c| c.tables.leaf_bits(h, bfn))
            .ok_or(Errno::NoEnt)
    }

    /// Point `device` (the caller's) at `context`.
    pub fn context_attach(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        self.devices_then_driver(h, caller, context, |d, h| {
            let facts = h.device_facts(device).ok_or(Errno::NoDev)?;
            may_attach(caller, &facts)?;
            if d.dd.device_context(device).is_some() {
                return Err(Errno::Busy);
            }
            let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
            let free = own
                .devices
                .iter()
                .position(Option::is_none)
                .ok_or(Errno::NoSpc)?;
            h.device_attach(device, own.hw, own.tables.root())?;
            if let Some(slot) = own.devices.get_mut(free) {
                *slot = Some(device);
            }
            Ok(())
        })
    }

    /// Check that `device` is attached to `context` of `caller`.
    pub fn context_detach_check(
        &self,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let d = self.lock_driver(caller).ok_or(Errno::NoEnt)?;
        if d.dd.attached_devices(context).any(|x| x == device) {
            Ok(())
        } else {
            Err(Errno::NoEnt)
        }
    }

    /// Put `device`, attached to `context`, back in its owner's default
    /// context.
    pub fn context_detach(
        &self,
        h: &mut impl Hypervisor,
        caller: DomId,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        self.devices_then_driver(h, caller, context, |d, h| {
            Self::detach_locked(d, h, context, device)
        })
    }

    fn detach_locked(
        d: &mut Driver<'_, L>,
        h: &mut impl Hypervisor,
        context: ContextId,
        device: Sbdf,
    ) -> Result<(), Errno> {
        let own = d.dd.own_mut(context).ok_or(Errno::NoEnt)?;
        let hw = own.hw;
        let slot = own
            .devices
            .iter_mut()
            .find(|s| **s == Some(device))
            .ok_or(Errno::NoEnt)?;
        match h.device_detach(device, hw) {
            // Still on the tables: it stays recorded, so they stay too.
            Err(Errno::Busy) => Err(Errno::Busy),
            // Otherwise it walks none of them any more (on any other error
            // its context entry was cleared: its DMA is blocked).
            r => {
                *slot = None;
                r
            }
        }
    }

    /// Xen is about to move `device` away from `owner` (deassignment,
    /// hot-unplug): if it is attached to one of `owner`'s contexts, put it
    /// back in the default context first, so Xen finds the device where it
    /// left it. Called with the devices lock held.
    pub fn device_leaving(&self, h: &mut impl Hypervisor, owner: DomId, device: Sbdf) {
        let Some(mut d) = self.lock_driver(owner) else {
            return;
        };
        if let Some(ctx) = d.dd.device_context(device) {
            let _ = Self::detach_locked(&mut d, h, ctx, device);
        }
        self.put_driver(d);
    }

    /// The last step of a driver domain's teardown: its contexts go, their
    /// devices back to the default context first. The caller holds the
    /// devices lock, then the cell's. `false` if a device could not be
    /// moved off a context's tables: the teardown is retried.
    pub(crate) fn teardown_contexts(&self, h: &mut impl Hypervisor, d: &mut Driver<'_, L>) -> bool {
        while let Some(ctx) = d.dd.own.last().map(|c| c.id) {
            if Self::drop_context(d, h, ctx).is_err() {
                return false;
            }
        }
        true
    }
}
