//! The PV-IOMMU hypercall ABI, interface version 1.7.
//!
//! A driver domain asks the hypervisor, through hypercall
//! [`HYPERVISOR_PV_IOMMU_OP`], to map a foreign domain's guest frame into one
//! of its IOMMU contexts; the hypervisor answers with a bus frame number
//! ([`Bfn`]) in a window above host RAM. Machine frames never cross this
//! interface.
//!
//! This crate is `no_std`, allocation-free and shared by both sides:
//!
//! * the `#[repr(C)]` wire structures ([`PvIommuCaps`], [`PvIommuBatch`],
//!   [`PvIommuOp`], [`PvIommuRegions`], [`PvIommuRegion`], [`PvIommuLimits`]),
//!   laid out exactly as
//!   `include/pviommu.h` (checked at compile time here and by a C test);
//! * typed frame numbers and domain ids ([`Gfn`], [`Bfn`], [`DomId`],
//!   [`ContextId`]);
//! * the errno values with one meaning each ([`Errno`]);
//! * parsing of a raw op into a typed [`Request`], done once, before any
//!   state is touched.
//!
//! `design/abi.md` is the prose specification.
#![no_std]
#![deny(missing_docs)]

mod errno;
mod request;
mod types;

pub use errno::Errno;
pub use request::{MapRequest, Request};
pub use types::{Access, Bfn, ContextId, DomId, Gfn, MemAttr, Permissions, Sbdf};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Hypercall number of `HYPERVISOR_pv_iommu_op` (the first free in Xen 4.17).
pub const HYPERVISOR_PV_IOMMU_OP: u32 = 43;

/// Interface version: major in the high 16 bits, minor in the low 16.
pub const INTERFACE_VERSION: u32 = 0x0001_0007;

/// Major part of a version word.
pub const fn version_major(version: u32) -> u16 {
    (version >> 16) as u16
}

/// Commands: the hypercall's first argument.
pub mod cmd {
    /// Fill a [`PvIommuCaps`](crate::PvIommuCaps).
    pub const QUERY_CAPS: u32 = 1;
    /// Run a [`PvIommuBatch`](crate::PvIommuBatch) of ops.
    pub const BATCH: u32 = 2;
    /// Copy out reserved regions through a [`PvIommuRegions`](crate::PvIommuRegions).
    pub const RESERVED_REGIONS: u32 = 3;
    /// The toolstack sets a driver domain's quota through a
    /// [`PvIommuLimits`](crate::PvIommuLimits) (control domain only).
    pub const SET_LIMITS: u32 = 4;
    /// Read (and optionally reset) a driver domain's counters and the
    /// in-hypervisor time breakdown through a
    /// [`PvIommuStats`](crate::PvIommuStats) (control domain only; ABI 1.2).
    pub const STATS: u32 = 5;
    /// Read back the leaf entry the IOMMU walks for a BFN of one of a
    /// driver domain's own contexts, its address field zeroed, through a
    /// [`PvIommuEntry`](crate::PvIommuEntry) (control domain only; ABI 1.3).
    pub const ENTRY: u32 = 6;
    /// Commands with this bit set are the hypervisor's own: the
    /// continuation of a batch that ended in an error carries the error in
    /// them (design/abi.md, "Batches"). No command of the ABI has it; a
    /// caller that issues one gets its own cells finished and the errno it
    /// names, or `EINVAL` for a malformed one.
    pub const RESERVED_FOR_CONTINUATIONS: u32 = 1 << 30;
}

// No command of the ABI is one of the hypervisor's own.
const _: () = {
    let all = [
        cmd::QUERY_CAPS,
        cmd::BATCH,
        cmd::RESERVED_REGIONS,
        cmd::SET_LIMITS,
        cmd::STATS,
        cmd::ENTRY,
    ];
    let mut i = 0;
    while i < all.len() {
        assert!(all[i] & cmd::RESERVED_FOR_CONTINUATIONS == 0);
        i += 1;
    }
};

/// Formats of [`PvIommuEntry::bits`].
pub mod entry_format {
    /// Intel VT-d second-level paging entry.
    pub const VTD_SECOND_LEVEL: u16 = 1;
    /// Arm LPAE stage-2 descriptor.
    pub const ARM_LPAE_STAGE2: u16 = 2;
}

