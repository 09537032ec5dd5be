//! The owner's end: mirrors log records to the partner and says when writes
//! may be answered.
//!
//! Every seq in `(acked, last]` is in exactly one place: `unacked` (bytes in
//! memory, sent or not) or the fetch range `[fetch_next, fetch_end]` (still
//! to be read from the [`RecordSource`], i.e. the local log). Bytes handed to
//! `submit` are kept until the partner acks them, so memory is bounded by
//! the writes the node has in flight (each waits for its ack); records the
//! partner lacks for longer (after an unmirrored period or a partner that
//! lost its region) are read back from the log lazily, at most
//! `window_bytes` at a time.
//!
//! Batching is Nagle-free: a path with nothing in flight sends whatever is
//! queued at once; while frames are in flight on every path, records
//! accumulate and go out when a path drains or a batch fills.
//!
//! Release rule (STYLE 8): `Event::Acked(upto)` is emitted only for seqs the
//! partner acknowledged (stored + indexed), seqs covered by a committed CP,
//! or -- after the node confirmed through the mailbox that no takeover was
//! claimed and called [`Sender::go_unmirrored`] -- seqs durable locally.

use crate::error::{Error, Result};
use crate::frame::{
    Frame, GoodbyeReason, Hello, NodeState, RecordEntry, Role, ENTRY_HEAD_LEN, RECORDS_HEAD_LEN,
};
use crate::link::Link;
use crate::{Config, Event, PathId, Seq, Transmit};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

/// Read access to the local log, for records no longer (or never) in the
/// sender's memory. The binary implements it over the NVRAM log.
pub trait RecordSource {
    /// Record `seq`: its offset relative to the LOCAL portion and its bytes
    /// (64-byte header + data, no padding). `None` if the log no longer has
    /// it (pruned).
    fn read(&self, seq: Seq) -> Option<(u64, Bytes)>;
}

/// A submitted record. The write it belongs to may be answered once an
/// `Event::Acked(upto)` with `upto >= ticket.0` has been seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub Seq);

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub last_submitted: Seq,
    pub acked: Seq,
    pub released: Seq,
    pub pruned: Seq,
    pub unacked_records: usize,
    pub unsent_bytes: usize,
    pub inflight_bytes: usize,
    pub mirrored: bool,
    pub frames_sent: u64,
    pub records_sent: u64,
}

struct Pending {
    offset: u64,
    bytes: Bytes,
    sent_on: Option<PathId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Mirrored,
    Unmirrored,
}

pub struct Sender<S> {
    link: Link,
    src: S,
    mode: Mode,
    last: Seq,
    acked: Seq,
    released: Seq,
    pruned: Seq,
    peer_instance: Option<u64>,
    unacked: BTreeMap<Seq, Pending>,
    unsent: BTreeSet<Seq>,
    unsent_bytes: usize,
    /// Per path: frames in flight as (highest seq, record bytes).
    inflight: Vec<VecDeque<(Seq, usize)>>,
    inflight_bytes: usize,
    fetch_next: Seq,
    fetch_end: Seq,
    rr: usize,
    frames_sent: u64,
    records_sent: u64,
}

impl<S: RecordSource> Sender<S> {
    /// `pruned`: the highest seq covered by the store's committed CP (the
    /// partner needs nothing at or below it). `last_logged`: the highest seq
    /// already in the local log; records in `(pruned, last_logged]` are sent
    /// from `src` once a partner connects, and `submit` continues at
    /// `last_logged + 1`. The sender starts mirrored: writes wait for the
    /// partner until the node decides otherwise.
    pub fn new(cfg: Config, src: S, pruned: Seq, last_logged: Seq, now: Instant) -> Self {
        let last = last_logged.max(pruned);
        let mut link = Link::new(cfg, Role::Owner, now);
        link.set_state(NodeState::SERVING);
        let n = link.path_count();
        Sender {
            link,
            src,
            mode: Mode::Mirrored,
            last,
            acked: pruned,
            // Records logged before we started have no waiting initiator.
            released: last,
            pruned,
            peer_instance: None,
            unacked: BTreeMap::new(),
            unsent: BTreeSet::new(),
            unsent_bytes: 0,
            inflight: vec![VecDeque::new(); n],
            inflight_bytes: 0,
            fetch_next: pruned + 1,
            fetch_end: last,
            rr: 0,
            frames_sent: 0,
            records_sent: 0,
        }
    }

