//! The SCSI target device: the set of LUs behind one iSCSI target name,
//! target-wide commands (REPORT LUNS, unknown LUNs, ALUA), task management
//! side effects and I_T nexus events.
//!
//! `ScsiTarget` is shared by every connection. The LU map is behind a
//! `RwLock` that is only held long enough to clone an `Arc<LogicalUnit>`;
//! commands then run against the LU without any target-wide lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::alua::{AluaChange, AluaState, PortGroup};
use crate::cdb::{be_at, op, Cdb};
use crate::lu::{trunc, CmdResult, Cx, LogicalUnit, LunConfig, NexusKey, Reply};
use crate::mode::ModeState;
use crate::opcodes::OpDesc;
use crate::sense::{Asc, Failure, Sense};
use crate::{status, ItNexus, ScsiCommand, ScsiResponse};

/// Target-wide configuration.
#[derive(Debug, Clone, Default)]
pub struct TargetConfig {
    /// The iSCSI target name (used in VPD 0x83 SCSI name strings).
    pub name: String,
    /// ALUA target port groups; empty means no ALUA (TPGS=0).
    pub port_groups: Vec<PortGroup>,
    /// Accept SET TARGET PORT GROUPS (TPGS=11b) instead of implicit only.
    pub explicit_alua: bool,
    /// Establish POWER ON, RESET OR BUS DEVICE RESET OCCURRED for every
    /// I_T nexus on its first command. Off by default, as in LIO: a new
    /// iSCSI session cannot have seen state from before a reset, and
    /// initiators that reconnect with a fresh ISID after an idle drop
    /// (libiscsi) would otherwise get a unit attention they do not expect
    /// (libiscsi SCSI.Sanitize.Reset then loops forever).
    pub new_nexus_ua: bool,
}

impl TargetConfig {
    /// No ALUA port groups.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// One port (relative port 1) in one active/optimized port group 1:
    /// implicit ALUA, ready for a partner node to add its own group.
    pub fn single_port(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            port_groups: vec![PortGroup::new(1, AluaState::ActiveOptimized, vec![1])],
            ..Self::default()
        }
    }
}

/// SAM-5 task management functions whose SCSI side effects we own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    QueryTask,
    QueryTaskSet,
    QueryAsyncEvent,
}

/// Outcome of a task management function (the transport maps it to the
/// iSCSI response code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    Complete,
    /// The LUN does not exist.
    NoSuchLun,
    NotSupported,
    Rejected,
}

pub(crate) struct TargetShared {
    name: String,
    explicit_alua: bool,
    pub new_nexus_ua: bool,
    groups: RwLock<Vec<PortGroup>>,
    luns: RwLock<BTreeMap<u64, Arc<LogicalUnit>>>,
}

impl TargetShared {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn has_port_groups(&self) -> bool {
        !self.groups.read().is_empty()
    }
    pub fn explicit_alua(&self) -> bool {
        self.explicit_alua && self.has_port_groups()
    }
    pub fn group_of_port(&self, rel: u16) -> Option<u16> {
        self.groups
            .read()
            .iter()
            .find(|g| g.ports.contains(&rel))
            .map(|g| g.id)
    }

    pub fn alua_check(&self, rel: u16, desc: &OpDesc) -> Result<(), Sense> {
        let state = self
            .groups
            .read()
            .iter()
            .find(|g| g.ports.contains(&rel))
            .map(|g| g.state);
        match state {
            Some(s) => s.admits(desc),
            None => Ok(()),
        }
    }

    pub fn lu_by_naa(&self, id: &[u8]) -> Option<Arc<LogicalUnit>> {
        self.luns.read().values().find(|lu| lu.naa() == id).cloned()
    }

