//! `nvtarget drill`: failover drills on a local pair under a verifying load.
//!
//! The drill starts a pair ([`PairSpec::local`]) whose interconnect runs
//! through an in-process [`Relay`] it can cut, drives node a's LUN 0 with
//! the client crate's verifying load ([`Oracle`]: writes with unique
//! patterns, plus reads checked for going back in time), injects one fault
//! per round (SIGKILL the owner, SIGKILL the partner, cut the interconnect),
//! and measures what the initiator saw: detection, the takeover's steps,
//! the time to the first I/O served after the fault, the longest pause,
//! giveback. After every round every unit is read back and judged by the
//! oracle; an acknowledged write lost or a read that went back in time fails
//! the drill.
//!
//! Invariants: every wait is bounded, so the drill ends; it signals only
//! processes it started itself and has not yet reaped (a reaped PID may
//! belong to someone else by now), and it stops all of them on every way
//! out (success, error, Ctrl-C, SIGTERM).
//!
//! Output (stdout): one line per round, `round I/N FAULT ok|FAILED (why):
//! detect .., takeover TOTALms [step ms, ..], first-io .., first-write ..,
//! max-pause .., write-pause .., acked N, reads N, sessions N, lost N,
//! garbage N, stale-reads N, bad-reads N, unacked-landed N, giveback ..`;
//! then `drill FAULT: N rounds, N ok, N failed`, a min/median/max table of
//! the times, a `total:` line of the counts, and `PASS` or `FAIL` (exit
//! status 1). Progress goes to stderr.
//!
//! What the drill reads from the nodes (written by them, parsed tolerantly:
//! unknown fields are ignored, missing ones take defaults):
//! `DATA_DIR/status.json` ([`NodeStatus`], rewritten about every 500 ms and
//! on each state change) and `DATA_DIR/takeover.json` ([`TakeoverReport`],
//! written by the node that took over, once it serves).

use crate::ha::unix_ms;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use nvtarget_client::verify::{decode, Content, Oracle, Report, UNIT};
use nvtarget_client::{Client, LoginOptions};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pair::{self, PairSpec, NODES};

/// The part of LUN 0 the load writes and verifies.
const RANGE_BYTES: u64 = 64 << 20;
/// A command unanswered this long fails its session (the load reconnects).
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Login (TCP connect included) must finish within this.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Between reconnect attempts, as an initiator's retry would.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// How often status and takeover files are polled.
const POLL: Duration = Duration::from_millis(50);
/// The initiator name of the load and the verifier.
const INITIATOR: &str = "iqn.2026-11.io.nvtarget:drill";
/// The initiator name of `--log-fill-mib`'s writes (its own session).
const FILL_INITIATOR: &str = "iqn.2026-11.io.nvtarget:drill-fill";

/// `nvtarget drill` arguments.
#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    /// Where the pair lives (configs, data dirs, PIDs, logs); created if
    /// missing. Nodes must not be running there already.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// iSCSI port of both portals (127.0.0.1 and 127.0.0.2); the
    /// interconnects use PORT + 10.
    #[arg(long, default_value_t = 3260)]
    pub port: u16,
    /// The fault injected in every round.
    #[arg(long, value_enum, default_value_t = Fault::KillOwner)]
    pub fault: Fault,
    /// How many rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds of load before the fault, and again once the survivor serves.
    #[arg(long, default_value_t = 3.0)]
    pub load_secs: f64,
    /// Commands in flight (about a quarter of them reads).
    #[arg(long, default_value_t = 16)]
    pub qd: usize,
    /// kill-owner only: before each kill, write this many MiB to node a's
    /// LUN 0 past the verified range (1 MiB sequential writes, 8 in
    /// flight), so that the owner's log holds at least that much unpruned
    /// at the kill (checked in its status.json) and the takeover replays
    /// it. Sizes the pair for it: LUN 0 of 64 MiB + N, an NVRAM region
    /// whose log half holds N + 512 MiB below its half-full CP trigger,
    /// `node.cp_interval_ms` of 10 minutes.
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    pub log_fill_mib: u64,
}

/// How much of its log half a node fills before it asks for a CP.
const CP_TRIGGER_FRACTION: u64 = 2;
/// Room in the log half beyond `--log-fill-mib` for the load's records.
const LOG_FILL_SLACK_MIB: u64 = 512;
/// CP interval of the pair during a `--log-fill-mib` drill.
const LOG_FILL_CP_INTERVAL_MS: u64 = 600_000;

/// The pair's sizes for `--log-fill-mib N` (None for N = 0): LUN size,
/// aggregate size, NVRAM region size, each as a config size string.
fn log_fill_sizes(n_mib: u64) -> Option<(String, String, String)> {
    if n_mib == 0 {
        return None;
    }
    let lun = (RANGE_BYTES >> 20) + n_mib;
    let aggr = (2 * lun + 1024).max(4096);
    // Layout: header 4 KiB, then 4 halves (2 local, 2 partner); a CP is
    // asked for when the active half is half full.
    let half = CP_TRIGGER_FRACTION * (n_mib + LOG_FILL_SLACK_MIB) + 1;
    let region = 4 * half + 1;
    Some((
        format!("{lun}MiB"),
        format!("{aggr}MiB"),
        format!("{region}MiB"),
    ))
}

/// The fault a round injects.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL node a, which serves the load; b must take over and serve a's
    /// target at a's address; then a restarts and gets its storage back.
    KillOwner,
    /// SIGKILL node b while the load runs on a; a must keep serving and take
    /// over b's storage; then b restarts and gets it back.
    KillPartner,
    /// Cut the interconnect while the load runs on a; nobody may take over;
    /// then heal it and wait until the pair is mirrored again.
    CutInterconnect,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillOwner => "kill-owner",
            Fault::KillPartner => "kill-partner",
            Fault::CutInterconnect => "cut-interconnect",
        }
    }
}

// ---------------------------------------------------------------------------
// What the nodes write.

/// `DATA_DIR/status.json` of one node.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeStatus {
    pub node: String,
    pub pid: u32,
    pub unix_ms: u64,
    /// "serving", "serving-unmirrored", "taking-over", "taken-over",
    /// "waiting-giveback", "giving-back", "booting".
    pub state: String,
    pub epoch: u64,
    pub mirrored: bool,
    pub partner_alive: bool,
    /// Targets this node serves as owner, taken-over ones included.
    pub serving: Vec<String>,
    /// The node's NVRAM log, when it has one.
    pub log: Option<LogView>,
}

/// The `log` object of `status.json`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct LogView {
    pub active_half: u64,
    /// Percent of the active half holding records.
    pub fill_pct: f64,
    pub cps: u64,
    pub next_seq: u64,
    pub pruned_seq: u64,
}

impl NodeStatus {
    fn serves_only(&self, target: &str) -> bool {
        self.serving.len() == 1 && self.serving[0] == target
    }

    fn is_taking_over(&self) -> bool {
        matches!(self.state.as_str(), "taking-over" | "taken-over")
    }
}

/// `DATA_DIR/takeover.json`, written by the node that took over.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct TakeoverReport {
    /// Whose storage was taken over.
    pub owner: String,
    /// Who took it over.
    pub by: String,
    pub epoch: u64,
    /// Last sign of life from the owner.
    pub silent_unix_ms: u64,
    /// When the owner was declared failed.
    pub detected_unix_ms: u64,
    /// When the taken-over target was served.
    pub serving_unix_ms: u64,
    pub replayed_records: u64,
    pub steps: Vec<TakeoverStep>,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct TakeoverStep {
    pub name: String,
    /// Start, relative to the takeover's start.
    pub start_ms: f64,
    pub ms: f64,
    pub outcome: String,
}

pub fn parse_status(text: &str) -> Option<NodeStatus> {
    serde_json::from_str(text).ok()
}

pub fn parse_takeover(text: &str) -> Option<TakeoverReport> {
    serde_json::from_str(text).ok()
}

fn status_path(spec: &PairSpec, node: usize) -> PathBuf {
    spec.data_dir(node).join(crate::ha::STATUS_FILE)
}

fn takeover_path(spec: &PairSpec, node: usize) -> PathBuf {
    spec.data_dir(node).join(crate::ha::TAKEOVER_FILE)
}

/// The node's status; None while it has written none (or a broken one).
fn read_status(spec: &PairSpec, node: usize) -> Option<NodeStatus> {
    parse_status(&std::fs::read_to_string(status_path(spec, node)).ok()?)
}

/// The raw takeover file, to tell a new one from an old one.
fn read_takeover_raw(spec: &PairSpec, node: usize) -> Option<String> {
    std::fs::read_to_string(takeover_path(spec, node)).ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// The interconnect relay.

/// A TCP relay standing in for the interconnect cable: forwards every
/// connection made to [`Relay::addr`] to `upstream`, byte for byte, both
/// ways. [`Relay::cut`] closes every relayed connection and closes new ones
/// as soon as they are accepted (the peer sees a connection that ends at
/// once), until [`Relay::heal`].
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    accept: JoinHandle<()>,
}

