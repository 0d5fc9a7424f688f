//! `pviommu host-windows`: the PCI host bridges' memory windows against the
//! hypervisor's BFN window.
//!
//! A host bridge's memory windows are where the driver domain's kernel
//! places every BAR of the devices below it: those it finds at boot, and
//! those that come later (a hot-plugged device, SR-IOV virtual functions, a
//! BAR the kernel moves). Only the ACPI namespace (`_CRS`) describes them,
//! and Xen does not read it; Linux does, and lists them in /proc/iomem as
//! top-level `PCI Bus <segment>:<bus>` entries. Xen reserves the BARs it
//! sees at boot, not the windows, so a device placed in a window later can
//! take addresses the hypervisor hands out as BFNs, and a DMA to such a BFN
//! reaches that device, not the page. This command lists the windows that
//! overlap the BFN window outside every reserved region, and the Xen
//! command-line option that reserves them (`pviommu=reserve=<first>-<last>`,
//! bytes, both ends included, as /proc/iomem prints them).

use pviommu_abi::PvIommuRegion;

/// One host bridge's memory window, in bytes (both ends included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostWindow {
    /// First byte.
    pub first: u64,
    /// Last byte.
    pub last: u64,
    /// Its /proc/iomem name (`PCI Bus 0000:00`).
    pub name: String,
}

/// The most `reserve=` items Xen's `pviommu=` option takes
/// (`PVX_MAX_OPT_RESERVE` in the glue).
pub const MAX_RESERVE_ITEMS: usize = 8;

/// The host bridges' memory windows in /proc/iomem's `text`: its top-level
/// entries named `PCI Bus ...` (below them, indented, are the devices and
/// bridges inside). A line that names a window but whose range does not
/// parse is an error, never skipped (a window missed is a check passed
/// wrongly), as is a file whose every address reads 0 (Linux hides them
/// from a reader without CAP_SYS_ADMIN).
pub fn parse_iomem(text: &str) -> Result<Vec<HostWindow>, String> {
    let mut windows = Vec::new();
    let (mut entries, mut hidden) = (0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        if line.starts_with(char::is_whitespace) || line.is_empty() {
            continue;
        }
        let Some((range, name)) = line.split_once(" : ") else {
            continue;
        };
        let bounds = range.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a.trim(), 16).ok()?,
                u64::from_str_radix(b.trim(), 16).ok()?,
            ))
        });
        let is_window = name.starts_with("PCI Bus ");
        let Some((first, last)) = bounds.filter(|(a, b)| a <= b) else {
            if is_window {
                return Err(format!(
                    "line {}: `{line}`: not a range of hexadecimal addresses",
                    n + 1
                ));
            }
            continue;
        };
        entries += 1;
        hidden += usize::from(first == 0 && last == 0);
        if is_window {
            windows.push(HostWindow {
                first,
                last,
                name: name.trim().to_string(),
            });
        }
    }
    if entries > 0 && hidden == entries {
        return Err(
            "every address in it reads 0: the kernel hides them from this user (run as root)"
                .into(),
        );
    }
    Ok(windows)
}

