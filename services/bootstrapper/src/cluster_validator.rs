//! The cluster's attestation policy as the nodes apply it, read from the platform's metadata on
//! every check, so new measurements or new nodes apply to the next connection without restart.

use std::sync::Arc;

use constellation_attestation::measurements::{AcceptedMeasurements, Digest};
use constellation_attestation::snp::{SnpPolicy, SnpSettings, VekSource};
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::SnpAnchor;
use constellation_attestation::{
    validator_for, Clock, ValidationError, Validator, ValidatorPolicy, Variant, Verdict,
};
use constellation_common::metadata::{ClusterMetadata, Metadata, Role};

/// Which peers a validator accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A node that is not part of the cluster yet (init target, joiner): every measurement,
    /// including PCR 15 = zero, must match; any node of the cluster's metadata may attest.
    FreshNode,
    /// A control-plane member (the join service, as seen by a joiner): PCR 15 is not checked
    /// here (it carries the cluster ID), only control-plane nodes' keys are accepted.
    ControlPlaneMember,
}

/// What a node needs, besides the metadata, to validate SEV-SNP evidence: where each report's
/// VCEK/VLEK comes from (e.g. the join service's collateral cache) and "now" for its validity.
#[derive(Clone)]
pub struct SnpCollateral {
    pub vek: Arc<dyn VekSource>,
    pub clock: Arc<dyn Clock>,
}

/// A validator built from the current metadata at every call.
pub struct ClusterValidator {
    metadata: Arc<dyn Metadata>,
    scope: Scope,
    snp: Option<SnpCollateral>,
}

impl ClusterValidator {
    pub fn new(metadata: Arc<dyn Metadata>, scope: Scope) -> Self {
        Self {
            metadata,
            scope,
            snp: None,
        }
    }

    /// Lets the validator check SEV-SNP variants (without it, their evidence is refused).
    pub fn with_snp_collateral(mut self, collateral: SnpCollateral) -> Self {
        self.snp = Some(collateral);
        self
    }

    /// The name of the node whose pinned AK has this fingerprint.
    pub fn node_for(&self, fingerprint: &Digest) -> Option<String> {
        let cluster = self.metadata.cluster().ok()?;
        cluster
            .nodes
            .iter()
            .find(|n| {
                hex::decode(&n.ak_spki_hex)
                    .ok()
                    .and_then(|der| AkPublicKey::from_spki_der(&der).ok())
                    .is_some_and(|ak| &ak.fingerprint() == fingerprint)
            })
            .map(|n| n.name.clone())
    }

    fn current(&self) -> Result<Arc<dyn Validator>, ValidationError> {
        let cluster = self
            .metadata
            .cluster()
            .map_err(|e| ValidationError::Malformed(format!("cluster metadata: {e}")))?;
        policy_for(&cluster, self.scope, self.snp.as_ref())
    }
}

/// The cluster's attestation variant, as the metadata names it.
fn variant_of(cluster: &ClusterMetadata) -> Result<Variant, ValidationError> {
    cluster
        .attestation_variant
        .parse()
        .map_err(|e| ValidationError::Malformed(format!("cluster metadata: {e}")))
}

/// The validator a scope implies for the given metadata: the metadata's variant, and as its
/// anchor the nodes' pinned keys or, for a SEV-SNP variant, the report under the metadata's SNP
/// settings (`snp_policy_of`) with a VEK from `snp`. SEV-SNP evidence vouches for its own key,
/// so there the scope narrows the measurements only, not the keys.
pub fn policy_for(
    cluster: &ClusterMetadata,
    scope: Scope,
    snp: Option<&SnpCollateral>,
) -> Result<Arc<dyn Validator>, ValidationError> {
    let variant = variant_of(cluster)?;
    let snp_anchor = if variant.facts().sev_snp {
        let collateral = snp.ok_or_else(|| {
            ValidationError::Malformed(format!(
                "attestation variant {variant}: this node has no SEV-SNP collateral source \
                 (VCEK/VLEK) to check reports with"
            ))
        })?;
        Some(SnpAnchor {
            vek: collateral.vek.clone(),
            policy: snp_policy_of(cluster)?,
            clock: collateral.clock.clone(),
        })
    } else {
        None
    };
    // During a rolling image upgrade the metadata lists the old and the new image's sets.
    let accepted = AcceptedMeasurements::from_json(cluster.measurements_json.as_bytes())?;
    let pinned: Vec<AkPublicKey> = cluster
        .nodes
        .iter()
        .filter(|n| scope == Scope::FreshNode || n.role == Role::ControlPlane)
        .filter_map(|n| hex::decode(&n.ak_spki_hex).ok())
        .filter_map(|der| AkPublicKey::from_spki_der(&der).ok())
        .collect();
    let mut validators = Vec::new();
    for measurements in accepted.sets() {
        let measurements = match scope {
            Scope::FreshNode => measurements.clone(),
            // The joiner does not know the cluster ID yet: PCR 15 is dropped explicitly.
            Scope::ControlPlaneMember => measurements.clone().without_cluster_id()?,
        };
        let policy = match &snp_anchor {
            Some(anchor) => ValidatorPolicy::snp(anchor.clone(), measurements),
            None => ValidatorPolicy::pinned(pinned.clone(), measurements),
        };
        validators.push(validator_for(variant, policy)?);
    }
    match validators.len() {
        1 => Ok(validators.remove(0)),
        _ => Ok(Arc::new(AnyOf(validators))),
    }
}

