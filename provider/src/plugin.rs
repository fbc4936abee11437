//! go-plugin handshake: magic cookie, protocol negotiation, AutoMTLS, the stdout handshake
//! line, then the gRPC server until Terraform calls GRPCController.Shutdown.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use constellation_common::tls::{self as tls, TlsIncoming};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio_stream::StreamExt as _;
use tonic::transport::server::Connected;
use tonic::transport::Server;

use crate::resource::{DataSource, Resource};
use crate::server::{Controller, ProviderService};

pub const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str =
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";

/// go-plugin's message for a plugin binary run by hand.
pub const NOT_A_PLUGIN_HOST: &str =
    "This binary is a plugin. These are not meant to be executed directly.\n\
Please execute the program that consumes these plugins, which will\n\
load any plugins automatically";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{NOT_A_PLUGIN_HOST}")]
    NotLaunchedByTerraform,
    #[error("Terraform offers plugin protocol versions {offered:?}; this provider speaks 6")]
    ProtocolVersion { offered: String },
    #[error("cannot listen on a unix socket in {dir}: {source}")]
    Listen {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "Terraform did not enable AutoMTLS (PLUGIN_CLIENT_CERT is unset), so any local user \
         could call this provider; set {ALLOW_PLAINTEXT_ENV}=1 to serve without TLS anyway"
    )]
    NoAutoMtls,
    #[error("cannot create the TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("PLUGIN_CLIENT_CERT holds no usable PEM certificate: {0}")]
    ClientCert(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot write the handshake line: {0}")]
    Handshake(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("gRPC server task failed: {0}")]
    Task(String),
}

/// The self-signed server certificate go-plugin pins (SAN `localhost`).
struct ServerCert {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    der_base64: String,
}

/// A fresh P-256 key in ring, as rcgen's signer. The go-plugin side of the provider (this key,
/// the certificate and the TLS handshake with Terraform) uses ring, whose random numbers come
/// straight from the OS: aws-lc's generator seeds itself from CPU jitter on first use, which
/// costs about 80 ms, and Terraform starts the plugin three times per plan. The provider's
/// own work (attestation, aTLS to the nodes) keeps using aws-lc-rs.
struct RingP256 {
    pair: ring::signature::EcdsaKeyPair,
    pkcs8: Vec<u8>,
    rng: ring::rand::SystemRandom,
}

impl RingP256 {
    fn generate() -> Result<Self, rcgen::Error> {
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|e| rcgen::Error::RingKeyRejected(e.to_string()))?;
        Ok(Self {
            pair,
            pkcs8: pkcs8.as_ref().to_vec(),
            rng,
        })
    }
}

