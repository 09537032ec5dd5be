//! Command-level tests: a target with RAM LUNs driven through
//! `ScsiTarget::execute` exactly as the transport would.

use std::sync::Arc;

use proptest::prelude::*;

use crate::{
    status, ItNexus, LunConfig, MemDevice, ScsiCommand, ScsiResponse, ScsiTarget, TargetConfig,
    TaskAttr,
};

const BS: u32 = 512;
const BLOCKS: u64 = 4096;

fn nexus(name: &str, isid: u64) -> ItNexus {
    ItNexus {
        initiator_port: format!("{name},i,0x{isid:012x}"),
        initiator_name: name.into(),
        isid,
        relative_port: 1,
        tpgt: 1,
    }
}

struct H {
    t: ScsiTarget,
    dev: Arc<MemDevice>,
    a: ItNexus,
    b: ItNexus,
}

impl H {
    fn with(f: impl FnOnce(&mut LunConfig)) -> Self {
        let dev = Arc::new(MemDevice::new(BLOCKS, BS));
        let mut cfg = LunConfig::new(0, dev.clone());
        f(&mut cfg);
        let mut tc = TargetConfig::single_port("iqn.2026-11.io.nvtarget:test");
        tc.new_nexus_ua = true;
        let t = ScsiTarget::new(tc, vec![cfg]);
        let h = H {
            t,
            dev,
            a: nexus("iqn.a", 1),
            b: nexus("iqn.b", 2),
        };
        h.clear_ua(&h.a.clone());
        h.clear_ua(&h.b.clone());
        h
    }
    fn new() -> Self {
        Self::with(|_| {})
    }
    fn run_lun(&self, n: &ItNexus, lun: u64, cdb: &[u8], out: &[u8]) -> ScsiResponse {
        self.t.execute(&ScsiCommand {
            lun,
            cdb,
            attr: TaskAttr::Simple,
            data_out: out,
            expected_in_len: 1 << 24,
            nexus: n,
        })
    }
    fn run(&self, n: &ItNexus, cdb: &[u8], out: &[u8]) -> ScsiResponse {
        self.run_lun(n, 0, cdb, out)
    }
    fn ok(&self, cdb: &[u8], out: &[u8]) -> Vec<u8> {
        let r = self.run(&self.a, cdb, out);
        assert_eq!(
            r.status,
            status::GOOD,
            "cdb {cdb:02x?} sense {:02x?}",
            r.sense
        );
        r.data
    }
    /// (sense key, ASC/ASCQ) of a CHECK CONDITION.
    fn err(&self, n: &ItNexus, cdb: &[u8], out: &[u8]) -> (u8, u16) {
        let r = self.run(n, cdb, out);
        assert_eq!(r.status, status::CHECK_CONDITION, "cdb {cdb:02x?}");
        sense_of(&r.sense)
    }
    fn clear_ua(&self, n: &ItNexus) {
        for _ in 0..10 {
            if self.run(n, &[0; 6], &[]).status == status::GOOD {
                return;
            }
        }
        panic!("unit attention never cleared");
    }
}

fn sense_of(s: &[u8]) -> (u8, u16) {
    if s[0] & 0x7f >= 0x72 {
        (s[1] & 0xf, u16::from_be_bytes([s[2], s[3]]))
    } else {
        (s[2] & 0xf, u16::from_be_bytes([s[12], s[13]]))
    }
}

