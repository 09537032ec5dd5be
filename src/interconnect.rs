#![allow(dead_code)] // parts of the handles' API (stats, set_state) are for status and metrics, not wired yet
//! The tokio driver of the HA interconnect: moves the bytes of the sans-IO
//! mirror protocol (`nvtarget_mirror::{Sender, Receiver}`) over TCP.
//!
//! Owner side, [`start_sender`]: dials the partner with `cfg.paths`
//! connections (one per `PathId`, TCP_NODELAY), redialing with backoff
//! (20 ms doubling to 500 ms) until shutdown. Write-path threads call
//! [`MirrorHandle::submit`] after the local append and block in
//! [`MirrorHandle::wait_acked`] until the partner stored and indexed the
//! record.
//!
//! Partner side, [`start_listener`]: one port serves two kinds of
//! connections, told apart by peeking (never consuming) the first 4 bytes:
//! the mirror frame magic `NVMI` (a path of the `Receiver`; the owner's HELLO
//! names the path, and a new connection for a path replaces the old one) or
//! `NVPX` (handed unread to the proxy channel). Anything else, or silence for
//! 5 s, is closed.
//!
//! Invariants:
//! * One *cycle* at a time per end (the cycle lock): feed one input to the
//!   state machine, drain its events and transmits, call `on_event` for every
//!   event, and only then write the transmits. So an `Event::Indexed` is in
//!   the node's index before the ACK covering it leaves (STYLE 8), and
//!   `on_event` sees events in the order the state machine made them.
//! * The state machine's own lock is not held while `on_event` runs, so
//!   `on_event` may call the handle (`submit`, `go_unmirrored`, `cp_done`,
//!   `set_state`, `shutdown`); it must not block: it runs with the cycle
//!   lock held.
//! * Cycles run inline in whatever thread has the input: a connection's
//!   reader after a read, the submitting write-path thread when no other
//!   cycle is running (else the driver task, woken), the driver task at the
//!   protocol's timer. So a record costs no extra thread hop on its way out
//!   or back, and `on_event` runs on any of these threads. Transmits go
//!   straight to the socket with a non-blocking vectored write; only what
//!   the socket does not take waits for the connection's task, and anything
//!   written later queues behind it, so each path's byte order is kept.
//! * Bytes of a connection that is no longer its path's current one are
//!   dropped: a replaced or closed connection never feeds the state machine.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, Bytes};
use nvtarget_mirror::frame::{self, Frame, GoodbyeReason, Hello, MsgType, Role};
use nvtarget_mirror::sender::SenderStats;
use nvtarget_mirror::{
    Config, Event, NodeState, PartnerStore, PathId, Receiver, RecordSource, Sender, Seq, Transmit,
};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

/// Receives every event of a mirror end, synchronously, from the driver
/// (whichever thread runs the cycle, see the module invariants). Must not
/// block.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// First bytes of a forwarded-SCSI (proxy) connection on the interconnect
/// port.
pub const PROXY_MAGIC: [u8; 4] = *b"NVPX";

/// A new connection must show what it is (and a mirror connection send its
/// HELLO) within this time.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most accepted connections still being identified at once.
const MAX_UNCLASSIFIED: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A closing connection gets this long to flush its GOODBYE.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
const READ_BUF: usize = 64 << 10;
/// Slices per vectored write (well below IOV_MAX).
const MAX_IOV: usize = 64;

/// Why [`MirrorHandle::wait_acked`] returned without the ack.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorWaitError {
    #[error("mirroring failed: {0}")]
    Failed(nvtarget_mirror::Error),
    #[error("the mirror was shut down")]
    Shutdown,
}

/// What async waiters watch (one receiver per iSCSI connection, not per
/// write): the highest acknowledged seq, and why waits beyond it fail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckView {
    pub acked: Seq,
    /// Set while `wait_acked` would return this error for a seq above
    /// `acked` (mirroring failed, or the mirror was shut down).
    pub error: Option<MirrorWaitError>,
}

// ---------------------------------------------------------------------------
// Owner side

/// The owner's end of the mirror: submit records, wait for their acks.
#[derive(Clone)]
pub struct MirrorHandle {
    core: Arc<dyn OwnerOps>,
}

/// Starts mirroring this node's log to `partner`. `pruned` and
/// `last_logged` are as for [`Sender::new`]: records in
/// `(pruned, last_logged]` are read from `src` once the partner connects,
/// and `submit` continues at `last_logged + 1`.
pub fn start_sender<S: RecordSource + Send + 'static>(
    rt: &tokio::runtime::Handle,
    cfg: Config,
    partner: SocketAddr,
    src: S,
    pruned: Seq,
    last_logged: Seq,
    on_event: EventSink,
) -> MirrorHandle {
    let paths = cfg.paths.max(1);
    let sender = Sender::new(cfg, src, pruned, last_logged, Instant::now());
    // Records logged before we started have no waiting initiator: the
    // sender counts them as released.
    let core = Arc::new(Core::new(
        sender,
        "owner",
        paths,
        on_event,
        pruned.max(last_logged),
    ));
    rt.spawn(drive(core.clone()));
    for p in 0..paths {
        rt.spawn(dial(core.clone(), PathId(p), partner));
    }
    MirrorHandle { core }
}

impl MirrorHandle {
    /// Mirrors record `seq` (the log's next seq) stored at `offset` of the
    /// LOCAL portion. Called from blocking (non-async) write-path threads,
    /// strictly in seq order, right after the local append. Sends from this
    /// thread if no other cycle is running, else wakes the driver.
    pub fn submit(
        &self,
        seq: Seq,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), nvtarget_mirror::Error> {
        self.core.submit(seq, offset, bytes)
    }

    /// Blocks the calling (non-async) thread until an `Event::Acked(upto)`
    /// with `upto >= seq` was seen; `Err` if the sender reported
    /// `Event::Failed` (until the node goes unmirrored or mirroring resumes)
    /// or the handle was shut down. No timeout: while the partner is silent,
    /// the node decides (`go_unmirrored` releases everything).
    pub fn wait_acked(&self, seq: Seq) -> Result<(), MirrorWaitError> {
        self.core.shared().acks.wait(seq)
    }

    /// Highest seq whose write may be answered.
    /// Paths with a live connection to the partner now.
    pub fn connected_paths(&self) -> usize {
        self.core
            .shared()
            .cycle
            .lock()
            .conns
            .iter()
            .filter(|c| c.is_some())
            .count()
    }

    pub fn acked(&self) -> Seq {
        self.core.shared().acks.acked()
    }

    /// The ack state, for waiting without a thread (see [`AckView`]).
    pub fn watch_acks(&self) -> watch::Receiver<AckView> {
        self.core.shared().acks.view.subscribe()
    }

    /// A CP covering every seq <= `seq` is durable: prune the partner.
    pub fn cp_done(&self, seq: Seq) {
        self.core.cp_done(seq);
    }

    /// The partner's mailbox shows no takeover: answer writes on local
    /// durability until the partner catches up again.
    pub fn go_unmirrored(&self) {
        self.core.go_unmirrored();
    }

    /// The state our heartbeats announce.
    pub fn set_state(&self, s: NodeState) {
        self.core.set_state(s);
    }

    pub fn stats(&self) -> SenderStats {
        self.core.stats()
    }

    /// GOODBYE on every path, then the connections close and the tasks stop;
    /// every `wait_acked` still waiting returns `Err(Shutdown)`.
    pub fn shutdown(&self) {
        self.core.shared().shutdown();
    }

