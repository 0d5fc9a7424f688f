//! Host-memory shadow table pages for tests, benches, simulation and the
//! mediator's hosted path.

use super::error::ShadowError;
use super::table_pages::TablePages;
use super::traits::ShadowMemory;
use pviommu_abi::Bfn;

/// Shadow memory in host memory: table page `Bfn(i)` is page `i` of a
/// [`TablePages`] (large mappings, huge pages past the first few dozen
/// tables; see `table_pages.rs` for why), freed pages are reused.
#[derive(Default)]
pub struct HeapShadowMemory {
    pages: TablePages,
    /// Whether page `i` is allocated.
    live_map: Vec<bool>,
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

    /// Index of live page `page`.
    #[inline]
    fn live_index(&self, page: Bfn) -> Option<usize> {
        let i = usize::try_from(page.0).ok()?;
        self.live_map.get(i).copied()?.then_some(i)
    }
}

impl ShadowMemory for HeapShadowMemory {
    fn alloc_table(&mut self) -> Result<Bfn, ShadowError> {
        if self.limit.is_some_and(|l| self.live >= l) {
            return Err(ShadowError::OutOfShadowMemory);
        }
        let i = if let Some(i) = self.free.pop() {
            // A reused page is zeroed here; fresh pages come zeroed.
            self.pages[i] = [0; 512];
            i
        } else {
            let i = self
                .pages
                .push_zeroed()
                .ok_or(ShadowError::OutOfShadowMemory)?;
            self.live_map.push(false);
            i
        };
        self.live_map[i] = true;
        self.live += 1;
        Ok(Bfn(i as u64))
    }

    fn free_table(&mut self, page: Bfn) {
        if let Some(i) = self.live_index(page) {
            self.live_map[i] = false;
            self.live -= 1;
            self.free.push(i);
        }
    }

    #[inline]
    fn write_entry(&mut self, page: Bfn, index: usize, value: u64) {
        if let Some(e) = self.table_mut(page).and_then(|t| t.get_mut(index)) {
            *e = value;
        }
    }

    #[inline]
    fn read_entry(&self, page: Bfn, index: usize) -> Option<u64> {
        self.table(page)?.get(index).copied()
    }

    #[inline]
    fn table(&self, page: Bfn) -> Option<&[u64; 512]> {
        Some(&self.pages[self.live_index(page)?])
    }

    #[inline]
    fn table_mut(&mut self, page: Bfn) -> Option<&mut [u64; 512]> {
        let i = self.live_index(page)?;
        Some(&mut self.pages[i])
    }
}
