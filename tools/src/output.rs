//! What the tool prints: one error type that knows its errno, and the JSON
//! shapes of `--json` (documented in `design/cli.md`). The JSON never carries
//! the ABI's padding or reserved fields; numbers a script would otherwise
//! have to decode (version, page sizes, region kinds, features, translation)
//! are spelled out.

use pviommu_abi::{
    feature, region_kind, translation, Bfn, ContextId, Errno, MemAttr, Permissions, PvIommuCaps,
    PvIommuRegion,
};
use pviommu_guest::{LookupResult, Revocation};
use serde::Serialize;

/// A failed command: the errno a script can switch on and a one-line
/// message for people.
#[derive(Debug)]
pub struct CliError {
    /// Symbolic errno (`"ENOENT"`).
    pub errno: String,
    /// Its positive value.
    pub code: i32,
    /// What went wrong, one line.
    pub message: String,
    /// Per-item failures of a multi-item command (map, unmap).
    pub items: Vec<ItemError>,
}

/// One failed item of a multi-item command.
#[derive(Debug, Serialize)]
pub struct ItemError {
    /// The gfn (map) or BFN (unmap) that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gfn: Option<u64>,
    /// The BFN that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bfn: Option<u64>,
    /// Symbolic errno.
    pub errno: String,
    /// Its positive value.
    pub code: i32,
}

impl CliError {
    /// A bad command-line value (the tool refused before calling anything).
    pub fn invalid(message: impl Into<String>) -> CliError {
        CliError {
            errno: "EINVAL".into(),
            code: 22,
            message: message.into(),
            items: Vec::new(),
        }
    }

    /// An error with an explicit errno.
    pub fn with_errno(errno: Errno, message: impl Into<String>) -> CliError {
        CliError {
            errno: errno.name().into(),
            code: errno.code(),
            message: message.into(),
            items: Vec::new(),
        }
    }

    /// An operating-system failure (a file, a socket).
    pub fn os(what: impl std::fmt::Display, e: &std::io::Error) -> CliError {
        let (errno, code) = os_errno(e);
        CliError {
            errno,
            code,
            message: format!("{what}: {e}"),
            items: Vec::new(),
        }
    }
}

/// Symbolic name and value of an I/O error's errno (`EIO` when it has none).
fn os_errno(e: &std::io::Error) -> (String, i32) {
    match e.raw_os_error() {
        // nix's Debug of an errno is its C name ("ENOENT").
        Some(raw) => (format!("{:?}", nix::errno::Errno::from_raw(raw)), raw),
        None => ("EIO".into(), 5),
    }
}

impl From<String> for CliError {
    fn from(message: String) -> CliError {
        CliError {
            errno: "EIO".into(),
            code: 5,
            message,
            items: Vec::new(),
        }
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> CliError {
        CliError::from(message.to_string())
    }
}

impl From<pviommu_guest::Error> for CliError {
    fn from(e: pviommu_guest::Error) -> CliError {
        use pviommu_guest::Error as E;
        match &e {
            E::Hypervisor { errno, .. } => CliError::with_errno(*errno, e.to_string()),
            E::Os { source, .. } => {
                let (errno, code) = os_errno(source);
                CliError {
                    errno,
                    code,
                    message: e.to_string(),
                    items: Vec::new(),
                }
            }
            E::InvalidArgument(_) => CliError::invalid(e.to_string()),
            E::NoXen(_) => CliError {
                errno: "ENODEV".into(),
                code: 19,
                message: e.to_string(),
                items: Vec::new(),
            },
            E::Version { .. } => CliError {
                errno: "EPROTO".into(),
                code: 71,
                message: e.to_string(),
                items: Vec::new(),
            },
            _ => CliError::from(e.to_string()),
        }
    }
}

impl CliError {
    /// The JSON document printed on stdout for this error.
    pub fn to_json(&self) -> serde_json::Value {
        let mut error = serde_json::json!({
            "errno": self.errno,
            "code": self.code,
            "message": self.message,
        });
        if !self.items.is_empty() {
            error["items"] = serde_json::to_value(&self.items).unwrap_or_default();
        }
        serde_json::json!({ "error": error })
    }
}

/// Print `value` as JSON or `text()` as text.
pub fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            // Only maps with non-string keys fail; none of ours has one.
            Err(e) => println!("{}", CliError::from(e.to_string()).to_json()),
        }
    } else {
        let t = text();
        if !t.is_empty() {
            println!("{t}");
        }
    }
}

