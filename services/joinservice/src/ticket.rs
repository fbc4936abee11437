//! Join tickets: what an attested node receives to join the cluster.
//!
//! The aTLS layer (wired by the bootstrapper) verifies the joining node's attestation and inserts
//! an [`AttestedPeer`] into the tonic request's extensions. [`JoinTicketIssuer`] refuses any
//! request without one, any request for a node name other than the attested one, a role other
//! than the one the platform lists for the attested node, a disk bound to another node (see
//! [`crate::disk_bindings`]) and any CSR that names another node. Every check runs before anything
//! is issued; on failure nothing is.
//!
//! A ticket carries: the state-disk key (the data key whose key ID is the disk UUID), the
//! measurement salt and secret, a fresh bootstrap token with its expiry, the CA hash, the kubelet
//! certificate, the CA certificate, the API server endpoint, the Kubernetes version and the
//! cluster ID. Nodes the platform lists as control planes also get [`ClusterPki::shared_files`]
//! (decided by the listing for the attested node, never by the request), named by their path
//! under kubeadm's certificates directory: `ca.crt`, `ca.key`, `front-proxy-ca.crt`,
//! `front-proxy-ca.key`, `etcd/ca.crt`, `etcd/ca.key`, `sa.key`, `sa.pub`. After these come
//! the key service's master material of the issuing node
//! ([`JoinTicketIssuer::with_master_material`], e.g. `keyservice/cluster-master-secret.json`),
//! so that the joining control plane runs a key service of its own: a control plane is trusted
//! with the master secret as it is with the CA keys. Workers never get either.

use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::Clock;
use constellation_common::kdf::{cluster_id, DEFAULT_KEY_LEN};
use constellation_common::secret::SecretBytes;
use constellation_proto::join::join_service_server::JoinService;
use constellation_proto::join::{
    join_refusal, AttestedNode, ControlPlaneFile, DiskOwnedByAnotherNode, IssueJoinTicketRequest,
    IssueJoinTicketResponse, JoinRefusal, RoleMismatch,
};
use constellation_proto::prost::Message as _;
use constellation_proto::PROTOCOL_VERSION;
use tonic::{Code, Request, Response, Status};

use crate::disk_bindings::{
    BadDiskUuid, Claim, DiskBindingError, DiskBindings, DiskOwner, DiskUuid,
};
use crate::pki::{ClusterPki, CsrError, NodeIdentity};
use crate::token::{TokenError, TokenRegistry};
use constellation_common::metadata::Role;

/// The attested identity of the caller, put into the request extensions by the aTLS layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedPeer {
    /// SHA-256 of the peer's attestation key (the key its evidence is signed with).
    pub ak_fingerprint: [u8; 32],
    /// The node the attested evidence belongs to, when the platform binds one. Requests from a
    /// peer without a node name are refused: the ticket could not be bound to a node.
    pub node_name: Option<String>,
}

/// Why a data key could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data key {key_id:?} unavailable: {reason}")]
pub struct DataKeyError {
    pub key_id: String,
    pub reason: String,
}

/// Where data keys come from (the key service in production).
#[tonic::async_trait]
pub trait DataKeySource: Send + Sync {
    /// The `len`-byte data key for `key_id`.
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError>;
}

/// What the platform's metadata knows about nodes.
pub trait NodeDirectory: Send + Sync {
    fn node(&self, name: &str) -> Option<NodeIdentity>;
}

/// A fixed directory (tests, benchmarks, a cluster whose node list is known up front).
impl NodeDirectory for std::collections::HashMap<String, NodeIdentity> {
    fn node(&self, name: &str) -> Option<NodeIdentity> {
        self.get(name).cloned()
    }
}

/// What the join service checks of a node the platform lists: its name, role and address (the
/// kubelet certificate may name exactly these).
pub fn node_identity(node: &constellation_common::metadata::NodeInfo) -> NodeIdentity {
    NodeIdentity {
        name: node.name.clone(),
        role: node.role,
        ips: vec![node.ip],
        dns_names: vec![node.name.clone()],
    }
}

/// The node directory the control planes share in etcd, kept current by a watch: a node listed
/// or removed through any control plane applies to the next join here.
impl NodeDirectory for constellation_store::JoinStateCache {
    fn node(&self, name: &str) -> Option<NodeIdentity> {
        constellation_store::JoinStateCache::node(self, name).map(|n| node_identity(&n))
    }
}

