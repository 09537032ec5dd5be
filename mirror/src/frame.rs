//! Wire format of the interconnect: checksummed, length-prefixed frames.
//!
//! Every frame is a 16-byte header and a body:
//!
//! ```text
//! offset size field
//!      0    4 magic      b"NVMI"
//!      4    1 version    1
//!      5    1 type       open enum `MsgType`
//!      6    2 reserved   0
//!      8    4 body_len   bytes after the header (<= the receiver's limit)
//!     12    4 crc32c     over header bytes [0, 12) then the body
//!     16    … body
//! ```
//!
//! Bodies (all integers little-endian, like the NVRAM log; reserved = 0):
//!
//! ```text
//! HELLO      0x01  48 bytes
//!   0  8 node_id      who sends
//!   8  8 instance     random per process start: tells a restarted peer from a stale HELLO
//!  16  8 epoch        sender's epoch (takeover fences by bumping it)
//!  24  8 stored_seq   partner: highest contiguous seq durably stored; owner: highest seq logged
//!  32  8 region_len   owner: LOCAL portion length; partner: PARTNER portion length (must match)
//!  40  1 role         0 = owner (Sender), 1 = partner (Receiver)
//!  41  1 path         path index on the sender of this HELLO
//!  42  6 reserved
//! RECORDS    0x02  8 + n * (24 + len)
//!   0  4 count
//!   4  4 reserved
//!   8  … count entries, back to back:
//!        0  8 seq
//!        8  8 offset   relative to the LOCAL portion = same offset in the partner's PARTNER portion
//!       16  4 len      bytes of record (64-byte NVRAM header + data, no padding)
//!       20  4 reserved
//!       24  … record bytes exactly as the log wrote them
//! ACK        0x03   8 bytes: highest contiguous seq stored + indexed (or covered by a prune)
//! PRUNE      0x04   8 bytes: every seq <= this is covered by a committed CP
//! HEARTBEAT  0x05  24 bytes
//!   0  8 hb_seq      per sender, +1 per heartbeat
//!   8  8 sent_at_us  sender's monotonic clock, microseconds since it started (informational)
//!  16  1 state       open enum `NodeState`
//!  17  7 reserved
//! GOODBYE    0x06   8 bytes: reason (open enum `GoodbyeReason`, u32), reserved u32
//! ```
//!
//! Invariants: the decoder checks the header length once, then the body
//! length against the limit, then the checksum, and only then parses the
//! body through fixed offsets; it never panics and rejects anything it would
//! not re-encode byte for byte (reserved bytes, trailing bytes), so
//! `encode(decode(b)) == b` for every accepted `b`. Unknown message types
//! with a valid checksum decode to [`Frame::Unknown`] (a newer peer may send
//! them; the state machines ignore them).

use crate::error::{Error, Result};
use bytes::{BufMut, Bytes, BytesMut};
use nvtarget_nvram::record::{self, RECORD_ALIGN, RECORD_HEADER_LEN};
use nvtarget_nvram::{RecordMeta, Seq};
use std::fmt;

pub const MAGIC: [u8; 4] = *b"NVMI";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
const TYPE_OFF: usize = 5;
const LEN_OFF: usize = 8;
const CRC_OFF: usize = 12;

pub const HELLO_LEN: usize = 48;
pub const RECORDS_HEAD_LEN: usize = 8;
pub const ENTRY_HEAD_LEN: usize = 24;
pub const SEQ_BODY_LEN: usize = 8;
pub const HEARTBEAT_LEN: usize = 24;
pub const GOODBYE_LEN: usize = 8;

/// Default bound on a frame body: a record of a 16 MiB write plus headers.
/// The receiver refuses bigger frames before buffering them.
pub const DEFAULT_MAX_BODY: u32 = (16 << 20) + 4096;

