//! `pviommu`: map foreign pages for devices through the PV-IOMMU ABI.
//!
//! Backends: `sim` (the embedded simulated machine, the default), `remote`
//! (a `pviommu sim serve` daemon), `xen` (real hypercalls through
//! `/dev/xen/privcmd` in dom0).

mod demo;
mod host_windows;
mod output;
mod progress;
mod scan;
mod shadow_cmd;
mod sim_state;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use pviommu_abi::{Bfn, ContextId, DomId, Errno, Gfn, MemAttr, Permissions, Sbdf};
use pviommu_guest::transport::{
    in_process::SharedSim, privcmd::Privcmd, remote::Remote, Transport,
};
use pviommu_guest::Client;
use serde::Serialize;

use output::{
    context_error, emit, CapsJson, CliError, ContextOp, DeviceJson, EntryJson, ItemError,
    MappingJson, RegionJson, RevocationJson,
};
use sim_state::SimState;

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
    /// Print results, and errors, as one JSON document on stdout (schema:
    /// design/cli.md).
    #[arg(long, global = true)]
    json: bool,
    /// State file of the embedded simulator (`--backend sim`), kept between
    /// runs [default: $XDG_RUNTIME_DIR/pviommu/sim-state, else
    /// /tmp/pviommu-UID/sim-state].
    #[arg(long, global = true, env = sim_state::STATE_ENV, value_name = "FILE")]
    state: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    /// The embedded simulated machine; its state is kept in a state file
    /// between runs (`pviommu sim reset` starts afresh).
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
        /// Memory attribute (uncached and device need the IOMMU to offer
        /// them: `caps` lists attr-uncached, attr-device).
        #[arg(long, value_enum, default_value_t = Attr::WriteBack)]
        attr: Attr,
        /// IOMMU context.
        #[arg(long, default_value_t = 0)]
        context: u32,
        /// Map by 2 MiB extents (ABI 1.6: `caps` lists extents-2m): the
        /// range covers whole extents (from a multiple of 512, a multiple
        /// of 512 gfns long), each mapped in one op at 512 BFNs in a row
        /// from a multiple of 512; each extent's frames must be one
        /// machine run.
        #[arg(long)]
        extents: bool,
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
    /// List live mappings (every context) in a BFN range (default: the
    /// first 4096 of the window).
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
    /// Check the PCI host bridges' memory windows (the driver domain's
    /// /proc/iomem, which Linux reads from ACPI) against the BFN window:
    /// a device placed in a window later (hot-plug, SR-IOV VFs, a moved
    /// BAR) takes addresses a DMA to a BFN would reach instead of the page,
    /// unless the window is reserved. Lists the windows that are not and
    /// prints the Xen options that reserve them (one a window); exit
    /// status 1 if any.
    HostWindows {
        /// The listing to read (root sees its addresses).
        #[arg(long, default_value = "/proc/iomem")]
        iomem: PathBuf,
    },
    /// Mappings per foreign domain and context, quota use and pending
    /// revocations of the calling domain.
    Stats {
        /// Look at most this many BFNs from the window start when counting
        /// mappings (the count stops early once every live BFN was found).
        #[arg(long, default_value_t = 1 << 20)]
        scan_limit: u64,
    },
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
        /// If none is pending, wait up to this many seconds for one first:
        /// Xen's VIRQ_PV_IOMMU (--backend xen) or the daemon's push
        /// (--backend remote).
        #[arg(long)]
        wait: Option<u64>,
        /// Only this context's notices; the others stay queued for their
        /// owner (a mediator sharing its driver domain with another).
        /// Needs a hypervisor with revoked-in-context (ABI 1.4).
        #[arg(long)]
        context: Option<u32>,
    },
    /// Shadow a guest's GPU page tables (Gen8 PPGTT) through the PV-IOMMU:
    /// build, sync, translate, follow revocations (sim or xen backend).
    Shadow {
        #[command(subcommand)]
        action: shadow_cmd::ShadowAction,
    },
    /// IOMMU contexts of the calling domain and the PCI devices attached
    /// to them: context 0 is the host's own tables, the others tables the
    /// hypervisor writes (ABI 1.3).
    Context {
        #[command(subcommand)]
        action: ContextAction,
    },
    /// The IOMMU leaf entry a device attached to a context finds for a BFN
    /// (address bits zeroed), with its VT-d bits decoded (control domain
    /// only; not for context 0, the host's own tables).
    Entry {
        /// The driver domain whose context it is.
        #[arg(long)]
        domid: u16,
        /// Its context (not 0).
        #[arg(long)]
        context: u32,
        /// The BFN.
        #[arg(long)]
        bfn: String,
    },
    /// The simulator daemon.
    Sim {
        #[command(subcommand)]
        action: SimAction,
    },
    /// The README's demonstration: a mediator maps a guest's GPU buffers,
    /// shadows its PPGTT, and the simulated GPU reads through GMA -> BFN -> RAM.
    Demo,
    /// Print a shell completion script (e.g. `pviommu completions bash >
    /// /etc/bash_completion.d/pviommu`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `pviommu man | man -l -`, or
    /// write one page per subcommand into a directory.
    Man {
        /// Write pviommu.1 and a pviommu-<subcommand>.1 for every
        /// subcommand here instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// A mapping's memory attribute.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Attr {
    /// Normal cacheable memory, snooped (the default).
    WriteBack,
    /// Normal non-cacheable memory.
    Uncached,
    /// Device memory.
    Device,
}

