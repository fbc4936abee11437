//! Attested TLS (aTLS): a TLS 1.3 channel (rustls, aws-lc-rs provider) whose first exchange
//! carries attestation evidence bound to a fresh nonce from the verifier **and** to this TLS
//! session.
//!
//! The certificates are ephemeral and self-signed; the peer's identity comes only from the
//! evidence. Right after the handshake both ends compute the RFC 5705/8446 exporter value for
//! the session. The attester's evidence binds
//! `SHA-256("constellation-atls-v1" || role || verifier nonce || exporter)`, so:
//! - replayed evidence fails (it binds an old nonce: [`AtlsError::StaleNonce`]);
//! - a relay fails: an attacker terminating TLS and forwarding a genuine node's evidence from
//!   its own session to that node presents evidence bound to *that* session's exporter
//!   ([`AtlsError::SessionMismatch`]);
//! - wrong measurements fail in the validator ([`AtlsError::Rejected`]).
//!
//! Exchange after the handshake (frames are a u32 big-endian length then a JSON body):
//! ```text
//! server-only:  C -> S  Challenge{nonce_c}
//!               S -> C  Evidence{bound to nonce_c}            (client validates)
//! mutual:       C -> S  Challenge{nonce_c}
//!               S -> C  Evidence{bound to nonce_c} + nonce_s  (client validates)
//!               C -> S  Evidence{bound to nonce_s}            (server validates)
//! ```
//! Only when the peer's evidence is accepted is the stream handed to the application (gRPC),
//! so no secret is ever sent to an unattested peer.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::measurements::Digest;
use crate::variant::{IssueError, Issuer, ValidationError, Validator, Verdict};

/// Exporter label for the session binding.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-constellation-atls-v1";
/// Domain separation for the evidence binding.
const BINDING_DOMAIN: &[u8] = b"constellation-atls-v1";
/// Largest exchange frame accepted (evidence with an event log fits easily).
pub const MAX_FRAME: usize = 1 << 20;
/// Handshake plus attestation exchange must finish within this time.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
const NONCE_LEN: usize = 32;

/// Which side produced evidence (prevents reflecting one side's evidence to the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Server => b"server",
            Role::Client => b"client",
        }
    }
}

