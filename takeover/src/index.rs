//! The partner's dependency index: for each owner LUN, which logged record
//! last wrote each block, so reads can be answered from the mirrored log
//! ("live replay") when the log covers them.
//!
//! Invariants:
//! - per LUN, an [`ExtentMap`] of non-overlapping extents, each naming the
//!   record (by seq) with the highest seq that wrote those blocks among the
//!   records inserted and not pruned;
//! - `records` holds exactly the records that still own at least one block
//!   (`live_blocks > 0`); a record wholly overwritten is dropped at once, so
//!   memory is bounded by what a read could still need;
//! - nothing with `seq <= pruned_upto` is ever present.
//!
//! Records may arrive out of seq order (the mirror stream is pipelined): an
//! older record then only fills blocks no newer record has written.
//!
//! A Meta record may change any block of its LUN (snapshot restore, resize,
//! delete), so it hides every older record of that LUN from reads: those
//! entries are dropped and older data records arriving later are ignored for
//! that LUN. Reads then go to the owner until new writes cover them again.
//! (A caller that knows a Meta op leaves blocks alone, such as a reservation
//! change, may simply not insert it here; the replay planner still needs it.)

use std::collections::{BTreeMap, HashMap};

use crate::extent_map::ExtentMap;
use crate::{Op, RecordMeta};

/// Why [`DependencyIndex::insert`] refused a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A live record already has this seq: the log handed us the same record
    /// twice or two records share a seq; either way the index would lie.
    #[error("record seq {0} is already indexed")]
    DuplicateSeq(u64),
    /// The record is at or below the prune point: its data is already in the
    /// owner's aggregate and its log space may be reused.
    #[error("record seq {seq} is at or below the pruned seq {pruned_upto}")]
    Pruned { seq: u64, pruned_upto: u64 },
}

/// One contiguous part of a read that the log can serve, and from which
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First block of this part of the read.
    pub lba: u64,
    pub blocks: u64,
    /// The newest record that wrote these blocks.
    pub seq: u64,
    pub op: Op,
    /// Offset of that record in the log region.
    pub location: u64,
    /// Block offset of `lba` inside the record's range. For [`Op::Write`] and
    /// [`Op::CompareAndWrite`] the data is at that block of the payload; for
    /// [`Op::WriteSame`] every block is the payload's single block; for
    /// [`Op::Unmap`] the blocks read as zeros.
    pub offset_blocks: u64,
}

#[derive(Debug, Clone, Default)]
struct LunIndex {
    extents: ExtentMap<u64>,
    /// Seq of the newest Meta record seen for this LUN: older data records
    /// are hidden by it.
    floor: u64,
}

#[derive(Debug, Clone)]
struct LiveRecord {
    meta: RecordMeta,
    live_blocks: u64,
}

/// Per-LUN "newest record per block" index over the mirrored log.
#[derive(Debug, Default, Clone)]
pub struct DependencyIndex {
    luns: HashMap<u32, LunIndex>,
    records: BTreeMap<u64, LiveRecord>,
    pruned_upto: Option<u64>,
}

