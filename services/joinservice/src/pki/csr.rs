//! Kubelet certificate requests: parsed once, self-signature verified, checked against the node's
//! identity from the platform's metadata, then signed by the cluster CA.

use constellation_common::metadata::Role;
use std::net::IpAddr;

use aws_lc_rs::signature;
use constellation_attestation::Clock;
use der::Decode;
use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose, PublicKeyData, SanType};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};
use x509_cert::ext::Extension;
use x509_cert::request::CertReqInfo;

use super::*;

use super::ca::base_params;
/// Prefix of a kubelet's common name; the node name follows.
pub const NODE_COMMON_NAME_PREFIX: &str = "system:node:";
/// Group (organization) of every kubelet.
pub const NODES_ORGANIZATION: &str = "system:nodes";

const OID_COMMON_NAME: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ORGANIZATION: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("2.5.4.10");
pub(super) const CSR_PEM_LABEL: &str = "CERTIFICATE REQUEST";

/// What the platform's metadata says about a node: the names its kubelet certificate may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// What the node is in the cluster, as the platform's metadata says.
    pub role: Role,
    pub ips: Vec<IpAddr>,
    pub dns_names: Vec<String>,
}

/// Why a kubelet certificate request was refused. Each variant names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not PEM-encoded {expected:?}: {reason}")]
    NotPem {
        expected: &'static str,
        reason: String,
    },
    #[error("CSR is malformed: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR requests an extension other than SAN, key usage, EKU or basic constraints")]
    UnsupportedExtension,
    #[error("CSR subject common name: expected exactly [{expected:?}], found {found:?}")]
    CommonName {
        expected: String,
        found: Vec<String>,
    },
    #[error("CSR subject organization: expected exactly [{expected:?}], found {found:?}")]
    Organization {
        expected: &'static str,
        found: Vec<String>,
    },
    #[error("CSR subject carries attribute {oid} = {value:?}; only CN and O are allowed")]
    UnexpectedSubjectAttribute { oid: String, value: String },
    #[error("CSR subject attribute {oid} is not a string")]
    UnreadableSubjectAttribute { oid: String },
    #[error("CSR SAN DNS name {found:?} is not one of the node's names {allowed:?}")]
    DnsNameNotAllowed { found: String, allowed: Vec<String> },
    #[error("CSR SAN IP {found} is not one of the node's addresses {allowed:?}")]
    IpNotAllowed { found: IpAddr, allowed: Vec<IpAddr> },
    #[error("CSR SAN of kind {kind} is not allowed for a kubelet")]
    SanKindNotAllowed { kind: &'static str },
    #[error("signing the kubelet certificate failed: {0}")]
    Signing(String),
}

impl CsrError {
    /// True when the request is well-formed but asks for names the node may not have: the
    /// caller is asking for someone else's identity, not sending garbage.
    pub fn is_identity_mismatch(&self) -> bool {
        matches!(
            self,
            Self::CommonName { .. }
                | Self::Organization { .. }
                | Self::UnexpectedSubjectAttribute { .. }
                | Self::DnsNameNotAllowed { .. }
                | Self::IpNotAllowed { .. }
                | Self::SanKindNotAllowed { .. }
        )
    }
}

/// A kubelet CSR that passed every check for one node; only [`ClusterPki::check_kubelet_csr`]
/// makes one.
#[derive(Debug, Clone)]
pub struct VerifiedKubeletCsr {
    node_name: String,
    subject_alt_names: Vec<SanType>,
    public_key: CsrPublicKey,
}

