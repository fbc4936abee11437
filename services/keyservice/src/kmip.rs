//! External KMS over KMIP: the master secret is wrapped (AES-256-GCM, locally) by a KEK that lives
//! in a KMIP server. Only the wrapped blob and the KEK id are persisted, in
//! `<state_dir>/kmip-wrapped-master-secret.json`; after a restart the KEK is fetched with KMIP Get
//! and the blob unwrapped.
//!
//! Every KMIP exchange is synchronous and runs in `spawn_blocking`, one TLS session per attempt,
//! with bounded retries and exponential backoff when the server cannot be reached. The TLS
//! session is rustls (aws-lc-rs provider). kmip-protocol only builds the TTLV request messages
//! and kmip-ttlv parses the responses (size-capped, no TTLV diagnostics, which would log the KEK
//! returned by Get); the exchange itself is [`KmipSession::request`], because the crate's own
//! client module compiles only with one of its TLS connectors (OpenSSL or rustls 0.19).

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use constellation_common::secret::SecretBytes;
use kmip_protocol::types::common::{
    CryptographicAlgorithm, CryptographicUsageMask, KeyCompressionType, KeyFormatType, KeyMaterial,
    ObjectType, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    Attribute, KeyWrappingSpecification, RequestPayload, TemplateAttribute,
};
use kmip_protocol::types::response::{
    ManagedObject, ResponseMessage, ResponsePayload, ResultReason, ResultStatus,
};
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

/// Largest KMIP response read (a KEK Get answer is a few hundred bytes): a server that announces
/// more is refused before its bytes are buffered.
const MAX_RESPONSE_BYTES: u32 = 64 * 1024;

/// One TLS session with the KMIP server.
struct KmipSession {
    stream: StreamOwned<ClientConnection, TcpStream>,
}

impl KmipSession {
    /// Sends one request (a single batch item, no credentials: the TLS client certificate
    /// authenticates) and returns the payload of its successful answer.
    fn request(
        &mut self,
        operation: &'static str,
        payload: RequestPayload,
    ) -> Result<ResponsePayload, AttemptError> {
        use std::io::Write as _;
        let sent = payload.operation();
        let bytes = kmip_protocol::request::to_vec(payload, None).map_err(|e| {
            AttemptError::Fatal(BackendError::KmipSetup(format!("{operation} request: {e}")))
        })?;
        self.stream
            .write_all(&bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| AttemptError::Transient(format!("{operation}: sending: {e}")))?;
        let response = read_response(operation, &mut self.stream)?;
        answer_payload(operation, sent, response)
    }
}

/// Reads one TTLV response message, at most [`MAX_RESPONSE_BYTES`].
fn read_response(
    operation: &'static str,
    reader: impl std::io::Read,
) -> Result<ResponseMessage, AttemptError> {
    let config = kmip_ttlv::Config::new().with_max_bytes(MAX_RESPONSE_BYTES);
    kmip_ttlv::from_reader(reader, &config).map_err(|e| match e.kind() {
        kmip_ttlv::error::ErrorKind::IoError(io) => {
            AttemptError::Transient(format!("{operation}: reading the response: {io}"))
        }
        _ => rejected(operation, format!("malformed response: {e}")),
    })
}

fn rejected(operation: &'static str, reason: String) -> AttemptError {
    AttemptError::Rejected { operation, reason }
}