/// Fixed settings of the join service.
#[derive(Debug, Clone)]
pub struct JoinTicketConfig {
    pub measurement_salt: SecretBytes,
    pub measurement_secret: SecretBytes,
    /// `host:port` of the Kubernetes API server (the load balancer).
    pub api_server_endpoint: String,
    pub kubernetes_version: String,
    /// Lifetime of the bootstrap tokens handed out.
    pub token_ttl: Duration,
}

/// Why a ticket was refused. Messages name the check and the values involved, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("request carries no attested peer: the channel was not attested")]
    NotAttested,
    #[error("attested peer (AK {ak_fingerprint}) is bound to no node name")]
    PeerWithoutNodeName { ak_fingerprint: String },
    #[error("request is for node {requested:?} but the attested peer is node {attested:?}")]
    NodeNameMismatch { requested: String, attested: String },
    #[error("protocol version {found} is not supported (expected {expected})")]
    UnsupportedVersion { expected: u32, found: u32 },
    #[error("node name is empty")]
    EmptyNodeName,
    #[error(transparent)]
    BadDiskUuid(#[from] BadDiskUuid),
    #[error("node {name:?} is not known to the platform metadata")]
    UnknownNode { name: String },
    #[error("node {name:?} asked for the {requested} role but the platform lists it as {listed}")]
    RoleMismatch {
        name: String,
        requested: &'static str,
        listed: &'static str,
    },
    #[error("disk {disk_uuid} belongs to {owner}, not to {claimant} that asked for its key")]
    DiskOwnedByAnotherNode {
        disk_uuid: String,
        claimant: DiskOwner,
        owner: DiskOwner,
    },
    #[error("{claimant} asked for disk {requested} but holds the most disks a node may bind: {}",
        held.join(", "))]
    NodeAtDiskLimit {
        claimant: DiskOwner,
        requested: String,
        held: Vec<String>,
    },
    #[error("disk bindings: {0}")]
    DiskBindings(#[from] DiskBindingError),
    #[error("bootstrap token: {0}")]
    Token(#[from] TokenError),
    #[error("kubelet CSR refused: {0}")]
    Csr(#[source] CsrError),
    #[error("{0}")]
    DataKey(#[from] DataKeyError),
}

impl JoinError {
    /// The structured form of a refusal, for the status details (see [`JoinRefusal`]).
    pub fn refusal(&self) -> Option<JoinRefusal> {
        let reason = match self {
            JoinError::DiskOwnedByAnotherNode {
                disk_uuid,
                claimant,
                owner,
            } => join_refusal::Reason::DiskOwnedByAnotherNode(DiskOwnedByAnotherNode {
                disk_uuid: disk_uuid.clone(),
                claimant: Some(attested_node(claimant)),
                owner: Some(attested_node(owner)),
            }),
            JoinError::RoleMismatch {
                name,
                requested,
                listed,
            } => join_refusal::Reason::RoleMismatch(RoleMismatch {
                node_name: name.clone(),
                requested_control_plane: *requested == role_name(Role::ControlPlane),
                listed_control_plane: *listed == role_name(Role::ControlPlane),
            }),
            _ => return None,
        };
        Some(JoinRefusal {
            reason: Some(reason),
        })
    }
}

fn role_name(role: Role) -> &'static str {
    role.as_str()
}

fn attested_node(owner: &DiskOwner) -> AttestedNode {
    AttestedNode {
        name: owner.node_name.clone(),
        ak_sha256: owner.ak_fingerprint.to_vec(),
    }
}

/// The [`JoinRefusal`] a refused join's status carries in its details, if any.
pub fn refusal_of(status: &Status) -> Option<JoinRefusal> {
    JoinRefusal::decode(status.details())
        .ok()
        .filter(|r| r.reason.is_some())
}

impl From<JoinError> for Status {
    fn from(e: JoinError) -> Self {
        let message = e.to_string();
        if let Some(refusal) = e.refusal() {
            return Status::with_details(
                Code::PermissionDenied,
                message,
                refusal.encode_to_vec().into(),
            );
        }
        match e {
            JoinError::NotAttested
            | JoinError::PeerWithoutNodeName { .. }
            | JoinError::NodeNameMismatch { .. }
            | JoinError::UnknownNode { .. }
            | JoinError::RoleMismatch { .. }
            | JoinError::DiskOwnedByAnotherNode { .. }
            | JoinError::NodeAtDiskLimit { .. } => Status::permission_denied(message),
            JoinError::Csr(ref csr) if csr.is_identity_mismatch() => {
                Status::permission_denied(message)
            }
            JoinError::Csr(CsrError::Signing(_)) => Status::internal(message),
            JoinError::UnsupportedVersion { .. }
            | JoinError::EmptyNodeName
            | JoinError::BadDiskUuid { .. }
            | JoinError::Csr(_) => Status::invalid_argument(message),
            JoinError::DataKey(_) | JoinError::DiskBindings(_) => Status::unavailable(message),
            JoinError::Token(_) => Status::resource_exhausted(message),
        }
    }
}

/// Issues join tickets; implements the generated `JoinService` gRPC trait.
pub struct JoinTicketIssuer {
    keys: Arc<dyn DataKeySource>,
    nodes: Arc<dyn NodeDirectory>,
    disks: Arc<dyn DiskBindings>,
    pki: Arc<ClusterPki>,
    tokens: Arc<TokenRegistry>,
    clock: Arc<dyn Clock>,
    config: JoinTicketConfig,
    cluster_id: [u8; 32],
    /// `(path relative to the state directory, content)` of the key service's master
    /// material, handed to control planes only. Never logged.
    master_material: Vec<(String, SecretBytes)>,
}

impl std::fmt::Debug for JoinTicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTicketIssuer")
            .field("api_server_endpoint", &self.config.api_server_endpoint)
            .field("kubernetes_version", &self.config.kubernetes_version)
            .field("cluster_id", &hex::encode(self.cluster_id))
            .finish_non_exhaustive()
    }
}

