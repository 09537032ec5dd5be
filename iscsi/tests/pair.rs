#![allow(clippy::unwrap_used, clippy::type_complexity)]
//! A scripted initiator against [`Connection`] with a simulated clock: no
//! sockets, no sleeps (STYLE.md 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nvtarget_iscsi::msg::*;
use nvtarget_iscsi::pdu::decode;
use nvtarget_iscsi::text::{decode_binary, encode_hex, TextPairs};
use nvtarget_iscsi::*;

struct Dir {
    chap: Option<ChapSecrets>,
    ids: SessionIds,
}

impl TargetDirectory for Dir {
    fn lookup(&self, target: &str, initiator: &str) -> Lookup {
        match target {
            "iqn.t:disk" if initiator != "iqn.i:banned" => Lookup::Found {
                chap: self.chap.clone(),
            },
            "iqn.t:disk" => Lookup::Forbidden,
            _ => Lookup::NotFound,
        }
    }
    fn send_targets(&self, _initiator: &str, which: &str) -> Vec<(String, Vec<String>)> {
        let all = vec![
            (
                "iqn.t:disk".to_string(),
                vec!["127.0.0.1:3260,1".to_string()],
            ),
            (
                "iqn.t:other".to_string(),
                vec!["127.0.0.1:3260,1".to_string()],
            ),
        ];
        if which == "Big" {
            let name = |i: i32| format!("iqn.t:{i:03}-{}", "x".repeat(200));
            return (0..60)
                .map(|i| (name(i), vec!["10.0.0.1:3260,1".to_string()]))
                .collect();
        }
        all.into_iter()
            .filter(|(n, _)| which == "All" || n == which)
            .collect()
    }
    fn allocate_tsih(&self) -> u16 {
        self.ids.allocate()
    }
    fn session_cid(&self, _: &str, _: [u8; 6], tsih: u16) -> Option<u16> {
        (tsih == 1).then_some(0)
    }
}

struct Harness {
    conn: Connection,
    now: Instant,
    input: BytesMut,
    digests: Digests,
    itt: u32,
    cmdsn: u32,
    statsn: u32,
}

fn keys(pairs: &[(&str, &str)]) -> Bytes {
    TextPairs(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .encode()
}

impl Harness {
    fn new(chap: Option<ChapSecrets>, params: TargetParams) -> Harness {
        let now = Instant::now();
        let cfg = ConnectionConfig {
            params,
            tpgt: 7,
            directory: Arc::new(Dir {
                chap,
                ids: SessionIds::default(),
            }),
        };
        Harness {
            conn: Connection::with_seed(cfg, now, 1),
            now,
            input: BytesMut::new(),
            digests: Digests::default(),
            itt: 0x100,
            cmdsn: 1,
            statsn: 0,
        }
    }

    fn send(&mut self, pdu: Pdu) {
        let wire = pdu.encode(self.digests).to_vec();
        self.send_raw(&wire);
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.input.extend_from_slice(b);
        self.conn.handle_input(&mut self.input, self.now);
    }

    fn recv(&mut self) -> Vec<Pdu> {
        let mut wire = BytesMut::new();
        while let Some(t) = self.conn.poll_transmit() {
            wire.extend_from_slice(&t.to_vec());
        }
        let mut out = Vec::new();
        while let Some(p) = decode(&mut wire, self.digests, 1 << 24).expect("target sent a bad PDU")
        {
            out.push(p);
        }
        assert!(wire.is_empty(), "trailing bytes");
        for p in &out {
            if matches!(
                p.bhs.opcode(),
                Opcode::LOGIN_RESP | Opcode::SCSI_RESPONSE | Opcode::TEXT_RESP
            ) {
                self.statsn = p.bhs.u32(24).wrapping_add(1);
            }
        }
        out
    }

    fn events(&mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Some(e) = self.conn.poll_event() {
            v.push(e);
        }
        v
    }

    fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, data: Bytes) -> LoginResp {
        self.itt += 1;
        let req = LoginReq {
            transit,
            cont: false,
            csg,
            nsg,
            isid: [0x80, 0, 0, 0, 0, 1],
            itt: self.itt,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
            data,
            ..LoginReq::default()
        };
        self.send(req.to_pdu());
        let r = self.recv();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].bhs.opcode(), Opcode::LOGIN_RESP);
        LoginResp::parse(&r[0])
    }

    /// Security stage with None, then operational with `ops`.
    fn login(&mut self, ops: &[(&str, &str)]) -> LoginResp {
        let r = self.login_pdu(
            0,
            1,
            true,
            keys(&[
                ("InitiatorName", "iqn.i:host"),
                ("SessionType", "Normal"),
                ("TargetName", "iqn.t:disk"),
                ("AuthMethod", "None"),
            ]),
        );
        assert_eq!((r.status_class, r.status_detail), (0, 0));
        let k = TextPairs::parse(&r.data).unwrap();
        assert_eq!(k.get("TargetPortalGroupTag"), Some("7"));
        assert_eq!(k.get("AuthMethod"), Some("None"));
        assert!(r.transit && r.nsg == 1);
        let r = self.login_pdu(1, 3, true, keys(ops));
        assert_eq!((r.status_class, r.status_detail), (0, 0));
        assert!(r.transit && r.nsg == 3 && r.tsih != 0);
        let ev = self.events();
        assert!(matches!(ev.as_slice(), [Event::LoggedIn(_)]), "{ev:?}");
        if let Event::LoggedIn(i) = &ev[0] {
            self.digests = Digests {
                header: i.params.header_digest,
                data: i.params.data_digest,
            };
        }
        r
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    fn command(&mut self, read: bool, write: bool, edtl: u32, final_: bool, data: Bytes) -> u32 {
        let itt = self.next_itt();
        let c = ScsiCommandReq {
            immediate: false,
            final_,
            read,
            write,
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            edtl,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
            cdb: Bytes::from_static(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            bidi_read_len: None,
            data,
        };
        self.cmdsn += 1;
        self.send(c.to_pdu());
        itt
    }

    fn data_out(&mut self, itt: u32, ttt: u32, datasn: u32, offset: u32, len: usize, final_: bool) {
        let d = DataOut {
            final_,
            lun: 0,
            itt,
            ttt,
            exp_statsn: self.statsn,
            datasn,
            offset,
            data: Bytes::from(vec![(offset % 251) as u8; len]),
        };
        self.send(d.to_pdu());
    }
}

const OPS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "8192"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16384"),
    ("FirstBurstLength", "8192"),
    ("MaxOutstandingR2T", "2"),
    ("ErrorRecoveryLevel", "0"),
];

