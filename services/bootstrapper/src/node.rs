//! The node daemon: opens the TPM, serves the verification service, then either serves Init
//! (an uninitialized control-plane node) or joins through a join service, with jittered
//! retries at most 5 s apart ([`retry_delay`]), logging why each attempt failed. A control-plane
//! node that restarts after Init (or after a control-plane join) serves `Recover` meanwhile
//! (see [`crate::recover`]): whichever comes first, a join ticket or a Recover with the right
//! master secret, binds the node to its cluster again; the other is then refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::atls;
use constellation_attestation::atls::AtlsError;
use constellation_attestation::refusal::{Refusal, RefusalCheck};
use constellation_attestation::tpm::TpmError;
use constellation_attestation::variant::{issuer_for, VariantIssuer};
use constellation_attestation::{SystemClock, Variant};
use constellation_common::limits::ListenerLimits;
use constellation_common::metadata::{
    ports, FileMetadata, Metadata, MetadataError, Role, TcpMetadata,
};
use constellation_common::node_status::NodePhase;
use constellation_common::secret::SecretBytes;
use constellation_joinservice::pki::{write_pki_files, PkiError, PkiFile};
use constellation_joinservice::ticket::JoinTicketConfig;
use constellation_proto::init::init_service_server::InitServiceServer;
use constellation_proto::join::join_service_client::JoinServiceClient;
use constellation_proto::join::{IssueJoinTicketRequest, IssueJoinTicketResponse};
use constellation_proto::recover::recover_service_server::RecoverServiceServer;
use constellation_proto::PROTOCOL_VERSION;
use tokio::sync::Mutex;

use crate::cluster_validator::{ClusterValidator, Scope};
use crate::context::{extend_cluster_id, report};
pub use crate::context::{Binding, NodeContext, SharedState};
use crate::daemons::{NodeDaemons, StatusBoard};
pub use crate::disk_key::DiskKeyError;
use crate::disk_key::{adopt_disk_key, ensure_state_disk};
use crate::init::InitServer;
use crate::kubernetes::NoneInstaller;
use crate::recover::RecoverServer;
use crate::state::{ControlPlaneRecord, NodeState, Phase, StateError};
use crate::statedisk::{self, StateDiskError, VolumeKind};
use crate::tpm_mux::{self, TpmMux};

/// Longest pause between two join attempts.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after the first failed join attempt, before jitter; doubles per attempt up to
/// [`MAX_RETRY_INTERVAL`].
const FIRST_RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// How the launcher configured this node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub node_dir: PathBuf,
    pub metadata_path: PathBuf,
    pub tcti: String,
    /// Set when the node runs in a QEMU guest: metadata endpoint and state block device
    /// ([`crate::vm`]); `metadata_path` is then unused.
    pub vm: Option<crate::vm::VmSettings>,
    /// Where the service daemons' binaries are (`constellation-joinservice`, ...).
    pub daemon_dir: PathBuf,
}

/// Pause before the next join attempt after `attempt` (1-based) failed ones: full jitter,
/// uniformly in `[base/2, base]` with `base = 200 ms · 2^(attempt-1)` capped at
/// [`MAX_RETRY_INTERVAL`]. `random` is any random number (the caller draws it), so the function
/// stays pure and testable.
pub fn retry_delay(attempt: u32, random: u64) -> Duration {
    let cap = MAX_RETRY_INTERVAL.as_millis() as u64;
    let first = FIRST_RETRY_INTERVAL.as_millis() as u64;
    let base = first
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(16))
        .min(cap);
    let low = base / 2;
    Duration::from_millis(low + random % (base - low + 1))
}

/// Pause before the next join attempt when no join service was listening (every endpoint
/// refused the TCP connection): uniformly in `[50 ms, 100 ms]`. Such an attempt costs the
/// control plane one refused SYN, and the service usually starts within moments (a control
/// plane being initialized), so waiting the exponential backoff would only delay the join.
pub fn refused_retry_delay(random: u64) -> Duration {
    Duration::from_millis(50 + random % 51)
}

