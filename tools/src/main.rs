//! `pviommu`: map foreign pages for devices through the PV-IOMMU ABI.
//!
//! Backends: `sim` (the embedded simulated machine, the default), `remote`
//! (a `pviommu sim serve` daemon), `xen` (real hypercalls through
//! `/dev/xen/privcmd` in dom0).

mod demo;
mod shadow_cmd;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pviommu_abi::{Bfn, ContextId, DomId, Gfn, MemAttr, Permissions};
use pviommu_guest::transport::{
    in_process::SharedSim, privcmd::Privcmd, remote::Remote, Transport,
};
use pviommu_guest::Client;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "pviommu",
    version,
    about = "Map foreign domains' pages for devices through Xen's PV-IOMMU"
)]
struct Cli {
    /// Where hypercalls go.
    #[arg(long, value_enum, default_value_t = Backend::Sim, global = true)]
    backend: Backend,
    /// Daemon socket for `--backend remote`.
    #[arg(long, default_value = "/tmp/pviommu-sim.sock", global = true)]
    socket: PathBuf,
    /// Domain to call as (simulator backends only; on Xen it is dom0).
    #[arg(long, default_value_t = 0, global = true)]
    caller: u16,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    /// The embedded simulated machine (fresh for each run).
    Sim,
    /// A `pviommu sim serve` daemon.
    Remote,
    /// Xen, through /dev/xen/privcmd.
    Xen,
}

#[derive(Subcommand)]
enum Command {
    /// Show the interface version, BFN window, limits and quota.
    Caps,
    /// Map foreign gfns; prints one BFN per gfn.
    Map {
        /// Foreign domain.
        #[arg(long)]
        domid: u16,
        /// A frame or an inclusive range, e.g. 0x100 or 0x100..0x1ff.
        #[arg(long)]
        gfn: String,
        /// Device may only read.
        #[arg(long)]
        read_only: bool,
        /// IOMMU context.
        #[arg(long, default_value_t = 0)]
        context: u32,
    },
    /// Drop one reference to BFNs; the last one unmaps.
    Unmap {
        /// A BFN or an inclusive range.
        #[arg(long)]
        bfn: String,
        /// IOMMU context.
        #[arg(long, default_value_t = 0)]
        context: u32,
    },
    /// What a BFN maps (never a machine frame).
    Lookup {
        /// The BFN.
        #[arg(long)]
        bfn: String,
        /// IOMMU context.
        #[arg(long, default_value_t = 0)]
        context: u32,
    },
    /// List live mappings in a BFN range (default: the first 4096 of the window).
    List {
        /// First BFN (default: window start).
        #[arg(long)]
        from: Option<String>,
        /// How many BFNs to look at.
        #[arg(long, default_value_t = 4096)]
        count: u64,
    },
    /// The reserved BFN regions.
    Regions,
    /// Set a driver domain's BFN quota (the toolstack's call; control
    /// domain only). 0 returns it to the boot-time default.
    Limits {
        /// The driver domain.
        #[arg(long)]
        domid: u16,
        /// Its quota of BFNs.
        #[arg(long)]
        quota: u64,
    },
    /// Receive pending revocations (BFNs the hypervisor revoked because the
    /// page left its domain or the domain died) and acknowledge them, which
    /// releases the BFNs.
    Revocations {
        /// With --backend xen: if none is pending, wait up to this many
        /// seconds for Xen's VIRQ_PV_IOMMU wake-up first.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Shadow a guest's GPU page tables (Gen8 PPGTT) through the PV-IOMMU:
    /// build, sync, translate, follow revocations (sim or xen backend).
    Shadow {
        #[command(subcommand)]
        action: shadow_cmd::ShadowAction,
    },
    /// The simulator daemon.
    Sim {
        #[command(subcommand)]
        action: SimAction,
    },
    /// The README's demonstration: a mediator maps a guest's GPU buffers,
    /// shadows its PPGTT, and the simulated GPU reads through GMA -> BFN -> RAM.
    Demo,
}

#[derive(Subcommand)]
enum SimAction {
    /// Serve one shared simulated machine on a Unix socket (mode 0600).
    Serve {
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x-hex)"))
}

/// `A` or `A..B` (inclusive), at most 1 Mi frames.
fn parse_range(s: &str) -> Result<Vec<u64>, String> {
    let (a, b) = match s.split_once("..") {
        Some((a, b)) => (parse_num(a)?, parse_num(b)?),
        None => {
            let a = parse_num(s)?;
            (a, a)
        }
    };
    if b < a {
        return Err(format!("range {s:?} ends before it starts"));
    }
    if b - a >= 1 << 20 {
        return Err(format!("range {s:?} is larger than 1 Mi frames"));
    }
    Ok((a..=b).collect())
}

fn open(cli: &Cli) -> Result<Client<Box<dyn Transport>>, String> {
    let t: Box<dyn Transport> = match cli.backend {
        Backend::Sim => {
            let sim =
                SharedSim::new(world::build(), Default::default()).map_err(|e| e.to_string())?;
            Box::new(sim.transport(DomId(cli.caller)))
        }
        Backend::Remote => {
            Box::new(Remote::connect(&cli.socket, DomId(cli.caller)).map_err(|e| e.to_string())?)
        }
        Backend::Xen => Box::new(Privcmd::open().map_err(|e| e.to_string())?),
    };
    Client::open(t).map_err(|e| e.to_string())
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        println!("{}", text());
    }
}

