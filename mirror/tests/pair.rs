//! In-memory pair: a Sender and a Receiver wired by K simulated TCP streams
//! with a simulated clock (STYLE 2). Streams keep TCP's guarantees (in order,
//! no loss, no duplicates while connected); the faults are what TCP lets
//! through: delay, reordering across paths, arbitrary splits of the byte
//! stream, connections cut (all bytes in flight lost), and a RECORDS frame
//! replayed on another path (what a retransmission looks like).

// Test harness: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use nvtarget_mirror::frame::{self, Frame};
use nvtarget_mirror::*;
use nvtarget_nvram::record::{self, RECORD_HEADER_LEN};
use nvtarget_nvram::{Op, Record};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

const REGION: u64 = 64 << 20;
/// Room for the largest test record (8 KiB data + header), 512-aligned.
const SLOT: u64 = 8704;

/// The owner's local log, as far as the mirror sees it.
#[derive(Clone, Default)]
struct Log(Rc<RefCell<BTreeMap<Seq, (u64, Bytes)>>>);

impl RecordSource for Log {
    fn read(&self, seq: Seq) -> Option<(u64, Bytes)> {
        self.0.borrow().get(&seq).cloned()
    }
}

#[derive(Default)]
struct MemStore {
    region: Vec<u8>,
    writes: u64,
    syncs: u64,
    fail: bool,
}

impl PartnerStore for MemStore {
    fn store(&mut self, offset: u64, bytes: &[u8]) -> nvtarget_nvram::Result<()> {
        if self.fail {
            return Err(nvtarget_nvram::Error::Failed("injected".into()));
        }
        let end = offset as usize + bytes.len();
        if self.region.len() < end {
            self.region.resize(end, 0);
        }
        self.region[offset as usize..end].copy_from_slice(bytes);
        self.writes += 1;
        Ok(())
    }
    fn sync(&mut self) -> nvtarget_nvram::Result<()> {
        self.syncs += 1;
        Ok(())
    }
}

fn record_bytes(seq: Seq, len: usize) -> Bytes {
    let r = Record {
        seq,
        meta: nvtarget_nvram::RecordMeta::data(Op::WRITE, 3, seq * 8, 1, 0),
        data: (0..len).map(|i| (i as u64 ^ seq) as u8).collect(),
    };
    let mut b = record::encode(&r);
    b.truncate(RECORD_HEADER_LEN + len);
    Bytes::from(b)
}

fn offset_of(seq: Seq) -> u64 {
    ((seq - 1) * SLOT) % (REGION - SLOT)
}

#[derive(Clone, Debug)]
struct Faults {
    max_delay_us: u64,
    dup_per_mille: u32,
    max_chunks: usize,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            max_delay_us: 0,
            dup_per_mille: 0,
            max_chunks: 1,
        }
    }
}

struct Pipe {
    q: VecDeque<(Instant, Bytes)>,
}

struct Pair {
    t0: Instant,
    now: Instant,
    s: Sender<Log>,
    r: Receiver<MemStore>,
    log: Log,
    s2r: Vec<Pipe>,
    r2s: Vec<Pipe>,
    up: Vec<bool>,
    /// A stalled stream holds its bytes (a blackholed route: TCP keeps the
    /// connection and delivers everything once the route heals).
    stalled: Vec<bool>,
    faults: Faults,
    rng: StdRng,
    acked: Seq,
    indexed: BTreeMap<Seq, u32>,
    pruned: Seq,
    s_events: Vec<Event>,
    r_events: Vec<Event>,
    next_seq: Seq,
}

fn config(id: u64, peer: u64, paths: u8, instance: u64) -> Config {
    let mut c = Config::new(id, peer, REGION);
    c.paths = paths;
    c.instance = instance;
    c.batch_bytes = 64 << 10;
    c
}

