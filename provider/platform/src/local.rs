//! The local platform: every node is a detached bootstrapper process with its own detached
//! swtpm, its own folder under the cluster folder, and its own loopback address (127.a.b.c), on
//! which it serves the well-known node ports.
//!
//! Files under the cluster folder:
//! - `platform.json`: what the launcher recorded (pids, TPM ports, addresses, pinned AKs);
//! - `metadata.json`: what nodes read through the `Metadata` seam (no pids, no secrets: the init
//!   secret appears only as its Argon2id hash);
//! - `nodes/<name>/{tpm,state,bootstrapper.log}`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::tpm::{AkKind, Swtpm, SwtpmHandle, Tpm, TpmError};
use constellation_common::metadata::{
    ports, ClusterMetadata, FileMetadata, MetadataError, NodeInfo, Role,
};
use constellation_common::node_status::{NodeStatus, ETCD_DAEMON};
use constellation_common::secret_file::{
    ensure_private_dir, write_private_atomic, SecretFileError,
};
use constellation_image::{
    boot_events, ImageError, ImageManifest, BOOTSTRAPPER_FILE, MANIFEST_FILE,
};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::{process, Cloud};

const STATE_FILE: &str = "platform.json";
const METADATA_FILE: &str = "metadata.json";
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long local nodes get to join after Init or a reboot.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why a platform operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed platform state: {source}")]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("node {node}: TPM: {source}")]
    Tpm { node: String, source: TpmError },
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("node image: {0}")]
    NodeImage(#[from] constellation_image::qemu::NodeImageError),
    #[error("metadata: {0}")]
    Metadata(#[from] MetadataError),
    #[error("node {node}: the TPM's attestation key changed (pinned {pinned}, now {found}); refusing to boot it")]
    AkChanged {
        node: String,
        pinned: String,
        found: String,
    },
    #[error("node {node} did not come up (waited at most {timeout:?}); last log lines:\n{log}")]
    NodeStart {
        node: String,
        timeout: Duration,
        log: String,
    },
    #[error("no node named {0}")]
    UnknownNode(String),
    #[error("no free loopback address found for a new node")]
    NoAddress,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PlatformError + '_ {
    move |source| PlatformError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a cluster folder's platform state (`platform.json`), local or QEMU.
pub(crate) fn load_state<S: serde::de::DeserializeOwned>(root: &Path) -> Result<S, PlatformError> {
    let path = root.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| PlatformError::State { path, source })
}

/// Writes a cluster folder's platform state and the metadata its nodes read. Both hold the
/// pinned AKs, so they are written atomically, 0600: a swapped file would make the platform
/// (or a join service) trust another TPM.
pub(crate) fn save_state(
    root: &Path,
    state: &impl Serialize,
    settings: &ClusterSettings,
    nodes: Vec<NodeInfo>,
    metadata_path: &Path,
) -> Result<(), PlatformError> {
    let path = root.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state).expect("platform state serializes");
    write_private_atomic(&path, &bytes).map_err(|e| PlatformError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    let metadata = ClusterMetadata {
        cluster_name: settings.cluster_name.clone(),
        init_secret_hash: settings.init_secret_hash.clone(),
        attestation_variant: settings.attestation_variant.clone(),
        measurements_json: settings.measurements_json.clone(),
        // Local nodes attest with qemu-vtpm: no SEV-SNP settings to enforce.
        snp_settings_json: String::new(),
        nodes,
    };
    FileMetadata::write(metadata_path, &metadata)?;
    Ok(())
}

/// Node folders hold TPM state, state disks and keys: only the launcher's user may enter.
pub(crate) fn private_dir(dir: &Path) -> Result<(), PlatformError> {
    ensure_private_dir(dir).map_err(|e: SecretFileError| PlatformError::Io {
        path: dir.to_owned(),
        source: e.into(),
    })
}

/// One node as the launcher recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub ip: IpAddr,
    pub dir: PathBuf,
    /// The bootstrapper's pid (0 when not running).
    pub pid: u32,
    pub swtpm: Option<SwtpmHandle>,
    /// Pinned attestation key, SubjectPublicKeyInfo DER as hex.
    pub ak_spki_hex: String,
    /// The image this node booted (normally the cluster's; tests boot other images).
    pub image_dir: PathBuf,
}

