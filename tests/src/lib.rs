//! Shared fixtures for the end-to-end tests in `tests/tests/`.

use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request, Sbdf,
};
use std::cell::RefCell;

use pviommu_hv::config::Config;
use pviommu_hv::engine::Slot;
use pviommu_hv::iommu::{BackendCaps, DeviceFacts, FlushGather, HwContext, IommuBackend};
use pviommu_hv::pgtable::TableMemory;
use pviommu_hv::platform::{
    CheckedTarget, DomainInfo, PageLookup, PageRun, PageSlot, Platform, RacePoint, ReservedRange,
    XsmAction,
};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::{Engine, Errno, Mfn};

/// The foreign guest used by most tests.
pub const GUEST: DomId = DomId(1);
/// An unprivileged domain that is nobody's device model.
pub const STRANGER: DomId = DomId(2);
/// The device model of [`GUEST`].
pub const DEVICE_MODEL: DomId = DomId(3);

/// A knob of a longer campaign than CI's: environment variable `name` as a
/// number, `default` when unset or not a number (CI sets none).
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The cases of a property test: `PROPTEST_CASES` if set (proptest's own
/// variable, which a config naming its cases would ignore), else `ci`.
pub fn cases(ci: u32) -> u32 {
    knob("PROPTEST_CASES", u64::from(ci))
        .try_into()
        .unwrap_or(ci)
}

/// A thread's seed of a randomized test, moved by `PVIOMMU_SEED` (0, CI's
/// seeds, when unset), so that a campaign can run other interleavings.
pub fn seed(base: u64) -> u64 {
    base ^ knob("PVIOMMU_SEED", 0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A machine with dom0 (64 pages), a guest of `guest_pages` whose page g
/// starts with the bytes "gfn g", a stranger and a device model.
pub fn machine(format: Format, guest_pages: u64) -> (SimMachine, Engine) {
    machine_after_dom0(format, guest_pages, 64)
}

/// [`machine`] with `dom0_pages` for dom0, whose frames come first: the
/// guest's frame of gfn g is `dom0_pages + g`, so with a multiple of 512
/// its gfns and frames are aligned alike, as a guest's 2 MiB extents are.
pub fn machine_after_dom0(
    format: Format,
    guest_pages: u64,
    dom0_pages: u64,
) -> (SimMachine, Engine) {
    let mut m = SimMachine::new(4096 + guest_pages, format, dom0_pages);
    m.create_domain(
        GUEST,
        DomainSpec {
            pages: guest_pages,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    m.create_domain(
        STRANGER,
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: None,
        },
    )
    .unwrap();
    m.create_domain(
        DEVICE_MODEL,
        DomainSpec {
            pages: 32,
            privileged: false,
            device_model_of: Some(GUEST),
        },
    )
    .unwrap();
    for g in 0..guest_pages {
        m.write_guest(GUEST, Gfn(g), 0, &pattern(g)).unwrap();
    }
    let e = Engine::new(Config::default(), &m).unwrap();
    (m, e)
}

/// The known bytes at the start of guest page `g`.
pub fn pattern(g: u64) -> Vec<u8> {
    let mut v = format!("gfn {g:#x} ").into_bytes();
    v.resize(64, g as u8);
    v
}

/// A map op into the default context.
pub fn map_op(domid: DomId, gfn: u64, perms: Permissions) -> PvIommuOp {
    map_op_in(ContextId::DEFAULT, domid, gfn, perms)
}

/// A map op into `context`.
pub fn map_op_in(context: ContextId, domid: DomId, gfn: u64, perms: Permissions) -> PvIommuOp {
    Request::Map(map_request_in(context, domid, gfn, perms)).encode()
}

/// The request of [`map_op_in`], for the engine's own calls (which leave
/// the flush to `finish`).
pub fn map_request_in(
    context: ContextId,
    domid: DomId,
    gfn: u64,
    perms: Permissions,
) -> MapRequest {
    MapRequest {
        context,
        domid,
        gfn: Gfn(gfn),
        perms,
        attr: MemAttr::WriteBack,
        grant: false,
    }
}

/// An unmap op of the default context.
pub fn unmap_op(bfn: Bfn) -> PvIommuOp {
    unmap_op_in(ContextId::DEFAULT, bfn)
}

/// An unmap op of `context`.
pub fn unmap_op_in(context: ContextId, bfn: Bfn) -> PvIommuOp {
    Request::Unmap { context, bfn }.encode()
}

/// Map one page as `caller`; the op's status (or the hypercall's error) as
/// a Result.
pub fn map_one(
    m: &mut SimMachine,
    e: &Engine,
    caller: DomId,
    domid: DomId,
    gfn: u64,
    perms: Permissions,
) -> Result<Bfn, i32> {
    let mut ops = [map_op(domid, gfn, perms)];
    // A caller refused as a whole (EPERM before any op) gets the
    // hypercall's error; otherwise the op's status.
    if let Err(e) = m.guest_batch_all(e, caller, &mut ops) {
        return Err(e.negated());
    }
    if ops[0].status == 0 {
        Ok(Bfn(ops[0].bfn))
    } else {
        Err(ops[0].status)
    }
}

/// Everything observable about the engine and machine, to compare before and
/// after a refused call.
pub fn observable(m: &SimMachine, e: &Engine) -> String {
    let mut s = String::new();
    let st = e.state();
    for dd in st.drivers() {
        if dd.used() == 0 && dd.contexts().count() == 1 {
            continue; // an empty driver domain is indistinguishable from none
        }
        let slots: Vec<_> = dd
            .slots()
            .filter(|(_, s)| !matches!(s, Slot::Free { .. }))
            .collect();
        s += &format!(
            "{:?} {:?} {:?}\n",
            dd.domid(),
            dd.contexts().collect::<Vec<_>>(),
            slots
        );
    }
    drop(st);
    s += &format!(
        "refs={} xen_frames={} free={} pt={}\n",
        m.total_page_refs(),
        m.xen_frames(),
        m.free_frames(),
        m.table_digest()
    );
    s
}

/// `ensure!(cond, fmt...)`: return `Err` with the message unless `cond`.
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            return Err(format!("{} failed", stringify!($cond)));
        }
    };
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}: {}", stringify!($cond), format!($($msg)+)));
        }
    };
}

