//! The crate's one error type. Every failure of the block store is one of these
//! variants; the SCSI layer maps them to sense data (`Checksum` -> MEDIUM ERROR /
//! UNRECOVERED READ ERROR, `NoSpace` -> SPACE ALLOCATION FAILED WRITE PROTECT,
//! `OutOfRange` -> LBA OUT OF RANGE, ...).

/// Errors of the block store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage backend failed (or, in tests, "lost power").
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A block's contents do not match the checksum kept in the pointer to it.
    /// Never returned together with data: the caller gets this instead.
    #[error("checksum mismatch in {what} block {block}")]
    Checksum { what: &'static str, block: u64 },
    /// On-disk metadata is inconsistent (bad pointer, bad catalog, ...).
    #[error("corrupt aggregate: {0}")]
    Corrupt(String),
    /// Neither superblock slot holds a valid superblock.
    #[error("not an nvtarget aggregate (no valid superblock)")]
    NoSuperblock,
    /// The aggregate cannot reserve space for this write (thin provisioning
    /// exhausted). Nothing was changed.
    #[error("no space left in the aggregate")]
    NoSpace,
    #[error("no such LUN: {0}")]
    NoSuchLun(String),
    #[error("no such snapshot: {0}")]
    NoSuchSnapshot(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Offset/length outside the LUN (or not 512-byte aligned).
    #[error("out of range: offset {offset} length {len} on a LUN of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The aggregate was opened read-only because damaged metadata was found
    /// at mount: modifying it could overwrite blocks still referenced from the
    /// unreadable part.
    #[error("aggregate is read-only: {0}")]
    ReadOnly(String),
    /// A consistency point failed half-way; in-memory allocation state no
    /// longer matches the disk. The aggregate must be re-opened (the NVRAM log
    /// replays everything since the last committed CP).
    #[error("aggregate failed after an error during a consistency point; re-open it")]
    Failed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
