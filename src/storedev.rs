//! LUNs served from the write-anywhere store (`nvtarget-lun`).
//!
//! Writes land in the aggregate's in-memory dirty set; a consistency point
//! (CP) makes them durable. Until the NVRAM log exists, nothing else does:
//! the LUN reports a volatile write cache (WCE=1), and FUA writes and
//! SYNCHRONIZE CACHE each wait for a CP that started after them. A background
//! thread takes a CP every `CP_INTERVAL` and as soon as the dirty set passes
//! `CP_DIRTY_BYTES`; writers wait (flow control) while it is over twice that.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nvtarget_lun::{AggrOptions, Aggregate, Error as LunError, FileStorage, LunId};
use nvtarget_scsi::{BlockDevice, DevError, LbaStatus};
use parking_lot::{Condvar, Mutex};

use crate::metrics::Metrics;

const CP_INTERVAL: Duration = Duration::from_secs(10);
const CP_DIRTY_BYTES: u64 = 256 << 20;

/// The aggregate plus the thread that takes its consistency points.
pub struct Store {
    aggr: Aggregate,
    metrics: Arc<Metrics>,
    cp: Mutex<CpState>,
    cp_cv: Condvar,
}

#[derive(Default)]
struct CpState {
    /// CPs requested (by count): the CP thread runs until `done >= wanted`.
    wanted: u64,
    /// CPs completed.
    done: u64,
    /// The last CP's error, reported to every waiter of that CP.
    last_error: Option<String>,
    stop: bool,
}

impl Store {
    /// Opens `DATA_DIR/aggr0.img`, creating a sparse aggregate of
    /// `size_bytes` on first use.
    pub fn open(
        data_dir: &Path,
        size_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Store>> {
        let path = nvtarget_lun::cli::aggr_path(data_dir);
        let exists = std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let storage = FileStorage::open(&path, false)
            .with_context(|| format!("opening aggregate {}", path.display()))?;
        let aggr = if exists {
            Aggregate::open(storage)
                .with_context(|| format!("mounting aggregate {}", path.display()))?
        } else {
            Aggregate::create(
                storage,
                AggrOptions {
                    size_bytes,
                    ..Default::default()
                },
            )
            .with_context(|| format!("creating aggregate {}", path.display()))?
        };
        if let Some(why) = aggr.read_only_reason() {
            tracing::warn!(aggregate = %path.display(), reason = why, "aggregate mounted read-only");
        }
        let store = Arc::new(Store {
            aggr,
            metrics,
            cp: Mutex::new(CpState::default()),
            cp_cv: Condvar::new(),
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("cp".into())
            .spawn(move || cp_thread(weak))
            .context("starting the CP thread")?;
        Ok(store)
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
            None => {
                let id = self
                    .aggr
                    .create_lun_with_block_size(name, size, block_size)?;
                // Make the new LUN itself durable right away.
                self.checkpoint()?;
                Ok(id)
            }
        }
    }

    /// Takes a CP that starts after this call and waits for it.
    pub fn checkpoint(&self) -> Result<(), DevError> {
        let mut st = self.cp.lock();
        // A CP already running may have frozen its dirty set before our
        // writes: ask for one more than is in flight.
        let ticket = st.done + if st.wanted > st.done { 2 } else { 1 };
        st.wanted = st.wanted.max(ticket);
        self.cp_cv.notify_all();
        while st.done < ticket && !st.stop {
            self.cp_cv.wait(&mut st);
        }
        match &st.last_error {
            Some(e) => Err(DevError::Io(std::io::Error::other(e.clone()))),
            None => Ok(()),
        }
    }

    fn request_cp(&self) {
        let mut st = self.cp.lock();
        if st.wanted <= st.done {
            st.wanted = st.done + 1;
            self.cp_cv.notify_all();
        }
    }

    /// Flow control: past twice the CP threshold, a writer waits for a CP.
    fn throttle(&self) -> Result<(), DevError> {
        let dirty = self.aggr.dirty_bytes();
        if dirty > 2 * CP_DIRTY_BYTES {
            self.checkpoint()
        } else {
            if dirty > CP_DIRTY_BYTES {
                self.request_cp();
            }
            Ok(())
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.cp.lock().stop = true;
        self.cp_cv.notify_all();
    }
}

fn cp_thread(store: std::sync::Weak<Store>) {
    loop {
        let Some(s) = store.upgrade() else { return };
        {
            let mut st = s.cp.lock();
            if st.stop {
                return;
            }
            if st.wanted <= st.done {
                let _ = s.cp_cv.wait_for(&mut st, CP_INTERVAL);
                if st.stop {
                    return;
                }
                if st.wanted <= st.done {
                    // Timer: only worth a CP if something is dirty.
                    if s.aggr.dirty_bytes() == 0 {
                        continue;
                    }
                    st.wanted = st.done + 1;
                }
            }
        }
        let t0 = std::time::Instant::now();
        s.metrics.dirty_bytes.set(s.aggr.dirty_bytes() as i64);
        let r = s.aggr.cp(s.aggr.highest_seq());
        s.metrics.cp_duration.observe(t0.elapsed().as_secs_f64());
        s.metrics.dirty_bytes.set(s.aggr.dirty_bytes() as i64);
        let mut st = s.cp.lock();
        st.done += 1;
        match r {
            Ok(stats) => {
                s.metrics.cp_total.inc();
                st.last_error = None;
                tracing::debug!(
                    generation = stats.generation,
                    data_blocks = stats.data_blocks,
                    ms = t0.elapsed().as_millis() as u64,
                    "consistency point"
                );
            }
            Err(e) => {
                s.metrics.cp_failed.inc();
                tracing::error!(error = %e, "consistency point failed");
                st.last_error = Some(e.to_string());
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

    fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        let off = self.bytes(lba)?;
        self.store.throttle()?;
        self.store
            .aggr
            .write(self.lun, off, data)
            .map_err(|e| dev_err(e, lba))?;
        if fua {
            self.store.checkpoint()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        self.store.checkpoint()
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
        let off = self.bytes(lba)?;
        let len = self.bytes(blocks)?;
        self.store
            .aggr
            .unmap(self.lun, off, len)
            .map_err(|e| dev_err(e, lba))
    }

    fn thin(&self) -> bool {
        true
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
