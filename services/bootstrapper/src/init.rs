//! The Init RPC: served over server-attested aTLS by an uninitialized control-plane node.
//!
//! Order of checks: protocol version, init secret against the published Argon2id hash, input
//! shape, then "exactly once". Only then does the node derive keys, key its own state disk with
//! its disk key (HKDF(master secret, salt, "key-" + disk UUID), what the key service hands out,
//! so Recover can later prove a master secret by unlocking it), extend PCR 15 with the cluster
//! ID, create the cluster PKI, remember what Recover needs ([`ControlPlaneRecord`]), start its
//! control-plane services and answer with the kubeconfig material, streaming progress lines
//! while it works.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_common::initsecret;
use constellation_common::kdf;
use constellation_common::limits::{ListenerLimits, WorkGate};
use constellation_common::metadata::ports;
use constellation_common::secret::SecretBytes;
use constellation_joinservice::disk_bindings::Claim;
use constellation_joinservice::{DiskOwner, DiskUuid};
use constellation_proto::init::init_response::Kind;
use constellation_proto::init::init_service_server::InitService;
use constellation_proto::init::{InitRequest, InitResponse, InitSuccess, LogLine};
use constellation_proto::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::context::{extend_cluster_id, Binding, NodeContext};
use crate::controlplane::{self, ControlPlaneSecrets, KmsChoice, NetworkSettings};
use crate::disk_key::adopt_disk_key;
use crate::state::{ControlPlaneRecord, NodeState, Phase};
use crate::statedisk;

/// Lengths the original Constellation uses; shorter secrets are refused.
pub const MASTER_SECRET_MIN_LEN: usize = 32;
pub const SALT_LEN: usize = 32;

/// The Init service of one node.
pub struct InitServer {
    node: Arc<NodeContext>,
    /// Argon2 checks of the init secret (19 MiB and tens of milliseconds each) run a few at a
    /// time: anyone who completes aTLS can send Init, so a flood of wrong secrets must neither
    /// exhaust memory nor starve the right one.
    secret_check_gate: WorkGate,
}

impl InitServer {
    pub fn new(node: Arc<NodeContext>, limits: &ListenerLimits) -> Self {
        Self {
            node,
            secret_check_gate: limits.work_gate("init-secret check"),
        }
    }
}

fn check_shape(r: &InitRequest) -> Result<(), Status> {
    if r.master_secret.len() < MASTER_SECRET_MIN_LEN {
        return Err(Status::invalid_argument(format!(
            "master secret must be at least {MASTER_SECRET_MIN_LEN} bytes, got {}",
            r.master_secret.len()
        )));
    }
    for (name, v) in [
        ("master salt", &r.master_salt),
        ("measurement salt", &r.measurement_salt),
    ] {
        if v.len() != SALT_LEN {
            return Err(Status::invalid_argument(format!(
                "{name} must be {SALT_LEN} bytes, got {}",
                v.len()
            )));
        }
    }
    if r.cluster_name.is_empty() {
        return Err(Status::invalid_argument("cluster name is empty"));
    }
    Ok(())
}

fn log_line(message: impl Into<String>) -> InitResponse {
    let unix_millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    InitResponse {
        kind: Some(Kind::Log(LogLine {
            message: message.into(),
            unix_millis,
        })),
    }
}

#[tonic::async_trait]
impl InitService for InitServer {
    type InitStream = ReceiverStream<Result<InitResponse, Status>>;

