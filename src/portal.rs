//! The tokio driver of the iSCSI portal: accepts TCP connections and moves
//! bytes between each socket and its sans-IO [`Connection`]; runs SCSI
//! commands against the node's targets and hands the results back.
//!
//! One task per connection. Commands are executed inline in that task, in the
//! order the connection hands them out (CmdSN order); the socket is written
//! with vectored writes straight from the connection's `Bytes`.
//!
//! Invariants: memory per connection is bounded by the connection's own
//! limits plus one read buffer of at most one PDU; the session table holds
//! one entry per (initiator, ISID, target) and a new leading login for the
//! same key first closes the old session's connection and waits for it to
//! end (session reinstatement), so the SCSI layer never sees two sessions on
//! one I_T nexus; every login, logout, reinstatement and connection drop is
//! logged once with the peer's address.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use nvtarget_iscsi::{
    lun_id, ChapSecrets, CloseReason, Command, Completion, Connection, ConnectionConfig, Event,
    LoginInfo, Lookup, ReferencedTask, SessionIds, SessionType, TargetDirectory, TargetParams,
    TaskAttr, TaskMgmt, TmfFunction, TmfResponse, Transmit,
};
use nvtarget_scsi::{ItNexus, ScsiCommand, ScsiTarget};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::interconnect::{AckView, MirrorWaitError};
use crate::node::{Access, Node};
use crate::storedev::{deferring_mirror_waits, DeferredAck};

/// Accepts connections forever; each gets its own task.
/// Serves iSCSI on `listener`; `tpgt` is the portal group tag (and the
/// relative port of every session through it).
pub async fn serve_portal(listener: TcpListener, node: Arc<Node>, tpgt: u16) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let params = target_params(&node);
    let directory: Arc<dyn TargetDirectory> = Arc::new(NodeDirectory { node: node.clone() });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(portal = %local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cfg = ConnectionConfig {
            params: params.clone(),
            tpgt,
            directory: directory.clone(),
        };
        // Memory is bounded per connection; this bounds the connections.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "connection refused: too many connections");
            drop(sock);
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let reason = run_connection(sock, peer, cfg, node).await;
            tracing::info!(%peer, reason = %reason, "connection closed");
            drop(slot);
        });
    }
}

fn target_params(node: &Node) -> TargetParams {
    let c = node.iscsi_params();
    TargetParams {
        max_recv_data_segment_length: c.max_recv_data_segment_length,
        max_burst_length: c.max_burst_length,
        first_burst_length: c.first_burst_length,
        max_outstanding_r2t: c.max_outstanding_r2t,
        immediate_data: c.immediate_data,
        initial_r2t: c.initial_r2t,
        queue_depth: c.queue_depth,
        nop_in_interval: (c.nop_in_interval_secs > 0)
            .then(|| Duration::from_secs(c.nop_in_interval_secs)),
        nop_in_timeout: Duration::from_secs(c.nop_in_timeout_secs.max(1)),
        ..TargetParams::default()
    }
}

// ---- sessions ------------------------------------------------------------------

/// One live session (= one connection: MaxConnections is 1).
struct SessionEntry {
    tsih: u16,
    cid: u16,
    conn_id: u64,
    /// For `nvtarget status`: the name as the initiator spelled it, where
    /// it came from, the portal it reached and when it logged in.
    initiator_name: String,
    peer: SocketAddr,
    portal: Option<SocketAddr>,
    tpgt: u16,
    since_unix_ms: u64,
    /// Tells the connection's task to close.
    stop: Arc<Notify>,
    /// Becomes true when the task has finished its cleanup.
    ended: watch::Receiver<bool>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    initiator: String,
    isid: [u8; 6],
    target: String,
}

static SESSIONS: LazyLock<Mutex<HashMap<SessionKey, SessionEntry>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static TSIHS: LazyLock<SessionIds> = LazyLock::new(SessionIds::default);
static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// A logged-in normal session, as `nvtarget status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    pub initiator: String,
    /// The ISID in hex.
    pub isid: String,
    pub target: String,
    pub tsih: u16,
    pub cid: u16,
    /// The initiator's address.
    pub peer: String,
    /// The portal address it connected to.
    pub portal: Option<String>,
    pub tpgt: u16,
    pub since_unix_ms: u64,
}

/// Every logged-in normal session of this process, by target then initiator.
pub fn sessions() -> Vec<SessionSummary> {
    let mut v: Vec<SessionSummary> = SESSIONS
        .lock()
        .iter()
        .map(|(k, e)| SessionSummary {
            initiator: e.initiator_name.clone(),
            isid: k.isid.iter().map(|b| format!("{b:02x}")).collect(),
            target: k.target.clone(),
            tsih: e.tsih,
            cid: e.cid,
            peer: e.peer.to_string(),
            portal: e.portal.map(|a| a.to_string()),
            tpgt: e.tpgt,
            since_unix_ms: e.since_unix_ms,
        })
        .collect();
    v.sort_by(|a, b| (&a.target, &a.initiator, &a.isid).cmp(&(&b.target, &b.initiator, &b.isid)));
    v
}

/// The node as seen by the login code.
struct NodeDirectory {
    node: Arc<Node>,
}

