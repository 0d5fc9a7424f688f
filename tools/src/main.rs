//! `pviommu`: the PV-IOMMU command-line tool.
//!
//! `pviommu demo` runs the main job on the embedded simulated machine: a GPU
//! mediator in dom0 maps a guest's pages through the hypercall ABI and the
//! simulated device reads them through the IOMMU.

use std::process::ExitCode;

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, Request};
use pviommu_hv::config::Config;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;

const GUEST: DomId = DomId(1);

fn demo() -> Result<(), String> {
    let mut m = SimMachine::new(8192, Format::Vtd, 64);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: 1024,
            privileged: false,
            device_model_of: None,
        },
    )
    .map_err(|e| format!("creating the guest: {e}"))?;
    let buffers: Vec<u64> = vec![0x10, 0x11, 0x12, 0x200, 0x201, 0x3ff];
    for g in &buffers {
        m.write_guest(
            GUEST,
            Gfn(*g),
            0,
            format!("guest buffer at gfn {g:#x}").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    }
    let mut e = Engine::new(Config::default(), &m).map_err(|e| e.to_string())?;
    let caps = m
        .guest_query_caps(&mut e, DomId::DOM0)
        .map_err(|e| e.to_string())?;
    println!(
        "PV-IOMMU v{}.{}: BFN window {:#x}..{:#x}, batches of up to {} ops, quota {}",
        caps.version >> 16,
        caps.version & 0xffff,
        caps.bfn_window_start,
        caps.bfn_window_end,
        caps.max_batch_ops,
        caps.quota
    );
    let mut ops: Vec<_> = buffers
        .iter()
        .map(|g| {
            Request::Map(MapRequest {
                context: ContextId::DEFAULT,
                domid: GUEST,
                gfn: Gfn(*g),
                perms: Permissions::RW,
                attr: MemAttr::WriteBack,
                grant: false,
            })
            .encode()
        })
        .collect();
    let calls = m
        .guest_batch_all(&mut e, DomId::DOM0, &mut ops)
        .map_err(|e| e.to_string())?;
    println!(
        "dom0 mapped {} pages of {GUEST} in {calls} hypercall(s), {} IOTLB flush(es)",
        ops.len(),
        m.flushes
    );
    println!("{:>8}  {:>10}  device read through the IOMMU", "gfn", "bfn");
    for (g, op) in buffers.iter().zip(&ops) {
        if op.status != 0 {
            return Err(format!("map of gfn {g:#x} failed: {}", op.status));
        }
        let bytes = m
            .dma_read(DomId::DOM0, ContextId::DEFAULT, op.bfn << 12, 26)
            .map_err(|f| format!("DMA fault: {f:?}"))?;
        println!(
            "{g:>#8x}  {:>#10x}  {:?}",
            op.bfn,
            String::from_utf8_lossy(&bytes).trim_end_matches('\0')
        );
    }
    let mut unmaps: Vec<_> = ops
        .iter()
        .map(|o| {
            Request::Unmap {
                context: ContextId::DEFAULT,
                bfn: Bfn(o.bfn),
            }
            .encode()
        })
        .collect();
    m.guest_batch_all(&mut e, DomId::DOM0, &mut unmaps)
        .map_err(|e| e.to_string())?;
    let fault = m.dma_read(DomId::DOM0, ContextId::DEFAULT, ops[0].bfn << 12, 8);
    println!(
        "after unmap: DMA at bfn {:#x} -> {}; page references held: {}",
        ops[0].bfn,
        match fault {
            Ok(_) => "READ (unexpected!)".to_string(),
            Err(f) => format!("IOMMU fault ({:?})", f.reason),
        },
        m.total_page_refs()
    );
    Ok(())
}

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    let r = match arg.as_deref() {
        Some("demo") | None => demo(),
        Some(other) => Err(format!("unknown command {other:?} (try: demo)")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pviommu: {e}");
            ExitCode::FAILURE
        }
    }
}
