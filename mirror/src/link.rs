//! What both ends share: the K paths (byte buffers in and out, HELLO-first
//! rule), heartbeats and peer liveness, and the event queue.
//!
//! Invariants:
//! * a path delivers frames to its owner only after a valid HELLO from the
//!   peer and only while it is up; after the first bad byte the path is
//!   failed (its input is dropped, a GOODBYE may still be flushed) and only
//!   `path_up` revives it;
//! * every up path gets a heartbeat each interval; any valid frame from the
//!   peer on any path proves it alive (a big batch ahead of a heartbeat in
//!   the same TCP stream must not look like silence);
//! * `PeerSilent` fires once per silence, exactly `interval * missed` after
//!   the last frame heard, and `PeerAlive` once when it ends.

use crate::error::{Error, Result};
use crate::frame::{self, Frame, GoodbyeReason, Heartbeat, Hello, MsgType, NodeState, Role};
use crate::{Config, Event, PathId, Transmit};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Default)]
struct Path {
    up: bool,
    /// The peer's HELLO on this connection, once received.
    peer: Option<Hello>,
    rx: BytesMut,
    /// Frames waiting to be written, control frames and batches alike, in
    /// the order they must appear on the stream.
    tx: VecDeque<Bytes>,
}

pub(crate) struct Link {
    pub(crate) cfg: Config,
    role: Role,
    pub(crate) instance: u64,
    start: Instant,
    paths: Vec<Path>,
    rr: usize,
    state: NodeState,
    hb_seq: u64,
    next_hb: Instant,
    last_heard: Instant,
    silent: bool,
    peer_state: Option<NodeState>,
    pub(crate) events: VecDeque<Event>,
}

impl Link {
    pub(crate) fn new(cfg: Config, role: Role, now: Instant) -> Link {
        let paths = (0..cfg.paths.max(1)).map(|_| Path::default()).collect();
        Link {
            instance: cfg.instance,
            role,
            start: now,
            paths,
            rr: 0,
            state: NodeState::BOOTING,
            hb_seq: 0,
            next_hb: now + cfg.heartbeat_interval,
            // A peer never heard from counts as heard at start: the silence
            // clock starts when we do.
            last_heard: now,
            silent: false,
            peer_state: None,
            events: VecDeque::new(),
            cfg,
        }
    }

    fn check(&self, p: PathId) -> Result<usize> {
        let i = p.0 as usize;
        if i < self.paths.len() {
            Ok(i)
        } else {
            Err(Error::NoSuchPath(i, self.paths.len()))
        }
    }

    pub(crate) fn path_count(&self) -> usize {
        self.paths.len()
    }

    /// A connection for `p` is established: reset it and queue our HELLO.
    pub(crate) fn path_up(&mut self, p: PathId, stored_seq: u64, region_len: u64) -> Result<()> {
        let i = self.check(p)?;
        let hello = Frame::Hello(Hello {
            node_id: self.cfg.node_id,
            instance: self.instance,
            epoch: self.cfg.epoch,
            stored_seq,
            region_len,
            role: self.role,
            path: p.0,
        });
        self.paths[i] = Path {
            up: true,
            tx: VecDeque::from([hello.encode()]),
            ..Path::default()
        };
        Ok(())
    }

    /// The connection for `p` is gone: forget its buffers.
    pub(crate) fn path_down(&mut self, p: PathId) -> Result<()> {
        let i = self.check(p)?;
        self.paths[i] = Path::default();
        Ok(())
    }

    /// Fails `p` after a protocol error: input is dropped and, if `reason`,
    /// a GOODBYE replaces whatever was queued (the driver flushes it, then
    /// closes the connection on the `PathFailed` event).
    pub(crate) fn fail_path(&mut self, p: PathId, error: Error, reason: Option<GoodbyeReason>) {
        let Ok(i) = self.check(p) else { return };
        let mut path = Path::default();
        if let Some(r) = reason {
            path.tx.push_back(Frame::Goodbye(r).encode());
        }
        self.paths[i] = path;
        self.events.push_back(Event::PathFailed { path: p, error });
    }

    pub(crate) fn is_ready(&self, p: PathId) -> bool {
        self.paths
            .get(p.0 as usize)
            .is_some_and(|x| x.up && x.peer.is_some())
    }

    /// The peer's HELLO on path `p`, once received.
    pub(crate) fn peer(&self, p: PathId) -> Option<Hello> {
        self.paths.get(p.0 as usize).and_then(|x| x.peer)
    }