/// `"r-"`, `"-w"`, `"rw"`.
pub fn access_name(p: Permissions) -> &'static str {
    match (p.read, p.write) {
        (true, true) => "rw",
        (true, false) => "r-",
        (false, true) => "-w",
        (false, false) => "--",
    }
}

/// `"write-back"`, `"uncached"`, `"device"`.
pub fn attr_name(a: MemAttr) -> &'static str {
    match a {
        MemAttr::WriteBack => "write-back",
        MemAttr::Uncached => "uncached",
        MemAttr::Device => "device",
    }
}

/// The reserved-region kind by name.
pub fn region_kind_name(kind: u32) -> &'static str {
    match kind {
        region_kind::MSI => "msi",
        region_kind::RMRR => "rmrr",
        region_kind::MMIO => "mmio",
        region_kind::PLATFORM => "platform",
        _ => "unknown",
    }
}

fn translation_name(code: u32) -> &'static str {
    match code {
        translation::TRANSLATES => "translates",
        translation::NO_IOMMU => "no-iommu",
        translation::PASSTHROUGH => "passthrough",
        translation::RELAXED => "relaxed",
        translation::SHARED_PT => "shared-page-tables",
        translation::MIRRORS_P2M => "mirrors-p2m",
        _ => "unknown",
    }
}

const FEATURE_NAMES: [(u32, &str); 5] = [
    (feature::CONTEXTS, "contexts"),
    (feature::ATTR_UC, "attr-uncached"),
    (feature::ATTR_DEVICE, "attr-device"),
    (feature::GRANT, "grant"),
    (feature::REVOCATION_QUEUE, "revocation-queue"),
];

