//! One logical unit: its configuration, its shared state, and the command
//! pipeline every CDB goes through.
//!
//! Pipeline order (SAM-5 5.14 / SPC-4 5.13): register the I_T nexus (a new
//! one gets POWER ON, RESET OR BUS DEVICE RESET OCCURRED only when
//! `TargetConfig::new_nexus_ua` asks for it) -> report a
//! pending unit attention (except INQUIRY, REPORT LUNS, REQUEST SENSE) ->
//! sanitize in progress -> ALUA access state -> CDB validation (reserved
//! bits via the usage table) -> reservation conflicts -> medium present ->
//! the command itself.
//!
//! Locking: `state` (a `RwLock`) holds all metadata and is never held
//! across device I/O. `io` is taken shared by every write and exclusively
//! by COMPARE AND WRITE so compare+write is atomic against other writers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::cdb::{op, Cdb};
use crate::device::{BlockDevice, DevError};
use crate::mode::ModeState;
use crate::opcodes::{self, Access, OpDesc};
use crate::pr::PrState;
use crate::sense::{Asc, Failure, Sense};
use crate::target::TargetShared;
use crate::xcopy::CopyStatus;
use crate::{status, ItNexus, ScsiCommand, ScsiResponse};

/// How many ended I_T nexuses an LU remembers (per LU).
pub(crate) const MAX_LOST_NEXUSES: usize = 1024;

/// Where APTPL persistent reservation state is kept across restarts.
pub trait PrStore: Send + Sync {
    /// Replace the stored state (durably: it must survive power loss).
    fn save(&self, data: &[u8]) -> std::io::Result<()>;
    /// The last saved state, if any.
    fn load(&self) -> std::io::Result<Option<Vec<u8>>>;
}

/// How a logical unit is presented.
#[derive(Clone)]
pub struct LunConfig {
    pub id: u64,
    pub device: Arc<dyn BlockDevice>,
    /// T10 vendor identification (8 ASCII characters, padded).
    pub vendor: String,
    /// Product identification (16 ASCII characters, padded).
    pub product: String,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// LU identity. If the top nibble is 6 it is the first 8 bytes of an
    /// NAA 6 (IEEE Registered Extended) designator, the LU id forming the
    /// extension; if 5, a complete NAA 5 designator; otherwise any unique
    /// number, wrapped in an NAA 6 designator with our company id.
    pub naa_id: u64,
    /// Report RMB=1 and honour medium load/eject.
    pub removable: bool,
    pub read_only: bool,
    /// Where APTPL reservations are persisted; `None` disables APTPL.
    pub pr_store: Option<Arc<dyn PrStore>>,
}

impl LunConfig {
    /// Defaults for everything but the id and the device: vendor
    /// "NVTARGET", a serial and NAA derived from the id.
    pub fn new(id: u64, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            id,
            device,
            vendor: "NVTARGET".into(),
            product: "nvtarget LUN".into(),
            serial: format!("NVT{id:013}"),
            naa_id: 0x4e56_5400_0000_0000 | id,
            removable: false,
            read_only: false,
            pr_store: None,
        }
    }
}

impl std::fmt::Debug for LunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LunConfig")
            .field("id", &self.id)
            .field("vendor", &self.vendor)
            .field("product", &self.product)
            .field("serial", &self.serial)
            .field("naa_id", &format_args!("{:#x}", self.naa_id))
            .field("removable", &self.removable)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// An I_T nexus as the LU keys it: initiator port name (lower case, it
/// includes the ISID) and relative target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NexusKey {
    pub port: String,
    pub rel: u16,
}

impl NexusKey {
    pub fn of(n: &ItNexus) -> Self {
        Self {
            port: n.initiator_port.to_ascii_lowercase(),
            rel: n.relative_port,
        }
    }
}

/// Everything about the LU that commands read or change, except data.
#[derive(Debug)]
pub(crate) struct LuState {
    pub mode: ModeState,
    /// Pending unit attentions per I_T nexus, oldest first.
    pub ua: HashMap<NexusKey, VecDeque<Asc>>,
    /// Nexuses that have sent at least one command.
    pub seen: HashSet<NexusKey>,
    /// Nexuses whose session ended, oldest first: kept (bounded by
    /// [`MAX_LOST_NEXUSES`]) so a returning initiator port still learns what
    /// happened while it was away; initiators that pick a fresh ISID for
    /// every session never return, and would otherwise grow `seen` forever.
    pub lost: VecDeque<NexusKey>,
    /// RESERVE(6)/(10) holder.
    pub reserve6: Option<NexusKey>,
    pub pr: PrState,
    /// Nexuses with PREVENT MEDIUM REMOVAL in effect.
    pub prevent: HashSet<NexusKey>,
    /// Medium loaded (always true unless removable and ejected).
    pub loaded: bool,
    /// EXTENDED COPY results by (nexus, list id).
    pub copies: HashMap<(NexusKey, u8), CopyStatus>,
    /// The last SANITIZE failed: only EXIT FAILURE MODE or a new SANITIZE.
    pub sanitize_failed: bool,
}

