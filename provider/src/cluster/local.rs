//! The local-platform backend: every node is a `constellation-bootstrapper` process with its
//! own swtpm, started by [`constellation_platform::LocalCloud`] in a cluster folder.
//!
//! The cluster folder is `<terraform working dir>/.constellation/clusters/<name>` (absolute),
//! recorded in `platform_state` as `{"root": "<path>"}`; the folder's `platform.json` is the
//! authoritative node list. The first control plane is attested over aTLS against the image's
//! measurements before it receives the Init request (and with it the secrets); every node
//! counts as healthy only while its process runs and it attests with PCR 15 = the cluster ID.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls::{self, AtlsError, ClientConfig};
use constellation_attestation::cluster::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_attestation::{Measurements, Variant};
use constellation_common::metadata::{ports, Role};
use constellation_common::secret::SecretBytes;
use constellation_platform::local::{ClusterSettings, LocalCloud, NodeRecord, PlatformError};
use constellation_platform::Cloud;
use constellation_proto::init::{self as pb, init_service_client::InitServiceClient};
use constellation_proto::PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};

use super::model::*;

/// Cluster folders live here, relative to Terraform's working directory.
pub const CLUSTERS_DIR: &str = ".constellation/clusters";
/// Import parameter naming the cluster folder.
pub const IMPORT_CLUSTER_DIR: &str = "cluster_dir";
/// How long nodes get to join (attest with the cluster ID) after init or a reboot.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
const JOIN_POLL: Duration = Duration::from_secs(1);

/// The backend for `platform = "local"`.
pub fn local_backend() -> Arc<dyn ClusterBackend> {
    Arc::new(LocalBackend::new(PathBuf::from(CLUSTERS_DIR)))
}

/// Runs clusters as local node processes, one folder per cluster under `clusters_dir`.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    clusters_dir: PathBuf,
}

/// What the provider keeps in Terraform's private state for a local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlatformState {
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

fn platform_err(e: PlatformError) -> ClusterError {
    match &e {
        PlatformError::NodeStart { node, .. }
        | PlatformError::Tpm { node, .. }
        | PlatformError::AkChanged { node, .. } => ClusterError::Node {
            node: node.clone(),
            reason: e.to_string(),
        },
        _ => ClusterError::Other(format!("local platform: {e}")),
    }
}

/// Runs a blocking platform call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClusterError> + Send + 'static,
) -> Result<T, ClusterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClusterError::Other(format!("platform task failed: {e}")))?
}

