//! The admin socket: how `nvtarget status`, `lun`, `acl` and `chap` talk to
//! the node running on a data directory.
//!
//! A unix socket `DATA_DIR/admin.sock` (mode 0600: whoever may read the data
//! directory's secrets may use it). One request per connection: a JSON line
//! in, a JSON line out, `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`. The socket path is unlinked and bound again
//! at start; the data directory lock already keeps a second node away.
//!
//! A change is checked against the whole configuration first, then applied
//! to the running node, then saved (see `configfile.rs`); if saving fails
//! the node change is undone, so the node never runs something that would
//! not come back after a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::config::{ChapSection, Config};
use crate::configfile::{self, ConfigFile};
use crate::node::{ChapConfig, Node};
use crate::status::Origin;

pub const SOCKET: &str = "admin.sock";
/// Longest request accepted.
const MAX_REQUEST: usize = 64 * 1024;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    LunAdd {
        target: String,
        lun: u64,
        size: String,
        name: Option<String>,
        block_size: Option<u32>,
    },
    LunRemove {
        target: String,
        lun: u64,
    },
    AclAdd {
        target: String,
        initiator: String,
    },
    AclRemove {
        target: String,
        initiator: String,
    },
    ChapSet {
        target: String,
        user: String,
        secret: String,
        mutual_user: Option<String>,
        mutual_secret: Option<String>,
    },
    ChapClear {
        target: String,
    },
}

pub struct Admin {
    pub node: Arc<Node>,
    pub file: ConfigFile,
    pub origin: Origin,
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(data_dir: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

/// Answers requests forever.
pub async fn serve(listener: tokio::net::UnixListener, admin: Arc<Admin>) -> anyhow::Result<()> {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = sock.into_split();
            let mut line = String::new();
            let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64);
            let read = tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut line)).await;
            let reply = match read {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let a = admin.clone();
                        match tokio::task::spawn_blocking(move || a.handle(req)).await {
                            Ok(Ok(v)) => json!({"ok": true, "result": v}),
                            Ok(Err(e)) => json!({"ok": false, "error": format!("{e:#}")}),
                            Err(e) => json!({"ok": false, "error": e.to_string()}),
                        }
                    }
                    Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
                },
                Ok(Err(e)) => json!({"ok": false, "error": format!("reading: {e}")}),
                Err(_) => return,
            };
            let mut out = reply.to_string();
            out.push('\n');
            let _ = wr.write_all(out.as_bytes()).await;
            let _ = wr.shutdown().await;
        });
    }
}

impl Admin {
    fn handle(&self, req: Request) -> anyhow::Result<Value> {
        if !matches!(req, Request::Status) {
            tracing::info!(request = ?Redacted(&req), "admin change");
        }
        match req {
            Request::Status => Ok(crate::status::report(&self.node, &self.origin)),
            Request::LunAdd {
                target,
                lun,
                size,
                name,
                block_size,
            } => self.change(
                &target,
                |doc| configfile::add_lun(doc, &target, lun, name.as_deref(), &size, block_size),
                |node, cfg| {
                    let l = lun_of(cfg, &target, lun)?;
                    node.add_lun(&target, l)?;
                    Ok(Undo::RemoveLun(lun))
                },
            ),
            Request::LunRemove { target, lun } => self.change(
                &target,
                |doc| configfile::remove_lun(doc, &target, lun),
                |node, _| Ok(Undo::AddLun(node.remove_lun(&target, lun)?)),
            ),
            Request::AclAdd { target, initiator } => {
                let mut list = self.allowed(&target)?;
                if !list.iter().any(|i| i.eq_ignore_ascii_case(&initiator)) {
                    list.push(initiator);
                }
                self.set_allowed(&target, list)
            }
            Request::AclRemove { target, initiator } => {
                let mut list = self.allowed(&target)?;
                let before = list.len();
                list.retain(|i| !i.eq_ignore_ascii_case(&initiator));
                if list.len() == before {
                    anyhow::bail!("{initiator} is not in the allowed list of {target}");
                }
                self.set_allowed(&target, list)
            }
            Request::ChapSet {
                target,
                user,
                secret,
                mutual_user,
                mutual_secret,
            } => {
                let c = ChapSection {
                    user,
                    secret,
                    mutual_user,
                    mutual_secret,
                };
                self.set_chap(&target, Some(c))
            }
            Request::ChapClear { target } => self.set_chap(&target, None),
        }
    }

