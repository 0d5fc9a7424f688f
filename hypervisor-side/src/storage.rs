//! Fallible, panic-free storage for the engine.
//!
//! Inside Xen a panic stops the host, and `alloc`'s convenient APIs
//! (`Vec::push`, `HashMap::insert`, `Box::new`, indexing) all keep a panic
//! path for allocation failure or a bad index, even where it can never be
//! taken. `build-engine.sh` fails the Xen build when any panic path is
//! reachable from an entry point, so the engine stores its state only in the
//! two shapes here, whose every operation returns a `Result` or an `Option`:
//!
//! * [`try_push`]: append to a `Vec` after `try_reserve`, without `push`'s
//!   infallible growth path;
//! * [`IndexTable`]: an open-addressing hash table of packed `u64` values
//!   whose keys live elsewhere (in the engine's slot arrays), so an entry
//!   costs 8 bytes. Capacity is reserved *before* any state changes
//!   ([`IndexTable::reserve_one`]); an insert after that cannot fail.
//!
//! Keys are guest-controlled (gfns): the hash is keyed with a per-boot seed
//! from the platform so a guest cannot aim its gfns at one probe chain.

use alloc::vec::Vec;

use crate::Errno;

/// Append `value` to `v`, growing it fallibly. On `Err(NoMem)` `v` is unchanged.
pub fn try_push<T>(v: &mut Vec<T>, value: T) -> Result<(), Errno> {
    if v.len() == v.capacity() {
        v.try_reserve(1).map_err(|_| Errno::NoMem)?;
    }
    let len = v.len();
    let slot = v.spare_capacity_mut().first_mut().ok_or(Errno::NoMem)?;
    slot.write(value);
    // SAFETY: the element at `len` was just initialised and is within capacity.
    unsafe { v.set_len(len + 1) };
    Ok(())
}

/// A `Vec` of `n` copies of `value`, allocated fallibly.
pub fn try_filled<T: Clone>(n: usize, value: T) -> Result<Vec<T>, Errno> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Errno::NoMem)?;
    for _ in 0..n {
        try_push(&mut v, value.clone())?;
    }
    Ok(v)
}

/// A keyed 64-bit mix (a multiply-xorshift finaliser over key ^ seed): cheap,
/// and with a secret seed a guest cannot predict which gfns collide.
#[inline]
pub fn hash64(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = a ^ seed;
    x = (x ^ (x >> 31)).wrapping_mul(0x7fb5_d329_728e_a185);
    x ^= b.wrapping_add(seed.rotate_left(29));
    x = (x ^ (x >> 27)).wrapping_mul(0x81da_def4_bc2d_d44d);
    x ^ (x >> 33)
}

const EMPTY: u64 = u64::MAX;
const TOMBSTONE: u64 = u64::MAX - 1;
/// Smallest table (buckets).
const MIN_BUCKETS: usize = 16;

/// Open-addressing table (linear probing) of packed `u64` values. The
/// caller supplies the hash of the key and an `eq` closure that compares a
/// stored value's key with the one looked for, so keys are never stored
/// twice. `u64::MAX` and `u64::MAX - 1` are not valid values.
///
/// Load (live + tombstones) is kept at or below 1/2, so a probe sequence
/// always ends at an empty bucket and expected probe lengths stay short.
#[derive(Debug, Default)]
pub struct IndexTable {
    buckets: Vec<u64>,
    live: usize,
    tombstones: usize,
    /// Times the buckets were rebuilt (positions from before are void).
    rebuilds: u32,
}

