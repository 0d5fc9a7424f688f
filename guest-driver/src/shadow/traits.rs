//! The three interfaces the shadowing code needs from its environment.

use super::error::{MapError, ShadowError, ERRNO_NO_EXTENTS};
use pviommu_abi::{Bfn, DomId, Gfn, EXTENT_PAGES};

/// Reads guest table pages (a foreign mapping of the guest's memory in the
/// real mediator).
pub trait GuestTableReader {
    /// Copy the 4 KiB page at `gfn` (512 little-endian 64-bit entries) into
    /// `buf`.
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError>;
    /// Forget anything cached about the guest's memory (a reader over
    /// foreign mappings unmaps them): the guest's memory changed under the
    /// mediator, or everything is about to be re-read.
    fn invalidate(&self) {}
}

impl<R: GuestTableReader + ?Sized> GuestTableReader for Box<R> {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        (**self).read_page(gfn, buf)
    }
    fn invalidate(&self) {
        (**self).invalidate()
    }
}

/// Memory holding the shadow table pages, addressable by the GPU. A table
/// page is named by the frame the GPU uses to reach it.
pub trait ShadowMemory {
    /// Allocate a zero-filled table page.
    fn alloc_table(&mut self) -> Result<Bfn, ShadowError>;
    /// Release a table page obtained from [`alloc_table`](Self::alloc_table).
    fn free_table(&mut self, page: Bfn);
    /// Write entry `index` (< 512) of table `page`.
    fn write_entry(&mut self, page: Bfn, index: usize, value: u64);
    /// Read entry `index` of table `page`; None if `page` is not a live table
    /// or `index` is out of range. The shadow keeps no copy of its leaves:
    /// it reads a leaf back here to learn which BFN to release.
    fn read_entry(&self, page: Bfn, index: usize) -> Option<u64>;
    /// All entries of live table `page`, for memory that can hand them out
    /// directly: the shadow reads and writes whole runs of a table's leaves
    /// at once, without a call per entry. None (the default) makes it use
    /// [`read_entry`](Self::read_entry) and [`write_entry`](Self::write_entry).
    fn table(&self, page: Bfn) -> Option<&[u64; 512]> {
        let _ = page;
        None
    }
    /// Like [`table`](Self::table), for writing.
    fn table_mut(&mut self, page: Bfn) -> Option<&mut [u64; 512]> {
        let _ = page;
        None
    }
}

/// Obtains bus frames for guest frames (the PV-IOMMU map/unmap calls).
///
/// Contract: every `Ok` returned by [`map`](Self::map) is balanced by exactly
/// one [`unmap`](Self::unmap) of that BFN; mapping the same guest frame twice
/// may return the same BFN (reference counted) or a different one, and the
/// last unmap releases it.
pub trait FrameMapper {
    /// Map `gfns[i]` of `domid`, writable if `writable[i]`. Returns one result
    /// per frame, in order. Called with up to the configured batch size.
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>>;
    /// Drop one reference to each of `bfns`.
    fn unmap(&mut self, bfns: &[Bfn]);
    /// Whether [`map_extents`](Self::map_extents) may map anything: the
    /// shadow then shadows a guest's 2 MiB page with one 2 MiB entry where
    /// it can. The default: no.
    fn maps_extents(&self) -> bool {
        false
    }
    /// Map the 2 MiB extent of `domid` from each of `gfns` (multiples of
    /// 512), writable if `writable[i]`: the 512 frames at 512 consecutive
    /// BFNs from the one returned, a multiple of 512, so that one 2 MiB
    /// shadow entry can hold them (PV-IOMMU ABI 1.6,
    /// `PVIOMMU_F_EXTENT_2M`). One result per extent, in order; each all
    /// or nothing: on `Err` nothing of it is mapped, and the shadow maps
    /// its pages one by one instead. Called with up to the configured
    /// batch size of extents. The default refuses each (`EOPNOTSUPP`).
    fn map_extents(
        &mut self,
        domid: DomId,
        gfns: &[Gfn],
        writable: &[bool],
    ) -> Vec<Result<Bfn, MapError>> {
        let _ = (domid, writable);
        let no = || MapError::new(ERRNO_NO_EXTENTS, "the mapper maps no 2 MiB extents");
        gfns.iter().map(|_| Err(no())).collect()
    }
    /// Drop one reference to each of the 512 BFNs from each of `firsts`,
    /// which [`map_extents`](Self::map_extents) returned and none of which
    /// was revoked. The default unmaps them as pages.
    fn unmap_extents(&mut self, firsts: &[Bfn]) {
        for first in firsts {
            let bfns: Vec<Bfn> = (0..EXTENT_PAGES).map(|i| Bfn(first.0 + i)).collect();
            self.unmap(&bfns);
        }
    }
}