    /// Test hook: cut every connection at once (bytes in flight are lost).
    #[cfg(test)]
    pub fn kill_connections(&self) {
        self.core.shared().kill_connections();
    }
}

/// What the (type-erased) owner core offers the handle.
trait OwnerOps: Send + Sync {
    fn shared(&self) -> &Shared;
    fn submit(&self, seq: Seq, offset: u64, bytes: Bytes) -> Result<(), nvtarget_mirror::Error>;
    fn cp_done(&self, seq: Seq);
    fn go_unmirrored(&self);
    fn set_state(&self, s: NodeState);
    fn stats(&self) -> SenderStats;
}

impl<S: RecordSource + Send + 'static> OwnerOps for Core<Sender<S>> {
    fn shared(&self) -> &Shared {
        &self.shared
    }
    fn submit(&self, seq: Seq, offset: u64, bytes: Bytes) -> Result<(), nvtarget_mirror::Error> {
        self.machine.lock().submit(seq, offset, bytes)?;
        // Send from this thread when no cycle is running: saves waking the
        // driver (a thread hop) on every write. A running cycle may already
        // be past its transmits, so then the driver takes over.
        if !self.try_run(Input::Kick) {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
    fn cp_done(&self, seq: Seq) {
        self.machine.lock().cp_done(seq);
        self.shared.wake.notify_one();
    }
    fn go_unmirrored(&self) {
        self.machine.lock().go_unmirrored();
        self.shared.wake.notify_one();
    }
    fn set_state(&self, s: NodeState) {
        self.machine.lock().set_state(s);
    }
    fn stats(&self) -> SenderStats {
        self.machine.lock().stats()
    }
}

// ---------------------------------------------------------------------------
// Partner side

/// The partner's end of the mirror.
#[derive(Clone)]
pub struct ReceiverHandle {
    core: Arc<dyn PartnerOps>,
    local: SocketAddr,
}

/// Binds `listen` and serves the interconnect port: mirror paths go to a
/// `Receiver` over `store`; `NVPX` connections are handed unread to `proxy`
/// (closed when there is none).
pub async fn start_listener<P: PartnerStore + Send + 'static>(
    listen: SocketAddr,
    cfg: Config,
    store: P,
    stored_upto: Seq,
    pruned: Seq,
    on_event: EventSink,
    proxy: Option<mpsc::UnboundedSender<TcpStream>>,
) -> anyhow::Result<ReceiverHandle> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("interconnect: cannot listen on {listen}"))?;
    let local = listener
        .local_addr()
        .context("interconnect: listener address")?;
    let admit = Admit {
        paths: cfg.paths.max(1),
        peer_id: cfg.peer_id,
        max_body: cfg.max_body,
    };
    let receiver = Receiver::new(cfg, store, stored_upto, pruned, Instant::now());
    let core = Arc::new(Core::new(receiver, "partner", admit.paths, on_event, 0));
    tokio::spawn(drive(core.clone()));
    tokio::spawn(accept_loop(core.clone(), listener, admit, proxy));
    tracing::info!(%local, "interconnect listening");
    Ok(ReceiverHandle { core, local })
}

impl ReceiverHandle {
    /// Highest contiguous seq durably stored.
    pub fn stored_upto(&self) -> Seq {
        self.core.stored_upto()
    }
    pub fn pruned(&self) -> Seq {
        self.core.pruned()
    }
    /// Refuse owners below this epoch (after fencing the owner).
    pub fn set_min_peer_epoch(&self, e: u64) {
        self.core.set_min_peer_epoch(e);
    }
    /// The state our heartbeats announce.
    pub fn set_state(&self, s: NodeState) {
        self.core.set_state(s);
    }
    /// GOODBYE on every path, stop listening, close the connections.
    pub fn shutdown(&self) {
        self.core.shared().shutdown();
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
    /// Test hook: cut every mirror connection at once.
    #[cfg(test)]
    pub fn kill_connections(&self) {
        self.core.shared().kill_connections();
    }
}

trait PartnerOps: Send + Sync {
    fn shared(&self) -> &Shared;
    fn stored_upto(&self) -> Seq;
    fn pruned(&self) -> Seq;
    fn set_min_peer_epoch(&self, e: u64);
    fn set_state(&self, s: NodeState);
}

impl<P: PartnerStore + Send + 'static> PartnerOps for Core<Receiver<P>> {
    fn shared(&self) -> &Shared {
        &self.shared
    }
    fn stored_upto(&self) -> Seq {
        self.machine.lock().stored_upto()
    }
    fn pruned(&self) -> Seq {
        self.machine.lock().pruned()
    }
    fn set_min_peer_epoch(&self, e: u64) {
        self.machine.lock().set_min_peer_epoch(e);
        // The receiver may have failed paths of a now-fenced owner.
        self.shared.wake.notify_one();
    }
    fn set_state(&self, s: NodeState) {
        self.machine.lock().set_state(s);
    }
}

/// What the accept loop needs to know to route a new connection.
#[derive(Clone, Copy)]
struct Admit {
    paths: u8,
    peer_id: u64,
    max_body: u32,
}

async fn accept_loop<P: PartnerStore + Send + 'static>(
    core: Arc<Core<Receiver<P>>>,
    listener: TcpListener,
    admit: Admit,
    proxy: Option<mpsc::UnboundedSender<TcpStream>>,
) {
    let mut stop = core.shared.stop.subscribe();
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_UNCLASSIFIED));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Connections that have not said what they are yet hold a
                // task and a descriptor for up to 5 s: bound them.
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, limit = MAX_UNCLASSIFIED,
                        "interconnect: too many connections still to identify; closing");
                    continue;
                };
                let (core, proxy) = (core.clone(), proxy.clone());
                tokio::spawn(async move {
                    admit_conn(core, stream, peer, admit, proxy, permit).await;
                });
            }
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "interconnect: accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// What the first bytes of a connection say it is.
enum Kind {
    Mirror,
    Proxy,
    Unknown([u8; 4]),
    Closed,
}

