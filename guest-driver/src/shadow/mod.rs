//! Shadow GPU page tables for a dom0 GPU mediator (GVT-g style).
//!
//! A guest's GPU tables map graphics memory addresses ([`Gma`]) to guest
//! frames; the mediator asks the hypervisor (through a [`FrameMapper`]) for a
//! bus frame per guest frame and keeps shadow tables mapping GMA -> BFN,
//! which the real GPU walks. [`ShadowPpgtt`] shadows a Gen8+ 4-level PPGTT
//! (incrementally re-synced from a list of changed guest table pages),
//! [`ShadowGgtt`] a range of the global GTT. The entry formats live in
//! [`ppgtt_format`] and [`ggtt_format`]; [`gpu_translate`] is an
//! independent simulated GPU walker for checking the result.

mod config;
mod error;
mod frame_hash;
mod ggtt;
pub mod ggtt_format;
mod gma;
mod gpu_walker;
mod heap_memory;
mod ppgtt;
mod ppgtt_engine;
pub mod ppgtt_format;
mod ppgtt_revoke;
mod report;
mod session;
mod table_pages;
mod traits;

#[cfg(test)]
mod tests;

pub use config::ShadowConfig;
pub use error::{MapError, ShadowError, ERRNO_BFN_TOO_WIDE, ERRNO_MAPPER_SHORT, ERRNO_NO_EXTENTS};
pub use ggtt::ShadowGgtt;
pub use gma::Gma;
pub use gpu_walker::{gpu_translate, gpu_translate_ggtt, gpu_walk};
pub use heap_memory::HeapShadowMemory;
pub use ppgtt::ShadowPpgtt;
pub use pviommu_abi::{Bfn, DomId, Gfn};
pub use report::{Anomaly, BuildReport, RefusedLeaf, RevokedLeaf, SyncReport, REPORT_KEPT};
pub use session::{RevocationReport, SessionError, ShadowSession};
#[doc(hidden)]
pub use table_pages::TablePages;
pub use traits::{FrameMapper, GuestTableReader, ShadowMemory};