/// `ensure_eq!(a, b, fmt...)`: return `Err` unless `a == b`.
macro_rules! ensure_eq {
    ($a:expr, $b:expr $(,)?) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{} == {}: {:?} != {:?}", stringify!($a), stringify!($b), a, b));
        }
    }};
    ($a:expr, $b:expr, $($msg:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{:?} != {:?}: {}", a, b, format!($($msg)+)));
        }
    }};
}

/// The engine's books against the machine: every live mapping is what the
/// IOMMU translates its BFN to and what its gfn still points at, writable
/// only while the gfn is; revoked and free BFNs translate to nothing; no
/// table was freed or rewritten before its flush; every BFN is in the
/// window, above RAM and outside reserved ranges, and none was mapped over
/// a present entry; the free lists hold
/// together; and every page reference is held by a mapping.
pub fn check_invariants(m: &mut SimMachine, e: &Engine) -> Result<(), String> {
    let st = e.state();
    let reserved = e.window().reserved.clone();
    let mut held_refs = 0u64;
    // (Owner, context, BFN) of each page unmapped and still held (waiting
    // for a flush, or stuck): its frame and access.
    let mut held_unmapped = std::collections::HashMap::new();
    // No IOMMU map past the width the driver built the tables for.
    ensure_eq!(m.maps_past_width, 0);
    // No IOMMU run outside the window (which Xen's glue refuses).
    ensure_eq!(m.runs_outside_window, 0);
    // No map over a present entry of a default context (which Xen's
    // drivers overwrite).
    ensure_eq!(m.maps_over_present, 0);
    // No IOMMU run longer than the glue takes.
    ensure_eq!(m.runs_too_long, 0);
    // No hook called a service that takes a p2m lock (Xen runs hooks with
    // the target's p2m lock held: its mm-lock order).
    ensure_eq!(m.services_under_p2m_lock, 0);
    // No table the IOMMU may still walk from its caches was freed, reused
    // or changed before its flush.
    ensure_eq!(m.tables_freed_before_flush(), 0);
    // No table went back to the host with frame numbers in memory the CPU
    // had cleared (not written back on a non-coherent IOMMU).
    ensure_eq!(m.tables_freed_stale(), 0);
    ensure_eq!(m.unlinked_tables_rewritten(), 0);
    // No table was linked while memory still held a present entry of it
    // the CPU had cleared (a recycled frame not written back).
    ensure_eq!(m.tables_linked_over_stale_entries(), 0);
    // No wake-up for a reserved domid, which the glue has no bit for (the
    // owner it meant would never hear of its notices).
    ensure_eq!(m.revocation_wakeups_for_reserved_ids, 0);
    // A lookup finds every live mapping, and every extent record counts
    // the pages it holds.
    ensure_eq!(st.index_faults(), (0, 0));
    for dd in st.drivers() {
        let owner = dd.domid();
        // The context of this cell's slots (each context's BFNs are its
        // cell's): a free BFN is mapped nowhere there (a superpage left
        // behind, say, over pages unmapped one by one).
        let context = dd.context();
        // The page index never lost a live mapping.
        ensure_eq!(dd.index_misses(), 0);
        // The doubly linked free list holds every free slot, once.
        ensure!(dd.free_list_is_whole(), "free list broken");
        // Every Unmapping slot whose entry is still present is counted,
        // once: marked since the last clearing pass, or refused by the
        // IOMMU (a write revocation's "gave up?" reads the latter).
        let present = dd
            .slots()
            .filter(|(_, s)| {
                matches!(
                    s,
                    Slot::Unmapping {
                        entry_present: true,
                        ..
                    }
                )
            })
            .count() as u64;
        let (deferred, refused) = dd.entries_to_clear();
        ensure!(
            present == deferred + refused,
            "{present} entries to clear, counted {deferred} deferred + {refused} refused"
        );
        ensure_eq!(dd.free_list_breaks(), 0);
        for (idx, slot) in dd.slots() {
            let bfn = st.space().bfn_of(idx).unwrap();
            ensure!(bfn.0 >= e.window().start && bfn.0 < e.window().end);
            ensure!(bfn.0 >= m.ram_end_frame(), "BFN above RAM");
            ensure!(!reserved
                .iter()
                .any(|r| bfn.0 >= r.start && bfn.0 < r.start + r.nr));
            match slot {
                Slot::Live(map) => {
                    // The page-table walk agrees with the mapping table.
                    let t = m.translate(owner, map.context, bfn);
                    ensure_eq!(t.map(|(mfn, p, _)| (mfn, p)), Some((map.mfn, map.perms)));
                    // And the gfn still points at the mapped frame.
                    ensure_eq!(
                        m.mfn_of(map.domid, map.gfn),
                        Some(map.mfn),
                        "stale live mapping"
                    );
                    // Writable only while the gfn is.
                    ensure!(
                        !map.perms.write || !m.is_read_only(map.domid, map.gfn),
                        "writable mapping of a read-only gfn"
                    );
                    held_refs += 1 + map.perms.write as u64;
                }
                Slot::Revoked { notice, .. } => {
                    // Reserved, and unmapped: the device reaches nothing.
                    ensure_eq!(m.translate(owner, notice.context, bfn), None);
                }
                Slot::Unmapping { mapping, .. } | Slot::Stuck { mapping, .. } => {
                    held_refs += 1 + mapping.perms.write as u64;
                    held_unmapped
                        .insert((owner, mapping.context, bfn), (mapping.mfn, mapping.perms));
                }
                Slot::Free { .. } => {
                    ensure_eq!(
                        m.translate(owner, context, bfn),
                        None,
                        "free BFN in {context:?}"
                    );
                }
            }
        }
    }
    // Every page reference is accounted for by a mapping that holds one.
    ensure_eq!(m.total_page_refs(), held_refs);
    // A page the IOTLB still translates other than the tables (no flush
    // yet, or one that invalidated less than it should: a flag lost, a
    // range too short) is one the engine still holds, with at least the
    // access the device has to it.
    for t in m.stale_iotlb_pages() {
        let held = held_unmapped.get(&(t.owner, t.context, t.bfn));
        ensure!(
            held.is_some_and(|&(mfn, p)| t.held_as(mfn, p)),
            "the IOTLB reaches {t:?}, which the engine no longer holds"
        );
    }
    Ok(())
}