impl rcgen::PublicKeyData for RingP256 {
    fn der_bytes(&self) -> &[u8] {
        ring::signature::KeyPair::public_key(&self.pair).as_ref()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RingP256 {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

fn server_cert() -> Result<ServerCert, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = RingP256::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(ServerCert {
        // go-plugin reads standard base64 without padding.
        der_base64: base64::engine::general_purpose::STANDARD_NO_PAD.encode(cert.der()),
        der: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.pkcs8).into(),
    })
}

/// The explicit opt-in to serve without AutoMTLS (e.g. a debugging harness that is not
/// Terraform). Without it the provider refuses to start when `PLUGIN_CLIENT_CERT` is unset.
pub const ALLOW_PLAINTEXT_ENV: &str = "CONSTELLATION_PROVIDER_INSECURE_PLAINTEXT";

/// AutoMTLS, client side: Terraform makes a fresh certificate per run and hands it to us in
/// `PLUGIN_CLIENT_CERT`. Only a client presenting exactly that certificate completes the TLS
/// handshake: a client with another certificate or with none is refused, as go-plugin's own
/// servers do. Otherwise any local user could call ImportResourceState during an apply and
/// read the master secret. The certificate is pinned by its exact bytes instead of being
/// chained with webpki, because go-plugin's certificate is a CA certificate (IsCA=true), which
/// webpki refuses as an end entity.
#[derive(Debug)]
pub struct PinnedClientCert {
    pinned: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedClientCert {
    /// Pins the first certificate of `pem` (PLUGIN_CLIENT_CERT's content).
    pub fn from_pem(pem: &str) -> Result<Self, ServeError> {
        let pinned = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| ServeError::ClientCert(e.to_string()))?;
        Ok(Self {
            pinned,
            algorithms: tls::provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for PinnedClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            tracing::debug!("client presented Terraform's AutoMTLS certificate");
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!("refused a client certificate that is not Terraform's");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server side of AutoMTLS: our certificate, Terraform's pinned (required) client
/// certificate, HTTP/2 by ALPN. The handshake runs on ring (see [`RingP256`] for why); the
/// client's signature is checked with aws-lc-rs, which, unlike ring, verifies go-plugin's
/// P-521 certificate.
pub fn automtls_server_config(
    client_cert_pem: &str,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let verifier = Arc::new(PinnedClientCert::from_pem(client_cert_pem)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Serves the provider until Terraform shuts it down.
pub async fn serve_resources(
    resources: Vec<Arc<dyn Resource>>,
    data_sources: Vec<Arc<dyn DataSource>>,
) -> Result<(), ServeError> {
    if std::env::var(MAGIC_COOKIE_KEY).ok().as_deref() != Some(MAGIC_COOKIE_VALUE) {
        return Err(ServeError::NotLaunchedByTerraform);
    }
    if let Ok(offered) = std::env::var("PLUGIN_PROTOCOL_VERSIONS") {
        if !offered.split(',').any(|v| v.trim() == "6") {
            return Err(ServeError::ProtocolVersion { offered });
        }
    }
    // More than one rustls provider may be compiled into the workspace; pick ours.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    // AutoMTLS: Terraform pins our self-signed server certificate from the handshake line and
    // gives us its client certificate in PLUGIN_CLIENT_CERT (see [`PinnedClientCert`]).
    let (tls_config, cert_field) = match std::env::var("PLUGIN_CLIENT_CERT") {
        Ok(client_pem) if !client_pem.is_empty() => {
            let cert = server_cert()?;
            let config = automtls_server_config(&client_pem, cert.der, cert.key)?;
            (Some(config), cert.der_base64)
        }
        _ if std::env::var(ALLOW_PLAINTEXT_ENV).as_deref() == Ok("1") => {
            tracing::warn!("serving WITHOUT TLS ({ALLOW_PLAINTEXT_ENV}=1)");
            (None, String::new())
        }
        _ => return Err(ServeError::NoAutoMtls),
    };

    // go-plugin's way on Unix: a socket in a fresh folder only this user can enter, so other
    // local users cannot even connect.
    let socket = PluginSocket::create()?;
    let listener = socket.listen()?;
    let shutdown = Arc::new(Notify::new());
    let router = Server::builder()
        .add_service(crate::tfplugin6::provider_server::ProviderServer::new(
            ProviderService::new(resources, data_sources),
        ))
        .add_service(
            crate::go_plugin::grpc_controller_server::GrpcControllerServer::new(Controller {
                shutdown: shutdown.clone(),
            }),
        );

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "1|6|unix|{}|grpc|{cert_field}", socket.path.display())
            .map_err(ServeError::Handshake)?;
        out.flush().map_err(ServeError::Handshake)?;
    }
    tracing::debug!(socket = %socket.path.display(), "serving tfplugin6");

    // Terraform closes its connection as soon as the Shutdown response arrived; exiting then
    // (instead of after a fixed pause) saves a pause per plugin start, three per plan.
    let open = OpenConnections::default();
    let mut server = match tls_config {
        Some(config) => {
            let incoming = TlsIncoming::new(listener, config).map(open.tracking());
            tokio::spawn(router.serve_with_incoming(incoming))
        }
        None => {
            let incoming =
                tokio_stream::wrappers::UnixListenerStream::new(listener).map(open.tracking());
            tokio::spawn(router.serve_with_incoming(incoming))
        }
    };
    tokio::select! {
        () = parent_gone() => {
            tracing::warn!("Terraform exited without shutting the plugin down; exiting");
            Ok(())
        }
        r = &mut server => match r {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(e) => Err(ServeError::Task(e.to_string())),
        },
        () = shutdown.notified() => {
            // The server task keeps running until the Shutdown response reached Terraform,
            // which then closes its connection (at most SHUTDOWN_GRACE).
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, open.all_closed()).await;
            Ok(())
        }
    }
}

/// The plugin's unix socket, in a folder of its own (mode 0700) under `PLUGIN_UNIX_SOCKET_DIR`
/// (set by Terraform where it wants the socket) or the temporary folder. Both are removed when
/// the plugin exits.
struct PluginSocket {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

/// Longest unix socket path (sun_path holds 108 bytes including the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

impl PluginSocket {
    fn create() -> Result<Self, ServeError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let base = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "constellation-plugin-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        // mkdir fails if anything (a file, a planted symlink) already has the name, so the
        // folder is ours and fresh; the umask cannot widen 0700.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ServeError::Listen {
                dir: dir.clone(),
                source,
            })?;
        let path = dir.join("plugin.sock");
        let socket = Self { dir, path };
        if socket.path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ServeError::Listen {
                dir: socket.dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the socket path is longer than {MAX_SOCKET_PATH} bytes"),
                ),
            });
        }
        Ok(socket)
    }

    fn listen(&self) -> Result<tokio::net::UnixListener, ServeError> {
        tokio::net::UnixListener::bind(&self.path).map_err(|source| ServeError::Listen {
            dir: self.dir.clone(),
            source,
        })
    }
}

