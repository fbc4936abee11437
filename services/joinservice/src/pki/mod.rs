//! The cluster PKI, laid out the way kubeadm expects it: the cluster CA (`ca.crt`/`ca.key`), the
//! front-proxy CA, the etcd CA and the service-account signing key pair; plus Constellation's own
//! key-service CA, which issues the mutual-TLS certificates of the key service and its only
//! clients (the control planes' join services). It is a CA of its own so that no Kubernetes
//! credential (a kubelet or admin certificate from the cluster CA) can ever fetch a key. All keys
//! are ECDSA P-256.
//!
//! The join service hands the kubelet of each admitted node a serving/client certificate, but only
//! after checking the node's PKCS#10 request against what the platform's metadata says about that
//! node (`CN=system:node:<name>`, `O=system:nodes`, SANs a subset of the node's addresses).
//!
//! One file per job: `ca` (the certificate authorities and [`ClusterPki`] itself), `keyservice_ca`
//! (the key service's certificates), `etcd_ca` (etcd members' and clients' certificates), `csr`
//! (checking and signing kubelet requests), `kubeconfig` (the admin's credentials and
//! kubeconfig), [`files`] (the on-disk layout shared between control planes).

use std::path::PathBuf;

mod ca;
mod csr;
mod etcd_ca;
pub mod files;
mod keyservice_ca;
mod kubeconfig;

pub use ca::{ClusterPki, CA_VALIDITY, CLOCK_SKEW_BACKDATE, LEAF_VALIDITY};
pub use csr::{
    CsrError, NodeIdentity, VerifiedKubeletCsr, NODES_ORGANIZATION, NODE_COMMON_NAME_PREFIX,
};
pub use etcd_ca::{
    EtcdCredentials, ETCD_CLIENT_COMMON_NAME_PREFIX, ETCD_MEMBER_COMMON_NAME_PREFIX,
};
pub use files::{write_pki_files, PkiFile};
pub use keyservice_ca::{
    ServiceCredentials, KEY_SERVICE_CA_COMMON_NAME, KEY_SERVICE_CLIENT_COMMON_NAME_PREFIX,
    KEY_SERVICE_SERVER_COMMON_NAME,
};
pub use kubeconfig::{ClientCredentials, ADMIN_COMMON_NAME, ADMIN_ORGANIZATION};

/// Why PKI material could not be created, stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what} failed: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {what}: {reason}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{key}: private key does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("rendering the kubeconfig failed: {0}")]
    Kubeconfig(#[from] serde_yaml::Error),
}