/// `flags` of [`PvIommuStats`].
pub mod stats_flag {
    /// Zero the domain's counters after reading them.
    pub const RESET: u16 = 1 << 0;
    /// Start timing the hypervisor's services (host-wide; costs two clock
    /// reads per service call while on).
    pub const TIMING_ON: u16 = 1 << 1;
    /// Stop timing.
    pub const TIMING_OFF: u16 = 1 << 2;
    /// Every flag this interface version knows.
    pub const ALL: u16 = RESET | TIMING_ON | TIMING_OFF;
}

/// The global VIRQ Xen raises in a driver domain when revocation notices
/// are pending for it (`VIRQ_PV_IOMMU`; bind it with `EVTCHNOP_bind_virq`,
/// e.g. Linux's `IOCTL_EVTCHN_BIND_VIRQ`), then drain with
/// [`subop::REVOKED_NEXT`].
pub const VIRQ_PV_IOMMU: u32 = 14;

/// Positive return value of a batch whose work budget ran out: call again.
pub const BATCH_INCOMPLETE: i64 = 1;

/// Capability feature bits ([`PvIommuCaps::features`]).
pub mod feature {
    /// More than the default context per driver domain.
    pub const CONTEXTS: u32 = 1 << 0;
    /// [`MemAttr::Uncached`](crate::MemAttr::Uncached) is honoured.
    pub const ATTR_UC: u32 = 1 << 1;
    /// [`MemAttr::Device`](crate::MemAttr::Device) is honoured.
    pub const ATTR_DEVICE: u32 = 1 << 2;
    /// Grant-reference maps ([`F_GRANT`](crate::op_flags::GRANT)) are accepted.
    pub const GRANT: u32 = 1 << 3;
    /// Revoked BFNs stay reserved until acknowledged, and are reported
    /// through [`subop::REVOKED_NEXT`](crate::subop::REVOKED_NEXT).
    pub const REVOCATION_QUEUE: u32 = 1 << 4;
    /// The caller's PCI devices can be attached to its contexts
    /// ([`subop::CONTEXT_ATTACH`](crate::subop::CONTEXT_ATTACH); ABI 1.3).
    pub const DEVICE_ATTACH: u32 = 1 << 5;
    /// [`subop::REVOKED_NEXT`](crate::subop::REVOKED_NEXT) takes
    /// [`revoked_next::IN_CONTEXT`](crate::revoked_next::IN_CONTEXT): the
    /// notices of one context, any of its first
    /// [`MAX_SKIP`](crate::revoked_next::MAX_SKIP)` + 1`, so a batch of
    /// such ops reports many notices in one call (ABI 1.4).
    pub const REVOKED_IN_CONTEXT: u32 = 1 << 6;
    /// [`subop::REVOKED_NEXT`](crate::subop::REVOKED_NEXT) with
    /// [`revoked_next::NUMBERED`](crate::revoked_next::NUMBERED) reports the
    /// notice's number in [`PvIommuOp::notice`], and
    /// [`subop::REVOKED_ACK`](crate::subop::REVOKED_ACK) with the same flag
    /// acknowledges only the notice of that number (ABI 1.5).
    pub const REVOKED_NUMBERED: u32 = 1 << 7;
    /// [`subop::MAP`](crate::subop::MAP) and
    /// [`subop::UNMAP`](crate::subop::UNMAP) take
    /// [`op_flags::EXTENT_2M`](crate::op_flags::EXTENT_2M): a 2 MiB extent of
    /// a target, at 512 consecutive BFNs aligned to 2 MiB, in one op (ABI 1.6).
    pub const EXTENTS_2M: u32 = 1 << 8;
    /// Every bit defined by this version.
    pub const ALL: u32 = 0x1ff;
}

/// Why a caller's IOMMU context cannot use BFNs ([`PvIommuCaps::translation`]).
/// Anything but [`TRANSLATES`](translation::TRANSLATES) makes every map into
/// context 0 fail with `EADDRNOTAVAIL` (the engine's own contexts always
/// translate).
pub mod translation {
    /// The caller's devices are translated through tables PV-IOMMU writes.
    pub const TRANSLATES: u32 = 0;
    /// The caller has no IOMMU context (IOMMU off, or no device assigned).
    pub const NO_IOMMU: u32 = 1;
    /// The caller's devices bypass the IOMMU (hardware-domain passthrough).
    pub const PASSTHROUGH: u32 = 2;
    /// Relaxed (non-strict) hardware domain: all RAM is already mapped, a
    /// BFN would add no isolation.
    pub const RELAXED: u32 = 3;
    /// The IOMMU shares the CPU's second-stage tables: no separate BFN space.
    pub const SHARED_PT: u32 = 4;
    /// The caller is translated (HVM/PVH) and Xen mirrors its p2m into its
    /// IOMMU tables (dfn = gfn): the caller picks its own gfns, so any BFN
    /// could collide with one of its grant or foreign mappings.
    pub const MIRRORS_P2M: u32 = 5;
}

