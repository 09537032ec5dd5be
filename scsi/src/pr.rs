//! Persistent reservations (SPC-4 5.12): PERSISTENT RESERVE IN/OUT, the
//! conflict table, and APTPL persistence.
//!
//! Invariants: at most one registration per I_T nexus (an ALL_TG_PT
//! registration covers every relative port of its initiator port); a
//! reservation of a non all-registrants type is held by a registered
//! nexus; an all-registrants reservation exists only while at least one
//! registration does. Unit attentions go only to the nexuses SPC-4 names —
//! never to the nexus that caused the change.

use crate::cdb::be_at;
use crate::lu::{trunc, CmdResult, Cx, LogicalUnit, LuState, NexusKey, Reply};
use crate::opcodes::Access;
use crate::sense::{Asc, Failure, Sense};

/// Registrations an LU keeps; more get INSUFFICIENT REGISTRATION
/// RESOURCES, so initiators cannot grow our memory without bound.
pub(crate) const MAX_REGISTRATIONS: usize = 4096;

pub(crate) const WE: u8 = 1;
pub(crate) const EA: u8 = 3;
pub(crate) const WE_RO: u8 = 5;
pub(crate) const EA_RO: u8 = 6;
pub(crate) const WE_AR: u8 = 7;
pub(crate) const EA_AR: u8 = 8;

fn valid_type(t: u8) -> bool {
    matches!(t, WE | EA | WE_RO | EA_RO | WE_AR | EA_AR)
}
fn all_registrants(t: u8) -> bool {
    matches!(t, WE_AR | EA_AR)
}
fn registrants_only(t: u8) -> bool {
    matches!(t, WE_RO | EA_RO)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    pub nexus: NexusKey,
    /// The initiator port name as the initiator spelled it (for TransportIDs).
    pub port_name: String,
    pub key: u64,
    pub all_tg_pt: bool,
}

impl Registration {
    fn covers(&self, n: &NexusKey) -> bool {
        self.nexus.port == n.port && (self.all_tg_pt || self.nexus.rel == n.rel)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub holder: NexusKey,
    pub rtype: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PrState {
    pub generation: u32,
    pub regs: Vec<Registration>,
    pub res: Option<Reservation>,
    pub aptpl: bool,
}

impl PrState {
    pub fn has_registrations(&self) -> bool {
        !self.regs.is_empty()
    }

    fn reg_index(&self, n: &NexusKey) -> Option<usize> {
        self.regs.iter().position(|r| r.covers(n))
    }

    fn registered(&self, n: &NexusKey) -> bool {
        self.reg_index(n).is_some()
    }

    fn is_holder(&self, n: &NexusKey) -> bool {
        match &self.res {
            Some(r) if all_registrants(r.rtype) => self.registered(n),
            Some(r) => {
                r.holder == *n
                    || self
                        .reg_index(n)
                        .is_some_and(|i| self.regs[i].covers(&r.holder))
            }
            None => false,
        }
    }

    /// SPC-4 table 63 for a command of class `access` from `n`.
    pub fn conflicts(&self, n: &NexusKey, access: Access) -> bool {
        let Some(res) = &self.res else { return false };
        if matches!(access, Access::Exempt | Access::Status) || self.is_holder(n) {
            return false;
        }
        let registered = self.registered(n);
        match res.rtype {
            WE => access == Access::Write,
            EA => true,
            WE_RO | WE_AR => !registered && access == Access::Write,
            _ => !registered,
        }
    }

    /// Serialize for APTPL (a small line-oriented text format).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!(
            "nvtarget-pr 1\ngen {}\naptpl {}\n",
            self.generation,
            u8::from(self.aptpl)
        );
        for r in &self.regs {
            s += &format!(
                "reg {:016x} {} {} {}\n",
                r.key,
                r.nexus.rel,
                u8::from(r.all_tg_pt),
                r.port_name
            );
        }
        if let Some(r) = &self.res {
            s += &format!("res {} {} {}\n", r.rtype, r.holder.rel, r.holder.port);
        }
        s.into_bytes()
    }

