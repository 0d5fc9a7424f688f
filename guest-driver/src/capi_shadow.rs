//! The C interface of the shadow GPU page tables: a `pviommu_shadow` is a
//! [`ShadowSession`] (its own PV-IOMMU client, a reader of one guest's
//! memory, the shadow of that guest's PPGTT). Declared in the "shadow"
//! section at the end of `guest-driver/include/pviommu_guest.h`.
//!
//! Same conventions as [`capi`](crate::capi): 0 or a negative errno, NULL
//! pointers checked (-EINVAL), one thread at a time per handle, nothing
//! unwinds into C.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, CString};

use pviommu_abi::{ContextId, DomId, Gfn};

use crate::capi::{c_array, c_opt_out, c_out_ok};
use crate::shadow::{
    BuildReport, Gma, GuestTableReader, RevokedLeaf, SessionError, ShadowSession, SyncReport,
};
use crate::transport::Transport;
use crate::Client;

const EINVAL: i32 = -22;

/// The opaque handle C holds.
pub struct CShadow {
    session: ShadowSession<Box<dyn Transport>, Box<dyn GuestTableReader>>,
    domid: DomId,
    /// Revoked leaves not yet handed to C (more than its array held).
    undelivered: Vec<RevokedLeaf>,
    /// The 2 MiB shadow entries (extent ops) the last build or sync
    /// mapped and unmapped: (0, 0) after a failed one. Apart from
    /// `pviommu_shadow_counts`, whose size C callers compiled against
    /// the header before extents rely on.
    last_extents: (u64, u64),
    last_error: CString,
    #[cfg(feature = "sim")]
    sim: Option<crate::transport::in_process::SharedSim>,
}

impl CShadow {
    fn fail(&mut self, e: &SessionError) -> i32 {
        self.last_error = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
        -e.errno()
    }

    /// An argument the call refuses before doing anything: -EINVAL, with
    /// `why` as the handle's last error.
    fn refuse(&mut self, why: &str) -> i32 {
        self.last_error = CString::new(why.replace('\0', " ")).unwrap_or_default();
        EINVAL
    }
}

/// `struct pviommu_shadow_counts` in `pviommu_guest.h`.
#[repr(C)]
#[derive(Default)]
pub struct CShadowCounts {
    /// Leaves made present by the call.
    pub leaves_mapped: u64,
    /// Leaves removed by the call (their BFNs released).
    pub leaves_unmapped: u64,
    /// Leaves present after the call.
    pub leaves_present: u64,
    /// Shadow table pages in use after the call.
    pub tables: u64,
    /// Guest table pages read.
    pub pages_read: u64,
    /// Leaves the hypervisor refused (non-present).
    pub refused: u64,
    /// Problems with the guest's tables (entries left non-present).
    pub anomalies: u64,
}

/// `struct pviommu_revoked_leaf` in `pviommu_guest.h`.
#[repr(C)]
pub struct CRevokedLeaf {
    /// GMA of the 4 KiB page, now non-present.
    pub gma: u64,
    /// The guest frame it mapped.
    pub gfn: u64,
    /// The revoked BFN (acknowledged: released).
    pub bfn: u64,
    /// The guest domain.
    pub domid: u16,
    /// Zero.
    pub pad: [u16; 3],
}

fn new_handle(
    client: Client<Box<dyn Transport>>,
    reader: Box<dyn GuestTableReader>,
    domid: DomId,
) -> CShadow {
    CShadow {
        session: ShadowSession::new(client, reader),
        domid,
        undelivered: Vec::new(),
        last_extents: (0, 0),
        last_error: CString::default(),
        #[cfg(feature = "sim")]
        sim: None,
    }
}

/// A handle for C, or NULL with the reason as this thread's last error
/// (`pviommu_shadow_last_error(NULL)`).
fn opened(h: Result<CShadow, crate::Error>) -> *mut CShadow {
    match h {
        Ok(h) => Box::into_raw(Box::new(h)),
        Err(e) => {
            crate::capi::set_last_error(&format!("shadow open: {e}"));
            std::ptr::null_mut()
        }
    }
}

