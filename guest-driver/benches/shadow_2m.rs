//! A guest's 2 MiB GPU pages through the whole mediator path on the
//! simulated machine (the real engine behind the in-process transport):
//! build and teardown of the shadow of 64 2 MiB pages (32 Ki leaves), each
//! page shadowed page by page (a mapper without extents: 512 page maps, a
//! shadow-only table of 512 leaves) and by one extent (one extent op, one
//! 2 MiB shadow entry), side by side in one run.

use criterion::{criterion_group, Criterion};
use pviommu_abi::ContextId;
use pviommu_guest::shadow::ppgtt_format::{PRESENT, PS, RW};
use pviommu_guest::shadow::{
    Bfn, DomId, FrameMapper, Gfn, HeapShadowMemory, MapError, ShadowPpgtt,
};
use pviommu_guest::transport::in_process::{InProcess, SharedSim};
use pviommu_guest::Client;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};

const GUEST: DomId = DomId(1);
const ROOT: u64 = 1;
const PDP: u64 = 2;
const PD: u64 = 3;
/// 2 MiB guest pages, at GMA k * 2 MiB, frames from 512 * (k + 1).
const PAGES_2M: u64 = 64;

fn put(m: &mut SimMachine, gfn: u64, index: u64, value: u64) {
    m.write_guest(GUEST, Gfn(gfn), (index * 8) as usize, &value.to_le_bytes())
        .expect("guest table frame");
}

fn world() -> SharedSim {
    let guest_pages = 512 * (PAGES_2M + 1);
    // dom0 512 pages: the guest's gfn 512 k is frame 512 (k + 1), so its
    // extents are aligned machine runs (superpages in context 0).
    let mut m = SimMachine::new(guest_pages + 4096, Format::Vtd, 512);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: guest_pages,
            privileged: false,
            device_model_of: None,
        },
    )
    .expect("guest fits");
    put(&mut m, ROOT, 0, (PDP << 12) | PRESENT | RW);
    put(&mut m, PDP, 0, (PD << 12) | PRESENT | RW);
    for k in 0..PAGES_2M {
        put(&mut m, PD, k, ((512 * (k + 1)) << 12) | PRESENT | RW | PS);
    }
    SharedSim::new(m, Default::default()).expect("engine")
}

/// The client as a mapper without extents: the shadow maps each 2 MiB
/// page page by page.
struct PageByPage<'a>(&'a mut Client<InProcess>);

impl FrameMapper for PageByPage<'_> {
    fn map(&mut self, domid: DomId, gfns: &[Gfn], writable: &[bool]) -> Vec<Result<Bfn, MapError>> {
        self.0.map(domid, gfns, writable)
    }
    fn unmap(&mut self, bfns: &[Bfn]) {
        FrameMapper::unmap(self.0, bfns)
    }
}

/// Build and tear down the shadow once; the leaves it mapped and the 2 MiB
/// shadow entries among them.
fn round(
    sim: &SharedSim,
    mapper: &mut (impl FrameMapper + ?Sized),
    mem: &mut HeapShadowMemory,
) -> (u64, u64) {
    let reader = sim.reader(GUEST);
    let (shadow, r) = ShadowPpgtt::build(&reader, mapper, mem, GUEST, Gfn(ROOT));
    assert_eq!(r.leaves_mapped, PAGES_2M * 512, "{r:?}");
    assert_eq!(shadow.teardown(mapper, mem), PAGES_2M * 512);
    (r.leaves_mapped, r.extents_mapped)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("shadow 64 x 2 MiB guest pages, build + teardown");
    group.sample_size(20);
    for extents in [false, true] {
        let sim = world();
        let mut client = Client::open(sim.transport(DomId::DOM0)).expect("client");
        let mut mem = HeapShadowMemory::new();
        // Once, for the record: hypercalls a round, and what the IOMMU
        // holds for the first page while the shadow is built.
        let before = client.stats().hypercalls;
        let reader = sim.reader(GUEST);
        let (shadow, r) = if extents {
            ShadowPpgtt::build(&reader, &mut client, &mut mem, GUEST, Gfn(ROOT))
        } else {
            ShadowPpgtt::build(
                &reader,
                &mut PageByPage(&mut client),
                &mut mem,
                GUEST,
                Gfn(ROOT),
            )
        };
        let first = shadow.leaves(&mem).first().map(|l| l.1).expect("a leaf");
        let level = sim
            .lock()
            .0
            .context_leaf(DomId::DOM0, ContextId::DEFAULT, first)
            .map(|l| l.0);
        let built = client.stats().hypercalls - before;
        if extents {
            shadow.teardown(&mut client, &mut mem);
        } else {
            shadow.teardown(&mut PageByPage(&mut client), &mut mem);
        }
        eprintln!(
            "{}: {} leaves, {} 2 MiB shadow entries, {} hypercalls to build, {} in all, \
             IOMMU leaf level of the first BFN {:?}",
            if extents { "extents" } else { "page by page" },
            r.leaves_mapped,
            r.extents_mapped,
            built,
            client.stats().hypercalls - before,
            level
        );
        let name = if extents { "extents" } else { "page_by_page" };
        group.bench_function(name, |b| {
            b.iter(|| {
                if extents {
                    round(&sim, &mut client, &mut mem)
                } else {
                    round(&sim, &mut PageByPage(&mut client), &mut mem)
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
