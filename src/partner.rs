//! The partner's LUNs as seen through this node's portal (ALUA
//! active/non-optimized): reads whose whole range is in the mirrored log are
//! answered from it ("live replay", newest seq per block); everything else
//! is forwarded to the owner over the interconnect and executed there with
//! the initiator's own I_T nexus, so reservations, unit attentions and ALUA
//! answers stay the owner's.
//!
//! Freshness: the owner answers a write only after this node indexed it, so
//! a read served here after that answer sees it. A record's bytes are
//! checked against the seq the index names before and after they are read
//! (the owner reuses a log half after a CP and the PRUNE may arrive late),
//! and any mismatch falls back to forwarding.
//!
//! Known limit: a live-replayed read does not see a unit attention or a
//! reservation held on the owner (the owner answers everything else).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use nvtarget_iscsi::{Command, Completion};
use nvtarget_nvram::record::{parse_header, RECORD_HEADER_LEN};
use nvtarget_scsi::ItNexus;
use nvtarget_takeover::{DependencyIndex, Op};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::proxy::{ForwardedNexus, ProxyClient, ProxyRequest};
use crate::storedev::Store;

/// Published by each pair node in its data directory: how its targets'
/// LUNs map to aggregate LUN ids (what log records carry).
pub const LUN_MAP_FILE: &str = "luns.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LunMapEntry {
    pub target: String,
    pub lun: u64,
    pub aggr_lun: u32,
    pub block_size: u32,
}

/// Counters for status and the bench, and whether the index may answer.
#[derive(Default)]
pub struct PartnerStats {
    /// The owner announces it is mirroring to us (heartbeat state SERVING)
    /// and is not silent. While it runs unmirrored (or we cannot tell), it
    /// may acknowledge writes our index never sees: no live replay then.
    pub owner_mirrored: std::sync::atomic::AtomicBool,
    pub live_reads: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_errors: AtomicU64,
    /// The partner's CPs cover every seq up to this one: our index no
    /// longer holds them (set after the index is pruned).
    pub pruned_seq: AtomicU64,
}

/// One of the partner's targets, presented here.
pub struct RemoteTarget {
    pub name: String,
    proxy: ProxyClient,
    index: Arc<Mutex<DependencyIndex>>,
    /// Our store: its PARTNER portion holds the partner's records.
    own: Arc<Store>,
    partner_dir: PathBuf,
    lun_map: Mutex<HashMap<u64, (u32, u32)>>,
    pub stats: Arc<PartnerStats>,
}

impl RemoteTarget {
    pub fn new(
        name: String,
        proxy: ProxyClient,
        index: Arc<Mutex<DependencyIndex>>,
        own: Arc<Store>,
        partner_dir: PathBuf,
        stats: Arc<PartnerStats>,
    ) -> RemoteTarget {
        RemoteTarget {
            name,
            proxy,
            index,
            own,
            partner_dir,
            lun_map: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// Runs one command: from the log if it can, else on the owner.
    pub async fn execute(&self, cmd: &Command, nexus: &ItNexus) -> Completion {
        let in_sync = self.stats.owner_mirrored.load(Ordering::Acquire);
        if let Some(c) = in_sync.then(|| self.live_read(cmd)).flatten() {
            self.stats.live_reads.fetch_add(1, Ordering::Relaxed);
            return c;
        }
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let req = ProxyRequest {
            tmf: 0,
            target: self.name.clone(),
            lun: nvtarget_iscsi::lun_id(cmd.lun),
            cdb: cmd.cdb.clone(),
            attr: crate::portal::scsi_attr(cmd.attr),
            data_out: cmd.data_out.clone(),
            expected_in_len: cmd.expected_in_len,
            nexus: ForwardedNexus::from(nexus),
        };
        match self.proxy.execute(req).await {
            Ok(r) => Completion {
                status: r.status,
                sense: r.sense,
                data_in: r.data,
                transfer_len: None,
            },
            Err(e) => {
                self.stats.forward_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target = %self.name, error = %e, "forwarding to the owner failed");
                // NOT READY, ASYMMETRIC ACCESS STATE TRANSITION: the
                // initiator retries (on this path after a takeover).
                Completion {
                    status: 0x02,
                    sense: nvtarget_iscsi::transport_sense(0x02, 0x04, 0x0a),
                    ..Completion::default()
                }
            }
        }
    }

    /// Runs a task management function (`proxy::TMF_*`) on the owner for
    /// this nexus, so its side effects (RESERVE(6) released, unit
    /// attentions for the other nexuses, ...) happen where the LU lives.
    /// `None` when the owner cannot be reached.
    pub async fn task_mgmt(&self, tmf: u8, lun: u64, nexus: &ItNexus) -> Option<u8> {
        let req = ProxyRequest {
            tmf,
            target: self.name.clone(),
            lun,
            cdb: Bytes::new(),
            attr: nvtarget_scsi::TaskAttr::Simple,
            data_out: Bytes::new(),
            expected_in_len: 0,
            nexus: ForwardedNexus::from(nexus),
        };
        match self.proxy.execute(req).await {
            Ok(r) => Some(r.status),
            Err(e) => {
                self.stats.forward_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target = %self.name, error = %e, "forwarding task management to the owner failed");
                None
            }
        }
    }

