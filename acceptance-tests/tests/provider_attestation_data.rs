//! Data source `constellation_attestation` with a real Terraform, both 1.0.3 and 1.15.5.

use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};
use serde_json::json;

fn config(variant: &str) -> String {
    format!(
        r#"{REQUIRED_PROVIDERS}
data "constellation_attestation" "a" {{
  variant = "{variant}"
}}
output "a" {{ value = data.constellation_attestation.a }}
"#
    )
}

fn outputs_of(version: TfVersion, variant: &str) -> serde_json::Value {
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    tf.write_config(&config(variant)).unwrap();
    tf.init().ok();
    tf.apply(&[]).ok();
    // A data source alone: re-plan has nothing to do.
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 0, "{plan}");
    tf.output("a")
}

fn qemu_and_aws(version: TfVersion) {
    let pcrs_0_15: Vec<u32> = (0..=15).collect();
    let q = outputs_of(version, "qemu-vtpm");
    assert_eq!(q["variant"], "qemu-vtpm");
    assert_eq!(q["quoted_pcrs"], json!(pcrs_0_15));
    assert_eq!(q["enforced_pcrs"], json!([4, 9, 15]));
    assert_eq!(q["ak_pinned"], true);
    assert_eq!(q["sev_snp"], false);
    assert_eq!(q["verifier_available"], true);
    for tcb in [
        "bootloader_version",
        "tee_version",
        "snp_version",
        "microcode_version",
    ] {
        assert!(q[tcb].is_null(), "{tcb}: {q}");
    }
    assert!(q["measurements"].is_null(), "{q}");

    let a = outputs_of(version, "aws-sev-snp");
    assert_eq!(a["variant"], "aws-sev-snp");
    assert_eq!(a["enforced_pcrs"], json!([4, 9, 15]));
    assert_eq!(a["ak_pinned"], false);
    assert_eq!(a["sev_snp"], true);
    assert_eq!(a["verifier_available"], true);
    for tcb in [
        "bootloader_version",
        "tee_version",
        "snp_version",
        "microcode_version",
    ] {
        // Numbers, not strings.
        assert_eq!(a[tcb], json!(0), "{tcb}: {a}");
    }
}

/// With `image`, the measurements are those of the image folder (the same as the image
/// resource's output).
fn with_image(version: TfVersion) {
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    let boot = tf.scratch().join("bootstrapper");
    std::fs::write(&boot, b"#!/bin/sh\necho 'test bootstrapper'\n").unwrap();
    tf.write_config(&format!(
        r#"{REQUIRED_PROVIDERS}
resource "constellation_image" "img" {{
  platform          = "local"
  version           = "v1"
  bootstrapper_path = "{}"
}}
data "constellation_attestation" "a" {{
  variant = "qemu-vtpm"
  image   = constellation_image.img.reference
}}
output "from_data" {{ value = data.constellation_attestation.a.measurements }}
output "from_image" {{ value = constellation_image.img.measurements }}
"#,
        boot.display()
    ))
    .unwrap();
    tf.init().ok();
    tf.apply(&[]).ok();
    let from_data = tf.output("from_data");
    assert_eq!(from_data, tf.output("from_image"));
    assert_eq!(
        from_data.as_object().map(|m| m.len()),
        Some(3),
        "{from_data}"
    );
    tf.destroy(&[]).ok();
}

fn unknown_variant(version: TfVersion) {
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    tf.write_config(&config("sgx")).unwrap();
    tf.init().ok();
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 1, "{plan}");
    let all = plan.all();
    assert!(all.contains("Unknown attestation variant"), "{plan}");
    assert!(
        all.contains(r#"unknown attestation variant "sgx""#),
        "{plan}"
    );
    // The diagnostic points at the attribute: Terraform quotes its source line.
    assert!(all.contains(r#"variant = "sgx""#), "{plan}");
    assert!(!all.contains("stack backtrace"), "{plan}");
}

#[test]
fn attestation_defaults_terraform_1_0() {
    qemu_and_aws(TfVersion::V1_0);
}

#[test]
fn attestation_defaults_terraform_1_15() {
    qemu_and_aws(TfVersion::V1_15);
}

#[test]
fn attestation_image_measurements_terraform_1_0() {
    with_image(TfVersion::V1_0);
}

#[test]
fn attestation_image_measurements_terraform_1_15() {
    with_image(TfVersion::V1_15);
}

#[test]
fn attestation_unknown_variant_terraform_1_0() {
    unknown_variant(TfVersion::V1_0);
}

#[test]
fn attestation_unknown_variant_terraform_1_15() {
    unknown_variant(TfVersion::V1_15);
}