/// A BFN range, end exclusive.
#[derive(Serialize)]
pub struct BfnRange {
    /// First BFN.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

/// `pviommu caps --json`.
#[derive(Serialize)]
pub struct CapsJson {
    /// "major.minor".
    pub version: String,
    /// Largest batch.
    pub max_batch_ops: u32,
    /// IOMMU page sizes in bytes, ascending.
    pub page_sizes: Vec<u64>,
    /// The window BFNs are allocated from.
    pub bfn_window: BfnRange,
    /// How many reserved regions (`pviommu regions` lists them).
    pub reserved_regions: u32,
    /// Feature names.
    pub features: Vec<&'static str>,
    /// Feature bits this tool has no name for.
    pub unknown_features: u32,
    /// Contexts a driver domain may hold.
    pub max_contexts: u32,
    /// Whether the caller's context translates BFNs, by name.
    pub translation: &'static str,
    /// The caller's BFN quota.
    pub quota: u64,
    /// BFNs it holds (live plus revoked-unacknowledged).
    pub used: u64,
    /// Revocations it has not acknowledged.
    pub revoked: u64,
}

impl From<&PvIommuCaps> for CapsJson {
    fn from(c: &PvIommuCaps) -> CapsJson {
        CapsJson {
            version: format!("{}.{}", c.version >> 16, c.version & 0xffff),
            max_batch_ops: c.max_batch_ops,
            page_sizes: (0..64)
                .filter(|b| c.page_sizes & (1u64 << b) != 0)
                .map(|b| 1u64 << b)
                .collect(),
            bfn_window: BfnRange {
                start: c.bfn_window_start,
                end: c.bfn_window_end,
            },
            reserved_regions: c.nr_reserved_regions,
            features: FEATURE_NAMES
                .iter()
                .filter(|(bit, _)| c.features & bit != 0)
                .map(|(_, n)| *n)
                .collect(),
            unknown_features: c.features & !feature::ALL,
            max_contexts: c.max_contexts,
            translation: translation_name(c.translation),
            quota: c.quota,
            used: c.used,
            revoked: c.revoked,
        }
    }
}

impl CapsJson {
    /// The text form.
    pub fn text(&self) -> String {
        let sizes: Vec<String> = self
            .page_sizes
            .iter()
            .map(|s| match s {
                s if *s >= 1 << 30 => format!("{}G", s >> 30),
                s if *s >= 1 << 20 => format!("{}M", s >> 20),
                s => format!("{}K", s >> 10),
            })
            .collect();
        format!(
            "interface version {}\nBFN window        {:#x}..{:#x}\nmax batch ops     {}\npage sizes        {}\nreserved regions  {}\ncontexts          {}\nfeatures          {}\ntranslation       {}\nquota             {} ({} used, {} revoked)",
            self.version,
            self.bfn_window.start,
            self.bfn_window.end,
            self.max_batch_ops,
            sizes.join(" "),
            self.reserved_regions,
            self.max_contexts,
            self.features.join(" "),
            self.translation,
            self.quota,
            self.used,
            self.revoked
        )
    }
}

/// One mapping: `lookup`, `list`.
#[derive(Serialize)]
pub struct MappingJson {
    /// The BFN.
    pub bfn: u64,
    /// Its context.
    pub context: u32,
    /// Foreign domain.
    pub domid: u16,
    /// Foreign frame.
    pub gfn: u64,
    /// "rw", "r-", "-w".
    pub access: &'static str,
    /// "write-back", "uncached", "device".
    pub attribute: &'static str,
}

impl MappingJson {
    /// From a lookup answer.
    pub fn new(bfn: Bfn, context: ContextId, l: &LookupResult) -> MappingJson {
        MappingJson {
            bfn: bfn.0,
            context: context.0,
            domid: l.domid.0,
            gfn: l.gfn.0,
            access: access_name(l.perms),
            attribute: attr_name(l.attr),
        }
    }
    /// One text line.
    pub fn text(&self) -> String {
        format!(
            "{:>#12x}  {:>3}  {:>6}  {:>#10x}  {:<6}  {}",
            self.bfn,
            self.context,
            format!("d{}", self.domid),
            self.gfn,
            self.access,
            self.attribute
        )
    }
    /// The text header of [`text`](Self::text) lines.
    pub fn header() -> String {
        format!(
            "{:>12}  {:>3}  {:>6}  {:>10}  access  attribute",
            "bfn", "ctx", "domain", "gfn"
        )
    }
}

/// One reserved region.
#[derive(Serialize)]
pub struct RegionJson {
    /// First BFN.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Frames.
    pub frames: u64,
    /// "msi", "rmrr", "mmio", "platform" or "unknown".
    pub kind: &'static str,
}

impl From<&PvIommuRegion> for RegionJson {
    fn from(r: &PvIommuRegion) -> RegionJson {
        RegionJson {
            start: r.start_bfn,
            end: r.start_bfn.saturating_add(r.nr_frames),
            frames: r.nr_frames,
            kind: region_kind_name(r.kind),
        }
    }
}

/// One revocation notice.
#[derive(Serialize)]
pub struct RevocationJson {
    /// The revoked BFN, now released.
    pub bfn: u64,
    /// Its context.
    pub context: u32,
    /// The domain whose page it was.
    pub domid: u16,
    /// That page.
    pub gfn: u64,
}

impl From<&Revocation> for RevocationJson {
    fn from(r: &Revocation) -> RevocationJson {
        RevocationJson {
            bfn: r.bfn.0,
            context: r.context.0,
            domid: r.domid.0,
            gfn: r.gfn.0,
        }
    }
}
