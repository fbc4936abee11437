//! A real local cluster through Terraform (1.0.3 and 1.15.5): one control plane and two
//! workers, each a `constellation-bootstrapper` process with its own swtpm. Apply must attest
//! and initialize the cluster; afterwards every node is checked independently with
//! `attest verify cluster` (fresh evidence, pinned AK, image measurements, PCR 15 = cluster
//! ID); a crashed worker shows up as drift and apply repairs it; scaling workers out and in
//! works; destroy leaves no process.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug), swtpm and openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

use acceptance_tests::{provider_binary, Terraform, TfVersion, REQUIRED_PROVIDERS};

const CONFIG: &str = r#"
variable "workers" {
  type    = number
  default = 2
}
resource "constellation_image" "img" {
  platform          = "local"
  version           = "v0.1.0"
  bootstrapper_path = "BOOT"
}
resource "constellation_cluster" "c" {
  name                = "acc"
  platform            = "local"
  control_plane_count = 1
  worker_count        = var.workers
  kubernetes_version  = "v1.31.1"
  kubeconfig_path     = "${path.module}/kubeconfig"
  image {
    reference    = constellation_image.img.reference
    measurements = constellation_image.img.measurements
  }
  attestation {
    variant = "qemu-vtpm"
  }
  network_config {
    pod_cidr     = "10.244.0.0/16"
    service_cidr = "10.96.0.0/12"
    node_cidr    = "192.168.178.0/24"
  }
}
output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = constellation_image.img.measurements }
"#;

/// A binary next to the provider in target/debug.
fn sibling_binary(name: &str) -> PathBuf {
    let provider = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let bin = provider.with_file_name(name);
    assert!(
        bin.is_file(),
        "{} not found: run `make build` first",
        bin.display()
    );
    bin
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// One node as `platform.json` in the cluster folder records it.
#[derive(Debug, serde::Deserialize)]
struct Node {
    name: String,
    role: String,
    ip: String,
    ak_spki_hex: String,
    pid: u32,
}

#[derive(serde::Deserialize)]
struct PlatformJson {
    nodes: Vec<Node>,
}

fn nodes(root: &Path) -> Vec<Node> {
    let bytes = std::fs::read(root.join("platform.json")).expect("platform.json exists");
    let state: PlatformJson = serde_json::from_slice(&bytes).expect("platform.json parses");
    state.nodes
}

/// Runs `attest verify cluster` against every node; returns each node's exit status.
fn verify_all(tf: &Terraform, root: &Path, cluster_id: &str) -> Vec<(String, bool, String)> {
    let attest = sibling_binary("attest");
    let measurements = tf.scratch().join("measurements.json");
    let m = tf.output("measurements");
    // The provider's output uses Terraform's `warn_only`; the CLI reads `warnOnly`.
    let json: serde_json::Map<String, serde_json::Value> = m
        .as_object()
        .expect("measurements is a map")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!({
                    "expected": v["expected"],
                    "warnOnly": v["warn_only"],
                }),
            )
        })
        .collect();
    std::fs::write(&measurements, serde_json::to_vec(&json).unwrap()).unwrap();
    nodes(root)
        .into_iter()
        .map(
            |Node {
                 name,
                 ip,
                 ak_spki_hex: ak_hex,
                 ..
             }| {
                let der = tf.scratch().join(format!("{name}.ak.der"));
                let pem = tf.scratch().join(format!("{name}.ak.pem"));
                std::fs::write(&der, hex::decode(&ak_hex).expect("AK is hex")).unwrap();
                let conv = Command::new("openssl")
                    .args(["pkey", "-pubin", "-inform", "DER", "-in"])
                    .arg(&der)
                    .arg("-out")
                    .arg(&pem)
                    .output()
                    .expect("openssl must be installed");
                assert!(conv.status.success(), "openssl: {conv:?}");
                let out = Command::new(&attest)
                    .args(["verify", "cluster", "--endpoint", &format!("{ip}:30081")])
                    .arg("--measurements")
                    .arg(&measurements)
                    .arg("--ak-pub")
                    .arg(&pem)
                    .args(["--cluster-id", cluster_id])
                    .output()
                    .expect("run attest");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                (name, out.status.success(), text)
            },
        )
        .collect()
}

fn assert_all_verified(tf: &Terraform, root: &Path, cluster_id: &str, expected_nodes: usize) {
    let results = verify_all(tf, root, cluster_id);
    assert_eq!(results.len(), expected_nodes, "{results:?}");
    for (name, ok, text) in &results {
        assert!(ok, "node {name} failed verification:\n{text}");
    }
}

/// One cluster at a time: two clusters booting at once on a small machine would make join
/// times (LUKS key slots, Argon2) a test of the machine rather than of the provider.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(version: TfVersion) {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        CONFIG.replace("BOOT", &boot.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    let root = tf.work_dir().join(".constellation/clusters/acc");
    let marker = root.display().to_string();

    let _guard = Cleanup(&tf, &marker);
    let apply = tf.apply(&[]).ok();
    eprintln!(
        "{version:?}: apply (1 control plane + 2 workers) took {:?}",
        apply.elapsed
    );
    let cluster_id = tf.output("cluster_id");
    let cluster_id = cluster_id
        .as_str()
        .expect("cluster_id is a string")
        .to_owned();
    assert_eq!(cluster_id.len(), 64, "{cluster_id}");
    assert!(
        cluster_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{cluster_id}"
    );
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after apply must show no changes"
    );
    assert_all_verified(&tf, &root, &cluster_id, 3);

    // A worker's process dies: refresh sees it, apply reboots it and it rejoins.
    let worker = nodes(&root)
        .into_iter()
        .find(|n| n.role == "worker")
        .expect("a worker node");
    let pid = worker.pid;
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "a dead worker must show as drift:\n{plan}");
    let repair = tf.apply(&[]).ok();
    eprintln!("{version:?}: repair apply took {:?}", repair.elapsed);
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after repair must show no changes"
    );
    assert_all_verified(&tf, &root, &cluster_id, 3);

    // Scale out to 3 workers, then in to 1 (the highest-index workers go).
    let scale = tf.apply(&["-var", "workers=3"]).ok();
    eprintln!("{version:?}: scale 2 -> 3 workers took {:?}", scale.elapsed);
    assert_eq!(tf.plan(&["-var", "workers=3"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 4);
    let before: Vec<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    tf.apply(&["-var", "workers=1"]).ok();
    assert_eq!(tf.plan(&["-var", "workers=1"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 2);
    let after: Vec<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    let removed: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
    assert_eq!(removed.len(), 2, "before {before:?}, after {after:?}");
    for name in removed {
        let left = processes_mentioning(&format!("{marker}/nodes/{name}"));
        assert!(
            left.is_empty(),
            "removed node {name} left processes: {left:?}"
        );
    }

    tf.destroy(&[]).ok();
    assert!(!root.exists(), "destroy must remove {marker}");
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left after destroy: {left:?}");
}

/// On a failed assertion, still tear the cluster down so no node process outlives the test.
struct Cleanup<'a>(&'a Terraform, &'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.destroy(&[]);
        for (pid, _) in processes_mentioning(self.1) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn local_cluster_terraform_1_15() {
    run(TfVersion::V1_15);
}

#[test]
fn local_cluster_terraform_1_0() {
    run(TfVersion::V1_0);
}
