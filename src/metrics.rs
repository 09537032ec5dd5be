//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Per-LUN counters and latency histograms are recorded by [`MeteredDevice`],
//! a wrapper around each LUN's block device, so every path into storage is
//! counted whatever command carried it. Metric handles are resolved once per
//! LUN: the I/O path touches only atomics, never the label map.

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
        Arc::new(Metrics {
            registry,
            ops,
            bytes,
            errors,
            latency,
            cp_total,
            cp_failed,
            cp_duration,
            dirty_bytes,
        })
    }

    pub fn encode(&self) -> String {
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
