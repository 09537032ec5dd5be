//! The login phase (RFC 7143 6.3 and 11.12-13): security negotiation (None or
//! CHAP), operational negotiation, stage transitions, Continue handling.
//!
//! Each login state is its own type; `step` consumes it and returns the next
//! one or a failure status (STYLE.md 3). The machine only produces the keys
//! and flags of each response; the connection owns sequence numbers and
//! framing. Invariants: a failure ends the login (the connection sends the
//! response and closes); the final response (T=1, NSG=3) is only produced
//! after authentication succeeded when it was required; every request is
//! bounded by [`MAX_TEXT`] bytes after joining Continue PDUs.

use rand::rngs::StdRng;
use rand::RngCore;

use crate::chap::{constant_time_eq, ChapAlgorithm, ChapSecrets};
use crate::msg::{stage, LoginReq};
use crate::params::{Negotiation, SessionParams, TargetParams};
use crate::text::{decode_binary, encode_hex, TextAccumulator, TextPairs};

/// Result of looking up a target for an initiator.
#[derive(Debug, Clone)]
pub enum Lookup {
    NotFound,
    /// The initiator may not access this target.
    Forbidden,
    /// `chap` set: the initiator must authenticate with CHAP.
    Found {
        chap: Option<ChapSecrets>,
    },
}

/// Policy the embedding application supplies; called synchronously during
/// login and discovery.
pub trait TargetDirectory: Send + Sync {
    fn lookup(&self, target_name: &str, initiator: &str) -> Lookup;
    /// Targets `initiator` may see, each with its "addr:port,tpgt" portals.
    /// `which` is the SendTargets value: "All", a target name, or "" (the
    /// session's own target, passed in as its name by the connection).
    fn send_targets(&self, initiator: &str, which: &str) -> Vec<(String, Vec<String>)>;
    /// CHAP secrets required for discovery sessions, if any.
    fn discovery_chap(&self, _initiator: &str) -> Option<ChapSecrets> {
        None
    }
    /// A fresh, non-zero TSIH for a new session.
    fn allocate_tsih(&self) -> u16;
    /// The CID of the live connection of the session with this TSIH for the
    /// initiator port, or None when there is no such session. Asked when a
    /// login names a TSIH: the same CID is a connection reinstatement, another
    /// CID would be a second connection (we allow one per session).
    fn session_cid(&self, initiator: &str, isid: [u8; 6], tsih: u16) -> Option<u16>;
}

/// A small TSIH allocator for directories that have nothing better.
#[derive(Debug, Default)]
pub struct SessionIds {
    next: std::sync::atomic::AtomicU32,
}

