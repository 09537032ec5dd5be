//! `nvtarget drill` end to end: a real pair, real kills, a real cut.
//!
//! Each test runs the drill binary as an operator would and holds it to its
//! exit status and its totals line: every round ok, nothing lost. The drill
//! itself stops the nodes it started, even when it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn drill(dir: &Path, fault: &str, rounds: u32, load_secs: u32) -> Output {
    let port = free_port();
    run(
        Command::new(binary())
            .arg("drill")
            .arg("--data-dir")
            .arg(dir)
            .args(["--port", &port.to_string(), "--fault", fault])
            .args(["--rounds", &rounds.to_string()])
            .args(["--load-secs", &load_secs.to_string()]),
        // Generous: debug builds, two nodes and the load on shared cores.
        Duration::from_secs(900),
    )
}

/// The node logs, for a failure message.
fn node_logs(dir: &Path) -> String {
    ["a", "b"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {n}.log (tail) ---\n{}\n", tail.join("\n"))
        })
        .collect()
}

fn assert_clean(out: &Output, dir: &Path, fault: &str, rounds: u32) {
    let text = both(out);
    let so = stdout(out);
    assert!(
        out.status.success(),
        "drill {fault} failed ({})\n{text}\n{}",
        out.status,
        node_logs(dir)
    );
    let summary = format!("drill {fault}: {rounds} rounds, {rounds} ok, 0 failed");
    assert!(so.contains(&summary), "no `{summary}` in\n{text}");
    let total = so
        .lines()
        .find(|l| l.starts_with("total: "))
        .unwrap_or_else(|| panic!("no totals line in\n{text}"));
    // Each count is followed by ", " or ends the line.
    let fields: Vec<&str> = total
        .trim_start_matches("total: ")
        .split(", ")
        .map(str::trim)
        .collect();
    for zero in ["lost 0", "garbage 0", "stale-reads 0", "bad-reads 0"] {
        assert!(
            fields.contains(&zero),
            "`{total}` does not say {zero}\n{text}"
        );
    }
    let acked: u64 = fields
        .iter()
        .find_map(|f| f.strip_prefix("acked "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no acked count in `{total}`"));
    assert!(acked > 0, "the load wrote nothing: `{total}`\n{text}");
    let round_lines = so.lines().filter(|l| l.starts_with("round ")).count();
    assert_eq!(round_lines, rounds as usize, "{text}");
    assert!(so.lines().any(|l| l == "PASS"), "{text}");
}

#[test]
fn kill_owner_five_rounds_lose_nothing() {
    let dir = temp_dir("drill-kill-owner");
    let out = drill(&dir, "kill-owner", 5, 2);
    assert_clean(&out, &dir, "kill-owner", 5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The interconnect is cut under load and healed: the owner keeps serving
/// (unmirrored, after its mailbox check), nobody takes over, no epoch moves,
/// and both nodes are mirrored again after the heal (the drill checks each).
#[test]
fn cut_interconnect_three_rounds_no_takeover_no_loss() {
    let dir = temp_dir("drill-cut");
    let out = drill(&dir, "cut-interconnect", 3, 2);
    assert_clean(&out, &dir, "cut-interconnect", 3);
    let so = stdout(&out);
    // No round may report a takeover or a giveback.
    for l in so.lines().filter(|l| l.starts_with("round ")) {
        assert!(l.contains("takeover -,"), "a takeover during a cut: {l}");
        assert!(l.contains("giveback -"), "a giveback during a cut: {l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The partner (b) dies while the load runs on a: a stops waiting for the
/// mirror, takes b over, and gives it back when b returns.
#[test]
fn kill_partner_two_rounds_lose_nothing() {
    let dir = temp_dir("drill-kill-partner");
    let out = drill(&dir, "kill-partner", 2, 2);
    assert_clean(&out, &dir, "kill-partner", 2);
    let _ = std::fs::remove_dir_all(&dir);
}