fn logged_in() -> Harness {
    let mut h = Harness::new(None, TargetParams::default());
    h.login(OPS);
    h
}

#[test]
fn login_none_negotiates_and_declares() {
    let mut h = Harness::new(None, TargetParams::default());
    let r = h.login(OPS);
    let k = TextPairs::parse(&r.data).unwrap();
    assert_eq!(k.get("MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(k.get("MaxBurstLength"), Some("16384"));
    assert_eq!(k.get("FirstBurstLength"), Some("8192"));
    assert_eq!(k.get("InitialR2T"), Some("No"));
    assert_eq!(k.get("MaxOutstandingR2T"), Some("2"));
    assert_eq!(
        h.conn.login_info().map(|i| i.isid),
        Some([0x80, 0, 0, 0, 0, 1])
    );
}

#[test]
fn login_failures_have_rfc_status() {
    let cases: &[(&[(&str, &str)], (u8, u8))] = &[
        (
            &[
                ("InitiatorName", "iqn.i:host"),
                ("TargetName", "iqn.t:nope"),
            ],
            (2, 3),
        ),
        (
            &[
                ("InitiatorName", "iqn.i:banned"),
                ("TargetName", "iqn.t:disk"),
            ],
            (2, 2),
        ),
        (&[("TargetName", "iqn.t:disk")], (2, 7)),
        (&[("InitiatorName", "iqn.i:host")], (2, 7)),
        (
            &[("InitiatorName", "iqn.i:host"), ("SessionType", "Bogus")],
            (2, 9),
        ),
    ];
    for (k, want) in cases {
        let mut h = Harness::new(None, TargetParams::default());
        let r = h.login_pdu(0, 1, true, keys(k));
        assert_eq!((r.status_class, r.status_detail), *want, "{k:?}");
        assert!(matches!(
            h.events().as_slice(),
            [Event::Close(CloseReason::LoginFailed(_))]
        ));
    }
}

#[test]
fn login_with_unknown_session_tsih_fails() {
    let mut h = Harness::new(None, TargetParams::default());
    let req = LoginReq {
        transit: true,
        csg: 0,
        nsg: 1,
        tsih: 9,
        itt: 1,
        data: keys(&[
            ("InitiatorName", "iqn.i:host"),
            ("TargetName", "iqn.t:disk"),
            ("AuthMethod", "None"),
        ]),
        ..LoginReq::default()
    };
    h.send(req.to_pdu());
    let r = LoginResp::parse(&h.recv()[0]);
    assert_eq!((r.status_class, r.status_detail), (2, 0x0a));
    // An existing session but another CID: a second connection, refused.
    let mut h = Harness::new(None, TargetParams::default());
    h.send(
        LoginReq {
            tsih: 1,
            cid: 4,
            ..req.clone()
        }
        .to_pdu(),
    );
    let r = LoginResp::parse(&h.recv()[0]);
    assert_eq!((r.status_class, r.status_detail), (2, 6));
    // Same CID: connection reinstatement proceeds.
    let mut h = Harness::new(None, TargetParams::default());
    h.send(
        LoginReq {
            tsih: 1,
            cid: 0,
            ..req
        }
        .to_pdu(),
    );
    let r = LoginResp::parse(&h.recv()[0]);
    assert_eq!((r.status_class, r.tsih), (0, 1));
}

#[test]
fn login_text_split_with_continue() {
    let mut h = Harness::new(None, TargetParams::default());
    let all = keys(&[
        ("InitiatorName", "iqn.i:host"),
        ("TargetName", "iqn.t:disk"),
        ("AuthMethod", "None"),
    ]);
    let (a, b) = (all.slice(..10), all.slice(10..));
    let mut req = LoginReq {
        cont: true,
        csg: 0,
        nsg: 1,
        itt: 5,
        data: a,
        ..LoginReq::default()
    };
    h.send(req.to_pdu());
    let r = LoginResp::parse(&h.recv()[0]);
    assert!(!r.transit && r.data.is_empty() && r.status_class == 0);
    req.cont = false;
    req.transit = true;
    req.data = b;
    h.send(req.to_pdu());
    let r = LoginResp::parse(&h.recv()[0]);
    assert_eq!(r.status_class, 0);
    assert!(r.transit);
    // More than 8192 bytes in total is refused.
    let mut h = Harness::new(None, TargetParams::default());
    let mut req = LoginReq {
        cont: true,
        itt: 5,
        data: Bytes::from(vec![b'a'; 8000]),
        ..LoginReq::default()
    };
    h.send(req.to_pdu());
    h.recv();
    req.data = Bytes::from(vec![b'a'; 8000]);
    h.send(req.to_pdu());
    let r = LoginResp::parse(&h.recv()[0]);
    assert_eq!(r.status_class, 2);
}

fn chap_secrets(mutual: bool) -> ChapSecrets {
    ChapSecrets {
        user: "alice".into(),
        secret: b"alice-secret-123".to_vec(),
        mutual: mutual.then(|| ("target".to_string(), b"target-secret-12".to_vec())),
    }
}

/// Runs CHAP up to the initiator's response; returns the target's answer.
fn chap_login(
    h: &mut Harness,
    alg: &str,
    secret: &[u8],
    mutual_challenge: Option<Vec<u8>>,
) -> LoginResp {
    let r = h.login_pdu(
        0,
        1,
        false,
        keys(&[
            ("InitiatorName", "iqn.i:host"),
            ("TargetName", "iqn.t:disk"),
            ("AuthMethod", "CHAP,None"),
        ]),
    );
    let k = TextPairs::parse(&r.data).unwrap();
    assert_eq!(k.get("AuthMethod"), Some("CHAP"));
    assert!(!r.transit);
    let r = h.login_pdu(0, 1, false, keys(&[("CHAP_A", alg)]));
    let k = TextPairs::parse(&r.data).unwrap();
    let a = ChapAlgorithm::from_code(k.get("CHAP_A").unwrap()).unwrap();
    let id: u8 = k.get("CHAP_I").unwrap().parse().unwrap();
    let c = decode_binary(k.get("CHAP_C").unwrap()).unwrap();
    let resp = encode_hex(&a.response(id, secret, &c));
    let mut ks = vec![
        ("CHAP_N".to_string(), "alice".to_string()),
        ("CHAP_R".to_string(), resp),
    ];
    if let Some(mc) = mutual_challenge {
        let mc = if mc.is_empty() { c.clone() } else { mc };
        ks.push(("CHAP_I".into(), "77".into()));
        ks.push(("CHAP_C".into(), encode_hex(&mc)));
    }
    h.login_pdu(0, 1, true, TextPairs(ks).encode())
}

#[test]
fn chap_one_way_md5_and_sha256() {
    for alg in ["5", "7", "7,5"] {
        let mut h = Harness::new(Some(chap_secrets(false)), TargetParams::default());
        let r = chap_login(&mut h, alg, b"alice-secret-123", None);
        assert_eq!((r.status_class, r.status_detail), (0, 0), "alg {alg}");
        assert!(r.transit && r.nsg == 1);
        let r = h.login_pdu(1, 3, true, keys(OPS));
        assert_eq!(r.status_class, 0);
        assert!(matches!(h.events().as_slice(), [Event::LoggedIn(_)]));
    }
}

#[test]
fn chap_wrong_secret_fails_with_0201() {
    let mut h = Harness::new(Some(chap_secrets(false)), TargetParams::default());
    let r = chap_login(&mut h, "5", b"wrong", None);
    assert_eq!((r.status_class, r.status_detail), (2, 1));
}

#[test]
fn chap_required_cannot_be_skipped() {
    let mut h = Harness::new(Some(chap_secrets(false)), TargetParams::default());
    let r = h.login_pdu(
        1,
        3,
        true,
        keys(&[
            ("InitiatorName", "iqn.i:host"),
            ("TargetName", "iqn.t:disk"),
        ]),
    );
    assert_eq!((r.status_class, r.status_detail), (2, 1));
    let mut h = Harness::new(Some(chap_secrets(false)), TargetParams::default());
    let r = h.login_pdu(
        0,
        1,
        true,
        keys(&[
            ("InitiatorName", "iqn.i:host"),
            ("TargetName", "iqn.t:disk"),
            ("AuthMethod", "None"),
        ]),
    );
    assert_eq!((r.status_class, r.status_detail), (2, 1));
}

#[test]
fn chap_mutual_and_reflection() {
    let mut h = Harness::new(Some(chap_secrets(true)), TargetParams::default());
    let mc = vec![9u8; 16];
    let r = chap_login(&mut h, "5", b"alice-secret-123", Some(mc.clone()));
    assert_eq!(r.status_class, 0);
    let k = TextPairs::parse(&r.data).unwrap();
    assert_eq!(k.get("CHAP_N"), Some("target"));
    let want = ChapAlgorithm::Md5.response(77, b"target-secret-12", &mc);
    assert_eq!(decode_binary(k.get("CHAP_R").unwrap()), Some(want));
    // Our own challenge sent back must be refused.
    let mut h = Harness::new(Some(chap_secrets(true)), TargetParams::default());
    let r = chap_login(&mut h, "5", b"alice-secret-123", Some(Vec::new()));
    assert_eq!((r.status_class, r.status_detail), (2, 1));
    // Mutual asked for but not configured.
    let mut h = Harness::new(Some(chap_secrets(false)), TargetParams::default());
    let r = chap_login(&mut h, "5", b"alice-secret-123", Some(mc));
    assert_eq!((r.status_class, r.status_detail), (2, 1));
}

#[test]
fn discovery_send_targets() {
    let mut h = Harness::new(None, TargetParams::default());
    let r = h.login_pdu(
        0,
        3,
        true,
        keys(&[
            ("InitiatorName", "iqn.i:host"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
            ("InitialR2T", "No"),
        ]),
    );
    assert_eq!(r.status_class, 0);
    let k = TextPairs::parse(&r.data).unwrap();
    assert_eq!(k.get("TargetPortalGroupTag"), None);
    assert_eq!(k.get("InitialR2T"), Some("Irrelevant"));
    h.events();
    let t = TextReq {
        final_: true,
        itt: 99,
        ttt: RESERVED_TAG,
        cmdsn: h.cmdsn,
        data: keys(&[("SendTargets", "All")]),
        ..TextReq::default()
    };
    h.send(t.to_pdu());
    let r = h.recv();
    let tr = TextResp::parse(&r[0]);
    assert!(tr.final_ && tr.ttt == RESERVED_TAG && tr.itt == 99);
    let k = TextPairs::parse(&tr.data).unwrap();
    let names: Vec<_> =
        k.0.iter()
            .filter(|(k, _)| k == "TargetName")
            .map(|(_, v)| v.as_str())
            .collect();
    assert_eq!(names, ["iqn.t:disk", "iqn.t:other"]);
    assert_eq!(k.get("TargetAddress"), Some("127.0.0.1:3260,1"));
}

#[test]
fn text_request_and_response_continuations() {
    let mut h = logged_in();
    // A request split over two PDUs: the second carries the TTT we handed out.
    let all = keys(&[("SendTargets", "All"), ("X-example.key", "1")]);
    let t = TextReq {
        immediate: true,
        final_: false,
        cont: true,
        itt: 40,
        ttt: RESERVED_TAG,
        cmdsn: h.cmdsn,
        data: all.slice(..8),
        ..TextReq::default()
    };
    h.send(t.to_pdu());
    let r = TextResp::parse(&h.recv()[0]);
    assert!(!r.final_ && r.data.is_empty() && r.ttt != RESERVED_TAG);
    let t2 = TextReq {
        final_: true,
        cont: false,
        ttt: r.ttt,
        data: all.slice(8..),
        ..t.clone()
    };
    h.send(t2.to_pdu());
    let r = TextResp::parse(&h.recv()[0]);
    assert!(r.final_ && r.ttt == RESERVED_TAG);
    let k = TextPairs::parse(&r.data).unwrap();
    assert_eq!(k.get("TargetName"), Some("iqn.t:disk"));
    assert_eq!(k.get("X-example.key"), Some("NotUnderstood"));
    // A response longer than the initiator's 8192 bytes comes in parts, each
    // fetched with an empty request carrying the TTT.
    let t = TextReq {
        final_: true,
        cont: false,
        itt: 41,
        ttt: RESERVED_TAG,
        data: keys(&[("SendTargets", "Big")]),
        ..t
    };
    h.send(t.to_pdu());
    let mut text = Vec::new();
    let mut r = TextResp::parse(&h.recv()[0]);
    while !r.final_ {
        assert!(r.cont && r.ttt != RESERVED_TAG && r.data.len() == 8192);
        text.extend_from_slice(&r.data);
        let next = TextReq {
            ttt: r.ttt,
            data: Bytes::new(),
            ..t.clone()
        };
        h.send(next.to_pdu());
        r = TextResp::parse(&h.recv()[0]);
    }
    text.extend_from_slice(&r.data);
    // Longer than one request may be, so counted without the parser's limit.
    let names = text
        .split(|&b| b == 0)
        .filter(|kv| kv.starts_with(b"TargetName="))
        .count();
    assert_eq!(names, 60);
}

#[test]
fn read_is_split_and_status_collapsed_with_overflow() {
    let mut h = logged_in();
    let itt = h.command(true, false, 20000, true, Bytes::new());
    let ev = h.events();
    let Some(Event::Command(c)) = ev.first() else {
        panic!("{ev:?}")
    };
    assert_eq!(c.expected_in_len, 20000);
    let data = Bytes::from((0..30000u32).map(|i| i as u8).collect::<Vec<_>>());
    h.conn
        .complete(
            itt,
            Completion {
                data_in: data.clone(),
                ..Completion::default()
            },
        )
        .unwrap();
    let pdus = h.recv();
    // 8192-byte segments (the initiator's limit); 16384 MaxBurst splits sequences.
    let sizes: Vec<usize> = pdus.iter().map(|p| p.data.len()).collect();
    assert_eq!(sizes, [8192, 8192, 3616]);
    let d: Vec<DataIn> = pdus.iter().map(DataIn::parse).collect();
    assert_eq!(d.iter().map(|x| x.datasn).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(
        d.iter().map(|x| x.offset).collect::<Vec<_>>(),
        [0, 8192, 16384]
    );
    assert!(!d[0].final_ && d[1].final_ && d[2].final_);
    assert!(d[2].has_status && d[2].overflow && d[2].residual == 10000);
    assert!(!d[0].has_status && !d[1].has_status);
    let got: Vec<u8> = d.iter().flat_map(|x| x.data.to_vec()).collect();
    assert_eq!(&got[..], &data[..20000]);
}

#[test]
fn read_with_check_condition_sends_sense_in_response() {
    let mut h = logged_in();
    let itt = h.command(true, false, 512, true, Bytes::new());
    h.events();
    let sense = transport_sense(5, 0x24, 0);
    h.conn
        .complete(
            itt,
            Completion {
                status: 2,
                sense: sense.clone(),
                ..Completion::default()
            },
        )
        .unwrap();
    let p = h.recv();
    assert_eq!(p.len(), 1);
    let r = ScsiResponsePdu::parse(&p[0]);
    assert_eq!(r.status, 2);
    assert_eq!(r.sense, sense);
    assert!(r.underflow && r.residual == 512);
}

#[test]
fn write_immediate_unsolicited_and_r2t() {
    let mut h = logged_in();
    let edtl = 40000u32;
    let itt = h.command(false, true, edtl, false, Bytes::from(vec![0u8; 4096]));
    assert!(
        h.recv().is_empty(),
        "no R2T while the unsolicited burst is open"
    );
    h.data_out(itt, RESERVED_TAG, 0, 4096, 4096, true);
    let r2ts: Vec<R2t> = h.recv().iter().map(R2t::parse).collect();
    assert_eq!(r2ts.len(), 2, "MaxOutstandingR2T=2");
    assert_eq!(
        (r2ts[0].offset, r2ts[0].desired_len, r2ts[0].r2tsn),
        (8192, 16384, 0)
    );
    assert_eq!(
        (r2ts[1].offset, r2ts[1].desired_len, r2ts[1].r2tsn),
        (24576, 15424, 1)
    );
    // Second R2T answered first: sequences are independent.
    let t1 = r2ts[1].ttt;
    h.data_out(itt, t1, 0, 24576, 8192, false);
    h.data_out(itt, t1, 1, 32768, 7232, true);
    let t0 = r2ts[0].ttt;
    h.data_out(itt, t0, 0, 8192, 8192, false);
    assert!(h.events().is_empty());
    h.data_out(itt, t0, 1, 16384, 8192, true);
    let ev = h.events();
    let Some(Event::Command(c)) = ev.first() else {
        panic!("{ev:?}")
    };
    assert_eq!(c.data_out.len(), edtl as usize);
    assert_eq!(c.data_out[4096], (4096 % 251) as u8);
    assert_eq!(c.data_out[39999], (32768 % 251) as u8);
    h.conn.complete(itt, Completion::default()).unwrap();
    let r = ScsiResponsePdu::parse(&h.recv()[0]);
    assert_eq!((r.status, r.overflow, r.underflow), (0, false, false));
}

#[test]
fn write_residual_from_transfer_len() {
    let mut h = logged_in();
    let itt = h.command(false, true, 1000, true, Bytes::from(vec![1u8; 1000]));
    assert!(matches!(h.events().as_slice(), [Event::Command(_)]));
    h.conn
        .complete(
            itt,
            Completion {
                transfer_len: Some(512),
                ..Completion::default()
            },
        )
        .unwrap();
    let r = ScsiResponsePdu::parse(&h.recv()[0]);
    assert!(r.underflow && r.residual == 488);
}

fn expect_check_condition(h: &mut Harness, itt: u32) {
    let p = h.recv();
    let r = p
        .iter()
        .find(|p| p.bhs.opcode() == Opcode::SCSI_RESPONSE)
        .map(ScsiResponsePdu::parse);
    let r = r.unwrap_or_else(|| panic!("no response in {p:?}"));
    assert_eq!((r.itt, r.status), (itt, 2));
    assert!(h.events().iter().all(|e| !matches!(e, Event::Command(_))));
}

#[test]
fn bad_datasn_offset_ttt_and_overflow_fail_the_command() {
    // DataSN 0 twice (libiscsi iSCSIDataSnInvalid case 1).
    let mut h = logged_in();
    let itt = h.command(false, true, 1024, false, Bytes::new());
    h.data_out(itt, RESERVED_TAG, 0, 0, 512, false);
    h.data_out(itt, RESERVED_TAG, 0, 512, 512, true);
    expect_check_condition(&mut h, itt);
    // Late PDUs for the failed task are ignored, not rejected.
    h.data_out(itt, RESERVED_TAG, 1, 512, 512, true);
    assert!(h.recv().is_empty());
    // DataSN 27.
    let itt = h.command(false, true, 512, false, Bytes::new());
    h.data_out(itt, RESERVED_TAG, 27, 0, 512, true);
    expect_check_condition(&mut h, itt);
    // Wrong offset.
    let itt = h.command(false, true, 1024, false, Bytes::new());
    h.data_out(itt, RESERVED_TAG, 0, 512, 512, true);
    expect_check_condition(&mut h, itt);
    // Beyond EDTL.
    let itt = h.command(false, true, 512, false, Bytes::new());
    h.data_out(itt, RESERVED_TAG, 0, 0, 1024, true);
    expect_check_condition(&mut h, itt);
    // Unknown TTT.
    let itt = h.command(false, true, 20000, true, Bytes::new());
    let r2t = R2t::parse(&h.recv()[0]);
    h.data_out(itt, r2t.ttt ^ 1, 0, 0, 512, false);
    expect_check_condition(&mut h, itt);
    // The window is intact afterwards.
    let itt = h.command(true, false, 0, true, Bytes::new());
    assert!(matches!(h.events().as_slice(), [Event::Command(c)] if c.itt == itt));
}

#[test]
fn cmdsn_window_orders_and_drops() {
    let params = TargetParams {
        queue_depth: 4,
        ..TargetParams::default()
    };
    let mut h = Harness::new(None, params);
    h.login(OPS);
    let base = h.cmdsn;
    // Out of order: base+1 waits for base.
    h.cmdsn = base + 1;
    let second = h.command(true, false, 0, true, Bytes::new());
    assert!(h.events().is_empty());
    h.cmdsn = base;
    let first = h.command(true, false, 0, true, Bytes::new());
    let order: Vec<u32> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Command(c) => Some(c.itt),
            _ => None,
        })
        .collect();
    assert_eq!(order, [first, second]);
    // Two in flight: window is 2 wide; base+2 and base+3 fit, base+4 does not.
    h.cmdsn = base + 4;
    h.command(true, false, 0, true, Bytes::new());
    h.cmdsn = base + 2;
    let a = h.command(true, false, 0, true, Bytes::new());
    let b = h.command(true, false, 0, true, Bytes::new());
    let got: Vec<u32> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Command(c) => Some(c.itt),
            _ => None,
        })
        .collect();
    assert_eq!(got, [a, b]);
    // Too low: silently ignored.
    h.cmdsn = base;
    h.command(true, false, 0, true, Bytes::new());
    assert!(h.events().is_empty());
    // Completing one reopens the window: MaxCmdSN in the response grows.
    h.conn.complete(first, Completion::default()).unwrap();
    let r = ScsiResponsePdu::parse(&h.recv()[0]);
    assert_eq!(r.exp_cmdsn, base + 4);
    assert_eq!(r.max_cmdsn, base + 4);
}

