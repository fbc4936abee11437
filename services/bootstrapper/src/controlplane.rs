//! A control-plane node's services after Init (or a control-plane join, or Recover): the key
//! service (mutual TLS with certificates issued when the services start) and the join service
//! (mutual aTLS), plus the Kubernetes installer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::atls;
use constellation_common::metadata::{ports, Role};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::attested_peer::AttestedPeerInterceptor;
use constellation_joinservice::pki::{ClientCredentials, ClusterPki, NodeIdentity, NodeRole};
use constellation_joinservice::ticket::{
    DataKeyError, DataKeySource, JoinTicketConfig, JoinTicketIssuer, NodeDirectory,
};
use constellation_joinservice::token::{BootstrapToken, TokenRegistry};
use constellation_keyservice::cluster::ClusterManagedBackend;
use constellation_keyservice::kmip::{KekSource, KmipBackend, KmipSettings, RetryPolicy};
use constellation_keyservice::{KeyService, MasterSecret, MasterSecretBackend};
use constellation_proto::join::join_service_server::JoinServiceServer;
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::GetDataKeyRequest;
use constellation_proto::PROTOCOL_VERSION;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::kubernetes::InitParams;
use crate::node::NodeContext;
use crate::policy::{ClusterValidator, Scope};

/// How long bootstrap tokens handed to joining nodes live.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

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
    Kmip {
        endpoint: String,
        server_ca_pem: Vec<u8>,
        client_cert_pem: Vec<u8>,
        client_key_pem: SecretBytes,
        kek_id: String,
    },
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
                Ok(Self::Kmip {
                    endpoint: k.endpoint,
                    server_ca_pem: k.server_ca_pem,
                    client_cert_pem: k.client_cert_pem,
                    client_key_pem: SecretBytes::new(k.client_key_pem),
                    kek_id: k.kek_id,
                })
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
        KmsChoice::Kmip {
            endpoint,
            server_ca_pem,
            client_cert_pem,
            client_key_pem,
            kek_id,
        } => {
            let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| {
                ControlPlaneError::Certificates(format!("bad KMIP endpoint {endpoint:?}"))
            })?;
            let port: u16 = port.parse().map_err(|_| {
                ControlPlaneError::Certificates(format!("bad KMIP port in {endpoint:?}"))
            })?;
            let settings = KmipSettings {
                host: host.to_owned(),
                port,
                ca_certificates: pem_certs(server_ca_pem)
                    .map_err(|e| ControlPlaneError::Certificates(format!("KMIP CA: {e}")))?,
                client_cert_chain: pem_certs(client_cert_pem).map_err(|e| {
                    ControlPlaneError::Certificates(format!("KMIP client certificate: {e}"))
                })?,
                client_key: pem_key(client_key_pem.expose()).map_err(|e| {
                    ControlPlaneError::Certificates(format!("KMIP client key: {e}"))
                })?,
                kek: if kek_id.is_empty() {
                    KekSource::Create {
                        name: format!("constellation-{cluster_name}-kek"),
                    }
                } else {
                    KekSource::Existing { id: kek_id.clone() }
                },
                retry: RetryPolicy::default(),
                io_timeout: Duration::from_secs(10),
            };
            Box::new(KmipBackend::new(settings, &dir, cluster_name)?)
        }
    })
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
            role: match n.role {
                Role::ControlPlane => NodeRole::ControlPlane,
                Role::Worker => NodeRole::Worker,
            },
            ips: vec![n.ip],
            dns_names: vec![n.name.clone()],
        })
    }
}

/// Data keys from the key service, over mutual TLS.
struct KeyServiceKeys {
    client: KeyServiceClient<tonic::transport::Channel>,
}

#[tonic::async_trait]
impl DataKeySource for KeyServiceKeys {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        let err = |reason: String| DataKeyError {
            key_id: key_id.to_owned(),
            reason,
        };
        let length = u32::try_from(len).map_err(|_| err(format!("length {len} too large")))?;
        let resp = self
            .client
            .clone()
            .get_data_key(GetDataKeyRequest {
                version: PROTOCOL_VERSION,
                data_key_id: key_id.to_owned(),
                length,
            })
            .await
            .map_err(|s| err(format!("key service: {}", s.message())))?;
        Ok(SecretBytes::new(resp.into_inner().data_key))
    }
}

