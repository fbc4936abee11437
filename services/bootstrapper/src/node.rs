//! The node daemon: opens the TPM, serves the verification service, then either serves Init
//! (an uninitialized control-plane node) or joins through a join service, with jittered
//! retries at most 5 s apart, logging why each attempt failed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::atls;
use constellation_attestation::measurements::{sha256, CLUSTER_ID_PCR};
use constellation_attestation::tpm::{AkKind, Tpm};
use constellation_attestation::variant::qemu_vtpm::QemuVtpmIssuer;
use constellation_attestation::{Clock, SystemClock};
use constellation_common::metadata::{ports, FileMetadata, Metadata, Role};
use constellation_proto::init::init_service_server::InitServiceServer;
use constellation_proto::join::join_service_client::JoinServiceClient;
use constellation_proto::join::{IssueJoinTicketRequest, IssueJoinTicketResponse};
use constellation_proto::PROTOCOL_VERSION;
use tokio::sync::Mutex;

use crate::init::InitServer;
use crate::kubernetes::{KubernetesInstaller, NoneInstaller};
use crate::policy::{ClusterValidator, Scope};
use crate::state::{NodeState, Phase};
use crate::statedisk::{self, KdfSettings};

/// The PCRs every quote of this node covers.
pub const QUOTED_PCRS: std::ops::RangeInclusive<u32> = 0..=15;
/// Longest pause between two join attempts.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Size of the state disk's backing file on the local platform.
const STATE_DISK_BYTES: u64 = 32 << 20;

/// How the launcher configured this node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub node_dir: PathBuf,
    pub metadata_path: PathBuf,
    pub tcti: String,
}

/// Everything the node's services share.
pub struct NodeContext {
    pub name: String,
    pub node_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metadata: Arc<dyn Metadata>,
    pub issuer: Arc<QemuVtpmIssuer>,
    pub clock: Arc<dyn Clock>,
    /// The lifecycle phase; Init holds this lock while it runs (exactly-once).
    pub phase: Arc<Mutex<NodeState>>,
    pub installer: Box<dyn KubernetesInstaller>,
}

impl NodeContext {
    fn disk_path(&self) -> PathBuf {
        self.state_dir.join("disk.img")
    }
}

/// Runs the node until the process is stopped.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let metadata: Arc<dyn Metadata> = Arc::new(FileMetadata::new(&cfg.metadata_path, &cfg.name));
    let me = metadata.self_info()?;
    let tpm = Tpm::open(&cfg.tcti)?;
    let issuer = Arc::new(QemuVtpmIssuer::new(
        tpm,
        AkKind::EcdsaP256,
        QUOTED_PCRS.collect(),
    )?);
    let state_dir = cfg.node_dir.join("state");
    std::fs::create_dir_all(&state_dir)?;
    let state = NodeState::load(&state_dir)?;
    tracing::info!(node = %cfg.name, role = me.role.as_str(), ip = %me.ip, phase = ?state.phase, "bootstrapper starting");

    let node = Arc::new(NodeContext {
        name: cfg.name.clone(),
        node_dir: cfg.node_dir.clone(),
        state_dir,
        metadata: metadata.clone(),
        issuer: issuer.clone(),
        clock: Arc::new(SystemClock),
        phase: Arc::new(Mutex::new(state.clone())),
        installer: Box::new(NoneInstaller),
    });
    tracing::info!(
        "Kubernetes installer: {} (Kubernetes binaries are not part of the local platform)",
        node.installer.name()
    );

    // The state disk exists from first boot on, keyed with a throwaway key until the node gets
    // its real disk key (Init derives it, a join ticket carries it).
    ensure_state_disk(&node)?;

    // Verification service on every node, from the start.
    let verify_addr = SocketAddr::new(me.ip, ports::VERIFY);
    let verify_issuer: Arc<dyn constellation_attestation::Issuer> = issuer.clone();
    tokio::spawn(async move {
        if let Err(e) =
            constellation_verify::serve(verify_addr, verify_issuer, std::future::pending()).await
        {
            tracing::error!("verification service stopped: {e}");
        }
    });
    tracing::info!(%verify_addr, "verification service listening");

    if state.phase == Phase::Uninitialized && me.role == Role::ControlPlane {
        // Serve Init (server-attested aTLS); other control planes may also let us join.
        let init_addr = SocketAddr::new(me.ip, ports::BOOTSTRAPPER);
        let listener = tokio::net::TcpListener::bind(init_addr).await?;
        let config = atls::ServerConfig::server_only(issuer.clone())?;
        let init = InitServiceServer::new(InitServer::new(node.clone()));
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(init)
                .serve_with_incoming(atls::incoming(listener, config))
                .await
            {
                tracing::error!("init service stopped: {e}");
            }
        });
        tracing::info!(%init_addr, "waiting for Init (aTLS) or a join service");
        if node
            .metadata
            .cluster()?
            .join_endpoints(&node.name)
            .is_empty()
        {
            std::future::pending::<()>().await;
        }
    }
    join_loop(node).await
}