impl From<Attr> for MemAttr {
    fn from(a: Attr) -> MemAttr {
        match a {
            Attr::WriteBack => MemAttr::WriteBack,
            Attr::Uncached => MemAttr::Uncached,
            Attr::Device => MemAttr::Device,
        }
    }
}

#[derive(Subcommand)]
enum ContextAction {
    /// Create a context: IOMMU tables of the calling domain's own that the
    /// hypervisor writes. Prints its number.
    Create,
    /// Destroy a context. Refused (EBUSY) while it holds BFNs or a device
    /// is attached: detach first.
    Destroy {
        /// The context (not 0).
        #[arg(long)]
        context: u32,
    },
    /// Point one of the calling domain's PCI devices at a context: from
    /// then on its DMA sees that context's BFNs only.
    Attach {
        /// The context (not 0; `context create` makes one).
        #[arg(long)]
        context: u32,
        /// The device, `ssss:bb:dd.f` or `bb:dd.f` as lspci prints it
        /// (`sim devices` lists the simulator's).
        #[arg(value_name = "DEVICE")]
        device: String,
    },
    /// Put a device attached to a context back in the default context.
    Detach {
        /// The context it is attached to.
        #[arg(long)]
        context: u32,
        /// The device, `ssss:bb:dd.f` or `bb:dd.f`.
        #[arg(value_name = "DEVICE")]
        device: String,
    },
}

#[derive(Subcommand)]
enum SimAction {
    /// Serve one shared simulated machine on a Unix socket (mode 0600).
    Serve {
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Forget the embedded simulator's state: the next command starts from
    /// the initial machine.
    Reset,
    /// Balloon a page out of a simulated domain (the hypervisor revokes
    /// every BFN that mapped it).
    BalloonOut {
        /// Domain.
        #[arg(long)]
        domid: u16,
        /// Its frame.
        #[arg(long)]
        gfn: String,
    },
    /// Destroy a simulated domain (every BFN of its pages is revoked).
    DestroyDomain {
        /// Domain.
        #[arg(long)]
        domid: u16,
    },
    /// The embedded simulator's PCI devices: owner, the context each is
    /// attached to, and what allows attaching it.
    Devices,
}

fn parse_num(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| CliError::invalid(format!("{s:?} is not a number (decimal or 0x-hex)")))
}

/// `A` or `A..B` (inclusive), at most 1 Mi frames.
fn parse_range(s: &str) -> Result<Vec<u64>, CliError> {
    let (a, b) = match s.split_once("..") {
        Some((a, b)) => (parse_num(a)?, parse_num(b)?),
        None => {
            let a = parse_num(s)?;
            (a, a)
        }
    };
    if b < a {
        return Err(CliError::invalid(format!(
            "range {s:?} ends before it starts"
        )));
    }
    if b - a >= 1 << 20 {
        return Err(CliError::invalid(format!(
            "range {s:?} is larger than 1 Mi frames"
        )));
    }
    Ok((a..=b).collect())
}

/// A PCI device as lspci prints it.
fn parse_sbdf(s: &str) -> Result<Sbdf, CliError> {
    s.trim().parse().map_err(|()| {
        CliError::invalid(format!(
            "{s:?} is not a PCI device: expected ssss:bb:dd.f or bb:dd.f in hexadecimal \
             (device 00-1f, function 0-7), e.g. 0000:00:03.0"
        ))
    })
}

