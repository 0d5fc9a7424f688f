//! Reading a foreign domain's memory from dom0: the shadow tables'
//! [`GuestTableReader`] on Xen.
//!
//! Linux's privcmd maps foreign frames into a process in two steps: `mmap`
//! of `/dev/xen/privcmd` reserves an empty window of the device, then
//! `IOCTL_PRIVCMD_MMAPBATCH_V2` fills it with the frames of one domain and
//! reports one error per frame (a frame that failed stays unbacked; touching
//! it raises SIGBUS, so it is never read). [`ForeignMemory`] keeps a bounded
//! cache of such windows, each covering an aligned run of
//! [`ReaderConfig::window_frames`] frames, so a sync that re-reads a few
//! table pages costs no syscall, and evicts the least recently used one when
//! full. A [`Window`] is unmapped when dropped, so no error path can leak a
//! mapping.
//!
//! A cached window keeps a reference to the frames it maps: a domain whose
//! frames are mapped cannot be freed (it stays a zombie). Call
//! [`ForeignMemory::invalidate`] when the domain's memory changes under the
//! mediator (a revocation notice says so) or before re-reading everything.
//!
//! The ioctl layer is the [`PrivcmdDevice`] trait: [`PrivcmdFile`] is the
//! real device; tests substitute a fake that returns per-frame errors,
//! refuses windows, and counts live mappings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use pviommu_abi::{DomId, Gfn};

use crate::shadow::{GuestTableReader, ShadowError};
use crate::Error;

/// Bytes per frame.
pub const PAGE_SIZE: usize = 4096;

/// `struct privcmd_mmapbatch_v2` of Linux's `include/uapi/xen/privcmd.h`
/// (x86-64 layout: 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrivcmdMmapBatchV2 {
    /// Number of frames.
    pub num: libc::c_uint,
    /// Domain owning them.
    pub dom: u16,
    /// Start of the window (a privcmd mapping of exactly `num` pages).
    pub addr: u64,
    /// `xen_pfn_t[num]`: the frames.
    pub arr: *const u64,
    /// `int[num]`: per-frame result, 0 or -errno.
    pub err: *mut libc::c_int,
}

/// `IOCTL_PRIVCMD_MMAPBATCH_V2` = `_IOC(_IOC_NONE, 'P', 4, sizeof(struct
/// privcmd_mmapbatch_v2))`.
pub const IOCTL_PRIVCMD_MMAPBATCH_V2: libc::c_ulong =
    ((std::mem::size_of::<PrivcmdMmapBatchV2>() as libc::c_ulong) << 16)
        | ((b'P' as libc::c_ulong) << 8)
        | 4;

/// The three calls the reader needs from privcmd. Implementations must
/// behave like Linux's: `map_frames` fills `errs` with one 0 or -errno per
/// frame whenever it returns `Ok`, and also when it fails with `ENOENT`
/// (some frame is paged out); on any other error `errs` means nothing.
pub trait PrivcmdDevice: Send + Sync {
    /// Reserve a window of `pages` pages backed by the device, readable.
    fn reserve(&self, pages: usize) -> io::Result<NonNull<u8>>;
    /// Map `gfns` of `domid` into the window at `addr` (reserved for
    /// exactly `gfns.len()` pages).
    fn map_frames(
        &self,
        domid: DomId,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> io::Result<()>;
    /// Release a window of `pages` pages at `addr` from [`reserve`](Self::reserve).
    fn release(&self, addr: NonNull<u8>, pages: usize);
}

/// Linux's `/dev/xen/privcmd`.
pub struct PrivcmdFile {
    file: File,
}

impl PrivcmdFile {
    /// Open `/dev/xen/privcmd`.
    pub fn open() -> Result<PrivcmdFile, Error> {
        Self::open_at(Path::new(crate::transport::privcmd::PRIVCMD_PATH))
    }

    /// Open the device at `path`.
    pub fn open_at(path: &Path) -> Result<PrivcmdFile, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::NoXen(format!("{}: {e}", path.display())))?;
        Ok(PrivcmdFile { file })
    }
}