    /// Mirrors record `seq` (the next seq of the log), stored at `offset` of
    /// the LOCAL portion; `bytes` are the record as the log wrote it (header
    /// + data). Call after the local append is durable.
    pub fn submit(&mut self, seq: Seq, offset: u64, bytes: Bytes) -> Result<Ticket> {
        if seq != self.last + 1 {
            return Err(Error::SeqGap {
                seq,
                expected: self.last + 1,
            });
        }
        let max =
            (self.link.cfg.max_body as usize).saturating_sub(RECORDS_HEAD_LEN + ENTRY_HEAD_LEN);
        if bytes.len() > max {
            return Err(Error::RecordTooLarge {
                len: bytes.len() as u64,
                max: max as u64,
            });
        }
        self.last = seq;
        match self.mode {
            Mode::Mirrored => {
                self.unsent_bytes += bytes.len();
                self.unsent.insert(seq);
                self.unacked.insert(
                    seq,
                    Pending {
                        offset,
                        bytes,
                        sent_on: None,
                    },
                );
            }
            Mode::Unmirrored => {
                // Not kept: the partner may be gone for long; the log has it.
                self.fetch_end = seq;
                self.release(seq);
            }
        }
        Ok(Ticket(seq))
    }

    /// A CP covering every seq <= `seq` committed: tell the partner to drop
    /// its copies. Those writes are durable in the store, so they are
    /// released even if the partner never acked them.
    pub fn cp_done(&mut self, seq: Seq) {
        if seq <= self.pruned {
            return;
        }
        let seq = seq.min(self.last);
        self.pruned = seq;
        let first = self.link.ready_paths().next();
        if let Some(p) = first {
            self.link.queue(p, &Frame::Prune(seq));
        }
        // Otherwise the next HELLO (stored < pruned) triggers the PRUNE.
        self.forget_upto(seq);
        self.release(seq);
    }

    /// The node confirmed in the partner's mailbox that no takeover was
    /// claimed: answer writes on local durability from now on (every write
    /// waiting for an ack is released at once). Mirroring resumes by itself
    /// when a partner reconnects and catches up (`Event::Mirrored`).
    pub fn go_unmirrored(&mut self) {
        if self.mode == Mode::Unmirrored {
            return;
        }
        self.mode = Mode::Unmirrored;
        self.link.set_state(NodeState::SERVING_UNMIRRORED);
        self.drop_memory();
        self.events_push(Event::Unmirrored);
        self.release(self.last);
    }

    pub fn is_mirrored(&self) -> bool {
        self.mode == Mode::Mirrored
    }

    /// The state our heartbeats announce.
    pub fn set_state(&mut self, s: NodeState) {
        self.link.set_state(s);
    }

    /// A connection for path `p` is established (fresh or reconnected).
    pub fn path_up(&mut self, p: PathId) -> Result<()> {
        self.requeue(p);
        self.link.path_up(p, self.last, self.link.cfg.region_len)
    }

    /// The connection for `p` closed; its unacked records go out on others.
    pub fn path_down(&mut self, p: PathId) -> Result<()> {
        self.requeue(p);
        self.link.path_down(p)
    }

    /// Orderly shutdown: a GOODBYE on every path (flush, then close).
    pub fn close(&mut self) {
        for p in self.link.ready_paths().collect::<Vec<_>>() {
            self.link.queue(p, &Frame::Goodbye(GoodbyeReason::SHUTDOWN));
        }
    }

