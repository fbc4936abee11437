//! The key service over gRPC with mutual TLS: known answers, argument validation, and refusal of
//! clients without a certificate from the cluster CA.

mod common;

use common::{data_key, request, RunningKeyService};
use constellation_common::secret::SecretBytes;
use constellation_keyservice::testing::TestPki;
use constellation_keyservice::{KeyService, MasterSecret};
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use serde::Deserialize;

/// The Go project's HKDF known answers, owned by the crate that implements the KDF.
const HKDF_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../common/test_data/kdf/hkdf-sha256.json"
);

#[derive(Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    ikm: String,
    salt: String,
    info_text: String,
    okm: String,
}

fn master(secret: &[u8], salt: &[u8]) -> MasterSecret {
    MasterSecret::new(
        SecretBytes::new(secret.to_vec()),
        SecretBytes::new(salt.to_vec()),
    )
    .expect("master secret")
}

#[tokio::test]
async fn known_answers_through_grpc() {
    let text = std::fs::read_to_string(HKDF_VECTORS).expect("read HKDF known answers");
    let vectors: Vectors = serde_json::from_str(&text).expect("parse HKDF known answers");
    assert!(vectors.vectors.len() >= 4, "expected at least 4 vectors");
    for vector in vectors.vectors {
        let key_id = vector
            .info_text
            .strip_prefix("key-")
            .expect("info starts with key-");
        let service = KeyService::new(master(
            &hex::decode(&vector.ikm).expect("ikm hex"),
            &hex::decode(&vector.salt).expect("salt hex"),
        ));
        let running = RunningKeyService::start(service).await;
        let mut client = running.client().await;
        let key = data_key(&mut client, key_id, 32).await;
        assert_eq!(hex::encode(key), vector.okm, "vector {}", vector.name);
        running.stop().await;
    }
}

#[tokio::test]
async fn invalid_arguments_are_rejected_with_clear_messages() {
    let running = RunningKeyService::start(KeyService::new(master(b"secret", b"salt"))).await;
    let mut client = running.client().await;

    let mut wrong_version = request("disk", 32);
    wrong_version.version = 0;
    let cases = [
        (wrong_version, "unsupported protocol version 0, expected 1"),
        (request("", 32), "data_key_id is empty"),
        (request("disk", 0), "length 0 is out of range (1..=8160)"),
        (
            request("disk", 8161),
            "length 8161 is out of range (1..=8160)",
        ),
    ];
    for (req, message) in cases {
        let status = client.get_data_key(req).await.expect_err("must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), message);
    }
    // The edges of the valid range work, and different ids give different keys.
    assert_eq!(data_key(&mut client, "disk", 8160).await.len(), 8160);
    assert_eq!(data_key(&mut client, "disk", 1).await.len(), 1);
    assert_ne!(
        data_key(&mut client, "disk-a", 32).await,
        data_key(&mut client, "disk-b", 32).await
    );
    running.stop().await;
}

#[tokio::test]
async fn anonymous_client_is_refused() {
    let running = RunningKeyService::start(KeyService::new(master(b"secret", b"salt"))).await;
    // TLS 1.3: the client may finish its handshake before the server rejects it, so the refusal
    // shows either at connect or at the first call.
    let refused = match running.channel_with(None).await {
        Err(_) => true,
        Ok(channel) => {
            let status = KeyServiceClient::new(channel)
                .get_data_key(request("disk", 32))
                .await
                .expect_err("anonymous call must fail");
            // Refused by the TLS layer (the server's alert), not by the handler.
            let printed = format!("{status:?}");
            assert!(printed.contains("CertificateRequired"), "{printed}");
            true
        }
    };
    assert!(refused, "a client without certificate got a data key");
    // The server survives the refused handshake and still serves a proper client.
    let mut client = running.client().await;
    assert_eq!(data_key(&mut client, "disk", 32).await.len(), 32);
    running.stop().await;
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    let running = RunningKeyService::start(KeyService::new(master(b"secret", b"salt"))).await;
    let other_ca = TestPki::new("attacker CA").expect("other CA");
    let foreign_client = other_ca
        .issue_client("node-1")
        .expect("foreign client cert");
    let refused = match running.channel_with(Some(&foreign_client)).await {
        Err(_) => true,
        Ok(channel) => {
            let status = KeyServiceClient::new(channel)
                .get_data_key(request("disk", 32))
                .await
                .expect_err("foreign call must fail");
            let printed = format!("{status:?}");
            assert!(printed.contains("UnknownCA"), "{printed}");
            true
        }
    };
    assert!(
        refused,
        "a client with a foreign certificate got a data key"
    );
    // The same request with the cluster's client certificate works.
    let mut client = running.client().await;
    assert_eq!(data_key(&mut client, "disk", 32).await.len(), 32);
    running.stop().await;
}

#[tokio::test]
async fn client_refuses_a_server_outside_the_cluster_ca() {
    let running = RunningKeyService::start(KeyService::new(master(b"secret", b"salt"))).await;
    // A client of another cluster (its own CA for both roles) must not accept this server.
    let other_ca = TestPki::new("other cluster CA").expect("other CA");
    let other_client = other_ca.issue_client("node-1").expect("client cert");
    let config = constellation_keyservice::tls::mutual_tls_client_config(
        &[other_ca.ca_der()],
        other_client.chain(),
        other_client.key(),
    )
    .expect("client config");
    assert!(running.channel_with_config(config).await.is_err());
    running.stop().await;
}

#[tokio::test]
async fn handler_refuses_anonymous_callers_even_if_tls_allowed_them() {
    // A misconfigured server config that lets anonymous clients finish the handshake: the
    // handler itself must still refuse to hand out keys.
    let running = RunningKeyService::start_with(
        KeyService::new(master(b"secret", b"salt")),
        |pki, server_cert| {
            let provider = constellation_keyservice::tls::provider();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca_der()).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .expect("verifier");
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_client_cert_verifier(verifier)
                .with_single_cert(server_cert.chain(), server_cert.key())
                .expect("server config");
            config.alpn_protocols = vec![b"h2".to_vec()];
            std::sync::Arc::new(config)
        },
    )
    .await;
    let channel = running
        .channel_with(None)
        .await
        .expect("anonymous TLS is allowed here");
    let status = KeyServiceClient::new(channel)
        .get_data_key(request("disk", 32))
        .await
        .expect_err("anonymous call must fail");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    // With a certificate the same server answers.
    let mut client = running.client().await;
    assert_eq!(data_key(&mut client, "disk", 32).await.len(), 32);
    running.stop().await;
}
