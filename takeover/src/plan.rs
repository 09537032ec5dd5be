//! The replay planner: turns the owner's log (records above the pruned seq)
//! into a dependency graph that [`crate::execute`] can run in parallel.
//!
//! Invariants of a [`ReplayPlan`]:
//! - `records` are the records to replay, sorted by seq (ties keep input
//!   order); every dependency points to a smaller index, so the graph is
//!   acyclic and seq order is always a valid schedule;
//! - for every block, the planned records that write it form a chain (each
//!   depends on the previous writer of that block), so any schedule that
//!   respects the edges leaves each block with its last writer's data;
//! - a record is skipped only if later records of the same barrier segment
//!   rewrite every one of its blocks, so it can never be a block's last
//!   writer nor be observed by a Meta record;
//! - a Meta record depends on everything before it in its scope, and
//!   everything after it in its scope depends on it (directly or through a
//!   chain).

use std::collections::HashMap;

use crate::extent_map::ExtentMap;
use crate::{Op, RecordMeta};

/// How far an [`Op::Meta`] record orders replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetaBarrier {
    /// Every LUN is ordered around it. The default, because some Meta ops
    /// involve two LUNs (a clone reads one LUN and creates another; a LUN id
    /// may be deleted and reused) and the record names only one of them.
    /// Meta records are rare next to writes, so the parallelism lost is
    /// small.
    #[default]
    Global,
    /// Only records of the Meta record's own LUN are ordered around it: for
    /// callers that know every Meta op they log touches a single LUN.
    Lun,
}

/// Knobs for [`ReplayPlan::build_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    pub meta_barrier: MetaBarrier,
    /// Leave out records whose every block is rewritten later in the same
    /// barrier segment. On by default; off is for verification and for
    /// measuring the scheduler alone.
    pub skip_overwritten: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            meta_barrier: MetaBarrier::Global,
            skip_overwritten: true,
        }
    }
}

/// Shape of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Records above the pruned seq (planned + skipped).
    pub records: usize,
    /// Records at or below the pruned seq, ignored.
    pub pruned: usize,
    /// Records left out because later records overwrite them entirely (and
    /// records of zero blocks, which change nothing).
    pub skipped: usize,
    /// Records to replay.
    pub planned: usize,
    /// Dependency edges (each "B waits for A" once).
    pub edges: usize,
    /// Records on the longest dependency chain: no schedule finishes in fewer
    /// sequential steps.
    pub critical_path: usize,
    /// Blocks written along the heaviest chain (replay cost is mostly
    /// proportional to blocks).
    pub critical_path_blocks: u64,
    /// Waves of a level-by-level schedule (wave i holds records whose longest
    /// chain of dependencies has i-1 records). Equals `critical_path` by
    /// construction; reported under the name operators look for.
    pub waves: usize,
    /// Records in the widest wave: the most parallelism the plan offers at
    /// once.
    pub max_wave_width: usize,
}

/// Records to replay and the order constraints between them.
#[derive(Debug, Clone, Default)]
pub struct ReplayPlan {
    records: Vec<RecordMeta>,
    dep_offsets: Vec<usize>,
    deps: Vec<usize>,
    succ_offsets: Vec<usize>,
    succs: Vec<usize>,
    skipped: Vec<u64>,
    /// Records on the longest chain starting at each record (itself
    /// included): the executor runs the highest first, so long chains start
    /// early instead of trailing behind independent work.
    height: Vec<usize>,
    stats: PlanStats,
}

#[derive(Default)]
struct LunState {
    /// Newest planned writer (plan index) per block since the last barrier;
    /// after a barrier the barrier covers the whole LUN, so the first writer
    /// of any block depends on it.
    writers: ExtentMap<usize>,
    /// The barrier this segment started from, and whether a record of this
    /// LUN depends on it yet. Tracked per LUN because a global barrier
    /// starts the segment of every LUN.
    barrier: Option<usize>,
    barrier_used: bool,
    /// Data records of this segment. Those without a dependent are what the
    /// next barrier has to wait for; every other one reaches one of them
    /// through a chain.
    members: Vec<usize>,
}

impl LunState {
    fn after_barrier(barrier: Option<usize>) -> Self {
        let mut s = LunState {
            barrier,
            ..LunState::default()
        };
        if let Some(b) = barrier {
            s.writers.assign(0, u64::MAX, b, |_| true, |_, _| {});
        }
        s
    }

