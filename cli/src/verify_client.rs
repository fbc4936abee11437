//! Client side of the verification service: ask a running node for fresh evidence bound to a
//! nonce and validate it (like `constellation verify`).

use constellation_attestation::measurements::{cluster_id_pcr, CLUSTER_ID_PCR};
use constellation_attestation::verification::binding;
use constellation_attestation::{ValidationError, Validator, Verdict};
use constellation_proto::verify::verify_service_client::VerifyServiceClient;
use constellation_proto::verify::GetAttestationRequest;
use constellation_proto::PROTOCOL_VERSION;

/// Why a node could not be verified.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot reach the verification service at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("verification service at {endpoint} refused: {status}")]
    Refused { endpoint: String, status: String },
    #[error("node at {endpoint} answered with variant {found}, expected {expected}")]
    Variant {
        endpoint: String,
        expected: String,
        found: String,
    },
    #[error("node at {endpoint}: {source}")]
    Rejected {
        endpoint: String,
        source: ValidationError,
    },
    #[error("node at {endpoint} belongs to another cluster: PCR[{CLUSTER_ID_PCR}] expected {expected}, found {found}")]
    ClusterId {
        endpoint: String,
        expected: String,
        found: String,
    },
}

/// Asks the node at `endpoint` ("host:port") for fresh evidence and validates it. With
/// `expected_cluster_id`, PCR 15 must hold exactly one extend with that cluster ID, so the node
/// is proven to belong to this cluster. (The validator's own measurements should therefore not
/// enforce PCR 15.)
pub async fn verify_cluster(
    endpoint: &str,
    validator: &dyn Validator,
    expected_cluster_id: Option<&[u8]>,
) -> Result<Verdict, VerifyError> {
    use rand::RngCore;
    let unreachable = |message: String| VerifyError::Unreachable {
        endpoint: endpoint.to_owned(),
        message,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut nonce = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let user_data = b"constellation verify".to_vec();
    let resp = VerifyServiceClient::new(channel)
        .get_attestation(GetAttestationRequest {
            version: PROTOCOL_VERSION,
            nonce: nonce.clone(),
            user_data: user_data.clone(),
        })
        .await
        .map_err(|s| VerifyError::Refused {
            endpoint: endpoint.to_owned(),
            status: s.message().to_owned(),
        })?
        .into_inner();
    if resp.variant != validator.variant().as_str() {
        return Err(VerifyError::Variant {
            endpoint: endpoint.to_owned(),
            expected: validator.variant().to_string(),
            found: resp.variant,
        });
    }
    let verdict = validator
        .validate(&resp.attestation, &binding(&nonce, &user_data))
        .map_err(|source| VerifyError::Rejected {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    if let Some(id) = expected_cluster_id {
        let expected = cluster_id_pcr(id);
        let found = verdict.pcrs.get(&CLUSTER_ID_PCR).copied();
        if found != Some(expected) {
            return Err(VerifyError::ClusterId {
                endpoint: endpoint.to_owned(),
                expected: hex::encode(expected),
                found: found
                    .map(hex::encode)
                    .unwrap_or_else(|| "not quoted".into()),
            });
        }
    }
    Ok(verdict)
}
