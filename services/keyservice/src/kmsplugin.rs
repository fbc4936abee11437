//! The Kubernetes KMS v2 plugin: kube-apiserver wraps the data-encryption keys of Secrets through
//! it, so etcd never holds a key that the cluster's master secret does not protect.
//!
//! The key-encryption key (KEK) is the data key [`KEK_KEY_ID`] derived from the master secret
//! (HKDF as every other data key), so it survives restarts and Recover without being stored, and
//! a cluster with another master secret cannot decrypt. Ciphertext layout:
//! `version (1 byte) || nonce (12) || AES-256-GCM(plaintext) || tag (16)`, with the key ID as
//! associated data so a ciphertext cannot be presented under another key ID. Nonces are random:
//! the apiserver only wraps DEK seeds (a handful per rotation), far below the 2^32 messages
//! per key that random 96-bit nonces allow.
//!
//! Served on a unix socket (mode 0600) like every KMS plugin; the apiserver's
//! EncryptionConfiguration names it as `unix://<path>`.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use constellation_proto::kmsv2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use constellation_proto::kmsv2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::master::MasterSecret;

/// Data-key ID of the KMS v2 KEK (not UUID-shaped, so no joining node can ask for it as its
/// disk key: the join service accepts only disk UUIDs).
pub const KEK_KEY_ID: &str = "kubernetesKmsV2Kek1";
/// The KMS plugin API version the apiserver expects in `Status`.
pub const API_VERSION: &str = "v2";
/// Version byte at the start of every ciphertext.
const CIPHERTEXT_VERSION: u8 = 1;
const TAG_LEN: usize = 16;
/// Smallest well-formed ciphertext: version, nonce and tag around an empty plaintext.
pub const MIN_CIPHERTEXT_LEN: usize = 1 + NONCE_LEN + TAG_LEN;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KmsPluginError {
    #[error("ciphertext is {found} bytes; a ciphertext of this plugin has at least {MIN_CIPHERTEXT_LEN}")]
    Truncated { found: usize },
    #[error("ciphertext version {found} is not supported (expected {CIPHERTEXT_VERSION})")]
    UnknownVersion { found: u8 },
    #[error("ciphertext was written under key ID {found:?}, this plugin's key ID is {expected:?}")]
    KeyIdMismatch { expected: String, found: String },
    #[error(
        "ciphertext does not authenticate under key ID {key_id:?} (tampered, or another cluster's)"
    )]
    NotAuthentic { key_id: String },
    #[error("plaintext is empty")]
    EmptyPlaintext,
    #[error("deriving the KEK: {0}")]
    Kdf(#[from] constellation_common::kdf::KdfError),
    #[error("AES-256-GCM: {0}")]
    Crypto(String),
}

impl From<KmsPluginError> for Status {
    fn from(e: KmsPluginError) -> Self {
        match e {
            KmsPluginError::KeyIdMismatch { .. } => Status::failed_precondition(e.to_string()),
            KmsPluginError::Kdf(_) | KmsPluginError::Crypto(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

/// The KMS v2 plugin over one master secret.
pub struct KmsV2Plugin {
    kek: LessSafeKey,
    key_id: String,
}

impl std::fmt::Debug for KmsV2Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsV2Plugin")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KmsV2Plugin {
    /// Derives the KEK from the master secret. The key ID names the KEK by a hash of it, so it
    /// changes exactly when the master secret does (the apiserver then re-wraps its DEKs).
    pub fn new(master: &MasterSecret) -> Result<Self, KmsPluginError> {
        let kek = master.derive(KEK_KEY_ID, 32)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, kek.expose());
        let key_id = format!(
            "constellation-kek-v1-{}",
            hex::encode(&digest.as_ref()[..8])
        );
        let unbound = UnboundKey::new(&AES_256_GCM, kek.expose())
            .map_err(|e| KmsPluginError::Crypto(e.to_string()))?;
        Ok(Self {
            kek: LessSafeKey::new(unbound),
            key_id,
        })
    }

    /// The current key ID (reported by `Status`, returned by `Encrypt`).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Wraps `plaintext` (a DEK seed from the apiserver).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, KmsPluginError> {
        if plaintext.is_empty() {
            return Err(KmsPluginError::EmptyPlaintext);
        }
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|e| KmsPluginError::Crypto(e.to_string()))?;
        let mut sealed = plaintext.to_vec();
        self.kek
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.key_id.as_bytes()),
                &mut sealed,
            )
            .map_err(|e| KmsPluginError::Crypto(e.to_string()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(CIPHERTEXT_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Unwraps a ciphertext that [`Self::encrypt`] produced under `key_id`.
    pub fn decrypt(&self, ciphertext: &[u8], key_id: &str) -> Result<Vec<u8>, KmsPluginError> {
        if key_id != self.key_id {
            return Err(KmsPluginError::KeyIdMismatch {
                expected: self.key_id.clone(),
                found: key_id.to_owned(),
            });
        }
        if ciphertext.len() < MIN_CIPHERTEXT_LEN {
            return Err(KmsPluginError::Truncated {
                found: ciphertext.len(),
            });
        }
        if ciphertext[0] != CIPHERTEXT_VERSION {
            return Err(KmsPluginError::UnknownVersion {
                found: ciphertext[0],
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&ciphertext[1..1 + NONCE_LEN]);
        let mut sealed = ciphertext[1 + NONCE_LEN..].to_vec();
        let plain = self
            .kek
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key_id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| KmsPluginError::NotAuthentic {
                key_id: key_id.to_owned(),
            })?;
        Ok(plain.to_vec())
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsV2Plugin {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: API_VERSION.to_owned(),
            healthz: "ok".to_owned(),
            key_id: self.key_id.clone(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = request.into_inner();
        let ciphertext = self.encrypt(&r.plaintext)?;
        tracing::debug!(uid = %r.uid, key_id = %self.key_id, "KMS v2 encrypt");
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id: self.key_id.clone(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let r = request.into_inner();
        let plaintext = self.decrypt(&r.ciphertext, &r.key_id).inspect_err(|e| {
            tracing::warn!(uid = %r.uid, "KMS v2 decrypt refused: {e}");
        })?;
        Ok(Response::new(DecryptResponse { plaintext }))
    }
}

/// Why the plugin could not be served.
#[derive(Debug, thiserror::Error)]
pub enum KmsServeError {
    #[error("{path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KMS plugin transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `plugin` on the unix socket `path` (replacing a stale socket file, mode 0600) until
/// `shutdown` completes; the socket file is removed when it stops.
pub async fn serve_unix<F>(
    path: &Path,
    plugin: KmsV2Plugin,
    shutdown: F,
) -> Result<(), KmsServeError>
where
    F: Future<Output = ()> + Send,
{
    let socket_err = |source| KmsServeError::Socket {
        path: path.to_owned(),
        source,
    };
    // A stale socket from an earlier run is replaced; any other file at the path is not ours.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(socket_err)?,
        Ok(_) => {
            return Err(socket_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(socket_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
    let ours = std::fs::metadata(path).map_err(socket_err)?.ino();
    tracing::info!(socket = %path.display(), key_id = %plugin.key_id(), "KMS v2 plugin listening");
    tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    // A socket file without a listener would only make the apiserver's errors less clear; but
    // a successor may already have bound the same path, and its socket is not ours to remove.
    if std::fs::metadata(path).is_ok_and(|m| m.ino() == ours) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
