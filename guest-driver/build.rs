//! Gives the C library (`libpviommu_guest.so`) its soname,
//! `libpviommu_guest.so.<major>`, with the major version of the C
//! interface taken from `include/pviommu_guest.h` (one place says it). A C
//! program linked against it records that soname, so an incompatible
//! library (a new major) is never picked up by an old program.

use std::fs;

fn main() {
    let header = "include/pviommu_guest.h";
    println!("cargo:rerun-if-changed={header}");
    let text = fs::read_to_string(header).expect("read include/pviommu_guest.h");
    let major = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("#define PVIOMMU_GUEST_VERSION_MAJOR"))
        .map(str::trim)
        .expect("pviommu_guest.h defines PVIOMMU_GUEST_VERSION_MAJOR");
    assert!(
        major.parse::<u32>().is_ok(),
        "PVIOMMU_GUEST_VERSION_MAJOR is not a number: {major}"
    );
    // Only the cdylib gets it: the rlib and staticlib have no soname.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpviommu_guest.so.{major}");
}
