//! Array indices a guest chooses, kept in bounds under speculation.
//!
//! A bounds check is a branch, and a CPU may run past a mispredicted one:
//! an index a guest controls (a BFN's slot, a context id, a target domid)
//! would then read memory beyond the array, and a load that depends on
//! that value (a slot's state, a cell's lock) can leave it in the cache
//! for the guest to time (Spectre v1). Xen clamps such indices with
//! `array_index_nospec()` (`xen/include/xen/nospec.h`); this is the same
//! clamp, written as Xen's `array_index_mask_nospec()` is on each
//! architecture (`cmp`/`sbb` on x86, `cmp`/`sbc` and `csdb` on Arm), so no
//! compiler can turn it back into a branch.
//!
//! Use it where a guest-chosen index first meets an array; the bounds
//! check stays (the clamp only bounds what runs under speculation).

/// `index` when `index < size`, 0 otherwise, without a branch the CPU
/// could mispredict. A caller still checks `index < size` (with `get`).
#[inline(always)]
pub fn array_index_nospec(index: usize, size: usize) -> usize {
    index & index_mask_nospec(index, size)
}

/// `slice[index]`, or `None` past its end; the index is clamped under
/// speculation.
#[inline(always)]
pub fn get_nospec<T>(slice: &[T], index: usize) -> Option<&T> {
    if index < slice.len() {
        slice.get(array_index_nospec(index, slice.len()))
    } else {
        None
    }
}

/// [`get_nospec`], to change.
#[inline(always)]
pub fn get_mut_nospec<T>(slice: &mut [T], index: usize) -> Option<&mut T> {
    let len = slice.len();
    if index < len {
        slice.get_mut(array_index_nospec(index, len))
    } else {
        None
    }
}

/// All ones when `index < size`, 0 otherwise, computed without a branch.
#[inline(always)]
fn index_mask_nospec(index: usize, size: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let mask: usize;
        // SAFETY: two register-only instructions: `cmp` sets CF exactly
        // when index < size (unsigned), `sbb` turns CF into 0 or all ones.
        // No memory, no stack.
        unsafe {
            core::arch::asm!(
                "cmp {index}, {size}",
                "sbb {mask}, {mask}",
                index = in(reg) index,
                size = in(reg) size,
                mask = out(reg) mask,
                options(pure, nomem, nostack),
            );
        }
        mask
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mask: usize;
        // SAFETY: register-only: `cmp` clears C exactly when index < size
        // (a borrow), `sbc` makes 0 - 0 - !C, and `csdb` (hint #20) stops
        // the CPU from speculating on a predicted flags value (Xen's
        // `array_index_mask_nospec` for arm64). No memory, no stack.
        unsafe {
            core::arch::asm!(
                "cmp {index}, {size}",
                "sbc {mask}, xzr, xzr",
                "hint #20",
                index = in(reg) index,
                size = in(reg) size,
                mask = out(reg) mask,
                options(nomem, nostack),
            );
        }
        mask
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        // Xen's generic form (`xen/include/xen/nospec.h`): right only for
        // an index and a size below 2^63, as Xen's (no target builds it).
        let m = !(index | size.wrapping_sub(1).wrapping_sub(index)) as isize;
        (m >> (usize::BITS - 1)) as usize
    }
}

/// Stop the CPU from running ahead of the branches before this point
/// (Xen's `block_speculation()`): the checks a guest's op passed are
/// resolved before anything that depends on them runs. `lfence` on x86
/// (what Xen's `evaluate_nospec()` puts on a checked path); on arm64 the
/// architecture's speculation barrier sequence, `dsb nsh; isb` (Xen 4.17
/// has none there: it is cheap next to a run of page lookups).
#[inline(always)]
pub fn block_speculation() {
    block_speculation_over::<u8>(&mut []);
}

/// [`block_speculation`], and `data` (what the checks recorded for the
/// code after the barrier to use) is handed to the barrier, so the
/// compiler must read it again after it: it cannot replace a value
/// recorded there by one it knows from before the barrier (a guest's, whose
/// use would then hang on a branch again).
#[inline(always)]
pub fn block_speculation_over<T>(data: &mut [T]) {
    let at = data.as_mut_ptr();
    #[cfg(all(target_arch = "x86_64", not(feature = "nospec-canary")))]
    // SAFETY: a fence; `at` is only named, no memory is read or written,
    // no register changed.
    unsafe {
        core::arch::asm!("lfence /* {0} */", in(reg) at, options(nostack, preserves_flags));
    }
    #[cfg(all(target_arch = "aarch64", not(feature = "nospec-canary")))]
    // SAFETY: barriers only; `at` is only named, no register changed.
    unsafe {
        core::arch::asm!("dsb nsh", "isb /* {0} */", in(reg) at, options(nostack, preserves_flags));
    }
    // No barrier: another architecture (hosted), or the canary for the
    // build checks (an engine built with it must be refused).
    #[cfg(any(
        feature = "nospec-canary",
        not(any(target_arch = "x86_64", target_arch = "aarch64"))
    ))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::array_index_nospec;

    #[test]
    fn in_bounds_indices_pass_and_others_become_zero() {
        let mut sizes = vec![0usize, 1, 2, 3, 16, 4096, usize::MAX / 2];
        let mut indices = vec![0usize, 1, 2, 15, 16, 17, 4095, 4096, usize::MAX / 2];
        // The whole range on the targets with an instruction form; the
        // generic form, as Xen's, holds only below 2^63.
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            sizes.push(usize::MAX);
            indices.extend([usize::MAX / 2 + 1, usize::MAX - 1, usize::MAX]);
        }
        for &size in &sizes {
            for &index in &indices {
                let want = if index < size { index } else { 0 };
                assert_eq!(array_index_nospec(index, size), want, "{index} of {size}");
            }
        }
    }
}
