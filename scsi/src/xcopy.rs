//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18).
//!
//! Supported: identification descriptor target descriptors (0xE4) naming
//! one of this target's LUs by its NAA designator, and block-to-block
//! segment descriptors (0x02). The whole parameter list is validated before
//! the first block moves, so a bad segment never leaves a half-done copy
//! behind a CHECK CONDITION for the header. Copies run synchronously; the
//! result is kept per (I_T nexus, list identifier) for RECEIVE COPY STATUS.

use std::sync::Arc;

use crate::cdb::be_at;
use crate::lu::{dev_sense, trunc, CmdResult, Cx, LogicalUnit, Reply};
use crate::sense::{Asc, Failure, Sense, SenseKey};

pub(crate) const MAX_TARGET_DESCRIPTORS: u16 = 2;
pub(crate) const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
pub(crate) const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
const TARGET_DESC_LEN: usize = 32;
const HEADER_LEN: usize = 16;
const CHUNK_BYTES: u64 = 1 << 20;

/// Result of a finished EXTENDED COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStatus {
    pub ok: bool,
    pub segments: u16,
    pub bytes: u64,
}

fn copy_aborted(asc: Asc) -> Failure {
    Failure::Check(Sense::new(SenseKey::COPY_ABORTED, asc))
}

struct Segment {
    src: usize,
    dst: usize,
    blocks: u64,
    src_lba: u64,
    dst_lba: u64,
}

