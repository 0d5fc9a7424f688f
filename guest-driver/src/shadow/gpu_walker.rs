//! A simulated GPU page walker over the shadow tables. Written independently
//! of the builders (its own constants) so tests cross-check the two.

use super::gma::Gma;
use super::traits::ShadowMemory;
use pviommu_abi::Bfn;

const P: u64 = 1;
const PAGE_SIZE_BIT: u64 = 0x80;
const PPGTT_ADDR: u64 = 0x0000_FFFF_FFFF_F000;
const GGTT_ADDR: u64 = 0x0000_007F_FFFF_F000;

/// Walk the 4-level shadow PPGTT rooted at `shadow_root` as the GPU would and
/// return the final leaf entry (for 1 GiB / 2 MiB shadow pages: the large
/// entry itself) together with the 4 KiB bus frame `gma` lands in.
pub fn gpu_walk<S: ShadowMemory + ?Sized>(
    memory: &S,
    shadow_root: Bfn,
    gma: Gma,
) -> Option<(u64, Bfn)> {
    if gma.0 >> 48 != 0 {
        return None;
    }
    let mut table = shadow_root;
    for shift in [39u32, 30, 21, 12] {
        let entry = memory.read_entry(table, ((gma.0 >> shift) & 0x1ff) as usize)?;
        if entry & P == 0 {
            return None;
        }
        let frame = (entry & PPGTT_ADDR) >> 12;
        if shift == 12 {
            return Some((entry, Bfn(frame)));
        }
        if (shift == 30 || shift == 21) && entry & PAGE_SIZE_BIT != 0 {
            let frames = 1u64 << (shift - 12);
            let base = frame & !(frames - 1);
            return Some((entry, Bfn(base + ((gma.0 >> 12) & (frames - 1)))));
        }
        table = Bfn(frame);
    }
    None
}

/// The bus frame the GPU reaches for `gma` through the shadow PPGTT.
pub fn gpu_translate<S: ShadowMemory + ?Sized>(
    memory: &S,
    shadow_root: Bfn,
    gma: Gma,
) -> Option<Bfn> {
    gpu_walk(memory, shadow_root, gma).map(|(_, b)| b)
}

/// The bus frame the GPU reaches for `gma` through a shadow GGTT whose
/// entries `first_entry..` are stored 512 per page in `pages`.
pub fn gpu_translate_ggtt<S: ShadowMemory + ?Sized>(
    memory: &S,
    pages: &[Bfn],
    first_entry: u64,
    gma: Gma,
) -> Option<Bfn> {
    let n = (gma.0 >> 12).checked_sub(first_entry)?;
    let page = *pages.get(usize::try_from(n / 512).ok()?)?;
    let entry = memory.read_entry(page, (n % 512) as usize)?;
    if entry & P == 0 {
        return None;
    }
    Some(Bfn((entry & GGTT_ADDR) >> 12))
}
