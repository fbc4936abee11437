//! External KMS over KMIP: the master secret is wrapped (AES-256-GCM, locally) by a KEK that lives
//! in a KMIP server. Only the wrapped blob and the KEK id are persisted, in
//! `<state_dir>/kmip-wrapped-master-secret.json`; after a restart the KEK is fetched with KMIP Get
//! and the blob unwrapped.
//!
//! kmip-protocol is synchronous: every KMIP exchange runs in `spawn_blocking`, one TLS session per
//! attempt, with bounded retries and exponential backoff when the server cannot be reached.
//! The TLS session is rustls (aws-lc-rs provider) rather than the crate's openssl connector because
//! that connector switches on the crate's TTLV diagnostics, which `trace!`-log every response —
//! including the KEK returned by Get.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use constellation_common::secret::SecretBytes;
use kmip_protocol::client::{Client, ClientBuilder, Error as KmipError};
use kmip_protocol::types::common::{
    CryptographicAlgorithm, CryptographicUsageMask, KeyMaterial, ObjectType,
};
use kmip_protocol::types::request::{Attribute, RequestPayload, TemplateAttribute};
use kmip_protocol::types::response::{ManagedObject, ResponsePayload};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::master::{
    decode_hex_field, json_error_reason, read_secret_file, write_secret_file_atomically,
    BackendError, BackendFuture, MasterSecret, MasterSecretBackend,
};

/// File name of the KMIP-wrapped master secret inside the state directory.
pub const WRAPPED_SECRET_FILE: &str = "kmip-wrapped-master-secret.json";

const FILE_VERSION: u32 = 1;
const KEK_LEN: usize = 32;

/// Which KEK wraps the master secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// Create a new AES-256 KEK with this name in the KMS when the master secret is stored.
    Create { name: String },
    /// Use an existing AES-256 KEK with this KMIP unique identifier.
    Existing { id: String },
}

/// Bounded retries with exponential backoff for a KMS that cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, at least 1.
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(3),
        }
    }
}

/// How to reach the KMIP server (mutual TLS) and which KEK to use.
pub struct KmipSettings {
    pub host: String,
    pub port: u16,
    /// CA certificates the KMIP server's certificate must chain to.
    pub ca_certificates: Vec<CertificateDer<'static>>,
    /// Client certificate chain (end entity first) and key presented to the KMIP server.
    pub client_cert_chain: Vec<CertificateDer<'static>>,
    pub client_key: PrivateKeyDer<'static>,
    pub kek: KekSource,
    pub retry: RetryPolicy,
    /// TCP connect, read and write timeout of one attempt.
    pub io_timeout: Duration,
}

impl fmt::Debug for KmipSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("kek", &self.kek)
            .field("retry", &self.retry)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

/// Everything one blocking KMIP attempt needs; shared with `spawn_blocking` tasks.
struct KmipConnection {
    endpoint: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    io_timeout: Duration,
}

type KmipClient = Client<StreamOwned<ClientConnection, TcpStream>>;

/// Outcome of one failed attempt: worth retrying or not.
enum AttemptError {
    /// The server could not be reached or the connection broke.
    Transient(String),
    /// The server answered and refused, or the TLS peer was rejected.
    Rejected {
        operation: &'static str,
        reason: String,
    },
    /// A local problem that retrying cannot fix.
    Fatal(BackendError),
}

