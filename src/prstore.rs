//! Persistent-reservation state with APTPL, kept in a small file per LUN.
//! Written to a temporary file, synced, then renamed over the old one, so a
//! crash leaves either the old or the new state.

use std::io::Write;
use std::path::PathBuf;

pub struct FilePrStore {
    path: PathBuf,
}

impl FilePrStore {
    pub fn new(path: PathBuf) -> Self {
        FilePrStore { path }
    }
}

impl nvtarget_scsi::PrStore for FilePrStore {
    fn save(&self, data: &[u8]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}
