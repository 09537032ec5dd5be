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
//! injection), `alloc` (reference counts, placement), [`aggregate`] (the
//! store), `cp` (building a consistency point), [`check`] (verification),
//! [`cli`] (`nvtarget snapshot|aggr` subcommands).
//!
//! API in one screen (all `&self`; `Aggregate` is `Send + Sync`):
//!
//! ```text
//! Aggregate::create(storage, AggrOptions { size_bytes, soft_threshold_pct }) / open(storage)
//! create_lun(name, size) -> LunId      create_lun_with_block_size(name, size, 512|4096)
//! delete_lun(id)  resize_lun(id, bigger)  luns()  lun(id)  lun_by_name(name)
//! read(id, off, &mut buf)  write(id, off, &data)  unmap(id, off, len)   // 512-aligned bytes
//! lba_status(id, off) -> LbaStatus { mapped, len_bytes }
//! cp(highest_seq) -> CpStats   note_applied_seq(seq)   generation()  highest_seq()  dirty_bytes()
//! snapshot_create(id, name)  snapshot_list(Some(id) | None)  snapshot_delete(id, name)
//! snapshot_restore(id, name)  clone_lun(id, snap, new_name)  read_snapshot(snap_id, off, buf)
//! space() -> SpaceReport   soft_threshold_reached()   poll_soft_threshold()   check() -> CheckReport
//! ```
//!
//! Durability: `write`/`unmap` are durable after the next `cp`; admin calls
//! (LUN and snapshot operations) run their own CP and are durable on return.
//! `cp(seq)` records `seq` as the highest NVRAM log sequence contained;
//! admin CPs record the seq last given to `note_applied_seq` (the log layer
//! must call it as it applies records, since replaying writes on top of a
//! restored snapshot would be wrong).
#![forbid(unsafe_code)]

pub mod aggregate;
mod alloc;
pub mod check;
pub mod cli;
mod cp;
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
