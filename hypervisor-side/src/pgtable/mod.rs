//! IOMMU page-table formats, kept apart from the code that uses them (as
//! Linux's io-pgtable keeps formats apart from IOMMU drivers).
//!
//! A [`PageTableFormat`] says how entries are encoded; [`IoPageTable`] is the
//! one walker that writes them: 4 levels of 512 64-bit entries, 4 KiB leaves,
//! 2 MiB superpages made when a full, contiguous, aligned leaf table appears
//! or mapped whole ([`IoPageTable::map_superpage`]), split again on a
//! partial unmap, and empty tables freed on unmap. Tables live in frames
//! provided by a [`TableMemory`].

pub mod lpae;
pub mod sync;
pub mod vtd;

use crate::{Bfn, Errno, MemAttr, Mfn, Permissions};
use core::ops::Range;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Emptied tables a context made with [`TableOptions::recycle`] keeps for
/// reuse: a batch of 1024 maps at unaligned BFNs spans 3 leaf tables and
/// their parents, so a mediator's map-unmap cycles allocate nothing once
/// warm. At most 32 KiB held per context without mappings, given back
/// when the context goes.
pub const RECYCLED_TABLES: usize = 8;
/// Leaf tables folded into superpages that one context keeps whole until
/// its next flush (see [`IoPageTable::release_freed`]); past that many
/// between two flushes, a full leaf table simply stays one. (Not in the
/// simulator's model of Xen's own tables, which folds every one, as Xen
/// does.)
pub const FOLDED_BEFORE_FLUSH: usize = 8;
/// Levels of the walk; level 1 holds 4 KiB leaves, level 2 superpages.
pub const LEVELS: u32 = 4;
/// The level at which 2 MiB superpages live.
pub const SUPERPAGE_LEVEL: u32 = 2;
/// The level at which 1 GiB superpages live (only in a domain's own
/// tables as Xen keeps them: [`TableOptions::gigapages`]).
pub const GIGAPAGE_LEVEL: u32 = 3;

/// A decoded entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    /// Not present.
    Empty,
    /// Points to the next-level table.
    Table(Mfn),
    /// Maps a page (level 1) or superpage (level 2) starting at `mfn`.
    Leaf {
        /// First machine frame.
        mfn: Mfn,
        /// Access.
        perms: Permissions,
        /// Memory attribute.
        attr: MemAttr,
    },
}

/// An entry encoding.
pub trait PageTableFormat {
    /// Name, for reports.
    const NAME: &'static str;
    /// The bits of an entry that hold a frame's address (zeroed before an
    /// entry is shown outside the hypervisor).
    const ADDRESS_MASK: u64;
    /// The ABI's [`entry_format`](pviommu_abi::entry_format) code of these
    /// entries (`PVIOMMU_CMD_entry`).
    const ENTRY_FORMAT: u16;
    /// Encode a pointer to a next-level table.
    fn table_entry(table: Mfn) -> u64;
    /// Encode a leaf at `level` (1: 4 KiB page, 2: 2 MiB superpage).
    fn leaf_entry(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32) -> u64;
    /// Decode an entry found at `level`.
    fn decode(raw: u64, level: u32) -> Entry;
}

/// Frames holding page tables, and the software bookkeeping the hardware
/// format has no room for (a count of present entries per table).
///
/// # Visibility to the IOMMU
/// A store by [`write_entry`](TableMemory::write_entry) may stay in the
/// CPU cache, out of sight of an IOMMU that does not snoop it: the backend
/// decides when to write it back (per entry, or per cache line and batch
/// with a [`sync::DirtyLines`]). What it must keep: every such store is in
/// memory before any IOTLB or context-cache invalidation it issues for the
/// engine's tables (`hw_flush`), before a context is created or a device
/// pointed at them, and before the hypercall that stored it returns. The
/// present count ([`set_present_count`](TableMemory::set_present_count))
/// is the walker's own bookkeeping, read only by the CPU: a backend that
/// keeps it in bits the IOMMU ignores (Xen's, in entry 0) need not write
/// it back, only keep the entry bits around it as they were. The
/// walker relies on nothing more: until the flush that follows it, a
/// device may see a store or not, and both states map only pages still
/// referenced (a page and a table frame are released only after that
/// flush).
pub trait TableMemory {
    /// A zeroed frame for a new table.
    fn alloc_table(&mut self) -> Result<Mfn, Errno>;
    /// Give back a table frame.
    fn free_table(&mut self, table: Mfn);
    /// `table`, an emptied table frame kept by the walker since the IOTLB
    /// flush that followed its unlinking, is made a table again (without
    /// [`alloc_table`](TableMemory::alloc_table)), found
    /// [clear](TableMemory::table_is_clear). A host that tracks unlinked
    /// tables checks here that the flush really came first.
    fn reuse_table(&mut self, _table: Mfn) {}
    /// Every entry of `table` reads 0, its present count too (the check a
    /// recycled frame passes before it is a table again).
    fn table_is_clear(&self, table: Mfn) -> bool {
        self.present_count(table) == 0 && (0..ENTRIES).all(|i| self.read_entry(table, i) == 0)
    }
    /// Put every store into `table` so far where the IOMMU reads it (a
    /// non-coherent IOMMU reads memory, not the CPU's caches), ordered
    /// before any store after: what a table that maps live pages needs
    /// before an entry points at it (a split, as Xen's own code does with
    /// `iommu_sync_cache` before it stores the parent entry). Nothing to do
    /// where the IOMMU snoops the caches, or every store is written
    /// through.
    fn write_back_table(&mut self, _table: Mfn) {}
    /// Read entry `index` of `table`.
    fn read_entry(&self, table: Mfn, index: usize) -> u64;
    /// Write entry `index` of `table` (the one place a PTE is stored).
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64);
    /// Present entries in `table`.
    fn present_count(&self, table: Mfn) -> u16;
    /// Set the present-entry count of `table`.
    fn set_present_count(&mut self, table: Mfn, count: u16);
    /// [`read_entry`](TableMemory::read_entry) and
    /// [`present_count`](TableMemory::present_count) of `table` together
    /// (what every map and unmap asks of its leaf table first), with one
    /// mapping of the frame where the backend has to map it.
    #[inline(always)]
    fn read_entry_and_count(&self, table: Mfn, index: usize) -> (u64, u16) {
        (self.read_entry(table, index), self.present_count(table))
    }
    /// [`write_entry`](TableMemory::write_entry), then
    /// [`set_present_count`](TableMemory::set_present_count) to `count`:
    /// the store of every map and unmap with its bookkeeping, which a
    /// backend that has to map the frame first may do with one mapping
    /// (Xen's: three mapping look-ups and two bounds checks fewer a store).
    #[inline(always)]
    fn write_entry_counted(&mut self, table: Mfn, index: usize, raw: u64, count: u16) {
        self.write_entry(table, index, raw);
        self.set_present_count(table, count);
    }
    /// Clear the entries of `table` at `indices` that `is_present` says
    /// are, in order, while the table keeps one: each is stored 0 with
    /// [`write_entry`](TableMemory::write_entry), up to the one that would
    /// leave the table empty, where it stops (that one is left as it was,
    /// for the caller). The present count is set once, after the stores,
    /// if one was made. How many of `indices` were done (cleared, or not
    /// present). What a flush's clearing of a leaf table's run does
    /// ([`IoPageTable::unmap_in_cached_leaf`]); a backend that looks a
    /// frame up for each entry may do it with one look-up for the run, as
    /// long as it stores and records exactly what the stores one by one do.
    /// `is_present` must answer by the entry alone: a backend may ask it
    /// of one entry twice (the simulator's, where its one look-up stops).
    #[inline(always)]
    fn clear_entries_keeping_one(
        &mut self,
        table: Mfn,
        indices: Range<usize>,
        is_present: impl Fn(u64) -> bool,
    ) -> usize {
        clear_entries_one_by_one(self, table, indices, is_present)
    }
}

/// [`TableMemory::clear_entries_keeping_one`] an entry at a time: its
/// default, and what a backend's own form falls back on.
#[inline(always)]
pub fn clear_entries_one_by_one<M: TableMemory + ?Sized>(
    mem: &mut M,
    table: Mfn,
    indices: Range<usize>,
    is_present: impl Fn(u64) -> bool,
) -> usize {
    let before = mem.present_count(table);
    let mut present = before;
    let mut done = 0;
    // The count is stored once, after the run's entries: nothing reads
    // it in between (the table is the caller's, under its lock, and an
    // IOMMU ignores the count's bits), and where it lives in entries
    // (Xen's), a store of each entry kept the count's bits as they were.
    // Stored with each entry, it cost each page of the run a store (on
    // Xen, a read and a store of the entry holding it).
    for i in indices {
        let entry = mem.read_entry(table, i);
        if is_present(entry) {
            if present <= 1 {
                // The table's last entry: the caller's (`unmap` frees the
                // table too).
                break;
            }
            present -= 1;
            mem.write_entry(table, i, 0);
        }
        done += 1;
    }
    if present != before {
        mem.set_present_count(table, present);
    }
    done
}

/// Index of `bfn` in a table at `level`.
pub const fn index(bfn: Bfn, level: u32) -> usize {
    ((bfn.0 >> (9 * (level - 1))) & 0x1ff) as usize
}

/// How a context's tables are shaped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TableOptions {
    /// Levels the IOMMU walks (2..=4): VT-d with a 39-bit AGAW walks 3,
    /// starting at the table entry 0 of the 4-level root points to. The
    /// tables are always built 4 levels deep (what Xen's context code
    /// expects of a root it is given); the top `4 - levels` tables, on the
    /// path of entry 0, are made up front and never freed, so the table the
    /// IOMMU starts at never moves. BFNs beyond `levels` are refused.
    pub levels: u32,
    /// Fold a full, contiguous, aligned leaf table into a 2 MiB superpage
    /// (only where the IOMMU has them: VT-d's SLLPS, which patch 0005
    /// requires of every unit before it offers contexts; not on an SMMU,
    /// see `ContextTables::new`). The folded leaf table is kept
    /// whole until the context's next flush, since the IOMMU may still
    /// walk it through its paging-structure caches: a split before then
    /// links it back where it was, and after the flush it is zeroed and
    /// kept as the spare its superpage's split will take.
    pub superpages: bool,
    /// Keep up to [`RECYCLED_TABLES`] emptied tables for reuse once
    /// flushed (otherwise every one goes back to the host, as Xen's own
    /// VT-d code frees them). A mediator maps and unmaps the same BFNs over
    /// and over; without it each cycle frees the leaf tables it emptied and
    /// allocates, zeroes and writes back new ones for the next.
    pub recycle: bool,
    /// Split a superpage into its own folded table (before the flush) or
    /// a spare (after it: each folded table, once flushed, is kept as the
    /// spare its superpage's split takes), so that a split never needs
    /// memory: the engine's own contexts. Without, every split allocates a
    /// new table, and can fail for want of memory, and a folded table is
    /// zeroed and freed after the flush: as Xen 4.17's own VT-d and AMD-Vi
    /// code does (`iommu_queue_free_pgtable`), which the simulator's model
    /// of a domain's own tables follows ([`TableOptions::xen_own`]).
    pub split_from_spares: bool,
    /// Fold a level-2 table whose 512 entries are 2 MiB superpages of one
    /// contiguous, 1 GiB-aligned machine run, with one access and
    /// attribute, into a 1 GiB superpage (a level-3 leaf), and split it
    /// again on a partial unmap into a new level-2 table of 512 such
    /// superpages (an allocation that can fail, then the 2 MiB split
    /// below it another): as Xen 4.17's own code does on AMD-Vi, and on
    /// VT-d where every unit has 1 GiB pages (`cap_sps_1gb`, which QEMU's
    /// intel-iommu offers). The folded level-2 table is kept whole until
    /// the flush, then zeroed and freed, as a folded leaf table is. Only
    /// with `superpages`, 4 levels and without `split_from_spares`
    /// ([`IoPageTable::with_options`] refuses the rest), and only in the
    /// simulator's builds (feature `sim`, and tests): the engine's own
    /// contexts fold no further than 2 MiB, and the Xen object carries
    /// none of this code (its stack has no room to spare). The model folds
    /// wherever Xen could: more often than a given host (AMD-Vi folds only
    /// below its tables' top level, VT-d only with 1 GiB pages on every
    /// unit, Arm's p2m not at all), never less.
    pub gigapages: bool,
}

impl Default for TableOptions {
    fn default() -> Self {
        TableOptions {
            levels: LEVELS,
            superpages: true,
            recycle: false,
            split_from_spares: true,
            gigapages: false,
        }
    }
}

impl TableOptions {
    /// The options of a context of the engine's own (`levels` deep):
    /// superpages, emptied tables kept for reuse.
    /// Benches and examples that stand in for such a context take them
    /// from here, so they cannot drift from what the engine builds.
    pub fn engine_context(levels: u32) -> Self {
        TableOptions {
            levels,
            superpages: true,
            recycle: true,
            split_from_spares: true,
            gigapages: false,
        }
    }

    /// The options of a domain's own tables as Xen 4.17's VT-d and AMD-Vi
    /// code keeps them (the simulator's context 0): a full, contiguous,
    /// aligned leaf table folded into a superpage, and a level-2 table of
    /// such superpages on into a 1 GiB one, each split a new table (an
    /// allocation that can fail), every emptied or folded table freed
    /// after the flush.
    pub fn xen_own() -> Self {
        TableOptions {
            levels: LEVELS,
            superpages: true,
            recycle: false,
            split_from_spares: false,
            gigapages: true,
        }
    }
}

