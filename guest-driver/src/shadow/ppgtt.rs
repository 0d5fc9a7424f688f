//! Shadow of a guest Gen8+ 4-level PPGTT: public face.
//!
//! The guest tables map GMA -> guest frame; the shadow tables, in the same
//! format, map GMA -> bus frame obtained from a [`FrameMapper`]. A guest 2 MiB
//! page is shadowed by one 2 MiB entry over one extent of 512 BFNs where the
//! mapper maps it as one ([`FrameMapper::map_extents`]), its 512 leaves also
//! kept in a shadow-only PT for the split a revocation makes; otherwise, and
//! after such a split, as 4 KiB leaves: each of its frames mapped on its own
//! (the BFNs need not be contiguous) under that PT, with the PAT bit moved
//! from bit 12 to bit 7. A 1 GiB page is split into 2 MiB ones under a
//! shadow-only PD.
//!
//! Every guest table page is copied into a snapshot when first walked;
//! [`ShadowPpgtt::sync`] re-reads only the pages it is told about and acts on
//! the entries that differ. A guest table page may back only one table: when
//! it is referenced more than once (shared table, loop, self-reference, use
//! at two levels) the reference with the lowest GMA, then the higher level,
//! owns it and the others stay non-present and are reported; when the owner
//! goes away the next reference takes over, so sync and a fresh build agree.
//!
//! The caller must keep the GPU off this shadow (or invalidate its TLB)
//! while build/sync/teardown run: BFNs of removed leaves are unmapped before
//! the call returns.

use super::config::ShadowConfig;
use super::error::ShadowError;
use super::frame_hash::FrameMap;
use super::gma::Gma;
use super::ppgtt_engine::{Env, NoReader};
use super::ppgtt_format::{Level, ENTRIES};
use super::report::{Anomaly, BuildReport, SyncReport};
use super::table_pages::{AlignedPage, TablePages};
use super::traits::{FrameMapper, GuestTableReader, ShadowMemory};
use pviommu_abi::{Bfn, DomId, Gfn};

/// `sync` walks `owner_index` instead of probing `owners` once its dirty
/// list has at least one page per this many owned tables: the walk then
/// costs at most this many index steps per dirty page.
const OWNER_INDEX_MIN_SHARE: usize = 8;

/// "No child table" marker in a directory slot's child array.
pub(super) const NO_CHILD: u32 = u32::MAX;

/// One entry of one table slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EntryRef {
    pub(super) slot: u32,
    pub(super) idx: u16,
}

/// Book-keeping of one shadowed table.
#[derive(Clone, Debug)]
pub(super) struct SlotInfo {
    pub(super) level: Level,
    /// Guest table page, None for a shadow-only table splitting a large page.
    pub(super) gfn: Option<Gfn>,
    /// Shadow table page.
    pub(super) page: Bfn,
    /// First GMA covered.
    pub(super) gma: u64,
    /// The entry pointing here (None for the root).
    pub(super) parent: Option<EntryRef>,
    /// Incarnation counter, bumped when the slot is freed.
    pub(super) gen: u32,
    pub(super) live: bool,
    pub(super) dying: bool,
    /// Its entries have been acted on (false while queued for population).
    pub(super) populated: bool,
    /// A shadow-only PT of a guest 2 MiB page mapped as one extent: its
    /// first BFN (a multiple of 512). While set, the parent's shadow entry
    /// is a 2 MiB page at that BFN and all 512 leaves of this table are
    /// present, leaf i at BFN + i (kept for the split: a revocation points
    /// the parent back at this table, which needs no allocation, and clears
    /// this). See `ShadowPpgtt::settle_extent`.
    pub(super) extent: Option<Bfn>,
}

/// A leaf waiting in the current map batch.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingMap {
    pub(super) slot: u32,
    pub(super) gen: u32,
    pub(super) idx: u16,
    pub(super) entry: u64,
    /// The shadow leaf may still hold the BFN of the entry this one
    /// replaces: `release_replaced` releases it before the batch settles.
    pub(super) replace: bool,
}

/// A guest 2 MiB page waiting in the current extent batch: its
/// shadow-only PT's slot and that slot's generation when queued.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingExtent {
    pub(super) slot: u32,
    pub(super) gen: u32,
}

/// Per-call counters and findings.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) report: SyncReport,
}

