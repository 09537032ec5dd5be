//! nvtarget: an iSCSI block target.

mod admin;
mod config;
mod configfile;
mod datadir;
mod drill;
mod filedev;
mod ha;
mod interconnect;
mod mailbox;
mod metrics;
mod node;
mod pair;
mod partner;
mod portal;
mod progress;
mod proxy;
mod prstore;
mod status;
mod storedev;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nvtarget",
    version,
    about = "iSCSI block target serving LUNs from a write-anywhere store"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the configured targets (default: one 1 GiB LUN on 127.0.0.1:3260).
    Serve(ServeArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// What the node running on a data directory is doing: targets, LUNs,
    /// sessions, ALUA, NVRAM, CPs, partner (asks it over DATA_DIR/admin.sock).
    Status {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a LUN of the running node; saved to its configuration.
    Lun {
        #[command(subcommand)]
        cmd: LunCmd,
    },
    /// Allow or disallow an initiator on a target of the running node; saved
    /// to its configuration.
    Acl {
        #[command(subcommand)]
        cmd: AclCmd,
    },
    /// Set or clear a target's CHAP secrets on the running node; saved to
    /// its configuration.
    Chap {
        #[command(subcommand)]
        cmd: ChapCmd,
    },
    /// Snapshots of LUNs in the aggregate (offline: the target must be stopped).
    Snapshot {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        args: nvtarget_lun::cli::SnapshotArgs,
    },
    /// NVRAM log tools.
    Nvram {
        #[command(subcommand)]
        cmd: NvramCmd,
    },
    /// A local HA pair of two processes (node a on 127.0.0.1, b on 127.0.0.2).
    Pair {
        #[command(subcommand)]
        cmd: PairCmd,
    },
    /// Failover drills on a local pair under a verifying iSCSI load: kill
    /// the owner, kill the partner or cut the interconnect, round after
    /// round; reports detection, takeover steps, pauses, losses, giveback.
    Drill(drill::DrillArgs),
    /// Aggregate tools: `check` verifies everything, `space` reports usage.
    Aggr {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        args: nvtarget_lun::cli::AggrArgs,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Listen on ADDR:PORT instead of the configured portals.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Where LUN images and state live.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration; without it the embedded default is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR:PORT (default: `node.metrics` of
    /// the configuration; off when neither is set).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
}

/// A target of the running node.
#[derive(clap::Args)]
struct TargetArg {
    /// The target's IQN.
    #[arg(long, value_name = "IQN")]
    target: String,
}

#[derive(Subcommand)]
enum LunCmd {
    /// Serve a new LUN at once (initiators see REPORTED LUNS DATA HAS CHANGED).
    Add {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
        #[arg(long, value_name = "N")]
        lun: u64,
        /// Size with a unit: 2G, 512MiB.
        #[arg(long)]
        size: String,
        /// Name in the aggregate (default lunN).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        block_size: Option<u32>,
    },
    /// Stop serving a LUN; its data stays in the aggregate (adding a LUN of
    /// the same name serves it again).
    Remove {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
        #[arg(long, value_name = "N")]
        lun: u64,
    },
}

#[derive(Subcommand)]
enum AclCmd {
    /// Allow an initiator (a target with no list admits everyone; with a
    /// list, only those on it).
    Add {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
        #[arg(long, value_name = "IQN")]
        initiator: String,
    },
    /// Take an initiator off the list (sessions already logged in stay).
    Remove {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
        #[arg(long, value_name = "IQN")]
        initiator: String,
    },
}

#[derive(Subcommand)]
enum ChapCmd {
    /// Require CHAP at the next login (mutual CHAP with --mutual-*).
    Set {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
        #[arg(long)]
        user: String,
        /// 12 to 255 characters.
        #[arg(long)]
        secret: String,
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
    },
    /// No CHAP from the next login on.
    Clear {
        #[command(flatten)]
        dir: DataDirArg,
        #[command(flatten)]
        target: TargetArg,
    },
}

/// `--data-dir` of the offline tools; accepted before or after the subcommand.
#[derive(clap::Args)]
struct DataDirArg {
    #[arg(
        long = "data-dir",
        global = true,
        value_name = "DIR",
        default_value = "nvtarget-data"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum NvramCmd {
    /// Print the log: halves, records (seq, op, LUN, range), and what a
    /// restart would replay on top of the aggregate's last CP.
    Dump {
        #[command(flatten)]
        dir: DataDirArg,
    },
}

/// Where a local pair lives: `DIR/a`, `DIR/b`, their configs, PIDs, logs.
#[derive(clap::Args)]
struct PairDirArg {
    #[arg(
        long = "data-dir",
        global = true,
        value_name = "DIR",
        default_value = "nvtarget-pair"
    )]
    path: PathBuf,
    /// iSCSI port of both portals; the interconnects use PORT + 10.
    #[arg(long, global = true, default_value_t = 3260)]
    port: u16,
}

#[derive(Subcommand)]
enum PairCmd {
    /// Write both nodes' configurations and start both processes.
    Up {
        #[command(flatten)]
        dir: PairDirArg,
    },
    /// Stop both nodes (SIGTERM, then wait).
    Down {
        #[command(flatten)]
        dir: PairDirArg,
    },
    /// Each node's state, epoch, mirroring and mailbox.
    Status {
        #[command(flatten)]
        dir: PairDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Return a node's storage from the partner that took it over (the node
    /// must be running again, waiting for giveback).
    Giveback {
        #[command(flatten)]
        dir: PairDirArg,
        /// The node whose storage comes back.
        #[arg(long, default_value = "a")]
        node: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a configuration file and print what it defines.
    Check { file: PathBuf },
    /// Print the embedded default configuration.
    Default,
}

fn init_logging(json: bool) {
    progress::set_log_json(json);
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Snapshot {
            dir: DataDirArg { path: data_dir },
            args,
        } => {
            let _lock = datadir::lock(&data_dir)?;
            nvtarget_lun::cli::snapshot_cmd(&data_dir, args)
        }
        Cmd::Aggr {
            dir: DataDirArg { path: data_dir },
            args,
        } => {
            let _lock = datadir::lock(&data_dir)?;
            match args.cmd {
                nvtarget_lun::cli::AggrCmd::Check => {
                    let agg = nvtarget_lun::cli::open_existing(&data_dir)?;
                    let mut p = progress::Progress::new("checking the aggregate");
                    let r = nvtarget_lun::cli::aggr_check_with(
                        &agg,
                        &mut std::io::stdout(),
                        &mut |done, total, what| p.update(done, total, what),
                    );
                    p.finish();
                    r
                }
                _ => nvtarget_lun::cli::aggr_cmd(&data_dir, args),
            }
        }
        Cmd::Nvram {
            cmd: NvramCmd::Dump {
                dir: DataDirArg { path: data_dir },
            },
        } => {
            // Read-only: safe next to a running target, which may be
            // appending (the dump then shows a moment of the log).
            let committed = nvtarget_lun::cli::open_existing(&data_dir)
                .ok()
                .map(|a| a.highest_seq());
            let path = nvtarget_nvram::region_path(&data_dir);
            nvtarget_nvram::dump(&path, &mut std::io::stdout().lock(), committed)
                .with_context(|| format!("dumping {}", path.display()))?;
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let c = config::Config::load(Some(&file))?;
            println!("{}: ok", file.display());
            for p in &c.portals {
                println!("portal {} tpgt {}", p.listen, p.tpgt);
            }
            for t in &c.targets {
                println!(
                    "target {} ({} LUNs, initiators: {}, chap: {})",
                    t.name,
                    t.luns.len(),
                    if t.allowed_initiators.is_empty() {
                        "all".into()
                    } else {
                        t.allowed_initiators.join(", ")
                    },
                    if t.chap.is_some() { "yes" } else { "no" }
                );
                for l in &t.luns {
                    println!(
                        "  lun {} {} {} block {}",
                        l.id,
                        l.name(),
                        l.size,
                        l.block_size
                    );
                }
            }
            Ok(())
        }
        Cmd::Pair { cmd } => match cmd {
            PairCmd::Up { dir } => pair::up(&pair::PairSpec::local(&dir.path, dir.port)),
            PairCmd::Down { dir } => pair::down(&pair::PairSpec::local(&dir.path, dir.port)),
            PairCmd::Status { dir, json } => {
                pair::status(&pair::PairSpec::local(&dir.path, dir.port), json)
            }
            PairCmd::Giveback { dir, node } => {
                let n = pair::NODES
                    .iter()
                    .position(|x| *x == node)
                    .with_context(|| format!("--node {node}: the nodes are a and b"))?;
                let t = pair::giveback(
                    &pair::PairSpec::local(&dir.path, dir.port),
                    n,
                    std::time::Duration::from_secs(120),
                )?;
                println!("node {node} serves again after {} ms", t.as_millis());
                Ok(())
            }
        },
        Cmd::Drill(args) => drill::run(args),
        Cmd::Status {
            dir: DataDirArg { path },
            json,
        } => {
            let v = admin::call(&path, &admin::Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                status::render(&v, &mut std::io::stdout().lock())?;
            }
            Ok(())
        }
        Cmd::Lun { cmd } => {
            let (path, req) = match cmd {
                LunCmd::Add {
                    dir,
                    target,
                    lun,
                    size,
                    name,
                    block_size,
                } => (
                    dir.path,
                    admin::Request::LunAdd {
                        target: target.target,
                        lun,
                        size,
                        name,
                        block_size,
                    },
                ),
                LunCmd::Remove { dir, target, lun } => (
                    dir.path,
                    admin::Request::LunRemove {
                        target: target.target,
                        lun,
                    },
                ),
            };
            print_change(&admin::call(&path, &req)?)
        }
        Cmd::Acl { cmd } => {
            let (path, req) = match cmd {
                AclCmd::Add {
                    dir,
                    target,
                    initiator,
                } => (
                    dir.path,
                    admin::Request::AclAdd {
                        target: target.target,
                        initiator,
                    },
                ),
                AclCmd::Remove {
                    dir,
                    target,
                    initiator,
                } => (
                    dir.path,
                    admin::Request::AclRemove {
                        target: target.target,
                        initiator,
                    },
                ),
            };
            print_change(&admin::call(&path, &req)?)
        }
        Cmd::Chap { cmd } => {
            let (path, req) = match cmd {
                ChapCmd::Set {
                    dir,
                    target,
                    user,
                    secret,
                    mutual_user,
                    mutual_secret,
                } => (
                    dir.path,
                    admin::Request::ChapSet {
                        target: target.target,
                        user,
                        secret,
                        mutual_user,
                        mutual_secret,
                    },
                ),
                ChapCmd::Clear { dir, target } => (
                    dir.path,
                    admin::Request::ChapClear {
                        target: target.target,
                    },
                ),
            };
            print_change(&admin::call(&path, &req)?)
        }
        Cmd::Config {
            cmd: ConfigCmd::Default,
        } => {
            print!("{}", config::DEFAULT_CONFIG);
            Ok(())
        }
    }
}

/// What a live change did, for the person who asked.
fn print_change(v: &serde_json::Value) -> anyhow::Result<()> {
    let luns: Vec<String> = v["luns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "{} ({}, {})",
                l["id"],
                l["name"].as_str().unwrap_or("-"),
                l["size"].as_str().unwrap_or("-")
            )
        })
        .collect();
    let allowed: Vec<&str> = v["allowed_initiators"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str())
        .collect();
    println!("target {}", v["target"].as_str().unwrap_or("-"));
    println!("  luns: {}", luns.join(", "));
    println!(
        "  initiators: {}",
        if allowed.is_empty() {
            "all".to_string()
        } else {
            allowed.join(", ")
        }
    );
    println!("  chap: {}", if v["chap"] == true { "yes" } else { "no" });
    println!("saved to {}", v["saved_to"].as_str().unwrap_or("-"));
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    // Without --config, a node runs from DATA_DIR/nvtarget.toml once a live
    // change saved one, else from the embedded default.
    let (mut cfg, data_dir, config_file) = match &a.config {
        Some(path) => {
            let cfg = config::Config::load(Some(path))?;
            let data_dir = a
                .data_dir
                .clone()
                .or_else(|| cfg.node.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("nvtarget-data"));
            (cfg, data_dir, path.clone())
        }
        None => {
            let data_dir = a
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("nvtarget-data"));
            let saved = configfile::ConfigFile::saved_path(&data_dir);
            let cfg = if saved.exists() {
                tracing::info!(config = %saved.display(), "loading the configuration saved by live changes");
                config::Config::load(Some(&saved))?
            } else {
                config::Config::load(None)?
            };
            (cfg, data_dir, saved)
        }
    };
    if let Some(l) = &a.listen {
        cfg.override_listen(l);
    }
    if cfg.portals.is_empty() {
        anyhow::bail!("no portal configured: add a [[portal]] section or pass --listen");
    }
    let metrics_addr = a.metrics.clone().or_else(|| cfg.node.metrics.clone());
    let origin = status::Origin {
        config: a.config.as_ref().map(|p| p.display().to_string()),
        saved_to: config_file.display().to_string(),
        metrics: metrics_addr.clone(),
    };
    let _lock = datadir::lock(&data_dir)?;
    let pair = cfg
        .pair
        .as_ref()
        .map(|p| ha::PairPaths::resolve(p, a.config.as_deref()));
    // A pair node whose storage its partner took over waits for giveback.
    let fence = match &pair {
        Some(p) => {
            let epoch = ha::wait_until_ours(&p.sec.node, &data_dir)?;
            let mb = Arc::new(mailbox::Mailbox::open(&data_dir)?);
            Some((ha::Ha::own_fence(mb, epoch), epoch))
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let metrics = metrics::Metrics::new();
        let node = Arc::new(node::Node::build(
            cfg.clone(),
            &data_dir,
            metrics.clone(),
            fence.as_ref().map(|(f, _)| f.clone()),
        )?);
        let ha = match (&pair, &fence) {
            (Some(p), Some((_, epoch))) => {
                Some(ha::Ha::start(node.clone(), p.clone(), &data_dir, *epoch).await?)
            }
            _ => None,
        };
        let mut tasks = tokio::task::JoinSet::new();
        status::register_collectors(&node);
        if let Some(addr) = &metrics_addr {
            // Storage service does not depend on its dashboard: a taken
            // port is logged, not fatal.
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(metrics = %addr, "serving metrics");
                    tasks.spawn(metrics::serve(listener, metrics.clone()));
                }
                Err(e) => {
                    tracing::error!(metrics = %addr, error = %e, "cannot serve metrics")
                }
            }
        }
        let admin = Arc::new(admin::Admin {
            node: node.clone(),
            file: configfile::ConfigFile::new(config_file),
            origin,
        });
        let admin_listener = admin::bind(&data_dir)?;
        tasks.spawn(admin::serve(admin_listener, admin));
        for p in &cfg.portals {
            let listener = tokio::net::TcpListener::bind(&p.listen)
                .await
                .with_context(|| format!("binding portal {}", p.listen))?;
            tracing::info!(portal = %p.listen, "listening");
            tasks.spawn(portal::serve_portal(listener, node.clone(), p.tpgt));
        }
        for t in &cfg.targets {
            tracing::info!(target = %t.name, luns = t.luns.len(), "serving");
        }
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(Ok(Err(e))) => Err(e),
                Some(Err(e)) => Err(e.into()),
                _ => Ok(()),
            },
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                let _ = std::fs::remove_file(admin::socket_path(&data_dir));
                if let Some(h) = &ha {
                    h.shutdown();
                }
                // Without the NVRAM log, a final CP is what keeps the
                // writes still in the dirty set.
                let n = node.clone();
                tokio::task::spawn_blocking(move || n.shutdown()).await??;
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
