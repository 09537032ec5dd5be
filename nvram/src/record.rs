//! Log record format: a 64-byte header, the data, zero padding to 512 bytes.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"NVRL"
//!      4    1 op           open enum `Op`
//!      5    1 flags        op-specific, passed through
//!      6    2 reserved     0
//!      8    8 seq          strictly increasing across the whole log
//!     16    4 lun
//!     20    4 blocks       logical blocks covered (in the LUN's block size)
//!     24    8 lba          first logical block
//!     32    4 data_len     bytes of data after the header
//!     36    4 crc32c       over data, then header (this field zeroed); not padding
//!     40    8 cp_gen       the store's CP generation when the record was made
//!     48   16 reserved     0
//!     64    … data
//! ```
//! All integers little-endian. Records start on a `RECORD_ALIGN` (512-byte)
//! boundary so no two records share a sector: a torn write of one record can
//! only damage sectors that no acknowledged record uses.
//!
//! Decoding checks the length once and then reads fixed offsets of a
//! `[u8; 64]`; it never panics on any input (property-tested).

use std::fmt;

pub const RECORD_MAGIC: [u8; 4] = *b"NVRL";
pub const RECORD_HEADER_LEN: usize = 64;
/// Records start at multiples of this (a sector).
pub const RECORD_ALIGN: u64 = 512;
const CRC_OFF: usize = 36;

/// A log sequence number. 0 means "none": the first record ever is seq 1.
pub type Seq = u64;

/// What a record does. An open enum: unknown values decode fine (a newer
/// writer may log ops this reader does not know) and print in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Op(pub u8);

