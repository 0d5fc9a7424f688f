//! A C program links the library (`libpviommu_guest.so`) and shadows a
//! guest PPGTT through the embedded simulator (guest-driver/tests/c/shadow.c).

use std::path::{Path, PathBuf};
use std::process::Command;

fn target_dir() -> PathBuf {
    // tests run from target/<profile>/deps/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn c_mediator_shadows_a_ppgtt_through_the_library() {
    let dir = target_dir();
    // Make sure target/<profile>/libpviommu_guest.so is this feature set's
    // build (another build of the package may have replaced it).
    let profile_release = dir.ends_with("release");
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-q", "-p", "pviommu-guest", "--lib"]);
    if profile_release {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "cargo build of the library"
    );
    let lib = dir.join("libpviommu_guest.so");
    assert!(lib.exists(), "{} not built", lib.display());
    // A program loads the soname, libpviommu_guest.so.1 (build.rs), which
    // the install script creates; a private directory with the link stands
    // in for it here.
    let libdir = std::env::temp_dir().join(format!("pviommu-c-shadow-lib-{}", std::process::id()));
    std::fs::create_dir_all(&libdir).unwrap();
    let so1 = libdir.join("libpviommu_guest.so.1");
    let _ = std::fs::remove_file(&so1);
    std::os::unix::fs::symlink(&lib, &so1).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::temp_dir().join(format!("pviommu-c-shadow-{}", std::process::id()));
    let out = Command::new("cc")
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(manifest.join("include"))
        .arg("-I")
        .arg(manifest.join("../abi/include"))
        .arg(manifest.join("tests/c/shadow.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&dir)
        .arg("-lpviommu_guest")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .output()
        .expect("cc");
    assert!(
        out.status.success(),
        "compile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(
        run.status.success(),
        "C program failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("OK"));
}