/// `REVOKED_ACK` (unnumbered) of `bfn` in context 0 as `caller`: the op's
/// status.
pub fn ack_revoked(m: &mut SimMachine, e: &Engine, caller: DomId, bfn: Bfn) -> i32 {
    let mut ack = [Request::RevokedAck {
        context: ContextId::DEFAULT,
        bfn,
        notice: None,
    }
    .encode()];
    m.guest_batch_all(e, caller, &mut ack).unwrap();
    ack[0].status
}

/// `REVOKED_NEXT` as `caller`: the oldest notice (BFN, domid, gfn), or the
/// op's status.
pub fn revoked_next(
    m: &mut SimMachine,
    e: &Engine,
    caller: DomId,
) -> Result<(Bfn, DomId, Gfn), i32> {
    revoked_next_op(m, e, caller, false).map(|op| (Bfn(op.bfn), DomId(op.domid), Gfn(op.gfn)))
}

/// [`revoked_next`] with `NUMBERED` (ABI 1.5): the oldest notice's BFN and
/// its number, or the op's status.
pub fn revoked_next_numbered(
    m: &mut SimMachine,
    e: &Engine,
    caller: DomId,
) -> Result<(Bfn, u64), i32> {
    revoked_next_op(m, e, caller, true).map(|op| (Bfn(op.bfn), op.notice))
}

