//! Client side of a node's bootstrapper API (port 9000): open a channel only after the node
//! attested over server-only aTLS, then send `Init` (follow its progress stream to the
//! `InitSuccess`) or `Recover`. The provider, `attest recover` and the tests share it, so the
//! meaning of each answer (which gRPC code says what, see `init.proto` and `recover.proto`) is
//! decided here once, as typed errors.

use std::sync::Arc;

use constellation_attestation::atls::{self, AtlsError, ClientConfig};
use constellation_attestation::{Validator, Verdict};
use constellation_proto::init::{
    init_response::Kind, init_service_client::InitServiceClient, InitRequest, InitSuccess,
};
use constellation_proto::recover::{
    recover_service_client::RecoverServiceClient, RecoverRequest, RecoverResponse,
};
use tonic::transport::Channel;

/// The node at an endpoint could not be reached or did not attest.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("cannot reach the bootstrapper at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: AtlsError,
    },
    #[error("the bootstrapper at {endpoint} did not attest: {source}")]
    Refused {
        endpoint: String,
        #[source]
        source: AtlsError,
    },
}

/// Why `Init` did not return an `InitSuccess`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// ALREADY_EXISTS: a second Init; the node keeps its first cluster.
    #[error("the node is already initialized: {message}")]
    AlreadyInitialized { message: String },
    /// Any other status (UNAUTHENTICATED for a wrong init secret, INVALID_ARGUMENT, ...).
    #[error("Init refused: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("the Init stream ended without InitSuccess")]
    NoSuccess,
}

/// Why `Recover` did not recover the node.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// ALREADY_EXISTS: the node does not wait for Recover (already recovered in this boot, or it
    /// rejoined through another control plane): nothing to do.
    #[error("the node no longer waits for Recover: {message}")]
    NotWaiting { message: String },
    /// Any other status (PERMISSION_DENIED for a wrong master secret, UNAVAILABLE when its
    /// external KMS is unreachable, FAILED_PRECONDITION when it cannot be recovered this way).
    #[error("Recover refused: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
}

impl InitError {
    /// The node's status, when the node answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            InitError::Refused(s) => Some(s),
            _ => None,
        }
    }
}

impl RecoverError {
    /// The gRPC code the node answered with.
    pub fn code(&self) -> tonic::Code {
        match self {
            RecoverError::NotWaiting { .. } => tonic::Code::AlreadyExists,
            RecoverError::Refused(s) => s.code(),
        }
    }

    /// The node's message.
    pub fn message(&self) -> &str {
        match self {
            RecoverError::NotWaiting { message } => message,
            RecoverError::Refused(s) => s.message(),
        }
    }
}

/// A channel to the bootstrapper at `endpoint` ("host:port"), open only after the node attested
/// to `validator` over server-only aTLS, with the node's verdict. A node that waits for Init or
/// Recover is not bound yet, so the validator should expect PCR 15 = zero.
pub async fn attest_bootstrapper(
    endpoint: &str,
    validator: Arc<dyn Validator>,
) -> Result<(Channel, Verdict), AttestError> {
    let refused = |source| AttestError::Refused {
        endpoint: endpoint.to_owned(),
        source,
    };
    let config = ClientConfig::server_only(validator).map_err(refused)?;
    atls::channel(endpoint, config)
        .await
        .map_err(|source| match source {
            AtlsError::Io(_) | AtlsError::Timeout(_) => AttestError::Unreachable {
                endpoint: endpoint.to_owned(),
                source,
            },
            source => refused(source),
        })
}

/// Sends `Init` over an attested `channel` and follows its stream: every progress line goes to
/// `on_log`, the `InitSuccess` is returned.
pub async fn init(
    channel: Channel,
    request: InitRequest,
    mut on_log: impl FnMut(&str),
) -> Result<InitSuccess, InitError> {
    let refused = |s: tonic::Status| match s.code() {
        tonic::Code::AlreadyExists => InitError::AlreadyInitialized {
            message: s.message().to_owned(),
        },
        _ => InitError::Refused(s),
    };
    let mut stream = InitServiceClient::new(channel)
        .init(request)
        .await
        .map_err(refused)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(refused)? {
        match msg.kind {
            Some(Kind::Log(line)) => on_log(&line.message),
            Some(Kind::Success(success)) => return Ok(success),
            None => {}
        }
    }
    Err(InitError::NoSuccess)
}

/// Sends `Recover` over an attested `channel`.
pub async fn recover(
    channel: Channel,
    request: RecoverRequest,
) -> Result<RecoverResponse, RecoverError> {
    RecoverServiceClient::new(channel)
        .recover(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| match s.code() {
            tonic::Code::AlreadyExists => RecoverError::NotWaiting {
                message: s.message().to_owned(),
            },
            _ => RecoverError::Refused(s),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn already_exists_means_the_node_does_not_wait_for_recover() {
        let e = RecoverError::NotWaiting {
            message: "already recovered".into(),
        };
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        assert_eq!(e.message(), "already recovered");
        let denied = RecoverError::Refused(tonic::Status::permission_denied("wrong"));
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn an_endpoint_where_nothing_listens_is_unreachable_not_refused() {
        // Bind then drop a listener: the port is free, so the connect is refused by the OS.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let measurements = constellation_attestation::Measurements(
            [
                (
                    4,
                    constellation_attestation::measurements::Measurement::enforce([1; 32]),
                ),
                (
                    15,
                    constellation_attestation::measurements::Measurement::enforce([0; 32]),
                ),
            ]
            .into(),
        );
        let validator = constellation_attestation::validator_for(
            constellation_attestation::Variant::QemuVtpm,
            constellation_attestation::ValidatorPolicy::pinned(Vec::new(), measurements),
        )
        .unwrap();
        let e = attest_bootstrapper(&format!("127.0.0.1:{port}"), validator)
            .await
            .unwrap_err();
        assert!(matches!(e, AttestError::Unreachable { .. }), "{e}");
    }
}
