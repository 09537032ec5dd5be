//! `check`: verifies the committed state of an aggregate from the disk.
//!
//! Walks every tree (LUNs and snapshots) and the catalog chain reading each
//! block from storage (not the node cache), and reports:
//! * checksum mismatches of map nodes, data and catalog blocks;
//! * pointers out of the aggregate, into the superblocks, or beyond a LUN's end;
//! * a block used as two kinds (data / map node / catalog);
//! * per-tree mapped-block counts that differ from the catalog;
//! * reference counts recomputed from the disk that differ from the
//!   allocator's in-memory counts (catches leaks and double frees of the
//!   incremental COW bookkeeping), and the space-reservation invariant.
//!
//! Dirty (not yet CP'd) data is not part of what is checked.

use crate::aggregate::Aggregate;
use crate::alloc::Alloc;
use crate::layout::*;
use crate::storage::Storage;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

const MAX_ERRORS: usize = 100;
/// `check` reads through up to this many unreferenced blocks between
/// referenced ones rather than issuing another read.
const CHECK_GAP: u64 = 16;
/// Largest single read of `check` (blocks).
const CHECK_WINDOW: u64 = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Generation in each superblock slot (None: invalid or never written).
    /// The older slot is the previous CP, kept until the next commit.
    pub superblocks: Vec<Option<u64>>,
    pub generation: u64,
    pub highest_seq: u64,
    pub total_blocks: u64,
    pub luns: usize,
    pub snapshots: usize,
    pub catalog_blocks: u64,
    pub node_blocks: u64,
    pub data_blocks: u64,
    /// Blocks referenced more than once (shared by snapshots/clones).
    pub shared_blocks: u64,
    pub free_blocks: u64,
    /// Errors found (at most MAX_ERRORS listed; `error_count` has the total).
    pub errors: Vec<String>,
    pub error_count: usize,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.error_count == 0
    }
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "generation {} highest_seq {}",
            self.generation, self.highest_seq
        )?;
        for (i, g) in self.superblocks.iter().enumerate() {
            match g {
                Some(g) => writeln!(f, "superblock slot {i}: generation {g}")?,
                None => writeln!(f, "superblock slot {i}: invalid")?,
            }
        }
        writeln!(f, "{} LUNs, {} snapshots", self.luns, self.snapshots)?;
        writeln!(
            f,
            "blocks: {} total, {} data, {} map, {} catalog, {} shared, {} free",
            self.total_blocks,
            self.data_blocks,
            self.node_blocks,
            self.catalog_blocks,
            self.shared_blocks,
            self.free_blocks
        )?;
        if self.is_clean() {
            write!(f, "clean")
        } else {
            writeln!(f, "{} errors:", self.error_count)?;
            for e in &self.errors {
                writeln!(f, "  {e}")?;
            }
            if self.error_count > self.errors.len() {
                writeln!(f, "  ... and {} more", self.error_count - self.errors.len())?;
            }
            Ok(())
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    Catalog,
    Node,
    Data,
}

struct Walker<'a> {
    storage: &'a dyn Storage,
    total: u64,
    generation: u64,
    expected: Vec<u32>,
    kind: Vec<Kind>,
    /// Node block -> (crc it was verified against, mapped data blocks under it).
    memo: HashMap<u64, (u32, u64)>,
    data: HashMap<u64, u32>,
    report: CheckReport,
}

