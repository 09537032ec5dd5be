//! What a running node reports about itself: the live status behind
//! `nvtarget status` (sent over the admin socket) and the scrape-time
//! collectors that copy the same state into the metrics.
//!
//! Everything here reads state owned elsewhere (the node's targets, the
//! portal's session table, the store and its log, the files the HA thread
//! writes); nothing here changes it.

use std::path::Path;
use std::sync::{Arc, Weak};

use serde_json::{json, Value};

use crate::config::Backend;
use crate::metrics::{HalfLabel, Metrics, StateLabel, StepLabel, TargetLabel, HA_STATES};
use crate::node::{Node, TargetView};

/// Where the node was started from, for the report.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    /// The configuration file given with `--config`, if any.
    pub config: Option<String>,
    /// Where live changes are saved.
    pub saved_to: String,
    pub metrics: Option<String>,
}

fn read_json(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn alua_name(s: nvtarget_scsi::AluaState) -> &'static str {
    use nvtarget_scsi::AluaState as A;
    match s {
        A::ActiveOptimized => "active/optimized",
        A::ActiveNonOptimized => "active/non-optimized",
        A::Standby => "standby",
        A::Unavailable => "unavailable",
        A::Offline => "offline",
        A::Transitioning => "transitioning",
    }
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Store => "store",
        Backend::File => "file",
        Backend::Memory => "memory",
    }
}

fn target_json(t: &TargetView) -> Value {
    let space = t.store.as_ref().map(|s| s.aggregate().space());
    let luns: Vec<Value> = t
        .luns
        .iter()
        .map(|l| {
            let size = crate::config::parse_size(&l.size).unwrap_or(0);
            let (used, snapshots) = match (l.backend, &t.store, &space) {
                (Backend::Store, Some(store), Some(space)) => {
                    let aggr = store.aggregate();
                    match aggr.lun_by_name(&l.name()) {
                        Some(info) => {
                            let blocks = space
                                .luns
                                .iter()
                                .find(|s| s.id == info.id)
                                .map_or(info.mapped_blocks, |s| s.mapped_blocks + s.dirty_blocks);
                            let snaps: Vec<Value> = aggr
                                .snapshot_list(Some(info.id))
                                .into_iter()
                                .map(|s| json!({"name": s.name, "generation": s.generation}))
                                .collect();
                            (Some(blocks * space.block_size), snaps)
                        }
                        None => (None, Vec::new()),
                    }
                }
                (Backend::File, _, _) => {
                    use std::os::unix::fs::MetadataExt;
                    let used = std::fs::metadata(crate::node::lun_file(&t.data_dir, &t.name, l))
                        .ok()
                        .map(|m| m.blocks() * 512);
                    (used, Vec::new())
                }
                _ => (None, Vec::new()),
            };
            json!({
                "id": l.id,
                "name": l.name(),
                "backend": backend_name(l.backend),
                "size_bytes": size,
                "block_size": l.block_size,
                "used_bytes": used,
                "read_only": l.read_only,
                "snapshots": snapshots,
            })
        })
        .collect();
    let alua: Vec<Value> = t
        .port_groups
        .iter()
        .map(|g| json!({"group": g.id, "state": alua_name(g.state), "ports": g.ports}))
        .collect();
    json!({
        "name": t.name,
        "allowed_initiators": t.allowed,
        "chap": t.chap,
        "alua": alua,
        "luns": luns,
    })
}