struct RelayShared {
    upstream: SocketAddr,
    cut: AtomicBool,
    /// Bumped by every cut; each relayed connection ends when it changes.
    cuts: watch::Sender<u64>,
    live: AtomicUsize,
}

impl Relay {
    /// Listens on 127.0.0.1 on a port of the kernel's choosing.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(RelayShared {
            upstream,
            cut: AtomicBool::new(false),
            cuts: watch::Sender::new(0),
            live: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (sock, _) = match listener.accept().await {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Subscribe before looking at the flag: a cut between the
                // two is then seen by the connection's task.
                let cuts = sh.cuts.subscribe();
                if sh.cut.load(Ordering::SeqCst) {
                    drop(sock);
                    continue;
                }
                tokio::spawn(relay_connection(sh.clone(), sock, cuts));
            }
        });
        Ok(Relay {
            addr,
            shared,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections currently relayed.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay_connection(
    sh: Arc<RelayShared>,
    mut down: TcpStream,
    mut cuts: watch::Receiver<u64>,
) {
    let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(sh.upstream));
    let mut up = tokio::select! {
        r = connect => match r {
            Ok(Ok(s)) => s,
            _ => return,
        },
        _ = cuts.changed() => return,
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    sh.live.fetch_add(1, Ordering::SeqCst);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
        _ = cuts.changed() => {}
    }
    sh.live.fetch_sub(1, Ordering::SeqCst);
    // Dropping both sockets closes both sides.
}

// ---------------------------------------------------------------------------
// The nodes' processes.

/// The node processes this drill started. Only these are ever signalled,
/// and only while not yet reaped: after `waitpid` the PID is free for reuse.
struct Nodes {
    spec: PairSpec,
    exe: PathBuf,
    state: Mutex<NodesState>,
}

#[derive(Default)]
struct NodesState {
    /// Started and not yet reaped.
    children: Vec<u32>,
    /// The latest process of each node.
    current: [Option<u32>; 2],
}

impl NodesState {
    /// Forgets children that have exited.
    fn reap(&mut self) {
        self.children.retain(|&pid| {
            let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
                return false;
            };
            // Still ours unless it was reaped now or is no child of ours.
            match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                Ok(None) => true,
                Ok(Some(_)) => false,
                Err(e) => e != rustix::io::Errno::CHILD,
            }
        });
    }

    fn running(&mut self, pid: u32) -> bool {
        self.reap();
        self.children.contains(&pid)
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

impl Nodes {
    fn spawn(&self, node: usize) -> anyhow::Result<u32> {
        let pid = self.spec.spawn(node, &self.exe)?;
        let mut st = self.state.lock();
        st.children.push(pid);
        st.current[node] = Some(pid);
        tracing::info!(node = NODES[node], pid, "node started");
        Ok(pid)
    }

    /// The node's current process, if it is running.
    fn pid(&self, node: usize) -> Option<u32> {
        let mut st = self.state.lock();
        let pid = st.current[node]?;
        st.running(pid).then_some(pid)
    }

    /// Fails when the node's process is gone.
    fn check_running(&self, node: usize) -> anyhow::Result<u32> {
        self.pid(node).with_context(|| {
            format!(
                "node {} exited; see {}",
                NODES[node],
                self.spec.log_path(node).display()
            )
        })
    }

    /// SIGKILL to the PID the node's pid file names, which must be the
    /// process this drill started for it.
    fn kill(&self, node: usize) -> anyhow::Result<u32> {
        let recorded = pair::read_pid(&self.spec, node)
            .with_context(|| format!("no PID in {}", self.spec.pid_path(node).display()))?;
        let mut st = self.state.lock();
        if st.current[node] != Some(recorded) || !st.running(recorded) {
            anyhow::bail!(
                "{} names PID {recorded}, which is not the running node {} this drill started",
                self.spec.pid_path(node).display(),
                NODES[node]
            );
        }
        signal(recorded, rustix::process::Signal::KILL);
        Ok(recorded)
    }

    async fn wait_exit(&self, pid: u32, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        while self.state.lock().running(pid) {
            if Instant::now() >= end {
                anyhow::bail!("PID {pid} did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Both nodes run the processes this drill started, say `mirrored`, and
    /// serve exactly their own target, in statuses written since `since_ms`.
    fn pair_healthy(&self, since_ms: u64) -> anyhow::Result<Option<()>> {
        for n in 0..2 {
            let pid = self.check_running(n)?;
            let Some(s) = read_status(&self.spec, n) else {
                return Ok(None);
            };
            let healthy = s.pid == pid
                && s.unix_ms >= since_ms
                && s.mirrored
                && s.serves_only(&PairSpec::target_name(n));
            if !healthy {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    async fn wait_healthy(&self, since_ms: u64, timeout: Duration) -> anyhow::Result<()> {
        wait_for(
            "both nodes serving their own target, mirrored",
            timeout,
            || self.pair_healthy(since_ms),
        )
        .await
        .with_context(|| self.describe())
    }

    /// What the nodes last said, for an error message.
    fn describe(&self) -> String {
        let now = unix_ms();
        let mut parts = Vec::new();
        for (n, name) in NODES.iter().enumerate() {
            let pid = self.pid(n).map_or("exited".into(), |p| format!("pid {p}"));
            let part = match read_status(&self.spec, n) {
                None => format!(
                    "node {name} ({pid}): no readable {}",
                    status_path(&self.spec, n).display()
                ),
                Some(s) => format!(
                    "node {name} ({pid}): status of pid {} {} ms old: state {:?}, epoch {}, \
                     mirrored {}, partner_alive {}, serving {:?}",
                    s.pid,
                    now.saturating_sub(s.unix_ms),
                    s.state,
                    s.epoch,
                    s.mirrored,
                    s.partner_alive,
                    s.serving
                ),
            };
            parts.push(part);
        }
        parts.join("; ")
    }

    async fn wait_portal(&self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        let addr = self.spec.portal[node];
        loop {
            self.check_running(node)?;
            let up = tokio::task::spawn_blocking(move || {
                pair::wait_listening(addr, Duration::from_secs(1))
            })
            .await
            .unwrap_or(false);
            if up {
                return Ok(());
            }
            if Instant::now() >= end {
                anyhow::bail!(
                    "node {} did not open its portal {addr} within {timeout:?}; see {}",
                    NODES[node],
                    self.spec.log_path(node).display()
                );
            }
        }
    }

    /// SIGTERM to every process still running, SIGKILL to those left after
    /// 10 s. Blocking; idempotent.
    fn stop_all(&self) {
        let mut st = self.state.lock();
        st.reap();
        if st.children.is_empty() {
            return;
        }
        for &pid in &st.children {
            signal(pid, rustix::process::Signal::TERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while !st.children.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            st.reap();
        }
        for &pid in &st.children {
            tracing::warn!(pid, "node did not stop within 10 s of SIGTERM: SIGKILL");
            signal(pid, rustix::process::Signal::KILL);
        }
        let end = Instant::now() + Duration::from_secs(5);
        while !st.children.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            st.reap();
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

// ---------------------------------------------------------------------------
// The load.

/// Reads of the load, judged as they complete: a unit must never read back
/// older than a generation some earlier-completed read already returned
/// (generations of a unit only grow, one write at a time).
#[derive(Default)]
struct ReadCheck {
    inner: Mutex<ReadCheckState>,
}

#[derive(Default, Clone)]
struct ReadCounts {
    ok: u64,
    /// Older than a write acknowledged before the read was issued.
    stale: u64,
    /// Older than an earlier read's answer, where that answer came from a
    /// write never acknowledged before this read was issued: a write in
    /// flight when its node died, seen by a concurrent read and then not
    /// kept. Allowed (the write never completed), reported.
    vanished: u64,
    garbage: u64,
}

#[derive(Default)]
struct ReadCheckState {
    /// Reads completed so far: the "clock" reads are ordered by.
    completed: u64,
    /// Per unit, (completion number, generation) with both increasing: the
    /// newest generation known before any given read was issued.
    seen: HashMap<u64, Vec<(u64, u64)>>,
    counts: ReadCounts,
    /// First few findings, for the log.
    examples: Vec<String>,
}

/// Entries kept per unit; older ones only matter for reads in flight that
/// long, and dropping them can only miss a finding, never invent one.
const SEEN_KEEP: usize = 16;

impl ReadCheck {
    /// To be taken when a read is issued.
    fn ticket(&self) -> u64 {
        self.inner.lock().completed
    }

    /// `acked`: the newest generation of `unit` acknowledged when the read
    /// was issued.
    fn judge(&self, unit: u64, ticket: u64, acked: Option<u64>, got: Content) {
        let mut st = self.inner.lock();
        let st = &mut *st;
        let generation = match got {
            Content::Zero => 0,
            Content::Gen(g) => g,
            Content::Garbage => {
                st.counts.garbage += 1;
                if st.examples.len() < 10 {
                    st.examples
                        .push(format!("unit {unit}: read bytes no write produced"));
                }
                return;
            }
        };
        st.completed += 1;
        let completed = st.completed;
        let hist = st.seen.entry(unit).or_default();
        let floor = hist
            .iter()
            .filter(|&&(c, _)| c <= ticket)
            .map(|&(_, g)| g)
            .max();
        if let Some(a) = acked.filter(|&a| generation < a) {
            st.counts.stale += 1;
            if st.examples.len() < 10 {
                st.examples.push(format!(
                    "unit {unit}: read generation {generation} after generation {a} had been acknowledged"
                ));
            }
            return;
        }
        if let Some(f) = floor.filter(|&f| generation < f) {
            st.counts.vanished += 1;
            if st.examples.len() < 10 {
                st.examples.push(format!(
                    "unit {unit}: read generation {generation} after unacknowledged generation {f} had been read"
                ));
            }
            return;
        }
        if hist.last().is_none_or(|&(_, g)| generation > g) {
            hist.push((completed, generation));
            if hist.len() > SEEN_KEEP {
                hist.remove(0);
            }
        }
        st.counts.ok += 1;
    }

    fn counts(&self) -> ReadCounts {
        self.inner.lock().counts.clone()
    }

    fn take_examples(&self) -> Vec<String> {
        std::mem::take(&mut self.inner.lock().examples)
    }
}

/// A moment the drill cares about (the fault, the end of a giveback) and
/// when the load first got I/O through after it.
#[derive(Debug, Clone, Copy)]
struct Marker {
    at: Instant,
    acked_at: u64,
    /// First completion of a command issued after `at`.
    first_io: Option<Instant>,
    /// First acknowledgement of a write certainly issued after `at`.
    first_write: Option<Instant>,
}

/// Completion times of one round's load: pauses and first I/O after the
/// markers. Writes are seen through the oracle's acknowledgement counter,
/// sampled every millisecond; reads exactly.
struct Timeline {
    writers: u64,
    inner: Mutex<TimelineState>,
}

#[derive(Default)]
struct TimelineState {
    last_any: Option<Instant>,
    last_write: Option<Instant>,
    max_pause: Duration,
    max_write_pause: Duration,
    completions: u64,
    /// Start of the current session and the acknowledged count then.
    session: Option<(Instant, u64)>,
    sessions: u32,
    markers: Vec<Marker>,
    finished: bool,
}

impl Timeline {
    fn new(writers: usize) -> Timeline {
        Timeline {
            writers: writers as u64,
            inner: Mutex::new(TimelineState::default()),
        }
    }

    fn completion(st: &mut TimelineState, t: Instant) {
        if let Some(l) = st.last_any {
            st.max_pause = st.max_pause.max(t.saturating_duration_since(l));
        }
        if st.last_any.is_none_or(|l| t > l) {
            st.last_any = Some(t);
        }
        st.completions += 1;
    }

    fn read_done(&self, issued: Instant, done: Instant) {
        let mut st = self.inner.lock();
        if st.finished {
            return;
        }
        Self::completion(&mut st, done);
        for m in &mut st.markers {
            if issued >= m.at && m.first_io.is_none() {
                m.first_io = Some(done);
            }
        }
    }

    /// The acknowledged-write counter moved to `acked` by time `t`.
    fn writes_acked(&self, t: Instant, acked: u64) {
        let mut st = self.inner.lock();
        if st.finished {
            return;
        }
        Self::completion(&mut st, t);
        if let Some(l) = st.last_write {
            st.max_write_pause = st.max_write_pause.max(t.saturating_duration_since(l));
        }
        st.last_write = Some(t);
        let session = st.session;
        let writers = self.writers;
        for m in &mut st.markers {
            if m.first_write.is_some() {
                continue;
            }
            // At most `writers` writes were in flight at the marker; any
            // acknowledgement beyond them was issued after it, and so is
            // any on a session that logged in after it.
            let new_session = session.is_some_and(|(s, a)| s >= m.at && acked > a);
            if new_session || acked.saturating_sub(m.acked_at) > writers {
                m.first_write = Some(t);
                if m.first_io.is_none_or(|f| t < f) {
                    m.first_io = Some(t);
                }
            }
        }
    }

    fn session_started(&self, t: Instant, acked: u64) {
        let mut st = self.inner.lock();
        st.session = Some((t, acked));
        st.sessions += 1;
    }

    /// Adds a marker; returns its index.
    fn mark(&self, at: Instant, acked_at: u64) -> usize {
        let mut st = self.inner.lock();
        st.markers.push(Marker {
            at,
            acked_at,
            first_io: None,
            first_write: None,
        });
        st.markers.len() - 1
    }

    fn marker(&self, i: usize) -> Option<Marker> {
        self.inner.lock().markers.get(i).copied()
    }

    fn completions(&self) -> u64 {
        self.inner.lock().completions
    }

    /// Stops the clock at `t`: a stall at the end counts as a pause.
    fn finish(&self, t: Instant) {
        let mut st = self.inner.lock();
        if let Some(l) = st.last_any {
            st.max_pause = st.max_pause.max(t.saturating_duration_since(l));
        }
        if let Some(l) = st.last_write {
            st.max_write_pause = st.max_write_pause.max(t.saturating_duration_since(l));
        }
        st.finished = true;
    }
}

/// What every session of the load shares, across rounds.
struct LoadCtx {
    oracle: Arc<Oracle>,
    reads: Arc<ReadCheck>,
    seed: u32,
    units: u64,
    block_size: u32,
    writers: usize,
    readers: usize,
    addr: String,
    target: String,
}

impl LoadCtx {
    fn lba(&self, unit: u64) -> u64 {
        unit * (UNIT as u64 / self.block_size as u64)
    }
}

/// One round's load: sessions to node a's address, one after another.
struct Load {
    ctx: Arc<LoadCtx>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
    sessions: JoinHandle<SessionsEnd>,
    sampler_stop: Arc<AtomicBool>,
    sampler: JoinHandle<()>,
    /// A load dropped unstopped (the drill failed or was interrupted) stops
    /// too, instead of hammering nodes that are being shut down.
    _stop_on_drop: StopOnDrop,
}

struct StopOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct SessionsEnd {
    /// A session's commands did not finish within the time limit.
    stuck: bool,
}

/// What the load saw, for the round's report.
#[derive(Debug, Default)]
struct LoadSummary {
    max_pause: Duration,
    max_write_pause: Duration,
    markers: Vec<Marker>,
    sessions: u32,
    stuck: bool,
}

impl Load {
    fn start(ctx: Arc<LoadCtx>) -> Load {
        let timeline = Arc::new(Timeline::new(ctx.writers));
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = tokio::spawn(run_sessions(ctx.clone(), timeline.clone(), stop.clone()));
        let sampler_stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let oracle = ctx.oracle.clone();
            let timeline = timeline.clone();
            let stop = sampler_stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut last = oracle.acked_writes.load(Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let now = oracle.acked_writes.load(Ordering::Relaxed);
                    if now != last {
                        last = now;
                        timeline.writes_acked(Instant::now(), now);
                    }
                }
            })
        };
        Load {
            ctx,
            timeline,
            _stop_on_drop: StopOnDrop(vec![stop.clone(), sampler_stop.clone()]),
            stop,
            sessions,
            sampler_stop,
            sampler,
        }
    }

    fn acked(&self) -> u64 {
        self.ctx.oracle.acked_writes.load(Ordering::Relaxed)
    }

    /// Marks now (just before the fault or just after a giveback).
    fn mark(&self) -> usize {
        self.timeline.mark(Instant::now(), self.acked())
    }

    async fn stop(self) -> LoadSummary {
        let t = Instant::now();
        self.timeline.finish(t);
        self.stop.store(true, Ordering::Relaxed);
        let end = match tokio::time::timeout(CMD_TIMEOUT + Duration::from_secs(10), self.sessions)
            .await
        {
            Ok(Ok(end)) => end,
            _ => {
                // Whatever is still in flight may or may not land.
                self.ctx.oracle.connection_lost();
                SessionsEnd { stuck: true }
            }
        };
        self.sampler_stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sampler).await;
        let st = self.timeline.inner.lock();
        LoadSummary {
            max_pause: st.max_pause,
            max_write_pause: st.max_write_pause,
            markers: st.markers.clone(),
            sessions: st.sessions,
            stuck: end.stuck,
        }
    }
}

/// Logs in to the load's target and clears unit attentions (a takeover or
/// giveback raises some), all within [`LOGIN_TIMEOUT`] and twice that.
async fn login(addr: &str, target: &str) -> anyhow::Result<Client> {
    login_as(addr, target, INITIATOR).await
}

/// [`login`] with another initiator name: a second session of the same
/// name (and ISID) would reinstate, i.e. end, the load's session.
async fn login_as(addr: &str, target: &str, initiator: &str) -> anyhow::Result<Client> {
    let opts = LoginOptions::new(initiator, target);
    let mut c = tokio::time::timeout(LOGIN_TIMEOUT, Client::connect(addr, &opts))
        .await
        .map_err(|_| anyhow::anyhow!("login to {target} at {addr} timed out"))?
        .with_context(|| format!("login to {target} at {addr}"))?;
    c.timeout = CMD_TIMEOUT;
    tokio::time::timeout(2 * LOGIN_TIMEOUT, c.clear_unit_attentions(0))
        .await
        .map_err(|_| anyhow::anyhow!("TEST UNIT READY timed out"))?
        .context("clearing unit attentions")?;
    Ok(c)
}

/// New session after new session until `stop`: a session ends at its first
/// failed command, then the load logs in again, [`RECONNECT_PAUSE`] apart,
/// to the same address (where the survivor serves after a takeover).
async fn run_sessions(
    ctx: Arc<LoadCtx>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
) -> SessionsEnd {
    let mut end = SessionsEnd::default();
    let mut attempts = 0u32;
    let mut session_no = 0u64;
    while !stop.load(Ordering::Relaxed) {
        attempts += 1;
        let client = match login(&ctx.addr, &ctx.target).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                if attempts == 1 {
                    tracing::info!(error = %format!("{e:#}"), "load: login failed; retrying every 100 ms");
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        session_no += 1;
        tracing::info!(session = session_no, attempts, "load: session logged in");
        attempts = 0;
        timeline.session_started(
            Instant::now(),
            ctx.oracle.acked_writes.load(Ordering::Relaxed),
        );
        let session_stop = Arc::new(AtomicBool::new(false));
        let writers = {
            let o = ctx.oracle.clone();
            let c = client.clone();
            let s = session_stop.clone();
            let depth = ctx.writers;
            let forever = Instant::now() + Duration::from_secs(365 * 86400);
            tokio::spawn(async move { o.run_load(c, 0, depth, s, forever).await })
        };
        let mut readers = Vec::new();
        for r in 0..ctx.readers {
            let rng = ((u64::from(ctx.seed) << 32) | (session_no << 8) | r as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                | 1;
            readers.push(tokio::spawn(read_task(
                ctx.clone(),
                client.clone(),
                timeline.clone(),
                session_stop.clone(),
                rng,
            )));
        }
        drop(client);
        while !stop.load(Ordering::Relaxed) && !session_stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        session_stop.store(true, Ordering::Relaxed);
        // Every command has CMD_TIMEOUT; the session's tasks end after their
        // current one. Waiting for them keeps two writes to one unit from
        // ever being in flight on two sessions.
        let drained = tokio::time::timeout(CMD_TIMEOUT + Duration::from_secs(5), async {
            let w = writers.await.ok().flatten();
            let mut r = None;
            for h in readers {
                if let Ok(Some(e)) = h.await {
                    r.get_or_insert(e);
                }
            }
            w.or(r)
        })
        .await;
        match drained {
            Ok(Some(e)) if !stop.load(Ordering::Relaxed) => {
                tracing::info!(session = session_no, error = %e, "load: session failed; logging in again");
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    session = session_no,
                    "load: commands still unanswered after the time limit"
                );
                ctx.oracle.connection_lost();
                end.stuck = true;
            }
        }
        if !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }
    end
}

async fn read_task(
    ctx: Arc<LoadCtx>,
    client: Arc<Client>,
    timeline: Arc<Timeline>,
    stop: Arc<AtomicBool>,
    mut rng: u64,
) -> Option<nvtarget_client::ClientError> {
    let blocks = (UNIT as u32) / ctx.block_size;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let unit = rng % ctx.units;
        let ticket = ctx.reads.ticket();
        let acked = ctx.oracle.acked(unit);
        let issued = Instant::now();
        match client
            .read16(0, ctx.lba(unit), blocks, ctx.block_size)
            .await
        {
            Ok(data) => {
                let done = Instant::now();
                ctx.reads
                    .judge(unit, ticket, acked, decode(unit, ctx.seed, &data));
                timeline.read_done(issued, done);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Some(e);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Rounds.

/// What one round measured and found.
#[derive(Debug, Default)]
struct RoundResult {
    failure: Option<String>,
    /// Fault to detection: the survivor's `detected_unix_ms` (kills), the
    /// first status saying unmirrored (cut).
    detect_ms: Option<i64>,
    takeover: Option<TakeoverReport>,
    first_io_ms: Option<f64>,
    first_write_ms: Option<f64>,
    max_pause_ms: Option<f64>,
    write_pause_ms: Option<f64>,
    giveback_ms: Option<f64>,
    acked: u64,
    reads: u64,
    sessions: u32,
    /// None when the round could not verify.
    lost: Option<u64>,
    garbage: Option<u64>,
    stale_reads: u64,
    /// Reads older than an earlier read of a write that was never
    /// acknowledged (see `ReadCounts::vanished`): allowed, reported.
    vanished_reads: u64,
    bad_reads: u64,
    /// Units holding a write that was never acknowledged (allowed), at
    /// this round's verify.
    landed: u64,
    /// `--log-fill-mib`: MiB of the owner's log unpruned at the kill, per
    /// its last status, and how long the fill took.
    log_at_kill_mib: Option<f64>,
    fill_ms: Option<f64>,
}

impl RoundResult {
    fn data_ok(&self) -> bool {
        self.lost.unwrap_or(0) == 0
            && self.garbage.unwrap_or(0) == 0
            && self.stale_reads == 0
            && self.bad_reads == 0
    }

    fn ok(&self) -> bool {
        self.failure.is_none() && self.data_ok() && self.lost.is_some()
    }
}

struct Drill<'a> {
    args: DrillArgs,
    spec: PairSpec,
    nodes: Arc<Nodes>,
    relays: &'a [Relay],
    ctx: Arc<LoadCtx>,
    /// (unit, acknowledged generation) pairs found lost so far, so a loss
    /// is counted once, in the round that found it.
    lost_seen: HashSet<(u64, Option<u64>)>,
    garbage_seen: HashSet<u64>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Polls `f` every [`POLL`] until it gives a value; `f` may fail early.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!("{what}: nothing within {} s", timeout.as_secs_f64());
        }
        tokio::time::sleep(POLL).await;
    }
}

impl Drill<'_> {
    /// Lets the load run for `secs`, then makes sure it got I/O through.
    async fn run_load_for(&self, load: &Load, s: f64) -> anyhow::Result<()> {
        tokio::time::sleep(secs(s)).await;
        wait_for(
            "the load getting I/O through to node a",
            Duration::from_secs(30),
            || Ok((load.timeline.completions() > 0).then_some(())),
        )
        .await
    }

    /// Waits until the load got a command issued after `marker` through;
    /// fails early if `serving`, the node that should answer, is gone.
    async fn wait_first_io(
        &self,
        load: &Load,
        marker: usize,
        serving: usize,
        what: &str,
    ) -> anyhow::Result<()> {
        wait_for(what, Duration::from_secs(60), || {
            self.nodes.check_running(serving)?;
            Ok(load.timeline.marker(marker).and_then(|m| m.first_io))
        })
        .await
        .map(|_| ())
    }

    /// `--log-fill-mib`: writes the fill past the verified range of node
    /// a's LUN 0 and checks in a's status that its log holds at least that
    /// much unpruned. Returns the MiB the status shows.
    async fn fill_log(&self) -> anyhow::Result<f64> {
        const CHUNK: u64 = 1 << 20;
        const IN_FLIGHT: u64 = 8;
        let n = self.args.log_fill_mib;
        let before = read_status(&self.spec, 0)
            .and_then(|s| s.log)
            .context("node a's status has no log")?;
        let client = Arc::new(login_as(&self.ctx.addr, &self.ctx.target, FILL_INITIATOR).await?);
        let bs = u64::from(self.ctx.block_size);
        // Not zeros (which a target may treat as unmapping) and not all alike.
        let chunk: Bytes = (0..CHUNK).map(|i| (i % 251) as u8 | 1).collect();
        let first = RANGE_BYTES / bs;
        let mut tasks = Vec::new();
        for w in 0..IN_FLIGHT {
            let (client, chunk) = (client.clone(), chunk.clone());
            let bsz = self.ctx.block_size;
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    client
                        .write16(0, first + i * CHUNK / bs, chunk.clone(), bsz, false)
                        .await?;
                    i += IN_FLIGHT;
                }
                Ok::<_, nvtarget_client::ClientError>(())
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(300), t)
                .await
                .map_err(|_| anyhow::anyhow!("--log-fill-mib: writes took over 300 s"))?
                .context("fill task")?
                .context("--log-fill-mib write")?;
        }
        if let Ok(c) = Arc::try_unwrap(client) {
            let _ = tokio::time::timeout(Duration::from_secs(6), c.logout()).await;
        }
        let done_ms = unix_ms();
        let half = nvtarget_nvram::Layout::for_size(
            crate::config::parse_size(&self.spec.nvram_size).unwrap_or(0),
        )
        .map(|l| l.half_capacity())
        .context("the pair's NVRAM size")?;
        let log = wait_for(
            "node a's status after the log fill",
            Duration::from_secs(10),
            || {
                self.nodes.check_running(0)?;
                Ok(read_status(&self.spec, 0)
                    .filter(|s| s.unix_ms > done_ms)
                    .and_then(|s| s.log))
            },
        )
        .await?;
        let mib = log.fill_pct / 100.0 * half as f64 / f64::from(1u32 << 20);
        tracing::info!(
            fill_mib = n,
            log_mib = mib,
            fill_pct = log.fill_pct,
            cps_before = before.cps,
            cps = log.cps,
            next_seq = log.next_seq,
            pruned_seq = log.pruned_seq,
            "log filled"
        );
        if log.cps != before.cps || mib < n as f64 {
            anyhow::bail!(
                "--log-fill-mib {n}: node a's log holds {mib:.0} MiB unpruned \
                 ({}% of a {} MiB half; CPs {} -> {}): a CP ran during the fill",
                log.fill_pct,
                half >> 20,
                before.cps,
                log.cps
            );
        }
        Ok(mib)
    }

    async fn kill_round(
        &self,
        victim: usize,
        load: &Load,
        r: &mut RoundResult,
    ) -> anyhow::Result<()> {
        let survivor = 1 - victim;
        let (vname, sname) = (NODES[victim], NODES[survivor]);
        self.run_load_for(load, self.args.load_secs).await?;
        if victim == 0 && self.args.log_fill_mib > 0 {
            let t0 = Instant::now();
            let mib = self.fill_log().await?;
            r.fill_ms = Some(ms(t0.elapsed()));
            r.log_at_kill_mib = Some(mib);
        }
        let before = read_takeover_raw(&self.spec, survivor);
        let fault = load.mark();
        let kill_ms = unix_ms();
        let pid = self.nodes.kill(victim)?;
        tracing::info!(node = vname, pid, "SIGKILL");
        self.nodes.wait_exit(pid, Duration::from_secs(10)).await?;
        let report = wait_for(
            &format!("node {sname} taking over {vname}"),
            Duration::from_secs(60),
            || {
                self.nodes.check_running(survivor)?;
                let raw = read_takeover_raw(&self.spec, survivor);
                if raw == before {
                    return Ok(None);
                }
                Ok(raw
                    .as_deref()
                    .and_then(parse_takeover)
                    .filter(|t| t.owner == vname && t.by == sname && t.detected_unix_ms >= kill_ms))
            },
        )
        .await?;
        r.detect_ms = Some(report.detected_unix_ms as i64 - kill_ms as i64);
        tracing::info!(
            by = sname,
            owner = vname,
            detect_ms = r.detect_ms,
            total_ms = report.total_ms,
            "takeover done"
        );
        r.takeover = Some(report);
        self.wait_first_io(load, fault, survivor, "I/O served after the kill")
            .await?;
        tokio::time::sleep(secs(self.args.load_secs)).await;

        let restart_ms = unix_ms();
        let pid = self.nodes.spawn(victim)?;
        wait_for(
            &format!("node {vname} reporting its status after the restart"),
            Duration::from_secs(60),
            || {
                self.nodes.check_running(victim)?;
                Ok(read_status(&self.spec, victim)
                    .filter(|s| s.pid == pid && s.unix_ms >= restart_ms))
            },
        )
        .await?;
        let spec = self.spec.clone();
        let gb = tokio::time::timeout(
            Duration::from_secs(90),
            tokio::task::spawn_blocking(move || {
                pair::giveback(&spec, victim, Duration::from_secs(60))
            }),
        )
        .await
        .map_err(|_| anyhow::anyhow!("giveback to node {vname} did not return within 90 s"))?
        .context("giveback task")?
        .with_context(|| format!("giveback to node {vname}"))?;
        r.giveback_ms = Some(ms(gb));
        let after = load.mark();
        self.wait_first_io(load, after, 0, "I/O served after the giveback")
            .await?;
        tokio::time::sleep(secs(self.args.load_secs.min(1.0))).await;
        Ok(())
    }

    async fn cut_round(&self, load: &Load, r: &mut RoundResult) -> anyhow::Result<()> {
        self.run_load_for(load, self.args.load_secs).await?;
        let mut before = Vec::new();
        for (n, name) in NODES.iter().enumerate() {
            let s =
                read_status(&self.spec, n).with_context(|| format!("node {name} has no status"))?;
            before.push((s, read_takeover_raw(&self.spec, n)));
        }
        let relayed: usize = self.relays.iter().map(Relay::live).sum();
        let fault = load.mark();
        let cut_ms = unix_ms();
        for relay in self.relays {
            relay.cut();
        }
        tracing::info!(connections = relayed, "interconnect cut");
        // Long enough for a node that wrongly declares its partner dead to
        // do so several times over.
        let window = self.spec.heartbeat_ms * u64::from(self.spec.missed_heartbeats);
        let hold = secs(self.args.load_secs).max(Duration::from_millis(3 * window + 2000));
        let end = Instant::now() + hold;
        let mut unmirrored: Option<u64> = None;
        while Instant::now() < end {
            for n in 0..2 {
                let name = NODES[n];
                self.nodes.check_running(n)?;
                if read_takeover_raw(&self.spec, n) != before[n].1 {
                    anyhow::bail!(
                        "node {name} wrote a new takeover.json while only the interconnect was cut"
                    );
                }
                let Some(s) = read_status(&self.spec, n) else {
                    continue;
                };
                if !s.serves_only(&PairSpec::target_name(n)) || s.is_taking_over() {
                    anyhow::bail!(
                        "node {name} took over during the interconnect cut: state {}, serving {:?}",
                        s.state,
                        s.serving
                    );
                }
                if s.epoch != before[n].0.epoch {
                    anyhow::bail!(
                        "node {name}'s epoch moved from {} to {} during the interconnect cut",
                        before[n].0.epoch,
                        s.epoch
                    );
                }
                if !s.mirrored && s.unix_ms >= cut_ms {
                    unmirrored.get_or_insert(s.unix_ms);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        r.detect_ms = unmirrored.map(|u| u as i64 - cut_ms as i64);
        if unmirrored.is_none() {
            anyhow::bail!(
                "neither node reported mirrored=false within {:?} of the cut: the cut went unnoticed",
                hold
            );
        }
        if load
            .timeline
            .marker(fault)
            .and_then(|m| m.first_io)
            .is_none()
        {
            anyhow::bail!("node a served no I/O during the interconnect cut");
        }
        let heal_ms = unix_ms();
        for relay in self.relays {
            relay.heal();
        }
        tracing::info!("interconnect healed");
        self.nodes
            .wait_healthy(heal_ms, Duration::from_secs(60))
            .await?;
        let after = load.mark();
        self.wait_first_io(load, after, 0, "I/O served after the heal")
            .await?;
        tokio::time::sleep(secs(self.args.load_secs.min(1.0))).await;
        Ok(())
    }

    /// Reads every unit back through node a's portal and judges it.
    async fn verify(&self) -> anyhow::Result<Report> {
        let end = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match login(&self.ctx.addr, &self.ctx.target).await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= end => {
                    return Err(e.context("logging in to verify"));
                }
                Err(_) => tokio::time::sleep(RECONNECT_PAUSE).await,
            }
        };
        let rep =
            tokio::time::timeout(Duration::from_secs(120), self.ctx.oracle.verify(&client, 0))
                .await
                .map_err(|_| anyhow::anyhow!("verify did not finish within 120 s"))?
                .context("reading the units back")?;
        let _ = tokio::time::timeout(Duration::from_secs(6), client.logout()).await;
        Ok(rep)
    }

    async fn round(&mut self) -> RoundResult {
        let mut r = RoundResult::default();
        let acked0 = self.ctx.oracle.acked_writes.load(Ordering::Relaxed);
        let reads0 = self.ctx.reads.counts();
        let load = Load::start(self.ctx.clone());
        let res = match self.args.fault {
            Fault::KillOwner => self.kill_round(0, &load, &mut r).await,
            Fault::KillPartner => self.kill_round(1, &load, &mut r).await,
            Fault::CutInterconnect => self.cut_round(&load, &mut r).await,
        };
        let sum = load.stop().await;
        if let Err(e) = res {
            r.failure = Some(format!("{e:#}"));
        }
        if sum.stuck && r.failure.is_none() {
            r.failure = Some("the load's commands hung past their time limit".into());
        }
        if let Some(m) = sum.markers.first() {
            r.first_io_ms = m.first_io.map(|t| ms(t.saturating_duration_since(m.at)));
            r.first_write_ms = m.first_write.map(|t| ms(t.saturating_duration_since(m.at)));
        }
        r.max_pause_ms = Some(ms(sum.max_pause));
        r.write_pause_ms = Some(ms(sum.max_write_pause));
        r.sessions = sum.sessions;
        r.acked = self.ctx.oracle.acked_writes.load(Ordering::Relaxed) - acked0;
        let reads = self.ctx.reads.counts();
        r.reads = reads.ok - reads0.ok;
        r.stale_reads = reads.stale - reads0.stale;
        r.vanished_reads = reads.vanished - reads0.vanished;
        r.bad_reads = reads.garbage - reads0.garbage;
        for e in self.ctx.reads.take_examples() {
            tracing::error!(finding = %e, "read check");
        }
        match self.verify().await {
            Ok(rep) => {
                let lost = rep
                    .lost
                    .iter()
                    .filter(|&&(u, _, acked)| self.lost_seen.insert((u, acked)))
                    .count();
                let garbage = rep
                    .garbage
                    .iter()
                    .filter(|&&u| self.garbage_seen.insert(u))
                    .count();
                for (u, got, acked) in rep.lost.iter().take(10) {
                    tracing::error!(unit = u, got = ?got, acked = ?acked, "acknowledged write lost");
                }
                for u in rep.garbage.iter().take(10) {
                    tracing::error!(unit = u, "unit holds bytes no write produced");
                }
                r.lost = Some(lost as u64);
                r.garbage = Some(garbage as u64);
                r.landed = rep.in_flight_landed;
            }
            Err(e) => {
                if r.failure.is_none() {
                    r.failure = Some(format!("verify: {e:#}"));
                } else {
                    tracing::error!(error = %format!("{e:#}"), "verify after the failure");
                }
            }
        }
        if r.failure.is_none() {
            if let Err(e) = self
                .nodes
                .wait_healthy(unix_ms(), Duration::from_secs(120))
                .await
            {
                r.failure = Some(format!("pair not back to normal: {e:#}"));
            }
        }
        r
    }
}

// ---------------------------------------------------------------------------
// Output.

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}ms"))
}

fn opt_n(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn round_line(i: u32, rounds: u32, fault: Fault, r: &RoundResult) -> String {
    let verdict = match &r.failure {
        Some(f) => format!("FAILED ({f})"),
        None if !r.data_ok() => "FAILED (data)".into(),
        None => "ok".into(),
    };
    let takeover = match &r.takeover {
        Some(t) => {
            let steps: Vec<String> = t
                .steps
                .iter()
                .map(|s| {
                    if s.outcome.is_empty() || s.outcome == "ok" {
                        format!("{} {:.1}ms", s.name, s.ms)
                    } else {
                        format!("{} {:.1}ms {}", s.name, s.ms, s.outcome)
                    }
                })
                .collect();
            format!("{:.1}ms [{}]", t.total_ms, steps.join(", "))
        }
        None => "-".into(),
    };
    format!(
        "round {i}/{rounds} {fault} {verdict}: detect {detect}, takeover {takeover}, \
         first-io {fio}, first-write {fw}, max-pause {mp}, write-pause {wp}, \
         acked {acked}, reads {reads}, sessions {sessions}, lost {lost}, garbage {garbage}, \
         stale-reads {stale}, bad-reads {bad}, unacked-landed {landed}, \
         unacked-vanished {vanished}, giveback {gb}{fill}",
        fault = fault.name(),
        detect = r.detect_ms.map_or("-".into(), |d| format!("{d}ms")),
        fio = opt_ms(r.first_io_ms),
        fw = opt_ms(r.first_write_ms),
        mp = opt_ms(r.max_pause_ms),
        wp = opt_ms(r.write_pause_ms),
        acked = r.acked,
        reads = r.reads,
        sessions = r.sessions,
        lost = opt_n(r.lost),
        garbage = opt_n(r.garbage),
        stale = r.stale_reads,
        bad = r.bad_reads,
        landed = r.landed,
        vanished = r.vanished_reads,
        gb = opt_ms(r.giveback_ms),
        fill = match (r.log_at_kill_mib, r.fill_ms) {
            (Some(m), f) => format!(", log-at-kill {m:.0}MiB (fill {})", opt_ms(f)),
            _ => String::new(),
        },
    )
}

/// (min, median, max); the median of an even count is the lower middle.
fn min_median_max(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[0], v[(v.len() - 1) / 2], v[v.len() - 1]))
}

fn totals(fault: Fault, planned: u32, results: &[RoundResult]) -> String {
    use std::fmt::Write;
    let ok = results.iter().filter(|r| r.ok()).count();
    let failed = results.len() - ok;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "drill {}: {} rounds, {ok} ok, {failed} failed{}",
        fault.name(),
        results.len(),
        if (results.len() as u32) < planned {
            format!(" (of {planned} planned)")
        } else {
            String::new()
        }
    );
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        (
            "detect".into(),
            results
                .iter()
                .filter_map(|r| r.detect_ms.map(|d| d as f64))
                .collect(),
        ),
        (
            "takeover".into(),
            results
                .iter()
                .filter_map(|r| r.takeover.as_ref().map(|t| t.total_ms))
                .collect(),
        ),
    ];
    let mut steps: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for t in results.iter().filter_map(|r| r.takeover.as_ref()) {
        for s in &t.steps {
            if !order.contains(&s.name) {
                order.push(s.name.clone());
            }
            let i = order.iter().position(|n| n == &s.name).unwrap_or(0);
            steps.entry((i, s.name.clone())).or_default().push(s.ms);
        }
    }
    for ((_, name), v) in steps {
        rows.push((format!("  {name}"), v));
    }
    let col =
        |f: fn(&RoundResult) -> Option<f64>| -> Vec<f64> { results.iter().filter_map(f).collect() };
    rows.push(("first-io".into(), col(|r| r.first_io_ms)));
    rows.push(("first-write".into(), col(|r| r.first_write_ms)));
    rows.push(("max-pause".into(), col(|r| r.max_pause_ms)));
    rows.push(("write-pause".into(), col(|r| r.write_pause_ms)));
    rows.push(("giveback".into(), col(|r| r.giveback_ms)));
    let _ = writeln!(
        out,
        "{:<16} {:>4} {:>10} {:>10} {:>10}",
        "ms", "n", "min", "median", "max"
    );
    for (name, v) in rows {
        match min_median_max(&v) {
            Some((lo, med, hi)) => {
                let _ = writeln!(
                    out,
                    "{name:<16} {:>4} {lo:>10.1} {med:>10.1} {hi:>10.1}",
                    v.len()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{name:<16} {:>4} {:>10} {:>10} {:>10}",
                    0, "-", "-", "-"
                );
            }
        }
    }
    if let Some((lo, med, hi)) = min_median_max(&col(|r| r.log_at_kill_mib)) {
        let _ = writeln!(
            out,
            "log at kill (MiB unpruned on the owner): min {lo:.0}, median {med:.0}, max {hi:.0}"
        );
    }
    let sum = |f: fn(&RoundResult) -> u64| results.iter().map(f).sum::<u64>();
    let _ = writeln!(
        out,
        "total: acked {}, reads {}, lost {}, garbage {}, stale-reads {}, bad-reads {}, unacked-vanished {}",
        sum(|r| r.acked),
        sum(|r| r.reads),
        sum(|r| r.lost.unwrap_or(0)),
        sum(|r| r.garbage.unwrap_or(0)),
        sum(|r| r.stale_reads),
        sum(|r| r.bad_reads),
        sum(|r| r.vanished_reads),
    );
    out
}

// ---------------------------------------------------------------------------
// Entry point.

/// `nvtarget drill`.
pub fn run(args: DrillArgs) -> anyhow::Result<()> {
    if args.port == 0 || args.port > u16::MAX - 10 {
        anyhow::bail!("--port must be between 1 and {}", u16::MAX - 10);
    }
    if args.qd == 0 || args.rounds == 0 || !args.load_secs.is_finite() || args.load_secs <= 0.0 {
        anyhow::bail!("--qd, --rounds and --load-secs must be above zero");
    }
    if args.log_fill_mib > 0 && args.fault != Fault::KillOwner {
        anyhow::bail!("--log-fill-mib needs --fault kill-owner");
    }
    let mut spec = PairSpec::local(&args.data_dir, args.port);
    if let Some((lun, aggr, nvram)) = log_fill_sizes(args.log_fill_mib) {
        spec.lun_size = lun;
        spec.aggregate_size = aggr;
        spec.nvram_size = nvram;
        spec.cp_interval_ms = Some(LOG_FILL_CP_INTERVAL_MS);
    }
    for (n, name) in NODES.iter().enumerate() {
        if let Some(pid) = pair::read_pid(&spec, n).filter(|&p| pair::alive(p)) {
            anyhow::bail!(
                "node {name} is already running in {} (pid {pid}); `nvtarget pair down` first",
                args.data_dir.display()
            );
        }
    }
    let exe = std::env::current_exe().context("locating the nvtarget binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // relays[n] is what node n dials to reach its partner. They outlive the
    // drill's future so that the nodes never see a cut while being stopped.
    let relays = rt.block_on(async {
        let mut relays = Vec::new();
        for n in 0..2 {
            relays.push(Relay::start(spec.interconnect[1 - n]).await?);
        }
        std::io::Result::Ok(relays)
    });
    let relays = relays.context("starting the interconnect relays")?;
    for (n, relay) in relays.iter().enumerate() {
        spec.partner_interconnect[n] = relay.addr();
    }
    let nodes = Arc::new(Nodes {
        spec: spec.clone(),
        exe,
        state: Mutex::new(NodesState::default()),
    });
    let res = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        let mut results = Vec::new();
        let fault = args.fault;
        let rounds = args.rounds;
        let r = tokio::select! {
            r = drill(args, spec, nodes.clone(), &relays, &mut results) => r,
            _ = int.recv() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        };
        if !results.is_empty() {
            print!("{}", totals(fault, rounds, &results));
        }
        let failed = results.iter().filter(|r| !r.ok()).count();
        let r = match r {
            Ok(()) if failed > 0 => Err(anyhow::anyhow!(
                "{failed} of {} rounds failed",
                results.len()
            )),
            r => r,
        };
        println!("{}", if r.is_ok() { "PASS" } else { "FAIL" });
        r
    });
    // The loads are gone with the drill's future; the nodes are not.
    nodes.stop_all();
    drop(relays);
    rt.shutdown_timeout(Duration::from_secs(2));
    res
}

