//! Typed views of every PDU a target receives or sends (RFC 7143 11.x), each
//! with `parse` (from a framed [`Pdu`]) and `to_pdu`. Offsets are those of the
//! RFC's BHS diagrams; fields the RFC marks reserved are written as zero.
//!
//! `parse` only fails where the bytes cannot describe a valid PDU (a bad AHS);
//! semantic checks (sequence numbers, states) belong to the connection.

use bytes::{BufMut, Bytes, BytesMut};

use crate::pdu::{Bhs, Opcode, Pdu};

/// ITT/TTT value meaning "none".
pub const RESERVED_TAG: u32 = 0xffff_ffff;

const F: u8 = 0x80;

/// SCSI task attribute from the command PDU (SAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttr {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttr {
    fn from_bits(b: u8) -> TaskAttr {
        match b & 7 {
            0 => TaskAttr::Untagged,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            // 1 and the reserved values 5..7 are treated as SIMPLE, as LIO does.
            _ => TaskAttr::Simple,
        }
    }
    fn bits(self) -> u8 {
        match self {
            TaskAttr::Untagged => 0,
            TaskAttr::Simple => 1,
            TaskAttr::Ordered => 2,
            TaskAttr::HeadOfQueue => 3,
            TaskAttr::Aca => 4,
        }
    }
}

/// A malformed header: answered with a Reject carrying this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPdu(pub RejectReason);

/// SCSI Command (0x01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommandReq {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    /// The whole CDB: 16 bytes from the BHS plus any extended CDB AHS.
    pub cdb: Bytes,
    /// Bidirectional read length AHS, when present.
    pub bidi_read_len: Option<u32>,
    pub data: Bytes,
}

const AHS_EXT_CDB: u8 = 1;
const AHS_BIDI_READ: u8 = 2;

impl ScsiCommandReq {
    pub fn parse(p: &Pdu) -> Result<Self, BadPdu> {
        let b = &p.bhs;
        let mut cdb = BytesMut::from(&b.0[32..48]);
        let mut bidi = None;
        let mut ahs = &p.ahs[..];
        while !ahs.is_empty() {
            if ahs.len() < 4 {
                return Err(BadPdu(RejectReason::INVALID_PDU_FIELD));
            }
            let len = u16::from_be_bytes([ahs[0], ahs[1]]) as usize;
            let ty = ahs[2];
            // AHSLength excludes the 4-byte header; the segment is padded to 4.
            let total = 3 + len;
            let padded = total.div_ceil(4) * 4;
            if len == 0 || ahs.len() < padded {
                return Err(BadPdu(RejectReason::INVALID_PDU_FIELD));
            }
            match ty {
                // Byte 3 is reserved; the rest of the CDB follows.
                AHS_EXT_CDB => cdb.extend_from_slice(&ahs[4..total]),
                AHS_BIDI_READ if len == 5 => {
                    bidi = Some(u32::from_be_bytes([ahs[4], ahs[5], ahs[6], ahs[7]]))
                }
                _ => return Err(BadPdu(RejectReason::INVALID_PDU_FIELD)),
            }
            ahs = &ahs[padded..];
        }
        let f = b.flags();
        Ok(ScsiCommandReq {
            immediate: b.immediate(),
            final_: f & F != 0,
            read: f & 0x40 != 0,
            write: f & 0x20 != 0,
            attr: TaskAttr::from_bits(f),
            lun: b.lun(),
            itt: b.itt(),
            edtl: b.u32(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
            cdb: cdb.freeze(),
            bidi_read_len: bidi,
            data: p.data.clone(),
        })
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::SCSI_COMMAND);
        b.set_immediate(self.immediate);
        let mut f = self.attr.bits();
        if self.final_ {
            f |= F;
        }
        if self.read {
            f |= 0x40;
        }
        if self.write {
            f |= 0x20;
        }
        b.set_flags(f);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.edtl);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        let n = self.cdb.len().min(16);
        b.0[32..32 + n].copy_from_slice(&self.cdb[..n]);
        let mut ahs = BytesMut::new();
        if self.cdb.len() > 16 {
            let ext = &self.cdb[16..];
            ahs.put_u16((ext.len() + 1) as u16);
            ahs.put_u8(AHS_EXT_CDB);
            ahs.put_u8(0);
            ahs.put_slice(ext);
            ahs.put_bytes(0, (4 - ahs.len() % 4) % 4);
        }
        if let Some(r) = self.bidi_read_len {
            ahs.put_u16(5);
            ahs.put_u8(AHS_BIDI_READ);
            ahs.put_u8(0);
            ahs.put_u32(r);
        }
        Pdu {
            bhs: b,
            ahs: ahs.freeze(),
            data: self.data.clone(),
        }
    }
}

