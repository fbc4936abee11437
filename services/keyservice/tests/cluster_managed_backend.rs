//! Cluster-managed master secret: persisted in a 0600 file, identical keys after a restart.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{data_key, RunningKeyService};
use constellation_keyservice::cluster_managed::{ClusterManagedBackend, CLUSTER_SECRET_FILE};
use constellation_keyservice::{BackendError, KeyService, MasterSecret, MasterSecretBackend};

#[tokio::test]
async fn restart_over_same_state_dir_gives_identical_keys() {
    let state = tempfile::tempdir().expect("tempdir");
    let master = MasterSecret::generate().expect("generate");
    let backend = ClusterManagedBackend::new(state.path());
    backend.store(&master).await.expect("store");

    let path = state.path().join(CLUSTER_SECRET_FILE);
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "master secret file mode");
    // Nothing but the final file is left behind by the atomic write.
    let names: Vec<_> = std::fs::read_dir(state.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(CLUSTER_SECRET_FILE)]);

    let first =
        RunningKeyService::start(KeyService::from_backend(&backend).await.expect("load")).await;
    let mut client = first.client().await;
    let disk_key = data_key(&mut client, "0b2c1d5e-disk", 32).await;
    let long_key = data_key(&mut client, "etcd", 64).await;
    assert_eq!(
        disk_key,
        master.derive("0b2c1d5e-disk", 32).expect("derive").expose()
    );
    first.stop().await;

    // "Restart": a new backend and service over the same directory.
    let restarted_backend = ClusterManagedBackend::new(state.path());
    let reloaded = restarted_backend.load().await.expect("load after restart");
    assert_eq!(reloaded, master);
    let second = RunningKeyService::start(KeyService::new(reloaded)).await;
    let mut client = second.client().await;
    assert_eq!(data_key(&mut client, "0b2c1d5e-disk", 32).await, disk_key);
    assert_eq!(data_key(&mut client, "etcd", 64).await, long_key);
    second.stop().await;
}

#[tokio::test]
async fn refuses_to_replace_a_stored_secret() {
    let state = tempfile::tempdir().expect("tempdir");
    let backend = ClusterManagedBackend::new(state.path());
    let original = MasterSecret::generate().expect("generate");
    backend.store(&original).await.expect("store");
    let err = backend
        .store(&MasterSecret::generate().expect("generate"))
        .await
        .expect_err("second store must fail");
    assert!(
        matches!(err, BackendError::AlreadyInitialized { .. }),
        "{err}"
    );
    assert_eq!(backend.load().await.expect("load"), original);
}

#[tokio::test]
async fn missing_and_corrupt_files_give_typed_errors_without_secrets() {
    let state = tempfile::tempdir().expect("tempdir");
    let backend = ClusterManagedBackend::new(state.path());
    let err = backend.load().await.expect_err("nothing stored");
    assert!(matches!(err, BackendError::NotInitialized { .. }), "{err}");

    std::fs::write(
        backend.path(),
        br#"{"version":1,"master_secret":"zz-topsecret","salt":"00"}"#,
    )
    .expect("write");
    let err = backend.load().await.expect_err("corrupt");
    assert!(matches!(err, BackendError::CorruptFile { .. }), "{err}");
    assert!(!err.to_string().contains("topsecret"), "{err}");

    std::fs::write(
        backend.path(),
        br#"{"version":1,"master_secret":12345678,"salt":"00"}"#,
    )
    .expect("write");
    let err = backend.load().await.expect_err("corrupt");
    assert!(!err.to_string().contains("12345678"), "{err}");
}

#[test]
fn debug_output_never_shows_the_master_secret() {
    let master = MasterSecret::new(
        b"hunter2hunter2hunter2".to_vec().into(),
        b"saltysaltysalty".to_vec().into(),
    )
    .expect("master");
    let printed = format!("{master:?}");
    assert!(
        !printed.contains("hunter2") && !printed.contains("salty"),
        "{printed}"
    );
    assert!(!printed.contains(&hex::encode("hunter2")), "{printed}");
}
