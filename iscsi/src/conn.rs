//! One iSCSI connection, target side, sans-IO (STYLE.md 1): bytes and `now`
//! in through [`Connection::handle_input`] / [`Connection::handle_timeout`],
//! [`Event`]s and [`Transmit`]s out through [`Connection::poll_event`] /
//! [`Connection::poll_transmit`]; the driver answers commands with
//! [`Connection::complete`] and task management with
//! [`Connection::complete_tmf`].
//!
//! Sessions have exactly one connection (MaxConnections=1, ErrorRecoveryLevel
//! 0), so the session's command numbering lives here.
//!
//! Invariants:
//! - Non-immediate requests are executed in CmdSN order; a CmdSN outside
//!   [ExpCmdSN, MaxCmdSN] is dropped silently (RFC 7143 3.2.2.1). MaxCmdSN
//!   never decreases: it is ExpCmdSN + (window - commands in flight) - 1.
//! - A SCSI command reaches the driver only once all its Data-Out is in; a
//!   Data-Out with a wrong DataSN, offset, TTT or length fails the command
//!   with CHECK CONDITION and later PDUs for it are ignored.
//! - Memory per connection is bounded: one PDU of at most our declared
//!   MaxRecvDataSegmentLength in the decoder, at most `queue_depth` queued
//!   commands, write buffers only grow with data we solicited or allowed
//!   unsolicited (FirstBurstLength), R2Ts wait when `max_gather_bytes` is
//!   reached, text requests at most 8192 bytes.
//! - No input panics; protocol errors become a Reject or a Close event.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::login::{LoginInfo, LoginMachine, LoginStatus, Output, SessionType, TargetDirectory};
use crate::msg::*;
use crate::params::{SessionParams, TargetParams};
use crate::pdu::{decode, Bhs, DecodeError, Digests, Opcode, Pdu, Transmit};
use crate::text::{TextAccumulator, TextPairs};

/// What the connection needs from its embedder.
#[derive(Clone)]
pub struct ConnectionConfig {
    pub params: TargetParams,
    /// Target portal group tag of the portal this connection came in on.
    pub tpgt: u16,
    pub directory: Arc<dyn TargetDirectory>,
}

/// A SCSI command with all of its Data-Out gathered.
#[derive(Debug, Clone)]
pub struct Command {
    pub itt: u32,
    /// The 8-byte LUN field as sent (SAM encoding); see [`lun_id`].
    pub lun: u64,
    pub cdb: Bytes,
    pub attr: TaskAttr,
    pub data_out: Bytes,
    /// Data-In the initiator can take (EDTL for reads, the bidirectional
    /// read length for bidirectional commands, 0 otherwise).
    pub expected_in_len: u32,
    /// ExpectedDataTransferLength for writes, 0 otherwise.
    pub expected_out_len: u32,
    pub cmdsn: u32,
    pub immediate: bool,
}

/// The referenced task's state when an ABORT TASK arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferencedTask {
    /// The function does not reference a task.
    None,
    /// It was still gathering Data-Out: the connection discarded it.
    AbortedWhileGathering,
    /// It was queued for the driver but not taken yet: the connection
    /// removed it, the SCSI layer never saw it.
    AbortedBeforeExecution,
    /// It was handed to the driver and not completed yet.
    Delivered,
    /// No such task on this connection.
    Unknown,
}

/// A Task Management Function request; answer with [`Connection::complete_tmf`].
#[derive(Debug, Clone)]
pub struct TaskMgmt {
    pub itt: u32,
    pub function: TmfFunction,
    pub lun: u64,
    pub referenced_itt: u32,
    pub ref_cmdsn: u32,
    pub referenced: ReferencedTask,
    /// Tasks this connection discarded because of the function (still
    /// gathering data); they will get no response.
    pub aborted_itts: Vec<u32>,
}

/// Why a connection is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The initiator logged out (`session` true when it closed the session).
    Logout {
        session: bool,
    },
    LoginFailed(LoginStatus),
    LoginTimeout,
    NopTimeout,
    /// TARGET COLD RESET was answered.
    ColdReset,
    HeaderDigest,
    ProtocolError(&'static str),
    /// [`Connection::close`] was called.
    Requested,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Login finished; the connection is in full-feature phase.
    LoggedIn(Box<LoginInfo>),
    Command(Command),
    TaskMgmt(TaskMgmt),
    /// Close the socket (after writing whatever poll_transmit returned).
    Close(CloseReason),
}

/// A command's outcome from the SCSI layer.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub status: u8,
    /// Sense bytes; non-empty means a separate SCSI Response carries them.
    pub sense: Bytes,
    /// Data-In; truncated to what the initiator expects, the rest is reported
    /// as an overflow residual.
    pub data_in: Bytes,
    /// Bytes the command itself (its CDB) would transfer, when it differs
    /// from what the transport can infer (writes whose CDB length differs from
    /// EDTL). None: Data-In length for reads, EDTL for writes.
    pub transfer_len: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    #[error("no outstanding task with ITT {0:#x}")]
    UnknownTask(u32),
    #[error("the connection is not in full-feature phase")]
    NotInFullFeature,
}

/// SCSI status GOOD / CHECK CONDITION (the only statuses the transport makes up).
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;

/// Fixed-format sense for transport-detected errors (RFC 7143 11.4.7.2).
pub fn transport_sense(key: u8, asc: u8, ascq: u8) -> Bytes {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Bytes::from(s)
}

const ABORTED_COMMAND: u8 = 0x0b;
const ILLEGAL_REQUEST: u8 = 0x05;

