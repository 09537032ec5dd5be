//! The replay executor: runs a [`ReplayPlan`] on a few threads, each record
//! once all the records it depends on are applied.
//!
//! Invariants:
//! - a record is handed to a worker only when its count of unfinished
//!   dependencies is zero, and it is handed out exactly once (it enters the
//!   ready set once, when that count reaches zero, and leaves it once);
//! - after the first failure no new record starts; records already running
//!   finish, and the first error is the one reported;
//! - all shared state is one [`SchedState`] behind one [`Monitor`] (a lock
//!   plus a condition variable). The monitor is the model-checking seam: the
//!   tests run the very same [`worker_loop`] over shuttle's lock and condvar
//!   and explore its interleavings (STYLE.md item 11).
//!
//! One lock round trip per record is cheap next to applying a record (a
//! block copy and checksums, microseconds), so a finer scheme would buy
//! nothing measurable on the two-core machines the pair runs on.

use std::cmp::Reverse;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{RecordMeta, ReplayPlan};

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    /// `apply` failed on this record; records depending on it were not run.
    #[error("replaying record seq {seq} failed: {error}")]
    Apply { seq: u64, error: E },
    /// `apply` panicked on this record (caught, so other workers and the
    /// caller's thread survive to report it).
    #[error("replaying record seq {seq} panicked")]
    Panicked { seq: u64 },
    /// Nothing was running and nothing was ready before all records were
    /// applied. Impossible for a plan built by [`ReplayPlan::build`] (its
    /// dependencies always point backwards); kept so that a bug shows up as
    /// an error instead of a hung takeover.
    #[error("replay stalled with {done} of {total} records applied")]
    Stalled { done: usize, total: usize },
}

impl<E> ReplayError<E> {
    /// The seq of the record that failed, if a record did.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ReplayError::Apply { seq, .. } | ReplayError::Panicked { seq } => Some(*seq),
            ReplayError::Stalled { .. } => None,
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    /// Records applied (all of the plan on success).
    pub applied: usize,
    /// Records the plan left out as wholly overwritten.
    pub skipped: usize,
    /// Worker threads used (the calling thread included).
    pub threads: usize,
    /// Records applied by each worker.
    pub per_thread: Vec<usize>,
    /// Most records seen running at the same time.
    pub peak_parallel: usize,
    pub elapsed: Duration,
}

/// Upper bound on replay workers, whatever the caller asks for.
pub const MAX_THREADS: usize = 256;

/// Runs `plan` on `threads` threads (the calling thread is one of them; 0 is
/// taken as 1, more than [`MAX_THREADS`] as that), calling `apply` once per record after all its dependencies
/// returned `Ok`. Stops at the first error.
pub fn execute<E, F>(
    plan: &ReplayPlan,
    threads: usize,
    apply: F,
) -> Result<ReplayStats, ReplayError<E>>
where
    E: Send,
    F: Fn(&RecordMeta) -> Result<(), E> + Sync,
{
    let start = Instant::now();
    // More workers than records would only sleep, and past a few hundred
    // threads a caller's typo would cost more than it could ever buy.
    let threads = threads.clamp(1, plan.len().clamp(1, MAX_THREADS));
    let monitor = StdMonitor::new(SchedState::new(plan));
    let mut per_thread = vec![0usize; threads];
    std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(threads.saturating_sub(1));
        for i in 1..threads {
            let (m, a) = (&monitor, &apply);
            // A thread that cannot be spawned only costs parallelism.
            if let Ok(h) = std::thread::Builder::new()
                .name(format!("replay-{i}"))
                .spawn_scoped(s, move || worker_loop(m, plan, a))
            {
                handles.push((i, h));
            }
        }
        per_thread[0] = worker_loop(&monitor, plan, &apply);
        for (i, h) in handles {
            // worker_loop catches apply's panics; a join error cannot come
            // from there, and the counts are only statistics.
            per_thread[i] = h.join().unwrap_or(0);
        }
    });
    let st = monitor.into_inner();
    if let Some(e) = st.failed {
        return Err(e);
    }
    if st.done < st.total {
        return Err(ReplayError::Stalled {
            done: st.done,
            total: st.total,
        });
    }
    Ok(ReplayStats {
        applied: st.done,
        skipped: plan.stats().skipped,
        threads,
        per_thread,
        peak_parallel: st.peak_running,
        elapsed: start.elapsed(),
    })
}

