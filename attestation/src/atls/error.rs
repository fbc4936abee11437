//! Why an aTLS connection was refused.

use std::io;
use std::time::Duration;

use crate::variant::{IssueError, ValidationError};

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
    #[error("aTLS: exchange frame of {length} bytes exceeds the limit of {max}")]
    FrameTooLarge { length: usize, max: usize },
    #[error("aTLS: {0}")]
    Busy(#[from] constellation_common::limits::GateError),
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
