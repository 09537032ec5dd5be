//! Block allocator: in-memory reference counts derived at mount.
//!
//! `rc[b]` = number of references to block `b` from the committed metadata:
//! catalog entries (tree roots), map nodes (children) and the superblock
//! (catalog blocks). Nothing about free space is stored on disk; `open` walks
//! every tree (active LUNs and snapshots, each shared node once) and rebuilds
//! the counts.
//!
//! Tradeoff (vs. persistent refcounts or bitmaps): mount reads all map nodes
//! (~0.4% of mapped data: 4 MiB per fully written GiB) and keeps 4 bytes per
//! block in memory, which is fine for the 1-10 GiB aggregates we target; in
//! exchange no free-space structure can be corrupted, CPs write no allocation
//! metadata, and snapshot/clone sharing is exact (a block is free iff nothing
//! reachable points at it).
//!
//! Placement: the aggregate is cut into regions of `REGION_BLOCKS`; a CP fills
//! the region with the most free blocks, then the next emptiest, so its writes
//! stay long and sequential even after random overwrites have punched holes
//! everywhere (write-anywhere's free-space fragmentation).
//!
//! Invariants:
//! * A block freed while building CP k is `PENDING`: it is still referenced by
//!   the committed CP k-1, so it is not handed out until CP k has committed
//!   (`release_pending`). Hence a CP never overwrites a block that the last
//!   committed CP (or any snapshot in it) references.
//! * `free` counts blocks with rc == 0 that are not pending; `region_free[r]`
//!   the same per region.

use crate::error::{Error, Result};
use crate::layout::FIRST_FREE_BLOCK;

const PENDING: u32 = u32::MAX;
const REGION_SHIFT: u32 = 10;
/// 4 MiB of 4 KiB blocks.
pub const REGION_BLOCKS: u64 = 1 << REGION_SHIFT;

pub struct Alloc {
    rc: Vec<u32>,
    pending: Vec<u64>,
    free: u64,
    region_free: Vec<u32>,
    /// Next block to try, inside the region being filled.
    cursor: u64,
}

impl Alloc {
    pub fn new(total_blocks: u64) -> Alloc {
        let mut rc = vec![0u32; total_blocks as usize];
        for r in rc.iter_mut().take(FIRST_FREE_BLOCK as usize) {
            *r = 1; // superblocks: permanently in use
        }
        let regions = total_blocks.div_ceil(REGION_BLOCKS) as usize;
        let mut region_free: Vec<u32> = (0..regions)
            .map(|r| {
                let start = r as u64 * REGION_BLOCKS;
                ((start + REGION_BLOCKS).min(total_blocks) - start) as u32
            })
            .collect();
        if let Some(r0) = region_free.first_mut() {
            *r0 -= FIRST_FREE_BLOCK.min(total_blocks) as u32;
        }
        Alloc {
            rc,
            pending: Vec::new(),
            free: total_blocks.saturating_sub(FIRST_FREE_BLOCK),
            region_free,
            cursor: FIRST_FREE_BLOCK,
        }
    }

    pub fn total(&self) -> u64 {
        self.rc.len() as u64
    }

    pub fn free(&self) -> u64 {
        self.free
    }

    pub fn refcount(&self, b: u64) -> Option<u32> {
        self.rc
            .get(b as usize)
            .map(|&r| if r == PENDING { 0 } else { r })
    }

    pub fn is_pending(&self, b: u64) -> bool {
        self.rc.get(b as usize) == Some(&PENDING)
    }

    fn check(&self, b: u64) -> Result<usize> {
        if b < FIRST_FREE_BLOCK {
            return Err(Error::Corrupt(format!("pointer to reserved block {b}")));
        }
        if b >= self.total() {
            return Err(Error::Corrupt(format!(
                "pointer to block {b} beyond aggregate end {}",
                self.total()
            )));
        }
        Ok(b as usize)
    }

    fn taken(&mut self, b: u64) {
        self.free -= 1;
        self.region_free[(b >> REGION_SHIFT) as usize] -= 1;
    }

    /// Adds a reference; returns true if this is the first one (the caller
    /// then walks the block's children, when it is a node).
    pub fn incref(&mut self, b: u64) -> Result<bool> {
        let i = self.check(b)?;
        match self.rc[i] {
            PENDING => Err(Error::Corrupt(format!("reference to freed block {b}"))),
            0 => {
                self.rc[i] = 1;
                self.taken(b);
                Ok(true)
            }
            r => {
                self.rc[i] = r + 1;
                Ok(false)
            }
        }
    }

