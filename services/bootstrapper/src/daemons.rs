//! The control plane's service daemons as the bootstrapper runs them: `constellation-verify`,
//! `constellation-keyservice` and `constellation-joinservice`, each started by the
//! [`Supervisor`] with its own typed configuration (the daemon's `ConfigFile`, serialized) and
//! its secret files in the node's state folder, the same binaries the Helm chart deploys.
//!
//! - The verification daemon starts with the node (it answers before Init: the platform takes
//!   it as "the node is up"). Workers keep the verification service inside the bootstrapper:
//!   the daemons are control-plane services (the Helm chart's DaemonSets run on control planes
//!   too), and a worker's TPM then has one client.
//! - The key service starts after Init or Recover (the node holds the master secret); its TLS
//!   files are issued from the cluster's key-service CA.
//! - The join service starts after Init, Recover or a control-plane join. It reads its policy
//!   (the accepted measurements and the node directory) and claims disk bindings in the
//!   control planes' etcd ([`crate::etcd`] publishes the metadata there and the
//!   daemon follows it with a watch); its etcd client certificate (etcd CA) is written into the
//!   state folder.
//!
//! The binaries are found in the bootstrapper's daemon directory (next to its executable by
//! default, `--daemon-dir` otherwise).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use constellation_attestation::Clock;
use constellation_common::metadata::ports;
use constellation_common::node_status::{DaemonHealth, NodePhase, NodeStatus};
use constellation_common::secret::SecretBytes;
use constellation_daemon::logging::LogFormat;
use constellation_daemon::settings::DaemonSettingsFile;
use constellation_joinservice::pki::{ClusterPki, PkiError, ServiceCredentials};
use constellation_keyservice::config::BackendKind;
use constellation_keyservice::kmip::StoredKmipSettings;

use crate::supervisor::{Backoff, DaemonFile, DaemonSpec, Probe, Supervisor, SupervisorError};

/// The KMS v2 plugin's socket file (as short as the TPM multiplexer's `mux.sock`).
const KMS_SOCKET: &str = "kms.sock";

/// Daemon names (status, logs) and their binaries `constellation-<name>`.
pub const VERIFY: &str = "verify";
pub const KEY_SERVICE: &str = constellation_common::node_status::KEY_SERVICE_DAEMON;
pub const JOIN_SERVICE: &str = constellation_common::node_status::JOIN_SERVICE_DAEMON;

/// How often the supervisor probes readiness.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The supervised daemons drain for at most this long on SIGTERM.
const SHUTDOWN_GRACE_SECS: u64 = 2;
/// How often the daemons check their reloadable files.
const RELOAD_INTERVAL_MS: u64 = 100;

/// Why a daemon's configuration could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DaemonsError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("service certificates: {0}")]
    Pki(#[from] PkiError),
    #[error("metadata: {0}")]
    Metadata(#[from] constellation_common::metadata::MetadataError),
}

/// The node's status file: the phase the bootstrapper reached, its daemons' health and the etcd
/// members it sees, written together whenever one changes.
pub struct StatusBoard {
    state_dir: PathBuf,
    current: Mutex<NodeStatus>,
}

impl StatusBoard {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            current: Mutex::new(NodeStatus::now(NodePhase::Started)),
        }
    }

    pub fn set_phase(&self, phase: NodePhase) {
        self.update(|status| status.phase = phase);
    }

    pub fn set_daemons(&self, daemons: Vec<DaemonHealth>) {
        self.update(|status| status.daemons = daemons);
    }

    /// The etcd members this control plane's reconciliation saw (written only when they change).
    pub fn set_etcd_members(&self, members: Vec<String>) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.etcd_members != members {
            current.etcd_members = members;
            self.write(&current);
        }
    }

    fn update(&self, change: impl FnOnce(&mut NodeStatus)) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut current);
        self.write(&current);
    }

    fn write(&self, current: &NodeStatus) {
        let status = NodeStatus::now(current.phase.clone())
            .with_daemons(current.daemons.clone())
            .with_etcd_members(current.etcd_members.clone());
        if let Err(e) = status.write(&self.state_dir) {
            tracing::warn!("cannot write the node status: {e}");
        }
    }
}

/// What the join service daemon needs besides the node's own facts.
pub struct JoinServiceInputs {
    pub cluster_name: String,
    pub api_server_endpoint: String,
    pub kubernetes_version: String,
    pub key_service_endpoints: Vec<SocketAddr>,
    pub measurement_salt: SecretBytes,
    pub measurement_secret: SecretBytes,
    pub token_ttl: Duration,
    pub shared: JoinServiceShared,
}

