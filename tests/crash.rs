//! SIGKILL under load: every acknowledged write survives.
//!
//! A verifying client (client/src/verify.rs) writes unique patterns through
//! iSCSI at QD 32; the target is killed with SIGKILL at a random moment
//! (mid-write, mid-CP, mid-prune), restarted on the same data directory,
//! and every unit must read back as its newest acknowledged write (or a
//! write that was still unanswered when the target died). Rounds:
//! `NVT_CRASH_ROUNDS` (default 20; run 500 by hand).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nvtarget_client::verify::{deadline_in, Oracle};
use nvtarget_client::{Client, LoginOptions};

#[test]
fn acknowledged_writes_survive_sigkill() {
    let rounds: u32 = std::env::var("NVT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = temp_dir("crash");
    let mut target = Target::start(&dir, &[]);
    let port = target.port;
    let addr = format!("127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 16 MiB of 4 KiB units: small enough to verify each round in a blink,
    // big enough that QD 32 rarely waits for a busy unit.
    let oracle = Oracle::new(4096, 0, 512, 0x5eed);
    let mut rng: u64 = std::process::id() as u64 | 1;
    let (mut acked_total, mut landed_total) = (0u64, 0u64);
    let t0 = Instant::now();
    for round in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(150 + rng % 1500);
        let acked_before = oracle.acked_writes.load(Ordering::Relaxed);
        rt.block_on(async {
            let c = Arc::new(
                Client::connect(&addr, &LoginOptions::new(INIT1, TARGET_IQN))
                    .await
                    .unwrap(),
            );
            c.clear_unit_attentions(0).await.unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let load = {
                let o = oracle.clone();
                let c = c.clone();
                let stop = stop.clone();
                tokio::spawn(async move { o.run_load(c, 0, 32, stop, deadline_in(30.0)).await })
            };
            tokio::time::sleep(kill_after).await;
            target.kill();
            let _ = tokio::time::timeout(Duration::from_secs(40), load).await;
        });
        oracle.connection_lost();
        drop(target);
        target = Target::start_on(port, &dir, &[]);
        let rep = rt.block_on(async {
            let c = Client::connect(&addr, &LoginOptions::new(INIT1, TARGET_IQN))
                .await
                .unwrap();
            c.clear_unit_attentions(0).await.unwrap();
            let rep = oracle.verify(&c, 0).await.unwrap();
            c.logout().await.unwrap();
            rep
        });
        let acked = oracle.acked_writes.load(Ordering::Relaxed) - acked_before;
        acked_total += acked;
        landed_total += rep.in_flight_landed;
        println!(
            "round {round}: killed after {kill_after:?}, {acked} writes acknowledged, {} in-flight landed, lost {}, garbage {}",
            rep.in_flight_landed,
            rep.lost.len(),
            rep.garbage.len()
        );
        assert!(
            rep.ok(),
            "round {round}: acknowledged writes lost: {:?}; garbage units: {:?}\ntarget log:\n{}",
            &rep.lost[..rep.lost.len().min(10)],
            &rep.garbage[..rep.garbage.len().min(10)],
            target.log_text()
        );
    }
    println!(
        "crash: {rounds} rounds in {:?}, {acked_total} acknowledged writes, 0 lost, {landed_total} unacknowledged writes landed",
        t0.elapsed()
    );
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