/// The scheduler's synchronisation, abstracted for the model checker.
pub(crate) trait Monitor<T> {
    /// Runs `f` under the lock; while it returns `None`, sleeps until
    /// notified and runs it again. Returns its first `Some`.
    fn enter<R>(&self, f: impl FnMut(&mut T) -> Option<R>) -> R;
    fn notify_one(&self);
    fn notify_all(&self);
}

pub(crate) struct StdMonitor<T> {
    lock: Mutex<T>,
    cv: Condvar,
}

impl<T> StdMonitor<T> {
    pub(crate) fn new(t: T) -> Self {
        Self {
            lock: Mutex::new(t),
            cv: Condvar::new(),
        }
    }

    fn into_inner(self) -> T {
        self.lock
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Monitor<T> for StdMonitor<T> {
    fn enter<R>(&self, mut f: impl FnMut(&mut T) -> Option<R>) -> R {
        // Poisoning cannot happen (nothing panics under this lock: `apply`
        // runs outside it); recovering keeps that a non-event if it did.
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = f(&mut g) {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn notify_one(&self) {
        self.cv.notify_one();
    }

    fn notify_all(&self) {
        self.cv.notify_all();
    }
}

/// Everything the workers share.
pub(crate) struct SchedState<E> {
    /// Unfinished dependencies per record.
    pending: Vec<usize>,
    /// Ready records, taken from the end. Roots are pushed tallest chain
    /// last, and records released by a finished one go on top, so a worker
    /// follows a chain depth-first: critical path first. With FIFO a chain's
    /// next record queues behind all the independent work and the chain ends
    /// up running alone on one core at the end. A stack rather than a heap:
    /// O(1) with sequential memory access, and within a few percent of
    /// strict longest-path-first on replay plans.
    ready: Vec<usize>,
    /// Scratch for the records a finish releases (kept to avoid an
    /// allocation per record).
    released: Vec<usize>,
    pub(crate) done: usize,
    pub(crate) total: usize,
    running: usize,
    peak_running: usize,
    /// Workers asleep in the monitor: lets a worker skip the notify syscall
    /// when nobody could take the work it just released.
    waiting: usize,
    stop: bool,
    pub(crate) failed: Option<ReplayError<E>>,
}

impl<E> SchedState<E> {
    pub(crate) fn new(plan: &ReplayPlan) -> Self {
        let pending: Vec<usize> = (0..plan.len())
            .map(|i| plan.dependencies(i).len())
            .collect();
        let mut ready: Vec<usize> = pending
            .iter()
            .enumerate()
            .filter(|(_, &p)| p == 0)
            .map(|(i, _)| i)
            .collect();
        ready.sort_by_key(|&i| (plan.height(i), Reverse(i)));
        Self {
            pending,
            ready,
            released: Vec::new(),
            done: 0,
            total: plan.len(),
            running: 0,
            peak_running: 0,
            waiting: 0,
            stop: false,
            failed: None,
        }
    }

    fn finish(&mut self, plan: &ReplayPlan, outcome: Result<usize, ReplayError<E>>) {
        self.running = self.running.saturating_sub(1);
        match outcome {
            Ok(i) => {
                self.done += 1;
                self.released.clear();
                for &s in plan.dependents(i) {
                    if let Some(p) = self.pending.get_mut(s) {
                        *p = p.saturating_sub(1);
                        if *p == 0 {
                            self.released.push(s);
                        }
                    }
                }
                self.released
                    .sort_unstable_by_key(|&s| (plan.height(s), Reverse(s)));
                self.ready.extend_from_slice(&self.released);
            }
            Err(e) => {
                self.stop = true;
                self.failed.get_or_insert(e);
            }
        }
    }
}

enum Next {
    Run(usize),
    Exit,
}

/// One worker: repeatedly reports the record it finished and takes the next
/// ready one, until the plan is done or stopped. Returns how many records it
/// applied.
pub(crate) fn worker_loop<M, E, F>(m: &M, plan: &ReplayPlan, apply: &F) -> usize
where
    M: Monitor<SchedState<E>>,
    F: Fn(&RecordMeta) -> Result<(), E>,
{
    let mut applied = 0;
    let mut finished: Option<Result<usize, ReplayError<E>>> = None;
    loop {
        let mut asleep = false;
        let mut wake = 0usize;
        // Reporting the last record and taking the next share one lock
        // round trip; `finished` is taken on the first call only, the
        // closure is re-run after each wake-up.
        let next = m.enter(|st| {
            if asleep {
                st.waiting = st.waiting.saturating_sub(1);
                asleep = false;
            }
            if let Some(f) = finished.take() {
                st.finish(plan, f);
            }
            if st.stop || st.done >= st.total {
                return Some(Next::Exit);
            }
            if let Some(i) = st.ready.pop() {
                st.running += 1;
                st.peak_running = st.peak_running.max(st.running);
                wake = st.ready.len().min(st.waiting);
                return Some(Next::Run(i));
            }
            if st.running == 0 {
                st.failed.get_or_insert(ReplayError::Stalled {
                    done: st.done,
                    total: st.total,
                });
                st.stop = true;
                return Some(Next::Exit);
            }
            st.waiting += 1;
            asleep = true;
            None
        });
        let i = match next {
            Next::Exit => {
                // Whoever sees the end first wakes the sleepers so they see
                // it too.
                m.notify_all();
                return applied;
            }
            Next::Run(i) => i,
        };
        match wake {
            0 => {}
            1 => m.notify_one(),
            _ => m.notify_all(),
        }
        finished = Some(match plan.records().get(i) {
            Some(r) => {
                applied += 1;
                match catch_unwind(AssertUnwindSafe(|| apply(r))) {
                    Ok(Ok(())) => Ok(i),
                    Ok(Err(error)) => Err(ReplayError::Apply { seq: r.seq, error }),
                    Err(_) => Err(ReplayError::Panicked { seq: r.seq }),
                }
            }
            // Ready indices come from the plan itself; unreachable, but an
            // out-of-range index must not take a worker down.
            None => Ok(i),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MetaBarrier, Op, PlanOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    /// Diamond + independent chain + per-LUN barrier: every kind of edge.
    fn small_log() -> Vec<RecordMeta> {
        vec![
            rec(1, 0, 0, 2, Op::Write),
            rec(2, 0, 1, 1, Op::Write),
            rec(3, 0, 0, 1, Op::Unmap),
            rec(4, 1, 0, 4, Op::Write),
            rec(5, 0, 0, 2, Op::WriteSame),
            rec(6, 1, 2, 4, Op::CompareAndWrite),
            rec(7, 0, 0, 0, Op::Meta),
            rec(8, 0, 5, 1, Op::Write),
        ]
    }

    fn no_skip() -> PlanOptions {
        PlanOptions {
            skip_overwritten: false,
            ..PlanOptions::default()
        }
    }

    #[test]
    fn runs_every_record_once_in_order() {
        let plan = ReplayPlan::build_with(&small_log(), 0, no_skip());
        for threads in [0, 1, 2, 4, 64] {
            let order = Mutex::new(Vec::new());
            let stats = execute(&plan, threads, |r| {
                order.lock().unwrap().push(r.seq);
                Ok::<(), String>(())
            })
            .unwrap();
            let order = order.into_inner().unwrap();
            assert_eq!(stats.applied, plan.len());
            assert_eq!(stats.per_thread.iter().sum::<usize>(), plan.len());
            assert!(stats.threads >= 1 && stats.threads <= plan.len());
            let pos = |seq: u64| order.iter().position(|&s| s == seq).unwrap();
            for (i, r) in plan.records().iter().enumerate() {
                for &d in plan.dependencies(i) {
                    assert!(pos(plan.records()[d].seq) < pos(r.seq));
                }
            }
        }
    }

    #[test]
    fn released_work_wakes_a_sleeping_worker() {
        // Record 1 gates 2 and 3; 2 and 3 each wait for the other to start,
        // so this completes only if the worker asleep while 1 ran is woken
        // when 1 releases two records.
        let log = [
            rec(1, 0, 0, 2, Op::Write),
            rec(2, 0, 0, 1, Op::Write),
            rec(3, 0, 1, 1, Op::Write),
        ];
        let plan = ReplayPlan::build(&log, 0);
        let (tx2, rx2) = std::sync::mpsc::channel::<()>();
        let (tx3, rx3) = std::sync::mpsc::channel::<()>();
        let chans = [Mutex::new(Some((tx2, rx3))), Mutex::new(Some((tx3, rx2)))];
        let stats = execute(&plan, 2, |r| {
            if r.seq == 1 {
                // Give the other worker time to go to sleep.
                std::thread::sleep(Duration::from_millis(20));
                return Ok(());
            }
            let (tx, rx) = chans[(r.seq - 2) as usize]
                .lock()
                .unwrap()
                .take()
                .ok_or("ran twice")?;
            tx.send(()).map_err(|_| "partner gone")?;
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| "partner record never ran concurrently")
        })
        .unwrap();
        assert_eq!(stats.peak_parallel, 2);
    }

    #[test]
    fn real_threads_respect_order_on_a_large_plan() {
        use std::sync::atomic::AtomicBool;
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let log: Vec<RecordMeta> = (1..=5000u64)
            .map(|seq| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let op = if x % 97 == 0 { Op::Meta } else { Op::Write };
                rec(
                    seq,
                    (x % 3) as u32,
                    (x >> 8) % 2000,
                    1 + (x >> 20) as u32 % 8,
                    op,
                )
            })
            .collect();
        let plan = ReplayPlan::build(&log, 0);
        let index_of: std::collections::HashMap<u64, usize> = plan
            .records()
            .iter()
            .enumerate()
            .map(|(i, r)| (r.seq, i))
            .collect();
        for threads in [2, 4] {
            let done: Vec<AtomicBool> = (0..plan.len()).map(|_| AtomicBool::new(false)).collect();
            let stats = execute(&plan, threads, |r| {
                let i = index_of[&r.seq];
                for &d in plan.dependencies(i) {
                    if !done[d].load(Ordering::Acquire) {
                        return Err(format!("{} ran before {}", r.seq, plan.records()[d].seq));
                    }
                }
                if done[i].swap(true, Ordering::AcqRel) {
                    return Err(format!("{} ran twice", r.seq));
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(stats.applied, plan.len());
            assert!(done.iter().all(|d| d.load(Ordering::Relaxed)));
        }
    }

    #[test]
    fn first_error_stops_dependents() {
        let plan = ReplayPlan::build_with(&small_log(), 0, no_skip());
        let ran = Mutex::new(Vec::new());
        let err = execute(&plan, 2, |r| {
            ran.lock().unwrap().push(r.seq);
            if r.seq == 2 {
                Err("disk on fire")
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.seq(), Some(2));
        assert!(err.to_string().contains("disk on fire"));
        let ran = ran.into_inner().unwrap();
        // 3, 5, 7, 8 all (transitively) wait for 2.
        for s in [3, 5, 7, 8] {
            assert!(!ran.contains(&s), "{s} ran after its dependency failed");
        }
    }

    #[test]
    fn panic_in_apply_is_reported() {
        let plan = ReplayPlan::build(&small_log(), 0);
        let err = execute(&plan, 2, |r| {
            if r.seq == 4 {
                panic!("boom");
            }
            Ok::<(), String>(())
        })
        .unwrap_err();
        assert_eq!(err.seq(), Some(4));
        assert!(matches!(err, ReplayError::Panicked { seq: 4 }));
    }

    #[test]
    fn empty_plan() {
        let plan = ReplayPlan::build(&[], 0);
        let calls = AtomicUsize::new(0);
        let s = execute(&plan, 4, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!((s.applied, s.threads, calls.into_inner()), (0, 1, 0));
    }

    /// Model checking with shuttle: the same `worker_loop` and `SchedState`
    /// over shuttle's lock and condvar, several workers, random and PCT
    /// schedules. Shuttle also fails the test on a deadlock (all workers
    /// asleep), i.e. a lost wake-up.
    mod model {
        use super::*;
        use shuttle::sync::{Condvar as SCondvar, Mutex as SMutex};

        struct ShuttleMonitor<T> {
            lock: SMutex<T>,
            cv: SCondvar,
        }

        impl<T> Monitor<T> for ShuttleMonitor<T> {
            fn enter<R>(&self, mut f: impl FnMut(&mut T) -> Option<R>) -> R {
                let mut g = self.lock.lock().unwrap();
                loop {
                    if let Some(r) = f(&mut g) {
                        return r;
                    }
                    g = self.cv.wait(g).unwrap();
                }
            }
            fn notify_one(&self) {
                self.cv.notify_one();
            }
            fn notify_all(&self) {
                self.cv.notify_all();
            }
        }

        #[derive(Default)]
        struct Trace {
            started: Vec<usize>,
            finished: Vec<bool>,
        }

        /// Runs `plan` on `workers` shuttle threads; `fail` makes that
        /// record's apply fail. Checks order and exactly-once as it goes.
        fn run_model(plan: &ReplayPlan, workers: usize, fail: Option<usize>) {
            let m = ShuttleMonitor {
                lock: SMutex::new(SchedState::<usize>::new(plan)),
                cv: SCondvar::new(),
            };
            let trace = SMutex::new(Trace {
                started: Vec::new(),
                finished: vec![false; plan.len()],
            });
            let apply = |r: &RecordMeta| {
                let i = plan.records().iter().position(|x| x.seq == r.seq).unwrap();
                {
                    let mut t = trace.lock().unwrap();
                    assert!(!t.started.contains(&i), "record {i} started twice");
                    for &d in plan.dependencies(i) {
                        assert!(t.finished[d], "record {i} started before dependency {d}");
                    }
                    t.started.push(i);
                }
                // Let other workers run while this record is "in flight".
                shuttle::thread::yield_now();
                if fail == Some(i) {
                    return Err(i);
                }
                trace.lock().unwrap().finished[i] = true;
                Ok(())
            };
            let mut counts = Vec::new();
            shuttle::thread::scope(|s| {
                let hs: Vec<_> = (0..workers)
                    .map(|_| s.spawn(|| worker_loop(&m, plan, &apply)))
                    .collect();
                for h in hs {
                    counts.push(h.join().unwrap());
                }
            });
            let st = m.lock.into_inner().unwrap();
            let t = trace.into_inner().unwrap();
            assert_eq!(counts.iter().sum::<usize>(), t.started.len());
            match fail {
                None => {
                    assert!(st.failed.is_none());
                    assert_eq!(st.done, plan.len());
                    assert_eq!(t.started.len(), plan.len());
                    assert!(t.finished.iter().all(|&f| f));
                }
                Some(f) => {
                    assert!(
                        matches!(st.failed, Some(ReplayError::Apply { error, .. }) if error == f)
                    );
                    // Nothing downstream of the failed record ran.
                    let mut down = vec![f];
                    while let Some(x) = down.pop() {
                        for &s in plan.dependents(x) {
                            assert!(!t.started.contains(&s), "{s} ran after {f} failed");
                            down.push(s);
                        }
                    }
                }
            }
        }

        #[test]
        fn shuttle_random_schedules() {
            let plan = ReplayPlan::build_with(&small_log(), 0, no_skip());
            shuttle::check_random(move || run_model(&plan, 3, None), 3000);
        }

        #[test]
        fn shuttle_pct_schedules() {
            let plan = ReplayPlan::build_with(&small_log(), 0, no_skip());
            shuttle::check_pct(move || run_model(&plan, 3, None), 2000, 3);
        }

        #[test]
        fn shuttle_pseudo_random_plans() {
            // A few denser plans (overlaps, both barrier kinds, skipping on)
            // so the model sees wider fan-in and fan-out than `small_log`.
            for (seed, barrier) in [(7u64, MetaBarrier::Lun), (99, MetaBarrier::Global)] {
                let mut x = seed;
                let mut next = move |m: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % m
                };
                let ops = [Op::Write, Op::WriteSame, Op::Unmap, Op::Write, Op::Meta];
                let log: Vec<RecordMeta> = (1..=12)
                    .map(|seq| {
                        let op = ops[next(ops.len() as u64) as usize];
                        rec(seq, next(2) as u32, next(8), 1 + next(3) as u32, op)
                    })
                    .collect();
                let opts = PlanOptions {
                    meta_barrier: barrier,
                    skip_overwritten: true,
                };
                let plan = ReplayPlan::build_with(&log, 0, opts);
                assert!(plan.len() >= 6, "plan too small to be interesting");
                shuttle::check_random(move || run_model(&plan, 3, None), 1000);
            }
        }

        #[test]
        fn shuttle_failure_schedules() {
            let plan = ReplayPlan::build_with(&small_log(), 0, no_skip());
            // Record index 1 (seq 2) has dependents; index 3 (seq 4) is on
            // the other LUN's chain.
            let p2 = plan.clone();
            shuttle::check_random(move || run_model(&p2, 3, Some(1)), 1500);
            shuttle::check_pct(move || run_model(&plan, 2, Some(3)), 1000, 3);
        }
    }
}