impl NodeRecord {
    /// `host:port` of one of the node's well-known ports.
    pub fn endpoint(&self, port: u16) -> String {
        SocketAddr::new(self.ip, port).to_string()
    }

    fn marker(&self) -> String {
        self.dir.display().to_string()
    }

    /// The bootstrapper process runs.
    pub fn bootstrapper_alive(&self) -> bool {
        self.pid != 0 && process::running(self.pid, &self.marker())
    }

    /// Both the bootstrapper and its TPM run.
    pub fn is_alive(&self) -> bool {
        self.bootstrapper_alive() && self.swtpm.as_ref().is_some_and(SwtpmHandle::is_alive)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("bootstrapper.log")
    }

    /// The status the node's current bootstrapper reported (its phase, and why a join service
    /// refused it); `None` before this boot's bootstrapper wrote one. A status left by an
    /// earlier boot carries another pid and is ignored.
    pub fn status(&self) -> Option<NodeStatus> {
        match NodeStatus::read(&self.dir.join("state")) {
            Ok(Some(status)) if status.pid == self.pid && self.pid != 0 => Some(status),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(node = %self.name, "unreadable node status: {e}");
                None
            }
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            role: self.role,
            ip: self.ip,
            ak_spki_hex: self.ak_spki_hex.clone(),
        }
    }
}

/// Cluster-wide settings the platform publishes to nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub cluster_name: String,
    pub init_secret_hash: String,
    pub attestation_variant: String,
    pub measurements_json: String,
    pub image_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlatformState {
    settings: ClusterSettings,
    next_index: u32,
    nodes: Vec<NodeRecord>,
}

/// The local platform for one cluster folder.
#[derive(Debug)]
pub struct LocalCloud {
    root: PathBuf,
    state: PlatformState,
}

impl LocalCloud {
    /// Prepares a new cluster folder (no node started yet).
    pub fn create(root: &Path, settings: ClusterSettings) -> Result<Self, PlatformError> {
        private_dir(root)?;
        private_dir(&root.join("nodes"))?;
        let cloud = Self {
            root: root.to_owned(),
            state: PlatformState {
                settings,
                next_index: 0,
                nodes: Vec::new(),
            },
        };
        cloud.save()?;
        Ok(cloud)
    }

