//! Storage backends: where the aggregate's bytes live.
//!
//! The block store only needs positional reads and writes, a durability barrier
//! (`sync`) and a length. `FileStorage` is a file or block device (pread/pwrite,
//! fdatasync, optionally O_DIRECT); `FaultStorage` is an in-memory disk for tests
//! that keeps a *live* image (what reads see) and a *durable* image (what survives
//! power loss) and can "lose power" at the N-th write or sync, optionally tearing
//! the last unsynced write.
//!
//! Invariant the store relies on: after `sync` returns Ok, every earlier
//! `write_at` survives power loss. Nothing is promised about unsynced writes: any
//! subset of them, including a torn prefix, may survive.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// A byte-addressed device. Offsets and lengths used by the store are multiples
/// of 4096.
#[allow(clippy::len_without_is_empty)] // a device, never "empty"
pub trait Storage: Send + Sync + 'static {
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Durability barrier: all previous writes are on stable storage when it returns.
    fn sync(&self) -> io::Result<()>;
    /// How many reads or writes the store may have in flight at once (a CP's
    /// writes between two syncs may go in any order; a fragmented read's
    /// clusters too). 1 keeps the order of writes deterministic, which
    /// fault-injection tests rely on.
    fn io_parallelism(&self) -> usize {
        1
    }
    /// Whether `write_parts_at` writes straight from the caller's buffers
    /// (pwritev). Then a CP writes its runs that way, on one thread: buffered
    /// writes to one file serialize in the kernel anyway, and gathering them
    /// first is a copy of every block.
    fn writes_vectored(&self) -> bool {
        false
    }
    /// Writes `parts` back to back from `offset`. The default gathers them
    /// into one buffer for `write_at`.
    fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&parts.concat(), offset)
    }
}

/// A zeroed buffer of `len` bytes whose start is 4096-aligned (as O_DIRECT
/// needs), found inside an over-allocated Vec: (vec, offset of the aligned start).
pub fn aligned_buf(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let off = v.as_ptr().align_offset(DIRECT_ALIGN);
    (v, off)
}

/// A file (sparse file on a filesystem, or a block device).
pub struct FileStorage {
    file: File,
    direct: bool,
}

const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    /// Opens (creating if missing) `path`: a regular file (created sparse by
    /// `Aggregate::create`) or a block device. With `direct`, I/O bypasses the
    /// page cache (O_DIRECT); unaligned buffers are bounced through aligned memory.
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        Ok(Self { file, direct })
    }
}

impl FileStorage {
    fn is_block_device(&self) -> io::Result<bool> {
        use std::os::unix::fs::FileTypeExt;
        Ok(self.file.metadata()?.file_type().is_block_device())
    }
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        if self.is_block_device()? {
            // st_size is 0 for block devices; their end is their size.
            use std::io::Seek;
            return (&self.file).seek(io::SeekFrom::End(0));
        }
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.is_block_device()? {
            // A device cannot be resized: it just has to be large enough.
            if self.len()? < len {
                return Err(io::Error::other(format!(
                    "block device smaller than {len} bytes"
                )));
            }
            return Ok(());
        }
        self.file.set_len(len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct && buf.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
            let (mut v, off) = aligned_buf(buf.len());
            let tmp = &mut v[off..off + buf.len()];
            self.file.read_exact_at(tmp, offset)?;
            buf.copy_from_slice(tmp);
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && buf.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
            let (mut v, off) = aligned_buf(buf.len());
            let tmp = &mut v[off..off + buf.len()];
            tmp.copy_from_slice(buf);
            return self.file.write_all_at(tmp, offset);
        }
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn io_parallelism(&self) -> usize {
        // Enough queue depth for SSDs/virtio when free space is fragmented
        // and a CP is many small writes.
        16
    }
    fn writes_vectored(&self) -> bool {
        // O_DIRECT needs aligned buffers, which a gathered run is.
        !self.direct
    }
    fn write_parts_at(&self, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
        if self.direct {
            return self.write_at(&parts.concat(), offset);
        }
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            // IOV_MAX is 1024 on Linux.
            let n = rest.len().min(1024);
            let written = rustix::io::pwritev(&self.file, &rest[..n], offset)?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            offset += written as u64;
            io::IoSlice::advance_slices(&mut rest, written);
        }
        Ok(())
    }
}