/// The payload of a response to one request of operation `sent`: exactly one batch item, which
/// succeeded and answers that operation; otherwise why not (the server's reason included).
fn answer_payload(
    operation: &'static str,
    sent: kmip_protocol::types::common::Operation,
    response: ResponseMessage,
) -> Result<ResponsePayload, AttemptError> {
    let [item] = <[_; 1]>::try_from(response.batch_items).map_err(|items: Vec<_>| {
        rejected(
            operation,
            format!(
                "expected one batch item in the response, got {}",
                items.len()
            ),
        )
    })?;
    match item.result_status {
        ResultStatus::Success => {}
        status => {
            let reason = match item.result_reason {
                Some(ResultReason::ItemNotFound) => "item not found".to_owned(),
                Some(reason) => format!("{reason:?}"),
                None => format!("{status:?}"),
            };
            let message = item.result_message.unwrap_or_default();
            return Err(rejected(operation, format!("{reason}: {message}")));
        }
    }
    if item.operation != Some(sent) {
        return Err(rejected(
            operation,
            format!("the response answers {:?}, not {sent:?}", item.operation),
        ));
    }
    item.payload
        .ok_or_else(|| rejected(operation, "the response carries no payload".to_owned()))
}

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
    fn open(&self) -> Result<KmipSession, AttemptError> {
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
        Ok(KmipSession {
            stream: StreamOwned::new(tls, tcp),
        })
    }

    /// KMIP Create of an AES-256 key named `name`, then Activate; returns its unique identifier.
    fn create_kek(&self, name: &str) -> Result<String, AttemptError> {
        let mut session = self.open()?;
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
        let id = match session.request("Create", request)? {
            ResponsePayload::Create(created) => created.unique_identifier.0,
            _ => {
                return Err(rejected(
                    "Create",
                    "response is not a Create payload".into(),
                ))
            }
        };
        let activate = RequestPayload::Activate(Some(UniqueIdentifier(id.clone())));
        match session.request("Activate", activate)? {
            ResponsePayload::Activate(_) => Ok(id),
            _ => Err(rejected(
                "Activate",
                "response is not an Activate payload".into(),
            )),
        }
    }

    /// KMIP Get of the KEK; it must be 32 raw bytes.
    fn get_kek(&self, kek_id: &str) -> Result<Zeroizing<Vec<u8>>, AttemptError> {
        let mut session = self.open()?;
        let get = RequestPayload::Get(
            Some(UniqueIdentifier(kek_id.to_owned())),
            Option::<KeyFormatType>::None,
            Option::<KeyCompressionType>::None,
            Option::<KeyWrappingSpecification>::None,
        );
        let ResponsePayload::Get(response) = session.request("Get", get)? else {
            return Err(rejected("Get", "response is not a Get payload".into()));
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use kmip_protocol::types::common::Operation;
    use kmip_protocol::types::response::{ActivateResponsePayload, BatchItem, ResponseHeader};

    fn item(status: ResultStatus, operation: Operation) -> BatchItem {
        BatchItem {
            operation: Some(operation),
            unique_batch_item_id: None,
            result_status: status,
            result_reason: None,
            result_message: None,
            payload: None,
            message_extension: None,
        }
    }

    fn message(batch_items: Vec<BatchItem>) -> ResponseMessage {
        ResponseMessage {
            header: ResponseHeader {
                protocol_version: kmip_protocol::types::response::ProtocolVersion {
                    major: 1,
                    minor: 0,
                },
                timestamp: 0,
                batch_count: batch_items.len() as i32,
            },
            batch_items,
        }
    }

    fn reason(result: Result<ResponsePayload, AttemptError>) -> String {
        match result {
            Err(AttemptError::Rejected { reason, .. }) => reason,
            Err(AttemptError::Transient(r)) => panic!("transient, expected rejected: {r}"),
            Err(AttemptError::Fatal(e)) => panic!("fatal, expected rejected: {e}"),
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    #[test]
    fn only_one_successful_answer_to_the_operation_sent_is_accepted() {
        let activated = || {
            let mut ok = item(ResultStatus::Success, Operation::Activate);
            ok.payload = Some(ResponsePayload::Activate(ActivateResponsePayload {
                unique_identifier: UniqueIdentifier("kek-1".into()),
            }));
            ok
        };
        assert!(matches!(
            answer_payload("Activate", Operation::Activate, message(vec![activated()])),
            Ok(ResponsePayload::Activate(_))
        ));
        let two = message(vec![activated(), activated()]);
        let r = reason(answer_payload("Activate", Operation::Activate, two));
        assert!(r.contains("one batch item") && r.contains('2'), "{r}");
        let r = reason(answer_payload(
            "Activate",
            Operation::Activate,
            message(vec![]),
        ));
        assert!(r.contains("got 0"), "{r}");
        let r = reason(answer_payload(
            "Get",
            Operation::Get,
            message(vec![activated()]),
        ));
        assert!(r.contains("Activate") && r.contains("not Get"), "{r}");
        let empty = item(ResultStatus::Success, Operation::Activate);
        let r = reason(answer_payload(
            "Activate",
            Operation::Activate,
            message(vec![empty]),
        ));
        assert!(r.contains("no payload"), "{r}");
    }

    #[test]
    fn a_failed_operation_carries_the_servers_reason_and_message() {
        let mut failed = item(ResultStatus::OperationFailed, Operation::Get);
        failed.result_reason = Some(ResultReason::ItemNotFound);
        failed.result_message = Some("no object with id kek-9".into());
        let r = reason(answer_payload("Get", Operation::Get, message(vec![failed])));
        assert!(r.contains("item not found") && r.contains("kek-9"), "{r}");
        let pending = item(ResultStatus::OperationPending, Operation::Get);
        let r = reason(answer_payload(
            "Get",
            Operation::Get,
            message(vec![pending]),
        ));
        assert!(r.contains("OperationPending"), "{r}");
    }

    #[test]
    fn an_oversized_or_truncated_response_is_refused_without_reading_it() {
        // A response message (tag 0x42007B, structure) announcing 1 MiB of content.
        let mut oversized = vec![0x42, 0x00, 0x7B, 0x01];
        oversized.extend_from_slice(&(1u32 << 20).to_be_bytes());
        let r = reason(read_response("Get", &oversized[..]).map(|_| unreachable!()));
        assert!(r.contains("exceeds the configured limit"), "{r}");
        // The header alone, then the connection ends: an I/O failure, worth a retry.
        let mut truncated = vec![0x42, 0x00, 0x7B, 0x01];
        truncated.extend_from_slice(&64u32.to_be_bytes());
        assert!(matches!(
            read_response("Get", &truncated[..]),
            Err(AttemptError::Transient(_))
        ));
    }
}