impl PrivcmdDevice for PrivcmdFile {
    fn reserve(&self, pages: usize) -> io::Result<NonNull<u8>> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of the privcmd device, no fixed
        // address; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }

    fn map_frames(
        &self,
        domid: DomId,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> io::Result<()> {
        if errs.len() != gfns.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let num = libc::c_uint::try_from(gfns.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut batch = PrivcmdMmapBatchV2 {
            num,
            dom: domid.0,
            addr: addr.as_ptr() as u64,
            arr: gfns.as_ptr(),
            err: errs.as_mut_ptr(),
        };
        // SAFETY: `batch` is a valid privcmd_mmapbatch_v2 whose arrays hold
        // `num` elements and outlive the call; `addr` is a privcmd window of
        // exactly `num` pages reserved by this device.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_PRIVCMD_MMAPBATCH_V2 as _,
                &mut batch,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn release(&self, addr: NonNull<u8>, pages: usize) {
        // SAFETY: unmapping a window this device reserved, once.
        unsafe { libc::munmap(addr.as_ptr().cast(), pages * PAGE_SIZE) };
    }
}

/// One mapped window: `errs.len()` frames from `first_gfn`. Unmapped on drop.
pub struct Window<D: PrivcmdDevice + ?Sized> {
    device: Arc<D>,
    addr: NonNull<u8>,
    first_gfn: u64,
    errs: Vec<i32>,
    last_use: u64,
}

// SAFETY: the window's memory is only read through `&self` with volatile
// loads, and the mapping is owned by the window alone.
unsafe impl<D: PrivcmdDevice + ?Sized> Send for Window<D> {}

impl<D: PrivcmdDevice + ?Sized> Window<D> {
    /// Map `frames` frames of `domid` from `first_gfn`. Nothing stays mapped
    /// when this fails.
    pub fn map(device: &Arc<D>, domid: DomId, first_gfn: u64, frames: usize) -> io::Result<Self> {
        let addr = device.reserve(frames)?;
        // From here on, dropping `w` releases the reservation.
        let mut w = Window {
            device: Arc::clone(device),
            addr,
            first_gfn,
            errs: vec![0; frames],
            last_use: 0,
        };
        let gfns: Vec<u64> = (0..frames as u64).map(|i| first_gfn + i).collect();
        match device.map_frames(domid, addr, &gfns, &mut w.errs) {
            Ok(()) => Ok(w),
            // Linux: a frame failed with ENOENT (paged out); `errs` is valid.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(w),
            Err(e) => Err(e),
        }
    }

    /// The per-frame result of frame `gfn`: 0 or -errno; None outside.
    pub fn frame_error(&self, gfn: u64) -> Option<i32> {
        let i = usize::try_from(gfn.checked_sub(self.first_gfn)?).ok()?;
        self.errs.get(i).copied()
    }

    /// Copy frame `gfn` (inside the window, mapped without error) as 512
    /// little-endian entries.
    fn read(&self, gfn: u64, buf: &mut [u64; 512]) -> Result<(), i32> {
        match self.frame_error(gfn) {
            Some(0) => {}
            Some(e) => return Err(e.checked_neg().unwrap_or(libc::EIO).max(1)),
            None => return Err(libc::EINVAL),
        }
        let i = (gfn - self.first_gfn) as usize;
        // SAFETY: frame `i` of the window is mapped (its error is 0) and the
        // window lives as long as `self`; the guest may write it at any
        // time, hence volatile loads of aligned u64s.
        unsafe {
            let page = self.addr.as_ptr().add(i * PAGE_SIZE) as *const u64;
            for (k, slot) in buf.iter_mut().enumerate() {
                *slot = u64::from_le(std::ptr::read_volatile(page.add(k)));
            }
        }
        Ok(())
    }
}

impl<D: PrivcmdDevice + ?Sized> Drop for Window<D> {
    fn drop(&mut self) {
        self.device.release(self.addr, self.errs.len());
    }
}

/// Tunables of the window cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderConfig {
    /// Frames per window, aligned to a multiple of itself (at least 1).
    /// Guest drivers allocate table pages in clusters; a window catches
    /// neighbours with the same two syscalls.
    pub window_frames: usize,
    /// Most windows kept mapped (at least 1); the least recently used goes.
    pub max_windows: usize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            window_frames: 8,
            max_windows: 256,
        }
    }
}