impl Drop for PluginSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// How long the plugin waits after Shutdown for Terraform to close its connection.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(20);

/// Counts the connections Terraform holds open to the plugin.
#[derive(Clone)]
struct OpenConnections(Arc<watch::Sender<usize>>);

impl Default for OpenConnections {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl OpenConnections {
    /// Wraps each accepted connection so that it is counted while open.
    fn tracking<S, E>(&self) -> impl FnMut(Result<S, E>) -> Result<Counted<S>, E> {
        let open = self.clone();
        move |accepted| {
            accepted.map(|inner| {
                open.0.send_modify(|n| *n += 1);
                Counted {
                    inner,
                    open: open.clone(),
                }
            })
        }
    }

    /// Resolves once no connection is open.
    async fn all_closed(&self) {
        let _ = self.0.subscribe().wait_for(|n| *n == 0).await;
    }
}

/// A connection that counts itself in [`OpenConnections`] until it is dropped.
struct Counted<S> {
    inner: S,
    open: OpenConnections,
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.open.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<S: Connected> Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Resolves when the process that started us (Terraform) is gone, e.g. after a crash:
/// an orphaned plugin would otherwise serve forever and hold Terraform's output pipes.
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A certificate like go-plugin's: self-signed CA, ECDSA P-521.
    fn go_plugin_like_cert() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (
            cert.pem(),
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// The client half of go-plugin's pinning: our server certificate by its exact bytes (it is
    /// a CA certificate, which webpki would refuse as an end entity, as Go does not).
    #[derive(Debug)]
    struct PinnedServer(CertificateDer<'static>);

    impl rustls::client::danger::ServerCertVerifier for PinnedServer {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            assert_eq!(end_entity.as_ref(), self.0.as_ref());
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &tls::provider().signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &tls::provider().signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Runs one TLS handshake plus a byte of application data; Ok when both sides agree.
    async fn handshake(
        client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Result<(), String> {
        let (terraform_pem, _, _) = go_plugin_like_cert();
        handshake_pinning(&terraform_pem, client_cert).await
    }

    async fn handshake_pinning(
        pinned_pem: &str,
        client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Result<(), String> {
        let server = server_cert().unwrap();
        let server_der = server.der.clone();
        let config = automtls_server_config(pinned_pem, server.der, server.key).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer(server_der)));
        let client_config = match client_cert {
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let server = tokio::spawn(async move {
            let mut stream = acceptor
                .accept(server_io)
                .await
                .map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(byte[0])
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let client = async {
            let mut stream = connector
                .connect(ServerName::try_from("localhost").unwrap(), client_io)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(&[42]).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(stream)
        };
        // The client keeps its end open until the server has read the byte.
        let client_result = client.await;
        let server_result = server.await.unwrap();
        let client_result = client_result.map(drop);
        match (client_result, server_result) {
            (Ok(()), Ok(42)) => Ok(()),
            (c, s) => Err(format!("client: {c:?}, server: {s:?}")),
        }
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let err = handshake(None).await.unwrap_err();
        assert!(
            err.contains("server: Err(\"peer sent no certificates\")"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn terraforms_own_p521_ca_certificate_is_accepted() {
        let (pem, der, key) = go_plugin_like_cert();
        handshake_pinning(&pem, Some((der, key))).await.unwrap();
    }

    #[tokio::test]
    async fn any_other_client_certificate_is_refused() {
        let (_, der, key) = go_plugin_like_cert();
        let err = handshake(Some((der, key))).await.unwrap_err();
        assert!(
            err.contains("server: Err") && err.contains("ApplicationVerificationFailure"),
            "{err}"
        );
    }

    #[test]
    fn a_client_cert_variable_without_a_certificate_is_an_error() {
        for bad in [
            "",
            "not pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(
                matches!(
                    PinnedClientCert::from_pem(bad),
                    Err(ServeError::ClientCert(_))
                ),
                "{bad:?}"
            );
        }
    }
}
