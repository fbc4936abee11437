//! aTLS: honest handshakes succeed; wrong measurements, replayed evidence and a relay fail,
//! each with its own error. The attester here is a software signer (the TPM-backed variants
//! have their own tests); what is under test is the channel binding.

use std::sync::Arc;

use constellation_attestation::atls::{self, AtlsError};
use constellation_attestation::measurements::{sha256, Digest, Measurements};
use constellation_attestation::testing::{software_policy, SoftwareIssuer, SoftwareValidator};
use constellation_attestation::{ValidationError, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn policy(pcr: Digest) -> Measurements {
    software_policy(pcr)
}

const GOOD: Digest = [7u8; 32];

/// Serves one aTLS connection that echoes a line back after the exchange.
async fn echo_server(
    config: atls::ServerConfig,
) -> (
    String,
    tokio::task::JoinHandle<Result<Option<Verdict>, AtlsError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut tls, verdict) = config.accept(tcp).await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(verdict)
    });
    (addr, task)
}

#[tokio::test]
async fn honest_server_only_handshake_succeeds_and_carries_data() {
    let issuer = SoftwareIssuer::new(GOOD);
    let validator = SoftwareValidator::new(issuer.public(), policy(GOOD));
    let (addr, server) = echo_server(atls::ServerConfig::server_only(issuer).unwrap()).await;
    let (mut tls, verdict) =
        atls::connect(&addr, &atls::ClientConfig::server_only(validator).unwrap())
            .await
            .unwrap();
    assert_eq!(verdict.pcrs[&4], GOOD);
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    assert!(
        server.await.unwrap().unwrap().is_none(),
        "server-only mode has no client verdict"
    );
}

#[tokio::test]
async fn honest_mutual_handshake_attests_both_sides() {
    let server_issuer = SoftwareIssuer::new(GOOD);
    let client_issuer = SoftwareIssuer::new(GOOD);
    let server_cfg = atls::ServerConfig::mutual(
        server_issuer.clone(),
        SoftwareValidator::new(client_issuer.public(), policy(GOOD)),
    )
    .unwrap();
    let client_cfg = atls::ClientConfig::mutual(
        SoftwareValidator::new(server_issuer.public(), policy(GOOD)),
        client_issuer.clone(),
    )
    .unwrap();
    let (addr, server) = echo_server(server_cfg).await;
    let (mut tls, _) = atls::connect(&addr, &client_cfg).await.unwrap();
    tls.write_all(b"mutua").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    let client_verdict = server
        .await
        .unwrap()
        .unwrap()
        .expect("mutual mode yields the client's verdict");
    assert_eq!(
        client_verdict.ak_fingerprint,
        sha256(&client_issuer.public())
    );
}

#[tokio::test]
async fn wrong_measurements_are_rejected() {
    let issuer = SoftwareIssuer::new([1u8; 32]);
    let validator = SoftwareValidator::new(issuer.public(), policy(GOOD));
    let (addr, _server) = echo_server(atls::ServerConfig::server_only(issuer).unwrap()).await;
    let err = atls::connect(&addr, &atls::ClientConfig::server_only(validator).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AtlsError::Rejected(ValidationError::Measurements(_))),
        "got {err}"
    );
    assert!(
        err.to_string().contains("PCR[4]"),
        "error names the PCR: {err}"
    );
}

#[tokio::test]
async fn mutual_mode_rejects_a_client_with_wrong_measurements() {
    let server_issuer = SoftwareIssuer::new(GOOD);
    let client_issuer = SoftwareIssuer::new([2u8; 32]);
    let server_cfg = atls::ServerConfig::mutual(
        server_issuer.clone(),
        SoftwareValidator::new(client_issuer.public(), policy(GOOD)),
    )
    .unwrap();
    let client_cfg = atls::ClientConfig::mutual(
        SoftwareValidator::new(server_issuer.public(), policy(GOOD)),
        client_issuer,
    )
    .unwrap();
    let (addr, server) = echo_server(server_cfg).await;
    let err = atls::connect(&addr, &client_cfg).await.unwrap_err();
    // The refusal reaches the client as data: which check, which PCR, both digests.
    let AtlsError::PeerRefused(ref refusal) = err else {
        panic!("got {err}")
    };
    assert_eq!(
        refusal.check,
        constellation_attestation::RefusalCheck::Measurements
    );
    assert_eq!(refusal.mismatches.len(), 1, "{refusal:?}");
    assert_eq!(refusal.mismatches[0].pcr, 4);
    assert_eq!(refusal.mismatches[0].expected, hex::encode(GOOD));
    assert_eq!(refusal.mismatches[0].found, Some(hex::encode([2u8; 32])));
    assert!(refusal.message.contains("PCR[4]"), "{refusal}");
    assert!(matches!(
        server.await.unwrap(),
        Err(AtlsError::Rejected(ValidationError::Measurements(_)))
    ));
}

