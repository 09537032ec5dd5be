//! A local HA pair: two `nvtarget serve` processes on one machine.
//!
//! `nvtarget pair up --data-dir DIR` lays the pair out as
//!
//! ```text
//! DIR/a.toml  DIR/b.toml     each node's configuration ([pair] section)
//! DIR/a/      DIR/b/         each node's data directory (aggregate, NVRAM,
//!                            mailbox, status.json, takeover.json)
//! DIR/a.pid   DIR/b.pid      process ids
//! DIR/a.log   DIR/b.log      each node's stdout and stderr
//! ```
//!
//! Node a serves `iqn.2026-11.io.nvtarget:a` LUN 0 on 127.0.0.1, node b
//! `iqn.2026-11.io.nvtarget:b` LUN 0 on 127.0.0.2, both on the same port;
//! each serves Prometheus metrics on its own address at port + 20.
//! The data directories stand for shared storage: each node can open the
//! other's aggregate and mailbox. The drill uses [`PairSpec`] with other
//! ports and with the interconnect routed through a relay it can cut.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The two nodes' names, in index order.
pub const NODES: [&str; 2] = ["a", "b"];

/// Where a local pair lives and how its nodes reach each other.
#[derive(Debug, Clone)]
pub struct PairSpec {
    pub dir: PathBuf,
    /// Each node's iSCSI portal (index 0 = node a).
    pub portal: [SocketAddr; 2],
    /// Each node's interconnect listener.
    pub interconnect: [SocketAddr; 2],
    /// What each node dials to reach its partner's interconnect: normally the
    /// partner's listener, a relay in the drill.
    pub partner_interconnect: [SocketAddr; 2],
    /// Each node's metrics endpoint (`node.metrics`), if any.
    pub metrics: [Option<SocketAddr>; 2],
    pub lun_size: String,
    pub aggregate_size: String,
    pub nvram_size: String,
    /// `node.cp_interval_ms`; None leaves the default (10 s).
    pub cp_interval_ms: Option<u64>,
    pub heartbeat_ms: u64,
    pub missed_heartbeats: u32,
    pub paths: u8,
}

impl PairSpec {
    /// The standard layout: portals 127.0.0.1:`port` and 127.0.0.2:`port`,
    /// interconnects on `port + 10` and metrics on `port + 20` of the same
    /// addresses.
    pub fn local(dir: &Path, port: u16) -> PairSpec {
        let ip = |n: u8| std::net::IpAddr::from([127, 0, 0, n]);
        let ic = port.wrapping_add(10);
        let interconnect = [SocketAddr::new(ip(1), ic), SocketAddr::new(ip(2), ic)];
        let mp = port.wrapping_add(20);
        PairSpec {
            metrics: [
                Some(SocketAddr::new(ip(1), mp)),
                Some(SocketAddr::new(ip(2), mp)),
            ],
            dir: dir.to_path_buf(),
            portal: [SocketAddr::new(ip(1), port), SocketAddr::new(ip(2), port)],
            interconnect,
            partner_interconnect: [interconnect[1], interconnect[0]],
            lun_size: "1GiB".into(),
            aggregate_size: "4GiB".into(),
            nvram_size: "256MiB".into(),
            cp_interval_ms: None,
            heartbeat_ms: 100,
            missed_heartbeats: 10,
            paths: 1,
        }
    }

    pub fn target_name(node: usize) -> String {
        format!("iqn.2026-11.io.nvtarget:{}", NODES[node])
    }

