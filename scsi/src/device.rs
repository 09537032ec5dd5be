//! The storage a logical unit runs on.

/// Errors a block device reports; the command layer maps each to sense data.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Underlying I/O failed (MEDIUM ERROR / or HARDWARE ERROR).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A block failed its checksum (MEDIUM ERROR, UNRECOVERED READ ERROR).
    #[error("checksum mismatch at lba {lba}")]
    Checksum { lba: u64 },
    /// No space left to accept the write (DATA PROTECT,
    /// SPACE ALLOCATION FAILED WRITE PROTECT).
    #[error("no space")]
    NoSpace,
    /// The device is read only (DATA PROTECT, WRITE PROTECTED).
    #[error("read only")]
    ReadOnly,
}

/// Provisioning status of an extent (GET LBA STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbaStatus {
    Mapped,
    Deallocated,
    Anchored,
}

/// A linear array of logical blocks. Offsets and lengths are in logical
/// blocks of [`BlockDevice::block_size`] bytes; buffers are whole blocks.
/// Implementations are shared across connections and must be thread safe.
pub trait BlockDevice: Send + Sync {
    /// Logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;
    /// Number of logical blocks.
    fn num_blocks(&self) -> u64;
    /// Read `buf.len() / block_size` blocks starting at `lba`.
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError>;
    /// Write whole blocks at `lba`. With `fua`, the data is on stable storage
    /// when this returns.
    fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DevError>;
    /// Make every completed write stable.
    fn flush(&self) -> Result<(), DevError>;
    /// Deallocate blocks; they read back as zeros afterwards.
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError>;
    /// True once each time the backing store crosses its thin-provisioning
    /// soft threshold (the LU then raises THIN PROVISIONING SOFT THRESHOLD
    /// REACHED to every nexus). Polled after write-type commands.
    fn poll_soft_threshold(&self) -> bool {
        false
    }
    /// Whether `unmap` frees space (thin provisioning, LBPME).
    fn thin(&self) -> bool {
        false
    }
    /// Status of the extent starting at `lba`: its kind and length in blocks
    /// (at least 1, never past the end).
    fn lba_status(&self, lba: u64) -> Result<(LbaStatus, u64), DevError> {
        Ok((
            LbaStatus::Mapped,
            self.num_blocks().saturating_sub(lba).max(1),
        ))
    }
}