/// What survives when `FaultStorage` loses power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Only synced writes survive.
    DropUnsynced,
    /// Synced writes plus every unsynced write except the last, which is torn:
    /// only its first half (rounded to 512 bytes, at least 512) reaches the disk.
    TearLast,
    /// Every write issued survives (the disk wrote everything but never
    /// acknowledged the flush).
    KeepUnsynced,
    /// Only the last unsynced write survives: the disk reordered writes.
    /// Catches a missing barrier between data and the superblock.
    KeepLastOnly,
    /// Each 512-byte sector of every unsynced write survives or not, chosen
    /// pseudo-randomly from the seed: arbitrary reordering and tearing.
    RandomSectors(u64),
}

#[derive(Default)]
struct FaultState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Unsynced writes in issue order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Number of write_at + sync calls so far (the fault-injection clock).
    ops: u64,
    power_cut_at: Option<u64>,
    powered_off: bool,
}

/// In-memory disk with power-loss injection. Clones share the same disk, so a
/// test can keep a handle while the aggregate owns another.
#[derive(Clone, Default)]
pub struct FaultStorage(Arc<Mutex<FaultState>>);

impl FaultStorage {
    /// A disk whose live and durable contents are `image`.
    pub fn new(image: Vec<u8>) -> Self {
        Self(Arc::new(Mutex::new(FaultState {
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

    /// Write and sync operations issued so far.
    pub fn ops(&self) -> u64 {
        self.0.lock().ops
    }

    pub fn powered_off(&self) -> bool {
        self.0.lock().powered_off
    }

    /// What a reboot would find on the disk now.
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = self.0.lock();
        let mut img = st.durable.clone();
        let n = st.pending.len();
        let apply = |img: &mut Vec<u8>, off: u64, data: &[u8]| {
            let off = off as usize;
            if img.len() < off + data.len() {
                img.resize(off + data.len(), 0);
            }
            img[off..off + data.len()].copy_from_slice(data);
        };
        match mode {
            CrashMode::DropUnsynced => {}
            CrashMode::KeepUnsynced => {
                for (off, data) in &st.pending {
                    apply(&mut img, *off, data);
                }
            }
            CrashMode::KeepLastOnly => {
                if let Some((off, data)) = st.pending.last() {
                    apply(&mut img, *off, data);
                }
            }
            CrashMode::RandomSectors(seed) => {
                for (i, (off, data)) in st.pending.iter().enumerate() {
                    for (k, sector) in data.chunks(512).enumerate() {
                        let mut h = seed
                            ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            ^ (k as u64) << 32;
                        h ^= h >> 31;
                        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
                        h ^= h >> 29;
                        if h & 1 == 1 {
                            apply(&mut img, off + k as u64 * 512, sector);
                        }
                    }
                }
            }
            CrashMode::TearLast => {
                for (i, (off, data)) in st.pending.iter().enumerate() {
                    if i + 1 == n {
                        let half = ((data.len() / 2) / 512 * 512).max(512).min(data.len());
                        apply(&mut img, *off, &data[..half]);
                    } else {
                        apply(&mut img, *off, data);
                    }
                }
            }
        }
        img
    }

    /// The contents reads currently see.
    pub fn live_image(&self) -> Vec<u8> {
        self.0.lock().live.clone()
    }

    /// Flips bits of one byte in both images (simulates media corruption).
    pub fn corrupt_byte(&self, offset: u64) {
        let mut st = self.0.lock();
        let o = offset as usize;
        if o < st.live.len() {
            st.live[o] ^= 0x5a;
        }
        if o < st.durable.len() {
            st.durable[o] ^= 0x5a;
        }
    }

    fn tick(st: &mut FaultState) -> io::Result<()> {
        if st.powered_off {
            return Err(io::Error::other("power lost"));
        }
        if st.power_cut_at == Some(st.ops) {
            st.powered_off = true;
            return Err(io::Error::other("power lost"));
        }
        st.ops += 1;
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().live.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.0.lock();
        let len = usize::try_from(len).map_err(io::Error::other)?;
        st.live.resize(len, 0);
        st.durable.resize(len, 0);
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.0.lock();
        if st.powered_off {
            return Err(io::Error::other("power lost"));
        }
        let o = offset as usize;
        let src = st
            .live
            .get(o..o + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.0.lock();
        Self::tick(&mut st)?;
        let o = offset as usize;
        if st.live.len() < o + buf.len() {
            return Err(io::Error::other("write beyond end of FaultStorage"));
        }
        st.live[o..o + buf.len()].copy_from_slice(buf);
        st.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.0.lock();
        Self::tick(&mut st)?;
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            let o = off as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}