/// Why an aTLS connection was refused. Each case is a distinct check.
#[derive(Debug, thiserror::Error)]
pub enum AtlsError {
    #[error("aTLS: I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("aTLS: TLS error: {0}")]
    Tls(String),
    #[error("aTLS: handshake and attestation did not finish within {0:?}")]
    Timeout(Duration),
    #[error("aTLS: malformed exchange message: {0}")]
    Protocol(String),
    #[error("aTLS: peer's evidence answers another nonce (replayed evidence?): expected {expected}, found {found}")]
    StaleNonce { expected: String, found: String },
    #[error("aTLS: peer's evidence is bound to another TLS session (relay?): expected {expected}, found {found}")]
    SessionMismatch { expected: String, found: String },
    #[error("aTLS: peer's attestation was rejected: {0}")]
    Rejected(#[from] ValidationError),
    #[error("aTLS: could not produce own evidence: {0}")]
    Issue(#[from] IssueError),
    #[error("aTLS: the peer refused our attestation: {0}")]
    PeerRefused(crate::refusal::Refusal),
}

impl AtlsError {
    /// Finds an `AtlsError` in an error's source chain (tonic wraps connector errors).
    pub fn find_in<'a>(mut err: &'a (dyn std::error::Error + 'static)) -> Option<&'a AtlsError> {
        loop {
            if let Some(e) = err.downcast_ref::<AtlsError>() {
                return Some(e);
            }
            if let Some(e) = err.downcast_ref::<io::Error>() {
                if let Some(inner) = e.get_ref() {
                    if let Some(a) = inner.downcast_ref::<AtlsError>() {
                        return Some(a);
                    }
                }
            }
            err = err.source()?;
        }
    }
}

impl From<AtlsError> for io::Error {
    fn from(e: AtlsError) -> Self {
        match e {
            AtlsError::Io(io) => io,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    version: u32,
    #[serde(with = "hex_bytes")]
    nonce: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct EvidenceMessage {
    version: u32,
    /// The nonce the attester says it bound (checked against ours for a clear replay error).
    #[serde(with = "hex_bytes")]
    nonce: Vec<u8>,
    /// SHA-256 of the exporter value the attester saw (checked for a clear relay error).
    #[serde(with = "hex_bytes")]
    session: Vec<u8>,
    #[serde(with = "hex_bytes")]
    evidence: Vec<u8>,
    /// Mutual mode: the server's challenge to the client.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    challenge: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Outcome {
    ok: bool,
    #[serde(default)]
    reason: String,
    /// Which check refused (absent from peers that predate it: then `reason` is all we know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refusal: Option<crate::refusal::Refusal>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The value evidence must bind for a given role, nonce and session exporter.
pub fn binding(role_is_server: bool, nonce: &[u8], exporter: &[u8]) -> Digest {
    let role = if role_is_server {
        Role::Server
    } else {
        Role::Client
    };
    binding_for(role, nonce, &session_id(exporter))
}

fn binding_for(role: Role, nonce: &[u8], session: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(BINDING_DOMAIN);
    h.update(role.label());
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update(session);
    h.finalize().into()
}

fn session_id(exporter: &[u8]) -> Vec<u8> {
    Sha256::digest(exporter).to_vec()
}

fn fresh_nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn write_frame<S: AsyncWrite + Unpin, T: Serialize>(
    s: &mut S,
    msg: &T,
) -> Result<(), AtlsError> {
    let body = serde_json::to_vec(msg).map_err(|e| AtlsError::Protocol(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(AtlsError::Protocol(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    // One buffer, so length and body travel in one TLS record.
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame).await?;
    s.flush().await?;
    Ok(())
}

async fn read_frame<S: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    s: &mut S,
) -> Result<T, AtlsError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(AtlsError::Protocol(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| AtlsError::Protocol(e.to_string()))
}

fn exporter<C>(conn: &rustls::ConnectionCommon<C>) -> Result<[u8; 32], AtlsError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)
        .map_err(|e| AtlsError::Tls(format!("exporter: {e}")))?;
    Ok(out)
}

async fn issue(
    issuer: &Arc<dyn Issuer>,
    role: Role,
    nonce: &[u8],
    session: &[u8],
) -> Result<Vec<u8>, AtlsError> {
    let issuer = issuer.clone();
    let b = binding_for(role, nonce, session);
    // Issuers talk to a TPM synchronously; keep that off the async workers.
    tokio::task::spawn_blocking(move || issuer.issue(&b))
        .await
        .map_err(|e| AtlsError::Protocol(format!("issuer task failed: {e}")))?
        .map_err(AtlsError::Issue)
}

/// Checks the claims and then the evidence of a peer in `role`.
async fn check_peer(
    validator: &Arc<dyn Validator>,
    role: Role,
    msg: &EvidenceMessage,
    our_nonce: &[u8],
    our_session: &[u8],
) -> Result<Verdict, AtlsError> {
    if msg.nonce != our_nonce {
        return Err(AtlsError::StaleNonce {
            expected: hex::encode(our_nonce),
            found: hex::encode(&msg.nonce),
        });
    }
    if msg.session != our_session {
        return Err(AtlsError::SessionMismatch {
            expected: hex::encode(our_session),
            found: hex::encode(&msg.session),
        });
    }
    let b = binding_for(role, our_nonce, our_session);
    let validator = validator.clone();
    let evidence = msg.evidence.clone();
    tokio::task::spawn_blocking(move || validator.validate(&evidence, &b))
        .await
        .map_err(|e| AtlsError::Protocol(format!("validator task failed: {e}")))?
        .map_err(AtlsError::Rejected)
}

/// aws-lc-rs with the SHA-256 TLS 1.3 suites preferred: AES-128-GCM and ChaCha20 are as
/// strong a choice for these short-lived sessions, and SHA-384 costs more per handshake.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// The self-signed certificate and key of one config (made once per config, not per connection).
/// Ed25519: each handshake signs once and verifies the peer's signature once, and an Ed25519
/// verification costs about a third less than a P-256 one (aws-lc-rs). The peer's key only has
/// to hold for the handshake; identity comes from the evidence bound to the session.
fn ephemeral_identity() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), AtlsError> {
    let signing_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| AtlsError::Tls(format!("ephemeral key: {e}")))?;
    let cert = rcgen::CertificateParams::new(vec!["constellation-atls".to_owned()])
        .and_then(|p| p.self_signed(&signing_key))
        .map_err(|e| AtlsError::Tls(format!("ephemeral certificate: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    Ok((cert.der().clone(), key))
}

/// Accepts any certificate (identity comes from the evidence) but still checks that the peer
/// holds the certificate's key (the TLS 1.3 CertificateVerify signature).
#[derive(Debug)]
struct EvidenceIsIdentity(Arc<CryptoProvider>);

impl ServerCertVerifier for EvidenceIsIdentity {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for EvidenceIsIdentity {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The attesting server's side: proves itself with `issuer`; in mutual mode also requires the
/// client to attest to `client_validator`.
#[derive(Clone)]
pub struct ServerConfig {
    issuer: Arc<dyn Issuer>,
    client_validator: Option<Arc<dyn Validator>>,
    tls: Arc<rustls::ServerConfig>,
    timeout: Duration,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("atls::ServerConfig")
            .field("variant", &self.issuer.variant())
            .field("mutual", &self.client_validator.is_some())
            .finish()
    }
}

impl ServerConfig {
    /// Server-only attestation (init, verify, recover).
    pub fn server_only(issuer: Arc<dyn Issuer>) -> Result<Self, AtlsError> {
        Self::build(issuer, None)
    }

    /// Mutual attestation (join): the client must attest to `client_validator` too.
    pub fn mutual(
        issuer: Arc<dyn Issuer>,
        client_validator: Arc<dyn Validator>,
    ) -> Result<Self, AtlsError> {
        Self::build(issuer, Some(client_validator))
    }

    fn build(
        issuer: Arc<dyn Issuer>,
        client_validator: Option<Arc<dyn Validator>>,
    ) -> Result<Self, AtlsError> {
        let provider = provider();
        let (cert, key) = ephemeral_identity()?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AtlsError::Tls(e.to_string()))?;
        let builder = if client_validator.is_some() {
            builder.with_client_cert_verifier(Arc::new(EvidenceIsIdentity(provider)))
        } else {
            builder.with_no_client_auth()
        };
        let mut tls = builder
            .with_single_cert(vec![cert], key)
            .map_err(|e| AtlsError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: every connection is a full handshake with fresh ephemeral key shares
        // and is attested anew, so session tickets (2 per connection by default, each stored
        // with the client's certificate) would only cost work and memory.
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            issuer,
            client_validator,
            tls: Arc::new(tls),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the TLS handshake and the attestation exchange on an accepted connection.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<Verdict>), AtlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::time::timeout(self.timeout, self.accept_inner(io))
            .await
            .map_err(|_| AtlsError::Timeout(self.timeout))?
    }

    async fn accept_inner<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<Verdict>), AtlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut tls = tokio_rustls::TlsAcceptor::from(self.tls.clone())
            .accept(io)
            .await
            .map_err(|e| AtlsError::Tls(e.to_string()))?;
        let session = session_id(&exporter(tls.get_ref().1)?);
        let challenge: Challenge = read_frame(&mut tls).await?;
        if challenge.version != 1 || challenge.nonce.len() < 16 {
            return Err(AtlsError::Protocol(format!(
                "challenge version {} with a {}-byte nonce (need version 1, at least 16 bytes)",
                challenge.version,
                challenge.nonce.len()
            )));
        }
        let evidence = issue(&self.issuer, Role::Server, &challenge.nonce, &session).await?;
        let our_nonce = if self.client_validator.is_some() {
            fresh_nonce()
        } else {
            Vec::new()
        };
        let msg = EvidenceMessage {
            version: 1,
            nonce: challenge.nonce,
            session: session.clone(),
            evidence,
            challenge: our_nonce.clone(),
        };
        write_frame(&mut tls, &msg).await?;
        let Some(validator) = &self.client_validator else {
            return Ok((tls, None));
        };
        let client_msg: EvidenceMessage = read_frame(&mut tls).await?;
        match check_peer(validator, Role::Client, &client_msg, &our_nonce, &session).await {
            Ok(verdict) => {
                write_frame(
                    &mut tls,
                    &Outcome {
                        ok: true,
                        reason: String::new(),
                        refusal: None,
                    },
                )
                .await?;
                Ok((tls, Some(verdict)))
            }
            Err(e) => {
                // Tell the client why, then drop the connection.
                let _ = write_frame(
                    &mut tls,
                    &Outcome {
                        ok: false,
                        reason: e.to_string(),
                        refusal: Some((&e).into()),
                    },
                )
                .await;
                Err(e)
            }
        }
    }
}

/// The verifying client's side: accepts the server only if `validator` accepts its evidence; in
/// mutual mode it attests itself with `issuer`.
#[derive(Clone)]
pub struct ClientConfig {
    validator: Arc<dyn Validator>,
    issuer: Option<Arc<dyn Issuer>>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("atls::ClientConfig")
            .field("variant", &self.validator.variant())
            .field("mutual", &self.issuer.is_some())
            .finish()
    }
}

impl ClientConfig {
    /// Verify the server only.
    pub fn server_only(validator: Arc<dyn Validator>) -> Result<Self, AtlsError> {
        Self::build(validator, None)
    }

    /// Verify the server and attest to it with `issuer`.
    pub fn mutual(
        validator: Arc<dyn Validator>,
        issuer: Arc<dyn Issuer>,
    ) -> Result<Self, AtlsError> {
        Self::build(validator, Some(issuer))
    }

    fn build(
        validator: Arc<dyn Validator>,
        issuer: Option<Arc<dyn Issuer>>,
    ) -> Result<Self, AtlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AtlsError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EvidenceIsIdentity(provider)));
        let mut tls = if issuer.is_some() {
            let (cert, key) = ephemeral_identity()?;
            builder
                .with_client_auth_cert(vec![cert], key)
                .map_err(|e| AtlsError::Tls(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];
        // Never resume (see the server side): a full handshake with fresh key shares each time.
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            validator,
            issuer,
            tls: Arc::new(tls),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the TLS handshake and the attestation exchange over `io`.
    pub async fn connect<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, Verdict), AtlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::time::timeout(self.timeout, self.connect_inner(io))
            .await
            .map_err(|_| AtlsError::Timeout(self.timeout))?
    }

    async fn connect_inner<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::client::TlsStream<IO>, Verdict), AtlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from("constellation-atls")
            .map_err(|e| AtlsError::Tls(e.to_string()))?;
        let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, io)
            .await
            .map_err(|e| AtlsError::Tls(e.to_string()))?;
        let session = session_id(&exporter(tls.get_ref().1)?);
        let nonce = fresh_nonce();
        write_frame(
            &mut tls,
            &Challenge {
                version: 1,
                nonce: nonce.clone(),
            },
        )
        .await?;
        let msg: EvidenceMessage = read_frame(&mut tls).await?;
        let verdict = check_peer(&self.validator, Role::Server, &msg, &nonce, &session).await?;
        if let Some(issuer) = &self.issuer {
            if msg.challenge.len() < 16 {
                return Err(AtlsError::Protocol(
                    "server sent no challenge in mutual mode".into(),
                ));
            }
            let evidence = issue(issuer, Role::Client, &msg.challenge, &session).await?;
            let reply = EvidenceMessage {
                version: 1,
                nonce: msg.challenge,
                session,
                evidence,
                challenge: Vec::new(),
            };
            write_frame(&mut tls, &reply).await?;
            let outcome: Outcome = read_frame(&mut tls).await?;
            if !outcome.ok {
                let refusal = outcome
                    .refusal
                    .unwrap_or_else(|| crate::refusal::Refusal::other(&outcome.reason));
                return Err(AtlsError::PeerRefused(refusal));
            }
        }
        Ok((tls, verdict))
    }
}