/// SCSI Response (0x21).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponsePdu {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub exp_datasn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
    /// Sense data without the 2-byte SenseLength prefix.
    pub sense: Bytes,
}

impl ScsiResponsePdu {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        let f = b.flags();
        let sense = if p.data.len() >= 2 {
            let n = (u16::from_be_bytes([p.data[0], p.data[1]]) as usize).min(p.data.len() - 2);
            p.data.slice(2..2 + n)
        } else {
            Bytes::new()
        };
        ScsiResponsePdu {
            bidi_overflow: f & 0x10 != 0,
            bidi_underflow: f & 0x08 != 0,
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            response: b.u8(2),
            status: b.u8(3),
            itt: b.itt(),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            exp_datasn: b.u32(36),
            bidi_residual: b.u32(40),
            residual: b.u32(44),
            sense,
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::SCSI_RESPONSE);
        let mut f = F;
        if self.bidi_overflow {
            f |= 0x10;
        }
        if self.bidi_underflow {
            f |= 0x08;
        }
        if self.overflow {
            f |= 0x04;
        }
        if self.underflow {
            f |= 0x02;
        }
        b.set_flags(f);
        b.set_u8(2, self.response);
        b.set_u8(3, self.status);
        b.set_u32(16, self.itt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u32(36, self.exp_datasn);
        b.set_u32(40, self.bidi_residual);
        b.set_u32(44, self.residual);
        let data = if self.sense.is_empty() {
            Bytes::new()
        } else {
            let mut d = BytesMut::with_capacity(2 + self.sense.len());
            d.put_u16(self.sense.len().min(u16::MAX as usize) as u16);
            d.put_slice(&self.sense[..self.sense.len().min(u16::MAX as usize)]);
            d.freeze()
        };
        Pdu::with_data(b, data)
    }
}

/// Data-Out (0x05).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub datasn: u32,
    pub offset: u32,
    pub data: Bytes,
}

impl DataOut {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        DataOut {
            final_: b.flags() & F != 0,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            exp_statsn: b.u32(28),
            datasn: b.u32(36),
            offset: b.u32(40),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::DATA_OUT);
        b.set_flags(if self.final_ { F } else { 0 });
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(28, self.exp_statsn);
        b.set_u32(36, self.datasn);
        b.set_u32(40, self.offset);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Data-In (0x25).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S bit: status is in this PDU (phase collapse).
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub datasn: u32,
    pub offset: u32,
    pub residual: u32,
    pub data: Bytes,
}

impl DataIn {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        let f = b.flags();
        DataIn {
            final_: f & F != 0,
            ack: f & 0x40 != 0,
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            has_status: f & 0x01 != 0,
            status: b.u8(3),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            datasn: b.u32(36),
            offset: b.u32(40),
            residual: b.u32(44),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::DATA_IN);
        let mut f = 0;
        if self.final_ {
            f |= F;
        }
        if self.ack {
            f |= 0x40;
        }
        if self.overflow {
            f |= 0x04;
        }
        if self.underflow {
            f |= 0x02;
        }
        if self.has_status {
            f |= 0x01;
        }
        b.set_flags(f);
        b.set_u8(3, self.status);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u32(36, self.datasn);
        b.set_u32(40, self.offset);
        b.set_u32(44, self.residual);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Ready To Transfer (0x31).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub r2tsn: u32,
    pub offset: u32,
    pub desired_len: u32,
}

