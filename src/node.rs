//! One node: its targets with their SCSI state, who may reach them, and the
//! iSCSI parameters it offers. Built once from the configuration; shared by
//! every portal and connection.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use nvtarget_scsi::{
    BlockDevice, LunConfig as ScsiLun, ScsiTarget, TargetConfig as ScsiTargetConfig,
};

use crate::config::{parse_size, Backend, ChapSection, Config, NvramDurability};
use crate::filedev::FileDevice;
use crate::metrics::{MeteredDevice, Metrics};
use crate::storedev::{LogOptions, Store, StoreDevice};

/// Whether an initiator may log in to a target.
#[derive(Debug, Clone)]
pub enum Access {
    NotFound,
    Denied,
    Allowed { chap: Option<ChapConfig> },
}

#[derive(Debug, Clone)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    /// (user, secret) the target answers with in mutual CHAP.
    pub mutual: Option<(String, String)>,
}

impl From<&ChapSection> for ChapConfig {
    fn from(c: &ChapSection) -> Self {
        ChapConfig {
            user: c.user.clone(),
            secret: c.secret.clone(),
            mutual: c.mutual_user.clone().zip(c.mutual_secret.clone()),
        }
    }
}

struct TargetEntry {
    scsi: Arc<ScsiTarget>,
    allowed: Vec<String>,
    chap: Option<ChapConfig>,
}

pub struct Node {
    targets: BTreeMap<String, TargetEntry>,
    /// "ADDR:PORT,TPGT" of every portal, for SendTargets.
    portal_addrs: Vec<String>,
    config: Config,
    store: Option<Arc<Store>>,
}

impl Node {
    /// Opens every LUN's storage and builds the SCSI targets.
    pub fn build(config: Config, data_dir: &Path, metrics: Arc<Metrics>) -> anyhow::Result<Node> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let needs_store = config
            .targets
            .iter()
            .flat_map(|t| &t.luns)
            .any(|l| l.backend == Backend::Store);
        let store = if needs_store {
            Some(Store::open(
                data_dir,
                config.aggregate_size(),
                LogOptions {
                    size: config.nvram_size(),
                    durability: match config.node.nvram_durability {
                        NvramDurability::Process => nvtarget_nvram::Durability::Process,
                        NvramDurability::Power => nvtarget_nvram::Durability::Power,
                    },
                },
                metrics.clone(),
            )?)
        } else {
            None
        };
        let mut targets = BTreeMap::new();
        for t in &config.targets {
            let mut luns = Vec::new();
            for l in &t.luns {
                // validated by Config::parse
                let size = parse_size(&l.size).unwrap_or(0);
                let device: Arc<dyn BlockDevice> = match l.backend {
                    Backend::Store => {
                        let store = store
                            .clone()
                            .context("store backend without an aggregate")?;
                        let id = store
                            .ensure_lun(&l.name(), size, l.block_size)
                            .with_context(|| format!("LUN {} of {}", l.id, t.name))?;
                        Arc::new(StoreDevice::new(store, id, l.block_size))
                    }
                    Backend::File => {
                        let dir = data_dir.join("luns").join(file_safe(&t.name));
                        std::fs::create_dir_all(&dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                        let path = dir.join(format!("{}.img", l.name()));
                        Arc::new(
                            FileDevice::open(&path, size, l.block_size)
                                .with_context(|| format!("opening LUN image {}", path.display()))?,
                        )
                    }
                    Backend::Memory => Arc::new(nvtarget_scsi::MemDevice::new(
                        size / l.block_size as u64,
                        l.block_size,
                    )),
                };
                let device: Arc<dyn BlockDevice> =
                    Arc::new(MeteredDevice::new(device, &metrics, &t.name, l.id));
                let serial = serial_for(&t.name, l.id);
                luns.push(ScsiLun {
                    id: l.id,
                    device,
                    vendor: "NVTARGET".into(),
                    product: "nvtarget LUN".into(),
                    serial: serial.clone(),
                    naa_id: naa_for(&t.name, l.id),
                    removable: l.removable,
                    read_only: l.read_only,
                    pr_store: Some(Arc::new(crate::prstore::FilePrStore::new(
                        data_dir
                            .join("pr")
                            .join(format!("{}-{}.pr", file_safe(&t.name), l.id)),
                    ))),
                });
            }
            let scsi = ScsiTarget::new(ScsiTargetConfig::single_port(&t.name), luns);
            targets.insert(
                t.name.clone(),
                TargetEntry {
                    scsi: Arc::new(scsi),
                    allowed: t.allowed_initiators.clone(),
                    chap: t.chap.as_ref().map(ChapConfig::from),
                },
            );
        }
        let portal_addrs = config
            .portals
            .iter()
            .map(|p| format!("{},{}", p.listen, p.tpgt))
            .collect();
        Ok(Node {
            targets,
            portal_addrs,
            config,
            store,
        })
    }

    /// Makes everything written so far durable (a final CP).
    pub fn shutdown(&self) -> anyhow::Result<()> {
        if let Some(s) = &self.store {
            s.checkpoint().context("final consistency point")?;
        }
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The SCSI side of a target.
    pub fn target(&self, name: &str) -> Option<Arc<ScsiTarget>> {
        self.targets.get(name).map(|t| t.scsi.clone())
    }

    pub fn target_access(&self, target: &str, initiator: &str) -> Access {
        match self.targets.get(target) {
            None => Access::NotFound,
            Some(t) if !allowed(&t.allowed, initiator) => Access::Denied,
            Some(t) => Access::Allowed {
                chap: t.chap.clone(),
            },
        }
    }

    /// Targets `initiator` may see, each with the portals serving it.
    pub fn visible_targets(&self, initiator: &str) -> Vec<(String, Vec<String>)> {
        self.targets
            .iter()
            .filter(|(_, t)| allowed(&t.allowed, initiator))
            .map(|(n, _)| (n.clone(), self.portal_addrs.clone()))
            .collect()
    }

    pub fn iscsi_params(&self) -> &crate::config::IscsiSection {
        &self.config.iscsi
    }
}

fn allowed(list: &[String], initiator: &str) -> bool {
    list.is_empty() || list.iter().any(|i| i.eq_ignore_ascii_case(initiator))
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// FNV-1a: a stable identity for a LUN from its target name and id, so the
/// serial number and NAA designator survive restarts without stored state.
fn fnv(target: &str, lun: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes().chain(lun.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn serial_for(target: &str, lun: u64) -> String {
    format!("{:016x}", fnv(target, lun))
}

/// NAA 6 (IEEE Registered Extended) identifier: NAA nibble 6, a 24-bit
/// company id (locally administered placeholder 0x000000 is not allowed, so
/// use the OUI-less 0x0A0B0C), then 36 bits of vendor-specific identifier.
fn naa_for(target: &str, lun: u64) -> u64 {
    (0x6u64 << 60) | (0x0A0B0Cu64 << 36) | (fnv(target, lun) & 0xF_FFFF_FFFF)
}
