//! The embedded simulated machine: host RAM frames holding bytes, domains
//! with p2m tables and page types, a privileged dom0, device-model relations,
//! reserved ranges, the engine running against it, and a DMA device behind a
//! simulated IOMMU that walks the real-format page tables in RAM
//! ([`hardware`]) through an IOTLB that only a flush invalidates.
//!
//! Nothing here returns canned answers: a DMA reads what the page tables,
//! as written by [`crate::pgtable`], make it reach.

mod guest_call;
pub mod hardware;
mod machine;

pub use hardware::{DmaFault, FaultReason};
pub use machine::{DomainSpec, Format, FrameInfo, Owner, SimMachine};
