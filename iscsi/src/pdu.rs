//! PDU framing (RFC 7143 11.2): the 48-byte Basic Header Segment, the
//! Additional Header Segments, the optional header digest, the data segment
//! padded to 4 bytes and the optional data digest.
//!
//! Layout on the wire (every length below is known once the BHS is in):
//!
//! ```text
//! 0        48             48+ahs      +4 if HeaderDigest
//! | BHS    | AHS (4*byte 4) | [hdr CRC] | data (DSL, bytes 5..8) | pad to 4 | [data CRC] |
//! ```
//!
//! Invariants: [`decode`] checks the total length against a caller-supplied
//! limit before waiting for the bytes, so a peer cannot make us buffer more
//! than one maximal PDU; it never panics on any input. [`Pdu::encode`] always
//! recomputes the length fields from the segments it is given, so a decoded
//! PDU re-encodes to the same bytes (modulo padding contents).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest data segment the 24-bit DataSegmentLength field can express.
pub const MAX_DSL: usize = (1 << 24) - 1;

/// A PDU opcode (the low six bits of byte 0). Open: unknown values are kept
/// and printed in hex, never a panic.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(pub u8);

macro_rules! opcodes {
    ($($name:ident = $v:expr),* $(,)?) => {
        impl Opcode {
            $(pub const $name: Opcode = Opcode($v);)*
            /// The RFC name of a known opcode.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

opcodes! {
    NOP_OUT = 0x00,
    SCSI_COMMAND = 0x01,
    TASK_MGMT_REQ = 0x02,
    LOGIN_REQ = 0x03,
    TEXT_REQ = 0x04,
    DATA_OUT = 0x05,
    LOGOUT_REQ = 0x06,
    SNACK_REQ = 0x10,
    NOP_IN = 0x20,
    SCSI_RESPONSE = 0x21,
    TASK_MGMT_RESP = 0x22,
    LOGIN_RESP = 0x23,
    TEXT_RESP = 0x24,
    DATA_IN = 0x25,
    LOGOUT_RESP = 0x26,
    R2T = 0x31,
    ASYNC_MSG = 0x32,
    REJECT = 0x3f,
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Opcode({:#04x})", self.0),
        }
    }
}

/// The Basic Header Segment as raw bytes with typed accessors. The length was
/// checked when it was built, so every accessor is infallible.
#[derive(Clone, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl fmt::Debug for Bhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Bhs({:?} flags={:#04x} itt={:#x} dsl={})",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

impl Bhs {
    pub fn new(op: Opcode) -> Bhs {
        let mut b = Bhs::default();
        b.0[0] = op.0 & 0x3f;
        b
    }
    pub fn opcode(&self) -> Opcode {
        Opcode(self.0[0] & 0x3f)
    }
    /// The I bit: an immediate request (initiator to target only).
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, i: bool) {
        if i {
            self.0[0] |= 0x40;
        } else {
            self.0[0] &= !0x40;
        }
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_len(&self) -> usize {
        (self.0[5] as usize) << 16 | (self.0[6] as usize) << 8 | self.0[7] as usize
    }
    pub fn lun(&self) -> u64 {
        self.u64(8)
    }
    pub fn itt(&self) -> u32 {
        self.u32(16)
    }
    pub fn u8(&self, off: usize) -> u8 {
        self.0[off]
    }
    pub fn u16(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_be_bytes([
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ])
    }
    pub fn u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_be_bytes(b)
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.0[off] = v;
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn set_lengths(&mut self, ahs: usize, data: usize) {
        self.0[4] = (ahs / 4) as u8;
        self.0[5] = (data >> 16) as u8;
        self.0[6] = (data >> 8) as u8;
        self.0[7] = data as u8;
    }
}

/// Which digests are in force on a connection (both off during login).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// One PDU: header, additional header segments and data, without padding or
/// digests (those belong to the wire form only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pdu {
    pub bhs: Bhs,
    /// Whole AHS area, a multiple of 4 bytes.
    pub ahs: Bytes,
    pub data: Bytes,
}

/// A PDU ready for a vectored write: `header` (BHS, AHS, header digest),
/// `data` (a zero-copy slice of the caller's buffer) and `tail` (padding and
/// data digest).
#[derive(Debug, Clone, Default)]
pub struct Transmit {
    pub header: Bytes,
    pub data: Bytes,
    pub tail: Bytes,
}

impl Transmit {
    pub fn len(&self) -> usize {
        self.header.len() + self.data.len() + self.tail.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All three parts in one buffer (tests and the fuzz target).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.data);
        v.extend_from_slice(&self.tail);
        v
    }
}

/// The iSCSI digest: CRC32C, sent least significant byte first (RFC 7143
/// appendix B.4 gives the 32-zero-bytes vector as `aa 36 91 8a`).
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut crc = 0u32;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    crc.to_le_bytes()
}

fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl Pdu {
    pub fn new(bhs: Bhs) -> Pdu {
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }
    pub fn with_data(bhs: Bhs, data: Bytes) -> Pdu {
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data,
        }
    }

    /// Wire form. Length fields are recomputed from the segments; an AHS that
    /// is not a multiple of 4 or a data segment over 2^24-1 bytes is a caller
    /// bug, so they are truncated rather than panicking.
    pub fn encode(&self, digests: Digests) -> Transmit {
        let ahs_len = (self.ahs.len() / 4 * 4).min(255 * 4);
        let data = if self.data.len() > MAX_DSL {
            self.data.slice(..MAX_DSL)
        } else {
            self.data.clone()
        };
        let mut bhs = self.bhs.clone();
        bhs.set_lengths(ahs_len, data.len());
        let mut header = BytesMut::with_capacity(BHS_LEN + ahs_len + 4);
        header.put_slice(&bhs.0);
        header.put_slice(&self.ahs[..ahs_len]);
        if digests.header {
            let d = digest(&[&header]);
            header.put_slice(&d);
        }
        let pad = pad_len(data.len());
        let tail = if pad == 0 && (!digests.data || data.is_empty()) {
            Bytes::new()
        } else {
            let mut t = BytesMut::with_capacity(8);
            t.put_bytes(0, pad);
            if digests.data && !data.is_empty() {
                let d = digest(&[&data, &[0u8; 3][..pad]]);
                t.put_slice(&d);
            }
            t.freeze()
        };
        Transmit {
            header: header.freeze(),
            data,
            tail,
        }
    }
}

/// Why a PDU could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream is corrupt from here on: the connection must be dropped.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The PDU was consumed and must be discarded (Reject reason 0x02).
    #[error("data digest mismatch")]
    DataDigest(Box<Bhs>),
    /// Data segment larger than what we declared we can receive.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
}

/// Takes one whole PDU off the front of `buf`, or returns `Ok(None)` when more
/// bytes are needed. `max_data` bounds the data segment (our declared
/// MaxRecvDataSegmentLength), checked before any data is awaited.
pub fn decode(
    buf: &mut BytesMut,
    digests: Digests,
    max_data: usize,
) -> Result<Option<Pdu>, DecodeError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let mut raw = [0u8; BHS_LEN];
    raw.copy_from_slice(&buf[..BHS_LEN]);
    let bhs = Bhs(raw);
    let ahs_len = bhs.ahs_len();
    let dsl = bhs.data_len();
    if dsl > max_data {
        return Err(DecodeError::TooLong {
            len: dsl,
            max: max_data,
        });
    }
    let hd = if digests.header { 4 } else { 0 };
    let dd = if digests.data && dsl > 0 { 4 } else { 0 };
    let head_len = BHS_LEN + ahs_len;
    let total = head_len + hd + dsl + pad_len(dsl) + dd;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    if digests.header && frame[head_len..head_len + 4] != digest(&[&frame[..head_len]]) {
        return Err(DecodeError::HeaderDigest);
    }
    let data_start = head_len + hd;
    let padded_end = data_start + dsl + pad_len(dsl);
    if dd == 4 && frame[padded_end..padded_end + 4] != digest(&[&frame[data_start..padded_end]]) {
        return Err(DecodeError::DataDigest(Box::new(bhs)));
    }
    Ok(Some(Pdu {
        bhs,
        ahs: frame.slice(BHS_LEN..head_len),
        data: frame.slice(data_start..data_start + dsl),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_crc_vector() {
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[&[0xffu8; 32]]), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn round_trip_with_digests() {
        let mut bhs = Bhs::new(Opcode::DATA_OUT);
        bhs.set_u32(16, 7);
        let pdu = Pdu {
            bhs,
            ahs: Bytes::from_static(&[1, 0, 0, 0]),
            data: Bytes::from_static(b"hello"),
        };
        let d = Digests {
            header: true,
            data: true,
        };
        let wire = pdu.encode(d).to_vec();
        assert_eq!(wire.len(), 48 + 4 + 4 + 8 + 4);
        for cut in 0..wire.len() {
            let mut b = BytesMut::from(&wire[..cut]);
            assert_eq!(decode(&mut b, d, 8192), Ok(None));
        }
        let mut b = BytesMut::from(&wire[..]);
        let got = decode(&mut b, d, 8192).unwrap().unwrap();
        assert_eq!(got.data, pdu.data);
        assert_eq!(got.ahs, pdu.ahs);
        assert_eq!(got.encode(d).to_vec(), wire);
        let mut bad = wire.clone();
        bad[60] ^= 1;
        let mut b = BytesMut::from(&bad[..]);
        assert!(matches!(
            decode(&mut b, d, 8192),
            Err(DecodeError::DataDigest(_))
        ));
        assert!(b.is_empty());
        let mut bad = wire;
        bad[3] ^= 1;
        let mut b = BytesMut::from(&bad[..]);
        assert_eq!(decode(&mut b, d, 8192), Err(DecodeError::HeaderDigest));
    }
}
