//! nvtarget-takeover: what the partner node does with the owner's mirrored
//! NVRAM log.
//!
//! - [`DependencyIndex`]: per owner LUN, which logged record last wrote each
//!   block; answers "can this read be served from the log?" (live replay).
//! - [`ReplayPlan`]: which records must be replayed at takeover, in which
//!   partial order (overlapping records in seq order, the rest in parallel),
//!   and which may be skipped because later records overwrite them entirely.
//! - [`execute`]: runs a plan on a small thread pool.
//! - [`TakeoverPlan`]: the takeover sequence as a dependency graph of timed
//!   steps supplied by the binary.
//!
//! The crate knows nothing about sockets, SCSI or the log's byte format: the
//! caller maps its log records to [`RecordMeta`] and applies them itself.
//!
//! ```
//! use nvtarget_takeover::{execute, DependencyIndex, Op, RecordMeta, ReplayPlan};
//!
//! let w = |seq, lba, blocks| RecordMeta { seq, lun: 0, lba, blocks, op: Op::Write, location: seq * 8192 };
//! let log = [w(1, 0, 8), w(2, 4, 8), w(3, 100, 1)];
//!
//! // Partner, normal operation: index as records arrive, serve covered reads.
//! let mut index = DependencyIndex::new();
//! for r in &log {
//!     index.insert(r).unwrap();
//! }
//! let pieces = index.covers(0, 2, 6).unwrap();
//! assert_eq!(pieces.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
//! assert!(index.covers(0, 12, 2).is_none()); // block 12 not logged: ask the owner
//!
//! // Takeover: plan what the last prune left, replay on two threads.
//! let plan = ReplayPlan::build(&log, 0);
//! assert_eq!(plan.stats().edges, 1); // seq 2 waits for seq 1; seq 3 is free
//! let stats = execute(&plan, 2, |r| -> Result<(), std::io::Error> { Ok(()) }).unwrap();
//! assert_eq!(stats.applied, 3);
//! ```
#![forbid(unsafe_code)]

mod executor;
mod extent_map;
mod index;
mod plan;
mod steps;

pub use executor::{execute, ReplayError, ReplayStats, MAX_THREADS};
pub use index::{DependencyIndex, IndexError, Piece};
pub use plan::{MetaBarrier, PlanOptions, PlanStats, ReplayPlan};
pub use steps::{StepId, StepOutcome, StepReport, TakeoverError, TakeoverPlan, TakeoverReport};

/// Names of the steps of [`TakeoverPlan::standard`], as they appear in a
/// [`TakeoverReport`].
pub mod step_names {
    pub use crate::steps::{
        FENCE, FLIP_ALUA, OPEN_AGGREGATE, REPLAY_LOG, RESTORE_STATE, SERVE, TAKE_OVER_ADDRESS,
    };
}

/// What a logged record did. Mirrors the NVRAM log's op codes without
/// depending on the log crate: its data ops (WRITE, WRITE_SAME, UNMAP,
/// COMPARE_AND_WRITE) map one to one, every other op (reservation state, LUN
/// create/resize/delete/clone, snapshot create/delete/restore, and any op
/// this build does not know) maps to [`Op::Meta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Data for every block of the range follows the header.
    Write,
    /// One block of data, repeated over the range.
    WriteSame,
    /// The range reads back as zeros afterwards (LBPRZ=1 semantics).
    Unmap,
    /// The write half of a COMPARE AND WRITE whose compare succeeded on the
    /// owner: the owner logs it only after the compare, so replay applies it
    /// unconditionally, like a [`Op::Write`].
    CompareAndWrite,
    /// A non-data change to the LUN (persistent reservation, LUN attribute,
    /// snapshot...): carries no blocks for reads and orders replay (a barrier,
    /// see [`MetaBarrier`]).
    Meta,
}

impl Op {
    /// Whether the record changes block contents.
    pub fn writes_blocks(self) -> bool {
        !matches!(self, Op::Meta)
    }
}

/// The metadata of one logged record, as the partner indexed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordMeta {
    /// Log sequence number: strictly increasing on the owner, unique.
    pub seq: u64,
    pub lun: u32,
    pub lba: u64,
    pub blocks: u32,
    pub op: Op,
    /// Offset of the record in the log region.
    pub location: u64,
}

impl RecordMeta {
    /// Exclusive end of the LBA range. Saturates rather than wraps: a range
    /// reaching past `u64::MAX` is clipped (no real LUN is that large, and a
    /// corrupt header must not make the index panic).
    pub fn end(&self) -> u64 {
        self.lba.saturating_add(u64::from(self.blocks))
    }
}
