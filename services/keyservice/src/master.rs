//! The master secret and where it comes from ([`MasterSecretBackend`]).

use std::fmt;
use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use constellation_common::secret::SecretBytes;
use constellation_common::secret_file::SecretFileError;
use zeroize::Zeroizing;

/// Length of a generated master secret and of its salt.
pub const MASTER_SECRET_LEN: usize = 32;

/// The cluster's master secret and salt: every data key is HKDF(secret, salt, "key-" + id).
/// `Debug` never prints either value.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterSecret {
    secret: SecretBytes,
    salt: SecretBytes,
}

impl MasterSecret {
    /// Wraps a given master secret and salt (from the init request). Both must be non-empty.
    pub fn new(secret: SecretBytes, salt: SecretBytes) -> Result<Self, BackendError> {
        if secret.is_empty() {
            return Err(BackendError::EmptyMasterSecret { part: "secret" });
        }
        if salt.is_empty() {
            return Err(BackendError::EmptyMasterSecret { part: "salt" });
        }
        if secret.len() > u16::MAX as usize || salt.len() > u16::MAX as usize {
            return Err(BackendError::MasterSecretTooLong {
                max: u16::MAX as usize,
                secret_len: secret.len(),
                salt_len: salt.len(),
            });
        }
        Ok(Self { secret, salt })
    }

    /// A fresh random master secret and salt of [`MASTER_SECRET_LEN`] bytes each.
    pub fn generate() -> Result<Self, BackendError> {
        let mut secret = vec![0u8; MASTER_SECRET_LEN];
        let mut salt = vec![0u8; MASTER_SECRET_LEN];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| BackendError::Random)?;
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| BackendError::Random)?;
        Self::new(SecretBytes::new(secret), SecretBytes::new(salt))
    }

    pub fn secret(&self) -> &SecretBytes {
        &self.secret
    }

    pub fn salt(&self) -> &SecretBytes {
        &self.salt
    }

    /// Derives the data key `key_id` of `len` bytes (see `constellation_common::kdf`).
    pub fn derive(
        &self,
        key_id: &str,
        len: usize,
    ) -> Result<SecretBytes, constellation_common::kdf::KdfError> {
        constellation_common::kdf::derive_key(self.secret.expose(), self.salt.expose(), key_id, len)
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterSecret")
            .field("secret", &self.secret)
            .field("salt", &self.salt)
            .finish()
    }
}

/// Boxed future returned by [`MasterSecretBackend`] methods (keeps the trait object-safe).
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Where the master secret comes from and where it is kept across restarts.
pub trait MasterSecretBackend: Send + Sync {
    /// Persists the master secret received at init. Refuses to replace an existing one.
    fn store<'a>(&'a self, master: &'a MasterSecret) -> BackendFuture<'a, ()>;
    /// Loads the master secret persisted by an earlier `store` (after a restart).
    fn load(&self) -> BackendFuture<'_, MasterSecret>;
    /// A short description for logs, e.g. "cluster-managed (/var/lib/...)"; never secret.
    fn describe(&self) -> String;
}

/// Why the master secret could not be stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("master {part} is empty")]
    EmptyMasterSecret { part: &'static str },
    #[error(
        "master secret ({secret_len} bytes) or salt ({salt_len} bytes) is longer than {max} bytes"
    )]
    MasterSecretTooLong {
        max: usize,
        secret_len: usize,
        salt_len: usize,
    },
    #[error("the system random generator failed")]
    Random,
    #[error("no master secret stored yet: {path} does not exist")]
    NotInitialized { path: PathBuf },
    #[error("a master secret is already stored at {path}; refusing to replace it")]
    AlreadyInitialized { path: PathBuf },
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid master secret file: {reason}")]
    CorruptFile { path: PathBuf, reason: String },
    #[error("{path} was written for cluster {found:?}, this node belongs to cluster {expected:?}")]
    ClusterMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("KMS at {endpoint} unreachable after {attempts} attempt(s): {last_error}")]
    KmsUnreachable {
        endpoint: String,
        attempts: u32,
        last_error: String,
    },
    #[error("KMS at {endpoint} refused {operation}: {reason}")]
    KmsRejected {
        endpoint: String,
        operation: &'static str,
        reason: String,
    },
    #[error("KEK {kek_id} from KMS at {endpoint} is not an AES-256 key: {reason}")]
    BadKek {
        endpoint: String,
        kek_id: String,
        reason: String,
    },
    #[error("unwrapping {path} with KEK {kek_id} failed: wrong KEK or the file was modified")]
    UnwrapFailed { path: PathBuf, kek_id: String },
    #[error("KMIP client setup failed: {0}")]
    KmipSetup(String),
    #[error("a KMS worker task failed: {0}")]
    Worker(String),
}

/// Reads a whole file into zeroized memory, mapping "missing" to [`BackendError::NotInitialized`].
pub(crate) fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Zeroizing::new(bytes)),
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            Err(BackendError::NotInitialized {
                path: path.to_path_buf(),
            })
        }
        Err(source) => Err(BackendError::Io {
            operation: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `contents` to `path` atomically with mode 0600 in a 0700 directory
/// ([`constellation_common::secret_file`]: a random, exclusively created temporary in the same
/// directory, synced and renamed; a planted temporary fails the write). A crash leaves either no
/// file or the complete one. Refuses if `path` already exists.
pub(crate) fn write_secret_file_atomically(
    path: &Path,
    contents: &[u8],
) -> Result<(), BackendError> {
    use constellation_common::secret_file::{ensure_private_dir, write_private_atomic};
    if path.exists() {
        return Err(BackendError::AlreadyInitialized {
            path: path.to_path_buf(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_private_dir(dir)
        .and_then(|()| write_private_atomic(path, contents))
        .map_err(|e| match e {
            SecretFileError::Io {
                operation,
                path,
                source,
            } => BackendError::Io {
                operation,
                path,
                source,
            },
            other => BackendError::Io {
                operation: "writing",
                path: path.to_path_buf(),
                source: other.into(),
            },
        })
}

/// Describes a JSON parse error without echoing any of the (secret) input.
pub(crate) fn json_error_reason(error: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// Decodes a hex field without echoing its content in the error.
pub(crate) fn decode_hex_field(
    path: &Path,
    field: &'static str,
    value: &str,
) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    hex::decode(value)
        .map(Zeroizing::new)
        .map_err(|_| BackendError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("field {field} is not valid hex"),
        })
}