impl JoinTicketIssuer {
    /// The cluster ID is derived from the measurement secret and salt (see
    /// `constellation_common::kdf::cluster_id`), so it cannot disagree with them.
    pub fn new(
        keys: Arc<dyn DataKeySource>,
        nodes: Arc<dyn NodeDirectory>,
        disks: Arc<dyn DiskBindings>,
        pki: Arc<ClusterPki>,
        tokens: Arc<TokenRegistry>,
        clock: Arc<dyn Clock>,
        config: JoinTicketConfig,
    ) -> Self {
        let cluster_id = cluster_id(
            config.measurement_secret.expose(),
            config.measurement_salt.expose(),
        );
        Self {
            keys,
            nodes,
            disks,
            pki,
            tokens,
            clock,
            config,
            cluster_id,
            master_material: Vec::new(),
        }
    }

    /// Hands `files` (the key service's master material this node holds, see
    /// `constellation_keyservice::master_material_files`) to joining control planes, after the
    /// cluster PKI. Without it (or with none), control planes get the PKI only.
    pub fn with_master_material(mut self, files: Vec<(String, SecretBytes)>) -> Self {
        self.master_material = files;
        self
    }

    /// The cluster ID handed out in tickets.
    pub fn cluster_id(&self) -> [u8; 32] {
        self.cluster_id
    }

    /// Checks `req` against the attested `peer` and the metadata, then issues the ticket.
    pub async fn issue(
        &self,
        peer: Option<&AttestedPeer>,
        req: &IssueJoinTicketRequest,
    ) -> Result<IssueJoinTicketResponse, JoinError> {
        let result = self.issue_checked(peer, req).await;
        match &result {
            Ok(_) => tracing::info!(node = %req.node_name, control_plane = req.is_control_plane,
                "join ticket issued"),
            Err(e) => tracing::warn!(node = %req.node_name,
                ak = %peer.map(|p| hex::encode(p.ak_fingerprint)).unwrap_or_default(),
                error = %e, "join ticket refused"),
        }
        result
    }

