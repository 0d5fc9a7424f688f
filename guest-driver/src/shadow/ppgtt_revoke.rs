//! Revocation: the hypervisor took a BFN away (its page left the guest, or
//! the guest died) and keeps it reserved until the mediator acknowledges it.
//! Before that acknowledgement every shadow leaf holding the BFN must become
//! non-present, or the GPU could reach whatever the BFN is given to next.
//!
//! The shadow keeps no BFN -> leaf map on its map/unmap paths. The first
//! revocation after a build or sync indexes the present leaves with one
//! pass over the shadow PT pages and a sort by BFN; the following ones (a
//! dying domain revokes every leaf, one notice each) are binary searches.

use super::gma::Gma;
use super::ppgtt::{EntryRef, ShadowPpgtt};
use super::ppgtt_format::{self as fmt, Level, ENTRIES};
use super::report::RevokedLeaf;
use super::traits::ShadowMemory;
use pviommu_abi::{Bfn, Gfn};

impl ShadowPpgtt {
    /// Make every leaf holding `bfn` non-present and report them. The BFN is
    /// not unmapped: the hypervisor already did, and the caller's
    /// acknowledgement releases it. A later guest change of such an entry
    /// maps the new frame as usual. Returns nothing if no leaf holds `bfn`.
    pub fn revoke<S: ShadowMemory + ?Sized>(
        &mut self,
        memory: &mut S,
        bfn: Bfn,
    ) -> Vec<RevokedLeaf> {
        let index = match self.leaf_index.take() {
            Some(ix) => ix,
            None => self.index_leaves(memory),
        };
        let start = index.partition_point(|(b, _)| *b < bfn.0);
        let mut out = Vec::new();
        for &(_, r) in index[start..].iter().take_while(|(b, _)| *b == bfn.0) {
            let info = &self.slots[r.slot as usize];
            let idx = r.idx as usize;
            // Entries revoked before (the same BFN reported twice) or
            // changed since are left alone: only a present leaf that still
            // holds this BFN is cleared.
            let Some(v) = memory.read_entry(info.page, idx) else {
                continue;
            };
            if !info.live || v & fmt::PRESENT == 0 || (v & fmt::ADDR_MASK) >> 12 != bfn.0 {
                continue;
            }
            let page = info.page;
            // A leaf of a 2 MiB shadow entry: the GPU reaches it through
            // that entry, not this table, until the entry is split.
            self.split_extent(memory, r.slot);
            memory.write_entry(page, idx, 0);
            self.mapped_leaves -= 1;
            let info = &self.slots[r.slot as usize];
            let guest = self.guest[r.slot as usize][idx];
            out.push(RevokedLeaf {
                gma: Gma(info.gma + idx as u64 * Level::Pt.entry_span()),
                domid: self.domid,
                gfn: Gfn((guest & fmt::ADDR_MASK) >> 12),
                bfn,
            });
        }
        self.leaf_index = Some(index);
        out
    }

    /// Split the 2 MiB shadow entry of extent PT `slot`, if it has one:
    /// point its parent entry at the table, whose 512 leaves are kept
    /// present for this (`SlotInfo::extent`), as a page-by-page shadow of
    /// the guest's page would have it. Its leaves are unmapped one by one
    /// from then on.
    fn split_extent<S: ShadowMemory + ?Sized>(&mut self, memory: &mut S, slot: u32) {
        let info = &mut self.slots[slot as usize];
        let (Some(_), Some(p)) = (info.extent.take(), info.parent) else {
            return;
        };
        let page = info.page;
        let (ps, pidx) = (p.slot as usize, p.idx as usize);
        let value = fmt::table_entry(self.guest[ps][pidx], page.0);
        memory.write_entry(self.slots[ps].page, pidx, value);
    }

    /// Every present leaf as (GMA of its 4 KiB page, BFN), in GMA order.
    pub fn leaves<S: ShadowMemory + ?Sized>(&self, memory: &S) -> Vec<(Gma, Bfn)> {
        let mut out = Vec::with_capacity(self.mapped_leaves as usize);
        for info in self.slots.iter().filter(|s| s.live && s.level == Level::Pt) {
            for idx in 0..ENTRIES {
                let v = memory.read_entry(info.page, idx).unwrap_or(0);
                if v & fmt::PRESENT != 0 {
                    out.push((
                        Gma(info.gma + idx as u64 * Level::Pt.entry_span()),
                        Bfn((v & fmt::ADDR_MASK) >> 12),
                    ));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// One pass over the live PT pages; sorted by BFN (a BFN shared by
    /// several leaves, as the client's cache allows, appears once per leaf).
    fn index_leaves<S: ShadowMemory + ?Sized>(&self, memory: &S) -> Vec<(u64, EntryRef)> {
        let mut index = Vec::with_capacity(self.mapped_leaves as usize);
        for (slot, info) in self.slots.iter().enumerate() {
            if !info.live || info.level != Level::Pt {
                continue;
            }
            for idx in 0..ENTRIES {
                let v = memory.read_entry(info.page, idx).unwrap_or(0);
                if v & fmt::PRESENT != 0 {
                    let r = EntryRef {
                        slot: slot as u32,
                        idx: idx as u16,
                    };
                    index.push(((v & fmt::ADDR_MASK) >> 12, r));
                }
            }
        }
        index.sort_unstable_by_key(|(b, _)| *b);
        index
    }
}
