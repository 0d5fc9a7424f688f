//! Error numbers: Xen's (Linux-compatible) errno values, each with exactly one
//! meaning in this ABI. On the wire they travel negated (`-EPERM`).

use core::fmt;

/// An ABI error. The discriminant is the positive Xen errno value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(i32)]
pub enum Errno {
    /// The caller has no privilege over the target domain or device.
    Perm = 1,
    /// No such mapping (BFN) or context, or the device is not attached to
    /// that context.
    NoEnt = 2,
    /// No such domain.
    Srch = 3,
    /// The host failed the operation (ABI 1.7): the IOMMU refused or timed
    /// out a table write, an IOTLB flush or a device's context entry, or a
    /// table frame could not be written. Nothing the caller's arguments
    /// decide; the op is refused as any other (nothing changed, but for a
    /// device whose attach or detach the IOMMU failed and could not undo:
    /// its DMA is left blocked), and a retry may succeed. (Before 1.7
    /// these answered `EINVAL`.)
    Io = 5,
    /// The gfn is not present in the target's p2m.
    Nxio = 6,
    /// A 32-bit caller: the interface is 64-bit only (no compat layer).
    NoExec = 8,
    /// The batch is larger than `max_batch_ops`.
    TooBig = 7,
    /// The gfn is paged out or being shared: retry later.
    Again = 11,
    /// The hypervisor is out of memory.
    NoMem = 12,
    /// Write access was asked for a read-only page.
    Acces = 13,
    /// A guest buffer could not be read or written.
    Fault = 14,
    /// Still in use: a context with mappings or devices, or a device
    /// already attached to a context.
    Busy = 16,
    /// The frame is not owned by the target (Xen-owned, granted or foreign).
    XDev = 18,
    /// The frame is MMIO, not RAM; or no such PCI device.
    NoDev = 19,
    /// A malformed argument: flags, padding, version, reserved context...
    Inval = 22,
    /// Quota, context table or BFN window exhausted.
    NoSpc = 28,
    /// Unknown command or subop, or a feature the backend does not offer.
    OpNotSupp = 95,
    /// The caller's IOMMU context does not translate BFNs (no IOMMU,
    /// passthrough, relaxed, or tables shared with the CPU): see
    /// `PvIommuCaps::translation`.
    AddrNotAvail = 99,
    /// The BFN had been revoked (its page left the target, or the target
    /// died); this unmap acknowledged it and the BFN is released.
    Stale = 116,
}

impl Errno {
    /// Every errno of the ABI.
    pub const ALL: [Errno; 19] = [
        Errno::Perm,
        Errno::NoEnt,
        Errno::Srch,
        Errno::Io,
        Errno::Nxio,
        Errno::NoExec,
        Errno::TooBig,
        Errno::Again,
        Errno::NoMem,
        Errno::Acces,
        Errno::Fault,
        Errno::Busy,
        Errno::XDev,
        Errno::NoDev,
        Errno::Inval,
        Errno::NoSpc,
        Errno::OpNotSupp,
        Errno::AddrNotAvail,
        Errno::Stale,
    ];

    /// The positive errno value.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The value as returned on the wire: `-code`.
    pub const fn negated(self) -> i32 {
        -(self as i32)
    }

    /// Parse a positive or negative errno value.
    pub fn from_code(code: i32) -> Option<Errno> {
        let positive = code.checked_abs()?;
        Errno::ALL.iter().copied().find(|e| e.code() == positive)
    }

    /// The C name of the value (`"EPERM"`).
    pub const fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::NoEnt => "ENOENT",
            Errno::Srch => "ESRCH",
            Errno::Io => "EIO",
            Errno::Nxio => "ENXIO",
            Errno::NoExec => "ENOEXEC",
            Errno::TooBig => "E2BIG",
            Errno::Again => "EAGAIN",
            Errno::NoMem => "ENOMEM",
            Errno::Acces => "EACCES",
            Errno::Fault => "EFAULT",
            Errno::Busy => "EBUSY",
            Errno::XDev => "EXDEV",
            Errno::NoDev => "ENODEV",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::OpNotSupp => "EOPNOTSUPP",
            Errno::AddrNotAvail => "EADDRNOTAVAIL",
            Errno::Stale => "ESTALE",
        }
    }

    /// What the value means in this ABI.
    pub const fn meaning(self) -> &'static str {
        match self {
            Errno::Perm => "caller has no privilege over the target domain or device",
            Errno::NoEnt => "no such mapping or context, or device not attached to it",
            Errno::Srch => "no such domain, or a dying one",
            Errno::Io => {
                "the host's IOMMU failed the operation; nothing changed, retry may succeed"
            }
            Errno::Nxio => "frame not present in the target's p2m",
            Errno::NoExec => "32-bit caller: the interface is 64-bit only",
            Errno::TooBig => "batch larger than max_batch_ops",
            Errno::Again => {
                "frame paged out or shared, or the target changed under the call; retry later"
            }
            Errno::NoMem => "hypervisor out of memory",
            Errno::Acces => "write access asked for a read-only page",
            Errno::Fault => "guest buffer not accessible",
            Errno::Busy => "still in use (context with mappings or devices, device attached)",
            Errno::XDev => "frame not owned by the target domain",
            Errno::NoDev => "frame is MMIO, not RAM; or no such device",
            Errno::Inval => "malformed argument",
            Errno::NoSpc => "quota or BFN window exhausted",
            Errno::OpNotSupp => "unknown operation or unsupported feature",
            Errno::AddrNotAvail => "the caller's IOMMU context does not translate BFNs",
            Errno::Stale => "the BFN had been revoked; it is now released",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.meaning())
    }
}
