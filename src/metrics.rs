//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Per-LUN counters and latency histograms are recorded by [`MeteredDevice`],
//! a wrapper around each LUN's block device, so every path into storage is
//! counted whatever command carried it. Metric handles are resolved once per
//! LUN: the I/O path touches only atomics, never the label map.
//!
//! State that already lives elsewhere (sessions, the NVRAM log's halves, the
//! mirror's position, the HA thread's status and last takeover) is copied
//! into gauges by collectors run at scrape time, so the hot paths pay
//! nothing for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nvtarget_scsi::{BlockDevice, DevError, LbaStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LunLabels {
    pub target: String,
    pub lun: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HalfLabel {
    pub half: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
}

/// A gauge holding seconds (or any fraction).
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// A counter that mirrors a running total kept elsewhere (the log's own
/// statistics): each scrape adds what the total grew by.
#[derive(Default, Clone)]
pub struct CopiedCounter {
    counter: Counter,
    seen: Arc<AtomicU64>,
}

impl CopiedCounter {
    pub fn set_total(&self, total: u64) {
        let before = self.seen.swap(total, Ordering::AcqRel);
        // A smaller total means the source restarted (a new log after a
        // giveback): count from there.
        self.counter.inc_by(total.saturating_sub(before));
    }
}

/// Every state the HA thread writes to `status.json`.
pub const HA_STATES: [&str; 4] = [
    "serving",
    "serving-unmirrored",
    "taken-over",
    "waiting-giveback",
];

type Collector = Box<dyn Fn(&Metrics) + Send + Sync>;

