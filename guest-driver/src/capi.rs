//! The C interface for mediators written in C (QEMU, a kernel mediator's
//! user-space helper). Declared in `guest-driver/include/pviommu_guest.h`.
//!
//! Every function takes a `pviommu_client *` from one of the `open`
//! functions, returns 0 or a negative errno, and never unwinds into C.
//! Per-page statuses go into caller arrays.
//!
//! Contract for every pointer argument: NULL (checked, -EINVAL) or valid for
//! the documented number of elements. A client may be shared between
//! threads: each call holds the client's lock for its duration, so calls on
//! one client run one at a time. The message of a failure is kept per
//! thread, like `errno`. These are C entry points, so they are not marked
//! `unsafe fn`: C cannot see the marker, and each dereference has its own
//! SAFETY note.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use pviommu_abi::{op_flags, Bfn, ContextId, DomId, Gfn, MemAttr, Permissions, Sbdf};

use crate::transport::Transport;
use crate::{Client, Error};

/// The opaque handle C holds: the client behind a lock, so C may call from
/// any thread.
pub struct CClient {
    client: Mutex<Client<Box<dyn Transport>>>,
}

const EINVAL: i32 = -22;
/// What a failure of the transport answers (the daemon gone, its protocol,
/// an OS call): `-ECOMM`, an errno the ABI does not use. It was `-EIO`
/// until ABI 1.7 gave `EIO` the host's IOMMU failures (C interface 1.2).
const ECOMM: i32 = -crate::error::ERRNO_TRANSPORT;
/// Most pages one map call takes (the library builds a request per page):
/// a wrong `n` from C fails cleanly instead of exhausting memory.
pub(crate) const MAX_PAGES_PER_CALL: usize = 1 << 24;

thread_local! {
    /// The message of this thread's last failure (`pviommu_last_error`).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    let msg = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

fn code(e: &Error) -> i32 {
    match e {
        // Bad input the client refused before any hypercall.
        Error::InvalidArgument(_) => EINVAL,
        _ => e.errno().map_or(ECOMM, |x| x.negated()),
    }
}

/// Record `e` as this thread's last failure and return its -errno.
fn fail(e: &Error) -> i32 {
    set_last_error(&e.to_string());
    code(e)
}

/// `n` elements of an array C passed at `ptr`. `n == 0` is the empty
/// slice whatever `ptr` is (C passes NULL for an empty array, which
/// `slice::from_raw_parts` must never see); a NULL or misaligned `ptr`
/// with `n > 0`, or more than [`MAX_PAGES_PER_CALL`] elements, is `Err`
/// with the reason (`what` names the argument).
///
/// # Safety
/// A non-NULL, aligned `ptr` points to `n` initialised elements that stay
/// valid, and are not written through another pointer, for `'a`.
pub(crate) unsafe fn c_array<'a, T>(
    ptr: *const T,
    n: usize,
    what: &str,
) -> Result<&'a [T], String> {
    c_array_check(ptr, n, what)?;
    if n == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-NULL and aligned (checked), `n` elements (the caller's
    // promise), at most `MAX_PAGES_PER_CALL` of them (checked).
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// [`c_array`] for an array the call writes.
///
/// # Safety
/// As for [`c_array`], and no other reference to the elements exists
/// for `'a`.
pub(crate) unsafe fn c_array_mut<'a, T>(
    ptr: *mut T,
    n: usize,
    what: &str,
) -> Result<&'a mut [T], String> {
    c_array_check(ptr, n, what)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `c_array`, and the caller's exclusivity.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
}

/// Whether an out-pointer from C can be written: not NULL, and aligned
/// for `T` (a misaligned write is undefined behaviour).
pub(crate) fn c_out_ok<T>(ptr: *const T) -> bool {
    !ptr.is_null() && ptr.is_aligned()
}

/// An out-pointer C may leave NULL: `Ok(None)` for NULL, `Err` for a
/// misaligned one.
///
/// # Safety
/// A non-NULL, aligned `ptr` points to a `T` the call may write, with no
/// other reference to it for `'a`.
pub(crate) unsafe fn c_opt_out<'a, T>(ptr: *mut T) -> Result<Option<&'a mut T>, ()> {
    if ptr.is_null() {
        return Ok(None);
    }
    if !ptr.is_aligned() {
        return Err(());
    }
    // SAFETY: non-NULL and aligned (checked); the caller's promise.
    Ok(Some(unsafe { &mut *ptr }))
}

