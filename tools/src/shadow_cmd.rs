//! `pviommu shadow ...`: a mediator's shadow of a guest's Gen8 PPGTT, on any
//! backend that can read the guest's memory (the embedded simulator, or Xen
//! through privcmd foreign mappings). The shadow lives as long as the
//! process: `build` builds, reports and tears down; `sync` builds, waits for
//! the guest to edit its tables (a line on stdin), syncs and tears down;
//! `watch` builds and then answers commands on stdin, one JSON line each,
//! until `quit` or end of input, so a script can drive a live shadow.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use clap::Subcommand;
use pviommu_abi::{DomId, Gfn};
use pviommu_guest::guest_memory::ForeignMemory;
use pviommu_guest::notify::RevocationEvents;
use pviommu_guest::shadow::{
    Anomaly, BuildReport, Gma, GuestTableReader, RefusedLeaf, RevocationReport, ShadowSession,
    SyncReport,
};
use pviommu_guest::transport::{in_process::SharedSim, privcmd::Privcmd, Transport};
use pviommu_guest::Client;
use serde_json::{json, Value};

use super::{Backend, Cli};

#[derive(Subcommand)]
pub enum ShadowAction {
    /// Build the shadow of the PPGTT rooted at a guest frame, report, print
    /// the BFN of each --gma, and tear it down.
    Build {
        #[command(flatten)]
        target: Target,
    },
    /// Build, wait for one line on stdin (the guest edits its tables
    /// meanwhile), sync, report, tear down. With --json each report is one
    /// JSON line.
    Sync {
        #[command(flatten)]
        target: Target,
        /// Guest table frames the guest changed, comma-separated (default:
        /// re-read every shadowed table).
        #[arg(long, value_delimiter = ',')]
        changed: Vec<String>,
    },
    /// Build, then answer commands on stdin until `quit` or end of input,
    /// one JSON line each: `sync [GFN...]` (no GFN: re-read all tables),
    /// `translate GMA...`, `leaves`, `revocations [WAIT_SECONDS]`, `stats`,
    /// `quit`. Revocations make the affected leaves non-present before
    /// they are acknowledged.
    Watch {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args)]
pub struct Target {
    /// The guest domain.
    #[arg(long)]
    domid: u16,
    /// Guest frame of its PPGTT's PML4.
    #[arg(long)]
    root: String,
    /// GMAs to translate through the shadow after building (or syncing).
    #[arg(long, value_delimiter = ',')]
    gma: Vec<String>,
    /// Print every present leaf (GMA -> BFN).
    #[arg(long)]
    print_leaves: bool,
}

type Session = ShadowSession<Box<dyn Transport>, Box<dyn GuestTableReader>>;

/// The tool's number syntax (decimal or 0x-hex), with its message.
fn parse_num(s: &str) -> Result<u64, String> {
    super::parse_num(s).map_err(|e| e.message)
}

