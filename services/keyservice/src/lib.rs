//! The key service: data keys derived from the cluster's master secret.
//!
//! - [`master`]: the master secret and the [`MasterSecretBackend`] trait (where it comes from);
//!   backends [`cluster_managed::ClusterManagedBackend`] (a 0600 file on the state disk) and
//!   [`kmip::KmipBackend`] (wrapped by a KEK in an external KMS reached over KMIP).
//! - [`service`]: the gRPC `KeyService` (`GetDataKey` = HKDF as in `constellation_common::kdf`)
//!   and [`serve`], reachable only over mutual TLS.
//! - [`tls`]: reusable rustls plumbing for tonic (server incoming stream, client connector) and
//!   the mutual-TLS config builders.
//! - [`kmsplugin`]: the Kubernetes KMS v2 plugin (Status, Encrypt, Decrypt) over a unix socket,
//!   wrapping the apiserver's DEKs with a KEK derived from the master secret.
//! - [`master_material_files`]: the files of the master material a control plane hands a
//!   joining control plane, so that every control plane runs a key service.
//! - `testing` (feature `testing`): a small rcgen PKI and a real PyKMIP server launcher.

pub mod cluster_managed;
pub mod config;
pub mod kmip;
pub mod kmsplugin;
pub mod master;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub use constellation_common::tls;

use std::path::Path;

use constellation_common::secret::SecretBytes;

pub use master::{BackendError, MasterSecret, MasterSecretBackend};
pub use service::{serve, KeyService, ServeError};

/// The files, relative to a node's state directory, that hold the key service's master
/// material: the cluster-managed master secret, or the KMIP settings (endpoint, TLS material,
/// KEK id) and the KMIP-wrapped master secret. Handed to joining control planes (see
/// [`master_material_files`]), so every control plane can run a key service.
pub fn master_material_names() -> [String; 3] {
    let dir = config::MASTER_SECRET_DIR;
    [
        format!("{dir}/{}", cluster_managed::CLUSTER_SECRET_FILE),
        format!("{dir}/{}", kmip::SETTINGS_FILE),
        format!("{dir}/{}", kmip::WRAPPED_SECRET_FILE),
    ]
}

/// Whether `relative_path` names one of the [`master_material_names`].
pub fn is_master_material_file(relative_path: &str) -> bool {
    master_material_names().iter().any(|n| n == relative_path)
}

/// The key service's master material this node holds under `state_dir`, as
/// `(path relative to state_dir, content)`; files the node does not have are left out (none at
/// all on a node without master material). The contents are secret: never log them.
pub fn master_material_files(state_dir: &Path) -> Result<Vec<(String, SecretBytes)>, BackendError> {
    let mut files = Vec::new();
    for name in master_material_names() {
        match master::read_secret_file(&state_dir.join(&name)) {
            Ok(content) => files.push((name, SecretBytes::new(content.to_vec()))),
            Err(BackendError::NotInitialized { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

/// Writes one file of master material received from another control plane to
/// `state_dir/relative_path` (0600, atomically, in a 0700 directory). A file already there
/// with the same content is kept; one with another content is refused (the master material
/// of a cluster never changes), as is a name that is not one of the [`master_material_names`].
pub fn store_master_material_file(
    state_dir: &Path,
    relative_path: &str,
    content: &[u8],
) -> Result<(), BackendError> {
    let path = state_dir.join(relative_path);
    if !is_master_material_file(relative_path) {
        return Err(BackendError::CorruptFile {
            path,
            reason: "not a file of the key service's master material".into(),
        });
    }
    match master::read_secret_file(&path) {
        Ok(held) if held.as_slice() == content => return Ok(()),
        Ok(_) => return Err(BackendError::AlreadyInitialized { path }),
        Err(BackendError::NotInitialized { .. }) => {}
        Err(e) => return Err(e),
    }
    master::write_secret_file_atomically(&path, content)
}