impl R2t {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        R2t {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            r2tsn: b.u32(36),
            offset: b.u32(40),
            desired_len: b.u32(44),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::R2T);
        b.set_flags(F);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u32(36, self.r2tsn);
        b.set_u32(40, self.offset);
        b.set_u32(44, self.desired_len);
        Pdu::new(b)
    }
}

/// NOP-Out (0x00).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

impl NopOut {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        NopOut {
            immediate: b.immediate(),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::NOP_OUT);
        b.set_immediate(self.immediate);
        b.set_flags(F);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        Pdu::with_data(b, self.data.clone())
    }
}

/// NOP-In (0x20).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub data: Bytes,
}

impl NopIn {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        NopIn {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::NOP_IN);
        b.set_flags(F);
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Task management function code (RFC 7143 11.5.1). Open newtype.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TmfFunction(pub u8);

impl TmfFunction {
    pub const ABORT_TASK: TmfFunction = TmfFunction(1);
    pub const ABORT_TASK_SET: TmfFunction = TmfFunction(2);
    pub const CLEAR_ACA: TmfFunction = TmfFunction(3);
    pub const CLEAR_TASK_SET: TmfFunction = TmfFunction(4);
    pub const LOGICAL_UNIT_RESET: TmfFunction = TmfFunction(5);
    pub const TARGET_WARM_RESET: TmfFunction = TmfFunction(6);
    pub const TARGET_COLD_RESET: TmfFunction = TmfFunction(7);
    pub const TASK_REASSIGN: TmfFunction = TmfFunction(8);
}

impl std::fmt::Debug for TmfFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = match self.0 {
            1 => "ABORT_TASK",
            2 => "ABORT_TASK_SET",
            3 => "CLEAR_ACA",
            4 => "CLEAR_TASK_SET",
            5 => "LOGICAL_UNIT_RESET",
            6 => "TARGET_WARM_RESET",
            7 => "TARGET_COLD_RESET",
            8 => "TASK_REASSIGN",
            v => return write!(f, "TmfFunction({v:#04x})"),
        };
        f.write_str(n)
    }
}

/// TMF response code (RFC 7143 11.6.1). Open newtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TmfResponse(pub u8);

impl TmfResponse {
    pub const FUNCTION_COMPLETE: TmfResponse = TmfResponse(0);
    pub const TASK_DOES_NOT_EXIST: TmfResponse = TmfResponse(1);
    pub const LUN_DOES_NOT_EXIST: TmfResponse = TmfResponse(2);
    pub const TASK_STILL_ALLEGIANT: TmfResponse = TmfResponse(3);
    pub const REASSIGNMENT_NOT_SUPPORTED: TmfResponse = TmfResponse(4);
    pub const NOT_SUPPORTED: TmfResponse = TmfResponse(5);
    pub const AUTHORIZATION_FAILED: TmfResponse = TmfResponse(6);
    pub const REJECTED: TmfResponse = TmfResponse(255);
}

/// Task Management Function Request (0x02).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfReq {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: u64,
    pub itt: u32,
    pub referenced_itt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub ref_cmdsn: u32,
    pub exp_datasn: u32,
}

impl TmfReq {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        TmfReq {
            immediate: b.immediate(),
            function: TmfFunction(b.flags() & 0x7f),
            lun: b.lun(),
            itt: b.itt(),
            referenced_itt: b.u32(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
            ref_cmdsn: b.u32(32),
            exp_datasn: b.u32(36),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::TASK_MGMT_REQ);
        b.set_immediate(self.immediate);
        b.set_flags(F | (self.function.0 & 0x7f));
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.referenced_itt);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        b.set_u32(32, self.ref_cmdsn);
        b.set_u32(36, self.exp_datasn);
        Pdu::new(b)
    }
}

/// Task Management Function Response (0x22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfResp {
    pub response: TmfResponse,
    pub itt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
}

impl TmfResp {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        TmfResp {
            response: TmfResponse(b.u8(2)),
            itt: b.itt(),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::TASK_MGMT_RESP);
        b.set_flags(F);
        b.set_u8(2, self.response.0);
        b.set_u32(16, self.itt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        Pdu::new(b)
    }
}