fn c_array_check<T>(ptr: *const T, n: usize, what: &str) -> Result<(), String> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_PAGES_PER_CALL {
        return Err(format!(
            "{what}: {n} elements in one call; at most {MAX_PAGES_PER_CALL}"
        ));
    }
    if ptr.is_null() {
        return Err(format!("{what} is NULL with {n} elements"));
    }
    if !ptr.is_aligned() {
        return Err(format!(
            "{what} at {ptr:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        ));
    }
    Ok(())
}

/// The client behind `c`, locked. `None` for NULL.
fn lock<'a>(c: *const CClient) -> Option<MutexGuard<'a, Client<Box<dyn Transport>>>> {
    // SAFETY: `c` is NULL or a live client (not yet closed), per the
    // header's ownership rules; only a shared reference is made, the
    // mutex gives exclusive access to the client.
    let c = unsafe { c.as_ref() }?;
    // A panic cannot cross into C (it aborts), so a poisoned lock only
    // means a Rust caller panicked holding it; the client stays usable.
    Some(c.client.lock().unwrap_or_else(|p| p.into_inner()))
}

fn open(t: Result<Box<dyn Transport>, Error>) -> *mut CClient {
    match t.and_then(Client::open) {
        Ok(client) => Box::into_raw(Box::new(CClient {
            client: Mutex::new(client),
        })),
        Err(e) => {
            set_last_error(&e.to_string());
            std::ptr::null_mut()
        }
    }
}

/// Open the Xen transport (`/dev/xen/privcmd`). NULL on failure.
#[no_mangle]
pub extern "C" fn pviommu_open_xen() -> *mut CClient {
    open(crate::transport::privcmd::Privcmd::open().map(|p| Box::new(p) as Box<dyn Transport>))
}

/// Open an embedded simulated machine with dom0 and one guest (domid 1) of
/// `guest_pages` pages, page g starting with the 8-byte little-endian value
/// `0x5049564f00000000 | g`; dom0 owns the PCI devices 0000:00:02.0 and
/// 0000:00:03.0. Calls are made as dom0. NULL on failure.
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
        crate::transport::in_process::add_sim_devices(&mut m);
        let t = crate::transport::in_process::InProcess::new(m, Default::default(), DomId::DOM0)?;
        Ok(Box::new(t))
    };
    open(build())
}

/// Open a client of the simulator daemon at `socket`, calling as `caller`.
#[no_mangle]
pub extern "C" fn pviommu_open_remote(socket: *const c_char, caller: u16) -> *mut CClient {
    if socket.is_null() {
        set_last_error("open remote: the socket path is NULL");
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
        // SAFETY: `c` came from Box::into_raw in `open`, is closed once and
        // no other thread uses it any more (the header's rule).
        drop(unsafe { Box::from_raw(c) });
    }
}

/// The message of this thread's last failure ("" if none); `c` is not
/// needed (NULL allowed: the reason an open failed).
#[no_mangle]
pub extern "C" fn pviommu_last_error(_c: *const CClient) -> *const c_char {
    // The CString lives in this thread's slot until its next failure.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Static, NUL-terminated "NAME: meaning" for every errno the library
/// returns, built once.
fn error_strings() -> &'static [(i32, CString)] {
    static STRINGS: OnceLock<Vec<(i32, CString)>> = OnceLock::new();
    STRINGS.get_or_init(|| {
        let mut v: Vec<(i32, CString)> = pviommu_abi::Errno::ALL
            .iter()
            .map(|e| {
                let s = format!("{}: {}", e.name(), e.meaning());
                (e.code(), CString::new(s).unwrap_or_default())
            })
            .collect();
        v.push((
            -ECOMM,
            c"ECOMM: the transport failed (daemon gone, protocol error, OS call); see pviommu_last_error".into(),
        ));
        v
    })
}

/// "ENOENT: no such mapping or context" for `err` (negative or positive);
/// "unknown error" otherwise. The string is static: never free it.
#[no_mangle]
pub extern "C" fn pviommu_strerror(err: c_int) -> *const c_char {
    let code = err.checked_abs().unwrap_or(0);
    error_strings()
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(c"unknown error".as_ptr(), |(_, s)| s.as_ptr())
}