    /// Opens an existing cluster folder.
    pub fn open(root: &Path) -> Result<Self, PlatformError> {
        Ok(Self {
            root: root.to_owned(),
            state: load_state(root)?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.state.settings
    }

    pub fn metadata_path(&self) -> PathBuf {
        self.root.join(METADATA_FILE)
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.state.nodes.iter().find(|n| n.name == name)
    }

    /// Changes cluster-wide settings (e.g. new measurements) and republishes the metadata.
    pub fn update_settings(
        &mut self,
        f: impl FnOnce(&mut ClusterSettings),
    ) -> Result<(), PlatformError> {
        f(&mut self.state.settings);
        self.save()
    }

    fn save(&self) -> Result<(), PlatformError> {
        let nodes = self.state.nodes.iter().map(NodeRecord::info).collect();
        save_state(
            &self.root,
            &self.state,
            &self.state.settings,
            nodes,
            &self.metadata_path(),
        )
    }

    /// Adds a node record (not started) with a fresh name, folder and loopback address.
    fn add_node(&mut self, role: Role, image_dir: &Path) -> Result<NodeRecord, PlatformError> {
        let index = self.state.next_index;
        self.state.next_index += 1;
        let name = format!(
            "{}-{}-{index}",
            self.state.settings.cluster_name,
            role.as_str()
        );
        let dir = self.root.join("nodes").join(&name);
        private_dir(&dir)?;
        private_dir(&dir.join("state"))?;
        let taken: Vec<IpAddr> = self.state.nodes.iter().map(|n| n.ip).collect();
        let ip = free_loopback_address(&taken)?;
        let record = NodeRecord {
            name,
            role,
            ip,
            dir,
            pid: 0,
            swtpm: None,
            ak_spki_hex: String::new(),
            image_dir: image_dir.to_owned(),
        };
        self.state.nodes.push(record.clone());
        Ok(record)
    }

    /// Adds `count` node records of `role` (not started) booted later from `image_dir`;
    /// returns their names. Boot them with [`LocalCloud::boot_many`].
    pub fn add_nodes(
        &mut self,
        role: Role,
        count: usize,
        image_dir: &Path,
    ) -> Result<Vec<String>, PlatformError> {
        let mut names = Vec::with_capacity(count);
        for _ in 0..count {
            names.push(self.add_node(role, image_dir)?.name);
        }
        self.save()?;
        Ok(names)
    }

    /// Creates and boots one node from `image_dir` (tests use other images than the cluster's).
    pub fn create_node_from_image(
        &mut self,
        role: Role,
        image_dir: &Path,
    ) -> Result<NodeRecord, PlatformError> {
        let record = self.add_node(role, image_dir)?;
        self.boot(&record.name)
    }

    /// Adds `count` nodes of `role` booted from `image_dir` and boots them concurrently.
    /// Returns one result per node, in creation order: every node is recorded (and so torn
    /// down by [`LocalCloud::destroy`]) even when its boot failed.
    pub fn create_nodes_from_image(
        &mut self,
        role: Role,
        count: usize,
        image_dir: &Path,
    ) -> Result<Vec<Result<NodeRecord, PlatformError>>, PlatformError> {
        let names = self.add_nodes(role, count, image_dir)?;
        Ok(self.boot_many(&names))
    }

    /// Boots (or reboots) a node: fresh TPM power cycle, measured boot, bootstrapper start.
    /// The node keeps its folder, TPM state, address and pinned AK.
    pub fn boot(&mut self, name: &str) -> Result<NodeRecord, PlatformError> {
        self.boot_many(&[name.to_owned()])
            .pop()
            .unwrap_or_else(|| Err(PlatformError::UnknownNode(name.to_owned())))
    }

    /// Boots (or reboots) several nodes at once, each on its own thread; one result per name,
    /// in order. The records are saved as each step completes (TPM started, AK pinned,
    /// bootstrapper started), so a launcher killed midway leaves every process recorded.
    pub fn boot_many(&mut self, names: &[String]) -> Vec<Result<NodeRecord, PlatformError>> {
        let halted: Vec<Result<(), PlatformError>> =
            names.iter().map(|name| self.halt(name)).collect();
        let metadata = self.metadata_path();
        let shared = std::sync::Mutex::new(self);
        let images = ImageMeasurements::default();
        std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .zip(halted)
                .map(|(name, halted)| {
                    let (shared, metadata, images) = (&shared, &metadata, &images);
                    scope.spawn(move || {
                        halted?;
                        boot_one(shared, name, metadata, images)
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(names)
                .map(|(h, name)| {
                    h.join().unwrap_or_else(|_| {
                        Err(PlatformError::NodeStart {
                            node: name.clone(),
                            timeout: Duration::ZERO,
                            log: "the boot thread panicked".into(),
                        })
                    })
                })
                .collect()
        })
    }

    /// Stops a node's bootstrapper and TPM (power off); keeps its folder and records.
    pub fn halt(&mut self, name: &str) -> Result<(), PlatformError> {
        let mut record = self
            .node(name)
            .cloned()
            .ok_or_else(|| PlatformError::UnknownNode(name.to_owned()))?;
        power_off(&record)?;
        record.pid = 0;
        record.swtpm = None;
        self.replace(record)
    }

    /// Kills a node's bootstrapper abruptly (SIGKILL), as a crash would; the TPM keeps running.
    pub fn crash(&mut self, name: &str) -> Result<(), PlatformError> {
        let record = self
            .node(name)
            .ok_or_else(|| PlatformError::UnknownNode(name.to_owned()))?;
        process::stop(
            record.pid,
            &record.marker(),
            Signal::SIGKILL,
            Duration::from_secs(1),
        );
        Ok(())
    }

    fn replace(&mut self, record: NodeRecord) -> Result<(), PlatformError> {
        if let Some(slot) = self.state.nodes.iter_mut().find(|n| n.name == record.name) {
            *slot = record;
        }
        self.save()
    }

    /// Stops every node (all at once) and removes the cluster folder. Besides the recorded
    /// pids it stops any process whose command line names a node folder of this cluster (a
    /// node a killed launcher started but did not get to record).
    pub fn destroy(mut self) -> Result<(), PlatformError> {
        let records = self.state.nodes.clone();
        let results: Vec<Result<(), PlatformError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = records
                .iter()
                .map(|r| scope.spawn(move || power_off(r)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Ok(())))
                .collect()
        });
        for r in &mut self.state.nodes {
            r.pid = 0;
            r.swtpm = None;
        }
        results.into_iter().collect::<Result<(), _>>()?;
        process::stop_all_under(&self.root.join("nodes"), STOP_GRACE);
        std::fs::remove_dir_all(&self.root).map_err(io_err(&self.root))
    }
}

/// Stops a node's bootstrapper, any stray process of its folder, and its TPM.
fn power_off(record: &NodeRecord) -> Result<(), PlatformError> {
    if record.pid != 0 {
        process::stop(record.pid, &record.marker(), Signal::SIGTERM, STOP_GRACE);
    }
    if let Some(swtpm) = &record.swtpm {
        swtpm.stop().map_err(|source| PlatformError::Tpm {
            node: record.name.clone(),
            source,
        })?;
    }
    process::stop_all_under(&record.dir, STOP_GRACE);
    Ok(())
}

/// Read-held while a thread talks to a TPM, write-held while it starts a process. libtss2's
/// TPM sockets are not close-on-exec: a process started while another thread has a TPM
/// connection open would inherit it and keep it open, and swtpm, which serves one connection
/// at a time, would then never answer the next one. TPM sessions may overlap each other.
static TPM_OR_SPAWN: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn tpm_session() -> std::sync::RwLockReadGuard<'static, ()> {
    TPM_OR_SPAWN.read().unwrap_or_else(|p| p.into_inner())
}

fn process_start() -> std::sync::RwLockWriteGuard<'static, ()> {
    TPM_OR_SPAWN.write().unwrap_or_else(|p| p.into_inner())
}

