//! A real QEMU cluster through Terraform 1.15.5: `constellation_image` with platform qemu builds
//! the bootable node image and precalculates its PCRs; `constellation_cluster` with platform qemu
//! boots one control plane and one worker as VMs (OVMF, their own swtpm vTPM, dm-crypt state
//! disks), attests the control plane over aTLS against those PCRs, initializes it and waits for
//! the worker to join. One cluster serves every step (TCG boots cost most of a minute):
//! - every node verifies independently with `attest verify cluster` (fresh evidence, pinned AK,
//!   the image's PCRs, PCR 15 = the cluster ID);
//! - the provider reported each node's boot phases (firmware, kernel, bootstrapper up);
//! - a worker VM's QEMU process killed out of band shows in the plan and apply repairs it;
//! - scaling up boots, attests and joins another worker VM; scaling down removes it (QEMU,
//!   swtpm, folder); `terraform import` from the cluster URI gives a state with no diff;
//! - every VM killed: apply boots them, recovers the control plane with Recover (its state is
//!   on its encrypted volume) and the worker rejoins, with the same cluster ID;
//! - a rolling upgrade to another image folder replaces every VM, worker first, with the same
//!   cluster ID;
//! - destroy leaves no QEMU, swtpm or metadata process and no file.
//!
//! A second test boots an image whose initrd was changed by one byte after its PCRs were
//! precalculated: the control plane is refused, the diagnostic names it and PCR[9] (the initrd
//! is measured into PCR 9), and nothing is left behind.
//!
//! Needs `make install` (qemu-system-x86, ovmf, swtpm, the kernel in tools/) and `make build`
//! (provider, bootstrapper, daemons and `attest` in target/debug).

use std::path::{Path, PathBuf};
use std::process::Command;

use acceptance_tests::cluster_harness::{
    processes_mentioning, sibling_binary, verify_node, write_measurements, Cleanup, Node,
    ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::{hcl, workspace_root, Terraform, TfVersion, REQUIRED_PROVIDERS};

/// One control plane and one worker on the QEMU platform; `var.image_reference` overrides the
/// image (a tampered copy).
fn config() -> String {
    let mut cluster = hcl::Cluster::of_image("qacc", "qemu", "img")
        .with(&["kubeconfig_path = \"${path.module}/kubeconfig\""]);
    cluster.image_reference =
        "coalesce(var.image_reference, constellation_image.img.reference)".into();
    cluster.worker_count = "var.workers".into();
    format!(
        "{}{}{}{}{OUTPUTS}",
        hcl::variable("image_reference", "string", "null"),
        hcl::variable("workers", "number", "1"),
        hcl::image("img", "qemu", "v0.1.0", "BOOT"),
        cluster.hcl()
    )
}

const OUTPUTS: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = constellation_image.img.measurements }
output "image_reference" { value = constellation_image.img.reference }
"#;

/// The unpacked kernel package the image boots: `$CONSTELLATION_KERNEL_DIR`, else the one
/// `make image-kernel` put under tools/kernel/.
fn kernel_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONSTELLATION_KERNEL_DIR").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let root = workspace_root().join("tools/kernel");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        dirs.len(),
        1,
        "expected one unpacked kernel under {} (run `make image-kernel`), found {dirs:?}",
        root.display()
    );
    dirs[0].clone()
}

/// A Terraform working directory with the QEMU configuration, initialized; provider logs at
/// INFO go to `provider.log` in its scratch folder.
fn setup() -> (Terraform, PathBuf) {
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(TfVersion::V1_15)
        .unwrap_or_else(|e| panic!("{e}"))
        .env(
            "CONSTELLATION_KERNEL_DIR",
            kernel_dir().display().to_string(),
        );
    let log = tf.scratch().join("provider.log");
    let tf = tf
        .env("TF_LOG_PROVIDER", "INFO")
        .env("TF_LOG_PATH", log.display().to_string());
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        config().replace("BOOT", &boot.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    (tf, log)
}

#[derive(serde::Deserialize)]
struct QemuNode {
    record: Node,
}

#[derive(serde::Deserialize)]
struct QemuPlatformJson {
    nodes: Vec<QemuNode>,
}

/// The VMs the QEMU platform recorded in the cluster folder.
fn vms(root: &Path) -> Vec<Node> {
    let bytes = std::fs::read(root.join("platform.json")).expect("platform.json exists");
    let state: QemuPlatformJson = serde_json::from_slice(&bytes).expect("platform.json parses");
    state.nodes.into_iter().map(|n| n.record).collect()
}

/// Every VM verifies with `attest verify cluster` against the image's precalculated PCRs.
fn assert_all_verified(tf: &Terraform, root: &Path, cluster_id: &str, expected: usize) {
    let measurements = tf.scratch().join("measurements.json");
    write_measurements(&tf.output("measurements"), &measurements);
    let nodes = vms(root);
    assert_eq!(nodes.len(), expected, "{:?}", nodes);
    for node in &nodes {
        let (ok, text) = verify_node(&tf.scratch(), node, &measurements, cluster_id);
        assert!(ok, "VM {} failed verification:\n{text}", node.name);
    }
}

/// Nothing of the cluster is left: no process names its folder (QEMU, swtpm, the metadata
/// `cat` and join relays all do) and the folder is gone.
fn assert_nothing_left(root: &Path) {
    let left = processes_mentioning(&root.display().to_string());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!root.exists(), "{} still exists", root.display());
}

