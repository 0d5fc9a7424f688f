//! Shadow PPGTT: full build of 1 Mi 4 KiB leaves (4 GiB of GMA, 2048 guest
//! PT pages) versus an incremental sync of ~1% changed leaves spread over
//! every PT page (5 leaves in each of the 2048 PTs), and the cost of
//! revocations reaching the shadow.

use criterion::{criterion_group, Criterion};
use pviommu_guest::shadow::ppgtt_format::leaf_entry;
use pviommu_guest::shadow::{
    Bfn, DomId, FrameMapper, Gfn, GuestTableReader, HeapShadowMemory, MapError, ShadowError,
    ShadowMemory, ShadowPpgtt, TablePages,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const PTS: u64 = 2048;
const ROOT: u64 = 1;
const PDP: u64 = 2;
const PD0: u64 = 3; // 4 PDs: 3..7
const PT0: u64 = 16; // 2048 PTs: 16..2064
const DATA0: u64 = 0x10000; // leaf frames
const LEAVES: u64 = PTS * 512;
const CHANGED_PER_PT: usize = 5;
const ADDR_MASK: u64 = 0x0000_FFFF_FFFF_F000;

/// A guest page: page-aligned, as guest memory is wherever it is mapped
/// (a `Vec<[u64; 512]>` would put every page 16 bytes past a boundary).
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u64; 512]);

impl std::ops::Deref for Page {
    type Target = [u64; 512];
    fn deref(&self) -> &[u64; 512] {
        &self.0
    }
}

impl std::ops::DerefMut for Page {
    fn deref_mut(&mut self) -> &mut [u64; 512] {
        &mut self.0
    }
}

/// Guest memory as a vector of pages indexed by frame number.
struct VecGuest(Vec<Page>);

impl GuestTableReader for VecGuest {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        match self.0.get(gfn.0 as usize) {
            Some(p) => {
                buf.copy_from_slice(&p.0);
                Ok(())
            }
            None => Err(ShadowError::GuestRead { gfn, errno: 14 }),
        }
    }
}

/// Cheap mapper: BFN = gfn + constant, reference counts in a vector.
struct CheapMapper(Vec<u32>);

impl FrameMapper for CheapMapper {
    fn map(&mut self, _: DomId, gfns: &[Gfn], _: &[bool]) -> Vec<Result<Bfn, MapError>> {
        gfns.iter()
            .map(|g| match self.0.get_mut(g.0 as usize) {
                Some(c) => {
                    *c += 1;
                    Ok(Bfn(g.0 + 0x100_0000))
                }
                None => Err(MapError::new(22, "no such frame")),
            })
            .collect()
    }
    fn unmap(&mut self, bfns: &[Bfn]) {
        for b in bfns {
            self.0[(b.0 - 0x100_0000) as usize] -= 1;
        }
    }
}

fn guest() -> VecGuest {
    let mut pages = vec![Page([0u64; 512]); (PT0 + PTS) as usize];
    let ptr = |g: u64| (g << 12) | 3;
    pages[ROOT as usize][0] = ptr(PDP);
    for d in 0..4 {
        pages[PDP as usize][d] = ptr(PD0 + d as u64);
        for (i, e) in pages[(PD0 + d as u64) as usize].iter_mut().enumerate() {
            *e = ptr(PT0 + d as u64 * 512 + i as u64);
        }
    }
    for p in 0..PTS {
        for i in 0..512u64 {
            pages[(PT0 + p) as usize][i as usize] = ((DATA0 + p * 512 + i) << 12) | 3;
        }
    }
    VecGuest(pages)
}

fn mapper() -> CheapMapper {
    CheapMapper(vec![0; (DATA0 + 2 * LEAVES) as usize])
}

/// Flip ~1% of the leaves (5 per PT) between their original frame and a
/// second set of frames; returns the changed PT pages.
fn edit(g: &mut VecGuest, round: u64) -> Vec<Gfn> {
    edit_pts(g, round, PTS)
}