fn ensure_state_disk(node: &NodeContext) -> anyhow::Result<()> {
    let path = node.disk_path();
    if !path.exists() {
        let throwaway: [u8; 32] = rand::random();
        let uuid = statedisk::format(&path, STATE_DISK_BYTES, &throwaway, KdfSettings::from_env())?;
        std::fs::write(node.state_dir.join("disk.initial-key"), throwaway)?;
        tracing::info!(%uuid, "formatted the state disk with a first-boot key");
    }
    Ok(())
}

/// Joins through any control-plane node's join service, retrying with jitter.
async fn join_loop(node: Arc<NodeContext>) -> anyhow::Result<()> {
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
            Err(e) => tracing::warn!(attempt, "join attempt failed: {e:#}"),
        }
        attempt += 1;
        let base = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)));
        let jitter = Duration::from_millis(rand::random::<u64>() % 300);
        tokio::time::sleep((base + jitter).min(MAX_RETRY_INTERVAL)).await;
    }
}

async fn join_once(node: &Arc<NodeContext>) -> anyhow::Result<()> {
    // Init may have happened meanwhile (this node is the first control plane).
    if matches!(node.phase.lock().await.phase, Phase::Initialized { .. }) {
        std::future::pending::<()>().await;
    }
    let cluster = node.metadata.cluster()?;
    let me = node.metadata.self_info()?;
    let endpoints = cluster.join_endpoints(&node.name);
    anyhow::ensure!(
        !endpoints.is_empty(),
        "no control-plane node to join through yet"
    );
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
            Err(e) => last = Some(e.context(format!("join service {endpoint}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no join endpoint answered")))
}

/// A kubelet CSR (PEM) for this node: CN system:node:<name>, O system:nodes, SAN its name and IP.
fn kubelet_csr(name: &str, ip: std::net::IpAddr) -> anyhow::Result<(String, rcgen::KeyPair)> {
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
) -> anyhow::Result<IssueJoinTicketResponse> {
    let validator = Arc::new(ClusterValidator::new(
        node.metadata.clone(),
        Scope::ControlPlaneMember,
    ));
    let config = atls::ClientConfig::mutual(validator, node.issuer.clone())?;
    let (channel, _verdict) = atls::channel(endpoint, config).await?;
    let ticket = JoinServiceClient::new(channel)
        .issue_join_ticket(IssueJoinTicketRequest {
            version: PROTOCOL_VERSION,
            disk_uuid: disk_uuid.to_owned(),
            csr_pem: csr_pem.as_bytes().to_vec(),
            is_control_plane,
            node_name: node.name.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(ticket)
}

/// Uses a join ticket: key the state disk, bind to the cluster (PCR 15), remember the phase.
async fn apply_ticket(
    node: &Arc<NodeContext>,
    ticket: IssueJoinTicketResponse,
) -> anyhow::Result<()> {
    let disk = node.disk_path();
    let initial_key_path = node.state_dir.join("disk.initial-key");
    if let Ok(initial) = std::fs::read(&initial_key_path) {
        // First join: add the real disk key, then forget the first-boot key.
        statedisk::add_key(
            &disk,
            &initial,
            &ticket.state_disk_key,
            KdfSettings::from_env(),
        )?;
        std::fs::remove_file(&initial_key_path)?;
        tracing::info!("state disk re-keyed with the disk key from the join ticket");
    }
    let opened = statedisk::open(
        &disk,
        &ticket.state_disk_key,
        &format!("state-{}", node.name.len()),
    )?;
    tracing::info!(
        keyslot = opened.keyslot(),
        "state disk unlocked with the disk key from the join ticket"
    );

    let cluster_id = ticket.cluster_id.clone();
    anyhow::ensure!(
        cluster_id.len() == 32,
        "join ticket carries a {}-byte cluster ID",
        cluster_id.len()
    );
    let event = sha256(&cluster_id);
    node.issuer
        .with_tpm(|tpm| tpm.pcr_extend(CLUSTER_ID_PCR, &event))?;
    tracing::info!(cluster_id = %hex::encode(&cluster_id), "extended PCR {CLUSTER_ID_PCR} with the cluster ID");
    let mut phase = node.phase.lock().await;
    *phase = NodeState {
        phase: Phase::Joined {
            cluster_id: hex::encode(&cluster_id),
        },
    };
    phase.save(&node.state_dir)?;
    Ok(())
}