    pub fn report_target_port_groups(&self, cx: &Cx<'_>) -> CmdResult {
        let extended = cx.cdb.u8(1) >> 5 == 1;
        let alloc = cx.cdb.be32(6) as usize;
        let mut d = vec![0u8; 4];
        if extended {
            d.extend_from_slice(&[0x10, 0, 0, 0]);
        }
        for g in self.groups.read().iter() {
            d.extend(g.descriptor());
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(Reply::data(trunc(d, alloc)))
    }

    pub fn set_target_port_groups(&self, cx: &Cx<'_>) -> CmdResult {
        let plen = cx.cdb.be32(6) as usize;
        let Some(p) = cx.data_out().get(..plen) else {
            return Err(Sense::param_list_length().into());
        };
        if plen < 4 || !(plen - 4).is_multiple_of(4) {
            return Err(Sense::param_list_length().into());
        }
        let mut changes = Vec::new();
        {
            let groups = self.groups.read();
            for off in (4..plen).step_by(4) {
                let Some(state) = AluaState::from_stpg(p[off]) else {
                    return Err(Sense::invalid_param(off as u16).into());
                };
                let id = be_at(p, off + 2, 2).unwrap_or(0) as u16;
                if !groups.iter().any(|g| g.id == id) {
                    return Err(Sense::invalid_param(off as u16 + 2).into());
                }
                changes.push((id, state));
            }
        }
        for (id, state) in changes {
            self.set_state(id, state, AluaChange::Explicit, Some(&cx.key));
        }
        Ok(Reply::good())
    }

    fn set_state(
        &self,
        id: u16,
        state: AluaState,
        how: AluaChange,
        except: Option<&NexusKey>,
    ) -> bool {
        {
            let mut groups = self.groups.write();
            let Some(g) = groups.iter_mut().find(|g| g.id == id) else {
                return false;
            };
            if g.state == state {
                return true;
            }
            g.state = state;
            g.change = how;
        }
        for lu in self.luns.read().values() {
            lu.state
                .write()
                .add_ua_all(Asc::ASYMMETRIC_ACCESS_STATE_CHANGED, except);
        }
        true
    }
}

/// The SCSI side of one iSCSI target: shared by all its sessions.
pub struct ScsiTarget {
    inner: TargetShared,
}

impl std::fmt::Debug for ScsiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiTarget")
            .field("name", &self.inner.name)
            .field("luns", &self.luns())
            .finish()
    }
}

impl ScsiTarget {
    pub fn new(cfg: TargetConfig, luns: Vec<LunConfig>) -> Self {
        let map = luns
            .into_iter()
            .map(|c| (c.id, Arc::new(LogicalUnit::new(c))))
            .collect();
        Self {
            inner: TargetShared {
                name: cfg.name,
                explicit_alua: cfg.explicit_alua,
                new_nexus_ua: cfg.new_nexus_ua,
                groups: RwLock::new(cfg.port_groups),
                luns: RwLock::new(map),
            },
        }
    }

    /// Run one command to completion.
    pub fn execute(&self, cmd: &ScsiCommand<'_>) -> ScsiResponse {
        let opcode = cmd.cdb.first().copied().unwrap_or(0xff);
        if opcode == op::REPORT_LUNS {
            return respond(self.report_luns(cmd), false);
        }
        let lu = self.inner.luns.read().get(&cmd.lun).cloned();
        match lu {
            Some(lu) => lu.execute(&self.inner, cmd),
            None => self.missing_lun(cmd),
        }
    }

    fn missing_lun(&self, cmd: &ScsiCommand<'_>) -> ScsiResponse {
        let not_supported = Sense::illegal_request(Asc::LOGICAL_UNIT_NOT_SUPPORTED);
        match cmd.cdb.first().copied() {
            // Peripheral qualifier 3: no LU at this LUN (SPC-4 6.6.2).
            Some(op::INQUIRY) if cmd.cdb.get(1).is_some_and(|b| b & 1 == 0) => {
                let alloc = cmd
                    .cdb
                    .get(3..5)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
                    as usize;
                let mut d = vec![0u8; 36];
                d[0] = 0x7f;
                d[2] = 0x06;
                d[3] = 0x12;
                d[4] = 31;
                ScsiResponse {
                    status: status::GOOD,
                    sense: Vec::new(),
                    data: trunc(d, alloc),
                }
            }
            // REQUEST SENSE returns the error as data (SPC-4 6.39).
            Some(op::REQUEST_SENSE) => {
                let alloc = cmd.cdb.get(4).copied().unwrap_or(0) as usize;
                let desc = cmd.cdb.get(1).is_some_and(|b| b & 1 != 0);
                ScsiResponse {
                    status: status::GOOD,
                    sense: Vec::new(),
                    data: trunc(not_supported.encode(desc), alloc),
                }
            }
            _ => respond(Err(not_supported.into()), false),
        }
    }

