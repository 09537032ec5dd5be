//! Crash and corruption tests of the NVRAM log.
//!
//! (2) `power` mode: concurrent appenders and a CP thread run on a
//! `FaultMedium` that loses power at a random operation; every crash image
//! (unsynced writes dropped, last one torn, random subset torn) must replay
//! every acknowledged record with its exact data, and only a gap-free prefix.
//! `process` mode: a "kill" keeps the live image; same check.
//! (3) Corrupt and truncated logs: the scan stops at the damage, reports its
//! offset and reason, keeps earlier records, replays nothing after it.

// Helpers outside #[test] fns are test code too.
#![allow(clippy::unwrap_used)]

use nvtarget_nvram::{
    dump, CrashMode, Durability, FaultMedium, Log, Op, Record, RecordMeta, RegionConfig, Seq,
    StopReason,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

/// 1 MiB region: ~252 KiB halves, so CPs and flow control happen often.
const SIZE: u64 = 1 << 20;

/// Record `id`'s data: its length and bytes are a function of the id, so any
/// replayed record can be checked, acknowledged or not.
fn data_for(id: u64) -> Vec<u8> {
    let len = ((id * 2654435761) % 9) as usize * 512 + (id % 3) as usize * 7;
    (0..len)
        .map(|i| (id as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn meta_for(id: u64) -> RecordMeta {
    RecordMeta::data(
        Op::WRITE,
        (id % 4) as u32,
        id,
        (data_for(id).len() / 512) as u32,
        1,
    )
}

fn replay_all(
    m: &FaultMedium,
    d: Durability,
    committed: Seq,
) -> (Log, Vec<Record>, nvtarget_nvram::ScanReport) {
    let (log, mut replay) = Log::open(Arc::new(m.clone()), d, committed).unwrap();
    let recs: Vec<Record> = replay.records().collect::<Result<_, _>>().unwrap();
    let t = replay.take_ticket().unwrap();
    log.cp_done(t).unwrap();
    (log, recs, replay.report)
}

struct Run {
    /// id -> seq of every append that returned Ok.
    acked: HashMap<u64, Seq>,
    /// The store's committed seq when power was lost.
    committed: Seq,
}

/// Appenders + CP thread until the medium dies (or `stop` is set).
fn workload(log: &Log, threads: u64, per_thread: u64, stop: &AtomicBool) -> Run {
    let acked = Mutex::new(HashMap::new());
    let committed = AtomicU64::new(0);
    let running = AtomicU64::new(threads);
    thread::scope(|s| {
        for t in 0..threads {
            let (acked, running) = (&acked, &running);
            s.spawn(move || {
                for i in 0..per_thread {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = 1 + t * 1_000_000 + i;
                    match log.append(&meta_for(id), &data_for(id)) {
                        Ok(seq) => {
                            acked.lock().insert(id, seq);
                        }
                        Err(_) => break,
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let (committed, running) = (&committed, &running);
        s.spawn(move || {
            while running.load(Ordering::SeqCst) > 0 {
                if !log.wait_cp_needed(std::time::Duration::from_millis(2)) {
                    continue;
                }
                let Ok(t) = log.begin_cp() else { break };
                // The store's CP: instantaneous here; it commits t.seq().
                committed.store(t.seq(), Ordering::SeqCst);
                if log.cp_done(t).is_err() {
                    break;
                }
            }
        });
    });
    Run {
        acked: acked.into_inner(),
        committed: committed.load(Ordering::SeqCst),
    }
}

/// The promise, checked on one recovered image.
fn check_recovery(img: Vec<u8>, d: Durability, run: &Run, what: &str) {
    let m = FaultMedium::from_image(img);
    let (log, recs, report) = replay_all(&m, d, run.committed);
    // A gap-free prefix right after the floor...
    for (k, r) in recs.iter().enumerate() {
        assert_eq!(
            r.seq,
            report.floor + 1 + k as u64,
            "{what}: replay not contiguous"
        );
        // ...of records whose content is exactly what was appended.
        assert_eq!(
            r.data,
            data_for(r.meta.lba),
            "{what}: seq {} data differs",
            r.seq
        );
        assert_eq!(
            r.meta,
            meta_for(r.meta.lba),
            "{what}: seq {} meta differs",
            r.seq
        );
    }
    assert!(!report.store_behind_log, "{what}");
    assert!(report.gap.is_none(), "{what}: {:?}", report.problems());
    let replayed: HashMap<u64, Seq> = recs.iter().map(|r| (r.meta.lba, r.seq)).collect();
    for (id, seq) in &run.acked {
        if *seq > run.committed {
            assert_eq!(
                replayed.get(id),
                Some(seq),
                "{what}: acknowledged id {id} seq {seq} lost (committed {}, report {:?})",
                run.committed,
                report.problems()
            );
        }
    }
    // The log keeps working after recovery, above every old seq.
    let s = log.append(&meta_for(7), &data_for(7)).unwrap();
    assert!(s > report.max_seen_seq);
}

#[test]
fn power_mode_random_power_cuts_lose_nothing_acknowledged() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let rounds = 24;
    let mut total_acked = 0;
    let mut total_cps = 0;
    for round in 0..rounds {
        let m = FaultMedium::new(SIZE);
        let (log, _, _) = replay_all(&m, Durability::Power, 0);
        let base = m.ops();
        m.cut_power_at(base + rng.gen_range(1..1500));
        let threads = if round % 4 == 0 { 1 } else { 4 };
        let run = workload(&log, threads, 400, &AtomicBool::new(false));
        total_acked += run.acked.len();
        total_cps += log.stats().cps;
        drop(log);
        let seed = rng.gen();
        for mode in [
            CrashMode::DropUnsynced,
            CrashMode::TearLast,
            CrashMode::RandomSubset(seed),
        ] {
            check_recovery(
                m.crash_image(mode),
                Durability::Power,
                &run,
                &format!("round {round} {mode:?}"),
            );
        }
    }
    eprintln!("power: {rounds} rounds x 3 crash images, {total_acked} acknowledged appends checked, {total_cps} CPs");
    assert!(total_acked > 1000);
}

#[test]
fn power_mode_group_commit_batches_syncs() {
    let m = FaultMedium::new(SIZE);
    let (log, _, _) = replay_all(&m, Durability::Power, 0);
    let run = workload(&log, 8, 200, &AtomicBool::new(false));
    let st = log.stats();
    assert_eq!(run.acked.len(), 1600);
    eprintln!("group commit: {} appends, {} syncs", st.appended, st.syncs);
    assert!(st.syncs <= st.appended);
    check_recovery(
        m.crash_image(CrashMode::DropUnsynced),
        Durability::Power,
        &run,
        "after clean run",
    );
}

#[test]
fn process_mode_kill_keeps_everything_acknowledged() {
    for round in 0..8u64 {
        let m = FaultMedium::new(SIZE);
        let (log, _, _) = replay_all(&m, Durability::Process, 0);
        let stop = AtomicBool::new(false);
        let acked = Mutex::new(HashMap::new());
        // The CP thread serves until every appender has left: an appender
        // can be blocked for room in the log when `stop` is set, and only a
        // CP frees it.
        let running = AtomicU64::new(4);
        let (acked_at_kill, img) = thread::scope(|s| {
            for t in 0..4u64 {
                let (log, acked, stop, running) = (&log, &acked, &stop, &running);
                s.spawn(move || {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let id = 1 + t * 1_000_000 + i;
                        let seq = log.append(&meta_for(id), &data_for(id)).unwrap();
                        acked.lock().insert(id, seq);
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                });
            }
            let (log, running) = (&log, &running);
            s.spawn(move || {
                while running.load(Ordering::SeqCst) > 0 {
                    if log.wait_cp_needed(std::time::Duration::from_millis(2)) {
                        let t = log.begin_cp().unwrap();
                        log.cp_done(t).unwrap();
                    }
                }
            });
            thread::sleep(std::time::Duration::from_millis(5 + round * 5));
            // "kill -9": what was acknowledged, then the memory image (the
            // page cache survives a killed process). Every ack in the copy
            // happened before the image was taken.
            let acked_at_kill = acked.lock().clone();
            let img = m.live_image();
            stop.store(true, Ordering::SeqCst);
            (acked_at_kill, img)
        });
        // No store CP is committed in this test: the store is at 0 and the
        // log's prune marks say what was covered.
        let (_log, recs, report) =
            replay_all(&FaultMedium::from_image(img), Durability::Process, 0);
        for r in &recs {
            assert_eq!(r.data, data_for(r.meta.lba));
        }
        let in_image: HashMap<u64, Seq> = recs.iter().map(|r| (r.meta.lba, r.seq)).collect();
        let mut checked = 0;
        for (id, seq) in &acked_at_kill {
            if *seq > report.floor {
                assert_eq!(
                    in_image.get(id),
                    Some(seq),
                    "round {round}: id {id}: {:?}",
                    report.problems()
                );
                checked += 1;
            }
        }
        assert!(!acked_at_kill.is_empty());
        eprintln!(
            "round {round}: {} acked at kill, {checked} above the prune mark, replayed {}",
            acked_at_kill.len(),
            recs.len()
        );
    }
}

#[test]
fn process_mode_kill_exact_ack_set() {
    // Deterministic variant: stop appenders, remember the ack set, then take
    // the image: everything acknowledged must replay.
    let m = FaultMedium::new(SIZE);
    let (log, _, _) = replay_all(&m, Durability::Process, 0);
    let stop = AtomicBool::new(false);
    let run = workload(&log, 4, 150, &stop);
    check_recovery(m.live_image(), Durability::Process, &run, "process kill");
}

/// Appends `n` records (no CP) and returns the medium and the records' offsets.
fn log_with(n: u64) -> (FaultMedium, Vec<nvtarget_nvram::RecordInfo>) {
    let m = FaultMedium::new(SIZE);
    {
        let (log, _, _) = replay_all(&m, Durability::Power, 0);
        for id in 1..=n {
            log.append(&meta_for(id), &data_for(id)).unwrap();
        }
    }
    let (_, replay) = Log::open(Arc::new(m.clone()), Durability::Power, 0).unwrap();
    assert_eq!(replay.len() as u64, n);
    (m, replay.entries().to_vec())
}

#[test]
fn corrupt_record_stops_scan_and_is_reported() {
    let n = 12;
    let (clean, infos) = log_with(n);
    // Header fields (magic, op, seq, lun, lba, len, crc, cp_gen) and data.
    let positions: &[(&str, u64)] = &[
        ("magic", 0),
        ("op", 4),
        ("seq", 9),
        ("lun", 17),
        ("lba", 25),
        ("data_len", 33),
        ("crc", 37),
        ("cp_gen", 41),
        ("data", 64),
    ];
    for k in [0usize, 5, (n - 1) as usize] {
        for (field, pos) in positions {
            let info = infos[k];
            if *pos >= 64 + u64::from(info.data_len) {
                continue;
            }
            let m = FaultMedium::from_image(clean.live_image());
            m.corrupt_byte(info.offset + pos);
            let (log, mut replay) = Log::open(Arc::new(m.clone()), Durability::Power, 0).unwrap();
            let what = format!("record {k} field {field}");
            // Earlier records kept, nothing at or after the damage replayed.
            let seqs: Vec<Seq> = replay.entries().iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=k as u64).collect::<Vec<_>>(), "{what}");
            for r in replay.records() {
                let r = r.unwrap();
                assert_eq!(r.data, data_for(r.meta.lba), "{what}");
            }
            let h = &replay.report.halves[info.half];
            assert_eq!(h.stop_offset, info.offset, "{what}");
            assert!(!h.stop.is_clean(), "{what}: {:?}", h.stop);
            assert!(!replay.report.is_clean(), "{what}");
            assert!(
                replay
                    .report
                    .problems()
                    .iter()
                    .any(|p| p.contains(&info.offset.to_string())),
                "{what}: {:?}",
                replay.report.problems()
            );
            if (k as u64) < n - 1 {
                assert!(
                    matches!(h.stop, StopReason::Corrupt { .. }),
                    "{what}: {:?}",
                    h.stop
                );
            }
            // The log recovers; new seqs skip past every valid record seen
            // (a damaged record's seq field cannot be trusted).
            let max_seen = replay.report.max_seen_seq;
            log.cp_done(replay.take_ticket().unwrap()).unwrap();
            let s = log.append(&meta_for(1), &data_for(1)).unwrap();
            assert!(s > max_seen && s > k as u64, "{what}");
        }
    }
}

#[test]
fn recovery_past_damage_then_second_crash_loses_nothing() {
    // Damage record 4 of 10 (records 5..10 follow), recover, append and
    // acknowledge more, lose power, recover again: the new records replay.
    let (clean, infos) = log_with(10);
    let m = FaultMedium::from_image(clean.live_image());
    m.corrupt_byte(infos[3].offset + 70);
    let mut acked = HashMap::new();
    let committed;
    {
        let (log, mut replay) = Log::open(Arc::new(m.clone()), Durability::Power, 0).unwrap();
        assert_eq!(replay.len(), 3);
        let t = replay.take_ticket().unwrap();
        // The recovery CP covers everything seen, including the abandoned seqs.
        assert_eq!(t.seq(), 10);
        committed = t.seq();
        log.cp_done(t).unwrap();
        for id in 100..120 {
            acked.insert(id, log.append(&meta_for(id), &data_for(id)).unwrap());
        }
    }
    let run = Run { acked, committed };
    check_recovery(
        m.crash_image(CrashMode::DropUnsynced),
        Durability::Power,
        &run,
        "second crash",
    );
    // The damaged half is history now: a restart reports it, but clean.
    let img = m.crash_image(CrashMode::DropUnsynced);
    let (_, replay) = Log::open(
        Arc::new(FaultMedium::from_image(img.clone())),
        Durability::Power,
        10,
    )
    .unwrap();
    assert_eq!(replay.len(), 20, "{:?}", replay.report.problems());
    assert!(replay.report.is_clean(), "{:?}", replay.report.problems());
    // A store older than the log's prune mark is called out.
    let (_, replay) =
        Log::open(Arc::new(FaultMedium::from_image(img)), Durability::Power, 3).unwrap();
    assert_eq!(replay.len(), 20);
    assert!(replay.report.store_behind_log);
}

#[test]
fn corrupt_half_header_slots() {
    let (clean, infos) = log_with(5);
    let layout = Log::open(Arc::new(clean.clone()), Durability::Power, 0)
        .unwrap()
        .0
        .layout();
    let half = infos[0].half;
    // Damage both slots: the half is reported, nothing from it replayed.
    let m = FaultMedium::from_image(clean.live_image());
    m.corrupt_byte(layout.half_off(half) + 8);
    m.corrupt_byte(layout.half_off(half) + 512 + 8);
    let (_, replay) = Log::open(Arc::new(m), Durability::Power, 0).unwrap();
    assert!(replay.is_empty());
    assert!(replay.report.halves[half].header.is_none());
    assert!(!replay.report.is_clean());
}

#[test]
fn region_header_damage_is_an_error_not_a_format() {
    let (clean, _) = log_with(3);
    let m = FaultMedium::from_image(clean.live_image());
    m.corrupt_byte(20);
    assert!(matches!(
        Log::open(Arc::new(m), Durability::Power, 0),
        Err(nvtarget_nvram::Error::BadRegion(_))
    ));
    // Zeroed region header over live halves: refused too.
    let mut img = clean.live_image();
    img[..64].fill(0);
    assert!(Log::open(Arc::new(FaultMedium::from_image(img)), Durability::Power, 0).is_err());
}

fn tmp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nvram-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn truncated_file_is_reported_and_repaired() {
    for durability in [Durability::Process, Durability::Power] {
        let dir = tmp_dir(&format!("trunc-{durability:?}"));
        let cfg = RegionConfig {
            size: SIZE,
            durability,
        };
        let infos = {
            let (log, mut replay) = Log::open_dir(&dir, cfg, 0).unwrap();
            log.cp_done(replay.take_ticket().unwrap()).unwrap();
            for id in 1..=10 {
                log.append(&meta_for(id), &data_for(id)).unwrap();
            }
            drop(log);
            let (_, replay) = Log::open_dir(&dir, cfg, 0).unwrap();
            replay.entries().to_vec()
        };
        let path = nvtarget_nvram::region_path(&dir);
        // Cut in the middle of record 6 (index 5).
        let cut = infos[5].offset + 100;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();

        let mut out = Vec::new();
        dump(&path, &mut out, Some(0)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("TRUNCATED"), "{text}");
        assert!(text.contains("replay 5 record(s): seq 1..=5"), "{text}");

        let (log, mut replay) = Log::open_dir(&dir, cfg, 0).unwrap();
        assert_eq!(replay.report.truncated_file_len, Some(cut));
        assert_eq!(
            replay.entries().iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert!(!replay.report.is_clean());
        log.cp_done(replay.take_ticket().unwrap()).unwrap();
        assert!(log.append(&meta_for(1), &data_for(1)).unwrap() > 5);
        drop(log);

        // Cut inside the region header: an error, never a panic.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(30)
            .unwrap();
        assert!(Log::open_dir(&dir, cfg, 0).is_err());
        assert!(dump(&path, &mut Vec::new(), None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn random_garbage_in_halves_never_panics_or_replays() {
    let (clean, _) = log_with(0);
    let layout = Log::open(Arc::new(clean.clone()), Durability::Power, 0)
        .unwrap()
        .0
        .layout();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20 {
        let mut img = clean.live_image();
        for i in 0..2 {
            let start = layout.records_off(i) as usize;
            let end = layout.half_end(i) as usize;
            rng.fill(&mut img[start..end]);
            // Sprinkle plausible magics to reach the deeper decode paths.
            for _ in 0..50 {
                let o = rng.gen_range(start..end - 4) / 512 * 512;
                img[o..o + 4].copy_from_slice(b"NVRL");
            }
        }
        let (_, replay) =
            Log::open(Arc::new(FaultMedium::from_image(img)), Durability::Power, 0).unwrap();
        assert!(replay.is_empty());
    }
}

#[test]
fn dump_prints_halves_records_and_replay() {
    let dir = tmp_dir("dump");
    let cfg = RegionConfig {
        size: SIZE,
        durability: Durability::Power,
    };
    {
        let (log, mut replay) = Log::open_dir(&dir, cfg, 0).unwrap();
        log.cp_done(replay.take_ticket().unwrap()).unwrap();
        for id in 1..=4 {
            log.append(&meta_for(id), &data_for(id)).unwrap();
        }
        let t = log.begin_cp().unwrap();
        log.cp_done(t).unwrap();
        log.append(&RecordMeta::metadata(Op::PR_STATE, 2, 1), b"pr-state")
            .unwrap();
        log.append(&meta_for(9), &data_for(9)).unwrap();
    }
    let mut out = Vec::new();
    dump(&nvtarget_nvram::region_path(&dir), &mut out, Some(4)).unwrap();
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");
    assert!(text.contains("half 0"));
    assert!(text.contains("half 1"));
    assert!(text.contains("PR_STATE"));
    assert!(text.contains("lba 9..")); // data record with its range
    assert!(text.contains("replay 2 record(s): seq 5..=6"), "{text}");
    assert!(text.contains("status: clean"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Child side of `process_mode_real_sigkill`: appends from 4 threads (and
/// takes CPs) until killed, printing "id seq" after each acknowledgement.
#[test]
fn sigkill_child() {
    let Some(dir) = std::env::var_os("NVRAM_SIGKILL_CHILD_DIR") else {
        return; // only runs as the child of process_mode_real_sigkill
    };
    let dir = std::path::PathBuf::from(dir);
    let cfg = RegionConfig {
        size: SIZE,
        durability: Durability::Process,
    };
    let (log, mut replay) = Log::open_dir(&dir, cfg, 0).unwrap();
    log.cp_done(replay.take_ticket().unwrap()).unwrap();
    let out = Mutex::new(std::io::stdout());
    thread::scope(|s| {
        for t in 0..4u64 {
            let (log, out) = (&log, &out);
            s.spawn(move || {
                for i in 0.. {
                    let id = 1 + t * 1_000_000 + i;
                    let seq = log.append(&meta_for(id), &data_for(id)).unwrap();
                    let mut o = out.lock();
                    use std::io::Write;
                    writeln!(o, "ack {id} {seq}").unwrap();
                    o.flush().unwrap();
                }
            });
        }
        loop {
            if log.wait_cp_needed(std::time::Duration::from_millis(5)) {
                let t = log.begin_cp().unwrap();
                log.cp_done(t).unwrap();
            }
        }
    });
}

#[test]
fn process_mode_real_sigkill() {
    use std::io::BufRead;
    let dir = tmp_dir("sigkill");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("NVRAM_SIGKILL_CHILD_DIR", &dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked = HashMap::new();
    let mut lines = std::io::BufReader::new(stdout).lines();
    // Let it run through a few CPs (~50 records per half), then SIGKILL.
    while acked.len() < 600 {
        let Some(Ok(line)) = lines.next() else { break };
        let mut w = line.split_whitespace();
        if w.next() == Some("ack") {
            let id: u64 = w.next().unwrap().parse().unwrap();
            let seq: Seq = w.next().unwrap().parse().unwrap();
            acked.insert(id, seq);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Acks printed before the kill that we have not read yet are real too.
    for line in lines.map_while(Result::ok) {
        let mut w = line.split_whitespace();
        if w.next() == Some("ack") {
            if let (Some(Ok(id)), Some(Ok(seq))) =
                (w.next().map(str::parse), w.next().map(str::parse))
            {
                acked.insert(id, seq);
            }
        }
    }
    assert!(acked.len() >= 600, "child died early: {} acks", acked.len());
    let cfg = RegionConfig {
        size: SIZE,
        durability: Durability::Process,
    };
    let (_log, replay) = Log::open_dir(&dir, cfg, 0).unwrap();
    let recs: Vec<Record> = replay.records().collect::<Result<_, _>>().unwrap();
    let floor = replay.report.floor;
    let in_log: HashMap<u64, Seq> = recs.iter().map(|r| (r.meta.lba, r.seq)).collect();
    let mut checked = 0;
    for (id, seq) in &acked {
        if *seq > floor {
            assert_eq!(
                in_log.get(id),
                Some(seq),
                "acked id {id} seq {seq} lost: {:?}",
                replay.report.problems()
            );
            checked += 1;
        }
    }
    for r in &recs {
        assert_eq!(r.data, data_for(r.meta.lba));
    }
    eprintln!(
        "sigkill: {} acks, {checked} above prune mark {floor}, {} replayed",
        acked.len(),
        recs.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