/// Subop codes ([`PvIommuOp::subop`]).
pub mod subop {
    /// Map a foreign gfn; the hypervisor returns the BFN.
    pub const MAP: u16 = 1;
    /// Drop one reference to a BFN; the last one unmaps it.
    pub const UNMAP: u16 = 2;
    /// BFN -> (domid, gfn, flags).
    pub const LOOKUP: u16 = 3;
    /// Create an IOMMU context; its id is returned in `context`.
    pub const CONTEXT_CREATE: u16 = 4;
    /// Destroy an empty IOMMU context.
    pub const CONTEXT_DESTROY: u16 = 5;
    /// Report the oldest revocation not yet acknowledged: out `bfn`,
    /// `context`, `domid`, `gfn`; status `ENOENT` when there is none.
    pub const REVOKED_NEXT: u16 = 6;
    /// Acknowledge a revoked BFN (in `context`, `bfn`): it is released and
    /// may be handed out again. An unmap of a revoked BFN does the same and
    /// answers `ESTALE`.
    pub const REVOKED_ACK: u16 = 7;
    /// Point one of the caller's PCI devices (`gfn` holds its
    /// [`Sbdf`](crate::Sbdf)) at context `context` (not 0): from then on its
    /// DMA is translated by that context's tables only (ABI 1.3).
    pub const CONTEXT_ATTACH: u16 = 8;
    /// Put a device (`gfn` holds its [`Sbdf`](crate::Sbdf)) attached to
    /// `context` back in the default context (ABI 1.3).
    pub const CONTEXT_DETACH: u16 = 9;
}

/// [`subop::REVOKED_NEXT`] of one context ([`feature::REVOKED_IN_CONTEXT`],
/// ABI 1.4). With [`IN_CONTEXT`](revoked_next::IN_CONTEXT) in `flags`, the op
/// takes `context` and, in `gfn`, how many of that context's oldest notices
/// to pass over, and reports the next one (`ENOENT` if there are no more).
/// A batch of them with `gfn` = 0, 1, 2, ... reports that many notices in
/// one call; acknowledgements placed before them in the same batch are
/// done first, so each round of a drain starts again at 0.
pub mod revoked_next {
    /// `context` and the skip count in `gfn` are inputs.
    pub const IN_CONTEXT: u16 = 1 << 0;
    /// The notice's number is reported in [`PvIommuOp::notice`]
    /// ([`feature::REVOKED_NUMBERED`](crate::feature::REVOKED_NUMBERED),
    /// ABI 1.5); with or without [`IN_CONTEXT`]. The same bit on
    /// [`subop::REVOKED_ACK`](crate::subop::REVOKED_ACK)
    /// ([`revoked_ack::NUMBERED`](crate::revoked_ack::NUMBERED)) names the
    /// notice acknowledged.
    pub const NUMBERED: u16 = 1 << 1;
    /// The largest skip count (`EINVAL` above it): the hypervisor walks
    /// that many notices under the context's lock, so it is kept small.
    pub const MAX_SKIP: u64 = 255;
}

/// [`subop::REVOKED_ACK`] of one notice ([`feature::REVOKED_NUMBERED`], ABI
/// 1.5). With [`NUMBERED`](revoked_ack::NUMBERED) as `flags`, the op
/// acknowledges the BFN's notice only if its number is
/// [`PvIommuOp::notice`] (as `revoked_next` with
/// [`revoked_next::NUMBERED`] reported it), and answers `ENOENT` otherwise:
/// an acknowledgement of a notice that another vCPU acknowledged meanwhile
/// cannot release a later notice of the same BFN unseen. Numbers are the
/// driver domain's, from 1, rising, never reused in its life.
pub mod revoked_ack {
    /// The notice's number is in `notice`.
    pub const NUMBERED: u16 = super::revoked_next::NUMBERED;
}