#[test]
fn nop_echo_and_ping_timeout() {
    let mut h = logged_in();
    let itt = h.next_itt();
    let n = NopOut {
        immediate: true,
        itt,
        ttt: RESERVED_TAG,
        cmdsn: h.cmdsn,
        data: Bytes::from_static(b"ping!"),
        ..NopOut::default()
    };
    h.send(n.to_pdu());
    let r = NopIn::parse(&h.recv()[0]);
    assert_eq!(
        (r.itt, r.ttt, &r.data[..]),
        (itt, RESERVED_TAG, &b"ping!"[..])
    );
    // Idle: the target pings after 5 s.
    let t0 = h.now;
    assert_eq!(h.conn.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    h.now = t0 + Duration::from_secs(5);
    h.conn.handle_timeout(h.now);
    let ping = NopIn::parse(&h.recv()[0]);
    assert_eq!(ping.itt, RESERVED_TAG);
    assert_ne!(ping.ttt, RESERVED_TAG);
    // Answered: no close; another ping after the next idle interval.
    let ans = NopOut {
        immediate: true,
        itt: RESERVED_TAG,
        ttt: ping.ttt,
        cmdsn: h.cmdsn,
        ..NopOut::default()
    };
    h.send(ans.to_pdu());
    assert!(h.recv().is_empty());
    h.now += Duration::from_secs(5);
    h.conn.handle_timeout(h.now);
    assert_eq!(h.recv().len(), 1);
    // Unanswered for 30 s: close.
    h.now += Duration::from_secs(29);
    h.conn.handle_timeout(h.now);
    assert!(h.events().is_empty());
    h.now += Duration::from_secs(1);
    h.conn.handle_timeout(h.now);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::NopTimeout)]
    ));
}