fn revoked_next_op(
    m: &mut SimMachine,
    e: &Engine,
    caller: DomId,
    numbered: bool,
) -> Result<PvIommuOp, i32> {
    let mut ops = [Request::RevokedNext { numbered }.encode()];
    m.guest_batch_all(e, caller, &mut ops).unwrap();
    match ops[0].status {
        0 => Ok(ops[0]),
        status => Err(status),
    }
}

/// Which hypervisor service an [`Interposer`] races.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Service {
    /// Right after the first page lookup (of a page alone, or of a run's
    /// page looked up one by one).
    GetPage,
    /// Right before the first page lookup (of a page alone, or of a run's
    /// pages together): after the map's last check of its target's
    /// sequence number, before the host looks the domain up by its id.
    BeforeGetPage,
    /// Right after the first run of pages looked up together
    /// (`get_pages`, the simulator's own: the run's pages are held).
    GetPages,
    /// Right after the first domain lookup.
    DomainInfo,
    /// Right after the first XSM check of this action (for `Map`, the
    /// last of a map's checks, before its page lookup).
    XsmCheck(XsmAction),
    /// Right before the domain lookup that follows the first n (another
    /// CPU acts between what the caller did after its n-th lookup and its
    /// next one).
    BeforeDomainInfo(u32),
    /// During the first copy that covers this guest address; every copy
    /// covering it fails with `EFAULT` (the caller's op array became
    /// inaccessible meanwhile).
    CopyToGuestAt(u64),
    /// The same, from the (n+1)-th copy that covers this guest address on
    /// (the first n are written: the page went away in between).
    CopyToGuestAtAfter(u64, u32),
    /// Right before the first copy that covers this guest address, which
    /// then succeeds: another CPU acts between an op's report and what
    /// follows it.
    CopyToGuestRacing(u64),
    /// The same, and every later copy that covers the address fails with
    /// `EFAULT`: a status that changed after it was written cannot be
    /// written again.
    CopyToGuestRacingThenFault(u64),
    /// Right before the first IOTLB flush of one of the engine's contexts
    /// (a device's DMA there still meets the IOMMU's caches as they were).
    HwFlush,
    /// Right before the page release (`put_page`) after the first n: what
    /// another CPU sees while a flush's releases are under way.
    PutPage(u32),
    /// Right before the first entry written into a table: another CPU acts
    /// while the caller holds its cell's lock, past its checks (run it on
    /// a thread of its own: this one holds an engine lock).
    TableWrite,
    /// At one of the engine's own [`RacePoint`]s (no host call there).
    At(RacePoint),
    /// Right before the (n+1)-th copy from the guest that covers guest
    /// address `.0` (`.1` = n): the guest rewrites its op array between
    /// two copies in of the same op.
    CopyFromGuestAt(u64, u32),
}