    /// Records of the segment nothing depends on yet.
    fn tips<'a>(&'a self, has_dependent: &'a [bool]) -> impl Iterator<Item = usize> + 'a {
        let barrier = self.barrier.filter(|_| !self.barrier_used);
        self.members
            .iter()
            .copied()
            .filter(|&m| !has_dependent.get(m).copied().unwrap_or(false))
            .chain(barrier)
    }
}

impl ReplayPlan {
    /// Plans with the default options (global Meta barriers, skipping
    /// overwritten records). Records with `seq <= pruned_seq` are ignored.
    pub fn build(records: &[RecordMeta], pruned_seq: u64) -> ReplayPlan {
        Self::build_with(records, pruned_seq, PlanOptions::default())
    }

    /// Plans `records` (any order; sorted by seq here, ties in input order).
    /// O(n log n + total extents touched).
    pub fn build_with(records: &[RecordMeta], pruned_seq: u64, opts: PlanOptions) -> ReplayPlan {
        let mut live: Vec<&RecordMeta> = records.iter().filter(|r| r.seq > pruned_seq).collect();
        live.sort_by_key(|r| r.seq);
        let mut stats = PlanStats {
            records: live.len(),
            pruned: records.len() - live.len(),
            ..PlanStats::default()
        };

        let keep = if opts.skip_overwritten {
            Self::not_overwritten(&live, opts.meta_barrier)
        } else {
            vec![true; live.len()]
        };
        let mut planned = Vec::with_capacity(live.len());
        let mut skipped = Vec::new();
        for (r, k) in live.iter().zip(&keep) {
            if *k {
                planned.push(**r);
            } else {
                skipped.push(r.seq);
            }
        }
        stats.skipped = skipped.len();
        stats.planned = planned.len();

        // Forward pass: dependencies on the newest earlier writers.
        let mut luns: HashMap<u32, LunState> = HashMap::new();
        let mut last_global: Option<usize> = None;
        let mut dep_offsets = Vec::with_capacity(planned.len() + 1);
        let mut deps: Vec<usize> = Vec::new();
        dep_offsets.push(0);
        let mut mine: Vec<usize> = Vec::new();
        // Data records only ever gain dependents inside their own LUN's
        // segment, so one flag per record is enough.
        let mut has_dependent = vec![false; planned.len()];
        for (i, r) in planned.iter().enumerate() {
            mine.clear();
            match (r.op, opts.meta_barrier) {
                (Op::Meta, MetaBarrier::Lun) => {
                    let st = luns
                        .entry(r.lun)
                        .or_insert_with(|| LunState::after_barrier(last_global));
                    mine.extend(st.tips(&has_dependent));
                    *st = LunState::after_barrier(Some(i));
                }
                (Op::Meta, MetaBarrier::Global) => {
                    if luns.is_empty() {
                        mine.extend(last_global);
                    }
                    for st in luns.values() {
                        mine.extend(st.tips(&has_dependent));
                    }
                    // LUN states are rebuilt lazily from the new barrier.
                    luns.clear();
                    last_global = Some(i);
                }
                _ => {
                    let st = luns
                        .entry(r.lun)
                        .or_insert_with(|| LunState::after_barrier(last_global));
                    // Everything the record displaces is exactly the set of
                    // newest earlier writers of its blocks.
                    st.writers
                        .assign(r.lba, r.end(), i, |_| true, |w, _| mine.push(*w));
                    mine.sort_unstable();
                    mine.dedup();
                    for &d in &mine {
                        if Some(d) == st.barrier {
                            st.barrier_used = true;
                        } else if let Some(h) = has_dependent.get_mut(d) {
                            *h = true;
                        }
                    }
                    st.members.push(i);
                }
            }
            mine.sort_unstable();
            mine.dedup();
            deps.extend_from_slice(&mine);
            dep_offsets.push(deps.len());
        }
        stats.edges = deps.len();

        // Successor lists (what the executor walks) from the predecessor lists.
        let mut succ_count = vec![0usize; planned.len()];
        for &d in &deps {
            succ_count[d] += 1;
        }
        let mut succ_offsets = Vec::with_capacity(planned.len() + 1);
        succ_offsets.push(0);
        let mut acc = 0;
        for c in &succ_count {
            acc += c;
            succ_offsets.push(acc);
        }
        let mut fill = succ_offsets.clone();
        let mut succs = vec![0usize; deps.len()];
        for i in 0..planned.len() {
            for &d in &deps[dep_offsets[i]..dep_offsets[i + 1]] {
                succs[fill[d]] = i;
                fill[d] += 1;
            }
        }

        // Levels: dependencies always have smaller indices, so one pass works.
        let mut level = vec![0usize; planned.len()];
        let mut weight = vec![0u64; planned.len()];
        let mut width = vec![0usize; planned.len() + 1];
        for i in 0..planned.len() {
            let ds = &deps[dep_offsets[i]..dep_offsets[i + 1]];
            level[i] = 1 + ds.iter().map(|&d| level[d]).max().unwrap_or(0);
            weight[i] = u64::from(planned[i].blocks)
                .saturating_add(ds.iter().map(|&d| weight[d]).max().unwrap_or(0));
            if let Some(w) = width.get_mut(level[i]) {
                *w += 1;
            }
        }
        stats.critical_path = level.iter().copied().max().unwrap_or(0);
        stats.critical_path_blocks = weight.iter().copied().max().unwrap_or(0);
        stats.waves = stats.critical_path;
        stats.max_wave_width = width.iter().copied().max().unwrap_or(0);

        // Heights: dependents always have larger indices, so walk backwards.
        let mut height = vec![1usize; planned.len()];
        for i in (0..planned.len()).rev() {
            let h = succs[succ_offsets[i]..succ_offsets[i + 1]]
                .iter()
                .map(|&s| height[s])
                .max()
                .unwrap_or(0);
            height[i] = h + 1;
        }

        ReplayPlan {
            records: planned,
            dep_offsets,
            deps,
            succ_offsets,
            succs,
            skipped,
            height,
            stats,
        }
    }