#[test]
fn login_timeout_closes() {
    let mut h = Harness::new(None, TargetParams::default());
    h.now += Duration::from_secs(30);
    h.conn.handle_timeout(h.now);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::LoginTimeout)]
    ));
}

#[test]
fn digests_protect_headers_and_data() {
    let mut h = Harness::new(None, TargetParams::default());
    let mut ops = OPS.to_vec();
    ops[0] = ("HeaderDigest", "CRC32C,None");
    ops[1] = ("DataDigest", "CRC32C");
    h.login(&ops);
    assert!(h.digests.header && h.digests.data);
    let itt = h.next_itt();
    let n = NopOut {
        immediate: true,
        itt,
        ttt: RESERVED_TAG,
        data: Bytes::from_static(b"abc"),
        ..NopOut::default()
    };
    h.send(n.to_pdu());
    assert_eq!(NopIn::parse(&h.recv()[0]).data, Bytes::from_static(b"abc"));
    // A bad data digest: Reject 0x02, the connection lives on.
    let mut wire = n.to_pdu().encode(h.digests).to_vec();
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    h.send_raw(&wire);
    let r = RejectPdu::parse(&h.recv()[0]);
    assert_eq!(r.reason, RejectReason::DATA_DIGEST_ERROR);
    assert_eq!(&r.header[8..], &n.to_pdu().bhs.0[8..]);
    assert_eq!(r.header.len(), 48);
    // A bad header digest: the stream cannot be trusted any more.
    let mut wire = n.to_pdu().encode(h.digests).to_vec();
    wire[20] ^= 1;
    h.send_raw(&wire);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::HeaderDigest)]
    ));
}

