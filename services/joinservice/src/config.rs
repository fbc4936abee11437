//! The configuration of `constellation-joinservice` (a YAML/JSON file whose every field is also a
//! flag; flags win), the layout of its state folder, and its policy: the accepted measurements
//! and the node directory, read from one of two places ([`SharedState`]):
//!
//! - etcd (`etcd_endpoints`): the control planes' replicated store, which the bootstrappers keep
//!   current from the platform's metadata; the daemon follows it with a watch (no restart), and
//!   the disk bindings are claimed there too (one compare-and-set transaction, shared by every
//!   control plane).
//! - files (`measurements_file`, `nodes_file`, `disk_bindings_dir`): each policy part in its own
//!   hot-reloaded file (a ConfigMap in Kubernetes), the disk bindings in a shared folder.
//!
//! State folder (secrets only here, never in flags or the environment; world-readable refused):
//! - `pki/`: the cluster PKI as the bootstrapper writes it (`ClusterPki::write_to_dir`).
//! - `joinservice/measurement-salt`, `joinservice/measurement-secret`: raw bytes.
//! - with etcd: `joinservice/etcd/ca.crt`, `joinservice/etcd/client.crt` and
//!   `joinservice/etcd/client.key` (PEM; a client certificate from the cluster PKI's etcd CA).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use constellation_attestation::measurements::{AcceptedMeasurements, Digest};
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::{
    validator_for, ValidationError, Validator, ValidatorPolicy, Variant, Verdict,
};
use constellation_common::metadata::{ports, NodeInfo};
use constellation_common::secret::SecretBytes;
use constellation_daemon::config::{existing_dir, invalid, load_file, required, ConfigError};
use constellation_daemon::secrets;
use constellation_daemon::settings::{DaemonSettings, DaemonSettingsFile};
use serde::{Deserialize, Serialize};

use crate::pki::{ClusterPki, NodeIdentity};
use crate::ticket::NodeDirectory;

/// Default port of the health server.
pub const HEALTH_PORT: u16 = 30091;
/// Default TPM: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Default lifetime of bootstrap tokens (24 h, as the bootstrapper).
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// PKI directory under the state folder.
pub const PKI_DIR: &str = "pki";
/// Measurement salt and secret under the state folder.
pub const MEASUREMENT_SALT: &str = "joinservice/measurement-salt";
pub const MEASUREMENT_SECRET: &str = "joinservice/measurement-secret";
/// The etcd client's TLS files under the state folder (PEM): the etcd CA, the client
/// certificate and its key (0600).
pub const ETCD_CA: &str = "joinservice/etcd/ca.crt";
pub const ETCD_CLIENT_CERT: &str = "joinservice/etcd/client.crt";
pub const ETCD_CLIENT_KEY: &str = "joinservice/etcd/client.key";

/// The config file's fields (all optional here; see [`Config`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address of the join service (gRPC IssueJoinTicket over mutual aTLS). Default 0.0.0.0:30090.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// State folder with the cluster PKI and the measurement salt and secret (required).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Name of the cluster (required; must match the PKI).
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// This node's name: the subject of the key-service client certificate (required).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// This node's IP: in the key-service client certificate (required).
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// Key services to fetch data keys from, tried in order (required, comma-separated for the flag).
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',')]
    pub key_service_endpoints: Option<Vec<SocketAddr>>,
    /// Kubernetes API server host:port handed to joining nodes (required).
    #[arg(long, value_name = "HOST:PORT")]
    pub api_server_endpoint: Option<String>,
    /// Kubernetes version handed to joining nodes (required, e.g. v1.31.1).
    #[arg(long, value_name = "VERSION")]
    pub kubernetes_version: Option<String>,
    /// Lifetime of issued bootstrap tokens in seconds (60..=604800). Default 86400.
    #[arg(long, value_name = "SECONDS")]
    pub token_ttl_secs: Option<u64>,
    /// TPM for this service's own attestation (TCTI string). Default device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// The control planes' etcd members (https://host:port client URLs, comma-separated for the flag). When set, the accepted measurements, the node directory and the disk bindings live in etcd (watched, no restart; TLS files under the state folder) and the three file fields below are not used.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Without etcd: accepted measurements of joining nodes (measurements JSON: one set, or a list during a rolling upgrade; hot-reloaded) (required).
    #[arg(long, value_name = "FILE")]
    pub measurements_file: Option<PathBuf>,
    /// Without etcd: node directory, a YAML/JSON list of {name, role, ip, ak_spki_hex}; only these nodes may join (hot-reloaded) (required).
    #[arg(long, value_name = "FILE")]
    pub nodes_file: Option<PathBuf>,
    /// Without etcd: directory of the disk bindings (which node owns which state disk), shared by every join service of the cluster (required).
    #[arg(long, value_name = "DIR")]
    pub disk_bindings_dir: Option<PathBuf>,
    #[command(flatten)]
    #[serde(default)]
    pub daemon: DaemonSettingsFile,
}