    /// Reverse pass: a data record is kept unless the later records of its
    /// barrier segment cover its whole range. Segments end at Meta records
    /// because a Meta record (a snapshot, say) may observe the blocks, so a
    /// write before it must land even if a write after it replaces it.
    fn not_overwritten(live: &[&RecordMeta], barrier: MetaBarrier) -> Vec<bool> {
        let mut keep = vec![true; live.len()];
        let mut later: HashMap<u32, ExtentMap<()>> = HashMap::new();
        for (k, r) in keep.iter_mut().zip(live).rev() {
            if r.op == Op::Meta {
                match barrier {
                    MetaBarrier::Lun => {
                        later.remove(&r.lun);
                    }
                    MetaBarrier::Global => later.clear(),
                }
                continue;
            }
            if r.blocks == 0 {
                *k = false;
                continue;
            }
            // One pass: assign the range and count the blocks that were
            // already covered; all of them means nothing of this record
            // survives (and the assignment changed nothing).
            let mut covered = 0u64;
            later.entry(r.lun).or_default().assign(
                r.lba,
                r.end(),
                (),
                |_| true,
                |_, n| covered += n,
            );
            if covered >= r.end() - r.lba {
                *k = false;
            }
        }
        keep
    }

    /// Records to replay, in seq order; indices below refer to this slice.
    pub fn records(&self) -> &[RecordMeta] {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Indices of the records record `i` must wait for (empty if out of range).
    pub fn dependencies(&self, i: usize) -> &[usize] {
        Self::slice(&self.dep_offsets, &self.deps, i)
    }

    /// Indices of the records waiting for record `i` (empty if out of range).
    pub fn dependents(&self, i: usize) -> &[usize] {
        Self::slice(&self.succ_offsets, &self.succs, i)
    }

    /// Seqs of the records left out, in seq order.
    pub fn skipped(&self) -> &[u64] {
        &self.skipped
    }

    /// Records on the longest dependency chain starting at record `i` (0 if
    /// out of range): a scheduling priority.
    pub fn height(&self, i: usize) -> usize {
        self.height.get(i).copied().unwrap_or(0)
    }

    pub fn stats(&self) -> &PlanStats {
        &self.stats
    }

    fn slice<'a>(offsets: &[usize], items: &'a [usize], i: usize) -> &'a [usize] {
        let next = i.checked_add(1).and_then(|j| offsets.get(j));
        match (offsets.get(i), next) {
            (Some(&a), Some(&b)) => items.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
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
            location: seq,
        }
    }

    fn seqs(plan: &ReplayPlan, ix: &[usize]) -> Vec<u64> {
        ix.iter().map(|&i| plan.records()[i].seq).collect()
    }

    fn deps_of(plan: &ReplayPlan, seq: u64) -> Vec<u64> {
        let i = plan.records().iter().position(|r| r.seq == seq).unwrap();
        seqs(plan, plan.dependencies(i))
    }

    #[test]
    fn chains_and_parallel_records() {
        let log = [
            rec(1, 0, 0, 4, Op::Write),
            rec(2, 0, 10, 4, Op::Write),
            rec(3, 0, 2, 10, Op::Write), // overlaps 1 and 2
            rec(4, 1, 0, 4, Op::Write),  // other LUN: independent
            rec(5, 0, 20, 1, Op::Unmap),
        ];
        let p = ReplayPlan::build(&log, 0);
        assert_eq!(p.len(), 5);
        assert_eq!(deps_of(&p, 3), vec![1, 2]);
        assert!(deps_of(&p, 4).is_empty());
        assert!(deps_of(&p, 5).is_empty());
        let s = p.stats();
        assert_eq!(
            (s.edges, s.critical_path, s.waves, s.max_wave_width),
            (2, 2, 2, 4)
        );
        assert_eq!(s.critical_path_blocks, 14);
        assert_eq!(seqs(&p, p.dependents(0)), vec![3]);
        let heights: Vec<usize> = (0..p.len()).map(|i| p.height(i)).collect();
        assert_eq!(heights, vec![2, 2, 1, 1, 1]);
        assert_eq!(p.height(99), 0);
    }

    #[test]
    fn overwritten_records_are_skipped_and_deps_bypass_them() {
        let log = [
            rec(1, 0, 0, 4, Op::Write),
            rec(2, 0, 0, 2, Op::Write), // rewritten by 3+4
            rec(3, 0, 0, 1, Op::Write),
            rec(4, 0, 1, 2, Op::WriteSame),
            rec(5, 0, 9, 0, Op::Write), // zero blocks
        ];
        let p = ReplayPlan::build(&log, 0);
        assert_eq!(p.skipped(), &[2, 5]);
        assert_eq!(deps_of(&p, 3), vec![1]);
        assert_eq!(deps_of(&p, 4), vec![1]);
        let all = ReplayPlan::build_with(
            &log,
            0,
            PlanOptions {
                skip_overwritten: false,
                ..PlanOptions::default()
            },
        );
        assert_eq!(all.len(), 5);
        assert_eq!(deps_of(&all, 3), vec![2]);
    }

    #[test]
    fn pruned_and_unsorted_input() {
        let log = [
            rec(7, 0, 0, 1, Op::Write),
            rec(3, 0, 0, 1, Op::Write),
            rec(5, 0, 0, 2, Op::Write),
        ];
        let p = ReplayPlan::build(&log, 3);
        assert_eq!(p.stats().pruned, 1);
        assert_eq!(seqs(&p, &[0, 1]), vec![5, 7]);
        assert_eq!(deps_of(&p, 7), vec![5]);
    }

    #[test]
    fn meta_barrier_per_lun() {
        let log = [
            rec(1, 0, 0, 1, Op::Write),
            rec(2, 0, 5, 1, Op::Write),
            rec(3, 1, 0, 2, Op::Write),
            rec(4, 0, 0, 0, Op::Meta),
            rec(5, 0, 0, 1, Op::Write), // would skip 1 without the barrier
            rec(6, 0, 5, 1, Op::Write),
            rec(7, 1, 0, 1, Op::Write),
        ];
        let opts = PlanOptions {
            meta_barrier: MetaBarrier::Lun,
            ..PlanOptions::default()
        };
        let p = ReplayPlan::build_with(&log, 0, opts);
        assert!(p.skipped().is_empty());
        assert_eq!(deps_of(&p, 4), vec![1, 2]);
        assert_eq!(deps_of(&p, 5), vec![4]);
        assert_eq!(deps_of(&p, 6), vec![4]);
        assert_eq!(deps_of(&p, 7), vec![3]);
    }

    #[test]
    fn meta_barrier_global() {
        let opts = PlanOptions::default();
        let log = [
            rec(1, 0, 0, 1, Op::Write),
            rec(2, 1, 0, 1, Op::Write),
            rec(3, 0, 0, 0, Op::Meta),
            rec(4, 2, 0, 1, Op::Write),
            rec(5, 1, 0, 0, Op::Meta),
            rec(6, 1, 0, 1, Op::Meta),
        ];
        let p = ReplayPlan::build_with(&log, 0, opts);
        assert_eq!(deps_of(&p, 3), vec![1, 2]);
        assert_eq!(deps_of(&p, 4), vec![3]);
        assert_eq!(deps_of(&p, 5), vec![4]);
        assert_eq!(deps_of(&p, 6), vec![5]);
    }

    #[test]
    fn empty_and_out_of_range() {
        let p = ReplayPlan::build(&[], 0);
        assert!(p.is_empty());
        assert_eq!(p.stats(), &PlanStats::default());
        assert!(p.dependencies(3).is_empty());
        assert!(p.dependents(usize::MAX).is_empty());
    }
}