macro_rules! open_enum {
    ($(#[$tm:meta])* $name:ident($repr:ty) { $($(#[$m:meta])* $c:ident = $v:expr,)* }) => {
        $(#[$tm])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $repr);
        impl $name {
            $($(#[$m])* pub const $c: $name = $name($v);)*
            /// The constant's name, if this value has one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some(stringify!($c)),)*
                    _ => None,
                }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, concat!(stringify!($name), "(0x{:x})"), self.0),
                }
            }
        }
    };
}

open_enum! {
    /// Frame type.
    MsgType(u8) {
        HELLO = 0x01,
        RECORDS = 0x02,
        ACK = 0x03,
        PRUNE = 0x04,
        HEARTBEAT = 0x05,
        GOODBYE = 0x06,
    }
}

open_enum! {
    /// What a node says it is doing, carried by every heartbeat so the peer's
    /// takeover logic can tell "partner busy taking over" from "partner dead".
    NodeState(u8) {
        BOOTING = 0,
        SERVING = 1,
        /// Serving its own LUNs without a partner copy of its log.
        SERVING_UNMIRRORED = 2,
        TAKING_OVER = 3,
        /// Serving its own and the partner's LUNs.
        TAKEN_OVER = 4,
        GIVING_BACK = 5,
        SHUTTING_DOWN = 6,
    }
}

open_enum! {
    /// Why a peer closes a path.
    GoodbyeReason(u32) {
        SHUTDOWN = 0,
        PROTOCOL_ERROR = 1,
        STORE_FAILED = 2,
        STALE_EPOCH = 3,
        PEER_MISMATCH = 4,
    }
}

/// Which end of a mirror stream a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Owns the log and sends it ([`crate::Sender`]).
    Owner,
    /// Stores the owner's log in its PARTNER portion ([`crate::Receiver`]).
    Partner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node_id: u64,
    pub instance: u64,
    pub epoch: u64,
    pub stored_seq: Seq,
    pub region_len: u64,
    pub role: Role,
    pub path: u8,
}

/// One mirrored record: where it lives and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordEntry {
    pub seq: Seq,
    /// Offset relative to the LOCAL portion (same in the PARTNER portion).
    pub offset: u64,
    /// NVRAM record header + data (no padding), as the log wrote them.
    pub bytes: Bytes,
}

