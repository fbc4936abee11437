//! TLS plumbing for tonic over rustls, independent of how the peers are authenticated.
//!
//! tonic's own TLS feature is not used: the caller supplies a complete `rustls::ServerConfig` /
//! `rustls::ClientConfig` (certificates, verifiers, ALPN), so the same two pieces serve mutual TLS
//! with cluster certificates (the key service) and attested TLS (custom verifiers):
//!
//! - server side: [`TlsIncoming`] accepts connections on a TCP or unix-socket [`Listener`], runs
//!   each TLS handshake in its own task
//!   (a slow or failing client never blocks others) and yields [`TlsServerStream`]s for
//!   `tonic::transport::Server::serve_with_incoming_shutdown`. Every request served over such a
//!   stream carries a [`TlsConnectInfo`] in its extensions (peer certificate chain, addresses).
//!   The accept loop is generic over its per-connection [`Handshake`]: aTLS (in
//!   constellation-attestation) runs its handshake-plus-attestation step in the same loop, and
//!   [`FirstBytes`] serves plain TCP (the verification service). The loop applies the
//!   listener's [`ListenerLimits`]: connection slots ([`ConnectionSlot`]) and the handshake
//!   deadline.
//! - client side: [`TlsConnector`] is a tower service for
//!   `tonic::transport::Endpoint::connect_with_connector`. Give the endpoint an `http://host:port`
//!   URI: the connector does the TLS, tonic must not try to.
//!
//! The helpers at the end build the mutual-TLS configurations the key service uses: a server that
//! requires a client certificate chaining to the cluster CA, and a client presenting one. All
//! configs use the aws-lc-rs provider explicitly, never the process default.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector as RustlsConnector};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::limits::ListenerLimits;

/// ALPN protocol id of HTTP/2, which gRPC runs on.
pub const ALPN_H2: &[u8] = b"h2";

/// What the server learned about a TLS connection. tonic inserts it into the extensions of every
/// request served over the connection: `request.extensions().get::<TlsConnectInfo>()`.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    /// The peer's address; `None` on a unix socket.
    pub remote_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// The client's certificate chain (end entity first) as verified by the server config's client
    /// verifier; empty when the config allowed an anonymous client.
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
}

/// Where [`TlsIncoming`] accepts connections: a TCP listener or a unix-socket listener.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection with the peer's and our address (`None` where the socket has none).
    fn accept_connection(
        &self,
    ) -> impl Future<Output = io::Result<(Self::Io, Option<SocketAddr>, Option<SocketAddr>)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    async fn accept_connection(
        &self,
    ) -> io::Result<(TcpStream, Option<SocketAddr>, Option<SocketAddr>)> {
        let (tcp, remote) = self.accept().await?;
        // gRPC's small request/response frames must not wait for Nagle's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        Ok((tcp, Some(remote), local))
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;

    async fn accept_connection(
        &self,
    ) -> io::Result<(UnixStream, Option<SocketAddr>, Option<SocketAddr>)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, None, None))
    }
}

/// An accepted socket holding one of its listener's [`ListenerLimits::max_connections`] slots
/// until it is dropped (by the handshake that refused it, or by the server when the connection
/// ends).
pub struct ConnectionSlot<Io> {
    io: Io,
    _slot: OwnedSemaphorePermit,
}