/// Write a batch of `ops` into `caller`'s scratch memory, as a guest
/// would before the hypercall: returns (header address, ops address), for
/// a test that then runs `cmd::BATCH` through its own host (an
/// [`Interposer`]).
pub fn stage_batch(m: &mut SimMachine, caller: DomId, ops: &[PvIommuOp]) -> (u64, u64) {
    use pviommu_hv::platform::Platform;
    use zerocopy::IntoBytes;
    let base = m.scratch_addr(caller).unwrap();
    let ops_addr = base + 8192;
    let hdr = pviommu_abi::PvIommuBatch {
        version: pviommu_abi::INTERFACE_VERSION,
        nr_ops: ops.len() as u32,
        nr_done: 0,
        flags: 0,
        ops: ops_addr,
    };
    m.current = caller;
    m.copy_to_guest(base, hdr.as_bytes()).unwrap();
    m.copy_to_guest(ops_addr, ops.as_bytes()).unwrap();
    (base, ops_addr)
}

/// What another CPU does to the host, once.
pub type Race<'a> = Box<dyn FnOnce(&mut SimMachine) + 'a>;

/// The simulated host, with what another CPU does run once, right after
/// the first call of one service: the window between an unlocked lookup
/// and the engine taking its lock, or between acting on an op and
/// reporting it.
pub struct Interposer<'a> {
    m: RefCell<&'a mut SimMachine>,
    at: Service,
    race: RefCell<Option<Race<'a>>>,
    /// Copies that covered a `CopyToGuestAt*` or `CopyFromGuestAt`
    /// address so far.
    covering: u32,
    /// Page releases so far.
    puts: u32,
    /// Domain lookups so far.
    lookups: std::cell::Cell<u32>,
}

impl<'a> Interposer<'a> {
    /// A host on which `race` runs once, at `at`.
    pub fn new(
        m: &'a mut SimMachine,
        at: Service,
        race: Box<dyn FnOnce(&mut SimMachine) + 'a>,
    ) -> Self {
        Interposer {
            m: RefCell::new(m),
            at,
            race: RefCell::new(Some(race)),
            covering: 0,
            puts: 0,
            lookups: std::cell::Cell::new(0),
        }
    }
    /// Run the race if `service` is where it belongs and it has not run;
    /// whether it ran now.
    fn after(&self, service: Service) -> bool {
        if service != self.at {
            return false;
        }
        let Some(race) = self.race.borrow_mut().take() else {
            return false;
        };
        race(&mut self.m.borrow_mut());
        true
    }
}

