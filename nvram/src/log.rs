//! The log: appends, durability, half switching, CPs, prune and recovery.
//!
//! Life cycle:
//! 1. [`Log::open`] scans the region and returns the [`Replay`]: records with
//!    seq above the store's committed seq, in seq order, and a recovery
//!    [`CpTicket`]. The caller applies them to its dirty cache, commits a CP
//!    recording `ticket.seq()`, then calls [`Log::cp_done`] with the ticket.
//!    Appends are refused ([`Error::RecoveryPending`]) until then.
//! 2. [`Log::append_with`]: reserve a seq and space in the active half (a few
//!    instructions under the mutex), checksum and write outside it, wait until
//!    the record and every earlier one is durable per the [`Durability`], run
//!    the caller's `apply` (puts the data in the dirty cache) in seq order,
//!    return. Only then may the caller answer the initiator.
//! 3. CP: [`Log::begin_cp`] switches appends to the other half and waits
//!    until every record up to `ticket.seq()` has been applied; the caller's
//!    store CP then contains all of them; [`Log::cp_done`] prunes the frozen
//!    half (records its seq as covered, frees it).
//!
//! Invariants (all under `state`):
//! * seqs are handed out consecutively, each with space in the active half,
//!   so each use of a half holds consecutive seqs from its `first_seq`;
//! * at most one CP is outstanding; the non-active half is Free iff none is,
//!   so `begin_cp` always finds a free half to switch to;
//! * a record is declared durable only when every earlier one is (the
//!   durable seq is a prefix), and `apply` runs in seq order, so the dirty
//!   cache sees writes in the order replay will use;
//! * a half is reused only after `cp_done`, i.e. after a CP covering all its
//!   records committed;
//! * flow control: an append that does not fit in the active half waits
//!   (never fails) until a CP switches halves. An I/O error fails the log:
//!   every later call returns [`Error::Failed`], nothing is acknowledged that
//!   might not be durable.

use crate::error::{Error, Result};
use crate::layout::{
    HalfHeader, HalfUse, Layout, HALF_HEADER_LEN, HALF_HEADER_SLOT, REGION_HEADER_LEN,
};
use crate::medium::{FileMedium, LogMedium};
use crate::mmap::MmapMedium;
use crate::record::{self, Record, RecordMeta, Seq, RECORD_HEADER_LEN};
use crate::scan::{self, RecordInfo, ScanReport};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TURN_SLOTS: usize = 16;

/// Default CP interval (the caller's CP thread runs at least this often).
pub const DEFAULT_CP_INTERVAL: Duration = Duration::from_secs(10);

/// What "the record is durable" means when `append` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Durability {
    /// The record (and every earlier one) has been copied into the memory
    /// mapping of the region file, i.e. into the kernel's page cache. It
    /// survives the nvtarget process being killed (SIGKILL, panic, abort,
    /// OOM kill) but NOT a kernel crash or power loss. No syscall per append.
    Process,
    /// The record (and every earlier one) has been written with pwrite and
    /// `fdatasync` has returned: it survives power loss, as far as the device
    /// honours cache flushes. Concurrent appends share syncs (group commit):
    /// one leader syncs for all records written before it started.
    Power,
}

/// Where and how the region file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionConfig {
    /// Size used when the region is created; an existing region keeps the
    /// size it was formatted with.
    pub size: u64,
    pub durability: Durability,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            size: crate::layout::DEFAULT_REGION_SIZE,
            durability: Durability::Process,
        }
    }
}

/// A CP's claim: when `cp_done` gets it back, every record with seq <=
/// `seq()` is in a committed CP of the store. Not `Clone`: one `cp_done` each.
#[derive(Debug, PartialEq, Eq)]
pub struct CpTicket {
    id: u64,
    seq: Seq,
    recovery: bool,
}

impl CpTicket {
    /// The highest seq the CP covers: pass it to the store's CP as its
    /// highest seq.
    pub fn seq(&self) -> Seq {
        self.seq
    }
    /// The ticket returned by `open` (covers the replay).
    pub fn is_recovery(&self) -> bool {
        self.recovery
    }
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appended: u64,
    pub appended_bytes: u64,
    /// Durability barriers issued by appends (`Power`); appended/syncs is
    /// the group-commit factor.
    pub syncs: u64,
    /// Appends that had to wait for a CP to free a half.
    pub space_waits: u64,
    pub cps: u64,
    /// Seq the next record will get.
    pub next_seq: Seq,
    /// Every record up to this is durable.
    pub durable_seq: Seq,
    pub active_half: usize,
    /// Bytes of records in the active half.
    pub active_used: u64,
    pub half_capacity: u64,
    /// Bytes of records in each half: the active one, and a frozen one
    /// while its CP runs (a free half holds none).
    pub half_used: [u64; 2],
    pub cp_in_progress: bool,
}

#[derive(Clone, Copy, Debug)]
struct HalfMem {
    header: HalfHeader,
    /// Absolute offset where the next record goes (meaningful while Active).
    fill: u64,
}