impl Pair {
    fn new(paths: u8, faults: Faults, seed: u64) -> Pair {
        let t0 = Instant::now();
        let log = Log::default();
        let s = Sender::new(config(1, 2, paths, 11), log.clone(), 0, 0, t0);
        let r = Receiver::new(config(2, 1, paths, 22), MemStore::default(), 0, 0, t0);
        let mut p = Pair {
            t0,
            now: t0,
            s,
            r,
            log,
            s2r: (0..paths).map(|_| Pipe { q: VecDeque::new() }).collect(),
            r2s: (0..paths).map(|_| Pipe { q: VecDeque::new() }).collect(),
            up: vec![false; paths as usize],
            stalled: vec![false; paths as usize],
            faults,
            rng: StdRng::seed_from_u64(seed),
            acked: 0,
            indexed: BTreeMap::new(),
            pruned: 0,
            s_events: Vec::new(),
            r_events: Vec::new(),
            next_seq: 1,
        };
        for i in 0..paths {
            p.connect(PathId(i));
        }
        p
    }

    fn connect(&mut self, p: PathId) {
        self.up[p.0 as usize] = true;
        self.s.path_up(p).unwrap();
        self.r.path_up(p).unwrap();
    }

    fn cut(&mut self, p: PathId) {
        let i = p.0 as usize;
        self.up[i] = false;
        self.s2r[i].q.clear();
        self.r2s[i].q.clear();
        self.s.path_down(p).unwrap();
        self.r.path_down(p).unwrap();
    }

    fn submit(&mut self, len: usize) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        let b = record_bytes(seq, len);
        let off = offset_of(seq);
        self.log.0.borrow_mut().insert(seq, (off, b.clone()));
        assert_eq!(self.s.submit(seq, off, b).unwrap(), Ticket(seq));
        seq
    }

    fn cp_done(&mut self, seq: Seq) {
        self.log.0.borrow_mut().retain(|&s, _| s > seq);
        self.s.cp_done(seq);
    }

    fn delay(&mut self) -> Duration {
        let d = if self.faults.max_delay_us == 0 {
            0
        } else {
            self.rng.gen_range(0..=self.faults.max_delay_us)
        };
        Duration::from_micros(d)
    }

    fn push(pipe: &mut Pipe, at: Instant, data: Bytes) {
        // One stream: later bytes never overtake earlier ones.
        let at = pipe.q.back().map_or(at, |(t, _)| (*t).max(at));
        pipe.q.push_back((at, data));
    }

    /// Moves every pending transmit into the pipes.
    fn pump(&mut self) {
        while let Some(t) = self.s.poll_transmit() {
            let i = t.path.0 as usize;
            if !self.up[i] {
                continue;
            }
            let at = self.now + self.delay();
            let is_records = matches!(
                frame::decode(&t.data, u32::MAX),
                Ok(Some((Frame::Records(_), _)))
            );
            if is_records && self.rng.gen_range(0..1000) < self.faults.dup_per_mille {
                // A retransmission of this frame on some other up path.
                let j = self.rng.gen_range(0..self.up.len());
                if self.up[j] {
                    let at2 = self.now + self.delay();
                    Self::push(&mut self.s2r[j], at2, t.data.clone());
                }
            }
            Self::push(&mut self.s2r[i], at, t.data);
        }
        while let Some(t) = self.r.poll_transmit() {
            let i = t.path.0 as usize;
            if !self.up[i] {
                continue;
            }
            let at = self.now + self.delay();
            Self::push(&mut self.r2s[i], at, t.data);
        }
    }

    fn chunks(&mut self, data: &Bytes) -> Vec<Bytes> {
        let n = self.rng.gen_range(1..=self.faults.max_chunks.max(1));
        let mut cuts: Vec<usize> = (1..n).map(|_| self.rng.gen_range(0..=data.len())).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([data.len()]) {
            out.push(data.slice(at..c));
            at = c;
        }
        out
    }

    /// Delivers due bytes, collects events. True if anything moved.
    fn deliver(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.up.len() {
            if self.stalled[i] {
                continue;
            }
            while self.s2r[i].q.front().is_some_and(|(t, _)| *t <= self.now) {
                let Some((_, d)) = self.s2r[i].q.pop_front() else {
                    break;
                };
                for c in self.chunks(&d) {
                    self.r.handle_input(PathId(i as u8), &c, self.now);
                }
                moved = true;
            }
            while self.r2s[i].q.front().is_some_and(|(t, _)| *t <= self.now) {
                let Some((_, d)) = self.r2s[i].q.pop_front() else {
                    break;
                };
                for c in self.chunks(&d) {
                    self.s.handle_input(PathId(i as u8), &c, self.now);
                }
                moved = true;
            }
        }
        self.collect();
        moved
    }

    fn collect(&mut self) {
        while let Some(e) = self.s.poll_event() {
            if let Event::Acked(u) = e {
                assert!(
                    u > self.acked,
                    "Acked must be monotonic: {u} after {}",
                    self.acked
                );
                self.acked = u;
            }
            self.s_events.push(e);
        }
        while let Some(e) = self.r.poll_event() {
            match &e {
                Event::Indexed {
                    seq,
                    offset,
                    len,
                    meta,
                } => {
                    *self.indexed.entry(*seq).or_default() += 1;
                    assert!(
                        *seq > self.pruned,
                        "indexed {seq} at or below prune {}",
                        self.pruned
                    );
                    assert_eq!(*offset, offset_of(*seq));
                    assert_eq!(meta.lba, seq * 8);
                    let want = record_bytes(*seq, *len as usize - RECORD_HEADER_LEN);
                    let st = &self.r.store().region;
                    assert!(
                        st[*offset as usize..(*offset + *len) as usize] == want[..],
                        "seq {seq}: stored bytes differ"
                    );
                }
                Event::Pruned(s) => self.pruned = *s,
                _ => {}
            }
            self.r_events.push(e);
        }
    }

    /// One step: pump, deliver what is due, else advance the clock to the
    /// next delivery or timer.
    fn step(&mut self) {
        self.pump();
        if self.deliver() {
            return;
        }
        let mut next = [self.s.poll_timeout(), self.r.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.now + Duration::from_millis(1));
        for (i, p) in self
            .s2r
            .iter()
            .enumerate()
            .chain(self.r2s.iter().enumerate())
        {
            if self.stalled[i] {
                continue;
            }
            if let Some((t, _)) = p.q.front() {
                next = next.min(*t);
            }
        }
        self.now = self.now.max(next);
        self.s.handle_timeout(self.now);
        self.r.handle_timeout(self.now);
        self.collect();
    }

    fn run_until(&mut self, mut done: impl FnMut(&Pair) -> bool, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }
}

