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

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature;
use base64::Engine as _;
use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
use der::{Decode, Encode};
use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};
use x509_cert::ext::Extension;
use x509_cert::request::CertReqInfo;
use x509_cert::Certificate;

/// Validity of the CAs kubeadm would create: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of leaf certificates (admin client, kubelet): one year.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before "now" so a node whose clock lags a little accepts them
/// (the Kubernetes CSR signer backdates the same way).
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Common name of the cluster admin's client certificate.
pub const ADMIN_COMMON_NAME: &str = "kubernetes-admin";
/// Group (organization) that Kubernetes maps to cluster-admin.
pub const ADMIN_ORGANIZATION: &str = "system:masters";
/// Prefix of a kubelet's common name; the node name follows.
pub const NODE_COMMON_NAME_PREFIX: &str = "system:node:";
/// Group (organization) of every kubelet.
pub const NODES_ORGANIZATION: &str = "system:nodes";

/// Paths of the shared PKI files relative to kubeadm's certificates directory.
pub mod files {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const FRONT_PROXY_CA_CERT: &str = "front-proxy-ca.crt";
    pub const FRONT_PROXY_CA_KEY: &str = "front-proxy-ca.key";
    pub const ETCD_CA_CERT: &str = "etcd/ca.crt";
    pub const ETCD_CA_KEY: &str = "etcd/ca.key";
    pub const SERVICE_ACCOUNT_KEY: &str = "sa.key";
    pub const SERVICE_ACCOUNT_PUB: &str = "sa.pub";
    pub const KEY_SERVICE_CA_CERT: &str = "constellation/key-service-ca.crt";
    pub const KEY_SERVICE_CA_KEY: &str = "constellation/key-service-ca.key";
}

/// Common name of the key-service CA.
pub const KEY_SERVICE_CA_COMMON_NAME: &str = "constellation key service CA";
/// Common name of the key service's server certificate.
pub const KEY_SERVICE_SERVER_COMMON_NAME: &str = "constellation key service";
/// Prefix of a key-service client certificate's common name; the node name follows.
pub const KEY_SERVICE_CLIENT_COMMON_NAME_PREFIX: &str = "constellation join service ";

const OID_COMMON_NAME: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ORGANIZATION: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("2.5.4.10");
const CSR_PEM_LABEL: &str = "CERTIFICATE REQUEST";

/// What a node is in the cluster, as the platform's metadata says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    ControlPlane,
    Worker,
}

/// What the platform's metadata says about a node: the names its kubelet certificate may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub role: NodeRole,
    pub ips: Vec<IpAddr>,
    pub dns_names: Vec<String>,
}

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

/// A certificate and its private key (PKCS#8 PEM), e.g. the cluster admin's client credentials.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub cert_pem: String,
    pub key_pem: SecretBytes,
}

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

/// One file of the shared PKI, named by its path relative to kubeadm's certificates directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFile {
    pub relative_path: &'static str,
    pub content: SecretBytes,
    pub is_private_key: bool,
}

/// The shared files and whether each is a private key, in [`ClusterPki::shared_files`] order.
const SHARED_FILES: [(&str, bool); 10] = [
    (files::CA_CERT, false),
    (files::CA_KEY, true),
    (files::FRONT_PROXY_CA_CERT, false),
    (files::FRONT_PROXY_CA_KEY, true),
    (files::ETCD_CA_CERT, false),
    (files::ETCD_CA_KEY, true),
    (files::SERVICE_ACCOUNT_KEY, true),
    (files::SERVICE_ACCOUNT_PUB, false),
    (files::KEY_SERVICE_CA_CERT, false),
    (files::KEY_SERVICE_CA_KEY, true),
];

impl PkiFile {
    /// A shared file received by name (e.g. from a join ticket). `None` unless `name` is one of
    /// the shared files, so a received name can never point outside the certificates directory.
    pub fn known(name: &str, content: Vec<u8>) -> Option<Self> {
        SHARED_FILES.iter().find(|(known, _)| *known == name).map(
            |(relative_path, is_private_key)| Self {
                relative_path,
                content: SecretBytes::new(content),
                is_private_key: *is_private_key,
            },
        )
    }
}

/// A certificate authority: certificate plus signing key.
struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: SecretBytes,
    spki_sha256: [u8; 32],
    issuer: Issuer<'static, KeyPair>,
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
    fn generate(common_name: &str, clock: &dyn Clock) -> Result<Self, PkiError> {
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

    fn load(dir: &Path, cert_file: &str, key_file: &str) -> Result<Self, PkiError> {
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

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        params.signed_by(public_key, &self.issuer)
    }
}

