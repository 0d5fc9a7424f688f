//! Batched map + unmap per 4 KiB page, VT-d format, batches of 64/512/1024, on the
//! simulated machine. Two paths side by side in one run:
//! * `hypercall`: the full entry point — batch header and op array copied in
//!   from and out to the caller's (simulated) memory, parse, permission,
//!   BFN allocation, page-table writes, one IOTLB flush per batch;
//! * `engine`: the same engine calls without the guest copies;
//! * `engine, own context`: the same into a context of dom0's own, whose
//!   tables the engine writes itself (the host's IOMMU model does no work
//!   of its own there: no refill after a flush, coherent table walks);
//! * `..., 2 MiB extents` (batches of 512 and 1024): the same pages by
//!   extents, an op each 512 (`extent_rows`); `aligned frames`: over a
//!   guest whose frames are 2 MiB-aligned runs, one superpage entry each;
//! * `floor-pte-store`: the same VT-d entries written and cleared through
//!   the page-table walker in plain memory, nothing else;
//! * `floor-platform`: what the simulated host does for the engine path's
//!   pages (page lookup and reference, its own IOMMU map and unmap, the
//!   flushes, the release), nothing of the engine;
//! * `floor-platform, own context`: the same for `engine, own context`
//!   (page lookup and reference, the entries written and cleared by the
//!   walker in the host's table memory, the release).
//!
//! * `reference: naive engine`: the reference design (a flat
//!   table by BFN, a hash reverse index, a free list, the PTE store) over
//!   the `floor-pte-store` memory; `reference: naive engine + host`: the
//!   same with the host's services of `floor-platform, own context`.
//!
//! `engine at scale` runs the engine path with 1 Ki, 64 Ki and 1 Mi
//! mappings already live, and the gfn hook for an unmapped gfn.
//!
//! `growth` (a summary line, printed when no filter or a filter naming
//! `growth` is given) maps 1 Mi pages from nothing and then churns
//! batches of 512 on top, timing every run call: the longest one is how
//! long a map can hold its driver lock while the tables grow.
//!
//! `whole range` (a summary line, printed when no filter or a filter
//! naming it is given) times one gfn hook that revokes every mapping of a
//! range the mediator maps whole, 512 pages to 1 GiB: the work a hook does
//! in one go, where a teardown slices it.
//!
//! `revocation drain` has a driver domain take the notices of 16 Ki
//! revoked pages through the hypercall path, one per call (`revoked_next`
//! with the previous `revoked_ack`) and in rounds of 128 of one context
//! per call (ABI 1.4, `IN_CONTEXT`, the round's acks first in the next
//! call), acknowledged by number (ABI 1.5, as the client does) and by
//! BFN alone (ABI 1.4).
//!
//! Throughput is reported per page (criterion's "elements").

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request, EXTENT_PAGES,
};
use pviommu_hv::config::Config;
use pviommu_hv::engine::MAP_CHUNK;
use pviommu_hv::pgtable::{vtd::Vtd, IoPageTable, TableMemory, TableOptions};
use pviommu_hv::platform::{DomainInfo, Platform};
use pviommu_hv::sim::reference::NaiveEngine;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Errno, Mfn};

const GUEST: DomId = DomId(1);

fn setup(pages: u64, format: Format) -> (SimMachine, Engine) {
    setup_with(pages, format, Config::default())
}

fn setup_with(pages: u64, format: Format, config: Config) -> (SimMachine, Engine) {
    let mut m = SimMachine::new(pages + 4096, format, 64);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    let e = Engine::new(config, &m).unwrap();
    (m, e)
}

/// The simulated host of the own-context rows that stand in for the
/// engine (`floor-platform, own context`, `reference: naive engine +
/// host`): a guest of `pages` pages, coherent table walks, and VT-d tables
/// in the host's memory with the options of an engine context.
fn own_context_host(pages: u64) -> (SimMachine, IoPageTable<Vtd>) {
    let (mut m, _e) = setup(pages, Format::Vtd);
    m.set_coherent_table_walks(true);
    let pt = IoPageTable::<Vtd>::with_options(&mut m, TableOptions::engine_context(4)).unwrap();
    (m, pt)
}