/// Where the join service daemon finds its policy and the disk bindings: the control planes'
/// etcd members, with this client's credentials (etcd CA).
pub struct JoinServiceShared {
    pub endpoints: Vec<String>,
    pub credentials: constellation_store::EtcdCredentials,
}

/// The node's supervised daemons.
pub struct NodeDaemons {
    supervisor: Supervisor,
    binaries: PathBuf,
    /// `<node>/daemons`: configuration, policy and logs.
    dir: PathBuf,
    /// Where the daemons' unix sockets go: beside the TPM's socket on the local platform (a
    /// private folder the launcher chose short enough for a unix socket path, at most 107
    /// bytes, however deep the node folder is), else the daemons folder.
    socket_dir: PathBuf,
    state_dir: PathBuf,
    tcti: String,
    ip: IpAddr,
}

impl NodeDaemons {
    /// Daemons of the node at `ip` whose binaries are in `binaries`, their TPM at `tcti`.
    pub fn new(
        node_dir: &Path,
        state_dir: &Path,
        binaries: PathBuf,
        tcti: String,
        ip: IpAddr,
        status: Arc<StatusBoard>,
    ) -> Self {
        let dir = node_dir.join("daemons");
        let supervisor = Supervisor::new(
            dir.join("run"),
            Backoff::default(),
            PROBE_INTERVAL,
            move |health| status.set_daemons(health),
        );
        let socket_dir = crate::tpm_mux::swtpm_socket(&tcti)
            .and_then(|socket| socket.parent().map(Path::to_owned))
            .unwrap_or_else(|| dir.clone());
        Self {
            supervisor,
            binaries,
            dir,
            socket_dir,
            state_dir: state_dir.to_owned(),
            tcti,
            ip,
        }
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The binary of daemon `name`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.binaries.join(format!("constellation-{name}"))
    }

    fn settings(&self, health_port: u16) -> DaemonSettingsFile {
        DaemonSettingsFile {
            health_listen: Some(SocketAddr::new(self.ip, health_port)),
            log_format: Some(LogFormat::Text),
            shutdown_grace_secs: Some(SHUTDOWN_GRACE_SECS),
            reload_interval_ms: Some(RELOAD_INTERVAL_MS),
        }
    }

    fn start(
        &self,
        name: &str,
        health_port: u16,
        config: &impl serde::Serialize,
        mut files: Vec<DaemonFile>,
    ) -> Result<(), DaemonsError> {
        let config_path = self.dir.join(format!("{name}.yaml"));
        files.insert(0, DaemonFile::yaml(name, &config_path, config)?);
        self.supervisor.start(DaemonSpec {
            name: name.to_owned(),
            program: self.program(name),
            args: vec!["--config".into(), config_path.into_os_string()],
            files,
            probe: Probe::readyz(SocketAddr::new(self.ip, health_port)),
            log: self.dir.join(format!("{name}.log")),
        })?;
        Ok(())
    }

    /// The verification daemon on this node's address.
    pub fn start_verify(&self) -> Result<(), DaemonsError> {
        use constellation_verify::config::{ConfigFile, HEALTH_PORT};
        let config = ConfigFile {
            listen: Some(SocketAddr::new(self.ip, ports::VERIFY)),
            tcti: Some(self.tcti.clone()),
            daemon: self.settings(HEALTH_PORT),
        };
        self.start(VERIFY, HEALTH_PORT, &config, Vec::new())
    }