/// A shadow of one guest PPGTT.
pub struct ShadowPpgtt {
    pub(super) domid: DomId,
    pub(super) config: ShadowConfig,
    pub(super) guest_root: Gfn,
    pub(super) root: Option<u32>,
    pub(super) slots: Vec<SlotInfo>,
    /// Guest view (snapshot) of each slot's table. The shadow entries
    /// themselves are only kept in [`ShadowMemory`].
    pub(super) guest: TablePages,
    /// Child slot per entry, for directory slots.
    pub(super) children: Vec<Option<Box<[u32; ENTRIES]>>>,
    pub(super) free_slots: Vec<u32>,
    pub(super) live_slots: usize,
    /// Owning slot of each shadowed guest table page. Change it through
    /// [`set_owner`](Self::set_owner), which marks `owner_index` stale.
    pub(super) owners: FrameMap<Gfn, u32>,
    /// (guest table page, owning slot) sorted by page: a sequential copy of
    /// `owners` for `sync`'s look-ups (see `sync`). Only a hint: rebuilt by
    /// a long sync when `owner_index_stale`, and every hit is checked
    /// against the slot, with `owners` the fallback.
    pub(super) owner_index: Vec<(Gfn, u32)>,
    /// A table gained an owner since `owner_index` was built.
    pub(super) owner_index_stale: bool,
    pub(super) waiting: FrameMap<Gfn, Vec<EntryRef>>,
    pub(super) mapped_leaves: u64,
    /// (BFN, leaf) of every present leaf sorted by BFN, built on the first
    /// revocation after a change (see `ppgtt_revoke.rs`) and dropped by
    /// every build/sync, so the map/unmap paths pay nothing for it.
    pub(super) leaf_index: Option<Vec<(u64, EntryRef)>>,
    // Scratch, reused across calls.
    pub(super) work: Vec<(u32, u32)>,
    pub(super) adopt: Vec<Gfn>,
    pub(super) maps: Vec<PendingMap>,
    /// Some leaf in `maps` was queued by `apply_pt_changes` (a page diff's
    /// change, its leaf not read): `flush_maps` prefetches what settling
    /// reads and releases replaced leaves.
    pub(super) maps_scattered: bool,
    pub(super) map_gfns: Vec<Gfn>,
    pub(super) map_writable: Vec<bool>,
    pub(super) unmaps: Vec<Bfn>,
    /// First BFNs of extents to unmap whole (`FrameMapper::unmap_extents`),
    /// flushed with `unmaps`.
    pub(super) extent_unmaps: Vec<Bfn>,
    /// Guest 2 MiB pages to map as extents (`FrameMapper::map_extents`),
    /// with their frames and access, in step.
    pub(super) extent_maps: Vec<PendingExtent>,
    pub(super) extent_gfns: Vec<Gfn>,
    pub(super) extent_writable: Vec<bool>,
    /// Scratch of `release_replaced`: BFNs of replaced leaves.
    pub(super) released: Vec<Bfn>,
    pub(super) subtree: Vec<u32>,
    pub(super) changes: Vec<(u16, u64, u64)>,
    /// Changes of the PT whose application `sync` holds back one page.
    pub(super) held_changes: Vec<(u16, u64, u64)>,
    /// Shadow leaves of a PT's changed entries, read ahead of the unmaps.
    pub(super) shadow_buf: Vec<u64>,
    /// Where `sync` re-reads a dirty page (page-aligned, see
    /// [`AlignedPage::boxed`]).
    pub(super) read_buf: Box<AlignedPage>,
}

