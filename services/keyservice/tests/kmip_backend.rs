//! KMIP backend against a real PyKMIP server: the master secret is wrapped by a KEK in the KMS,
//! survives restarts of the node and outages of the KMS.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{data_key, RunningKeyService};
use constellation_keyservice::kmip::{KekSource, KmipBackend, RetryPolicy, WRAPPED_SECRET_FILE};
use constellation_keyservice::testing::PyKmipServer;
use constellation_keyservice::{BackendError, KeyService, MasterSecret, MasterSecretBackend};
use serde::Deserialize;

const CLUSTER: &str = "test-cluster";

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    }
}

fn backend(server: &PyKmipServer, kek: KekSource, state_dir: &Path, cluster: &str) -> KmipBackend {
    KmipBackend::new(server.kmip_settings(kek, fast_retry()), state_dir, cluster)
        .expect("KMIP backend")
}

#[derive(Deserialize)]
struct WrappedFileKekId {
    kek_id: String,
}

fn kek_id_of(state_dir: &Path) -> String {
    let bytes = std::fs::read(state_dir.join(WRAPPED_SECRET_FILE)).expect("wrapped file");
    serde_json::from_slice::<WrappedFileKekId>(&bytes)
        .expect("wrapped file JSON")
        .kek_id
}

#[tokio::test]
async fn wrapped_master_secret_survives_restart_and_kms_outage() {
    let started = Instant::now();
    let mut server = PyKmipServer::start().expect("start PyKMIP");
    eprintln!("PyKMIP listening after {:?}", started.elapsed());

    let state = tempfile::tempdir().expect("tempdir");
    let kek = KekSource::Create {
        name: "constellation-test-kek".into(),
    };
    let master = MasterSecret::generate().expect("generate");
    let first = backend(&server, kek.clone(), state.path(), CLUSTER);

    let t = Instant::now();
    first
        .store(&master)
        .await
        .expect("store (Create + Activate + Get KEK)");
    eprintln!(
        "store: Create+Activate KEK, Get KEK, wrap, write: {:?}",
        t.elapsed()
    );

    // Only the wrapped blob is on disk: neither the secret nor the salt in any encoding.
    let wrapped_path = state.path().join(WRAPPED_SECRET_FILE);
    let wrapped_bytes = std::fs::read(&wrapped_path).expect("wrapped file");
    let wrapped_text = String::from_utf8_lossy(&wrapped_bytes);
    for part in [master.secret().expose(), master.salt().expose()] {
        assert!(!wrapped_text.contains(&hex::encode(part)));
        assert!(!wrapped_bytes.windows(part.len()).any(|w| w == part));
    }
    let kek_id = kek_id_of(state.path());
    assert!(!kek_id.is_empty());

    // Node restart: a new backend over the same state directory fetches the KEK and unwraps.
    let restarted = backend(&server, kek.clone(), state.path(), CLUSTER);
    let t = Instant::now();
    let reloaded = restarted.load().await.expect("load after restart");
    eprintln!("load: Get KEK + unwrap: {:?}", t.elapsed());
    assert_eq!(reloaded, master);
    let service = RunningKeyService::start(KeyService::new(reloaded)).await;
    let mut client = service.client().await;
    let disk_key = data_key(&mut client, "disk-uuid", 32).await;
    assert_eq!(
        disk_key,
        master.derive("disk-uuid", 32).expect("derive").expose()
    );
    service.stop().await;

    // KMS outage: a clear typed error naming the endpoint after bounded retries; no panic; the
    // wrapped key file is untouched.
    server.stop();
    let t = Instant::now();
    let err = restarted.load().await.expect_err("KMS is down");
    eprintln!(
        "load with KMS down ({} attempts): {:?}",
        fast_retry().attempts,
        t.elapsed()
    );
    match &err {
        BackendError::KmsUnreachable {
            endpoint, attempts, ..
        } => {
            assert_eq!(endpoint, &server.endpoint());
            assert_eq!(*attempts, 3);
        }
        other => panic!("expected KmsUnreachable, got {other:?}"),
    }
    assert!(err.to_string().contains(&server.endpoint()), "{err}");
    assert_eq!(
        std::fs::read(&wrapped_path).expect("still there"),
        wrapped_bytes
    );

    // Storing a new secret while the KMS is down fails the same way and writes nothing.
    let other_state = tempfile::tempdir().expect("tempdir");
    let err = backend(&server, kek.clone(), other_state.path(), CLUSTER)
        .store(&MasterSecret::generate().expect("generate"))
        .await
        .expect_err("KMS is down");
    assert!(matches!(err, BackendError::KmsUnreachable { .. }), "{err}");
    assert!(!other_state.path().join(WRAPPED_SECRET_FILE).exists());

    // The KMS comes back (same database): the same backend works again, keys identical.
    server.start_again().expect("restart PyKMIP");
    let again = restarted.load().await.expect("load after KMS is back");
    assert_eq!(again, master);
    assert_eq!(
        again.derive("disk-uuid", 32).expect("derive").expose(),
        &disk_key[..]
    );

    // An existing KEK (by id) can wrap another cluster's secret.
    let existing_state = tempfile::tempdir().expect("tempdir");
    let existing = backend(
        &server,
        KekSource::Existing { id: kek_id.clone() },
        existing_state.path(),
        "second-cluster",
    );
    let second_master = MasterSecret::generate().expect("generate");
    existing
        .store(&second_master)
        .await
        .expect("store with existing KEK");
    assert_eq!(kek_id_of(existing_state.path()), kek_id);
    assert_eq!(existing.load().await.expect("load"), second_master);

    // Round-trip timing with a warm server.
    let t = Instant::now();
    for _ in 0..5 {
        restarted.load().await.expect("load");
    }
    eprintln!(
        "load (TLS connect + Get + unwrap), mean of 5: {:?}",
        t.elapsed() / 5
    );
}

