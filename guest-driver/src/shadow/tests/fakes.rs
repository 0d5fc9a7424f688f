//! Fake guest memory, fake mapper, guest-table builder and shadow enumerator.

use crate::shadow::ppgtt_format::{self as fmt, Level};
use crate::shadow::*;
use std::collections::{BTreeMap, HashMap};

/// Guest memory: table pages by frame; reading anything else fails.
#[derive(Clone, Default)]
pub struct FakeGuest {
    pub pages: HashMap<Gfn, [u64; 512]>,
}

impl GuestTableReader for FakeGuest {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        match self.pages.get(&gfn) {
            Some(p) => {
                *buf = *p;
                Ok(())
            }
            None => Err(ShadowError::GuestRead { gfn, errno: 14 }),
        }
    }
}

impl FakeGuest {
    pub fn set(&mut self, table: Gfn, idx: usize, value: u64) {
        self.pages.entry(table).or_insert([0; 512])[idx] = value;
    }
    pub fn get(&self, table: Gfn, idx: usize) -> u64 {
        self.pages.get(&table).map_or(0, |p| p[idx])
    }
    /// Map 4 KiB `gma` -> `gfn` with leaf `flags`, creating tables from
    /// `next_table` upwards.
    pub fn map_4k(&mut self, root: Gfn, next_table: &mut u64, gma: u64, gfn: u64, flags: u64) {
        self.pages.entry(root).or_insert([0; 512]);
        let mut t = root;
        for level in [Level::Pml4, Level::Pdp, Level::Pd] {
            let idx = level.index(gma);
            let e = self.get(t, idx);
            t = if e & fmt::PRESENT != 0 {
                Gfn((e & fmt::ADDR_MASK) >> 12)
            } else {
                let n = Gfn(*next_table);
                *next_table += 1;
                self.pages.insert(n, [0; 512]);
                self.set(t, idx, (n.0 << 12) | fmt::PRESENT | fmt::RW);
                n
            };
        }
        self.set(t, Level::Pt.index(gma), (gfn << 12) | flags | fmt::PRESENT);
    }
    /// The PD table (creating it) covering `gma`.
    pub fn pd_for(&mut self, root: Gfn, next_table: &mut u64, gma: u64) -> Gfn {
        self.pages.entry(root).or_insert([0; 512]);
        let mut t = root;
        for level in [Level::Pml4, Level::Pdp] {
            let idx = level.index(gma);
            let e = self.get(t, idx);
            t = if e & fmt::PRESENT != 0 {
                Gfn((e & fmt::ADDR_MASK) >> 12)
            } else {
                let n = Gfn(*next_table);
                *next_table += 1;
                self.pages.insert(n, [0; 512]);
                self.set(t, idx, (n.0 << 12) | fmt::PRESENT | fmt::RW);
                n
            };
        }
        t
    }
}

/// Mapper with deterministic BFNs (0x100000 + counter), per-gfn reference
/// counts, and refusals by gfn. With `extents`, it maps 2 MiB extents as
/// the engine does: a fresh aligned run of 512 BFNs when none of the pages
/// is mapped, the same run again when all are mapped at one aligned run,
/// `EBUSY` when some are, `EXDEV` (not one machine run) when a page is
/// refused.
#[derive(Default)]
pub struct FakeMapper {
    pub extents: bool,
    pub extent_calls: u64,
    pub extent_maps: u64,
    pub extent_unmaps: u64,
    next: u64,
    by_gfn: HashMap<Gfn, (Bfn, u32)>,
    by_bfn: HashMap<Bfn, Gfn>,
    pub refuse: HashMap<Gfn, i32>,
    pub map_calls: u64,
    pub unmap_calls: u64,
    pub max_batch: usize,
    pub unmapped: Vec<Bfn>,
}

