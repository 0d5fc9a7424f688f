//! Shared fixtures for the end-to-end tests in `tests/tests/`.

use pviommu_abi::{
    Bfn, ContextId, DomId, Gfn, MapRequest, MemAttr, Permissions, PvIommuOp, Request,
};
use pviommu_hv::config::Config;
use pviommu_hv::engine::Slot;
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;

/// The foreign guest used by most tests.
pub const GUEST: DomId = DomId(1);
/// An unprivileged domain that is nobody's device model.
pub const STRANGER: DomId = DomId(2);
/// The device model of [`GUEST`].
pub const DEVICE_MODEL: DomId = DomId(3);

/// A machine with dom0 (64 pages), a guest of `guest_pages` whose page g
/// starts with the bytes "gfn g", a stranger and a device model.
pub fn machine(format: Format, guest_pages: u64) -> (SimMachine, Engine) {
    let mut m = SimMachine::new(4096 + guest_pages, format, 64);
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
    Request::Map(MapRequest {
        context,
        domid,
        gfn: Gfn(gfn),
        perms,
        attr: MemAttr::WriteBack,
        grant: false,
    })
    .encode()
}

/// An unmap op.
pub fn unmap_op(bfn: Bfn) -> PvIommuOp {
    Request::Unmap {
        context: ContextId::DEFAULT,
        bfn,
    }
    .encode()
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
