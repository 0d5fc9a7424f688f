//! Error types of the shadowing code.

use core::fmt;
use pviommu_abi::Gfn;

/// Errno used when the mapper returned a bus frame that does not fit the
/// address field of the shadow format (EINVAL).
pub const ERRNO_BFN_TOO_WIDE: i32 = 22;
/// Errno used when the mapper returned fewer results than requested
/// (ECOMM, the library's for failures not the hypervisor's; EIO, which
/// hypervisor ABI 1.7 gives the host's IOMMU failures, until then).
pub const ERRNO_MAPPER_SHORT: i32 = crate::error::ERRNO_TRANSPORT;
/// Errno of a mapper that maps no 2 MiB extents (EOPNOTSUPP).
pub const ERRNO_NO_EXTENTS: i32 = 95;

/// Failure of a reader or of shadow memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShadowError {
    /// The guest frame could not be read (not guest RAM, not granted...).
    GuestRead {
        /// The frame that could not be read.
        gfn: Gfn,
        /// Errno-style reason from the reader.
        errno: i32,
    },
    /// No shadow table page could be allocated.
    OutOfShadowMemory,
}

impl fmt::Display for ShadowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShadowError::GuestRead { gfn, errno } => {
                write!(f, "cannot read guest frame {gfn:?} (errno {errno})")
            }
            ShadowError::OutOfShadowMemory => write!(f, "out of shadow table memory"),
        }
    }
}

impl std::error::Error for ShadowError {}

/// A refused frame mapping, as reported by a [`FrameMapper`](super::FrameMapper).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapError {
    /// Positive errno value (e.g. 1 = EPERM, 12 = ENOMEM, 22 = EINVAL).
    pub errno: i32,
    /// Human-readable reason.
    pub message: String,
}

impl MapError {
    /// A map error with the given errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        MapError {
            errno,
            message: message.into(),
        }
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "map refused (errno {}): {}", self.errno, self.message)
    }
}

impl std::error::Error for MapError {}
