//! One node: its targets with their SCSI state, who may reach them, and the
//! iSCSI parameters it offers. Built once from the configuration; shared by
//! every portal and connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nvtarget_scsi::{
    AluaState, BlockDevice, LunConfig as ScsiLun, PortGroup, ScsiTarget,
    TargetConfig as ScsiTargetConfig,
};
use parking_lot::RwLock;

use crate::config::{parse_size, Backend, ChapSection, Config, LunConfig, NvramDurability};
use crate::filedev::FileDevice;
use crate::metrics::{MeteredDevice, Metrics};
use crate::partner::{LunMapEntry, RemoteTarget};
use crate::storedev::{Fence, LogOptions, Store, StoreDevice};

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

pub struct TargetEntry {
    scsi: Arc<ScsiTarget>,
    allowed: Vec<String>,
    chap: Option<ChapConfig>,
    /// LUN id -> block size, for the write residual adapter in the portal.
    block_sizes: Vec<(u64, u32)>,
    /// The LUNs as configured, in id order (status, live changes).
    luns: Vec<LunConfig>,
    /// The aggregate its store LUNs live in (ours, or the partner's after a
    /// takeover) and the data directory of its files and PR state.
    store: Option<Arc<Store>>,
    data_dir: PathBuf,
}

/// A served target as `nvtarget status` shows it.
pub struct TargetView {
    pub name: String,
    pub allowed: Vec<String>,
    pub chap: bool,
    pub luns: Vec<LunConfig>,
    pub store: Option<Arc<Store>>,
    pub data_dir: PathBuf,
    pub port_groups: Vec<PortGroup>,
}

/// A partner's target presented here (see `partner.rs`).
pub struct RemoteEntry {
    pub target: Arc<RemoteTarget>,
    pub allowed: Vec<String>,
    pub chap: Option<ChapConfig>,
    pub block_sizes: Vec<(u64, u32)>,
}

pub struct Node {
    /// This node's targets, and the partner's while taken over.
    targets: RwLock<BTreeMap<String, TargetEntry>>,
    /// The partner's targets while it serves them (a local target of the
    /// same name, after a takeover, wins).
    remote: RwLock<BTreeMap<String, RemoteEntry>>,
    /// "ADDR:PORT,TPGT" of every portal, for SendTargets.
    portal_addrs: RwLock<Vec<String>>,
    config: Config,
    store: Option<Arc<Store>>,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
}

/// ALUA placement of a target in a pair: which port groups exist and which
/// one is this node's. Port group N holds relative port N (= the portal's
/// TPGT).
#[derive(Clone, Copy, Debug)]
pub struct AluaLayout {
    /// The TPGT of the owner's portal.
    pub owner_group: u16,
    /// The TPGT of the partner's portal, if in a pair.
    pub partner_group: Option<u16>,
    /// State of the partner's group (standby while the partner does not
    /// serve this target; active/optimized after a takeover).
    pub partner_state: AluaState,
}

