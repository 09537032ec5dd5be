//! The partner's end: stores the owner's records in the PARTNER portion,
//! indexes them once, acknowledges them.
//!
//! Invariants:
//! * `stored` is the highest seq such that every seq in `(pruned, stored]`
//!   is durably in the store (synced) -- the only seq ever acknowledged;
//! * a record is written to the store at most once per receiver lifetime
//!   (anything `<= stored` or already `ahead` is skipped), and `Indexed` is
//!   emitted exactly once per seq, in seq order, after the sync;
//! * records above a gap (multi-path reordering) are stored at once and
//!   indexed when the gap closes; a PRUNE covers gaps (the owner's CP holds
//!   those writes), so records at or below it are never indexed.

use crate::error::{Error, Result};
use crate::frame::{Frame, GoodbyeReason, RecordEntry, Role};
use crate::link::Link;
use crate::{Config, Event, NodeState, PathId, RecordMeta, Seq, Transmit};
use nvtarget_nvram::record;
use std::collections::BTreeMap;
use std::time::Instant;

/// The PARTNER portion of the local NVRAM region. The binary implements it
/// with `Log::partner_write` / `Log::partner_sync`.
pub trait PartnerStore {
    /// Writes `bytes` at `offset` relative to the PARTNER portion.
    fn store(&mut self, offset: u64, bytes: &[u8]) -> nvtarget_nvram::Result<()>;
    /// Makes every earlier `store` durable (a no-op in `Process` mode).
    fn sync(&mut self) -> nvtarget_nvram::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    meta: RecordMeta,
    offset: u64,
    len: u64,
}

pub struct Receiver<P> {
    link: Link,
    store: P,
    stored: Seq,
    pruned: Seq,
    ahead: BTreeMap<Seq, Stored>,
    min_peer_epoch: u64,
    failed: bool,
    records_stored: u64,
    duplicates: u64,
}

enum Fail {
    Path(Error),
    Store(Error),
}

impl<P: PartnerStore> Receiver<P> {
    /// `stored_upto`: the highest seq contiguously present in the PARTNER
    /// portion (from its scan after a restart; 0 when empty). `pruned`: the
    /// owner's last prune this node recorded.
    pub fn new(cfg: Config, store: P, stored_upto: Seq, pruned: Seq, now: Instant) -> Self {
        let mut link = Link::new(cfg, Role::Partner, now);
        link.set_state(NodeState::SERVING);
        Receiver {
            link,
            store,
            stored: stored_upto.max(pruned),
            pruned,
            ahead: BTreeMap::new(),
            min_peer_epoch: 0,
            failed: false,
            records_stored: 0,
            duplicates: 0,
        }
    }

    /// Refuse owners below this epoch (set after fencing the owner during a
    /// takeover, so a zombie owner cannot keep mirroring). Paths already
    /// established by an owner below it fail now (GOODBYE `STALE_EPOCH`):
    /// checking only new HELLOs would let a zombie's open connection go on
    /// storing, indexing and acking records after the fence.
    pub fn set_min_peer_epoch(&mut self, epoch: u64) {
        self.min_peer_epoch = epoch;
        for p in self.link.ready_paths().collect::<Vec<_>>() {
            if let Some(h) = self.link.peer(p).filter(|h| h.epoch < epoch) {
                self.link.fail_path(
                    p,
                    Error::StaleEpoch {
                        peer: h.epoch,
                        min: epoch,
                    },
                    Some(GoodbyeReason::STALE_EPOCH),
                );
            }
        }
    }

    pub fn set_state(&mut self, s: NodeState) {
        self.link.set_state(s);
    }

    /// Highest contiguous seq durably stored (what the next HELLO and ACK say).
    pub fn stored_upto(&self) -> Seq {
        self.stored
    }

    pub fn pruned(&self) -> Seq {
        self.pruned
    }

    /// Records written to the store / duplicates skipped, since start.
    pub fn counters(&self) -> (u64, u64) {
        (self.records_stored, self.duplicates)
    }

    pub fn store(&self) -> &P {
        &self.store
    }

    pub fn path_up(&mut self, p: PathId) -> Result<()> {
        if self.failed {
            return Err(Error::Store("partner store failed earlier".into()));
        }
        self.link.path_up(p, self.stored, self.link.cfg.region_len)
    }

    pub fn path_down(&mut self, p: PathId) -> Result<()> {
        self.link.path_down(p)
    }