/// `constellation-joinservice --help`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "constellation-joinservice",
    version,
    about = "Constellation join service: admits attested nodes (mutual aTLS) and issues their join tickets",
    long_about = None,
    after_help = "Secrets (cluster PKI, measurement salt and secret, etcd client key) are read only from files under --state-dir.\nShared state, one of two: with --etcd-endpoints the policy (accepted measurements, node directory) and the disk bindings are in the control planes' etcd (mutual TLS with joinservice/etcd/{ca.crt,client.crt,client.key} under --state-dir), the policy followed by a watch; without it, --measurements-file and --nodes-file are re-read when they change (checked every --reload-interval-ms) or on SIGHUP (a bad version is refused and the previous one kept) and disk bindings are files in --disk-bindings-dir.\nHealth: GET /healthz (alive) and /readyz (PKI, secrets, TPM and policy loaded (with etcd: the store answered), service listening) on --health-listen.\nSignals: SIGTERM/SIGINT drain in-flight requests for --shutdown-grace-secs, then exit 0."
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
    pub cluster_name: String,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub key_service_endpoints: Vec<SocketAddr>,
    pub api_server_endpoint: String,
    pub kubernetes_version: String,
    pub token_ttl: std::time::Duration,
    pub tcti: String,
    pub shared: SharedState,
    pub daemon: DaemonSettings,
}

/// Where the policy and the disk bindings live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedState {
    /// The control planes' etcd cluster (`https://` client URLs).
    Etcd { endpoints: Vec<String> },
    /// Hot-reloaded policy files and a shared disk-bindings folder.
    Files {
        measurements_file: PathBuf,
        nodes_file: PathBuf,
        disk_bindings_dir: PathBuf,
    },
}

impl Cli {
    /// The config file with the flags over it, checked.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: ConfigFile = load_file(self.config.as_deref())?;
        file.overlay(self.overrides).resolve()
    }
}

fn non_empty(
    value: Option<String>,
    field: &'static str,
    flag: &'static str,
) -> Result<String, ConfigError> {
    let value = required(value, field, flag)?;
    if value.trim().is_empty() {
        return Err(invalid(field, &value, "must not be empty"));
    }
    Ok(value)
}

impl ConfigFile {
    pub fn overlay(self, flags: Self) -> Self {
        let daemon = self.daemon.clone().overlay(flags.daemon.clone());
        let mut merged = constellation_daemon::overlay!(self, flags; listen, state_dir,
            cluster_name, node_name, node_ip, key_service_endpoints, api_server_endpoint,
            kubernetes_version, token_ttl_secs, tcti, etcd_endpoints, measurements_file, nodes_file,
            disk_bindings_dir);
        merged.daemon = daemon;
        merged
    }

