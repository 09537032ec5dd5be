//! Where the region's bytes live.
//!
//! The log needs positional reads and writes, a durability barrier and a
//! length. [`FileMedium`] is pread/pwrite/fdatasync on the region file (the
//! `power` mode); [`crate::MmapMedium`] is the file mapped into memory (the
//! `process` mode); [`FaultMedium`] is an in-memory device for tests that keeps
//! a *live* image (what reads see, what survives a killed process) and a
//! *durable* image (what survives power loss), and can lose power at the N-th
//! operation.
//!
//! Contract the log relies on: after `sync` returns Ok, every `write_at` that
//! returned before `sync` was called survives power loss. Nothing is promised
//! about unsynced writes: any subset of them, some torn, may survive.
//! The log never issues overlapping writes concurrently, and never reads a
//! range while writing it.

use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A byte-addressed, fixed-size medium.
#[allow(clippy::len_without_is_empty)] // a device, never "empty"
pub trait LogMedium: Send + Sync + 'static {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Writes the concatenation of `parts` at `offset`. One call per record,
    /// so a medium may issue it as one device write.
    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let mut off = offset;
        for p in parts {
            self.write_at(off, p)?;
            off += p.len() as u64;
        }
        Ok(())
    }
    /// Durability barrier (see the module doc).
    fn sync(&self) -> io::Result<()>;
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("access {offset}+{len} beyond medium of {size} bytes"),
        )),
    }
}

/// The region file through pread/pwrite and fdatasync.
pub struct FileMedium {
    file: File,
    len: u64,
}

impl FileMedium {
    /// `file` must already have its final length (the log never grows it).
    pub fn new(file: File) -> io::Result<FileMedium> {
        let len = file.metadata()?.len();
        Ok(FileMedium { file, len })
    }
}

impl LogMedium for FileMedium {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.file.write_all_at(buf, offset)
    }
    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        // One pwrite per record: half the syscalls, and the page cache sees
        // one contiguous dirty range.
        let v: Vec<u8> = parts.concat();
        self.write_at(offset, &v)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// What survives when a [`FaultMedium`] loses power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Only synced writes survive.
    DropUnsynced,
    /// Synced writes plus every unsynced write, except that the last one is
    /// torn (a random prefix of it, rounded to 512 bytes, survives).
    TearLast,
    /// Synced writes plus a random subset of the unsynced ones, each either
    /// whole or torn at a random 512-byte boundary (the device reordered and
    /// tore writes). Seeded, so failures reproduce.
    RandomSubset(u64),
}

#[derive(Default)]
struct FaultState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Unsynced writes in issue order.
    pending: Vec<(u64, Vec<u8>)>,
    /// write_at + sync calls so far (the fault-injection clock).
    ops: u64,
    syncs: u64,
    power_cut_at: Option<u64>,
    powered_off: bool,
}

/// In-memory medium with power-loss injection. Clones share the same device,
/// so a test keeps a handle while the log owns another.
#[derive(Clone, Default)]
pub struct FaultMedium(Arc<Mutex<FaultState>>);

impl FaultMedium {
    /// A zeroed device of `len` bytes.
    pub fn new(len: u64) -> FaultMedium {
        Self::from_image(vec![0; len as usize])
    }

    /// A device whose live and durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> FaultMedium {
        FaultMedium(Arc::new(Mutex::new(FaultState {
            durable: image.clone(),
            live: image,
            ..Default::default()
        })))
    }

    /// Power is lost when operation number `op` (0-based count of write_at and
    /// sync calls) is attempted: it and everything after fail.
    pub fn cut_power_at(&self, op: u64) {
        self.0.lock().power_cut_at = Some(op);
    }

    /// Loses power now.
    pub fn cut_power(&self) {
        self.0.lock().powered_off = true;
    }

    /// Write and sync operations issued so far.
    pub fn ops(&self) -> u64 {
        self.0.lock().ops
    }

    /// Syncs issued so far (group-commit effectiveness in tests).
    pub fn syncs(&self) -> u64 {
        self.0.lock().syncs
    }

    pub fn powered_off(&self) -> bool {
        self.0.lock().powered_off
    }

    /// What a reboot after power loss would find on the device now.
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = self.0.lock();
        let mut img = st.durable.clone();
        let apply = |img: &mut Vec<u8>, off: u64, data: &[u8]| {
            let off = off as usize;
            img[off..off + data.len()].copy_from_slice(data);
        };
        let n = st.pending.len();
        match mode {
            CrashMode::DropUnsynced => {}
            CrashMode::TearLast => {
                let mut rng = SplitMix(n as u64);
                for (i, (off, data)) in st.pending.iter().enumerate() {
                    if i + 1 == n {
                        let keep = torn_len(&mut rng, data.len());
                        apply(&mut img, *off, &data[..keep]);
                    } else {
                        apply(&mut img, *off, data);
                    }
                }
            }
            CrashMode::RandomSubset(seed) => {
                let mut rng = SplitMix(seed);
                for (off, data) in &st.pending {
                    match rng.below(3) {
                        0 => {}
                        1 => apply(&mut img, *off, data),
                        _ => {
                            let keep = torn_len(&mut rng, data.len());
                            apply(&mut img, *off, &data[..keep]);
                        }
                    }
                }
            }
        }
        img
    }

    /// What survives a killed process: everything written.
    pub fn live_image(&self) -> Vec<u8> {
        self.0.lock().live.clone()
    }

    /// Flips bits of one byte in both images (media corruption).
    pub fn corrupt_byte(&self, offset: u64) {
        let mut st = self.0.lock();
        let o = offset as usize;
        if let Some(b) = st.live.get_mut(o) {
            *b ^= 0x5a;
        }
        if let Some(b) = st.durable.get_mut(o) {
            *b ^= 0x5a;
        }
    }

    fn tick(st: &mut FaultState) -> io::Result<()> {
        if st.powered_off || st.power_cut_at == Some(st.ops) {
            st.powered_off = true;
            return Err(io::Error::other("power lost"));
        }
        st.ops += 1;
        Ok(())
    }
}

/// A torn prefix: 0..len bytes, in 512-byte steps (sectors are atomic).
fn torn_len(rng: &mut SplitMix, len: usize) -> usize {
    let sectors = len.div_ceil(512).max(1) as u64;
    (rng.below(sectors) as usize * 512).min(len)
}

/// A tiny seeded PRNG (splitmix64): crash images must be reproducible and the
/// crate should not depend on `rand` outside tests.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl LogMedium for FaultMedium {
    fn len(&self) -> u64 {
        self.0.lock().live.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.0.lock();
        if st.powered_off {
            return Err(io::Error::other("power lost"));
        }
        check_range(offset, buf.len(), st.live.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&st.live[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut st = self.0.lock();
        check_range(offset, buf.len(), st.live.len() as u64)?;
        Self::tick(&mut st)?;
        let o = offset as usize;
        st.live[o..o + buf.len()].copy_from_slice(buf);
        st.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        // One device write per record, like FileMedium, so "tear the last
        // write" tears a record.
        self.write_at(offset, &parts.concat())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.0.lock();
        Self::tick(&mut st)?;
        st.syncs += 1;
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            let o = off as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

impl<M: LogMedium + ?Sized> LogMedium for Arc<M> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, buf)
    }
    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        (**self).write_parts_at(offset, parts)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
}
