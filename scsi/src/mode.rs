//! Mode parameters: MODE SENSE(6/10) and MODE SELECT(6/10).
//!
//! Pages: read-write error recovery (0x01), caching (0x08, WCE
//! changeable), control (0x0A, D_SENSE and SWP changeable) and
//! informational exceptions (0x1C). Values are per LU, shared by all
//! nexuses; a MODE SELECT that changes anything raises MODE PARAMETERS
//! CHANGED for every other nexus (SPC-4 5.14). Saved values are not
//! supported. Invariant: each page's byte image has the length its header
//! advertises, so MODE SELECT can compare byte for byte.

use crate::cdb::{be_at, op};
use crate::lu::{trunc, CmdResult, Cx, LogicalUnit, Reply};
use crate::sense::{Asc, Sense};

/// The changeable mode parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModeState {
    pub wce: bool,
    pub d_sense: bool,
    pub swp: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        Self {
            wce: true,
            d_sense: false,
            swp: false,
        }
    }
}

const PAGES: [u8; 4] = [0x01, 0x08, 0x0a, 0x1c];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// The full page (header included) for `pc`.
fn page(code: u8, pc: Pc, m: &ModeState) -> Vec<u8> {
    let cur = match pc {
        Pc::Current => m.clone(),
        _ => ModeState::default(),
    };
    let changeable = pc == Pc::Changeable;
    match code {
        0x01 => {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 0x0a;
            if !changeable {
                p[2] = 0xc0; // AWRE, ARRE
            }
            p
        }
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if changeable || cur.wce {
                p[2] = 0x04;
            }
            p
        }
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if changeable {
                p[2] = 0x04;
                p[4] = 0x08;
                return p;
            }
            if cur.d_sense {
                p[2] |= 0x04;
            }
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER: unrestricted
            if cur.swp {
                p[4] |= 0x08;
            }
            p[8] = 0xff; // BUSY TIMEOUT PERIOD: unlimited
            p[9] = 0xff;
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 0x0a;
            if !changeable {
                p[2] = 0x08; // DEXCPT: no informational exceptions
            }
            p
        }
    }
}

impl LogicalUnit {
    pub(crate) fn mode_sense(&self, cx: &Cx<'_>) -> CmdResult {
        let ten = cx.cdb.opcode() == op::MODE_SENSE_10;
        let dbd = cx.cdb.u8(1) & 0x08 != 0;
        let llbaa = ten && cx.cdb.u8(1) & 0x10 != 0;
        let pc = match cx.cdb.u8(2) >> 6 {
            0 => Pc::Current,
            1 => Pc::Changeable,
            2 => Pc::Default,
            _ => return Err(Sense::illegal_request(Asc::SAVING_PARAMETERS_NOT_SUPPORTED).into()),
        };
        let code = cx.cdb.u8(2) & 0x3f;
        let sub = cx.cdb.u8(3);
        let alloc = if ten {
            cx.cdb.be16(7) as usize
        } else {
            cx.cdb.u8(4) as usize
        };
        // We have no subpages: subpage 0, or 0xFF (all subpages), only.
        if sub != 0 && sub != 0xff {
            return Err(Sense::invalid_cdb(3).into());
        }
        let mode = self.state.read().mode.clone();
        let mut body = Vec::new();
        if code == 0x3f {
            for p in PAGES {
                body.extend(page(p, pc, &mode));
            }
        } else if PAGES.contains(&code) {
            body.extend(page(code, pc, &mode));
        } else {
            return Err(Sense::invalid_cdb(2).into());
        }
        let mut bd = Vec::new();
        if !dbd {
            let blocks = self.dev().num_blocks();
            let bs = self.block_size() as u32;
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0; 4]);
                bd.extend_from_slice(&bs.to_be_bytes());
            } else {
                bd.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&bs.to_be_bytes()[1..]);
            }
        }
        let wp = self.cfg.read_only || mode.swp;
        let dsp = if wp { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
        let mut d = Vec::new();
        if ten {
            let total = 8 + bd.len() + body.len();
            d.extend_from_slice(&((total - 2).min(0xffff) as u16).to_be_bytes());
            d.extend_from_slice(&[0, dsp, u8::from(llbaa), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            let total = 4 + bd.len() + body.len();
            d.extend_from_slice(&[(total - 1).min(0xff) as u8, 0, dsp, bd.len() as u8]);
        }
        d.extend(bd);
        d.extend(body);
        Ok(Reply::data(trunc(d, alloc)))
    }

    pub(crate) fn mode_select(&self, cx: &Cx<'_>) -> CmdResult {
        let ten = cx.cdb.opcode() == op::MODE_SELECT_10;
        let pf = cx.cdb.u8(1) & 0x10 != 0;
        let sp = cx.cdb.u8(1) & 0x01 != 0;
        let plen = if ten {
            cx.cdb.be16(7) as usize
        } else {
            cx.cdb.u8(4) as usize
        };
        if sp {
            return Err(Sense::invalid_cdb(1).into());
        }
        if plen == 0 {
            return Ok(Reply::good());
        }
        if !pf {
            return Err(Sense::invalid_cdb(1).into());
        }
        let Some(p) = cx.data_out().get(..plen) else {
            return Err(Sense::param_list_length().into());
        };
        let hdr = if ten { 8 } else { 4 };
        if p.len() < hdr {
            return Err(Sense::param_list_length().into());
        }
        let (bdl, long) = if ten {
            (be_at(p, 6, 2).unwrap_or(0) as usize, p[4] & 1 != 0)
        } else {
            (p[3] as usize, false)
        };
        if bdl != 0 {
            let want = if long { 16 } else { 8 };
            if bdl != want || p.len() < hdr + bdl {
                return Err(Sense::invalid_param(if ten { 6 } else { 3 }).into());
            }
            let len_off = if long { hdr + 12 } else { hdr + 5 };
            let blen = be_at(p, len_off, if long { 4 } else { 3 }).unwrap_or(0);
            if blen != self.block_size() {
                return Err(Sense::invalid_param(len_off as u16).into());
            }
        }
        let mut cur = self.state.read().mode.clone();
        let mut off = hdr + bdl;
        while off < p.len() {
            let code = p[off] & 0x3f;
            if p[off] & 0x40 != 0 || !PAGES.contains(&code) {
                return Err(Sense::invalid_param(off as u16).into());
            }
            let Some(&len) = p.get(off + 1) else {
                return Err(Sense::param_list_length().into());
            };
            let ours = page(code, Pc::Current, &cur);
            let mask = page(code, Pc::Changeable, &cur);
            let Some(theirs) = p.get(off..off + 2 + len as usize) else {
                return Err(Sense::param_list_length().into());
            };
            if theirs.len() != ours.len() {
                return Err(Sense::invalid_param(off as u16 + 1).into());
            }
            for i in 2..ours.len() {
                if (theirs[i] ^ ours[i]) & !mask[i] != 0 {
                    return Err(Sense::invalid_param((off + i) as u16).into());
                }
            }
            match code {
                0x08 => cur.wce = theirs[2] & 0x04 != 0,
                0x0a => {
                    cur.d_sense = theirs[2] & 0x04 != 0;
                    cur.swp = theirs[4] & 0x08 != 0;
                }
                _ => {}
            }
            off += ours.len();
        }
        let mut st = self.state.write();
        if st.mode != cur {
            st.mode = cur;
            st.add_ua_all(Asc::MODE_PARAMETERS_CHANGED, Some(&cx.key));
        }
        Ok(Reply::good())
    }
}
