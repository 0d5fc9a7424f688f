//! IOMMU page-table formats, kept apart from the code that uses them (as
//! Linux's io-pgtable keeps formats apart from IOMMU drivers).
//!
//! A [`PageTableFormat`] says how entries are encoded; [`IoPageTable`] is the
//! one walker that writes them: 4 levels of 512 64-bit entries, 4 KiB leaves,
//! 2 MiB superpages made when a full, contiguous, aligned leaf table appears,
//! split again on a partial unmap, and empty tables freed on unmap. Tables
//! live in frames provided by a [`TableMemory`].

pub mod lpae;
pub mod vtd;

use crate::{Bfn, Errno, MemAttr, Mfn, Permissions};

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Levels of the walk; level 1 holds 4 KiB leaves, level 2 superpages.
pub const LEVELS: u32 = 4;
/// The level at which 2 MiB superpages live.
pub const SUPERPAGE_LEVEL: u32 = 2;

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
    /// Encode a pointer to a next-level table.
    fn table_entry(table: Mfn) -> u64;
    /// Encode a leaf at `level` (1: 4 KiB page, 2: 2 MiB superpage).
    fn leaf_entry(mfn: Mfn, perms: Permissions, attr: MemAttr, level: u32) -> u64;
    /// Decode an entry found at `level`.
    fn decode(raw: u64, level: u32) -> Entry;
}

/// Frames holding page tables, and the software bookkeeping the hardware
/// format has no room for (a count of present entries per table).
pub trait TableMemory {
    /// A zeroed frame for a new table.
    fn alloc_table(&mut self) -> Result<Mfn, Errno>;
    /// Give back a table frame.
    fn free_table(&mut self, table: Mfn);
    /// Read entry `index` of `table`.
    fn read_entry(&self, table: Mfn, index: usize) -> u64;
    /// Write entry `index` of `table` (the one place a PTE is stored).
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64);
    /// Present entries in `table`.
    fn present_count(&self, table: Mfn) -> u16;
    /// Set the present-entry count of `table`.
    fn set_present_count(&mut self, table: Mfn, count: u16);
}

/// Index of `bfn` in a table at `level`.
pub const fn index(bfn: Bfn, level: u32) -> usize {
    ((bfn.0 >> (9 * (level - 1))) & 0x1ff) as usize
}

/// One translation context: a root table and its format.
///
/// Unmapping never needs memory: every superpage made by folding a full
/// leaf table keeps that table's frame on a spare list, and splitting a
/// superpage takes its frame back from there. (Xen's own VT-d code can fail
/// an unmap with `-ENOMEM` at exactly this point; the engine copes with that
/// too, but its own tables never do it.)
pub struct IoPageTable<F: PageTableFormat> {
    root: Mfn,
    /// Spare table frames, one per superpage; entry 0 of each holds the
    /// next spare's frame + 1 (0 ends the list).
    spares: Option<Mfn>,
    _format: core::marker::PhantomData<F>,
}

