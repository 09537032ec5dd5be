//! LUNs served from the write-anywhere store (`nvtarget-lun`), every write
//! logged to NVRAM (`nvtarget-nvram`) before it is acknowledged.
//!
//! Write path: `Log::append_with` makes the record durable (per the region's
//! durability mode), then applies it to the aggregate's dirty set in seq
//! order, then the write is answered. FUA and SYNCHRONIZE CACHE need nothing
//! more: the log is the stable copy.
//!
//! Consistency points: a thread waits until the log asks for one (active half
//! half full, an append waiting for room, or on demand) or the CP interval
//! (`node.cp_interval_ms`, default 10 s) passes with data dirty; then `begin_cp` switches the log to its other half
//! and returns once every record up to the ticket is in the dirty set, the
//! aggregate commits a CP recording that seq, and `cp_done` prunes the half.
//!
//! Start: mount the aggregate, open the log with the aggregate's committed
//! seq, apply every later record in log order, commit a CP, serve.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use nvtarget_lun::{AggrOptions, Aggregate, Error as LunError, FileStorage, LunId, Storage};
use nvtarget_nvram::{Durability, Log, Op, RecordMeta, RegionConfig, Seq};
use nvtarget_scsi::{BlockDevice, DevError, LbaStatus};
use parking_lot::{Condvar, Mutex};

use crate::interconnect::AckView;
use crate::metrics::Metrics;

/// Longest time data stays dirty before a CP unless `node.cp_interval_ms`
/// says otherwise.
pub const DEFAULT_CP_INTERVAL: Duration = Duration::from_secs(10);
/// Most data in one WRITE record: below the mirror's frame bound (16 MiB
/// plus headers), so every record can be mirrored.
const MAX_RECORD_DATA: u64 = 8 << 20;

/// The aggregate, its NVRAM log and the thread that takes consistency points.
pub struct Store {
    aggr: Aggregate,
    log: Log,
    metrics: Arc<Metrics>,
    cp: Mutex<CpState>,
    cp_cv: Condvar,
    /// Mirrors `CpState::failed.is_some()` so the write path checks an
    /// atomic instead of taking the CP mutex on every I/O.
    poisoned: AtomicBool,
    mirror: OnceLock<Arc<dyn WriteMirror>>,
    /// `LogOptions::bench_no_log`.
    bench_no_log: bool,
    /// Giveback: no more writes (see `close`).
    closed: AtomicBool,
    /// Writes between the `closed` check and their answer.
    inflight: AtomicU64,
    /// A CP runs at least this often while data is dirty.
    cp_interval: Duration,
}

struct Gate<'a>(&'a AtomicU64);

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct CpState {
    /// CPs asked for by `checkpoint`: the CP numbered `wanted` must run.
    wanted: u64,
    /// CPs begun (the one in progress, if any, is number `started`).
    started: u64,
    /// CPs completed.
    done: u64,
    /// A CP is between `started` and `done`.
    running: bool,
    /// Set when a CP failed: the aggregate is poisoned, writes fail.
    failed: Option<String>,
    stop: bool,
}

/// Where the log lives and what its acknowledgement promises.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    pub size: u64,
    pub durability: Durability,
    /// A CP runs at least this often while data is dirty.
    pub cp_interval: Duration,
    /// Benchmarks only (`node.nvram_durability = "none"`): writes skip the
    /// log and go straight to the dirty set; a crash loses every write since
    /// the last CP. The log is still opened: its CP requests drive the CP
    /// thread.
    pub bench_no_log: bool,
}

fn log_err(e: nvtarget_nvram::Error) -> DevError {
    DevError::Io(std::io::Error::other(format!("NVRAM log: {e}")))
}