fn assert_exactly_once(p: &Pair, upto: Seq) {
    for s in (p.pruned + 1)..=upto {
        assert_eq!(
            p.indexed.get(&s),
            Some(&1),
            "seq {s} indexed {:?} times",
            p.indexed.get(&s)
        );
    }
    assert!(
        p.indexed.values().all(|&n| n == 1),
        "a seq was indexed twice"
    );
}

#[test]
fn single_path_basic_and_batching() {
    let mut p = Pair::new(1, Faults::default(), 1);
    for _ in 0..100 {
        p.submit(4096);
    }
    assert!(p.run_until(|p| p.acked == 100, 10_000));
    assert_exactly_once(&p, 100);
    let st = p.s.stats();
    assert_eq!(st.unacked_records, 0);
    assert_eq!(st.inflight_bytes, 0);
    // Nagle-free: the first record went alone, the rest were batched while
    // it was in flight (64 KiB batches of ~4 KiB records).
    assert!(st.frames_sent < 20, "{st:?}");
    assert_eq!(st.records_sent, 100);
    let (written, dups) = p.r.counters();
    assert_eq!((written, dups), (100, 0));
}

#[test]
fn idle_stream_sends_immediately() {
    let mut p = Pair::new(1, Faults::default(), 2);
    assert!(p.run_until(
        |p| p.s.stats().frames_sent == 0
            && p.s_events
                .iter()
                .any(|e| matches!(e, Event::PathReady { .. })),
        100
    ));
    let t = p.now;
    p.submit(512);
    assert!(p.run_until(|p| p.acked == 1, 100));
    assert_eq!(p.now, t, "no timer involved in sending an idle record");
}