fn rw16(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

const ILLEGAL: u8 = 5;

#[test]
fn first_command_reports_power_on_then_clears() {
    let h = H::new();
    let c = nexus("iqn.c", 3);
    // INQUIRY does not consume the unit attention.
    assert_eq!(h.run(&c, &[0x12, 0, 0, 0, 36, 0], &[]).status, status::GOOD);
    assert_eq!(h.err(&c, &[0; 6], &[]), (6, 0x2900));
    assert_eq!(h.run(&c, &[0; 6], &[]).status, status::GOOD);
}

#[test]
fn no_power_on_ua_for_new_nexus_by_default() {
    let dev = Arc::new(MemDevice::new(BLOCKS, BS));
    let t = ScsiTarget::new(TargetConfig::single_port("t"), vec![LunConfig::new(0, dev)]);
    let n = nexus("iqn.d", 4);
    let r = t.execute(&ScsiCommand {
        lun: 0,
        cdb: &[0; 6],
        attr: TaskAttr::Simple,
        data_out: &[],
        expected_in_len: 0,
        nexus: &n,
    });
    assert_eq!(r.status, status::GOOD);
}

#[test]
fn unknown_opcode_and_lun() {
    let h = H::new();
    assert_eq!(h.err(&h.a, &[0x02, 0, 0, 0, 0, 0], &[]), (ILLEGAL, 0x2000));
    let r = h.run_lun(&h.a, 7, &[0; 6], &[]);
    assert_eq!(sense_of(&r.sense), (ILLEGAL, 0x2500));
    let r = h.run_lun(&h.a, 7, &[0x12, 0, 0, 0, 96, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data[0], 0x7f);
}

#[test]
fn inquiry_standard_and_vpd() {
    let h = H::new();
    let d = h.ok(&[0x12, 0, 0, 0x01, 0, 0], &[]);
    assert_eq!(d.len(), 96);
    assert_eq!(d[2], 6);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(&d[8..16], b"NVTARGET");
    assert_eq!(h.ok(&[0x12, 0, 0, 0, 5, 0], &[]).len(), 5);
    // EVPD=0 with a page code.
    assert_eq!(
        h.err(&h.a, &[0x12, 0, 0x80, 0, 255, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    // CMDDT (obsolete) is rejected.
    assert_eq!(
        h.err(&h.a, &[0x12, 0x02, 0, 0, 255, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    let pages = h.ok(&[0x12, 1, 0, 0, 255, 0], &[]);
    for &p in &pages[4..] {
        let v = h.ok(&[0x12, 1, p, 0, 255, 0], &[]);
        assert_eq!(v[1], p);
        assert_eq!(u16::from_be_bytes([v[2], v[3]]) as usize, v.len() - 4);
    }
    let bl = h.ok(&[0x12, 1, 0xb0, 0, 255, 0], &[]);
    assert_eq!(bl[3], 0x3c);
    assert_eq!(
        h.err(&h.a, &[0x12, 1, 0xc7, 0, 255, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    let lbp = h.ok(&[0x12, 1, 0xb2, 0, 255, 0], &[]);
    assert_eq!(lbp[5] & 0xe4, 0xe4);
    let id = h.ok(&[0x12, 1, 0x83, 0, 255, 0], &[]);
    assert_eq!(id[5] & 0x0f, 3, "NAA first");
}

#[test]
fn read_capacity() {
    let h = H::new();
    let d = h.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        BLOCKS as u32 - 1
    );
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let d = h.ok(&c, &[]);
    assert_eq!(d.len(), 32);
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    for alloc in 0..16u8 {
        c[13] = alloc;
        assert_eq!(h.ok(&c, &[]).len(), alloc as usize);
    }
}

#[test]
fn read_write_round_trip_and_bounds() {
    let h = H::new();
    let data: Vec<u8> = (0..BS as usize * 4).map(|i| i as u8).collect();
    h.ok(&rw10(0x2a, 10, 4), &data);
    assert_eq!(h.ok(&rw10(0x28, 10, 4), &[]), data);
    assert_eq!(h.ok(&rw16(0x88, 10, 4), &[]), data);
    // Zero length is GOOD, no data.
    assert!(h.ok(&rw10(0x28, 0, 0), &[]).is_empty());
    // Past the end.
    assert_eq!(
        h.err(&h.a, &rw10(0x28, BLOCKS as u32, 1), &[]),
        (ILLEGAL, 0x2100)
    );
    assert_eq!(
        h.err(&h.a, &rw16(0x88, u64::MAX, 1), &[]),
        (ILLEGAL, 0x2100)
    );
    assert_eq!(
        h.err(&h.a, &rw10(0x28, BLOCKS as u32 + 1, 0), &[]),
        (ILLEGAL, 0x2100)
    );
    // RDPROTECT without protection information.
    let mut c = rw10(0x28, 0, 1);
    c[1] = 0x20;
    assert_eq!(h.err(&h.a, &c, &[]), (ILLEGAL, 0x2400));
    // DPO/FUA are accepted.
    c[1] = 0x18;
    assert_eq!(h.ok(&c, &[]).len(), BS as usize);
    // READ(6) length 0 means 256 blocks.
    assert_eq!(h.ok(&[0x08, 0, 0, 0, 0, 0], &[]).len(), 256 * BS as usize);
    // A short Data-Out writes only the whole blocks that arrived.
    h.ok(&rw10(0x2a, 0, 2), &[0xaa; BS as usize]);
    let back = h.ok(&rw10(0x28, 0, 2), &[]);
    assert!(back[..BS as usize].iter().all(|&b| b == 0xaa));
    assert!(back[BS as usize..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_lun_rejects_writes() {
    let h = H::with(|c| c.read_only = true);
    assert_eq!(h.err(&h.a, &rw10(0x2a, 0, 1), &[0; 512]), (7, 0x2700));
    let ms = h.ok(&[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(ms[2] & 0x80, 0x80, "WP");
}

#[test]
fn verify_and_miscompare() {
    let h = H::new();
    h.ok(&rw10(0x2a, 0, 2), &[7u8; 1024]);
    let mut c = rw10(0x2f, 0, 2);
    c[1] = 0x02; // BYTCHK=1
    h.ok(&c, &[7u8; 1024]);
    let mut bad = vec![7u8; 1024];
    bad[700] = 8;
    let r = h.run(&h.a, &c, &bad);
    assert_eq!(sense_of(&r.sense), (0x0e, 0x1d00));
    assert_eq!(&r.sense[3..7], &700u32.to_be_bytes());
    // BYTCHK=0: medium verification only.
    h.ok(&rw10(0x2f, 0, 2), &[]);
    // VRPROTECT.
    let mut c = rw10(0x2f, 0, 1);
    c[1] = 0x20;
    assert_eq!(h.err(&h.a, &c, &[]), (ILLEGAL, 0x2400));
}

#[test]
fn compare_and_write() {
    let h = H::new();
    h.ok(&rw10(0x2a, 5, 1), &[b'A'; 512]);
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&5u64.to_be_bytes());
    c[13] = 1;
    let mut buf = vec![b'A'; 512];
    buf.extend_from_slice(&[b'B'; 512]);
    h.ok(&c, &buf);
    assert_eq!(h.ok(&rw10(0x28, 5, 1), &[]), vec![b'B'; 512]);
    // Miscompare: data unchanged, offset reported.
    let r = h.run(&h.a, &c, &buf);
    assert_eq!(sense_of(&r.sense), (0x0e, 0x1d00));
    assert_eq!(&r.sense[3..7], &0u32.to_be_bytes());
    // Wrong Data-Out size.
    assert_eq!(h.err(&h.a, &c, &buf[..512]).0, ILLEGAL);
    // Over the limit.
    c[13] = 255;
    h.ok(&rw16(0x8a, 0, 255), &vec![0u8; 255 * 512]);
    let ok = vec![0u8; 2 * 255 * 512];
    c[2..10].copy_from_slice(&0u64.to_be_bytes());
    h.ok(&c, &ok);
}

#[test]
fn write_same_and_unmap() {
    let h = H::new();
    let mut c = rw10(0x41, 100, 8);
    h.ok(&c, &[0x5a; 512]);
    assert!(h.ok(&rw10(0x28, 100, 8), &[]).iter().all(|&b| b == 0x5a));
    // UNMAP bit with zeros deallocates.
    c[1] = 0x08;
    h.ok(&c, &[0; 512]);
    assert!(!h.dev.is_mapped(100));
    // Wrong Data-Out size, ANCHOR.
    assert_eq!(h.err(&h.a, &c, &[0; 1024]).0, ILLEGAL);
    c[1] = 0x10;
    assert_eq!(h.err(&h.a, &c, &[0; 512]), (ILLEGAL, 0x2400));
    // Zero blocks means "to the end".
    let c = rw10(0x41, BLOCKS as u32 - 3, 0);
    h.ok(&c, &[1; 512]);
    assert!(h
        .ok(&rw10(0x28, BLOCKS as u32 - 3, 3), &[])
        .iter()
        .all(|&b| b == 1));
    assert_eq!(
        h.err(&h.a, &rw10(0x41, BLOCKS as u32 + 1, 1), &[0; 512]),
        (ILLEGAL, 0x2100)
    );
    // WRITE SAME(16) with NDOB.
    let mut c = rw16(0x93, 200, 4);
    c[1] = 0x09;
    h.ok(&c, &[]);

    // UNMAP.
    h.ok(&rw10(0x2a, 0, 4), &[9u8; 2048]);
    let mut p = vec![0u8; 24];
    p[1] = 22;
    p[3] = 16;
    p[8..16].copy_from_slice(&1u64.to_be_bytes());
    p[16..20].copy_from_slice(&2u32.to_be_bytes());
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[8] = 24;
    h.ok(&c, &p);
    assert!(h.dev.is_mapped(0) && !h.dev.is_mapped(1) && !h.dev.is_mapped(2) && h.dev.is_mapped(3));
    // Past the end.
    p[8..16].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    assert_eq!(h.err(&h.a, &c, &p), (ILLEGAL, 0x2100));
    // Short parameter list.
    c[8] = 4;
    assert_eq!(h.err(&h.a, &c, &p), (ILLEGAL, 0x1a00));
}

#[test]
fn get_lba_status() {
    let h = H::new();
    h.ok(&rw10(0x2a, 8, 2), &[1u8; 1024]);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&8u64.to_be_bytes());
    c[13] = 24;
    let d = h.ok(&c, &[]);
    assert_eq!(d.len(), 24);
    assert_eq!(&d[8..16], &8u64.to_be_bytes());
    assert_eq!(&d[16..20], &2u32.to_be_bytes());
    assert_eq!(d[20], 0);
    c[2..10].copy_from_slice(&10u64.to_be_bytes());
    assert_eq!(h.ok(&c, &[])[20], 1);
    c[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(h.err(&h.a, &c, &[]), (ILLEGAL, 0x2100));
    c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(h.err(&h.a, &c, &[]), (ILLEGAL, 0x2100));
}

#[test]
fn mode_sense_select_swp_and_dsense() {
    let h = H::new();
    let all = h.ok(&[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(all[0] as usize, all.len() - 1);
    assert_eq!(all[3], 8);
    assert_eq!(h.ok(&[0x1a, 0, 0x3f, 0, 4, 0], &[]).len(), 4);
    assert_eq!(
        h.err(&h.a, &[0x1a, 0, 0x05, 0, 255, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    assert_eq!(
        h.err(&h.a, &[0x1a, 0, 0xca, 0, 255, 0], &[]),
        (ILLEGAL, 0x3900)
    );
    let chg = h.ok(&[0x1a, 0x08, 0x4a, 0, 255, 0], &[]);
    assert_eq!(chg[4 + 4] & 0x08, 0x08, "SWP changeable");
    // Set SWP through MODE SELECT(6) from nexus B.
    let cur = {
        let r = h.run(&h.b, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
        r.data
    };
    let mut p = vec![0u8; 4];
    p.extend_from_slice(&cur[4..]);
    p[4 + 4] |= 0x08;
    let r = h.run(&h.b, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p);
    assert_eq!(r.status, status::GOOD, "{:02x?}", r.sense);
    // A gets MODE PARAMETERS CHANGED, then writes fail.
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a01));
    assert_eq!(h.err(&h.a, &rw10(0x2a, 0, 1), &[0; 512]), (7, 0x2702));
    // Changing an unchangeable bit is rejected.
    let mut bad = p.clone();
    bad[4 + 3] ^= 0x02;
    assert_eq!(
        h.err(&h.b, &[0x15, 0x10, 0, 0, bad.len() as u8, 0], &bad),
        (ILLEGAL, 0x2600)
    );
    // D_SENSE switches to descriptor sense.
    p[4 + 4] &= !0x08;
    p[4 + 2] |= 0x04;
    assert_eq!(
        h.run(&h.b, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p)
            .status,
        status::GOOD
    );
    h.clear_ua(&h.a);
    let r = h.run(&h.a, &rw16(0x88, u64::MAX, 1), &[]);
    assert_eq!(r.sense[0], 0x72);
    assert_eq!(sense_of(&r.sense), (ILLEGAL, 0x2100));
}

#[test]
fn reserve6_conflicts_and_release_on_nexus_loss() {
    let h = H::new();
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        h.run(&h.b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        h.run(&h.b, &[0x1a, 0, 0x3f, 0, 255, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        h.run(&h.b, &[0x12, 0, 0, 0, 36, 0], &[]).status,
        status::GOOD
    );
    // RELEASE from a non-holder is a no-op.
    assert_eq!(
        h.run(&h.b, &[0x17, 0, 0, 0, 0, 0], &[]).status,
        status::GOOD
    );
    assert_eq!(
        h.run(&h.b, &[0; 6], &[]).status,
        status::RESERVATION_CONFLICT
    );
    h.t.nexus_loss(&h.a);
    assert_eq!(
        h.run(&h.b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::GOOD
    );
    // A's next session learns of the nexus loss.
    assert_eq!(h.err(&h.a, &[0; 6], &[]).1, 0x2907);
}

#[test]
fn lun_reset_releases_reserve6_and_notifies_others() {
    let h = H::new();
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        h.t.task_mgmt(crate::TmfFunction::LogicalUnitReset, 0, &h.a),
        crate::TmfResponse::Complete
    );
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2903));
    assert_eq!(h.err(&h.b, &[0; 6], &[]), (6, 0x2903));
    assert_eq!(
        h.run(&h.b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::GOOD
    );
}

fn prout(sa: u8, rtype: u8, key: u64, sa_key: u64, flags: u8) -> (Vec<u8>, Vec<u8>) {
    let mut c = vec![0u8; 10];
    c[0] = 0x5f;
    c[1] = sa;
    c[2] = rtype;
    c[8] = 24;
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    (c, p)
}

fn pr(h: &H, n: &ItNexus, sa: u8, rtype: u8, key: u64, sa_key: u64) -> u8 {
    let (c, p) = prout(sa, rtype, key, sa_key, 0);
    h.run(n, &c, &p).status
}

fn read_keys(h: &H, n: &ItNexus) -> Vec<u64> {
    let r = h.run(n, &[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    r.data[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn persistent_reservation_access_table() {
    // (type, registered B can read, can write, unregistered B can read, can write)
    let table = [
        (1u8, true, false, true, false),
        (3, false, false, false, false),
        (5, true, true, true, false),
        (6, true, true, false, false),
        (7, true, true, true, false),
        (8, true, true, false, false),
    ];
    for (t, rr, rw, ur, uw) in table {
        let h = H::new();
        assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
        assert_eq!(pr(&h, &h.b, 6, 0, 0, 0xb), status::GOOD);
        assert_eq!(pr(&h, &h.a, 1, t, 0xa, 0), status::GOOD);
        let can = |n: &ItNexus, cdb: &[u8], out: &[u8]| h.run(n, cdb, out).status == status::GOOD;
        assert!(can(&h.a, &rw10(0x28, 0, 1), &[]));
        assert!(can(&h.a, &rw10(0x2a, 0, 1), &[0; 512]));
        assert_eq!(can(&h.b, &rw10(0x28, 0, 1), &[]), rr, "type {t} reg read");
        assert_eq!(
            can(&h.b, &rw10(0x2a, 0, 1), &[0; 512]),
            rw,
            "type {t} reg write"
        );
        assert_eq!(pr(&h, &h.b, 0, 0, 0xb, 0), status::GOOD);
        assert_eq!(can(&h.b, &rw10(0x28, 0, 1), &[]), ur, "type {t} unreg read");
        assert_eq!(
            can(&h.b, &rw10(0x2a, 0, 1), &[0; 512]),
            uw,
            "type {t} unreg write"
        );
        // TEST UNIT READY and INQUIRY are always allowed.
        assert!(can(&h.b, &[0; 6], &[]));
        assert_eq!(pr(&h, &h.a, 2, t, 0xa, 0), status::GOOD);
        assert_eq!(pr(&h, &h.a, 0, 0, 0xa, 0), status::GOOD);
    }
}

#[test]
fn reservation_holder_unregistering_releases_without_stray_ua() {
    for (t, shared) in [
        (1u8, false),
        (3, false),
        (5, false),
        (6, false),
        (7, true),
        (8, true),
    ] {
        let h = H::new();
        assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
        assert_eq!(pr(&h, &h.b, 6, 0, 0, 0xb), status::GOOD);
        assert_eq!(pr(&h, &h.a, 1, t, 0xa, 0), status::GOOD);
        assert_eq!(pr(&h, &h.a, 0, 0, 0xa, 0), status::GOOD);
        // A (the one that unregistered) must see no unit attention.
        let r = h.run(&h.a, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 0x20, 0], &[]);
        assert_eq!(r.status, status::GOOD, "type {t}: {:02x?}", r.sense);
        let reserved = u32::from_be_bytes([r.data[4], r.data[5], r.data[6], r.data[7]]) != 0;
        assert_eq!(reserved, shared, "type {t}");
        if shared {
            assert_eq!(r.data[21] & 0x0f, t);
            assert_eq!(&r.data[8..16], &[0; 8], "all-registrants key is 0");
            assert_eq!(pr(&h, &h.b, 2, t, 0xb, 0), status::GOOD);
        }
        // Only registrants-only types notify the remaining registrants.
        let rb = h.run(&h.b, &[0; 6], &[]);
        if t == 5 || t == 6 {
            assert_eq!(sense_of(&rb.sense), (6, 0x2a04));
        } else {
            assert_eq!(rb.status, status::GOOD, "type {t}");
        }
    }
}

#[test]
fn pr_register_rules_generation_and_preempt() {
    let h = H::new();
    // Unregistered nexus with a non-zero key: conflict.
    assert_eq!(pr(&h, &h.a, 0, 0, 5, 6), status::RESERVATION_CONFLICT);
    assert_eq!(pr(&h, &h.a, 0, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.a, 0, 0, 0xbad, 0xc), status::RESERVATION_CONFLICT);
    assert_eq!(pr(&h, &h.b, 6, 0, 0, 0xb), status::GOOD);
    assert_eq!(read_keys(&h, &h.a), vec![0xa, 0xb]);
    // B preempts A's registration (no reservation): A gets 2A/05.
    assert_eq!(pr(&h, &h.b, 4, 3, 0xb, 0xa), status::GOOD);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a05));
    assert_eq!(read_keys(&h, &h.a), vec![0xb]);
    // Preempting a key nobody has: conflict.
    assert_eq!(pr(&h, &h.b, 4, 3, 0xb, 0x77), status::RESERVATION_CONFLICT);
    // CLEAR.
    assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.b, 3, 0, 0xb, 0), status::GOOD);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a03));
    assert!(read_keys(&h, &h.a).is_empty());
    // SPEC_I_PT is not supported; wrong parameter list length.
    let (c, p) = prout(0, 0, 0, 1, 0x08);
    assert_eq!(h.err(&h.a, &c, &p), (ILLEGAL, 0x2600));
    let (mut c, p) = prout(0, 0, 0, 1, 0);
    c[8] = 20;
    assert_eq!(h.err(&h.a, &c, &p), (ILLEGAL, 0x1a00));
    // PRIN service actions 4.. are invalid.
    assert_eq!(
        h.err(&h.a, &[0x5e, 4, 0, 0, 0, 0, 0, 0, 0x20, 0], &[]),
        (ILLEGAL, 0x2400)
    );
}

#[test]
fn prin_full_status_and_capabilities() {
    let h = H::new();
    assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.a, 1, 1, 0xa, 0), status::GOOD);
    let d = h.ok(&[0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
    assert_eq!(len, d.len() - 8);
    assert_eq!(&d[8..16], &0xau64.to_be_bytes());
    assert_eq!(d[20] & 1, 1, "R_HOLDER");
    assert_eq!(d[21], 1);
    assert_eq!(d[32], 0x45, "iSCSI TransportID, port format");
    let caps = h.ok(&[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[]);
    assert_eq!(caps[1], 8);
    assert_eq!(caps[4], 0xea);
}

#[test]
fn report_luns_and_supported_opcodes() {
    let h = H::new();
    let d = h.ok(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]);
    assert_eq!(&d[0..4], &8u32.to_be_bytes());
    assert_eq!(
        h.err(&h.a, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    assert_eq!(
        h.err(&h.a, &[0xa0, 0, 3, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    let all = h.ok(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0], &[]);
    let n = u32::from_be_bytes([all[0], all[1], all[2], all[3]]) as usize;
    assert_eq!(n, all.len() - 4);
    for d in all[4..].chunks(8) {
        let servactv = d[5] & 1 != 0;
        let opts = if servactv { 2 } else { 1 };
        let one = h.ok(
            &[0xa3, 0x0c, opts, d[0], d[2], d[3], 0, 0, 0xff, 0xff, 0, 0],
            &[],
        );
        assert_eq!(one[1] & 7, 3);
        assert_eq!(one[4], d[0]);
        let wrong = if servactv { 1 } else { 2 };
        assert_eq!(
            h.err(
                &h.a,
                &[0xa3, 0x0c, wrong, d[0], d[2], d[3], 0, 0, 0xff, 0xff, 0, 0],
                &[]
            )
            .1,
            0x2400
        );
    }
    let rctd = h.ok(&[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0], &[]);
    assert_eq!(rctd[4 + 5] & 2, 2);
    assert_eq!(&rctd[4 + 8..4 + 10], &[0, 0x0a]);
}

#[test]
fn sanitize_overwrite_and_validation() {
    let h = H::new();
    h.ok(&rw10(0x2a, 0, 1), &[b'a'; 512]);
    let mut p = vec![0x01, 0, 0, 4, 1, 2, 3, 4];
    let c = |len: u16, sa: u8| {
        let mut c = vec![0x48, sa, 0, 0, 0, 0, 0, 0, 0, 0];
        c[7..9].copy_from_slice(&len.to_be_bytes());
        c
    };
    h.ok(&c(8, 1), &p);
    assert_eq!(
        &h.ok(&rw10(0x28, BLOCKS as u32 - 1, 1), &[])[..8],
        &[1, 2, 3, 4, 1, 2, 3, 4]
    );
    for len in 0..5 {
        assert_eq!(h.err(&h.a, &c(len, 1), &p).1 >> 8, 0x24);
    }
    p[0] = 0; // OWCOUNT 0
    assert_eq!(h.err(&h.a, &c(8, 1), &p).1 >> 8, 0x26);
    // Reserved bit in byte 1 and reserved bytes.
    let mut bad = c(0, 2);
    bad[1] |= 0x40;
    assert_eq!(h.err(&h.a, &bad, &[]), (ILLEGAL, 0x2400));
    let mut bad = c(0, 2);
    bad[3] = 1;
    assert_eq!(h.err(&h.a, &bad, &[]), (ILLEGAL, 0x2400));
    // Block erase deallocates everything; with a parameter list it is invalid.
    h.ok(&c(0, 2), &[]);
    assert!(!h.dev.is_mapped(0));
    assert_eq!(h.err(&h.a, &c(8, 2), &[0; 8]), (ILLEGAL, 0x2400));
    h.ok(&c(0, 3), &[]);
    assert_eq!(h.err(&h.a, &c(8, 0x1f), &[0; 8]), (ILLEGAL, 0x2400));
    h.ok(&c(0, 0x1f), &[]);
    for sa in [0u8, 4, 5, 0x1e] {
        assert_eq!(h.err(&h.a, &c(0, sa), &[]), (ILLEGAL, 0x2400));
    }
}

#[test]
fn sanitize_conflicts_with_reserve6_of_other_initiator() {
    let h = H::new();
    assert_eq!(
        h.run(&h.b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::GOOD
    );
    let r = h.run(&h.a, &[0x48, 2, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
}

fn xcopy_list(h: &H, src: u64, dst: u64, blocks: u16, dst_index: u16) -> Vec<u8> {
    let id = h.ok(&[0x12, 1, 0x83, 0, 255, 0], &[]);
    let naa = &id[4..4 + 4 + id[7] as usize];
    let mut p = vec![0u8; 16];
    p[0] = 1;
    p[3] = 32;
    p[11] = 28;
    let mut t = vec![0u8; 32];
    t[0] = 0xe4;
    t[4..4 + naa.len()].copy_from_slice(naa);
    t[29..32].copy_from_slice(&BS.to_be_bytes()[1..]);
    p.extend(t);
    let mut s = vec![0u8; 28];
    s[0] = 0x02;
    s[3] = 0x18;
    s[6..8].copy_from_slice(&dst_index.to_be_bytes());
    s[10..12].copy_from_slice(&blocks.to_be_bytes());
    s[12..20].copy_from_slice(&src.to_be_bytes());
    s[20..28].copy_from_slice(&dst.to_be_bytes());
    p.extend(s);
    p
}

fn xcopy_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

#[test]
fn extended_copy_and_results() {
    let h = H::new();
    h.ok(&rw10(0x2a, 0, 4), &[b'X'; 2048]);
    let p = xcopy_list(&h, 0, 1000, 4, 0);
    // No results yet for list id 1.
    assert_eq!(
        h.err(
            &h.a,
            &[0x84, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0],
            &[]
        ),
        (ILLEGAL, 0x2400)
    );
    h.ok(&xcopy_cdb(p.len()), &p);
    assert_eq!(h.ok(&rw10(0x28, 1000, 4), &[]), vec![b'X'; 2048]);
    let st = h.ok(&[0x84, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0], &[]);
    assert_eq!(st[4], 1);
    let opp = h.ok(&[0x84, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0], &[]);
    assert_eq!(
        u32::from_be_bytes([opp[0], opp[1], opp[2], opp[3]]) as usize,
        opp.len() - 4
    );
    // Truncated list, bad index, beyond the end, empty list.
    assert_eq!(
        h.err(&h.a, &xcopy_cdb(p.len() - 1), &p[..p.len() - 1]),
        (ILLEGAL, 0x1a00)
    );
    let bad = xcopy_list(&h, 0, 0, 4, 1);
    assert_eq!(h.err(&h.a, &xcopy_cdb(bad.len()), &bad).0, 0x0a);
    let bad = xcopy_list(&h, 0, BLOCKS - 1, 4, 0);
    assert_eq!(h.err(&h.a, &xcopy_cdb(bad.len()), &bad).0, 0x0a);
    h.ok(&xcopy_cdb(0), &[]);
    // Unsupported descriptor types.
    let mut bad = p.clone();
    bad[16] = 0xe0;
    assert_eq!(h.err(&h.a, &xcopy_cdb(bad.len()), &bad), (ILLEGAL, 0x2607));
    let mut bad = p.clone();
    bad[48] = 0x03;
    assert_eq!(h.err(&h.a, &xcopy_cdb(bad.len()), &bad), (ILLEGAL, 0x2609));
}

#[test]
fn removable_medium_prevent_and_eject() {
    let h = H::with(|c| c.removable = true);
    assert_eq!(h.ok(&[0x12, 0, 0, 0, 36, 0], &[])[1], 0x80);
    h.ok(&[0x1e, 0, 0, 0, 1, 0], &[]);
    assert_eq!(
        h.err(&h.a, &[0x1b, 0, 0, 0, 0x02, 0], &[]),
        (ILLEGAL, 0x5302)
    );
    assert_eq!(
        h.err(&h.b, &[0x1b, 0, 0, 0, 0x02, 0], &[]),
        (ILLEGAL, 0x5302)
    );
    h.ok(&[0x1e, 0, 0, 0, 0, 0], &[]);
    h.ok(&[0x1b, 0, 0, 0, 0x02, 0], &[]);
    assert_eq!(h.err(&h.a, &[0; 6], &[]).1 >> 8, 0x3a);
    assert_eq!(
        h.err(&h.a, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).1 >> 8,
        0x3a
    );
    // Without LOEJ, START/STOP changes nothing.
    h.ok(&[0x1b, 0, 0, 0, 0x03, 0], &[]);
    h.ok(&[0; 6], &[]);
    // Loading is refused too while prevented.
    h.ok(&[0x1b, 0, 0, 0, 0x02, 0], &[]);
    h.ok(&[0x1e, 0, 0, 0, 1, 0], &[]);
    assert_eq!(
        h.err(&h.a, &[0x1b, 0, 0, 0, 0x03, 0], &[]),
        (ILLEGAL, 0x5302)
    );
    h.ok(&[0x1e, 0, 0, 0, 0, 0], &[]);
    h.ok(&[0x1b, 0, 0, 0, 0x03, 0], &[]);
    // PREVENT is dropped on LU reset.
    h.ok(&[0x1e, 0, 0, 0, 1, 0], &[]);
    h.t.task_mgmt(crate::TmfFunction::LogicalUnitReset, 0, &h.a);
    h.clear_ua(&h.a);
    h.ok(&[0x1b, 0, 0, 0, 0x02, 0], &[]);
    h.ok(&[0x1b, 0, 0, 0, 0x03, 0], &[]);
}

#[test]
fn alua_state_change_and_rtpg() {
    let h = H::new();
    let d = h.ok(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(d[4] & 0x0f, 0);
    assert!(h.t.set_alua_state(1, crate::AluaState::Standby));
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a06));
    assert_eq!(h.err(&h.a, &rw10(0x28, 0, 1), &[]), (2, 0x040b));
    let d = h.ok(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(d[4] & 0x0f, 2);
}

#[test]
fn warm_reset_spares_the_issuer() {
    let h = H::new();
    assert_eq!(
        h.t.task_mgmt(crate::TmfFunction::TargetWarmReset, 0, &h.a),
        crate::TmfResponse::Complete
    );
    assert_eq!(h.run(&h.a, &[0; 6], &[]).status, status::GOOD);
    assert_eq!(h.err(&h.b, &[0; 6], &[]), (6, 0x2900));
}

#[test]
fn capacity_change_is_reported() {
    let h = H::new();
    h.dev.resize(BLOCKS * 2);
    h.t.resize_lun(0);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a09));
    let d = h.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        BLOCKS as u32 * 2 - 1
    );
}

#[test]
fn aptpl_survives_restart() {
    #[derive(Default)]
    struct Store(parking_lot::Mutex<Option<Vec<u8>>>);
    impl crate::PrStore for Store {
        fn save(&self, d: &[u8]) -> std::io::Result<()> {
            *self.0.lock() = Some(d.to_vec());
            Ok(())
        }
        fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
            Ok(self.0.lock().clone())
        }
    }
    let store = Arc::new(Store::default());
    let s2 = store.clone();
    let h = H::with(|c| c.pr_store = Some(s2));
    let (c, p) = prout(6, 0, 0, 0xa, 0x01);
    h.ok(&c, &p);
    let mut cfg = LunConfig::new(0, h.dev.clone());
    cfg.pr_store = Some(store);
    let mut tc = TargetConfig::new("t");
    tc.new_nexus_ua = true;
    let t2 = ScsiTarget::new(tc, vec![cfg]);
    let run = |cdb: &[u8]| {
        t2.execute(&ScsiCommand {
            lun: 0,
            cdb,
            attr: TaskAttr::Simple,
            data_out: &[],
            expected_in_len: 4096,
            nexus: &h.a,
        })
    };
    assert_eq!(sense_of(&run(&[0; 6]).sense), (6, 0x2900));
    let r = run(&[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    assert_eq!(&r.data[8..16], &0xau64.to_be_bytes());
}

#[test]
fn concurrent_compare_and_write_is_atomic() {
    let h = Arc::new(H::new());
    h.ok(&rw10(0x2a, 0, 1), &[0u8; 512]);
    // Each thread increments a counter in block 0 with CAW; lost updates
    // would show up as a final value below the number of successes.
    let mut handles = Vec::new();
    for _ in 0..4 {
        let h = h.clone();
        handles.push(std::thread::spawn(move || {
            let mut done = 0u32;
            while done < 50 {
                let cur = h.ok(&rw10(0x28, 0, 1), &[]);
                let v = u32::from_be_bytes([cur[0], cur[1], cur[2], cur[3]]);
                let mut next = cur.clone();
                next[..4].copy_from_slice(&(v + 1).to_be_bytes());
                let mut buf = cur;
                buf.extend(next);
                let mut c = [0u8; 16];
                c[0] = 0x89;
                c[13] = 1;
                if h.run(&h.a, &c, &buf).status == status::GOOD {
                    done += 1;
                }
            }
        }));
    }
    for t in handles {
        t.join().unwrap();
    }
    let cur = h.ok(&rw10(0x28, 0, 1), &[]);
    assert_eq!(u32::from_be_bytes([cur[0], cur[1], cur[2], cur[3]]), 200);
}

fn well_formed(r: &ScsiResponse) -> bool {
    match r.status {
        status::GOOD | status::CONDITION_MET | status::RESERVATION_CONFLICT => r.sense.is_empty(),
        status::CHECK_CONDITION => match r.sense.first() {
            Some(0x70) | Some(0xf0) => r.sense.len() == 18 && r.sense[7] == 10,
            Some(0x72) => r.sense.len() >= 8 && r.sense[7] as usize == r.sense.len() - 8,
            _ => false,
        },
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_cdbs_never_panic(
        cdb in proptest::collection::vec(any::<u8>(), 0..20),
        out in proptest::collection::vec(any::<u8>(), 0..1200),
        lun in 0u64..2,
    ) {
        thread_local!(static H0: H = H::with(|c| c.removable = true));
        H0.with(|h| {
            let r = h.run_lun(&h.a, lun, &cdb, &out);
            prop_assert!(well_formed(&r), "cdb {:02x?} -> {} {:02x?}", cdb, r.status, r.sense);
            Ok(())
        })?;
    }

    #[test]
    fn random_parameter_lists_never_panic(
        op in prop::sample::select(vec![0x15u8, 0x55, 0x5f, 0x42, 0x83, 0x48, 0x89, 0x41, 0x93, 0xa4]),
        b1 in any::<u8>(),
        b2 in any::<u8>(),
        out in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let h = H::new();
        let len = crate::cdb::cdb_len(op).unwrap_or(16);
        let mut cdb = vec![0u8; len];
        cdb[0] = op;
        cdb[1] = b1 & 0x1f;
        cdb[2] = b2;
        // Parameter list length in every place it can live.
        let l = out.len() as u32;
        if len == 6 { cdb[4] = l.min(255) as u8; }
        if len == 10 { cdb[7..9].copy_from_slice(&(l as u16).to_be_bytes()); cdb[5..9].copy_from_slice(&l.to_be_bytes()); }
        if len >= 12 { cdb[6..10].copy_from_slice(&l.to_be_bytes()); }
        if len == 16 { cdb[10..14].copy_from_slice(&l.to_be_bytes()); }
        let r = h.run(&h.a, &cdb, &out);
        prop_assert!(well_formed(&r));
    }
}

#[test]
fn small_commands() {
    let h = H::new();
    // REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, with and without REPD.
    assert_eq!(
        h.ok(&[0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &[]),
        vec![0xda, 0, 0, 0]
    );
    assert_eq!(
        h.ok(&[0xa3, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[])
            .len(),
        16
    );
    // READ DEFECT DATA: empty lists.
    assert_eq!(
        h.ok(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 4, 0], &[]),
        vec![0, 0x18, 0, 0]
    );
    assert_eq!(
        h.ok(&[0xb7, 0x18, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[]).len(),
        8
    );
    // PRE-FETCH and SYNCHRONIZE CACHE: GOOD in range, LBA OUT OF RANGE beyond.
    h.ok(&rw10(0x34, 0, 8), &[]);
    assert_eq!(
        h.err(&h.a, &rw10(0x34, BLOCKS as u32, 1), &[]),
        (ILLEGAL, 0x2100)
    );
    h.ok(&rw10(0x35, 0, 0), &[]);
    h.ok(&rw16(0x91, 0, 0), &[]);
    assert_eq!(h.err(&h.a, &rw16(0x91, BLOCKS, 1), &[]), (ILLEGAL, 0x2100));
    // REQUEST SENSE with nothing pending: NO SENSE, fixed or descriptor.
    let s = h.ok(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((s[0], s[2], s[12]), (0x70, 0, 0));
    assert_eq!(h.ok(&[0x03, 1, 0, 0, 252, 0], &[])[0], 0x72);
    // LOG SENSE: supported pages only.
    assert_eq!(
        h.ok(&[0x4d, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]),
        vec![0, 0, 0, 1, 0]
    );
    assert_eq!(
        h.err(&h.a, &[0x4d, 0, 0x0d, 0, 0, 0, 0, 0, 64, 0], &[]),
        (ILLEGAL, 0x2400)
    );
    // NACA in CONTROL is not supported.
    assert_eq!(h.err(&h.a, &[0, 0, 0, 0, 0, 0x04], &[]), (ILLEGAL, 0x2400));
}

#[test]
fn request_sense_reports_and_clears_unit_attention() {
    let h = H::new();
    h.t.resize_lun(0);
    let s = h.ok(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((s[2] & 0xf, s[12], s[13]), (6, 0x2a, 0x09));
    assert_eq!(h.run(&h.a, &[0; 6], &[]).status, status::GOOD);
}

#[test]
fn write_atomic_and_orwrite() {
    let h = H::new();
    let mut c = [0u8; 16];
    c[0] = 0x9c;
    c[2..10].copy_from_slice(&3u64.to_be_bytes());
    c[12..14].copy_from_slice(&2u16.to_be_bytes());
    h.ok(&c, &[0x0f; 1024]);
    assert_eq!(h.ok(&rw10(0x28, 3, 2), &[]), vec![0x0f; 1024]);
    // Too big for one atomic write.
    let max = (crate::sbc::limits::MAX_ATOMIC_BYTES / u64::from(BS)) as u16 + 1;
    c[12..14].copy_from_slice(&max.to_be_bytes());
    assert_eq!(h.err(&h.a, &c, &[]), (ILLEGAL, 0x2400));
    // ORWRITE ORs the data in.
    h.ok(&rw16(0x8b, 3, 1), &[0xf0; 512]);
    assert_eq!(h.ok(&rw10(0x28, 3, 1), &[]), vec![0xff; 512]);
    assert_eq!(
        h.err(&h.a, &rw16(0x8b, BLOCKS, 1), &[0; 512]),
        (ILLEGAL, 0x2100)
    );
}

#[test]
fn preempt_reservation_changes_holder_and_type() {
    let h = H::new();
    assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.b, 6, 0, 0, 0xb), status::GOOD);
    assert_eq!(pr(&h, &h.a, 1, 1, 0xa, 0), status::GOOD);
    // B preempts A's reservation with a different type.
    assert_eq!(pr(&h, &h.b, 4, 3, 0xb, 0xa), status::GOOD);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2a05));
    let r = h.run(&h.b, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 0x20, 0], &[]);
    assert_eq!(&r.data[8..16], &0xbu64.to_be_bytes());
    assert_eq!(r.data[21], 3);
    // A is no longer registered: exclusive access shuts it out.
    assert_eq!(
        h.run(&h.a, &rw10(0x28, 0, 1), &[]).status,
        status::RESERVATION_CONFLICT
    );
    // RELEASE with the wrong type.
    assert_eq!(
        h.err(&h.b, &prout(2, 1, 0xb, 0, 0).0, &prout(2, 1, 0xb, 0, 0).1),
        (ILLEGAL, 0x2604)
    );
    // Invalid type and scope.
    assert_eq!(
        h.err(&h.b, &prout(1, 2, 0xb, 0, 0).0, &prout(1, 2, 0xb, 0, 0).1),
        (ILLEGAL, 0x2400)
    );
    assert_eq!(
        h.err(
            &h.b,
            &prout(1, 0x11, 0xb, 0, 0).0,
            &prout(1, 0x11, 0xb, 0, 0).1
        ),
        (ILLEGAL, 0x2400)
    );
}

#[test]
fn register_and_move() {
    let h = H::new();
    assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.a, 1, 1, 0xa, 0), status::GOOD);
    let tid = {
        let mut name = h.b.initiator_port.clone().into_bytes();
        name.push(0);
        while !name.len().is_multiple_of(4) {
            name.push(0);
        }
        let mut t = vec![0x45, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend(name);
        t
    };
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&0xau64.to_be_bytes());
    p[8..16].copy_from_slice(&0xbu64.to_be_bytes());
    p[17] = 0x02; // UNREG
    p[18..20].copy_from_slice(&1u16.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend(tid);
    let mut c = vec![0x5f, 0x07, 0x01, 0, 0, 0, 0, 0, 0, 0];
    c[5..9].copy_from_slice(&(p.len() as u32).to_be_bytes());
    h.ok(&c, &p);
    assert_eq!(read_keys(&h, &h.a), vec![0xb]);
    let r = h.run(&h.b, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 0x20, 0], &[]);
    assert_eq!(&r.data[8..16], &0xbu64.to_be_bytes());
    // B holds it now: it can write, A cannot.
    assert_eq!(
        h.run(&h.b, &rw10(0x2a, 0, 1), &[0; 512]).status,
        status::GOOD
    );
    assert_eq!(
        h.run(&h.a, &rw10(0x2a, 0, 1), &[0; 512]).status,
        status::RESERVATION_CONFLICT
    );
}

#[test]
fn all_target_ports_registration_covers_other_ports() {
    let h = H::new();
    let (c, p) = prout(0, 0, 0, 0xa, 0x04);
    h.ok(&c, &p);
    let mut a2 = h.a.clone();
    a2.relative_port = 2;
    h.clear_ua(&a2);
    // Same initiator port through another target port is registered.
    assert_eq!(pr(&h, &a2, 1, 1, 0xa, 0), status::GOOD);
    let d = h.ok(&[0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    assert_eq!(d[20] & 0x02, 0x02, "ALL_TG_PT");
}

#[test]
fn lun_add_remove_reported() {
    let h = H::new();
    h.t.add_lun(LunConfig::new(5, Arc::new(MemDevice::new(64, 512))));
    assert_eq!(h.t.luns(), vec![0, 5]);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x3f0e));
    let d = h.ok(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(&d[0..4], &16u32.to_be_bytes());
    assert_eq!(d[17], 5);
    h.t.remove_lun(5);
    // REPORT LUNS clears the pending REPORTED LUNS DATA HAS CHANGED.
    h.ok(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(h.run(&h.a, &[0; 6], &[]).status, status::GOOD);
}

#[test]
fn explicit_alua_set_target_port_groups() {
    let dev = Arc::new(MemDevice::new(BLOCKS, BS));
    let mut tc = TargetConfig::single_port("t");
    tc.port_groups
        .push(crate::PortGroup::new(2, crate::AluaState::Standby, vec![2]));
    tc.explicit_alua = true;
    let t = ScsiTarget::new(tc, vec![LunConfig::new(0, dev)]);
    let a = nexus("iqn.a", 1);
    let mut a2 = a.clone();
    a2.relative_port = 2;
    let run = |n: &ItNexus, cdb: &[u8], out: &[u8]| {
        t.execute(&ScsiCommand {
            lun: 0,
            cdb,
            attr: TaskAttr::Simple,
            data_out: out,
            expected_in_len: 4096,
            nexus: n,
        })
    };
    // Standby port: reads refused, INQUIRY and RTPG fine, TPGS = 11b.
    assert_eq!(
        sense_of(&run(&a2, &rw10(0x28, 0, 1), &[]).sense),
        (2, 0x040b)
    );
    assert_eq!(run(&a2, &[0x12, 0, 0, 0, 36, 0], &[]).data[5] & 0x30, 0x30);
    // Swap the groups.
    let p = [0, 0, 0, 0, 0x02, 0, 0, 1, 0x00, 0, 0, 2];
    let mut c = [0u8; 12];
    c[0] = 0xa4;
    c[1] = 0x0a;
    c[9] = p.len() as u8;
    assert_eq!(run(&a, &c, &p).status, status::GOOD);
    assert_eq!(sense_of(&run(&a2, &[0; 6], &[]).sense), (6, 0x2a06));
    assert_eq!(run(&a2, &rw10(0x28, 0, 1), &[]).status, status::GOOD);
    let g = t.port_groups();
    assert_eq!(
        (g[0].state, g[1].state),
        (crate::AluaState::Standby, crate::AluaState::ActiveOptimized)
    );
    // Unknown group.
    let bad = [0, 0, 0, 0, 0x00, 0, 0, 9];
    c[9] = bad.len() as u8;
    assert_eq!(sense_of(&run(&a, &c, &bad).sense), (ILLEGAL, 0x2600));
}

#[test]
fn unmap_refused_on_thick_lun() {
    let dev = Arc::new(MemDevice::with_provisioning(BLOCKS, BS, false));
    let t = ScsiTarget::new(TargetConfig::single_port("t"), vec![LunConfig::new(0, dev)]);
    let a = nexus("iqn.a", 1);
    let r = t.execute(&ScsiCommand {
        lun: 0,
        cdb: &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        attr: TaskAttr::Simple,
        data_out: &[0; 24],
        expected_in_len: 0,
        nexus: &a,
    });
    assert_eq!(sense_of(&r.sense), (ILLEGAL, 0x2000));
}

#[test]
fn lost_nexuses_are_bounded() {
    let h = H::new();
    for i in 0..(crate::lu::MAX_LOST_NEXUSES as u64 + 50) {
        let n = nexus("iqn.churn", 1000 + i);
        h.clear_ua(&n);
        h.t.nexus_loss(&n);
    }
    // The newest lost nexus still learns of its loss...
    let last = nexus("iqn.churn", 1000 + crate::lu::MAX_LOST_NEXUSES as u64 + 49);
    assert_eq!(h.err(&last, &[0; 6], &[]).1, 0x2907);
    // ...and memory stays bounded: a, b and the remembered lost ones.
    assert_eq!(h.t.known_nexuses(0), 2 + crate::lu::MAX_LOST_NEXUSES);
}

#[test]
fn pr_state_moves_to_a_partner() {
    let h = H::new();
    assert_eq!(pr(&h, &h.a, 6, 0, 0, 0xa), status::GOOD);
    assert_eq!(pr(&h, &h.a, 1, 5, 0xa, 0), status::GOOD);
    let bytes = h.t.export_pr_state(0).unwrap();
    let partner = H::new();
    assert!(partner.t.import_pr_state(0, &bytes));
    assert!(!partner.t.import_pr_state(0, b"junk"));
    assert!(!partner.t.import_pr_state(9, &bytes));
    // On the partner, A still holds a WE-RO reservation: B cannot write.
    assert_eq!(read_keys(&partner, &partner.b), vec![0xa]);
    let w = partner.run(&partner.b, &rw10(0x2a, 0, 1), &[0; 512]);
    assert_eq!(w.status, status::RESERVATION_CONFLICT);
    assert_eq!(
        partner.run(&partner.a, &rw10(0x2a, 0, 1), &[0; 512]).status,
        status::GOOD
    );
}

#[test]
fn cold_reset_survives_the_session_drop() {
    let h = H::new();
    h.t.task_mgmt(crate::TmfFunction::TargetColdReset, 0, &h.a);
    // The transport closes every session; the initiators come back.
    h.t.nexus_loss(&h.a);
    h.t.nexus_loss(&h.b);
    assert_eq!(h.err(&h.a, &[0; 6], &[]), (6, 0x2901));
    assert_eq!(h.err(&h.b, &[0; 6], &[]), (6, 0x2901));
    assert_eq!(h.run(&h.a, &[0; 6], &[]).status, status::GOOD);
}

#[test]
fn sanitize_in_progress_reports_progress() {
    let h = Arc::new(H::new());
    // IMMED overwrite runs in the background (paced), so it is observable.
    let p = vec![0x01, 0, 0, 4, 1, 2, 3, 4];
    h.ok(&[0x48, 0x81, 0, 0, 0, 0, 0, 0, 8, 0], &p);
    let r = h.run(&h.a, &[0; 6], &[]);
    if r.status == status::CHECK_CONDITION {
        assert_eq!(sense_of(&r.sense), (2, 0x041b));
        assert_eq!(r.sense[15] & 0x80, 0x80, "SKSV with progress");
        // INQUIRY still works.
        h.ok(&[0x12, 0, 0, 0, 36, 0], &[]);
    }
    for _ in 0..500 {
        if h.run(&h.a, &[0; 6], &[]).status == status::GOOD {
            assert_eq!(&h.ok(&rw10(0x28, 7, 1), &[])[..4], &[1, 2, 3, 4]);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("sanitize never finished");
}

/// A MemDevice whose store "crosses its soft threshold" on the first poll.
struct ThresholdDevice {
    inner: MemDevice,
    fired: std::sync::atomic::AtomicBool,
}

impl crate::BlockDevice for ThresholdDevice {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), crate::DevError> {
        self.inner.read(lba, buf)
    }
    fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), crate::DevError> {
        self.inner.write(lba, data, fua)
    }
    fn flush(&self) -> Result<(), crate::DevError> {
        self.inner.flush()
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), crate::DevError> {
        self.inner.unmap(lba, blocks)
    }
    fn poll_soft_threshold(&self) -> bool {
        !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn soft_threshold_raises_unit_attention_on_every_nexus() {
    use crate::BlockDevice as _;
    let dev = Arc::new(ThresholdDevice {
        inner: MemDevice::new(BLOCKS, BS),
        fired: std::sync::atomic::AtomicBool::new(false),
    });
    let t = ScsiTarget::new(
        TargetConfig::single_port("iqn.2026-11.io.nvtarget:test"),
        vec![LunConfig::new(0, dev.clone())],
    );
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    let run = |n: &ItNexus, cdb: &[u8], out: &[u8]| {
        t.execute(&ScsiCommand {
            lun: 0,
            cdb,
            attr: TaskAttr::Simple,
            data_out: out,
            expected_in_len: 1 << 20,
            nexus: n,
        })
    };
    // Both nexuses known and clear of unit attentions.
    for n in [&a, &b] {
        for _ in 0..4 {
            if run(n, &[0; 6], &[]).status == status::GOOD {
                break;
            }
        }
        assert_eq!(run(n, &[0; 6], &[]).status, status::GOOD);
    }
    // A read does not poll; a write crosses the threshold.
    assert_eq!(
        run(&a, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).status,
        status::GOOD
    );
    assert!(!dev.fired.load(std::sync::atomic::Ordering::SeqCst));
    let w = run(&a, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0xab; BS as usize]);
    assert_eq!(w.status, status::GOOD, "the write itself succeeds");
    for n in [&a, &b] {
        let r = run(n, &[0; 6], &[]);
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!(sense_of(&r.sense), (6, 0x3807));
        assert_eq!(run(n, &[0; 6], &[]).status, status::GOOD, "reported once");
    }
    let _ = dev.num_blocks();
}
