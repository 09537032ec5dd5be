//! Node configuration: portals, targets, LUNs, access control.
//!
//! The configuration is TOML. `nvtarget serve` with no `--config` uses the
//! embedded default (`examples/default.toml`): one target with one 1 GiB thin
//! LUN on 127.0.0.1:3260. Unknown keys are errors, and every error names the
//! file and the line, so a typo never silently changes behaviour.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Size of a new aggregate unless `node.aggregate_size` says otherwise.
pub const DEFAULT_AGGREGATE_SIZE: u64 = 8 << 30;

/// Size of a new NVRAM region unless `node.nvram_size` says otherwise.
pub const DEFAULT_NVRAM_SIZE: u64 = 256 << 20;

/// The configuration compiled into the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: usize,
        message: String,
    },
    /// A value that parses but makes no sense; `at` is `FILE:LINE` (or
    /// just `FILE` when the key is absent from the text, e.g. a default).
    #[error("{at}: {key}: {message}")]
    Invalid {
        at: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default, rename = "portal")]
    pub portals: Vec<PortalConfig>,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub iscsi: IscsiSection,
    /// HA pair membership; absent for a single node.
    #[serde(default)]
    pub pair: Option<PairSection>,
}

/// This node's half of an HA pair (see `examples/pair/`). Paths are relative
/// to the directory of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSection {
    /// This node's name ("a" or "b" in `nvtarget pair up`).
    pub node: String,
    /// The partner's name.
    pub partner: String,
    /// `ADDR:PORT` this node listens on for the partner's mirror stream and
    /// forwarded commands.
    pub interconnect: String,
    /// `ADDR:PORT` of the partner's interconnect listener.
    pub partner_interconnect: String,
    /// The partner's portal: the address this node takes over.
    pub partner_portal: String,
    /// The partner's configuration file (its targets are served here after a
    /// takeover, and as ALUA active/non-optimized paths meanwhile).
    pub partner_config: PathBuf,
    /// The partner's data directory on shared storage (its aggregate and its
    /// mailbox).
    pub partner_data_dir: PathBuf,
    /// TCP connections per direction (`interconnect.paths`).
    #[serde(default = "one_path")]
    pub paths: u8,
    /// Heartbeat interval on the interconnect and in the mailbox.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Missed heartbeats before the partner counts as silent.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
    /// Take over automatically when the partner fails (default); false
    /// leaves it to `nvtarget pair takeover`.
    #[serde(default = "yes")]
    pub auto_takeover: bool,
}

fn one_path() -> u8 {
    1
}

fn default_heartbeat_ms() -> u64 {
    100
}

fn default_missed() -> u32 {
    10
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Where LUN images and state live; `--data-dir` overrides it.
    pub data_dir: Option<PathBuf>,
    /// Size of the aggregate file created on first start ("8GiB" by default;
    /// sparse, so it takes only the space LUNs use).
    pub aggregate_size: Option<String>,
    /// Size of the NVRAM region file created on first start ("256MiB").
    pub nvram_size: Option<String>,
    /// Longest time data stays dirty before a consistency point, in ms
    /// (10000 by default). A CP also runs when the active log half is half
    /// full. A larger value keeps more of the log unpruned (benchmarks of
    /// takeover replay); it does not change what a write survives.
    pub cp_interval_ms: Option<u64>,
    /// What an acknowledged write survives: "process" (the mapped log file
    /// survives a killed process; default) or "power" (the record is synced to
    /// the device before status; survives power loss). "none" is for
    /// benchmarks only (the cost of the log itself): writes go straight to the
    /// store's dirty set without a log record, so every write acknowledged
    /// since the last CP is LOST when the process dies.
    #[serde(default)]
    pub nvram_durability: NvramDurability,
    /// `ADDR:PORT` to serve Prometheus metrics on; `--metrics` overrides it.
    /// Unset: no metrics endpoint.
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NvramDurability {
    #[default]
    Process,
    Power,
    /// UNSAFE, benchmarks only: no log record at all (see `nvram_durability`).
    #[serde(rename = "none")]
    BenchNoLog,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// Target portal group tag reported in discovery and login.
    #[serde(default = "one")]
    pub tpgt: u16,
}

fn one() -> u16 {
    1
}

/// iSCSI operational parameters the target offers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiSection {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Commands in flight per session (the CmdSN window).
    pub queue_depth: u32,
    /// Seconds of silence before the target pings the initiator.
    pub nop_in_interval_secs: u64,
    /// Seconds without an answer to a ping before the connection is dropped.
    pub nop_in_timeout_secs: u64,
}

