//! The crate's one error type.
//!
//! Every error concerning what a peer sent ends that path (the driver closes
//! the connection; nothing is acknowledged from a path after its first bad
//! byte). Errors are `Clone + Eq` so they can travel inside events and be
//! compared in tests.

use crate::frame::{GoodbyeReason, MsgType};
use nvtarget_nvram::Seq;

/// Errors of the mirror protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("frame: bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("frame: unsupported version {0}")]
    BadVersion(u8),
    #[error("frame {0:?}: reserved bytes not zero")]
    Reserved(MsgType),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("frame checksum mismatch")]
    BadCrc,
    #[error("frame {ty:?}: {what}")]
    Malformed { ty: MsgType, what: &'static str },
    #[error("record seq {seq}: {what}")]
    BadRecord { seq: Seq, what: String },
    #[error("first frame on a path must be HELLO, got {0:?}")]
    NoHello(MsgType),
    #[error("unexpected {0:?} frame for this side of the mirror")]
    Unexpected(MsgType),
    #[error("peer rejected: {0}")]
    PeerMismatch(String),
    #[error("peer epoch {peer} is below the fenced epoch {min}")]
    StaleEpoch { peer: u64, min: u64 },
    #[error("peer said goodbye: {0:?}")]
    Goodbye(GoodbyeReason),
    #[error("record seq {seq} at {offset}+{len} outside the {region} byte region")]
    OutOfRegion {
        seq: Seq,
        offset: u64,
        len: u64,
        region: u64,
    },
    #[error("out-of-order window full ({0} records ahead of the contiguous seq)")]
    ReorderFull(usize),
    #[error("path {0} does not exist (configured paths: {1})")]
    NoSuchPath(usize, usize),
    #[error("submit seq {seq}, expected {expected} (seqs are consecutive)")]
    SeqGap { seq: Seq, expected: Seq },
    #[error("record of {len} bytes exceeds the frame limit {max}")]
    RecordTooLarge { len: u64, max: u64 },
    #[error("partner store failed: {0}")]
    Store(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
