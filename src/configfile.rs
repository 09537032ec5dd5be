//! The configuration file a running node saves its live changes to (like
//! targetcli's saveconfig).
//!
//! A change is an edit of the TOML document (comments and layout kept, via
//! toml_edit), checked by parsing the result as a full [`Config`] before the
//! node applies it, and written back atomically: a temporary file in the same
//! directory, synced, then renamed over the old one. A node started without
//! `--config` saves to `DATA_DIR/nvtarget.toml`, starting from the embedded
//! default, and loads that file on its next start.
//!
//! Invariant: one edit at a time ([`ConfigFile::lock`]), so two changes never
//! start from the same text and lose one another.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

use crate::config::{ChapSection, Config, DEFAULT_CONFIG};

/// Name of the saved configuration of a node started without `--config`.
pub const SAVED_CONFIG: &str = "nvtarget.toml";

pub struct ConfigFile {
    path: PathBuf,
    edit: parking_lot::Mutex<()>,
}

/// An edit checked and ready to be written.
pub struct Pending {
    pub config: Config,
    text: String,
}

impl ConfigFile {
    pub fn new(path: PathBuf) -> ConfigFile {
        ConfigFile {
            path,
            edit: parking_lot::Mutex::new(()),
        }
    }

    /// Where the configuration of a node with data directory `data_dir`
    /// is saved when it runs from the embedded default.
    pub fn saved_path(data_dir: &Path) -> PathBuf {
        data_dir.join(SAVED_CONFIG)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serializes edits: hold the guard from `prepare` to `commit`.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.edit.lock()
    }

    /// The current text: the file, or the embedded default if it does not
    /// exist yet.
    fn text(&self) -> anyhow::Result<String> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DEFAULT_CONFIG.to_string()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    /// Applies `f` to the document and checks the result.
    pub fn prepare(
        &self,
        f: impl FnOnce(&mut DocumentMut) -> anyhow::Result<()>,
    ) -> anyhow::Result<Pending> {
        let text = self.text()?;
        let mut doc: DocumentMut = text
            .parse()
            .with_context(|| format!("parsing {}", self.path.display()))?;
        f(&mut doc)?;
        let text = doc.to_string();
        let config = Config::parse(&text, &self.path.display().to_string())
            .context("the change would make the configuration invalid")?;
        Ok(Pending { config, text })
    }

    /// Writes a prepared edit: temporary file, fsync, rename, fsync of the
    /// directory.
    pub fn commit(&self, p: &Pending) -> anyhow::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .context("the configuration path has no file name")?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            // CHAP secrets live here: a new file is private, an existing one
            // keeps its mode.
            let mode = std::fs::metadata(&self.path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o600);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(p.text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(&dir)?.sync_all()
        };
        write().with_context(|| format!("saving {}", self.path.display()))
    }
}

/// The `[[target]]` table named `name`.
fn target_mut<'a>(doc: &'a mut DocumentMut, name: &str) -> anyhow::Result<&'a mut Table> {
    doc.get_mut("target")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|a| {
            a.iter_mut()
                .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
        })
        .with_context(|| format!("target {name} is not in this node's configuration"))
}

/// Edit: a `[[target.lun]]` with these keys.
pub fn add_lun(
    doc: &mut DocumentMut,
    target: &str,
    id: u64,
    name: Option<&str>,
    size: &str,
    block_size: Option<u32>,
) -> anyhow::Result<()> {
    let t = target_mut(doc, target)?;
    let mut lun = Table::new();
    lun.insert("id", value(i64::try_from(id).context("LUN id")?));
    if let Some(n) = name {
        lun.insert("name", value(n));
    }
    lun.insert("size", value(size));
    if let Some(b) = block_size {
        lun.insert("block_size", value(i64::from(b)));
    }
    match t.get_mut("lun") {
        Some(Item::ArrayOfTables(a)) => a.push(lun),
        Some(_) => anyhow::bail!("{target}: `lun` is not a list of [[target.lun]] tables"),
        None => {
            let mut a = ArrayOfTables::new();
            a.push(lun);
            t.insert("lun", Item::ArrayOfTables(a));
        }
    }
    Ok(())
}