/// Map `n` gfns of `domid` into context 0. `flags`: PVIOMMU_F_READ/WRITE
/// and an attribute (as in pviommu.h). Writes `bfns[i]` and `status[i]` (0
/// or -errno). Returns 0 if every page mapped, else the first failure's
/// -errno.
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
    map_in(c, ContextId::DEFAULT, domid, gfns, n, flags, bfns, status)
}

/// [`pviommu_map`] into `context` (0 or one from
/// [`pviommu_context_create`]).
#[no_mangle]
pub extern "C" fn pviommu_map_in_context(
    c: *mut CClient,
    context: u32,
    domid: u16,
    gfns: *const u64,
    n: usize,
    flags: u32,
    bfns: *mut u64,
    status: *mut i32,
) -> i32 {
    map_in(c, ContextId(context), domid, gfns, n, flags, bfns, status)
}

/// The access and attribute a map's C `flags` ask for; `None` (the last
/// error set, for `what`) for bits this API does not know (above 16, or
/// outside the ABI's mask) or a grant reference (not offered here): refused,
/// never silently dropped.
fn page_flags(flags: u32, what: &str) -> Option<(Permissions, MemAttr)> {
    let Some(flags) = u16::try_from(flags)
        .ok()
        .filter(|f| f & !op_flags::VALID_MASK == 0 && f & op_flags::GRANT == 0)
    else {
        set_last_error(&format!("{what}: flags {flags:#x} not valid here"));
        return None;
    };
    let perms = Permissions {
        read: flags & op_flags::READ != 0,
        write: flags & op_flags::WRITE != 0,
    };
    let Some(attr) = MemAttr::from_field((flags & op_flags::ATTR_MASK) >> op_flags::ATTR_SHIFT)
    else {
        set_last_error(&format!(
            "{what}: unknown memory attribute in flags {flags:#x}"
        ));
        return None;
    };
    Some((perms, attr))
}

#[allow(clippy::too_many_arguments)]
fn map_in(
    c: *mut CClient,
    context: ContextId,
    domid: u16,
    gfns: *const u64,
    n: usize,
    flags: u32,
    bfns: *mut u64,
    status: *mut i32,
) -> i32 {
    let map = |c: &mut Client<Box<dyn Transport>>, gfns: &[Gfn], perms, attr| {
        c.map_foreign(DomId(domid), gfns, perms, attr, context)
    };
    map_with(
        c,
        "map",
        MAX_PAGES_PER_CALL,
        gfns,
        n,
        flags,
        bfns,
        status,
        map,
    )
}

/// A C map call of `n` gfns (pages or extents, at most `most`) through
/// `map`: the checks of its flags and arrays, then one result a gfn.
#[allow(clippy::too_many_arguments)]
fn map_with(
    c: *mut CClient,
    what: &str,
    most: usize,
    gfns: *const u64,
    n: usize,
    flags: u32,
    bfns: *mut u64,
    status: *mut i32,
    map: impl FnOnce(
        &mut Client<Box<dyn Transport>>,
        &[Gfn],
        Permissions,
        MemAttr,
    ) -> Vec<Result<Bfn, crate::Error>>,
) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    let Some((perms, attr)) = page_flags(flags, what) else {
        return EINVAL;
    };
    if n > most {
        set_last_error(&format!("{what}: {n} in one call; at most {most}"));
        return EINVAL;
    }
    // SAFETY: the caller passes three distinct arrays of `n` elements.
    let arrays = unsafe {
        (
            c_array(gfns, n, &format!("{what}: gfns")),
            c_array_mut(bfns, n, &format!("{what}: bfns")),
            c_array_mut(status, n, &format!("{what}: status")),
        )
    };
    let (Ok(gfns), Ok(bfns), Ok(status)) = arrays else {
        let (a, b, c) = arrays;
        let why = [a.err(), b.err(), c.err()].into_iter().flatten().next();
        set_last_error(&why.unwrap_or_default());
        return EINVAL;
    };
    let gfns: Vec<Gfn> = gfns.iter().map(|g| Gfn(*g)).collect();
    let results = map(&mut c, &gfns, perms, attr);
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
                    ret = fail(e);
                }
            }
        }
    }
    ret
}

/// Release one reference to each of `n` BFNs of context 0. `status[i]` as
/// for map.
#[no_mangle]
pub extern "C" fn pviommu_unmap(
    c: *mut CClient,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
) -> i32 {
    unmap_in(c, ContextId::DEFAULT, bfns, n, status)
}

