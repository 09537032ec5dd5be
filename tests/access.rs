//! Access control with libiscsi's tools: one-way and mutual CHAP, and an
//! initiator allow-list that also hides the target from discovery.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const CFG: &str = r#"
[[portal]]
listen = "127.0.0.1:3260"

[[target]]
name = "iqn.2026-11.io.nvtarget:chap"
[target.chap]
user = "alice"
secret = "alice-secret-123"
[[target.lun]]
id = 0
size = "64MiB"

[[target]]
name = "iqn.2026-11.io.nvtarget:mutual"
[target.chap]
user = "bob"
secret = "bob-secret-12345"
mutual_user = "tgt"
mutual_secret = "target-secret-678"
[[target.lun]]
id = 0
size = "64MiB"

[[target]]
name = "iqn.2026-11.io.nvtarget:private"
allowed_initiators = ["iqn.2026-11.io.test:allowed"]
[[target.lun]]
id = 0
size = "64MiB"
"#;

fn inq(url: &str, initiator: &str, env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new("iscsi-inq");
    c.args(["-i", initiator]).arg(url);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run(&mut c, Duration::from_secs(30));
    (o.status.success(), both(&o))
}

#[test]
fn chap_and_allowed_initiators() {
    require_tool("iscsi-inq");
    require_tool("iscsi-ls");
    let dir = temp_dir("access");
    let cfg = dir.join("access.toml");
    std::fs::write(&cfg, CFG).unwrap();
    let t = Target::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let p = t.port;
    let ini = "iqn.2026-11.io.test:someone";

    // One-way CHAP: right secret in, wrong secret and no secret out.
    let url = |cred: &str, tgt: &str| {
        format!("iscsi://{cred}127.0.0.1:{p}/iqn.2026-11.io.nvtarget:{tgt}/0")
    };
    let (ok, out) = inq(&url("alice%alice-secret-123@", "chap"), ini, &[]);
    assert!(ok, "CHAP login failed: {out}");
    let (ok, out) = inq(&url("alice%wrong-secret-000@", "chap"), ini, &[]);
    assert!(!ok, "wrong CHAP secret accepted: {out}");
    let (ok, out) = inq(&url("", "chap"), ini, &[]);
    assert!(!ok, "login without CHAP accepted: {out}");

    // Mutual CHAP: the initiator checks the target's answer too.
    let good_target = [
        ("LIBISCSI_CHAP_TARGET_USERNAME", "tgt"),
        ("LIBISCSI_CHAP_TARGET_PASSWORD", "target-secret-678"),
    ];
    let (ok, out) = inq(&url("bob%bob-secret-12345@", "mutual"), ini, &good_target);
    assert!(ok, "mutual CHAP login failed: {out}");
    let bad_target = [
        ("LIBISCSI_CHAP_TARGET_USERNAME", "tgt"),
        ("LIBISCSI_CHAP_TARGET_PASSWORD", "not-the-target-secret"),
    ];
    let (ok, out) = inq(&url("bob%bob-secret-12345@", "mutual"), ini, &bad_target);
    assert!(
        !ok,
        "initiator accepted a target with the wrong mutual secret: {out}"
    );

    // The allow-list: others can neither log in nor see the target.
    let (ok, out) = inq(&url("", "private"), "iqn.2026-11.io.test:allowed", &[]);
    assert!(ok, "allowed initiator refused: {out}");
    let (ok, out) = inq(&url("", "private"), ini, &[]);
    assert!(!ok, "initiator not on the list logged in: {out}");
    let ls = |initiator: &str| {
        let o = run(
            Command::new("iscsi-ls")
                .args(["-i", initiator])
                .arg(format!("iscsi://127.0.0.1:{p}")),
            Duration::from_secs(30),
        );
        both(&o)
    };
    assert!(ls("iqn.2026-11.io.test:allowed").contains("nvtarget:private"));
    let other = ls(ini);
    assert!(!other.contains("nvtarget:private"), "{other}");
    assert!(other.contains("nvtarget:chap"), "{other}");
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}
