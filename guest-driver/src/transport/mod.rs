//! How a hypercall reaches the hypervisor. Three real transports implement
//! [`Transport`]: [`privcmd`] (Linux dom0 on Xen), [`in_process`] (the
//! embedded simulated machine) and [`remote`] (a client of the
//! `pviommu sim serve` daemon, so several processes share one simulated
//! machine).

use std::time::Duration;

use pviommu_abi::{
    Bfn, ContextId, DomId, PvIommuCaps, PvIommuEntry, PvIommuOp, PvIommuRegion, PvIommuStats,
};

use crate::Error;

#[cfg(feature = "sim")]
pub mod in_process;
pub mod privcmd;
pub mod remote;

/// The hypercall commands, carried by some mechanism.
pub trait Transport: Send {
    /// A short name for messages ("privcmd", "sim", "remote").
    fn name(&self) -> &'static str;

    /// `PVIOMMU_CMD_query_caps`.
    fn query_caps(&mut self) -> Result<PvIommuCaps, Error>;

    /// The most ops one batch call of this transport can carry (its
    /// buffer); the client splits batches at the smaller of this and the
    /// caps' `max_batch_ops` (a hypervisor booted with a larger batch than
    /// the transport's buffer must not make every call fail).
    fn max_batch_ops(&self) -> u32 {
        u32::MAX
    }

    /// One `PVIOMMU_CMD_batch` call over `ops`, starting at `nr_done`.
    /// The ops come back with their statuses and outputs. Returns the
    /// hypercall's return value (0; 1 = incomplete: call again from the
    /// returned `nr_done`; or the hypervisor's -errno) and the new
    /// `nr_done`: the ops before it ran, also in a call that failed (an
    /// `EFAULT` part way). `Err` is for the transport's own failures.
    fn batch(&mut self, ops: &mut [PvIommuOp], nr_done: u32) -> Result<(i64, u32), Error>;

    /// `PVIOMMU_CMD_reserved_regions` from index `start`, at most `max`
    /// entries. Returns the regions and the total count.
    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), Error>;

    /// `PVIOMMU_CMD_set_limits`: the toolstack sets `domid`'s BFN quota
    /// (0: the boot default). Only the control domain may.
    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error>;

    /// `PVIOMMU_CMD_stats` (ABI 1.2): driver domain `domid`'s counters and
    /// the hypervisor's time breakdown, with `flags` from
    /// [`pviommu_abi::stats_flag`]. Only the control domain may.
    fn stats(&mut self, domid: DomId, flags: u16) -> Result<PvIommuStats, Error> {
        let _ = (domid, flags);
        Err(Error::InvalidArgument(format!(
            "the {} transport does not carry PVIOMMU_CMD_stats",
            self.name()
        )))
    }

    /// `PVIOMMU_CMD_entry` (ABI 1.3): the leaf entry of `bfn` in driver
    /// domain `domid`'s context `context` (not the default one), address
    /// bits zeroed. Only the control domain may.
    fn entry(&mut self, domid: DomId, context: ContextId, bfn: Bfn) -> Result<PvIommuEntry, Error> {
        let _ = (domid, context, bfn);
        Err(Error::InvalidArgument(format!(
            "the {} transport does not carry PVIOMMU_CMD_entry",
            self.name()
        )))
    }

    /// Revocations the other side pushed since the last call (the daemon
    /// does; hypercall transports have no push and return none). The
    /// client drops these BFNs from its cache at once; they are still
    /// acknowledged through `revoked_next`/`revoked_ack`.
    fn take_revocations(&mut self) -> Vec<(ContextId, Bfn)> {
        Vec::new()
    }

    /// Wait up to `timeout` for pushed revocations: `Ok(true)` when some
    /// arrived. Transports without push return `Ok(false)` at once (on Xen
    /// a mediator waits on [`crate::notify::RevocationEvents`]).
    fn wait_revocations(&mut self, _timeout: Duration) -> Result<bool, Error> {
        Ok(false)
    }

    /// The simulated machine, when this transport is the in-process one.
    #[cfg(feature = "sim")]
    fn in_process(&mut self) -> Option<&mut in_process::InProcess> {
        None
    }
}

impl Transport for Box<dyn Transport> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn query_caps(&mut self) -> Result<PvIommuCaps, Error> {
        (**self).query_caps()
    }
    fn max_batch_ops(&self) -> u32 {
        (**self).max_batch_ops()
    }
    fn batch(&mut self, ops: &mut [PvIommuOp], nr_done: u32) -> Result<(i64, u32), Error> {
        (**self).batch(ops, nr_done)
    }
    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), Error> {
        (**self).reserved_regions(start, max)
    }
    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error> {
        (**self).set_limits(domid, quota)
    }
    fn stats(&mut self, domid: DomId, flags: u16) -> Result<PvIommuStats, Error> {
        (**self).stats(domid, flags)
    }
    fn entry(&mut self, domid: DomId, context: ContextId, bfn: Bfn) -> Result<PvIommuEntry, Error> {
        (**self).entry(domid, context, bfn)
    }
    fn take_revocations(&mut self) -> Vec<(ContextId, Bfn)> {
        (**self).take_revocations()
    }
    fn wait_revocations(&mut self, timeout: Duration) -> Result<bool, Error> {
        (**self).wait_revocations(timeout)
    }
    #[cfg(feature = "sim")]
    fn in_process(&mut self) -> Option<&mut in_process::InProcess> {
        (**self).in_process()
    }
}