/// Flip 5 leaves in each of `n` PT pages spread evenly over the 2048;
/// returns the changed PT pages.
fn edit_pts(g: &mut VecGuest, round: u64, n: u64) -> Vec<Gfn> {
    let mut changed = Vec::with_capacity(n as usize);
    for j in 0..n {
        let p = j * (PTS / n);
        let page = &mut g.0[(PT0 + p) as usize];
        for k in 0..CHANGED_PER_PT {
            let i = (k * 97 + p as usize * 7) % 512;
            let base = if round & 1 == 0 {
                DATA0 + LEAVES
            } else {
                DATA0
            };
            page[i] = ((base + p * 512 + i as u64) << 12) | 3;
        }
        changed.push(Gfn(PT0 + p));
    }
    changed
}

/// The floor of a page-level sync: re-read each dirty page and diff it
/// against a snapshot, the way `sync` does (whole page, then cache lines,
/// then entries; changed entries collected and copied into the snapshot),
/// with nothing else: no lookups, no shadow or mapper work. Snapshots are
/// indexed by PT number, in the same storage as the shadow's (`TablePages`:
/// page-aligned, on huge pages), so the floor has no TLB handicap.
struct Floor {
    snap: TablePages,
    /// Page-aligned like `sync`'s own buffer: a 4 KiB copy or compare
    /// between operands misaligned to each other can take twice as long.
    buf: Box<Page>,
    changes: Vec<(u16, u64, u64)>,
    /// For the floor with mapper calls: its own mapper holding every
    /// present leaf of the floor's guest, and batches of 512 as in `sync`.
    mapper: CheapMapper,
    map_gfns: Vec<Gfn>,
    map_writable: Vec<bool>,
    unmaps: Vec<Bfn>,
    /// For the floor with mapper calls and shadow leaves: a shadow PT page
    /// per guest PT (same memory type as the shadow's), holding the leaf of
    /// every present entry; the leaves waiting in the map batch (PT, index,
    /// guest entry).
    shadow: HeapShadowMemory,
    shadow_pages: Vec<Bfn>,
    pending: Vec<(u32, u16, u64)>,
}

impl Floor {
    fn new(g: &VecGuest) -> Floor {
        let mut mapper = mapper();
        let present: Vec<Gfn> = (0..PTS)
            .flat_map(|p| g.0[(PT0 + p) as usize].0)
            .filter(|e| e & 1 != 0)
            .map(|e| Gfn((e & ADDR_MASK) >> 12))
            .collect();
        let mut shadow = HeapShadowMemory::new();
        let shadow_pages: Vec<Bfn> = (0..PTS)
            .map(|_| shadow.alloc_table().expect("memory for the floor"))
            .collect();
        let mut bfns = mapper
            .map(DomId(1), &present, &vec![true; present.len()])
            .into_iter();
        for (p, &page) in shadow_pages.iter().enumerate() {
            let t = shadow.table_mut(page).expect("a table page");
            for (i, &e) in g.0[PT0 as usize + p].iter().enumerate() {
                if e & 1 != 0 {
                    let bfn = bfns.next().expect("a result").expect("a mapped leaf");
                    t[i] = leaf_entry(e, bfn.0);
                }
            }
        }
        Floor {
            snap: {
                let mut t = TablePages::default();
                for p in 0..PTS {
                    let i = t.push_zeroed().expect("memory for the floor");
                    t[i] = g.0[(PT0 + p) as usize].0;
                }
                t
            },
            buf: Box::new(Page([0; 512])),
            changes: Vec::new(),
            mapper,
            map_gfns: Vec::with_capacity(512),
            map_writable: Vec::with_capacity(512),
            unmaps: Vec::with_capacity(512),
            shadow,
            shadow_pages,
            pending: Vec::with_capacity(512),
        }
    }

