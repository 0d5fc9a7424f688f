//! The simulator daemon behind `pviommu sim serve`: one simulated machine
//! and engine, shared by every client of a Unix socket, so several processes
//! (a mediator, a test, the CLI) act on the same host.
//!
//! The protocol is described in [`crate::transport::remote::wire`]; the
//! client is [`crate::transport::remote::Remote`]. The daemon is defensive:
//! a frame longer than [`wire::MAX_FRAME`] is refused without being read, a
//! truncated frame, an undecodable body or a bad handshake get an error
//! response (when the peer still listens) and that connection is closed.
//! Nothing a client sends can panic the daemon or touch the machine unless
//! it decodes into a valid request. Only the socket's owner may connect: the
//! socket is mode 0600 and each peer's uid is checked.
//!
//! Revocation push (protocol 2): a [`NoticeBoard`] holds every revocation
//! notice pending in the engine, each with a sequence number. It is brought
//! up to date under the machine lock before and after every request (and on
//! a short timer, for changes made to the machine directly); a connection
//! that subscribed for a driver domain sends that domain's notices it has
//! not sent yet before the answer to each request, and whenever the board
//! changes while it is idle. So a client hears of a revocation before any
//! answer that could only follow it (the `revoked_next` that reports it, a
//! map that reuses its BFN after the acknowledgement), and its cache never
//! hands out a BFN the hypervisor took back. Each notice is checked to be
//! still pending right before it is sent. The board holds at most the
//! notices pending when a driver domain's slots were last read, so it is
//! bounded by the engine's quotas.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pviommu_abi::{ContextId, DomId, Gfn};
use pviommu_hv::engine::Slot;
use pviommu_hv::sim::{DomainSpec, SimMachine};
use pviommu_hv::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::transport::remote::wire::{self, Notice, Request, Response, ServerInfo, Stats};

/// How long a new connection may take to send its [`Request::Hello`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The machine and engine every client acts on.
pub type SharedMachine = Arc<Mutex<(SimMachine, Engine)>>;

