//! Shared test helpers: an in-memory model of the store, operations that run
//! against both, and a state dump of an aggregate to compare with the model.
#![allow(dead_code)]

use nvtarget_lun::{AggrOptions, Aggregate, Error, FaultStorage, LunId};
use std::collections::BTreeMap;

pub const BS: u64 = 4096;

/// What the store must contain: LUN contents by name, snapshot contents by
/// (LUN name, snapshot name), and the highest committed seq.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub luns: BTreeMap<String, Vec<u8>>,
    pub snaps: BTreeMap<(String, String), Vec<u8>>,
    pub highest_seq: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum = |v: &Vec<u8>| (v.len(), crc32c::crc32c(v));
        f.debug_struct("Model")
            .field(
                "luns",
                &self
                    .luns
                    .iter()
                    .map(|(k, v)| (k, sum(v)))
                    .collect::<Vec<_>>(),
            )
            .field(
                "snaps",
                &self
                    .snaps
                    .iter()
                    .map(|(k, v)| (k, sum(v)))
                    .collect::<Vec<_>>(),
            )
            .field("highest_seq", &self.highest_seq)
            .finish()
    }
}

/// A model reduced to sizes and checksums (cheap to keep many of).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub items: BTreeMap<String, (usize, u32)>,
    pub highest_seq: u64,
}

impl Digest {
    /// Names whose contents differ, for assertion messages.
    pub fn diff(&self, other: &Digest) -> Option<String> {
        if self == other {
            return None;
        }
        let mut d: Vec<String> = Vec::new();
        for (k, v) in &self.items {
            if other.items.get(k) != Some(v) {
                d.push(k.clone());
            }
        }
        for k in other.items.keys() {
            if !self.items.contains_key(k) {
                d.push(k.clone());
            }
        }
        Some(format!(
            "differ: {d:?}, highest_seq {} vs {}",
            self.highest_seq, other.highest_seq
        ))
    }
}

impl Model {
    pub fn digest(&self) -> Digest {
        let mut items = BTreeMap::new();
        for (k, v) in &self.luns {
            items.insert(format!("lun {k}"), (v.len(), crc32c::crc32c(v)));
        }
        for ((l, s), v) in &self.snaps {
            items.insert(format!("snap {l}/{s}"), (v.len(), crc32c::crc32c(v)));
        }
        Digest {
            items,
            highest_seq: self.highest_seq,
        }
    }

