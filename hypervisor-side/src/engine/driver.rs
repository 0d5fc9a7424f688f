//! A driver domain's mapping table: one slot per BFN (indexed through the
//! [`BfnSpace`](crate::bfn_alloc::BfnSpace)), each in one of the states of a
//! BFN's life, the lists that thread through them, and the page index
//! (target domid, gfn) -> chain of this domain's live mappings of that page,
//! which serves both dedup and revocation. Nothing here allocates except
//! [`DriverDomain::reserve_slot`], which runs before any state changes.
//! The whole structure sits behind its cell's lock ([`super`] says which
//! lock protects what). A driver domain has one such state per IOMMU
//! context it maps into: its home cell (context 0, which also keeps the
//! list of its contexts) and one cell for each context it created, so two
//! vCPUs mapping into different contexts never share a lock or a table.
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

use super::EngineBug;
use crate::bfn_alloc::BfnSpace;
use crate::iommu::FlushGather;
use crate::nospec::array_index_nospec;
use crate::storage::{hash64, ChunkedVec, CountTable, IndexTable, ShardedIndex, CHUNK_LEN};
use crate::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Mfn, Permissions};
use pviommu_abi::EXTENT_PAGES;

/// "No slot" in a slot link.
pub(crate) const NONE: u64 = u64::MAX;
/// [`DriverDomain::trim_free_tail`]'s mark of a free list it found broken.
const TRIM_OFF: u64 = u64::MAX - 1;

/// Blocks of slots a call of its owner may give back, over all its cells
/// ([`DriverDomain::trim_free_tail`]): 4096 slots taken off the free list.
/// Where unmaps in no order left the list scattered over a large array,
/// each slot's neighbours are cache misses: 0.13 ms a block over 16
/// blocks, 0.57 ms over 256 (1 Mi slots), measured in a hosted release
/// build by a review of 2026-12-06, the order of the longest growth step
/// a map makes (0.4 ms at 1 Mi mappings). The rest waits for the next
/// call, a block each.
pub(crate) const TRIM_BLOCKS_PER_CALL: usize = 1;

/// Page index shards a call of its owner looks at for shrinking
/// ([`DriverDomain::shrink_index`]).
pub(crate) const SHRINK_SHARDS_PER_CALL: usize = 4;

/// Page index shards a call of its owner rebuilds smaller, over all its
/// cells ([`DriverDomain::shrink_index`]): a rebuild reads the shard's
/// buckets (at most 256 Ki at the largest quota) and allocates its
/// smaller table, about one block trim's cost.
pub(crate) const SHARD_REBUILDS_PER_CALL: usize = 1;

/// One live BFN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapping {
    /// Foreign frame.
    pub gfn: Gfn,
    /// Machine frame (never leaves the hypervisor side).
    pub mfn: Mfn,
    /// Slot of the next live mapping of the same (domid, gfn) in this
    /// driver domain (the page index's chain); once the mapping is
    /// Unmapping or Stuck, the next slot of that list instead.
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
    /// Which install of its slot this is: tells a stale handle (a BFN
    /// revoked, acknowledged and handed out again meanwhile) from this one.
    pub(crate) gen: u32,
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
}

/// Hash of a page (target domid, gfn) in the page index.
#[inline]
fn page_hash(seed: u64, domid: DomId, gfn: Gfn) -> u64 {
    hash64(seed, gfn.0, domid.0 as u64)
}

/// Hash of a target domid in the per-target counts.
#[inline]
fn target_hash(seed: u64, domid: DomId) -> u64 {
    hash64(seed, domid.0 as u64, 0x7a72_6765_7473)
}

/// Hash of a 2 MiB extent record (target domid, first gfn) in the extent
/// index: apart from the page index's, so a page probe never meets one.
#[inline]
fn extent_hash(seed: u64, domid: DomId, head: u64) -> u64 {
    hash64(seed, head, 0x6578_7465_6e74_0000 | domid.0 as u64)
}

/// The hash of the record an extent-index value names, for the index's
/// rebuilds and removals (every value in the index names a Live record).
#[inline]
fn record_hash(records: &ChunkedVec<ExtentRecord>, seed: u64, v: u64) -> u64 {
    records
        .get(v as usize)
        .map_or(0, |r| extent_hash(seed, DomId(r.domid), r.head_gfn))
}

/// A per-target count packs the domid above the count.
const COUNT_BITS: u32 = 40;
// A target's count (its pages in the index and its records, at most the
// slots: the quota, and an extent's slots past it) never reaches what the
// field holds: a count the packing cut to 0 would read as no page of the
// target.
const _: () = assert!(
    (crate::config::MAX_QUOTA as u128) + 2 * (EXTENT_PAGES as u128) < (1u128 << COUNT_BITS)
);
fn count_domid(v: u64) -> DomId {
    DomId((v >> COUNT_BITS) as u16)
}

/// Region counts: per (target, region of 2^[`REGION_SHIFT`] gfns), the
/// distinct pages of it this cell maps. They let the gfn hook over a
/// range (VRAM dirty tracking, a superpage's type change, log-dirty) skip
/// what the cell maps nothing of, instead of probing every gfn of the
/// range or passing over every slot (`Engine::gfn_changed`).
///
/// 64 MiB of guest memory per region: a 1 GiB range is 16 region probes,
/// and 64 Ki regions (the most a cell counts) cover 4 TiB of guests, the
/// host of the capacity plan (`design/performance.md`), however a mediator
/// that serves every guest from one context spreads its mappings.
pub(crate) const REGION_SHIFT: u32 = 14;
/// A region's count needs `REGION_SHIFT + 1` bits (up to 16 Ki pages).
const REGION_COUNT_BITS: u32 = REGION_SHIFT + 1;
/// The most a region's count may hold: its pages (2^`REGION_SHIFT`) in the
/// page index and the records of its 32 extents (a few per extent, one per
/// access and attribute) fit well below.
const REGION_COUNT_MAX: u64 = (1 << REGION_COUNT_BITS) - 1;
/// The region number fits what is left beside the domid and the count.
const REGION_NUMBER_BITS: u32 = 64 - 16 - REGION_COUNT_BITS;
/// Gfns from here up have no region number: a cell that maps one stops
/// counting (2^47 gfns, 512 TiB: beyond any p2m Xen builds).
pub const REGION_GFN_END: u64 = 1 << (REGION_NUMBER_BITS + REGION_SHIFT);
/// Regions a cell counts. One more and it stops counting until it is
/// empty again: a guest that scatters its pages one per region cannot grow
/// the table (and its one-shot rehash) without bound, only send the hooks
/// of that cell back to probing or passing as before. 64 Ki entries are a
/// table of 128 Ki buckets (1 MiB), rebuilt at most once from 32 Ki.
const MAX_REGIONS: usize = (1 << 16) - 1;

/// The region of `gfn`, if it has a number.
#[inline]
pub(crate) fn region_of(gfn: u64) -> Option<u64> {
    (gfn < REGION_GFN_END).then_some(gfn >> REGION_SHIFT)
}
/// A region count packs the domid and the region number above the count.
#[inline]
fn region_key(domid: DomId, region: u64) -> u64 {
    (domid.0 as u64) << REGION_NUMBER_BITS | region
}
#[inline]
fn region_key_of(v: u64) -> u64 {
    v >> REGION_COUNT_BITS
}
/// Hash of a region key in the region counts.
#[inline]
fn region_hash(seed: u64, key: u64) -> u64 {
    hash64(seed, key, 0x7265_6769_6f6e)
}

/// Slots an empty driver state keeps allocated (with its indices): about
/// 64 KiB, so the 128 cells keep at most 8 MiB between batches.
pub(crate) const KEEP_WHEN_EMPTY: usize = 1024;

/// Slots the emptied cell of one of the engine's own contexts keeps (its
/// page index cleared, not given back; one block of slots): a mediator
/// empties and refills its device's context (a GPU's shadow page tables)
/// as a whole, and giving the index of 16 Ki mappings back and growing it
/// again cost a tenth of each map under TCG (design/performance.md, "Calls,
/// blocks and bytes under TCG"). About 520 KiB per such cell
/// (`an_emptied_context_keeps_its_index` measures it), freed with the
/// context; the home cells, where a guest's death empties a driver domain,
/// keep [`KEEP_WHEN_EMPTY`].
pub(crate) const KEEP_CONTEXT_WHEN_EMPTY: usize = 16 * 1024;

/// Longest chain of one page in one driver domain: one mapping per
/// (context, perms, attr). Walks are bounded by it.
pub(crate) const CHAIN_BOUND: usize = crate::config::MAX_CONTEXTS as usize * 2 * 8;

/// Where a page is in a driver domain's page index
/// ([`DriverDomain::probe_page`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageAt {
    /// Bucket of the page's chain head; `None`: not indexed.
    pos: Option<usize>,
    /// The index's layout when probed.
    layout: u32,
    /// The page's hash, which no change of the index voids: the
    /// reservation and the install use it rather than hash the page again.
    hash: u64,
    /// The page probed: an install of another page (a caller's slip) must
    /// not file it under this page's hash, where no lookup would find it.
    domid: DomId,
    gfn: Gfn,
}

/// A context-0 map whose IOMMU entry the owner's flush is still to write:
/// its slot and the install generation it was made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingMap {
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

/// A 2 MiB extent mapped by one op (`Engine::map_extent`), as the page
/// index knows it: one entry in the extent index instead of 512 in the
/// page index. Each of its pages is still a mapping of its own, in its own
/// slot (Live, [`MEMBER`], `next` this record's number): its reference,
/// its unmap, its revocation and its flush are a page map's. Only the way
/// a lookup by (target, gfn) finds it differs: through the record of the
/// gfn's 2 MiB extent, at slot `first` + (gfn - `head_gfn`), a slot taken
/// as the member only while it says so (Live, `MEMBER`, this record, this
/// page). A record lives while any of its pages is Live; a page that
/// leaves frees its slot as any unmap does (a later map may take it).
///
/// Records of the same extent (other access or attribute) are chained
/// through `next`, the extent index holding the first; a free record's
/// `next` threads the free list.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct ExtentRecord {
    head_gfn: u64,
    /// The slot of the extent's first page.
    first: u32,
    /// Pages still Live as members; 0: the record is free.
    live: u32,
    next: u32,
    domid: u16,
}

// A 512th of a slot's size per page of an extent.
const _: () = assert!(core::mem::size_of::<ExtentRecord>() == 24);

impl ExtentRecord {
    #[inline]
    fn is_of(&self, domid: DomId, head: u64) -> bool {
        self.live != 0 && self.domid == domid.0 && self.head_gfn == head
    }
}

/// An Unmapping slot, as the flush that ends it needs it
/// ([`DriverDomain::unmapping_at`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unmapped {
    /// The page's frame, referenced until the flush.
    pub(crate) mfn: Mfn,
    /// Whether the reference is a writable one.
    pub(crate) writable: bool,
    /// Whose page it was (the rest of the notice, if revoked, stays in the
    /// slot: [`DriverDomain::push_revoked_unmapped`]).
    pub(crate) domid: DomId,
    /// Becomes a notice (true) or free (false).
    pub(crate) then_revoked: bool,
    /// Its IOMMU entry is still to be cleared, by the flush's first step
    /// (an owner's unmap: `Engine::clear_deferred_entries`).
    pub(crate) entry_present: bool,
    /// Next slot on the unmapping list.
    pub(crate) next: u64,
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
    /// Out of the books, waiting for the flush that makes the device
    /// forget it; the page is still referenced. Its IOMMU entry is already
    /// cleared (a revocation), or still present (`entry_present`: an
    /// owner's unmap, whose entry the flush clears first, a run of BFNs at
    /// a time). The unmapping list is threaded through
    /// `mapping.next_same_page` (free once a mapping has left the target
    /// index), which keeps a slot at 32 bytes.
    Unmapping {
        /// The former mapping.
        mapping: Mapping,
        /// Becomes Revoked (true) or Free (false) after the flush.
        then_revoked: bool,
        /// Its IOMMU entry is still to be cleared.
        entry_present: bool,
    },
    /// Taken down, but the IOMMU refused the unmap (e.g. a superpage split
    /// without memory): the entry may still be live, so the page stays
    /// referenced and the BFN poisoned; retried in turn by the flushes
    /// (`STUCK_RETRIES` a flush, oldest first). The stuck list is threaded
    /// through `mapping.next_same_page`.
    Stuck {
        /// The mapping being taken down.
        mapping: Mapping,
        /// Becomes Revoked (a revocation) or Free (an owner's unmap) once
        /// unmapped and flushed.
        then_revoked: bool,
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

/// A slot as stored: 32 bytes, the bulk of the engine's memory per mapping.
/// [`Slot`] is its decoded form.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct RawSlot {
    gfn: u64,
    mfn: u64,
    /// The one list a slot is on: the free list (Free), its page's chain
    /// (Live), the unmapping or stuck list, or the notice queue (Revoked:
    /// the next one).
    next: u32,
    /// Live, Unmapping, Stuck: references; Revoked: the previous notice.
    aux: u32,
    domid: u16,
    context: u8,
    /// State in bits 0-2, read in 3, write in 4, attribute in 5-6,
    /// "then revoked" (Unmapping, Stuck) in 7.
    bits: u8,
    /// Live, Unmapping, Stuck: the mapping's install generation.
    gen: u32,
}

const ST_FREE: u8 = 0;
const ST_LIVE: u8 = 1;
const ST_UNMAPPING: u8 = 2;
const ST_STUCK: u8 = 3;
const ST_REVOKED: u8 = 4;
/// Unmapping, its IOMMU entry still present (decoded as `Unmapping`).
const ST_UNMAPPING_ENTRY_PRESENT: u8 = 5;
const STATE_MASK: u8 = 0b111;
const READ: u8 = 1 << 3;
const WRITE: u8 = 1 << 4;
const ATTR_SHIFT: u8 = 5;
const ATTR_MASK: u8 = 0b11 << ATTR_SHIFT;
const THEN_REVOKED: u8 = 1 << 7;
/// Live: a page of an extent record (the bit Unmapping and Stuck use for
/// "then revoked"; it goes when the slot leaves Live). Its `next` is then
/// the record's number, not a page chain's link.
const MEMBER: u8 = 1 << 7;

// Slot counts are bounded by MAX_QUOTA, so no real slot index reaches
// u32::MAX, the stored "none".
const _: () = assert!(crate::config::MAX_QUOTA < u32::MAX as u64);
// An extent may leave up to 511 free slots past the quota
// (`take_extent_slots`): slot numbers still fit a link.
const _: () = assert!(crate::config::MAX_QUOTA + EXTENT_PAGES < u32::MAX as u64);

/// `DriverDomain::run_hint` with no install to follow (its slot NONE).
const NO_RUN: (DomId, Gfn, u64) = (DomId(0), Gfn(u64::MAX), NONE);

/// A slot link in 32 bits (slot counts are bounded by `MAX_QUOTA`).
#[inline]
fn link32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
#[inline]
fn link64(v: u32) -> u64 {
    if v == u32::MAX {
        NONE
    } else {
        v as u64
    }
}

/// A mapping's access and attribute as its slot stores them (its bits for
/// read, write and the attribute, the rest zero): what the flush compares
/// to grow a run of waiting context-0 maps (one byte, where decoded they
/// are three fields), decoded only for the backend's call. Comparing the
/// byte is comparing the decoded fields because a slot only ever stores
/// a decoded attribute's field (0 to 2 in its 2 bits): a 3, which decodes
/// to the default, is never written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotAccess(u8);

impl SlotAccess {
    #[inline(always)]
    pub(crate) fn of(perms: Permissions, attr: MemAttr) -> SlotAccess {
        let mut bits = (attr.field() as u8) << ATTR_SHIFT;
        if perms.read {
            bits |= READ;
        }
        if perms.write {
            bits |= WRITE;
        }
        SlotAccess(bits)
    }
    #[inline(always)]
    pub(crate) fn perms(self) -> Permissions {
        Permissions {
            read: self.0 & READ != 0,
            write: self.0 & WRITE != 0,
        }
    }
    #[inline(always)]
    pub(crate) fn attr(self) -> MemAttr {
        MemAttr::from_field(((self.0 & ATTR_MASK) >> ATTR_SHIFT) as u16).unwrap_or_default()
    }
}

impl RawSlot {
    #[inline]
    fn state(&self) -> u8 {
        self.bits & STATE_MASK
    }

    /// A free slot linked before `head` on the free list (its back link
    /// set where a slot joins the list).
    #[inline(always)]
    fn free_before(head: u64) -> RawSlot {
        RawSlot {
            next: link32(head),
            aux: link32(NONE),
            bits: ST_FREE,
            ..RawSlot::default()
        }
    }

    #[inline]
    fn from_mapping(state: u8, m: &Mapping, extra: u8) -> RawSlot {
        let bits = state | SlotAccess::of(m.perms, m.attr).0 | extra;
        RawSlot {
            gfn: m.gfn.0,
            mfn: m.mfn.0,
            next: link32(m.next_same_page),
            aux: m.refs,
            domid: m.domid.0,
            // Contexts are below MAX_CONTEXTS (16).
            context: m.context.0 as u8,
            bits,
            gen: m.gen,
        }
    }

    /// What the flush needs of an Unmapping slot ([`Unmapped`]); `None`
    /// for any other state.
    #[inline(always)]
    fn unmapped(&self) -> Option<Unmapped> {
        matches!(self.state(), ST_UNMAPPING | ST_UNMAPPING_ENTRY_PRESENT).then(|| Unmapped {
            mfn: Mfn(self.mfn),
            writable: self.bits & WRITE != 0,
            domid: DomId(self.domid),
            then_revoked: self.bits & THEN_REVOKED != 0,
            entry_present: self.state() == ST_UNMAPPING_ENTRY_PRESENT,
            next: link64(self.next),
        })
    }

    /// The access and attribute bits, as stored ([`SlotAccess`]).
    #[inline(always)]
    fn access(&self) -> SlotAccess {
        SlotAccess(self.bits & (READ | WRITE | ATTR_MASK))
    }

    #[inline]
    fn mapping(&self) -> Mapping {
        Mapping {
            gfn: Gfn(self.gfn),
            mfn: Mfn(self.mfn),
            next_same_page: link64(self.next),
            refs: self.aux,
            domid: DomId(self.domid),
            context: ContextId(self.context as u32),
            perms: self.access().perms(),
            attr: self.access().attr(),
            gen: self.gen,
        }
    }

    #[inline]
    pub(crate) fn encode(s: &Slot) -> RawSlot {
        match *s {
            Slot::Free { next } => RawSlot {
                next: link32(next),
                // (The free list's back link, set where a slot joins it.)
                aux: link32(NONE),
                bits: ST_FREE,
                ..RawSlot::default()
            },
            Slot::Live(m) => RawSlot::from_mapping(ST_LIVE, &m, 0),
            Slot::Unmapping {
                mapping,
                then_revoked,
                entry_present,
            } => RawSlot::from_mapping(
                if entry_present {
                    ST_UNMAPPING_ENTRY_PRESENT
                } else {
                    ST_UNMAPPING
                },
                &mapping,
                if then_revoked { THEN_REVOKED } else { 0 },
            ),
            Slot::Stuck {
                mapping,
                then_revoked,
            } => RawSlot::from_mapping(
                ST_STUCK,
                &mapping,
                if then_revoked { THEN_REVOKED } else { 0 },
            ),
            Slot::Revoked { notice, prev, next } => RawSlot {
                gfn: notice.gfn.0,
                // The notice's order (`push_revoked`) is written after.
                mfn: 0,
                next: link32(next),
                aux: link32(prev),
                domid: notice.domid.0,
                context: notice.context.0 as u8,
                bits: ST_REVOKED,
                gen: 0,
            },
        }
    }

    #[inline]
    pub(crate) fn decode(&self) -> Slot {
        match self.state() {
            ST_LIVE => Slot::Live(self.mapping()),
            ST_UNMAPPING | ST_UNMAPPING_ENTRY_PRESENT => Slot::Unmapping {
                mapping: self.mapping(),
                then_revoked: self.bits & THEN_REVOKED != 0,
                entry_present: self.state() == ST_UNMAPPING_ENTRY_PRESENT,
            },
            ST_STUCK => Slot::Stuck {
                mapping: self.mapping(),
                then_revoked: self.bits & THEN_REVOKED != 0,
            },
            ST_REVOKED => Slot::Revoked {
                notice: Notice {
                    domid: DomId(self.domid),
                    gfn: Gfn(self.gfn),
                    context: ContextId(self.context as u32),
                },
                prev: link64(self.aux),
                next: link64(self.next),
            },
            _ => Slot::Free {
                next: link64(self.next),
            },
        }
    }