/// [`pviommu_unmap`] in `context`.
#[no_mangle]
pub extern "C" fn pviommu_unmap_in_context(
    c: *mut CClient,
    context: u32,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
) -> i32 {
    unmap_in(c, ContextId(context), bfns, n, status)
}

fn unmap_in(
    c: *mut CClient,
    context: ContextId,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
) -> i32 {
    let unmap = |c: &mut Client<Box<dyn Transport>>, bfns: &[Bfn]| c.unmap(bfns, context);
    unmap_with(c, "unmap", MAX_PAGES_PER_CALL, bfns, n, status, unmap)
}

/// A C unmap call of `n` BFNs (pages or extents' first, at most `most`)
/// through `unmap`: the checks of its arrays, then one result a BFN.
fn unmap_with(
    c: *mut CClient,
    what: &str,
    most: usize,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
    unmap: impl FnOnce(&mut Client<Box<dyn Transport>>, &[Bfn]) -> Vec<Result<(), crate::Error>>,
) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if n > most {
        set_last_error(&format!("{what}: {n} in one call; at most {most}"));
        return EINVAL;
    }
    // SAFETY: the caller passes two distinct arrays of `n` elements.
    let arrays = unsafe {
        (
            c_array(bfns, n, &format!("{what}: bfns")),
            c_array_mut(status, n, &format!("{what}: status")),
        )
    };
    let (Ok(bfns), Ok(status)) = arrays else {
        let (a, b) = arrays;
        set_last_error(&a.err().or(b.err()).unwrap_or_default());
        return EINVAL;
    };
    let bfns: Vec<Bfn> = bfns.iter().map(|b| Bfn(*b)).collect();
    let mut ret = 0;
    for (i, r) in unmap(&mut c, &bfns).iter().enumerate() {
        status[i] = r.as_ref().map_or_else(code, |_| 0);
        if let Err(e) = r {
            if ret == 0 {
                ret = fail(e);
            }
        }
    }
    ret
}

/// Map the 2 MiB extent of `domid` from `gfn` into `context` (ABI 1.6):
/// `*bfn` gets its first BFN, a multiple of 512. `flags` as for
/// [`pviommu_map`] (no grant). 0 or -errno.
#[no_mangle]
pub extern "C" fn pviommu_map_extent(
    c: *mut CClient,
    context: u32,
    domid: u16,
    gfn: u64,
    flags: u32,
    bfn: *mut u64,
) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if !c_out_ok(bfn) {
        return EINVAL;
    }
    let Some((perms, attr)) = page_flags(flags, "map extent") else {
        return EINVAL;
    };
    match c.map_extent(DomId(domid), Gfn(gfn), perms, attr, ContextId(context)) {
        Ok(b) => {
            // SAFETY: checked non-NULL and aligned by `c_out_ok`.
            unsafe { *bfn = b.0 };
            0
        }
        Err(e) => fail(&e),
    }
}

/// Release one reference to each of the 512 BFNs from `bfn` of `context`
/// (ABI 1.6). 0 or -errno.
#[no_mangle]
pub extern "C" fn pviommu_unmap_extent(c: *mut CClient, context: u32, bfn: u64) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    match c.unmap_extent(Bfn(bfn), ContextId(context)) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// [`pviommu_map_extent`] of each of `n` gfns (at most 32 Ki: 64 GiB), in
/// as few hypercalls as the hypervisor takes: `bfns[i]` and `status[i]`
/// for each, as [`pviommu_map`] writes them; 0 if all mapped, else the
/// first failure.
#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub extern "C" fn pviommu_map_extents(
    c: *mut CClient,
    context: u32,
    domid: u16,
    gfns: *const u64,
    n: usize,
    flags: u32,
    bfns: *mut u64,
    status: *mut i32,
) -> i32 {
    let map = |c: &mut Client<Box<dyn Transport>>, gfns: &[Gfn], perms, attr| {
        c.map_extents(DomId(domid), gfns, perms, attr, ContextId(context))
    };
    let most = MAX_PAGES_PER_CALL / pviommu_abi::EXTENT_PAGES as usize;
    map_with(c, "map extents", most, gfns, n, flags, bfns, status, map)
}

