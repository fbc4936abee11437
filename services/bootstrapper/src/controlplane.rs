//! A control-plane node's services after Init (or a control-plane join, or Recover): the key
//! service (mutual TLS with certificates from the cluster's key-service CA, created at Init and
//! kept in the cluster PKI) and the join service (mutual aTLS), plus the Kubernetes installer.
//!
//! Init and Recover run both services (they hold the master secret). A control plane that
//! joined gets the key service's master material in its join ticket and runs both too, its join
//! service asking its own key service first, then the other control planes' (with a client
//! certificate from the same CA); one that joined through a join service without master
//! material runs only the join service. Both run as their own daemons,
//! supervised by the bootstrapper ([`crate::daemons`], [`crate::supervisor`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use constellation_common::metadata::{ports, Role};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::pki::{ClientCredentials, ClusterPki};
use constellation_joinservice::ticket::JoinTicketConfig;
use constellation_joinservice::token::BootstrapToken;
use constellation_keyservice::cluster_managed::{ClusterManagedBackend, CLUSTER_SECRET_FILE};
use constellation_keyservice::config::created_kek_name;
use constellation_keyservice::kmip::{KekSource, KmipBackend, KmipSettings, StoredKmipSettings};
use constellation_keyservice::{MasterSecret, MasterSecretBackend};

use crate::context::NodeContext;
use crate::daemons::{
    DaemonsError, JoinServiceInputs, JoinServiceShared, NodeDaemons, JOIN_SERVICE, KEY_SERVICE,
};
use crate::etcd::MemberStart;
use crate::kubernetes::{write_encryption_configuration, EncryptionSetup, InitParams};

/// The API server's encryption configuration in `<node>/kubernetes/`.
pub const ENCRYPTION_CONFIGURATION_FILE: &str = "encryption-configuration.yaml";

