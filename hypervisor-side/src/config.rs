//! Tunables, set in one place.

/// Live mappings a driver domain may hold unless configured otherwise.
pub const DEFAULT_QUOTA: u64 = 65_536;
/// The most BFNs any one driver domain may be given (boot default or a
/// toolstack setting): bounds the engine's memory per driver domain
/// (about 100 bytes per BFN).
pub const MAX_QUOTA: u64 = 1 << 24;
/// Largest batch accepted in one call, unless configured otherwise.
pub const MAX_BATCH_OPS: u32 = 1024;
/// The most a boot-time setting may raise the batch size to. Batches are
/// preemptible and copied op by op, so this only bounds one caller's claim
/// on a vCPU between preemption checks.
pub const MAX_BATCH_OPS_LIMIT: u32 = 65_536;
/// Contexts a driver domain may create (the default context included),
/// when the backend supports more than one.
pub const MAX_CONTEXTS: u32 = 16;
/// Reserved regions copied out per call, to bound the work of one call.
pub const MAX_REGIONS_PER_CALL: u32 = 64;
/// The x86 interrupt (MSI) window, 0xFEE00000-0xFEEFFFFF, in frames.
pub const X86_MSI_WINDOW: (u64, u64) = (0xFEE00, 0x100);
/// The BFN window never starts below 4 GiB: below it sit PCI MMIO holes,
/// where a DMA could be routed peer-to-peer and never reach the IOMMU.
pub const WINDOW_FLOOR: u64 = 0x10_0000;
/// Alignment of the window start, so 2 MiB superpages are possible.
pub const WINDOW_ALIGN: u64 = 512;

/// Engine configuration (on Xen: the `pviommu=quota=N,batch=M` boot option).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// BFNs a driver domain may hold (live mappings plus revocations it has
    /// not acknowledged): bounds the engine's memory per driver domain.
    pub quota: u64,
    /// Largest batch.
    pub max_batch_ops: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            quota: DEFAULT_QUOTA,
            max_batch_ops: MAX_BATCH_OPS,
        }
    }
}
