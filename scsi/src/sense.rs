//! Sense data: sense keys, additional sense codes and their encoding.
//!
//! A failed command is described by a [`Sense`] (key, ASC/ASCQ, optional
//! INFORMATION and sense-key-specific bytes). It is encoded in fixed format
//! (SPC-4 4.5.3) unless the control mode page's D_SENSE bit asks for the
//! descriptor format (4.5.2). Both encoders always produce well-formed
//! buffers: the additional length byte always matches the bytes that follow.

use std::fmt;

/// SPC-4 sense key (4 bits). An open newtype so unknown values print in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SenseKey(pub u8);

impl SenseKey {
    pub const NO_SENSE: Self = Self(0x0);
    pub const RECOVERED_ERROR: Self = Self(0x1);
    pub const NOT_READY: Self = Self(0x2);
    pub const MEDIUM_ERROR: Self = Self(0x3);
    pub const HARDWARE_ERROR: Self = Self(0x4);
    pub const ILLEGAL_REQUEST: Self = Self(0x5);
    pub const UNIT_ATTENTION: Self = Self(0x6);
    pub const DATA_PROTECT: Self = Self(0x7);
    pub const COPY_ABORTED: Self = Self(0xA);
    pub const ABORTED_COMMAND: Self = Self(0xB);
    pub const MISCOMPARE: Self = Self(0xE);
}

impl fmt::Debug for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Self::NO_SENSE => "NO SENSE",
            Self::RECOVERED_ERROR => "RECOVERED ERROR",
            Self::NOT_READY => "NOT READY",
            Self::MEDIUM_ERROR => "MEDIUM ERROR",
            Self::HARDWARE_ERROR => "HARDWARE ERROR",
            Self::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            Self::UNIT_ATTENTION => "UNIT ATTENTION",
            Self::DATA_PROTECT => "DATA PROTECT",
            Self::COPY_ABORTED => "COPY ABORTED",
            Self::ABORTED_COMMAND => "ABORTED COMMAND",
            Self::MISCOMPARE => "MISCOMPARE",
            _ => return write!(f, "SenseKey({:#x})", self.0),
        };
        f.write_str(name)
    }
}

/// Additional sense code and qualifier, ASC in the high byte.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc(pub u16);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Self = Self(0x0000);
    pub const LU_NOT_READY_INIT_REQUIRED: Self = Self(0x0402);
    pub const SANITIZE_IN_PROGRESS: Self = Self(0x041B);
    pub const LU_NOT_ACCESSIBLE_TRANSITION: Self = Self(0x040A);
    pub const LU_NOT_ACCESSIBLE_STANDBY: Self = Self(0x040B);
    pub const LU_NOT_ACCESSIBLE_UNAVAILABLE: Self = Self(0x040C);
    pub const WRITE_ERROR: Self = Self(0x0C00);
    pub const UNREACHABLE_COPY_TARGET: Self = Self(0x0804);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Self = Self(0x0D02);
    pub const UNRECOVERED_READ_ERROR: Self = Self(0x1100);
    pub const MISCOMPARE_DURING_VERIFY: Self = Self(0x1D00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Self = Self(0x1A00);
    pub const INVALID_COMMAND_OPERATION_CODE: Self = Self(0x2000);
    pub const LBA_OUT_OF_RANGE: Self = Self(0x2100);
    pub const INVALID_FIELD_IN_CDB: Self = Self(0x2400);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Self = Self(0x2500);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Self = Self(0x2600);
    pub const INVALID_RELEASE_OF_PR: Self = Self(0x2604);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Self = Self(0x2606);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: Self = Self(0x2607);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Self = Self(0x2608);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: Self = Self(0x2609);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Self = Self(0x5504);
    pub const WRITE_PROTECTED: Self = Self(0x2700);
    pub const SOFTWARE_WRITE_PROTECTED: Self = Self(0x2702);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Self = Self(0x2707);
    pub const POWER_ON_RESET: Self = Self(0x2900);
    pub const POWER_ON_OCCURRED: Self = Self(0x2901);
    pub const SCSI_BUS_RESET: Self = Self(0x2902);
    pub const BUS_DEVICE_RESET: Self = Self(0x2903);
    pub const I_T_NEXUS_LOSS: Self = Self(0x2907);
    pub const MODE_PARAMETERS_CHANGED: Self = Self(0x2A01);
    pub const RESERVATIONS_PREEMPTED: Self = Self(0x2A03);
    pub const RESERVATIONS_RELEASED: Self = Self(0x2A04);
    pub const REGISTRATIONS_PREEMPTED: Self = Self(0x2A05);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Self = Self(0x2A06);
    pub const CAPACITY_DATA_HAS_CHANGED: Self = Self(0x2A09);
    pub const THIN_PROVISIONING_SOFT_THRESHOLD_REACHED: Self = Self(0x3807);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Self = Self(0x2F00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Self = Self(0x3900);
    pub const MEDIUM_NOT_PRESENT: Self = Self(0x3A00);
    pub const MEDIUM_NOT_PRESENT_TRAY_CLOSED: Self = Self(0x3A01);
    pub const MEDIUM_NOT_PRESENT_TRAY_OPEN: Self = Self(0x3A02);
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: Self = Self(0x3F0E);
    pub const INTERNAL_TARGET_FAILURE: Self = Self(0x4400);
    pub const MEDIUM_REMOVAL_PREVENTED: Self = Self(0x5302);
    pub const SANITIZE_COMMAND_FAILED: Self = Self(0x3103);

    pub fn asc(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn ascq(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Debug for Asc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Asc({:02x}/{:02x})", self.asc(), self.ascq())
    }
}

/// Sense-key-specific field for ILLEGAL REQUEST: which byte (and bit) of the
/// CDB or parameter list was wrong (SPC-4 4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

impl FieldPointer {
    fn encode(self) -> [u8; 3] {
        let mut b0 = 0x80; // SKSV
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 7);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b0, hi, lo]
    }
}