impl<Io> ConnectionSlot<Io> {
    pub fn get_ref(&self) -> &Io {
        &self.io
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for ConnectionSlot<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for ConnectionSlot<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<Io: Connected> Connected for ConnectionSlot<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// An accepted server-side TLS connection (handshake completed) and what the server learned
/// about it (`I`: [`TlsConnectInfo`] here, the attestation verdict for aTLS).
pub struct TlsServerStream<S = TcpStream, I = TlsConnectInfo> {
    inner: tokio_rustls::server::TlsStream<S>,
    info: I,
}

impl<S, I> TlsServerStream<S, I> {
    pub fn new(inner: tokio_rustls::server::TlsStream<S>, info: I) -> Self {
        Self { inner, info }
    }

    /// The socket and the rustls connection, e.g. for `export_keying_material`.
    pub fn get_ref(&self) -> (&S, &rustls::ServerConnection) {
        self.inner.get_ref()
    }

    pub fn info(&self) -> &I {
        &self.info
    }
}

impl<S, I: std::fmt::Debug> std::fmt::Debug for TlsServerStream<S, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServerStream")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<S, I: Clone + Send + Sync + 'static> Connected for TlsServerStream<S, I> {
    type ConnectInfo = I;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, I: Unpin> AsyncRead for TlsServerStream<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, I: Unpin> AsyncWrite for TlsServerStream<S, I> {
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

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The per-connection step of an accept loop, from an accepted socket to a stream ready for
/// tonic: a TLS handshake here, a handshake plus attestation in aTLS. Each runs in its own task,
/// so a slow or failing client never blocks others; a refused connection is logged by the step
/// (each knows what its refusals mean) and dropped.
pub trait Handshake<Io>: Clone + Send + Sync + 'static {
    type Stream: Send + 'static;

    /// The connection ready for the application, or `None` when it was refused.
    fn handshake(
        &self,
        io: Io,
        remote_addr: Option<SocketAddr>,
        local_addr: Option<SocketAddr>,
    ) -> impl Future<Output = Option<Self::Stream>> + Send;
}

/// A stream of connections accepted on a listener and passed through a [`Handshake`], for
/// `Server::serve_with_incoming_shutdown`. Refused connections never end the stream. Dropping
/// the stream stops accepting.
pub struct Incoming<T> {
    accepted: mpsc::Receiver<T>,
    accept_loop: JoinHandle<()>,
}

/// TLS connections accepted on a listener (a client without an acceptable certificate is
/// refused).
pub type TlsIncoming<S = TcpStream> = Incoming<TlsServerStream<ConnectionSlot<S>>>;

/// Plain TCP connections (no TLS: the verification service, whose answers are bound to the
/// caller's nonce) under the same limits.
pub type TcpIncoming = Incoming<ConnectionSlot<TcpStream>>;

impl<T: Send + 'static> Incoming<T> {
    /// Accepts on `listener` under `limits` and runs `handshake` on each connection within
    /// `limits.handshake_timeout`; at most `backlog` ready connections wait for the server to
    /// take them.
    pub fn spawn<L, H>(listener: L, handshake: H, limits: &ListenerLimits, backlog: usize) -> Self
    where
        L: Listener,
        H: Handshake<ConnectionSlot<L::Io>, Stream = T>,
    {
        let (sender, accepted) = mpsc::channel(backlog);
        let accept_loop = tokio::spawn(accept_loop(listener, handshake, *limits, sender));
        Self {
            accepted,
            accept_loop,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>
    Incoming<TlsServerStream<ConnectionSlot<S>>>
{
    /// TLS under the default [`ListenerLimits`].
    pub fn new<L: Listener<Io = S>>(listener: L, config: Arc<ServerConfig>) -> Self {
        Self::with_limits(listener, config, &ListenerLimits::default())
    }

    pub fn with_limits<L: Listener<Io = S>>(
        listener: L,
        config: Arc<ServerConfig>,
        limits: &ListenerLimits,
    ) -> Self {
        let handshake = TlsHandshake {
            acceptor: TlsAcceptor::from(config),
        };
        Self::spawn(listener, handshake, limits, 16)
    }
}

impl Incoming<ConnectionSlot<TcpStream>> {
    /// Plain TCP under `limits`: a connection is handed to the server once its first bytes
    /// arrived.
    pub fn plain(listener: TcpListener, limits: &ListenerLimits) -> Self {
        Self::spawn(listener, FirstBytes, limits, 16)
    }
}

impl<T> Drop for Incoming<T> {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl<T> Stream for Incoming<T> {
    type Item = Result<T, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

async fn accept_loop<L: Listener, H: Handshake<ConnectionSlot<L::Io>>>(
    listener: L,
    handshake: H,
    limits: ListenerLimits,
    sender: mpsc::Sender<H::Stream>,
) {
    let slots = limits.connection_slots();
    loop {
        // Take a slot before accepting: beyond the limit, connections wait in the kernel's
        // backlog (and are answered in order) instead of costing us a socket and a task.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (io, remote_addr, local_addr) = match listener.accept_connection().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if sender.is_closed() {
            return;
        }
        let io = ConnectionSlot { io, _slot: slot };
        let handshake = handshake.clone();
        let sender = sender.clone();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let step = handshake.handshake(io, remote_addr, local_addr);
            match tokio::time::timeout(handshake_timeout, step).await {
                // A closed receiver means the server is shutting down; drop the connection.
                Ok(Some(stream)) => {
                    let _ = sender.send(stream).await;
                }
                Ok(None) => {}
                Err(_) => {
                    tracing::info!(?remote_addr, ?handshake_timeout, "handshake timed out");
                }
            }
        });
    }
}

/// The plain TLS step: the handshake (the accept loop bounds its time).
#[derive(Clone)]
struct TlsHandshake {
    acceptor: TlsAcceptor,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Handshake<S> for TlsHandshake {
    type Stream = TlsServerStream<S>;

    async fn handshake(
        &self,
        io: S,
        remote_addr: Option<SocketAddr>,
        local_addr: Option<SocketAddr>,
    ) -> Option<TlsServerStream<S>> {
        match self.acceptor.accept(io).await {
            Ok(inner) => {
                let peer_certificates = inner
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|chain| chain.to_vec())
                    .unwrap_or_default()
                    .into();
                let info = TlsConnectInfo {
                    remote_addr,
                    local_addr,
                    peer_certificates,
                };
                Some(TlsServerStream { inner, info })
            }
            Err(error) => {
                tracing::info!(?remote_addr, %error, "TLS handshake refused");
                None
            }
        }
    }
}

/// The plain TCP step: the connection is ready once the client sent something (the HTTP/2
/// preface), so a client that connects and stays silent never reaches the server.
#[derive(Clone, Copy, Debug)]
pub struct FirstBytes;

impl Handshake<ConnectionSlot<TcpStream>> for FirstBytes {
    type Stream = ConnectionSlot<TcpStream>;

    async fn handshake(
        &self,
        io: ConnectionSlot<TcpStream>,
        remote_addr: Option<SocketAddr>,
        _local_addr: Option<SocketAddr>,
    ) -> Option<ConnectionSlot<TcpStream>> {
        let mut first = [0u8; 1];
        match io.get_ref().peek(&mut first).await {
            Ok(n) if n > 0 => Some(io),
            Ok(_) => None,
            Err(error) => {
                tracing::info!(?remote_addr, %error, "connection failed before its first bytes");
                None
            }
        }
    }
}

/// Client side: a tower service for `Endpoint::connect_with_connector` that opens a TCP
/// connection to the URI's host and port and runs a TLS handshake with the given config, checking
/// the server against `server_name`.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    pub fn new(config: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self {
            config,
            server_name,
        }
    }
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = RustlsConnector::from(self.config.clone());
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("URI {uri} has no host"),
                )
            })?;
            let port = uri.port_u16().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("URI {uri} has no port"),
                )
            })?;
            // An IPv6 host comes bracketed in the URI.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Connects a tonic channel over TLS. `endpoint` must have an `http://host:port` URI (TLS is done
