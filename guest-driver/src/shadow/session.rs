//! What a mediator holds for one guest PPGTT: the PV-IOMMU client (the
//! shadow's [`FrameMapper`](super::FrameMapper)), a reader of the guest's
//! memory, the shadow table pages (heap memory here: the GPU walk is done in
//! dom0 by [`gpu_translate`]) and the shadow itself, kept between a build,
//! any number of syncs, the revocations that arrive meanwhile and the
//! teardown. The same type serves every backend: on Xen the client speaks
//! privcmd and the reader is [`ForeignMemory`](crate::guest_memory::ForeignMemory);
//! on the simulator both are the embedded machine's.

use core::fmt;

use pviommu_abi::{feature, Bfn, ContextId, DomId, Gfn};

use super::config::ShadowConfig;
use super::gma::Gma;
use super::gpu_walker::gpu_translate;
use super::heap_memory::HeapShadowMemory;
use super::ppgtt::ShadowPpgtt;
use super::report::{Anomaly, BuildReport, RevokedLeaf, SyncReport};
use super::traits::GuestTableReader;
use crate::transport::Transport;
use crate::{Client, Error, Revocation};

/// Highest domain id of a real domain (Xen's `DOMID_FIRST_RESERVED` is
/// 0x7ff0: DOMID_SELF, DOMID_IO, ... are not domains).
const DOMID_LAST_REAL: u16 = 0x7fef;

/// Why a session call was refused. A refused call changes nothing.
#[derive(Debug)]
pub enum SessionError {
    /// The PV-IOMMU client failed (a hypercall, the transport).
    Client(Error),
    /// The guest's PPGTT root page could not be read (bad domain, frame
    /// not the domain's, paged out).
    RootUnreadable {
        /// The domain.
        domid: DomId,
        /// The root frame.
        gfn: Gfn,
        /// Positive errno from the reader.
        errno: i32,
    },
    /// Not a domain a shadow can be built for (dom0 itself, a reserved id).
    BadDomain(DomId),
    /// No shadow is built.
    NotBuilt,
    /// A shadow is already built; tear it down first.
    AlreadyBuilt,
}

impl SessionError {
    /// Positive errno that best describes the refusal (for the C API and
    /// the tool's exit status).
    pub fn errno(&self) -> i32 {
        match self {
            // (A transport failure: ECOMM, as the C interface answers it
            // since 1.2; EIO is the hypervisor's, ABI 1.7.)
            SessionError::Client(e) => e
                .errno()
                .map_or(crate::error::ERRNO_TRANSPORT, |x| x.code()),
            SessionError::RootUnreadable { errno, .. } => *errno,
            SessionError::BadDomain(_) => 22,
            SessionError::NotBuilt => 2,
            SessionError::AlreadyBuilt => 16,
        }
    }
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Client(e) => write!(f, "{e}"),
            SessionError::RootUnreadable { domid, gfn, errno } => write!(
                f,
                "cannot read the PPGTT root gfn {:#x} of d{}: {}",
                gfn.0,
                domid.0,
                std::io::Error::from_raw_os_error(*errno)
            ),
            SessionError::BadDomain(d) => {
                write!(
                    f,
                    "d{} is not a guest domain a shadow can be built for",
                    d.0
                )
            }
            SessionError::NotBuilt => write!(f, "no shadow is built"),
            SessionError::AlreadyBuilt => write!(f, "a shadow is already built"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<Error> for SessionError {
    fn from(e: Error) -> Self {
        SessionError::Client(e)
    }
}

/// What [`ShadowSession::handle_revocations`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationReport {
    /// Every notice received and acknowledged (also those of BFNs this
    /// shadow did not hold).
    pub notices: Vec<Revocation>,
    /// The shadow leaves made non-present before the acknowledgements.
    pub leaves: Vec<RevokedLeaf>,
}

/// A mediator's shadow of one guest PPGTT and what it needs.
pub struct ShadowSession<T: Transport, R: GuestTableReader> {
    client: Client<T>,
    reader: R,
    memory: HeapShadowMemory,
    shadow: Option<ShadowPpgtt>,
    config: ShadowConfig,
}

impl<T: Transport, R: GuestTableReader> ShadowSession<T, R> {
    /// A session mapping through `client` and reading the guest through
    /// `reader` (which must read the domain later passed to
    /// [`build`](Self::build)).
    pub fn new(client: Client<T>, reader: R) -> Self {
        Self::with_config(client, reader, ShadowConfig::default())
    }

    /// [`new`](Self::new) with explicit shadow tunables.
    pub fn with_config(client: Client<T>, reader: R, config: ShadowConfig) -> Self {
        ShadowSession {
            client,
            reader,
            memory: HeapShadowMemory::new(),
            shadow: None,
            config,
        }
    }

