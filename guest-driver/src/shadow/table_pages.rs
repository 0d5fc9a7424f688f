//! Table-sized pages in large anonymous mappings: the guest snapshots of a
//! shadow.
//!
//! A shadow of 1 Mi leaves holds 2048 PT snapshots (8 MiB). One heap
//! allocation per page costs, at every build, a page fault (and often a
//! `memset`) per page, and at every sync of a spread dirty set a TLB miss
//! per page re-read (expensive under nested paging).
//! Here pages come from anonymous mappings, which the kernel hands out
//! zero-filled on first touch (no `memset`); every chunk after the first is
//! a 2 MiB-aligned 2 MiB region advised for transparent huge pages, so 512
//! pages cost one fault and one TLB entry. The first chunk is small and not
//! advised, so a shadow of a few tables does not pin 2 MiB. Neighbouring
//! indices within a chunk are neighbouring pages, and a chunk never moves.
//!
//! The huge chunks of a dropped `TablePages` go to a small process-wide pool
//! for the next one: a mediator that rebuilds shadows would otherwise pay
//! the kernel's fault and 2 MiB clear per chunk on every build (without the
//! pool, `clear_page` was a quarter of a 1 Mi-leaf build's profile), where
//! heap pages were recycled by `malloc`. A recycled page is zeroed when handed out, right before the
//! caller writes it, so the clear costs no extra cache misses.