#[test]
fn reconnect_mid_stream_loses_nothing_indexes_once() {
    let mut p = Pair::new(
        1,
        Faults {
            max_delay_us: 300,
            ..Faults::default()
        },
        3,
    );
    for _ in 0..50 {
        p.submit(4096);
    }
    // Let some, not all, get through, then cut with frames in flight.
    assert!(p.run_until(|p| p.r.stored_upto() >= 10, 10_000));
    assert!(p.acked < 50);
    p.cut(PathId(0));
    for _ in 0..50 {
        p.submit(1000);
    }
    p.connect(PathId(0));
    assert!(p.run_until(|p| p.acked == 100, 100_000));
    assert_exactly_once(&p, 100);
    assert_eq!(p.s.stats().unacked_records, 0);
}

#[test]
fn lost_path_is_resent_on_the_others() {
    let mut p = Pair::new(
        3,
        Faults {
            max_delay_us: 500,
            ..Faults::default()
        },
        4,
    );
    for _ in 0..300 {
        p.submit(4096);
    }
    assert!(p.run_until(|p| p.r.stored_upto() >= 20, 10_000));
    p.cut(PathId(1));
    assert!(p.run_until(|p| p.acked == 300, 100_000));
    assert_exactly_once(&p, 300);
}

#[test]
fn heartbeat_loss_peer_silent_after_configured_time_not_before() {
    let mut p = Pair::new(2, Faults::default(), 5);
    // Quiet, connected pair: heartbeats keep both alive for 5 s.
    assert!(p.run_until(|p| p.elapsed() >= Duration::from_secs(5), 10_000));
    let silent = |p: &Pair| {
        p.s_events
            .iter()
            .chain(&p.r_events)
            .any(|e| matches!(e, Event::PeerSilent { .. }))
    };
    assert!(!silent(&p));
    let before = p.now;
    // Cut every path: the last thing heard is at most one interval ago.
    p.cut(PathId(0));
    p.cut(PathId(1));
    assert!(p.run_until(silent, 1_000));
    let since = p
        .s_events
        .iter()
        .find_map(|e| match e {
            Event::PeerSilent { since } => Some(*since),
            _ => None,
        })
        .unwrap();
    assert!(since <= before && before - since <= DEFAULT_HEARTBEAT_INTERVAL);
    assert_eq!(
        p.now - since,
        DEFAULT_HEARTBEAT_INTERVAL * DEFAULT_MISSED_HEARTBEATS
    );
    // Reconnect: alive again.
    p.connect(PathId(0));
    assert!(p.run_until(|p| p.s_events.contains(&Event::PeerAlive), 1_000));
}

#[test]
fn prune_after_ack_frees_both_sides() {
    let mut p = Pair::new(1, Faults::default(), 6);
    for _ in 0..20 {
        p.submit(2048);
    }
    assert!(p.run_until(|p| p.acked == 20, 10_000));
    p.cp_done(15);
    assert!(p.run_until(|p| p.pruned == 15, 1_000));
    assert!(p.r_events.contains(&Event::Pruned(15)));
    assert_eq!(p.s.stats().pruned, 15);
    assert_eq!(p.s.stats().unacked_records, 0);
    // Records before the prune never come back; later ones still flow.
    for _ in 0..5 {
        p.submit(100);
    }
    assert!(p.run_until(|p| p.acked == 25, 10_000));
    assert_eq!(p.indexed.len(), 25);
}

#[test]
fn prune_before_ack_releases_and_partner_skips() {
    let mut p = Pair::new(
        1,
        Faults {
            max_delay_us: 1000,
            ..Faults::default()
        },
        7,
    );
    for _ in 0..30 {
        p.submit(4096);
    }
    p.pump();
    // A CP committed before the partner acked anything: those writes are
    // safe in the store, so they are released now.
    p.cp_done(30);
    p.collect();
    assert_eq!(p.acked, 30);
    assert_eq!(p.s.stats().unacked_records, 0);
    assert!(p.run_until(|p| p.pruned == 30 && p.r.stored_upto() == 30, 10_000));
    // Anything indexed was indexed before the prune, once.
    assert!(p.indexed.values().all(|&n| n == 1));
}