impl SessionIds {
    pub fn allocate(&self) -> u16 {
        loop {
            let v = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u16;
            // 0 means "new session" on the wire and can never be assigned.
            if v != 0 {
                return v;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// Who logged in, to what, with which parameters.
#[derive(Debug, Clone)]
pub struct LoginInfo {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    /// The session's TSIH (allocated for a leading login).
    pub tsih: u16,
    /// Whether the initiator asked for a new session (TSIH 0 in its request).
    pub leading: bool,
    pub cid: u16,
    /// None for discovery sessions.
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub params: SessionParams,
    /// CmdSN of the login request: the session's first ExpCmdSN.
    pub initial_cmdsn: u32,
}

/// Login status class and detail (RFC 7143 11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus(pub u8, pub u8);

impl LoginStatus {
    pub const SUCCESS: LoginStatus = LoginStatus(0, 0);
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus(2, 0);
    pub const AUTH_FAILED: LoginStatus = LoginStatus(2, 1);
    pub const FORBIDDEN: LoginStatus = LoginStatus(2, 2);
    pub const NOT_FOUND: LoginStatus = LoginStatus(2, 3);
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus(2, 5);
    pub const TOO_MANY_CONNECTIONS: LoginStatus = LoginStatus(2, 6);
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus(2, 7);
    pub const SESSION_TYPE_UNSUPPORTED: LoginStatus = LoginStatus(2, 9);
    pub const SESSION_NOT_FOUND: LoginStatus = LoginStatus(2, 0x0a);
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus(2, 0x0b);
    pub const TARGET_ERROR: LoginStatus = LoginStatus(3, 0);
}

/// What the connection must put in the next Login Response.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    pub keys: TextPairs,
    pub tsih: u16,
}

pub(crate) enum Output {
    /// Send this response and keep going.
    Continue(Reply),
    /// Send this final response; the connection enters full-feature phase.
    Done(Reply, Box<LoginInfo>),
    /// Send a response with this status and close.
    Failed(LoginStatus),
}

/// Everything learned so far in this login.
struct Ctx {
    params: TargetParams,
    tpgt: u16,
    isid: [u8; 6],
    tsih: u16,
    /// TSIH 0 in the request: a new session.
    leading: bool,
    cid: u16,
    initial_cmdsn: u32,
    initiator: String,
    alias: Option<String>,
    target: Option<String>,
    session_type: SessionType,
    chap: Option<ChapSecrets>,
    neg: Negotiation,
    /// Set once a response went out: the TPGT goes in the first one only.
    responded: bool,
}

// ---- states -----------------------------------------------------------------

/// Waiting for the first (complete) Login Request.
struct Initial;
/// In the security stage; `authenticated` once CHAP succeeded or None was agreed.
struct Security {
    authenticated: bool,
}
/// Sent AuthMethod=CHAP; waiting for CHAP_A.
struct ChapAlgorithmWait;
/// Sent our challenge; waiting for CHAP_N/CHAP_R.
struct ChapResponseWait {
    alg: ChapAlgorithm,
    id: u8,
    challenge: Vec<u8>,
}
/// In the operational stage.
struct Operational;

enum State {
    Initial(Initial),
    Security(Security),
    ChapAlgorithm(ChapAlgorithmWait),
    ChapResponse(ChapResponseWait),
    Operational(Operational),
    /// Failed or finished: any further login PDU is a protocol error.
    Over,
}

/// Drives one connection's login.
pub(crate) struct LoginMachine {
    /// InitiatorName and TargetName as first sent, for logging failures.
    pub names: (Option<String>, Option<String>),
    state: State,
    ctx: Option<Ctx>,
    acc: TextAccumulator,
    params: TargetParams,
    tpgt: u16,
}

type StepResult = Result<(State, Reply, Option<Box<LoginInfo>>), LoginStatus>;

impl LoginMachine {
    pub fn new(params: TargetParams, tpgt: u16) -> LoginMachine {
        LoginMachine {
            names: (None, None),
            state: State::Initial(Initial),
            ctx: None,
            acc: TextAccumulator::default(),
            params,
            tpgt,
        }
    }

    pub fn on_request(
        &mut self,
        req: &LoginReq,
        dir: &dyn TargetDirectory,
        rng: &mut StdRng,
    ) -> Output {
        if self.acc.push(&req.data).is_err() {
            self.state = State::Over;
            return Output::Failed(LoginStatus::INITIATOR_ERROR);
        }
        if req.cont {
            // RFC 7143 11.12.3: answer each partial request with an empty response.
            return Output::Continue(Reply {
                csg: req.csg,
                ..Reply::default()
            });
        }
        let data = self.acc.take();
        let keys = match TextPairs::parse(&data) {
            Ok(k) => k,
            Err(_) => {
                self.state = State::Over;
                return Output::Failed(LoginStatus::INITIATOR_ERROR);
            }
        };
        let state = std::mem::replace(&mut self.state, State::Over);
        let r = match state {
            State::Initial(s) => s.step(self, req, keys, dir),
            other => {
                let Some(ctx) = self.ctx.as_mut() else {
                    return Output::Failed(LoginStatus::INITIATOR_ERROR);
                };
                if req.csg != expected_stage(&other) {
                    Err(LoginStatus::INITIATOR_ERROR)
                } else {
                    match other {
                        State::Security(s) => s.step(ctx, req, keys, dir),
                        State::ChapAlgorithm(s) => s.step(ctx, req, keys, rng),
                        State::ChapResponse(s) => s.step(ctx, req, keys, dir),
                        State::Operational(s) => s.step(ctx, req, keys, dir),
                        State::Initial(_) | State::Over => Err(LoginStatus::INVALID_DURING_LOGIN),
                    }
                }
            }
        };
        match r {
            Ok((next, mut reply, done)) => {
                self.state = next;
                if let Some(ctx) = self.ctx.as_mut() {
                    if !ctx.responded && ctx.session_type == SessionType::Normal {
                        reply
                            .keys
                            .push("TargetPortalGroupTag", ctx.tpgt.to_string());
                        if let Some(a) = &ctx.params.target_alias {
                            reply.keys.push("TargetAlias", a.clone());
                        }
                    }
                    ctx.responded = true;
                    reply.tsih = ctx.tsih;
                }
                match done {
                    Some(info) => {
                        self.state = State::Over;
                        Output::Done(reply, info)
                    }
                    None => Output::Continue(reply),
                }
            }
            Err(st) => {
                self.state = State::Over;
                Output::Failed(st)
            }
        }
    }

    /// The ISID and TSIH to echo in a failure response.
    pub fn ids(&self) -> ([u8; 6], u16) {
        self.ctx
            .as_ref()
            .map(|c| (c.isid, c.tsih))
            .unwrap_or(([0; 6], 0))
    }
}

fn expected_stage(s: &State) -> u8 {
    match s {
        State::Operational(_) => stage::OPERATIONAL,
        _ => stage::SECURITY,
    }
}

impl Initial {
    fn step(
        self,
        m: &mut LoginMachine,
        req: &LoginReq,
        keys: TextPairs,
        dir: &dyn TargetDirectory,
    ) -> StepResult {
        m.names = (
            keys.get("InitiatorName").map(str::to_string),
            keys.get("TargetName").map(str::to_string),
        );
        // Only version 0x00 exists.
        if req.version_min > 0 {
            return Err(LoginStatus::UNSUPPORTED_VERSION);
        }
        let initiator = keys
            .get("InitiatorName")
            .ok_or(LoginStatus::MISSING_PARAMETER)?;
        if initiator.is_empty() {
            return Err(LoginStatus::MISSING_PARAMETER);
        }
        let session_type = match keys.get("SessionType").unwrap_or("Normal") {
            "Normal" => SessionType::Normal,
            "Discovery" => SessionType::Discovery,
            _ => return Err(LoginStatus::SESSION_TYPE_UNSUPPORTED),
        };
        let (target, chap) = match session_type {
            SessionType::Discovery => (None, dir.discovery_chap(initiator)),
            SessionType::Normal => {
                let t = keys
                    .get("TargetName")
                    .ok_or(LoginStatus::MISSING_PARAMETER)?;
                match dir.lookup(t, initiator) {
                    Lookup::NotFound => return Err(LoginStatus::NOT_FOUND),
                    Lookup::Forbidden => return Err(LoginStatus::FORBIDDEN),
                    Lookup::Found { chap } => (Some(t.to_string()), chap),
                }
            }
        };
        if req.tsih != 0 {
            match dir.session_cid(initiator, req.isid, req.tsih) {
                None => return Err(LoginStatus::SESSION_NOT_FOUND),
                Some(cid) if cid != req.cid => return Err(LoginStatus::TOO_MANY_CONNECTIONS),
                Some(_) => {}
            }
        }
        let discovery = session_type == SessionType::Discovery;
        m.ctx = Some(Ctx {
            params: m.params.clone(),
            tpgt: m.tpgt,
            isid: req.isid,
            tsih: req.tsih,
            leading: req.tsih == 0,
            cid: req.cid,
            initial_cmdsn: req.cmdsn,
            initiator: initiator.to_string(),
            alias: keys.get("InitiatorAlias").map(str::to_string),
            target,
            session_type,
            chap,
            neg: Negotiation::new(m.params.clone(), discovery),
            responded: false,
        });
        let Some(ctx) = m.ctx.as_mut() else {
            return Err(LoginStatus::TARGET_ERROR);
        };
        match req.csg {
            stage::SECURITY => Security {
                authenticated: false,
            }
            .step(ctx, req, keys, dir),
            stage::OPERATIONAL if ctx.chap.is_none() => Operational.step(ctx, req, keys, dir),
            // Skipping security when we require CHAP fails authentication.
            stage::OPERATIONAL => Err(LoginStatus::AUTH_FAILED),
            _ => Err(LoginStatus::INITIATOR_ERROR),
        }
    }
}

/// Keys answered by the security stage itself or given only once.
fn security_or_identity_key(k: &str) -> bool {
    k.starts_with("CHAP_")
        || matches!(
            k,
            "AuthMethod" | "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias"
        )
}

fn negotiate_rest(ctx: &mut Ctx, keys: &TextPairs, reply: &mut Reply) {
    let rest = TextPairs(
        keys.0
            .iter()
            .filter(|(k, _)| !security_or_identity_key(k))
            .cloned()
            .collect(),
    );
    ctx.neg.negotiate(&rest, &mut reply.keys);
}

/// Moves to the stage the initiator asked for (when it set T), finishing
/// the login when that is full-feature phase.
fn transit(
    ctx: &mut Ctx,
    req: &LoginReq,
    mut reply: Reply,
    dir: &dyn TargetDirectory,
    from: u8,
) -> StepResult {
    reply.csg = from;
    if !req.transit {
        let st = if from == stage::SECURITY {
            State::Security(Security {
                authenticated: true,
            })
        } else {
            State::Operational(Operational)
        };
        return Ok((st, reply, None));
    }
    match req.nsg {
        stage::OPERATIONAL if from == stage::SECURITY => {
            reply.transit = true;
            reply.nsg = stage::OPERATIONAL;
            Ok((State::Operational(Operational), reply, None))
        }
        stage::FULL_FEATURE => {
            reply.transit = true;
            reply.nsg = stage::FULL_FEATURE;
            ctx.neg.declarations(&mut reply.keys);
            if ctx.tsih == 0 {
                ctx.tsih = dir.allocate_tsih();
            }
            let info = LoginInfo {
                initiator_name: ctx.initiator.clone(),
                initiator_alias: ctx.alias.clone(),
                isid: ctx.isid,
                tsih: ctx.tsih,
                leading: ctx.leading,
                cid: ctx.cid,
                target_name: ctx.target.clone(),
                session_type: ctx.session_type,
                params: ctx.neg.session.clone(),
                initial_cmdsn: ctx.initial_cmdsn,
            };
            Ok((State::Over, reply, Some(Box::new(info))))
        }
        _ => Err(LoginStatus::INITIATOR_ERROR),
    }
}

impl Security {
    fn step(
        self,
        ctx: &mut Ctx,
        req: &LoginReq,
        keys: TextPairs,
        dir: &dyn TargetDirectory,
    ) -> StepResult {
        let mut reply = Reply::default();
        let mut authenticated = self.authenticated;
        if let Some(methods) = keys.get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            if ctx.chap.is_some() {
                if !offered.contains(&"CHAP") {
                    return Err(LoginStatus::AUTH_FAILED);
                }
                reply.keys.push("AuthMethod", "CHAP");
                negotiate_rest(ctx, &keys, &mut reply);
                reply.csg = stage::SECURITY;
                // CHAP must run before any transit.
                return Ok((State::ChapAlgorithm(ChapAlgorithmWait), reply, None));
            }
            if !offered.contains(&"None") {
                return Err(LoginStatus::AUTH_FAILED);
            }
            reply.keys.push("AuthMethod", "None");
            authenticated = true;
        } else if ctx.chap.is_none() {
            // No AuthMethod offered and none required: nothing to authenticate.
            authenticated = true;
        }
        if !authenticated {
            return Err(LoginStatus::AUTH_FAILED);
        }
        negotiate_rest(ctx, &keys, &mut reply);
        transit(ctx, req, reply, dir, stage::SECURITY)
    }
}

impl ChapAlgorithmWait {
    fn step(self, ctx: &mut Ctx, _req: &LoginReq, keys: TextPairs, rng: &mut StdRng) -> StepResult {
        let list = keys.get("CHAP_A").ok_or(LoginStatus::AUTH_FAILED)?;
        let alg = list
            .split(',')
            .find_map(ChapAlgorithm::from_code)
            .ok_or(LoginStatus::AUTH_FAILED)?;
        let mut challenge = vec![0u8; alg.digest_len()];
        rng.fill_bytes(&mut challenge);
        let id = (rng.next_u32() & 0xff) as u8;
        let mut reply = Reply {
            csg: stage::SECURITY,
            ..Reply::default()
        };
        reply.keys.push("CHAP_A", alg.code());
        reply.keys.push("CHAP_I", id.to_string());
        reply.keys.push("CHAP_C", encode_hex(&challenge));
        negotiate_rest(ctx, &keys, &mut reply);
        Ok((
            State::ChapResponse(ChapResponseWait { alg, id, challenge }),
            reply,
            None,
        ))
    }
}

/// Largest CHAP_C we accept from an initiator (bytes after decoding).
const MAX_CHAP_CHALLENGE: usize = 1024;

impl ChapResponseWait {
    fn step(
        self,
        ctx: &mut Ctx,
        req: &LoginReq,
        keys: TextPairs,
        dir: &dyn TargetDirectory,
    ) -> StepResult {
        let secrets = ctx.chap.clone().ok_or(LoginStatus::AUTH_FAILED)?;
        let name = keys.get("CHAP_N").ok_or(LoginStatus::AUTH_FAILED)?;
        let resp = keys
            .get("CHAP_R")
            .and_then(decode_binary)
            .ok_or(LoginStatus::AUTH_FAILED)?;
        let expect = self.alg.response(self.id, &secrets.secret, &self.challenge);
        if name != secrets.user || !constant_time_eq(&resp, &expect) {
            return Err(LoginStatus::AUTH_FAILED);
        }
        let mut reply = Reply::default();
        match (keys.get("CHAP_I"), keys.get("CHAP_C")) {
            (None, None) => {}
            (Some(i), Some(c)) => {
                let (mname, msecret) = secrets.mutual.as_ref().ok_or(LoginStatus::AUTH_FAILED)?;
                let id = crate::text::parse_number(i)
                    .filter(|v| *v <= 255)
                    .ok_or(LoginStatus::AUTH_FAILED)? as u8;
                let chal = decode_binary(c).ok_or(LoginStatus::AUTH_FAILED)?;
                // A reflected challenge would let an attacker use us as an oracle.
                if chal.len() > MAX_CHAP_CHALLENGE || chal == self.challenge {
                    return Err(LoginStatus::AUTH_FAILED);
                }
                reply.keys.push("CHAP_N", mname.clone());
                reply
                    .keys
                    .push("CHAP_R", encode_hex(&self.alg.response(id, msecret, &chal)));
            }
            _ => return Err(LoginStatus::AUTH_FAILED),
        }
        negotiate_rest(ctx, &keys, &mut reply);
        transit(ctx, req, reply, dir, stage::SECURITY)
    }
}

impl Operational {
    fn step(
        self,
        ctx: &mut Ctx,
        req: &LoginReq,
        keys: TextPairs,
        dir: &dyn TargetDirectory,
    ) -> StepResult {
        let mut reply = Reply::default();
        negotiate_rest(ctx, &keys, &mut reply);
        if req.transit && req.nsg != stage::FULL_FEATURE {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        // Declare our receive limit in the first operational response.
        ctx.neg.declarations(&mut reply.keys);
        transit(ctx, req, reply, dir, stage::OPERATIONAL)
    }
}