/// Why one join attempt failed. The join loop branches on it: a closed port is retried at
/// once, a refusal is reported in the node's status as data ([`Refusal`]).
#[derive(Debug, thiserror::Error)]
pub enum JoinAttemptError {
    #[error("node metadata: {0}")]
    Metadata(#[from] MetadataError),
    #[error("no control-plane node to join through yet")]
    NoEndpoint,
    #[error("state disk: {0}")]
    StateDisk(#[from] StateDiskError),
    #[error("kubelet CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("join service {endpoint}: {source}")]
    Atls {
        endpoint: String,
        #[source]
        source: AtlsError,
    },
    #[error("join service {endpoint} refused the join: {code:?}: {message}")]
    Refused {
        endpoint: String,
        code: tonic::Code,
        message: String,
        /// The structured reason, when the join service sent one.
        refusal: Option<Refusal>,
    },
    #[error("join ticket carries a {found}-byte cluster ID, expected 32")]
    TicketClusterIdLength { found: usize },
    #[error("join ticket is for cluster {ticket} but this node belongs to cluster {mine}")]
    OtherCluster { ticket: String, mine: String },
    #[error("join ticket names an unknown PKI file {0:?}")]
    UnknownPkiFile(String),
    #[error("master material from the join ticket: {0}")]
    MasterMaterial(#[from] constellation_keyservice::BackendError),
    #[error("{0}")]
    DiskKey(#[from] DiskKeyError),
    #[error("TPM: {0}")]
    Tpm(#[from] TpmError),
    #[error("node state: {0}")]
    State(#[from] StateError),
    #[error("cluster PKI: {0}")]
    Pki(#[from] PkiError),
}

impl JoinAttemptError {
    /// Whether the attempt failed only because nothing listened on the join port.
    fn connection_refused(&self) -> bool {
        matches!(self, JoinAttemptError::Atls { source: AtlsError::Io(io), .. }
            if io.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    /// The join service that refused this node and why, if one did.
    pub fn refusal(&self) -> Option<(&str, Refusal)> {
        match self {
            JoinAttemptError::Atls {
                endpoint,
                source: source @ AtlsError::PeerRefused(_),
            } => Some((endpoint, source.into())),
            JoinAttemptError::Refused {
                endpoint,
                refusal: Some(refusal),
                ..
            } => Some((endpoint, refusal.clone())),
            _ => None,
        }
    }
}

/// The join service's structured refusal (status details) as the node reports it.
fn refusal_of_status(status: &tonic::Status) -> Option<Refusal> {
    use constellation_proto::join::join_refusal::Reason;
    let reason = constellation_joinservice::ticket::refusal_of(status)?.reason?;
    let check = match reason {
        Reason::DiskOwnedByAnotherNode(_) => RefusalCheck::DiskBinding,
        Reason::RoleMismatch(_) => RefusalCheck::Role,
    };
    Some(Refusal::new(check, status.message()))
}

/// Why the node could not start (it then exits; the platform shows this message).
#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("metadata: {0}")]
    Metadata(#[from] constellation_common::metadata::MetadataError),
    #[error("TPM multiplexer: {0}")]
    TpmMux(#[from] crate::tpm_mux::TpmMuxError),
    #[error("the cluster's attestation variant: {0}")]
    Variant(#[from] constellation_attestation::variant::UnknownVariant),
    #[error("attestation issuer: {0}")]
    Issuer(#[from] constellation_attestation::variant::FactoryError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state: {0}")]
    State(#[from] StateError),
    #[error("SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("state disk: {0}")]
    Disk(#[from] crate::disk_key::DiskKeyError),
    #[error("state disk: {0}")]
    StateDisk(#[from] StateDiskError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("aTLS server: {0}")]
    Atls(#[from] AtlsError),
    #[error("verification service: {0}")]
    VerifyDaemon(#[from] crate::daemons::DaemonsError),
}

/// Runs the node until the process is stopped.
pub async fn run(cfg: NodeConfig) -> Result<(), NodeStartError> {
    let metadata: Arc<dyn Metadata> = match &cfg.vm {
        Some(vm) => Arc::new(TcpMetadata::new(vm.metadata_endpoint, &cfg.name)),
        None => Arc::new(FileMetadata::new(&cfg.metadata_path, &cfg.name)),
    };
    let me = metadata.self_info()?;
    // A swtpm serves one connection at a time: on a control plane the bootstrapper and two
    // daemons share the node's TPM through the multiplexer (a VM's kernel has /dev/tpmrm0).
    let tcti = match (&cfg.vm, me.role, tpm_mux::swtpm_socket(&cfg.tcti)) {
        (None, Role::ControlPlane, Some(swtpm)) => {
            TpmMux::start(&cfg.tcti, &tpm_mux::mux_socket_beside(&swtpm))?.tcti()
        }
        _ => cfg.tcti.clone(),
    };
    // The cluster's variant decides what the node issues (and which PCRs it quotes).
    let variant: Variant = metadata.cluster()?.attestation_variant.parse()?;
    let issuer = Arc::new(issuer_for(variant, &tcti)?);
    let state_dir = cfg.node_dir.join("state");
    std::fs::create_dir_all(&state_dir).map_err(|source| NodeStartError::Io {
        path: state_dir.clone(),
        source,
    })?;
    let status = Arc::new(StatusBoard::new(state_dir.clone()));
    let daemons = (me.role == Role::ControlPlane).then(|| {
        NodeDaemons::new(
            &cfg.node_dir,
            &state_dir,
            cfg.daemon_dir.clone(),
            tcti.clone(),
            me.ip,
            status.clone(),
        )
    });
    // The control planes' etcd cluster (a member per control plane, from Init, a
    // control-plane join or Recover on). In a VM its data directory is on the encrypted state
    // volume, so it starts only once the volume is mounted.
    let shared = SharedState::default();
    let state = NodeState::load(&state_dir)?;
    tracing::info!(node = %cfg.name, role = me.role.as_str(), ip = %me.ip, phase = ?state.phase, "bootstrapper starting");

    let node = Arc::new(NodeContext {
        name: cfg.name.clone(),
        node_dir: cfg.node_dir.clone(),
        state_dir,
        metadata: metadata.clone(),
        shared,
        status,
        daemons,
        issuer: issuer.clone(),
        clock: Arc::new(SystemClock),
        phase: Arc::new(Mutex::new(state.clone())),
        binding: Mutex::new(Binding::Unbound),
        installer: Box::new(NoneInstaller),
        vm: cfg.vm.clone(),
    });
    if node.vm.is_some() {
        crate::vm::report_status_on_console(node.state_dir.clone());
    }
    tracing::info!(
        "Kubernetes installer: {} (Kubernetes binaries are not part of the local platform)",
        node.installer.name()
    );

    report(&node, NodePhase::Started);
    stop_daemons_on_sigterm(node.clone()).map_err(NodeStartError::Signal)?;

    // The state disk exists from first boot on, keyed with a throwaway key until the node gets
    // its real disk key (Init derives it, a join ticket carries it).
    ensure_state_disk(&node)?;

    let mut serves_init_or_recover = false;
    // Every listener of the node: the documented defaults (constellation_common::limits).
    let limits = ListenerLimits::default();
    if me.role == Role::ControlPlane {
        // A restarted control plane holds no master secret: either a join service (another
        // control plane) or the operator's Recover brings it back. In a VM its phase and
        // record are on the state volume, still closed: a volume keyed with a disk key says
        // the node was initialized or joined.
        let restarted = match &node.vm {
            Some(_) => statedisk::volume_kind(&node.disk_path())? == VolumeKind::Keyed,
            None => {
                state.phase != Phase::Uninitialized
                    && ControlPlaneRecord::load(&node.state_dir)?.is_some()
            }
        };
        let serves = if restarted {
            let recover = RecoverServiceServer::new(RecoverServer::new(node.clone(), &limits))
                .max_decoding_message_size(limits.max_message_bytes);
            Some(("Recover", tonic::service::Routes::new(recover)))
        } else if state.phase == Phase::Uninitialized {
            // Serve Init (server-attested aTLS); other control planes may also let us join.
            let init = InitServiceServer::new(InitServer::new(node.clone(), &limits))
                .max_decoding_message_size(limits.max_message_bytes);
            Some(("Init", tonic::service::Routes::new(init)))
        } else {
            None
        };
        if let Some((what, routes)) = serves {
            let addr = SocketAddr::new(me.ip, ports::BOOTSTRAPPER);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeStartError::Listen { addr, source })?;
            let config = atls::ServerConfig::server_only(issuer.clone())?.with_limits(limits);
            tokio::spawn(async move {
                if let Err(e) = limits
                    .server()
                    .add_routes(routes)
                    .serve_with_incoming(atls::incoming(listener, config))
                    .await
                {
                    tracing::error!("{what} service stopped: {e}");
                }
            });
            tracing::info!(%addr, "waiting for {what} (aTLS) or a join service");
            report(
                &node,
                if what == "Recover" {
                    NodePhase::WaitingForRecover
                } else {
                    NodePhase::WaitingForInit
                },
            );
            serves_init_or_recover = true;
        }
    }
    if me.role == Role::ControlPlane {
        crate::etcd::restart_member_at_boot(&node);
    }
    match &node.daemons {
        Some(daemons) => daemons.start_verify()?,
        None => start_verification_service(&me, issuer, limits)
            .await
            .map_err(|source| NodeStartError::Listen {
                addr: SocketAddr::new(me.ip, ports::VERIFY),
                source,
            })?,
    }
    if serves_init_or_recover
        && node
            .metadata
            .cluster()?
            .join_endpoints(&node.name)
            .is_empty()
    {
        std::future::pending::<()>().await;
    }
    match join_loop(node).await {}
}

/// The verification service: a supervised daemon on control planes, inside the bootstrapper on
/// workers (see [`crate::daemons`]). It starts after the node's other listeners: the platform
/// takes its answer as "the node is up" (a control plane then already serves Init).
async fn start_verification_service(
    me: &constellation_common::metadata::NodeInfo,
    issuer: Arc<VariantIssuer>,
    limits: ListenerLimits,
) -> std::io::Result<()> {
    let verify_addr = SocketAddr::new(me.ip, ports::VERIFY);
    let listener = tokio::net::TcpListener::bind(verify_addr).await?;
    let verify_issuer: Arc<dyn constellation_attestation::Issuer> = issuer;
    tokio::spawn(async move {
        if let Err(e) =
            constellation_verify::serve(listener, verify_issuer, limits, std::future::pending())
                .await
        {
            tracing::error!("verification service stopped: {e}");
        }
    });
    tracing::info!(%verify_addr, "verification service listening");
    Ok(())
}

/// On SIGTERM (the platform stopping the node) the supervised daemons are stopped first, so no
/// daemon outlives its node; then the bootstrapper exits.
fn stop_daemons_on_sigterm(node: Arc<NodeContext>) -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        tracing::info!("SIGTERM: stopping the supervised daemons");
        let left = crate::etcd::leave_on_shutdown(&node).await;
        if let Some(daemons) = &node.daemons {
            daemons.supervisor().shutdown(Duration::from_secs(3)).await;
        }
        if left {
            crate::etcd::forget_left_member(&node.state_dir);
        }
        std::process::exit(0);
    });
    Ok(())
}

/// Joins through any control-plane node's join service, retrying with jitter.
async fn join_loop(node: Arc<NodeContext>) -> std::convert::Infallible {
    let mut attempt: u32 = 0;
    loop {
        if node.phase.lock().await.phase != Phase::Uninitialized && attempt == 0 {
            tracing::info!("rejoining after restart to recover the disk key");
        }
        match join_once(&node).await {
            Ok(()) => {
                tracing::info!("joined the cluster");
                std::future::pending::<()>().await;
            }
            Err(e) if e.connection_refused() => {
                tracing::debug!(attempt, "no join service listening yet: {e}");
                tokio::time::sleep(refused_retry_delay(rand::random())).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(attempt, "join attempt failed: {e}");
                let phase = match e.refusal() {
                    Some((endpoint, refusal)) => NodePhase::JoinRefused {
                        endpoint: endpoint.to_owned(),
                        attempts: attempt + 1,
                        refusal,
                    },
                    None => NodePhase::Joining {
                        attempts: attempt + 1,
                    },
                };
                report(&node, phase);
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(retry_delay(attempt, rand::random())).await;
    }
}

async fn join_once(node: &Arc<NodeContext>) -> Result<(), JoinAttemptError> {
    // Init or Recover may have happened meanwhile: this node then serves the control plane.
    if *node.binding.lock().await != Binding::Unbound {
        std::future::pending::<()>().await;
    }
    let cluster = node.metadata.cluster()?;
    let me = node.metadata.self_info()?;
    let endpoints = cluster.join_endpoints(&node.name);
    if endpoints.is_empty() {
        return Err(JoinAttemptError::NoEndpoint);
    }
    let uuid = statedisk::uuid(&node.disk_path())?.to_string();
    let csr = kubelet_csr(&node.name, me.ip)?;
    let mut last = None;
    for endpoint in endpoints {
        match request_ticket(
            node,
            &endpoint,
            &uuid,
            &csr.0,
            me.role == Role::ControlPlane,
        )
        .await
        {
            Ok(ticket) => return apply_ticket(node, ticket).await,
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(JoinAttemptError::NoEndpoint))
}

/// A kubelet CSR (PEM) for this node: CN system:node:<name>, O system:nodes, SAN its name and IP.
fn kubelet_csr(name: &str, ip: std::net::IpAddr) -> Result<(String, rcgen::KeyPair), rcgen::Error> {
    use rcgen::{CertificateParams, DnType, SanType};
    let key = rcgen::KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("system:node:{name}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    params.subject_alt_names.push(SanType::IpAddress(ip));
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key))
}

async fn request_ticket(
    node: &Arc<NodeContext>,
    endpoint: &str,
    disk_uuid: &str,
    csr_pem: &str,
    is_control_plane: bool,
) -> Result<IssueJoinTicketResponse, JoinAttemptError> {
    let validator = Arc::new(ClusterValidator::new(
        node.metadata.clone(),
        Scope::ControlPlaneMember,
    ));
    let atls_error = |source| JoinAttemptError::Atls {
        endpoint: endpoint.to_owned(),
        source,
    };
    let config = atls::ClientConfig::mutual(validator, node.issuer.clone()).map_err(atls_error)?;
    let (channel, _verdict) = atls::channel(endpoint, config).await.map_err(atls_error)?;
    let ticket = JoinServiceClient::new(channel)
        .issue_join_ticket(IssueJoinTicketRequest {
            version: PROTOCOL_VERSION,
            disk_uuid: disk_uuid.to_owned(),
            csr_pem: csr_pem.as_bytes().to_vec(),
            is_control_plane,
            node_name: node.name.clone(),
        })
        .await
        .map_err(|status| JoinAttemptError::Refused {
            endpoint: endpoint.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
            refusal: refusal_of_status(&status),
        })?
        .into_inner();
    Ok(ticket)
}

/// Uses a join ticket: key the state disk, bind to the cluster (PCR 15), remember the phase.
/// A ticket that arrives after Init or Recover bound the node is discarded.
async fn apply_ticket(
    node: &Arc<NodeContext>,
    ticket: IssueJoinTicketResponse,
) -> Result<(), JoinAttemptError> {
    let mut phase = node.phase.lock().await;
    let mut binding = node.binding.lock().await;
    if *binding != Binding::Unbound {
        tracing::info!(binding = ?*binding, "discarding a join ticket: the node is already bound");
        return Ok(());
    }
    let cluster_id = ticket.cluster_id.clone();
    if cluster_id.len() != 32 {
        return Err(JoinAttemptError::TicketClusterIdLength {
            found: cluster_id.len(),
        });
    }
    if let Some(mine) = phase.cluster_id() {
        if mine != hex::encode(&cluster_id) {
            return Err(JoinAttemptError::OtherCluster {
                ticket: hex::encode(&cluster_id),
                mine: mine.to_owned(),
            });
        }
    }
    let opened = adopt_disk_key(node, &ticket.state_disk_key).await?;
    tracing::info!(
        keyslot = opened.keyslot(),
        "state disk unlocked with the disk key from the join ticket"
    );
    let control_plane = !ticket.control_plane_files.is_empty();
    if control_plane {
        remember_control_plane(node, &ticket)?;
    }
    extend_cluster_id(node, &cluster_id)?;
    *binding = Binding::Joined;
    if phase.phase == Phase::Uninitialized {
        *phase = NodeState {
            phase: Phase::Joined {
                cluster_id: hex::encode(&cluster_id),
            },
        };
        phase.save(&node.state_dir)?;
    }
    report(
        node,
        NodePhase::Joined {
            cluster_id: hex::encode(&cluster_id),
        },
    );
    drop((binding, phase));
    if control_plane {
        // The node has joined either way; a join service that cannot start must not look like a
        // failed join (the join loop would then wait forever as a bound node).
        if let Err(e) = serve_joins(node, ticket).await {
            tracing::error!("joined, but this control plane's join service did not start: {e:#}");
        }
    }
    Ok(())
}

/// A joined control plane serves joins too, with keys from the other control planes.
async fn serve_joins(
    node: &Arc<NodeContext>,
    ticket: IssueJoinTicketResponse,
) -> Result<(), crate::controlplane::ControlPlaneError> {
    let cluster_name = node.metadata.cluster()?.cluster_name;
    let config = JoinTicketConfig {
        measurement_salt: SecretBytes::new(ticket.measurement_salt),
        measurement_secret: SecretBytes::new(ticket.measurement_secret),
        api_server_endpoint: ticket.api_server_endpoint,
        kubernetes_version: ticket.kubernetes_version,
        token_ttl: crate::controlplane::TOKEN_TTL,
    };
    let addr =
        crate::controlplane::start_joined_services(node.clone(), cluster_name, config).await?;
    tracing::info!(%addr, "join service listening (mutual aTLS; data keys from the other control planes' key services)");
    Ok(())
}

/// A control-plane join: keep the cluster PKI and the non-secret facts Recover needs, so this
/// node can be recovered after a full control-plane restart too.
fn remember_control_plane(
    node: &NodeContext,
    ticket: &IssueJoinTicketResponse,
) -> Result<(), JoinAttemptError> {
    // The key service's master material (when the issuing control plane holds it) goes to
    // `state/keyservice/`, 0600, where this node's key service reads it.
    let (master, pki): (Vec<_>, Vec<_>) = ticket
        .control_plane_files
        .iter()
        .partition(|f| constellation_keyservice::is_master_material_file(&f.name));
    for f in &master {
        constellation_keyservice::store_master_material_file(&node.state_dir, &f.name, &f.content)?;
    }
    if !master.is_empty() {
        tracing::info!(
            files = master.len(),
            "stored the key service's master material from the control-plane join ticket"
        );
    }
    let files: Vec<PkiFile> = pki
        .into_iter()
        .map(|f| {
            PkiFile::known(&f.name, f.content.clone())
                .ok_or_else(|| JoinAttemptError::UnknownPkiFile(f.name.clone()))
        })
        .collect::<Result<_, _>>()?;
    write_pki_files(&node.state_dir.join("pki"), &files)?;
    ControlPlaneRecord {
        cluster_name: node.metadata.cluster()?.cluster_name,
        kubernetes_version: ticket.kubernetes_version.clone(),
        measurement_salt: hex::encode(&ticket.measurement_salt),
    }
    .save(&node.state_dir)?;
    tracing::info!("stored the cluster PKI from the control-plane join ticket");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_retried_within_100_ms_and_other_failures_back_off() {
        for random in [0, 1, 50, 51, u64::MAX] {
            let d = refused_retry_delay(random);
            assert!(
                (Duration::from_millis(50)..=Duration::from_millis(100)).contains(&d),
                "{d:?}"
            );
        }
        let atls_failure = |source| JoinAttemptError::Atls {
            endpoint: "10.0.0.1:30090".into(),
            source,
        };
        let refused = atls_failure(atls::AtlsError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(refused.connection_refused());
        assert!(refused.refusal().is_none());
        let reset = atls_failure(atls::AtlsError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(!reset.connection_refused());
        assert!(!JoinAttemptError::NoEndpoint.connection_refused());
    }

    #[test]
    fn a_refusal_by_the_join_service_is_reported_as_data() {
        let measurements = Refusal {
            check: RefusalCheck::Measurements,
            mismatches: vec![constellation_attestation::refusal::PcrMismatch {
                pcr: 4,
                expected: "aa".into(),
                found: Some("bb".into()),
            }],
            message: "PCR[4] differs".into(),
        };
        let refused = JoinAttemptError::Atls {
            endpoint: "10.0.0.1:30090".into(),
            source: atls::AtlsError::PeerRefused(measurements.clone()),
        };
        assert!(!refused.connection_refused());
        assert_eq!(refused.refusal(), Some(("10.0.0.1:30090", measurements)));
        let disk = JoinAttemptError::Refused {
            endpoint: "10.0.0.2:30090".into(),
            code: tonic::Code::PermissionDenied,
            message: "disk owned by another node".into(),
            refusal: Some(Refusal::new(RefusalCheck::DiskBinding, "disk owned")),
        };
        assert_eq!(
            disk.refusal().map(|(_, r)| r.check),
            Some(RefusalCheck::DiskBinding)
        );
        let unstructured = JoinAttemptError::Refused {
            endpoint: "10.0.0.2:30090".into(),
            code: tonic::Code::Unavailable,
            message: "try later".into(),
            refusal: None,
        };
        assert!(unstructured.refusal().is_none());
    }

    #[test]
    fn retry_delay_is_jittered_and_never_above_five_seconds() {
        for attempt in 1..=64 {
            for random in [0, 1, 77, 4_999, 1 << 40, u64::MAX] {
                let d = retry_delay(attempt, random);
                assert!(d <= MAX_RETRY_INTERVAL, "attempt {attempt}: {d:?}");
                assert!(d >= Duration::from_millis(100), "attempt {attempt}: {d:?}");
            }
        }
        // Early attempts are short, later ones spread over [2.5 s, 5 s].
        assert!(retry_delay(1, u64::MAX) <= Duration::from_millis(200));
        assert_eq!(retry_delay(10, 0), Duration::from_millis(2_500));
        assert_eq!(retry_delay(10, 2_500), MAX_RETRY_INTERVAL);
        let distinct: std::collections::BTreeSet<Duration> =
            (0..50u64).map(|r| retry_delay(10, r * 7_919)).collect();
        assert!(
            distinct.len() > 40,
            "the capped interval is jittered: {distinct:?}"
        );
    }
}