    /// Drops a reference; returns true if the block became unreferenced (now
    /// pending: reusable after the next commit).
    pub fn decref(&mut self, b: u64) -> Result<bool> {
        let i = self.check(b)?;
        match self.rc[i] {
            0 | PENDING => Err(Error::Corrupt(format!(
                "reference count underflow on block {b}"
            ))),
            1 => {
                self.rc[i] = PENDING;
                self.pending.push(b);
                Ok(true)
            }
            r => {
                self.rc[i] = r - 1;
                Ok(false)
            }
        }
    }

    /// Hands out a free block with one reference (owned by whoever stores the
    /// pointer): next free block of the current region, else the start of the
    /// emptiest region.
    pub fn alloc(&mut self) -> Result<u64> {
        if self.free == 0 {
            return Err(Error::NoSpace);
        }
        loop {
            let total = self.total();
            let region_end = ((self.cursor >> REGION_SHIFT) + 1) << REGION_SHIFT;
            if self.cursor < total && self.region_free[(self.cursor >> REGION_SHIFT) as usize] > 0 {
                while self.cursor < region_end.min(total) {
                    let b = self.cursor;
                    self.cursor += 1;
                    if self.rc[b as usize] == 0 {
                        self.rc[b as usize] = 1;
                        self.taken(b);
                        return Ok(b);
                    }
                }
            }
            // Region exhausted: move to the emptiest one (first on ties, so
            // a fresh aggregate fills front to back).
            let (best, n) = self
                .region_free
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
                .map(|(i, n)| (i as u64, *n))
                .unwrap_or((0, 0));
            if n == 0 {
                return Err(Error::NoSpace);
            }
            self.cursor = (best << REGION_SHIFT).max(FIRST_FREE_BLOCK);
        }
    }

    /// After a commit: blocks freed by the CP become allocatable. Returns how many.
    pub fn release_pending(&mut self) -> u64 {
        let n = self.pending.len() as u64;
        for b in std::mem::take(&mut self.pending) {
            self.rc[b as usize] = 0;
            self.region_free[(b >> REGION_SHIFT) as usize] += 1;
        }
        self.free += n;
        n
    }

    /// Blocks with a nonzero count (or pending), i.e. not free.
    pub fn used(&self) -> u64 {
        self.total() - FIRST_FREE_BLOCK - self.free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_blocks_are_not_reused_before_release() {
        let mut a = Alloc::new(5);
        let b1 = a.alloc().unwrap();
        let b2 = a.alloc().unwrap();
        let b3 = a.alloc().unwrap();
        assert_eq!((b1, b2, b3), (2, 3, 4));
        assert!(a.decref(b2).unwrap());
        assert!(matches!(a.alloc(), Err(Error::NoSpace)));
        assert_eq!(a.release_pending(), 1);
        assert_eq!(a.alloc().unwrap(), b2);
        assert!(a.incref(99).is_err());
        assert!(a.incref(0).is_err());
    }

    #[test]
    fn allocation_moves_to_the_emptiest_region() {
        let mut a = Alloc::new(4 * REGION_BLOCKS);
        // Fill three regions, then free every other block of region 1 and
        // all of region 2.
        let blocks: Vec<u64> = (0..3 * REGION_BLOCKS - FIRST_FREE_BLOCK)
            .map(|_| a.alloc().unwrap())
            .collect();
        for &b in &blocks {
            if (REGION_BLOCKS..2 * REGION_BLOCKS).contains(&b) && b % 2 == 0
                || (2 * REGION_BLOCKS..3 * REGION_BLOCKS).contains(&b)
            {
                a.decref(b).unwrap();
            }
        }
        a.release_pending();
        // Region 3 (untouched, all free) first, then region 2 (all free), then
        // region 1's holes.
        let next: Vec<u64> = (0..2 * REGION_BLOCKS + 2)
            .map(|_| a.alloc().unwrap())
            .collect();
        assert_eq!(next[0], 3 * REGION_BLOCKS);
        assert_eq!(next[REGION_BLOCKS as usize], 2 * REGION_BLOCKS);
        assert_eq!(next[2 * REGION_BLOCKS as usize], REGION_BLOCKS);
        assert_eq!(next[2 * REGION_BLOCKS as usize + 1], REGION_BLOCKS + 2);
        assert_eq!(a.free(), REGION_BLOCKS / 2 - 2);
    }
}
