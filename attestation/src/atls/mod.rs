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
//!
//! Floods: a server runs under its [`ServerConfig::limits`] (`constellation_common::limits`):
//! the handshake and the exchange together must finish within the handshake timeout, the
//! client's challenge frame may be at most [`MAX_CHALLENGE_FRAME`] bytes (any other frame
//! [`MAX_FRAME`]), a frame's buffer grows only as its bytes arrive, and the server's TPM quotes
//! go through a small gate, so silent or garbage connections hold neither a slot nor memory.
//!
//! The module's parts, one job each:
//! - `protocol`: the exchange messages, their framing and the evidence binding;
//! - `verifiers`: the rustls pieces for ephemeral certificates (provider, identity, verifiers);
//! - `config`: [`ServerConfig`] / [`ClientConfig`], which run the handshake and the exchange;
//! - `transport`: the server side as a step of the accept loop of `constellation_common::tls`
//!   (one accept loop and one server stream for TLS and aTLS), the connector and [`channel`].

mod config;
mod error;
mod protocol;
mod transport;
mod verifiers;

pub use config::{ClientConfig, ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT};
pub use error::AtlsError;
pub use protocol::{binding, MAX_CHALLENGE_FRAME, MAX_FRAME};
pub use transport::{channel, connect, incoming, ConnectInfo, Connector, ServerStream};
