//! The privcmd transport: Linux dom0 on Xen. Hypercalls go through
//! `IOCTL_PRIVCMD_HYPERCALL` on `/dev/xen/privcmd`; their arguments live in a
//! buffer that is safe to hand to Xen: pages from Linux's `/dev/xen/hypercall`
//! device when it exists (never migrated or swapped), else anonymous memory
//! locked with `mlock`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use pviommu_abi::{
    cmd, Bfn, ContextId, DomId, PvIommuBatch, PvIommuCaps, PvIommuEntry, PvIommuLimits, PvIommuOp,
    PvIommuRegion, PvIommuRegions, HYPERVISOR_PV_IOMMU_OP, INTERFACE_VERSION,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::Transport;
use crate::Error;

/// `struct privcmd_hypercall` of Linux's `include/uapi/xen/privcmd.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrivcmdHypercall {
    /// Hypercall number.
    pub op: u64,
    /// Arguments.
    pub arg: [u64; 5],
}

/// `IOCTL_PRIVCMD_HYPERCALL` = `_IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))`.
pub const IOCTL_PRIVCMD_HYPERCALL: libc::c_ulong =
    ((std::mem::size_of::<PrivcmdHypercall>() as libc::c_ulong) << 16)
        | ((b'P' as libc::c_ulong) << 8);

/// Default device paths.
pub const PRIVCMD_PATH: &str = "/dev/xen/privcmd";
/// Linux's hypercall-buffer device.
pub const HYPERCALL_BUF_PATH: &str = "/dev/xen/hypercall";

/// Bytes of hypercall buffer: a header page, then room for 1024 ops.
const BUF_LEN: usize = 16 * 4096;
const OPS_OFFSET: usize = 4096;

/// A buffer Xen may read and write while the hypercall runs.
struct HypercallBuffer {
    ptr: NonNull<u8>,
    len: usize,
    _dev: Option<File>,
}

// SAFETY: the buffer is exclusively owned and only accessed through &mut self.
unsafe impl Send for HypercallBuffer {}