/// Certificates for the key service's mutual TLS, issued by a CA created when the services start
/// (the key service and its only clients run inside this node).
struct ServiceCertificates {
    ca: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn service_certificates(ip: std::net::IpAddr) -> Result<ServiceCertificates, ControlPlaneError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };
    let e = |e: rcgen::Error| ControlPlaneError::Certificates(e.to_string());
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "constellation key service CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str,
                eku: ExtendedKeyUsagePurpose|
     -> Result<
        (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        ControlPlaneError,
    > {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::IpAddress(ip)];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer).map_err(e)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    };
    Ok(ServiceCertificates {
        ca: ca_cert.der().clone(),
        server: leaf("key-service", ExtendedKeyUsagePurpose::ServerAuth)?,
        client: leaf("join-service", ExtendedKeyUsagePurpose::ClientAuth)?,
    })
}

/// Starts the key service and the join service on this node's address. They run until the
/// process exits.
pub async fn start_services(
    node: Arc<NodeContext>,
    material: ControlPlaneMaterial,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ControlPlaneError> {
    let me = node.metadata.self_info()?;
    let certs = service_certificates(me.ip)?;
    let serve_err =
        |what: &'static str| move |e: String| ControlPlaneError::Serve { what, message: e };

    // Key service: mutual TLS; only holders of a certificate from the service CA get keys.
    let ks_addr = SocketAddr::new(me.ip, ports::KEY_SERVICE);
    let ks_listener = tokio::net::TcpListener::bind(ks_addr)
        .await
        .map_err(|e| serve_err("key service")(e.to_string()))?;
    let ks_tls = constellation_keyservice::tls::mutual_tls_server_config(
        std::slice::from_ref(&certs.ca),
        certs.server.0,
        certs.server.1,
    )
    .map_err(|e| serve_err("key service")(e.to_string()))?;
    let ks = KeyService::new((*material.master).clone());
    tokio::spawn(async move {
        if let Err(e) =
            constellation_keyservice::serve(ks_listener, ks_tls, ks, std::future::pending()).await
        {
            tracing::error!("key service stopped: {e}");
        }
    });
    say(format!("key service listening on {ks_addr} (mutual TLS)"));

    let client_tls = constellation_keyservice::tls::mutual_tls_client_config(
        &[certs.ca],
        certs.client.0,
        certs.client.1,
    )
    .map_err(|e| serve_err("key service client")(e.to_string()))?;
    let server_name = rustls::pki_types::ServerName::IpAddress(me.ip.into());
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{ks_addr}"))
        .map_err(|e| serve_err("key service client")(e.to_string()))?;
    let channel = endpoint.connect_with_connector_lazy(
        constellation_keyservice::tls::TlsConnector::new(client_tls, server_name),
    );
    let keys = Arc::new(KeyServiceKeys {
        client: KeyServiceClient::new(channel),
    });

    // Join service: mutual aTLS; joiners are checked against the cluster's current metadata.
    let issuer = JoinTicketIssuer::new(
        keys,
        Arc::new(MetadataDirectory(node.clone())),
        material.pki.clone(),
        Arc::new(TokenRegistry::default()),
        node.clock.clone(),
        JoinTicketConfig {
            measurement_salt: material.measurement_salt.clone(),
            measurement_secret: material.measurement_secret.clone(),
            api_server_endpoint: me.endpoint(ports::KUBE_API),
            kubernetes_version: material.kubernetes_version.clone(),
            token_ttl: TOKEN_TTL,
        },
    );
    let joiner_validator = Arc::new(ClusterValidator::new(
        node.metadata.clone(),
        Scope::FreshNode,
    ));
    let atls_config = atls::ServerConfig::mutual(node.issuer.clone(), joiner_validator.clone())
        .map_err(|e| serve_err("join service")(e.to_string()))?;
    let join_addr = SocketAddr::new(me.ip, ports::JOIN);
    let join_listener = tokio::net::TcpListener::bind(join_addr)
        .await
        .map_err(|e| serve_err("join service")(e.to_string()))?;
    let service = JoinServiceServer::with_interceptor(
        issuer,
        AttestedPeerInterceptor::new(move |ak| joiner_validator.node_for(ak)),
    );
    let incoming = atls::incoming(join_listener, atls_config);
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("join service stopped: {e}");
        }
    });
    say(format!(
        "join service listening on {join_addr} (mutual aTLS)"
    ));
    Ok(())
}