/// Run a `shadow` subcommand.
pub fn run(cli: &Cli, action: &ShadowAction) -> Result<(), String> {
    let (ShadowAction::Build { target }
    | ShadowAction::Sync { target, .. }
    | ShadowAction::Watch { target }) = action;
    let domid = DomId(target.domid);
    let root = Gfn(parse_num(&target.root)?);
    let gmas = target
        .gma
        .iter()
        .map(|g| parse_num(g).map(Gma))
        .collect::<Result<Vec<_>, _>>()?;
    let changed = match action {
        ShadowAction::Sync { changed, .. } => changed
            .iter()
            .map(|g| parse_num(g).map(Gfn))
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    // The shadow opens its own client: it needs the guest's memory next to
    // the hypercalls (the embedded simulator's world, or Xen's privcmd).
    let (client, reader): (Client<Box<dyn Transport>>, Box<dyn GuestTableReader>) =
        match cli.backend {
            Backend::Sim => {
                let sim = SharedSim::new(super::world::build(), Default::default())
                    .map_err(|e| e.to_string())?;
                let t: Box<dyn Transport> = Box::new(sim.transport(DomId::DOM0));
                (
                    Client::open(t).map_err(|e| e.to_string())?,
                    Box::new(sim.reader(domid)),
                )
            }
            Backend::Xen => {
                let t: Box<dyn Transport> = Box::new(Privcmd::open().map_err(|e| e.to_string())?);
                (
                    Client::open(t).map_err(|e| e.to_string())?,
                    Box::new(ForeignMemory::open(domid).map_err(|e| e.to_string())?),
                )
            }
            Backend::Remote => {
                return Err(
                    "shadow needs the guest's memory; --backend remote cannot read it \
                            (use sim or xen)"
                        .into(),
                )
            }
        };
    let mut session: Session = ShadowSession::new(client, reader);
    let t0 = Instant::now();
    let built = session.build(domid, root).map_err(|e| e.to_string())?;
    let build = build_json(&built, domid, root, t0.elapsed());
    match action {
        ShadowAction::Build { .. } => {
            let mut out = build;
            add_views(&mut out, &session, &gmas, target.print_leaves);
            print(cli.json, &out, || build_text(&built, domid, root));
        }
        ShadowAction::Sync { .. } => {
            print_line(cli.json, &build, || build_text(&built, domid, root));
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!(
                    "pviommu: shadow built; press Enter once the guest has edited its tables"
                );
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("stdin: {e}"))?;
            let t1 = Instant::now();
            let r = if changed.is_empty() {
                session.sync_all()
            } else {
                session.sync(&changed)
            }
            .map_err(|e| e.to_string())?;
            let mut out = sync_json(&r, t1.elapsed());
            add_views(&mut out, &session, &gmas, target.print_leaves);
            print_line(cli.json, &out, || sync_text(&r));
        }
        ShadowAction::Watch { .. } => {
            println!("{}", json!({ "build": build }));
            watch(&mut session, cli.backend)?;
        }
    }
    let n = session.teardown().map_err(|e| e.to_string())?;
    if matches!(action, ShadowAction::Watch { .. }) {
        println!("{}", json!({ "teardown": { "leaves_unmapped": n } }));
    }
    Ok(())
}

/// The `watch` loop: one command per line, one JSON line per answer.
fn watch(session: &mut Session, backend: Backend) -> Result<(), String> {
    let mut events: Option<RevocationEvents> = None;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            continue;
        };
        if cmd == "quit" {
            break;
        }
        let answer = watch_command(session, backend, &mut events, cmd, args)
            .unwrap_or_else(|(errno, message)| {
                json!({ "error": { "command": cmd, "errno": errno, "message": message } })
            });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

type CmdResult = Result<Value, (i32, String)>;

fn bad(message: String) -> (i32, String) {
    (22, message)
}

