//! Appends/s of 4 KiB records, `process` vs `power` mode, N threads, with a
//! CP thread pruning halves as they fill. Run in release:
//! `cargo run --release -p nvtarget-nvram --example append_bench [DIR] [SECS]`
//! (DIR defaults to the temp dir; put it on the device you care about).

use nvtarget_nvram::{Durability, Log, Op, RecordMeta, RegionConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn main() -> anyhow_free::Result {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let dir = dir.join(format!("nvram-bench-{}", std::process::id()));
    println!(
        "{:<8} {:>7} {:>12} {:>10} {:>10} {:>8}",
        "mode", "threads", "appends/s", "MiB/s", "appends/sync", "cps"
    );
    for durability in [Durability::Process, Durability::Power] {
        for threads in [1u64, 4, 16] {
            std::fs::create_dir_all(&dir)?;
            let cfg = RegionConfig {
                size: 64 << 20,
                durability,
            };
            let (log, mut replay) = Log::open_dir(&dir, cfg, 0)?;
            if let Some(t) = replay.take_ticket() {
                log.cp_done(t)?;
            }
            let stop = AtomicBool::new(false);
            let count = AtomicU64::new(0);
            let start = Instant::now();
            thread::scope(|s| {
                for t in 0..threads {
                    let (log, stop, count) = (&log, &stop, &count);
                    s.spawn(move || {
                        let data = vec![t as u8; 4096];
                        let mut lba = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let m = RecordMeta::data(Op::WRITE, t as u32, lba, 8, 0);
                            // As the binary will: apply (here a no-op) in seq order.
                            if log.append_with(&m, &data, |_| ()).is_err() {
                                break;
                            }
                            lba += 8;
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let (log, stop) = (&log, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if log.wait_cp_needed(Duration::from_millis(10)) {
                            match log.begin_cp() {
                                Ok(t) => {
                                    let _ = log.cp_done(t);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                });
                thread::sleep(Duration::from_secs_f64(secs));
                stop.store(true, Ordering::Relaxed);
            });
            let el = start.elapsed().as_secs_f64();
            let st = log.stats();
            let n = count.load(Ordering::Relaxed) as f64;
            let per_sync = if st.syncs > 0 {
                format!("{:.1}", st.appended as f64 / st.syncs as f64)
            } else {
                "-".into()
            };
            println!(
                "{:<8} {:>7} {:>12.0} {:>10.1} {:>10} {:>8}",
                format!("{durability:?}"),
                threads,
                n / el,
                n * 4096.0 / el / (1 << 20) as f64,
                per_sync,
                st.cps
            );
            drop(log);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    Ok(())
}

/// The crate has no anyhow; a boxed error is enough for an example.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
