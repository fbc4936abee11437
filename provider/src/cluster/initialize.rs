//! Init of the first control plane: attest it against the image's measurements, then send the
//! secrets.

use constellation_attest::bootstrapper_client::{self, attest_bootstrapper, InitError};
use constellation_attestation::{validator_for, ValidatorPolicy};
use constellation_common::metadata::ports;
use constellation_common::secret::SecretBytes;
use constellation_platform::local::NodeRecord;
use constellation_proto::init as pb;
use constellation_proto::PROTOCOL_VERSION;

use super::model::*;
use super::node_checks::*;

pub(super) fn kms_request(kms: &KmsConfig) -> pb::KmsConfig {
    let backend = match kms {
        KmsConfig::ClusterManaged => {
            pb::kms_config::Backend::ClusterManaged(pb::ClusterManagedKms {})
        }
        KmsConfig::Kmip(k) => pb::kms_config::Backend::Kmip(kmip_request(k)),
    };
    pb::KmsConfig {
        backend: Some(backend),
    }
}

/// The KMIP settings as Init and Recover send them.
pub(super) fn kmip_request(k: &KmipConfig) -> pb::KmipKms {
    pb::KmipKms {
        endpoint: k.endpoint.clone(),
        server_ca_pem: k.server_ca_pem.as_bytes().to_vec(),
        client_cert_pem: k.client_cert_pem.as_bytes().to_vec(),
        client_key_pem: k.client_key_pem.expose().to_vec(),
        kek_id: k.kek_id.clone(),
    }
}

pub(super) fn pem_string(what: &str, bytes: Vec<u8>) -> Result<String, ClusterError> {
    String::from_utf8(bytes).map_err(|_| ClusterError::Init(format!("{what} is not UTF-8 PEM")))
}

/// A channel to a not yet bound control plane's bootstrapper (Init or Recover), open only
/// after the node attested over server-only aTLS, pinned to its AK, against `measurements`
/// (PCR 15 = zero: nothing bound it in this boot).
pub(super) async fn attested_bootstrapper(
    variant: constellation_attestation::Variant,
    node: &NodeRecord,
    measurements: &constellation_attestation::Measurements,
) -> Result<tonic::transport::Channel, ClusterError> {
    let attestation = |reason: String| ClusterError::Attestation {
        node: node.name.clone(),
        reason,
    };
    let policy = ValidatorPolicy::pinned(vec![pinned_ak(node)?], measurements.clone());
    let validator = validator_for(variant, policy).map_err(|e| attestation(e.to_string()))?;
    let (channel, _verdict) = attest_bootstrapper(&node.endpoint(ports::BOOTSTRAPPER), validator)
        .await
        .map_err(|e| attestation(e.to_string()))?;
    Ok(channel)
}

/// Attests the first control plane against the image's measurements, then sends Init.
pub(super) async fn initialize(
    spec: &ClusterSpec,
    node: &NodeRecord,
    init_secret: &SecretBytes,
    progress: &dyn Progress,
) -> Result<ClusterOutputs, ClusterError> {
    let channel =
        attested_bootstrapper(spec.attestation.variant, node, &spec.image.measurements).await?;
    progress.step(&format!(
        "node {} attested against the image measurements; sending Init",
        node.name
    ));
    let request = pb::InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: spec.secrets.master_secret.for_init()?.expose().to_vec(),
        master_salt: spec.secrets.master_secret_salt.expose().to_vec(),
        measurement_salt: spec.secrets.measurement_salt.expose().to_vec(),
        init_secret: init_secret.expose().to_vec(),
        cluster_name: spec.name.clone(),
        kubernetes_version: spec.kubernetes_version.clone(),
        network: Some(pb::NetworkConfig {
            pod_cidr: spec.network.pod_cidr.to_string(),
            service_cidr: spec.network.service_cidr.to_string(),
            node_cidr: spec.network.node_cidr.to_string(),
        }),
        kms: Some(kms_request(&spec.kms)),
        api_server_cert_sans: Vec::new(),
    };
    let success = bootstrapper_client::init(channel, request, |line| {
        progress.step(&format!("{}: {}", node.name, line))
    })
    .await
    .map_err(|e| match e {
        InitError::AlreadyInitialized { message } => ClusterError::AlreadyInitialized {
            node: node.name.clone(),
            message,
        },
        e => ClusterError::Init(format!("node {}: {e}", node.name)),
    })?;
    Ok(ClusterOutputs {
        cluster_id: hex::encode(&success.cluster_id),
        owner_id: hex::encode(&success.owner_id),
        kubeconfig: SecretBytes::new(success.kubeconfig),
        cluster_ca_certificate: pem_string("CA certificate", success.ca_cert_pem)?,
        client_certificate: pem_string("client certificate", success.client_cert_pem)?,
        client_key: SecretBytes::new(success.client_key_pem),
        host: success.endpoint,
        init_secret: init_secret.clone(),
    })
}
