//! An in-memory [`BlockDevice`]: the RAM-backed LUN option and the test
//! double for this crate.
//!
//! Data lives in one `Vec<u8>` behind a `RwLock`; a per-block `mapped`
//! bitmap records which blocks hold data so the device can act as thin
//! provisioned (UNMAP, GET LBA STATUS). Invariant: `data.len() ==
//! blocks * block_size` and `mapped.len() == blocks` at all times; an
//! unmapped block always reads back as zeros.

use parking_lot::RwLock;

use crate::device::{BlockDevice, DevError, LbaStatus};

#[derive(Debug)]
struct Inner {
    data: Vec<u8>,
    mapped: Vec<bool>,
}

/// A RAM disk. `thin` selects whether it reports thin provisioning.
#[derive(Debug)]
pub struct MemDevice {
    block_size: u32,
    thin: bool,
    inner: RwLock<Inner>,
}

impl MemDevice {
    /// A zeroed, thin-provisioned device of `blocks` blocks of
    /// `block_size` bytes, all unmapped.
    pub fn new(blocks: u64, block_size: u32) -> Self {
        Self::with_provisioning(blocks, block_size, true)
    }

    /// Like [`MemDevice::new`], choosing whether it reports thin
    /// provisioning.
    pub fn with_provisioning(blocks: u64, block_size: u32, thin: bool) -> Self {
        let bytes = (blocks as usize).saturating_mul(block_size as usize);
        Self {
            block_size,
            thin,
            inner: RwLock::new(Inner {
                data: vec![0; bytes],
                mapped: vec![false; blocks as usize],
            }),
        }
    }

    /// Grow or shrink (the target's `resize_lun` reports the change).
    pub fn resize(&self, blocks: u64) {
        let mut g = self.inner.write();
        g.data.resize(
            (blocks as usize).saturating_mul(self.block_size as usize),
            0,
        );
        g.mapped.resize(blocks as usize, false);
    }

    /// Whether `lba` currently holds data (tests).
    pub fn is_mapped(&self, lba: u64) -> bool {
        self.inner
            .read()
            .mapped
            .get(lba as usize)
            .copied()
            .unwrap_or(false)
    }

    fn range(&self, lba: u64, bytes: usize, len_blocks: usize) -> Result<(usize, usize), DevError> {
        let bs = self.block_size as usize;
        if !bytes.is_multiple_of(bs) {
            return Err(DevError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "buffer is not whole blocks",
            )));
        }
        let start = usize::try_from(lba).ok().and_then(|l| l.checked_mul(bs));
        match start.and_then(|s| s.checked_add(bytes).map(|e| (s, e))) {
            Some((s, e)) if e <= len_blocks * bs => Ok((s, e)),
            _ => Err(DevError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "beyond the end of the device",
            ))),
        }
    }
}

impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.inner.read().mapped.len() as u64
    }
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let g = self.inner.read();
        let (s, e) = self.range(lba, buf.len(), g.mapped.len())?;
        buf.copy_from_slice(&g.data[s..e]);
        Ok(())
    }
    fn write(&self, lba: u64, data: &[u8], _fua: bool) -> Result<(), DevError> {
        let mut g = self.inner.write();
        let (s, e) = self.range(lba, data.len(), g.mapped.len())?;
        g.data[s..e].copy_from_slice(data);
        let bs = self.block_size as usize;
        for m in &mut g.mapped[s / bs..e / bs] {
            *m = true;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DevError> {
        Ok(())
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
        let mut g = self.inner.write();
        let bs = self.block_size as usize;
        let bytes = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(bs))
            .ok_or_else(|| DevError::Io(std::io::Error::other("unmap too large")))?;
        let (s, e) = self.range(lba, bytes, g.mapped.len())?;
        g.data[s..e].fill(0);
        for m in &mut g.mapped[s / bs..e / bs] {
            *m = false;
        }
        Ok(())
    }
    fn thin(&self) -> bool {
        self.thin
    }
    fn lba_status(&self, lba: u64) -> Result<(LbaStatus, u64), DevError> {
        let g = self.inner.read();
        let start = lba as usize;
        let Some(&first) = g.mapped.get(start) else {
            return Err(DevError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "beyond the end of the device",
            )));
        };
        if !self.thin {
            return Ok((LbaStatus::Mapped, (g.mapped.len() - start) as u64));
        }
        let run = g.mapped[start..]
            .iter()
            .take_while(|&&m| m == first)
            .count();
        let kind = if first {
            LbaStatus::Mapped
        } else {
            LbaStatus::Deallocated
        };
        Ok((kind, run as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_unmap() {
        let d = MemDevice::new(16, 512);
        d.write(2, &[7u8; 1024], false).unwrap();
        let mut b = [0u8; 512];
        d.read(3, &mut b).unwrap();
        assert_eq!(b, [7u8; 512]);
        assert_eq!(d.lba_status(0).unwrap(), (LbaStatus::Deallocated, 2));
        assert_eq!(d.lba_status(2).unwrap(), (LbaStatus::Mapped, 2));
        d.unmap(2, 1).unwrap();
        d.read(2, &mut b).unwrap();
        assert_eq!(b, [0u8; 512]);
        assert!(d.read(16, &mut b).is_err());
        assert!(d.write(15, &[0u8; 1024], false).is_err());
    }
}
