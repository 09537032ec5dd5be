//! `nvtarget snapshot create|list|delete|restore|clone` and `nvtarget aggr
//! check|space`, as library functions plus their clap argument types; the
//! binary (src/main.rs) wires them under its own `--data-dir`.
//!
//! The aggregate lives at `DATA_DIR/aggr0.img`. These commands open it
//! directly, so they must not run while a `serve` process has it open (no
//! cross-process lock yet: see the crate report).

use crate::aggregate::{AggrOptions, Aggregate};
use crate::storage::FileStorage;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const AGGR_FILE: &str = "aggr0.img";
/// Size of a new aggregate file (sparse: takes no space until written).
pub const DEFAULT_AGGR_SIZE: u64 = 8 << 30;
pub const DEFAULT_LUN_NAME: &str = "default";
pub const DEFAULT_LUN_SIZE: u64 = 1 << 30;

pub fn aggr_path(data_dir: &Path) -> PathBuf {
    data_dir.join(AGGR_FILE)
}

/// Opens `DATA_DIR/aggr0.img`; on first use creates it (sparse, 8 GiB) with
/// a 1 GiB thin LUN named "default" (512-byte logical blocks), also created
/// if the aggregate has no LUN at all. For `serve`.
pub fn open_or_create(data_dir: &Path) -> anyhow::Result<Aggregate> {
    let path = aggr_path(data_dir);
    let exists = std::fs::metadata(&path)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if exists {
        let agg = open_existing(data_dir)?;
        // A crash between formatting and creating the LUN leaves an empty
        // aggregate: finish the job.
        if agg.luns().is_empty() {
            agg.create_lun(DEFAULT_LUN_NAME, DEFAULT_LUN_SIZE)?;
        }
        return Ok(agg);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let storage =
        FileStorage::open(&path, false).with_context(|| format!("opening {}", path.display()))?;
    let agg = Aggregate::create(
        storage,
        AggrOptions {
            size_bytes: DEFAULT_AGGR_SIZE,
            ..Default::default()
        },
    )
    .with_context(|| format!("creating aggregate {}", path.display()))?;
    agg.create_lun(DEFAULT_LUN_NAME, DEFAULT_LUN_SIZE)?;
    Ok(agg)
}

/// Opens an existing `DATA_DIR/aggr0.img`.
pub fn open_existing(data_dir: &Path) -> anyhow::Result<Aggregate> {
    let path = aggr_path(data_dir);
    if !path.exists() {
        bail!(
            "no aggregate at {} (run `nvtarget serve` once to create it)",
            path.display()
        );
    }
    let storage =
        FileStorage::open(&path, false).with_context(|| format!("opening {}", path.display()))?;
    Aggregate::open(storage).with_context(|| format!("mounting aggregate {}", path.display()))
}

#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum SnapshotCmd {
    /// Snapshot a LUN (O(1); shares all blocks until they are overwritten).
    Create { lun: String, name: String },
    /// List snapshots, of one LUN or of all.
    List { lun: Option<String> },
    /// Delete a snapshot, freeing blocks nothing else references.
    Delete { lun: String, name: String },
    /// Roll a LUN back to a snapshot (contents and size).
    Restore { lun: String, name: String },
    /// Create a new writable LUN from a snapshot.
    Clone {
        lun: String,
        snapshot: String,
        new_lun: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct AggrArgs {
    #[command(subcommand)]
    pub cmd: AggrCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AggrCmd {
    /// Verify the whole aggregate: reachability, reference counts, checksums.
    Check,
    /// Space accounting: aggregate and per LUN.
    Space,
}

fn lun_id(agg: &Aggregate, name: &str) -> anyhow::Result<u32> {
    match agg.lun_by_name(name) {
        Some(l) => Ok(l.id),
        None => bail!("no LUN named {name:?}"),
    }
}

pub fn snapshot_cmd(data_dir: &Path, args: SnapshotArgs) -> anyhow::Result<()> {
    let agg = open_existing(data_dir)?;
    snapshot_cmd_on(&agg, args, &mut std::io::stdout())
}

/// `snapshot_cmd` on an open aggregate, printing to `out` (tests).
pub fn snapshot_cmd_on(
    agg: &Aggregate,
    args: SnapshotArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match args.cmd {
        SnapshotCmd::Create { lun, name } => {
            agg.snapshot_create(lun_id(agg, &lun)?, &name)?;
            writeln!(out, "created snapshot {name} of LUN {lun}")?;
        }
        SnapshotCmd::List { lun } => {
            let filter = lun.as_deref().map(|l| lun_id(agg, l)).transpose()?;
            let names: std::collections::HashMap<u32, String> =
                agg.luns().into_iter().map(|l| (l.id, l.name)).collect();
            writeln!(
                out,
                "{:<20} {:<20} {:>10} {:>14} {:>14}",
                "LUN", "SNAPSHOT", "CP", "SIZE", "MAPPED"
            )?;
            for s in agg.snapshot_list(filter) {
                let lun = names.get(&s.lun).map_or("?", String::as_str);
                writeln!(
                    out,
                    "{:<20} {:<20} {:>10} {:>14} {:>14}",
                    lun,
                    s.name,
                    s.generation,
                    s.size_bytes,
                    s.mapped_blocks * crate::BLOCK_SIZE as u64
                )?;
            }
        }
        SnapshotCmd::Delete { lun, name } => {
            agg.snapshot_delete(lun_id(agg, &lun)?, &name)?;
            writeln!(out, "deleted snapshot {name} of LUN {lun}")?;
        }
        SnapshotCmd::Restore { lun, name } => {
            agg.snapshot_restore(lun_id(agg, &lun)?, &name)?;
            writeln!(out, "restored LUN {lun} to snapshot {name}")?;
        }
        SnapshotCmd::Clone {
            lun,
            snapshot,
            new_lun,
        } => {
            agg.clone_lun(lun_id(agg, &lun)?, &snapshot, &new_lun)?;
            writeln!(
                out,
                "cloned LUN {new_lun} from snapshot {snapshot} of LUN {lun}"
            )?;
        }
    }
    Ok(())
}

pub fn aggr_cmd(data_dir: &Path, args: AggrArgs) -> anyhow::Result<()> {
    match args.cmd {
        AggrCmd::Check => aggr_check_cmd(data_dir),
        AggrCmd::Space => {
            let agg = open_existing(data_dir)?;
            aggr_space_on(&agg, &mut std::io::stdout())
        }
    }
}

/// `nvtarget aggr check`: prints the report; fails if it found errors.
pub fn aggr_check_cmd(data_dir: &Path) -> anyhow::Result<()> {
    let agg = open_existing(data_dir)?;
    aggr_check_on(&agg, &mut std::io::stdout())
}

pub fn aggr_check_on(agg: &Aggregate, out: &mut dyn Write) -> anyhow::Result<()> {
    aggr_check_with(agg, out, &mut |_, _, _| {})
}

/// `aggr_check_on` reporting progress as `Aggregate::check_with_progress`.
pub fn aggr_check_with(
    agg: &Aggregate,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> anyhow::Result<()> {
    let r = agg.check_with_progress(progress);
    writeln!(out, "{r}")?;
    if !r.is_clean() {
        bail!("aggregate check found {} errors", r.error_count);
    }
    Ok(())
}

pub fn aggr_space_on(agg: &Aggregate, out: &mut dyn Write) -> anyhow::Result<()> {
    let s = agg.space();
    let mib = |blocks: u64| blocks * s.block_size / (1 << 20);
    writeln!(
        out,
        "aggregate: {} MiB total, {} MiB used, {} MiB reserved, {} MiB available, soft threshold {}%{}",
        mib(s.total_blocks),
        mib(s.used_blocks),
        mib(s.reserved_blocks),
        mib(s.available_blocks),
        s.soft_threshold_pct,
        if s.soft_threshold_reached { " (REACHED)" } else { "" }
    )?;
    writeln!(out, "{:<20} {:>14} {:>14}", "LUN", "SIZE", "MAPPED")?;
    for l in s.luns {
        writeln!(
            out,
            "{:<20} {:>14} {:>14}",
            l.name,
            l.size_bytes,
            l.mapped_blocks * s.block_size
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }
    #[derive(Subcommand)]
    enum Top {
        Snapshot(SnapshotArgs),
        Aggr(AggrArgs),
    }

    /// The wiring suggested for src/main.rs: `--data-dir` (global, so it may
    /// follow the inner subcommand: `nvtarget aggr check --data-dir DIR`).
    #[derive(Parser)]
    struct MainLike {
        #[command(subcommand)]
        cmd: MainCmd,
    }
    #[derive(Subcommand)]
    enum MainCmd {
        Snapshot {
            #[arg(long, global = true, default_value = "nvtarget-data")]
            data_dir: PathBuf,
            #[command(flatten)]
            args: SnapshotArgs,
        },
        Aggr {
            #[arg(long, global = true, default_value = "nvtarget-data")]
            data_dir: PathBuf,
            #[command(flatten)]
            args: AggrArgs,
        },
    }

    #[test]
    fn main_style_wiring_parses() {
        let p = MainLike::try_parse_from([
            "nvtarget",
            "snapshot",
            "--data-dir",
            "/d",
            "clone",
            "default",
            "s1",
            "c1",
        ])
        .unwrap();
        match p.cmd {
            MainCmd::Snapshot { data_dir, args } => {
                assert_eq!(data_dir, PathBuf::from("/d"));
                assert!(
                    matches!(args.cmd, SnapshotCmd::Clone { ref new_lun, .. } if new_lun == "c1")
                );
            }
            MainCmd::Aggr { .. } => panic!(),
        }
        let p =
            MainLike::try_parse_from(["nvtarget", "aggr", "check", "--data-dir", "/d"]).unwrap();
        assert!(matches!(
            p.cmd,
            MainCmd::Aggr {
                args: AggrArgs {
                    cmd: AggrCmd::Check
                },
                ..
            }
        ));
    }

    fn snap(agg: &Aggregate, argv: &[&str]) -> anyhow::Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("nvtarget").chain(argv.iter().copied()))?;
        let mut out = Vec::new();
        match cli.cmd {
            Top::Snapshot(a) => snapshot_cmd_on(agg, a, &mut out)?,
            Top::Aggr(_) => aggr_check_on(agg, &mut out)?,
        }
        Ok(String::from_utf8(out)?)
    }

    #[test]
    fn cli_on_a_real_file() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("nvtarget-lun-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let agg = open_or_create(&dir)?;
        let l = agg.lun_by_name(DEFAULT_LUN_NAME).expect("default LUN").id;
        agg.write(l, 0, &[1u8; 4096])?;
        snap(&agg, &["snapshot", "create", "default", "monday"])?;
        agg.write(l, 0, &[2u8; 4096])?;
        agg.cp(1)?;
        let list = snap(&agg, &["snapshot", "list"])?;
        assert!(list.contains("monday"), "{list}");
        snap(&agg, &["snapshot", "clone", "default", "monday", "copy"])?;
        snap(&agg, &["snapshot", "restore", "default", "monday"])?;
        assert!(snap(&agg, &["snapshot", "delete", "default", "nope"]).is_err());
        let check = snap(&agg, &["aggr", "check"])?;
        assert!(check.contains("clean"), "{check}");
        drop(agg);
        // Reopen from the file: state survived.
        let agg = open_or_create(&dir)?;
        let mut b = [0u8; 4096];
        agg.read(agg.lun_by_name("default").expect("lun").id, 0, &mut b)?;
        assert_eq!(b, [1u8; 4096]);
        assert!(agg.lun_by_name("copy").is_some());
        // Sparse: 8 GiB file, little allocated.
        let md = std::fs::metadata(aggr_path(&dir))?;
        assert_eq!(md.len(), DEFAULT_AGGR_SIZE);
        use std::os::unix::fs::MetadataExt;
        assert!(md.blocks() * 512 < 64 << 20);
        drop(agg);
        aggr_check_cmd(&dir)?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