/// The HA mirror as the write path sees it: every record goes to the
/// partner (in seq order, from inside the log's ordered apply), and a write
/// is answered only once `wait` says the partner has it (or the node decided
/// to run unmirrored).
pub trait WriteMirror: Send + Sync {
    fn submit(&self, seq: Seq, offset: u64, bytes: Bytes);
    fn wait(&self, seq: Seq) -> Result<(), DevError>;
    /// The ack state, for a caller that waits without blocking a thread
    /// (see [`deferring_mirror_waits`]).
    fn watch_acks(&self) -> tokio::sync::watch::Receiver<AckView>;
    fn cp_done(&self, seq: Seq);
}

/// A write whose record is logged and applied but not yet acknowledged by
/// the partner: its status may go out once `acks` shows `acked >= seq`.
pub struct DeferredAck {
    pub seq: Seq,
    pub acks: tokio::sync::watch::Receiver<AckView>,
    /// When the first record was submitted (for the mirror-wait metric).
    pub since: Instant,
}

thread_local! {
    static DEFER_MIRROR_WAITS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static DEFERRED_ACK: std::cell::RefCell<Option<DeferredAck>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (one SCSI command, on this thread) with the writes it makes
/// not waiting for the partner's ack: they are logged, mirrored and
/// applied, and the highest seq they need acknowledged comes back with
/// `f`'s result. The caller must not report the command's status before
/// that seq is acknowledged (or report the wait's error instead). Acks are
/// cumulative, so one seq covers every record of the command.
///
/// This keeps the iSCSI connection task from blocking on the interconnect
/// round trip without a thread hop per write (each one a context switch on
/// the write path, the bulk of a mirrored write's CPU cost).
pub fn deferring_mirror_waits<R>(f: impl FnOnce() -> R) -> (R, Option<DeferredAck>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            // Also on unwind: a later caller on this thread must wait.
            DEFER_MIRROR_WAITS.set(false);
            DEFERRED_ACK.take();
        }
    }
    DEFER_MIRROR_WAITS.set(true);
    let reset = Reset;
    let r = f();
    let d = DEFERRED_ACK.take();
    drop(reset);
    (r, d)
}

/// Whether this node may still write an aggregate: the takeover fences a
/// failed node by bumping the epoch in its mailbox, and every aggregate
/// write checks it.
pub trait Fence: Send + Sync {
    fn check(&self) -> std::io::Result<()>;
}

/// An aggregate's storage whose writes are refused once the node is fenced.
struct FencedStorage {
    inner: FileStorage,
    fence: Arc<dyn Fence>,
}

impl Storage for FencedStorage {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.fence.check()?;
        self.inner.set_len(len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.fence.check()?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.fence.check()?;
        self.inner.sync()
    }
    fn io_parallelism(&self) -> usize {
        self.inner.io_parallelism()
    }
    fn writes_vectored(&self) -> bool {
        self.inner.writes_vectored()
    }
    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.fence.check()?;
        self.inner.write_parts_at(parts, offset)
    }
}

impl Store {
    /// Mounts the aggregate at `path` (creating a sparse one of `size_bytes`
    /// if the file is missing or empty); with a fence, every write to it
    /// checks that this node was not fenced off.
    pub fn mount(
        path: &Path,
        size_bytes: u64,
        fence: Option<Arc<dyn Fence>>,
    ) -> anyhow::Result<Aggregate> {
        let exists = std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let file = FileStorage::open(path, false)
            .with_context(|| format!("opening aggregate {}", path.display()))?;
        let aggr = match fence {
            Some(fence) => open_aggr(
                FencedStorage { inner: file, fence },
                exists,
                size_bytes,
                path,
            )?,
            None => open_aggr(file, exists, size_bytes, path)?,
        };
        if let Some(why) = aggr.read_only_reason() {
            tracing::warn!(aggregate = %path.display(), reason = why, "aggregate mounted read-only");
        }
        Ok(aggr)
    }

