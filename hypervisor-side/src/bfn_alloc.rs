//! BFN allocation: where the hypervisor chooses the bus address it hands out.
//!
//! The window starts above host RAM and above 4 GiB (below it sit PCI MMIO
//! holes that a DMA may never reach the IOMMU through), is aligned for 2 MiB
//! superpages, ends at the IOMMU's address width, and skips every reserved
//! range. Freed BFNs are reused, lowest first.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::config::{WINDOW_ALIGN, WINDOW_FLOOR};
use crate::platform::ReservedRange;
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
        reserved.sort_by_key(|r| r.start);
        Ok(BfnWindow {
            start,
            end,
            reserved,
        })
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

/// Allocator over a [`BfnWindow`].
#[derive(Clone, Debug)]
pub struct BfnAllocator {
    window: BfnWindow,
    /// Never-used BFNs start here.
    next: u64,
    /// Freed BFNs below `next`.
    free: BTreeSet<u64>,
}

impl BfnAllocator {
    /// An allocator with nothing handed out.
    pub fn new(window: BfnWindow) -> Self {
        let next = window.start;
        BfnAllocator {
            window,
            next,
            free: BTreeSet::new(),
        }
    }

    /// The window.
    pub fn window(&self) -> &BfnWindow {
        &self.window
    }

    /// A free BFN, or `Err(NoSpc)` when the window is exhausted.
    pub fn alloc(&mut self) -> Result<Bfn, Errno> {
        if let Some(b) = self.free.pop_first() {
            return Ok(Bfn(b));
        }
        let mut candidate = self.next;
        // Each step skips a whole reserved range: bounded by their number.
        for _ in 0..=self.window.reserved.len() {
            match self.window.reserved_at(candidate) {
                Some(r) => candidate = r.start.saturating_add(r.nr),
                None => break,
            }
        }
        if candidate >= self.window.end || !self.window.allows(candidate) {
            return Err(Errno::NoSpc);
        }
        self.next = candidate + 1;
        Ok(Bfn(candidate))
    }

    /// Return a BFN. Values never handed out are ignored.
    pub fn free(&mut self, bfn: Bfn) {
        if bfn.0 < self.window.start || bfn.0 >= self.next {
            return;
        }
        if bfn.0 + 1 == self.next {
            self.next = bfn.0;
            // Fold freed BFNs at the top back into the bump pointer.
            while let Some(&last) = self.free.last() {
                if last + 1 == self.next {
                    self.free.pop_last();
                    self.next = last;
                } else {
                    break;
                }
            }
            // Reserved ranges just below are never in `free`; stepping back
            // over them is not needed because alloc skips them again.
        } else {
            self.free.insert(bfn.0);
        }
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
        let mut a = BfnAllocator::new(w);
        let got: Vec<u64> = (0..4).map(|_| a.alloc().unwrap().0).collect();
        assert_eq!(got, [0x100000, 0x100001, 0x100005, 0x100006]);
        a.free(Bfn(0x100001));
        assert_eq!(a.alloc().unwrap().0, 0x100001);
    }

    #[test]
    fn exhaustion_is_enospc() {
        let w = BfnWindow {
            start: 10,
            end: 12,
            reserved: Vec::new(),
        };
        let mut a = BfnAllocator::new(w);
        a.alloc().unwrap();
        a.alloc().unwrap();
        assert_eq!(a.alloc(), Err(Errno::NoSpc));
    }
}