/// One translation context: a root table and its format.
///
/// Unmapping never needs memory (with [`TableOptions::split_from_spares`],
/// as the engine's own contexts have it): every superpage made by folding
/// a full leaf table keeps that table's frame on a spare list, one mapped
/// whole takes a spare frame first, and splitting a superpage takes its
/// frame back from there (see `spares_owed`). (Xen's own VT-d
/// code can fail an unmap with `-ENOMEM` at exactly this point, as the
/// simulator's model of it, [`TableOptions::xen_own`], does; the engine
/// copes with that too, but its own tables never do it.)
///
/// A table emptied by an unmap is not freed at once: the IOMMU may still
/// hold it in its paging-structure caches until the IOTLB is invalidated,
/// and a freed frame reused for something else would then be walked as a
/// table. It waits on a list until [`IoPageTable::release_freed`], which
/// the owner calls after the flush (as Linux's `iommu_iotlb_gather` keeps
/// its freelist and Xen's VT-d code queues `iommu_queue_free_pgtable`).
pub struct IoPageTable<F: PageTableFormat> {
    root: Mfn,
    options: TableOptions,
    /// Spare table frames for splits; entry 0 of each holds the next
    /// spare's frame + 1 (0 ends the list). See [`IoPageTable::spares_owed`].
    spares: Option<Mfn>,
    /// Frames on `spares`.
    spares_len: usize,
    /// Level-2 leaves (superpages) in the tree, folded or mapped whole.
    superpages: usize,
    /// Emptied tables waiting for the flush; chained the same way.
    freed: Option<Mfn>,
    /// The last frame on `freed` (its link ends the list), so that a flush
    /// moves the whole list on to `flushed` in O(1).
    freed_last: Option<Mfn>,
    /// Emptied tables whose flush came: no IOMMU walks them any more, and
    /// they go a budget at a time ([`IoPageTable::free_flushed`]), not all
    /// at once at the flush: while flushes fail, `freed` grows to a table
    /// per 512 BFNs of the quota.
    flushed: Option<Mfn>,
    /// Emptied tables whose flush came, kept for reuse: the first
    /// `recycled_len`. Held here, not chained through the frames, so
    /// keeping one stores nothing into table memory after the flush.
    recycled: [Mfn; RECYCLED_TABLES],
    recycled_len: usize,
    /// The leaf table the last map or unmap went through, so a run of
    /// consecutive BFNs skips the walk above it (see [`LastLeaf`]).
    last_leaf: Option<LastLeaf>,
    /// Leaf tables folded into superpages since the last flush, each still
    /// holding the entries its superpage maps: the first `folded_len`.
    folded: [Folded; FOLDED_BEFORE_FLUSH],
    folded_len: usize,
    /// Of those, the ones whose superpage is still in the tree.
    folded_live: usize,
    /// Tables Xen's own tables as modelled (no `split_from_spares`) folded
    /// past the `FOLDED_BEFORE_FLUSH` the array holds: Xen queues every
    /// one it folds (`iommu_queue_free_pgtable`, no limit), so the model
    /// folds every one too. Kept whole until the flush, never taken back
    /// by a split. The simulator's builds only.
    #[cfg(any(test, feature = "sim"))]
    folded_more: alloc::vec::Vec<Mfn>,
    _format: core::marker::PhantomData<F>,
}

/// A leaf table folded into the superpage at entry `pidx` of `parent`, kept
/// whole until the flush.
#[derive(Clone, Copy, Debug)]
struct Folded {
    table: Mfn,
    parent: Mfn,
    pidx: usize,
    /// Its superpage is still in the tree (not unmapped whole since).
    live: bool,
    /// A level-2 table folded into a 1 GiB superpage
    /// ([`TableOptions::gigapages`]): kept whole until the flush like a
    /// leaf table, never taken back by a split, never a spare.
    giga: bool,
}

const NO_FOLD: Folded = Folded {
    table: Mfn(0),
    parent: Mfn(0),
    pidx: 0,
    live: false,
    giga: false,
};

/// A leaf (level-1) table and where it hangs.
///
/// Invariant, kept by every change of a level-2 entry: entry `pidx` of
/// `parent` points at `table`, which covers the BFNs whose bits above the
/// leaf index are `region`. Whatever unlinks a table (an unmap that empties
/// it, a fold into a superpage, a split) drops the cache first, so it never
/// names a frame on the freed or spare lists.
#[derive(Clone, Copy, Debug)]
struct LastLeaf {
    region: u64,
    table: Mfn,
    parent: Mfn,
    pidx: usize,
}

