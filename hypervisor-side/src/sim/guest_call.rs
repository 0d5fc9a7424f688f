//! Issuing hypercalls as a guest would: argument structures are written into
//! the caller's own RAM (a scratch area at the top of its gfns) and the engine
//! copies them in and out through the platform's guest-copy functions.

use pviommu_abi::{
    cmd, PvIommuBatch, PvIommuCaps, PvIommuEntry, PvIommuLimits, PvIommuOp, PvIommuRegion,
    PvIommuRegions, PvIommuStats, INTERFACE_VERSION,
};
use zerocopy::{FromZeros, IntoBytes};

use super::SimMachine;
use crate::platform::Platform;
use crate::{Bfn, ContextId, DomId, Engine, Errno};

/// Pages at the top of a caller's RAM used for hypercall arguments.
pub const SCRATCH_PAGES: u64 = 16;

impl SimMachine {
    /// Guest-physical address of the caller's scratch area.
    pub fn scratch_addr(&self, caller: DomId) -> Result<u64, Errno> {
        let pages = self.domain_ram_pages(caller).ok_or(Errno::Srch)?;
        let first = pages.checked_sub(SCRATCH_PAGES).ok_or(Errno::Fault)?;
        Ok(first * 4096)
    }

    fn write_scratch(&mut self, caller: DomId, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        self.current = caller;
        self.copy_to_guest(addr, bytes)
    }

    fn read_scratch(&mut self, caller: DomId, addr: u64, bytes: &mut [u8]) -> Result<(), Errno> {
        self.current = caller;
        self.copy_from_guest(addr, bytes)
    }

    /// Query capabilities as `caller`.
    pub fn guest_query_caps(
        &mut self,
        engine: &Engine,
        caller: DomId,
    ) -> Result<PvIommuCaps, Errno> {
        let base = self.scratch_addr(caller)?;
        let ret = self.hypercall(engine, caller, cmd::QUERY_CAPS, base);
        if ret != 0 {
            return Err(Errno::from_code(ret as i32).unwrap_or(Errno::Inval));
        }
        let mut caps = PvIommuCaps::new_zeroed();
        self.read_scratch(caller, base, caps.as_mut_bytes())?;
        Ok(caps)
    }

    /// Run one batch call as `caller`, starting at `nr_done`; the ops are
    /// updated with their statuses and outputs. Returns the hypercall's
    /// return value and the new `nr_done`. At most 1024 ops.
    pub fn guest_batch(
        &mut self,
        engine: &Engine,
        caller: DomId,
        ops: &mut [PvIommuOp],
        nr_done: u32,
    ) -> Result<(i64, u32), Errno> {
        let base = self.scratch_addr(caller)?;
        let ops_addr = base + 4096;
        let hdr = PvIommuBatch {
            version: INTERFACE_VERSION,
            nr_ops: ops.len() as u32,
            nr_done,
            flags: 0,
            ops: ops_addr,
        };
        self.write_scratch(caller, base, hdr.as_bytes())?;
        self.write_scratch(caller, ops_addr, ops.as_bytes())?;
        let ret = self.hypercall(engine, caller, cmd::BATCH, base);
        self.read_scratch(caller, ops_addr, ops.as_mut_bytes())?;
        let mut out = PvIommuBatch::new_zeroed();
        self.read_scratch(caller, base, out.as_mut_bytes())?;
        Ok((ret, out.nr_done))
    }

    /// Run a batch to completion, re-issuing while the engine reports it
    /// incomplete. Returns the number of calls made.
    pub fn guest_batch_all(
        &mut self,
        engine: &Engine,
        caller: DomId,
        ops: &mut [PvIommuOp],
    ) -> Result<u32, Errno> {
        let mut done = 0;
        let mut calls = 0;
        loop {
            let (ret, d) = self.guest_batch(engine, caller, ops, done)?;
            calls += 1;
            done = d;
            match ret {
                0 => return Ok(calls),
                1 => continue,
                e => return Err(Errno::from_code(e as i32).unwrap_or(Errno::Inval)),
            }
        }
    }