/// An image's files as measured for one batch of boots: what firmware and boot loader would
/// extend before the OS runs, from the bytes read at boot time.
struct MeasuredImage {
    bootstrapper: PathBuf,
    events: [(u32, constellation_attestation::measurements::Digest); 2],
}

impl MeasuredImage {
    /// Reads the binary and the manifest once, measures both and checks the manifest names
    /// the binary (what [`constellation_image::LocalImage::open`] checks).
    fn measure(dir: &Path) -> Result<Self, PlatformError> {
        let image_io = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Io { path, source }
        };
        let bootstrapper = dir.join(BOOTSTRAPPER_FILE);
        let manifest_path = dir.join(MANIFEST_FILE);
        let binary = std::fs::read(&bootstrapper).map_err(image_io(&bootstrapper))?;
        let manifest_bytes = std::fs::read(&manifest_path).map_err(image_io(&manifest_path))?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::Manifest {
                path: manifest_path,
                source,
            })?;
        let events = boot_events(&binary, &manifest_bytes);
        let found = hex::encode(events[0].1);
        if found != manifest.bootstrapper_sha256 {
            return Err(ImageError::Inconsistent {
                dir: dir.to_owned(),
                expected: manifest.bootstrapper_sha256,
                found,
            }
            .into());
        }
        Ok(Self {
            bootstrapper,
            events,
        })
    }
}

/// The images of one [`LocalCloud::boot_many`], each measured once however many nodes boot
/// from it: node binaries are tens of MB, and reading and hashing them per node kept the
/// nodes' CPUs from booting. A failed measurement is not kept (the next node measures again
/// and reports its own error).
#[derive(Default)]
struct ImageMeasurements(std::sync::Mutex<HashMap<PathBuf, Arc<MeasurementSlot>>>);

