//! The configuration of `constellation-keyservice` (a YAML/JSON file whose every field is also a
//! flag; flags win) and the layout of its state folder. Secrets come only from that folder:
//!
//! - `keyservice/cluster-master-secret.json`: the master secret and salt (the cluster-managed
//!   backend's file, as the bootstrapper writes it at Init).
//! - `keyservice-tls/ca.crt`: the key-service CA (PEM); clients need a certificate from it.
//! - `keyservice-tls/tls.crt`, `keyservice-tls/tls.key`: this server's certificate chain and key.
//! - With `backend: kmip`: `keyservice/kmip-wrapped-master-secret.json` (the master secret
//!   wrapped by a KEK in the KMIP server, written at Init) and `keyservice-kmip/ca.crt` (the
//!   KMIP server's CA), `keyservice-kmip/client.crt`, `keyservice-kmip/client.key` (this
//!   service's KMIP client certificate and key, PEM).
//!
//! Secret files readable by every user are refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use constellation_common::metadata::ports;
use constellation_daemon::config::{existing_dir, invalid, load_file, required, ConfigError};
use constellation_daemon::secrets;
use constellation_daemon::settings::{DaemonSettings, DaemonSettingsFile};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::cluster_managed::{ClusterManagedBackend, CLUSTER_SECRET_FILE};
use crate::kmip::{KekSource, KmipBackend, KmipSettings, RetryPolicy, WRAPPED_SECRET_FILE};
use crate::master::{MasterSecret, MasterSecretBackend};

/// Directory of the master secret under the state folder.
pub const MASTER_SECRET_DIR: &str = "keyservice";
/// Directory of the TLS files under the state folder.
pub const TLS_DIR: &str = "keyservice-tls";
/// Directory of the KMIP client files under the state folder.
pub const KMIP_DIR: &str = "keyservice-kmip";
/// Default port of the health server.
pub const HEALTH_PORT: u16 = 9002;

/// Where the master secret is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// In `keyservice/cluster-master-secret.json` on the (encrypted) state folder.
    #[default]
    ClusterManaged,
    /// Wrapped by a KEK held in a KMIP server (`keyservice/kmip-wrapped-master-secret.json`).
    Kmip,
}

/// The config file's fields (all optional here; see [`Config`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address of the key service (gRPC GetDataKey, mutual TLS with certificates from the key-service CA). Default 0.0.0.0:9001.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// State folder holding the master secret and the TLS files (required; see docs/daemons/keyservice.md for its layout).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Absolute path of the unix socket for the Kubernetes KMS v2 plugin (Status, Encrypt, Decrypt). Unset: not served.
    #[arg(long, value_name = "PATH")]
    pub kms_socket: Option<PathBuf>,
    /// Where the master secret is kept: `cluster-managed` (default) or `kmip`.
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<BackendKind>,
    /// Name of the cluster: bound into the KMIP-wrapped master secret (required with `kmip`).
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// KMIP server as host:port (required with `kmip`; mutual TLS with the files in keyservice-kmip/).
    #[arg(long, value_name = "HOST:PORT")]
    pub kmip_endpoint: Option<String>,
    /// KMIP unique identifier of the KEK. Unset: the one recorded in the wrapped master secret.
    #[arg(long, value_name = "ID")]
    pub kmip_kek_id: Option<String>,
    #[command(flatten)]
    #[serde(default)]
    pub daemon: DaemonSettingsFile,
}

/// `constellation-keyservice --help`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "constellation-keyservice",
    version,
    about = "Constellation key service: data keys derived from the cluster's master secret, over mutual TLS only; optionally the Kubernetes KMS v2 plugin",
    long_about = None,
    after_help = "Secrets (master secret, TLS key) are read only from files under --state-dir, never from flags or the environment.\nHealth: GET /healthz (alive) and /readyz (master secret and TLS credentials loaded, service listening) on --health-listen.\nSignals: SIGTERM/SIGINT drain in-flight requests for --shutdown-grace-secs, then exit 0."
)]
pub struct Cli {
    /// Config file (YAML or JSON) with the fields below; flags override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: ConfigFile,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub kms_socket: Option<PathBuf>,
    pub backend: Backend,
    pub daemon: DaemonSettings,
}

/// The checked master-secret backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    ClusterManaged,
    Kmip {
        cluster_name: String,
        host: String,
        port: u16,
        kek_id: Option<String>,
    },
}

impl Cli {
    /// The config file with the flags over it, checked.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: ConfigFile = load_file(self.config.as_deref())?;
        file.overlay(self.overrides).resolve()
    }
}

impl ConfigFile {
    pub fn overlay(self, flags: Self) -> Self {
        let daemon = self.daemon.clone().overlay(flags.daemon.clone());
        let mut merged = constellation_daemon::overlay!(self, flags; listen, state_dir, kms_socket,
            backend, cluster_name, kmip_endpoint, kmip_kek_id);
        merged.daemon = daemon;
        merged
    }