impl Walker<'_> {
    fn claim(&mut self, p: BlockPtr, k: Kind, what: &str) -> bool {
        if p.block < FIRST_FREE_BLOCK || p.block >= self.total {
            self.report.error(format!(
                "{what}: pointer to block {} outside 2..{}",
                p.block, self.total
            ));
            return false;
        }
        if self.generation < u32::MAX as u64 && p.birth as u64 > self.generation {
            self.report.error(format!(
                "{what}: block {} born in future generation {}",
                p.block, p.birth
            ));
        }
        let i = p.block as usize;
        if self.kind[i] != Kind::Free && self.kind[i] != k {
            self.report.error(format!(
                "{what}: block {} used as two kinds of block",
                p.block
            ));
        }
        self.kind[i] = k;
        self.expected[i] += 1;
        true
    }

    fn walk(&mut self, p: BlockPtr, level: u32, base: u64, nblocks: u64, what: &str) -> u64 {
        if p.is_null() || !self.claim(p, if level == 0 { Kind::Data } else { Kind::Node }, what) {
            return 0;
        }
        if level == 0 {
            match self.data.get(&p.block) {
                Some(c) if *c != p.crc => self.report.error(format!(
                    "{what}: data block {} has pointers with different checksums",
                    p.block
                )),
                Some(_) => {}
                None => {
                    self.data.insert(p.block, p.crc);
                }
            }
            return 1;
        }
        if let Some((c, m)) = self.memo.get(&p.block).copied() {
            if c != p.crc {
                self.report.error(format!(
                    "{what}: map block {} has pointers with different checksums",
                    p.block
                ));
            }
            return m;
        }
        let mut buf = zero_block();
        if let Err(e) = self
            .storage
            .read_at(&mut buf[..], p.block * BLOCK_SIZE as u64)
        {
            self.report
                .error(format!("{what}: map block {}: {e}", p.block));
            self.memo.insert(p.block, (p.crc, 0));
            return 0;
        }
        if crc(&buf[..]) != p.crc {
            self.report
                .error(format!("{what}: map block {} checksum mismatch", p.block));
            self.memo.insert(p.block, (p.crc, 0));
            return 0;
        }
        let node = Node::decode(&buf);
        let span = 1u64 << (FANOUT_SHIFT * (level - 1));
        let mut mapped = 0;
        for (i, c) in node.0.iter().enumerate() {
            let cb = base + i as u64 * span;
            if !c.is_null() && cb >= nblocks {
                self.report.error(format!(
                    "{what}: map block {} points beyond the end of the LUN",
                    p.block
                ));
                continue;
            }
            mapped += self.walk(*c, level - 1, cb, nblocks, what);
        }
        self.memo.insert(p.block, (p.crc, mapped));
        mapped
    }

    /// Reads every referenced data block once and verifies its checksum.
    /// Blocks are read in physical order, in windows of up to 1 MiB that read
    /// through gaps of up to `CHECK_GAP` unreferenced blocks, on several
    /// threads when the device allows it.
    fn verify_data(&mut self) {
        let mut blocks: Vec<(u64, u32)> = self.data.iter().map(|(b, c)| (*b, *c)).collect();
        blocks.sort_unstable();
        let mut windows = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j].0 - blocks[j - 1].0 <= CHECK_GAP
                && blocks[j].0 - blocks[i].0 < CHECK_WINDOW
            {
                j += 1;
            }
            windows.push(i..j);
            i = j;
        }
        let storage = self.storage;
        let verify = |r: &std::ops::Range<usize>, buf: &mut Vec<u8>| -> Vec<String> {
            let first = blocks[r.start].0;
            let span = (blocks[r.end - 1].0 - first + 1) as usize * BLOCK_SIZE;
            buf.resize(span, 0);
            if let Err(e) = storage.read_at(buf, first * BLOCK_SIZE as u64) {
                return vec![format!(
                    "data blocks {first}..{}: {e}",
                    blocks[r.end - 1].0 + 1
                )];
            }
            blocks[r.clone()]
                .iter()
                .filter(|(b, c)| {
                    let at = (b - first) as usize * BLOCK_SIZE;
                    crc(&buf[at..at + BLOCK_SIZE]) != *c
                })
                .map(|(b, _)| format!("data block {b} checksum mismatch"))
                .collect()
        };
        let threads = storage
            .io_parallelism()
            .clamp(1, 8)
            .min(windows.len().max(1));
        let next = AtomicUsize::new(0);
        let errors: Vec<Vec<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = Vec::new();
                        let mut errs = Vec::new();
                        while let Some(r) = windows.get(next.fetch_add(1, Ordering::Relaxed)) {
                            errs.extend(verify(r, &mut buf));
                        }
                        errs
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec!["data verification thread panicked".into()])
                })
                .collect()
        });
        let mut errors: Vec<String> = errors.into_iter().flatten().collect();
        // Threads finish windows in any order; report in block order.
        errors.sort();
        for e in errors {
            self.report.error(e);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    storage: &dyn Storage,
    sb: &Superblock,
    catalog: &Catalog,
    catalog_blocks: &[u64],
    alloc: &Alloc,
    avail: i64,
    reserved: u64,
    read_only: bool,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> CheckReport {
    // Units of work for `progress`: each tree, then the data checksums,
    // then the reference counts.
    let units = (catalog.luns.len() + catalog.snaps.len()) as u64 + 2;
    let mut done = 0u64;
    let total = sb.total_blocks;
    let mut w = Walker {
        storage,
        total,
        generation: sb.generation,
        expected: vec![0; total as usize],
        kind: vec![Kind::Free; total as usize],
        memo: HashMap::new(),
        data: HashMap::new(),
        report: CheckReport {
            superblocks: (0..SUPERBLOCK_SLOTS)
                .map(|slot| {
                    let mut b = zero_block();
                    storage.read_at(&mut b[..], slot * BLOCK_SIZE as u64).ok()?;
                    Superblock::decode(&b).map(|s| s.generation)
                })
                .collect(),
            generation: sb.generation,
            highest_seq: sb.highest_seq,
            total_blocks: total,
            luns: catalog.luns.len(),
            snapshots: catalog.snaps.len(),
            ..Default::default()
        },
    };
    let newest = w.report.superblocks.iter().flatten().max().copied();
    if newest != Some(sb.generation) {
        w.report.error(format!(
            "newest superblock on disk is generation {newest:?}, mounted {}: another process wrote the aggregate?",
            sb.generation
        ));
    }
    // The catalog was verified when mounted; re-verify from disk.
    let mut p = sb.catalog;
    let mut n = 0;
    while !p.is_null() && n <= catalog_blocks.len() {
        if !w.claim(p, Kind::Catalog, "catalog") {
            break;
        }
        let mut buf = zero_block();
        match storage.read_at(&mut buf[..], p.block * BLOCK_SIZE as u64) {
            Ok(()) if crc(&buf[..]) == p.crc => match decode_catalog_block(&buf) {
                Ok((next, _)) => p = next,
                Err(e) => {
                    w.report.error(format!("catalog block {}: {e}", p.block));
                    break;
                }
            },
            Ok(()) => {
                w.report
                    .error(format!("catalog block {} checksum mismatch", p.block));
                break;
            }
            Err(e) => {
                w.report.error(format!("catalog block {}: {e}", p.block));
                break;
            }
        }
        n += 1;
    }
    if n != catalog_blocks.len() {
        w.report.error(format!(
            "catalog chain has {n} blocks, {} expected",
            catalog_blocks.len()
        ));
    }

    let mut names = HashSet::new();
    for l in catalog.luns.values() {
        if !names.insert(&l.name) {
            w.report.error(format!("duplicate LUN name {}", l.name));
        }
        let what = format!("LUN {}", l.name);
        progress(done, units, &what);
        check_tree(&mut w, &l.tree, &what);
        done += 1;
    }
    let mut snap_names = HashSet::new();
    for s in catalog.snaps.values() {
        if !catalog.luns.contains_key(&s.lun) {
            w.report.error(format!(
                "snapshot {} belongs to missing LUN {}",
                s.name, s.lun
            ));
        }
        if !snap_names.insert((s.lun, &s.name)) {
            w.report
                .error(format!("duplicate snapshot name {}", s.name));
        }
        let what = format!("snapshot {}", s.name);
        progress(done, units, &what);
        check_tree(&mut w, &s.tree, &what);
        done += 1;
    }
    progress(done, units, "data checksums");
    w.verify_data();
    done += 1;
    progress(done, units, "reference counts");

    for (b, k) in w.kind.iter().enumerate().skip(FIRST_FREE_BLOCK as usize) {
        match k {
            Kind::Free => w.report.free_blocks += 1,
            Kind::Catalog => w.report.catalog_blocks += 1,
            Kind::Node => w.report.node_blocks += 1,
            Kind::Data => w.report.data_blocks += 1,
        }
        if w.expected[b] > 1 {
            w.report.shared_blocks += 1;
        }
    }
    // A read-only aggregate's counts are partial by construction (damage).
    if !read_only {
        let mut bad = Vec::new();
        for b in FIRST_FREE_BLOCK..total {
            let have = alloc.refcount(b).unwrap_or(0);
            let want = w.expected[b as usize];
            if have != want || (want > 0 && alloc.is_pending(b)) {
                bad.push(format!(
                    "block {b}: {have} references in memory, {want} on disk"
                ));
            }
        }
        for e in bad {
            w.report.error(e);
        }
        if avail != alloc.free() as i64 - reserved as i64 {
            w.report.error(format!(
                "space accounting: available {avail} != free {} - reserved {reserved}",
                alloc.free()
            ));
        }
    }
    w.report
}

fn check_tree(w: &mut Walker<'_>, t: &TreeRoot, what: &str) {
    let nblocks = t.nblocks();
    if (t.depth < MAX_DEPTH && (1u64 << (FANOUT_SHIFT * t.depth)) < nblocks) || t.depth > MAX_DEPTH
    {
        w.report.error(format!(
            "{what}: depth {} too small for {} blocks",
            t.depth, nblocks
        ));
        return;
    }
    let mapped = w.walk(t.root, t.depth, 0, nblocks, what);
    if mapped != t.mapped_blocks {
        w.report.error(format!(
            "{what}: {mapped} mapped blocks found, catalog says {}",
            t.mapped_blocks
        ));
    }
}

impl Aggregate {
    /// Verifies the whole committed aggregate (see module docs). Blocks CPs
    /// while it runs; reads and writes continue.
    pub fn check(&self) -> CheckReport {
        self.check_with_progress(&mut |_, _, _| {})
    }

    /// `check`, telling `progress(done, total, what)` before each unit of
    /// work (a LUN's or snapshot's tree, the data checksums, the counts).
    pub fn check_with_progress(&self, progress: &mut dyn FnMut(u64, u64, &str)) -> CheckReport {
        let ro = self.read_only_reason().map(str::to_owned);
        let mut r =
            self.with_check_state(|storage, sb, cat, cat_blocks, alloc, avail, reserved| {
                run(
                    storage,
                    sb,
                    cat,
                    cat_blocks,
                    alloc,
                    avail,
                    reserved,
                    ro.is_some(),
                    progress,
                )
            });
        if let Some(reason) = ro {
            r.error(format!("mounted read-only: {reason}"));
        }
        r
    }
}