/// Edit: drop the `[[target.lun]]` with this id.
pub fn remove_lun(doc: &mut DocumentMut, target: &str, id: u64) -> anyhow::Result<()> {
    let t = target_mut(doc, target)?;
    let a = t
        .get_mut("lun")
        .and_then(Item::as_array_of_tables_mut)
        .with_context(|| format!("{target} has no LUNs"))?;
    let pos = a
        .iter()
        .position(|l| l.get("id").and_then(Item::as_integer) == i64::try_from(id).ok())
        .with_context(|| format!("{target} has no LUN {id}"))?;
    a.remove(pos);
    Ok(())
}

/// Edit: `allowed_initiators = [...]`.
pub fn set_allowed(doc: &mut DocumentMut, target: &str, list: &[String]) -> anyhow::Result<()> {
    let t = target_mut(doc, target)?;
    let mut a = Array::new();
    for i in list {
        a.push(i.as_str());
    }
    match t.get_mut("allowed_initiators").and_then(Item::as_value_mut) {
        // Keep the comment that follows the old value.
        Some(v) => {
            let decor = v.decor().clone();
            *v = toml_edit::Value::Array(a);
            *v.decor_mut() = decor;
        }
        None => {
            t.insert("allowed_initiators", value(a));
        }
    }
    Ok(())
}

/// Edit: `[target.chap]` set to `chap`, or removed.
pub fn set_chap(
    doc: &mut DocumentMut,
    target: &str,
    chap: Option<&ChapSection>,
) -> anyhow::Result<()> {
    let t = target_mut(doc, target)?;
    match chap {
        None => {
            t.remove("chap");
        }
        Some(c) => {
            let mut s = Table::new();
            s.insert("user", value(&c.user));
            s.insert("secret", value(&c.secret));
            if let (Some(u), Some(p)) = (&c.mutual_user, &c.mutual_secret) {
                s.insert("mutual_user", value(u));
                s.insert("mutual_secret", value(p));
            }
            t.insert("chap", Item::Table(s));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nvtarget-cfgfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const T: &str = "iqn.2026-11.io.nvtarget:default";

    #[test]
    fn edits_round_trip_through_the_file() {
        let d = dir("rt");
        let f = ConfigFile::new(ConfigFile::saved_path(&d));
        // Starts from the embedded default.
        let p = f
            .prepare(|doc| add_lun(doc, T, 3, None, "64MiB", Some(4096)))
            .unwrap();
        f.commit(&p).unwrap();
        let p = f
            .prepare(|doc| set_allowed(doc, T, &["iqn.2026-11.io.x:i1".to_string()]))
            .unwrap();
        f.commit(&p).unwrap();
        let chap = ChapSection {
            user: "u".into(),
            secret: "twelve-chars".into(),
            mutual_user: None,
            mutual_secret: None,
        };
        let p = f.prepare(|doc| set_chap(doc, T, Some(&chap))).unwrap();
        f.commit(&p).unwrap();

        let text = std::fs::read_to_string(f.path()).unwrap();
        let c = Config::parse(&text, "saved").unwrap();
        let t = &c.targets[0];
        assert_eq!(t.luns.len(), 2, "{text}");
        assert_eq!((t.luns[1].id, t.luns[1].block_size), (3, 4096));
        assert_eq!(t.allowed_initiators, ["iqn.2026-11.io.x:i1"]);
        assert_eq!(t.chap.as_ref().map(|c| c.user.as_str()), Some("u"));
        // The default's comments survive.
        assert!(
            text.contains("# nvtarget's built-in configuration"),
            "{text}"
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let p = f.prepare(|doc| remove_lun(doc, T, 3)).unwrap();
        f.commit(&p).unwrap();
        let p = f.prepare(|doc| set_chap(doc, T, None)).unwrap();
        f.commit(&p).unwrap();
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.targets[0].luns.len(), 1);
        assert!(c.targets[0].chap.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn invalid_results_are_refused_and_not_written() {
        let d = dir("bad");
        let f = ConfigFile::new(ConfigFile::saved_path(&d));
        let e = f
            .prepare(|doc| add_lun(doc, T, 0, None, "1GiB", None))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("LUN 0 is defined twice"), "{e:#}");
        let e = f
            .prepare(|doc| add_lun(doc, T, 1, None, "100GiB", None))
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("larger than the aggregate"),
            "{e:#}"
        );
        let e = f
            .prepare(|doc| set_allowed(doc, T, &["Not An IQN".to_string()]))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not a valid iSCSI name"), "{e:#}");
        let e = f
            .prepare(|doc| add_lun(doc, "iqn.2026-11.io.x:nope", 1, None, "1GiB", None))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not in this node's configuration"));
        assert!(!f.path().exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