    fn lun(&self, lun: u64) -> Option<(u32, u32)> {
        if let Some(v) = self.lun_map.lock().get(&lun) {
            return Some(*v);
        }
        let text = std::fs::read_to_string(self.partner_dir.join(LUN_MAP_FILE)).ok()?;
        let entries: Vec<LunMapEntry> = serde_json::from_str(&text).ok()?;
        let mut map = self.lun_map.lock();
        for e in entries.iter().filter(|e| e.target == self.name) {
            map.insert(e.lun, (e.aggr_lun, e.block_size));
        }
        map.get(&lun).copied()
    }

    /// READ(10)/READ(16) wholly covered by the mirrored log.
    fn live_read(&self, cmd: &Command) -> Option<Completion> {
        if cmd.attr != nvtarget_iscsi::TaskAttr::Simple {
            return None;
        }
        let cdb = &cmd.cdb[..];
        let (lba, blocks) = match cdb.first()? {
            0x28 => (
                u32::from_be_bytes(cdb.get(2..6)?.try_into().ok()?) as u64,
                u16::from_be_bytes(cdb.get(7..9)?.try_into().ok()?) as u32,
            ),
            0x88 => (
                u64::from_be_bytes(cdb.get(2..10)?.try_into().ok()?),
                u32::from_be_bytes(cdb.get(10..14)?.try_into().ok()?),
            ),
            _ => return None,
        };
        // RDPROTECT and friends: let the owner answer. A range that wraps
        // past 2^64 is the owner's to refuse (LBA OUT OF RANGE).
        if cdb.get(1)? & 0xe0 != 0 || blocks == 0 || lba.checked_add(blocks as u64).is_none() {
            return None;
        }
        let (aggr_lun, bs) = self.lun(nvtarget_iscsi::lun_id(cmd.lun))?;
        let len = blocks as u64 * bs as u64;
        if len != cmd.expected_in_len as u64 || len > 16 << 20 {
            return None;
        }
        let pieces = self.index.lock().covers(aggr_lun, lba, blocks)?;
        let log = self.own.log();
        let mut out = vec![0u8; len as usize];
        for p in &pieces {
            let at = ((p.lba - lba) * bs as u64) as usize;
            let n = (p.blocks * bs as u64) as usize;
            let dst = out.get_mut(at..at + n)?;
            let check = || -> Option<()> {
                let mut head = [0u8; RECORD_HEADER_LEN];
                log.partner_read(p.location, &mut head).ok()?;
                let h = parse_header(&head).ok()?;
                (h.seq == p.seq).then_some(())
            };
            check()?;
            let data = p.location + RECORD_HEADER_LEN as u64;
            match p.op {
                Op::Write | Op::CompareAndWrite => {
                    log.partner_read(data + p.offset_blocks * bs as u64, dst)
                        .ok()?;
                }
                Op::WriteSame => {
                    let mut one = vec![0u8; bs as usize];
                    log.partner_read(data, &mut one).ok()?;
                    for c in dst.chunks_mut(bs as usize) {
                        c.copy_from_slice(&one[..c.len()]);
                    }
                }
                Op::Unmap => dst.fill(0),
                Op::Meta => return None,
            }
            // Still the same record after the copy.
            check()?;
        }
        Some(Completion {
            status: 0,
            sense: Bytes::new(),
            data_in: Bytes::from(out),
            transfer_len: None,
        })
    }
}

/// Writes `DATA_DIR/luns.json` for the partner's live replay.
pub fn publish_lun_map(dir: &std::path::Path, entries: &[LunMapEntry]) {
    crate::ha::write_json(dir, LUN_MAP_FILE, &entries);
}
