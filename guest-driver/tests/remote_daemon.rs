//! The simulator daemon and its remote transport: handshake, hypercalls and
//! admin requests over a real Unix socket, concurrent clients, and hostile
//! frames that must be refused without disturbing the shared machine.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pviommu_abi::{
    subop, Bfn, ContextId, DomId, Errno, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request,
    INTERFACE_VERSION,
};
use pviommu_guest::daemon::{self, SharedMachine};
use pviommu_guest::transport::remote::wire::{self, Response};
use pviommu_guest::transport::remote::Remote;
use pviommu_guest::transport::Transport;
use pviommu_guest::Error;
use pviommu_hv::config::Config;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;

const GUEST: DomId = DomId(1);
const GUEST_PAGES: u64 = 256;

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "pviommu-rd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon: its socket and the machine it serves.
struct Daemon {
    _dir: TempDir,
    sock: PathBuf,
    machine: SharedMachine,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// dom0 (64 pages) and a guest whose page g starts with "gfn g".
fn machine() -> SharedMachine {
    let mut m = SimMachine::new(4096 + GUEST_PAGES, Format::Vtd, 64);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: GUEST_PAGES,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    for g in 0..GUEST_PAGES {
        m.write_guest(GUEST, Gfn(g), 0, format!("gfn {g}").as_bytes())
            .unwrap();
    }
    let e = Engine::new(Config::default(), &m).unwrap();
    Arc::new(Mutex::new((m, e)))
}

fn start() -> Daemon {
    let dir = TempDir::new();
    let sock = dir.0.join("sim.sock");
    let machine = machine();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let m2 = Arc::clone(&machine);
    let s2 = sock.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = daemon::bind(&s2).unwrap();
            ready_tx.send(()).unwrap();
            daemon::serve_until(listener, m2, async {
                let _ = stop_rx.await;
            })
            .await;
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("daemon started");
    Daemon {
        _dir: dir,
        sock,
        machine,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

fn map_op(gfn: u64, perms: Permissions) -> PvIommuOp {
    Request::Map(MapRequest {
        context: ContextId::DEFAULT,
        domid: GUEST,
        gfn: Gfn(gfn),
        perms,
        attr: MemAttr::WriteBack,
        grant: false,
    })
    .encode()
}

fn unmap_op(bfn: u64) -> PvIommuOp {
    Request::Unmap {
        context: ContextId::DEFAULT,
        bfn: Bfn(bfn),
    }
    .encode()
}

/// Run a batch to completion through any transport.
fn batch_all(t: &mut dyn Transport, ops: &mut [PvIommuOp]) {
    let mut done = 0;
    loop {
        let (ret, d) = t.batch(ops, done).unwrap();
        done = d;
        if ret == 0 {
            return;
        }
    }
}

/// Observable state of the shared machine.
fn snapshot(d: &Daemon) -> (u64, usize, usize, usize, usize) {
    let g = d.machine.lock().unwrap();
    let (m, e) = &*g;
    let mappings: usize = e.state().drivers().map(|dd| dd.live() as usize).sum();
    (
        m.total_page_refs(),
        m.free_frames(),
        m.xen_frames(),
        m.faults_total as usize,
        mappings,
    )
}

/// Send raw bytes, then collect every response frame until the daemon closes.
fn raw_exchange(sock: &Path, bytes: &[u8], half_close: bool) -> Vec<Response> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return out;
        }
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).expect("whole response frame");
        out.push(wire::decode(&body).expect("daemon sends decodable frames"));
    }
}

fn hello(version: u32) -> Vec<u8> {
    wire::encode_frame(&wire::Request::Hello {
        magic: wire::MAGIC,
        version,
    })
    .unwrap()
}

fn is_error(r: &Response) -> bool {
    matches!(r, Response::Error { errno: None, .. })
}

#[test]
fn handshake_and_caps() {
    let d = start();
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    assert_eq!(r.name(), "remote");
    let info = r.server_info();
    assert_eq!(info.version, wire::PROTOCOL_VERSION);
    assert_eq!(info.max_frame, wire::MAX_FRAME);
    assert_eq!(info.max_batch_ops, Config::default().max_batch_ops);
    let caps = r.query_caps().unwrap();
    assert_eq!(caps.version, INTERFACE_VERSION);
    assert_eq!(caps.max_batch_ops, info.max_batch_ops);
    assert_eq!(caps.used, 0);
    let (regions, total) = r.reserved_regions(0, 16).unwrap();
    assert_eq!(regions.len() as u32, total.min(16));
    assert_eq!(total, caps.nr_reserved_regions);
    // An unknown caller is the hypervisor's ESRCH, not a transport error.
    r.set_caller(DomId(77)).unwrap();
    assert_eq!(r.query_caps().unwrap_err().errno(), Some(Errno::Srch));
    // The connection is still good.
    r.set_caller(DomId::DOM0).unwrap();
    r.query_caps().unwrap();
}