fn watch_command(
    session: &mut Session,
    backend: Backend,
    events: &mut Option<RevocationEvents>,
    cmd: &str,
    args: &[&str],
) -> CmdResult {
    let nums = |args: &[&str]| -> Result<Vec<u64>, (i32, String)> {
        args.iter().map(|a| parse_num(a).map_err(bad)).collect()
    };
    match cmd {
        "sync" => {
            let gfns: Vec<Gfn> = nums(args)?.into_iter().map(Gfn).collect();
            let t = Instant::now();
            let r = if gfns.is_empty() {
                session.sync_all()
            } else {
                session.sync(&gfns)
            }
            .map_err(|e| (e.errno(), e.to_string()))?;
            Ok(json!({ "sync": sync_json(&r, t.elapsed()) }))
        }
        "translate" => {
            let gmas: Vec<Gma> = nums(args)?.into_iter().map(Gma).collect();
            Ok(json!({ "translate": translations(session, &gmas) }))
        }
        "leaves" => Ok(json!({ "leaves": leaves_json(session) })),
        "revocations" => {
            let wait = match args {
                [] => None,
                [s] => Some(Duration::from_secs(parse_num(s).map_err(bad)?)),
                _ => return Err(bad("revocations takes at most one argument".into())),
            };
            if let (Some(wait), Backend::Xen) = (wait, backend) {
                wait_for_revocation(session, events, wait)?;
            }
            let calls = session.client().stats().hypercalls;
            let t = Instant::now();
            let r = session
                .handle_revocations()
                .map_err(|e| (e.errno(), e.to_string()))?;
            let mut v = revocations_json(&r);
            v["elapsed_us"] = json!(t.elapsed().as_micros() as u64);
            v["hypercalls"] = json!(session.client().stats().hypercalls - calls);
            Ok(json!({ "revocations": v }))
        }
        "stats" => {
            let s = session.shadow();
            Ok(json!({ "stats": {
                "leaves": s.map_or(0, |s| s.mapped_leaves()),
                "tables": s.map_or(0, |s| s.table_count()),
                "client": session.client().stats(),
            }}))
        }
        other => Err(bad(format!(
            "unknown command {other:?} (sync, translate, leaves, revocations, stats, quit)"
        ))),
    }
}

/// Sleep on Xen's VIRQ_PV_IOMMU (bound on first use) unless notices are
/// already pending; bind first, then look, so none is missed.
fn wait_for_revocation(
    session: &mut Session,
    events: &mut Option<RevocationEvents>,
    wait: Duration,
) -> Result<(), (i32, String)> {
    let os = |e: pviommu_guest::Error| (5, e.to_string());
    if events.is_none() {
        *events = Some(RevocationEvents::open().map_err(os)?);
    }
    let pending = session.client().refresh_caps().map_err(os)?.revoked;
    if pending == 0 {
        if let Some(ev) = events.as_mut() {
            ev.wait(wait).map_err(os)?;
        }
    }
    Ok(())
}

fn translations(session: &Session, gmas: &[Gma]) -> Vec<Value> {
    gmas.iter()
        .map(|g| json!({ "gma": g.0, "bfn": session.translate(*g).map(|b| b.0) }))
        .collect()
}

fn leaves_json(session: &Session) -> Vec<Value> {
    session
        .leaves()
        .into_iter()
        .map(|(g, b)| json!({ "gma": g.0, "bfn": b.0 }))
        .collect()
}

fn add_views(out: &mut Value, session: &Session, gmas: &[Gma], print_leaves: bool) {
    if !gmas.is_empty() {
        out["translate"] = Value::Array(translations(session, gmas));
    }
    if print_leaves {
        out["leaves"] = Value::Array(leaves_json(session));
    }
}

fn refused_json(r: &[RefusedLeaf]) -> Vec<Value> {
    r.iter()
        .map(|l| json!({ "gma": l.gma.0, "gfn": l.gfn.0, "errno": l.errno }))
        .collect()
}

fn anomaly_json(a: &Anomaly) -> Value {
    match a {
        Anomaly::DuplicateTable { gma, level, table } => {
            json!({ "kind": "duplicate_table", "gma": gma.0, "level": level, "table": table.0 })
        }
        Anomaly::ReadFailed { table, errno } => {
            json!({ "kind": "read_failed", "table": table.0, "errno": errno })
        }
        Anomaly::OutOfShadowMemory { gma } => {
            json!({ "kind": "out_of_shadow_memory", "gma": gma.0 })
        }
        Anomaly::TableBudgetExceeded { gma } => {
            json!({ "kind": "table_budget_exceeded", "gma": gma.0 })
        }
        Anomaly::EntryOutOfRange { index } => {
            json!({ "kind": "entry_out_of_range", "index": index })
        }
    }
}