/// One round of the engine path: map every request, flush, unmap them all,
/// flush (what a batch of maps then a batch of unmaps does inside Xen),
/// through the engine's batch calls, a run of [`MAP_CHUNK`] ops per lock.
fn engine_round(
    e: &Engine,
    m: &mut SimMachine,
    dom0: &DomainInfo,
    reqs: &[MapRequest],
    bfns: &mut Vec<(ContextId, Bfn)>,
) {
    bfns.clear();
    let mut mapped = [Err(Errno::Inval); MAP_CHUNK];
    let mut rest = reqs;
    while !rest.is_empty() {
        let n = e.map_batch(m, DomId::DOM0, dom0, rest, &mut mapped);
        bfns.extend(
            rest.iter()
                .zip(&mapped[..n])
                .map(|(q, r)| (q.context, r.unwrap().bfn)),
        );
        rest = &rest[n..];
    }
    e.finish(m, DomId::DOM0);
    let mut unmapped = [Ok(()); MAP_CHUNK];
    let mut rest = &bfns[..];
    while !rest.is_empty() {
        let n = e.unmap_batch(m, DomId::DOM0, rest, &mut unmapped);
        debug_assert!(unmapped[..n].iter().all(|r| r.is_ok()));
        rest = &rest[n..];
    }
    e.finish(m, DomId::DOM0);
}

/// The engine path one op per call (`map`, `unmap`: a lock per op), for
/// comparison with the batch calls.
fn engine_round_single(
    e: &Engine,
    m: &mut SimMachine,
    dom0: &DomainInfo,
    reqs: &[MapRequest],
    bfns: &mut Vec<(ContextId, Bfn)>,
) {
    bfns.clear();
    for r in reqs {
        bfns.push((ContextId::DEFAULT, e.map(m, DomId::DOM0, dom0, r).unwrap()));
    }
    e.finish(m, DomId::DOM0);
    for (ctx, bfn) in bfns.iter() {
        e.unmap(m, DomId::DOM0, *ctx, *bfn).unwrap();
    }
    e.finish(m, DomId::DOM0);
}

/// The hypercall path: one batch of `maps`, then one batch of the unmap
/// `unmap` makes of each BFN answered, both through dom0's memory.
fn hypercall_round(
    m: &mut SimMachine,
    e: &Engine,
    maps: &[PvIommuOp],
    unmap: impl Fn(Bfn) -> Request,
) {
    let mut ops = maps.to_vec();
    m.guest_batch_all(e, DomId::DOM0, &mut ops).unwrap();
    let mut unmaps: Vec<PvIommuOp> = ops.iter().map(|o| unmap(Bfn(o.bfn)).encode()).collect();
    m.guest_batch_all(e, DomId::DOM0, &mut unmaps).unwrap();
    debug_assert!(unmaps.iter().all(|o| o.status == 0));
}

/// A host with a guest of `pages` and a context of dom0's own: the engine
/// writes its own tables, the host only looks pages up and references them
/// (what a mediator's GPU context does on Xen). The simulated IOMMU's own
/// work (its refill after each flush) is left out, and its table walks
/// snoop the caches, as most hosts' do.
fn own_context_engine(pages: u64) -> (SimMachine, Engine, ContextId) {
    let (mut m, e) = setup(pages, Format::Vtd);
    m.speculative_refill = false;
    m.set_coherent_table_walks(true);
    let ctx = e.context_create(&mut m, DomId::DOM0).unwrap();
    (m, e, ctx)
}

/// [`own_context_engine`] over a guest whose RAM is 2 MiB-aligned runs of
/// machine frames (as Xen populates an HVM guest where it can): an
/// extent there is one superpage entry in the engine's tables.
fn own_context_engine_in_superpages(pages: u64) -> (SimMachine, Engine, ContextId) {
    let mut m = SimMachine::new(pages + 4096, Format::Vtd, 64);
    let spec = DomainSpec {
        pages,
        privileged: false,
        device_model_of: None,
    };
    m.create_domain_in_superpages(GUEST, spec).unwrap();
    let e = Engine::new(Config::default(), &m).unwrap();
    m.speculative_refill = false;
    m.set_coherent_table_walks(true);
    let ctx = e.context_create(&mut m, DomId::DOM0).unwrap();
    (m, e, ctx)
}

/// The engine path by 2 MiB extents (ABI 1.6): each of `reqs` maps 512
/// pages in one op, and one unmap op each drops them.
fn extent_round(
    e: &Engine,
    m: &mut SimMachine,
    dom0: &DomainInfo,
    reqs: &[MapRequest],
    bfns: &mut Vec<(ContextId, Bfn)>,
) {
    bfns.clear();
    for r in reqs {
        let done = e.map_extent(m, DomId::DOM0, dom0, r).unwrap();
        bfns.push((r.context, done.mapped.bfn));
    }
    e.finish(m, DomId::DOM0);
    for &(ctx, bfn) in bfns.iter() {
        let revoked = e.unmap_extent(m, DomId::DOM0, ctx, bfn).unwrap();
        debug_assert!(!revoked);
    }
    e.finish(m, DomId::DOM0);
}