/// How long bootstrap tokens handed to joining nodes live.
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a control-plane step failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("key service backend: {0}")]
    Backend(#[from] constellation_keyservice::BackendError),
    #[error("cluster PKI: {0}")]
    Pki(#[from] constellation_joinservice::pki::PkiError),
    #[error("internal service certificates: {0}")]
    Certificates(String),
    #[error("Kubernetes installation ({installer}): {message}")]
    Kubernetes {
        installer: &'static str,
        message: String,
    },
    #[error("{what}: {message}")]
    Serve { what: &'static str, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metadata: {0}")]
    Metadata(#[from] constellation_common::metadata::MetadataError),
    #[error("control-plane daemons: {0}")]
    Daemons(#[from] DaemonsError),
    #[error("etcd member: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error("state disk header: {0}")]
    StateDisk(#[from] crate::statedisk::StateDiskError),
}

/// Where the master secret lives.
#[derive(Clone)]
pub enum KmsChoice {
    ClusterManaged,
    Kmip(StoredKmipSettings),
}

impl KmsChoice {
    pub fn from_proto(kms: Option<constellation_proto::init::KmsConfig>) -> Result<Self, String> {
        use constellation_proto::init::kms_config::Backend;
        match kms.and_then(|k| k.backend) {
            None | Some(Backend::ClusterManaged(_)) => Ok(Self::ClusterManaged),
            Some(Backend::Kmip(k)) => kmip_from_proto(k).map(Self::Kmip),
        }
    }
}

/// KMIP settings as Init and Recover carry them; the endpoint must be `host:port`.
pub fn kmip_from_proto(
    k: constellation_proto::init::KmipKms,
) -> Result<StoredKmipSettings, String> {
    if k.endpoint.rsplit_once(':').is_none() {
        return Err(format!("KMIP endpoint {:?} is not host:port", k.endpoint));
    }
    Ok(StoredKmipSettings {
        endpoint: k.endpoint,
        server_ca_pem: k.server_ca_pem,
        client_cert_pem: k.client_cert_pem,
        client_key_pem: SecretBytes::new(k.client_key_pem),
        kek_id: k.kek_id,
    })
}

/// The secrets Init hands to the control plane.
pub struct ControlPlaneSecrets {
    pub master_secret: SecretBytes,
    pub master_salt: SecretBytes,
    pub measurement_salt: SecretBytes,
    pub measurement_secret: SecretBytes,
    pub cluster_id: [u8; 32],
}

/// What a running control plane holds.
#[derive(Clone)]
pub struct ControlPlaneMaterial {
    pub cluster_name: String,
    pub pki: Arc<ClusterPki>,
    pub admin: ClientCredentials,
    pub master: Arc<MasterSecret>,
    pub measurement_salt: SecretBytes,
    pub measurement_secret: SecretBytes,
    pub kubernetes_version: String,
}

/// Pod and service networks (validated CIDRs).
#[derive(Debug, Clone, Default)]
pub struct NetworkSettings {
    pub pod_cidr: String,
    pub service_cidr: String,
}

/// The key-service backend for this node.
fn backend(
    node: &NodeContext,
    cluster_name: &str,
    kms: &KmsChoice,
) -> Result<Box<dyn MasterSecretBackend>, ControlPlaneError> {
    let dir = node.state_dir.join("keyservice");
    std::fs::create_dir_all(&dir).map_err(|source| ControlPlaneError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(match kms {
        KmsChoice::ClusterManaged => Box::new(ClusterManagedBackend::new(&dir)),
        KmsChoice::Kmip(kmip) => Box::new(KmipBackend::new(
            kmip_settings(kmip, cluster_name)?,
            &dir,
            cluster_name,
        )?),
    })
}

fn kmip_settings(
    kmip: &StoredKmipSettings,
    cluster_name: &str,
) -> Result<KmipSettings, ControlPlaneError> {
    let endpoint = &kmip.endpoint;
    let bad = |e: String| ControlPlaneError::Certificates(format!("KMIP {endpoint:?}: {e}"));
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| bad("not host:port".into()))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port".into()))?;
    let kek = if kmip.kek_id.is_empty() {
        KekSource::Create {
            name: created_kek_name(cluster_name),
        }
    } else {
        KekSource::Existing {
            id: kmip.kek_id.clone(),
        }
    };
    constellation_keyservice::config::kmip_settings(
        host.to_owned(),
        port,
        &kmip.server_ca_pem,
        &kmip.client_cert_pem,
        kmip.client_key_pem.expose(),
        kek,
    )
    .map_err(bad)
}

/// LUKS2 token type of the copy of the KMIP-wrapped master secret in the state disk's header.
pub const KMIP_WRAPPED_SECRET_TOKEN: &str = "constellation-kmip-wrapped-master-secret";

/// With an external KMS: copies the wrapped master secret (AES-GCM under the KMS's KEK, so
/// nothing in it is usable without the KMS) into the state disk's LUKS2 header. Recover reads it
/// there before the disk opens, so the operator can recover with KMIP credentials instead of
/// the master secret ([`wrapped_secret_from_header`]).
fn copy_wrapped_secret_to_header(node: &NodeContext) -> Result<(), ControlPlaneError> {
    let path = node
        .state_dir
        .join("keyservice")
        .join(constellation_keyservice::kmip::WRAPPED_SECRET_FILE);
    let wrapped = std::fs::read_to_string(&path).map_err(|source| ControlPlaneError::Io {
        path: path.clone(),
        source,
    })?;
    crate::statedisk::write_token(&node.disk_path(), KMIP_WRAPPED_SECRET_TOKEN, &wrapped)?;
    tracing::info!("the KMIP-wrapped master secret is copied into the state disk's header");
    Ok(())
}

/// Recover with KMIP credentials instead of the master secret: the wrapped copy in the state
/// disk's header, unwrapped by the KEK the KMS (reached with `kmip`) still grants. `None` when
/// the header holds no wrapped copy (a cluster-managed master secret).
pub async fn wrapped_secret_from_header(
    node: &NodeContext,
    cluster_name: Option<&str>,
    kmip: StoredKmipSettings,
) -> Result<Option<MasterSecret>, ControlPlaneError> {
    /// The cluster a wrapped secret is bound to (its AAD), for a node whose control-plane
    /// record is still on its closed state volume (a VM).
    #[derive(serde::Deserialize)]
    struct BoundTo {
        cluster_name: String,
    }
    let disk = node.disk_path();
    let Some(wrapped) = crate::statedisk::read_token(&disk, KMIP_WRAPPED_SECRET_TOKEN)? else {
        return Ok(None);
    };
    let cluster_name = match cluster_name {
        Some(name) => name.to_owned(),
        None => {
            serde_json::from_str::<BoundTo>(&wrapped)
                .map_err(|e| constellation_keyservice::BackendError::CorruptFile {
                    path: disk.clone(),
                    reason: format!("the wrapped master secret in its header: {e}"),
                })?
                .cluster_name
        }
    };
    let cluster_name = cluster_name.as_str();
    let backend = KmipBackend::new(
        kmip_settings(&kmip, cluster_name)?,
        node.state_dir.join("keyservice"),
        cluster_name,
    )?;
    tracing::info!(
        endpoint = %backend.endpoint(),
        "unwrapping the master secret from the state disk's header with the external KMS"
    );
    Ok(Some(backend.unwrap_blob(wrapped.as_bytes(), &disk).await?))
}

/// After a restart: the master secret as the external KMS holds it (the KEK in the KMIP server
/// unwraps the blob kept since Init), or `None` for a cluster-managed master secret. With an
/// external KMS, the KMS stays in charge of the cluster: a KEK destroyed there ends recovery.
pub async fn external_master(
    node: &NodeContext,
    cluster_name: &str,
) -> Result<Option<MasterSecret>, ControlPlaneError> {
    let dir = node.state_dir.join("keyservice");
    let Some(kmip) = StoredKmipSettings::load(&dir)? else {
        return Ok(None);
    };
    let backend = backend(node, cluster_name, &KmsChoice::Kmip(kmip))?;
    tracing::info!(backend = %backend.describe(), "loading the master secret from the external KMS");
    Ok(Some(backend.load().await?))
}

/// Init: persists the master secret through the chosen backend and creates the cluster PKI.
pub async fn initialize_material(
    node: &Arc<NodeContext>,
    cluster_name: &str,
    secrets: &ControlPlaneSecrets,
    kms: KmsChoice,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<ControlPlaneMaterial, ControlPlaneError> {
    let backend = backend(node, cluster_name, &kms)?;
    let master = MasterSecret::new(secrets.master_secret.clone(), secrets.master_salt.clone())?;
    backend.store(&master).await?;
    if let KmsChoice::Kmip(kmip) = &kms {
        // What Recover needs to ask the KMS again after a restart.
        kmip.store(&node.state_dir.join("keyservice"))?;
        copy_wrapped_secret_to_header(node)?;
    }
    say(format!("master secret stored: {}", backend.describe()));
    let pki = ClusterPki::generate(cluster_name, node.clock.as_ref())?;
    let pki_dir = node.state_dir.join("pki");
    pki.write_to_dir(&pki_dir)?;
    say(
        "generated the cluster PKI (Kubernetes CA, service-account key, front-proxy and etcd CAs)"
            .to_owned(),
    );
    let admin = pki.admin_client_cert(node.clock.as_ref())?;
    Ok(ControlPlaneMaterial {
        cluster_name: cluster_name.to_owned(),
        pki: Arc::new(pki),
        admin,
        master: Arc::new(master),
        measurement_salt: secrets.measurement_salt.clone(),
        measurement_secret: secrets.measurement_secret.clone(),
        kubernetes_version: String::new(),
    })
}

/// Recover: the material of a control plane that ran before this restart, from the PKI it wrote
/// under `state/pki` (at Init or from a control-plane join ticket), its [`ControlPlaneRecord`]
/// and the master secret the operator handed back. The master secret is not stored again: the
/// backend holds it since Init.
///
/// [`ControlPlaneRecord`]: crate::state::ControlPlaneRecord
pub fn recovered_material(
    node: &NodeContext,
    record: &crate::state::ControlPlaneRecord,
    master: MasterSecret,
    measurement_salt: SecretBytes,
    measurement_secret: SecretBytes,
) -> Result<ControlPlaneMaterial, ControlPlaneError> {
    let pki = ClusterPki::load_from_dir(&node.state_dir.join("pki"), &record.cluster_name)?;
    let admin = pki.admin_client_cert(node.clock.as_ref())?;
    Ok(ControlPlaneMaterial {
        cluster_name: record.cluster_name.clone(),
        pki: Arc::new(pki),
        admin,
        master: Arc::new(master),
        measurement_salt,
        measurement_secret,
        kubernetes_version: record.kubernetes_version.clone(),
    })
}

/// Runs the node's Kubernetes installer; returns its name and what it did.
pub fn install_kubernetes(
    node: &NodeContext,
    material: &ControlPlaneMaterial,
    kubernetes_version: &str,
    network: &NetworkSettings,
    endpoint: &str,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<String, ControlPlaneError> {
    let installer = node.installer.as_ref();
    let me = node.metadata.self_info()?;
    // Secrets are encrypted through the key service's KMS v2 plugin: the configuration is
    // written whatever the installer (the local platform runs no API server to read it).
    let encryption = match &node.daemons {
        Some(daemons) => {
            let setup = EncryptionSetup {
                config_path: node
                    .node_dir
                    .join("kubernetes")
                    .join(ENCRYPTION_CONFIGURATION_FILE),
                kms_socket: daemons.kms_socket(),
            };
            write_encryption_configuration(&setup.config_path, &setup.kms_socket).map_err(|e| {
                ControlPlaneError::Kubernetes {
                    installer: installer.name(),
                    message: e.to_string(),
                }
            })?;
            say(format!(
                "wrote the API server's EncryptionConfiguration (Secrets through the KMS v2 plugin at {})",
                setup.kms_socket.display()
            ));
            Some(setup)
        }
        None => None,
    };
    let params = InitParams {
        cluster_name: material.cluster_name.clone(),
        kubernetes_version: kubernetes_version.to_owned(),
        node_name: node.name.clone(),
        advertise_address: me.ip,
        bind_port: ports::KUBE_API,
        control_plane_endpoint: endpoint.to_owned(),
        pod_subnet: network.pod_cidr.clone(),
        service_subnet: network.service_cidr.clone(),
        cert_sans: vec![me.ip.to_string()],
        bootstrap_token: BootstrapToken::generate(TOKEN_TTL, node.clock.as_ref()),
        pki: material.pki.clone(),
        kubelet_extra_args: Vec::new(),
        kubelet_tls: None,
        encryption,
    };
    let outcome = installer
        .init(&params)
        .map_err(|e| ControlPlaneError::Kubernetes {
            installer: installer.name(),
            message: e.to_string(),
        })?;
    say(format!(
        "Kubernetes installer {:?}: {}",
        installer.name(),
        outcome.message
    ));
    Ok(installer.name().to_owned())
}

/// The supervised daemons of this control plane (see [`crate::daemons`]).
fn daemons(node: &NodeContext) -> Result<&NodeDaemons, ControlPlaneError> {
    node.daemons.as_ref().ok_or(ControlPlaneError::Serve {
        what: "control-plane daemons",
        message: "this node supervises no daemons (not a control plane)".into(),
    })
}

/// How long Init and Recover wait for the daemons to report ready before they answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for `name` to be ready and says so (or why not: the supervisor keeps trying).
async fn wait_ready(
    daemons: &NodeDaemons,
    name: &str,
    listening: String,
    say: &(dyn Fn(String) + Send + Sync),
) {
    match daemons.supervisor().wait_ready(name, READY_TIMEOUT).await {
        Ok(()) => say(format!("{name} daemon ready: {listening}")),
        Err(e) => {
            tracing::warn!("{e}");
            say(format!("{name} daemon started, not ready yet: {e}"));
        }
    }
}

/// Where this control plane's join service finds its policy and the disk bindings: in etcd
/// (this node's member started first, or found running: Init starts it before anything is
/// claimed) with a client certificate of its own.
async fn join_service_shared(
    node: &Arc<NodeContext>,
    pki: &ClusterPki,
    cluster_name: &str,
    how: MemberStart,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<JoinServiceShared, ControlPlaneError> {
    let endpoints = crate::etcd::start_member(node, pki, cluster_name, how, say).await?;
    let credentials =
        pki.etcd_client_cert(&format!("joinservice-{}", node.name), node.clock.as_ref())?;
    Ok(JoinServiceShared {
        endpoints,
        credentials,
    })
}

/// Starts the key service and the join service daemons on this node's address, the join
/// service fetching keys from the local key service. The supervisor keeps them running.
pub async fn start_services(
    node: Arc<NodeContext>,
    material: ControlPlaneMaterial,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ControlPlaneError> {
    let me = node.metadata.self_info()?;
    let daemons = daemons(&node)?;
    let master_dir = node.state_dir.join("keyservice");
    let kmip = StoredKmipSettings::load(&master_dir)?;
    if kmip.is_none() {
        // A control plane that joined without the master material gets the master secret only
        // from Recover: the key service daemon reads it from the state folder like the Init
        // node's.
        let cluster_managed = ClusterManagedBackend::new(&master_dir);
        if !master_dir.join(CLUSTER_SECRET_FILE).exists() {
            std::fs::create_dir_all(&master_dir).map_err(|source| ControlPlaneError::Io {
                path: master_dir.clone(),
                source,
            })?;
            cluster_managed.store(&material.master).await?;
        }
    }
    daemons.start_key_service(
        &material.pki,
        node.clock.as_ref(),
        &material.cluster_name,
        kmip.as_ref(),
    )?;
    let key_service = SocketAddr::new(me.ip, ports::KEY_SERVICE);
    let shared = join_service_shared(
        &node,
        &material.pki,
        &material.cluster_name,
        MemberStart::Existing,
        say,
    )
    .await?;
    daemons.start_join_service(
        &node.name,
        JoinServiceInputs {
            cluster_name: material.cluster_name.clone(),
            api_server_endpoint: me.endpoint(ports::KUBE_API),
            kubernetes_version: material.kubernetes_version.clone(),
            key_service_endpoints: vec![key_service],
            measurement_salt: material.measurement_salt.clone(),
            measurement_secret: material.measurement_secret.clone(),
            token_ttl: TOKEN_TTL,
            shared,
        },
    )?;
    wait_ready(
        daemons,
        KEY_SERVICE,
        format!("key service on {key_service} (mutual TLS, certificates from the key-service CA)"),
        say,
    )
    .await;
    if !crate::etcd::member_ready(daemons.supervisor()) {
        // Without quorum (control planes still down) the join service cannot read its policy
        // yet; it becomes ready once enough etcd members are back.
        say(format!(
            "{JOIN_SERVICE} daemon started; ready once etcd has quorum (its member has no leader yet)"
        ));
        return Ok(());
    }
    wait_ready(
        daemons,
        JOIN_SERVICE,
        format!(
            "join service on {} (mutual aTLS)",
            SocketAddr::new(me.ip, ports::JOIN)
        ),
        say,
    )
    .await;
    Ok(())
}

/// Whether this node holds the key service's master material in `state/keyservice/`:
/// `Some(None)` a cluster-managed master secret, `Some(Some(kmip))` the KMIP settings (and the
/// wrapped blob), `None` neither.
fn held_master_material(
    node: &NodeContext,
) -> Result<Option<Option<StoredKmipSettings>>, ControlPlaneError> {
    let dir = node.state_dir.join("keyservice");
    if let Some(kmip) = StoredKmipSettings::load(&dir)? {
        return Ok(Some(Some(kmip)));
    }
    Ok(dir.join(CLUSTER_SECRET_FILE).exists().then_some(None))
}

/// A control plane that joined holds the cluster PKI and, from a join service that holds it,
/// the key service's master material: then it runs a key service of its own, and its join
/// service daemon asks that one first. Its join service falls back to the key services of the
/// other control planes (those listed when it starts), authenticated by a client certificate
/// from the key-service CA it received in its join ticket; one that joined without master
/// material (through a join service that had none) uses only those.
pub async fn start_joined_services(
    node: Arc<NodeContext>,
    cluster_name: String,
    config: JoinTicketConfig,
) -> Result<SocketAddr, ControlPlaneError> {
    let me = node.metadata.self_info()?;
    let others: Vec<SocketAddr> = node
        .metadata
        .cluster()?
        .nodes
        .iter()
        .filter(|n| n.role == Role::ControlPlane && n.name != me.name)
        .map(|n| SocketAddr::new(n.ip, ports::KEY_SERVICE))
        .collect();
    let pki = ClusterPki::load_from_dir(&node.state_dir.join("pki"), &cluster_name)?;
    let say = |m: String| tracing::info!("{m}");
    // With the master material from the join ticket, this control plane runs a key service of
    // its own (as Init and Recover start it) and its join service asks it first.
    let mut others = others;
    if let Some(kmip) = held_master_material(&node)? {
        if kmip.is_some() {
            copy_wrapped_secret_to_header(&node)?;
        }
        daemons(&node)?.start_key_service(
            &pki,
            node.clock.as_ref(),
            &cluster_name,
            kmip.as_ref(),
        )?;
        let own = SocketAddr::new(me.ip, ports::KEY_SERVICE);
        others.insert(0, own);
        say(format!(
            "key service daemon started on {own} with the master material from the join ticket"
        ));
    }
    let shared = join_service_shared(&node, &pki, &cluster_name, MemberStart::Join, &say).await?;
    daemons(&node)?.start_join_service(
        &node.name,
        JoinServiceInputs {
            cluster_name,
            api_server_endpoint: config.api_server_endpoint,
            kubernetes_version: config.kubernetes_version,
            key_service_endpoints: others,
            measurement_salt: config.measurement_salt,
            measurement_secret: config.measurement_secret,
            token_ttl: config.token_ttl,
            shared,
        },
    )?;
    Ok(SocketAddr::new(me.ip, ports::JOIN))
}