impl Platform for Interposer<'_> {
    fn copy_from_guest(&mut self, a: u64, b: &mut [u8]) -> Result<(), Errno> {
        if let Service::CopyFromGuestAt(at, n) = self.at {
            if (a..a.saturating_add(b.len() as u64)).contains(&at) {
                if self.covering == n {
                    let _ = self.after(self.at);
                }
                self.covering += 1;
            }
        }
        self.m.borrow_mut().copy_from_guest(a, b)
    }
    fn copy_to_guest(&mut self, a: u64, b: &[u8]) -> Result<(), Errno> {
        if let Service::CopyToGuestRacing(at) | Service::CopyToGuestRacingThenFault(at) = self.at {
            if (a..a.saturating_add(b.len() as u64)).contains(&at) {
                let first = self.after(self.at);
                if !first && matches!(self.at, Service::CopyToGuestRacingThenFault(_)) {
                    return Err(Errno::Fault);
                }
            }
        }
        let (bad, writable) = match self.at {
            Service::CopyToGuestAt(bad) => (Some(bad), 0),
            Service::CopyToGuestAtAfter(bad, n) => (Some(bad), n),
            _ => (None, 0),
        };
        if let Some(bad) = bad {
            // Once unwritable, the address stays so: every later copy that
            // covers it fails.
            if (a..a.saturating_add(b.len() as u64)).contains(&bad) {
                self.covering += 1;
                if self.covering > writable {
                    let _ = self.after(self.at);
                    // As Xen copies (and the simulator): the pages before
                    // the unwritable one are written, then the copy faults.
                    let before = (bad & !0xfff).saturating_sub(a) as usize;
                    if let Some(head) = b.get(..before).filter(|h| !h.is_empty()) {
                        self.m.borrow_mut().copy_to_guest(a, head)?;
                    }
                    return Err(Errno::Fault);
                }
            }
        }
        self.m.borrow_mut().copy_to_guest(a, b)
    }
    fn domain_info(&self, d: DomId) -> Option<DomainInfo> {
        if self.at == Service::BeforeDomainInfo(self.lookups.get()) {
            let _ = self.after(self.at);
        }
        self.lookups.set(self.lookups.get() + 1);
        let info = self.m.borrow().domain_info(d);
        let _ = self.after(Service::DomainInfo);
        info
    }
    fn xsm_check(&self, c: DomId, t: Option<DomId>, a: XsmAction) -> Result<(), Errno> {
        let r = self.m.borrow().xsm_check(c, t, a);
        let _ = self.after(Service::XsmCheck(a));
        r
    }
    fn get_page(
        &mut self,
        d: DomId,
        g: Gfn,
        w: bool,
        t: CheckedTarget<'_>,
    ) -> Result<PageLookup, Errno> {
        let _ = self.after(Service::BeforeGetPage);
        let r = self.m.borrow_mut().get_page(d, g, w, t);
        let _ = self.after(Service::GetPage);
        r
    }
    fn get_pages(
        &mut self,
        d: DomId,
        w: bool,
        pages: &mut [PageSlot],
        t: CheckedTarget<'_>,
    ) -> PageRun {
        // Pages looked up one by one (each raced as `GetPage`), unless the
        // run is the one raced: then the simulator's run, and the race
        // after it, with the run's pages held.
        if !matches!(self.at, Service::GetPages | Service::BeforeGetPage) {
            return pviommu_hv::platform::get_pages_one_by_one(self, d, w, pages, t);
        }
        let _ = self.after(Service::BeforeGetPage);
        let run = self.m.borrow_mut().get_pages(d, w, pages, t);
        let _ = self.after(Service::GetPages);
        run
    }
    fn put_page(&mut self, mfn: Mfn, w: bool) {
        if self.at == Service::PutPage(self.puts) {
            let _ = self.after(self.at);
        }
        self.puts += 1;
        self.m.borrow_mut().put_page(mfn, w)
    }
    fn ram_end(&self) -> Mfn {
        self.m.borrow().ram_end()
    }
    fn reserved_range(&self, i: usize) -> Option<ReservedRange> {
        self.m.borrow().reserved_range(i)
    }
    fn should_preempt(&mut self) -> bool {
        false
    }
    fn random_seed(&self) -> u64 {
        self.m.borrow().random_seed()
    }
    fn race_point(&mut self, at: RacePoint) {
        let _ = self.after(Service::At(at));
    }
    fn notify_revoked(&mut self, owner: DomId) {
        self.m.borrow_mut().notify_revoked(owner)
    }
    fn note_non_coherent_write(&mut self, mfn: Mfn) {
        self.m.borrow_mut().note_non_coherent_write(mfn)
    }
}