    pub fn close(&mut self) {
        for p in self.link.ready_paths().collect::<Vec<_>>() {
            self.link.queue(p, &Frame::Goodbye(GoodbyeReason::SHUTDOWN));
        }
    }

    pub fn handle_input(&mut self, p: PathId, data: &[u8], now: Instant) {
        if self.failed {
            return;
        }
        let frames = self.link.input(p, data, now, self.min_peer_epoch);
        let mut wrote = false;
        let mut ack = false;
        let mut fail = None;
        'frames: for f in frames {
            match f {
                Frame::Hello(h) => self
                    .link
                    .events
                    .push_back(Event::PathReady { path: p, peer: h }),
                Frame::Records(es) => {
                    ack = true;
                    for e in es {
                        match self.record(e) {
                            Ok(w) => wrote |= w,
                            Err(f) => {
                                fail = Some(f);
                                break 'frames;
                            }
                        }
                    }
                }
                Frame::Prune(s) => {
                    ack = true;
                    self.prune(s);
                }
                other => {
                    fail = Some(Fail::Path(Error::Unexpected(other.msg_type())));
                    break;
                }
            }
        }
        // What was written before a bad frame is still good: sync, index and
        // ack it (on another path if this one is failing).
        if wrote {
            if let Err(e) = self.store.sync() {
                fail = Some(Fail::Store(Error::Store(e.to_string())));
            }
        }
        match fail {
            Some(Fail::Store(e)) => return self.store_failed(e),
            Some(Fail::Path(e)) => self
                .link
                .fail_path(p, e, Some(GoodbyeReason::PROTOCOL_ERROR)),
            None => {}
        }
        self.drain();
        if ack {
            let to = if self.link.is_ready(p) {
                Some(p)
            } else {
                self.link.ready_paths().next()
            };
            if let Some(to) = to {
                self.link.queue(to, &Frame::Ack(self.stored));
            }
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

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.link.poll_queued()
    }

    /// Stores one record unless it is already here. Ok(true): written.
    fn record(&mut self, e: RecordEntry) -> Result<bool, Fail> {
        if e.seq <= self.stored || self.ahead.contains_key(&e.seq) {
            self.duplicates += 1;
            return Ok(false);
        }
        let len = e.bytes.len() as u64;
        let region = self.link.cfg.region_len;
        if e.offset.checked_add(len).is_none_or(|end| end > region) {
            return Err(Fail::Path(Error::OutOfRegion {
                seq: e.seq,
                offset: e.offset,
                len,
                region,
            }));
        }
        // The frame checksum covered transport; this catches an owner that
        // sent bytes that are not the record it claims (a bug we must not
        // turn into a replayable record).
        let (h, _) = record::decode_ref(&e.bytes).map_err(|err| {
            Fail::Path(Error::BadRecord {
                seq: e.seq,
                what: err.to_string(),
            })
        })?;
        if self.ahead.len() >= self.link.cfg.max_ahead {
            return Err(Fail::Path(Error::ReorderFull(self.ahead.len())));
        }
        self.store
            .store(e.offset, &e.bytes)
            .map_err(|err| Fail::Store(Error::Store(err.to_string())))?;
        self.records_stored += 1;
        self.ahead.insert(
            e.seq,
            Stored {
                meta: h.meta,
                offset: e.offset,
                len,
            },
        );
        Ok(true)
    }

    fn prune(&mut self, s: Seq) {
        if s <= self.pruned {
            return;
        }
        self.pruned = s;
        self.stored = self.stored.max(s);
        self.ahead = self.ahead.split_off(&s.saturating_add(1));
        self.link.events.push_back(Event::Pruned(s));
    }

    /// Indexes the records that became contiguous. Called after the sync.
    fn drain(&mut self) {
        while let Some(st) = self.ahead.remove(&(self.stored + 1)) {
            self.stored += 1;
            self.link.events.push_back(Event::Indexed {
                meta: st.meta,
                seq: self.stored,
                offset: st.offset,
                len: st.len,
            });
        }
    }

    fn store_failed(&mut self, e: Error) {
        self.failed = true;
        for p in self.link.ready_paths().collect::<Vec<_>>() {
            self.link
                .fail_path(p, e.clone(), Some(GoodbyeReason::STORE_FAILED));
        }
        self.link.events.push_back(Event::Failed(e));
    }
}
