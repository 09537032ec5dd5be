//! INQUIRY (standard data and VPD pages) and the self-description
//! commands: REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK
//! MANAGEMENT FUNCTIONS.
//!
//! Everything here is derived from the LU configuration, the device and the
//! target's port groups; nothing is cached, so a resize or an ALUA change is
//! visible on the next INQUIRY.

use crate::cdb::op;
use crate::lu::{trunc, CmdResult, Cx, LogicalUnit, Reply};
use crate::opcodes::{OpDesc, OPS};
use crate::sbc::limits;
use crate::sense::Sense;
use crate::target::TargetShared;

/// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];
/// Supported VPD pages, in ascending order (SPC-4 7.8.14).
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2];
/// IEEE company id used in our NAA designators (locally chosen).
const OUI: u64 = 0x00_1f_5e;

/// `s` padded with spaces (or cut) to exactly `n` printable ASCII bytes.
fn ascii_field(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..=0x7e).contains(&b) { b } else { b'_' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len().min(0xffff) as u16).to_be_bytes());
    d.extend(body);
    d
}

/// One designation descriptor (SPC-4 7.8.6.1).
fn designator(proto_codeset: u8, piv_assoc_type: u8, id: &[u8]) -> Vec<u8> {
    let mut d = vec![proto_codeset, piv_assoc_type, 0, id.len() as u8];
    d.extend_from_slice(id);
    d
}

impl LogicalUnit {
    /// The NAA designator of this LU (8 or 16 bytes, see
    /// [`crate::LunConfig::naa_id`]); also what EXTENDED COPY target
    /// descriptors must name.
    pub(crate) fn naa(&self) -> Vec<u8> {
        let id = self.cfg.naa_id;
        match id >> 60 {
            5 => id.to_be_bytes().to_vec(),
            6 => [id.to_be_bytes(), self.cfg.id.to_be_bytes()].concat(),
            _ => {
                let hi = (0x6u64 << 60) | (OUI << 36) | (self.cfg.id & 0xf_ffff_ffff);
                [hi.to_be_bytes(), id.to_be_bytes()].concat()
            }
        }
    }

    pub(crate) fn inquiry(&self, cx: &Cx<'_>) -> CmdResult {
        let evpd = cx.cdb.u8(1) & 0x01 != 0;
        let page = cx.cdb.u8(2);
        let alloc = cx.cdb.be16(3) as usize;
        if !evpd {
            if page != 0 {
                return Err(Sense::invalid_cdb(2).into());
            }
            return Ok(Reply::data(trunc(self.standard_inquiry(cx.tgt), alloc)));
        }
        let data = match page {
            0x00 => vpd(0x00, VPD_PAGES.to_vec()),
            0x80 => vpd(
                0x80,
                self.cfg
                    .serial
                    .as_bytes()
                    .iter()
                    .copied()
                    .take(252)
                    .collect(),
            ),
            0x83 => vpd(0x83, self.device_identification(cx)),
            0x86 => {
                let mut b = vec![0u8; 0x3c];
                b[1] = 0x07; // HEADSUP, ORDSUP, SIMPSUP
                vpd(0x86, b)
            }
            0xb0 => vpd(0xb0, self.block_limits()),
            0xb1 => {
                let mut b = vec![0u8; 0x3c];
                b[1] = 0x01; // MEDIUM ROTATION RATE: non-rotating
                             // WABEREQ/WACEREQ = 01b: reads after an erase succeed.
                b[3] = if self.dev().thin() { 0x40 } else { 0 } | 0x10;
                vpd(0xb1, b)
            }
            0xb2 => {
                let thin = self.dev().thin();
                // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 = thin.
                let b = if thin {
                    vec![0, 0xe4, 0x02, 0]
                } else {
                    vec![0, 0, 0, 0]
                };
                vpd(0xb2, b)
            }
            _ => return Err(Sense::invalid_cdb(2).into()),
        };
        Ok(Reply::data(trunc(data, alloc)))
    }