#[test]
fn map_dma_unmap() {
    let d = start();
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    r.write_guest(GUEST, Gfn(7), 100, b"written remotely")
        .unwrap();
    let mut ops = [map_op(7, Permissions::RW)];
    batch_all(&mut r, &mut ops);
    assert_eq!(ops[0].status, 0);
    let bfn = ops[0].bfn;
    let data = r
        .dma_read(DomId::DOM0, ContextId::DEFAULT, bfn * 4096, 116)
        .unwrap();
    assert_eq!(&data[..5], b"gfn 7");
    assert_eq!(&data[100..], b"written remotely");
    assert_eq!(r.stats().unwrap().total_page_refs, 2);

    let mut ops = [unmap_op(bfn)];
    batch_all(&mut r, &mut ops);
    assert_eq!(ops[0].status, 0);
    assert_eq!(r.stats().unwrap().total_page_refs, 0);
    // After the unmap the device faults.
    match r.dma_read(DomId::DOM0, ContextId::DEFAULT, bfn * 4096, 16) {
        Err(Error::Remote(msg)) => assert!(msg.contains("DMA fault"), "{msg}"),
        other => panic!("expected a DMA fault, got {other:?}"),
    }
    assert_eq!(r.stats().unwrap().faults, 1);

    // Over-long DMA and oversized batches are refused.
    assert!(matches!(
        r.dma_read(DomId::DOM0, ContextId::DEFAULT, 0, wire::MAX_DMA_LEN + 1),
        Err(Error::InvalidArgument(_))
    ));
    let mut big = vec![map_op(1, Permissions::RO); r.server_info().max_batch_ops as usize + 1];
    assert_eq!(
        r.batch(&mut big, 0).unwrap_err().errno(),
        Some(Errno::TooBig)
    );
    assert_eq!(snapshot(&d).0, 0);
}

#[test]
fn admin_domains() {
    let d = start();
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    r.create_domain(DomId(5), 32, false, None).unwrap();
    assert_eq!(
        r.create_domain(DomId(5), 32, false, None)
            .unwrap_err()
            .errno(),
        Some(Errno::Inval)
    );
    r.write_guest(DomId(5), Gfn(3), 0, b"five").unwrap();
    assert_eq!(
        r.write_guest(DomId(5), Gfn(3), 4090, b"too long")
            .unwrap_err()
            .errno(),
        Some(Errno::Fault)
    );
    let mut ops = [map_op(3, Permissions::RO)];
    ops[0].domid = 5;
    batch_all(&mut r, &mut ops);
    assert_eq!(ops[0].status, 0);
    let data = r
        .dma_read(DomId::DOM0, ContextId::DEFAULT, ops[0].bfn * 4096, 4)
        .unwrap();
    assert_eq!(data, b"five");
    assert_eq!(r.stats().unwrap().total_page_refs, 1);
    // Destroying the domain revokes the mapping and frees its pages.
    r.destroy_domain(DomId(5)).unwrap();
    let s = r.stats().unwrap();
    assert_eq!(s.total_page_refs, 0);
    assert_eq!(s.zombie_frames, 0);
    assert!(r
        .dma_read(DomId::DOM0, ContextId::DEFAULT, ops[0].bfn * 4096, 4)
        .is_err());
    assert_eq!(
        r.destroy_domain(DomId(5)).unwrap_err().errno(),
        Some(Errno::Srch)
    );
}

