//! `constellation_image` with a real Terraform, both 1.0.3 and 1.15.5.

use std::path::Path;

use acceptance_tests::{Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_image::LocalImage;

fn setup(version: TfVersion) -> (Terraform, String) {
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    let boot = tf.scratch().join("bootstrapper");
    std::fs::write(&boot, b"#!/bin/sh\necho 'test bootstrapper'\n").unwrap();
    let boot = boot.display().to_string();
    // The default bootstrapper equals the explicit one, so an imported image (which records
    // the default) matches the configuration exactly.
    let tf = tf.env("CONSTELLATION_BOOTSTRAPPER", boot.clone());
    (tf, boot)
}

fn image_config(boot: &str) -> String {
    format!(
        r#"{REQUIRED_PROVIDERS}
variable "ver" {{
  type    = string
  default = "v1"
}}
resource "constellation_image" "img" {{
  platform          = "local"
  version           = var.ver
  bootstrapper_path = "{boot}"
}}
output "measurements" {{ value = constellation_image.img.measurements }}
output "reference" {{ value = constellation_image.img.reference }}
"#
    )
}

fn lifecycle(version: TfVersion) {
    let (tf, boot) = setup(version);
    tf.write_config(&image_config(&boot)).unwrap();
    tf.init().ok();
    let apply = tf.apply(&[]).ok();
    assert!(apply.stdout.contains("1 added"), "{apply}");

    // Outputs carry the measurements the image crate computes from the files on disk.
    let reference = tf.output("reference");
    let dir = reference
        .as_str()
        .expect("reference is a string")
        .to_owned();
    assert!(dir.ends_with(".constellation/images/v1"), "{dir}");
    let image = LocalImage::open(Path::new(&dir)).unwrap();
    let outputs = tf.output("measurements");
    for (index, m) in &image.measurements.0 {
        let o = &outputs[index.to_string()];
        assert_eq!(o["expected"], hex::encode(m.expected), "PCR {index}");
        assert_eq!(o["warn_only"], false);
    }
    assert_eq!(
        outputs.as_object().map(|o| o.len()),
        Some(image.measurements.0.len())
    );

    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 0, "re-plan must be empty:\n{plan}");
    eprintln!("{version:?}: no-op plan (1 image) took {:?}", plan.elapsed);

    // A new version replaces the image.
    let plan = tf.plan(&["-var", "ver=v2"]);
    assert_eq!(plan.code, 2, "{plan}");
    assert!(plan.stdout.contains("forces replacement"), "{plan}");
    assert!(
        plan.stdout.contains("1 to add, 0 to change, 1 to destroy"),
        "{plan}"
    );
    tf.apply(&["-var", "ver=v2"]).ok();
    let new_dir = tf
        .output("reference")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(new_dir.ends_with("/v2"), "{new_dir}");
    assert!(
        !Path::new(&dir).exists(),
        "old image folder must be deleted"
    );
    assert_eq!(tf.plan(&["-var", "ver=v2"]).code, 0);

    // Import by reference gives a state without any diff.
    tf.state_rm("constellation_image.img").ok();
    let import = tf
        .import("constellation_image.img", &new_dir, &["-var", "ver=v2"])
        .ok();
    assert!(import.stdout.contains("Import successful"), "{import}");
    let plan = tf.plan(&["-var", "ver=v2"]);
    assert_no_resource_changes(&plan);

    // A deleted folder is recreated by the next apply.
    std::fs::remove_dir_all(&new_dir).unwrap();
    let plan = tf.plan(&["-var", "ver=v2"]);
    assert_eq!(plan.code, 2, "{plan}");
    tf.apply(&["-var", "ver=v2"]).ok();
    assert!(Path::new(&new_dir).join("image-manifest.json").is_file());

    tf.destroy(&["-var", "ver=v2"]).ok();
    assert!(
        !Path::new(&new_dir).exists(),
        "destroy must remove the image folder"
    );
}

