//! libiscsi's command-line tools and our own initiator against a real
//! `nvtarget serve`: discovery, inquiry, capacity, two initiators at once,
//! and data that survives a restart (clean and SIGKILL).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, LoginOptions};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A block of `bs` bytes that names its writer, LBA and generation, so any
/// misplaced, stale or torn block is recognisable.
fn pattern(tag: u8, lba: u64, generation: u32, bs: usize) -> Vec<u8> {
    let mut v = vec![0u8; bs];
    for (i, c) in v.chunks_mut(16).enumerate() {
        c[0] = tag;
        c[1..9].copy_from_slice(&lba.to_be_bytes());
        c[9..13].copy_from_slice(&generation.to_be_bytes());
        c[13..16].copy_from_slice(&(i as u32).to_be_bytes()[1..]);
    }
    v
}

#[test]
fn libiscsi_tools_work() {
    for t in ["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"] {
        require_tool(t);
    }
    let dir = temp_dir("tools");
    let target = Target::start(&dir, &[]);
    let ls = run(
        Command::new("iscsi-ls")
            .args(["-s", "-i", INIT1])
            .arg(target.portal()),
        Duration::from_secs(30),
    );
    let text = both(&ls);
    assert!(ls.status.success(), "iscsi-ls failed:\n{text}");
    assert!(
        text.contains(TARGET_IQN),
        "iscsi-ls does not list the target:\n{text}"
    );
    assert!(
        text.contains("Lun:0"),
        "iscsi-ls does not list LUN 0:\n{text}"
    );

    let inq = run(
        Command::new("iscsi-inq").arg(target.url(0)),
        Duration::from_secs(30),
    );
    let text = both(&inq);
    assert!(inq.status.success(), "iscsi-inq failed:\n{text}");
    assert!(text.contains("NVTARGET"), "vendor missing:\n{text}");

    let cap = run(
        Command::new("iscsi-readcapacity16").arg(target.url(0)),
        Duration::from_secs(30),
    );
    let text = both(&cap);
    assert!(cap.status.success(), "iscsi-readcapacity16 failed:\n{text}");
    assert!(text.contains("1073741824"), "size is not 1 GiB:\n{text}");

    // A target that doesn't exist is refused at login, not hung.
    let bad = run(
        Command::new("iscsi-inq").arg(format!(
            "iscsi://127.0.0.1:{}/iqn.2026-11.io.nvtarget:nope/0",
            target.port
        )),
        Duration::from_secs(30),
    );
    assert!(!bad.status.success(), "login to a missing target succeeded");
}

#[test]
fn two_initiators_and_data_survives_restart() {
    let dir = temp_dir("restart");
    let mut target = Target::start(&dir, &[]);
    let addr = format!("127.0.0.1:{}", target.port);
    let rt = rt();
    const BLOCKS: u64 = 256;
    rt.block_on(async {
        let a = Client::connect(&addr, &LoginOptions::new(INIT1, TARGET_IQN))
            .await
            .unwrap();
        let b = Client::connect(&addr, &LoginOptions::new(INIT2, TARGET_IQN))
            .await
            .unwrap();
        a.clear_unit_attentions(0).await.unwrap();
        b.clear_unit_attentions(0).await.unwrap();
        let (nblocks, bs) = a.capacity(0).await.unwrap();
        assert_eq!(nblocks * bs as u64, 1 << 30);
        // Both sessions write at once, interleaved blocks, 8 KiB each.
        let wa = async {
            for i in (0..BLOCKS).step_by(2) {
                let d: Vec<u8> = [
                    pattern(0xa, i * 16, 1, 4096),
                    pattern(0xa, i * 16 + 8, 1, 4096),
                ]
                .concat();
                a.write16(0, i * 16, Bytes::from(d), bs, false)
                    .await
                    .unwrap();
            }
        };
        let wb = async {
            for i in (1..BLOCKS).step_by(2) {
                let d: Vec<u8> = [
                    pattern(0xb, i * 16, 1, 4096),
                    pattern(0xb, i * 16 + 8, 1, 4096),
                ]
                .concat();
                b.write16(0, i * 16, Bytes::from(d), bs, false)
                    .await
                    .unwrap();
            }
        };
        tokio::join!(wa, wb);
        // Each sees the other's writes.
        for i in 0..BLOCKS {
            let tag = if i % 2 == 0 { 0xa } else { 0xb };
            let got = b.read16(0, i * 16, 16, bs).await.unwrap();
            let want = [
                pattern(tag, i * 16, 1, 4096),
                pattern(tag, i * 16 + 8, 1, 4096),
            ]
            .concat();
            assert!(got[..] == want[..], "block {i} differs");
        }
        // The target reports a write-back cache: make the writes stable
        // before the SIGKILL round below.
        a.sync_cache(0).await.unwrap();
        a.logout().await.unwrap();
        b.logout().await.unwrap();
    });

    // Clean restart, then a SIGKILL restart: the data is there both times.
    for round in 0..2 {
        if round == 0 {
            target.stop();
        } else {
            target.kill();
        }
        let port = target.port;
        drop(target);
        target = Target::start_on(port, &dir, &[]);
        rt.block_on(async {
            let c = Client::connect(&addr, &LoginOptions::new(INIT1, TARGET_IQN))
                .await
                .unwrap();
            c.clear_unit_attentions(0).await.unwrap();
            for i in 0..BLOCKS {
                let tag = if i % 2 == 0 { 0xa } else { 0xb };
                let got = c.read16(0, i * 16, 16, 512).await.unwrap();
                let want = [
                    pattern(tag, i * 16, 1, 4096),
                    pattern(tag, i * 16 + 8, 1, 4096),
                ]
                .concat();
                assert!(
                    got[..] == want[..],
                    "after restart {round}: block {i} differs"
                );
            }
            c.logout().await.unwrap();
        });
    }
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
