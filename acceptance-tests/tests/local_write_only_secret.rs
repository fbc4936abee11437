//! The write-only master secret on a real local cluster (Terraform 1.15.5; one control plane and
//! one worker, each a `constellation-bootstrapper` process with its own swtpm): Init delivers
//! it (the worker's join needs the key service that holds it, and every node verifies), yet
//! it is in no file of the working directory or the cluster folder (state, journal, node logs,
//! metadata) other than the control plane's key service store, and not in the provider's log.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug) and swtpm.

use std::path::Path;

use acceptance_tests::local::{
    assert_all_verified, cluster_in_state, journal, sibling_binary, Cleanup, ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::secrets::{files_under, hex_lower, leaks, random_secret};
use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};

const CONFIG: &str = r#"
variable "master_secret" {
  type      = string
  sensitive = true
  ephemeral = true
}
resource "constellation_image" "img" {
  platform          = "local"
  version           = "v0.1.0"
  bootstrapper_path = "BOOT"
}
resource "constellation_cluster" "c" {
  name                     = "wo"
  platform                 = "local"
  control_plane_count      = 1
  worker_count             = 1
  kubernetes_version       = "v1.31.1"
  master_secret_wo         = var.master_secret
  master_secret_wo_version = 1
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

/// A node's key service store (`state/keyservice`, the key service's `MASTER_SECRET_DIR`): the
/// one place the master secret belongs.
fn key_service_store(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "keyservice")
}

#[test]
fn write_only_master_secret_on_a_local_cluster_terraform_1_15() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(TfVersion::V1_15).unwrap_or_else(|e| panic!("{e}"));
    let log = tf.scratch().join("provider.log");
    let tf = tf
        .env("TF_LOG_PROVIDER", "TRACE")
        .env("TF_LOG_PATH", log.display().to_string());
    tf.write_config(&format!(
        "{REQUIRED_PROVIDERS}{}",
        CONFIG.replace("BOOT", &boot.display().to_string())
    ))
    .unwrap();
    tf.init().ok();
    let root = tf.work_dir().join(".constellation/clusters/wo");
    let marker = root.display().to_string();
    let _guard = Cleanup(&tf, &marker);

    let secret = random_secret();
    let var = format!("-var=master_secret={}", hex_lower(&secret));
    let apply = tf.apply(&[&var]).ok();
    eprintln!(
        "apply (1 control plane + 1 worker) took {:?}",
        apply.elapsed
    );
    let cluster_id = tf.output("cluster_id");
    let cluster_id = cluster_id.as_str().expect("cluster_id").to_owned();
    assert_all_verified(&tf, &root, &cluster_id, 2);
    assert_eq!(tf.plan(&[&var]).code, 0, "no diff after apply");

    let state = cluster_in_state(&tf).expect("cluster in state");
    assert_eq!(state["master_secret"], serde_json::Value::Null, "{state}");
    assert_eq!(state["master_secret_wo_version"], 1, "{state}");
    let journal = journal(&root).expect("journal");
    assert!(journal.get("master_secret").is_none(), "{journal}");
    assert_eq!(journal["master_secret_wo_version"], 1, "{journal}");

    let state_json = tf.run(&["show", "-json"]).ok();
    let mut held = Vec::new();
    for path in files_under(&tf.work_dir()).into_iter().chain([log.clone()]) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        match leaks(&bytes, &secret) {
            Some(_) if key_service_store(&path) => held.push(path),
            Some(form) => panic!("the write-only secret is in {} ({form})", path.display()),
            None => {}
        }
    }
    assert!(
        !held.is_empty(),
        "the control plane's key service holds the master secret"
    );
    for (what, text) in [
        ("apply output", apply.all()),
        ("state JSON", state_json.stdout),
    ] {
        assert_eq!(leaks(text.as_bytes(), &secret), None, "secret in {what}");
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("Init"), "the provider log was captured");
}
