//! BFN allocation: where the hypervisor chooses the bus address it hands out.
//!
//! The window starts above host RAM and above 4 GiB (below it sit PCI MMIO
//! holes that a DMA may never reach the IOMMU through), is aligned for 2 MiB
//! superpages, ends at the IOMMU's address width, and skips every reserved
//! range. [`BfnSpace`] numbers the usable BFNs densely; which index a map
//! gets is the driver domain's slot allocator's choice (`engine::driver`).

use alloc::vec::Vec;

use crate::config::{WINDOW_ALIGN, WINDOW_FLOOR};
use crate::platform::ReservedRange;
use crate::storage::try_push;
use crate::{Bfn, Errno};

/// The window and the reserved ranges inside or around it.
#[derive(Clone, Debug)]
pub struct BfnWindow {
    /// First BFN.
    pub start: u64,
    /// One past the last BFN.
    pub end: u64,
    /// Reserved ranges, sorted by start, merged where they overlap.
    pub reserved: Vec<ReservedRange>,
}

impl BfnWindow {
    /// The window for a host whose RAM ends at frame `ram_end`, an IOMMU of
    /// `address_bits`, and the given reserved ranges.
    pub fn new(
        ram_end: u64,
        address_bits: u32,
        mut reserved: Vec<ReservedRange>,
    ) -> Result<Self, Errno> {
        let (start, end) = Self::bounds(ram_end, address_bits)?;
        Ok(BfnWindow {
            start,
            end,
            reserved: sorted_by_start(&mut reserved)?,
        })
    }

    /// The window's first BFN and the one past its last, for a host whose
    /// RAM ends at frame `ram_end` and an IOMMU of `address_bits`: above
    /// RAM and 4 GiB, aligned for 2 MiB superpages, below the width.
    /// `NoSpc` when that leaves nothing. (The simulator's model of Xen's
    /// glue checks runs against the same bounds; on Xen the glue asks the
    /// engine for them.)
    pub fn bounds(ram_end: u64, address_bits: u32) -> Result<(u64, u64), Errno> {
        let floor = ram_end.max(WINDOW_FLOOR);
        let start = floor
            .checked_next_multiple_of(WINDOW_ALIGN)
            .ok_or(Errno::NoSpc)?;
        let end = if address_bits >= 64 + 12 {
            u64::MAX
        } else {
            1u64 << address_bits.saturating_sub(12)
        };
        if start >= end {
            return Err(Errno::NoSpc);
        }
        Ok((start, end))
    }

    /// The reserved range containing `bfn`, if any.
    pub fn reserved_at(&self, bfn: u64) -> Option<&ReservedRange> {
        // Few ranges: a linear scan is faster than anything clever.
        self.reserved
            .iter()
            .find(|r| bfn >= r.start && bfn - r.start < r.nr)
    }

    /// Whether `bfn` may be handed out.
    pub fn allows(&self, bfn: u64) -> bool {
        bfn >= self.start && bfn < self.end && self.reserved_at(bfn).is_none()
    }
}

/// Whether BFNs `first .. first + count` (at least one) all lie at or above
/// `floor`, below `end`, and outside every range of `reserved` (in any
/// order; empty ranges reserve nothing).
///
/// The rule of where an IOMMU run of the engine may go, as the host checks
/// it before the run reaches its IOMMU driver: Xen's glue refuses any other
/// run into a domain's own tables (`pvx_run_in_window()` in
/// `xen/pviommu-common.inc`, this rule in C, with the engine's window
/// for `floor` and `end`), and so does the simulator's model of it
/// ([`BfnWindow::bounds`]). The engine hands out no BFN outside its
/// window; a run elsewhere is an engine bug, and could replace a mapping
/// the host's own devices use (an RMRR's identity mapping), or sit in the
/// MSI window or a device's BAR, where a DMA never reaches the page.
pub fn run_is_clear(
    first: u64,
    count: u64,
    floor: u64,
    end: u64,
    reserved: &[ReservedRange],
) -> bool {
    let Some(past) = first.checked_add(count) else {
        return false;
    };
    count != 0
        && first >= floor
        && past <= end
        && !reserved
            .iter()
            .any(|r| r.nr != 0 && r.start < past && first < r.start.saturating_add(r.nr))
}

