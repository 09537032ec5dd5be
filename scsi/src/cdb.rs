//! CDB decoding: operation codes, the length check, and typed views.
//!
//! [`Cdb::new`] checks once that the buffer holds the whole CDB for its
//! operation code (SPC-4 4.2.5.1 group codes); after that the accessors
//! index within that length. The accessors still return 0 rather than panic
//! if asked for a byte beyond it, so a wrong offset is a bug, never a crash.

use crate::sense::Sense;

/// Operation codes this crate knows about.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const SEND_DIAGNOSTIC: u8 = 0x1d;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const MAINTENANCE_OUT: u8 = 0xa4;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;

    /// SERVICE ACTION IN(16) service actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const MI_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    pub const MI_REPORT_SUPPORTED_TMFS: u8 = 0x0d;
    /// MAINTENANCE OUT service actions.
    pub const MO_SET_TARGET_PORT_GROUPS: u8 = 0x0a;
    /// RECEIVE COPY RESULTS service actions.
    pub const RCR_COPY_STATUS: u8 = 0x00;
    pub const RCR_OPERATING_PARAMETERS: u8 = 0x03;
}

/// CDB length implied by the group code (SPC-4 table 5), or `None` for the
/// reserved and vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A CDB whose length has been checked against its operation code.
#[derive(Debug, Clone, Copy)]
pub struct Cdb<'a> {
    bytes: &'a [u8],
}

impl<'a> Cdb<'a> {
    /// Validate the length. Unknown groups are INVALID COMMAND OPERATION CODE,
    /// a buffer too short for its group is INVALID FIELD IN CDB.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Sense> {
        let opcode = *bytes.first().ok_or_else(Sense::invalid_opcode)?;
        let len = cdb_len(opcode).ok_or_else(Sense::invalid_opcode)?;
        let bytes = bytes.get(..len).ok_or_else(|| Sense::invalid_cdb(0))?;
        Ok(Self { bytes })
    }

    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Service action: low 5 bits of byte 1.
    pub fn service_action(&self) -> u8 {
        self.u8(1) & 0x1f
    }
    pub fn u8(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }
    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.u8(i), self.u8(i + 1)])
    }
    pub fn be24(&self, i: usize) -> u32 {
        u32::from_be_bytes([0, self.u8(i), self.u8(i + 1), self.u8(i + 2)])
    }
    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.u8(i), self.u8(i + 1), self.u8(i + 2), self.u8(i + 3)])
    }
    pub fn be64(&self, i: usize) -> u64 {
        (u64::from(self.be32(i)) << 32) | u64::from(self.be32(i + 4))
    }
    /// The CONTROL byte (always the last one).
    pub fn control(&self) -> u8 {
        self.bytes.last().copied().unwrap_or(0)
    }
    /// NACA and LINK are not supported (SAM-5 5.2): reject them.
    pub fn check_control(&self) -> Result<(), Sense> {
        if self.control() & 0x05 != 0 {
            return Err(Sense::invalid_cdb(self.len().saturating_sub(1) as u16));
        }
        Ok(())
    }
    /// Fail with INVALID FIELD IN CDB if any bit of `mask` is set in byte `i`.
    pub fn reserved(&self, i: usize, mask: u8) -> Result<(), Sense> {
        if self.u8(i) & mask != 0 {
            return Err(Sense::invalid_cdb(i as u16));
        }
        Ok(())
    }
}

/// The READ/WRITE/VERIFY family, decoded from its 6-, 10-, 12- or 16-byte
/// form into one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwCdb {
    pub opcode: u8,
    pub lba: u64,
    pub blocks: u32,
    /// Byte 1 (RDPROTECT/WRPROTECT/VRPROTECT, DPO, FUA, BYTCHK...); 0 for
    /// the 6-byte forms, which have none of these.
    pub flags: u8,
    /// GROUP NUMBER (low bits of byte 6, 6 or 14 depending on size).
    pub group: u8,
}