    fn report_luns(&self, cmd: &ScsiCommand<'_>) -> CmdResult {
        let cdb = Cdb::new(cmd.cdb)?;
        cdb.check_control()?;
        for (i, mask) in [
            (1usize, 0xffu8),
            (3, 0xff),
            (4, 0xff),
            (5, 0xff),
            (10, 0xff),
        ] {
            cdb.reserved(i, mask)?;
        }
        let alloc = cdb.be32(6) as usize;
        if alloc < 16 {
            return Err(Sense::invalid_cdb(6).into());
        }
        let ids: Vec<u64> = match cdb.u8(2) {
            0x00 | 0x02 => self.luns(),
            0x01 => Vec::new(),
            _ => return Err(Sense::invalid_cdb(2).into()),
        };
        let mut d = vec![0u8; 8];
        for id in &ids {
            d.extend_from_slice(&encode_lun(*id));
        }
        let len = (ids.len() * 8) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        // Listing the LUNs answers REPORTED LUNS DATA HAS CHANGED.
        let key = NexusKey::of(cmd.nexus);
        for lu in self.inner.luns.read().values() {
            let mut st = lu.state.write();
            if let Some(q) = st.ua.get_mut(&key) {
                q.retain(|a| *a != Asc::REPORTED_LUNS_DATA_HAS_CHANGED);
            }
        }
        Ok(Reply::data(trunc(d, alloc)))
    }

    /// Side effects of a task management function. ABORT TASK bookkeeping
    /// (finding the task) belongs to the transport.
    pub fn task_mgmt(&self, f: TmfFunction, lun: u64, nexus: &ItNexus) -> TmfResponse {
        let key = NexusKey::of(nexus);
        let lu = self.inner.luns.read().get(&lun).cloned();
        match f {
            TmfFunction::AbortTask
            | TmfFunction::AbortTaskSet
            | TmfFunction::ClearTaskSet
            | TmfFunction::QueryTask
            | TmfFunction::QueryTaskSet
            | TmfFunction::QueryAsyncEvent => {
                if lu.is_none() {
                    return TmfResponse::NoSuchLun;
                }
                TmfResponse::Complete
            }
            TmfFunction::ClearAca => TmfResponse::NotSupported,
            TmfFunction::LogicalUnitReset => match lu {
                Some(lu) => {
                    // Every nexus, the issuer included, gets the unit
                    // attention (SAM-5 6.3.3; libiscsi MultipathIO.Reset
                    // checks each path).
                    lu.reset(None, Asc::BUS_DEVICE_RESET);
                    TmfResponse::Complete
                }
                None => TmfResponse::NoSuchLun,
            },
            TmfFunction::TargetWarmReset => {
                // The issuer's session survives a warm reset and it knows
                // what it did, so only the other nexuses get the unit
                // attention (libiscsi Reserve6.TargetWarmReset goes on using
                // the issuing session without clearing one).
                for lu in self.inner.luns.read().values() {
                    lu.reset(Some(&key), Asc::POWER_ON_RESET);
                }
                TmfResponse::Complete
            }
            TmfFunction::TargetColdReset => {
                // Every session is closed by the transport after a cold
                // reset (RFC 7143 11.5.1); whoever comes back learns of it.
                for lu in self.inner.luns.read().values() {
                    lu.reset(None, Asc::POWER_ON_OCCURRED);
                    lu.state.write().mode = ModeState::default();
                }
                TmfResponse::Complete
            }
        }
    }

    /// The session of this I_T nexus is gone (logout, connection loss,
    /// reinstatement): release what SPC ties to the nexus.
    pub fn nexus_loss(&self, nexus: &ItNexus) {
        let key = NexusKey::of(nexus);
        for lu in self.inner.luns.read().values() {
            lu.nexus_loss(&key);
        }
    }

