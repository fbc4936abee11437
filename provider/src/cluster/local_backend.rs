//! The cluster backend of the platforms that run on this machine, behind the
//! [`constellation_platform::Cloud`] seam: `platform = "local"` ([`LocalCloud`]: every node a
//! `constellation-bootstrapper` process with its own swtpm) and `platform = "qemu"`
//! ([`QemuCloud`]: every node a VM booting the node image under OVMF with its own vTPM). Which
//! one is chosen by the `platform` attribute ([`create_cloud`], [`open_cloud`]); everything
//! else here only uses the trait.
//!
//! The cluster folder is `<terraform working dir>/.constellation/clusters/<name>` (absolute),
//! recorded in `platform_state` as `{"root": "<path>"}`; the folder's `platform.json` is the
//! authoritative node list. The first control plane is attested over aTLS against the image's
//! measurements before it receives the Init request (and with it the secrets); every node
//! counts as healthy only while it runs and attests with PCR 15 = the cluster ID. While nodes
//! boot, every node's boot phase is reported as progress ([`super::boot_progress`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use constellation_common::metadata::Role;
use constellation_common::secret::SecretBytes;
use constellation_platform::local::{ClusterSettings, LocalCloud, NodeRecord, PlatformError};
use constellation_platform::{Cloud, QemuCloud};
use serde::{Deserialize, Serialize};

use super::boot_progress::with_boot_progress;
use super::journal::Journal;
use super::model::*;
use super::{initialize::*, join_wait::*, node_checks::*, reconcile::*};

/// Cluster folders live here, relative to Terraform's working directory.
pub const CLUSTERS_DIR: &str = ".constellation/clusters";
/// Import parameter naming the cluster folder.
pub const IMPORT_CLUSTER_DIR: &str = "cluster_dir";

/// The backend for the platforms on this machine (`local`, `qemu`).
pub fn local_backend() -> Arc<dyn ClusterBackend> {
    Arc::new(LocalBackend::new(PathBuf::from(CLUSTERS_DIR)))
}

/// Runs clusters on this machine (node processes or VMs, as the spec's platform says), one
/// folder per cluster under `clusters_dir`.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    clusters_dir: PathBuf,
}

/// What the provider keeps in Terraform's private state for a local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PlatformState {
    root: PathBuf,
}

impl PlatformState {
    fn parse(s: &str) -> Result<Self, ClusterError> {
        serde_json::from_str(s).map_err(|e| ClusterError::PlatformState(e.to_string()))
    }
    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub(super) fn platform_err(e: PlatformError) -> ClusterError {
    match &e {
        PlatformError::NodeStart { node, .. }
        | PlatformError::Tpm { node, .. }
        | PlatformError::AkChanged { node, .. } => ClusterError::Node {
            node: node.clone(),
            reason: e.to_string(),
        },
        _ => ClusterError::Other(format!("platform: {e}")),
    }
}

/// Runs a blocking platform call off the async runtime.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClusterError> + Send + 'static,
) -> Result<T, ClusterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClusterError::Other(format!("platform task failed: {e}")))?
}

