//! Map + unmap throughput with 1, 2, 4 and 8 threads, each a different
//! driver domain (a device model) mapping its own guest's pages, through
//! the engine's real lock protocol over the shared simulated host (every
//! hypervisor service locks the machine only for its own duration, as Xen's
//! primitives do). Then the same with threads as vCPUs of one driver domain
//! working on different contexts. After each run the page references are
//! checked to balance.
//!
//! The engine has one lock today: this bench shows how far that goes on the
//! cores the machine has (see design/performance.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pviommu_abi::{ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions};
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SharedSim, SimMachine};
use pviommu_hv::Engine;

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

/// One worker: `iters` rounds of map BATCH pages then unmap them.
fn work(sim: &SharedSim, e: &Engine, caller: DomId, target: DomId, ctx: ContextId, iters: u64) {
    let mut h = sim.handle(caller);
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
            bfns.push(e.map(&mut h, caller, &info, &req).unwrap());
        }
        e.finish(&mut h, caller);
        for b in &bfns {
            e.unmap(&mut h, caller, ctx, *b).unwrap();
        }
        e.finish(&mut h, caller);
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

criterion_group!(benches, bench);
criterion_main!(benches);