/// The whole report `nvtarget status --json` prints.
pub fn report(node: &Node, origin: &Origin) -> Value {
    let cfg = node.config();
    let targets: Vec<Value> = node.target_views().iter().map(target_json).collect();
    let sessions = crate::portal::sessions();
    let m = node.metrics();
    let (nvram, cp) = match node.store() {
        Some(s) => {
            let st = s.log().stats();
            let aggr = s.aggregate();
            (
                json!({
                    "durability": format!("{:?}", s.log().durability()).to_lowercase(),
                    "half_capacity_bytes": st.half_capacity,
                    "active_half": st.active_half,
                    "half_used_bytes": st.half_used,
                    "next_seq": st.next_seq,
                    "durable_seq": st.durable_seq,
                    "records": st.appended,
                    "bytes": st.appended_bytes,
                    "space_waits": st.space_waits,
                }),
                json!({
                    "count": m.cp_total.get(),
                    "failed": m.cp_failed.get(),
                    "in_progress": st.cp_in_progress,
                    "generation": aggr.generation(),
                    "committed_seq": aggr.highest_seq(),
                    "dirty_bytes": aggr.dirty_bytes(),
                }),
            )
        }
        None => (Value::Null, Value::Null),
    };
    let partner = cfg.pair.as_ref().map(|p| {
        json!({
            "node": p.node,
            "partner": p.partner,
            "partner_portal": p.partner_portal,
            "partner_interconnect": p.partner_interconnect,
            "status": read_json(node.data_dir(), crate::ha::STATUS_FILE),
            "last_takeover": read_json(node.data_dir(), crate::ha::TAKEOVER_FILE),
        })
    });
    json!({
        "node": {
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "data_dir": node.data_dir().display().to_string(),
            "config": origin.config,
            "saved_to": origin.saved_to,
            "metrics": origin.metrics,
            "portals": cfg.portals.iter().map(|p| json!({"listen": p.listen, "tpgt": p.tpgt})).collect::<Vec<_>>(),
        },
        "targets": targets,
        "connections": m.connections.get(),
        "sessions": sessions,
        "nvram": nvram,
        "cp": cp,
        "partner": partner,
    })
}