    pub fn resolve(self) -> Result<Config, ConfigError> {
        let state_dir = existing_dir(
            "state_dir",
            required(self.state_dir, "state_dir", "state-dir")?,
        )?;
        let api_server_endpoint = non_empty(
            self.api_server_endpoint,
            "api_server_endpoint",
            "api-server-endpoint",
        )?;
        let port_ok = api_server_endpoint
            .rsplit_once(':')
            .is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !port_ok {
            return Err(invalid(
                "api_server_endpoint",
                &api_server_endpoint,
                "must be host:port",
            ));
        }
        let key_service_endpoints = required(
            self.key_service_endpoints,
            "key_service_endpoints",
            "key-service-endpoints",
        )?;
        if key_service_endpoints.is_empty() {
            return Err(invalid(
                "key_service_endpoints",
                "[]",
                "name at least one key service",
            ));
        }
        let token_ttl_secs = self.token_ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
        if !(60..=7 * 24 * 3600).contains(&token_ttl_secs) {
            return Err(invalid(
                "token_ttl_secs",
                token_ttl_secs,
                "must be within 60..=604800",
            ));
        }
        let tcti = self.tcti.unwrap_or_else(|| DEFAULT_TCTI.to_owned());
        if tcti.trim().is_empty() {
            return Err(invalid("tcti", &tcti, "must name a TPM"));
        }
        let shared = match self.etcd_endpoints {
            Some(endpoints) => {
                check_etcd_endpoints(&endpoints)?;
                for (field, set) in [
                    ("measurements_file", self.measurements_file.is_some()),
                    ("nodes_file", self.nodes_file.is_some()),
                    ("disk_bindings_dir", self.disk_bindings_dir.is_some()),
                ] {
                    if set {
                        return Err(invalid(
                            field,
                            "set",
                            "not used with etcd_endpoints (the policy and the disk bindings are in etcd); set one of the two",
                        ));
                    }
                }
                SharedState::Etcd { endpoints }
            }
            None => SharedState::Files {
                measurements_file: required(
                    self.measurements_file,
                    "measurements_file",
                    "measurements-file",
                )?,
                nodes_file: required(self.nodes_file, "nodes_file", "nodes-file")?,
                disk_bindings_dir: required(
                    self.disk_bindings_dir,
                    "disk_bindings_dir",
                    "disk-bindings-dir",
                )?,
            },
        };
        Ok(Config {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ports::JOIN))),
            state_dir,
            cluster_name: non_empty(self.cluster_name, "cluster_name", "cluster-name")?,
            node_name: non_empty(self.node_name, "node_name", "node-name")?,
            node_ip: required(self.node_ip, "node_ip", "node-ip")?,
            key_service_endpoints,
            api_server_endpoint,
            kubernetes_version: non_empty(
                self.kubernetes_version,
                "kubernetes_version",
                "kubernetes-version",
            )?,
            token_ttl: std::time::Duration::from_secs(token_ttl_secs),
            tcti,
            shared,
            daemon: self
                .daemon
                .resolve(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT)))?,
        })
    }

    /// A complete example (the documented one).
    pub fn example() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], ports::JOIN))),
            state_dir: Some("/var/run/constellation/state".into()),
            cluster_name: Some("my-cluster".into()),
            node_name: Some("control-plane-0".into()),
            node_ip: Some(IpAddr::from([10, 0, 0, 2])),
            key_service_endpoints: Some(vec![SocketAddr::from((
                [10, 0, 0, 2],
                ports::KEY_SERVICE,
            ))]),
            api_server_endpoint: Some("10.0.0.100:6443".into()),
            kubernetes_version: Some("v1.31.1".into()),
            token_ttl_secs: Some(DEFAULT_TOKEN_TTL_SECS),
            tcti: Some(DEFAULT_TCTI.into()),
            etcd_endpoints: None,
            measurements_file: Some("/etc/constellation/policy/measurements.json".into()),
            nodes_file: Some("/etc/constellation/policy/nodes.yaml".into()),
            disk_bindings_dir: Some("/var/lib/constellation/disk-bindings".into()),
            daemon: DaemonSettingsFile {
                health_listen: Some(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT))),
                log_format: Some(constellation_daemon::logging::LogFormat::Json),
                shutdown_grace_secs: Some(10),
                reload_interval_ms: Some(1000),
            },
        }
    }
}

/// Every etcd endpoint is an `https://host:port` URL (the members serve clients on mutual TLS
/// only), and there is at least one.
fn check_etcd_endpoints(endpoints: &[String]) -> Result<(), ConfigError> {
    if endpoints.is_empty() {
        return Err(invalid(
            "etcd_endpoints",
            "[]",
            "name at least one etcd member",
        ));
    }
    for url in endpoints {
        let ok = url.strip_prefix("https://").is_some_and(|rest| {
            rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        });
        if !ok {
            return Err(invalid(
                "etcd_endpoints",
                url,
                "must be https://host:port (etcd's client URL; TLS only)",
            ));
        }
    }
    Ok(())
}