#[test]
fn malformed_pdus_are_rejected() {
    let mut h = logged_in();
    let mut bhs = Bhs::new(Opcode(0x1c));
    bhs.set_immediate(true);
    h.send(Pdu::new(bhs.clone()));
    let r = RejectPdu::parse(&h.recv()[0]);
    assert_eq!(r.reason, RejectReason::COMMAND_NOT_SUPPORTED);
    assert_eq!(&r.header[..], &bhs.0[..]);
    // A SCSI command with a bad AHS.
    let mut c = ScsiCommandReq::parse(&{
        let itt = h.next_itt();
        ScsiCommandReq {
            immediate: true,
            final_: true,
            read: true,
            write: false,
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            edtl: 0,
            cmdsn: h.cmdsn,
            exp_statsn: 0,
            cdb: Bytes::from_static(&[0; 16]),
            bidi_read_len: None,
            data: Bytes::new(),
        }
        .to_pdu()
    })
    .unwrap()
    .to_pdu();
    c.ahs = Bytes::from_static(&[0, 5, 9, 0, 0, 0, 0, 0]);
    h.send(c);
    let r = RejectPdu::parse(&h.recv()[0]);
    assert_eq!(r.reason, RejectReason::INVALID_PDU_FIELD);
    // A data segment above our MaxRecvDataSegmentLength closes the connection.
    let mut big = Bhs::new(Opcode::NOP_OUT);
    big.0[5] = 0x10;
    h.send_raw(&big.0);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::ProtocolError(_))]
    ));
}