/// Bind the daemon's socket at `path`, mode 0600.
///
/// A stale socket left by a dead daemon is removed first; a live one (a
/// daemon still accepts on it) gives [`io::ErrorKind::AddrInUse`], and any
/// other kind of file at `path` is left alone and refused with
/// [`io::ErrorKind::AlreadyExists`]. Must be called within a Tokio runtime.
pub fn bind(path: impl AsRef<Path>) -> io::Result<UnixListener> {
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: a daemon is already listening", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // Between bind and chmod the socket has the umask's mode; the peer
    // credential check in `serve` covers that window.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// How often the board looks for revocations made on the machine directly
/// (not through a request), e.g. by a test or an embedding program.
pub const BOARD_POLL: Duration = Duration::from_millis(50);

/// One driver domain's notices, by number (for sending in order from a
/// connection's last one) and by content (to tell new ones).
#[derive(Default)]
struct Posted {
    by_seq: BTreeMap<u64, Notice>,
    by_notice: HashMap<Notice, u64>,
}

/// Every revocation notice pending in the engine, numbered in the order
/// the daemon saw them.
#[derive(Default)]
struct BoardState {
    next_seq: u64,
    /// Pending notices of each driver domain, with their numbers.
    posted: HashMap<DomId, Posted>,
    /// Per driver domain, (revoked, stuck) at the last look.
    counts: HashMap<DomId, (u64, u64)>,
    /// Driver domains that acknowledged notices since their slots were
    /// last read.
    acknowledged: HashSet<DomId>,
}

/// The daemon's record of pending revocations, shared by its connections.
pub struct NoticeBoard {
    state: Mutex<BoardState>,
    /// The sequence number after the newest notice; connections wait on it.
    newest: watch::Sender<u64>,
}

impl Default for NoticeBoard {
    fn default() -> Self {
        NoticeBoard {
            state: Mutex::default(),
            newest: watch::Sender::new(0),
        }
    }
}

impl NoticeBoard {
    /// Bring the board up to date with `engine` (call with the machine
    /// locked, so the board matches the state requests see).
    ///
    /// A driver domain's slots are read (in time linear in them) only when
    /// it may have new notices: its `revoked` count rose or its `stuck`
    /// count fell (a stuck revocation became a notice). A request never
    /// both acknowledges and creates notices (acknowledgements come in
    /// batches, revocations from p2m changes), so a fall of `revoked` alone
    /// is an acknowledgement and costs nothing here: acknowledged notices
    /// stay on the board until the next read, and [`push`] drops them
    /// before sending. A driver domain with no notice left is cleared.
    ///
    /// After acknowledgements the next read numbers every pending notice
    /// afresh: a BFN acknowledged, mapped again and revoked again gives a
    /// notice equal to the old one, which must reach clients again. Those
    /// that had the others get them twice, which is harmless: a pushed
    /// notice is still pending when sent, so its BFN cannot have been
    /// handed out again.
    fn refresh(&self, engine: &Engine) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *guard;
        let st = engine.state();
        let mut seen: HashSet<DomId> = HashSet::new();
        let mut added = false;
        for d in st.drivers() {
            let driver = d.domid();
            seen.insert(driver);
            let (revoked, stuck) = (d.revoked(), d.stuck());
            let before = b.counts.insert(driver, (revoked, stuck));
            if revoked == 0 {
                b.posted.remove(&driver);
                b.acknowledged.remove(&driver);
                continue;
            }
            let may_have_new = match before {
                None => true,
                Some((r, s)) => {
                    if revoked < r {
                        b.acknowledged.insert(driver);
                    }
                    revoked > r || stuck < s
                }
            };
            if !may_have_new {
                continue;
            }
            if b.acknowledged.remove(&driver) {
                b.posted.remove(&driver);
            }
            let now: HashSet<Notice> = d
                .slots()
                .filter_map(|(i, slot)| match slot {
                    Slot::Revoked { notice, .. } => Some(Notice {
                        context: notice.context.0,
                        bfn: st.space().bfn_of(i)?.0,
                        domid: notice.domid.0,
                        gfn: notice.gfn.0,
                    }),
                    _ => None,
                })
                .collect();
            let posted = b.posted.entry(driver).or_default();
            // Acknowledged ones go; new ones get the next numbers.
            posted.by_notice.retain(|n, _| now.contains(n));
            posted.by_seq.retain(|_, n| now.contains(n));
            for n in now {
                if let std::collections::hash_map::Entry::Vacant(v) = posted.by_notice.entry(n) {
                    v.insert(b.next_seq);
                    posted.by_seq.insert(b.next_seq, n);
                    b.next_seq += 1;
                    added = true;
                }
            }
        }
        // A driver domain that is gone has no notices any more.
        b.posted.retain(|d, _| seen.contains(d));
        b.counts.retain(|d, _| seen.contains(d));
        b.acknowledged.retain(|d| seen.contains(d));
        if added {
            self.newest.send_replace(b.next_seq);
        }
    }

    /// `driver`'s notices numbered `from` or later, oldest first, and the
    /// number after the last one.
    fn since(&self, driver: DomId, from: u64) -> (Vec<Notice>, u64) {
        let b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let list = b
            .posted
            .get(&driver)
            .map(|p| p.by_seq.range(from..).map(|(_, n)| *n).collect())
            .unwrap_or_default();
        (list, b.next_seq)
    }
}

/// Serve clients on `listener` forever, each connection in its own task.
pub async fn serve(listener: UnixListener, machine: SharedMachine) {
    serve_until(listener, machine, std::future::pending()).await
}

