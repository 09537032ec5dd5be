//! Region layout: where everything lives in `DATA_DIR/nvram.img`.
//!
//! ```text
//! 0                     region header block (REGION_HEADER_LEN = 4096)
//!                         [0..64) RegionHeader, checksummed; written once at format
//! local_off = 4096      LOCAL portion: this node's log, two halves
//!   half i at local_off + i * half_size, i in {0, 1}:
//!     [0..512)            half header slot 0
//!     [512..1024)         half header slot 1
//!     [1024..half_size)   records, each RECORD_ALIGN-aligned, in seq order
//! partner_off = local_off + 2 * half_size
//!                       PARTNER portion (2 * half_size): the partner node's
//!                       log, mirrored byte for byte (same offsets relative to
//!                       the portion start)
//! end = partner_off + 2 * half_size <= size
//! ```
//! `half_size = floor((size - 4096) / 4 / 4096) * 4096`: everything else is
//! derived from `size`, and `open` rejects a header whose stored offsets do not
//! match that derivation.
//!
//! A half header is rewritten when the half is activated (new `generation`,
//! `first_seq`) and when it is pruned (`pruned_seq`). Writes alternate between
//! two checksummed slots and readers take the valid slot with the highest
//! `counter`, so a torn header write leaves the previous header in force.

use crate::error::{Error, Result};
use crate::record::{Seq, RECORD_ALIGN};

pub const REGION_MAGIC: [u8; 8] = *b"NVTNVRAM";
pub const REGION_VERSION: u32 = 1;
pub const REGION_HEADER_LEN: u64 = 4096;
pub const HALF_HEADER_SLOT: u64 = 512;
pub const HALF_HEADER_LEN: u64 = 2 * HALF_HEADER_SLOT;
pub const HALF_MAGIC: [u8; 4] = *b"NVHF";
/// Halves must hold at least this many bytes of records.
pub const MIN_HALF_SIZE: u64 = 64 << 10;
/// Default region size (the issue's default).
pub const DEFAULT_REGION_SIZE: u64 = 256 << 20;
/// File name of the region inside the data directory.
pub const REGION_FILE: &str = "nvram.img";

/// The region's geometry. Derived from `size` alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub half_size: u64,
}

impl Layout {
    pub fn for_size(size: u64) -> Result<Layout> {
        let half_size = (size.saturating_sub(REGION_HEADER_LEN) / 4) / 4096 * 4096;
        if half_size < MIN_HALF_SIZE + HALF_HEADER_LEN {
            return Err(Error::RegionTooSmall {
                size,
                min: REGION_HEADER_LEN
                    + 4 * (MIN_HALF_SIZE + HALF_HEADER_LEN).next_multiple_of(4096),
            });
        }
        Ok(Layout { size, half_size })
    }
    pub fn local_off(&self) -> u64 {
        REGION_HEADER_LEN
    }
    pub fn local_len(&self) -> u64 {
        2 * self.half_size
    }
    pub fn partner_off(&self) -> u64 {
        self.local_off() + self.local_len()
    }
    pub fn partner_len(&self) -> u64 {
        self.local_len()
    }
    /// Absolute offset of half `i`.
    pub fn half_off(&self, i: usize) -> u64 {
        self.local_off() + i as u64 * self.half_size
    }
    /// Absolute offset of the first record of half `i`.
    pub fn records_off(&self, i: usize) -> u64 {
        self.half_off(i) + HALF_HEADER_LEN
    }
    /// Absolute end of half `i` (exclusive).
    pub fn half_end(&self, i: usize) -> u64 {
        self.half_off(i) + self.half_size
    }
    /// Bytes of records a half holds.
    pub fn half_capacity(&self) -> u64 {
        self.half_size - HALF_HEADER_LEN
    }

