//! The configuration of `constellation-keyservice` (a YAML/JSON file whose every field is also a
//! flag; flags win) and the layout of its state folder. Secrets come only from that folder:
//!
//! - `keyservice/cluster-master-secret.json`: the master secret and salt (the cluster-managed
//!   backend's file, as the bootstrapper writes it at Init).
//! - `keyservice-tls/ca.crt`: the key-service CA (PEM); clients need a certificate from it.
//! - `keyservice-tls/tls.crt`, `keyservice-tls/tls.key`: this server's certificate chain and key.
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
use crate::master::{MasterSecret, MasterSecretBackend};

/// Directory of the master secret under the state folder.
pub const MASTER_SECRET_DIR: &str = "keyservice";
/// Directory of the TLS files under the state folder.
pub const TLS_DIR: &str = "keyservice-tls";
/// Default port of the health server.
pub const HEALTH_PORT: u16 = 9002;

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
    pub daemon: DaemonSettings,
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
        let mut merged = constellation_daemon::overlay!(self, flags; listen, state_dir, kms_socket);
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
        Ok(Config {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ports::KEY_SERVICE))),
            state_dir,
            kms_socket: self.kms_socket,
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

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// Loads the master secret and the mutual-TLS server config from `state_dir`; the error names
/// the file and the reason, never a secret.
pub async fn load_material(state_dir: &Path) -> Result<Material, String> {
    let tls_dir = state_dir.join(TLS_DIR);
    let ca = pem_certs(&tls_dir.join("ca.crt"))?;
    let chain = pem_certs(&tls_dir.join("tls.crt"))?;
    let key_file = format!("{TLS_DIR}/tls.key");
    let key_pem = secrets::read(state_dir, &key_file).map_err(|e| e.to_string())?;
    // The parse error is not shown: it might quote the key.
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose()).map_err(|_| {
        format!(
            "{}: not a PEM private key",
            state_dir.join(&key_file).display()
        )
    })?;
    let tls = crate::tls::mutual_tls_server_config(&ca, chain, key).map_err(|e| e.to_string())?;
    let master_dir = state_dir.join(MASTER_SECRET_DIR);
    secrets::check_private(&master_dir.join(CLUSTER_SECRET_FILE)).map_err(|e| e.to_string())?;
    let backend = ClusterManagedBackend::new(&master_dir);
    let master = backend.load().await.map_err(|e| e.to_string())?;
    tracing::info!(backend = %backend.describe(), "master secret loaded");
    Ok(Material { master, tls })
}
