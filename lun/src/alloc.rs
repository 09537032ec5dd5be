//! Block allocator: in-memory reference counts derived at mount.
//!
//! `rc[b]` = number of references to block `b` from the committed metadata:
//! catalog entries (tree roots), map nodes (children) and the superblock
//! (catalog blocks). Nothing about free space is stored on disk; `open` walks
//! every tree (active LUNs and snapshots, each shared node once) and rebuilds
//! the counts.
//!
//! Tradeoff (vs. persistent refcounts or bitmaps): mount reads all map nodes
//! (~0.4% of mapped data: 4 MiB per fully written GiB), which is fine for the
//! 1-10 GiB aggregates we target; in exchange no free-space structure can be
//! corrupted, CPs write no allocation metadata, and snapshot/clone sharing is
//! exact (a block is free iff nothing reachable points at it).
//!
//! Invariants:
//! * A block freed while building CP k is `PENDING`: it is still referenced by
//!   the committed CP k-1, so it is not handed out until CP k has committed
//!   (`release_pending`). Hence a CP never overwrites a block that the last
//!   committed CP (or any snapshot in it) references.
//! * `free` counts blocks with rc == 0 that are not pending.

use crate::error::{Error, Result};
use crate::layout::FIRST_FREE_BLOCK;

const PENDING: u32 = u32::MAX;

pub struct Alloc {
    rc: Vec<u32>,
    pending: Vec<u64>,
    free: u64,
    cursor: u64,
}

impl Alloc {
    pub fn new(total_blocks: u64) -> Alloc {
        let mut rc = vec![0u32; total_blocks as usize];
        for r in rc.iter_mut().take(FIRST_FREE_BLOCK as usize) {
            *r = 1; // superblocks: permanently in use
        }
        Alloc {
            rc,
            pending: Vec::new(),
            free: total_blocks.saturating_sub(FIRST_FREE_BLOCK),
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

    fn slot(&mut self, b: u64) -> Result<&mut u32> {
        if b < FIRST_FREE_BLOCK {
            return Err(Error::Corrupt(format!("pointer to reserved block {b}")));
        }
        let total = self.rc.len();
        self.rc.get_mut(b as usize).ok_or_else(|| {
            Error::Corrupt(format!("pointer to block {b} beyond aggregate end {total}"))
        })
    }

    /// Adds a reference; returns true if this is the first one (the caller
    /// then walks the block's children, when it is a node).
    pub fn incref(&mut self, b: u64) -> Result<bool> {
        let r = self.slot(b)?;
        if *r == PENDING {
            return Err(Error::Corrupt(format!("reference to freed block {b}")));
        }
        *r += 1;
        let first = *r == 1;
        if first {
            self.free -= 1;
        }
        Ok(first)
    }

    /// Drops a reference; returns true if the block became unreferenced (now
    /// pending: reusable after the next commit).
    pub fn decref(&mut self, b: u64) -> Result<bool> {
        let r = self.slot(b)?;
        if *r == 0 || *r == PENDING {
            return Err(Error::Corrupt(format!(
                "reference count underflow on block {b}"
            )));
        }
        *r -= 1;
        if *r == 0 {
            *r = PENDING;
            self.pending.push(b);
            return Ok(true);
        }
        Ok(false)
    }

    /// Hands out a free block with one reference (owned by whoever stores the
    /// pointer). Next-fit from a cursor so one CP's blocks are contiguous.
    pub fn alloc(&mut self) -> Result<u64> {
        if self.free == 0 {
            return Err(Error::NoSpace);
        }
        let total = self.rc.len() as u64;
        for _ in 0..total {
            if self.cursor >= total {
                self.cursor = FIRST_FREE_BLOCK;
            }
            let b = self.cursor;
            self.cursor += 1;
            if self.rc[b as usize] == 0 {
                self.rc[b as usize] = 1;
                self.free -= 1;
                return Ok(b);
            }
        }
        Err(Error::NoSpace)
    }

    /// After a commit: blocks freed by the CP become allocatable. Returns how many.
    pub fn release_pending(&mut self) -> u64 {
        let n = self.pending.len() as u64;
        for b in self.pending.drain(..) {
            self.rc[b as usize] = 0;
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
}
