//! `nvtarget nvram dump`: a read-only, human-readable view of a region.
//!
//! Opens the file read-only (never formats, extends or writes), runs the same
//! scan as a restart and prints the halves, every record of each half's
//! current use, where and why each scan stopped, and what a restart would
//! replay.

use crate::error::{Error, Result};
use crate::layout::{Layout, REGION_HEADER_LEN};
use crate::medium::LogMedium;
use crate::record::Seq;
use crate::scan::{self, HalfScan, RecordInfo};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A read-only view of a file, shorter than the layout if truncated.
struct ReadOnly {
    file: File,
    len: u64,
}

impl LogMedium for ReadOnly {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("dump is read-only"))
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prints the log in the region file `path`. `committed_seq`: the store's
/// committed seq (its `highest_seq`); without it, the replay shown assumes
/// only what the log itself records (the halves' pruned seqs).
pub fn dump(path: &Path, out: &mut dyn Write, committed_seq: Option<Seq>) -> Result<()> {
    let w = |e: std::io::Error| Error::Io {
        context: "writing the dump",
        source: e,
    };
    let file = File::open(path).map_err(Error::io("opening the region file"))?;
    let len = file
        .metadata()
        .map_err(Error::io("stat of the region file"))?
        .len();
    let medium = ReadOnly { file, len };
    let mut hdr = vec![0u8; len.min(REGION_HEADER_LEN) as usize];
    medium
        .read_at(0, &mut hdr)
        .map_err(Error::io("reading the region header"))?;
    let Some(layout) = Layout::decode_header(&hdr)? else {
        writeln!(out, "{}: blank region (never formatted)", path.display()).map_err(w)?;
        return Ok(());
    };
    writeln!(
        out,
        "region {}: size {} (file {}), half size {}, local at {}, partner at {} ({} bytes)",
        path.display(),
        layout.size,
        len,
        layout.half_size,
        layout.local_off(),
        layout.partner_off(),
        layout.partner_len()
    )
    .map_err(w)?;
    let truncated = (len < layout.size).then_some(len);
    if let Some(l) = truncated {
        writeln!(
            out,
            "TRUNCATED: file is {l} bytes, layout needs {}",
            layout.size
        )
        .map_err(w)?;
    }
    let halves = [
        scan::scan_half(&medium, &layout, 0)?,
        scan::scan_half(&medium, &layout, 1)?,
    ];
    for h in &halves {
        print_half(out, &layout, h).map_err(w)?;
    }
    let (report, replay) = scan::plan(layout, halves, committed_seq.unwrap_or(0), truncated);
    writeln!(out).map_err(w)?;
    match committed_seq {
        Some(c) => writeln!(out, "store committed seq: {c}").map_err(w)?,
        None => writeln!(
            out,
            "store committed seq: not given (pass the aggregate's highest_seq)"
        )
        .map_err(w)?,
    }
    writeln!(
        out,
        "replay floor (max of committed and pruned seq): {}",
        report.floor
    )
    .map_err(w)?;
    match report.replay_range {
        Some((a, b)) => writeln!(
            out,
            "a restart would replay {} record(s): seq {a}..={b}",
            replay.len()
        )
        .map_err(w)?,
        None => writeln!(out, "a restart would replay nothing").map_err(w)?,
    }
    writeln!(out, "next seq after restart: {}", report.max_seen_seq + 1).map_err(w)?;
    let problems = report.problems();
    if problems.is_empty() {
        writeln!(out, "status: clean").map_err(w)?;
    } else {
        for p in problems {
            writeln!(out, "PROBLEM: {p}").map_err(w)?;
        }
    }
    Ok(())
}

fn print_half(out: &mut dyn Write, layout: &Layout, h: &HalfScan) -> std::io::Result<()> {
    writeln!(out)?;
    match &h.header {
        Some(hh) => writeln!(
            out,
            "half {} at {}: {:?}, generation {}, first seq {}, pruned seq {}, header writes {}",
            h.half,
            layout.half_off(h.half),
            hh.state,
            hh.generation,
            hh.first_seq,
            hh.pruned_seq,
            hh.counter
        )?,
        None => writeln!(
            out,
            "half {} at {}: NO VALID HEADER",
            h.half,
            layout.half_off(h.half)
        )?,
    }
    match (h.first_seq(), h.last_seq()) {
        (Some(a), Some(b)) => writeln!(out, "  {} record(s), seq {a}..={b}", h.records.len())?,
        _ => writeln!(out, "  no records")?,
    }
    for r in &h.records {
        print_record(out, r)?;
    }
    writeln!(out, "  stopped at offset {}: {}", h.stop_offset, h.stop)?;
    Ok(())
}

fn print_record(out: &mut dyn Write, r: &RecordInfo) -> std::io::Result<()> {
    let m = &r.meta;
    if m.op.is_data() {
        writeln!(
            out,
            "  seq {:>10} {:<18} lun {:>4} lba {}..{} ({} blocks) len {} cp_gen {} @ {}",
            r.seq,
            m.op.to_string(),
            m.lun,
            m.lba,
            m.lba.saturating_add(u64::from(m.blocks)),
            m.blocks,
            r.data_len,
            m.cp_gen,
            r.offset
        )
    } else {
        writeln!(
            out,
            "  seq {:>10} {:<18} lun {:>4} payload {} bytes cp_gen {} @ {}",
            r.seq,
            m.op.to_string(),
            m.lun,
            r.data_len,
            m.cp_gen,
            r.offset
        )
    }
}
