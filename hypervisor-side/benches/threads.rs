//! Map + unmap throughput with 1, 2, 4 and 8 threads, each a different
//! driver domain (a device model) mapping its own guest's pages, through
//! the engine's real lock protocol over the shared simulated host (every
//! hypervisor service locks the machine only for its own duration, as Xen's
//! primitives do). Then the same with threads as vCPUs of one driver domain
//! working on different contexts. After each run the page references are
//! checked to balance.
//!
//! The simulated host serialises its services behind one machine mutex, so
//! the second group runs the same work over a host of the bench's own
//! whose services touch only per-thread state (frames computed from gfns,
//! a per-thread page-reference count, a flat table per thread for the
//! IOMMU entries): what is left to contend on is the engine's own locks
//! and gates. Results in design/performance.md.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, Sbdf};
use pviommu_hv::engine::Hypervisor;
use pviommu_hv::iommu::{
    BackendCaps, DeviceFacts, FlushGather, HwContext, IommuBackend, OwnTables, TableFormat,
};
use pviommu_hv::pgtable::TableMemory;
use pviommu_hv::platform::{
    CheckedTarget, DomainInfo, PageKind, PageLookup, Platform, ReservedRange, XsmAction,
};
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::{Bfn, Engine, Errno, Mfn};

const PAGES: u64 = 256;
const BATCH: u64 = 256;

/// A host with 8 guests (domids 1..=8) and a device model for each (11..=18).
fn host() -> (SharedSim, Arc<Engine>) {
    let mut m = SimMachine::new(8 * (PAGES + 64) + 8192, Format::Vtd, 64);
    for i in 1..=8u16 {
        m.create_domain(
            DomId(i),
            DomainSpec {
                pages: PAGES,
                privileged: false,
                device_model_of: None,
            },
        )
        .unwrap();
        m.create_domain(
            DomId(10 + i),
            DomainSpec {
                pages: 32,
                privileged: false,
                device_model_of: Some(DomId(i)),
            },
        )
        .unwrap();
    }
    let e = Engine::new(Default::default(), &m).unwrap();
    (SharedSim::new(m), Arc::new(e))
}

/// One worker on the simulated host.
fn work(sim: &SharedSim, e: &Engine, caller: DomId, target: DomId, ctx: ContextId, iters: u64) {
    rounds(&mut sim.handle(caller), e, caller, target, ctx, iters);
}

/// `iters` rounds of map BATCH pages of `target`, then unmap them, on host `h`.
fn rounds(
    h: &mut impl Hypervisor,
    e: &Engine,
    caller: DomId,
    target: DomId,
    ctx: ContextId,
    iters: u64,
) {
    let info = h.domain_info(caller).unwrap();
    let mut bfns = Vec::with_capacity(BATCH as usize);
    for _ in 0..iters {
        bfns.clear();
        for g in 0..BATCH {
            let req = MapRequest {
                context: ctx,
                domid: target,
                gfn: Gfn(g),
                perms: Permissions::RW,
                attr: MemAttr::WriteBack,
                grant: false,
            };
            bfns.push(e.map(h, caller, &info, &req).unwrap());
        }
        // The flush of the context worked in, as a batch hypercall ends.
        e.finish_contexts(h, caller, 1 << ctx.0);
        for b in &bfns {
            e.unmap(h, caller, ctx, *b).unwrap();
        }
        e.finish_contexts(h, caller, 1 << ctx.0);
    }
}