impl TargetDirectory for NodeDirectory {
    fn lookup(&self, target_name: &str, initiator: &str) -> Lookup {
        match self.node.target_access(target_name, initiator) {
            Access::NotFound => Lookup::NotFound,
            Access::Denied => Lookup::Forbidden,
            Access::Allowed { chap } => Lookup::Found {
                chap: chap.map(|c| ChapSecrets {
                    user: c.user,
                    secret: c.secret.into_bytes(),
                    mutual: c.mutual.map(|(u, s)| (u, s.into_bytes())),
                }),
            },
        }
    }

    fn send_targets(&self, initiator: &str, which: &str) -> Vec<(String, Vec<String>)> {
        self.node
            .visible_targets(initiator)
            .into_iter()
            .filter(|(name, _)| which == "All" || name == which)
            .collect()
    }

    fn allocate_tsih(&self) -> u16 {
        let sessions = SESSIONS.lock();
        let mut t = TSIHS.allocate();
        // Skip values still held by live sessions after wrap-around (bounded:
        // with every TSIH in use, sharing one is better than spinning).
        for _ in 0..u16::MAX {
            if !sessions.values().any(|e| e.tsih == t) {
                break;
            }
            t = TSIHS.allocate();
        }
        t
    }

    fn session_cid(&self, initiator: &str, isid: [u8; 6], tsih: u16) -> Option<u16> {
        SESSIONS
            .lock()
            .iter()
            .find(|(k, e)| {
                k.initiator.eq_ignore_ascii_case(initiator) && k.isid == isid && e.tsih == tsih
            })
            .map(|(_, e)| e.cid)
    }
}

/// Asks every other connection logged in to `target` to close.
pub(crate) fn close_target_sessions(target: &str, except_conn: u64) {
    for e in SESSIONS
        .lock()
        .iter()
        .filter(|(k, e)| k.target == target && e.conn_id != except_conn)
        .map(|(_, e)| e)
    {
        e.stop.notify_one();
    }
}

/// Commands that can take seconds: SANITIZE, EXTENDED COPY, WRITE SAME
/// (its range may be the whole LUN), FORMAT UNIT.
fn runs_long(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x48 | 0x83 | 0x41 | 0x93 | 0x04))
}

/// SIMPLE READ and WRITE (6/10/12/16): what may run concurrently.
fn offloadable(cmd: &Command) -> bool {
    cmd.attr == TaskAttr::Simple
        && matches!(
            cmd.cdb.first(),
            Some(0x08 | 0x28 | 0xa8 | 0x88 | 0x0a | 0x2a | 0xaa | 0x8a)
        )
}

fn spawn_io(
    b: Bound,
    cmd: Command,
    tx: tokio::sync::mpsc::UnboundedSender<(u32, Completion, bool)>,
) {
    tokio::task::spawn_blocking(move || {
        let c = execute(&b, &cmd);
        let _ = tx.send((cmd.itt, c, true));
    });
}

/// What a logged-in normal session executes against.
#[derive(Clone)]
struct Bound {
    target: Arc<ScsiTarget>,
    /// Set for the partner's targets (forwarded / live-replayed).
    remote: Option<Arc<crate::partner::RemoteTarget>>,
    nexus: ItNexus,
    key: SessionKey,
    /// LUN id -> block size, for the write residual adapter.
    block_sizes: HashMap<u64, u32>,
}

fn nexus_for(info: &LoginInfo, tpgt: u16) -> ItNexus {
    let isid_hex: String = info.isid.iter().map(|b| format!("{b:02x}")).collect();
    let isid = info.isid.iter().fold(0u64, |a, b| a << 8 | *b as u64);
    ItNexus {
        initiator_port: format!("{},i,0x{}", info.initiator_name, isid_hex),
        initiator_name: info.initiator_name.clone(),
        isid,
        relative_port: tpgt,
        tpgt,
    }
}

/// Registers the session, closing whatever held the same key (reinstatement)
/// and waiting for it so its cleanup cannot touch the new session's state.
async fn register(key: SessionKey, entry: SessionEntry) {
    let (peer, tsih) = (entry.peer, entry.tsih);
    let old = SESSIONS.lock().insert(key.clone(), entry);
    if let Some(old) = old {
        tracing::info!(%peer, initiator = %key.initiator, target = %key.target, old_tsih = old.tsih, new_tsih = tsih, "session reinstatement");
        old.stop.notify_one();
        let mut ended = old.ended;
        let _ = tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|e| *e)).await;
    }
}

// ---- one connection --------------------------------------------------------------

const READ_CHUNK: usize = 64 * 1024;
/// Connections one portal serves at once.
const MAX_CONNECTIONS: usize = 1024;
/// How long writing one batch may take before the peer is considered gone.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Bytes gathered into one vectored write.
const WRITE_BATCH: usize = 4 << 20;