#[derive(Serialize)]
struct MapLine {
    gfn: u64,
    bfn: Option<u64>,
    error: Option<String>,
}

fn run(cli: Cli) -> Result<(), String> {
    match &cli.command {
        Command::Demo => return demo::run(),
        Command::Sim {
            action: SimAction::Serve { socket },
        } => return serve(socket),
        Command::Shadow { action } => return shadow_cmd::run(&cli, action),
        _ => {}
    }
    let mut c = open(&cli)?;
    match &cli.command {
        Command::Caps => {
            let caps = *c.caps();
            emit(cli.json, &caps, || {
                format!(
                    "interface version {}.{}\nBFN window        {:#x}..{:#x}\nmax batch ops     {}\npage sizes        {}\nreserved regions  {}\ncontexts          {}\nfeatures          {:#x}\nquota             {} ({} used)",
                    caps.version >> 16,
                    caps.version & 0xffff,
                    caps.bfn_window_start,
                    caps.bfn_window_end,
                    caps.max_batch_ops,
                    (12..64).filter(|b| caps.page_sizes & (1 << b) != 0).map(|b| format!("{}K", 1u64 << (b - 10))).collect::<Vec<_>>().join(" "),
                    caps.nr_reserved_regions,
                    caps.max_contexts,
                    caps.features,
                    caps.quota,
                    caps.used
                )
            });
        }
        Command::Map {
            domid,
            gfn,
            read_only,
            context,
        } => {
            let gfns: Vec<Gfn> = parse_range(gfn)?.into_iter().map(Gfn).collect();
            let perms = if *read_only {
                Permissions::RO
            } else {
                Permissions::RW
            };
            let rs = c.map_foreign(
                DomId(*domid),
                &gfns,
                perms,
                MemAttr::WriteBack,
                ContextId(*context),
            );
            let lines: Vec<MapLine> = gfns
                .iter()
                .zip(&rs)
                .map(|(g, r)| MapLine {
                    gfn: g.0,
                    bfn: r.as_ref().ok().map(|b| b.0),
                    error: r.as_ref().err().map(|e| e.to_string()),
                })
                .collect();
            emit(cli.json, &lines, || {
                lines
                    .iter()
                    .map(|l| match (&l.bfn, &l.error) {
                        (Some(b), _) => format!("gfn {:#x} -> bfn {b:#x}", l.gfn),
                        (_, Some(e)) => format!("gfn {:#x}: {e}", l.gfn),
                        _ => String::new(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            if let Some(e) = rs.iter().find_map(|r| r.as_ref().err()) {
                return Err(e.to_string());
            }
        }
        Command::Unmap { bfn, context } => {
            let bfns: Vec<Bfn> = parse_range(bfn)?.into_iter().map(Bfn).collect();
            let rs = c.unmap(&bfns, ContextId(*context));
            let n_ok = rs.iter().filter(|r| r.is_ok()).count();
            emit(
                cli.json,
                &serde_json::json!({ "unmapped": n_ok, "requested": bfns.len() }),
                || format!("unmapped {n_ok} of {} BFN(s)", bfns.len()),
            );
            if let Some(e) = rs.iter().find_map(|r| r.as_ref().err()) {
                return Err(e.to_string());
            }
        }
        Command::Lookup { bfn, context } => {
            let l = c
                .lookup(Bfn(parse_num(bfn)?), ContextId(*context))
                .map_err(|e| e.to_string())?;
            emit(cli.json, &l, || {
                format!(
                    "d{} gfn {:#x} {}{} {:?}",
                    l.domid.0,
                    l.gfn.0,
                    if l.perms.read { "r" } else { "-" },
                    if l.perms.write { "w" } else { "-" },
                    l.attr
                )
            });
        }
        Command::List { from, count } => {
            let start = match from {
                Some(f) => parse_num(f)?,
                None => c.caps().bfn_window_start,
            };
            let count = (*count).min(1 << 20);
            let mut live = Vec::new();
            for b in start..start.saturating_add(count) {
                if let Ok(l) = c.lookup(Bfn(b), ContextId::DEFAULT) {
                    live.push((b, l));
                }
            }
            emit(cli.json, &live, || {
                let mut s = format!("{:>12}  {:>6}  {:>10}  access\n", "bfn", "domain", "gfn");
                for (b, l) in &live {
                    s += &format!(
                        "{b:>#12x}  {:>6}  {:>#10x}  {}\n",
                        format!("d{}", l.domid.0),
                        l.gfn.0,
                        if l.perms.write { "rw" } else { "r-" }
                    );
                }
                s + &format!("{} live mapping(s)", live.len())
            });
        }
        Command::Regions => {
            let regions = c.reserved_regions().map_err(|e| e.to_string())?;
            emit(cli.json, &regions, || {
                regions
                    .iter()
                    .map(|r| {
                        format!(
                            "{:#x}..{:#x} kind {}",
                            r.start_bfn,
                            r.start_bfn + r.nr_frames,
                            r.kind
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Limits { domid, quota } => {
            c.set_limits(pviommu_abi::DomId(*domid), *quota)
                .map_err(|e| e.to_string())?;
            emit(
                cli.json,
                &serde_json::json!({ "domid": domid, "quota": quota }),
                || format!("d{domid}: quota {quota}"),
            );
        }
        Command::Revocations { wait } => {
            if let Some(secs) = wait {
                if cli.backend != Backend::Xen {
                    return Err("--wait needs --backend xen (Xen's VIRQ_PV_IOMMU)".into());
                }
                // Bind first, then look: a notice queued before the bind
                // raised no wake-up we could see, but shows in the caps.
                let mut events =
                    pviommu_guest::notify::RevocationEvents::open().map_err(|e| e.to_string())?;
                let pending = c.refresh_caps().map_err(|e| e.to_string())?.revoked;
                if pending == 0
                    && !events
                        .wait(std::time::Duration::from_secs(*secs))
                        .map_err(|e| e.to_string())?
                {
                    return Err(format!("no revocation within {secs} s"));
                }
            }
            let revs = c.drain_revocations().map_err(|e| e.to_string())?;
            emit(cli.json, &revs, || {
                revs.iter()
                    .map(|r| {
                        format!(
                            "bfn {:#x} ctx {} revoked: was d{} gfn {:#x}",
                            r.bfn.0, r.context.0, r.domid.0, r.gfn.0
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Shadow { .. } | Command::Sim { .. } | Command::Demo => {}
    }
    Ok(())
}

fn serve(socket: &std::path::Path) -> Result<(), String> {
    let sim = SharedSim::new(world::build(), Default::default()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = pviommu_guest::daemon::bind(socket)
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        eprintln!(
            "pviommu: serving the simulated machine on {}",
            socket.display()
        );
        pviommu_guest::daemon::serve(listener, sim.arc()).await;
        Ok(())
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PVIOMMU_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pviommu: {e}");
            ExitCode::FAILURE
        }
    }
}
