//! Typed numbers: a guest frame can never be passed where a bus frame is
//! expected. There is deliberately no machine-frame type here: machine frames
//! are the hypervisor's business and never cross the ABI.

use core::fmt;

macro_rules! frame_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw frame number.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// Byte address of the frame's first byte (4 KiB frames); `None`
            /// if it does not fit in 64 bits.
            pub const fn addr(self) -> Option<u64> {
                self.0.checked_mul(4096)
            }
            /// The frame `n` after this one, if it exists.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{:#x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

frame_type!(
    /// Guest frame number in a (foreign) domain's physical address space.
    Gfn,
    "gfn:"
);
frame_type!(
    /// Bus frame number: what a device puts on the bus, translated by the IOMMU.
    Bfn,
    "bfn:"
);

/// A Xen domain id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(transparent)]
pub struct DomId(pub u16);

impl DomId {
    /// Domain 0.
    pub const DOM0: DomId = DomId(0);
    /// First of Xen's special ids (DOMID_FIRST_RESERVED): never a real domain.
    pub const FIRST_RESERVED: u16 = 0x7ff0;

    /// True for ids that can name an ordinary domain.
    pub const fn is_valid(self) -> bool {
        self.0 < Self::FIRST_RESERVED
    }
}

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// An IOMMU context of a driver domain (0 = the default context).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(transparent)]
pub struct ContextId(pub u32);

impl ContextId {
    /// The context every driver domain has from the start.
    pub const DEFAULT: ContextId = ContextId(0);
}

/// A PCI device: segment, bus, device and function, packed as Xen's
/// `pci_sbdf_t` (`seg << 16 | bus << 8 | dev << 3 | fn`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(transparent)]
pub struct Sbdf(pub u32);

impl Sbdf {
    /// From its parts; `None` if `dev` > 31 or `func` > 7.
    pub const fn new(seg: u16, bus: u8, dev: u8, func: u8) -> Option<Sbdf> {
        if dev > 31 || func > 7 {
            return None;
        }
        Some(Sbdf(
            (seg as u32) << 16 | (bus as u32) << 8 | (dev as u32) << 3 | func as u32,
        ))
    }
    /// PCI segment.
    pub const fn seg(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Bus.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Device and function (`dev << 3 | fn`).
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Debug for Sbdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `ssss:bb:dd.f`, as Linux and Xen print a device.
impl fmt::Display for Sbdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.seg(),
            self.bus(),
            self.devfn() >> 3,
            self.devfn() & 7
        )
    }
}

impl core::str::FromStr for Sbdf {
    type Err = ();
    /// `ssss:bb:dd.f` or `bb:dd.f` (segment 0), hexadecimal as `lspci` prints.
    fn from_str(s: &str) -> Result<Sbdf, ()> {
        let (seg, rest) = match s.matches(':').count() {
            2 => {
                let (seg, rest) = s.split_once(':').ok_or(())?;
                (u16::from_str_radix(seg, 16).map_err(|_| ())?, rest)
            }
            1 => (0, s),
            _ => return Err(()),
        };
        let (bus, df) = rest.split_once(':').ok_or(())?;
        let (dev, func) = df.split_once('.').ok_or(())?;
        let hex8 = |t: &str| {
            if t.is_empty() || t.len() > 2 {
                return Err(());
            }
            u8::from_str_radix(t, 16).map_err(|_| ())
        };
        let func = if func.len() == 1 {
            hex8(func)?
        } else {
            return Err(());
        };
        Sbdf::new(seg, hex8(bus)?, hex8(dev)?, func).ok_or(())
    }
}

/// Device access rights of a mapping.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Access {
    /// Device reads only.
    ReadOnly,
    /// Device writes only (rare; some DMA engines).
    WriteOnly,
    /// Device reads and writes.
    ReadWrite,
}

/// Read/write permission pair, as carried in op flags.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Permissions {
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
}

impl Permissions {
    /// Read-only.
    pub const RO: Permissions = Permissions {
        read: true,
        write: false,
    };
    /// Read-write.
    pub const RW: Permissions = Permissions {
        read: true,
        write: true,
    };

    /// The [`op_flags`](crate::op_flags) bits for these permissions.
    pub const fn flag_bits(self) -> u16 {
        ((self.read as u16) * crate::op_flags::READ)
            | ((self.write as u16) * crate::op_flags::WRITE)
    }
}

/// Memory attribute of a mapping: what the device-side access may assume.
///
/// Mapping device memory (SRAM, a BAR) with normal cacheable attributes lets
/// the interconnect merge, reorder or cache accesses; mapping RAM as device
/// memory costs performance. The caller says which.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum MemAttr {
    /// Normal memory, write-back cacheable (snooped). The default.
    #[default]
    WriteBack,
    /// Normal memory, non-cacheable.
    Uncached,
    /// Device memory: no speculation, merging or reordering.
    Device,
}

impl MemAttr {
    /// Decode the 3-bit attribute field.
    pub const fn from_field(v: u16) -> Option<MemAttr> {
        match v {
            0 => Some(MemAttr::WriteBack),
            1 => Some(MemAttr::Uncached),
            2 => Some(MemAttr::Device),
            _ => None,
        }
    }
    /// The 3-bit attribute field.
    pub const fn field(self) -> u16 {
        match self {
            MemAttr::WriteBack => 0,
            MemAttr::Uncached => 1,
            MemAttr::Device => 2,
        }
    }
    /// The capability [`feature`](crate::feature) bit a backend must offer
    /// for this attribute (0: always available).
    pub const fn required_feature(self) -> u32 {
        match self {
            MemAttr::WriteBack => 0,
            MemAttr::Uncached => crate::feature::ATTR_UC,
            MemAttr::Device => crate::feature::ATTR_DEVICE,
        }
    }
}
