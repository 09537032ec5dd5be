//! Building a consistency point: copy-on-write of the block map, the catalog
//! chain, and the coalesced (parallel) writes that put it on disk.
//!
//! `CpCtx` holds one CP under construction. Its reference-count rules: a
//! subtree pointer returned by `rewrite` carries one reference for whoever
//! stores it; the reference on the old subtree is dropped (freeing what
//! nothing else points at, recursively). Unchanged children gain the new node
//! as a parent. Blocks freed here are pending until the CP commits.

use crate::aggregate::{Aggregate, Committed, MAX_IO_BLOCKS};
use crate::alloc::Alloc;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::storage::{aligned_buf, Storage};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const BS: u64 = BLOCK_SIZE as u64;

/// Writes `payload` as a catalog chain into `blocks` (already allocated).
/// Returns the head pointer and the blocks to write.
pub(crate) fn build_catalog_chain(
    payload: &[u8],
    blocks: &[u64],
    gen: u64,
) -> (BlockPtr, Vec<(u64, Block)>) {
    let mut next = BlockPtr::NULL;
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(CAT_PAYLOAD).collect()
    };
    for (chunk, &b) in chunks.iter().zip(blocks).rev() {
        let enc = encode_catalog_block(next, chunk);
        next = BlockPtr {
            block: b,
            crc: crc(&enc[..]),
            birth: gen as u32,
        };
        out.push((b, enc));
    }
    (next, out)
}

/// Checksums of the data blocks (0 for holes), on several threads when there
/// are many: at CP time this is the largest CPU cost.
pub(crate) fn parallel_crcs<K: Sync>(entries: &[(K, Option<&Block>)]) -> Vec<u32> {
    let one = |e: &(K, Option<&Block>)| e.1.map_or(0, |b| crc(&b[..]));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if threads <= 1 || entries.len() < 4096 {
        return entries.iter().map(one).collect();
    }
    let chunk = entries.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = entries
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(one).collect::<Vec<u32>>()))
            .collect();
        // A panicking checksum thread is a bug; recompute inline rather than unwrap.
        parts
            .into_iter()
            .zip(entries.chunks(chunk))
            .flat_map(|(h, c)| h.join().unwrap_or_else(|_| c.iter().map(one).collect()))
            .collect()
    })
}

/// Writes blocks sorted by number, coalescing contiguous ones into single
/// writes of up to MAX_IO_BLOCKS: vectored straight from the blocks where
/// the storage can (buffered files), else gathered into aligned buffers with
/// up to `storage.io_parallelism()` writes in flight (the caller syncs
/// afterwards, so their order is free). Returns the number of write calls.
pub(crate) fn write_runs(
    storage: &dyn Storage,
    mut blocks: Vec<(u64, &[u8; BLOCK_SIZE])>,
) -> Result<u64> {
    blocks.sort_unstable_by_key(|(b, _)| *b);
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len()
            && blocks[j].0 == blocks[i].0 + (j - i) as u64
            && j - i < MAX_IO_BLOCKS
        {
            j += 1;
        }
        runs.push(i..j);
        i = j;
    }
    // Gathers a run into an aligned buffer (no bounce copy under O_DIRECT).
    let write_run = |r: &std::ops::Range<usize>, buf: &mut Vec<u8>| -> Result<()> {
        let len = r.len() * BLOCK_SIZE;
        if buf.len() < len + 4096 {
            *buf = aligned_buf(MAX_IO_BLOCKS * BLOCK_SIZE).0;
        }
        let off = buf.as_ptr().align_offset(4096);
        let dst = &mut buf[off..off + len];
        for (k, (_, b)) in blocks[r.clone()].iter().enumerate() {
            dst[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE].copy_from_slice(&b[..]);
        }
        storage.write_at(dst, blocks[r.start].0 * BS)?;
        Ok(())
    };
    if storage.writes_vectored() {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(MAX_IO_BLOCKS);
        for r in &runs {
            parts.clear();
            parts.extend(blocks[r.clone()].iter().map(|(_, b)| &b[..]));
            storage.write_parts_at(&parts, blocks[r.start].0 * BS)?;
        }
        return Ok(runs.len() as u64);
    }
    let threads = storage.io_parallelism().clamp(1, 16).min(runs.len());
    if threads <= 1 {
        let mut buf = Vec::new();
        for r in &runs {
            write_run(r, &mut buf)?;
        }
    } else {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = Vec::new();
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(r) = runs.get(k) else { return Ok(()) };
                            if let Err(e) = write_run(r, &mut buf) {
                                // Stop the others early; the CP fails anyway.
                                next.store(runs.len(), Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(Error::Corrupt("CP writer thread panicked".into())))
                })
                .collect()
        });
        for r in results {
            r?;
        }
    }
    Ok(runs.len() as u64)
}