impl FrameMapper for FakeMapper {
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>> {
        assert_eq!(domid, DomId(7));
        assert_eq!(gfns.len(), writable.len());
        self.map_calls += 1;
        self.max_batch = self.max_batch.max(gfns.len());
        gfns.iter()
            .map(|&g| {
                if let Some(&errno) = self.refuse.get(&g) {
                    return Err(MapError::new(errno, "refused by test"));
                }
                let e = self.by_gfn.entry(g).or_insert_with(|| {
                    let b = Bfn(0x100000 + self.next);
                    self.next += 1;
                    (b, 0)
                });
                e.1 += 1;
                self.by_bfn.insert(e.0, g);
                Ok(e.0)
            })
            .collect()
    }

    fn unmap(&mut self, bfns: &[Bfn]) {
        self.unmap_calls += 1;
        for &b in bfns {
            self.unmapped.push(b);
            let g = *self
                .by_bfn
                .get(&b)
                .expect("unmap of a BFN that is not mapped");
            let e = self.by_gfn.get_mut(&g).unwrap();
            e.1 -= 1;
            if e.1 == 0 {
                self.by_gfn.remove(&g);
                self.by_bfn.remove(&b);
            }
        }
    }

    fn maps_extents(&self) -> bool {
        self.extents
    }

    fn map_extents(
        &mut self,
        domid: DomId,
        gfns: &[Gfn],
        writable: &[bool],
    ) -> Vec<Result<Bfn, MapError>> {
        assert_eq!(gfns.len(), writable.len());
        self.extent_calls += 1;
        gfns.iter()
            .map(|&g| self.map_one_extent(domid, g))
            .collect()
    }

    fn unmap_extents(&mut self, firsts: &[Bfn]) {
        for &first in firsts {
            assert_eq!(first.0 % 512, 0);
            self.extent_unmaps += 1;
            let bfns: Vec<Bfn> = (0..512).map(|i| Bfn(first.0 + i)).collect();
            self.unmap(&bfns);
        }
    }
}

impl FakeMapper {
    fn map_one_extent(&mut self, domid: DomId, gfn: Gfn) -> Result<Bfn, MapError> {
        assert_eq!(domid, DomId(7));
        assert_eq!(gfn.0 % 512, 0, "an extent's gfn is a multiple of 512");
        if !self.extents {
            return Err(MapError::new(ERRNO_NO_EXTENTS, "no extents"));
        }
        let pages = (0..512).map(|i| Gfn(gfn.0 + i));
        if pages.clone().any(|g| self.refuse.contains_key(&g)) {
            return Err(MapError::new(18, "not one machine run"));
        }
        let mapped: Vec<Option<Bfn>> = pages
            .clone()
            .map(|g| self.by_gfn.get(&g).map(|e| e.0))
            .collect();
        let first = match mapped[0] {
            None if mapped.iter().all(Option::is_none) => {
                let b = Bfn(0x100000 + self.next.next_multiple_of(512));
                self.next = b.0 - 0x100000 + 512;
                b
            }
            Some(b)
                if b.0 % 512 == 0
                    && mapped
                        .iter()
                        .enumerate()
                        .all(|(i, m)| *m == Some(Bfn(b.0 + i as u64))) =>
            {
                b
            }
            _ => return Err(MapError::new(16, "mapped in part")),
        };
        self.extent_maps += 1;
        for (i, g) in pages.enumerate() {
            let b = Bfn(first.0 + i as u64);
            self.by_gfn.entry(g).or_insert((b, 0)).1 += 1;
            self.by_bfn.insert(b, g);
        }
        Ok(first)
    }

    /// The hypervisor revokes `b`: every reference to it gone (the shadow
    /// then must not unmap it).
    pub fn revoke_bfn(&mut self, b: Bfn) {
        if let Some(g) = self.by_bfn.remove(&b) {
            self.by_gfn.remove(&g);
        }
    }
    /// A mapper that maps 2 MiB extents.
    pub fn with_extents() -> Self {
        FakeMapper {
            extents: true,
            ..Self::default()
        }
    }
    pub fn refusing(list: &[(u64, i32)]) -> Self {
        FakeMapper {
            refuse: list.iter().map(|&(g, e)| (Gfn(g), e)).collect(),
            ..Self::default()
        }
    }
    pub fn gfn_of(&self, b: Bfn) -> Option<Gfn> {
        self.by_bfn.get(&b).copied()
    }
    /// Live mappings: gfn -> reference count.
    pub fn live(&self) -> BTreeMap<Gfn, u32> {
        self.by_gfn.iter().map(|(g, (_, n))| (*g, *n)).collect()
    }
}