    /// Bytes read from path `p`'s connection (any split).
    pub fn handle_input(&mut self, p: PathId, data: &[u8], now: Instant) {
        let frames = self.link.input(p, data, now, 0);
        let mut ok = true;
        for f in frames {
            let r = match f {
                Frame::Hello(h) => self.on_hello(p, h),
                Frame::Ack(upto) => self.on_ack(upto),
                other => Err(Error::Unexpected(other.msg_type())),
            };
            if let Err(e) = r {
                self.link
                    .fail_path(p, e, Some(GoodbyeReason::PROTOCOL_ERROR));
                ok = false;
                break;
            }
        }
        if !self.link.is_ready(p) {
            self.requeue(p);
        }
        // Heartbeats count: an idle owner whose route healed without a
        // reconnect sees no HELLO and no ACK, only heartbeats, and must
        // still become mirrored again.
        if ok {
            self.maybe_mirrored();
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.link.handle_timeout(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.link.poll_timeout())
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.link.events.pop_front()
    }

    /// Next bytes to write. Call until `None` after every input, submit and
    /// timeout.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.link.poll_queued() {
            return Some(t);
        }
        self.fill();
        if self.make_batch() {
            return self.link.poll_queued();
        }
        None
    }

    pub fn stats(&self) -> SenderStats {
        SenderStats {
            last_submitted: self.last,
            acked: self.acked,
            released: self.released,
            pruned: self.pruned,
            unacked_records: self.unacked.len(),
            unsent_bytes: self.unsent_bytes,
            inflight_bytes: self.inflight_bytes,
            mirrored: self.mode == Mode::Mirrored,
            frames_sent: self.frames_sent,
            records_sent: self.records_sent,
        }
    }

    pub fn source(&self) -> &S {
        &self.src
    }

    fn events_push(&mut self, e: Event) {
        self.link.events.push_back(e);
    }

    fn release(&mut self, upto: Seq) {
        if upto > self.released {
            self.released = upto;
            self.events_push(Event::Acked(upto));
        }
    }

    fn on_hello(&mut self, p: PathId, h: Hello) -> Result<()> {
        if h.stored_seq > self.last {
            return Err(Error::PeerMismatch(format!(
                "partner holds seq {} but our log ends at {}",
                h.stored_seq, self.last
            )));
        }
        let restarted = self.peer_instance != Some(h.instance);
        self.peer_instance = Some(h.instance);
        if restarted {
            // Connections to the partner's previous process are dead even if
            // no error reached us yet.
            for q in self
                .link
                .ready_paths()
                .filter(|&q| q != p)
                .collect::<Vec<_>>()
            {
                self.link
                    .fail_path(q, Error::PeerMismatch("partner restarted".into()), None);
                self.requeue(q);
            }
            let has = h.stored_seq.max(self.pruned);
            if has < self.acked {
                // The partner lost records it had acked (new region): all
                // of (has, last] comes from the log again.
                self.acked = has;
                self.drop_memory();
            }
        }
        if h.stored_seq < self.pruned {
            self.link.queue(p, &Frame::Prune(self.pruned));
        }
        self.events_push(Event::PathReady { path: p, peer: h });
        // A stale HELLO (overtaken by an ACK on another path) is harmless:
        // acks only move forward.
        self.on_ack(h.stored_seq.max(self.pruned).min(self.last))
    }

    fn on_ack(&mut self, upto: Seq) -> Result<()> {
        if upto > self.last {
            return Err(Error::PeerMismatch(format!(
                "ack of seq {upto} beyond our last seq {}",
                self.last
            )));
        }
        if upto <= self.acked {
            return Ok(());
        }
        self.acked = upto;
        self.forget_upto(upto);
        // Not a FIFO pop: frames resent after a path loss may carry lower
        // seqs than frames already ahead of them on a path.
        let mut freed = 0;
        for q in &mut self.inflight {
            q.retain(|&(s, n)| {
                if s <= upto {
                    freed += n;
                }
                s > upto
            });
        }
        self.inflight_bytes = self.inflight_bytes.saturating_sub(freed);
        self.release(upto);
        Ok(())
    }

    /// Drops every in-memory copy at or below `upto` and moves the fetch
    /// range above it.
    fn forget_upto(&mut self, upto: Seq) {
        let keep = self.unacked.split_off(&(upto.saturating_add(1)));
        let gone = std::mem::replace(&mut self.unacked, keep);
        for (seq, p) in gone {
            if self.unsent.remove(&seq) {
                self.unsent_bytes -= p.bytes.len();
            }
        }
        self.fetch_next = self.fetch_next.max(upto.saturating_add(1));
    }

    /// Forgets all in-memory bytes: `(acked, last]` is fetched from the log.
    fn drop_memory(&mut self) {
        self.unacked.clear();
        self.unsent.clear();
        self.unsent_bytes = 0;
        for q in &mut self.inflight {
            q.clear();
        }
        self.inflight_bytes = 0;
        self.fetch_next = self.acked + 1;
        self.fetch_end = self.last;
    }

    /// Path `p` is gone: what was in flight on it goes out again elsewhere.
    /// The partner may have stored some of it; it skips what it has.
    fn requeue(&mut self, p: PathId) {
        let Some(q) = self.inflight.get_mut(p.0 as usize) else {
            return;
        };
        for (_, n) in q.drain(..) {
            self.inflight_bytes = self.inflight_bytes.saturating_sub(n);
        }
        for (seq, e) in self.unacked.iter_mut() {
            if e.sent_on == Some(p) {
                e.sent_on = None;
                self.unsent.insert(*seq);
                self.unsent_bytes += e.bytes.len();
            }
        }
    }

    fn maybe_mirrored(&mut self) {
        if self.mode == Mode::Unmirrored
            && self.acked >= self.last
            && !self.link.peer_silent()
            && self.link.ready_paths().next().is_some()
        {
            self.mode = Mode::Mirrored;
            self.fetch_next = self.last + 1;
            self.fetch_end = self.last;
            self.link.set_state(NodeState::SERVING);
            self.events_push(Event::Mirrored);
        }
    }

    /// Loads records the partner lacks from the log, a window at a time.
    fn fill(&mut self) {
        if self.link.ready_paths().next().is_none() {
            return;
        }
        while self.fetch_next <= self.fetch_end && self.unsent_bytes < self.link.cfg.window_bytes {
            let seq = self.fetch_next;
            let Some((offset, bytes)) = self.src.read(seq) else {
                // The log must hold every unpruned record; without it the
                // partner's copy can never be complete.
                self.fetch_end = self.fetch_next - 1;
                self.events_push(Event::Failed(Error::BadRecord {
                    seq,
                    what: "local log no longer has this unpruned record".into(),
                }));
                return;
            };
            self.fetch_next += 1;
            self.unsent_bytes += bytes.len();
            self.unsent.insert(seq);
            self.unacked.insert(
                seq,
                Pending {
                    offset,
                    bytes,
                    sent_on: None,
                },
            );
        }
    }

    /// Queues one RECORDS frame if the batching rule allows; true if it did.
    fn make_batch(&mut self) -> bool {
        if self.unsent.is_empty() || self.inflight_bytes >= self.link.cfg.window_bytes {
            return false;
        }
        let ready: Vec<PathId> = self.link.ready_paths().collect();
        if ready.is_empty() {
            return false;
        }
        let n = ready.len();
        let idle = (0..n)
            .map(|k| ready[(self.rr + k) % n])
            .find(|p| self.inflight[p.0 as usize].is_empty());
        let path = match idle {
            Some(p) => p,
            None if self.unsent_bytes >= self.link.cfg.batch_bytes => {
                match ready.iter().min_by_key(|p| {
                    self.inflight[p.0 as usize]
                        .iter()
                        .map(|x| x.1)
                        .sum::<usize>()
                }) {
                    Some(&p) => p,
                    None => return false,
                }
            }
            None => return false,
        };
        self.rr = self.rr.wrapping_add(1);
        let limit = self
            .link
            .cfg
            .batch_bytes
            .min((self.link.cfg.max_body as usize).saturating_sub(RECORDS_HEAD_LEN));
        let mut entries = Vec::new();
        let mut size = 0usize;
        let mut top = 0;
        while let Some(&seq) = self.unsent.first() {
            let Some(e) = self.unacked.get_mut(&seq) else {
                self.unsent.remove(&seq);
                continue;
            };
            let len = ENTRY_HEAD_LEN + e.bytes.len();
            if !entries.is_empty() && size + len > limit {
                break;
            }
            self.unsent.remove(&seq);
            self.unsent_bytes -= e.bytes.len();
            e.sent_on = Some(path);
            size += len;
            top = seq;
            entries.push(RecordEntry {
                seq,
                offset: e.offset,
                bytes: e.bytes.clone(),
            });
        }
        if entries.is_empty() {
            return false;
        }
        self.frames_sent += 1;
        self.records_sent += entries.len() as u64;
        self.inflight[path.0 as usize].push_back((top, size));
        self.inflight_bytes += size;
        self.link.queue(path, &Frame::Records(entries));
        true
    }
}