/// State of one CP under construction.
pub(crate) struct CpCtx<'a> {
    pub(crate) agg: &'a Aggregate,
    pub(crate) c: &'a Committed,
    pub(crate) alloc: &'a mut Alloc,
    pub(crate) gen: u64,
    pub(crate) catalog: Catalog,
    /// Map nodes written by this CP.
    pub(crate) owned: Vec<(u64, Block)>,
    pub(crate) new_nodes: HashMap<u64, (u32, Arc<Node>)>,
    pub(crate) freed_nodes: Vec<u64>,
    pub(crate) allocated: u64,
}

impl CpCtx<'_> {
    pub(crate) fn alloc_block(&mut self) -> Result<u64> {
        let b = self.alloc.alloc()?;
        self.allocated += 1;
        Ok(b)
    }

    pub(crate) fn load(&self, p: BlockPtr) -> Result<Arc<Node>> {
        match self.new_nodes.get(&p.block) {
            Some((crc, n)) if *crc == p.crc => Ok(n.clone()),
            _ => self.agg.node(self.c, p),
        }
    }

    /// Writes a node to a fresh block (one reference, owned by the caller).
    pub(crate) fn write_node(&mut self, n: Node) -> Result<BlockPtr> {
        let b = self.alloc_block()?;
        let enc = n.encode();
        let crc = crc(&enc[..]);
        self.new_nodes.insert(b, (crc, Arc::new(n)));
        self.owned.push((b, enc));
        Ok(BlockPtr {
            block: b,
            crc,
            birth: self.gen as u32,
        })
    }

    /// Copy-on-write of the subtree at `old` (a level-`level` node, level 0 =
    /// data) applying `entries` (sorted, unique block numbers, all inside this
    /// subtree; each with its new data pointer or NULL). Returns the new
    /// subtree pointer, holding one reference for the caller. The reference
    /// the caller held on `old` is dropped.
    pub(crate) fn rewrite(
        &mut self,
        old: BlockPtr,
        level: u32,
        entries: &[(u64, BlockPtr)],
        delta: &mut i64,
    ) -> Result<BlockPtr> {
        if level == 0 {
            let [(_, new)] = entries else {
                return Err(Error::Corrupt("duplicate block in CP".into()));
            };
            *delta += (!new.is_null()) as i64 - (!old.is_null()) as i64;
            // `old` is a data block still referenced by the old leaf; that
            // leaf's release (below, in the caller) drops it if unshared.
            return Ok(*new);
        }
        let mut node = if old.is_null() {
            Node::empty()
        } else {
            (*self.load(old)?).clone()
        };
        let shift = FANOUT_SHIFT * (level - 1);
        let slot_of = |blk: u64| ((blk >> shift) as usize) & (FANOUT - 1);
        let mut modified = [false; FANOUT];
        let mut i = 0;
        while i < entries.len() {
            let s = slot_of(entries[i].0);
            let mut j = i + 1;
            while j < entries.len() && slot_of(entries[j].0) == s {
                j += 1;
            }
            // The old child keeps the old node's reference; the new child
            // comes with its own.
            node.0[s] = self.rewrite_child(node.0[s], level - 1, &entries[i..j], delta)?;
            modified[s] = true;
            i = j;
        }
        // Unmodified children gain the new node as a parent.
        for (s, p) in node.0.iter().enumerate() {
            if !modified[s] && !p.is_null() {
                self.alloc.incref(p.block)?;
            }
        }
        let new = if node.is_empty() {
            BlockPtr::NULL
        } else {
            self.write_node(node)?
        };
        self.decref_tree(old, level)?;
        Ok(new)
    }

    /// `rewrite` for a child whose old pointer is owned by the old parent (so
    /// no reference is dropped here).
    pub(crate) fn rewrite_child(
        &mut self,
        old: BlockPtr,
        level: u32,
        entries: &[(u64, BlockPtr)],
        delta: &mut i64,
    ) -> Result<BlockPtr> {
        if !old.is_null() && level > 0 {
            // rewrite() drops one reference on `old`; give it one to drop.
            self.alloc.incref(old.block)?;
        }
        self.rewrite(old, level, entries, delta)
    }

    /// Drops one reference to the subtree at `p`; frees what becomes unreferenced.
    pub(crate) fn decref_tree(&mut self, p: BlockPtr, level: u32) -> Result<()> {
        if p.is_null() {
            return Ok(());
        }
        if self.alloc.decref(p.block)? && level >= 1 {
            let n = self.load(p)?;
            self.freed_nodes.push(p.block);
            for c in n.0.iter() {
                self.decref_tree(*c, level - 1)?;
            }
        }
        Ok(())
    }
}