impl ShadowPpgtt {
    /// Build the shadow of the PPGTT whose PML4 is guest frame
    /// `guest_root_gfn` of `domid`, with the default [`ShadowConfig`].
    pub fn build<R, M, S>(
        reader: &R,
        mapper: &mut M,
        memory: &mut S,
        domid: DomId,
        guest_root_gfn: Gfn,
    ) -> (ShadowPpgtt, BuildReport)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        Self::build_with(
            ShadowConfig::default(),
            reader,
            mapper,
            memory,
            domid,
            guest_root_gfn,
        )
    }

    /// [`build`](Self::build) with explicit tunables.
    pub fn build_with<R, M, S>(
        config: ShadowConfig,
        reader: &R,
        mapper: &mut M,
        memory: &mut S,
        domid: DomId,
        guest_root_gfn: Gfn,
    ) -> (ShadowPpgtt, BuildReport)
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let config = ShadowConfig {
            batch: config.batch.max(1),
            ..config
        };
        let mut t = ShadowPpgtt {
            domid,
            config,
            guest_root: guest_root_gfn,
            root: None,
            slots: Vec::new(),
            guest: TablePages::default(),
            children: Vec::new(),
            free_slots: Vec::new(),
            live_slots: 0,
            owners: FrameMap::default(),
            owner_index: Vec::new(),
            owner_index_stale: true,
            waiting: FrameMap::default(),
            mapped_leaves: 0,
            leaf_index: None,
            work: Vec::new(),
            adopt: Vec::new(),
            maps: Vec::with_capacity(config.batch),
            maps_scattered: false,
            map_gfns: Vec::with_capacity(config.batch),
            map_writable: Vec::with_capacity(config.batch),
            extent_unmaps: Vec::new(),
            extent_maps: Vec::new(),
            extent_gfns: Vec::new(),
            extent_writable: Vec::new(),
            unmaps: Vec::with_capacity(config.batch),
            released: Vec::new(),
            subtree: Vec::new(),
            changes: Vec::new(),
            held_changes: Vec::new(),
            shadow_buf: Vec::new(),
            read_buf: AlignedPage::boxed(),
        };
        let mut env = Env {
            reader,
            mapper,
            mem: memory,
            out: Outcome::default(),
        };
        if let Some(root) = t.new_slot(&mut env, Level::Pml4, Some(guest_root_gfn), 0, None) {
            t.root = Some(root);
            t.set_owner(guest_root_gfn, root);
            t.read_guest(env.reader, &mut env.out, root, guest_root_gfn);
            t.work.push((root, t.slots[root as usize].gen));
        }
        t.finish(&mut env);
        let r = env.out.report;
        let report = BuildReport {
            leaves_mapped: t.mapped_leaves,
            refused: r.refused,
            refused_total: r.refused_total,
            anomalies: r.anomalies,
            anomalies_total: r.anomalies_total,
            tables: t.live_slots,
            map_calls: r.map_calls,
            extents_mapped: r.extents_mapped,
        };
        (t, report)
    }

    /// Bring the shadow up to date after the guest changed the table pages
    /// `changed_table_gfns` (duplicates allowed; frames that are not shadowed
    /// tables are ignored and listed). Only those pages are re-read; only
    /// entries that differ from the snapshot are acted on.
    pub fn sync<R, M, S>(
        &mut self,
        reader: &R,
        mapper: &mut M,
        memory: &mut S,
        changed_table_gfns: &[Gfn],
    ) -> SyncReport
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut env = Env {
            reader,
            mapper,
            mem: memory,
            out: Outcome::default(),
        };
        let mut gfns = changed_table_gfns.to_vec();
        gfns.sort_unstable();
        gfns.dedup();
        // Owners are found by walking the sorted dirty list alongside the
        // sorted `owner_index`, when the list is long enough to pay for the
        // walk (and for a rebuild after the tables changed). A hash probe
        // per dirty page was 39 % of sync's own time in the 1 % spread sync
        // (2048 dirty PTs): random reads into a map that the page diffs keep
        // pushing out of the cache. The walk reads the index in order. Short
        // lists keep the probe. Either way the result is `owners[g]`.
        let use_index = gfns.len() * OWNER_INDEX_MIN_SHARE >= self.owners.len();
        if use_index && self.owner_index_stale {
            self.rebuild_owner_index();
        }
        // Taken out for the loop (diffs may attach tables, which only marks
        // it stale); empty when not used, so every look-up probes `owners`.
        let index = if use_index {
            std::mem::take(&mut self.owner_index)
        } else {
            Vec::new()
        };
        let mut next = 0;
        // A PT's changes are applied one dirty page late (see `diff_slot`).
        let mut held = None;
        for g in gfns {
            while next < index.len() && index[next].0 < g {
                next += 1;
            }
            let hit = match index.get(next) {
                Some(&(ig, s)) if ig == g && self.owns(s, g) => Some(s),
                _ => None,
            };
            match hit.or_else(|| self.owners.get(&g).copied()) {
                Some(slot) => held = self.diff_slot(&mut env, slot, g, held),
                None => env.out.report.ignored.push(g),
            }
        }
        if use_index {
            self.owner_index = index;
        }
        self.apply_held(&mut env, held);
        self.finish(&mut env);
        env.out.report
    }

    /// Entry-granular sync for a mediator that traps guest writes to its
    /// (write-protected) table pages: apply `writes` = (table page, entry
    /// index, new value) in order. Costs O(writes) instead of a page re-read
    /// each; writes to pages that are not shadowed tables, or with an index
    /// of 512 or more, are ignored (listed in `ignored`). The reader is used
    /// only for newly reached tables.
    pub fn sync_writes<R, M, S>(
        &mut self,
        reader: &R,
        mapper: &mut M,
        memory: &mut S,
        writes: &[(Gfn, usize, u64)],
    ) -> SyncReport
    where
        R: GuestTableReader + ?Sized,
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut env = Env {
            reader,
            mapper,
            mem: memory,
            out: Outcome::default(),
        };
        let mut last: Option<(Gfn, u32)> = None;
        for &(g, idx, value) in writes {
            // Trapped writes come in runs to one page: skip the map lookup
            // while the last owner is still the live table of that frame.
            let slot = match last {
                Some((lg, ls))
                    if lg == g
                        && self.slots[ls as usize].live
                        && self.slots[ls as usize].gfn == Some(g) =>
                {
                    Some(ls)
                }
                _ => self.owners.get(&g).copied(),
            };
            match slot {
                Some(slot) if idx < ENTRIES => {
                    last = Some((g, slot));
                    self.apply_write(&mut env, slot, idx, value);
                }
                _ => env.out.report.ignored.push(g),
            }
        }
        self.finish(&mut env);
        env.out.report
    }

    /// Unmap every leaf and free every shadow table page. Returns the number
    /// of leaves unmapped.
    pub fn teardown<M, S>(mut self, mapper: &mut M, memory: &mut S) -> u64
    where
        M: FrameMapper + ?Sized,
        S: ShadowMemory + ?Sized,
    {
        let mut env = Env {
            reader: &NoReader,
            mapper,
            mem: memory,
            out: Outcome::default(),
        };
        if let Some(root) = self.root.take() {
            self.teardown_subtree(&mut env, root);
        }
        self.flush_unmaps(&mut env);
        env.out.report.leaves_unmapped
    }

    /// The shadow PML4 page, to load into the GPU context (None if even the
    /// root page could not be allocated).
    pub fn shadow_root(&self) -> Option<Bfn> {
        self.root.map(|r| self.slots[r as usize].page)
    }

    /// The guest PML4 frame this shadows.
    pub fn guest_root(&self) -> Gfn {
        self.guest_root
    }

    /// The guest domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Leaves currently present in the shadow.
    pub fn mapped_leaves(&self) -> u64 {
        self.mapped_leaves
    }

    /// Shadow table pages currently in use.
    pub fn table_count(&self) -> usize {
        self.live_slots
    }

    /// Guest table pages currently shadowed (their changes must be passed to
    /// [`sync`](Self::sync)), in no particular order.
    pub fn guest_table_gfns(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.owners.keys().copied()
    }

    /// Make `slot` the owner of guest table page `g`.
    pub(super) fn set_owner(&mut self, g: Gfn, slot: u32) {
        self.owners.insert(g, slot);
        self.owner_index_stale = true;
    }

    /// True if `slot` is the live table of guest page `g`, i.e. its owner:
    /// a table page has at most one live slot, and `owners` names it until
    /// the slot is freed. So an `owner_index` entry that passes this check
    /// is current, even if the index is stale.
    pub(super) fn owns(&self, slot: u32, g: Gfn) -> bool {
        let info = &self.slots[slot as usize];
        let owns = info.live && info.gfn == Some(g);
        debug_assert!(!owns || self.owners.get(&g) == Some(&slot));
        owns
    }

    /// Rebuild `owner_index` from `owners`.
    fn rebuild_owner_index(&mut self) {
        self.owner_index.clear();
        self.owner_index
            .extend(self.owners.iter().map(|(&g, &s)| (g, s)));
        self.owner_index.sort_unstable_by_key(|&(g, _)| g);
        self.owner_index_stale = false;
    }

    /// Record an anomaly.
    pub(super) fn note(out: &mut Outcome, a: Anomaly) {
        out.report.note_anomaly(a);
    }

    /// Read guest table `gfn` into slot `slot`'s snapshot (zeroes on error).
    pub(super) fn read_guest<R: GuestTableReader + ?Sized>(
        &mut self,
        reader: &R,
        out: &mut Outcome,
        slot: u32,
        gfn: Gfn,
    ) {
        out.report.pages_read += 1;
        let buf = &mut self.guest[slot as usize];
        if let Err(e) = reader.read_page(gfn, buf) {
            *buf = [0; ENTRIES];
            let errno = match e {
                ShadowError::GuestRead { errno, .. } => errno,
                ShadowError::OutOfShadowMemory => 12,
            };
            Self::note(out, Anomaly::ReadFailed { table: gfn, errno });
        }
    }

    /// GMA where entry `r` starts.
    pub(super) fn entry_gma(&self, r: EntryRef) -> Gma {
        let s = &self.slots[r.slot as usize];
        Gma(s.gma + u64::from(r.idx) * s.level.entry_span())
    }
}