    /// [`reread_diff_map`](Self::reread_diff_map) plus the shadow-leaf work
    /// any sync must do for the same changes, and nothing else: one access
    /// per changed leaf, when its map batch returns, reads the old leaf
    /// (the BFN to unmap: a mapper need not derive BFNs from frames) and
    /// writes the new one. The batch's leaves are prefetched before the
    /// map call, as `sync` does. A leaf removed without replacement (none
    /// in this bench) is read and cleared at once. Returns the number of
    /// changed entries.
    fn reread_diff_map_shadow(&mut self, g: &VecGuest, dirty: &[Gfn]) -> usize {
        let mut n = 0;
        for &gfn in dirty {
            n += self.diff_one(g, gfn);
            let pt = (gfn.0 - PT0) as u32;
            for k in 0..self.changes.len() {
                let (idx, old, new) = self.changes[k];
                if new & 1 != 0 {
                    self.pending.push((pt, idx, new));
                    self.map_gfns.push(Gfn((new & ADDR_MASK) >> 12));
                    self.map_writable.push(new & 2 != 0);
                    if self.map_gfns.len() == 512 {
                        self.flush_shadow_maps();
                    }
                } else if old & 1 != 0 {
                    let page = self.shadow_pages[pt as usize];
                    let leaf = self.shadow.read_entry(page, idx as usize).unwrap_or(0);
                    if leaf & 1 != 0 {
                        self.shadow.write_entry(page, idx as usize, 0);
                        self.unmap_one(Bfn((leaf & ADDR_MASK) >> 12));
                    }
                }
            }
        }
        self.flush_shadow_maps();
        if !self.unmaps.is_empty() {
            self.mapper.unmap(&self.unmaps);
            self.unmaps.clear();
        }
        n
    }

    fn unmap_one(&mut self, bfn: Bfn) {
        self.unmaps.push(bfn);
        if self.unmaps.len() == 512 {
            self.mapper.unmap(&self.unmaps);
            self.unmaps.clear();
        }
    }

    /// Map the batch; write each new leaf over the old one, whose BFN is
    /// queued for unmapping.
    fn flush_shadow_maps(&mut self) {
        if self.map_gfns.is_empty() {
            return;
        }
        for &(pt, idx, _) in &self.pending {
            let t = self.shadow.table(self.shadow_pages[pt as usize]);
            prefetch(&t.expect("a table page")[idx as usize]);
        }
        let results = self
            .mapper
            .map(DomId(1), &self.map_gfns, &self.map_writable);
        let pending = std::mem::take(&mut self.pending);
        for (&(pt, idx, e), r) in pending.iter().zip(results) {
            let bfn = r.expect("a mapped leaf");
            let page = self.shadow_pages[pt as usize];
            let t = self.shadow.table_mut(page).expect("a table page");
            let old = std::mem::replace(&mut t[idx as usize], leaf_entry(e, bfn.0));
            if old & 1 != 0 {
                self.unmap_one(Bfn((old & ADDR_MASK) >> 12));
            }
        }
        self.pending = pending;
        self.pending.clear();
        self.map_gfns.clear();
        self.map_writable.clear();
    }

    /// Re-read and diff, then make the mapper calls `sync` has to make for
    /// the changed leaves (unmap the old frame's BFN, map the new frame),
    /// and nothing else. Returns the number of changed entries.
    fn reread_diff_map(&mut self, g: &VecGuest, dirty: &[Gfn]) -> usize {
        let mut n = 0;
        for &gfn in dirty {
            n += self.diff_one(g, gfn);
            for &(_, old, new) in &self.changes {
                if old & 1 != 0 {
                    self.unmaps
                        .push(Bfn(((old & ADDR_MASK) >> 12) + 0x100_0000));
                    if self.unmaps.len() == 512 {
                        self.mapper.unmap(&self.unmaps);
                        self.unmaps.clear();
                    }
                }
                if new & 1 != 0 {
                    self.map_gfns.push(Gfn((new & ADDR_MASK) >> 12));
                    self.map_writable.push(new & 2 != 0);
                    if self.map_gfns.len() == 512 {
                        black_box(
                            self.mapper
                                .map(DomId(1), &self.map_gfns, &self.map_writable),
                        );
                        self.map_gfns.clear();
                        self.map_writable.clear();
                    }
                }
            }
        }
        if !self.map_gfns.is_empty() {
            black_box(
                self.mapper
                    .map(DomId(1), &self.map_gfns, &self.map_writable),
            );
            self.map_gfns.clear();
            self.map_writable.clear();
        }
        if !self.unmaps.is_empty() {
            self.mapper.unmap(&self.unmaps);
            self.unmaps.clear();
        }
        n
    }