pub(super) fn is_not_found(e: &PlatformError) -> bool {
    matches!(e, PlatformError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Prepares a new cluster folder of `platform`.
pub(super) fn create_cloud(
    platform: Platform,
    root: &Path,
    settings: ClusterSettings,
) -> Result<Box<dyn Cloud>, ClusterError> {
    let cloud: Box<dyn Cloud> = match platform {
        Platform::Local => Box::new(LocalCloud::create(root, settings).map_err(platform_err)?),
        Platform::Qemu => Box::new(QemuCloud::create(root, settings).map_err(platform_err)?),
    };
    Ok(cloud)
}

/// Opens the cluster folder of `platform`; `None` when it (or its state file) is gone.
pub(super) fn open_cloud(
    platform: Platform,
    root: &Path,
) -> Result<Option<Box<dyn Cloud>>, ClusterError> {
    let opened = match platform {
        Platform::Local => LocalCloud::open(root).map(|c| Box::new(c) as Box<dyn Cloud>),
        Platform::Qemu => QemuCloud::open(root).map(|c| Box::new(c) as Box<dyn Cloud>),
    };
    match opened {
        Ok(c) => Ok(Some(c)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(platform_err(e)),
    }
}

/// The settings a new cluster folder starts with (the init secret's hash comes later).
fn new_settings(spec: &ClusterSpec) -> ClusterSettings {
    ClusterSettings {
        cluster_name: spec.name.clone(),
        init_secret_hash: String::new(),
        attestation_variant: spec.attestation.variant.as_str().to_owned(),
        measurements_json: spec.image.measurements.to_json(),
        image_dir: PathBuf::from(&spec.image.reference),
    }
}

fn journal_path_error(root: &Path) -> impl FnOnce(super::journal::JournalError) -> ClusterError {
    let root = root.to_owned();
    move |e| ClusterError::PlatformState(format!("cluster folder {}: {e}", root.display()))
}

/// Stops every node of the folder and removes it (also a folder that only has a journal).
fn teardown(platform: Platform, root: &Path) -> Result<(), ClusterError> {
    match open_cloud(platform, root)? {
        Some(cloud) => cloud.destroy().map_err(platform_err),
        None => match std::fs::remove_dir_all(root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ClusterError::Other(
                format!("cannot remove {}: {e}", root.display()),
            )),
            _ => Ok(()),
        },
    }
}

/// An attestation failure or refusal with the last lines of the named node's console
/// appended (a VM's serial console, a local node's log); other errors as they are.
fn with_console(platform: Platform, root: &Path, e: ClusterError) -> ClusterError {
    let (ClusterError::Attestation { node, .. } | ClusterError::Refused { node, .. }) = &e else {
        return e;
    };
    let Ok(Some(cloud)) = open_cloud(platform, root) else {
        return e;
    };
    let Some(record) = cloud.node(node) else {
        return e;
    };
    let tail = format!(
        "; last console lines of {node}:\n{}",
        cloud.console_tail(record, CONSOLE_LINES)
    );
    match e {
        ClusterError::Attestation { node, reason } => ClusterError::Attestation {
            node,
            reason: reason + &tail,
        },
        ClusterError::Refused {
            attribute,
            node,
            reason,
        } => ClusterError::Refused {
            attribute,
            node,
            reason: reason + &tail,
        },
        other => other,
    }
}

fn new_init_secret() -> SecretBytes {
    use rand::RngCore;
    let mut b = vec![0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut b);
    SecretBytes::new(b)
}

/// The secrets of a resumed create: the journal's, except that a secret the configuration
/// sets must equal the journal's (the nodes may hold it already).
fn adopt_secrets(
    spec: &ClusterSpec,
    given: GivenSecrets,
    journal: &Journal,
    root: &Path,
) -> Result<ClusterSecrets, ClusterError> {
    let (mine, theirs) = (&spec.secrets, &journal.spec.secrets);
    let differs = |attr: &str| ClusterError::InvalidInput {
        attribute: crate::diag::AttrPath::attr(&[attr]),
        reason: format!(
            "the cluster folder {} holds cluster {:?}, created (or interrupted while \
             being created) with a different {attr}; set {attr} to the value it was \
             created with, or remove that cluster first",
            root.display(),
            spec.name
        ),
    };
    for (is_given, attr, a, b) in [
        (
            given.master_secret_salt,
            "master_secret_salt",
            &mine.master_secret_salt,
            &theirs.master_secret_salt,
        ),
        (
            given.measurement_salt,
            "measurement_salt",
            &mine.measurement_salt,
            &theirs.measurement_salt,
        ),
    ] {
        if is_given && a != b {
            return Err(differs(attr));
        }
    }
    // A write-only master secret is not in the journal: this configuration supplies it.
    let master_secret = if given.master_secret {
        mine.master_secret
            .resume_with(&theirs.master_secret)
            .ok_or_else(|| differs("master_secret"))?
    } else {
        theirs.master_secret.clone()
    };
    Ok(ClusterSecrets {
        master_secret,
        ..theirs.clone()
    })
}

impl LocalBackend {
    pub fn new(clusters_dir: PathBuf) -> Self {
        Self { clusters_dir }
    }

    /// The cluster folder of a state: its platform state, or (when Terraform lost the private
    /// state, as after a provider killed during apply) the folder the name implies.
    fn root_of(&self, state: &ClusterState) -> Result<PathBuf, ClusterError> {
        if state.platform_state.is_empty() {
            return Ok(self.cluster_root(&state.spec.name));
        }
        Ok(PlatformState::parse(&state.platform_state)?.root)
    }

    /// The absolute folder of cluster `name`.
    pub fn cluster_root(&self, name: &str) -> PathBuf {
        let p = self.clusters_dir.join(name);
        std::path::absolute(&p).unwrap_or(p)
    }

    /// A new cluster: journal first (secrets, init secret), then the nodes (all booting at
    /// once, the init secret's Argon2id hash computed meanwhile), Init, journal of Init's
    /// outputs, joins.
    async fn create_fresh(
        &self,
        spec: &ClusterSpec,
        root: PathBuf,
        progress: &dyn Progress,
    ) -> Result<ClusterState, ClusterError> {
        let init_secret = new_init_secret();
        let mut journal = Journal::new(spec.clone(), init_secret.clone());
        let (platform, settings) = (spec.platform, new_settings(spec));
        let (cp, workers) = (spec.control_plane_count, spec.worker_count);
        progress.step(&format!(
            "booting {cp} control-plane and {workers} worker node(s) in {}",
            root.display()
        ));
        let (root2, journal2, secret) = (root.clone(), journal.clone(), init_secret.clone());
        // The control planes boot first and get Init while the workers boot: the workers'
        // first-boot disk formatting (argon2id) then overlaps Init instead of slowing the
        // control plane's, and the workers join as soon as the join service is up. Unless the
        // platform's boots are long and leave cores idle: then all boot at once.
        let (mut cloud, control_planes, workers_to_boot) = blocking(move || {
            std::fs::create_dir_all(&root2).map_err(|e| {
                ClusterError::Other(format!("cannot create {}: {e}", root2.display()))
            })?;
            // The secrets are on disk before any node can receive them.
            journal2.store(&root2).map_err(journal_path_error(&root2))?;
            let mut cloud = create_cloud(platform, &root2, settings)?;
            // Argon2id is deliberately slow: hash while the nodes boot (nodes read the hash
            // only when Init arrives).
            let hasher =
                std::thread::spawn(move || constellation_common::initsecret::hash(secret.expose()));
            // Every node is in the metadata before any boots, as when all booted at once.
            let image = PathBuf::from(&journal2.spec.image.reference);
            let added = cloud
                .add_nodes(Role::ControlPlane, cp as usize, &image)
                .and_then(|c| Ok((c, cloud.add_nodes(Role::Worker, workers as usize, &image)?)))
                .map_err(platform_err);
            let together = cloud.boot_workers_with_control_planes();
            let booted = added.and_then(|(control_planes, workers)| {
                if together {
                    let all: Vec<String> = control_planes.iter().chain(&workers).cloned().collect();
                    boot_retrying(&mut *cloud, &all)?;
                    return Ok((control_planes, Vec::new()));
                }
                boot_retrying(&mut *cloud, &control_planes)?;
                Ok((control_planes, workers))
            });
            let hash = hasher
                .join()
                .map_err(|_| ClusterError::Other("hashing the init secret failed".into()))?;
            cloud
                .update_settings(|s| s.init_secret_hash = hash)
                .map_err(platform_err)?;
            let (control_planes, workers) = booted?;
            let control_planes = records(&*cloud, &control_planes);
            Ok((cloud, control_planes, workers))
        })
        .await?;
        let workers_booted = blocking(move || {
            boot_retrying(&mut *cloud, &workers_to_boot)?;
            Ok(cloud)
        });
        // Both run to the end, so no boot is still starting processes when a failure tears
        // the cluster down.
        let (outputs, cloud) = tokio::join!(
            self.init_and_journal(spec, &control_planes, &mut journal, &root, progress),
            workers_booted
        );
        let (outputs, cloud) = (outputs?, cloud?);
        let cluster_id = cluster_id_bytes(&outputs)?;
        let nodes = cloud.list_nodes();
        wait_joined(
            &*cloud,
            &nodes,
            &spec.image.measurements,
            &cluster_id,
            progress,
        )
        .await?;
        Ok(ClusterState {
            spec: spec.clone(),
            outputs,
            platform_state: PlatformState { root }.encode(),
        })
    }

    /// Sends Init to the first control plane and journals its outputs right away.
    async fn init_and_journal(
        &self,
        spec: &ClusterSpec,
        nodes: &[NodeRecord],
        journal: &mut Journal,
        root: &Path,
        progress: &dyn Progress,
    ) -> Result<ClusterOutputs, ClusterError> {
        let first = nodes
            .iter()
            .find(|n| n.role == Role::ControlPlane)
            .ok_or_else(|| ClusterError::InvalidInput {
                attribute: crate::diag::AttrPath::attr(&["control_plane_count"]),
                reason: "at least one control-plane node is needed".into(),
            })?;
        let outputs = initialize(spec, first, &journal.init_secret, progress).await?;
        progress.step(&format!("node {} initialized the cluster", first.name));
        journal.outputs = Some(outputs.clone());
        let (j, r) = (journal.clone(), root.to_owned());
        blocking(move || j.store(&r).map_err(journal_path_error(&r))).await?;
        Ok(outputs)
    }

    /// Continues a create that a killed provider left behind: the journal's secrets and init
    /// secret, dead or missing nodes booted, Init only if its outputs were never journaled.
    async fn resume(
        &self,
        spec: &ClusterSpec,
        given: GivenSecrets,
        mut journal: Journal,
        root: PathBuf,
        progress: &dyn Progress,
    ) -> Result<ClusterState, ClusterError> {
        if journal.spec.name != spec.name {
            return Err(ClusterError::PlatformState(format!(
                "the journal in {} belongs to cluster {:?}, not {:?}",
                root.display(),
                journal.spec.name,
                spec.name
            )));
        }
        let secrets = adopt_secrets(spec, given, &journal, &root)?;
        let spec = ClusterSpec {
            secrets,
            ..spec.clone()
        };
        if journal.outputs.is_some() {
            for (differs, attr) in [
                (spec.network != journal.spec.network, "network_config"),
                (spec.kms != journal.spec.kms, "kms"),
            ] {
                if differs {
                    return Err(ClusterError::InvalidInput {
                        attribute: crate::diag::AttrPath::attr(&[attr]),
                        reason: format!(
                            "cluster {:?} in {} was initialized with a different {attr}; \
                             restore it to finish the interrupted create",
                            spec.name,
                            root.display()
                        ),
                    });
                }
            }
        }
        progress.step(&format!(
            "resuming the interrupted create of cluster {:?} from {} ({})",
            spec.name,
            Journal::path(&root).display(),
            if journal.outputs.is_some() {
                "initialized; waiting for joins"
            } else {
                "not initialized yet"
            }
        ));
        let (root2, spec2, init_secret) = (root.clone(), spec.clone(), journal.init_secret.clone());
        let platform = spec.platform;
        let cloud = blocking(move || {
            let mut cloud = match open_cloud(platform, &root2)? {
                Some(c) => c,
                None => create_cloud(platform, &root2, new_settings(&spec2))?,
            };
            let hash = cloud
                .settings()
                .init_secret_hash
                .is_empty()
                .then(|| constellation_common::initsecret::hash(init_secret.expose()));
            let (m, image) = (
                spec2.image.measurements.to_json(),
                spec2.image.reference.clone(),
            );
            cloud
                .update_settings(|s| {
                    if let Some(h) = hash {
                        s.init_secret_hash = h;
                    }
                    s.measurements_json = m;
                    s.image_dir = PathBuf::from(image);
                })
                .map_err(platform_err)?;
            let dead: Vec<String> = cloud
                .list_nodes()
                .into_iter()
                .filter(|n| !n.is_alive())
                .map(|n| n.name)
                .collect();
            let mut done = Reconciled::default();
            reconcile(
                &mut *cloud,
                &dead,
                (spec2.control_plane_count, spec2.worker_count),
                &PathBuf::from(&spec2.image.reference),
                &mut done,
            )?;
            Ok(cloud)
        })
        .await?;
        let nodes = cloud.list_nodes();
        let outputs = match journal.outputs.clone() {
            Some(o) => {
                progress.step("Init's outputs are in the journal; not initializing again");
                o
            }
            None => match self
                .init_and_journal(&spec, &nodes, &mut journal, &root, progress)
                .await
            {
                Err(e @ ClusterError::AlreadyInitialized { .. }) => {
                    // The provider stopped after the node accepted Init but before Init's
                    // outputs reached the journal: the admin credentials are gone for good.
                    let r = root.clone();
                    let removed = blocking(move || teardown(platform, &r)).await.is_ok();
                    return Err(ClusterError::Init(format!(
                        "{e}. The interrupted create of cluster {:?} initialized it, but the \
                         provider stopped before it recorded Init's outputs (admin \
                         credentials) in {}; they cannot be recovered. {}",
                        spec.name,
                        Journal::path(&root).display(),
                        if removed {
                            "Its nodes were removed; the next apply creates the cluster anew."
                        } else {
                            "Removing its nodes failed too; stop them and remove the folder."
                        }
                    )));
                }
                other => other?,
            },
        };
        let cluster_id = cluster_id_bytes(&outputs)?;
        wait_joined(
            &*cloud,
            &nodes,
            &spec.image.measurements,
            &cluster_id,
            progress,
        )
        .await?;
        journal.spec = spec.clone();
        let (j, r) = (journal, root.clone());
        blocking(move || j.store(&r).map_err(journal_path_error(&r))).await?;
        Ok(ClusterState {
            spec,
            outputs,
            platform_state: PlatformState { root }.encode(),
        })
    }

    async fn update_inner(
        &self,
        prior: &ClusterState,
        spec: &ClusterSpec,
        progress: &dyn Progress,
    ) -> Result<ClusterState, ClusterError> {
        let root = self.root_of(prior)?;
        let cluster_id = cluster_id_bytes(&prior.outputs)?;
        let (r2, platform) = (root.clone(), prior.spec.platform);
        let cloud = blocking(move || open_cloud(platform, &r2))
            .await?
            .ok_or_else(|| ClusterError::NotFound {
                name: spec.name.clone(),
                reason: format!("cluster folder {} is gone", root.display()),
            })?;
        let mut cloud = cloud;
        // Day 2: nodes lost for good are replaced; a changed image rolls node by node.
        super::recovery::forget_lost(&mut *cloud, progress)?;
        let rolled =
            super::upgrade::roll_if_needed(&mut *cloud, prior, spec, &cluster_id, progress).await?;
        let prior = &rolled;
        // Which nodes need a reboot: dead or not attesting with the cluster ID.
        let nodes = cloud.list_nodes();
        let health = check_nodes(
            cloud.attestation_variant(),
            &nodes,
            &prior.spec.image.measurements,
            &cluster_id,
        )
        .await;
        let mut reboot = Vec::new();
        let mut healthy = Vec::new();
        for (node, result) in nodes.into_iter().zip(health) {
            match result {
                Ok(()) => healthy.push(node),
                Err(reason) => {
                    progress.step(&format!(
                        "node {} is unhealthy ({reason}); rebooting",
                        node.name
                    ));
                    reboot.push(node.name);
                }
            }
        }
        // New measurements are the cluster's join configuration for every node, old and new:
        // refuse a set that a running node no longer satisfies instead of publishing it.
        if spec.image.measurements != prior.spec.image.measurements {
            let check = check_nodes(
                cloud.attestation_variant(),
                &healthy,
                &spec.image.measurements,
                &cluster_id,
            )
            .await;
            let strand: Vec<String> = healthy
                .iter()
                .zip(check)
                .filter_map(|(n, r)| r.err().map(|e| format!("{}: {e}", n.name)))
                .collect();
            if !strand.is_empty() {
                return Err(ClusterError::InvalidInput {
                    attribute: crate::diag::AttrPath::attr(&["image", "measurements"]),
                    reason: format!(
                        "running nodes would no longer attest under the new measurements \
                         (replace the cluster to move to another image): {}",
                        strand.join("; ")
                    ),
                });
            }
        }
        let prior_measurements = cloud.settings().measurements_json.clone();
        let measurements_json = spec.image.measurements.to_json();
        let image_dir = PathBuf::from(&spec.image.reference);
        let counts = (spec.control_plane_count, spec.worker_count);
        let (booted, cloud) = blocking(move || {
            let mut cloud = cloud;
            // New measurements (e.g. a PCR now warn-only) first, so rebooted and new nodes
            // join under them.
            cloud
                .update_settings(|s| s.measurements_json = measurements_json)
                .map_err(platform_err)?;
            let mut done = Reconciled::default();
            let result = reconcile(&mut *cloud, &reboot, counts, &image_dir, &mut done);
            Ok(((done, result), cloud))
        })
        .await?;
        let (done, result) = booted;
        let mut cloud = cloud;
        let mut touched: Vec<NodeRecord> = records(
            &*cloud,
            &done
                .rebooted
                .iter()
                .chain(&done.added)
                .cloned()
                .collect::<Vec<_>>(),
        );
        let result = match result {
            Ok(()) => {
                // Every control plane restarted, or the one holding the master secret is
                // gone: recover one, so joins get their keys again.
                let image = std::slice::from_ref(&spec.image);
                match super::recovery::ensure_key_service(&mut *cloud, spec, image, progress).await
                {
                    Ok(recovered) => {
                        touched.extend(recovered);
                        wait_joined(
                            &*cloud,
                            &touched,
                            &spec.image.measurements,
                            &cluster_id,
                            progress,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let (spec2, root2) = (spec.clone(), root.clone());
        let prior_outputs = prior.outputs.clone();
        let ok = result.is_ok();
        let finish = blocking(move || {
            let mut cloud = cloud;
            if !ok {
                // Leave the cluster as it was: no half-admitted nodes, the old join
                // configuration.
                for name in &done.added {
                    cloud.delete_node(name).map_err(platform_err)?;
                }
                return cloud
                    .update_settings(|s| s.measurements_json = prior_measurements)
                    .map_err(platform_err);
            }
            cloud
                .update_settings(|s| s.image_dir = PathBuf::from(&spec2.image.reference))
                .map_err(platform_err)?;
            let mut journal = match Journal::load(&root2).map_err(journal_path_error(&root2))? {
                Some(j) => j,
                // A cluster from before journals: the state has everything the journal needs.
                None => Journal {
                    spec: spec2.clone(),
                    init_secret: prior_outputs.init_secret.clone(),
                    outputs: Some(prior_outputs),
                    upgrade: None,
                },
            };
            journal.spec = spec2;
            journal.store(&root2).map_err(journal_path_error(&root2))
        })
        .await;
        result?;
        finish?;
        Ok(ClusterState {
            spec: spec.clone(),
            outputs: prior.outputs.clone(),
            platform_state: PlatformState { root }.encode(),
        })
    }
}

impl ClusterBackend for LocalBackend {
    fn create<'a>(
        &'a self,
        spec: &'a ClusterSpec,
        given: GivenSecrets,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async move {
            check_variant(spec)?;
            let root = self.cluster_root(&spec.name);
            let r2 = root.clone();
            let journal =
                blocking(move || Journal::load(&r2).map_err(journal_path_error(&r2))).await?;
            if let Some(journal) = journal {
                let resumed = self.resume(spec, given, journal, root.clone(), progress);
                return with_boot_progress(spec.platform, &root, progress, resumed).await;
            }
            if root.join("platform.json").exists() {
                return Err(ClusterError::Other(format!(
                    "cluster folder {} already exists without a journal: a cluster named {:?} \
                     is managed by another Terraform state (destroy it there) or choose \
                     another name",
                    root.display(),
                    spec.name
                )));
            }
            let started = Instant::now();
            let fresh = self.create_fresh(spec, root.clone(), progress);
            match with_boot_progress(spec.platform, &root, progress, fresh).await {
                Ok(state) => {
                    progress.step(&format!("cluster ready after {:?}", started.elapsed()));
                    Ok(state)
                }
                // A failed create is not recorded by Terraform: leave no node behind (after
                // quoting the failed node's console, which the teardown removes).
                Err(e) => {
                    tracing::warn!(error = %e, "create failed; tearing the nodes down");
                    let platform = spec.platform;
                    let quoted = blocking(move || {
                        let e = with_console(platform, &root, e);
                        let _ = teardown(platform, &root);
                        Ok(e)
                    })
                    .await;
                    Err(quoted.unwrap_or_else(|e| e))
                }
            }
        })
    }

    fn read<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> BoxFuture<'a, Result<ClusterReadResult, ClusterError>> {
        Box::pin(async move {
            let root = self.root_of(state)?;
            let platform = state.spec.platform;
            let Some(cloud) = blocking(move || open_cloud(platform, &root)).await? else {
                return Ok(ClusterReadResult::Gone);
            };
            let nodes = cloud.list_nodes();
            let cluster_id = cluster_id_bytes(&state.outputs)?;
            let mut unhealthy = Vec::new();
            let health = check_nodes(
                cloud.attestation_variant(),
                &nodes,
                &state.spec.image.measurements,
                &cluster_id,
            )
            .await;
            for (node, result) in nodes.iter().zip(health) {
                if let Err(reason) = result {
                    unhealthy.push(UnhealthyNode {
                        name: node.name.clone(),
                        role: node.role,
                        reason,
                    });
                }
            }
            // Nodes removed behind Terraform's back count as unhealthy, so the plan restores them.
            for (role, want) in [
                (Role::ControlPlane, state.spec.control_plane_count),
                (Role::Worker, state.spec.worker_count),
            ] {
                let have = nodes.iter().filter(|n| n.role == role).count();
                for i in have..want as usize {
                    unhealthy.push(UnhealthyNode {
                        name: format!("{}-{}-missing-{i}", state.spec.name, role.as_str()),
                        role,
                        reason: "node is missing from the cluster folder".into(),
                    });
                }
            }
            Ok(ClusterReadResult::Present {
                state: Box::new(state.clone()),
                unhealthy,
            })
        })
    }

    fn update<'a>(
        &'a self,
        prior: &'a ClusterState,
        spec: &'a ClusterSpec,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async move {
            check_variant(spec)?;
            let root = self.root_of(prior)?;
            let updated = self.update_inner(prior, spec, progress);
            with_boot_progress(spec.platform, &root, progress, updated).await
        })
    }

    fn delete<'a>(
        &'a self,
        state: &'a ClusterState,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let root = self.root_of(state)?;
            progress.step(&format!("destroying the nodes in {}", root.display()));
            let platform = state.spec.platform;
            blocking(move || match open_cloud(platform, &root)? {
                Some(cloud) => cloud.destroy().map_err(platform_err),
                None => Ok(()),
            })
            .await
        })
    }

    fn upgrade_preview(
        &self,
        name: &str,
        platform: Platform,
        image_reference: &str,
    ) -> Vec<String> {
        super::upgrade::preview(platform, &self.cluster_root(name), image_reference)
    }

    fn import(
        &self,
        id: &ImportId,
        folders: &crate::provider_config::ProviderConfig,
    ) -> Result<ClusterState, ClusterError> {
        let bad = |reason: String| ClusterError::ImportId {
            id: format!(
                "constellation-cluster://?platform={}&name={}&...",
                id.platform.as_str(),
                id.name
            ),
            reason,
        };
        if let Some(other) = id.params.keys().find(|k| *k != IMPORT_CLUSTER_DIR) {
            return Err(bad(format!(
                "unknown parameter {other:?} (the {} platform takes {IMPORT_CLUSTER_DIR:?})",
                id.platform.as_str()
            )));
        }
        let root = match id.params.get(IMPORT_CLUSTER_DIR) {
            Some(dir) if Path::new(dir).is_absolute() => PathBuf::from(dir),
            Some(dir) => {
                return Err(bad(format!(
                    "{IMPORT_CLUSTER_DIR} {dir:?} is not an absolute path"
                )))
            }
            None => self.cluster_root(&id.name),
        };
        folders
            .check_import_folder(&root)
            .map_err(|e| bad(e.to_string()))?;
        let journal = Journal::load(&root).map_err(journal_path_error(&root))?;
        let cloud = open_cloud(id.platform, &root)?;
        let (journal, _cloud) = match (journal, cloud) {
            (Some(j), Some(c)) => (j, c),
            (None, None) | (Some(_), None) => {
                return Err(ClusterError::NotFound {
                    name: id.name.clone(),
                    reason: format!("no cluster folder at {}", root.display()),
                })
            }
            (None, Some(_)) => {
                return Err(ClusterError::Unsupported {
                    what: format!("importing this {} cluster", id.platform.as_str()),
                    reason: format!(
                        "the cluster folder {} has no journal (it was created by an older \
                         provider), so its secrets and admin credentials are only in the \
                         Terraform state that created it",
                        root.display()
                    ),
                })
            }
        };
        if journal.spec.name != id.name || journal.spec.platform != id.platform {
            return Err(bad(format!(
                "the cluster folder {} holds cluster {:?} on platform {:?}",
                root.display(),
                journal.spec.name,
                journal.spec.platform.as_str()
            )));
        }
        let Some(outputs) = journal.outputs.clone() else {
            return Err(ClusterError::Unsupported {
                what: "importing a cluster that was never initialized".into(),
                reason: format!(
                    "the create of cluster {:?} in {} was interrupted before Init; run \
                     `terraform apply` to resume it instead",
                    id.name,
                    root.display()
                ),
            });
        };
        Ok(ClusterState {
            spec: journal.spec,
            outputs,
            platform_state: PlatformState { root }.encode(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_attestation::Measurements;
    use constellation_common::node_status::NodePhase;
    use constellation_common::refusal::{Refusal, RefusalCheck};
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    fn record(name: &str, role: Role) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            role,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dir: PathBuf::from("/nonexistent"),
            pid: 0,
            swtpm: None,
            ak_spki_hex: String::new(),
            image_dir: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn scale_down_removes_the_highest_index_first() {
        let nodes = [
            record("c-worker-2", Role::Worker),
            record("c-control-plane-0", Role::ControlPlane),
            record("c-worker-10", Role::Worker),
            record("c-worker-1", Role::Worker),
        ];
        assert_eq!(
            by_index_desc(&nodes, Role::Worker),
            ["c-worker-10", "c-worker-2", "c-worker-1"]
        );
        assert_eq!(
            by_index_desc(&nodes, Role::ControlPlane),
            ["c-control-plane-0"]
        );
    }

    #[test]
    fn platform_state_round_trips_and_rejects_garbage() {
        let s = PlatformState {
            root: PathBuf::from("/tmp/x y"),
        };
        assert_eq!(PlatformState::parse(&s.encode()).unwrap().root, s.root);
        assert!(matches!(
            PlatformState::parse("{}"),
            Err(ClusterError::PlatformState(_))
        ));
    }

    #[tokio::test]
    async fn a_dead_node_is_unhealthy_without_network_calls() {
        let reason = check_node(
            constellation_attestation::Variant::QemuVtpm,
            &record("c-worker-1", Role::Worker),
            &Measurements::default(),
            &[0; 32],
        )
        .await
        .unwrap_err();
        assert!(reason.contains("not running"), "{reason}");
    }

    fn outputs() -> ClusterOutputs {
        ClusterOutputs {
            cluster_id: "ab".repeat(32),
            owner_id: "cd".repeat(32),
            kubeconfig: SecretBytes::new(b"apiVersion: v1".to_vec()),
            cluster_ca_certificate: "-----BEGIN CERTIFICATE-----".into(),
            client_certificate: "-----BEGIN CERTIFICATE-----".into(),
            client_key: SecretBytes::new(b"-----BEGIN PRIVATE KEY-----".to_vec()),
            host: "127.0.0.1:6443".into(),
            init_secret: SecretBytes::new(vec![9; 32]),
        }
    }

    /// A cluster folder with no node, its journal and (optionally) Init's outputs.
    fn folder(root: &Path, initialized: bool) -> Journal {
        let spec = crate::cluster::journal::tests::spec();
        LocalCloud::create(
            root,
            ClusterSettings {
                cluster_name: spec.name.clone(),
                init_secret_hash: String::new(),
                attestation_variant: "qemu-vtpm".into(),
                measurements_json: spec.image.measurements.to_json(),
                image_dir: PathBuf::from("/img"),
            },
        )
        .unwrap();
        let mut j = Journal::new(spec, SecretBytes::new(vec![9; 32]));
        if initialized {
            j.outputs = Some(outputs());
        }
        j.store(root).unwrap();
        j
    }

    /// A provider configuration whose import_dirs are exactly `dirs`.
    fn allow(dirs: &[&Path]) -> crate::provider_config::ProviderConfig {
        crate::provider_config::ProviderConfig {
            import_dirs: dirs.iter().map(|d| d.canonicalize().unwrap()).collect(),
        }
    }

    #[test]
    fn import_rebuilds_the_state_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().to_owned());
        let j = folder(&backend.cluster_root("demo"), true);
        let id: ImportId = "constellation-cluster://?platform=local&name=demo"
            .parse()
            .unwrap();
        let state = backend.import(&id, &allow(&[dir.path()])).unwrap();
        assert_eq!(state.spec, j.spec);
        assert_eq!(state.outputs, outputs());
        assert_eq!(
            PlatformState::parse(&state.platform_state).unwrap().root,
            backend.cluster_root("demo")
        );
        // cluster_dir selects the folder, if the provider configuration allows it; other
        // parameters are refused.
        let other = tempfile::tempdir().unwrap();
        folder(other.path(), true);
        let uri = format!(
            "constellation-cluster://?platform=local&name=demo&cluster_dir={}",
            other.path().display()
        );
        match backend.import(&uri.parse().unwrap(), &allow(&[dir.path()])) {
            Err(ClusterError::ImportId { reason, .. }) => {
                assert!(reason.contains("import_dirs"), "{reason}")
            }
            other => panic!("an unlisted cluster_dir was read: {other:?}"),
        }
        let state = backend
            .import(&uri.parse().unwrap(), &allow(&[dir.path(), other.path()]))
            .unwrap();
        assert_eq!(
            PlatformState::parse(&state.platform_state).unwrap().root,
            other.path()
        );
        for bad in [
            "constellation-cluster://?platform=local&name=demo&state_dir=%2Fx",
            "constellation-cluster://?platform=local&name=demo&cluster_dir=relative",
            "constellation-cluster://?platform=local&name=other",
        ] {
            let e = backend.import(&bad.parse().unwrap(), &allow(&[dir.path()]));
            assert!(
                matches!(
                    e,
                    Err(ClusterError::ImportId { .. } | ClusterError::NotFound { .. })
                ),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn import_refuses_an_uninitialized_or_journal_less_folder() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().to_owned());
        let root = backend.cluster_root("demo");
        folder(&root, false);
        let id: ImportId = "constellation-cluster://?platform=local&name=demo"
            .parse()
            .unwrap();
        let e = backend
            .import(&id, &allow(&[dir.path()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("terraform apply"), "{e}");
        std::fs::remove_file(Journal::path(&root)).unwrap();
        let e = backend
            .import(&id, &allow(&[dir.path()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no journal"), "{e}");
    }

    #[test]
    fn a_resumed_create_keeps_the_journal_secrets_and_checks_given_ones() {
        let dir = tempfile::tempdir().unwrap();
        let j = folder(dir.path(), false);
        let mut spec = j.spec.clone();
        spec.secrets.master_secret = MasterSecret::Stored(SecretBytes::new(vec![0x55; 32]));
        // Generated for this apply: replaced by the journal's.
        let adopted = adopt_secrets(&spec, GivenSecrets::default(), &j, dir.path()).unwrap();
        assert_eq!(adopted, j.spec.secrets);
        // Set in the configuration: must match, and the error shows neither value.
        match adopt_secrets(&spec, GivenSecrets::ALL, &j, dir.path()) {
            Err(ClusterError::InvalidInput { attribute, reason }) => {
                assert_eq!(attribute.to_string(), "master_secret");
                assert!(!reason.contains(&"55".repeat(32)), "{reason}");
                assert!(!reason.contains(&"01".repeat(32)), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let same = j.spec.clone();
        assert!(adopt_secrets(&same, GivenSecrets::ALL, &j, dir.path()).is_ok());
    }

    #[test]
    fn a_join_refusal_is_read_from_the_current_boot_status_as_data() {
        use constellation_common::node_status::NodeStatus;
        use constellation_common::refusal::PcrMismatch;
        let dir = tempfile::tempdir().unwrap();
        let cloud = LocalCloud::create(
            &dir.path().join("cluster"),
            new_settings(&crate::cluster::journal::tests::spec()),
        )
        .unwrap();
        let cloud: &dyn Cloud = &cloud;
        let mut node = record("c-worker-1", Role::Worker);
        node.dir = dir.path().to_owned();
        node.pid = std::process::id();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let state = dir.path().join("state");
        assert!(measurements_refusal(cloud, &node).is_none());
        assert_eq!(
            pending_reason(cloud, &node),
            "its bootstrapper has not reported yet"
        );
        let refusal = Refusal {
            check: RefusalCheck::Measurements,
            mismatches: vec![PcrMismatch {
                pcr: 4,
                expected: "aa".into(),
                found: Some("bb".into()),
            }],
            message: "1 enforced PCR(s) differ".into(),
        };
        NodeStatus::now(NodePhase::JoinRefused {
            endpoint: "1.2.3.4:30090".into(),
            attempts: 1,
            refusal: refusal.clone(),
        })
        .write(&state)
        .unwrap();
        assert_eq!(measurements_refusal(cloud, &node), Some(refusal.clone()));
        assert_eq!(
            describe_mismatches(&refusal),
            "PCR[4]: expected aa, found bb"
        );
        assert!(!reports_joined(cloud, &node));
        // A refusal of another kind does not stop the wait; a status from an earlier boot (other
        // pid) counts for nothing.
        NodeStatus::now(NodePhase::JoinRefused {
            endpoint: "1.2.3.4:30090".into(),
            attempts: 2,
            refusal: Refusal::new(RefusalCheck::DiskBinding, "disk owned by c-worker-0"),
        })
        .write(&state)
        .unwrap();
        assert!(measurements_refusal(cloud, &node).is_none());
        assert!(pending_reason(cloud, &node).contains("disk owned by c-worker-0"));
        node.pid += 1;
        NodeStatus::now(NodePhase::JoinRefused {
            endpoint: "1.2.3.4:30090".into(),
            attempts: 1,
            refusal,
        })
        .write(&state)
        .unwrap();
        assert!(measurements_refusal(cloud, &node).is_none());
        node.pid -= 1;
        NodeStatus::now(NodePhase::Joined {
            cluster_id: "ab".into(),
        })
        .write(&state)
        .unwrap();
        assert!(reports_joined(cloud, &node));
    }

    #[test]
    fn import_names_the_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().to_owned());
        let id: ImportId = "constellation-cluster://?platform=local&name=demo"
            .parse()
            .unwrap();
        match backend.import(&id, &allow(&[dir.path()])) {
            Err(ClusterError::NotFound { reason, .. }) => {
                assert!(reason.contains(&dir.path().join("demo").display().to_string()))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unhealthy_platform_error_names_the_node() {
        let e = platform_err(PlatformError::UnknownNode("x".into()));
        assert!(matches!(e, ClusterError::Other(_)));
        let e = platform_err(PlatformError::NodeStart {
            node: "c-worker-1".into(),
            timeout: Duration::from_secs(1),
            log: String::new(),
        });
        assert!(matches!(e, ClusterError::Node { node, .. } if node == "c-worker-1"));
    }
}
