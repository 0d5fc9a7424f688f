//! The mapping cache: (domid, gfn, context, access, attribute) -> BFN with a
//! reference count, so a mediator that maps the same page many times costs
//! one hypercall op, and the BFN is released with the last reference.

use std::collections::HashMap;

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MemAttr, Permissions};

/// What identifies a mapping.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey {
    /// Foreign domain.
    pub domid: DomId,
    /// Foreign frame.
    pub gfn: Gfn,
    /// Context.
    pub context: ContextId,
    /// Access.
    pub perms: Permissions,
    /// Attribute.
    pub attr: MemAttr,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    bfn: Bfn,
    /// 64 bits: one per map call's page, which no caller can wrap (a
    /// `u32` did after 2^32 maps of one page, and one unmap then took the
    /// BFN away from every holder).
    refs: u64,
}

/// The cache.
#[derive(Default, Debug)]
pub struct MappingCache {
    by_key: HashMap<CacheKey, Entry>,
    by_bfn: HashMap<(ContextId, Bfn), CacheKey>,
    /// BFNs whose revocation was pushed ([`mark_revoked`](Self::mark_revoked))
    /// before the caller drained its notice: the references their holders
    /// still have. No map is answered with them; the last release is the
    /// one that goes to the hypervisor (an unmap of a revoked BFN
    /// acknowledges its notice), so the notice stays until no holder uses
    /// the BFN or the drain hands it over.
    revoked: HashMap<(ContextId, Bfn), u64>,
}