/// Waits for the first 4 bytes without consuming them.
async fn peek_kind(stream: &TcpStream) -> io::Result<Kind> {
    let mut b = [0u8; 4];
    loop {
        let n = stream.peek(&mut b).await?;
        if n == 0 {
            return Ok(Kind::Closed);
        }
        let head = &b[..n];
        if n == 4 || (head != &frame::MAGIC[..n] && head != &PROXY_MAGIC[..n]) {
            return Ok(match b {
                frame::MAGIC => Kind::Mirror,
                PROXY_MAGIC => Kind::Proxy,
                other => Kind::Unknown(other),
            });
        }
        // A prefix of a magic: peek returns at once while the bytes sit
        // unread, so give the rest a moment to arrive.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Reads the owner's HELLO (the first frame of a mirror path); returns it
/// and every byte read so far, HELLO included, for the state machine.
async fn read_hello(stream: &mut TcpStream, max_body: u32) -> Result<(Hello, Vec<u8>), String> {
    const HELLO_FRAME: usize = frame::HEADER_LEN + frame::HELLO_LEN;
    let mut buf = Vec::with_capacity(READ_BUF);
    while buf.len() < HELLO_FRAME {
        let n = stream.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its HELLO".into());
        }
        frame::frame_len(&buf, max_body).map_err(|e| e.to_string())?;
        if buf.len() >= frame::HEADER_LEN && buf[5] != MsgType::HELLO.0 {
            return Err(format!("first frame is {:?}, not HELLO", MsgType(buf[5])));
        }
    }
    let first = Bytes::copy_from_slice(&buf[..HELLO_FRAME]);
    match frame::decode(&first, max_body) {
        Ok(Some((Frame::Hello(h), _))) => Ok((h, buf)),
        Ok(_) => Err("malformed HELLO".into()),
        Err(e) => Err(e.to_string()),
    }
}

async fn admit_conn<P: PartnerStore + Send + 'static>(
    core: Arc<Core<Receiver<P>>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    admit: Admit,
    proxy: Option<mpsc::UnboundedSender<TcpStream>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let deadline = tokio::time::Instant::now() + CLASSIFY_TIMEOUT;
    let kind = match tokio::time::timeout_at(deadline, peek_kind(&stream)).await {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "interconnect: connection lost before its first bytes");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "interconnect: nothing received within 5 s; closing");
            return;
        }
    };
    match kind {
        Kind::Closed => {}
        Kind::Unknown(magic) => {
            tracing::warn!(%peer, ?magic, "interconnect: unknown protocol; closing");
        }
        Kind::Proxy => match proxy {
            Some(tx) => {
                if tx.send(stream).is_err() {
                    tracing::warn!(%peer, "interconnect: proxy server is gone; closing");
                }
            }
            None => {
                tracing::warn!(%peer, "interconnect: proxy connection, but none is served here; closing")
            }
        },
        Kind::Mirror => {
            let (hello, first) = match tokio::time::timeout_at(
                deadline,
                read_hello(&mut stream, admit.max_body),
            )
            .await
            {
                Ok(Ok(x)) => x,
                Ok(Err(what)) => {
                    tracing::warn!(%peer, %what, "interconnect: bad mirror connection; closing");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "interconnect: no HELLO within 5 s; closing");
                    return;
                }
            };
            // A stranger must not displace the live connection of a path:
            // check who it is before handing it the path (the receiver
            // checks the rest).
            if hello.role != Role::Owner || hello.node_id != admit.peer_id {
                tracing::warn!(%peer, node = hello.node_id, role = ?hello.role, expected = admit.peer_id,
                    "interconnect: HELLO from a node that is not our partner's owner side; closing");
                return;
            }
            if hello.path >= admit.paths {
                tracing::warn!(%peer, path = hello.path, paths = admit.paths,
                    "interconnect: HELLO for a path we do not have (interconnect.paths differs?); closing");
                return;
            }
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "interconnect: TCP_NODELAY");
            }
            drop(permit);
            let conn = Conn::new(PathId(hello.path), peer, stream);
            core.run(Input::Up(&conn, &first));
            serve_conn(&core, &conn).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The shared driver

/// The operations of `Sender` and `Receiver` the driver needs.
trait Machine: Send + 'static {
    fn path_up(&mut self, p: PathId) -> nvtarget_mirror::Result<()>;
    fn path_down(&mut self, p: PathId) -> nvtarget_mirror::Result<()>;
    fn handle_input(&mut self, p: PathId, data: &[u8], now: Instant);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self) -> Option<Instant>;
    fn poll_event(&mut self) -> Option<Event>;
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn close(&mut self);
}

macro_rules! impl_machine {
    ($ty:ident, $bound:path) => {
        impl<X: $bound + Send + 'static> Machine for $ty<X> {
            fn path_up(&mut self, p: PathId) -> nvtarget_mirror::Result<()> {
                $ty::path_up(self, p)
            }
            fn path_down(&mut self, p: PathId) -> nvtarget_mirror::Result<()> {
                $ty::path_down(self, p)
            }
            fn handle_input(&mut self, p: PathId, data: &[u8], now: Instant) {
                $ty::handle_input(self, p, data, now)
            }
            fn handle_timeout(&mut self, now: Instant) {
                $ty::handle_timeout(self, now)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                $ty::poll_timeout(self)
            }
            fn poll_event(&mut self) -> Option<Event> {
                $ty::poll_event(self)
            }
            fn poll_transmit(&mut self) -> Option<Transmit> {
                $ty::poll_transmit(self)
            }
            fn close(&mut self) {
                $ty::close(self)
            }
        }
    };
}
impl_machine!(Sender, RecordSource);
impl_machine!(Receiver, PartnerStore);

/// One end of the mirror: the state machine and what drives it.
struct Core<M> {
    shared: Shared,
    machine: Mutex<M>,
}

/// The parts of a core that do not depend on the state machine's type.
struct Shared {
    side: &'static str,
    cycle: Mutex<Cycle>,
    /// Wakes the driver task: a submit, a handle call, an earlier timer.
    wake: Notify,
    on_event: EventSink,
    acks: AckState,
    /// `true` once shut down: stops the driver, dialers and accept loop.
    stop: watch::Sender<bool>,
}

/// What the cycle lock guards.
struct Cycle {
    /// The current connection of each path.
    conns: Vec<Option<Arc<Conn>>>,
    /// The state machine's next timer, as of the last cycle.
    deadline: Option<Instant>,
    stopped: bool,
    /// Per path, the transmits of the cycle in progress (kept for reuse).
    out: Vec<Vec<Bytes>>,
}

#[derive(Clone, Copy)]
enum Input<'a> {
    /// The driver task: a wake-up or the timer.
    Tick,
    /// A handle call on a write-path thread (a submit).
    Kick,
    /// A connection for its path, and the bytes already read from it.
    Up(&'a Arc<Conn>, &'a [u8]),
    Data(&'a Conn, &'a [u8]),
    Down(&'a Conn),
    Stop,
}

impl Shared {
    fn shutdown(&self) {
        self.acks.shut();
        self.stop.send_replace(true);
        self.wake.notify_one();
    }

    fn kill_connections(&self) {
        for c in self.cycle.lock().conns.iter().flatten() {
            c.kill();
        }
    }
}

impl<M: Machine> Core<M> {
    fn new(m: M, side: &'static str, paths: u8, on_event: EventSink, acked: Seq) -> Self {
        let n = usize::from(paths.max(1));
        Core {
            shared: Shared {
                side,
                cycle: Mutex::new(Cycle {
                    conns: vec![None; n],
                    deadline: None,
                    stopped: false,
                    out: vec![Vec::new(); n],
                }),
                wake: Notify::new(),
                on_event,
                acks: AckState::new(acked),
                stop: watch::channel(false).0,
            },
            machine: Mutex::new(m),
        }
    }

    /// One cycle: input, then events (to `on_event`), then writes.
    fn run(&self, input: Input<'_>) {
        let cyc = self.shared.cycle.lock();
        self.run_locked(cyc, input);
    }

    /// A cycle on the calling thread if no other is running; false if one
    /// is (the caller then wakes the driver, so nothing waits for the timer).
    fn try_run(&self, input: Input<'_>) -> bool {
        match self.shared.cycle.try_lock() {
            Some(cyc) => {
                self.run_locked(cyc, input);
                true
            }
            None => false,
        }
    }

