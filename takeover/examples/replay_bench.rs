//! Replay throughput: sequential seq-order replay vs the planned parallel
//! replay, for logs with 0, 10, 50 and 100% overlapping records.
//!
//! Each record is one 4 KiB block. "Overlap p%" means p% of the records
//! write the same hot block (a single chain, the worst case for parallelism)
//! and the rest write distinct blocks. Applying a record copies 4 KiB from an
//! in-memory log region into an in-memory LUN and runs a few µs of CRC32C
//! over it (stand-in for checksum verification and block-map work).
//!
//! Usage: cargo run --release -p nvtarget-takeover --example replay_bench --
//!        [--records N] [--crc-rounds R] [--threads T] [--reps K] [--plan-only]
//!
//! Timings are the best of K runs (the machine is shared). Parallel columns
//! use a plan built without skipping, to measure the scheduler alone; the
//! "skip" column is what takeover does (plan with skipping, plan time
//! included).

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nvtarget_takeover::{execute, Op, PlanOptions, RecordMeta, ReplayPlan};

const BLOCK: usize = 4096;
const LOG_SLOTS: usize = 4096;

struct Args {
    records: usize,
    crc_rounds: usize,
    threads: usize,
    reps: usize,
    /// Time only plan building (for tuning the planner).
    plan_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        records: 100_000,
        crc_rounds: 16,
        threads: 4,
        reps: 5,
        plan_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--plan-only" {
            a.plan_only = true;
            continue;
        }
        let v: usize = it
            .next()
            .ok_or(format!("{k} needs a value"))?
            .parse()
            .map_err(|e| format!("{k}: {e}"))?;
        match k.as_str() {
            "--records" => a.records = v,
            "--crc-rounds" => a.crc_rounds = v,
            "--threads" => a.threads = v,
            "--reps" => a.reps = v.max(1),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(a)
}

struct Lun {
    blocks: Vec<Mutex<Vec<u8>>>,
}

impl Lun {
    fn new(n: usize) -> Self {
        Lun {
            blocks: (0..n).map(|_| Mutex::new(vec![0u8; BLOCK])).collect(),
        }
    }

    fn digest(&self) -> u32 {
        self.blocks.iter().fold(0, |c, b| {
            crc32c::crc32c_append(c, &b.lock().unwrap_or_else(|e| e.into_inner()))
        })
    }
}

fn make_log(records: usize, overlap_pct: u64) -> (Vec<RecordMeta>, usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut fresh = 1u64; // block 0 is the hot block
    let recs = (0..records)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = if x % 100 < overlap_pct {
                0
            } else {
                fresh += 1;
                fresh - 1
            };
            RecordMeta {
                seq: i as u64 + 1,
                lun: 0,
                lba,
                blocks: 1,
                op: Op::Write,
                location: ((i % LOG_SLOTS) * BLOCK) as u64,
            }
        })
        .collect();
    (recs, fresh as usize)
}

fn apply(lun: &Lun, log: &[u8], rounds: usize, r: &RecordMeta) -> Result<(), String> {
    let at = r.location as usize;
    let src = log
        .get(at..at + BLOCK)
        .ok_or_else(|| format!("record {} outside the log", r.seq))?;
    let mut c = 0;
    for _ in 0..rounds {
        c = crc32c::crc32c_append(c, src);
    }
    black_box(c);
    let blk = lun
        .blocks
        .get(r.lba as usize)
        .ok_or_else(|| format!("record {} outside the LUN", r.seq))?;
    blk.lock().map_err(|_| "poisoned")?.copy_from_slice(src);
    Ok(())
}

/// CPU time (user + system) of this process so far, from /proc (Linux), in
/// clock ticks: on a loaded machine wall time says what the machine gave us,
/// CPU time says what the replay cost.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), String> {
    let a = parse_args()?;
    let log: Vec<u8> = (0..LOG_SLOTS * BLOCK)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "records {}, 4 KiB each, crc rounds {}, cores {}, best of {}",
        a.records, a.crc_rounds, cores, a.reps
    );
    {
        // Cost of one apply, so the table can be read in µs per record.
        let lun = Lun::new(1);
        let r = RecordMeta {
            seq: 1,
            lun: 0,
            lba: 0,
            blocks: 1,
            op: Op::Write,
            location: 0,
        };
        let t = Instant::now();
        for _ in 0..10_000 {
            apply(&lun, &log, a.crc_rounds, &r)?;
        }
        println!(
            "apply cost ~{:.2} µs/record",
            t.elapsed().as_secs_f64() * 1e6 / 1e4
        );
    }
    if !a.plan_only {
        print_header(&a);
    }
    run_rows(&a, &log)
}

fn print_header(a: &Args) {
    println!(
        "{:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8}",
        "overlap",
        "skipped",
        "plan ms",
        "seq ms",
        "par1 ms",
        "par2 ms",
        format!("par{} ms", a.threads),
        "x (2t)",
        format!("x ({}t)", a.threads),
        "skip2 ms",
        "x skip",
        "ideal2 ms",
        "x ideal",
        "cpu2/seq"
    );
}

