//! The remote transport: a client of the `pviommu sim serve` daemon
//! (module `daemon`, feature `sim`), so several processes share one
//! simulated machine.
//!
//! The connection is a Unix stream socket carrying length-prefixed frames
//! (a `u32` little-endian body length, at most [`wire::MAX_FRAME`], then a
//! bincode body; see [`wire`]). The first exchange is a handshake
//! ([`wire::Request::Hello`] / [`wire::Response::Welcome`]); after it each
//! request gets exactly one response. The client is synchronous (a plain
//! [`std::os::unix::net::UnixStream`]), so it works from any thread without
//! an async runtime.
//!
//! Protocol 2 adds revocation push: after [`wire::Request::Subscribe`] the
//! daemon sends [`wire::Response::Revoked`] frames, unasked, whenever BFNs
//! of the subscribed driver domain are revoked (the simulator's equivalent
//! of Xen's `VIRQ_PV_IOMMU`, carrying the notices themselves). Such a frame
//! may arrive before any response; [`Remote`] subscribes at connect, keeps
//! what it receives (bounded) and hands it to the [`Client`](crate::Client),
//! which drops those BFNs from its mapping cache at once. The notices still
//! have to be acknowledged (`drain_revocations`): the push only tells. The
//! daemon still serves protocol 1 clients, without pushes.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use pviommu_abi::{Bfn, ContextId, DomId, Errno, Gfn, PvIommuCaps, PvIommuOp, PvIommuRegion};

use super::Transport;
use crate::Error;