impl RwCdb {
    /// Decode. For the 6-byte forms a transfer length of 0 means 256 blocks
    /// (SBC-3 5.8); the wider forms keep 0.
    pub fn parse(cdb: &Cdb<'_>) -> Self {
        let opcode = cdb.opcode();
        match cdb.len() {
            6 => {
                let lba = u64::from(cdb.be24(1) & 0x1f_ffff);
                let len = u32::from(cdb.u8(4));
                Self {
                    opcode,
                    lba,
                    blocks: if len == 0 { 256 } else { len },
                    flags: 0,
                    group: 0,
                }
            }
            10 => Self {
                opcode,
                lba: u64::from(cdb.be32(2)),
                blocks: u32::from(cdb.be16(7)),
                flags: cdb.u8(1),
                group: cdb.u8(6) & 0x3f,
            },
            12 => Self {
                opcode,
                lba: u64::from(cdb.be32(2)),
                blocks: cdb.be32(6),
                flags: cdb.u8(1),
                group: cdb.u8(10) & 0x3f,
            },
            _ => Self {
                opcode,
                lba: cdb.be64(2),
                blocks: cdb.be32(10),
                flags: cdb.u8(1),
                group: cdb.u8(14) & 0x3f,
            },
        }
    }

    /// Encode back into a CDB of the size the opcode implies (used by tests
    /// and the fuzz round trip).
    pub fn encode(&self) -> Vec<u8> {
        let len = cdb_len(self.opcode).unwrap_or(16);
        let mut b = vec![0u8; len];
        b[0] = self.opcode;
        match len {
            6 => {
                let lba = (self.lba as u32) & 0x1f_ffff;
                b[1..4].copy_from_slice(&lba.to_be_bytes()[1..]);
                b[4] = if self.blocks >= 256 {
                    0
                } else {
                    self.blocks as u8
                };
            }
            10 => {
                b[1] = self.flags;
                b[2..6].copy_from_slice(&(self.lba as u32).to_be_bytes());
                b[6] = self.group;
                b[7..9].copy_from_slice(&(self.blocks as u16).to_be_bytes());
            }
            12 => {
                b[1] = self.flags;
                b[2..6].copy_from_slice(&(self.lba as u32).to_be_bytes());
                b[6..10].copy_from_slice(&self.blocks.to_be_bytes());
                b[10] = self.group;
            }
            _ => {
                b[1] = self.flags;
                b[2..10].copy_from_slice(&self.lba.to_be_bytes());
                b[10..14].copy_from_slice(&self.blocks.to_be_bytes());
                b[14] = self.group;
            }
        }
        b
    }

    /// The protect field (bits 7..5 of byte 1).
    pub fn protect(&self) -> u8 {
        self.flags >> 5
    }
    pub fn fua(&self) -> bool {
        self.flags & 0x08 != 0
    }
}

/// Read a big-endian integer of `N` bytes at `off` from an untrusted
/// parameter list; `None` if the list is too short.
pub fn be_at(buf: &[u8], off: usize, n: usize) -> Option<u64> {
    let s = buf.get(off..off.checked_add(n)?)?;
    Some(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_follow_group_codes() {
        assert_eq!(cdb_len(0x00), Some(6));
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x5e), Some(10));
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xa0), Some(12));
        assert_eq!(cdb_len(0x7f), None);
        assert_eq!(cdb_len(0xc0), None);
    }

    #[test]
    fn short_cdb_rejected() {
        assert!(Cdb::new(&[0x28, 0, 0]).is_err());
        assert!(Cdb::new(&[]).is_err());
    }

    #[test]
    fn rw_round_trip() {
        for (op, lba, blocks) in [
            (0x28u8, 7u64, 9u32),
            (0xa8, 1 << 31, 1 << 20),
            (0x88, u64::MAX, u32::MAX),
        ] {
            let rw = RwCdb {
                opcode: op,
                lba,
                blocks,
                flags: 0x18,
                group: 3,
            };
            let bytes = rw.encode();
            let back = RwCdb::parse(&Cdb::new(&bytes).unwrap());
            assert_eq!(back, rw);
        }
    }

    #[test]
    fn read6_zero_means_256() {
        let c = [0x08, 0, 0, 5, 0, 0];
        let rw = RwCdb::parse(&Cdb::new(&c).unwrap());
        assert_eq!((rw.lba, rw.blocks), (5, 256));
    }

    #[test]
    fn be_at_bounds() {
        assert_eq!(be_at(&[1, 2, 3], 1, 2), Some(0x0203));
        assert_eq!(be_at(&[1, 2, 3], 2, 2), None);
        assert_eq!(be_at(&[1, 2, 3], usize::MAX, 2), None);
    }
}
