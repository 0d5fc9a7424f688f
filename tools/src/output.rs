//! What the tool prints: one error type that knows its errno, and the JSON
//! shapes of `--json` (documented in `design/cli.md`). The JSON never carries
//! the ABI's padding or reserved fields; numbers a script would otherwise
//! have to decode (version, page sizes, region kinds, features, translation)
//! are spelled out.

use pviommu_abi::{
    feature, region_kind, translation, Bfn, ContextId, Errno, MemAttr, Permissions, PvIommuCaps,
    PvIommuRegion,
};
use pviommu_guest::entry::IommuEntry;
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

const FEATURE_NAMES: [(u32, &str); 9] = [
    (feature::CONTEXTS, "contexts"),
    (feature::ATTR_UC, "attr-uncached"),
    (feature::ATTR_DEVICE, "attr-device"),
    (feature::GRANT, "grant"),
    (feature::REVOCATION_QUEUE, "revocation-queue"),
    (feature::DEVICE_ATTACH, "device-attach"),
    (feature::REVOKED_IN_CONTEXT, "revoked-in-context"),
    (feature::REVOKED_NUMBERED, "revoked-numbered"),
    (feature::EXTENTS_2M, "extents-2m"),
];
// Every feature bit has a name: `unknown_features` is what a newer
// hypervisor offers that this tool does not know.
const _: () = {
    let mut all = 0;
    let mut i = 0;
    while i < FEATURE_NAMES.len() {
        all |= FEATURE_NAMES[i].0;
        i += 1;
    }
    assert!(all == feature::ALL);
};

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

/// What the hypervisor's refusal of a context or device command means, in
/// the words of that command (the ABI's errno meanings are the map's: its
/// `ENODEV` reads "frame is MMIO").
pub fn context_refusal(op: ContextOp, errno: Errno) -> &'static str {
    use ContextOp::*;
    match (op, errno) {
        (Attach, Errno::Perm) => "the device is not assigned to the calling domain",
        (Attach | Detach, Errno::NoDev) => "no such PCI device",
        (Attach, Errno::Busy) => "the device is attached to a context already; detach it first",
        (Attach, Errno::NoEnt) => "no such context; `pviommu context create` makes one",
        (Attach, Errno::NoSpc) => "the context has as many devices as it can hold",
        (Attach, Errno::OpNotSupp) => {
            "this device cannot walk a context of its own: it shares its requester id, \
             needs an RMRR or has ATS, or the IOMMU offers no device attachment"
        }
        (Detach, Errno::NoEnt) => "the device is not attached to that context",
        (Destroy, Errno::Busy) => {
            "the context still holds BFNs or has a device attached; \
             unmap them and `pviommu context detach` the device first"
        }
        (Destroy, Errno::NoEnt) => "no such context",
        (Create, Errno::OpNotSupp) => "the IOMMU offers only the default context",
        (Create, Errno::NoSpc) => "every context the caller may hold is in use",
        (Entry, Errno::Perm) => "only the control domain may read IOMMU entries",
        (Entry, Errno::NoEnt) => {
            "no such context of that domain, or nothing mapped at that BFN in it"
        }
        (_, e) => e.meaning(),
    }
}

/// The context and device commands, for [`context_refusal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextOp {
    /// `context create`.
    Create,
    /// `context destroy`.
    Destroy,
    /// `context attach`.
    Attach,
    /// `context detach`.
    Detach,
    /// `entry`.
    Entry,
}

/// A refusal of a context or device command, worded for that command;
/// other errors as they are.
pub fn context_error(op: ContextOp, what: String, e: pviommu_guest::Error) -> CliError {
    match e.errno() {
        Some(errno) => CliError::with_errno(
            errno,
            format!("{what}: {} ({})", errno.name(), context_refusal(op, errno)),
        ),
        None => CliError::from(e),
    }
}

/// `pviommu entry --json`.
#[derive(Serialize)]
pub struct EntryJson {
    /// The driver domain.
    pub domid: u16,
    /// Its context.
    pub context: u32,
    /// The BFN.
    pub bfn: u64,
    /// Level of the leaf (1: 4 KiB page).
    pub level: u32,
    /// Bytes the leaf maps.
    pub page_size: u64,
    /// The ABI's `entry_format` of `bits` (1: VT-d second level).
    pub format: u16,
    /// The raw entry, address bits zeroed: what the command is for.
    pub bits: u64,
    /// Its bits as a VT-d second-level leaf (absent for another format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtd: Option<VtdJson>,
}

/// The VT-d bits of an entry.
#[derive(Serialize)]
pub struct VtdJson {
    /// R.
    pub read: bool,
    /// W.
    pub write: bool,
    /// SNP: snooped whatever the device asks.
    pub snp: bool,
    /// IPAT: the memory type is EMT alone.
    pub ipat: bool,
    /// EMT by name: "UC", "WC", "WT", "WP", "WB", "UC-", "reserved".
    pub emt: &'static str,
    /// PS: a superpage.
    pub superpage: bool,
    /// Set bits that are none of these.
    pub other_bits: u64,
}

impl From<&IommuEntry> for EntryJson {
    fn from(e: &IommuEntry) -> EntryJson {
        EntryJson {
            domid: e.domid.0,
            context: e.context.0,
            bfn: e.bfn.0,
            level: e.level,
            page_size: e.page_size(),
            format: e.format,
            bits: e.bits,
            vtd: e.vtd().map(|v| VtdJson {
                read: v.read,
                write: v.write,
                snp: v.snoop,
                ipat: v.ipat,
                emt: v.emt.name(),
                superpage: v.superpage,
                other_bits: v.other,
            }),
        }
    }
}

impl EntryJson {
    /// One text line.
    pub fn text(&self, e: &IommuEntry) -> String {
        let size = match self.page_size {
            s if s >= 1 << 30 => format!("{} GiB", s >> 30),
            s if s >= 1 << 20 => format!("{} MiB", s >> 20),
            s => format!("{} KiB", s >> 10),
        };
        format!(
            "d{} context {} bfn {:#x}: level {} ({size}), entry {:#x}: {}",
            self.domid,
            self.context,
            self.bfn,
            self.level,
            self.bits,
            e.vtd()
                .map_or_else(|| format!("format {}", e.format), |v| v.flags_text())
        )
    }
}

/// One PCI device of the embedded simulator (`pviommu sim devices`).
#[derive(Serialize)]
pub struct DeviceJson {
    /// `ssss:bb:dd.f`.
    pub device: String,
    /// The domain it is assigned to.
    pub owner: u16,
    /// The context its DMA is translated by (0: the owner's default).
    pub context: u32,
    /// Its DMA carries a requester id of its own.
    pub own_requester_id: bool,
    /// It needs an RMRR (firmware-reserved memory mapped 1:1).
    pub rmrr: bool,
    /// It caches translations itself (ATS).
    pub ats: bool,
}
