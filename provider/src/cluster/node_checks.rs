//! Health of a cluster's nodes: each node runs and attests, pinned to its own attestation key,
//! with the image's measurements and PCR 15 = the cluster ID.

use constellation_attest::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::{validator_for, Measurements, ValidatorPolicy, Variant};
use constellation_common::metadata::ports;
use constellation_platform::local::NodeRecord;

use super::model::*;

/// The node's pinned attestation key from the platform record.
pub(super) fn pinned_ak(node: &NodeRecord) -> Result<AkPublicKey, ClusterError> {
    let bad = |reason: String| ClusterError::Node {
        node: node.name.clone(),
        reason,
    };
    let der = hex::decode(&node.ak_spki_hex)
        .map_err(|e| bad(format!("pinned attestation key is not hex: {e}")))?;
    AkPublicKey::from_spki_der(&der).map_err(|e| bad(format!("pinned attestation key: {e}")))
}

/// Checks one running node: its process is alive and it attests, pinned to its own AK, with
/// the measurements (PCR 15 excluded) and PCR 15 = `cluster_id`. Err is the reason.
pub(super) async fn check_node(
    variant: Variant,
    node: &NodeRecord,
    measurements: &Measurements,
    cluster_id: &[u8],
) -> Result<(), String> {
    if !node.is_alive() {
        return Err("node process or its TPM is not running".into());
    }
    let ak = pinned_ak(node).map_err(|e| e.to_string())?;
    let mut m = measurements.clone();
    m.0.remove(&CLUSTER_ID_PCR);
    let validator =
        validator_for(variant, ValidatorPolicy::pinned(vec![ak], m)).map_err(|e| e.to_string())?;
    verify_cluster(&node.endpoint(ports::VERIFY), &*validator, Some(cluster_id))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub(super) fn cluster_id_bytes(outputs: &ClusterOutputs) -> Result<Vec<u8>, ClusterError> {
    hex::decode(&outputs.cluster_id)
        .map_err(|e| ClusterError::PlatformState(format!("cluster_id is not hex: {e}")))
}

/// The configured attestation variant is the one the platform's nodes produce: a cluster
/// whose nodes could never pass its validator is refused before anything is created.
pub(super) fn check_variant(spec: &ClusterSpec) -> Result<(), ClusterError> {
    let produced = spec.platform.attestation_variant();
    if spec.attestation.variant != produced {
        return Err(ClusterError::Unsupported {
            what: format!("attestation variant {}", spec.attestation.variant),
            reason: format!(
                "the {} platform's nodes attest with {produced}",
                spec.platform.as_str()
            ),
        });
    }
    Ok(())
}

/// Checks `nodes` concurrently; one result per node, in order.
pub(super) async fn check_nodes(
    variant: Variant,
    nodes: &[NodeRecord],
    measurements: &Measurements,
    cluster_id: &[u8],
) -> Vec<Result<(), String>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let (node, m, id) = (node.clone(), measurements.clone(), cluster_id.to_vec());
        set.spawn(async move { (i, check_node(variant, &node, &m, &id).await) });
    }
    let mut out: Vec<Result<(), String>> = vec![Err("not checked".into()); nodes.len()];
    while let Some(done) = set.join_next().await {
        match done {
            Ok((i, r)) => out[i] = r,
            Err(e) => tracing::warn!(error = %e, "node check task failed"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_the_platform_cannot_produce_is_refused_before_anything_is_created() {
        for platform in [Platform::Local, Platform::Qemu] {
            let mut spec = crate::cluster::journal::tests::spec();
            spec.platform = platform;
            spec.attestation.variant = platform.attestation_variant();
            assert!(check_variant(&spec).is_ok(), "{platform:?}");
            spec.attestation.variant = Variant::AwsSevSnp;
            match check_variant(&spec) {
                Err(ClusterError::Unsupported { what, reason }) => {
                    assert!(what.contains("aws-sev-snp"), "{what}");
                    assert!(reason.contains(platform.as_str()), "{reason}");
                    assert!(reason.contains("qemu-vtpm"), "{reason}");
                }
                other => panic!("{platform:?}: {other:?}"),
            }
        }
    }
}
