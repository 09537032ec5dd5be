//! libiscsi's conformance suite (`iscsi-test-cu`, families SCSI and iSCSI,
//! with --dataloss) against a real `nvtarget serve` process.
//!
//! The test fails on any failing or crashing test case that is not listed in
//! `tests/conformance-known-failures.txt`, and also when a listed case now
//! passes, so the list only ever shrinks and always says the truth. Skips are
//! printed with libiscsi's reason.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
    Crash,
}

/// Reads CUnit's verbose output: "  Test: NAME ...passed|FAILED", with the
/// test's own prints (libiscsi's "[SKIPPED]") possibly between the two.
fn parse(log: &str) -> Vec<(String, Outcome, String)> {
    let mut out = Vec::new();
    let mut suite = String::new();
    let mut cur: Option<(String, Option<bool>, String)> = None;
    let close = |cur: &mut Option<(String, Option<bool>, String)>, out: &mut Vec<_>| {
        if let Some((name, res, text)) = cur.take() {
            let o = match res {
                None => Outcome::Crash,
                Some(false) => Outcome::Fail,
                Some(true) if text.contains("[SKIPPED]") => Outcome::Skip,
                Some(true) => Outcome::Pass,
            };
            out.push((name, o, text));
        }
    };
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("  Test: ") {
            close(&mut cur, &mut out);
            let (test, tail) = rest.split_once(" ...").unwrap_or((rest, ""));
            let name = if suite.is_empty() || test.contains('.') {
                test.to_string()
            } else {
                format!("{suite}.{test}")
            };
            let res = if tail.starts_with("passed") {
                Some(true)
            } else if tail.starts_with("FAILED") {
                Some(false)
            } else {
                None
            };
            cur = Some((name, res, tail.to_string()));
            continue;
        }
        if let Some(s) = line.strip_prefix("Suite: ") {
            close(&mut cur, &mut out);
            suite = s.trim().to_string();
            continue;
        }
        if line.starts_with("Run Summary:") {
            close(&mut cur, &mut out);
            continue;
        }
        if let Some((_, res, text)) = cur.as_mut() {
            if res.is_none() && line.starts_with("passed") {
                *res = Some(true);
            } else if res.is_none() && line.starts_with("FAILED") {
                *res = Some(false);
            } else if text.len() < 4000 {
                text.push(' ');
                text.push_str(line.trim());
            }
        }
    }
    close(&mut cur, &mut out);
    out
}

fn known_failures() -> BTreeMap<String, String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance-known-failures.txt"
    );
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, why) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (name.to_string(), why.trim().to_string())
        })
        .collect()
}

type Results = Vec<(String, Outcome, String)>;

/// Runs `iscsi-test-cu -t SELECTOR` against `url`; with `multipath` the URL
/// is given twice, which enables the MultipathIO tests (a second session to
/// the same LU). Names come back qualified with the family.
fn run_suites(
    target: &Target,
    dir: &Path,
    url: &str,
    multipath: bool,
    selectors: &[&str],
) -> (Results, String) {
    let mut results = Vec::new();
    let mut logs = String::new();
    for selector in selectors {
        let family = selector.split('.').next().unwrap_or(selector);
        let out = run(
            Command::new("iscsi-test-cu")
                .current_dir(dir)
                .args([
                    "--dataloss",
                    "--allow-sanitize",
                    "-i",
                    INIT1,
                    "-I",
                    INIT2,
                    "-t",
                ])
                .arg(selector)
                .arg(url)
                .args(multipath.then_some(url)),
            Duration::from_secs(900),
        );
        let text = both(&out);
        let parsed = parse(&text);
        assert!(
            !parsed.is_empty(),
            "iscsi-test-cu -t {selector} ran no test:\n{text}\ntarget log:\n{}",
            target.log_text()
        );
        // CUnit names suites without the family: "Suite: Read10".
        results.extend(
            parsed
                .into_iter()
                .map(|(name, o, text)| (format!("{family}.{name}"), o, text)),
        );
        logs.push_str(&text);
    }
    (results, logs)
}

