//! Bit layout of the Intel global GTT (GGTT): a flat array of 64-bit PTEs,
//! entry `n` mapping GMA `[n * 4 KiB, (n + 1) * 4 KiB)`. Bit 0 = present,
//! bits 38:12 = frame address; the other low bits (cache/PAT level) are kept
//! as the guest wrote them.

/// Present bit.
pub const PRESENT: u64 = 1 << 0;
/// Address field (bits 38:12).
pub const ADDR_MASK: u64 = 0x7F_FFFF_F000;
/// Largest frame number the address field can hold.
pub const MAX_FRAME: u64 = ADDR_MASK >> 12;
/// Bytes of GMA mapped by one entry.
pub const ENTRY_SPAN: u64 = 4096;

/// Frame mapped by a present entry, or None.
pub const fn frame(entry: u64) -> Option<u64> {
    if entry & PRESENT == 0 {
        None
    } else {
        Some((entry & ADDR_MASK) >> 12)
    }
}

/// Shadow entry: the guest entry's non-address bits with `frame` as address.
pub const fn shadow_entry(guest_entry: u64, frame: u64) -> u64 {
    (guest_entry & !ADDR_MASK) | ((frame << 12) & ADDR_MASK)
}
