//! Property tests: replaying a plan (in parallel, or in any order its
//! dependencies allow) gives exactly what replaying the log in seq order
//! gives, and `covers()` agrees with a brute-force newest-seq-per-block model.
//!
//! Small LBA spaces and few LUNs force overlaps; Meta records are modelled as
//! snapshots (they observe the LUN), which is what makes barriers and skips
//! across barriers observable.

use std::collections::BTreeMap;
use std::sync::Mutex;

use nvtarget_takeover::{
    execute, DependencyIndex, IndexError, MetaBarrier, Op, PlanOptions, RecordMeta, ReplayPlan,
};
use proptest::prelude::*;

/// Block contents: absent = zeros.
type Blocks = BTreeMap<(u32, u64), u64>;

#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    blocks: Blocks,
    /// (Meta seq, what it observed): its own LUN, or every LUN when global.
    snapshots: Vec<(u64, Blocks)>,
}

impl Model {
    fn apply(&mut self, r: &RecordMeta, barrier: MetaBarrier) {
        for b in r.lba..r.end() {
            let off = b - r.lba;
            match r.op {
                Op::Write | Op::CompareAndWrite => {
                    self.blocks.insert((r.lun, b), r.seq * 1000 + off + 1);
                }
                Op::WriteSame => {
                    self.blocks.insert((r.lun, b), r.seq * 1000);
                }
                Op::Unmap => {
                    self.blocks.remove(&(r.lun, b));
                }
                Op::Meta => {}
            }
        }
        if r.op == Op::Meta {
            let seen = self
                .blocks
                .iter()
                .filter(|((l, _), _)| barrier == MetaBarrier::Global || *l == r.lun)
                .map(|(k, v)| (*k, *v))
                .collect();
            self.snapshots.push((r.seq, seen));
        }
    }

    /// Snapshots sorted by seq: parallel replay appends them in completion
    /// order.
    fn normalized(mut self) -> Self {
        self.snapshots.sort_by_key(|s| s.0);
        self
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Write),
        2 => Just(Op::WriteSame),
        2 => Just(Op::Unmap),
        1 => Just(Op::CompareAndWrite),
        1 => Just(Op::Meta),
    ]
}

/// A log: strictly increasing seqs with gaps, handed over shuffled.
fn log(
    max_len: usize,
    luns: u32,
    space: u64,
    max_blocks: u32,
) -> impl Strategy<Value = Vec<RecordMeta>> {
    prop::collection::vec(
        (1u64..4, 0..luns, 0..space, 0..=max_blocks, op()),
        0..max_len,
    )
    .prop_map(|raw| {
        let mut seq = 0;
        raw.into_iter()
            .map(|(gap, lun, lba, blocks, op)| {
                seq += gap;
                RecordMeta {
                    seq,
                    lun,
                    lba,
                    blocks,
                    op,
                    location: seq * 4096,
                }
            })
            .collect::<Vec<_>>()
    })
    .prop_shuffle()
}

fn barrier() -> impl Strategy<Value = MetaBarrier> {
    prop_oneof![Just(MetaBarrier::Lun), Just(MetaBarrier::Global)]
}

/// The state the owner's aggregate had at the prune point, and what a plain
/// seq-order replay of the rest gives.
fn reference(records: &[RecordMeta], pruned: u64, barrier: MetaBarrier) -> (Model, Model) {
    let mut sorted = records.to_vec();
    sorted.sort_by_key(|r| r.seq);
    let mut base = Model::default();
    for r in sorted.iter().filter(|r| r.seq <= pruned) {
        base.apply(r, barrier);
    }
    base.snapshots.clear();
    let mut expect = base.clone();
    for r in sorted.iter().filter(|r| r.seq > pruned) {
        expect.apply(r, barrier);
    }
    (base, expect)
}