fn latency_histogram() -> Histogram {
    // 5 us .. ~2.6 s
    Histogram::new(exponential_buckets(5e-6, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    ops: Family<LunLabels, Counter>,
    bytes: Family<LunLabels, Counter>,
    errors: Family<LunLabels, Counter>,
    latency: Family<LunLabels, Histogram, fn() -> Histogram>,
    pub cp_total: Counter,
    pub cp_failed: Counter,
    pub cp_duration: Histogram,
    pub dirty_bytes: Gauge,
    /// iSCSI connections open now, discovery included.
    pub connections: Gauge,
    pub sessions: Family<TargetLabel, Gauge>,
    pub nvram_half_used: Family<HalfLabel, Gauge>,
    pub nvram_half_capacity: Gauge,
    pub nvram_active_half: Gauge,
    pub nvram_records: CopiedCounter,
    pub nvram_bytes: CopiedCounter,
    pub nvram_space_waits: CopiedCounter,
    pub cp_in_progress: Gauge,
    /// Records logged here and not yet acknowledged by the partner.
    pub mirror_lag_records: Gauge,
    /// Bytes of those records not yet sent or not yet acknowledged.
    pub mirror_lag_bytes: Gauge,
    pub mirror_mirrored: Gauge,
    /// How long a write waited for the partner's ack after its local log
    /// append: the mirror's round trip as the initiator feels it.
    pub mirror_wait: Histogram,
    pub ha_state: Family<StateLabel, Gauge>,
    pub ha_epoch: Gauge,
    pub ha_partner_alive: Gauge,
    pub takeover_step: Family<StepLabel, FloatGauge>,
    pub takeover_seconds: FloatGauge,
    pub takeover_records: Gauge,
    pub takeover_unix_ms: Gauge,
    collectors: parking_lot::Mutex<Vec<Collector>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("nvtarget");
        let ops = Family::<LunLabels, Counter>::default();
        let bytes = Family::<LunLabels, Counter>::default();
        let errors = Family::<LunLabels, Counter>::default();
        let latency = Family::<LunLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let cp_total = Counter::default();
        let cp_failed = Counter::default();
        let cp_duration = Histogram::new(exponential_buckets(1e-3, 2.0, 16));
        let dirty_bytes = Gauge::default();
        registry.register("lun_ops", "Block I/O operations per LUN", ops.clone());
        registry.register("lun_bytes", "Bytes transferred per LUN", bytes.clone());
        registry.register(
            "lun_errors",
            "Failed block operations per LUN",
            errors.clone(),
        );
        registry.register(
            "lun_latency_seconds",
            "Block operation latency per LUN",
            latency.clone(),
        );
        registry.register("cp", "Consistency points taken", cp_total.clone());
        registry.register(
            "cp_failed",
            "Consistency points that failed",
            cp_failed.clone(),
        );
        registry.register(
            "cp_duration_seconds",
            "Consistency point duration",
            cp_duration.clone(),
        );
        registry.register(
            "dirty_bytes",
            "Bytes written but not yet in a consistency point",
            dirty_bytes.clone(),
        );
        let m = Metrics {
            registry,
            ops,
            bytes,
            errors,
            latency,
            cp_total,
            cp_failed,
            cp_duration,
            dirty_bytes,
            connections: Gauge::default(),
            sessions: Family::default(),
            nvram_half_used: Family::default(),
            nvram_half_capacity: Gauge::default(),
            nvram_active_half: Gauge::default(),
            nvram_records: CopiedCounter::default(),
            nvram_bytes: CopiedCounter::default(),
            nvram_space_waits: CopiedCounter::default(),
            cp_in_progress: Gauge::default(),
            mirror_lag_records: Gauge::default(),
            mirror_lag_bytes: Gauge::default(),
            mirror_mirrored: Gauge::default(),
            mirror_wait: latency_histogram(),
            ha_state: Family::default(),
            ha_epoch: Gauge::default(),
            ha_partner_alive: Gauge::default(),
            takeover_step: Family::default(),
            takeover_seconds: FloatGauge::default(),
            takeover_records: Gauge::default(),
            takeover_unix_ms: Gauge::default(),
            collectors: parking_lot::Mutex::new(Vec::new()),
        };
        Arc::new(m.register_operator_metrics())
    }

    fn register_operator_metrics(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "connections",
            "iSCSI connections open (discovery included)",
            self.connections.clone(),
        );
        r.register(
            "sessions",
            "Logged-in iSCSI sessions per target",
            self.sessions.clone(),
        );
        r.register(
            "nvram_half_used_bytes",
            "Bytes of log records in each NVRAM log half",
            self.nvram_half_used.clone(),
        );
        r.register(
            "nvram_half_capacity_bytes",
            "Record space of one NVRAM log half",
            self.nvram_half_capacity.clone(),
        );
        r.register(
            "nvram_active_half",
            "The NVRAM log half new writes go to",
            self.nvram_active_half.clone(),
        );
        r.register(
            "nvram_records",
            "Records appended to the NVRAM log",
            self.nvram_records.counter.clone(),
        );
        r.register(
            "nvram_bytes",
            "Bytes appended to the NVRAM log",
            self.nvram_bytes.counter.clone(),
        );
        r.register(
            "nvram_space_waits",
            "Appends that waited for a CP to free a log half",
            self.nvram_space_waits.counter.clone(),
        );
        r.register(
            "cp_in_progress",
            "1 while a consistency point runs",
            self.cp_in_progress.clone(),
        );
        r.register(
            "mirror_lag_records",
            "Records logged here and not yet acknowledged by the partner",
            self.mirror_lag_records.clone(),
        );
        r.register(
            "mirror_lag_bytes",
            "Bytes of records not yet sent to or acknowledged by the partner",
            self.mirror_lag_bytes.clone(),
        );
        r.register(
            "mirror_mirrored",
            "1 while writes wait for the partner's ack, 0 when serving unmirrored",
            self.mirror_mirrored.clone(),
        );
        r.register(
            "mirror_wait_seconds",
            "Time a write waited for the partner's mirror ack after its local append",
            self.mirror_wait.clone(),
        );
        r.register(
            "ha_state",
            "1 for the HA state this node is in",
            self.ha_state.clone(),
        );
        r.register(
            "ha_epoch",
            "This node's mailbox epoch",
            self.ha_epoch.clone(),
        );
        r.register(
            "ha_partner_alive",
            "1 while the partner's interconnect heartbeats arrive",
            self.ha_partner_alive.clone(),
        );
        r.register(
            "takeover_step_seconds",
            "Duration of each step of the last takeover this node ran",
            self.takeover_step.clone(),
        );
        r.register(
            "takeover_seconds",
            "Duration of the last takeover this node ran",
            self.takeover_seconds.clone(),
        );
        r.register(
            "takeover_replayed_records",
            "Log records the last takeover replayed",
            self.takeover_records.clone(),
        );
        r.register(
            "takeover_unix_ms",
            "When the last takeover this node ran started serving (Unix ms)",
            self.takeover_unix_ms.clone(),
        );
        self
    }

    /// Runs `f` before every scrape, to copy state kept elsewhere into
    /// this registry's gauges.
    pub fn add_collector(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.collectors.lock().push(Box::new(f));
    }

    pub fn encode(&self) -> String {
        for c in self.collectors.lock().iter() {
            c(self);
        }
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    fn op(&self, target: &str, lun: u64, op: &str) -> OpMetrics {
        let l = LunLabels {
            target: target.to_string(),
            lun: lun.to_string(),
            op: op.to_string(),
        };
        OpMetrics {
            ops: self.ops.get_or_create(&l).clone(),
            bytes: self.bytes.get_or_create(&l).clone(),
            errors: self.errors.get_or_create(&l).clone(),
            latency: self.latency.get_or_create(&l).clone(),
        }
    }
}

#[derive(Clone)]
struct OpMetrics {
    ops: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

impl OpMetrics {
    fn record<T>(&self, start: Instant, bytes: usize, r: &Result<T, DevError>) {
        self.ops.inc();
        self.bytes.inc_by(bytes as u64);
        if r.is_err() {
            self.errors.inc();
        }
        self.latency.observe(start.elapsed().as_secs_f64());
    }
}

/// A LUN's device with its operations counted and timed.
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    read: OpMetrics,
    write: OpMetrics,
    flush: OpMetrics,
    unmap: OpMetrics,
}

impl MeteredDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, m: &Metrics, target: &str, lun: u64) -> Self {
        MeteredDevice {
            inner,
            read: m.op(target, lun, "read"),
            write: m.op(target, lun, "write"),
            flush: m.op(target, lun, "flush"),
            unmap: m.op(target, lun, "unmap"),
        }
    }
}

