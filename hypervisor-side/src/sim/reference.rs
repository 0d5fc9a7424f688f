//! The reference design for the engine's bookkeeping (issue 10:
//! "a naive flat-table engine written for comparison"), kept beside the
//! simulator so the `map_unmap` bench and the `engine_rounds` example
//! measure it next to the engine over the same host services (page lookups
//! and references, table memory; it never flushes: the engine's two IOTLB
//! flushes a batch are the one host service it alone pays). Not an engine:
//! no locks, no checks of who may map what, no revocation, no release after
//! a flush; its reverse index is kept but never read.

use crate::pgtable::{vtd::Vtd, IoPageTable, TableMemory};
use crate::platform::{CheckedTarget, PageSlot, Platform};
use crate::Mfn;
use pviommu_abi::{Bfn, DomId, Gfn, MemAttr, Permissions};

/// Look `domid`'s gfns `first..first + n` up, writable and referenced, into
/// `mfns` (cleared first) as the engine looks a batch's pages up: runs of
/// [`MAP_CHUNK`](crate::engine::MAP_CHUNK) consecutive gfns in one call to
/// the host ([`Platform::get_pages`]). Stops at the first run the host
/// cuts short: how many pages it referenced. The reference design's page
/// lookups, and the floor's, so they pay the engine's host services.
pub fn look_up_pages(
    host: &mut impl Platform,
    domid: DomId,
    first: Gfn,
    n: u64,
    mfns: &mut Vec<Mfn>,
) -> usize {
    let mut run = [PageSlot::default(); crate::engine::MAP_CHUNK];
    // (No checks here to outlive: a number nothing moves.)
    let seq = core::sync::atomic::AtomicU32::new(0);
    let target = CheckedTarget::new(&seq, 0);
    mfns.clear();
    for start in (0..n).step_by(run.len()) {
        let len = ((n - start) as usize).min(run.len());
        let pages = &mut run[..len];
        for (k, slot) in (start..).zip(pages.iter_mut()) {
            *slot = PageSlot::asking(Gfn(first.0 + k));
        }
        let got = host.get_pages(domid, true, pages, target).taken.min(len);
        mfns.extend(pages.iter().take(got).map(|p| p.mfn()));
        if got != len {
            break;
        }
    }
    mfns.len()
}

/// The reference design, on the same page-table format: a flat
/// table of mappings indexed by BFN offset, a hash reverse index by (domain,
/// gfn), a free list of BFN offsets, and the PTE store. No locks, no
/// reference counts or dedup, no revocation state, no gates, no checks of
/// who may map what: the bookkeeping any engine must at least do, written
/// as plainly as it can be. Its reverse index is std's `HashMap` (hashbrown)
/// with the engine's keyed mix for a hash (std's default SipHash made the
/// reference 40 % slower).
pub struct NaiveEngine {
    /// Slot per BFN offset: (domain, gfn, frame) of a live mapping.
    slots: Vec<Option<(DomId, Gfn, Mfn)>>,
    /// (domain, gfn) -> BFN offset.
    reverse: std::collections::HashMap<(DomId, Gfn), u32, KeyedMix>,
    /// Free BFN offsets, the lowest on top.
    free: Vec<u32>,
}

/// The engine's hash of a page for the reference's `HashMap`: the domain
/// and the gfn through [`crate::storage::hash64`].
#[derive(Clone, Copy, Default)]
pub struct KeyedMix;

/// [`KeyedMix`]'s hasher: the key's two words, mixed at the end.
#[derive(Default)]
pub struct KeyedMixHasher {
    words: [u64; 2],
    n: usize,
}

impl std::hash::BuildHasher for KeyedMix {
    type Hasher = KeyedMixHasher;
    fn build_hasher(&self) -> KeyedMixHasher {
        KeyedMixHasher::default()
    }
}

impl std::hash::Hasher for KeyedMixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        let w = &mut self.words[self.n % 2];
        *w = w.rotate_left(16) ^ v;
        self.n += 1;
    }
    fn finish(&self) -> u64 {
        crate::storage::hash64(0x5eed, self.words[0], self.words[1])
    }
}

impl NaiveEngine {
    /// A reference engine for `slots` BFNs from offset 0.
    pub fn new(slots: u32) -> Self {
        NaiveEngine {
            slots: vec![None; slots as usize],
            reverse: std::collections::HashMap::with_capacity_and_hasher(slots as usize, KeyedMix),
            free: (0..slots).rev().collect(),
        }
    }

