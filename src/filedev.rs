//! A LUN backed by one sparse file.
//!
//! Holes are unmapped blocks: UNMAP punches a hole, GET LBA STATUS asks the
//! filesystem with SEEK_DATA/SEEK_HOLE, and an unwritten block reads as zeros.
//! Writes go to the page cache; FUA and SYNCHRONIZE CACHE call fdatasync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nvtarget_scsi::{BlockDevice, DevError, LbaStatus};
use rustix::fs::{fallocate, FallocateFlags};

pub struct FileDevice {
    file: File,
    block_size: u32,
    blocks: u64,
    /// Whether the filesystem supports punching holes (tmpfs, ext4, xfs do).
    can_punch: bool,
}

impl FileDevice {
    /// Opens (creating if needed) `path` as a device of `size` bytes. An
    /// existing smaller file is grown sparsely; a larger one is kept as is
    /// and its size is what the LUN reports (nothing is ever truncated away).
    pub fn open(path: &Path, size: u64, block_size: u32) -> io::Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            file.set_len(size)?;
        }
        let len = len.max(size);
        let can_punch = fallocate(
            &file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            len,
            0,
        )
        .is_ok()
            || probe_punch(&file, len);
        Ok(FileDevice {
            file,
            block_size,
            blocks: len / block_size as u64,
            can_punch,
        })
    }

    fn byte_range(&self, lba: u64, len: u64) -> Result<u64, DevError> {
        let end = lba
            .checked_mul(self.block_size as u64)
            .and_then(|o| o.checked_add(len));
        match end {
            Some(e) if e <= self.blocks * self.block_size as u64 => {
                Ok(lba * self.block_size as u64)
            }
            _ => Err(DevError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range past the end of the device",
            ))),
        }
    }
}

/// A zero-length punch is rejected by some kernels with EINVAL even where
/// punching works; punch one block past the end (a no-op) to find out.
fn probe_punch(file: &File, len: u64) -> bool {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        len,
        4096,
    )
    .is_ok()
}

impl BlockDevice for FileDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let off = self.byte_range(lba, buf.len() as u64)?;
        self.file.read_exact_at(buf, off)?;
        Ok(())
    }

    fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
        let off = self.byte_range(lba, data.len() as u64)?;
        self.file.write_all_at(data, off)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DevError> {
        self.file.sync_data()?;
        Ok(())
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
        let len = blocks
            .checked_mul(self.block_size as u64)
            .ok_or_else(|| DevError::Io(io::Error::other("unmap length overflows")))?;
        let off = self.byte_range(lba, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.can_punch {
            fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                off,
                len,
            )
            .map_err(io::Error::from)?;
        } else {
            // Without hole punching the blocks stay allocated but must still
            // read back as zeros.
            let zeros = vec![0u8; (len.min(1 << 20)) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], off + done)?;
                done += n as u64;
            }
        }
        Ok(())
    }

    fn thin(&self) -> bool {
        self.can_punch
    }

    fn lba_status(&self, lba: u64) -> Result<(LbaStatus, u64), DevError> {
        let bs = self.block_size as u64;
        let size = self.blocks * bs;
        let off = self.byte_range(lba, 0)?;
        if off >= size {
            return Ok((LbaStatus::Mapped, 1));
        }
        // SEEK_DATA from `off`: if data starts right here the extent is
        // mapped up to the next hole, otherwise deallocated up to the data.
        let data = seek(&self.file, rustix::fs::SeekFrom::Data(off)).unwrap_or(size);
        let (status, end) = if data == off {
            let hole = seek(&self.file, rustix::fs::SeekFrom::Hole(off)).unwrap_or(size);
            (LbaStatus::Mapped, hole)
        } else {
            (LbaStatus::Deallocated, data)
        };
        // Filesystems track holes in their own granularity; report whole
        // logical blocks, at least one.
        let end = end.min(size);
        let blocks = (end.saturating_sub(off) / bs).max(1);
        Ok((status, blocks))
    }
}

fn seek(file: &File, pos: rustix::fs::SeekFrom) -> Option<u64> {
    rustix::fs::seek(file, pos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_unmap_status() {
        let dir = std::env::temp_dir().join(format!("nvt-filedev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lun.img");
        let _ = std::fs::remove_file(&path);
        let dev = FileDevice::open(&path, 16 << 20, 512).unwrap();
        assert_eq!(dev.num_blocks(), 32768);
        let data = vec![0xabu8; 64 * 1024];
        dev.write(1024, &data, true).unwrap();
        let mut back = vec![0u8; 64 * 1024];
        dev.read(1024, &mut back).unwrap();
        assert_eq!(back, data);
        if dev.thin() {
            let (st, n) = dev.lba_status(0).unwrap();
            assert_eq!(st, LbaStatus::Deallocated);
            assert_eq!(n, 1024);
            let (st, _) = dev.lba_status(1024).unwrap();
            assert_eq!(st, LbaStatus::Mapped);
        }
        dev.unmap(1024, 128).unwrap();
        dev.read(1024, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(dev.read(32768 - 1, &mut vec![0u8; 1024]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