impl VerifiedKubeletCsr {
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

impl ClusterPki {
    /// Parses a PEM PKCS#10 request, verifies its self-signature and checks that it asks for
    /// exactly the kubelet identity of `expected` (CN `system:node:<name>`, O `system:nodes`, SAN
    /// DNS names and IPs a subset of the node's).
    pub fn check_kubelet_csr(
        &self,
        csr_pem: &[u8],
        expected: &NodeIdentity,
    ) -> Result<VerifiedKubeletCsr, CsrError> {
        let (label, der) = der::pem::decode_vec(csr_pem).map_err(|e| CsrError::NotPem {
            expected: CSR_PEM_LABEL,
            reason: e.to_string(),
        })?;
        if label != CSR_PEM_LABEL {
            return Err(CsrError::NotPem {
                expected: CSR_PEM_LABEL,
                reason: format!("label is {label:?}"),
            });
        }
        let csr = parse_and_verify_csr(&der)?;

        let mut common_names = Vec::with_capacity(1);
        let mut organizations = Vec::with_capacity(1);
        for atv in csr.info.subject.0.iter().flat_map(|rdn| rdn.0.iter()) {
            let value =
                attribute_str(&atv.value).ok_or_else(|| CsrError::UnreadableSubjectAttribute {
                    oid: atv.oid.to_string(),
                })?;
            if atv.oid == OID_COMMON_NAME {
                common_names.push(value);
            } else if atv.oid == OID_ORGANIZATION {
                organizations.push(value);
            } else {
                return Err(CsrError::UnexpectedSubjectAttribute {
                    oid: atv.oid.to_string(),
                    value: value.to_owned(),
                });
            }
        }
        let cn_matches = matches!(
            common_names.as_slice(),
            [cn] if cn.strip_prefix(NODE_COMMON_NAME_PREFIX) == Some(expected.name.as_str())
        );
        if !cn_matches {
            return Err(CsrError::CommonName {
                expected: format!("{NODE_COMMON_NAME_PREFIX}{}", expected.name),
                found: common_names.into_iter().map(str::to_owned).collect(),
            });
        }
        if organizations != [NODES_ORGANIZATION] {
            return Err(CsrError::Organization {
                expected: NODES_ORGANIZATION,
                found: organizations.into_iter().map(str::to_owned).collect(),
            });
        }

        let mut subject_alt_names = Vec::with_capacity(csr.subject_alt_names.len());
        for san in &csr.subject_alt_names {
            match san {
                GeneralName::DnsName(name) => {
                    let name = name.as_str();
                    if !expected
                        .dns_names
                        .iter()
                        .any(|allowed| allowed.eq_ignore_ascii_case(name))
                    {
                        return Err(CsrError::DnsNameNotAllowed {
                            found: name.to_owned(),
                            allowed: expected.dns_names.clone(),
                        });
                    }
                    let name = rcgen::string::Ia5String::try_from(name)
                        .map_err(|e| CsrError::Malformed(format!("SAN DNS name: {e}")))?;
                    subject_alt_names.push(SanType::DnsName(name));
                }
                GeneralName::IpAddress(octets) => {
                    let ip = ip_from_octets(octets.as_bytes()).ok_or_else(|| {
                        CsrError::Malformed(format!(
                            "SAN IP address of {} bytes",
                            octets.as_bytes().len()
                        ))
                    })?;
                    if !expected.ips.contains(&ip) {
                        return Err(CsrError::IpNotAllowed {
                            found: ip,
                            allowed: expected.ips.clone(),
                        });
                    }
                    subject_alt_names.push(SanType::IpAddress(ip));
                }
                GeneralName::Rfc822Name(_) => {
                    return Err(CsrError::SanKindNotAllowed { kind: "email" })
                }
                GeneralName::UniformResourceIdentifier(_) => {
                    return Err(CsrError::SanKindNotAllowed { kind: "URI" })
                }
                GeneralName::OtherName(_) => {
                    return Err(CsrError::SanKindNotAllowed { kind: "otherName" })
                }
                GeneralName::DirectoryName(_) => {
                    return Err(CsrError::SanKindNotAllowed {
                        kind: "directoryName",
                    })
                }
                GeneralName::EdiPartyName(_) => {
                    return Err(CsrError::SanKindNotAllowed {
                        kind: "ediPartyName",
                    })
                }
                GeneralName::RegisteredId(_) => {
                    return Err(CsrError::SanKindNotAllowed {
                        kind: "registeredID",
                    })
                }
            }
        }
        Ok(VerifiedKubeletCsr {
            node_name: expected.name.clone(),
            subject_alt_names,
            public_key: csr.public_key,
        })
    }