/// A context other than the default one, for commands that cannot take 0.
fn own_context(context: u32, why: &str) -> Result<ContextId, CliError> {
    if context == 0 {
        return Err(CliError::invalid(format!(
            "--context 0 is the default context, the host's own IOMMU tables: {why}"
        )));
    }
    Ok(ContextId(context))
}

/// The embedded simulator's state file.
fn state_path(cli: &Cli) -> PathBuf {
    cli.state.clone().unwrap_or_else(sim_state::default_path)
}

/// A client on the chosen backend; with `--backend sim` also the locked,
/// replayed simulator state, whose new records the caller saves.
/// A client over whichever transport the command line chose.
type AnyClient = Client<Box<dyn Transport>>;

fn open(cli: &Cli) -> Result<(AnyClient, Option<SimState>), CliError> {
    let (t, state): (Box<dyn Transport>, _) = match cli.backend {
        Backend::Sim => {
            let state = SimState::open(&state_path(cli))?;
            (Box::new(state.transport(DomId(cli.caller))), Some(state))
        }
        Backend::Remote => (
            Box::new(Remote::connect(&cli.socket, DomId(cli.caller))?),
            None,
        ),
        Backend::Xen => (Box::new(Privcmd::open()?), None),
    };
    Ok((Client::open(t)?, state))
}

/// Pages mapped per `map_foreign` call: big enough for full batches, small
/// enough for a progress bar to move.
const MAP_CHUNK: usize = 4096;

#[derive(Serialize)]
struct MapLine {
    gfn: u64,
    bfn: u64,
}

fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Demo => return demo::run().map_err(CliError::from),
        Command::Sim {
            action: SimAction::Serve { socket },
        } => return serve(socket),
        Command::Sim {
            action: SimAction::Reset,
        } => return sim_reset(&cli),
        Command::Shadow { action } => return shadow_cmd::run(&cli, action).map_err(CliError::from),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "pviommu",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man { out_dir: None } => {
            return clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| CliError::os("write the manual page", &e));
        }
        Command::Man { out_dir: Some(dir) } => {
            return clap_mangen::generate_to(Cli::command(), dir)
                .map_err(|e| CliError::os(format!("write manual pages to {}", dir.display()), &e));
        }
        _ => {}
    }
    let (mut c, mut state) = open(&cli)?;
    let result = command(&cli, &mut c, state.as_ref());
    // Whatever the command did to the simulated machine is kept, failed
    // command or not (a map rolled back is a map and an unmap).
    if let Some(state) = state.as_mut() {
        state.save()?;
    }
    result
}

