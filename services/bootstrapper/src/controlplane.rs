//! A control-plane node's services after Init (or a control-plane join, or Recover): the key
//! service (mutual TLS with certificates from the cluster's key-service CA, created at Init and
//! kept in the cluster PKI) and the join service (mutual aTLS), plus the Kubernetes installer.
//!
//! Init and Recover run both services (they hold the master secret). A control plane that
//! joined runs only the join service, which fetches data keys from the other control planes'
//! key services with a client certificate from the same CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::atls;
use constellation_common::limits::ListenerLimits;
use constellation_common::metadata::{ports, Role};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::attested_peer::AttestedPeerInterceptor;
use constellation_joinservice::pki::{ClientCredentials, ClusterPki, NodeIdentity};
use constellation_joinservice::ticket::{
    DataKeyError, DataKeySource, JoinTicketConfig, JoinTicketIssuer, NodeDirectory,
};
use constellation_joinservice::token::{BootstrapToken, TokenRegistry};
use constellation_keyservice::cluster_managed::ClusterManagedBackend;
use constellation_keyservice::kmip::{
    KekSource, KmipBackend, KmipSettings, RetryPolicy, StoredKmipSettings,
};
use constellation_keyservice::{KeyService, MasterSecret, MasterSecretBackend};
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::GetDataKeyRequest;
use constellation_proto::PROTOCOL_VERSION;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::context::NodeContext;
use crate::kubernetes::InitParams;
use crate::policy::{ClusterValidator, Scope};

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
            Some(Backend::Kmip(k)) => {
                if k.endpoint.rsplit_once(':').is_none() {
                    return Err(format!("KMIP endpoint {:?} is not host:port", k.endpoint));
                }
                Ok(Self::Kmip(StoredKmipSettings {
                    endpoint: k.endpoint,
                    server_ca_pem: k.server_ca_pem,
                    client_cert_pem: k.client_cert_pem,
                    client_key_pem: SecretBytes::new(k.client_key_pem),
                    kek_id: k.kek_id,
                }))
            }
        }
    }
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

fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use der::Encode as _;
    let certs = x509_cert::Certificate::load_pem_chain(pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE in PEM".into());
    }
    certs
        .iter()
        .map(|c| {
            c.to_der()
                .map(CertificateDer::from)
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    let (label, der) = der::pem::decode_vec(pem).map_err(|e| e.to_string())?;
    match label {
        "PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))),
        "RSA PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs1(der.into())),
        "EC PRIVATE KEY" => Ok(PrivateKeyDer::Sec1(der.into())),
        other => Err(format!("unsupported key PEM label {other:?}")),
    }
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
    let bad = |what: &str, e: String| ControlPlaneError::Certificates(format!("{what}: {e}"));
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| bad("KMIP endpoint", format!("{endpoint:?} is not host:port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("KMIP endpoint", format!("bad port in {endpoint:?}")))?;
    Ok(KmipSettings {
        host: host.to_owned(),
        port,
        ca_certificates: pem_certs(&kmip.server_ca_pem).map_err(|e| bad("KMIP CA", e))?,
        client_cert_chain: pem_certs(&kmip.client_cert_pem)
            .map_err(|e| bad("KMIP client certificate", e))?,
        client_key: pem_key(kmip.client_key_pem.expose()).map_err(|e| bad("KMIP client key", e))?,
        kek: if kmip.kek_id.is_empty() {
            KekSource::Create {
                name: format!("constellation-{cluster_name}-kek"),
            }
        } else {
            KekSource::Existing {
                id: kmip.kek_id.clone(),
            }
        },
        retry: RetryPolicy::default(),
        io_timeout: Duration::from_secs(10),
    })
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

/// The node directory for join-ticket checks, from the platform's metadata.
struct MetadataDirectory(Arc<NodeContext>);

impl NodeDirectory for MetadataDirectory {
    fn node(&self, name: &str) -> Option<NodeIdentity> {
        let cluster = self.0.metadata.cluster().ok()?;
        let n = cluster.node(name)?;
        Some(NodeIdentity {
            name: n.name.clone(),
            role: n.role,
            ips: vec![n.ip],
            dns_names: vec![n.name.clone()],
        })
    }
}

/// Data keys from this cluster's key services, over mutual TLS with a client certificate from
/// the key-service CA. The servers are looked up on every request (the control planes in the
/// metadata may change) and tried in order until one answers; channels are kept per address.
struct KeyServiceKeys {
    tls: Arc<rustls::ClientConfig>,
    servers: Box<dyn Fn() -> Vec<std::net::IpAddr> + Send + Sync>,
    channels: std::sync::Mutex<
        std::collections::HashMap<std::net::IpAddr, KeyServiceClient<tonic::transport::Channel>>,
    >,
}

impl KeyServiceKeys {
    fn new(
        pki: &ClusterPki,
        me: &constellation_common::metadata::NodeInfo,
        clock: &dyn constellation_attestation::Clock,
        servers: Box<dyn Fn() -> Vec<std::net::IpAddr> + Send + Sync>,
    ) -> Result<Self, ControlPlaneError> {
        let creds = pki.key_service_client_cert(&me.name, me.ip, clock)?;
        let (chain, key) = rustls_credentials(creds);
        let tls = constellation_keyservice::tls::mutual_tls_client_config(
            &[CertificateDer::from(pki.key_service_ca_der().to_vec())],
            chain,
            key,
        )
        .map_err(|e| ControlPlaneError::Certificates(format!("key service client: {e}")))?;
        Ok(Self {
            tls,
            servers,
            channels: Default::default(),
        })
    }

    fn client(
        &self,
        ip: std::net::IpAddr,
    ) -> Result<KeyServiceClient<tonic::transport::Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = channels.get(&ip) {
            return Ok(client.clone());
        }
        let addr = SocketAddr::new(ip, ports::KEY_SERVICE);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3));
        let channel =
            endpoint.connect_with_connector_lazy(constellation_keyservice::tls::TlsConnector::new(
                self.tls.clone(),
                rustls::pki_types::ServerName::IpAddress(ip.into()),
            ));
        let client = KeyServiceClient::new(channel);
        channels.insert(ip, client.clone());
        Ok(client)
    }
}

#[tonic::async_trait]
impl DataKeySource for KeyServiceKeys {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        let err = |reason: String| DataKeyError {
            key_id: key_id.to_owned(),
            reason,
        };
        let length = u32::try_from(len).map_err(|_| err(format!("length {len} too large")))?;
        let servers = (self.servers)();
        if servers.is_empty() {
            return Err(err("no control plane runs a key service".into()));
        }
        let mut failures = Vec::new();
        for ip in servers {
            let mut client = match self.client(ip) {
                Ok(client) => client,
                Err(e) => {
                    failures.push(format!("{ip}: {e}"));
                    continue;
                }
            };
            match client
                .get_data_key(GetDataKeyRequest {
                    version: PROTOCOL_VERSION,
                    data_key_id: key_id.to_owned(),
                    length,
                })
                .await
            {
                Ok(resp) => return Ok(SecretBytes::new(resp.into_inner().data_key)),
                Err(s) => failures.push(format!("key service {ip}: {}", s.message())),
            }
        }
        Err(err(failures.join("; ")))
    }
}

/// rustls forms of issued credentials.
fn rustls_credentials(
    creds: constellation_joinservice::pki::ServiceCredentials,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = creds
        .cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        creds.key_pkcs8_der.expose().to_vec(),
    ));
    (chain, key)
}

