//! The pair's mailbox: a small region on shared storage through which the two
//! nodes decide takeover when the interconnect is gone, without split brain.
//!
//! Each node owns `DATA_DIR/mailbox`. The owner writes its heartbeat and
//! state there; the partner reads it, and once the heartbeat has stopped
//! moving ([`HeartbeatWatch`]) claims the takeover by bumping `epoch` and
//! writing its name into `taken_over_by`. The epoch is the fence: the owner's
//! aggregate writes carry it and are refused once it is stale, so a claimed
//! takeover also stops a node that was only slow. An owner that loses the
//! interconnect records `unmirrored` before it answers writes alone, and a
//! partner must never take over automatically while that is set.
//!
//! Invariants:
//! - every change is a read-modify-write under an exclusive `flock` on the
//!   file (plus a mutex for handles shared between threads, since a `flock`
//!   belongs to the open file and does not exclude its own holder), made
//!   durable with `fdatasync` before the lock is released;
//! - an update writes the slot that does NOT hold the newest copy, so a torn
//!   write (power loss, a node killed mid-write) leaves the previous state
//!   readable;
//! - the epoch never decreases;
//! - a file with no valid slot is an error, never reinitialised: that would
//!   reset the epoch and unfence a node that was fenced.
//!
//! On-disk layout: a 4096-byte file; bytes [`SLOT_SIZE`]`*2..4096` are
//! reserved (zero). Two slots of 512 bytes at offsets 0 and 512, each
//! (little-endian, offsets within the slot):
//!
//! ```text
//!   0  magic               "NVMB"
//!   4  version             u32 = 1
//!   8  sequence            u64, +1 per update; the valid slot with the higher one wins
//!  16  epoch               u64, starts at 1
//!  24  heartbeat           u64
//!  32  heartbeat_unix_ms   u64
//!  40  owner_instance      u64
//!  48  takeover_unix_ms    u64
//!  56  owner_state         u8 (see OwnerState::code)
//!  57  flags               u8: bit 0 unmirrored, bit 1 giveback_requested,
//!                              bit 2 taken_over_by present; other bits zero
//!  58  taken_over_by len   u8, 0..=32
//!  59  taken_over_by       32 bytes of UTF-8, zero padded
//!  91  reserved            zero
//! 508  crc32c              u32 over bytes 0..508
//! ```
//!
//! A slot whose magic or checksum is wrong is torn or never written and is
//! skipped. A slot with a good checksum but a version or contents this build
//! does not understand is an error: falling back to the older slot could roll
//! the epoch back.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::fs::{flock, FlockOperation};

pub const MAILBOX_FILE: &str = "mailbox";

/// Longest node name `taken_over_by` can hold, in bytes.
pub const NODE_NAME_MAX: usize = 32;

const FILE_SIZE: usize = 4096;
const SLOT_SIZE: usize = 512;
const SLOT_COUNT: usize = 2;
const SLOTS_LEN: usize = SLOT_SIZE * SLOT_COUNT;
const MAGIC: [u8; 4] = *b"NVMB";
const VERSION: u32 = 1;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = OFF_MAGIC + MAGIC.len();
const OFF_SEQUENCE: usize = OFF_VERSION + 4;
const OFF_EPOCH: usize = OFF_SEQUENCE + 8;
const OFF_HEARTBEAT: usize = OFF_EPOCH + 8;
const OFF_HEARTBEAT_MS: usize = OFF_HEARTBEAT + 8;
const OFF_INSTANCE: usize = OFF_HEARTBEAT_MS + 8;
const OFF_TAKEOVER_MS: usize = OFF_INSTANCE + 8;
const OFF_OWNER_STATE: usize = OFF_TAKEOVER_MS + 8;
const OFF_FLAGS: usize = OFF_OWNER_STATE + 1;
const OFF_NAME_LEN: usize = OFF_FLAGS + 1;
const OFF_NAME: usize = OFF_NAME_LEN + 1;
const FIELDS_END: usize = OFF_NAME + NODE_NAME_MAX;
const OFF_CRC: usize = SLOT_SIZE - 4;

const FLAG_UNMIRRORED: u8 = 1 << 0;
const FLAG_GIVEBACK: u8 = 1 << 1;
const FLAG_TAKEN_OVER: u8 = 1 << 2;
const FLAGS_KNOWN: u8 = FLAG_UNMIRRORED | FLAG_GIVEBACK | FLAG_TAKEN_OVER;