impl RecordEntry {
    /// The record's metadata from its NVRAM header (already validated by the
    /// decoder, so this only fails on entries built by hand).
    pub fn meta(&self) -> Option<RecordMeta> {
        record::parse_header(&self.bytes).ok().map(|h| h.meta)
    }
    fn wire_len(&self) -> usize {
        ENTRY_HEAD_LEN + self.bytes.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub sent_at_us: u64,
    pub state: NodeState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Records(Vec<RecordEntry>),
    Ack(Seq),
    Prune(Seq),
    Heartbeat(Heartbeat),
    Goodbye(GoodbyeReason),
    /// A type this version does not know; kept whole so it re-encodes.
    Unknown {
        ty: MsgType,
        body: Bytes,
    },
}

impl Frame {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Frame::Hello(_) => MsgType::HELLO,
            Frame::Records(_) => MsgType::RECORDS,
            Frame::Ack(_) => MsgType::ACK,
            Frame::Prune(_) => MsgType::PRUNE,
            Frame::Heartbeat(_) => MsgType::HEARTBEAT,
            Frame::Goodbye(_) => MsgType::GOODBYE,
            Frame::Unknown { ty, .. } => *ty,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Hello(_) => HELLO_LEN,
            Frame::Records(es) => {
                RECORDS_HEAD_LEN + es.iter().map(RecordEntry::wire_len).sum::<usize>()
            }
            Frame::Ack(_) | Frame::Prune(_) => SEQ_BODY_LEN,
            Frame::Heartbeat(_) => HEARTBEAT_LEN,
            Frame::Goodbye(_) => GOODBYE_LEN,
            Frame::Unknown { body, .. } => body.len(),
        }
    }

    /// Bytes the frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Appends the frame to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        let start = out.len();
        out.reserve(self.wire_len());
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.msg_type().0);
        out.put_u16_le(0);
        // Bodies are bounded by `RecordTooLarge` checks at submit; a
        // hand-built frame over 4 GiB would be a bug, and truncation would
        // then be caught by the peer's length check, not silently accepted.
        out.put_u32_le(u32::try_from(self.body_len()).unwrap_or(u32::MAX));
        out.put_u32_le(0);
        match self {
            Frame::Hello(h) => {
                out.put_u64_le(h.node_id);
                out.put_u64_le(h.instance);
                out.put_u64_le(h.epoch);
                out.put_u64_le(h.stored_seq);
                out.put_u64_le(h.region_len);
                out.put_u8(match h.role {
                    Role::Owner => 0,
                    Role::Partner => 1,
                });
                out.put_u8(h.path);
                out.put_bytes(0, 6);
            }
            Frame::Records(es) => {
                out.put_u32_le(u32::try_from(es.len()).unwrap_or(u32::MAX));
                out.put_u32_le(0);
                for e in es {
                    out.put_u64_le(e.seq);
                    out.put_u64_le(e.offset);
                    out.put_u32_le(u32::try_from(e.bytes.len()).unwrap_or(u32::MAX));
                    out.put_u32_le(0);
                    out.put_slice(&e.bytes);
                }
            }
            Frame::Ack(s) | Frame::Prune(s) => out.put_u64_le(*s),
            Frame::Heartbeat(hb) => {
                out.put_u64_le(hb.seq);
                out.put_u64_le(hb.sent_at_us);
                out.put_u8(hb.state.0);
                out.put_bytes(0, 7);
            }
            Frame::Goodbye(r) => {
                out.put_u32_le(r.0);
                out.put_u32_le(0);
            }
            Frame::Unknown { body, .. } => out.put_slice(body),
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&out[start..start + CRC_OFF]),
            &out[start + HEADER_LEN..],
        );
        out[start + CRC_OFF..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode_into(&mut b);
        b.freeze()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Looks at the start of `buf`: `Ok(None)` if a whole frame is not there
/// yet, else the frame's total length. Checks everything that can be checked
/// from the header alone, so a peer cannot make us buffer more than
/// `HEADER_LEN + max_body` bytes.
pub fn frame_len(buf: &[u8], max_body: u32) -> Result<Option<usize>> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        // Check the magic early even on a partial header: garbage is refused
        // at the first bytes, not after 16.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(Error::BadMagic(m));
        }
        return Ok(None);
    };
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&h[..4]);
    if magic != MAGIC {
        return Err(Error::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(Error::BadVersion(h[4]));
    }
    if h[6..8] != [0, 0] {
        return Err(Error::Reserved(MsgType(h[TYPE_OFF])));
    }
    let body = u32_at(h, LEN_OFF);
    if body > max_body {
        return Err(Error::TooLarge {
            len: u64::from(body),
            max: u64::from(max_body),
        });
    }
    let total = HEADER_LEN + body as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Decodes one frame from the start of `buf` without consuming it; returns
/// the frame and its length. Record bytes are slices of `buf` (no copy).
pub fn decode(buf: &Bytes, max_body: u32) -> Result<Option<(Frame, usize)>> {
    let Some(total) = frame_len(buf, max_body)? else {
        return Ok(None);
    };
    let f = &buf[..total];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..CRC_OFF]), &f[HEADER_LEN..]);
    if crc != u32_at(f, CRC_OFF) {
        return Err(Error::BadCrc);
    }
    let ty = MsgType(f[TYPE_OFF]);
    let body = &f[HEADER_LEN..];
    let want = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(Error::Malformed {
                ty,
                what: "body length does not match the type",
            })
        }
    };
    let zero = |r: &[u8]| {
        if r.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(Error::Reserved(ty))
        }
    };
    let frame = match ty {
        MsgType::HELLO => {
            want(HELLO_LEN)?;
            zero(&body[42..48])?;
            let role = match body[40] {
                0 => Role::Owner,
                1 => Role::Partner,
                _ => {
                    return Err(Error::Malformed {
                        ty,
                        what: "unknown role",
                    })
                }
            };
            Frame::Hello(Hello {
                node_id: u64_at(body, 0),
                instance: u64_at(body, 8),
                epoch: u64_at(body, 16),
                stored_seq: u64_at(body, 24),
                region_len: u64_at(body, 32),
                role,
                path: body[41],
            })
        }
        MsgType::RECORDS => Frame::Records(decode_records(buf, total)?),
        MsgType::ACK => {
            want(SEQ_BODY_LEN)?;
            Frame::Ack(u64_at(body, 0))
        }
        MsgType::PRUNE => {
            want(SEQ_BODY_LEN)?;
            Frame::Prune(u64_at(body, 0))
        }
        MsgType::HEARTBEAT => {
            want(HEARTBEAT_LEN)?;
            zero(&body[17..24])?;
            Frame::Heartbeat(Heartbeat {
                seq: u64_at(body, 0),
                sent_at_us: u64_at(body, 8),
                state: NodeState(body[16]),
            })
        }
        MsgType::GOODBYE => {
            want(GOODBYE_LEN)?;
            zero(&body[4..8])?;
            Frame::Goodbye(GoodbyeReason(u32_at(body, 0)))
        }
        _ => Frame::Unknown {
            ty,
            body: buf.slice(HEADER_LEN..total),
        },
    };
    Ok(Some((frame, total)))
}