async fn run_connection(
    sock: TcpStream,
    peer: SocketAddr,
    cfg: ConnectionConfig,
    node: Arc<Node>,
) -> String {
    // Small PDUs (R2T, responses) must not wait for Nagle.
    let _ = sock.set_nodelay(true);
    let local = sock.local_addr().ok();
    let _open = ConnectionGauge::new(node.metrics());
    let tpgt = cfg.tpgt;
    let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    let stop = Arc::new(Notify::new());
    let (ended_tx, ended_rx) = watch::channel(false);
    let mut conn = Connection::new(cfg, Instant::now());
    let (mut rd, mut wr) = sock.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut bound: Option<Bound> = None;
    let mut out: VecDeque<Bytes> = VecDeque::new();
    // Completions of commands run on the blocking pool (see `runs_long`),
    // flagged when they count in `io_inflight`.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, Completion, bool)>();
    // Writes that wait for a mirror ack or a device sync would serialize a
    // session if run inline: then plain I/O runs on the blocking pool, many
    // at once, and everything else waits until those are done (so ORDERED
    // tasks, TMFs' view and cache flushes keep their order).
    let offload = node.offload_io();
    // Statuses of writes run inline that wait for the partner's ack
    // (`Node::defer_mirror_waits`), in execution order, and the ack state
    // they watch.
    let defer = node.defer_mirror_waits();
    let mut deferred: Vec<Deferred> = Vec::new();
    let mut acks: Option<watch::Receiver<AckView>> = None;
    let mut io_inflight = 0usize;
    let mut held: VecDeque<Command> = VecDeque::new();
    // Commands for the partner's targets run as tasks (forwarded or
    // live-replayed), numbered; a task management function on such a
    // session waits until every one issued before it has answered (see
    // `remote_task_mgmt`), so nothing it reports ended can still land.
    let (rdone_tx, mut rdone_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u32, Completion)>();
    let mut remote_next = 0u64;
    let mut remote_running: std::collections::BTreeSet<u64> = Default::default();
    let mut parked_tmfs: Vec<(u64, nvtarget_iscsi::TaskMgmt)> = Vec::new();
    // Task management run on the owner, answered here.
    let (tmf_tx, mut tmf_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, TmfResponse)>();

    let reason = 'conn: loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::LoggedIn(info) => {
                    log_login(peer, &info);
                    if info.session_type == SessionType::Normal {
                        let name = info.target_name.clone().unwrap_or_default();
                        let (target, remote) = match (node.target(&name), node.remote(&name)) {
                            (Some(t), _) => (t, None),
                            // The partner's target: commands go to `RemoteTarget`;
                            // the SCSI target here is an empty stand-in.
                            (None, Some(r)) => (
                                Arc::new(ScsiTarget::new(
                                    nvtarget_scsi::TargetConfig::new(name.clone()),
                                    Vec::new(),
                                )),
                                Some(r),
                            ),
                            (None, None) => {
                                // Removed between lookup and now.
                                conn.close(CloseReason::ProtocolError("target vanished"));
                                continue;
                            }
                        };
                        let key = SessionKey {
                            initiator: info.initiator_name.to_ascii_lowercase(),
                            isid: info.isid,
                            target: name,
                        };
                        register(
                            key.clone(),
                            SessionEntry {
                                tsih: info.tsih,
                                cid: info.cid,
                                conn_id,
                                stop: stop.clone(),
                                ended: ended_rx.clone(),
                                initiator_name: info.initiator_name.clone(),
                                peer,
                                portal: local,
                                tpgt,
                                since_unix_ms: crate::ha::unix_ms(),
                            },
                        )
                        .await;
                        let block_sizes = node.block_sizes(&key.target).into_iter().collect();
                        bound = Some(Bound {
                            target,
                            remote,
                            nexus: nexus_for(&info, tpgt),
                            key,
                            block_sizes,
                        });
                    }
                }
                Event::Command(cmd) => {
                    if let Some((r, nexus)) = bound
                        .as_ref()
                        .and_then(|b| b.remote.clone().map(|r| (r, b.nexus.clone())))
                    {
                        let tx = rdone_tx.clone();
                        let n = remote_next;
                        remote_next += 1;
                        remote_running.insert(n);
                        tokio::spawn(async move {
                            let c = r.execute(&cmd, &nexus).await;
                            let _ = tx.send((n, cmd.itt, c));
                        });
                        continue;
                    }
                    if let Some(b) = &bound {
                        // Behind an I/O still running on the pool, anything
                        // that is not itself a plain I/O waits its turn.
                        if offload && (!held.is_empty() || (io_inflight > 0 && !offloadable(&cmd)))
                        {
                            held.push_back(cmd);
                            continue;
                        }
                        if offload && offloadable(&cmd) {
                            io_inflight += 1;
                            spawn_io(b.clone(), cmd, done_tx.clone());
                            continue;
                        }
                    }
                    let c = match &bound {
                        // A command that may run for seconds goes to the
                        // blocking pool, so the connection keeps answering
                        // (TEST UNIT READY during SANITIZE must see it in
                        // progress). The I/O path stays inline unless the
                        // device waits for something slow (see `offload`).
                        Some(b) if runs_long(&cmd.cdb) => {
                            let b = b.clone();
                            let tx = done_tx.clone();
                            tokio::task::spawn_blocking(move || {
                                let c = execute(&b, &cmd);
                                let _ = tx.send((cmd.itt, c, false));
                            });
                            continue;
                        }
                        Some(b) if defer => {
                            let (c, d) = deferring_mirror_waits(|| execute(b, &cmd));
                            match d {
                                None => c,
                                Some(d) => {
                                    defer_status(
                                        &mut deferred,
                                        &mut acks,
                                        d,
                                        cmd.itt,
                                        c,
                                        &done_tx,
                                        &node,
                                    );
                                    release_deferred(&mut conn, &mut deferred, &mut acks, &node);
                                    continue;
                                }
                            }
                        }
                        Some(b) => execute(b, &cmd),
                        // Discovery sessions carry no SCSI commands.
                        None => Completion {
                            status: 0x02,
                            sense: nvtarget_iscsi::transport_sense(0x05, 0x20, 0x00),
                            ..Completion::default()
                        },
                    };
                    let _ = conn.complete(cmd.itt, c);
                }
                Event::TaskMgmt(t) if bound.as_ref().is_some_and(|b| b.remote.is_some()) => {
                    // Answered once the tasks issued before it have ended.
                    parked_tmfs.push((remote_next, t));
                    answer_parked_tmfs(
                        &mut conn,
                        &mut parked_tmfs,
                        &remote_running,
                        peer,
                        bound.as_ref(),
                        &tmf_tx,
                        conn_id,
                    );
                }
                Event::TaskMgmt(t) => {
                    let resp = task_mgmt(bound.as_ref(), &t, &conn);
                    tracing::info!(%peer, function = ?t.function, lun = lun_id(t.lun), response = resp.0, "task management");
                    let _ = conn.complete_tmf(t.itt, resp);
                    if t.function == TmfFunction::TARGET_COLD_RESET
                        && resp == TmfResponse::FUNCTION_COMPLETE
                    {
                        // A cold reset ends every session of the target, not
                        // only this one (RFC 7143 11.5.1); ours closes itself.
                        if let Some(b) = &bound {
                            close_target_sessions(&b.key.target, conn_id);
                        }
                    }
                }
                Event::Close(r) => {
                    if let CloseReason::LoginFailed(st) = &r {
                        let (initiator, target) = conn.login_names();
                        tracing::info!(
                            %peer,
                            initiator = initiator.unwrap_or("-"),
                            target = target.unwrap_or("-"),
                            status = format_args!("{:02x}{:02x}", st.0, st.1),
                            "login failed"
                        );
                    }
                    break 'conn format!("{r:?}");
                }
            }
        }
        while let Some(t) = conn.poll_transmit() {
            push_transmit(&mut out, t);
        }
        // A peer that stops reading must not pin this task (and the session
        // a reinstating login waits for) forever.
        tokio::select! {
            r = tokio::time::timeout(WRITE_STALL, write_all(&mut wr, &mut out)) => match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break format!("write error: {e}"),
                Err(_) => break "write stalled".to_string(),
            },
            _ = stop.notified() => break "closed while writing (reinstatement)".to_string(),
        }
        if conn.is_closed() {
            // Let poll_event report the close now that everything is written.
            continue;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let deadline = conn.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "peer closed the connection".to_string(),
                Ok(_) => conn.handle_input(&mut buf, Instant::now()),
                Err(e) => break format!("read error: {e}"),
            },
            _ = sleep_until(deadline) => conn.handle_timeout(Instant::now()),
            _ = stop.notified() => conn.close(CloseReason::Requested),
            Some((n, itt, c)) = rdone_rx.recv() => {
                let _ = conn.complete(itt, c);
                remote_running.remove(&n);
                answer_parked_tmfs(&mut conn, &mut parked_tmfs, &remote_running, peer, bound.as_ref(), &tmf_tx, conn_id);
            }
            Some((itt, resp)) = tmf_rx.recv() => {
                let _ = conn.complete_tmf(itt, resp);
            }
            r = acks_changed(&mut acks), if !deferred.is_empty() => {
                if r.is_err() {
                    // The mirror is gone (node shutting down): nothing
                    // will acknowledge these any more.
                    fail_deferred(&mut conn, &mut deferred, &MirrorWaitError::Shutdown);
                    acks = None;
                }
                release_deferred(&mut conn, &mut deferred, &mut acks, &node);
            }
            Some((itt, c, io)) = done_rx.recv() => {
                // Gone if a task management function aborted it meanwhile.
                let _ = conn.complete(itt, c);
                if io {
                    io_inflight -= 1;
                }
                // Release what waited for the pool to drain, in order.
                while let Some(b) = &bound {
                    let Some(cmd) = held.front() else { break };
                    if offloadable(cmd) {
                        let Some(cmd) = held.pop_front() else { break };
                        io_inflight += 1;
                        spawn_io(b.clone(), cmd, done_tx.clone());
                    } else if io_inflight == 0 {
                        let Some(cmd) = held.pop_front() else { break };
                        let c = execute(b, &cmd);
                        let _ = conn.complete(cmd.itt, c);
                    } else {
                        break;
                    }
                }
            }
        }
    };
    let _ = wr.shutdown().await;
    if let Some(b) = bound {
        let mut sessions = SESSIONS.lock();
        let ours = sessions.get(&b.key).map(|e| e.conn_id) == Some(conn_id);
        if ours {
            sessions.remove(&b.key);
        }
        drop(sessions);
        // The I_T nexus is gone: its tasks end, RESERVE(6) is released, a UA is queued.
        b.target.nexus_loss(&b.nexus);
        // A session to the partner's target: that happens on the owner.
        if let Some(r) = b.remote.clone() {
            let nexus = b.nexus.clone();
            tokio::spawn(async move {
                let _ = r.task_mgmt(crate::proxy::TMF_NEXUS_LOSS, 0, &nexus).await;
            });
        }
        if reason.starts_with("Logout") {
            tracing::info!(%peer, initiator = %b.key.initiator, target = %b.key.target, "logout");
        }
    }
    let _ = ended_tx.send(true);
    reason
}

