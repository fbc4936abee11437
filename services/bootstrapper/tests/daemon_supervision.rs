//! The bootstrapper supervises a control plane's daemons (join service, key service,
//! verification service) like kubelet its static pods: each is killed with SIGKILL while
//! workers join, the supervisor starts it again (a new pid, `restarts` and the exit in the
//! node's status), the cluster admits the workers that joined meanwhile, and a worker that
//! joined before the kills gets the same disk key after them. The API server's
//! `EncryptionConfiguration` written at Init points at the key service daemon's KMS v2 socket,
//! which a client playing kube-apiserver's part uses before and after the key service's restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use constellation_bootstrapper::controlplane::ENCRYPTION_CONFIGURATION_FILE;
use constellation_bootstrapper::daemons::{JOIN_SERVICE, KEY_SERVICE, VERIFY};
use constellation_bootstrapper::kubernetes::EncryptionConfiguration;
use constellation_bootstrapper::statedisk;
use constellation_common::metadata::{ports, Role};
use constellation_common::node_status::{DaemonHealth, DaemonState};
use constellation_keyservice::testing::kms_client;
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::*;

/// The daemon's health as the control plane last reported it.
fn health(c: &mut TestCluster, cp: &NodeRecord, daemon: &str) -> Option<DaemonHealth> {
    c.cloud().node(&cp.name)?.status()?.daemon(daemon).cloned()
}

/// Waits until `daemon` runs again as another process than `old_pid`, ready, after a restart.
async fn wait_restarted(c: &mut TestCluster, cp: &NodeRecord, daemon: &str, old_pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(c, cp, daemon);
        if let Some(h) = &h {
            if h.pid.is_some_and(|p| p != old_pid) && h.state == DaemonState::Ready {
                assert!(h.restarts >= 1, "{h:?}");
                assert_eq!(h.last_exit.as_deref(), Some("signal: 9 (SIGKILL)"), "{h:?}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{daemon} not restarted: {h:?}\n{}",
            std::fs::read_to_string(cp.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The KMS v2 socket the control plane's EncryptionConfiguration names for Secrets.
fn kms_socket_of(cp: &NodeRecord) -> PathBuf {
    let path = cp
        .dir
        .join("kubernetes")
        .join(ENCRYPTION_CONFIGURATION_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let config: EncryptionConfiguration = serde_yaml::from_str(&text).unwrap();
    assert_eq!(config.resources[0].resources, ["secrets"]);
    let Some(kms) = &config.resources[0].providers[0].kms else {
        panic!("the first provider is not KMS: {text}");
    };
    assert_eq!(kms.api_version, "v2");
    PathBuf::from(kms.endpoint.strip_prefix("unix://").unwrap())
}

/// kube-apiserver's calls on the plugin (Status, Encrypt, Decrypt), once the socket answers.
async fn kms_round_trip(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while kms_client(socket).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    constellation_keyservice::testing::kms_round_trip(socket, b"a 32-byte DEK seed from the API!")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_daemon_killed_during_a_join_storm_is_restarted_and_no_key_is_lost() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("supervise");
    let (cp, early) = c.control_plane_and_worker();
    let ok = init(c.fresh_validator(&cp), &cp).await;
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &early, &ok.cluster_id).await;
    let (uuid, key) = disk_key(&early);
    statedisk::verify_key(&disk_of(&early), &key).unwrap();
    for daemon in [VERIFY, KEY_SERVICE, JOIN_SERVICE] {
        let h = health(&mut c, &cp, daemon).unwrap_or_else(|| panic!("no {daemon} in the status"));
        assert_eq!(h.state, DaemonState::Ready, "{h:?}");
    }
    let kms_socket = kms_socket_of(&cp);
    kms_round_trip(&kms_socket).await;

    for daemon in [JOIN_SERVICE, KEY_SERVICE, VERIFY] {
        let pid = health(&mut c, &cp, daemon).unwrap().pid.unwrap();
        // The storm: two workers boot and start joining; the daemon dies meanwhile.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        });
        let storm = c.cloud().create_nodes(Role::Worker, 2).unwrap();
        killer.join().unwrap();
        wait_restarted(&mut c, &cp, daemon, pid).await;
        // Every worker of the storm is admitted (after the restart, where the kill hit it).
        let all = c.cloud().list_nodes();
        for w in &storm {
            wait_joined(&c, &all, w, &ok.cluster_id).await;
            let (_, key) = disk_key(w);
            statedisk::verify_key(&disk_of(w), &key).unwrap();
        }
        if daemon == KEY_SERVICE {
            kms_round_trip(&kms_socket).await;
        }
        // The control plane itself still attests through the restarted verification daemon.
        if daemon == VERIFY {
            assert!(serves(&cp, ports::VERIFY));
            wait_joined(&c, &all, &cp, &ok.cluster_id).await;
        }
    }

    // No key lost: the worker that joined before the kills rejoins after a crash and gets the
    // same disk key (it unlocks the same disk).
    c.cloud().crash(&early.name).unwrap();
    let early = c.cloud().boot(&early.name).unwrap();
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &early, &ok.cluster_id).await;
    assert_eq!(statedisk::uuid(&disk_of(&early)).unwrap().to_string(), uuid);
    statedisk::verify_key(&disk_of(&early), &key).unwrap();
    let log = std::fs::read_to_string(early.log_path()).unwrap();
    assert!(
        log.contains("state disk unlocked with the disk key from the join ticket"),
        "{log}"
    );
}