    /// Set `domid`'s quota as `caller` (the toolstack: `SET_LIMITS`).
    pub fn guest_set_limits(
        &mut self,
        engine: &Engine,
        caller: DomId,
        domid: DomId,
        quota: u64,
    ) -> Result<(), Errno> {
        let base = self.scratch_addr(caller)?;
        let req = PvIommuLimits {
            version: INTERFACE_VERSION,
            domid: domid.0,
            _pad0: 0,
            quota,
        };
        self.write_scratch(caller, base, req.as_bytes())?;
        match self.hypercall(engine, caller, cmd::SET_LIMITS, base) {
            0 => Ok(()),
            e => Err(Errno::from_code(e as i32).unwrap_or(Errno::Inval)),
        }
    }

    /// `PVIOMMU_CMD_stats` as `caller` about driver domain `domid`, with
    /// `flags` ([`pviommu_abi::stats_flag`]).
    pub fn guest_stats(
        &mut self,
        engine: &Engine,
        caller: DomId,
        domid: DomId,
        flags: u16,
    ) -> Result<PvIommuStats, Errno> {
        let base = self.scratch_addr(caller)?;
        let req = PvIommuStats {
            version: INTERFACE_VERSION,
            domid: domid.0,
            flags,
            ..PvIommuStats::default()
        };
        self.write_scratch(caller, base, req.as_bytes())?;
        match self.hypercall(engine, caller, cmd::STATS, base) {
            0 => {
                let mut out = PvIommuStats::default();
                self.read_scratch(caller, base, out.as_mut_bytes())?;
                Ok(out)
            }
            e => Err(Errno::from_code(e as i32).unwrap_or(Errno::Inval)),
        }
    }

    /// `ENTRY` as `caller`: the leaf entry (address zeroed) and its level
    /// for `bfn` of `domid`'s context `context`.
    pub fn guest_entry(
        &mut self,
        engine: &Engine,
        caller: DomId,
        domid: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<PvIommuEntry, Errno> {
        let base = self.scratch_addr(caller)?;
        let req = PvIommuEntry {
            version: INTERFACE_VERSION,
            domid: domid.0,
            context: context.0,
            bfn: bfn.0,
            ..PvIommuEntry::default()
        };
        self.write_scratch(caller, base, req.as_bytes())?;
        match self.hypercall(engine, caller, cmd::ENTRY, base) {
            0 => {
                let mut out = PvIommuEntry::default();
                self.read_scratch(caller, base, out.as_mut_bytes())?;
                Ok(out)
            }
            e => Err(Errno::from_code(e as i32).unwrap_or(Errno::Inval)),
        }
    }

    /// Read the reserved regions as `caller`.
    pub fn guest_reserved_regions(
        &mut self,
        engine: &Engine,
        caller: DomId,
    ) -> Result<Vec<PvIommuRegion>, Errno> {
        let base = self.scratch_addr(caller)?;
        let arr = base + 4096;
        let mut out = Vec::new();
        loop {
            let hdr = PvIommuRegions {
                version: INTERFACE_VERSION,
                start: out.len() as u32,
                nr: 64,
                total: 0,
                regions: arr,
            };
            self.write_scratch(caller, base, hdr.as_bytes())?;
            let ret = self.hypercall(engine, caller, cmd::RESERVED_REGIONS, base);
            if ret != 0 {
                return Err(Errno::from_code(ret as i32).unwrap_or(Errno::Inval));
            }
            let mut h = PvIommuRegions::new_zeroed();
            self.read_scratch(caller, base, h.as_mut_bytes())?;
            let mut regions = vec![PvIommuRegion::new_zeroed(); h.nr as usize];
            self.read_scratch(caller, arr, regions.as_mut_bytes())?;
            out.extend(regions);
            if out.len() as u32 >= h.total || h.nr == 0 {
                return Ok(out);
            }
        }
    }
}