    pub(crate) fn ready_paths(&self) -> impl Iterator<Item = PathId> + '_ {
        self.paths
            .iter()
            .enumerate()
            .filter(|(_, x)| x.up && x.peer.is_some())
            .map(|(i, _)| PathId(i as u8))
    }

    pub(crate) fn queue(&mut self, p: PathId, f: &Frame) {
        if let Some(path) = self.paths.get_mut(p.0 as usize) {
            if path.up {
                path.tx.push_back(f.encode());
            }
        }
    }

    /// Next queued frame of any path, paths served round-robin so one busy
    /// path cannot starve another's heartbeats.
    pub(crate) fn poll_queued(&mut self) -> Option<Transmit> {
        let n = self.paths.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some(data) = self.paths[i].tx.pop_front() {
                self.rr = (i + 1) % n;
                return Some(Transmit {
                    path: PathId(i as u8),
                    data,
                });
            }
        }
        None
    }

    pub(crate) fn set_state(&mut self, s: NodeState) {
        self.state = s;
    }

    /// Buffers `data` and returns the complete frames meant for the owner
    /// of this link (heartbeats, HELLO checks and GOODBYE are handled here).
    /// A bad frame fails the path; frames before it are still returned.
    pub(crate) fn input(
        &mut self,
        p: PathId,
        data: &[u8],
        now: Instant,
        min_peer_epoch: u64,
    ) -> Vec<Frame> {
        let mut out = Vec::new();
        let Ok(i) = self.check(p) else {
            return out;
        };
        if !self.paths[i].up {
            return out;
        }
        self.paths[i].rx.extend_from_slice(data);
        loop {
            let path = &mut self.paths[i];
            let frame = match frame::frame_len(&path.rx, self.cfg.max_body) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let bytes = path.rx.split_to(n).freeze();
                    frame::decode(&bytes, self.cfg.max_body)
                        .and_then(|f| f.ok_or(Error::BadCrc).map(|(f, _)| f))
                }
                Err(e) => Err(e),
            };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    self.fail_path(p, e, Some(GoodbyeReason::PROTOCOL_ERROR));
                    break;
                }
            };
            match self.accept(i, frame, min_peer_epoch) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => {}
                Err((e, reason)) => {
                    self.fail_path(p, e, reason);
                    break;
                }
            }
            self.heard(now);
        }
        out
    }

    fn accept(
        &mut self,
        i: usize,
        f: Frame,
        min_peer_epoch: u64,
    ) -> std::result::Result<Option<Frame>, (Error, Option<GoodbyeReason>)> {
        let path = &mut self.paths[i];
        let Some(_) = path.peer else {
            let Frame::Hello(h) = f else {
                return Err((
                    Error::NoHello(f.msg_type()),
                    Some(GoodbyeReason::PROTOCOL_ERROR),
                ));
            };
            let mismatch = |what: String| {
                Err((
                    Error::PeerMismatch(what),
                    Some(GoodbyeReason::PEER_MISMATCH),
                ))
            };
            if h.role == self.role {
                return mismatch(format!("peer is also {:?}", h.role));
            }
            if h.node_id != self.cfg.peer_id {
                return mismatch(format!(
                    "node id {} (expected {})",
                    h.node_id, self.cfg.peer_id
                ));
            }
            if h.region_len != self.cfg.region_len {
                return mismatch(format!(
                    "region portion {} bytes (ours {})",
                    h.region_len, self.cfg.region_len
                ));
            }
            if h.epoch < min_peer_epoch {
                return Err((
                    Error::StaleEpoch {
                        peer: h.epoch,
                        min: min_peer_epoch,
                    },
                    Some(GoodbyeReason::STALE_EPOCH),
                ));
            }
            path.peer = Some(h);
            return Ok(Some(Frame::Hello(h)));
        };
        match f {
            Frame::Hello(_) => Err((
                Error::Unexpected(MsgType::HELLO),
                Some(GoodbyeReason::PROTOCOL_ERROR),
            )),
            Frame::Heartbeat(hb) => {
                if self.peer_state != Some(hb.state) {
                    self.peer_state = Some(hb.state);
                    self.events.push_back(Event::PeerState(hb.state));
                }
                Ok(None)
            }
            Frame::Goodbye(r) => Err((Error::Goodbye(r), None)),
            Frame::Unknown { .. } => Ok(None),
            other => Ok(Some(other)),
        }
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        if self.silent {
            self.silent = false;
            self.events.push_back(Event::PeerAlive);
        }
    }

    fn silent_at(&self) -> Instant {
        self.last_heard + self.cfg.heartbeat_interval * self.cfg.missed_heartbeats
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_hb {
            self.hb_seq += 1;
            let hb = Frame::Heartbeat(Heartbeat {
                seq: self.hb_seq,
                sent_at_us: u64::try_from(now.duration_since(self.start).as_micros())
                    .unwrap_or(u64::MAX),
                state: self.state,
            })
            .encode();
            for path in self.paths.iter_mut().filter(|x| x.up) {
                path.tx.push_back(hb.clone());
            }
            // Skip missed beats instead of bursting them after a stall.
            while self.next_hb <= now {
                self.next_hb += self.cfg.heartbeat_interval;
            }
        }
        if !self.silent && now >= self.silent_at() {
            self.silent = true;
            // Whatever the peer announced may have changed unheard: its
            // next heartbeat reports its state again (`PeerState`).
            self.peer_state = None;
            self.events.push_back(Event::PeerSilent {
                since: self.last_heard,
            });
        }
    }

    pub(crate) fn poll_timeout(&self) -> Instant {
        if self.silent {
            self.next_hb
        } else {
            self.next_hb.min(self.silent_at())
        }
    }

    pub(crate) fn peer_silent(&self) -> bool {
        self.silent
    }
}