/// Login stage codes for CSG/NSG.
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Login Request (0x03).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginReq {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

impl LoginReq {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        let f = b.flags();
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b.0[8..14]);
        LoginReq {
            transit: f & 0x80 != 0,
            cont: f & 0x40 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: b.u8(2),
            version_min: b.u8(3),
            isid,
            tsih: b.u16(14),
            itt: b.itt(),
            cid: b.u16(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::LOGIN_REQ);
        b.set_immediate(true);
        b.set_flags(login_flags(self.transit, self.cont, self.csg, self.nsg));
        b.set_u8(2, self.version_max);
        b.set_u8(3, self.version_min);
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_u16(14, self.tsih);
        b.set_u32(16, self.itt);
        b.set_u16(20, self.cid);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        Pdu::with_data(b, self.data.clone())
    }
}

fn login_flags(transit: bool, cont: bool, csg: u8, nsg: u8) -> u8 {
    let mut f = (csg & 3) << 2;
    if transit {
        f |= 0x80 | (nsg & 3);
    }
    if cont {
        f |= 0x40;
    }
    f
}

/// Login Response (0x23).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResp {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Bytes,
}

impl LoginResp {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        let f = b.flags();
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b.0[8..14]);
        LoginResp {
            transit: f & 0x80 != 0,
            cont: f & 0x40 != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: b.u8(2),
            version_active: b.u8(3),
            isid,
            tsih: b.u16(14),
            itt: b.itt(),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            status_class: b.u8(36),
            status_detail: b.u8(37),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::LOGIN_RESP);
        b.set_flags(login_flags(self.transit, self.cont, self.csg, self.nsg));
        b.set_u8(2, self.version_max);
        b.set_u8(3, self.version_active);
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_u16(14, self.tsih);
        b.set_u32(16, self.itt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u8(36, self.status_class);
        b.set_u8(37, self.status_detail);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Text Request (0x04).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextReq {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

impl TextReq {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        TextReq {
            immediate: b.immediate(),
            final_: b.flags() & F != 0,
            cont: b.flags() & 0x40 != 0,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::TEXT_REQ);
        b.set_immediate(self.immediate);
        b.set_flags(if self.final_ { F } else { 0 } | if self.cont { 0x40 } else { 0 });
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Text Response (0x24).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResp {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub data: Bytes,
}

impl TextResp {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        TextResp {
            final_: b.flags() & F != 0,
            cont: b.flags() & 0x40 != 0,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32(20),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::TEXT_RESP);
        b.set_flags(if self.final_ { F } else { 0 } | if self.cont { 0x40 } else { 0 });
        b.set_u64(8, self.lun);
        b.set_u32(16, self.itt);
        b.set_u32(20, self.ttt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        Pdu::with_data(b, self.data.clone())
    }
}

/// Logout reason (RFC 7143 11.14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogoutReason(pub u8);

impl LogoutReason {
    pub const CLOSE_SESSION: LogoutReason = LogoutReason(0);
    pub const CLOSE_CONNECTION: LogoutReason = LogoutReason(1);
    pub const REMOVE_FOR_RECOVERY: LogoutReason = LogoutReason(2);
}

/// Logout Request (0x06).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutReq {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

impl LogoutReq {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        LogoutReq {
            immediate: b.immediate(),
            reason: LogoutReason(b.flags() & 0x7f),
            itt: b.itt(),
            cid: b.u16(20),
            cmdsn: b.u32(24),
            exp_statsn: b.u32(28),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::LOGOUT_REQ);
        b.set_immediate(self.immediate);
        b.set_flags(F | (self.reason.0 & 0x7f));
        b.set_u32(16, self.itt);
        b.set_u16(20, self.cid);
        b.set_u32(24, self.cmdsn);
        b.set_u32(28, self.exp_statsn);
        Pdu::new(b)
    }
}

/// Logout Response (0x26).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResp {
    /// 0 closed, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

impl LogoutResp {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        LogoutResp {
            response: b.u8(2),
            itt: b.itt(),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            time2wait: b.u16(40),
            time2retain: b.u16(42),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::LOGOUT_RESP);
        b.set_flags(F);
        b.set_u8(2, self.response);
        b.set_u32(16, self.itt);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u16(40, self.time2wait);
        b.set_u16(42, self.time2retain);
        Pdu::new(b)
    }
}

/// Reject reason (RFC 7143 11.17.1). Open newtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RejectReason(pub u8);

impl RejectReason {
    pub const DATA_DIGEST_ERROR: RejectReason = RejectReason(0x02);
    pub const SNACK_REJECT: RejectReason = RejectReason(0x03);
    pub const PROTOCOL_ERROR: RejectReason = RejectReason(0x04);
    pub const COMMAND_NOT_SUPPORTED: RejectReason = RejectReason(0x05);
    pub const IMMEDIATE_COMMAND_REJECT: RejectReason = RejectReason(0x06);
    pub const TASK_IN_PROGRESS: RejectReason = RejectReason(0x07);
    pub const INVALID_DATA_ACK: RejectReason = RejectReason(0x08);
    pub const INVALID_PDU_FIELD: RejectReason = RejectReason(0x09);
    pub const LONG_OPERATION_REJECT: RejectReason = RejectReason(0x0a);
    pub const WAITING_FOR_LOGOUT: RejectReason = RejectReason(0x0c);
}

/// Reject (0x3f). The data segment is the rejected PDU's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectPdu {
    pub reason: RejectReason,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub datasn: u32,
    pub header: Bytes,
}

