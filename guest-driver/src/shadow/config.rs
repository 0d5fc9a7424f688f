//! Tunables shared by the PPGTT and GGTT shadows.

/// Tunables of a shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Most frames per `FrameMapper::map` / `unmap` call, and most extents
    /// per `map_extents` / `unmap_extents` call (at least 1).
    pub batch: usize,
    /// Most shadow table pages one PPGTT shadow may use. Bounds the work a
    /// hostile guest can cause (e.g. with 1 GiB pages, each costing 513
    /// shadow pages and 262144 mappings); entries beyond it stay non-present
    /// and are reported.
    pub max_tables: usize,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            batch: 512,
            max_tables: 1 << 16,
        }
    }
}