struct OutstandingCp {
    id: u64,
    seq: Seq,
    /// The half frozen by this CP (None for the recovery ticket).
    frozen: Option<usize>,
}

struct State {
    halves: [HalfMem; 2],
    active: usize,
    next_seq: Seq,
    /// Highest half generation used so far.
    generation: u64,
    recovering: bool,
    cp: Option<OutstandingCp>,
    next_ticket: u64,
    cp_requested: bool,
    space_waiters: usize,
    /// Reserved, not yet written to the medium.
    unwritten: BTreeSet<Seq>,
    /// Reserved, `apply` not yet finished.
    unapplied: BTreeSet<Seq>,
    durable_upto: Seq,
    syncing: bool,
    /// `begin_cp` is waiting for the applied frontier.
    cp_draining: bool,
    failed: Option<String>,
    stats: LogStats,
}

impl State {
    fn written_upto(&self) -> Seq {
        self.unwritten.first().map_or(self.next_seq - 1, |s| s - 1)
    }
    fn applied_upto(&self) -> Seq {
        self.unapplied.first().map_or(self.next_seq - 1, |s| s - 1)
    }
    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(m) => Err(Error::Failed(m.clone())),
            None => Ok(()),
        }
    }
}

/// The NVRAM log of this node (LOCAL portion) plus raw access to the PARTNER
/// portion. `Send + Sync`; share it in an `Arc`.
pub struct Log {
    medium: Arc<dyn LogMedium>,
    layout: Layout,
    durability: Durability,
    state: Mutex<State>,
    /// Appenders waiting for space or recovery.
    space_cv: Condvar,
    /// The written/durable frontier moved, a sync finished, or (while
    /// `cp_draining`) the applied frontier moved.
    progress_cv: Condvar,
    /// "Your turn to apply": an appender waiting to apply `seq` waits on
    /// `turn_cv[seq % TURN_SLOTS]`, and only that slot is woken when the
    /// applied frontier reaches it (no thundering herd of all appenders).
    turn_cv: [Condvar; TURN_SLOTS],
    /// A CP became needed (for `wait_cp_needed`).
    cp_cv: Condvar,
}

/// What a restart must replay, and what the scan found.
pub struct Replay {
    pub report: ScanReport,
    ticket: Option<CpTicket>,
    entries: Vec<RecordInfo>,
    medium: Arc<dyn LogMedium>,
}

impl Replay {
    /// Records to replay, in seq order (metadata and location; no data).
    pub fn entries(&self) -> &[RecordInfo] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Reads and re-verifies each record, in seq order.
    pub fn records(&self) -> impl Iterator<Item = Result<Record>> + '_ {
        self.entries.iter().map(|e| read_record(&*self.medium, e))
    }
    /// The recovery ticket: commit a store CP with `ticket.seq()` (after
    /// applying every record), then hand it to `Log::cp_done`. Taken once.
    pub fn take_ticket(&mut self) -> Option<CpTicket> {
        self.ticket.take()
    }
}

fn read_record(medium: &dyn LogMedium, e: &RecordInfo) -> Result<Record> {
    let mut buf = vec![0u8; RECORD_HEADER_LEN + e.data_len as usize];
    medium
        .read_at(e.offset, &mut buf)
        .map_err(Error::io("reading a record to replay"))?;
    match record::decode(&buf) {
        Ok(r) if r.seq == e.seq && r.meta == e.meta => Ok(r),
        _ => Err(Error::ReplayChanged {
            seq: e.seq,
            offset: e.offset,
        }),
    }
}

/// Path of the region file in a data directory.
pub fn region_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(crate::layout::REGION_FILE)
}

impl Log {
    /// Opens (creating and formatting if missing or empty) the region file
    /// `DATA_DIR/nvram.img` and the log in it. `committed_seq` is the store's
    /// highest seq from its last committed CP. A file shorter than its
    /// header's size is reported in `replay.report.truncated_file_len` and
    /// extended with zeros (records past the cut are gone; nothing bogus is
    /// replayed).
    pub fn open_dir(
        data_dir: &Path,
        cfg: RegionConfig,
        committed_seq: Seq,
    ) -> Result<(Log, Replay)> {
        Self::open_file(&region_path(data_dir), cfg, committed_seq)
    }