    fn run_locked(&self, mut cyc: parking_lot::MutexGuard<'_, Cycle>, input: Input<'_>) {
        let sh = &self.shared;
        let now = Instant::now();
        let mut out = std::mem::take(&mut cyc.out);
        let mut events = Vec::new();
        let deadline = {
            let mut m = self.machine.lock();
            match input {
                Input::Tick | Input::Kick => {}
                Input::Up(conn, first) => self.attach(&mut cyc, &mut *m, conn, first, now),
                Input::Data(conn, data) => {
                    if !cyc.stopped && cyc.is_current(conn) {
                        m.handle_input(conn.path, data, now);
                    }
                }
                Input::Down(conn) => {
                    if cyc.is_current(conn) {
                        cyc.conns[usize::from(conn.path.0)] = None;
                        // Only fails for a path index we never use.
                        let _ = m.path_down(conn.path);
                    }
                }
                Input::Stop => {
                    if !cyc.stopped {
                        cyc.stopped = true;
                        m.close();
                    }
                }
            }
            if !cyc.stopped && m.poll_timeout().is_some_and(|t| t <= now) {
                m.handle_timeout(now);
            }
            while let Some(e) = m.poll_event() {
                events.push(e);
            }
            while let Some(t) = m.poll_transmit() {
                if let Some(v) = out.get_mut(usize::from(t.path.0)) {
                    if !t.data.is_empty() {
                        v.push(t.data);
                    }
                }
            }
            m.poll_timeout()
        };
        // STYLE 8: the node sees every event before any byte of this cycle
        // leaves (an ACK must not overtake the Indexed it covers).
        let mut closing = Vec::new();
        for e in events {
            self.event(&cyc, e, &mut closing);
        }
        for (i, bufs) in out.iter_mut().enumerate() {
            match cyc.conns.get(i).and_then(Option::as_ref) {
                Some(c) if !bufs.is_empty() => c.send(bufs),
                _ => bufs.clear(),
            }
        }
        cyc.out = out;
        if cyc.stopped {
            closing.extend(cyc.conns.iter().flatten().cloned());
        }
        for c in closing {
            c.close_after_flush();
        }
        let earlier = match (deadline, cyc.deadline) {
            (Some(new), Some(old)) => new < old,
            (Some(_), None) => true,
            _ => false,
        };
        cyc.deadline = deadline;
        drop(cyc);
        if earlier && !matches!(input, Input::Tick) {
            sh.wake.notify_one();
        }
    }

    fn attach(&self, cyc: &mut Cycle, m: &mut M, conn: &Arc<Conn>, first: &[u8], now: Instant) {
        let side = self.shared.side;
        let i = usize::from(conn.path.0);
        if cyc.stopped || i >= cyc.conns.len() {
            conn.kill();
            return;
        }
        if let Some(old) = cyc.conns[i].take() {
            tracing::info!(side, path = i, old = %old.peer, new = %conn.peer,
                "mirror path taken over by a new connection");
            old.kill();
            let _ = m.path_down(conn.path);
        }
        match m.path_up(conn.path) {
            Ok(()) => {
                cyc.conns[i] = Some(conn.clone());
                if !first.is_empty() {
                    m.handle_input(conn.path, first, now);
                }
            }
            Err(e) => {
                tracing::warn!(side, path = i, peer = %conn.peer, error = %e, "mirror path refused");
                conn.kill();
            }
        }
    }

    /// Logs, closes failed paths, updates what `wait_acked` waits on, and
    /// hands the event to the node.
    fn event(&self, cyc: &Cycle, e: Event, closing: &mut Vec<Arc<Conn>>) {
        let side = self.shared.side;
        let conn = |p: PathId| cyc.conns.get(usize::from(p.0)).and_then(Option::as_ref);
        let mut ack = None;
        match &e {
            Event::Acked(upto) => ack = Some(AckUpdate::Acked(*upto)),
            Event::Failed(error) => {
                tracing::error!(side, %error, "mirroring failed");
                ack = Some(AckUpdate::Failed(error.clone()));
            }
            Event::Mirrored | Event::Unmirrored => {
                tracing::info!(
                    side,
                    mirrored = matches!(e, Event::Mirrored),
                    "mirror mode changed"
                );
                ack = Some(AckUpdate::Resumed);
            }
            Event::PathReady { path, peer } => {
                if let Some(c) = conn(*path) {
                    c.ready.store(true, Ordering::Relaxed);
                    tracing::info!(side, path = path.0, peer = %c.peer, peer_node = peer.node_id,
                        epoch = peer.epoch, stored_seq = peer.stored_seq, "mirror path ready");
                }
            }
            Event::PathFailed { path, error } => {
                let peer = conn(*path).map(|c| {
                    c.failed.store(true, Ordering::Relaxed);
                    closing.push(c.clone());
                    c.peer
                });
                // The peer shutting down in order is news, not trouble.
                if *error == nvtarget_mirror::Error::Goodbye(GoodbyeReason::SHUTDOWN) {
                    tracing::info!(
                        side,
                        path = path.0,
                        ?peer,
                        "mirror peer closed the path (shutdown)"
                    );
                } else {
                    tracing::warn!(side, path = path.0, ?peer, %error, "mirror path failed; closing it");
                }
            }
            Event::PeerSilent { since } => {
                tracing::warn!(
                    side,
                    silent_ms = since.elapsed().as_millis() as u64,
                    "mirror peer silent"
                )
            }
            Event::PeerAlive => tracing::info!(side, "mirror peer heard again"),
            Event::PeerState(s) => tracing::info!(side, state = ?s, "mirror peer state"),
            Event::Indexed { .. } | Event::Pruned(_) => {}
        }
        (self.shared.on_event)(e);
        if let Some(a) = ack {
            self.shared.acks.update(a);
        }
    }
}

impl Cycle {
    fn is_current(&self, conn: &Conn) -> bool {
        self.conns
            .get(usize::from(conn.path.0))
            .and_then(Option::as_ref)
            .is_some_and(|c| c.id == conn.id)
    }
}