/// The messages exchanged with the daemon, shared by the client
/// ([`Remote`]) and the server (module `daemon`, feature `sim`).
pub mod wire {
    use bincode::Options;
    use pviommu_abi::{PvIommuCaps, PvIommuOp, PvIommuRegion};
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize};

    /// Magic bytes of [`Request::Hello`].
    pub const MAGIC: [u8; 4] = *b"PVIO";
    /// The protocol version this crate speaks.
    pub const PROTOCOL_VERSION: u32 = 2;
    /// The oldest version the daemon still serves (1: no push, no
    /// [`Request::Subscribe`] or [`Request::BalloonOut`]).
    pub const MIN_PROTOCOL_VERSION: u32 = 1;
    /// Most notices in one [`Response::Revoked`] frame (about 24 bytes each,
    /// well inside [`MAX_FRAME`]).
    pub const MAX_NOTICES_PER_FRAME: usize = 4096;
    /// Largest frame body, in bytes, either way. A longer declared length is
    /// refused without reading the body.
    pub const MAX_FRAME: u32 = 1 << 20;
    /// Largest [`Request::DmaRead`] length.
    pub const MAX_DMA_LEN: u32 = 64 * 1024;
    /// Bytes of the length prefix.
    pub const LEN_PREFIX: usize = 4;

    /// A client's message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Request {
        /// The mandatory first frame.
        Hello {
            /// Must be [`MAGIC`].
            magic: [u8; 4],
            /// Must be [`PROTOCOL_VERSION`].
            version: u32,
        },
        /// `PVIOMMU_CMD_query_caps` as domain `caller`.
        QueryCaps {
            /// Calling domain.
            caller: u16,
        },
        /// One `PVIOMMU_CMD_batch` call as domain `caller`.
        Batch {
            /// Calling domain.
            caller: u16,
            /// The ops (at most the engine's `max_batch_ops`).
            ops: Vec<PvIommuOp>,
            /// Ops already completed; processing resumes here.
            nr_done: u32,
        },
        /// `PVIOMMU_CMD_reserved_regions` as domain `caller`.
        Regions {
            /// Calling domain.
            caller: u16,
            /// Index of the first region wanted.
            start: u32,
            /// At most this many regions.
            max: u32,
        },
        /// Simulator admin: create a domain with zeroed RAM.
        CreateDomain {
            /// New domain id.
            domid: u16,
            /// RAM pages (gfn 0..pages).
            pages: u64,
            /// Privileged (control domain).
            privileged: bool,
            /// The domain this one is the device model of.
            device_model_of: Option<u16>,
        },
        /// Simulator admin: write bytes into a domain's page, as the domain.
        WriteGuest {
            /// Domain.
            domid: u16,
            /// Its guest frame.
            gfn: u64,
            /// Byte offset in the page.
            offset: u32,
            /// The bytes (`offset + len` at most 4096).
            data: Vec<u8>,
        },
        /// Simulator admin: the DMA device of `owner` reads through the IOMMU.
        DmaRead {
            /// Device owner (driver domain).
            owner: u16,
            /// IOMMU context the device is attached to.
            context: u32,
            /// Bus address.
            addr: u64,
            /// Bytes (at most [`MAX_DMA_LEN`]).
            len: u32,
        },
        /// Simulator admin: destroy a domain (the machine frees its pages,
        /// the engine revokes every mapping of them).
        DestroyDomain {
            /// Domain.
            domid: u16,
        },
        /// Simulator admin: counters of the machine.
        Stats,
        /// `PVIOMMU_CMD_set_limits` as domain `caller`.
        SetLimits {
            /// Calling domain (the control domain, or refused).
            caller: u16,
            /// The driver domain whose quota is set.
            domid: u16,
            /// Its BFN quota (0: the boot default).
            quota: u64,
        },
        /// Protocol 2: push [`Response::Revoked`] frames on this connection
        /// for the BFNs of driver domain `caller`, starting with the notices
        /// pending now. Answered [`Response::Done`]; a later Subscribe
        /// replaces it.
        Subscribe {
            /// The driver domain whose revocations this connection hears.
            caller: u16,
        },
        /// Protocol 2, simulator admin: balloon `gfn` out of `domid` (the
        /// hypervisor revokes every BFN of that page).
        BalloonOut {
            /// Domain.
            domid: u16,
            /// Its frame.
            gfn: u64,
        },
    }

    /// One revocation notice, as pushed.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Notice {
        /// The subscriber's context that held the BFN.
        pub context: u32,
        /// The revoked BFN (reserved until acknowledged).
        pub bfn: u64,
        /// The foreign domain whose page it mapped.
        pub domid: u16,
        /// That page.
        pub gfn: u64,
    }

    /// What the daemon announces in [`Response::Welcome`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ServerInfo {
        /// The protocol version the daemon speaks.
        pub version: u32,
        /// Largest frame body it accepts.
        pub max_frame: u32,
        /// Largest batch its engine accepts.
        pub max_batch_ops: u32,
        /// Largest DMA read it accepts.
        pub max_dma_len: u32,
    }

    /// Counters of the simulated machine ([`Request::Stats`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Stats {
        /// Page references held on all frames (0 when nothing is mapped).
        pub total_page_refs: u64,
        /// Free RAM frames.
        pub free_frames: u64,
        /// Frames freed by their owner but still referenced.
        pub zombie_frames: u64,
        /// Frames the hypervisor holds.
        pub xen_frames: u64,
        /// DMA faults recorded so far.
        pub faults: u64,
        /// IOTLB flushes issued so far.
        pub flushes: u64,
    }

    /// The daemon's message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Response {
        /// Handshake accepted.
        Welcome(ServerInfo),
        /// Answer of [`Request::QueryCaps`].
        Caps(PvIommuCaps),
        /// Answer of [`Request::Batch`]: the hypercall's return value, the
        /// new `nr_done` and the ops with their statuses and outputs.
        Batch {
            /// Return value (0, 1 = incomplete, or a negative errno).
            ret: i64,
            /// Ops completed.
            nr_done: u32,
            /// The ops, updated.
            ops: Vec<PvIommuOp>,
        },
        /// Answer of [`Request::Regions`].
        Regions {
            /// The regions from `start`.
            regions: Vec<PvIommuRegion>,
            /// Total count.
            total: u32,
        },
        /// An admin request succeeded.
        Done,
        /// Bytes read by [`Request::DmaRead`].
        Data(Vec<u8>),
        /// Answer of [`Request::Stats`].
        Stats(Stats),
        /// The request failed. After a protocol error (bad frame, bad
        /// handshake) the daemon closes the connection.
        Error {
            /// Positive ABI errno, when the hypervisor or machine refused.
            errno: Option<i32>,
            /// What went wrong.
            message: String,
        },
        /// Protocol 2, unasked: BFNs of the subscribed driver domain were
        /// revoked (at most [`MAX_NOTICES_PER_FRAME`]; each notice is sent
        /// once per connection).
        Revoked(Vec<Notice>),
    }

    /// The bincode options of both sides: little-endian, varint integers,
    /// trailing bytes rejected, nothing larger than [`MAX_FRAME`] decoded.
    pub fn options() -> impl Options {
        bincode::DefaultOptions::new().with_limit(u64::from(MAX_FRAME))
    }

    /// A whole frame (length prefix and body) for `msg`.
    pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, bincode::Error> {
        let body = options().serialize(msg)?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| Box::new(bincode::ErrorKind::SizeLimit))?;
        let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decode a frame body.
    pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, bincode::Error> {
        options().deserialize(body)
    }
}

