//! The permission matrix: caller kind x page type x requested access, with
//! the expected status for every cell; a refused map changes nothing.

use pviommu_abi::{DomId, Gfn, Permissions};
use pviommu_hv::sim::{Format, SimMachine};
use pviommu_tests::*;

#[derive(Clone, Copy, Debug)]
enum PageType {
    RamRw,
    RamRo,
    Grant,
    Mmio,
    NotPresent,
    PagedOut,
    XenOwned,
}

const GFN: u64 = 9;

fn prepare(m: &mut SimMachine, t: PageType) {
    match t {
        PageType::RamRw => {}
        PageType::RamRo => m.set_read_only(GUEST, Gfn(GFN)),
        PageType::Grant => m.set_grant(GUEST, Gfn(GFN)),
        PageType::Mmio => m.set_mmio(GUEST, Gfn(GFN)),
        PageType::NotPresent => {
            m.remove_gfn(GUEST, Gfn(GFN));
        }
        PageType::PagedOut => m.set_paged_out(GUEST, Gfn(GFN)),
        PageType::XenOwned => m.set_xen_owned(GUEST, Gfn(GFN)),
    }
}

const OK: i32 = 0;
const EPERM: i32 = -1;
const ENXIO: i32 = -6;
const EAGAIN: i32 = -11;
const EACCES: i32 = -13;
const EXDEV: i32 = -18;
const ENODEV: i32 = -19;

#[test]
fn every_cell() {
    use PageType::*;
    let callers = [
        ("dom0", DomId::DOM0),
        ("device model", DEVICE_MODEL),
        ("stranger", STRANGER),
    ];
    let pages = [RamRw, RamRo, Grant, Mmio, NotPresent, PagedOut, XenOwned];
    let perms = [
        ("ro", Permissions::RO),
        ("rw", Permissions::RW),
        (
            "wo",
            Permissions {
                read: false,
                write: true,
            },
        ),
    ];
    // Expected status for an allowed caller, per page type and access.
    let allowed = |p: PageType, write: bool| match (p, write) {
        (RamRw, _) => OK,
        (RamRo, false) => OK,
        (RamRo, true) => EACCES,
        (Grant, _) | (XenOwned, _) => EXDEV,
        (Mmio, _) => ENODEV,
        (NotPresent, _) => ENXIO,
        (PagedOut, _) => EAGAIN,
    };
    let mut cells = 0;
    for (cname, caller) in callers {
        for page in pages {
            for (pname, perm) in perms {
                let (mut m, e) = machine(Format::Vtd, 32);
                prepare(&mut m, page);
                let expected = if caller == STRANGER {
                    EPERM
                } else {
                    allowed(page, perm.write)
                };
                let before = observable(&m, &e);
                let got = match map_one(&mut m, &e, caller, GUEST, GFN, perm) {
                    Ok(_) => OK,
                    Err(s) => s,
                };
                assert_eq!(
                    got, expected,
                    "caller {cname}, page {page:?}, access {pname}"
                );
                if expected != OK && !matches!(page, PagedOut) {
                    assert_eq!(
                        observable(&m, &e),
                        before,
                        "refused map changed state: {cname} {page:?} {pname}"
                    );
                }
                if matches!(page, PagedOut) {
                    // The lookup started paging the frame in (the target's
                    // business, as in Xen); the engine took nothing.
                    assert_eq!(m.total_page_refs(), 0);
                    assert!(e.state().live_mappings(caller).next().is_none());
                }
                cells += 1;
            }
        }
    }
    assert_eq!(cells, 3 * 7 * 3);
}

#[test]
fn unknown_domain_is_esrch_and_self_map_is_einval() {
    let (mut m, e) = machine(Format::Vtd, 8);
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, DomId(77), 0, Permissions::RO),
        Err(-3)
    );
    assert_eq!(
        map_one(&mut m, &e, DomId::DOM0, DomId::DOM0, 0, Permissions::RO),
        Err(-22)
    );
}

/// A policy label that keeps every other domain from a domain's pages
/// (`xsm_protect`) does not keep the domain from its own: a protected dom0
/// still maps its own buffers into a context of its own, while a protected
/// guest's pages are refused to dom0 and to its device model, which may
/// map them otherwise. (Review 160 found a mutant of the simulator's XSM
/// rule, refusing a protected domain acting on itself, that no test
/// killed.)
#[test]
fn a_protected_domain_maps_its_own_pages_and_no_other_domain_does() {
    let (mut m, e) = machine(Format::Vtd, 8);
    m.xsm_protect(DomId::DOM0);
    let context = e.context_create(&mut m, DomId::DOM0).expect("context");
    let mut own = [map_op_in(context, DomId::DOM0, 3, Permissions::RW)];
    m.guest_batch_all(&e, DomId::DOM0, &mut own).unwrap();
    assert_eq!(own[0].status, OK, "dom0's own page, in its own context");
    m.xsm_protect(GUEST);
    let before = observable(&m, &e);
    for caller in [DomId::DOM0, DEVICE_MODEL] {
        assert_eq!(
            map_one(&mut m, &e, caller, GUEST, 3, Permissions::RO),
            Err(EPERM),
            "{caller:?} on the protected guest's page"
        );
    }
    assert_eq!(observable(&m, &e), before, "the refusals changed nothing");
}