    pub fn add_lun(&self, lun: LunConfig) {
        let id = lun.id;
        let mut luns = self.inner.luns.write();
        for lu in luns.values() {
            lu.state
                .write()
                .add_ua_all(Asc::REPORTED_LUNS_DATA_HAS_CHANGED, None);
        }
        luns.insert(id, Arc::new(LogicalUnit::new(lun)));
    }

    pub fn remove_lun(&self, id: u64) {
        let mut luns = self.inner.luns.write();
        if luns.remove(&id).is_some() {
            for lu in luns.values() {
                lu.state
                    .write()
                    .add_ua_all(Asc::REPORTED_LUNS_DATA_HAS_CHANGED, None);
            }
        }
    }

    pub fn luns(&self) -> Vec<u64> {
        self.inner.luns.read().keys().copied().collect()
    }

    /// The device behind `id` changed size: tell every nexus.
    pub fn resize_lun(&self, id: u64) {
        if let Some(lu) = self.inner.luns.read().get(&id) {
            lu.state
                .write()
                .add_ua_all(Asc::CAPACITY_DATA_HAS_CHANGED, None);
        }
    }

    /// Persistent reservation state of LU `id` (registrations, reservation,
    /// generation, APTPL flag), whether or not APTPL is set: what an HA
    /// partner needs to carry the LU's reservations over a takeover.
    pub fn export_pr_state(&self, id: u64) -> Option<Vec<u8>> {
        let lu = self.inner.luns.read().get(&id).cloned()?;
        let bytes = lu.state.read().pr.encode();
        Some(bytes)
    }

    /// Replace LU `id`'s persistent reservation state with one produced by
    /// [`ScsiTarget::export_pr_state`] (takeover, giveback). Returns false
    /// if there is no such LU or the bytes are not a valid state.
    pub fn import_pr_state(&self, id: u64, bytes: &[u8]) -> bool {
        let Some(lu) = self.inner.luns.read().get(&id).cloned() else {
            return false;
        };
        let Some(pr) = crate::pr::PrState::decode(bytes) else {
            return false;
        };
        lu.state.write().pr = pr;
        true
    }

    /// Change a port group's state (implicit ALUA transition, e.g. on
    /// takeover). Returns false if there is no such group.
    pub fn set_alua_state(&self, group: u16, state: AluaState) -> bool {
        self.inner
            .set_state(group, state, AluaChange::Implicit, None)
    }

    /// How many I_T nexuses LU `id` remembers (tests: memory stays bounded).
    #[cfg(test)]
    pub(crate) fn known_nexuses(&self, id: u64) -> usize {
        self.inner
            .luns
            .read()
            .get(&id)
            .map_or(0, |lu| lu.state.read().seen.len())
    }

    /// Current port groups.
    pub fn port_groups(&self) -> Vec<PortGroup> {
        self.inner.groups.read().clone()
    }
}

/// SAM-5 LUN encoding: peripheral device addressing below 256, flat space
/// up to 16383, extended flat space beyond.
fn encode_lun(id: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if id < 256 {
        b[1] = id as u8;
    } else if id < 0x4000 {
        b[0] = 0x40 | (id >> 8) as u8;
        b[1] = id as u8;
    } else {
        b[0] = 0xd2;
        b[1..4].copy_from_slice(&(id as u32).to_be_bytes()[1..]);
    }
    b
}

fn respond(r: CmdResult, d_sense: bool) -> ScsiResponse {
    match r {
        Ok(r) => ScsiResponse {
            status: r.status,
            sense: Vec::new(),
            data: r.data,
        },
        Err(Failure::Check(s)) => ScsiResponse {
            status: status::CHECK_CONDITION,
            sense: s.encode(d_sense),
            data: Vec::new(),
        },
        Err(Failure::Conflict) => ScsiResponse {
            status: status::RESERVATION_CONFLICT,
            ..Default::default()
        },
        Err(Failure::Busy) => ScsiResponse {
            status: status::BUSY,
            ..Default::default()
        },
    }
}