/// here, not by tonic); timeouts and other settings on the endpoint apply.
pub async fn connect(
    endpoint: Endpoint,
    connector: TlsConnector,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(connector).await
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("the cluster CA certificate list is empty")]
    NoCaCertificate,
    #[error("CA certificate {index} is not a usable trust anchor: {source}")]
    BadCaCertificate {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("building the client-certificate verifier failed: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the certificate chain or private key was rejected: {0}")]
    CertificateOrKey(#[source] rustls::Error),
}

/// The process-independent crypto provider every config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn root_store(
    ca_certificates: &[CertificateDer<'static>],
) -> Result<RootCertStore, TlsConfigError> {
    if ca_certificates.is_empty() {
        return Err(TlsConfigError::NoCaCertificate);
    }
    let mut roots = RootCertStore::empty();
    for (index, ca) in ca_certificates.iter().enumerate() {
        roots
            .add(ca.clone())
            .map_err(|source| TlsConfigError::BadCaCertificate { index, source })?;
    }
    Ok(roots)
}

/// A TLS 1.3 server config that REQUIRES a client certificate chaining to one of
/// `client_ca_certificates`, presents `cert_chain`/`key`, and offers ALPN h2.
pub fn mutual_tls_server_config(
    client_ca_certificates: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let roots = Arc::new(root_store(client_ca_certificates)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::CertificateOrKey)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(TlsConfigError::CertificateOrKey)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A TLS 1.3 client config that trusts servers chaining to `server_ca_certificates` and presents
/// `cert_chain`/`key` as its client certificate; offers ALPN h2.
pub fn mutual_tls_client_config(
    server_ca_certificates: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::CertificateOrKey)?
        .with_root_certificates(root_store(server_ca_certificates)?)
        .with_client_auth_cert(cert_chain, key)
        .map_err(TlsConfigError::CertificateOrKey)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