#[test]
fn abort_task_of_gathering_write() {
    let mut h = logged_in();
    let itt = h.command(false, true, 100_000, true, Bytes::new());
    assert!(!h.recv().is_empty());
    let tmf_itt = h.next_itt();
    let t = TmfReq {
        immediate: true,
        function: TmfFunction::ABORT_TASK,
        lun: 0,
        itt: tmf_itt,
        referenced_itt: itt,
        cmdsn: h.cmdsn,
        exp_statsn: 0,
        ref_cmdsn: h.cmdsn - 1,
        exp_datasn: 0,
    };
    h.send(t.to_pdu());
    let ev = h.events();
    let Some(Event::TaskMgmt(m)) = ev.first() else {
        panic!("{ev:?}")
    };
    assert_eq!(m.referenced, ReferencedTask::AbortedWhileGathering);
    assert_eq!(m.aborted_itts, [itt]);
    h.conn
        .complete_tmf(tmf_itt, TmfResponse::FUNCTION_COMPLETE)
        .unwrap();
    let r = TmfResp::parse(&h.recv()[0]);
    assert_eq!(
        (r.itt, r.response),
        (tmf_itt, TmfResponse::FUNCTION_COMPLETE)
    );
    // A command still queued for the driver is aborted before execution.
    let itt = h.command(true, false, 512, true, Bytes::new());
    let t = TmfReq {
        itt: tmf_itt + 1,
        referenced_itt: itt,
        ..t
    };
    h.send(t.to_pdu());
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::TaskMgmt(m)] if m.referenced == ReferencedTask::AbortedBeforeExecution)
    );
}

