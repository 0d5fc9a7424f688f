//! A driver domain's mapping table: one slot per BFN (indexed through the
//! [`BfnSpace`](crate::bfn_alloc::BfnSpace)), each in one of the states of a
//! BFN's life, and the lists that thread through them. Nothing here
//! allocates except [`DriverDomain::reserve_slot`], which runs before any
//! state changes.
//!
//! A BFN's life:
//!
//! ```text
//!   Free ──map──► Live ──unmap (last ref)──► Unmapping{then: Free} ──flush──► Free
//!                  │                                                 (page released)
//!                  └─revoke (gfn left / target died)─► Unmapping{then: Revoked} ──flush──► Revoked
//!                  │                                                                      │
//!                  └─revoke, IOMMU refused the unmap─► Stuck ──retry──► Unmapping          │
//!   Free ◄──────────────────────── unmap (ESTALE) or REVOKED_ACK ─────────────────────────┘
//! ```
//!
//! A page reference is held from map until the flush after its unmap
//! succeeded (Live, Unmapping and Stuck hold one; Revoked and Free do not).
//! A revoked BFN stays reserved until its owner acknowledges it, so a
//! mediator's stale shadow entry can never reach another guest's page.

use alloc::vec::Vec;

use crate::iommu::FlushGather;
use crate::storage::{hash64, try_push, IndexTable};
use crate::{ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions};

/// "No slot" in a slot link.
pub(crate) const NONE: u64 = u64::MAX;

/// One live BFN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapping {
    /// Foreign frame.
    pub gfn: Gfn,
    /// Machine frame (never leaves the hypervisor side).
    pub mfn: Mfn,
    /// Next live mapping of the same (domid, gfn), in any driver domain (a
    /// packed `Link`: threads the engine's target index); once the mapping
    /// is Unmapping or Stuck, the next slot of that list instead.
    pub(crate) next_same_page: u64,
    /// Map requests not yet unmapped.
    pub refs: u32,
    /// Foreign domain.
    pub domid: DomId,
    /// Context holding it.
    pub context: ContextId,
    /// Access.
    pub perms: Permissions,
    /// Memory attribute.
    pub attr: MemAttr,
}

impl Mapping {
    /// The dedup key: the same key mapped again shares the BFN.
    pub(crate) fn same_key(&self, other: &Mapping) -> bool {
        self.domid == other.domid
            && self.gfn == other.gfn
            && self.context == other.context
            && self.perms == other.perms
            && self.attr == other.attr
    }
    pub(crate) fn key_hash(&self, seed: u64) -> u64 {
        let extra = (self.context.0 as u64) << 8
            | (self.perms.flag_bits() as u64) << 4
            | self.attr.field() as u64;
        hash64(seed, self.gfn.0, (self.domid.0 as u64) << 32 | extra)
    }
}

/// What the owner is told about a revoked BFN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Notice {
    /// Foreign domain whose page it was.
    pub domid: DomId,
    /// Foreign frame.
    pub gfn: Gfn,
    /// Context that held it.
    pub context: ContextId,
}

/// The state of one BFN of a driver domain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Slot {
    /// Not in use; `next` threads the free list.
    Free {
        /// Next free slot.
        next: u64,
    },
    /// Mapped in the IOMMU and current.
    Live(Mapping),
    /// Unmapped in the IOMMU, waiting for the flush that makes the device
    /// forget it; the page is still referenced. The unmapping list is
    /// threaded through `mapping.next_same_page` (free once a mapping has
    /// left the target index), which keeps a slot at 48 bytes.
    Unmapping {
        /// The former mapping.
        mapping: Mapping,
        /// Becomes Revoked (true) or Free (false) after the flush.
        then_revoked: bool,
    },
    /// Being revoked, but the IOMMU refused the unmap (e.g. a superpage
    /// split without memory): the entry may still be live, so the page stays
    /// referenced and the BFN poisoned; retried at every flush. The stuck
    /// list is threaded through `mapping.next_same_page`.
    Stuck {
        /// The mapping being revoked.
        mapping: Mapping,
    },
    /// Revoked and flushed; reserved until the owner acknowledges it.
    Revoked {
        /// What the owner is told.
        notice: Notice,
        /// Previous in the notice queue.
        prev: u64,
        /// Next in the notice queue.
        next: u64,
    },
}

