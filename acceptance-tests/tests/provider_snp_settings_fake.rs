//! SEV-SNP attestation settings from a real Terraform (1.0.3 and 1.15.5) through the provider
//! (FAKE backend, `terraform-provider-constellation-fake`) to the settings a backend puts into
//! the nodes' join configuration, and from there to the policy a node builds; a bad setting is
//! refused at plan time with an error naming its attribute.

use std::path::Path;

use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_attestation::snp::{AbiVersion, SnpSettings, Tcb};

const CONFIG: &str = r#"
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

fn round_trip(version: TfVersion) {
    let fake_provider = Path::new(env!("CARGO_BIN_EXE_terraform-provider-constellation-fake"));
    let tf = Terraform::with_provider(version, fake_provider).unwrap_or_else(|e| panic!("{e}"));
    let fake_dir = tf.scratch().join("fake");
    let tf = tf.env(
        "CONSTELLATION_PROVIDER_FAKE_DIR",
        fake_dir.display().to_string(),
    );
    let measurement = "4d".repeat(48);
    tf.write_config(&format!(
        "{REQUIRED_PROVIDERS}{}",
        CONFIG.replace("MEASUREMENT", &measurement)
    ))
    .unwrap();
    tf.init().ok();

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
    round_trip(TfVersion::V1_0);
}

#[test]
fn snp_settings_reach_the_node_policy_terraform_1_15() {
    round_trip(TfVersion::V1_15);
}
