//! The embedded simulator's state between invocations.
//!
//! On Xen, `pviommu map` and a later `pviommu lookup` talk to one
//! hypervisor that remembers the mapping. The embedded simulator lives in
//! the process, so the tool keeps a *journal*: every call that changed the
//! simulated machine (batches other than pure lookups, so context creation,
//! destruction and device attachment too, `set_limits`, the
//! simulator's own ballooning and domain destruction) is appended to a state
//! file with what it answered. The next invocation builds the same initial
//! world, replays the journal and checks that every call answers exactly as
//! recorded, so the machine, the engine and every BFN are as they were.
//!
//! Why a journal and not a snapshot or a background daemon: the simulator
//! (`pviommu-hv`) has no serialisation of its machine and engine, and this
//! tool does not change it; replaying the ABI calls goes through the same
//! engine code and so cannot drift from it, and a replay that answers
//! differently (a changed engine or world) is detected and reported instead
//! of silently producing another state. A daemon started on demand would
//! outlive the command that started it and leave a process behind in every
//! test and script; `pviommu sim serve` remains there for a shared,
//! long-lived machine.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! header:  "pviommu-sim-state\n" (18 bytes), u32 format version,
//!          u32 world fingerprint
//! records: u32 body length, u32 CRC-32 of the body, body (bincode Record)
//! ```
//!
//! The file is locked (`flock`, exclusive) from before it is read until the
//! command's records are written and synced, so concurrent invocations run
//! one after another and never interleave records. A file that does not
//! start with the magic is refused and never written; a damaged journal is
//! refused with the offset of the damage; `pviommu sim reset` empties it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bincode::Options;
use nix::fcntl::{Flock, FlockArg};
use pviommu_abi::{subop, DomId, Errno, Gfn, PvIommuCaps, PvIommuOp, PvIommuRegion};
use pviommu_guest::transport::in_process::{InProcess, SharedSim};
use pviommu_guest::transport::Transport;
use serde::{Deserialize, Serialize};

use crate::output::CliError;
use crate::world;

/// First bytes of every state file.
pub const MAGIC: &[u8; 18] = b"pviommu-sim-state\n";
/// Version of the file layout and of [`Record`].
pub const FORMAT_VERSION: u32 = 1;
/// Header bytes.
const HEADER_LEN: usize = MAGIC.len() + 8;
/// Largest record body accepted when reading (a batch of 1024 ops is about
/// 40 KiB); a larger declared length means damage.
const MAX_RECORD: u32 = 1 << 22;
/// Environment variable naming the state file (overridden by `--state`).
pub const STATE_ENV: &str = "PVIOMMU_SIM_STATE";

/// Which initial world the journal applies to: the tool's version and the
/// world's layout. A different fingerprint means the records may not replay.
fn world_fingerprint() -> u32 {
    crc32fast::hash(
        format!(
            "{} pages={} root={:#x} devices={:?}",
            env!("CARGO_PKG_VERSION"),
            world::GUEST_PAGES,
            world::PPGTT_ROOT.0,
            world::DEVICES
        )
        .as_bytes(),
    )
}

fn header() -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&world_fingerprint().to_le_bytes());
    h
}

/// One state-changing call and what it answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A `PVIOMMU_CMD_batch` call.
    Batch {
        /// Calling domain.
        caller: u16,
        /// `nr_done` passed in.
        nr_done: u32,
        /// The ops as passed in.
        ops: Vec<PvIommuOp>,
        /// Return value.
        ret: i64,
        /// `nr_done` out.
        nr_done_out: u32,
        /// The ops as written back.
        ops_out: Vec<PvIommuOp>,
    },
    /// A successful `PVIOMMU_CMD_set_limits`.
    SetLimits {
        /// Calling domain.
        caller: u16,
        /// Driver domain.
        domid: u16,
        /// Quota.
        quota: u64,
    },
    /// The simulator balloons a gfn out of a domain.
    BalloonOut {
        /// Domain.
        domid: u16,
        /// Its frame.
        gfn: u64,
    },
    /// The simulator destroys a domain.
    DestroyDomain {
        /// Domain.
        domid: u16,
    },
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(u64::from(MAX_RECORD))
}