    /// As `open_dir`, with an explicit file path.
    pub fn open_file(path: &Path, cfg: RegionConfig, committed_seq: Seq) -> Result<(Log, Replay)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(Error::io("opening the region file"))?;
        let len = file
            .metadata()
            .map_err(Error::io("stat of the region file"))?
            .len();
        let mut truncated = None;
        if len == 0 {
            Layout::for_size(cfg.size)?;
            file.set_len(cfg.size)
                .map_err(Error::io("sizing the region file"))?;
        } else {
            let mut hdr = vec![0u8; len.min(REGION_HEADER_LEN) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut hdr, 0)
                .map_err(Error::io("reading the region header"))?;
            let want = match Layout::decode_header(&hdr)? {
                Some(l) => l.size,
                None => cfg.size,
            };
            if len < want {
                truncated = Some(len);
                file.set_len(want)
                    .map_err(Error::io("extending the region file"))?;
            }
        }
        let medium: Arc<dyn LogMedium> = match cfg.durability {
            Durability::Process => {
                Arc::new(MmapMedium::new(file).map_err(Error::io("mapping the region file"))?)
            }
            Durability::Power => {
                Arc::new(FileMedium::new(file).map_err(Error::io("opening the region file"))?)
            }
        };
        let (log, mut replay) = Self::open(medium, cfg.durability, committed_seq)?;
        replay.report.truncated_file_len = truncated;
        Ok((log, replay))
    }

    /// Opens the log on `medium` (formatting it if it is blank: region header
    /// and both half headers all zero). Never fails because of bad records:
    /// they end the scan and are described in `replay.report`.
    pub fn open(
        medium: Arc<dyn LogMedium>,
        durability: Durability,
        committed_seq: Seq,
    ) -> Result<(Log, Replay)> {
        let layout = match read_layout(&*medium)? {
            Some(l) => l,
            None => format(&*medium)?,
        };
        let halves = [
            scan::scan_half(&*medium, &layout, 0)?,
            scan::scan_half(&*medium, &layout, 1)?,
        ];
        let (report, entries) = scan::plan(layout, halves, committed_seq, None);
        let mut generation = 0;
        let half_mem = |i: usize| {
            let header = report.halves[i].header.unwrap_or(HalfHeader {
                half: i as u32,
                counter: 0,
                generation: 0,
                first_seq: 0,
                pruned_seq: 0,
                state: HalfUse::Free,
            });
            HalfMem {
                header,
                fill: layout.records_off(i),
            }
        };
        let halves = [half_mem(0), half_mem(1)];
        for h in &halves {
            generation = generation.max(h.header.generation);
        }
        // The newer half is "active" until recovery ends; the other one is
        // activated then.
        let active = usize::from(halves[1].header.generation > halves[0].header.generation);
        let next_seq = report.max_seen_seq + 1;
        // The recovery CP covers every seq seen, not just the replayed ones:
        // records past a damaged one are abandoned (never replayed), and the
        // next restart must not mistake the new records, which start above
        // them, for a gap.
        let ticket_seq = report.max_seen_seq;
        let state = State {
            halves,
            active,
            next_seq,
            generation,
            recovering: true,
            cp: Some(OutstandingCp {
                id: 0,
                seq: ticket_seq,
                frozen: None,
            }),
            next_ticket: 1,
            cp_requested: false,
            space_waiters: 0,
            unwritten: BTreeSet::new(),
            unapplied: BTreeSet::new(),
            durable_upto: next_seq - 1,
            syncing: false,
            cp_draining: false,
            failed: None,
            stats: LogStats::default(),
        };
        let log = Log {
            medium: medium.clone(),
            layout,
            durability,
            state: Mutex::new(state),
            space_cv: Condvar::new(),
            progress_cv: Condvar::new(),
            turn_cv: std::array::from_fn(|_| Condvar::new()),
            cp_cv: Condvar::new(),
        };
        let replay = Replay {
            report,
            ticket: Some(CpTicket {
                id: 0,
                seq: ticket_seq,
                recovery: true,
            }),
            entries,
            medium,
        };
        Ok((log, replay))
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Appends a record and returns its seq once it is durable (see
    /// [`Durability`]). Blocks while no half has room (flow control).
    /// For records whose effect must be in the next CP, use `append_with`.
    pub fn append(&self, meta: &RecordMeta, data: &[u8]) -> Result<Seq> {
        self.append_inner(meta, data, false, |_| ())
            .map(|(s, ())| s)
    }

    /// `append_with`, telling `apply` where the record lives (for the
    /// mirror, which sends the same bytes to the same offset of the
    /// partner's PARTNER portion). `apply` runs in seq order.
    pub fn append_with_at<R>(
        &self,
        meta: &RecordMeta,
        data: &[u8],
        apply: impl FnOnce(Appended) -> R,
    ) -> Result<(Seq, R)> {
        self.append_inner(meta, data, true, apply)
    }

    /// Appends a record; once it (and every earlier record) is durable, runs
    /// `apply(seq)` -- in seq order with respect to every other append's
    /// `apply` -- and returns. A CP ticket covering `seq` is only handed out
    /// after `apply` returned, so whatever `apply` puts in the store's dirty
    /// set is in that CP. `apply` does not run if the append fails.
    pub fn append_with<R>(
        &self,
        meta: &RecordMeta,
        data: &[u8],
        apply: impl FnOnce(Seq) -> R,
    ) -> Result<(Seq, R)> {
        self.append_inner(meta, data, true, |a| apply(a.seq))
    }

    /// `ordered`: run `apply` only after every earlier record's `apply`
    /// (an append without side effects need not wait its turn).
    fn append_inner<R>(
        &self,
        meta: &RecordMeta,
        data: &[u8],
        ordered: bool,
        apply: impl FnOnce(Appended) -> R,
    ) -> Result<(Seq, R)> {
        let len = record::encoded_len(data.len());
        if len > self.layout.half_capacity() {
            return Err(Error::RecordTooLarge {
                len,
                capacity: self.layout.half_capacity(),
            });
        }
        let data_len = u32::try_from(data.len()).map_err(|_| Error::RecordTooLarge {
            len,
            capacity: self.layout.half_capacity(),
        })?;
        // Checksum the data before taking the lock: it is most of the work.
        let data_crc = crc32c::crc32c(data);
        let (seq, off) = self.reserve(len)?;
        let pending = Pending { log: self, seq };
        let zeroed = record::encode_header(seq, meta, data_len, 0);
        let crc = record::record_crc(&zeroed, data_crc, data.len());
        let header = record::encode_header(seq, meta, data_len, crc);
        let written = self.medium.write_parts_at(off, &[&header, data]);

        let mut st = self.state.lock();
        if let Err(e) = written {
            self.fail(&mut st, format!("writing record seq {seq}: {e}"));
            return Err(Error::Io {
                context: "writing a record",
                source: e,
            });
        }
        let was_first = st.unwritten.first() == Some(&seq);
        st.unwritten.remove(&seq);
        st.stats.appended += 1;
        st.stats.appended_bytes += len;
        if was_first {
            self.progress_cv.notify_all();
        }
        self.wait_durable(&mut st, seq)?;
        // Apply in seq order.
        while ordered && st.unapplied.first() != Some(&seq) {
            st.check()?;
            self.turn_cv[seq as usize % TURN_SLOTS].wait(&mut st);
        }
        drop(st);
        let r = apply(Appended {
            seq,
            offset: off - self.layout.local_off(),
            len: record::RECORD_HEADER_LEN as u64 + data.len() as u64,
        });
        drop(pending);
        Ok((seq, r))
    }

    /// Reserves a seq and `len` bytes in the active half, waiting for a CP
    /// to switch halves if the active one is full.
    fn reserve(&self, len: u64) -> Result<(Seq, u64)> {
        let mut st = self.state.lock();
        loop {
            st.check()?;
            if st.recovering {
                return Err(Error::RecoveryPending);
            }
            let a = st.active;
            if st.halves[a].fill + len <= self.layout.half_end(a) {
                break;
            }
            st.space_waiters += 1;
            st.stats.space_waits += 1;
            self.cp_cv.notify_all();
            self.space_cv.wait(&mut st);
            st.space_waiters -= 1;
        }
        let a = st.active;
        let seq = st.next_seq;
        st.next_seq += 1;
        let off = st.halves[a].fill;
        let before = self.used(&st.halves[a], a);
        st.halves[a].fill += len;
        st.unwritten.insert(seq);
        st.unapplied.insert(seq);
        let threshold = self.layout.half_capacity() / 2;
        if before < threshold && self.used(&st.halves[a], a) >= threshold {
            self.cp_cv.notify_all();
        }
        Ok((seq, off))
    }

    fn used(&self, h: &HalfMem, i: usize) -> u64 {
        h.fill - self.layout.records_off(i)
    }

    /// Waits until `seq` and everything before it is durable per the mode.
    fn wait_durable(&self, st: &mut MutexGuard<'_, State>, seq: Seq) -> Result<()> {
        loop {
            st.check()?;
            match self.durability {
                Durability::Process => {
                    if st.written_upto() >= seq {
                        st.durable_upto = st.durable_upto.max(seq);
                        return Ok(());
                    }
                }
                Durability::Power => {
                    if st.durable_upto >= seq {
                        return Ok(());
                    }
                    if !st.syncing && st.written_upto() >= seq {
                        // Group commit: this thread syncs for every record
                        // written so far; later ones wait for the next sync.
                        st.syncing = true;
                        let target = st.written_upto();
                        let r = MutexGuard::unlocked(st, || self.medium.sync());
                        st.syncing = false;
                        st.stats.syncs += 1;
                        match r {
                            Ok(()) => st.durable_upto = st.durable_upto.max(target),
                            Err(e) => self.fail(st, format!("sync: {e}")),
                        }
                        self.progress_cv.notify_all();
                        continue;
                    }
                }
            }
            self.progress_cv.wait(st);
        }
    }

    fn fail(&self, st: &mut State, msg: String) {
        if st.failed.is_none() {
            st.failed = Some(msg);
        }
        self.progress_cv.notify_all();
        self.space_cv.notify_all();
        self.cp_cv.notify_all();
        for cv in &self.turn_cv {
            cv.notify_all();
        }
    }

    fn write_half_header(&self, st: &mut State, i: usize) -> Result<()> {
        let h = &mut st.halves[i].header;
        h.counter += 1;
        let at = self.layout.half_off(i) + h.slot() * HALF_HEADER_SLOT;
        let bytes = h.encode();
        if let Err(e) = self.medium.write_at(at, &bytes) {
            self.fail(st, format!("writing half {i} header: {e}"));
            return Err(Error::Io {
                context: "writing a half header",
                source: e,
            });
        }
        Ok(())
    }

    fn activate(&self, st: &mut State, i: usize) -> Result<()> {
        st.generation += 1;
        let (generation, next_seq) = (st.generation, st.next_seq);
        let h = &mut st.halves[i];
        h.header.generation = generation;
        h.header.first_seq = next_seq;
        h.header.state = HalfUse::Active;
        h.fill = self.layout.records_off(i);
        st.active = i;
        self.write_half_header(st, i)
    }

    /// True if a CP should start now: the active half is at least half full,
    /// an append is waiting for space, or one was requested; and no CP is in
    /// progress (so `begin_cp` will succeed).
    pub fn should_cp(&self) -> bool {
        self.should_cp_locked(&self.state.lock())
    }

    fn should_cp_locked(&self, st: &State) -> bool {
        !st.recovering
            && st.cp.is_none()
            && st.failed.is_none()
            && (st.cp_requested
                || st.space_waiters > 0
                || self.used(&st.halves[st.active], st.active) >= self.layout.half_capacity() / 2)
    }

    /// Asks for a CP (on demand): `should_cp` turns true.
    pub fn request_cp(&self) {
        self.state.lock().cp_requested = true;
        self.cp_cv.notify_all();
    }

    /// For the CP thread: waits up to `timeout` for `should_cp`; returns it.
    /// A typical loop: `log.wait_cp_needed(DEFAULT_CP_INTERVAL); let t =
    /// log.begin_cp()?; store.cp(t.seq())?; log.cp_done(t)?;` (a CP at least
    /// every interval, sooner when needed).
    pub fn wait_cp_needed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !self.should_cp_locked(&st) && st.failed.is_none() {
            if self.cp_cv.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        self.should_cp_locked(&st)
    }

    /// Starts a CP: appends switch to the other half; returns once every
    /// record up to `ticket.seq()` has been applied (see `append_with`).
    pub fn begin_cp(&self) -> Result<CpTicket> {
        let mut st = self.state.lock();
        st.check()?;
        if st.recovering {
            return Err(Error::RecoveryPending);
        }
        if st.cp.is_some() {
            return Err(Error::CpInProgress);
        }
        let old = st.active;
        let new = 1 - old;
        let seq = st.next_seq - 1;
        st.halves[old].header.state = HalfUse::Frozen;
        self.activate(&mut st, new)?;
        let id = st.next_ticket;
        st.next_ticket += 1;
        st.cp = Some(OutstandingCp {
            id,
            seq,
            frozen: Some(old),
        });
        st.cp_requested = false;
        self.space_cv.notify_all();
        while st.applied_upto() < seq {
            if let Err(e) = st.check() {
                st.cp_draining = false;
                return Err(e);
            }
            st.cp_draining = true;
            self.progress_cv.wait(&mut st);
        }
        st.cp_draining = false;
        Ok(CpTicket {
            id,
            seq,
            recovery: false,
        })
    }

    /// The store CP covering `ticket` has committed: prune. For the recovery
    /// ticket this ends recovery (both halves pruned, one activated) and
    /// appends may start.
    pub fn cp_done(&self, ticket: CpTicket) -> Result<()> {
        let mut st = self.state.lock();
        st.check()?;
        match &st.cp {
            Some(cp) if cp.id == ticket.id => {}
            _ => return Err(Error::WrongTicket(ticket.id)),
        }
        let frozen = st.cp.as_ref().and_then(|c| c.frozen);
        let covered = st.cp.as_ref().map_or(ticket.seq, |c| c.seq);
        let prune: Vec<usize> = match frozen {
            Some(f) => vec![f],
            None => vec![0, 1],
        };
        for i in prune {
            let h = &mut st.halves[i].header;
            h.pruned_seq = h.pruned_seq.max(covered);
            h.state = HalfUse::Free;
            self.write_half_header(&mut st, i)?;
        }
        if st.recovering {
            let a = 1 - st.active;
            self.activate(&mut st, a)?;
            st.recovering = false;
        }
        st.cp = None;
        st.stats.cps += 1;
        self.space_cv.notify_all();
        self.cp_cv.notify_all();
        drop(st);
        if self.durability == Durability::Power {
            // Not needed for correctness (replay also skips records at or
            // below the store's committed seq), but makes the prune mark
            // itself durable promptly.
            if let Err(e) = self.medium.sync() {
                let mut st = self.state.lock();
                self.fail(&mut st, format!("sync after prune: {e}"));
                return Err(Error::Io {
                    context: "syncing a prune",
                    source: e,
                });
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> LogStats {
        let st = self.state.lock();
        LogStats {
            next_seq: st.next_seq,
            durable_seq: st.durable_upto,
            active_half: st.active,
            active_used: self.used(&st.halves[st.active], st.active),
            half_capacity: self.layout.half_capacity(),
            half_used: [0, 1].map(|i| match st.halves[i].header.state {
                HalfUse::Free => 0,
                _ => self.used(&st.halves[i], i),
            }),
            cp_in_progress: st.cp.is_some() && !st.recovering,
            ..st.stats
        }
    }

    /// `len` bytes of the LOCAL portion at `offset` (relative to it): a
    /// record as `append_with_at` placed it, for the mirror.
    pub fn local_read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.layout.local_len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => {}
            _ => {
                return Err(Error::OutOfRange {
                    offset,
                    len: len as u64,
                    size,
                })
            }
        }
        let mut buf = vec![0; len];
        self.medium
            .read_at(self.layout.local_off() + offset, &mut buf)
            .map_err(Error::io("reading the local portion"))?;
        Ok(buf)
    }

    /// Every valid record of both halves' current use, in seq order, with
    /// offsets relative to the LOCAL portion: what the mirror reads back for
    /// a partner that lacks records no longer in its memory.
    pub fn local_records(&self) -> Result<Vec<RecordInfo>> {
        let mut all = Vec::new();
        for i in 0..2 {
            let h = scan::scan_half(&*self.medium, &self.layout, i)?;
            all.extend(h.records.into_iter().map(|mut r| {
                r.offset -= self.layout.local_off();
                r
            }));
        }
        all.sort_by_key(|r| r.seq);
        Ok(all)
    }

    /// Size of the PARTNER portion (where the partner's log is mirrored).
    pub fn partner_len(&self) -> u64 {
        self.layout.partner_len()
    }

    fn partner_range(&self, offset: u64, len: usize) -> Result<u64> {
        let size = self.layout.partner_len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(self.layout.partner_off() + offset),
            _ => Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size,
            }),
        }
    }

    /// Reads PARTNER bytes at `offset` (relative to the portion).
    pub fn partner_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.partner_range(offset, buf.len())?;
        self.medium
            .read_at(at, buf)
            .map_err(Error::io("reading the partner portion"))
    }

    /// Writes PARTNER bytes at `offset` (relative to the portion). Durable
    /// per the mode after `partner_sync` (`Power`) or at once (`Process`).
    pub fn partner_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.partner_range(offset, data.len())?;
        self.medium
            .write_at(at, data)
            .map_err(Error::io("writing the partner portion"))
    }

    /// A no-op in `Process` mode: like the local log, the mapped region
    /// survives a killed process without a sync, and an msync of the whole
    /// mapping per mirrored batch cost the partner a disk flush per write.
    pub fn partner_sync(&self) -> Result<()> {
        if self.durability != Durability::Power {
            return Ok(());
        }
        self.medium
            .sync()
            .map_err(Error::io("syncing the partner portion"))
    }
}

