//! The region file mapped into memory: the `process` durability mode.
//!
//! This is the crate's only `unsafe` code. Writes are plain stores into a
//! `MAP_SHARED` mapping, i.e. into the kernel's page cache for the file: they
//! survive the process being killed (the kernel still owns the pages and
//! writes them back) but not a kernel crash or power loss unless `sync`
//! (msync) ran after them.
//!
//! The mapping is accessed only through `&[AtomicU8]` with relaxed ordering,
//! never through `&[u8]`/`&mut [u8]`: the log's appenders write disjoint
//! ranges concurrently through `&self`, and the file itself is shared memory
//! that Rust's aliasing rules cannot describe. Byte atomics make every access
//! well-defined whatever the callers do (overlapping misuse would give torn
//! bytes, not undefined behaviour); relaxed byte stores compile to plain
//! stores. Ordering between appenders is established by the log's mutex.
#![allow(unsafe_code)]

use crate::medium::LogMedium;
use memmap2::MmapMut;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

/// A file mapped read-write and shared.
pub struct MmapMedium {
    /// Keeps the mapping alive; never dereferenced as a slice (see module doc).
    map: MmapMut,
    /// Start of the mapping, taken once from `map.as_mut_ptr()` so it carries
    /// write permission.
    ptr: *mut u8,
    len: usize,
    _file: File,
}

// SAFETY: the raw pointer is only used to build `&[AtomicU8]` views of the
// mapping, which are `Sync`; the mapping lives as long as `self` and does not
// move when `self` moves. Sharing it between threads is therefore no
// different from sharing a `&[AtomicU8]`.
unsafe impl Send for MmapMedium {}
// SAFETY: as above: every access through `&self` is an atomic byte access.
unsafe impl Sync for MmapMedium {}

impl MmapMedium {
    /// Maps all of `file` (which must already have its final length).
    pub fn new(file: File) -> io::Result<MmapMedium> {
        // SAFETY: `map_mut` is unsafe because another process (or this one,
        // through another handle) could truncate the file, turning accesses
        // into SIGBUS, or modify it concurrently. The region file belongs to
        // this node (the binary locks the data directory), it is never
        // truncated while open, and concurrent modification is harmless to
        // soundness because we only use atomic accesses (module doc).
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let len = map.len();
        let ptr = map.as_mut_ptr();
        Ok(MmapMedium {
            map,
            ptr,
            len,
            _file: file,
        })
    }

    fn cells(&self, offset: u64, len: usize) -> io::Result<&[AtomicU8]> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("access {offset}+{len} beyond mapping of {} bytes", self.len),
                ))
            }
        }
        // SAFETY: `start + len <= self.len`, so the range lies inside the live
        // mapping, which outlives the returned borrow of `self`. `AtomicU8`
        // has the size and alignment of `u8`, and all other access to these
        // bytes (from this process) is also through `AtomicU8`, so creating a
        // shared slice of atomics over them is sound.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(start).cast::<AtomicU8>(), len) })
    }
}

impl LogMedium for MmapMedium {
    fn len(&self) -> u64 {
        self.len as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let cells = self.cells(offset, buf.len())?;
        for (d, s) in buf.iter_mut().zip(cells) {
            *d = s.load(Ordering::Relaxed);
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        for (d, s) in self.cells(offset, buf.len())?.iter().zip(buf) {
            d.store(*s, Ordering::Relaxed);
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        // Not needed for the `process` promise; used at format and by
        // callers who want the mapping on disk (e.g. before a planned halt).
        self.map.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds() {
        let path = std::env::temp_dir().join(format!("nvram-mmap-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(8192).unwrap();
        let m = MmapMedium::new(f).unwrap();
        m.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        m.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(m.write_at(8190, b"abc").is_err());
        assert!(m.read_at(u64::MAX, &mut b).is_err());
        m.sync().unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[100..105], b"hello");
        std::fs::remove_file(&path).unwrap();
    }
}
