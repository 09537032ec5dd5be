//! Writes larger than a log record may be: split into records, every byte
//! acknowledged reads back, before and after a SIGKILL and restart (the
//! records replayed from the log).
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use nvtarget_client::{Client, LoginOptions};

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len as u32)
            .map(|i| (i / 512) as u8 ^ (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>(),
    )
}

/// (LBA, bytes): the largest advertised transfer (32 MiB), and writes of
/// one, two and several log halves of a 4 MiB log.
const WRITES: [(u64, usize); 4] = [
    (0, 32 << 20),
    (1 << 17, 1 << 20),
    (1 << 18, 3 << 20),
    (1 << 19, (5 << 20) + 512),
];

async fn session(port: u16) -> Client {
    let c = Client::connect(
        &format!("127.0.0.1:{port}"),
        &LoginOptions::new(INIT1, TARGET_IQN),
    )
    .await
    .unwrap();
    c.clear_unit_attentions(0).await.unwrap();
    c
}

async fn check(c: &Client, when: &str) {
    for (i, (lba, len)) in WRITES.iter().enumerate() {
        let got = c.read16(0, *lba, (*len / 512) as u32, 512).await.unwrap();
        assert!(
            got == pattern(i as u8, *len),
            "{when}: write {i} ({len} bytes at LBA {lba}) does not read back"
        );
    }
}

#[test]
fn writes_larger_than_a_log_half_are_logged_and_survive_a_crash() {
    let dir = temp_dir("bigio");
    let cfg = dir.join("nvtarget.toml");
    let text = std::fs::read_to_string("examples/default.toml")
        .unwrap()
        .replace("[node]\n", "[node]\nnvram_size = \"4MiB\"\n");
    assert!(text.contains("nvram_size = \"4MiB\""), "{text}");
    std::fs::write(&cfg, text).unwrap();
    let mut target = Target::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = session(target.port).await;
        for (i, (lba, len)) in WRITES.iter().enumerate() {
            c.write16(0, *lba, pattern(i as u8, *len), 512, false)
                .await
                .unwrap();
        }
        check(&c, "before the crash").await;
    });
    target.kill();
    let target = Target::start_on(target.port, &dir, &["--config", cfg.to_str().unwrap()]);
    rt.block_on(async {
        let c = session(target.port).await;
        check(&c, "after SIGKILL and restart").await;
        c.logout().await.unwrap();
    });
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
