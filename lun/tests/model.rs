//! Property test: over random operation sequences (writes, unmaps, CPs,
//! snapshots, restores, clones, resizes, LUN create/delete, clean remounts and
//! power losses), the store reads back exactly what a simple in-memory model
//! says, and `check` stays clean.

#![allow(clippy::unwrap_used)] // test helpers; clippy.toml allows unwrap in tests

mod common;
use common::*;
use nvtarget_lun::{Aggregate, CrashMode, FaultStorage};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    /// Clean shutdown: CP, then mount again.
    Remount,
    /// Power loss: mount what was synced; the model falls back to the last CP.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    let lun = 0usize..4;
    prop_oneof![
        30 => (lun.clone(), 0u64..4000, 1u64..40, any::<u64>())
            .prop_map(|(lun, sector, sectors, seed)| Step::Op(Op::Write { lun, sector, sectors, seed })),
        8 => (lun.clone(), 0u64..4000, 1u64..300).prop_map(|(lun, sector, sectors)| Step::Op(Op::Unmap { lun, sector, sectors })),
        10 => Just(Step::Op(Op::Cp)),
        5 => lun.clone().prop_map(|lun| Step::Op(Op::SnapCreate { lun })),
        3 => (lun.clone(), 0usize..4).prop_map(|(lun, snap)| Step::Op(Op::SnapDelete { lun, snap })),
        2 => (lun.clone(), 0usize..4).prop_map(|(lun, snap)| Step::Op(Op::SnapRestore { lun, snap })),
        2 => (lun.clone(), 0usize..4).prop_map(|(lun, snap)| Step::Op(Op::Clone { lun, snap })),
        2 => (lun.clone(), 1u64..3000).prop_map(|(lun, sectors)| Step::Op(Op::Grow { lun, sectors })),
        1 => (1u64..2000).prop_map(|sectors| Step::Op(Op::CreateLun { sectors })),
        1 => lun.prop_map(|lun| Step::Op(Op::DeleteLun { lun })),
        2 => Just(Step::Remount),
        2 => Just(Step::Crash),
    ]
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let (mut fs, mut agg) = new_mem(4096);
    let mut model = Model::default();
    let mut committed = Model::default();
    let mut counter = 0;
    for op in [
        Op::CreateLun { sectors: 2600 },
        Op::CreateLun { sectors: 40 },
    ] {
        apply(&agg, &mut model, &op, &mut counter).unwrap();
    }
    committed.clone_from(&model);
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Op(op) => {
                if apply(&agg, &mut model, op, &mut counter)
                    .map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?
                {
                    committed = model.clone();
                }
            }
            Step::Remount => {
                agg.cp(counter).unwrap();
                model.highest_seq = model.highest_seq.max(counter);
                committed = model.clone();
                drop(agg);
                fs = FaultStorage::new(fs.crash_image(CrashMode::DropUnsynced));
                agg = Aggregate::open(fs.clone()).unwrap();
            }
            Step::Crash => {
                drop(agg);
                fs = FaultStorage::new(fs.crash_image(CrashMode::DropUnsynced));
                agg = Aggregate::open(fs.clone()).unwrap();
                model = committed.clone();
            }
        }
        // Reads see the model (dirty and committed data).
        let got = dump(&agg);
        prop_assert!(
            got.diff(&model).is_none(),
            "step {i} {s:?}: {:?}",
            got.diff(&model)
        );
    }
    let r = agg.check();
    prop_assert!(r.is_clean(), "{r}");
    agg.cp(counter + 1).unwrap();
    let r = agg.check();
    prop_assert!(r.is_clean(), "{r}");
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    // PROPTEST_CASES=N overrides the default for longer runs by hand.
    #![proptest_config(ProptestConfig::with_cases(cases(128)))]
    #[test]
    fn store_matches_model(steps in proptest::collection::vec(step(), 1..80)) {
        run(steps)?;
    }
}