#[test]
fn cold_reset_closes_after_response() {
    let mut h = logged_in();
    let t = TmfReq {
        immediate: true,
        function: TmfFunction::TARGET_COLD_RESET,
        lun: 0,
        itt: 77,
        referenced_itt: RESERVED_TAG,
        cmdsn: h.cmdsn,
        exp_statsn: 0,
        ref_cmdsn: 0,
        exp_datasn: 0,
    };
    h.send(t.to_pdu());
    assert!(matches!(h.events().as_slice(), [Event::TaskMgmt(_)]));
    h.conn
        .complete_tmf(77, TmfResponse::FUNCTION_COMPLETE)
        .unwrap();
    assert!(
        h.events().is_empty(),
        "close only after the response is taken"
    );
    assert_eq!(h.recv().len(), 1);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::ColdReset)]
    ));
}

#[test]
fn logout_responds_then_closes() {
    let mut h = logged_in();
    let l = LogoutReq {
        immediate: true,
        reason: LogoutReason::CLOSE_SESSION,
        itt: 5,
        cid: 0,
        cmdsn: h.cmdsn,
        exp_statsn: h.statsn,
    };
    h.send(l.to_pdu());
    let r = LogoutResp::parse(&h.recv()[0]);
    assert_eq!((r.itt, r.response), (5, 0));
    assert!(matches!(
        h.events().as_slice(),
        [Event::Close(CloseReason::Logout { session: true })]
    ));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decode_encode_round_trip(
            bhs in any::<[u8; 48]>(),
            ahs_words in 0u8..4,
            data in proptest::collection::vec(any::<u8>(), 0..300),
            hd in any::<bool>(),
            dd in any::<bool>(),
        ) {
            let mut bhs = Bhs(bhs);
            bhs.0[4] = ahs_words;
            let n = data.len();
            bhs.0[5] = 0;
            bhs.0[6] = (n >> 8) as u8;
            bhs.0[7] = n as u8;
            let digests = Digests { header: hd, data: dd };
            let pdu = Pdu { bhs, ahs: Bytes::from(vec![7u8; ahs_words as usize * 4]), data: Bytes::from(data) };
            let wire = pdu.encode(digests).to_vec();
            let mut buf = BytesMut::from(&wire[..]);
            let back = decode(&mut buf, digests, 1 << 24).unwrap().unwrap();
            prop_assert!(buf.is_empty());
            prop_assert_eq!(back.encode(digests).to_vec(), wire);
            prop_assert_eq!(back, pdu);
        }

        #[test]
        fn random_bytes_never_panic_in_login(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut h = Harness::new(None, TargetParams::default());
            h.send_raw(&data);
            h.recv_unchecked();
            h.events();
        }

        #[test]
        fn random_pdus_never_panic_in_full_feature(
            pdus in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<[u8; 40]>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..12)
        ) {
            let mut h = logged_in();
            for (op, flags, rest, data) in pdus {
                let mut bhs = Bhs::new(Opcode(op & 0x3f));
                bhs.0[0] = op;
                bhs.0[1] = flags;
                bhs.0[8..48].copy_from_slice(&rest);
                // Keep the AHS small so a PDU is usually complete.
                bhs.0[4] %= 3;
                let ahs = Bytes::from(vec![0u8; bhs.ahs_len()]);
                let mut p = Pdu::with_data(bhs, Bytes::from(data));
                p.ahs = ahs;
                h.send(p);
                let mut wire = BytesMut::new();
                while let Some(t) = h.conn.poll_transmit() {
                    wire.extend_from_slice(&t.to_vec());
                }
                while let Some(ev) = h.conn.poll_event() {
                    match ev {
                        Event::Command(c) => {
                            let _ = h.conn.complete(c.itt, Completion { data_in: Bytes::from(vec![1u8; 3000]), ..Completion::default() });
                        }
                        Event::TaskMgmt(t) => {
                            let _ = h.conn.complete_tmf(t.itt, TmfResponse::FUNCTION_COMPLETE);
                        }
                        _ => {}
                    }
                }
                h.now += Duration::from_secs(3);
                h.conn.handle_timeout(h.now);
            }
        }
    }

    impl Harness {
        fn recv_unchecked(&mut self) {
            while self.conn.poll_transmit().is_some() {}
        }
    }
}
