//! The metrics endpoint moves with the load: per-LUN operations, bytes and
//! latency buckets for reads and writes.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

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
