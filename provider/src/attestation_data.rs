//! Data source `constellation_attestation`: the attestation defaults of one variant, as this
//! provider and its node images apply them, for use in `constellation_cluster.attestation`.
//!
//! Nothing is fetched: every value comes from the attestation crate (the PCR layout in
//! `constellation_attestation::pcr`, each variant's facts in `Variant::facts`). With `image` (a
//! local image folder, qemu-vtpm only) it also returns that image's expected measurements.

use std::path::Path;

use constellation_attestation::variant::AkTrust;
use constellation_attestation::{pcr, Variant};
use constellation_image::LocalImage;

use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostics};
use crate::image::{measurements_to_value, measurements_type};
use crate::resource::DataSource;
use crate::schema::{Attribute, Block, Type};
use crate::value::Value;

const TCB_ATTRIBUTES: [&str; 4] = [
    "bootloader_version",
    "tee_version",
    "snp_version",
    "microcode_version",
];

pub struct AttestationDataSource {
    schema: Block,
}

impl Default for AttestationDataSource {
    fn default() -> Self {
        Self::new()
    }
}

impl AttestationDataSource {
    pub fn new() -> Self {
        let n = Type::Number;
        let pcrs = Type::List(Box::new(Type::Number));
        let schema = Block {
            version: 0,
            description: "Attestation defaults of one variant, for `constellation_cluster.attestation`.",
            attributes: vec![
                Attribute::required(
                    "variant",
                    Type::String,
                    "Attestation variant: `qemu-vtpm`, `azure-sev-snp`, `aws-sev-snp`, `gcp-sev-snp` or `gcp-sev-es`.",
                ),
                Attribute::optional(
                    "image",
                    Type::String,
                    "Local image folder (`constellation_image.<name>.reference`); `qemu-vtpm` only. \
                     When set, `measurements` holds that image's expected measurements.",
                ),
                Attribute::computed(
                    "measurements",
                    measurements_type(),
                    "Expected measurements of `image`: PCR index → `{expected = hex, warn_only = bool}`. Null without `image`.",
                ),
                Attribute::computed(
                    "quoted_pcrs",
                    pcrs.clone(),
                    "PCR indices every node quotes in its evidence (0 to 15).",
                ),
                Attribute::computed(
                    "enforced_pcrs",
                    pcrs,
                    "PCR indices every image's measurements enforce: 4 (boot application: the kernel, or the local platform's bootstrapper), \
                     9 (kernel command line and initrd, or the local platform's image manifest), 15 (cluster ID).",
                ),
                Attribute::computed(
                    "ak_pinned",
                    Type::Bool,
                    "Whether the attestation key is trusted by pinning it at provisioning (`true`) rather than \
                     because an SEV-SNP report vouches for it (`false`). Null when `verifier_available` is false.",
                ),
                Attribute::computed(
                    "sev_snp",
                    Type::Bool,
                    "Whether the variant's evidence contains an AMD SEV-SNP attestation report.",
                ),
                Attribute::computed(
                    "verifier_available",
                    Type::Bool,
                    "Whether this provider build can verify the variant's evidence.",
                ),
                Attribute::computed(
                    "bootloader_version",
                    n.clone(),
                    "Default minimum SEV-SNP boot loader SVN: 0 (no minimum) for SNP variants, null otherwise.",
                ),
                Attribute::computed(
                    "tee_version",
                    n.clone(),
                    "Default minimum SEV-SNP TEE SVN: 0 for SNP variants, null otherwise.",
                ),
                Attribute::computed(
                    "snp_version",
                    n.clone(),
                    "Default minimum SEV-SNP firmware SVN: 0 for SNP variants, null otherwise.",
                ),
                Attribute::computed(
                    "microcode_version",
                    n,
                    "Default minimum CPU microcode SVN: 0 for SNP variants, null otherwise.",
                ),
                Attribute::optional_computed(
                    "minimum_abi",
                    Type::String,
                    "SEV-SNP minimum firmware ABI, `MAJOR.MINOR`: checked and passed through when set, \
                     the default `0.0` for SNP variants otherwise, null for other variants.",
                ),
                Attribute::optional(
                    "allowed_launch_measurements",
                    Type::List(Box::new(Type::String)),
                    "SEV-SNP launch-measurement allow-list (96 hex characters each), checked and passed through.",
                ),
                Attribute::optional(
                    "allowed_id_key_digests",
                    Type::List(Box::new(Type::String)),
                    "SEV-SNP ID-key-digest allow-list (96 hex characters each), checked and passed through.",
                ),
            ],
        };
        Self { schema }
    }
}