#[test]
fn concurrent_clients_stay_consistent() {
    let d = start();
    const CLIENTS: u64 = 6;
    const PER: u64 = 20;
    const ROUNDS: usize = 5;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let mut r = Remote::connect(&sock, DomId::DOM0).unwrap();
                let gfns: Vec<u64> = (c * PER..(c + 1) * PER).collect();
                let mut seen = Vec::new();
                for _ in 0..ROUNDS {
                    let mut ops: Vec<PvIommuOp> =
                        gfns.iter().map(|g| map_op(*g, Permissions::RO)).collect();
                    batch_all(&mut r, &mut ops);
                    for (op, g) in ops.iter().zip(&gfns) {
                        assert_eq!(op.status, 0, "map gfn {g}");
                        let data = r
                            .dma_read(DomId::DOM0, ContextId::DEFAULT, op.bfn * 4096, 16)
                            .unwrap();
                        let want = format!("gfn {g}");
                        assert_eq!(&data[..want.len()], want.as_bytes());
                        seen.push(op.bfn);
                    }
                    let mut unmaps: Vec<PvIommuOp> =
                        ops.iter().map(|op| unmap_op(op.bfn)).collect();
                    batch_all(&mut r, &mut unmaps);
                    assert!(unmaps.iter().all(|op| op.status == 0));
                }
                seen
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let (refs, _, _, faults, mappings) = snapshot(&d);
    assert_eq!(refs, 0, "every page reference released");
    assert_eq!(mappings, 0);
    assert_eq!(faults, 0);
    let g = d.machine.lock().unwrap();
    assert_eq!(g.0.zombie_frames(), 0);
    drop(g);
    // A further client sees the same quiescent machine.
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    assert_eq!(r.query_caps().unwrap().used, 0);
}

#[test]
fn concurrent_mappings_are_distinct_while_live() {
    let d = start();
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let mut r = Remote::connect(&sock, DomId::DOM0).unwrap();
                let mut ops: Vec<PvIommuOp> = (c * 30..c * 30 + 30)
                    .map(|g| map_op(g, Permissions::RW))
                    .collect();
                batch_all(&mut r, &mut ops);
                assert!(ops.iter().all(|op| op.status == 0));
                ops.iter().map(|op| op.bfn).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(snapshot(&d).0, 120 * 2);
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "no BFN handed out twice");
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    let mut unmaps: Vec<PvIommuOp> = all.iter().map(|b| unmap_op(*b)).collect();
    batch_all(&mut r, &mut unmaps);
    assert!(unmaps.iter().all(|op| op.status == 0));
    assert_eq!(snapshot(&d).0, 0);
}