/// Where `append_with_at` put a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: Seq,
    /// Offset relative to the LOCAL portion.
    pub offset: u64,
    /// Header + data, without the alignment padding.
    pub len: u64,
}

/// Clears an append's reservation bookkeeping however the append ends
/// (success, error, or a panic in `apply`), so CPs and later appends never
/// wait for it forever.
struct Pending<'a> {
    log: &'a Log,
    seq: Seq,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let log = self.log;
        let mut st = log.state.lock();
        // Only on error paths is the record still unwritten here.
        if st.unwritten.first() == Some(&self.seq) {
            log.progress_cv.notify_all();
        }
        st.unwritten.remove(&self.seq);
        let was_first = st.unapplied.first() == Some(&self.seq);
        st.unapplied.remove(&self.seq);
        if was_first {
            if let Some(&next) = st.unapplied.first() {
                log.turn_cv[next as usize % TURN_SLOTS].notify_all();
            }
            if st.cp_draining {
                log.progress_cv.notify_all();
            }
        }
    }
}

/// The region's layout, or `None` if the medium is blank (safe to format).
pub(crate) fn read_layout(medium: &dyn LogMedium) -> Result<Option<Layout>> {
    let mut hdr = vec![0u8; medium.len().min(REGION_HEADER_LEN) as usize];
    medium
        .read_at(0, &mut hdr)
        .map_err(Error::io("reading the region header"))?;
    if let Some(l) = Layout::decode_header(&hdr)? {
        return Ok(Some(l));
    }
    // A zero region header over non-blank halves is damage, not a new region.
    let l = Layout::for_size(medium.len())?;
    for i in 0..2 {
        let mut b = vec![0u8; HALF_HEADER_LEN as usize];
        medium
            .read_at(l.half_off(i), &mut b)
            .map_err(Error::io("reading a half header"))?;
        if b.iter().any(|&x| x != 0) {
            return Err(Error::BadRegion(
                "region header is zeroed but the log halves are not: refusing to format".into(),
            ));
        }
    }
    Ok(None)
}