fn run_rows(a: &Args, log: &[u8]) -> Result<(), String> {
    for overlap in [0u64, 10, 50, 100] {
        let (recs, nblocks) = make_log(a.records, overlap);
        if a.plan_only {
            let mut best = [Duration::MAX; 2];
            for _ in 0..a.reps {
                for (k, skip) in [false, true].into_iter().enumerate() {
                    let opts = PlanOptions {
                        skip_overwritten: skip,
                        ..PlanOptions::default()
                    };
                    let t = Instant::now();
                    black_box(ReplayPlan::build_with(&recs, 0, opts));
                    best[k] = best[k].min(t.elapsed());
                }
            }
            println!(
                "{overlap:>6}% plan {:.1} ms, with skipping {:.1} ms",
                ms(best[0]),
                ms(best[1])
            );
            continue;
        }
        let lun = Lun::new(nblocks);
        let ap = |r: &RecordMeta| apply(&lun, log, a.crc_rounds, r);

        let no_skip = PlanOptions {
            skip_overwritten: false,
            ..PlanOptions::default()
        };
        let mut plan_time = Duration::MAX;
        let mut plan = ReplayPlan::default();
        for _ in 0..a.reps {
            let t = Instant::now();
            plan = ReplayPlan::build_with(&recs, 0, no_skip);
            plan_time = plan_time.min(t.elapsed());
        }

        // Variants run interleaved, `reps` rounds, best time kept per
        // variant: on a shared machine the minimum is the least disturbed
        // run, and interleaving gives every variant the same chances.
        let mut seq = Duration::MAX;
        let mut par = [Duration::MAX; 3];
        let mut skip2 = Duration::MAX;
        let mut ideal2 = Duration::MAX;
        let (mut seq_cpu, mut par2_cpu) = (0u64, 0u64);
        let mut skipped = 0;
        let mut want = None;
        for _ in 0..a.reps {
            let (t, c) = (Instant::now(), cpu_ticks());
            for r in &recs {
                ap(r)?;
            }
            seq = seq.min(t.elapsed());
            seq_cpu += cpu_ticks().zip(c).map_or(0, |(b, a)| b - a);
            let digest = lun.digest();
            let want = *want.get_or_insert(digest);
            for (k, threads) in [1, 2, a.threads].into_iter().enumerate() {
                let (t, c) = (Instant::now(), cpu_ticks());
                execute(&plan, threads, ap).map_err(|e| e.to_string())?;
                par[k] = par[k].min(t.elapsed());
                if k == 1 {
                    par2_cpu += cpu_ticks().zip(c).map_or(0, |(b, a)| b - a);
                }
                if lun.digest() != want {
                    return Err(format!("{threads}-thread replay diverged at {overlap}%"));
                }
            }
            let t = Instant::now();
            let p = ReplayPlan::build(&recs, 0);
            execute(&p, 2, ap).map_err(|e| e.to_string())?;
            skip2 = skip2.min(t.elapsed());
            skipped = p.stats().skipped;
            if lun.digest() != want {
                return Err(format!("skipping replay diverged at {overlap}%"));
            }
            // What two cores give right now with no scheduling at all (each
            // thread applies half the records, order ignored): the ceiling
            // for par2 on this machine at this moment.
            let t = Instant::now();
            let (left, right) = recs.split_at(recs.len() / 2);
            let halves: Vec<Result<(), String>> = std::thread::scope(|s| {
                let h = s.spawn(|| left.iter().try_for_each(ap));
                let r = right.iter().try_for_each(ap);
                vec![h.join().unwrap_or(Err("ideal thread panicked".into())), r]
            });
            halves.into_iter().collect::<Result<Vec<()>, String>>()?;
            ideal2 = ideal2.min(t.elapsed());
        }

        println!(
            "{:>6}% {:>8} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.2}x {:>7.2}x {:>10.1} {:>7.2}x {:>10.1} {:>7.2}x {:>8.2}",
            overlap,
            skipped,
            ms(plan_time),
            ms(seq),
            ms(par[0]),
            ms(par[1]),
            ms(par[2]),
            seq.as_secs_f64() / par[1].as_secs_f64(),
            seq.as_secs_f64() / par[2].as_secs_f64(),
            ms(skip2),
            seq.as_secs_f64() / skip2.as_secs_f64(),
            ms(ideal2),
            seq.as_secs_f64() / ideal2.as_secs_f64(),
            par2_cpu as f64 / seq_cpu.max(1) as f64,
        );
    }
    if a.plan_only {
        return Ok(());
    }
    println!(
        "(x = sequential / parallel; par columns exclude plan building, skip2 includes it;\n \
         ideal2 = two threads, no dependencies, no scheduler: what the machine allowed;\n \
         cpu2/seq = CPU time of 2-thread replay / CPU time of sequential, summed over reps)"
    );
    Ok(())
}