/// Parses a RECORDS body (`buf[HEADER_LEN..total]`) through a cursor that
/// never reads past the body; each record's NVRAM header must agree with its
/// entry (seq, length), so the partner never indexes metadata that
/// contradicts what it stored.
fn decode_records(buf: &Bytes, total: usize) -> Result<Vec<RecordEntry>> {
    let ty = MsgType::RECORDS;
    let bad = |what| Error::Malformed { ty, what };
    let body = &buf[HEADER_LEN..total];
    let head = body.get(..RECORDS_HEAD_LEN).ok_or(bad("short header"))?;
    let count = u32_at(head, 0) as usize;
    if u32_at(head, 4) != 0 {
        return Err(Error::Reserved(ty));
    }
    // Each entry needs at least its head and a record header: bounds the
    // allocation by the body length, not by the peer's count.
    let min_entry = ENTRY_HEAD_LEN + RECORD_HEADER_LEN;
    if count == 0 || count > (body.len() - RECORDS_HEAD_LEN) / min_entry {
        return Err(bad("record count does not fit the body"));
    }
    let mut out = Vec::with_capacity(count);
    let mut at = RECORDS_HEAD_LEN;
    for _ in 0..count {
        let eh = body
            .get(at..at + ENTRY_HEAD_LEN)
            .ok_or(bad("truncated entry"))?;
        let seq = u64_at(eh, 0);
        let offset = u64_at(eh, 8);
        let len = u32_at(eh, 16) as usize;
        if u32_at(eh, 20) != 0 {
            return Err(Error::Reserved(ty));
        }
        let start = at + ENTRY_HEAD_LEN;
        let end = start
            .checked_add(len)
            .ok_or(bad("entry length overflows"))?;
        let rec = body.get(start..end).ok_or(bad("truncated record"))?;
        let bad_rec = |what: String| Error::BadRecord { seq, what };
        let h = record::parse_header(rec).map_err(|e| bad_rec(e.to_string()))?;
        if h.seq != seq {
            return Err(bad_rec(format!("header says seq {}", h.seq)));
        }
        if RECORD_HEADER_LEN as u64 + u64::from(h.data_len) != len as u64 {
            return Err(bad_rec(format!(
                "entry has {len} bytes, header says {} of data",
                h.data_len
            )));
        }
        if seq == 0 || offset % RECORD_ALIGN != 0 {
            return Err(bad_rec(format!("seq 0 or unaligned offset {offset}")));
        }
        out.push(RecordEntry {
            seq,
            offset,
            bytes: buf.slice(HEADER_LEN + start..HEADER_LEN + end),
        });
        at = end;
    }
    if at != body.len() {
        return Err(bad("trailing bytes after the last record"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvtarget_nvram::{Op, Record};
    use proptest::prelude::*;

    fn rec(seq: Seq, data: Vec<u8>) -> RecordEntry {
        let r = Record {
            seq,
            meta: RecordMeta::data(Op::WRITE, 1, seq * 8, 1, 0),
            data,
        };
        let mut b = record::encode(&r);
        b.truncate(RECORD_HEADER_LEN + r.data.len());
        RecordEntry {
            seq,
            offset: seq * 512,
            bytes: Bytes::from(b),
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                node_id: 7,
                instance: 99,
                epoch: 3,
                stored_seq: 42,
                region_len: 1 << 20,
                role: Role::Partner,
                path: 2,
            }),
            Frame::Records(vec![rec(5, vec![1; 100]), rec(6, vec![])]),
            Frame::Ack(9),
            Frame::Prune(8),
            Frame::Heartbeat(Heartbeat {
                seq: 1,
                sent_at_us: 1000,
                state: NodeState::SERVING,
            }),
            Frame::Goodbye(GoodbyeReason::SHUTDOWN),
            Frame::Unknown {
                ty: MsgType(0x77),
                body: Bytes::from_static(b"future"),
            },
        ]
    }

    #[test]
    fn round_trip_every_type() {
        for f in samples() {
            let wire = f.encode();
            assert_eq!(wire.len(), f.wire_len());
            let (g, n) = decode(&wire, DEFAULT_MAX_BODY).unwrap().unwrap();
            assert_eq!(n, wire.len());
            assert_eq!(g, f);
            // Any strict prefix is "need more", never an error.
            for cut in 0..wire.len() {
                assert_eq!(decode(&wire.slice(..cut), DEFAULT_MAX_BODY), Ok(None));
            }
        }
    }

    #[test]
    fn limits_and_checksums() {
        let wire = samples()[1].encode();
        assert!(matches!(decode(&wire, 16), Err(Error::TooLarge { .. })));
        let mut bad = wire.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            decode(&Bytes::from(bad), DEFAULT_MAX_BODY),
            Err(Error::BadCrc)
        );
        assert!(matches!(
            decode(&Bytes::from_static(b"GET / HTTP/1.1"), DEFAULT_MAX_BODY),
            Err(Error::BadMagic(_))
        ));
        assert_eq!(MsgType(0x42).name(), None);
        assert_eq!(format!("{:?}", MsgType(0x42)), "MsgType(0x42)");
    }

    /// Re-checksums a mutated frame so the mutation reaches the body parser.
    fn reseal(mut f: Vec<u8>) -> Vec<u8> {
        if f.len() >= HEADER_LEN {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..CRC_OFF]), &f[HEADER_LEN..]);
            f[CRC_OFF..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        }
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let b = Bytes::from(data);
            if let Ok(Some((f, n))) = decode(&b, 4096) {
                prop_assert_eq!(&f.encode()[..], &b[..n]);
            }
        }

        #[test]
        fn mutated_frames_never_panic(
            which in 0usize..7,
            muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
            seal in any::<bool>(),
        ) {
            let mut f = samples()[which].encode().to_vec();
            for (i, v) in muts {
                let i = i % f.len();
                f[i] = v;
            }
            if cut % 3 == 0 { f.truncate(cut % (f.len() + 1)); }
            if seal { f = reseal(f); }
            let b = Bytes::from(f);
            if let Ok(Some((g, n))) = decode(&b, DEFAULT_MAX_BODY) {
                prop_assert_eq!(&g.encode()[..], &b[..n]);
            }
        }
    }
}
