//! A stolen state disk: the disk file of a joined worker VM, copied into a new worker VM, is
//! not opened. The join service refuses the new node the disk's key (the disk is bound to the
//! worker that first claimed it), the new node reports that refusal as data, and it never
//! mounts the volume.
//!
//! Needs what `qemu_cluster.rs` needs (QEMU, OVMF, swtpm, the kernel in tools/, a built
//! bootstrapper).

mod common;

use common::*;
use constellation_common::metadata::Role;
use constellation_common::node_status::NodePhase;
use constellation_common::refusal::RefusalCheck;
use constellation_platform::{Cloud, QemuCloud};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_disk_copied_into_another_vm_is_refused_its_key_and_not_mounted() {
    let scratch = Scratch::new("stolen-disk");
    let (mut cluster, measurements, _) = new_cluster(&scratch);
    let booted = cluster.add_and_boot(1, 1);
    let (cp, victim) = (booted[0].clone(), booted[1].clone());
    let (cluster_id, _, _) = init(&cp, &measurements).await;
    let cluster_hex = hex::encode(&cluster_id);
    wait_status(&mut cluster, &victim, "joined", |s| {
        s.cluster_id() == Some(cluster_hex.as_str())
    })
    .await;

    // The victim powers off (its disk is consistent); its disk file goes into a new VM.
    cluster.cloud().halt(&victim.name).unwrap();
    let thief = cluster.add(Role::Worker, 1);
    let thief = cluster.cloud().node(&thief[0]).unwrap().clone();
    std::fs::copy(
        QemuCloud::state_disk_path(&victim),
        QemuCloud::state_disk_path(&thief),
    )
    .unwrap();
    let thief = cluster
        .boot(std::slice::from_ref(&thief.name))
        .pop()
        .unwrap();

    let status = {
        wait_status(&mut cluster, &thief, "a refused join", |s| {
            matches!(s.phase, NodePhase::JoinRefused { .. })
        })
        .await;
        cluster.cloud().node_status(&thief).unwrap()
    };
    let NodePhase::JoinRefused { refusal, .. } = &status.phase else {
        unreachable!("waited for JoinRefused")
    };
    assert_eq!(
        refusal.check,
        RefusalCheck::DiskBinding,
        "refused because the disk belongs to another node: {refusal}"
    );
    assert!(
        status.cluster_id().is_none(),
        "the thief is not in the cluster"
    );
    let console = std::fs::read_to_string(QemuCloud::console_path(&thief)).unwrap();
    assert!(
        !console.contains("state volume mounted"),
        "the copied volume must not be mounted; console:\n{}",
        cluster.cloud().console_tail(&thief, 30)
    );
}