impl RejectPdu {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        RejectPdu {
            reason: RejectReason(b.u8(2)),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            datasn: b.u32(36),
            header: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::REJECT);
        b.set_flags(F);
        b.set_u8(2, self.reason.0);
        b.set_u32(16, RESERVED_TAG);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u32(36, self.datasn);
        Pdu::with_data(b, self.header.clone())
    }
}

/// AsyncEvent codes (RFC 7143 11.9.1).
pub mod async_event {
    pub const SCSI: u8 = 0;
    pub const LOGOUT_REQUEST: u8 = 1;
    pub const DROP_CONNECTION: u8 = 2;
    pub const DROP_ALL_CONNECTIONS: u8 = 3;
    pub const RENEGOTIATE: u8 = 4;
    pub const VENDOR: u8 = 255;
}

/// Asynchronous Message (0x32).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMsg {
    pub lun: u64,
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
    /// Sense data and iSCSI event data, already formatted.
    pub data: Bytes,
}

impl AsyncMsg {
    pub fn parse(p: &Pdu) -> Self {
        let b = &p.bhs;
        AsyncMsg {
            lun: b.lun(),
            statsn: b.u32(24),
            exp_cmdsn: b.u32(28),
            max_cmdsn: b.u32(32),
            event: b.u8(36),
            vcode: b.u8(37),
            param1: b.u16(38),
            param2: b.u16(40),
            param3: b.u16(42),
            data: p.data.clone(),
        }
    }
    pub fn to_pdu(&self) -> Pdu {
        let mut b = Bhs::new(Opcode::ASYNC_MSG);
        b.set_flags(F);
        b.set_u64(8, self.lun);
        b.set_u32(16, RESERVED_TAG);
        b.set_u32(24, self.statsn);
        b.set_u32(28, self.exp_cmdsn);
        b.set_u32(32, self.max_cmdsn);
        b.set_u8(36, self.event);
        b.set_u8(37, self.vcode);
        b.set_u16(38, self.param1);
        b.set_u16(40, self.param2);
        b.set_u16(42, self.param3);
        Pdu::with_data(b, self.data.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_command_with_long_cdb_round_trips() {
        let c = ScsiCommandReq {
            immediate: false,
            final_: true,
            read: true,
            write: true,
            attr: TaskAttr::Ordered,
            lun: 0x0001_0000_0000_0000,
            itt: 9,
            edtl: 4096,
            cmdsn: 3,
            exp_statsn: 4,
            cdb: Bytes::from((0u8..32).collect::<Vec<_>>()),
            bidi_read_len: Some(512),
            data: Bytes::from_static(b"abcd"),
        };
        let p = c.to_pdu();
        assert_eq!(p.ahs.len() % 4, 0);
        assert_eq!(ScsiCommandReq::parse(&p), Ok(c));
    }
}