#[tokio::test]
async fn replayed_evidence_is_rejected_as_stale() {
    let issuer = SoftwareIssuer::new(GOOD);
    let validator = SoftwareValidator::new(issuer.public(), policy(GOOD));
    let (genuine_addr, _g) = echo_server(atls::ServerConfig::server_only(issuer).unwrap()).await;

    // An eavesdropper records a genuine node's whole evidence message for some old challenge.
    let tcp = TcpStream::connect(&genuine_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("constellation-atls").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(attacker_client_tls())
        .connect(name, tcp)
        .await
        .unwrap();
    write_raw_frame(
        &mut tls,
        format!(r#"{{"version":1,"nonce":"{}"}}"#, hex::encode([9u8; 32])).as_bytes(),
    )
    .await;
    let recorded = read_raw_frame(&mut tls).await;

    // Later it impersonates the node and replays the recorded message to a fresh challenge.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut victim = tokio_rustls::TlsAcceptor::from(attacker_tls())
            .accept(tcp)
            .await
            .unwrap();
        let _challenge = read_raw_frame(&mut victim).await;
        write_raw_frame(&mut victim, &recorded).await;
        let _ = victim.read(&mut [0u8; 1]).await;
    });
    let err = atls::connect(&addr, &atls::ClientConfig::server_only(validator).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, AtlsError::StaleNonce { .. }), "got {err}");
}

#[tokio::test]
async fn replayed_evidence_with_honest_claims_fails_binding() {
    let issuer = SoftwareIssuer::new(GOOD);
    let validator = SoftwareValidator::new(issuer.public(), policy(GOOD));
    let client = atls::ClientConfig::server_only(validator).unwrap();
    let (addr, _s) = echo_server(atls::ServerConfig::server_only(issuer.clone()).unwrap()).await;
    atls::connect(&addr, &client).await.unwrap();
    let recorded = issuer.last_evidence().unwrap();
    issuer.replay(Some(recorded));
    let (addr, _s) = echo_server(atls::ServerConfig::server_only(issuer).unwrap()).await;
    let err = atls::connect(&addr, &client).await.unwrap_err();
    assert!(
        matches!(
            err,
            AtlsError::Rejected(ValidationError::BindingMismatch { .. })
        ),
        "got {err}"
    );
}

#[tokio::test]
async fn relayed_evidence_from_a_genuine_node_is_rejected() {
    // The genuine node.
    let issuer = SoftwareIssuer::new(GOOD);
    let validator = SoftwareValidator::new(issuer.public(), policy(GOOD));
    let (genuine_addr, _g) =
        echo_server(atls::ServerConfig::server_only(issuer.clone()).unwrap()).await;

    // The attacker terminates the victim's TLS with its own key, forwards the victim's
    // challenge to the genuine node over its own session, and relays the answer back.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (tcp, _) = relay.accept().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(attacker_tls());
        let mut victim = acceptor.accept(tcp).await.unwrap();
        let challenge = read_raw_frame(&mut victim).await;
        let upstream_tcp = TcpStream::connect(&genuine_addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(attacker_client_tls());
        let name = rustls::pki_types::ServerName::try_from("constellation-atls").unwrap();
        let mut upstream = connector.connect(name, upstream_tcp).await.unwrap();
        write_raw_frame(&mut upstream, &challenge).await;
        let answer = read_raw_frame(&mut upstream).await;
        write_raw_frame(&mut victim, &answer).await;
        let _ = victim.read(&mut [0u8; 1]).await;
    });
    let err = atls::connect(
        &relay_addr,
        &atls::ClientConfig::server_only(validator).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, AtlsError::SessionMismatch { .. }),
        "got {err}"
    );
}

async fn read_raw_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    body
}

async fn write_raw_frame<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, body: &[u8]) {
    s.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(body).await.unwrap();
    s.flush().await.unwrap();
}

fn attacker_tls() -> Arc<rustls::ServerConfig> {
    let ck = rcgen::generate_simple_self_signed(vec!["constellation-atls".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[derive(Debug)]
struct AcceptAnything;
impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn attacker_client_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn garbage_after_handshake_is_a_protocol_error_not_a_panic() {
    let issuer = SoftwareIssuer::new(GOOD);
    let cfg = atls::ServerConfig::server_only(issuer).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        cfg.accept(tcp).await.map(|_| ())
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("constellation-atls").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(attacker_client_tls())
        .connect(name, tcp)
        .await
        .unwrap();
    write_raw_frame(&mut tls, b"{not json").await;
    let err = server.await.unwrap().unwrap_err();
    assert!(matches!(err, AtlsError::Protocol(_)), "got {err}");

    // An oversized length prefix is refused before allocating.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = atls::ServerConfig::server_only(SoftwareIssuer::new(GOOD)).unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        cfg.accept(tcp).await.map(|_| ())
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("constellation-atls").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(attacker_client_tls())
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            AtlsError::FrameTooLarge { length, max: atls::MAX_CHALLENGE_FRAME }
                if length == u32::MAX as usize
        ),
        "got {err}"
    );
}