    async fn issue_checked(
        &self,
        peer: Option<&AttestedPeer>,
        req: &IssueJoinTicketRequest,
    ) -> Result<IssueJoinTicketResponse, JoinError> {
        let peer = peer.ok_or(JoinError::NotAttested)?;
        if req.version != PROTOCOL_VERSION {
            return Err(JoinError::UnsupportedVersion {
                expected: PROTOCOL_VERSION,
                found: req.version,
            });
        }
        if req.node_name.is_empty() {
            return Err(JoinError::EmptyNodeName);
        }
        let attested = peer
            .node_name
            .as_deref()
            .ok_or_else(|| JoinError::PeerWithoutNodeName {
                ak_fingerprint: hex::encode(peer.ak_fingerprint),
            })?;
        if attested != req.node_name {
            return Err(JoinError::NodeNameMismatch {
                requested: req.node_name.clone(),
                attested: attested.to_owned(),
            });
        }
        let disk = DiskUuid::parse(&req.disk_uuid)?;
        // The entry for the attested node (its name came from its attested key).
        let node = self
            .nodes
            .node(attested)
            .ok_or_else(|| JoinError::UnknownNode {
                name: attested.to_owned(),
            })?;
        let requested = if req.is_control_plane {
            Role::ControlPlane
        } else {
            Role::Worker
        };
        if requested != node.role {
            return Err(JoinError::RoleMismatch {
                name: attested.to_owned(),
                requested: role_name(requested),
                listed: role_name(node.role),
            });
        }
        let csr = self
            .pki
            .check_kubelet_csr(&req.csr_pem, &node)
            .map_err(JoinError::Csr)?;
        let claimant = DiskOwner {
            node_name: attested.to_owned(),
            ak_fingerprint: peer.ak_fingerprint,
        };
        match self.disks.claim(&disk, &claimant).await? {
            Claim::BoundTo(owner) if owner == claimant => {}
            Claim::BoundTo(owner) => {
                return Err(JoinError::DiskOwnedByAnotherNode {
                    disk_uuid: disk.to_string(),
                    claimant,
                    owner,
                })
            }
            Claim::ClaimantAtLimit { held } => {
                return Err(JoinError::NodeAtDiskLimit {
                    claimant,
                    requested: disk.to_string(),
                    held: held.iter().map(DiskUuid::to_string).collect(),
                })
            }
        }

        // All checks passed; now obtain and issue, the token last (the only registration).
        let disk_key = self.keys.data_key(disk.as_str(), DEFAULT_KEY_LEN).await?;
        let kubelet_cert = self
            .pki
            .sign_kubelet_cert(&csr, self.clock.as_ref())
            .map_err(JoinError::Csr)?;
        let control_plane_files = if node.role == Role::ControlPlane {
            self.pki
                .shared_files()
                .into_iter()
                .map(|f| ControlPlaneFile {
                    name: f.relative_path.to_owned(),
                    content: f.content.expose().to_vec(),
                })
                .chain(
                    self.master_material
                        .iter()
                        .map(|(name, content)| ControlPlaneFile {
                            name: name.clone(),
                            content: content.expose().to_vec(),
                        }),
                )
                .collect()
        } else {
            Vec::new()
        };
        let token = self
            .tokens
            .issue(attested, self.config.token_ttl, self.clock.as_ref())?;
        Ok(IssueJoinTicketResponse {
            state_disk_key: disk_key.expose().to_vec(),
            measurement_salt: self.config.measurement_salt.expose().to_vec(),
            measurement_secret: self.config.measurement_secret.expose().to_vec(),
            bootstrap_token: token.expose(),
            bootstrap_token_expiry_unix: token.expires_at_unix(),
            discovery_token_ca_cert_hash: self.pki.ca_cert_hash(),
            kubelet_cert_pem: kubelet_cert.into_bytes(),
            ca_cert_pem: self.pki.ca_cert_pem().as_bytes().to_vec(),
            control_plane_files,
            api_server_endpoint: self.config.api_server_endpoint.clone(),
            kubernetes_version: self.config.kubernetes_version.clone(),
            cluster_id: self.cluster_id.to_vec(),
        })
    }
}

#[tonic::async_trait]
impl JoinService for JoinTicketIssuer {
    async fn issue_join_ticket(
        &self,
        request: Request<IssueJoinTicketRequest>,
    ) -> Result<Response<IssueJoinTicketResponse>, Status> {
        let peer = request.extensions().get::<AttestedPeer>().cloned();
        self.issue(peer.as_ref(), request.get_ref())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}
