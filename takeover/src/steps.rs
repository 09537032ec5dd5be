//! The takeover sequence as a small dependency graph of named, timed steps.
//! The binary supplies the work of each step as a closure; this module only
//! decides when each may start and measures it.
//!
//! Invariants:
//! - a step starts only after every step it depends on finished `Ok`;
//!   dependencies name earlier steps, so the graph is acyclic by
//!   construction;
//! - a step whose dependency failed (or was cancelled) never starts: it is
//!   reported `Cancelled`. Steps independent of the failure still run to the
//!   end: interrupting, say, an address move halfway would leave more to undo
//!   than letting it finish; undoing is giveback's job;
//! - every step gets its own worker when threads can be had, so independent
//!   steps overlap; the calling thread is one of the workers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Names of the standard steps (see [`TakeoverPlan::standard`]).
pub const FENCE: &str = "fence";
pub const OPEN_AGGREGATE: &str = "open aggregate";
pub const RESTORE_STATE: &str = "restore PR/LUN state";
pub const REPLAY_LOG: &str = "replay log";
pub const TAKE_OVER_ADDRESS: &str = "take over portal address";
pub const FLIP_ALUA: &str = "flip ALUA";
pub const SERVE: &str = "serve";

/// Handle to a step of one [`TakeoverPlan`], for naming dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepId(usize);

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Done,
    Failed,
    /// The step's closure panicked (caught).
    Panicked,
    /// Not started because a step it depends on did not finish `Ok`.
    Cancelled,
}

/// Timing of one step. Offsets are from the start of [`TakeoverPlan::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub name: String,
    pub outcome: StepOutcome,
    pub started: Option<Duration>,
    pub finished: Option<Duration>,
}

impl StepReport {
    /// How long the step ran, if it ran.
    pub fn elapsed(&self) -> Option<Duration> {
        Some(self.finished?.saturating_sub(self.started?))
    }
}

/// Timings of a whole takeover, steps in the order they were added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverReport {
    pub steps: Vec<StepReport>,
    pub total: Duration,
}

impl TakeoverReport {
    pub fn step(&self, name: &str) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// Why a takeover plan could not be built or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError<E> {
    #[error("step {step:?} depends on a step that is not in this plan")]
    UnknownDependency { step: String },
    /// The first step to fail; `report` shows what else ran, failed or was
    /// cancelled.
    #[error("takeover step {step:?} failed: {error}")]
    StepFailed {
        step: String,
        error: E,
        report: TakeoverReport,
    },
    #[error("takeover step {step:?} panicked")]
    StepPanicked {
        step: String,
        report: TakeoverReport,
    },
}

type Work<'a, E> = Box<dyn FnOnce() -> Result<(), E> + Send + 'a>;

struct Step<'a, E> {
    name: String,
    deps: Vec<usize>,
    work: Option<Work<'a, E>>,
}

/// The takeover steps and their dependencies.
pub struct TakeoverPlan<'a, E> {
    steps: Vec<Step<'a, E>>,
}

