//! Recovery with an external KMS and no master secret in Terraform (Terraform 1.15.5, a real
//! PyKMIP server, one control plane and one worker as `constellation-bootstrapper` processes
//! with their own swtpm): the cluster is created with `master_secret_wo` and `kms { type =
//! "kmip" }`; every process dies; the next apply, which holds no master secret, attests the
//! control plane and sends Recover with the KMIP credentials from the configuration. The control
//! plane unwraps the copy of the wrapped master secret in its state disk's header with the KEK
//! the KMS grants, its disk opens with its old key, the worker rejoins, and both attest with
//! the same cluster ID. The master secret is in no state, output or log.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug), swtpm and PyKMIP.

use std::path::Path;

use acceptance_tests::cluster_harness::{
    assert_all_verified, cluster_in_state, nodes, processes_mentioning, sibling_binary, Cleanup,
    ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::secret_leaks::{hex_lower, leaks, random_secret};
use acceptance_tests::{hcl, Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_keyservice::testing::PyKmipServer;

const SECRET_VARIABLE: &str = r#"variable "master_secret" {
  type      = string
  sensitive = true
  ephemeral = true
  default   = null
}
"#;

const OUTPUTS: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = constellation_image.img.measurements }
"#;

/// The KMIP server's CA, client certificate and key as PEM files the configuration reads.
fn kms_block(kmip: &PyKmipServer, dir: &Path, kek_id: &str) -> String {
    let client = kmip.client_cert();
    let files = [
        ("kmip-ca.pem", kmip.pki().ca_pem()),
        ("kmip-client.pem", client.cert_pem.clone()),
        ("kmip-client-key.pem", client.key_pem.clone()),
    ];
    for (name, pem) in &files {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let file = |name: &str| format!("file(\"{}\")", dir.join(name).display());
    format!(
        "kms {{\n    type            = \"kmip\"\n    endpoint        = \"{}\"\n    \
         server_ca_pem   = {}\n    client_cert_pem = {}\n    client_key_pem  = {}\n    \
         kek_id          = \"{kek_id}\"\n  }}",
        kmip.endpoint(),
        file("kmip-ca.pem"),
        file("kmip-client.pem"),
        file("kmip-client-key.pem"),
    )
}

/// Every node's state disk opens with HKDF(master secret, salt, "key-" + its UUID).
fn assert_disks_open_with_their_keys(root: &Path, master: &[u8], salt: &[u8]) {
    for node in nodes(root) {
        let disk = root.join("nodes").join(&node.name).join("state/disk.img");
        let uuid = constellation_bootstrapper::statedisk::uuid(&disk).unwrap();
        let key = constellation_common::kdf::derive_key(
            master,
            salt,
            &uuid.to_string(),
            constellation_common::kdf::DEFAULT_KEY_LEN,
        )
        .unwrap();
        constellation_bootstrapper::statedisk::verify_key(&disk, key.expose())
            .unwrap_or_else(|e| panic!("{}: its disk does not open with its key: {e}", node.name));
    }
}

#[test]
fn kmip_cluster_recovers_without_the_master_secret_terraform_1_15() {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let kmip = PyKmipServer::start().unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let kek_id = runtime
        .block_on(kmip.create_kek("terraform-kek"))
        .unwrap_or_else(|e| panic!("{e}"));
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(TfVersion::V1_15).unwrap_or_else(|e| panic!("{e}"));
    let log = tf.scratch().join("provider.log");
    let tf = tf
        .env("TF_LOG_PROVIDER", "DEBUG")
        .env("TF_LOG_PATH", log.display().to_string());
    let cluster = hcl::Cluster::of_image("kmip", "local", "img").with(&[
        "master_secret_wo = var.master_secret",
        "master_secret_wo_version = 1",
        &kms_block(&kmip, &tf.scratch(), &kek_id),
    ]);
    tf.write_config(&format!(
        "{REQUIRED_PROVIDERS}{SECRET_VARIABLE}{}{}{OUTPUTS}",
        hcl::image("img", "local", "v0.1.0", &boot.display().to_string()),
        cluster.hcl()
    ))
    .unwrap();
    tf.init().ok();
    let root = tf.work_dir().join(".constellation/clusters/kmip");
    let marker = root.display().to_string();
    let _guard = Cleanup(&tf, &marker);

    let secret = random_secret();
    let var = format!("-var=master_secret={}", hex_lower(&secret));
    tf.apply(&[&var]).ok();
    let cluster_id = tf.output("cluster_id");
    let cluster_id = cluster_id.as_str().expect("cluster_id").to_owned();
    assert_all_verified(&tf, &root, &cluster_id, 2);
    let state = cluster_in_state(&tf).expect("cluster in state");
    let salt = hex::decode(state["master_secret_salt"].as_str().unwrap()).unwrap();

    // Every process of the cluster dies: the control plane comes back waiting for Recover.
    for (pid, _) in processes_mentioning(&marker) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let recovered = tf.apply(&[]).ok();
    eprintln!(
        "recovery through the KMS (1 control plane + 1 worker) took {:?}",
        recovered.elapsed
    );
    assert_all_verified(&tf, &root, &cluster_id, 2);
    assert_disks_open_with_their_keys(&root, &secret, &salt);
    let cp = nodes(&root)
        .into_iter()
        .find(|n| n.role == "control-plane")
        .expect("a control plane");
    let cp_log =
        std::fs::read_to_string(root.join("nodes").join(&cp.name).join("bootstrapper.log"))
            .unwrap();
    assert!(
        cp_log.contains("unwrapping the master secret from the state disk's header")
            && cp_log.contains("recovered cluster"),
        "the control plane recovered through the KMS:\n{cp_log}"
    );
    assert_eq!(tf.plan(&[]).code, 0, "no diff after recovery");

    let state = cluster_in_state(&tf).expect("cluster in state");
    assert_eq!(state["master_secret"], serde_json::Value::Null, "{state}");
    for (what, bytes) in [
        ("recovering apply's output", recovered.all().into_bytes()),
        ("provider log", std::fs::read(&log).unwrap_or_default()),
        ("state", tf.run(&["show", "-json"]).ok().stdout.into_bytes()),
        ("control plane log", cp_log.into_bytes()),
    ] {
        assert_eq!(
            leaks(&bytes, &secret),
            None,
            "the master secret is in the {what}"
        );
    }
}