/// The drill's range of node a's LUN 0: (units, block size). Zeroed when
/// `zero`: patterns an earlier drill left (another seed) would read as
/// bytes no write of this one produced.
async fn prepare_range(addr: &str, target: &str, zero: bool) -> anyhow::Result<(u64, u32)> {
    let client = login(addr, target).await?;
    let (blocks, block_size) = client
        .capacity(0)
        .await
        .context("READ CAPACITY of node a's LUN 0")?;
    if ![512, 1024, 2048, 4096].contains(&block_size) {
        anyhow::bail!("LUN 0 has {block_size}-byte blocks; the drill handles 512 to {UNIT}");
    }
    let units = (blocks * u64::from(block_size)).min(RANGE_BYTES) / UNIT as u64;
    if units == 0 {
        anyhow::bail!("LUN 0 is smaller than one {UNIT}-byte unit");
    }
    if zero {
        let bytes = units * UNIT as u64;
        tracing::info!(bytes, "zeroing the drill's range");
        let mut off = 0;
        while off < bytes {
            let n = (1u64 << 20).min(bytes - off);
            client
                .write16(
                    0,
                    off / u64::from(block_size),
                    Bytes::from(vec![0u8; n as usize]),
                    block_size,
                    false,
                )
                .await
                .context("zeroing the drill's range")?;
            off += n;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), client.logout()).await;
    Ok((units, block_size))
}