/// The peripheral/flat LUN number from the 8-byte SAM LUN field.
pub fn lun_id(raw: u64) -> u64 {
    let b0 = (raw >> 56) as u8;
    let b1 = (raw >> 48) as u8;
    match b0 >> 6 {
        // Peripheral device addressing: bus 0, LUN in byte 1.
        0 => b1 as u64,
        // Flat space addressing: 14 bits.
        1 => ((b0 as u64 & 0x3f) << 8) | b1 as u64,
        _ => raw,
    }
}

/// The SAM LUN field for a LUN number (peripheral below 256, flat above).
pub fn lun_field(id: u64) -> u64 {
    if id < 256 {
        id << 48
    } else {
        (0x4000 | (id & 0x3fff)) << 48
    }
}

#[derive(Debug)]
struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    next_offset: u32,
    next_datasn: u32,
}

#[derive(Debug)]
struct WriteTask {
    cmd: Command,
    buf: Vec<u8>,
    received: u32,
    /// Unsolicited Data-Out sequence state.
    unsol_open: bool,
    unsol_end: u32,
    unsol_next: u32,
    unsol_datasn: u32,
    /// First offset not yet requested by an R2T.
    next_r2t_offset: u32,
    r2ts: Vec<R2tState>,
    r2tsn: u32,
    /// Bytes counted against `max_gather_bytes` for this task.
    reserved: usize,
}

#[derive(Debug, Clone, Copy)]
struct TaskInfo {
    lun: u64,
    read: bool,
    write: bool,
    edtl: u32,
    expected_in_len: u32,
    immediate: bool,
    /// R2Ts sent for the command: the response's ExpDataSN for a write.
    r2ts_sent: u32,
}

/// A text response too long for one PDU, handed out as the initiator asks.
struct TextContinuation {
    ttt: u32,
    itt: u32,
    rest: Bytes,
}

enum Phase {
    Login(Box<LoginMachine>),
    FullFeature,
    Closed,
}

pub struct Connection {
    cfg: ConnectionConfig,
    phase: Phase,
    info: Option<Box<LoginInfo>>,
    session: SessionParams,
    digests: Digests,
    rng: StdRng,
    statsn: u32,
    exp_cmdsn: u32,
    /// Non-immediate SCSI commands admitted and not completed (window accounting).
    in_flight: u32,
    /// Out-of-order requests waiting for the CmdSN gap to close.
    pending: HashMap<u32, Pdu>,
    writes: HashMap<u32, WriteTask>,
    delivered: HashMap<u32, TaskInfo>,
    /// ITTs waiting for gather budget before more R2Ts go out.
    r2t_waiting: VecDeque<u32>,
    gather_bytes: usize,
    r2ts_out: usize,
    next_ttt: u32,
    text_acc: TextAccumulator,
    text_cont: Option<TextContinuation>,
    /// The TTT we gave a Text request sent with the Continue bit.
    text_req_ttt: Option<u32>,
    tmf_pending: HashMap<u32, TmfFunction>,
    events: VecDeque<Event>,
    transmits: VecDeque<Transmit>,
    closing: Option<CloseReason>,
    close_emitted: bool,
    /// InitiatorName and TargetName of the login, once sent.
    login_names: (Option<String>, Option<String>),
    started: Instant,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
}

/// Serial-number "a < b" (RFC 1982, 32 bits).
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

impl Connection {
    pub fn new(cfg: ConnectionConfig, now: Instant) -> Connection {
        Self::with_rng(cfg, now, StdRng::from_entropy())
    }

    /// A connection with a deterministic random source (tests).
    pub fn with_seed(cfg: ConnectionConfig, now: Instant, seed: u64) -> Connection {
        Self::with_rng(cfg, now, StdRng::seed_from_u64(seed))
    }

    fn with_rng(cfg: ConnectionConfig, now: Instant, mut rng: StdRng) -> Connection {
        let login = LoginMachine::new(cfg.params.clone(), cfg.tpgt);
        let statsn = rng.next_u32();
        let next_ttt = rng.next_u32() & 0x7fff_ffff;
        Connection {
            cfg,
            phase: Phase::Login(Box::new(login)),
            info: None,
            session: SessionParams::rfc_defaults(),
            digests: Digests::default(),
            rng,
            statsn,
            exp_cmdsn: 0,
            in_flight: 0,
            pending: HashMap::new(),
            writes: HashMap::new(),
            delivered: HashMap::new(),
            r2t_waiting: VecDeque::new(),
            gather_bytes: 0,
            r2ts_out: 0,
            next_ttt,
            text_acc: TextAccumulator::default(),
            text_cont: None,
            text_req_ttt: None,
            tmf_pending: HashMap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            closing: None,
            close_emitted: false,
            login_names: (None, None),
            started: now,
            last_rx: now,
            ping: None,
        }
    }

    /// The login result, once in full-feature phase.
    pub fn login_info(&self) -> Option<&LoginInfo> {
        self.info.as_deref()
    }

    /// InitiatorName and TargetName the initiator sent at login, also after a
    /// failed login (for the log line that explains it).
    pub fn login_names(&self) -> (Option<&str>, Option<&str>) {
        (self.login_names.0.as_deref(), self.login_names.1.as_deref())
    }

    pub fn is_closed(&self) -> bool {
        self.closing.is_some()
    }