/// The cluster's PKI. `Debug` never prints private keys.
pub struct ClusterPki {
    cluster_name: String,
    ca: CertificateAuthority,
    front_proxy_ca: CertificateAuthority,
    etcd_ca: CertificateAuthority,
    service_account_key: SecretBytes,
    service_account_pub: String,
    key_service_ca: CertificateAuthority,
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
        let what = "key-service certificate";
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| generate_error(what, e))?;
        let mut params = base_params(common_name, None, clock, LEAF_VALIDITY);
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = self
            .key_service_ca
            .sign(&params, &key)
            .map_err(|e| generate_error(what, e))?;
        Ok(ServiceCredentials {
            cert_chain_der: vec![cert.der().to_vec(), self.key_service_ca.cert_der.clone()],
            key_pkcs8_der: SecretBytes::new(key.serialize_der()),
        })
    }

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

    /// The files a control-plane node shares with the others (kubeadm's list for
    /// `--control-plane` joins): the three CAs with keys and the service-account key pair, plus the
    /// key-service CA (so a joined control plane can run a join service of its own).
    pub fn shared_files(&self) -> Vec<PkiFile> {
        let contents: [&[u8]; 10] = [
            self.ca.cert_pem.as_bytes(),
            self.ca.key_pem.expose(),
            self.front_proxy_ca.cert_pem.as_bytes(),
            self.front_proxy_ca.key_pem.expose(),
            self.etcd_ca.cert_pem.as_bytes(),
            self.etcd_ca.key_pem.expose(),
            self.service_account_key.expose(),
            self.service_account_pub.as_bytes(),
            self.key_service_ca.cert_pem.as_bytes(),
            self.key_service_ca.key_pem.expose(),
        ];
        SHARED_FILES
            .iter()
            .zip(contents)
            .map(|((relative_path, is_private_key), content)| PkiFile {
                relative_path,
                content: SecretBytes::new(content.to_vec()),
                is_private_key: *is_private_key,
            })
            .collect()
    }

    /// Writes [`shared_files`](Self::shared_files) under `dir` (kubeadm's layout): private keys
    /// with mode 0600, certificates 0644.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), PkiError> {
        write_pki_files(dir, &self.shared_files())
    }

    /// Loads PKI material written by [`write_to_dir`](Self::write_to_dir), checking that every
    /// key belongs to its certificate.
    pub fn load_from_dir(dir: &Path, cluster_name: &str) -> Result<Self, PkiError> {
        let sa_key_path = dir.join(files::SERVICE_ACCOUNT_KEY);
        let sa_pub_path = dir.join(files::SERVICE_ACCOUNT_PUB);
        let service_account_key = SecretBytes::new(read_text(&sa_key_path)?.into_bytes());
        let service_account_pub = read_text(&sa_pub_path)?;
        let sa_key_text =
            std::str::from_utf8(service_account_key.expose()).map_err(|e| PkiError::BadFile {
                path: sa_key_path.clone(),
                what: "PEM private key",
                reason: e.to_string(),
            })?;
        let sa = KeyPair::from_pem(sa_key_text).map_err(|e| PkiError::BadFile {
            path: sa_key_path.clone(),
            what: "PEM private key",
            reason: e.to_string(),
        })?;
        let sa_pub_der =
            pem_body(&service_account_pub, "PUBLIC KEY").map_err(|reason| PkiError::BadFile {
                path: sa_pub_path.clone(),
                what: "PEM public key",
                reason,
            })?;
        if sa_pub_der != sa.subject_public_key_info() {
            return Err(PkiError::KeyMismatch {
                cert: sa_pub_path,
                key: sa_key_path,
            });
        }
        Ok(Self {
            cluster_name: cluster_name.to_owned(),
            ca: CertificateAuthority::load(dir, files::CA_CERT, files::CA_KEY)?,
            front_proxy_ca: CertificateAuthority::load(
                dir,
                files::FRONT_PROXY_CA_CERT,
                files::FRONT_PROXY_CA_KEY,
            )?,
            etcd_ca: CertificateAuthority::load(dir, files::ETCD_CA_CERT, files::ETCD_CA_KEY)?,
            service_account_key,
            service_account_pub,
            key_service_ca: CertificateAuthority::load(
                dir,
                files::KEY_SERVICE_CA_CERT,
                files::KEY_SERVICE_CA_KEY,
            )?,
        })
    }
}

/// Writes PKI files under `dir`, creating subdirectories; private keys get mode 0600.
pub fn write_pki_files(dir: &Path, pki_files: &[PkiFile]) -> Result<(), PkiError> {
    for file in pki_files {
        let path = dir.join(file.relative_path);
        let io = |source| PkiError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        let mode = if file.is_private_key { 0o600 } else { 0o644 };
        // Atomic, through an exclusively created temporary: a planted file or symlink fails the
        // write instead of receiving a key, and readers never see a half-written certificate.
        constellation_common::secret_file::write_atomic(&path, file.content.expose(), mode)
            .map_err(|e| io(e.into()))?;
    }
    Ok(())
}

/// SHA-256 of the SubjectPublicKeyInfo DER of a certificate.
fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], String> {
    let spki = Certificate::from_der(cert_der)
        .and_then(|c| c.tbs_certificate.subject_public_key_info.to_der())
        .map_err(|e| e.to_string())?;
    Ok(Sha256::digest(&spki).into())
}

fn base_params(
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

fn offset_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// 16 random bytes, positive and without a leading zero byte (DER-minimal).
fn random_serial() -> SerialNumber {
    let mut serial = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&serial)
}

fn generate_error(what: &'static str, e: rcgen::Error) -> PkiError {
    PkiError::Generate {
        what,
        reason: e.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_body(pem: &str, expected_label: &str) -> Result<Vec<u8>, String> {
    let (label, der) = der::pem::decode_vec(pem.as_bytes()).map_err(|e| e.to_string())?;
    if label != expected_label {
        return Err(format!(
            "PEM label is {label:?}, expected {expected_label:?}"
        ));
    }
    Ok(der)
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

mod oid {
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

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_attestation::FixedClock;

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
            role: NodeRole::Worker,
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
