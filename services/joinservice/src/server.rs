//! The join service on the network: mutual aTLS (the joiner attests too), under the
//! [`ListenerLimits`] of its aTLS configuration: connection slots and handshake deadline in the
//! accept loop, streams, request deadline and connection age in the gRPC server, and the
//! decoding cap on `IssueJoinTicket` requests.

use std::future::Future;

use constellation_attestation::atls;
use constellation_proto::join::join_service_server::JoinServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::{AttestedPeerInterceptor, JoinTicketIssuer};

/// Serves `tickets` on `listener` until `shutdown` resolves; `peers` turns each connection's
/// attestation verdict into the request's attested peer.
pub async fn serve(
    listener: TcpListener,
    atls_config: atls::ServerConfig,
    tickets: JoinTicketIssuer,
    peers: AttestedPeerInterceptor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limits = *atls_config.limits();
    let service = InterceptedService::new(
        JoinServiceServer::new(tickets).max_decoding_message_size(limits.max_message_bytes),
        peers,
    );
    limits
        .server()
        .add_service(service)
        .serve_with_incoming_shutdown(atls::incoming(listener, atls_config), shutdown)
        .await
}