fn command(cli: &Cli, c: &mut AnyClient, state: Option<&SimState>) -> Result<(), CliError> {
    match &cli.command {
        Command::Caps => {
            let caps = CapsJson::from(&c.refresh_caps()?);
            emit(cli.json, &caps, || caps.text());
        }
        Command::Map {
            domid,
            gfn,
            read_only,
            attr,
            context,
            extents,
        } => map(
            cli,
            c,
            DomId(*domid),
            gfn,
            (*read_only, MemAttr::from(*attr), *extents),
            ContextId(*context),
        )?,
        Command::Context { action } => context_cmd(cli, c, action)?,
        Command::Entry {
            domid,
            context,
            bfn,
        } => {
            let context = own_context(
                *context,
                "the hypervisor reads back only the tables it writes; `lookup` describes its BFNs",
            )?;
            let bfn = Bfn(parse_num(bfn)?);
            let e = c.entry(DomId(*domid), context, bfn).map_err(|e| {
                context_error(
                    ContextOp::Entry,
                    format!("entry d{domid} context {} bfn {:#x}", context.0, bfn.0),
                    e,
                )
            })?;
            let j = EntryJson::from(&e);
            emit(cli.json, &j, || j.text(&e));
        }
        Command::Unmap { bfn, context } => unmap(cli, c, bfn, ContextId(*context))?,
        Command::Lookup { bfn, context } => {
            let bfn = Bfn(parse_num(bfn)?);
            let l = c.lookup(bfn, ContextId(*context))?;
            let m = MappingJson::new(bfn, ContextId(*context), &l);
            // One line, domain first (the QEMU test greps "^d<domid> ").
            emit(cli.json, &m, || {
                format!(
                    "d{} gfn {:#x} {} {} (bfn {:#x} context {})",
                    m.domid, m.gfn, m.access, m.attribute, m.bfn, m.context
                )
            });
        }
        Command::List { from, count } => {
            let start = match from {
                Some(f) => parse_num(f)?,
                None => c.caps().bfn_window_start,
            };
            if *count > 1 << 24 {
                return Err(CliError::invalid(format!(
                    "--count {count} is more than 16 Mi BFNs"
                )));
            }
            let found = scan::scan(c, start, *count, None)?;
            let doc = serde_json::json!({
                "mappings": found.mappings,
                "scanned": { "from": start, "count": found.scanned },
            });
            emit(cli.json, &doc, || {
                let mut s = MappingJson::header() + "\n";
                for m in &found.mappings {
                    s += &(m.text() + "\n");
                }
                s + &format!("{} live mapping(s)", found.mappings.len())
            });
        }
        Command::Regions => {
            let regions: Vec<RegionJson> =
                c.reserved_regions()?.iter().map(RegionJson::from).collect();
            emit(cli.json, &serde_json::json!({ "regions": regions }), || {
                regions
                    .iter()
                    .map(|r| format!("{:#x}..{:#x} {}", r.start, r.end, r.kind))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::HostWindows { iomem } => host_windows(cli, c, iomem)?,
        Command::Stats { scan_limit } => stats(cli, c, *scan_limit)?,
        Command::Limits { domid, quota } => {
            c.set_limits(pviommu_abi::DomId(*domid), *quota)?;
            emit(
                cli.json,
                &serde_json::json!({ "domid": domid, "quota": quota }),
                || format!("d{domid}: quota {quota}"),
            );
        }
        Command::Revocations { wait, context } => {
            if let Some(secs) = wait {
                let timeout = std::time::Duration::from_secs(*secs);
                let heard = match cli.backend {
                    // Bind first, then look: a notice queued before the bind
                    // raised no wake-up we could see, but shows in the caps.
                    Backend::Xen => {
                        let mut events = pviommu_guest::notify::RevocationEvents::open()?;
                        c.refresh_caps()?.revoked > 0 || events.wait(timeout)?
                    }
                    // The daemon pushes notices to its subscribed clients.
                    Backend::Remote => {
                        // A wait past what the clock can count (`--wait`
                        // near u64::MAX seconds) has no deadline: it ends
                        // with a notice, as a wait of centuries would.
                        let deadline = std::time::Instant::now().checked_add(timeout);
                        let slice = std::time::Duration::from_secs(60);
                        loop {
                            let left = deadline.map_or(slice, |d| {
                                d.saturating_duration_since(std::time::Instant::now())
                            });
                            if c.wait_revocations(left.min(slice))? {
                                break true;
                            }
                            if left.is_zero() {
                                break false;
                            }
                        }
                    }
                    Backend::Sim => {
                        return Err(CliError::invalid(
                            "--wait needs --backend xen (VIRQ_PV_IOMMU) or remote (the daemon's push); \
                             the embedded simulator changes only while a command runs",
                        ))
                    }
                };
                if !heard {
                    return Err(CliError {
                        errno: "ETIMEDOUT".into(),
                        code: nix::errno::Errno::ETIMEDOUT as i32,
                        message: format!("no revocation within {secs} s"),
                        items: Vec::new(),
                    });
                }
            }
            let drained = match context {
                None => c.drain_revocations()?,
                Some(ctx) => {
                    let all = c.drain_bound();
                    c.drain_revocations_in(ContextId(*ctx), all, |_| {})?
                }
            };
            let revs: Vec<RevocationJson> = drained.iter().map(RevocationJson::from).collect();
            emit(
                cli.json,
                &serde_json::json!({ "revocations": revs }),
                || {
                    revs.iter()
                        .map(|r| {
                            format!(
                                "bfn {:#x} ctx {} revoked: was d{} gfn {:#x}",
                                r.bfn, r.context, r.domid, r.gfn
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Sim {
            action: SimAction::Devices,
        } => sim_devices(cli, state)?,
        Command::Sim { action } => sim_admin(cli, state, action)?,
        Command::Shadow { .. }
        | Command::Demo
        | Command::Completions { .. }
        | Command::Man { .. } => {}
    }
    Ok(())
}

fn item_error(gfn: Option<u64>, bfn: Option<u64>, e: &pviommu_guest::Error) -> ItemError {
    let (errno, code) = match e.errno() {
        Some(x) => (x.name().to_string(), x.code()),
        None => ("EIO".to_string(), 5),
    };
    ItemError {
        gfn,
        bfn,
        errno,
        code,
    }
}

/// `pviommu map`: all or nothing. Pages go in chunks (a progress bar on a
/// terminal); if any page is refused, every page this command mapped is
/// unmapped again and the refusals are reported.
fn map(
    cli: &Cli,
    c: &mut AnyClient,
    domid: DomId,
    gfn: &str,
    (read_only, attr, extents): (bool, MemAttr, bool),
    context: ContextId,
) -> Result<(), CliError> {
    let gfns: Vec<Gfn> = parse_range(gfn)?.into_iter().map(Gfn).collect();
    let perms = if read_only {
        Permissions::RO
    } else {
        Permissions::RW
    };
    let extent = pviommu_abi::EXTENT_PAGES as usize;
    if extents
        && (!gfns.len().is_multiple_of(extent)
            || gfns
                .first()
                .is_some_and(|g| !pviommu_abi::extent_aligned(g.0)))
    {
        return Err(CliError::invalid(format!(
            "--extents: the range {gfn} is not whole 2 MiB extents (from a multiple of 512, \
             a multiple of 512 gfns long)"
        )));
    }
    let bar = progress::bar(gfns.len() as u64, "mapping");
    let mut mapped: Vec<MapLine> = Vec::with_capacity(gfns.len());
    let mut failed: Vec<ItemError> = Vec::new();
    let mut first_error = None;
    let chunk_len = if extents { extent } else { MAP_CHUNK };
    for chunk in gfns.chunks(chunk_len) {
        let rs = match chunk.first() {
            Some(&first) if extents => match c.map_extent(domid, first, perms, attr, context) {
                Ok(b) => (0..extent as u64).map(|i| Ok(Bfn(b.0 + i))).collect(),
                Err(e) => {
                    failed.push(item_error(Some(first.0), None, &e));
                    first_error.get_or_insert(e);
                    Vec::new()
                }
            },
            _ => c.map_foreign(domid, chunk, perms, attr, context),
        };
        for (g, r) in chunk.iter().zip(rs) {
            match r {
                Ok(b) => mapped.push(MapLine { gfn: g.0, bfn: b.0 }),
                Err(e) => {
                    failed.push(item_error(Some(g.0), None, &e));
                    first_error.get_or_insert(e);
                }
            }
        }
        bar.inc(chunk.len() as u64);
        if first_error.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    if let Some(e) = first_error {
        let bfns: Vec<Bfn> = mapped.iter().map(|m| Bfn(m.bfn)).collect();
        let undo = c.unmap(&bfns, context);
        let mut err = CliError::from(e);
        match undo.iter().filter(|r| r.is_err()).count() {
            0 if bfns.is_empty() => {}
            0 => {
                err.message += &format!("; the {} page(s) mapped before were unmapped", bfns.len())
            }
            n => err.message += &format!("; {n} page(s) mapped before could not be unmapped"),
        }
        if failed.len() > 1 {
            err.message += &format!(" ({} pages refused)", failed.len());
        }
        err.items = failed;
        return Err(err);
    }
    emit(
        cli.json,
        &serde_json::json!({
            "domid": domid.0,
            "context": context.0,
            "access": output::access_name(perms),
            "attribute": output::attr_name(attr),
            "mappings": mapped,
        }),
        || {
            mapped
                .iter()
                .map(|l| format!("gfn {:#x} -> bfn {:#x}", l.gfn, l.bfn))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    Ok(())
}

/// `pviommu unmap`: all or nothing. A BFN not live in the context refuses
/// the whole command before anything is unmapped.
fn unmap(cli: &Cli, c: &mut AnyClient, bfn: &str, context: ContextId) -> Result<(), CliError> {
    let bfns: Vec<Bfn> = parse_range(bfn)?.into_iter().map(Bfn).collect();
    let queries: Vec<(ContextId, Bfn)> = bfns.iter().map(|b| (context, *b)).collect();
    let live = c.lookup_many(&queries)?;
    let dead: Vec<ItemError> = bfns
        .iter()
        .zip(&live)
        .filter(|(_, l)| l.is_none())
        .map(|(b, _)| ItemError {
            gfn: None,
            bfn: Some(b.0),
            errno: Errno::NoEnt.name().into(),
            code: Errno::NoEnt.code(),
        })
        .collect();
    if let Some(first) = dead.first() {
        let more = match dead.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        let mut e = CliError::with_errno(
            Errno::NoEnt,
            format!(
                "bfn {:#x}{more}: no such mapping in context {} ({}); nothing was unmapped",
                first.bfn.unwrap_or_default(),
                context.0,
                Errno::NoEnt.name()
            ),
        );
        e.items = dead;
        return Err(e);
    }
    let rs = c.unmap(&bfns, context);
    let failed: Vec<ItemError> = bfns
        .iter()
        .zip(&rs)
        .filter_map(|(b, r)| r.as_ref().err().map(|e| item_error(None, Some(b.0), e)))
        .collect();
    if let Some(first) = rs.into_iter().find_map(Result::err) {
        let mut e = CliError::from(first);
        e.items = failed;
        return Err(e);
    }
    emit(
        cli.json,
        &serde_json::json!({ "unmapped": bfns.len(), "context": context.0 }),
        || format!("unmapped {} BFN(s)", bfns.len()),
    );
    Ok(())
}

/// Set by a check that found something to fix (`host-windows`): the
/// command printed its report, and the process exits with status 1.
static CHECK_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn host_windows(cli: &Cli, c: &mut AnyClient, iomem: &Path) -> Result<(), CliError> {
    let text = std::fs::read_to_string(iomem)
        .map_err(|e| CliError::os(format!("read {}", iomem.display()), &e))?;
    let windows = host_windows::parse_iomem(&text)
        .map_err(|m| CliError::invalid(format!("{}: {m}", iomem.display())))?;
    let caps = c.refresh_caps()?;
    let (start, end) = (caps.bfn_window_start, caps.bfn_window_end);
    let regions = c.reserved_regions()?;
    let checked: Vec<_> = windows
        .iter()
        .map(|w| (w, host_windows::unreserved_bfns(w, start, end, &regions)))
        .collect();
    let open: Vec<&host_windows::HostWindow> = checked
        .iter()
        .filter(|(_, left)| !left.is_empty())
        .map(|(w, _)| *w)
        .collect();
    let option = (!open.is_empty()).then(|| host_windows::option_for(&open));
    let doc = serde_json::json!({
        "bfn_window": { "start": start, "end": end },
        "windows": checked.iter().map(|(w, left)| serde_json::json!({
            "first": w.first,
            "last": w.last,
            "name": w.name,
            "unreserved": left.iter().map(|(s, e)| serde_json::json!({ "start": s, "end": e })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "option": option,
    });
    emit(cli.json, &doc, || {
        let mut t =
            format!("PCI host-bridge windows against the BFN window {start:#x}..{end:#x}:\n");
        for (w, left) in &checked {
            let state = if left.is_empty() {
                "reserved, or outside the BFN window".to_string()
            } else {
                let runs: Vec<String> = left
                    .iter()
                    .map(|(s, e)| format!("{s:#x}..{e:#x}"))
                    .collect();
                format!("NOT RESERVED: BFNs {}", runs.join(", "))
            };
            t += &format!("{:#x}-{:#x} {}: {state}\n", w.first, w.last, w.name);
        }
        match &option {
            None => t + "every window is reserved where it meets the BFN window",
            Some(o) => {
                t += &format!(
                    "{} window(s) not reserved: a device placed there later (hot-plug, SR-IOV VFs, a moved BAR) \
                     would take addresses the hypervisor hands out as BFNs.\n\
                     Add to Xen's command line: {o}",
                    open.len()
                );
                if open.len() > host_windows::MAX_RESERVE_ITEMS {
                    t += &format!(
                        "\n(Xen takes {} reserve= items; merge neighbouring windows into one.)",
                        host_windows::MAX_RESERVE_ITEMS
                    );
                }
                t
            }
        }
    });
    if option.is_some() {
        CHECK_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// `pviommu stats`.
fn stats(cli: &Cli, c: &mut AnyClient, scan_limit: u64) -> Result<(), CliError> {
    let caps = c.refresh_caps()?;
    let live = caps.used.saturating_sub(caps.revoked);
    let found = scan::scan(c, caps.bfn_window_start, scan_limit, Some(live))?;
    let groups = scan::group(&found.mappings);
    let complete = found.mappings.len() as u64 >= live;
    // The hypervisor's own counters and time breakdown (PVIOMMU_CMD_stats):
    // only the control domain may read them, and only transports that
    // carry the command; null otherwise.
    let hv = c
        .hypervisor_stats(pviommu_abi::DomId(cli.caller), 0)
        .ok()
        .map(|s| {
            serde_json::json!({
                "maps": s.maps,
                "shared": s.shared,
                "unmaps": s.unmaps,
                "revocations": s.revocations,
                "flushes": s.flushes,
                "batches": s.batches,
                "mapped_pages": s.mapped_pages,
                "heap_bytes": s.heap_bytes,
                "ns": {
                    "batches": s.ns_batches,
                    "get_page": s.ns_get_page,
                    "put_page": s.ns_put_page,
                    "iommu_map": s.ns_iommu_map,
                    "iommu_unmap": s.ns_iommu_unmap,
                    "iommu_flush": s.ns_iommu_flush,
                },
            })
        });
    let doc = serde_json::json!({
        "caller": cli.caller,
        "quota": caps.quota,
        "used": caps.used,
        "free": caps.quota.saturating_sub(caps.used),
        "live": live,
        "revocations_pending": caps.revoked,
        "mappings": groups,
        "scan": {
            "from": caps.bfn_window_start,
            "bfns": found.scanned,
            "found": found.mappings.len(),
            "complete": complete,
        },
        "hypervisor": hv,
    });
    emit(cli.json, &doc, || {
        let mut s = format!(
            "d{}: {} of {} BFNs used ({} live, {} revoked awaiting acknowledgement)\n",
            cli.caller, caps.used, caps.quota, live, caps.revoked
        );
        s += &format!(
            "{:>8}  {:>7}  {:>8}  {:>8}\n",
            "domain", "context", "mappings", "writable"
        );
        for g in &groups {
            s += &format!(
                "{:>8}  {:>7}  {:>8}  {:>8}\n",
                format!("d{}", g.domid),
                g.context,
                g.mappings,
                g.writable
            );
        }
        if let Some(h) = &hv {
            s += &format!(
                "hypervisor: {} maps ({} shared), {} unmaps, {} revocations, {} flushes in {} batches; engine heap {} bytes\n",
                h["maps"], h["shared"], h["unmaps"], h["revocations"], h["flushes"], h["batches"], h["heap_bytes"]
            );
        }
        if !complete {
            s += &format!(
                "(found {} of {live} live mappings in the first {} BFNs; raise --scan-limit)",
                found.mappings.len(),
                found.scanned
            );
        }
        s.trim_end().to_string()
    });
    Ok(())
}

fn sim_reset(cli: &Cli) -> Result<(), CliError> {
    if cli.backend != Backend::Sim {
        return Err(CliError::invalid(
            "sim reset is for the embedded simulator (--backend sim); restart the daemon instead",
        ));
    }
    let path = state_path(cli);
    let existed = SimState::reset(&path)?;
    emit(
        cli.json,
        &serde_json::json!({ "state_file": path, "reset": existed }),
        || {
            if existed {
                format!("{}: simulator state cleared", path.display())
            } else {
                format!("{}: no state yet", path.display())
            }
        },
    );
    Ok(())
}

/// The simulator's own events (ballooning, domain death), on the embedded
/// simulator or the daemon.
fn sim_admin(cli: &Cli, state: Option<&SimState>, action: &SimAction) -> Result<(), CliError> {
    let mut remote = match (cli.backend, state) {
        (Backend::Remote, _) => Some(Remote::connect(&cli.socket, DomId(cli.caller))?),
        (Backend::Sim, Some(_)) => None,
        _ => {
            return Err(CliError::invalid(
                "this simulator command needs --backend sim or remote",
            ))
        }
    };
    match action {
        SimAction::BalloonOut { domid, gfn } => {
            let gfn = parse_num(gfn)?;
            match (remote.as_mut(), state) {
                (Some(r), _) => r.balloon_out(DomId(*domid), Gfn(gfn))?,
                (None, Some(s)) => s.balloon_out(DomId(*domid), Gfn(gfn))?,
                (None, None) => {}
            }
            emit(
                cli.json,
                &serde_json::json!({ "ballooned_out": { "domid": domid, "gfn": gfn } }),
                || format!("d{domid} gfn {gfn:#x} ballooned out"),
            );
        }
        SimAction::DestroyDomain { domid } => {
            match (remote.as_mut(), state) {
                (Some(r), _) => r.destroy_domain(DomId(*domid))?,
                (None, Some(s)) => s.destroy_domain(DomId(*domid))?,
                (None, None) => {}
            }
            emit(cli.json, &serde_json::json!({ "destroyed": domid }), || {
                format!("d{domid} destroyed")
            });
        }
        SimAction::Serve { .. } | SimAction::Reset | SimAction::Devices => {}
    }
    Ok(())
}

/// `pviommu context ...`.
fn context_cmd(cli: &Cli, c: &mut AnyClient, action: &ContextAction) -> Result<(), CliError> {
    match action {
        ContextAction::Create => {
            let ctx = c
                .context_create()
                .map_err(|e| context_error(ContextOp::Create, "context create".into(), e))?;
            emit(cli.json, &serde_json::json!({ "context": ctx.0 }), || {
                format!("context {}", ctx.0)
            });
        }
        ContextAction::Destroy { context } => {
            let ctx = own_context(*context, "it lives as long as the domain")?;
            c.context_destroy(ctx).map_err(|e| {
                context_error(ContextOp::Destroy, format!("destroy context {}", ctx.0), e)
            })?;
            emit(cli.json, &serde_json::json!({ "destroyed": ctx.0 }), || {
                format!("context {} destroyed", ctx.0)
            });
        }
        ContextAction::Attach { context, device } => {
            let device = parse_sbdf(device)?;
            let ctx = own_context(
                *context,
                "every device starts there; attach to a context from `pviommu context create`",
            )?;
            c.context_attach(ctx, device).map_err(|e| {
                context_error(
                    ContextOp::Attach,
                    format!("attach {device} to context {}", ctx.0),
                    e,
                )
            })?;
            emit(
                cli.json,
                &serde_json::json!({ "attached": { "device": device.to_string(), "context": ctx.0 } }),
                || format!("{device} attached to context {}", ctx.0),
            );
        }
        ContextAction::Detach { context, device } => {
            let device = parse_sbdf(device)?;
            let ctx = own_context(
                *context,
                "name the context the device is attached to; detaching puts it back in 0",
            )?;
            c.context_detach(ctx, device).map_err(|e| {
                context_error(
                    ContextOp::Detach,
                    format!("detach {device} from context {}", ctx.0),
                    e,
                )
            })?;
            emit(
                cli.json,
                &serde_json::json!({ "detached": { "device": device.to_string(), "context": ctx.0 } }),
                || {
                    format!(
                        "{device} detached from context {}: back in context 0",
                        ctx.0
                    )
                },
            );
        }
    }
    Ok(())
}

/// `pviommu sim devices`: the embedded simulator's PCI devices, where each
/// one's DMA goes now.
fn sim_devices(cli: &Cli, state: Option<&SimState>) -> Result<(), CliError> {
    let Some(state) = state else {
        return Err(CliError::invalid(
            "sim devices lists the embedded simulator's devices (--backend sim); the \
             daemon's machine has the same two, 0000:00:02.0 and 0000:00:03.0, both dom0's",
        ));
    };
    let g = state.sim().lock();
    let (m, e) = &*g;
    let devices: Vec<DeviceJson> = world::DEVICES
        .iter()
        .filter_map(|&sbdf| {
            let d = m.device(sbdf)?;
            let owner = d.facts.owner;
            let context = e.device_context(owner, sbdf).unwrap_or(ContextId::DEFAULT);
            Some(DeviceJson {
                device: sbdf.to_string(),
                owner: owner.0,
                context: context.0,
                own_requester_id: d.facts.own_requester_id,
                rmrr: d.facts.rmrr,
                ats: d.facts.ats,
            })
        })
        .collect();
    emit(cli.json, &serde_json::json!({ "devices": devices }), || {
        let mut s = format!(
            "{:<14}  {:>5}  {:>7}  attachable\n",
            "device", "owner", "context"
        );
        for d in &devices {
            let attachable = d.own_requester_id && !d.rmrr && !d.ats;
            s += &format!(
                "{:<14}  {:>5}  {:>7}  {}\n",
                d.device,
                format!("d{}", d.owner),
                d.context,
                if attachable { "yes" } else { "no" }
            );
        }
        s.trim_end().to_string()
    });
    Ok(())
}

fn serve(socket: &std::path::Path) -> Result<(), CliError> {
    let sim = SharedSim::new(world::build(), Default::default())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| CliError::os("start the runtime", &e))?;
    rt.block_on(async {
        let listener =
            pviommu_guest::daemon::bind(socket).map_err(|e| CliError::os(socket.display(), &e))?;
        eprintln!(
            "pviommu: serving the simulated machine on {}",
            socket.display()
        );
        pviommu_guest::daemon::serve(listener, sim.arc()).await;
        Ok(())
    })
}

/// Whether the command line asks for JSON (for errors found while parsing
/// it, before `Cli` exists).
fn wants_json() -> bool {
    std::env::args_os().skip(1).any(|a| a == "--json")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PVIOMMU_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let informational = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            if !informational && wants_json() {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                let msg = first.trim_start_matches("error: ").to_string();
                println!("{}", CliError::invalid(msg).to_json());
                return ExitCode::from(2);
            }
            e.exit();
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(()) if CHECK_FAILED.load(std::sync::atomic::Ordering::Relaxed) => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&e.to_json()).unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pviommu: {}", e.message);
            ExitCode::FAILURE
        }
    }
}