/// A driver domain's state.
#[derive(Debug)]
pub struct DriverDomain {
    pub(crate) domid: DomId,
    /// Bit n: context n exists (context 0 always).
    pub(crate) contexts: u32,
    pub(crate) slots: Vec<Slot>,
    pub(crate) free_head: u64,
    pub(crate) free: u64,
    /// Dedup index: key (domid, gfn, context, perms, attr) -> slot, over Live slots.
    pub(crate) reverse: IndexTable,
    pub(crate) unmapping_head: u64,
    pub(crate) stuck_head: u64,
    pub(crate) revoked_head: u64,
    pub(crate) revoked_tail: u64,
    pub(crate) live: u64,
    pub(crate) revoked: u64,
    pub(crate) stuck: u64,
    /// IOTLB invalidations not yet flushed.
    pub(crate) gather: FlushGather,
    /// The toolstack's quota for this domain (`SET_LIMITS`); `None`: the
    /// boot-time default.
    pub(crate) quota: Option<u64>,
}

impl DriverDomain {
    pub(crate) fn new(domid: DomId) -> Self {
        DriverDomain {
            domid,
            contexts: 1,
            slots: Vec::new(),
            free_head: NONE,
            free: 0,
            reverse: IndexTable::new(),
            unmapping_head: NONE,
            stuck_head: NONE,
            revoked_head: NONE,
            revoked_tail: NONE,
            live: 0,
            revoked: 0,
            stuck: 0,
            gather: FlushGather::default(),
            quota: None,
        }
    }

