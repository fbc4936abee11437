//! Cluster-managed master secret: kept in a 0600 file in the node's state directory (which on a
//! node sits on the encrypted state disk).

use std::path::{Path, PathBuf};

use constellation_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::master::{
    decode_hex_field, json_error_reason, read_secret_file, write_secret_file_atomically,
    BackendError, BackendFuture, MasterSecret, MasterSecretBackend,
};

/// File name of the cluster-managed master secret inside the state directory.
pub const CLUSTER_SECRET_FILE: &str = "cluster-master-secret.json";

const FILE_VERSION: u32 = 1;

/// On-disk form; hex strings are zeroized when dropped.
#[derive(Serialize, Deserialize)]
struct ClusterSecretFile {
    version: u32,
    master_secret: String,
    salt: String,
}

impl Drop for ClusterSecretFile {
    fn drop(&mut self) {
        self.master_secret.zeroize();
        self.salt.zeroize();
    }
}

/// Master secret persisted in `<state_dir>/cluster-master-secret.json`.
#[derive(Debug, Clone)]
pub struct ClusterManagedBackend {
    path: PathBuf,
}

impl ClusterManagedBackend {
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        Self {
            path: state_dir.as_ref().join(CLUSTER_SECRET_FILE),
        }
    }

    /// The file holding the master secret.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store_blocking(&self, master: &MasterSecret) -> Result<(), BackendError> {
        let file = ClusterSecretFile {
            version: FILE_VERSION,
            master_secret: hex::encode(master.secret().expose()),
            salt: hex::encode(master.salt().expose()),
        };
        let json =
            Zeroizing::new(
                serde_json::to_vec(&file).map_err(|e| BackendError::CorruptFile {
                    path: self.path.clone(),
                    reason: json_error_reason(&e),
                })?,
            );
        write_secret_file_atomically(&self.path, &json)?;
        tracing::info!(path = %self.path.display(), "stored cluster-managed master secret");
        Ok(())
    }

    fn load_blocking(&self) -> Result<MasterSecret, BackendError> {
        let bytes = read_secret_file(&self.path)?;
        let corrupt = |reason: String| BackendError::CorruptFile {
            path: self.path.clone(),
            reason,
        };
        let file: ClusterSecretFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(json_error_reason(&e)))?;
        if file.version != FILE_VERSION {
            return Err(corrupt(format!(
                "version {} is not supported (expected {FILE_VERSION})",
                file.version
            )));
        }
        let secret = decode_hex_field(&self.path, "master_secret", &file.master_secret)?;
        let salt = decode_hex_field(&self.path, "salt", &file.salt)?;
        MasterSecret::new(
            SecretBytes::new(secret.to_vec()),
            SecretBytes::new(salt.to_vec()),
        )
    }
}

impl MasterSecretBackend for ClusterManagedBackend {
    fn store<'a>(&'a self, master: &'a MasterSecret) -> BackendFuture<'a, ()> {
        Box::pin(async move { self.store_blocking(master) })
    }

    fn load(&self) -> BackendFuture<'_, MasterSecret> {
        Box::pin(async move { self.load_blocking() })
    }

    fn describe(&self) -> String {
        format!("cluster-managed ({})", self.path.display())
    }
}