/// A shadow of `domid`'s PPGTT on Xen: hypercalls and guest memory through
/// `/dev/xen/privcmd`. NULL on failure (no Xen, no privilege).
#[no_mangle]
pub extern "C" fn pviommu_shadow_open_xen(domid: u16) -> *mut CShadow {
    let open = || -> Result<CShadow, crate::Error> {
        let t: Box<dyn Transport> = Box::new(crate::transport::privcmd::Privcmd::open()?);
        let reader = crate::guest_memory::ForeignMemory::open(DomId(domid))?;
        Ok(new_handle(Client::open(t)?, Box::new(reader), DomId(domid)))
    };
    opened(open())
}

/// A shadow on an embedded simulated machine with dom0 and one zeroed guest
/// (domid 1) of `guest_pages` pages, for tests: lay the guest's tables out
/// with [`pviommu_shadow_sim_write`]. NULL on failure.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_shadow_open_sim(guest_pages: u64) -> *mut CShadow {
    use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
    let open = || -> Result<CShadow, crate::Error> {
        let pages = guest_pages.clamp(1, 1 << 20);
        let mut m = SimMachine::new(pages + 4096, Format::Vtd, 64);
        m.create_domain(
            DomId(1),
            DomainSpec {
                pages,
                privileged: false,
                device_model_of: None,
            },
        )
        .map_err(|errno| crate::Error::Hypervisor {
            what: "simulator setup".into(),
            errno,
        })?;
        let sim = crate::transport::in_process::SharedSim::new(m, Default::default())?;
        let t: Box<dyn Transport> = Box::new(sim.transport(DomId::DOM0));
        let mut h = new_handle(Client::open(t)?, Box::new(sim.reader(DomId(1))), DomId(1));
        h.sim = Some(sim);
        Ok(h)
    };
    opened(open())
}

/// Tear the shadow down (its BFNs unmapped) and free the handle. NULL is
/// ignored.
#[no_mangle]
pub extern "C" fn pviommu_shadow_close(s: *mut CShadow) {
    if !s.is_null() {
        // SAFETY: `s` came from Box::into_raw in an open function, closed once.
        drop(unsafe { Box::from_raw(s) });
    }
}

/// The message of the last failure on this handle ("" if none).
#[no_mangle]
pub extern "C" fn pviommu_shadow_last_error(s: *const CShadow) -> *const c_char {
    // SAFETY: `s` is NULL or a live handle.
    match unsafe { s.as_ref() } {
        Some(s) => s.last_error.as_ptr(),
        // Why the last open on this thread failed (its slot lives until
        // the thread's next failure).
        None => crate::capi::pviommu_last_error(std::ptr::null()),
    }
}

fn counts_of_build(r: &BuildReport, s: &CShadow) -> CShadowCounts {
    CShadowCounts {
        leaves_mapped: r.leaves_mapped,
        leaves_present: s.session.shadow().map_or(0, |x| x.mapped_leaves()),
        tables: r.tables as u64,
        refused: r.refused_total,
        anomalies: r.anomalies_total,
        ..Default::default()
    }
}

fn counts_of_sync(r: &SyncReport, s: &CShadow) -> CShadowCounts {
    CShadowCounts {
        leaves_mapped: r.leaves_mapped,
        leaves_unmapped: r.leaves_unmapped,
        leaves_present: s.session.shadow().map_or(0, |x| x.mapped_leaves()),
        tables: s.session.shadow().map_or(0, |x| x.table_count() as u64),
        pages_read: r.pages_read,
        refused: r.refused_total,
        anomalies: r.anomalies_total,
    }
}

/// Build the shadow of the PPGTT whose PML4 is guest frame `root_gfn`.
/// `counts` (may be NULL) receives what happened. -EBUSY if already built;
/// the reader's errno (e.g. -ESRCH, -EINVAL, -EFAULT) if the root cannot be
/// read, with nothing mapped.
#[no_mangle]
pub extern "C" fn pviommu_shadow_build(
    s: *mut CShadow,
    root_gfn: u64,
    counts: *mut CShadowCounts,
) -> i32 {
    // SAFETY: `s` is NULL or a live handle used by one thread.
    let Some(s) = (unsafe { s.as_mut() }) else {
        return EINVAL;
    };
    // SAFETY: `counts` is NULL or points to one struct.
    let Ok(counts) = (unsafe { c_opt_out(counts) }) else {
        return s.refuse("shadow build: counts is not aligned");
    };
    s.last_extents = (0, 0);
    match s.session.build(s.domid, Gfn(root_gfn)) {
        Ok(r) => {
            s.last_extents = (r.extents_mapped, 0);
            let c = counts_of_build(&r, s);
            if let Some(out) = counts {
                *out = c;
            }
            0
        }
        Err(e) => s.fail(&e),
    }
}