/// Counters of the window cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Pages read.
    pub reads: u64,
    /// Reads served by a window already mapped.
    pub hits: u64,
    /// Windows mapped (one reserve + one ioctl each).
    pub windows_mapped: u64,
    /// Windows unmapped because the cache was full.
    pub evictions: u64,
    /// Reads refused (frame error or failed ioctl).
    pub errors: u64,
}

struct Cache<D: PrivcmdDevice + ?Sized> {
    windows: HashMap<u64, Window<D>>,
    tick: u64,
    stats: ReaderStats,
}

/// A foreign domain's memory, read through privcmd windows.
pub struct ForeignMemory<D: PrivcmdDevice + ?Sized = PrivcmdFile> {
    device: Arc<D>,
    domid: DomId,
    config: ReaderConfig,
    cache: RefCell<Cache<D>>,
}

impl ForeignMemory<PrivcmdFile> {
    /// Read `domid`'s memory through `/dev/xen/privcmd`.
    pub fn open(domid: DomId) -> Result<Self, Error> {
        Ok(Self::with_device(
            Arc::new(PrivcmdFile::open()?),
            domid,
            ReaderConfig::default(),
        ))
    }
}

impl<D: PrivcmdDevice + ?Sized> ForeignMemory<D> {
    /// Read `domid`'s memory through `device`.
    pub fn with_device(device: Arc<D>, domid: DomId, config: ReaderConfig) -> Self {
        let config = ReaderConfig {
            window_frames: config.window_frames.max(1),
            max_windows: config.max_windows.max(1),
        };
        ForeignMemory {
            device,
            domid,
            config,
            cache: RefCell::new(Cache {
                windows: HashMap::new(),
                tick: 0,
                stats: ReaderStats::default(),
            }),
        }
    }

    /// The domain read.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Counters.
    pub fn stats(&self) -> ReaderStats {
        self.cache.borrow().stats
    }

    /// Windows currently mapped.
    pub fn mapped_windows(&self) -> usize {
        self.cache.borrow().windows.len()
    }

    /// Unmap every window: the next reads see the domain's memory afresh,
    /// and nothing of it stays referenced (so a dying domain can go).
    pub fn invalidate(&self) {
        self.cache.borrow_mut().windows.clear();
    }

    /// Copy frame `gfn` into `buf`, mapping its window if needed. Errors are
    /// positive errno values: the frame's own error, or the failed call's.
    pub fn read_frame(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), i32> {
        let mut guard = self.cache.borrow_mut();
        let cache = &mut *guard;
        cache.tick += 1;
        cache.stats.reads += 1;
        let frames = self.config.window_frames as u64;
        let key = gfn.0 / frames;
        if let Some(w) = cache.windows.get_mut(&key) {
            w.last_use = cache.tick;
            cache.stats.hits += 1;
            let r = w.read(gfn.0, buf);
            if r.is_err() {
                // A failed frame may succeed later (paged back in, populated):
                // map its window afresh next time.
                cache.windows.remove(&key);
                cache.stats.errors += 1;
            }
            return r;
        }
        let first = key * frames;
        // A window past the last frame number (a gfn near u64::MAX with a
        // window size that does not divide 2^64) names no frame a domain
        // has: refused, as its last gfn would not fit in 64 bits.
        if first.checked_add(frames - 1).is_none() {
            cache.stats.errors += 1;
            return Err(libc::EINVAL);
        }
        if cache.windows.len() >= self.config.max_windows {
            if let Some(oldest) = cache
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_use)
                .map(|(k, _)| *k)
            {
                cache.windows.remove(&oldest);
                cache.stats.evictions += 1;
            }
        }
        let mut w = match Window::map(&self.device, self.domid, first, frames as usize) {
            Ok(w) => w,
            Err(e) => {
                cache.stats.errors += 1;
                return Err(e.raw_os_error().unwrap_or(libc::EIO));
            }
        };
        cache.stats.windows_mapped += 1;
        w.last_use = cache.tick;
        let r = w.read(gfn.0, buf);
        if r.is_err() {
            cache.stats.errors += 1;
        }
        // Keep a window whose other frames mapped: only this frame failed.
        if w.errs.contains(&0) {
            cache.windows.insert(key, w);
        }
        r
    }
}