/// Map the guest's pages `0..pages` into dom0's context 0, flushed.
fn map_all(m: &mut SimMachine, e: &Engine, pages: u64) {
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs: Vec<MapRequest> = (0..pages).map(map_req).collect();
    let mut out = [Err(Errno::Inval); MAP_CHUNK];
    let mut rest = &reqs[..];
    while !rest.is_empty() {
        let n = e.map_batch(m, DomId::DOM0, &dom0, rest, &mut out);
        assert!(out[..n].iter().all(|r| r.is_ok()));
        rest = &rest[n..];
    }
    e.finish(m, DomId::DOM0);
}

fn map_req(g: u64) -> MapRequest {
    MapRequest {
        context: ContextId::DEFAULT,
        domid: GUEST,
        gfn: Gfn(g),
        perms: Permissions::RW,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("map+unmap per page (VT-d)");
    for batch in [64u64, 512, 1024] {
        group.throughput(Throughput::Elements(batch));
        // Gfns 1..: not 2 MiB aligned in machine frames, so no superpage
        // folding; the common case for scattered guest buffers.
        let (mut m, e) = setup(batch + 8, Format::Vtd);
        let maps: Vec<PvIommuOp> = (1..=batch)
            .map(|g| Request::Map(map_req(g)).encode())
            .collect();
        group.bench_with_input(BenchmarkId::new("hypercall", batch), &batch, |b, _| {
            b.iter(|| {
                hypercall_round(&mut m, &e, &maps, |bfn| Request::Unmap {
                    context: ContextId::DEFAULT,
                    bfn,
                })
            })
        });
        let (mut m, e) = setup(batch + 8, Format::Vtd);
        let reqs: Vec<MapRequest> = (1..=batch).map(map_req).collect();
        let mut bfns = Vec::with_capacity(batch as usize);
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        group.bench_with_input(BenchmarkId::new("engine", batch), &batch, |b, _| {
            b.iter(|| engine_round(&e, &mut m, &dom0, &reqs, &mut bfns))
        });
        if batch == 512 {
            group.bench_with_input(
                BenchmarkId::new("engine, op by op", batch),
                &batch,
                |b, _| b.iter(|| engine_round_single(&e, &mut m, &dom0, &reqs, &mut bfns)),
            );
        }
        // Into a context of dom0's own (`own_context_engine`).
        let (mut m, e, ctx) = own_context_engine(batch + 8);
        let reqs: Vec<MapRequest> = (1..=batch)
            .map(|g| MapRequest {
                context: ctx,
                ..map_req(g)
            })
            .collect();
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        group.bench_with_input(
            BenchmarkId::new("engine, own context", batch),
            &batch,
            |b, _| b.iter(|| engine_round(&e, &mut m, &dom0, &reqs, &mut bfns)),
        );
        if batch == 512 {
            // The same gfns in descending order (a PV guest's frames as Xen
            // hands them out, a mediator's maps in any order): no two ops
            // ask for consecutive gfns.
            let falling: Vec<MapRequest> = reqs.iter().rev().copied().collect();
            group.bench_with_input(
                BenchmarkId::new("engine, own context, gfns falling", batch),
                &batch,
                |b, _| b.iter(|| engine_round(&e, &mut m, &dom0, &falling, &mut bfns)),
            );
        }
        if batch % EXTENT_PAGES == 0 {
            extent_rows(&mut group, batch);
        }
    }
    group.finish();
}

/// The same pages by 2 MiB extents (ABI 1.6: an op maps or unmaps 512
/// pages), from gfn 0, on the page rows' host (the guest's frames one run,
/// not 2 MiB aligned: no superpage, so the rows compare the ops and not the
/// entries): through the hypercall into context 0, the engine into context
/// 0, and the engine into a context of its own; last, the engine into a
/// context of its own over 2 MiB-aligned frames, one superpage entry an
/// extent (`aligned frames`). The Xen-in-QEMU measure times extents over
/// aligned frames (one superpage entry each).
fn extent_rows(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    batch: u64,
) {
    let extents = |context| -> Vec<MapRequest> {
        (0..batch / EXTENT_PAGES)
            .map(|x| MapRequest {
                context,
                ..map_req(x * EXTENT_PAGES)
            })
            .collect()
    };
    let (mut m, e) = setup(batch + 8, Format::Vtd);
    let maps: Vec<PvIommuOp> = extents(ContextId::DEFAULT)
        .into_iter()
        .map(|r| Request::MapExtent(r).encode())
        .collect();
    group.bench_with_input(
        BenchmarkId::new("hypercall, 2 MiB extents", batch),
        &batch,
        |b, _| {
            b.iter(|| {
                hypercall_round(&mut m, &e, &maps, |bfn| Request::UnmapExtent {
                    context: ContextId::DEFAULT,
                    bfn,
                })
            })
        },
    );
    let (mut m, e) = setup(batch + 8, Format::Vtd);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs = extents(ContextId::DEFAULT);
    let mut bfns = Vec::new();
    group.bench_with_input(
        BenchmarkId::new("engine, 2 MiB extents", batch),
        &batch,
        |b, _| b.iter(|| extent_round(&e, &mut m, &dom0, &reqs, &mut bfns)),
    );
    let (mut m, e, ctx) = own_context_engine(batch + 8);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs = extents(ctx);
    group.bench_with_input(
        BenchmarkId::new("engine, own context, 2 MiB extents", batch),
        &batch,
        |b, _| b.iter(|| extent_round(&e, &mut m, &dom0, &reqs, &mut bfns)),
    );
    let (mut m, e, ctx) = own_context_engine_in_superpages(batch + 8);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let reqs = extents(ctx);
    group.bench_with_input(
        BenchmarkId::new("engine, own context, 2 MiB extents, aligned frames", batch),
        &batch,
        |b, _| b.iter(|| extent_round(&e, &mut m, &dom0, &reqs, &mut bfns)),
    );
    // The same beside one more extent of the guest kept mapped in their
    // 64 MiB region (a mediator's steady state: many extents of a guest):
    // the cell never empties, and each map finds another record there.
    let (mut m, e, ctx) = own_context_engine_in_superpages(batch + EXTENT_PAGES);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let kept = MapRequest {
        context: ctx,
        ..map_req(batch)
    };
    e.map_extent(&mut m, DomId::DOM0, &dom0, &kept).unwrap();
    e.finish(&mut m, DomId::DOM0);
    let reqs = extents(ctx);
    group.bench_with_input(
        BenchmarkId::new(
            "engine, own context, 2 MiB extents, aligned frames, beside a record",
            batch,
        ),
        &batch,
        |b, _| b.iter(|| extent_round(&e, &mut m, &dom0, &reqs, &mut bfns)),
    );
}

/// The floor: the same VT-d entries written and cleared straight through
/// the page-table walker, in plain host memory, with nothing else.
#[derive(Default)]
struct FlatTables {
    frames: Vec<[u64; 512]>,
    counts: Vec<u16>,
    free: Vec<u64>,
}

impl TableMemory for FlatTables {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        if let Some(f) = self.free.pop() {
            self.frames[f as usize] = [0; 512];
            self.counts[f as usize] = 0;
            return Ok(Mfn(f));
        }
        self.frames.push([0; 512]);
        self.counts.push(0);
        Ok(Mfn(self.frames.len() as u64 - 1))
    }
    fn free_table(&mut self, t: Mfn) {
        self.free.push(t.0);
    }
    fn read_entry(&self, t: Mfn, i: usize) -> u64 {
        self.frames[t.0 as usize][i]
    }
    fn write_entry(&mut self, t: Mfn, i: usize, raw: u64) {
        self.frames[t.0 as usize][i] = raw;
    }
    fn present_count(&self, t: Mfn) -> u16 {
        self.counts[t.0 as usize]
    }
    fn set_present_count(&mut self, t: Mfn, c: u16) {
        self.counts[t.0 as usize] = c;
    }
}

