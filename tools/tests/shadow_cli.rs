//! `pviommu shadow`: reports a script can check, and clear refusals of bad
//! input (on the embedded simulator, whose guest d1 has a PPGTT at 0x10).

use std::io::Write;
use std::process::{Command, Stdio};

fn pviommu(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pviommu"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn build_reports_counts_and_translations() {
    let (ok, out, err) = pviommu(
        &[
            "shadow",
            "build",
            "--domid",
            "1",
            "--root",
            "0x10",
            "--gma",
            "0,0x5000000",
            "--json",
        ],
        "",
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["leaves_mapped"], 2645);
    // The texture's 2 MiB page: one 2 MiB shadow entry over one extent.
    assert_eq!(v["extents_mapped"], 1);
    assert!(v["translate"][0]["bfn"].as_u64().unwrap() >= 0x10_0000);
    assert!(v["translate"][1]["bfn"].is_null());
}

#[test]
fn watch_keeps_the_shadow_between_commands() {
    let (ok, out, err) = pviommu(
        &["shadow", "watch", "--domid", "1", "--root", "0x10"],
        "translate 0\nsync 0x13 0x999\nleaves\nrevocations\nnonsense\nquit\n",
    );
    assert!(ok, "{err}");
    let v = lines(&out);
    assert_eq!(v[0]["build"]["leaves_mapped"], 2645);
    let bfn = v[1]["translate"][0]["bfn"].as_u64().unwrap();
    assert_eq!(v[2]["sync"]["pages_read"], 1);
    assert_eq!(v[2]["sync"]["leaves_mapped"], 0);
    assert_eq!(v[2]["sync"]["ignored"][0], 0x999);
    assert_eq!(v[3]["leaves"].as_array().unwrap().len(), 2645);
    assert_eq!(v[3]["leaves"][0]["bfn"], bfn);
    assert_eq!(v[4]["revocations"]["notices"].as_array().unwrap().len(), 0);
    assert_eq!(v[5]["error"]["errno"], 22);
    assert_eq!(v[6]["teardown"]["leaves_unmapped"], 2645);
}

#[test]
fn bad_input_is_a_one_line_error() {
    for (args, want) in [
        (vec!["--domid", "0", "--root", "0x10"], "not a guest domain"),
        (
            vec!["--domid", "9", "--root", "0x10"],
            "cannot read the PPGTT root",
        ),
        (
            vec!["--domid", "1", "--root", "0x999999"],
            "cannot read the PPGTT root",
        ),
        (vec!["--domid", "1", "--root", "ten"], "not a number"),
    ] {
        let mut a = vec!["shadow", "build"];
        a.extend(args);
        let (ok, out, err) = pviommu(&a, "");
        assert!(!ok, "{a:?} succeeded: {out}");
        assert!(err.contains(want), "{a:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let (ok, _, err) = pviommu(
        &[
            "--backend",
            "remote",
            "--socket",
            "/nonexistent.sock",
            "shadow",
            "build",
            "--domid",
            "1",
            "--root",
            "0x10",
        ],
        "",
    );
    assert!(!ok && !err.contains("panicked"), "{err}");
}

#[test]
fn sync_waits_for_the_edit_trigger_then_syncs() {
    // Nothing edits the embedded guest: the sync finds no change, but it
    // re-reads exactly the named pages, and all of them without --changed.
    let (ok, out, err) = pviommu(
        &[
            "shadow",
            "sync",
            "--domid",
            "1",
            "--root",
            "0x10",
            "--changed",
            "0x13,0x14",
            "--json",
        ],
        "\n",
    );
    assert!(ok, "{err}");
    let v = lines(&out);
    assert_eq!(v[0]["leaves_mapped"], 2645);
    // 0x14 is not one of the guest's table pages: ignored, and said so.
    assert_eq!(v[1]["pages_read"], 1);
    assert_eq!(v[1]["ignored"][0], 0x14);
    assert_eq!(v[1]["leaves_mapped"], 0);
    let (ok, out, err) = pviommu(
        &["shadow", "sync", "--domid", "1", "--root", "0x10", "--json"],
        "",
    );
    assert!(ok, "{err}");
    // Every guest table page: PML4, PDP, PD and 7 PTs (the texture is a
    // 2 MiB page, which has none).
    assert_eq!(lines(&out)[1]["pages_read"], 10);
}