/// The default state file: `$XDG_RUNTIME_DIR/pviommu/sim-state`, else
/// `/tmp/pviommu-<uid>/sim-state`.
pub fn default_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_dir() => Path::new(&dir).join("pviommu").join("sim-state"),
        _ => std::env::temp_dir()
            .join(format!("pviommu-{}", nix::unistd::geteuid()))
            .join("sim-state"),
    }
}

/// Create the state file's directory (mode 0700) if missing. The default
/// directory may sit in a shared /tmp, so there it must be a real directory
/// of this user that nobody else can write (else another user could plant
/// the state file, or a link in its place).
fn prepare_dir(path: &Path) -> Result<(), CliError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CliError::os(format!("create {}", dir.display()), &e))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| CliError::os(dir.display(), &e))?;
    if !meta.is_dir() {
        return Err(CliError::invalid(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    if path == default_path() {
        let link = std::fs::symlink_metadata(dir).map_err(|e| CliError::os(dir.display(), &e))?;
        let me = nix::unistd::geteuid().as_raw();
        if link.file_type().is_symlink() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(CliError::with_errno(
                Errno::Perm,
                format!(
                    "{} is not a private directory of uid {me}; use --state elsewhere",
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Open (creating if missing) and lock the state file.
fn open_locked(path: &Path, create: bool) -> Result<Flock<File>, CliError> {
    if create {
        prepare_dir(path)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::os(format!("state file {}", path.display()), &e))?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::os(path.display(), &e))?;
    if !meta.is_file() {
        return Err(CliError::invalid(format!(
            "state file {}: not a regular file",
            path.display()
        )));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(CliError::with_errno(
            Errno::Perm,
            format!(
                "state file {} belongs to uid {}, not to you",
                path.display(),
                meta.uid()
            ),
        ));
    }
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| CliError::os(format!("lock {}", path.display()), &e.into()))
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError {
        errno: "EBADMSG".into(),
        code: nix::errno::Errno::EBADMSG as i32,
        message: format!(
            "state file {}: {what}; `pviommu sim reset` starts a fresh simulator",
            path.display()
        ),
        items: Vec::new(),
    }
}

fn foreign(path: &Path) -> CliError {
    CliError {
        errno: "EBADMSG".into(),
        code: nix::errno::Errno::EBADMSG as i32,
        message: format!(
            "{} is not a pviommu simulator state file; refusing to use or overwrite it",
            path.display()
        ),
        items: Vec::new(),
    }
}

/// Split a state file's bytes into records, checking the header, every
/// length and every checksum.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Record>, CliError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(foreign(path));
    }
    let word = |at: usize| -> Option<u32> {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let version = word(MAGIC.len()).ok_or_else(|| corrupt(path, "truncated header"))?;
    if version != FORMAT_VERSION {
        return Err(corrupt(
            path,
            format!("format version {version}, this tool reads {FORMAT_VERSION}"),
        ));
    }
    let fp = word(MAGIC.len() + 4).ok_or_else(|| corrupt(path, "truncated header"))?;
    if fp != world_fingerprint() {
        return Err(corrupt(
            path,
            "written by another version of the tool (its simulated world differs)",
        ));
    }
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let (Some(len), Some(crc)) = (word(at), word(at + 4)) else {
            return Err(corrupt(path, format!("truncated record at byte {at}")));
        };
        if len > MAX_RECORD {
            return Err(corrupt(
                path,
                format!("record at byte {at} claims {len} bytes"),
            ));
        }
        let body = bytes
            .get(at + 8..at + 8 + len as usize)
            .ok_or_else(|| corrupt(path, format!("truncated record at byte {at}")))?;
        if crc32fast::hash(body) != crc {
            return Err(corrupt(path, format!("checksum mismatch at byte {at}")));
        }
        let rec: Record = codec()
            .deserialize(body)
            .map_err(|e| corrupt(path, format!("undecodable record at byte {at}: {e}")))?;
        records.push(rec);
        at += 8 + len as usize;
    }
    Ok(records)
}

fn encode(rec: &Record) -> Result<Vec<u8>, CliError> {
    let body = codec()
        .serialize(rec)
        .map_err(|e| CliError::from(format!("encode state record: {e}")))?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Whether the ops a batch call completed changed anything: a refused op
/// changes nothing (ABI), and lookups and peeks never do. An unmap answered
/// `ESTALE` acknowledged a revocation, which is a change.
fn changed_state(ops: &[PvIommuOp]) -> bool {
    ops.iter().any(|op| {
        op.subop != subop::LOOKUP
            && op.subop != subop::REVOKED_NEXT
            && (op.status == 0 || op.status == Errno::Stale.negated())
    })
}

/// Run one record against the machine; `Err` says how it diverged.
fn apply(sim: &SharedSim, rec: &Record) -> Result<(), String> {
    let mut g = sim.lock();
    let (m, e) = &mut *g;
    match rec {
        Record::Batch {
            caller,
            nr_done,
            ops,
            ret,
            nr_done_out,
            ops_out,
        } => {
            let mut now = ops.clone();
            let got = m
                .guest_batch(e, DomId(*caller), &mut now, *nr_done)
                .map_err(|err| format!("batch refused: {err}"))?;
            if got != (*ret, *nr_done_out) || now != *ops_out {
                return Err(format!(
                    "batch of {} op(s) answered {got:?}, recorded ({ret}, {nr_done_out})",
                    ops.len()
                ));
            }
        }
        Record::SetLimits {
            caller,
            domid,
            quota,
        } => m
            .guest_set_limits(e, DomId(*caller), DomId(*domid), *quota)
            .map_err(|err| format!("set_limits refused: {err}"))?,
        Record::BalloonOut { domid, gfn } => m
            .balloon_out(e, DomId(*domid), Gfn(*gfn))
            .map_err(|err| format!("balloon out refused: {err}"))?,
        Record::DestroyDomain { domid } => {
            if !m.has_domain(DomId(*domid)) {
                return Err(format!("no domain d{domid} to destroy"));
            }
            m.kill_domain(e, DomId(*domid));
            // (A stalled teardown leaves it dying, as Xen's EBUSY does.)
            if m.has_domain(DomId(*domid)) {
                return Err(format!("destroy d{domid}: EBUSY, its teardown stalled"));
            }
        }
    }
    Ok(())
}

/// The embedded simulator with its journal, locked for this invocation.
pub struct SimState {
    file: Flock<File>,
    path: PathBuf,
    sim: SharedSim,
    /// Records made by this invocation, not yet written.
    pending: Arc<Mutex<Vec<Record>>>,
}

impl SimState {
    /// Lock the state file at `path` (created if missing), build the world
    /// and replay the journal.
    pub fn open(path: &Path) -> Result<SimState, CliError> {
        let mut file = open_locked(path, true)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| CliError::os(format!("read {}", path.display()), &e))?;
        if bytes.is_empty() {
            // Created just now (or emptied by hand): a fresh journal.
            file.write_all(&header())
                .and_then(|_| file.sync_data())
                .map_err(|e| CliError::os(format!("write {}", path.display()), &e))?;
        }
        let records = if bytes.is_empty() {
            Vec::new()
        } else {
            parse(path, &bytes)?
        };
        let sim = SharedSim::new(world::build(), Default::default())?;
        tracing::debug!(records = records.len(), "replaying the simulator journal");
        for (i, rec) in records.iter().enumerate() {
            apply(&sim, rec).map_err(|why| {
                corrupt(
                    path,
                    format!("record {i} does not replay on this simulator ({why})"),
                )
            })?;
        }
        Ok(SimState {
            file,
            path: path.to_path_buf(),
            sim,
            pending: Arc::default(),
        })
    }

    /// The simulated machine and engine (to look at, e.g. its devices).
    pub fn sim(&self) -> &SharedSim {
        &self.sim
    }

    /// A transport calling as `caller` whose state changes are journaled.
    pub fn transport(&self, caller: DomId) -> Journaled {
        Journaled {
            inner: self.sim.transport(caller),
            caller,
            pending: Arc::clone(&self.pending),
        }
    }

    /// Balloon `gfn` out of `domid` (the hypervisor revokes its BFNs).
    pub fn balloon_out(&self, domid: DomId, gfn: Gfn) -> Result<(), CliError> {
        let rec = Record::BalloonOut {
            domid: domid.0,
            gfn: gfn.0,
        };
        apply(&self.sim, &rec).map_err(|why| {
            CliError::with_errno(
                Errno::Inval,
                format!("balloon d{} gfn {:#x}: {why}", domid.0, gfn.0),
            )
        })?;
        self.push(rec);
        Ok(())
    }

    /// Destroy `domid` (its pages' BFNs are revoked).
    pub fn destroy_domain(&self, domid: DomId) -> Result<(), CliError> {
        let rec = Record::DestroyDomain { domid: domid.0 };
        apply(&self.sim, &rec)
            .map_err(|why| CliError::with_errno(Errno::Srch, format!("destroy: {why}")))?;
        self.push(rec);
        Ok(())
    }

    fn push(&self, rec: Record) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
    }

    /// Append this invocation's records and sync; the lock is released when
    /// `self` is dropped.
    pub fn save(&mut self) -> Result<(), CliError> {
        let records = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if records.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for r in &records {
            out.extend(encode(r)?);
        }
        let path = &self.path;
        self.file
            .seek(SeekFrom::End(0))
            .and_then(|_| self.file.write_all(&out))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| CliError::os(format!("append to {}", path.display()), &e))
    }

    /// Empty the journal at `path` (a fresh simulator next time). A file
    /// that is not a state file is left alone.
    pub fn reset(path: &Path) -> Result<bool, CliError> {
        if !path.exists() {
            return Ok(false);
        }
        let mut file = open_locked(path, false)?;
        let mut magic = Vec::new();
        (&mut *file)
            .take(MAGIC.len() as u64)
            .read_to_end(&mut magic)
            .map_err(|e| CliError::os(format!("read {}", path.display()), &e))?;
        if !magic.is_empty() && magic != MAGIC {
            return Err(foreign(path));
        }
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(&header()))
            .and_then(|_| file.sync_data())
            .map_err(|e| CliError::os(format!("reset {}", path.display()), &e))?;
        Ok(true)
    }
}