macro_rules! ops {
    ($($(#[$m:meta])* $name:ident = $v:expr,)*) => {
        impl Op {
            $($(#[$m])* pub const $name: Op = Op($v);)*
            /// The constant's name, if this value has one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

ops! {
    /// Data write: `data` is `blocks` blocks at `lba`.
    WRITE = 0x01,
    /// WRITE SAME: `data` is one block, repeated over `blocks` at `lba`.
    WRITE_SAME = 0x02,
    /// UNMAP of `blocks` at `lba`; no data.
    UNMAP = 0x03,
    /// COMPARE AND WRITE, logged as the write it made (only when the compare
    /// matched): `data` is the written blocks.
    COMPARE_AND_WRITE = 0x04,
    /// Persistent-reservation state; opaque payload owned by the SCSI layer.
    PR_STATE = 0x10,
    LUN_CREATE = 0x11,
    LUN_RESIZE = 0x12,
    LUN_DELETE = 0x13,
    SNAPSHOT_CREATE = 0x14,
    SNAPSHOT_DELETE = 0x15,
    SNAPSHOT_RESTORE = 0x16,
    LUN_CLONE = 0x17,
}

impl Op {
    /// Ops whose `lba`/`blocks` describe a range of LUN data (what a
    /// dependency index keys on); the others carry an opaque payload.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Op::WRITE | Op::WRITE_SAME | Op::UNMAP | Op::COMPARE_AND_WRITE
        )
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Op(0x{:02x})", self.0),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Everything about a record except its seq and data: what the caller
/// supplies to `append`, and what a dependency index is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub op: Op,
    pub flags: u8,
    pub lun: u32,
    pub lba: u64,
    pub blocks: u32,
    pub cp_gen: u64,
}

impl RecordMeta {
    /// A data-range record (`WRITE`, `UNMAP`, ...).
    pub fn data(op: Op, lun: u32, lba: u64, blocks: u32, cp_gen: u64) -> Self {
        RecordMeta {
            op,
            flags: 0,
            lun,
            lba,
            blocks,
            cp_gen,
        }
    }
    /// A metadata record (`PR_STATE`, `LUN_CREATE`, ...): no LBA range.
    pub fn metadata(op: Op, lun: u32, cp_gen: u64) -> Self {
        Self::data(op, lun, 0, 0, cp_gen)
    }
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub meta: RecordMeta,
    pub data: Vec<u8>,
}

/// A decoded, checksum-verified header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: Seq,
    pub meta: RecordMeta,
    pub data_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    /// Bytes the record occupies in the log, padding included.
    pub fn encoded_len(&self) -> u64 {
        encoded_len(self.data_len as usize)
    }
}

/// Bytes a record with `data_len` bytes of data occupies, padding included.
pub fn encoded_len(data_len: usize) -> u64 {
    align_up(RECORD_HEADER_LEN as u64 + data_len as u64, RECORD_ALIGN)
}

pub(crate) fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header (or than header + data) claims.
    Short {
        need: u64,
        have: u64,
    },
    /// Header bytes are all zero: nothing was ever written here.
    Zero,
    BadMagic,
    /// Reserved bytes are not zero (not written by this version).
    BadReserved,
    /// Checksum mismatch: torn or corrupt. `seq` is the (untrusted) seq field.
    BadCrc {
        seq: Seq,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { need, have } => {
                write!(f, "short: needs {need} bytes, {have} available")
            }
            DecodeError::Zero => f.write_str("zeroed (never written)"),
            DecodeError::BadMagic => f.write_str("bad magic"),
            DecodeError::BadReserved => f.write_str("reserved header bytes not zero"),
            DecodeError::BadCrc { seq } => write!(f, "checksum mismatch (seq field {seq})"),
        }
    }
}

fn le_u32(h: &[u8; RECORD_HEADER_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(h: &[u8; RECORD_HEADER_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The header bytes with the crc field set to `crc`.
pub fn encode_header(seq: Seq, meta: &RecordMeta, data_len: u32, crc: u32) -> [u8; 64] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4] = meta.op.0;
    h[5] = meta.flags;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&meta.lun.to_le_bytes());
    h[20..24].copy_from_slice(&meta.blocks.to_le_bytes());
    h[24..32].copy_from_slice(&meta.lba.to_le_bytes());
    h[32..36].copy_from_slice(&data_len.to_le_bytes());
    h[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
    h[40..48].copy_from_slice(&meta.cp_gen.to_le_bytes());
    h
}

/// The record checksum, given the crc32c of the data alone (so appenders can
/// checksum their data outside any lock, before they know their seq): the
/// data's crc continued over the 64 header bytes. Continuing costs 64 bytes
/// of work; combining a header-first crc with the data's would cost a GF(2)
/// matrix power per record, which was most of a 4 KiB write's CPU.
pub fn record_crc(
    header_crc_zeroed: &[u8; RECORD_HEADER_LEN],
    data_crc: u32,
    _data_len: usize,
) -> u32 {
    crc32c::crc32c_append(data_crc, header_crc_zeroed)
}

/// Header bytes for a record: checksum included.
pub fn header_for(seq: Seq, meta: &RecordMeta, data: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let len = data.len() as u32;
    let zeroed = encode_header(seq, meta, len, 0);
    let crc = record_crc(&zeroed, crc32c::crc32c(data), data.len());
    encode_header(seq, meta, len, crc)
}

/// The full encoding, padding included.
pub fn encode(rec: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(rec.data.len()) as usize);
    out.extend_from_slice(&header_for(rec.seq, &rec.meta, &rec.data));
    out.extend_from_slice(&rec.data);
    out.resize(encoded_len(rec.data.len()) as usize, 0);
    out
}

/// Parses the header fields without verifying the checksum (which needs the
/// data). Useful to classify a bad record (which seq did it claim?).
pub fn parse_header(buf: &[u8]) -> Result<RecordHeader, DecodeError> {
    let Some(h) = buf.get(..RECORD_HEADER_LEN) else {
        return Err(DecodeError::Short {
            need: RECORD_HEADER_LEN as u64,
            have: buf.len() as u64,
        });
    };
    let mut hdr = [0u8; RECORD_HEADER_LEN];
    hdr.copy_from_slice(h);
    if hdr.iter().all(|&b| b == 0) {
        return Err(DecodeError::Zero);
    }
    if hdr[0..4] != RECORD_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if hdr[6..8] != [0, 0] || hdr[48..64].iter().any(|&b| b != 0) {
        return Err(DecodeError::BadReserved);
    }
    Ok(RecordHeader {
        seq: le_u64(&hdr, 8),
        meta: RecordMeta {
            op: Op(hdr[4]),
            flags: hdr[5],
            lun: le_u32(&hdr, 16),
            blocks: le_u32(&hdr, 20),
            lba: le_u64(&hdr, 24),
            cp_gen: le_u64(&hdr, 40),
        },
        data_len: le_u32(&hdr, 32),
        crc: le_u32(&hdr, CRC_OFF),
    })
}

/// Decodes and verifies the record at the start of `buf`, returning the
/// header and the data slice. `buf` need not include the padding.
pub fn decode_ref(buf: &[u8]) -> Result<(RecordHeader, &[u8]), DecodeError> {
    let h = parse_header(buf)?;
    let need = RECORD_HEADER_LEN as u64 + u64::from(h.data_len);
    let Some(data) = usize::try_from(need)
        .ok()
        .and_then(|n| buf.get(RECORD_HEADER_LEN..n))
    else {
        return Err(DecodeError::Short {
            need,
            have: buf.len() as u64,
        });
    };
    let zeroed = encode_header(h.seq, &h.meta, h.data_len, 0);
    if record_crc(&zeroed, crc32c::crc32c(data), data.len()) != h.crc {
        return Err(DecodeError::BadCrc { seq: h.seq });
    }
    Ok((h, data))
}

/// Decodes and verifies the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    let (h, data) = decode_ref(buf)?;
    Ok(Record {
        seq: h.seq,
        meta: h.meta,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            any::<u8>(),
            any::<u8>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..3000),
        )
            .prop_map(|(seq, op, flags, lun, lba, blocks, cp_gen, data)| Record {
                seq,
                meta: RecordMeta {
                    op: Op(op),
                    flags,
                    lun,
                    lba,
                    blocks,
                    cp_gen,
                },
                data,
            })
    }

    proptest! {
        #[test]
        fn roundtrip(r in arb_record()) {
            let bytes = encode(&r);
            prop_assert_eq!(bytes.len() as u64 % RECORD_ALIGN, 0);
            prop_assert_eq!(bytes.len() as u64, encoded_len(r.data.len()));
            prop_assert_eq!(decode(&bytes).unwrap(), r);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
            let _ = parse_header(&bytes);
        }

        #[test]
        fn random_bytes_behind_magic_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 64..2048)) {
            bytes[0..4].copy_from_slice(&RECORD_MAGIC);
            let _ = decode(&bytes);
        }

        #[test]
        fn any_flipped_byte_is_detected(r in arb_record(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&r);
            // Only the header and data are covered; padding is not.
            let covered = RECORD_HEADER_LEN + r.data.len();
            let i = pos.index(covered);
            bytes[i] ^= 1 << bit;
            match decode(&bytes) {
                Err(_) => {}
                // A flipped data_len bit can still land on a valid record
                // only if crc collides; treat success as a failure.
                Ok(d) => prop_assert!(false, "corruption at {} not detected: {:?}", i, d.seq),
            }
        }

        #[test]
        fn truncation_is_detected(r in arb_record(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&r);
            let covered = RECORD_HEADER_LEN + r.data.len();
            let n = cut.index(covered);
            prop_assert!(decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn op_names() {
        assert_eq!(format!("{:?}", Op::WRITE), "WRITE");
        assert_eq!(format!("{}", Op(0xee)), "Op(0xee)");
        assert!(Op::UNMAP.is_data());
        assert!(!Op::PR_STATE.is_data());
    }

    #[test]
    fn zero_header_is_zero() {
        assert_eq!(decode(&[0u8; 512]), Err(DecodeError::Zero));
    }
}