    /// Opens the log at `log_path` over a mounted aggregate, replays what it
    /// holds past the aggregate's last CP, commits a CP and starts the CP
    /// thread. (A takeover first applies the partner's mirrored records and
    /// commits them, so the log starts above them.)
    pub fn with_log(
        aggr: Aggregate,
        log_path: &Path,
        log_opts: LogOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Store>> {
        Store::with_log_from(aggr, log_path, log_opts, metrics, 0)
    }

    /// `with_log` for a takeover: the partner's records up to `floor` are
    /// already in the aggregate's dirty set (not yet in a CP), so the log
    /// issues seqs above them and the first CP covers them.
    pub fn with_log_from(
        aggr: Aggregate,
        log_path: &Path,
        log_opts: LogOptions,
        metrics: Arc<Metrics>,
        floor: Seq,
    ) -> anyhow::Result<Arc<Store>> {
        let committed = aggr.highest_seq().max(floor);
        let (log, mut replay) = Log::open_file(
            log_path,
            RegionConfig {
                size: log_opts.size,
                durability: log_opts.durability,
            },
            committed,
        )
        .with_context(|| format!("opening the NVRAM log {}", log_path.display()))?;
        if !replay.report.is_clean() {
            tracing::warn!(report = ?replay.report, "NVRAM log scan stopped early; records before the damage are replayed");
        }
        let t0 = Instant::now();
        let n = replay.len();
        for p in replay.report.problems() {
            tracing::warn!(problem = %p, "NVRAM log");
        }
        let mut progress = crate::progress::Progress::new("replaying the NVRAM log");
        for (i, rec) in replay.records().enumerate() {
            let rec = rec.context("reading a log record to replay")?;
            apply_record(&aggr, &rec);
            aggr.note_applied_seq(rec.seq);
            progress.update(i as u64 + 1, n as u64, "records");
        }
        progress.finish();
        let takeover = floor > aggr.highest_seq();
        if let Some(ticket) = replay.take_ticket() {
            if takeover && n == 0 {
                // The partner's records are in the dirty set and stay
                // covered by its mirrored log until the CP thread commits
                // them (within the CP interval): serving must not wait for
                // that CP.
                aggr.note_applied_seq(ticket.seq());
            } else {
                aggr.cp(ticket.seq())
                    .context("consistency point after log replay")?;
            }
            log.cp_done(ticket).context("pruning the replayed log")?;
        }
        tracing::info!(
            records = n,
            committed_seq = committed,
            ms = t0.elapsed().as_millis() as u64,
            durability = ?log_opts.durability,
            "NVRAM log replayed"
        );
        if log_opts.bench_no_log {
            tracing::warn!("node.nvram_durability = \"none\": writes are NOT logged; a crash loses every write acknowledged since the last CP (benchmarks only)");
        }
        let store = Arc::new(Store {
            aggr,
            log,
            metrics,
            cp: Mutex::new(CpState::default()),
            cp_cv: Condvar::new(),
            poisoned: AtomicBool::new(false),
            mirror: OnceLock::new(),
            bench_no_log: log_opts.bench_no_log,
            closed: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            cp_interval: log_opts.cp_interval,
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("cp".into())
            .spawn(move || cp_thread(weak))
            .context("starting the CP thread")?;
        Ok(store)
    }

    /// From now on every record also goes to `m` and writes wait for it.
    /// Set once, before the store serves I/O.
    pub fn set_mirror(&self, m: Arc<dyn WriteMirror>) {
        let _ = self.mirror.set(m);
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub fn aggregate(&self) -> &Aggregate {
        &self.aggr
    }

    /// Appends a record (and mirrors it), applying `apply` to the aggregate
    /// in seq order; returns once the write may be answered.
    fn log_and_apply<R>(
        &self,
        meta: &RecordMeta,
        data: &[u8],
        apply: impl FnOnce() -> R,
    ) -> Result<R, DevError> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let _gate = Gate(&self.inflight);
        if self.closed.load(Ordering::SeqCst) {
            return Err(DevError::ReadOnly);
        }
        if self.bench_no_log {
            return Ok(self.apply_unlogged(apply));
        }
        let mirror = self.mirror.get();
        let (seq, r) = self
            .log
            .append_with_at(meta, data, |a| {
                // To the partner first: its round trip overlaps the apply.
                if let Some(m) = mirror {
                    match self.log.local_read(a.offset, a.len as usize) {
                        Ok(bytes) => m.submit(a.seq, a.offset, Bytes::from(bytes)),
                        Err(e) => {
                            tracing::error!(seq = a.seq, error = %e, "reading a record back for the mirror")
                        }
                    }
                }
                let r = apply();
                self.aggr.note_applied_seq(a.seq);
                r
            })
            .map_err(log_err)?;
        if let Some(m) = mirror {
            if DEFER_MIRROR_WAITS.get() {
                DEFERRED_ACK.with_borrow_mut(|d| match d {
                    Some(d) => d.seq = d.seq.max(seq),
                    None => {
                        *d = Some(DeferredAck {
                            seq,
                            acks: m.watch_acks(),
                            since: Instant::now(),
                        })
                    }
                });
                return Ok(r);
            }
            let t = Instant::now();
            let acked = m.wait(seq);
            self.metrics.mirror_wait.observe(t.elapsed().as_secs_f64());
            acked?;
        }
        Ok(r)
    }

    /// `bench_no_log`: applies a write without a record. CPs and flow
    /// control follow the log's rules with dirty bytes standing in for log
    /// bytes: a CP is asked for once the dirty set holds half a log half, and
    /// writes wait while it holds a whole half (a CP still running).
    fn apply_unlogged<R>(&self, apply: impl FnOnce() -> R) -> R {
        let half = self.log.layout().half_capacity();
        while self.aggr.dirty_bytes() >= half {
            self.log.request_cp();
            std::thread::sleep(Duration::from_micros(200));
        }
        let r = apply();
        if self.aggr.dirty_bytes() >= half / 2 {
            self.log.request_cp();
        }
        r
    }

    /// The LUN called `name`, created (or grown) to `size` bytes.
    pub fn ensure_lun(&self, name: &str, size: u64, block_size: u32) -> anyhow::Result<LunId> {
        match self.aggr.lun_by_name(name) {
            Some(info) => {
                if info.logical_block_size != block_size {
                    anyhow::bail!(
                        "LUN {name} has {}-byte blocks in the aggregate but the configuration says {block_size}",
                        info.logical_block_size
                    );
                }
                if info.size_bytes < size {
                    self.aggr.resize_lun(info.id, size)?;
                    tracing::info!(lun = name, from = info.size_bytes, to = size, "LUN grown");
                }
                Ok(info.id)
            }
            None => Ok(self
                .aggr
                .create_lun_with_block_size(name, size, block_size)?),
        }
    }

    /// Takes a CP that starts after this call and waits for it.
    pub fn checkpoint(&self) -> Result<(), DevError> {
        let mut st = self.cp.lock();
        // The next CP to begin: one already running may have taken its
        // snapshot of the dirty blocks before our caller's last write.
        let ticket = st.started + 1;
        st.wanted = st.wanted.max(ticket);
        self.log.request_cp();
        self.cp_cv.notify_all();
        while st.done < ticket && !st.stop && st.failed.is_none() {
            self.cp_cv.wait(&mut st);
        }
        match &st.failed {
            Some(e) => Err(DevError::Io(std::io::Error::other(e.clone()))),
            None => Ok(()),
        }
    }

    /// Refuses every write from now on (giveback: the partner takes the
    /// aggregate back) and waits for the writes already past the gate, so
    /// the next `checkpoint` holds everything acknowledged.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.inflight.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the CP thread (after `close` and a last `checkpoint`: the
    /// aggregate is about to be opened by the other node).
    /// Stops the CP thread and waits until no CP is running: after this
    /// returns, nothing of this store writes the aggregate any more (a
    /// giveback hands it to the partner right after).
    pub fn stop_cp(&self) {
        let mut st = self.cp.lock();
        st.stop = true;
        self.cp_cv.notify_all();
        while st.running {
            self.cp_cv.wait(&mut st);
        }
    }

    fn failed(&self) -> Result<(), DevError> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        match &self.cp.lock().failed {
            Some(e) => Err(DevError::Io(std::io::Error::other(e.clone()))),
            None => Ok(()),
        }
    }
}

fn open_aggr<S: Storage>(
    storage: S,
    exists: bool,
    size_bytes: u64,
    path: &Path,
) -> anyhow::Result<Aggregate> {
    if exists {
        Aggregate::open(storage).with_context(|| format!("mounting aggregate {}", path.display()))
    } else {
        Aggregate::create(
            storage,
            AggrOptions {
                size_bytes,
                ..Default::default()
            },
        )
        .with_context(|| format!("creating aggregate {}", path.display()))
    }
}

/// Applies one replayed record to the aggregate. A record that can no longer
/// apply (its LUN was deleted) is reported and skipped.
pub fn apply_record(aggr: &Aggregate, rec: &nvtarget_nvram::Record) {
    let m = &rec.meta;
    let Some(info) = aggr.lun(m.lun) else {
        tracing::warn!(
            seq = rec.seq,
            lun = m.lun,
            "replay: record for a LUN that no longer exists, skipped"
        );
        return;
    };
    let bs = info.logical_block_size as u64;
    let off = m.lba * bs;
    let r = match m.op {
        Op::WRITE | Op::COMPARE_AND_WRITE => aggr.write(m.lun, off, &rec.data),
        Op::UNMAP => aggr.unmap(m.lun, off, m.blocks as u64 * bs),
        Op::WRITE_SAME => {
            (0..m.blocks as u64).try_for_each(|i| aggr.write(m.lun, off + i * bs, &rec.data))
        }
        other => {
            tracing::warn!(seq = rec.seq, op = %other, "replay: record kind not replayed yet, skipped");
            Ok(())
        }
    };
    if let Err(e) = r {
        tracing::error!(seq = rec.seq, lun = m.lun, lba = m.lba, error = %e, "replay: record failed to apply");
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.cp.lock().stop = true;
        self.cp_cv.notify_all();
    }
}

fn cp_thread(store: std::sync::Weak<Store>) {
    let mut last = Instant::now();
    loop {
        let Some(s) = store.upgrade() else { return };
        if s.cp.lock().stop {
            return;
        }
        let needed = s.log.wait_cp_needed(Duration::from_millis(200));
        {
            let mut st = s.cp.lock();
            let explicit = st.wanted > st.started;
            let timer = last.elapsed() >= s.cp_interval && s.aggr.dirty_bytes() > 0;
            // `stop` is checked under the same lock that marks the CP
            // running, so `stop_cp` never returns with a CP about to begin.
            if st.stop || !(needed || explicit || timer) {
                continue;
            }
            st.started += 1;
            st.running = true;
        }
        let t0 = Instant::now();
        s.metrics.dirty_bytes.set(s.aggr.dirty_bytes() as i64);
        let r = s
            .log
            .begin_cp()
            .map_err(|e| e.to_string())
            .and_then(|ticket| {
                s.aggr.note_applied_seq(ticket.seq());
                s.aggr
                    .cp(ticket.seq())
                    .map_err(|e| e.to_string())
                    .and_then(|stats| {
                        let seq = ticket.seq();
                        s.log.cp_done(ticket).map_err(|e| e.to_string())?;
                        if let Some(m) = s.mirror.get() {
                            m.cp_done(seq);
                        }
                        Ok(stats)
                    })
            });
        last = Instant::now();
        s.metrics.cp_duration.observe(t0.elapsed().as_secs_f64());
        s.metrics.dirty_bytes.set(s.aggr.dirty_bytes() as i64);
        let mut st = s.cp.lock();
        st.done = st.started;
        st.running = false;
        match r {
            Ok(stats) => {
                s.metrics.cp_total.inc();
                tracing::debug!(
                    generation = stats.generation,
                    data_blocks = stats.data_blocks,
                    ms = t0.elapsed().as_millis() as u64,
                    "consistency point"
                );
            }
            Err(e) => {
                s.metrics.cp_failed.inc();
                tracing::error!(error = %e, "consistency point failed; writes now fail until restart");
                st.failed = Some(e);
                s.poisoned.store(true, Ordering::Release);
            }
        }
        s.cp_cv.notify_all();
    }
}

/// One LUN of the store as a SCSI block device.
pub struct StoreDevice {
    store: Arc<Store>,
    lun: LunId,
    block_size: u32,
}

impl StoreDevice {
    pub fn new(store: Arc<Store>, lun: LunId, block_size: u32) -> StoreDevice {
        StoreDevice {
            store,
            lun,
            block_size,
        }
    }

    fn bytes(&self, lba: u64) -> Result<u64, DevError> {
        lba.checked_mul(self.block_size as u64)
            .ok_or_else(|| DevError::Io(std::io::Error::other("LBA overflows")))
    }
}

fn dev_err(e: LunError, lba: u64) -> DevError {
    match e {
        LunError::Checksum { .. } => DevError::Checksum { lba },
        LunError::NoSpace => DevError::NoSpace,
        LunError::ReadOnly(_) => DevError::ReadOnly,
        LunError::Io(e) => DevError::Io(e),
        other => DevError::Io(std::io::Error::other(other.to_string())),
    }
}

impl BlockDevice for StoreDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.store
            .aggr
            .lun(self.lun)
            .map(|l| l.size_bytes / self.block_size as u64)
            .unwrap_or(0)
    }

    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let off = self.bytes(lba)?;
        self.store
            .aggr
            .read(self.lun, off, buf)
            .map_err(|e| dev_err(e, lba))
    }

    fn write(&self, lba: u64, data: &[u8], _fua: bool) -> Result<(), DevError> {
        // FUA needs nothing more: the record is durable when append returns.
        // A write larger than a record may be (a quarter of a log half, at
        // most MAX_RECORD_DATA: the mirror's frame bound) is logged as
        // several records in LBA order; SCSI promises no atomicity across
        // blocks, and each record is applied before the next is appended.
        self.store.failed()?;
        let bs = self.block_size as usize;
        let cap = (self.store.log.layout().half_capacity() / 4).min(MAX_RECORD_DATA) as usize;
        let chunk = (cap / bs).max(1) * bs;
        let mut lba = lba;
        for part in data.chunks(chunk) {
            let off = self.bytes(lba)?;
            let blocks = (part.len() / bs) as u32;
            let meta = RecordMeta::data(
                Op::WRITE,
                self.lun,
                lba,
                blocks,
                self.store.aggr.generation(),
            );
            self.store
                .log_and_apply(&meta, part, || self.store.aggr.write(self.lun, off, part))?
                .map_err(|e| dev_err(e, lba))?;
            lba += blocks as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        // Every acknowledged write is already in the log.
        self.store.failed()
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
        let off = self.bytes(lba)?;
        self.bytes(blocks)?;
        self.store.failed()?;
        // One record per 2^31 blocks keeps the count in its u32 field.
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(1 << 31);
            let meta = RecordMeta::data(
                Op::UNMAP,
                self.lun,
                lba + done,
                n as u32,
                self.store.aggr.generation(),
            );
            let at = off + done * self.block_size as u64;
            self.store
                .log_and_apply(&meta, &[], || {
                    self.store
                        .aggr
                        .unmap(self.lun, at, n * self.block_size as u64)
                })?
                .map_err(|e| dev_err(e, lba + done))?;
            done += n;
        }
        Ok(())
    }

    fn thin(&self) -> bool {
        true
    }

    fn poll_soft_threshold(&self) -> bool {
        self.store.aggr.poll_soft_threshold()
    }

    fn lba_status(&self, lba: u64) -> Result<(LbaStatus, u64), DevError> {
        let off = self.bytes(lba)?;
        let st = self
            .store
            .aggr
            .lba_status(self.lun, off)
            .map_err(|e| dev_err(e, lba))?;
        let blocks = (st.len_bytes / self.block_size as u64).max(1);
        let kind = if st.mapped {
            LbaStatus::Mapped
        } else {
            LbaStatus::Deallocated
        };
        Ok((kind, blocks))
    }
}

