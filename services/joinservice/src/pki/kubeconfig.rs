//! The cluster admin's client credentials and the kubeconfig that carries them.

use base64::Engine as _;
use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};

use super::*;

use super::ca::{base_params, generate_error};
/// Common name of the cluster admin's client certificate.
pub const ADMIN_COMMON_NAME: &str = "kubernetes-admin";
/// Group (organization) that Kubernetes maps to cluster-admin.
pub const ADMIN_ORGANIZATION: &str = "system:masters";

/// A certificate and its private key (PKCS#8 PEM), e.g. the cluster admin's client credentials.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub cert_pem: String,
    pub key_pem: SecretBytes,
}

impl ClusterPki {
    /// A fresh client certificate for the cluster admin (CN kubernetes-admin, O system:masters),
    /// valid one year.
    pub fn admin_client_cert(&self, clock: &dyn Clock) -> Result<ClientCredentials, PkiError> {
        let what = "admin client certificate";
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_error(what, e))?;
        let mut params = base_params(
            ADMIN_COMMON_NAME,
            Some(ADMIN_ORGANIZATION),
            clock,
            LEAF_VALIDITY,
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = self
            .ca
            .sign(&params, &key)
            .map_err(|e| generate_error(what, e))?;
        Ok(ClientCredentials {
            cert_pem: cert.pem(),
            key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
        })
    }

    /// Renders a kubeconfig for `client` against the API server at `endpoint` (`host:port` or a
    /// full `https://` URL), with the CA and the client's certificate and key embedded.
    pub fn kubeconfig(
        &self,
        endpoint: &str,
        client: &ClientCredentials,
    ) -> Result<String, PkiError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let server = if endpoint.starts_with("https://") {
            endpoint.to_owned()
        } else {
            format!("https://{endpoint}")
        };
        let user = ADMIN_COMMON_NAME.to_owned();
        let context = format!("{user}@{}", self.cluster_name);
        let config = Kubeconfig {
            api_version: "v1".into(),
            kind: "Config".into(),
            clusters: vec![Named {
                name: self.cluster_name.clone(),
                cluster: Some(KubeconfigCluster {
                    server,
                    certificate_authority_data: b64.encode(&self.ca.cert_pem),
                }),
                context: None,
                user: None,
            }],
            contexts: vec![Named {
                name: context.clone(),
                cluster: None,
                context: Some(KubeconfigContext {
                    cluster: self.cluster_name.clone(),
                    user: user.clone(),
                }),
                user: None,
            }],
            current_context: context,
            users: vec![Named {
                name: user,
                cluster: None,
                context: None,
                user: Some(KubeconfigUser {
                    client_certificate_data: b64.encode(&client.cert_pem),
                    client_key_data: b64.encode(client.key_pem.expose()),
                }),
            }],
            preferences: Preferences {},
        };
        Ok(serde_yaml::to_string(&config)?)
    }
}
#[derive(Serialize, Deserialize)]
struct Kubeconfig {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    clusters: Vec<Named>,
    contexts: Vec<Named>,
    #[serde(rename = "current-context")]
    current_context: String,
    users: Vec<Named>,
    preferences: Preferences,
}

#[derive(Serialize, Deserialize)]
struct Preferences {}

/// kubeconfig's `{name, cluster|context|user}` list entries.
#[derive(Serialize, Deserialize)]
struct Named {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<KubeconfigCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<KubeconfigContext>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<KubeconfigUser>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KubeconfigCluster {
    server: String,
    certificate_authority_data: String,
}

#[derive(Serialize, Deserialize)]
struct KubeconfigContext {
    cluster: String,
    user: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KubeconfigUser {
    client_certificate_data: String,
    client_key_data: String,
}
