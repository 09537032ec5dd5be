//! Recovery scan: what the log holds, where each half's records stop and why,
//! and which records a restart must replay.
//!
//! A half's records of its current use start right after its header at
//! `first_seq` and have consecutive seqs (writes switch halves only at a CP,
//! and seqs are handed out in order). The scan walks them and stops at the
//! first position that does not hold exactly the next seq with a valid
//! checksum. Why it stopped tells a clean end from damage:
//!
//! * zeroed bytes, a valid record with an *older* seq (left over from an
//!   earlier use of the half), or the end of the half: the clean end;
//! * a header with the expected seq but a bad checksum and nothing valid
//!   after it: a torn last write (never acknowledged);
//! * anything bad followed, later in the half, by valid records with newer
//!   seqs: corruption (acknowledged records may be lost; loud);
//! * unrecognised non-zero bytes with nothing newer after them: ambiguous
//!   (left over from an earlier use, or a corrupt last record) and reported.
//!
//! Nothing at or after a stop is ever replayed. The replay is the run of
//! consecutive seqs starting right after the *floor* (the caller's committed
//! seq, or a half's pruned seq if higher); a gap ends it.

use crate::error::{Error, Result};
use crate::layout::{HalfHeader, HalfUse, Layout, HALF_HEADER_LEN};
use crate::medium::LogMedium;
use crate::record::{
    self, DecodeError, RecordHeader, RecordMeta, Seq, RECORD_ALIGN, RECORD_HEADER_LEN,
};
use std::fmt;

/// Where a record is, and what it says (no data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    pub seq: Seq,
    pub meta: RecordMeta,
    pub data_len: u32,
    /// Absolute offset of the record in the region.
    pub offset: u64,
    pub half: usize,
}

/// Why a half's scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The half header has no records (`first_seq` 0), or is unreadable.
    NoRecords,
    /// Zeroed bytes: never written.
    Zeroed,
    /// A valid record of an earlier use of the half (seq below the expected).
    Stale { seq: Seq },
    /// No room for another record before the end of the half.
    HalfEnd,
    /// The region file ends here (it was truncated).
    Truncated,
    /// The next record is damaged and nothing newer follows: the last write
    /// was torn (a crash while it was being written; never acknowledged).
    Torn { detail: String },
    /// Damaged bytes followed by newer valid records (up to `newer_seq`):
    /// either several writes were in flight at a crash (none of them was
    /// acknowledged: acknowledgement waits for every earlier record) or the
    /// medium corrupted an acknowledged record.
    Corrupt { detail: String, newer_seq: Seq },
    /// Non-zero bytes that are not a record, nothing newer after them:
    /// leftovers of an earlier use, or a corrupt last record.
    Unrecognized { detail: String },
    /// A valid record with a seq above the expected one: a record is missing.
    Gap { expected: Seq, found: Seq },
}

impl StopReason {
    /// A clean end: nothing suggests lost or damaged records.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            StopReason::NoRecords
                | StopReason::Zeroed
                | StopReason::Stale { .. }
                | StopReason::HalfEnd
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::NoRecords => f.write_str("no records in this use of the half"),
            StopReason::Zeroed => f.write_str("end of log (zeroed)"),
            StopReason::Stale { seq } => {
                write!(f, "end of log (older record seq {seq} from an earlier use)")
            }
            StopReason::HalfEnd => f.write_str("end of half"),
            StopReason::Truncated => f.write_str("TRUNCATED: region file ends here"),
            StopReason::Torn { detail } => write!(f, "torn last record: {detail}"),
            StopReason::Corrupt { detail, newer_seq } => {
                write!(
                    f,
                    "DAMAGED: {detail}; newer records up to seq {newer_seq} follow and are NOT replayed \
                     (in flight at a crash, or corruption)"
                )
            }
            StopReason::Unrecognized { detail } => {
                write!(
                    f,
                    "unrecognized bytes ({detail}): end of log, or a corrupt last record"
                )
            }
            StopReason::Gap { expected, found } => {
                write!(f, "CORRUPT: expected seq {expected}, found seq {found}")
            }
        }
    }
}

/// The scan of one half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HalfScan {
    pub half: usize,
    /// The newest valid header slot; `None` if neither slot is valid.
    pub header: Option<HalfHeader>,
    /// Records of the half's current use, in seq order (all valid).
    pub records: Vec<RecordInfo>,
    /// Absolute offset where the scan stopped (the next record would go here).
    pub stop_offset: u64,
    pub stop: StopReason,
    /// Highest seq of any valid record anywhere in the half (including stale
    /// ones and ones past a stop): new seqs are issued above it, so a
    /// leftover record can never be mistaken for a new one.
    pub max_seen_seq: Seq,
}

