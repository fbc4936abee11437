//! `constellation_cluster` schema, plan rules, drift and import with a real Terraform
//! (1.0.3 and 1.15.5) and the provider built with the FAKE backend (this crate's binary
//! `terraform-provider-constellation-fake`): no nodes are started, the fake keeps one JSON
//! record per cluster. Also: the write-only master secret (in no state, plan, log or record on
//! 1.15; refused on 1.0), and the SEV-SNP settings carried to the nodes' join configuration.

use std::path::{Path, PathBuf};

use acceptance_tests::secret_leaks::{files_under, leaks, random_secret};
use acceptance_tests::{hcl, Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_attestation::snp::{AbiVersion, SnpSettings, Tcb};

/// A cluster of one control plane and `var.workers` workers; `var.master_secret` and
/// `var.pod_cidr` are set by some tests.
fn config() -> String {
    let mut cluster = hcl::Cluster::of_image("demo", "local", "img").with(&[
        "master_secret = var.master_secret",
        "kubeconfig_path = \"${path.module}/kubeconfig\"",
    ]);
    cluster.worker_count = "var.workers".into();
    cluster.pod_cidr = "var.pod_cidr".into();
    format!(
        "{}{}{}{}{}{MASTER_SECRET_OUTPUT}",
        hcl::variable("workers", "number", "2"),
        hcl::variable("master_secret", "string", "null"),
        hcl::variable("pod_cidr", "string", "\"10.244.0.0/16\""),
        hcl::image("img", "local", "v1", "BOOT"),
        cluster.hcl()
    )
}

const MASTER_SECRET_OUTPUT: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "master_secret" {
  value     = constellation_cluster.c.master_secret
  sensitive = true
}
"#;

struct Fixture {
    tf: Terraform,
    fake_dir: PathBuf,
    /// The provider's log at TRACE (`TF_LOG_PROVIDER`), for every command.
    log: PathBuf,
}

fn setup(version: TfVersion) -> Fixture {
    setup_with(version, &config())
}

/// A working directory with `config` (`BOOT` stands for a stub bootstrapper's path).
fn setup_with(version: TfVersion, config: &str) -> Fixture {
    let fake_provider = Path::new(env!("CARGO_BIN_EXE_terraform-provider-constellation-fake"));
    let tf = Terraform::with_provider(version, fake_provider).unwrap_or_else(|e| panic!("{e}"));
    let boot = tf.scratch().join("bootstrapper");
    std::fs::write(&boot, b"#!/bin/sh\n").unwrap();
    let fake_dir = tf.scratch().join("fake");
    let log = tf.scratch().join("provider.log");
    let tf = tf
        .env(
            "CONSTELLATION_PROVIDER_FAKE_DIR",
            fake_dir.display().to_string(),
        )
        .env("TF_LOG_PROVIDER", "TRACE")
        .env("TF_LOG_PATH", log.display().to_string());
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        config.replace("BOOT", &boot.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    Fixture { tf, fake_dir, log }
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

/// The write-only master secret (`master_secret_wo` + `master_secret_wo_version`).
fn write_only_config() -> String {
    let cluster = hcl::Cluster::of_image("demo", "local", "img").with(&[
        "master_secret_wo = var.master_secret_wo",
        "master_secret_wo_version = var.master_secret_wo_version",
    ]);
    format!(
        "{WRITE_ONLY_VARIABLE}{}{}{}output \"cluster_id\" {{ value = constellation_cluster.c.cluster_id }}\n",
        hcl::variable("master_secret_wo_version", "number", "null"),
        hcl::image("img", "local", "v1", "BOOT"),
        cluster.hcl()
    )
}

const WRITE_ONLY_VARIABLE: &str = r#"variable "master_secret_wo" {
  type      = string
  sensitive = true
  default   = null
  EPHEMERAL
}
"#;

/// The write-only configuration: the secret variable is `ephemeral` where Terraform knows
/// that (1.10+; it keeps other root-module variable values in saved plans), not on 1.0.
fn setup_write_only(version: TfVersion) -> Fixture {
    let ephemeral = match version {
        TfVersion::V1_0 => "",
        TfVersion::V1_15 => "ephemeral = true",
    };
    setup_with(
        version,
        &write_only_config().replace("EPHEMERAL", ephemeral),
    )
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
    let f = setup_write_only(TfVersion::V1_15);
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
    let f = setup_write_only(TfVersion::V1_0);
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

/// SEV-SNP attestation settings.
const SNP_CONFIG: &str = r#"
variable "minimum_abi" {
  type    = string
  default = "1.55"
}
resource "constellation_cluster" "c" {
  name                = "snp"
  platform            = "local"
  control_plane_count = 1
  worker_count        = 0
  kubernetes_version  = "v1.31.1"
  image {
    reference = "/img"
    measurements = {
      "4" = { expected = "0101010101010101010101010101010101010101010101010101010101010101", warn_only = false }
    }
  }
  attestation {
    variant                     = "azure-sev-snp"
    tee_version                 = 3
    microcode_version           = 217
    minimum_abi                 = var.minimum_abi
    allowed_launch_measurements = ["MEASUREMENT"]
    allowed_id_key_digests      = []
  }
  network_config {
    pod_cidr     = "10.244.0.0/16"
    service_cidr = "10.96.0.0/12"
    node_cidr    = "192.168.178.0/24"
  }
}
"#;

fn snp_settings_round_trip(version: TfVersion) {
    let measurement = "4d".repeat(48);
    let f = setup_with(version, &SNP_CONFIG.replace("MEASUREMENT", &measurement));
    let (tf, fake_dir) = (&f.tf, &f.fake_dir);
    let bad = tf.plan(&["-var", "minimum_abi=1.256"]);
    assert_eq!(bad.code, 1, "{bad}");
    assert!(
        bad.all().contains("Invalid attestation.minimum_abi"),
        "{bad}"
    );

    let apply = tf.apply(&[]).ok();
    assert!(apply.stdout.contains("1 added"), "{apply}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fake_dir.join("snp.json")).unwrap()).unwrap();
    let node: SnpSettings =
        serde_json::from_value(record["node_snp_settings"].clone()).expect("SnpSettings JSON");
    assert_eq!(
        node.minimum_tcb,
        Some(Tcb {
            bootloader: 0,
            tee: 3,
            snp: 0,
            microcode: 217
        })
    );
    // What the node builds from its join configuration.
    let policy = node.policy().expect("valid settings");
    assert_eq!(
        policy.minimum_abi,
        AbiVersion {
            major: 1,
            minor: 55
        }
    );
    assert_eq!(policy.allowed_measurements, Some(vec![[0x4D; 48]]));
    assert_eq!(policy.allowed_id_key_digests, Some(Vec::new()));
    assert_eq!(tf.plan(&[]).code, 0, "settings round-trip through state");
    tf.destroy(&[]).ok();
}

#[test]
fn snp_settings_reach_the_node_policy_terraform_1_0() {
    snp_settings_round_trip(TfVersion::V1_0);
}

#[test]
fn snp_settings_reach_the_node_policy_terraform_1_15() {
    snp_settings_round_trip(TfVersion::V1_15);
}
