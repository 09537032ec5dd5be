//! Arbitrary bytes into a fresh connection: it must never panic.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvtarget_iscsi::*;

struct Open;

impl TargetDirectory for Open {
    fn lookup(&self, _: &str, _: &str) -> Lookup {
        Lookup::Found { chap: None }
    }
    fn send_targets(&self, _: &str, _: &str) -> Vec<(String, Vec<String>)> {
        vec![("iqn.t:x".into(), vec!["127.0.0.1:3260,1".into()])]
    }
    fn allocate_tsih(&self) -> u16 {
        1
    }
    fn session_cid(&self, _: &str, _: [u8; 6], _: u16) -> Option<u16> {
        Some(0)
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let cfg = ConnectionConfig {
        params: TargetParams::default(),
        tpgt: 1,
        directory: Arc::new(Open),
    };
    let mut c = Connection::with_seed(cfg, now, 0);
    let mut b = BytesMut::new();
    for (i, chunk) in data.chunks(97).enumerate() {
        b.extend_from_slice(chunk);
        c.handle_input(&mut b, now + Duration::from_millis(i as u64));
        while c.poll_transmit().is_some() {}
        while let Some(e) = c.poll_event() {
            if let Event::Command(cmd) = e {
                let _ = c.complete(cmd.itt, Completion::default());
            }
        }
    }
});
