//! The C headers and the Rust crate describe the same bytes and numbers:
//! compile C files of `offsetof`/`sizeof` assertions generated from
//! `pviommu_abi::LAYOUT`, and of an assertion for every constant the
//! guests' header and Xen's public header define.

use std::path::Path;
use std::process::Command;

use pviommu_abi::*;

#[test]
fn c_header_matches_rust_layout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut c = String::from("#include <stddef.h>\n#include \"pviommu.h\"\n");
    for (s, field, value) in pviommu_abi::LAYOUT {
        if field.is_empty() {
            c += &format!("_Static_assert(sizeof(struct {s}) == {value}, \"size of {s}\");\n");
        } else {
            c += &format!(
                "_Static_assert(offsetof(struct {s}, {field}) == {value}, \"{s}.{field}\");\n"
            );
        }
    }
    c += &format!(
        "_Static_assert(__HYPERVISOR_pv_iommu_op == {}, \"hypercall\");\n",
        pviommu_abi::HYPERVISOR_PV_IOMMU_OP
    );
    let header = root.join("abi/include/pviommu.h");
    c += &constant_asserts(&header, &[("PVIOMMU_VIRQ", VIRQ_PV_IOMMU.into())]);
    compile(&c, &root.join("abi/include"), "layout");
}

/// Xen's public header cannot be compiled outside Xen's tree (it needs
/// Xen's types), so its `#define PVIOMMU_*` lines are compiled on their
/// own, with the same assertions.
#[test]
fn xens_public_header_has_the_crates_constants() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let header = root.join("hypervisor-side/xen/public/pv-iommu.h");
    let mut c: String = defines(&header)
        .into_iter()
        .map(|(_, line)| line + "\n")
        .collect();
    c += &constant_asserts(&header, &[]);
    compile(&c, root, "xen-constants");
}

/// Compile `c` (as `name.c`, with `include` on the include path); fail
/// with the compiler's messages.
fn compile(c: &str, include: &Path, name: &str) {
    let dir = std::env::temp_dir().join(format!("pviommu-c-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, c).unwrap();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-c", "-o"])
        .arg(dir.join(format!("{name}.o")))
        .arg("-I")
        .arg(include)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for the C ABI test");
    assert!(
        out.status.success(),
        "C ABI assertions failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `#define PVIOMMU_*` lines of `header` (continuation lines joined),
/// by name.
fn defines(header: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(header).unwrap();
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("#define ")?;
            let name = rest.split_whitespace().next()?;
            (name.starts_with("PVIOMMU_") && !name.contains('(') && rest.trim() != name)
                .then(|| (name.to_string(), line.to_string()))
        })
        .collect()
}

/// An assertion for every constant of [`expected`] and `extra`, and a
/// refusal of any `PVIOMMU_*` constant of `header` this test does not know.
fn constant_asserts(header: &Path, extra: &[(&str, u64)]) -> String {
    let want: Vec<(&str, u64)> = expected()
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    for (name, _) in defines(header) {
        assert!(
            want.iter().any(|(n, _)| *n == name),
            "{}: {name} has no Rust counterpart checked here",
            header.display()
        );
    }
    want.iter()
        .map(|(name, value)| format!("_Static_assert(({name}) == {value}ull, \"{name}\");\n"))
        .collect()
}

