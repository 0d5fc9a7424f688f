//! The C mediator example (guest-driver/examples/c) built the way a C
//! project would: the library installed under a prefix by
//! guest-driver/install-c-lib.sh, found with `pkg-config --cflags --libs
//! pviommu-guest`, linked by soname; then run against `pviommu sim serve`,
//! where it maps, hears of a revocation the daemon pushes, acknowledges it
//! and unmaps. Also the CLI waiting for the daemon's push.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pviommu(socket: &Path, args: &[&str]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pviommu"));
    c.args(["--backend", "remote", "--socket"])
        .arg(socket)
        .args(args);
    run(&mut c)
}

/// The daemon, stopped when the test ends however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(socket: &Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_pviommu"))
        .args(["sim", "serve", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

fn soname_and_needed(file: &Path) -> (Vec<String>, Vec<String>) {
    let out = run(Command::new("readelf").arg("-d").arg(file));
    let pick = |tag: &str| {
        out.lines()
            .filter(|l| l.contains(tag))
            .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(String::from))
            .collect()
    };
    (pick("(SONAME)"), pick("(NEEDED)"))
}

#[test]
fn c_mediator_built_with_pkg_config_maps_through_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    run(Command::new(repo().join("guest-driver/install-c-lib.sh"))
        .arg("--debug")
        .arg(&prefix));

    // The installed library has the soname the symlinks promise.
    let lib = prefix.join("lib");
    let (soname, _) = soname_and_needed(&lib.join("libpviommu_guest.so.1.2.0"));
    assert_eq!(soname, ["libpviommu_guest.so.1"]);
    assert_eq!(
        std::fs::read_link(lib.join("libpviommu_guest.so.1")).unwrap(),
        Path::new("libpviommu_guest.so.1.2.0")
    );
    assert!(prefix.join("include/pviommu_guest.h").exists());
    assert!(prefix.join("include/pviommu.h").exists());

    let pc_path = lib.join("pkgconfig");
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "pviommu-guest"])
        .env("PKG_CONFIG_PATH", &pc_path));
    assert!(
        flags.contains(&format!("-I{}", prefix.join("include").display())),
        "{flags}"
    );
    assert!(flags.contains("-lpviommu_guest"), "{flags}");
    let version = run(Command::new("pkg-config")
        .args(["--modversion", "pviommu-guest"])
        .env("PKG_CONFIG_PATH", &pc_path));
    assert_eq!(version.trim(), "1.2.0");

    // Build the example out of the source tree with its Makefile.
    let build = tmp.path().join("build");
    std::fs::create_dir(&build).unwrap();
    let example = repo().join("guest-driver/examples/c");
    for f in ["mediator.c", "Makefile"] {
        std::fs::copy(example.join(f), build.join(f)).unwrap();
    }
    run(Command::new("make")
        .arg("-C")
        .arg(&build)
        .env("PKG_CONFIG_PATH", &pc_path));
    let mediator = build.join("mediator");
    let (_, needed) = soname_and_needed(&mediator);
    assert!(
        needed.contains(&"libpviommu_guest.so.1".to_string()),
        "{needed:?}"
    );

    // Run it against the daemon.
    let socket = tmp.path().join("pviommu.sock");
    let _daemon = start_daemon(&socket);
    let mut child = Command::new(&mediator)
        .arg(&socket)
        .args(["1", "0x100", "16"])
        .env("LD_LIBRARY_PATH", &lib)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let err = child.wait_with_output().unwrap();
            panic!(
                "mediator ended early: {lines:?} {}",
                String::from_utf8_lossy(&err.stderr)
            );
        }
        lines.push(line.trim().to_string());
        if line.starts_with("READY") {
            break;
        }
    }
    assert_eq!(lines.len(), 17, "{lines:?}");
    let bfn_of_105 = lines
        .iter()
        .find(|l| l.starts_with("gfn 0x105 -> bfn "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    // Another process (the toolstack, here the CLI) sees the mappings.
    let stats: serde_json::Value =
        serde_json::from_str(&pviommu(&socket, &["stats", "--json"])).unwrap();
    assert_eq!(stats["live"], 16);

    // The guest balloons a mapped page out; the daemon pushes the notice.
    pviommu(
        &socket,
        &["sim", "balloon-out", "--domid", "1", "--gfn", "0x105"],
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{rest}{err}");
    assert!(
        rest.contains(&format!("REVOKED bfn {bfn_of_105} (was d1 gfn 0x105)")),
        "{rest}"
    );
    assert!(
        rest.contains("OK: mapped 16, revoked 1, unmapped 15"),
        "{rest}"
    );

    // Nothing is left behind: every BFN unmapped or acknowledged.
    let stats: serde_json::Value =
        serde_json::from_str(&pviommu(&socket, &["stats", "--json"])).unwrap();
    assert_eq!(stats["used"], 0, "{stats}");

    // A wrong socket is a clear error, not a crash.
    let out = Command::new(&mediator)
        .arg(tmp.path().join("nothing-here"))
        .args(["1", "0x100", "1"])
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing-here"));
}

#[test]
fn the_cli_waits_for_the_daemons_push() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("pviommu.sock");
    let _daemon = start_daemon(&socket);
    let map: serde_json::Value = serde_json::from_str(&pviommu(
        &socket,
        &["map", "--domid", "1", "--gfn", "0x200..0x201", "--json"],
    ))
    .unwrap();
    let bfn = map["mappings"][1]["bfn"].as_u64().unwrap();

    // Nothing happens: the wait ends with ETIMEDOUT.
    let out = Command::new(env!("CARGO_BIN_EXE_pviommu"))
        .args(["--backend", "remote", "--socket"])
        .arg(&socket)
        .args(["revocations", "--wait", "1", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["error"]["errno"], "ETIMEDOUT");

    // A waiting CLI wakes when the page is ballooned out.
    let waiter = Command::new(env!("CARGO_BIN_EXE_pviommu"))
        .args(["--backend", "remote", "--socket"])
        .arg(&socket)
        .args(["revocations", "--wait", "30", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    pviommu(
        &socket,
        &["sim", "balloon-out", "--domid", "1", "--gfn", "0x201"],
    );
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["revocations"],
        serde_json::json!([{ "bfn": bfn, "context": 0, "domid": 1, "gfn": 0x201 }])
    );
}