fn is_not_found(e: &PlatformError) -> bool {
    matches!(e, PlatformError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Opens the cluster folder; `None` when it (or its state file) is gone.
fn open_cloud(root: &Path) -> Result<Option<LocalCloud>, ClusterError> {
    match LocalCloud::open(root) {
        Ok(c) => Ok(Some(c)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(platform_err(e)),
    }
}

fn role_of(role: Role) -> NodeRole {
    match role {
        Role::ControlPlane => NodeRole::ControlPlane,
        Role::Worker => NodeRole::Worker,
    }
}

/// The node's pinned attestation key from the platform record.
fn pinned_ak(node: &NodeRecord) -> Result<AkPublicKey, ClusterError> {
    let bad = |reason: String| ClusterError::Node {
        node: node.name.clone(),
        reason,
    };
    let der = hex::decode(&node.ak_spki_hex)
        .map_err(|e| bad(format!("pinned attestation key is not hex: {e}")))?;
    AkPublicKey::from_spki_der(&der).map_err(|e| bad(format!("pinned attestation key: {e}")))
}

/// Checks one running node: its process is alive and it attests, pinned to its own AK, with
/// the measurements (PCR 15 excluded) and PCR 15 = `cluster_id`. Err is the reason.
async fn check_node(
    node: &NodeRecord,
    measurements: &Measurements,
    cluster_id: &[u8],
) -> Result<(), String> {
    if !node.is_alive() {
        return Err("node process or its TPM is not running".into());
    }
    let ak = pinned_ak(node).map_err(|e| e.to_string())?;
    let mut m = measurements.clone();
    m.0.remove(&CLUSTER_ID_PCR);
    let validator = QemuVtpmValidator::new(vec![ak], m);
    verify_cluster(&node.endpoint(ports::VERIFY), &validator, Some(cluster_id))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn cluster_id_bytes(outputs: &ClusterOutputs) -> Result<Vec<u8>, ClusterError> {
    hex::decode(&outputs.cluster_id)
        .map_err(|e| ClusterError::PlatformState(format!("cluster_id is not hex: {e}")))
}

fn check_variant(spec: &ClusterSpec) -> Result<(), ClusterError> {
    if spec.attestation.variant != Variant::QemuVtpm {
        return Err(ClusterError::Unsupported {
            what: format!("attestation variant {}", spec.attestation.variant),
            reason: "the local platform's nodes attest with qemu-vtpm".into(),
        });
    }
    Ok(())
}

/// Waits until every node attests with the cluster ID (workers join on their own, retrying).
async fn wait_joined(
    nodes: &[NodeRecord],
    measurements: &Measurements,
    cluster_id: &[u8],
    progress: &dyn Progress,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut pending: Vec<&NodeRecord> = nodes.iter().collect();
    loop {
        let mut still = Vec::new();
        let mut last_reason = String::new();
        for node in pending {
            match check_node(node, measurements, cluster_id).await {
                Ok(()) => progress.step(&format!("node {} joined and attested", node.name)),
                Err(reason) => {
                    last_reason = reason;
                    still.push(node);
                }
            }
        }
        pending = still;
        let Some(first) = pending.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(ClusterError::Node {
                node: first.name.clone(),
                reason: format!(
                    "did not join within {JOIN_TIMEOUT:?} ({} node(s) pending): {last_reason}; \
                     log: {}",
                    pending.len(),
                    first.log_path().display()
                ),
            });
        }
        tokio::time::sleep(JOIN_POLL).await;
    }
}

fn kms_request(kms: &KmsConfig) -> pb::KmsConfig {
    let backend = match kms {
        KmsConfig::ClusterManaged => {
            pb::kms_config::Backend::ClusterManaged(pb::ClusterManagedKms {})
        }
        KmsConfig::Kmip(k) => pb::kms_config::Backend::Kmip(pb::KmipKms {
            endpoint: k.endpoint.clone(),
            server_ca_pem: k.server_ca_pem.as_bytes().to_vec(),
            client_cert_pem: k.client_cert_pem.as_bytes().to_vec(),
            client_key_pem: k.client_key_pem.expose().to_vec(),
            kek_id: k.kek_id.clone(),
        }),
    };
    pb::KmsConfig {
        backend: Some(backend),
    }
}

fn pem_string(what: &str, bytes: Vec<u8>) -> Result<String, ClusterError> {
    String::from_utf8(bytes).map_err(|_| ClusterError::Init(format!("{what} is not UTF-8 PEM")))
}

/// Attests the first control plane against the image's measurements, then sends Init.
async fn initialize(
    spec: &ClusterSpec,
    node: &NodeRecord,
    init_secret: &SecretBytes,
    progress: &dyn Progress,
) -> Result<ClusterOutputs, ClusterError> {
    let validator = QemuVtpmValidator::new(vec![pinned_ak(node)?], spec.image.measurements.clone());
    let attestation = |e: AtlsError| ClusterError::Attestation {
        node: node.name.clone(),
        reason: e.to_string(),
    };
    let config = ClientConfig::server_only(Arc::new(validator)).map_err(attestation)?;
    let endpoint = node.endpoint(ports::BOOTSTRAPPER);
    let (channel, _verdict) = atls::channel(&endpoint, config)
        .await
        .map_err(attestation)?;
    progress.step(&format!(
        "node {} attested against the image measurements; sending Init",
        node.name
    ));
    let request = pb::InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: spec.secrets.master_secret.expose().to_vec(),
        master_salt: spec.secrets.master_secret_salt.expose().to_vec(),
        measurement_salt: spec.secrets.measurement_salt.expose().to_vec(),
        init_secret: init_secret.expose().to_vec(),
        cluster_name: spec.name.clone(),
        kubernetes_version: spec.kubernetes_version.clone(),
        network: Some(pb::NetworkConfig {
            pod_cidr: spec.network.pod_cidr.to_string(),
            service_cidr: spec.network.service_cidr.to_string(),
            node_cidr: spec.network.node_cidr.to_string(),
        }),
        kms: Some(kms_request(&spec.kms)),
        api_server_cert_sans: Vec::new(),
    };
    let init_failed = |s: tonic::Status| {
        ClusterError::Init(format!(
            "node {}: {:?}: {}",
            node.name,
            s.code(),
            s.message()
        ))
    };
    let mut stream = InitServiceClient::new(channel)
        .init(request)
        .await
        .map_err(init_failed)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(init_failed)? {
        match msg.kind {
            Some(pb::init_response::Kind::Log(line)) => {
                progress.step(&format!("{}: {}", node.name, line.message))
            }
            Some(pb::init_response::Kind::Success(s)) => {
                return Ok(ClusterOutputs {
                    cluster_id: hex::encode(&s.cluster_id),
                    owner_id: hex::encode(&s.owner_id),
                    kubeconfig: SecretBytes::new(s.kubeconfig),
                    cluster_ca_certificate: pem_string("CA certificate", s.ca_cert_pem)?,
                    client_certificate: pem_string("client certificate", s.client_cert_pem)?,
                    client_key: SecretBytes::new(s.client_key_pem),
                    host: s.endpoint,
                    init_secret: init_secret.clone(),
                });
            }
            None => {}
        }
    }
    Err(ClusterError::Init(format!(
        "node {}: the Init stream ended without InitSuccess",
        node.name
    )))
}

/// The platform gives a booting node a fixed time to come up; on a machine busy with other
/// work that can be too short, so a node that did not come up gets one more boot.
fn boot_retrying(cloud: &mut LocalCloud, name: &str) -> Result<(), ClusterError> {
    match cloud.boot(name) {
        Err(PlatformError::NodeStart { node, .. }) => {
            tracing::warn!(%node, "node did not come up in time; booting it once more");
            cloud.boot(&node).map(|_| ()).map_err(platform_err)
        }
        other => other.map(|_| ()).map_err(platform_err),
    }
}

/// Creates `count` nodes of `role` one by one, each with [`boot_retrying`]'s second chance.
fn create_nodes_retrying(
    cloud: &mut LocalCloud,
    role: Role,
    count: usize,
) -> Result<(), ClusterError> {
    for _ in 0..count {
        match cloud.create_nodes(role, 1) {
            Err(PlatformError::NodeStart { node, .. }) => boot_retrying(cloud, &node)?,
            other => {
                other.map_err(platform_err)?;
            }
        }
    }
    Ok(())
}

/// Names of `role`'s nodes, highest index first (the order scale-down removes them in).
fn by_index_desc(nodes: &[NodeRecord], role: Role) -> Vec<String> {
    let mut named: Vec<(u64, String)> = nodes
        .iter()
        .filter(|n| n.role == role)
        .map(|n| {
            let index = n
                .name
                .rsplit('-')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            (index, n.name.clone())
        })
        .collect();
    named.sort_by(|a, b| b.cmp(a));
    named.into_iter().map(|(_, n)| n).collect()
}

impl LocalBackend {
    pub fn new(clusters_dir: PathBuf) -> Self {
        Self { clusters_dir }
    }

    /// The absolute folder of cluster `name`.
    pub fn cluster_root(&self, name: &str) -> PathBuf {
        let p = self.clusters_dir.join(name);
        std::path::absolute(&p).unwrap_or(p)
    }

    async fn create_inner(
        &self,
        spec: &ClusterSpec,
        root: PathBuf,
        progress: &dyn Progress,
    ) -> Result<ClusterState, ClusterError> {
        let init_secret = {
            use rand::RngCore;
            let mut b = vec![0u8; SECRET_LEN];
            rand::rngs::OsRng.fill_bytes(&mut b);
            SecretBytes::new(b)
        };
        let mut settings = ClusterSettings {
            cluster_name: spec.name.clone(),
            init_secret_hash: String::new(),
            attestation_variant: Variant::QemuVtpm.as_str().to_owned(),
            measurements_json: spec.image.measurements.to_json(),
            image_dir: PathBuf::from(&spec.image.reference),
        };
        let (cp, workers) = (spec.control_plane_count, spec.worker_count);
        progress.step(&format!(
            "booting {cp} control-plane and {workers} worker node(s) in {}",
            root.display()
        ));
        let root2 = root.clone();
        let secret = init_secret.clone();
        let nodes = blocking(move || {
            // Argon2id: deliberately slow, so off the async runtime too.
            settings.init_secret_hash = constellation_common::initsecret::hash(secret.expose());
            let mut cloud = LocalCloud::create(&root2, settings).map_err(platform_err)?;
            create_nodes_retrying(&mut cloud, Role::ControlPlane, cp as usize)?;
            create_nodes_retrying(&mut cloud, Role::Worker, workers as usize)?;
            Ok(cloud.list_nodes())
        })
        .await?;
        let first = nodes
            .iter()
            .find(|n| n.role == Role::ControlPlane)
            .ok_or_else(|| ClusterError::InvalidInput {
                attribute: crate::diag::AttrPath::attr(&["control_plane_count"]),
                reason: "at least one control-plane node is needed".into(),
            })?;
        let outputs = initialize(spec, first, &init_secret, progress).await?;
        let cluster_id = cluster_id_bytes(&outputs)?;
        wait_joined(&nodes, &spec.image.measurements, &cluster_id, progress).await?;
        Ok(ClusterState {
            spec: spec.clone(),
            outputs,
            platform_state: PlatformState { root }.encode(),
        })
    }
}

impl ClusterBackend for LocalBackend {
    fn create<'a>(
        &'a self,
        spec: &'a ClusterSpec,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async move {
            check_variant(spec)?;
            let root = self.cluster_root(&spec.name);
            if root.join("platform.json").exists() {
                return Err(ClusterError::Other(format!(
                    "cluster folder {} already exists: a cluster named {:?} is managed by \
                     another Terraform state (destroy it there) or choose another name",
                    root.display(),
                    spec.name
                )));
            }
            let started = Instant::now();
            let result = self.create_inner(spec, root.clone(), progress).await;
            match &result {
                Ok(_) => progress.step(&format!("cluster ready after {:?}", started.elapsed())),
                // A failed create is not recorded by Terraform: leave no node behind.
                Err(e) => {
                    tracing::warn!(error = %e, "create failed; tearing the nodes down");
                    let _ = blocking(move || {
                        if let Some(cloud) = open_cloud(&root)? {
                            cloud.destroy().map_err(platform_err)?;
                        }
                        Ok(())
                    })
                    .await;
                }
            }
            result
        })
    }

    fn read<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> BoxFuture<'a, Result<ClusterReadResult, ClusterError>> {
        Box::pin(async move {
            let root = PlatformState::parse(&state.platform_state)?.root;
            let Some(cloud) = blocking(move || open_cloud(&root)).await? else {
                return Ok(ClusterReadResult::Gone);
            };
            let nodes = cloud.list_nodes();
            let cluster_id = cluster_id_bytes(&state.outputs)?;
            let mut unhealthy = Vec::new();
            for node in &nodes {
                if let Err(reason) =
                    check_node(node, &state.spec.image.measurements, &cluster_id).await
                {
                    unhealthy.push(UnhealthyNode {
                        name: node.name.clone(),
                        role: role_of(node.role),
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
                        role: role_of(role),
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
            if spec.image.reference != prior.spec.image.reference {
                // Nodes validate each other (joins, aTLS) against the one published set of
                // measurements, so nodes of two images cannot coexist during a roll.
                return Err(ClusterError::Unsupported {
                    what: "changing the image of a running local cluster".into(),
                    reason: format!(
                        "its nodes run {} and would not attest to nodes of {}; replace the \
                         cluster instead (terraform apply -replace=...)",
                        prior.spec.image.reference, spec.image.reference
                    ),
                });
            }
            let root = PlatformState::parse(&prior.platform_state)?.root;
            let cluster_id = cluster_id_bytes(&prior.outputs)?;
            let r2 = root.clone();
            let cloud =
                blocking(move || open_cloud(&r2))
                    .await?
                    .ok_or_else(|| ClusterError::NotFound {
                        name: spec.name.clone(),
                        reason: format!("cluster folder {} is gone", root.display()),
                    })?;
            // Which nodes need a reboot: dead or not attesting with the cluster ID.
            let mut reboot = Vec::new();
            for node in cloud.list_nodes() {
                if let Err(reason) =
                    check_node(&node, &prior.spec.image.measurements, &cluster_id).await
                {
                    progress.step(&format!(
                        "node {} is unhealthy ({reason}); rebooting",
                        node.name
                    ));
                    reboot.push(node.name);
                }
            }
            let measurements_json = spec.image.measurements.to_json();
            let (cp, workers) = (spec.control_plane_count, spec.worker_count);
            let nodes = blocking(move || {
                let mut cloud = cloud;
                // New measurements (e.g. a PCR now warn-only) first, so rebooted and new nodes
                // join under them.
                cloud
                    .update_settings(|s| s.measurements_json = measurements_json)
                    .map_err(platform_err)?;
                for name in &reboot {
                    boot_retrying(&mut cloud, name)?;
                }
                for (role, want) in [(Role::ControlPlane, cp), (Role::Worker, workers)] {
                    let names = by_index_desc(&cloud.list_nodes(), role);
                    let want = want as usize;
                    if names.len() < want {
                        create_nodes_retrying(&mut cloud, role, want - names.len())?;
                    }
                    for name in names.iter().take(names.len().saturating_sub(want)) {
                        cloud.delete_node(name).map_err(platform_err)?;
                    }
                }
                Ok(cloud.list_nodes())
            })
            .await?;
            wait_joined(&nodes, &spec.image.measurements, &cluster_id, progress).await?;
            Ok(ClusterState {
                spec: spec.clone(),
                outputs: prior.outputs.clone(),
                platform_state: prior.platform_state.clone(),
            })
        })
    }

    fn delete<'a>(
        &'a self,
        state: &'a ClusterState,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let root = PlatformState::parse(&state.platform_state)?.root;
            progress.step(&format!("destroying the nodes in {}", root.display()));
            blocking(move || match open_cloud(&root)? {
                Some(cloud) => cloud.destroy().map_err(platform_err),
                None => Ok(()),
            })
            .await
        })
    }

    fn import(&self, id: &ImportId) -> Result<ClusterState, ClusterError> {
        let root = id
            .params
            .get(IMPORT_CLUSTER_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| self.cluster_root(&id.name));
        // The folder holds the node list, pinned AKs and the init secret's hash, but not the
        // master secret, its salts, the init secret or the cluster's credentials: those exist
        // only in the Terraform state of the configuration that created the cluster.
        match open_cloud(&root)? {
            None => Err(ClusterError::NotFound {
                name: id.name.clone(),
                reason: format!("no cluster folder at {}", root.display()),
            }),
            Some(_) => Err(ClusterError::Unsupported {
                what: "importing a local cluster".into(),
                reason: format!(
                    "the cluster folder {} exists, but it does not hold the master secret, its \
                     salts, the init secret or the admin credentials, which the cluster's state \
                     needs; keep the Terraform state of the configuration that created it",
                    root.display()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

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
            &record("c-worker-1", Role::Worker),
            &Measurements::default(),
            &[0; 32],
        )
        .await
        .unwrap_err();
        assert!(reason.contains("not running"), "{reason}");
    }

    #[test]
    fn import_names_the_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().to_owned());
        let id: ImportId = "constellation-cluster://?platform=local&name=demo"
            .parse()
            .unwrap();
        match backend.import(&id) {
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