/// What a server learns about an accepted connection; available to gRPC handlers as a request
/// extension (`request.extensions().get::<ConnectInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The client's accepted attestation (mutual mode only).
    pub peer: Option<Verdict>,
}

/// An accepted, attested server-side connection, ready for tonic.
pub struct ServerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnectInfo,
}

impl fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("atls::ServerStream")
            .field("info", &self.info)
            .finish()
    }
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = ConnectInfo;
    fn connect_info(&self) -> ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener`, runs each handshake concurrently, and yields only the
/// attested ones (failures are logged with their reason and dropped). Feed the stream to
/// `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: ServerConfig,
) -> tokio_stream::wrappers::ReceiverStream<Result<ServerStream, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "aTLS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let config = config.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match config.accept(tcp).await {
                    Ok((inner, peer)) => {
                        let info = ConnectInfo {
                            remote_addr: Some(addr),
                            peer,
                        };
                        let _ = tx.send(Ok(ServerStream { inner, info })).await;
                    }
                    Err(e) => tracing::warn!(peer = %addr, error = %e, "aTLS connection refused"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A tower connector for `tonic::transport::Endpoint::connect_with_connector`: dials TCP, runs
/// aTLS, and records the server's verdict in [`Connector::last_verdict`]. A connection that was
/// already attested (see [`channel`]) is used first, so its typed errors reach the caller.
#[derive(Clone, Debug)]
pub struct Connector {
    config: ClientConfig,
    last_verdict: Arc<Mutex<Option<Verdict>>>,
    preconnected: Arc<Mutex<Option<ClientTls>>>,
}

impl Connector {
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            last_verdict: Arc::new(Mutex::new(None)),
            preconnected: Arc::new(Mutex::new(None)),
        }
    }

    /// The verdict on the most recently attested server.
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.last_verdict.lock().ok().and_then(|v| v.clone())
    }
}

