//! The simulated world the embedded backend, the daemon and the demo start
//! from: dom0 (privileged) with two PCI devices it may attach to its IOMMU
//! contexts ([`DEVICES`]), guest d1 with RAM and a Gen8 PPGTT describing
//! GPU buffers, and d2, an unprivileged domain.

use pviommu_abi::{DomId, Gfn};
use pviommu_guest::shadow::ppgtt_format::{PRESENT, PS, RW};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};

/// The guest.
pub const GUEST: DomId = DomId(1);
/// dom0's PCI devices, `0000:00:02.0` and `0000:00:03.0` (where QEMU puts
/// the Xen test's two `edu` devices): each with its own requester id, no
/// RMRR and no ATS, so either may be attached to a context.
pub use pviommu_guest::transport::in_process::SIM_DEVICES as DEVICES;
/// An unprivileged domain.
pub const STRANGER: DomId = DomId(2);
/// Guest RAM pages.
pub const GUEST_PAGES: u64 = 16384;
/// The guest's PPGTT root (PML4) frame.
pub const PPGTT_ROOT: Gfn = Gfn(0x10);
const PDP: u64 = 0x11;
const PD: u64 = 0x12;
const FIRST_PT: u64 = 0x13;
/// First frame of the guest's GPU buffers.
pub const BUFFER_BASE: u64 = 0x100;

/// A GPU buffer in the guest: `pages` frames from `gfn`, at GMA `gma`.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    /// Name.
    pub name: &'static str,
    /// Graphics memory address.
    pub gma: u64,
    /// First guest frame.
    pub gfn: u64,
    /// Pages.
    pub pages: u64,
    /// Mapped by one 2 MiB GPU page (512 pages from a 2 MiB-aligned GMA
    /// and a gfn that is a multiple of 512), not by 4 KiB leaves.
    pub page_2m: bool,
}

/// The buffers the demo guest's PPGTT maps.
pub const BUFFERS: [Buffer; 6] = [
    Buffer {
        name: "ring",
        gma: 0x0000_0000,
        gfn: BUFFER_BASE,
        pages: 4,
        page_2m: false,
    },
    Buffer {
        name: "batch",
        gma: 0x0010_0000,
        gfn: BUFFER_BASE + 0x10,
        pages: 16,
        page_2m: false,
    },
    Buffer {
        name: "vertex",
        gma: 0x0040_0000,
        gfn: BUFFER_BASE + 0x40,
        pages: 64,
        page_2m: false,
    },
    Buffer {
        name: "texture",
        gma: 0x0080_0000,
        gfn: BUFFER_BASE + 0x100,
        pages: 512,
        // A 2 MiB GPU page, as a guest driver lays out a big texture: the
        // mediator shadows it with one 2 MiB entry over one extent.
        page_2m: true,
    },
    Buffer {
        name: "framebuffer",
        gma: 0x0100_0000,
        gfn: BUFFER_BASE + 0x400,
        pages: 2048,
        page_2m: false,
    },
    Buffer {
        name: "cursor",
        gma: 0x0400_0000,
        gfn: BUFFER_BASE + 0x1000,
        pages: 1,
        page_2m: false,
    },
];

/// The first bytes of page `i` of a buffer.
pub fn page_tag(b: &Buffer, i: u64) -> String {
    format!("{} page {i}", b.name)
}

/// Write 64-bit entry `index` of guest frame `gfn`.
pub fn write_entry(m: &mut SimMachine, gfn: u64, index: u64, value: u64) {
    m.write_guest(GUEST, Gfn(gfn), (index * 8) as usize, &value.to_le_bytes())
        .expect("guest table frame exists");
}

/// The PT frame and index that map `gma` (the demo keeps all buffers in the
/// first 1 GiB: one PML4 entry, one PDP entry, one PD).
pub fn pt_slot(gma: u64) -> (u64, u64) {
    let pd_index = (gma >> 21) & 0x1ff;
    (FIRST_PT + pd_index, (gma >> 12) & 0x1ff)
}

/// Point the guest PTE for `gma` at `gfn` (or clear it with `None`).
/// Returns the table frame changed.
pub fn set_leaf(m: &mut SimMachine, gma: u64, gfn: Option<u64>) -> Gfn {
    let (pt, idx) = pt_slot(gma);
    write_entry(m, PD, (gma >> 21) & 0x1ff, (pt << 12) | PRESENT | RW);
    write_entry(m, pt, idx, gfn.map_or(0, |g| (g << 12) | PRESENT | RW));
    Gfn(pt)
}

/// Build the world.
pub fn build() -> SimMachine {
    let mut m = SimMachine::new(GUEST_PAGES + 8192, Format::Vtd, 64);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: GUEST_PAGES,
            privileged: false,
            device_model_of: None,
        },
    )
    .expect("guest fits");
    m.create_domain(
        STRANGER,
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: None,
        },
    )
    .expect("fits");
    pviommu_guest::transport::in_process::add_sim_devices(&mut m);
    write_entry(&mut m, PPGTT_ROOT.0, 0, (PDP << 12) | PRESENT | RW);
    write_entry(&mut m, PDP, 0, (PD << 12) | PRESENT | RW);
    for b in &BUFFERS {
        for i in 0..b.pages {
            m.write_guest(GUEST, Gfn(b.gfn + i), 0, page_tag(b, i).as_bytes())
                .expect("buffer frame");
            if !b.page_2m {
                set_leaf(&mut m, b.gma + i * 4096, Some(b.gfn + i));
            }
        }
        if b.page_2m {
            write_entry(
                &mut m,
                PD,
                (b.gma >> 21) & 0x1ff,
                (b.gfn << 12) | PRESENT | RW | PS,
            );
        }
    }
    m
}