/// The etcd client credentials from the state folder ([`ETCD_CA`], [`ETCD_CLIENT_CERT`],
/// [`ETCD_CLIENT_KEY`]; the key refused world-readable). Errors name the file, never content.
pub fn load_etcd_credentials(
    state_dir: &Path,
) -> Result<constellation_store::EtcdCredentials, String> {
    let read = |name| secrets::read(state_dir, name).map_err(|e| e.to_string());
    let text = |name| {
        read(name).and_then(|bytes| {
            String::from_utf8(bytes.expose().to_vec())
                .map_err(|_| format!("{}: not PEM text", state_dir.join(name).display()))
        })
    };
    Ok(constellation_store::EtcdCredentials {
        ca_cert_pem: text(ETCD_CA)?,
        cert_pem: text(ETCD_CLIENT_CERT)?,
        key_pem: read(ETCD_CLIENT_KEY)?,
    })
}

/// The secret material from the state folder.
pub struct StateMaterial {
    pub pki: ClusterPki,
    pub measurement_salt: SecretBytes,
    pub measurement_secret: SecretBytes,
}

/// Loads the PKI and the measurement salt and secret; errors name the file, never content.
pub fn load_state(state_dir: &Path, cluster_name: &str) -> Result<StateMaterial, String> {
    let pki_dir = state_dir.join(PKI_DIR);
    // The CA keys are secrets too: refuse them world-readable like the other files.
    for key in [
        "ca.key",
        "sa.key",
        "front-proxy-ca.key",
        "etcd/ca.key",
        "constellation/key-service-ca.key",
    ] {
        secrets::check_private(&pki_dir.join(key)).map_err(|e| e.to_string())?;
    }
    let pki = ClusterPki::load_from_dir(&pki_dir, cluster_name).map_err(|e| e.to_string())?;
    let read = |name| secrets::read(state_dir, name).map_err(|e| e.to_string());
    Ok(StateMaterial {
        pki,
        measurement_salt: read(MEASUREMENT_SALT)?,
        measurement_secret: read(MEASUREMENT_SECRET)?,
    })
}