/// One image's measurement once some node took it.
type MeasurementSlot = std::sync::Mutex<Option<Arc<MeasuredImage>>>;

impl ImageMeasurements {
    fn get(&self, dir: &Path) -> Result<Arc<MeasuredImage>, PlatformError> {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dir.to_owned())
            .or_default()
            .clone();
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(measured) = slot.as_ref() {
            return Ok(measured.clone());
        }
        let measured = Arc::new(MeasuredImage::measure(dir)?);
        *slot = Some(measured.clone());
        Ok(measured)
    }
}

/// The slow part of a boot, run on its own thread; `shared` is locked only to record progress.
fn boot_one(
    shared: &std::sync::Mutex<&mut LocalCloud>,
    name: &str,
    metadata: &Path,
    images: &ImageMeasurements,
) -> Result<NodeRecord, PlatformError> {
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    let mut record = lock()
        .node(name)
        .cloned()
        .ok_or_else(|| PlatformError::UnknownNode(name.to_owned()))?;
    let image = images.get(&record.image_dir)?;
    let tpm_err = |source| PlatformError::Tpm {
        node: name.to_owned(),
        source,
    };

    let swtpm = {
        let _exclusive = process_start();
        Swtpm::spawn_detached(&record.dir.join("tpm")).map_err(tpm_err)?
    };
    record.swtpm = Some(swtpm.clone());
    lock().replace(record.clone())?;

    // Measured boot: what firmware and boot loader would extend before the OS runs.
    let ak_hex = {
        let _shared = tpm_session();
        let mut tpm = Tpm::open(&swtpm.tcti()).map_err(tpm_err)?;
        let ak = tpm.attestation_key(AkKind::EcdsaP256).map_err(tpm_err)?;
        for (index, event) in &image.events {
            tpm.pcr_extend(*index, event).map_err(tpm_err)?;
        }
        hex::encode(ak.to_spki_der())
    };
    if record.ak_spki_hex.is_empty() {
        record.ak_spki_hex = ak_hex;
    } else if record.ak_spki_hex != ak_hex {
        return Err(PlatformError::AkChanged {
            node: record.name.clone(),
            pinned: record.ak_spki_hex,
            found: ak_hex,
        });
    }
    lock().replace(record.clone())?;

    let args = vec![
        "--name".to_owned(),
        record.name.clone(),
        "--node-dir".to_owned(),
        record.dir.display().to_string(),
        "--metadata".to_owned(),
        metadata.display().to_string(),
        "--tcti".to_owned(),
        swtpm.tcti(),
    ];
    let log_filter = std::env::var("CONSTELLATION_NODE_LOG").unwrap_or_else(|_| "info".to_owned());
    {
        // Spawn under the lock, so the pid is recorded before another thread saves.
        let _exclusive = process_start();
        let mut cloud = lock();
        record.pid = process::spawn_detached(
            &image.bootstrapper,
            &args,
            &record.log_path(),
            &[("RUST_LOG", log_filter)],
        )
        .map_err(io_err(&image.bootstrapper))?;
        cloud.replace(record.clone())?;
    }
    tracing::info!(node = %record.name, ip = %record.ip, pid = record.pid, "node booted");

    // The node is up once its verification service answers.
    let deadline = Instant::now() + START_TIMEOUT;
    let verify = SocketAddr::new(record.ip, ports::VERIFY);
    while TcpStream::connect_timeout(&verify, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline || !record.bootstrapper_alive() {
            return Err(PlatformError::NodeStart {
                node: record.name.clone(),
                timeout: START_TIMEOUT,
                log: process::log_failure(&record.log_path(), 20),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(record)
}

/// A local node is a bootstrapper process with its own swtpm as its TPM: a vTPM guest.
pub const NODE_VARIANT: constellation_attestation::Variant =
    constellation_attestation::Variant::QemuVtpm;

impl Cloud for LocalCloud {
    fn root(&self) -> &Path {
        &self.root
    }

    fn attestation_variant(&self) -> constellation_attestation::Variant {
        NODE_VARIANT
    }

    fn settings(&self) -> &ClusterSettings {
        &self.state.settings
    }

    fn set_settings(&mut self, settings: ClusterSettings) -> Result<(), PlatformError> {
        self.update_settings(|s| *s = settings)
    }

    fn node(&self, name: &str) -> Option<&NodeRecord> {
        LocalCloud::node(self, name)
    }

    fn list_nodes(&self) -> Vec<NodeRecord> {
        self.state.nodes.clone()
    }

    fn add_nodes(
        &mut self,
        role: Role,
        count: usize,
        image_dir: &Path,
    ) -> Result<Vec<String>, PlatformError> {
        LocalCloud::add_nodes(self, role, count, image_dir)
    }

    fn boot_many(&mut self, names: &[String]) -> Vec<Result<NodeRecord, PlatformError>> {
        LocalCloud::boot_many(self, names)
    }

    /// Unlists the node first, so that, for a control plane, the others remove its etcd member
    /// while it still runs (a cluster of two members that lost one has no quorum); then stops
    /// it and removes its folder.
    fn delete_node(&mut self, name: &str) -> Result<(), PlatformError> {
        let record = self
            .node(name)
            .cloned()
            .ok_or_else(|| PlatformError::UnknownNode(name.to_owned()))?;
        self.state.nodes.retain(|n| n.name != name);
        self.save()?;
        if record.role == Role::ControlPlane {
            wait_etcd_member_removed(&self.state.nodes, name);
        }
        power_off(&record)?;
        std::fs::remove_dir_all(&record.dir).map_err(io_err(&record.dir))
    }

    fn destroy(self: Box<Self>) -> Result<(), PlatformError> {
        LocalCloud::destroy(*self)
    }

    fn join_timeout(&self) -> Duration {
        JOIN_TIMEOUT
    }
}

/// How long a deleted control plane keeps running while the others remove its etcd member.
const ETCD_MEMBER_REMOVAL_WAIT: Duration = Duration::from_secs(15);

/// Waits until a running control plane of `remaining` that runs an etcd member reports members
/// without `name` (its reconciliation removed the member). Returns at once when none of them
/// runs etcd (no etcd, or not initialized yet); after [`ETCD_MEMBER_REMOVAL_WAIT`] it gives up
/// with a warning: the node is stopped anyway and the member is removed once a quorum answers.
fn wait_etcd_member_removed(remaining: &[NodeRecord], name: &str) {
    let deadline = Instant::now() + ETCD_MEMBER_REMOVAL_WAIT;
    loop {
        let views: Vec<Vec<String>> = remaining
            .iter()
            .filter(|n| n.role == Role::ControlPlane && n.bootstrapper_alive())
            .filter_map(NodeRecord::status)
            .filter(|s| s.daemon(ETCD_DAEMON).is_some())
            .map(|s| s.etcd_members)
            .collect();
        if views.is_empty() {
            return;
        }
        // A view is empty until the control plane's first reconciliation.
        if views
            .iter()
            .any(|members| !members.is_empty() && !members.iter().any(|m| m == name))
        {
            tracing::info!(
                node = name,
                "etcd member of the deleted control plane removed"
            );
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(node = name, waited = ?ETCD_MEMBER_REMOVAL_WAIT,
                "the other control planes still list this control plane's etcd member; stopping it anyway");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback address (127.a.b.c, outside 127.0.0.0/16) on which every node port is free.
pub(crate) fn free_loopback_address(taken: &[IpAddr]) -> Result<IpAddr, PlatformError> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let ip = IpAddr::V4(Ipv4Addr::new(
            127,
            rng.gen_range(1..=254),
            rng.gen_range(0..=255),
            rng.gen_range(1..=254),
        ));
        if taken.contains(&ip) {
            continue;
        }
        let all_free = [
            ports::BOOTSTRAPPER,
            ports::KEY_SERVICE,
            ports::VERIFY,
            ports::JOIN,
        ]
        .iter()
        .all(|&p| TcpListener::bind(SocketAddr::new(ip, p)).is_ok());
        if all_free {
            return Ok(ip);
        }
    }
    Err(PlatformError::NoAddress)
}