#[test]
fn hostile_frames_are_refused_and_daemon_survives() {
    let d = start();
    // Some state to keep: one live mapping.
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    let mut ops = [map_op(9, Permissions::RO)];
    batch_all(&mut r, &mut ops);
    assert_eq!(ops[0].status, 0);
    let before = snapshot(&d);

    let check_alive = |d: &Daemon| {
        let mut c = Remote::connect(&d.sock, DomId::DOM0).unwrap();
        assert_eq!(c.query_caps().unwrap().used, 1);
        assert_eq!(snapshot(d), before, "machine state unchanged");
    };

    // Wrong protocol version (older than the oldest served, or newer).
    let resp = raw_exchange(&d.sock, &hello(0), false);
    assert!(resp.len() == 1 && is_error(&resp[0]), "{resp:?}");
    let resp = raw_exchange(&d.sock, &hello(wire::PROTOCOL_VERSION + 1), false);
    assert_eq!(resp.len(), 1);
    assert!(
        matches!(&resp[0], Response::Error { errno: None, message } if message.contains("version")),
        "{resp:?}"
    );
    check_alive(&d);

    // Wrong magic.
    let frame = wire::encode_frame(&wire::Request::Hello {
        magic: *b"XXXX",
        version: wire::PROTOCOL_VERSION,
    })
    .unwrap();
    let resp = raw_exchange(&d.sock, &frame, false);
    assert!(resp.len() == 1 && is_error(&resp[0]), "{resp:?}");
    check_alive(&d);

    // A request before the handshake.
    let frame = wire::encode_frame(&wire::Request::QueryCaps { caller: 0 }).unwrap();
    let resp = raw_exchange(&d.sock, &frame, false);
    assert!(resp.len() == 1 && is_error(&resp[0]), "{resp:?}");
    check_alive(&d);

    // Oversized length prefix, before and after the handshake: refused
    // without the body being read (none is sent).
    for prefix in [Vec::new(), hello(1)] {
        let mut bytes = prefix.clone();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let resp = raw_exchange(&d.sock, &bytes, false);
        let errors: Vec<_> = resp.iter().filter(|r| is_error(r)).collect();
        assert_eq!(errors.len(), 1, "{resp:?}");
        assert!(
            matches!(errors[0], Response::Error { message, .. } if message.contains("exceeds")),
            "{resp:?}"
        );
        check_alive(&d);
    }
    let mut bytes = hello(1);
    bytes.extend_from_slice(&(wire::MAX_FRAME + 1).to_le_bytes());
    let resp = raw_exchange(&d.sock, &bytes, false);
    assert!(matches!(resp.last(), Some(r) if is_error(r)), "{resp:?}");
    check_alive(&d);

    // Garbage bincode bodies, before and after the handshake.
    for prefix in [Vec::new(), hello(1)] {
        let mut bytes = prefix;
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff; 8]);
        let resp = raw_exchange(&d.sock, &bytes, false);
        assert!(
            matches!(resp.last(), Some(Response::Error { errno: None, message }) if message.contains("malformed")),
            "{resp:?}"
        );
        check_alive(&d);
    }
    // A valid request followed by trailing junk inside the same frame.
    let mut body = wire::encode_frame(&wire::Request::Stats).unwrap()[4..].to_vec();
    body.extend_from_slice(b"junk");
    let mut bytes = hello(1);
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&body);
    let resp = raw_exchange(&d.sock, &bytes, false);
    assert!(matches!(resp.last(), Some(r) if is_error(r)), "{resp:?}");
    check_alive(&d);
    // A batch frame declaring an absurd number of ops.
    let mut bytes = hello(1);
    let body = [2u8, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&body);
    let resp = raw_exchange(&d.sock, &bytes, false);
    assert!(matches!(resp.last(), Some(r) if is_error(r)), "{resp:?}");
    check_alive(&d);

    // Truncated frames: a cut length prefix, and a body shorter than declared.
    for tail in [vec![5u8, 0], {
        let mut v = 100u32.to_le_bytes().to_vec();
        v.extend_from_slice(&[0; 10]);
        v
    }] {
        let mut bytes = hello(1);
        bytes.extend_from_slice(&tail);
        let resp = raw_exchange(&d.sock, &bytes, true);
        assert!(matches!(&resp[0], Response::Welcome(_)), "{resp:?}");
        assert!(
            matches!(resp.last(), Some(Response::Error { message, .. }) if message.contains("truncated")),
            "{resp:?}"
        );
        check_alive(&d);
    }
    // A client vanishing mid-frame without reading anything.
    {
        let mut s = UnixStream::connect(&d.sock).unwrap();
        s.write_all(&hello(1)).unwrap();
        s.write_all(&[0x40, 0, 0, 0, 1, 2]).unwrap();
    }
    check_alive(&d);

    // The original client is unaffected.
    assert_eq!(r.query_caps().unwrap().used, 1);
    let mut ops = [unmap_op(ops[0].bfn)];
    batch_all(&mut r, &mut ops);
    assert_eq!(ops[0].status, 0);
    assert_eq!(snapshot(&d).0, 0);
}

