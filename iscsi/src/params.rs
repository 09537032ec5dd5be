//! Operational parameters: what the target offers ([`TargetParams`]), what a
//! session ends up with ([`SessionParams`]) and the per-key negotiation rules
//! of RFC 7143 section 13 ([`Negotiation`]).
//!
//! Every key the initiator sends gets exactly one answer, or none for the
//! initiator-only declarations; bad values are answered `Reject` and leave
//! the default in force; unknown keys are answered `NotUnderstood`.

use std::time::Duration;

use crate::text::{parse_number, TextPairs};

/// What this target offers and enforces. One per node, shared by connections.
#[derive(Debug, Clone)]
pub struct TargetParams {
    /// Largest data segment we accept (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    /// Upper bound we accept for MaxBurstLength.
    pub max_burst_length: u32,
    /// Upper bound we accept for FirstBurstLength.
    pub first_burst_length: u32,
    /// Upper bound for MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// Whether we allow ImmediateData (AND with the initiator).
    pub immediate_data: bool,
    /// Whether we require InitialR2T (OR with the initiator).
    pub initial_r2t: bool,
    /// Whether CRC32C digests may be chosen.
    pub allow_digests: bool,
    /// The CmdSN window: commands a session may have queued (at least 1).
    pub queue_depth: u32,
    /// Silence before we ping the initiator with a NOP-In; None disables pings.
    pub nop_in_interval: Option<Duration>,
    /// How long an unanswered ping may stay unanswered before we drop the connection.
    pub nop_in_timeout: Duration,
    /// Time allowed from connect to the end of login.
    pub login_timeout: Duration,
    /// Largest ExpectedDataTransferLength accepted for a write; larger ones fail.
    pub max_command_data: u32,
    /// Write data a connection may be gathering at once (R2Ts wait beyond it).
    pub max_gather_bytes: usize,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    /// Sent as TargetAlias in normal-session logins when set.
    pub target_alias: Option<String>,
}

impl Default for TargetParams {
    fn default() -> Self {
        TargetParams {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 16,
            immediate_data: true,
            initial_r2t: false,
            allow_digests: true,
            queue_depth: 128,
            nop_in_interval: Some(Duration::from_secs(5)),
            nop_in_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            max_command_data: 64 << 20,
            max_gather_bytes: 256 << 20,
            default_time2wait: 2,
            default_time2retain: 0,
            target_alias: None,
        }
    }
}

/// The values in force for a session after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we may send (the initiator's declaration).
    pub initiator_mrdsl: u32,
    /// Largest data segment we accept (our declaration).
    pub target_mrdsl: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub error_recovery_level: u8,
    pub max_connections: u16,
}

impl SessionParams {
    /// RFC 7143 defaults, with our receive limit during login (8192).
    pub fn rfc_defaults() -> SessionParams {
        SessionParams {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: 8192,
            target_mrdsl: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
        }
    }
}

const MIN_LEN: u64 = 512;
const MAX_LEN: u64 = (1 << 24) - 1;

/// Negotiation state for one login.
#[derive(Debug)]
pub struct Negotiation {
    pub target: TargetParams,
    pub session: SessionParams,
    pub discovery: bool,
    /// Whether our MaxRecvDataSegmentLength has been declared yet.
    mrdsl_declared: bool,
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// Keys irrelevant in a discovery session (RFC 7143 13.x "Irrelevant when").
fn discovery_irrelevant(k: &str) -> bool {
    matches!(
        k,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
    )
}

impl Negotiation {
    pub fn new(target: TargetParams, discovery: bool) -> Negotiation {
        let mut session = SessionParams::rfc_defaults();
        // We declare our own limit, so it holds once login ends.
        session.target_mrdsl = target
            .max_recv_data_segment_length
            .clamp(512, MAX_LEN as u32);
        Negotiation {
            target,
            session,
            discovery,
            mrdsl_declared: false,
        }
    }

    /// Answers one batch of operational keys into `out`.
    pub fn negotiate(&mut self, keys: &TextPairs, out: &mut TextPairs) {
        for (k, v) in &keys.0 {
            if let Some(ans) = self.answer(k, v) {
                out.push(k.clone(), ans);
            }
        }
        if self.session.first_burst_length > self.session.max_burst_length {
            self.session.first_burst_length = self.session.max_burst_length;
            let fb = self.session.first_burst_length.to_string();
            for (k, v) in out.0.iter_mut() {
                if k == "FirstBurstLength" {
                    *v = fb.clone();
                }
            }
        }
    }

    /// Declarations we make even when not asked; sent once in operational stage.
    pub fn declarations(&mut self, out: &mut TextPairs) {
        if !self.mrdsl_declared && out.get("MaxRecvDataSegmentLength").is_none() {
            self.mrdsl_declared = true;
            out.push(
                "MaxRecvDataSegmentLength",
                self.session.target_mrdsl.to_string(),
            );
        }
    }

    fn number(v: &str, lo: u64, hi: u64) -> Option<u64> {
        parse_number(v).filter(|n| *n >= lo && *n <= hi)
    }

