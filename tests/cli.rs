//! The offline command line against a data directory a real target wrote:
//! snapshots (create, list, restore, clone), `aggr check`, the data-directory
//! lock, and `config check` naming the key and line of a mistake.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, LoginOptions};

fn nvt(args: &[&str]) -> std::process::Output {
    run(Command::new(binary()).args(args), Duration::from_secs(60))
}

fn write_and_check(port: u16, fill: Option<u8>, expect: u8) {
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
        if let Some(f) = fill {
            c.write16(0, 100, Bytes::from(vec![f; 64 * 1024]), 512, false)
                .await
                .unwrap();
        }
        let got = c.read16(0, 100, 128, 512).await.unwrap();
        assert!(got.iter().all(|&b| b == expect), "expected 0x{expect:02x}");
        c.logout().await.unwrap();
    });
}

#[test]
fn snapshots_restore_and_check() {
    let dir = temp_dir("cli");
    let d = dir.to_str().unwrap();
    let mut t = Target::start(&dir, &[]);
    write_and_check(t.port, Some(0x11), 0x11);

    // The running target owns the directory: offline tools are refused.
    let busy = nvt(&["snapshot", "--data-dir", d, "list"]);
    assert!(!busy.status.success());
    assert!(both(&busy).contains("in use"), "{}", both(&busy));

    t.stop();
    let port = t.port;
    drop(t);
    let o = nvt(&["snapshot", "--data-dir", d, "create", "default", "before"]);
    assert!(o.status.success(), "{}", both(&o));
    let o = nvt(&["snapshot", "--data-dir", d, "list"]);
    assert!(stdout(&o).contains("before"), "{}", both(&o));

    let mut t = Target::start_on(port, &dir, &[]);
    write_and_check(port, Some(0x22), 0x22);
    t.stop();
    drop(t);

    let o = nvt(&[
        "snapshot",
        "--data-dir",
        d,
        "clone",
        "default",
        "before",
        "copy",
    ]);
    assert!(o.status.success(), "{}", both(&o));
    let o = nvt(&["snapshot", "--data-dir", d, "restore", "default", "before"]);
    assert!(o.status.success(), "{}", both(&o));
    let o = nvt(&["aggr", "check", "--data-dir", d]);
    assert!(o.status.success(), "aggr check failed: {}", both(&o));

    let t = Target::start_on(port, &dir, &[]);
    write_and_check(port, None, 0x11);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each kind of mistake is refused with the file, the line and the key.
#[test]
fn config_check_names_key_and_line() {
    let dir = temp_dir("cfg");
    let good = "[node]\naggregate_size = \"1GiB\"\n\n[[portal]]\nlisten = \"127.0.0.1:3260\"\n\n[[target]]\nname = \"iqn.2026-11.io.x:a\"\n\n[[target.lun]]\nid = 0\nsize = \"512MiB\"\n";
    let cases = [
        // (what, edit of the good file, line, key named)
        (
            "unknown key",
            good.replace(
                "name = \"iqn.2026-11.io.x:a\"\n",
                "name = \"iqn.2026-11.io.x:a\"\nallowed_initators = []\n",
            ),
            9,
            "allowed_initators",
        ),
        (
            "bad IQN",
            good.replace("iqn.2026-11.io.x:a", "IQN.2026-11.io.x:A"),
            8,
            "target[0].name",
        ),
        (
            "overlapping portals",
            good.replace(
                "\n[[target]]",
                "[[portal]]\nlisten = \"0.0.0.0:3260\"\n\n[[target]]",
            ),
            7,
            "portal[1].listen",
        ),
        (
            "LUN larger than its aggregate",
            good.replace("512MiB", "2GiB"),
            12,
            "target[0].lun[0].size",
        ),
    ];
    for (what, text, line, key) in cases {
        let f = dir.join("bad.toml");
        std::fs::write(&f, &text).unwrap();
        let o = nvt(&["config", "check", f.to_str().unwrap()]);
        let e = both(&o);
        assert!(!o.status.success(), "{what}: accepted\n{text}");
        assert!(
            e.contains(&format!("bad.toml:{line}:")),
            "{what}: no line {line} in {e}\n{text}"
        );
        assert!(e.contains(key), "{what}: key {key} not named in {e}");
    }
    let f = dir.join("good.toml");
    std::fs::write(&f, good).unwrap();
    let o = nvt(&["config", "check", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", both(&o));
    let o = nvt(&["config", "check", "examples/default.toml"]);
    assert!(o.status.success(), "{}", both(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