impl<F: PageTableFormat> IoPageTable<F> {
    /// A new, empty context of 4 levels with superpages.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, Errno> {
        Self::with_options(mem, TableOptions::default())
    }

    /// A new, empty context shaped by `options`. `Err(Inval)` for a level
    /// count outside 2..=4; on `Err(NoMem)` nothing stays allocated.
    pub fn with_options(mem: &mut impl TableMemory, options: TableOptions) -> Result<Self, Errno> {
        if !(2..=LEVELS).contains(&options.levels) {
            return Err(Errno::Inval);
        }
        // 1 GiB folds: Xen's own tables as the simulator models them, whose
        // splits allocate; never an engine context's (whose unmaps must
        // not need memory), nor a tree whose pinned path a fold would take.
        let gigapages_allowed = cfg!(any(test, feature = "sim"))
            && options.superpages
            && !options.split_from_spares
            && options.levels == LEVELS;
        if options.gigapages && !gigapages_allowed {
            return Err(Errno::Inval);
        }
        let t = IoPageTable {
            root: mem.alloc_table()?,
            options,
            spares: None,
            spares_len: 0,
            superpages: 0,
            freed: None,
            freed_last: None,
            flushed: None,
            recycled: [Mfn(0); RECYCLED_TABLES],
            recycled_len: 0,
            last_leaf: None,
            folded: [NO_FOLD; FOLDED_BEFORE_FLUSH],
            folded_len: 0,
            folded_live: 0,
            #[cfg(any(test, feature = "sim"))]
            folded_more: alloc::vec::Vec::new(),
            _format: core::marker::PhantomData,
        };
        // The pinned path: entry 0 down to the table the IOMMU starts at.
        let mut table = t.root;
        for _ in options.levels..LEVELS {
            let next = match mem.alloc_table() {
                Ok(n) => n,
                Err(e) => {
                    t.destroy(mem);
                    return Err(e);
                }
            };
            mem.write_entry(table, 0, F::table_entry(next));
            mem.set_present_count(table, 1);
            table = next;
        }
        Ok(t)
    }

    /// The root table frame of the 4-level tree (what a context entry is
    /// given; see [`TableOptions::levels`]).
    pub fn root(&self) -> Mfn {
        self.root
    }

    /// Whether a leaf of `mfn` with `perms` says what was asked: an entry
    /// with neither R nor W would read as empty (counted, but never found
    /// to unmap), and a frame past the format's address bits would map
    /// another frame (its number cut to the bits). The ABI and the host
    /// refuse both before; the format does not rely on that.
    #[inline(always)]
    fn encodable(mfn: Mfn, perms: Permissions) -> bool {
        (perms.read || perms.write) && mfn.0 <= F::ADDRESS_MASK >> 12
    }

    /// The table the IOMMU starts its walk at.
    pub fn walk_root(&self, mem: &impl TableMemory) -> Mfn {
        let mut table = self.root;
        for level in (self.options.levels + 1..=LEVELS).rev() {
            match F::decode(mem.read_entry(table, 0), level) {
                Entry::Table(t) => table = t,
                _ => break,
            }
        }
        table
    }

    /// The shape the tables were made with.
    pub fn options(&self) -> TableOptions {
        self.options
    }

    fn in_range(&self, bfn: Bfn) -> bool {
        bfn.0 >> (9 * self.options.levels) == 0
    }

    /// Map `bfn` -> `mfn`. `Err(Inval)` if already mapped; on any error the
    /// tables are as before (a table allocated on the way stays, empty).
    #[inline(always)]
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        if !self.in_range(bfn) || !Self::encodable(mfn, perms) {
            return Err(Errno::Inval);
        }
        let table = match self.cached_leaf(bfn) {
            Some(c) => c.table,
            None => {
                let mut table = self.root;
                let mut parent = None;
                for level in (2..=LEVELS).rev() {
                    let idx = index(bfn, level);
                    let next = self.table_below(mem, table, idx, level)?;
                    parent = Some((table, idx));
                    table = next;
                }
                if let Some((p, pidx)) = parent {
                    self.last_leaf = Some(LastLeaf {
                        region: bfn.0 >> 9,
                        table,
                        parent: p,
                        pidx,
                    });
                }
                table
            }
        };
        let idx = index(bfn, 1);
        let (entry, count) = mem.read_entry_and_count(table, idx);
        if F::decode(entry, 1) != Entry::Empty {
            return Err(Errno::Inval);
        }
        let count = count + 1;
        mem.write_entry_counted(table, idx, F::leaf_entry(mfn, perms, attr, 1), count);
        // A leaf table that just became full may fold into a superpage,
        // and its level-2 table then on into a 1 GiB one.
        // (The leaf's parent is read from the cache only then, where the
        // walk above left it: held from the start, it was kept on the
        // stack for every map.)
        if count as usize == ENTRIES && self.options.superpages {
            if let Some(LastLeaf {
                parent: pt, pidx, ..
            }) = self.cached_leaf(bfn)
            {
                #[cfg_attr(not(any(test, feature = "sim")), allow(unused_variables))]
                let folded = self.try_promote(mem, pt, pidx, table);
                #[cfg(any(test, feature = "sim"))]
                if folded && self.options.gigapages {
                    self.try_promote_giga(mem, bfn, pt);
                }
            }
        }
        Ok(())
    }

    /// Map the 2 MiB from `bfn` to the frames from `mfn` (both on a 2 MiB
    /// boundary) with one level-2 leaf where that entry is empty: one store
    /// to map an aligned machine run and one to clear it
    /// ([`unmap_superpage`](Self::unmap_superpage)), where a page map
    /// makes 512 (and a fold, then 512 more to zero its table after the
    /// flush). Its split, should one page go, still needs no memory: a
    /// spare frame is taken for it first, as a fold keeps its leaf table.
    ///
    /// `Ok(false)`, nothing changed: not done, map the pages one by one (a
    /// context without superpages, or whose splits allocate; a BFN or
    /// frame off a boundary; a leaf table there). `Err(Inval)`: out of
    /// range, or a superpage there already; `Err(NoMem)`: no frame for a
    /// table or the spare. On `Err` nothing is mapped (a table or spare
    /// taken on the way stays, empty, as [`map`](Self::map) leaves one).
    pub fn map_superpage(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<bool, Errno> {
        if !self.in_range(bfn) || !Self::encodable(mfn, perms) {
            return Err(Errno::Inval);
        }
        let off_boundary = |frame: u64| frame & (ENTRIES as u64 - 1) != 0;
        if !(self.options.superpages && self.options.split_from_spares)
            || off_boundary(bfn.0)
            || off_boundary(mfn.0)
        {
            return Ok(false);
        }
        let mut table = self.root;
        for level in (SUPERPAGE_LEVEL + 1..=LEVELS).rev() {
            table = self.table_below(mem, table, index(bfn, level), level)?;
        }
        let idx = index(bfn, SUPERPAGE_LEVEL);
        let (entry, count) = mem.read_entry_and_count(table, idx);
        match F::decode(entry, SUPERPAGE_LEVEL) {
            Entry::Empty => {}
            // (Never an empty one: an unmap that empties a leaf table
            // unlinks it.)
            Entry::Table(_) => return Ok(false),
            Entry::Leaf { .. } => return Err(Errno::Inval),
        }
        // Its spare before its entry: nothing is mapped before its split
        // is sure. (More than one only after a spare the host would not
        // let the engine write, an engine or host bug: made good here.)
        while self.spares_len <= self.spares_owed() {
            let t = self.new_table(mem)?;
            self.add_spare(mem, t);
        }
        let leaf = F::leaf_entry(mfn, perms, attr, SUPERPAGE_LEVEL);
        mem.write_entry_counted(table, idx, leaf, count + 1);
        self.superpages += 1;
        Ok(true)
    }

    /// The table entry `idx` of `table` (at `level`) points at, made (empty,
    /// linked and counted) where there is none; `Err(Inval)` for a leaf
    /// there. A step of every walk that maps.
    #[inline(always)]
    fn table_below(
        &mut self,
        mem: &mut impl TableMemory,
        table: Mfn,
        idx: usize,
        level: u32,
    ) -> Result<Mfn, Errno> {
        match F::decode(mem.read_entry(table, idx), level) {
            Entry::Table(t) => Ok(t),
            Entry::Empty => {
                let t = self.new_table(mem)?;
                mem.write_entry(table, idx, F::table_entry(t));
                mem.set_present_count(table, mem.present_count(table) + 1);
                Ok(t)
            }
            Entry::Leaf { .. } => Err(Errno::Inval),
        }
    }

    /// A table frame: a recycled one if any (flushed; zero once its list
    /// link in entry 0 is cleared), else a new one.
    ///
    /// A recycled frame is checked clear before it hangs anywhere again
    /// (defence in depth): it was emptied by unmaps as its present count
    /// says, and were that count ever wrong, an entry left in it would map
    /// a page at a BFN nobody asked for, whose reference the engine may
    /// drop. Such a frame goes back to the host instead (it hangs nowhere
    /// since the flush). At most [`RECYCLED_TABLES`] checks.
    fn new_table(&mut self, mem: &mut impl TableMemory) -> Result<Mfn, Errno> {
        while let Some(t) = self.take_recycled() {
            mem.write_entry(t, 0, 0);
            if mem.table_is_clear(t) {
                mem.reuse_table(t);
                return Ok(t);
            }
            Self::zero_and_free(mem, t);
        }
        mem.alloc_table()
    }

    fn take_recycled(&mut self) -> Option<Mfn> {
        let last = self.recycled_len.checked_sub(1)?;
        let t = *self.recycled.get(last)?;
        self.recycled_len = last;
        Some(t)
    }

    /// The cached leaf table of `bfn`'s region, if it is the last one used.
    fn cached_leaf(&self, bfn: Bfn) -> Option<LastLeaf> {
        self.last_leaf.filter(|c| c.region == bfn.0 >> 9)
    }

    /// Fold `leaf_table`, full, into a superpage at entry `pidx` of
    /// `parent` if it maps one aligned, contiguous run with one access
    /// and attribute; whether it did.
    fn try_promote(
        &mut self,
        mem: &mut impl TableMemory,
        parent: Mfn,
        pidx: usize,
        leaf_table: Mfn,
    ) -> bool {
        // No room to keep it until the flush: it stays a leaf table.
        if !self.room_to_fold() {
            return false;
        }
        let (first_mfn, perms, attr) = match F::decode(mem.read_entry(leaf_table, 0), 1) {
            Entry::Leaf { mfn, perms, attr } => (mfn, perms, attr),
            _ => return false,
        };
        if first_mfn.0 % ENTRIES as u64 != 0 {
            return false;
        }
        for i in 1..ENTRIES {
            let want = F::leaf_entry(Mfn(first_mfn.0 + i as u64), perms, attr, 1);
            if mem.read_entry(leaf_table, i) != want {
                return false;
            }
        }
        // The leaf table stops being one.
        self.last_leaf = None;
        mem.write_entry(
            parent,
            pidx,
            F::leaf_entry(first_mfn, perms, attr, SUPERPAGE_LEVEL),
        );
        // Kept whole until the flush: the IOMMU may still walk it.
        self.keep_folded(Folded {
            table: leaf_table,
            parent,
            pidx,
            live: true,
            giga: false,
        });
        self.superpages += 1;
        true
    }

    /// Whether a table folded now can be kept until the flush: a free
    /// slot, or (Xen's own tables as the simulator models them) room
    /// reserved past the slots.
    fn room_to_fold(&mut self) -> bool {
        if self.folded_len < FOLDED_BEFORE_FLUSH {
            return true;
        }
        #[cfg(any(test, feature = "sim"))]
        if !self.options.split_from_spares {
            return self.folded_more.try_reserve(1).is_ok();
        }
        false
    }

    /// Keep `f`, just folded, until the flush, where
    /// [`room_to_fold`](Self::room_to_fold) found room.
    fn keep_folded(&mut self, f: Folded) {
        if let Some(slot) = self.folded.get_mut(self.folded_len) {
            *slot = f;
            self.folded_len += 1;
            if f.live {
                self.folded_live += 1;
            }
            return;
        }
        // (Past the slots, only the simulator's model of Xen's tables:
        // never taken back by a split, so kept as frames alone.)
        #[cfg(any(test, feature = "sim"))]
        self.folded_more.push(f.table);
        // (Elsewhere unreachable: `room_to_fold` found a slot.)
        #[cfg(not(any(test, feature = "sim")))]
        debug_assert!(false, "a folded table {:?} with no slot", f.table);
    }

    /// Fold `l2`, the level-2 table holding `bfn`'s superpage, into a
    /// 1 GiB superpage if its 512 entries are 2 MiB superpages of one
    /// 1 GiB-aligned, contiguous run with one access and attribute (Xen's
    /// own tables, [`TableOptions::gigapages`]). The walk from the root
    /// finds where it hangs: this runs once per fold, not per map.
    #[cfg(any(test, feature = "sim"))]
    fn try_promote_giga(&mut self, mem: &mut impl TableMemory, bfn: Bfn, l2: Mfn) {
        if mem.present_count(l2) as usize != ENTRIES {
            return;
        }
        // No room to keep it until the flush: it stays a table.
        if !self.room_to_fold() {
            return;
        }
        let mut table = self.root;
        for level in (GIGAPAGE_LEVEL + 1..=LEVELS).rev() {
            match F::decode(mem.read_entry(table, index(bfn, level)), level) {
                Entry::Table(t) => table = t,
                _ => return,
            }
        }
        let gidx = index(bfn, GIGAPAGE_LEVEL);
        if F::decode(mem.read_entry(table, gidx), GIGAPAGE_LEVEL) != Entry::Table(l2) {
            return;
        }
        let (first_mfn, perms, attr) = match F::decode(mem.read_entry(l2, 0), SUPERPAGE_LEVEL) {
            Entry::Leaf { mfn, perms, attr } => (mfn, perms, attr),
            _ => return,
        };
        let block = (ENTRIES * ENTRIES) as u64;
        if first_mfn.0 % block != 0 {
            return;
        }
        for i in 1..ENTRIES {
            let mfn = Mfn(first_mfn.0 + (i * ENTRIES) as u64);
            if mem.read_entry(l2, i) != F::leaf_entry(mfn, perms, attr, SUPERPAGE_LEVEL) {
                return;
            }
        }
        self.last_leaf = None;
        mem.write_entry(
            table,
            gidx,
            F::leaf_entry(first_mfn, perms, attr, GIGAPAGE_LEVEL),
        );
        // Its 2 MiB superpages are no longer in the tree: a leaf table
        // folded into one since the last flush is taken back by no split.
        let n = self.folded_len;
        if let Some(folded) = self.folded.get_mut(..n) {
            for f in folded.iter_mut().filter(|f| f.live && f.parent == l2) {
                f.live = false;
                self.folded_live = self.folded_live.saturating_sub(1);
            }
        }
        self.keep_folded(Folded {
            table: l2,
            parent: table,
            pidx: gidx,
            live: false,
            giga: true,
        });
        self.superpages = self.superpages.saturating_sub(ENTRIES);
    }

    /// After a flush: the folded leaf tables become spares, zeroed (or are
    /// freed, zeroed, without `split_from_spares`).
    fn retire_folded(&mut self, mem: &mut impl TableMemory) {
        let n = core::mem::take(&mut self.folded_len);
        self.folded_live = 0;
        for i in 0..n {
            let Some(f) = self.folded.get(i).copied() else {
                break;
            };
            if self.options.split_from_spares && !f.giga {
                for e in 0..ENTRIES {
                    mem.write_entry(f.table, e, 0);
                }
                self.add_spare(mem, f.table);
            } else {
                Self::zero_and_free(mem, f.table);
            }
        }
        #[cfg(any(test, feature = "sim"))]
        for t in core::mem::take(&mut self.folded_more) {
            Self::zero_and_free(mem, t);
        }
    }

    /// The leaf table folded into the superpage at (`parent`, `pidx`) since
    /// the last flush, taken off the list, if it still maps what the
    /// superpage does (nothing changes inside a superpage: any change
    /// splits it first).
    fn take_folded(
        &mut self,
        mem: &impl TableMemory,
        parent: Mfn,
        pidx: usize,
        want: Entry,
    ) -> Option<Mfn> {
        let n = self.folded_len;
        let i = self
            .folded
            .get(..n)?
            .iter()
            .position(|f| f.live && !f.giga && f.parent == parent && f.pidx == pidx)?;
        let f = *self.folded.get(i)?;
        if !Self::starts_with(mem, f.table, want) {
            return None;
        }
        let last = *self.folded.get(n - 1)?;
        *self.folded.get_mut(i)? = last;
        self.folded_len = n - 1;
        self.folded_live = self.folded_live.saturating_sub(1);
        Some(f.table)
    }

    /// Whether leaf table `t`'s first entry is `want` (what a superpage
    /// splitting into it maps first).
    fn starts_with(mem: &impl TableMemory, t: Mfn, want: Entry) -> bool {
        F::decode(mem.read_entry(t, 0), 1) == want
    }

    fn take_spare(&mut self, mem: &mut impl TableMemory) -> Option<Mfn> {
        let t = pop_frame(mem, &mut self.spares)?;
        self.spares_len = self.spares_len.saturating_sub(1);
        Some(t)
    }

    fn add_spare(&mut self, mem: &mut impl TableMemory, t: Mfn) {
        push_frame(mem, &mut self.spares, t);
        self.spares_len += 1;
    }

    /// The spares the superpages are owed: one for each superpage whose
    /// split cannot link its own folded table back, which is every one but
    /// those folded since the last flush and still in the tree (`live` on
    /// `folded`).
    ///
    /// With `split_from_spares` the walker keeps `spares_len >=
    /// spares_owed()`, so a split never allocates: a fold brings its own
    /// table; a superpage mapped whole ([`map_superpage`](Self::map_superpage))
    /// takes a spare first; a split takes its folded table or a spare; a
    /// superpage unmapped whole gives one back ([`trim_spares`](Self::trim_spares)).
    fn spares_owed(&self) -> usize {
        self.superpages.saturating_sub(self.folded_live)
    }

    /// Spares past what the superpages are owed go: kept for reuse as
    /// emptied tables are (`options.recycle`, up to [`RECYCLED_TABLES`]),
    /// or given back. Every spare is reusable at once: it is a folded
    /// table zeroed after its flush, or a frame taken for a superpage
    /// mapped whole, never linked since. At most one goes per superpage
    /// unmapped whole, and after a flush one per superpage folded and
    /// unmapped whole before it.
    ///
    /// One kept for reuse is written back first: a folded table was zeroed
    /// after its flush, and an IOMMU that does not snoop the CPU caches
    /// would still find in memory the entries of the pages it mapped,
    /// since released, once a table made from it is linked (the link's
    /// line may reach memory first). A split writes its table back before
    /// it links it; a recycled table is linked as it is.
    fn trim_spares(&mut self, mem: &mut impl TableMemory) {
        while self.spares_len > self.spares_owed() {
            let Some(t) = self.take_spare(mem) else {
                // (The count was wrong: an empty list owes nothing more.)
                self.spares_len = 0;
                return;
            };
            // (Written back given back to the host too: what memory holds
            // of a frame given back should not be frame numbers.)
            mem.write_back_table(t);
            let room = self
                .recycled
                .get_mut(self.recycled_len)
                .filter(|_| self.options.recycle);
            match room {
                Some(at) => {
                    *at = t;
                    self.recycled_len += 1;
                }
                None => mem.free_table(t), // (written back above)
            }
        }
    }

    /// The superpage at (`parent`, `pidx`) was unmapped whole: if it was
    /// folded since the last flush, its table stays on the folded list,
    /// whole (the IOMMU may still walk it until the flush, which makes it
    /// a spare like the others), but no split takes it back, and it no
    /// longer stands for a spare (see [`spares_owed`](Self::spares_owed)).
    fn drop_folded(&mut self, parent: Mfn, pidx: usize) {
        let n = self.folded_len;
        let found = self.folded.get_mut(..n).and_then(|f| {
            f.iter_mut()
                .find(|f| f.live && !f.giga && f.parent == parent && f.pidx == pidx)
        });
        if let Some(f) = found {
            f.live = false;
            self.folded_live = self.folded_live.saturating_sub(1);
        }
    }

    /// Spare frames held for splits: as many as the superpages are owed
    /// (one for each superpage but those folded since the last flush and
    /// still in the tree).
    pub fn spare_frames(&self, mem: &impl TableMemory) -> usize {
        count_frames(mem, self.spares)
    }

    /// Level-2 leaves (2 MiB superpages) in the tree, folded or mapped
    /// whole. While there is one, an [`unmap`](Self::unmap) may split it:
    /// its caller's flush must then cover the whole 2 MiB around the page
    /// (an IOTLB caches a superpage as one entry, which VT-d drops only for
    /// a page-selective invalidation whose address mask covers it).
    pub fn superpage_count(&self) -> usize {
        self.superpages
    }

    /// Leaf tables folded into superpages since the last flush, kept whole.
    pub fn folded_frames(&self) -> usize {
        #[cfg(any(test, feature = "sim"))]
        let more = self.folded_more.len();
        #[cfg(not(any(test, feature = "sim")))]
        let more = 0;
        self.folded_len + more
    }

    /// A value that changes whenever a table is queued to be freed after
    /// the next flush (emptied by an unmap, or folded into a superpage),
    /// read in O(1): the simulator's model of Xen's own tables compares it
    /// around a call to know when Xen's driver would have set
    /// `IOMMU_FLUSHF_all` (it queues such a table with
    /// `iommu_queue_free_pgtable()` and asks for a flush of everything).
    #[cfg(any(test, feature = "sim"))]
    pub fn queued_tables_marker(&self) -> (Option<Mfn>, usize) {
        (self.freed, self.folded_frames())
    }

    /// Rewrite the present 4 KiB entry that maps `bfn` in place, as Xen's
    /// own drivers do for a map over one (the simulator's model of a
    /// domain's own tables). `Inval`: `bfn` out of range, or `mfn` and
    /// `perms` have no encoding (nothing changed either way); `NoEnt`: no
    /// 4 KiB entry maps it (nothing does, or a superpage, which the caller
    /// splits first). The table and its count stay as they are.
    #[cfg(any(test, feature = "sim"))]
    pub fn overwrite_leaf(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        if !self.in_range(bfn) || !Self::encodable(mfn, perms) {
            return Err(Errno::Inval);
        }
        let mut table = self.root;
        for level in (2..=LEVELS).rev() {
            match F::decode(mem.read_entry(table, index(bfn, level)), level) {
                Entry::Table(t) => table = t,
                _ => return Err(Errno::NoEnt),
            }
        }
        let idx = index(bfn, 1);
        if F::decode(mem.read_entry(table, idx), 1) == Entry::Empty {
            return Err(Errno::NoEnt);
        }
        mem.write_entry(table, idx, F::leaf_entry(mfn, perms, attr, 1));
        Ok(())
    }

    /// The level-2 entry over `bfn` (what one 2 MiB entry would replace):
    /// `Empty` too where a level above has none.
    #[cfg(any(test, feature = "sim"))]
    pub fn level2_entry(&self, mem: &impl TableMemory, bfn: Bfn) -> Entry {
        if !self.in_range(bfn) {
            return Entry::Empty;
        }
        let mut table = self.root;
        for level in (3..=LEVELS).rev() {
            match F::decode(mem.read_entry(table, index(bfn, level)), level) {
                Entry::Table(t) => table = t,
                // (A 1 GiB leaf maps the 2 MiB too.)
                other => return other,
            }
        }
        F::decode(mem.read_entry(table, index(bfn, 2)), 2)
    }

    /// Emptied tables waiting for an IOTLB flush before they are freed.
    pub fn freed_frames(&self, mem: &impl TableMemory) -> usize {
        count_frames(mem, self.freed)
    }

    /// Emptied, flushed tables kept for reuse.
    pub fn recycled_frames(&self) -> usize {
        self.recycled_len
    }

    /// Emptied tables whose flush came, waiting to be freed
    /// ([`free_flushed`](Self::free_flushed)).
    pub fn flushed_frames(&self, mem: &impl TableMemory) -> usize {
        count_frames(mem, self.flushed)
    }

    /// Whether emptied tables whose flush came wait to be freed.
    pub fn has_flushed(&self) -> bool {
        self.flushed.is_some()
    }

    /// Free the tables emptied before the last IOTLB flush, or keep up to
    /// [`RECYCLED_TABLES`] of them for reuse (`options.recycle`), all of
    /// them: [`flush_came`](Self::flush_came), then
    /// [`free_flushed`](Self::free_flushed) with no budget. Call only once
    /// the IOMMU can no longer hold them in its caches. (The simulator's
    /// model of Xen's own tables, whose tasklet frees every table it
    /// queued; the engine's contexts free a budget at a time.)
    pub fn release_freed(&mut self, mem: &mut impl TableMemory) {
        self.flush_came(mem);
        let mut all = usize::MAX;
        self.free_flushed(mem, &mut all);
    }

    /// The IOTLB flush came: the tables emptied before it can go. The
    /// folded leaf tables become spares (at most [`FOLDED_BEFORE_FLUSH`]),
    /// the spares past what the superpages are owed go (as many), and the
    /// emptied tables join those [`free_flushed`](Self::free_flushed)
    /// frees, in O(1): however many failed flushes left waiting, a flush
    /// frees no more than its caller's budget (a review of 2026-12-06: the
    /// first flush to succeed after failed ones freed them all, up to a
    /// table per 512 BFNs of the quota, each written back first, in a hook
    /// under the target's p2m lock). Call only once the IOMMU can no longer
    /// hold them in its caches.
    pub fn flush_came(&mut self, mem: &mut impl TableMemory) {
        self.retire_folded(mem);
        if self.options.split_from_spares {
            // (The tables of superpages unmapped whole since they folded.)
            self.trim_spares(mem);
        }
        if let Some(last) = self.freed_last.take() {
            // Its link ends the list (0): joined on to what earlier flushes
            // left only if anything is left, the only store after the flush
            // into a frame on these lists (a link, not present in any
            // format; such a frame is freed written back, or zeroed before
            // it is a table again).
            if self.flushed.is_some() {
                mem.write_entry(last, 0, chain_link(self.flushed));
            }
            self.flushed = self.freed.take();
        }
    }

    /// Free up to `budget` of the tables whose flush came (each counted
    /// off it), or keep up to [`RECYCLED_TABLES`] of them for reuse
    /// (`options.recycle`). Whether any is left.
    pub fn free_flushed(&mut self, mem: &mut impl TableMemory, budget: &mut usize) -> bool {
        while *budget != 0 {
            let Some(t) = self.flushed else {
                break;
            };
            *budget -= 1;
            self.flushed = chain_next(mem.read_entry(t, 0));
            let room = self
                .recycled
                .get_mut(self.recycled_len)
                .filter(|_| self.options.recycle);
            match room {
                // Entry 0 keeps its (not present) link until the frame is
                // a table again.
                Some(at) => {
                    *at = t;
                    self.recycled_len += 1;
                }
                None => give_back(mem, t),
            }
        }
        self.flushed.is_some()
    }

    /// Unmap `bfn`. `Err(NoEnt)` if it is not mapped; `Err(NoMem)` if a
    /// superpage had to be split and no table frame was available (nothing
    /// changed then).
    pub fn unmap(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        if !self.in_range(bfn) {
            return Err(Errno::NoEnt);
        }
        // A run in the cached leaf table that leaves it non-empty touches
        // nothing above it.
        if let Some(c) = self.cached_leaf(bfn) {
            let idx = index(bfn, 1);
            let (entry, count) = mem.read_entry_and_count(c.table, idx);
            if F::decode(entry, 1) == Entry::Empty {
                return Err(Errno::NoEnt);
            }
            if count > 1 {
                mem.write_entry_counted(c.table, idx, 0, count - 1);
                return Ok(());
            }
        }
        // The walk below may unlink tables and split superpages.
        self.last_leaf = None;
        // Path of (table, index) from the root down to the leaf table.
        let mut path = [(Mfn(0), 0usize); LEVELS as usize];
        let mut table = self.root;
        for level in (1..=LEVELS).rev() {
            let idx = index(bfn, level);
            // Always in range (level is 1..=LEVELS); `get_mut` keeps the
            // bound check, and its panic, out of an inlined caller's code.
            if let Some(step) = path.get_mut((level - 1) as usize) {
                *step = (table, idx);
            }
            if level == 1 {
                break;
            }
            match F::decode(mem.read_entry(table, idx), level) {
                Entry::Table(t) => table = t,
                Entry::Empty => return Err(Errno::NoEnt),
                Entry::Leaf { mfn, perms, attr } if level == SUPERPAGE_LEVEL => {
                    table = self.split(mem, table, idx, mfn, perms, attr)?;
                }
                #[cfg(any(test, feature = "sim"))]
                Entry::Leaf { mfn, perms, attr }
                    if level == GIGAPAGE_LEVEL && self.options.gigapages =>
                {
                    table = self.split_giga(mem, table, idx, mfn, perms, attr)?;
                }
                Entry::Leaf { .. } => return Err(Errno::NoEnt),
            }
        }
        let (leaf_table, idx) = path[0];
        if F::decode(mem.read_entry(leaf_table, idx), 1) == Entry::Empty {
            return Err(Errno::NoEnt);
        }
        mem.write_entry(leaf_table, idx, 0);
        self.clear_upward(mem, &path, 1, bfn);
        Ok(())
    }

    /// Unmap what is mapped of the `count` BFNs from `first` (one leaf
    /// table's, `first >> 9` the same for all) that the cached leaf table
    /// holds, as [`unmap`](Self::unmap) of each would, as long as the table
    /// keeps an entry: how many BFNs from `first` are done (each cleared,
    /// or not mapped). The caller unmaps the rest one by one (the one that
    /// would empty the table, which `unmap` frees, or all of them when the
    /// cache does not hold the run: the walk there may split a superpage).
    /// A run of a flush's clearing pays for the leaf table's look-up once,
    /// where page by page each paid for it and for the count's read.
    pub fn unmap_in_cached_leaf(
        &mut self,
        mem: &mut impl TableMemory,
        first: Bfn,
        count: u64,
    ) -> u64 {
        let Some(last) = count.checked_sub(1).and_then(|n| first.0.checked_add(n)) else {
            return 0;
        };
        if last >> 9 != first.0 >> 9 || !self.in_range(Bfn(last)) {
            return 0;
        }
        let Some(c) = self.cached_leaf(first) else {
            return 0;
        };
        // (A half-open range: an index is at most 511, so the end does not
        // overflow, and the loop needs no exhausted flag, as `..=` does.)
        let done = mem.clear_entries_keeping_one(
            c.table,
            index(first, 1)..index(Bfn(last), 1) + 1,
            |entry| F::decode(entry, 1) != Entry::Empty,
        );
        done as u64
    }

    /// Unmap the 2 MiB superpage that maps `bfn` (aligned) whole, as an
    /// order-9 unmap does on Xen: its one entry cleared, nothing split, so
    /// nothing allocated. `NoEnt` where no superpage maps it (the caller
    /// unmaps page by page there).
    pub fn unmap_superpage(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        if !self.in_range(bfn) || bfn.0 & (ENTRIES as u64 - 1) != 0 {
            return Err(Errno::NoEnt);
        }
        let mut path = [(Mfn(0), 0usize); LEVELS as usize];
        let mut table = self.root;
        for level in (SUPERPAGE_LEVEL..=LEVELS).rev() {
            let idx = index(bfn, level);
            if let Some(step) = path.get_mut((level - 1) as usize) {
                *step = (table, idx);
            }
            let entry = F::decode(mem.read_entry(table, idx), level);
            match entry {
                Entry::Table(t) if level > SUPERPAGE_LEVEL => table = t,
                // Xen's order-9 unmap splits a 1 GiB superpage first (a
                // table: it can fail), then clears the 2 MiB entry.
                #[cfg(any(test, feature = "sim"))]
                Entry::Leaf { mfn, perms, attr }
                    if level == GIGAPAGE_LEVEL && self.options.gigapages =>
                {
                    table = self.split_giga(mem, table, idx, mfn, perms, attr)?;
                }
                Entry::Leaf { .. } if level == SUPERPAGE_LEVEL => {
                    self.last_leaf = None;
                    mem.write_entry(table, idx, 0);
                    self.superpages = self.superpages.saturating_sub(1);
                    self.drop_folded(table, idx);
                    self.clear_upward(mem, &path, SUPERPAGE_LEVEL as usize, bfn);
                    if self.options.split_from_spares {
                        self.trim_spares(mem);
                    }
                    return Ok(());
                }
                _ => return Err(Errno::NoEnt),
            }
        }
        Err(Errno::NoEnt)
    }

    /// After an entry of the level-`from` table on `path` was cleared:
    /// count it out, and clear upward while tables become empty; the
    /// tables from the one the IOMMU starts at up to the root always stay.
    fn clear_upward(
        &mut self,
        mem: &mut impl TableMemory,
        path: &[(Mfn, usize); LEVELS as usize],
        from: usize,
        bfn: Bfn,
    ) {
        let levels = self.options.levels.clamp(2, LEVELS) as usize;
        for level in from..levels {
            let (Some(&(t, _)), Some(&(pt, pidx))) = (path.get(level - 1), path.get(level)) else {
                return;
            };
            let count = mem.present_count(t).saturating_sub(1);
            mem.set_present_count(t, count);
            if count != 0 {
                if level == 1 {
                    // The leaf table stays, linked from (pt, pidx).
                    self.last_leaf = Some(LastLeaf {
                        region: bfn.0 >> 9,
                        table: t,
                        parent: pt,
                        pidx,
                    });
                }
                return;
            }
            mem.write_entry(pt, pidx, 0);
            if self.freed.is_none() {
                self.freed_last = Some(t);
            }
            push_frame(mem, &mut self.freed, t);
        }
        if let Some(&(top, _)) = path.get(levels - 1) {
            mem.set_present_count(top, mem.present_count(top).saturating_sub(1));
        }
    }

    fn split(
        &mut self,
        mem: &mut impl TableMemory,
        parent: Mfn,
        pidx: usize,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<Mfn, Errno> {
        // Folded since the last flush: the same table, whole, back where it
        // was (what the IOMMU may still have cached).
        let want = Entry::Leaf { mfn, perms, attr };
        // (Without `split_from_spares` the folded table stays on its list,
        // to be freed after the flush, and the split allocates, as Xen's.)
        let from_spares = self.options.split_from_spares;
        if from_spares {
            if let Some(t) = self.take_folded(mem, parent, pidx, want) {
                mem.write_back_table(t);
                mem.write_entry(parent, pidx, F::table_entry(t));
                self.superpages = self.superpages.saturating_sub(1);
                return Ok(t);
            }
        }
        let spare = if from_spares {
            self.take_spare(mem)
        } else {
            None
        };
        let fresh = spare.is_none();
        let t = match spare {
            Some(t) => t,
            None => mem.alloc_table()?,
        };
        // A frame the host would not let the engine write (an engine bug:
        // a wrong frame among the spares) reads back empty: it is never
        // linked, and the superpage stays (nothing changed).
        if !Self::fill_split(mem, t, want, 1) {
            if fresh {
                // Allocated here and never linked: it goes back, zeroed
                // first. A spare that failed is kept off every list: a
                // frame the host would not let the engine write is not
                // used again.
                Self::zero_and_free(mem, t);
            }
            return Err(Errno::NoMem);
        }
        mem.write_entry(parent, pidx, F::table_entry(t));
        self.superpages = self.superpages.saturating_sub(1);
        // (A folded table left for this superpage that no longer maps what
        // it did, an engine bug, stands for no spare any more.)
        self.drop_folded(parent, pidx);
        Ok(t)
    }

    /// Fill `t` with the 512 leaves at `level` that a superpage of the
    /// level above, `whole` (a leaf), splits into, count them and write
    /// the table back (a device may be using these pages: the table must
    /// be in memory before the entry that points at it). Whether it reads
    /// back so (a frame the host would not let the engine write reads 0).
    #[inline(always)]
    fn fill_split(mem: &mut impl TableMemory, t: Mfn, whole: Entry, level: u32) -> bool {
        let Entry::Leaf { mfn, perms, attr } = whole else {
            return false;
        };
        // (Its callers pass constants: 4 KiB and 2 MiB leaves.)
        debug_assert!((1..=SUPERPAGE_LEVEL).contains(&level));
        let step = 1u64 << (9 * (level - 1));
        for i in 0..ENTRIES {
            let first = Mfn(mfn.0 + i as u64 * step);
            mem.write_entry(t, i, F::leaf_entry(first, perms, attr, level));
        }
        mem.set_present_count(t, ENTRIES as u16);
        mem.write_back_table(t);
        mem.present_count(t) == ENTRIES as u16 && F::decode(mem.read_entry(t, 0), level) == whole
    }

    /// Give back `t`, a table never linked or unlinked and flushed, zeroed
    /// first, its count too: it holds machine frame numbers. (Xen 4.17 and
    /// 4.20 also scrub an anonymous page they free; the engine does not
    /// rely on it: see [`destroy`](Self::destroy).)
    #[inline(always)]
    fn zero_and_free(mem: &mut impl TableMemory, t: Mfn) {
        for e in 0..ENTRIES {
            mem.write_entry(t, e, 0);
        }
        mem.set_present_count(t, 0);
        free_written_back(mem, t);
    }

    /// Split the 1 GiB superpage at entry `pidx` of `parent` (mapping
    /// from `mfn`) into a new level-2 table of 512 2 MiB superpages, as
    /// Xen's own code does: a table allocated (`Err(NoMem)`, nothing
    /// changed, when there is none), filled, written back, then linked.
    /// The same translations before and after; the caller's flush must
    /// cover the whole 1 GiB (an IOTLB caches it as one entry). (Apart
    /// from [`split`](Self::split), which is on the Xen object's deepest
    /// stack: this is built only for the simulator.)
    #[cfg(any(test, feature = "sim"))]
    fn split_giga(
        &mut self,
        mem: &mut impl TableMemory,
        parent: Mfn,
        pidx: usize,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<Mfn, Errno> {
        let t = mem.alloc_table()?;
        if !Self::fill_split(mem, t, Entry::Leaf { mfn, perms, attr }, SUPERPAGE_LEVEL) {
            Self::zero_and_free(mem, t);
            return Err(Errno::NoMem);
        }
        mem.write_entry(parent, pidx, F::table_entry(t));
        self.last_leaf = None;
        self.superpages += ENTRIES;
        Ok(t)
    }

    /// Software walk: what the tables say about `bfn` (the simulated
    /// hardware has its own, independent walker).
    pub fn translate(
        &self,
        mem: &impl TableMemory,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        if !self.in_range(bfn) {
            return None;
        }
        walk::<F>(mem, self.root, bfn)
    }

    /// The raw leaf entry that maps `bfn` and its level, if any.
    pub fn leaf(&self, mem: &impl TableMemory, bfn: Bfn) -> Option<(u32, u64)> {
        if !self.in_range(bfn) {
            return None;
        }
        leaf_at::<F>(mem, self.root, bfn)
    }

    /// Free every table, the root included (the context goes away).
    pub fn destroy(mut self, mem: &mut impl TableMemory) {
        // Folded tables are zeroed like any other table before they are
        // freed, not freed as they are: they hold machine frame numbers.
        // Xen 4.17 and 4.20 scrub an anonymous page when it is freed
        // (`free_domheap_pages()`: `scrub = 1` with no owner), so this is
        // defence in depth: no table the engine frees depends on the
        // host's allocator to keep its frame numbers from the next user.
        self.retire_folded(mem);
        while let Some(t) = self.take_spare(mem) {
            free_written_back(mem, t);
        }
        while let Some(t) = self.take_recycled() {
            give_back(mem, t);
        }
        self.options.recycle = false;
        self.release_freed(mem);
        Self::free_subtree(mem, self.root, LEVELS);
    }

    fn free_subtree(mem: &mut impl TableMemory, table: Mfn, level: u32) {
        if level > 1 {
            for i in 0..ENTRIES {
                if let Entry::Table(t) = F::decode(mem.read_entry(table, i), level) {
                    Self::free_subtree(mem, t, level - 1);
                }
            }
        }
        // Zeroed before it goes, as every table the engine frees (not
        // relying on the host's scrub, see `destroy`): the pinned path of a
        // table walked from below the root (fewer than 4 levels), or a
        // context destroyed with entries left, holds machine frame numbers.
        for i in 0..ENTRIES {
            if mem.read_entry(table, i) != 0 {
                mem.write_entry(table, i, 0);
            }
        }
        mem.set_present_count(table, 0);
        free_written_back(mem, table);
    }
}

/// The raw leaf entry of 4-level tables of format `F` rooted at `root`
/// that maps `bfn`, and its level (1: 4 KiB, 2: 2 MiB), if any.
pub fn leaf_at<F: PageTableFormat>(
    mem: &impl TableMemory,
    root: Mfn,
    bfn: Bfn,
) -> Option<(u32, u64)> {
    let mut table = root;
    for level in (1..=LEVELS).rev() {
        let raw = mem.read_entry(table, index(bfn, level));
        match F::decode(raw, level) {
            Entry::Table(t) if level > 1 => table = t,
            Entry::Leaf { .. } => return Some((level, raw)),
            _ => return None,
        }
    }
    None
}

/// Software walk of 4-level tables of format `F` rooted at `root`: what
/// they say about `bfn`.
pub fn walk<F: PageTableFormat>(
    mem: &impl TableMemory,
    root: Mfn,
    bfn: Bfn,
) -> Option<(Mfn, Permissions, MemAttr)> {
    let (level, raw) = leaf_at::<F>(mem, root, bfn)?;
    let Entry::Leaf { mfn, perms, attr } = F::decode(raw, level) else {
        return None;
    };
    let offset = bfn.0 & ((1u64 << (9 * (level - 1))) - 1);
    Some((Mfn(mfn.0 + offset), perms, attr))
}

/// Push `t`, a table whose every entry is clear (an unmap emptied it: its
/// present count reached 0; or a folded leaf table zeroed after its
/// flush), on a list of frames chained through entry 0.
///
/// A frame on a list may still be walked by the IOMMU (through its
/// paging-structure caches, until the flush), so the link must read as not
/// present in every format: it is `(next frame + 1) << 12`, whose low 12
/// bits (VT-d R/W, LPAE valid) are clear; 0 ends the list.
fn push_frame(mem: &mut impl TableMemory, head: &mut Option<Mfn>, t: Mfn) {
    // The count is the walker's own: kept exact by every store it makes.
    // (Read back whole, this was a 511-entry scan per emptied table.)
    debug_assert!(
        (0..ENTRIES).all(|i| mem.read_entry(t, i) == 0),
        "an emptied table {t:?} still has entries"
    );
    mem.write_entry(t, 0, chain_link(*head));
    mem.set_present_count(t, 0);
    *head = Some(t);
}

/// Pop a frame pushed by [`push_frame`], zeroed again.
fn pop_frame(mem: &mut impl TableMemory, head: &mut Option<Mfn>) -> Option<Mfn> {
    let t = (*head)?;
    *head = chain_next(mem.read_entry(t, 0));
    mem.write_entry(t, 0, 0);
    Some(t)
}

/// Give back a frame taken off a list: its link in entry 0 cleared first
/// (the rest of it is clear already).
fn give_back(mem: &mut impl TableMemory, t: Mfn) {
    mem.write_entry(t, 0, 0);
    free_written_back(mem, t);
}

/// Give table frame `t` back to the host with every store into it written
/// back first, the zeroing ones the engine made before it gave it back
/// among them: on an IOMMU that does not snoop the caches, memory would
/// otherwise keep what those stores cleared (frame numbers) for the
/// frame's next owner, until the lines are evicted (a review of
/// 2026-12-06: the Xen backend forgot such lines unwritten; a 3-level
/// context's root went back with its pinned link in memory). Every table
/// the walker frees goes through here.
fn free_written_back(mem: &mut impl TableMemory, t: Mfn) {
    mem.write_back_table(t);
    mem.free_table(t);
}

/// Entry 0 of a list frame: the link to `next`, not present in any format.
/// It occupies bits 12..51 for any frame below 2^40 - 1 (52-bit physical
/// addresses, x86's maximum; Arm's is 48), clear of the bits a backend may
/// keep its own bookkeeping in (Xen: 52..61).
fn chain_link(next: Option<Mfn>) -> u64 {
    next.map_or(0, |m| m.0.wrapping_add(1) << 12)
}

/// The next frame of a list, from a list frame's entry 0.
fn chain_next(entry0: u64) -> Option<Mfn> {
    (entry0 >> 12).checked_sub(1).map(Mfn)
}

fn count_frames(mem: &impl TableMemory, mut at: Option<Mfn>) -> usize {
    let mut n = 0;
    while let Some(t) = at {
        n += 1;
        at = chain_next(mem.read_entry(t, 0));
    }
    n
}

/// Regression tests from the security review of the engine's own contexts:
/// a table waiting for the flush is still reachable through the IOMMU's
/// paging-structure caches, so everything in it must read as not present.
/// The frame lists used to chain through entry 0 as `frame + 1`, which VT-d
/// reads as a present entry (R/W from the low bits) pointing at a low
/// machine frame.
#[cfg(test)]
mod freed_list_tests {
    use super::lpae::Lpae;
    use super::vtd::Vtd;
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Table memory as Xen's backend keeps it: frames from a pool, the
    /// present count in bits 52..61 of entry 0 (ignored by the hardware).
    struct Frames {
        tables: Vec<[u64; ENTRIES]>,
        free: Vec<u64>,
        /// `alloc_table` calls.
        allocs: usize,
        /// `reuse_table` calls.
        reuses: usize,
        /// Stores (`b'w'`) and write-backs (`b'b'`), by frame, in order.
        events: Vec<(u8, u64)>,
        /// A frame the host will not let the engine write: stores into it
        /// are dropped and it reads 0 (Xen's answer to a frame that is not
        /// the engine's).
        refused: Option<u64>,
    }
    const COUNT_SHIFT: u32 = 52;
    const COUNT_MASK: u64 = 0x3ff << COUNT_SHIFT;
    impl TableMemory for Frames {
        fn alloc_table(&mut self) -> Result<Mfn, Errno> {
            self.allocs += 1;
            // Frames at odd and even numbers alike, never 0.
            if let Some(f) = self.free.pop() {
                self.tables[f as usize] = [0; ENTRIES];
                return Ok(Mfn(f));
            }
            self.tables.push([0; ENTRIES]);
            Ok(Mfn(self.tables.len() as u64 - 1))
        }
        fn free_table(&mut self, t: Mfn) {
            self.free.push(t.0);
        }
        fn reuse_table(&mut self, t: Mfn) {
            assert!(!self.free.contains(&t.0), "reuse of freed frame {t:?}");
            // Zero as the hardware reads it, the count bits included.
            assert_eq!(
                self.tables[t.0 as usize], [0; ENTRIES],
                "{t:?} reused unclean"
            );
            self.reuses += 1;
        }
        fn read_entry(&self, t: Mfn, i: usize) -> u64 {
            assert!(!self.free.contains(&t.0), "read of freed frame {t:?}");
            if self.refused == Some(t.0) {
                return 0;
            }
            let raw = self.tables[t.0 as usize][i];
            if i == 0 {
                raw & !COUNT_MASK
            } else {
                raw
            }
        }
        fn write_back_table(&mut self, t: Mfn) {
            self.events.push((b'b', t.0));
        }
        fn write_entry(&mut self, t: Mfn, i: usize, raw: u64) {
            assert!(!self.free.contains(&t.0), "write to freed frame {t:?}");
            self.events.push((b'w', t.0));
            if self.refused == Some(t.0) {
                return;
            }
            let e = &mut self.tables[t.0 as usize][i];
            *e = if i == 0 {
                (raw & !COUNT_MASK) | (*e & COUNT_MASK)
            } else {
                raw
            };
        }
        fn present_count(&self, t: Mfn) -> u16 {
            if self.refused == Some(t.0) {
                return 0;
            }
            ((self.tables[t.0 as usize][0] & COUNT_MASK) >> COUNT_SHIFT) as u16
        }
        fn set_present_count(&mut self, t: Mfn, c: u16) {
            if self.refused == Some(t.0) {
                return;
            }
            let e = &mut self.tables[t.0 as usize][0];
            *e = (*e & !COUNT_MASK) | (u64::from(c) << COUNT_SHIFT);
        }
    }

    /// The tables these tests build: 3 levels, no superpages, splits from
    /// spares (as the engine's own contexts), emptied tables kept for
    /// reuse or not.
    fn three_levels(recycle: bool) -> TableOptions {
        TableOptions {
            levels: 3,
            superpages: false,
            recycle,
            split_from_spares: true,
            gigapages: false,
        }
    }

    /// Every entry of every frame on the freed list, as the hardware sees
    /// it (the raw word, count bits included), decodes as not present at
    /// every level.
    fn freed_frames_read_as_empty<F: PageTableFormat>() {
        let mut mem = frames();
        let options = three_levels(/* recycle: */ false);
        let mut t = IoPageTable::<F>::with_options(&mut mem, options).unwrap();
        // Pages in distinct 2 MiB and 1 GiB regions: unmapping them frees
        // leaf and level-2 tables, several of them chained.
        let bfns: Vec<Bfn> = (0..6u64)
            .map(|i| Bfn(0x100_000 + i * 0x4_0000 + i * 0x200))
            .collect();
        for (i, b) in bfns.iter().enumerate() {
            t.map(
                &mut mem,
                *b,
                Mfn(0x1000 + i as u64),
                Permissions::RW,
                MemAttr::WriteBack,
            )
            .unwrap();
        }
        for b in &bfns {
            t.unmap(&mut mem, *b).unwrap();
        }
        let mut freed = Vec::new();
        let mut at = t.freed;
        while let Some(f) = at {
            freed.push(f);
            at = chain_next(mem.read_entry(f, 0));
        }
        assert!(
            freed.len() >= 6,
            "tables freed by the unmaps: {}",
            freed.len()
        );
        assert_eq!(freed.len(), t.freed_frames(&mem));
        for f in &freed {
            for (i, raw) in mem.tables[f.0 as usize].iter().enumerate() {
                for level in 1..=LEVELS {
                    assert_eq!(
                        F::decode(*raw, level),
                        Entry::Empty,
                        "{}: freed table {f:?} entry {i} = {raw:#x} is present at level {level}",
                        F::NAME
                    );
                }
            }
        }
        t.release_freed(&mut mem);
        assert_eq!(mem.free.len(), freed.len());
    }

    /// Map BFNs 0x200.. to frames 0x400.. (read-write, write-back): a whole
    /// leaf table of one aligned run, which folds into a superpage.
    fn map_foldable_run(t: &mut IoPageTable<Vtd>, mem: &mut Frames) {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        for i in 0..ENTRIES as u64 {
            t.map(mem, Bfn(0x200 + i), Mfn(0x400 + i), rw, wb).unwrap();
        }
    }

    fn refuses_what_its_entries_cannot_say<F: PageTableFormat>() {
        let mut mem = frames();
        let mut t =
            IoPageTable::<F>::with_options(&mut mem, TableOptions::engine_context(4)).unwrap();
        let none = Permissions {
            read: false,
            write: false,
        };
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let past = Mfn((F::ADDRESS_MASK >> 12) + 1);
        assert_eq!(
            t.map(&mut mem, Bfn(0x200), Mfn(0x777), none, wb),
            Err(Errno::Inval)
        );
        assert_eq!(t.map(&mut mem, Bfn(0x200), past, rw, wb), Err(Errno::Inval));
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x200), Mfn(past.0 & !0x1ff), rw, wb),
            Err(Errno::Inval)
        );
        assert_eq!(t.translate(&mem, Bfn(0x200)), None);
        // The last frame the format holds is mapped as asked.
        let last = Mfn(F::ADDRESS_MASK >> 12);
        t.map(&mut mem, Bfn(0x200), last, rw, wb).unwrap();
        assert_eq!(t.translate(&mem, Bfn(0x200)).map(|e| e.0), Some(last));
    }

    #[test]
    fn refuses_what_its_entries_cannot_say_vtd() {
        refuses_what_its_entries_cannot_say::<Vtd>();
    }

    #[test]
    fn refuses_what_its_entries_cannot_say_lpae() {
        refuses_what_its_entries_cannot_say::<Lpae>();
    }

    #[test]
    fn a_destroyed_context_gives_back_only_zeroed_frames() {
        // (A security review's finding.) With fewer than 4 levels the
        // pinned path from the root down to the table the IOMMU walks from
        // stays linked to the end: destroyed, the root went back holding a
        // table entry (a machine frame number). So would the tables of a
        // context destroyed with an entry left.
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        for (levels, unmap) in [(4, true), (3, true), (2, true), (4, false), (3, false)] {
            let mut mem = frames();
            let options = TableOptions::engine_context(levels);
            let mut t = IoPageTable::<Vtd>::with_options(&mut mem, options).unwrap();
            t.map(&mut mem, Bfn(0x1234), Mfn(0x777), rw, wb).unwrap();
            if unmap {
                t.unmap(&mut mem, Bfn(0x1234)).unwrap();
                t.release_freed(&mut mem);
            }
            t.destroy(&mut mem);
            assert!(!mem.free.is_empty());
            for &f in &mem.free {
                let raw = mem.tables[f as usize];
                assert!(
                    raw.iter().all(|&e| e == 0),
                    "levels {levels}, unmapped {unmap}: frame {f} freed holding {:#x?}",
                    raw.iter().filter(|&&e| e != 0).collect::<Vec<_>>()
                );
            }
        }
    }

    fn frames() -> Frames {
        Frames {
            tables: vec![[0; ENTRIES]],
            free: Vec::new(),
            allocs: 0,
            reuses: 0,
            events: Vec::new(),
            refused: None,
        }
    }

    /// A context that keeps emptied tables reuses them, but only once the
    /// flush came (`release_freed`), at most [`RECYCLED_TABLES`], each zero
    /// as the hardware reads it; the rest go back, and all go with the
    /// context.
    fn emptied_tables_are_reused_after_the_flush_up_to_the_bound<F: PageTableFormat>() {
        let mut mem = frames();
        let options = three_levels(/* recycle: */ true);
        let mut t = IoPageTable::<F>::with_options(&mut mem, options).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        // Five pages in distinct 1 GiB regions: a leaf and a level-2 table
        // each, ten tables emptied when they go.
        let bfns: Vec<Bfn> = (1..=5u64).map(|i| Bfn(i * 0x4_0000 + i)).collect();
        let cycle = |t: &mut IoPageTable<F>, mem: &mut Frames, base: u64| {
            for (i, b) in bfns.iter().enumerate() {
                t.map(mem, *b, Mfn(base + i as u64), rw, wb).unwrap();
            }
            for (i, b) in bfns.iter().enumerate() {
                assert_eq!(t.translate(mem, *b), Some((Mfn(base + i as u64), rw, wb)));
            }
            for b in &bfns {
                t.unmap(mem, *b).unwrap();
            }
        };
        let built = mem.allocs;
        cycle(&mut t, &mut mem, 0x100);
        assert_eq!(mem.allocs - built, 10);
        assert_eq!(t.freed_frames(&mem), 10);
        // No flush yet: the emptied tables wait, and a map needs new ones.
        cycle(&mut t, &mut mem, 0x200);
        assert_eq!((mem.allocs - built, mem.reuses), (20, 0));
        t.release_freed(&mut mem);
        assert_eq!(t.recycled_frames(), RECYCLED_TABLES);
        assert_eq!(mem.free.len(), 20 - RECYCLED_TABLES);
        // Warm: eight of the ten tables come from the kept ones.
        let allocs = mem.allocs;
        cycle(&mut t, &mut mem, 0x300);
        assert_eq!((mem.allocs - allocs, mem.reuses), (2, RECYCLED_TABLES));
        t.release_freed(&mut mem);
        assert_eq!(t.recycled_frames(), RECYCLED_TABLES);
        // A context that goes gives back every frame it ever had.
        t.destroy(&mut mem);
        assert_eq!(mem.free.len(), mem.tables.len() - 1);
    }

    /// Tables emptied before a flush go after it a budget at a time
    /// (`free_flushed`), never before it: what a flush leaves joins the
    /// next flush's list whole, and every frame goes once.
    #[test]
    fn flushed_tables_go_a_budget_at_a_time() {
        let mut mem = frames();
        let options = three_levels(/* recycle: */ false);
        let mut t = IoPageTable::<Vtd>::with_options(&mut mem, options).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        // Pages in distinct 1 GiB regions: a leaf and a level-2 table each.
        let round = |t: &mut IoPageTable<Vtd>, mem: &mut Frames, first: u64| {
            for i in first..first + 5 {
                let b = Bfn(i * 0x4_0000 + 7);
                t.map(mem, b, Mfn(0x100 + i), rw, wb).unwrap();
                t.unmap(mem, b).unwrap();
            }
        };
        round(&mut t, &mut mem, 1);
        assert_eq!(t.freed_frames(&mem), 10);
        t.flush_came(&mut mem);
        assert_eq!((t.freed_frames(&mem), t.flushed_frames(&mem)), (0, 10));
        let mut budget = 3;
        assert!(t.free_flushed(&mut mem, &mut budget), "seven left");
        assert_eq!((budget, mem.free.len(), t.flushed_frames(&mem)), (0, 3, 7));
        // More emptied, not yet flushed: none of them goes.
        round(&mut t, &mut mem, 6);
        let mut budget = 100;
        assert!(!t.free_flushed(&mut mem, &mut budget));
        assert_eq!((budget, t.freed_frames(&mem)), (93, 10));
        // Their flush: joined on to what is left (nothing), then all go.
        round(&mut t, &mut mem, 11);
        t.flush_came(&mut mem);
        let mut budget = 5;
        t.free_flushed(&mut mem, &mut budget);
        round(&mut t, &mut mem, 16);
        t.flush_came(&mut mem);
        assert_eq!(t.flushed_frames(&mem), 25, "two lists joined");
        let free = mem.free.len();
        let mut budget = usize::MAX;
        assert!(!t.free_flushed(&mut mem, &mut budget));
        assert_eq!(mem.free.len() - free, 25);
        t.destroy(&mut mem);
        assert_eq!(mem.free.len(), mem.tables.len() - 1);
    }

    /// Were a present count ever wrong, an emptied table could keep an
    /// entry: recycled, it would map that page at a new BFN. A kept frame
    /// that does not read clear goes back to the host instead.
    #[test]
    fn a_kept_table_that_is_not_clear_is_never_reused() {
        let mut mem = frames();
        let options = three_levels(/* recycle: */ true);
        let mut t = IoPageTable::<Vtd>::with_options(&mut mem, options).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        t.map(&mut mem, Bfn(0x4_0001), Mfn(0x100), rw, wb).unwrap();
        t.unmap(&mut mem, Bfn(0x4_0001)).unwrap();
        t.release_freed(&mut mem);
        assert_eq!(t.recycled_frames(), 2);
        // A stray entry in the frame reused first (what a wrong count
        // would leave).
        let stray = t.recycled[1];
        let raw = Vtd::leaf_entry(Mfn(0x666), rw, wb, 1);
        mem.tables[stray.0 as usize][7] = raw;
        let allocs = mem.allocs;
        t.map(&mut mem, Bfn(0x8_0000), Mfn(0x200), rw, wb).unwrap();
        assert_eq!((mem.reuses, mem.allocs - allocs), (1, 1));
        assert_eq!(t.translate(&mem, Bfn(0x8_0000)), Some((Mfn(0x200), rw, wb)));
        // No table in the tree holds the stray entry.
        let mut tables = vec![t.root()];
        let mut entries = 0;
        while let Some(f) = tables.pop() {
            for (i, &e) in mem.tables[f.0 as usize].iter().enumerate() {
                assert_ne!(e, raw, "table {f:?} entry {i} is the stray entry");
                let e = e & !COUNT_MASK;
                if e & 3 != 0 {
                    entries += 1;
                    if e != Vtd::leaf_entry(Mfn(0x200), rw, wb, 1) {
                        tables.push(Mfn((e & 0x000f_ffff_ffff_f000) >> 12));
                    }
                }
            }
        }
        assert_eq!(entries, 4, "root, pinned, level-2 and leaf entries");
    }

    #[test]
    fn emptied_tables_are_reused_after_the_flush_up_to_the_bound_vtd() {
        emptied_tables_are_reused_after_the_flush_up_to_the_bound::<Vtd>();
    }

    #[test]
    fn emptied_tables_are_reused_after_the_flush_up_to_the_bound_lpae() {
        emptied_tables_are_reused_after_the_flush_up_to_the_bound::<Lpae>();
    }

    /// The walker's cached leaf table (runs of consecutive BFNs skip the
    /// walk above it) must never outlive the table: emptied by an unmap,
    /// freed after the flush, and the region mapped again.
    #[test]
    fn the_cached_leaf_table_is_dropped_when_the_table_is_freed() {
        let mut mem = frames();
        let options = three_levels(/* recycle: */ false);
        let mut t = IoPageTable::<Vtd>::with_options(&mut mem, options).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        for i in 0..3 {
            t.map(&mut mem, Bfn(0x400 + i), Mfn(0x900 + i), rw, wb)
                .unwrap();
        }
        for i in 0..3 {
            t.unmap(&mut mem, Bfn(0x400 + i)).unwrap();
        }
        assert_eq!(t.unmap(&mut mem, Bfn(0x401)), Err(Errno::NoEnt));
        assert!(t.freed_frames(&mem) >= 1);
        t.release_freed(&mut mem); // the flush came: the frames are gone
                                   // Same region again: a new leaf table (Frames refuses the old one).
        t.map(&mut mem, Bfn(0x405), Mfn(0x777), rw, wb).unwrap();
        assert_eq!(t.translate(&mem, Bfn(0x405)), Some((Mfn(0x777), rw, wb)));
        assert_eq!(
            walk::<Vtd>(&mem, t.root(), Bfn(0x405)).map(|x| x.0),
            Some(Mfn(0x777))
        );
        // A run across two regions, unmapped in the other order.
        for i in 0..600 {
            t.map(&mut mem, Bfn(0x1000 + i), Mfn(0x2000 + i), rw, wb)
                .unwrap();
        }
        assert_eq!(
            t.map(&mut mem, Bfn(0x1001), Mfn(1), rw, wb),
            Err(Errno::Inval)
        );
        for i in (0..600).rev() {
            t.unmap(&mut mem, Bfn(0x1000 + i)).unwrap();
            assert_eq!(t.translate(&mem, Bfn(0x1000 + i)), None);
            if i > 0 {
                assert_eq!(
                    walk::<Vtd>(&mem, t.root(), Bfn(0x1000 + i - 1)).map(|x| x.0),
                    Some(Mfn(0x2000 + i - 1))
                );
            }
        }
        t.release_freed(&mut mem);
        t.map(&mut mem, Bfn(0x1000), Mfn(5), rw, wb).unwrap();
        assert_eq!(
            walk::<Vtd>(&mem, t.root(), Bfn(0x1000)).map(|x| x.0),
            Some(Mfn(5))
        );
    }

    /// The map that fills a leaf table folds it whether it reached the
    /// table through the cached leaf or through a walk (the cache then on
    /// another region): the fold reads the leaf's parent from the cache,
    /// where the walk leaves it, not from the route the map took.
    #[test]
    fn a_leaf_table_filled_through_a_walk_or_the_cache_folds() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        for last_by_walk in [false, true] {
            let mut mem = frames();
            let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
            for i in 0..ENTRIES as u64 - 1 {
                t.map(&mut mem, Bfn(0x200 + i), Mfn(0x400 + i), rw, wb)
                    .unwrap();
            }
            if last_by_walk {
                // Another region's leaf table takes the cache.
                t.map(&mut mem, Bfn(0x600), Mfn(0x999), rw, wb).unwrap();
                assert!(t.cached_leaf(Bfn(0x3ff)).is_none());
            } else {
                assert!(t.cached_leaf(Bfn(0x3ff)).is_some());
            }
            t.map(&mut mem, Bfn(0x3ff), Mfn(0x5ff), rw, wb).unwrap();
            assert_eq!(t.folded_frames(), 1, "walk {last_by_walk}");
            assert_eq!(
                t.leaf(&mem, Bfn(0x201)).map(|l| l.0),
                Some(SUPERPAGE_LEVEL),
                "walk {last_by_walk}"
            );
            assert_eq!(t.translate(&mem, Bfn(0x3ff)), Some((Mfn(0x5ff), rw, wb)));
        }
    }

    /// A leaf table folded into a superpage is no leaf table any more: a map
    /// into the region finds the superpage, not the (zeroed) spare frame.
    #[test]
    fn the_cached_leaf_table_is_dropped_when_it_folds_into_a_superpage() {
        let mut mem = frames();
        let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        map_foldable_run(&mut t, &mut mem);
        assert_eq!((t.folded_frames(), t.spare_frames(&mem)), (1, 0), "folded");
        assert_eq!(t.leaf(&mem, Bfn(0x201)).map(|l| l.0), Some(SUPERPAGE_LEVEL));
        assert_eq!(
            t.map(&mut mem, Bfn(0x203), Mfn(1), rw, wb),
            Err(Errno::Inval)
        );
        assert_eq!(t.translate(&mem, Bfn(0x203)), Some((Mfn(0x403), rw, wb)));
        // Unmapping one page splits it; the rest stays.
        t.unmap(&mut mem, Bfn(0x203)).unwrap();
        for i in 0..ENTRIES as u64 {
            let want = (i != 3).then_some(Mfn(0x400 + i));
            assert_eq!(
                walk::<Vtd>(&mem, t.root(), Bfn(0x200 + i)).map(|x| x.0),
                want
            );
        }
        // (Split before any flush: the folded table itself went back.)
        assert_eq!((t.folded_frames(), t.spare_frames(&mem)), (0, 0));
    }

    /// A leaf table folded into a superpage is left whole until the flush
    /// (the IOMMU may still walk it through its paging-structure caches,
    /// and must find the same translations there); a split before the flush
    /// links that very table back, with nothing in it rewritten; after the
    /// flush it is a spare, zeroed, which a later split takes. Before, the
    /// fold zeroed it at once and a split refilled it as the spare.
    #[test]
    fn a_folded_leaf_table_stays_whole_until_the_flush() {
        let mut mem = frames();
        let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let leaf_of = |t: &IoPageTable<Vtd>, mem: &Frames| {
            let mut table = t.root();
            for level in (2..=LEVELS).rev() {
                match Vtd::decode(mem.read_entry(table, index(Bfn(0x200), level)), level) {
                    Entry::Table(n) => table = n,
                    _ => return None,
                }
            }
            Some(table)
        };
        for i in 0..ENTRIES as u64 - 1 {
            t.map(&mut mem, Bfn(0x200 + i), Mfn(0x400 + i), rw, wb)
                .unwrap();
        }
        let leaf = leaf_of(&t, &mem).unwrap();
        let before: Vec<u64> = (0..ENTRIES).map(|i| mem.read_entry(leaf, i)).collect();
        t.map(&mut mem, Bfn(0x3ff), Mfn(0x5ff), rw, wb).unwrap();
        let whole: Vec<u64> = (0..ENTRIES).map(|i| mem.read_entry(leaf, i)).collect();
        assert_eq!(leaf_of(&t, &mem), None, "folded");
        assert_eq!(&whole[..ENTRIES - 1], &before[..ENTRIES - 1], "left whole");
        assert_ne!(whole[ENTRIES - 1], 0);
        // A split before the flush: the same table, linked back.
        t.unmap(&mut mem, Bfn(0x210)).unwrap();
        assert_eq!(leaf_of(&t, &mem), Some(leaf));
        assert_eq!(t.translate(&mem, Bfn(0x211)), Some((Mfn(0x411), rw, wb)));
        // Folded again, then flushed: the table becomes a zeroed spare.
        t.map(&mut mem, Bfn(0x210), Mfn(0x410), rw, wb).unwrap();
        assert_eq!((t.folded_frames(), t.spare_frames(&mem)), (1, 0));
        t.release_freed(&mut mem);
        assert_eq!((t.folded_frames(), t.spare_frames(&mem)), (0, 1));
        assert!((1..ENTRIES).all(|i| mem.read_entry(leaf, i) == 0));
        // A split after the flush takes the spare.
        t.unmap(&mut mem, Bfn(0x220)).unwrap();
        assert_eq!(t.spare_frames(&mem), 0);
        assert_eq!(t.translate(&mem, Bfn(0x3ff)), Some((Mfn(0x5ff), rw, wb)));
        assert_eq!(t.translate(&mem, Bfn(0x220)), None);
    }

    /// A split makes a table that maps pages a device may be using: every
    /// store into it is written back before the entry that links it (Xen's
    /// own split does `iommu_sync_cache` first), whether the table is the
    /// one folded before the flush or a spare after it.
    #[test]
    fn a_split_writes_its_table_back_before_linking_it() {
        for flush_between in [false, true] {
            let mut mem = frames();
            let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
            map_foldable_run(&mut t, &mut mem);
            if flush_between {
                t.release_freed(&mut mem);
            }
            // The level-2 table the superpage sits in.
            let mut parent = t.root();
            for level in [4, 3] {
                match Vtd::decode(mem.read_entry(parent, index(Bfn(0x200), level)), level) {
                    Entry::Table(n) => parent = n,
                    other => panic!("{other:?}"),
                }
            }
            mem.events.clear();
            t.unmap(&mut mem, Bfn(0x210)).unwrap();
            let Entry::Table(leaf) = Vtd::decode(mem.read_entry(parent, index(Bfn(0x200), 2)), 2)
            else {
                panic!("not split");
            };
            let at = |e: (u8, u64)| mem.events.iter().position(|x| *x == e);
            let linked = at((b'w', parent.0)).expect("the parent entry was written");
            let written_back = at((b'b', leaf.0)).expect("the table was written back");
            let last_fill = mem
                .events
                .iter()
                .take(linked)
                .rposition(|x| *x == (b'w', leaf.0));
            assert!(written_back < linked, "flush_between {flush_between}");
            assert!(last_fill.is_none_or(|w| w < written_back));
        }
    }

    /// A spare the host will not let the engine write (an engine bug) is
    /// never linked by a split: the unmap fails, the superpage stays.
    #[test]
    fn a_split_never_links_a_table_it_could_not_fill() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let mut mem = frames();
        let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
        map_foldable_run(&mut t, &mut mem);
        t.release_freed(&mut mem);
        assert_eq!(t.spare_frames(&mem), 1);
        mem.refused = t.spares.map(|m| m.0);
        assert_eq!(t.unmap(&mut mem, Bfn(0x210)), Err(Errno::NoMem));
        assert_eq!(t.leaf(&mem, Bfn(0x210)).map(|l| l.0), Some(SUPERPAGE_LEVEL));
        assert_eq!(t.translate(&mem, Bfn(0x210)), Some((Mfn(0x410), rw, wb)));
    }

    /// Xen's own tables (no spares): a folded table is freed after the
    /// flush, a split allocates, and a table it allocated but could not
    /// fill goes back rather than leak. Before, that table was kept by no
    /// one.
    #[test]
    fn a_split_gives_back_a_new_table_it_could_not_fill() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let mut mem = frames();
        let mut t = IoPageTable::<Vtd>::with_options(&mut mem, TableOptions::xen_own()).unwrap();
        map_foldable_run(&mut t, &mut mem);
        t.release_freed(&mut mem);
        assert_eq!(t.spare_frames(&mem), 0, "no spare kept");
        // The folded table, freed, is the frame the split will get.
        let next = *mem.free.last().unwrap();
        mem.refused = Some(next);
        let events = mem.events.len();
        assert_eq!(t.unmap(&mut mem, Bfn(0x210)), Err(Errno::NoMem));
        assert!(mem.free.contains(&next), "given back");
        // Filled, then zeroed before it went back.
        let writes = mem.events[events..]
            .iter()
            .filter(|&&e| e == (b'w', next))
            .count();
        assert_eq!(writes, 2 * ENTRIES, "zeroed before it went back");
        assert_eq!(t.translate(&mem, Bfn(0x210)), Some((Mfn(0x410), rw, wb)));
        // With memory, the split takes a new table.
        mem.refused = None;
        let allocs = mem.allocs;
        t.unmap(&mut mem, Bfn(0x210)).unwrap();
        assert_eq!(mem.allocs, allocs + 1);
        assert_eq!(t.translate(&mem, Bfn(0x211)), Some((Mfn(0x411), rw, wb)));
    }

    fn engine_tables(mem: &mut Frames) -> IoPageTable<Vtd> {
        IoPageTable::<Vtd>::with_options(mem, TableOptions::engine_context(4)).unwrap()
    }

    /// As below, after a fold and a split: a full leaf table folds into a
    /// superpage, a page unmapped out of it splits it (from the spare, or
    /// the folded table taken back), more pages go through the cache, and
    /// flushes come between; then a run is unmapped through the cache on
    /// one table and page by page on the other. The two agree in what they
    /// translate, their freed and spare tables, and, remapped whole, in
    /// every map's answer and their superpages (so the counts agree too).
    /// Both formats, 3 and 4 levels (a review of 2026-12-05).
    fn a_run_after_a_fold_and_a_split_unmaps_as_page_by_page<F: PageTableFormat>(levels: u32) {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let base = 0x400u64;
        let mut x = 5u64;
        for case in 0..300u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (mut ma, mut mb) = (frames(), frames());
            let options = TableOptions::engine_context(levels);
            let mut a = IoPageTable::<F>::with_options(&mut ma, options).unwrap();
            let mut b = IoPageTable::<F>::with_options(&mut mb, options).unwrap();
            let both = |a: &mut IoPageTable<F>,
                        ma: &mut Frames,
                        b: &mut IoPageTable<F>,
                        mb: &mut Frames,
                        bfn: u64| {
                let _ = a.unmap(ma, Bfn(bfn));
                let _ = b.unmap(mb, Bfn(bfn));
            };
            for i in 0..512u64 {
                a.map(&mut ma, Bfn(base + i), Mfn(0x1000 + i), rw, wb)
                    .unwrap();
                b.map(&mut mb, Bfn(base + i), Mfn(0x1000 + i), rw, wb)
                    .unwrap();
            }
            assert_eq!(a.superpage_count(), 1, "case {case}: folded");
            if case.is_multiple_of(3) {
                a.release_freed(&mut ma);
                b.release_freed(&mut mb);
            }
            both(&mut a, &mut ma, &mut b, &mut mb, base + (x >> 7) % 512);
            for k in 0..(x >> 30) % 40 {
                let page = base + (x.rotate_left(k as u32) >> 3) % 512;
                both(&mut a, &mut ma, &mut b, &mut mb, page);
            }
            if case.is_multiple_of(5) {
                a.release_freed(&mut ma);
                b.release_freed(&mut mb);
            }
            let first = base + (x >> 20) % 512;
            let count = match case % 4 {
                1 => base + 512 - first,
                _ => 1 + (x >> 40) % (base + 512 - first),
            };
            let done = a.unmap_in_cached_leaf(&mut ma, Bfn(first), count);
            for page in first + done..first + count {
                let _ = a.unmap(&mut ma, Bfn(page));
            }
            for page in first..first + count {
                let _ = b.unmap(&mut mb, Bfn(page));
            }
            for bfn in 0..0x1000u64 {
                assert_eq!(
                    a.translate(&ma, Bfn(bfn)),
                    b.translate(&mb, Bfn(bfn)),
                    "case {case}: BFN {bfn:#x}"
                );
            }
            assert_eq!(a.freed_frames(&ma), b.freed_frames(&mb), "case {case}");
            assert_eq!(a.spare_frames(&ma), b.spare_frames(&mb), "case {case}");
            a.release_freed(&mut ma);
            b.release_freed(&mut mb);
            for i in 0..512u64 {
                let ra = a.map(&mut ma, Bfn(base + i), Mfn(0x1000 + i), rw, wb);
                let rb = b.map(&mut mb, Bfn(base + i), Mfn(0x1000 + i), rw, wb);
                assert_eq!(ra, rb, "case {case}: remap of {:#x}", base + i);
            }
            assert_eq!(a.superpage_count(), b.superpage_count(), "case {case}");
        }
    }

    #[test]
    fn a_run_after_a_fold_and_a_split_unmaps_as_page_by_page_vtd() {
        a_run_after_a_fold_and_a_split_unmaps_as_page_by_page::<Vtd>(4);
        a_run_after_a_fold_and_a_split_unmaps_as_page_by_page::<Vtd>(3);
    }

    #[test]
    fn a_run_after_a_fold_and_a_split_unmaps_as_page_by_page_lpae() {
        a_run_after_a_fold_and_a_split_unmaps_as_page_by_page::<Lpae>(4);
        a_run_after_a_fold_and_a_split_unmaps_as_page_by_page::<Lpae>(3);
    }

    /// A run the cache cannot take whole does nothing: no pages, one past
    /// the tables' range, one whose count wraps, one that crosses into the
    /// next leaf table; one it can stops before the table's last entry.
    #[test]
    fn a_run_the_cached_leaf_cannot_take_does_nothing() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let mut m = frames();
        let mut t =
            IoPageTable::<Vtd>::with_options(&mut m, TableOptions::engine_context(3)).unwrap();
        let top = 1u64 << 27;
        t.map(&mut m, Bfn(top - 2), Mfn(5), rw, wb).unwrap();
        t.map(&mut m, Bfn(top - 3), Mfn(6), rw, wb).unwrap();
        assert_eq!(t.unmap_in_cached_leaf(&mut m, Bfn(top - 3), 0), 0);
        assert_eq!(t.unmap_in_cached_leaf(&mut m, Bfn(top - 1), 2), 0);
        assert_eq!(t.unmap_in_cached_leaf(&mut m, Bfn(u64::MAX), 2), 0);
        assert_eq!(t.unmap_in_cached_leaf(&mut m, Bfn(top - 600), 200), 0);
        // BFN top - 3 cleared; top - 2, the table's last entry, left.
        assert_eq!(t.unmap_in_cached_leaf(&mut m, Bfn(top - 3), 3), 1);
        assert!(t.translate(&m, Bfn(top - 3)).is_none());
        assert!(t.translate(&m, Bfn(top - 2)).is_some());
    }

    /// A run through the cached leaf table stores the table's count once,
    /// after its entries: that leaves the table's words (the count's bits
    /// in entry 0, as on Xen, included), its stores and the pages done as
    /// storing the count with each entry did (the form before). Over runs
    /// that start at entry 0 (the word that holds the count), stop before
    /// the table's last entry, or pass pages not mapped.
    #[test]
    fn a_run_stores_its_count_once_as_with_each_entry() {
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let leaf = 0x20000u64;
        let mut x = 7u64;
        let mut through = 0;
        for case in 0..300u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (mut ma, mut mb) = (frames(), frames());
            let mut a = engine_tables(&mut ma);
            let mut b = engine_tables(&mut mb);
            // Never all 512 (no fold); a few cases with one or two pages.
            let odds = [2, 3, 200][(case % 3) as usize];
            for i in 0..511u64 {
                if i == 0 || (x.rotate_left((i % 63) as u32) ^ i).is_multiple_of(odds) {
                    a.map(&mut ma, Bfn(leaf + i), Mfn(0x5000 + i), rw, wb)
                        .unwrap();
                    b.map(&mut mb, Bfn(leaf + i), Mfn(0x5000 + i), rw, wb)
                        .unwrap();
                }
            }
            let first = if case % 4 == 0 {
                leaf
            } else {
                leaf + (x >> 20) % 512
            };
            let count = 1 + (x >> 40) % (leaf + 512 - first);
            let mut table = b.root();
            for level in (2..=LEVELS).rev() {
                match Vtd::decode(mb.read_entry(table, index(Bfn(leaf), level)), level) {
                    Entry::Table(next) => table = next,
                    other => panic!("case {case}: {other:?} above the leaf"),
                }
            }
            let done = a.unmap_in_cached_leaf(&mut ma, Bfn(first), count);
            // The form before, on the same table of the other machine.
            let mut present = mb.present_count(table);
            let mut done_before = 0;
            for i in index(Bfn(first), 1)..index(Bfn(first + count - 1), 1) + 1 {
                if Vtd::decode(mb.read_entry(table, i), 1) != Entry::Empty {
                    if present <= 1 {
                        break;
                    }
                    present -= 1;
                    mb.write_entry_counted(table, i, 0, present);
                }
                done_before += 1;
            }
            assert_eq!(done, done_before, "case {case}");
            assert_eq!(
                ma.tables[table.0 as usize], mb.tables[table.0 as usize],
                "case {case}: {count} from {first:#x}"
            );
            assert_eq!(ma.events, mb.events, "case {case}");
            through += done;
        }
        assert!(through > 5_000, "{through} pages through the cache");
    }

    /// A run unmapped through the cached leaf table, the rest page by page
    /// (as a flush's clearing pass does), leaves the tables as unmapping
    /// every page did: the same translations, counts and freed tables,
    /// whichever pages of the leaf were mapped, whichever run was asked
    /// (one that empties the table, one the cache misses, one with pages
    /// not mapped). Tables compare by what they translate: the frames
    /// they are built from are allocated alike.
    #[test]
    fn a_run_unmapped_in_the_cached_leaf_is_the_same_as_page_by_page() {
        let rw = Permissions::RW;
        let wb = MemAttr::WriteBack;
        let mut x = 11u64;
        let (mut through_cache, mut emptied) = (0, 0);
        for case in 0..400u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Leaf 0x100 (BFNs 0x20000..0x201ff) and its neighbour, each
            // page mapped with chance 1/2 (1/8 for the neighbour).
            let leaf = 0x20000u64;
            let mapped: Vec<u64> = (0..1024u64)
                .filter(|&i| {
                    let odds = match (i < 512, case % 3) {
                        (true, 0) => 2,
                        (true, _) => 16,
                        (false, _) => 8,
                    };
                    (x.rotate_left((i % 61) as u32) ^ i.wrapping_mul(case + 3)).is_multiple_of(odds)
                })
                .map(|i| leaf + i)
                .collect();
            // A quarter of the runs cover the whole leaf (the table empties).
            let (first, count) = if case % 4 == 1 {
                (leaf, 512)
            } else {
                let first = leaf + (x >> 20) % 512;
                (first, 1 + (x >> 40) % (leaf + 512 - first))
            };
            let (mut ma, mut mb) = (frames(), frames());
            let mut a = engine_tables(&mut ma);
            let mut b = engine_tables(&mut mb);
            // The neighbour's first, so the cache ends on the leaf.
            for &bfn in mapped.iter().rev() {
                a.map(&mut ma, Bfn(bfn), Mfn(bfn + 7), rw, wb).unwrap();
                b.map(&mut mb, Bfn(bfn), Mfn(bfn + 7), rw, wb).unwrap();
            }
            // Half the cases with the cache on another leaf table.
            if case.is_multiple_of(2) {
                let probe = Bfn(leaf + 512 + 1000);
                a.map(&mut ma, probe, Mfn(9), rw, wb).unwrap();
                b.map(&mut mb, probe, Mfn(9), rw, wb).unwrap();
            }
            let done = a.unmap_in_cached_leaf(&mut ma, Bfn(first), count);
            assert!(done <= count, "case {case}");
            if case.is_multiple_of(2) {
                assert_eq!(done, 0, "case {case}: the cache is elsewhere");
            }
            through_cache += done;
            for p in first + done..first + count {
                match a.unmap(&mut ma, Bfn(p)) {
                    Ok(()) | Err(Errno::NoEnt) => {}
                    Err(e) => panic!("case {case}: {e:?}"),
                }
            }
            for p in first..first + count {
                match b.unmap(&mut mb, Bfn(p)) {
                    Ok(()) | Err(Errno::NoEnt) => {}
                    Err(e) => panic!("case {case}: {e:?}"),
                }
            }
            for bfn in leaf - 16..leaf + 1024 + 1024 {
                assert_eq!(
                    a.translate(&ma, Bfn(bfn)),
                    b.translate(&mb, Bfn(bfn)),
                    "case {case}: BFN {bfn:#x} after {count} from {first:#x}"
                );
            }
            assert_eq!(a.freed_frames(&ma), b.freed_frames(&mb), "case {case}");
            // The leaf table's count, where it is still linked.
            let count_of = |t: &IoPageTable<Vtd>, mem: &Frames| {
                let mut table = t.root();
                for level in (2..=LEVELS).rev() {
                    match Vtd::decode(mem.read_entry(table, index(Bfn(leaf), level)), level) {
                        Entry::Table(next) => table = next,
                        _ => return None,
                    }
                }
                Some(mem.present_count(table))
            };
            assert_eq!(count_of(&a, &ma), count_of(&b, &mb), "case {case}");
            emptied += u64::from(count_of(&b, &mb).is_none());
        }
        assert!(emptied > 10, "{emptied} cases emptied the leaf table");
        assert!(
            through_cache > 10_000,
            "{through_cache} pages through the cache"
        );
    }

    /// An aligned machine run mapped whole is one level-2 leaf, and the
    /// spare for its split is taken with it: a page unmapped out of it (a
    /// revocation) allocates nothing; unmapped whole it is one entry
    /// cleared, and its spare is kept for reuse.
    #[test]
    fn a_superpage_mapped_whole_is_one_entry_and_splits_without_memory() {
        let mut mem = frames();
        let mut t = engine_tables(&mut mem);
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let stores = mem.events.len();
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x200), Mfn(0x400), rw, wb),
            Ok(true)
        );
        assert_eq!(t.leaf(&mem, Bfn(0x3ff)).map(|l| l.0), Some(SUPERPAGE_LEVEL));
        assert_eq!(t.translate(&mem, Bfn(0x3ff)), Some((Mfn(0x5ff), rw, wb)));
        assert_eq!((t.superpage_count(), t.spare_frames(&mem)), (1, 1));
        // Two tables on the way, the spare's link, the leaf: no 512.
        assert!(
            mem.events.len() - stores < 12,
            "{:?}",
            &mem.events[stores..]
        );
        // Mapped already: refused, by page or whole.
        assert_eq!(
            t.map(&mut mem, Bfn(0x201), Mfn(1), rw, wb),
            Err(Errno::Inval)
        );
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x200), Mfn(0x400), rw, wb),
            Err(Errno::Inval)
        );
        // A page goes: split from the spare, nothing allocated.
        let allocs = mem.allocs;
        t.unmap(&mut mem, Bfn(0x210)).unwrap();
        assert_eq!(mem.allocs, allocs);
        assert_eq!((t.superpage_count(), t.spare_frames(&mem)), (0, 0));
        for i in 0..ENTRIES as u64 {
            let want = (i != 0x10).then_some((Mfn(0x400 + i), rw, wb));
            assert_eq!(t.translate(&mem, Bfn(0x200 + i)), want);
        }
        // Unmapped whole: one entry, and the spare kept for reuse.
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x400), Mfn(0x800), rw, wb),
            Ok(true)
        );
        assert_eq!((t.superpage_count(), t.spare_frames(&mem)), (1, 1));
        t.unmap_superpage(&mut mem, Bfn(0x400)).unwrap();
        assert_eq!(t.translate(&mem, Bfn(0x400)), None);
        assert_eq!((t.superpage_count(), t.spare_frames(&mem)), (0, 0));
        assert_eq!(t.recycled_frames(), 1);
    }

    /// Only where its split is free and its frames are on a 2 MiB
    /// boundary is a run mapped whole; elsewhere nothing changes and the
    /// caller maps it page by page.
    #[test]
    fn a_superpage_is_mapped_whole_only_where_it_can_be() {
        let mut mem = frames();
        let mut t = engine_tables(&mut mem);
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        let whole = |t: &mut IoPageTable<Vtd>, mem: &mut Frames, bfn: u64, mfn: u64| {
            t.map_superpage(mem, Bfn(bfn), Mfn(mfn), rw, wb)
        };
        assert_eq!(whole(&mut t, &mut mem, 0x200, 0x401), Ok(false));
        assert_eq!(whole(&mut t, &mut mem, 0x201, 0x400), Ok(false));
        t.map(&mut mem, Bfn(0x3ff), Mfn(7), rw, wb).unwrap();
        assert_eq!(
            whole(&mut t, &mut mem, 0x200, 0x400),
            Ok(false),
            "leaf table"
        );
        assert_eq!(t.translate(&mem, Bfn(0x200)), None);
        assert_eq!(t.translate(&mem, Bfn(0x3ff)), Some((Mfn(7), rw, wb)));
        assert_eq!(whole(&mut t, &mut mem, 1 << 36, 0x400), Err(Errno::Inval));
        // No access at all: an entry that would read as empty.
        let none = Permissions {
            read: false,
            write: false,
        };
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x400), Mfn(0x800), none, wb),
            Err(Errno::Inval)
        );
        assert_eq!(t.superpage_count(), 0);
        // No superpages (an SMMU without BBML), or splits that allocate
        // (Xen's own tables).
        let no_superpages = TableOptions {
            superpages: false,
            ..TableOptions::engine_context(4)
        };
        for options in [no_superpages, TableOptions::xen_own()] {
            let mut t = IoPageTable::<Vtd>::with_options(&mut mem, options).unwrap();
            assert_eq!(whole(&mut t, &mut mem, 0x200, 0x400), Ok(false));
            assert_eq!(t.translate(&mem, Bfn(0x200)), None);
            assert_eq!(t.spare_frames(&mem), 0);
        }
    }

    /// A superpage that folds and is then unmapped whole, flushed before or
    /// after, over and over, leaves no spare behind. Before, each cycle's
    /// folded table stayed a spare: a context's frames grew with every
    /// cycle until the context went.
    #[test]
    fn superpages_unmapped_whole_give_their_spares_back() {
        let mut mem = frames();
        let mut t = engine_tables(&mut mem);
        for cycle in 0..12u64 {
            map_foldable_run(&mut t, &mut mem);
            assert_eq!(t.superpage_count(), 1, "cycle {cycle}: folded");
            if cycle % 2 == 0 {
                t.release_freed(&mut mem);
            }
            t.unmap_superpage(&mut mem, Bfn(0x200)).unwrap();
            t.release_freed(&mut mem);
            assert_eq!(
                (t.superpage_count(), t.spare_frames(&mem)),
                (0, 0),
                "cycle {cycle}"
            );
            assert_eq!(
                whole_then_unmapped(&mut t, &mut mem),
                (0, 0),
                "cycle {cycle}"
            );
        }
        fn whole_then_unmapped(t: &mut IoPageTable<Vtd>, mem: &mut Frames) -> (usize, usize) {
            let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
            assert_eq!(
                t.map_superpage(mem, Bfn(0x200), Mfn(0x400), rw, wb),
                Ok(true)
            );
            t.unmap_superpage(mem, Bfn(0x200)).unwrap();
            t.release_freed(mem);
            (t.superpage_count(), t.spare_frames(mem))
        }
    }

    /// A superpage folded and unmapped whole before the flush leaves its
    /// table waiting, whole, for the flush; no split may take it, so a
    /// superpage mapped whole meanwhile takes a spare of its own and
    /// still splits without memory.
    #[test]
    fn a_folded_table_unmapped_whole_before_the_flush_stands_for_no_spare() {
        let mut mem = frames();
        let mut t = engine_tables(&mut mem);
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        map_foldable_run(&mut t, &mut mem);
        t.unmap_superpage(&mut mem, Bfn(0x200)).unwrap();
        assert_eq!((t.superpage_count(), t.folded_frames()), (0, 1));
        assert_eq!(
            t.map_superpage(&mut mem, Bfn(0x400), Mfn(0x800), rw, wb),
            Ok(true)
        );
        assert_eq!(t.spare_frames(&mem), 1);
        let allocs = mem.allocs;
        t.unmap(&mut mem, Bfn(0x401)).unwrap();
        assert_eq!(mem.allocs, allocs, "split from the spare");
        assert_eq!(t.translate(&mem, Bfn(0x402)), Some((Mfn(0x802), rw, wb)));
        // The flush: the folded table is a spare nothing is owed.
        t.release_freed(&mut mem);
        assert_eq!((t.folded_frames(), t.spare_frames(&mem)), (0, 0));
    }

    /// A folded table whose superpage went whole is zeroed after the
    /// flush and kept for reuse: written back after its last store, before
    /// it can hang anywhere again (a recycled table is linked as it is).
    #[test]
    fn a_spare_kept_for_reuse_is_written_back_first() {
        let mut mem = frames();
        let mut t = engine_tables(&mut mem);
        map_foldable_run(&mut t, &mut mem);
        let folded = t.folded[0].table;
        assert_eq!(t.folded_frames(), 1);
        t.unmap_superpage(&mut mem, Bfn(0x200)).unwrap();
        t.release_freed(&mut mem);
        assert!(t.recycled[..t.recycled_len].contains(&folded), "kept");
        let last = mem.events.iter().rev().find(|e| e.1 == folded.0);
        assert_eq!(last, Some(&(b'b', folded.0)), "kept dirty");
    }

    #[test]
    fn vtd_tables_waiting_for_the_flush_map_nothing() {
        freed_frames_read_as_empty::<Vtd>();
    }

    #[test]
    fn lpae_tables_waiting_for_the_flush_map_nothing() {
        freed_frames_read_as_empty::<Lpae>();
    }

    /// Map 1 GiB from BFN `GIGA` to frames from `mfn0` in tables shaped by
    /// `options`, the folded tables released ("flushed") after each 2 MiB
    /// but the last, as the simulator's host does at each call's flush.
    fn gigabyte_mapped<F: PageTableFormat>(
        mem: &mut Frames,
        options: TableOptions,
        mfn0: u64,
    ) -> IoPageTable<F> {
        let mut t = IoPageTable::<F>::with_options(mem, options).unwrap();
        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
        for i in 0..GIGA {
            t.map(mem, Bfn(GIGA + i), Mfn(mfn0 + i), rw, wb).unwrap();
            if i % ENTRIES as u64 == ENTRIES as u64 - 1 && i + 1 < GIGA {
                t.release_freed(mem);
            }
        }
        t
    }
    const GIGA: u64 = 1 << 18;

    fn xen_own_tables_fold_a_gigabyte_and_split_it_with_new_tables<F: PageTableFormat>() {
        let mut mem = frames();
        let xen = TableOptions::xen_own();
        let level = |t: &IoPageTable<F>, mem: &Frames, b: u64| t.leaf(mem, Bfn(b)).map(|l| l.0);
        // Xen folds every full table between two flushes (it queues each
        // for freeing, no limit): 512 leaf tables and the level-2 table.
        // (Frames of its own: the fresh pool's reads stay cheap below.)
        let mut mem0 = frames();
        let mut t = IoPageTable::<F>::with_options(&mut mem0, xen).unwrap();
        for i in 0..GIGA {
            let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
            t.map(&mut mem0, Bfn(GIGA + i), Mfn(3 * GIGA + i), rw, wb)
                .unwrap();
        }
        assert_eq!(level(&t, &mem0, GIGA), Some(3), "{}: no flush", F::NAME);
        assert_eq!(t.folded_frames(), ENTRIES + 1);
        let in_use = mem0.tables.len() - mem0.free.len();
        t.release_freed(&mut mem0);
        assert_eq!(t.folded_frames(), 0);
        assert_eq!(mem0.tables.len() - mem0.free.len(), in_use - ENTRIES - 1);
        // Each zeroed before it went (count bits included): they held
        // machine frame numbers.
        for f in &mem0.free {
            assert_eq!(
                mem0.tables[*f as usize], [0; ENTRIES],
                "frame {f} freed unzeroed"
            );
        }
        t.destroy(&mut mem0);
        let mut t = gigabyte_mapped::<F>(&mut mem, xen, 3 * GIGA);
        assert_eq!(
            level(&t, &mem, GIGA),
            Some(3),
            "{}: one 1 GiB entry",
            F::NAME
        );
        assert_eq!(t.superpage_count(), 0);
        // The last leaf table and the level-2 table, kept until the flush.
        assert_eq!(t.folded_frames(), 2);
        let in_use = mem.tables.len() - mem.free.len();
        t.release_freed(&mut mem);
        assert_eq!(t.folded_frames(), 0);
        assert_eq!(
            mem.tables.len() - mem.free.len(),
            in_use - 2,
            "freed after it"
        );
        for b in [0, 1, 511, 512, GIGA - 1] {
            assert_eq!(
                t.translate(&mem, Bfn(GIGA + b)).unwrap().0,
                Mfn(3 * GIGA + b)
            );
        }
        // A page goes: two new tables (the 1 GiB split into 2 MiB entries,
        // then its 2 MiB into pages), the translations around it unchanged.
        let allocs = mem.allocs;
        t.unmap(&mut mem, Bfn(GIGA + 5)).unwrap();
        assert_eq!(mem.allocs - allocs, 2);
        assert_eq!(t.translate(&mem, Bfn(GIGA + 5)), None);
        assert_eq!(level(&t, &mem, GIGA + 6), Some(1));
        assert_eq!(level(&t, &mem, GIGA + 512), Some(2));
        assert_eq!(t.superpage_count(), ENTRIES - 1);
        for b in [4, 6, 512, GIGA - 1] {
            assert_eq!(
                t.translate(&mem, Bfn(GIGA + b)).unwrap().0,
                Mfn(3 * GIGA + b)
            );
        }
        t.destroy(&mut mem);
        // An order-9 unmap of a 2 MiB of a 1 GiB entry: the entry split
        // (one table), the 2 MiB cleared, nothing split below it.
        let mut t = gigabyte_mapped::<F>(&mut mem, xen, 3 * GIGA);
        t.release_freed(&mut mem);
        let allocs = mem.allocs;
        t.unmap_superpage(&mut mem, Bfn(GIGA + 1024)).unwrap();
        assert_eq!(mem.allocs - allocs, 1);
        assert_eq!(level(&t, &mem, GIGA + 1024), None);
        assert_eq!(level(&t, &mem, GIGA + 1536), Some(2));
        t.destroy(&mut mem);
        // One 2 MiB of another access among them: no 1 GiB entry.
        let mut t = IoPageTable::<F>::with_options(&mut mem, xen).unwrap();
        for i in 0..GIGA {
            let perms = if i >> 9 == 7 {
                Permissions::RO
            } else {
                Permissions::RW
            };
            t.map(
                &mut mem,
                Bfn(GIGA + i),
                Mfn(3 * GIGA + i),
                perms,
                MemAttr::WriteBack,
            )
            .unwrap();
            if i % ENTRIES as u64 == ENTRIES as u64 - 1 {
                t.release_freed(&mut mem);
            }
        }
        assert_eq!(level(&t, &mem, GIGA), Some(2), "{}: mixed access", F::NAME);
        t.destroy(&mut mem);
        // Only Xen's own tables as modelled fold to 1 GiB.
        for refused in [
            TableOptions {
                gigapages: true,
                ..TableOptions::engine_context(4)
            },
            TableOptions { levels: 3, ..xen },
            TableOptions {
                superpages: false,
                ..xen
            },
        ] {
            assert!(matches!(
                IoPageTable::<F>::with_options(&mut mem, refused),
                Err(Errno::Inval)
            ));
        }
        // A frame run off a 1 GiB boundary stays in 2 MiB entries.
        let t = gigabyte_mapped::<F>(&mut mem, xen, 3 * GIGA + 512);
        assert_eq!(
            level(&t, &mem, GIGA),
            Some(2),
            "{}: off a boundary",
            F::NAME
        );
        t.destroy(&mut mem);
        // The engine's own contexts fold no further than 2 MiB.
        let t = gigabyte_mapped::<F>(&mut mem, TableOptions::engine_context(4), 3 * GIGA);
        assert_eq!(
            level(&t, &mem, GIGA),
            Some(2),
            "{}: engine context",
            F::NAME
        );
        t.destroy(&mut mem);
    }

    #[test]
    fn vtd_xen_own_tables_fold_a_gigabyte_and_split_it_with_new_tables() {
        xen_own_tables_fold_a_gigabyte_and_split_it_with_new_tables::<Vtd>();
    }

    #[test]
    fn lpae_xen_own_tables_fold_a_gigabyte_and_split_it_with_new_tables() {
        xen_own_tables_fold_a_gigabyte_and_split_it_with_new_tables::<Lpae>();
    }
}