#[test]
fn unmirrored_then_resync_from_log() {
    let mut p = Pair::new(1, Faults::default(), 8);
    for _ in 0..10 {
        p.submit(4096);
    }
    assert!(p.run_until(|p| p.acked == 10, 10_000));
    p.cut(PathId(0));
    p.submit(4096); // 11 waits: partner unreachable
    assert!(p.run_until(
        |p| p
            .s_events
            .iter()
            .any(|e| matches!(e, Event::PeerSilent { .. })),
        1_000
    ));
    assert_eq!(
        p.acked, 10,
        "no release without the partner or the mailbox check"
    );
    // The node checked the partner's mailbox: no takeover claimed.
    p.s.go_unmirrored();
    p.collect();
    assert_eq!(p.acked, 11);
    assert!(!p.s.is_mirrored());
    for _ in 0..40 {
        p.submit(4096);
    }
    p.collect();
    assert_eq!(p.acked, 51, "unmirrored writes are answered at once");
    assert_eq!(
        p.s.stats().unacked_records,
        0,
        "no bytes kept while unmirrored"
    );
    p.cp_done(20);
    p.connect(PathId(0));
    assert!(p.run_until(|p| p.s.is_mirrored() && p.r.stored_upto() == 51, 100_000));
    assert!(p.s_events.contains(&Event::Mirrored));
    // 11..=20 were pruned (never needed), 21..=51 came from the log.
    assert_eq!(p.pruned, 20);
    assert_exactly_once(&p, 51);
    p.submit(10);
    assert!(p.run_until(|p| p.acked == 52, 1_000));
}

/// An owner with nothing to write while its route to the partner was
/// blackholed (connection kept, no bytes through) must report itself
/// mirrored again once heartbeats flow: no write is needed to notice.
#[test]
fn idle_owner_is_mirrored_again_after_a_stall_heals() {
    let mut p = Pair::new(1, Faults::default(), 12);
    for _ in 0..5 {
        p.submit(4096);
    }
    assert!(p.run_until(|p| p.acked == 5, 10_000));
    p.stalled[0] = true;
    assert!(p.run_until(
        |p| p
            .s_events
            .iter()
            .any(|e| matches!(e, Event::PeerSilent { .. })),
        10_000
    ));
    p.s.go_unmirrored();
    p.collect();
    assert!(!p.s.is_mirrored());
    p.stalled[0] = false;
    assert!(
        p.run_until(|p| p.s.is_mirrored(), 10_000),
        "still unmirrored {:?} after the route healed",
        p.elapsed()
    );
    assert!(p.s_events.contains(&Event::Mirrored));
    p.submit(4096);
    assert!(p.run_until(|p| p.acked == 6 && p.r.stored_upto() == 6, 10_000));
    // The partner heard silence, then learns the owner's state afresh: its
    // live replay resumes only on a SERVING announced after the silence.
    let silent_at = p
        .r_events
        .iter()
        .rposition(|e| matches!(e, Event::PeerSilent { .. }))
        .expect("the partner noticed the stall");
    let last_state = p.r_events[silent_at..].iter().rev().find_map(|e| match e {
        Event::PeerState(s) => Some(*s),
        _ => None,
    });
    assert_eq!(
        last_state,
        Some(NodeState::SERVING),
        "{:?}",
        &p.r_events[silent_at..]
    );
}

