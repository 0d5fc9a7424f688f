//! Revocation: a page leaves its domain (or loses device-write permission),
//! or a domain dies. Also the flush that ends every unmap.
//!
//! The protocol the owner sees (design/xen-integration.md, "Revocation"):
//! a revoked BFN is unmapped, flushed, its page released, and the BFN stays
//! reserved as a *notice* in the owner's queue until the owner acknowledges
//! it (`REVOKED_ACK`, or an unmap answered `ESTALE`). So a mediator whose
//! shadow tables still hold the BFN reaches nothing, and nothing another
//! guest maps can appear behind it.

use core::sync::atomic::Ordering;

use lock_api::RawMutex;

use super::driver::{Notice, Slot, NONE};
use super::{Engine, EngineState, Hypervisor, Link};
use crate::{DomId, Gfn};

/// How a gfn changed ([`Engine::gfn_changed`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GfnChange {
    /// The gfn no longer points at the frame it did: revoke every mapping.
    Removed,
    /// The gfn lost device-write permission (read-only, ioreq server,
    /// log-dirty): revoke writable mappings only.
    WriteLost,
}

/// Domain teardown is not finished: call again (Xen: `-ERESTART`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Restart;

/// Slots a teardown slice visits before it yields.
const TEARDOWN_VISITS: u64 = 4096;
/// Revocations (IOMMU unmaps) a teardown slice makes before it yields.
const TEARDOWN_REVOKES: u32 = 256;

/// Teardown cursor layout: phase in bits 62-63, driver domid in 40-55,
/// slot index in 0-39.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    phase: u64,
    driver: u16,
    slot: u64,
}

const PHASE_START: u64 = 0;
const PHASE_AS_TARGET: u64 = 1;
const PHASE_AS_DRIVER: u64 = 2;
const PHASE_DONE: u64 = 3;

impl Cursor {
    /// Finished: packs to `PVIOMMU_TEARDOWN_DONE` (3 << 62).
    const DONE: Cursor = Cursor {
        phase: PHASE_DONE,
        driver: 0,
        slot: 0,
    };
    fn unpack(v: u64) -> Cursor {
        Cursor {
            phase: v >> 62,
            driver: (v >> 40) as u16,
            slot: v & ((1 << 40) - 1),
        }
    }
    fn pack(self) -> u64 {
        self.phase << 62 | (self.driver as u64) << 40 | (self.slot & ((1 << 40) - 1))
    }
}

impl<L: RawMutex> Engine<L> {
    /// Revoke the live mapping in slot `idx` of driver `pos`: unmap it in
    /// the IOMMU and queue it for the flush (then it becomes a notice), or,
    /// if the IOMMU refuses the unmap, mark it stuck with its page still
    /// referenced. Needs no memory.
    pub(super) fn revoke_slot(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        pos: usize,
        idx: u64,
    ) {
        self.take_down_live(st, h, pos, idx, true);
    }