    /// Live, of page (domid, gfn): the page index's test, without decoding.
    #[inline]
    fn is_live_page(&self, domid: DomId, gfn: Gfn) -> bool {
        self.state() == ST_LIVE && self.gfn == gfn.0 && self.domid == domid.0
    }
}

/// A driver domain's counters (`PVIOMMU_CMD_stats`), kept under its lock.
/// The `ns_*` ones grow only while the engine's timing is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Maps that installed an IOMMU entry.
    pub maps: u64,
    /// Maps answered with an existing BFN.
    pub shared: u64,
    /// Unmaps that removed an IOMMU entry.
    pub unmaps: u64,
    /// Mappings revoked.
    pub revocations: u64,
    /// IOTLB flushes.
    pub flushes: u64,
    /// Batch hypercalls.
    pub batches: u64,
    /// Time inside batch hypercalls.
    pub ns_batches: u64,
    /// Time taking page references.
    pub ns_get_page: u64,
    /// Time releasing page references after flushes.
    pub ns_put_page: u64,
    /// Time writing IOMMU entries.
    pub ns_iommu_map: u64,
    /// Time clearing IOMMU entries.
    pub ns_iommu_unmap: u64,
    /// Time in IOTLB flushes.
    pub ns_iommu_flush: u64,
}

impl DriverStats {
    /// Every counter, in one order (for sums over a driver domain's cells).
    pub(crate) fn counters_mut(&mut self) -> [&mut u64; 12] {
        [
            &mut self.maps,
            &mut self.shared,
            &mut self.unmaps,
            &mut self.revocations,
            &mut self.flushes,
            &mut self.batches,
            &mut self.ns_batches,
            &mut self.ns_get_page,
            &mut self.ns_put_page,
            &mut self.ns_iommu_map,
            &mut self.ns_iommu_unmap,
            &mut self.ns_iommu_flush,
        ]
    }
}

/// A driver domain's state in one cell: its mappings into one context.
#[derive(Debug)]
pub struct DriverDomain {
    pub(crate) domid: DomId,
    /// The context whose mappings this cell holds (0: the home cell).
    pub(crate) context: ContextId,
    /// The driver domain's home cell (its context-0 cell; this one's own
    /// number in the home cell): where its quota count and notice order
    /// are kept ([`super::DriverShared`]).
    pub(crate) home: u8,
    /// Home cell: bit n, context n exists (context 0 always). A context's
    /// cell: bit n for its own context n only.
    pub(crate) contexts: u32,
    /// A context's cell: that context of the engine's (tables, tag,
    /// devices). Empty in the home cell.
    pub(crate) own: Vec<super::contexts::OwnContext>,
    pub(crate) slots: ChunkedVec<RawSlot>,
    /// The free list, doubly linked (a free slot's `aux` holds the
    /// previous one), so that a map can take the slot it prefers from
    /// anywhere in it ([`take_slot_near`](Self::take_slot_near)).
    pub(crate) free_head: u64,
    pub(crate) free: u64,
    /// A slot of the slot array's last block that the last look found in
    /// use ([`trim_free_tail`](Self::trim_free_tail)): while it still is,
    /// the block is not looked at again. `NONE`: look; [`TRIM_OFF`]: the
    /// free list did not hold together, no trim until the cell empties.
    trim_blocker: u64,
    /// The page index shard [`shrink_index`](Self::shrink_index) looks at
    /// next.
    shrink_cursor: usize,
    /// The `limit` of [`reserve_slot`](Self::reserve_slot)'s last
    /// reservation with no free slot (`quota.min(window)`): with a block
    /// less one more, the bound of a falling run's skip
    /// ([`take_fresh_ahead`](Self::take_fresh_ahead)), as of an extent's.
    /// Set by each such reservation, in the same locked map that reads it;
    /// 0 (no skip) once the cell empties.
    fresh_limit: u64,
    /// The last slot a map installed into, and its page: the next map of
    /// the following gfn of that target asks for the slot after it, so a
    /// run of consecutive gfns gets consecutive BFNs however the free list
    /// was shuffled by unmaps ([`slot_wanted`](Self::slot_wanted)). A hint:
    /// never trusted beyond the state of the slot it names.
    pub(crate) run_hint: (DomId, Gfn, u64),
    /// Page index: (target domid, gfn) -> first Live slot of that page; the
    /// rest of the chain follows through `next_same_page`. Dedup walks the
    /// chain; revocation takes it whole.
    pub(crate) pages: ShardedIndex,
    /// 2 MiB extent records ([`ExtentRecord`]) by number; a free one's
    /// `next` threads the free list from `extent_free`. A live record owns
    /// an aligned block of 512 slots no other record can take (an extent
    /// takes only a block that is all free), so there are never more live
    /// records than blocks of slots.
    pub(crate) extents: ChunkedVec<ExtentRecord>,
    extent_free: u64,
    /// Extent index: (target domid, first gfn) -> first record of that
    /// extent's chain. With the page index, what a lookup by page
    /// searches; both empty when nothing is Live.
    extent_index: IndexTable,
    /// Pages Live as members of a record.
    member_pages: u64,
    /// Target domid -> pages of it in `pages` and its extent records
    /// (packed with the domid; a record counts once, however many of its
    /// pages are Live): says when this domain stops mapping a target, so
    /// the target's gate can stop sending its hooks here. The count last
    /// changed is held hot ([`CountTable`]): a run of pages of one target
    /// changes it without the hash or the table.
    pub(crate) targets: CountTable<COUNT_BITS>,
    /// Region counts (see [`REGION_SHIFT`]): (target, region) -> distinct
    /// pages of it in `pages` and extent records, packed with the key.
    /// Exact while `regions_exact`; changed exactly where `pages` gains or
    /// loses a page and where a record is made or goes.
    /// Its count last changed is held hot, as `targets`'.
    regions: CountTable<REGION_COUNT_BITS>,
    /// Every page in `pages` is counted in `regions`. Cleared when a page
    /// cannot be (a gfn without a region number, [`MAX_REGIONS`] reached):
    /// hooks then probe or pass as if there were no counts, until the
    /// cell's pages are all gone. (Room for a new region is reserved with
    /// the slot, like room in the other indices: a map that cannot have
    /// it is refused with `ENOMEM` before it changes anything.)
    regions_exact: bool,
    /// What the gfn hooks over ranges did here: (page-index and region
    /// probes, passes over the slots). Observable, so tests can hold a
    /// hook's work under the lock to its bound.
    pub(crate) range_work: (u64, u64),
    pub(crate) unmapping_head: u64,
    /// How many slots the unmapping list holds: what the next flush's
    /// release pass walks (kept bounded across a preempted call's entries,
    /// see [`Engine::pause_contexts`](crate::Engine::pause_contexts)).
    pub(crate) unmapping_len: u64,
    /// Revocations the IOMMU refused to unmap, oldest first: each flush
    /// retries a bounded number from the head and puts the failures back
    /// at the tail, so every one is retried in turn.
    pub(crate) stuck_head: u64,
    stuck_tail: u64,
    pub(crate) revoked_head: u64,
    pub(crate) revoked_tail: u64,
    /// Notices acknowledged so far (wraps): any removal from the notice
    /// queue moves the ones after it.
    revoked_acks: u64,
    /// Where the last [`revoked_after`](Self::revoked_after) ended: (skip,
    /// slot, `revoked_acks` then). Notices are only added at the tail and
    /// only leave through [`ack_revoked`](Self::ack_revoked) (revoked_ack,
    /// an unmap answered `ESTALE`, the owner's teardown), so while none
    /// has been acknowledged since, the `skip` before that slot are the
    /// same, and a drain asking for skip 0, 1, 2, ... walks one link per
    /// op instead of `skip`. Dropped whenever the queue is emptied
    /// ([`compact_if_empty`](Self::compact_if_empty), which a cell passes
    /// through before another domain may claim it). Were it ever wrong,
    /// the walk would still only report this cell's own notices.
    revoked_cursor: (u32, u64, u64),
    pub(crate) live: u64,
    pub(crate) revoked: u64,
    pub(crate) stuck: u64,
    /// Unmapping slots whose IOMMU entry an owner's unmap left, pushed
    /// since the entries were last cleared: how far down the unmapping
    /// list the next clearing pass looks (they are at its head). Were it
    /// too low, an entry left behind is never released, only made stuck.
    pub(crate) deferred_entries: u64,
    /// Unmapping slots whose entry the IOMMU refused to clear
    /// (`Engine::clear_run`), still marked until a release pass moves them
    /// to the stuck list: a device may write through them, and neither
    /// `deferred_entries` nor the stuck count holds them meanwhile (a
    /// re-review of 2026-12-06). In the retry flag with the stuck count.
    pub(crate) refused_clears: u64,
    /// Context-0 maps whose IOMMU entry is still to be written, in map
    /// order, each its slot and install generation ([`PendingMap`]): the
    /// owner's flush writes them, consecutive BFNs and frames a run at a
    /// time (`Engine::write_pending_entries`), only for a slot still Live
    /// with that generation (a slot taken down, freed and installed again
    /// meanwhile is written once, for its new mapping). At most
    /// `DEFER_LIMIT`; its capacity is reserved with a map's memory.
    pub(crate) pending_maps: Vec<PendingMap>,
    /// IOTLB invalidations not yet flushed.
    pub(crate) gather: FlushGather,
    /// Counters and times.
    pub(crate) stats: DriverStats,
    /// Generation of the next install (wraps).
    pub(crate) next_gen: u32,
    /// `used()` as last added to the driver domain's count of BFNs in use
    /// across its cells (at each unlock).
    pub(crate) published_used: u64,
    /// The last flush failed: its unmapped pages wait for the next one.
    pub(crate) flush_failed: bool,
    /// Engine bugs this cell survived, by [`EngineBug`] (tests require
    /// 0 of each): live mappings taken out that the page index did not
    /// hold where it should (each still taken down, the counts then no
    /// longer trusted), and maps refused because the free list did not hold
    /// together (never followed then, nothing handed out).
    bugs: [u64; EngineBug::KINDS],
    /// An index lost a mapping (a bug) since the cell last had no live
    /// mapping: its gfn hooks pass over the slots instead of trusting the
    /// indices (`Engine::revoke_gfn`). Cleared with the counts' distrust,
    /// once nothing is Live (nothing can be lost then).
    indices_suspect: bool,
    /// `bugs` as last added to the engine's host-wide counts.
    bugs_published: [u64; EngineBug::KINDS],
}

