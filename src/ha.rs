//! One node of an HA pair: mirrors its log, keeps the partner's, decides and
//! runs takeover and giveback.
//!
//! Roles at once: *owner* of its own aggregate (its log goes to the partner
//! through the mirror sender; a write is answered only once the partner has
//! it, or after this node confirmed in its mailbox that no takeover was
//! claimed and went unmirrored) and *partner* of the other node (its records
//! land in our PARTNER portion and in a dependency index).
//!
//! Failure of the partner = its interconnect is gone (paths down or silent)
//! AND its mailbox heartbeat has not moved for the staleness window. The
//! takeover is refused while the partner's mailbox says it was unmirrored
//! (our copy of its log would be incomplete) or after a clean shutdown.
//!
//! Takeover, as a [`TakeoverPlan`] of timed steps: fence (new epoch and our
//! name in the partner's mailbox; its aggregate's writes check the epoch)
//! -> open its aggregate -> replay its mirrored records (parallel where
//! independent) -> restore its targets (LUNs, persistent reservations) ->
//! flip ALUA; in parallel with the storage steps, bind its portal address;
//! then serve. Giveback (asked through the mailbox by `nvtarget pair
//! giveback`): stop serving its targets, final CP, clear the claim; the
//! returning node then opens its aggregate with the new epoch.
//!
//! Known limits: one-machine "shared storage" (files and a flock-protected
//! mailbox); a node that dies while holding its partner's storage leaves
//! the partner waiting for a giveback (double failure).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use nvtarget_mirror::{Event, RecordSource, Seq};
use nvtarget_scsi::{AluaState, DevError};
use nvtarget_takeover::{DependencyIndex, ReplayPlan, TakeoverPlan};
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Config, PairSection};
use crate::interconnect::{self, MirrorHandle, ReceiverHandle};
use crate::mailbox::{HeartbeatWatch, Mailbox, MailboxState, OwnerState};
use crate::node::{self, AluaLayout, Node};
use crate::partner::{PartnerStats, RemoteTarget};
use crate::storedev::{Fence, Store, WriteMirror};

/// Written next to the data: what `pair status` and the drill read.
pub const STATUS_FILE: &str = "status.json";
pub const TAKEOVER_FILE: &str = "takeover.json";

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The pair section with its paths resolved against the config's directory.
#[derive(Clone, Debug)]
pub struct PairPaths {
    pub sec: PairSection,
    pub partner_config: PathBuf,
    pub partner_data_dir: PathBuf,
}

impl PairPaths {
    pub fn resolve(sec: &PairSection, config_file: Option<&Path>) -> PairPaths {
        let base = config_file
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        PairPaths {
            sec: sec.clone(),
            partner_config: base.join(&sec.partner_config),
            partner_data_dir: base.join(&sec.partner_data_dir),
        }
    }
}

