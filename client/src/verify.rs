//! A verifying write load: the oracle for crash rounds and failover drills.
//!
//! Each write fills one 4 KiB unit of a region with a pattern naming the
//! unit, a generation and a run seed. The oracle remembers, per unit, the
//! newest generation the target acknowledged and the generations still in
//! flight. After a crash and restart, a unit must hold exactly the
//! acknowledged generation or one that was in flight when the target died
//! (issued, never answered: it may or may not have landed), never an older
//! generation, never anything else. Never two writes to one unit in flight
//! at once, so "newest" is well defined without relying on command order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::{Client, ClientError};

/// Size of one verified unit.
pub const UNIT: usize = 4096;

/// Bytes of a unit: 16-byte stamps (magic, unit, generation, seed, index),
/// so a torn, misplaced or stale unit is recognisable anywhere in it.
pub fn pattern(unit: u64, generation: u64, seed: u32) -> Vec<u8> {
    let mut v = vec![0u8; UNIT];
    for (i, c) in v.chunks_mut(32).enumerate() {
        c[0..4].copy_from_slice(b"NVTV");
        c[4..12].copy_from_slice(&unit.to_le_bytes());
        c[12..20].copy_from_slice(&generation.to_le_bytes());
        c[20..24].copy_from_slice(&seed.to_le_bytes());
        c[24..28].copy_from_slice(&(i as u32).to_le_bytes());
        c[28..32].copy_from_slice(&(unit as u32 ^ generation as u32 ^ seed).to_le_bytes());
    }
    v
}

/// What a unit read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Gen(u64),
    Garbage,
}

pub fn decode(unit: u64, seed: u32, data: &[u8]) -> Content {
    if data.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if data.len() < 32 {
        return Content::Garbage;
    }
    let generation = u64::from_le_bytes(data[12..20].try_into().unwrap_or([0; 8]));
    if data == pattern(unit, generation, seed).as_slice() {
        Content::Gen(generation)
    } else {
        Content::Garbage
    }
}

#[derive(Debug, Default, Clone)]
struct UnitState {
    acked: Option<u64>,
    in_flight: Option<u64>,
    /// Generations that were in flight when a connection died: they may
    /// have landed.
    maybe: Vec<u64>,
}

/// The oracle shared by the load tasks.
pub struct Oracle {
    units: u64,
    first_lba: u64,
    block_size: u32,
    seed: u32,
    next_gen: AtomicU64,
    state: Mutex<HashMap<u64, UnitState>>,
    pub acked_writes: AtomicU64,
    pub failed_writes: AtomicU64,
}

/// Findings of a verification pass.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub units_checked: u64,
    /// Units holding a generation older than one that was acknowledged, or
    /// zeros after an acknowledged write: acknowledged writes lost.
    pub lost: Vec<(u64, Content, Option<u64>)>,
    /// Units holding bytes no write ever produced.
    pub garbage: Vec<u64>,
    /// Units holding an in-flight (unacknowledged) generation: allowed.
    pub in_flight_landed: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.garbage.is_empty()
    }
}

impl Oracle {
    /// `units` 4 KiB units starting at `first_lba` of LUN blocks of
    /// `block_size` bytes.
    pub fn new(units: u64, first_lba: u64, block_size: u32, seed: u32) -> Arc<Oracle> {
        Arc::new(Oracle {
            units,
            first_lba,
            block_size,
            seed,
            next_gen: AtomicU64::new(1),
            state: Mutex::new(HashMap::new()),
            acked_writes: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
        })
    }

    /// The newest acknowledged generation of `unit`.
    pub fn acked(&self, unit: u64) -> Option<u64> {
        self.state.lock().get(&unit).and_then(|s| s.acked)
    }

    fn lba(&self, unit: u64) -> u64 {
        self.first_lba + unit * (UNIT as u64 / self.block_size as u64)
    }

    /// Claims a unit no one is writing; returns (unit, generation).
    fn claim(&self, rng: &mut u64) -> (u64, u64) {
        loop {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let unit = *rng % self.units;
            let mut st = self.state.lock();
            let s = st.entry(unit).or_default();
            if s.in_flight.is_none() {
                let g = self.next_gen.fetch_add(1, Ordering::Relaxed);
                s.in_flight = Some(g);
                return (unit, g);
            }
        }
    }

