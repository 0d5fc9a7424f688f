//! The C interface for mediators written in C (QEMU, a kernel mediator's
//! user-space helper). Declared in `guest-driver/include/pviommu_guest.h`.
//!
//! Every function takes a `pviommu_client *` from one of the `open`
//! functions, returns 0 or a negative errno, and never unwinds into C.
//! Per-page statuses go into caller arrays.
//!
//! Contract for every pointer argument: NULL (checked, -EINVAL) or valid for
//! the documented number of elements; a client is used by one thread at a
//! time. These are C entry points, so they are not marked `unsafe fn`: C
//! cannot see the marker, and each dereference has its own SAFETY note.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, CStr, CString};
use std::path::Path;

use pviommu_abi::{op_flags, Bfn, ContextId, DomId, Gfn, MemAttr, Permissions};

use crate::transport::Transport;
use crate::{Client, Error};

/// The opaque handle C holds.
pub struct CClient {
    client: Client<Box<dyn Transport>>,
    last_error: CString,
}

const EINVAL: i32 = -22;
const EIO: i32 = -5;

fn code(e: &Error) -> i32 {
    e.errno().map_or(EIO, |x| x.negated())
}

impl CClient {
    fn fail(&mut self, e: &Error) -> i32 {
        self.last_error = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
        code(e)
    }
}

fn open(t: Result<Box<dyn Transport>, Error>) -> *mut CClient {
    match t.and_then(Client::open) {
        Ok(client) => Box::into_raw(Box::new(CClient {
            client,
            last_error: CString::default(),
        })),
        Err(_) => std::ptr::null_mut(),
    }
}

/// Open the Xen transport (`/dev/xen/privcmd`). NULL on failure.
#[no_mangle]
pub extern "C" fn pviommu_open_xen() -> *mut CClient {
    open(crate::transport::privcmd::Privcmd::open().map(|p| Box::new(p) as Box<dyn Transport>))
}

/// Open an embedded simulated machine with dom0 and one guest (domid 1) of
/// `guest_pages` pages, page g starting with the 8-byte little-endian value
/// `0x5049564f00000000 | g`. Calls are made as dom0. NULL on failure.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_open_sim(guest_pages: u64) -> *mut CClient {
    use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
    let build = || -> Result<Box<dyn Transport>, Error> {
        let pages = guest_pages.min(1 << 20);
        let mut m = SimMachine::new(pages + 4096, Format::Vtd, 64);
        let hv = |e| Error::Hypervisor {
            what: "simulator setup".into(),
            errno: e,
        };
        m.create_domain(
            DomId(1),
            DomainSpec {
                pages,
                privileged: false,
                device_model_of: None,
            },
        )
        .map_err(hv)?;
        for g in 0..pages {
            m.write_guest(
                DomId(1),
                Gfn(g),
                0,
                &(0x5049_564f_0000_0000u64 | g).to_le_bytes(),
            )
            .map_err(hv)?;
        }
        let t = crate::transport::in_process::InProcess::new(m, Default::default(), DomId::DOM0)?;
        Ok(Box::new(t))
    };
    open(build())
}

/// Open a client of the simulator daemon at `socket`, calling as `caller`.
#[no_mangle]
pub extern "C" fn pviommu_open_remote(socket: *const c_char, caller: u16) -> *mut CClient {
    if socket.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(socket) }
        .to_string_lossy()
        .into_owned();
    open(
        crate::transport::remote::Remote::connect(Path::new(&path), DomId(caller))
            .map(|r| Box::new(r) as Box<dyn Transport>),
    )
}

/// Close a client (NULL is ignored).
#[no_mangle]
pub extern "C" fn pviommu_close(c: *mut CClient) {
    if !c.is_null() {
        // SAFETY: `c` came from Box::into_raw in `open` and is closed once.
        drop(unsafe { Box::from_raw(c) });
    }
}

/// The message of the last failure on this client ("" if none).
#[no_mangle]
pub extern "C" fn pviommu_last_error(c: *const CClient) -> *const c_char {
    // SAFETY: `c` is NULL or a live client.
    match unsafe { c.as_ref() } {
        Some(c) => c.last_error.as_ptr(),
        None => c"no client".as_ptr(),
    }
}

/// Map `n` gfns of `domid`. `flags`: PVIOMMU_F_READ/WRITE and an attribute
/// (as in pviommu.h). Writes `bfns[i]` and `status[i]` (0 or -errno).
/// Returns 0 if every page mapped, else the first failure's -errno.
#[no_mangle]
pub extern "C" fn pviommu_map(
    c: *mut CClient,
    domid: u16,
    gfns: *const u64,
    n: usize,
    flags: u32,
    bfns: *mut u64,
    status: *mut i32,
) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    if n > 0 && (gfns.is_null() || bfns.is_null() || status.is_null()) {
        return EINVAL;
    }
    let flags = flags as u16;
    let perms = Permissions {
        read: flags & op_flags::READ != 0,
        write: flags & op_flags::WRITE != 0,
    };
    let Some(attr) = MemAttr::from_field((flags & op_flags::ATTR_MASK) >> op_flags::ATTR_SHIFT)
    else {
        return EINVAL;
    };
    // SAFETY: the caller passes arrays of `n` elements.
    let (gfns, bfns, status) = unsafe {
        (
            std::slice::from_raw_parts(gfns, n),
            std::slice::from_raw_parts_mut(bfns, n),
            std::slice::from_raw_parts_mut(status, n),
        )
    };
    let gfns: Vec<Gfn> = gfns.iter().map(|g| Gfn(*g)).collect();
    let results = c
        .client
        .map_foreign(DomId(domid), &gfns, perms, attr, ContextId::DEFAULT);
    let mut ret = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(b) => {
                bfns[i] = b.0;
                status[i] = 0;
            }
            Err(e) => {
                bfns[i] = 0;
                status[i] = code(e);
                if ret == 0 {
                    ret = c.fail(e);
                }
            }
        }
    }
    ret
}