fn floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("map+unmap per page (VT-d)");
    for batch in [64u64, 512, 1024] {
        group.throughput(Throughput::Elements(batch));
        let mut mem = FlatTables::default();
        let mut t = IoPageTable::<Vtd>::new(&mut mem).unwrap();
        // Same BFNs as the engine hands out (window start), scattered mfns.
        let base = 0x10_0000u64;
        group.bench_with_input(
            BenchmarkId::new("floor-pte-store", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    for i in 0..batch {
                        t.map(
                            &mut mem,
                            Bfn(base + i),
                            Mfn(7 + 3 * i),
                            Permissions::RW,
                            MemAttr::WriteBack,
                        )
                        .unwrap();
                    }
                    for i in 0..batch {
                        t.unmap(&mut mem, Bfn(base + i)).unwrap();
                    }
                    // The tables the unmaps emptied go back, as the
                    // engine's go after its flush. (Without this the
                    // floor never freed a table, so every round grew
                    // `frames` by fresh ones, and the floor measured a
                    // growing Vec: 45 µs for 64 pages, 2026-12-01.)
                    t.release_freed(&mut mem);
                })
            },
        );
    }
    group.finish();
}

/// The guest's gfns `1..=n` looked up into `mfns` as the engine looks a
/// batch's pages up (`reference::look_up_pages`: runs of `MAP_CHUNK`). The
/// floor and reference rows use it, so every row pays the same host
/// services.
fn look_up_pages(m: &mut SimMachine, n: u64, mfns: &mut Vec<Mfn>) {
    let got = pviommu_hv::sim::reference::look_up_pages(m, GUEST, Gfn(1), n, mfns);
    assert_eq!(got as u64, n, "the host looked up {got} of {n} pages");
}

