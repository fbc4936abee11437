//! The write-only master secret on a real local cluster (Terraform 1.15.5; one control plane and
//! one worker, each a `constellation-bootstrapper` process with its own swtpm): Init delivers
//! it (the worker's join needs the key service that holds it, and every node verifies), yet
//! it is in no file of the working directory or the cluster folder (state, journal, node logs,
//! metadata) other than the control plane's key service store, and not in the provider's log.
//! A later apply without the secret (`master_secret_wo` null) upgrades the image: every node,
//! the control plane included, is replaced (the replacement control plane takes the master
//! material from its join ticket), and the cluster still verifies with the same cluster ID.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug) and swtpm.

use std::path::Path;

use acceptance_tests::cluster_harness::{
    assert_all_verified, cluster_in_state, journal, modified_binary, nodes, sibling_binary,
    Cleanup, ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::secret_leaks::{files_under, hex_lower, leaks, random_secret};
use acceptance_tests::{hcl, Terraform, TfVersion, REQUIRED_PROVIDERS};

/// One control plane and one worker of image `var.image` (v1 or v2); the master secret
/// write-only from an ephemeral variable that later applies leave null.
fn config() -> String {
    let mut cluster = hcl::Cluster::of_image("wo", "local", "v1").with(&[
        "master_secret_wo = var.master_secret",
        "master_secret_wo_version = 1",
    ]);
    cluster.image_reference = "local.reference[var.image]".into();
    cluster.image_measurements = "local.measurements[var.image]".into();
    format!(
        "{SECRET_VARIABLE}{}{}{}{LOCALS}{}{OUTPUTS}",
        hcl::variable("image", "string", "\"v1\""),
        hcl::image("v1", "local", "v0.1.0", "BOOT_V1"),
        hcl::image("v2", "local", "v0.2.0", "BOOT_V2"),
        cluster.hcl()
    )
}

const SECRET_VARIABLE: &str = r#"variable "master_secret" {
  type      = string
  sensitive = true
  ephemeral = true
  default   = null
}
"#;

const LOCALS: &str = r#"locals {
  reference    = { v1 = constellation_image.v1.reference, v2 = constellation_image.v2.reference }
  measurements = { v1 = constellation_image.v1.measurements, v2 = constellation_image.v2.measurements }
}
"#;

const OUTPUTS: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = local.measurements[var.image] }
"#;

/// A node's key service store (`state/keyservice`, the key service's `MASTER_SECRET_DIR`): the
/// one place the master secret belongs.
fn key_service_store(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "keyservice")
}

/// The secret is in no file of the working directory or the provider's log, except a control
/// plane's key service store (and one holds it).
fn assert_only_key_services_hold(tf: &Terraform, log: &Path, secret: &[u8]) {
    let mut held = Vec::new();
    for path in files_under(&tf.work_dir())
        .into_iter()
        .chain([log.to_owned()])
    {
        let bytes = std::fs::read(&path).unwrap_or_default();
        match leaks(&bytes, secret) {
            Some(_) if key_service_store(&path) => held.push(path),
            Some(form) => panic!("the write-only secret is in {} ({form})", path.display()),
            None => {}
        }
    }
    assert!(
        !held.is_empty(),
        "the control plane's key service holds the master secret"
    );
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
    let v2 = modified_binary(&tf.scratch(), &boot, "v2");
    tf.write_config(&format!(
        "{REQUIRED_PROVIDERS}{}",
        config()
            .replace("BOOT_V1", &boot.display().to_string())
            .replace("BOOT_V2", &v2.display().to_string())
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
    assert_only_key_services_hold(&tf, &log, &secret);
    for (what, text) in [
        ("apply output", apply.all()),
        ("state JSON", state_json.stdout),
    ] {
        assert_eq!(leaks(text.as_bytes(), &secret), None, "secret in {what}");
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("Init"), "the provider log was captured");

    // A rolling upgrade to v2 without the secret: the control plane is replaced too.
    let before: Vec<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    let upgrade = tf.apply(&["-var", "image=v2"]).ok();
    eprintln!(
        "upgrade without the master secret took {:?}",
        upgrade.elapsed
    );
    let after = nodes(&root);
    assert_eq!(after.len(), 2, "{after:?}");
    for node in &after {
        assert!(!before.contains(&node.name), "{} was replaced", node.name);
    }
    assert!(
        after.iter().any(|n| n.name.contains("control-plane")),
        "{after:?}"
    );
    assert_eq!(tf.output("cluster_id"), cluster_id.as_str(), "same cluster");
    assert_all_verified(&tf, &root, &cluster_id, 2);
    assert_eq!(
        tf.plan(&["-var", "image=v2"]).code,
        0,
        "no diff after upgrade"
    );
    let state = cluster_in_state(&tf).expect("cluster in state");
    assert_eq!(state["master_secret"], serde_json::Value::Null, "{state}");
    assert_eq!(
        leaks(upgrade.all().as_bytes(), &secret),
        None,
        "secret in upgrade output"
    );
    assert_only_key_services_hold(&tf, &log, &secret);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("master material from its join ticket"),
        "the replacement control plane serves keys from its join ticket, not a Recover"
    );
}
