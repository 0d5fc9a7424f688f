//! Typed errors: each carries the ABI errno (where the hypervisor refused)
//! and what was asked.

use pviommu_abi::Errno;

/// An error of the guest-side library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor refused an operation.
    #[error("{what}: {errno}")]
    Hypervisor {
        /// What was asked, e.g. "map d1 gfn 0x10".
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// The hypervisor returned a value that is not an ABI errno.
    #[error("{what}: unexpected return value {value}")]
    Unexpected {
        /// What was asked.
        what: String,
        /// The value.
        value: i64,
    },
    /// The hypervisor speaks another major version.
    #[error("hypervisor interface version {found:#x}, this library speaks {expected:#x}")]
    Version {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// No Xen here (no `/dev/xen/privcmd`), or it could not be opened.
    #[error("Xen privcmd not available: {0}")]
    NoXen(String),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The daemon connection or its protocol failed.
    #[error("remote simulator: {0}")]
    Remote(String),
    /// A caller argument is invalid before anything is sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The errno (positive) the library reports for a failure that is not the
/// hypervisor's: the transport (the daemon gone, its protocol, an OS call)
/// or the mapper below a shadow. `ECOMM`, which no ABI errno is; it was
/// `EIO` until hypervisor ABI 1.7 gave `EIO` the host's IOMMU failures.
pub const ERRNO_TRANSPORT: i32 = 70;

impl Error {
    /// The ABI errno, where the hypervisor refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Hypervisor { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Build the error for a negative hypercall return value.
    pub fn from_return(what: impl Into<String>, value: i64) -> Error {
        let what = what.into();
        match i32::try_from(value).ok().and_then(Errno::from_code) {
            Some(errno) if value < 0 => Error::Hypervisor { what, errno },
            _ => Error::Unexpected { what, value },
        }
    }
}
