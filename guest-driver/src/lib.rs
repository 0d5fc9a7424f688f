//! PV-IOMMU guest-side driver (grown by the guest-driver issue).