/// The simulated host's own services for each page the engine path maps
/// and unmaps, and nothing of the engine: look the page up and reference
/// it, write and clear its entry in dom0's context-0 tables through the
/// host's `iommu_map`/`iommu_unmap` (Xen's own tables, write-back), one
/// IOTLB flush after the maps and one after the unmaps, release the
/// references. The engine path's time less this one is the engine's own.
fn platform_floor(c: &mut Criterion) {
    use pviommu_hv::iommu::{FlushGather, IommuBackend};
    let mut group = c.benchmark_group("map+unmap per page (VT-d)");
    for batch in [64u64, 512, 1024] {
        group.throughput(Throughput::Elements(batch));
        let (mut m, e) = setup(batch + 8, Format::Vtd);
        // The BFNs the engine would hand out: the window's first ones.
        let base = e.window().start;
        let mut mfns = Vec::with_capacity(batch as usize);
        group.bench_with_input(BenchmarkId::new("floor-platform", batch), &batch, |b, _| {
            b.iter(|| {
                let mut gather = FlushGather::default();
                look_up_pages(&mut m, batch, &mut mfns);
                for (g, &mfn) in (1..).zip(&mfns) {
                    m.iommu_map(
                        DomId::DOM0,
                        ContextId::DEFAULT,
                        Bfn(base + g),
                        mfn,
                        Permissions::RW,
                        MemAttr::WriteBack,
                        &mut gather,
                    )
                    .unwrap();
                }
                m.iommu_flush(DomId::DOM0, &gather).unwrap();
                let mut gather = FlushGather::default();
                for g in 1..=batch {
                    m.iommu_unmap(DomId::DOM0, ContextId::DEFAULT, Bfn(base + g), &mut gather)
                        .unwrap();
                }
                m.iommu_flush(DomId::DOM0, &gather).unwrap();
                for &mfn in &mfns {
                    m.put_page(mfn, true);
                }
            })
        });
        // The same for `engine, own context`: the page lookups and
        // references, and the entries written and cleared by the walker in
        // the host's (coherent) table memory, with the context's options.
        let (mut m, mut pt) = own_context_host(batch + 8);
        group.bench_with_input(
            BenchmarkId::new("floor-platform, own context", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    look_up_pages(&mut m, batch, &mut mfns);
                    for (g, &mfn) in (1..).zip(&mfns) {
                        let (rw, wb) = (Permissions::RW, MemAttr::WriteBack);
                        pt.map(&mut m, Bfn(base + g), mfn, rw, wb).unwrap();
                    }
                    for g in 1..=batch {
                        pt.unmap(&mut m, Bfn(base + g)).unwrap();
                    }
                    pt.release_freed(&mut m);
                    for &mfn in &mfns {
                        m.put_page(mfn, true);
                    }
                })
            },
        );
    }
    group.finish();
}

/// The reference design next to the engine path, in the same run: alone
/// over plain memory (`reference: naive engine`, to set against
/// `floor-pte-store`), and with the simulated host's services of
/// `floor-platform, own context` (`reference: naive engine + host`, to set
/// against `engine, own context`).
fn naive_reference(c: &mut Criterion) {
    let mut group = c.benchmark_group("map+unmap per page (VT-d)");
    for batch in [64u64, 512, 1024] {
        group.throughput(Throughput::Elements(batch));
        let base = 0x10_0000u64;
        let mut mem = FlatTables::default();
        let mut pt = IoPageTable::<Vtd>::new(&mut mem).unwrap();
        let mut naive = NaiveEngine::new(batch as u32 + 8);
        let mut bfns = Vec::with_capacity(batch as usize);
        group.bench_with_input(
            BenchmarkId::new("reference: naive engine", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    bfns.clear();
                    for g in 1..=batch {
                        let page = (GUEST, Gfn(g), Mfn(7 + 3 * g));
                        bfns.push(naive.map(&mut mem, &mut pt, base, page).unwrap());
                    }
                    for &bfn in &bfns {
                        naive.unmap(&mut mem, &mut pt, base, bfn).unwrap();
                    }
                    pt.release_freed(&mut mem);
                })
            },
        );

        let (mut m, mut pt) = own_context_host(batch + 8);
        let mut naive = NaiveEngine::new(batch as u32 + 8);
        let mut mfns = Vec::with_capacity(batch as usize);
        group.bench_with_input(
            BenchmarkId::new("reference: naive engine + host", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    bfns.clear();
                    look_up_pages(&mut m, batch, &mut mfns);
                    for (g, &mfn) in (1..).zip(&mfns) {
                        bfns.push(
                            naive
                                .map(&mut m, &mut pt, base, (GUEST, Gfn(g), mfn))
                                .unwrap(),
                        );
                    }
                    for &bfn in &bfns {
                        let mfn = naive.unmap(&mut m, &mut pt, base, bfn).unwrap();
                        m.put_page(mfn, true);
                    }
                    pt.release_freed(&mut m);
                })
            },
        );
    }
    group.finish();
}

