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

    /// One extent op (ABI 1.6), or the cache's pages: refused without a
    /// hypercall when the hypervisor offers no extents.
    fn map_extent(&mut self, domid: DomId, gfn: Gfn, writable: bool) -> Result<Bfn, MapError> {
        let perms = if writable {
            Permissions::RW
        } else {
            Permissions::RO
        };
        Client::map_extent(
            self,
            domid,
            gfn,
            perms,
            MemAttr::WriteBack,
            ContextId::DEFAULT,
        )
        .map_err(map_error)
    }

    fn unmap_extent(&mut self, first: Bfn) {
        if let Err(e) = Client::unmap_extent(self, first, ContextId::DEFAULT) {
            tracing::warn!(error = %e, "shadow extent unmap refused");
        }
    }
}

/// A client error as the shadow reports a refusal: its errno (`EIO` when
/// it has none) and its text.
fn map_error(e: crate::Error) -> MapError {
    MapError::new(e.errno().map_or(5 /* EIO */, |x| x.code()), e.to_string())
}