/// `ranges` sorted by start, by selection (a handful of ranges, at boot):
/// core's sorts keep panic paths the Xen object may not contain.
fn sorted_by_start(ranges: &mut [ReservedRange]) -> Result<Vec<ReservedRange>, Errno> {
    let mut taken: Vec<Option<ReservedRange>> = Vec::new();
    taken
        .try_reserve_exact(ranges.len())
        .map_err(|_| Errno::NoMem)?;
    for r in ranges.iter() {
        try_push(&mut taken, Some(*r))?;
    }
    let mut out = Vec::new();
    out.try_reserve_exact(ranges.len())
        .map_err(|_| Errno::NoMem)?;
    while let Some(min) = taken
        .iter_mut()
        .filter(|r| r.is_some())
        .min_by_key(|r| r.map_or(u64::MAX, |r| r.start))
    {
        if let Some(r) = min.take() {
            try_push(&mut out, r)?;
        }
    }
    Ok(out)
}

/// One run of usable BFNs: `len` frames from `start`, numbered from `first_index`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Segment {
    start: u64,
    len: u64,
    first_index: u64,
}

/// The usable part of the window (the window minus reserved ranges) numbered
/// densely: slot index `i` <-> one BFN. A driver domain's mapping table is
/// an array indexed this way, so BFN -> mapping is O(number of segments),
/// which is a handful, and no memory is spent on reserved holes.
#[derive(Clone, Debug)]
pub struct BfnSpace {
    segments: Vec<Segment>,
    /// The first segment's start and length (0 if there is none; its
    /// first index is 0), where the lookups find nearly every index in one
    /// compare: kept in place, they cost them no load of the vector's
    /// length and pointer.
    first: (u64, u64),
    total: u64,
}

impl BfnSpace {
    /// Number the usable BFNs of `window`.
    pub fn new(window: &BfnWindow) -> Result<Self, Errno> {
        let mut segments = Vec::new();
        let mut at = window.start;
        let mut index = 0u64;
        // `reserved` is sorted by start; overlapping ranges are fine.
        for r in window.reserved.iter() {
            let r_end = r.start.saturating_add(r.nr);
            // An empty range reserves nothing, and splits no segment (Xen's
            // glue drops such a range before it gets here).
            if r.nr == 0 || r_end <= at || r.start >= window.end {
                continue;
            }
            if r.start > at {
                let len = r.start - at;
                try_push(
                    &mut segments,
                    Segment {
                        start: at,
                        len,
                        first_index: index,
                    },
                )?;
                index += len;
            }
            at = at.max(r_end);
        }
        if at < window.end {
            let len = window.end - at;
            try_push(
                &mut segments,
                Segment {
                    start: at,
                    len,
                    first_index: index,
                },
            )?;
            index += len;
        }
        let first = segments.first().map_or((0, 0), |s| (s.start, s.len));
        Ok(BfnSpace {
            segments,
            first,
            total: index,
        })
    }

    /// Usable BFNs.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// The lowest slot index at or after `from` whose BFN starts a run of
    /// `run` BFNs (a power of two) in one segment, the first a multiple of
    /// `run`: where a naturally aligned block of BFNs can be numbered from.
    /// Reserved ranges of any size shift later indices against their BFNs,
    /// so an aligned index need not name an aligned BFN. O(segments).
    pub fn aligned_run_from(&self, from: u64, run: u64) -> Option<u64> {
        if !run.is_power_of_two() {
            return None;
        }
        self.segments.iter().find_map(|s| {
            let end = s.first_index.checked_add(s.len)?;
            let at = from.max(s.first_index);
            if at >= end {
                return None;
            }
            let bfn = s.start.checked_add(at - s.first_index)?;
            let aligned = bfn.checked_add(run - 1)? & !(run - 1);
            let first = s.first_index.checked_add(aligned - s.start)?;
            (first.checked_add(run)? <= end).then_some(first)
        })
    }

    /// The BFN of slot index `first` if it starts such a run (as
    /// [`aligned_run_from`](Self::aligned_run_from) would find it there).
    pub fn aligned_run_at(&self, first: u64, run: u64) -> Option<Bfn> {
        if self.aligned_run_from(first, run) != Some(first) {
            return None;
        }
        self.bfn_of(first)
    }

    /// Whether no BFN is usable.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The BFN with slot index `index`.
    #[inline]
    pub fn bfn_of(&self, index: u64) -> Option<Bfn> {
        // Slots are handed out lowest first, so nearly every index is in
        // the first segment: one compare, no iterator, on every map.
        let (start, len) = self.first;
        if index < len {
            return Some(Bfn(start + index));
        }
        self.segments
            .iter()
            .find(|s| index >= s.first_index && index - s.first_index < s.len)
            .map(|s| Bfn(s.start + (index - s.first_index)))
    }

