//! Waking up for revocations: Xen raises the driver domain's
//! `VIRQ_PV_IOMMU` whenever revocation notices become pending for it. A
//! mediator binds that VIRQ through Linux's `/dev/xen/evtchn`, waits on it
//! (or polls its file descriptor in its own event loop), and then calls
//! [`Client::drain_revocations`](crate::Client::drain_revocations).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use pviommu_abi::VIRQ_PV_IOMMU;

use crate::Error;

/// `struct ioctl_evtchn_bind_virq` (Linux `include/uapi/xen/evtchn.h`).
#[repr(C)]
struct BindVirq {
    virq: libc::c_uint,
}

/// `IOCTL_EVTCHN_BIND_VIRQ` = `_IOC(_IOC_NONE, 'E', 0, sizeof(struct
/// ioctl_evtchn_bind_virq))`.
pub const IOCTL_EVTCHN_BIND_VIRQ: libc::c_ulong =
    ((std::mem::size_of::<BindVirq>() as libc::c_ulong) << 16) | ((b'E' as libc::c_ulong) << 8);

/// `VIRQ_PV_IOMMU`, bound to an event channel of this process.
pub struct RevocationEvents {
    file: File,
    port: u32,
}

impl RevocationEvents {
    /// Bind `VIRQ_PV_IOMMU` through `/dev/xen/evtchn`.
    pub fn open() -> Result<Self, Error> {
        Self::open_at(Path::new("/dev/xen/evtchn"))
    }

    /// Bind it through the evtchn device at `path`.
    pub fn open_at(path: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Os {
                what: format!("open {}", path.display()),
                source,
            })?;
        let mut bind = BindVirq {
            virq: VIRQ_PV_IOMMU,
        };
        // SAFETY: a valid fd and a pointer to a live struct of the size the
        // ioctl number encodes.
        let port = unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_EVTCHN_BIND_VIRQ, &mut bind) };
        if port < 0 {
            return Err(Error::Os {
                what: "bind VIRQ_PV_IOMMU".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RevocationEvents {
            file,
            port: port as u32,
        })
    }

    /// The local event-channel port the VIRQ is bound to.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Wait up to `timeout` for a wake-up. `Ok(true)` when one arrived: the
    /// channel is unmasked again and revocations are pending.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, Error> {
        let mut fds = [libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        if n < 0 {
            return Err(Error::Os {
                what: "poll evtchn".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        if n == 0 {
            return Ok(false);
        }
        // Each pending port is one u32; reading them and writing them back
        // unmasks the channel for the next wake-up.
        let mut buf = [0u8; 64];
        let got = self.file.read(&mut buf).map_err(|source| Error::Os {
            what: "read evtchn".into(),
            source,
        })?;
        let whole = got - got % 4;
        self.file
            .write_all(&buf[..whole])
            .map_err(|source| Error::Os {
                what: "unmask evtchn".into(),
                source,
            })?;
        Ok(whole > 0)
    }
}

impl AsRawFd for RevocationEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_linux() {
        // _IOC(_IOC_NONE, 'E', 0, 4) as Linux's headers compute it.
        assert_eq!(IOCTL_EVTCHN_BIND_VIRQ, 0x0004_4500);
    }

    #[test]
    fn no_evtchn_device_is_a_clear_error() {
        let err = RevocationEvents::open_at(Path::new("/nonexistent/evtchn"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/evtchn"), "{err}");
    }
}