/// Release one reference to each of `n` BFNs. `status[i]` as for map.
#[no_mangle]
pub extern "C" fn pviommu_unmap(
    c: *mut CClient,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    if n > 0 && (bfns.is_null() || status.is_null()) {
        return EINVAL;
    }
    // SAFETY: the caller passes arrays of `n` elements.
    let (bfns, status) = unsafe {
        (
            std::slice::from_raw_parts(bfns, n),
            std::slice::from_raw_parts_mut(status, n),
        )
    };
    let bfns: Vec<Bfn> = bfns.iter().map(|b| Bfn(*b)).collect();
    let mut ret = 0;
    for (i, r) in c.client.unmap(&bfns, ContextId::DEFAULT).iter().enumerate() {
        status[i] = r.as_ref().map_or_else(code, |_| 0);
        if let Err(e) = r {
            if ret == 0 {
                ret = c.fail(e);
            }
        }
    }
    ret
}

/// Look up a BFN: fills `*domid`, `*gfn`, `*flags`.
#[no_mangle]
pub extern "C" fn pviommu_lookup(
    c: *mut CClient,
    bfn: u64,
    domid: *mut u16,
    gfn: *mut u64,
    flags: *mut u32,
) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    if domid.is_null() || gfn.is_null() || flags.is_null() {
        return EINVAL;
    }
    match c.client.lookup(Bfn(bfn), ContextId::DEFAULT) {
        Ok(l) => {
            // SAFETY: non-null out-pointers from the caller.
            unsafe {
                *domid = l.domid.0;
                *gfn = l.gfn.0;
                *flags = (l.perms.flag_bits() | (l.attr.field() << op_flags::ATTR_SHIFT)) as u32;
            }
            0
        }
        Err(e) => c.fail(&e),
    }
}

/// `struct pviommu_revocation` in `pviommu_guest.h`.
#[repr(C)]
pub struct CRevocation {
    /// The revoked BFN (released by the acknowledgement).
    pub bfn: u64,
    /// The foreign frame it mapped.
    pub gfn: u64,
    /// Its IOMMU context.
    pub context: u32,
    /// The foreign domain.
    pub domid: u16,
    /// Zero.
    pub pad: u16,
}

/// Receive and acknowledge up to `max` pending revocations into `out`.
/// Returns how many were written (call again while it returns `max`) or a
/// negative errno. The BFNs are dropped from the mapping cache.
#[no_mangle]
pub extern "C" fn pviommu_drain_revocations(
    c: *mut CClient,
    out: *mut CRevocation,
    max: usize,
) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    if out.is_null() || max == 0 || max > i32::MAX as usize {
        return EINVAL;
    }
    match c.client.drain_revocations_up_to(max) {
        Ok(revs) => {
            for (i, r) in revs.iter().enumerate() {
                // SAFETY: `out` holds `max` elements and `revs.len() <= max`.
                unsafe {
                    out.add(i).write(CRevocation {
                        bfn: r.bfn.0,
                        gfn: r.gfn.0,
                        context: r.context.0,
                        domid: r.domid.0,
                        pad: 0,
                    })
                };
            }
            revs.len() as i32
        }
        Err(e) => c.fail(&e),
    }
}

/// The toolstack's call: set `domid`'s BFN quota (0: the boot default).
#[no_mangle]
pub extern "C" fn pviommu_set_limits(c: *mut CClient, domid: u16, quota: u64) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    match c.client.set_limits(DomId(domid), quota) {
        Ok(()) => 0,
        Err(e) => c.fail(&e),
    }
}

/// Embedded simulator only: balloon `gfn` out of domain `domid` (the page
/// leaves, the hypervisor revokes its BFNs). -EINVAL on another transport.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_sim_balloon_out(c: *mut CClient, domid: u16, gfn: u64) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    let Some(sim) = c.client.transport().in_process() else {
        return EINVAL;
    };
    let mut g = sim.sim().lock();
    let (m, e) = &mut *g;
    match m.balloon_out(e, DomId(domid), Gfn(gfn)) {
        Ok(()) => 0,
        Err(err) => err.negated(),
    }
}

/// The simulated device of an in-process simulator reads `len` bytes at
/// bus address `bfn << 12` into `buf`. -EINVAL on another transport,
/// -EFAULT on an IOMMU fault.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_sim_dma_read(c: *mut CClient, bfn: u64, buf: *mut u8, len: usize) -> i32 {
    // SAFETY: `c` is NULL or a live client used by one thread.
    let Some(c) = (unsafe { c.as_mut() }) else {
        return EINVAL;
    };
    if buf.is_null() || len > 4096 {
        return EINVAL;
    }
    let Some(sim) = c.client.transport().in_process() else {
        return EINVAL;
    };
    let r = sim
        .sim()
        .lock()
        .0
        .dma_read(DomId::DOM0, ContextId::DEFAULT, bfn << 12, len);
    match r {
        Ok(bytes) => {
            // SAFETY: `buf` holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, len) };
            0
        }
        Err(_) => -14,
    }
}