#[cfg(test)]
std::thread_local! {
    /// Slots this thread decoded through [`DriverDomain::slots`]: the work
    /// of passes over a cell's whole slot array, for tests that bound it.
    pub(crate) static SLOTS_DECODED: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

/// The slot's side of a push onto the unmapping list whose head is
/// `head`: its state Unmapping (its IOMMU entry still there, for the flush
/// to clear, with `entry_present`; a notice after the flush with
/// `then_revoked`), linked before the head. The list's side follows
/// ([`DriverDomain::pushed_unmapping`]); one rule for the two pushes that
/// change a slot in place.
#[inline(always)]
fn link_unmapping(r: &mut RawSlot, head: u64, then_revoked: bool, entry_present: bool) {
    let flag = if then_revoked { THEN_REVOKED } else { 0 };
    let state = if entry_present {
        ST_UNMAPPING_ENTRY_PRESENT
    } else {
        ST_UNMAPPING
    };
    r.bits = (r.bits & !(STATE_MASK | THEN_REVOKED)) | state | flag;
    r.next = link32(head);
}

/// Whether the slot `wanted` is ahead of `next`, the next fresh one (a
/// falling run's skip: see `DriverDomain::take_fresh_ahead`), `NONE`
/// never. One compare: adding 1 wraps `NONE` to 0, which is ahead of
/// nothing, and keeps every other order (`next` is a slot count, far
/// below `NONE`). As `wanted > next && wanted != NONE` it cost each
/// fresh slot two instructions more.
#[inline(always)]
fn wanted_ahead_of(wanted: u64, next: u64) -> bool {
    wanted.wrapping_add(1) > next.wrapping_add(1)
}

impl DriverDomain {
    pub(crate) fn new(domid: DomId) -> Self {
        DriverDomain {
            domid,
            context: ContextId::DEFAULT,
            home: 0,
            contexts: 1,
            own: Vec::new(),
            slots: ChunkedVec::new(),
            free_head: NONE,
            free: 0,
            trim_blocker: NONE,
            shrink_cursor: 0,
            run_hint: NO_RUN,
            fresh_limit: 0,
            pages: ShardedIndex::new(),
            extents: ChunkedVec::new(),
            extent_free: NONE,
            extent_index: IndexTable::new(),
            member_pages: 0,
            targets: CountTable::new(),
            regions: CountTable::new(),
            regions_exact: true,
            range_work: (0, 0),
            bugs: [0; EngineBug::KINDS],
            bugs_published: [0; EngineBug::KINDS],
            indices_suspect: false,
            unmapping_head: NONE,
            unmapping_len: 0,
            stuck_head: NONE,
            stuck_tail: NONE,
            revoked_head: NONE,
            revoked_tail: NONE,
            revoked_acks: 0,
            revoked_cursor: (0, NONE, 0),
            live: 0,
            revoked: 0,
            stuck: 0,
            deferred_entries: 0,
            refused_clears: 0,
            pending_maps: Vec::new(),
            gather: FlushGather::default(),
            stats: DriverStats::default(),
            next_gen: 0,
            published_used: 0,
            flush_failed: false,
        }
    }

    /// Back to the idle state of a fresh one for the same domain, keeping
    /// what belongs to the cell rather than to its state: the install
    /// generations (a tag never repeats in a cell short of 2^32 installs),
    /// its home and what it added to its home's rough count (taken off
    /// when the cell is given back). Frees the tables; never allocates.
    pub(crate) fn reset_to_idle(&mut self) {
        let (next_gen, home, published) = (self.next_gen, self.home, self.published_used);
        let bugs = (self.bugs, self.bugs_published);
        *self = DriverDomain::new(self.domid);
        self.next_gen = next_gen;
        self.home = home;
        self.published_used = published;
        // (A diagnostic of the cell: a bug stays seen, and is reported
        // once.)
        (self.bugs, self.bugs_published) = bugs;
    }

    /// Corrupt the page index as a bug would: page (domid, gfn) is no
    /// longer in it, its mappings still Live.
    /// Corrupt a page chain as a bug would: the Live slot `idx`'s link
    /// names `next`.
    #[cfg(test)]
    pub(crate) fn set_chain_link_for_test(&mut self, idx: u64, next: u64) {
        self.set_next_live(idx, next);
    }

    /// Hide slot `idx` from walks as a bug would: its state reads Free,
    /// its counts, lists and index entries unchanged. Its bits before, for
    /// [`restore_slot_for_test`](Self::restore_slot_for_test).
    #[cfg(test)]
    pub(crate) fn hide_slot_for_test(&mut self, idx: u64) -> u8 {
        let r = self.raw_mut(idx).expect("a slot");
        let old = r.bits;
        r.bits = (r.bits & !STATE_MASK) | ST_FREE;
        old
    }

    #[cfg(test)]
    pub(crate) fn restore_slot_for_test(&mut self, idx: u64, bits: u8) {
        self.raw_mut(idx).expect("a slot").bits = bits;
    }

    #[cfg(test)]
    pub(crate) fn lose_page_for_test(&mut self, seed: u64, domid: DomId, gfn: Gfn) {
        if let Some(pos) = self.page_pos(page_hash(seed, domid, gfn), domid, gfn) {
            self.pages.remove_at(pos);
        }
    }

    /// Whether an index lost a mapping since the cell last had none Live.
    #[inline]
    pub(crate) fn indices_suspect(&self) -> bool {
        self.indices_suspect
    }

    /// An index lost a live mapping (an engine bug): counted, and the
    /// indices are not trusted while anything is Live.
    #[cold]
    pub(crate) fn note_index_miss(&mut self) {
        self.bugs[EngineBug::IndexMiss as usize] += 1;
        self.indices_suspect = true;
    }

    /// Unmapping slots whose entry is still to be cleared, as counted:
    /// marked since the last clearing pass (`deferred_entries`), and
    /// refused by the IOMMU (`refused_clears`). Their sum is the number of
    /// such slots (`check_invariants`).
    pub fn entries_to_clear(&self) -> (u64, u64) {
        (self.deferred_entries, self.refused_clears)
    }
    /// Live mappings taken out that an index (pages or extent records) did
    /// not hold where it should have (0 unless the engine has a bug; see
    /// `unindex`). Kept when the cell is given back and taken again.
    pub fn index_misses(&self) -> u64 {
        self.bugs[EngineBug::IndexMiss as usize]
    }

    /// Bugs of each kind since the last call, if any (for the engine's
    /// host-wide counts).
    #[inline]
    pub(crate) fn take_new_bugs(&mut self) -> Option<[u64; EngineBug::KINDS]> {
        if self.bugs == self.bugs_published {
            return None;
        }
        let mut new = [0; EngineBug::KINDS];
        for ((n, seen), published) in new.iter_mut().zip(self.bugs).zip(&mut self.bugs_published) {
            *n = seen.wrapping_sub(*published);
            *published = seen;
        }
        Some(new)
    }

    /// The context whose mappings this state holds.
    pub fn context(&self) -> ContextId {
        self.context
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
    /// Maps refused because the free list did not hold together (an
    /// engine bug). Tests require 0. Kept when the cell is given back and
    /// taken again (a diagnostic of the cell, as `index_misses`).
    pub fn free_list_breaks(&self) -> u64 {
        self.bugs[EngineBug::FreeListBreak as usize]
    }

    /// The free list from its head, if its links hold together: each slot
    /// on it Free and linked back to the one before, `free` of them. For
    /// tests (a walk), never built into Xen.
    #[cfg(any(test, feature = "std"))]
    pub fn free_list(&self) -> Option<Vec<u64>> {
        let (mut at, mut prev) = (self.free_head, NONE);
        let mut out = Vec::new();
        while at != NONE {
            let r = self.raw(at).filter(|r| r.state() == ST_FREE)?;
            if link64(r.aux) != prev || out.len() >= self.slots.len() {
                return None;
            }
            out.push(at);
            (prev, at) = (at, link64(r.next));
        }
        (out.len() as u64 == self.free).then_some(out)
    }

    /// Whether the free list holds together ([`free_list`](Self::free_list))
    /// and holds every Free slot. For tests (a walk of every slot), never
    /// built into Xen.
    #[cfg(feature = "std")]
    pub fn free_list_is_whole(&self) -> bool {
        let free_slots = self.slots.iter().filter(|r| r.state() == ST_FREE).count();
        self.free_list().is_some_and(|l| l.len() == free_slots)
    }
    /// BFNs in use (counted against the quota): every slot not free.
    pub fn used(&self) -> u64 {
        self.slots.len() as u64 - self.free
    }
    /// Counters and times.
    pub fn stats(&self) -> &DriverStats {
        &self.stats
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
    /// Every slot with its index, decoded.
    pub fn slots(&self) -> impl Iterator<Item = (u64, Slot)> + '_ {
        self.slots.iter().enumerate().map(|(i, s)| {
            #[cfg(test)]
            SLOTS_DECODED.with(|n| n.set(n.get() + 1));
            (i as u64, s.decode())
        })
    }
    /// Slots the slot array can hold without allocating (its memory, in
    /// slots; at most the quota and a block less one).
    pub fn slot_capacity(&self) -> usize {
        self.slots.capacity()
    }
    /// Bytes of heap this driver domain holds.
    pub fn heap_bytes(&self) -> usize {
        self.slots.heap_bytes()
            + self.pages.heap_bytes()
            + self.extents.heap_bytes()
            + self.extent_index.heap_bytes()
            + self.targets.heap_bytes()
            + self.regions.heap_bytes()
    }
    /// (Target domid, gfn) pages this cell maps: those of the page index
    /// and the Live pages of its extent records (a page mapped both ways,
    /// with other access, counts twice).
    pub fn mapped_pages(&self) -> usize {
        self.pages.len() + self.member_pages as usize
    }
    /// Live mappings a lookup of their page by their dedup key does not
    /// find at their own slot (0 unless an index lost one). A pass over
    /// every slot: for tests and checkers, not built into Xen.
    #[cfg(any(test, feature = "sim"))]
    pub fn live_mappings_not_found(&self, seed: u64) -> u64 {
        let mut missed = 0;
        for (idx, r) in self.slots.iter().enumerate() {
            if r.state() != ST_LIVE {
                continue;
            }
            let m = r.mapping();
            let at = self.probe_page(seed, m.domid, m.gfn);
            if self.find_key_at(seed, &at, &m) != Some(idx as u64) {
                missed += 1;
            }
        }
        missed
    }
    /// Extent records whose count of Live pages is not the number of
    /// their slots that say so, plus one if the cell's count of member
    /// pages is not their sum (0 unless the records went wrong). For tests
    /// and checkers, not built into Xen.
    #[cfg(any(test, feature = "sim"))]
    pub fn extent_records_miscounted(&self) -> u64 {
        let mut wrong = 0;
        let mut members = 0;
        for (rec, r) in self.extents.iter().enumerate() {
            if r.live == 0 {
                continue;
            }
            let held = (0..EXTENT_PAGES)
                .filter(|&i| {
                    self.raw(r.first as u64 + i).is_some_and(|s| {
                        s.is_live_page(DomId(r.domid), Gfn(r.head_gfn + i))
                            && s.bits & MEMBER != 0
                            && link64(s.next) == rec as u64
                    })
                })
                .count() as u64;
            wrong += u64::from(held != r.live as u64);
            members += r.live as u64;
        }
        // Every Live member is some record's.
        let member_slots = self
            .slots
            .iter()
            .filter(|s| s.state() == ST_LIVE && s.bits & MEMBER != 0)
            .count() as u64;
        wrong + u64::from(members != self.member_pages || member_slots != members)
    }
    /// Extent records Live in this cell (each of 1 to 512 pages).
    pub fn extent_records(&self) -> usize {
        self.extents.iter().filter(|r| r.live != 0).count()
    }
    /// Page-index and extent-index entries of target `domid` (0: this
    /// cell maps no page of it).
    pub fn pages_of(&self, seed: u64, domid: DomId) -> u64 {
        self.targets
            .get(target_hash(seed, domid), u64::from(domid.0))
            .unwrap_or(0)
    }

    /// Whether this cell may map a page of `domid` in `region`: `false`
    /// only when the region counts say it maps none (they are exact and
    /// count nothing there). Always `true` for a gfn beyond the regions.
    #[inline]
    pub(crate) fn may_map_in(&self, seed: u64, domid: DomId, region: u64) -> bool {
        if !self.regions_exact {
            return true;
        }
        let key = region_key(domid, region);
        self.regions.get(region_hash(seed, key), key).is_some()
    }
    /// Whether this cell may map a page of `domid` in `region` on its own
    /// (in the page index, not as a member of an extent record): `false`
    /// only when the region's exact count is all records, counted by one
    /// probe of the extent index for each of the region's 32 extents (a
    /// record counts once in its region, and a chain holds only records
    /// of its own extent, `install_extent`). What an extent map's check of
    /// its other pages asks: records of other extents hold other gfns.
    /// While the cell distrusts its indices, or a chain does not end
    /// within its bound, always `true`.
    pub(crate) fn may_map_pages_in(&self, seed: u64, domid: DomId, region: u64) -> bool {
        if !self.regions_exact || self.indices_suspect {
            return true;
        }
        let key = region_key(domid, region);
        let Some(count) = self.regions.get(region_hash(seed, key), key) else {
            return false;
        };
        let first = region << REGION_SHIFT;
        let mut records = 0u64;
        for head in (first..first + (1 << REGION_SHIFT)).step_by(EXTENT_PAGES as usize) {
            match self.records_at(seed, domid, head) {
                Some(n) => records += n,
                None => return true,
            }
            if records > count {
                return true;
            }
        }
        records != count
    }

    /// How many records `domid`'s extent at `head` has in this cell (the
    /// length of its chain); `None` for a chain that does not end within
    /// [`CHAIN_BOUND`] (a broken one: trusted for nothing).
    fn records_at(&self, seed: u64, domid: DomId, head: u64) -> Option<u64> {
        let mut rec = self.extent_chain(seed, domid, head).map(|(_, rec)| rec);
        for n in 0..CHAIN_BOUND as u64 {
            let Some(r) = rec
                .and_then(|at| self.record(at))
                .filter(|r| r.is_of(domid, head))
            else {
                return Some(n);
            };
            rec = Some(link64(r.next)).filter(|&next| next != NONE);
        }
        rec.is_none().then_some(CHAIN_BOUND as u64)
    }

    /// Whether the region counts are exact, so a hook over a range may
    /// skip the 64 MiB regions this cell maps nothing of (see
    /// [`REGION_SHIFT`]).
    pub fn regions_exact(&self) -> bool {
        self.regions_exact
    }
    /// What gfn hooks over ranges did in this cell: (probes, passes).
    pub fn range_work(&self) -> (u64, u64) {
        self.range_work
    }
    /// The region counts, as (target, region, pages): for tests.
    #[cfg(test)]
    pub(crate) fn region_counts(&self) -> Vec<(u16, u64, u64)> {
        let mut v: Vec<_> = self
            .regions
            .counts()
            .map(|(key, count)| {
                (
                    (key >> REGION_NUMBER_BITS) as u16,
                    key & ((1 << REGION_NUMBER_BITS) - 1),
                    count,
                )
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Slot `idx`, named by a guest (through a BFN), if the slot array
    /// has it: clamped under speculation, so every slot access made with
    /// the index it returns stays in bounds even past a mispredicted check
    /// ([`crate::nospec`]). Every index from a guest goes through here
    /// once, under the cell's lock; indices the engine keeps need not.
    #[inline(always)]
    pub(crate) fn guest_slot(&self, idx: u64) -> Option<u64> {
        let len = self.slots.len();
        let i = usize::try_from(idx).ok().filter(|&i| i < len)?;
        Some(array_index_nospec(i, len) as u64)
    }

    #[inline]
    fn raw(&self, idx: u64) -> Option<&RawSlot> {
        self.slots.get(usize::try_from(idx).ok()?)
    }
    #[inline]
    fn raw_mut(&mut self, idx: u64) -> Option<&mut RawSlot> {
        self.slots.get_mut(usize::try_from(idx).ok()?)
    }
    /// Whether slot `idx` is a free one (taking it needs no fallback).
    #[inline]
    pub(crate) fn is_free_slot(&self, idx: u64) -> bool {
        self.raw(idx).is_some_and(|r| r.state() == ST_FREE)
    }
    /// Slot `idx`, decoded.
    #[inline]
    pub(crate) fn slot(&self, idx: u64) -> Option<Slot> {
        self.raw(idx).map(RawSlot::decode)
    }
    /// Store `slot` at `idx` (which must exist).
    #[inline]
    pub(crate) fn set_slot(&mut self, idx: u64, slot: Slot) -> bool {
        match self.raw_mut(idx) {
            Some(r) => {
                *r = RawSlot::encode(&slot);
                true
            }
            None => false,
        }
    }
    /// The first Live slot at or after `from` mapping a gfn of `domid` in
    /// `[first, last)`, writable ones only unless `any`: the pass a hook
    /// over a long range makes instead of probing each gfn. Reads the
    /// packed slots as they are (a mapping is decoded only for a hit).
    pub(crate) fn next_live_in(
        &self,
        from: u64,
        domid: DomId,
        (first, last): (u64, u64),
        any: bool,
    ) -> Option<u64> {
        let from = usize::try_from(from).ok()?;
        self.slots
            .position_from(from, |r| {
                r.state() == ST_LIVE
                    && r.domid == domid.0
                    && r.gfn >= first
                    && r.gfn < last
                    && (any || r.bits & WRITE != 0)
            })
            .map(|i| i as u64)
    }

    /// The live mapping in slot `idx`.
    #[inline]
    pub(crate) fn live_at(&self, idx: u64) -> Option<Mapping> {
        self.raw(idx)
            .filter(|r| r.state() == ST_LIVE)
            .map(RawSlot::mapping)
    }
    /// The frame and access of the context-0 mapping a map installed in
    /// slot `idx` with generation `gen`, if the slot still holds it (Live,
    /// that context and generation): what the flush writes for a waiting
    /// map ([`PendingMap`]). Read from the stored slot, not decoded whole:
    /// the flush asks this of every map it writes.
    #[inline(always)]
    pub(crate) fn pending_entry(&self, idx: u64, gen: u32) -> Option<(Mfn, SlotAccess)> {
        self.raw(idx)
            .filter(|r| {
                r.state() == ST_LIVE && u32::from(r.context) == ContextId::DEFAULT.0 && r.gen == gen
            })
            .map(|r| (Mfn(r.mfn), r.access()))
    }
    /// Change the reference count of the live mapping in slot `idx`.
    #[inline]
    pub(crate) fn set_refs(&mut self, idx: u64, refs: u32) {
        if let Some(r) = self.raw_mut(idx).filter(|r| r.state() == ST_LIVE) {
            r.aux = refs;
        }
    }
    #[inline]
    fn set_next_live(&mut self, idx: u64, next: u64) {
        if let Some(r) = self.raw_mut(idx).filter(|r| r.state() == ST_LIVE) {
            r.next = link32(next);
        }
    }

    /// First live mapping of page (domid, gfn).
    pub(crate) fn page_head(&self, seed: u64, domid: DomId, gfn: Gfn) -> Option<u64> {
        self.page_pos(page_hash(seed, domid, gfn), domid, gfn)
            .and_then(|p| self.pages.value_at(p))
    }

    /// The page index bucket of page (domid, gfn), whose hash is `hash`.
    #[inline]
    fn page_pos(&self, hash: u64, domid: DomId, gfn: Gfn) -> Option<usize> {
        let slots = &self.slots;
        self.pages.position(hash, |v| {
            slots
                .get(v as usize)
                .is_some_and(|r| r.is_live_page(domid, gfn))
        })
    }

    /// The live mappings of a page's chain from its `head`: (slot,
    /// mapping), bounded by [`CHAIN_BOUND`].
    #[inline]
    fn chain_from(&self, head: Option<u64>) -> impl Iterator<Item = (u64, Mapping)> + '_ {
        let mut at = head;
        (0..CHAIN_BOUND).map_while(move |_| {
            let idx = at?;
            let m = self.live_at(idx)?;
            at = (m.next_same_page != NONE).then_some(m.next_same_page);
            Some((idx, m))
        })
    }

    /// The Live slot with `key`'s dedup key (same page, context, perms, attr).
    #[cfg(test)]
    pub(crate) fn find_key(&self, seed: u64, key: &Mapping) -> Option<u64> {
        self.find_key_at(seed, &self.probe_page(seed, key.domid, key.gfn), key)
    }

    /// Where page (domid, gfn) is in the page index: a map looks once and
    /// both dedups and installs with the answer.
    #[inline]
    pub(crate) fn probe_page(&self, seed: u64, domid: DomId, gfn: Gfn) -> PageAt {
        let hash = page_hash(seed, domid, gfn);
        PageAt {
            pos: self.page_pos(hash, domid, gfn),
            layout: self.pages.layout(),
            hash,
            domid,
            gfn,
        }
    }

    /// The Live slot with `key`'s dedup key (same page, context, perms,
    /// attr), from a fresh [`probe_page`](Self::probe_page) of the key's
    /// page: in the page's chain, else among its extent's records.
    /// (Always inlined, the records' walk kept out of line: as a call,
    /// or with the walk inlined, it cost each page map 20 instructions.)
    #[inline(always)]
    pub(crate) fn find_key_at(&self, seed: u64, at: &PageAt, key: &Mapping) -> Option<u64> {
        // A page not indexed (every first map of it) has no chain to walk.
        if let Some(head) = at.pos.and_then(|p| self.pages.value_at(p)) {
            if let Some((idx, _)) = self.chain_from(Some(head)).find(|(_, m)| m.same_key(key)) {
                return Some(idx);
            }
        }
        // (No record in the cell: one test, the page maps' usual case.)
        if self.extent_index.is_empty() {
            return None;
        }
        self.member_with_key(seed, key)
    }

    /// The first record of the extent of `domid` from gfn `head` (a
    /// multiple of 512) in this cell: its bucket and number.
    #[inline]
    fn extent_chain(&self, seed: u64, domid: DomId, head: u64) -> Option<(usize, u64)> {
        if self.extent_index.is_empty() {
            return None;
        }
        let records = &self.extents;
        self.extent_index
            .find_at(extent_hash(seed, domid, head), |v| {
                records
                    .get(v as usize)
                    .is_some_and(|r| r.is_of(domid, head))
            })
    }

    /// Record `rec` if it is one of (domid, head): the next record of its
    /// chain, and the slot of page (domid, gfn) if that still is its
    /// member. `None` ends a walk (a link that leads anywhere else).
    #[inline]
    pub(crate) fn extent_step(
        &self,
        rec: u64,
        domid: DomId,
        gfn: Gfn,
    ) -> Option<(Option<u64>, Option<u64>)> {
        let head = gfn.0 & !(EXTENT_PAGES - 1);
        let r = self.record(rec)?;
        if !r.is_of(domid, head) {
            return None;
        }
        let next = link64(r.next);
        let idx = r.first as u64 + (gfn.0 - head);
        let member = self
            .raw(idx)
            .filter(|s| s.is_live_page(domid, gfn) && s.bits & MEMBER != 0 && link64(s.next) == rec)
            .map(|_| idx);
        Some(((next != NONE).then_some(next), member))
    }

    /// Record `rec`, its number clamped under speculation: numbers come
    /// from slot links, which under a mispredicted state check may be any
    /// link a driver domain's own maps arranged (as `unlink_free` clamps
    /// its neighbours' numbers).
    #[inline(always)]
    fn record(&self, rec: u64) -> Option<&ExtentRecord> {
        let len = self.extents.len();
        let i = usize::try_from(rec).ok().filter(|&i| i < len)?;
        self.extents.get(array_index_nospec(i, len))
    }
    #[inline(always)]
    fn record_mut(&mut self, rec: u64) -> Option<&mut ExtentRecord> {
        let len = self.extents.len();
        let i = usize::try_from(rec).ok().filter(|&i| i < len)?;
        self.extents.get_mut(array_index_nospec(i, len))
    }

    /// Whether this cell holds any extent record.
    #[inline]
    pub(crate) fn has_extent_records(&self) -> bool {
        !self.extent_index.is_empty()
    }

    /// The first record of page (domid, gfn)'s extent in this cell (walk
    /// on with [`extent_step`](Self::extent_step)).
    #[inline]
    pub(crate) fn extent_first(&self, seed: u64, domid: DomId, gfn: Gfn) -> Option<u64> {
        self.extent_chain(seed, domid, gfn.0 & !(EXTENT_PAGES - 1))
            .map(|(_, rec)| rec)
    }

    /// The Live member with `key`'s dedup key, through the records of its
    /// page's extent. Bounded by [`CHAIN_BOUND`].
    #[inline(always)]
    fn member_with_key(&self, seed: u64, key: &Mapping) -> Option<u64> {
        let mut rec = self.extent_first(seed, key.domid, key.gfn);
        for _ in 0..CHAIN_BOUND {
            let (next, member) = self.extent_step(rec?, key.domid, key.gfn)?;
            if let Some(idx) = member.filter(|&i| self.live_at(i).is_some_and(|m| m.same_key(key)))
            {
                return Some(idx);
            }
            rec = next;
        }
        None
    }

    /// Where `at`'s page is now: `at`'s position if it still holds;
    /// otherwise a fresh probe's.
    /// A position is void once the buckets were rebuilt, or once a removal
    /// (a revocation on the way) took its value or shifted another value
    /// into or out of it: the bucket then holds another page, or none. A
    /// page not indexed stays so until an install, and only one install
    /// runs at a time. (Always inlined: with the extent map a second
    /// caller of `install_at`, a call here cost each map 18 instructions.)
    #[inline(always)]
    fn still_at(&self, at: &PageAt) -> Option<usize> {
        let holds = at.layout == self.pages.layout()
            && at.pos.is_none_or(|p| {
                self.pages
                    .value_at(p)
                    .and_then(|v| self.raw(v))
                    .is_some_and(|r| r.is_live_page(at.domid, at.gfn))
            });
        if holds {
            at.pos
        } else {
            self.page_pos(at.hash, at.domid, at.gfn)
        }
    }

    /// Make sure one more mapping needs no memory: a free slot (or room
    /// for one, up to `limit` slots) and room in both indices for the page
    /// `at` is a probe of.
    #[inline(always)]
    pub(crate) fn reserve_slot(&mut self, seed: u64, limit: u64, at: &PageAt) -> Result<(), Errno> {
        if self.free_head == NONE {
            if self.slots.len() as u64 >= limit {
                return Err(Errno::NoSpc);
            }
            self.fresh_limit = limit;
            self.slots
                .try_reserve_one(usize::try_from(limit).unwrap_or(usize::MAX))?;
        }
        self.reserve_index(seed, at)
    }

    /// Make sure one more mapping of the page `at` is a probe of needs no
    /// memory in either index: [`reserve_slot`](Self::reserve_slot) but the
    /// slot (an extent takes its slots together).
    #[inline(always)]
    pub(crate) fn reserve_index(&mut self, seed: u64, at: &PageAt) -> Result<(), Errno> {
        self.pages.reserve_one(at.hash)?;
        self.reserve_counts(seed)
    }

    /// Room for one more entry in the target and region counts (a page in
    /// the page index, or an extent record).
    #[inline(always)]
    fn reserve_counts(&mut self, seed: u64) -> Result<(), Errno> {
        // (Past the bound, or no longer exact, the entry is not counted.)
        if self.regions_exact && self.regions.len() < MAX_REGIONS {
            self.regions
                .reserve_one(|v| region_hash(seed, region_key_of(v)))?;
        }
        self.targets
            .reserve_one(|v| target_hash(seed, count_domid(v)))
    }

    /// Take [`EXTENT_PAGES`] slots in a row for a 2 MiB extent, whose BFNs
    /// `space` makes one run from a 2 MiB boundary: the block of the free
    /// list's head's BFN if all of it is free (an unmapped extent's, once
    /// released), else fresh slots from the first such run after the
    /// array's end (those skipped go on the free list), never more than
    /// `limit` slots. Each slot taken holds `Free` until the caller stores into it,
    /// as [`take_slot_near`](Self::take_slot_near) leaves one; the caller
    /// gives back those it does not use with [`free_slot`](Self::free_slot).
    /// Returns the first slot and its BFN. `Err(NoSpc)`: no such block
    /// (nothing changed); `Err(NoMem)`: the slot array could not grow (what
    /// it grew by stays, free). Bounded: a pass over one block, and fewer
    /// than `3 * 512` slots pushed.
    pub(crate) fn take_extent_slots(
        &mut self,
        space: &BfnSpace,
        limit: u64,
    ) -> Result<(u64, Bfn), Errno> {
        const LAST: u64 = EXTENT_PAGES - 1;
        let head_block = space
            .bfn_of(self.free_head)
            .and_then(|b| space.index_of(Bfn(b.0 & !LAST)))
            .and_then(|first| Some((first, space.aligned_run_at(first, EXTENT_PAGES)?)));
        if let Some((first, bfn)) = head_block {
            // A block an extent's unmap freed is one stretch of the list,
            // its slots in order: taken off it whole.
            if self.splice_free_block(first, EXTENT_PAGES) {
                return Ok((first, bfn));
            }
            let all_free = (first..=first + LAST).all(|i| self.is_free_slot(i));
            if all_free {
                for i in first..=first + LAST {
                    if !self.unlink_free(i) {
                        // A list that does not hold together (an engine
                        // bug): nothing is handed out.
                        for j in first..i {
                            self.free_slot(j);
                        }
                        self.bugs[EngineBug::FreeListBreak as usize] += 1;
                        return Err(Errno::NoSpc);
                    }
                }
                return Ok((first, bfn));
            }
        }
        // Fresh slots from the first index at or after the array's end
        // whose BFN starts an aligned run in one segment (a reserved range
        // shifts indices against BFNs), skipping at most two extents' worth
        // (the work, and the slots pushed, of one op stay bounded; past a
        // layout that would skip more, extents get ENOSPC).
        let len = self.slots.len() as u64;
        let first = match space.aligned_run_from(len, EXTENT_PAGES) {
            Some(first) if first - len < 2 * EXTENT_PAGES => first,
            _ => return Err(Errno::NoSpc),
        };
        let bfn = space.bfn_of(first).ok_or(Errno::NoSpc)?;
        if first + EXTENT_PAGES > limit {
            return Err(Errno::NoSpc);
        }
        let most = usize::try_from(limit).unwrap_or(usize::MAX);
        while (self.slots.len() as u64) < first + EXTENT_PAGES {
            let pushed = self.slots.try_reserve_one(most).and_then(|()| {
                self.slots
                    .try_push(RawSlot::encode(&Slot::Free { next: NONE }))
            });
            if let Err(e) = pushed {
                for j in len..self.slots.len() as u64 {
                    self.free_slot(j);
                }
                return Err(e);
            }
        }
        // (Fresh slots are in use at once, `free` unchanged; the ones
        // skipped are free.)
        for j in len..first {
            self.free_slot(j);
        }
        Ok((first, bfn))
    }

    /// Make sure one more extent record needs no memory: a free record (or
    /// room for one, never more than `limit` records), and room in the
    /// extent index and both counts.
    pub(crate) fn reserve_extent(&mut self, seed: u64, limit: u64) -> Result<(), Errno> {
        if self.extent_free == NONE {
            self.extents
                .try_reserve_one(usize::try_from(limit).unwrap_or(usize::MAX))?;
        }
        let records = &self.extents;
        self.extent_index
            .reserve_one(|v| record_hash(records, seed, v))?;
        self.reserve_counts(seed)
    }

    /// Store the 512 pages of the extent whose first page is `key` (its
    /// gfn a multiple of 512, its frame the first of a run) as Live members
    /// of a new record, in the slots from `first` that
    /// [`take_extent_slots`](Self::take_extent_slots) took, with the room
    /// [`reserve_extent`](Self::reserve_extent) made: one entry in the
    /// extent index and one count of the target and of its region, for
    /// the 512 pages. Returns the first page's generation (page `i`'s is
    /// that plus `i`). Fails only without that room, and then changes
    /// nothing the books hold (a record pushed stays free; a free list
    /// that names no free record, an engine bug, is dropped).
    pub(crate) fn install_extent(
        &mut self,
        seed: u64,
        first: u64,
        key: &Mapping,
    ) -> Result<u32, Errno> {
        let (domid, head) = (key.domid, key.gfn.0);
        let first32 = u32::try_from(first).map_err(|_| Errno::NoSpc)?;
        if (self.slots.len() as u64) < first.saturating_add(EXTENT_PAGES)
            || head & (EXTENT_PAGES - 1) != 0
        {
            return Err(Errno::Inval);
        }
        // The record: a free one, or a new one into the room reserved,
        // taken before anything changes (a free list that does not hold a
        // free record is an engine bug: refused, nothing changed).
        let rec = if self.extent_free != NONE {
            let rec = self.extent_free;
            if self.extents.get(rec as usize).is_none_or(|r| r.live != 0) {
                // Not followed again: the next records are pushed anew.
                self.extent_free = NONE;
                self.bugs[EngineBug::FreeListBreak as usize] += 1;
                return Err(Errno::NoSpc);
            }
            rec
        } else {
            let rec = self.extents.len() as u64;
            self.extents.try_push(ExtentRecord::default())?;
            self.free_record(rec);
            rec
        };
        // Counted first (taking a count back never allocates), as a page.
        self.count_target(seed, domid, true)?;
        let chain = self.extent_chain(seed, domid, head);
        if chain.is_none() {
            if let Err(e) = self
                .extent_index
                .insert(extent_hash(seed, domid, head), rec)
            {
                self.uncount_target(seed, domid);
                return Err(e);
            }
        }
        // (The record exists: checked above.)
        let next = match chain {
            Some((pos, old_head)) => {
                self.extent_index.set_at(pos, rec);
                old_head
            }
            None => NONE,
        };
        if let Some(r) = self.extents.get_mut(rec as usize) {
            self.extent_free = link64(r.next);
            *r = ExtentRecord {
                head_gfn: head,
                first: first32,
                live: EXTENT_PAGES as u32,
                next: link32(next),
                domid: domid.0,
            };
        }
        // Never fails: a page it cannot count ends the counting.
        self.count_region(seed, domid, key.gfn, true);
        let tag = self.next_gen.wrapping_add(1);
        for i in 0..EXTENT_PAGES {
            self.next_gen = self.next_gen.wrapping_add(1);
            let m = Mapping {
                gfn: Gfn(head + i),
                mfn: Mfn(key.mfn.0 + i),
                next_same_page: rec,
                gen: self.next_gen,
                ..*key
            };
            if let Some(s) = self.raw_mut(first + i) {
                *s = RawSlot::from_mapping(ST_LIVE, &m, MEMBER);
            }
        }
        self.live += EXTENT_PAGES;
        self.member_pages += EXTENT_PAGES;
        Ok(tag)
    }

    /// Put record `rec` (not in the index) on the free list.
    fn free_record(&mut self, rec: u64) {
        let head = self.extent_free;
        if let Some(r) = self.extents.get_mut(rec as usize) {
            *r = ExtentRecord {
                next: link32(head),
                ..ExtentRecord::default()
            };
            self.extent_free = rec;
        }
    }

    /// A Live member of record `rec` leaves it (the caller changes the
    /// slot's state next): the record's count down, and the record out of
    /// the index with its last page. Whether that was this domain's last
    /// entry of the target. A record that does not hold the slot (a bug)
    /// is counted in `bugs` as an index miss, the slot still goes. (Out of
    /// line: inlined, it cost every page unmap 7 instructions.)
    #[inline(never)]
    fn unindex_member(&mut self, seed: u64, idx: u64, domid: DomId, rec: u64) -> bool {
        self.live -= 1;
        let holds = |r: &ExtentRecord| {
            r.live != 0
                && r.domid == domid.0
                && idx
                    .checked_sub(r.first as u64)
                    .is_some_and(|o| o < EXTENT_PAGES)
        };
        let Some(r) = self.record_mut(rec).filter(|r| holds(r)) else {
            // (The slot was a Live member: it leaves the count with it.)
            self.member_pages = self.member_pages.saturating_sub(1);
            self.note_index_miss();
            self.regions_exact = false;
            self.trust_counts_again_if_no_live_mapping();
            return false;
        };
        r.live -= 1;
        let (left, head, next) = (r.live, r.head_gfn, link64(r.next));
        self.member_pages -= 1;
        let last_of_target = left == 0 && self.remove_record(seed, rec, domid, head, next);
        self.trust_counts_again_if_no_live_mapping();
        last_of_target
    }

    /// Unmap the extent whose first page is in slot `first` whole, when
    /// its record holds all 512 pages with one reference each: the record
    /// out of the index once, and each page onto the unmapping list with
    /// its entry still present, as 512 owner's unmaps
    /// (`Engine::unmap_locked`) would leave them. `false`, with nothing
    /// changed, otherwise (the caller then unmaps page by page). The
    /// caller checked each slot is a mapping of its context.
    pub(crate) fn unmap_whole_extent(&mut self, seed: u64, first: u64) -> bool {
        // `first` comes from a guest's BFN: it and every page's index are
        // clamped under speculation before they index anything.
        let len = self.slots.len() as u64;
        let Some(first) = self
            .guest_slot(first)
            .filter(|f| f.checked_add(EXTENT_PAGES).is_some_and(|end| end <= len))
        else {
            return false;
        };
        let Some(rec) = self
            .raw(first)
            .filter(|s| s.state() == ST_LIVE && s.bits & MEMBER != 0)
            .map(|s| link64(s.next))
        else {
            return false;
        };
        let whole = |r: &ExtentRecord| r.live == EXTENT_PAGES as u32 && r.first as u64 == first;
        let Some(&r) = self.record(rec).filter(|r| whole(r)) else {
            return false;
        };
        let once = (0..EXTENT_PAGES).all(|i| {
            let idx = self.guest_slot(first + i);
            idx.and_then(|i| self.raw(i)).is_some_and(|s| {
                s.state() == ST_LIVE && s.bits & MEMBER != 0 && link64(s.next) == rec && s.aux == 1
            })
        });
        if !once {
            return false;
        }
        if let Some(x) = self.record_mut(rec) {
            x.live = 0;
        }
        self.remove_record(seed, rec, DomId(r.domid), r.head_gfn, link64(r.next));
        self.live -= EXTENT_PAGES;
        self.member_pages -= EXTENT_PAGES;
        for i in 0..EXTENT_PAGES {
            if let Some(idx) = self.guest_slot(first + i) {
                self.push_unmapping_at(idx, false, true);
            }
        }
        self.stats.unmaps += EXTENT_PAGES;
        self.trust_counts_again_if_no_live_mapping();
        true
    }

    /// Take record `rec` (its last page gone, `next` its chain's link) out
    /// of the extent index and free it; whether that was this domain's
    /// last entry of the target. Bounded by [`CHAIN_BOUND`].
    fn remove_record(&mut self, seed: u64, rec: u64, domid: DomId, head: u64, next: u64) -> bool {
        let records = &self.extents;
        let found = self
            .extent_index
            .find_at(extent_hash(seed, domid, head), |v| {
                v == rec
                    || records
                        .get(v as usize)
                        .is_some_and(|r| r.is_of(domid, head))
            });
        let unlinked = match found {
            Some((pos, first)) if first == rec => {
                if next == NONE {
                    self.extent_index
                        .remove_at(pos, |v| record_hash(records, seed, v));
                } else {
                    self.extent_index.set_at(pos, next);
                }
                true
            }
            Some((_, mut at)) => {
                let mut done = false;
                for _ in 0..CHAIN_BOUND {
                    let Some(r) = self.extents.get_mut(at as usize).filter(|r| r.live != 0) else {
                        break;
                    };
                    if link64(r.next) == rec {
                        r.next = link32(next);
                        done = true;
                        break;
                    }
                    at = link64(r.next);
                }
                done
            }
            None => false,
        };
        if unlinked {
            self.free_record(rec);
        } else {
            // Not in its chain: a corrupted index (tests catch it here).
            // The record is not reused (a link may still name it; 24
            // bytes lost), and the cell's gfn hooks pass over its slots
            // from now on (`Engine::revoke_gfn`), so no page an index
            // lost stays mapped. (Tests require no miss:
            // `check_invariants`.)
            self.note_index_miss();
            self.regions_exact = false;
        }
        let last_of_target = self.count_target(seed, domid, false) == Ok(0);
        self.count_region(seed, domid, Gfn(head), false);
        last_of_target
    }

    /// Take a free slot (after [`reserve_slot`](Self::reserve_slot)). The
    /// slot holds `Free` until the caller stores into it.
    #[cfg(test)]
    pub(crate) fn take_slot(&mut self) -> Result<u64, Errno> {
        self.take_slot_near(NONE)
    }

    /// [`take_slot`](Self::take_slot), taking slot `wanted` if it is free
    /// (`NONE`, or a slot that is not: the free list's head; a fresh slot
    /// when the list is empty, or `wanted` itself if it is ahead of the
    /// next fresh one: [`take_fresh_ahead`](Self::take_fresh_ahead)). O(1)
    /// but for that one, whose skip is bounded by a block. `Err(NoSpc)` for
    /// a free list that does not hold together (an engine bug): nothing is
    /// handed out. The slot array grows past what
    /// [`reserve_slot`](Self::reserve_slot) reserved (it reserves room only
    /// when the list is empty) only by `take_fresh_ahead`'s skip, within
    /// the quota and a block.
    #[inline]
    pub(crate) fn take_slot_near(&mut self, wanted: u64) -> Result<u64, Errno> {
        if self.free_head == NONE {
            let idx = self.slots.len() as u64;
            if wanted_ahead_of(wanted, idx) {
                return self.take_fresh_ahead(wanted);
            }
            self.slots
                .try_push(RawSlot::encode(&Slot::Free { next: NONE }))?;
            // (a fresh slot is in use at once: `free` is unchanged)
            return Ok(idx);
        }
        if let Some(w) = self.guest_slot(wanted) {
            if self.unlink_free(w) {
                return Ok(w);
            }
        }
        let head = self.free_head;
        if self.unlink_free(head) {
            return Ok(head);
        }
        self.bugs[EngineBug::FreeListBreak as usize] += 1;
        Err(Errno::NoSpc)
    }

    /// A fresh slot for [`take_slot_near`](Self::take_slot_near) with no
    /// free slot, when the one wanted is ahead of the next fresh one (a
    /// falling run's in context 0, see `Engine::slot_wanted`): `wanted`,
    /// if it is within a 2 MiB block of the next, the slots skipped going
    /// on the free list for the run to fall into; else the next fresh one.
    /// The room for them is asked for here, best effort, never for more
    /// than `fresh_limit` and a block less one slots in all (the array's
    /// length and its memory alike: up to 511 free slots more than the
    /// quota, as after an extent's skip): a failure only changes which
    /// fresh slot the map takes (before its entry exists).
    #[cold]
    #[inline(never)]
    fn take_fresh_ahead(&mut self, wanted: u64) -> Result<u64, Errno> {
        let mut idx = self.slots.len() as u64;
        let skip = wanted.wrapping_sub(idx);
        let limit = self.fresh_limit.saturating_add(EXTENT_PAGES - 1);
        let most = usize::try_from(limit).unwrap_or(usize::MAX);
        if skip < EXTENT_PAGES && self.slots.try_reserve_in_block(skip as usize + 1, most) {
            for _ in 0..skip {
                self.slots
                    .try_push(RawSlot::encode(&Slot::Free { next: NONE }))?;
                self.free_slot(idx);
                idx += 1;
            }
        }
        self.slots
            .try_push(RawSlot::encode(&Slot::Free { next: NONE }))?;
        // (a fresh slot is in use at once: `free` is unchanged)
        Ok(idx)
    }

    /// Take `idx` off the free list, wherever it is on it. False (and
    /// nothing changed) unless `idx` is a free slot whose neighbours are
    /// free slots that name it back (or it is the head, with no slot
    /// before it): a list that does not hold together is never followed,
    /// and links are only ever written into free slots (a live slot's
    /// fields are its mapping's).
    ///
    /// The neighbours' numbers are clamped before they index anything:
    /// under a mispredicted Free check, `aux` is a live slot's count of
    /// references, which a caller can steer, and must not steer a load or
    /// a store (Spectre v1).
    #[inline(always)]
    fn unlink_free(&mut self, idx: u64) -> bool {
        let Some(r) = self.raw(idx).filter(|r| r.state() == ST_FREE) else {
            return false;
        };
        let (prev, next) = (link64(r.aux), link64(r.next));
        self.unlink_stretch((prev, idx), (idx, next), 1)
    }

    /// Take the stretch of `n` free slots from `top` to `bottom` (in list
    /// order) off the free list, `prev` the slot before it and `next` the
    /// one after: [`unlink_free`](Self::unlink_free)'s checks and writes
    /// at its two ends. The next one first (read), then the previous one
    /// (read and, if all holds, written), then the next one (written):
    /// four slot accesses in all, nothing written unless everything holds.
    #[inline(always)]
    fn unlink_stretch(
        &mut self,
        (prev, top): (u64, u64),
        (bottom, next): (u64, u64),
        n: u64,
    ) -> bool {
        let next_at = self.guest_slot(next);
        if next != NONE
            && !next_at
                .and_then(|i| self.raw(i))
                .is_some_and(|r| r.state() == ST_FREE && link64(r.aux) == bottom)
        {
            return false;
        }
        if prev == NONE {
            if self.free_head != top {
                return false;
            }
            self.free_head = next;
        } else if self.free_head == top {
            // The head has no slot before it.
            return false;
        } else {
            let prev_at = self.guest_slot(prev);
            match prev_at
                .and_then(|i| self.raw_mut(i))
                .filter(|p| p.state() == ST_FREE && link64(p.next) == top)
            {
                Some(p) => p.next = link32(next),
                None => return false,
            }
        }
        if let Some(r) = next_at.and_then(|i| self.raw_mut(i)) {
            r.aux = link32(prev);
        }
        self.free -= n;
        true
    }

    /// Take the `n` slots from `first` off the free list at once, if they
    /// are one stretch of it in index order, falling (as an extent's unmap
    /// frees them, each pushed at the head) or rising: one pass of reads
    /// and two links written, where [`unlink_free`](Self::unlink_free) of
    /// each wrote four slots a slot. False, and nothing changed, if they
    /// are not (some slot not free, the list in another order), or if the
    /// stretch's ends do not hold together with the list as `unlink_free`
    /// requires of one slot: its caller then goes slot by slot.
    fn splice_free_block(&mut self, first: u64, n: u64) -> bool {
        let Some(last) = n.checked_sub(1).and_then(|k| first.checked_add(k)) else {
            return false;
        };
        let linked = |s: &Self, i: u64, next: u64| {
            s.raw(i)
                .is_some_and(|r| r.state() == ST_FREE && link64(r.next) == next)
        };
        // (Top: the stretch's first slot on the list; bottom: its last.)
        let (top, bottom) = if (first + 1..=last).all(|i| linked(self, i, i - 1)) {
            (last, first)
        } else if (first..last).all(|i| linked(self, i, i + 1)) {
            (first, last)
        } else {
            return false;
        };
        let (Some(t), Some(b)) = (self.raw(top), self.raw(bottom)) else {
            return false;
        };
        if t.state() != ST_FREE || b.state() != ST_FREE {
            return false;
        }
        let (prev, next) = (link64(t.aux), link64(b.next));
        let inside = |i: u64| (first..=last).contains(&i);
        if inside(prev) || inside(next) {
            return false;
        }
        // (The ends' neighbours are clamped before they index anything,
        // and checked before anything is written, as for one slot.)
        self.unlink_stretch((prev, top), (bottom, next), n)
    }

    /// Return a slot to the free list (at its head).
    #[inline]
    pub(crate) fn free_slot(&mut self, idx: u64) {
        let head = self.free_head;
        if let Some(r) = self.raw_mut(idx) {
            *r = RawSlot::free_before(head);
            self.pushed_free(idx, head);
        }
    }

    /// The list's side of a push onto the free list whose head was `head`:
    /// slot `idx`, made [`RawSlot::free_before`] it, is its head now.
    #[inline(always)]
    fn pushed_free(&mut self, idx: u64, head: u64) {
        self.free_head = idx;
        self.free += 1;
        // (Only into a free slot: a live slot's `aux` is its count of
        // references.)
        if let Some(h) = self.raw_mut(head).filter(|h| h.state() == ST_FREE) {
            h.aux = link32(idx);
        }
    }

    /// Store a new Live mapping at `idx` and index it as the head of its
    /// page's chain (capacity reserved by [`reserve_slot`](Self::reserve_slot)).
    /// Returns the install's generation. `at` is a probe of `m`'s page made
    /// under the same lock (checked again here, so a stale one costs a
    /// probe, never a wrong chain).
    #[inline(always)]
    pub(crate) fn install_at(
        &mut self,
        seed: u64,
        at: &PageAt,
        idx: u64,
        mut m: Mapping,
    ) -> Result<u32, Errno> {
        // A probe of another page is no probe of this one: probe afresh
        // (two compares, in release builds too, keep a misfiled page, one
        // no revocation would find, out of reach of any caller).
        let (pos, hash) = if at.domid == m.domid && at.gfn == m.gfn {
            (self.still_at(at), at.hash)
        } else {
            let hash = page_hash(seed, m.domid, m.gfn);
            (self.page_pos(hash, m.domid, m.gfn), hash)
        };
        match pos {
            Some(pos) => {
                m.next_same_page = self.pages.value_at(pos).unwrap_or(NONE);
                self.pages.set_at(pos, idx);
            }
            None => {
                m.next_same_page = NONE;
                // Neither can fail after `reserve_slot`. Were one to, both
                // indices stay as they were (the caller's Consumed path
                // takes down a slot nothing indexes): count first, since
                // taking a count back never allocates.
                self.count_target(seed, m.domid, true)?;
                if let Err(e) = self.pages.insert(hash, idx) {
                    self.uncount_target(seed, m.domid);
                    return Err(e);
                }
                // Never fails: a page it cannot count ends the counting.
                self.count_region(seed, m.domid, m.gfn, true);
            }
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        m.gen = self.next_gen;
        self.set_slot(idx, Slot::Live(m));
        self.live += 1;
        Ok(m.gen)
    }

    /// Take back the count of a page whose indexing failed (never taken).
    #[cold]
    #[inline(never)]
    fn uncount_target(&mut self, seed: u64, domid: DomId) {
        let _ = self.count_target(seed, domid, false);
    }

    /// One more (`up`) or one fewer distinct page of `domid`; the count
    /// after. Always inlined: it is on every first map and last unmap of a
    /// page, and a call costs more than its hot path.
    #[inline(always)]
    fn count_target(&mut self, seed: u64, domid: DomId, up: bool) -> Result<u64, Errno> {
        let key = u64::from(domid.0);
        let n = match self.targets.heated(key, move || target_hash(seed, domid)) {
            Some(n) => n,
            None if up => {
                return self
                    .targets
                    .insert(target_hash(seed, domid), key, 1)
                    .map(|()| 1)
            }
            None => return Ok(0),
        };
        // (A stored count is at least 1.)
        let n = if up { n + 1 } else { n.saturating_sub(1) };
        if n == 0 {
            self.targets
                .remove_hot(move |v| target_hash(seed, count_domid(v)));
        } else {
            self.targets.set_hot(n);
        }
        Ok(n)
    }

    /// One more (`up`) or one fewer distinct page of `domid` in `gfn`'s
    /// region, while the counts are exact. Never fails and never refuses
    /// (room for a new region is reserved with the slot, so a map that
    /// cannot get memory for it is refused before it changes anything):
    /// where a page cannot be counted, the counts stop being exact
    /// (hooks then do without them). Always inlined for its hot path, as
    /// [`count_target`](Self::count_target).
    #[inline(always)]
    fn count_region(&mut self, seed: u64, domid: DomId, gfn: Gfn, up: bool) {
        let (true, Some(region)) = (self.regions_exact, region_of(gfn.0)) else {
            // (A gfn without a number is never counted: only `up` gets
            // here with one while exact.)
            self.regions_exact = false;
            return;
        };
        let key = region_key(domid, region);
        match self.regions.heated(key, move || region_hash(seed, key)) {
            // A count past what its field holds (a region's pages and its
            // extents' records: at most 2^14 + 32 * 12), or a page leaving
            // a region counted empty, is no count: stop trusting them all.
            Some(n) => match (up, n) {
                (true, n) if n >= REGION_COUNT_MAX => self.regions_exact = false,
                (false, 0) => self.regions_exact = false,
                (true, n) => self.regions.set_hot(n + 1),
                (false, 1) => self
                    .regions
                    .remove_hot(move |v| region_hash(seed, region_key_of(v))),
                (false, n) => self.regions.set_hot(n - 1),
            },
            None if up => self.add_region(seed, key),
            // A page leaving a region counted empty: not one, as above.
            None => self.regions_exact = false,
        }
    }

    /// A first page in the region with `key` (room was reserved with the
    /// slot, unless the bound was reached).
    #[inline(never)]
    fn add_region(&mut self, seed: u64, key: u64) {
        // Never allocates here (the mapping is already in the IOMMU): no
        // room means the bound was reached.
        let counted = self.regions.len() < MAX_REGIONS
            && self.regions.has_room()
            && self.regions.insert(region_hash(seed, key), key, 1).is_ok();
        if !counted {
            self.regions_exact = false;
        }
    }

    /// Take a Live mapping out of its page's chain (the slot keeps it until
    /// the caller changes the slot's state), and say whether it was this
    /// domain's last page of its target. Bounded by [`CHAIN_BOUND`].
    /// `None` only for a slot that is not Live: a Live one always comes
    /// out, so its caller goes on to take its IOMMU entry down. A page the
    /// index does not hold (a bug) is counted in `bugs`, and the
    /// region counts are no longer trusted (hooks then probe or pass).
    pub(crate) fn unindex(&mut self, seed: u64, idx: u64) -> Option<bool> {
        let r = self.raw(idx).filter(|r| r.state() == ST_LIVE)?;
        let (domid, gfn, after) = (DomId(r.domid), Gfn(r.gfn), r.next);
        let member = r.bits & MEMBER != 0;
        Some(self.unindex_fields(seed, idx, (domid, gfn, after), member))
    }

    /// The owner's unmap of slot `idx`, a Live mapping of `context`: one
    /// reference fewer; with its last one, the mapping out of the books
    /// ([`unindex`](Self::unindex)) and onto the unmapping list with its
    /// IOMMU entry still present, for the flush to clear
    /// ([`push_unmapping_at`](Self::push_unmapping_at)), counted in
    /// `stats.unmaps`. `None`, with nothing changed, for a slot that is not
    /// a Live mapping of `context`.
    ///
    /// The slot is read and written once: it leaves Live before the index
    /// lets it go, which never reads it (a bucket or link naming `idx` is
    /// known to be its own; see `unindex_fields`).
    #[inline(always)]
    pub(crate) fn unmap_owned(&mut self, seed: u64, idx: u64, context: ContextId) -> Option<()> {
        let head = self.unmapping_head;
        let r = self
            .raw_mut(idx)
            .filter(|r| r.state() == ST_LIVE && u32::from(r.context) == context.0)?;
        if r.aux > 1 {
            r.aux -= 1;
            return Some(());
        }
        let (domid, gfn, after) = (DomId(r.domid), Gfn(r.gfn), r.next);
        let member = r.bits & MEMBER != 0;
        // (`push_unmapping_at(idx, false, true)`, with the slot in hand.)
        link_unmapping(r, head, false, true);
        self.pushed_unmapping(idx, true);
        self.stats.unmaps += 1;
        self.unindex_fields(seed, idx, (domid, gfn, after), member);
        Some(())
    }

    /// [`unindex`](Self::unindex) of slot `idx`, whose mapping is of page
    /// (`domid`, `gfn`), its chain's next `after` as the slot links it
    /// (its record's number for a `member` of an extent). Reads no field
    /// of slot `idx`: a bucket naming `idx` is taken as its page's, and
    /// the chain's walk stops at the slot before it.
    ///
    /// The link is taken as stored and widened only where it is used: the
    /// common case only asks whether there is one. (Widened up front, both
    /// forms were kept on the stack across the index removal's call.)
    #[inline(always)]
    fn unindex_fields(
        &mut self,
        seed: u64,
        idx: u64,
        (domid, gfn, after): (DomId, Gfn, u32),
        member: bool,
    ) -> bool {
        if member {
            return self.unindex_member(seed, idx, domid, link64(after));
        }
        let slots = &self.slots;
        // `idx` is a live mapping of the page: a bucket naming it is the
        // page's (the common case, `idx` heading its chain, needs no
        // second read of a slot).
        let found = self.pages.entry(page_hash(seed, domid, gfn), |v| {
            v == idx
                || slots
                    .get(v as usize)
                    .is_some_and(|r| r.is_live_page(domid, gfn))
        });
        let Some(entry) = found else {
            // Fail closed: the mapping still goes (a revocation that
            // stopped here left a device its access). The counts are left
            // as they are, too high rather than too low: the page's count
            // is one per page, not per mapping, and a count that reached 0
            // early would clear the cell's gate bit while it still maps
            // pages of the target. They are right again once the cell is
            // empty, or has no live mapping left (below). (A pass over
            // the slots, a range hook's or a walk's, the owner's unmap by
            // BFN and its teardown find such a mapping; a hook for one gfn
            // goes by the index until a miss like this one is noted, and
            // passes over the slots from then on while anything is Live:
            // `indices_suspect`.)
            self.note_index_miss();
            self.regions_exact = false;
            self.live -= 1;
            self.trust_counts_again_if_no_live_mapping();
            return false;
        };
        let head = entry.value();
        let mut last_of_target = false;
        if head == idx {
            if link64(after) == NONE {
                entry.remove();
                last_of_target = self.count_target(seed, domid, false) == Ok(0);
                self.count_region(seed, domid, gfn, false);
            } else {
                entry.set(link64(after));
            }
        } else {
            let mut at = head;
            let mut found = false;
            for _ in 0..CHAIN_BOUND {
                let Some(cur) = self.raw(at).filter(|r| r.state() == ST_LIVE) else {
                    break;
                };
                let cur_next = link64(cur.next);
                if cur_next == idx {
                    self.set_next_live(at, link64(after));
                    found = true;
                    break;
                }
                at = cur_next;
            }
            if !found {
                // Not in its chain: a corrupted index. Tests catch it here;
                // in Xen the slot is still taken down (its caller unmaps it).
                debug_assert!(false, "live mapping missing from its page chain");
                self.note_index_miss();
                self.regions_exact = false;
            }
        }
        self.live -= 1;
        self.trust_counts_again_if_no_live_mapping();
        last_of_target
    }

    /// Once counts are no longer trusted (a page that could not be counted,
    /// or a mapping the index lost, which leaves them too high), they are
    /// right again when no live mapping is left, indexed or not: empty.
    ///
    /// The test of `live` inline, the rest out of line: inlined whole, the
    /// unmap loop asked `live` again after the two tests joined (2
    /// instructions an unmap).
    #[inline]
    fn trust_counts_again_if_no_live_mapping(&mut self) {
        if self.live == 0 {
            self.trust_counts_again_now_empty();
        }
    }

    /// [`trust_counts_again_if_no_live_mapping`](Self::trust_counts_again_if_no_live_mapping)
    /// once no live mapping is left.
    #[cold]
    #[inline(never)]
    fn trust_counts_again_now_empty(&mut self) {
        if self.live == 0 && self.indices_suspect {
            // Nothing is Live: whatever the indices still hold after a
            // miss names nothing (slots that left Live lost their member
            // bit; pending maps name slots, not records), and goes. The
            // records a broken list leaked come back with it.
            self.pages.clear();
            self.extent_index.clear();
            self.extents.clear();
            self.extent_free = NONE;
            self.member_pages = 0;
            self.indices_suspect = false;
        }
        if !self.regions_exact
            && self.live == 0
            && self.pages.is_empty()
            && self.extent_index.is_empty()
        {
            self.regions.clear();
            self.targets.clear();
            self.regions_exact = true;
        }
    }

    /// The IOMMU entry of a former Live mapping is gone: wait for the flush.
    #[inline]
    pub(crate) fn push_unmapping(&mut self, idx: u64, mut mapping: Mapping, then_revoked: bool) {
        mapping.next_same_page = self.unmapping_head;
        let slot = Slot::Unmapping {
            mapping,
            then_revoked,
            entry_present: false,
        };
        if self.set_slot(idx, slot) {
            self.unmapping_head = idx;
            self.unmapping_len += 1;
        } else {
            self.note_bug(EngineBug::ReferenceLost);
        }
    }

    /// [`push_unmapping`](Self::push_unmapping) of the mapping slot `idx`
    /// holds (a Live one already out of the index, or a Stuck one off its
    /// list), changed in place. With `entry_present` its IOMMU entry is
    /// still there, for the flush to clear first (an owner's unmap).
    #[inline]
    pub(crate) fn push_unmapping_at(&mut self, idx: u64, then_revoked: bool, entry_present: bool) {
        let head = self.unmapping_head;
        let Some(r) = self
            .raw_mut(idx)
            .filter(|r| matches!(r.state(), ST_LIVE | ST_STUCK))
        else {
            self.note_bug(EngineBug::ReferenceLost);
            return;
        };
        link_unmapping(r, head, then_revoked, entry_present);
        self.pushed_unmapping(idx, entry_present);
    }

    /// The list's side of a push onto the unmapping list: slot `idx`,
    /// linked by [`link_unmapping`], is its head now.
    #[inline(always)]
    fn pushed_unmapping(&mut self, idx: u64, entry_present: bool) {
        self.unmapping_head = idx;
        self.unmapping_len += 1;
        self.deferred_entries += u64::from(entry_present);
    }

    /// What the flush needs of an Unmapping slot; `None` for any other
    /// state.
    #[inline]
    pub(crate) fn unmapping_at(&self, idx: u64) -> Option<Unmapped> {
        self.raw(idx)?.unmapped()
    }

    /// The release pass's step at Unmapping slot `idx`: what
    /// [`unmapping_at`](Self::unmapping_at) answers, with the slot freed
    /// ([`free_slot`](Self::free_slot)) where the release frees it (its
    /// entry cleared, and no notice to follow: an owner's unmap), from the
    /// one access to it. `None`, nothing changed, for any other state.
    /// The caller releases the page after (under the same lock: no map
    /// takes the BFN before), and takes the slot off the unmapping list
    /// (which its free state no longer links: `next` is in the answer).
    ///
    /// A slot it frees is linked back at once to the slot the pass visits
    /// next (its `next` on the unmapping list), as if that one were freed
    /// after it, which it usually is. With `linked` the pass's last step
    /// freed a slot so linked (the free list's head, whose back link is
    /// `idx`): freeing `idx` then needs no second access to the head. A
    /// step that frees nothing after one that did, and the pass's end,
    /// unset the head's back link ([`unset_free_head_link`]): the list is
    /// then as if each slot had been pushed with [`free_slot`].
    ///
    /// [`unset_free_head_link`]: Self::unset_free_head_link
    /// [`free_slot`]: Self::free_slot
    #[inline(always)]
    pub(crate) fn take_released(&mut self, idx: u64, linked: bool) -> Option<Unmapped> {
        let head = self.free_head;
        let r = self.raw_mut(idx)?;
        let u = r.unmapped()?;
        if !u.entry_present && !u.then_revoked {
            *r = RawSlot {
                aux: link32(u.next),
                ..RawSlot::free_before(head)
            };
            if linked {
                // (The head, freed by the step before, links back here
                // already: nothing between two steps touches the list.)
                debug_assert!(
                    self.raw(head).is_some_and(|h| h.aux == link32(idx)),
                    "the free list's head changed within a release pass"
                );
                self.free_head = idx;
                self.free += 1;
            } else {
                self.pushed_free(idx, head);
            }
        }
        Some(u)
    }

    /// [`take_released`](Self::take_released) of slot `idx` with `linked`,
    /// for a slot it frees, of `domid`: an Unmapping slot whose entry was
    /// cleared and that no notice follows. Its page (frame, writable) and
    /// its next on the unmapping list; `None`, nothing changed, for any
    /// other slot (the release pass's general step takes it).
    ///
    /// The free list's head is `head`, as the caller holds it: the slot is
    /// freed before it, and the caller makes the slot the head and counts
    /// it in `free` (a loop of them stores the head and the count once,
    /// after it).
    #[inline(always)]
    pub(crate) fn take_released_plain_before(
        &mut self,
        idx: u64,
        domid: DomId,
        head: u64,
    ) -> Option<(Mfn, bool, u64)> {
        let r = self
            .raw_mut(idx)
            .filter(|r| r.state() == ST_UNMAPPING && r.bits & THEN_REVOKED == 0)
            .filter(|r| r.domid == domid.0)?;
        let (mfn, writable, next) = (Mfn(r.mfn), r.bits & WRITE != 0, link64(r.next));
        *r = RawSlot {
            aux: link32(next),
            ..RawSlot::free_before(head)
        };
        debug_assert!(
            self.raw(head).is_some_and(|h| h.aux == link32(idx)),
            "the free list's head changed within a release pass"
        );
        Some((mfn, writable, next))
    }

    /// The free list's head has no slot before it: its back link, which
    /// [`take_released`](Self::take_released) set to a slot it did not
    /// free after all, unset.
    #[inline]
    pub(crate) fn unset_free_head_link(&mut self) {
        if let Some(h) = self
            .raw_mut(self.free_head)
            .filter(|h| h.state() == ST_FREE)
        {
            h.aux = link32(NONE);
        }
    }

    /// What the clearing pass needs of Unmapping slot `idx`: whether its
    /// entry is still present, its context, and the next slot on the
    /// list; `None` for any other state. With `unmark` a present entry is
    /// taken as cleared (its mark goes: the clearing pass takes it into a
    /// run, and marks it again if the IOMMU refuses). One access to the
    /// slot.
    #[inline]
    pub(crate) fn unmapping_link_unmark(
        &mut self,
        idx: u64,
        unmark: bool,
    ) -> Option<(bool, ContextId, u64)> {
        let r = self
            .raw_mut(idx)
            .filter(|r| matches!(r.state(), ST_UNMAPPING | ST_UNMAPPING_ENTRY_PRESENT))?;
        let present = r.state() == ST_UNMAPPING_ENTRY_PRESENT;
        if present && unmark {
            r.bits = (r.bits & !STATE_MASK) | ST_UNMAPPING;
        }
        Some((present, ContextId(r.context as u32), link64(r.next)))
    }

    /// The Unmapping slot `idx` still has its IOMMU entry (the IOMMU
    /// refused to clear it after the clearing pass unmarked it): marked
    /// again. `false` (and nothing changed) for a slot in any other state.
    #[cold]
    pub(crate) fn entry_marked_again(&mut self, idx: u64) -> bool {
        let Some(r) = self
            .raw_mut(idx)
            .filter(|r| matches!(r.state(), ST_UNMAPPING | ST_UNMAPPING_ENTRY_PRESENT))
        else {
            return false;
        };
        r.bits = (r.bits & !STATE_MASK) | ST_UNMAPPING_ENTRY_PRESENT;
        true
    }

    /// Room for `limit` maps in `pending_maps` (reserved once, with the
    /// rest of a map's memory: `ENOMEM`, nothing changed, if it cannot be).
    pub(crate) fn reserve_pending_maps(&mut self, limit: usize) -> Result<(), Errno> {
        if self.pending_maps.capacity() < limit {
            let want = limit.saturating_sub(self.pending_maps.len());
            self.pending_maps
                .try_reserve_exact(want)
                .map_err(|_| Errno::NoMem)?;
        }
        Ok(())
    }

    /// Whether a map may leave its entry for the flush: room reserved for
    /// one more in `pending_maps`, below `limit`.
    #[inline]
    pub(crate) fn pending_map_room(&self, limit: usize) -> bool {
        let n = self.pending_maps.len();
        n < limit && n < self.pending_maps.capacity()
    }

    /// The context of the live mapping in slot `idx`, and its references.
    #[inline]
    pub(crate) fn live_refs(&self, idx: u64) -> Option<(ContextId, u32)> {
        let r = self.raw(idx).filter(|r| r.state() == ST_LIVE)?;
        Some((ContextId(r.context as u32), r.aux))
    }

    /// The IOMMU refused to unmap a mapping being taken down: queued at
    /// the tail of the stuck list. Once unmapped and flushed it becomes a
    /// notice (`then_revoked`) or free.
    pub(crate) fn push_stuck(&mut self, idx: u64, mut mapping: Mapping, then_revoked: bool) {
        mapping.next_same_page = NONE;
        let stuck = Slot::Stuck {
            mapping,
            then_revoked,
        };
        if !self.set_slot(idx, stuck) {
            self.note_bug(EngineBug::ReferenceLost);
            return;
        }
        let tail = self.stuck_tail;
        match self.raw_mut(tail).filter(|r| r.state() == ST_STUCK) {
            Some(r) => r.next = link32(idx),
            None => self.stuck_head = idx,
        }
        self.stuck_tail = idx;
        self.stuck += 1;
    }

    /// Whether the stuck list holds a writable entry of `domid`'s, looking
    /// at most `*looks` entries (counted down): past them, or at a link
    /// that does not lead to a stuck entry while the count says more are
    /// there, it answers yes (fail closed). Whatever the entry's gfn: the
    /// gfn it was mapped at may no longer be its frame's (the guest moved
    /// the page since, and the hook of its old gfn made it stuck), so a
    /// range cannot be told from it (a re-review of 2026-12-06).
    pub(crate) fn stuck_write_of(&self, domid: DomId, looks: &mut u64) -> bool {
        let mut idx = self.stuck_head;
        for _ in 0..self.stuck {
            if *looks == 0 {
                return true;
            }
            *looks -= 1;
            let Some(Slot::Stuck { mapping, .. }) = self.slot(idx) else {
                return true;
            };
            if mapping.domid == domid && mapping.perms.write {
                return true;
            }
            idx = mapping.next_same_page;
        }
        false
    }

    /// Take the oldest stuck entry off the list: its slot, mapping, and
    /// whether it then becomes a notice.
    pub(crate) fn pop_stuck(&mut self) -> Option<(u64, Mapping, bool)> {
        let idx = self.stuck_head;
        let Some(Slot::Stuck {
            mapping,
            then_revoked,
        }) = self.slot(idx)
        else {
            // Empty, or a link to a slot that is not Stuck (never made):
            // the list ends. Its count stays: were entries lost with the
            // link, the cell's retry flag stays set (a log-dirty enable
            // then answers `EIO` rather than success: fail closed).
            debug_assert!(idx == NONE && self.stuck == 0, "stuck list broken");
            self.stuck_head = NONE;
            self.stuck_tail = NONE;
            return None;
        };
        self.stuck_head = mapping.next_same_page;
        if self.stuck_head == NONE {
            self.stuck_tail = NONE;
        }
        self.stuck = self.stuck.saturating_sub(1);
        Some((idx, mapping, then_revoked))
    }

    /// Queue a revocation notice at the tail.
    /// Queue a notice; `order` is the driver domain's count of notices
    /// when it was queued, which orders notices across its cells.
    pub(crate) fn push_revoked(&mut self, idx: u64, notice: Notice, order: u64) {
        let tail = self.revoked_tail;
        let slot = Slot::Revoked {
            notice,
            prev: tail,
            next: NONE,
        };
        if !self.set_slot(idx, slot) {
            return;
        }
        // A notice has no frame: its order goes where the frame was. Only
        // the links of a queued notice ever change, so it stays.
        if let Some(r) = self.raw_mut(idx) {
            r.mfn = order;
        }
        match self.raw_mut(tail).filter(|r| r.state() == ST_REVOKED) {
            Some(r) => r.next = link32(idx),
            None => self.revoked_head = idx,
        }
        self.revoked_tail = idx;
        self.revoked += 1;
    }

    /// [`push_revoked`](Self::push_revoked) of the page Unmapping slot
    /// `idx` held (its release done), read from the slot: the release
    /// pass carries only what every release needs across the page's put.
    pub(crate) fn push_revoked_unmapped(&mut self, idx: u64, order: u64) {
        let Some(r) = self.raw(idx) else {
            return;
        };
        let notice = Notice {
            domid: DomId(r.domid),
            gfn: Gfn(r.gfn),
            context: ContextId(r.context as u32),
        };
        self.push_revoked(idx, notice, order);
    }

    /// Remove a revoked slot from the notice queue and free it.
    pub(crate) fn ack_revoked(&mut self, idx: u64) -> Result<Notice, Errno> {
        let Some(Slot::Revoked { notice, prev, next }) = self.slot(idx) else {
            return Err(Errno::NoEnt);
        };
        // The links are clamped before they index anything: under a
        // mispredicted Revoked match, they are a live slot's fields (its
        // count of references), which a caller can steer (Spectre v1).
        let (prev_at, next_at) = (self.guest_slot(prev), self.guest_slot(next));
        match prev_at
            .and_then(|i| self.raw_mut(i))
            .filter(|r| r.state() == ST_REVOKED)
        {
            Some(r) => r.next = link32(next),
            None => self.revoked_head = next,
        }
        match next_at
            .and_then(|i| self.raw_mut(i))
            .filter(|r| r.state() == ST_REVOKED)
        {
            Some(r) => r.aux = link32(prev),
            None => self.revoked_tail = prev,
        }
        self.revoked -= 1;
        self.revoked_acks = self.revoked_acks.wrapping_add(1);
        self.free_slot(idx);
        Ok(notice)
    }

    /// Entries unmapped but not flushed yet, or whose unmap the IOMMU
    /// refused: the device may still reach them.
    pub(crate) fn has_pending(&self) -> bool {
        self.unmapping_head != NONE || self.stuck_head != NONE || !self.gather.is_empty()
    }

    /// Whether this state still holds a page reference, or a flush its
    /// pages wait for, by its lists or its counts: a reset would forget
    /// them (each a page never freed, its domain never destroyed).
    pub(crate) fn holds_pages(&self) -> bool {
        self.live != 0
            || self.unmapping_len != 0
            || self.stuck != 0
            || self.has_pending()
            || self.flush_failed
    }

    /// An engine bug of kind `bug` this cell survived, counted for the
    /// host to report.
    #[cold]
    pub(crate) fn note_bug(&mut self, bug: EngineBug) {
        if let Some(n) = self.bugs.get_mut(bug as usize) {
            *n += 1;
        }
    }

    /// Whether this state holds nothing a driver domain could tell apart
    /// from no state at all (so its cell may go to another domain).
    #[inline]
    pub(crate) fn is_idle(&self) -> bool {
        self.used() == 0 && self.contexts == 1 && self.gather.is_empty()
    }

    /// Reset the tables once no BFN is in use (everything unmapped and
    /// acknowledged). Small tables (larger in a context's cell: see
    /// [`KEEP_CONTEXT_WHEN_EMPTY`]) are kept, emptied, for the next batch:
    /// a mediator that maps and unmaps a batch at a time would otherwise
    /// free and reallocate (and the allocator zero) them every round, which
    /// cost more than everything else a map does. Larger ones are given
    /// back: the engine's memory returns to what an idle driver domain
    /// costs. Emptied, the next maps take BFNs in ascending order again.
    /// Frees only; never allocates.
    ///
    /// The test is inlined into every unlock (`put_driver`), the reset
    /// is not: called, the test cost each unlock about 20 instructions.
    #[inline(always)]
    pub(crate) fn compact_if_empty(&mut self) {
        if self.used() != 0 || self.slots.is_empty() {
            return;
        }
        self.compact_empty();
    }

    /// The reset of [`compact_if_empty`](Self::compact_if_empty), for a
    /// state with slots and none of them in use.
    #[inline(never)]
    fn compact_empty(&mut self) {
        if self.slots.capacity() <= self.keep_when_empty() {
            self.slots.clear();
            if self.pages.heap_bytes() <= self.index_kept_bytes() {
                self.pages.clear();
            } else {
                self.pages.release();
            }
            self.extents.clear();
            self.extent_index.clear();
            self.targets.clear();
            self.regions.clear();
        } else {
            self.slots.release();
            self.pages.release();
            self.extents.release();
            self.extent_index.release();
            self.targets.release();
            self.regions.release();
        }
        self.regions_exact = true;
        self.extent_free = NONE;
        self.member_pages = 0;
        self.free_head = NONE;
        self.free = 0;
        self.trim_blocker = NONE;
        self.run_hint = NO_RUN;
        self.fresh_limit = 0;
        self.unmapping_head = NONE;
        self.unmapping_len = 0;
        self.deferred_entries = 0;
        self.refused_clears = 0;
        self.pending_maps.clear();
        self.stuck_head = NONE;
        self.stuck_tail = NONE;
        self.revoked_head = NONE;
        self.revoked_tail = NONE;
        self.revoked_cursor = (0, NONE, self.revoked_acks);
    }

    /// Give the slot array's last block back (128 KiB) once every slot in
    /// it is free and at least a block's worth of free slots stays below
    /// it, and with it the page index's empty shards. A cell used to keep
    /// its peak's memory for as long as it held any BFN (a review of
    /// 2026-12-06: a device model with 4 cells could hold about 4 quotas'
    /// worth with one BFN in each); now what it keeps follows its highest
    /// slot in use. The block stays while any slot of it is in use (a BFN
    /// never moves), and the free block below it is the hysteresis: a
    /// working set that swings within a block neither frees nor grows.
    ///
    /// Called where the owner's own call ends, after its flush
    /// ([`Engine::finish_contexts`](super::Engine::finish_contexts)): a
    /// hook or a teardown slice never pays for it. Bounded: O(1) unless
    /// the block may be free; then one pass over it (4096 slots), after
    /// which the slot found in use is remembered and the pass made again
    /// only once that slot is free; taking the block's slots off the free
    /// list (four slot accesses each, those outside the block scattered
    /// over the array where unmaps freed slots in no order) and the
    /// shards' pass ([`ShardedIndex::release_empty_shards`]) only when a
    /// block goes, [`TRIM_BLOCKS_PER_CALL`] over the call's cells. Whether
    /// one went. Frees only; never allocates.
    pub(crate) fn trim_free_tail(&mut self) -> bool {
        const BLOCK: u64 = CHUNK_LEN as u64;
        let len = self.slots.len() as u64;
        // (An empty cell gives everything back: `compact_if_empty`.)
        if len <= BLOCK || self.used() == 0 || self.trim_blocker == TRIM_OFF {
            return false;
        }
        let start = (len - 1) / BLOCK * BLOCK;
        if self.free < (len - start).saturating_add(BLOCK) {
            return false;
        }
        if self.trim_blocker >= start
            && self
                .raw(self.trim_blocker)
                .is_some_and(|r| r.state() != ST_FREE)
        {
            return false;
        }
        let start_at = start as usize;
        if let Some(busy) = self.slots.position_from(start_at, |r| r.state() != ST_FREE) {
            self.trim_blocker = busy as u64;
            return false;
        }
        for idx in start..len {
            if !self.unlink_free(idx) {
                // The list does not hold together (an engine bug): the
                // slots taken off go back on it, and no trim is tried
                // again until the cell empties.
                for back in start..idx {
                    self.free_slot(back);
                }
                self.bugs[EngineBug::FreeListBreak as usize] += 1;
                self.trim_blocker = TRIM_OFF;
                return false;
            }
        }
        self.slots.pop_last_block();
        self.trim_blocker = NONE;
        self.pages.release_empty_shards();
        true
    }

    /// Rebuild at a quarter of their size or less the page index shards
    /// that a peak grew and that now hold at most a sixteenth of their
    /// buckets: the first of [`SHRINK_SHARDS_PER_CALL`] looked at in turn
    /// (every shard within 64 calls that rebuild nothing); one shard a call
    /// over all the caller's cells (`Engine::finish_contexts`; a split
    /// index only: a cell that held 4096 pages at once). Where the owner's own call
    /// ends, as [`trim_free_tail`](Self::trim_free_tail): it allocates the
    /// smaller table (fallibly; a shard the host has no memory for stays
    /// as it is), which no hook does. Bounded: one rebuild of a shard a
    /// call, reading its buckets (at most 256 Ki, at the largest quota).
    ///
    /// An index no larger than a cell keeps when empty
    /// ([`compact_if_empty`](Self::compact_if_empty),
    /// [`index_kept_bytes`](Self::index_kept_bytes)) is kept as it is, for
    /// the next fill: shrinking it while the cell empties would only grow
    /// it again then.
    ///
    /// Whether a shard was rebuilt.
    pub(crate) fn shrink_index(&mut self) -> bool {
        // (Split first: the size of a split index is a pass over its shards.)
        if !self.pages.is_split() || self.pages.heap_bytes() <= self.index_kept_bytes() {
            return false;
        }
        self.pages
            .shrink_sparse_shards(&mut self.shrink_cursor, SHRINK_SHARDS_PER_CALL)
    }

    /// The most page index memory a cell keeps when it empties, or
    /// shrinks no further ([`shrink_index`](Self::shrink_index)): what the
    /// slots it keeps take (32 bytes each), about what an index of that
    /// many pages takes (8-byte buckets at a load of 1/4 to 1/2). Decided
    /// by the index's own size, not the slot array's: a trimmed cell's
    /// slots no longer say how large its index grew (a re-review of
    /// 2026-12-06: a context cell trimmed under its keep size kept its
    /// peak's index, 1.6 MB once empty).
    fn index_kept_bytes(&self) -> usize {
        self.keep_when_empty().saturating_mul(32)
    }

    /// Slots (and their index) a cell keeps when it empties: more in an
    /// engine context's cell ([`KEEP_CONTEXT_WHEN_EMPTY`]).
    fn keep_when_empty(&self) -> usize {
        if self.context == ContextId::DEFAULT {
            KEEP_WHEN_EMPTY
        } else {
            KEEP_CONTEXT_WHEN_EMPTY
        }
    }

    /// This cell's notice after the `skip` oldest (at most
    /// [`revoked_next::MAX_SKIP`](pviommu_abi::revoked_next::MAX_SKIP) from
    /// a parsed op): its slot and notice. Walks at most `skip` links,
    /// whatever they hold (a link that leads anywhere but to a queued
    /// notice ends it): from the head, or from where the last call ended
    /// if that is still the same place (`revoked_cursor`).
    pub(crate) fn revoked_after(&mut self, skip: u32) -> Option<(u64, Notice, u64)> {
        let (mut at, mut idx) = (0, self.revoked_head);
        let (c_skip, c_idx, c_acks) = self.revoked_cursor;
        if c_acks == self.revoked_acks
            && c_skip <= skip
            && matches!(self.slot(c_idx), Some(Slot::Revoked { .. }))
        {
            (at, idx) = (c_skip, c_idx);
        }
        // The last notice passed (its place and slot): where a walk that
        // runs off the end stops, so the next one, asking further, starts
        // there instead of walking the whole queue again (a run of asks
        // past the end walks the queue once, not once per ask).
        let mut last = None;
        for place in at..skip {
            match self.slot(idx) {
                Some(Slot::Revoked { next, .. }) => {
                    last = Some((place, idx));
                    idx = next;
                }
                _ => {
                    self.stop_walk_at(last);
                    return None;
                }
            }
        }
        match self.slot(idx) {
            Some(Slot::Revoked { notice, .. }) => {
                self.revoked_cursor = (skip, idx, self.revoked_acks);
                Some((idx, notice, self.notice_number(idx)?))
            }
            _ => {
                self.stop_walk_at(last);
                None
            }
        }
    }

    /// A walk of the notices ran off the end after passing the notice at
    /// `last` (place, slot), if any: the next walk may start there.
    fn stop_walk_at(&mut self, last: Option<(u32, u64)>) {
        if let Some((place, idx)) = last {
            self.revoked_cursor = (place, idx, self.revoked_acks);
        }
    }

    /// The number of the notice queued in slot `idx` (`None` if it holds
    /// none): the driver domain's count of notices when it was queued
    /// ([`push_revoked`](Self::push_revoked)).
    pub(crate) fn notice_number(&self, idx: u64) -> Option<u64> {
        self.raw(idx)
            .filter(|r| r.state() == ST_REVOKED)
            .map(|r| r.mfn)
    }

    /// The oldest unacknowledged revocation of this cell, with its order
    /// among the driver domain's notices.
    pub(crate) fn oldest_revoked(&self) -> Option<(u64, Notice, u64)> {
        let order = self.notice_number(self.revoked_head)?;
        match self.slot(self.revoked_head) {
            Some(Slot::Revoked { notice, .. }) => Some((self.revoked_head, notice, order)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const SEED: u64 = 0x5eed;

    /// `wanted_ahead_of`'s one compare against the two it replaced, over
    /// the corners: `NONE`, 0, equal, one either side, the top.
    #[test]
    fn wanted_ahead_is_the_two_compares() {
        let picks = [0, 1, 2, 511, 512, 513, u64::MAX - 2, u64::MAX - 1, NONE];
        for &next in &picks[..picks.len() - 1] {
            for &wanted in &picks {
                assert_eq!(
                    wanted_ahead_of(wanted, next),
                    wanted > next && wanted != NONE,
                    "wanted {wanted:#x}, next {next:#x}"
                );
            }
        }
    }

    /// Review of the list moves (2026-12-06): a mapping already out of
    /// the books whose move onto the unmapping or stuck list found no slot
    /// to write was dropped in silence, its page reference with it. Such a
    /// move is an engine bug now counted for the host's console (before,
    /// each count here stayed 0).
    #[test]
    fn a_list_move_that_finds_no_slot_is_a_counted_bug() {
        let mut dd = DriverDomain::new(DomId(0));
        let lost = |dd: &DriverDomain| dd.bugs[EngineBug::ReferenceLost as usize];
        dd.push_unmapping_at(7, false, true);
        assert_eq!(lost(&dd), 1, "a move in place of no slot");
        dd.push_unmapping(7, mapping(1), false);
        assert_eq!(lost(&dd), 2);
        dd.push_stuck(7, mapping(1), false);
        assert_eq!(lost(&dd), 3);
        assert_eq!((dd.unmapping_len, dd.stuck), (0, 0), "nothing listed");
    }

    fn mapping(gfn: u64) -> Mapping {
        Mapping {
            gfn: Gfn(gfn),
            mfn: Mfn(1000 + gfn),
            next_same_page: NONE,
            refs: 1,
            domid: DomId(7),
            context: ContextId::DEFAULT,
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            gen: 0,
        }
    }

    fn install(dd: &mut DriverDomain, at: PageAt, m: Mapping) -> u64 {
        dd.reserve_slot(SEED, 1 << 20, &at).unwrap();
        let idx = dd.take_slot().unwrap();
        dd.install_at(SEED, &at, idx, m).unwrap();
        idx
    }

    fn notice(g: u64) -> Notice {
        Notice {
            domid: DomId(7),
            gfn: Gfn(g),
            context: ContextId::DEFAULT,
        }
    }

    /// Install a mapping of gfn `g` and queue its notice, numbered
    /// `number`: its slot.
    fn queue_notice(dd: &mut DriverDomain, g: u64, number: u64) -> u64 {
        let at = dd.probe_page(SEED, DomId(7), Gfn(g));
        let idx = install(dd, at, mapping(g));
        dd.push_revoked(idx, notice(g), number);
        idx
    }

    /// The free list from its head, which must hold together.
    fn free_list(dd: &DriverDomain) -> Vec<u64> {
        dd.free_list().expect("the free list holds together")
    }

    /// Room for `n` more slots, as `reserve_slot` makes it one at a time.
    fn room(dd: &mut DriverDomain, n: usize) {
        for _ in 0..n {
            dd.slots.try_reserve_one(1 << 20).unwrap();
        }
    }

    #[test]
    fn a_free_slot_is_taken_from_anywhere_in_the_free_list_in_one_step() {
        let mut dd = DriverDomain::new(DomId(0));
        room(&mut dd, 8);
        let slots: Vec<u64> = (0..6).map(|_| dd.take_slot().unwrap()).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4, 5]);
        for i in [3, 0, 5, 1, 4] {
            dd.free_slot(i);
        }
        assert_eq!(free_list(&dd), [4, 1, 5, 0, 3]);
        // The middle, the tail, the head: each leaves a list that holds.
        assert_eq!(dd.take_slot_near(5), Ok(5));
        assert_eq!(free_list(&dd), [4, 1, 0, 3]);
        assert_eq!(dd.take_slot_near(3), Ok(3));
        assert_eq!(free_list(&dd), [4, 1, 0]);
        assert_eq!(dd.take_slot_near(4), Ok(4));
        assert_eq!(free_list(&dd), [1, 0]);
        // A slot in use, one past the end, NONE: the head instead.
        assert_eq!(dd.take_slot_near(2), Ok(1));
        assert_eq!(dd.take_slot_near(99), Ok(0));
        assert_eq!(free_list(&dd), []);
        // The list empty: a fresh slot, whatever is asked for.
        assert_eq!(dd.take_slot_near(2), Ok(6));
        assert_eq!(dd.used(), 7);
    }

    #[test]
    fn a_block_that_is_one_stretch_of_the_free_list_is_taken_off_it_whole() {
        // Slots 0..12 in use; 4..8 freed in each order, between 1 and 10
        // (the list: 10, block, 1 as the block is freed after 1 and before
        // 10), or at the head.
        fn cell(order: &[u64]) -> DriverDomain {
            let mut dd = DriverDomain::new(DomId(0));
            room(&mut dd, 12);
            for _ in 0..12 {
                dd.take_slot().unwrap();
            }
            for &i in order {
                dd.free_slot(i);
            }
            dd
        }
        let falling = [1, 4, 5, 6, 7, 10];
        let rising = [1, 7, 6, 5, 4, 10];
        for order in [&falling, &rising] {
            let mut dd = cell(order);
            assert!(dd.splice_free_block(4, 4), "{order:?}");
            // (`free_list` checks the count and every back link; the
            // slots taken are their taker's to fill, as after
            // `unlink_free`.)
            assert_eq!(free_list(&dd), [10, 1]);
            // At the head, and at the tail.
            let mut dd = cell(&order[1..5]);
            assert!(dd.splice_free_block(4, 4));
            assert_eq!(free_list(&dd), []);
            let mut dd = cell(&order[1..]);
            assert!(dd.splice_free_block(4, 4));
            assert_eq!(free_list(&dd), [10]);
        }
        // Not one stretch in order (the list 10, 7, 1, 6, 5, 4), a slot
        // of it in use, a block past the array, none: nothing changes.
        for (order, first, n) in [
            (&[4, 5, 6, 1, 7, 10][..], 4, 4),
            (&[4, 5, 6, 10][..], 4, 4),
            (&[10, 11][..], 10, 4),
            (&[4, 5, 6, 7][..], 4, 0),
        ] {
            let mut dd = cell(order);
            let before = free_list(&dd);
            assert!(!dd.splice_free_block(first, n), "{order:?} {first} {n}");
            assert_eq!(free_list(&dd), before);
        }
        // The stretch's ends must hold together with the list, as one
        // slot's unlink requires: the slot after it naming another back,
        // the slot before it not naming it, a stretch at the head that the
        // head is not.
        let mut dd = cell(&falling);
        if let Some(r) = dd.raw_mut(1) {
            r.aux = link32(10);
        }
        assert!(!dd.splice_free_block(4, 4));
        let mut dd = cell(&falling);
        if let Some(r) = dd.raw_mut(10) {
            r.next = link32(1);
        }
        assert!(!dd.splice_free_block(4, 4));
        let mut dd = cell(&falling[..5]);
        dd.free_head = 10;
        assert!(!dd.splice_free_block(4, 4));
        // A back link into the stretch itself (a cycle) is no end.
        let mut dd = cell(&falling);
        if let Some(r) = dd.raw_mut(7) {
            r.aux = link32(5);
        }
        assert!(!dd.splice_free_block(4, 4));
        assert_eq!(dd.free, 6);
    }

    /// `stuck_write_of` (a review of 2026-12-06): a stuck writable entry
    /// of the domain is found whatever its gfn, a read-only one or another
    /// domain's is not, and past the entries it may look at it answers
    /// yes.
    #[test]
    fn a_stuck_write_of_the_domain_is_found_and_assumed_past_the_looks() {
        let mut dd = DriverDomain::new(DomId(0));
        for _ in 0..2 {
            room(&mut dd, 1);
            dd.take_slot().unwrap();
        }
        let read_only = Mapping {
            perms: Permissions::RO,
            ..mapping(20)
        };
        dd.push_stuck(0, read_only, false);
        let mut looks = 100;
        assert!(!dd.stuck_write_of(DomId(7), &mut looks), "read-only");
        dd.push_stuck(1, mapping(30), true);
        assert!(dd.stuck_write_of(DomId(7), &mut looks));
        assert!(!dd.stuck_write_of(DomId(8), &mut looks), "another domain's");
        assert_eq!(looks, 100 - 1 - 2 - 2);
        let mut one = 1;
        assert!(dd.stuck_write_of(DomId(8), &mut one), "past the looks");
    }

    /// A cell of three blocks of slots, slot 0 and `busy` in use (Live
    /// bits), every other slot free.
    fn three_blocks(busy: &[u64]) -> DriverDomain {
        let mut dd = DriverDomain::new(DomId(0));
        for _ in 0..3 * CHUNK_LEN {
            room(&mut dd, 1);
            dd.take_slot().unwrap();
        }
        for i in 0..3 * CHUNK_LEN as u64 {
            if i == 0 || busy.contains(&i) {
                if let Some(r) = dd.raw_mut(i) {
                    r.bits = ST_LIVE;
                }
            } else {
                dd.free_slot(i);
            }
        }
        dd
    }

    /// `trim_free_tail` (a review of 2026-12-06: a cell kept its peak's
    /// memory while it held any BFN): the last block goes once all of it
    /// is free, its slots taken off the free list, which stays whole; a
    /// slot in use keeps it; the free block below it stays.
    #[test]
    fn a_last_block_all_free_is_given_back_and_one_in_use_kept() {
        const B: u64 = CHUNK_LEN as u64;
        let mut dd = three_blocks(&[2 * B + 5]);
        dd.trim_free_tail();
        assert_eq!((dd.slots.len() as u64, dd.trim_blocker), (3 * B, 2 * B + 5));
        dd.free_slot(2 * B + 5);
        dd.trim_free_tail();
        assert_eq!(dd.slots.len() as u64, 2 * B);
        assert_eq!((dd.used(), dd.free), (1, 2 * B - 1));
        let list = free_list(&dd);
        assert!(list.iter().all(|&i| i < 2 * B) && list.len() as u64 == dd.free);
        // The free block below stays: a working set that swings by one
        // neither frees nor grows.
        dd.trim_free_tail();
        assert_eq!(dd.slots.len() as u64, 2 * B);
        assert_eq!(dd.free_list_breaks(), 0);
    }

    /// A free list that does not hold together in the last block: what was
    /// taken off goes back, nothing is given back, the bug is counted once
    /// and no trim is tried again until the cell empties.
    #[test]
    fn a_trim_over_a_broken_free_list_gives_nothing_back() {
        const B: u64 = CHUNK_LEN as u64;
        let mut dd = three_blocks(&[]);
        // Slot 2B + 10's back link names slot 3 (which does not name it).
        if let Some(r) = dd.raw_mut(2 * B + 10) {
            r.aux = link32(3);
        }
        let free = dd.free;
        dd.trim_free_tail();
        assert_eq!((dd.slots.len() as u64, dd.free), (3 * B, free));
        assert_eq!(dd.free_list_breaks(), 1);
        dd.trim_free_tail();
        assert_eq!(dd.free_list_breaks(), 1, "not tried again");
        assert_eq!(dd.trim_blocker, TRIM_OFF);
    }

    #[test]
    fn a_free_list_that_does_not_hold_together_is_never_followed() {
        let mut dd = DriverDomain::new(DomId(0));
        room(&mut dd, 8);
        for _ in 0..4 {
            dd.take_slot().unwrap();
        }
        for i in [0, 1, 2] {
            dd.free_slot(i);
        }
        assert_eq!(free_list(&dd), [2, 1, 0]);
        // Slot 3 in use (its fields are a mapping's).
        if let Some(r) = dd.raw_mut(3) {
            r.bits = ST_LIVE;
        }
        // Slot 1's back link names slot 3: slot 1 is not taken (its unlink
        // would write into slot 3), nor the head (slot 1 does not name it
        // back), nor a fresh slot (none was reserved): nothing is.
        if let Some(r) = dd.raw_mut(1) {
            r.aux = link32(3);
        }
        assert_eq!(dd.take_slot_near(1), Err(Errno::NoSpc));
        assert_eq!((dd.free, dd.slots.len()), (3, 4));
        // Mended, slot 1 is taken from the middle.
        if let Some(r) = dd.raw_mut(1) {
            r.aux = link32(2);
        }
        assert_eq!(dd.take_slot_near(1), Ok(1));
        assert_eq!(free_list(&dd), [2, 0]);
        // Slot 0's next names slot 3: slot 0 is not taken, the head is.
        if let Some(r) = dd.raw_mut(0) {
            r.next = link32(3);
        }
        assert_eq!(dd.take_slot_near(0), Ok(2));
        // Nor, as the head now, for no slot in particular.
        assert_eq!(dd.take_slot_near(NONE), Err(Errno::NoSpc));
        assert_eq!(dd.free, 1);
        assert_eq!(
            dd.raw(3).map(|r| (r.state(), r.aux)),
            Some((ST_LIVE, link32(NONE)))
        );
        assert_eq!(dd.free_list_breaks(), 2);
        // A head that is a slot in use: freeing a slot in front of it
        // writes no back link into it (a live slot's `aux` is its count of
        // references).
        if let Some(r) = dd.raw_mut(3) {
            r.aux = 2;
        }
        dd.free_head = 3;
        dd.free_slot(1);
        assert_eq!(dd.raw(3).map(|r| (r.state(), r.aux)), Some((ST_LIVE, 2)));
        // A head linked back to itself (a slot freed twice) is not taken.
        let mut dd = DriverDomain::new(DomId(0));
        room(&mut dd, 4);
        dd.take_slot().unwrap();
        dd.free_slot(0);
        if let Some(r) = dd.raw_mut(0) {
            (r.next, r.aux) = (link32(0), link32(0));
        }
        assert_eq!(dd.take_slot_near(0), Err(Errno::NoSpc));
        assert_eq!((dd.free_head, dd.free), (0, 1));
    }

    #[test]
    fn a_walk_of_the_notice_queue_is_bounded_by_its_skip_whatever_the_links_hold() {
        let mut dd = DriverDomain::new(DomId(0));
        let idx: Vec<u64> = (1..=3).map(|g| queue_notice(&mut dd, g, g - 1)).collect();
        assert_eq!(dd.revoked_after(2), Some((idx[2], notice(3), 2)));
        assert_eq!(dd.revoked_after(3), None);
        // The last notice linked back to the first: a cycle. Every skip
        // up to the bound still ends, each at its place around the cycle.
        if let Some(r) = dd.raw_mut(idx[2]) {
            r.next = link32(idx[0]);
        }
        dd.revoked_cursor = (0, NONE, 0);
        for skip in [3u32, 4, 255] {
            let want = idx[skip as usize % 3];
            assert_eq!(dd.revoked_after(skip).map(|(i, _, _)| i), Some(want));
        }
        // A link to a slot that is no notice ends the walk.
        if let Some(r) = dd.raw_mut(idx[1]) {
            r.next = link32(idx[1] + 1000);
        }
        dd.revoked_cursor = (0, NONE, 0);
        assert_eq!(dd.revoked_after(1).map(|(i, _, _)| i), Some(idx[1]));
        assert_eq!(dd.revoked_after(2), None);
    }

    /// A walk that runs off the end of the notices leaves its cursor at
    /// the last notice it passed: the next ask past the end starts there
    /// (one link), not at the head (the whole queue again). Eight asks past
    /// the end of a queue of 255 walked 8 x 255 links under the cell's lock
    /// (review of the runs of notices).
    #[test]
    fn a_walk_past_the_last_notice_leaves_its_cursor_there() {
        let mut dd = DriverDomain::new(DomId(0));
        let idx: Vec<u64> = (1..=3).map(|g| queue_notice(&mut dd, g, g)).collect();
        assert_eq!(dd.revoked_after(200), None);
        assert_eq!(dd.revoked_cursor, (2, idx[2], dd.revoked_acks));
        // From there: one link, then off the end again.
        assert_eq!(dd.revoked_after(255), None);
        assert_eq!(dd.revoked_cursor, (2, idx[2], dd.revoked_acks));
        // Asking inside the queue still finds the notice, from the head.
        assert_eq!(dd.revoked_after(1).map(|(i, _, _)| i), Some(idx[1]));
        // A notice queued after a walk ran off the end is found from the
        // cursor that walk left: the next place.
        assert_eq!(dd.revoked_after(200), None);
        assert_eq!(dd.revoked_cursor, (2, idx[2], dd.revoked_acks));
        let g4 = queue_notice(&mut dd, 4, 4);
        assert_eq!(dd.revoked_after(3), Some((g4, notice(4), 4)));
        // An acknowledgement moves the notices after it: the cursor is not
        // trusted then, and the walk starts from the head again.
        assert_eq!(dd.revoked_after(200), None);
        dd.ack_revoked(idx[0]).unwrap();
        assert_eq!(dd.revoked_after(2).map(|(i, _, _)| i), Some(g4));
        assert_eq!(dd.revoked_after(3), None);
        // An empty queue leaves the cursor alone.
        let mut empty = DriverDomain::new(DomId(0));
        let before = empty.revoked_cursor;
        assert_eq!(empty.revoked_after(9), None);
        assert_eq!(empty.revoked_cursor, before);
    }

    #[test]
    fn an_install_with_a_probe_made_before_the_index_was_rebuilt_still_indexes_the_page() {
        let mut dd = DriverDomain::new(DomId(0));
        let at = dd.probe_page(SEED, DomId(7), Gfn(5));
        let first = install(&mut dd, at, mapping(5));
        // Probed while the page is indexed (its bucket known), then enough
        // installs to rebuild the buckets several times.
        let stale = dd.probe_page(SEED, DomId(7), Gfn(5));
        for g in 100..200 {
            let at = dd.probe_page(SEED, DomId(7), Gfn(g));
            install(&mut dd, at, mapping(g));
        }
        let mut again = mapping(5);
        again.perms = Permissions::RO;
        let idx = install(&mut dd, stale, again);
        assert_eq!(dd.find_key(SEED, &again), Some(idx));
        assert_eq!(dd.find_key(SEED, &mapping(5)), Some(first));
        for g in 100..200 {
            assert!(dd.find_key(SEED, &mapping(g)).is_some(), "gfn {g}");
        }
    }

    #[test]
    fn an_install_with_a_probe_whose_chain_head_was_removed_meanwhile_starts_a_new_chain() {
        let mut dd = DriverDomain::new(DomId(0));
        let at = dd.probe_page(SEED, DomId(7), Gfn(5));
        let first = install(&mut dd, at, mapping(5));
        // Probed while the page is indexed, then its only mapping leaves
        // the index (a revocation on the way, as in `map_prepare`).
        let stale = dd.probe_page(SEED, DomId(7), Gfn(5));
        assert_eq!(dd.unindex(SEED, first), Some(true));
        dd.push_unmapping_at(first, false, false);
        let mut again = mapping(5);
        again.perms = Permissions::RO;
        let idx = install(&mut dd, stale, again);
        assert_eq!(dd.find_key(SEED, &again), Some(idx));
        assert_eq!(dd.pages_of(SEED, DomId(7)), 1);
    }

    fn page_of(domid: u16, gfn: u64) -> Mapping {
        Mapping {
            domid: DomId(domid),
            ..mapping(gfn)
        }
    }

    fn map_page(dd: &mut DriverDomain, m: Mapping) -> u64 {
        let at = dd.probe_page(SEED, m.domid, m.gfn);
        install(dd, at, m)
    }

    fn unmap_page(dd: &mut DriverDomain, idx: u64) -> bool {
        let last = dd.unindex(SEED, idx).unwrap();
        dd.push_unmapping_at(idx, false, false);
        last
    }

    /// A xorshift64 generator from `state` (not 0): the random tests'
    /// reproducible sequences.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// The region counts a model keeps: (target, region) -> distinct pages.
    fn model_regions(live: &BTreeMap<(u16, u64, bool), u64>) -> Vec<(u16, u64, u64)> {
        let pages: BTreeSet<(u16, u64)> = live.keys().map(|k| (k.0, k.1)).collect();
        let mut counts: BTreeMap<(u16, u64), u64> = BTreeMap::new();
        for (d, g) in pages {
            *counts.entry((d, g >> REGION_SHIFT)).or_default() += 1;
        }
        counts.into_iter().map(|((d, r), n)| (d, r, n)).collect()
    }

    #[test]
    fn region_counts_follow_the_pages_and_stop_at_a_gfn_without_a_region() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut dd = DriverDomain::new(DomId(0));
        let mut live: BTreeMap<(u16, u64, bool), u64> = BTreeMap::new();
        // Whether the model expects exact counts: no page beyond the
        // regions since the cell last had no page.
        let mut exact = true;
        let (mut checked, mut inexact_seen) = (0, 0);
        for step in 0..30_000u32 {
            let r = next();
            // Gfns in 6 regions, either side of their edges (and, rarely,
            // one without a region number).
            let gfn = match (r >> 8) % 1000 {
                0 => REGION_GFN_END + (r >> 20) % 3,
                x => {
                    ((x % 6) << REGION_SHIFT)
                        + (x / 6) % 5
                        + if x % 2 == 0 {
                            0
                        } else {
                            (1 << REGION_SHIFT) - 3
                        }
                }
            };
            let k = ((r % 3) as u16 + 1, gfn, (r >> 40) & 1 == 1);
            if (r >> 24) % 100 < 50 && !live.contains_key(&k) {
                let m = Mapping {
                    perms: if k.2 {
                        Permissions::RO
                    } else {
                        Permissions::RW
                    },
                    ..page_of(k.0, k.1)
                };
                live.insert(k, map_page(&mut dd, m));
                exact &= region_of(gfn).is_some();
            } else if !live.is_empty() {
                let k = *live.keys().nth((r >> 44) as usize % live.len()).unwrap();
                let idx = live.remove(&k).unwrap();
                unmap_page(&mut dd, idx);
                if live.is_empty() {
                    exact = true;
                }
            }
            assert_eq!(dd.regions_exact(), exact, "step {step}");
            if exact {
                assert_eq!(dd.region_counts(), model_regions(&live), "step {step}");
                checked += 1;
                for (d, g, _) in live.keys() {
                    assert!(dd.may_map_in(SEED, DomId(*d), g >> REGION_SHIFT));
                }
            } else {
                inexact_seen += 1;
            }
        }
        assert!(
            checked > 1000 && inexact_seen > 1000,
            "{checked} {inexact_seen}"
        );
    }

    #[test]
    fn region_counts_stop_at_their_bound_and_start_again_when_empty() {
        let mut dd = DriverDomain::new(DomId(0));
        let idx: Vec<u64> = (0..=MAX_REGIONS as u64)
            .map(|r| map_page(&mut dd, page_of(7, r << REGION_SHIFT)))
            .collect();
        // One region more than the bound: no longer counted, and every
        // region may hold a page.
        assert!(!dd.regions_exact());
        assert!(dd.may_map_in(SEED, DomId(7), 1 << 30));
        assert!(dd.regions.heap_bytes() <= 2 * (MAX_REGIONS + 1) * 8);
        for i in idx {
            unmap_page(&mut dd, i);
        }
        assert!(dd.regions_exact());
        assert!(dd.region_counts().is_empty());
        map_page(&mut dd, page_of(7, 5));
        assert_eq!(dd.region_counts(), vec![(7, 0, 1)]);
        assert!(!dd.may_map_in(SEED, DomId(7), 1));
        assert!(!dd.may_map_in(SEED, DomId(8), 0));
    }

    #[test]
    fn a_hot_target_count_that_leaves_the_table_leaves_nothing_hot_on_its_bucket() {
        // Find a target B whose count moves into target A's bucket when A's
        // hot count goes (the removal shifts its cluster back): nothing may
        // be hot on that bucket then, and B's count must stay B's.
        let a = 1;
        let mut found = false;
        for b in 2..4096 {
            let mut dd = DriverDomain::new(DomId(0));
            let a1 = map_page(&mut dd, page_of(a, 1));
            map_page(&mut dd, page_of(b, 1));
            map_page(&mut dd, page_of(b, 3));
            let a2 = map_page(&mut dd, page_of(a, 2)); // hot: A's bucket
            let hot = dd.targets.hot_bucket().expect("A's count is hot");
            assert!(!unmap_page(&mut dd, a1));
            assert!(unmap_page(&mut dd, a2)); // A's count leaves the table
            assert_eq!(dd.targets.hot_bucket(), None);
            if dd.targets.key_at(hot) != Some(u64::from(b)) {
                continue;
            }
            found = true;
            assert_eq!(dd.pages_of(SEED, DomId(b)), 2);
            map_page(&mut dd, page_of(b, 2));
            assert_eq!(dd.pages_of(SEED, DomId(b)), 3);
            assert_eq!(dd.pages_of(SEED, DomId(a)), 0);
            map_page(&mut dd, page_of(a, 3));
            assert_eq!(dd.pages_of(SEED, DomId(a)), 1);
            assert_eq!(dd.pages_of(SEED, DomId(b)), 3);
            assert_eq!(dd.targets.len(), 2);
            break;
        }
        assert!(
            found,
            "no target shifted into A's bucket: the test tests nothing"
        );
    }

    #[test]
    fn an_install_given_a_probe_of_another_page_indexes_the_page_it_installs() {
        let mut dd = DriverDomain::new(DomId(0));
        let other = dd.probe_page(SEED, DomId(9), Gfn(77));
        let m = page_of(7, 5);
        let idx = install(&mut dd, other, m);
        assert_eq!(dd.find_key(SEED, &m), Some(idx));
        assert_eq!(dd.pages_of(SEED, DomId(7)), 1);
        assert_eq!(dd.pages_of(SEED, DomId(9)), 0);
        assert!(unmap_page(&mut dd, idx), "found again, and the last of d7");
    }

    /// Maps and unmaps over 40 targets against a model (a `BTreeMap`),
    /// with an unrelated unmap sometimes between a map's probe and its
    /// install: every lookup, per-target page count and the target table's
    /// size agree with the model throughout.
    #[test]
    fn many_targets_agree_with_a_model() {
        extern crate std;
        for seed in [1u64, 0xdead_beef] {
            let mut next = xorshift(seed ^ 0x9e37_79b9_7f4a_7c15);
            let mut dd = DriverDomain::new(DomId(0));
            let mut live: BTreeMap<(u16, u64, bool), u64> = BTreeMap::new();
            let key = |(d, g, ro): (u16, u64, bool)| Mapping {
                perms: if ro { Permissions::RO } else { Permissions::RW },
                ..page_of(d, g)
            };
            let unmap_one =
                |dd: &mut DriverDomain, live: &mut BTreeMap<(u16, u64, bool), u64>, pick: u64| {
                    let k = *live.keys().nth(pick as usize % live.len()).unwrap();
                    let idx = live.remove(&k).unwrap();
                    let still_mapped = live.keys().any(|q| q.0 == k.0 && q.1 == k.1);
                    let target_left = live.keys().any(|q| q.0 == k.0);
                    let last = dd.unindex(SEED, idx).unwrap();
                    assert_eq!(
                        last, !target_left,
                        "{k:?} (page still mapped: {still_mapped})"
                    );
                    dd.push_unmapping_at(idx, false, false);
                };
            for step in 0..40_000u32 {
                let r = next();
                let k = ((r % 40) as u16 + 1, (r >> 8) % 30, (r >> 20) & 1 == 1);
                if (r >> 24) % 100 < 55 {
                    let m = key(k);
                    let at = dd.probe_page(SEED, m.domid, m.gfn);
                    let found = dd.find_key_at(SEED, &at, &m);
                    assert_eq!(found, live.get(&k).copied(), "step {step}");
                    if found.is_none() {
                        if (r >> 40).is_multiple_of(4) && !live.is_empty() {
                            unmap_one(&mut dd, &mut live, r >> 44);
                        }
                        live.insert(k, install(&mut dd, at, m));
                    }
                } else if !live.is_empty() {
                    unmap_one(&mut dd, &mut live, r >> 32);
                }
                if step % 997 == 0 {
                    for d in 1..=40u16 {
                        let pages: BTreeSet<u64> =
                            live.keys().filter(|q| q.0 == d).map(|q| q.1).collect();
                        assert_eq!(dd.pages_of(SEED, DomId(d)), pages.len() as u64);
                    }
                    let targets: BTreeSet<u16> = live.keys().map(|q| q.0).collect();
                    assert_eq!(dd.targets.len(), targets.len(), "step {step}");
                    for (&k, &idx) in &live {
                        assert_eq!(dd.find_key(SEED, &key(k)), Some(idx), "{k:?}");
                    }
                }
            }
        }
    }

    // `install_at` on an index without room (what `reserve_slot` rules
    // out): the refusal must leave both indices as they were.

    #[test]
    fn an_install_refused_by_the_target_table_leaves_the_page_unindexed() {
        let mut dd = DriverDomain::new(DomId(0));
        let at = dd.probe_page(SEED, DomId(7), Gfn(5));
        dd.pages.reserve_one(at.hash).unwrap(); // room for the page, none for its target
        dd.slots.try_reserve_one(1 << 20).unwrap();
        let idx = dd.take_slot().unwrap();
        assert!(dd.install_at(SEED, &at, idx, page_of(7, 5)).is_err());
        assert_eq!(
            dd.mapped_pages(),
            0,
            "page indexed at a slot that is not Live"
        );
        assert_eq!(dd.pages_of(SEED, DomId(7)), 0);
        assert_eq!(dd.targets.len(), 0);
        assert_eq!(dd.live, 0);
    }

    #[test]
    fn an_install_refused_by_the_page_index_takes_a_new_targets_count_back() {
        let mut dd = DriverDomain::new(DomId(0));
        dd.targets
            .reserve_one(|v| target_hash(SEED, count_domid(v)))
            .unwrap(); // room for the target, none for the page
        let at = dd.probe_page(SEED, DomId(7), Gfn(5));
        dd.slots.try_reserve_one(1 << 20).unwrap();
        let idx = dd.take_slot().unwrap();
        assert!(dd.install_at(SEED, &at, idx, page_of(7, 5)).is_err());
        assert_eq!(dd.pages_of(SEED, DomId(7)), 0);
        assert_eq!(dd.targets.len(), 0, "a count for a page never indexed");
        assert_eq!(dd.mapped_pages(), 0);
    }

    #[test]
    fn an_install_refused_by_the_page_index_takes_an_existing_targets_count_back() {
        let mut dd = DriverDomain::new(DomId(0));
        let a = map_page(&mut dd, page_of(7, 1));
        let b = map_page(&mut dd, page_of(8, 1));
        let at = dd.probe_page(SEED, DomId(7), Gfn(2));
        // A slot number the page index cannot store: its insert refuses.
        assert!(dd
            .install_at(SEED, &at, u64::from(u32::MAX), page_of(7, 2))
            .is_err());
        assert_eq!(dd.pages_of(SEED, DomId(7)), 1);
        assert_eq!(dd.pages_of(SEED, DomId(8)), 1);
        assert_eq!(dd.mapped_pages(), 2);
        assert!(unmap_page(&mut dd, a), "d7's count is back to one page");
        assert!(unmap_page(&mut dd, b));
        assert_eq!(dd.targets.len(), 0);
    }

    /// `n` slots taken (Free until stored into), and an extent of
    /// domid 7 from gfn 0 (access `perms`) installed as a record in the 512
    /// from `first`: the record's first page's mapping.
    fn extent_at(dd: &mut DriverDomain, first: u64, perms: Permissions) -> Mapping {
        while (dd.slots.len() as u64) < first + EXTENT_PAGES {
            dd.slots.try_reserve_one(1 << 20).unwrap();
            dd.take_slot().unwrap();
        }
        let key = Mapping {
            perms,
            ..mapping(0)
        };
        dd.reserve_extent(SEED, 16).unwrap();
        dd.install_extent(SEED, first, &key).unwrap();
        key
    }

    /// Page `i`'s key of the extent whose first page is `key`.
    fn page_of_extent(key: &Mapping, i: u64) -> Mapping {
        Mapping {
            gfn: Gfn(key.gfn.0 + i),
            mfn: Mfn(key.mfn.0 + i),
            ..*key
        }
    }

    /// An extent install whose free list names no free record (an engine
    /// bug) is refused before it changes anything. The first version
    /// counted the target and made the missing record the head of the
    /// extent's chain first, so the records already there (other access)
    /// were no longer found by gfn (review, 2026-12-04).
    #[test]
    fn an_extent_install_without_a_free_record_changes_nothing() {
        let mut dd = DriverDomain::new(DomId(0));
        let rw = extent_at(&mut dd, 0, Permissions::RW);
        while (dd.slots.len() as u64) < 2 * EXTENT_PAGES {
            dd.slots.try_reserve_one(1 << 20).unwrap();
            dd.take_slot().unwrap();
        }
        dd.reserve_extent(SEED, 16).unwrap();
        // Record 0 is live: a free list naming it is broken, as is one
        // naming a record that does not exist.
        for broken in [0, 7] {
            dd.extent_free = broken;
            let ro = Mapping {
                perms: Permissions::RO,
                ..rw
            };
            assert!(dd.install_extent(SEED, EXTENT_PAGES, &ro).is_err());
            assert_eq!(dd.pages_of(SEED, DomId(7)), 1, "count unchanged");
            let page = page_of_extent(&rw, 3);
            assert_eq!(
                dd.find_key(SEED, &page),
                Some(3),
                "the RW record still found"
            );
            assert_eq!(dd.extent_records(), 1);
        }
    }

    /// A record its chain no longer holds (a corrupted index) is counted
    /// as an index miss when its last page goes, and is not reused: a link
    /// may still name it. The first version put it back on the free list.
    #[test]
    fn a_record_missing_from_its_chain_is_not_reused() {
        let mut dd = DriverDomain::new(DomId(0));
        let rw = extent_at(&mut dd, 0, Permissions::RW);
        let _ro = extent_at(&mut dd, EXTENT_PAGES, Permissions::RO);
        // The chain is index -> record 1 (RO) -> record 0 (RW): drop 0.
        dd.extents.get_mut(1).unwrap().next = link32(NONE);
        assert_eq!(dd.find_key(SEED, &page_of_extent(&rw, 3)), None);
        for i in 0..EXTENT_PAGES {
            assert_eq!(dd.unindex(SEED, i), Some(false));
            dd.push_unmapping_at(i, false, true);
        }
        assert_eq!(dd.index_misses(), 1);
        assert_ne!(dd.extent_free, 0, "record 0 is not free for reuse");
        assert_eq!(dd.extent_records(), 1);
    }

    /// The release pass as `flush_and_release_as` makes it, over the
    /// unmapping list from its head: at most `budget` steps. The slots
    /// freed, in order.
    fn release_pass(dd: &mut DriverDomain, budget: usize) -> Vec<u64> {
        let (mut at, mut linked, mut freed) = (dd.unmapping_head, false, Vec::new());
        for _ in 0..budget {
            let Some(u) = dd.take_released(at, linked) else {
                break;
            };
            let free = !u.entry_present && !u.then_revoked;
            if linked && !free {
                dd.unset_free_head_link();
            }
            linked = free;
            if free {
                freed.push(at);
            }
            at = u.next;
        }
        if linked {
            dd.unset_free_head_link();
        }
        freed
    }

    /// The release pass links each slot it frees back to the next one on
    /// the unmapping list before that one is freed: a notice between
    /// them, or the budget's end, leaves the free list as freeing the
    /// same slots one by one (`free_slot`) does.
    #[test]
    fn a_release_pass_leaves_the_free_list_as_freeing_one_by_one() {
        // (Owner's unmaps and revocations, oldest first; the list runs
        // from the newest.)
        let revoked = [false, true, false, false, true, false, false];
        for budget in 0..=revoked.len() + 1 {
            let mut dd = DriverDomain::new(DomId(0));
            let mut one_by_one = DriverDomain::new(DomId(0));
            room(&mut one_by_one, revoked.len());
            let mut slots = Vec::new();
            for (g, &then_revoked) in (1..).zip(revoked.iter()) {
                let at = dd.probe_page(SEED, DomId(7), Gfn(g));
                let idx = install(&mut dd, at, mapping(g));
                assert!(dd.unindex(SEED, idx).is_some());
                dd.push_unmapping_at(idx, then_revoked, false);
                slots.push((idx, then_revoked));
                assert_eq!(one_by_one.take_slot(), Ok(idx));
            }
            let freed = release_pass(&mut dd, budget);
            let expected: Vec<u64> = slots
                .iter()
                .rev()
                .take(budget)
                .filter(|(_, then_revoked)| !then_revoked)
                .map(|&(idx, _)| idx)
                .collect();
            assert_eq!(freed, expected, "budget {budget}");
            for &idx in &expected {
                one_by_one.free_slot(idx);
            }
            assert_eq!(free_list(&dd), free_list(&one_by_one), "budget {budget}");
            assert!(dd.free_list_is_whole(), "budget {budget}");
            let free_aux = |d: &DriverDomain| {
                free_list(d)
                    .iter()
                    .map(|&i| d.raw(i).map(|r| r.aux))
                    .collect::<Vec<_>>()
            };
            assert_eq!(free_aux(&dd), free_aux(&one_by_one), "budget {budget}");
        }
    }

    // The linked release pass against 532c015's, which freed each slot on
    // its own (review 159).

    /// 532c015's `take_released`, verbatim: each slot freed on its own.
    fn take_released_old(dd: &mut DriverDomain, idx: u64) -> Option<Unmapped> {
        let head = dd.free_head;
        let r = dd.raw_mut(idx)?;
        let u = r.unmapped()?;
        if !u.entry_present && !u.then_revoked {
            *r = RawSlot::free_before(head);
            dd.pushed_free(idx, head);
        }
        Some(u)
    }

    /// The release pass's list work, as `flush_and_release_as` does it,
    /// old (`linked` unused) or new: the steps' answers, in order.
    fn pass(dd: &mut DriverDomain, budget: usize, new: bool) -> Vec<String> {
        let (mut at, mut linked, mut out) = (dd.unmapping_head, false, Vec::new());
        for _ in 0..budget {
            let got = if new {
                dd.take_released(at, linked)
            } else {
                take_released_old(dd, at)
            };
            let Some(u) = got else { break };
            if new {
                let freed = !u.entry_present && !u.then_revoked;
                if linked && !freed {
                    dd.unset_free_head_link();
                }
                linked = freed;
            }
            out.push(format!("{at}:{u:?}"));
            dd.unmapping_head = u.next;
            at = u.next;
        }
        if new && linked {
            dd.unset_free_head_link();
        }
        out
    }

    /// A cell of `n` slots from `seed`: some free (the free list in a
    /// random order), some live, the rest on the unmapping list in a random
    /// order, each owner's (freed), a revocation's (a notice) or refused
    /// (entry present); with `break_links` some list links point elsewhere
    /// (a free slot, a live one, one earlier on the list, itself, out of
    /// range, the list's end).
    fn synthetic(seed: u64, n: u64, break_links: bool) -> DriverDomain {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rnd = move |k: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % k.max(1)
        };
        let mut dd = DriverDomain::new(DomId(0));
        let mut idxs = Vec::new();
        for g in 0..n {
            let at = dd.probe_page(SEED, DomId(7), Gfn(g));
            idxs.push(install(&mut dd, at, mapping(g)));
        }
        // Shuffle, then deal: free, live, unmapping.
        for i in (1..idxs.len()).rev() {
            idxs.swap(i, rnd(i as u64 + 1) as usize);
        }
        for &idx in &idxs {
            match rnd(4) {
                0 => {
                    assert!(dd.unindex(SEED, idx).is_some());
                    dd.free_slot(idx);
                }
                1 => {}
                k => {
                    assert!(dd.unindex(SEED, idx).is_some());
                    let (then_revoked, present) = match (k, rnd(3)) {
                        (2, _) | (_, 0) => (false, false),
                        (_, 1) => (true, false),
                        _ => (rnd(2) == 0, true),
                    };
                    dd.push_unmapping_at(idx, then_revoked, present);
                }
            }
        }
        if break_links {
            let listed: Vec<u64> = (0..n)
                .filter(|&i| dd.raw(i).is_some_and(|r| r.unmapped().is_some()))
                .collect();
            for &i in &listed {
                if rnd(4) != 0 {
                    continue;
                }
                let to = match rnd(6) {
                    0 => i,
                    1 => n + rnd(5),
                    2 => NONE,
                    _ => rnd(n),
                };
                if let Some(r) = dd.raw_mut(i) {
                    r.next = link32(to);
                }
            }
        }
        dd
    }

    fn whole(dd: &DriverDomain) -> String {
        format!(
            "{:?} head={} free={} unmapping_head={}",
            dd.slots.iter().collect::<Vec<_>>(),
            dd.free_head,
            dd.free,
            dd.unmapping_head
        )
    }

    /// Review 159: the linked pass leaves every slot (links, back links,
    /// states), the free list's head and count exactly as the parent's
    /// pass freeing one by one, over random cells with notices, refused
    /// entries, broken links and every budget; and every list it leaves
    /// whole is one the old pass leaves whole.
    #[test]
    fn the_linked_release_pass_leaves_every_cell_as_freeing_one_by_one_did() {
        let (mut cases, mut linked_steps) = (0u64, 0u64);
        for seed in 1..3000u64 {
            let n = 1 + seed % 14;
            let broken = seed % 3 == 0;
            for budget in 0..=(n as usize + 2) {
                let mut old = synthetic(seed, n, broken);
                let mut new = synthetic(seed, n, broken);
                assert_eq!(whole(&old), whole(&new));
                let a = pass(&mut old, budget, false);
                let b = pass(&mut new, budget, true);
                assert_eq!(a, b, "seed {seed} budget {budget}");
                assert_eq!(whole(&old), whole(&new), "seed {seed} budget {budget}");
                assert_eq!(old.free_list(), new.free_list());
                if old.free_list_is_whole() {
                    assert!(new.free_list_is_whole(), "seed {seed} budget {budget}");
                }
                linked_steps += b.windows(2).count() as u64;
                cases += 1;
            }
        }
        assert!(cases > 20_000 && linked_steps > 10_000);
    }

    // ---- review 161: the plain releases' loop (b8db010) against the pass's general step ----

    /// The release pass's work on the cell and what it hands the host, as
    /// `flush_and_release_as` makes it: with `plain`, as b8db010 makes it
    /// (after a step that freed its slot, `release_plain`'s loop over
    /// `take_released_plain_before`, the free list's head and count stored
    /// after it), else as 58aa01c made it (every slot by the general
    /// step). Logged: every page put, notice, stuck entry and run
    /// ended (target, count), in order; then where the pass stopped and the
    /// list's head, and the budget left.
    fn general_release_pass(
        dd: &mut DriverDomain,
        mut budget: u64,
        plain: bool,
    ) -> (Vec<String>, u64) {
        let mut log = Vec::new();
        let mut at = dd.unmapping_head;
        let mut run: Option<(DomId, u32)> = None;
        let mut linked = false;
        let mut order = 0;
        while budget != 0 {
            let Some(u) = dd.take_released(at, linked) else {
                break;
            };
            let freed = !u.entry_present && !u.then_revoked;
            if linked && !freed {
                dd.unset_free_head_link();
            }
            linked = freed;
            budget -= 1;
            dd.unmapping_head = u.next;
            if u.entry_present {
                if let Some(Slot::Unmapping {
                    mapping,
                    then_revoked,
                    ..
                }) = dd.slot(at)
                {
                    dd.push_stuck(at, mapping, then_revoked);
                }
                log.push(format!("stuck {at}"));
                at = u.next;
                continue;
            }
            run = match run {
                Some((d, n)) if d == u.domid => Some((d, n + 1)),
                other => {
                    if let Some((d, n)) = other {
                        log.push(format!("end {} {n}", d.0));
                    }
                    Some((u.domid, 1))
                }
            };
            if u.then_revoked {
                order += 1;
                dd.push_revoked_unmapped(at, order);
                log.push(format!("notice {at}"));
            }
            at = u.next;
            log.push(format!("put {} {}", u.mfn.0, u.writable));
            if plain {
                if let (true, Some((d, n))) = (linked, run.as_mut()) {
                    // (`Engine::release_plain`, its host call logged.)
                    let (mut a, mut b) = (at, budget);
                    let mut head = dd.free_head;
                    while b != 0 {
                        let Some((mfn, writable, next)) =
                            dd.take_released_plain_before(a, *d, head)
                        else {
                            break;
                        };
                        head = a;
                        b -= 1;
                        a = next;
                        log.push(format!("put {} {writable}", mfn.0));
                    }
                    let taken = budget - b;
                    dd.free_head = head;
                    dd.free += taken;
                    budget = b;
                    at = a;
                    dd.unmapping_head = at;
                    *n = n.wrapping_add(taken as u32);
                }
            }
        }
        if linked {
            dd.unset_free_head_link();
        }
        if let Some((d, n)) = run {
            log.push(format!("end {} {n}", d.0));
        }
        log.push(format!("stop {at} head {}", dd.unmapping_head));
        (log, budget)
    }

    /// [`synthetic`]'s cell with its unmapping entries of two targets (7
    /// and 8, in runs and alternating), some writable and some read-only.
    fn synthetic161(seed: u64, n: u64, broken: bool) -> DriverDomain {
        let mut dd = synthetic(seed, n, broken);
        let mut x = seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
        let mut other = false;
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Runs: the target changes at about one slot in three.
            if x.is_multiple_of(3) {
                other = !other;
            }
            if let Some(r) = dd.raw_mut(i).filter(|r| r.unmapped().is_some()) {
                r.domid = if other { 8 } else { 7 };
                if x.is_multiple_of(5) {
                    r.bits &= !WRITE;
                }
            }
        }
        dd
    }

    /// Review 161: b8db010's plain releases (`release_plain` over
    /// `take_released_plain_before`) leave every slot, the free list, its
    /// head and count, the unmapping list's head and the budget as
    /// 58aa01c's general step did, and hand the host the same pages,
    /// notices, stuck entries and ended runs (target and count) in the
    /// same order: over random cells of two targets with notices, refused
    /// entries, broken links (itself, past the array, NONE, a free or live
    /// slot, a cycle) and every budget.
    #[test]
    fn plain_releases_free_what_the_general_step_frees() {
        let (mut cases, mut plain_puts) = (0u64, 0u64);
        for seed in 1..4000u64 {
            let n = 1 + seed % 16;
            let broken = seed % 3 == 0;
            for budget in 0..=(n + 2) {
                let mut old = synthetic161(seed, n, broken);
                let mut new = synthetic161(seed, n, broken);
                assert_eq!(whole(&old), whole(&new));
                let a = general_release_pass(&mut old, budget, false);
                let b = general_release_pass(&mut new, budget, true);
                assert_eq!(a, b, "seed {seed} budget {budget}");
                assert_eq!(whole(&old), whole(&new), "seed {seed} budget {budget}");
                assert_eq!(
                    old.free_list(),
                    new.free_list(),
                    "seed {seed} budget {budget}"
                );
                assert_eq!(old.unmapping_head, new.unmapping_head);
                if old.free_list_is_whole() {
                    assert!(new.free_list_is_whole(), "seed {seed} budget {budget}");
                }
                // Steps the plain loop made: puts after a put with no end
                // or notice between (a lower bound).
                plain_puts +=
                    b.0.windows(2)
                        .filter(|w| w[0].starts_with("put") && w[1].starts_with("put"))
                        .count() as u64;
                cases += 1;
            }
        }
        assert!(
            cases > 30_000 && plain_puts > 20_000,
            "{cases} {plain_puts}"
        );
    }
}
