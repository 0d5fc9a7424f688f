//! The `pviommu` binary as scripts and people use it: exit status, one-line
//! reasons, the JSON schema of design/cli.md for every command, the
//! simulator's state between invocations, completions, the manual page and
//! progress output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// One test's own simulator state (tests run in parallel).
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("sim-state")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pviommu"));
        c.args(args)
            .env("PVIOMMU_SIM_STATE", self.state())
            .env_remove("XDG_RUNTIME_DIR");
        c
    }
    /// (success, stdout, stderr)
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
    /// Run with `--json`, expect success, parse stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let (ok, out, err) = self.run(&a);
        assert!(ok, "{args:?} failed: {out} {err}");
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        assert_no_padding(&v, &format!("{args:?}"));
        v
    }
    /// Run with `--json`, expect failure, return the error object.
    fn json_err(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let (ok, out, err) = self.run(&a);
        assert!(!ok, "{args:?} must fail: {out}");
        assert!(err.is_empty() || !err.contains('{'), "{args:?}: {err}");
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        let e = v["error"].clone();
        assert!(e["errno"].as_str().unwrap().starts_with('E'), "{v}");
        assert!(e["code"].as_i64().unwrap() > 0, "{v}");
        assert!(!e["message"].as_str().unwrap().is_empty(), "{v}");
        e
    }
}

/// No key of the ABI's padding or reserved fields leaks into JSON.
fn assert_no_padding(v: &Value, what: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                assert!(
                    !k.starts_with('_') && !k.contains("pad") && !k.contains("rsvd"),
                    "{what}: field {k}"
                );
                assert_no_padding(x, what);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_no_padding(x, what)),
        _ => {}
    }
}