#[test]
fn a_qemu_cluster_applies_verifies_repairs_drift_scales_imports_and_destroys_clean_terraform_1_15()
{
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (tf, log) = setup();
    let root = tf.work_dir().join(".constellation/clusters/qacc");
    let marker = root.display().to_string();
    let _guard = Cleanup(&tf, &marker);

    let apply = tf.apply(&[]).ok();
    eprintln!(
        "apply (QEMU: 1 control plane + 1 worker) took {:?}",
        apply.elapsed
    );
    let cluster_id = tf.output("cluster_id").as_str().unwrap().to_owned();
    assert_eq!(cluster_id.len(), 64, "{cluster_id}");
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after apply must show no changes"
    );
    assert_all_verified(&tf, &root, &cluster_id, 2);

    // Each VM's boot phases were reported as progress, in order, from the node's own reports.
    let progress = std::fs::read_to_string(&log).expect("provider log");
    for node in vms(&root) {
        let prefix = format!("node {} [", node.name);
        let at = |phase: &str| {
            progress
                .lines()
                .position(|l| l.contains(&prefix) && l.contains(phase))
                .unwrap_or_else(|| panic!("no {phase:?} progress line for {}", node.name))
        };
        let (firmware, kernel, up) = (at("firmware"), at("kernel up"), at("bootstrapper up"));
        assert!(
            firmware < kernel && kernel < up,
            "{}: phases out of order",
            node.name
        );
    }

    // The worker VM's QEMU dies out of band: the plan shows it, apply boots it again and it
    // rejoins (its dm-crypt volume opens with the key it gets again).
    let worker = vms(&root)
        .into_iter()
        .find(|n| n.role == "worker")
        .expect("a worker VM");
    let killed = Command::new("kill")
        .args(["-KILL", &worker.pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "a killed VM must show as drift:\n{plan}");
    assert!(
        plan.all().contains(&worker.name),
        "the plan names the VM:\n{plan}"
    );
    let repair = tf.apply(&[]).ok();
    eprintln!("repair apply took {:?}", repair.elapsed);
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after repair must show no changes"
    );
    let rebooted = vms(&root)
        .into_iter()
        .find(|n| n.name == worker.name)
        .expect("the worker is still recorded");
    assert_ne!(
        rebooted.pid, worker.pid,
        "the worker runs in a new QEMU process"
    );
    assert_all_verified(&tf, &root, &cluster_id, 2);

    // Scale up: a second worker VM boots, attests and joins; scale down: it goes, QEMU,
    // swtpm and folder included.
    let before: Vec<String> = vms(&root).into_iter().map(|n| n.name).collect();
    let up = tf.apply(&["-var", "workers=2"]).ok();
    eprintln!("scale up to 2 workers took {:?}", up.elapsed);
    assert_all_verified(&tf, &root, &cluster_id, 3);
    let added = vms(&root)
        .into_iter()
        .find(|n| !before.contains(&n.name))
        .expect("a new worker VM");
    tf.apply(&["-var", "workers=1"]).ok();
    assert_all_verified(&tf, &root, &cluster_id, 2);
    assert!(
        !vms(&root).iter().any(|n| n.name == added.name),
        "the added worker is gone again"
    );
    let node_dir = root.join("nodes").join(&added.name);
    assert!(
        processes_mentioning(&node_dir.display().to_string()).is_empty(),
        "no process (QEMU, swtpm) of the removed worker is left"
    );
    assert!(!node_dir.exists(), "its folder is removed");
    assert_eq!(tf.plan(&[]).code, 0, "plan after scale down");

    // Import from the URI rebuilds a state with no diff.
    tf.state_rm("constellation_cluster.c").ok();
    let uri = format!(
        "constellation-cluster://?platform=qemu&name=qacc&cluster_dir={}&kubeconfig_path=./kubeconfig",
        root.display()
    );
    tf.import("constellation_cluster.c", &uri, &[]).ok();
    let plan = tf.plan(&[]);
    assert_eq!(
        plan.code, 0,
        "plan after import must show no changes:\n{plan}"
    );
    assert_eq!(tf.output("cluster_id").as_str(), Some(cluster_id.as_str()));

    // Every VM dies (a full restart): apply boots them, the control plane waits for Recover
    // (its volume is keyed; its state is on it), apply attests it and sends Recover, and the
    // worker rejoins; both attest with the same cluster ID.
    for vm in vms(&root) {
        let killed = Command::new("kill")
            .args(["-KILL", &vm.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
    }
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "a stopped cluster is drift:\n{plan}");
    let recovered = tf.apply(&[]).ok();
    eprintln!(
        "recovery of the QEMU cluster after every VM died took {:?}",
        recovered.elapsed
    );
    let progress = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        progress.contains("restarted and waits for Recover")
            && progress.contains("recovered cluster"),
        "apply recovered the control plane with Recover:\n{recovered}"
    );
    assert_eq!(tf.plan(&[]).code, 0, "plan after recovery");
    assert_all_verified(&tf, &root, &cluster_id, 2);

    // Rolling upgrade to another image folder (a copy: the same measurements): the plan names
    // the VMs it replaces, the worker first; each replacement VM boots the new image and joins
    // (the control plane's replacement becomes an etcd member and takes the master material
    // from its join ticket) before the VM it replaces goes.
    let current = PathBuf::from(tf.output("image_reference").as_str().unwrap());
    let next = tf.scratch().join("next-image");
    copy_image(&current, &next);
    let var = format!("image_reference={}", next.display());
    let before: Vec<String> = vms(&root).into_iter().map(|n| n.name).collect();
    let plan = tf.plan(&["-var", &var]);
    let text = plan.all().replace('\n', " ");
    assert!(
        text.contains("Rolling image upgrade") && before.iter().all(|n| text.contains(n)),
        "the plan names the VMs the upgrade replaces:\n{plan}"
    );
    let upgrade = tf.apply(&["-var", &var]).ok();
    eprintln!(
        "rolling upgrade of the QEMU cluster (2 VMs replaced) took {:?}",
        upgrade.elapsed
    );
    let after = vms(&root);
    assert!(
        after
            .iter()
            .all(|n| !before.contains(&n.name) && n.image_dir == next),
        "every VM is replaced by one booting the new image: before {before:?}, after {after:?}"
    );
    assert_eq!(tf.output("cluster_id").as_str(), Some(cluster_id.as_str()));
    assert_eq!(tf.plan(&["-var", &var]).code, 0, "plan after the upgrade");
    assert_all_verified(&tf, &root, &cluster_id, 2);

    tf.destroy(&[]).ok();
    assert_nothing_left(&root);
}