async fn drill(
    args: DrillArgs,
    spec: PairSpec,
    nodes: Arc<Nodes>,
    relays: &[Relay],
    results: &mut Vec<RoundResult>,
) -> anyhow::Result<()> {
    let fresh = !spec.data_dir(0).exists() && !spec.data_dir(1).exists();
    spec.write_configs()?;
    let start_ms = unix_ms();
    for n in 0..2 {
        nodes.spawn(n)?;
    }
    for n in 0..2 {
        nodes.wait_portal(n, Duration::from_secs(60)).await?;
    }
    nodes
        .wait_healthy(start_ms, Duration::from_secs(60))
        .await
        .context("pair start")?;
    tracing::info!("pair is up and mirrored");

    let addr = spec.portal[0].to_string();
    let target = PairSpec::target_name(0);
    let (units, block_size) = tokio::time::timeout(
        Duration::from_secs(120),
        prepare_range(&addr, &target, !fresh),
    )
    .await
    .map_err(|_| anyhow::anyhow!("preparing LUN 0 took over 120 s"))??;
    let seed = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16))
        | 1;
    let readers = if args.qd >= 2 {
        (args.qd / 4).max(1)
    } else {
        0
    };
    let mut d = Drill {
        ctx: Arc::new(LoadCtx {
            oracle: Oracle::new(units, 0, block_size, seed),
            reads: Arc::new(ReadCheck::default()),
            seed,
            units,
            block_size,
            writers: args.qd - readers,
            readers,
            addr,
            target,
        }),
        args,
        spec,
        nodes,
        relays,
        lost_seen: HashSet::new(),
        garbage_seen: HashSet::new(),
    };

    for i in 1..=d.args.rounds {
        tracing::info!(round = i, fault = d.args.fault.name(), "round starts");
        let r = d.round().await;
        println!("{}", round_line(i, d.args.rounds, d.args.fault, &r));
        let stop = r.failure.is_some();
        results.push(r);
        if stop {
            // The pair is not known to be whole: later rounds would measure
            // something else.
            anyhow::bail!(
                "round {i} failed; node logs: {} {}",
                d.spec.log_path(0).display(),
                d.spec.log_path(1).display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn status_parses_and_tolerates_extra_and_missing_fields() {
        let s = parse_status(
            r#"{"node":"a","pid":123,"unix_ms":1,"state":"serving","epoch":1,"mirrored":true,
                "partner_alive":true,"serving":["iqn.2026-11.io.nvtarget:a"],"new_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(s.node, "a");
        assert_eq!(s.pid, 123);
        assert_eq!(s.epoch, 1);
        assert!(s.mirrored && s.partner_alive);
        assert!(s.serves_only("iqn.2026-11.io.nvtarget:a"));
        assert!(!s.serves_only("iqn.2026-11.io.nvtarget:b"));
        assert!(!s.is_taking_over());

        let s = parse_status(
            r#"{"node":"b","state":"taking-over","serving":["iqn.2026-11.io.nvtarget:b","iqn.2026-11.io.nvtarget:a"]}"#,
        )
        .unwrap();
        assert!(!s.mirrored);
        assert_eq!(s.pid, 0);
        assert!(s.is_taking_over());
        assert!(!s.serves_only("iqn.2026-11.io.nvtarget:b"));

        // Half-written or not JSON: no status (the node rewrites it).
        assert!(parse_status(r#"{"node":"a","pid":"#).is_none());
        assert!(parse_status("").is_none());
    }

    #[test]
    fn takeover_report_parses() {
        let t = parse_takeover(
            r#"{"owner":"a","by":"b","epoch":2,"silent_unix_ms":1,"detected_unix_ms":2,
                "serving_unix_ms":3,"replayed_records":10,
                "steps":[{"name":"fence","start_ms":0.0,"ms":1.2,"outcome":"ok"},
                         {"name":"replay","start_ms":1.2,"ms":3,"outcome":"ok","lun":0}],
                "total_ms":5.0,"extra":[1,2]}"#,
        )
        .unwrap();
        assert_eq!((t.owner.as_str(), t.by.as_str()), ("a", "b"));
        assert_eq!(t.epoch, 2);
        assert_eq!(
            (t.silent_unix_ms, t.detected_unix_ms, t.serving_unix_ms),
            (1, 2, 3)
        );
        assert_eq!(t.replayed_records, 10);
        assert_eq!(t.steps.len(), 2);
        assert_eq!(t.steps[0].name, "fence");
        assert!((t.steps[0].ms - 1.2).abs() < 1e-9);
        assert!((t.steps[1].ms - 3.0).abs() < 1e-9);
        assert_eq!(t.steps[1].outcome, "ok");
        assert!((t.total_ms - 5.0).abs() < 1e-9);
        assert!(parse_takeover(r#"{"owner":"a","#).is_none());
        assert!(parse_takeover("42").is_none());
    }

    #[test]
    fn reads_going_back_in_time_are_stale() {
        let rc = ReadCheck::default();
        let t0 = rc.ticket();
        rc.judge(7, t0, Some(5), Content::Gen(5));
        // Issued before the first read completed: may see the older value,
        // but never one older than what was acknowledged at issue.
        rc.judge(7, t0, Some(3), Content::Gen(3));
        assert_eq!(rc.counts().stale, 0);
        rc.judge(7, t0, Some(3), Content::Gen(2));
        assert_eq!(rc.counts().stale, 1);
        let t1 = rc.ticket();
        rc.judge(7, t1, Some(5), Content::Gen(5));
        rc.judge(7, t1, Some(5), Content::Gen(9));
        rc.judge(8, t1, None, Content::Zero);
        assert_eq!(rc.counts().stale, 1);
        // Issued after generation 9 was read and acknowledged: 5 and zeros
        // are stale.
        let t2 = rc.ticket();
        rc.judge(7, t2, Some(9), Content::Gen(5));
        rc.judge(7, t2, Some(9), Content::Zero);
        rc.judge(8, t2, None, Content::Zero);
        rc.judge(9, t2, None, Content::Garbage);
        let c = rc.counts();
        assert_eq!((c.stale, c.vanished, c.garbage, c.ok), (3, 0, 1, 6));
        assert_eq!(rc.take_examples().len(), 4);
        // Generation 12 was read while its write was in flight, then the
        // node died before acknowledging it: a later read of 9 (the newest
        // acknowledged) is not stale, but it is reported.
        let t3 = rc.ticket();
        rc.judge(7, t3, Some(9), Content::Gen(12));
        let t4 = rc.ticket();
        rc.judge(7, t4, Some(9), Content::Gen(9));
        let c = rc.counts();
        assert_eq!((c.stale, c.vanished), (3, 1));
        assert_eq!(rc.take_examples().len(), 1);
    }

    #[test]
    fn timeline_measures_pauses_and_first_io() {
        let tl = Timeline::new(2);
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        tl.session_started(at(0), 0);
        tl.read_done(at(0), at(1));
        tl.writes_acked(at(2), 1);
        let m = tl.mark(at(10), 1);
        // In flight before the mark: neither counts as first I/O.
        tl.read_done(at(5), at(11));
        tl.writes_acked(at(12), 2);
        tl.writes_acked(at(13), 3);
        assert!(tl.marker(m).unwrap().first_io.is_none());
        // A new session after the mark: its first ack counts.
        tl.session_started(at(500), 3);
        tl.writes_acked(at(600), 4);
        let mk = tl.marker(m).unwrap();
        assert_eq!(mk.first_write, Some(at(600)));
        assert_eq!(mk.first_io, Some(at(600)));
        // A read issued after the mark that completed earlier wins first-io
        // for a second marker.
        let m2 = tl.mark(at(601), 4);
        tl.read_done(at(602), at(603));
        assert_eq!(tl.marker(m2).unwrap().first_io, Some(at(603)));
        // Acks beyond the writers in flight at the mark count without a new
        // session.
        tl.writes_acked(at(604), 5);
        tl.writes_acked(at(605), 6);
        assert!(tl.marker(m2).unwrap().first_write.is_none());
        tl.writes_acked(at(606), 7);
        assert_eq!(tl.marker(m2).unwrap().first_write, Some(at(606)));
        tl.finish(at(1606));
        let st = tl.inner.lock();
        assert_eq!(st.max_pause, Duration::from_millis(1000));
        assert_eq!(st.max_write_pause, Duration::from_millis(1000));
        assert_eq!(st.sessions, 2);
    }

    #[test]
    fn log_fill_sizes_leave_the_fill_below_the_cp_trigger() {
        assert_eq!(log_fill_sizes(0), None);
        for n in [1, 256, 1024] {
            let (lun, aggr, nvram) = log_fill_sizes(n).unwrap();
            let p = |s: &str| crate::config::parse_size(s).unwrap();
            assert_eq!(p(&lun), RANGE_BYTES + (n << 20));
            assert!(p(&aggr) > p(&lun));
            let l = nvtarget_nvram::Layout::for_size(p(&nvram)).unwrap();
            assert!(
                l.half_capacity() / 2 >= (n + LOG_FILL_SLACK_MIB) << 20,
                "{n}"
            );
        }
    }

    #[test]
    fn stats_and_lines() {
        assert_eq!(min_median_max(&[]), None);
        assert_eq!(min_median_max(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(min_median_max(&[4.0, 1.0]), Some((1.0, 1.0, 4.0)));
        let r = RoundResult {
            detect_ms: Some(1043),
            takeover: Some(TakeoverReport {
                steps: vec![TakeoverStep {
                    name: "fence".into(),
                    ms: 1.25,
                    outcome: "ok".into(),
                    ..Default::default()
                }],
                total_ms: 40.0,
                ..Default::default()
            }),
            lost: Some(0),
            garbage: Some(0),
            acked: 10,
            ..Default::default()
        };
        assert!(r.ok());
        let line = round_line(1, 5, Fault::KillOwner, &r);
        assert!(
            line.starts_with("round 1/5 kill-owner ok: detect 1043ms"),
            "{line}"
        );
        assert!(line.contains("takeover 40.0ms [fence 1.2ms]"), "{line}");
        assert!(line.contains("lost 0,"), "{line}");
        let t = totals(Fault::KillOwner, 5, &[r]);
        assert!(
            t.contains("drill kill-owner: 1 rounds, 1 ok, 0 failed (of 5 planned)"),
            "{t}"
        );
        assert!(t.contains("  fence"), "{t}");
        assert!(t.contains("lost 0,"), "{t}");
        let bad = RoundResult {
            lost: Some(2),
            garbage: Some(0),
            ..Default::default()
        };
        assert!(!bad.ok());
        assert!(round_line(2, 5, Fault::KillOwner, &bad).contains("FAILED (data)"));
    }

    /// An upstream that greets, then echoes; reports accepts and EOFs.
    async fn echo_upstream() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (eof_tx, eof_rx) = tokio::sync::mpsc::unbounded_channel();
        let a = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let eof = eof_tx.clone();
                tokio::spawn(async move {
                    s.write_all(b"hello").await.unwrap();
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = eof.send(());
                });
            }
        });
        (addr, accepts, eof_rx)
    }

    async fn expect_closed(s: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the relay did not close the connection");
        assert!(matches!(r, Ok(0) | Err(_)), "got {r:?}");
    }

    async fn exchange(s: &mut TcpStream) {
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut rd, mut wr) = s.split();
        let send = async {
            wr.write_all(&big).await.unwrap();
        };
        let recv = async {
            let mut back = vec![0u8; big.len()];
            rd.read_exact(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(send, recv);
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn relay_passes_bytes_both_ways() {
        let (up, accepts, _eofs) = echo_upstream().await;
        let relay = Relay::start(up).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        exchange(&mut s).await;
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        assert_eq!(relay.live(), 1);
    }

    #[tokio::test]
    async fn relay_cut_closes_both_sides_and_refuses_until_healed() {
        let (up, accepts, mut eofs) = echo_upstream().await;
        let relay = Relay::start(up).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        exchange(&mut s).await;

        relay.cut();
        // The initiator side sees the end...
        expect_closed(&mut s).await;
        // ...and so does the far side.
        tokio::time::timeout(Duration::from_secs(2), eofs.recv())
            .await
            .expect("upstream side not closed")
            .unwrap();
        for _ in 0..100 {
            if relay.live() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(relay.live(), 0);

        // New connections are accepted and closed at once, never relayed.
        for _ in 0..3 {
            let mut s = TcpStream::connect(relay.addr()).await.unwrap();
            expect_closed(&mut s).await;
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1);

        relay.heal();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        exchange(&mut s).await;
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
    }

    /// The load against one real `nvtarget serve`: SIGKILL it under load,
    /// restart it, and the load must log in again and verify clean. Needs
    /// the built binary, which unit tests are not given:
    /// `NVTARGET_BIN=$CARGO_TARGET_DIR/debug/nvtarget cargo test -p nvtarget
    /// --bin nvtarget -- --ignored single_target`.
    #[test]
    #[ignore = "needs NVTARGET_BIN (the built binary)"]
    fn load_rides_out_a_single_target_kill_and_restart() {
        use std::process::{Command, Stdio};
        let bin = std::env::var_os("NVTARGET_BIN").expect("NVTARGET_BIN");
        let dir =
            std::env::temp_dir().join(format!("nvtarget-drill-single-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let start = || {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("serve.log"))
                .unwrap();
            let child = Command::new(&bin)
                .args(["serve", "--listen", &addr, "--data-dir"])
                .arg(dir.join("data"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            assert!(pair::wait_listening(
                addr.parse().unwrap(),
                Duration::from_secs(30)
            ));
            child
        };
        let mut child = start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _rt = rt.enter();
        let ctx = Arc::new(LoadCtx {
            oracle: Oracle::new(4096, 0, 512, 0x5eed),
            reads: Arc::new(ReadCheck::default()),
            seed: 0x5eed,
            units: 4096,
            block_size: 512,
            writers: 12,
            readers: 4,
            addr: addr.clone(),
            target: "iqn.2026-11.io.nvtarget:default".into(),
        });
        for round in 0..3 {
            let load = Load::start(ctx.clone());
            rt.block_on(tokio::time::sleep(Duration::from_millis(800)));
            let fault = load.mark();
            child.kill().unwrap();
            child.wait().unwrap();
            rt.block_on(tokio::time::sleep(Duration::from_millis(500)));
            child = start();
            rt.block_on(async {
                wait_for("I/O after restart", Duration::from_secs(30), || {
                    Ok(load.timeline.marker(fault).and_then(|m| m.first_io))
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(800)).await;
            });
            let sum = rt.block_on(load.stop());
            let rep = rt.block_on(async {
                let c = login(&addr, &ctx.target).await.unwrap();
                ctx.oracle.verify(&c, 0).await.unwrap()
            });
            let reads = ctx.reads.counts();
            let m = sum.markers[0];
            println!(
                "round {round}: sessions {}, first-io {:?}, first-write {:?}, max-pause {:?}, acked {}, reads {}, lost {}, garbage {}, stale {}, landed {}",
                sum.sessions,
                m.first_io.map(|t| t - m.at),
                m.first_write.map(|t| t - m.at),
                sum.max_pause,
                ctx.oracle.acked_writes.load(Ordering::Relaxed),
                reads.ok,
                rep.lost.len(),
                rep.garbage.len(),
                reads.stale,
                rep.in_flight_landed
            );
            assert!(sum.sessions >= 2, "the load did not log in again");
            assert!(!sum.stuck);
            assert!(rep.ok(), "{:?} {:?}", rep.lost, rep.garbage);
            assert_eq!(
                (reads.stale, reads.garbage),
                (0, 0),
                "{:?}",
                ctx.reads.take_examples()
            );
            assert!(m.first_write.is_some());
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
