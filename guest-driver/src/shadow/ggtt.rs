//! Shadow of a range of the global GTT.
//!
//! Under GVT-g the guest's GGTT writes are trapped, so the mediator holds the
//! guest's view as an array of entries; [`ShadowGgtt`] takes that array (and
//! later, updates to it) and keeps shadow entries GMA -> BFN in shadow table
//! pages of 512 entries each. The GGTT has no writable bit: every frame is
//! mapped writable.

use super::config::ShadowConfig;
use super::error::{ERRNO_BFN_TOO_WIDE, ERRNO_MAPPER_SHORT};
use super::ggtt_format as fmt;
use super::gma::Gma;
use super::report::{Anomaly, BuildReport, RefusedLeaf, RevokedLeaf, SyncReport};
use super::traits::{FrameMapper, ShadowMemory};
use pviommu_abi::{Bfn, DomId, Gfn};

/// A shadow of GGTT entries `first_entry .. first_entry + len`.
pub struct ShadowGgtt {
    domid: DomId,
    config: ShadowConfig,
    first_entry: u64,
    guest: Vec<u64>,
    shadow: Vec<u64>,
    pages: Vec<Bfn>,
    mapped: u64,
    pending: Vec<(usize, u64)>,
    gfns: Vec<Gfn>,
    writable: Vec<bool>,
    unmaps: Vec<Bfn>,
    /// (BFN, entry) of every present entry, sorted, built by the first
    /// revocation after a change and dropped by every sync (see
    /// `ppgtt_revoke.rs` for the same scheme).
    leaf_index: Option<Vec<(u64, u32)>>,
}