/// Sync after the guest changed the table pages `changed[0..n]`; `n == 0`
/// re-reads every shadowed table page. -ENOENT if not built.
#[no_mangle]
pub extern "C" fn pviommu_shadow_sync(
    s: *mut CShadow,
    changed: *const u64,
    n: usize,
    counts: *mut CShadowCounts,
) -> i32 {
    // SAFETY: `s` is NULL or a live handle used by one thread.
    let Some(s) = (unsafe { s.as_mut() }) else {
        return EINVAL;
    };
    // SAFETY: the caller passes `n` frames.
    let changed = match unsafe { c_array(changed, n, "shadow sync: changed") } {
        Ok(changed) => changed,
        Err(why) => return s.refuse(&why),
    };
    // SAFETY: `counts` is NULL or points to one struct.
    let Ok(counts) = (unsafe { c_opt_out(counts) }) else {
        return s.refuse("shadow sync: counts is not aligned");
    };
    let r = if n == 0 {
        s.session.sync_all()
    } else {
        let gfns: Vec<Gfn> = changed.iter().map(|g| Gfn(*g)).collect();
        s.session.sync(&gfns)
    };
    s.last_extents = (0, 0);
    match r {
        Ok(r) => {
            s.last_extents = (r.extents_mapped, r.extents_unmapped);
            let c = counts_of_sync(&r, s);
            if let Some(out) = counts {
                *out = c;
            }
            0
        }
        Err(e) => s.fail(&e),
    }
}

/// The guest's 2 MiB GPU pages the handle's last build or sync shadowed
/// with one 2 MiB entry over one extent (one extent op each; ABI 1.6), and
/// those whose extent it unmapped: 0, with `*mapped` and `*unmapped` (either
/// may be NULL); both 0 after a failed call. -EINVAL for a NULL handle or
/// a pointer not aligned for a `uint64_t`.
#[no_mangle]
pub extern "C" fn pviommu_shadow_last_extents(
    s: *const CShadow,
    mapped: *mut u64,
    unmapped: *mut u64,
) -> i32 {
    // SAFETY: `s` is NULL or a live handle.
    let Some(s) = (unsafe { s.as_ref() }) else {
        return EINVAL;
    };
    // SAFETY: each is NULL or points to one `u64`.
    let (Ok(mapped), Ok(unmapped)) = (unsafe { c_opt_out(mapped) }, unsafe { c_opt_out(unmapped) })
    else {
        return EINVAL;
    };
    if let Some(m) = mapped {
        *m = s.last_extents.0;
    }
    if let Some(u) = unmapped {
        *u = s.last_extents.1;
    }
    0
}

/// The BFN the GPU reaches for `gma` through the shadow: 0 and `*bfn`, or
/// -ENOENT if not present.
#[no_mangle]
pub extern "C" fn pviommu_shadow_translate(s: *const CShadow, gma: u64, bfn: *mut u64) -> i32 {
    // SAFETY: `s` is NULL or a live handle.
    let Some(s) = (unsafe { s.as_ref() }) else {
        return EINVAL;
    };
    if !c_out_ok(bfn) {
        return EINVAL;
    }
    match s.session.translate(Gma(gma)) {
        Some(b) => {
            // SAFETY: non-null out-pointer.
            unsafe { *bfn = b.0 };
            0
        }
        None => -2,
    }
}

