//! Moving attested connections: the server's accept loop and stream for tonic, and the client's
//! dialer, tower connector and channel.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use constellation_common::tls::{ConnectionSlot, Handshake, Incoming, TlsServerStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::{AtlsError, ClientConfig, ServerConfig};
use crate::variant::Verdict;

/// What a server learns about an accepted connection; available to gRPC handlers as a request
/// extension (`request.extensions().get::<ConnectInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The client's accepted attestation (mutual mode only).
    pub peer: Option<Verdict>,
}

/// An accepted, attested server-side connection, ready for tonic.
pub type ServerStream = TlsServerStream<ConnectionSlot<TcpStream>, ConnectInfo>;

/// Accepts connections on `listener` under the config's [`ServerConfig::limits`], runs each
/// handshake concurrently, and yields only the attested ones (failures are logged with their
/// reason and dropped). Feed the stream to `tonic::transport::Server::serve_with_incoming`
/// (built by `limits.server()`). The accept loop is the one of [`constellation_common::tls`];
/// aTLS plugs in its handshake-plus-attestation step.
pub fn incoming(listener: TcpListener, config: ServerConfig) -> Incoming<ServerStream> {
    let limits = *config.limits();
    Incoming::spawn(listener, config, &limits, 64)
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Handshake<IO> for ServerConfig {
    type Stream = TlsServerStream<IO, ConnectInfo>;

    async fn handshake(
        &self,
        io: IO,
        remote_addr: Option<SocketAddr>,
        _local_addr: Option<SocketAddr>,
    ) -> Option<Self::Stream> {
        match self.accept_unbounded(io).await {
            Ok((inner, peer)) => Some(TlsServerStream::new(
                inner,
                ConnectInfo { remote_addr, peer },
            )),
            Err(e) => {
                let peer = remote_addr.map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(%peer, error = %e, "aTLS connection refused");
                None
            }
        }
    }
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