impl BlockDevice for MeteredDevice {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let t = Instant::now();
        let r = self.inner.read(lba, buf);
        self.read.record(t, buf.len(), &r);
        r
    }
    fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        let t = Instant::now();
        let r = self.inner.write(lba, data, fua);
        self.write.record(t, data.len(), &r);
        r
    }
    fn flush(&self) -> Result<(), DevError> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.flush.record(t, 0, &r);
        r
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
        let t = Instant::now();
        let r = self.inner.unmap(lba, blocks);
        self.unmap
            .record(t, (blocks * self.inner.block_size() as u64) as usize, &r);
        r
    }
    fn thin(&self) -> bool {
        self.inner.thin()
    }
    fn poll_soft_threshold(&self) -> bool {
        self.inner.poll_soft_threshold()
    }
    fn lba_status(&self, lba: u64) -> Result<(LbaStatus, u64), DevError> {
        self.inner.lba_status(lba)
    }
}

/// Copies the mirror sender's position into the metrics at every scrape.
pub fn watch_mirror(m: &Metrics, h: crate::interconnect::MirrorHandle) {
    m.add_collector(move |m| {
        let st = h.stats();
        m.mirror_lag_records
            .set(st.last_submitted.saturating_sub(st.acked) as i64);
        m.mirror_lag_bytes
            .set((st.unsent_bytes + st.inflight_bytes) as i64);
        m.mirror_mirrored.set(i64::from(st.mirrored));
    });
}

/// Serves `GET /metrics` (any path, in fact) in the Prometheus text format.
/// A deliberately tiny HTTP/1.0 responder: one request per connection, a
/// bounded request read, no keep-alive.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    loop {
        let (mut sock, peer) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            // Read until the end of the headers, a full buffer or 5 s.
            let read = async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                tracing::debug!(%peer, "metrics request timed out");
                return;
            }
            let (status, body) = if buf[..n].starts_with(b"GET ") {
                ("200 OK", metrics.encode())
            } else {
                ("405 Method Not Allowed", String::new())
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
