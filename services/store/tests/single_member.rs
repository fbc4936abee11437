//! One member: the launcher's supervision (a crashed member is started again, its TLS key is
//! private), and bootstrap tokens under a lease (etcd deletes a token at its expiry on every
//! member, with no sweeper; only its ID and the SHA-256 of its secret are stored).

mod common;

use std::time::{Duration, Instant};

use common::{wait_writable, TestCluster};
use constellation_store::keys::{self, BootstrapTokenRecord};
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_is_started_again_with_its_data() {
    let cluster = TestCluster::start(1).await;
    let config = &cluster.configs[0];
    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(config.tls_dir().join("member.key")), 0o600);
    assert_eq!(mode(config.data_dir()), 0o700);

    let store = cluster.store(&cluster.endpoints()).await;
    let key = keys::node("probe");
    let member = cluster.members[0].as_ref().unwrap();
    assert_eq!(member.starts(), 1);
    let pid = member.pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let crashed = Instant::now();
    let back = wait_writable(&store, Duration::from_secs(20)).await;
    assert_eq!(member.starts(), 2, "restarted once");
    assert_ne!(member.pid(), Some(pid));
    // What was written before the crash is still there (the same data directory).
    assert!(store.get(&key).await.unwrap().is_some());
    println!(
        "a SIGKILLed single member was restarted and writable again after {:?}",
        crashed.elapsed().max(back)
    );
}