    /// The domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
    /// Live mappings.
    pub fn live(&self) -> u64 {
        self.live
    }
    /// Revocations not yet acknowledged.
    pub fn revoked(&self) -> u64 {
        self.revoked
    }
    /// Revocations whose IOMMU unmap is still being retried.
    pub fn stuck(&self) -> u64 {
        self.stuck
    }
    /// BFNs in use (counted against the quota): every slot not free.
    pub fn used(&self) -> u64 {
        self.slots.len() as u64 - self.free
    }
    /// The quota the toolstack set, if any.
    pub fn quota(&self) -> Option<u64> {
        self.quota
    }
    /// Whether context `ctx` exists.
    pub fn has_context(&self, ctx: ContextId) -> bool {
        ctx.0 < 32 && self.contexts & (1 << ctx.0) != 0
    }
    /// Contexts, the default one included.
    pub fn contexts(&self) -> impl Iterator<Item = ContextId> + '_ {
        (0..32u32)
            .filter(|c| self.contexts & (1 << c) != 0)
            .map(ContextId)
    }
    /// Every slot with its index.
    pub fn slots(&self) -> impl Iterator<Item = (u64, &Slot)> {
        self.slots.iter().enumerate().map(|(i, s)| (i as u64, s))
    }
    /// Bytes of heap this driver domain holds.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Slot>() + self.reverse.heap_bytes()
    }

    pub(crate) fn slot(&self, idx: u64) -> Option<&Slot> {
        self.slots.get(usize::try_from(idx).ok()?)
    }
    pub(crate) fn slot_mut(&mut self, idx: u64) -> Option<&mut Slot> {
        self.slots.get_mut(usize::try_from(idx).ok()?)
    }
    pub(crate) fn live_at(&self, idx: u64) -> Option<&Mapping> {
        match self.slot(idx) {
            Some(Slot::Live(m)) => Some(m),
            _ => None,
        }
    }
    pub(crate) fn live_at_mut(&mut self, idx: u64) -> Option<&mut Mapping> {
        match self.slot_mut(idx) {
            Some(Slot::Live(m)) => Some(m),
            _ => None,
        }
    }

    /// The Live slot with `key`'s dedup key.
    pub(crate) fn find_key(&self, seed: u64, key: &Mapping) -> Option<u64> {
        let slots = &self.slots;
        self.reverse.find(
            key.key_hash(seed),
            |v| matches!(slots.get(v as usize), Some(Slot::Live(m)) if m.same_key(key)),
        )
    }

    /// Make sure one more mapping needs no memory: a free slot (or room
    /// for one, up to `limit` slots) and room in the dedup index.
    pub(crate) fn reserve_slot(&mut self, seed: u64, limit: u64) -> Result<(), Errno> {
        if self.free_head == NONE {
            if self.slots.len() as u64 >= limit {
                return Err(Errno::NoSpc);
            }
            if self.slots.len() == self.slots.capacity() {
                // Amortised doubling, capped by the limit.
                let want = self
                    .slots
                    .len()
                    .max(16)
                    .min((limit - self.slots.len() as u64) as usize);
                self.slots.try_reserve(want).map_err(|_| Errno::NoMem)?;
            }
        }
        let slots = &self.slots;
        self.reverse.reserve_one(|v| match slots.get(v as usize) {
            Some(Slot::Live(m)) => m.key_hash(seed),
            _ => 0,
        })
    }

    /// Take a free slot (after [`reserve_slot`](Self::reserve_slot)). The
    /// slot holds `Free` until the caller stores into it.
    pub(crate) fn take_slot(&mut self) -> Result<u64, Errno> {
        if let Some(Slot::Free { next }) = self.slot(self.free_head).copied() {
            let idx = self.free_head;
            self.free_head = next;
            self.free -= 1;
            return Ok(idx);
        }
        let idx = self.slots.len() as u64;
        try_push(&mut self.slots, Slot::Free { next: NONE })?;
        Ok(idx)
        // (a fresh slot is in use at once: `free` is unchanged)
    }

    /// Return a slot to the free list.
    pub(crate) fn free_slot(&mut self, idx: u64) {
        let head = self.free_head;
        if let Some(s) = self.slot_mut(idx) {
            *s = Slot::Free { next: head };
            self.free_head = idx;
            self.free += 1;
        }
    }

    /// Store a new Live mapping at `idx` and index it (capacity reserved).
    pub(crate) fn install(&mut self, seed: u64, idx: u64, m: Mapping) -> Result<(), Errno> {
        self.reverse.insert(m.key_hash(seed), idx)?;
        if let Some(s) = self.slot_mut(idx) {
            *s = Slot::Live(m);
        }
        self.live += 1;
        Ok(())
    }

    /// Take a Live mapping out of the dedup index (the slot keeps it until
    /// the caller changes the slot's state).
    pub(crate) fn unindex(&mut self, seed: u64, idx: u64) -> Option<Mapping> {
        let m = *self.live_at(idx)?;
        self.reverse.remove(m.key_hash(seed), |v| v == idx);
        self.live -= 1;
        Some(m)
    }

    /// The IOMMU entry of a former Live mapping is gone: wait for the flush.
    pub(crate) fn push_unmapping(&mut self, idx: u64, mut mapping: Mapping, then_revoked: bool) {
        mapping.next_same_page = self.unmapping_head;
        if let Some(s) = self.slot_mut(idx) {
            *s = Slot::Unmapping {
                mapping,
                then_revoked,
            };
            self.unmapping_head = idx;
        }
    }

    /// The IOMMU refused to unmap a mapping being revoked.
    pub(crate) fn push_stuck(&mut self, idx: u64, mut mapping: Mapping) {
        mapping.next_same_page = self.stuck_head;
        if let Some(s) = self.slot_mut(idx) {
            *s = Slot::Stuck { mapping };
            self.stuck_head = idx;
            self.stuck += 1;
        }
    }

    /// Queue a revocation notice at the tail.
    pub(crate) fn push_revoked(&mut self, idx: u64, notice: Notice) {
        let tail = self.revoked_tail;
        if let Some(s) = self.slot_mut(idx) {
            *s = Slot::Revoked {
                notice,
                prev: tail,
                next: NONE,
            };
        } else {
            return;
        }
        match self.slot_mut(tail) {
            Some(Slot::Revoked { next, .. }) => *next = idx,
            _ => self.revoked_head = idx,
        }
        self.revoked_tail = idx;
        self.revoked += 1;
    }

    /// Remove a revoked slot from the notice queue and free it.
    pub(crate) fn ack_revoked(&mut self, idx: u64) -> Result<Notice, Errno> {
        let Some(Slot::Revoked { notice, prev, next }) = self.slot(idx).copied() else {
            return Err(Errno::NoEnt);
        };
        match self.slot_mut(prev) {
            Some(Slot::Revoked { next: n, .. }) => *n = next,
            _ => self.revoked_head = next,
        }
        match self.slot_mut(next) {
            Some(Slot::Revoked { prev: p, .. }) => *p = prev,
            _ => self.revoked_tail = prev,
        }
        self.revoked -= 1;
        self.free_slot(idx);
        Ok(notice)
    }

    /// Give the slot array and the dedup index back once no BFN is in use
    /// (everything unmapped and acknowledged): the engine's memory returns
    /// to what an idle driver domain costs. Frees only; never allocates.
    pub(crate) fn compact_if_empty(&mut self) {
        if self.used() != 0 || self.slots.is_empty() {
            return;
        }
        self.slots = Vec::new();
        self.free_head = NONE;
        self.free = 0;
        self.reverse = IndexTable::new();
        self.unmapping_head = NONE;
        self.stuck_head = NONE;
        self.revoked_head = NONE;
        self.revoked_tail = NONE;
    }

    /// The oldest unacknowledged revocation.
    pub(crate) fn oldest_revoked(&self) -> Option<(u64, Notice)> {
        match self.slot(self.revoked_head) {
            Some(Slot::Revoked { notice, .. }) => Some((self.revoked_head, *notice)),
            _ => None,
        }
    }
}
