//! The aTLS exchange after the TLS handshake: messages, their length-prefixed JSON framing, and
//! the binding of evidence to the verifier's nonce and the TLS session (see the module doc of
//! [`crate::atls`]).

use std::sync::Arc;

use constellation_common::limits::WorkGate;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::AtlsError;
use crate::measurements::Digest;
use crate::variant::{Issuer, Validator, Verdict};

/// Exporter label for the session binding.
pub(super) const EXPORTER_LABEL: &[u8] = b"EXPORTER-constellation-atls-v1";
/// Domain separation for the evidence binding.
pub(super) const BINDING_DOMAIN: &[u8] = b"constellation-atls-v1";
/// Largest exchange frame accepted (evidence with an event log fits easily).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest challenge frame a server reads: version and a nonce of at most [`MAX_NONCE_LEN`]
/// bytes in hex fit in a few hundred bytes, so a client cannot make the server wait for (or
/// buffer) an evidence-sized frame before it spent anything.
pub const MAX_CHALLENGE_FRAME: usize = 1024;
pub(super) const NONCE_LEN: usize = 32;
/// Shortest and longest nonce a challenge may carry.
pub(super) const MIN_NONCE_LEN: usize = 16;
pub(super) const MAX_NONCE_LEN: usize = 64;

/// Which side produced evidence (prevents reflecting one side's evidence to the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
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

#[derive(Serialize, Deserialize)]
pub(super) struct Challenge {
    pub(super) version: u32,
    #[serde(with = "hex_bytes")]
    pub(super) nonce: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct EvidenceMessage {
    pub(super) version: u32,
    /// The nonce the attester says it bound (checked against ours for a clear replay error).
    #[serde(with = "hex_bytes")]
    pub(super) nonce: Vec<u8>,
    /// SHA-256 of the exporter value the attester saw (checked for a clear relay error).
    #[serde(with = "hex_bytes")]
    pub(super) session: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub(super) evidence: Vec<u8>,
    /// Mutual mode: the server's challenge to the client.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub(super) challenge: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Outcome {
    pub(super) ok: bool,
    #[serde(default)]
    pub(super) reason: String,
    /// Which check refused (absent from peers that predate it: then `reason` is all we know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) refusal: Option<crate::refusal::Refusal>,
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

pub(super) fn binding_for(role: Role, nonce: &[u8], session: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(BINDING_DOMAIN);
    h.update(role.label());
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update(session);
    h.finalize().into()
}

pub(super) fn session_id(exporter: &[u8]) -> Vec<u8> {
    Sha256::digest(exporter).to_vec()
}

pub(super) fn fresh_nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

pub(super) async fn write_frame<S: AsyncWrite + Unpin, T: Serialize>(
    s: &mut S,
    msg: &T,
) -> Result<(), AtlsError> {
    let body = serde_json::to_vec(msg).map_err(|e| AtlsError::Protocol(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(AtlsError::FrameTooLarge {
            length: body.len(),
            max: MAX_FRAME,
        });
    }
    // One buffer, so length and body travel in one TLS record.
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame).await?;
    s.flush().await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes. The buffer grows only as the body's bytes arrive:
/// a length prefix alone allocates nothing.
pub(super) async fn read_frame<S: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    s: &mut S,
    max: usize,
) -> Result<T, AtlsError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let length = u32::from_be_bytes(len) as usize;
    if length > max {
        return Err(AtlsError::FrameTooLarge { length, max });
    }
    let mut body = Vec::new();
    s.take(length as u64).read_to_end(&mut body).await?;
    if body.len() != length {
        return Err(AtlsError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {length} bytes", body.len()),
        )));
    }
    serde_json::from_slice(&body).map_err(|e| AtlsError::Protocol(e.to_string()))
}

pub(super) fn exporter<C>(conn: &rustls::ConnectionCommon<C>) -> Result<[u8; 32], AtlsError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)
        .map_err(|e| AtlsError::Tls(format!("exporter: {e}")))?;
    Ok(out)
}

/// Our evidence for the peer. Issuers talk to a TPM synchronously, so this runs on the
/// blocking pool; a server passes its quote gate so a flood of handshakes queues for the TPM
/// in order instead of piling up blocked threads.
pub(super) async fn issue(
    issuer: &Arc<dyn Issuer>,
    role: Role,
    nonce: &[u8],
    session: &[u8],
    gate: Option<&WorkGate>,
) -> Result<Vec<u8>, AtlsError> {
    let issuer = issuer.clone();
    let b = binding_for(role, nonce, session);
    let quote = move || issuer.issue(&b);
    let issued = match gate {
        Some(gate) => gate.run_blocking(quote).await?,
        None => tokio::task::spawn_blocking(quote)
            .await
            .map_err(|e| AtlsError::Protocol(format!("issuer task failed: {e}")))?,
    };
    issued.map_err(AtlsError::Issue)
}

/// Checks the claims and then the evidence of a peer in `role`.
pub(super) async fn check_peer(
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
