//! The Recover RPC: served over server-attested aTLS by a control-plane node that restarted after
//! Init (or after a control-plane join) and is waiting for its master secret.
//!
//! Order of checks: protocol version, input shape, "the node is waiting" (not bound by Init, a
//! join ticket or an earlier Recover), then the proof: the disk key HKDF(master secret, master
//! salt, "key-" + disk UUID) — exactly what the key service would hand out — must open a keyslot
//! of the node's existing state disk, and the cluster ID derived from it must be the one the node
//! remembers. Only then does the node extend PCR 15 with the cluster ID, start the key service
//! and the join service (the same start path as Init) and answer.
//!
//! With an external KMS (KMIP), one more check before anything starts: the KEK in the KMIP
//! server must still unwrap the master secret kept since Init, and it must be the one sent.
//! KMIP unreachable: `Unavailable`, the node keeps waiting and Recover can be sent again.
//!
//! What is persisted for this: the cluster PKI under `state/pki` (as Init already did) and a
//! [`ControlPlaneRecord`] with the cluster name, Kubernetes version and measurement salt. The
//! measurement salt is not a secret (every join ticket carries it); the measurement secret is
//! derived again from the master secret and never written.

use std::sync::Arc;

use constellation_common::kdf;
use constellation_common::limits::{ListenerLimits, WorkGate};
use constellation_common::secret::SecretBytes;
use constellation_keyservice::MasterSecret;
use constellation_proto::recover::recover_service_server::RecoverService;
use constellation_proto::recover::{RecoverRequest, RecoverResponse};
use constellation_proto::PROTOCOL_VERSION;
use tonic::{Request, Response, Status};

use crate::context::{extend_cluster_id, Binding, NodeContext};
use crate::controlplane;
use crate::disk_key::DiskKeyError;
use crate::init::{MASTER_SECRET_MIN_LEN, SALT_LEN};
use crate::state::{ControlPlaneRecord, NodeState};
use crate::statedisk::{self, StateDiskError};