/// [`pviommu_unmap_extent`] of each of `n` first BFNs (at most 32 Ki), the
/// extent ops in as few hypercalls as the hypervisor takes; `status[i]`
/// for each; 0 if all went, else the first failure.
#[no_mangle]
pub extern "C" fn pviommu_unmap_extents(
    c: *mut CClient,
    context: u32,
    bfns: *const u64,
    n: usize,
    status: *mut i32,
) -> i32 {
    let unmap = |c: &mut Client<Box<dyn Transport>>, bfns: &[Bfn]| {
        c.unmap_extents(bfns, ContextId(context))
    };
    let most = MAX_PAGES_PER_CALL / pviommu_abi::EXTENT_PAGES as usize;
    unmap_with(c, "unmap extents", most, bfns, n, status, unmap)
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
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if !c_out_ok(domid) || !c_out_ok(gfn) || !c_out_ok(flags) {
        return EINVAL;
    }
    match c.lookup(Bfn(bfn), ContextId::DEFAULT) {
        Ok(l) => {
            // SAFETY: non-null out-pointers from the caller.
            unsafe {
                *domid = l.domid.0;
                *gfn = l.gfn.0;
                *flags = (l.perms.flag_bits() | (l.attr.field() << op_flags::ATTR_SHIFT)) as u32;
            }
            0
        }
        Err(e) => fail(&e),
    }
}

/// Create an IOMMU context of the caller's; its number goes to
/// `*context`. -EOPNOTSUPP where the IOMMU offers only the default one.
#[no_mangle]
pub extern "C" fn pviommu_context_create(c: *mut CClient, context: *mut u32) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if !c_out_ok(context) {
        return EINVAL;
    }
    match c.context_create() {
        Ok(id) => {
            // SAFETY: non-null out-pointer from the caller.
            unsafe { *context = id.0 };
            0
        }
        Err(e) => fail(&e),
    }
}

/// Destroy an empty context: -EBUSY while it holds BFNs or a device is
/// attached to it.
#[no_mangle]
pub extern "C" fn pviommu_context_destroy(c: *mut CClient, context: u32) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    match c.context_destroy(ContextId(context)) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// Point the caller's PCI device `sbdf` (`PVIOMMU_SBDF()`) at `context`
/// (not 0). Errors as for `Client::context_attach`.
#[no_mangle]
pub extern "C" fn pviommu_context_attach(c: *mut CClient, context: u32, sbdf: u32) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    match c.context_attach(ContextId(context), Sbdf(sbdf)) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// Put device `sbdf`, attached to `context`, back in the default context;
/// -ENOENT if it is not attached there.
#[no_mangle]
pub extern "C" fn pviommu_context_detach(c: *mut CClient, context: u32, sbdf: u32) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    match c.context_detach(ContextId(context), Sbdf(sbdf)) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// The leaf entry of `bfn` in context `context` (not 0) of driver domain
/// `domid`, address bits zeroed, into `*level` and `*bits` (control domain
/// only: `PVIOMMU_CMD_entry`).
#[no_mangle]
pub extern "C" fn pviommu_entry(
    c: *mut CClient,
    domid: u16,
    context: u32,
    bfn: u64,
    level: *mut u32,
    bits: *mut u64,
) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if !c_out_ok(level) || !c_out_ok(bits) {
        return EINVAL;
    }
    match c.entry(DomId(domid), ContextId(context), Bfn(bfn)) {
        Ok(e) => {
            // SAFETY: non-null out-pointers from the caller.
            unsafe {
                *level = e.level;
                *bits = e.bits;
            }
            0
        }
        Err(e) => fail(&e),
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
    drain_into(c, None, out, max)
}

/// Like `pviommu_drain_revocations`, but only the notices of `context`
/// (the others stay queued for whoever owns them): what a mediator calls
/// that shares its driver domain with another. `-EOPNOTSUPP` from a
/// hypervisor without ABI 1.4's revoked-in-context.
#[no_mangle]
pub extern "C" fn pviommu_drain_revocations_in(
    c: *mut CClient,
    context: u32,
    out: *mut CRevocation,
    max: usize,
) -> i32 {
    drain_into(c, Some(ContextId(context)), out, max)
}