fn build_json(r: &BuildReport, domid: DomId, root: Gfn, took: Duration) -> Value {
    json!({
        "domid": domid.0,
        "root": root.0,
        "leaves_mapped": r.leaves_mapped,
        "tables": r.tables,
        "map_calls": r.map_calls,
        "extents_mapped": r.extents_mapped,
        "refused": refused_json(&r.refused),
        "refused_total": r.refused_total,
        "anomalies": r.anomalies.iter().map(anomaly_json).collect::<Vec<_>>(),
        "anomalies_total": r.anomalies_total,
        "elapsed_us": took.as_micros() as u64,
    })
}

fn sync_json(r: &SyncReport, took: Duration) -> Value {
    json!({
        "pages_read": r.pages_read,
        "entries_changed": r.entries_changed,
        "leaves_mapped": r.leaves_mapped,
        "leaves_unmapped": r.leaves_unmapped,
        "map_calls": r.map_calls,
        "unmap_calls": r.unmap_calls,
        "extents_mapped": r.extents_mapped,
        "extents_unmapped": r.extents_unmapped,
        "refused": refused_json(&r.refused),
        "refused_total": r.refused_total,
        "anomalies": r.anomalies.iter().map(anomaly_json).collect::<Vec<_>>(),
        "anomalies_total": r.anomalies_total,
        "ignored": r.ignored.iter().map(|g| g.0).collect::<Vec<_>>(),
        "elapsed_us": took.as_micros() as u64,
    })
}

fn revocations_json(r: &RevocationReport) -> Value {
    json!({
        "notices": r.notices.iter().map(|n| json!({
            "bfn": n.bfn.0, "context": n.context.0, "domid": n.domid.0, "gfn": n.gfn.0,
        })).collect::<Vec<_>>(),
        "leaves": r.leaves.iter().map(|l| json!({
            "gma": l.gma.0, "domid": l.domid.0, "gfn": l.gfn.0, "bfn": l.bfn.0,
        })).collect::<Vec<_>>(),
    })
}

fn build_text(r: &BuildReport, domid: DomId, root: Gfn) -> String {
    let mut s = format!(
        "shadow of d{} PPGTT at gfn {:#x}: {} leaves mapped ({} 2 MiB entries), {} table pages, {} refused, {} anomalies",
        domid.0,
        root.0,
        r.leaves_mapped,
        r.extents_mapped,
        r.tables,
        r.refused_total,
        r.anomalies_total
    );
    for l in &r.refused {
        s += &format!(
            "\n  refused gma {} gfn {:#x}: errno {}",
            l.gma, l.gfn.0, l.errno
        );
    }
    for a in &r.anomalies {
        s += &format!("\n  anomaly: {a:?}");
    }
    let unlisted = (r.refused_total + r.anomalies_total)
        .saturating_sub((r.refused.len() + r.anomalies.len()) as u64);
    if unlisted > 0 {
        s += &format!("\n  ({unlisted} more counted, not listed)");
    }
    s
}

fn sync_text(r: &SyncReport) -> String {
    format!(
        "sync: {} table pages read, {} entries changed, {} leaves mapped, {} unmapped, {} refused",
        r.pages_read, r.entries_changed, r.leaves_mapped, r.leaves_unmapped, r.refused_total
    )
}

fn view_text(v: &Value) -> String {
    let mut s = String::new();
    for key in ["translate", "leaves"] {
        for e in v[key].as_array().into_iter().flatten() {
            s += &match e["bfn"].as_u64() {
                Some(b) => format!("\ngma {:#x} -> bfn {b:#x}", e["gma"].as_u64().unwrap_or(0)),
                None => format!("\ngma {:#x} -> not present", e["gma"].as_u64().unwrap_or(0)),
            };
        }
    }
    s
}

fn print(json: bool, v: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}{}", text(), view_text(v));
    }
}

/// One compact JSON line (the `sync` subcommand prints two reports).
fn print_line(json: bool, v: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{v}");
    } else {
        println!("{}{}", text(), view_text(v));
    }
    let _ = std::io::stdout().flush();
}