/// Counts an open connection in the metrics for as long as it lives.
struct ConnectionGauge(prometheus_client::metrics::gauge::Gauge);

impl ConnectionGauge {
    fn new(m: &crate::metrics::Metrics) -> Self {
        m.connections.inc();
        ConnectionGauge(m.connections.clone())
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A status held until the partner acknowledged the command's records.
struct Deferred {
    seq: nvtarget_nvram::Seq,
    itt: u32,
    completion: Completion,
    since: Instant,
}

/// Holds `c` until `d.seq` is acknowledged. The connection watches one ack
/// state; a command whose records went to another store's mirror (none
/// today: a session addresses one target, one store) waits in a task.
fn defer_status(
    deferred: &mut Vec<Deferred>,
    acks: &mut Option<watch::Receiver<AckView>>,
    d: DeferredAck,
    itt: u32,
    c: Completion,
    done_tx: &tokio::sync::mpsc::UnboundedSender<(u32, Completion, bool)>,
    node: &Node,
) {
    match acks {
        Some(rx) if !rx.same_channel(&d.acks) => {
            if !deferred.is_empty() {
                let (tx, metrics) = (done_tx.clone(), node.metrics().clone());
                tokio::spawn(async move {
                    let mut rx = d.acks;
                    let c = loop {
                        let v = rx.borrow_and_update().clone();
                        if v.acked >= d.seq {
                            metrics.mirror_wait.observe(d.since.elapsed().as_secs_f64());
                            break c;
                        }
                        if let Some(e) = &v.error {
                            break mirror_failed(e);
                        }
                        if rx.changed().await.is_err() {
                            break mirror_failed(&MirrorWaitError::Shutdown);
                        }
                    };
                    let _ = tx.send((itt, c, false));
                });
                return;
            }
            *acks = Some(d.acks);
        }
        Some(_) => {}
        None => *acks = Some(d.acks),
    }
    deferred.push(Deferred {
        seq: d.seq,
        itt,
        completion: c,
        since: d.since,
    });
}

/// Sends the held statuses the ack state now allows: acknowledged ones
/// as they are, the rest as failed writes once waiting has failed.
fn release_deferred(
    conn: &mut Connection,
    deferred: &mut Vec<Deferred>,
    acks: &mut Option<watch::Receiver<AckView>>,
    node: &Node,
) {
    let Some(rx) = acks else { return };
    let v = rx.borrow_and_update().clone();
    let metrics = node.metrics();
    deferred.retain_mut(|d| {
        if d.seq > v.acked {
            return true;
        }
        metrics.mirror_wait.observe(d.since.elapsed().as_secs_f64());
        // Gone if a task management function aborted it meanwhile.
        let _ = conn.complete(d.itt, std::mem::take(&mut d.completion));
        false
    });
    if let Some(e) = &v.error {
        fail_deferred(conn, deferred, e);
    }
}

fn fail_deferred(conn: &mut Connection, deferred: &mut Vec<Deferred>, e: &MirrorWaitError) {
    for d in deferred.drain(..) {
        let _ = conn.complete(d.itt, mirror_failed(e));
    }
}

/// What a blocking wait's error becomes (`DevError::Io` in the SCSI layer):
/// MEDIUM ERROR, WRITE ERROR.
fn mirror_failed(e: &MirrorWaitError) -> Completion {
    tracing::warn!(error = %e, "write not acknowledged by the partner");
    Completion {
        status: 0x02,
        sense: nvtarget_iscsi::transport_sense(0x03, 0x0c, 0x00),
        ..Completion::default()
    }
}

async fn acks_changed(
    acks: &mut Option<watch::Receiver<AckView>>,
) -> Result<(), watch::error::RecvError> {
    match acks {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn log_login(peer: SocketAddr, info: &LoginInfo) {
    tracing::info!(
        %peer,
        initiator = %info.initiator_name,
        target = info.target_name.as_deref().unwrap_or("-"),
        session = ?info.session_type,
        tsih = info.tsih,
        header_digest = info.params.header_digest,
        data_digest = info.params.data_digest,
        "login"
    );
}

fn push_transmit(out: &mut VecDeque<Bytes>, t: Transmit) {
    for b in [t.header, t.data, t.tail] {
        if !b.is_empty() {
            out.push_back(b);
        }
    }
}

/// Writes every queued chunk with vectored writes, without copying.
async fn write_all(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    out: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = {
            let mut slices = Vec::with_capacity(out.len().min(64));
            let mut total = 0;
            for b in out.iter().take(64) {
                slices.push(IoSlice::new(b));
                total += b.len();
                if total >= WRITE_BATCH {
                    break;
                }
            }
            wr.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = out.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                out.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

pub(crate) fn scsi_attr(a: TaskAttr) -> nvtarget_scsi::TaskAttr {
    match a {
        TaskAttr::Untagged => nvtarget_scsi::TaskAttr::Untagged,
        TaskAttr::Simple => nvtarget_scsi::TaskAttr::Simple,
        TaskAttr::Ordered => nvtarget_scsi::TaskAttr::Ordered,
        TaskAttr::HeadOfQueue => nvtarget_scsi::TaskAttr::HeadOfQueue,
        TaskAttr::Aca => nvtarget_scsi::TaskAttr::Aca,
    }
}

fn execute(b: &Bound, cmd: &Command) -> Completion {
    let sc = ScsiCommand {
        lun: lun_id(cmd.lun),
        cdb: &cmd.cdb,
        attr: scsi_attr(cmd.attr),
        data_out: &cmd.data_out,
        expected_in_len: cmd.expected_in_len,
        nexus: &b.nexus,
    };
    let r = b.target.execute(&sc);
    Completion {
        status: r.status,
        sense: Bytes::from(r.sense),
        data_in: Bytes::from(r.data),
        transfer_len: write_transfer_len(b, cmd),
    }
}

/// ADAPTER until `nvtarget_scsi::ScsiResponse` reports the Data-Out length
/// the CDB itself asks for: the write residual (EDTL vs. the CDB's transfer
/// length, libiscsi iSCSIResiduals.Write*) needs it. Meanwhile the WRITE and
/// WRITE AND VERIFY families are decoded here with the LUN's configured block
/// size. None means "exactly EDTL", i.e. no residual.
fn write_transfer_len(b: &Bound, cmd: &Command) -> Option<u32> {
    if cmd.expected_out_len == 0 && cmd.expected_in_len > 0 {
        return None;
    }
    let c = &cmd.cdb[..];
    let be16 = |i: usize| {
        c.get(i..i + 2)
            .map(|x| u16::from_be_bytes([x[0], x[1]]) as u64)
    };
    let be32 = |i: usize| {
        c.get(i..i + 4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as u64)
    };
    let blocks = match c.first()? {
        // WRITE(6): 0 means 256 blocks.
        0x0a => c.get(4).map(|&n| if n == 0 { 256 } else { n as u64 }),
        0x2a | 0x2e => be16(7),
        0xaa | 0xae => be32(6),
        0x8a | 0x8e | 0x9c => be32(10),
        _ => None,
    }?;
    let bs = *b.block_sizes.get(&lun_id(cmd.lun))? as u64;
    u32::try_from(blocks * bs).ok()
}

/// Task management on a session to the partner's target (this node
/// forwards its commands or answers reads from the mirrored log). Each
/// parked function waits until every command issued before it has been
/// answered: its tasks then have all ended, so it reports them ended
/// without any of them landing later (an aborted write must not overtake
/// the initiator's retry). ABORT TASK finds its task gone by then (TASK
/// DOES NOT EXIST: the initiator has its response); the task-set
/// functions and the warm and LU resets then run on the owner for this
/// nexus, so their side effects (RESERVE(6) released, unit attentions for
/// the other nexuses) happen where the LU lives; their answer arrives on
/// `tmf_tx`; a cold reset also ends the target's sessions on both nodes.
/// The query functions and CLEAR ACA are refused.
fn answer_parked_tmfs(
    conn: &mut Connection,
    parked: &mut Vec<(u64, TaskMgmt)>,
    running: &std::collections::BTreeSet<u64>,
    peer: SocketAddr,
    bound: Option<&Bound>,
    tmf_tx: &tokio::sync::mpsc::UnboundedSender<(u32, TmfResponse)>,
    conn_id: u64,
) {
    let oldest = running.first().copied().unwrap_or(u64::MAX);
    parked.retain(|(issued_before, t)| {
        if oldest < *issued_before {
            return true;
        }
        let resp = match t.function {
            TmfFunction::ABORT_TASK => match t.referenced {
                ReferencedTask::AbortedWhileGathering
                | ReferencedTask::AbortedBeforeExecution => TmfResponse::FUNCTION_COMPLETE,
                _ if conn.is_outstanding(t.referenced_itt) => TmfResponse::FUNCTION_COMPLETE,
                _ => TmfResponse::TASK_DOES_NOT_EXIST,
            },
            f => {
                let code = match f {
                    TmfFunction::ABORT_TASK_SET => crate::proxy::TMF_ABORT_TASK_SET,
                    TmfFunction::CLEAR_TASK_SET => crate::proxy::TMF_CLEAR_TASK_SET,
                    TmfFunction::LOGICAL_UNIT_RESET => crate::proxy::TMF_LOGICAL_UNIT_RESET,
                    TmfFunction::TARGET_WARM_RESET => crate::proxy::TMF_TARGET_WARM_RESET,
                    TmfFunction::TARGET_COLD_RESET => crate::proxy::TMF_TARGET_COLD_RESET,
                    _ => 0,
                };
                match bound.and_then(|b| b.remote.clone().map(|r| (r, b.nexus.clone()))) {
                    Some((remote, nexus)) if code != 0 => {
                        let (itt, lun, tx) = (t.itt, lun_id(t.lun), tmf_tx.clone());
                        let function = t.function;
                        let name = remote.name.clone();
                        tokio::spawn(async move {
                            let resp = match remote.task_mgmt(code, lun, &nexus).await {
                                Some(crate::proxy::TMF_RESULT_COMPLETE) => {
                                    TmfResponse::FUNCTION_COMPLETE
                                }
                                Some(crate::proxy::TMF_RESULT_NO_SUCH_LUN) => {
                                    TmfResponse::LUN_DOES_NOT_EXIST
                                }
                                Some(crate::proxy::TMF_RESULT_NOT_SUPPORTED) => {
                                    TmfResponse::NOT_SUPPORTED
                                }
                                _ => TmfResponse::REJECTED,
                            };
                            tracing::info!(%peer, ?function, lun, response = resp.0, "task management (partner's target, run on the owner)");
                            if function == TmfFunction::TARGET_COLD_RESET
                                && resp == TmfResponse::FUNCTION_COMPLETE
                            {
                                // Every session of the target through this
                                // node ends too; ours closes itself.
                                close_target_sessions(&name, conn_id);
                            }
                            let _ = tx.send((itt, resp));
                        });
                        return false;
                    }
                    _ => TmfResponse::NOT_SUPPORTED,
                }
            }
        };
        tracing::info!(%peer, function = ?t.function, lun = lun_id(t.lun), response = resp.0, "task management (partner's target)");
        let _ = conn.complete_tmf(t.itt, resp);
        false
    });
}

fn task_mgmt(b: Option<&Bound>, t: &TaskMgmt, conn: &Connection) -> TmfResponse {
    let Some(b) = b.filter(|b| b.remote.is_none()) else {
        // Discovery sessions (sessions to the partner's targets are
        // handled by `answer_parked_tmfs`).
        return TmfResponse::NOT_SUPPORTED;
    };
    match t.function {
        TmfFunction::ABORT_TASK => match t.referenced {
            ReferencedTask::AbortedWhileGathering | ReferencedTask::AbortedBeforeExecution => {
                TmfResponse::FUNCTION_COMPLETE
            }
            // Commands run inline, so one handed out is normally answered by
            // now; if not, the SCSI layer has to abort it.
            ReferencedTask::Delivered if conn.is_outstanding(t.referenced_itt) => {
                match b.target.task_mgmt(
                    nvtarget_scsi::TmfFunction::AbortTask,
                    lun_id(t.lun),
                    &b.nexus,
                ) {
                    nvtarget_scsi::TmfResponse::Complete => TmfResponse::FUNCTION_COMPLETE,
                    _ => TmfResponse::TASK_DOES_NOT_EXIST,
                }
            }
            _ => TmfResponse::TASK_DOES_NOT_EXIST,
        },
        f => {
            let func = match f {
                TmfFunction::ABORT_TASK_SET => nvtarget_scsi::TmfFunction::AbortTaskSet,
                TmfFunction::CLEAR_ACA => nvtarget_scsi::TmfFunction::ClearAca,
                TmfFunction::CLEAR_TASK_SET => nvtarget_scsi::TmfFunction::ClearTaskSet,
                TmfFunction::LOGICAL_UNIT_RESET => nvtarget_scsi::TmfFunction::LogicalUnitReset,
                TmfFunction::TARGET_WARM_RESET => nvtarget_scsi::TmfFunction::TargetWarmReset,
                TmfFunction::TARGET_COLD_RESET => nvtarget_scsi::TmfFunction::TargetColdReset,
                _ => return TmfResponse::NOT_SUPPORTED,
            };
            match b.target.task_mgmt(func, lun_id(t.lun), &b.nexus) {
                nvtarget_scsi::TmfResponse::Complete => TmfResponse::FUNCTION_COMPLETE,
                nvtarget_scsi::TmfResponse::NoSuchLun => TmfResponse::LUN_DOES_NOT_EXIST,
                nvtarget_scsi::TmfResponse::NotSupported => TmfResponse::NOT_SUPPORTED,
                nvtarget_scsi::TmfResponse::Rejected => TmfResponse::REJECTED,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver over real TCP on loopback with the node's default
    //! configuration: what only sockets show (reinstatement, vectored writes).

    use super::*;
    use nvtarget_iscsi::msg::{
        DataIn, LoginReq, LoginResp, NopIn, NopOut, ScsiCommandReq, ScsiResponsePdu, RESERVED_TAG,
    };
    use nvtarget_iscsi::pdu::{decode, Digests, Opcode, Pdu};
    use nvtarget_iscsi::text::TextPairs;

    const TARGET: &str = "iqn.2026-11.io.nvtarget:default";

    async fn start(tag: &str) -> SocketAddr {
        let cfg = crate::config::Config::load(None).unwrap();
        let dir =
            std::env::temp_dir().join(format!("nvtarget-portal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = Arc::new(Node::build(cfg, &dir, crate::metrics::Metrics::new(), None).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_portal(l, node, 1));
        addr
    }

    struct Peer {
        sock: TcpStream,
        buf: BytesMut,
        cmdsn: u32,
    }

    impl Peer {
        async fn send(&mut self, p: Pdu) {
            self.sock
                .write_all(&p.encode(Digests::default()).to_vec())
                .await
                .unwrap();
        }
        /// The next PDU, or None on EOF / 3 s of silence.
        async fn recv(&mut self) -> Option<Pdu> {
            loop {
                if let Some(p) = decode(&mut self.buf, Digests::default(), 1 << 24).unwrap() {
                    return Some(p);
                }
                let r =
                    tokio::time::timeout(Duration::from_secs(3), self.sock.read_buf(&mut self.buf))
                        .await;
                match r {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
        }
    }

    async fn login(addr: SocketAddr, isid: [u8; 6]) -> Peer {
        let sock = TcpStream::connect(addr).await.unwrap();
        let mut p = Peer {
            sock,
            buf: BytesMut::new(),
            cmdsn: 10,
        };
        let keys = TextPairs(
            [
                ("InitiatorName", "iqn.2026-11.test:portal"),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
                ("MaxRecvDataSegmentLength", "4096"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "Yes"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let req = LoginReq {
            transit: true,
            csg: 0,
            nsg: 3,
            isid,
            itt: 1,
            cmdsn: p.cmdsn,
            data: keys.encode(),
            ..LoginReq::default()
        };
        p.send(req.to_pdu()).await;
        let r = LoginResp::parse(&p.recv().await.unwrap());
        assert_eq!((r.status_class, r.status_detail), (0, 0));
        assert!(r.transit && r.nsg == 3 && r.tsih != 0);
        p
    }

    fn scsi(p: &mut Peer, itt: u32, cdb: &[u8], read: bool, edtl: u32, data: Bytes) -> Pdu {
        let c = ScsiCommandReq {
            immediate: false,
            final_: true,
            read,
            write: !data.is_empty(),
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            edtl,
            cmdsn: p.cmdsn,
            exp_statsn: 0,
            cdb: Bytes::copy_from_slice(cdb),
            bidi_read_len: None,
            data,
        };
        p.cmdsn += 1;
        c.to_pdu()
    }

    #[tokio::test]
    async fn write_then_read_back() {
        let addr = start("rw").await;
        let mut p = login(addr, [0x80, 0, 0, 0, 0, 1]).await;
        // The first command after login reports the power-on unit attention.
        let tur = scsi(&mut p, 4, &[0; 6], false, 0, Bytes::new());
        p.send(tur).await;
        assert_eq!(ScsiResponsePdu::parse(&p.recv().await.unwrap()).itt, 4);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        // WRITE(10) LBA 8, 16 blocks: 4096 bytes immediate, the rest by R2T.
        let cmd = scsi(
            &mut p,
            5,
            &[0x2a, 0, 0, 0, 0, 8, 0, 0, 16, 0],
            false,
            8192,
            Bytes::copy_from_slice(&data[..4096]),
        );
        p.send(cmd).await;
        let r2t = p.recv().await.unwrap();
        assert_eq!(r2t.bhs.opcode(), Opcode::R2T);
        let ttt = r2t.bhs.u32(20);
        let d = nvtarget_iscsi::msg::DataOut {
            final_: true,
            itt: 5,
            ttt,
            datasn: 0,
            offset: 4096,
            data: Bytes::copy_from_slice(&data[4096..]),
            ..Default::default()
        };
        p.send(d.to_pdu()).await;
        let r = ScsiResponsePdu::parse(&p.recv().await.unwrap());
        assert_eq!(
            (r.itt, r.status, r.overflow, r.underflow),
            (5, 0, false, false)
        );
        // READ(10) it back: 4096-byte Data-In PDUs, status in the last one.
        let cmd = scsi(
            &mut p,
            6,
            &[0x28, 0, 0, 0, 0, 8, 0, 0, 16, 0],
            true,
            8192,
            Bytes::new(),
        );
        p.send(cmd).await;
        let mut got = Vec::new();
        loop {
            let d = DataIn::parse(&p.recv().await.unwrap());
            assert!(d.data.len() <= 4096);
            got.extend_from_slice(&d.data);
            if d.has_status {
                assert_eq!(d.status, 0);
                break;
            }
        }
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn session_reinstatement_closes_the_old_connection() {
        let addr = start("reinstate").await;
        let isid = [0x80, 0, 0, 0, 0, 2];
        let mut old = login(addr, isid).await;
        let mut new = login(addr, isid).await;
        // The old connection is closed by the target...
        assert!(old.recv().await.is_none());
        // ...and the new one works.
        let nop = NopOut {
            immediate: true,
            itt: 9,
            ttt: RESERVED_TAG,
            cmdsn: new.cmdsn,
            data: Bytes::from_static(b"hi"),
            ..NopOut::default()
        };
        new.send(nop.to_pdu()).await;
        let r = NopIn::parse(&new.recv().await.unwrap());
        assert_eq!((r.itt, &r.data[..]), (9, &b"hi"[..]));
        // A different ISID is a different session: both stay up.
        let mut other = login(addr, [0x80, 0, 0, 0, 0, 3]).await;
        other.send(nop.to_pdu()).await;
        assert!(other.recv().await.is_some());
        new.send(nop.to_pdu()).await;
        assert!(new.recv().await.is_some());
    }
}
