//! The Kubernetes KMS v2 plugin over a real unix socket with the generated v2 client (the same
//! gRPC paths kube-apiserver calls): round trip, restart, another cluster, tampering, truncation,
//! wrong key ID, socket permissions.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use constellation_common::secret::SecretBytes;
use constellation_keyservice::kmsplugin::{serve_unix, KmsPluginError, KmsV2Plugin};
use constellation_keyservice::MasterSecret;
use constellation_proto::kmsv2::key_management_service_client::KeyManagementServiceClient;
use constellation_proto::kmsv2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

fn master(byte: u8) -> MasterSecret {
    MasterSecret::new(
        SecretBytes::new(vec![byte; 32]),
        SecretBytes::new(vec![7; 32]),
    )
    .unwrap()
}

/// Starts the plugin on `socket`; the returned sender stops it.
async fn start(socket: &Path, m: &MasterSecret) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let plugin = KmsV2Plugin::new(m).unwrap();
    let path = socket.to_owned();
    tokio::spawn(async move {
        serve_unix(&path, plugin, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return stop;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "the KMS plugin did not start listening on {}",
        socket.display()
    );
}

async fn client(socket: &Path) -> KeyManagementServiceClient<Channel> {
    let path: PathBuf = socket.to_owned();
    // The URI is ignored: every connection goes to the unix socket, as the apiserver's does.
    let channel = tonic::transport::Endpoint::from_static("http://kms.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
}

#[tokio::test]
async fn apiserver_round_trip_survives_restart_and_rejects_other_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let cluster = master(1);
    let stop = start(&socket, &cluster).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let mut kms = client(&socket).await;
    let status = kms.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, "v2");
    assert_eq!(status.healthz, "ok");
    assert!(
        status.key_id.starts_with("constellation-kek-v1-"),
        "{}",
        status.key_id
    );

    let dek_seed = b"a 32-byte DEK seed from the API!".to_vec();
    let enc = kms
        .encrypt(EncryptRequest {
            plaintext: dek_seed.clone(),
            uid: "req-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enc.key_id, status.key_id);
    assert!(
        !enc.ciphertext
            .windows(dek_seed.len())
            .any(|w| w == dek_seed),
        "the plaintext must not appear in the ciphertext"
    );
    let again = kms
        .encrypt(EncryptRequest {
            plaintext: dek_seed.clone(),
            uid: "req-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        enc.ciphertext, again.ciphertext,
        "fresh nonce per encryption"
    );

    // Restart (same master secret, as after a node restart or Recover): still decrypts.
    stop.send(()).unwrap();
    let stop = start(&socket, &cluster).await;
    let mut kms = client(&socket).await;
    let dec = kms
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext.clone(),
            uid: "req-3".into(),
            key_id: enc.key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, dek_seed);

    // Tampered byte: refused, no plaintext.
    let mut tampered = enc.ciphertext.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = kms
        .decrypt(DecryptRequest {
            ciphertext: tampered,
            uid: "req-4".into(),
            key_id: enc.key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("does not authenticate"),
        "{}",
        err.message()
    );
    stop.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    // Another cluster's plugin (other master secret): another key ID, and even when asked under
    // the original key ID it cannot decrypt.
    let other = KmsV2Plugin::new(&master(2)).unwrap();
    assert_ne!(other.key_id(), enc.key_id);
    assert_eq!(
        other.decrypt(&enc.ciphertext, &enc.key_id),
        Err(KmsPluginError::KeyIdMismatch {
            expected: other.key_id().to_owned(),
            found: enc.key_id.clone()
        })
    );
    assert!(matches!(
        other.decrypt(&enc.ciphertext, other.key_id()),
        Err(KmsPluginError::NotAuthentic { .. })
    ));
}

#[test]
fn malformed_ciphertexts_are_refused_with_their_reason() {
    let plugin = KmsV2Plugin::new(&master(3)).unwrap();
    let id = plugin.key_id().to_owned();
    let ct = plugin.encrypt(b"seed").unwrap();
    assert_eq!(plugin.decrypt(&ct, &id).unwrap(), b"seed");
    for cut in 0..ct.len() {
        let r = plugin.decrypt(&ct[..cut], &id);
        assert!(
            matches!(
                r,
                Err(KmsPluginError::Truncated { .. } | KmsPluginError::NotAuthentic { .. })
            ),
            "cut at {cut}: {r:?}"
        );
    }
    let mut bad_version = ct.clone();
    bad_version[0] = 9;
    assert_eq!(
        plugin.decrypt(&bad_version, &id),
        Err(KmsPluginError::UnknownVersion { found: 9 })
    );
    assert_eq!(plugin.encrypt(b""), Err(KmsPluginError::EmptyPlaintext));
    // The key ID is authenticated data: the same bytes under another ID do not open.
    assert!(matches!(
        plugin.decrypt(&ct, "constellation-kek-v1-0000000000000000"),
        Err(KmsPluginError::KeyIdMismatch { .. })
    ));
}