/// Formats a blank medium: region header and two empty half headers.
fn format(medium: &dyn LogMedium) -> Result<Layout> {
    let l = Layout::for_size(medium.len())?;
    let io = Error::io("formatting the region");
    let r = (|| {
        medium.write_at(0, &l.encode_header())?;
        for i in 0..2 {
            let h = HalfHeader {
                half: i as u32,
                counter: 1,
                generation: 0,
                first_seq: 0,
                pruned_seq: 0,
                state: HalfUse::Free,
            };
            medium.write_at(l.half_off(i) + h.slot() * HALF_HEADER_SLOT, &h.encode())?;
        }
        medium.sync()
    })();
    r.map_err(io)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::medium::FaultMedium;
    use crate::record::Op;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::thread;

    /// Smallest region: ~68 KiB halves, 14 records of 4 KiB each.
    const SMALL: u64 = 4096 + 4 * 69632;

    fn meta(lba: u64) -> RecordMeta {
        RecordMeta::data(Op::WRITE, 1, lba, 8, 7)
    }

    fn open_ready(m: &FaultMedium, d: Durability, committed: Seq) -> (Log, Vec<Record>) {
        let (log, mut replay) = Log::open(Arc::new(m.clone()), d, committed).unwrap();
        let recs = replay.records().collect::<Result<Vec<_>>>().unwrap();
        let t = replay.take_ticket().unwrap();
        assert!(t.is_recovery());
        log.cp_done(t).unwrap();
        (log, recs)
    }

    #[test]
    fn recovery_gate_then_appends() {
        let m = FaultMedium::new(SMALL);
        let (log, mut replay) = Log::open(Arc::new(m.clone()), Durability::Power, 0).unwrap();
        assert!(replay.is_empty());
        assert!(replay.report.is_clean(), "{:?}", replay.report.problems());
        assert!(matches!(
            log.append(&meta(0), b"x"),
            Err(Error::RecoveryPending)
        ));
        assert!(matches!(log.begin_cp(), Err(Error::RecoveryPending)));
        let t = replay.take_ticket().unwrap();
        assert_eq!(t.seq(), 0);
        log.cp_done(t).unwrap();
        assert_eq!(log.append(&meta(0), b"x").unwrap(), 1);
        assert_eq!(log.append(&meta(1), &[]).unwrap(), 2);
        assert_eq!(log.stats().durable_seq, 2);
        let too_big = vec![0u8; log.layout().half_capacity() as usize];
        assert!(matches!(
            log.append(&meta(0), &too_big),
            Err(Error::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn append_with_at_reports_where_the_bytes_are() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Process, 0);
        let mut placed = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 512 * (i as usize + 1)];
            let (seq, a) = log.append_with_at(&meta(i as u64), &data, |a| a).unwrap();
            assert_eq!(a.seq, seq);
            assert_eq!(a.len, 64 + data.len() as u64);
            placed.push((a, data));
        }
        for (a, data) in &placed {
            let bytes = log.local_read(a.offset, a.len as usize).unwrap();
            let rec = record::decode(&bytes).unwrap();
            assert_eq!(rec.seq, a.seq);
            assert_eq!(&rec.data, data);
        }
        let found = log.local_records().unwrap();
        assert_eq!(
            found.iter().map(|r| (r.seq, r.offset)).collect::<Vec<_>>(),
            placed
                .iter()
                .map(|(a, _)| (a.seq, a.offset))
                .collect::<Vec<_>>()
        );
        assert!(log.local_read(log.layout().local_len() - 10, 64).is_err());
    }

    #[test]
    fn half_switching_and_prune() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Power, 0);
        let data = vec![0xabu8; 4096];
        let mut n = 0;
        while !log.should_cp() {
            log.append(&meta(n), &data).unwrap();
            n += 1;
        }
        // 4608 bytes per record, 68608 per half: half full after 8.
        assert_eq!(n, 8);
        let a0 = log.stats().active_half;
        let t = log.begin_cp().unwrap();
        assert_eq!(t.seq(), 8);
        assert_ne!(log.stats().active_half, a0);
        assert!(matches!(log.begin_cp(), Err(Error::CpInProgress)));
        assert!(!log.should_cp());
        for i in 0..3 {
            log.append(&meta(100 + i), &data).unwrap();
        }
        log.cp_done(t).unwrap();
        // A stale ticket is refused.
        assert!(matches!(
            log.cp_done(CpTicket {
                id: 99,
                seq: 1,
                recovery: false
            }),
            Err(Error::WrongTicket(99))
        ));
        drop(log);
        // Restart with the store knowing nothing: the prune mark still hides 1..=8.
        let (log, recs) = open_ready(&m, Durability::Power, 0);
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![9, 10, 11]
        );
        assert_eq!(recs[0].meta.lba, 100);
        // New seqs continue above everything seen.
        assert_eq!(log.append(&meta(0), &data).unwrap(), 12);
    }

    #[test]
    fn flow_control_waits_for_cp_never_fails() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Process, 0);
        let log = Arc::new(log);
        let data = vec![1u8; 4096];
        for i in 0..14 {
            log.append(&meta(i), &data).unwrap();
        }
        // Active half full, other free but no CP yet: the next append waits.
        let done = Arc::new(AtomicBool::new(false));
        let (l2, d2, data2) = (log.clone(), done.clone(), data.clone());
        let h = thread::spawn(move || {
            let s = l2.append(&meta(99), &data2).unwrap();
            d2.store(true, Ordering::SeqCst);
            s
        });
        assert!(log.wait_cp_needed(Duration::from_secs(5)));
        thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst));
        assert!(log.stats().space_waits >= 1);
        let t1 = log.begin_cp().unwrap();
        assert_eq!(h.join().unwrap(), 15);
        // Fill the second half while the CP is outstanding: appends wait
        // until cp_done, then for the next begin_cp.
        for i in 0..13 {
            log.append(&meta(200 + i), &data).unwrap();
        }
        let (l3, data3) = (log.clone(), data.clone());
        let h = thread::spawn(move || l3.append(&meta(300), &data3).unwrap());
        thread::sleep(Duration::from_millis(50));
        assert!(!h.is_finished());
        assert!(!log.should_cp(), "a CP is still in progress");
        log.cp_done(t1).unwrap();
        assert!(log.wait_cp_needed(Duration::from_secs(5)));
        let t2 = log.begin_cp().unwrap();
        assert_eq!(t2.seq(), 28);
        assert_eq!(h.join().unwrap(), 29);
        log.cp_done(t2).unwrap();
        assert_eq!(log.stats().cps, 3); // recovery + 2
    }

    #[test]
    fn begin_cp_waits_for_apply_and_apply_runs_in_seq_order() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Power, 0);
        let log = Arc::new(log);
        let (tx, rx) = mpsc::channel::<()>();
        let applied = Arc::new(AtomicBool::new(false));
        let (l2, a2) = (log.clone(), applied.clone());
        let h = thread::spawn(move || {
            l2.append_with(&meta(0), b"slow", |_| {
                rx.recv().unwrap();
                a2.store(true, Ordering::SeqCst);
            })
            .unwrap()
        });
        while log.stats().next_seq < 2 {
            thread::yield_now();
        }
        let (l3, a3) = (log.clone(), applied.clone());
        let cp = thread::spawn(move || {
            let t = l3.begin_cp().unwrap();
            assert!(
                a3.load(Ordering::SeqCst),
                "ticket handed out before apply finished"
            );
            t
        });
        thread::sleep(Duration::from_millis(50));
        assert!(!cp.is_finished());
        tx.send(()).unwrap();
        h.join().unwrap();
        let t = cp.join().unwrap();
        assert_eq!(t.seq(), 1);
        log.cp_done(t).unwrap();

        let order = Arc::new(Mutex::new(Vec::new()));
        thread::scope(|s| {
            for th in 0..4u64 {
                let (log, order) = (&log, &order);
                s.spawn(move || {
                    for i in 0..50 {
                        let len = ((th * 7 + i) % 5) as usize * 512;
                        log.append_with(&meta(i), &vec![th as u8; len], |seq| {
                            order.lock().push(seq)
                        })
                        .unwrap();
                        if log.should_cp() {
                            if let Ok(t) = log.begin_cp() {
                                log.cp_done(t).unwrap();
                            }
                        }
                    }
                });
            }
        });
        let order = order.lock();
        assert_eq!(order.len(), 200);
        assert!(
            order.windows(2).all(|w| w[0] + 1 == w[1]),
            "apply out of seq order"
        );
    }

    #[test]
    fn io_error_fails_the_log() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Power, 0);
        log.append(&meta(0), b"a").unwrap();
        m.cut_power();
        assert!(log.append(&meta(1), b"b").is_err());
        assert!(matches!(log.append(&meta(2), b"c"), Err(Error::Failed(_))));
        assert!(matches!(log.begin_cp(), Err(Error::Failed(_))));
    }

    #[test]
    fn partner_sync_syncs_only_in_power_mode() {
        for (mode, want) in [(Durability::Process, 0), (Durability::Power, 1)] {
            let m = FaultMedium::new(SMALL);
            let (log, _) = open_ready(&m, mode, 0);
            log.partner_write(0, b"rec").unwrap();
            let before = m.syncs();
            log.partner_sync().unwrap();
            assert_eq!(m.syncs() - before, want, "{mode:?}");
        }
    }

    #[test]
    fn partner_portion_bounds() {
        let m = FaultMedium::new(SMALL);
        let (log, _) = open_ready(&m, Durability::Process, 0);
        let n = log.partner_len();
        log.partner_write(n - 4, b"tail").unwrap();
        let mut b = [0u8; 4];
        log.partner_read(n - 4, &mut b).unwrap();
        assert_eq!(&b, b"tail");
        assert!(matches!(
            log.partner_write(n - 3, b"tail"),
            Err(Error::OutOfRange { .. })
        ));
        assert!(log.partner_read(u64::MAX, &mut b).is_err());
        // The partner portion is outside the local log.
        let img = m.live_image();
        assert_eq!(
            &img[(log.layout().partner_off() + n - 4) as usize..][..4],
            b"tail"
        );
    }
}