#[test]
fn client_reports_refused_handshake() {
    // A client's view of a daemon that refuses: fake one with a raw listener
    // speaking a different version.
    let dir = TempDir::new();
    let path = dir.0.join("fake.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        let resp = Response::Error {
            errno: None,
            message: "protocol version 1 not supported".into(),
        };
        s.write_all(&wire::encode_frame(&resp).unwrap()).unwrap();
    });
    match Remote::connect(&path, DomId::DOM0) {
        Err(Error::Remote(m)) => assert!(m.contains("not supported"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake should fail"),
    }
    t.join().unwrap();
    // Connecting to nothing is an OS error.
    assert!(matches!(
        Remote::connect(dir.0.join("absent.sock"), DomId::DOM0),
        Err(Error::Os { .. })
    ));
}

#[test]
fn socket_is_private_and_bind_is_careful() {
    let d = start();
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // A live daemon's socket is not stolen.
    let err = daemon::bind(&d.sock).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    Remote::connect(&d.sock, DomId::DOM0).unwrap();

    let dir = TempDir::new();
    // A stale socket (its listener gone) is replaced.
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let l = daemon::bind(&stale).unwrap();
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(l);
    // Any other file is left alone.
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert_eq!(
        daemon::bind(&file).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn subop_codes_survive_the_wire() {
    // Every field of an op round-trips through the daemon untouched except
    // the outputs: a lookup returns what the map put in.
    let d = start();
    let mut r = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    let mut ops = [map_op(42, Permissions::RO)];
    batch_all(&mut r, &mut ops);
    let bfn = ops[0].bfn;
    let mut look = [PvIommuOp {
        subop: subop::LOOKUP,
        bfn,
        ..Default::default()
    }];
    batch_all(&mut r, &mut look);
    assert_eq!(look[0].status, 0);
    assert_eq!(look[0].domid, GUEST.0);
    assert_eq!(look[0].gfn, 42);
    let mut ops = [unmap_op(bfn)];
    batch_all(&mut r, &mut ops);
    assert_eq!(snapshot(&d).0, 0);
}

/// A client of the daemon (subscribed to dom0's revocations) over the
/// library's Client, and an admin connection that balloons.
fn client_and_admin(d: &Daemon) -> (pviommu_guest::Client<Remote>, Remote) {
    let c = pviommu_guest::Client::open(Remote::connect(&d.sock, DomId::DOM0).unwrap()).unwrap();
    let admin = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    (c, admin)
}

#[test]
fn revocations_are_pushed_and_invalidate_the_cache_at_once() {
    let d = start();
    let (mut c, mut admin) = client_and_admin(&d);
    let gfns: Vec<Gfn> = (1..=8).map(Gfn).collect();
    let bfns: Vec<Bfn> = c
        .map_foreign(
            GUEST,
            &gfns,
            Permissions::RW,
            MemAttr::WriteBack,
            ContextId::DEFAULT,
        )
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Nothing pending: the wait times out.
    assert!(!c.wait_revocations(Duration::from_millis(50)).unwrap());

    admin.balloon_out(GUEST, Gfn(3)).unwrap();
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    assert_eq!(c.pushed_revocations(), 1);
    // The cache forgot the BFN before anything was drained: mapping the
    // page again asks the hypervisor (which says the page is gone) instead
    // of answering the revoked BFN from the cache.
    assert_eq!(c.cache().key_of(ContextId::DEFAULT, bfns[2]), None);
    let again = c.map_foreign(
        GUEST,
        &[Gfn(3)],
        Permissions::RW,
        MemAttr::WriteBack,
        ContextId::DEFAULT,
    );
    assert_eq!(again[0].as_ref().unwrap_err().errno(), Some(Errno::Nxio));
    // The other pages are still cached.
    assert!(c.cache().key_of(ContextId::DEFAULT, bfns[0]).is_some());

    // Still to be acknowledged through the ABI.
    let revs = c.drain_revocations().unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!((revs[0].bfn, revs[0].gfn), (bfns[2], Gfn(3)));
    assert_eq!(c.refresh_caps().unwrap().used, 7);
    // Acknowledged notices are not pushed again.
    assert!(!c.wait_revocations(Duration::from_millis(100)).unwrap());

    // A domain's death: every remaining BFN revoked, pushed in one go.
    admin.destroy_domain(GUEST).unwrap();
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    assert!(c.cache().is_empty());
    assert_eq!(c.pushed_revocations(), 8);
    assert_eq!(c.drain_revocations().unwrap().len(), 7);
    assert_eq!(c.refresh_caps().unwrap().used, 0);
}

#[test]
fn notices_pending_before_connecting_are_pushed_at_subscription() {
    let d = start();
    let (mut c, mut admin) = client_and_admin(&d);
    let b = c.map_foreign(
        GUEST,
        &[Gfn(5)],
        Permissions::RO,
        MemAttr::WriteBack,
        ContextId::DEFAULT,
    )[0]
    .as_ref()
    .copied()
    .unwrap();
    admin.balloon_out(GUEST, Gfn(5)).unwrap();
    // A mediator that connects later hears of it without any request.
    let mut late = Remote::connect(&d.sock, DomId::DOM0).unwrap();
    assert!(late.wait_notices(Duration::from_secs(10)).unwrap());
    let n = late.take_notices();
    assert_eq!(n.len(), 1);
    assert_eq!(
        (n[0].bfn, n[0].gfn, n[0].domid, n[0].context),
        (b.0, 5, GUEST.0, 0)
    );
    // Another driver domain's subscription hears nothing of dom0's.
    let mut other = Remote::connect(&d.sock, DomId(77)).unwrap();
    assert!(!other.wait_notices(Duration::from_millis(100)).unwrap());
    // A push arriving while a request is in flight is kept, not mistaken
    // for the answer.
    let b6 = c.map_foreign(
        GUEST,
        &[Gfn(6)],
        Permissions::RO,
        MemAttr::WriteBack,
        ContextId::DEFAULT,
    )[0]
    .as_ref()
    .copied()
    .unwrap();
    admin.balloon_out(GUEST, Gfn(6)).unwrap();
    let mut ops = [map_op(6, Permissions::RO)];
    let (ret, _) = late.batch(&mut ops, 0).unwrap();
    assert_eq!(ret, 0);
    assert_eq!(ops[0].status, Errno::Nxio.negated());
    let n = late.take_notices();
    assert_eq!(n.len(), 1);
    assert_eq!((n[0].bfn, n[0].gfn), (b6.0, 6));
}

#[test]
fn protocol_1_clients_are_still_served_without_pushes() {
    let d = start();
    let mut bytes = hello(1);
    bytes.extend(wire::encode_frame(&wire::Request::Subscribe { caller: 0 }).unwrap());
    bytes.extend(wire::encode_frame(&wire::Request::QueryCaps { caller: 0 }).unwrap());
    let resp = raw_exchange(&d.sock, &bytes, true);
    assert!(
        matches!(&resp[0], Response::Welcome(i) if i.version == 1),
        "{resp:?}"
    );
    assert!(
        matches!(&resp[1], Response::Error { message, .. } if message.contains("protocol 2")),
        "{resp:?}"
    );
    assert!(matches!(&resp[2], Response::Caps(_)), "{resp:?}");
    assert_eq!(resp.len(), 3);
}

/// A fake daemon: answers the handshake and the subscription, then sends
/// `push` frames (raw bodies) unasked.
fn fake_daemon(pushes: Vec<Vec<u8>>) -> (TempDir, PathBuf, std::thread::JoinHandle<()>) {
    let dir = TempDir::new();
    let path = dir.0.join("fake.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let read = |s: &mut UnixStream| {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
        };
        read(&mut s);
        let info = wire::ServerInfo {
            version: wire::PROTOCOL_VERSION,
            max_frame: wire::MAX_FRAME,
            max_batch_ops: 16,
            max_dma_len: 16,
        };
        s.write_all(&wire::encode_frame(&Response::Welcome(info)).unwrap())
            .unwrap();
        read(&mut s);
        s.write_all(&wire::encode_frame(&Response::Done).unwrap())
            .unwrap();
        for body in pushes {
            let _ = s.write_all(&(body.len() as u32).to_le_bytes());
            let _ = s.write_all(&body);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    (dir, path, t)
}

#[test]
fn hostile_pushes_are_refused_by_the_client() {
    let notice = wire::Notice {
        context: 0,
        bfn: 1,
        domid: 1,
        gfn: 1,
    };
    let too_many = Response::Revoked(vec![notice; wire::MAX_NOTICES_PER_FRAME + 1]);
    let body = |r: &Response| wire::encode_frame(r).unwrap()[4..].to_vec();
    for (pushes, needle) in [
        (vec![body(&too_many)], "exceeds the limit"),
        (vec![vec![0xff; 12]], "malformed"),
        (vec![body(&Response::Done)], "unasked"),
    ] {
        let (_dir, path, t) = fake_daemon(pushes);
        let mut r = Remote::connect(&path, DomId::DOM0).unwrap();
        let e = r.wait_notices(Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains(needle), "{needle}: {e}");
        // The connection is marked unusable, not left out of step.
        assert!(r.query_caps().is_err());
        t.join().unwrap();
    }
}

#[test]
fn changes_made_on_the_machine_directly_are_pushed_too() {
    // An embedding program (or a test) changes the shared machine without
    // a request: the daemon's board notices within its polling period and
    // an idle subscriber hears of it.
    let d = start();
    let (mut c, mut admin) = client_and_admin(&d);
    let b = c.map_foreign(
        GUEST,
        &[Gfn(9)],
        Permissions::RW,
        MemAttr::WriteBack,
        ContextId::DEFAULT,
    )[0]
    .as_ref()
    .copied()
    .unwrap();
    {
        let mut g = d.machine.lock().unwrap();
        let (m, e) = &mut *g;
        m.balloon_out(e, GUEST, Gfn(9)).unwrap();
    }
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    assert_eq!(c.cache().key_of(ContextId::DEFAULT, b), None);
    // A refused admin request is an error with the errno, and pushes nothing.
    let e = admin.balloon_out(DomId(77), Gfn(1)).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::Inval), "{e}");
    let e = admin.balloon_out(GUEST, Gfn(9)).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::Inval), "{e}");
    assert_eq!(c.drain_revocations().unwrap().len(), 1);
    assert!(!c.wait_revocations(Duration::from_millis(200)).unwrap());
}