    pub fn resolve(self) -> Result<Config, ConfigError> {
        let state_dir = existing_dir(
            "state_dir",
            required(self.state_dir, "state_dir", "state-dir")?,
        )?;
        if let Some(socket) = &self.kms_socket {
            if !socket.is_absolute() {
                return Err(invalid(
                    "kms_socket",
                    socket.display(),
                    "must be an absolute path",
                ));
            }
        }
        let backend = match self.backend.unwrap_or_default() {
            BackendKind::ClusterManaged => Backend::ClusterManaged,
            BackendKind::Kmip => {
                let endpoint = required(self.kmip_endpoint, "kmip_endpoint", "kmip-endpoint")?;
                let (host, port) = split_endpoint(&endpoint)
                    .ok_or_else(|| invalid("kmip_endpoint", &endpoint, "must be host:port"))?;
                let cluster_name = required(self.cluster_name, "cluster_name", "cluster-name")?;
                if cluster_name.trim().is_empty() {
                    return Err(invalid("cluster_name", &cluster_name, "must not be empty"));
                }
                Backend::Kmip {
                    cluster_name,
                    host,
                    port,
                    kek_id: self.kmip_kek_id.filter(|id| !id.is_empty()),
                }
            }
        };
        Ok(Config {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ports::KEY_SERVICE))),
            state_dir,
            kms_socket: self.kms_socket,
            backend,
            daemon: self
                .daemon
                .resolve(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT)))?,
        })
    }

    /// A complete example (the documented one).
    pub fn example() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], ports::KEY_SERVICE))),
            state_dir: Some("/var/run/constellation/state".into()),
            kms_socket: Some("/var/run/kmsplugin/socket.sock".into()),
            backend: Some(BackendKind::ClusterManaged),
            cluster_name: None,
            kmip_endpoint: None,
            kmip_kek_id: None,
            daemon: DaemonSettingsFile {
                health_listen: Some(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT))),
                log_format: Some(constellation_daemon::logging::LogFormat::Json),
                shutdown_grace_secs: Some(10),
                reload_interval_ms: Some(1000),
            },
        }
    }
}

/// What the key service needs before it may serve.
pub struct Material {
    pub master: MasterSecret,
    pub tls: Arc<rustls::ServerConfig>,
}

/// `host:port` split, the port non-zero.
fn split_endpoint(endpoint: &str) -> Option<(String, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_owned(), port))
}

/// PEM certificates; the error says what is wrong, never the content.
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1); the parse error is not shown (it might quote the
/// key).
pub fn parse_pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| "not a PEM private key".to_owned())
}

/// KMIP client settings from PEM material: the server's CA, this client's chain and key. An
/// unset `kek` means the KEK the wrapped master secret names (or, at Init, a new one named
/// after the cluster).
pub fn kmip_settings(
    host: String,
    port: u16,
    ca_pem: &[u8],
    client_cert_pem: &[u8],
    client_key_pem: &[u8],
    kek: KekSource,
) -> Result<KmipSettings, String> {
    Ok(KmipSettings {
        host,
        port,
        ca_certificates: parse_pem_certs(ca_pem).map_err(|e| format!("KMIP CA: {e}"))?,
        client_cert_chain: parse_pem_certs(client_cert_pem)
            .map_err(|e| format!("KMIP client certificate: {e}"))?,
        client_key: parse_pem_key(client_key_pem).map_err(|e| format!("KMIP client key: {e}"))?,
        kek,
        retry: RetryPolicy::default(),
        io_timeout: std::time::Duration::from_secs(10),
    })
}

/// The KEK a node created at Init is named after its cluster.
pub fn created_kek_name(cluster_name: &str) -> String {
    format!("constellation-{cluster_name}-kek")
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_pem_certs(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// The master-secret backend `backend` names, reading its files under `state_dir`.
fn open_backend(
    state_dir: &Path,
    backend: &Backend,
) -> Result<Box<dyn MasterSecretBackend>, String> {
    let master_dir = state_dir.join(MASTER_SECRET_DIR);
    match backend {
        Backend::ClusterManaged => {
            secrets::check_private(&master_dir.join(CLUSTER_SECRET_FILE))
                .map_err(|e| e.to_string())?;
            Ok(Box::new(ClusterManagedBackend::new(&master_dir)))
        }
        Backend::Kmip {
            cluster_name,
            host,
            port,
            kek_id,
        } => {
            secrets::check_private(&master_dir.join(WRAPPED_SECRET_FILE))
                .map_err(|e| e.to_string())?;
            let ca = std::fs::read(state_dir.join(KMIP_DIR).join("ca.crt"))
                .map_err(|e| format!("{KMIP_DIR}/ca.crt: {e}"))?;
            let cert = std::fs::read(state_dir.join(KMIP_DIR).join("client.crt"))
                .map_err(|e| format!("{KMIP_DIR}/client.crt: {e}"))?;
            let key = secrets::read(state_dir, &format!("{KMIP_DIR}/client.key"))
                .map_err(|e| e.to_string())?;
            let kek = match kek_id {
                Some(id) => KekSource::Existing { id: id.clone() },
                None => KekSource::Create {
                    name: created_kek_name(cluster_name),
                },
            };
            let settings = kmip_settings(host.clone(), *port, &ca, &cert, key.expose(), kek)?;
            Ok(Box::new(
                KmipBackend::new(settings, &master_dir, cluster_name.clone())
                    .map_err(|e| e.to_string())?,
            ))
        }
    }
}

/// Loads the master secret (through the configured backend) and the mutual-TLS server config
/// from `state_dir`; the error names the file and the reason, never a secret.
pub async fn load_material(state_dir: &Path, backend: &Backend) -> Result<Material, String> {
    let tls_dir = state_dir.join(TLS_DIR);
    let ca = pem_certs(&tls_dir.join("ca.crt"))?;
    let chain = pem_certs(&tls_dir.join("tls.crt"))?;
    let key_file = format!("{TLS_DIR}/tls.key");
    let key_pem = secrets::read(state_dir, &key_file).map_err(|e| e.to_string())?;
    let key = parse_pem_key(key_pem.expose())
        .map_err(|e| format!("{}: {e}", state_dir.join(&key_file).display()))?;
    let tls = crate::tls::mutual_tls_server_config(&ca, chain, key).map_err(|e| e.to_string())?;
    let backend = open_backend(state_dir, backend)?;
    let master = backend.load().await.map_err(|e| e.to_string())?;
    tracing::info!(backend = %backend.describe(), "master secret loaded");
    Ok(Material { master, tls })
}