/// Before the node opens its own aggregate: if the partner holds it (a
/// takeover), wait until it is given back. Returns the epoch to run with.
pub fn wait_until_ours(me: &str, data_dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mb = Mailbox::open(data_dir)?;
    let mut announced = false;
    loop {
        let s = mb.read()?;
        match &s.taken_over_by {
            None if announced => {
                // Given back: a new epoch fences whatever of the partner's
                // takeover could still reach our aggregate.
                let (ok, s) = mb.update(|s| {
                    if s.taken_over_by.is_some() {
                        return false;
                    }
                    s.epoch += 1;
                    true
                })?;
                if ok {
                    tracing::info!(
                        epoch = s.epoch,
                        "storage given back: serving it under a new epoch"
                    );
                    return Ok(s.epoch);
                }
            }
            None => return Ok(s.epoch),
            Some(by) => {
                if !announced {
                    tracing::warn!(taken_over_by = %by, epoch = s.epoch, "this node's storage is served by its partner: waiting for `nvtarget pair giveback`");
                    mb.update(|s| s.owner_state = OwnerState::WaitingGiveback)?;
                    announced = true;
                }
                write_status(
                    data_dir,
                    &Status {
                        node: me.to_string(),
                        pid: std::process::id(),
                        unix_ms: unix_ms(),
                        state: "waiting-giveback",
                        epoch: s.epoch,
                        mirrored: false,
                        partner_alive: true,
                        serving: Vec::new(),
                        taken_over: None,
                        log: None,
                        partner_reads: None,
                    },
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[derive(Serialize)]
struct Status {
    node: String,
    pid: u32,
    unix_ms: u64,
    state: &'static str,
    epoch: u64,
    mirrored: bool,
    partner_alive: bool,
    serving: Vec<String>,
    taken_over: Option<String>,
    /// This node's NVRAM log and its mirror to the partner.
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<LogStatus>,
    /// Commands for the partner's targets that arrived here.
    #[serde(skip_serializing_if = "Option::is_none")]
    partner_reads: Option<PartnerReads>,
}

#[derive(Serialize)]
struct LogStatus {
    active_half: usize,
    /// Percent of the active half holding records.
    fill_pct: f64,
    cp_in_progress: bool,
    cps: u64,
    next_seq: Seq,
    /// Records logged but not yet acknowledged by the partner.
    mirror_lag_records: u64,
    /// Bytes queued or in flight to the partner.
    mirror_lag_bytes: u64,
    mirror_acked_seq: Seq,
    pruned_seq: Seq,
}

#[derive(Serialize)]
struct PartnerReads {
    /// The partner announces it mirrors to us: our log may answer reads.
    owner_mirrored: bool,
    /// READs answered from the mirrored log ("live replay").
    live_replayed: u64,
    /// Commands forwarded to the owner over the interconnect.
    forwarded: u64,
    forward_errors: u64,
    /// Highest seq of the partner's log its CPs made durable (our index
    /// and mirrored copy no longer hold it).
    partner_pruned_seq: u64,
}

fn write_status(dir: &Path, s: &Status) {
    write_json(dir, STATUS_FILE, s);
}

/// Writes `dir/name` atomically (temporary file, then rename), so readers
/// never see half a file.
pub fn write_json(dir: &Path, name: &str, v: &impl Serialize) {
    let tmp = dir.join(format!(".{name}.tmp"));
    let r = serde_json::to_vec_pretty(v)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if let Err(e) = r {
        tracing::warn!(file = name, error = %e, "cannot write");
    }
}

/// A store's writes are allowed while its mailbox still carries our epoch.
struct MailboxFence {
    mb: Arc<Mailbox>,
    epoch: u64,
}

impl Fence for MailboxFence {
    fn check(&self) -> std::io::Result<()> {
        let now = self.mb.epoch().map_err(std::io::Error::other)?;
        if now == self.epoch {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "fenced: {} now has epoch {now}, this node writes with {}",
                self.mb.path().display(),
                self.epoch
            )))
        }
    }
}

/// The mirror sender as the store's write path sees it.
struct MirrorAdapter(MirrorHandle);

impl WriteMirror for MirrorAdapter {
    fn submit(&self, seq: Seq, offset: u64, bytes: Bytes) {
        if let Err(e) = self.0.submit(seq, offset, bytes) {
            tracing::error!(seq, error = %e, "mirror refused a record");
        }
    }
    fn wait(&self, seq: Seq) -> Result<(), DevError> {
        self.0
            .wait_acked(seq)
            .map_err(|e| DevError::Io(std::io::Error::other(format!("mirror: {e}"))))
    }
    fn watch_acks(&self) -> tokio::sync::watch::Receiver<crate::interconnect::AckView> {
        self.0.watch_acks()
    }
    fn cp_done(&self, seq: Seq) {
        self.0.cp_done(seq);
    }
}

/// Records the partner lacks, read back from our log.
struct LogRecords {
    store: std::sync::Weak<Store>,
    /// seq -> (offset, len) from the last scan.
    cache: Mutex<std::collections::HashMap<Seq, (u64, u64)>>,
}

impl RecordSource for LogRecords {
    fn read(&self, seq: Seq) -> Option<(u64, Bytes)> {
        let store = self.store.upgrade()?;
        let log = store.log();
        let mut cache = self.cache.lock();
        if !cache.contains_key(&seq) {
            cache.clear();
            for r in log.local_records().ok()? {
                cache.insert(r.seq, (r.offset, 64 + r.data_len as u64));
            }
        }
        let (off, len) = *cache.get(&seq)?;
        let bytes = log.local_read(off, len as usize).ok()?;
        // The half may have been reused since the scan.
        let rec = nvtarget_nvram::record::decode(&bytes).ok()?;
        (rec.seq == seq).then(|| (off, Bytes::from(bytes)))
    }
}

/// Our PARTNER portion, where the partner's records land.
struct PartnerRegion(Arc<Store>);

impl nvtarget_mirror::PartnerStore for PartnerRegion {
    fn store(&mut self, offset: u64, bytes: &[u8]) -> nvtarget_nvram::Result<()> {
        self.0.log().partner_write(offset, bytes)
    }
    fn sync(&mut self) -> nvtarget_nvram::Result<()> {
        self.0.log().partner_sync()
    }
}

fn takeover_op(op: nvtarget_nvram::Op) -> nvtarget_takeover::Op {
    use nvtarget_nvram::Op as N;
    use nvtarget_takeover::Op as T;
    match op {
        N::WRITE => T::Write,
        N::WRITE_SAME => T::WriteSame,
        N::UNMAP => T::Unmap,
        N::COMPARE_AND_WRITE => T::CompareAndWrite,
        _ => T::Meta,
    }
}

fn node_id(name: &str) -> u64 {
    crc32c::crc32c(name.as_bytes()) as u64 | 1 << 32
}

/// The partner's storage while we serve it.
struct TakenOver {
    store: Arc<Store>,
    targets: Vec<String>,
    portal: Option<tokio::task::AbortHandle>,
    portal_addr: String,
}

#[derive(Serialize, Clone)]
struct StepJson {
    name: String,
    start_ms: f64,
    ms: f64,
    outcome: String,
}

#[derive(Serialize)]
struct TakeoverJson {
    owner: String,
    by: String,
    epoch: u64,
    silent_unix_ms: u64,
    detected_unix_ms: u64,
    serving_unix_ms: u64,
    replayed_records: u64,
    skipped_records: u64,
    steps: Vec<StepJson>,
    total_ms: f64,
}

pub struct Ha {
    me: String,
    partner: String,
    paths: PairPaths,
    data_dir: PathBuf,
    partner_cfg: Config,
    my_mb: Arc<Mailbox>,
    partner_mb: Arc<Mailbox>,
    epoch: u64,
    instance: u64,
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    mirror: MirrorHandle,
    receiver: ReceiverHandle,
    index: Arc<Mutex<DependencyIndex>>,
    /// The interconnect said the partner went silent (and not alive since).
    partner_silent: Arc<AtomicBool>,
    /// Unix ms of the first sign the partner was gone (0 = none).
    silent_since_ms: Arc<AtomicU64>,
    mirrored: Arc<AtomicBool>,
    taken: Mutex<Option<TakenOver>>,
    shutting_down: AtomicBool,
    partner_stats: Arc<PartnerStats>,
    partner_ic: SocketAddr,
}

impl Ha {
    /// Wires the mirror into `node`'s store and starts the interconnect, the
    /// mailbox heartbeat and the failure detector.
    pub async fn start(
        node: Arc<Node>,
        paths: PairPaths,
        data_dir: &Path,
        epoch: u64,
    ) -> anyhow::Result<Arc<Ha>> {
        let sec = paths.sec.clone();
        let store = node
            .store()
            .cloned()
            .context("a pair node needs the store backend")?;
        let partner_cfg = Config::load(Some(&paths.partner_config)).with_context(|| {
            format!(
                "the partner's configuration {}",
                paths.partner_config.display()
            )
        })?;
        let my_mb = Arc::new(Mailbox::open(data_dir)?);
        std::fs::create_dir_all(&paths.partner_data_dir)
            .with_context(|| format!("creating {}", paths.partner_data_dir.display()))?;
        let partner_mb = Arc::new(Mailbox::open(&paths.partner_data_dir)?);
        let instance = node_id(&format!("{}-{}", std::process::id(), unix_ms()));
        my_mb.update(|s| {
            s.owner_instance = instance;
            s.owner_state = OwnerState::Serving;
            s.unmirrored = false;
            s.giveback_requested = false;
            s.heartbeat += 1;
            s.heartbeat_unix_ms = unix_ms();
        })?;

        let region_len = store.log().layout().local_len();
        let mut mcfg =
            nvtarget_mirror::Config::new(node_id(&sec.node), node_id(&sec.partner), region_len);
        mcfg.epoch = epoch;
        mcfg.paths = sec.paths;
        mcfg.heartbeat_interval = Duration::from_millis(sec.heartbeat_ms);
        mcfg.missed_heartbeats = sec.missed_heartbeats;

        let partner_silent = Arc::new(AtomicBool::new(false));
        let silent_since_ms = Arc::new(AtomicU64::new(0));
        let mirrored = Arc::new(AtomicBool::new(true));
        let index = Arc::new(Mutex::new(DependencyIndex::new()));

        // Owner side: our log to the partner.
        let committed = store.aggregate().highest_seq();
        let last_logged = store.log().stats().durable_seq.max(committed);
        let sender_events: interconnect::EventSink = {
            let silent = partner_silent.clone();
            let since = silent_since_ms.clone();
            let mirrored = mirrored.clone();
            let mb = my_mb.clone();
            Arc::new(move |ev| match ev {
                Event::PeerSilent { .. } => {
                    silent.store(true, Ordering::Release);
                    let _ =
                        since.compare_exchange(0, unix_ms(), Ordering::AcqRel, Ordering::Acquire);
                }
                Event::PeerAlive => {
                    silent.store(false, Ordering::Release);
                    since.store(0, Ordering::Release);
                }
                Event::Mirrored => {
                    tracing::info!("partner caught up: writes are mirrored again");
                    let mb = mb.clone();
                    let mirrored = mirrored.clone();
                    std::thread::spawn(move || match mb.update(|s| s.unmirrored = false) {
                        Ok(_) => mirrored.store(true, Ordering::Release),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot record mirrored state in the mailbox")
                        }
                    });
                }
                Event::Failed(e) => tracing::error!(error = %e, "mirror failed"),
                Event::PathFailed { path, error } => {
                    tracing::debug!(path = path.0, error = %error, "mirror path failed")
                }
                _ => {}
            })
        };
        let partner_ic: SocketAddr = sec
            .partner_interconnect
            .parse()
            .context("pair.partner_interconnect")?;
        let mirror = interconnect::start_sender(
            &tokio::runtime::Handle::current(),
            mcfg.clone(),
            partner_ic,
            LogRecords {
                store: Arc::downgrade(&store),
                cache: Mutex::new(Default::default()),
            },
            committed,
            last_logged,
            sender_events,
        );
        store.set_mirror(Arc::new(MirrorAdapter(mirror.clone())));
        crate::metrics::watch_mirror(node.metrics(), mirror.clone());

        // Partner side: its log into our PARTNER portion and the index.
        let partner_stats = Arc::new(PartnerStats::default());
        let receiver_events: interconnect::EventSink = {
            let index = index.clone();
            let stats = partner_stats.clone();
            let silent = partner_silent.clone();
            let since = silent_since_ms.clone();
            Arc::new(move |ev| match ev {
                Event::Indexed {
                    meta, seq, offset, ..
                } => {
                    let r = nvtarget_takeover::RecordMeta {
                        seq,
                        lun: meta.lun,
                        lba: meta.lba,
                        blocks: meta.blocks,
                        op: takeover_op(meta.op),
                        location: offset,
                    };
                    if let Err(e) = index.lock().insert(&r) {
                        tracing::error!(seq, error = %e, "dependency index refused a record");
                    }
                }
                Event::Pruned(seq) => {
                    index.lock().prune(seq);
                    stats.pruned_seq.fetch_max(seq, Ordering::Release);
                }
                Event::PeerSilent { .. } => {
                    // The owner may go unmirrored: our index stops being
                    // the whole story, so reads go to the owner.
                    stats.owner_mirrored.store(false, Ordering::Release);
                    silent.store(true, Ordering::Release);
                    let _ =
                        since.compare_exchange(0, unix_ms(), Ordering::AcqRel, Ordering::Acquire);
                }
                Event::PeerAlive => silent.store(false, Ordering::Release),
                Event::PeerState(st) => {
                    stats
                        .owner_mirrored
                        .store(st == nvtarget_mirror::NodeState::SERVING, Ordering::Release);
                }
                Event::Failed(e) => tracing::error!(error = %e, "partner log store failed"),
                _ => {}
            })
        };
        let listen: SocketAddr = sec.interconnect.parse().context("pair.interconnect")?;
        let partner_epoch = partner_mb.read()?.epoch;
        // Commands the partner forwards to us run on our targets.
        let (proxy_tx, mut proxy_rx) =
            tokio::sync::mpsc::unbounded_channel::<tokio::net::TcpStream>();
        let resolver: crate::proxy::Resolver = {
            let node = Arc::downgrade(&node);
            Arc::new(move |name: &str| node.upgrade()?.target(name))
        };
        tokio::spawn(async move {
            while let Some(stream) = proxy_rx.recv().await {
                tokio::spawn(crate::proxy::serve_connection(stream, resolver.clone()));
            }
        });
        let receiver = interconnect::start_listener(
            listen,
            mcfg,
            PartnerRegion(store.clone()),
            0,
            0,
            receiver_events,
            Some(proxy_tx),
        )
        .await
        .with_context(|| format!("interconnect listener {listen}"))?;
        receiver.set_min_peer_epoch(partner_epoch);

        let ha = Arc::new(Ha {
            me: sec.node.clone(),
            partner: sec.partner.clone(),
            paths,
            data_dir: data_dir.to_path_buf(),
            partner_cfg,
            my_mb,
            partner_mb,
            epoch,
            instance,
            node,
            rt: tokio::runtime::Handle::current(),
            mirror,
            receiver,
            index,
            partner_silent,
            silent_since_ms,
            mirrored,
            taken: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            partner_stats,
            partner_ic,
        });
        ha.node.set_remote(ha.remote_entries(&partner_ic));
        // Create and format the log a takeover will use now, not during
        // the takeover (a fresh 256 MiB region costs a second).
        let path = ha.takeover_log_path();
        let opts = node::log_options(&ha.partner_cfg);
        std::thread::spawn(move || {
            let cfg = nvtarget_nvram::RegionConfig {
                size: opts.size,
                durability: opts.durability,
            };
            if let Err(e) = nvtarget_nvram::Log::open_file(&path, cfg, 0) {
                tracing::warn!(path = %path.display(), error = %e, "cannot prepare the takeover log");
            }
        });
        let h = ha.clone();
        std::thread::Builder::new()
            .name("ha".into())
            .spawn(move || h.run())
            .context("starting the HA thread")?;
        Ok(ha)
    }

    /// The partner's targets as presented here: live replay + forwarding.
    fn remote_entries(&self, partner_ic: &SocketAddr) -> Vec<(String, node::RemoteEntry)> {
        let Some(own) = self.node.store().cloned() else {
            return Vec::new();
        };
        let proxy = crate::proxy::ProxyClient::new(*partner_ic);
        self.partner_cfg
            .targets
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    node::RemoteEntry {
                        target: Arc::new(RemoteTarget::new(
                            t.name.clone(),
                            proxy.clone(),
                            self.index.clone(),
                            own.clone(),
                            self.paths.partner_data_dir.clone(),
                            self.partner_stats.clone(),
                        )),
                        allowed: t.allowed_initiators.clone(),
                        chap: t.chap.as_ref().map(node::ChapConfig::from),
                        block_sizes: t.luns.iter().map(|l| (l.id, l.block_size)).collect(),
                    },
                )
            })
            .collect()
    }

    /// The log for writes to the partner's LUNs while we serve them.
    fn takeover_log_path(&self) -> PathBuf {
        self.data_dir
            .join(format!("takeover-{}.nvram", self.partner))
    }

    /// The fence for this node's own aggregate.
    pub fn own_fence(mb: Arc<Mailbox>, epoch: u64) -> Arc<dyn Fence> {
        Arc::new(MailboxFence { mb, epoch })
    }

    fn hb(&self) -> Duration {
        Duration::from_millis(self.paths.sec.heartbeat_ms)
    }

    /// How long the partner's mailbox heartbeat must stand still.
    fn stale_window(&self) -> Duration {
        (self.hb() * 3).max(Duration::from_millis(150))
    }

    /// The interconnect to the partner is gone: no path up, or silent.
    fn interconnect_down(&self) -> bool {
        self.partner_silent.load(Ordering::Acquire) || self.mirror.connected_paths() == 0
    }

    /// Clean shutdown: say so in the mailbox (no takeover of a node that
    /// stopped on purpose), then a final CP happens in `Node::shutdown`.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        if let Some(t) = self.taken.lock().take() {
            if let Err(e) = t.store.checkpoint() {
                tracing::error!(error = %e, "final CP of the partner's aggregate");
            }
        }
        let _ = self
            .my_mb
            .update(|s| s.owner_state = OwnerState::ShuttingDown);
        self.mirror.shutdown();
        self.receiver.shutdown();
    }

    fn run(self: Arc<Self>) {
        let mut watch = HeartbeatWatch::new(Instant::now());
        let mut ic_down_since: Option<Instant> = None;
        let mut tick = 0u64;
        loop {
            std::thread::sleep(self.hb());
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
            tick += 1;
            // Our heartbeat; and are we still the owner of our aggregate?
            let mine = self.my_mb.update(|s| {
                let fenced = s.epoch != self.epoch || s.taken_over_by.is_some();
                if !fenced {
                    s.heartbeat += 1;
                    s.heartbeat_unix_ms = unix_ms();
                    s.owner_instance = self.instance;
                    s.owner_state = if self.mirrored.load(Ordering::Acquire) {
                        OwnerState::Serving
                    } else {
                        OwnerState::ServingUnmirrored
                    };
                }
                fenced
            });
            match mine {
                Ok((true, s)) => self.fenced(&s),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "mailbox heartbeat failed"),
            }
            let now = Instant::now();
            let partner = match self.partner_mb.read() {
                Ok(s) => {
                    watch.observe(&s, now);
                    Some(s)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the partner's mailbox");
                    None
                }
            };
            let down = self.interconnect_down();
            if down {
                ic_down_since.get_or_insert(now);
                let _ = self.silent_since_ms.compare_exchange(
                    0,
                    unix_ms(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            } else {
                ic_down_since = None;
                self.silent_since_ms.store(0, Ordering::Release);
            }
            let taken = self.taken.lock().is_some();
            if let (Some(since), Some(p)) = (ic_down_since, &partner) {
                let long = now.duration_since(since) >= self.stale_window();
                if !taken && watch.stale(now, self.stale_window()) && self.may_take_over(p) {
                    self.takeover();
                } else if long && self.mirrored.load(Ordering::Acquire) {
                    self.go_unmirrored();
                }
            }
            if taken {
                if let Some(p) = &partner {
                    if p.giveback_requested && p.owner_state == OwnerState::WaitingGiveback {
                        self.giveback();
                    }
                }
            }
            if tick.is_multiple_of(3) {
                self.write_status(partner.as_ref(), down);
            }
        }
    }

    fn may_take_over(&self, p: &MailboxState) -> bool {
        if !self.paths.sec.auto_takeover {
            return false;
        }
        if p.taken_over_by.is_some() {
            return false;
        }
        match p.owner_state {
            OwnerState::Serving => {}
            // Stopped on purpose, never started, or waiting for us.
            _ => return false,
        }
        if p.unmirrored {
            tracing::warn!(partner = %self.partner, "partner looks dead but was running unmirrored: no automatic takeover (its log copy here is incomplete)");
            return false;
        }
        true
    }

    /// Our mailbox shows a takeover of our storage: stop at once. Nothing
    /// more may be acknowledged under the old epoch.
    fn fenced(&self, s: &MailboxState) -> ! {
        tracing::error!(epoch = s.epoch, our_epoch = self.epoch, taken_over_by = ?s.taken_over_by, "this node was fenced by its partner: stopping");
        std::process::exit(75)
    }

    fn go_unmirrored(&self) {
        let r = self.my_mb.update(|s| {
            let fenced = s.epoch != self.epoch || s.taken_over_by.is_some();
            if !fenced {
                s.unmirrored = true;
                s.owner_state = OwnerState::ServingUnmirrored;
            }
            fenced
        });
        match r {
            Ok((true, s)) => self.fenced(&s),
            Ok(_) => {
                self.mirrored.store(false, Ordering::Release);
                self.mirror.go_unmirrored();
                tracing::warn!(partner = %self.partner, "interconnect down and no takeover claimed: serving unmirrored");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record unmirrored state; writes keep waiting")
            }
        }
    }

    fn write_status(&self, _partner: Option<&MailboxState>, ic_down: bool) {
        let taken = self.taken.lock();
        let mirrored = self.mirrored.load(Ordering::Acquire);
        let state = match (&*taken, mirrored) {
            (Some(_), _) => "taken-over",
            (None, true) => "serving",
            (None, false) => "serving-unmirrored",
        };
        write_status(
            &self.data_dir,
            &Status {
                node: self.me.clone(),
                pid: std::process::id(),
                unix_ms: unix_ms(),
                state,
                epoch: self.epoch,
                mirrored,
                partner_alive: !ic_down,
                serving: self.node.target_names(),
                taken_over: taken.as_ref().map(|_| self.partner.clone()),
                log: self.log_status(),
                partner_reads: Some(PartnerReads {
                    owner_mirrored: self.partner_stats.owner_mirrored.load(Ordering::Relaxed),
                    live_replayed: self.partner_stats.live_reads.load(Ordering::Relaxed),
                    forwarded: self.partner_stats.forwarded.load(Ordering::Relaxed),
                    forward_errors: self.partner_stats.forward_errors.load(Ordering::Relaxed),
                    partner_pruned_seq: self.partner_stats.pruned_seq.load(Ordering::Acquire),
                }),
            },
        );
    }

    fn log_status(&self) -> Option<LogStatus> {
        let l = self.node.store()?.log().stats();
        let m = self.mirror.stats();
        Some(LogStatus {
            active_half: l.active_half,
            fill_pct: if l.half_capacity == 0 {
                0.0
            } else {
                (l.active_used as f64 * 1000.0 / l.half_capacity as f64).round() / 10.0
            },
            cp_in_progress: l.cp_in_progress,
            cps: l.cps,
            next_seq: l.next_seq,
            mirror_lag_records: m.last_submitted.saturating_sub(m.acked.max(m.pruned)),
            mirror_lag_bytes: (m.unsent_bytes + m.inflight_bytes) as u64,
            mirror_acked_seq: m.acked,
            pruned_seq: m.pruned,
        })
    }

    fn takeover(self: &Arc<Self>) {
        let detected = unix_ms();
        let silent = self.silent_since_ms.load(Ordering::Acquire);
        tracing::warn!(partner = %self.partner, "partner failed (interconnect down, mailbox heartbeat stale): taking over");
        let new_epoch = AtomicU64::new(0);
        let aggr: Mutex<Option<nvtarget_lun::Aggregate>> = Mutex::new(None);
        let store: Mutex<Option<Arc<Store>>> = Mutex::new(None);
        let listener: Mutex<Option<tokio::net::TcpListener>> = Mutex::new(None);
        let counts = Mutex::new((0u64, 0u64));
        let partner_tpgt = self.partner_cfg.portals.first().map_or(1, |p| p.tpgt);
        let portal_addr = self.paths.sec.partner_portal.clone();
        let mut plan: TakeoverPlan<'_, anyhow::Error> = TakeoverPlan::new();
        let run = (|| -> anyhow::Result<_> {
            let fence = plan.add(nvtarget_takeover::step_names::FENCE, &[], || {
                let me = self.me.clone();
                let (ok, s) = self.partner_mb.update(|s| {
                    if s.taken_over_by.is_some() || s.unmirrored {
                        return false;
                    }
                    s.epoch += 1;
                    s.taken_over_by = Some(me);
                    s.takeover_unix_ms = unix_ms();
                    s.owner_state = OwnerState::Down;
                    true
                })?;
                if !ok {
                    anyhow::bail!("the partner's mailbox changed: takeover refused ({s:?})");
                }
                new_epoch.store(s.epoch, Ordering::Release);
                // A zombie partner can no longer mirror (nor get acks).
                self.receiver.set_min_peer_epoch(s.epoch);
                // Nobody can take us over meanwhile: answer our own writes
                // without waiting for the dead partner.
                self.go_unmirrored();
                Ok(())
            })?;
            let open = plan.add(
                nvtarget_takeover::step_names::OPEN_AGGREGATE,
                &[fence],
                || {
                    let path = nvtarget_lun::cli::aggr_path(&self.paths.partner_data_dir);
                    let fence = Arc::new(MailboxFence {
                        mb: self.partner_mb.clone(),
                        epoch: new_epoch.load(Ordering::Acquire),
                    });
                    let a = Store::mount(&path, self.partner_cfg.aggregate_size(), Some(fence))?;
                    *aggr.lock() = Some(a);
                    Ok(())
                },
            )?;
            let replay = plan.add(nvtarget_takeover::step_names::REPLAY_LOG, &[open], || {
                let a = aggr.lock().take().context("aggregate not open")?;
                let t = Instant::now();
                let (n, skipped, upto) = self.replay_into(&a)?;
                tracing::info!(
                    records = n,
                    skipped,
                    ms = t.elapsed().as_millis() as u64,
                    "partner's records applied"
                );
                let t = Instant::now();
                *counts.lock() = (n, skipped);
                let log_path = self.takeover_log_path();
                let s = Store::with_log_from(
                    a,
                    &log_path,
                    node::log_options(&self.partner_cfg),
                    self.node.metrics().clone(),
                    upto,
                )?;
                tracing::info!(ms = t.elapsed().as_millis() as u64, "takeover log opened");
                *store.lock() = Some(s);
                Ok(())
            })?;
            let restore = plan.add(
                nvtarget_takeover::step_names::RESTORE_STATE,
                &[replay],
                || {
                    let s = store.lock().clone().context("store not open")?;
                    let targets = node::build_targets(
                        &self.partner_cfg,
                        Some(&s),
                        &self.paths.partner_data_dir,
                        self.node.metrics(),
                        Some(AluaLayout {
                            owner_group: partner_tpgt,
                            partner_group: Some(
                                self.node.config().portals.first().map_or(2, |p| p.tpgt),
                            ),
                            partner_state: AluaState::ActiveOptimized,
                        }),
                    )?;
                    let names = targets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
                    self.node.add_targets(targets);
                    // Sessions that reached these targets through us were
                    // forwarded to the dead owner: end them; they log in
                    // again and get the local targets.
                    self.node.set_remote(Vec::new());
                    for n in &names {
                        crate::portal::close_target_sessions(n, u64::MAX);
                    }
                    *self.taken.lock() = Some(TakenOver {
                        store: s,
                        targets: names,
                        portal: None,
                        portal_addr: format!("{portal_addr},{partner_tpgt}"),
                    });
                    Ok(())
                },
            )?;
            let address = plan.add(
                nvtarget_takeover::step_names::TAKE_OVER_ADDRESS,
                &[fence],
                || {
                    let addr: SocketAddr = portal_addr.parse().context("pair.partner_portal")?;
                    let l = bind_retry(&self.rt, addr, Duration::from_secs(3))?;
                    *listener.lock() = Some(l);
                    Ok(())
                },
            )?;
            let flip = plan.add(
                nvtarget_takeover::step_names::FLIP_ALUA,
                &[restore, address],
                || {
                    // Our own targets: the partner's port group is served by us now.
                    self.node
                        .set_alua_state(partner_tpgt, AluaState::ActiveOptimized);
                    Ok(())
                },
            )?;
            plan.add(nvtarget_takeover::step_names::SERVE, &[flip], || {
                let l = listener.lock().take().context("no listener")?;
                let node = self.node.clone();
                let task = self.rt.spawn(async move {
                    if let Err(e) = crate::portal::serve_portal(l, node, partner_tpgt).await {
                        tracing::error!(error = %e, "taken-over portal failed");
                    }
                });
                self.node
                    .add_portal_addr(format!("{portal_addr},{partner_tpgt}"));
                if let Some(t) = self.taken.lock().as_mut() {
                    t.portal = Some(task.abort_handle());
                }
                Ok(())
            })?;
            Ok(())
        })();
        if let Err(e) = run {
            tracing::error!(error = %e, "cannot plan the takeover");
            return;
        }
        let report = plan.run();
        let serving = unix_ms();
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = ?e, "TAKEOVER FAILED");
                return;
            }
        };
        let steps: Vec<StepJson> = report
            .steps
            .iter()
            .map(|s| StepJson {
                name: s.name.clone(),
                start_ms: s.started.map_or(0.0, |d| d.as_secs_f64() * 1e3),
                ms: s.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                outcome: format!("{:?}", s.outcome),
            })
            .collect();
        for s in &steps {
            tracing::info!(partner = %self.partner, partner_portal = %self.paths.sec.partner_portal, step = %s.name, start_ms = s.start_ms, ms = s.ms, outcome = %s.outcome, "takeover step");
        }
        let (n, skipped) = *counts.lock();
        let j = TakeoverJson {
            owner: self.partner.clone(),
            by: self.me.clone(),
            epoch: new_epoch.load(Ordering::Acquire),
            silent_unix_ms: if silent == 0 { detected } else { silent },
            detected_unix_ms: detected,
            serving_unix_ms: serving,
            replayed_records: n,
            skipped_records: skipped,
            steps,
            total_ms: report.total.as_secs_f64() * 1e3,
        };
        write_json(&self.data_dir, TAKEOVER_FILE, &j);
        tracing::warn!(partner = %self.partner, ms = j.total_ms, records = n, "takeover complete: serving the partner's targets");
        self.write_status(None, true);
    }

    /// Applies the partner's mirrored records newer than the aggregate's
    /// last CP to its dirty set. Returns (applied, skipped, highest seq).
    fn replay_into(&self, aggr: &nvtarget_lun::Aggregate) -> anyhow::Result<(u64, u64, Seq)> {
        let committed = aggr.highest_seq();
        let records: Vec<_> = {
            let ix = self.index.lock();
            ix.live_records()
                .filter(|r| r.seq > committed)
                .copied()
                .collect()
        };
        let upto = records.iter().map(|r| r.seq).max().unwrap_or(committed);
        let own = self.node.store().context("no own store")?.clone();
        let plan = ReplayPlan::build(&records, committed);
        let total = records.len() as u64;
        let applied = AtomicU64::new(0);
        let progress = Mutex::new(crate::progress::Progress::new(
            "takeover: replaying the partner's log",
        ));
        let stats = nvtarget_takeover::execute(&plan, 2, |r| -> anyhow::Result<()> {
            let done = applied.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(mut p) = progress.try_lock() {
                p.update(done, total, "records");
            }
            let log = own.log();
            let mut head = [0u8; 64];
            log.partner_read(r.location, &mut head)?;
            let hdr = nvtarget_nvram::record::parse_header(&head)
                .map_err(|e| anyhow::anyhow!("record seq {} header: {e:?}", r.seq))?;
            let mut buf = vec![0u8; 64 + hdr.data_len as usize];
            log.partner_read(r.location, &mut buf)?;
            let rec = nvtarget_nvram::record::decode(&buf)
                .map_err(|e| anyhow::anyhow!("record seq {}: {e:?}", r.seq))?;
            if rec.seq != r.seq {
                anyhow::bail!(
                    "record at {} is seq {}, index says {}",
                    r.location,
                    rec.seq,
                    r.seq
                );
            }
            crate::storedev::apply_record(aggr, &rec);
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("replay: {e:?}"))?;
        progress.into_inner().finish();
        aggr.note_applied_seq(upto);
        // The index is spent: its records are in the aggregate now.
        *self.index.lock() = DependencyIndex::new();
        Ok((stats.applied as u64, stats.skipped as u64, upto))
    }

    /// Returns the partner's storage: stop serving its targets, final CP,
    /// clear the claim in its mailbox.
    fn giveback(&self) {
        let t0 = Instant::now();
        let Some(t) = self.taken.lock().take() else {
            return;
        };
        tracing::info!(partner = %self.partner, "giveback requested");
        if let Some(p) = &t.portal {
            p.abort();
        }
        self.node.remove_portal_addr(&t.portal_addr);
        for name in &t.targets {
            crate::portal::close_target_sessions(name, u64::MAX);
        }
        self.node.remove_targets(&t.targets);
        self.node.set_remote(self.remote_entries(&self.partner_ic));
        let partner_tpgt = self.partner_cfg.portals.first().map_or(1, |p| p.tpgt);
        self.node
            .set_alua_state(partner_tpgt, AluaState::ActiveNonOptimized);
        t.store.close();
        if let Err(e) = t.store.checkpoint() {
            tracing::error!(error = %e, "final CP of the partner's aggregate failed: giveback aborted");
            return;
        }
        // Closed and committed: nothing of ours writes it any more.
        t.store.stop_cp();
        drop(t.store);
        match self.partner_mb.update(|s| {
            s.taken_over_by = None;
            s.giveback_requested = false;
            s.owner_state = OwnerState::Down;
        }) {
            Ok(_) => {
                tracing::info!(partner = %self.partner, ms = t0.elapsed().as_millis() as u64, "giveback complete")
            }
            Err(e) => tracing::error!(error = %e, "cannot clear the takeover claim"),
        }
        self.write_status(None, false);
    }
}

/// Binds `addr` (SO_REUSEADDR: the failed node's connections may linger
/// in TIME_WAIT), retrying briefly while its listener is still around.
fn bind_retry(
    rt: &tokio::runtime::Handle,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<tokio::net::TcpListener> {
    let _g = rt.enter();
    let end = Instant::now() + timeout;
    loop {
        let r = (|| {
            let sock = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            sock.listen(1024)
        })();
        match r {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < end => {
                tracing::debug!(%addr, error = %e, "portal address busy, retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
}
