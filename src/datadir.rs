//! One process at a time owns a data directory.
//!
//! `serve` holds an exclusive lock on `DATA_DIR/nvtarget.lock` for its whole
//! life; offline tools (`snapshot`, `aggr`) take the same lock, so they can
//! never open the aggregate under a running target and corrupt it. The lock
//! is released by the kernel when the process ends, even by SIGKILL.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::Context;
use rustix::fs::{flock, FlockOperation};

pub struct DataDirLock {
    _file: File,
}

pub fn lock(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join("nvtarget.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow::anyhow!(
            "{} is in use by another nvtarget process (a running `nvtarget serve`?); \
             stop it first or use another --data-dir",
            data_dir.display()
        )
    })?;
    Ok(DataDirLock { _file: file })
}