impl KmipConnection {
    fn open(&self) -> Result<KmipClient, AttemptError> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| AttemptError::Transient(format!("resolving {}: {e}", self.endpoint)))?;
        let mut last_error = format!("{} resolved to no address", self.endpoint);
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.io_timeout) {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last_error = format!("connecting to {addr}: {e}"),
            }
        }
        let mut tcp = tcp.ok_or(AttemptError::Transient(last_error))?;
        let transient = |e: std::io::Error| AttemptError::Transient(e.to_string());
        tcp.set_read_timeout(Some(self.io_timeout))
            .map_err(transient)?;
        tcp.set_write_timeout(Some(self.io_timeout))
            .map_err(transient)?;
        tcp.set_nodelay(true).map_err(transient)?;
        let mut tls = ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(|e| AttemptError::Fatal(BackendError::KmipSetup(e.to_string())))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).map_err(|e| {
                // rustls reports protocol and certificate failures as InvalidData: the peer was
                // reached and rejected; anything else is the connection failing.
                if e.kind() == std::io::ErrorKind::InvalidData {
                    AttemptError::Rejected {
                        operation: "TLS handshake",
                        reason: e.to_string(),
                    }
                } else {
                    AttemptError::Transient(format!("TLS handshake: {e}"))
                }
            })?;
        }
        // Default reader config: no TTLV diagnostics, so nothing secret is logged.
        Ok(ClientBuilder::new(StreamOwned::new(tls, tcp)).build())
    }

    /// KMIP Create of an AES-256 key named `name`, then Activate; returns its unique identifier.
    fn create_kek(&self, name: &str) -> Result<String, AttemptError> {
        let client = self.open()?;
        // The name goes inside `unnamed(...)`: a template name makes PyKMIP refuse the request
        // ("Attribute templates are not supported").
        let request = RequestPayload::Create(
            ObjectType::SymmetricKey,
            TemplateAttribute::unnamed(vec![
                Attribute::Name(name.to_string()),
                Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
                Attribute::CryptographicLength(256),
                Attribute::CryptographicUsageMask(CryptographicUsageMask::Encrypt),
            ]),
        );
        let id = match client.do_request(request).map_err(classify("Create"))? {
            ResponsePayload::Create(created) => created.unique_identifier.0,
            _ => {
                return Err(AttemptError::Rejected {
                    operation: "Create",
                    reason: "response is not a Create payload".into(),
                })
            }
        };
        client.activate_key(&id).map_err(classify("Activate"))?;
        Ok(id)
    }

    /// KMIP Get of the KEK; it must be 32 raw bytes.
    fn get_kek(&self, kek_id: &str) -> Result<Zeroizing<Vec<u8>>, AttemptError> {
        let client = self.open()?;
        let response = client.get_key(kek_id).map_err(classify("Get"))?;
        let bad_kek = |reason: String| {
            AttemptError::Fatal(BackendError::BadKek {
                endpoint: self.endpoint.clone(),
                kek_id: kek_id.to_string(),
                reason,
            })
        };
        let ManagedObject::SymmetricKey(key) = response.cryptographic_object else {
            return Err(bad_kek(format!(
                "object type is {:?}, expected a symmetric key",
                response.object_type
            )));
        };
        let KeyMaterial::Bytes(bytes) = key.key_block.key_value.key_material else {
            return Err(bad_kek(format!(
                "key format {:?} is not raw bytes",
                key.key_block.key_format_type
            )));
        };
        let bytes = Zeroizing::new(bytes);
        if bytes.len() != KEK_LEN {
            return Err(bad_kek(format!(
                "key is {} bytes, expected {KEK_LEN}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

fn classify(operation: &'static str) -> impl Fn(KmipError) -> AttemptError {
    move |error| {
        if error.is_connection_error() {
            AttemptError::Transient(format!("{operation}: {error}"))
        } else {
            AttemptError::Rejected {
                operation,
                reason: error.to_string(),
            }
        }
    }
}

/// On-disk form of the wrapped master secret. Nothing in it is secret without the KEK.
#[derive(Serialize, Deserialize)]
struct WrappedSecretFile {
    version: u32,
    cluster_name: String,
    kek_id: String,
    nonce: String,
    /// AES-256-GCM(KEK, nonce, aad, u16-BE secret length || secret || salt) with the tag appended.
    wrapped: String,
}

/// Master secret wrapped by a KEK in a KMIP server.
pub struct KmipBackend {
    connection: Arc<KmipConnection>,
    kek: KekSource,
    retry: RetryPolicy,
    path: PathBuf,
    cluster_name: String,
}

impl fmt::Debug for KmipBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipBackend")
            .field("endpoint", &self.connection.endpoint)
            .field("kek", &self.kek)
            .field("path", &self.path)
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

impl KmipBackend {
    /// A backend keeping its wrapped blob in `state_dir`; `cluster_name` is bound into the
    /// wrapping (AAD), so a blob of another cluster does not unwrap here.
    pub fn new(
        settings: KmipSettings,
        state_dir: impl AsRef<Path>,
        cluster_name: impl Into<String>,
    ) -> Result<Self, BackendError> {
        let mut roots = RootCertStore::empty();
        for ca in settings.ca_certificates {
            roots
                .add(ca)
                .map_err(|e| BackendError::KmipSetup(format!("KMIP CA certificate: {e}")))?;
        }
        // PyKMIP and many KMS speak only TLS 1.2, so both versions are allowed.
        let tls = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| BackendError::KmipSetup(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(settings.client_cert_chain, settings.client_key)
            .map_err(|e| BackendError::KmipSetup(format!("KMIP client certificate: {e}")))?;
        let server_name = ServerName::try_from(settings.host.clone())
            .map_err(|e| BackendError::KmipSetup(format!("KMIP host {:?}: {e}", settings.host)))?;
        let endpoint = format!("{}:{}", settings.host, settings.port);
        Ok(Self {
            connection: Arc::new(KmipConnection {
                endpoint,
                host: settings.host,
                port: settings.port,
                server_name,
                tls: Arc::new(tls),
                io_timeout: settings.io_timeout,
            }),
            kek: settings.kek,
            retry: RetryPolicy {
                attempts: settings.retry.attempts.max(1),
                ..settings.retry
            },
            path: state_dir.as_ref().join(WRAPPED_SECRET_FILE),
            cluster_name: cluster_name.into(),
        })
    }

    /// The file holding the wrapped master secret.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `host:port` of the KMIP server.
    pub fn endpoint(&self) -> &str {
        &self.connection.endpoint
    }

    /// Runs one blocking KMIP exchange with bounded retries while the server is unreachable.
    async fn with_retries<T, F>(
        &self,
        operation: &'static str,
        exchange: F,
    ) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: Fn(&KmipConnection) -> Result<T, AttemptError> + Clone + Send + 'static,
    {
        let endpoint = self.connection.endpoint.clone();
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let connection = self.connection.clone();
            let exchange = exchange.clone();
            let outcome = tokio::task::spawn_blocking(move || exchange(&connection))
                .await
                .map_err(|e| BackendError::Worker(e.to_string()))?;
            match outcome {
                Ok(value) => return Ok(value),
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(AttemptError::Rejected { operation, reason }) => {
                    return Err(BackendError::KmsRejected {
                        endpoint,
                        operation,
                        reason,
                    })
                }
                Err(AttemptError::Transient(last_error)) => {
                    if attempt >= self.retry.attempts {
                        return Err(BackendError::KmsUnreachable {
                            endpoint,
                            attempts: attempt,
                            last_error,
                        });
                    }
                    tracing::warn!(
                        %endpoint, operation, attempt, max_attempts = self.retry.attempts,
                        error = %last_error, ?backoff, "KMS unreachable, retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }

    async fn fetch_kek(&self, kek_id: &str) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let kek_id = kek_id.to_string();
        self.with_retries("Get", move |c| c.get_kek(&kek_id)).await
    }

    fn aad(&self, kek_id: &str) -> Vec<u8> {
        format!(
            "constellation master secret v1\0cluster={}\0kek={kek_id}",
            self.cluster_name
        )
        .into_bytes()
    }

    async fn store_wrapped(&self, master: &MasterSecret) -> Result<(), BackendError> {
        // Check before touching the KMS: never replace an existing wrapped secret.
        if self.path.exists() {
            return Err(BackendError::AlreadyInitialized {
                path: self.path.clone(),
            });
        }
        let kek_id = match &self.kek {
            KekSource::Existing { id } => id.clone(),
            KekSource::Create { name } => {
                let name = name.clone();
                let id = self
                    .with_retries("Create", move |c| c.create_kek(&name))
                    .await?;
                tracing::info!(endpoint = %self.endpoint(), kek_id = %id, "created KEK in KMS");
                id
            }
        };
        let kek = self.fetch_kek(&kek_id).await?;

        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| BackendError::Random)?;
        let secret = master.secret().expose();
        let salt = master.salt().expose();
        let secret_len =
            u16::try_from(secret.len()).map_err(|_| BackendError::MasterSecretTooLong {
                max: u16::MAX as usize,
                secret_len: secret.len(),
                salt_len: salt.len(),
            })?;
        let mut in_out = Zeroizing::new(Vec::with_capacity(2 + secret.len() + salt.len() + 16));
        in_out.extend_from_slice(&secret_len.to_be_bytes());
        in_out.extend_from_slice(secret);
        in_out.extend_from_slice(salt);
        let key = aead_key(&kek)?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(&kek_id)),
            &mut *in_out,
        )
        .map_err(|_| BackendError::KmipSetup("AES-256-GCM sealing failed".into()))?;

        let file = WrappedSecretFile {
            version: FILE_VERSION,
            cluster_name: self.cluster_name.clone(),
            kek_id: kek_id.clone(),
            nonce: hex::encode(nonce),
            wrapped: hex::encode(&*in_out),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| BackendError::CorruptFile {
            path: self.path.clone(),
            reason: json_error_reason(&e),
        })?;
        write_secret_file_atomically(&self.path, &json)?;
        tracing::info!(
            endpoint = %self.endpoint(), %kek_id, path = %self.path.display(),
            "stored master secret wrapped by KMS key"
        );
        Ok(())
    }

    async fn load_wrapped(&self) -> Result<MasterSecret, BackendError> {
        let bytes = read_secret_file(&self.path)?;
        self.unwrap_blob(&bytes, &self.path).await
    }

    /// Unwraps a wrapped master secret in the form this backend stores (`source` names where
    /// it came from in errors, e.g. a copy in the state disk's header): fetches its KEK from
    /// the KMS and checks the cluster name it is bound to.
    pub async fn unwrap_blob(
        &self,
        bytes: &[u8],
        source: &Path,
    ) -> Result<MasterSecret, BackendError> {
        let corrupt = |reason: String| BackendError::CorruptFile {
            path: source.to_owned(),
            reason,
        };
        let file: WrappedSecretFile =
            serde_json::from_slice(bytes).map_err(|e| corrupt(json_error_reason(&e)))?;
        if file.version != FILE_VERSION {
            return Err(corrupt(format!(
                "version {} is not supported (expected {FILE_VERSION})",
                file.version
            )));
        }
        if file.cluster_name != self.cluster_name {
            return Err(BackendError::ClusterMismatch {
                path: source.to_owned(),
                expected: self.cluster_name.clone(),
                found: file.cluster_name,
            });
        }
        let nonce_bytes = decode_hex_field(source, "nonce", &file.nonce)?;
        let nonce = Nonce::try_assume_unique_for_key(&nonce_bytes).map_err(|_| {
            corrupt(format!(
                "nonce is {} bytes, expected {NONCE_LEN}",
                nonce_bytes.len()
            ))
        })?;
        let mut wrapped = decode_hex_field(source, "wrapped", &file.wrapped)?;

        let kek = self.fetch_kek(&file.kek_id).await?;
        let key = aead_key(&kek)?;
        let plaintext = key
            .open_in_place(nonce, Aad::from(self.aad(&file.kek_id)), &mut wrapped)
            .map_err(|_| BackendError::UnwrapFailed {
                path: source.to_owned(),
                kek_id: file.kek_id.clone(),
            })?;
        let (len_bytes, rest) = plaintext
            .split_first_chunk::<2>()
            .ok_or_else(|| corrupt("unwrapped secret is shorter than its length prefix".into()))?;
        let secret_len = usize::from(u16::from_be_bytes(*len_bytes));
        if rest.len() < secret_len {
            return Err(corrupt(format!(
                "unwrapped secret claims {secret_len} bytes but holds {}",
                rest.len()
            )));
        }
        let (secret, salt) = rest.split_at(secret_len);
        MasterSecret::new(
            SecretBytes::new(secret.to_vec()),
            SecretBytes::new(salt.to_vec()),
        )
    }
}

fn aead_key(kek: &[u8]) -> Result<LessSafeKey, BackendError> {
    UnboundKey::new(&AES_256_GCM, kek)
        .map(LessSafeKey::new)
        .map_err(|_| BackendError::KmipSetup("KEK is not a valid AES-256 key".into()))
}

impl MasterSecretBackend for KmipBackend {
    fn store<'a>(&'a self, master: &'a MasterSecret) -> BackendFuture<'a, ()> {
        Box::pin(self.store_wrapped(master))
    }

    fn load(&self) -> BackendFuture<'_, MasterSecret> {
        Box::pin(self.load_wrapped())
    }

    fn describe(&self) -> String {
        format!(
            "KMIP KMS at {} ({})",
            self.connection.endpoint,
            self.path.display()
        )
    }
}

/// File name of the node's KMIP settings inside the state directory.
pub const SETTINGS_FILE: &str = "kmip-settings.json";

/// The KMIP settings a node was initialized with (endpoint, TLS material including the client
/// key, KEK id), kept so that after a restart the node can ask the KMIP server again (Recover
/// checks that the KEK still unwraps the master secret). Persisted 0600 next to the wrapped
/// blob, on the state disk.
#[derive(Clone)]
pub struct StoredKmipSettings {
    /// `host:port`.
    pub endpoint: String,
    pub server_ca_pem: Vec<u8>,
    pub client_cert_pem: Vec<u8>,
    pub client_key_pem: SecretBytes,
    /// Empty: the node created the KEK (its id is in the wrapped blob).
    pub kek_id: String,
}

impl fmt::Debug for StoredKmipSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKmipSettings")
            .field("endpoint", &self.endpoint)
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

/// On-disk form of [`StoredKmipSettings`]; the hex of the client key is zeroized when dropped.
#[derive(Serialize, Deserialize)]
struct SettingsFile {
    version: u32,
    endpoint: String,
    server_ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    kek_id: String,
}

impl Drop for SettingsFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.client_key_pem);
    }
}

impl StoredKmipSettings {
    /// Writes `<state_dir>/kmip-settings.json` (0600, atomically; refuses to replace one).
    pub fn store(&self, state_dir: &Path) -> Result<(), BackendError> {
        let path = state_dir.join(SETTINGS_FILE);
        let file = SettingsFile {
            version: FILE_VERSION,
            endpoint: self.endpoint.clone(),
            server_ca_pem: hex::encode(&self.server_ca_pem),
            client_cert_pem: hex::encode(&self.client_cert_pem),
            client_key_pem: hex::encode(self.client_key_pem.expose()),
            kek_id: self.kek_id.clone(),
        };
        let json =
            Zeroizing::new(
                serde_json::to_vec(&file).map_err(|e| BackendError::CorruptFile {
                    path: path.clone(),
                    reason: json_error_reason(&e),
                })?,
            );
        write_secret_file_atomically(&path, &json)
    }

    /// Reads `<state_dir>/kmip-settings.json`; `None` when the node does not use KMIP.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, BackendError> {
        let path = state_dir.join(SETTINGS_FILE);
        let bytes = match read_secret_file(&path) {
            Ok(bytes) => bytes,
            Err(BackendError::NotInitialized { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let corrupt = |reason: String| BackendError::CorruptFile {
            path: path.clone(),
            reason,
        };
        let file: SettingsFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(json_error_reason(&e)))?;
        if file.version != FILE_VERSION {
            return Err(corrupt(format!(
                "version {} is not supported (expected {FILE_VERSION})",
                file.version
            )));
        }
        Ok(Some(Self {
            endpoint: file.endpoint.clone(),
            server_ca_pem: decode_hex_field(&path, "server_ca_pem", &file.server_ca_pem)?.to_vec(),
            client_cert_pem: decode_hex_field(&path, "client_cert_pem", &file.client_cert_pem)?
                .to_vec(),
            client_key_pem: SecretBytes::new(
                decode_hex_field(&path, "client_key_pem", &file.client_key_pem)?.to_vec(),
            ),
            kek_id: file.kek_id.clone(),
        }))
    }
}