    /// The key service daemon: TLS files from the key-service CA; the master secret is already
    /// in the state folder (cluster-managed) or wrapped by the KMIP server's KEK (`kmip`, whose
    /// client files are written here).
    pub fn start_key_service(
        &self,
        pki: &ClusterPki,
        clock: &dyn Clock,
        cluster_name: &str,
        kmip: Option<&StoredKmipSettings>,
    ) -> Result<(), DaemonsError> {
        use constellation_keyservice::config::{ConfigFile, HEALTH_PORT, KMIP_DIR, TLS_DIR};
        let tls = self.state_dir.join(TLS_DIR);
        let server = pki.key_service_server_cert(self.ip, clock)?;
        let mut files = vec![
            DaemonFile::bytes(
                tls.join("ca.crt"),
                pem("CERTIFICATE", pki.key_service_ca_der()),
            ),
            DaemonFile::bytes(tls.join("tls.crt"), chain_pem(&server)),
            DaemonFile::bytes(
                tls.join("tls.key"),
                pem("PRIVATE KEY", server.key_pkcs8_der.expose()),
            ),
        ];
        let mut config = ConfigFile {
            listen: Some(SocketAddr::new(self.ip, ports::KEY_SERVICE)),
            state_dir: Some(self.state_dir.clone()),
            kms_socket: Some(self.kms_socket()),
            backend: Some(BackendKind::ClusterManaged),
            cluster_name: Some(cluster_name.to_owned()),
            kmip_endpoint: None,
            kmip_kek_id: None,
            daemon: self.settings(HEALTH_PORT),
        };
        if let Some(kmip) = kmip {
            let dir = self.state_dir.join(KMIP_DIR);
            files.push(DaemonFile::bytes(
                dir.join("ca.crt"),
                kmip.server_ca_pem.clone(),
            ));
            files.push(DaemonFile::bytes(
                dir.join("client.crt"),
                kmip.client_cert_pem.clone(),
            ));
            files.push(DaemonFile::bytes(
                dir.join("client.key"),
                kmip.client_key_pem.expose().to_vec(),
            ));
            config.backend = Some(BackendKind::Kmip);
            config.kmip_endpoint = Some(kmip.endpoint.clone());
            config.kmip_kek_id = Some(kmip.kek_id.clone()).filter(|id| !id.is_empty());
        }
        self.start(KEY_SERVICE, HEALTH_PORT, &config, files)
    }

    /// The KMS v2 plugin socket the key service daemon serves (for the API server's
    /// `EncryptionConfiguration`).
    pub fn kms_socket(&self) -> PathBuf {
        self.socket_dir.join(KMS_SOCKET)
    }

    /// The join service daemon, its policy and disk bindings in etcd.
    pub fn start_join_service(
        &self,
        node_name: &str,
        inputs: JoinServiceInputs,
    ) -> Result<(), DaemonsError> {
        use constellation_joinservice::config::{
            ConfigFile, ETCD_CA, ETCD_CLIENT_CERT, ETCD_CLIENT_KEY, HEALTH_PORT, MEASUREMENT_SALT,
            MEASUREMENT_SECRET,
        };
        let mut files = vec![
            DaemonFile::bytes(
                self.state_dir.join(MEASUREMENT_SALT),
                inputs.measurement_salt.expose().to_vec(),
            ),
            DaemonFile::bytes(
                self.state_dir.join(MEASUREMENT_SECRET),
                inputs.measurement_secret.expose().to_vec(),
            ),
        ];
        let JoinServiceShared {
            endpoints,
            credentials,
        } = inputs.shared;
        files.push(DaemonFile::bytes(
            self.state_dir.join(ETCD_CA),
            credentials.ca_cert_pem.into_bytes(),
        ));
        files.push(DaemonFile::bytes(
            self.state_dir.join(ETCD_CLIENT_CERT),
            credentials.cert_pem.into_bytes(),
        ));
        files.push(DaemonFile::bytes(
            self.state_dir.join(ETCD_CLIENT_KEY),
            credentials.key_pem.expose().to_vec(),
        ));
        let config = ConfigFile {
            listen: Some(SocketAddr::new(self.ip, ports::JOIN)),
            state_dir: Some(self.state_dir.clone()),
            cluster_name: Some(inputs.cluster_name),
            node_name: Some(node_name.to_owned()),
            node_ip: Some(self.ip),
            key_service_endpoints: Some(inputs.key_service_endpoints),
            api_server_endpoint: Some(inputs.api_server_endpoint),
            kubernetes_version: Some(inputs.kubernetes_version),
            token_ttl_secs: Some(inputs.token_ttl.as_secs()),
            tcti: Some(self.tcti.clone()),
            etcd_endpoints: Some(endpoints),
            measurements_file: None,
            nodes_file: None,
            disk_bindings_dir: None,
            daemon: self.settings(HEALTH_PORT),
        };
        self.start(JOIN_SERVICE, HEALTH_PORT, &config, files)
    }
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der)
        .expect("PEM encoding of bytes in memory")
        .into_bytes()
}

fn chain_pem(creds: &ServiceCredentials) -> Vec<u8> {
    creds
        .cert_chain_der
        .iter()
        .flat_map(|der| pem("CERTIFICATE", der))
        .collect()
}