/// The BFNs of `w` (whole frames it touches) inside the BFN window
/// `[window_start, window_end)` that no reserved region covers, as
/// `[start, end)` runs, in order.
pub fn unreserved_bfns(
    w: &HostWindow,
    window_start: u64,
    window_end: u64,
    regions: &[PvIommuRegion],
) -> Vec<(u64, u64)> {
    let lo = (w.first >> 12).max(window_start);
    let hi = (w.last >> 12).saturating_add(1).min(window_end);
    if lo >= hi {
        return Vec::new();
    }
    let mut covered: Vec<(u64, u64)> = regions
        .iter()
        .filter(|r| r.nr_frames != 0)
        .map(|r| (r.start_bfn, r.start_bfn.saturating_add(r.nr_frames)))
        .collect();
    covered.sort_unstable();
    let mut out = Vec::new();
    let mut at = lo;
    for (s, e) in covered {
        if e <= at {
            continue;
        }
        if s >= hi {
            break;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
        if at >= hi {
            break;
        }
    }
    if at < hi {
        out.push((at, hi));
    }
    out
}

/// The Xen command-line options that reserve `windows` whole: one
/// `pviommu=reserve=` option a window, space-separated (Xen cuts each
/// option at 127 characters, which a list of items could pass; the items
/// of repeated `pviommu=` options add up).
pub fn option_for(windows: &[&HostWindow]) -> String {
    let options: Vec<String> = windows
        .iter()
        .map(|w| format!("pviommu=reserve={:#x}-{:#x}", w.first, w.last))
        .collect();
    options.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_Q35: &str = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000bffff : PCI Bus 0000:00
80000000-afffffff : PCI Bus 0000:00
  80000000-8fffffff : 0000:00:01.0
c0000000-febfffff : PCI Bus 0000:00
  fd000000-fdffffff : 0000:00:01.0
fee00000-fee00fff : Local APIC
100000000-8ffffffff : PCI Bus 0000:00
  800000000-8000fffff : 0000:00:03.0
";

    fn region(start_bfn: u64, nr_frames: u64) -> PvIommuRegion {
        PvIommuRegion {
            start_bfn,
            nr_frames,
            kind: pviommu_abi::region_kind::MMIO,
            ..Default::default()
        }
    }

    #[test]
    fn the_top_level_pci_bus_entries_are_the_windows() {
        let w = parse_iomem(QEMU_Q35).unwrap();
        let ranges: Vec<(u64, u64)> = w.iter().map(|w| (w.first, w.last)).collect();
        assert_eq!(
            ranges,
            [
                (0xa0000, 0xbffff),
                (0x8000_0000, 0xafff_ffff),
                (0xc000_0000, 0xfebf_ffff),
                (0x1_0000_0000, 0x8_ffff_ffff)
            ]
        );
        assert!(w.iter().all(|w| w.name == "PCI Bus 0000:00"));
    }

    #[test]
    fn hidden_addresses_and_broken_window_lines_are_errors() {
        let hidden = "00000000-00000000 : Reserved\n00000000-00000000 : PCI Bus 0000:00\n";
        assert!(parse_iomem(hidden).unwrap_err().contains("run as root"));
        let broken = "100000000-8fffffffz : PCI Bus 0000:00\n";
        assert!(parse_iomem(broken).unwrap_err().contains("line 1"));
        let reversed = "8ffffffff-100000000 : PCI Bus 0000:00\n";
        assert!(parse_iomem(reversed).is_err());
        // Other lines that do not parse are no windows: skipped.
        assert_eq!(parse_iomem("junk\nzz-yy : Reserved\n").unwrap(), []);
        assert_eq!(parse_iomem("").unwrap(), []);
    }

    #[test]
    fn what_is_left_of_a_window_inside_the_bfn_window() {
        let w = &parse_iomem(QEMU_Q35).unwrap()[3];
        // The CI's QEMU host: RAM ends below 4 GiB, the window starts there.
        let (start, end) = (0x10_0000, 1 << 27);
        assert_eq!(
            unreserved_bfns(w, start, end, &[]),
            [(0x10_0000, 0x90_0000)]
        );
        // Reserved whole (pviommu=reserve=0x100000000-0x8ffffffff): nothing.
        assert_eq!(
            unreserved_bfns(w, start, end, &[region(0x10_0000, 0x80_0000)]),
            []
        );
        // Partly, by two regions in any order, one reaching past the window.
        assert_eq!(
            unreserved_bfns(
                w,
                start,
                end,
                &[region(0x80_0000, 0x20_0000), region(0x20_0000, 0x10_0000)]
            ),
            [(0x10_0000, 0x20_0000), (0x30_0000, 0x80_0000)]
        );
        // A window below the BFN window (RAM ends above it), or above it.
        assert_eq!(unreserved_bfns(w, 0x100_0000, 0x200_0000, &[]), []);
        assert_eq!(unreserved_bfns(w, 0, 0x10_0000, &[]), []);
        // The low windows never reach a BFN window above 4 GiB.
        let low = &parse_iomem(QEMU_Q35).unwrap()[2];
        assert_eq!(unreserved_bfns(low, start, end, &[]), []);
        let top = HostWindow {
            first: 0,
            last: u64::MAX,
            name: "PCI Bus 0000:00".into(),
        };
        assert_eq!(unreserved_bfns(&top, 5, 9, &[]), [(5, 9)]);
    }

    #[test]
    fn the_option_names_each_window_as_iomem_does() {
        let w = parse_iomem(QEMU_Q35).unwrap();
        assert_eq!(
            option_for(&[&w[3]]),
            "pviommu=reserve=0x100000000-0x8ffffffff"
        );
        assert_eq!(
            option_for(&[&w[1], &w[3]]),
            "pviommu=reserve=0x80000000-0xafffffff pviommu=reserve=0x100000000-0x8ffffffff"
        );
        // Each option fits Xen's 127 characters, whatever the addresses.
        let widest = HostWindow {
            first: 0xf_ffff_ffff_f000,
            last: 0xf_ffff_ffff_ffff,
            name: "PCI Bus ffff:ff".into(),
        };
        assert!(option_for(&[&widest]).len() < 128);
    }
}