    /// Returns the number of changed entries.
    fn reread_diff(&mut self, g: &VecGuest, dirty: &[Gfn]) -> usize {
        dirty.iter().map(|&gfn| self.diff_one(g, gfn)).sum()
    }

    /// Re-read and diff one page into `self.changes`.
    fn diff_one(&mut self, g: &VecGuest, gfn: Gfn) -> usize {
        {
            g.read_page(gfn, &mut self.buf).unwrap();
            let snap = &mut self.snap[(gfn.0 - PT0) as usize];
            self.changes.clear();
            if *snap != self.buf.0 {
                let (lines, _) = snap.as_chunks_mut::<8>();
                let (new_lines, _) = self.buf.as_chunks::<8>();
                for (c, (a, b)) in lines.iter_mut().zip(new_lines).enumerate() {
                    if a == b {
                        continue;
                    }
                    for k in 0..8 {
                        if a[k] != b[k] {
                            self.changes.push(((c * 8 + k) as u16, a[k], b[k]));
                            a[k] = b[k];
                        }
                    }
                }
            }
            black_box(&self.changes).len()
        }
    }
}

/// Start loading the cache line of `e` (a hint; nothing off x86-64).
fn prefetch(e: &u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no architectural effect.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((e as *const u64).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

fn time_build(g: &VecGuest) -> Duration {
    time_build_cpu(g).0
}

/// Wall and thread CPU time of a full build.
fn time_build_cpu(g: &VecGuest) -> (Duration, Duration) {
    let mut m = mapper();
    let mut mem = HeapShadowMemory::new();
    let (w, c) = (Instant::now(), thread_cpu());
    let (s, rep) = ShadowPpgtt::build(g, &mut m, &mut mem, DomId(1), Gfn(ROOT));
    let d = (w.elapsed(), thread_cpu() - c);
    assert_eq!(rep.leaves_mapped, LEAVES);
    black_box(s);
    d
}

fn bench(c: &mut Criterion) {
    let g = guest();
    let mut group = c.benchmark_group("shadow_ppgtt");
    group.sample_size(10);
    group.bench_function("full_build_1Mi_leaves", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| time_build(&g)).sum())
    });

    let mut g2 = guest();
    let mut m = mapper();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g2, &mut m, &mut mem, DomId(1), Gfn(ROOT));
    let mut round = 0;
    group.bench_function("sync_1pct_over_2048_pts", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let changed = edit(&mut g2, round);
                round += 1;
                let t = Instant::now();
                let rep = s.sync(&g2, &mut m, &mut mem, &changed);
                total += t.elapsed();
                assert_eq!(rep.leaves_mapped, PTS * CHANGED_PER_PT as u64);
            }
            total
        })
    });

    // The same spread edits delivered as trapped entry writes (GVT-g
    // write-protects guest table pages, so it knows each written entry).
    let mut round_w = 1000;
    group.bench_function("sync_writes_1pct_over_2048_pts", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let writes = edit_writes(&mut g2, round_w);
                round_w += 1;
                let t = Instant::now();
                let rep = s.sync_writes(&g2, &mut m, &mut mem, &writes);
                total += t.elapsed();
                assert_eq!(rep.leaves_mapped, PTS * CHANGED_PER_PT as u64);
            }
            total
        })
    });

    // For comparison: the same number of changed leaves clustered in 20 PT
    // pages, and re-reading all 2048 PT pages with nothing changed (the
    // floor of any sync that is told every PT page changed).
    let mut round_c = 0;
    group.bench_function("sync_1pct_clustered_in_20_pts", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let changed = edit_clustered(&mut g2, round_c);
                round_c += 1;
                let t = Instant::now();
                black_box(s.sync(&g2, &mut m, &mut mem, &changed));
                total += t.elapsed();
            }
            total
        })
    });
    let all: Vec<Gfn> = (0..PTS).map(|p| Gfn(PT0 + p)).collect();
    group.bench_function("reread_2048_pts_unchanged", |b| {
        b.iter(|| black_box(s.sync(&g2, &mut m, &mut mem, &all)))
    });

    // The floor next to each page-level sync: the same dirty sets and
    // changes, on a guest of its own kept in step by the same edits.
    let mut g3 = guest();
    let mut floor = Floor::new(&g3);
    // The floor with mapper calls has a guest of its own, so its mapper
    // always holds exactly the leaves of its snapshot.
    let mut g4 = guest();
    let mut floor_m = Floor::new(&g4);
    // And the floor with mapper calls and shadow leaves.
    let mut g5 = guest();
    let mut floor_s = Floor::new(&g5);
    group.bench_function("floor_reread_diff_2048_pts_unchanged", |b| {
        b.iter(|| black_box(floor.reread_diff(&g3, &all)))
    });
    for n in [256u64, 2048] {
        // Start both from the original frames (round 0 then changes them).
        edit(&mut g3, 1);
        floor.reread_diff(&g3, &all);
        edit(&mut g4, 1);
        floor_m.reread_diff_map(&g4, &all);
        edit(&mut g5, 1);
        floor_s.reread_diff_map_shadow(&g5, &all);
        edit(&mut g2, 1);
        s.sync(&g2, &mut m, &mut mem, &all);
        let mut round_f = 0;
        group.bench_function(format!("floor_reread_diff_5_entries_in_{n}_pts"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let changed = edit_pts(&mut g3, round_f, n);
                    round_f += 1;
                    let t = Instant::now();
                    let k = floor.reread_diff(&g3, &changed);
                    total += t.elapsed();
                    assert_eq!(k, n as usize * CHANGED_PER_PT);
                }
                total
            })
        });
        let mut round_m = 0;
        group.bench_function(format!("floor_reread_diff_map_5_entries_in_{n}_pts"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let changed = edit_pts(&mut g4, round_m, n);
                    round_m += 1;
                    let t = Instant::now();
                    let k = floor_m.reread_diff_map(&g4, &changed);
                    total += t.elapsed();
                    assert_eq!(k, n as usize * CHANGED_PER_PT);
                }
                total
            })
        });
        let mut round_l = 0;
        group.bench_function(
            format!("floor_reread_diff_map_shadow_5_entries_in_{n}_pts"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let changed = edit_pts(&mut g5, round_l, n);
                        round_l += 1;
                        let t = Instant::now();
                        let k = floor_s.reread_diff_map_shadow(&g5, &changed);
                        total += t.elapsed();
                        assert_eq!(k, n as usize * CHANGED_PER_PT);
                    }
                    total
                })
            },
        );
        let mut round_s = 0;
        group.bench_function(format!("sync_5_entries_in_{n}_pts"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let changed = edit_pts(&mut g2, round_s, n);
                    round_s += 1;
                    let t = Instant::now();
                    let rep = s.sync(&g2, &mut m, &mut mem, &changed);
                    total += t.elapsed();
                    assert_eq!(rep.entries_changed, n * CHANGED_PER_PT as u64);
                }
                total
            })
        });
    }

    // Revocation: the first notice after a change indexes the present
    // leaves (one pass over the PT pages); a dying guest then revokes every
    // leaf, one notice each.
    let mut round_r = 2000;
    group.bench_function("first_revocation_after_sync_1Mi_leaves", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let changed = edit(&mut g2, round_r);
                round_r += 1;
                s.sync(&g2, &mut m, &mut mem, &changed);
                let t = Instant::now();
                black_box(s.revoke(&mut mem, Bfn(u64::MAX >> 12)));
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function("revoke_every_leaf_1Mi", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut m = mapper();
                let mut mem = HeapShadowMemory::new();
                let (mut s, _) = ShadowPpgtt::build(&g, &mut m, &mut mem, DomId(1), Gfn(ROOT));
                let t = Instant::now();
                let mut n = 0;
                for i in 0..LEAVES {
                    n += s.revoke(&mut mem, Bfn(DATA0 + i + 0x100_0000)).len();
                }
                total += t.elapsed();
                assert_eq!(n as u64, LEAVES);
                assert_eq!(s.mapped_leaves(), 0);
            }
            total
        })
    });
    group.finish();
}

