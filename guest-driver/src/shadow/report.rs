//! What build/sync/teardown report back.

use super::gma::Gma;
use pviommu_abi::{Bfn, DomId, Gfn};

/// A guest leaf the mapper refused; it is non-present in the shadow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedLeaf {
    /// GMA of the 4 KiB page.
    pub gma: Gma,
    /// Guest frame that could not be mapped.
    pub gfn: Gfn,
    /// Errno from the mapper (or [`ERRNO_BFN_TOO_WIDE`](super::error::ERRNO_BFN_TOO_WIDE)).
    pub errno: i32,
}

/// Something wrong with the guest tables or the environment; the affected
/// entry is left non-present in the shadow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// A guest table page is already in use as a table elsewhere (shared
    /// table, loop, self-reference, or one page used at two levels). The
    /// reference with the lowest GMA (then the higher level) owns the page;
    /// this one is non-present until the owner goes away.
    DuplicateTable {
        /// GMA where the rejected entry's range starts.
        gma: Gma,
        /// Level number (4..=1) of the table the referenced page would be.
        level: u8,
        /// The table page referenced twice.
        table: Gfn,
    },
    /// A guest table page could not be read; it is treated as all zeroes.
    ReadFailed {
        /// The table page.
        table: Gfn,
        /// Errno from the reader.
        errno: i32,
    },
    /// No shadow page could be allocated for the table covering `gma`.
    OutOfShadowMemory {
        /// Start of the affected range.
        gma: Gma,
    },
    /// The configured table budget was exhausted at `gma`.
    TableBudgetExceeded {
        /// Start of the affected range.
        gma: Gma,
    },
    /// A GGTT update named an entry outside the shadowed range.
    EntryOutOfRange {
        /// The entry index.
        index: u64,
    },
}

/// Records a report keeps of each kind (refused leaves, anomalies): the
/// first ones; the rest are only counted (`refused_total`,
/// `anomalies_total`). A guest's tables decide how many there are: 1 GiB
/// pages outside its RAM under one table page made 33 M refused leaves
/// within the table budget (about 800 MB of records, several GB as the
/// tool's JSON).
pub const REPORT_KEPT: usize = 4096;

/// Result of a full build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Leaves now present in the shadow.
    pub leaves_mapped: u64,
    /// Leaves the mapper refused (the first [`REPORT_KEPT`]).
    pub refused: Vec<RefusedLeaf>,
    /// Leaves the mapper refused, kept or not.
    pub refused_total: u64,
    /// Problems with the guest tables (the first [`REPORT_KEPT`]).
    pub anomalies: Vec<Anomaly>,
    /// Problems with the guest tables, kept or not.
    pub anomalies_total: u64,
    /// Shadow table pages in use.
    pub tables: usize,
    /// Number of `FrameMapper::map` and `map_extents` calls made.
    pub map_calls: u64,
    /// Guest 2 MiB pages shadowed by one 2 MiB entry over an extent of
    /// BFNs (`FrameMapper::map_extents`); their 512 leaves are counted in
    /// `leaves_mapped`.
    pub extents_mapped: u64,
}

/// Result of an incremental sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Guest table pages re-read.
    pub pages_read: u64,
    /// Changed guest entries found by the diff.
    pub entries_changed: u64,
    /// Leaves newly made present.
    pub leaves_mapped: u64,
    /// Leaves removed (BFN released).
    pub leaves_unmapped: u64,
    /// Leaves the mapper refused (the first [`REPORT_KEPT`]).
    pub refused: Vec<RefusedLeaf>,
    /// Leaves the mapper refused, kept or not.
    pub refused_total: u64,
    /// Problems with the guest tables (the first [`REPORT_KEPT`]).
    pub anomalies: Vec<Anomaly>,
    /// Problems with the guest tables, kept or not.
    pub anomalies_total: u64,
    /// Frames in `changed_table_gfns` that are not shadowed tables (ignored).
    pub ignored: Vec<Gfn>,
    /// Number of `FrameMapper::map` and `map_extents` calls made.
    pub map_calls: u64,
    /// Number of `FrameMapper::unmap` and `unmap_extents` calls made.
    pub unmap_calls: u64,
    /// Guest 2 MiB pages newly shadowed by one 2 MiB entry
    /// (`FrameMapper::map_extents`; their leaves are in `leaves_mapped`).
    pub extents_mapped: u64,
    /// 2 MiB shadow entries removed with `FrameMapper::unmap_extents`
    /// (their leaves are in `leaves_unmapped`).
    pub extents_unmapped: u64,
}

impl SyncReport {
    /// A leaf the mapper refused: counted, and kept among the first
    /// [`REPORT_KEPT`].
    pub(crate) fn note_refused(&mut self, leaf: RefusedLeaf) {
        self.refused_total += 1;
        if self.refused.len() < REPORT_KEPT {
            self.refused.push(leaf);
        }
    }
    /// A problem with the guest tables: counted, and kept among the first
    /// [`REPORT_KEPT`].
    pub(crate) fn note_anomaly(&mut self, anomaly: Anomaly) {
        self.anomalies_total += 1;
        if self.anomalies.len() < REPORT_KEPT {
            self.anomalies.push(anomaly);
        }
    }
}

/// A shadow leaf made non-present because the hypervisor revoked its BFN
/// (the guest page left the domain, lost device-write access, or the domain
/// died).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevokedLeaf {
    /// GMA of the 4 KiB page.
    pub gma: Gma,
    /// The guest domain.
    pub domid: DomId,
    /// The guest frame the leaf mapped.
    pub gfn: Gfn,
    /// The revoked bus frame the leaf held.
    pub bfn: Bfn,
}
