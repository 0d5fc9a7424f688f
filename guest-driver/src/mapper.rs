//! The client as the shadow page tables' [`FrameMapper`]: the shadow code
//! asks for batches of foreign frames and gets BFNs through the cache.

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MemAttr, Permissions};

use crate::shadow::{FrameMapper, MapError};
use crate::transport::Transport;
use crate::Client;

impl<T: Transport> FrameMapper for Client<T> {
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>> {
        // Two calls at most: read-only leaves and writable leaves.
        let mut out: Vec<Option<Result<Bfn, MapError>>> = vec![None; gfns.len()];
        for write in [false, true] {
            let idx: Vec<usize> = (0..gfns.len())
                .filter(|i| writable.get(*i).copied().unwrap_or(false) == write)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let sel: Vec<Gfn> = idx.iter().map(|i| gfns[*i]).collect();
            let perms = if write {
                Permissions::RW
            } else {
                Permissions::RO
            };
            let rs = self.map_foreign(domid, &sel, perms, MemAttr::WriteBack, ContextId::DEFAULT);
            for (i, r) in idx.into_iter().zip(rs) {
                out[i] = Some(r.map_err(map_error));
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(MapError::new(5, "no result".to_string()))))
            .collect()
    }

    fn unmap(&mut self, bfns: &[Bfn]) {
        for r in Client::unmap(self, bfns, ContextId::DEFAULT) {
            if let Err(e) = r {
                tracing::warn!(error = %e, "shadow unmap refused");
            }
        }
    }

    fn maps_extents(&self) -> bool {
        self.caps().features & pviommu_abi::feature::EXTENTS_2M != 0
    }

    /// Extent ops (ABI 1.6) in as few batches as the hypervisor takes, or
    /// the cache's pages; as [`map`](FrameMapper::map), one call for the
    /// read-only extents and one for the writable ones.
    fn map_extents(
        &mut self,
        domid: DomId,
        gfns: &[Gfn],
        writable: &[bool],
    ) -> Vec<Result<Bfn, MapError>> {
        let mut out: Vec<Option<Result<Bfn, MapError>>> = vec![None; gfns.len()];
        for write in [false, true] {
            let idx: Vec<usize> = (0..gfns.len())
                .filter(|i| writable.get(*i).copied().unwrap_or(false) == write)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let sel: Vec<Gfn> = idx.iter().map(|i| gfns[*i]).collect();
            let perms = if write {
                Permissions::RW
            } else {
                Permissions::RO
            };
            let rs = Client::map_extents(
                self,
                domid,
                &sel,
                perms,
                MemAttr::WriteBack,
                ContextId::DEFAULT,
            );
            for (i, r) in idx.into_iter().zip(rs) {
                out[i] = Some(r.map_err(map_error));
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(MapError::new(5, "no result".to_string()))))
            .collect()
    }

    fn unmap_extents(&mut self, firsts: &[Bfn]) {
        for r in Client::unmap_extents(self, firsts, ContextId::DEFAULT) {
            if let Err(e) = r {
                tracing::warn!(error = %e, "shadow extent unmap refused");
            }
        }
    }
}

/// A client error as the shadow reports a refusal: its errno (`EIO` when
/// it has none) and its text.
fn map_error(e: crate::Error) -> MapError {
    MapError::new(e.errno().map_or(5 /* EIO */, |x| x.code()), e.to_string())
}
