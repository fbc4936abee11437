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
//! Such a cluster can also be recovered without the master secret: the request carries KMIP
//! client credentials instead, and the node unwraps the copy of the wrapped master secret in
//! its state disk's LUKS2 header with the KEK the KMS grants them; the same proof (the disk
//! opens, the cluster ID matches) follows.
//!
//! What is persisted for this: the cluster PKI under `state/pki` (as Init already did) and a
//! [`ControlPlaneRecord`] with the cluster name, Kubernetes version and measurement salt. The
//! measurement salt is not a secret (every join ticket carries it); the measurement secret is
//! derived again from the master secret and never written.

use std::sync::Arc;

use constellation_common::kdf;
use constellation_common::limits::{ListenerLimits, WorkGate};
use constellation_common::secret::SecretBytes;
use constellation_keyservice::kmip::StoredKmipSettings;
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
        "send either the master secret and salt or KMIP credentials, not both (got a \
         {secret_len}-byte master secret and a {salt_len}-byte salt with KMIP credentials)"
    )]
    SecretAndKmip { secret_len: usize, salt_len: usize },
    #[error("KMIP credentials: {0}")]
    BadKmip(String),
    #[error(
        "KMIP credentials were sent, but this node's state disk holds no KMIP-wrapped master \
         secret (its cluster's master secret is not wrapped by an external KMS): send the \
         master secret"
    )]
    NoWrappedSecret,
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
            Version { .. }
            | ShortMasterSecret(_)
            | BadSaltLength(_)
            | SecretAndKmip { .. }
            | BadKmip(_) => Status::invalid_argument(message),
            // ALREADY_EXISTS means exactly "this node does not wait for Recover" (recover.proto).
            AlreadyRecovered { .. } | NotWaiting { .. } => Status::already_exists(message),
            NeverInitialized | NoControlPlaneRecord | NoWrappedSecret => {
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

/// What the operator proves the cluster's master secret with.
#[derive(Debug)]
pub enum RecoverProof {
    /// The master secret and salt themselves.
    Secret {
        master: SecretBytes,
        salt: SecretBytes,
    },
    /// Credentials for the external KMS whose KEK wraps the master secret.
    Kmip(StoredKmipSettings),
}

/// Checks the request's version and shape before anything else.
pub fn check_request(r: RecoverRequest) -> Result<RecoverProof, RecoverError> {
    if r.version != PROTOCOL_VERSION {
        return Err(RecoverError::Version { found: r.version });
    }
    let master = SecretBytes::new(r.master_secret);
    let salt = SecretBytes::new(r.master_salt);
    if let Some(kmip) = r.kmip {
        if !master.expose().is_empty() || !salt.expose().is_empty() {
            return Err(RecoverError::SecretAndKmip {
                secret_len: master.expose().len(),
                salt_len: salt.expose().len(),
            });
        }
        return controlplane::kmip_from_proto(kmip)
            .map(RecoverProof::Kmip)
            .map_err(RecoverError::BadKmip);
    }
    if master.expose().len() < MASTER_SECRET_MIN_LEN {
        return Err(RecoverError::ShortMasterSecret(master.expose().len()));
    }
    if salt.expose().len() != SALT_LEN {
        return Err(RecoverError::BadSaltLength(salt.expose().len()));
    }
    Ok(RecoverProof::Secret { master, salt })
}

#[tonic::async_trait]
impl RecoverService for RecoverServer {
    async fn recover(
        &self,
        request: Request<RecoverRequest>,
    ) -> Result<Response<RecoverResponse>, Status> {
        let proof = check_request(request.into_inner())?;
        match self.unlock_gate.run(recover(&self.node, proof)).await? {
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

async fn recover(node: &Arc<NodeContext>, proof: RecoverProof) -> Result<String, RecoverError> {
    // Exactly once, and only while waiting: both locks are held for the whole recovery (order:
    // phase, then binding), so a join ticket arriving meanwhile is discarded afterwards.
    let mut phase = node.phase.lock().await;
    let mut binding = node.binding.lock().await;
    match *binding {
        Binding::Unbound => {}
        Binding::Recovered => {
            return Err(RecoverError::AlreadyRecovered {
                cluster_id: phase.cluster_id().unwrap_or_default().to_owned(),
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
    // On the local platform the phase and record are readable now; in a VM they are on the
    // state volume, read once the proof below opened it.
    let early_record = ControlPlaneRecord::load(&node.state_dir)?;
    if node.vm.is_none() {
        phase.cluster_id().ok_or(RecoverError::NeverInitialized)?;
        early_record
            .as_ref()
            .ok_or(RecoverError::NoControlPlaneRecord)?;
    }
    let (master, salt) = match proof {
        RecoverProof::Secret { master, salt } => (master, salt),
        RecoverProof::Kmip(kmip) => {
            let cluster_name = early_record.as_ref().map(|r| r.cluster_name.as_str());
            match controlplane::wrapped_secret_from_header(node, cluster_name, kmip).await {
                Ok(Some(unwrapped)) => (unwrapped.secret().clone(), unwrapped.salt().clone()),
                Ok(None) => return Err(RecoverError::NoWrappedSecret),
                Err(controlplane::ControlPlaneError::Backend(e)) => {
                    return Err(RecoverError::Kms(e))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };

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
    if node.vm.is_some() {
        // The volume holds the node's phase and control-plane record: mount it (never
        // formatted: it is not fresh) and read them.
        let state_dir = node.state_dir.clone();
        let disk = node.disk_path();
        tokio::task::spawn_blocking(move || {
            crate::vm::mount_state_volume(&disk, &opened, false, &state_dir)
        })
        .await
        .map_err(|e| RecoverError::Disk(DiskKeyError::Worker(e.to_string())))?
        .map_err(|e| RecoverError::Disk(DiskKeyError::Volume(e)))?;
        *phase = NodeState::load(&node.state_dir)?;
    }
    let expected = phase
        .cluster_id()
        .ok_or(RecoverError::NeverInitialized)?
        .to_owned();
    let record = match early_record {
        Some(record) => record,
        None => {
            ControlPlaneRecord::load(&node.state_dir)?.ok_or(RecoverError::NoControlPlaneRecord)?
        }
    };

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
            kmip: None,
        }
    }

    fn kmip(endpoint: &str) -> Option<constellation_proto::init::KmipKms> {
        Some(constellation_proto::init::KmipKms {
            endpoint: endpoint.into(),
            ..Default::default()
        })
    }

    #[test]
    fn kmip_credentials_replace_the_secret_never_join_it() {
        let with_kmip = |secret, salt, endpoint| RecoverRequest {
            kmip: kmip(endpoint),
            ..req(PROTOCOL_VERSION, secret, salt)
        };
        assert!(matches!(
            check_request(with_kmip(0, 0, "kms:5696")),
            Ok(RecoverProof::Kmip(k)) if k.endpoint == "kms:5696"
        ));
        let both = check_request(with_kmip(32, 32, "kms:5696")).unwrap_err();
        assert!(matches!(
            both,
            RecoverError::SecretAndKmip {
                secret_len: 32,
                salt_len: 32
            }
        ));
        assert!(matches!(
            check_request(with_kmip(0, 32, "kms:5696")),
            Err(RecoverError::SecretAndKmip { .. })
        ));
        let bad = check_request(with_kmip(0, 0, "no-port")).unwrap_err();
        assert!(bad.to_string().contains("no-port"), "{bad}");
        for e in [both, bad] {
            assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        }
        assert_eq!(
            Status::from(RecoverError::NoWrappedSecret).code(),
            tonic::Code::FailedPrecondition
        );
        // ALREADY_EXISTS only for "not waiting": clients treat it as nothing to do, so a
        // failure must never map to it.
        assert_eq!(
            Status::from(RecoverError::NotWaiting { how: "initialized" }).code(),
            tonic::Code::AlreadyExists
        );
    }

    #[test]
    fn version_and_lengths_are_checked_and_errors_map_to_codes() {
        assert!(check_request(req(PROTOCOL_VERSION, 32, 32)).is_ok());
        let cases = [
            (req(PROTOCOL_VERSION + 1, 32, 32), "protocol version"),
            (req(PROTOCOL_VERSION, 31, 32), "master secret"),
            (req(PROTOCOL_VERSION, 32, 16), "master salt"),
        ];
        for (r, what) in cases {
            let e = check_request(r).unwrap_err();
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
