//! The in-process transport: the embedded simulated machine and engine, with
//! hypercall arguments placed in the calling domain's simulated RAM exactly
//! as a guest would place them. The machine is shared ([`SharedSim`]) so a
//! guest-memory reader (shadow tables) or the simulated GPU can use it while
//! a client holds the transport.

use std::sync::{Arc, Mutex, MutexGuard};

use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, PvIommuCaps, PvIommuEntry, PvIommuOp, PvIommuRegion, Sbdf,
};
use pviommu_hv::config::Config;
use pviommu_hv::iommu::DeviceFacts;
use pviommu_hv::sim::SimMachine;
use pviommu_hv::Engine;

use super::Transport;
use crate::shadow::{GuestTableReader, ShadowError};
use crate::Error;

/// The PCI devices of dom0 on the simulated hosts the library and the
/// `pviommu` tool build (`0000:00:02.0` and `0000:00:03.0`, where QEMU puts
/// the two `edu` devices of the Xen test): each with its own requester id,
/// no RMRR, no ATS, so either can be attached to a context.
pub const SIM_DEVICES: [Sbdf; 2] = [Sbdf(0x10), Sbdf(0x18)];

/// Give dom0 of `machine` the [`SIM_DEVICES`].
pub fn add_sim_devices(machine: &mut SimMachine) {
    for device in SIM_DEVICES {
        machine.add_device(
            device,
            DeviceFacts {
                owner: DomId::DOM0,
                own_requester_id: true,
                rmrr: false,
                ats: false,
                translated: true,
            },
        );
    }
}

/// A simulated host and its engine, shareable between threads.
#[derive(Clone)]
pub struct SharedSim(Arc<Mutex<(SimMachine, Engine)>>);

impl SharedSim {
    /// Wrap a machine; the engine is created with `config`.
    pub fn new(machine: SimMachine, config: Config) -> Result<SharedSim, Error> {
        let engine = Engine::new(config, &machine).map_err(|e| Error::Hypervisor {
            what: "engine init".into(),
            errno: e,
        })?;
        Ok(SharedSim(Arc::new(Mutex::new((machine, engine)))))
    }
    /// Lock the machine and engine. A poisoned lock (a panicking thread) is
    /// taken over: the simulator's state is consistent between calls.
    pub fn lock(&self) -> MutexGuard<'_, (SimMachine, Engine)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The shared state itself (for the daemon).
    pub fn arc(&self) -> Arc<Mutex<(SimMachine, Engine)>> {
        self.0.clone()
    }
    /// A transport calling as `caller`.
    pub fn transport(&self, caller: DomId) -> InProcess {
        InProcess {
            sim: self.clone(),
            caller,
        }
    }
    /// A reader of `domid`'s memory for the shadow page-table code.
    pub fn reader(&self, domid: DomId) -> SimGuestReader {
        SimGuestReader {
            sim: self.clone(),
            domid,
        }
    }
}

/// The transport: a [`SharedSim`] called as one domain.
pub struct InProcess {
    sim: SharedSim,
    caller: DomId,
}

fn hv_err(what: &str, e: pviommu_abi::Errno) -> Error {
    Error::Hypervisor {
        what: what.to_string(),
        errno: e,
    }
}

impl InProcess {
    /// A fresh machine with its own engine, called as `caller`.
    pub fn new(machine: SimMachine, config: Config, caller: DomId) -> Result<InProcess, Error> {
        Ok(SharedSim::new(machine, config)?.transport(caller))
    }
    /// The shared machine.
    pub fn sim(&self) -> &SharedSim {
        &self.sim
    }
    /// Call as another domain from now on.
    pub fn set_caller(&mut self, caller: DomId) {
        self.caller = caller;
    }
}

impl Transport for InProcess {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn query_caps(&mut self) -> Result<PvIommuCaps, Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        m.guest_query_caps(e, self.caller)
            .map_err(|e| hv_err("query_caps", e))
    }
    fn batch(&mut self, ops: &mut [PvIommuOp], nr_done: u32) -> Result<(i64, u32), Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        let (ret, done) = m
            .guest_batch(e, self.caller, ops, nr_done)
            .map_err(|e| hv_err("batch", e))?;
        // A negative return comes back as it is, with the ops before
        // `done` run (the caller settles them).
        Ok((ret, done))
    }
    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        let all = m
            .guest_reserved_regions(e, self.caller)
            .map_err(|e| hv_err("regions", e))?;
        let total = all.len() as u32;
        Ok((
            all.into_iter()
                .skip(start as usize)
                .take(max as usize)
                .collect(),
            total,
        ))
    }
    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        m.guest_set_limits(e, self.caller, domid, quota)
            .map_err(|e| hv_err("set_limits", e))
    }
    fn stats(&mut self, domid: DomId, flags: u16) -> Result<pviommu_abi::PvIommuStats, Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        m.guest_stats(e, self.caller, domid, flags)
            .map_err(|e| hv_err("stats", e))
    }
    fn entry(&mut self, domid: DomId, context: ContextId, bfn: Bfn) -> Result<PvIommuEntry, Error> {
        let mut g = self.sim.lock();
        let (m, e) = &mut *g;
        m.guest_entry(e, self.caller, domid, context, bfn)
            .map_err(|e| {
                hv_err(
                    &format!("entry d{} context {} bfn {:#x}", domid.0, context.0, bfn.0),
                    e,
                )
            })
    }
    fn in_process(&mut self) -> Option<&mut InProcess> {
        Some(self)
    }
}

/// Reads a simulated domain's frames (its GPU page tables).
pub struct SimGuestReader {
    sim: SharedSim,
    domid: DomId,
}

impl GuestTableReader for SimGuestReader {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        let g = self.sim.lock();
        let bytes =
            g.0.read_guest(self.domid, gfn, 0, 4096)
                .map_err(|e| ShadowError::GuestRead {
                    gfn,
                    errno: e.code(),
                })?;
        for (i, w) in buf.iter_mut().enumerate() {
            *w = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }
}