#[test]
fn a_bfn_revoked_again_after_its_acknowledgement_is_pushed_again() {
    // Two notices pending; one is acknowledged, its BFN mapped again and
    // revoked again: the new notice equals the old one field for field and
    // must still reach the client (the other one stays pending throughout).
    let d = start();
    let (mut c, _admin) = client_and_admin(&d);
    let map = |c: &mut pviommu_guest::Client<Remote>, g: u64| {
        c.map_foreign(
            GUEST,
            &[Gfn(g)],
            Permissions::RW,
            MemAttr::WriteBack,
            ContextId::DEFAULT,
        )[0]
        .as_ref()
        .copied()
        .unwrap()
    };
    let replace = |g: u64| {
        let mut guard = d.machine.lock().unwrap();
        let (m, e) = &mut *guard;
        m.replace_page(e, GUEST, Gfn(g)).unwrap();
    };
    let x = map(&mut c, 20);
    map(&mut c, 21);
    replace(20);
    replace(21);
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    let first = c.drain_revocations_up_to(1).unwrap();
    assert_eq!(first[0].bfn, x);
    let x2 = map(&mut c, 20);
    assert_eq!(x2, x, "the allocator hands the acknowledged BFN out again");
    assert!(c.cache().key_of(ContextId::DEFAULT, x2).is_some());
    replace(20);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.cache().key_of(ContextId::DEFAULT, x2).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "second revocation of {x2:?} never pushed"
        );
        c.wait_revocations(Duration::from_millis(100)).unwrap();
    }
    assert_eq!(c.drain_revocations().unwrap().len(), 2);
}

