//! nvtarget-nvram: the NVRAM log.
//!
//! A region file (`DATA_DIR/nvram.img`, default 256 MiB) holds this node's
//! log (the LOCAL portion, two halves) and room for the partner's mirrored
//! log (the PARTNER portion). Every write is appended as a checksummed record
//! before the initiator gets status; consistency points (CPs) of the block
//! store make records obsolete and their half is pruned and reused. After a
//! crash the records above the store's committed seq are replayed.
//!
//! This crate knows nothing about SCSI, the network or the block store: it
//! speaks records (op, LUN, LBA range, data) and seqs. The binary glues it to
//! the store: append (applying to the dirty cache in `append_with`) then
//! answer; a CP thread runs `begin_cp` -> store CP -> `cp_done`.
//!
//! Modules: [`record`] (record format), [`layout`] (region format),
//! [`medium`] (storage backends incl. fault injection), `mmap` (the mapped
//! file; the crate's only unsafe code), [`scan`] (recovery scan, report),
//! [`log`] (the log), [`dump`].
//!
//! ```text
//! Log::open_dir(dir, RegionConfig { size, durability }, committed_seq) -> (Log, Replay)
//! Log::open(Arc<dyn LogMedium>, durability, committed_seq) -> (Log, Replay)
//! replay.records() -> Iterator<Result<Record>>   replay.report   replay.take_ticket()
//! log.cp_done(recovery_ticket)                         // after the store committed it
//! log.append_with(&RecordMeta, data, |seq| apply) -> (Seq, R)    log.append(&meta, data) -> Seq
//! log.should_cp()  log.request_cp()  log.wait_cp_needed(timeout)
//! log.begin_cp() -> CpTicket   ticket.seq()   log.cp_done(ticket)
//! log.stats()  log.partner_read/partner_write/partner_sync
//! dump(path, &mut out, committed_seq)
//! ```
#![deny(unsafe_code)]

pub mod dump;
pub mod error;
pub mod layout;
pub mod log;
pub mod medium;
mod mmap;
pub mod record;
pub mod scan;

pub use dump::dump;
pub use error::{Error, Result};
pub use layout::{Layout, DEFAULT_REGION_SIZE, REGION_FILE};
pub use log::{
    region_path, Appended, CpTicket, Durability, Log, LogStats, RegionConfig, Replay,
    DEFAULT_CP_INTERVAL,
};
pub use medium::{CrashMode, FaultMedium, FileMedium, LogMedium};
pub use mmap::MmapMedium;
pub use record::{Op, Record, RecordMeta, Seq};
pub use scan::{HalfScan, RecordInfo, ScanReport, StopReason};
