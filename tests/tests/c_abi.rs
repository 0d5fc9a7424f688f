//! The C header and the Rust crate describe the same bytes: compile a C file
//! of `offsetof`/`sizeof` assertions generated from `pviommu_abi::LAYOUT`.

use std::path::Path;
use std::process::Command;

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
    // Constants shared by both sides.
    c += &format!(
        "_Static_assert(__HYPERVISOR_pv_iommu_op == {}, \"hypercall\");\n",
        pviommu_abi::HYPERVISOR_PV_IOMMU_OP
    );
    c += &format!(
        "_Static_assert(PVIOMMU_INTERFACE_VERSION == {}u, \"version\");\n",
        pviommu_abi::INTERFACE_VERSION
    );
    c += &format!(
        "_Static_assert(PVIOMMU_F_VALID_MASK == {}, \"flags\");\n",
        pviommu_abi::op_flags::VALID_MASK
    );
    c += &format!(
        "_Static_assert(PVIOMMU_VIRQ == {}, \"virq\");\n",
        pviommu_abi::VIRQ_PV_IOMMU
    );
    let dir = std::env::temp_dir().join(format!("pviommu-c-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    std::fs::write(&src, c).unwrap();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-c", "-o"])
        .arg(dir.join("layout.o"))
        .arg("-I")
        .arg(root.join("abi/include"))
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for the C ABI test");
    assert!(
        out.status.success(),
        "C layout assertions failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