impl<E> Default for TakeoverPlan<'_, E> {
    fn default() -> Self {
        Self { steps: Vec::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Waiting,
    Running,
    Ended(StepOutcome),
}

struct RunState<E> {
    status: Vec<Status>,
    started: Vec<Option<Duration>>,
    finished: Vec<Option<Duration>>,
    /// First failure, in completion order.
    first_error: Option<(usize, Option<E>)>,
}

impl<'a, E: Send> TakeoverPlan<'a, E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a step that starts once all `deps` finished `Ok`.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        deps: &[StepId],
        work: impl FnOnce() -> Result<(), E> + Send + 'a,
    ) -> Result<StepId, TakeoverError<E>> {
        let name = name.into();
        if deps.iter().any(|d| d.0 >= self.steps.len()) {
            return Err(TakeoverError::UnknownDependency { step: name });
        }
        self.steps.push(Step {
            name,
            deps: deps.iter().map(|d| d.0).collect(),
            work: Some(Box::new(work)),
        });
        Ok(StepId(self.steps.len() - 1))
    }

    /// The standard takeover graph:
    ///
    /// ```text
    /// fence ─┬─ open aggregate ── restore PR/LUN state ── replay log ─┬─ flip ALUA ── serve
    ///        └─ take over portal address ─────────────────────────────┘
    /// ```
    ///
    /// Nothing touches the failed node's storage or address before it is
    /// fenced. State is restored before the log is replayed because Meta
    /// records in the log (reservation changes since the last CP) apply on
    /// top of the state committed at that CP. ALUA flips (and the unit
    /// attention goes out) only once the data is current and the address is
    /// ours, so initiators that follow it find a LUN ready to serve.
    #[allow(clippy::too_many_arguments)]
    pub fn standard(
        fence: impl FnOnce() -> Result<(), E> + Send + 'a,
        open_aggregate: impl FnOnce() -> Result<(), E> + Send + 'a,
        restore_state: impl FnOnce() -> Result<(), E> + Send + 'a,
        replay_log: impl FnOnce() -> Result<(), E> + Send + 'a,
        take_over_address: impl FnOnce() -> Result<(), E> + Send + 'a,
        flip_alua: impl FnOnce() -> Result<(), E> + Send + 'a,
        serve: impl FnOnce() -> Result<(), E> + Send + 'a,
    ) -> Self {
        let mut p = Self::new();
        // Each id is fresh from this plan, so none of these can fail; the
        // fallbacks only keep the code panic-free.
        let f = p.add(FENCE, &[], fence).unwrap_or(StepId(0));
        let o = p.add(OPEN_AGGREGATE, &[f], open_aggregate).unwrap_or(f);
        let s = p.add(RESTORE_STATE, &[o], restore_state).unwrap_or(o);
        let r = p.add(REPLAY_LOG, &[s], replay_log).unwrap_or(s);
        let a = p
            .add(TAKE_OVER_ADDRESS, &[f], take_over_address)
            .unwrap_or(f);
        let u = p.add(FLIP_ALUA, &[r, a], flip_alua).unwrap_or(r);
        let _ = p.add(SERVE, &[u], serve);
        p
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the steps, independent ones concurrently, and reports each
    /// step's timing; on failure the error carries the report.
    pub fn run(self) -> Result<TakeoverReport, TakeoverError<E>> {
        let t0 = Instant::now();
        let n = self.steps.len();
        let mut names = Vec::with_capacity(n);
        let mut deps = Vec::with_capacity(n);
        let mut works = Vec::with_capacity(n);
        for s in self.steps {
            names.push(s.name);
            deps.push(s.deps);
            works.push(Mutex::new(s.work));
        }
        let state = Mutex::new(RunState::<E> {
            status: vec![Status::Waiting; n],
            started: vec![None; n],
            finished: vec![None; n],
            first_error: None,
        });
        let cv = Condvar::new();
        let worker = || Self::worker(&state, &cv, &deps, &works, t0);
        std::thread::scope(|s| {
            for i in 1..n {
                // Fewer threads only means less overlap, never a lost step:
                // any worker runs any ready step.
                let _ = std::thread::Builder::new()
                    .name(format!("takeover-{i}"))
                    .spawn_scoped(s, worker);
            }
            worker();
        });
        let st = state.into_inner().unwrap_or_else(PoisonError::into_inner);
        let report = TakeoverReport {
            steps: (0..n)
                .map(|i| StepReport {
                    name: names[i].clone(),
                    outcome: match st.status[i] {
                        Status::Ended(o) => o,
                        // Unreachable: workers only exit when nothing waits.
                        Status::Waiting | Status::Running => StepOutcome::Cancelled,
                    },
                    started: st.started[i],
                    finished: st.finished[i],
                })
                .collect(),
            total: t0.elapsed(),
        };
        match st.first_error {
            None => Ok(report),
            Some((i, Some(error))) => Err(TakeoverError::StepFailed {
                step: names[i].clone(),
                error,
                report,
            }),
            Some((i, None)) => Err(TakeoverError::StepPanicked {
                step: names[i].clone(),
                report,
            }),
        }
    }

    fn worker(
        state: &Mutex<RunState<E>>,
        cv: &Condvar,
        deps: &[Vec<usize>],
        works: &[Mutex<Option<Work<'a, E>>>],
        t0: Instant,
    ) {
        let mut g = state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Cancel what can no longer run, then pick something runnable.
            let mut pick = None;
            let mut changed = true;
            while changed {
                changed = false;
                for (i, di) in deps.iter().enumerate() {
                    if g.status.get(i) != Some(&Status::Waiting) {
                        continue;
                    }
                    // `add` only accepts earlier steps as dependencies, so
                    // every index is in range; a missing one counts as not
                    // done.
                    let ended = |d: &usize| match g.status.get(*d) {
                        Some(Status::Ended(o)) => Some(*o),
                        _ => None,
                    };
                    if di
                        .iter()
                        .any(|d| matches!(ended(d), Some(o) if o != StepOutcome::Done))
                    {
                        g.status[i] = Status::Ended(StepOutcome::Cancelled);
                        changed = true;
                    } else if pick.is_none()
                        && di.iter().all(|d| ended(d) == Some(StepOutcome::Done))
                    {
                        pick = Some(i);
                    }
                }
            }
            if let Some(i) = pick {
                g.status[i] = Status::Running;
                g.started[i] = Some(t0.elapsed());
                drop(g);
                let work = works[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let result = match work {
                    Some(w) => catch_unwind(AssertUnwindSafe(w)).map_err(|_| ()),
                    None => Ok(Ok(())),
                };
                g = state.lock().unwrap_or_else(PoisonError::into_inner);
                g.finished[i] = Some(t0.elapsed());
                let outcome = match result {
                    Ok(Ok(())) => StepOutcome::Done,
                    Ok(Err(e)) => {
                        if g.first_error.is_none() {
                            g.first_error = Some((i, Some(e)));
                        }
                        StepOutcome::Failed
                    }
                    Err(()) => {
                        if g.first_error.is_none() {
                            g.first_error = Some((i, None));
                        }
                        StepOutcome::Panicked
                    }
                };
                g.status[i] = Status::Ended(outcome);
                cv.notify_all();
                continue;
            }
            if !g.status.contains(&Status::Waiting) {
                cv.notify_all();
                return;
            }
            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Plan<'a> = TakeoverPlan<'a, String>;

    #[test]
    fn independent_steps_overlap() {
        // Each step waits for the other to have started: this only completes
        // if both run at the same time.
        let (tx_a, rx_a) = mpsc::channel::<()>();
        let (tx_b, rx_b) = mpsc::channel::<()>();
        let mut p = Plan::new();
        let rendezvous = |tx: mpsc::Sender<()>, rx: mpsc::Receiver<()>| {
            move || {
                tx.send(()).map_err(|e| e.to_string())?;
                rx.recv_timeout(Duration::from_secs(10))
                    .map_err(|e| format!("partner step never ran: {e}"))
            }
        };
        let root = p.add("root", &[], || Ok(())).unwrap();
        p.add("a", &[root], rendezvous(tx_a, rx_b)).unwrap();
        p.add("b", &[root], rendezvous(tx_b, rx_a)).unwrap();
        let r = p.run().unwrap();
        assert!(r.steps.iter().all(|s| s.outcome == StepOutcome::Done));
    }

    #[test]
    fn dependent_steps_do_not_overlap() {
        let log = Mutex::new(Vec::new());
        let step = |name: &'static str| {
            let log = &log;
            move || {
                log.lock().unwrap().push((name, "start"));
                std::thread::sleep(Duration::from_millis(5));
                log.lock().unwrap().push((name, "end"));
                Ok(())
            }
        };
        let p = Plan::standard(
            step(FENCE),
            step(OPEN_AGGREGATE),
            step(RESTORE_STATE),
            step(REPLAY_LOG),
            step(TAKE_OVER_ADDRESS),
            step(FLIP_ALUA),
            step(SERVE),
        );
        let r = p.run().unwrap();
        let log = log.into_inner().unwrap();
        let at = |n: &str, ev: &str| log.iter().position(|&(a, b)| a == n && b == ev).unwrap();
        let edges = [
            (FENCE, OPEN_AGGREGATE),
            (OPEN_AGGREGATE, RESTORE_STATE),
            (RESTORE_STATE, REPLAY_LOG),
            (FENCE, TAKE_OVER_ADDRESS),
            (REPLAY_LOG, FLIP_ALUA),
            (TAKE_OVER_ADDRESS, FLIP_ALUA),
            (FLIP_ALUA, SERVE),
        ];
        for (a, b) in edges {
            assert!(
                at(a, "end") < at(b, "start"),
                "{b} started before {a} ended"
            );
            let (ra, rb) = (r.step(a).unwrap(), r.step(b).unwrap());
            assert!(ra.finished.unwrap() <= rb.started.unwrap());
        }
        assert!(r
            .steps
            .iter()
            .all(|s| s.elapsed().unwrap() >= Duration::from_millis(5)));
    }

    #[test]
    fn failure_cancels_dependents_only() {
        let ran = Mutex::new(Vec::new());
        let ok = |name: &'static str| {
            let ran = &ran;
            move || {
                ran.lock().unwrap().push(name);
                Ok(())
            }
        };
        let p = Plan::standard(
            ok(FENCE),
            ok(OPEN_AGGREGATE),
            || Err("PR table corrupt".to_string()),
            ok(REPLAY_LOG),
            ok(TAKE_OVER_ADDRESS),
            ok(FLIP_ALUA),
            ok(SERVE),
        );
        let err = p.run().unwrap_err();
        let TakeoverError::StepFailed {
            step,
            error,
            report,
        } = err
        else {
            panic!("unexpected error");
        };
        assert_eq!(
            (step.as_str(), error.as_str()),
            (RESTORE_STATE, "PR table corrupt")
        );
        let outcome = |n| report.step(n).unwrap().outcome;
        assert_eq!(outcome(TAKE_OVER_ADDRESS), StepOutcome::Done);
        for n in [REPLAY_LOG, FLIP_ALUA, SERVE] {
            assert_eq!(outcome(n), StepOutcome::Cancelled);
            assert!(report.step(n).unwrap().started.is_none());
        }
        let ran = ran.into_inner().unwrap();
        assert!(!ran.contains(&SERVE) && !ran.contains(&REPLAY_LOG));
    }

    #[test]
    fn panics_and_bad_ids() {
        let mut p = Plan::new();
        let a = p.add("a", &[], || panic!("oops")).unwrap();
        p.add("b", &[a], || Ok(())).unwrap();
        let mut other = Plan::new();
        assert!(matches!(
            other.add("x", &[StepId(5)], || Ok(())),
            Err(TakeoverError::UnknownDependency { .. })
        ));
        match p.run() {
            Err(TakeoverError::StepPanicked { step, report }) => {
                assert_eq!(step, "a");
                assert_eq!(report.step("b").unwrap().outcome, StepOutcome::Cancelled);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Plan::new().run().unwrap().steps.is_empty());
    }
}
