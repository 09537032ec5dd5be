//! The metrics endpoint moves with the load: per-LUN operations, bytes and
//! latency buckets for reads and writes; sessions and connections while the
//! load runs; NVRAM log records and fill; consistency points.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, LoginOptions};

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    out
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn counters_follow_the_load() {
    let dir = temp_dir("metrics");
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let target = Target::start(&dir, &["--metrics", &maddr]);
    let labels = |op: &str| format!("{{target=\"{TARGET_IQN}\",lun=\"0\",op=\"{op}\"}}");
    let before = scrape(mport);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(
            &format!("127.0.0.1:{}", target.port),
            &LoginOptions::new(INIT1, TARGET_IQN),
        )
        .await
        .unwrap();
        c.clear_unit_attentions(0).await.unwrap();
        for i in 0..100u64 {
            c.write16(0, i * 8, Bytes::from(vec![i as u8; 4096]), 512, false)
                .await
                .unwrap();
        }
        for i in 0..50u64 {
            c.read16(0, i * 8, 8, 512).await.unwrap();
        }
        c.logout().await.unwrap();
    });
    let after = scrape(mport);
    let delta = |name: &str, op: &str| {
        let p = format!("{name}{}", labels(op));
        sample(&after, &p) - sample(&before, &p)
    };
    assert!(delta("nvtarget_lun_ops_total", "write") >= 100.0, "{after}");
    assert!(delta("nvtarget_lun_ops_total", "read") >= 50.0, "{after}");
    assert!(
        delta("nvtarget_lun_bytes_total", "write") >= 409600.0,
        "{after}"
    );
    assert!(
        delta("nvtarget_lun_bytes_total", "read") >= 204800.0,
        "{after}"
    );
    assert!(
        delta("nvtarget_lun_latency_seconds_count", "write") >= 100.0,
        "{after}"
    );
    // Some latency bucket below +Inf counted the writes.
    let bucket = after
        .lines()
        .filter(|l| {
            l.starts_with("nvtarget_lun_latency_seconds_bucket") && l.contains("op=\"write\"")
        })
        .find(|l| !l.contains("+Inf"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap());
    assert!(bucket.is_some(), "{after}");
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small NVRAM log so the load fills halves and drives CPs; metrics on
/// from the configuration (`node.metrics`), not the command line.
#[test]
fn sessions_nvram_and_cps_follow_the_load() {
    let dir = temp_dir("metrics-ops");
    let mport = free_port();
    let cfg = dir.join("nvtarget.toml");
    let text = std::fs::read_to_string("examples/default.toml")
        .unwrap()
        .replace(
            "[node]\n",
            &format!("[node]\nnvram_size = \"4MiB\"\nmetrics = \"127.0.0.1:{mport}\"\n"),
        );
    std::fs::write(&cfg, text).unwrap();
    let target = Target::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let port = target.port;
    let before = scrape(mport);
    assert_eq!(sample(&before, "nvtarget_connections "), 0.0, "{before}");
    let sessions = format!("nvtarget_sessions{{target=\"{TARGET_IQN}\"}}");
    assert_eq!(sample(&before, &sessions), 0.0, "{before}");

    const WRITES: u64 = 200;
    let logged_in = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let (logged_in, done) = (logged_in.clone(), done.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let c = Client::connect(
                    &format!("127.0.0.1:{port}"),
                    &LoginOptions::new(INIT1, TARGET_IQN),
                )
                .await
                .unwrap();
                c.clear_unit_attentions(0).await.unwrap();
                logged_in.store(true, Ordering::Release);
                // 200 x 64 KiB = 12.5 MiB through a 4 MiB log: CPs must run.
                for i in 0..WRITES {
                    c.write16(0, i * 128, Bytes::from(vec![i as u8; 65536]), 512, false)
                        .await
                        .unwrap();
                    if i % 20 == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                done.store(true, Ordering::Release);
                // Stay logged in until the main thread has looked.
                while done.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                c.logout().await.unwrap();
            });
        })
    };
    while !logged_in.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Scrapes during the load.
    let mut saw_fill = false;
    let mut during = String::new();
    while !done.load(Ordering::Acquire) {
        during = scrape(mport);
        assert_eq!(sample(&during, &sessions), 1.0, "{during}");
        assert!(sample(&during, "nvtarget_connections ") >= 1.0, "{during}");
        saw_fill |= (0..2).any(|h| {
            sample(
                &during,
                &format!("nvtarget_nvram_half_used_bytes{{half=\"{h}\"}}"),
            ) > 0.0
        });
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(!during.is_empty(), "the load ended before any scrape");
    assert!(saw_fill, "no NVRAM half ever held a record: {during}");
    let after = scrape(mport);
    done.store(false, Ordering::Release);
    load.join().unwrap();

    let delta = |p: &str| sample(&after, p) - sample(&before, p);
    assert!(
        delta("nvtarget_nvram_records_total") >= WRITES as f64,
        "{after}"
    );
    assert!(
        delta("nvtarget_nvram_bytes_total") >= (WRITES * 65536) as f64,
        "{after}"
    );
    assert!(delta("nvtarget_cp_total") >= 2.0, "{after}");
    assert!(
        delta("nvtarget_cp_duration_seconds_count") >= 2.0,
        "{after}"
    );
    let cap = sample(&after, "nvtarget_nvram_half_capacity_bytes ");
    assert!(cap > 0.0 && cap < (4 << 20) as f64, "{after}");
    // Not a pair: no HA series.
    assert!(!after.contains("nvtarget_ha_state{"), "{after}");

    // Logged out: the session and its connection are gone.
    let mut gone = String::new();
    for _ in 0..100 {
        gone = scrape(mport);
        if sample(&gone, &sessions) == 0.0 && sample(&gone, "nvtarget_connections ") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sample(&gone, &sessions), 0.0, "{gone}");
    assert_eq!(sample(&gone, "nvtarget_connections "), 0.0, "{gone}");
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