    fn standard_inquiry(&self, tgt: &TargetShared) -> Vec<u8> {
        let mut d = vec![0u8; 96];
        d[0] = 0x00; // connected, direct access block device
        d[1] = if self.cfg.removable { 0x80 } else { 0 };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[5] = 0x08; // 3PC: EXTENDED COPY
        if tgt.has_port_groups() {
            d[5] |= if tgt.explicit_alua() { 0x30 } else { 0x10 };
        }
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(&ascii_field(&self.cfg.vendor, 8));
        d[16..32].copy_from_slice(&ascii_field(&self.cfg.product, 16));
        d[32..36].copy_from_slice(&ascii_field(env!("CARGO_PKG_VERSION"), 4));
        for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    }

    fn device_identification(&self, cx: &Cx<'_>) -> Vec<u8> {
        let mut b = Vec::new();
        // LU: NAA (binary), T10 vendor id (ASCII).
        b.extend(designator(0x01, 0x03, &self.naa()));
        let mut t10 = ascii_field(&self.cfg.vendor, 8);
        t10.extend(
            self.cfg
                .product
                .bytes()
                .filter(|c| (0x20..=0x7e).contains(c))
                .take(16),
        );
        t10.push(b':');
        t10.extend(
            self.cfg
                .serial
                .bytes()
                .filter(|c| (0x20..=0x7e).contains(c))
                .take(64),
        );
        b.extend(designator(0x02, 0x01, &t10));
        // Target port (association 1, PIV, protocol iSCSI = 5).
        let rel = cx.cmd.nexus.relative_port;
        b.extend(designator(0x51, 0x94, &[0, 0, (rel >> 8) as u8, rel as u8]));
        if let Some(g) = cx.tgt.group_of_port(rel) {
            b.extend(designator(0x51, 0x95, &[0, 0, (g >> 8) as u8, g as u8]));
        }
        // SCSI name string of the target port: "<name>,t,0x<tpgt>",
        // NUL-terminated and padded to a multiple of 4.
        let mut name = format!("{},t,0x{:04x}", cx.tgt.name(), cx.cmd.nexus.tpgt).into_bytes();
        name.push(0);
        while !name.len().is_multiple_of(4) {
            name.push(0);
        }
        name.truncate(252);
        b.extend(designator(0x53, 0x98, &name));
        // SCSI name string of the target device.
        let mut dev = cx.tgt.name().as_bytes().to_vec();
        dev.push(0);
        while !dev.len().is_multiple_of(4) {
            dev.push(0);
        }
        dev.truncate(252);
        b.extend(designator(0x53, 0xa8, &dev));
        b
    }

