//! The table of supported commands.
//!
//! One row per (operation code, service action): the CDB usage data that
//! REPORT SUPPORTED OPERATION CODES returns, how the command interacts with
//! reservations, and whether it needs the medium. The dispatcher also uses
//! the usage data to reject any set bit the command does not define: a
//! reserved bit set is INVALID FIELD IN CDB (SPC-4 4.2.3), so the two can
//! never disagree.

use crate::cdb::op;

/// How a command is treated under RESERVE(6) and persistent reservations
/// (SPC-4 5.13.1 table 63, SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Never conflicts: INQUIRY, REPORT LUNS, REQUEST SENSE, PRIN, ...
    Exempt,
    /// Allowed under persistent reservations, conflicts under RESERVE(6):
    /// TEST UNIT READY, READ CAPACITY.
    Status,
    /// Reads the medium or its metadata: conflicts under exclusive access.
    Read,
    /// Changes the medium or the LU's state: conflicts under write
    /// exclusive and exclusive access.
    Write,
}

#[derive(Debug)]
pub(crate) struct OpDesc {
    pub op: u8,
    pub sa: Option<u8>,
    /// For diagnostics and tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub name: &'static str,
    /// CDB usage data (SPC-4 6.35.3): byte 0 is the opcode; a set bit is a
    /// bit the device server evaluates. The last byte is CONTROL.
    pub usage: &'static [u8],
    pub access: Access,
    /// Needs a loaded medium (NOT READY, MEDIUM NOT PRESENT otherwise).
    pub medium: bool,
    /// Nominal / recommended timeout in seconds for RCTD.
    pub timeout: u32,
}

const C: u8 = 0x04; // CONTROL: NACA is evaluated (and rejected).

macro_rules! d {
    ($op:expr, $sa:expr, $name:expr, $access:ident, $medium:expr, [$($u:expr),* $(,)?]) => {
        OpDesc {
            op: $op,
            sa: $sa,
            name: $name,
            usage: &[$($u),*],
            access: Access::$access,
            medium: $medium,
            timeout: 30,
        }
    };
}

const F: u8 = 0xff;