    /// First difference, for assertion messages.
    pub fn diff(&self, other: &Model) -> Option<String> {
        if self == other {
            return None;
        }
        if self.highest_seq != other.highest_seq {
            return Some(format!(
                "highest_seq {} vs {}",
                self.highest_seq, other.highest_seq
            ));
        }
        let keys = |m: &Model| {
            (
                m.luns.keys().cloned().collect::<Vec<_>>(),
                m.snaps.keys().cloned().collect::<Vec<_>>(),
            )
        };
        if keys(self) != keys(other) {
            return Some(format!("names {:?} vs {:?}", keys(self), keys(other)));
        }
        let both = self
            .luns
            .iter()
            .map(|(k, v)| (format!("lun {k}"), v, &other.luns[k]))
            .chain(
                self.snaps
                    .iter()
                    .map(|(k, v)| (format!("snap {k:?}"), v, &other.snaps[k])),
            );
        for (what, a, b) in both {
            if a.len() != b.len() {
                return Some(format!("{what}: size {} vs {}", a.len(), b.len()));
            }
            // Slice equality is a memcmp even in debug builds; only then search.
            if a == b {
                continue;
            }
            if let Some(i) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                return Some(format!(
                    "{what}: first difference at byte {i} (block {})",
                    i as u64 / BS
                ));
            }
        }
        None
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn id(agg: &Aggregate, name: &str) -> LunId {
    agg.lun_by_name(name).expect("lun exists").id
}

/// Everything the aggregate exposes, read through the public API.
pub fn dump(agg: &Aggregate) -> Model {
    let mut m = Model {
        highest_seq: agg.highest_seq(),
        ..Default::default()
    };
    let mut names = BTreeMap::new();
    for l in agg.luns() {
        let mut buf = vec![0u8; l.size_bytes as usize];
        agg.read(l.id, 0, &mut buf).expect("read lun");
        names.insert(l.id, l.name.clone());
        m.luns.insert(l.name, buf);
    }
    for s in agg.snapshot_list(None) {
        let mut buf = vec![0u8; s.size_bytes as usize];
        agg.read_snapshot(s.id, 0, &mut buf).expect("read snapshot");
        m.snaps.insert((names[&s.lun].clone(), s.name), buf);
    }
    m
}

pub fn new_mem(blocks: u64) -> (FaultStorage, Aggregate) {
    let fs = FaultStorage::default();
    let agg = Aggregate::create(
        fs.clone(),
        AggrOptions {
            size_bytes: blocks * BS,
            soft_threshold_pct: 80,
        },
    )
    .expect("create aggregate");
    (fs, agg)
}

/// One step of a workload. LUN and snapshot references are indices taken
/// modulo what exists, so random sequences stay mostly meaningful.
#[derive(Clone, Debug)]
pub enum Op {
    /// Offsets and lengths in 512-byte sectors.
    Write {
        lun: usize,
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Unmap {
        lun: usize,
        sector: u64,
        sectors: u64,
    },
    Cp,
    SnapCreate {
        lun: usize,
    },
    SnapDelete {
        lun: usize,
        snap: usize,
    },
    SnapRestore {
        lun: usize,
        snap: usize,
    },
    Clone {
        lun: usize,
        snap: usize,
    },
    Grow {
        lun: usize,
        sectors: u64,
    },
    CreateLun {
        sectors: u64,
    },
    DeleteLun {
        lun: usize,
    },
}

/// Runs `op` on the store and, if the store accepted it, on the model.
/// `counter` makes names unique; `seq` is the next highest_seq for CPs.
/// Returns Err only for errors the model does not predict (I/O, corruption),
/// else whether the op ran a CP (the aggregate's generation moved).
pub fn apply(
    agg: &Aggregate,
    model: &mut Model,
    op: &Op,
    counter: &mut u64,
) -> Result<bool, Error> {
    let gen = agg.generation();
    apply_inner(agg, model, op, counter)?;
    Ok(agg.generation() != gen)
}

fn apply_inner(
    agg: &Aggregate,
    model: &mut Model,
    op: &Op,
    counter: &mut u64,
) -> Result<(), Error> {
    let lun_names: Vec<String> = model.luns.keys().cloned().collect();
    let pick = |i: usize| lun_names.get(i % lun_names.len().max(1)).cloned();
    let snaps_of = |m: &Model, l: &str| -> Vec<String> {
        m.snaps
            .keys()
            .filter(|(ln, _)| ln == l)
            .map(|(_, s)| s.clone())
            .collect()
    };
    *counter += 1;
    let n = *counter;
    match op {
        Op::Write {
            lun,
            sector,
            sectors,
            seed,
        } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let size = model.luns[&name].len() as u64;
            let off = (sector * 512) % size;
            let len = (sectors * 512).min(size - off);
            // Some writes are zeros: they turn blocks into holes.
            let data = if seed % 8 == 0 {
                vec![0; len as usize]
            } else {
                pattern(*seed, len as usize)
            };
            match agg.write(id(agg, &name), off, &data) {
                Ok(()) => {
                    model.luns.get_mut(&name).expect("model lun")
                        [off as usize..(off + len) as usize]
                        .copy_from_slice(&data);
                    Ok(())
                }
                Err(Error::NoSpace) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Unmap {
            lun,
            sector,
            sectors,
        } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let size = model.luns[&name].len() as u64;
            let off = (sector * 512) % size;
            let len = (sectors * 512).min(size - off);
            match agg.unmap(id(agg, &name), off, len) {
                Ok(()) => {
                    model.luns.get_mut(&name).expect("model lun")
                        [off as usize..(off + len) as usize]
                        .fill(0);
                    Ok(())
                }
                Err(Error::NoSpace) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Cp => {
            agg.cp(n)?;
            model.highest_seq = model.highest_seq.max(n);
            Ok(())
        }
        Op::SnapCreate { lun } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let s = format!("s{n}");
            agg.snapshot_create(id(agg, &name), &s)?;
            let data = model.luns[&name].clone();
            model.snaps.insert((name, s), data);
            Ok(())
        }
        Op::SnapDelete { lun, snap } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let snaps = snaps_of(model, &name);
            let Some(s) = snaps.get(snap % snaps.len().max(1)) else {
                return Ok(());
            };
            agg.snapshot_delete(id(agg, &name), s)?;
            model.snaps.remove(&(name, s.clone()));
            Ok(())
        }
        Op::SnapRestore { lun, snap } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let snaps = snaps_of(model, &name);
            let Some(s) = snaps.get(snap % snaps.len().max(1)) else {
                return Ok(());
            };
            agg.snapshot_restore(id(agg, &name), s)?;
            let data = model.snaps[&(name.clone(), s.clone())].clone();
            model.luns.insert(name, data);
            Ok(())
        }
        Op::Clone { lun, snap } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let snaps = snaps_of(model, &name);
            let Some(s) = snaps.get(snap % snaps.len().max(1)) else {
                return Ok(());
            };
            let c = format!("c{n}");
            match agg.clone_lun(id(agg, &name), s, &c) {
                Ok(_) => {
                    let data = model.snaps[&(name, s.clone())].clone();
                    model.luns.insert(c, data);
                    Ok(())
                }
                Err(Error::NoSpace) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Grow { lun, sectors } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            let new = model.luns[&name].len() as u64 + sectors * 512;
            match agg.resize_lun(id(agg, &name), new) {
                Ok(()) => {
                    model
                        .luns
                        .get_mut(&name)
                        .expect("model lun")
                        .resize(new as usize, 0);
                    Ok(())
                }
                Err(Error::NoSpace) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::CreateLun { sectors } => {
            let name = format!("l{n}");
            match agg.create_lun(&name, sectors.max(&1) * 512) {
                Ok(_) => {
                    model
                        .luns
                        .insert(name, vec![0; (sectors.max(&1) * 512) as usize]);
                    Ok(())
                }
                Err(Error::NoSpace) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::DeleteLun { lun } => {
            let Some(name) = pick(*lun) else {
                return Ok(());
            };
            if !snaps_of(model, &name).is_empty() || model.luns.len() <= 1 {
                return Ok(());
            }
            agg.delete_lun(id(agg, &name))?;
            model.luns.remove(&name);
            Ok(())
        }
    }
}

pub fn assert_clean(agg: &Aggregate) {
    let r = agg.check();
    assert!(r.is_clean(), "check not clean:\n{r}");
}