/// Why a command failed, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field (e.g. the LBA or miscompare offset).
    pub info: Option<u64>,
    pub field: Option<FieldPointer>,
    /// PROGRESS INDICATION (0..=65535 of the operation done) for NOT READY
    /// while a SANITIZE runs (SPC-4 4.5.2.4.4).
    pub progress: Option<u16>,
}

impl Sense {
    pub fn new(key: SenseKey, asc: Asc) -> Self {
        Self {
            key,
            asc,
            info: None,
            field: None,
            progress: None,
        }
    }
    pub fn illegal_request(asc: Asc) -> Self {
        Self::new(SenseKey::ILLEGAL_REQUEST, asc)
    }
    /// INVALID FIELD IN CDB pointing at `byte`.
    pub fn invalid_cdb(byte: u16) -> Self {
        Self::illegal_request(Asc::INVALID_FIELD_IN_CDB).with_field(FieldPointer {
            in_cdb: true,
            byte,
            bit: None,
        })
    }
    /// INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub fn invalid_param(byte: u16) -> Self {
        Self::illegal_request(Asc::INVALID_FIELD_IN_PARAMETER_LIST).with_field(FieldPointer {
            in_cdb: false,
            byte,
            bit: None,
        })
    }
    pub fn invalid_opcode() -> Self {
        Self::illegal_request(Asc::INVALID_COMMAND_OPERATION_CODE)
    }
    pub fn lba_out_of_range() -> Self {
        Self::illegal_request(Asc::LBA_OUT_OF_RANGE)
    }
    pub fn param_list_length() -> Self {
        Self::illegal_request(Asc::PARAMETER_LIST_LENGTH_ERROR)
    }
    pub fn not_ready(asc: Asc) -> Self {
        Self::new(SenseKey::NOT_READY, asc)
    }
    pub fn unit_attention(asc: Asc) -> Self {
        Self::new(SenseKey::UNIT_ATTENTION, asc)
    }
    pub fn data_protect(asc: Asc) -> Self {
        Self::new(SenseKey::DATA_PROTECT, asc)
    }
    pub fn medium_error(asc: Asc) -> Self {
        Self::new(SenseKey::MEDIUM_ERROR, asc)
    }
    pub fn miscompare(offset: u64) -> Self {
        Self::new(SenseKey::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY).with_info(offset)
    }
    pub fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }
    pub fn with_field(mut self, f: FieldPointer) -> Self {
        self.field = Some(f);
        self
    }
    pub fn with_progress(mut self, done: u16) -> Self {
        self.progress = Some(done);
        self
    }

    /// The 3 sense-key-specific bytes, SKSV set, if any.
    fn sks(&self) -> Option<[u8; 3]> {
        if let Some(f) = self.field {
            return Some(f.encode());
        }
        self.progress.map(|p| {
            let [hi, lo] = p.to_be_bytes();
            [0x80, hi, lo]
        })
    }

    /// Encode in fixed (`descriptor == false`) or descriptor format.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.encode_descriptor()
        } else {
            self.encode_fixed()
        }
    }

    fn encode_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; 18];
        b[0] = 0x70;
        b[2] = self.key.0 & 0x0f;
        if let Some(info) = self.info {
            // Fixed format has only 32 bits; SPC-4 says VALID=0 if it does
            // not fit, the descriptor format carries the full value.
            if let Ok(v) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        b[7] = 10; // additional sense length: bytes 8..18
        b[12] = self.asc.asc();
        b[13] = self.asc.ascq();
        if let Some(sks) = self.sks() {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }

    fn encode_descriptor(&self) -> Vec<u8> {
        let mut b = vec![
            0x72,
            self.key.0 & 0x0f,
            self.asc.asc(),
            self.asc.ascq(),
            0,
            0,
            0,
            0,
        ];
        if let Some(info) = self.info {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sks() {
            b.extend_from_slice(&[0x02, 0x06, 0x00]);
            b.extend_from_slice(&sks);
            b.extend_from_slice(&[0, 0]);
        }
        b[7] = (b.len() - 8) as u8;
        b
    }
}

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("check condition: {0:?}")]
    Check(Sense),
    #[error("reservation conflict")]
    Conflict,
    #[error("busy")]
    Busy,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Failure::Check(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::lba_out_of_range().with_info(0x1234);
        let b = s.encode(false);
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0xf0);
        assert_eq!(b[2], 5);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!((b[12], b[13]), (0x21, 0x00));
    }

    #[test]
    fn descriptor_format_layout() {
        let s = Sense::invalid_cdb(1).with_info(u64::MAX);
        let b = s.encode(true);
        assert_eq!(b[0], 0x72);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!((b[2], b[3]), (0x24, 0x00));
        assert_eq!(&b[8..12], &[0, 0x0a, 0x80, 0]);
    }

    #[test]
    fn large_info_not_valid_in_fixed() {
        let b = Sense::miscompare(1 << 40).encode(false);
        assert_eq!(b[0], 0x70);
    }
}
