//! C programs link the library (`libpviommu_guest.so`): one maps, reads,
//! looks up, hears of a revocation and unmaps through the embedded
//! simulator and checks the error strings; another shares one client
//! between threads, as the header allows; a third shadows a guest PPGTT
//! (the C shadow API); a fourth attaches a device to a context of its own
//! and checks each device reaches the buffer at its own BFN only.

use std::path::{Path, PathBuf};
use std::process::Command;

fn target_dir() -> PathBuf {
    // tests run from target/<profile>/deps/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn c_mediator_maps_and_unmaps_through_the_library() {
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
    // The library's soname is libpviommu_guest.so.1 (build.rs): a program
    // linked against it loads that name, which the install script creates;
    // here a private directory with the link stands in for it.
    let libdir = std::env::temp_dir().join(format!("pviommu-c-lib-{}", std::process::id()));
    std::fs::create_dir_all(&libdir).unwrap();
    let so1 = libdir.join("libpviommu_guest.so.1");
    let _ = std::fs::remove_file(&so1);
    std::os::unix::fs::symlink(&lib, &so1).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for program in ["map_unmap", "threads", "shadow", "contexts"] {
        let exe = std::env::temp_dir().join(format!("pviommu-c-{program}-{}", std::process::id()));
        let out = Command::new("cc")
            .arg("-std=c11")
            .arg("-Wall")
            .arg("-Werror")
            .arg("-pthread")
            .arg("-I")
            .arg(manifest.join("include"))
            .arg("-I")
            .arg(manifest.join("../abi/include"))
            .arg(manifest.join(format!("tests/c/{program}.c")))
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
            "compile {program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_file(&exe);
        assert!(
            run.status.success(),
            "C program {program} failed:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(String::from_utf8_lossy(&run.stdout).contains("OK"));
    }
    let _ = std::fs::remove_dir_all(&libdir);
}