/// Dials `addr` ("host:port") and runs the aTLS handshake.
pub async fn connect(addr: &str, config: &ClientConfig) -> Result<(ClientTls, Verdict), AtlsError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    config.connect(tcp).await
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<hyper_util::rt::TokioIo<ClientTls>, AtlsError>> + Send>>;

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientTls>;
    type Error = AtlsError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        let slot = self.last_verdict.clone();
        let pre = self.preconnected.lock().ok().and_then(|mut p| p.take());
        Box::pin(async move {
            if let Some(tls) = pre {
                return Ok(hyper_util::rt::TokioIo::new(tls));
            }
            let host = uri
                .host()
                .ok_or_else(|| AtlsError::Protocol(format!("URI {uri} has no host")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| AtlsError::Protocol(format!("URI {uri} has no port")))?;
            let addr = format!("{host}:{port}");
            let (tls, verdict) = connect(&addr, &config).await?;
            if let Ok(mut s) = slot.lock() {
                *s = Some(verdict);
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Dials `addr` ("host:port") over aTLS and returns a tonic channel plus the server's verdict.
/// The first connection is attested here, so a refusal comes back as its typed [`AtlsError`];
/// reconnects attest again.
pub async fn channel(
    addr: &str,
    config: ClientConfig,
) -> Result<(tonic::transport::Channel, Verdict), AtlsError> {
    let (tls, verdict) = connect(addr, &config).await?;
    let connector = Connector::new(config);
    if let Ok(mut s) = connector.last_verdict.lock() {
        *s = Some(verdict.clone());
    }
    if let Ok(mut p) = connector.preconnected.lock() {
        *p = Some(tls);
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| AtlsError::Protocol(format!("bad address {addr:?}: {e}")))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| AtlsError::Io(io::Error::other(format!("gRPC connection to {addr}: {e}"))))?;
    Ok((channel, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{software_policy, SoftwareIssuer, SoftwareValidator};

    /// Every connection is a full handshake (no session resumption, no tickets) with the
    /// ephemeral Ed25519 certificates, and attests again.
    #[tokio::test]
    async fn every_connection_is_a_full_handshake_and_attested_again() {
        const PCR: Digest = [7u8; 32];
        let server_issuer = SoftwareIssuer::new(PCR);
        let client_issuer = SoftwareIssuer::new(PCR);
        let server = ServerConfig::mutual(
            server_issuer.clone(),
            SoftwareValidator::new(client_issuer.public(), software_policy(PCR)),
        )
        .unwrap();
        let client = ClientConfig::mutual(
            SoftwareValidator::new(server_issuer.public(), software_policy(PCR)),
            client_issuer.clone(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepting = tokio::spawn(async move {
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let (tls, verdict) = server.accept(tcp).await.unwrap();
                assert!(verdict.is_some());
                let conn = tls.get_ref().1;
                assert_eq!(
                    conn.negotiated_cipher_suite().map(|s| s.suite()),
                    Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
                );
                kinds.push(conn.handshake_kind());
            }
            kinds
        });
        let mut evidence = Vec::new();
        for _ in 0..2 {
            let (tls, verdict) = connect(&addr, &client).await.unwrap();
            assert_eq!(verdict.ak_fingerprint, server_issuer.ak_fingerprint());
            let conn = tls.get_ref().1;
            assert_eq!(conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
            let cert = conn.peer_certificates().unwrap()[0].clone();
            let cert = <x509_cert::Certificate as der::Decode>::from_der(cert.as_ref()).unwrap();
            assert_eq!(
                cert.tbs_certificate.subject_public_key_info.algorithm.oid,
                const_oid::db::rfc8410::ID_ED_25519
            );
            evidence.push(client_issuer.last_evidence().unwrap());
        }
        assert_ne!(
            evidence[0], evidence[1],
            "fresh nonce and session each time"
        );
        let kinds = accepting.await.unwrap();
        assert_eq!(kinds, vec![Some(rustls::HandshakeKind::Full); 2]);
    }
}