/// The engine path with many mappings already live: per-page cost should
/// not depend on how many there are. Also the gfn hook for a gfn nobody
/// mapped, of a target that has mappings (the ballooning case).
fn scale(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine at scale (VT-d, batch 512)");
    group.sample_size(20);
    let batch = 512u64;
    for live in [1u64 << 10, 1 << 16, 1 << 20] {
        let cfg = Config {
            quota: 2 << 20,
            ..Config::default()
        };
        let (mut m, e) = setup_with(live + batch + 8, Format::Vtd, cfg);
        let dom0 = m.domain_info(DomId::DOM0).unwrap();
        for g in 0..live {
            e.map(&mut m, DomId::DOM0, &dom0, &map_req(batch + 8 + g))
                .unwrap();
        }
        e.finish(&mut m, DomId::DOM0);
        let reqs: Vec<MapRequest> = (1..=batch).map(map_req).collect();
        let mut bfns = Vec::with_capacity(batch as usize);
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("map+unmap, live", live), &live, |b, _| {
            b.iter(|| engine_round(&e, &mut m, &dom0, &reqs, &mut bfns))
        });
        // gfn 0 is never mapped; the target has `live` mappings.
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("gfn hook, unmapped gfn, live", live),
            &live,
            |b, _| b.iter(|| e.gfn_removed(&mut m, GUEST, Gfn(0))),
        );
        // Ranges of the target that nobody mapped, made log-dirty: 16 MiB
        // (order 12), VRAM dirty tracking, which a device model polls at
        // every display refresh; 1 GiB (order 18), log-dirty or a
        // superpage's type change. Per hook.
        for (row, order) in [
            ("gfn hook, 16 MiB range nobody mapped, live", 12),
            ("gfn hook, 1 GiB range nobody mapped, live", 18),
        ] {
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new(row, live), &live, |b, _| {
                b.iter(|| {
                    e.gfn_changed(
                        &mut m,
                        GUEST,
                        Gfn(1 << 40),
                        order,
                        pviommu_hv::engine::GfnChange::WriteLost,
                    )
                })
            });
        }
    }
    group.finish();
}

/// A guest with 1 Mi pages mapped by dom0 dies: Xen tears it down in
/// restartable slices (`domain_teardown`), and no slice may keep the CPU
/// long. Criterion times one slice (the mean over the slices it ran); the
/// summary line gives every slice of one whole teardown: count, median,
/// longest.
fn teardown(c: &mut Criterion) {
    use std::time::{Duration, Instant};
    const PAGES: u64 = 1 << 20;
    let cfg = Config {
        quota: 2 << 20,
        ..Config::default()
    };
    let dying_guest = || {
        let (mut m, e) = setup_with(PAGES + 8, Format::Vtd, cfg);
        map_all(&mut m, &e, PAGES);
        m.mark_dying(GUEST);
        (m, e)
    };

    // One whole teardown, every slice timed.
    let (mut m, e) = dying_guest();
    let mut cursor = 0u64;
    let mut slices = Vec::new();
    loop {
        let t = Instant::now();
        let r = e.domain_teardown(&mut m, GUEST, &mut cursor);
        slices.push(t.elapsed());
        if r.is_ok() {
            break;
        }
    }
    let total: Duration = slices.iter().sum();
    slices.sort();
    eprintln!(
        "summary: teardown of {PAGES} mapped pages: {} slices, median {:?}, longest {:?}, total {:?}",
        slices.len(),
        slices[slices.len() / 2],
        slices[slices.len() - 1],
        total
    );

    let mut group = c.benchmark_group("teardown (VT-d, 1 Mi mapped pages)");
    group.sample_size(10);
    group.bench_function("one slice", |b| {
        let mut host = None;
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let (m, e, cursor) = host.get_or_insert_with(|| {
                    let (m, e) = dying_guest();
                    (m, e, 0u64)
                });
                let t = Instant::now();
                let r = e.domain_teardown(m, GUEST, cursor);
                spent += t.elapsed();
                if r.is_ok() {
                    host = None;
                }
            }
            spent
        })
    });
    group.finish();
}