/// Applies the plan one record at a time in a pseudo-random order that
/// respects its dependencies (any valid schedule must give the same result).
fn random_topological(
    plan: &ReplayPlan,
    base: &Model,
    barrier: MetaBarrier,
    mut seed: u64,
) -> Model {
    let n = plan.len();
    let mut pending: Vec<usize> = (0..n).map(|i| plan.dependencies(i).len()).collect();
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut m = base.clone();
    let mut done = 0;
    while !ready.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = ready.swap_remove((seed % ready.len() as u64) as usize);
        m.apply(&plan.records()[i], barrier);
        done += 1;
        for &s in plan.dependents(i) {
            pending[s] -= 1;
            if pending[s] == 0 {
                ready.push(s);
            }
        }
    }
    assert_eq!(done, n, "plan has a cycle");
    m.normalized()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    // 512 cases by default (about a second in a debug build); PROPTEST_CASES
    // raises it for a longer soak.
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn plan_replay_matches_sequential(
        records in log(40, 3, 24, 6),
        prune_frac in 0u64..=100,
        barrier in barrier(),
        skip in any::<bool>(),
        seed in 1u64..u64::MAX,
    ) {
        let max_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
        // Often below the first seq (nothing pruned), sometimes above all.
        let pruned = (max_seq + 1) * prune_frac / 100;
        let opts = PlanOptions { meta_barrier: barrier, skip_overwritten: skip };
        let plan = ReplayPlan::build_with(&records, pruned, opts);
        let (base, expect) = reference(&records, pruned, barrier);
        let expect = expect.normalized();

        let s = plan.stats();
        prop_assert_eq!(s.records, records.iter().filter(|r| r.seq > pruned).count());
        prop_assert_eq!(s.planned + s.skipped, s.records);
        prop_assert_eq!(s.pruned + s.records, records.len());
        prop_assert!(s.critical_path <= s.planned);
        prop_assert!(skip || s.skipped == 0);
        for (i, r) in plan.records().iter().enumerate() {
            for &d in plan.dependencies(i) {
                prop_assert!(d < i && plan.records()[d].seq < r.seq);
            }
        }

        prop_assert_eq!(random_topological(&plan, &base, barrier, seed), expect.clone());

        for threads in [1usize, 2, 3] {
            let model = Mutex::new(base.clone());
            let stats = execute(&plan, threads, |r| {
                model.lock().map_err(|_| "poisoned")?.apply(r, barrier);
                Ok::<(), &str>(())
            }).unwrap();
            prop_assert_eq!(stats.applied, plan.len());
            let got = model.into_inner().unwrap().normalized();
            prop_assert_eq!(got, expect.clone());
        }
    }

    #[test]
    fn covers_matches_brute_force(
        records in log(60, 2, 32, 8),
        prunes in prop::collection::vec((0usize..60, 0u64..200), 0..3),
        queries in prop::collection::vec((0u32..2, 0u64..40, 0u32..10), 1..30),
    ) {
        let mut ix = DependencyIndex::new();
        let mut accepted: Vec<RecordMeta> = Vec::new();
        let mut prune_upto: Option<u64> = None;
        for (pos, r) in records.iter().enumerate() {
            for &(at, upto) in &prunes {
                if at == pos {
                    ix.prune(upto);
                    prune_upto = Some(prune_upto.map_or(upto, |p| p.max(upto)));
                }
            }
            match ix.insert(r) {
                Ok(()) => accepted.push(*r),
                Err(IndexError::Pruned { seq, pruned_upto }) => {
                    prop_assert_eq!(seq, r.seq);
                    prop_assert_eq!(Some(pruned_upto), prune_upto);
                    prop_assert!(r.seq <= pruned_upto);
                }
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }
        // Visible: data records above the prune point that no accepted Meta
        // record of their LUN supersedes.
        let live: Vec<RecordMeta> = accepted
            .iter()
            .filter(|r| r.op != Op::Meta && prune_upto.is_none_or(|p| r.seq > p))
            .filter(|r| {
                !accepted
                    .iter()
                    .any(|m| m.op == Op::Meta && m.lun == r.lun && m.seq > r.seq)
            })
            .copied()
            .collect();
        let newest = |lun: u32, b: u64| {
            live.iter()
                .filter(|r| r.lun == lun && r.lba <= b && b < r.end())
                .max_by_key(|r| r.seq)
        };

        for (lun, lba, blocks) in queries {
            let got = ix.covers(lun, lba, blocks);
            let want: Option<Vec<&RecordMeta>> =
                (lba..lba + u64::from(blocks)).map(|b| newest(lun, b)).collect();
            match (got, want) {
                (None, None) => {}
                (Some(pieces), Some(want)) => {
                    let mut b = lba;
                    for p in &pieces {
                        prop_assert_eq!(p.lba, b);
                        prop_assert!(p.blocks > 0);
                        for k in 0..p.blocks {
                            let w = want[(b + k - lba) as usize];
                            prop_assert_eq!(p.seq, w.seq);
                            prop_assert_eq!(p.op, w.op);
                            prop_assert_eq!(p.location, w.location);
                            prop_assert_eq!(p.offset_blocks + k, b + k - w.lba);
                        }
                        b += p.blocks;
                    }
                    prop_assert_eq!(b, lba + u64::from(blocks));
                }
                (g, w) => prop_assert!(false, "covers {:?} but model says {:?}", g, w.is_some()),
            }
        }

        // Memory bound: exactly the records newest somewhere are kept.
        let mut kept: Vec<u64> = ix.live_records().map(|r| r.seq).collect();
        kept.sort_unstable();
        let mut needed: Vec<u64> = live
            .iter()
            .filter(|r| (r.lba..r.end()).any(|b| newest(r.lun, b).map(|n| n.seq) == Some(r.seq)))
            .map(|r| r.seq)
            .collect();
        needed.sort_unstable();
        prop_assert_eq!(kept, needed);
        prop_assert!(ix.extent_count() <= 2 * ix.len());
    }
}