/// Everything the shadow translates: gma -> (guest frame, leaf flags),
/// found by walking the shadow tables (not via the shadow's own state).
pub fn enumerate<S: ShadowMemory>(
    mem: &S,
    root: Bfn,
    mapper: &FakeMapper,
) -> BTreeMap<u64, (Gfn, u64)> {
    let mut out = BTreeMap::new();
    walk(mem, root, 4, 0, mapper, &mut out);
    out
}

fn walk<S: ShadowMemory>(
    mem: &S,
    table: Bfn,
    level: u32,
    base: u64,
    mapper: &FakeMapper,
    out: &mut BTreeMap<u64, (Gfn, u64)>,
) {
    let shift = 12 + 9 * (level - 1);
    for i in 0..512u64 {
        let e = mem
            .read_entry(table, i as usize)
            .expect("shadow table readable");
        if e & 1 == 0 {
            continue;
        }
        let gma = base + (i << shift);
        let frame = (e & 0x0000_FFFF_FFFF_F000) >> 12;
        if level == 1 {
            let g = mapper
                .gfn_of(Bfn(frame))
                .expect("shadow leaf points at a live BFN");
            assert!(out.insert(gma, (g, e & !0x0000_FFFF_FFFF_F000)).is_none());
        } else if level == 2 && e & 0x80 != 0 {
            // A 2 MiB shadow page (an extent): 512 4 KiB leaves, the PAT
            // bit moved down as the guest's walk moves it.
            let frame = (e & 0x0000_FFFF_FFE0_0000) >> 12;
            assert_eq!(e & 0x1f_e000, 0, "reserved bits of a 2 MiB entry clear");
            let mut flags = e & !0x0000_FFFF_FFFF_F000 & !0x80;
            if e & (1 << 12) != 0 {
                flags |= 0x80;
            }
            for k in 0..512u64 {
                let g = mapper
                    .gfn_of(Bfn(frame + k))
                    .expect("a 2 MiB shadow page points at live BFNs");
                assert!(out.insert(gma + (k << 12), (g, flags)).is_none());
            }
        } else {
            assert_eq!(e & 0x80, 0, "the shadow's only large pages are 2 MiB ones");
            walk(mem, Bfn(frame), level - 1, gma, mapper, out);
        }
    }
}

/// The guest's mappings by an independent walk of the guest tables (no
/// shared tables allowed in the guest): gma -> (gfn, flags as a 4 KiB leaf).
pub fn guest_leaves(g: &FakeGuest, root: Gfn) -> BTreeMap<u64, (Gfn, u64)> {
    let mut out = BTreeMap::new();
    guest_walk(g, root, 4, 0, &mut out);
    out
}

fn guest_walk(g: &FakeGuest, t: Gfn, level: u32, base: u64, out: &mut BTreeMap<u64, (Gfn, u64)>) {
    let Some(page) = g.pages.get(&t) else { return };
    let shift = 12 + 9 * (level - 1);
    for (i, &e) in page.iter().enumerate() {
        if e & 1 == 0 {
            continue;
        }
        let gma = base + ((i as u64) << shift);
        if level == 1 {
            out.insert(gma, (Gfn((e & fmt::ADDR_MASK) >> 12), e & !fmt::ADDR_MASK));
        } else if (level == 2 || level == 3) && e & 0x80 != 0 {
            let frames = 1u64 << (shift - 12);
            let first = (e & fmt::ADDR_MASK & !((frames << 12) - 1)) >> 12;
            let mut flags = e & !fmt::ADDR_MASK & !0x80;
            if e & (1 << 12) != 0 {
                flags |= 0x80;
            }
            for k in 0..frames {
                out.insert(gma + (k << 12), (Gfn(first + k), flags));
            }
        } else {
            guest_walk(g, Gfn((e & fmt::ADDR_MASK) >> 12), level - 1, gma, out);
        }
    }
}

pub const DOM: DomId = DomId(7);