impl Default for IscsiSection {
    fn default() -> Self {
        IscsiSection {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 16,
            immediate_data: true,
            initial_r2t: false,
            queue_depth: 128,
            nop_in_interval_secs: 5,
            nop_in_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// iSCSI qualified name, e.g. `iqn.2026-11.io.nvtarget:default`.
    pub name: String,
    /// Initiator IQNs allowed to see and log in to this target; empty means all.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    #[serde(default)]
    pub chap: Option<ChapSection>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapSection {
    /// Name and secret the initiator must present.
    pub user: String,
    pub secret: String,
    /// For mutual CHAP: name and secret the target answers with.
    pub mutual_user: Option<String>,
    pub mutual_secret: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A thin LUN in the node's write-anywhere aggregate (`DATA_DIR/aggr0.img`).
    #[default]
    Store,
    /// A sparse file per LUN under the data directory (holes = unmapped).
    File,
    /// RAM only; contents are lost when the process ends.
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    pub id: u64,
    /// Name of the LUN in the store; defaults to `lun<id>`.
    pub name: Option<String>,
    /// Size with an optional unit: "1GiB", "512MiB", "1073741824".
    pub size: String,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub removable: bool,
}

fn default_block_size() -> u32 {
    512
}

impl LunConfig {
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("lun{}", self.id))
    }
}

/// Parses "1GiB", "512 MiB", "4k", "1073741824" into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Whether two listeners collide: the same port on the same address, or on
/// any address when one of them is the wildcard (0.0.0.0 or [::]).
fn portals_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The 1-based line of a dotted key path such as `target[0].lun[1].size`
/// in `text`: the key's own line, or the nearest enclosing table's header
/// when the key itself is absent (a default that failed validation).
pub fn key_line(text: &str, path: &str) -> Option<usize> {
    use toml_edit::{Item, Value};
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut span = None;
    let mut table = Some(doc.as_table());
    for seg in path.split('.') {
        let Some(container) = table.take() else { break };
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let Some((key, item)) = container.get_key_value(name) else {
            break;
        };
        span = key.span().or(span);
        match (index, item) {
            (Some(k), Item::ArrayOfTables(a)) => {
                if let Some(t) = a.get(k) {
                    span = t.span().or(span);
                    table = Some(t);
                }
            }
            (Some(k), Item::Value(Value::Array(a))) => {
                span = a.get(k).and_then(|v| v.span()).or(span);
            }
            (None, Item::Table(t)) => table = Some(t),
            _ => {}
        }
    }
    let at = span?.start.min(text.len());
    Some(text[..at].matches('\n').count() + 1)
}

/// An iSCSI name (RFC 3720 3.2.6): iqn., eui. or naa. form, lower case.
pub fn valid_iscsi_name(name: &str) -> bool {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(c));
    if !ok_chars || name.len() > 223 {
        return false;
    }
    if let Some(rest) = name.strip_prefix("iqn.") {
        // iqn.YYYY-MM.reversed.domain[:anything]
        let b = rest.as_bytes();
        b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'.'
    } else if let Some(rest) = name.strip_prefix("eui.") {
        rest.len() == 16 && rest.chars().all(|c| c.is_ascii_hexdigit())
    } else if let Some(rest) = name.strip_prefix("naa.") {
        (rest.len() == 16 || rest.len() == 32) && rest.chars().all(|c| c.is_ascii_hexdigit())
    } else {
        false
    }
}

impl Config {
    pub fn aggregate_size(&self) -> u64 {
        self.node
            .aggregate_size
            .as_deref()
            .and_then(parse_size)
            .unwrap_or(DEFAULT_AGGREGATE_SIZE)
    }

    /// `node.cp_interval_ms`, or the default.
    pub fn cp_interval(&self) -> std::time::Duration {
        self.node
            .cp_interval_ms
            .map(std::time::Duration::from_millis)
            .unwrap_or(crate::storedev::DEFAULT_CP_INTERVAL)
    }

    pub fn nvram_size(&self) -> u64 {
        self.node
            .nvram_size
            .as_deref()
            .and_then(parse_size)
            .unwrap_or(DEFAULT_NVRAM_SIZE)
    }

