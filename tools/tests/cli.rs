//! The `pviommu` binary: exit status, one-line reasons, JSON.

use std::process::Command;

fn pviommu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pviommu"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn caps_json_is_machine_readable() {
    let (ok, out, _) = pviommu(&["caps", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], pviommu_abi::INTERFACE_VERSION);
    assert!(v["bfn_window_start"].as_u64().unwrap() >= 0x10_0000);
}

#[test]
fn map_lookup_round_trip_on_the_embedded_simulator() {
    let (ok, out, err) = pviommu(&["map", "--domid", "1", "--gfn", "0x100..0x103", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    assert!(v[0]["bfn"].as_u64().is_some());
}

#[test]
fn the_toolstack_sets_a_quota() {
    let (ok, out, err) = pviommu(&["limits", "--domid", "1", "--quota", "5", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quota"], 5);
}

#[test]
fn bad_input_fails_with_one_line_reason() {
    for (args, needle) in [
        (
            &["map", "--domid", "1", "--gfn", "0x20..0x10"][..],
            "ends before it starts",
        ),
        (
            &["map", "--domid", "1", "--gfn", "zebra"][..],
            "not a number",
        ),
        (
            &["map", "--domid", "1", "--gfn", "0..0x200000"][..],
            "larger than",
        ),
        (&["map", "--domid", "77", "--gfn", "1"][..], "ESRCH"),
        (
            &["map", "--domid", "1", "--gfn", "1", "--caller", "2"][..],
            "EPERM",
        ),
        (&["unmap", "--bfn", "0x100000"][..], "ENOENT"),
        (&["limits", "--domid", "77", "--quota", "5"][..], "ESRCH"),
        (
            &["limits", "--domid", "1", "--quota", "99999999999"][..],
            "EINVAL",
        ),
        (&["lookup", "--bfn", "0x100000"][..], "ENOENT"),
        (
            &[
                "--backend",
                "remote",
                "--socket",
                "/nonexistent/sock",
                "caps",
            ][..],
            "/nonexistent/sock",
        ),
    ] {
        let (ok, _, err) = pviommu(args);
        assert!(!ok, "{args:?} must fail");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn xen_backend_without_xen_says_so() {
    if std::path::Path::new("/dev/xen/privcmd").exists() {
        return; // running in a real dom0
    }
    let (ok, _, err) = pviommu(&["--backend", "xen", "caps"]);
    assert!(!ok);
    assert!(err.contains("privcmd"), "{err}");
}

#[test]
fn demo_runs_and_reports() {
    let (ok, out, err) = pviommu(&["demo"]);
    assert!(ok, "{err}");
    assert!(out.contains("pages read correctly"));
    assert!(out.contains("page references held now: 0"));
}

#[test]
fn help_lists_every_subcommand() {
    let (ok, out, _) = pviommu(&["--help"]);
    assert!(ok);
    for sub in [
        "caps", "map", "unmap", "lookup", "list", "regions", "shadow", "sim", "demo",
    ] {
        assert!(out.contains(sub), "{sub} missing from help");
    }
}