/// Bits of [`PvIommuOp::flags`].
pub mod op_flags {
    /// The device may read.
    pub const READ: u16 = 1 << 0;
    /// The device may write.
    pub const WRITE: u16 = 1 << 1;
    /// `gfn` holds a grant reference rather than a frame number.
    pub const GRANT: u16 = 1 << 2;
    /// Shift of the memory-attribute field.
    pub const ATTR_SHIFT: u16 = 8;
    /// Mask of the memory-attribute field.
    pub const ATTR_MASK: u16 = 0x7 << ATTR_SHIFT;
    /// Every bit a caller may set in a map of one page.
    pub const VALID_MASK: u16 = READ | WRITE | GRANT | ATTR_MASK;
    /// A map or unmap of a 2 MiB extent (ABI 1.6,
    /// [`feature::EXTENTS_2M`](crate::feature::EXTENTS_2M)). A map maps the
    /// [`EXTENT_PAGES`](crate::EXTENT_PAGES) frames from `gfn` (a multiple
    /// of 512, not a grant), which must be one run of machine frames, at
    /// 512 consecutive BFNs from the one answered (a multiple of 512): all
    /// or nothing. Each page is a mapping of its own (its own reference,
    /// revoked on its own). An unmap (flags exactly this) drops one
    /// reference to each of the 512 BFNs from `bfn` (a multiple of 512):
    /// all are checked first, and nothing is done unless each is a mapping
    /// of the context or a revoked BFN (acknowledged, the op answering
    /// `ESTALE`).
    pub const EXTENT_2M: u16 = 1 << 3;
}

/// Pages of a [`op_flags::EXTENT_2M`] extent: 2 MiB of 4 KiB pages.
pub const EXTENT_PAGES: u64 = 512;

/// Whether frame number `frame` (a gfn or a BFN) starts a 2 MiB extent.
/// (A mask, not `is_multiple_of`, which is newer than the Rust that
/// builds the engine object for Xen.)
pub const fn extent_aligned(frame: u64) -> bool {
    frame & (EXTENT_PAGES - 1) == 0
}

/// Kinds of reserved region ([`PvIommuRegion::kind`]).
pub mod region_kind {
    /// Interrupt / MSI window.
    pub const MSI: u32 = 1;
    /// Firmware-reserved memory (VT-d RMRR, AMD IVMD).
    pub const RMRR: u32 = 2;
    /// A PCI MMIO hole or bridge window.
    pub const MMIO: u32 = 3;
    /// Anything else the platform reports.
    pub const PLATFORM: u32 = 4;
}

/// `struct pv_iommu_caps`: answer of [`cmd::QUERY_CAPS`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuCaps {
    /// [`INTERFACE_VERSION`] of the hypervisor.
    pub version: u32,
    /// Largest `nr_ops` one batch may carry.
    pub max_batch_ops: u32,
    /// Bit n set: the IOMMU has 2^n-byte pages.
    pub page_sizes: u64,
    /// First BFN of the window the hypervisor allocates from.
    pub bfn_window_start: u64,
    /// One past the last BFN of that window.
    pub bfn_window_end: u64,
    /// Number of reserved regions ([`cmd::RESERVED_REGIONS`]).
    pub nr_reserved_regions: u32,
    /// [`feature`] bits.
    pub features: u32,
    /// Contexts a driver domain may hold, the default context included.
    pub max_contexts: u32,
    /// A [`translation`] code: whether the caller's context translates BFNs.
    pub translation: u32,
    /// The caller's quota of BFNs (live mappings plus unacknowledged
    /// revocations).
    pub quota: u64,
    /// The caller's BFNs in use (live plus revoked-unacknowledged).
    pub used: u64,
    /// The caller's revocations not yet acknowledged.
    pub revoked: u64,
    /// Written as zero.
    pub _rsvd: u64,
}

/// `struct pv_iommu_op`: one entry of a batch.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuOp {
    /// A [`subop`] code.
    pub subop: u16,
    /// [`op_flags`] bits.
    pub flags: u16,
    /// Out: 0 or a negative errno for this op.
    pub status: i32,
    /// The caller's IOMMU context (0 = default).
    pub context: u32,
    /// Foreign domain (map in, lookup out).
    pub domid: u16,
    /// Must be zero.
    pub _pad0: u16,
    /// Foreign guest frame (or grant reference).
    pub gfn: u64,
    /// Bus frame (map out; unmap and lookup in).
    pub bfn: u64,
    /// A revocation notice's number: out of `revoked_next` and in to
    /// `revoked_ack`, both with [`revoked_next::NUMBERED`] (ABI 1.5; before,
    /// reserved). Must be zero in every other op, and in `revoked_next`.
    pub notice: u64,
}