/// Receive every pending revocation: leaves holding a revoked BFN become
/// non-present, then the BFNs are acknowledged. Writes up to `max` revoked
/// leaves to `out` and returns how many; leaves that did not fit are
/// returned by the next call (call again while it returns `max`).
#[no_mangle]
pub extern "C" fn pviommu_shadow_revocations(
    s: *mut CShadow,
    out: *mut CRevokedLeaf,
    max: usize,
) -> i32 {
    // SAFETY: `s` is NULL or a live handle used by one thread.
    let Some(s) = (unsafe { s.as_mut() }) else {
        return EINVAL;
    };
    if !c_out_ok(out) || max == 0 || max > i32::MAX as usize {
        return EINVAL;
    }
    match s.session.handle_revocations() {
        Ok(r) => s.undelivered.extend(r.leaves),
        Err(e) => return s.fail(&e),
    }
    let n = s.undelivered.len().min(max);
    for (i, l) in s.undelivered.drain(..n).enumerate() {
        // SAFETY: `out` holds `max` elements and `i < n <= max`.
        unsafe {
            out.add(i).write(CRevokedLeaf {
                gma: l.gma.0,
                gfn: l.gfn.0,
                bfn: l.bfn.0,
                domid: l.domid.0,
                pad: [0; 3],
            })
        };
    }
    n as i32
}

/// Unmap every leaf and free the shadow (a new build may follow). Returns
/// the number of leaves unmapped, or -ENOENT if not built.
#[no_mangle]
pub extern "C" fn pviommu_shadow_teardown(s: *mut CShadow) -> i64 {
    // SAFETY: `s` is NULL or a live handle used by one thread.
    let Some(s) = (unsafe { s.as_mut() }) else {
        return EINVAL.into();
    };
    match s.session.teardown() {
        Ok(n) => n as i64,
        Err(e) => s.fail(&e).into(),
    }
}

#[cfg(feature = "sim")]
fn sim_of<'a>(s: *mut CShadow) -> Option<&'a crate::transport::in_process::SharedSim> {
    // SAFETY: `s` is NULL or a live handle; the reference does not outlive
    // the calling function.
    unsafe { s.as_ref() }.and_then(|s| s.sim.as_ref())
}

/// Simulator only: the guest writes `len` bytes at `offset` of its frame
/// `gfn` (to lay out its tables and buffers). -EINVAL on Xen.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_shadow_sim_write(
    s: *mut CShadow,
    gfn: u64,
    offset: usize,
    buf: *const u8,
    len: usize,
) -> i32 {
    let Some(sim) = sim_of(s) else {
        return EINVAL;
    };
    // SAFETY: `buf` holds `len` bytes.
    let data = match unsafe { c_array(buf, len, "shadow sim write: buf (bytes)") } {
        Ok(data) => data,
        Err(why) => {
            crate::capi::set_last_error(&why);
            return EINVAL;
        }
    };
    match sim.lock().0.write_guest(DomId(1), Gfn(gfn), offset, data) {
        Ok(()) => 0,
        Err(e) => e.negated(),
    }
}

/// Simulator only: balloon `gfn` out of the guest (the hypervisor revokes
/// its BFNs).
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_shadow_sim_balloon_out(s: *mut CShadow, gfn: u64) -> i32 {
    let Some(sim) = sim_of(s) else {
        return EINVAL;
    };
    let mut g = sim.lock();
    let (m, e) = &mut *g;
    match m.balloon_out(e, DomId(1), Gfn(gfn)) {
        Ok(()) => 0,
        Err(err) => err.negated(),
    }
}

/// Simulator only: the simulated device reads `len` (<= 4096) bytes at bus
/// address `bfn << 12`. -EFAULT on an IOMMU fault.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_shadow_sim_dma_read(
    s: *mut CShadow,
    bfn: u64,
    buf: *mut u8,
    len: usize,
) -> i32 {
    let Some(sim) = sim_of(s) else {
        return EINVAL;
    };
    if buf.is_null() || len > 4096 {
        return EINVAL;
    }
    // As `pviommu_sim_dma_read`: a BFN past the bus names no address (a
    // saturated one read the top page instead).
    let Some(addr) = bfn.checked_mul(4096) else {
        crate::capi::set_last_error(&format!("sim dma read: bfn {bfn:#x} past the bus"));
        return EINVAL;
    };
    let r = sim
        .lock()
        .0
        .dma_read(DomId::DOM0, ContextId::DEFAULT, addr, len);
    match r {
        Ok(bytes) => {
            // SAFETY: `buf` holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, len) };
            0
        }
        Err(_) => -14,
    }
}