use wire::{Request, Response, ServerInfo, Stats};

/// How long [`Remote::connect`] waits for the daemon's handshake answer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pushed notices a [`Remote`] keeps until they are taken; beyond this the
/// oldest are dropped (and counted): the hypervisor still reports every
/// notice through `revoked_next`, so only the early cache invalidation is
/// lost.
pub const MAX_QUEUED_NOTICES: usize = 1 << 16;

/// A connection to the simulator daemon, calling as one domain.
pub struct Remote {
    stream: UnixStream,
    caller: DomId,
    info: ServerInfo,
    /// Set after an I/O or framing failure: the stream may be out of step.
    broken: bool,
    /// Revocations pushed by the daemon, not yet taken.
    notices: VecDeque<wire::Notice>,
    /// Pushed notices dropped because the queue was full.
    notices_dropped: u64,
}

fn remote_err(msg: impl Into<String>) -> Error {
    Error::Remote(msg.into())
}

/// Map a daemon error response to the library's error.
fn response_error(what: &str, errno: Option<i32>, message: String) -> Error {
    match errno.and_then(Errno::from_code) {
        Some(errno) => Error::Hypervisor {
            what: format!("{what}: {message}"),
            errno,
        },
        None => Error::Remote(format!("{what}: {message}")),
    }
}