    /// Parse what [`PrState::encode`] wrote; `None` if it is not that.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(b).ok()?;
        let mut lines = s.lines();
        if lines.next()? != "nvtarget-pr 1" {
            return None;
        }
        let mut st = PrState::default();
        for l in lines {
            let mut f = l.splitn(5, ' ');
            match f.next()? {
                "gen" => st.generation = f.next()?.parse().ok()?,
                "aptpl" => st.aptpl = f.next()? == "1",
                "reg" => {
                    let key = u64::from_str_radix(f.next()?, 16).ok()?;
                    let rel = f.next()?.parse().ok()?;
                    let all = f.next()? == "1";
                    let name = f.next()?.to_string();
                    st.regs.push(Registration {
                        nexus: NexusKey {
                            port: name.to_ascii_lowercase(),
                            rel,
                        },
                        port_name: name,
                        key,
                        all_tg_pt: all,
                    });
                }
                "res" => {
                    let rtype = f.next()?.parse().ok()?;
                    let rel = f.next()?.parse().ok()?;
                    let port = f.next()?.to_string();
                    st.res = Some(Reservation {
                        holder: NexusKey { port, rel },
                        rtype,
                    });
                }
                _ => return None,
            }
        }
        Some(st)
    }
}

/// Queue `asc` for every known nexus covered by `reg`.
fn ua_for(st: &mut LuState, reg: &Registration, asc: Asc) {
    let keys: Vec<NexusKey> = st.seen.iter().filter(|k| reg.covers(k)).cloned().collect();
    for k in keys {
        st.add_ua(&k, asc);
    }
}

/// Queue `asc` for every registrant except the ones covering `except`.
fn ua_registrants(st: &mut LuState, except: &NexusKey, asc: Asc) {
    let regs: Vec<Registration> = st
        .pr
        .regs
        .iter()
        .filter(|r| !r.covers(except))
        .cloned()
        .collect();
    for r in regs {
        ua_for(st, &r, asc);
    }
}

/// iSCSI TransportID, initiator port format (SPC-4 7.6.4.6).
fn transport_id(port_name: &str) -> Vec<u8> {
    let mut name = port_name.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) || name.len() < 20 {
        name.push(0);
    }
    name.truncate(0xfffc);
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend(name);
    t
}