impl IndexTable {
    /// An empty table that owns no memory.
    pub const fn new() -> Self {
        IndexTable {
            buckets: Vec::new(),
            live: 0,
            tombstones: 0,
            rebuilds: 0,
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes of memory held.
    pub fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * 8
    }

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// Make sure one more insert needs no memory. `rehash(value)` must give
    /// the hash of a stored value (used when the table is rebuilt). On
    /// `Err(NoMem)` the table is unchanged.
    pub fn reserve_one(&mut self, rehash: impl Fn(u64) -> u64) -> Result<(), Errno> {
        let used = self.live + self.tombstones + 1;
        if !self.buckets.is_empty() && used * 2 <= self.buckets.len() {
            return Ok(());
        }
        // Grow when live entries need it; otherwise rebuild at the same
        // size to clear tombstones.
        let want = if (self.live + 1) * 4 > self.buckets.len() {
            self.buckets.len().max(MIN_BUCKETS / 2).checked_mul(2)
        } else {
            Some(self.buckets.len())
        }
        .ok_or(Errno::NoMem)?;
        let mut fresh = try_filled(want, EMPTY)?;
        let mask = want - 1;
        for &v in self.buckets.iter() {
            if v == EMPTY || v == TOMBSTONE {
                continue;
            }
            let mut i = rehash(v) as usize & mask;
            // Bounded: `fresh` has more empty buckets than values.
            for _ in 0..want {
                match fresh.get_mut(i) {
                    Some(b) if *b == EMPTY => {
                        *b = v;
                        break;
                    }
                    _ => i = (i + 1) & mask,
                }
            }
        }
        self.buckets = fresh;
        self.tombstones = 0;
        self.rebuilds = self.rebuilds.wrapping_add(1);
        Ok(())
    }

    /// Changes whenever positions from [`position`](Self::position) stop
    /// being valid because the buckets were rebuilt (inserts and removals
    /// never move other values).
    pub fn layout(&self) -> u32 {
        self.rebuilds
    }

    /// The stored value `eq` accepts, if any.
    pub fn find(&self, hash: u64, eq: impl Fn(u64) -> bool) -> Option<u64> {
        self.position(hash, eq)
            .and_then(|i| self.buckets.get(i).copied())
    }

    /// The bucket holding the value `eq` accepts, for [`value_at`],
    /// [`set_at`] and [`remove_at`] (valid until the table next changes).
    ///
    /// [`value_at`]: Self::value_at
    /// [`set_at`]: Self::set_at
    /// [`remove_at`]: Self::remove_at
    pub fn position(&self, hash: u64, eq: impl Fn(u64) -> bool) -> Option<usize> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        for _ in 0..self.buckets.len() {
            match self.buckets.get(i).copied() {
                None | Some(EMPTY) => return None,
                Some(TOMBSTONE) => {}
                Some(v) if eq(v) => return Some(i),
                Some(_) => {}
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Insert `value` (whose key is not present). Needs a prior
    /// [`reserve_one`](Self::reserve_one); without one it refuses with
    /// `Err(NoMem)` rather than allocate.
    pub fn insert(&mut self, hash: u64, value: u64) -> Result<(), Errno> {
        if self.buckets.is_empty() || (self.live + self.tombstones + 1) * 2 > self.buckets.len() {
            return Err(Errno::NoMem);
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        for _ in 0..self.buckets.len() {
            match self.buckets.get_mut(i) {
                Some(b) if *b == EMPTY || *b == TOMBSTONE => {
                    if *b == TOMBSTONE {
                        self.tombstones -= 1;
                    }
                    *b = value;
                    self.live += 1;
                    return Ok(());
                }
                _ => i = (i + 1) & mask,
            }
        }
        Err(Errno::NoMem)
    }

    /// Replace the stored value `eq` accepts with `value` (same key).
    pub fn replace(&mut self, hash: u64, eq: impl Fn(u64) -> bool, value: u64) -> bool {
        match self.position(hash, eq) {
            Some(i) => match self.buckets.get_mut(i) {
                Some(b) => {
                    *b = value;
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// The value in bucket `pos` (from [`position`](Self::position)).
    pub fn value_at(&self, pos: usize) -> Option<u64> {
        self.buckets
            .get(pos)
            .copied()
            .filter(|v| *v != EMPTY && *v != TOMBSTONE)
    }

    /// Overwrite the value in bucket `pos` (which must hold one whose hash
    /// equals `value`'s).
    pub fn set_at(&mut self, pos: usize, value: u64) {
        if let Some(b) = self.buckets.get_mut(pos) {
            if *b != EMPTY && *b != TOMBSTONE {
                *b = value;
            }
        }
    }

    /// Remove the value in bucket `pos`.
    pub fn remove_at(&mut self, pos: usize) {
        if self.value_at(pos).is_none() {
            return;
        }
        let i = pos;
        let mask = self.mask();
        let next_empty = matches!(self.buckets.get((i + 1) & mask), Some(&EMPTY));
        if let Some(b) = self.buckets.get_mut(i) {
            // A bucket followed by an empty one ends every probe chain
            // through it: it can become empty instead of a tombstone.
            if next_empty {
                *b = EMPTY;
            } else {
                *b = TOMBSTONE;
                self.tombstones += 1;
            }
            self.live -= 1;
        }
    }

    /// Remove the stored value `eq` accepts; whether there was one.
    pub fn remove(&mut self, hash: u64, eq: impl Fn(u64) -> bool) -> bool {
        let Some(i) = self.position(hash, eq) else {
            return false;
        };
        self.remove_at(i);
        true
    }

    /// Remove every value, keeping the buckets (no allocation).
    pub fn clear(&mut self) {
        self.buckets.fill(EMPTY);
        self.live = 0;
        self.tombstones = 0;
        self.rebuilds = self.rebuilds.wrapping_add(1);
    }

    /// Remove every value and give the buckets back.
    pub fn release(&mut self) {
        self.buckets = Vec::new();
        self.live = 0;
        self.tombstones = 0;
        self.rebuilds = self.rebuilds.wrapping_add(1);
    }

    /// Every stored value.
    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets
            .iter()
            .copied()
            .filter(|v| *v != EMPTY && *v != TOMBSTONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    #[test]
    fn table_matches_a_btreemap_under_churn() {
        // Values are the keys themselves here.
        let seed = 0x1234_5678;
        let h = |v: u64| hash64(seed, v, 0);
        let mut t = IndexTable::new();
        let mut model = BTreeSet::new();
        let mut x = 1u64;
        for step in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 33) % 512;
            let present = model.contains(&key);
            if present && step % 3 != 0 {
                assert!(t.remove(h(key), |v| v == key));
                model.remove(&key);
            } else if !present {
                t.reserve_one(h).unwrap();
                t.insert(h(key), key).unwrap();
                model.insert(key);
            }
            assert_eq!(t.len(), model.len());
        }
        for k in 0..512 {
            assert_eq!(t.find(h(k), |v| v == k).is_some(), model.contains(&k));
        }
        let mut all: alloc::vec::Vec<u64> = t.values().collect();
        all.sort();
        assert_eq!(all, model.iter().copied().collect::<alloc::vec::Vec<_>>());
    }

    #[test]
    fn insert_without_reserve_refuses_instead_of_allocating() {
        let mut t = IndexTable::new();
        assert_eq!(t.insert(1, 1), Err(Errno::NoMem));
    }
}