/// A driver domain drains the notices of 16 Ki revoked pages through the
/// hypercall path (ops copied in and out of its memory, parsed): one
/// notice per call, then rounds of 128 per call. The machine is set up
/// (pages mapped, the guest's pages ballooned out) outside the timing.
fn drain(c: &mut Criterion) {
    use criterion::BatchSize;
    use pviommu_abi::revoked_next::MAX_SKIP;
    const PAGES: u64 = 16 << 10;
    const ROUND: u32 = 128;
    const _: () = assert!(ROUND as u64 <= MAX_SKIP + 1);
    let revoked = || {
        let (mut m, e) = setup(PAGES + 8, Format::Vtd);
        map_all(&mut m, &e, PAGES);
        for g in 0..PAGES {
            m.balloon_out(&e, GUEST, Gfn(g)).unwrap();
        }
        (m, e)
    };
    let ack = |o: &PvIommuOp| {
        // By its number when it came with one.
        Request::RevokedAck {
            context: ContextId(o.context),
            bfn: Bfn(o.bfn),
            notice: (o.flags & pviommu_abi::revoked_next::NUMBERED != 0).then_some(o.notice),
        }
        .encode()
    };
    let mut group = c.benchmark_group("revocation drain (16 Ki notices)");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PAGES));
    group.bench_function("one per call", |b| {
        b.iter_batched(
            revoked,
            |(mut m, e)| {
                let mut ops = vec![Request::RevokedNext { numbered: false }.encode()];
                let mut n = 0;
                loop {
                    m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
                    let next = ops[ops.len() - 1];
                    if next.status != 0 {
                        break;
                    }
                    n += 1;
                    ops = vec![
                        ack(&next),
                        Request::RevokedNext { numbered: false }.encode(),
                    ];
                }
                assert_eq!(n, PAGES);
            },
            BatchSize::PerIteration,
        )
    });
    for (name, numbered) in [
        ("rounds of 128 of a context, acks by number", true),
        ("rounds of 128 of a context, acks by BFN", false),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                revoked,
                |(mut m, e)| {
                    let mut acks = Vec::new();
                    let mut n = 0;
                    loop {
                        let mut ops = std::mem::take(&mut acks);
                        let asked = ops.len();
                        ops.extend((0..ROUND).map(|skip| {
                            Request::RevokedNextIn {
                                context: ContextId::DEFAULT,
                                skip,
                                numbered,
                            }
                            .encode()
                        }));
                        m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
                        acks = ops[asked..]
                            .iter()
                            .take_while(|o| o.status == 0)
                            .map(ack)
                            .collect();
                        if acks.is_empty() {
                            break;
                        }
                        n += acks.len() as u64;
                    }
                    assert_eq!(n, PAGES);
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Every run call (up to `MAP_CHUNK` maps or unmaps under one lock) timed
/// while a driver domain grows from nothing to 1 Mi mappings and then
/// churns batches of 512 on top: count, median, 99.99th percentile and
/// longest, and the engine's heap per live mapping at 1 Mi.
fn growth(_c: &mut Criterion) {
    use std::time::Instant;
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| f.contains("growth")) {
        return;
    }
    const LIVE: u64 = 1 << 20;
    let batch = 512u64;
    let cfg = Config {
        quota: 2 << 20,
        ..Config::default()
    };
    let (mut m, e) = setup_with(LIVE + batch + 8, Format::Vtd, cfg);
    let dom0 = m.domain_info(DomId::DOM0).unwrap();
    let mut calls = Vec::new();
    let mut out = [Err(Errno::Inval); MAP_CHUNK];
    let prefill: Vec<MapRequest> = (0..LIVE).map(|g| map_req(batch + 8 + g)).collect();
    let mut rest = &prefill[..];
    while !rest.is_empty() {
        let t = Instant::now();
        let n = e.map_batch(&mut m, DomId::DOM0, &dom0, rest, &mut out);
        calls.push(t.elapsed());
        rest = &rest[n..];
    }
    e.finish(&mut m, DomId::DOM0);
    let growing = calls.len();
    let per_mapping = {
        let d = e.driver_state(DomId::DOM0).unwrap();
        d.heap_bytes() as f64 / d.live() as f64
    };
    let reqs: Vec<MapRequest> = (1..=batch).map(map_req).collect();
    let mut bfns = Vec::new();
    let mut unmapped = [Ok(()); MAP_CHUNK];
    for _ in 0..200 {
        bfns.clear();
        let mut rest = &reqs[..];
        while !rest.is_empty() {
            let t = Instant::now();
            let n = e.map_batch(&mut m, DomId::DOM0, &dom0, rest, &mut out);
            calls.push(t.elapsed());
            bfns.extend(
                out[..n]
                    .iter()
                    .map(|r| (ContextId::DEFAULT, r.unwrap().bfn)),
            );
            rest = &rest[n..];
        }
        e.finish(&mut m, DomId::DOM0);
        let mut rest = &bfns[..];
        while !rest.is_empty() {
            let t = Instant::now();
            let n = e.unmap_batch(&mut m, DomId::DOM0, rest, &mut unmapped);
            calls.push(t.elapsed());
            rest = &rest[n..];
        }
        e.finish(&mut m, DomId::DOM0);
    }
    let longest_growing = calls[..growing].iter().max().copied().unwrap_or_default();
    calls.sort();
    eprintln!(
        "summary: growth to {LIVE} live, then 200 rounds of {batch} on top: {} run calls, \
         median {:?}, p99.99 {:?}, longest {:?} (longest while growing {:?}); \
         engine heap {per_mapping:.1} bytes per live mapping",
        calls.len(),
        calls[calls.len() / 2],
        calls[calls.len() * 9999 / 10000],
        calls[calls.len() - 1],
        longest_growing,
    );
}

/// A gfn hook over a range the mediator maps whole revokes every mapping
/// in one go, with the cell's lock held (and on Xen the target's p2m write
/// lock): unlike a teardown, not in slices. A summary line (printed when
/// no filter or a filter naming `whole range` is given) times one such
/// hook per size, from 512 mapped pages (a domU's own balloon-out of order
/// 9) to 1 GiB (order 18: VRAM tracking over a range the mediator maps, a
/// superpage's type change), each after mapping the range afresh; the
/// median of 5.
fn hook_over_whole_range(_c: &mut Criterion) {
    use std::time::{Duration, Instant};
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| f.contains("whole range")) {
        return;
    }
    for order in [9u32, 12, 15, 18] {
        let pages = 1u64 << order;
        let cfg = Config {
            quota: 2 << 20,
            ..Config::default()
        };
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let (mut m, e) = setup_with(pages + 8, Format::Vtd, cfg);
                map_all(&mut m, &e, pages);
                let t = Instant::now();
                e.gfn_changed(
                    &mut m,
                    GUEST,
                    Gfn(0),
                    order,
                    pviommu_hv::engine::GfnChange::WriteLost,
                );
                let took = t.elapsed();
                let revoked = e.driver_state(DomId::DOM0).map_or(0, |d| d.revoked());
                assert_eq!(
                    revoked, pages,
                    "the hook revoked every mapping of its range"
                );
                took
            })
            .collect();
        times.sort();
        eprintln!(
            "summary: gfn hook (write lost, order {order}) over {pages} mapped pages, in one go: \
             median {:?} ({:.0} ns a mapping), longest {:?}",
            times[2],
            times[2].as_nanos() as f64 / pages as f64,
            times[4]
        );
    }
    // The same revocations in slices, as Xen now makes the two long
    // callers (patch 0002b): log-dirty enable over 1 Mi mapped pages
    // (`revoke_writes`, the domctl's continuations) and VRAM tracking
    // moving to a 1 GiB range mapped whole (`revoke_writes_in`, the
    // dm_op's), every slice timed.
    let sliced = |what: &str, pages: u64, range: Option<(u64, u64)>| {
        let cfg = Config {
            quota: 2 << 20,
            ..Config::default()
        };
        let (mut m, e) = setup_with(pages + 8, Format::Vtd, cfg);
        map_all(&mut m, &e, pages);
        m.set_log_dirty_mode(GUEST, range.is_none());
        let mut cursor = 0u64;
        let mut sweep = pviommu_hv::engine::RangeSweep::default();
        let mut slices = Vec::new();
        loop {
            let t = Instant::now();
            let r = match range {
                None => e.revoke_writes(&mut m, GUEST, &mut cursor),
                Some(r) => e.revoke_writes_in(&mut m, GUEST, r, &mut sweep),
            };
            slices.push(t.elapsed());
            if r.is_ok() {
                break;
            }
        }
        let revoked = e.driver_state(DomId::DOM0).map_or(0, |d| d.revoked());
        assert_eq!(revoked, pages, "every writable mapping revoked");
        let total: Duration = slices.iter().sum();
        slices.sort();
        eprintln!(
            "summary: {what} over {pages} mapped pages, in slices: {} slices, median {:?}, longest {:?}, total {:?}",
            slices.len(),
            slices[slices.len() / 2],
            slices[slices.len() - 1],
            total
        );
    };
    sliced("log-dirty enable", 1 << 20, None);
    sliced("VRAM range change (1 GiB)", 1 << 18, Some((0, 1 << 18)));
}

criterion_group!(
    benches,
    bench,
    floor,
    platform_floor,
    naive_reference,
    scale,
    teardown,
    drain,
    growth,
    hook_over_whole_range
);
criterion_main!(benches);