impl ShadowGgtt {
    /// Shadow `guest_entries`, the guest's GGTT entries starting at entry
    /// index `first_entry` (GMA `first_entry * 4096`), with default tunables.
    pub fn build<M, S>(
        mapper: &mut M,
        memory: &mut S,
        domid: DomId,
        first_entry: u64,
        guest_entries: &[u64],
    ) -> (ShadowGgtt, BuildReport)
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        Self::build_with(
            ShadowConfig::default(),
            mapper,
            memory,
            domid,
            first_entry,
            guest_entries,
        )
    }

    /// [`build`](Self::build) with explicit tunables (`max_tables` unused).
    pub fn build_with<M, S>(
        config: ShadowConfig,
        mapper: &mut M,
        memory: &mut S,
        domid: DomId,
        first_entry: u64,
        guest_entries: &[u64],
    ) -> (ShadowGgtt, BuildReport)
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let n = guest_entries.len();
        let mut t = ShadowGgtt {
            domid,
            config: ShadowConfig {
                batch: config.batch.max(1),
                ..config
            },
            first_entry,
            guest: guest_entries.to_vec(),
            shadow: vec![0; n],
            pages: Vec::with_capacity(n.div_ceil(512)),
            mapped: 0,
            pending: Vec::new(),
            gfns: Vec::new(),
            writable: Vec::new(),
            unmaps: Vec::new(),
            leaf_index: None,
        };
        let mut report = SyncReport::default();
        for _ in 0..n.div_ceil(512) {
            match memory.alloc_table() {
                Ok(p) => t.pages.push(p),
                Err(_) => {
                    for p in t.pages.drain(..) {
                        memory.free_table(p);
                    }
                    report.note_anomaly(Anomaly::OutOfShadowMemory {
                        gma: Gma(first_entry.saturating_mul(fmt::ENTRY_SPAN)),
                    });
                    break;
                }
            }
        }
        if !t.pages.is_empty() {
            for i in 0..n {
                let e = t.guest[i];
                if e & fmt::PRESENT != 0 {
                    t.queue_map(mapper, memory, &mut report, i, e);
                }
            }
        }
        t.flush(mapper, memory, &mut report);
        let tables = t.pages.len();
        (
            t,
            BuildReport {
                leaves_mapped: report.leaves_mapped,
                refused: report.refused,
                refused_total: report.refused_total,
                anomalies: report.anomalies,
                anomalies_total: report.anomalies_total,
                tables,
                map_calls: report.map_calls,
                // (The GGTT has no large pages.)
                extents_mapped: 0,
            },
        )
    }

    /// Apply guest GGTT writes `(entry index, new value)`; later writes to
    /// the same index win. Unchanged entries cost nothing.
    pub fn sync<M, S>(
        &mut self,
        mapper: &mut M,
        memory: &mut S,
        updates: &[(u64, u64)],
    ) -> SyncReport
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut report = SyncReport::default();
        self.leaf_index = None;
        let mut ups: Vec<(u64, u64)> = updates.to_vec();
        ups.sort_by_key(|u| u.0); // stable: the last write to an index stays last
        let n = ups.len();
        for k in 0..n {
            let (index, value) = ups[k];
            if k + 1 < n && ups[k + 1].0 == index {
                continue;
            }
            let rel = index.wrapping_sub(self.first_entry);
            if index < self.first_entry || rel >= self.guest.len() as u64 || self.pages.is_empty() {
                report.note_anomaly(Anomaly::EntryOutOfRange { index });
                continue;
            }
            let i = rel as usize;
            if self.guest[i] == value {
                continue;
            }
            report.entries_changed += 1;
            self.guest[i] = value;
            let old = self.shadow[i];
            if old & fmt::PRESENT != 0 {
                self.shadow[i] = 0;
                memory.write_entry(self.pages[i / 512], i % 512, 0);
                self.mapped -= 1;
                report.leaves_unmapped += 1;
                self.unmaps.push(Bfn((old & fmt::ADDR_MASK) >> 12));
            }
            if value & fmt::PRESENT != 0 {
                self.queue_map(mapper, memory, &mut report, i, value);
            }
        }
        self.flush(mapper, memory, &mut report);
        report
    }

    /// Make every entry holding `bfn` non-present (the hypervisor revoked
    /// it; the caller's acknowledgement releases it, so it is not unmapped)
    /// and report them. A later guest write of such an entry maps afresh.
    pub fn revoke<S: ShadowMemory + ?Sized>(
        &mut self,
        memory: &mut S,
        bfn: Bfn,
    ) -> Vec<RevokedLeaf> {
        let index = self.leaf_index.take().unwrap_or_else(|| {
            let mut ix: Vec<(u64, u32)> = (self.shadow.iter().enumerate())
                .filter(|(_, e)| **e & fmt::PRESENT != 0)
                .map(|(i, e)| ((e & fmt::ADDR_MASK) >> 12, i as u32))
                .collect();
            ix.sort_unstable();
            ix
        });
        let start = index.partition_point(|(b, _)| *b < bfn.0);
        let mut out = Vec::new();
        for &(_, i) in index[start..].iter().take_while(|(b, _)| *b == bfn.0) {
            let i = i as usize;
            let e = self.shadow[i];
            if e & fmt::PRESENT == 0 || (e & fmt::ADDR_MASK) >> 12 != bfn.0 {
                continue;
            }
            self.shadow[i] = 0;
            memory.write_entry(self.pages[i / 512], i % 512, 0);
            self.mapped -= 1;
            out.push(RevokedLeaf {
                gma: self.gma_of(i),
                domid: self.domid,
                gfn: Gfn((self.guest[i] & fmt::ADDR_MASK) >> 12),
                bfn,
            });
        }
        self.leaf_index = Some(index);
        out
    }

    /// Unmap every entry and free the shadow pages; returns entries unmapped.
    pub fn teardown<M, S>(mut self, mapper: &mut M, memory: &mut S) -> u64
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut n = 0;
        for &e in &self.shadow {
            if e & fmt::PRESENT != 0 {
                self.unmaps.push(Bfn((e & fmt::ADDR_MASK) >> 12));
                n += 1;
            }
        }
        for chunk in self.unmaps.chunks(self.config.batch) {
            mapper.unmap(chunk);
        }
        for &p in &self.pages {
            memory.free_table(p);
        }
        n
    }

    /// Shadow pages holding entries `first_entry..`, 512 per page, for the
    /// mediator to copy into (or point) the real GGTT.
    pub fn pages(&self) -> &[Bfn] {
        &self.pages
    }

    /// The GMA of shadowed entry `i`, saturated: `first_entry` is the
    /// caller's, and one near 2^52 or above has no GMA (the product
    /// overflowed, a panic in a debug build; a hostile-input audit of the
    /// guest side).
    fn gma_of(&self, i: usize) -> Gma {
        Gma(self
            .first_entry
            .saturating_add(i as u64)
            .saturating_mul(fmt::ENTRY_SPAN))
    }

    /// First shadowed entry index.
    pub fn first_entry(&self) -> u64 {
        self.first_entry
    }

    /// Number of shadowed entries.
    pub fn len(&self) -> usize {
        self.guest.len()
    }

    /// True if no entries are shadowed.
    pub fn is_empty(&self) -> bool {
        self.guest.is_empty()
    }

    /// Entries currently present in the shadow.
    pub fn mapped_leaves(&self) -> u64 {
        self.mapped
    }

    /// The guest domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    fn queue_map<M, S>(
        &mut self,
        mapper: &mut M,
        memory: &mut S,
        report: &mut SyncReport,
        i: usize,
        e: u64,
    ) where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        self.pending.push((i, e));
        self.gfns.push(Gfn((e & fmt::ADDR_MASK) >> 12));
        self.writable.push(true);
        if self.pending.len() >= self.config.batch {
            self.flush_maps(mapper, memory, report);
        }
    }

    fn flush<M, S>(&mut self, mapper: &mut M, memory: &mut S, report: &mut SyncReport)
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        self.flush_maps(mapper, memory, report);
        for chunk in self.unmaps.chunks(self.config.batch) {
            mapper.unmap(chunk);
            report.unmap_calls += 1;
        }
        self.unmaps.clear();
    }

    fn flush_maps<M, S>(&mut self, mapper: &mut M, memory: &mut S, report: &mut SyncReport)
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        if self.pending.is_empty() {
            return;
        }
        let results = mapper.map(self.domid, &self.gfns, &self.writable);
        report.map_calls += 1;
        let mut results = results.into_iter();
        for &(i, e) in &self.pending {
            let errno = match results.next() {
                Some(Ok(bfn)) if bfn.0 <= fmt::MAX_FRAME => {
                    let v = fmt::shadow_entry(e, bfn.0);
                    self.shadow[i] = v;
                    memory.write_entry(self.pages[i / 512], i % 512, v);
                    self.mapped += 1;
                    report.leaves_mapped += 1;
                    continue;
                }
                Some(Ok(bfn)) => {
                    self.unmaps.push(bfn);
                    ERRNO_BFN_TOO_WIDE
                }
                Some(Err(err)) => err.errno,
                None => ERRNO_MAPPER_SHORT,
            };
            report.note_refused(RefusedLeaf {
                gma: self.gma_of(i),
                gfn: Gfn((e & fmt::ADDR_MASK) >> 12),
                errno,
            });
        }
        self.unmaps.extend(results.flatten());
        self.pending.clear();
        self.gfns.clear();
        self.writable.clear();
    }
}