impl Remote {
    /// Connect to the daemon's socket at `path` and shake hands; hypercalls
    /// are then issued as `caller`.
    pub fn connect(path: impl AsRef<Path>, caller: DomId) -> Result<Remote, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| Error::Os {
            what: format!("connect to {}", path.display()),
            source,
        })?;
        let mut remote = Remote {
            stream,
            caller,
            info: ServerInfo {
                version: 0,
                max_frame: wire::MAX_FRAME,
                max_batch_ops: 0,
                max_dma_len: 0,
            },
            broken: false,
            notices: VecDeque::new(),
            notices_dropped: 0,
        };
        // A daemon that never answers must not hang the caller forever.
        remote.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let hello = Request::Hello {
            magic: wire::MAGIC,
            version: wire::PROTOCOL_VERSION,
        };
        match remote.call(&hello)? {
            Response::Welcome(info) if info.version == wire::PROTOCOL_VERSION => {
                remote.info = info;
                // Hear of revocations from the start, so none is missed
                // between connecting and the first drain.
                remote.expect_done("subscribe", &Request::Subscribe { caller: caller.0 })?;
                remote.set_timeout(None)?;
                Ok(remote)
            }
            Response::Welcome(info) => Err(Error::Version {
                found: info.version,
                expected: wire::PROTOCOL_VERSION,
            }),
            Response::Error { errno, message } => Err(response_error("handshake", errno, message)),
            other => Err(remote_err(format!(
                "handshake: unexpected answer {}",
                kind(&other)
            ))),
        }
    }

    /// The domain hypercalls are issued as.
    pub fn caller(&self) -> DomId {
        self.caller
    }

    /// Call as another domain from now on (and hear of its revocations
    /// instead).
    pub fn set_caller(&mut self, caller: DomId) -> Result<(), Error> {
        self.caller = caller;
        self.notices.clear();
        self.expect_done("subscribe", &Request::Subscribe { caller: caller.0 })
    }

    /// Simulator admin: balloon `gfn` out of `domid`; the hypervisor revokes
    /// every BFN of the page (and the daemon pushes the notices).
    pub fn balloon_out(&mut self, domid: DomId, gfn: Gfn) -> Result<(), Error> {
        let req = Request::BalloonOut {
            domid: domid.0,
            gfn: gfn.0,
        };
        self.expect_done("balloon out", &req)
    }

    /// Take the revocations the daemon pushed so far.
    pub fn take_notices(&mut self) -> Vec<wire::Notice> {
        self.notices.drain(..).collect()
    }

    /// Pushed notices dropped because nobody took them in time.
    pub fn notices_dropped(&self) -> u64 {
        self.notices_dropped
    }

    /// Wait up to `timeout` for the daemon to push a revocation. `Ok(true)`
    /// when notices are queued (now or on return), `Ok(false)` on timeout.
    pub fn wait_notices(&mut self, timeout: Duration) -> Result<bool, Error> {
        if !self.notices.is_empty() {
            return Ok(true);
        }
        if self.broken {
            return Err(remote_err(
                "connection unusable after an earlier failure; reconnect",
            ));
        }
        // Wait for the stream to become readable only; once a frame starts,
        // read it whole (a frame cut by a timeout would leave the stream
        // out of step).
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        let ready = match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => n > 0,
            Err(nix::errno::Errno::EINTR) => false,
            Err(e) => {
                return Err(Error::Os {
                    what: "remote simulator: wait for notices".into(),
                    source: e.into(),
                })
            }
        };
        if !ready {
            return Ok(false);
        }
        self.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let r = match self.read_frame() {
            Ok(Response::Revoked(n)) => {
                self.queue(n);
                Ok(true)
            }
            Ok(other) => Err(remote_err(format!(
                "daemon sent an unasked {} frame",
                kind(&other)
            ))),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.broken = true;
            return r;
        }
        self.set_timeout(None)?;
        r
    }

    fn queue(&mut self, notices: Vec<wire::Notice>) {
        for n in notices {
            if self.notices.len() >= MAX_QUEUED_NOTICES {
                self.notices.pop_front();
                self.notices_dropped += 1;
            }
            self.notices.push_back(n);
        }
    }

    /// What the daemon announced in the handshake.
    pub fn server_info(&self) -> ServerInfo {
        self.info
    }

    /// Give up on a read or write after `timeout` (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        let os = |source| Error::Os {
            what: "set socket timeout".to_string(),
            source,
        };
        self.stream.set_read_timeout(timeout).map_err(os)?;
        self.stream.set_write_timeout(timeout).map_err(os)
    }

    /// Simulator admin: create domain `domid` with `pages` zeroed RAM pages.
    pub fn create_domain(
        &mut self,
        domid: DomId,
        pages: u64,
        privileged: bool,
        device_model_of: Option<DomId>,
    ) -> Result<(), Error> {
        let req = Request::CreateDomain {
            domid: domid.0,
            pages,
            privileged,
            device_model_of: device_model_of.map(|d| d.0),
        };
        self.expect_done("create domain", &req)
    }

    /// Simulator admin: write `data` into `domid`'s page `gfn` at `offset`.
    pub fn write_guest(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        offset: u32,
        data: &[u8],
    ) -> Result<(), Error> {
        let req = Request::WriteGuest {
            domid: domid.0,
            gfn: gfn.0,
            offset,
            data: data.to_vec(),
        };
        self.expect_done("write guest", &req)
    }

    /// Simulator admin: the DMA device of `owner`, attached to `context`,
    /// reads `len` bytes at bus address `addr`. A DMA fault is reported as
    /// [`Error::Remote`].
    pub fn dma_read(
        &mut self,
        owner: DomId,
        context: ContextId,
        addr: u64,
        len: u32,
    ) -> Result<Vec<u8>, Error> {
        if len > self.info.max_dma_len {
            return Err(Error::InvalidArgument(format!(
                "DMA read of {len} bytes exceeds the daemon's limit {}",
                self.info.max_dma_len
            )));
        }
        let req = Request::DmaRead {
            owner: owner.0,
            context: context.0,
            addr,
            len,
        };
        match self.call(&req)? {
            Response::Data(d) if d.len() == len as usize => Ok(d),
            Response::Data(d) => Err(remote_err(format!(
                "dma read: asked {len} bytes, got {}",
                d.len()
            ))),
            other => Err(unexpected("dma read", other)),
        }
    }

    /// Simulator admin: destroy domain `domid` (its mappings are revoked).
    pub fn destroy_domain(&mut self, domid: DomId) -> Result<(), Error> {
        self.expect_done("destroy domain", &Request::DestroyDomain { domid: domid.0 })
    }

    /// Simulator admin: counters of the shared machine.
    pub fn stats(&mut self) -> Result<Stats, Error> {
        match self.call(&Request::Stats)? {
            Response::Stats(s) => Ok(s),
            other => Err(unexpected("stats", other)),
        }
    }

    fn expect_done(&mut self, what: &str, req: &Request) -> Result<(), Error> {
        match self.call(req)? {
            Response::Done => Ok(()),
            other => Err(unexpected(what, other)),
        }
    }

    /// Send one request and read its response. Transport failures mark the
    /// connection broken; later calls fail at once.
    fn call(&mut self, req: &Request) -> Result<Response, Error> {
        if self.broken {
            return Err(remote_err(
                "connection unusable after an earlier failure; reconnect",
            ));
        }
        let res = self.exchange(req);
        if res.is_err() {
            self.broken = true;
        }
        res
    }

    fn exchange(&mut self, req: &Request) -> Result<Response, Error> {
        let frame =
            wire::encode_frame(req).map_err(|e| remote_err(format!("encode request: {e}")))?;
        self.stream
            .write_all(&frame)
            .map_err(|e| io_err("send request", e))?;
        // Pushed notices may come first; the answer is the first other frame.
        loop {
            match self.read_frame()? {
                Response::Revoked(n) => self.queue(n),
                answer => return Ok(answer),
            }
        }
    }

    /// Read one whole frame from the daemon.
    fn read_frame(&mut self) -> Result<Response, Error> {
        let mut len = [0u8; wire::LEN_PREFIX];
        self.stream
            .read_exact(&mut len)
            .map_err(|e| io_err("read response", e))?;
        let len = u32::from_le_bytes(len);
        if len > wire::MAX_FRAME {
            return Err(remote_err(format!(
                "response of {len} bytes exceeds the frame limit {}",
                wire::MAX_FRAME
            )));
        }
        let mut body = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| io_err("read response", e))?;
        let r: Response =
            wire::decode(&body).map_err(|e| remote_err(format!("malformed response: {e}")))?;
        if let Response::Revoked(n) = &r {
            if n.len() > wire::MAX_NOTICES_PER_FRAME {
                return Err(remote_err(format!(
                    "a push of {} notices exceeds the limit {}",
                    n.len(),
                    wire::MAX_NOTICES_PER_FRAME
                )));
            }
        }
        Ok(r)
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            remote_err(format!("{what}: daemon closed the connection"))
        }
        _ => Error::Os {
            what: format!("remote simulator: {what}"),
            source: e,
        },
    }
}