impl IommuBackend for Interposer<'_> {
    fn iommu_caps(&self) -> BackendCaps {
        self.m.borrow().iommu_caps()
    }
    fn iommu_map(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        mfn: Mfn,
        p: Permissions,
        a: MemAttr,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.borrow_mut().iommu_map(o, c, b, mfn, p, a, g)
    }
    fn iommu_unmap(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.borrow_mut().iommu_unmap(o, c, b, g)
    }
    fn iommu_map_run(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        f: Mfn,
        n: u64,
        p: Permissions,
        a: MemAttr,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.borrow_mut().iommu_map_run(o, c, b, f, n, p, a, g)
    }
    fn iommu_unmap_run(
        &mut self,
        o: DomId,
        c: ContextId,
        b: Bfn,
        n: u64,
        g: &mut FlushGather,
    ) -> Result<(), Errno> {
        self.m.borrow_mut().iommu_unmap_run(o, c, b, n, g)
    }
    fn iommu_flush(&mut self, o: DomId, g: &FlushGather) -> Result<(), Errno> {
        self.m.borrow_mut().iommu_flush(o, g)
    }
    fn hw_context_create(&mut self, o: DomId, c: ContextId, root: Mfn) -> Result<HwContext, Errno> {
        self.m.borrow_mut().hw_context_create(o, c, root)
    }
    fn hw_context_destroy(&mut self, hw: HwContext) -> Result<(), Errno> {
        self.m.borrow_mut().hw_context_destroy(hw)
    }
    fn owns_devices(&self, d: DomId) -> bool {
        self.m.borrow().owns_devices(d)
    }
    fn hw_flush(&mut self, hw: HwContext, first: Bfn, last: Bfn) -> Result<(), Errno> {
        let _ = self.after(Service::HwFlush);
        self.m.borrow_mut().hw_flush(hw, first, last)
    }
    fn devices_lock(&mut self) {
        self.m.borrow_mut().devices_lock()
    }
    fn devices_unlock(&mut self) {
        self.m.borrow_mut().devices_unlock()
    }
    fn device_facts(&self, d: Sbdf) -> Option<DeviceFacts> {
        self.m.borrow().device_facts(d)
    }
    fn device_attach(&mut self, d: Sbdf, hw: HwContext, root: Mfn) -> Result<(), Errno> {
        self.m.borrow_mut().device_attach(d, hw, root)
    }
    fn device_detach(&mut self, d: Sbdf, hw: HwContext) -> Result<(), Errno> {
        self.m.borrow_mut().device_detach(d, hw)
    }
}

impl TableMemory for Interposer<'_> {
    fn alloc_table(&mut self) -> Result<Mfn, Errno> {
        self.m.borrow_mut().alloc_table()
    }
    fn free_table(&mut self, t: Mfn) {
        self.m.borrow_mut().free_table(t)
    }
    // (Each forwarded: the simulator's own checks of reuse and write-back
    // order stay in a raced call.)
    fn reuse_table(&mut self, t: Mfn) {
        self.m.borrow_mut().reuse_table(t)
    }
    fn table_is_clear(&self, t: Mfn) -> bool {
        self.m.borrow().table_is_clear(t)
    }
    fn write_back_table(&mut self, t: Mfn) {
        self.m.borrow_mut().write_back_table(t)
    }
    fn read_entry(&self, t: Mfn, i: usize) -> u64 {
        self.m.borrow().read_entry(t, i)
    }
    fn write_entry(&mut self, t: Mfn, i: usize, raw: u64) {
        let _ = self.after(Service::TableWrite);
        self.m.borrow_mut().write_entry(t, i, raw)
    }
    fn present_count(&self, t: Mfn) -> u16 {
        self.m.borrow().present_count(t)
    }
    fn set_present_count(&mut self, t: Mfn, c: u16) {
        self.m.borrow_mut().set_present_count(t, c)
    }
}

/// A tiny deterministic generator (xorshift), one per thread of a
/// concurrency test.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run `f` on another thread; `None` if it has not finished in 10 s (it is
/// waiting for a lock it should not need).
pub fn within_10s<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
}

/// Run `first` on the host and, at the first entry it writes into a table
/// (its cell's lock held, past its checks: [`Service::TableWrite`]),
/// `second` to its end on a thread of its own (another vCPU at that
/// moment). `first`'s result, and `second`'s if it ran.
pub fn racing_at_first_table_write<'a, T, U: Send + 'a>(
    m: &'a mut SimMachine,
    first: impl FnOnce(&mut Interposer<'_>) -> T,
    second: impl FnOnce(&mut SimMachine) -> U + Send + 'a,
) -> (T, Option<U>) {
    let out = RefCell::new(None);
    let t = {
        let out = &out;
        let race: Race<'_> = Box::new(move |m: &mut SimMachine| {
            let u = std::thread::scope(|s| s.spawn(move || second(m)).join().unwrap());
            *out.borrow_mut() = Some(u);
        });
        let mut h = Interposer::new(m, Service::TableWrite, race);
        first(&mut h)
    };
    (t, out.into_inner())
}
