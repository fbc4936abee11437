//! The gRPC key service: `GetDataKey` derives data keys from the master secret, served only over
//! mutual TLS.

use std::future::Future;
use std::sync::Arc;

use constellation_common::kdf::MAX_KEY_LEN;
use constellation_common::limits::ListenerLimits;
use constellation_proto::keyservice::key_service_server::{
    KeyService as KeyServiceRpc, KeyServiceServer,
};
use constellation_proto::keyservice::{GetDataKeyRequest, GetDataKeyResponse};
use constellation_proto::PROTOCOL_VERSION;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::master::{BackendError, MasterSecret, MasterSecretBackend};
use crate::tls::{TlsConnectInfo, TlsIncoming};

/// Serves data keys derived from one master secret.
#[derive(Debug, Clone)]
pub struct KeyService {
    master: Arc<MasterSecret>,
}

impl KeyService {
    pub fn new(master: MasterSecret) -> Self {
        Self {
            master: Arc::new(master),
        }
    }

    /// A key service over the master secret the backend persisted earlier (restart path).
    pub async fn from_backend(backend: &dyn MasterSecretBackend) -> Result<Self, BackendError> {
        let master = backend.load().await?;
        tracing::info!(backend = %backend.describe(), "loaded master secret");
        Ok(Self::new(master))
    }
}

#[tonic::async_trait]
impl KeyServiceRpc for KeyService {
    async fn get_data_key(
        &self,
        request: Request<GetDataKeyRequest>,
    ) -> Result<Response<GetDataKeyResponse>, Status> {
        // Defense in depth: `serve` is given a config requiring client certificates, but a
        // misconfigured server must still not hand out keys to anonymous callers.
        let authenticated = request
            .extensions()
            .get::<TlsConnectInfo>()
            .is_some_and(|info| !info.peer_certificates.is_empty());
        if !authenticated {
            return Err(Status::unauthenticated(
                "the key service requires a mutual-TLS client certificate",
            ));
        }
        let request = request.into_inner();
        if request.version != PROTOCOL_VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported protocol version {}, expected {PROTOCOL_VERSION}",
                request.version
            )));
        }
        if request.data_key_id.is_empty() {
            return Err(Status::invalid_argument("data_key_id is empty"));
        }
        let length = request.length as usize;
        if length == 0 || length > MAX_KEY_LEN {
            return Err(Status::invalid_argument(format!(
                "length {} is out of range (1..={MAX_KEY_LEN})",
                request.length
            )));
        }
        let key = self
            .master
            .derive(&request.data_key_id, length)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(data_key_id = %request.data_key_id, length, "derived data key");
        Ok(Response::new(GetDataKeyResponse {
            data_key: key.expose().to_vec(),
        }))
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("key service transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` on `listener` over TLS with `tls` until `shutdown` completes, under the
/// default [`ListenerLimits`] (connections, handshake deadline, streams, request deadline,
/// message size). `tls` should require client certificates (see
/// [`crate::tls::mutual_tls_server_config`]); requests without one are refused regardless.
pub async fn serve<F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: KeyService,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let local_addr = listener.local_addr().ok();
    tracing::info!(?local_addr, "key service listening (mutual TLS)");
    let limits = ListenerLimits::default();
    limits
        .server()
        .add_service(
            KeyServiceServer::new(service).max_decoding_message_size(limits.max_message_bytes),
        )
        .serve_with_incoming_shutdown(TlsIncoming::with_limits(listener, tls, &limits), shutdown)
        .await?;
    tracing::info!(?local_addr, "key service stopped");
    Ok(())
}
