//! The on-disk layout of the shared PKI: paths relative to kubeadm's certificates directory, the
//! files a control plane shares with the others, and reading and writing them.

use std::fs;
use std::path::Path;

use constellation_common::secret::SecretBytes;
use rcgen::{KeyPair, PublicKeyData};

use super::ca::CertificateAuthority;
use super::*;

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

/// One file of the shared PKI, named by its path relative to kubeadm's certificates directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFile {
    pub relative_path: &'static str,
    pub content: SecretBytes,
    pub is_private_key: bool,
}

/// The shared files and whether each is a private key, in [`ClusterPki::shared_files`] order.
pub(super) const SHARED_FILES: [(&str, bool); 10] = [
    (CA_CERT, false),
    (CA_KEY, true),
    (FRONT_PROXY_CA_CERT, false),
    (FRONT_PROXY_CA_KEY, true),
    (ETCD_CA_CERT, false),
    (ETCD_CA_KEY, true),
    (SERVICE_ACCOUNT_KEY, true),
    (SERVICE_ACCOUNT_PUB, false),
    (KEY_SERVICE_CA_CERT, false),
    (KEY_SERVICE_CA_KEY, true),
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

impl ClusterPki {
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
        let sa_key_path = dir.join(SERVICE_ACCOUNT_KEY);
        let sa_pub_path = dir.join(SERVICE_ACCOUNT_PUB);
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
            ca: CertificateAuthority::load(dir, CA_CERT, CA_KEY)?,
            front_proxy_ca: CertificateAuthority::load(
                dir,
                FRONT_PROXY_CA_CERT,
                FRONT_PROXY_CA_KEY,
            )?,
            etcd_ca: CertificateAuthority::load(dir, ETCD_CA_CERT, ETCD_CA_KEY)?,
            service_account_key,
            service_account_pub,
            key_service_ca: CertificateAuthority::load(
                dir,
                KEY_SERVICE_CA_CERT,
                KEY_SERVICE_CA_KEY,
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

pub(super) fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn pem_body(pem: &str, expected_label: &str) -> Result<Vec<u8>, String> {
    let (label, der) = der::pem::decode_vec(pem.as_bytes()).map_err(|e| e.to_string())?;
    if label != expected_label {
        return Err(format!(
            "PEM label is {label:?}, expected {expected_label:?}"
        ));
    }
    Ok(der)
}