impl HypercallBuffer {
    fn new(dev_path: &Path) -> Result<HypercallBuffer, Error> {
        let os = |what: &str| Error::Os {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        };
        if let Ok(dev) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dev_path)
        {
            // SAFETY: mapping a fresh region of the hypercall device; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    BUF_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    dev.as_raw_fd(),
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let ptr =
                    NonNull::new(p as *mut u8).ok_or_else(|| os("mmap /dev/xen/hypercall"))?;
                return Ok(HypercallBuffer {
                    ptr,
                    len: BUF_LEN,
                    _dev: Some(dev),
                });
            }
        }
        // SAFETY: anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUF_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap hypercall buffer"));
        }
        // SAFETY: `p` maps BUF_LEN bytes.
        if unsafe { libc::mlock(p, BUF_LEN) } != 0 {
            let e = os("mlock hypercall buffer");
            // SAFETY: unmapping what we mapped.
            unsafe { libc::munmap(p, BUF_LEN) };
            return Err(e);
        }
        let ptr = NonNull::new(p as *mut u8).ok_or_else(|| os("mmap"))?;
        Ok(HypercallBuffer {
            ptr,
            len: BUF_LEN,
            _dev: None,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` bytes for the buffer's lifetime, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn addr(&self, offset: usize) -> u64 {
        self.ptr.as_ptr() as u64 + offset as u64
    }
}

impl Drop for HypercallBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// Hypercalls through `/dev/xen/privcmd`.
pub struct Privcmd {
    fd: File,
    buf: HypercallBuffer,
}

impl Privcmd {
    /// Open the default devices.
    pub fn open() -> Result<Privcmd, Error> {
        Self::open_at(Path::new(PRIVCMD_PATH), Path::new(HYPERCALL_BUF_PATH))
    }

    /// Open given device paths (tests point these elsewhere).
    pub fn open_at(privcmd: &Path, hypercall_dev: &Path) -> Result<Privcmd, Error> {
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(privcmd)
            .map_err(|e| Error::NoXen(format!("{}: {e}", privcmd.display())))?;
        let buf = HypercallBuffer::new(hypercall_dev)?;
        Ok(Privcmd { fd, buf })
    }

    /// Issue `HYPERVISOR_pv_iommu_op(cmd, arg)`; the raw return value.
    fn hypercall(&mut self, cmd: u32, arg: u64) -> Result<i64, Error> {
        let mut call = PrivcmdHypercall {
            op: HYPERVISOR_PV_IOMMU_OP as u64,
            arg: [cmd as u64, arg, 0, 0, 0],
        };
        tracing::trace!(cmd, arg = format_args!("{arg:#x}"), "privcmd hypercall");
        // SAFETY: `call` is a valid privcmd_hypercall; `arg` points into the
        // locked hypercall buffer owned by self.
        let ret =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_PRIVCMD_HYPERCALL as _, &mut call) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            // privcmd returns the hypervisor's -errno as -1/errno.
            return match e.raw_os_error() {
                Some(code) if pviommu_abi::Errno::from_code(code).is_some() => Ok(-(code as i64)),
                _ => Err(Error::Os {
                    what: "IOCTL_PRIVCMD_HYPERCALL".into(),
                    source: e,
                }),
            };
        }
        Ok(ret as i64)
    }
}

impl Transport for Privcmd {
    fn name(&self) -> &'static str {
        "privcmd"
    }

    fn query_caps(&mut self) -> Result<PvIommuCaps, Error> {
        let arg = self.buf.addr(0);
        PvIommuCaps::new_zeroed()
            .write_to_prefix(self.buf.bytes())
            .ok();
        let ret = self.hypercall(cmd::QUERY_CAPS, arg)?;
        if ret != 0 {
            return Err(Error::from_return("query_caps", ret));
        }
        PvIommuCaps::read_from_prefix(self.buf.bytes())
            .map(|(c, _)| c)
            .map_err(|_| Error::InvalidArgument("short caps".into()))
    }

    fn max_batch_ops(&self) -> u32 {
        ((BUF_LEN - OPS_OFFSET) / std::mem::size_of::<PvIommuOp>()) as u32
    }
    fn batch(&mut self, ops: &mut [PvIommuOp], nr_done: u32) -> Result<(i64, u32), Error> {
        let ops_bytes = ops.as_bytes().len();
        if ops_bytes > BUF_LEN - OPS_OFFSET {
            return Err(Error::InvalidArgument(format!(
                "{} ops exceed the hypercall buffer",
                ops.len()
            )));
        }
        let hdr = PvIommuBatch {
            version: INTERFACE_VERSION,
            nr_ops: ops.len() as u32,
            nr_done,
            flags: 0,
            ops: self.buf.addr(OPS_OFFSET),
        };
        let arg = self.buf.addr(0);
        let b = self.buf.bytes();
        b[..std::mem::size_of::<PvIommuBatch>()].copy_from_slice(hdr.as_bytes());
        b[OPS_OFFSET..OPS_OFFSET + ops_bytes].copy_from_slice(ops.as_bytes());
        let ret = self.hypercall(cmd::BATCH, arg)?;
        let b = self.buf.bytes();
        ops.as_mut_bytes()
            .copy_from_slice(&b[OPS_OFFSET..OPS_OFFSET + ops_bytes]);
        let (out, _) = PvIommuBatch::read_from_prefix(b)
            .map_err(|_| Error::InvalidArgument("header".into()))?;
        // A negative return comes back as it is, with the header's nr_done
        // (the ops before it ran: the caller settles them).
        Ok((ret, out.nr_done))
    }

    fn reserved_regions(
        &mut self,
        start: u32,
        max: u32,
    ) -> Result<(Vec<PvIommuRegion>, u32), Error> {
        let cap = ((BUF_LEN - OPS_OFFSET) / std::mem::size_of::<PvIommuRegion>()) as u32;
        let hdr = PvIommuRegions {
            version: INTERFACE_VERSION,
            start,
            nr: max.min(cap),
            total: 0,
            regions: self.buf.addr(OPS_OFFSET),
        };
        let arg = self.buf.addr(0);
        self.buf.bytes()[..std::mem::size_of::<PvIommuRegions>()].copy_from_slice(hdr.as_bytes());
        let ret = self.hypercall(cmd::RESERVED_REGIONS, arg)?;
        if ret != 0 {
            return Err(Error::from_return("reserved_regions", ret));
        }
        let b = self.buf.bytes();
        let (out, _) = PvIommuRegions::read_from_prefix(b)
            .map_err(|_| Error::InvalidArgument("header".into()))?;
        let n = out.nr.min(hdr.nr) as usize;
        let size = std::mem::size_of::<PvIommuRegion>();
        let regions = (0..n)
            .filter_map(|i| {
                PvIommuRegion::read_from_prefix(&b[OPS_OFFSET + i * size..])
                    .ok()
                    .map(|(r, _)| r)
            })
            .collect();
        Ok((regions, out.total))
    }

    fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error> {
        let req = PvIommuLimits {
            version: INTERFACE_VERSION,
            domid: domid.0,
            _pad0: 0,
            quota,
        };
        let arg = self.buf.addr(0);
        self.buf.bytes()[..std::mem::size_of::<PvIommuLimits>()].copy_from_slice(req.as_bytes());
        match self.hypercall(cmd::SET_LIMITS, arg)? {
            0 => Ok(()),
            ret => Err(Error::from_return(format!("set_limits d{}", domid.0), ret)),
        }
    }

    fn stats(&mut self, domid: DomId, flags: u16) -> Result<pviommu_abi::PvIommuStats, Error> {
        use pviommu_abi::PvIommuStats;
        use zerocopy::FromBytes;
        let req = PvIommuStats {
            version: INTERFACE_VERSION,
            domid: domid.0,
            flags,
            ..PvIommuStats::default()
        };
        let size = std::mem::size_of::<PvIommuStats>();
        let arg = self.buf.addr(0);
        self.buf.bytes()[..size].copy_from_slice(req.as_bytes());
        match self.hypercall(cmd::STATS, arg)? {
            0 => PvIommuStats::read_from_bytes(&self.buf.bytes()[..size])
                .map_err(|_| Error::InvalidArgument("stats: short buffer".into())),
            ret => Err(Error::from_return(format!("stats d{}", domid.0), ret)),
        }
    }

    fn entry(&mut self, domid: DomId, context: ContextId, bfn: Bfn) -> Result<PvIommuEntry, Error> {
        let req = PvIommuEntry {
            version: INTERFACE_VERSION,
            domid: domid.0,
            context: context.0,
            bfn: bfn.0,
            ..PvIommuEntry::default()
        };
        let size = std::mem::size_of::<PvIommuEntry>();
        let arg = self.buf.addr(0);
        self.buf.bytes()[..size].copy_from_slice(req.as_bytes());
        match self.hypercall(cmd::ENTRY, arg)? {
            0 => PvIommuEntry::read_from_bytes(&self.buf.bytes()[..size])
                .map_err(|_| Error::InvalidArgument("entry: short buffer".into())),
            ret => Err(Error::from_return(
                format!("entry d{} context {} bfn {:#x}", domid.0, context.0, bfn.0),
                ret,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_linux() {
        // _IOC(_IOC_NONE, 'P', 0, 48) as computed by Linux's headers.
        assert_eq!(std::mem::size_of::<PrivcmdHypercall>(), 48);
        assert_eq!(IOCTL_PRIVCMD_HYPERCALL, 0x0030_5000);
    }

    #[test]
    fn no_xen_is_a_clear_error() {
        let err = Privcmd::open_at(
            Path::new("/nonexistent/xen/privcmd"),
            Path::new("/nonexistent"),
        )
        .err()
        .expect("must fail without Xen");
        assert!(matches!(err, Error::NoXen(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/xen/privcmd"));
    }

    #[test]
    fn hypercall_buffer_is_locked_memory_when_no_device() {
        let mut b = HypercallBuffer::new(Path::new("/nonexistent")).unwrap();
        assert_eq!(b.bytes().len(), BUF_LEN);
        b.bytes()[BUF_LEN - 1] = 7;
        assert_eq!(b.addr(0) % 4096, 0);
    }

    /// Up to the ioctl: against a file that is not privcmd, the ioctl is
    /// issued with the right buffer contents and fails with ENOTTY, which is
    /// reported as an OS error (not misread as a hypervisor errno).
    #[test]
    fn batch_reaches_the_ioctl() {
        let dir = std::env::temp_dir().join(format!("pviommu-privcmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("privcmd");
        std::fs::write(&fake, b"").unwrap();
        let mut p = Privcmd::open_at(&fake, Path::new("/nonexistent")).unwrap();
        let mut ops = [PvIommuOp {
            subop: 1,
            flags: 1,
            domid: 1,
            gfn: 5,
            ..Default::default()
        }];
        let err = p.batch(&mut ops, 0).unwrap_err();
        assert!(matches!(err, Error::Os { .. }), "{err}");
        let (hdr, _) = PvIommuBatch::read_from_prefix(p.buf.bytes()).unwrap();
        assert_eq!(hdr.nr_ops, 1);
        assert_eq!(hdr.ops, p.buf.addr(OPS_OFFSET));
        let (op, _) = PvIommuOp::read_from_prefix(&p.buf.bytes()[OPS_OFFSET..]).unwrap();
        assert_eq!(op.gfn, 5);
    }

    /// `entry` places a `struct pv_iommu_entry` at the argument address
    /// with the version, domain, context and BFN in, outputs zeroed.
    #[test]
    fn entry_reaches_the_ioctl() {
        let dir = std::env::temp_dir().join(format!("pviommu-privcmd-e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("privcmd");
        std::fs::write(&fake, b"").unwrap();
        let mut p = Privcmd::open_at(&fake, Path::new("/nonexistent")).unwrap();
        let err = p.entry(DomId(3), ContextId(2), Bfn(0x10_0004)).unwrap_err();
        assert!(matches!(err, Error::Os { .. }), "{err}");
        let (req, _) = PvIommuEntry::read_from_prefix(p.buf.bytes()).unwrap();
        assert_eq!(
            req,
            PvIommuEntry {
                version: INTERFACE_VERSION,
                domid: 3,
                context: 2,
                bfn: 0x10_0004,
                ..Default::default()
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