/// Human-readable rendering of [`report`].
pub fn render(v: &Value, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let n = &v["node"];
    writeln!(
        out,
        "node pid {} data {} config {} (changes saved to {})",
        s(&n["pid"]),
        s(&n["data_dir"]),
        match &n["config"] {
            Value::Null => "<embedded default>".to_string(),
            c => s(c),
        },
        s(&n["saved_to"])
    )?;
    for p in n["portals"].as_array().into_iter().flatten() {
        writeln!(out, "portal {} tpgt {}", s(&p["listen"]), s(&p["tpgt"]))?;
    }
    for t in v["targets"].as_array().into_iter().flatten() {
        let allowed = t["allowed_initiators"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|a| a.iter().map(&s).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "all".into());
        writeln!(
            out,
            "target {}  initiators: {allowed}  chap: {}",
            s(&t["name"]),
            if t["chap"] == true { "yes" } else { "no" }
        )?;
        for g in t["alua"].as_array().into_iter().flatten() {
            writeln!(out, "  alua group {}: {}", s(&g["group"]), s(&g["state"]))?;
        }
        for l in t["luns"].as_array().into_iter().flatten() {
            let snaps: Vec<String> = l["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| s(&x["name"]))
                .collect();
            writeln!(
                out,
                "  lun {} {} ({}) size {} used {} block {}{}",
                s(&l["id"]),
                s(&l["name"]),
                s(&l["backend"]),
                s(&l["size_bytes"]),
                s(&l["used_bytes"]),
                s(&l["block_size"]),
                if snaps.is_empty() {
                    String::new()
                } else {
                    format!(" snapshots: {}", snaps.join(", "))
                }
            )?;
        }
    }
    let sessions = v["sessions"].as_array().map_or(&[][..], |a| a.as_slice());
    writeln!(
        out,
        "sessions: {} (connections open: {})",
        sessions.len(),
        s(&v["connections"])
    )?;
    for x in sessions {
        writeln!(
            out,
            "  {} from {} -> {} via {} (isid {}, tsih {})",
            s(&x["initiator"]),
            s(&x["peer"]),
            s(&x["target"]),
            s(&x["portal"]),
            s(&x["isid"]),
            s(&x["tsih"])
        )?;
    }
    let nv = &v["nvram"];
    if !nv.is_null() {
        writeln!(
            out,
            "nvram ({}): active half {}, used {} of {} bytes per half, seq {} durable {}",
            s(&nv["durability"]),
            s(&nv["active_half"]),
            s(&nv["half_used_bytes"]),
            s(&nv["half_capacity_bytes"]),
            s(&nv["next_seq"]),
            s(&nv["durable_seq"])
        )?;
        let cp = &v["cp"];
        writeln!(
            out,
            "cp: {} taken, {} failed, generation {}, dirty {} bytes{}",
            s(&cp["count"]),
            s(&cp["failed"]),
            s(&cp["generation"]),
            s(&cp["dirty_bytes"]),
            if cp["in_progress"] == true {
                ", one running"
            } else {
                ""
            }
        )?;
    }
    let p = &v["partner"];
    if !p.is_null() {
        let st = &p["status"];
        writeln!(
            out,
            "pair: node {} partner {} ({}) state {} mirrored {} partner alive {} epoch {}",
            s(&p["node"]),
            s(&p["partner"]),
            s(&p["partner_portal"]),
            s(&st["state"]),
            s(&st["mirrored"]),
            s(&st["partner_alive"]),
            s(&st["epoch"])
        )?;
        let t = &p["last_takeover"];
        if !t.is_null() {
            writeln!(
                out,
                "last takeover: of {} in {} ms, {} records replayed",
                s(&t["owner"]),
                s(&t["total_ms"]),
                s(&t["replayed_records"])
            )?;
        }
    }
    Ok(())
}

/// Copies sessions, the NVRAM log, CP and HA state into `node`'s metrics
/// before every scrape.
pub fn register_collectors(node: &Arc<Node>) {
    let weak: Weak<Node> = Arc::downgrade(node);
    node.metrics().add_collector(move |m| {
        let Some(node) = weak.upgrade() else { return };
        collect_sessions(&node, m);
        if let Some(s) = node.store() {
            let st = s.log().stats();
            for (i, used) in st.half_used.iter().enumerate() {
                m.nvram_half_used
                    .get_or_create(&HalfLabel {
                        half: i.to_string(),
                    })
                    .set(*used as i64);
            }
            m.nvram_half_capacity.set(st.half_capacity as i64);
            m.nvram_active_half.set(st.active_half as i64);
            m.nvram_records.set_total(st.appended);
            m.nvram_bytes.set_total(st.appended_bytes);
            m.nvram_space_waits.set_total(st.space_waits);
            m.cp_in_progress.set(i64::from(st.cp_in_progress));
            m.dirty_bytes.set(s.aggregate().dirty_bytes() as i64);
        }
        if node.config().pair.is_some() {
            collect_ha(node.data_dir(), m);
        }
    });
}

fn collect_sessions(node: &Node, m: &Metrics) {
    let mut counts: std::collections::BTreeMap<String, i64> =
        node.target_names().into_iter().map(|t| (t, 0)).collect();
    for s in crate::portal::sessions() {
        *counts.entry(s.target).or_default() += 1;
    }
    m.sessions.clear();
    for (target, n) in counts {
        m.sessions.get_or_create(&TargetLabel { target }).set(n);
    }
}

fn collect_ha(dir: &Path, m: &Metrics) {
    if let Some(st) = read_json(dir, crate::ha::STATUS_FILE) {
        for s in HA_STATES {
            m.ha_state
                .get_or_create(&StateLabel {
                    state: s.to_string(),
                })
                .set(i64::from(st["state"] == s));
        }
        m.ha_epoch.set(st["epoch"].as_i64().unwrap_or(0));
        m.ha_partner_alive
            .set(i64::from(st["partner_alive"] == true));
    }
    if let Some(t) = read_json(dir, crate::ha::TAKEOVER_FILE) {
        for step in t["steps"].as_array().into_iter().flatten() {
            if let (Some(name), Some(ms)) = (step["name"].as_str(), step["ms"].as_f64()) {
                m.takeover_step
                    .get_or_create(&StepLabel {
                        step: name.to_string(),
                    })
                    .set(ms / 1e3);
            }
        }
        m.takeover_seconds
            .set(t["total_ms"].as_f64().unwrap_or(0.0) / 1e3);
        m.takeover_records
            .set(t["replayed_records"].as_i64().unwrap_or(0));
        m.takeover_unix_ms
            .set(t["serving_unix_ms"].as_i64().unwrap_or(0));
    }
}