/// A stall the owner rides out without going unmirrored: after the
/// silence the partner is told the owner's state again even though it did
/// not change, so it can trust its index again.
#[test]
fn partner_hears_the_owners_state_again_after_a_silence() {
    let mut p = Pair::new(1, Faults::default(), 13);
    p.submit(4096);
    assert!(p.run_until(|p| p.acked == 1, 10_000));
    p.stalled[0] = true;
    assert!(p.run_until(
        |p| p
            .r_events
            .iter()
            .any(|e| matches!(e, Event::PeerSilent { .. })),
        10_000
    ));
    let silent_at = p.r_events.len();
    p.stalled[0] = false;
    assert!(p.run_until(
        |p| p.r_events[silent_at..].contains(&Event::PeerState(NodeState::SERVING)),
        10_000
    ));
}

#[test]
fn partner_restart_with_empty_region_is_refilled_from_log() {
    let mut p = Pair::new(2, Faults::default(), 9);
    for _ in 0..30 {
        p.submit(4096);
    }
    assert!(p.run_until(|p| p.acked == 30, 10_000));
    p.cut(PathId(0));
    p.cut(PathId(1));
    // A new partner process whose PARTNER portion is blank.
    p.r = Receiver::new(config(2, 1, 2, 23), MemStore::default(), 0, 0, p.now);
    p.indexed.clear();
    p.connect(PathId(0));
    p.connect(PathId(1));
    assert!(p.run_until(|p| p.r.stored_upto() == 30, 10_000));
    assert_exactly_once(&p, 30);
}

#[test]
fn receiver_refuses_wrong_layout_and_stale_epoch() {
    let t = Instant::now();
    let mut r = Receiver::new(config(2, 1, 1, 1), MemStore::default(), 0, 0, t);
    r.set_min_peer_epoch(5);
    r.path_up(PathId(0)).unwrap();
    let mut s = Sender::new(config(1, 2, 1, 2), Log::default(), 0, 0, t);
    s.path_up(PathId(0)).unwrap();
    let hello = s.poll_transmit().unwrap();
    r.handle_input(PathId(0), &hello.data, t);
    let ev: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
    assert!(matches!(
        ev[..],
        [Event::PathFailed {
            error: Error::StaleEpoch { peer: 1, min: 5 },
            ..
        }]
    ));
    let mut c = config(1, 2, 1, 3);
    c.region_len = REGION / 2;
    let mut s = Sender::new(c, Log::default(), 0, 0, t);
    let mut r = Receiver::new(config(2, 1, 1, 1), MemStore::default(), 0, 0, t);
    s.path_up(PathId(0)).unwrap();
    r.path_up(PathId(0)).unwrap();
    r.handle_input(PathId(0), &s.poll_transmit().unwrap().data, t);
    assert!(matches!(
        r.poll_event(),
        Some(Event::PathFailed {
            error: Error::PeerMismatch(_),
            ..
        })
    ));
}

#[test]
fn fencing_the_owner_cuts_its_established_paths() {
    let mut p = Pair::new(2, Faults::default(), 11);
    for _ in 0..5 {
        p.submit(512);
    }
    assert!(p.run_until(|p| p.acked == 5, 1_000));
    // The takeover fenced the owner (epoch 1) by moving to epoch 2: its
    // open connections must not go on mirroring.
    p.r.set_min_peer_epoch(2);
    p.collect();
    let stale = p
        .r_events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::PathFailed {
                    error: Error::StaleEpoch { peer: 1, min: 2 },
                    ..
                }
            )
        })
        .count();
    assert_eq!(stale, 2, "{:?}", p.r_events);
    p.submit(512);
    p.run_until(|_| false, 200);
    assert_eq!(p.r.stored_upto(), 5, "a fenced owner's record was stored");
    assert_eq!(p.acked, 5, "a fenced owner's record was acked");
    assert!(p.s_events.iter().any(|e| matches!(
        e,
        Event::PathFailed {
            error: Error::Goodbye(GoodbyeReason::STALE_EPOCH),
            ..
        }
    )));
}

