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
    // The local platform's nodes attest with qemu-vtpm (`check_variant`).
    let validator = validator_for(Variant::QemuVtpm, ValidatorPolicy::pinned(vec![ak], m))
        .map_err(|e| e.to_string())?;
    verify_cluster(&node.endpoint(ports::VERIFY), &*validator, Some(cluster_id))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub(super) fn cluster_id_bytes(outputs: &ClusterOutputs) -> Result<Vec<u8>, ClusterError> {
    hex::decode(&outputs.cluster_id)
        .map_err(|e| ClusterError::PlatformState(format!("cluster_id is not hex: {e}")))
}

pub(super) fn check_variant(spec: &ClusterSpec) -> Result<(), ClusterError> {
    if spec.attestation.variant != Variant::QemuVtpm {
        return Err(ClusterError::Unsupported {
            what: format!("attestation variant {}", spec.attestation.variant),
            reason: "the local platform's nodes attest with qemu-vtpm".into(),
        });
    }
    Ok(())
}

/// Checks `nodes` concurrently; one result per node, in order.
pub(super) async fn check_nodes(
    nodes: &[NodeRecord],
    measurements: &Measurements,
    cluster_id: &[u8],
) -> Vec<Result<(), String>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let (node, m, id) = (node.clone(), measurements.clone(), cluster_id.to_vec());
        set.spawn(async move { (i, check_node(&node, &m, &id).await) });
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