/// Why Recover was refused or failed. Never contains secret material.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("protocol version {found} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version { found: u32 },
    #[error("master secret must be at least {MASTER_SECRET_MIN_LEN} bytes, got {0}")]
    ShortMasterSecret(usize),
    #[error("master salt must be {SALT_LEN} bytes, got {0}")]
    BadSaltLength(usize),
    #[error(
        "this node was already recovered (cluster {cluster_id}); Recover is accepted once per boot"
    )]
    AlreadyRecovered { cluster_id: String },
    #[error("this node is not waiting for Recover: it is already running ({how})")]
    NotWaiting { how: &'static str },
    #[error("this node was never part of a cluster: nothing to recover (use Init)")]
    NeverInitialized,
    #[error("this node keeps no control-plane record: it is not a recoverable control plane")]
    NoControlPlaneRecord,
    #[error(
        "wrong master secret or salt: the disk key derived from it does not unlock this node's \
         state disk (no keyslot opens); nothing was started"
    )]
    WrongMasterSecret,
    #[error(
        "wrong master secret or salt: it derives cluster ID {derived}, but this node belongs to \
         cluster {expected}; nothing was started"
    )]
    WrongCluster { derived: String, expected: String },
    #[error("external KMS: {0}; nothing was started, the node still waits for Recover")]
    Kms(constellation_keyservice::BackendError),
    #[error(
        "the external KMS unwraps a different master secret than the one sent; nothing was \
         started"
    )]
    KmsDisagrees,
    #[error("the stored measurement salt is not 32 bytes of hex")]
    BadRecord,
    #[error("state disk: {0}")]
    Disk(DiskKeyError),
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("control plane: {0}")]
    ControlPlane(#[from] controlplane::ControlPlaneError),
    #[error("extending PCR 15: {0}")]
    Tpm(#[from] constellation_attestation::tpm::TpmError),
}

impl From<RecoverError> for Status {
    fn from(e: RecoverError) -> Self {
        use RecoverError::*;
        let message = e.to_string();
        match e {
            Version { .. } | ShortMasterSecret(_) | BadSaltLength(_) => {
                Status::invalid_argument(message)
            }
            AlreadyRecovered { .. } => Status::already_exists(message),
            NotWaiting { .. } | NeverInitialized | NoControlPlaneRecord => {
                Status::failed_precondition(message)
            }
            WrongMasterSecret | WrongCluster { .. } | KmsDisagrees => {
                Status::permission_denied(message)
            }
            Kms(constellation_keyservice::BackendError::KmsUnreachable { .. }) => {
                Status::unavailable(message)
            }
            Kms(_) => Status::failed_precondition(message),
            BadRecord | Disk(_) | State(_) | ControlPlane(_) | Tpm(_) => Status::internal(message),
        }
    }
}

/// The Recover service of one node.
pub struct RecoverServer {
    node: Arc<NodeContext>,
    /// Each Recover tries a LUKS unlock (an Argon2 key derivation in libcryptsetup); they run
    /// a few at a time with a bounded wait, so a flood of wrong secrets queues in order.
    unlock_gate: WorkGate,
}

impl RecoverServer {
    pub fn new(node: Arc<NodeContext>, limits: &ListenerLimits) -> Self {
        Self {
            node,
            unlock_gate: limits.work_gate("state-disk unlock"),
        }
    }
}

/// Checks the request's version and shape before anything else.
pub fn check_request(r: &RecoverRequest) -> Result<(), RecoverError> {
    if r.version != PROTOCOL_VERSION {
        return Err(RecoverError::Version { found: r.version });
    }
    if r.master_secret.len() < MASTER_SECRET_MIN_LEN {
        return Err(RecoverError::ShortMasterSecret(r.master_secret.len()));
    }
    if r.master_salt.len() != SALT_LEN {
        return Err(RecoverError::BadSaltLength(r.master_salt.len()));
    }
    Ok(())
}

#[tonic::async_trait]
impl RecoverService for RecoverServer {
    async fn recover(
        &self,
        request: Request<RecoverRequest>,
    ) -> Result<Response<RecoverResponse>, Status> {
        let r = request.into_inner();
        let checked = check_request(&r);
        let master = SecretBytes::new(r.master_secret);
        let salt = SecretBytes::new(r.master_salt);
        checked?;
        match self
            .unlock_gate
            .run(recover(&self.node, master, salt))
            .await?
        {
            Ok(message) => {
                tracing::info!("{message}");
                Ok(Response::new(RecoverResponse { message }))
            }
            Err(e) => {
                tracing::warn!("Recover refused: {e}");
                Err(e.into())
            }
        }
    }
}

async fn recover(
    node: &Arc<NodeContext>,
    master: SecretBytes,
    salt: SecretBytes,
) -> Result<String, RecoverError> {
    // Exactly once, and only while waiting: both locks are held for the whole recovery (order:
    // phase, then binding), so a join ticket arriving meanwhile is discarded afterwards.
    let phase = node.phase.lock().await;
    let mut binding = node.binding.lock().await;
    let expected = phase
        .cluster_id()
        .ok_or(RecoverError::NeverInitialized)?
        .to_owned();
    match *binding {
        Binding::Unbound => {}
        Binding::Recovered => {
            return Err(RecoverError::AlreadyRecovered {
                cluster_id: expected,
            })
        }
        Binding::Initialized => return Err(RecoverError::NotWaiting { how: "initialized" }),
        Binding::Joined => {
            return Err(RecoverError::NotWaiting {
                how: "rejoined through a join service",
            })
        }
        Binding::Broken => {
            return Err(RecoverError::NotWaiting {
                how: "an earlier Recover failed after binding PCR 15; restart the node",
            })
        }
    }
    let record =
        ControlPlaneRecord::load(&node.state_dir)?.ok_or(RecoverError::NoControlPlaneRecord)?;

    // The proof: the disk key from this master secret opens the node's existing state disk.
    let uuid = statedisk::uuid(&node.disk_path())
        .map_err(|e| RecoverError::Disk(DiskKeyError::StateDisk(e)))?
        .to_string();
    let disk_key = kdf::derive_key(master.expose(), salt.expose(), &uuid, kdf::DEFAULT_KEY_LEN)
        .map_err(|_| RecoverError::WrongMasterSecret)?;
    // Open only, never add a keyslot: a wrong secret must not be able to key the disk.
    let name = node
        .mapper_name()
        .map_err(|e| RecoverError::Disk(DiskKeyError::StateDisk(e)))?;
    let disk = node.disk_path();
    let opened =
        tokio::task::spawn_blocking(move || statedisk::open(&disk, disk_key.expose(), &name))
            .await
            .map_err(|e| RecoverError::Disk(DiskKeyError::Worker(e.to_string())))?
            .map_err(|e| match e {
                StateDiskError::WrongKey { .. } => RecoverError::WrongMasterSecret,
                other => RecoverError::Disk(DiskKeyError::StateDisk(other)),
            })?;
    tracing::info!(
        keyslot = opened.keyslot(),
        "state disk unlocked with the disk key derived from the recovered master secret"
    );

    let measurement_salt = hex::decode(&record.measurement_salt)
        .ok()
        .filter(|s| s.len() == SALT_LEN)
        .ok_or(RecoverError::BadRecord)?;
    let measurement_secret = kdf::measurement_secret(master.expose(), salt.expose());
    let cluster_id = kdf::cluster_id(measurement_secret.expose(), &measurement_salt);
    if hex::encode(cluster_id) != expected {
        return Err(RecoverError::WrongCluster {
            derived: hex::encode(cluster_id),
            expected,
        });
    }
    let master = MasterSecret::new(master, salt)
        .map_err(|e| RecoverError::ControlPlane(controlplane::ControlPlaneError::Backend(e)))?;
    // With an external KMS, its KEK must still unwrap the same master secret.
    match controlplane::external_master(node, &record.cluster_name).await {
        Ok(None) => {}
        Ok(Some(kms_master)) if kms_master == master => {
            tracing::info!("the external KMS unwraps the same master secret");
        }
        Ok(Some(_)) => return Err(RecoverError::KmsDisagrees),
        Err(controlplane::ControlPlaneError::Backend(e)) => return Err(RecoverError::Kms(e)),
        Err(e) => return Err(e.into()),
    }
    let material = controlplane::recovered_material(
        node,
        &record,
        master,
        SecretBytes::new(measurement_salt),
        measurement_secret,
    )?;

    // Everything checked: bind the node again (the TPM was reset by the restart).
    extend_cluster_id(node, &cluster_id)?;
    *binding = Binding::Broken;
    let say = |m: String| tracing::info!("{m}");
    controlplane::start_services(node.clone(), material, &say).await?;
    *binding = Binding::Recovered;
    NodeState {
        phase: phase.phase.clone(),
    }
    .save(&node.state_dir)?;
    crate::context::report(
        node,
        constellation_common::node_status::NodePhase::Joined {
            cluster_id: expected.to_string(),
        },
    );
    Ok(format!(
        "recovered cluster {expected}: state disk unlocked, PCR 15 bound, key service and join \
         service running"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: u32, secret: usize, salt: usize) -> RecoverRequest {
        RecoverRequest {
            version,
            master_secret: vec![1; secret],
            master_salt: vec![2; salt],
        }
    }

    #[test]
    fn version_and_lengths_are_checked_and_errors_map_to_codes() {
        assert!(check_request(&req(PROTOCOL_VERSION, 32, 32)).is_ok());
        let cases = [
            (req(PROTOCOL_VERSION + 1, 32, 32), "protocol version"),
            (req(PROTOCOL_VERSION, 31, 32), "master secret"),
            (req(PROTOCOL_VERSION, 32, 16), "master salt"),
        ];
        for (r, what) in cases {
            let e = check_request(&r).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
            assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        }
        let wrong = Status::from(RecoverError::WrongMasterSecret);
        assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
        assert!(wrong.message().contains("wrong master secret"));
        let again = Status::from(RecoverError::AlreadyRecovered {
            cluster_id: "ab".into(),
        });
        assert_eq!(again.code(), tonic::Code::AlreadyExists);
    }
}