#[cfg(test)]
mod tests {
    // Test harness: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Records what the store asks of the mirror; acks come from the test.
    struct FakeMirror {
        submitted: Mutex<Vec<Seq>>,
        waited: Mutex<Vec<Seq>>,
        acks: tokio::sync::watch::Sender<AckView>,
    }

    impl WriteMirror for FakeMirror {
        fn submit(&self, seq: Seq, _offset: u64, _bytes: Bytes) {
            self.submitted.lock().push(seq);
        }
        fn wait(&self, seq: Seq) -> Result<(), DevError> {
            self.waited.lock().push(seq);
            Ok(())
        }
        fn watch_acks(&self) -> tokio::sync::watch::Receiver<AckView> {
            self.acks.subscribe()
        }
        fn cp_done(&self, _seq: Seq) {}
    }

    fn store(tag: &str) -> (std::path::PathBuf, Arc<Store>) {
        let dir =
            std::env::temp_dir().join(format!("nvtarget-storedev-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let aggr = Store::mount(&dir.join("aggr"), 64 << 20, None).unwrap();
        let opts = LogOptions {
            size: 16 << 20,
            durability: Durability::Process,
            cp_interval: Duration::from_secs(60),
            bench_no_log: false,
        };
        let s = Store::with_log(aggr, &dir.join("nvram"), opts, Metrics::new()).unwrap();
        (dir, s)
    }

    /// Under `deferring_mirror_waits` a write is logged, mirrored and
    /// applied without the blocking wait, and hands back the seq its status
    /// must wait for; outside it (and after a panic inside it) writes wait.
    #[test]
    fn deferred_mirror_waits_hand_back_the_seq_to_wait_for() {
        let (dir, store) = store("defer");
        let mirror = Arc::new(FakeMirror {
            submitted: Mutex::new(Vec::new()),
            waited: Mutex::new(Vec::new()),
            acks: tokio::sync::watch::channel(AckView::default()).0,
        });
        store.set_mirror(mirror.clone());
        let lun = store.ensure_lun("l0", 8 << 20, 512).unwrap();
        let dev = StoreDevice::new(store.clone(), lun, 512);

        let block = vec![0xa5u8; 4096];
        let (r, d) = deferring_mirror_waits(|| dev.write(8, &block, false));
        r.unwrap();
        let d = d.expect("a deferred ack");
        assert_eq!(
            mirror.waited.lock().len(),
            0,
            "a deferred write blocked on the mirror"
        );
        assert_eq!(Some(&d.seq), mirror.submitted.lock().last());
        assert!(d.acks.same_channel(&mirror.acks.subscribe()));
        // Visible at once (the status is what waits).
        let mut back = vec![0u8; 4096];
        dev.read(8, &mut back).unwrap();
        assert_eq!(back, block);

        // Two records in one command: the highest seq covers both.
        let (r, d2) = deferring_mirror_waits(|| {
            dev.write(16, &block, false)?;
            dev.write(24, &block, false)
        });
        r.unwrap();
        assert_eq!(d2.unwrap().seq, *mirror.submitted.lock().last().unwrap());
        assert!(mirror.waited.lock().is_empty());

        // A read defers nothing.
        let (_, none) = deferring_mirror_waits(|| dev.read(8, &mut back));
        assert!(none.is_none());

        // Outside, the write waits for its own seq.
        dev.write(32, &block, false).unwrap();
        assert_eq!(
            mirror.waited.lock().clone(),
            vec![*mirror.submitted.lock().last().unwrap()]
        );

        // A panic inside must not leave this thread deferring.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deferring_mirror_waits(|| -> Result<(), DevError> {
                dev.write(40, &block, false)?;
                panic!("command panicked");
            })
        }));
        assert!(r.is_err());
        dev.write(48, &block, false).unwrap();
        assert_eq!(
            mirror.waited.lock().len(),
            2,
            "a write after the panic did not wait"
        );
        store.close();
        store.stop_cp();
        drop(dev);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
