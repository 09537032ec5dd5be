//! SBC-3 block commands: the read/write family, VERIFY, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, GET LBA STATUS, READ CAPACITY, SYNCHRONIZE
//! CACHE, PRE-FETCH and SANITIZE.
//!
//! Invariants: every range is checked against the capacity before any I/O
//! (LBA OUT OF RANGE), every transfer is bounded by the block limits VPD
//! values before a buffer is allocated, and no lock on LU metadata is held
//! during device I/O.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::cdb::{be_at, op, RwCdb};
use crate::device::LbaStatus;
use crate::lu::{dev_sense, trunc, CmdResult, Cx, LogicalUnit, Reply};
use crate::sense::{Failure, Sense};

/// Block limits we advertise (VPD B0) and enforce.
pub(crate) mod limits {
    /// Largest transfer in bytes; the block count depends on the block size.
    pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;
    pub const OPTIMAL_TRANSFER_BYTES: u64 = 1 << 20;
    pub const MAX_UNMAP_LBA_COUNT: u32 = 1024 * 1024;
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
    pub const MAX_WRITE_SAME_LEN: u64 = 65536;
    pub const MAX_COMPARE_AND_WRITE: u8 = 255;
    /// Largest WRITE ATOMIC(16) in bytes.
    pub const MAX_ATOMIC_BYTES: u64 = 4 << 20;
    /// SANITIZE OVERWRITE is background maintenance: it is paced so it
    /// cannot starve the other LUs sharing the store (bytes per second).
    pub const SANITIZE_OVERWRITE_RATE: u64 = 160 << 20;
}

/// I/O is done in chunks this big so huge WRITE SAME / SANITIZE never
/// allocate more than this.
const CHUNK_BYTES: usize = 1 << 20;

impl LogicalUnit {
    pub(crate) fn block_size(&self) -> u64 {
        u64::from(self.dev().block_size().max(1))
    }

    pub(crate) fn max_transfer_blocks(&self) -> u64 {
        (limits::MAX_TRANSFER_BYTES / self.block_size()).max(1)
    }

    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT. Reporting 4 KiB
    /// physical blocks for 512-byte LUs would be truthful for our stores,
    /// but libiscsi's GetLBAStatus.UnmapSingle (1.19) then expects the
    /// first descriptor not to start at the requested LBA, which SBC-3
    /// forbids; so we report one logical block per physical block.
    pub(crate) fn lbppb_exponent(&self) -> u8 {
        0
    }

    pub(crate) fn max_atomic_blocks(&self) -> u64 {
        (limits::MAX_ATOMIC_BYTES / self.block_size()).max(1)
    }

