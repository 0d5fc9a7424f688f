//! `pviommu demo` and `pviommu shadow`: a GPU mediator in dom0 on the
//! embedded simulator. It maps the guest's GPU buffers, shadows the guest's
//! PPGTT (GMA -> gfn becomes GMA -> BFN), and the simulated GPU reads each
//! buffer through GMA -> shadow PPGTT -> BFN -> IOMMU -> the guest's RAM.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use pviommu_abi::{ContextId, DomId, Gfn};
use pviommu_guest::shadow::{gpu_translate, Gma, HeapShadowMemory, ShadowPpgtt};
use pviommu_guest::transport::in_process::SharedSim;
use pviommu_guest::Client;

use crate::world::{self, page_tag, set_leaf, Buffer, BUFFERS, GUEST, PPGTT_ROOT};

/// The GPU reads page `i` of `b` through the shadow tables and the IOMMU.
fn gpu_read(
    sim: &SharedSim,
    mem: &HeapShadowMemory,
    shadow: &ShadowPpgtt,
    gma: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    let root = shadow.shadow_root().ok_or("no shadow root")?;
    let bfn = gpu_translate(mem, root, Gma(gma))
        .ok_or_else(|| format!("GPU fault: GMA {gma:#x} not present in the shadow PPGTT"))?;
    let mut g = sim.lock();
    g.0.dma_read(DomId::DOM0, ContextId::DEFAULT, bfn.0 << 12, len)
        .map_err(|f| format!("IOMMU fault at BFN {:#x}: {:?}", bfn.0, f.reason))
}

fn check_buffer(
    sim: &SharedSim,
    mem: &HeapShadowMemory,
    shadow: &ShadowPpgtt,
    b: &Buffer,
    bar: &ProgressBar,
) -> Result<u64, String> {
    let mut ok = 0;
    for i in 0..b.pages {
        let want = page_tag(b, i);
        let got = gpu_read(sim, mem, shadow, b.gma + i * 4096, want.len())?;
        if got != want.as_bytes() {
            return Err(format!(
                "{} page {i}: GPU read {:?}",
                b.name,
                String::from_utf8_lossy(&got)
            ));
        }
        ok += 1;
        bar.inc(1);
    }
    Ok(ok)
}

/// The demonstration.
pub fn run() -> Result<(), String> {
    let t0 = Instant::now();
    let sim = SharedSim::new(world::build(), Default::default()).map_err(|e| e.to_string())?;
    let mut client = Client::open(sim.transport(DomId::DOM0)).map_err(|e| e.to_string())?;
    let caps = *client.caps();
    println!("pviommu demo: a dom0 GPU mediator on the embedded simulated machine (VT-d format)");
    println!(
        "  interface v{}.{}, BFN window {:#x}..{:#x} (above RAM and 4 GiB), batches of {} ops\n",
        caps.version >> 16,
        caps.version & 0xffff,
        caps.bfn_window_start,
        caps.bfn_window_end,
        caps.max_batch_ops
    );

    // 1. Shadow the guest's PPGTT: every present leaf gets a BFN.
    let reader = sim.reader(GUEST);
    let mut mem = HeapShadowMemory::new();
    let (mut shadow, report) =
        ShadowPpgtt::build(&reader, &mut client, &mut mem, GUEST, PPGTT_ROOT);
    println!(
        "1. shadow PPGTT built: {} leaves mapped in {} hypercall(s) ({} of them under 2 MiB GPU pages, \
         each one extent of 512 BFNs), {} shadow table pages, {} refused",
        report.leaves_mapped,
        client.stats().hypercalls,
        report.extents_mapped * pviommu_abi::EXTENT_PAGES,
        report.tables,
        report.refused_total
    );

    // 2. The GPU reads every page of every buffer through GMA.
    let total: u64 = BUFFERS.iter().map(|b| b.pages).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("   GPU reads [{bar:40}] {pos}/{len} pages")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    println!("2. the GPU reads each buffer through GMA -> shadow PPGTT -> BFN -> IOMMU:");
    let mut rows = Vec::new();
    for b in &BUFFERS {
        let ok = check_buffer(&sim, &mem, &shadow, b, &bar)?;
        let root = shadow.shadow_root().ok_or("no shadow root")?;
        let bfn = gpu_translate(&mem, root, Gma(b.gma))
            .map(|x| x.0)
            .unwrap_or(0);
        rows.push((b.name, b.gma, b.gfn, bfn, b.pages, ok));
    }
    bar.finish_and_clear();
    println!(
        "   {:<12} {:>12} {:>8} {:>12} {:>6}  result",
        "buffer", "GMA", "gfn", "BFN", "pages"
    );
    for (name, gma, gfn, bfn, pages, ok) in &rows {
        println!("   {name:<12} {gma:>#12x} {gfn:>#8x} {bfn:>#12x} {pages:>6}  {ok}/{pages} pages read correctly");
    }

    // 3. The guest edits its GPU tables; the mediator syncs only what changed.
    let mut changed = Vec::new();
    {
        let mut g = sim.lock();
        let m = &mut g.0;
        let cursor = BUFFERS[5];
        // Move the cursor to a new frame with new contents.
        let new_gfn = world::BUFFER_BASE + 0x2000;
        m.write_guest(GUEST, Gfn(new_gfn), 0, b"cursor page 0 (moved)")
            .map_err(|e| e.to_string())?;
        changed.push(set_leaf(m, cursor.gma, Some(new_gfn)));
        // Unmap the last 16 pages of the vertex buffer.
        let v = BUFFERS[2];
        for i in v.pages - 16..v.pages {
            changed.push(set_leaf(m, v.gma + i * 4096, None));
        }
    }
    let calls_before = client.stats().hypercalls;
    let sync = shadow.sync(&reader, &mut client, &mut mem, &changed);
    println!(
        "\n3. guest edited {} table page(s); incremental sync: {} entries changed, {} mapped, {} unmapped, {} hypercall(s)",
        {
            let mut c = changed.clone();
            c.sort();
            c.dedup();
            c.len()
        },
        sync.entries_changed,
        sync.leaves_mapped,
        sync.leaves_unmapped,
        client.stats().hypercalls - calls_before
    );
    let moved = gpu_read(&sim, &mem, &shadow, BUFFERS[5].gma, 21)?;
    println!(
        "   GPU reads the cursor at its GMA: {:?}",
        String::from_utf8_lossy(&moved)
    );
    let gone = BUFFERS[2].gma + (BUFFERS[2].pages - 1) * 4096;
    println!(
        "   GPU reads an unmapped vertex page: {}",
        gpu_read(&sim, &mem, &shadow, gone, 8)
            .err()
            .unwrap_or_default()
    );

    // 4. Tear down: every BFN released, no page reference left.
    let held_before = client.cache().held();
    let released = shadow.teardown(&mut client, &mut mem);
    let g = sim.lock();
    println!(
        "\n4. teardown: {released} leaves released ({held_before} BFNs held before); page references held now: {}",
        g.0.total_page_refs()
    );
    println!(
        "   {} hypercalls in all, {} IOTLB flushes, {:.0?} total",
        client.stats().hypercalls,
        g.0.flushes,
        t0.elapsed()
    );
    if g.0.total_page_refs() != 0 {
        return Err("page references leaked".into());
    }
    Ok(())
}