    /// Map `(domid, gfn, mfn)` read-write at the lowest free BFN offset
    /// above `base`: its BFN, or `None` with nothing changed (the table
    /// full, the page already mapped here: the reference keeps one mapping
    /// a page, or the page table refused).
    pub fn map<M: TableMemory>(
        &mut self,
        mem: &mut M,
        pt: &mut IoPageTable<Vtd>,
        base: u64,
        (domid, gfn, mfn): (DomId, Gfn, Mfn),
    ) -> Option<Bfn> {
        // One probe of the reverse index finds a duplicate or the place of
        // the new entry, as an insert alone would.
        let std::collections::hash_map::Entry::Vacant(place) = self.reverse.entry((domid, gfn))
        else {
            return None;
        };
        let off = *self.free.last()?;
        let bfn = Bfn(base.checked_add(u64::from(off))?);
        let slot = self.slots.get_mut(off as usize)?;
        pt.map(mem, bfn, mfn, Permissions::RW, MemAttr::WriteBack)
            .ok()?;
        *slot = Some((domid, gfn, mfn));
        self.free.pop();
        place.insert(off);
        Some(bfn)
    }

    /// Unmap `bfn` (one [`map`](Self::map) returned): the frame it mapped,
    /// or `None` for a BFN not mapped here.
    pub fn unmap<M: TableMemory>(
        &mut self,
        mem: &mut M,
        pt: &mut IoPageTable<Vtd>,
        base: u64,
        bfn: Bfn,
    ) -> Option<Mfn> {
        let off = u32::try_from(bfn.0.checked_sub(base)?).ok()?;
        let slot = self.slots.get_mut(off as usize)?;
        let (domid, gfn, mfn) = (*slot)?;
        pt.unmap(mem, bfn).ok()?;
        *slot = None;
        self.reverse.remove(&(domid, gfn));
        self.free.push(off);
        Some(mfn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::TableOptions;
    use crate::sim::{Format, SimMachine};

    #[test]
    fn the_reference_maps_unmaps_and_refuses_what_it_did_not_map() {
        let mut m = SimMachine::new(4096, Format::Vtd, 64);
        let options = TableOptions::engine_context(4);
        let mut pt = IoPageTable::<Vtd>::with_options(&mut m, options).unwrap();
        let mut r = NaiveEngine::new(2);
        let base = 0x10_0000;
        let page = |g: u64| (DomId(1), Gfn(g), Mfn(7 + g));
        let a = r.map(&mut m, &mut pt, base, page(5)).unwrap();
        let b = r.map(&mut m, &mut pt, base, page(6)).unwrap();
        assert_ne!(a, b);
        assert_eq!(r.map(&mut m, &mut pt, base, page(7)), None, "full");
        // A page mapped already, a BFN the table cannot hold (past its
        // address width; past u64): refused, nothing taken.
        let mut other = NaiveEngine::new(2);
        let a2 = other.map(&mut m, &mut pt, 2 * base, page(5)).unwrap();
        assert_eq!(other.map(&mut m, &mut pt, 2 * base, page(5)), None, "twice");
        assert_eq!(other.map(&mut m, &mut pt, 1 << 60, page(8)), None);
        assert_eq!(other.map(&mut m, &mut pt, u64::MAX, page(8)), None);
        assert_eq!(other.unmap(&mut m, &mut pt, 2 * base, a2), Some(Mfn(12)));
        assert_eq!(other.map(&mut m, &mut pt, 2 * base, page(8)), Some(a2));
        // BFNs it did not hand out: refused, nothing changed.
        for bfn in [Bfn(base + 5), Bfn(base - 1), Bfn(u64::MAX)] {
            assert_eq!(r.unmap(&mut m, &mut pt, base, bfn), None);
        }
        assert_eq!(r.unmap(&mut m, &mut pt, base, a), Some(Mfn(12)));
        assert_eq!(r.unmap(&mut m, &mut pt, base, a), None, "twice");
        assert_eq!(r.map(&mut m, &mut pt, base, page(7)), Some(a), "reused");
        assert_eq!(r.unmap(&mut m, &mut pt, base, b), Some(Mfn(13)));
    }
}