    /// Build the shadow of the PPGTT whose PML4 is `root` of `domid`.
    /// Refused, with nothing mapped, when the domain id is not a guest's or
    /// the root page cannot be read.
    pub fn build(&mut self, domid: DomId, root: Gfn) -> Result<BuildReport, SessionError> {
        if self.shadow.is_some() {
            return Err(SessionError::AlreadyBuilt);
        }
        if domid == DomId::DOM0 || domid.0 > DOMID_LAST_REAL {
            return Err(SessionError::BadDomain(domid));
        }
        let (shadow, report) = ShadowPpgtt::build_with(
            self.config,
            &self.reader,
            &mut self.client,
            &mut self.memory,
            domid,
            root,
        );
        let root_failed = report.anomalies.iter().find_map(|a| match a {
            Anomaly::ReadFailed { table, errno } if *table == root => Some(*errno),
            _ => None,
        });
        if let Some(errno) = root_failed {
            // Nothing was mapped below an unreadable root; give back its page.
            shadow.teardown(&mut self.client, &mut self.memory);
            self.reader.invalidate();
            return Err(SessionError::RootUnreadable {
                domid,
                gfn: root,
                errno,
            });
        }
        self.shadow = Some(shadow);
        Ok(report)
    }

    /// Bring the shadow up to date after the guest changed the table pages
    /// `changed` (only those are re-read).
    pub fn sync(&mut self, changed: &[Gfn]) -> Result<SyncReport, SessionError> {
        let shadow = self.shadow.as_mut().ok_or(SessionError::NotBuilt)?;
        Ok(shadow.sync(&self.reader, &mut self.client, &mut self.memory, changed))
    }

    /// Re-read every shadowed guest table page afresh (the reader's cache
    /// dropped first) and act on what changed: for a mediator that does not
    /// trap the guest's table writes.
    pub fn sync_all(&mut self) -> Result<SyncReport, SessionError> {
        let shadow = self.shadow.as_mut().ok_or(SessionError::NotBuilt)?;
        self.reader.invalidate();
        let tables: Vec<Gfn> = shadow.guest_table_gfns().collect();
        Ok(shadow.sync(&self.reader, &mut self.client, &mut self.memory, &tables))
    }

    /// Receive every pending revocation. For each notice of this shadow's
    /// domain, the leaves holding the BFN become non-present *before* the
    /// notice is acknowledged (until then Xen keeps the BFN reserved); the
    /// client's mapping cache forgets the BFN, and the reader drops its
    /// mappings of the domain (its memory changed, or it is dying and must
    /// not be kept alive by them).
    pub fn handle_revocations(&mut self) -> Result<RevocationReport, SessionError> {
        let max = self.client.drain_bound();
        let mut leaves = Vec::new();
        let shadow = &mut self.shadow;
        let memory = &mut self.memory;
        let on_notice = |n: &Revocation| {
            if let Some(s) = shadow.as_mut() {
                if n.domid == s.domid() && n.context == ContextId::DEFAULT {
                    leaves.extend(s.revoke(memory, n.bfn));
                }
            }
        };
        // The shadow's BFNs are all in context 0: the notices of the
        // driver domain's other contexts are left to their owners (another
        // mediator's), where the hypervisor can tell them apart (ABI 1.4).
        let in_context = self.client.caps().features & feature::REVOKED_IN_CONTEXT != 0;
        let notices = if in_context {
            self.client
                .drain_revocations_in(ContextId::DEFAULT, max, on_notice)?
        } else {
            self.client.drain_revocations_with(max, on_notice)?
        };
        let ours = self.shadow.as_ref().map(|s| s.domid());
        if notices.iter().any(|n| Some(n.domid) == ours) {
            self.reader.invalidate();
        }
        Ok(RevocationReport { notices, leaves })
    }

    /// The BFN the GPU reaches for `gma` through the shadow (a walk of the
    /// shadow tables, as the GPU does it); None if not present.
    pub fn translate(&self, gma: Gma) -> Option<Bfn> {
        let root = self.shadow.as_ref()?.shadow_root()?;
        gpu_translate(&self.memory, root, gma)
    }

    /// Every present leaf (GMA, BFN), in GMA order.
    pub fn leaves(&self) -> Vec<(Gma, Bfn)> {
        self.shadow
            .as_ref()
            .map_or_else(Vec::new, |s| s.leaves(&self.memory))
    }

    /// Unmap every leaf, free the shadow, drop the reader's mappings.
    /// Returns the number of leaves unmapped.
    pub fn teardown(&mut self) -> Result<u64, SessionError> {
        let shadow = self.shadow.take().ok_or(SessionError::NotBuilt)?;
        let n = shadow.teardown(&mut self.client, &mut self.memory);
        self.reader.invalidate();
        Ok(n)
    }

    /// The shadow, if built.
    pub fn shadow(&self) -> Option<&ShadowPpgtt> {
        self.shadow.as_ref()
    }
    /// The PV-IOMMU client.
    pub fn client(&mut self) -> &mut Client<T> {
        &mut self.client
    }
    /// The guest-memory reader.
    pub fn reader(&self) -> &R {
        &self.reader
    }
    /// The shadow table pages.
    pub fn memory(&self) -> &HeapShadowMemory {
        &self.memory
    }
}

impl<T: Transport, R: GuestTableReader> Drop for ShadowSession<T, R> {
    /// A session going away gives its BFNs back.
    fn drop(&mut self) {
        if self.shadow.is_some() {
            let _ = self.teardown();
        }
    }
}
