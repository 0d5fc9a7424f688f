//! The client as the shadow page tables' [`FrameMapper`]: the shadow code
//! asks for batches of foreign frames and gets BFNs through the cache.

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MemAttr, Permissions};

use crate::shadow::{FrameMapper, MapError};
use crate::transport::Transport;
use crate::Client;

impl<T: Transport> FrameMapper for Client<T> {
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>> {
        by_access(gfns, writable, |gfns, perms| {
            self.map_foreign(domid, gfns, perms, MemAttr::WriteBack, ContextId::DEFAULT)
        })
    }

    fn unmap(&mut self, bfns: &[Bfn]) {
        warn_refused(
            Client::unmap(self, bfns, ContextId::DEFAULT),
            "shadow unmap refused",
        );
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
        by_access(gfns, writable, |gfns, perms| {
            Client::map_extents(
                self,
                domid,
                gfns,
                perms,
                MemAttr::WriteBack,
                ContextId::DEFAULT,
            )
        })
    }

    fn unmap_extents(&mut self, firsts: &[Bfn]) {
        let results = Client::unmap_extents(self, firsts, ContextId::DEFAULT);
        warn_refused(results, "shadow extent unmap refused");
    }
}

/// Map `gfns` with `map` in two calls at most, the read-only ones and the
/// writable ones (`writable[i]`); one result per gfn, in order.
fn by_access(
    gfns: &[Gfn],
    writable: &[bool],
    mut map: impl FnMut(&[Gfn], Permissions) -> Vec<Result<Bfn, crate::Error>>,
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
        for (i, r) in idx.into_iter().zip(map(&sel, perms)) {
            out[i] = Some(r.map_err(map_error));
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(MapError::new(
                    crate::error::ERRNO_TRANSPORT,
                    "no result".to_string(),
                ))
            })
        })
        .collect()
}

/// Log the unmaps the client refused (the shadow's unmaps have no caller
/// to report to).
fn warn_refused(results: Vec<Result<(), crate::Error>>, what: &str) {
    for e in results.into_iter().filter_map(Result::err) {
        tracing::warn!(error = %e, "{what}");
    }
}

/// A client error as the shadow reports a refusal: its errno (the
/// transport's, `ECOMM`, when the hypervisor gave none) and its text.
fn map_error(e: crate::Error) -> MapError {
    MapError::new(
        e.errno()
            .map_or(crate::error::ERRNO_TRANSPORT, |x| x.code()),
        e.to_string(),
    )
}
