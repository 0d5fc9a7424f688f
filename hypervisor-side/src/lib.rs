//! The PV-IOMMU hypervisor-side engine.
//!
//! `no_std` + `alloc`, no floating point, no reachable panic at all (the Xen
//! object's build proves it): every failure is a `Result` carrying an ABI
//! [`Errno`], every allocation is fallible. What the hypervisor
//! provides comes in through two traits, so the same code runs inside Xen
//! (`xen/engine-staticlib` over `xen/pviommu.c`) and on the embedded simulated
//! machine ([`sim`], feature `sim`).
//!
//! Where to look:
//! * a hypercall enters at [`engine::Engine::hypercall`], in [`hypercall`]
//!   (copy in, validate, act, copy out, continuation);
//! * the gfn and domain-death hooks enter at
//!   [`engine::Engine::gfn_changed`] and [`engine::Engine::domain_teardown`];
//! * permission is decided in [`permission`];
//! * page-table entries are written in [`pgtable`] (formats in
//!   [`pgtable::vtd`] and [`pgtable::lpae`], the walker in [`pgtable::IoPageTable`]);
//! * the IOTLB is flushed once per batch through [`iommu::FlushGather`];
//! * BFNs are numbered in [`bfn_alloc`]; mappings, locks and revocation live
//!   in [`engine`] (its module docs say which lock protects what);
//! * an index a guest chooses is clamped under speculation where it first
//!   meets an array, by [`nospec`];
//! * the engine's heap cap, and the share of it kept for the control
//!   domain, is [`heap_budget`].
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod bfn_alloc;
pub mod config;
pub mod engine;
pub mod heap_budget;
pub mod hypercall;
pub mod iommu;
pub mod nospec;
pub mod permission;
pub mod pgtable;
pub mod platform;
#[cfg(feature = "sim")]
pub mod sim;
pub mod storage;

/// The engine with a host mutex, for the simulator, tests and tools. Inside
/// Xen the engine is `engine::Engine<XenLock>` over Xen's spinlock. Hosted,
/// the lock also records which thread holds it, so the simulator can catch
/// a hypervisor service (p2m lookup, guest copy) called under it.
#[cfg(feature = "std")]
pub type Engine = engine::Engine<lock_check::CheckedLock>;
#[cfg(feature = "std")]
pub mod lock_check;
pub use pviommu_abi::{self as abi, Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Permissions, Sbdf};

/// Machine frame number. Only the hypervisor side knows these: nothing in
/// this crate converts an `Mfn` into a value a guest sees.
/// (`repr(transparent)`: a slice of them is the array of frame numbers
/// Xen's glue fills, `pvx_get_pages`.)
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct Mfn(pub u64);
