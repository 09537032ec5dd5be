//! On-disk layout of an aggregate. All integers little-endian.
//!
//! ```text
//! block 0          superblock slot 0  (written by even generations)
//! block 1          superblock slot 1  (written by odd generations)
//! block 2..total   data blocks, map nodes, catalog blocks, free blocks
//! ```
//!
//! Every block except the two superblocks is reached through a [`BlockPtr`]
//! that carries the crc32c of the block's 4 KiB; a block is only trusted after
//! its checksum matched. The superblock checksums itself (last 4 bytes).
//!
//! * Superblock: see the `SB_*` offsets below. The valid slot with the highest
//!   generation is the committed consistency point (CP).
//! * Catalog: the LUN and snapshot tables, serialized (see [`Catalog::encode`])
//!   and stored in a chain of catalog blocks, each starting with a pointer to the
//!   next. The chain is written back to front so each block knows the checksum
//!   of its successor; the superblock points at the head. Rewritten every CP.
//! * Map node: 256 [`BlockPtr`]s of 16 bytes, no header. A LUN of `n` 4 KiB
//!   blocks has a radix tree of depth `d` (smallest d >= 1 with 256^d >= n);
//!   level-1 nodes (leaves) point at data blocks, level-k nodes at level-(k-1)
//!   nodes. Block number 0 in a pointer means "hole": reads as zeros, takes no
//!   space (thin provisioning).

use crate::error::{Error, Result};
use std::collections::BTreeMap;

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SHIFT: u32 = 12;
pub const PTR_SIZE: usize = 16;
/// Pointers per map node.
pub const FANOUT: usize = BLOCK_SIZE / PTR_SIZE;
pub const FANOUT_SHIFT: u32 = 8;
/// 256^5 blocks of 4 KiB = 4 PiB: far beyond any LUN we serve.
pub const MAX_DEPTH: u32 = 5;
pub const SUPERBLOCK_SLOTS: u64 = 2;
/// First block the allocator may hand out.
pub const FIRST_FREE_BLOCK: u64 = SUPERBLOCK_SLOTS;

const _: () = assert!(FANOUT == 1 << FANOUT_SHIFT);
const _: () = assert!(BLOCK_SIZE == 1 << BLOCK_SHIFT);

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Pointer to a block: where it is and what it must contain.
///
/// ```text
/// 0..8   block number (0 = hole)
/// 8..12  crc32c of the 4 KiB block
/// 12..16 low 32 bits of the CP generation that wrote it (for `check` and debugging)
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockPtr {
    pub block: u64,
    pub crc: u32,
    pub birth: u32,
}

const PTR_BLOCK_OFF: usize = 0;
const PTR_CRC_OFF: usize = PTR_BLOCK_OFF + 8;
const PTR_BIRTH_OFF: usize = PTR_CRC_OFF + 4;
const _: () = assert!(PTR_BIRTH_OFF + 4 == PTR_SIZE);

impl BlockPtr {
    pub const NULL: BlockPtr = BlockPtr {
        block: 0,
        crc: 0,
        birth: 0,
    };

    pub fn is_null(&self) -> bool {
        self.block == 0
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[PTR_BLOCK_OFF..PTR_CRC_OFF].copy_from_slice(&self.block.to_le_bytes());
        out[PTR_CRC_OFF..PTR_BIRTH_OFF].copy_from_slice(&self.crc.to_le_bytes());
        out[PTR_BIRTH_OFF..PTR_SIZE].copy_from_slice(&self.birth.to_le_bytes());
    }

