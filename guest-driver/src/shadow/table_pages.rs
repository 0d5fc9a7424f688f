//! Table-sized pages kept contiguous: the guest snapshots of a shadow.
//!
//! One `Box<[u64; 512]>` per table spreads the snapshots over the heap
//! between the other allocations of a build (shadow pages, child arrays),
//! each straddling two 4 KiB pages, so a sync that re-reads thousands of
//! tables pays about twice the TLB misses and loses the hardware prefetch at
//! every page boundary. Here pages are 4 KiB-aligned and allocated in
//! chunks, so neighbouring slots are neighbouring pages; a chunk is never
//! moved (no reallocation copies while a build grows).

use super::ppgtt_format::ENTRIES;
use std::ops::{Index, IndexMut};

/// One table's entries, aligned to a page.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u64; ENTRIES]);

/// Pages per chunk (128 KiB).
const CHUNK: usize = 32;

/// A growable array of zero-initialised table pages, indexed like a `Vec`.
#[derive(Default)]
pub(super) struct TablePages {
    chunks: Vec<Box<[AlignedPage]>>,
    len: usize,
}

impl TablePages {
    /// Append a zero-filled page; returns its index.
    pub(super) fn push_zeroed(&mut self) -> usize {
        if self.len == self.chunks.len() * CHUNK {
            self.chunks
                .push(vec![AlignedPage([0; ENTRIES]); CHUNK].into_boxed_slice());
        }
        self.len += 1;
        self.len - 1
    }

    /// Number of pages.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Index<usize> for TablePages {
    type Output = [u64; ENTRIES];
    #[inline]
    fn index(&self, i: usize) -> &[u64; ENTRIES] {
        assert!(i < self.len, "table page {i} out of range");
        &self.chunks[i / CHUNK][i % CHUNK].0
    }
}

impl IndexMut<usize> for TablePages {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut [u64; ENTRIES] {
        assert!(i < self.len, "table page {i} out of range");
        &mut self.chunks[i / CHUNK][i % CHUNK].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_zeroed_aligned_and_keep_their_contents() {
        let mut t = TablePages::default();
        for i in 0..3 * CHUNK + 1 {
            assert_eq!(t.push_zeroed(), i);
            assert!(t[i].iter().all(|&e| e == 0));
            assert_eq!(t[i].as_ptr() as usize % 4096, 0);
            t[i][i % ENTRIES] = i as u64 + 1;
        }
        assert_eq!(t.len(), 3 * CHUNK + 1);
        for i in 0..t.len() {
            assert_eq!(t[i][i % ENTRIES], i as u64 + 1);
            assert_eq!(t[i].iter().filter(|&&e| e != 0).count(), 1);
        }
        // Neighbouring indices within a chunk are neighbouring pages.
        assert_eq!(t[1].as_ptr() as usize - t[0].as_ptr() as usize, 4096);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn index_past_the_end_panics() {
        let mut t = TablePages::default();
        t.push_zeroed();
        let _ = t[1];
    }
}
