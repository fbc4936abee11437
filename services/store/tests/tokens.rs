//! Bootstrap tokens live under a lease: etcd deletes a token at its expiry on every member, with
//! no sweeper; only its ID and the SHA-256 of its secret are stored.

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use constellation_store::keys::{self, BootstrapTokenRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_is_gone_after_its_lifetime() {
    let cluster = TestCluster::start(1).await;
    let store = cluster.store(&cluster.endpoints()).await;
    let key = keys::bootstrap_token("worker-0");
    let token = BootstrapTokenRecord {
        node_name: "worker-0".into(),
        token_id: "abcdef".into(),
        secret_sha256: "00".repeat(32),
        expires_at_unix: 0,
    };
    store
        .put_expiring(&key, &token, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(token));
    let start = Instant::now();
    while store.get(&key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "token still there after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() >= Duration::from_secs(1), "gone too early");
}
