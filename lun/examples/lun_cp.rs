//! Bench: does write-anywhere turn random 4 KiB overwrites into sequential
//! disk writes at CP time, and what does that cost sequential reads later?
//!
//! ```text
//! cargo run --release -p nvtarget-lun --example lun_cp -- [--dir DIR] [--lun-mib 1024]
//!     [--overwrite-mib 256] [--rounds 4] [--aggr-mib N] [--buffered] [--no-fio]
//! ```
//!
//! 1. Fill a fresh LUN sequentially, CP; read it sequentially (1 MiB reads).
//! 2. `rounds` x: random 4 KiB overwrites (`overwrite-mib` worth) into the
//!    dirty set, then a CP: its flush throughput (bytes written / CP time,
//!    including fdatasync) is compared with fio's sequential 1 MiB direct write
//!    on the same filesystem.
//! 3. Read the randomly overwritten LUN sequentially, compared with the fresh read.
//!
//! I/O is O_DIRECT unless `--buffered`, so reads are not served by the page cache.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench program

use nvtarget_lun::{AggrOptions, Aggregate, FileStorage};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1 << 20;

struct Opts {
    dir: PathBuf,
    lun_mib: u64,
    overwrite_mib: u64,
    rounds: u32,
    aggr_mib: Option<u64>,
    direct: bool,
    fio: bool,
}

fn parse() -> Opts {
    let mut o = Opts {
        dir: std::env::temp_dir().join("nvtarget-lun-bench"),
        lun_mib: 1024,
        overwrite_mib: 256,
        rounds: 4,
        aggr_mib: None,
        direct: true,
        fio: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--dir" => o.dir = PathBuf::from(val()),
            "--lun-mib" => o.lun_mib = val().parse().expect("number"),
            "--overwrite-mib" => o.overwrite_mib = val().parse().expect("number"),
            "--rounds" => o.rounds = val().parse().expect("number"),
            "--aggr-mib" => o.aggr_mib = Some(val().parse().expect("number")),
            "--buffered" => o.direct = false,
            "--no-fio" => o.fio = false,
            _ => panic!("unknown argument {a}"),
        }
    }
    o
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// Best of two passes (noisy disks; O_DIRECT, so no cache effect).
fn seq_read(agg: &Aggregate, lun: u32, size: u64) -> f64 {
    seq_read_once(agg, lun, size).max(seq_read_once(agg, lun, size))
}

fn seq_read_once(agg: &Aggregate, lun: u32, size: u64) -> f64 {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        agg.read(lun, off, &mut buf).expect("read");
        off += MIB;
    }
    mbps(size, t.elapsed().as_secs_f64())
}

/// fio sequential 1 MiB direct write of `size` bytes, in MiB/s.
fn fio_seq_write(dir: &std::path::Path, size: u64) -> Option<f64> {
    let file = dir.join("fio.tmp");
    let out = Command::new("fio")
        .args([
            "--name=seq",
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            "--ioengine=psync",
            "--end_fsync=1",
        ])
        .arg(format!("--size={}M", size / MIB))
        .arg(format!("--filename={}", file.display()))
        .arg("--output-format=json")
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&file);
    let json = String::from_utf8_lossy(&out.stdout);
    // Avoid a JSON dependency: the job's `"write" : {` object holds the write
    // bandwidth (`"rw" : "write"` in the options must not match).
    let w = json.match_indices("\"write\"").map(|(i, _)| i).find(|&i| {
        json[i + 7..]
            .trim_start()
            .strip_prefix(':')
            .is_some_and(|r| r.trim_start().starts_with('{'))
    })?;
    let rest = &json[w..];
    let b = rest.find("\"bw_bytes\"")?;
    let num: String = rest[b + 10..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some(num.parse::<f64>().ok()? / MIB as f64)
}