impl LuState {
    /// Queue a unit attention for one nexus, once.
    pub fn add_ua(&mut self, key: &NexusKey, asc: Asc) {
        let q = self.ua.entry(key.clone()).or_default();
        if !q.contains(&asc) {
            q.push_back(asc);
        }
    }
    /// Queue a unit attention for every known nexus except `except`.
    pub fn add_ua_all(&mut self, asc: Asc, except: Option<&NexusKey>) {
        let keys: Vec<NexusKey> = self
            .seen
            .iter()
            .filter(|k| Some(*k) != except)
            .cloned()
            .collect();
        for k in keys {
            self.add_ua(&k, asc);
        }
    }
}

pub(crate) struct Reply {
    pub status: u8,
    pub data: Vec<u8>,
}

impl Reply {
    pub fn good() -> Self {
        Self {
            status: status::GOOD,
            data: Vec::new(),
        }
    }
    pub fn data(data: Vec<u8>) -> Self {
        Self {
            status: status::GOOD,
            data,
        }
    }
}

pub(crate) type CmdResult = Result<Reply, Failure>;

/// Truncate Data-In to the allocation length.
pub(crate) fn trunc(mut v: Vec<u8>, alloc: usize) -> Vec<u8> {
    v.truncate(alloc);
    v
}

/// What a handler needs besides the LU.
pub(crate) struct Cx<'a> {
    pub cdb: Cdb<'a>,
    pub cmd: &'a ScsiCommand<'a>,
    pub key: NexusKey,
    pub tgt: &'a TargetShared,
}

impl Cx<'_> {
    pub fn data_out(&self) -> &[u8] {
        self.cmd.data_out
    }
}

pub(crate) struct LogicalUnit {
    pub cfg: LunConfig,
    pub state: RwLock<LuState>,
    /// Writers share it; COMPARE AND WRITE holds it exclusively.
    pub io: RwLock<()>,
    pub sanitizing: AtomicBool,
    /// SANITIZE progress, 0..=65535 (PROGRESS INDICATION).
    pub sanitize_progress: std::sync::atomic::AtomicU32,
}

impl LogicalUnit {
    pub fn new(cfg: LunConfig) -> Self {
        let pr = cfg
            .pr_store
            .as_ref()
            .and_then(|s| s.load().ok().flatten())
            .and_then(|b| PrState::decode(&b))
            .unwrap_or_default();
        Self {
            cfg,
            state: RwLock::new(LuState {
                mode: ModeState::default(),
                ua: HashMap::new(),
                seen: HashSet::new(),
                lost: VecDeque::new(),
                reserve6: None,
                pr,
                prevent: HashSet::new(),
                loaded: true,
                copies: HashMap::new(),
                sanitize_failed: false,
            }),
            io: RwLock::new(()),
            sanitizing: AtomicBool::new(false),
            sanitize_progress: std::sync::atomic::AtomicU32::new(0),
        }
    }

    pub fn dev(&self) -> &dyn BlockDevice {
        self.cfg.device.as_ref()
    }