    fn block_limits(&self) -> Vec<u8> {
        let bs = self.block_size();
        let mut b = vec![0u8; 0x3c];
        // Offsets below are page offsets minus the 4-byte header.
        b[1] = limits::MAX_COMPARE_AND_WRITE;
        let lbppb = 1u32 << self.lbppb_exponent();
        b[2..4].copy_from_slice(&(lbppb as u16).to_be_bytes()); // optimal granularity
        b[4..8].copy_from_slice(&(self.max_transfer_blocks() as u32).to_be_bytes());
        b[8..12]
            .copy_from_slice(&((limits::OPTIMAL_TRANSFER_BYTES / bs).max(1) as u32).to_be_bytes());
        if self.dev().thin() {
            b[16..20].copy_from_slice(&limits::MAX_UNMAP_LBA_COUNT.to_be_bytes());
            b[20..24].copy_from_slice(&limits::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            b[24..28].copy_from_slice(&lbppb.to_be_bytes()); // optimal unmap granularity
        }
        b[32..40].copy_from_slice(&limits::MAX_WRITE_SAME_LEN.to_be_bytes());
        b[40..44].copy_from_slice(&(self.max_atomic_blocks() as u32).to_be_bytes());
        b
    }

    /// Whether this LU (and target) implements the command in `desc`.
    pub(crate) fn supports(&self, tgt: &TargetShared, desc: &OpDesc) -> bool {
        match (desc.op, desc.sa) {
            (op::UNMAP, _) | (op::SANITIZE, Some(0x02)) => self.dev().thin(),
            (op::MAINTENANCE_IN, Some(op::MI_REPORT_TARGET_PORT_GROUPS)) => tgt.has_port_groups(),
            (op::MAINTENANCE_OUT, _) => tgt.explicit_alua(),
            _ => true,
        }
    }

    pub(crate) fn report_supported_opcodes(&self, cx: &Cx<'_>) -> CmdResult {
        let rctd = cx.cdb.u8(2) & 0x80 != 0;
        let options = cx.cdb.u8(2) & 0x07;
        let req_op = cx.cdb.u8(3);
        let req_sa = cx.cdb.be16(4);
        let alloc = cx.cdb.be32(6) as usize;
        let timeouts = |d: &OpDesc, out: &mut Vec<u8>| {
            out.extend_from_slice(&[0x00, 0x0a, 0x00, 0x00]);
            out.extend_from_slice(&d.timeout.to_be_bytes());
            out.extend_from_slice(&d.timeout.to_be_bytes());
        };
        let supported: Vec<&OpDesc> = OPS.iter().filter(|d| self.supports(cx.tgt, d)).collect();
        let data = match options {
            0 => {
                let mut v = vec![0u8; 4];
                for d in &supported {
                    v.push(d.op);
                    v.push(0);
                    v.extend_from_slice(&u16::from(d.sa.unwrap_or(0)).to_be_bytes());
                    v.push(0);
                    v.push(if rctd { 0x02 } else { 0 } | u8::from(d.sa.is_some()));
                    v.extend_from_slice(&(d.usage.len() as u16).to_be_bytes());
                    if rctd {
                        timeouts(d, &mut v);
                    }
                }
                let len = (v.len() - 4) as u32;
                v[0..4].copy_from_slice(&len.to_be_bytes());
                v
            }
            1..=3 => {
                let has_sa = OPS.iter().any(|d| d.op == req_op && d.sa.is_some());
                let by_sa = match options {
                    1 if has_sa => return Err(Sense::invalid_cdb(2).into()),
                    2 if !has_sa => return Err(Sense::invalid_cdb(2).into()),
                    1 => false,
                    2 => true,
                    _ => has_sa,
                };
                if !by_sa && req_sa != 0 {
                    return Err(Sense::invalid_cdb(4).into());
                }
                let found = supported
                    .iter()
                    .find(|d| d.op == req_op && (!by_sa || u16::from(d.sa.unwrap_or(0)) == req_sa));
                match found {
                    Some(d) => {
                        let mut v = vec![0, if rctd { 0x80 } else { 0 } | 0x03];
                        v.extend_from_slice(&(d.usage.len() as u16).to_be_bytes());
                        v.extend_from_slice(d.usage);
                        if rctd {
                            timeouts(d, &mut v);
                        }
                        v
                    }
                    // SUPPORT = 001b: not supported.
                    None => vec![0, 0x01, 0, 0],
                }
            }
            _ => return Err(Sense::invalid_cdb(2).into()),
        };
        Ok(Reply::data(trunc(data, alloc)))
    }

    pub(crate) fn report_supported_tmfs(&self, cx: &Cx<'_>) -> CmdResult {
        let repd = cx.cdb.u8(2) & 0x80 != 0;
        let alloc = cx.cdb.be32(6) as usize;
        // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
        // TARGET RESET.
        let mut d = vec![0xda, 0x00, 0x00, 0x00];
        if repd {
            d.resize(16, 0);
            d[3] = 0x0c; // additional data length
        }
        Ok(Reply::data(trunc(d, alloc)))
    }
}
