//! The graphics memory address newtype.

use core::fmt;

/// Graphics memory address: what a GPU engine puts out before the GTT/PPGTT
/// translates it. Distinct from guest frames and bus frames by type.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Gma(pub u64);

impl Gma {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Gma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gma:{:#x}", self.0)
    }
}

impl fmt::Display for Gma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