/// Serve clients on `listener` until `shutdown` completes; connections
/// already accepted are left to finish on their own tasks.
pub async fn serve_until(
    listener: UnixListener,
    machine: SharedMachine,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let board = Arc::new(NoticeBoard::default());
    let mut poll = tokio::time::interval(BOARD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = poll.tick() => {
                if let Ok(g) = lock(&machine) {
                    board.refresh(&g.1);
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let machine = Arc::clone(&machine);
                    let board = Arc::clone(&board);
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, machine, board).await {
                            tracing::debug!("pviommu daemon: connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off a little.
                    tracing::warn!("pviommu daemon: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The effective uid of this process.
fn own_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why reading a frame stopped.
enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// The peer closed the connection inside a frame.
    Truncated,
    /// The declared length exceeds [`wire::MAX_FRAME`].
    TooLong(u32),
    /// The socket failed.
    Io(io::Error),
}

async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; wire::LEN_PREFIX];
    let mut got = 0;
    while got < len.len() {
        match stream.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_le_bytes(len);
    if len > wire::MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let mut body = vec![0u8; len as usize];
    match stream.read_exact(&mut body).await {
        Ok(_) => Ok(body),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

async fn write_response(stream: &mut (impl AsyncWrite + Unpin), resp: &Response) -> io::Result<()> {
    let frame = match wire::encode_frame(resp) {
        Ok(f) => f,
        // Only an oversized answer can fail to encode; say so instead.
        Err(e) => wire::encode_frame(&protocol_error(format!("response not encodable: {e}")))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
    };
    stream.write_all(&frame).await?;
    stream.flush().await
}

fn protocol_error(message: impl Into<String>) -> Response {
    Response::Error {
        errno: None,
        message: message.into(),
    }
}

fn errno_error(what: &str, e: pviommu_abi::Errno) -> Response {
    Response::Error {
        errno: Some(e.code()),
        message: format!("{what}: {e}"),
    }
}

/// Read and decode one request. On failure the error response to send
/// (if any) before closing is returned.
async fn read_request(stream: &mut (impl AsyncRead + Unpin)) -> Result<Request, Option<Response>> {
    match read_frame(stream).await {
        Ok(body) => wire::decode::<Request>(&body)
            .map_err(|e| Some(protocol_error(format!("malformed request frame: {e}")))),
        Err(FrameError::Closed) => Err(None),
        Err(FrameError::Truncated) => Err(Some(protocol_error("truncated frame"))),
        Err(FrameError::TooLong(len)) => Err(Some(protocol_error(format!(
            "frame of {len} bytes exceeds the limit of {} bytes",
            wire::MAX_FRAME
        )))),
        Err(FrameError::Io(e)) => Err(Some(protocol_error(format!("read failed: {e}")))),
    }
}

/// One client connection: credential check, handshake, request loop.
async fn connection(
    mut stream: UnixStream,
    machine: SharedMachine,
    board: Arc<NoticeBoard>,
) -> io::Result<()> {
    let uid = own_uid();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == uid => {}
        Ok(cred) => {
            let msg = format!(
                "uid {} may not use this daemon (owner uid {uid})",
                cred.uid()
            );
            let _ = write_response(&mut stream, &protocol_error(msg)).await;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "peer uid refused",
            ));
        }
        Err(e) => {
            let _ =
                write_response(&mut stream, &protocol_error("peer credentials unavailable")).await;
            return Err(e);
        }
    }

    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request(&mut stream)).await {
        Ok(r) => r,
        Err(_) => Err(Some(protocol_error("no handshake within the timeout"))),
    };
    let supported = wire::MIN_PROTOCOL_VERSION..=wire::PROTOCOL_VERSION;
    let version = match first {
        Ok(Request::Hello { magic, version })
            if magic == wire::MAGIC && supported.contains(&version) =>
        {
            let max_batch_ops = lock(&machine)
                .map(|g| g.1.config().max_batch_ops)
                .unwrap_or(0);
            // The client's version is the connection's: an older client
            // gets the older protocol (no pushes).
            let info = ServerInfo {
                version,
                max_frame: wire::MAX_FRAME,
                max_batch_ops,
                max_dma_len: wire::MAX_DMA_LEN,
            };
            write_response(&mut stream, &Response::Welcome(info)).await?;
            version
        }
        Ok(Request::Hello { magic, .. }) if magic != wire::MAGIC => {
            return close_with(
                &mut stream,
                protocol_error(format!("bad magic {magic:02x?}")),
            )
            .await;
        }
        Ok(Request::Hello { version, .. }) => {
            let msg = format!(
                "protocol version {version} not supported; this daemon speaks {} to {}",
                wire::MIN_PROTOCOL_VERSION,
                wire::PROTOCOL_VERSION
            );
            return close_with(&mut stream, protocol_error(msg)).await;
        }
        Ok(_) => {
            return close_with(
                &mut stream,
                protocol_error("the first request must be Hello"),
            )
            .await
        }
        Err(Some(resp)) => return close_with(&mut stream, resp).await,
        Err(None) => return Ok(()),
    };

    // Requests are read on their own task so that waiting for one can be
    // given up for a push without losing half a frame.
    let (mut reader, mut writer) = stream.into_split();
    let (requests_tx, mut requests) = mpsc::channel(1);
    let reading = tokio::spawn(async move {
        loop {
            let r = read_request(&mut reader).await;
            let last = r.is_err();
            if requests_tx.send(r).await.is_err() || last {
                return;
            }
        }
    });
    let mut newest = board.newest.subscribe();
    let mut subscription: Option<Subscription> = None;
    let result = loop {
        tokio::select! {
            r = requests.recv() => {
                let req = match r {
                    Some(Ok(Request::Hello { .. })) => {
                        break close_with(&mut writer, protocol_error("Hello after the handshake")).await;
                    }
                    Some(Ok(req)) => req,
                    Some(Err(Some(resp))) => break close_with(&mut writer, resp).await,
                    Some(Err(None)) | None => break Ok(()),
                };
                if let Err(e) = request(req, version, &machine, &board, &mut subscription, &mut writer).await {
                    break Err(e);
                }
            }
            changed = newest.changed(), if subscription.is_some() => {
                if changed.is_err() {
                    break Ok(());
                }
                if let Err(e) = push(&board, &machine, &mut subscription, &mut writer).await {
                    break Err(e);
                }
            }
        }
    };
    reading.abort();
    result
}

/// Which driver domain a connection hears of, and from which notice on.
struct Subscription {
    driver: DomId,
    next: u64,
}

/// Send the subscribed domain's notices not sent yet and still pending.
///
/// Each is checked against the engine just before it is sent: a notice
/// acknowledged meanwhile (by another client of the same driver domain)
/// must not reach this client, whose cache may by now hold its BFN for a
/// new mapping. A notice still pending at the check cannot be
/// acknowledged, its BFN reused and that reuse answered to this client
/// before the push, which this task writes first.
async fn push(
    board: &NoticeBoard,
    machine: &SharedMachine,
    subscription: &mut Option<Subscription>,
    writer: &mut (impl AsyncWrite + Unpin),
) -> io::Result<()> {
    let Some(sub) = subscription.as_mut() else {
        return Ok(());
    };
    let (notices, next) = board.since(sub.driver, sub.next);
    sub.next = next;
    if notices.is_empty() {
        return Ok(());
    }
    let pending: Vec<Notice> = match lock(machine) {
        Ok(g) => notices
            .into_iter()
            .filter(|n| {
                g.1.unmap_check(sub.driver, ContextId(n.context), pviommu_abi::Bfn(n.bfn))
                    == Ok(true)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for chunk in pending.chunks(wire::MAX_NOTICES_PER_FRAME) {
        write_response(writer, &Response::Revoked(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Answer one request, pushing first what the client must hear before it.
async fn request(
    req: Request,
    version: u32,
    machine: &SharedMachine,
    board: &NoticeBoard,
    subscription: &mut Option<Subscription>,
    writer: &mut (impl AsyncWrite + Unpin),
) -> io::Result<()> {
    if let Request::Subscribe { caller } = req {
        if version < 2 {
            return write_response(writer, &protocol_error("Subscribe needs protocol 2")).await;
        }
        *subscription = Some(Subscription {
            driver: DomId(caller),
            next: 0,
        });
        if let Ok(g) = lock(machine) {
            board.refresh(&g.1);
        }
        write_response(writer, &Response::Done).await?;
        // What is pending already.
        return push(board, machine, subscription, writer).await;
    }
    if version < 2 && matches!(req, Request::BalloonOut { .. }) {
        return write_response(writer, &protocol_error("BalloonOut needs protocol 2")).await;
    }
    let resp = match lock(machine) {
        Ok(mut guard) => {
            let (m, e) = &mut *guard;
            // Up to date before the request runs, so the client hears of
            // every earlier revocation before this answer...
            board.refresh(e);
            let resp = execute(m, e, req);
            // ...and of those this request made right after it.
            board.refresh(e);
            resp
        }
        Err(resp) => resp,
    };
    // Every notice pending now, this request's own included, goes before
    // the answer.
    push(board, machine, subscription, writer).await?;
    write_response(writer, &resp).await
}

async fn close_with(stream: &mut (impl AsyncWrite + Unpin), resp: Response) -> io::Result<()> {
    // The peer may have gone already; the error is what matters.
    let _ = write_response(stream, &resp).await;
    let _ = stream.shutdown().await;
    Ok(())
}

fn lock(
    machine: &SharedMachine,
) -> Result<std::sync::MutexGuard<'_, (SimMachine, Engine)>, Response> {
    machine
        .lock()
        .map_err(|_| protocol_error("the simulated machine is unusable after an internal panic"))
}

/// Run one (non-handshake) request against the machine.
fn execute(m: &mut SimMachine, e: &mut Engine, req: Request) -> Response {
    match req {
        Request::Hello { .. } => protocol_error("Hello after the handshake"),
        Request::QueryCaps { caller } => match m.guest_query_caps(e, DomId(caller)) {
            Ok(c) => Response::Caps(c),
            Err(err) => errno_error("query_caps", err),
        },
        Request::Batch {
            caller,
            mut ops,
            nr_done,
        } => {
            let max = e.config().max_batch_ops;
            if ops.len() > max as usize {
                return errno_error(
                    &format!("batch of {} ops exceeds max_batch_ops {max}", ops.len()),
                    pviommu_abi::Errno::TooBig,
                );
            }
            match m.guest_batch(e, DomId(caller), &mut ops, nr_done) {
                Ok((ret, nr_done)) => Response::Batch { ret, nr_done, ops },
                Err(err) => errno_error("batch", err),
            }
        }
        Request::Regions { caller, start, max } => match m.guest_reserved_regions(e, DomId(caller))
        {
            Ok(all) => {
                let total = u32::try_from(all.len()).unwrap_or(u32::MAX);
                let regions = all
                    .into_iter()
                    .skip(start as usize)
                    .take(max as usize)
                    .collect();
                Response::Regions { regions, total }
            }
            Err(err) => errno_error("regions", err),
        },
        Request::CreateDomain {
            domid,
            pages,
            privileged,
            device_model_of,
        } => {
            let spec = DomainSpec {
                pages,
                privileged,
                device_model_of: device_model_of.map(DomId),
            };
            match m.create_domain(DomId(domid), spec) {
                Ok(()) => Response::Done,
                Err(err) => errno_error(&format!("create d{domid}"), err),
            }
        }
        Request::WriteGuest {
            domid,
            gfn,
            offset,
            data,
        } => match m.write_guest(DomId(domid), Gfn(gfn), offset as usize, &data) {
            Ok(()) => Response::Done,
            Err(err) => errno_error(&format!("write d{domid} gfn {gfn:#x}+{offset:#x}"), err),
        },
        Request::DmaRead {
            owner,
            context,
            addr,
            len,
        } => {
            if len > wire::MAX_DMA_LEN {
                return protocol_error(format!(
                    "DMA read of {len} bytes exceeds the limit {}",
                    wire::MAX_DMA_LEN
                ));
            }
            match m.dma_read(DomId(owner), ContextId(context), addr, len as usize) {
                Ok(data) => Response::Data(data),
                Err(f) => protocol_error(format!(
                    "DMA fault: d{} context {} bus address {:#x} ({}): {:?}",
                    f.owner.0,
                    f.context.0,
                    f.addr,
                    if f.write { "write" } else { "read" },
                    f.reason
                )),
            }
        }
        Request::DestroyDomain { domid } => {
            let d = DomId(domid);
            if !m.has_domain(d) {
                return errno_error(&format!("destroy d{domid}"), pviommu_abi::Errno::Srch);
            }
            // As Xen's domain_kill: dying first, the engine's restartable
            // teardown, then the memory goes. A teardown that stalls (the
            // IOMMU refusing) leaves the domain dying: EBUSY, as Xen answers
            // the toolstack; a later destroy goes on.
            m.kill_domain(e, d);
            if m.has_domain(d) {
                return errno_error(&format!("destroy d{domid}"), pviommu_abi::Errno::Busy);
            }
            Response::Done
        }
        Request::SetLimits {
            caller,
            domid,
            quota,
        } => match m.guest_set_limits(e, DomId(caller), DomId(domid), quota) {
            Ok(()) => Response::Done,
            Err(err) => errno_error(&format!("set_limits d{domid}"), err),
        },
        // Handled by the connection (it needs the connection's state).
        Request::Subscribe { .. } => protocol_error("Subscribe is a connection request"),
        Request::BalloonOut { domid, gfn } => match m.balloon_out(e, DomId(domid), Gfn(gfn)) {
            Ok(()) => Response::Done,
            Err(err) => errno_error(&format!("balloon out d{domid} gfn {gfn:#x}"), err),
        },
        Request::Stats => Response::Stats(Stats {
            total_page_refs: m.total_page_refs(),
            free_frames: m.free_frames() as u64,
            zombie_frames: m.zombie_frames() as u64,
            xen_frames: m.xen_frames() as u64,
            faults: m.faults_total,
            flushes: m.flushes,
        }),
    }
}