/// Like [`edit`], returning the individual entry writes.
fn edit_writes(g: &mut VecGuest, round: u64) -> Vec<(Gfn, usize, u64)> {
    let mut writes = Vec::with_capacity(PTS as usize * CHANGED_PER_PT);
    for p in 0..PTS {
        let page = &mut g.0[(PT0 + p) as usize];
        for k in 0..CHANGED_PER_PT {
            let i = (k * 97 + p as usize * 7) % 512;
            let base = if round & 1 == 0 {
                DATA0 + LEAVES
            } else {
                DATA0
            };
            page[i] = ((base + p * 512 + i as u64) << 12) | 3;
            writes.push((Gfn(PT0 + p), i, page[i]));
        }
    }
    writes
}

/// Flip 10240 leaves (~1%) confined to 20 PT pages.
fn edit_clustered(g: &mut VecGuest, round: u64) -> Vec<Gfn> {
    let n = (PTS as usize * CHANGED_PER_PT).div_ceil(512);
    let mut changed = Vec::with_capacity(n);
    for p in 0..n as u64 {
        let p = p * (PTS / n as u64);
        let page = &mut g.0[(PT0 + p) as usize];
        let base = if round & 1 == 0 {
            DATA0 + LEAVES
        } else {
            DATA0
        };
        for (i, e) in page.iter_mut().enumerate() {
            *e = ((base + p * 512 + i as u64) << 12) | 3;
        }
        changed.push(Gfn(PT0 + p));
    }
    changed
}

