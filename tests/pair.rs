//! A local pair seen from initiators: one discovery finds both paths of
//! each target, and the partner's path returns the newest data whether it
//! answers a read from the mirrored log (live replay) or forwards it to the
//! owner.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, LoginOptions};

const A: &str = "iqn.2026-11.io.nvtarget:a";
const B: &str = "iqn.2026-11.io.nvtarget:b";
/// Blocks written and read back: 64 records of 4 KiB.
const UNITS: u64 = 64;

struct Pair {
    dir: std::path::PathBuf,
    port: u16,
}

impl Pair {
    fn up(tag: &str) -> Pair {
        let dir = temp_dir(tag);
        let port = free_port();
        let out = run(
            Command::new(binary())
                .args(["pair", "up", "--port", &port.to_string(), "--data-dir"])
                .arg(&dir),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "pair up failed\n{}", both(&out));
        Pair { dir, port }
    }

    /// Node `n`'s status.json (written every few heartbeats), once it
    /// exists and has the log section.
    fn status(&self, n: &str) -> serde_json::Value {
        self.wait_status(n, "status.json written", |_| true)
    }

    /// Waits until `f` holds for node `n`'s status; returns that status.
    fn wait_status(
        &self,
        n: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let path = self.dir.join(n).join("status.json");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let s = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .filter(|s| s["log"].is_object());
            if let Some(s) = s.filter(|s| f(s)) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "node {n}: {what} never held: {}",
                std::fs::read_to_string(&path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn partner_reads(&self, n: &str, key: &str) -> u64 {
        self.status(n)["partner_reads"][key].as_u64().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = run(
            Command::new(binary())
                .args([
                    "pair",
                    "down",
                    "--port",
                    &self.port.to_string(),
                    "--data-dir",
                ])
                .arg(&self.dir),
            Duration::from_secs(60),
        );
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn pattern(unit: u64, generation: u8) -> Bytes {
    let mut b = vec![generation; 4096];
    b[..8].copy_from_slice(&unit.to_be_bytes());
    Bytes::from(b)
}

async fn write_units(c: &Client, generation: u8) {
    for u in 0..UNITS {
        c.write16(0, u * 8, pattern(u, generation), 512, false)
            .await
            .unwrap();
    }
}

async fn check_units(c: &Client, generation: u8, through: &str) {
    for u in 0..UNITS {
        let got = c.read16(0, u * 8, 8, 512).await.unwrap();
        assert!(
            got == pattern(u, generation),
            "unit {u} read through {through}: generation {} (first bytes {:?}), want {generation}",
            got[8],
            &got[..16]
        );
    }
}

async fn login(addr: &str, initiator: &str) -> Client {
    let c = Client::connect(addr, &LoginOptions::new(initiator, A))
        .await
        .unwrap();
    c.clear_unit_attentions(0).await.unwrap();
    c
}

#[test]
fn one_discovery_lists_both_paths_of_each_target() {
    require_tool("iscsi-ls");
    let pair = Pair::up("pair-discovery");
    for node_ip in ["127.0.0.1", "127.0.0.2"] {
        let out = run(
            Command::new("iscsi-ls").arg(format!("iscsi://{node_ip}:{}", pair.port)),
            Duration::from_secs(30),
        );
        let text = stdout(&out);
        assert!(out.status.success(), "{}", both(&out));
        for t in [A, B] {
            for (ip, tpgt) in [("127.0.0.1", 1), ("127.0.0.2", 2)] {
                let line = format!("Target:{t} Portal:{ip}:{},{tpgt}", pair.port);
                assert!(
                    text.lines().any(|l| l.trim() == line),
                    "discovery through {node_ip} lacks `{line}`:\n{text}"
                );
            }
        }
    }
}

#[test]
fn partner_path_reads_newest_data_live_replayed_and_forwarded() {
    let pair = Pair::up("pair-reads");
    let on_a = format!("127.0.0.1:{}", pair.port);
    let on_b = format!("127.0.0.2:{}", pair.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // b answers from its log only while a mirrors to it.
        pair.wait_status("b", "a mirrors to b", |s| {
            s["partner_reads"]["owner_mirrored"] == true
        });
        let owner = login(&on_a, "iqn.2026-11.test:owner-path").await;
        let partner = login(&on_b, "iqn.2026-11.test:partner-path").await;

        // Just written through a: b holds every record in its mirrored log
        // and answers from it.
        write_units(&owner, 1).await;
        let live0 = pair.partner_reads("b", "live_replayed");
        check_units(&partner, 1, "b (mirrored log)").await;
        pair.wait_status("b", "live-replayed reads counted", |s| {
            s["partner_reads"]["live_replayed"].as_u64().unwrap() >= live0 + UNITS
        });

        // A CP on a prunes b's copies: the same reads are now forwarded.
        let last = pair.status("a")["log"]["next_seq"].as_u64().unwrap() - 1;
        pair.wait_status("a", "the CP covering the writes pruned them", |s| {
            s["log"]["pruned_seq"].as_u64().unwrap() >= last
        });
        // The prune reaches b over the interconnect a little later.
        pair.wait_status("b", "b pruned its copies of a's records", |s| {
            s["partner_reads"]["partner_pruned_seq"].as_u64().unwrap() >= last
        });
        let fwd0 = pair.partner_reads("b", "forwarded");
        check_units(&partner, 1, "b (forwarded)").await;
        pair.wait_status("b", "forwarded reads counted", |s| {
            s["partner_reads"]["forwarded"].as_u64().unwrap() >= fwd0 + UNITS
        });

        // Writes through b go to a; both paths see them at once.
        write_units(&partner, 2).await;
        check_units(&owner, 2, "a").await;
        check_units(&partner, 2, "b").await;

        // The largest transfer the LUN advertises (32 MiB) goes through
        // either path, written through one and read through the other.
        let big = |seed: u8| {
            Bytes::from(
                (0..32u32 << 20)
                    .map(|i| (i / 4096) as u8 ^ seed)
                    .collect::<Vec<u8>>(),
            )
        };
        let lba = 1 << 16;
        partner.write16(0, lba, big(7), 512, false).await.unwrap();
        assert!(owner.read16(0, lba, 65536, 512).await.unwrap() == big(7));
        owner.write16(0, lba, big(9), 512, false).await.unwrap();
        assert!(partner.read16(0, lba, 65536, 512).await.unwrap() == big(9));
        assert_eq!(pair.partner_reads("b", "forward_errors"), 0);

        owner.logout().await.unwrap();
        partner.logout().await.unwrap();
    });
}

/// libiscsi's task management and RESERVE(6) tests through the partner's
/// path (b for a's LUN): ABORT TASK of a WRITE in flight, LOGICAL UNIT
/// RESET, and RESERVE(6) released by logout, nexus loss and each reset.
/// Before, b refused task management for forwarded sessions (FUNCTION NOT
/// SUPPORTED: AbortTaskSimpleAsync failed) and neither resets nor nexus
/// loss reached the owner (Reserve6 Logout, ITNexusLoss, *Reset failed).
#[test]
fn task_management_and_reserve6_through_the_partner_path() {
    require_tool("iscsi-test-cu");
    let pair = Pair::up("pair-tmf");
    let url = format!("iscsi://127.0.0.2:{}/{A}/0", pair.port);
    for (suite, tests) in [
        (
            "iSCSI.iSCSITMF",
            &["AbortTaskSimpleAsync", "LUNResetSimpleAsync"][..],
        ),
        (
            "SCSI.Reserve6",
            &[
                "Simple",
                "2Initiators",
                "Logout",
                "ITNexusLoss",
                "TargetColdReset",
                "TargetWarmReset",
                "LUNReset",
            ][..],
        ),
    ] {
        let out = run(
            Command::new("iscsi-test-cu").args(["--dataloss", "-t", suite, &url]),
            Duration::from_secs(300),
        );
        let text = both(&out);
        // "tests  N  N  N  0  0": all ran, all passed, none failed.
        let n = tests.len();
        let want = format!("tests {n} {n} {n} 0 0");
        let summary = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .find(|l| l.starts_with("tests "));
        assert_eq!(
            summary.as_deref(),
            Some(want.as_str()),
            "{suite} through b:\n{text}"
        );
        for t in tests {
            assert!(
                text.contains(&format!("Test: {t} ...")),
                "{suite}.{t} did not run:\n{text}"
            );
        }
    }
}
