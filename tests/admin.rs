//! The admin socket of a running target: `nvtarget status --json` with live
//! sessions, and live configuration changes (LUN, ACL, CHAP) that apply at
//! once and come back after a restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, ClientError, LoginOptions};
use serde_json::Value;

fn nvt(args: &[&str]) -> std::process::Output {
    run(Command::new(binary()).args(args), Duration::from_secs(60))
}

fn status_json(dir: &str) -> Value {
    let o = nvt(&["status", "--json", "--data-dir", dir]);
    assert!(o.status.success(), "{}", both(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", both(&o)))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn login(port: u16, initiator: &str) -> Result<Client, ClientError> {
    Client::connect(
        &format!("127.0.0.1:{port}"),
        &LoginOptions::new(initiator, TARGET_IQN),
    )
    .await
}

#[test]
fn status_json_shows_two_sessions_luns_and_nvram() {
    let dir = temp_dir("status");
    let d = dir.to_str().unwrap();
    let target = Target::start(&dir, &[]);
    let rt = rt();
    let (c1, c2) = rt.block_on(async {
        let c1 = login(target.port, INIT1).await.unwrap();
        let c2 = login(target.port, INIT2).await.unwrap();
        c1.clear_unit_attentions(0).await.unwrap();
        for i in 0..16u64 {
            c1.write16(0, i * 128, Bytes::from(vec![0x5a; 64 * 1024]), 512, false)
                .await
                .unwrap();
        }
        (c1, c2)
    });

    let v = status_json(d);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{v:#}");
    for ini in [INIT1, INIT2] {
        let s = sessions
            .iter()
            .find(|s| s["initiator"] == ini)
            .unwrap_or_else(|| panic!("no session of {ini}: {v:#}"));
        assert_eq!(s["target"], TARGET_IQN);
        let peer = s["peer"].as_str().unwrap();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        assert_eq!(s["portal"], format!("127.0.0.1:{}", target.port));
        assert!(s["tsih"].as_u64().unwrap() > 0);
    }
    assert_ne!(sessions[0]["peer"], sessions[1]["peer"]);
    assert!(v["connections"].as_i64().unwrap() >= 2, "{v:#}");

    let t = &v["targets"][0];
    assert_eq!(t["name"], TARGET_IQN);
    assert_eq!(t["chap"], false);
    assert_eq!(t["alua"][0]["state"], "active/optimized", "{v:#}");
    let lun = &t["luns"][0];
    assert_eq!(lun["id"], 0);
    assert_eq!(lun["backend"], "store");
    assert_eq!(lun["size_bytes"], 1u64 << 30);
    assert_eq!(lun["block_size"], 512);
    // 16 writes of 64 KiB, counted whether or not a CP has run yet.
    assert!(lun["used_bytes"].as_u64().unwrap() >= 1 << 20, "{v:#}");

    let nv = &v["nvram"];
    assert_eq!(nv["durability"], "process");
    assert!(nv["half_capacity_bytes"].as_u64().unwrap() > 0);
    assert!(nv["records"].as_u64().unwrap() >= 16, "{v:#}");
    assert!(nv["durable_seq"].as_u64().unwrap() >= 16, "{v:#}");
    assert!(v["cp"]["generation"].as_u64().is_some(), "{v:#}");
    assert!(v["partner"].is_null());

    // One logs out: one session left, the other's.
    rt.block_on(async { c2.logout().await.unwrap() });
    let v = status_json(d);
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{v:#}");
    assert_eq!(sessions[0]["initiator"], INIT1);

    // The human form names the same things.
    let o = nvt(&["status", "--data-dir", d]);
    let text = stdout(&o);
    assert!(
        text.contains(INIT1) && text.contains("lun 0 default"),
        "{text}"
    );
    rt.block_on(async { c1.logout().await.unwrap() });
    drop(target);
    // Nothing listens any more: a clear error, not a hang.
    let o = nvt(&["status", "--data-dir", d]);
    assert!(!o.status.success());
    assert!(both(&o).contains("is `nvtarget serve"), "{}", both(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

const REPORTED_LUNS_CHANGED: (u8, u8, u8) = (0x6, 0x3f, 0x0e);

/// The LUN ids REPORT LUNS lists.
async fn report_luns(c: &Client) -> Vec<u64> {
    let cdb = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = c
        .command(0, &cdb, Bytes::new(), 4096)
        .await
        .unwrap()
        .check()
        .unwrap();
    let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize / 8;
    (0..n)
        .map(|i| {
            let b = &r.data[8 + i * 8..16 + i * 8];
            (u16::from_be_bytes([b[0], b[1]]) & 0x3fff) as u64
        })
        .collect()
}

#[test]
fn live_config_changes_apply_and_survive_restart() {
    let dir = temp_dir("live");
    let d = dir.to_str().unwrap();
    let mut target = Target::start(&dir, &[]);
    let port = target.port;
    let rt = rt();
    let c1 = rt.block_on(async {
        let c = login(port, INIT1).await.unwrap();
        c.clear_unit_attentions(0).await.unwrap();
        c
    });

    // A new LUN: the session logged in hears about it and sees it.
    let o = nvt(&[
        "lun",
        "add",
        "--data-dir",
        d,
        "--target",
        TARGET_IQN,
        "--lun",
        "1",
        "--size",
        "64MiB",
    ]);
    assert!(o.status.success(), "{}", both(&o));
    rt.block_on(async {
        let r = c1.command(0, &[0; 6], Bytes::new(), 0).await.unwrap();
        assert_eq!(r.status, 0x02, "expected a unit attention");
        assert_eq!(r.sense_code(), REPORTED_LUNS_CHANGED);
    });
    assert_eq!(rt.block_on(report_luns(&c1)), vec![0, 1]);
    rt.block_on(async {
        c1.clear_unit_attentions(1).await.unwrap();
        assert_eq!(c1.capacity(1).await.unwrap(), ((64 << 20) / 512, 512));
        c1.write16(1, 0, Bytes::from(vec![0x77; 4096]), 512, false)
            .await
            .unwrap();
    });
    // A mistake is refused and changes nothing.
    let o = nvt(&[
        "lun",
        "add",
        "--data-dir",
        d,
        "--target",
        TARGET_IQN,
        "--lun",
        "2",
        "--size",
        "1TiB",
    ]);
    assert!(!o.status.success());
    assert!(
        both(&o).contains("larger than the aggregate"),
        "{}",
        both(&o)
    );
    assert_eq!(rt.block_on(report_luns(&c1)), vec![0, 1]);

    // Only INIT1 from now on: INIT2's next login is refused at once.
    let o = nvt(&[
        "acl",
        "add",
        "--data-dir",
        d,
        "--target",
        TARGET_IQN,
        "--initiator",
        INIT1,
    ]);
    assert!(o.status.success(), "{}", both(&o));
    rt.block_on(async {
        match login(port, INIT2).await {
            Err(ClientError::Login { class: 2, .. }) => {}
            Err(e) => panic!("INIT2: {e}"),
            Ok(_) => panic!("INIT2 logged in after the ACL excluded it"),
        }
        login(port, INIT1).await.unwrap().logout().await.unwrap();
    });

    // CHAP required: a login without it fails; cleared, it works again.
    let o = nvt(&[
        "chap",
        "set",
        "--data-dir",
        d,
        "--target",
        TARGET_IQN,
        "--user",
        "u1",
        "--secret",
        "secret-of-12",
    ]);
    assert!(o.status.success(), "{}", both(&o));
    rt.block_on(async {
        assert!(login(port, INIT1).await.is_err(), "logged in without CHAP");
    });
    let saved = std::fs::read_to_string(dir.join("nvtarget.toml")).unwrap();
    assert!(saved.contains("secret-of-12"), "{saved}");
    let o = nvt(&["chap", "clear", "--data-dir", d, "--target", TARGET_IQN]);
    assert!(o.status.success(), "{}", both(&o));
    rt.block_on(async { login(port, INIT1).await.unwrap().logout().await.unwrap() });
    rt.block_on(async { c1.logout().await.unwrap() });

    // Saved to DATA_DIR/nvtarget.toml (no --config) and loaded from there.
    let saved = std::fs::read_to_string(dir.join("nvtarget.toml")).unwrap();
    assert!(saved.contains("id = 1") && saved.contains(INIT1), "{saved}");
    assert!(!saved.contains("secret-of-12"), "{saved}");
    let o = nvt(&[
        "config",
        "check",
        dir.join("nvtarget.toml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", both(&o));
    target.stop();
    drop(target);
    let target = Target::start_on(port, &dir, &[]);
    rt.block_on(async {
        assert!(login(port, INIT2).await.is_err(), "the ACL was not kept");
        let c = login(port, INIT1).await.unwrap();
        c.clear_unit_attentions(1).await.unwrap();
        assert_eq!(c.capacity(1).await.unwrap(), ((64 << 20) / 512, 512));
        let got = c.read16(1, 0, 8, 512).await.unwrap();
        assert!(got.iter().all(|&b| b == 0x77));
        c.logout().await.unwrap();
    });

    // Removing the LUN: gone from REPORT LUNS and from the file.
    let o = nvt(&[
        "lun",
        "remove",
        "--data-dir",
        d,
        "--target",
        TARGET_IQN,
        "--lun",
        "1",
    ]);
    assert!(o.status.success(), "{}", both(&o));
    rt.block_on(async {
        let c = login(port, INIT1).await.unwrap();
        c.clear_unit_attentions(0).await.unwrap();
        assert_eq!(report_luns(&c).await, vec![0]);
        c.logout().await.unwrap();
    });
    let saved = std::fs::read_to_string(dir.join("nvtarget.toml")).unwrap();
    assert!(!saved.contains("id = 1"), "{saved}");
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
