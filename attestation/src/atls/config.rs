//! The two ends' configurations, each running the TLS handshake and then the attestation
//! exchange of `super::protocol`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use constellation_common::limits::{ListenerLimits, WorkGate};

use super::protocol::{
    check_peer, exporter, fresh_nonce, issue, read_frame, session_id, write_frame, Challenge,
    EvidenceMessage, Outcome, Role, MAX_CHALLENGE_FRAME, MAX_FRAME, MAX_NONCE_LEN, MIN_NONCE_LEN,
};
use super::verifiers::{ephemeral_identity, provider, EvidenceIsIdentity};
use super::AtlsError;
use crate::variant::{Issuer, Validator, Verdict};

/// A client's handshake plus attestation exchange must finish within this time (the server's
/// bound is its [`ListenerLimits::handshake_timeout`]).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// The attesting server's side: proves itself with `issuer`; in mutual mode also requires the
/// client to attest to `client_validator`. Its [`ListenerLimits`] (default: the documented
/// defaults) bound the handshake's time, the listener's connections and its TPM quotes.
#[derive(Clone)]
pub struct ServerConfig {
    issuer: Arc<dyn Issuer>,
    client_validator: Option<Arc<dyn Validator>>,
    tls: Arc<rustls::ServerConfig>,
    limits: ListenerLimits,
    /// Shared by every connection of this config: the quotes it issues run a few at a time.
    quote_gate: WorkGate,
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
        let limits = ListenerLimits::default();
        Ok(Self {
            issuer,
            client_validator,
            tls: Arc::new(tls),
            quote_gate: limits.work_gate("TPM quote"),
            limits,
        })
    }

    /// The same identity under other limits (a fresh quote gate sized by them).
    pub fn with_limits(mut self, limits: ListenerLimits) -> Self {
        self.quote_gate = limits.work_gate("TPM quote");
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Runs the TLS handshake and the attestation exchange on an accepted connection, within
    /// the limits' handshake timeout.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<Verdict>), AtlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let timeout = self.limits.handshake_timeout;
        tokio::time::timeout(timeout, self.accept_unbounded(io))
            .await
            .map_err(|_| AtlsError::Timeout(timeout))?
    }

    /// [`Self::accept`] without its deadline: the accept loop of `constellation_common::tls`
    /// applies the same one to every handshake step.
    pub(super) async fn accept_unbounded<IO>(
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
        let challenge: Challenge = read_frame(&mut tls, MAX_CHALLENGE_FRAME).await?;
        if challenge.version != 1
            || !(MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&challenge.nonce.len())
        {
            return Err(AtlsError::Protocol(format!(
                "challenge version {} with a {}-byte nonce (need version 1, \
                 {MIN_NONCE_LEN}..={MAX_NONCE_LEN} bytes)",
                challenge.version,
                challenge.nonce.len()
            )));
        }
        let evidence = issue(
            &self.issuer,
            Role::Server,
            &challenge.nonce,
            &session,
            Some(&self.quote_gate),
        )
        .await?;
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
        let client_msg: EvidenceMessage = read_frame(&mut tls, MAX_FRAME).await?;
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
        let msg: EvidenceMessage = read_frame(&mut tls, MAX_FRAME).await?;
        let verdict = check_peer(&self.validator, Role::Server, &msg, &nonce, &session).await?;
        if let Some(issuer) = &self.issuer {
            if msg.challenge.len() < 16 {
                return Err(AtlsError::Protocol(
                    "server sent no challenge in mutual mode".into(),
                ));
            }
            let evidence = issue(issuer, Role::Client, &msg.challenge, &session, None).await?;
            let reply = EvidenceMessage {
                version: 1,
                nonce: msg.challenge,
                session,
                evidence,
                challenge: Vec::new(),
            };
            write_frame(&mut tls, &reply).await?;
            let outcome: Outcome = read_frame(&mut tls, MAX_FRAME).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atls::connect;
    use crate::measurements::Digest;
    use crate::testing::{software_policy, SoftwareIssuer, SoftwareValidator};
    use tokio::net::TcpListener;

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