use super::ppgtt_format::ENTRIES;
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::num::NonZeroUsize;
use std::ops::{Index, IndexMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// One table's entries, aligned to a page.
#[repr(C, align(4096))]
pub(super) struct AlignedPage(pub(super) [u64; ENTRIES]);

impl AlignedPage {
    /// A zero-filled page on the heap, page-aligned: a buffer that guest
    /// table pages (page-aligned wherever they are mapped) are copied into
    /// and compared with at full speed. A heap `[u64; 512]` lands at any
    /// 16-byte offset, and a 4 KiB copy or compare between operands that
    /// are misaligned to each other took up to twice as long on the bench
    /// machine (the re-read of a sync, against its floor, came out 40 %
    /// slower for no other reason).
    pub(super) fn boxed() -> Box<AlignedPage> {
        Box::new(AlignedPage([0; ENTRIES]))
    }
}

const PAGE: usize = 4096;
/// Pages of the first chunk (128 KiB, small pages).
const FIRST: usize = 32;
/// Pages of every later chunk (2 MiB, one huge page when the kernel has one).
const HUGE_PAGES: usize = 512;
const HUGE: usize = HUGE_PAGES * PAGE;
/// Most huge chunks kept for reuse (32 MiB).
const POOL_MAX: usize = 16;

/// Huge chunks released by dropped `TablePages`.
static POOL: Mutex<Vec<Chunk>> = Mutex::new(Vec::new());

/// An anonymous private mapping of `pages` pages, owned like a
/// `Box<[AlignedPage]>`.
struct Chunk {
    ptr: NonNull<AlignedPage>,
    pages: usize,
    /// Pages from here on were never handed out, so are still zero.
    dirty: usize,
}

// SAFETY: a chunk exclusively owns its mapping (like a Box); access goes
// through `&`/`&mut` of the owning `TablePages`.
unsafe impl Send for Chunk {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// Map a fresh chunk of `pages` pages; with `huge`, 2 MiB-aligned and
    /// advised for huge pages. None if the address space is exhausted.
    fn map(pages: usize, huge: bool) -> Option<Chunk> {
        let len = pages * PAGE;
        // For a huge chunk map 2 MiB more than needed and trim to an aligned
        // window (the kernel aligns large anonymous mappings itself only
        // since Linux 6.7).
        let extra = if huge { HUGE } else { 0 };
        // SAFETY: a new private anonymous mapping at an address the kernel
        // chooses; it aliases nothing.
        let base = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(len + extra)?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .ok()?;
        let start = (base.as_ptr() as usize).next_multiple_of(if huge { HUGE } else { PAGE });
        let head = start - base.as_ptr() as usize;
        let tail = extra - head;
        // SAFETY: unmapping the unused head and tail of the mapping just
        // made; nothing points into them. Failure only leaks address space.
        unsafe {
            if head != 0 {
                let _ = munmap(base, head);
            }
            if tail != 0 {
                let _ = munmap(base.byte_add(head + len), tail);
            }
        }
        let ptr = NonNull::new(start as *mut AlignedPage)?;
        if huge {
            // SAFETY: advice on the mapping owned here; it changes only how
            // the kernel backs it. Without huge pages it still works.
            let _ = unsafe { madvise(ptr.cast(), len, MmapAdvise::MADV_HUGEPAGE) };
        }
        Some(Chunk {
            ptr,
            pages,
            dirty: 0,
        })
    }

    /// A huge chunk from the pool, or a fresh one.
    fn huge() -> Option<Chunk> {
        let pooled = POOL.lock().ok().and_then(|mut p| p.pop());
        pooled.or_else(|| Chunk::map(HUGE_PAGES, true))
    }

    fn pages(&self) -> &[AlignedPage] {
        // SAFETY: the mapping holds `pages` pages, readable and writable,
        // zero-filled or written through `pages_mut` (every bit pattern is
        // a valid `[u64; 512]`), and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.pages) }
    }

    fn pages_mut(&mut self) -> &mut [AlignedPage] {
        // SAFETY: as in `pages`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.pages) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the window this chunk owns, once; no
        // reference into it outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.pages * PAGE) };
    }
}

/// A growable array of zero-initialised table pages, indexed like a `Vec`.
/// Public (hidden) only so the shadow bench can keep its floor's snapshots
/// in the same storage as the shadow's.
#[doc(hidden)]
#[derive(Default)]
pub struct TablePages {
    chunks: Vec<Chunk>,
    len: usize,
}

impl TablePages {
    /// (chunk, page within it) of page `i`.
    #[inline]
    fn locate(i: usize) -> (usize, usize) {
        if i < FIRST {
            (0, i)
        } else {
            (1 + (i - FIRST) / HUGE_PAGES, (i - FIRST) % HUGE_PAGES)
        }
    }

    /// Append a zero-filled page; returns its index, or None if no memory
    /// could be mapped for it.
    pub fn push_zeroed(&mut self) -> Option<usize> {
        let (c, o) = Self::locate(self.len);
        if c == self.chunks.len() {
            let chunk = match c {
                0 => Chunk::map(FIRST, false)?,
                _ => Chunk::huge()?,
            };
            self.chunks.push(chunk);
        }
        let chunk = &mut self.chunks[c];
        if o < chunk.dirty {
            chunk.pages_mut()[o].0 = [0; ENTRIES];
        }
        self.len += 1;
        Some(self.len - 1)
    }

    /// Number of pages.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for TablePages {
    fn drop(&mut self) {
        let Ok(mut pool) = POOL.lock() else { return };
        for (c, mut chunk) in self.chunks.drain(..).enumerate() {
            if c > 0 && pool.len() < POOL_MAX {
                // Pages below `len` (in this chunk) were handed out.
                let used = (self.len - FIRST - (c - 1) * HUGE_PAGES).min(HUGE_PAGES);
                chunk.dirty = chunk.dirty.max(used);
                pool.push(chunk);
            }
        }
    }
}

impl Index<usize> for TablePages {
    type Output = [u64; ENTRIES];
    #[inline]
    fn index(&self, i: usize) -> &[u64; ENTRIES] {
        assert!(i < self.len, "table page {i} out of range");
        let (c, o) = Self::locate(i);
        &self.chunks[c].pages()[o].0
    }
}

impl IndexMut<usize> for TablePages {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut [u64; ENTRIES] {
        assert!(i < self.len, "table page {i} out of range");
        let (c, o) = Self::locate(i);
        &mut self.chunks[c].pages_mut()[o].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_zeroed_aligned_and_keep_their_contents() {
        let mut t = TablePages::default();
        let n = FIRST + 2 * HUGE_PAGES + 1;
        for i in 0..n {
            assert_eq!(t.push_zeroed(), Some(i));
            assert!(t[i].iter().all(|&e| e == 0));
            assert_eq!(t[i].as_ptr() as usize % PAGE, 0);
            t[i][i % ENTRIES] = i as u64 + 1;
        }
        assert_eq!(t.len(), n);
        for i in 0..t.len() {
            assert_eq!(t[i][i % ENTRIES], i as u64 + 1);
            assert_eq!(t[i].iter().filter(|&&e| e != 0).count(), 1);
        }
        // Neighbouring indices within a chunk are neighbouring pages, and
        // the huge chunks are 2 MiB-aligned.
        assert_eq!(t[1].as_ptr() as usize - t[0].as_ptr() as usize, PAGE);
        assert_eq!(t[FIRST].as_ptr() as usize % HUGE, 0);
        assert_eq!(
            t[FIRST + 1].as_ptr() as usize - t[FIRST].as_ptr() as usize,
            PAGE
        );
    }

    #[test]
    fn recycled_pages_come_back_zeroed() {
        for _ in 0..3 {
            let mut t = TablePages::default();
            for i in 0..FIRST + HUGE_PAGES + 3 {
                assert_eq!(t.push_zeroed(), Some(i));
                assert!(t[i].iter().all(|&e| e == 0), "page {i}");
                t[i].fill(u64::MAX);
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn index_past_the_end_panics() {
        let mut t = TablePages::default();
        t.push_zeroed();
        let _ = t[1];
    }
}