impl<D: PrivcmdDevice + ?Sized> GuestTableReader for ForeignMemory<D> {
    fn read_page(&self, gfn: Gfn, buf: &mut [u64; 512]) -> Result<(), ShadowError> {
        self.read_frame(gfn, buf)
            .map_err(|errno| ShadowError::GuestRead { gfn, errno })
    }
    fn invalidate(&self) {
        ForeignMemory::invalidate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// A privcmd stand-in: windows are anonymous memory; frame g of the
    /// domain reads as entries `g << 32 | k`; chosen frames fail per frame,
    /// the whole ioctl or the reservation can be made to fail, and live
    /// windows are counted so a leak shows.
    #[derive(Default)]
    struct FakePrivcmd {
        domid: u16,
        /// Frames the domain has (others: -EINVAL per frame, as Xen's
        /// mmu_update refuses a frame the domain does not own).
        frames: u64,
        paged_out: HashSet<u64>,
        fail_ioctl: Option<i32>,
        fail_reserve: bool,
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        live: HashMap<usize, usize>,
        ioctls: u64,
        released_unknown: u64,
    }

    impl PrivcmdDevice for FakePrivcmd {
        fn reserve(&self, pages: usize) -> io::Result<NonNull<u8>> {
            if self.fail_reserve {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            // SAFETY: anonymous mapping, checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    pages * PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            self.state.lock().unwrap().live.insert(p as usize, pages);
            Ok(NonNull::new(p.cast()).unwrap())
        }

        fn map_frames(
            &self,
            domid: DomId,
            addr: NonNull<u8>,
            gfns: &[u64],
            errs: &mut [i32],
        ) -> io::Result<()> {
            let mut st = self.state.lock().unwrap();
            st.ioctls += 1;
            assert_eq!(st.live.get(&(addr.as_ptr() as usize)), Some(&gfns.len()));
            if let Some(e) = self.fail_ioctl {
                return Err(io::Error::from_raw_os_error(e));
            }
            let mut enoent = false;
            for (i, &g) in gfns.iter().enumerate() {
                errs[i] = if domid.0 != self.domid {
                    -libc::ESRCH
                } else if g >= self.frames {
                    -libc::EINVAL
                } else if self.paged_out.contains(&g) {
                    enoent = true;
                    -libc::ENOENT
                } else {
                    0
                };
                if errs[i] == 0 {
                    let page = unsafe { addr.as_ptr().add(i * PAGE_SIZE) as *mut u64 };
                    for k in 0..512 {
                        // SAFETY: inside the window this fake reserved.
                        unsafe { page.add(k).write((g << 32) | k as u64) };
                    }
                }
            }
            if enoent {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(())
        }

        fn release(&self, addr: NonNull<u8>, pages: usize) {
            let mut st = self.state.lock().unwrap();
            match st.live.remove(&(addr.as_ptr() as usize)) {
                Some(p) if p == pages => {}
                _ => st.released_unknown += 1,
            }
            // SAFETY: releasing what `reserve` mapped.
            unsafe { libc::munmap(addr.as_ptr().cast(), pages * PAGE_SIZE) };
        }
    }

    fn fake(frames: u64) -> Arc<FakePrivcmd> {
        Arc::new(FakePrivcmd {
            domid: 5,
            frames,
            ..Default::default()
        })
    }

    fn live(dev: &FakePrivcmd) -> usize {
        dev.state.lock().unwrap().live.len()
    }

    fn cfg(window_frames: usize, max_windows: usize) -> ReaderConfig {
        ReaderConfig {
            window_frames,
            max_windows,
        }
    }

    #[test]
    fn ioctl_number_matches_linux() {
        // _IOC(_IOC_NONE, 'P', 4, 32) as Linux's headers compute it.
        assert_eq!(std::mem::size_of::<PrivcmdMmapBatchV2>(), 32);
        assert_eq!(std::mem::offset_of!(PrivcmdMmapBatchV2, addr), 8);
        assert_eq!(std::mem::offset_of!(PrivcmdMmapBatchV2, err), 24);
        assert_eq!(IOCTL_PRIVCMD_MMAPBATCH_V2, 0x0020_5004);
    }

    #[test]
    fn reads_frames_and_reuses_windows() {
        let dev = fake(64);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(8, 4));
        let mut buf = [0u64; 512];
        m.read_page(Gfn(9), &mut buf).unwrap();
        assert_eq!(buf[3], (9 << 32) | 3);
        // Same window (frames 8..16): no new ioctl.
        m.read_page(Gfn(15), &mut buf).unwrap();
        assert_eq!(buf[511], (15 << 32) | 511);
        let s = m.stats();
        assert_eq!((s.reads, s.hits, s.windows_mapped), (2, 1, 1));
        assert_eq!(dev.state.lock().unwrap().ioctls, 1);
        assert_eq!(live(&dev), 1);
        drop(m);
        assert_eq!(live(&dev), 0, "dropping the reader unmaps its windows");
    }

    /// The last gfn with a window size that does not divide 2^64: its
    /// window would end past u64::MAX. An error, not an overflow (a debug
    /// build panicked computing the window's gfns; the gfn is the caller's,
    /// e.g. a shadow root from `pviommu_shadow_build`). A hostile-input
    /// audit of the guest side.
    #[test]
    fn the_last_gfn_with_an_odd_window_is_an_error_not_an_overflow() {
        let dev = fake(64);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(3, 4));
        let mut buf = [0u64; 512];
        assert_eq!(
            m.read_page(Gfn(u64::MAX), &mut buf),
            Err(ShadowError::GuestRead {
                gfn: Gfn(u64::MAX),
                errno: libc::EINVAL
            })
        );
        assert_eq!(live(&dev), 0, "nothing mapped");
        m.read_page(Gfn(4), &mut buf).unwrap();
    }

    #[test]
    fn cache_is_bounded_least_recently_used_goes() {
        let dev = fake(1024);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(4, 2));
        let mut buf = [0u64; 512];
        m.read_page(Gfn(0), &mut buf).unwrap(); // window 0
        m.read_page(Gfn(4), &mut buf).unwrap(); // window 1
        m.read_page(Gfn(1), &mut buf).unwrap(); // window 0 used again
        m.read_page(Gfn(8), &mut buf).unwrap(); // evicts window 1
        assert_eq!(m.mapped_windows(), 2);
        assert_eq!(live(&dev), 2);
        assert_eq!(m.stats().evictions, 1);
        m.read_page(Gfn(2), &mut buf).unwrap();
        assert_eq!(m.stats().windows_mapped, 3, "window 0 survived");
        m.invalidate();
        assert_eq!(live(&dev), 0);
        assert_eq!(dev.state.lock().unwrap().released_unknown, 0);
    }