impl LogicalUnit {
    pub(crate) fn extended_copy(&self, cx: &Cx<'_>) -> CmdResult {
        let plen = cx.cdb.be32(10) as usize;
        if plen == 0 {
            return Ok(Reply::good());
        }
        let Some(p) = cx.data_out().get(..plen) else {
            return Err(Sense::param_list_length().into());
        };
        if p.len() < HEADER_LEN {
            return Err(Sense::param_list_length().into());
        }
        let list_id = p[0];
        let usage = (p[1] >> 3) & 0x03;
        let tdl = be_at(p, 2, 2).unwrap_or(0) as usize;
        let sdl = be_at(p, 8, 4).unwrap_or(0) as usize;
        let inline = be_at(p, 12, 4).unwrap_or(0) as usize;
        if HEADER_LEN + tdl + sdl + inline > p.len() {
            return Err(Sense::param_list_length().into());
        }
        if (tdl + sdl) as u64 > u64::from(MAX_DESCRIPTOR_LIST_LENGTH) {
            return Err(Sense::param_list_length().into());
        }
        if inline != 0 {
            return Err(Sense::invalid_param(12).into());
        }
        if !tdl.is_multiple_of(TARGET_DESC_LEN) {
            return Err(Sense::param_list_length().into());
        }
        let ntgt = tdl / TARGET_DESC_LEN;
        if ntgt > usize::from(MAX_TARGET_DESCRIPTORS) {
            return Err(Sense::illegal_request(Asc::TOO_MANY_TARGET_DESCRIPTORS).into());
        }
        // Split the segment list first so the count is checked before types.
        let seg_list = &p[HEADER_LEN + tdl..HEADER_LEN + tdl + sdl];
        let mut segs_raw = Vec::new();
        let mut off = 0;
        while off < seg_list.len() {
            let len = be_at(seg_list, off + 2, 2).map_or(usize::MAX, |l| l as usize + 4);
            let Some(d) = seg_list.get(off..off.saturating_add(len)) else {
                return Err(Sense::param_list_length().into());
            };
            segs_raw.push((HEADER_LEN + tdl + off, d));
            off += len;
        }
        if segs_raw.len() > usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::illegal_request(Asc::TOO_MANY_SEGMENT_DESCRIPTORS).into());
        }
        let mut targets: Vec<Arc<LogicalUnit>> = Vec::with_capacity(ntgt);
        for i in 0..ntgt {
            let at = HEADER_LEN + i * TARGET_DESC_LEN;
            let d = &p[at..at + TARGET_DESC_LEN];
            if d[0] != 0xe4 {
                return Err(Sense::illegal_request(Asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE).into());
            }
            // Only block devices (peripheral type 0) can be copied.
            if d[1] & 0x1f != 0 {
                return Err(Sense::invalid_param(at as u16 + 1).into());
            }
            let dlen = usize::from(d[7]);
            let designator_type = d[5] & 0x0f;
            let id = d.get(8..8 + dlen).unwrap_or(&[]);
            let lu = if designator_type == 3 {
                cx.tgt.lu_by_naa(id)
            } else {
                None
            };
            match lu {
                Some(lu) => targets.push(lu),
                None => return Err(copy_aborted(Asc::UNREACHABLE_COPY_TARGET)),
            }
        }
        let mut segs = Vec::with_capacity(segs_raw.len());
        for (at, d) in &segs_raw {
            if d[0] != 0x02 {
                return Err(
                    Sense::illegal_request(Asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE).into(),
                );
            }
            if d.len() < 28 {
                return Err(Sense::invalid_param(*at as u16 + 2).into());
            }
            let src = be_at(d, 4, 2).unwrap_or(0) as usize;
            let dst = be_at(d, 6, 2).unwrap_or(0) as usize;
            if src >= targets.len() || dst >= targets.len() {
                return Err(copy_aborted(Asc::COPY_TARGET_DEVICE_NOT_REACHABLE));
            }
            let seg = Segment {
                src,
                dst,
                blocks: be_at(d, 10, 2).unwrap_or(0),
                src_lba: be_at(d, 12, 8).unwrap_or(0),
                dst_lba: be_at(d, 20, 8).unwrap_or(0),
            };
            let (s, t) = (&targets[seg.src], &targets[seg.dst]);
            if s.block_size() != t.block_size()
                || s.check_range(seg.src_lba, seg.blocks).is_err()
                || t.check_range(seg.dst_lba, seg.blocks).is_err()
            {
                return Err(copy_aborted(Asc::NO_ADDITIONAL_SENSE));
            }
            segs.push(seg);
        }
        for lu in &targets {
            lu.check_writable()?;
        }
        let mut status = CopyStatus {
            ok: true,
            segments: 0,
            bytes: 0,
        };
        let mut result = Ok(());
        for seg in &segs {
            match copy_segment(&targets[seg.src], &targets[seg.dst], seg) {
                Ok(b) => {
                    status.segments += 1;
                    status.bytes += b;
                }
                Err(e) => {
                    status.ok = false;
                    result = Err(Failure::Check(Sense::new(SenseKey::COPY_ABORTED, e.asc)));
                    break;
                }
            }
        }
        if usage != 0x03 {
            self.state
                .write()
                .copies
                .insert((cx.key.clone(), list_id), status);
        }
        result.map(|_| Reply::good())
    }

    pub(crate) fn receive_copy_results(&self, cx: &Cx<'_>) -> CmdResult {
        let alloc = cx.cdb.be32(10) as usize;
        let d = match cx.cdb.service_action() {
            0x00 => {
                let list_id = cx.cdb.u8(2);
                let st = self.state.read();
                let Some(c) = st.copies.get(&(cx.key.clone(), list_id)) else {
                    return Err(Sense::invalid_cdb(2).into());
                };
                let mut d = vec![0u8; 12];
                d[3] = 8;
                d[4] = if c.ok { 0x01 } else { 0x02 };
                d[5..7].copy_from_slice(&c.segments.to_be_bytes());
                d[7] = 0; // transfer count in bytes
                d[8..12].copy_from_slice(&u32::try_from(c.bytes).unwrap_or(u32::MAX).to_be_bytes());
                d
            }
            _ => {
                let mut d = vec![0u8; 46];
                d[0..4].copy_from_slice(&42u32.to_be_bytes());
                d[4] = 0x00; // SNLID: no LID4
                d[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
                d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
                d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
                let max_seg = (0xffff * self.block_size()).min(u64::from(u32::MAX)) as u32;
                d[16..20].copy_from_slice(&max_seg.to_be_bytes());
                d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
                d[36] = 1; // maximum concurrent copies
                d[37] = self.block_size().trailing_zeros() as u8; // data segment granularity
                d[43] = 2; // implemented descriptor list length
                d[44] = 0x02;
                d[45] = 0xe4;
                d
            }
        };
        Ok(Reply::data(trunc(d, alloc)))
    }
}

fn copy_segment(src: &LogicalUnit, dst: &LogicalUnit, seg: &Segment) -> Result<u64, Sense> {
    let bs = src.block_size();
    let per = (CHUNK_BYTES / bs).max(1);
    let mut done = 0;
    let mut buf = vec![0u8; (per.min(seg.blocks) * bs) as usize];
    while done < seg.blocks {
        let n = per.min(seg.blocks - done);
        let b = &mut buf[..(n * bs) as usize];
        src.dev().read(seg.src_lba + done, b).map_err(dev_sense)?;
        let _g = dst.io.read();
        dst.dev()
            .write(seg.dst_lba + done, b, false)
            .map_err(dev_sense)?;
        done += n;
    }
    Ok(done * bs)
}
