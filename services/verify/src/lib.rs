//! The verification service: every node answers `GetAttestation(nonce, user_data)` with its
//! attestation document bound to both, so anyone holding the cluster's measurements and the
//! nodes' pinned attestation keys can check a running node (like `constellation verify`).
//!
//! No TLS is needed: the evidence itself is bound to the caller's fresh nonce.

pub mod config;

use std::sync::Arc;

pub use constellation_attestation::verification::binding;
use constellation_attestation::Issuer;
use constellation_common::limits::{ListenerLimits, WorkGate};
use constellation_common::tls::TcpIncoming;
use constellation_proto::verify::verify_service_server::{VerifyService, VerifyServiceServer};
use constellation_proto::verify::{GetAttestationRequest, GetAttestationResponse};
use constellation_proto::PROTOCOL_VERSION;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Smallest nonce accepted (a verifier must not let an attester choose freshness).
pub const MIN_NONCE_LEN: usize = 16;
/// Largest nonce or user data accepted.
pub const MAX_INPUT_LEN: usize = 1024;

/// The server half: attests with the node's issuer, a few quotes at a time (anyone may ask, so
/// a flood queues for the TPM in order, bounded by the limits' expensive-work wait).
pub struct VerifyServer {
    issuer: Arc<dyn Issuer>,
    limits: ListenerLimits,
    quote_gate: WorkGate,
}

impl VerifyServer {
    pub fn new(issuer: Arc<dyn Issuer>, limits: &ListenerLimits) -> Self {
        Self {
            issuer,
            limits: *limits,
            quote_gate: limits.work_gate("TPM quote"),
        }
    }

    /// The gRPC service, decoding requests of at most the limits' message size.
    pub fn into_service(self) -> VerifyServiceServer<Self> {
        let max = self.limits.max_message_bytes;
        VerifyServiceServer::new(self).max_decoding_message_size(max)
    }
}

#[tonic::async_trait]
impl VerifyService for VerifyServer {
    async fn get_attestation(
        &self,
        request: Request<GetAttestationRequest>,
    ) -> Result<Response<GetAttestationResponse>, Status> {
        let r = request.into_inner();
        if r.version != PROTOCOL_VERSION {
            return Err(Status::invalid_argument(format!(
                "protocol version {} is not supported (this node speaks {PROTOCOL_VERSION})",
                r.version
            )));
        }
        if r.nonce.len() < MIN_NONCE_LEN || r.nonce.len() > MAX_INPUT_LEN {
            return Err(Status::invalid_argument(format!(
                "nonce must be {MIN_NONCE_LEN}..={MAX_INPUT_LEN} bytes, got {}",
                r.nonce.len()
            )));
        }
        if r.user_data.len() > MAX_INPUT_LEN {
            return Err(Status::invalid_argument(format!(
                "user data must be at most {MAX_INPUT_LEN} bytes, got {}",
                r.user_data.len()
            )));
        }
        let b = binding(&r.nonce, &r.user_data);
        let issuer = self.issuer.clone();
        let evidence = self
            .quote_gate
            .run_blocking(move || issuer.issue(&b))
            .await?
            .map_err(|e| Status::unavailable(format!("cannot attest: {e}")))?;
        Ok(Response::new(GetAttestationResponse {
            variant: self.issuer.variant().to_string(),
            attestation: evidence,
        }))
    }
}

/// Serves the verification service on `listener` under `limits` (plain TCP: the evidence is
/// bound to the caller's nonce) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    issuer: Arc<dyn Issuer>,
    limits: ListenerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    limits
        .server()
        .add_service(VerifyServer::new(issuer, &limits).into_service())
        .serve_with_incoming_shutdown(TcpIncoming::plain(listener, &limits), shutdown)
        .await
}
