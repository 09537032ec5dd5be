//! nvtarget-mirror: the HA interconnect protocol, sans-IO.
//!
//! The owner of an NVRAM log mirrors every record to its partner, which
//! stores it at the same offset of its PARTNER portion and indexes it before
//! the owner answers the initiator. This crate is the protocol only: bytes
//! and `now` in, bytes and events out (quinn-proto style). A thin tokio
//! driver in the binary moves the bytes over 1..K TCP connections
//! (`interconnect.paths`) and feeds the clock.
//!
//! ```text
//! owner                                        partner
//! Sender::submit(seq, offset, bytes)  RECORDS  Receiver: PartnerStore::store,
//!   batches, pipelines over K paths  ───────▶    sync, Event::Indexed (seq order)
//! Event::Acked(upto): answer writes   ◀─────── ACK(highest contiguous stored)
//! Sender::cp_done(seq)                 PRUNE   Event::Pruned(seq)
//! heartbeats both ways (100 ms); Event::PeerSilent after 10 missed
//! ```
//!
//! Driver loop, for either end: on connect `path_up`, on bytes
//! `handle_input`, on close `path_down`; then drain `poll_transmit` (write
//! each `Transmit` to its path), drain `poll_event`, and sleep until
//! `poll_timeout` and call `handle_timeout`.
//!
//! Exactly-once: seqs are the log's seqs (consecutive). The partner
//! acknowledges the highest *contiguous* seq it has stored; anything at or
//! below it that arrives again (a retransmission after a reconnect, or on
//! another path) is skipped, so a record is stored idempotently and indexed
//! once.
//!
//! Modules: [`frame`] (wire format), [`sender`], [`receiver`], [`error`].
#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
mod link;
pub mod receiver;
pub mod sender;

use std::time::{Duration, Instant};

pub use error::{Error, Result};
pub use frame::{Frame, GoodbyeReason, Hello, MsgType, NodeState, Role};
pub use nvtarget_nvram::{RecordMeta, Seq};
pub use receiver::{PartnerStore, Receiver};
pub use sender::{RecordSource, Sender, Ticket};

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Default number of missed heartbeats before `PeerSilent` (1 s at 100 ms).
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 10;

/// One of the K interconnect connections of a pair, `0..paths`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u8);

/// Bytes to write to one path, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub path: PathId,
    pub data: bytes::Bytes,
}

/// Settings of one end of a mirror stream.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id and the partner's (a HELLO from another id is refused:
    /// a miswired interconnect must not mirror into the wrong node).
    pub node_id: u64,
    pub peer_id: u64,
    /// Random per process start; lets the owner tell a restarted partner
    /// (whose stored seq may be lower than what it acked before) from a
    /// HELLO that was merely overtaken by an ACK on another path.
    pub instance: u64,
    /// This node's epoch (the takeover bumps it to fence a failed node).
    pub epoch: u64,
    /// `interconnect.paths`: K connections per pair.
    pub paths: u8,
    /// Length of the LOCAL portion (owner) / PARTNER portion (partner);
    /// HELLO checks they are equal, so offsets mean the same on both sides.
    pub region_len: u64,
    pub heartbeat_interval: Duration,
    pub missed_heartbeats: u32,
    /// A RECORDS frame is closed at this many bytes (one bigger record goes
    /// alone).
    pub batch_bytes: usize,
    /// Most record bytes sent and not yet acknowledged, over all paths.
    pub window_bytes: usize,
    /// Largest frame body accepted from the peer (and sent).
    pub max_body: u32,
    /// Partner only: most records stored ahead of a gap (multi-path
    /// reordering) before the path is failed.
    pub max_ahead: usize,
}

impl Config {
    pub fn new(node_id: u64, peer_id: u64, region_len: u64) -> Config {
        Config {
            node_id,
            peer_id,
            instance: rand_instance(),
            epoch: 1,
            paths: 1,
            region_len,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: DEFAULT_MISSED_HEARTBEATS,
            batch_bytes: 256 << 10,
            window_bytes: 32 << 20,
            max_body: frame::DEFAULT_MAX_BODY,
            max_ahead: 1 << 16,
        }
    }
}

/// A process-unique value without a dependency on a RNG crate: the
/// randomized std hasher keys are enough to tell two process starts apart.
fn rand_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// What the state machines tell the driver and the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Sender: every record with seq <= this may be answered: it is stored
    /// and indexed on the partner, or (while unmirrored) durable locally.
    /// Monotonic.
    Acked(Seq),
    /// Receiver: a record is durably in the PARTNER portion; feed the
    /// dependency index. Emitted once per seq, in seq order.
    Indexed {
        meta: RecordMeta,
        seq: Seq,
        offset: u64,
        len: u64,
    },
    /// Receiver: records <= seq are covered by the owner's committed CP:
    /// drop them from the index; their PARTNER space may be reused.
    Pruned(Seq),
    /// A path completed its HELLO exchange.
    PathReady { path: PathId, peer: Hello },
    /// A path failed (bad input, peer refused, GOODBYE): flush its pending
    /// transmits, then close the connection. `path_up` after reconnecting.
    PathFailed { path: PathId, error: Error },
    /// Nothing heard from the peer on any path since `since` (heartbeat
    /// interval x missed heartbeats). The owner keeps holding acks; the node
    /// must consult the partner's mailbox and then either take over
    /// (partner) or call `Sender::go_unmirrored` (owner).
    PeerSilent { since: Instant },
    /// The peer is heard again after `PeerSilent`.
    PeerAlive,
    /// The peer's heartbeat state changed.
    PeerState(NodeState),
    /// Sender: the partner caught up with every record logged; writes wait
    /// for partner acks again.
    Mirrored,
    /// Sender: writes are answered on local durability alone.
    Unmirrored,
    /// Mirroring cannot continue: the partner's PARTNER store failed
    /// (receiver; every path is closed and refused from now on), or the local
    /// log no longer returns an unpruned record the partner lacks (sender).
    Failed(Error),
}