    async fn init(
        &self,
        request: Request<InitRequest>,
    ) -> Result<Response<Self::InitStream>, Status> {
        let r = request.into_inner();
        if r.version != PROTOCOL_VERSION {
            return Err(Status::invalid_argument(format!(
                "protocol version {} is not supported (this node speaks {PROTOCOL_VERSION})",
                r.version
            )));
        }
        let metadata = self
            .node
            .metadata
            .cluster()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let hash = metadata.init_secret_hash.clone();
        let secret = SecretBytes::new(r.init_secret.clone());
        self.secret_check_gate
            .run_blocking(move || initsecret::verify(secret.expose(), &hash))
            .await?
            .map_err(|e| {
                tracing::warn!("Init refused: {e}");
                Status::unauthenticated(e.to_string())
            })?;
        check_shape(&r)?;

        // Exactly once: the phase lock is held for the whole initialization.
        let mut phase = self.node.phase.clone().lock_owned().await;
        if phase.phase != Phase::Uninitialized {
            return Err(Status::already_exists(format!(
                "this node is already part of cluster {} and cannot be initialized again",
                phase.cluster_id().unwrap_or("?")
            )));
        }

        let (tx, rx) = mpsc::channel(32);
        let node = self.node.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let say = move |m: String| {
                tracing::info!("{m}");
                let _ = progress.try_send(Ok(log_line(m)));
            };
            match initialize(&node, r, &say).await {
                Ok((success, new_state)) => {
                    *phase = new_state;
                    let _ = tx
                        .send(Ok(InitResponse {
                            kind: Some(Kind::Success(success)),
                        }))
                        .await;
                }
                Err(status) => {
                    tracing::error!("Init failed: {}", status.message());
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Binds this node's disk to this node (its attested key) before any join service runs, so no
/// joiner can claim it and be handed its key.
async fn bind_own_disk(node: &NodeContext, uuid: &str) -> Result<(), Status> {
    let disk = DiskUuid::parse(uuid).map_err(|e| Status::internal(e.to_string()))?;
    let ak = node
        .issuer
        .ak_public()
        .map_err(|e| Status::internal(format!("attestation key: {e}")))?;
    let me = DiskOwner {
        node_name: node.name.clone(),
        ak_fingerprint: ak.fingerprint(),
    };
    let bindings = node
        .shared
        .disk_bindings()
        .ok_or_else(|| Status::internal("the disk bindings' store is not running"))?;
    match bindings
        .claim(&disk, &me)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
    {
        Claim::BoundTo(owner) if owner == me => Ok(()),
        Claim::BoundTo(owner) => Err(Status::failed_precondition(format!(
            "state disk {disk} is bound to {owner}, not to this {me}"
        ))),
        Claim::ClaimantAtLimit { held } => Err(Status::failed_precondition(format!(
            "this {me} holds the most disks a node may bind ({held:?}), not its state disk {disk}"
        ))),
    }
}

async fn initialize(
    node: &Arc<NodeContext>,
    r: InitRequest,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(InitSuccess, NodeState), Status> {
    say(format!(
        "initializing cluster {:?} on node {}",
        r.cluster_name, node.name
    ));
    let master = SecretBytes::new(r.master_secret);
    let master_salt = SecretBytes::new(r.master_salt);
    let measurement_salt = r.measurement_salt;
    let measurement_secret = kdf::measurement_secret(master.expose(), master_salt.expose());
    let cluster_id = kdf::cluster_id(measurement_secret.expose(), &measurement_salt);
    let owner_id = kdf::owner_id(measurement_secret.expose(), &measurement_salt);
    say(format!("derived cluster ID {}", hex::encode(cluster_id)));

    let kms = KmsChoice::from_proto(r.kms).map_err(Status::invalid_argument)?;

    // Key this node's state disk with its disk key, as a join ticket would, then bind the disk
    // to this node: with files once the keyed volume is mounted (in a VM the binding folder is
    // on it), with etcd once the member runs (it needs the cluster PKI); either way before any
    // join service could hand the disk's key to another node.
    let uuid = statedisk::uuid(&node.disk_path())
        .map_err(|e| Status::internal(e.to_string()))?
        .to_string();
    let disk_key = kdf::derive_key(
        master.expose(),
        master_salt.expose(),
        &uuid,
        kdf::DEFAULT_KEY_LEN,
    )
    .map_err(|e| Status::internal(e.to_string()))?;
    adopt_disk_key(node, disk_key.expose())
        .await
        .map_err(|e| Status::internal(format!("keying the state disk: {e}")))?;
    say("state disk keyed with this node's disk key".to_owned());

    let secrets = ControlPlaneSecrets {
        master_secret: master,
        master_salt,
        measurement_salt: SecretBytes::new(measurement_salt.clone()),
        measurement_secret,
        cluster_id,
    };
    let mut material = controlplane::initialize_material(node, &r.cluster_name, &secrets, kms, say)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    material.kubernetes_version = r.kubernetes_version.clone();
    crate::etcd::start_member(
        node,
        &material.pki,
        &r.cluster_name,
        crate::etcd::MemberStart::Init,
        say,
    )
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    bind_own_disk(node, &uuid).await?;
    say("bound this node's state disk to it in etcd".to_owned());
    ControlPlaneRecord {
        cluster_name: r.cluster_name.clone(),
        kubernetes_version: r.kubernetes_version.clone(),
        measurement_salt: hex::encode(&measurement_salt),
    }
    .save(&node.state_dir)
    .map_err(|e| Status::internal(e.to_string()))?;

    // Bind this node to the cluster: one extend of PCR 15 with the cluster ID as event data.
    {
        let mut binding = node.binding.lock().await;
        if *binding != Binding::Unbound {
            return Err(Status::already_exists(
                "this node joined a cluster through a join service meanwhile",
            ));
        }
        extend_cluster_id(node, &cluster_id)
            .map_err(|e| Status::internal(format!("extending PCR {CLUSTER_ID_PCR}: {e}")))?;
        *binding = Binding::Initialized;
    }
    say(format!("extended PCR {CLUSTER_ID_PCR} with the cluster ID"));

    let me = node
        .metadata
        .self_info()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let endpoint = me.endpoint(ports::KUBE_API);
    let network = NetworkSettings {
        pod_cidr: r
            .network
            .as_ref()
            .map(|n| n.pod_cidr.clone())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "10.244.0.0/16".into()),
        service_cidr: r
            .network
            .as_ref()
            .map(|n| n.service_cidr.clone())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "10.96.0.0/12".into()),
    };
    let outcome = controlplane::install_kubernetes(
        node,
        &material,
        &r.kubernetes_version,
        &network,
        &endpoint,
        say,
    )
    .map_err(|e| Status::internal(e.to_string()))?;
    controlplane::start_services(node.clone(), material.clone(), say)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;

    let state = NodeState {
        phase: Phase::Initialized {
            cluster_id: hex::encode(cluster_id),
        },
    };
    state
        .save(&node.state_dir)
        .map_err(|e| Status::internal(e.to_string()))?;
    crate::context::report(
        node,
        constellation_common::node_status::NodePhase::Initialized {
            cluster_id: hex::encode(cluster_id),
        },
    );
    say("initialization complete".to_owned());

    let admin = material.admin.clone();
    Ok((
        InitSuccess {
            kubeconfig: material
                .pki
                .kubeconfig(&endpoint, &admin)
                .map_err(|e| Status::internal(e.to_string()))?
                .into_bytes(),
            owner_id: owner_id.to_vec(),
            cluster_id: cluster_id.to_vec(),
            ca_cert_pem: material.pki.ca_cert_pem().as_bytes().to_vec(),
            client_cert_pem: admin.cert_pem.into_bytes(),
            client_key_pem: admin.key_pem.expose().to_vec(),
            endpoint,
            kubernetes_installer: outcome,
        },
        state,
    ))
}