    /// Take the live mapping in slot `idx` of driver `pos` out of the
    /// indices and the IOMMU, as the owner did not ask for: after the flush
    /// it becomes a notice (`then_revoked`) or, for a dying owner, free.
    /// An unmap the IOMMU refuses leaves it stuck, page referenced.
    fn take_down_live(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        pos: usize,
        idx: u64,
        then_revoked: bool,
    ) {
        let seed = st.seed;
        let Some(owner) = st.drivers.get(pos).map(|d| d.domid) else {
            return;
        };
        st.target_unlink(Link { owner, slot: idx });
        let Some(dd) = st.drivers.get_mut(pos) else {
            return;
        };
        let Some(m) = dd.unindex(seed, idx) else {
            return;
        };
        let unmapped = st
            .space
            .bfn_of(idx)
            .is_some_and(|bfn| h.iommu_unmap(owner, m.context, bfn, &mut dd.gather).is_ok());
        if unmapped {
            dd.push_unmapping(idx, m, then_revoked);
        } else {
            dd.push_stuck(idx, m);
        }
        if let Some(g) = self.gates.get(m.domid.0 as usize) {
            g.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Retry the IOMMU unmaps of stuck revocations, flush what driver `pos`
    /// gathered, and after a successful flush release every unmapped page:
    /// explicit unmaps free their BFN, revocations become notices. A failed
    /// flush releases nothing (retried next time).
    pub(super) fn flush_and_release(st: &mut EngineState, h: &mut impl Hypervisor, pos: usize) {
        let space = &st.space;
        let Some(dd) = st.drivers.get_mut(pos) else {
            return;
        };
        let owner = dd.domid;
        // Stuck revocations: take the list and rebuild it with the failures.
        let mut at = core::mem::replace(&mut dd.stuck_head, NONE);
        while let Some(Slot::Stuck { mapping }) = dd.slot(at).copied() {
            let next = mapping.next_same_page;
            dd.stuck -= 1;
            let unmapped = space.bfn_of(at).is_some_and(|bfn| {
                h.iommu_unmap(owner, mapping.context, bfn, &mut dd.gather)
                    .is_ok()
            });
            if unmapped {
                dd.push_unmapping(at, mapping, true);
            } else {
                dd.push_stuck(at, mapping);
            }
            at = next;
        }
        if !dd.gather.is_empty() {
            if h.iommu_flush(owner, &dd.gather).is_err() {
                return;
            }
            dd.gather.clear();
        }
        let mut at = core::mem::replace(&mut dd.unmapping_head, NONE);
        let mut notices = false;
        while let Some(Slot::Unmapping {
            mapping,
            then_revoked,
        }) = dd.slot(at).copied()
        {
            let next = mapping.next_same_page;
            h.put_page(mapping.mfn, mapping.perms.write);
            notices |= then_revoked;
            if then_revoked {
                dd.push_revoked(
                    at,
                    Notice {
                        domid: mapping.domid,
                        gfn: mapping.gfn,
                        context: mapping.context,
                    },
                );
            } else {
                dd.free_slot(at);
            }
            at = next;
        }
        dd.compact_if_empty();
        if notices {
            // Once per flush, not per notice: the owner drains the queue.
            h.notify_revoked(owner);
        }
        if st.drivers.iter().all(|d| d.live == 0) {
            // Nothing is mapped anywhere: give the target index back too.
            st.target_index = crate::storage::IndexTable::new();
        }
    }

    /// The p2m of `domid` changed for gfns `[gfn, gfn + 2^order)` (called
    /// after the change, possibly with `domid`'s p2m lock held; also after a
    /// change that failed half-way: revoking only ever removes access).
    /// When nothing maps `domid` and no map of it is in flight this takes no
    /// lock. Otherwise every affected mapping in every driver domain is
    /// revoked, flushed and released before returning; in-flight maps of
    /// `domid` see the sequence number move and look their page up again.
    pub fn gfn_changed(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        gfn: Gfn,
        order: u32,
        how: GfnChange,
    ) {
        let Some(gate) = self.gates.get(domid.0 as usize) else {
            return;
        };
        if gate.active.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut st = self.state.lock();
        gate.seq.fetch_add(1, Ordering::SeqCst);
        let count = 1u64.checked_shl(order).unwrap_or(u64::MAX);
        // Whichever is less work: one O(1) lookup per gfn, or one pass over
        // every slot (the slot arrays' length, not just the live ones).
        let total_slots: u64 = st.drivers.iter().map(|d| d.slots.len() as u64).sum();
        if count <= total_slots {
            // Per gfn: O(1) each through the target index.
            for g in gfn.0..gfn.0.saturating_add(count) {
                self.revoke_gfn(&mut st, h, domid, Gfn(g), how);
            }
        } else {
            // A range larger than everything mapped (log-dirty over the
            // whole domain, a 1 GiB extent): scan the mappings instead.
            let last = gfn.0.saturating_add(count);
            for pos in 0..st.drivers.len() {
                let n = st.drivers.get(pos).map_or(0, |d| d.slots.len() as u64);
                for idx in 0..n {
                    let hit = st
                        .drivers
                        .get(pos)
                        .and_then(|d| d.live_at(idx))
                        .is_some_and(|m| {
                            m.domid == domid
                                && m.gfn.0 >= gfn.0
                                && m.gfn.0 < last
                                && (how == GfnChange::Removed || m.perms.write)
                        });
                    if hit {
                        self.revoke_slot(&mut st, h, pos, idx);
                    }
                }
            }
        }
        for pos in 0..st.drivers.len() {
            Self::flush_and_release(&mut st, h, pos);
        }
    }

    fn revoke_gfn(
        &self,
        st: &mut EngineState,
        h: &mut impl Hypervisor,
        domid: DomId,
        gfn: Gfn,
        how: GfnChange,
    ) {
        // Bounded: each step removes one mapping from the chain or ends it.
        let mut at = st.target_head(domid, gfn);
        let mut guard = st
            .drivers
            .len()
            .saturating_mul(crate::config::MAX_CONTEXTS as usize * 16);
        while let Some(link) = at {
            if guard == 0 {
                debug_assert!(false, "target chain longer than its bound");
                return;
            }
            guard -= 1;
            let Some(m) = EngineState::mapping_at(&st.drivers, link).copied() else {
                return;
            };
            let next = Link::unpack(m.next_same_page);
            if how == GfnChange::Removed || m.perms.write {
                if let Some(pos) = st.driver_pos(link.owner) {
                    self.revoke_slot(st, h, pos, link.slot);
                }
            }
            at = next;
        }
    }

    /// Convenience for a single removed gfn.
    pub fn gfn_removed(&self, h: &mut impl Hypervisor, domid: DomId, gfn: Gfn) {
        self.gfn_changed(h, domid, gfn, 0, GfnChange::Removed)
    }

    /// One slice of the teardown of a dying domain (Xen: from `domain_kill`,
    /// restartable like `domain_relinquish_resources`). `cursor` starts at 0
    /// and is the engine's; `Err(Restart)` means call again. Phases: stop
    /// in-flight maps of the domain; revoke, in every driver domain, the
    /// mappings of its pages (their owners get notices); drop everything it
    /// owned as a driver domain. Each slice visits at most
    /// `TEARDOWN_VISITS` slots and unmaps at most `TEARDOWN_REVOKES` pages.
    pub fn domain_teardown(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        cursor: &mut u64,
    ) -> Result<(), Restart> {
        let mut c = Cursor::unpack(*cursor);
        let result = self.teardown_slice(h, domid, &mut c);
        *cursor = c.pack();
        result
    }

    fn teardown_slice(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        if c.phase == PHASE_START {
            // Maps of this domain that looked a page up before it started
            // dying retry, and then find it dying.
            if let Some(g) = self.gates.get(domid.0 as usize) {
                let _st = self.state.lock();
                g.seq.fetch_add(1, Ordering::SeqCst);
            }
            *c = Cursor {
                phase: PHASE_AS_TARGET,
                driver: 0,
                slot: 0,
            };
        }
        if c.phase == PHASE_AS_TARGET {
            if self.target_active(domid) == 0 {
                *c = Cursor {
                    phase: PHASE_AS_DRIVER,
                    driver: 0,
                    slot: 0,
                };
            } else {
                return self.teardown_as_target(h, domid, c);
            }
        }
        if c.phase == PHASE_AS_DRIVER {
            return self.teardown_as_driver(h, domid, c);
        }
        // Done (the glue does not call again; if it does, nothing to do).
        Ok(())
    }

    fn teardown_as_target(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        let mut st = self.state.lock();
        let mut visits = 0u64;
        let mut revokes = 0u32;
        // The driver domain with the smallest domid >= the cursor's, each
        // in turn: the cursor survives driver domains coming and going.
        while let Some(pos) = st
            .drivers
            .iter()
            .enumerate()
            .filter(|(_, d)| d.domid.0 >= c.driver)
            .min_by_key(|(_, d)| d.domid.0)
            .map(|(p, _)| p)
        {
            let (owner, n) = st
                .drivers
                .get(pos)
                .map_or((DomId(0), 0), |d| (d.domid, d.slots.len() as u64));
            if c.driver != owner.0 {
                *c = Cursor {
                    phase: PHASE_AS_TARGET,
                    driver: owner.0,
                    slot: 0,
                };
            }
            while c.slot < n {
                if visits >= TEARDOWN_VISITS || revokes >= TEARDOWN_REVOKES {
                    Self::flush_and_release(&mut st, h, pos);
                    return Err(Restart);
                }
                visits += 1;
                let hit = st
                    .drivers
                    .get(pos)
                    .and_then(|d| d.live_at(c.slot))
                    .is_some_and(|m| m.domid == domid);
                if hit {
                    self.revoke_slot(&mut st, h, pos, c.slot);
                    revokes += 1;
                }
                c.slot += 1;
            }
            Self::flush_and_release(&mut st, h, pos);
            match owner.0.checked_add(1) {
                Some(next) => {
                    *c = Cursor {
                        phase: PHASE_AS_TARGET,
                        driver: next,
                        slot: 0,
                    }
                }
                None => break,
            }
        }
        *c = Cursor {
            phase: PHASE_AS_DRIVER,
            driver: 0,
            slot: 0,
        };
        drop(st);
        Err(Restart)
    }

    fn teardown_as_driver(
        &self,
        h: &mut impl Hypervisor,
        domid: DomId,
        c: &mut Cursor,
    ) -> Result<(), Restart> {
        let mut st = self.state.lock();
        let Some(pos) = st.driver_pos(domid) else {
            *c = Cursor::DONE;
            return Ok(());
        };
        let n = st.drivers.get(pos).map_or(0, |d| d.slots.len() as u64);
        let mut visits = 0u64;
        let mut revokes = 0u32;
        while c.slot < n {
            if visits >= TEARDOWN_VISITS || revokes >= TEARDOWN_REVOKES {
                Self::flush_and_release(&mut st, h, pos);
                return Err(Restart);
            }
            visits += 1;
            let slot = st.drivers.get(pos).and_then(|d| d.slot(c.slot)).copied();
            match slot {
                Some(Slot::Live(_)) => {
                    self.take_down_live(&mut st, h, pos, c.slot, false);
                    revokes += 1;
                }
                Some(Slot::Revoked { .. }) => {
                    if let Some(dd) = st.drivers.get_mut(pos) {
                        let _ = dd.ack_revoked(c.slot);
                    }
                }
                _ => {}
            }
            c.slot += 1;
        }
        Self::flush_and_release(&mut st, h, pos);
        let clean = st
            .drivers
            .get(pos)
            .is_none_or(|d| d.stuck_head == NONE && d.unmapping_head == NONE);
        if !clean {
            // The IOMMU refused an unmap or the flush failed: the pages stay
            // referenced; try again on the next call rather than leak them.
            return Err(Restart);
        }
        if let Some(dd) = st.drivers.get(pos) {
            for ctx in dd.contexts().filter(|c| c.0 != 0) {
                h.context_destroy(domid, ctx);
            }
        }
        if pos < st.drivers.len() {
            st.drivers.swap_remove(pos);
        }
        *c = Cursor::DONE;
        Ok(())
    }

    /// Run a domain's teardown to the end, as Xen's toolstack does through
    /// continuations; returns the number of slices it took.
    pub fn domain_dying(&self, h: &mut impl Hypervisor, domid: DomId) -> u32 {
        let mut cursor = 0;
        let mut slices = 1;
        // Bounded by the number of slots (each slice makes progress) unless
        // the IOMMU keeps refusing; give up after a generous bound then.
        while self.domain_teardown(h, domid, &mut cursor).is_err() {
            slices += 1;
            if slices > 1_000_000 {
                break;
            }
        }
        slices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_48_bytes() {
        // The engine's memory per mapping is dominated by the slot.
        assert_eq!(core::mem::size_of::<Slot>(), 48);
    }

    #[test]
    fn done_cursor_is_the_value_the_c_glue_checks() {
        // PVIOMMU_TEARDOWN_DONE in xen/include/pviommu_engine.h.
        assert_eq!(Cursor::DONE.pack(), 3u64 << 62);
        let c = Cursor {
            phase: PHASE_AS_TARGET,
            driver: 0x7fef,
            slot: (1 << 40) - 1,
        };
        assert_eq!(Cursor::unpack(c.pack()), c);
    }
}