/// Accepts evidence that one of its validators accepts (one per accepted measurement set);
/// when none does, the error is the last one's: the last set is the upgrade's target image,
/// so a refused node learns which of its PCRs differ from the image it should run.
struct AnyOf(Vec<Arc<dyn Validator>>);

impl Validator for AnyOf {
    fn variant(&self) -> Variant {
        self.0
            .first()
            .map(|v| v.variant())
            .unwrap_or(Variant::QemuVtpm)
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        let mut last = ValidationError::Malformed("no accepted measurements".into());
        for validator in &self.0 {
            match validator.validate(evidence, binding) {
                Ok(verdict) => return Ok(verdict),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The SEV-SNP policy the cluster's metadata sets (`snp_settings_json`; empty: the defaults),
/// or an error naming the bad setting. `report_data` stays unset: each validation binds it.
pub fn snp_policy_of(cluster: &ClusterMetadata) -> Result<SnpPolicy, ValidationError> {
    let settings = if cluster.snp_settings_json.is_empty() {
        SnpSettings::default()
    } else {
        serde_json::from_str::<SnpSettings>(&cluster.snp_settings_json).map_err(|e| {
            ValidationError::Malformed(format!("cluster metadata: SEV-SNP settings: {e}"))
        })?
    };
    settings
        .policy()
        .map_err(|e| ValidationError::Malformed(format!("cluster metadata: {e}")))
}

impl Validator for ClusterValidator {
    fn variant(&self) -> Variant {
        // Unreadable metadata validates nothing (`current` fails); qemu-vtpm is only the label.
        self.metadata
            .cluster()
            .ok()
            .and_then(|c| variant_of(&c).ok())
            .unwrap_or(Variant::QemuVtpm)
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        self.current()?.validate(evidence, binding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_attestation::snp::{self, AbiVersion, SigningKey, SnpError};
    use constellation_attestation::testing::snp_reports::{
        Fields, TestChip, ID_KEY_DIGEST, MEASUREMENT, TCB,
    };

    fn cluster(snp_settings_json: &str) -> ClusterMetadata {
        ClusterMetadata {
            cluster_name: "c".into(),
            init_secret_hash: String::new(),
            attestation_variant: "azure-sev-snp".into(),
            measurements_json: "{}".into(),
            snp_settings_json: snp_settings_json.into(),
            nodes: Vec::new(),
        }
    }

    /// The settings as the provider writes them (`AttestationSpec::node_snp_settings`).
    fn configured() -> String {
        serde_json::to_string(&SnpSettings {
            minimum_tcb: Some(TCB),
            minimum_abi: Some("1.55".into()),
            vmpl: None,
            allowed_launch_measurements: Some(vec![hex::encode(MEASUREMENT)]),
            allowed_id_key_digests: Some(vec![hex::encode(ID_KEY_DIGEST)]),
        })
        .unwrap()
    }

    #[test]
    fn the_metadata_settings_make_the_node_policy() {
        let policy = snp_policy_of(&cluster(&configured())).unwrap();
        assert_eq!(policy.minimum_tcb, TCB);
        assert_eq!(
            policy.minimum_abi,
            AbiVersion {
                major: 1,
                minor: 55
            }
        );
        assert_eq!(policy.allowed_measurements, Some(vec![MEASUREMENT]));
        assert_eq!(policy.allowed_id_key_digests, Some(vec![ID_KEY_DIGEST]));
        // No settings: the attestation crate's defaults.
        assert_eq!(snp_policy_of(&cluster("")).unwrap(), SnpPolicy::default());
        // A bad setting is refused, naming it.
        let e = snp_policy_of(&cluster(r#"{"minimum_abi": "1"}"#)).unwrap_err();
        assert!(e.to_string().contains("minimum_abi"), "{e}");
        let e = snp_policy_of(&cluster(r#"{"debug": true}"#)).unwrap_err();
        assert!(e.to_string().contains("debug"), "{e}");
    }

    /// Test AK: SubjectPublicKeyInfo DER of a P-256 key (the software attester's).
    fn ak_spki() -> Vec<u8> {
        let issuer = constellation_attestation::testing::SoftwareIssuer::new([0; 32]);
        let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        der.extend(issuer.public());
        der
    }

    /// aws-sev-snp evidence around a crafted VLEK-signed report for `ak_spki`; the quote is a
    /// placeholder (the SNP half is checked first).
    fn aws_evidence(chip: &TestChip, fields: Fields, ak_spki: &[u8]) -> Vec<u8> {
        use constellation_attestation::variant::aws_sev_snp::{
            report_data_for_ak, AwsSevSnpEvidence,
        };
        use constellation_attestation::variant::qemu_vtpm::QemuVtpmEvidence;
        let fields = Fields {
            signer: SigningKey::Vlek,
            report_data: report_data_for_ak(ak_spki),
            ..fields
        };
        AwsSevSnpEvidence {
            variant: Variant::AwsSevSnp,
            report: chip.report(&fields),
            tpm: QemuVtpmEvidence {
                variant: Variant::QemuVtpm,
                attest: vec![1],
                signature: vec![2],
                pcrs: Default::default(),
                ak: ak_spki.to_vec(),
                event_log: None,
            },
        }
        .to_bytes()
    }

    /// The node's join validator for an aws-sev-snp cluster enforces the metadata's settings:
    /// a report outside the launch-measurement allow-list is refused with that typed reason;
    /// the baseline report gets past every SNP check (and fails only at the placeholder quote).
    #[test]
    fn the_nodes_join_validator_enforces_the_snp_settings() {
        let mut metadata = cluster(&configured());
        metadata.attestation_variant = "aws-sev-snp".into();
        metadata.measurements_json = r#"{"4": {"expected": "0101010101010101010101010101010101010101010101010101010101010101", "warn_only": false}, "15": {"expected": "0000000000000000000000000000000000000000000000000000000000000000", "warn_only": false}}"#.into();
        let chip = TestChip::new();
        // Without a collateral source an SNP cluster validates nothing.
        let e = policy_for(&metadata, Scope::FreshNode, None)
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("no SEV-SNP collateral source"),
            "{e}"
        );
        let collateral = SnpCollateral {
            vek: Arc::new(chip.vek(SigningKey::Vlek, TCB)),
            clock: Arc::new(
                constellation_attestation::FixedClock::at_rfc3339("2026-01-01T00:00:00Z").unwrap(),
            ),
        };
        let validator = policy_for(&metadata, Scope::FreshNode, Some(&collateral)).unwrap();
        assert_eq!(validator.variant(), Variant::AwsSevSnp);
        let ak = ak_spki();
        let binding = [7; 32];
        let other_image = Fields {
            measurement: [0x99; 48],
            ..Fields::default()
        };
        match validator.validate(&aws_evidence(&chip, other_image, &ak), &binding) {
            Err(ValidationError::Snp(SnpError::MeasurementNotAllowed { found, .. })) => {
                assert_eq!(found, vec![0x99; 48]);
            }
            other => panic!("expected MeasurementNotAllowed, got {other:?}"),
        }
        match validator.validate(&aws_evidence(&chip, Fields::default(), &ak), &binding) {
            // The TPM half: the placeholder quote does not parse.
            Err(ValidationError::Quote(_)) => {}
            other => {
                panic!("the baseline report meets the settings, only the quote fails: {other:?}")
            }
        }
    }

    /// A node whose report breaks one configured setting is refused with that setting's typed
    /// reason, while the same chip's baseline report passes.
    #[test]
    fn a_report_violating_a_configured_setting_is_refused_with_the_reason() {
        let policy = snp_policy_of(&cluster(&configured())).unwrap();
        let chip = TestChip::new();
        let vek = chip.vek(SigningKey::Vcek, TCB);
        snp::verify_report(&chip.report(&Fields::default()), &vek, &policy)
            .expect("the baseline report meets every setting");

        let other_image = Fields {
            measurement: [0x99; 48],
            ..Fields::default()
        };
        match snp::verify_report(&chip.report(&other_image), &vek, &policy) {
            Err(SnpError::MeasurementNotAllowed { allowed, found }) => {
                assert_eq!(allowed, vec![MEASUREMENT.to_vec()]);
                assert_eq!(found, vec![0x99; 48]);
            }
            other => panic!("expected MeasurementNotAllowed, got {other:?}"),
        }
        let old_abi = Fields {
            policy: (1 << 17) | (1 << 16) | (1 << 8) | 54,
            ..Fields::default()
        };
        assert!(matches!(
            snp::verify_report(&chip.report(&old_abi), &vek, &policy),
            Err(SnpError::AbiBelowMinimum { .. })
        ));
        let other_id_key = Fields {
            id_key_digest: [0x77; 48],
            ..Fields::default()
        };
        assert!(matches!(
            snp::verify_report(&chip.report(&other_id_key), &vek, &policy),
            Err(SnpError::IdKeyDigestNotAllowed { .. })
        ));
    }
}