    fn allowed(&self, target: &str) -> anyhow::Result<Vec<String>> {
        self.node
            .target_views()
            .into_iter()
            .find(|t| t.name == target)
            .map(|t| t.allowed)
            .with_context(|| format!("no target {target} is served here"))
    }

    fn set_allowed(&self, target: &str, list: Vec<String>) -> anyhow::Result<Value> {
        let old = self.allowed(target)?;
        self.change(
            target,
            |doc| configfile::set_allowed(doc, target, &list),
            |node, cfg| {
                let t = target_of(cfg, target)?;
                node.set_allowed(target, t.allowed_initiators.clone())?;
                Ok(Undo::Allowed(old.clone()))
            },
        )
    }

    fn set_chap(&self, target: &str, chap: Option<ChapSection>) -> anyhow::Result<Value> {
        let old = self.file_target(target)?.chap;
        self.change(
            target,
            |doc| configfile::set_chap(doc, target, chap.as_ref()),
            |node, cfg| {
                let t = target_of(cfg, target)?;
                node.set_chap(target, t.chap.as_ref().map(ChapConfig::from))?;
                Ok(Undo::Chap(old.clone()))
            },
        )
    }

    /// `target` as the saved configuration has it now.
    fn file_target(&self, target: &str) -> anyhow::Result<crate::config::TargetConfig> {
        let p = self.file.prepare(|_| Ok(()))?;
        target_of(&p.config, target).cloned()
    }

    /// Check, apply live, save; undo the live change if saving fails.
    fn change(
        &self,
        target: &str,
        edit: impl FnOnce(&mut toml_edit::DocumentMut) -> anyhow::Result<()>,
        apply: impl FnOnce(&Node, &Config) -> anyhow::Result<Undo>,
    ) -> anyhow::Result<Value> {
        let _one_at_a_time = self.file.lock();
        let pending = self.file.prepare(edit)?;
        let undo = apply(&self.node, &pending.config)?;
        if let Err(e) = self.file.commit(&pending) {
            let r = match undo {
                Undo::RemoveLun(id) => self.node.remove_lun(target, id).map(|_| ()),
                Undo::AddLun(l) => self.node.add_lun(target, l),
                Undo::Allowed(a) => self.node.set_allowed(target, a),
                Undo::Chap(c) => self.node.set_chap(target, c.as_ref().map(ChapConfig::from)),
            };
            if let Err(u) = r {
                tracing::error!(error = %u, "cannot undo a change that was not saved");
            }
            return Err(e.context("not saved, so not applied either"));
        }
        let t = target_of(&pending.config, target)?;
        Ok(json!({
            "saved_to": self.file.path().display().to_string(),
            "target": t.name,
            "allowed_initiators": t.allowed_initiators,
            "chap": t.chap.is_some(),
            "luns": t.luns.iter().map(|l| json!({"id": l.id, "name": l.name(), "size": l.size})).collect::<Vec<_>>(),
        }))
    }
}

enum Undo {
    RemoveLun(u64),
    AddLun(crate::config::LunConfig),
    Allowed(Vec<String>),
    Chap(Option<ChapSection>),
}

fn target_of<'a>(cfg: &'a Config, target: &str) -> anyhow::Result<&'a crate::config::TargetConfig> {
    cfg.targets
        .iter()
        .find(|t| t.name == target)
        .with_context(|| format!("target {target} is not in this node's configuration"))
}

fn lun_of(cfg: &Config, target: &str, id: u64) -> anyhow::Result<crate::config::LunConfig> {
    target_of(cfg, target)?
        .luns
        .iter()
        .find(|l| l.id == id)
        .cloned()
        .with_context(|| format!("{target} has no LUN {id}"))
}

/// A request as logged: no secrets.
struct Redacted<'a>(&'a Request);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Request::ChapSet { target, user, .. } => {
                write!(f, "ChapSet {{ target: {target:?}, user: {user:?}, .. }}")
            }
            r => write!(f, "{r:?}"),
        }
    }
}

/// Sends `req` to the node running on `data_dir` and returns its result.
pub fn call(data_dir: &Path, req: &Request) -> anyhow::Result<Value> {
    use std::io::{BufRead, Write};
    let path = socket_path(data_dir);
    let mut sock = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to {} (is `nvtarget serve --data-dir {}` running?)",
            path.display(),
            data_dir.display()
        )
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    sock.write_all(line.as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(sock)
        .read_line(&mut reply)
        .context("reading the node's answer")?;
    let v: Value = serde_json::from_str(&reply)
        .with_context(|| format!("the node's answer is not JSON: {reply:?}"))?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or("the node refused"))
    }
}