impl MappingCache {
    /// The BFN for `key`, taking one more reference, if cached.
    pub fn get_ref(&mut self, key: &CacheKey) -> Option<Bfn> {
        let e = self.by_key.get_mut(key)?;
        e.refs += 1;
        Some(e.bfn)
    }
    /// The BFN for `key`, if cached (no reference taken).
    pub fn bfn_of(&self, key: &CacheKey) -> Option<Bfn> {
        self.by_key.get(key).map(|e| e.bfn)
    }
    /// Record a fresh mapping with one reference. Returns the key the
    /// cache filed under `bfn` before, if another: a stale one, now
    /// forgotten.
    ///
    /// The hypervisor hands a BFN out again only once its mapping went
    /// and the notice was acknowledged. A key still filed under it is one
    /// whose revocation another client of the same driver domain drained
    /// (a second process draining all contexts, or sharing context 0):
    /// kept, a map of its page would be answered with a BFN that now
    /// reaches another page.
    pub fn insert(&mut self, key: CacheKey, bfn: Bfn) -> Option<CacheKey> {
        // The hypervisor handed the BFN out again: its notice is gone, and
        // with it any holder a mark still counted.
        self.revoked.remove(&(key.context, bfn));
        let stale = self
            .by_bfn
            .insert((key.context, bfn), key)
            .filter(|old| *old != key);
        if let Some(old) = stale {
            self.by_key.remove(&old);
        }
        // A key cached at another BFN (a map answers a cached key from the
        // cache, so only a hypervisor that forgot it gets here): the new
        // answer is the mapping; the old BFN no longer names the key.
        let before = self.by_key.insert(key, Entry { bfn, refs: 1 });
        if let Some(prev) = before.filter(|e| e.bfn != bfn) {
            if self.by_bfn.get(&(key.context, prev.bfn)) == Some(&key) {
                self.by_bfn.remove(&(key.context, prev.bfn));
            }
        }
        stale
    }
    /// Drop one reference; `Some(true)` when it was the last (the caller
    /// unmaps), `Some(false)` when others remain, `None` if unknown.
    pub fn release(&mut self, context: ContextId, bfn: Bfn) -> Option<bool> {
        if let Some(refs) = self.revoked.get_mut(&(context, bfn)) {
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.revoked.remove(&(context, bfn));
                return Some(true);
            }
            return Some(false);
        }
        let key = *self.by_bfn.get(&(context, bfn))?;
        let e = self.by_key.get_mut(&key)?;
        e.refs -= 1;
        if e.refs == 0 {
            self.by_key.remove(&key);
            self.by_bfn.remove(&(context, bfn));
            Some(true)
        } else {
            Some(false)
        }
    }
    /// Forget a BFN whatever its references (the hypervisor revoked it,
    /// and its notice was handed over: no holder uses it any more).
    pub fn forget(&mut self, context: ContextId, bfn: Bfn) -> Option<CacheKey> {
        self.revoked.remove(&(context, bfn));
        let key = self.by_bfn.remove(&(context, bfn))?;
        self.by_key.remove(&key);
        Some(key)
    }
    /// The hypervisor revoked a cached BFN, and its notice is still to be
    /// drained: no map gets it any more, but its holders' releases are
    /// still counted, so that an unmap of it (which acknowledges the
    /// notice) is sent only with the last one. Returns its key, if cached.
    pub fn mark_revoked(&mut self, context: ContextId, bfn: Bfn) -> Option<CacheKey> {
        let key = self.by_bfn.remove(&(context, bfn))?;
        if let Some(e) = self.by_key.remove(&key) {
            self.revoked.insert((context, bfn), e.refs);
        }
        Some(key)
    }
    /// The key of a cached BFN.
    pub fn key_of(&self, context: ContextId, bfn: Bfn) -> Option<CacheKey> {
        self.by_bfn.get(&(context, bfn)).copied()
    }
    /// References held on a cached BFN (revoked or not).
    pub fn refs(&self, context: ContextId, bfn: Bfn) -> u64 {
        if let Some(&refs) = self.revoked.get(&(context, bfn)) {
            return refs;
        }
        self.key_of(context, bfn)
            .and_then(|k| self.by_key.get(&k))
            .map_or(0, |e| e.refs)
    }
    /// Distinct cached BFNs a map can be answered with. A BFN revoked but
    /// still held is not one of them ([`revoked_held`](Self::revoked_held)).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
    /// Whether no map can be answered from the cache (revoked BFNs may
    /// still be held: [`holds_nothing`](Self::holds_nothing)).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
    /// Every cached mapping a map can be answered with.
    pub fn iter(&self) -> impl Iterator<Item = (&CacheKey, Bfn, u64)> {
        self.by_key.iter().map(|(k, e)| (k, e.bfn, e.refs))
    }
    /// The BFNs the hypervisor revoked whose holders have not all released
    /// them yet, with the references still held: each stays counted
    /// against the driver domain's quota until its last release (which
    /// acknowledges the notice) or the drain that hands it over.
    pub fn revoked_held(&self) -> impl Iterator<Item = (ContextId, Bfn, u64)> + '_ {
        self.revoked.iter().map(|(&(c, b), &refs)| (c, b, refs))
    }
    /// Distinct BFNs held through the cache: those [`len`](Self::len)
    /// counts, and those revoked but still held.
    pub fn held(&self) -> usize {
        self.by_key.len() + self.revoked.len()
    }
    /// Whether the cache holds no BFN at all, revoked or not.
    pub fn holds_nothing(&self) -> bool {
        self.by_key.is_empty() && self.revoked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Domain 1's page `gfn`, read-write, write-back, in context 0.
    fn key(gfn: u64) -> CacheKey {
        CacheKey {
            domid: DomId(1),
            gfn: Gfn(gfn),
            context: ContextId::DEFAULT,
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
        }
    }

    /// A page mapped 2^32 times (256 C calls of 16 Mi pages) keeps
    /// counting: one release then leaves the others' references. A `u32`
    /// count overflowed there (a debug build panicked, a release build
    /// wrapped to 0 and the next release unmapped the BFN under every
    /// holder).
    #[test]
    fn references_past_u32_max_do_not_wrap() {
        let mut cache = MappingCache::default();
        let key = key(5);
        cache.insert(key, Bfn(7));
        if let Some(e) = cache.by_key.get_mut(&key) {
            e.refs = u32::MAX.into();
        }
        assert_eq!(cache.get_ref(&key), Some(Bfn(7)));
        assert_eq!(cache.release(ContextId::DEFAULT, Bfn(7)), Some(false));
        assert_eq!(cache.refs(ContextId::DEFAULT, Bfn(7)), u64::from(u32::MAX));
    }

    /// A BFN handed out again for another page (its notice drained and
    /// acknowledged by another client) replaces the key filed under it:
    /// the old page is no longer answered with it, and a release of the
    /// BFN counts against the new page only (review: the old key stayed,
    /// answering its page with a BFN that reached the new one).
    #[test]
    fn a_bfn_handed_out_again_forgets_its_stale_key() {
        let mut cache = MappingCache::default();
        assert_eq!(cache.insert(key(5), Bfn(7)), None);
        assert_eq!(cache.insert(key(6), Bfn(7)), Some(key(5)));
        assert_eq!(cache.bfn_of(&key(5)), None);
        assert_eq!(cache.key_of(ContextId::DEFAULT, Bfn(7)), Some(key(6)));
        assert_eq!(cache.len(), 1);
        // The same key answered at another BFN: the old one names nothing.
        assert_eq!(cache.insert(key(6), Bfn(9)), None);
        assert_eq!(cache.key_of(ContextId::DEFAULT, Bfn(7)), None);
        assert_eq!(cache.bfn_of(&key(6)), Some(Bfn(9)));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.release(ContextId::DEFAULT, Bfn(9)), Some(true));
        assert!(cache.holds_nothing());
    }

    /// A BFN revoked while held leaves what maps are answered with, but
    /// stays counted as held, with its references, until its last release.
    #[test]
    fn revoked_bfns_still_held_are_counted_as_held() {
        let mut cache = MappingCache::default();
        cache.insert(key(5), Bfn(7));
        cache.insert(key(6), Bfn(8));
        assert_eq!(cache.get_ref(&key(5)), Some(Bfn(7)));
        assert_eq!(cache.mark_revoked(ContextId::DEFAULT, Bfn(7)), Some(key(5)));
        assert_eq!((cache.len(), cache.held()), (1, 2));
        let revoked: Vec<_> = cache.revoked_held().collect();
        assert_eq!(revoked, [(ContextId::DEFAULT, Bfn(7), 2)]);
        assert_eq!(cache.release(ContextId::DEFAULT, Bfn(7)), Some(false));
        assert_eq!(cache.release(ContextId::DEFAULT, Bfn(7)), Some(true));
        assert_eq!((cache.len(), cache.held()), (1, 1));
        assert_eq!(cache.release(ContextId::DEFAULT, Bfn(8)), Some(true));
        assert!(cache.is_empty() && cache.holds_nothing());
        assert_eq!(cache.revoked_held().count(), 0);
    }
}