#[tokio::test]
async fn wrong_cluster_tampering_and_unknown_kek_are_typed_errors() {
    let server = PyKmipServer::start().expect("start PyKMIP");
    let state = tempfile::tempdir().expect("tempdir");
    let kek = KekSource::Create {
        name: "constellation-test-kek-2".into(),
    };
    let master = MasterSecret::generate().expect("generate");
    backend(&server, kek.clone(), state.path(), CLUSTER)
        .store(&master)
        .await
        .expect("store");

    // Never replaces an existing wrapped secret.
    let err = backend(&server, kek.clone(), state.path(), CLUSTER)
        .store(&MasterSecret::generate().expect("generate"))
        .await
        .expect_err("second store");
    assert!(
        matches!(err, BackendError::AlreadyInitialized { .. }),
        "{err}"
    );

    // A node of another cluster does not accept this blob.
    let err = backend(&server, kek.clone(), state.path(), "other-cluster")
        .load()
        .await
        .expect_err("cluster mismatch");
    assert!(matches!(err, BackendError::ClusterMismatch { .. }), "{err}");

    // A modified blob does not unwrap (GCM tag); a copy keeps the original intact.
    let tampered_state = tempfile::tempdir().expect("tempdir");
    let original = std::fs::read_to_string(state.path().join(WRAPPED_SECRET_FILE)).expect("read");
    let wrapped_field = "\"wrapped\": \"";
    let at = original.find(wrapped_field).expect("wrapped field") + wrapped_field.len();
    let flipped = if original.as_bytes()[at] == b'0' {
        "1"
    } else {
        "0"
    };
    let tampered = format!("{}{}{}", &original[..at], flipped, &original[at + 1..]);
    std::fs::write(tampered_state.path().join(WRAPPED_SECRET_FILE), tampered).expect("write");
    let err = backend(&server, kek.clone(), tampered_state.path(), CLUSTER)
        .load()
        .await
        .expect_err("tampered");
    assert!(matches!(err, BackendError::UnwrapFailed { .. }), "{err}");

    // An unknown KEK id is a refusal by the KMS, not an outage, and is not retried.
    let unknown_state = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let err = backend(
        &server,
        KekSource::Existing { id: "99999".into() },
        unknown_state.path(),
        CLUSTER,
    )
    .store(&master)
    .await
    .expect_err("unknown KEK");
    assert!(
        matches!(
            err,
            BackendError::KmsRejected {
                operation: "Get",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "was retried: {:?}",
        t.elapsed()
    );
    assert!(!unknown_state.path().join(WRAPPED_SECRET_FILE).exists());
}

#[test]
fn stored_kmip_settings_round_trip_in_a_0600_file_and_are_not_replaced() {
    use constellation_common::secret::SecretBytes;
    use constellation_keyservice::kmip::{StoredKmipSettings, SETTINGS_FILE};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    assert!(StoredKmipSettings::load(dir.path()).unwrap().is_none());
    let key = b"-----BEGIN PRIVATE KEY-----\nsecret key bytes\n-----END PRIVATE KEY-----\n";
    let settings = StoredKmipSettings {
        endpoint: "127.0.0.1:5696".into(),
        server_ca_pem: b"ca pem".to_vec(),
        client_cert_pem: b"cert pem".to_vec(),
        client_key_pem: SecretBytes::new(key.to_vec()),
        kek_id: "7".into(),
    };
    settings.store(dir.path()).unwrap();
    let path = dir.path().join(SETTINGS_FILE);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let loaded = StoredKmipSettings::load(dir.path()).unwrap().unwrap();
    assert_eq!(loaded.endpoint, settings.endpoint);
    assert_eq!(loaded.server_ca_pem, settings.server_ca_pem);
    assert_eq!(loaded.client_cert_pem, settings.client_cert_pem);
    assert_eq!(loaded.client_key_pem, settings.client_key_pem);
    assert_eq!(loaded.kek_id, settings.kek_id);
    assert!(!format!("{loaded:?}").contains("secret key"));
    assert!(matches!(
        settings.store(dir.path()),
        Err(BackendError::AlreadyInitialized { .. })
    ));

    // Corrupt: a typed error that does not echo the file's content.
    std::fs::write(&path, br#"{"version":1,"endpoint":"x","server_ca_pem":"zz","client_cert_pem":"","client_key_pem":"73656372","kek_id":""}"#).unwrap();
    let e = StoredKmipSettings::load(dir.path()).unwrap_err();
    assert!(matches!(e, BackendError::CorruptFile { .. }), "{e}");
    assert!(!e.to_string().contains("73656372"), "{e}");
}