    /// Commands handed out and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.delivered.len()
    }

    /// Ends the connection (e.g. session reinstatement by another login).
    pub fn close(&mut self, reason: CloseReason) {
        self.set_closing(reason);
    }

    fn set_closing(&mut self, reason: CloseReason) {
        if self.closing.is_none() {
            self.closing = Some(reason);
            self.phase = Phase::Closed;
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if !self.close_emitted && self.transmits.is_empty() {
            if let Some(r) = &self.closing {
                self.close_emitted = true;
                return Some(Event::Close(r.clone()));
            }
        }
        None
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Connection::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            Phase::Login(_) => Some(self.started + self.cfg.params.login_timeout),
            Phase::FullFeature => match self.ping {
                Some((_, sent)) => Some(sent + self.cfg.params.nop_in_timeout),
                None => self.cfg.params.nop_in_interval.map(|i| self.last_rx + i),
            },
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::Login(_) => {
                if now >= self.started + self.cfg.params.login_timeout {
                    self.set_closing(CloseReason::LoginTimeout);
                }
            }
            Phase::FullFeature => match self.ping {
                Some((_, sent)) => {
                    if now >= sent + self.cfg.params.nop_in_timeout {
                        self.set_closing(CloseReason::NopTimeout);
                    }
                }
                None => {
                    if let Some(i) = self.cfg.params.nop_in_interval {
                        if now >= self.last_rx + i {
                            let ttt = self.alloc_ttt();
                            self.ping = Some((ttt, now));
                            let nop = NopIn {
                                lun: 0,
                                itt: RESERVED_TAG,
                                ttt,
                                // A ping does not consume a StatSN.
                                statsn: self.statsn,
                                exp_cmdsn: self.exp_cmdsn,
                                max_cmdsn: self.max_cmdsn(),
                                data: Bytes::new(),
                            };
                            self.send(nop.to_pdu());
                        }
                    }
                }
            },
        }
    }

    /// Asks the initiator to log out within `secs` seconds (Async Message 1).
    pub fn request_logout(&mut self, secs: u16) {
        if !matches!(self.phase, Phase::FullFeature) {
            return;
        }
        let m = AsyncMsg {
            lun: 0,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
            event: async_event::LOGOUT_REQUEST,
            param3: secs,
            ..AsyncMsg::default()
        };
        self.send(m.to_pdu());
    }

    fn max_rx_data(&self) -> usize {
        match self.phase {
            Phase::FullFeature => self.session.target_mrdsl as usize,
            _ => crate::text::MAX_TEXT,
        }
    }

    /// Consumes whole PDUs from `buf`; a partial PDU stays in it.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        while self.closing.is_none() {
            match decode(buf, self.digests, self.max_rx_data()) {
                Ok(None) => break,
                Ok(Some(pdu)) => {
                    self.last_rx = now;
                    self.on_pdu(pdu);
                }
                Err(DecodeError::HeaderDigest) => self.set_closing(CloseReason::HeaderDigest),
                Err(DecodeError::TooLong { .. }) => self.set_closing(CloseReason::ProtocolError(
                    "data segment longer than MaxRecvDataSegmentLength",
                )),
                Err(DecodeError::DataDigest(bhs)) => {
                    self.last_rx = now;
                    self.reject(&bhs, RejectReason::DATA_DIGEST_ERROR);
                }
            }
        }
        if self.closing.is_some() {
            // Nothing after a fatal error or a logout is meaningful.
            buf.clear();
        }
    }

    fn send(&mut self, pdu: Pdu) {
        let t = pdu.encode(self.digests);
        self.transmits.push_back(t);
    }

    fn next_statsn(&mut self) -> u32 {
        let s = self.statsn;
        self.statsn = s.wrapping_add(1);
        s
    }

    fn max_cmdsn(&self) -> u32 {
        let window = self
            .cfg
            .params
            .queue_depth
            .max(1)
            .saturating_sub(self.in_flight);
        self.exp_cmdsn.wrapping_add(window).wrapping_sub(1)
    }

    fn alloc_ttt(&mut self) -> u32 {
        loop {
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt != RESERVED_TAG {
                return self.next_ttt;
            }
        }
    }

    fn reject(&mut self, bhs: &Bhs, reason: RejectReason) {
        let r = RejectPdu {
            reason,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
            datasn: 0,
            header: Bytes::copy_from_slice(&bhs.0),
        };
        self.send(r.to_pdu());
    }

    fn on_pdu(&mut self, pdu: Pdu) {
        match &mut self.phase {
            Phase::Closed => {}
            Phase::Login(_) => self.on_login_pdu(pdu),
            Phase::FullFeature => self.on_ffp_pdu(pdu),
        }
    }

    // ---- login ----------------------------------------------------------

    fn on_login_pdu(&mut self, pdu: Pdu) {
        if pdu.bhs.opcode() != Opcode::LOGIN_REQ {
            self.set_closing(CloseReason::ProtocolError("non-login PDU during login"));
            return;
        }
        let req = LoginReq::parse(&pdu);
        let Phase::Login(machine) = &mut self.phase else {
            return;
        };
        let out = machine.on_request(&req, self.cfg.directory.as_ref(), &mut self.rng);
        let (isid, tsih) = machine.ids();
        self.login_names = machine.names.clone();
        // The login's CmdSN is the session's first ExpCmdSN (login PDUs are immediate).
        self.exp_cmdsn = req.cmdsn;
        let mut resp = LoginResp {
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            csg: req.csg,
            ..LoginResp::default()
        };
        match out {
            Output::Continue(reply) => {
                resp.transit = reply.transit;
                resp.csg = reply.csg;
                resp.nsg = reply.nsg;
                resp.tsih = reply.tsih;
                resp.data = reply.keys.encode();
                self.finish_login_resp(resp);
            }
            Output::Failed(st) => {
                resp.isid = isid;
                resp.tsih = tsih;
                resp.status_class = st.0;
                resp.status_detail = st.1;
                self.finish_login_resp(resp);
                self.set_closing(CloseReason::LoginFailed(st));
            }
            Output::Done(reply, info) => {
                resp.transit = true;
                resp.csg = reply.csg;
                resp.nsg = reply.nsg;
                resp.tsih = info.tsih;
                resp.data = reply.keys.encode();
                self.session = info.params.clone();
                self.finish_login_resp(resp);
                // Digests start with the first PDU after the final login response.
                self.digests = Digests {
                    header: self.session.header_digest,
                    data: self.session.data_digest,
                };
                self.phase = Phase::FullFeature;
                self.info = Some(info.clone());
                self.events.push_back(Event::LoggedIn(info));
            }
        }
    }

    fn finish_login_resp(&mut self, mut resp: LoginResp) {
        resp.statsn = self.next_statsn();
        resp.exp_cmdsn = self.exp_cmdsn;
        resp.max_cmdsn = self.max_cmdsn();
        self.send(resp.to_pdu());
    }

    // ---- full-feature phase dispatch --------------------------------------

    fn on_ffp_pdu(&mut self, pdu: Pdu) {
        let op = pdu.bhs.opcode();
        match op {
            Opcode::DATA_OUT => self.on_data_out(&pdu),
            // The answer to our ping (cleared below); it carries no CmdSN of its own.
            Opcode::NOP_OUT if pdu.bhs.itt() == RESERVED_TAG => {}
            Opcode::NOP_OUT
            | Opcode::SCSI_COMMAND
            | Opcode::TASK_MGMT_REQ
            | Opcode::TEXT_REQ
            | Opcode::LOGOUT_REQ => self.admit(pdu),
            Opcode::SNACK_REQ => self.reject(&pdu.bhs, RejectReason::SNACK_REJECT),
            Opcode::LOGIN_REQ => self.reject(&pdu.bhs, RejectReason::PROTOCOL_ERROR),
            o if o.name().is_some() => self.reject(&pdu.bhs, RejectReason::PROTOCOL_ERROR),
            _ => self.reject(&pdu.bhs, RejectReason::COMMAND_NOT_SUPPORTED),
        }
        // Any received PDU proves the initiator alive, not only the answer to
        // the ping: an initiator busy sending data must not be dropped.
        self.ping = None;
    }

    /// CmdSN ordering (RFC 7143 3.2.2.1).
    fn admit(&mut self, pdu: Pdu) {
        if pdu.bhs.immediate() {
            self.execute(pdu);
            return;
        }
        let cmdsn = pdu.bhs.u32(24);
        let window = self
            .cfg
            .params
            .queue_depth
            .max(1)
            .saturating_sub(self.in_flight);
        if cmdsn.wrapping_sub(self.exp_cmdsn) >= window {
            // Outside [ExpCmdSN, MaxCmdSN]: silently ignored.
            return;
        }
        if cmdsn != self.exp_cmdsn {
            self.pending.entry(cmdsn).or_insert(pdu);
            return;
        }
        self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
        self.execute(pdu);
        while let Some(p) = self.pending.remove(&self.exp_cmdsn) {
            if self.closing.is_some() {
                break;
            }
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
            self.execute(p);
        }
    }

    fn execute(&mut self, pdu: Pdu) {
        if self.closing.is_some() {
            return;
        }
        match pdu.bhs.opcode() {
            Opcode::SCSI_COMMAND => self.on_scsi_command(&pdu),
            Opcode::TASK_MGMT_REQ => self.on_tmf(&pdu),
            Opcode::TEXT_REQ => self.on_text(&pdu),
            Opcode::LOGOUT_REQ => self.on_logout(&pdu),
            Opcode::NOP_OUT => self.on_nop_out(&pdu),
            _ => {}
        }
    }

    // ---- SCSI commands and Data-Out ----------------------------------------

    fn on_scsi_command(&mut self, pdu: &Pdu) {
        let req = match ScsiCommandReq::parse(pdu) {
            Ok(r) => r,
            Err(BadPdu(reason)) => {
                self.reject(&pdu.bhs, reason);
                return;
            }
        };
        if req.itt == RESERVED_TAG {
            self.reject(&pdu.bhs, RejectReason::INVALID_PDU_FIELD);
            return;
        }
        if self.writes.contains_key(&req.itt) || self.delivered.contains_key(&req.itt) {
            self.reject(&pdu.bhs, RejectReason::TASK_IN_PROGRESS);
            return;
        }
        // Immediate commands bypass the CmdSN window, so bound them here.
        let limit = 2 * self.cfg.params.queue_depth.max(1) as usize;
        if req.immediate && self.writes.len() + self.delivered.len() >= limit {
            self.reject(&pdu.bhs, RejectReason::IMMEDIATE_COMMAND_REJECT);
            return;
        }
        let expected_in_len = match (req.read, req.write) {
            (true, true) => req.bidi_read_len.unwrap_or(0),
            (true, false) => req.edtl,
            _ => 0,
        };
        let cmd = Command {
            itt: req.itt,
            lun: req.lun,
            cdb: req.cdb.clone(),
            attr: req.attr,
            data_out: Bytes::new(),
            expected_in_len,
            expected_out_len: if req.write { req.edtl } else { 0 },
            cmdsn: req.cmdsn,
            immediate: req.immediate,
        };
        let info = TaskInfo {
            lun: req.lun,
            read: req.read,
            write: req.write,
            edtl: req.edtl,
            expected_in_len,
            immediate: req.immediate,
            r2ts_sent: 0,
        };
        if !req.immediate {
            self.in_flight += 1;
        }
        let dlen = req.data.len() as u32;
        if !req.write {
            if dlen > 0 {
                return self.fail_early(
                    info,
                    req.itt,
                    transport_sense(ABORTED_COMMAND, 0x0c, 0x0c),
                );
            }
            self.deliver(cmd, info);
            return;
        }
        if req.edtl > self.cfg.params.max_command_data {
            return self.fail_early(info, req.itt, transport_sense(ILLEGAL_REQUEST, 0x24, 0x00));
        }
        let s = &self.session;
        if dlen > 0 && (!s.immediate_data || dlen > s.first_burst_length || dlen > req.edtl) {
            // Unexpected unsolicited data (RFC 7143 11.4.7.2).
            return self.fail_early(info, req.itt, transport_sense(ABORTED_COMMAND, 0x0c, 0x0c));
        }
        if dlen == req.edtl {
            // Everything came as immediate data: hand the PDU's bytes over
            // without gathering or copying.
            let mut cmd = cmd;
            cmd.data_out = req.data.clone();
            self.deliver(cmd, info);
            return;
        }
        let unsol_end = s.first_burst_length.min(req.edtl);
        let unsol_open = !s.initial_r2t && !req.final_ && dlen < unsol_end;
        let reserved = if unsol_open { unsol_end } else { dlen } as usize;
        let mut task = WriteTask {
            cmd,
            buf: Vec::new(),
            received: 0,
            unsol_open,
            unsol_end,
            unsol_next: dlen,
            unsol_datasn: 0,
            next_r2t_offset: dlen,
            r2ts: Vec::new(),
            r2tsn: 0,
            reserved,
        };
        self.gather_bytes += reserved;
        if dlen > 0 {
            task.buf.extend_from_slice(&req.data);
            task.received = dlen;
        }
        self.writes.insert(req.itt, task);
        self.after_write_progress(req.itt);
    }

    /// A command that fails before it was ever tracked as gathering.
    fn fail_early(&mut self, info: TaskInfo, itt: u32, sense: Bytes) {
        self.delivered.insert(itt, info);
        self.respond_failed(itt, sense);
    }

    fn respond_failed(&mut self, itt: u32, sense: Bytes) {
        let _ = self.complete(
            itt,
            Completion {
                status: CHECK_CONDITION,
                sense,
                data_in: Bytes::new(),
                transfer_len: Some(0),
            },
        );
    }

    /// Fails a gathering write; later Data-Out for it is ignored.
    fn fail_write(&mut self, itt: u32, sense: Bytes) {
        if let Some(task) = self.remove_write(itt) {
            let info = task_info(&task);
            self.delivered.insert(itt, info);
            self.respond_failed(itt, sense);
        }
    }

    /// Discards a gathering write for a task management function: it gets no
    /// response and leaves the CmdSN window now.
    fn abort_write(&mut self, itt: u32) -> bool {
        match self.remove_write(itt) {
            Some(t) => {
                if !t.cmd.immediate {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    fn remove_write(&mut self, itt: u32) -> Option<WriteTask> {
        let task = self.writes.remove(&itt)?;
        self.gather_bytes = self.gather_bytes.saturating_sub(task.reserved);
        self.r2ts_out = self.r2ts_out.saturating_sub(task.r2ts.len());
        self.r2t_waiting.retain(|i| *i != itt);
        self.kick_waiting();
        Some(task)
    }

    fn deliver(&mut self, cmd: Command, info: TaskInfo) {
        self.delivered.insert(cmd.itt, info);
        self.events.push_back(Event::Command(cmd));
    }

    /// After data arrived or the task was created: deliver when complete,
    /// otherwise solicit more.
    fn after_write_progress(&mut self, itt: u32) {
        let Some(task) = self.writes.get(&itt) else {
            return;
        };
        if task.received >= task.cmd.expected_out_len {
            if let Some(mut task) = self.remove_write(itt) {
                let info = task_info(&task);
                task.cmd.data_out = Bytes::from(std::mem::take(&mut task.buf));
                self.deliver(task.cmd, info);
            }
            return;
        }
        if !task.unsol_open {
            self.issue_r2ts(itt);
        }
    }

    fn issue_r2ts(&mut self, itt: u32) {
        let max_out = self.session.max_outstanding_r2t.max(1) as usize;
        let burst = self.session.max_burst_length.max(512);
        loop {
            let Some(task) = self.writes.get(&itt) else {
                return;
            };
            let edtl = task.cmd.expected_out_len;
            if task.r2ts.len() >= max_out || task.next_r2t_offset >= edtl {
                return;
            }
            let len = burst.min(edtl - task.next_r2t_offset);
            // Bounded gathering memory, but never stall when nothing else is soliciting.
            if self.gather_bytes + len as usize > self.cfg.params.max_gather_bytes
                && self.r2ts_out > 0
            {
                if !self.r2t_waiting.contains(&itt) {
                    self.r2t_waiting.push_back(itt);
                }
                return;
            }
            let ttt = self.alloc_ttt();
            let statsn = self.statsn;
            let exp_cmdsn = self.exp_cmdsn;
            let max_cmdsn = self.max_cmdsn();
            let Some(task) = self.writes.get_mut(&itt) else {
                return;
            };
            let r2t = R2t {
                lun: task.cmd.lun,
                itt,
                ttt,
                statsn,
                exp_cmdsn,
                max_cmdsn,
                r2tsn: task.r2tsn,
                offset: task.next_r2t_offset,
                desired_len: len,
            };
            task.r2ts.push(R2tState {
                ttt,
                offset: task.next_r2t_offset,
                len,
                next_offset: task.next_r2t_offset,
                next_datasn: 0,
            });
            task.r2tsn = task.r2tsn.wrapping_add(1);
            task.next_r2t_offset += len;
            task.reserved += len as usize;
            self.gather_bytes += len as usize;
            self.r2ts_out += 1;
            self.send(r2t.to_pdu());
        }
    }

    fn kick_waiting(&mut self) {
        let waiting: Vec<u32> = self.r2t_waiting.drain(..).collect();
        for itt in waiting {
            self.issue_r2ts(itt);
        }
    }

    fn on_data_out(&mut self, pdu: &Pdu) {
        let d = DataOut::parse(pdu);
        // Data for a task we failed, aborted or never saw is dropped silently.
        let Some(task) = self.writes.get_mut(&d.itt) else {
            return;
        };
        let len = d.data.len() as u32;
        let bad = || transport_sense(ABORTED_COMMAND, 0x4b, 0x00);
        let end = match d.offset.checked_add(len) {
            Some(e) if e <= task.cmd.expected_out_len => e,
            // Beyond EDTL: overflow is not allowed for Data-Out.
            _ => return self.fail_write(d.itt, transport_sense(ABORTED_COMMAND, 0x0c, 0x0d)),
        };
        if d.ttt == RESERVED_TAG {
            if !task.unsol_open {
                return self.fail_write(d.itt, transport_sense(ABORTED_COMMAND, 0x0c, 0x0c));
            }
            if d.datasn != task.unsol_datasn || d.offset != task.unsol_next || end > task.unsol_end
            {
                return self.fail_write(d.itt, bad());
            }
            task.unsol_datasn = task.unsol_datasn.wrapping_add(1);
            task.unsol_next = end;
            if d.final_ || end == task.unsol_end {
                task.unsol_open = false;
                task.next_r2t_offset = end;
                // What was reserved for unsolicited data but not sent is released.
                let unused = (task.unsol_end - end) as usize;
                task.reserved -= unused.min(task.reserved);
                self.gather_bytes = self.gather_bytes.saturating_sub(unused);
            }
        } else {
            let Some(pos) = task.r2ts.iter().position(|r| r.ttt == d.ttt) else {
                return self.fail_write(d.itt, bad());
            };
            let r = &mut task.r2ts[pos];
            if d.datasn != r.next_datasn || d.offset != r.next_offset || end > r.offset + r.len {
                return self.fail_write(d.itt, bad());
            }
            r.next_datasn = r.next_datasn.wrapping_add(1);
            r.next_offset = end;
            if end == r.offset + r.len {
                task.r2ts.remove(pos);
                self.r2ts_out = self.r2ts_out.saturating_sub(1);
            } else if d.final_ {
                // The sequence ended short of what the R2T asked for.
                return self.fail_write(d.itt, bad());
            }
        }
        let Some(task) = self.writes.get_mut(&d.itt) else {
            return;
        };
        let off = d.offset as usize;
        if task.buf.len() < end as usize {
            task.buf.resize(end as usize, 0);
        }
        task.buf[off..end as usize].copy_from_slice(&d.data);
        task.received += len;
        self.after_write_progress(d.itt);
        self.kick_waiting();
    }

    /// Sends the outcome of a command handed out as [`Event::Command`].
    pub fn complete(&mut self, itt: u32, c: Completion) -> Result<(), CompleteError> {
        if !matches!(self.phase, Phase::FullFeature) {
            // A closed connection swallows late completions.
            if self.closing.is_some() {
                self.delivered.remove(&itt);
                return Ok(());
            }
            return Err(CompleteError::NotInFullFeature);
        }
        let info = self
            .delivered
            .remove(&itt)
            .ok_or(CompleteError::UnknownTask(itt))?;
        if !info.immediate {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let full_len = c.data_in.len() as u32;
        let (basis, want) = if info.write && !info.read {
            (info.edtl, c.transfer_len.unwrap_or(info.edtl))
        } else if info.read {
            (info.expected_in_len, c.transfer_len.unwrap_or(full_len))
        } else {
            (info.edtl, c.transfer_len.unwrap_or(full_len))
        };
        let (overflow, underflow, residual) = if want > basis {
            (true, false, want - basis)
        } else if want < basis {
            (false, true, basis - want)
        } else {
            (false, false, 0)
        };
        let data = if info.read {
            c.data_in
                .slice(..(c.data_in.len()).min(info.expected_in_len as usize))
        } else {
            Bytes::new()
        };
        let collapse = c.status == GOOD && c.sense.is_empty() && !data.is_empty() && !info.write;
        let seg = self.session.initiator_mrdsl.max(512) as usize;
        let burst = self.session.max_burst_length.max(512) as usize;
        let mut datasn = 0u32;
        let mut off = 0usize;
        while off < data.len() {
            // A Data-In sequence ends (F bit) at each MaxBurstLength boundary.
            let burst_end = (off / burst + 1) * burst;
            let end = (off + seg).min(data.len()).min(burst_end);
            let last = end == data.len();
            let with_status = last && collapse;
            let statsn = if with_status { self.next_statsn() } else { 0 };
            let di = DataIn {
                final_: last || end == burst_end,
                ack: false,
                overflow: with_status && overflow,
                underflow: with_status && underflow,
                has_status: with_status,
                status: if with_status { c.status } else { 0 },
                lun: info.lun,
                itt,
                ttt: RESERVED_TAG,
                statsn,
                exp_cmdsn: self.exp_cmdsn,
                max_cmdsn: self.max_cmdsn(),
                datasn,
                offset: off as u32,
                residual: if with_status { residual } else { 0 },
                data: data.slice(off..end),
            };
            self.send(di.to_pdu());
            datasn = datasn.wrapping_add(1);
            off = end;
        }
        if !collapse {
            let r = ScsiResponsePdu {
                overflow,
                underflow,
                response: 0,
                status: c.status,
                itt,
                statsn: self.next_statsn(),
                exp_cmdsn: self.exp_cmdsn,
                max_cmdsn: self.max_cmdsn(),
                // Data-In PDUs for a read, R2Ts for a write (RFC 7143 11.4.8).
                exp_datasn: if info.read { datasn } else { info.r2ts_sent },
                residual,
                sense: c.sense,
                ..ScsiResponsePdu::default()
            };
            self.send(r.to_pdu());
        }
        // A freed window slot may let queued commands in.
        Ok(())
    }

    // ---- task management ----------------------------------------------------

    fn on_tmf(&mut self, pdu: &Pdu) {
        let req = TmfReq::parse(pdu);
        let mut referenced = ReferencedTask::None;
        let mut aborted = Vec::new();
        match req.function {
            TmfFunction::ABORT_TASK => {
                let rtt = req.referenced_itt;
                if self.abort_write(rtt) {
                    referenced = ReferencedTask::AbortedWhileGathering;
                    aborted.push(rtt);
                } else if !self.abort_queued(|c| c.itt == rtt).is_empty() {
                    referenced = ReferencedTask::AbortedBeforeExecution;
                    aborted.push(rtt);
                } else if self.delivered.contains_key(&req.referenced_itt) {
                    referenced = ReferencedTask::Delivered;
                } else {
                    referenced = ReferencedTask::Unknown;
                }
            }
            TmfFunction::ABORT_TASK_SET
            | TmfFunction::CLEAR_TASK_SET
            | TmfFunction::LOGICAL_UNIT_RESET => {
                let itts: Vec<u32> = self
                    .writes
                    .iter()
                    .filter(|(_, t)| t.cmd.lun == req.lun)
                    .map(|(i, _)| *i)
                    .collect();
                for i in itts {
                    self.abort_write(i);
                    aborted.push(i);
                }
                let lun = req.lun;
                aborted.extend(self.abort_queued(|c| c.lun == lun));
            }
            TmfFunction::TARGET_WARM_RESET | TmfFunction::TARGET_COLD_RESET => {
                let itts: Vec<u32> = self.writes.keys().copied().collect();
                for i in itts {
                    self.abort_write(i);
                    aborted.push(i);
                }
                aborted.extend(self.abort_queued(|_| true));
            }
            TmfFunction::CLEAR_ACA => {}
            TmfFunction::TASK_REASSIGN => {
                return self.send_tmf_resp(req.itt, TmfResponse::REASSIGNMENT_NOT_SUPPORTED);
            }
            _ => return self.send_tmf_resp(req.itt, TmfResponse::REJECTED),
        }
        self.tmf_pending.insert(req.itt, req.function);
        self.events.push_back(Event::TaskMgmt(TaskMgmt {
            itt: req.itt,
            function: req.function,
            lun: req.lun,
            referenced_itt: req.referenced_itt,
            ref_cmdsn: req.ref_cmdsn,
            referenced,
            aborted_itts: aborted,
        }));
    }

    /// Drops Command events the driver has not taken yet: they are aborted
    /// before execution and get no response.
    fn abort_queued(&mut self, pred: impl Fn(&Command) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.events.len());
        for e in self.events.drain(..) {
            match e {
                Event::Command(c) if pred(&c) => out.push(c.itt),
                other => keep.push_back(other),
            }
        }
        self.events = keep;
        for itt in &out {
            self.forget(*itt);
        }
        out
    }

    /// Whether a command handed out is still waiting for [`Connection::complete`].
    pub fn is_outstanding(&self, itt: u32) -> bool {
        self.delivered.contains_key(&itt)
    }

    /// Answers a [`Event::TaskMgmt`]. After TARGET COLD RESET the connection closes.
    pub fn complete_tmf(&mut self, itt: u32, response: TmfResponse) -> Result<(), CompleteError> {
        if !matches!(self.phase, Phase::FullFeature) {
            return if self.closing.is_some() {
                Ok(())
            } else {
                Err(CompleteError::NotInFullFeature)
            };
        }
        let f = self
            .tmf_pending
            .remove(&itt)
            .ok_or(CompleteError::UnknownTask(itt))?;
        self.send_tmf_resp(itt, response);
        if f == TmfFunction::TARGET_COLD_RESET {
            self.set_closing(CloseReason::ColdReset);
        }
        Ok(())
    }

    /// Forgets a delivered command without answering it (the driver aborted
    /// it on behalf of a task management function).
    pub fn forget(&mut self, itt: u32) {
        if let Some(info) = self.delivered.remove(&itt) {
            if !info.immediate {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
        }
    }

    fn send_tmf_resp(&mut self, itt: u32, response: TmfResponse) {
        let r = TmfResp {
            response,
            itt,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
        };
        self.send(r.to_pdu());
    }

    // ---- NOP, Text, Logout ------------------------------------------------

    fn on_nop_out(&mut self, pdu: &Pdu) {
        let n = NopOut::parse(pdu);
        let keep = n.data.len().min(self.session.initiator_mrdsl as usize);
        let r = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
            data: n.data.slice(..keep),
        };
        self.send(r.to_pdu());
    }

    fn on_text(&mut self, pdu: &Pdu) {
        let req = TextReq::parse(pdu);
        if req.ttt == RESERVED_TAG {
            // A new request: whatever was half done is abandoned.
            self.text_cont = None;
            self.text_req_ttt = None;
            self.text_acc.take();
        } else if self.text_req_ttt != Some(req.ttt) {
            // The initiator asks for the next part of a long response.
            match self.text_cont.take() {
                Some(c) if c.ttt == req.ttt && c.itt == req.itt => {
                    self.send_text_part(req.itt, req.lun, c.rest);
                }
                _ => self.reject(&pdu.bhs, RejectReason::INVALID_PDU_FIELD),
            }
            return;
        }
        // Otherwise: the next part of a request sent with the Continue bit.
        if self.text_acc.push(&req.data).is_err() {
            self.text_acc.take();
            self.text_req_ttt = None;
            self.reject(&pdu.bhs, RejectReason::PROTOCOL_ERROR);
            return;
        }
        if req.cont {
            let ttt = self.alloc_ttt();
            self.text_req_ttt = Some(ttt);
            let r = TextResp {
                final_: false,
                cont: false,
                lun: req.lun,
                itt: req.itt,
                ttt,
                statsn: self.next_statsn(),
                exp_cmdsn: self.exp_cmdsn,
                max_cmdsn: self.max_cmdsn(),
                data: Bytes::new(),
            };
            self.send(r.to_pdu());
            return;
        }
        self.text_req_ttt = None;
        let data = self.text_acc.take();
        let keys = match TextPairs::parse(&data) {
            Ok(k) => k,
            Err(_) => {
                self.reject(&pdu.bhs, RejectReason::PROTOCOL_ERROR);
                return;
            }
        };
        let mut out = TextPairs::new();
        let initiator = self
            .info
            .as_ref()
            .map(|i| i.initiator_name.clone())
            .unwrap_or_default();
        for (k, v) in &keys.0 {
            match k.as_str() {
                "SendTargets" => {
                    let own = self
                        .info
                        .as_ref()
                        .and_then(|i| i.target_name.clone())
                        .unwrap_or_default();
                    let discovery =
                        self.info.as_ref().map(|i| i.session_type) == Some(SessionType::Discovery);
                    let which = if v.is_empty() && !discovery {
                        own.as_str()
                    } else {
                        v.as_str()
                    };
                    for (name, addrs) in self.cfg.directory.send_targets(&initiator, which) {
                        out.push("TargetName", name);
                        for a in addrs {
                            out.push("TargetAddress", a);
                        }
                    }
                }
                "MaxRecvDataSegmentLength" => match crate::text::parse_number(v) {
                    Some(n) if n >= 512 => {
                        self.session.initiator_mrdsl = n.min((1 << 24) - 1) as u32;
                        out.push(k.clone(), self.session.target_mrdsl.to_string());
                    }
                    _ => out.push(k.clone(), "Reject"),
                },
                _ => out.push(k.clone(), "NotUnderstood"),
            }
        }
        self.send_text_part(req.itt, req.lun, out.encode());
    }

    fn send_text_part(&mut self, itt: u32, lun: u64, data: Bytes) {
        let seg = self.session.initiator_mrdsl.max(512) as usize;
        let (now, rest) = if data.len() > seg {
            (data.slice(..seg), Some(data.slice(seg..)))
        } else {
            (data, None)
        };
        let ttt = match rest {
            Some(rest) => {
                let ttt = self.alloc_ttt();
                self.text_cont = Some(TextContinuation { ttt, itt, rest });
                ttt
            }
            None => RESERVED_TAG,
        };
        let r = TextResp {
            final_: ttt == RESERVED_TAG,
            cont: ttt != RESERVED_TAG,
            lun,
            itt,
            ttt,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
            data: now,
        };
        self.send(r.to_pdu());
    }

    fn on_logout(&mut self, pdu: &Pdu) {
        let req = LogoutReq::parse(pdu);
        let cid = self.info.as_ref().map(|i| i.cid).unwrap_or(0);
        let response = match req.reason {
            LogoutReason::CLOSE_SESSION => 0,
            LogoutReason::CLOSE_CONNECTION if req.cid == cid => 0,
            LogoutReason::CLOSE_CONNECTION => 1,
            LogoutReason::REMOVE_FOR_RECOVERY => 2,
            _ => {
                self.reject(&pdu.bhs, RejectReason::INVALID_PDU_FIELD);
                return;
            }
        };
        let r = LogoutResp {
            response,
            itt: req.itt,
            statsn: self.next_statsn(),
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn(),
            time2wait: 0,
            time2retain: 0,
        };
        self.send(r.to_pdu());
        if response == 0 {
            // With one connection per session, closing it ends the session too.
            self.set_closing(CloseReason::Logout {
                session: req.reason == LogoutReason::CLOSE_SESSION,
            });
        }
    }

    /// How long until the next timeout from `now` (for drivers without Instant sleeps).
    pub fn timeout_in(&self, now: Instant) -> Option<Duration> {
        self.poll_timeout()
            .map(|t| t.saturating_duration_since(now))
    }
}

fn task_info(t: &WriteTask) -> TaskInfo {
    TaskInfo {
        lun: t.cmd.lun,
        read: t.cmd.expected_in_len > 0,
        write: true,
        edtl: t.cmd.expected_out_len,
        expected_in_len: t.cmd.expected_in_len,
        immediate: t.cmd.immediate,
        r2ts_sent: t.r2tsn,
    }
}