fn bfns_of(map: &Value) -> Vec<u64> {
    map["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["bfn"].as_u64().unwrap())
        .collect()
}

#[test]
fn caps_json_names_everything() {
    let env = Env::new();
    let v = env.json(&["caps"]);
    let major = pviommu_abi::INTERFACE_VERSION >> 16;
    let minor = pviommu_abi::INTERFACE_VERSION & 0xffff;
    assert_eq!(v["version"], format!("{major}.{minor}"));
    assert_eq!(v["page_sizes"], serde_json::json!([4096]));
    assert!(v["bfn_window"]["start"].as_u64().unwrap() >= 0x10_0000);
    assert!(v["bfn_window"]["end"].as_u64().unwrap() > v["bfn_window"]["start"].as_u64().unwrap());
    for name in ["revocation-queue", "revoked-in-context"] {
        assert!(v["features"]
            .as_array()
            .unwrap()
            .contains(&Value::from(name)));
    }
    assert_eq!(v["unknown_features"], 0);
    assert_eq!(v["translation"], "translates");
    assert_eq!(v["used"], 0);
    assert_eq!(v["revoked"], 0);
}

#[test]
fn every_command_has_json_and_state_survives_between_invocations() {
    let env = Env::new();
    let map = env.json(&["map", "--domid", "1", "--gfn", "0x100..0x103"]);
    assert_eq!(map["domid"], 1);
    assert_eq!(map["access"], "rw");
    let bfns = bfns_of(&map);
    assert_eq!(bfns.len(), 4);
    assert_eq!(map["mappings"][2]["gfn"], 0x102);

    // A second process sees the first one's mapping, as on Xen.
    let l = env.json(&["lookup", "--bfn", &bfns[2].to_string()]);
    assert_eq!(l["domid"], 1);
    assert_eq!(l["gfn"], 0x102);
    assert_eq!(l["access"], "rw");
    assert_eq!(l["attribute"], "write-back");
    assert_eq!(l["context"], 0);

    let ro = env.json(&["map", "--domid", "1", "--gfn", "0x200", "--read-only"]);
    assert_eq!(ro["access"], "r-");

    let list = env.json(&["list"]);
    assert_eq!(list["mappings"].as_array().unwrap().len(), 5);
    assert!(list["scanned"]["count"].as_u64().unwrap() > 0);

    let stats = env.json(&["stats"]);
    assert_eq!(stats["used"], 5);
    assert_eq!(stats["live"], 5);
    assert_eq!(stats["revocations_pending"], 0);
    assert_eq!(
        stats["quota"].as_u64().unwrap() - 5,
        stats["free"].as_u64().unwrap()
    );
    assert_eq!(
        stats["mappings"],
        serde_json::json!([{ "domid": 1, "context": 0, "mappings": 5, "writable": 4 }])
    );
    assert_eq!(stats["scan"]["complete"], true);

    let regions = env.json(&["regions"]);
    let kinds: Vec<&str> = regions["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(!kinds.is_empty());
    assert!(
        kinds
            .iter()
            .all(|k| ["msi", "rmrr", "mmio", "platform"].contains(k)),
        "{kinds:?}"
    );

    // The guest balloons a mapped page out: a pending revocation, counted
    // by stats, then received and acknowledged.
    let b = env.json(&["sim", "balloon-out", "--domid", "1", "--gfn", "0x101"]);
    assert_eq!(b["ballooned_out"]["gfn"], 0x101);
    let stats = env.json(&["stats"]);
    assert_eq!(stats["revocations_pending"], 1);
    assert_eq!(stats["live"], 4);
    // One context's notices only: context 0's stays queued for its owner.
    assert_eq!(
        env.json(&["revocations", "--context", "1"])["revocations"],
        serde_json::json!([])
    );
    assert_eq!(env.json(&["stats"])["revocations_pending"], 1);
    let revs = env.json(&["revocations"]);
    assert_eq!(
        revs["revocations"],
        serde_json::json!([{ "bfn": bfns[1], "context": 0, "domid": 1, "gfn": 0x101 }])
    );
    assert_eq!(
        env.json(&["revocations"])["revocations"],
        serde_json::json!([])
    );

    let u = env.json(&["unmap", "--bfn", &bfns[0].to_string()]);
    assert_eq!(u["unmapped"], 1);
    let e = env.json_err(&["lookup", "--bfn", &bfns[0].to_string()]);
    assert_eq!(e["errno"], "ENOENT");
    assert_eq!(e["code"], 2);

    let lim = env.json(&["limits", "--domid", "1", "--quota", "5"]);
    assert_eq!(lim["quota"], 5);
    let d = env.json(&["sim", "destroy-domain", "--domid", "2"]);
    assert_eq!(d["destroyed"], 2);

    // Reset: a fresh machine.
    let r = env.json(&["sim", "reset"]);
    assert_eq!(r["reset"], true);
    assert_eq!(env.json(&["stats"])["used"], 0);
    env.json_err(&["lookup", "--bfn", &bfns[2].to_string()]);
}

#[test]
fn errors_are_json_objects_on_stdout_with_failure_status() {
    let env = Env::new();
    let e = env.json_err(&["map", "--domid", "77", "--gfn", "1"]);
    assert_eq!(e["errno"], "ESRCH");
    assert_eq!(e["code"], 3);
    assert_eq!(e["items"][0]["gfn"], 1);
    let e = env.json_err(&["map", "--domid", "1", "--gfn", "zebra"]);
    assert_eq!(e["errno"], "EINVAL");
    // Errors clap finds while parsing, too.
    let e = env.json_err(&["map", "--domid", "notanumber", "--gfn", "1"]);
    assert_eq!(e["errno"], "EINVAL");
    let e = env.json_err(&["frobnicate"]);
    assert_eq!(e["errno"], "EINVAL");
    let e = env.json_err(&["--backend", "remote", "--socket", "/nonexistent/s", "caps"]);
    assert_eq!(e["errno"], "ENOENT");
    assert!(e["message"].as_str().unwrap().contains("/nonexistent/s"));
}

#[test]
fn a_refused_map_leaves_nothing_mapped() {
    let env = Env::new();
    // The guest has 16384 pages: 0x3ffe and 0x3fff map, 0x4000 does not.
    let e = env.json_err(&["map", "--domid", "1", "--gfn", "0x3ffe..0x4001"]);
    assert_eq!(e["errno"], "ENXIO");
    let refused: Vec<u64> = e["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["gfn"].as_u64().unwrap())
        .collect();
    assert_eq!(refused, [0x4000, 0x4001]);
    assert_eq!(env.json(&["stats"])["used"], 0);
    // An unmap naming a BFN that is not mapped unmaps nothing either.
    let bfns = bfns_of(&env.json(&["map", "--domid", "1", "--gfn", "0x10..0x11"]));
    let range = format!("{}..{}", bfns[0], bfns[1] + 1);
    let e = env.json_err(&["unmap", "--bfn", &range]);
    assert_eq!(e["errno"], "ENOENT");
    assert_eq!(e["items"][0]["bfn"], bfns[1] + 1);
    assert_eq!(env.json(&["stats"])["used"], 2);
}

#[test]
fn bad_input_fails_with_one_line_reason_and_changes_nothing() {
    let env = Env::new();
    env.json(&["map", "--domid", "1", "--gfn", "0x100"]);
    let before = std::fs::read(env.state()).unwrap();
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
        (&["unmap", "--bfn", "0x200000"][..], "ENOENT"),
        (&["limits", "--domid", "77", "--quota", "5"][..], "ESRCH"),
        (
            &["limits", "--domid", "1", "--quota", "99999999999"][..],
            "EINVAL",
        ),
        (&["lookup", "--bfn", "0x200000"][..], "ENOENT"),
        (
            &["sim", "balloon-out", "--domid", "1", "--gfn", "0x99999"][..],
            "balloon",
        ),
        (&["sim", "destroy-domain", "--domid", "77"][..], "d77"),
        (&["list", "--count", "999999999"][..], "16 Mi"),
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
        let (ok, _, err) = env.run(args);
        assert!(!ok, "{args:?} must fail");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Refused calls change nothing, so nothing was journaled.
    assert_eq!(std::fs::read(env.state()).unwrap(), before);
}

#[test]
fn damaged_or_foreign_state_files_are_refused_not_replayed() {
    let env = Env::new();
    env.json(&["map", "--domid", "1", "--gfn", "0x100..0x101"]);
    let good = std::fs::read(env.state()).unwrap();

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not a pviommu simulator state file",
            b"hello, world\n".to_vec(),
        ),
        ("truncated record", good[..good.len() - 3].to_vec()),
    ];
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    cases.push(("checksum mismatch", flipped));
    let mut bad_version = good.clone();
    bad_version[18] = 99;
    cases.push(("format version 99", bad_version));
    let mut huge = good[..26].to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&[0; 4]);
    cases.push(("claims", huge));

    for (needle, bytes) in cases {
        std::fs::write(env.state(), &bytes).unwrap();
        let (ok, _, err) = env.run(&["caps"]);
        assert!(!ok, "{needle}: must fail");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let e = env.json_err(&["stats"]);
        assert_eq!(e["errno"], "EBADMSG");
        assert_eq!(
            std::fs::read(env.state()).unwrap(),
            bytes,
            "{needle}: file changed"
        );
    }

    // A foreign file is never overwritten, not even by reset.
    std::fs::write(env.state(), b"precious").unwrap();
    let (ok, _, err) = env.run(&["sim", "reset"]);
    assert!(!ok && err.contains("refusing"), "{err}");
    assert_eq!(std::fs::read(env.state()).unwrap(), b"precious");

    // A damaged journal is reset.
    std::fs::write(env.state(), &good[..good.len() - 1]).unwrap();
    env.json(&["sim", "reset"]);
    assert_eq!(env.json(&["stats"])["used"], 0);
}

