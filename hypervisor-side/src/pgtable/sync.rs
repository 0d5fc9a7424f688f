//! Table stores not yet made visible to a non-coherent IOMMU.
//!
//! An IOMMU that does not snoop the CPU caches (VT-d with ECAP.C = 0, as
//! QEMU's intel-iommu) walks memory, not the cache: every table store must
//! be written back (`iommu_sync_cache`, a cache-line flush) before the
//! IOMMU may use it. Doing that per entry costs a flush per store; a
//! [`DirtyLines`] set instead remembers which cache lines of which tables
//! were stored to, so a backend writes each line back once per batch.
//!
//! The rule a backend keeps with it (see [`super::TableMemory`]): every
//! line noted is written back before any IOTLB or context-cache
//! invalidation the backend issues for the engine's tables, before a
//! device is pointed at them, and before the call that stored it returns
//! to the guest; a table frame's record is dropped ([`DirtyLines::forget`])
//! before the frame is freed. The set has a fixed size and never
//! allocates: noting a line of a table not in a full set hands back the
//! oldest record, which the backend writes back at once.

use crate::Mfn;

/// Tables tracked at once. A batch of consecutive BFNs stores into one
/// leaf table (and, once per 512, the tables above it).
pub const DIRTY_TABLES: usize = 8;

/// Bytes per cache line the set tracks (x86 and Arm: 64); a table of 512
/// 8-byte entries has 64 of them, one bit each.
pub const LINE_BYTES: usize = 64;

/// Entries per tracked line.
pub const ENTRIES_PER_LINE: usize = LINE_BYTES / 8;

/// Stored-to cache lines of up to [`DIRTY_TABLES`] table frames.
#[derive(Clone, Debug)]
pub struct DirtyLines {
    /// Table frame and its line bitmap (bit `n`: bytes `64n..64n+63`);
    /// a bitmap of 0 marks a free record.
    records: [(Mfn, u64); DIRTY_TABLES],
    /// The record `note` hands back when the set is full (round robin).
    victim: usize,
    /// The record `note` used last, looked at first: a run of maps or
    /// unmaps stores into one leaf table again and again.
    last: usize,
}

impl Default for DirtyLines {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtyLines {
    /// An empty set.
    pub const fn new() -> Self {
        DirtyLines {
            records: [(Mfn(0), 0); DIRTY_TABLES],
            victim: 0,
            last: 0,
        }
    }

    /// The line bit of entry `index` (0 for an index beyond the table,
    /// which no caller passes).
    pub const fn line_bit(index: usize) -> u64 {
        let line = index / ENTRIES_PER_LINE;
        if line < 64 {
            1 << line
        } else {
            0
        }
    }

    /// Note a store into entry `index` of `table`. `Some((frame, lines))`
    /// when the set was full: a record pushed out, whose lines the caller
    /// must write back now.
    #[inline(always)]
    pub fn note(&mut self, table: Mfn, index: usize) -> Option<(Mfn, u64)> {
        let bit = Self::line_bit(index);
        if let Some(r) = self.records.get_mut(self.last) {
            if r.1 != 0 && r.0 == table {
                r.1 |= bit;
                return None;
            }
        }
        self.note_elsewhere(table, bit)
    }

    /// [`note`](Self::note) of a table other than the last one noted.
    #[inline(never)]
    fn note_elsewhere(&mut self, table: Mfn, bit: u64) -> Option<(Mfn, u64)> {
        let mut free = None;
        for (i, r) in self.records.iter_mut().enumerate() {
            if r.1 != 0 && r.0 == table {
                r.1 |= bit;
                self.last = i;
                return None;
            }
            if r.1 == 0 && free.is_none() {
                free = Some(i);
            }
        }
        let slot = match free {
            Some(i) => i,
            None => {
                let i = self.victim % DIRTY_TABLES;
                self.victim = (i + 1) % DIRTY_TABLES;
                i
            }
        };
        let r = self.records.get_mut(slot)?;
        let out = (r.1 != 0).then_some(*r);
        *r = (table, bit);
        self.last = slot;
        out
    }

    /// Drop `table`'s record (it is being freed: nothing in it matters to
    /// the IOMMU any more, and the frame must not be touched again).
    pub fn forget(&mut self, table: Mfn) {
        for r in self.records.iter_mut() {
            if r.1 != 0 && r.0 == table {
                *r = (Mfn(0), 0);
            }
        }
    }

    /// Take every record out, handing each to `sync` (frame, line bitmap).
    pub fn drain(&mut self, mut sync: impl FnMut(Mfn, u64)) {
        for r in self.records.iter_mut() {
            if r.1 != 0 {
                let (t, lines) = *r;
                *r = (Mfn(0), 0);
                sync(t, lines);
            }
        }
    }

    /// Nothing waits to be written back.
    pub fn is_empty(&self) -> bool {
        self.records.iter().all(|r| r.1 == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn lines_of_one_table_share_a_record() {
        let mut d = DirtyLines::new();
        assert!(d.is_empty());
        assert_eq!(d.note(Mfn(7), 0), None);
        assert_eq!(d.note(Mfn(7), 7), None); // same line
        assert_eq!(d.note(Mfn(7), 8), None);
        assert_eq!(d.note(Mfn(7), 511), None);
        let mut out = Vec::new();
        d.drain(|t, l| out.push((t, l)));
        assert_eq!(out, [(Mfn(7), 1 | 2 | 1 << 63)]);
        assert!(d.is_empty());
    }

    #[test]
    fn a_full_set_hands_back_a_record_to_write_back() {
        let mut d = DirtyLines::new();
        for t in 0..DIRTY_TABLES as u64 {
            assert_eq!(d.note(Mfn(100 + t), 9), None);
        }
        // The ninth table pushes one out, with its lines: nothing is lost.
        let out = d.note(Mfn(1), 0).expect("a record handed back");
        assert_eq!(out.1, 2);
        let mut left = Vec::new();
        d.drain(|t, l| left.push((t, l)));
        assert_eq!(left.len(), DIRTY_TABLES);
        assert!(left.contains(&(Mfn(1), 1)));
        assert!(!left.contains(&out));
    }

    #[test]
    fn a_forgotten_table_is_never_handed_back() {
        let mut d = DirtyLines::new();
        d.note(Mfn(3), 0);
        d.note(Mfn(4), 100);
        d.forget(Mfn(3));
        let mut out = Vec::new();
        d.drain(|t, l| out.push((t, l)));
        assert_eq!(out, [(Mfn(4), 1 << 12)]);
    }
}