    fn finish(&self, unit: u64, generation: u64, acked: bool) {
        let mut st = self.state.lock();
        let s = st.entry(unit).or_default();
        s.in_flight = None;
        if acked {
            s.acked = Some(generation);
            s.maybe.retain(|&g| g > generation);
            self.acked_writes.fetch_add(1, Ordering::Relaxed);
        } else {
            // No answer: the write may or may not have happened.
            s.maybe.push(generation);
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes until `stop` is set, `deadline` passes or the connection
    /// fails; `depth` commands in flight. Returns the first error, if any
    /// (an error is expected when the target is killed).
    pub async fn run_load(
        self: &Arc<Self>,
        client: Arc<Client>,
        lun: u64,
        depth: usize,
        stop: Arc<AtomicBool>,
        deadline: Instant,
    ) -> Option<ClientError> {
        let mut tasks = Vec::new();
        for t in 0..depth {
            let me = self.clone();
            let client = client.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((t as u64 + 1) * 0x1000_0000_01b3);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let (unit, generation) = me.claim(&mut rng);
                    let data = Bytes::from(pattern(unit, generation, me.seed));
                    let r = client
                        .write16(lun, me.lba(unit), data, me.block_size, false)
                        .await;
                    me.finish(unit, generation, r.is_ok());
                    if let Err(e) = r {
                        stop.store(true, Ordering::Relaxed);
                        return Some(e);
                    }
                }
                None
            }));
        }
        let mut first = None;
        for t in tasks {
            if let Ok(Some(e)) = t.await {
                first.get_or_insert(e);
            }
        }
        first
    }

    /// Reads every unit back and judges it against what was acknowledged.
    pub async fn verify(&self, client: &Client, lun: u64) -> Result<Report, ClientError> {
        let mut rep = Report::default();
        let per_read: u64 = 64;
        let blocks_per_unit = UNIT as u64 / self.block_size as u64;
        let mut unit = 0;
        while unit < self.units {
            let n = per_read.min(self.units - unit);
            let data = client
                .read16(
                    lun,
                    self.lba(unit),
                    (n * blocks_per_unit) as u32,
                    self.block_size,
                )
                .await?;
            let st = self.state.lock();
            for i in 0..n {
                let u = unit + i;
                let chunk = data
                    .get(i as usize * UNIT..(i as usize + 1) * UNIT)
                    .unwrap_or(&[]);
                let got = decode(u, self.seed, chunk);
                let s = st.get(&u).cloned().unwrap_or_default();
                rep.units_checked += 1;
                let allowed = |g: u64| {
                    Some(g) == s.acked
                        || s.in_flight == Some(g)
                        || (s.maybe.contains(&g) && s.acked.is_none_or(|a| g > a))
                };
                match got {
                    Content::Garbage => rep.garbage.push(u),
                    Content::Zero if s.acked.is_none() => {}
                    Content::Gen(g) if allowed(g) => {
                        if Some(g) != s.acked {
                            rep.in_flight_landed += 1;
                        }
                    }
                    other => rep.lost.push((u, other, s.acked)),
                }
            }
            drop(st);
            unit += n;
        }
        Ok(rep)
    }

    /// Marks every in-flight write as "may have landed" (the target died
    /// under them) so the load can restart on a new connection.
    pub fn connection_lost(&self) {
        let mut st = self.state.lock();
        for s in st.values_mut() {
            if let Some(g) = s.in_flight.take() {
                s.maybe.push(g);
            }
        }
    }
}

/// Convenience: a bounded run of `secs` seconds.
pub fn deadline_in(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_decode() {
        let p = pattern(7, 42, 9);
        assert_eq!(decode(7, 9, &p), Content::Gen(42));
        assert_eq!(decode(8, 9, &p), Content::Garbage);
        assert_eq!(decode(7, 10, &p), Content::Garbage);
        let mut torn = p.clone();
        torn[2048..].copy_from_slice(&pattern(7, 41, 9)[2048..]);
        assert_eq!(decode(7, 9, &torn), Content::Garbage);
        assert_eq!(decode(7, 9, &[0u8; UNIT]), Content::Zero);
    }
}