    /// `b` must be at least PTR_SIZE bytes (callers slice fixed layouts).
    pub fn decode(b: &[u8]) -> BlockPtr {
        BlockPtr {
            block: le_u64(&b[PTR_BLOCK_OFF..PTR_CRC_OFF]),
            crc: le_u32(&b[PTR_CRC_OFF..PTR_BIRTH_OFF]),
            birth: le_u32(&b[PTR_BIRTH_OFF..PTR_SIZE]),
        }
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A 4 KiB block buffer.
pub type Block = Box<[u8; BLOCK_SIZE]>;

pub fn zero_block() -> Block {
    Box::new([0u8; BLOCK_SIZE])
}

/// A block holding a copy of `src` (exactly `BLOCK_SIZE` bytes), without
/// zeroing it first.
pub fn block_from(src: &[u8; BLOCK_SIZE]) -> Block {
    // `Box::new(*src)` may go through the stack; this is malloc + memcpy.
    match Box::<[u8]>::from(&src[..]).try_into() {
        Ok(b) => b,
        Err(_) => {
            let mut b = zero_block();
            b.copy_from_slice(src);
            b
        }
    }
}

/// A decoded map node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node(pub [BlockPtr; FANOUT]);

impl Node {
    pub fn empty() -> Node {
        Node([BlockPtr::NULL; FANOUT])
    }
    pub fn decode(b: &[u8; BLOCK_SIZE]) -> Node {
        let mut n = Node::empty();
        for (i, p) in n.0.iter_mut().enumerate() {
            *p = BlockPtr::decode(&b[i * PTR_SIZE..(i + 1) * PTR_SIZE]);
        }
        n
    }
    pub fn encode(&self) -> Block {
        let mut b = zero_block();
        for (i, p) in self.0.iter().enumerate() {
            p.encode(&mut b[i * PTR_SIZE..(i + 1) * PTR_SIZE]);
        }
        b
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|p| p.is_null())
    }
}

/// Tree depth for a LUN of `nblocks` 4 KiB blocks.
pub fn depth_for(nblocks: u64) -> u32 {
    let mut d = 1;
    while d < MAX_DEPTH && (1u64 << (FANOUT_SHIFT * d)) < nblocks {
        d += 1;
    }
    d
}

/// Largest LUN the tree can address, in 4 KiB blocks.
pub const MAX_LUN_BLOCKS: u64 = 1u64 << (FANOUT_SHIFT * MAX_DEPTH);

// ---------------------------------------------------------------- superblock

pub const SB_MAGIC: [u8; 8] = *b"NVTAGGR1";
pub const SB_VERSION: u32 = 1;
const SB_MAGIC_OFF: usize = 0;
const SB_VERSION_OFF: usize = SB_MAGIC_OFF + 8;
const SB_BLOCK_SIZE_OFF: usize = SB_VERSION_OFF + 4;
const SB_GENERATION_OFF: usize = SB_BLOCK_SIZE_OFF + 4;
const SB_HIGHEST_SEQ_OFF: usize = SB_GENERATION_OFF + 8;
const SB_TOTAL_BLOCKS_OFF: usize = SB_HIGHEST_SEQ_OFF + 8;
const SB_CATALOG_PTR_OFF: usize = SB_TOTAL_BLOCKS_OFF + 8;
const SB_CATALOG_LEN_OFF: usize = SB_CATALOG_PTR_OFF + PTR_SIZE;
const SB_SOFT_THRESHOLD_OFF: usize = SB_CATALOG_LEN_OFF + 8;
const SB_FIELDS_END: usize = SB_SOFT_THRESHOLD_OFF + 4;
/// crc32c of bytes 0..SB_CRC_OFF, at the very end so a torn write (which
/// persists a prefix) cannot keep an old checksum matching new fields.
const SB_CRC_OFF: usize = BLOCK_SIZE - 4;
const _: () = assert!(SB_FIELDS_END <= SB_CRC_OFF);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// CP generation; slot = generation % 2.
    pub generation: u64,
    /// Highest NVRAM log sequence number whose effect this CP contains.
    pub highest_seq: u64,
    pub total_blocks: u64,
    pub catalog: BlockPtr,
    pub catalog_len: u64,
    /// Percent of the aggregate in use at which the soft threshold is reported.
    pub soft_threshold_pct: u32,
}