    /// Loads `path`, or the embedded default when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(DEFAULT_CONFIG, "<embedded default config>"),
            Some(p) => {
                let file = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    file: file.clone(),
                    source,
                })?;
                Config::parse(&text, &file)
            }
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::Parse {
                file: file.to_string(),
                line,
                message: e.message().to_string(),
            }
        })?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            at: match key_line(text, &key) {
                Some(line) => format!("{file}:{line}"),
                None => file.to_string(),
            },
            key,
            message,
        };
        let aggr_size = match &self.node.aggregate_size {
            None => DEFAULT_AGGREGATE_SIZE,
            Some(s) => parse_size(s).filter(|&n| n >= 16 << 20).ok_or_else(|| {
                invalid(
                    "node.aggregate_size".into(),
                    format!("{s:?} is not a size of at least 16MiB"),
                )
            })?,
        };
        if let Some(s) = &self.node.nvram_size {
            if parse_size(s).filter(|&n| n >= 1 << 20).is_none() {
                return Err(invalid(
                    "node.nvram_size".into(),
                    format!("{s:?} is not a size of at least 1MiB"),
                ));
            }
        }
        if let Some(ms) = self.node.cp_interval_ms {
            if !(100..=86_400_000).contains(&ms) {
                return Err(invalid(
                    "node.cp_interval_ms".into(),
                    format!("{ms} is not between 100 and 86400000"),
                ));
            }
        }
        if let Some(m) = &self.node.metrics {
            if m.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "node.metrics".into(),
                    format!("{m:?} is not ADDR:PORT"),
                ));
            }
        }
        let mut listens: Vec<SocketAddr> = Vec::new();
        for (i, p) in self.portals.iter().enumerate() {
            let addr: SocketAddr = p.listen.parse().map_err(|_| {
                invalid(
                    format!("portal[{i}].listen"),
                    format!("{:?} is not ADDR:PORT", p.listen),
                )
            })?;
            if let Some((k, other)) = listens
                .iter()
                .enumerate()
                .find(|(_, o)| portals_overlap(**o, addr))
            {
                return Err(invalid(
                    format!("portal[{i}].listen"),
                    format!("{addr} overlaps portal[{k}] ({other}): both cannot listen"),
                ));
            }
            listens.push(addr);
        }
        let mut names = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            if !valid_iscsi_name(&t.name) {
                return Err(invalid(
                    format!("target[{i}].name"),
                    format!(
                        "{:?} is not a valid iSCSI name (iqn.YYYY-MM.domain:id, lower case)",
                        t.name
                    ),
                ));
            }
            if !names.insert(&t.name) {
                return Err(invalid(
                    format!("target[{i}].name"),
                    format!("{} is defined twice", t.name),
                ));
            }
            for (k, ini) in t.allowed_initiators.iter().enumerate() {
                if !valid_iscsi_name(ini) {
                    return Err(invalid(
                        format!("target[{i}].allowed_initiators[{k}]"),
                        format!("{ini:?} is not a valid iSCSI name"),
                    ));
                }
            }
            if let Some(c) = &t.chap {
                if c.secret.len() < 12 || c.secret.len() > 255 {
                    return Err(invalid(
                        format!("target[{i}].chap.secret"),
                        "CHAP secrets must be 12 to 255 characters (RFC 7143 9.2.1)".into(),
                    ));
                }
                if c.mutual_user.is_some() != c.mutual_secret.is_some() {
                    return Err(invalid(
                        format!("target[{i}].chap"),
                        "mutual_user and mutual_secret go together".into(),
                    ));
                }
            }
            let mut ids = HashSet::new();
            for (j, l) in t.luns.iter().enumerate() {
                let key = |f: &str| format!("target[{i}].lun[{j}].{f}");
                if l.id >= 16384 {
                    return Err(invalid(key("id"), "LUN ids go from 0 to 16383".into()));
                }
                if !ids.insert(l.id) {
                    return Err(invalid(key("id"), format!("LUN {} is defined twice", l.id)));
                }
                if l.block_size != 512 && l.block_size != 4096 {
                    return Err(invalid(key("block_size"), "must be 512 or 4096".into()));
                }
                match parse_size(&l.size) {
                    Some(n) if l.backend == Backend::Store && n > aggr_size => {
                        return Err(invalid(
                            key("size"),
                            format!(
                                "{} is larger than the aggregate ({aggr_size} bytes, node.aggregate_size)",
                                l.size
                            ),
                        ))
                    }
                    Some(n) if n >= l.block_size as u64 && n % l.block_size as u64 == 0 => {}
                    Some(_) => {
                        return Err(invalid(
                            key("size"),
                            format!(
                                "must be a positive multiple of block_size ({})",
                                l.block_size
                            ),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            key("size"),
                            format!("{:?} is not a size (e.g. \"1GiB\")", l.size),
                        ))
                    }
                }
            }
        }
        if let Some(p) = &self.pair {
            for (key, v) in [
                ("pair.interconnect", &p.interconnect),
                ("pair.partner_interconnect", &p.partner_interconnect),
                ("pair.partner_portal", &p.partner_portal),
            ] {
                if v.parse::<SocketAddr>().is_err() {
                    return Err(invalid(key.into(), format!("{v:?} is not ADDR:PORT")));
                }
            }
            if p.node.is_empty() || p.node == p.partner {
                return Err(invalid(
                    "pair.partner".into(),
                    "the two nodes of a pair need two different, non-empty names".into(),
                ));
            }
            if !(1..=8).contains(&p.paths) {
                return Err(invalid("pair.paths".into(), "must be 1 to 8".into()));
            }
            if !(10..=10_000).contains(&p.heartbeat_ms) {
                return Err(invalid(
                    "pair.heartbeat_ms".into(),
                    "must be 10 to 10000".into(),
                ));
            }
            if !(2..=100).contains(&p.missed_heartbeats) {
                return Err(invalid(
                    "pair.missed_heartbeats".into(),
                    "must be 2 to 100".into(),
                ));
            }
            if self
                .targets
                .iter()
                .flat_map(|t| &t.luns)
                .any(|l| l.backend != Backend::Store)
            {
                return Err(invalid(
                    "pair".into(),
                    "every LUN of a pair node must use the store backend (only the log is mirrored)"
                        .into(),
                ));
            }
            if self.node.nvram_durability == NvramDurability::BenchNoLog {
                return Err(invalid(
                    "node.nvram_durability".into(),
                    "\"none\" (no log, benchmarks only) cannot be used in a pair: there is no log to mirror"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The TPGT of the partner's portal in a pair: the other of 1 and 2.
    pub fn partner_tpgt(&self) -> u16 {
        match self.portals.first().map_or(1, |p| p.tpgt) {
            1 => 2,
            _ => 1,
        }
    }

    /// Replaces the portals with one listening on `addr` (`--listen`).
    pub fn override_listen(&mut self, addr: &str) {
        let tpgt = self.portals.first().map(|p| p.tpgt).unwrap_or(1);
        self.portals = vec![PortalConfig {
            listen: addr.to_string(),
            tpgt,
        }];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.targets[0].name, "iqn.2026-11.io.nvtarget:default");
        assert_eq!(c.targets[0].luns[0].id, 0);
        assert_eq!(parse_size(&c.targets[0].luns[0].size), Some(1 << 30));
        assert_eq!(c.portals[0].listen, "127.0.0.1:3260");
    }

    #[test]
    fn unknown_key_names_line() {
        let text = "[[target]]\nname = \"iqn.2026-11.io.x:a\"\nbogus = 1\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:3:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_iqn_is_named() {
        let text = "[[target]]\nname = \"IQN.bad\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:2: target[0].name:"), "{e}");
    }

    #[test]
    fn key_lines() {
        let text = "[node]\naggregate_size = \"1GiB\"\n\n[[target]]\nname = \"a\"\nallowed_initiators = [\n  \"x\",\n  \"y\",\n]\n[[target.lun]]\nid = 0\n[[target.lun]]\nid = 1\nsize = \"1\"\n";
        assert_eq!(key_line(text, "node.aggregate_size"), Some(2));
        assert_eq!(key_line(text, "target[0].name"), Some(5));
        assert_eq!(key_line(text, "target[0].allowed_initiators[1]"), Some(8));
        assert_eq!(key_line(text, "target[0].lun[1].size"), Some(14));
        // Absent: the enclosing table's header.
        assert_eq!(key_line(text, "target[0].lun[0].size"), Some(10));
        assert_eq!(key_line(text, "pair.node"), None);
    }

    #[test]
    fn duplicate_portals_rejected() {
        let text =
            "[[portal]]\nlisten = \"127.0.0.1:3260\"\n[[portal]]\nlisten = \"127.0.0.1:3260\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:4: portal[1].listen:"), "{e}");
        // A wildcard listener overlaps every address on its port.
        let text =
            "[[portal]]\nlisten = \"127.0.0.1:3260\"\n[[portal]]\nlisten = \"0.0.0.0:3260\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("overlaps portal[0]"), "{e}");
        let text =
            "[[portal]]\nlisten = \"127.0.0.1:3260\"\n[[portal]]\nlisten = \"0.0.0.0:3261\"\n";
        assert!(Config::parse(text, "t.toml").is_ok());
    }

    #[test]
    fn lun_larger_than_aggregate_rejected() {
        let text = "[node]\naggregate_size = \"1GiB\"\n[[target]]\nname = \"iqn.2026-11.io.x:a\"\n[[target.lun]]\nid = 0\nsize = \"2GiB\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:7: target[0].lun[0].size:"), "{e}");
        assert!(e.contains("larger than the aggregate"), "{e}");
    }

    #[test]
    fn cp_interval() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.cp_interval(), crate::storedev::DEFAULT_CP_INTERVAL);
        let c = Config::parse("[node]\ncp_interval_ms = 60000\n", "t.toml").unwrap();
        assert_eq!(c.cp_interval(), std::time::Duration::from_secs(60));
        let e = Config::parse("[node]\ncp_interval_ms = 5\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:2: node.cp_interval_ms:"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1XB"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn iscsi_names() {
        assert!(valid_iscsi_name("iqn.2026-11.io.nvtarget:default"));
        assert!(valid_iscsi_name(
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
        ));
        assert!(valid_iscsi_name("eui.0123456789abcdef"));
        assert!(!valid_iscsi_name("iqn.26-11.x"));
        assert!(!valid_iscsi_name("foo"));
    }
}