/// No resource changes. Terraform 1.0 also drops outputs on `state rm` and then plans to
/// re-add them (exit 2, "without changing any real infrastructure"); that is not a diff of
/// the resource.
fn assert_no_resource_changes(plan: &acceptance_tests::TfRun) {
    let outputs_only = plan.code == 2
        && plan
            .stdout
            .contains("without changing any real infrastructure")
        && !plan.stdout.contains("Plan:");
    assert!(
        plan.code == 0 || outputs_only,
        "plan after import must be empty:\n{plan}"
    );
}

fn unsupported_platform(version: TfVersion) {
    let (tf, boot) = setup(version);
    tf.write_config(&format!(
        r#"{REQUIRED_PROVIDERS}
resource "constellation_image" "img" {{
  platform          = "azure"
  version           = "v1"
  bootstrapper_path = "{boot}"
}}
"#
    ))
    .unwrap();
    tf.init().ok();
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 1, "{plan}");
    let all = plan.all();
    assert!(all.contains("Unsupported platform"), "{plan}");
    assert!(
        all.contains(r#"platform "azure" is not supported yet"#),
        "{plan}"
    );
    // The diagnostic points at the attribute: Terraform quotes its source line.
    assert!(all.contains(r#"platform = "azure""#), "{plan}");
    assert!(!all.contains("stack backtrace"), "{plan}");
}

/// `version` depends on another resource: Terraform 1.15 sends it as a refined unknown
/// (msgpack ext 12 with the known prefix "d-"), 1.0 as a plain unknown.
fn unknown_input(version: TfVersion) {
    let (tf, boot) = setup(version);
    tf.write_config(&format!(
        r#"{REQUIRED_PROVIDERS}
resource "constellation_image" "a" {{
  platform          = "local"
  version           = "v1"
  bootstrapper_path = "{boot}"
}}
resource "constellation_image" "b" {{
  platform          = "local"
  version           = "d-${{length(constellation_image.a.measurements)}}"
  bootstrapper_path = "{boot}"
}}
output "b_reference" {{ value = constellation_image.b.reference }}
"#
    ))
    .unwrap();
    tf.init().ok();
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "{plan}");
    assert!(plan.stdout.contains("(known after apply)"), "{plan}");
    tf.apply(&[]).ok();
    let b = tf.output("b_reference");
    assert!(b.as_str().unwrap_or_default().ends_with("/d-3"), "{b}");
    assert_eq!(tf.plan(&[]).code, 0);
    tf.destroy(&[]).ok();
}

#[test]
fn image_lifecycle_terraform_1_0() {
    lifecycle(TfVersion::V1_0);
}

#[test]
fn image_lifecycle_terraform_1_15() {
    lifecycle(TfVersion::V1_15);
}

#[test]
fn unsupported_platform_terraform_1_0() {
    unsupported_platform(TfVersion::V1_0);
}

#[test]
fn unsupported_platform_terraform_1_15() {
    unsupported_platform(TfVersion::V1_15);
}

#[test]
fn unknown_input_terraform_1_0() {
    unknown_input(TfVersion::V1_0);
}

#[test]
fn refined_unknown_input_terraform_1_15() {
    unknown_input(TfVersion::V1_15);
}

/// AutoMTLS: Terraform presents the client certificate it put in PLUGIN_CLIENT_CERT, and the
/// provider authenticates it (the provider logs each accepted certificate at debug level).
fn terraform_authenticates_with_its_client_certificate(version: TfVersion) {
    let (tf, boot) = setup(version);
    let tf = tf
        .env("TF_LOG", "DEBUG")
        .env("CONSTELLATION_PROVIDER_LOG", "debug");
    tf.write_config(&image_config(&boot)).unwrap();
    tf.init().ok();
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "{plan}");
    assert!(
        plan.stderr
            .contains("client presented Terraform's AutoMTLS certificate"),
        "no authenticated client connection in the log:\n{}",
        plan.stderr
    );
    assert!(
        !plan.stderr.contains("refused a client certificate"),
        "{}",
        plan.stderr
    );
}

#[test]
fn automtls_client_certificate_terraform_1_0() {
    terraform_authenticates_with_its_client_certificate(TfVersion::V1_0);
}

#[test]
fn automtls_client_certificate_terraform_1_15() {
    terraform_authenticates_with_its_client_certificate(TfVersion::V1_15);
}
