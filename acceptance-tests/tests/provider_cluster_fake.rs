//! `constellation_cluster` schema, plan rules, drift and import with a real Terraform
//! (1.0.3 and 1.15.5) and the provider built with the FAKE backend (this crate's binary
//! `terraform-provider-constellation-fake`): no nodes are started, the fake keeps one JSON
//! record per cluster.

use std::path::{Path, PathBuf};

use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};

const CONFIG: &str = r#"
variable "workers" {
  type    = number
  default = 2
}
variable "master_secret" {
  type    = string
  default = null
}
variable "pod_cidr" {
  type    = string
  default = "10.244.0.0/16"
}
resource "constellation_image" "img" {
  platform          = "local"
  version           = "v1"
  bootstrapper_path = "BOOT"
}
resource "constellation_cluster" "c" {
  name                = "demo"
  platform            = "local"
  control_plane_count = 1
  worker_count        = var.workers
  kubernetes_version  = "v1.31.1"
  master_secret       = var.master_secret
  kubeconfig_path     = "${path.module}/kubeconfig"
  image {
    reference    = constellation_image.img.reference
    measurements = constellation_image.img.measurements
  }
  attestation {
    variant = "qemu-vtpm"
  }
  network_config {
    pod_cidr     = var.pod_cidr
    service_cidr = "10.96.0.0/12"
    node_cidr    = "192.168.178.0/24"
  }
}
output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "master_secret" {
  value     = constellation_cluster.c.master_secret
  sensitive = true
}
"#;

struct Fixture {
    tf: Terraform,
    fake_dir: PathBuf,
}