fn kind(r: &Response) -> &'static str {
    match r {
        Response::Welcome(_) => "Welcome",
        Response::Caps(_) => "Caps",
        Response::Batch { .. } => "Batch",
        Response::Regions { .. } => "Regions",
        Response::Done => "Done",
        Response::Data(_) => "Data",
        Response::Stats(_) => "Stats",
        Response::Error { .. } => "Error",
        Response::Revoked(_) => "Revoked",
    }
}

fn unexpected(what: &str, r: Response) -> Error {
    match r {
        Response::Error { errno, message } => response_error(what, errno, message),
        other => remote_err(format!("{what}: unexpected answer {}", kind(&other))),
    }
}

impl Transport for Remote {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn query_caps(&mut self) -> Result<PvIommuCaps, Error> {
        match self.call(&Request::QueryCaps {
            caller: self.caller.0,
        })? {
            Response::Caps(c) => Ok(c),
            other => Err(unexpected("query_caps", other)),
        }
    }

    fn batch(&mut self, ops: &mut [PvIommuOp], nr_done: u32) -> Result<(i64, u32), Error> {
        let req = Request::Batch {
            caller: self.caller.0,
            ops: ops.to_vec(),
            nr_done,
        };
        match self.call(&req)? {
            Response::Batch {
                ret,
                nr_done,
                ops: out,
            } if out.len() == ops.len() => {
                ops.copy_from_slice(&out);
                Ok((ret, nr_done))
            }
            Response::Batch { ops: out, .. } => Err(remote_err(format!(
                "batch: sent {} ops, got {} back",
                ops.len(),
                out.len()
            ))),
            other => Err(unexpected("batch", other)),
        }
    }

    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), Error> {
        match self.call(&Request::Regions {
            caller: self.caller.0,
            start,
            max,
        })? {
            Response::Regions { regions, total } if regions.len() <= max as usize => {
                Ok((regions, total))
            }
            Response::Regions { regions, .. } => Err(remote_err(format!(
                "regions: asked at most {max}, got {}",
                regions.len()
            ))),
            other => Err(unexpected("regions", other)),
        }
    }

    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error> {
        match self.call(&Request::SetLimits {
            caller: self.caller.0,
            domid: domid.0,
            quota,
        })? {
            Response::Done => Ok(()),
            other => Err(unexpected("set_limits", other)),
        }
    }

    fn take_revocations(&mut self) -> Vec<(ContextId, Bfn)> {
        self.take_notices()
            .into_iter()
            .map(|n| (ContextId(n.context), Bfn(n.bfn)))
            .collect()
    }

    fn wait_revocations(&mut self, timeout: Duration) -> Result<bool, Error> {
        self.wait_notices(timeout)
    }
}