    pub fn encode_header(&self) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[0..8].copy_from_slice(&REGION_MAGIC);
        h[8..12].copy_from_slice(&REGION_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(RECORD_ALIGN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..32].copy_from_slice(&self.local_off().to_le_bytes());
        h[32..40].copy_from_slice(&self.half_size.to_le_bytes());
        h[40..48].copy_from_slice(&self.partner_off().to_le_bytes());
        h[48..56].copy_from_slice(&self.partner_len().to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and validates a region header. `Ok(None)`: all zero (a blank
    /// region, safe to format).
    pub fn decode_header(buf: &[u8]) -> Result<Option<Layout>> {
        let Some(h) = buf.get(..64) else {
            return Err(Error::BadRegion(format!(
                "header needs 64 bytes, file has {}",
                buf.len()
            )));
        };
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if h[0..8] != REGION_MAGIC {
            return Err(Error::BadRegion("bad magic".into()));
        }
        let mut z = [0u8; 64];
        z.copy_from_slice(h);
        let stored = u32_at(&z, 56);
        z[56..60].fill(0);
        if crc32c::crc32c(&z) != stored {
            return Err(Error::BadRegion("header checksum mismatch".into()));
        }
        let version = u32_at(&z, 8);
        if version != REGION_VERSION {
            return Err(Error::BadRegion(format!("unsupported version {version}")));
        }
        if u64::from(u32_at(&z, 12)) != RECORD_ALIGN {
            return Err(Error::BadRegion("unsupported record alignment".into()));
        }
        let l = Layout::for_size(u64_at(&z, 16))?;
        if u64_at(&z, 24) != l.local_off()
            || u64_at(&z, 32) != l.half_size
            || u64_at(&z, 40) != l.partner_off()
            || u64_at(&z, 48) != l.partner_len()
        {
            return Err(Error::BadRegion(
                "stored offsets do not match the layout derived from the size".into(),
            ));
        }
        Ok(Some(l))
    }
}

fn u32_at(h: &[u8; 64], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(h: &[u8; 64], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

/// What a half is being used for, as recorded in its header (informative:
/// recovery trusts seqs, not this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfUse {
    Free = 0,
    Active = 1,
    Frozen = 2,
}

/// One half header slot.
///
/// ```text
///  0  4 magic b"NVHF"     4  4 half id
///  8  8 counter (header writes; newest slot wins)
/// 16  8 generation (log-wide activation count; newer use = higher)
/// 24  8 first_seq (seq of the first record of this use; 0 = none)
/// 32  8 pruned_seq (records <= this are covered by a committed CP)
/// 40  4 use (HalfUse)     44  4 crc32c over [0..64) with this field zeroed
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HalfHeader {
    pub half: u32,
    pub counter: u64,
    pub generation: u64,
    pub first_seq: Seq,
    pub pruned_seq: Seq,
    pub state: HalfUse,
}

impl HalfHeader {
    /// Slot this header is written to (alternates with each write).
    pub fn slot(&self) -> u64 {
        self.counter % 2
    }

    pub fn encode(&self) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&HALF_MAGIC);
        h[4..8].copy_from_slice(&self.half.to_le_bytes());
        h[8..16].copy_from_slice(&self.counter.to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        h[32..40].copy_from_slice(&self.pruned_seq.to_le_bytes());
        h[40..44].copy_from_slice(&(self.state as u32).to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// One slot; `None` if not a valid header for half `half`.
    pub fn decode(buf: &[u8], half: u32) -> Option<HalfHeader> {
        let mut z = [0u8; 64];
        z.copy_from_slice(buf.get(..64)?);
        if z[0..4] != HALF_MAGIC {
            return None;
        }
        let stored = u32_at(&z, 44);
        z[44..48].fill(0);
        if crc32c::crc32c(&z) != stored || u32_at(&z, 4) != half {
            return None;
        }
        let state = match u32_at(&z, 40) {
            0 => HalfUse::Free,
            1 => HalfUse::Active,
            2 => HalfUse::Frozen,
            _ => return None,
        };
        Some(HalfHeader {
            half,
            counter: u64_at(&z, 8),
            generation: u64_at(&z, 16),
            first_seq: u64_at(&z, 24),
            pruned_seq: u64_at(&z, 32),
            state,
        })
    }

    /// The newest valid slot of a half header block (`HALF_HEADER_LEN` bytes).
    pub fn decode_block(buf: &[u8], half: u32) -> Option<HalfHeader> {
        let a = buf
            .get(..HALF_HEADER_SLOT as usize)
            .and_then(|b| Self::decode(b, half));
        let b = buf
            .get(HALF_HEADER_SLOT as usize..HALF_HEADER_LEN as usize)
            .and_then(|b| Self::decode(b, half));
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.counter > a.counter { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_chain() {
        let l = Layout::for_size(DEFAULT_REGION_SIZE).unwrap();
        assert_eq!(l.half_size, (DEFAULT_REGION_SIZE - 4096) / 4 / 4096 * 4096);
        assert_eq!(l.half_off(1), l.half_end(0));
        assert_eq!(l.partner_off(), l.half_end(1));
        assert!(l.partner_off() + l.partner_len() <= l.size);
        let h = l.encode_header();
        assert_eq!(Layout::decode_header(&h).unwrap(), Some(l));
        assert!(Layout::for_size(100_000).is_err());
    }

    #[test]
    fn region_header_corruption_rejected() {
        let l = Layout::for_size(1 << 20).unwrap();
        for i in 0..64 {
            let mut h = l.encode_header();
            h[i] ^= 0x10;
            assert!(Layout::decode_header(&h).is_err(), "byte {i}");
        }
        assert_eq!(Layout::decode_header(&[0u8; 64]).unwrap(), None);
        assert!(Layout::decode_header(&[0u8; 10]).is_err());
    }

    #[test]
    fn half_header_newest_valid_slot_wins() {
        let mut block = vec![0u8; HALF_HEADER_LEN as usize];
        let h1 = HalfHeader {
            half: 1,
            counter: 1,
            generation: 3,
            first_seq: 10,
            pruned_seq: 9,
            state: HalfUse::Active,
        };
        let h2 = HalfHeader {
            counter: 2,
            pruned_seq: 20,
            state: HalfUse::Free,
            ..h1
        };
        for h in [h1, h2] {
            let o = (h.slot() * HALF_HEADER_SLOT) as usize;
            block[o..o + 64].copy_from_slice(&h.encode());
        }
        assert_eq!(HalfHeader::decode_block(&block, 1), Some(h2));
        assert_eq!(HalfHeader::decode_block(&block, 0), None);
        // A torn newest slot leaves the older one in force.
        block[3] ^= 1; // slot 0 holds counter 2
        assert_eq!(HalfHeader::decode_block(&block, 1), Some(h1));
    }
}
