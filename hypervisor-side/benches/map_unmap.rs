//! Batched map + unmap per 4 KiB page, VT-d format, batches of 512, on the
//! simulated machine. Two paths side by side in one run:
//! * `hypercall`: the full entry point — batch header and op array copied in
//!   from and out to the caller's (simulated) memory, parse, permission,
//!   BFN allocation, page-table writes, one IOTLB flush per batch;
//! * `engine`: the same engine calls without the guest copies.
//!
//! Throughput is reported per page (criterion's "elements").

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request,
};
use pviommu_hv::config::Config;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;

const GUEST: DomId = DomId(1);

fn setup(pages: u64, format: Format) -> (SimMachine, Engine) {
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
    let e = Engine::new(Config::default(), &m).unwrap();
    (m, e)
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
    for batch in [64u64, 512] {
        group.throughput(Throughput::Elements(batch));
        // Gfns 1..: not 2 MiB aligned in machine frames, so no superpage
        // folding; the common case for scattered guest buffers.
        let (mut m, e) = setup(batch + 8, Format::Vtd);
        let maps: Vec<PvIommuOp> = (1..=batch)
            .map(|g| Request::Map(map_req(g)).encode())
            .collect();
        group.bench_with_input(BenchmarkId::new("hypercall", batch), &batch, |b, _| {
            b.iter(|| {
                let mut ops = maps.clone();
                m.guest_batch_all(&e, DomId::DOM0, &mut ops).unwrap();
                let mut unmaps: Vec<PvIommuOp> = ops
                    .iter()
                    .map(|o| {
                        Request::Unmap {
                            context: ContextId::DEFAULT,
                            bfn: Bfn(o.bfn),
                        }
                        .encode()
                    })
                    .collect();
                m.guest_batch_all(&e, DomId::DOM0, &mut unmaps).unwrap();
                debug_assert!(unmaps.iter().all(|o| o.status == 0));
            })
        });
        let (mut m, e) = setup(batch + 8, Format::Vtd);
        let reqs: Vec<MapRequest> = (1..=batch).map(map_req).collect();
        let mut bfns = Vec::with_capacity(batch as usize);
        let dom0 = {
            use pviommu_hv::platform::Platform;
            m.domain_info(DomId::DOM0).unwrap()
        };
        group.bench_with_input(BenchmarkId::new("engine", batch), &batch, |b, _| {
            b.iter(|| {
                bfns.clear();
                for r in &reqs {
                    bfns.push(e.map(&mut m, DomId::DOM0, &dom0, r).unwrap());
                }
                e.finish(&mut m, DomId::DOM0);
                for bfn in &bfns {
                    e.unmap(&mut m, DomId::DOM0, ContextId::DEFAULT, *bfn)
                        .unwrap();
                }
                e.finish(&mut m, DomId::DOM0);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