/// Starts the key service and the join service on this node's address, the join service
/// fetching keys from the local key service. They run until the process exits.
pub async fn start_services(
    node: Arc<NodeContext>,
    material: ControlPlaneMaterial,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ControlPlaneError> {
    let me = node.metadata.self_info()?;
    start_key_service(&node, &material, &me).await?;
    say(format!(
        "key service listening on {} (mutual TLS, certificates from the key-service CA)",
        SocketAddr::new(me.ip, ports::KEY_SERVICE)
    ));
    let local = me.ip;
    let keys = KeyServiceKeys::new(
        &material.pki,
        &me,
        node.clock.as_ref(),
        Box::new(move || vec![local]),
    )?;
    let config = JoinTicketConfig {
        measurement_salt: material.measurement_salt.clone(),
        measurement_secret: material.measurement_secret.clone(),
        api_server_endpoint: me.endpoint(ports::KUBE_API),
        kubernetes_version: material.kubernetes_version.clone(),
        token_ttl: TOKEN_TTL,
    };
    let join_addr = start_join_service(&node, material.pki.clone(), config, Arc::new(keys)).await?;
    say(format!(
        "join service listening on {join_addr} (mutual aTLS)"
    ));
    Ok(())
}

/// A control plane that joined holds the cluster PKI but not the master secret: its join
/// service fetches data keys from the key services of the other control planes, authenticated
/// by a client certificate from the key-service CA it received in its join ticket.
pub async fn start_joined_services(
    node: Arc<NodeContext>,
    pki: Arc<ClusterPki>,
    config: JoinTicketConfig,
) -> Result<SocketAddr, ControlPlaneError> {
    let me = node.metadata.self_info()?;
    let metadata = node.metadata.clone();
    let name = me.name.clone();
    let others = move || {
        metadata
            .cluster()
            .map(|c| {
                c.nodes
                    .iter()
                    .filter(|n| n.role == Role::ControlPlane && n.name != name)
                    .map(|n| n.ip)
                    .collect()
            })
            .unwrap_or_default()
    };
    let keys = KeyServiceKeys::new(&pki, &me, node.clock.as_ref(), Box::new(others))?;
    start_join_service(&node, pki, config, Arc::new(keys)).await
}

/// The key service on this node's address: mutual TLS, a server certificate from the
/// key-service CA, and only clients with a certificate from that CA get keys.
async fn start_key_service(
    node: &NodeContext,
    material: &ControlPlaneMaterial,
    me: &constellation_common::metadata::NodeInfo,
) -> Result<(), ControlPlaneError> {
    let serve_err = |e: String| ControlPlaneError::Serve {
        what: "key service",
        message: e,
    };
    let (chain, key) = rustls_credentials(
        material
            .pki
            .key_service_server_cert(me.ip, node.clock.as_ref())?,
    );
    let tls = constellation_keyservice::tls::mutual_tls_server_config(
        &[CertificateDer::from(
            material.pki.key_service_ca_der().to_vec(),
        )],
        chain,
        key,
    )
    .map_err(|e| serve_err(e.to_string()))?;
    let addr = SocketAddr::new(me.ip, ports::KEY_SERVICE);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| serve_err(e.to_string()))?;
    let ks = KeyService::new((*material.master).clone());
    tokio::spawn(async move {
        if let Err(e) =
            constellation_keyservice::serve(listener, tls, ks, std::future::pending()).await
        {
            tracing::error!("key service stopped: {e}");
        }
    });
    Ok(())
}

/// The join service on this node's address: mutual aTLS; joiners are checked against the
/// cluster's current metadata and measurements.
async fn start_join_service(
    node: &Arc<NodeContext>,
    pki: Arc<ClusterPki>,
    config: JoinTicketConfig,
    keys: Arc<dyn DataKeySource>,
) -> Result<SocketAddr, ControlPlaneError> {
    let serve_err = |e: String| ControlPlaneError::Serve {
        what: "join service",
        message: e,
    };
    let me = node.metadata.self_info()?;
    let issuer = JoinTicketIssuer::new(
        keys,
        Arc::new(MetadataDirectory(node.clone())),
        node.disk_bindings.clone(),
        pki,
        Arc::new(TokenRegistry::default()),
        node.clock.clone(),
        config,
    );
    let joiner_validator = Arc::new(ClusterValidator::new(
        node.metadata.clone(),
        Scope::FreshNode,
    ));
    let atls_config = atls::ServerConfig::mutual(node.issuer.clone(), joiner_validator.clone())
        .map_err(|e| serve_err(e.to_string()))?
        .with_limits(ListenerLimits::default());
    let addr = SocketAddr::new(me.ip, ports::JOIN);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| serve_err(e.to_string()))?;
    let peers = AttestedPeerInterceptor::new(move |ak| joiner_validator.node_for(ak));
    tokio::spawn(async move {
        if let Err(e) = constellation_joinservice::server::serve(
            listener,
            atls_config,
            issuer,
            peers,
            std::future::pending(),
        )
        .await
        {
            tracing::error!("join service stopped: {e}");
        }
    });
    Ok(addr)
}
