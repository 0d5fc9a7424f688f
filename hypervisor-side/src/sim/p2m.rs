//! A simulated domain's p2m: gfn -> what backs it. The RAM a domain is
//! created with (gfns `0..ram_pages`) sits in a flat table indexed by gfn,
//! as Xen's p2m is a page table walked in constant time; anything above
//! (grant, MMIO and Xen frames placed high, hot-added pages) in an ordered
//! map. Iteration is in gfn order either way.

use std::collections::BTreeMap;

use crate::Gfn;

/// A p2m with entries of type `E`.
#[derive(Debug)]
pub(super) struct P2m<E> {
    /// Gfns `0..dense.len()`.
    dense: Vec<Option<E>>,
    /// Gfns from `dense.len()` up.
    sparse: BTreeMap<Gfn, E>,
}

impl<E: Copy> P2m<E> {
    /// An empty p2m whose gfns `0..dense` are kept in the flat table.
    pub(super) fn with_dense(dense: u64) -> Self {
        P2m {
            dense: vec![None; dense as usize],
            sparse: BTreeMap::new(),
        }
    }

    fn dense_index(&self, gfn: Gfn) -> Option<usize> {
        usize::try_from(gfn.0)
            .ok()
            .filter(|&i| i < self.dense.len())
    }

    /// The flat table's entry of `gfn`, `None` for a gfn past it (which
    /// [`get`](Self::get) finds in the ordered map): a run's loop matches
    /// the entry it wants in one test of the slot.
    #[inline]
    pub(super) fn dense_slot(&self, gfn: Gfn) -> Option<&Option<E>> {
        self.dense.get(usize::try_from(gfn.0).ok()?)
    }

    pub(super) fn get(&self, gfn: &Gfn) -> Option<&E> {
        match self.dense_index(*gfn) {
            Some(i) => self.dense[i].as_ref(),
            None => self.sparse.get(gfn),
        }
    }

    pub(super) fn get_mut(&mut self, gfn: &Gfn) -> Option<&mut E> {
        match self.dense_index(*gfn) {
            Some(i) => self.dense[i].as_mut(),
            None => self.sparse.get_mut(gfn),
        }
    }

    /// Set `gfn`'s entry; the one it replaces.
    pub(super) fn insert(&mut self, gfn: Gfn, entry: E) -> Option<E> {
        match self.dense_index(gfn) {
            Some(i) => self.dense[i].replace(entry),
            None => self.sparse.insert(gfn, entry),
        }
    }

    /// Clear `gfn`'s entry; the one it had.
    pub(super) fn remove(&mut self, gfn: &Gfn) -> Option<E> {
        match self.dense_index(*gfn) {
            Some(i) => self.dense[i].take(),
            None => self.sparse.remove(gfn),
        }
    }

    /// Every entry, in gfn order.
    pub(super) fn values(&self) -> impl Iterator<Item = &E> + '_ {
        self.dense.iter().flatten().chain(self.sparse.values())
    }

    /// Every (gfn, entry), in gfn order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Gfn, &E)> + '_ {
        let dense = self.dense.iter().enumerate();
        dense
            .filter_map(|(i, e)| Some((Gfn(i as u64), e.as_ref()?)))
            .chain(self.sparse.iter().map(|(g, e)| (*g, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_an_ordered_map_on_both_sides_of_the_flat_part() {
        let mut p = P2m::with_dense(4);
        let mut model = BTreeMap::new();
        for (g, v) in [(0u64, 1u32), (3, 2), (4, 3), (1 << 40, 4), (2, 5), (3, 6)] {
            assert_eq!(p.insert(Gfn(g), v), model.insert(Gfn(g), v));
        }
        assert_eq!(p.remove(&Gfn(4)), model.remove(&Gfn(4)));
        assert_eq!(p.remove(&Gfn(1)), model.remove(&Gfn(1)));
        *p.get_mut(&Gfn(0)).unwrap() = 9;
        *model.get_mut(&Gfn(0)).unwrap() = 9;
        for g in [0u64, 1, 2, 3, 4, 5, 1 << 40, u64::MAX] {
            assert_eq!(p.get(&Gfn(g)), model.get(&Gfn(g)));
        }
        assert_eq!(
            p.values().copied().collect::<Vec<_>>(),
            model.values().copied().collect::<Vec<_>>()
        );
    }
}