fn setup(version: TfVersion) -> Fixture {
    let fake_provider = Path::new(env!("CARGO_BIN_EXE_terraform-provider-constellation-fake"));
    let tf = Terraform::with_provider(version, fake_provider).unwrap_or_else(|e| panic!("{e}"));
    let boot = tf.scratch().join("bootstrapper");
    std::fs::write(&boot, b"#!/bin/sh\n").unwrap();
    let fake_dir = tf.scratch().join("fake");
    let tf = tf.env(
        "CONSTELLATION_PROVIDER_FAKE_DIR",
        fake_dir.display().to_string(),
    );
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        CONFIG.replace("BOOT", &boot.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    Fixture { tf, fake_dir }
}

fn record(f: &Fixture) -> serde_json::Value {
    let bytes = std::fs::read(f.fake_dir.join("demo.json")).expect("fake record exists");
    serde_json::from_slice(&bytes).expect("fake record is JSON")
}

fn workers(r: &serde_json::Value) -> Vec<&serde_json::Value> {
    r["nodes"]
        .as_array()
        .map(|n| n.iter().filter(|n| n["control_plane"] == false).collect())
        .unwrap_or_default()
}

fn lifecycle(version: TfVersion) {
    let f = setup(version);
    let tf = &f.tf;
    let apply = tf.apply(&[]).ok();
    assert!(apply.stdout.contains("2 added"), "{apply}");
    // Sensitive attributes are masked in the plan that apply prints.
    for attr in ["master_secret", "kubeconfig", "client_key", "init_secret"] {
        let masked = apply
            .stdout
            .lines()
            .any(|l| l.contains(&format!("+ {attr} ")) && l.contains("(sensitive value)"));
        assert!(masked, "{attr} not masked:\n{apply}");
    }
    let secret = tf.output("master_secret");
    let secret = secret.as_str().expect("generated master secret");
    assert_eq!(secret.len(), 64, "32 bytes hex");
    assert!(
        !apply.all().contains(secret),
        "secret leaked into apply output"
    );
    assert_eq!(tf.output("cluster_id").as_str().map(str::len), Some(64));
    let kubeconfig = tf.work_dir().join("kubeconfig");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(workers(&record(&f)).len(), 2);

    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 0, "no-op plan:\n{plan}");

    // kubernetes_version cannot change yet (no Kubernetes runs on the nodes): the plan is refused
    // with the reason, instead of recording an upgrade that never happens.
    let main_tf = tf.work_dir().join("main.tf");
    let original = std::fs::read_to_string(&main_tf).unwrap();
    tf.write_config(&original.replace("\"v1.31.1\"", "\"v1.32.0\""))
        .unwrap();
    let refused = tf.plan(&[]);
    assert_eq!(refused.code, 1, "{refused}");
    assert!(
        refused
            .stderr
            .contains("Kubernetes upgrades are not supported yet"),
        "{refused}"
    );
    tf.write_config(&original).unwrap();

    // worker_count changes in place.
    let plan = tf.plan(&["-var", "workers=3"]);
    assert_eq!(plan.code, 2, "{plan}");
    assert!(
        plan.stdout.contains("0 to add, 1 to change, 0 to destroy"),
        "{plan}"
    );
    assert!(plan.stdout.contains("~ worker_count"), "{plan}");
    tf.apply(&["-var", "workers=3"]).ok();
    let r = record(&f);
    assert_eq!(workers(&r).len(), 3);
    assert_eq!(r["generation"], 1, "update went through the backend");
    assert_eq!(
        tf.output("master_secret").as_str(),
        Some(secret),
        "secret kept"
    );
    assert_eq!(tf.plan(&["-var", "workers=3"]).code, 0);

    // Drift: a worker stops attesting. Refresh records 2 healthy workers, the plan repairs.
    let mut r = record(&f);
    if let Some(n) = r["nodes"]
        .as_array_mut()
        .and_then(|n| n.iter_mut().find(|n| n["control_plane"] == false))
    {
        n["healthy"] = serde_json::Value::Bool(false);
    }
    std::fs::write(
        f.fake_dir.join("demo.json"),
        serde_json::to_vec(&r).unwrap(),
    )
    .unwrap();
    let plan = tf.plan(&["-var", "workers=3"]);
    assert_eq!(plan.code, 2, "drift must show as a change:\n{plan}");
    assert!(
        plan.stdout.contains("~ worker_count") && plan.stdout.contains("2 -> 3"),
        "{plan}"
    );
    assert!(plan.all().contains("unhealthy node"), "{plan}");
    tf.apply(&["-var", "workers=3"]).ok();
    let r = record(&f);
    assert_eq!(workers(&r).len(), 3);
    assert!(workers(&r).iter().all(|n| n["healthy"] == true), "{r}");
    assert_eq!(tf.plan(&["-var", "workers=3"]).code, 0);

    // master_secret forces replacement.
    let other = format!("-var=master_secret={}", "ab".repeat(32));
    let plan = tf.plan(&["-var", "workers=3", &other]);
    assert_eq!(plan.code, 2, "{plan}");
    assert!(plan.stdout.contains("forces replacement"), "{plan}");
    assert!(
        plan.stdout.contains("1 to add, 0 to change, 1 to destroy"),
        "{plan}"
    );
    assert!(
        !plan.stdout.contains(&"ab".repeat(32)),
        "secret shown in plan:\n{plan}"
    );

    // Import from the URI rebuilds the same state.
    tf.state_rm("constellation_cluster.c").ok();
    let import = tf
        .import(
            "constellation_cluster.c",
            "constellation-cluster://?platform=local&name=demo",
            &["-var", "workers=3"],
        )
        .ok();
    assert!(import.stdout.contains("Import successful"), "{import}");
    let plan = tf.plan(&["-var", "workers=3"]);
    let only_kubeconfig_path = plan.stdout.contains("+ kubeconfig_path")
        && plan.stdout.contains("0 to add, 1 to change, 0 to destroy");
    assert!(
        only_kubeconfig_path,
        "after import only the provider-side kubeconfig_path differs:\n{plan}"
    );
    tf.apply(&["-var", "workers=3"]).ok();
    assert_eq!(tf.plan(&["-var", "workers=3"]).code, 0);

    tf.destroy(&["-var", "workers=3"]).ok();
    assert!(
        !f.fake_dir.join("demo.json").exists(),
        "fake cluster deleted"
    );
    assert!(!kubeconfig.exists(), "kubeconfig removed on destroy");
}

fn bad_cidr(version: TfVersion) {
    let f = setup(version);
    let plan = f.tf.plan(&["-var", "pod_cidr=10.244.0.0"]);
    assert_eq!(plan.code, 1, "{plan}");
    let all = plan.all();
    assert!(
        all.contains("Invalid CIDR in network_config.pod_cidr"),
        "{plan}"
    );
    assert!(all.contains("not in CIDR form"), "{plan}");
    let bad_import = f.tf.import(
        "constellation_cluster.c",
        "constellation-cluster://?name=demo",
        &[],
    );
    assert_eq!(bad_import.code, 1, "{bad_import}");
    assert!(
        bad_import
            .all()
            .contains("parameter \"platform\" is missing"),
        "{bad_import}"
    );
}

#[test]
fn cluster_fake_lifecycle_terraform_1_0() {
    lifecycle(TfVersion::V1_0);
}

#[test]
fn cluster_fake_lifecycle_terraform_1_15() {
    lifecycle(TfVersion::V1_15);
}

#[test]
fn cluster_bad_cidr_terraform_1_0() {
    bad_cidr(TfVersion::V1_0);
}

#[test]
fn cluster_bad_cidr_terraform_1_15() {
    bad_cidr(TfVersion::V1_15);
}
