//! nvtarget-lun: the write-anywhere (copy-on-write) block store.
//!
//! An *aggregate* (a file or block device of 4 KiB blocks) holds many thin
//! LUNs. Writes land in an in-memory dirty set; a *consistency point* (CP)
//! writes them to free blocks, rewrites the block map copy-on-write up to new
//! roots and commits by writing one of two checksummed superblocks. Every
//! pointer carries the checksum of the block it points at. Snapshots and clones
//! share blocks through reference counts rebuilt at mount.
//!
//! This crate knows nothing about SCSI or the network: it speaks byte offsets
//! (512-byte aligned) and returns [`Error`]s the SCSI layer maps to sense data.
//!
//! Modules: [`layout`] (on-disk format), [`storage`] (backends incl. fault
//! injection), `alloc` (reference counts), [`aggregate`] (the store),
//! [`check`] (verification), [`cli`] (`nvtarget snapshot|aggr` subcommands).
#![forbid(unsafe_code)]

pub mod aggregate;
mod alloc;
pub mod check;
pub mod cli;
pub mod error;
pub mod layout;
pub mod storage;

pub use aggregate::{
    AggrOptions, Aggregate, CpStats, LbaStatus, LunInfo, LunSpace, SnapshotInfo, SpaceReport,
    SECTOR,
};
pub use check::CheckReport;
pub use error::{Error, Result};
pub use layout::{LunId, SnapId, BLOCK_SIZE};
pub use storage::{CrashMode, FaultStorage, FileStorage, Storage};