/// `struct pv_iommu_batch`: the argument of [`cmd::BATCH`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuBatch {
    /// Must be [`INTERFACE_VERSION`]'s major.
    pub version: u32,
    /// Entries in the ops array.
    pub nr_ops: u32,
    /// In/out: ops completed; processing resumes here.
    pub nr_done: u32,
    /// Must be zero.
    pub flags: u32,
    /// Guest address of `struct pv_iommu_op[nr_ops]`.
    pub ops: u64,
}

/// `struct pv_iommu_region`: one reserved BFN range.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuRegion {
    /// First frame of the range.
    pub start_bfn: u64,
    /// Frames in the range.
    pub nr_frames: u64,
    /// A [`region_kind`] code.
    pub kind: u32,
    /// Written as zero.
    pub _pad0: u32,
}

/// `struct pv_iommu_limits`: the argument of [`cmd::SET_LIMITS`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuLimits {
    /// Must be [`INTERFACE_VERSION`]'s major.
    pub version: u32,
    /// The driver domain whose limits are set.
    pub domid: u16,
    /// Must be zero.
    pub _pad0: u16,
    /// Its BFN quota; 0 returns it to the boot-time default.
    pub quota: u64,
}

/// `struct pv_iommu_stats`: the argument of [`cmd::STATS`]. Counters are
/// the named driver domain's, since its engine state was created or last
/// reset (dom0's state lives as long as the host; another domain's goes
/// when it holds nothing). The `ns_*` times accumulate only while timing
/// is on ([`stats_flag::TIMING_ON`]).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuStats {
    /// In: [`INTERFACE_VERSION`].
    pub version: u32,
    /// In: the driver domain described.
    pub domid: u16,
    /// In: [`stats_flag`] bits.
    pub flags: u16,
    /// Out: live mappings.
    pub live: u64,
    /// Out: revocation notices not yet acknowledged.
    pub revoked: u64,
    /// Out: BFNs counted against the quota.
    pub used: u64,
    /// Out: the quota.
    pub quota: u64,
    /// Out: foreign pages mapped, in each context (a page mapped in two
    /// contexts, or in one as a page of a 2 MiB extent and with other
    /// access, counts for each).
    pub mapped_pages: u64,
    /// Out: maps that installed a new IOMMU entry.
    pub maps: u64,
    /// Out: maps answered with an existing BFN (one more reference).
    pub shared: u64,
    /// Out: unmaps that removed an IOMMU entry.
    pub unmaps: u64,
    /// Out: mappings revoked (page left its domain, domain died).
    pub revocations: u64,
    /// Out: IOTLB flushes.
    pub flushes: u64,
    /// Out: batch hypercalls.
    pub batches: u64,
    /// Out: time inside batch hypercalls, in ns (everything below included).
    pub ns_batches: u64,
    /// Out: time in the page lookup (take a page reference).
    pub ns_get_page: u64,
    /// Out: time releasing page references after flushes.
    pub ns_put_page: u64,
    /// Out: time writing IOMMU entries.
    pub ns_iommu_map: u64,
    /// Out: time clearing IOMMU entries.
    pub ns_iommu_unmap: u64,
    /// Out: time in IOTLB flushes.
    pub ns_iommu_flush: u64,
    /// Out: engine heap in use host-wide, in bytes (tables of every driver
    /// domain plus the boot-time tables).
    pub heap_bytes: u64,
}

/// `struct pv_iommu_entry`: the argument of [`cmd::ENTRY`]. Shows what a
/// device walking the context will find (permissions, memory type, snoop)
/// without the machine address: the address field of the entry is zeroed.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuEntry {
    /// In: [`INTERFACE_VERSION`].
    pub version: u32,
    /// In: the driver domain.
    pub domid: u16,
    /// Must be zero.
    pub _pad0: u16,
    /// In: one of its contexts other than the default (whose tables are
    /// the host's own).
    pub context: u32,
    /// Out: level of the leaf (1: 4 KiB page, 2: 2 MiB superpage).
    pub level: u16,
    /// Out: the [`entry_format`] of `bits`.
    pub format: u16,
    /// In: the BFN.
    pub bfn: u64,
    /// Out: the leaf entry in the IOMMU's format, address bits zeroed.
    pub bits: u64,
}