impl<F: PageTableFormat> IoPageTable<F> {
    /// A new, empty context.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, Errno> {
        Ok(IoPageTable {
            root: mem.alloc_table()?,
            spares: None,
            _format: core::marker::PhantomData,
        })
    }

    /// The root table frame (what a context entry points at).
    pub fn root(&self) -> Mfn {
        self.root
    }

    /// Map `bfn` -> `mfn`. `Err(Inval)` if already mapped; on any error the
    /// tables are as before (a table allocated on the way stays, empty).
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        bfn: Bfn,
        mfn: Mfn,
        perms: Permissions,
        attr: MemAttr,
    ) -> Result<(), Errno> {
        if bfn.0 >> (9 * LEVELS) != 0 {
            return Err(Errno::Inval);
        }
        let mut table = self.root;
        let mut parent = None;
        for level in (2..=LEVELS).rev() {
            let idx = index(bfn, level);
            let next = match F::decode(mem.read_entry(table, idx), level) {
                Entry::Table(t) => t,
                Entry::Empty => {
                    let t = mem.alloc_table()?;
                    mem.write_entry(table, idx, F::table_entry(t));
                    mem.set_present_count(table, mem.present_count(table) + 1);
                    t
                }
                Entry::Leaf { .. } => return Err(Errno::Inval),
            };
            parent = Some((table, idx));
            table = next;
        }
        let idx = index(bfn, 1);
        if F::decode(mem.read_entry(table, idx), 1) != Entry::Empty {
            return Err(Errno::Inval);
        }
        mem.write_entry(table, idx, F::leaf_entry(mfn, perms, attr, 1));
        let count = mem.present_count(table) + 1;
        mem.set_present_count(table, count);
        // A leaf table that just became full may fold into a superpage.
        if count as usize == ENTRIES {
            if let Some((pt, pidx)) = parent {
                self.try_promote(mem, pt, pidx, table);
            }
        }
        Ok(())
    }

    fn try_promote(
        &mut self,
        mem: &mut impl TableMemory,
        parent: Mfn,
        pidx: usize,
        leaf_table: Mfn,
    ) {
        let (first_mfn, perms, attr) = match F::decode(mem.read_entry(leaf_table, 0), 1) {
            Entry::Leaf { mfn, perms, attr } => (mfn, perms, attr),
            _ => return,
        };
        if first_mfn.0 % ENTRIES as u64 != 0 {
            return;
        }
        for i in 1..ENTRIES {
            let want = F::leaf_entry(Mfn(first_mfn.0 + i as u64), perms, attr, 1);
            if mem.read_entry(leaf_table, i) != want {
                return;
            }
        }
        mem.write_entry(
            parent,
            pidx,
            F::leaf_entry(first_mfn, perms, attr, SUPERPAGE_LEVEL),
        );
        // Keep the frame for the split that may follow.
        for i in 1..ENTRIES {
            mem.write_entry(leaf_table, i, 0);
        }
        mem.write_entry(leaf_table, 0, self.spares.map_or(0, |m| m.0 + 1));
        mem.set_present_count(leaf_table, 0);
        self.spares = Some(leaf_table);
    }

    fn take_spare(&mut self, mem: &mut impl TableMemory) -> Option<Mfn> {
        let t = self.spares?;
        let next = mem.read_entry(t, 0);
        self.spares = next.checked_sub(1).map(Mfn);
        mem.write_entry(t, 0, 0);
        Some(t)
    }

    /// Spare frames held for splits (one per superpage ever folded and not
    /// yet split).
    pub fn spare_frames(&self, mem: &impl TableMemory) -> usize {
        let mut n = 0;
        let mut at = self.spares;
        while let Some(t) = at {
            n += 1;
            at = mem.read_entry(t, 0).checked_sub(1).map(Mfn);
        }
        n
    }

    /// Unmap `bfn`. `Err(NoEnt)` if it is not mapped; `Err(NoMem)` if a
    /// superpage had to be split and no table frame was available (nothing
    /// changed then).
    pub fn unmap(&mut self, mem: &mut impl TableMemory, bfn: Bfn) -> Result<(), Errno> {
        if bfn.0 >> (9 * LEVELS) != 0 {
            return Err(Errno::NoEnt);
        }
        // Path of (table, index) from the root down to the leaf table.
        let mut path = [(Mfn(0), 0usize); LEVELS as usize];
        let mut table = self.root;
        for level in (1..=LEVELS).rev() {
            let idx = index(bfn, level);
            path[(level - 1) as usize] = (table, idx);
            if level == 1 {
                break;
            }
            match F::decode(mem.read_entry(table, idx), level) {
                Entry::Table(t) => table = t,
                Entry::Empty => return Err(Errno::NoEnt),
                Entry::Leaf { mfn, perms, attr } if level == SUPERPAGE_LEVEL => {
                    table = self.split(mem, table, idx, mfn, perms, attr)?;
                }
                Entry::Leaf { .. } => return Err(Errno::NoEnt),
            }
        }
        let (leaf_table, idx) = path[0];
        if F::decode(mem.read_entry(leaf_table, idx), 1) == Entry::Empty {
            return Err(Errno::NoEnt);
        }
        mem.write_entry(leaf_table, idx, 0);
        // Clear upward while tables become empty; the root always stays.
        for level in 1..LEVELS {
            let (t, _) = path[(level - 1) as usize];
            let count = mem.present_count(t).saturating_sub(1);
            mem.set_present_count(t, count);
            if count != 0 {
                return Ok(());
            }
            let (pt, pidx) = path[level as usize];
            mem.write_entry(pt, pidx, 0);
            mem.free_table(t);
        }
        let root = self.root;
        mem.set_present_count(root, mem.present_count(root).saturating_sub(1));
        Ok(())
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
        let t = match self.take_spare(mem) {
            Some(t) => t,
            None => mem.alloc_table()?,
        };
        for i in 0..ENTRIES {
            mem.write_entry(t, i, F::leaf_entry(Mfn(mfn.0 + i as u64), perms, attr, 1));
        }
        mem.set_present_count(t, ENTRIES as u16);
        mem.write_entry(parent, pidx, F::table_entry(t));
        Ok(t)
    }

    /// Software walk: what the tables say about `bfn` (the simulated
    /// hardware has its own, independent walker).
    pub fn translate(
        &self,
        mem: &impl TableMemory,
        bfn: Bfn,
    ) -> Option<(Mfn, Permissions, MemAttr)> {
        let mut table = self.root;
        for level in (1..=LEVELS).rev() {
            match F::decode(mem.read_entry(table, index(bfn, level)), level) {
                Entry::Table(t) if level > 1 => table = t,
                Entry::Leaf { mfn, perms, attr } => {
                    let offset = bfn.0 & ((1u64 << (9 * (level - 1))) - 1);
                    return Some((Mfn(mfn.0 + offset), perms, attr));
                }
                _ => return None,
            }
        }
        None
    }

    /// Free every table, the root included (the context goes away).
    pub fn destroy(mut self, mem: &mut impl TableMemory) {
        while let Some(t) = self.take_spare(mem) {
            mem.free_table(t);
        }
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
        mem.free_table(table);
    }
}