    /// Signs the kubelet certificate (serving and client auth, one year) for a checked request.
    /// The subject is rebuilt from the checked node name, never copied from the request.
    pub fn sign_kubelet_cert(
        &self,
        csr: &VerifiedKubeletCsr,
        clock: &dyn Clock,
    ) -> Result<String, CsrError> {
        let cn = format!("{NODE_COMMON_NAME_PREFIX}{}", csr.node_name);
        let mut params = base_params(&cn, Some(NODES_ORGANIZATION), clock, LEAF_VALIDITY);
        params.subject_alt_names = csr.subject_alt_names.clone();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = self
            .ca
            .sign(&params, &csr.public_key)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(cert.pem())
    }

    /// [`check_kubelet_csr`](Self::check_kubelet_csr), then
    /// [`sign_kubelet_cert`](Self::sign_kubelet_cert). Returns the certificate as PEM.
    pub fn issue_kubelet_cert(
        &self,
        csr_pem: &[u8],
        expected: &NodeIdentity,
        clock: &dyn Clock,
    ) -> Result<String, CsrError> {
        let csr = self.check_kubelet_csr(csr_pem, expected)?;
        self.sign_kubelet_cert(&csr, clock)
    }
}
fn attribute_str(value: &der::Any) -> Option<&str> {
    use der::{Tag, Tagged};
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(value.value()).ok()
        }
        _ => None,
    }
}

fn ip_from_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        Some(IpAddr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        Some(IpAddr::from(v6))
    } else {
        None
    }
}

/// The subject public key of a verified CSR, as the issued certificate will carry it.
#[derive(Debug, Clone)]
struct CsrPublicKey {
    /// The content of the SubjectPublicKeyInfo's BIT STRING.
    raw: Vec<u8>,
    /// Chosen by the key's type (and curve), so the certificate's SubjectPublicKeyInfo names
    /// the key's own algorithm; it does not sign anything.
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// A PKCS#10 request whose self-signature verified, parsed once.
struct ParsedCsr {
    info: CertReqInfo,
    /// Every name of every requested SAN extension, not yet checked against the node.
    subject_alt_names: Vec<GeneralName>,
    public_key: CsrPublicKey,
}

pub(super) mod oid {
    use der::oid::ObjectIdentifier as Oid;