/// This thread's CPU time: unlike wall time, it does not count the time
/// the thread waits for a core on a loaded machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec passed to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and thread CPU time of one call.
fn timed<T>(f: impl FnOnce() -> T) -> (Duration, Duration) {
    let (w, c) = (Instant::now(), thread_cpu());
    black_box(f());
    (w.elapsed(), thread_cpu() - c)
}

/// Median of a sample (sorts it).
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounds of the 1 % sync and its floors in the summary.
const ROUNDS: u64 = 101;

/// Median of a few runs of each, printed as a ratio (in the same process).
/// The 1 % sync and its two floors run interleaved, one of each per round,
/// so a change in the machine's load hits all three alike.
fn summary() {
    let g = guest();
    let (mut builds, mut builds_cpu): (Vec<_>, Vec<_>) = (0..7).map(|_| time_build_cpu(&g)).unzip();
    let mut g2 = guest();
    let mut m = mapper();
    let mut mem = HeapShadowMemory::new();
    let (mut s, _) = ShadowPpgtt::build(&g2, &mut m, &mut mem, DomId(1), Gfn(ROOT));
    // The floors for the same dirty sets and changes, on guests of their own.
    let mut g3 = guest();
    let mut floor = Floor::new(&g3);
    let mut g4 = guest();
    let mut floor_m = Floor::new(&g4);
    let mut g5 = guest();
    let mut floor_s = Floor::new(&g5);
    // [sync, floor, floor + mapper calls, floor + mapper calls + shadow
    // leaves] x [wall, CPU]
    let mut t: [[Vec<Duration>; 2]; 4] = Default::default();
    let mut per_round: [Vec<f64>; 3] = Default::default();
    for r in 0..ROUNDS {
        let changed = edit(&mut g2, r);
        let a = timed(|| s.sync(&g2, &mut m, &mut mem, &changed));
        let changed = edit(&mut g3, r);
        let b = timed(|| floor.reread_diff(&g3, &changed));
        let changed = edit(&mut g4, r);
        let c = timed(|| floor_m.reread_diff_map(&g4, &changed));
        let changed = edit(&mut g5, r);
        let d = timed(|| floor_s.reread_diff_map_shadow(&g5, &changed));
        for (k, (w, cpu)) in [a, b, c, d].into_iter().enumerate() {
            t[k][0].push(w);
            t[k][1].push(cpu);
        }
        for (k, f) in [b, c, d].into_iter().enumerate() {
            per_round[k].push(a.1.as_secs_f64() / f.1.as_secs_f64());
        }
    }
    let mut writes: Vec<Duration> = (0..31)
        .map(|r| {
            let w = edit_writes(&mut g2, r + 1);
            timed(|| s.sync_writes(&g2, &mut m, &mut mem, &w)).0
        })
        .collect();
    let all: Vec<Gfn> = (0..PTS).map(|p| Gfn(PT0 + p)).collect();
    let mut unchanged: Vec<(Duration, Duration)> = (0..31)
        .map(|_| {
            let a = timed(|| s.sync(&g2, &mut m, &mut mem, &all)).0;
            (a, timed(|| floor.reread_diff(&g3, &all)).0)
        })
        .collect();
    let med = t.each_mut().map(|[w, c]| (median(w), median(c)));
    let [(sy, sy_c), (fl, fl_c), (flm, flm_c), (fls, fls_c)] = med;
    let (mut us, mut uf): (Vec<_>, Vec<_>) = unchanged.drain(..).unzip();
    let (us, uf) = (median(&mut us), median(&mut uf));
    println!(
        "summary: 1% sync {:.3} ms vs re-read+diff floor {:.3} ms of the same 2048 dirty PTs = {:.2}x; \
         unchanged 2048 PTs: sync {:.3} ms vs floor {:.3} ms = {:.2}x (target <= 1.2x)",
        ms(sy),
        ms(fl),
        sy.as_secs_f64() / fl.as_secs_f64(),
        ms(us),
        ms(uf),
        us.as_secs_f64() / uf.as_secs_f64()
    );
    println!(
        "summary: 1% sync {:.3} ms vs floor with the same mapper calls {:.3} ms = {:.2}x",
        ms(sy),
        ms(flm),
        sy.as_secs_f64() / flm.as_secs_f64(),
    );
    println!(
        "summary: 1% sync {:.3} ms vs floor with the same mapper calls and shadow leaves {:.3} ms = {:.2}x",
        ms(sy),
        ms(fls),
        sy.as_secs_f64() / fls.as_secs_f64(),
    );
    let [r0, r1, r2] = per_round.each_mut().map(|r| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    });
    println!(
        "summary (thread CPU time, {ROUNDS} interleaved rounds): 1% sync {:.3} ms; floor {:.3} ms, \
         + mapper calls {:.3} ms, + shadow leaves {:.3} ms; sync / floors = {:.2}x, {:.2}x, {:.2}x \
         (median per-round ratios {r0:.2}x, {r1:.2}x, {r2:.2}x)",
        ms(sy_c),
        ms(fl_c),
        ms(flm_c),
        ms(fls_c),
        sy_c.as_secs_f64() / fl_c.as_secs_f64(),
        sy_c.as_secs_f64() / flm_c.as_secs_f64(),
        sy_c.as_secs_f64() / fls_c.as_secs_f64(),
    );
    let wr = median(&mut writes);
    let b = median(&mut builds);
    println!(
        "summary: 1% sync_writes {:.3} ms = {:.2}% of full build",
        ms(wr),
        100.0 * wr.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "summary: full build thread CPU time {:.2} ms (median of 7)",
        ms(median(&mut builds_cpu))
    );
    println!(
        "summary: full build {:.2} ms, 1% sync {:.3} ms, sync/build = {:.2}% (targets: < 50 ms, <= 3%)",
        ms(b),
        ms(sy),
        100.0 * sy.as_secs_f64() / b.as_secs_f64()
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    summary();
    Criterion::default().configure_from_args().final_summary();
}