const _: () = assert!(FIELDS_END <= OFF_CRC);
const _: () = assert!(SLOTS_LEN <= FILE_SIZE);
const _: () = assert!(NODE_NAME_MAX <= u8::MAX as usize);

/// A lock-free read may overlap an update; only one slot changes per update,
/// so a read that finds neither slot valid is retried before it is believed.
const READ_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("mailbox {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "mailbox {}: no valid slot (both torn or corrupt); not reinitialising it, \
         as that would reset the takeover epoch",
        path.display()
    )]
    NoValidSlot { path: PathBuf },
    #[error(
        "mailbox {}: slot {slot} has version {version}; this build understands {VERSION}",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        slot: usize,
        version: u32,
    },
    #[error("mailbox {}: slot {slot} has a valid checksum but {what}", path.display())]
    BadSlot {
        path: PathBuf,
        slot: usize,
        what: String,
    },
    #[error(
        "mailbox {}: node name {name:?} is {} bytes; at most {NODE_NAME_MAX} fit",
        path.display(),
        name.len()
    )]
    NodeNameTooLong { path: PathBuf, name: String },
    #[error("mailbox {}: update would move the epoch back from {from} to {to}", path.display())]
    EpochRegression { path: PathBuf, from: u64, to: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum OwnerState {
    Down,
    Booting,
    Serving,
    ServingUnmirrored,
    WaitingGiveback,
    ShuttingDown,
}

impl OwnerState {
    fn code(&self) -> u8 {
        match self {
            OwnerState::Down => 0,
            OwnerState::Booting => 1,
            OwnerState::Serving => 2,
            OwnerState::ServingUnmirrored => 3,
            OwnerState::WaitingGiveback => 4,
            OwnerState::ShuttingDown => 5,
        }
    }

    fn from_code(code: u8) -> Option<OwnerState> {
        Some(match code {
            0 => OwnerState::Down,
            1 => OwnerState::Booting,
            2 => OwnerState::Serving,
            3 => OwnerState::ServingUnmirrored,
            4 => OwnerState::WaitingGiveback,
            5 => OwnerState::ShuttingDown,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MailboxState {
    /// The fence: bumped by a takeover; writes carrying an older one are refused.
    pub epoch: u64,
    /// The owner's counter, +1 per beat.
    pub heartbeat: u64,
    pub heartbeat_unix_ms: u64,
    /// Random per owner process start, so a restarted owner is told apart.
    pub owner_instance: u64,
    pub owner_state: OwnerState,
    /// The owner answers writes without the partner's mirror: the partner's
    /// copy of the log is incomplete and it must not take over automatically.
    pub unmirrored: bool,
    /// Name of the node that claimed the takeover, at most [`NODE_NAME_MAX`] bytes.
    pub taken_over_by: Option<String>,
    pub takeover_unix_ms: u64,
    /// Set by the operator; read by the node that took over.
    pub giveback_requested: bool,
}

impl MailboxState {
    fn initial() -> MailboxState {
        MailboxState {
            epoch: 1,
            heartbeat: 0,
            heartbeat_unix_ms: 0,
            owner_instance: 0,
            owner_state: OwnerState::Down,
            unmirrored: false,
            taken_over_by: None,
            takeover_unix_ms: 0,
            giveback_requested: false,
        }
    }
}

/// Why a slot was not used: skipped quietly when torn, an error otherwise.
enum SlotProblem {
    Torn,
    Version(u32),
    Bad(String),
}

fn get_u64(slot: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&slot[off..off + 8]);
    u64::from_le_bytes(b)
}

fn get_u32(slot: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&slot[off..off + 4]);
    u32::from_le_bytes(b)
}

fn put_u64(slot: &mut [u8], off: usize, v: u64) {
    slot[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The caller has checked the name length.
fn encode_slot(sequence: u64, s: &MailboxState) -> [u8; SLOT_SIZE] {
    let mut slot = [0u8; SLOT_SIZE];
    slot[OFF_MAGIC..OFF_MAGIC + MAGIC.len()].copy_from_slice(&MAGIC);
    slot[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    put_u64(&mut slot, OFF_SEQUENCE, sequence);
    put_u64(&mut slot, OFF_EPOCH, s.epoch);
    put_u64(&mut slot, OFF_HEARTBEAT, s.heartbeat);
    put_u64(&mut slot, OFF_HEARTBEAT_MS, s.heartbeat_unix_ms);
    put_u64(&mut slot, OFF_INSTANCE, s.owner_instance);
    put_u64(&mut slot, OFF_TAKEOVER_MS, s.takeover_unix_ms);
    slot[OFF_OWNER_STATE] = s.owner_state.code();
    let mut flags = 0;
    if s.unmirrored {
        flags |= FLAG_UNMIRRORED;
    }
    if s.giveback_requested {
        flags |= FLAG_GIVEBACK;
    }
    if let Some(name) = &s.taken_over_by {
        flags |= FLAG_TAKEN_OVER;
        let n = name.len().min(NODE_NAME_MAX);
        slot[OFF_NAME_LEN] = n as u8;
        slot[OFF_NAME..OFF_NAME + n].copy_from_slice(&name.as_bytes()[..n]);
    }
    slot[OFF_FLAGS] = flags;
    let crc = crc32c::crc32c(&slot[..OFF_CRC]);
    slot[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Result<(u64, MailboxState), SlotProblem> {
    if slot[OFF_MAGIC..OFF_MAGIC + MAGIC.len()] != MAGIC
        || get_u32(slot, OFF_CRC) != crc32c::crc32c(&slot[..OFF_CRC])
    {
        return Err(SlotProblem::Torn);
    }
    let version = get_u32(slot, OFF_VERSION);
    if version != VERSION {
        return Err(SlotProblem::Version(version));
    }
    let state_code = slot[OFF_OWNER_STATE];
    let owner_state = OwnerState::from_code(state_code)
        .ok_or_else(|| SlotProblem::Bad(format!("unknown owner state {state_code:#04x}")))?;
    let flags = slot[OFF_FLAGS];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(SlotProblem::Bad(format!("unknown flags {flags:#04x}")));
    }
    let name_len = usize::from(slot[OFF_NAME_LEN]);
    let taken_over_by = if flags & FLAG_TAKEN_OVER != 0 {
        if name_len > NODE_NAME_MAX {
            return Err(SlotProblem::Bad(format!("node name length {name_len}")));
        }
        let name = std::str::from_utf8(&slot[OFF_NAME..OFF_NAME + name_len])
            .map_err(|_| SlotProblem::Bad("a node name that is not UTF-8".into()))?;
        Some(name.to_owned())
    } else {
        None
    };
    let state = MailboxState {
        epoch: get_u64(slot, OFF_EPOCH),
        heartbeat: get_u64(slot, OFF_HEARTBEAT),
        heartbeat_unix_ms: get_u64(slot, OFF_HEARTBEAT_MS),
        owner_instance: get_u64(slot, OFF_INSTANCE),
        owner_state,
        unmirrored: flags & FLAG_UNMIRRORED != 0,
        taken_over_by,
        takeover_unix_ms: get_u64(slot, OFF_TAKEOVER_MS),
        giveback_requested: flags & FLAG_GIVEBACK != 0,
    };
    Ok((get_u64(slot, OFF_SEQUENCE), state))
}

/// The newest copy found in the two slots.
struct Newest {
    slot: usize,
    sequence: u64,
    state: MailboxState,
}

/// Makes up for a temporary file name no other opener in this process uses.
static CREATE_COUNTER: AtomicU64 = AtomicU64::new(0);

pub struct Mailbox {
    path: PathBuf,
    file: File,
    /// Serialises updates through this handle: the `flock` would not.
    update_lock: Mutex<()>,
}

impl Mailbox {
    /// Opens `data_dir/mailbox`, creating it (epoch 1, `Down`) if missing.
    /// An existing file is never truncated, and one with no valid slot is an
    /// error.
    pub fn open(data_dir: &Path) -> Result<Mailbox, MailboxError> {
        let path = data_dir.join(MAILBOX_FILE);
        let file = match open_rw(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                create(data_dir, &path)?;
                open_rw(&path).map_err(io_err(&path, "opening"))?
            }
            Err(e) => return Err(io_err(&path, "opening")(e)),
        };
        let mailbox = Mailbox {
            path,
            file,
            update_lock: Mutex::new(()),
        };
        mailbox.read()?;
        Ok(mailbox)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest valid slot. Takes no lock: an update only ever writes the
    /// other slot.
    pub fn read(&self) -> Result<MailboxState, MailboxError> {
        Ok(self.read_newest()?.state)
    }

    /// Read-modify-write under an exclusive flock on the file (so the two
    /// nodes' updates never interleave), written durably (fdatasync) before
    /// returning.
    pub fn update<R>(
        &self,
        f: impl FnOnce(&mut MailboxState) -> R,
    ) -> Result<(R, MailboxState), MailboxError> {
        let _local = self.update_lock.lock();
        let _flock = FileLock::exclusive(&self.file, &self.path)?;
        let newest = self.read_newest()?;
        let mut state = newest.state.clone();
        let result = f(&mut state);
        if state.epoch < newest.state.epoch {
            return Err(MailboxError::EpochRegression {
                path: self.path.clone(),
                from: newest.state.epoch,
                to: state.epoch,
            });
        }
        if let Some(name) = &state.taken_over_by {
            if name.len() > NODE_NAME_MAX {
                return Err(MailboxError::NodeNameTooLong {
                    path: self.path.clone(),
                    name: name.clone(),
                });
            }
        }
        let target = 1 - newest.slot;
        let slot = encode_slot(newest.sequence.wrapping_add(1), &state);
        self.file
            .write_all_at(&slot, (target * SLOT_SIZE) as u64)
            .map_err(io_err(&self.path, "writing a slot"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "syncing"))?;
        Ok((result, state))
    }

    /// Cheap check for the write path (one pread, no lock): the current epoch.
    pub fn epoch(&self) -> Result<u64, MailboxError> {
        Ok(self.read_newest()?.state.epoch)
    }

    fn read_newest(&self) -> Result<Newest, MailboxError> {
        let mut buf = [0u8; SLOTS_LEN];
        for _ in 0..READ_ATTEMPTS {
            read_up_to(&self.file, &mut buf).map_err(io_err(&self.path, "reading"))?;
            if let Some(newest) = self.newest_in(&buf)? {
                return Ok(newest);
            }
        }
        Err(MailboxError::NoValidSlot {
            path: self.path.clone(),
        })
    }

    fn newest_in(&self, buf: &[u8; SLOTS_LEN]) -> Result<Option<Newest>, MailboxError> {
        let mut newest: Option<Newest> = None;
        for (slot, bytes) in buf.chunks_exact(SLOT_SIZE).enumerate() {
            let (sequence, state) = match decode_slot(bytes) {
                Ok(v) => v,
                Err(SlotProblem::Torn) => continue,
                Err(SlotProblem::Version(version)) => {
                    return Err(MailboxError::UnsupportedVersion {
                        path: self.path.clone(),
                        slot,
                        version,
                    })
                }
                Err(SlotProblem::Bad(what)) => {
                    return Err(MailboxError::BadSlot {
                        path: self.path.clone(),
                        slot,
                        what,
                    })
                }
            };
            if newest.as_ref().is_none_or(|n| sequence > n.sequence) {
                newest = Some(Newest {
                    slot,
                    sequence,
                    state,
                });
            }
        }
        Ok(newest)
    }
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> MailboxError + 'a {
    move |source| MailboxError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Writes a complete new mailbox under a temporary name and links it into
/// place, so the mailbox either does not exist or is whole; if another opener
/// got there first, theirs is kept.
fn create(data_dir: &Path, path: &Path) -> Result<(), MailboxError> {
    let tmp = data_dir.join(format!(
        ".{MAILBOX_FILE}.{}.{}.new",
        std::process::id(),
        CREATE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut image = vec![0u8; FILE_SIZE];
    image[..SLOT_SIZE].copy_from_slice(&encode_slot(1, &MailboxState::initial()));
    let written = (|| {
        let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all_at(&image, 0)?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        File::open(data_dir)?.sync_all()
    })();
    // A leftover temporary file would be clutter, not a correctness problem.
    let _ = std::fs::remove_file(&tmp);
    written.map_err(io_err(path, "creating"))
}

/// Fills `buf` from offset 0; bytes past the end of a short file read as zero
/// (and so as torn slots).
fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// An exclusive `flock`, released on drop (and by the kernel if the process dies).
struct FileLock<'a> {
    file: &'a File,
}

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a File, path: &Path) -> Result<FileLock<'a>, MailboxError> {
        loop {
            match flock(file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(FileLock { file }),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io_err(path, "locking")(e.into())),
            }
        }
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // Unlock cannot fail on a valid descriptor; closing would release it anyway.
        let _ = flock(self.file, FlockOperation::Unlock);
    }
}

/// Partner side: watches the owner's heartbeat. The owner counts as alive
/// while `(owner_instance, heartbeat)` keeps changing; the clock is the
/// caller's, so this is testable without sleeping. Until the first change is
/// seen, the window runs from `new`.
pub struct HeartbeatWatch {
    last_seen: Option<(u64, u64)>,
    last_change: Instant,
}

impl HeartbeatWatch {
    pub fn new(now: Instant) -> Self {
        HeartbeatWatch {
            last_seen: None,
            last_change: now,
        }
    }

    pub fn observe(&mut self, s: &MailboxState, now: Instant) {
        let seen = (s.owner_instance, s.heartbeat);
        if self.last_seen != Some(seen) {
            self.last_seen = Some(seen);
            self.last_change = now;
        }
    }

    /// True once the heartbeat has not changed for `window`.
    pub fn stale(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.last_change) >= window
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;

    /// A scratch directory removed on drop (no tempfile crate in this crate).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "nvtarget-mailbox-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn raw(mb: &Mailbox) -> Vec<u8> {
        std::fs::read(mb.path()).unwrap()
    }

    fn write_raw(mb: &Mailbox, off: usize, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(mb.path()).unwrap();
        f.write_all_at(bytes, off as u64).unwrap();
    }

    fn sequence_of(bytes: &[u8], slot: usize) -> Option<u64> {
        decode_slot(&bytes[slot * SLOT_SIZE..(slot + 1) * SLOT_SIZE])
            .ok()
            .map(|(seq, _)| seq)
    }

    fn full_state() -> MailboxState {
        MailboxState {
            epoch: 0x0102_0304_0506_0708,
            heartbeat: u64::MAX - 1,
            heartbeat_unix_ms: 1_700_000_000_123,
            owner_instance: 0xdead_beef_cafe_f00d,
            owner_state: OwnerState::ServingUnmirrored,
            unmirrored: true,
            taken_over_by: Some("b".repeat(NODE_NAME_MAX)),
            takeover_unix_ms: 1_700_000_000_456,
            giveback_requested: true,
        }
    }

    #[test]
    fn new_mailbox_starts_at_epoch_one_down_and_is_4096_bytes() {
        let dir = Scratch::new("new");
        let mb = Mailbox::open(&dir.0).unwrap();
        assert_eq!(mb.path(), dir.0.join(MAILBOX_FILE));
        assert_eq!(mb.read().unwrap(), MailboxState::initial());
        assert_eq!(mb.epoch().unwrap(), 1);
        assert_eq!(raw(&mb).len(), FILE_SIZE);
        // Only the mailbox is left behind, no temporary file.
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn every_field_round_trips_through_the_file() {
        let dir = Scratch::new("roundtrip");
        let mb = Mailbox::open(&dir.0).unwrap();
        let want = full_state();
        let (_, written) = mb.update(|s| *s = want.clone()).unwrap();
        assert_eq!(written, want);
        // A fresh handle reads it back from disk.
        let again = Mailbox::open(&dir.0).unwrap();
        assert_eq!(again.read().unwrap(), want);
        assert_eq!(again.epoch().unwrap(), want.epoch);

        for state in [
            OwnerState::Down,
            OwnerState::Booting,
            OwnerState::Serving,
            OwnerState::ServingUnmirrored,
            OwnerState::WaitingGiveback,
            OwnerState::ShuttingDown,
        ] {
            let mut s = MailboxState::initial();
            s.owner_state = state;
            s.taken_over_by = Some(String::new());
            let (seq, back) = decode_slot(&encode_slot(7, &s)).ok().unwrap();
            assert_eq!((seq, back), (7, s));
        }
        let mut s = MailboxState::initial();
        s.taken_over_by = Some("nöde-a".into());
        assert_eq!(decode_slot(&encode_slot(1, &s)).ok().unwrap().1, s);
    }

    #[test]
    fn open_never_truncates_or_resets_an_existing_mailbox() {
        let dir = Scratch::new("reopen");
        let mb = Mailbox::open(&dir.0).unwrap();
        mb.update(|s| s.epoch = 9).unwrap();
        drop(mb);
        let mb = Mailbox::open(&dir.0).unwrap();
        assert_eq!(mb.epoch().unwrap(), 9);
        assert_eq!(raw(&mb).len(), FILE_SIZE);
    }

    #[test]
    fn update_alternates_slots_and_returns_the_closure_result() {
        let dir = Scratch::new("alternate");
        let mb = Mailbox::open(&dir.0).unwrap();
        // Created with slot 0 at sequence 1; slot 1 never written.
        assert_eq!(sequence_of(&raw(&mb), 0), Some(1));
        assert_eq!(sequence_of(&raw(&mb), 1), None);
        for i in 1..=4u64 {
            let (r, s) = mb
                .update(|s| {
                    s.heartbeat += 1;
                    s.heartbeat * 10
                })
                .unwrap();
            assert_eq!((r, s.heartbeat), (i * 10, i));
            let bytes = raw(&mb);
            let written = (i % 2) as usize;
            assert_eq!(sequence_of(&bytes, written), Some(i + 1));
            // The other slot still holds the previous state.
            assert_eq!(sequence_of(&bytes, 1 - written), Some(i));
        }
    }

    #[test]
    fn a_torn_newer_slot_falls_back_to_the_older_one() {
        let dir = Scratch::new("torn");
        let mb = Mailbox::open(&dir.0).unwrap();
        mb.update(|s| s.heartbeat = 1).unwrap(); // slot 1, seq 2
        mb.update(|s| s.heartbeat = 2).unwrap(); // slot 0, seq 3
        write_raw(&mb, 100, &[0xa5; 64]); // tear slot 0
        assert_eq!(mb.read().unwrap().heartbeat, 1);
        // The next update replaces the torn slot, not the good one.
        let (_, s) = mb.update(|s| s.heartbeat += 10).unwrap();
        assert_eq!(s.heartbeat, 11);
        let bytes = raw(&mb);
        assert_eq!(sequence_of(&bytes, 0), Some(3));
        assert_eq!(sequence_of(&bytes, 1), Some(2));
        assert_eq!(mb.read().unwrap().heartbeat, 11);
    }

    #[test]
    fn a_write_cut_at_any_byte_leaves_the_old_or_the_new_state() {
        let dir = Scratch::new("cut");
        let mb = Mailbox::open(&dir.0).unwrap();
        let (_, old) = mb.update(|s| s.heartbeat = 5).unwrap(); // slot 1, seq 2
        let mut new = old.clone();
        new.epoch = 2;
        new.taken_over_by = Some("b".into());
        let good = raw(&mb);
        let slot = encode_slot(3, &new);
        for cut in 0..=SLOT_SIZE {
            write_raw(&mb, 0, &good[..SLOT_SIZE]);
            write_raw(&mb, 0, &slot[..cut]);
            let got = mb.read().unwrap();
            let want = if cut == SLOT_SIZE { &new } else { &old };
            assert_eq!(&got, want, "cut at byte {cut}");
        }
    }

    #[test]
    fn two_handles_updating_concurrently_never_lose_an_update() {
        let dir = Scratch::new("flock");
        let a = Mailbox::open(&dir.0).unwrap();
        let b = Mailbox::open(&dir.0).unwrap();
        let threads: Vec<_> = [a, b]
            .into_iter()
            .map(|mb| {
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        mb.update(|s| s.heartbeat += 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            Mailbox::open(&dir.0).unwrap().read().unwrap().heartbeat,
            400
        );
    }

    #[test]
    fn threads_sharing_one_handle_never_lose_an_update() {
        let dir = Scratch::new("shared");
        let mb = Arc::new(Mailbox::open(&dir.0).unwrap());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let mb = Arc::clone(&mb);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        mb.update(|s| s.heartbeat += 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(mb.read().unwrap().heartbeat, 400);
    }

    #[test]
    fn both_slots_corrupt_is_an_error_naming_the_path() {
        let dir = Scratch::new("corrupt");
        let mb = Mailbox::open(&dir.0).unwrap();
        mb.update(|s| s.epoch = 4).unwrap();
        write_raw(&mb, 0, &[0x5a; SLOTS_LEN]);
        let path = mb.path().display().to_string();
        for err in [
            mb.read().unwrap_err(),
            mb.epoch().unwrap_err(),
            mb.update(|s| s.heartbeat += 1).unwrap_err(),
            Mailbox::open(&dir.0).err().unwrap(),
        ] {
            assert!(matches!(err, MailboxError::NoValidSlot { .. }), "{err}");
            assert!(err.to_string().contains(&path), "{err}");
        }
        // Not reinitialised behind our back.
        assert_eq!(&raw(&mb)[..SLOTS_LEN], &[0x5a; SLOTS_LEN][..]);
    }

    #[test]
    fn a_short_existing_file_is_an_error_not_a_fresh_mailbox() {
        let dir = Scratch::new("short");
        std::fs::write(dir.0.join(MAILBOX_FILE), b"NVMB").unwrap();
        let err = Mailbox::open(&dir.0).err().unwrap();
        assert!(matches!(err, MailboxError::NoValidSlot { .. }), "{err}");
        assert_eq!(std::fs::read(dir.0.join(MAILBOX_FILE)).unwrap(), b"NVMB");
    }

    #[test]
    fn a_checksummed_slot_from_another_version_is_refused() {
        let dir = Scratch::new("version");
        let mb = Mailbox::open(&dir.0).unwrap();
        let mut slot = encode_slot(5, &MailboxState::initial());
        slot[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&slot[..OFF_CRC]);
        slot[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
        write_raw(&mb, SLOT_SIZE, &slot);
        let err = mb.read().unwrap_err();
        assert!(
            matches!(
                err,
                MailboxError::UnsupportedVersion {
                    slot: 1,
                    version: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn update_refuses_to_move_the_epoch_back_or_store_a_long_name() {
        let dir = Scratch::new("refuse");
        let mb = Mailbox::open(&dir.0).unwrap();
        mb.update(|s| s.epoch = 3).unwrap();
        let err = mb.update(|s| s.epoch = 2).unwrap_err();
        assert!(matches!(
            err,
            MailboxError::EpochRegression { from: 3, to: 2, .. }
        ));
        let long = "x".repeat(NODE_NAME_MAX + 1);
        let err = mb.update(|s| s.taken_over_by = Some(long)).unwrap_err();
        assert!(matches!(err, MailboxError::NodeNameTooLong { .. }));
        assert_eq!(mb.read().unwrap().epoch, 3);
        assert_eq!(mb.read().unwrap().taken_over_by, None);
    }

    #[test]
    fn heartbeat_watch_goes_stale_only_when_the_counter_stops() {
        let window = Duration::from_millis(500);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = MailboxState::initial();
        let mut w = HeartbeatWatch::new(t0);
        assert!(!w.stale(t0, window));

        // Moving every 100 ms for 2 s: never stale.
        for i in 0..20u64 {
            s.heartbeat = i;
            w.observe(&s, at(i * 100));
            assert!(!w.stale(at(i * 100 + 99), window), "beat {i}");
        }
        // Last change at 1900 ms; re-reading the same counter does not help.
        w.observe(&s, at(2200));
        assert!(!w.stale(at(2399), window));
        assert!(w.stale(at(2400), window));
        assert!(w.stale(at(10_000), window));

        // A single move makes it fresh again, and the window restarts there.
        s.heartbeat += 1;
        w.observe(&s, at(10_000));
        assert!(!w.stale(at(10_000), window));
        assert!(!w.stale(at(10_499), window));
        assert!(w.stale(at(10_500), window));

        // A restarted owner (new instance) counts as a change even if the
        // counter happens to read the same.
        s.owner_instance = 42;
        w.observe(&s, at(11_000));
        assert!(!w.stale(at(11_000), window));
    }

    #[test]
    fn heartbeat_watch_never_fed_goes_stale_from_its_start() {
        let t0 = Instant::now();
        let w = HeartbeatWatch::new(t0);
        assert!(!w.stale(t0 + Duration::from_millis(99), Duration::from_millis(100)));
        assert!(w.stale(t0 + Duration::from_millis(100), Duration::from_millis(100)));
    }
}