/// A pushed revocation of a BFN two holders use: the first holder's
/// release stays in the cache (an unmap of a revoked BFN acknowledges its
/// notice, and the second holder still uses it); the last one goes to the
/// hypervisor. Before, the push forgot the BFN, the first release was
/// sent, acknowledged the notice, and the drain never told the caller
/// while the second holder still used the BFN (found by a review of the
/// shadow's 2 MiB pages, whose extent maps had the same flaw).
#[test]
fn a_pushed_revocation_is_acknowledged_only_by_its_last_holder() {
    let d = start();
    let (mut c, mut admin) = client_and_admin(&d);
    let map = |c: &mut pviommu_guest::Client<Remote>, gfn: u64| {
        c.map_foreign(
            GUEST,
            &[Gfn(gfn)],
            Permissions::RW,
            MemAttr::WriteBack,
            ContextId::DEFAULT,
        )
        .pop()
        .unwrap()
        .unwrap()
    };
    let b = map(&mut c, 3);
    assert_eq!(map(&mut c, 3), b, "two holders, one BFN");
    admin.balloon_out(GUEST, Gfn(3)).unwrap();
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    assert_eq!(c.cache().refs(ContextId::DEFAULT, b), 2);
    let ops = c.stats().ops;
    assert!(c.unmap(&[b], ContextId::DEFAULT)[0].is_ok());
    assert_eq!(c.stats().ops, ops, "the first holder's release stays here");
    assert_eq!(
        c.refresh_caps().unwrap().revoked,
        1,
        "the notice is still there"
    );
    // The drain hands it over (the second holder drops the BFN there).
    let revs = c.drain_revocations().unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].bfn, b);
    assert_eq!(c.cache().refs(ContextId::DEFAULT, b), 0);
    assert_eq!(c.refresh_caps().unwrap().revoked, 0);

    // Without a drain: the last holder's release acknowledges it.
    let b = map(&mut c, 5);
    admin.balloon_out(GUEST, Gfn(5)).unwrap();
    assert!(c.wait_revocations(Duration::from_secs(10)).unwrap());
    assert!(c.unmap(&[b], ContextId::DEFAULT)[0].is_ok());
    assert_eq!(
        c.refresh_caps().unwrap().revoked,
        0,
        "acknowledged by the last release"
    );
    assert_eq!(c.refresh_caps().unwrap().used, 0);
}