/// Every constant both headers define, with this crate's value.
fn expected() -> Vec<(&'static str, u64)> {
    vec![
        ("PVIOMMU_INTERFACE_VERSION", INTERFACE_VERSION.into()),
        ("PVIOMMU_CMD_query_caps", cmd::QUERY_CAPS.into()),
        ("PVIOMMU_CMD_batch", cmd::BATCH.into()),
        ("PVIOMMU_CMD_reserved_regions", cmd::RESERVED_REGIONS.into()),
        ("PVIOMMU_CMD_set_limits", cmd::SET_LIMITS.into()),
        ("PVIOMMU_CMD_stats", cmd::STATS.into()),
        ("PVIOMMU_CMD_entry", cmd::ENTRY.into()),
        (
            "PVIOMMU_CMD_RESERVED_FOR_CONTINUATIONS",
            cmd::RESERVED_FOR_CONTINUATIONS.into(),
        ),
        ("PVIOMMU_BATCH_INCOMPLETE", BATCH_INCOMPLETE as u64),
        ("PVIOMMU_FEAT_CONTEXTS", feature::CONTEXTS.into()),
        ("PVIOMMU_FEAT_ATTR_UC", feature::ATTR_UC.into()),
        ("PVIOMMU_FEAT_ATTR_DEVICE", feature::ATTR_DEVICE.into()),
        ("PVIOMMU_FEAT_GRANT", feature::GRANT.into()),
        (
            "PVIOMMU_FEAT_REVOCATION_QUEUE",
            feature::REVOCATION_QUEUE.into(),
        ),
        ("PVIOMMU_FEAT_DEVICE_ATTACH", feature::DEVICE_ATTACH.into()),
        (
            "PVIOMMU_FEAT_REVOKED_IN_CONTEXT",
            feature::REVOKED_IN_CONTEXT.into(),
        ),
        (
            "PVIOMMU_FEAT_REVOKED_NUMBERED",
            feature::REVOKED_NUMBERED.into(),
        ),
        ("PVIOMMU_FEAT_EXTENTS_2M", feature::EXTENTS_2M.into()),
        ("PVIOMMU_FEAT_ALL", feature::ALL.into()),
        ("PVIOMMU_TRANSLATES", translation::TRANSLATES.into()),
        ("PVIOMMU_NO_IOMMU", translation::NO_IOMMU.into()),
        ("PVIOMMU_PASSTHROUGH", translation::PASSTHROUGH.into()),
        ("PVIOMMU_RELAXED", translation::RELAXED.into()),
        ("PVIOMMU_SHARED_PT", translation::SHARED_PT.into()),
        ("PVIOMMU_MIRRORS_P2M", translation::MIRRORS_P2M.into()),
        ("PVIOMMU_OP_map", subop::MAP.into()),
        ("PVIOMMU_OP_unmap", subop::UNMAP.into()),
        ("PVIOMMU_OP_lookup", subop::LOOKUP.into()),
        ("PVIOMMU_OP_context_create", subop::CONTEXT_CREATE.into()),
        ("PVIOMMU_OP_context_destroy", subop::CONTEXT_DESTROY.into()),
        ("PVIOMMU_OP_revoked_next", subop::REVOKED_NEXT.into()),
        ("PVIOMMU_OP_revoked_ack", subop::REVOKED_ACK.into()),
        ("PVIOMMU_OP_context_attach", subop::CONTEXT_ATTACH.into()),
        ("PVIOMMU_OP_context_detach", subop::CONTEXT_DETACH.into()),
        (
            "PVIOMMU_REVOKED_IN_CONTEXT",
            revoked_next::IN_CONTEXT.into(),
        ),
        ("PVIOMMU_REVOKED_MAX_SKIP", revoked_next::MAX_SKIP),
        ("PVIOMMU_REVOKED_NUMBERED", revoked_next::NUMBERED.into()),
        ("PVIOMMU_F_READ", op_flags::READ.into()),
        ("PVIOMMU_F_WRITE", op_flags::WRITE.into()),
        ("PVIOMMU_F_GRANT", op_flags::GRANT.into()),
        ("PVIOMMU_ATTR_SHIFT", op_flags::ATTR_SHIFT.into()),
        ("PVIOMMU_ATTR_MASK", op_flags::ATTR_MASK.into()),
        ("PVIOMMU_F_VALID_MASK", op_flags::VALID_MASK.into()),
        ("PVIOMMU_F_EXTENT_2M", op_flags::EXTENT_2M.into()),
        ("PVIOMMU_EXTENT_PAGES", pviommu_abi::EXTENT_PAGES),
        ("PVIOMMU_ATTR_WB", MemAttr::WriteBack.field().into()),
        ("PVIOMMU_ATTR_UC", MemAttr::Uncached.field().into()),
        ("PVIOMMU_ATTR_DEVICE", MemAttr::Device.field().into()),
        ("PVIOMMU_REGION_MSI", region_kind::MSI.into()),
        ("PVIOMMU_REGION_RMRR", region_kind::RMRR.into()),
        ("PVIOMMU_REGION_MMIO", region_kind::MMIO.into()),
        ("PVIOMMU_REGION_PLATFORM", region_kind::PLATFORM.into()),
        ("PVIOMMU_STATS_RESET", stats_flag::RESET.into()),
        ("PVIOMMU_STATS_TIMING_ON", stats_flag::TIMING_ON.into()),
        ("PVIOMMU_STATS_TIMING_OFF", stats_flag::TIMING_OFF.into()),
        (
            "PVIOMMU_ENTRY_VTD_SECOND_LEVEL",
            entry_format::VTD_SECOND_LEVEL.into(),
        ),
        (
            "PVIOMMU_ENTRY_ARM_LPAE_STAGE2",
            entry_format::ARM_LPAE_STAGE2.into(),
        ),
    ]
}