    /// LBA OUT OF RANGE unless `lba .. lba+blocks` lies within the LU.
    pub(crate) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let cap = self.dev().num_blocks();
        match lba.checked_add(blocks) {
            Some(end) if lba <= cap && end <= cap => Ok(()),
            _ => Err(Sense::lba_out_of_range().with_info(lba)),
        }
    }

    /// INVALID FIELD IN CDB (pointing at the TRANSFER LENGTH field) when a
    /// transfer exceeds the MAXIMUM TRANSFER LENGTH we advertise.
    fn check_transfer(&self, cdb_len: usize, blocks: u64) -> Result<(), Sense> {
        if blocks > self.max_transfer_blocks() {
            let field = match cdb_len {
                6 => 4,
                10 => 7,
                12 => 6,
                _ => 10,
            };
            return Err(Sense::invalid_cdb(field));
        }
        Ok(())
    }

    fn read_blocks(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, Sense> {
        let mut buf = vec![0u8; (blocks * self.block_size()) as usize];
        if blocks > 0 {
            self.dev().read(lba, &mut buf).map_err(dev_sense)?;
        }
        Ok(buf)
    }

    pub(crate) fn read(&self, cx: &Cx<'_>) -> CmdResult {
        let rw = RwCdb::parse(&cx.cdb);
        let blocks = u64::from(rw.blocks);
        self.check_range(rw.lba, blocks)?;
        self.check_transfer(cx.cdb.len(), blocks)?;
        Ok(Reply::data(self.read_blocks(rw.lba, blocks)?))
    }

    /// WRITE, WRITE AND VERIFY and WRITE ATOMIC.
    pub(crate) fn write(&self, cx: &Cx<'_>) -> CmdResult {
        let rw = if cx.cdb.opcode() == op::WRITE_ATOMIC_16 {
            RwCdb {
                blocks: u32::from(cx.cdb.be16(12)),
                ..RwCdb::parse(&cx.cdb)
            }
        } else {
            RwCdb::parse(&cx.cdb)
        };
        let blocks = u64::from(rw.blocks);
        let atomic = cx.cdb.opcode() == op::WRITE_ATOMIC_16;
        self.check_writable()?;
        if atomic && blocks > self.max_atomic_blocks() {
            return Err(Sense::invalid_cdb(12).into());
        }
        self.check_range(rw.lba, blocks)?;
        self.check_transfer(cx.cdb.len(), blocks)?;
        if blocks == 0 {
            return Ok(Reply::good());
        }
        let bs = self.block_size() as usize;
        // Write only the whole blocks the initiator actually sent: a short
        // Data-Out is an underflow the transport reports as a residual.
        let have = (cx.data_out().len() / bs).min(blocks as usize);
        if have == 0 {
            return Ok(Reply::good());
        }
        let data = &cx.data_out()[..have * bs];
        let fua = rw.fua()
            || matches!(
                cx.cdb.opcode(),
                op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16
            );
        if atomic {
            let _g = self.io.write();
            self.dev().write(rw.lba, data, fua).map_err(dev_sense)?;
        } else {
            let _g = self.io.read();
            self.dev().write(rw.lba, data, fua).map_err(dev_sense)?;
        }
        Ok(Reply::good())
    }

    pub(crate) fn verify(&self, cx: &Cx<'_>) -> CmdResult {
        let rw = RwCdb::parse(&cx.cdb);
        let blocks = u64::from(rw.blocks);
        let bytchk = (rw.flags >> 1) & 0x03;
        if bytchk == 2 {
            return Err(Sense::invalid_cdb(1).into());
        }
        self.check_range(rw.lba, blocks)?;
        self.check_transfer(cx.cdb.len(), blocks)?;
        if blocks == 0 {
            return Ok(Reply::good());
        }
        let medium = self.read_blocks(rw.lba, blocks)?;
        let bs = self.block_size() as usize;
        let expected: Vec<u8> = match bytchk {
            0 => return Ok(Reply::good()),
            1 => cx.data_out().to_vec(),
            // BYTCHK=3: one block compared against every block.
            _ => {
                let one = cx.data_out().get(..bs).unwrap_or(cx.data_out());
                one.repeat(blocks as usize)
            }
        };
        if expected.len() < medium.len() {
            return Err(Sense::param_list_length().into());
        }
        if let Some(off) = medium.iter().zip(&expected).position(|(a, b)| a != b) {
            return Err(Sense::miscompare(off as u64).into());
        }
        Ok(Reply::good())
    }

    pub(crate) fn prefetch(&self, cx: &Cx<'_>) -> CmdResult {
        let (lba, blocks) = if cx.cdb.opcode() == op::PRE_FETCH_10 {
            (u64::from(cx.cdb.be32(2)), u64::from(cx.cdb.be16(7)))
        } else {
            (cx.cdb.be64(2), u64::from(cx.cdb.be32(10)))
        };
        self.check_range(lba, blocks)?;
        // Nothing is cached ahead of time, so GOOD rather than CONDITION
        // MET (SBC-3 5.9: no cache space to hold the blocks).
        Ok(Reply::good())
    }

    pub(crate) fn sync_cache(&self, cx: &Cx<'_>) -> CmdResult {
        let (lba, blocks) = if cx.cdb.opcode() == op::SYNCHRONIZE_CACHE_10 {
            (u64::from(cx.cdb.be32(2)), u64::from(cx.cdb.be16(7)))
        } else {
            (cx.cdb.be64(2), u64::from(cx.cdb.be32(10)))
        };
        self.check_range(lba, blocks)?;
        self.dev().flush().map_err(dev_sense)?;
        Ok(Reply::good())
    }

    pub(crate) fn read_capacity10(&self, _cx: &Cx<'_>) -> CmdResult {
        let last = self.dev().num_blocks().saturating_sub(1);
        let last32 = u32::try_from(last).unwrap_or(u32::MAX);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last32.to_be_bytes());
        d.extend_from_slice(&(self.block_size() as u32).to_be_bytes());
        Ok(Reply::data(d))
    }

    pub(crate) fn read_capacity16(&self, cx: &Cx<'_>) -> CmdResult {
        let alloc = cx.cdb.be32(10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.dev().num_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(self.block_size() as u32).to_be_bytes());
        // No protection information; LOGICAL BLOCKS PER PHYSICAL BLOCK
        // EXPONENT, lowest aligned LBA 0.
        d[13] = self.lbppb_exponent() & 0x0f;
        if self.dev().thin() {
            d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        }
        Ok(Reply::data(trunc(d, alloc)))
    }

    pub(crate) fn write_same(&self, cx: &Cx<'_>) -> CmdResult {
        let ws16 = cx.cdb.opcode() == op::WRITE_SAME_16;
        let flags = cx.cdb.u8(1);
        let (lba, mut blocks) = if ws16 {
            (cx.cdb.be64(2), u64::from(cx.cdb.be32(10)))
        } else {
            (u64::from(cx.cdb.be32(2)), u64::from(cx.cdb.be16(7)))
        };
        let anchor = flags & 0x10 != 0;
        let unmap = flags & 0x08 != 0;
        let ndob = ws16 && flags & 0x01 != 0;
        // ANCHOR is not supported (ANC_SUP=0), and needs UNMAP anyway.
        if anchor {
            return Err(Sense::invalid_cdb(1).into());
        }
        self.check_writable()?;
        let cap = self.dev().num_blocks();
        if lba > cap {
            return Err(Sense::lba_out_of_range().with_info(lba).into());
        }
        if blocks == 0 {
            blocks = cap - lba;
        }
        if blocks > limits::MAX_WRITE_SAME_LEN {
            return Err(Sense::invalid_cdb(if ws16 { 10 } else { 7 }).into());
        }
        self.check_range(lba, blocks)?;
        let bs = self.block_size() as usize;
        let pattern: Vec<u8> = if ndob {
            vec![0u8; bs]
        } else {
            if cx.data_out().len() != bs {
                return Err(Sense::invalid_cdb(if ws16 { 10 } else { 7 }).into());
            }
            cx.data_out().to_vec()
        };
        if blocks == 0 {
            return Ok(Reply::good());
        }
        let _g = self.io.read();
        // UNMAP=1 on a thin LU deallocates whatever the data (SBC-3 5.42 as
        // LIO and libiscsi read it); deallocated blocks read back as zeros
        // (LBPRZ).
        if unmap && self.dev().thin() {
            self.dev().unmap(lba, blocks).map_err(dev_sense)?;
            return Ok(Reply::good());
        }
        self.fill(lba, blocks, &pattern)?;
        Ok(Reply::good())
    }

    /// Write `pattern` (one block, or a divisor of it repeated) to a range.
    fn fill(&self, lba: u64, blocks: u64, pattern: &[u8]) -> Result<(), Sense> {
        self.fill_paced(lba, blocks, pattern, None)
    }

    /// [`Self::fill`], at most `rate` bytes per second when given.
    fn fill_paced(
        &self,
        lba: u64,
        blocks: u64,
        pattern: &[u8],
        rate: Option<u64>,
    ) -> Result<(), Sense> {
        let start = std::time::Instant::now();
        let bs = self.block_size() as usize;
        let per_chunk = (CHUNK_BYTES / bs).max(1) as u64;
        let one: Vec<u8> = pattern.iter().copied().cycle().take(bs).collect();
        let buf = one.repeat(per_chunk.min(blocks) as usize);
        let mut done = 0;
        while done < blocks {
            let n = per_chunk.min(blocks - done);
            self.dev()
                .write(lba + done, &buf[..n as usize * bs], false)
                .map_err(dev_sense)?;
            done += n;
            if self.sanitizing.load(Ordering::Relaxed) {
                self.set_progress(done, blocks);
            }
            if let Some(rate) = rate {
                let due =
                    std::time::Duration::from_secs_f64((done * bs as u64) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn unmap(&self, cx: &Cx<'_>) -> CmdResult {
        if !self.dev().thin() {
            return Err(Sense::invalid_opcode().into());
        }
        if cx.cdb.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1).into()); // ANCHOR
        }
        self.check_writable()?;
        let plen = (cx.cdb.be16(7) as usize).min(cx.data_out().len());
        if plen == 0 {
            return Ok(Reply::good());
        }
        let p = &cx.data_out()[..plen];
        if plen < 8 {
            return Err(Sense::param_list_length().into());
        }
        let bd_len = be_at(p, 2, 2).unwrap_or(0) as usize;
        let n = bd_len / 16;
        if n as u32 > limits::MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::invalid_param(2).into());
        }
        if 8 + n * 16 > plen {
            return Err(Sense::param_list_length().into());
        }
        let mut ranges = Vec::with_capacity(n);
        for i in 0..n {
            let off = 8 + i * 16;
            let lba = be_at(p, off, 8).unwrap_or(0);
            let count = be_at(p, off + 8, 4).unwrap_or(0);
            if count > u64::from(limits::MAX_UNMAP_LBA_COUNT) {
                return Err(Sense::invalid_param((off + 8) as u16).into());
            }
            self.check_range(lba, count)?;
            ranges.push((lba, count));
        }
        let _g = self.io.read();
        for (lba, count) in ranges {
            if count > 0 {
                self.dev().unmap(lba, count).map_err(dev_sense)?;
            }
        }
        Ok(Reply::good())
    }

    pub(crate) fn compare_and_write(&self, cx: &Cx<'_>) -> CmdResult {
        let lba = cx.cdb.be64(2);
        let blocks = u64::from(cx.cdb.u8(13));
        self.check_writable()?;
        if blocks > u64::from(limits::MAX_COMPARE_AND_WRITE) {
            return Err(Sense::invalid_cdb(13).into());
        }
        self.check_range(lba, blocks)?;
        let bytes = (blocks * self.block_size()) as usize;
        // The Data-Out must be exactly verify + write data; this also
        // catches a NUMBER OF LOGICAL BLOCKS that wrapped to 0.
        if cx.data_out().len() != 2 * bytes {
            return Err(Sense::invalid_cdb(13).into());
        }
        if blocks == 0 {
            return Ok(Reply::good());
        }
        let (verify, write) = cx.data_out().split_at(bytes);
        let fua = cx.cdb.u8(1) & 0x08 != 0;
        // Exclusive: no other write may land between compare and write.
        let _g = self.io.write();
        let current = self.read_blocks(lba, blocks)?;
        if let Some(off) = current.iter().zip(verify).position(|(a, b)| a != b) {
            return Err(Sense::miscompare(off as u64).into());
        }
        self.dev().write(lba, write, fua).map_err(dev_sense)?;
        Ok(Reply::good())
    }

    pub(crate) fn orwrite(&self, cx: &Cx<'_>) -> CmdResult {
        let rw = RwCdb::parse(&cx.cdb);
        let blocks = u64::from(rw.blocks);
        self.check_writable()?;
        self.check_range(rw.lba, blocks)?;
        self.check_transfer(cx.cdb.len(), blocks)?;
        if blocks == 0 {
            return Ok(Reply::good());
        }
        let bytes = (blocks * self.block_size()) as usize;
        let Some(data) = cx.data_out().get(..bytes) else {
            return Err(Sense::invalid_cdb(10).into());
        };
        let _g = self.io.write();
        let mut cur = self.read_blocks(rw.lba, blocks)?;
        for (c, d) in cur.iter_mut().zip(data) {
            *c |= d;
        }
        self.dev()
            .write(rw.lba, &cur, rw.fua())
            .map_err(dev_sense)?;
        Ok(Reply::good())
    }

    pub(crate) fn get_lba_status(&self, cx: &Cx<'_>) -> CmdResult {
        let lba = cx.cdb.be64(2);
        let alloc = cx.cdb.be32(10) as usize;
        let cap = self.dev().num_blocks();
        if lba >= cap {
            return Err(Sense::lba_out_of_range().with_info(lba).into());
        }
        // As many descriptors as fit, capped so a huge allocation length
        // cannot make us walk the whole device.
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        let mut d = vec![0u8; 8];
        let mut at = lba;
        for _ in 0..max_desc {
            if at >= cap {
                break;
            }
            let (kind, len) = self.dev().lba_status(at).map_err(dev_sense)?;
            let len = len.clamp(1, cap - at);
            let len32 = u32::try_from(len).unwrap_or(u32::MAX);
            d.extend_from_slice(&at.to_be_bytes());
            d.extend_from_slice(&len32.to_be_bytes());
            d.push(match kind {
                LbaStatus::Mapped => 0,
                LbaStatus::Deallocated => 1,
                LbaStatus::Anchored => 2,
            });
            d.extend_from_slice(&[0, 0, 0]);
            at += u64::from(len32);
        }
        let plen = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&plen.to_be_bytes());
        Ok(Reply::data(trunc(d, alloc)))
    }

    pub(crate) fn sanitize(self: &Arc<Self>, cx: &Cx<'_>) -> CmdResult {
        let sa = cx.cdb.service_action();
        let immed = cx.cdb.u8(1) & 0x80 != 0;
        let plen = cx.cdb.be16(7) as usize;
        let bs = self.block_size() as usize;
        let job = match sa {
            0x01 => {
                // Parameter list: flags, reserved, pattern length, pattern.
                if plen < 5 || plen > bs + 4 || cx.data_out().len() < plen {
                    return Err(Sense::invalid_cdb(7).into());
                }
                let p = &cx.data_out()[..plen];
                let owcount = p[0] & 0x1f;
                let invert = p[0] & 0x80 != 0;
                let ip_len = be_at(p, 2, 2).unwrap_or(0) as usize;
                if owcount == 0 {
                    return Err(Sense::invalid_param(0).into());
                }
                if ip_len == 0 || ip_len > bs || ip_len != plen - 4 {
                    return Err(Sense::invalid_param(2).into());
                }
                let mut pattern = p[4..].to_vec();
                // With INVERT, passes alternate; the last pass is inverted
                // when the pass count is even.
                if invert && owcount.is_multiple_of(2) {
                    pattern.iter_mut().for_each(|b| *b = !*b);
                }
                SanitizeJob::Overwrite(pattern)
            }
            0x02 | 0x03 => {
                if plen != 0 {
                    return Err(Sense::invalid_cdb(7).into());
                }
                if sa == 0x02 && !self.dev().thin() {
                    return Err(Sense::invalid_cdb(1).into());
                }
                SanitizeJob::Erase
            }
            _ => {
                // EXIT FAILURE MODE.
                if plen != 0 {
                    return Err(Sense::invalid_cdb(7).into());
                }
                self.state.write().sanitize_failed = false;
                return Ok(Reply::good());
            }
        };
        self.check_writable()?;
        if self.sanitizing.swap(true, Ordering::AcqRel) {
            return Err(self.sanitize_sense().into());
        }
        self.sanitize_progress.store(0, Ordering::Relaxed);
        if immed {
            let lu = Arc::clone(self);
            std::thread::spawn(move || lu.run_sanitize(job));
            return Ok(Reply::good());
        }
        self.run_sanitize(job).map_err(Failure::Check)?;
        Ok(Reply::good())
    }

    fn run_sanitize(&self, job: SanitizeJob) -> Result<(), Sense> {
        let cap = self.dev().num_blocks();
        let res = {
            let _g = self.io.write();
            match job {
                SanitizeJob::Overwrite(p) => {
                    self.fill_paced(0, cap, &p, Some(limits::SANITIZE_OVERWRITE_RATE))
                }
                SanitizeJob::Erase if self.dev().thin() => {
                    let step = 1u64 << 20;
                    let mut at = 0;
                    let mut r = Ok(());
                    while at < cap && r.is_ok() {
                        let n = step.min(cap - at);
                        r = self.dev().unmap(at, n).map_err(dev_sense);
                        at += n;
                        self.set_progress(at, cap);
                    }
                    r
                }
                SanitizeJob::Erase => self.fill(0, cap, &[0]),
            }
        };
        self.state.write().sanitize_failed = res.is_err();
        self.sanitizing.store(false, Ordering::Release);
        res
    }
}

impl LogicalUnit {
    fn set_progress(&self, done: u64, total: u64) {
        let p = (done.min(total).saturating_mul(0xffff))
            .checked_div(total)
            .unwrap_or(0xffff) as u32;
        self.sanitize_progress.store(p, Ordering::Relaxed);
    }
}

enum SanitizeJob {
    Overwrite(Vec<u8>),
    Erase,
}