fn path(name: &str) -> AttrPath {
    AttrPath::attr(&[name])
}

/// The known inputs: the variant and the optional image folder.
fn decode_inputs(config: &Value, d: &mut Decoder) -> Option<(Variant, Option<String>)> {
    let variant = d
        .req_string(config.get("variant"), &path("variant"))
        .and_then(|s| {
            d.check(
                s.parse::<Variant>(),
                &path("variant"),
                "Unknown attestation variant",
            )
        });
    let image = d.opt_string(config.get("image"), &path("image"));
    if let (Some(variant), Some(Some(_))) = (variant, &image) {
        // An image folder is for the local or the qemu platform; both produce one variant.
        let produced = crate::cluster::model::Platform::Local.attestation_variant();
        if variant != produced {
            d.error(
                &path("image"),
                "Image not supported for this variant",
                format!(
                    "`image` takes a local image folder, and local images attest with {produced}, not {variant}"
                ),
            );
            return None;
        }
    }
    let snp = crate::cluster::codec::decode_snp_settings(config, &AttrPath::root(), d);
    let variant = variant?;
    if !crate::cluster::codec::refuse_snp_without_snp(
        variant,
        config,
        &AttrPath::root(),
        &SNP_INPUTS,
        d,
    ) {
        return None;
    }
    snp?;
    Some((variant, image?))
}

/// The SEV-SNP settings a configuration may give (checked, then passed through).
const SNP_INPUTS: [&str; 3] = [
    "minimum_abi",
    "allowed_launch_measurements",
    "allowed_id_key_digests",
];

fn pcr_list(pcrs: impl IntoIterator<Item = u32>) -> Value {
    Value::List(
        pcrs.into_iter()
            .map(|i| Value::Number(f64::from(i)))
            .collect(),
    )
}