fn drain_into(c: *mut CClient, only: Option<ContextId>, out: *mut CRevocation, max: usize) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if !c_out_ok(out) || max == 0 || max > i32::MAX as usize {
        return EINVAL;
    }
    let drained = match only {
        None => c.drain_revocations_up_to(max),
        Some(context) => c.drain_revocations_in(context, max, |_| {}),
    };
    match drained {
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
        Err(e) => fail(&e),
    }
}

/// Wait up to `timeout_ms` milliseconds (at most 65535 per call) until
/// revocations are pending: 1 when some are (drain them), 0 on timeout, or
/// a negative errno. On the daemon the wait ends as soon as it pushes a
/// notice, and the pushed BFNs leave the mapping cache at once; other
/// transports only check what is pending now.
#[no_mangle]
pub extern "C" fn pviommu_wait_revocations(c: *mut CClient, timeout_ms: c_int) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    let Ok(ms) = u64::try_from(timeout_ms) else {
        set_last_error("negative timeout");
        return EINVAL;
    };
    match c.wait_revocations(std::time::Duration::from_millis(ms)) {
        Ok(pending) => i32::from(pending),
        Err(e) => fail(&e),
    }
}

/// The toolstack's call: set `domid`'s BFN quota (0: the boot default).
#[no_mangle]
pub extern "C" fn pviommu_set_limits(c: *mut CClient, domid: u16, quota: u64) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    match c.set_limits(DomId(domid), quota) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// Embedded simulator only: balloon `gfn` out of domain `domid` (the page
/// leaves, the hypervisor revokes its BFNs). -EINVAL on another transport.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_sim_balloon_out(c: *mut CClient, domid: u16, gfn: u64) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    let Some(sim) = c.transport().in_process() else {
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
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if buf.is_null() || len > 4096 {
        return EINVAL;
    }
    // A BFN whose address does not fit 64 bits names no bus address (a
    // shift would drop its top bits and read another page).
    let Some(addr) = bfn.checked_mul(4096) else {
        set_last_error(&format!("sim dma read: bfn {bfn:#x} past the bus"));
        return EINVAL;
    };
    let Some(sim) = c.transport().in_process() else {
        return EINVAL;
    };
    let r = sim
        .sim()
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

/// PCI device `sbdf` of an in-process simulator reads `len` (at most 4096)
/// bytes at bus address `bfn << 12` into `buf`, through the context its
/// context entry names now (its owner's default one, or the context it is
/// attached to). -EINVAL on another transport or for an unknown device,
/// -EFAULT on an IOMMU fault.
#[cfg(feature = "sim")]
#[no_mangle]
pub extern "C" fn pviommu_sim_device_dma_read(
    c: *mut CClient,
    sbdf: u32,
    bfn: u64,
    buf: *mut u8,
    len: usize,
) -> i32 {
    let Some(mut c) = lock(c) else {
        return EINVAL;
    };
    if buf.is_null() || len > 4096 {
        return EINVAL;
    }
    let Some(sim) = c.transport().in_process() else {
        return EINVAL;
    };
    let mut g = sim.sim().lock();
    if g.0.device(Sbdf(sbdf)).is_none() {
        return EINVAL;
    }
    let Some(addr) = bfn.checked_mul(4096) else {
        set_last_error(&format!("sim device dma read: bfn {bfn:#x} past the bus"));
        return EINVAL;
    };
    match g.0.device_dma_read(Sbdf(sbdf), addr, len) {
        Ok(bytes) => {
            // SAFETY: `buf` holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, len) };
            0
        }
        Err(_) => -14,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport failure answers `-ECOMM`, named as such, and the
    /// hypervisor's `EIO` (ABI 1.7: its IOMMU failed) keeps its own name:
    /// until the C interface's 1.2 both were `-EIO`.
    #[test]
    fn a_transport_failure_is_not_the_hypervisors_eio() {
        let transport = Error::Remote("the daemon hung up".into());
        assert_eq!(code(&transport), -70);
        let host = Error::Hypervisor {
            what: "map d1 gfn 0x10".into(),
            errno: pviommu_abi::Errno::Io,
        };
        assert_eq!(code(&host), -5);
        let name = |err: c_int| {
            // SAFETY: pviommu_strerror returns a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(pviommu_strerror(err)) }
                .to_str()
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            name(-70).starts_with("ECOMM: the transport failed"),
            "{}",
            name(-70)
        );
        assert!(
            name(-5).starts_with("EIO: the host's IOMMU"),
            "{}",
            name(-5)
        );
    }
}
