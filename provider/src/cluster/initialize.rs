//! Init of the first control plane: attest it against the image's measurements, then send the
//! secrets.

use constellation_attestation::atls::{self, AtlsError, ClientConfig};
use constellation_attestation::{validator_for, ValidatorPolicy};
use constellation_common::metadata::ports;
use constellation_common::secret::SecretBytes;
use constellation_platform::local::NodeRecord;
use constellation_proto::init::{self as pb, init_service_client::InitServiceClient};
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
    let policy = ValidatorPolicy::pinned(vec![pinned_ak(node)?], measurements.clone());
    let validator = validator_for(variant, policy).map_err(|e| ClusterError::Attestation {
        node: node.name.clone(),
        reason: e.to_string(),
    })?;
    let attestation = |e: AtlsError| ClusterError::Attestation {
        node: node.name.clone(),
        reason: e.to_string(),
    };
    let config = ClientConfig::server_only(validator).map_err(attestation)?;
    let endpoint = node.endpoint(ports::BOOTSTRAPPER);
    let (channel, _verdict) = atls::channel(&endpoint, config)
        .await
        .map_err(attestation)?;
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
    let init_failed = |s: tonic::Status| {
        if s.code() == tonic::Code::AlreadyExists {
            return ClusterError::AlreadyInitialized {
                node: node.name.clone(),
                message: s.message().to_owned(),
            };
        }
        ClusterError::Init(format!(
            "node {}: {:?}: {}",
            node.name,
            s.code(),
            s.message()
        ))
    };
    let mut stream = InitServiceClient::new(channel)
        .init(request)
        .await
        .map_err(init_failed)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(init_failed)? {
        match msg.kind {
            Some(pb::init_response::Kind::Log(line)) => {
                progress.step(&format!("{}: {}", node.name, line.message))
            }
            Some(pb::init_response::Kind::Success(s)) => {
                return Ok(ClusterOutputs {
                    cluster_id: hex::encode(&s.cluster_id),
                    owner_id: hex::encode(&s.owner_id),
                    kubeconfig: SecretBytes::new(s.kubeconfig),
                    cluster_ca_certificate: pem_string("CA certificate", s.ca_cert_pem)?,
                    client_certificate: pem_string("client certificate", s.client_cert_pem)?,
                    client_key: SecretBytes::new(s.client_key_pem),
                    host: s.endpoint,
                    init_secret: init_secret.clone(),
                });
            }
            None => {}
        }
    }
    Err(ClusterError::Init(format!(
        "node {}: the Init stream ended without InitSuccess",
        node.name
    )))
}
