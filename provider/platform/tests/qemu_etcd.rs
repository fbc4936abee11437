//! Three control-plane VMs share one etcd cluster over the cluster network: the first is
//! initialized, the other two join through its join service and become etcd members (learner,
//! then voter), each on its encrypted state volume; a worker joins. Then the VM of the first
//! control plane is killed: the remaining two keep quorum, and a worker added afterwards is
//! admitted through their join services (its disk binding goes to etcd) and attests with the
//! same cluster ID. Finally every VM restarts and the control planes are recovered: etcd comes
//! back from the members' data directories on their volumes, and the nodes bound before the
//! restart keep their bindings.
//!
//! Needs what `qemu_cluster.rs` needs, plus Debian's etcd-server (in the node image).

mod common;

use std::time::Instant;

use common::*;
use constellation_attest::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_common::metadata::{ports, Role};
use constellation_common::node_status::{NodePhase, NodeStatus, ETCD_DAEMON, JOIN_SERVICE_DAEMON};
use constellation_platform::{Cloud, NodeRecord};

/// A control plane that is a voting etcd member of a cluster of `members` and serves joins.
fn serving_member(s: &NodeStatus, cluster_hex: &str, members: usize) -> bool {
    s.cluster_id() == Some(cluster_hex)
        && s.etcd_members.len() == members
        && s.daemons_ready(&[ETCD_DAEMON, JOIN_SERVICE_DAEMON])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_plane_vms_share_one_etcd_cluster_and_survive_the_loss_of_one() {
    let scratch = Scratch::new("etcd");
    let (mut cluster, measurements, _) = new_cluster(&scratch);
    let mut m = measurements.clone();
    m.0.remove(&CLUSTER_ID_PCR);

    let t_boot = Instant::now();
    let booted = cluster.add_and_boot(3, 1);
    let boot_time = t_boot.elapsed();
    let (cps, worker) = (booted[..3].to_vec(), booted[3].clone());

    let (cluster_id, _, init_time) = init(&cps[0], &measurements).await;
    let cluster_hex = hex::encode(&cluster_id);
    let t_join = Instant::now();
    for cp in &cps {
        wait_status(&mut cluster, cp, "a voting etcd member of 3", |s| {
            serving_member(s, &cluster_hex, 3)
        })
        .await;
    }
    wait_status(&mut cluster, &worker, "joined", |s| {
        s.cluster_id() == Some(cluster_hex.as_str())
    })
    .await;
    let join_time = t_join.elapsed();

    // 1 of 3 control planes lost (the one that ran Init): a new worker is still admitted, by a
    // join service that reads its policy and writes the disk binding through etcd's quorum.
    let lost = cps[0].clone();
    cluster
        .cloud()
        .halt(&lost.name)
        .expect("halt a control plane");
    let t_loss = Instant::now();
    let added = cluster.add(Role::Worker, 1);
    let late = cluster.boot(&added).pop().unwrap();
    wait_status(
        &mut cluster,
        &late,
        "joined with a control plane lost",
        |s| s.cluster_id() == Some(cluster_hex.as_str()),
    )
    .await;
    let loss_join_time = t_loss.elapsed();
    for node in [&cps[1], &cps[2], &worker, &late] {
        let validator = QemuVtpmValidator::new(vec![pinned(node)], m.clone());
        verify_cluster(&node.endpoint(ports::VERIFY), &validator, Some(&cluster_id))
            .await
            .unwrap_or_else(|e| panic!("node {} must verify: {e}", node.name));
    }

    // Every VM restarts: each control plane waits for Recover; recovered, its etcd member
    // restarts from the data directory on its volume, and the workers rejoin with their old
    // disk keys (their bindings survived in etcd).
    let t_restart = Instant::now();
    let all: Vec<String> = cluster
        .cloud()
        .list_nodes()
        .into_iter()
        .map(|n| n.name)
        .collect();
    let rebooted = cluster.boot(&all);
    let control_planes: Vec<&NodeRecord> = rebooted
        .iter()
        .filter(|n| n.role == Role::ControlPlane)
        .collect();
    for cp in &control_planes {
        wait_status(&mut cluster, cp, "waiting for Recover", |s| {
            s.phase == NodePhase::WaitingForRecover || s.cluster_id().is_some()
        })
        .await;
    }
    for cp in &control_planes {
        let waiting = cluster
            .cloud()
            .node_status(cp)
            .is_some_and(|s| s.phase == NodePhase::WaitingForRecover);
        if waiting {
            let answer = recover(cp, &m).await;
            assert!(answer.contains(&cluster_hex), "{answer}");
        }
    }
    for node in &rebooted {
        if node.role == Role::ControlPlane {
            wait_status(&mut cluster, node, "a voting etcd member of 3 again", |s| {
                serving_member(s, &cluster_hex, 3)
            })
            .await;
        } else {
            wait_status(&mut cluster, node, "rejoined", |s| {
                s.cluster_id() == Some(cluster_hex.as_str())
            })
            .await;
        }
        let console =
            std::fs::read_to_string(constellation_platform::QemuCloud::console_path(node)).unwrap();
        assert!(
            console.contains("state volume mounted")
                && !console.contains("made an ext4 file system"),
            "node {} mounts its existing volume after the restart; console:\n{}",
            node.name,
            cluster.cloud().console_tail(node, 30)
        );
    }
    let restart_time = t_restart.elapsed();
    eprintln!(
        "QEMU etcd cluster (3 control planes): boot of 4 VMs {boot_time:?}, Init {init_time:?}, \
         control planes voting members and worker joined {join_time:?}; with 1 of 3 lost a new \
         worker booted and joined in {loss_join_time:?}; full restart and recovery of 5 VMs \
         {restart_time:?}"
    );
}
