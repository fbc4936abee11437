//! Floods against an aTLS listener (issue 14 §5): connections that never speak, and a length
//! prefix that claims a huge frame, neither hold the listener nor make it allocate. The
//! attester is the software signer (what is under test is the listener, not the TPM).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls::{self, MAX_CHALLENGE_FRAME, MAX_FRAME};
use constellation_attestation::measurements::Digest;
use constellation_attestation::testing::{software_policy, SoftwareIssuer, SoftwareValidator};
use constellation_common::limits::ListenerLimits;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

const PCR: Digest = [7u8; 32];

/// Serves aTLS (server-only) under `limits`, dropping every attested stream.
async fn serve(limits: ListenerLimits) -> (String, Arc<SoftwareIssuer>) {
    let issuer = SoftwareIssuer::new(PCR);
    let config = atls::ServerConfig::server_only(issuer.clone())
        .unwrap()
        .with_limits(limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut incoming = atls::incoming(listener, config);
        while let Some(Ok(stream)) = incoming.next().await {
            drop(stream);
        }
    });
    (addr, issuer)
}

/// Whether the server closed `tcp` (EOF or reset), without waiting.
fn closed_by_server(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    !matches!(tcp.try_read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_exhaust_the_atls_listener() {
    const SLOTS: usize = 4;
    const IDLE: usize = 40;
    let handshake_timeout = Duration::from_millis(300);
    let (addr, issuer) = serve(ListenerLimits {
        max_connections: SLOTS,
        handshake_timeout,
        ..ListenerLimits::default()
    })
    .await;

    // Connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    // One handshake timeout later only the first few got a slot and were dropped; the others
    // still wait in the kernel's backlog, costing the server nothing.
    tokio::time::sleep(handshake_timeout + handshake_timeout / 2).await;
    let dropped = idle.iter().filter(|tcp| closed_by_server(tcp)).count();
    assert!(
        dropped <= 2 * SLOTS,
        "{dropped} of {IDLE} silent connections were accepted at once (limit {SLOTS})"
    );

    // An honest client queues behind them in the kernel's backlog and gets through once the
    // silent ones before it timed out: IDLE / SLOTS rounds of the handshake timeout.
    let client = atls::ClientConfig::server_only(SoftwareValidator::new(
        issuer.public(),
        software_policy(PCR),
    ))
    .unwrap();
    let started = Instant::now();
    let (_tls, verdict) = atls::connect(&addr, &client)
        .await
        .expect("the honest client is attested despite the idle connections");
    let waited = started.elapsed();
    assert_eq!(verdict.ak_fingerprint, issuer.ak_fingerprint());
    let bound = handshake_timeout * (IDLE / SLOTS + 2) as u32 + Duration::from_secs(2);
    assert!(
        waited < bound,
        "honest handshake took {waited:?} (bound {bound:?})"
    );

    // The server closed every silent connection (EOF or reset), none held a slot forever.
    for mut tcp in idle {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection is still open: {read:?}"
        );
    }
}

/// Accepts any server certificate: the attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Completes the TLS handshake with the aTLS server, as any client can.
async fn raw_tls(addr: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("constellation-atls").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_allocation() {
    // A long handshake deadline: the refusal must come from the frame cap, not the timeout.
    let (addr, _issuer) = serve(ListenerLimits {
        handshake_timeout: Duration::from_secs(30),
        ..ListenerLimits::default()
    })
    .await;
    for claimed in [MAX_CHALLENGE_FRAME + 1, MAX_FRAME, u32::MAX as usize] {
        let mut tls = raw_tls(&addr).await;
        // A length prefix and no body: a server that allocated the claimed length and waited
        // for it would sit here until its deadline.
        tls.write_all(&(claimed as u32).to_be_bytes())
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a {claimed}-byte challenge frame was not refused at once: {read:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