impl Superblock {
    pub fn slot(generation: u64) -> u64 {
        generation % SUPERBLOCK_SLOTS
    }

    pub fn encode(&self) -> Block {
        let mut b = zero_block();
        b[SB_MAGIC_OFF..SB_VERSION_OFF].copy_from_slice(&SB_MAGIC);
        b[SB_VERSION_OFF..SB_BLOCK_SIZE_OFF].copy_from_slice(&SB_VERSION.to_le_bytes());
        b[SB_BLOCK_SIZE_OFF..SB_GENERATION_OFF].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[SB_GENERATION_OFF..SB_HIGHEST_SEQ_OFF].copy_from_slice(&self.generation.to_le_bytes());
        b[SB_HIGHEST_SEQ_OFF..SB_TOTAL_BLOCKS_OFF].copy_from_slice(&self.highest_seq.to_le_bytes());
        b[SB_TOTAL_BLOCKS_OFF..SB_CATALOG_PTR_OFF]
            .copy_from_slice(&self.total_blocks.to_le_bytes());
        self.catalog
            .encode(&mut b[SB_CATALOG_PTR_OFF..SB_CATALOG_LEN_OFF]);
        b[SB_CATALOG_LEN_OFF..SB_SOFT_THRESHOLD_OFF]
            .copy_from_slice(&self.catalog_len.to_le_bytes());
        b[SB_SOFT_THRESHOLD_OFF..SB_FIELDS_END]
            .copy_from_slice(&self.soft_threshold_pct.to_le_bytes());
        let c = crc(&b[..SB_CRC_OFF]);
        b[SB_CRC_OFF..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// None if the slot does not hold a valid superblock (never written, torn,
    /// corrupted, or another format).
    pub fn decode(b: &[u8; BLOCK_SIZE]) -> Option<Superblock> {
        if b[SB_MAGIC_OFF..SB_VERSION_OFF] != SB_MAGIC {
            return None;
        }
        if crc(&b[..SB_CRC_OFF]) != le_u32(&b[SB_CRC_OFF..]) {
            return None;
        }
        if le_u32(&b[SB_VERSION_OFF..]) != SB_VERSION
            || le_u32(&b[SB_BLOCK_SIZE_OFF..]) != BLOCK_SIZE as u32
        {
            return None;
        }
        Some(Superblock {
            generation: le_u64(&b[SB_GENERATION_OFF..]),
            highest_seq: le_u64(&b[SB_HIGHEST_SEQ_OFF..]),
            total_blocks: le_u64(&b[SB_TOTAL_BLOCKS_OFF..]),
            catalog: BlockPtr::decode(&b[SB_CATALOG_PTR_OFF..SB_CATALOG_LEN_OFF]),
            catalog_len: le_u64(&b[SB_CATALOG_LEN_OFF..]),
            soft_threshold_pct: le_u32(&b[SB_SOFT_THRESHOLD_OFF..]),
        })
    }
}

// ---------------------------------------------------------------- catalog chain

/// Catalog block: next pointer, payload length, payload.
const CAT_NEXT_OFF: usize = 0;
const CAT_LEN_OFF: usize = CAT_NEXT_OFF + PTR_SIZE;
const CAT_PAYLOAD_OFF: usize = CAT_LEN_OFF + 8;
pub const CAT_PAYLOAD: usize = BLOCK_SIZE - CAT_PAYLOAD_OFF;

pub fn encode_catalog_block(next: BlockPtr, payload: &[u8]) -> Block {
    let mut b = zero_block();
    next.encode(&mut b[CAT_NEXT_OFF..CAT_LEN_OFF]);
    b[CAT_LEN_OFF..CAT_LEN_OFF + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[CAT_PAYLOAD_OFF..CAT_PAYLOAD_OFF + payload.len()].copy_from_slice(payload);
    b
}

pub fn decode_catalog_block(b: &[u8; BLOCK_SIZE]) -> Result<(BlockPtr, &[u8])> {
    let next = BlockPtr::decode(&b[CAT_NEXT_OFF..CAT_LEN_OFF]);
    let len = le_u32(&b[CAT_LEN_OFF..]) as usize;
    if len > CAT_PAYLOAD {
        return Err(Error::Corrupt(format!(
            "catalog block payload length {len}"
        )));
    }
    Ok((next, &b[CAT_PAYLOAD_OFF..CAT_PAYLOAD_OFF + len]))
}

/// Number of catalog blocks needed for `len` bytes of catalog (at least one).
pub fn catalog_blocks_for(len: usize) -> u64 {
    (len.div_ceil(CAT_PAYLOAD)).max(1) as u64
}

// ---------------------------------------------------------------- catalog

pub type LunId = u32;
pub type SnapId = u32;

/// One LUN's (or one snapshot's) tree and geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeRoot {
    pub size_bytes: u64,
    /// Logical block size exposed to initiators (512 or 4096); metadata for
    /// the SCSI layer, the store itself works in 4 KiB blocks.
    pub logical_block_size: u32,
    pub depth: u32,
    pub root: BlockPtr,
    /// Non-hole data pointers in the tree.
    pub mapped_blocks: u64,
}

impl TreeRoot {
    pub fn nblocks(&self) -> u64 {
        self.size_bytes.div_ceil(BLOCK_SIZE as u64)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunEntry {
    pub id: LunId,
    pub name: String,
    pub tree: TreeRoot,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapEntry {
    pub id: SnapId,
    pub lun: LunId,
    pub name: String,
    /// Generation of the CP that created it.
    pub generation: u64,
    pub tree: TreeRoot,
}

/// The LUN and snapshot tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub next_lun_id: LunId,
    pub next_snap_id: SnapId,
    pub luns: BTreeMap<LunId, LunEntry>,
    pub snaps: BTreeMap<SnapId, SnapEntry>,
}

const CATALOG_MAGIC: [u8; 8] = *b"NVTCATL1";
pub const MAX_NAME: usize = 255;

impl Catalog {
    /// ```text
    /// magic[8] next_lun_id u32 next_snap_id u32 nluns u32 nsnaps u32
    /// nluns  x { id u32, name (u8 len + bytes), tree }
    /// nsnaps x { id u32, lun u32, name, generation u64, tree }
    /// tree = size_bytes u64, logical_block_size u32, depth u32, root ptr[16], mapped u64
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(256);
        w.extend_from_slice(&CATALOG_MAGIC);
        w.extend_from_slice(&self.next_lun_id.to_le_bytes());
        w.extend_from_slice(&self.next_snap_id.to_le_bytes());
        w.extend_from_slice(&(self.luns.len() as u32).to_le_bytes());
        w.extend_from_slice(&(self.snaps.len() as u32).to_le_bytes());
        fn tree(w: &mut Vec<u8>, t: &TreeRoot) {
            w.extend_from_slice(&t.size_bytes.to_le_bytes());
            w.extend_from_slice(&t.logical_block_size.to_le_bytes());
            w.extend_from_slice(&t.depth.to_le_bytes());
            let mut p = [0u8; PTR_SIZE];
            t.root.encode(&mut p);
            w.extend_from_slice(&p);
            w.extend_from_slice(&t.mapped_blocks.to_le_bytes());
        }
        fn name(w: &mut Vec<u8>, n: &str) {
            // Names are validated to <= MAX_NAME bytes on creation.
            let b = &n.as_bytes()[..n.len().min(MAX_NAME)];
            w.push(b.len() as u8);
            w.extend_from_slice(b);
        }
        for l in self.luns.values() {
            w.extend_from_slice(&l.id.to_le_bytes());
            name(&mut w, &l.name);
            tree(&mut w, &l.tree);
        }
        for s in self.snaps.values() {
            w.extend_from_slice(&s.id.to_le_bytes());
            w.extend_from_slice(&s.lun.to_le_bytes());
            name(&mut w, &s.name);
            w.extend_from_slice(&s.generation.to_le_bytes());
            tree(&mut w, &s.tree);
        }
        w
    }

    pub fn decode(b: &[u8]) -> Result<Catalog> {
        let mut r = Reader { b, pos: 0 };
        if r.take(8)? != CATALOG_MAGIC {
            return Err(Error::Corrupt("bad catalog magic".into()));
        }
        let next_lun_id = r.u32()?;
        let next_snap_id = r.u32()?;
        let nluns = r.u32()?;
        let nsnaps = r.u32()?;
        let mut c = Catalog {
            next_lun_id,
            next_snap_id,
            ..Default::default()
        };
        for _ in 0..nluns {
            let id = r.u32()?;
            let name = r.name()?;
            let tree = r.tree()?;
            c.luns.insert(id, LunEntry { id, name, tree });
        }
        for _ in 0..nsnaps {
            let id = r.u32()?;
            let lun = r.u32()?;
            let name = r.name()?;
            let generation = r.u64()?;
            let tree = r.tree()?;
            c.snaps.insert(
                id,
                SnapEntry {
                    id,
                    lun,
                    name,
                    generation,
                    tree,
                },
            );
        }
        if r.pos != b.len() {
            return Err(Error::Corrupt("trailing bytes in catalog".into()));
        }
        Ok(c)
    }
}

/// Bounded reader: every read checks the remaining length once.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or_else(|| Error::Corrupt("catalog truncated".into()))?;
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(le_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(le_u64(self.take(8)?))
    }
    fn name(&mut self) -> Result<String> {
        let n = self.take(1)?[0] as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::Corrupt("catalog name not UTF-8".into()))
    }
    fn tree(&mut self) -> Result<TreeRoot> {
        let size_bytes = self.u64()?;
        let logical_block_size = self.u32()?;
        let depth = self.u32()?;
        let root = BlockPtr::decode(self.take(PTR_SIZE)?);
        let mapped_blocks = self.u64()?;
        if !(1..=MAX_DEPTH).contains(&depth) {
            return Err(Error::Corrupt(format!("tree depth {depth}")));
        }
        Ok(TreeRoot {
            size_bytes,
            logical_block_size,
            depth,
            root,
            mapped_blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_torn() {
        let sb = Superblock {
            generation: 7,
            highest_seq: 99,
            total_blocks: 1000,
            catalog: BlockPtr {
                block: 5,
                crc: 0xdead,
                birth: 7,
            },
            catalog_len: 40,
            soft_threshold_pct: 80,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), Some(sb));
        b[SB_HIGHEST_SEQ_OFF] ^= 1;
        assert_eq!(Superblock::decode(&b), None);
    }

    #[test]
    fn catalog_roundtrip_and_truncation() {
        let mut c = Catalog {
            next_lun_id: 3,
            next_snap_id: 2,
            ..Default::default()
        };
        let tree = TreeRoot {
            size_bytes: 1 << 30,
            logical_block_size: 512,
            depth: 3,
            root: BlockPtr {
                block: 9,
                crc: 1,
                birth: 2,
            },
            mapped_blocks: 5,
        };
        c.luns.insert(
            1,
            LunEntry {
                id: 1,
                name: "a".into(),
                tree: tree.clone(),
            },
        );
        c.snaps.insert(
            1,
            SnapEntry {
                id: 1,
                lun: 1,
                name: "s".into(),
                generation: 4,
                tree,
            },
        );
        let e = c.encode();
        assert_eq!(Catalog::decode(&e).unwrap(), c);
        for cut in 0..e.len() {
            assert!(Catalog::decode(&e[..cut]).is_err());
        }
    }

    #[test]
    fn depths() {
        assert_eq!(depth_for(1), 1);
        assert_eq!(depth_for(256), 1);
        assert_eq!(depth_for(257), 2);
        assert_eq!(depth_for(262144), 3);
    }
}
