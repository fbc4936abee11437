//! A real cluster of QEMU VMs: one control plane and one worker boot the node image under
//! OVMF with their own swtpm; the control plane is attested over aTLS (through its host
//! forward) against the image's precalculated measurements and initialized (state volumes with
//! dm-crypt and dm-integrity); the worker joins
//! through the control plane's join service; both attest with PCR 15 = the cluster ID; the
//! state disk files on the host hold no known secret; a rebooted worker rejoins and mounts its
//! existing volume; a rebooted control plane waits for Recover and, recovered with the master
//! secret, mounts its existing volume; destroy leaves no process and no file.
//!
//! Needs `make install` (qemu-system-x86, ovmf, swtpm, busybox-static, e2fsprogs, the kernel
//! in tools/) and a built bootstrapper (`cargo build -p constellation-bootstrapper`, or
//! `$CONSTELLATION_BOOTSTRAPPER`).

mod common;

use std::time::Instant;

use common::*;
use constellation_attest::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_common::node_status::NodePhase;
use constellation_platform::{process, Cloud, QemuCloud};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_and_a_worker_vm_form_a_cluster_on_encrypted_disks() {
    let scratch = Scratch::new("cluster");
    let t0 = Instant::now();
    let (mut cluster, measurements, build_time) = new_cluster(&scratch);
    let root = cluster.cloud().root().to_owned();
    let accel = if cluster.cloud().uses_kvm() {
        "KVM"
    } else {
        "TCG"
    };

    // Both VMs boot at once; the worker retries its join until the control plane serves it.
    let t_boot = Instant::now();
    let booted = cluster.add_and_boot(1, 1);
    let boot_time = t_boot.elapsed();
    let (cp, worker) = (booted[0].clone(), booted[1].clone());
    assert_eq!(
        cluster.cloud().init_endpoint(),
        Some(cp.endpoint(constellation_common::metadata::ports::BOOTSTRAPPER))
    );

    let (cluster_id, attest_time, init_time) = init(&cp, &measurements).await;
    assert_eq!(cluster_id.len(), 32);
    let cluster_hex = hex::encode(&cluster_id);

    let join_time = wait_status(&mut cluster, &worker, "joined", |s| {
        s.cluster_id() == Some(cluster_hex.as_str())
    })
    .await;
    let cp_status = cluster
        .cloud()
        .node_status(&cp)
        .expect("control plane status");
    assert_eq!(cp_status.cluster_id(), Some(cluster_hex.as_str()));

    // Both nodes attest with the image's measurements and PCR 15 = the cluster ID.
    let t_verify = Instant::now();
    let mut m = measurements.clone();
    m.0.remove(&CLUSTER_ID_PCR);
    for node in [&cp, &worker] {
        let validator = QemuVtpmValidator::new(vec![pinned(node)], m.clone());
        verify_cluster(
            &node.endpoint(constellation_common::metadata::ports::VERIFY),
            &validator,
            Some(&cluster_id),
        )
        .await
        .unwrap_or_else(|e| panic!("node {} must verify: {e}", node.name));
    }
    let verify_time = t_verify.elapsed();

    // Inside each guest the volume was opened with dm-crypt and mounted at the state folder.
    for node in [&cp, &worker] {
        let console = std::fs::read_to_string(QemuCloud::console_path(node)).unwrap();
        assert!(
            console.contains("state volume mounted"),
            "node {}: no mounted state volume; console:\n{}",
            node.name,
            cluster.cloud().console_tail(node, 30)
        );
    }

    // The disk files on the host reveal nothing: no master secret, no disk key, no cluster ID
    // (the node's state files on the volume carry it in hex), and the header is no longer the
    // first-boot one.
    for node in [&cp, &worker] {
        let disk = std::fs::read(QemuCloud::state_disk_path(node)).unwrap();
        let uuid = luks_uuid(&disk);
        let disk_key = constellation_common::kdf::derive_key(
            &MASTER_SECRET,
            &MASTER_SALT,
            &uuid,
            constellation_common::kdf::DEFAULT_KEY_LEN,
        )
        .unwrap();
        assert!(
            !contains(&disk[..4096], b"constellation-first-boot"),
            "node {}: the volume was re-keyed",
            node.name
        );
        // The LUKS2 header's segment carries dm-integrity with HMAC-SHA256 sector tags.
        assert!(
            contains(&disk[..64 << 10], b"hmac(sha256)"),
            "node {}: the volume has integrity protection",
            node.name
        );
        for (what, secret) in [
            ("master secret", MASTER_SECRET.to_vec()),
            (
                "master secret (hex)",
                hex::encode(MASTER_SECRET).into_bytes(),
            ),
            ("disk key", disk_key.expose().to_vec()),
            (
                "disk key (hex)",
                hex::encode(disk_key.expose()).into_bytes(),
            ),
            ("cluster ID (hex)", cluster_hex.clone().into_bytes()),
        ] {
            assert!(
                !contains(&disk, &secret),
                "node {}: the {what} is readable in the state disk file",
                node.name
            );
        }
    }

    // A rebooted worker rejoins and opens the volume it had: no new file system is made, and
    // the old one mounts (it would not if the volume's contents were lost).
    let t_reboot = Instant::now();
    let worker = cluster
        .cloud()
        .restart_node(&worker.name)
        .unwrap_or_else(|e| panic!("worker reboots: {e}"));
    wait_status(&mut cluster, &worker, "rejoined", |s| {
        s.cluster_id() == Some(cluster_hex.as_str())
    })
    .await;
    let rejoin_time = t_reboot.elapsed();
    let console = std::fs::read_to_string(QemuCloud::console_path(&worker)).unwrap();
    assert!(
        console.contains("state volume mounted") && !console.contains("made an ext4 file system"),
        "the rebooted worker mounts its existing volume; console:\n{}",
        cluster.cloud().console_tail(&worker, 30)
    );
    let validator = QemuVtpmValidator::new(vec![pinned(&worker)], m.clone());
    verify_cluster(
        &worker.endpoint(constellation_common::metadata::ports::VERIFY),
        &validator,
        Some(&cluster_id),
    )
    .await
    .unwrap_or_else(|e| panic!("rebooted worker must verify: {e}"));

    // A rebooted control plane VM cannot open its volume (its phase and record are on it): it
    // waits for Recover, which opens and mounts the volume with the disk key derived from the
    // master secret; it then serves its join service again with the same cluster ID.
    let t_cp_reboot = Instant::now();
    let cp = cluster
        .cloud()
        .restart_node(&cp.name)
        .unwrap_or_else(|e| panic!("control plane reboots: {e}"));
    wait_status(&mut cluster, &cp, "waiting for Recover", |s| {
        s.phase == NodePhase::WaitingForRecover
    })
    .await;
    let answer = recover(&cp, &m).await;
    assert!(answer.contains(&cluster_hex), "{answer}");
    wait_status(&mut cluster, &cp, "recovered", |s| {
        s.cluster_id() == Some(cluster_hex.as_str())
    })
    .await;
    let cp_recover_time = t_cp_reboot.elapsed();
    let console = std::fs::read_to_string(QemuCloud::console_path(&cp)).unwrap();
    assert!(
        console.contains("state volume mounted") && !console.contains("made an ext4 file system"),
        "the recovered control plane mounts its existing volume; console:\n{}",
        cluster.cloud().console_tail(&cp, 30)
    );
    let validator = QemuVtpmValidator::new(vec![pinned(&cp)], m.clone());
    verify_cluster(
        &cp.endpoint(constellation_common::metadata::ports::VERIFY),
        &validator,
        Some(&cluster_id),
    )
    .await
    .unwrap_or_else(|e| panic!("recovered control plane must verify: {e}"));

    // Destroy leaves no QEMU, swtpm, metadata or relay process and no file.
    let pids: Vec<u32> = [&cp, &worker].iter().map(|n| n.pid).collect();
    let swtpms: Vec<_> = [&cp, &worker]
        .iter()
        .map(|n| n.swtpm.clone().expect("vTPM recorded"))
        .collect();
    cluster.0.take().unwrap().destroy().expect("destroy");
    assert!(!root.exists(), "cluster folder removed");
    assert!(
        process::pids_under(&root).is_empty(),
        "no process names the cluster folder"
    );
    for (pid, tpm) in pids.iter().zip(&swtpms) {
        assert!(!process::running(*pid, ""), "QEMU {pid} stopped");
        assert!(!tpm.is_alive(), "swtpm {} stopped", tpm.pid);
    }
    eprintln!(
        "timing ({}): image build {:.1} s; both VMs booted to their bootstrapper {:.1} s; attest {:.1} s; Init {:.1} s; worker join after Init {:.1} s; verify both {:.1} s; worker reboot to rejoined {:.1} s; control plane reboot to recovered {:.1} s; total {:.1} s",
        accel,
        build_time.as_secs_f64(),
        boot_time.as_secs_f64(),
        attest_time.as_secs_f64(),
        init_time.as_secs_f64(),
        join_time.as_secs_f64(),
        verify_time.as_secs_f64(),
        rejoin_time.as_secs_f64(),
        cp_recover_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