fn main() {
    let o = parse();
    std::fs::create_dir_all(&o.dir).expect("create bench dir");
    let path = o.dir.join("bench_aggr.img");
    let _ = std::fs::remove_file(&path);
    let lun_size = o.lun_mib * MIB;
    // By default large enough that the allocator never wraps into freed holes;
    // a smaller --aggr-mib with more --rounds shows the steady state.
    let aggr_size = o.aggr_mib.map_or(
        (lun_size + o.overwrite_mib * MIB * o.rounds as u64) * 5 / 4 + 64 * MIB,
        |m| m * MIB,
    );
    let storage = FileStorage::open(&path, o.direct).expect("open aggregate file");
    let agg = Aggregate::create(
        storage,
        AggrOptions {
            size_bytes: aggr_size,
            soft_threshold_pct: 95,
        },
    )
    .expect("create");
    let lun = agg.create_lun("bench", lun_size).expect("create lun");
    println!(
        "aggregate {} ({} MiB, {}), LUN {} MiB",
        path.display(),
        aggr_size / MIB,
        if o.direct { "O_DIRECT" } else { "buffered" },
        o.lun_mib
    );

    // 1. Sequential fill.
    let mut chunk = vec![0u8; MIB as usize];
    let t = Instant::now();
    for (i, off) in (0..lun_size).step_by(MIB as usize).enumerate() {
        chunk
            .iter_mut()
            .enumerate()
            .for_each(|(k, b)| *b = (k as u64 ^ i as u64) as u8);
        agg.write(lun, off, &chunk).expect("fill");
    }
    let fill_ingest = t.elapsed().as_secs_f64();
    let cp = agg.cp(1).expect("cp");
    let fill_cp = mbps(cp.data_blocks * 4096, cp.duration.as_secs_f64());
    println!(
        "fill: ingest {:.0} MiB/s, CP {} blocks in {:.2}s = {:.0} MiB/s ({} writes)",
        mbps(lun_size, fill_ingest),
        cp.data_blocks + cp.node_blocks,
        cp.duration.as_secs_f64(),
        fill_cp,
        cp.writes
    );
    let fresh_read = seq_read(&agg, lun, lun_size);
    println!("sequential read, fresh LUN: {fresh_read:.0} MiB/s");

    // 2. Random overwrites + CP.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let nblocks = lun_size / 4096;
    let mut block = vec![0u8; 4096];
    let mut cp_rates = Vec::new();
    for round in 0..o.rounds {
        let n = o.overwrite_mib * MIB / 4096;
        let t = Instant::now();
        for i in 0..n {
            block[..8].copy_from_slice(&i.to_le_bytes());
            agg.write(lun, rng.gen_range(0..nblocks) * 4096, &block)
                .expect("overwrite");
        }
        let ingest = t.elapsed().as_secs_f64();
        let cp = agg.cp(2 + round as u64).expect("cp");
        let bytes = (cp.data_blocks + cp.node_blocks) * 4096;
        let rate = mbps(bytes, cp.duration.as_secs_f64());
        cp_rates.push(rate);
        println!(
            "round {round}: {n} random 4 KiB writes at {:.0}k IOPS into the dirty set; CP wrote {} data + {} map blocks \
             in {} writes, {:.2}s (I/O {:.2}s) = {:.0} MiB/s, freed {}",
            n as f64 / ingest / 1000.0,
            cp.data_blocks,
            cp.node_blocks,
            cp.writes,
            cp.duration.as_secs_f64(),
            cp.io_duration.as_secs_f64(),
            rate,
            cp.freed_blocks
        );
    }
    // Median: the VM disks this runs on are noisy.
    cp_rates.sort_by(f64::total_cmp);
    let cp_rate = cp_rates.get(cp_rates.len() / 2).copied().unwrap_or(0.0);

    // 3. Sequential read of the fragmented LUN.
    let frag_read = seq_read(&agg, lun, lun_size);
    println!("sequential read, randomly overwritten LUN: {frag_read:.0} MiB/s");
    // 4. Hot-path figures: 4 KiB random writes into the dirty set and random
    //    reads of clean data (one pread each), 4 threads.
    let threads = 4u64;
    let per = 50_000u64;
    let t = Instant::now();
    let done: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|th| {
                let agg = &agg;
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(th);
                    let b = vec![th as u8; 4096];
                    for i in 0..per {
                        match agg.write(lun, rng.gen_range(0..nblocks) * 4096, &b) {
                            Ok(()) => {}
                            // A small --aggr-mib can run out of room for this many
                            // dirty blocks: count what was accepted.
                            Err(nvtarget_lun::Error::NoSpace) => return i,
                            Err(e) => panic!("write: {e}"),
                        }
                    }
                    per
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("writer")).sum()
    });
    let w_iops = done as f64 / t.elapsed().as_secs_f64();
    agg.cp(100).expect("cp");
    let per_r = 10_000u64;
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads {
            let agg = &agg;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + th);
                let mut b = vec![0u8; 4096];
                for _ in 0..per_r {
                    agg.read(lun, rng.gen_range(0..nblocks) * 4096, &mut b)
                        .expect("read");
                }
            });
        }
    });
    let r_iops = (threads * per_r) as f64 / t.elapsed().as_secs_f64();
    println!(
        "4 KiB random writes into the dirty set, {threads} threads: {:.0}k IOPS; random reads of clean data, {threads} threads: {:.0}k IOPS",
        w_iops / 1000.0,
        r_iops / 1000.0
    );
    // Mount (walks every map node to rebuild reference counts) and check
    // (reads and verifies every block) on the now fully written LUN.
    drop(agg);
    let t = Instant::now();
    let agg = Aggregate::open(FileStorage::open(&path, o.direct).expect("open")).expect("mount");
    let mount = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let check = agg.check();
    println!(
        "mount {:.2}s, check {:.2}s ({} data + {} map blocks)",
        mount,
        t.elapsed().as_secs_f64(),
        check.data_blocks,
        check.node_blocks
    );
    println!(
        "check: {}",
        if check.is_clean() {
            "clean".to_string()
        } else {
            check.to_string()
        }
    );
    drop(agg);
    let _ = std::fs::remove_file(&path);

    let fio = if o.fio {
        fio_seq_write(&o.dir, lun_size)
    } else {
        None
    };
    println!();
    println!("| measure | nvtarget-lun | reference | ratio |");
    println!("|---|---|---|---|");
    match fio {
        Some(f) => println!(
            "| CP flush of random 4 KiB overwrites (median of rounds) vs fio seq write 1M direct | {cp_rate:.0} MiB/s | {f:.0} MiB/s | {:.2} |",
            cp_rate / f
        ),
        None => println!("| CP flush of random 4 KiB overwrites vs fio seq write | {cp_rate:.0} MiB/s | (fio not run) | - |"),
    }
    println!(
        "| seq read: randomly overwritten vs fresh LUN | {frag_read:.0} MiB/s | {fresh_read:.0} MiB/s | {:.2} |",
        frag_read / fresh_read
    );
}