impl HalfScan {
    pub fn first_seq(&self) -> Option<Seq> {
        self.records.first().map(|r| r.seq)
    }
    pub fn last_seq(&self) -> Option<Seq> {
        self.records.last().map(|r| r.seq)
    }
    /// The half was pruned after its records were written: whatever the
    /// scan found there (damage included) was already dealt with by a CP.
    pub fn is_pruned_history(&self) -> bool {
        self.header.is_some_and(|h| {
            h.state == HalfUse::Free && self.last_seq().is_none_or(|l| l <= h.pruned_seq)
        })
    }
}

/// Everything `open` (and `dump`) learned from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanReport {
    pub layout: Layout,
    pub halves: [HalfScan; 2],
    /// The seq the caller said its store has committed.
    pub committed_seq: Seq,
    /// Replay starts after this: max(committed_seq, halves' pruned_seq).
    pub floor: Seq,
    /// First and last replayed seq, if any.
    pub replay_range: Option<(Seq, Seq)>,
    /// Records above the floor that are NOT replayed because a gap precedes
    /// them: (expected seq, first seq found after the gap, count skipped).
    pub gap: Option<(Seq, Seq, usize)>,
    /// The store's committed seq is below what the log says was pruned: the
    /// store is older than the log (records between were discarded).
    pub store_behind_log: bool,
    /// Region file length before `open` repaired it, if it was short.
    pub truncated_file_len: Option<u64>,
    /// The highest seq seen anywhere; the next appended record gets a higher one.
    pub max_seen_seq: Seq,
}

impl ScanReport {
    /// True if nothing suggests damage (every stop is a clean end, no gap, no truncation).
    pub fn is_clean(&self) -> bool {
        self.halves
            .iter()
            .all(|h| h.header.is_some() && (h.stop.is_clean() || h.is_pruned_history()))
            && self.gap.is_none()
            && self.truncated_file_len.is_none()
            && !self.store_behind_log
    }

    /// Every problem, one line each (for the log at startup).
    pub fn problems(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(len) = self.truncated_file_len {
            v.push(format!(
                "region file was truncated to {len} bytes (expected {}); extended with zeros",
                self.layout.size
            ));
        }
        for h in &self.halves {
            if h.header.is_none() {
                v.push(format!(
                    "half {}: no valid header; its records are not replayed",
                    h.half
                ));
            } else if !h.stop.is_clean() {
                let note = if h.is_pruned_history() {
                    " (half already pruned: nothing is replayed from it)"
                } else {
                    ""
                };
                v.push(format!(
                    "half {}: scan stopped at offset {}: {}{note}",
                    h.half, h.stop_offset, h.stop
                ));
            }
        }
        if let Some((expected, found, n)) = self.gap {
            v.push(format!(
                "gap in the log: expected seq {expected}, next found is {found}; {n} later record(s) not replayed"
            ));
        }
        if self.store_behind_log {
            v.push(format!(
                "store committed seq {} is below the log's pruned seq {}: the store is older than the log",
                self.committed_seq, self.floor
            ));
        }
        v
    }
}

/// Reads half `i` into memory (as much of it as the medium holds) and scans it.
pub(crate) fn scan_half(medium: &dyn LogMedium, layout: &Layout, i: usize) -> Result<HalfScan> {
    let base = layout.half_off(i);
    let avail = medium.len().saturating_sub(base).min(layout.half_size);
    let mut buf = vec![0u8; avail as usize];
    medium
        .read_at(base, &mut buf)
        .map_err(Error::io("reading a log half"))?;
    Ok(scan_half_buf(&buf, layout, i))
}

/// Scans a half given its bytes (`buf` may be shorter than the half if the
/// region file is truncated).
pub(crate) fn scan_half_buf(buf: &[u8], layout: &Layout, i: usize) -> HalfScan {
    let base = layout.half_off(i);
    let half_len = layout.half_size as usize;
    let header = buf
        .get(..HALF_HEADER_LEN as usize)
        .and_then(|b| HalfHeader::decode_block(b, i as u32));
    let mut scan = HalfScan {
        half: i,
        header,
        records: Vec::new(),
        stop_offset: base + HALF_HEADER_LEN,
        stop: StopReason::NoRecords,
        max_seen_seq: 0,
    };
    let first = match header {
        Some(h) if h.first_seq != 0 => h.first_seq,
        _ => {
            scan.max_seen_seq = max_valid_seq(buf, HALF_HEADER_LEN as usize);
            if buf.len() < HALF_HEADER_LEN as usize {
                scan.stop = StopReason::Truncated;
            }
            return scan;
        }
    };
    let mut off = HALF_HEADER_LEN as usize;
    let mut expected = first;
    let stop = loop {
        if off + RECORD_HEADER_LEN > half_len {
            break StopReason::HalfEnd;
        }
        if off + RECORD_HEADER_LEN > buf.len() {
            break StopReason::Truncated;
        }
        match record::decode_ref(&buf[off..]) {
            Ok((h, _)) if h.seq == expected && off as u64 + h.encoded_len() <= half_len as u64 => {
                scan.records.push(info(&h, base + off as u64, i));
                off += h.encoded_len() as usize;
                expected += 1;
            }
            Ok((h, _)) if h.seq < expected => break StopReason::Stale { seq: h.seq },
            Ok((h, _)) if h.seq > expected => {
                break StopReason::Gap {
                    expected,
                    found: h.seq,
                }
            }
            Ok((h, _)) => {
                // Right seq, but claims to run past the end of the half.
                break classify(
                    buf,
                    off,
                    expected,
                    format!("record length {} runs past the half", h.encoded_len()),
                    true,
                );
            }
            Err(DecodeError::Zero) => {
                // Zero header: the clean end, unless newer records follow
                // (then a record was zeroed: corruption).
                break match newer_after(buf, off, expected) {
                    Some(newer_seq) => StopReason::Corrupt {
                        detail: "zeroed record header".into(),
                        newer_seq,
                    },
                    None => StopReason::Zeroed,
                };
            }
            Err(DecodeError::Short { .. })
                if off as u64 + full_len(&buf[off..]) > buf.len() as u64
                    && buf.len() < half_len =>
            {
                break StopReason::Truncated
            }
            Err(e) => {
                let claims_expected =
                    record::parse_header(&buf[off..]).is_ok_and(|h| h.seq == expected);
                break classify(buf, off, expected, e.to_string(), claims_expected);
            }
        }
    };
    scan.stop = stop;
    scan.stop_offset = base + off as u64;
    scan.max_seen_seq = scan.last_seq().unwrap_or(0).max(max_valid_seq(buf, off));
    scan
}