/// Runs cycles on wake-ups and at the state machine's timer, until stopped.
async fn drive<M: Machine>(core: Arc<Core<M>>) {
    let mut stop = core.shared.stop.subscribe();
    loop {
        let deadline = core.shared.cycle.lock().deadline;
        tokio::select! {
            _ = core.shared.wake.notified() => {}
            _ = sleep_until(deadline) => {}
            _ = stop.wait_for(|s| *s) => {
                core.run(Input::Stop);
                return;
            }
        }
        core.run(Input::Tick);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// The owner's side of one path: connect, serve, redial with backoff.
async fn dial<M: Machine>(core: Arc<Core<M>>, path: PathId, partner: SocketAddr) {
    let side = core.shared.side;
    let mut stop = core.shared.stop.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(partner)) => {
                r.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        match attempt {
            Ok(stream) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(side, path = path.0, error = %e, "TCP_NODELAY");
                }
                let conn = Conn::new(path, partner, stream);
                core.run(Input::Up(&conn, &[]));
                serve_conn(&core, &conn).await;
                // Only a connection that got as far as the HELLO exchange
                // and then was cut (not refused, not failed by the protocol)
                // resets the backoff: a peer that keeps refusing us must not
                // be redialed 50 times a second.
                if conn.ready.load(Ordering::Relaxed) && !conn.failed.load(Ordering::Relaxed) {
                    backoff = BACKOFF_MIN;
                    failing = false;
                }
            }
            Err(e) => {
                if failing {
                    tracing::debug!(side, path = path.0, %partner, error = %e, "mirror: partner still unreachable");
                } else {
                    tracing::warn!(side, path = path.0, %partner, error = %e, "mirror: cannot reach the partner; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

// ---------------------------------------------------------------------------
// Connections

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// One TCP connection of a path, shared by its task (reader and writer) and
/// by the cycles that write to it.
struct Conn {
    id: u64,
    path: PathId,
    peer: SocketAddr,
    stream: TcpStream,
    out: Mutex<Outbox>,
    writer_wake: Notify,
    /// Ends the connection now (no flush).
    stop: Notify,
    /// Starts the flush deadline of a closing connection.
    closing_started: Notify,
    /// The path completed its HELLO exchange on this connection.
    ready: AtomicBool,
    /// The state machine failed the path on this connection.
    failed: AtomicBool,
}

#[derive(Default)]
struct Outbox {
    /// Bytes the socket did not take yet, in order.
    queue: VecDeque<Bytes>,
    /// The connection's task owns the head of the stream: cycles append.
    busy: bool,
    /// Flush what is queued, then close; later sends are dropped.
    closing: bool,
}

impl Conn {
    fn new(path: PathId, peer: SocketAddr, stream: TcpStream) -> Arc<Conn> {
        Arc::new(Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            path,
            peer,
            stream,
            out: Mutex::new(Outbox::default()),
            writer_wake: Notify::new(),
            stop: Notify::new(),
            closing_started: Notify::new(),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }

    /// Writes `bufs` (drained) after everything sent before, without
    /// blocking: straight to the socket unless earlier bytes still wait.
    fn send(&self, bufs: &mut Vec<Bytes>) {
        let mut o = self.out.lock();
        if o.closing {
            bufs.clear();
            return;
        }
        o.queue.extend(bufs.drain(..));
        if o.busy {
            return;
        }
        match write_some(&self.stream, &mut o.queue) {
            Ok(()) if o.queue.is_empty() => {}
            Ok(()) => {
                o.busy = true;
                drop(o);
                self.writer_wake.notify_one();
            }
            Err(e) => {
                o.queue.clear();
                drop(o);
                tracing::debug!(path = self.path.0, peer = %self.peer, error = %e, "mirror write failed");
                self.kill();
            }
        }
    }

    fn close_after_flush(&self) {
        self.out.lock().closing = true;
        self.writer_wake.notify_one();
        self.closing_started.notify_one();
    }

    fn kill(&self) {
        self.stop.notify_one();
    }
}

/// Writes from the front of `q` until it is empty or the socket would block.
fn write_some(s: &TcpStream, q: &mut VecDeque<Bytes>) -> io::Result<()> {
    loop {
        while q.front().is_some_and(Bytes::is_empty) {
            q.pop_front();
        }
        if q.is_empty() {
            return Ok(());
        }
        let written = {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (slot, b) in iov.iter_mut().zip(q.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            match s.try_write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        };
        let mut left = written;
        while left > 0 {
            let Some(front) = q.front_mut() else { break };
            if front.len() <= left {
                left -= front.len();
                q.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
}

/// A connection's life after it got its path: read (running cycles inline)
/// and write what the cycles could not, until either side ends it.
async fn serve_conn<M: Machine>(core: &Core<M>, conn: &Arc<Conn>) {
    let res = tokio::select! {
        r = read_loop(core, conn) => r,
        r = write_queued(conn) => r,
        _ = close_deadline(conn) => Ok(()),
    };
    match res {
        Ok(()) => {
            tracing::debug!(side = core.shared.side, path = conn.path.0, peer = %conn.peer, "mirror connection closed")
        }
        Err(e) => {
            tracing::info!(side = core.shared.side, path = conn.path.0, peer = %conn.peer, error = %e, "mirror connection lost")
        }
    }
    core.run(Input::Down(conn));
}

async fn read_loop<M: Machine>(core: &Core<M>, conn: &Conn) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        tokio::select! {
            biased;
            _ = conn.stop.notified() => return Ok(()),
            r = conn.stream.readable() => r?,
        }
        match conn.stream.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => core.run(Input::Data(conn, &buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what `Conn::send` queued; returns once a closing connection has
/// flushed everything.
async fn write_queued(conn: &Conn) -> io::Result<()> {
    loop {
        conn.writer_wake.notified().await;
        loop {
            let mut q = {
                let mut o = conn.out.lock();
                if o.queue.is_empty() {
                    o.busy = false;
                    if o.closing {
                        return Ok(());
                    }
                    break;
                }
                std::mem::take(&mut o.queue)
            };
            while !q.is_empty() {
                conn.stream.writable().await?;
                write_some(&conn.stream, &mut q)?;
            }
        }
    }
}

/// A peer that stopped reading must not keep a closing connection open.
async fn close_deadline(conn: &Conn) {
    conn.closing_started.notified().await;
    tokio::time::sleep(CLOSE_FLUSH).await;
}

// ---------------------------------------------------------------------------
// What wait_acked waits on

struct AckState {
    /// Fast path for `acked()` and already-acked waits.
    acked: AtomicU64,
    inner: Mutex<AckInner>,
    /// The same state for async waiters; sent under `inner`'s lock.
    view: watch::Sender<AckView>,
}

struct AckInner {
    acked: Seq,
    failed: Option<nvtarget_mirror::Error>,
    shut: bool,
    /// Blocked waiters by the seq they wait for. An ACK wakes only the
    /// threads it releases: at QD32 a condvar broadcast woke every writer
    /// for each ACK, and most went straight back to sleep.
    waiters: BTreeMap<Seq, Vec<Arc<Waiter>>>,
}

/// One blocked `wait`: its thread, unparked once `woken` is set.
struct Waiter {
    thread: std::thread::Thread,
    woken: AtomicBool,
}

impl Waiter {
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

enum AckUpdate {
    Acked(Seq),
    Failed(nvtarget_mirror::Error),
    /// The node chose a mode again (unmirrored, or mirrored after catching
    /// up): an earlier failure no longer decides new waits.
    Resumed,
}

impl AckState {
    fn new(acked: Seq) -> Self {
        AckState {
            acked: AtomicU64::new(acked),
            inner: Mutex::new(AckInner {
                acked,
                failed: None,
                shut: false,
                waiters: BTreeMap::new(),
            }),
            view: watch::channel(AckView { acked, error: None }).0,
        }
    }

    /// Publishes the state under `g` to the async waiters.
    fn publish(&self, g: &AckInner) {
        let error = match (&g.failed, g.shut) {
            (Some(e), _) => Some(MirrorWaitError::Failed(e.clone())),
            (None, true) => Some(MirrorWaitError::Shutdown),
            (None, false) => None,
        };
        self.view.send_if_modified(|v| {
            let new = AckView {
                acked: g.acked,
                error,
            };
            let changed = *v != new;
            *v = new;
            changed
        });
    }

    fn acked(&self) -> Seq {
        self.acked.load(Ordering::Acquire)
    }

    fn update(&self, u: AckUpdate) {
        let mut g = self.inner.lock();
        let woken: Vec<Arc<Waiter>> = match u {
            AckUpdate::Acked(s) => {
                g.acked = g.acked.max(s);
                self.acked.store(g.acked, Ordering::Release);
                let first_later = g.acked.saturating_add(1);
                let later = g.waiters.split_off(&first_later);
                std::mem::replace(&mut g.waiters, later)
                    .into_values()
                    .flatten()
                    .collect()
            }
            // Every waiter decides again (an error for all of them).
            AckUpdate::Failed(e) => {
                g.failed = Some(e);
                std::mem::take(&mut g.waiters)
                    .into_values()
                    .flatten()
                    .collect()
            }
            AckUpdate::Resumed => {
                g.failed = None;
                Vec::new()
            }
        };
        self.publish(&g);
        drop(g);
        for w in woken {
            w.wake();
        }
    }

    fn shut(&self) {
        let mut g = self.inner.lock();
        g.shut = true;
        let all = std::mem::take(&mut g.waiters);
        self.publish(&g);
        drop(g);
        for w in all.into_values().flatten() {
            w.wake();
        }
    }

    fn wait(&self, seq: Seq) -> Result<(), MirrorWaitError> {
        if self.acked() >= seq {
            return Ok(());
        }
        loop {
            let me = {
                let mut g = self.inner.lock();
                if g.acked >= seq {
                    return Ok(());
                }
                if let Some(e) = &g.failed {
                    return Err(MirrorWaitError::Failed(e.clone()));
                }
                if g.shut {
                    return Err(MirrorWaitError::Shutdown);
                }
                let me = Arc::new(Waiter {
                    thread: std::thread::current(),
                    woken: AtomicBool::new(false),
                });
                g.waiters.entry(seq).or_default().push(me.clone());
                me
            };
            // Spurious unparks (and stale tokens) only cost a recheck.
            while !me.woken.load(Ordering::Acquire) {
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // Test harness: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use nvtarget_nvram::record::{self, RECORD_HEADER_LEN};
    use nvtarget_nvram::{Op, Record, RecordMeta};
    use std::collections::HashMap;
    use tokio::io::AsyncWriteExt;

    const REGION: u64 = 64 << 20;
    const DATA: usize = 4096;
    /// Records sit in 512-byte aligned slots, as in the log; no test writes
    /// enough to wrap the region, so the partner's copy can be compared
    /// record by record.
    const SLOT: u64 = 4608;
    /// No test may wait longer than this for anything.
    const LIMIT: Duration = Duration::from_secs(60);

    /// An ACK releases exactly the waiters it covers; the others stay
    /// blocked until theirs comes, a failure or a shutdown.
    #[test]
    fn ack_wakes_only_the_waiters_it_covers() {
        let acks = Arc::new(AckState::new(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let spawn = |seq: Seq| {
            let (acks, done) = (acks.clone(), done.clone());
            std::thread::spawn(move || {
                let r = acks.wait(seq);
                done.lock().push((seq, r.is_ok()));
            })
        };
        let threads: Vec<_> = [3, 5, 8, 8, 12].into_iter().map(spawn).collect();
        let until = |n: usize| {
            let end = Instant::now() + LIMIT;
            while done.lock().len() < n {
                assert!(
                    Instant::now() < end,
                    "waiters never woke: {:?}",
                    done.lock()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let registered = || {
            acks.inner
                .lock()
                .waiters
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        let end = Instant::now() + LIMIT;
        while registered() < 5 {
            assert!(Instant::now() < end, "waiters never blocked");
            std::thread::sleep(Duration::from_millis(1));
        }
        acks.update(AckUpdate::Acked(5));
        until(2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(registered(), 3, "an ACK of 5 released a later waiter");
        let mut got = done.lock().clone();
        got.sort();
        assert_eq!(got, vec![(3, true), (5, true)]);
        acks.update(AckUpdate::Acked(8));
        until(4);
        acks.update(AckUpdate::Failed(nvtarget_mirror::Error::Goodbye(
            GoodbyeReason::SHUTDOWN,
        )));
        until(5);
        for t in threads {
            t.join().unwrap();
        }
        let mut got = done.lock().clone();
        got.sort();
        assert_eq!(
            got,
            vec![(3, true), (5, true), (8, true), (8, true), (12, false)]
        );
        // Already acknowledged: no wait at all, whatever else holds.
        assert!(acks.wait(8).is_ok());
        acks.shut();
        assert!(matches!(acks.wait(13), Err(MirrorWaitError::Failed(_))));
    }

    /// The owner's log as the sender reads it back.
    #[derive(Clone, Default)]
    struct MemLog(Arc<Mutex<HashMap<Seq, (u64, Bytes)>>>);

    impl RecordSource for MemLog {
        fn read(&self, seq: Seq) -> Option<(u64, Bytes)> {
            self.0.lock().get(&seq).cloned()
        }
    }

    #[derive(Default)]
    struct Region {
        bytes: Vec<u8>,
        syncs: u64,
    }

    /// The partner's PARTNER portion.
    #[derive(Clone, Default)]
    struct MemRegion(Arc<Mutex<Region>>);

    impl PartnerStore for MemRegion {
        fn store(&mut self, offset: u64, bytes: &[u8]) -> nvtarget_nvram::Result<()> {
            let mut r = self.0.lock();
            let end = offset as usize + bytes.len();
            if r.bytes.len() < end {
                r.bytes.resize(end, 0);
            }
            r.bytes[offset as usize..end].copy_from_slice(bytes);
            Ok(())
        }
        fn sync(&mut self) -> nvtarget_nvram::Result<()> {
            self.0.lock().syncs += 1;
            Ok(())
        }
    }

    fn record_bytes(seq: Seq) -> Bytes {
        let r = Record {
            seq,
            meta: RecordMeta::data(Op::WRITE, 0, seq * 8, 8, 0),
            data: (0..DATA).map(|i| (i as u64 ^ seq) as u8).collect(),
        };
        let mut b = record::encode(&r);
        b.truncate(RECORD_HEADER_LEN + DATA);
        Bytes::from(b)
    }

    /// What one end's `on_event` saw.
    #[derive(Default)]
    struct Seen {
        indexed: Vec<Seq>,
        events: Vec<Event>,
        acked: Seq,
        acked_backwards: bool,
    }

    impl Seen {
        fn ready_paths(&self) -> Vec<u8> {
            let mut v: Vec<u8> = self
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::PathReady { path, .. } => Some(path.0),
                    _ => None,
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    }

    fn sink(seen: &Arc<Mutex<Seen>>) -> EventSink {
        let seen = seen.clone();
        Arc::new(move |e| {
            let mut s = seen.lock();
            match e {
                Event::Indexed { seq, .. } => s.indexed.push(seq),
                Event::Acked(u) => {
                    s.acked_backwards |= u <= s.acked;
                    s.acked = u;
                    s.events.push(e);
                }
                other => s.events.push(other),
            }
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Polls `cond` every 2 ms for at most `limit`.
    fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        cond()
    }

    /// An owner and a partner over loopback.
    struct Pair {
        owner: MirrorHandle,
        partner: ReceiverHandle,
        log: MemLog,
        region: MemRegion,
        owner_seen: Arc<Mutex<Seen>>,
        partner_seen: Arc<Mutex<Seen>>,
        next: Mutex<Seq>,
        /// Records built ahead of time (measurements), indexed by seq - 1.
        prebuilt: std::sync::OnceLock<Vec<Bytes>>,
        watchdog: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
        rt: tokio::runtime::Runtime,
    }

    impl Pair {
        fn new(paths: u8, heartbeat: Duration) -> Pair {
            // RUST_LOG=debug shows the driver's logs.
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
            let rt = runtime();
            let cfg = |id, peer| {
                let mut c = Config::new(id, peer, REGION);
                c.paths = paths;
                c.heartbeat_interval = heartbeat;
                c
            };
            let (log, region) = (MemLog::default(), MemRegion::default());
            let owner_seen = Arc::new(Mutex::new(Seen::default()));
            let partner_seen = Arc::new(Mutex::new(Seen::default()));
            let partner = rt
                .block_on(start_listener(
                    "127.0.0.1:0".parse().unwrap(),
                    cfg(2, 1),
                    region.clone(),
                    0,
                    0,
                    sink(&partner_seen),
                    None,
                ))
                .unwrap();
            let owner = start_sender(
                rt.handle(),
                cfg(1, 2),
                partner.local_addr(),
                log.clone(),
                0,
                0,
                sink(&owner_seen),
            );
            // A hung test fails instead of blocking in wait_acked forever.
            let done = Arc::new(AtomicBool::new(false));
            let dog = {
                let (done, owner, partner) = (done.clone(), owner.clone(), partner.clone());
                std::thread::spawn(move || {
                    let end = Instant::now() + LIMIT;
                    while !done.load(Ordering::Relaxed) && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    owner.shutdown();
                    partner.shutdown();
                })
            };
            Pair {
                owner,
                partner,
                log,
                region,
                owner_seen,
                partner_seen,
                next: Mutex::new(0),
                prebuilt: std::sync::OnceLock::new(),
                watchdog: Some((done, dog)),
                rt,
            }
        }

        fn wait_ready(&self, paths: u8) {
            let all: Vec<u8> = (0..paths).collect();
            assert!(
                wait_until(LIMIT, || self.owner_seen.lock().ready_paths() == all
                    && self.partner_seen.lock().ready_paths() == all),
                "paths never came up"
            );
        }

        /// Appends the next record to the owner's log and submits it; one
        /// lock around both keeps submits in seq order, like the node's log.
        fn write(&self) -> Seq {
            let mut next = self.next.lock();
            let seq = *next + 1;
            let off = (seq - 1) * SLOT;
            assert!(
                off + SLOT <= REGION,
                "test wrote more than the region holds"
            );
            let b = self
                .prebuilt
                .get()
                .and_then(|v| v.get(seq as usize - 1))
                .cloned()
                .unwrap_or_else(|| record_bytes(seq));
            self.log.0.lock().insert(seq, (off, b.clone()));
            self.owner.submit(seq, off, b).unwrap();
            *next = seq;
            seq
        }

        /// `threads` writers, each writing and waiting for its ack
        /// `per_thread` times; returns each write's submit-to-ack time.
        fn run_writers(
            &self,
            threads: usize,
            per_thread: usize,
            check_index: bool,
        ) -> Vec<Duration> {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            let mut lat = Vec::with_capacity(per_thread);
                            for _ in 0..per_thread {
                                let t = Instant::now();
                                let seq = self.write();
                                self.owner.wait_acked(seq).unwrap();
                                lat.push(t.elapsed());
                                if check_index {
                                    // STYLE 8: the partner indexed the record
                                    // before the ACK that released it left.
                                    let last = self.partner_seen.lock().indexed.last().copied();
                                    assert!(
                                        last >= Some(seq),
                                        "seq {seq} acked before indexed ({last:?})"
                                    );
                                }
                            }
                            lat
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            })
        }

        /// The partner holds exactly the owner's records 1..=n, indexed once
        /// each, in seq order; acks only went forward.
        fn assert_mirrored(&self, n: Seq) {
            assert_eq!(self.owner.acked(), n);
            assert!(wait_until(LIMIT, || self.partner.stored_upto() == n));
            assert_eq!(
                self.partner_seen.lock().indexed,
                (1..=n).collect::<Vec<_>>()
            );
            assert!(!self.owner_seen.lock().acked_backwards);
            let log = self.log.0.lock();
            let region = self.region.0.lock();
            for seq in 1..=n {
                let (off, b) = &log[&seq];
                let at = *off as usize;
                assert!(
                    region.bytes[at..at + b.len()] == b[..],
                    "seq {seq}: partner copy differs"
                );
            }
            assert_eq!(
                region.bytes.len() as u64,
                (n - 1) * SLOT + (RECORD_HEADER_LEN + DATA) as u64
            );
            let st = self.owner.stats();
            assert_eq!((st.acked, st.unacked_records), (n, 0));
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            if let Some((done, dog)) = self.watchdog.take() {
                done.store(true, Ordering::Relaxed);
                let _ = dog.join();
            }
        }
    }

    /// (a) 10k 4 KiB records from 4 threads: every record acked, the
    /// partner's bytes equal the owner's, each seq indexed once in order and
    /// before its ack.
    #[test]
    fn interconnect_mirrors_every_record_once_in_order() {
        let p = Pair::new(1, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
        let lat = p.run_writers(4, 2500, true);
        assert_eq!(lat.len(), 10_000);
        p.assert_mirrored(10_000);
        let syncs = p.region.0.lock().syncs;
        assert!(syncs > 0 && syncs <= 10_000, "{syncs} syncs");
        let st = p.owner.stats();
        println!(
            "10k records: {} frames, {} partner syncs",
            st.frames_sent, syncs
        );
    }

    /// (b) Every connection cut, ten times, mid-stream, from either end:
    /// the paths reconnect, nothing is lost, nothing indexed twice.
    #[test]
    fn interconnect_cut_connections_resume_without_loss() {
        let p = Pair::new(1, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
        let cuts = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 1..=10u64 {
                    if !wait_until(LIMIT, || p.owner.acked() >= k * 500) {
                        return;
                    }
                    if k % 2 == 0 {
                        p.owner.kill_connections();
                    } else {
                        p.partner.kill_connections();
                    }
                    cuts.fetch_add(1, Ordering::Relaxed);
                }
            });
            p.run_writers(4, 1500, true);
        });
        assert_eq!(cuts.load(Ordering::Relaxed), 10);
        p.assert_mirrored(6000);
        let readies = p
            .owner_seen
            .lock()
            .events
            .iter()
            .filter(|e| matches!(e, Event::PathReady { .. }))
            .count();
        assert!(readies > 5, "only {readies} connections");
        println!("6000 records over {readies} connections");
    }

    /// (c) Two paths: both come up and carry the stream.
    #[test]
    fn interconnect_two_paths() {
        let p = Pair::new(2, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
        p.wait_ready(2);
        p.run_writers(8, 500, true);
        p.assert_mirrored(4000);
        // Cutting one side's connections moves everything to the other path
        // and back.
        p.partner.kill_connections();
        p.run_writers(4, 250, true);
        p.assert_mirrored(5000);
    }

    /// (d) One port, two protocols: NVPX streams go to the proxy channel
    /// with their first bytes unread; strangers are closed.
    #[test]
    fn interconnect_listener_routes_proxy_and_closes_strangers() {
        let rt = runtime();
        rt.block_on(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let h = start_listener(
                "127.0.0.1:0".parse().unwrap(),
                Config::new(2, 1, REGION),
                MemRegion::default(),
                0,
                0,
                Arc::new(|_| {}),
                Some(tx),
            )
            .await
            .unwrap();
            let t = Duration::from_secs(5);
            let mut c = TcpStream::connect(h.local_addr()).await.unwrap();
            c.write_all(b"NVPX\x01\x02rest").await.unwrap();
            let mut s = tokio::time::timeout(t, rx.recv()).await.unwrap().unwrap();
            let mut b = [0u8; 10];
            tokio::time::timeout(t, s.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&b, b"NVPX\x01\x02rest");
            s.write_all(b"ok").await.unwrap();
            let mut b = [0u8; 2];
            tokio::time::timeout(t, c.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&b, b"ok");

            // The magic split over two segments.
            let mut c = TcpStream::connect(h.local_addr()).await.unwrap();
            c.write_all(b"NV").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b"PX!").await.unwrap();
            let mut s = tokio::time::timeout(t, rx.recv()).await.unwrap().unwrap();
            let mut b = [0u8; 5];
            tokio::time::timeout(t, s.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&b, b"NVPX!");

            // Neither: closed.
            let mut g = TcpStream::connect(h.local_addr()).await.unwrap();
            g.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            let mut b = [0u8; 16];
            let r = tokio::time::timeout(t, g.read(&mut b)).await.unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

            // A mirror HELLO from a node that is not our partner: closed.
            let mut c = TcpStream::connect(h.local_addr()).await.unwrap();
            let hello = Frame::Hello(Hello {
                node_id: 9,
                instance: 1,
                epoch: 1,
                stored_seq: 0,
                region_len: REGION,
                role: Role::Owner,
                path: 0,
            });
            c.write_all(&hello.encode()).await.unwrap();
            let r = tokio::time::timeout(t, c.read(&mut b)).await.unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            assert!(rx.try_recv().is_err());
            h.shutdown();
        });
    }

    /// A new connection for a path replaces the live one (which is closed);
    /// the owner's redial then takes the path back the same way.
    #[test]
    fn interconnect_new_connection_replaces_the_path() {
        let p = Pair::new(1, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
        p.run_writers(1, 10, true);
        let readies = |seen: &Arc<Mutex<Seen>>| {
            seen.lock()
                .events
                .iter()
                .filter(|e| matches!(e, Event::PathReady { .. }))
                .count()
        };
        let before = readies(&p.owner_seen);
        p.rt.block_on(async {
            let t = Duration::from_secs(10);
            let mut c = TcpStream::connect(p.partner.local_addr()).await.unwrap();
            let hello = Frame::Hello(Hello {
                node_id: 1,
                instance: 77,
                epoch: 1,
                stored_seq: 10,
                region_len: REGION,
                role: Role::Owner,
                path: 0,
            });
            c.write_all(&hello.encode()).await.unwrap();
            // The partner took the path: it answers with its HELLO here.
            let mut b = [0u8; frame::HEADER_LEN + frame::HELLO_LEN];
            tokio::time::timeout(t, c.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            match frame::decode(&Bytes::copy_from_slice(&b), u32::MAX) {
                Ok(Some((Frame::Hello(h), _))) => {
                    assert_eq!((h.role, h.stored_seq, h.path), (Role::Partner, 10, 0));
                }
                other => panic!("expected the partner's HELLO, got {other:?}"),
            }
            // The owner lost the path, redialed and took it back: this
            // connection is closed (heartbeats may come first).
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(t, c.read_to_end(&mut rest))
                .await
                .unwrap();
        });
        assert!(wait_until(LIMIT, || readies(&p.owner_seen) > before));
        p.run_writers(2, 10, true);
        p.assert_mirrored(30);
    }

    /// After a takeover fences the owner's epoch, its open path is cut and
    /// its redials are refused: nothing more is stored or acked.
    #[test]
    fn interconnect_fenced_owner_is_cut_off() {
        let p = Pair::new(1, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
        p.run_writers(1, 5, true);
        p.partner.set_min_peer_epoch(2);
        let stale = |seen: &Arc<Mutex<Seen>>| {
            seen.lock()
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        Event::PathFailed {
                            error: nvtarget_mirror::Error::StaleEpoch { .. }
                                | nvtarget_mirror::Error::Goodbye(GoodbyeReason::STALE_EPOCH),
                            ..
                        }
                    )
                })
                .count()
        };
        assert!(wait_until(LIMIT, || stale(&p.owner_seen) >= 1));
        let s = p.write();
        // The first for the open path, the next for a redial's HELLO.
        assert!(wait_until(LIMIT, || stale(&p.partner_seen) >= 2));
        assert_eq!(p.partner.stored_upto(), 5);
        assert!(p.owner.acked() < s);
    }

    /// (e) The partner goes away: the owner reports PeerSilent within
    /// heartbeat x missed, holds the next write, and releases it only when
    /// the node goes unmirrored.
    #[test]
    fn interconnect_partner_gone_peer_silent_in_time() {
        let hb = Duration::from_millis(20);
        let silence = hb * nvtarget_mirror::DEFAULT_MISSED_HEARTBEATS;
        let p = Pair::new(1, hb);
        for _ in 0..10 {
            let s = p.write();
            p.owner.wait_acked(s).unwrap();
        }
        let t = Instant::now();
        p.partner.shutdown();
        let silent = || {
            p.owner_seen.lock().events.iter().find_map(|e| match e {
                Event::PeerSilent { since } => Some(*since),
                _ => None,
            })
        };
        assert!(wait_until(silence * 5, || silent().is_some()));
        let took = t.elapsed();
        println!("PeerSilent {took:?} after the partner stopped (heartbeat {hb:?} x missed = {silence:?})");
        let since = silent().unwrap();
        assert!(since <= t, "last heard after the partner stopped");
        // Slack for 2 ms polling and scheduling on a loaded 2-core box.
        assert!(took <= silence + Duration::from_millis(100), "{took:?}");

        let s = p.write();
        std::thread::scope(|sc| {
            let w = sc.spawn(|| p.owner.wait_acked(s));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!w.is_finished(), "a write released without the partner");
            p.owner.go_unmirrored();
            assert_eq!(w.join().unwrap(), Ok(()));
        });
        assert!(p.owner_seen.lock().events.contains(&Event::Unmirrored));
    }

    /// Shutdown releases waiters with an error instead of hanging them.
    #[test]
    fn interconnect_shutdown_releases_waiters() {
        let rt = runtime();
        // A port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = MemLog::default();
        let h = start_sender(
            rt.handle(),
            Config::new(1, 2, REGION),
            addr,
            log.clone(),
            0,
            0,
            Arc::new(|_| {}),
        );
        log.0.lock().insert(1, (0, record_bytes(1)));
        h.submit(1, 0, record_bytes(1)).unwrap();
        std::thread::scope(|sc| {
            let w = sc.spawn(|| h.wait_acked(1));
            std::thread::sleep(Duration::from_millis(30));
            assert!(!w.is_finished());
            h.shutdown();
            assert_eq!(w.join().unwrap(), Err(MirrorWaitError::Shutdown));
        });
    }

    /// Not an assertion: the write path's round trip over loopback (submit
    /// -> frame -> partner stores and indexes -> ACK -> wait_acked returns),
    /// 4 KiB records from 8 threads, 1 and 2 paths.
    #[test]
    fn interconnect_round_trip_measurement() {
        for (paths, threads) in [(1u8, 1usize), (1, 8), (2, 8)] {
            let per_thread = if threads == 1 { 2000 } else { 1000 };
            let n = threads * per_thread;
            let p = Pair::new(paths, nvtarget_mirror::DEFAULT_HEARTBEAT_INTERVAL);
            p.wait_ready(paths);
            // Building records (CRC in a debug build) is not the mirror's cost.
            let _ = p.prebuilt.set((1..=n as Seq).map(record_bytes).collect());
            let t = Instant::now();
            // From submit (the record already built, as the log hands it
            // over) until wait_acked returns.
            let mut lat = p.run_writers(threads, per_thread, false);
            let took = t.elapsed();
            p.assert_mirrored(n as Seq);
            lat.sort_unstable();
            let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
            let st = p.owner.stats();
            println!(
                "round trip, {paths} path(s), {threads} thread(s), 4 KiB records ({} build): \
                 {:.0} records/s, {:.1} MiB/s, wait_acked mean {:?} p50 {:?} p99 {:?}, \
                 {:.1} records/frame",
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                lat.len() as f64 / took.as_secs_f64(),
                (lat.len() * DATA) as f64 / took.as_secs_f64() / (1 << 20) as f64,
                mean,
                lat[lat.len() / 2],
                lat[lat.len() * 99 / 100],
                st.records_sent as f64 / st.frames_sent.max(1) as f64,
            );
        }
    }
}
