//! Pushes 4 KiB records through Sender -> Receiver in memory (no network,
//! no clock advance: pure protocol + checksum cost) and prints rates.
//!   cargo run --release -p nvtarget-mirror --example mirror_bench [records] [paths]

use bytes::Bytes;
use nvtarget_mirror::{Config, Event, PartnerStore, PathId, Receiver, RecordSource, Sender, Seq};
use nvtarget_nvram::record::{self, RECORD_HEADER_LEN};
use nvtarget_nvram::{Op, Record, RecordMeta};
use std::time::Instant;

struct NoSource;
impl RecordSource for NoSource {
    fn read(&self, _: Seq) -> Option<(u64, Bytes)> {
        None
    }
}

struct Sink(u64);
impl PartnerStore for Sink {
    fn store(&mut self, _: u64, b: &[u8]) -> nvtarget_nvram::Result<()> {
        self.0 += b.len() as u64;
        Ok(())
    }
    fn sync(&mut self) -> nvtarget_nvram::Result<()> {
        Ok(())
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let paths: u8 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let region = 1u64 << 30;
    let now = Instant::now();
    let mut cs = Config::new(1, 2, region);
    cs.paths = paths;
    let mut cr = Config::new(2, 1, region);
    cr.paths = paths;
    let mut s = Sender::new(cs, NoSource, 0, 0, now);
    let mut r = Receiver::new(cr, Sink(0), 0, 0, now);
    for p in 0..paths {
        s.path_up(PathId(p)).ok();
        r.path_up(PathId(p)).ok();
    }
    let data = vec![0xa5u8; 4096];
    let slot = record::encoded_len(data.len());
    let start = Instant::now();
    let (mut acked, mut indexed, mut seq, mut wire) = (0u64, 0u64, 0u64, 0u64);
    while acked < n {
        // Keep up to 256 writes outstanding, like a busy initiator queue.
        while seq < n && seq - acked < 256 {
            seq += 1;
            let rec = Record {
                seq,
                meta: RecordMeta::data(Op::WRITE, 0, seq * 8, 8, 0),
                data: data.clone(),
            };
            let mut b = record::encode(&rec);
            b.truncate(RECORD_HEADER_LEN + data.len());
            let off = ((seq - 1) * slot) % (region - slot);
            if let Err(e) = s.submit(seq, off, Bytes::from(b)) {
                eprintln!("submit: {e}");
                return;
            }
        }
        while let Some(t) = s.poll_transmit() {
            wire += t.data.len() as u64;
            r.handle_input(t.path, &t.data, now);
        }
        while let Some(t) = r.poll_transmit() {
            s.handle_input(t.path, &t.data, now);
        }
        while let Some(e) = r.poll_event() {
            if let Event::Indexed { .. } = e {
                indexed += 1;
            }
        }
        while let Some(e) = s.poll_event() {
            if let Event::Acked(u) = e {
                acked = u;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let st = s.stats();
    println!(
        "{n} records x 4 KiB over {paths} path(s): {:.0} records/s, {:.1} MiB/s of data, \
         {:.1} MiB/s on the wire, {} frames ({:.1} records/frame), {indexed} indexed, {} bytes stored",
        n as f64 / secs,
        (n * 4096) as f64 / secs / (1 << 20) as f64,
        wire as f64 / secs / (1 << 20) as f64,
        st.frames_sent,
        st.records_sent as f64 / st.frames_sent.max(1) as f64,
        r.store().0,
    );
}