/// The in-process transport, with every state-changing call journaled.
pub struct Journaled {
    inner: InProcess,
    caller: DomId,
    pending: Arc<Mutex<Vec<Record>>>,
}

impl Journaled {
    fn push(&self, rec: Record) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
    }
}

impl Transport for Journaled {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn query_caps(&mut self) -> Result<PvIommuCaps, pviommu_guest::Error> {
        self.inner.query_caps()
    }
    fn max_batch_ops(&self) -> u32 {
        self.inner.max_batch_ops()
    }
    fn batch(
        &mut self,
        ops: &mut [PvIommuOp],
        nr_done: u32,
    ) -> Result<(i64, u32), pviommu_guest::Error> {
        let before = ops.to_vec();
        // A refused call (an error) changes nothing, so it is not recorded.
        let (ret, nr_done_out) = self.inner.batch(ops, nr_done)?;
        let done = ops
            .get(nr_done as usize..nr_done_out as usize)
            .unwrap_or(&[]);
        if changed_state(done) {
            self.push(Record::Batch {
                caller: self.caller.0,
                nr_done,
                ops: before,
                ret,
                nr_done_out,
                ops_out: ops.to_vec(),
            });
        }
        Ok((ret, nr_done_out))
    }
    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), pviommu_guest::Error> {
        self.inner.reserved_regions(start, max)
    }
    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), pviommu_guest::Error> {
        self.inner.set_limits(domid, quota)?;
        self.push(Record::SetLimits {
            caller: self.caller.0,
            domid: domid.0,
            quota,
        });
        Ok(())
    }
    /// Counters are not part of the kept state: they count what this
    /// process's machine did, the replay included. Not journaled.
    fn stats(
        &mut self,
        domid: DomId,
        flags: u16,
    ) -> Result<pviommu_abi::PvIommuStats, pviommu_guest::Error> {
        self.inner.stats(domid, flags)
    }
    /// A read: not journaled.
    fn entry(
        &mut self,
        domid: DomId,
        context: pviommu_abi::ContextId,
        bfn: pviommu_abi::Bfn,
    ) -> Result<pviommu_abi::PvIommuEntry, pviommu_guest::Error> {
        self.inner.entry(domid, context, bfn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn journal(records: &[Record]) -> Vec<u8> {
        let mut bytes = header();
        for r in records {
            bytes.extend(encode(r).unwrap());
        }
        bytes
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::SetLimits {
                caller: 0,
                domid: 1,
                quota: 9,
            },
            Record::BalloonOut { domid: 1, gfn: 7 },
            Record::Batch {
                caller: 0,
                nr_done: 0,
                ops: vec![PvIommuOp {
                    subop: subop::MAP,
                    flags: 3,
                    domid: 1,
                    gfn: 0x100,
                    ..Default::default()
                }],
                ret: 0,
                nr_done_out: 1,
                ops_out: vec![PvIommuOp {
                    subop: subop::MAP,
                    flags: 3,
                    domid: 1,
                    gfn: 0x100,
                    bfn: 0x100000,
                    ..Default::default()
                }],
            },
            Record::DestroyDomain { domid: 2 },
        ]
    }

    #[test]
    fn records_round_trip() {
        let path = Path::new("t");
        assert_eq!(parse(path, &journal(&sample())).unwrap(), sample());
        assert_eq!(parse(path, &header()).unwrap(), Vec::new());
    }

    #[test]
    fn a_journal_replays_and_a_wrong_answer_is_caught() {
        let sim = SharedSim::new(world::build(), Default::default()).unwrap();
        let recs = sample();
        // The map, as recorded, replays (the first BFN of the window).
        apply(&sim, &recs[2]).unwrap();
        // The same map again answers the same BFN (a second reference):
        // a record claiming another BFN diverges.
        let mut wrong = recs[2].clone();
        if let Record::Batch { ops_out, .. } = &mut wrong {
            ops_out[0].bfn += 1;
        }
        let why = apply(&sim, &wrong).unwrap_err();
        assert!(why.contains("recorded"), "{why}");
        assert!(apply(&sim, &Record::DestroyDomain { domid: 77 }).is_err());
        assert!(apply(
            &sim,
            &Record::BalloonOut {
                domid: 1,
                gfn: 1 << 40
            }
        )
        .is_err());
    }

    proptest! {
        /// Whatever the bytes, parsing answers (never panics), and only a
        /// journal whose every record checks out is accepted.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512),
                                       cut in 0usize..600) {
            let path = Path::new("t");
            let _ = parse(path, &tail);
            let mut bytes = header();
            bytes.extend(&tail);
            let _ = parse(path, &bytes);
            let good = journal(&sample());
            let cut = cut.min(good.len());
            let r = parse(path, &good[..cut]);
            // A prefix is accepted only if it ends on a record boundary.
            if let Ok(recs) = r {
                prop_assert_eq!(journal(&recs), good[..cut].to_vec());
            }
        }

        /// A flipped bit anywhere after the header is caught.
        #[test]
        fn a_flipped_bit_is_caught(at in 0usize..10_000, bit in 0u8..8) {
            let path = Path::new("t");
            let mut bytes = journal(&sample());
            let at = HEADER_LEN + at % (bytes.len() - HEADER_LEN);
            bytes[at] ^= 1 << bit;
            prop_assert!(parse(path, &bytes).is_err());
        }
    }
}