    /// The slot index of `bfn`, if it is a usable BFN.
    #[inline]
    pub fn index_of(&self, bfn: Bfn) -> Option<u64> {
        // (`wrapping_sub`: a BFN below the window wraps past `len`.)
        let (start, len) = self.first;
        if bfn.0.wrapping_sub(start) < len {
            return Some(bfn.0 - start);
        }
        self.segments
            .iter()
            .find(|s| bfn.0 >= s.start && bfn.0 - s.start < s.len)
            .map(|s| s.first_index + (bfn.0 - s.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_above_ram_and_4g_and_skips_reserved() {
        let msi = ReservedRange {
            start: 0x100002,
            nr: 3,
            kind: 1,
        };
        let w = BfnWindow::new(0x8_0000, 39, alloc::vec![msi]).unwrap();
        assert_eq!(w.start, 0x10_0000);
        assert_eq!(w.end, 1 << 27);
        let s = BfnSpace::new(&w).unwrap();
        let got: Vec<u64> = (0..4).map(|i| s.bfn_of(i).unwrap().0).collect();
        assert_eq!(got, [0x100000, 0x100001, 0x100005, 0x100006]);
        for i in [0u64, 1, 2, 3, 1000] {
            assert_eq!(s.index_of(s.bfn_of(i).unwrap()), Some(i));
        }
        assert_eq!(s.index_of(Bfn(0x100003)), None);
        assert_eq!(s.index_of(Bfn(0x1000)), None);
        assert_eq!(s.len(), (1 << 27) - 0x100000 - 3);
    }

    /// The cases `xen/tests/run-window.sh` puts to the glue's C copy of
    /// the rule (`pvx_run_in_window()`), with the same answers: ranges
    /// unsorted and overlapping, one long range that starts before a
    /// shorter one and reaches past it, runs touching a range's either end.
    #[test]
    fn a_run_is_clear_only_above_the_floor_and_outside_every_range() {
        let r = |start, nr| ReservedRange { start, nr, kind: 2 };
        // (Empty ranges reserve nothing; the glue never records one.)
        let reserved = [r(0x300, 0x10), r(0x100, 0x180), r(0x120, 4), r(0x500, 0)];
        let clear = |first, count| run_is_clear(first, count, 0x80, u64::MAX, &reserved);
        assert!(clear(0x80, 0x80), "up to the first range");
        assert!(!clear(0x7f, 1), "below the floor");
        assert!(!clear(0x80, 0x81), "its last page on the first range");
        assert!(
            !clear(0x200, 1),
            "inside the long range, past the short one"
        );
        assert!(!clear(0x27f, 1), "the long range's last page");
        assert!(clear(0x280, 0x80), "between two ranges, touching both");
        assert!(!clear(0x2ff, 2), "over the next one's first page");
        assert!(!clear(0x30f, 1), "its last page");
        assert!(clear(0x310, 0x1000), "past every range (and the empty one)");
        assert!(!clear(0x310, 0), "no run");
        assert!(!clear(u64::MAX, 2), "a run that wraps");
        assert!(
            !run_is_clear(0x310, 0x10, 0x80, 0x31f, &reserved),
            "past the end"
        );
        // A window's own rule: the BFNs of its space, and no others.
        let w = BfnWindow::new(0x8_0000, 39, alloc::vec![r(0x100010, 0x20)]).unwrap();
        let s = BfnSpace::new(&w).unwrap();
        let holds = |first, count| run_is_clear(first, count, w.start, w.end, &w.reserved);
        assert!(holds(s.bfn_of(0).unwrap().0, 0x10));
        assert!(!holds(s.bfn_of(0).unwrap().0, 0x11));
        assert!(holds(s.bfn_of(0x10).unwrap().0, 0x1000));
        assert!(!holds(w.start - 1, 1));
    }

    #[test]
    fn overlapping_and_outside_reserved_ranges() {
        let r = |start, nr| ReservedRange { start, nr, kind: 2 };
        let w = BfnWindow {
            start: 10,
            end: 30,
            reserved: alloc::vec![r(0, 12), r(14, 2), r(15, 3), r(29, 100)],
        };
        let s = BfnSpace::new(&w).unwrap();
        let all: Vec<u64> = (0..s.len()).map(|i| s.bfn_of(i).unwrap().0).collect();
        assert_eq!(all, [12, 13, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]);
        assert_eq!(s.bfn_of(s.len()), None);
    }
    /// An aligned run is numbered where its BFN is aligned, in a segment
    /// long enough, whatever the reserved ranges did to the indices.
    #[test]
    fn aligned_runs_are_found_by_bfn_not_by_index() {
        let r = |start, nr| ReservedRange { start, nr, kind: 2 };
        let w = BfnWindow {
            start: 16,
            end: 64,
            reserved: alloc::vec![r(19, 3), r(34, 4)],
        };
        // Segments: BFNs 16-18 (indices 0-2), 22-33 (3-14), 38-63 (15-40).
        let s = BfnSpace::new(&w).unwrap();
        let at = |from, run| {
            s.aligned_run_from(from, run)
                .map(|i| s.bfn_of(i).unwrap().0)
        };
        assert_eq!(at(0, 8), Some(24), "the first segment is too short");
        assert_eq!(at(0, 2), Some(16));
        assert_eq!(at(2, 2), Some(22), "BFN 18's run would cross the hole");
        assert_eq!(at(6, 8), Some(40), "24-31 is behind index 6");
        assert_eq!(at(0, 16), Some(48));
        assert_eq!(at(0, 32), None, "no segment holds 32 aligned");
        assert_eq!(at(40, 1), Some(63));
        assert_eq!(at(41, 1), None, "past the last index");
        assert_eq!(s.aligned_run_from(0, 3), None, "not a power of two");
        assert_eq!(s.aligned_run_from(u64::MAX, 1), None);
        // Index 3 (BFN 22) starts a run of 2, not of 4; index 5 (BFN 24)
        // one of 8; index 1 (BFN 17) none.
        assert_eq!(s.aligned_run_at(3, 2), Some(Bfn(22)));
        assert_eq!(s.aligned_run_at(3, 4), None);
        assert_eq!(s.aligned_run_at(5, 8), Some(Bfn(24)));
        assert_eq!(s.aligned_run_at(1, 1), Some(Bfn(17)));
        assert_eq!(s.aligned_run_at(1, 2), None);
    }

    /// An empty reserved range splits no segment: a run across where it
    /// sits is still one run (the simulator may report such a range; Xen's
    /// glue drops it). Found by a review of the re-read, where the run
    /// check became "within one segment".
    #[test]
    fn an_empty_reserved_range_splits_no_run() {
        let r = |start, nr| ReservedRange { start, nr, kind: 2 };
        let w = BfnWindow {
            start: 0,
            end: 73,
            reserved: alloc::vec![r(21, 1), r(32, 3), r(47, 0)],
        };
        let s = BfnSpace::new(&w).unwrap();
        // BFN 40 (index 36) starts 40-47, across BFN 47's empty range.
        assert_eq!(s.index_of(Bfn(40)), Some(36));
        assert_eq!(s.aligned_run_at(36, 8), Some(Bfn(40)));
        assert_eq!(s.bfn_of(s.index_of(Bfn(47)).unwrap()), Some(Bfn(47)));
    }

    /// The first-segment shortcut of `bfn_of` / `index_of` agrees with a
    /// plain enumeration of the usable BFNs, on windows whose reserved
    /// ranges cut the first segment short, start it late or leave it empty.
    #[test]
    fn index_and_bfn_agree_with_an_enumeration() {
        let r = |start, nr| ReservedRange { start, nr, kind: 2 };
        let cases = [
            alloc::vec![],
            alloc::vec![r(10, 1)],
            alloc::vec![r(12, 3), r(20, 1)],
            alloc::vec![r(0, 11), r(13, 2)],
            alloc::vec![r(10, 30)],
            alloc::vec![r(39, 5)],
        ];
        for reserved in cases {
            let w = BfnWindow {
                start: 10,
                end: 40,
                reserved,
            };
            let s = BfnSpace::new(&w).unwrap();
            let usable: Vec<u64> = (0..64).filter(|&b| w.allows(b)).collect();
            assert_eq!(s.len(), usable.len() as u64);
            for (i, &b) in usable.iter().enumerate() {
                assert_eq!(s.bfn_of(i as u64), Some(Bfn(b)));
            }
            assert_eq!(s.bfn_of(usable.len() as u64), None);
            for b in 0..64 {
                let want = usable.iter().position(|&u| u == b).map(|i| i as u64);
                assert_eq!(s.index_of(Bfn(b)), want, "bfn {b} of {:?}", w.reserved);
            }
            assert_eq!(s.index_of(Bfn(u64::MAX)), None);
        }
    }
}