/// One version of the policy files.
#[derive(Clone)]
pub struct Policy {
    /// One set, or during a rolling image upgrade the old and the new image's.
    pub measurements: AcceptedMeasurements,
    pub nodes: Vec<NodeInfo>,
    pinned: Vec<(AkPublicKey, String)>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Policy {
    /// Reads both files; any bad entry refuses the whole version (naming file and entry).
    pub fn load(measurements_file: &Path, nodes_file: &Path) -> Result<Self, String> {
        let text = std::fs::read(measurements_file)
            .map_err(|e| format!("{}: {e}", measurements_file.display()))?;
        let measurements = AcceptedMeasurements::from_json(&text)
            .map_err(|e| format!("{}: {e}", measurements_file.display()))?;
        let text = std::fs::read_to_string(nodes_file)
            .map_err(|e| format!("{}: {e}", nodes_file.display()))?;
        let nodes: Vec<NodeInfo> =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", nodes_file.display()))?;
        Self::new(measurements, nodes).map_err(|e| format!("{}: {e}", nodes_file.display()))
    }

    /// The policy of the etcd store's join state (the watched [`constellation_store::JoinStateCache`]
    /// view): refused while no valid measurements are stored, so nothing is admitted then.
    pub fn from_store(state: &constellation_store::watch::JoinState) -> Result<Self, String> {
        let measurements = state.measurements.clone().ok_or_else(|| {
            format!(
                "etcd {}: no valid accepted measurements stored",
                constellation_store::keys::MEASUREMENTS
            )
        })?;
        let mut nodes: Vec<NodeInfo> = state.nodes.values().cloned().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Self::new(measurements, nodes)
            .map_err(|e| format!("etcd {}: {e}", constellation_store::keys::NODES_PREFIX))
    }

    /// A policy of `measurements` and `nodes`; a node whose pinned key does not parse refuses
    /// the whole version (naming the node).
    pub fn new(measurements: AcceptedMeasurements, nodes: Vec<NodeInfo>) -> Result<Self, String> {
        let pinned = nodes
            .iter()
            .map(|n| {
                hex::decode(&n.ak_spki_hex)
                    .map_err(|e| e.to_string())
                    .and_then(|der| AkPublicKey::from_spki_der(&der).map_err(|e| e.to_string()))
                    .map(|ak| (ak, n.name.clone()))
                    .map_err(|e| format!("node {:?}: ak_spki_hex: {e}", n.name))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            measurements,
            nodes,
            pinned,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} PCRs, {} nodes",
            self.measurements.target().0.len(),
            self.nodes.len()
        )
    }
}

/// The current policy, swapped whole on reload: the validator of joiners, the node directory
/// and the AK-to-node lookup all read the same version.
#[derive(Debug)]
pub struct PolicyStore(RwLock<Arc<Policy>>);

impl PolicyStore {
    pub fn new(policy: Policy) -> Self {
        Self(RwLock::new(Arc::new(policy)))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The node whose pinned AK has this fingerprint.
    pub fn node_for(&self, fingerprint: &Digest) -> Option<String> {
        self.current()
            .pinned
            .iter()
            .find(|(ak, _)| &ak.fingerprint() == fingerprint)
            .map(|(_, name)| name.clone())
    }
}

impl NodeDirectory for PolicyStore {
    fn node(&self, name: &str) -> Option<NodeIdentity> {
        let policy = self.current();
        let n = policy.nodes.iter().find(|n| n.name == name)?;
        Some(NodeIdentity {
            name: n.name.clone(),
            role: n.role,
            ips: vec![n.ip],
            dns_names: vec![n.name.clone()],
        })
    }
}

/// Joiners: evidence of the platform's attestation variant by a pinned AK of the node
/// directory whose PCRs meet an accepted measurement set. The variant is the one this daemon
/// detected for its own platform ([`constellation_daemon::tpm::detect_variant`]): a cluster's
/// nodes run on one platform, so no configuration names it.
#[derive(Debug, Clone)]
pub struct PolicyValidator {
    pub store: Arc<PolicyStore>,
    pub variant: Variant,
}

impl Validator for PolicyValidator {
    fn variant(&self) -> Variant {
        self.variant
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        let policy = self.store.current();
        let pinned: Vec<AkPublicKey> = policy.pinned.iter().map(|(ak, _)| ak.clone()).collect();
        policy.measurements.first_accepting(|m| {
            validator_for(
                self.variant,
                ValidatorPolicy::pinned(pinned.clone(), m.clone()),
            )
            .map_err(|e| ValidationError::Malformed(format!("{}: {e}", self.variant)))?
            .validate(evidence, binding)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_state_dir(dir: &Path) -> ConfigFile {
        ConfigFile {
            state_dir: Some(dir.to_owned()),
            ..ConfigFile::example()
        }
    }

    #[test]
    fn etcd_endpoints_replace_the_files_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = with_state_dir(dir.path()).resolve().unwrap();
        assert!(matches!(files.shared, SharedState::Files { .. }));

        let etcd = ConfigFile {
            etcd_endpoints: Some(vec!["https://10.0.0.2:2379".into()]),
            measurements_file: None,
            nodes_file: None,
            disk_bindings_dir: None,
            ..with_state_dir(dir.path())
        };
        assert_eq!(
            etcd.clone().resolve().unwrap().shared,
            SharedState::Etcd {
                endpoints: vec!["https://10.0.0.2:2379".into()]
            }
        );
        for (bad, field) in [
            (vec![], "etcd_endpoints"),
            (vec!["http://10.0.0.2:2379".to_owned()], "etcd_endpoints"),
            (vec!["https://10.0.0.2".to_owned()], "etcd_endpoints"),
        ] {
            let e = ConfigFile {
                etcd_endpoints: Some(bad),
                ..etcd.clone()
            }
            .resolve()
            .unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
        }
        // Both ways at once is refused, naming the file field.
        let e = ConfigFile {
            nodes_file: Some("/etc/nodes.yaml".into()),
            ..etcd
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.field(), Some("nodes_file"), "{e}");
        // Without etcd the files are required.
        let e = ConfigFile {
            disk_bindings_dir: None,
            ..with_state_dir(dir.path())
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.field(), Some("disk_bindings_dir"), "{e}");
    }
}