#[test]
fn concurrent_invocations_serialise_on_the_state_file() {
    let env = Env::new();
    let children: Vec<_> = (0..6u64)
        .map(|i| {
            let range = format!("{:#x}..{:#x}", 0x100 + i * 16, 0x100 + i * 16 + 15);
            env.cmd(&["map", "--domid", "1", "--gfn", &range, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut all = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        all.extend(bfns_of(&v));
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 96, "distinct BFNs");
    let stats = env.json(&["stats"]);
    assert_eq!(stats["used"], 96);
    assert_eq!(stats["mappings"][0]["mappings"], 96);
}

#[test]
fn completions_and_manual_page_come_from_the_clap_definition() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = env.run(&["completions", shell]);
        assert!(ok, "{shell}: {err}");
        for sub in [
            "caps",
            "map",
            "stats",
            "revocations",
            "context",
            "entry",
            "completions",
        ] {
            assert!(out.contains(sub), "{shell}: {sub} missing");
        }
    }
    // The bash script parses.
    let (_, script, _) = env.run(&["completions", "bash"]);
    let path = env.dir.path().join("pviommu.bash");
    std::fs::write(&path, script).unwrap();
    let st = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(st.success());

    let (ok, man, err) = env.run(&["man"]);
    assert!(ok, "{err}");
    assert!(
        man.starts_with(".ie") || man.contains(".TH pviommu"),
        "{}",
        &man[..200]
    );
    // Rendered, it reads as a manual page with every subcommand.
    let page = env.dir.path().join("pviommu.1");
    std::fs::write(&page, &man).unwrap();
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-P-cbou"])
        .arg(&page)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NAME") && text.contains("SUBCOMMANDS"),
        "{text}"
    );
    for sub in ["pviommu-map", "pviommu-stats", "pviommu-sim"] {
        assert!(text.contains(sub), "{sub} missing from the manual page");
    }
    // One page per subcommand, for installing into man1/.
    let dir = env.dir.path().join("man1");
    std::fs::create_dir(&dir).unwrap();
    let (ok, _, err) = env.run(&["man", "--out-dir", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    for page in [
        "pviommu.1",
        "pviommu-map.1",
        "pviommu-stats.1",
        "pviommu-sim-reset.1",
        "pviommu-context-attach.1",
        "pviommu-entry.1",
    ] {
        let roff = std::fs::read_to_string(dir.join(page)).unwrap_or_default();
        assert!(roff.contains(".TH"), "{page}");
    }
    let (ok, _, err) = env.run(&["man", "--out-dir", "/nonexistent/dir"]);
    assert!(!ok && err.contains("/nonexistent/dir"), "{err}");
}

#[test]
fn progress_shows_on_a_terminal_and_never_in_a_pipe() {
    let env = Env::new();
    // Piped: stderr stays empty.
    let (ok, _, err) = env.run(&["map", "--domid", "1", "--gfn", "0..0x3fff"]);
    assert!(ok);
    assert!(err.is_empty(), "progress written to a pipe: {err:?}");

    // On a terminal: the bar is drawn on stderr. The terminal is read while
    // the command runs, so a slow run cannot fill it and block.
    env.json(&["sim", "reset"]);
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO once the command (the only holder of the terminal's
        // other side) has exited.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let status = env
        .cmd(&["map", "--domid", "1", "--gfn", "0..0x3fff"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::from(pty.slave))
        .status()
        .unwrap();
    assert!(status.success());
    let seen = reader.join().unwrap();
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.contains("mapping"),
        "no progress on the terminal: {seen:?}"
    );
}

#[test]
fn xen_backend_without_xen_says_so() {
    if Path::new("/dev/xen/privcmd").exists() {
        return; // running in a real dom0
    }
    let env = Env::new();
    let (ok, _, err) = env.run(&["--backend", "xen", "caps"]);
    assert!(!ok);
    assert!(err.contains("privcmd"), "{err}");
    let e = env.json_err(&["--backend", "xen", "caps"]);
    assert_eq!(e["errno"], "ENODEV");
}

#[test]
fn demo_runs_and_reports() {
    let env = Env::new();
    let (ok, out, err) = env.run(&["demo"]);
    assert!(ok, "{err}");
    assert!(out.contains("pages read correctly"));
    assert!(out.contains("page references held now: 0"));
}

#[test]
fn help_lists_every_subcommand() {
    let env = Env::new();
    let (ok, out, _) = env.run(&["--help"]);
    assert!(ok);
    for sub in [
        "caps",
        "map",
        "unmap",
        "lookup",
        "list",
        "regions",
        "host-windows",
        "stats",
        "limits",
        "revocations",
        "shadow",
        "context",
        "entry",
        "sim",
        "demo",
        "completions",
        "man",
    ] {
        assert!(out.contains(sub), "{sub} missing from help");
    }
}

#[test]
fn the_default_state_lives_in_a_private_runtime_directory() {
    let runtime = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pviommu"))
            .args(args)
            .env_remove("PVIOMMU_SIM_STATE")
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = cmd(&["map", "--domid", "1", "--gfn", "0x100"]);
    assert!(ok, "{err}");
    let dir = runtime.path().join("pviommu");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let file = std::fs::metadata(dir.join("sim-state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(file & 0o777, 0o600);
    assert!(
        cmd(&["lookup", "--bfn", "0x100000"]).0,
        "state kept in the default place"
    );
    // Others may write the directory: refused, nothing read or written.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, err) = cmd(&["caps"]);
    assert!(!ok && err.contains("not a private directory"), "{err}");
}

/// `context create|attach|detach|destroy`, `entry` and `sim devices` on the
/// embedded simulator: dom0's two devices, one attached to a context of
/// its own; attachments and mappings are kept between invocations like
/// mappings are; the entry the IOMMU walks is read back and decoded.
#[test]
fn contexts_and_device_attachment_persist_and_entries_decode() {
    let env = Env::new();
    let caps = env.json(&["caps"]);
    for f in ["contexts", "device-attach", "attr-uncached"] {
        assert!(
            caps["features"]
                .as_array()
                .unwrap()
                .contains(&Value::from(f)),
            "{f}: {caps}"
        );
    }
    let devices = |env: &Env| -> Vec<(String, u64)> {
        env.json(&["sim", "devices"])["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                assert_eq!(d["owner"], 0);
                assert_eq!(d["own_requester_id"], true);
                (
                    d["device"].as_str().unwrap().to_string(),
                    d["context"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let a = "0000:00:02.0".to_string();
    let b = "0000:00:03.0".to_string();
    assert_eq!(devices(&env), [(a.clone(), 0), (b.clone(), 0)]);

    let ctx = env.json(&["context", "create"])["context"]
        .as_u64()
        .unwrap();
    assert_eq!(ctx, 1);
    let ctx_s = ctx.to_string();
    // bb:dd.f is accepted too, and printed back in full.
    let att = env.json(&["context", "attach", "--context", &ctx_s, "00:03.0"]);
    assert_eq!(att["attached"]["device"], b.as_str());
    assert_eq!(att["attached"]["context"], ctx);
    // Another process sees the attachment.
    assert_eq!(devices(&env), [(a.clone(), 0), (b.clone(), ctx)]);

    let in0 = bfns_of(&env.json(&["map", "--domid", "1", "--gfn", "0x100"]))[0];
    let wb = env.json(&["map", "--domid", "1", "--gfn", "0x100", "--context", &ctx_s]);
    assert_eq!(wb["attribute"], "write-back");
    let wb = bfns_of(&wb)[0];
    let uc = env.json(&[
        "map",
        "--domid",
        "1",
        "--gfn",
        "0x101",
        "--context",
        &ctx_s,
        "--attr",
        "uncached",
    ]);
    assert_eq!(uc["attribute"], "uncached");
    let uc = bfns_of(&uc)[0];

    let entry = |bfn: u64| {
        env.json(&[
            "entry",
            "--domid",
            "0",
            "--context",
            &ctx_s,
            "--bfn",
            &format!("{bfn:#x}"),
        ])
    };
    let e = entry(wb);
    assert_eq!(
        (e["domid"].clone(), e["context"].clone()),
        (0.into(), ctx.into())
    );
    assert_eq!(e["bfn"], wb);
    assert_eq!(e["level"], 1);
    assert_eq!(e["page_size"], 4096);
    // R | W | EMT=WB (6 << 3) | SNP (bit 11): write-back, snooped.
    assert_eq!(e["bits"], 0x1 | 0x2 | (6 << 3) | (1 << 11));
    let v = &e["vtd"];
    assert_eq!(
        (&v["read"], &v["write"], &v["snp"], &v["ipat"], &v["emt"]),
        (
            &true.into(),
            &true.into(),
            &true.into(),
            &false.into(),
            &"WB".into()
        )
    );
    assert_eq!(v["other_bits"], 0);
    // Uncached: IPAT with EMT=UC, no SNP.
    let v = entry(uc)["vtd"].clone();
    assert_eq!(
        (&v["snp"], &v["ipat"], &v["emt"]),
        (&false.into(), &true.into(), &"UC".into())
    );
    // The text form names the bits.
    let (ok, text, _) = env.run(&[
        "entry",
        "--domid",
        "0",
        "--context",
        &ctx_s,
        "--bfn",
        &wb.to_string(),
    ]);
    assert!(ok && text.contains("R W SNP EMT=WB"), "{text}");

    env.json(&[
        "unmap",
        "--bfn",
        &format!("{wb}..{}", uc),
        "--context",
        &ctx_s,
    ]);
    let det = env.json(&["context", "detach", "--context", &ctx_s, &b]);
    assert_eq!(det["detached"]["device"], b.as_str());
    assert_eq!(det["detached"]["context"], ctx);
    assert_eq!(devices(&env), [(a.clone(), 0), (b.clone(), 0)]);
    assert_eq!(
        env.json(&["context", "destroy", "--context", &ctx_s])["destroyed"],
        ctx
    );
    // The default context's mapping is untouched by all of it.
    assert_eq!(
        env.json(&["lookup", "--bfn", &in0.to_string()])["gfn"],
        0x100
    );
}

/// Every bad input of the context and device commands: a clear one-line
/// reason (or a JSON error with its errno), exit status 1, no panic, and
/// nothing journaled.
#[test]
fn bad_context_and_device_input_fails_clearly_and_changes_nothing() {
    let env = Env::new();
    env.json(&["context", "create"]);
    env.json(&["context", "attach", "--context", "1", "0000:00:03.0"]);
    let bfn = bfns_of(&env.json(&["map", "--domid", "1", "--gfn", "0x100", "--context", "1"]))[0];
    let before = std::fs::read(env.state()).unwrap();
    let not_mapped = format!("{:#x}", bfn + 1);
    for (args, errno, needle) in [
        // Unparsable devices, refused before any call.
        (
            &["context", "attach", "--context", "1", "0000:00:3.0x"][..],
            "EINVAL",
            "not a PCI device",
        ),
        (
            &["context", "attach", "--context", "1", "00:20.0"][..],
            "EINVAL",
            "not a PCI device",
        ),
        (
            &["context", "attach", "--context", "1", "00:03.8"][..],
            "EINVAL",
            "not a PCI device",
        ),
        (
            &["context", "detach", "--context", "1", "zebra"][..],
            "EINVAL",
            "not a PCI device",
        ),
        (
            &["context", "attach", "--context", "1", ""][..],
            "EINVAL",
            "not a PCI device",
        ),
        // Context 0, refused before any call.
        (
            &["context", "attach", "--context", "0", "0000:00:02.0"][..],
            "EINVAL",
            "default context",
        ),
        (
            &["context", "detach", "--context", "0", "0000:00:03.0"][..],
            "EINVAL",
            "default context",
        ),
        (
            &["context", "destroy", "--context", "0"][..],
            "EINVAL",
            "default context",
        ),
        (
            &[
                "entry",
                "--domid",
                "0",
                "--context",
                "0",
                "--bfn",
                "0x100000",
            ][..],
            "EINVAL",
            "default context",
        ),
        (
            &["entry", "--domid", "0", "--context", "1", "--bfn", "zebra"][..],
            "EINVAL",
            "not a number",
        ),
        // The hypervisor's refusals, worded for the command.
        (
            &["context", "attach", "--context", "1", "0000:00:09.0"][..],
            "ENODEV",
            "no such PCI device",
        ),
        (
            &["context", "attach", "--context", "1", "0000:00:03.0"][..],
            "EBUSY",
            "attached to a context already",
        ),
        (
            &["context", "attach", "--context", "5", "0000:00:02.0"][..],
            "ENOENT",
            "no such context",
        ),
        (
            &["context", "detach", "--context", "1", "0000:00:02.0"][..],
            "ENOENT",
            "not attached to that context",
        ),
        (
            &["context", "destroy", "--context", "1"][..],
            "EBUSY",
            "device attached",
        ),
        (
            &["context", "destroy", "--context", "5"][..],
            "ENOENT",
            "no such context",
        ),
        (
            &[
                "entry",
                "--domid",
                "0",
                "--context",
                "1",
                "--bfn",
                &not_mapped,
            ][..],
            "ENOENT",
            "nothing mapped",
        ),
        (
            &[
                "entry",
                "--domid",
                "0",
                "--context",
                "5",
                "--bfn",
                "0x100000",
            ][..],
            "ENOENT",
            "no such context",
        ),
    ] {
        let (ok, out, err) = env.run(args);
        assert!(!ok, "{args:?} must fail: {out}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        let e = env.json_err(args);
        assert_eq!(e["errno"], errno, "{args:?}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
    // The device argument is required; clap says so (exit status 2).
    let (ok, _, err) = env.run(&["context", "attach", "--context", "1"]);
    assert!(!ok && err.contains("DEVICE"), "{err}");
    assert_eq!(
        std::fs::read(env.state()).unwrap(),
        before,
        "refusals journaled"
    );
    // And the attachment is still there.
    let d = env.json(&["sim", "devices"]);
    assert_eq!(d["devices"][1]["context"], 1);
}

/// Attach and detach are batch ops, so the daemon carries them, on a
/// machine with the same two devices; `entry`, like the hypervisor's
/// counters, is not in its protocol and says so.
#[test]
fn the_daemon_attaches_devices_too() {
    let env = Env::new();
    let (socket, _daemon) = serve(&env);
    let sock = socket.to_str().unwrap();
    // With --json: the document on success, the error object on failure.
    let remote = |args: &[&str], ok: bool| {
        let mut a = vec!["--backend", "remote", "--socket", sock];
        a.extend_from_slice(args);
        if ok {
            env.json(&a)
        } else {
            env.json_err(&a)
        }
    };
    assert_eq!(remote(&["context", "create"], true)["context"], 1);
    remote(
        &["context", "attach", "--context", "1", "0000:00:02.0"],
        true,
    );
    let e = remote(&["context", "attach", "--context", "1", "00:02.0"], false);
    assert_eq!(e["errno"], "EBUSY");
    let e = remote(
        &[
            "entry",
            "--domid",
            "0",
            "--context",
            "1",
            "--bfn",
            "0x100000",
        ],
        false,
    );
    assert!(
        e["message"].as_str().unwrap().contains("does not carry"),
        "{e}"
    );
    remote(
        &["context", "detach", "--context", "1", "0000:00:02.0"],
        true,
    );
    remote(&["context", "destroy", "--context", "1"], true);
}

/// `revocations --wait` with more seconds than the clock can count (a
/// typo, a script's u64::MAX) waits without a deadline: a notice already
/// pending is drained at once. It panicked adding the wait to the clock
/// (review), before even looking for one.
#[test]
fn a_wait_past_what_the_clock_counts_is_no_panic() {
    let env = Env::new();
    let (socket, _daemon) = serve(&env);
    let sock = socket.to_str().unwrap();
    let remote = |args: &[&str]| {
        let mut a = vec!["--backend", "remote", "--socket", sock];
        a.extend_from_slice(args);
        env.json(&a)
    };
    let map = remote(&["map", "--domid", "1", "--gfn", "0x101"]);
    let bfn = map["mappings"][0]["bfn"].clone();
    remote(&["sim", "balloon-out", "--domid", "1", "--gfn", "0x101"]);
    let (ok, out, err) = env.run(&[
        "--backend",
        "remote",
        "--socket",
        sock,
        "--json",
        "revocations",
        "--wait",
        "18446744073709551615",
    ]);
    assert!(ok && !err.contains("panicked"), "{out}{err}");
    let revs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(revs["revocations"][0]["bfn"], bfn, "{revs}");
}

/// `pviommu sim serve` on a socket in `env`'s directory, up and accepting:
/// the socket's path, and the daemon (killed when the test ends, failed or
/// not).
fn serve(env: &Env) -> (std::path::PathBuf, KillOnDrop) {
    let socket = env.dir.path().join("sim.sock");
    let daemon = KillOnDrop(
        env.cmd(&["sim", "serve", "--socket", socket.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (socket, daemon)
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `map --extents` (ABI 1.6): each 2 MiB of the range in one op, at 512
/// BFNs in a row from a multiple of 512; a range that is not whole extents
/// is refused before anything is mapped, and an extent the hypervisor
/// refuses takes back the extents mapped before it.
#[test]
fn map_by_extents_gives_aligned_runs_and_is_all_or_nothing() {
    let env = Env::new();
    let map = env.json(&["map", "--domid", "1", "--gfn", "0x200..0x5ff", "--extents"]);
    let bfns = bfns_of(&map);
    assert_eq!(bfns.len(), 1024);
    for extent in bfns.chunks(512) {
        assert_eq!(extent[0] % 512, 0, "{:#x}", extent[0]);
        assert!(extent.windows(2).all(|w| w[1] == w[0] + 1));
    }
    assert_eq!(env.json(&["stats"])["used"], 1024);
    for bad in ["0x201..0x400", "0x200..0x2fe", "0x200"] {
        let e = env.json_err(&["map", "--domid", "1", "--gfn", bad, "--extents"]);
        assert_eq!(e["errno"], "EINVAL", "{bad}");
    }
    // The guest has 16384 pages: the extent from 0x4000 has no RAM.
    let e = env.json_err(&[
        "map",
        "--domid",
        "1",
        "--gfn",
        "0x3e00..0x41ff",
        "--extents",
    ]);
    assert_eq!(e["errno"], "ENXIO");
    assert_eq!(e["items"][0]["gfn"], 0x4000);
    assert_eq!(
        env.json(&["stats"])["used"],
        1024,
        "the extent before it taken back"
    );
}

/// `host-windows`: a PCI host-bridge window inside the BFN window and not
/// reserved is reported with the option that reserves it, and the status
/// is 1 (the report printed all the same); windows outside the BFN window
/// pass; unreadable or hidden listings are errors that say why.
#[test]
fn host_windows_reports_an_unreserved_pci_window_and_the_option_for_it() {
    let env = Env::new();
    let iomem = env.dir.path().join("iomem");
    let write = |text: &str| std::fs::write(&iomem, text).unwrap();
    let path = iomem.to_str().unwrap();
    // The simulator's BFN window starts at 4 GiB, as on the CI's QEMU host.
    write(
        "00000000-00000fff : Reserved\n\
         c0000000-febfffff : PCI Bus 0000:00\n\
         100000000-8ffffffff : PCI Bus 0000:00\n\
         \x20\x20800000000-8000fffff : 0000:00:03.0\n",
    );
    let mut c = env.cmd(&["host-windows", "--iomem", path, "--json"]);
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unreserved window fails the check"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["option"], "pviommu=reserve=0x100000000-0x8ffffffff");
    assert_eq!(v["windows"][0]["unreserved"], serde_json::json!([]));
    assert_eq!(v["windows"][1]["first"], 0x1_0000_0000u64);
    assert_eq!(v["windows"][1]["unreserved"][0]["start"], 0x10_0000);
    assert_eq!(v["windows"][1]["unreserved"][0]["end"], 0x90_0000);
    let (ok, text, _) = env.run(&["host-windows", "--iomem", path]);
    assert!(!ok);
    assert!(
        text.contains("NOT RESERVED") && text.contains("pviommu=reserve=0x100000000-0x8ffffffff")
    );

    // Only windows below 4 GiB: nothing to reserve.
    write("c0000000-febfffff : PCI Bus 0000:00\n");
    let v = env.json(&["host-windows", "--iomem", path]);
    assert_eq!(v["option"], Value::Null);

    // A reader without the capability sees zeros; a broken window line.
    write("00000000-00000000 : PCI Bus 0000:00\n");
    let e = env.json_err(&["host-windows", "--iomem", path]);
    assert_eq!(e["errno"], "EINVAL");
    assert!(e["message"].as_str().unwrap().contains("run as root"));
    write("1000000000-zz : PCI Bus 0000:00\n");
    let e = env.json_err(&["host-windows", "--iomem", path]);
    assert!(e["message"].as_str().unwrap().contains("line 1"));
    let e = env.json_err(&["host-windows", "--iomem", "/nonexistent/iomem"]);
    assert_eq!(e["errno"], "ENOENT");
}