fn run(
    threads: usize,
    same_driver: bool,
    iters: u64,
    sim: &SharedSim,
    e: &Arc<Engine>,
    ctxs: &[ContextId],
) -> Duration {
    let start = Instant::now();
    let mut hs = vec![];
    for (t, &dom0_ctx) in ctxs.iter().enumerate().take(threads) {
        let (sim, e) = (sim.clone(), e.clone());
        let (caller, target, ctx) = if same_driver {
            (DomId::DOM0, DomId(1 + t as u16), dom0_ctx)
        } else {
            (
                DomId(11 + t as u16),
                DomId(1 + t as u16),
                ContextId::DEFAULT,
            )
        };
        hs.push(std::thread::spawn(move || {
            work(&sim, &e, caller, target, ctx, iters)
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(
        sim.lock().total_page_refs(),
        0,
        "page references out of balance"
    );
    elapsed
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("threads: map+unmap per page");
    group.sample_size(10);
    for (name, same_driver) in [("driver domains", false), ("contexts of dom0", true)] {
        let (sim, e) = host();
        let mut ctxs = vec![ContextId::DEFAULT];
        let mut h0 = sim.handle(DomId::DOM0);
        for _ in 1..8 {
            ctxs.push(e.context_create(&mut h0, DomId::DOM0).unwrap());
        }
        for threads in [1usize, 2, 4, 8] {
            group.throughput(Throughput::Elements(threads as u64 * BATCH));
            group.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &t| {
                b.iter_custom(|iters| run(t, same_driver, iters, &sim, &e, &ctxs));
            });
        }
    }
    group.finish();
}

/// A host whose services touch only this thread's state: the engine's
/// locks and gates are all the threads share.
struct ThreadHost {
    /// Page references held (must come back to 0).
    refs: i64,
    /// IOMMU entries by BFN offset in the window.
    ptes: Vec<u64>,
    window_start: u64,
    /// Which of the table arenas this host allocates from.
    arena: usize,
    /// Frames of the engine's own contexts' tables. Each host allocates
    /// from its own arena (frame number = arena << 24 | index), but a
    /// driver domain's flush releases the emptied tables of all its
    /// contexts, whichever thread runs it: any host may reach any frame.
    /// Each arena has a lock of its own, uncontended but for that.
    tables: Arc<Vec<Padded>>,
}

/// An arena's lock on lines of its own: two threads' arenas side by side
/// would bounce one line (two, with the adjacent-line prefetcher) between
/// their cores at every table access, which is the bench host's cost, not
/// the engine's.
#[repr(align(128))]
struct Padded(Mutex<Arena>);

impl std::ops::Deref for Padded {
    type Target = Mutex<Arena>;
    fn deref(&self) -> &Mutex<Arena> {
        &self.0
    }
}

/// Table frames with their present counts, and the free ones.
#[derive(Default)]
struct Arena {
    frames: Vec<([u64; 512], u16)>,
    free: Vec<usize>,
}

const ARENA_SHIFT: u32 = 24;

impl ThreadHost {
    fn frame<R>(&self, table: Mfn, f: impl FnOnce(&mut ([u64; 512], u16)) -> R) -> R {
        let arena = &self.tables[(table.0 >> ARENA_SHIFT) as usize];
        let mut a = arena.lock().unwrap();
        f(&mut a.frames[(table.0 & ((1 << ARENA_SHIFT) - 1)) as usize])
    }
}

impl TableMemory for ThreadHost {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        let mut a = self.tables[self.arena].lock().unwrap();
        let i = match a.free.pop() {
            Some(i) => {
                a.frames[i] = ([0; 512], 0);
                i
            }
            None => {
                a.frames.push(([0; 512], 0));
                a.frames.len() - 1
            }
        };
        Ok(Mfn((self.arena as u64) << ARENA_SHIFT | i as u64))
    }
    fn free_table(&mut self, table: Mfn) {
        let arena = &self.tables[(table.0 >> ARENA_SHIFT) as usize];
        let i = (table.0 & ((1 << ARENA_SHIFT) - 1)) as usize;
        arena.lock().unwrap().free.push(i);
    }
    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.frame(table, |f| f.0[index])
    }
    fn write_entry(&mut self, table: Mfn, index: usize, raw: u64) {
        self.frame(table, |f| f.0[index] = raw)
    }
    fn present_count(&self, table: Mfn) -> u16 {
        self.frame(table, |f| f.1)
    }
    fn set_present_count(&mut self, table: Mfn, count: u16) {
        self.frame(table, |f| f.1 = count)
    }
}

const RAM_END: u64 = 1 << 24;

impl Platform for ThreadHost {
    fn copy_from_guest(&mut self, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        Err(Errno::Fault)
    }
    fn copy_to_guest(&mut self, _: u64, _: &[u8]) -> Result<(), Errno> {
        Err(Errno::Fault)
    }
    fn domain_info(&self, domid: DomId) -> Option<DomainInfo> {
        Some(DomainInfo {
            control: domid == DomId::DOM0,
            target: (domid.0 > 10).then(|| DomId(domid.0 - 10)),
            ..DomainInfo::default()
        })
    }
    fn xsm_check(&self, _: DomId, _: Option<DomId>, _: XsmAction) -> Result<(), Errno> {
        Ok(())
    }
    fn get_page(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        _: bool,
        target: CheckedTarget<'_>,
    ) -> Result<PageLookup, Errno> {
        // (Never moved here: no domain dies. The check is the contract's.)
        if !target.still_checked() {
            return Err(Errno::Srch);
        }
        self.refs += 1;
        Ok(PageLookup {
            kind: PageKind::RamRw,
            mfn: Some(Mfn((domid.0 as u64) << 16 | gfn.0)),
        })
    }
    fn put_page(&mut self, _: Mfn, _: bool) {
        self.refs -= 1;
    }
    fn ram_end(&self) -> Mfn {
        Mfn(RAM_END)
    }
    fn reserved_range(&self, _: usize) -> Option<ReservedRange> {
        None
    }
    fn should_preempt(&mut self) -> bool {
        false
    }
    fn random_seed(&self) -> u64 {
        0x5eed
    }
    fn notify_revoked(&mut self, _: DomId) {}
}

impl IommuBackend for ThreadHost {
    fn iommu_caps(&self) -> BackendCaps {
        BackendCaps {
            max_contexts: 16,
            features: 0,
            page_sizes: 1 << 12,
            address_bits: 48,
            own_tables: Some(OwnTables {
                format: TableFormat::Vtd {
                    snoop_control: true,
                },
                levels: 4,
            }),
            default_context_attrs: false,
            default_context_snooped: true,
        }
    }
    fn iommu_map(
        &mut self,
        _: DomId,
        ctx: ContextId,
        bfn: Bfn,
        mfn: Mfn,
        _: Permissions,
        _: MemAttr,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let i = (bfn.0 - self.window_start) as usize;
        if i >= self.ptes.len() {
            self.ptes.resize(i + 1, 0);
        }
        self.ptes[i] = mfn.0 << 12 | 3;
        gather.add(ctx, bfn, 0)
    }
    fn iommu_unmap(
        &mut self,
        _: DomId,
        ctx: ContextId,
        bfn: Bfn,
        gather: &mut FlushGather,
    ) -> Result<(), Errno> {
        let i = (bfn.0 - self.window_start) as usize;
        if let Some(p) = self.ptes.get_mut(i) {
            *p = 0;
        }
        gather.add(ctx, bfn, 0)
    }
    fn iommu_flush(&mut self, _: DomId, _: &FlushGather) -> Result<(), Errno> {
        Ok(())
    }
    fn hw_context_create(&mut self, _: DomId, ctx: ContextId, _: Mfn) -> Result<HwContext, Errno> {
        Ok(HwContext(ctx.0))
    }
    fn hw_context_destroy(&mut self, _: HwContext) -> Result<(), Errno> {
        Ok(())
    }
    fn owns_devices(&self, _: DomId) -> bool {
        false
    }
    fn hw_flush(&mut self, _: HwContext, _: Bfn, _: Bfn) -> Result<(), Errno> {
        Ok(())
    }
    fn devices_lock(&mut self) {}
    fn devices_unlock(&mut self) {}
    fn device_facts(&self, _: Sbdf) -> Option<DeviceFacts> {
        None
    }
    fn device_attach(&mut self, _: Sbdf, _: HwContext, _: Mfn) -> Result<(), Errno> {
        Err(Errno::NoDev)
    }
    fn device_detach(&mut self, _: Sbdf, _: HwContext) -> Result<(), Errno> {
        Err(Errno::NoDev)
    }
}

fn thread_host(e: &Engine, arena: usize, tables: &Arc<Vec<Padded>>) -> ThreadHost {
    ThreadHost {
        refs: 0,
        ptes: Vec::new(),
        window_start: e.window().start,
        arena,
        tables: tables.clone(),
    }
}

/// Run `threads` threads, thread `t` on its own host `hosts[t]` (each
/// behind a lock only its thread takes), kept across runs with the page
/// references it holds.
fn run_own_hosts(
    threads: usize,
    same_driver: bool,
    iters: u64,
    e: &Arc<Engine>,
    hosts: &Arc<Vec<Mutex<ThreadHost>>>,
) -> Duration {
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let e = e.clone();
            let hosts = hosts.clone();
            std::thread::spawn(move || {
                let mut h = hosts[t].lock().unwrap();
                let (caller, ctx) = if same_driver {
                    // Contexts of the engine's own (1..=7): each thread
                    // writes the engine's tables, as a mediator with a
                    // context per vGPU does.
                    (DomId::DOM0, ContextId(1 + t as u32 % 7))
                } else {
                    (DomId(11 + t as u16), ContextId::DEFAULT)
                };
                rounds(&mut *h, &e, caller, DomId(1 + t as u16), ctx, iters);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let elapsed = start.elapsed();
    // Summed: with threads of one driver domain in one context (more
    // threads than contexts), one thread's flush may release pages another
    // thread's host referenced.
    let refs: i64 = hosts.iter().map(|h| h.lock().unwrap().refs).sum();
    assert_eq!(refs, 0, "page references out of balance");
    elapsed
}

fn bench_own_hosts(c: &mut Criterion) {
    let mut group = c.benchmark_group("threads, per-thread host: map+unmap per page");
    group.sample_size(10);
    for (name, same_driver) in [("driver domains", false), ("contexts of dom0", true)] {
        let e = Arc::new(Engine::new(Default::default(), &thread_host_probe()).unwrap());
        let tables: Arc<Vec<Padded>> = Arc::new(
            (0..8)
                .map(|_| Padded(Mutex::new(Arena::default())))
                .collect(),
        );
        let hosts: Vec<Mutex<ThreadHost>> = (0..8)
            .map(|t| Mutex::new(thread_host(&e, t, &tables)))
            .collect();
        // Context t is created on host t: its tables are in arena t.
        for h in hosts.iter().skip(1) {
            e.context_create(&mut *h.lock().unwrap(), DomId::DOM0)
                .unwrap();
        }
        let hosts = Arc::new(hosts);
        for threads in [1usize, 2, 4, 8] {
            group.throughput(Throughput::Elements(threads as u64 * BATCH));
            group.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &t| {
                b.iter_custom(|iters| run_own_hosts(t, same_driver, iters, &e, &hosts));
            });
        }
        assert_eq!(e.state().mapped_pages(), 0);
    }
    group.finish();
}

/// A host to size the engine's window from (its RAM end and IOMMU width).
fn thread_host_probe() -> ThreadHost {
    ThreadHost {
        refs: 0,
        ptes: Vec::new(),
        window_start: 0,
        arena: 0,
        tables: Arc::new(vec![Padded(Mutex::new(Arena::default()))]),
    }
}

criterion_group!(benches, bench, bench_own_hosts);
criterion_main!(benches);
