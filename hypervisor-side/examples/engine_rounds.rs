//! Instruction-count driver for the engine path: `rounds` rounds of map
//! 512 pages + flush + unmap them + flush, on the simulated VT-d machine,
//! through the same batch calls as the `engine` criterion bench.
//!
//! Seconds drift on shared machines; instructions do not. Use it as
//!
//! ```text
//! CARGO_PROFILE_RELEASE_DEBUG=true cargo build -q --release -p pviommu-hv --example engine_rounds
//! valgrind --tool=callgrind target/release/examples/engine_rounds 200
//! ```
//!
//! and divide the total by `rounds * 512` for instructions per page (the
//! set-up is the same for every build, so compare totals of equal rounds).
//!
//! `engine_rounds 200 hypercall` goes through the guest-facing entry point
//! instead (`SimMachine::guest_batch_all`, as the criterion `hypercall`
//! bench): the batch copied in and out of the caller's memory and parsed,
//! which is what a map costs inside Xen besides the engine.
//!
//! `engine_rounds 200 context` maps into a context of dom0's own (the
//! engine writes its own VT-d tables; the host only looks pages up and
//! references them), the context a mediator attaches its GPU to.
//!
//! With `PVIOMMU_FALLING` set, the page paths (`engine`, `hypercall`,
//! `context`) ask for the gfns in descending order: no two ops of a run
//! ask for consecutive gfns.
//!
//! With `PVIOMMU_KEEP_ONE` set, one more page stays mapped: the cell is
//! never emptied, so each round's maps take the BFNs the last round's
//! unmaps freed (in their order) rather than fresh slots.
//!
//! `engine_rounds 200 extent` maps and unmaps the same 512 pages into
//! the `context` path's context as one 2 MiB extent (ABI 1.6): one op
//! each way. The guest's RAM is in 2 MiB-aligned machine runs, as Xen
//! backs it where it can, so the extent is one superpage entry;
//! `extent-unaligned` maps the same extent over frames off a 2 MiB
//! boundary: 512 entries each way, as before superpage entries. With
//! `PVIOMMU_KEEP_EXTENT` set, another extent of the guest (gfns 512-1023)
//! stays mapped throughout, so each round's extent shares its 64 MiB
//! region with a record, as a mediator's many extents of one guest do.
//!
//! `engine_rounds 200 reference` runs the issue's reference design
//! ([`pviommu_hv::sim::reference::NaiveEngine`]) over the same host services
//! as `context` (the criterion row `reference: naive engine + host`; it
//! makes no IOTLB flush): what the engine's bookkeeping is measured
//! against, in instructions.

use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request,
};
use pviommu_hv::engine::MAP_CHUNK;
use pviommu_hv::platform::Platform;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Errno};
use std::process::ExitCode;

const GUEST: DomId = DomId(1);
const BATCH: u64 = 512;