    fn answer(&mut self, k: &str, v: &str) -> Option<String> {
        let t = &self.target;
        let s = &mut self.session;
        if self.discovery && discovery_irrelevant(k) {
            return Some("Irrelevant".into());
        }
        let reject = || Some("Reject".to_string());
        match k {
            // Initiator-only declarations: no answer.
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => None,
            "HeaderDigest" | "DataDigest" => {
                let mut pick = None;
                for item in v.split(',') {
                    match item {
                        "None" => {
                            pick = Some(false);
                            break;
                        }
                        "CRC32C" if t.allow_digests => {
                            pick = Some(true);
                            break;
                        }
                        _ => {}
                    }
                }
                match pick {
                    Some(on) => {
                        if k == "HeaderDigest" {
                            s.header_digest = on;
                        } else {
                            s.data_digest = on;
                        }
                        Some(if on { "CRC32C" } else { "None" }.into())
                    }
                    None => reject(),
                }
            }
            "MaxRecvDataSegmentLength" => match parse_number(v) {
                Some(n) if n >= MIN_LEN => {
                    s.initiator_mrdsl = n.min(MAX_LEN) as u32;
                    self.mrdsl_declared = true;
                    Some(s.target_mrdsl.to_string())
                }
                _ => reject(),
            },
            "MaxBurstLength" => match Self::number(v, MIN_LEN, MAX_LEN) {
                Some(n) => {
                    s.max_burst_length = (n as u32).min(t.max_burst_length.max(512));
                    Some(s.max_burst_length.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match Self::number(v, MIN_LEN, MAX_LEN) {
                Some(n) => {
                    s.first_burst_length = (n as u32).min(t.first_burst_length.max(512));
                    Some(s.first_burst_length.to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match Self::number(v, 1, 65535) {
                Some(n) => {
                    s.max_outstanding_r2t = (n as u32).min(t.max_outstanding_r2t.max(1));
                    Some(s.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    s.initial_r2t = b || t.initial_r2t;
                    Some(yes_no(s.initial_r2t).into())
                }
                None => reject(),
            },
            "ImmediateData" => match parse_bool(v) {
                Some(b) => {
                    s.immediate_data = b && t.immediate_data;
                    Some(yes_no(s.immediate_data).into())
                }
                None => reject(),
            },
            // We only deliver in order, so OR always yields Yes.
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                Some(_) => Some("Yes".into()),
                None => reject(),
            },
            "DefaultTime2Wait" => match Self::number(v, 0, 3600) {
                Some(n) => {
                    s.default_time2wait = (n as u16).max(t.default_time2wait);
                    Some(s.default_time2wait.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match Self::number(v, 0, 3600) {
                Some(n) => {
                    s.default_time2retain = (n as u16).min(t.default_time2retain);
                    Some(s.default_time2retain.to_string())
                }
                None => reject(),
            },
            "ErrorRecoveryLevel" => match Self::number(v, 0, 2) {
                Some(_) => {
                    s.error_recovery_level = 0;
                    Some("0".into())
                }
                None => reject(),
            },
            "MaxConnections" => match Self::number(v, 1, 65535) {
                Some(_) => {
                    s.max_connections = 1;
                    Some("1".into())
                }
                None => reject(),
            },
            // Markers were removed by RFC 7143; older initiators still offer "No".
            "IFMarker" | "OFMarker" | "RDMAExtensions" => match parse_bool(v) {
                Some(_) => Some("No".into()),
                None => reject(),
            },
            "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".into()),
            "TaskReporting" => Some("RFC3720".into()),
            "iSCSIProtocolLevel" => match Self::number(v, 0, 31) {
                Some(n) => Some(n.min(1).to_string()),
                None => reject(),
            },
            // Target-only declarations the initiator must not send.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => reject(),
            // Security keys outside the security stage.
            "AuthMethod" => Some("Irrelevant".into()),
            "SendTargets" => Some("Irrelevant".into()),
            _ => Some("NotUnderstood".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(keys: &[(&str, &str)], discovery: bool) -> (Negotiation, TextPairs) {
        let mut n = Negotiation::new(TargetParams::default(), discovery);
        let mut out = TextPairs::new();
        let k = TextPairs(
            keys.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        );
        n.negotiate(&k, &mut out);
        (n, out)
    }

    #[test]
    fn rfc_rules() {
        let (n, out) = neg(
            &[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "2000000"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxOutstandingR2T", "100"),
                ("ErrorRecoveryLevel", "2"),
                ("DefaultTime2Wait", "0"),
                ("X-com.example.foo", "1"),
                ("MaxConnections", "bogus"),
                ("InitiatorAlias", "host"),
            ],
            false,
        );
        let s = &n.session;
        assert!(s.header_digest && !s.data_digest);
        assert_eq!(s.initiator_mrdsl, 65536);
        assert_eq!(s.max_burst_length, 1_048_576);
        assert_eq!(s.first_burst_length, 262_144);
        assert!(!s.initial_r2t && s.immediate_data);
        assert_eq!(s.max_outstanding_r2t, 16);
        assert_eq!(out.get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(out.get("ErrorRecoveryLevel"), Some("0"));
        assert_eq!(out.get("DefaultTime2Wait"), Some("2"));
        assert_eq!(out.get("X-com.example.foo"), Some("NotUnderstood"));
        assert_eq!(out.get("MaxConnections"), Some("Reject"));
        assert_eq!(out.get("InitiatorAlias"), None);
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let (n, out) = neg(
            &[("FirstBurstLength", "262144"), ("MaxBurstLength", "4096")],
            false,
        );
        assert_eq!(n.session.first_burst_length, 4096);
        assert_eq!(out.get("FirstBurstLength"), Some("4096"));
    }

    #[test]
    fn discovery_irrelevant_keys() {
        let (_, out) = neg(&[("InitialR2T", "No"), ("HeaderDigest", "None")], true);
        assert_eq!(out.get("InitialR2T"), Some("Irrelevant"));
        assert_eq!(out.get("HeaderDigest"), Some("None"));
    }
}