    pub fn execute(self: &Arc<Self>, tgt: &TargetShared, cmd: &ScsiCommand<'_>) -> ScsiResponse {
        let key = NexusKey::of(cmd.nexus);
        let res = self.run(tgt, cmd, key);
        // Writes are what can cross the store's soft threshold; the UA goes
        // to every nexus, the writer included (SBC-3 4.7.3.7).
        let writes = matches!(
            cmd.cdb.first(),
            Some(0x0A | 0x2A | 0xAA | 0x8A | 0x41 | 0x93 | 0x2E | 0xAE | 0x8E | 0x89)
        );
        if writes && res.is_ok() && self.dev().poll_soft_threshold() {
            self.state
                .write()
                .add_ua_all(Asc::THIN_PROVISIONING_SOFT_THRESHOLD_REACHED, None);
        }
        let d_sense = self.state.read().mode.d_sense;
        match res {
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

    /// Register the nexus and, unless the command is exempt, report the
    /// oldest pending unit attention.
    fn unit_attention(&self, tgt: &TargetShared, key: &NexusKey, opcode: u8) -> Result<(), Sense> {
        let exempt = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        {
            let st = self.state.read();
            let pending = st.ua.get(key).is_some_and(|q| !q.is_empty());
            if st.seen.contains(key) && (!pending || exempt) {
                return Ok(());
            }
        }
        let mut st = self.state.write();
        if st.seen.insert(key.clone()) && tgt.new_nexus_ua {
            st.add_ua(key, Asc::POWER_ON_RESET);
        }
        if !st.lost.is_empty() {
            // Back again: no longer a candidate for eviction.
            st.lost.retain(|k| k != key);
        }
        if exempt {
            return Ok(());
        }
        match st.ua.get_mut(key).and_then(|q| q.pop_front()) {
            Some(asc) => Err(Sense::unit_attention(asc)),
            None => Ok(()),
        }
    }

    fn run(
        self: &Arc<Self>,
        tgt: &TargetShared,
        cmd: &ScsiCommand<'_>,
        key: NexusKey,
    ) -> CmdResult {
        let opcode = cmd.cdb.first().copied().unwrap_or(0xff);
        self.unit_attention(tgt, &key, opcode)?;
        let cdb = Cdb::new(cmd.cdb)?;
        let desc = match opcodes::lookup(opcode, cdb.service_action()) {
            Some(d) => d,
            None if opcodes::has_service_action(opcode) => return Err(Sense::invalid_cdb(1).into()),
            None => return Err(Sense::invalid_opcode().into()),
        };
        if !self.supports(tgt, desc) {
            return Err(if desc.sa.is_some() && opcode != op::MAINTENANCE_OUT {
                Sense::invalid_cdb(1)
            } else {
                Sense::invalid_opcode()
            }
            .into());
        }
        if self.sanitizing.load(Ordering::Acquire)
            && !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        {
            return Err(self.sanitize_sense().into());
        }
        tgt.alua_check(cmd.nexus.relative_port, desc)?;
        cdb.check_control()?;
        if let Some(i) = opcodes::first_reserved_violation(desc, cdb.bytes()) {
            return Err(Sense::invalid_cdb(i as u16).into());
        }
        let cx = Cx { cdb, cmd, key, tgt };
        {
            let st = self.state.read();
            self.check_conflict(&st, &cx, desc)?;
            if desc.medium && !st.loaded {
                return Err(Sense::not_ready(Asc::MEDIUM_NOT_PRESENT_TRAY_OPEN).into());
            }
            if st.sanitize_failed && desc.medium && opcode != op::SANITIZE && opcode != op::INQUIRY
            {
                return Err(Sense::new(
                    crate::sense::SenseKey::MEDIUM_ERROR,
                    Asc::SANITIZE_COMMAND_FAILED,
                )
                .into());
            }
        }
        self.dispatch(&cx, desc)
    }

    fn dispatch(self: &Arc<Self>, cx: &Cx<'_>, desc: &OpDesc) -> CmdResult {
        match desc.op {
            op::TEST_UNIT_READY => Ok(Reply::good()),
            op::REQUEST_SENSE => self.request_sense(cx),
            op::INQUIRY => self.inquiry(cx),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cx),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(cx),
            op::RESERVE_6 | op::RESERVE_10 => self.reserve6(cx),
            op::RELEASE_6 | op::RELEASE_10 => self.release6(cx),
            op::START_STOP_UNIT => self.start_stop(cx),
            op::PREVENT_ALLOW => self.prevent_allow(cx),
            op::READ_CAPACITY_10 => self.read_capacity10(cx),
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cx),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => self.write(cx),
            op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => self.write(cx),
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cx),
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => self.prefetch(cx),
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => self.sync_cache(cx),
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => self.read_defect_data(cx),
            op::LOG_SENSE => self.log_sense(cx),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cx),
            op::UNMAP => self.unmap(cx),
            op::SANITIZE => self.sanitize(cx),
            op::PERSISTENT_RESERVE_IN => self.pr_in(cx),
            op::PERSISTENT_RESERVE_OUT => self.pr_out(cx),
            op::EXTENDED_COPY => self.extended_copy(cx),
            op::RECEIVE_COPY_RESULTS => self.receive_copy_results(cx),
            op::COMPARE_AND_WRITE => self.compare_and_write(cx),
            op::ORWRITE_16 => self.orwrite(cx),
            op::WRITE_ATOMIC_16 => self.write(cx),
            op::SERVICE_ACTION_IN_16 => match cx.cdb.service_action() {
                op::SAI_READ_CAPACITY_16 => self.read_capacity16(cx),
                _ => self.get_lba_status(cx),
            },
            op::MAINTENANCE_IN => match cx.cdb.service_action() {
                op::MI_REPORT_TARGET_PORT_GROUPS => cx.tgt.report_target_port_groups(cx),
                op::MI_REPORT_SUPPORTED_OPCODES => self.report_supported_opcodes(cx),
                _ => self.report_supported_tmfs(cx),
            },
            op::MAINTENANCE_OUT => cx.tgt.set_target_port_groups(cx),
            _ => Err(Sense::invalid_opcode().into()),
        }
    }

    /// RESERVE(6) and persistent reservation conflicts for this command.
    fn check_conflict(&self, st: &LuState, cx: &Cx<'_>, desc: &OpDesc) -> Result<(), Failure> {
        let access = effective_access(desc, &cx.cdb);
        if access == Access::Exempt {
            return Ok(());
        }
        if let Some(holder) = &st.reserve6 {
            if *holder != cx.key {
                return Err(Failure::Conflict);
            }
        }
        if st.pr.conflicts(&cx.key, access) {
            return Err(Failure::Conflict);
        }
        Ok(())
    }

    /// NOT READY, SANITIZE IN PROGRESS with how far it got.
    pub(crate) fn sanitize_sense(&self) -> Sense {
        let done = self.sanitize_progress.load(Ordering::Relaxed).min(0xffff) as u16;
        Sense::not_ready(Asc::SANITIZE_IN_PROGRESS).with_progress(done)
    }

    /// Fails with DATA PROTECT if the LU may not be written.
    pub fn check_writable(&self) -> Result<(), Sense> {
        if self.cfg.read_only {
            return Err(Sense::data_protect(Asc::WRITE_PROTECTED));
        }
        if self.state.read().mode.swp {
            return Err(Sense::data_protect(Asc::SOFTWARE_WRITE_PROTECTED));
        }
        Ok(())
    }

    fn request_sense(&self, cx: &Cx<'_>) -> CmdResult {
        let desc = cx.cdb.u8(1) & 1 != 0;
        let alloc = cx.cdb.u8(4) as usize;
        let mut st = self.state.write();
        // A pending unit attention is reported (and cleared) as the sense
        // data; otherwise NO SENSE (SPC-4 6.39).
        let sense = match st.ua.get_mut(&cx.key).and_then(|q| q.pop_front()) {
            Some(asc) => Sense::unit_attention(asc),
            None if self.sanitizing.load(Ordering::Acquire) => self.sanitize_sense(),
            None => Sense::new(crate::sense::SenseKey::NO_SENSE, Asc::NO_ADDITIONAL_SENSE),
        };
        drop(st);
        Ok(Reply::data(trunc(sense.encode(desc), alloc)))
    }

    fn reserve6(&self, cx: &Cx<'_>) -> CmdResult {
        if cx.cdb.opcode() == op::RESERVE_10 && cx.cdb.u8(1) & 0x12 != 0 {
            // Third-party and LONGID reservations are not supported.
            return Err(Sense::invalid_cdb(1).into());
        }
        let mut st = self.state.write();
        if st.pr.has_registrations() {
            return Err(Failure::Conflict);
        }
        match &st.reserve6 {
            Some(h) if *h != cx.key => Err(Failure::Conflict),
            _ => {
                st.reserve6 = Some(cx.key.clone());
                Ok(Reply::good())
            }
        }
    }

    fn release6(&self, cx: &Cx<'_>) -> CmdResult {
        let mut st = self.state.write();
        if st.pr.has_registrations() {
            return Err(Failure::Conflict);
        }
        // Releasing someone else's reservation is a no-op (SPC-2 7.17).
        if st.reserve6.as_ref() == Some(&cx.key) {
            st.reserve6 = None;
        }
        Ok(Reply::good())
    }

    fn start_stop(&self, cx: &Cx<'_>) -> CmdResult {
        let b4 = cx.cdb.u8(4);
        let pc = b4 >> 4;
        let loej = b4 & 0x02 != 0;
        let start = b4 & 0x01 != 0;
        // A power condition other than START_VALID makes START and LOEJ
        // ignored (SBC-3 5.25); we have no power states to change.
        if pc != 0 || !loej || !self.cfg.removable {
            return Ok(Reply::good());
        }
        let mut st = self.state.write();
        // While any nexus prevents removal the tray stays as it is: neither
        // eject nor load (libiscsi PreventAllow.Eject expects both to fail).
        if !st.prevent.is_empty() {
            return Err(Sense::illegal_request(Asc::MEDIUM_REMOVAL_PREVENTED).into());
        }
        st.loaded = start;
        Ok(Reply::good())
    }

    fn prevent_allow(&self, cx: &Cx<'_>) -> CmdResult {
        let prevent = cx.cdb.u8(4) & 0x03;
        let mut st = self.state.write();
        match prevent {
            0 => {
                st.prevent.remove(&cx.key);
            }
            1 => {
                st.prevent.insert(cx.key.clone());
            }
            // Values 2 and 3 are obsolete for SBC devices.
            _ => return Err(Sense::invalid_cdb(4).into()),
        }
        Ok(Reply::good())
    }

    /// LOG SENSE: only the supported pages page (and its subpage list),
    /// so probing tools learn that no counters are kept.
    fn log_sense(&self, cx: &Cx<'_>) -> CmdResult {
        let page = cx.cdb.u8(2) & 0x3f;
        let sub = cx.cdb.u8(3);
        let alloc = cx.cdb.be16(7) as usize;
        let data = match (page, sub) {
            (0x00, 0x00) => vec![0x00, 0x00, 0x00, 0x01, 0x00],
            (0x00, 0xff) => vec![0x40, 0xff, 0x00, 0x04, 0x00, 0x00, 0x00, 0xff],
            _ => return Err(Sense::invalid_cdb(2).into()),
        };
        Ok(Reply::data(trunc(data, alloc)))
    }

    fn read_defect_data(&self, cx: &Cx<'_>) -> CmdResult {
        // No defects: a header with the requested format and an empty list.
        let alloc;
        let data = if cx.cdb.opcode() == op::READ_DEFECT_DATA_10 {
            alloc = cx.cdb.be16(7) as usize;
            vec![0, cx.cdb.u8(2) & 0x1f, 0, 0]
        } else {
            alloc = cx.cdb.be32(6) as usize;
            vec![0, cx.cdb.u8(1) & 0x1f, 0, 0, 0, 0, 0, 0]
        };
        Ok(Reply::data(trunc(data, alloc)))
    }

    // ---- events from the target ----

    /// Reset side effects (SAM-5 6.3.3): RESERVE(6) and PREVENT are
    /// released and every known nexus except `issuer` (if given) gets the
    /// unit attention `asc`. Persistent reservations and mode pages stay.
    pub fn reset(&self, issuer: Option<&NexusKey>, asc: Asc) {
        let mut st = self.state.write();
        st.reserve6 = None;
        st.prevent.clear();
        st.add_ua_all(asc, issuer);
    }

    pub fn nexus_loss(&self, key: &NexusKey) {
        let mut st = self.state.write();
        if st.reserve6.as_ref() == Some(key) {
            st.reserve6 = None;
        }
        st.prevent.remove(key);
        st.copies.retain(|(k, _), _| k != key);
        if st.seen.contains(key) {
            // The next session of this initiator port learns of the loss.
            // A pending reset/power-on UA (29h) says more than the loss
            // itself and is kept instead; everything else is superseded.
            let q = st.ua.entry(key.clone()).or_default();
            let reset = q.iter().copied().find(|a| a.asc() == 0x29);
            q.clear();
            q.push_back(reset.unwrap_or(Asc::I_T_NEXUS_LOSS));
            st.lost.retain(|k| k != key);
            st.lost.push_back(key.clone());
            while st.lost.len() > MAX_LOST_NEXUSES {
                if let Some(old) = st.lost.pop_front() {
                    st.seen.remove(&old);
                    st.ua.remove(&old);
                }
            }
        }
    }
}

/// The access class after looking at the fields that change it.
fn effective_access(desc: &OpDesc, cdb: &Cdb<'_>) -> Access {
    match desc.op {
        // START with START=1 and PREVENT=0 are allowed (SBC-3 table 13).
        op::START_STOP_UNIT if cdb.u8(4) & 0x01 != 0 => Access::Status,
        op::PREVENT_ALLOW if cdb.u8(4) & 0x03 == 0 => Access::Status,
        _ => desc.access,
    }
}

/// Map a device error to sense.
pub(crate) fn dev_sense(e: DevError) -> Sense {
    match e {
        DevError::Io(_) => Sense::medium_error(Asc::WRITE_ERROR),
        DevError::Checksum { lba } => {
            Sense::medium_error(Asc::UNRECOVERED_READ_ERROR).with_info(lba)
        }
        DevError::NoSpace => Sense::data_protect(Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        DevError::ReadOnly => Sense::data_protect(Asc::WRITE_PROTECTED),
    }
}