fn main() -> ExitCode {
    let rounds: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 200,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("engine_rounds: rounds must be a number: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = std::env::args().nth(2);
    let extents = matches!(path.as_deref(), Some("extent" | "extent-unaligned"));
    let (hypercall, own_context, reference) = match path.as_deref() {
        None | Some("engine") => (false, false, false),
        Some("hypercall") => (true, false, false),
        Some("context" | "extent" | "extent-unaligned") => (false, true, false),
        Some("reference") => (false, false, true),
        Some(other) => {
            eprintln!(
                "engine_rounds: the path is `engine`, `hypercall`, `context`, `extent`, \
                 `extent-unaligned` or `reference`, not `{other}`"
            );
            return ExitCode::FAILURE;
        }
    };
    let keep_extent = extents && std::env::var_os("PVIOMMU_KEEP_EXTENT").is_some();
    let guest_pages = if keep_extent { 2 * BATCH } else { BATCH + 8 };
    let mut m = SimMachine::new(guest_pages + 4096, Format::Vtd, 64);
    let spec = DomainSpec {
        pages: guest_pages,
        privileged: false,
        device_model_of: None,
    };
    let guest = if path.as_deref() == Some("extent") {
        m.create_domain_in_superpages(GUEST, spec)
    } else {
        m.create_domain(GUEST, spec)
    };
    if let Err(e) = guest {
        eprintln!("engine_rounds: cannot create the guest: {e:?}");
        return ExitCode::FAILURE;
    }
    let e = match Engine::new(Default::default(), &m) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("engine_rounds: cannot start the engine: {err:?}");
            return ExitCode::FAILURE;
        }
    };
    let Some(dom0) = m.domain_info(DomId::DOM0) else {
        eprintln!("engine_rounds: the simulated machine has no dom0");
        return ExitCode::FAILURE;
    };
    if reference {
        return reference_rounds(&mut m, e.window().start, rounds);
    }
    let context = if own_context {
        // The simulated IOMMU's own work (its refill after each flush, and
        // with `PVIOMMU_NONCOHERENT` set the stale-line model) is not the
        // engine's.
        m.speculative_refill = false;
        m.set_coherent_table_walks(std::env::var_os("PVIOMMU_NONCOHERENT").is_none());
        match e.context_create(&mut m, DomId::DOM0) {
            Ok(c) => c,
            Err(err) => {
                eprintln!("engine_rounds: cannot create a context: {err:?}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        ContextId::DEFAULT
    };
    // Gfns 1..: not superpage-aligned, as in the criterion bench. With
    // `PVIOMMU_FALLING` set, in descending order (a PV guest's frames as
    // Xen hands them out; no two ops ask for consecutive gfns).
    let falling = std::env::var_os("PVIOMMU_FALLING").is_some();
    let reqs: Vec<MapRequest> = (1..=BATCH)
        .map(|g| if falling { BATCH + 1 - g } else { g })
        .map(|g| MapRequest {
            context,
            domid: GUEST,
            gfn: Gfn(g),
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            grant: false,
        })
        .collect();
    if hypercall {
        return hypercall_rounds(&mut m, &e, &reqs, rounds);
    }
    if extents {
        let extent = MapRequest {
            gfn: Gfn(0),
            ..reqs[0]
        };
        if keep_extent {
            let kept = MapRequest {
                gfn: Gfn(BATCH),
                ..extent
            };
            if let Err(err) = e.map_extent(&mut m, DomId::DOM0, &dom0, &kept) {
                eprintln!("engine_rounds: cannot map the extent kept: {err:?}");
                return ExitCode::FAILURE;
            }
            e.finish(&mut m, DomId::DOM0);
        }
        return extent_rounds(&mut m, &e, &dom0, &extent, rounds);
    }
    let mut bfns: Vec<(ContextId, Bfn)> = Vec::with_capacity(BATCH as usize);
    let mut mapped = [Err(Errno::Inval); MAP_CHUNK];
    let mut unmapped = [Ok(()); MAP_CHUNK];
    // `PVIOMMU_KEEP_ONE` set: one more page stays mapped throughout, so the
    // cell is never emptied and every round's maps take their BFNs from
    // the free list the round before left (a mediator's steady state)
    // instead of fresh slots.
    if std::env::var_os("PVIOMMU_KEEP_ONE").is_some() {
        let keep = [MapRequest {
            gfn: Gfn(BATCH + 1),
            ..reqs[0]
        }];
        let n = e.map_batch(&mut m, DomId::DOM0, &dom0, &keep, &mut mapped);
        if n != 1 || mapped[0].is_err() {
            eprintln!("engine_rounds: cannot map the page kept: {:?}", mapped[0]);
            return ExitCode::FAILURE;
        }
        e.finish(&mut m, DomId::DOM0);
    }
    for round in 0..rounds {
        bfns.clear();
        let mut rest = &reqs[..];
        while !rest.is_empty() {
            let n = e.map_batch(&mut m, DomId::DOM0, &dom0, rest, &mut mapped);
            for r in &mapped[..n] {
                match r {
                    Ok(ok) => bfns.push((context, ok.bfn)),
                    Err(err) => {
                        eprintln!("engine_rounds: round {round}: map failed: {err:?}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            rest = &rest[n..];
        }
        e.finish(&mut m, DomId::DOM0);
        let mut rest = &bfns[..];
        while !rest.is_empty() {
            let n = e.unmap_batch(&mut m, DomId::DOM0, rest, &mut unmapped);
            if let Some(err) = unmapped[..n].iter().find_map(|r| r.err()) {
                eprintln!("engine_rounds: round {round}: unmap failed: {err:?}");
                return ExitCode::FAILURE;
            }
            rest = &rest[n..];
        }
        e.finish(&mut m, DomId::DOM0);
    }
    println!("{rounds} rounds of {BATCH} pages mapped and unmapped");
    ExitCode::SUCCESS
}

/// The rounds by one 2 MiB extent (ABI 1.6) `req` asks for (gfns 0-511,
/// whose frames are one run), mapped in one op and unmapped in one.
fn extent_rounds(
    m: &mut SimMachine,
    e: &Engine,
    dom0: &pviommu_hv::platform::DomainInfo,
    req: &MapRequest,
    rounds: u64,
) -> ExitCode {
    for round in 0..rounds {
        let bfn = match e.map_extent(m, DomId::DOM0, dom0, req) {
            Ok(done) => done.mapped.bfn,
            Err(err) => {
                eprintln!("engine_rounds: round {round}: extent map failed: {err:?}");
                return ExitCode::FAILURE;
            }
        };
        e.finish(m, DomId::DOM0);
        if let Err(err) = e.unmap_extent(m, DomId::DOM0, req.context, bfn) {
            eprintln!("engine_rounds: round {round}: extent unmap failed: {err:?}");
            return ExitCode::FAILURE;
        }
        e.finish(m, DomId::DOM0);
    }
    println!("{rounds} rounds of a 2 MiB extent mapped and unmapped");
    ExitCode::SUCCESS
}

/// The rounds through the guest-facing entry point: one batch of maps, one
/// of unmaps, each copied in from and out to dom0's simulated memory.
fn hypercall_rounds(m: &mut SimMachine, e: &Engine, reqs: &[MapRequest], rounds: u64) -> ExitCode {
    let maps: Vec<PvIommuOp> = reqs.iter().map(|r| Request::Map(*r).encode()).collect();
    for round in 0..rounds {
        let mut ops = maps.clone();
        if let Err(err) = m.guest_batch_all(e, DomId::DOM0, &mut ops) {
            eprintln!("engine_rounds: round {round}: map batch failed: {err:?}");
            return ExitCode::FAILURE;
        }
        let mut unmaps: Vec<PvIommuOp> = Vec::with_capacity(ops.len());
        for o in &ops {
            if o.status != 0 {
                eprintln!(
                    "engine_rounds: round {round}: a map failed: status {}",
                    o.status
                );
                return ExitCode::FAILURE;
            }
            let unmap = Request::Unmap {
                context: ContextId::DEFAULT,
                bfn: Bfn(o.bfn),
            };
            unmaps.push(unmap.encode());
        }
        if let Err(err) = m.guest_batch_all(e, DomId::DOM0, &mut unmaps) {
            eprintln!("engine_rounds: round {round}: unmap batch failed: {err:?}");
            return ExitCode::FAILURE;
        }
        if let Some(o) = unmaps.iter().find(|o| o.status != 0) {
            eprintln!(
                "engine_rounds: round {round}: an unmap failed: status {}",
                o.status
            );
            return ExitCode::FAILURE;
        }
    }
    println!("{rounds} rounds of {BATCH} pages mapped and unmapped through the hypercall");
    ExitCode::SUCCESS
}

/// The reference design's rounds over the host services of `context`: the
/// page looked up and referenced, its entry written by the walker into the
/// host's (coherent) table memory, cleared, the reference dropped.
fn reference_rounds(m: &mut SimMachine, base: u64, rounds: u64) -> ExitCode {
    use pviommu_hv::pgtable::{vtd::Vtd, IoPageTable, TableOptions};
    use pviommu_hv::sim::reference::{look_up_pages, NaiveEngine};
    m.speculative_refill = false;
    m.set_coherent_table_walks(std::env::var_os("PVIOMMU_NONCOHERENT").is_none());
    let mut pt = match IoPageTable::<Vtd>::with_options(m, TableOptions::engine_context(4)) {
        Ok(pt) => pt,
        Err(err) => {
            eprintln!("engine_rounds: cannot make the reference's tables: {err:?}");
            return ExitCode::FAILURE;
        }
    };
    let mut naive = NaiveEngine::new(BATCH as u32 + 8);
    let mut bfns = Vec::with_capacity(BATCH as usize);
    let mut mfns = Vec::with_capacity(BATCH as usize);
    for round in 0..rounds {
        bfns.clear();
        // The pages looked up as the engine looks a batch's up: a run of
        // `MAP_CHUNK` consecutive gfns in one call to the host.
        let got = look_up_pages(m, GUEST, Gfn(1), BATCH, &mut mfns);
        if got as u64 != BATCH {
            eprintln!("engine_rounds: round {round}: the host looked up {got} of {BATCH} pages");
            return ExitCode::FAILURE;
        }
        for (g, &mfn) in (1..).zip(&mfns) {
            match naive.map(m, &mut pt, base, (GUEST, Gfn(g), mfn)) {
                Some(bfn) => bfns.push(bfn),
                None => {
                    eprintln!(
                        "engine_rounds: round {round}: the reference's map of gfn {g} failed"
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        for &bfn in &bfns {
            match naive.unmap(m, &mut pt, base, bfn) {
                Some(mfn) => m.put_page(mfn, true),
                None => {
                    eprintln!("engine_rounds: round {round}: the reference's unmap failed");
                    return ExitCode::FAILURE;
                }
            }
        }
        pt.release_freed(m);
    }
    println!("{rounds} rounds of {BATCH} pages mapped and unmapped by the reference design");
    ExitCode::SUCCESS
}
