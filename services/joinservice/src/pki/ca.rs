//! The certificate authorities (cluster, front proxy, etcd, key service) and [`ClusterPki`], which
//! holds them with the service-account key pair.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
use der::{Decode, Encode};
use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::files::{pem_body, read_text};
use super::*;

/// Validity of the CAs kubeadm would create: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of leaf certificates (admin client, kubelet): one year.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before "now" so a node whose clock lags a little accepts them
/// (the Kubernetes CSR signer backdates the same way).
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate authority: certificate plus signing key.
pub(super) struct CertificateAuthority {
    pub(super) cert_pem: String,
    pub(super) cert_der: Vec<u8>,
    pub(super) key_pem: SecretBytes,
    pub(super) spki_sha256: [u8; 32],
    pub(super) issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("spki_sha256", &hex::encode(self.spki_sha256))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    pub(super) fn generate(common_name: &str, clock: &dyn Clock) -> Result<Self, PkiError> {
        let what = "CA";
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_error(what, e))?;
        let mut params = base_params(common_name, None, clock, CA_VALIDITY);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| generate_error(what, e))?;
        let cert_der = cert.der().to_vec();
        let spki_sha256 =
            spki_sha256(&cert_der).map_err(|reason| PkiError::Generate { what, reason })?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der,
            key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
            spki_sha256,
            issuer: Issuer::new(params, key),
        })
    }

    pub(super) fn load(dir: &Path, cert_file: &str, key_file: &str) -> Result<Self, PkiError> {
        let cert_path = dir.join(cert_file);
        let key_path = dir.join(key_file);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = SecretBytes::new(read_text(&key_path)?.into_bytes());
        let bad = |path: &Path, what, reason: String| PkiError::BadFile {
            path: path.to_path_buf(),
            what,
            reason,
        };
        let cert_der = pem_body(&cert_pem, "CERTIFICATE")
            .map_err(|r| bad(&cert_path, "PEM certificate", r))?;
        let key_text = std::str::from_utf8(key_pem.expose())
            .map_err(|e| bad(&key_path, "PEM private key", e.to_string()))?;
        let key = KeyPair::from_pem(key_text)
            .map_err(|e| bad(&key_path, "PEM private key", e.to_string()))?;
        let cert_spki = Certificate::from_der(&cert_der)
            .and_then(|c| c.tbs_certificate.subject_public_key_info.to_der())
            .map_err(|e| bad(&cert_path, "X.509 certificate", e.to_string()))?;
        if cert_spki != key.subject_public_key_info() {
            return Err(PkiError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| bad(&cert_path, "CA certificate", e.to_string()))?;
        Ok(Self {
            cert_pem,
            spki_sha256: Sha256::digest(&cert_spki).into(),
            cert_der,
            key_pem,
            issuer,
        })
    }

    pub(super) fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        params.signed_by(public_key, &self.issuer)
    }
}

/// The cluster's PKI. `Debug` never prints private keys.
pub struct ClusterPki {
    pub(super) cluster_name: String,
    pub(super) ca: CertificateAuthority,
    pub(super) front_proxy_ca: CertificateAuthority,
    pub(super) etcd_ca: CertificateAuthority,
    pub(super) service_account_key: SecretBytes,
    pub(super) service_account_pub: String,
    pub(super) key_service_ca: CertificateAuthority,
}

impl fmt::Debug for ClusterPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPki")
            .field("cluster_name", &self.cluster_name)
            .field("ca", &self.ca)
            .field("front_proxy_ca", &self.front_proxy_ca)
            .field("etcd_ca", &self.etcd_ca)
            .field("key_service_ca", &self.key_service_ca)
            .field("service_account_key", &"<redacted>")
            .finish()
    }
}

impl ClusterPki {
    /// Generates fresh CAs (valid ten years from `clock`'s now) and a service-account key pair.
    pub fn generate(cluster_name: &str, clock: &dyn Clock) -> Result<Self, PkiError> {
        let service_account =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_error("SA", e))?;
        Ok(Self {
            cluster_name: cluster_name.to_owned(),
            // kubeadm's common names for its CAs
            ca: CertificateAuthority::generate("kubernetes", clock)?,
            front_proxy_ca: CertificateAuthority::generate("front-proxy-ca", clock)?,
            etcd_ca: CertificateAuthority::generate("etcd-ca", clock)?,
            service_account_key: SecretBytes::new(service_account.serialize_pem().into_bytes()),
            service_account_pub: service_account.public_key_pem(),
            key_service_ca: CertificateAuthority::generate(KEY_SERVICE_CA_COMMON_NAME, clock)?,
        })
    }

    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// The cluster CA certificate (DER).
    pub fn ca_cert_der(&self) -> &[u8] {
        &self.ca.cert_der
    }

    /// kubeadm's `discovery-token-ca-cert-hash`: `sha256:<hex of SHA-256 of the CA's SPKI DER>`.
    pub fn ca_cert_hash(&self) -> String {
        format!("sha256:{}", hex::encode(self.ca.spki_sha256))
    }
}
/// SHA-256 of the SubjectPublicKeyInfo DER of a certificate.
pub(super) fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], String> {
    let spki = Certificate::from_der(cert_der)
        .and_then(|c| c.tbs_certificate.subject_public_key_info.to_der())
        .map_err(|e| e.to_string())?;
    Ok(Sha256::digest(&spki).into())
}

pub(super) fn base_params(
    common_name: &str,
    organization: Option<&str>,
    clock: &dyn Clock,
    validity: Duration,
) -> CertificateParams {
    let now = clock.now();
    let mut dn = DistinguishedName::new();
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = offset_time(now.checked_sub(CLOCK_SKEW_BACKDATE).unwrap_or(now));
    params.not_after = offset_time(now.checked_add(validity).unwrap_or(now));
    params.serial_number = Some(random_serial());
    params
}

pub(super) fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// 16 random bytes, positive and without a leading zero byte (DER-minimal).
pub(super) fn random_serial() -> SerialNumber {
    let mut serial = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&serial)
}

pub(super) fn generate_error(what: &'static str, e: rcgen::Error) -> PkiError {
    PkiError::Generate {
        what,
        reason: e.to_string(),
    }
}