impl Node {
    /// Opens every LUN's storage and builds the SCSI targets.
    pub fn build(
        config: Config,
        data_dir: &Path,
        metrics: Arc<Metrics>,
        fence: Option<Arc<dyn Fence>>,
    ) -> anyhow::Result<Node> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let needs_store = config
            .targets
            .iter()
            .flat_map(|t| &t.luns)
            .any(|l| l.backend == Backend::Store);
        let store = if needs_store {
            let aggr = Store::mount(
                &nvtarget_lun::cli::aggr_path(data_dir),
                config.aggregate_size(),
                fence,
            )?;
            Some(Store::with_log(
                aggr,
                &nvtarget_nvram::region_path(data_dir),
                log_options(&config),
                metrics.clone(),
            )?)
        } else {
            None
        };
        let alua = config.pair.as_ref().map(|_| AluaLayout {
            owner_group: config.portals.first().map_or(1, |p| p.tpgt),
            partner_group: Some(config.partner_tpgt()),
            partner_state: AluaState::ActiveNonOptimized,
        });
        let targets = build_targets(&config, store.as_ref(), data_dir, &metrics, alua)?;
        let portal_addrs = config
            .portals
            .iter()
            .map(|p| format!("{},{}", p.listen, p.tpgt))
            .collect();
        Ok(Node {
            targets: RwLock::new(targets.into_iter().collect()),
            remote: RwLock::new(BTreeMap::new()),
            portal_addrs: RwLock::new(portal_addrs),
            config,
            store,
            metrics,
            data_dir: data_dir.to_path_buf(),
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

    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The SCSI side of a target.
    pub fn target(&self, name: &str) -> Option<Arc<ScsiTarget>> {
        self.targets.read().get(name).map(|t| t.scsi.clone())
    }

    /// A partner's target presented here, unless served locally.
    pub fn remote(&self, name: &str) -> Option<Arc<RemoteTarget>> {
        self.remote.read().get(name).map(|r| r.target.clone())
    }

    pub fn set_remote(&self, entries: Vec<(String, RemoteEntry)>) {
        *self.remote.write() = entries.into_iter().collect();
    }

    /// Names of the targets served now.
    pub fn target_names(&self) -> Vec<String> {
        self.targets.read().keys().cloned().collect()
    }

    /// LUN id -> block size of a target's LUNs.
    pub fn block_sizes(&self, name: &str) -> Vec<(u64, u32)> {
        if let Some(t) = self.targets.read().get(name) {
            return t.block_sizes.clone();
        }
        self.remote
            .read()
            .get(name)
            .map(|t| t.block_sizes.clone())
            .unwrap_or_default()
    }

    /// Serves `targets` too (a takeover).
    pub fn add_targets(&self, targets: Vec<(String, TargetEntry)>) {
        self.targets.write().extend(targets);
    }

    /// Stops serving the named targets (a giveback); returns what was removed.
    pub fn remove_targets(&self, names: &[String]) -> Vec<Arc<ScsiTarget>> {
        let mut t = self.targets.write();
        names
            .iter()
            .filter_map(|n| t.remove(n).map(|e| e.scsi))
            .collect()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The targets served here (ours, and the partner's after a takeover).
    pub fn target_views(&self) -> Vec<TargetView> {
        self.targets
            .read()
            .iter()
            .map(|(name, t)| TargetView {
                name: name.clone(),
                allowed: t.allowed.clone(),
                chap: t.chap.is_some(),
                luns: t.luns.clone(),
                store: t.store.clone(),
                data_dir: t.data_dir.clone(),
                port_groups: t.scsi.port_groups(),
            })
            .collect()
    }

    /// Serves `l` as a new LUN of `target` at once: initiators logged in
    /// get REPORTED LUNS DATA HAS CHANGED.
    pub fn add_lun(&self, target: &str, l: LunConfig) -> anyhow::Result<()> {
        let (store, data_dir) = {
            let targets = self.targets.read();
            let t = targets
                .get(target)
                .with_context(|| format!("no target {target} is served here"))?;
            if t.luns.iter().any(|x| x.id == l.id) {
                anyhow::bail!("{target} already has a LUN {}", l.id);
            }
            (t.store.clone(), t.data_dir.clone())
        };
        let (lun, _) = build_lun(target, &l, store.as_ref(), &data_dir, &self.metrics)?;
        {
            let mut targets = self.targets.write();
            let t = targets
                .get_mut(target)
                .with_context(|| format!("{target} went away"))?;
            if t.luns.iter().any(|x| x.id == l.id) {
                anyhow::bail!("{target} already has a LUN {}", l.id);
            }
            t.scsi.add_lun(lun);
            t.block_sizes.push((l.id, l.block_size));
            t.luns.push(l);
            t.luns.sort_by_key(|x| x.id);
        }
        self.republish_lun_map();
        Ok(())
    }

    /// Stops serving LUN `id` of `target`. Its data stays in the aggregate
    /// (or its image file): adding a LUN of the same name serves it again.
    pub fn remove_lun(&self, target: &str, id: u64) -> anyhow::Result<LunConfig> {
        let l = {
            let mut targets = self.targets.write();
            let t = targets
                .get_mut(target)
                .with_context(|| format!("no target {target} is served here"))?;
            let pos = t
                .luns
                .iter()
                .position(|x| x.id == id)
                .with_context(|| format!("{target} has no LUN {id}"))?;
            t.scsi.remove_lun(id);
            t.block_sizes.retain(|(x, _)| *x != id);
            t.luns.remove(pos)
        };
        self.republish_lun_map();
        Ok(l)
    }

    /// Replaces who may log in to `target` (empty: everyone). Checked at
    /// every login, so it applies to the next one.
    pub fn set_allowed(&self, target: &str, allowed: Vec<String>) -> anyhow::Result<()> {
        let mut targets = self.targets.write();
        let t = targets
            .get_mut(target)
            .with_context(|| format!("no target {target} is served here"))?;
        t.allowed = allowed;
        Ok(())
    }

    /// Replaces the CHAP secrets of `target` (None: no CHAP).
    pub fn set_chap(&self, target: &str, chap: Option<ChapConfig>) -> anyhow::Result<()> {
        let mut targets = self.targets.write();
        let t = targets
            .get_mut(target)
            .with_context(|| format!("no target {target} is served here"))?;
        t.chap = chap;
        Ok(())
    }

    /// A pair partner finds our store LUNs by the map in our data
    /// directory: keep it in step with live LUN changes.
    fn republish_lun_map(&self) {
        if self.config.pair.is_none() {
            return;
        }
        let Some(own) = &self.store else { return };
        let mut map = Vec::new();
        for (name, t) in self.targets.read().iter() {
            if !t.store.as_ref().is_some_and(|s| Arc::ptr_eq(s, own)) {
                continue;
            }
            for l in t.luns.iter().filter(|l| l.backend == Backend::Store) {
                if let Some(info) = own.aggregate().lun_by_name(&l.name()) {
                    map.push(LunMapEntry {
                        target: name.clone(),
                        lun: l.id,
                        aggr_lun: info.id,
                        block_size: l.block_size,
                    });
                }
            }
        }
        crate::partner::publish_lun_map(&self.data_dir, &map);
    }

    /// Sets the ALUA state of port group `group` on every target served.
    pub fn set_alua_state(&self, group: u16, state: AluaState) {
        for t in self.targets.read().values() {
            t.scsi.set_alua_state(group, state);
        }
    }

    pub fn add_portal_addr(&self, addr: String) {
        let mut p = self.portal_addrs.write();
        if !p.contains(&addr) {
            p.push(addr);
        }
    }

    pub fn remove_portal_addr(&self, addr: &str) {
        self.portal_addrs.write().retain(|a| a != addr);
    }

    pub fn target_access(&self, target: &str, initiator: &str) -> Access {
        let (allowed_list, chap) = match self.targets.read().get(target) {
            Some(t) => (t.allowed.clone(), t.chap.clone()),
            None => match self.remote.read().get(target) {
                Some(r) => (r.allowed.clone(), r.chap.clone()),
                None => return Access::NotFound,
            },
        };
        if allowed(&allowed_list, initiator) {
            Access::Allowed { chap }
        } else {
            Access::Denied
        }
    }

    /// Targets `initiator` may see, each with the portals serving it.
    pub fn visible_targets(&self, initiator: &str) -> Vec<(String, Vec<String>)> {
        let portals = self.portal_addrs.read().clone();
        // In a pair every target is reachable through both nodes (ALUA):
        // list the partner's portal too, so one discovery finds every path.
        let partner = self
            .config
            .pair
            .as_ref()
            .map(|p| format!("{},{}", p.partner_portal, self.config.partner_tpgt()));
        let partner: Vec<String> = partner.into_iter().collect();
        // Both lists without duplicates (after a takeover our portals hold
        // the partner's address already), `first` first.
        let merge = |first: &[String], then: &[String]| {
            let mut out = first.to_vec();
            out.extend(then.iter().filter(|a| !first.contains(a)).cloned());
            out
        };
        let own = merge(&portals, &partner);
        let mut v: BTreeMap<String, Vec<String>> = self
            .targets
            .read()
            .iter()
            .filter(|(_, t)| allowed(&t.allowed, initiator))
            .map(|(n, _)| (n.clone(), own.clone()))
            .collect();
        for (n, r) in self.remote.read().iter() {
            if allowed(&r.allowed, initiator) {
                // The owner's portal first.
                v.entry(n.clone())
                    .or_insert_with(|| merge(&partner, &portals));
            }
        }
        v.into_iter().collect()
    }

    /// Whether writes wait for something slow (a partner's mirror ack, a
    /// device sync): then sessions run their I/O concurrently.
    /// Plain I/O runs on the blocking pool: `power` mode waits for the
    /// device (group commit) inside the write.
    pub fn offload_io(&self) -> bool {
        self.config.node.nvram_durability == NvramDurability::Power
    }

    /// A pair node in `process` mode runs I/O inline and waits for the
    /// partner's ack on the connection task, without a thread
    /// (`storedev::deferring_mirror_waits`).
    pub fn defer_mirror_waits(&self) -> bool {
        self.config.pair.is_some() && !self.offload_io()
    }

    pub fn iscsi_params(&self) -> &crate::config::IscsiSection {
        &self.config.iscsi
    }
}

pub fn log_options(config: &Config) -> LogOptions {
    LogOptions {
        size: config.nvram_size(),
        cp_interval: config.cp_interval(),
        durability: match config.node.nvram_durability {
            NvramDurability::Process | NvramDurability::BenchNoLog => {
                nvtarget_nvram::Durability::Process
            }
            NvramDurability::Power => nvtarget_nvram::Durability::Power,
        },
        bench_no_log: config.node.nvram_durability == NvramDurability::BenchNoLog,
    }
}

/// The SCSI targets of `config` over `store` (LUN images and PR state under
/// `data_dir`, which is the partner's after a takeover).
pub fn build_targets(
    config: &Config,
    store: Option<&Arc<Store>>,
    data_dir: &Path,
    metrics: &Arc<Metrics>,
    alua: Option<AluaLayout>,
) -> anyhow::Result<Vec<(String, TargetEntry)>> {
    let mut targets = Vec::new();
    let mut lun_map = Vec::new();
    for t in &config.targets {
        let mut luns = Vec::new();
        for l in &t.luns {
            let (lun, entry) = build_lun(&t.name, l, store, data_dir, metrics)?;
            lun_map.extend(entry);
            luns.push(lun);
        }
        let mut tc = ScsiTargetConfig::single_port(&t.name);
        if let Some(a) = alua {
            tc.port_groups = vec![PortGroup::new(
                a.owner_group,
                AluaState::ActiveOptimized,
                vec![a.owner_group],
            )];
            if let Some(g) = a.partner_group {
                tc.port_groups
                    .push(PortGroup::new(g, a.partner_state, vec![g]));
            }
        }
        let scsi = ScsiTarget::new(tc, luns);
        targets.push((
            t.name.clone(),
            TargetEntry {
                scsi: Arc::new(scsi),
                allowed: t.allowed_initiators.clone(),
                chap: t.chap.as_ref().map(ChapConfig::from),
                block_sizes: t.luns.iter().map(|l| (l.id, l.block_size)).collect(),
                luns: t.luns.clone(),
                store: store.cloned(),
                data_dir: data_dir.to_path_buf(),
            },
        ));
    }
    if config.pair.is_some() {
        crate::partner::publish_lun_map(data_dir, &lun_map);
    }
    Ok(targets)
}

/// One LUN's device and SCSI identity; for a store LUN also its place in
/// the aggregate (the partner's map for live replay).
fn build_lun(
    target: &str,
    l: &LunConfig,
    store: Option<&Arc<Store>>,
    data_dir: &Path,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(ScsiLun, Option<LunMapEntry>)> {
    // validated by Config::parse
    let size = parse_size(&l.size).unwrap_or(0);
    let mut map_entry = None;
    let device: Arc<dyn BlockDevice> = match l.backend {
        Backend::Store => {
            let store = store.context("store backend without an aggregate")?;
            let id = store
                .ensure_lun(&l.name(), size, l.block_size)
                .with_context(|| format!("LUN {} of {target}", l.id))?;
            map_entry = Some(LunMapEntry {
                target: target.to_string(),
                lun: l.id,
                aggr_lun: id,
                block_size: l.block_size,
            });
            Arc::new(StoreDevice::new(store.clone(), id, l.block_size))
        }
        Backend::File => {
            let path = lun_file(data_dir, target, l);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
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
    let device: Arc<dyn BlockDevice> = Arc::new(MeteredDevice::new(device, metrics, target, l.id));
    let lun = ScsiLun {
        id: l.id,
        device,
        vendor: "NVTARGET".into(),
        product: "nvtarget LUN".into(),
        serial: serial_for(target, l.id),
        naa_id: naa_for(target, l.id),
        removable: l.removable,
        read_only: l.read_only,
        pr_store: Some(Arc::new(crate::prstore::FilePrStore::new(
            data_dir
                .join("pr")
                .join(format!("{}-{}.pr", file_safe(target), l.id)),
        ))),
    };
    Ok((lun, map_entry))
}

/// Where a file-backend LUN keeps its image.
pub fn lun_file(data_dir: &Path, target: &str, l: &LunConfig) -> PathBuf {
    data_dir
        .join("luns")
        .join(file_safe(target))
        .join(format!("{}.img", l.name()))
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
