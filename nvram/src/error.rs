//! The crate's one error type.
//!
//! Nothing read from the log is trusted: a bad record is never an `Error` of
//! `open` (it ends the scan and is described in the `ScanReport`); errors are
//! for what stops the log from working at all (I/O, an unreadable region
//! header) and for API misuse.

use std::io;

/// Errors of the NVRAM log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The medium failed (or, in tests, "lost power").
    #[error("nvram I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// The region header (offset 0) is not a valid nvtarget NVRAM header.
    /// The region is left untouched: an operator must look at it.
    #[error("not a usable nvtarget NVRAM region: {0}")]
    BadRegion(String),
    /// The configured region is too small for the layout.
    #[error("nvram region of {size} bytes is too small (minimum {min})")]
    RegionTooSmall { size: u64, min: u64 },
    /// A record larger than a whole log half can never be appended.
    #[error("record of {len} bytes does not fit in a log half ({capacity} bytes)")]
    RecordTooLarge { len: u64, capacity: u64 },
    /// `append`/`begin_cp` before the replay ticket was handed to `cp_done`.
    #[error("nvram log recovery not finished: replay, commit a CP, then cp_done(replay ticket)")]
    RecoveryPending,
    /// `begin_cp` while the previous ticket has not been given to `cp_done`.
    #[error("a consistency point is already in progress")]
    CpInProgress,
    /// `cp_done` with a ticket that is not the outstanding one.
    #[error("CP ticket {0} is not the consistency point in progress")]
    WrongTicket(u64),
    /// An earlier write or sync failed. Records after the failure may or may
    /// not be on the medium, so the log refuses all further work: reopen it
    /// and replay.
    #[error("nvram log failed earlier ({0}); reopen and replay")]
    Failed(String),
    /// A record listed by the scan no longer reads back intact during replay.
    #[error("record seq {seq} at offset {offset} changed since the scan")]
    ReplayChanged { seq: u64, offset: u64 },
    /// A partner-portion access outside the portion.
    #[error("partner access {offset}+{len} outside the partner portion ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
