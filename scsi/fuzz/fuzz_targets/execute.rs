//! The whole command path: arbitrary CDB + Data-Out against a RAM LUN must
//! never panic and must produce a valid status with well-formed sense.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nvtarget_scsi::{status, ItNexus, LunConfig, MemDevice, ScsiCommand, ScsiTarget, TargetConfig, TaskAttr};

fn target() -> &'static ScsiTarget {
    static T: OnceLock<ScsiTarget> = OnceLock::new();
    T.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(2048, 512));
        let mut lun = LunConfig::new(0, dev);
        lun.removable = true;
        ScsiTarget::new(TargetConfig::single_port("iqn.fuzz"), vec![lun])
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize % 33).min(rest.len());
    let (cdb, out) = rest.split_at(at);
    let nexus = ItNexus {
        initiator_port: "iqn.fuzz-i,i,0x000000000001".into(),
        initiator_name: "iqn.fuzz-i".into(),
        isid: 1,
        relative_port: 1,
        tpgt: 1,
    };
    let r = target().execute(&ScsiCommand {
        lun: 0,
        cdb,
        attr: TaskAttr::Simple,
        data_out: out,
        expected_in_len: 1 << 20,
        nexus: &nexus,
    });
    match r.status {
        status::GOOD | status::CONDITION_MET | status::RESERVATION_CONFLICT => assert!(r.sense.is_empty()),
        status::CHECK_CONDITION => {
            let s = &r.sense;
            match s.first() {
                Some(0x70 | 0xf0) => assert!(s.len() == 18 && s[7] == 10),
                Some(0x72) => assert!(s.len() >= 8 && s[7] as usize == s.len() - 8),
                _ => panic!("malformed sense {s:02x?}"),
            }
        }
        other => panic!("unexpected status {other:#x}"),
    }
});