    pub const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
    pub const SHA384_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
    pub const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
    pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const SECP256R1: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
    pub const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
    pub const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    pub const EXTENSION_REQUEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.14");
    pub const SUBJECT_ALT_NAME: Oid = Oid::new_unwrap("2.5.29.17");
    pub const KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.15");
    pub const EXTENDED_KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.37");
    pub const BASIC_CONSTRAINTS: Oid = Oid::new_unwrap("2.5.29.19");
    /// The extended key usages a CSR may request (they are not copied into the certificate):
    /// anyExtendedKeyUsage, serverAuth, clientAuth, codeSigning, emailProtection, timeStamping,
    /// OCSPSigning.
    pub const KNOWN_EKUS: [Oid; 7] = [
        Oid::new_unwrap("2.5.29.37.0"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.1"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.2"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.3"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.4"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.8"),
        Oid::new_unwrap("1.3.6.1.5.5.7.3.9"),
    ];
}

/// The verification algorithm for a CSR signed with `sig_alg` by the key `spki`, and the
/// algorithm whose SubjectPublicKeyInfo encoding fits that key. `None` if the combination is not
/// accepted: RSA PKCS#1 v1.5 with SHA-256/384/512 (2048-8192 bits), ECDSA on P-256 or P-384 with
/// SHA-256 or SHA-384, Ed25519.
fn csr_algorithms(
    sig_alg: &der::asn1::ObjectIdentifier,
    spki: &x509_cert::spki::SubjectPublicKeyInfoOwned,
) -> Option<(
    &'static dyn signature::VerificationAlgorithm,
    &'static rcgen::SignatureAlgorithm,
)> {
    let key_alg = &spki.algorithm;
    let curve = || {
        if key_alg.oid != oid::EC_PUBLIC_KEY {
            return None;
        }
        key_alg
            .parameters
            .as_ref()?
            .decode_as::<der::asn1::ObjectIdentifier>()
            .ok()
    };
    let is_rsa = key_alg.oid == oid::RSA_ENCRYPTION;
    let pick: (&'static dyn signature::VerificationAlgorithm, _) = match *sig_alg {
        oid::SHA256_WITH_RSA if is_rsa => (
            &signature::RSA_PKCS1_2048_8192_SHA256,
            &rcgen::PKCS_RSA_SHA256,
        ),
        oid::SHA384_WITH_RSA if is_rsa => (
            &signature::RSA_PKCS1_2048_8192_SHA384,
            &rcgen::PKCS_RSA_SHA256,
        ),
        oid::SHA512_WITH_RSA if is_rsa => (
            &signature::RSA_PKCS1_2048_8192_SHA512,
            &rcgen::PKCS_RSA_SHA256,
        ),
        oid::ECDSA_WITH_SHA256 => match curve()? {
            oid::SECP256R1 => (
                &signature::ECDSA_P256_SHA256_ASN1,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            oid::SECP384R1 => (
                &signature::ECDSA_P384_SHA256_ASN1,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            _ => return None,
        },
        oid::ECDSA_WITH_SHA384 => match curve()? {
            oid::SECP256R1 => (
                &signature::ECDSA_P256_SHA384_ASN1,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            oid::SECP384R1 => (
                &signature::ECDSA_P384_SHA384_ASN1,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            _ => return None,
        },
        oid::ED25519 if key_alg.oid == oid::ED25519 => (&signature::ED25519, &rcgen::PKCS_ED25519),
        _ => return None,
    };
    Some(pick)
}

/// Parses a DER PKCS#10 request once, verifies its self-signature over the exact bytes of its
/// CertificationRequestInfo, and checks that it requests no extension other than SAN, key
/// usage, extended key usage (known purposes only) and basic constraints.
fn parse_and_verify_csr(der: &[u8]) -> Result<ParsedCsr, CsrError> {
    use der::Reader as _;
    let malformed = |e: der::Error| CsrError::Malformed(e.to_string());

    let mut reader = der::SliceReader::new(der).map_err(malformed)?;
    let (info_der, sig_alg, sig) = reader
        .sequence(|r| {
            let info_der = r.tlv_bytes()?;
            let sig_alg: x509_cert::spki::AlgorithmIdentifierRef<'_> = r.decode()?;
            let sig: der::asn1::BitStringRef<'_> = r.decode()?;
            Ok((info_der, sig_alg, sig))
        })
        .and_then(|parts| reader.finish(parts))
        .map_err(malformed)?;
    let info = CertReqInfo::from_der(info_der).map_err(malformed)?;

    let (verification, key_alg) =
        csr_algorithms(&sig_alg.oid, &info.public_key).ok_or(CsrError::BadSignature)?;
    let key_bits = info
        .public_key
        .subject_public_key
        .as_bytes()
        .ok_or(CsrError::BadSignature)?;
    let sig = sig.as_bytes().ok_or(CsrError::BadSignature)?;
    signature::UnparsedPublicKey::new(verification, key_bits)
        .verify(info_der, sig)
        .map_err(|_| CsrError::BadSignature)?;
    let public_key = CsrPublicKey {
        raw: key_bits.to_vec(),
        alg: key_alg,
    };

    let mut subject_alt_names = Vec::new();
    for attr in info.attributes.iter() {
        // Other attributes (e.g. a challenge password) request nothing of the certificate.
        if attr.oid != oid::EXTENSION_REQUEST {
            continue;
        }
        for value in attr.values.iter() {
            let extensions: Vec<Extension> = value.decode_as().map_err(malformed)?;
            for ext in &extensions {
                let content = ext.extn_value.as_bytes();
                match ext.extn_id {
                    oid::SUBJECT_ALT_NAME => {
                        let names = SubjectAltName::from_der(content).map_err(malformed)?;
                        subject_alt_names.extend(names.0);
                    }
                    oid::KEY_USAGE => {
                        KeyUsage::from_der(content).map_err(malformed)?;
                    }
                    oid::EXTENDED_KEY_USAGE => {
                        let ekus = ExtendedKeyUsage::from_der(content).map_err(malformed)?;
                        if !ekus.0.iter().all(|eku| oid::KNOWN_EKUS.contains(eku)) {
                            return Err(CsrError::UnsupportedExtension);
                        }
                    }
                    oid::BASIC_CONSTRAINTS => {
                        BasicConstraints::from_der(content).map_err(malformed)?;
                    }
                    _ => return Err(CsrError::UnsupportedExtension),
                }
            }
        }
    }
    Ok(ParsedCsr {
        info,
        subject_alt_names,
        public_key,
    })
}