/// `struct pv_iommu_regions`: the argument of [`cmd::RESERVED_REGIONS`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvIommuRegions {
    /// Must be [`INTERFACE_VERSION`]'s major.
    pub version: u32,
    /// Index of the first region wanted.
    pub start: u32,
    /// In: capacity of the array; out: entries written.
    pub nr: u32,
    /// Out: number of reserved regions.
    pub total: u32,
    /// Guest address of `struct pv_iommu_region[nr]`.
    pub regions: u64,
}

// Layout checks: the same numbers are asserted in C by tests/tests/c_abi.rs.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<PvIommuCaps>() == 80);
    assert!(offset_of!(PvIommuCaps, page_sizes) == 8);
    assert!(offset_of!(PvIommuCaps, bfn_window_start) == 16);
    assert!(offset_of!(PvIommuCaps, bfn_window_end) == 24);
    assert!(offset_of!(PvIommuCaps, nr_reserved_regions) == 32);
    assert!(offset_of!(PvIommuCaps, features) == 36);
    assert!(offset_of!(PvIommuCaps, max_contexts) == 40);
    assert!(offset_of!(PvIommuCaps, quota) == 48);
    assert!(offset_of!(PvIommuCaps, used) == 56);
    assert!(offset_of!(PvIommuCaps, translation) == 44);
    assert!(offset_of!(PvIommuCaps, revoked) == 64);
    assert!(size_of::<PvIommuOp>() == 40);
    assert!(offset_of!(PvIommuOp, flags) == 2);
    assert!(offset_of!(PvIommuOp, status) == 4);
    assert!(offset_of!(PvIommuOp, context) == 8);
    assert!(offset_of!(PvIommuOp, domid) == 12);
    assert!(offset_of!(PvIommuOp, gfn) == 16);
    assert!(offset_of!(PvIommuOp, bfn) == 24);
    assert!(offset_of!(PvIommuOp, notice) == 32);
    assert!(size_of::<PvIommuBatch>() == 24);
    assert!(offset_of!(PvIommuBatch, nr_done) == 8);
    assert!(offset_of!(PvIommuBatch, ops) == 16);
    assert!(size_of::<PvIommuRegion>() == 24);
    assert!(offset_of!(PvIommuRegion, kind) == 16);
    assert!(size_of::<PvIommuLimits>() == 16);
    assert!(offset_of!(PvIommuLimits, domid) == 4);
    assert!(offset_of!(PvIommuLimits, quota) == 8);
    assert!(size_of::<PvIommuRegions>() == 24);
    assert!(size_of::<PvIommuStats>() == 152);
    assert!(offset_of!(PvIommuStats, flags) == 6);
    assert!(offset_of!(PvIommuStats, live) == 8);
    assert!(offset_of!(PvIommuStats, maps) == 48);
    assert!(offset_of!(PvIommuStats, ns_batches) == 96);
    assert!(offset_of!(PvIommuStats, heap_bytes) == 144);
    assert!(offset_of!(PvIommuRegions, total) == 12);
    assert!(size_of::<PvIommuEntry>() == 32);
    assert!(offset_of!(PvIommuEntry, context) == 8);
    assert!(offset_of!(PvIommuEntry, level) == 12);
    assert!(offset_of!(PvIommuEntry, format) == 14);
    assert!(offset_of!(PvIommuEntry, bfn) == 16);
    assert!(offset_of!(PvIommuEntry, bits) == 24);
    assert!(offset_of!(PvIommuRegions, regions) == 16);
};