impl LogicalUnit {
    pub(crate) fn pr_in(&self, cx: &Cx<'_>) -> CmdResult {
        let alloc = cx.cdb.be16(7) as usize;
        let st = self.state.read();
        let pr = &st.pr;
        let mut d = Vec::new();
        d.extend_from_slice(&pr.generation.to_be_bytes());
        match cx.cdb.service_action() {
            0x00 => {
                d.extend_from_slice(&((pr.regs.len() * 8) as u32).to_be_bytes());
                for r in &pr.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            0x01 => match &pr.res {
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants reservations report key 0.
                    let key = if all_registrants(r.rtype) {
                        0
                    } else {
                        pr.regs
                            .iter()
                            .find(|g| g.covers(&r.holder))
                            .map_or(0, |g| g.key)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.rtype & 0x0f, 0, 0]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            },
            0x02 => {
                d.clear();
                d.extend_from_slice(&8u16.to_be_bytes());
                // CRH, ATP_C, PTPL_C when a store exists.
                d.push(0x10 | 0x04 | u8::from(self.cfg.pr_store.is_some()));
                // TMV, ALLOW COMMANDS = 0, PTPL_A.
                d.push(0x80 | u8::from(pr.aptpl));
                d.extend_from_slice(&[0xea, 0x01, 0, 0]);
            }
            _ => {
                let mut body = Vec::new();
                for r in &pr.regs {
                    let holder = pr.is_holder(&r.nexus)
                        && pr
                            .res
                            .as_ref()
                            .is_some_and(|x| all_registrants(x.rtype) || r.covers(&x.holder));
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(if r.all_tg_pt { 0x02 } else { 0 } | u8::from(holder));
                    body.push(if holder {
                        pr.res.as_ref().map_or(0, |x| x.rtype)
                    } else {
                        0
                    });
                    body.extend_from_slice(&[0; 4]);
                    body.extend_from_slice(
                        &(if r.all_tg_pt { 0 } else { r.nexus.rel }).to_be_bytes(),
                    );
                    let tid = transport_id(&r.port_name);
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend(tid);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend(body);
            }
        }
        Ok(Reply::data(trunc(d, alloc)))
    }

    pub(crate) fn pr_out(&self, cx: &Cx<'_>) -> CmdResult {
        let sa = cx.cdb.service_action();
        let scope = cx.cdb.u8(2) >> 4;
        let rtype = cx.cdb.u8(2) & 0x0f;
        let plen = cx.cdb.be32(5) as usize;
        let p = cx.data_out();
        if p.len() < plen {
            return Err(Sense::param_list_length().into());
        }
        let p = &p[..plen];
        if sa == 0x07 {
            return self.register_and_move(cx, p);
        }
        if plen != 24 {
            return Err(Sense::param_list_length().into());
        }
        let key = be_at(p, 0, 8).unwrap_or(0);
        let sa_key = be_at(p, 8, 8).unwrap_or(0);
        let flags = p[20];
        let spec_i_pt = flags & 0x08 != 0;
        let all_tg_pt = flags & 0x04 != 0;
        let aptpl = flags & 0x01 != 0;
        if spec_i_pt {
            return Err(Sense::invalid_param(20).into());
        }
        if aptpl && self.cfg.pr_store.is_none() {
            return Err(Sense::invalid_param(20).into());
        }
        if matches!(sa, 0x01 | 0x02 | 0x04 | 0x05) {
            if scope != 0 {
                return Err(Sense::invalid_cdb(2).into());
            }
            // RELEASE checks the type against the reservation instead.
            if sa != 0x02 && !valid_type(rtype) {
                return Err(Sense::invalid_cdb(2).into());
            }
        }
        let me = cx.key.clone();
        let mut st = self.state.write();
        if st.reserve6.as_ref().is_some_and(|h| *h != me) {
            return Err(Failure::Conflict);
        }
        let idx = st.pr.reg_index(&me);
        let my_key = idx.map(|i| st.pr.regs[i].key);
        let changed_regs;
        match sa {
            0x00 | 0x06 => {
                let ignore = sa == 0x06;
                match idx {
                    None => {
                        if !ignore && key != 0 {
                            return Err(Failure::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok(Reply::good());
                        }
                        if st.pr.regs.len() >= MAX_REGISTRATIONS {
                            return Err(Sense::illegal_request(
                                Asc::INSUFFICIENT_REGISTRATION_RESOURCES,
                            )
                            .into());
                        }
                        st.pr.regs.push(Registration {
                            nexus: me.clone(),
                            port_name: cx.cmd.nexus.initiator_port.clone(),
                            key: sa_key,
                            all_tg_pt,
                        });
                    }
                    Some(i) => {
                        if !ignore && my_key != Some(key) {
                            return Err(Failure::Conflict);
                        }
                        if sa_key == 0 {
                            self.unregister(&mut st, i);
                        } else {
                            st.pr.regs[i].key = sa_key;
                        }
                    }
                }
                st.pr.aptpl = aptpl;
                changed_regs = true;
            }
            _ => {
                // Every other service action needs a matching registration.
                if my_key.is_none() || my_key != Some(key) {
                    return Err(Failure::Conflict);
                }
                changed_regs = match sa {
                    0x01 => {
                        match &st.pr.res {
                            Some(r) if !st.pr.is_holder(&me) || r.rtype != rtype => {
                                return Err(Failure::Conflict)
                            }
                            Some(_) => {}
                            None => {
                                st.pr.res = Some(Reservation {
                                    holder: me.clone(),
                                    rtype,
                                })
                            }
                        }
                        false
                    }
                    0x02 => {
                        if let Some(r) = st.pr.res.clone() {
                            if st.pr.is_holder(&me) {
                                if r.rtype != rtype || scope != 0 {
                                    return Err(
                                        Sense::illegal_request(Asc::INVALID_RELEASE_OF_PR).into()
                                    );
                                }
                                st.pr.res = None;
                                if registrants_only(r.rtype) || all_registrants(r.rtype) {
                                    ua_registrants(&mut st, &me, Asc::RESERVATIONS_RELEASED);
                                }
                            }
                        }
                        false
                    }
                    0x03 => {
                        ua_registrants(&mut st, &me, Asc::RESERVATIONS_PREEMPTED);
                        st.pr.regs.clear();
                        st.pr.res = None;
                        true
                    }
                    _ => {
                        self.preempt(&mut st, &me, sa_key, rtype)?;
                        true
                    }
                };
            }
        }
        if changed_regs {
            st.pr.generation = st.pr.generation.wrapping_add(1);
        }
        self.persist(&st);
        Ok(Reply::good())
    }

    /// Remove registration `i`, releasing a reservation it held.
    fn unregister(&self, st: &mut LuState, i: usize) {
        let reg = st.pr.regs.remove(i);
        let Some(res) = st.pr.res.clone() else { return };
        if all_registrants(res.rtype) {
            if st.pr.regs.is_empty() {
                st.pr.res = None;
            }
        } else if reg.covers(&res.holder) {
            st.pr.res = None;
            // SPC-4 5.12.11.2.3: only registrants-only types notify.
            if registrants_only(res.rtype) {
                ua_registrants(st, &reg.nexus, Asc::RESERVATIONS_RELEASED);
            }
        }
    }

    fn preempt(
        &self,
        st: &mut LuState,
        me: &NexusKey,
        sa_key: u64,
        rtype: u8,
    ) -> Result<(), Failure> {
        let res = st.pr.res.clone();
        let holder_key = res.as_ref().and_then(|r| {
            if all_registrants(r.rtype) {
                None
            } else {
                st.pr
                    .regs
                    .iter()
                    .find(|g| g.covers(&r.holder))
                    .map(|g| g.key)
            }
        });
        let take_reservation = match &res {
            Some(r) if all_registrants(r.rtype) => sa_key == 0,
            Some(_) => holder_key == Some(sa_key),
            None => false,
        };
        if !take_reservation && sa_key == 0 {
            return Err(Sense::invalid_param(8).into());
        }
        let victims: Vec<usize> = st
            .pr
            .regs
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.covers(me) && (sa_key == 0 || r.key == sa_key))
            .map(|(i, _)| i)
            .collect();
        if victims.is_empty() && !take_reservation {
            return Err(Failure::Conflict);
        }
        let removed: Vec<Registration> = victims
            .iter()
            .rev()
            .map(|&i| st.pr.regs.remove(i))
            .collect();
        for r in &removed {
            ua_for(st, r, Asc::REGISTRATIONS_PREEMPTED);
        }
        if take_reservation {
            let old = res.map(|r| r.rtype);
            st.pr.res = Some(Reservation {
                holder: me.clone(),
                rtype,
            });
            if old != Some(rtype) {
                ua_registrants(st, me, Asc::RESERVATIONS_RELEASED);
            }
        } else if st.pr.res.as_ref().is_some_and(|r| all_registrants(r.rtype))
            && st.pr.regs.is_empty()
        {
            st.pr.res = None;
        }
        Ok(())
    }

    fn register_and_move(&self, cx: &Cx<'_>, p: &[u8]) -> CmdResult {
        if p.len() < 24 {
            return Err(Sense::param_list_length().into());
        }
        let key = be_at(p, 0, 8).unwrap_or(0);
        let sa_key = be_at(p, 8, 8).unwrap_or(0);
        let unreg = p[17] & 0x02 != 0;
        let aptpl = p[17] & 0x01 != 0;
        let rel = be_at(p, 18, 2).unwrap_or(0) as u16;
        let tid_len = be_at(p, 20, 4).unwrap_or(0) as usize;
        let Some(tid) = p.get(24..24usize.saturating_add(tid_len)) else {
            return Err(Sense::param_list_length().into());
        };
        if aptpl && self.cfg.pr_store.is_none() {
            return Err(Sense::invalid_param(17).into());
        }
        // iSCSI TransportID: protocol 5, format 0 (name) or 1 (port).
        if tid.len() < 4 || tid[0] & 0x0f != 5 || tid[0] >> 6 > 1 {
            return Err(Sense::invalid_param(24).into());
        }
        let name: String = tid[4..]
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect::<String>()
            .to_ascii_lowercase();
        let me = cx.key.clone();
        let mut st = self.state.write();
        let Some(i) = st.pr.reg_index(&me) else {
            return Err(Failure::Conflict);
        };
        if st.pr.regs[i].key != key {
            return Err(Failure::Conflict);
        }
        let Some(res) = st.pr.res.clone() else {
            return Err(Failure::Conflict);
        };
        if !st.pr.is_holder(&me) {
            return Err(Failure::Conflict);
        }
        if all_registrants(res.rtype) {
            return Err(Failure::Conflict);
        }
        if sa_key == 0 {
            return Err(Sense::invalid_param(8).into());
        }
        // Format 0 names only the node: pick a known port of that node.
        let dest_port = if tid[0] >> 6 == 1 {
            Some(name.clone())
        } else {
            st.seen
                .iter()
                .find(|k| k.rel == rel && k.port.starts_with(&format!("{name},i,")))
                .map(|k| k.port.clone())
        };
        let Some(dest_port) = dest_port else {
            return Err(Sense::invalid_param(24).into());
        };
        let dest = NexusKey {
            port: dest_port,
            rel,
        };
        if dest == me {
            return Err(Sense::invalid_param(24).into());
        }
        match st.pr.reg_index(&dest) {
            Some(j) => st.pr.regs[j].key = sa_key,
            None if st.pr.regs.len() >= MAX_REGISTRATIONS => {
                return Err(Sense::illegal_request(Asc::INSUFFICIENT_REGISTRATION_RESOURCES).into())
            }
            None => st.pr.regs.push(Registration {
                nexus: dest.clone(),
                port_name: dest.port.clone(),
                key: sa_key,
                all_tg_pt: false,
            }),
        }
        st.pr.res = Some(Reservation {
            holder: dest,
            rtype: res.rtype,
        });
        if unreg {
            if let Some(i) = st.pr.reg_index(&me) {
                st.pr.regs.remove(i);
            }
        }
        st.pr.aptpl = aptpl;
        st.pr.generation = st.pr.generation.wrapping_add(1);
        self.persist(&st);
        Ok(Reply::good())
    }

    /// Write the state to the PR store when APTPL asks for it (and clear it
    /// when APTPL was turned off).
    fn persist(&self, st: &LuState) {
        if let Some(store) = &self.cfg.pr_store {
            let bytes = if st.pr.aptpl {
                st.pr.encode()
            } else {
                Vec::new()
            };
            // A failed save cannot fail the command that already took
            // effect; the next change retries.
            let _ = store.save(&bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let st = PrState {
            generation: 7,
            regs: vec![Registration {
                nexus: NexusKey {
                    port: "iqn.x,i,0x1".into(),
                    rel: 1,
                },
                port_name: "iqn.x,i,0x1".into(),
                key: 0xabc,
                all_tg_pt: false,
            }],
            res: Some(Reservation {
                holder: NexusKey {
                    port: "iqn.x,i,0x1".into(),
                    rel: 1,
                },
                rtype: WE,
            }),
            aptpl: true,
        };
        assert_eq!(PrState::decode(&st.encode()), Some(st));
        assert_eq!(PrState::decode(b"garbage"), None);
    }
}
