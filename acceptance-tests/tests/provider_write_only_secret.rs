//! The write-only master secret (`master_secret_wo` + `master_secret_wo_version`) with a real
//! Terraform and the provider built with the FAKE backend (`terraform-provider-constellation-fake`):
//! on Terraform 1.15 the secret reaches the backend (the fake derives the cluster ID from it)
//! but appears in no state, plan, provider log or file of the cluster folder; on Terraform 1.0,
//! which does not support write-only attributes and would store it, setting it is refused.

use std::path::{Path, PathBuf};

use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};

const CONFIG: &str = r#"
variable "master_secret_wo" {
  type      = string
  sensitive = true
  default   = null
  EPHEMERAL
}
variable "master_secret_wo_version" {
  type    = number
  default = null
}
resource "constellation_image" "img" {
  platform          = "local"
  version           = "v1"
  bootstrapper_path = "BOOT"
}
resource "constellation_cluster" "c" {
  name                     = "demo"
  platform                 = "local"
  control_plane_count      = 1
  worker_count             = 1
  kubernetes_version       = "v1.31.1"
  master_secret_wo         = var.master_secret_wo
  master_secret_wo_version = var.master_secret_wo_version
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
"#;

struct Fixture {
    tf: Terraform,
    fake_dir: PathBuf,
    log: PathBuf,
}

fn setup(version: TfVersion) -> Fixture {
    let fake_provider = Path::new(env!("CARGO_BIN_EXE_terraform-provider-constellation-fake"));
    let tf = Terraform::with_provider(version, fake_provider).unwrap_or_else(|e| panic!("{e}"));
    let boot = tf.scratch().join("bootstrapper");
    std::fs::write(&boot, b"#!/bin/sh\n").unwrap();
    let fake_dir = tf.scratch().join("fake");
    let log = tf.scratch().join("provider.log");
    // Every provider log line at the most verbose level, into one file.
    let tf = tf
        .env(
            "CONSTELLATION_PROVIDER_FAKE_DIR",
            fake_dir.display().to_string(),
        )
        .env("TF_LOG_PROVIDER", "TRACE")
        .env("TF_LOG_PATH", log.display().to_string());
    // Terraform keeps root-module variable values in saved plans unless they are ephemeral
    // (1.10+), which is how a secret variable is meant to feed a write-only attribute; 1.0
    // knows no ephemeral variables.
    let ephemeral = match version {
        TfVersion::V1_0 => "",
        TfVersion::V1_15 => "ephemeral = true",
    };
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        CONFIG
            .replace("BOOT", &boot.display().to_string())
            .replace("EPHEMERAL", ephemeral)
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    Fixture { tf, fake_dir, log }
}

/// A fresh random secret, so no other value in any file can equal it by accident.
fn random_secret() -> [u8; 32] {
    use std::io::Read as _;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .expect("random bytes");
    secret
}

/// Every form the secret could take in a file: raw bytes, lower- and upper-case hex.
fn leaks(bytes: &[u8], secret: &[u8; 32]) -> Option<&'static str> {
    let lower = hex::encode(secret);
    let upper = lower.to_uppercase();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if contains(secret) {
        Some("raw bytes")
    } else if contains(lower.as_bytes()) {
        Some("hex")
    } else if contains(upper.as_bytes()) {
        Some("upper-case hex")
    } else {
        None
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

fn assert_nowhere(f: &Fixture, secret: &[u8; 32], extra: &[(&str, &str)]) {
    let mut checked = 0;
    for path in files_under(&f.tf.work_dir())
        .into_iter()
        .chain(files_under(&f.fake_dir))
        .chain([f.log.clone()])
    {
        let bytes = std::fs::read(&path).unwrap_or_default();
        if let Some(form) = leaks(&bytes, secret) {
            panic!("the write-only secret is in {} ({form})", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 3, "state, fake record and log were checked");
    for (what, text) in extra {
        assert_eq!(leaks(text.as_bytes(), secret), None, "secret in {what}");
    }
}

#[test]
fn write_only_master_secret_stays_out_of_state_plan_logs_and_files_terraform_1_15() {
    let f = setup(TfVersion::V1_15);
    let tf = &f.tf;
    let secret = random_secret();
    let var = format!("-var=master_secret_wo={}", hex::encode(secret));
    let v1 = "-var=master_secret_wo_version=1";
    let apply = tf.apply(&[&var, v1]).ok();
    assert!(apply.stdout.contains("2 added"), "{apply}");
    assert!(
        apply.stdout.contains("(write-only attribute)"),
        "Terraform shows it as write-only:\n{apply}"
    );

    // The secret reached the backend: the fake derives the cluster ID from it.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tf.work_dir().join("terraform.tfstate")).expect("state file"),
    )
    .unwrap();
    let attrs = state["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["type"] == "constellation_cluster"))
        .map(|r| r["instances"][0]["attributes"].clone())
        .expect("cluster in state");
    let salt = hex::decode(attrs["measurement_salt"].as_str().unwrap()).unwrap();
    let expected_id = hex::encode(constellation_common::kdf::cluster_id(&secret, &salt));
    assert_eq!(tf.output("cluster_id").as_str(), Some(expected_id.as_str()));
    assert_eq!(attrs["master_secret"], serde_json::Value::Null, "{attrs}");
    assert_eq!(
        attrs["master_secret_wo"],
        serde_json::Value::Null,
        "{attrs}"
    );
    assert_eq!(attrs["master_secret_wo_version"], 1, "{attrs}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.fake_dir.join("demo.json")).unwrap()).unwrap();
    assert_eq!(record["master_secret_hex"], serde_json::Value::Null);
    assert_eq!(record["master_secret_wo_version"], 1);

    // No perpetual diff: the next plan (secret still configured) is empty.
    let noop = tf.plan(&[&var, v1]);
    assert_eq!(noop.code, 0, "{noop}");

    // A saved plan and its JSON form.
    let version_bump = tf.run(&[
        "plan",
        "-no-color",
        "-input=false",
        "-out=bump.tfplan",
        &var,
        "-var=master_secret_wo_version=2",
    ]);
    assert_eq!(version_bump.code, 0, "{version_bump}");
    assert!(
        version_bump.stdout.contains("forces replacement"),
        "a new version replaces the cluster, like a new master_secret:\n{version_bump}"
    );
    let plan_json = tf.run(&["show", "-json", "bump.tfplan"]).ok();
    let state_json = tf.run(&["show", "-json"]).ok();
    assert!(
        plan_json.stdout.contains("master_secret_wo_version"),
        "{plan_json}"
    );

    let destroy = tf.destroy(&[&var, v1]).ok();
    assert_nowhere(
        &f,
        &secret,
        &[
            ("apply output", &apply.all()),
            ("plan output", &version_bump.all()),
            ("plan JSON", &plan_json.stdout),
            ("state JSON", &state_json.stdout),
            ("destroy output", &destroy.all()),
        ],
    );
    let log = std::fs::read_to_string(&f.log).unwrap();
    assert!(
        log.contains("fake: cluster initialized"),
        "the provider's log was captured at TRACE"
    );
}

#[test]
fn write_only_master_secret_is_refused_by_terraform_1_0() {
    let f = setup(TfVersion::V1_0);
    let tf = &f.tf;
    let secret = random_secret();
    let var = format!("-var=master_secret_wo={}", hex::encode(secret));
    let apply = tf.apply(&[&var, "-var=master_secret_wo_version=1"]);
    assert_eq!(apply.code, 1, "{apply}");
    let all = apply.all();
    assert!(
        all.contains("Write-only attribute needs Terraform 1.11 or later"),
        "{apply}"
    );
    assert!(all.contains("master_secret_wo"), "{apply}");
    assert!(
        !f.fake_dir.join("demo.json").exists(),
        "nothing was created"
    );
    assert_nowhere(&f, &secret, &[("apply output", &all)]);
    // Without it, the Sensitive generated master secret works on 1.0 as before.
    let apply = tf.apply(&[]).ok();
    assert!(apply.stdout.contains("2 added"), "{apply}");
    tf.destroy(&[]).ok();
}
