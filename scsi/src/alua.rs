//! Asymmetric logical unit access (SPC-4 5.15): target port groups, their
//! access states, REPORT/SET TARGET PORT GROUPS, and which commands each
//! state lets through.
//!
//! A relative target port belongs to at most one group; a port in no group
//! (or a target with no groups) is always active/optimized.

use crate::cdb::op;
use crate::opcodes::OpDesc;
use crate::sense::{Asc, Sense};

/// Asymmetric access state of a target port group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluaState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Offline,
    Transitioning,
}

impl AluaState {
    /// The 4-bit code REPORT TARGET PORT GROUPS uses.
    pub fn code(self) -> u8 {
        match self {
            Self::ActiveOptimized => 0x0,
            Self::ActiveNonOptimized => 0x1,
            Self::Standby => 0x2,
            Self::Unavailable => 0x3,
            Self::Offline => 0xe,
            Self::Transitioning => 0xf,
        }
    }

    /// States an initiator may request with SET TARGET PORT GROUPS.
    pub fn from_stpg(code: u8) -> Option<Self> {
        match code & 0x0f {
            0x0 => Some(Self::ActiveOptimized),
            0x1 => Some(Self::ActiveNonOptimized),
            0x2 => Some(Self::Standby),
            0x3 => Some(Self::Unavailable),
            _ => None,
        }
    }

    /// NOT READY unless `desc` may run in this state (SPC-4 5.15.2.4).
    pub(crate) fn admits(self, desc: &OpDesc) -> Result<(), Sense> {
        let always = matches!(
            desc.op,
            op::INQUIRY
                | op::REPORT_LUNS
                | op::REQUEST_SENSE
                | op::MAINTENANCE_IN
                | op::MAINTENANCE_OUT
        );
        let standby_ok = always
            || matches!(
                desc.op,
                op::MODE_SENSE_6
                    | op::MODE_SENSE_10
                    | op::MODE_SELECT_6
                    | op::MODE_SELECT_10
                    | op::PERSISTENT_RESERVE_IN
                    | op::PERSISTENT_RESERVE_OUT
            );
        match self {
            Self::ActiveOptimized | Self::ActiveNonOptimized => Ok(()),
            Self::Standby if standby_ok => Ok(()),
            Self::Standby => Err(Sense::not_ready(Asc::LU_NOT_ACCESSIBLE_STANDBY)),
            _ if always => Ok(()),
            Self::Transitioning => Err(Sense::not_ready(Asc::LU_NOT_ACCESSIBLE_TRANSITION)),
            _ => Err(Sense::not_ready(Asc::LU_NOT_ACCESSIBLE_UNAVAILABLE)),
        }
    }
}

/// How the current state was reached (RTPG STATUS CODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AluaChange {
    #[default]
    None,
    Explicit,
    Implicit,
}

/// A target port group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    pub id: u16,
    pub state: AluaState,
    /// Relative target port identifiers in this group.
    pub ports: Vec<u16>,
    /// PREF bit: the preferred group for the LUs.
    pub preferred: bool,
    pub change: AluaChange,
}

impl PortGroup {
    pub fn new(id: u16, state: AluaState, ports: Vec<u16>) -> Self {
        Self {
            id,
            state,
            ports,
            preferred: false,
            change: AluaChange::None,
        }
    }

    /// The RTPG descriptor for this group.
    pub(crate) fn descriptor(&self) -> Vec<u8> {
        let mut d = vec![
            if self.preferred { 0x80 } else { 0 } | self.state.code(),
            // T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP
            0xcf,
        ];
        d.extend_from_slice(&self.id.to_be_bytes());
        d.push(0);
        d.push(match self.change {
            AluaChange::None => 0,
            AluaChange::Explicit => 1,
            AluaChange::Implicit => 2,
        });
        d.push(0);
        d.push(self.ports.len().min(255) as u8);
        for p in self.ports.iter().take(255) {
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&p.to_be_bytes());
        }
        d
    }
}
