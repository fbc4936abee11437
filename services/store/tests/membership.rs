//! etcd's member API as a control plane joins and is deleted: the new member is added as a
//! learner, started with the member list etcd returned, promoted once caught up, serves what was
//! written before it joined, and is removed again. A learner that never starts costs no quorum.

mod common;

use std::time::Duration;

use common::{disk, member_config, node, wait_writable, TestCluster};
use constellation_attestation::SystemClock;
use constellation_joinservice::disk_bindings::DiskBindings;
use constellation_joinservice::{Claim, EtcdDiskBindings};
use constellation_store::SupervisedMember;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_control_plane_becomes_a_voter_and_a_deleted_one_leaves() {
    let mut cluster = TestCluster::start(3).await;
    let store = cluster.store(&cluster.endpoints()).await;
    let owner = node("worker-1", 1);
    EtcdDiskBindings::new(store.clone())
        .claim(&disk(1), &owner)
        .await
        .unwrap();

    let config = member_config(cluster.dir.path(), "cp-3");
    let creds = cluster
        .pki
        .etcd_member_cert("cp-3", &[config.client_addr.ip()], &SystemClock)
        .unwrap();
    let (member, id) = SupervisedMember::join(&store, config.clone(), &creds)
        .await
        .unwrap();
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 4);
    assert!(members.iter().all(|m| !m.is_learner), "{members:?}");
    assert!(members.iter().any(|m| m.id == id && m.name == "cp-3"));

    // The new member serves what was written before it joined, and takes writes.
    let through_new = EtcdDiskBindings::new(cluster.store(&[config.client_url()]).await);
    assert_eq!(
        through_new.owner(&disk(1)).await.unwrap(),
        Some(owner.clone())
    );
    assert_eq!(
        through_new
            .claim(&disk(1), &node("intruder", 9))
            .await
            .unwrap(),
        Claim::BoundTo(owner)
    );

    // The control plane is deleted: its member leaves, the cluster is three again.
    store.remove_member(id).await.unwrap();
    member.stop(Signal::SIGTERM).await;
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| m.id != id));

    // A learner whose control plane never comes up: with one voter down the other two still
    // form the quorum (a voter that never came up would make it 2 of 4, no quorum).
    let ghost = member_config(cluster.dir.path(), "ghost");
    let (ghost_id, _) = store.add_learner(&ghost.peer_url()).await.unwrap();
    let leader = cluster.leader().await;
    cluster.stop(leader, Signal::SIGKILL).await;
    let survivors: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| cluster.configs[i].client_url())
        .collect();
    let remaining = cluster.store(&survivors).await;
    wait_writable(&remaining, Duration::from_secs(10)).await;
    remaining.remove_member(ghost_id).await.unwrap();
    assert_eq!(remaining.members().await.unwrap().len(), 3);
}