impl DataSource for AttestationDataSource {
    fn type_name(&self) -> &'static str {
        "constellation_attestation"
    }

    fn schema(&self) -> &Block {
        &self.schema
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut d = Decoder::new();
        let _ = decode_inputs(config, &mut d);
        d.diagnostics
    }

    fn read(&self, config: &Value) -> Result<Value, Diagnostics> {
        let mut d = Decoder::new();
        let inputs = decode_inputs(config, &mut d);
        let (variant, image) = d.finish(inputs)?;
        let measurements = match image {
            None => Value::Null,
            Some(dir) => {
                let image = LocalImage::open(Path::new(&dir)).map_err(|e| {
                    let mut d = Decoder::new();
                    d.error(&path("image"), "Cannot open image", e.to_string());
                    d.diagnostics
                })?;
                measurements_to_value(&image.measurements)
            }
        };
        let facts = variant.facts();
        let mut state = Value::object([
            ("variant", Value::string(variant.as_str())),
            ("image", config.get("image").clone()),
            ("measurements", measurements),
            ("quoted_pcrs", pcr_list(facts.quoted_pcrs.clone())),
            ("enforced_pcrs", pcr_list(pcr::ENFORCED)),
            (
                "ak_pinned",
                facts
                    .ak_trust
                    .map_or(Value::Null, |t| Value::Bool(t == AkTrust::Pinned)),
            ),
            ("sev_snp", Value::Bool(facts.sev_snp)),
            (
                "verifier_available",
                Value::Bool(facts.validator_available()),
            ),
        ]);
        let default_abi = facts.sev_snp.then(|| Value::string("0.0"));
        let abi = config.get("minimum_abi").clone();
        state.set(
            "minimum_abi",
            if abi.is_null() {
                default_abi.unwrap_or(Value::Null)
            } else {
                abi
            },
        );
        for name in &SNP_INPUTS[1..] {
            state.set(name, config.get(name).clone());
        }
        for (i, name) in TCB_ATTRIBUTES.into_iter().enumerate() {
            let v = facts
                .default_minimum_tcb
                .map_or(Value::Null, |t| Value::Number(f64::from(t[i])));
            state.set(name, v);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(variant: &str, image: Value) -> Value {
        Value::object([("variant", Value::string(variant)), ("image", image)])
    }

    #[test]
    fn every_schema_attribute_is_in_the_state() {
        let ds = AttestationDataSource::new();
        for v in Variant::ALL {
            let state = ds.read(&config(v.as_str(), Value::Null)).unwrap();
            let Value::Map(m) = &state else {
                panic!("state is an object")
            };
            let names: Vec<&str> = ds.schema().attributes.iter().map(|a| a.name).collect();
            assert_eq!(m.len(), names.len(), "{v}");
            for n in names {
                assert!(m.contains_key(n), "{v}: {n}");
            }
        }
    }

    #[test]
    fn qemu_and_snp_defaults() {
        let ds = AttestationDataSource::new();
        let q = ds.read(&config("qemu-vtpm", Value::Null)).unwrap();
        assert_eq!(q.get("ak_pinned"), &Value::Bool(true));
        assert_eq!(q.get("sev_snp"), &Value::Bool(false));
        assert!(q.get("microcode_version").is_null());
        assert_eq!(q.get("enforced_pcrs"), &pcr_list([4, 9, 15]));
        assert_eq!(q.get("quoted_pcrs"), &pcr_list(0..=15));
        let a = ds.read(&config("aws-sev-snp", Value::Null)).unwrap();
        assert_eq!(a.get("ak_pinned"), &Value::Bool(false));
        assert_eq!(a.get("bootloader_version"), &Value::Number(0.0));
        let g = ds.read(&config("gcp-sev-es", Value::Null)).unwrap();
        assert!(g.get("ak_pinned").is_null());
        assert_eq!(g.get("verifier_available"), &Value::Bool(false));
    }

    #[test]
    fn snp_settings_are_checked_passed_through_and_errors_name_the_field() {
        let ds = AttestationDataSource::new();
        let mut c = config("azure-sev-snp", Value::Null);
        c.set("minimum_abi", Value::string("1.55"));
        let digest = Value::List(vec![Value::string("ab".repeat(48))]);
        c.set("allowed_launch_measurements", digest.clone());
        let state = ds.read(&c).unwrap();
        assert_eq!(state.get("minimum_abi"), &Value::string("1.55"));
        assert_eq!(state.get("allowed_launch_measurements"), &digest);
        assert!(state.get("allowed_id_key_digests").is_null());
        let defaults = ds.read(&config("aws-sev-snp", Value::Null)).unwrap();
        assert_eq!(defaults.get("minimum_abi"), &Value::string("0.0"));
        for (attr, bad) in [
            ("minimum_abi", Value::string("1")),
            (
                "allowed_id_key_digests",
                Value::List(vec![Value::string("zz")]),
            ),
        ] {
            let mut c = config("aws-sev-snp", Value::Null);
            c.set(attr, bad);
            let d = ds.validate(&c);
            assert_eq!(d.0.len(), 1, "{attr}");
            assert_eq!(d.0[0].attribute, Some(path(attr)));
            assert_eq!(d.0[0].summary, format!("Invalid {attr}"));
        }
        let mut q = config("qemu-vtpm", Value::Null);
        q.set("minimum_abi", Value::string("1.0"));
        let d = ds.validate(&q);
        assert_eq!(d.0[0].attribute, Some(path("minimum_abi")));
        assert_eq!(
            d.0[0].summary,
            "SEV-SNP setting on a variant without SEV-SNP"
        );
    }

    #[test]
    fn unknown_variant_and_misplaced_image_point_at_the_attribute() {
        let ds = AttestationDataSource::new();
        let d = ds.read(&config("sgx", Value::Null)).unwrap_err();
        assert_eq!(d.0[0].attribute, Some(path("variant")));
        assert!(d.0[0].detail.contains("\"sgx\""), "{:?}", d.0[0]);
        let d = ds.validate(&config("aws-sev-snp", Value::string("/x")));
        assert_eq!(d.0[0].attribute, Some(path("image")));
        // Unknown values (validate before apply) are skipped.
        assert!(ds
            .validate(&config("qemu-vtpm", Value::Unknown))
            .0
            .is_empty());
        assert!(ds
            .validate(&Value::object([("variant", Value::Unknown)]))
            .0
            .is_empty());
    }
}