impl DependencyIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Indexes a logged record. O(log n + k), k = extents replaced. An
    /// [`Op::Meta`] record hides the older records of its LUN (see the module
    /// docs): O(extents of that LUN).
    pub fn insert(&mut self, meta: &RecordMeta) -> Result<(), IndexError> {
        if let Some(p) = self.pruned_upto {
            if meta.seq <= p {
                return Err(IndexError::Pruned {
                    seq: meta.seq,
                    pruned_upto: p,
                });
            }
        }
        if self.records.contains_key(&meta.seq) {
            return Err(IndexError::DuplicateSeq(meta.seq));
        }
        if !meta.op.writes_blocks() {
            self.hide_older(meta.lun, meta.seq);
            return Ok(());
        }
        if meta.blocks == 0 {
            return Ok(());
        }
        let seq = meta.seq;
        let records = &mut self.records;
        let lun = self.luns.entry(meta.lun).or_default();
        if seq < lun.floor {
            // Already superseded by a Meta record of this LUN.
            return Ok(());
        }
        let mut dead = Vec::new();
        let assigned = lun.extents.assign(
            meta.lba,
            meta.end(),
            seq,
            |old| *old < seq,
            |old, lost| {
                if let Some(r) = records.get_mut(old) {
                    r.live_blocks = r.live_blocks.saturating_sub(lost);
                    if r.live_blocks == 0 {
                        dead.push(*old);
                    }
                }
            },
        );
        for d in dead {
            records.remove(&d);
        }
        if assigned > 0 {
            records.insert(
                seq,
                LiveRecord {
                    meta: *meta,
                    live_blocks: assigned,
                },
            );
        }
        Ok(())
    }

    /// A Meta record `seq` on `lun`: forget that LUN's older entries.
    fn hide_older(&mut self, lun: u32, seq: u64) {
        let records = &mut self.records;
        let ix = self.luns.entry(lun).or_default();
        ix.floor = ix.floor.max(seq);
        ix.extents.retain(|old, len| {
            if *old >= seq {
                return true;
            }
            if let Some(r) = records.get_mut(old) {
                r.live_blocks = r.live_blocks.saturating_sub(len);
                if r.live_blocks == 0 {
                    records.remove(old);
                }
            }
            false
        });
    }

    /// Drops every record with `seq <= upto` (the owner committed them in a
    /// CP) and refuses them from now on. Returns how many live records went.
    pub fn prune(&mut self, upto: u64) -> usize {
        self.pruned_upto = Some(self.pruned_upto.map_or(upto, |p| p.max(upto)));
        let keep = match upto.checked_add(1) {
            Some(first_kept) => self.records.split_off(&first_kept),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut self.records, keep);
        if gone.is_empty() {
            return 0;
        }
        // Walking each pruned record's own range costs the extents inside it;
        // once a prune takes most of the index, one scan of everything is
        // cheaper than that.
        if gone.len() >= self.records.len() {
            for ix in self.luns.values_mut() {
                ix.extents.retain(|seq, _| *seq > upto);
            }
        } else {
            for r in gone.values() {
                if let Some(ix) = self.luns.get_mut(&r.meta.lun) {
                    ix.extents
                        .remove_within(r.meta.lba, r.meta.end(), |seq| *seq == r.meta.seq);
                }
            }
        }
        // A LUN's floor only matters while records below it could still
        // arrive, i.e. while it is above the prune point.
        self.luns
            .retain(|_, ix| !ix.extents.is_empty() || ix.floor > upto);
        gone.len()
    }

    /// If every block of `[lba, lba + blocks)` of `lun` was written by an
    /// indexed record, the pieces of the range with, for each, the newest
    /// record that wrote it, in LBA order; `None` otherwise (forward the read
    /// to the owner). An empty range is trivially covered.
    /// O(log n + k), k = pieces returned.
    pub fn covers(&self, lun: u32, lba: u64, blocks: u32) -> Option<Vec<Piece>> {
        let end = lba.saturating_add(u64::from(blocks));
        if lba >= end {
            return Some(Vec::new());
        }
        let extents = self.luns.get(&lun)?.extents.covering(lba, end)?;
        let mut pieces = Vec::with_capacity(extents.len());
        for (s, e, seq) in extents {
            // The invariant says every extent's record is live; if it ever
            // were not, refusing to serve from the log is the safe answer.
            let r = self.records.get(&seq)?;
            pieces.push(Piece {
                lba: s,
                blocks: e - s,
                seq,
                op: r.meta.op,
                location: r.meta.location,
                offset_blocks: s.saturating_sub(r.meta.lba),
            });
        }
        Some(pieces)
    }

    /// The live record with this seq, if it still owns any block.
    pub fn get(&self, seq: u64) -> Option<&RecordMeta> {
        self.records.get(&seq).map(|r| &r.meta)
    }

    /// Records that still own at least one block, in seq order.
    pub fn live_records(&self) -> impl Iterator<Item = &RecordMeta> + '_ {
        self.records.values().map(|r| &r.meta)
    }

    /// Number of live records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Number of extents over all LUNs (memory use is proportional to it).
    pub fn extent_count(&self) -> usize {
        self.luns.values().map(|ix| ix.extents.len()).sum()
    }

    /// Highest seq pruned so far.
    pub fn pruned_upto(&self) -> Option<u64> {
        self.pruned_upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, lun: u32, lba: u64, blocks: u32, op: Op) -> RecordMeta {
        RecordMeta {
            seq,
            lun,
            lba,
            blocks,
            op,
            location: seq * 1000,
        }
    }

    #[test]
    fn newest_wins_and_offsets() {
        let mut ix = DependencyIndex::new();
        ix.insert(&rec(1, 0, 10, 10, Op::Write)).unwrap();
        ix.insert(&rec(2, 0, 12, 2, Op::Unmap)).unwrap();
        let p = ix.covers(0, 11, 5).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].lba, p[0].blocks, p[0].seq, p[0].offset_blocks),
            (11, 1, 1, 1)
        );
        assert_eq!((p[1].lba, p[1].blocks, p[1].op), (12, 2, Op::Unmap));
        assert_eq!(
            (p[2].lba, p[2].seq, p[2].offset_blocks, p[2].location),
            (14, 1, 4, 1000)
        );
        assert!(ix.covers(0, 9, 2).is_none());
        assert!(ix.covers(1, 10, 1).is_none());
        assert_eq!(ix.covers(7, 0, 0), Some(vec![]));
    }

    #[test]
    fn wholly_overwritten_record_is_dropped() {
        let mut ix = DependencyIndex::new();
        ix.insert(&rec(1, 0, 0, 4, Op::Write)).unwrap();
        ix.insert(&rec(2, 0, 0, 2, Op::Write)).unwrap();
        assert_eq!(ix.len(), 2);
        ix.insert(&rec(3, 0, 2, 2, Op::WriteSame)).unwrap();
        assert!(ix.get(1).is_none());
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.extent_count(), 2);
    }

    #[test]
    fn out_of_order_and_duplicates() {
        let mut ix = DependencyIndex::new();
        ix.insert(&rec(5, 0, 0, 4, Op::Write)).unwrap();
        // Older and fully hidden: accepted, not kept.
        ix.insert(&rec(3, 0, 1, 2, Op::Write)).unwrap();
        assert!(ix.get(3).is_none());
        ix.insert(&rec(4, 0, 2, 4, Op::Write)).unwrap();
        let p = ix.covers(0, 0, 6).unwrap();
        assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![5, 4]);
        assert_eq!(p[1].offset_blocks, 2);
        assert_eq!(
            ix.insert(&rec(5, 0, 0, 1, Op::Write)),
            Err(IndexError::DuplicateSeq(5))
        );
    }

    #[test]
    fn prune_forgets_and_refuses() {
        let mut ix = DependencyIndex::new();
        for s in 1..=10 {
            ix.insert(&rec(s, (s % 2) as u32, s * 2, 3, Op::Write))
                .unwrap();
        }
        assert_eq!(ix.prune(3), 3);
        assert!(ix.covers(1, 2, 1).is_none());
        assert!(ix.covers(0, 8, 2).is_some());
        assert_eq!(
            ix.insert(&rec(2, 0, 0, 1, Op::Write)),
            Err(IndexError::Pruned {
                seq: 2,
                pruned_upto: 3
            })
        );
        assert_eq!(ix.prune(u64::MAX), 7);
        assert!(ix.is_empty());
        assert_eq!(ix.extent_count(), 0);
        // A lower prune later does not move the prune point back.
        ix.prune(1);
        assert_eq!(ix.pruned_upto(), Some(u64::MAX));
    }

    #[test]
    fn meta_hides_older_records_of_its_lun() {
        let mut ix = DependencyIndex::new();
        ix.insert(&rec(1, 0, 0, 4, Op::Write)).unwrap();
        ix.insert(&rec(10, 1, 0, 4, Op::Write)).unwrap();
        ix.insert(&rec(4, 0, 2, 2, Op::Write)).unwrap();
        ix.insert(&rec(3, 0, 0, 0, Op::Meta)).unwrap(); // late arrival
        assert!(ix.covers(0, 0, 1).is_none());
        assert_eq!(ix.covers(0, 2, 2).unwrap()[0].seq, 4);
        assert!(ix.get(1).is_none());
        assert!(ix.covers(1, 0, 4).is_some()); // other LUN untouched
                                               // An older write arriving after the Meta stays hidden.
        ix.insert(&rec(2, 0, 0, 1, Op::Write)).unwrap();
        assert!(ix.covers(0, 0, 1).is_none());
        ix.insert(&rec(5, 0, 0, 2, Op::Write)).unwrap();
        assert_eq!(ix.covers(0, 0, 4).unwrap().len(), 2);
    }

    #[test]
    fn hostile_ranges_do_not_panic() {
        let mut ix = DependencyIndex::new();
        ix.insert(&rec(1, 0, u64::MAX - 1, u32::MAX, Op::Write))
            .unwrap();
        ix.insert(&rec(2, 0, u64::MAX, 1, Op::Write)).unwrap();
        ix.insert(&rec(3, 0, 0, 0, Op::Write)).unwrap();
        assert!(ix.covers(0, u64::MAX - 1, 1).is_some());
        assert!(ix.covers(0, 0, 1).is_none());
        assert_eq!(ix.covers(0, u64::MAX, u32::MAX), Some(vec![]));
    }
}