pub(crate) static OPS: &[OpDesc] = &[
    d!(
        op::TEST_UNIT_READY,
        None,
        "TEST UNIT READY",
        Status,
        true,
        [0x00, 0, 0, 0, 0, C]
    ),
    d!(
        op::REQUEST_SENSE,
        None,
        "REQUEST SENSE",
        Exempt,
        false,
        [0x03, 0x01, 0, 0, F, C]
    ),
    d!(
        op::READ_6,
        None,
        "READ(6)",
        Read,
        true,
        [0x08, 0x1f, F, F, F, C]
    ),
    d!(
        op::WRITE_6,
        None,
        "WRITE(6)",
        Write,
        true,
        [0x0a, 0x1f, F, F, F, C]
    ),
    d!(
        op::INQUIRY,
        None,
        "INQUIRY",
        Exempt,
        false,
        [0x12, 0x01, F, F, F, C]
    ),
    d!(
        op::MODE_SELECT_6,
        None,
        "MODE SELECT(6)",
        Write,
        false,
        [0x15, 0x11, 0, 0, F, C]
    ),
    d!(
        op::RESERVE_6,
        None,
        "RESERVE(6)",
        Exempt,
        false,
        [0x16, 0, 0, 0, 0, C]
    ),
    d!(
        op::RELEASE_6,
        None,
        "RELEASE(6)",
        Exempt,
        false,
        [0x17, 0, 0, 0, 0, C]
    ),
    d!(
        op::MODE_SENSE_6,
        None,
        "MODE SENSE(6)",
        Read,
        false,
        [0x1a, 0x08, F, F, F, C]
    ),
    d!(
        op::START_STOP_UNIT,
        None,
        "START STOP UNIT",
        Write,
        false,
        [0x1b, 0x01, 0, 0x0f, 0xf7, C]
    ),
    d!(
        op::PREVENT_ALLOW,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        Write,
        false,
        [0x1e, 0, 0, 0, 0x03, C]
    ),
    d!(
        op::READ_CAPACITY_10,
        None,
        "READ CAPACITY(10)",
        Status,
        true,
        [0x25, 0, 0, 0, 0, 0, 0, 0, 0, C]
    ),
    d!(
        op::READ_10,
        None,
        "READ(10)",
        Read,
        true,
        [0x28, 0x18, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::WRITE_10,
        None,
        "WRITE(10)",
        Write,
        true,
        [0x2a, 0x18, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::WRITE_VERIFY_10,
        None,
        "WRITE AND VERIFY(10)",
        Write,
        true,
        [0x2e, 0x12, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::VERIFY_10,
        None,
        "VERIFY(10)",
        Read,
        true,
        [0x2f, 0x16, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::PRE_FETCH_10,
        None,
        "PRE-FETCH(10)",
        Read,
        true,
        [0x34, 0x02, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::SYNCHRONIZE_CACHE_10,
        None,
        "SYNCHRONIZE CACHE(10)",
        Write,
        true,
        [0x35, 0x06, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::READ_DEFECT_DATA_10,
        None,
        "READ DEFECT DATA(10)",
        Read,
        false,
        [0x37, 0, 0x1f, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::WRITE_SAME_10,
        None,
        "WRITE SAME(10)",
        Write,
        true,
        [0x41, 0x18, F, F, F, F, 0x3f, F, F, C]
    ),
    d!(
        op::UNMAP,
        None,
        "UNMAP",
        Write,
        true,
        [0x42, 0x01, 0, 0, 0, 0, 0x3f, F, F, C]
    ),
    d!(
        op::SANITIZE,
        Some(0x01),
        "SANITIZE OVERWRITE",
        Write,
        true,
        [0x48, 0xa1, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::SANITIZE,
        Some(0x02),
        "SANITIZE BLOCK ERASE",
        Write,
        true,
        [0x48, 0xa2, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::SANITIZE,
        Some(0x03),
        "SANITIZE CRYPTOGRAPHIC ERASE",
        Write,
        true,
        [0x48, 0xa3, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::SANITIZE,
        Some(0x1f),
        "SANITIZE EXIT FAILURE MODE",
        Write,
        true,
        [0x48, 0xbf, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::LOG_SENSE,
        None,
        "LOG SENSE",
        Exempt,
        false,
        [0x4d, 0, 0xff, 0xff, 0, 0, 0, F, F, C]
    ),
    d!(
        op::MODE_SELECT_10,
        None,
        "MODE SELECT(10)",
        Write,
        false,
        [0x55, 0x11, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::RESERVE_10,
        None,
        "RESERVE(10)",
        Exempt,
        false,
        [0x56, 0, 0, 0, 0, 0, 0, 0, 0, C]
    ),
    d!(
        op::RELEASE_10,
        None,
        "RELEASE(10)",
        Exempt,
        false,
        [0x57, 0, 0, 0, 0, 0, 0, 0, 0, C]
    ),
    d!(
        op::MODE_SENSE_10,
        None,
        "MODE SENSE(10)",
        Read,
        false,
        [0x5a, 0x18, F, F, 0, 0, 0, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x00),
        "PERSISTENT RESERVE IN READ KEYS",
        Exempt,
        false,
        [0x5e, 0x00, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x01),
        "PERSISTENT RESERVE IN READ RESERVATION",
        Exempt,
        false,
        [0x5e, 0x01, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x02),
        "PERSISTENT RESERVE IN REPORT CAPABILITIES",
        Exempt,
        false,
        [0x5e, 0x02, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_IN,
        Some(0x03),
        "PERSISTENT RESERVE IN READ FULL STATUS",
        Exempt,
        false,
        [0x5e, 0x03, 0, 0, 0, 0, 0, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x00),
        "PERSISTENT RESERVE OUT REGISTER",
        Exempt,
        false,
        [0x5f, 0x00, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x01),
        "PERSISTENT RESERVE OUT RESERVE",
        Exempt,
        false,
        [0x5f, 0x01, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x02),
        "PERSISTENT RESERVE OUT RELEASE",
        Exempt,
        false,
        [0x5f, 0x02, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x03),
        "PERSISTENT RESERVE OUT CLEAR",
        Exempt,
        false,
        [0x5f, 0x03, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x04),
        "PERSISTENT RESERVE OUT PREEMPT",
        Exempt,
        false,
        [0x5f, 0x04, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x05),
        "PERSISTENT RESERVE OUT PREEMPT AND ABORT",
        Exempt,
        false,
        [0x5f, 0x05, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x06),
        "PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY",
        Exempt,
        false,
        [0x5f, 0x06, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::PERSISTENT_RESERVE_OUT,
        Some(0x07),
        "PERSISTENT RESERVE OUT REGISTER AND MOVE",
        Exempt,
        false,
        [0x5f, 0x07, 0xff, 0, 0, F, F, F, F, C]
    ),
    d!(
        op::EXTENDED_COPY,
        Some(0x00),
        "EXTENDED COPY(LID1)",
        Write,
        true,
        [0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::RECEIVE_COPY_RESULTS,
        Some(0x00),
        "RECEIVE COPY STATUS(LID1)",
        Read,
        false,
        [0x84, 0x00, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::RECEIVE_COPY_RESULTS,
        Some(0x03),
        "RECEIVE COPY OPERATING PARAMETERS",
        Read,
        false,
        [0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::READ_16,
        None,
        "READ(16)",
        Read,
        true,
        [0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::COMPARE_AND_WRITE,
        None,
        "COMPARE AND WRITE",
        Write,
        true,
        [0x89, 0x1a, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x3f, C]
    ),
    d!(
        op::WRITE_16,
        None,
        "WRITE(16)",
        Write,
        true,
        [0x8a, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::ORWRITE_16,
        None,
        "ORWRITE(16)",
        Write,
        true,
        [0x8b, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::WRITE_VERIFY_16,
        None,
        "WRITE AND VERIFY(16)",
        Write,
        true,
        [0x8e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::VERIFY_16,
        None,
        "VERIFY(16)",
        Read,
        true,
        [0x8f, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::PRE_FETCH_16,
        None,
        "PRE-FETCH(16)",
        Read,
        true,
        [0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::SYNCHRONIZE_CACHE_16,
        None,
        "SYNCHRONIZE CACHE(16)",
        Write,
        true,
        [0x91, 0x06, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::WRITE_SAME_16,
        None,
        "WRITE SAME(16)",
        Write,
        true,
        [0x93, 0x19, F, F, F, F, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::WRITE_ATOMIC_16,
        None,
        "WRITE ATOMIC(16)",
        Write,
        true,
        [0x9c, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0x3f, C]
    ),
    d!(
        op::SERVICE_ACTION_IN_16,
        Some(op::SAI_READ_CAPACITY_16),
        "READ CAPACITY(16)",
        Status,
        true,
        [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::SERVICE_ACTION_IN_16,
        Some(op::SAI_GET_LBA_STATUS),
        "GET LBA STATUS",
        Read,
        true,
        [0x9e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
    ),
    d!(
        op::REPORT_LUNS,
        None,
        "REPORT LUNS",
        Exempt,
        false,
        [0xa0, 0, F, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::MAINTENANCE_IN,
        Some(op::MI_REPORT_TARGET_PORT_GROUPS),
        "REPORT TARGET PORT GROUPS",
        Exempt,
        false,
        [0xa3, 0xea, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::MAINTENANCE_IN,
        Some(op::MI_REPORT_SUPPORTED_OPCODES),
        "REPORT SUPPORTED OPERATION CODES",
        Exempt,
        false,
        [0xa3, 0x0c, 0x87, F, F, F, F, F, F, F, 0, C]
    ),
    d!(
        op::MAINTENANCE_IN,
        Some(op::MI_REPORT_SUPPORTED_TMFS),
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        Exempt,
        false,
        [0xa3, 0x0d, 0x80, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::MAINTENANCE_OUT,
        Some(op::MO_SET_TARGET_PORT_GROUPS),
        "SET TARGET PORT GROUPS",
        Write,
        false,
        [0xa4, 0x0a, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
    d!(
        op::READ_12,
        None,
        "READ(12)",
        Read,
        true,
        [0xa8, 0x18, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::WRITE_12,
        None,
        "WRITE(12)",
        Write,
        true,
        [0xaa, 0x18, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::WRITE_VERIFY_12,
        None,
        "WRITE AND VERIFY(12)",
        Write,
        true,
        [0xae, 0x12, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::VERIFY_12,
        None,
        "VERIFY(12)",
        Read,
        true,
        [0xaf, 0x16, F, F, F, F, F, F, F, F, 0x3f, C]
    ),
    d!(
        op::READ_DEFECT_DATA_12,
        None,
        "READ DEFECT DATA(12)",
        Read,
        false,
        [0xb7, 0x1f, 0, 0, 0, 0, F, F, F, F, 0, C]
    ),
];

/// Whether this opcode's byte 1 carries a service action.
pub(crate) fn has_service_action(opcode: u8) -> bool {
    OPS.iter().any(|d| d.op == opcode && d.sa.is_some())
}

/// Look up the row for a CDB: by opcode, and by service action when the
/// opcode has them.
pub(crate) fn lookup(opcode: u8, sa: u8) -> Option<&'static OpDesc> {
    OPS.iter()
        .find(|d| d.op == opcode && d.sa.is_none_or(|s| s == sa))
}

/// Every set bit outside the usage mask is reserved: report the first byte
/// that has one. Byte 0 and CONTROL are checked elsewhere.
pub(crate) fn first_reserved_violation(desc: &OpDesc, cdb: &[u8]) -> Option<usize> {
    let last = desc.usage.len().saturating_sub(1);
    (1..last).find(|&i| {
        let mut mask = desc.usage.get(i).copied().unwrap_or(0);
        // The service action field is part of the usage mask.
        if i == 1 && desc.sa.is_some() {
            mask |= 0x1f;
        }
        cdb.get(i).copied().unwrap_or(0) & !mask != 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb::cdb_len;

    #[test]
    fn usage_lengths_match_group_codes() {
        for d in OPS {
            assert_eq!(Some(d.usage.len()), cdb_len(d.op), "{}", d.name);
            assert_eq!(d.usage[0], d.op, "{}", d.name);
        }
    }
}
