//! The key-service CA's leaves: the key service's server certificate and its clients' (the control
//! planes' join services).

use std::fmt;
use std::net::IpAddr;

use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256};

use super::*;

use super::ca::{base_params, generate_error, CertificateAuthority};
/// Common name of the key-service CA.
pub const KEY_SERVICE_CA_COMMON_NAME: &str = "constellation key service CA";
/// Common name of the key service's server certificate.
pub const KEY_SERVICE_SERVER_COMMON_NAME: &str = "constellation key service";
/// Prefix of a key-service client certificate's common name; the node name follows.
pub const KEY_SERVICE_CLIENT_COMMON_NAME_PREFIX: &str = "constellation join service ";

/// A certificate chain and PKCS#8 key in DER, ready for rustls: what the key service and its
/// clients present.
#[derive(Clone)]
pub struct ServiceCredentials {
    /// Leaf first, then the key-service CA.
    pub cert_chain_der: Vec<Vec<u8>>,
    pub key_pkcs8_der: SecretBytes,
}

impl fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCredentials")
            .field("certificates", &self.cert_chain_der.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClusterPki {
    /// The key-service CA certificate (DER): the only trust anchor of the key service and of
    /// its clients.
    pub fn key_service_ca_der(&self) -> &[u8] {
        &self.key_service_ca.cert_der
    }

    /// A fresh server certificate for the key service listening on `ip` (one year).
    pub fn key_service_server_cert(
        &self,
        ip: IpAddr,
        clock: &dyn Clock,
    ) -> Result<ServiceCredentials, PkiError> {
        self.key_service_leaf(
            KEY_SERVICE_SERVER_COMMON_NAME,
            ip,
            ExtendedKeyUsagePurpose::ServerAuth,
            clock,
        )
    }

    /// A fresh client certificate for the join service of control-plane node `node_name` at
    /// `ip` (one year): what lets it fetch data keys from any key service of this cluster.
    pub fn key_service_client_cert(
        &self,
        node_name: &str,
        ip: IpAddr,
        clock: &dyn Clock,
    ) -> Result<ServiceCredentials, PkiError> {
        self.key_service_leaf(
            &format!("{KEY_SERVICE_CLIENT_COMMON_NAME_PREFIX}{node_name}"),
            ip,
            ExtendedKeyUsagePurpose::ClientAuth,
            clock,
        )
    }

    fn key_service_leaf(
        &self,
        common_name: &str,
        ip: IpAddr,
        usage: ExtendedKeyUsagePurpose,
        clock: &dyn Clock,
    ) -> Result<ServiceCredentials, PkiError> {
        issue_leaf(
            &self.key_service_ca,
            "key-service certificate",
            common_name,
            vec![SanType::IpAddress(ip)],
            vec![usage],
            clock,
        )
    }
}

/// A fresh P-256 leaf signed by `ca` (one year, digital-signature key usage, the given names and
/// extended usages), with its chain (leaf, then `ca`).
pub(super) fn issue_leaf(
    ca: &CertificateAuthority,
    what: &'static str,
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    clock: &dyn Clock,
) -> Result<ServiceCredentials, PkiError> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_error(what, e))?;
    let mut params = base_params(common_name, None, clock, LEAF_VALIDITY);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    let cert = ca
        .sign(&params, &key)
        .map_err(|e| generate_error(what, e))?;
    Ok(ServiceCredentials {
        cert_chain_der: vec![cert.der().to_vec(), ca.cert_der.clone()],
        key_pkcs8_der: SecretBytes::new(key.serialize_der()),
    })
}