/// Every (struct, field, offset) and (struct, size) pair of the ABI, for the
/// C layout test that compiles them into `offsetof`/`sizeof` assertions.
pub const LAYOUT: &[(&str, &str, usize)] = &[
    ("pv_iommu_caps", "", core::mem::size_of::<PvIommuCaps>()),
    (
        "pv_iommu_caps",
        "version",
        core::mem::offset_of!(PvIommuCaps, version),
    ),
    (
        "pv_iommu_caps",
        "max_batch_ops",
        core::mem::offset_of!(PvIommuCaps, max_batch_ops),
    ),
    (
        "pv_iommu_caps",
        "page_sizes",
        core::mem::offset_of!(PvIommuCaps, page_sizes),
    ),
    (
        "pv_iommu_caps",
        "bfn_window_start",
        core::mem::offset_of!(PvIommuCaps, bfn_window_start),
    ),
    (
        "pv_iommu_caps",
        "bfn_window_end",
        core::mem::offset_of!(PvIommuCaps, bfn_window_end),
    ),
    (
        "pv_iommu_caps",
        "nr_reserved_regions",
        core::mem::offset_of!(PvIommuCaps, nr_reserved_regions),
    ),
    (
        "pv_iommu_caps",
        "features",
        core::mem::offset_of!(PvIommuCaps, features),
    ),
    (
        "pv_iommu_caps",
        "max_contexts",
        core::mem::offset_of!(PvIommuCaps, max_contexts),
    ),
    (
        "pv_iommu_caps",
        "translation",
        core::mem::offset_of!(PvIommuCaps, translation),
    ),
    (
        "pv_iommu_caps",
        "quota",
        core::mem::offset_of!(PvIommuCaps, quota),
    ),
    (
        "pv_iommu_caps",
        "used",
        core::mem::offset_of!(PvIommuCaps, used),
    ),
    (
        "pv_iommu_caps",
        "revoked",
        core::mem::offset_of!(PvIommuCaps, revoked),
    ),
    (
        "pv_iommu_caps",
        "_rsvd",
        core::mem::offset_of!(PvIommuCaps, _rsvd),
    ),
    ("pv_iommu_op", "", core::mem::size_of::<PvIommuOp>()),
    (
        "pv_iommu_op",
        "subop",
        core::mem::offset_of!(PvIommuOp, subop),
    ),
    (
        "pv_iommu_op",
        "flags",
        core::mem::offset_of!(PvIommuOp, flags),
    ),
    (
        "pv_iommu_op",
        "status",
        core::mem::offset_of!(PvIommuOp, status),
    ),
    (
        "pv_iommu_op",
        "context",
        core::mem::offset_of!(PvIommuOp, context),
    ),
    (
        "pv_iommu_op",
        "domid",
        core::mem::offset_of!(PvIommuOp, domid),
    ),
    (
        "pv_iommu_op",
        "_pad0",
        core::mem::offset_of!(PvIommuOp, _pad0),
    ),
    ("pv_iommu_op", "gfn", core::mem::offset_of!(PvIommuOp, gfn)),
    ("pv_iommu_op", "bfn", core::mem::offset_of!(PvIommuOp, bfn)),
    (
        "pv_iommu_op",
        "notice",
        core::mem::offset_of!(PvIommuOp, notice),
    ),
    ("pv_iommu_batch", "", core::mem::size_of::<PvIommuBatch>()),
    (
        "pv_iommu_batch",
        "version",
        core::mem::offset_of!(PvIommuBatch, version),
    ),
    (
        "pv_iommu_batch",
        "nr_ops",
        core::mem::offset_of!(PvIommuBatch, nr_ops),
    ),
    (
        "pv_iommu_batch",
        "nr_done",
        core::mem::offset_of!(PvIommuBatch, nr_done),
    ),
    (
        "pv_iommu_batch",
        "flags",
        core::mem::offset_of!(PvIommuBatch, flags),
    ),
    (
        "pv_iommu_batch",
        "ops",
        core::mem::offset_of!(PvIommuBatch, ops),
    ),
    ("pv_iommu_region", "", core::mem::size_of::<PvIommuRegion>()),
    (
        "pv_iommu_region",
        "start_bfn",
        core::mem::offset_of!(PvIommuRegion, start_bfn),
    ),
    (
        "pv_iommu_region",
        "nr_frames",
        core::mem::offset_of!(PvIommuRegion, nr_frames),
    ),
    (
        "pv_iommu_region",
        "kind",
        core::mem::offset_of!(PvIommuRegion, kind),
    ),
    (
        "pv_iommu_region",
        "_pad0",
        core::mem::offset_of!(PvIommuRegion, _pad0),
    ),
    ("pv_iommu_limits", "", core::mem::size_of::<PvIommuLimits>()),
    (
        "pv_iommu_limits",
        "version",
        core::mem::offset_of!(PvIommuLimits, version),
    ),
    (
        "pv_iommu_limits",
        "domid",
        core::mem::offset_of!(PvIommuLimits, domid),
    ),
    (
        "pv_iommu_limits",
        "_pad0",
        core::mem::offset_of!(PvIommuLimits, _pad0),
    ),
    (
        "pv_iommu_limits",
        "quota",
        core::mem::offset_of!(PvIommuLimits, quota),
    ),
    (
        "pv_iommu_regions",
        "",
        core::mem::size_of::<PvIommuRegions>(),
    ),
    (
        "pv_iommu_regions",
        "version",
        core::mem::offset_of!(PvIommuRegions, version),
    ),
    (
        "pv_iommu_regions",
        "start",
        core::mem::offset_of!(PvIommuRegions, start),
    ),
    (
        "pv_iommu_regions",
        "nr",
        core::mem::offset_of!(PvIommuRegions, nr),
    ),
    (
        "pv_iommu_regions",
        "total",
        core::mem::offset_of!(PvIommuRegions, total),
    ),
    (
        "pv_iommu_regions",
        "regions",
        core::mem::offset_of!(PvIommuRegions, regions),
    ),
    ("pv_iommu_stats", "", core::mem::size_of::<PvIommuStats>()),
    (
        "pv_iommu_stats",
        "version",
        core::mem::offset_of!(PvIommuStats, version),
    ),
    (
        "pv_iommu_stats",
        "domid",
        core::mem::offset_of!(PvIommuStats, domid),
    ),
    (
        "pv_iommu_stats",
        "flags",
        core::mem::offset_of!(PvIommuStats, flags),
    ),
    (
        "pv_iommu_stats",
        "live",
        core::mem::offset_of!(PvIommuStats, live),
    ),
    (
        "pv_iommu_stats",
        "revoked",
        core::mem::offset_of!(PvIommuStats, revoked),
    ),
    (
        "pv_iommu_stats",
        "used",
        core::mem::offset_of!(PvIommuStats, used),
    ),
    (
        "pv_iommu_stats",
        "quota",
        core::mem::offset_of!(PvIommuStats, quota),
    ),
    (
        "pv_iommu_stats",
        "mapped_pages",
        core::mem::offset_of!(PvIommuStats, mapped_pages),
    ),
    (
        "pv_iommu_stats",
        "maps",
        core::mem::offset_of!(PvIommuStats, maps),
    ),
    (
        "pv_iommu_stats",
        "shared",
        core::mem::offset_of!(PvIommuStats, shared),
    ),
    (
        "pv_iommu_stats",
        "unmaps",
        core::mem::offset_of!(PvIommuStats, unmaps),
    ),
    (
        "pv_iommu_stats",
        "revocations",
        core::mem::offset_of!(PvIommuStats, revocations),
    ),
    (
        "pv_iommu_stats",
        "flushes",
        core::mem::offset_of!(PvIommuStats, flushes),
    ),
    (
        "pv_iommu_stats",
        "batches",
        core::mem::offset_of!(PvIommuStats, batches),
    ),
    (
        "pv_iommu_stats",
        "ns_batches",
        core::mem::offset_of!(PvIommuStats, ns_batches),
    ),
    (
        "pv_iommu_stats",
        "ns_get_page",
        core::mem::offset_of!(PvIommuStats, ns_get_page),
    ),
    (
        "pv_iommu_stats",
        "ns_put_page",
        core::mem::offset_of!(PvIommuStats, ns_put_page),
    ),
    (
        "pv_iommu_stats",
        "ns_iommu_map",
        core::mem::offset_of!(PvIommuStats, ns_iommu_map),
    ),
    (
        "pv_iommu_stats",
        "ns_iommu_unmap",
        core::mem::offset_of!(PvIommuStats, ns_iommu_unmap),
    ),
    (
        "pv_iommu_stats",
        "ns_iommu_flush",
        core::mem::offset_of!(PvIommuStats, ns_iommu_flush),
    ),
    (
        "pv_iommu_stats",
        "heap_bytes",
        core::mem::offset_of!(PvIommuStats, heap_bytes),
    ),
    ("pv_iommu_entry", "", core::mem::size_of::<PvIommuEntry>()),
    (
        "pv_iommu_entry",
        "domid",
        core::mem::offset_of!(PvIommuEntry, domid),
    ),
    (
        "pv_iommu_entry",
        "context",
        core::mem::offset_of!(PvIommuEntry, context),
    ),
    (
        "pv_iommu_entry",
        "level",
        core::mem::offset_of!(PvIommuEntry, level),
    ),
    (
        "pv_iommu_entry",
        "format",
        core::mem::offset_of!(PvIommuEntry, format),
    ),
    (
        "pv_iommu_entry",
        "bfn",
        core::mem::offset_of!(PvIommuEntry, bfn),
    ),
    (
        "pv_iommu_entry",
        "bits",
        core::mem::offset_of!(PvIommuEntry, bits),
    ),
];