/// Copies a QEMU node image folder (kernel, initrd, manifest).
fn copy_image(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for file in ["vmlinuz", "initrd.cpio.gz", "node-image.json"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// Changes one byte of the initrd's gzip header (its modification time, RFC 1952 bytes 4-7,
/// which the kernel ignores: the node boots the same), and records the new digest in the
/// manifest, as whoever swapped the file would.
fn change_one_initrd_byte(image: &Path) {
    let initrd_path = image.join("initrd.cpio.gz");
    let mut initrd = std::fs::read(&initrd_path).unwrap();
    assert_eq!(initrd[..3], [0x1f, 0x8b, 8], "the initrd is gzip (deflate)");
    initrd[4] ^= 1;
    std::fs::write(&initrd_path, &initrd).unwrap();
    let manifest_path = image.join("node-image.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let digest = Command::new("sha256sum")
        .arg(&initrd_path)
        .output()
        .expect("sha256sum");
    let digest = String::from_utf8_lossy(&digest.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    manifest["initrd_sha256"] = serde_json::Value::String(digest);
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_vm_whose_initrd_changed_after_measurement_is_refused_naming_the_pcr_terraform_1_15() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (tf, _log) = setup();
    let root = tf.work_dir().join(".constellation/clusters/qacc");
    let marker = root.display().to_string();
    let _guard = Cleanup(&tf, &marker);

    // The image and its PCRs, then a copy of it with one initrd byte changed.
    tf.apply(&["-target=constellation_image.img"]).ok();
    let original = PathBuf::from(tf.output("image_reference").as_str().unwrap());
    let tampered = tf.scratch().join("tampered-image");
    copy_image(&original, &tampered);
    change_one_initrd_byte(&tampered);

    let reference = format!("image_reference={}", tampered.display());
    let refused = tf.apply(&["-var", &reference]);
    assert_ne!(
        refused.code, 0,
        "a tampered image must not form a cluster:\n{refused}"
    );
    let text = refused.all();
    let diagnostic: String = text
        .split_once("Error:")
        .map_or(text.as_str(), |(_, e)| e)
        .chars()
        .take(700)
        .collect();
    eprintln!("refused apply: {diagnostic}");
    assert!(
        text.contains("qacc-control-plane-0"),
        "the diagnostic names the node:\n{refused}"
    );
    assert!(
        text.contains("PCR[9]"),
        "the diagnostic names PCR 9:\n{refused}"
    );
    assert!(
        !text.contains("PCR[4]"),
        "the kernel (PCR 4) is unchanged:\n{refused}"
    );
    // The diagnostic quotes the refused VM's serial console (its init's lines are there).
    let console = text
        .split("last console lines of qacc-control-plane-0:")
        .nth(1)
        .unwrap_or_else(|| panic!("the diagnostic quotes the node's console:\n{refused}"));
    assert!(
        console.contains("constellation-"),
        "console lines quoted:\n{refused}"
    );
    assert_nothing_left(&root);
}
