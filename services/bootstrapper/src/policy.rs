//! The cluster's attestation policy as the nodes apply it, read from the platform's metadata on
//! every check, so new measurements or new nodes apply to the next connection without restart.

use std::sync::Arc;

use constellation_attestation::measurements::{AcceptedMeasurements, Digest};
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::{
    validator_for, ValidationError, Validator, ValidatorPolicy, Variant, Verdict,
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

/// A validator built from the current metadata at every call.
pub struct ClusterValidator {
    metadata: Arc<dyn Metadata>,
    scope: Scope,
}

impl ClusterValidator {
    pub fn new(metadata: Arc<dyn Metadata>, scope: Scope) -> Self {
        Self { metadata, scope }
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
        policy_for(&cluster, self.scope)
    }
}

/// The cluster's attestation variant, as the metadata names it.
fn variant_of(cluster: &ClusterMetadata) -> Result<Variant, ValidationError> {
    cluster
        .attestation_variant
        .parse()
        .map_err(|e| ValidationError::Malformed(format!("cluster metadata: {e}")))
}

/// The validator a scope implies for the given metadata: the metadata's variant, the nodes'
/// pinned keys as its anchor.
pub fn policy_for(
    cluster: &ClusterMetadata,
    scope: Scope,
) -> Result<Arc<dyn Validator>, ValidationError> {
    let variant = variant_of(cluster)?;
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
        validators.push(validator_for(
            variant,
            ValidatorPolicy::pinned(pinned.clone(), measurements),
        )?);
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
