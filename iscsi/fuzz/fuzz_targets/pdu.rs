//! Decoder round trip: whatever frames must re-encode to the same bytes
//! (padding bytes excepted: the sender may put anything there, we send zeros),
//! and typed views must re-encode to a PDU that parses back the same.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvtarget_iscsi::msg::*;
use nvtarget_iscsi::pdu::{decode, Digests, Opcode};

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    let digests = Digests {
        header: sel & 1 != 0,
        data: sel & 2 != 0,
    };
    let mut buf = BytesMut::from(data);
    let Ok(Some(pdu)) = decode(&mut buf, digests, 1 << 24) else {
        return;
    };
    let consumed = data.len() - buf.len();
    let wire = pdu.encode(digests).to_vec();
    assert_eq!(wire.len(), consumed);
    let dlen = pdu.data.len();
    let head = 48 + pdu.ahs.len() + if digests.header { 4 } else { 0 };
    assert_eq!(&wire[..head + dlen], &data[..head + dlen]);
    let mut again = BytesMut::from(&wire[..]);
    assert_eq!(decode(&mut again, digests, 1 << 24), Ok(Some(pdu.clone())));

    match pdu.bhs.opcode() {
        Opcode::SCSI_COMMAND => {
            if let Ok(c) = ScsiCommandReq::parse(&pdu) {
                assert_eq!(ScsiCommandReq::parse(&c.to_pdu()), Ok(c));
            }
        }
        Opcode::DATA_OUT => {
            let d = DataOut::parse(&pdu);
            assert_eq!(DataOut::parse(&d.to_pdu()), d);
        }
        Opcode::LOGIN_REQ => {
            let l = LoginReq::parse(&pdu);
            // The NSG of a request without T is meaningless and not re-encoded.
            let back = LoginReq::parse(&l.to_pdu());
            assert_eq!(back.isid, l.isid);
            assert_eq!(back.data, l.data);
        }
        Opcode::TEXT_REQ => {
            let t = TextReq::parse(&pdu);
            assert_eq!(TextReq::parse(&t.to_pdu()), t);
        }
        Opcode::TASK_MGMT_REQ => {
            let t = TmfReq::parse(&pdu);
            assert_eq!(TmfReq::parse(&t.to_pdu()), t);
        }
        Opcode::NOP_OUT => {
            let n = NopOut::parse(&pdu);
            assert_eq!(NopOut::parse(&n.to_pdu()), n);
        }
        Opcode::LOGOUT_REQ => {
            let l = LogoutReq::parse(&pdu);
            assert_eq!(LogoutReq::parse(&l.to_pdu()), l);
        }
        _ => {}
    }
});
