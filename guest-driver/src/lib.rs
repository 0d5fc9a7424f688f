//! The PV-IOMMU guest-side driver: what a dom0 GPU mediator links.
//!
//! * [`Client`] — open + capability check, batched `map_foreign` with
//!   resumption, unmap, lookup, reserved regions, contexts and the PCI
//!   devices attached to them, with a [`MappingCache`] in front so
//!   repeated maps of a page cost nothing; [`entry`] reads back what the
//!   IOMMU walks for a BFN of a context;
//! * [`transport`] — how hypercalls travel: [`transport::privcmd`] (Linux
//!   dom0 on Xen), [`transport::in_process`] (the embedded simulator),
//!   [`transport::remote`] (the `pviommu sim serve` daemon);
//! * [`shadow`] — shadow GPU page tables (Gen8+ PPGTT and GGTT) whose leaves
//!   point at BFNs, built and incrementally synced through the client;
//! * [`guest_memory`] — a foreign domain's memory over privcmd windows, the
//!   shadow tables' reader on Xen;
//! * [`capi`], [`capi_shadow`] — the C interface (`include/pviommu_guest.h`).
//!
//! Every hypercall batch is a `tracing` span; the library prints nothing.

pub mod cache;
pub mod capi;
pub mod capi_shadow;
pub mod client;
#[cfg(feature = "sim")]
pub mod daemon;
pub mod entry;
mod error;
pub mod guest_memory;
pub mod mapper;
pub mod notify;
pub mod shadow;
pub mod transport;

pub use cache::MappingCache;
pub use client::{Client, ClientStats, LookupResult, Revocation, Settled};
pub use entry::{IommuEntry, VtdEntry};
pub use error::Error;