/// Prints every non-pass and a summary line; fails on failures that are not
/// in the known list and on known ones that now pass.
fn judge(label: &str, results: &Results, log: &Path) {
    let known = known_failures();
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    let mut unexpected = Vec::new();
    let mut fixed = Vec::new();
    for (name, o, text) in results {
        match o {
            Outcome::Pass => pass += 1,
            Outcome::Skip => {
                skip += 1;
                let why = text
                    .find("[SKIPPED]")
                    .map(|i| &text[i..(i + 160).min(text.len())])
                    .unwrap_or("");
                println!("SKIP {name}: {why}");
            }
            Outcome::Fail | Outcome::Crash => {
                fail += 1;
                println!("{o:?} {name}: {}", &text[..text.len().min(400)]);
                if !known.contains_key(name) {
                    unexpected.push(name.clone());
                }
            }
        }
        if *o == Outcome::Pass && known.contains_key(name) {
            fixed.push(name.clone());
        }
    }
    println!(
        "{label}: {pass} passed, {fail} failed, {skip} skipped of {}",
        results.len()
    );
    assert!(
        unexpected.is_empty(),
        "conformance failures not in tests/conformance-known-failures.txt: {unexpected:?}\n(full log: {})",
        log.display()
    );
    assert!(
        fixed.is_empty(),
        "these now pass: remove them from tests/conformance-known-failures.txt: {fixed:?}"
    );
}

/// Both families against `nvtarget serve` exactly as a user starts it.
/// (With the multipath URL pair for the whole family, SCSI.Sanitize.Reset
/// sees TEST UNIT READY answered after the SANITIZE ended: open, see the
/// closing note of issue 2.)
#[test]
fn libiscsi_conformance() {
    require_tool("iscsi-test-cu");
    let dir = temp_dir("conformance");
    let target = Target::start(&dir, &[]);
    let url = target.url(0);
    // The standard run (one URL), then MultipathIO with a second session to
    // the same LU, which it needs and which the standard run skips.
    let (mut results, mut logs) = run_suites(&target, &dir, &url, false, &["SCSI", "iSCSI"]);
    let (mpath, l) = run_suites(&target, &dir, &url, true, &["SCSI.MultipathIO"]);
    results.retain(|(name, _, _)| !name.starts_with("SCSI.MultipathIO."));
    results.extend(mpath);
    logs.push_str(&l);
    std::fs::write(dir.join("cu.log"), &logs).ok();
    judge("conformance", &results, &dir.join("cu.log"));
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The suites that skip unless the LU is removable or write-protected, run
/// against such LUNs (tests/conformance-lus.toml).
#[test]
fn libiscsi_conformance_removable_and_readonly_luns() {
    require_tool("iscsi-test-cu");
    let dir = temp_dir("conformance-lus");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance-lus.toml");
    let target = Target::start(&dir, &["--config", cfg]);
    let (mut results, mut logs) = run_suites(
        &target,
        &dir,
        &target.url(1),
        false,
        &["SCSI.PreventAllow", "SCSI.StartStopUnit"],
    );
    let (r, l) = run_suites(&target, &dir, &target.url(2), false, &["SCSI.ReadOnly"]);
    results.extend(r);
    logs.push_str(&l);
    std::fs::write(dir.join("cu.log"), &logs).ok();
    for (name, o, _) in &results {
        assert_ne!(
            *o,
            Outcome::Skip,
            "{name} still skips on a removable or read-only LU"
        );
    }
    judge(
        "conformance (removable and read-only LUNs)",
        &results,
        &dir.join("cu.log"),
    );
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parser_reads_cunit_output() {
    let log = "Suite: SCSI.Read10\n  Test: Simple ...passed\n  Test: Bad ...\n[FAILED] x\nFAILED\n    1. foo.c:1  - bar\nSuite: SCSI.Unmap\n  Test: Simple ...\n[SKIPPED] LUN is not thin\npassed\nSuite: SCSI.X\n  Test: Y ...\nRun Summary: ...\n";
    let r = parse(log);
    let o: Vec<_> = r.iter().map(|(n, o, _)| (n.as_str(), *o)).collect();
    assert_eq!(
        o,
        vec![
            ("SCSI.Read10.Simple", Outcome::Pass),
            ("SCSI.Read10.Bad", Outcome::Fail),
            ("SCSI.Unmap.Simple", Outcome::Skip),
            ("SCSI.X.Y", Outcome::Crash),
        ]
    );
}