    #[test]
    fn per_frame_errors_are_reported_and_retried() {
        // Frames 6 and 7 do not exist: a window 4..8 maps 4 and 5 only.
        let dev = fake(6);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(4, 8));
        let mut buf = [7u64; 512];
        let e = m.read_page(Gfn(7), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(7),
                errno: libc::EINVAL
            }
        );
        // The window stays for its good frames...
        m.read_page(Gfn(5), &mut buf).unwrap();
        assert_eq!(buf[0], 5 << 32);
        assert_eq!(m.stats().hits, 1);
        // ...and is dropped when a failed frame of it is read again, so the
        // next read maps afresh.
        assert!(m.read_page(Gfn(6), &mut buf).is_err());
        assert_eq!(m.mapped_windows(), 0);
        assert_eq!(live(&dev), 0);
        assert_eq!(m.stats().errors, 2);
    }

    #[test]
    fn paged_out_frame_enoent_keeps_other_frames() {
        let mut d = FakePrivcmd {
            domid: 5,
            frames: 16,
            ..Default::default()
        };
        d.paged_out.insert(2);
        let dev = Arc::new(d);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(4, 8));
        let mut buf = [0u64; 512];
        // The ioctl failed with ENOENT but per-frame results are valid.
        m.read_page(Gfn(1), &mut buf).unwrap();
        assert_eq!(buf[1], (1 << 32) | 1);
        let e = m.read_page(Gfn(2), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(2),
                errno: libc::ENOENT
            }
        );
    }

    #[test]
    fn failed_ioctl_or_reservation_leaks_nothing() {
        let dev = Arc::new(FakePrivcmd {
            domid: 5,
            frames: 16,
            fail_ioctl: Some(libc::EFAULT),
            ..Default::default()
        });
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(4, 8));
        let mut buf = [0u64; 512];
        let e = m.read_page(Gfn(1), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(1),
                errno: libc::EFAULT
            }
        );
        assert_eq!(live(&dev), 0, "the reserved window was released");
        assert_eq!(m.mapped_windows(), 0);

        let dev = Arc::new(FakePrivcmd {
            domid: 5,
            frames: 16,
            fail_reserve: true,
            ..Default::default()
        });
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(4, 8));
        let e = m.read_page(Gfn(1), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(1),
                errno: libc::ENOMEM
            }
        );
        assert_eq!(dev.state.lock().unwrap().ioctls, 0);
    }

    #[test]
    fn wrong_domain_fails_every_frame() {
        let dev = fake(16);
        let m = ForeignMemory::with_device(dev.clone(), DomId(77), cfg(4, 8));
        let mut buf = [0u64; 512];
        let e = m.read_page(Gfn(0), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(0),
                errno: libc::ESRCH
            }
        );
        // A window with no good frame is not kept.
        assert_eq!(live(&dev), 0);
    }

    #[test]
    fn huge_gfn_does_not_overflow() {
        let dev = fake(16);
        let m = ForeignMemory::with_device(dev.clone(), DomId(5), cfg(8, 8));
        let mut buf = [0u64; 512];
        assert!(m.read_page(Gfn(u64::MAX), &mut buf).is_err());
        assert_eq!(live(&dev), 0);
    }

    /// Up to the real ioctl: privcmd's calls against a file that is not
    /// privcmd fail cleanly (mmap of a regular empty file: the window is
    /// refused or the ioctl gives ENOTTY), never a crash or a leak.
    #[test]
    fn real_device_calls_fail_cleanly_off_xen() {
        let dir = std::env::temp_dir().join(format!("pviommu-gm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("privcmd");
        std::fs::write(&path, vec![0u8; 8 * PAGE_SIZE]).unwrap();
        let dev = Arc::new(PrivcmdFile::open_at(&path).unwrap());
        let m = ForeignMemory::with_device(dev, DomId(1), cfg(8, 8));
        let mut buf = [0u64; 512];
        let e = m.read_page(Gfn(3), &mut buf).unwrap_err();
        assert_eq!(
            e,
            ShadowError::GuestRead {
                gfn: Gfn(3),
                errno: libc::ENOTTY
            }
        );
        assert_eq!(m.mapped_windows(), 0);
        assert!(matches!(
            PrivcmdFile::open_at(Path::new("/nonexistent/privcmd")),
            Err(Error::NoXen(_))
        ));
    }
}