#[test]
fn store_failure_closes_everything() {
    let mut p = Pair::new(1, Faults::default(), 10);
    p.submit(100);
    assert!(p.run_until(|p| p.acked == 1, 1_000));
    // A store that starts failing (disk gone).
    let mut r = Receiver::new(
        config(2, 1, 1, 30),
        MemStore {
            fail: true,
            ..MemStore::default()
        },
        1,
        0,
        p.now,
    );
    std::mem::swap(&mut p.r, &mut r);
    p.cut(PathId(0));
    p.connect(PathId(0));
    p.submit(100);
    assert!(p.run_until(
        |p| p.r_events.iter().any(|e| matches!(e, Event::Failed(_))),
        1_000
    ));
    assert!(p.r.path_up(PathId(0)).is_err());
    assert_eq!(
        p.acked, 1,
        "nothing released that the partner did not store"
    );
}

fn hello_frames(paths: u8) -> (Sender<Log>, Receiver<MemStore>, Bytes, Bytes) {
    let t = Instant::now();
    let mut s = Sender::new(config(1, 2, paths, 2), Log::default(), 0, 0, t);
    let mut r = Receiver::new(config(2, 1, paths, 1), MemStore::default(), 0, 0, t);
    s.path_up(PathId(0)).unwrap();
    r.path_up(PathId(0)).unwrap();
    let sh = s.poll_transmit().unwrap().data;
    let rh = r.poll_transmit().unwrap().data;
    (s, r, sh, rh)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (a) Every submitted record is stored at its offset, indexed exactly
    /// once and acked, whatever the delays, splits, replays and cuts.
    #[test]
    fn every_record_stored_indexed_once_and_acked(
        seed in any::<u64>(),
        paths in 1u8..=3,
        n in 1u64..120,
        max_delay_us in 0u64..2000,
        dup in 0u32..200,
        chunks in 1usize..4,
        cuts in proptest::collection::vec((1u64..120, 0u8..3), 0..4),
        prune_at in proptest::option::of(1u64..120),
    ) {
        let mut p = Pair::new(paths, Faults { max_delay_us, dup_per_mille: dup, max_chunks: chunks }, seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x55);
        for i in 1..=n {
            let len = rng.gen_range(0..=8192);
            p.submit(len);
            for &(at, path) in &cuts {
                if at == i && path < paths {
                    p.cut(PathId(path));
                    p.step();
                    p.connect(PathId(path));
                }
            }
            if prune_at == Some(i) && p.acked > 0 {
                let a = p.acked;
                p.cp_done(a);
            }
            if rng.gen_range(0..4) == 0 {
                p.step();
            }
        }
        prop_assert!(p.run_until(|p| p.acked == n && p.r.stored_upto() == n, 200_000));
        assert_exactly_once(&p, n);
        prop_assert_eq!(p.s.stats().unacked_records, 0);
        let failed = p.r_events.iter().any(|e| matches!(e, Event::PathFailed { .. }));
        prop_assert!(!failed);
    }

    /// (d) Garbage or mutated frames after a valid HELLO never panic either
    /// end; they fail the path.
    #[test]
    fn malformed_input_never_panics(
        garbage in proptest::collection::vec(any::<u8>(), 1..400),
        muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        use_valid in any::<bool>(),
    ) {
        let (mut s, mut r, sh, rh) = hello_frames(1);
        let t = Instant::now();
        r.handle_input(PathId(0), &sh, t);
        s.handle_input(PathId(0), &rh, t);
        let mut input = if use_valid {
            Frame::Records(vec![frame::RecordEntry { seq: 1, offset: 0, bytes: record_bytes(1, 300) }]).encode().to_vec()
        } else {
            garbage.clone()
        };
        for (i, v) in &muts {
            let i = i % input.len();
            input[i] = *v;
        }
        r.handle_input(PathId(0), &input, t);
        s.handle_input(PathId(0), &input, t);
        while r.poll_event().is_some() {}
        while s.poll_event().is_some() {}
        while r.poll_transmit().is_some() {}
        while s.poll_transmit().is_some() {}
        // And before any HELLO.
        let (mut s, mut r, _, _) = hello_frames(1);
        r.handle_input(PathId(0), &garbage, t);
        s.handle_input(PathId(0), &garbage, t);
        r.handle_input(PathId(9), &garbage, t);
    }
}