    pub fn config_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.toml", NODES[node]))
    }

    pub fn data_dir(&self, node: usize) -> PathBuf {
        self.dir.join(NODES[node])
    }

    pub fn pid_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.pid", NODES[node]))
    }

    pub fn log_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.log", NODES[node]))
    }

    /// The configuration text of `node`.
    pub fn config_text(&self, node: usize) -> String {
        let other = 1 - node;
        format!(
            r#"# Node {name} of a local HA pair, written by `nvtarget pair up`.

[node]
data_dir = "{name}"
aggregate_size = "{aggr}"
nvram_size = "{nvram}"{cp}{metrics}

[[portal]]
listen = "{portal}"
tpgt = {tpgt}

[pair]
node = "{name}"
partner = "{partner}"
interconnect = "{ic}"
partner_interconnect = "{pic}"
partner_portal = "{pportal}"
partner_config = "{partner}.toml"
partner_data_dir = "{partner}"
paths = {paths}
heartbeat_ms = {hb}
missed_heartbeats = {missed}

[[target]]
name = "{target}"

[[target.lun]]
id = 0
name = "{name}0"
size = "{lun_size}"
block_size = 512
"#,
            name = NODES[node],
            partner = NODES[other],
            aggr = self.aggregate_size,
            nvram = self.nvram_size,
            cp = self
                .cp_interval_ms
                .map(|ms| format!("\ncp_interval_ms = {ms}"))
                .unwrap_or_default(),
            metrics = self.metrics[node]
                .map(|m| format!("\nmetrics = \"{m}\""))
                .unwrap_or_default(),
            portal = self.portal[node],
            tpgt = node + 1,
            ic = self.interconnect[node],
            pic = self.partner_interconnect[node],
            pportal = self.portal[other],
            paths = self.paths,
            hb = self.heartbeat_ms,
            missed = self.missed_heartbeats,
            target = Self::target_name(node),
            lun_size = self.lun_size,
        )
    }

    /// Writes `DIR/a.toml` and `DIR/b.toml`.
    pub fn write_configs(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        for n in 0..2 {
            let p = self.config_path(n);
            std::fs::write(&p, self.config_text(n))
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }

    /// Starts node `node` with the binary `exe` (`serve --config DIR/x.toml
    /// --data-dir DIR/x`) in its own process group, output to `DIR/x.log`,
    /// and records its PID in `DIR/x.pid`.
    pub fn spawn(&self, node: usize, exe: &Path) -> anyhow::Result<u32> {
        use std::os::unix::process::CommandExt;
        let log_path = self.log_path(node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let err = log.try_clone().context("duplicating the log file")?;
        let child = std::process::Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(self.config_path(node))
            .arg("--data-dir")
            .arg(self.data_dir(node))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting node {}", NODES[node]))?;
        let pid = child.id();
        let pid_path = self.pid_path(node);
        std::fs::write(&pid_path, format!("{pid}\n"))
            .with_context(|| format!("writing {}", pid_path.display()))?;
        Ok(pid)
    }
}

/// The PID recorded for `node`, if any.
pub fn read_pid(spec: &PairSpec, node: usize) -> Option<u32> {
    std::fs::read_to_string(spec.pid_path(node))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` exists (signal 0).
pub fn alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `nvtarget pair up`: configs, both processes, both portals listening.
/// A node already running is left alone (so `up` also restarts the one that
/// failed; it then waits for `pair giveback`).
pub fn up(spec: &PairSpec) -> anyhow::Result<()> {
    spec.write_configs()?;
    let exe = std::env::current_exe().context("locating the nvtarget binary")?;
    for (n, name) in NODES.iter().enumerate() {
        if let Some(pid) = read_pid(spec, n).filter(|&p| alive(p)) {
            println!("node {name} already running (pid {pid})");
            continue;
        }
        let pid = spec.spawn(n, &exe)?;
        // A node whose storage is taken over has no portal until giveback.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            // After a takeover the partner answers on our address: the
            // portal counts only once the mailbox says the storage is ours.
            let ours = crate::mailbox::Mailbox::open(&spec.data_dir(n))
                .and_then(|m| m.read())
                .map_or(true, |s| s.taken_over_by.is_none());
            if ours && wait_listening(spec.portal[n], Duration::from_millis(200)) {
                println!(
                    "node {name} pid {pid} portal {} target {} metrics {} (log {})",
                    spec.portal[n],
                    PairSpec::target_name(n),
                    spec.metrics[n].map_or("off".to_string(), |m| format!("http://{m}/metrics")),
                    spec.log_path(n).display()
                );
                break;
            }
            if read_status(spec, n)
                .is_some_and(|s| s["state"] == "waiting-giveback" && s["pid"] == pid)
            {
                println!(
                    "node {name} pid {pid} is up and waiting for its storage: `nvtarget pair giveback --node {name}`"
                );
                break;
            }
            if !ours {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !alive(pid) || Instant::now() > end {
                anyhow::bail!(
                    "node {name} (pid {pid}) did not open its portal {}; see {}",
                    spec.portal[n],
                    spec.log_path(n).display()
                );
            }
        }
    }
    Ok(())
}

/// `nvtarget pair down`: SIGTERM to both nodes, then wait for them to exit.
pub fn down(spec: &PairSpec) -> anyhow::Result<()> {
    for (n, name) in NODES.iter().enumerate() {
        let Some(pid) = read_pid(spec, n) else {
            continue;
        };
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let end = Instant::now() + Duration::from_secs(30);
        while alive(pid) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            anyhow::bail!("node {name} (pid {pid}) did not stop within 30 s");
        }
        let _ = std::fs::remove_file(spec.pid_path(n));
        println!("node {name} stopped");
    }
    Ok(())
}

/// A node's `status.json`, if it wrote one.
pub fn read_status(spec: &PairSpec, node: usize) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(spec.data_dir(node).join(crate::ha::STATUS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether `node` serves its own target again, according to its status.
fn serves_own(spec: &PairSpec, node: usize) -> bool {
    read_status(spec, node).is_some_and(|s| {
        s["state"]
            .as_str()
            .is_some_and(|st| st.starts_with("serving"))
            && s["pid"].as_u64().map(|p| p as u32) == read_pid(spec, node)
            && s["serving"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|t| t.as_str() == Some(&PairSpec::target_name(node)))
            })
    })
}

/// Asks the node that took over `node`'s storage to give it back; returns
/// once `node` serves again. `node` must be running (waiting for giveback).
pub fn giveback(spec: &PairSpec, node: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mb = crate::mailbox::Mailbox::open(&spec.data_dir(node))?;
    let s = mb.read()?;
    if s.taken_over_by.is_none() {
        anyhow::bail!(
            "node {}'s storage is not taken over: nothing to give back",
            NODES[node]
        );
    }
    mb.update(|s| s.giveback_requested = true)?;
    while t0.elapsed() < timeout {
        if mb.read()?.taken_over_by.is_none() && serves_own(spec, node) {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!(
        "node {} does not serve again {} s after the giveback request (is it running? see {})",
        NODES[node],
        timeout.as_secs(),
        spec.log_path(node).display()
    )
}

/// `nvtarget pair status`: each node's role, state, epoch and mailbox.
pub fn status(spec: &PairSpec, json: bool) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for (n, name) in NODES.iter().enumerate() {
        let pid = read_pid(spec, n);
        let running = pid.is_some_and(alive);
        let st = read_status(spec, n);
        let mb = crate::mailbox::Mailbox::open(&spec.data_dir(n))
            .and_then(|m| m.read())
            .ok();
        if json {
            all.push(serde_json::json!({
                "node": name, "pid": pid, "running": running, "status": st, "mailbox": mb,
            }));
            continue;
        }
        let field = |k: &str| {
            st.as_ref()
                .map(|s| s[k].to_string())
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "node {name}: pid {} {} state {} mirrored {} epoch {} serving {}",
            pid.map_or("-".into(), |p| p.to_string()),
            if running { "running" } else { "not running" },
            field("state"),
            field("mirrored"),
            field("epoch"),
            field("serving"),
        );
        if let Some(l) = st.as_ref().map(|s| &s["log"]).filter(|l| l.is_object()) {
            println!(
                "  log: half {} {}% full, CPs {}, next seq {}; mirror lag {} records / {} bytes (acked {}, pruned {})",
                l["active_half"],
                l["fill_pct"],
                l["cps"],
                l["next_seq"],
                l["mirror_lag_records"],
                l["mirror_lag_bytes"],
                l["mirror_acked_seq"],
                l["pruned_seq"],
            );
        }
        if let Some(p) = st
            .as_ref()
            .map(|s| &s["partner_reads"])
            .filter(|p| p.is_object())
        {
            println!(
                "  partner's targets here: {} reads live-replayed, {} commands forwarded, {} forward errors",
                p["live_replayed"], p["forwarded"], p["forward_errors"],
            );
        }
        if let Some(m) = mb {
            println!(
                "  mailbox: epoch {} heartbeat {} ({} ms ago) owner {:?} unmirrored {} taken over by {}",
                m.epoch,
                m.heartbeat,
                crate::ha::unix_ms().saturating_sub(m.heartbeat_unix_ms),
                m.owner_state,
                m.unmirrored,
                m.taken_over_by.as_deref().unwrap_or("-")
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_pair_configs_are_what_pair_up_writes() {
        let spec = PairSpec::local(Path::new("examples/pair"), 3260);
        for (n, name) in NODES.iter().enumerate() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/pair")
                .join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&path).unwrap();
            let example = crate::config::Config::parse(&text, "example").unwrap();
            let generated = crate::config::Config::parse(&spec.config_text(n), "gen").unwrap();
            assert_eq!(
                format!("{example:?}"),
                format!("{generated:?}"),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn generated_configs_parse_and_point_at_each_other() {
        let spec = PairSpec::local(Path::new("/tmp/pair"), 3260);
        for (n, name) in NODES.iter().enumerate() {
            let cfg = crate::config::Config::parse(&spec.config_text(n), "gen")
                .unwrap_or_else(|e| panic!("node {n}: {e}"));
            let p = cfg.pair.clone().expect("pair section");
            assert_eq!(p.node, *name);
            assert_eq!(p.partner_interconnect, spec.interconnect[1 - n].to_string());
            assert_eq!(p.partner_portal, spec.portal[1 - n].to_string());
            // `pair up` turns metrics on, one endpoint per node address.
            let m: SocketAddr = cfg.node.metrics.as_deref().unwrap().parse().unwrap();
            assert_eq!((m.ip(), m.port()), (spec.portal[n].ip(), 3280));
            assert_eq!(cfg.targets[0].name, PairSpec::target_name(n));
            assert_eq!(cfg.cp_interval(), crate::storedev::DEFAULT_CP_INTERVAL);
        }
        let mut big = spec.clone();
        big.cp_interval_ms = Some(600_000);
        big.nvram_size = "9GiB".into();
        let cfg = crate::config::Config::parse(&big.config_text(0), "gen").unwrap();
        assert_eq!(cfg.cp_interval(), Duration::from_secs(600));
        assert_eq!(cfg.nvram_size(), 9 << 30);
    }
}
