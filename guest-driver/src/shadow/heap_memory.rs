//! `Vec`-backed shadow memory for tests, benches and simulation.
//!
//! One heap page per table. Tried and dropped: the pages in `TablePages`
//! (contiguous, on huge pages): the build was no faster, and the 1 % spread
//! sync was 15-25 % slower (its scattered reads of shadow leaves, next to
//! the snapshots streamed in the same 2 MiB-aligned layout).

use super::error::ShadowError;
use super::traits::ShadowMemory;
use pviommu_abi::Bfn;

/// Shadow memory on the heap: table page `Bfn(i)` is element `i` of a vector.
#[derive(Default)]
pub struct HeapShadowMemory {
    pages: Vec<Option<Box<[u64; 512]>>>,
    free: Vec<usize>,
    live: usize,
    limit: Option<usize>,
}

impl HeapShadowMemory {
    /// Empty memory without a page limit.
    pub fn new() -> Self {
        Self::default()
    }
    /// Empty memory that refuses to hold more than `max_pages` live pages.
    pub fn with_limit(max_pages: usize) -> Self {
        HeapShadowMemory {
            limit: Some(max_pages),
            ..Self::default()
        }
    }
    /// Number of table pages currently allocated.
    pub fn live_pages(&self) -> usize {
        self.live
    }
}

impl ShadowMemory for HeapShadowMemory {
    fn alloc_table(&mut self) -> Result<Bfn, ShadowError> {
        if self.limit.is_some_and(|l| self.live >= l) {
            return Err(ShadowError::OutOfShadowMemory);
        }
        self.live += 1;
        let page = Box::new([0u64; 512]);
        if let Some(i) = self.free.pop() {
            self.pages[i] = Some(page);
            Ok(Bfn(i as u64))
        } else {
            self.pages.push(Some(page));
            Ok(Bfn(self.pages.len() as u64 - 1))
        }
    }

    fn free_table(&mut self, page: Bfn) {
        if let Some(slot) = self.pages.get_mut(page.0 as usize) {
            if slot.take().is_some() {
                self.live -= 1;
                self.free.push(page.0 as usize);
            }
        }
    }

    fn write_entry(&mut self, page: Bfn, index: usize, value: u64) {
        if let Some(Some(p)) = self.pages.get_mut(page.0 as usize) {
            if let Some(e) = p.get_mut(index) {
                *e = value;
            }
        }
    }

    fn read_entry(&self, page: Bfn, index: usize) -> Option<u64> {
        self.table(page)?.get(index).copied()
    }

    fn table(&self, page: Bfn) -> Option<&[u64; 512]> {
        self.pages.get(usize::try_from(page.0).ok()?)?.as_deref()
    }

    fn table_mut(&mut self, page: Bfn) -> Option<&mut [u64; 512]> {
        self.pages
            .get_mut(usize::try_from(page.0).ok()?)?
            .as_deref_mut()
    }
}