/// Bytes the (unverified) header at the start of `b` claims, padding excluded.
fn full_len(b: &[u8]) -> u64 {
    record::parse_header(b).map_or(RECORD_HEADER_LEN as u64, |h| {
        RECORD_HEADER_LEN as u64 + u64::from(h.data_len)
    })
}

fn classify(
    buf: &[u8],
    off: usize,
    expected: Seq,
    detail: String,
    claims_expected: bool,
) -> StopReason {
    match newer_after(buf, off, expected) {
        Some(newer_seq) => StopReason::Corrupt { detail, newer_seq },
        None if claims_expected => StopReason::Torn { detail },
        None => StopReason::Unrecognized { detail },
    }
}

fn info(h: &RecordHeader, offset: u64, half: usize) -> RecordInfo {
    RecordInfo {
        seq: h.seq,
        meta: h.meta,
        data_len: h.data_len,
        offset,
        half,
    }
}

/// Valid records at aligned offsets after `off` (exclusive): the highest seq
/// among those >= `expected`, if any.
fn newer_after(buf: &[u8], off: usize, expected: Seq) -> Option<Seq> {
    valid_records_from(buf, off + RECORD_ALIGN as usize)
        .filter(|&s| s >= expected)
        .max()
}

/// Highest seq of any valid record at an aligned offset from `off` on.
fn max_valid_seq(buf: &[u8], off: usize) -> Seq {
    valid_records_from(buf, off).max().unwrap_or(0)
}

fn valid_records_from(buf: &[u8], from: usize) -> impl Iterator<Item = Seq> + '_ {
    let start = from.next_multiple_of(RECORD_ALIGN as usize);
    (start..buf.len())
        .step_by(RECORD_ALIGN as usize)
        .filter(move |&o| buf.get(o..o + 4) == Some(&record::RECORD_MAGIC[..]))
        .filter_map(move |o| record::decode_ref(&buf[o..]).ok().map(|(h, _)| h.seq))
}

/// The replay decision, given both halves' scans.
pub(crate) fn plan(
    layout: Layout,
    halves: [HalfScan; 2],
    committed_seq: Seq,
    truncated_file_len: Option<u64>,
) -> (ScanReport, Vec<RecordInfo>) {
    let pruned = halves
        .iter()
        .filter_map(|h| h.header.map(|hh| hh.pruned_seq))
        .max()
        .unwrap_or(0);
    let floor = committed_seq.max(pruned);
    let mut all: Vec<RecordInfo> = halves
        .iter()
        .flat_map(|h| h.records.iter().copied())
        .filter(|r| r.seq > floor)
        .collect();
    all.sort_by_key(|r| r.seq);
    let mut replay = Vec::with_capacity(all.len());
    let mut gap = None;
    for (k, r) in all.iter().enumerate() {
        let expected = floor + 1 + k as u64;
        if r.seq != expected {
            gap = Some((expected, r.seq, all.len() - k));
            break;
        }
        replay.push(*r);
    }
    let max_seen_seq = halves
        .iter()
        .map(|h| h.max_seen_seq.max(h.header.map_or(0, |hh| hh.pruned_seq)))
        .max()
        .unwrap_or(0)
        .max(committed_seq);
    let report = ScanReport {
        layout,
        committed_seq,
        floor,
        replay_range: replay
            .first()
            .zip(replay.last())
            .map(|(a, b)| (a.seq, b.seq)),
        gap,
        store_behind_log: committed_seq < pruned,
        truncated_file_len,
        max_seen_seq,
        halves,
    };
    (report, replay)
}