#[cfg(test)]
mod tests {
    use super::ca::random_serial;
    use super::csr::{oid, CSR_PEM_LABEL};
    use super::files::pem_body;
    use super::*;
    use constellation_attestation::FixedClock;
    use der::{Decode, Encode};
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        PublicKeyData, SanType,
    };
    use std::fs;
    use x509_cert::Certificate;

    #[test]
    fn debug_output_hides_every_private_key() {
        let pki = ClusterPki::generate("c", &FixedClock::at_unix(1_700_000_000)).unwrap();
        let printed = format!("{pki:?}");
        for file in pki.shared_files().iter().filter(|f| f.is_private_key) {
            let key = std::str::from_utf8(file.content.expose()).unwrap();
            let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(
                !printed.contains(&body[..40]),
                "{} leaked",
                file.relative_path
            );
        }
        assert!(!printed.contains("PRIVATE KEY"));
    }

    const NOW: u64 = 1_750_000_000;

    fn node() -> NodeIdentity {
        NodeIdentity {
            name: "worker-0".into(),
            role: constellation_common::metadata::Role::Worker,
            ips: vec!["10.0.0.7".parse().unwrap()],
            dns_names: vec!["worker-0".into()],
        }
    }

    fn kubelet_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "system:node:worker-0");
        params
            .distinguished_name
            .push(DnType::OrganizationName, NODES_ORGANIZATION);
        params.subject_alt_names = vec![
            SanType::DnsName("worker-0".try_into().unwrap()),
            SanType::IpAddress("10.0.0.7".parse().unwrap()),
        ];
        params
    }

    fn pem(der: &[u8]) -> String {
        der::pem::encode_string(CSR_PEM_LABEL, der::pem::LineEnding::LF, der).unwrap()
    }

    /// `csr_der` with its CertificationRequestInfo signed anew: `sign` over the info's bytes,
    /// the signature algorithm named `sig_alg`.
    fn resigned(
        csr_der: &[u8],
        sig_alg: der::oid::ObjectIdentifier,
        sign: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut req = x509_cert::request::CertReq::from_der(csr_der).unwrap();
        let info = req.info.to_der().unwrap();
        req.algorithm = x509_cert::spki::AlgorithmIdentifierOwned {
            oid: sig_alg,
            parameters: None,
        };
        req.signature = der::asn1::BitString::from_bytes(&sign(&info)).unwrap();
        req.to_der().unwrap()
    }

    fn issued_spki(pki: &ClusterPki, csr_pem: &str) -> Vec<u8> {
        let cert_pem = pki
            .issue_kubelet_cert(csr_pem.as_bytes(), &node(), &FixedClock::at_unix(NOW))
            .unwrap();
        let cert_der = pem_body(&cert_pem, "CERTIFICATE").unwrap();
        Certificate::from_der(&cert_der)
            .unwrap()
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap()
    }

    #[test]
    fn every_accepted_algorithm_gives_a_certificate_for_the_requests_own_key() {
        let pki = ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = kubelet_params().serialize_request(&key).unwrap();
            let der = csr.der().to_vec();
            assert_eq!(
                issued_spki(&pki, &pem(&der)),
                key.subject_public_key_info(),
                "{alg:?}"
            );
        }
        // The other hash of each curve, and the other RSA hashes (rcgen signs only with the
        // curve's own hash, so openssl makes these): the certificate still names the key's own
        // algorithm and curve.
        for (key_alg, digest) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "-sha256"),
            (&rcgen::PKCS_ECDSA_P256_SHA256, "-sha384"),
            (&rcgen::PKCS_RSA_SHA256, "-sha384"),
            (&rcgen::PKCS_RSA_SHA256, "-sha512"),
        ] {
            let key = KeyPair::generate_for(key_alg).unwrap();
            let der = openssl_csr(&key, digest);
            assert_eq!(
                issued_spki(&pki, &pem(&der)),
                key.subject_public_key_info(),
                "{key_alg:?} {digest}"
            );
        }
    }

    /// A kubelet CSR for `worker-0` made by `openssl req` with `digest`.
    fn openssl_csr(key: &KeyPair, digest: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key.pem");
        fs::write(&key_path, key.serialize_pem()).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["req", "-new", "-key"])
            .arg(&key_path)
            .args([
                digest,
                "-subj",
                "/O=system:nodes/CN=system:node:worker-0",
                "-addext",
                "subjectAltName=DNS:worker-0,IP:10.0.0.7",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl is required for this test (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn request_signed_by_another_key_is_refused() {
        let pki = ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap();
        let key = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let csr = kubelet_params().serialize_request(&key).unwrap();
        assert!(pki
            .check_kubelet_csr(pem(csr.der()).as_bytes(), &node())
            .is_ok());
        let forged = resigned(csr.der(), oid::ECDSA_WITH_SHA256, |info| {
            rcgen::SigningKey::sign(&other, info).unwrap()
        });
        assert_eq!(
            pki.check_kubelet_csr(pem(&forged).as_bytes(), &node())
                .unwrap_err(),
            CsrError::BadSignature
        );
        // A signature algorithm that does not fit the key (ECDSA key, Ed25519 named).
        let mislabelled = resigned(csr.der(), oid::ED25519, |info| {
            rcgen::SigningKey::sign(&key, info).unwrap()
        });
        assert_eq!(
            pki.check_kubelet_csr(pem(&mislabelled).as_bytes(), &node())
                .unwrap_err(),
            CsrError::BadSignature
        );
    }

    #[test]
    fn unsupported_algorithms_are_refused() {
        let pki = ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let csr = kubelet_params().serialize_request(&key).unwrap();
        assert_eq!(
            pki.check_kubelet_csr(pem(csr.der()).as_bytes(), &node())
                .unwrap_err(),
            CsrError::BadSignature
        );
        // SHA-1 RSA verifies but is not accepted.
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let sha1 = openssl_csr(&key, "-sha1");
        assert_eq!(
            pki.check_kubelet_csr(pem(&sha1).as_bytes(), &node())
                .unwrap_err(),
            CsrError::BadSignature
        );
    }

    #[test]
    fn extensions_and_san_kinds_outside_the_allowed_set_are_refused() {
        let pki = ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap();
        let key = KeyPair::generate().unwrap();
        let check = |params: CertificateParams| {
            let csr = params.serialize_request(&key).unwrap();
            pki.check_kubelet_csr(pem(csr.der()).as_bytes(), &node())
        };

        let mut allowed = kubelet_params();
        allowed.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        allowed.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        allowed.is_ca = IsCa::ExplicitNoCa;
        check(allowed).unwrap();

        let mut custom = kubelet_params();
        custom
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[1, 2, 3, 4],
                vec![5, 0],
            ));
        assert_eq!(check(custom).unwrap_err(), CsrError::UnsupportedExtension);

        let mut eku = kubelet_params();
        eku.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![1, 2, 3, 4])];
        assert_eq!(check(eku).unwrap_err(), CsrError::UnsupportedExtension);

        for (san, kind) in [
            (
                SanType::Rfc822Name("a@worker-0".try_into().unwrap()),
                "email",
            ),
            (SanType::URI("https://worker-0".try_into().unwrap()), "URI"),
        ] {
            let mut params = kubelet_params();
            params.subject_alt_names.push(san);
            let err = check(params).unwrap_err();
            assert_eq!(err, CsrError::SanKindNotAllowed { kind });
            assert!(err.is_identity_mismatch());
        }
    }

    #[test]
    fn serials_are_positive_and_minimal() {
        for _ in 0..64 {
            let s = random_serial();
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), 16);
            assert_eq!(bytes[0] & 0xc0, 0x40);
        }
    }
}
