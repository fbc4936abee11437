//! The local platform's cluster journal: `journal.json` in the cluster folder (mode 0600).
//!
//! A provider killed during `terraform apply` leaves running nodes but no Terraform state. The
//! journal is what lets the next apply resume instead of starting over:
//! 1. before any node boots: the cluster name, the three cluster secrets, the init secret and
//!    the spec;
//! 2. right after Init returns: Init's outputs (cluster ID, owner ID, admin credentials);
//! 3. after every successful create and update: the spec as applied (`terraform import`
//!    rebuilds the state from it);
//! 4. during a rolling image upgrade, every step ([`UpgradeRecord`]): which old node is being
//!    replaced by which new one and how far that got, so the next apply finishes it.
//!
//! It holds the same secrets as the Terraform state, in plain text; protect the cluster folder
//! as you protect the state. The file is written atomically (temporary file, fsync, rename).

use std::path::{Path, PathBuf};

use constellation_attestation::snp::SnpSettings;
use constellation_attestation::{Measurements, Variant};
use constellation_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use super::model::*;
use super::upgrade::UpgradeRecord;

pub const JOURNAL_FILE: &str = "journal.json";
const JOURNAL_VERSION: u32 = 1;

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Deliberately without the parser's message: it could quote secret bytes.
    #[error("{path}: the cluster journal is malformed (line {line}, column {column})")]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("{path}: journal version {found} is not supported (expected {JOURNAL_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: field {field} is invalid")]
    Field { path: PathBuf, field: &'static str },
}

impl From<JournalError> for ClusterError {
    fn from(e: JournalError) -> Self {
        ClusterError::PlatformState(e.to_string())
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct KmipJson {
    endpoint: String,
    server_ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    kek_id: String,
}

/// The spec as applied, secrets aside (they are top-level fields of the journal).
#[derive(Clone, Serialize, Deserialize)]
struct SpecJson {
    /// Absent in journals of providers that knew only the local platform.
    #[serde(default = "local_platform")]
    platform: String,
    image_reference: String,
    measurements: Measurements,
    control_plane_count: u32,
    worker_count: u32,
    variant: String,
    bootloader_version: Option<u8>,
    tee_version: Option<u8>,
    snp_version: Option<u8>,
    microcode_version: Option<u8>,
    /// SEV-SNP minimum ABI and allow-lists (absent in journals of older providers).
    #[serde(default)]
    snp: SnpSettings,
    pod_cidr: String,
    service_cidr: String,
    node_cidr: String,
    kubernetes_version: String,
    kmip: Option<KmipJson>,
}

fn local_platform() -> String {
    Platform::Local.as_str().to_owned()
}

#[derive(Clone, Serialize, Deserialize)]
struct OutputsJson {
    cluster_id: String,
    owner_id: String,
    kubeconfig: String,
    cluster_ca_certificate: String,
    client_certificate: String,
    client_key: String,
    host: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct JournalJson {
    version: u32,
    cluster_name: String,
    /// Absent when the master secret is write-only: then only its version is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    master_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    master_secret_wo_version: Option<u32>,
    master_secret_salt: String,
    measurement_salt: String,
    init_secret: String,
    spec: SpecJson,
    outputs: Option<OutputsJson>,
    /// A rolling image upgrade that started and has not finished (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upgrade: Option<UpgradeRecord>,
}

/// The decoded journal. Debug prints no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Journal {
    /// The spec as last written (with the journal's secrets).
    pub spec: ClusterSpec,
    pub init_secret: SecretBytes,
    /// Init's outputs, once Init returned.
    pub outputs: Option<ClusterOutputs>,
    /// The rolling image upgrade in progress, step by step.
    pub upgrade: Option<UpgradeRecord>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("cluster", &self.spec.name)
            .field("initialized", &self.outputs.is_some())
            .finish_non_exhaustive()
    }
}

fn lossy(s: &SecretBytes) -> String {
    String::from_utf8_lossy(s.expose()).into_owned()
}

impl Journal {
    pub fn new(spec: ClusterSpec, init_secret: SecretBytes) -> Self {
        Self {
            spec,
            init_secret,
            outputs: None,
            upgrade: None,
        }
    }

    pub fn path(root: &Path) -> PathBuf {
        root.join(JOURNAL_FILE)
    }

    /// Reads the journal of the cluster folder `root`; `None` when there is none.
    pub fn load(root: &Path) -> Result<Option<Self>, JournalError> {
        let path = Self::path(root);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        let j: JournalJson =
            serde_json::from_slice(&bytes).map_err(|e| JournalError::Malformed {
                path: path.clone(),
                line: e.line(),
                column: e.column(),
            })?;
        if j.version != JOURNAL_VERSION {
            return Err(JournalError::Version {
                path,
                found: j.version,
            });
        }
        Self::decode(j, &path).map(Some)
    }

    fn decode(j: JournalJson, path: &Path) -> Result<Self, JournalError> {
        let field = |field: &'static str| JournalError::Field {
            path: path.to_owned(),
            field,
        };
        let secret = |hex_value: &str, name: &'static str| {
            hex::decode(hex_value)
                .ok()
                .filter(|b| b.len() == SECRET_LEN)
                .map(SecretBytes::new)
                .ok_or_else(|| field(name))
        };
        let cidr = |s: &str, name: &'static str| s.parse::<Cidr>().map_err(|_| field(name));
        let s = j.spec;
        let spec = ClusterSpec {
            name: j.cluster_name,
            platform: s.platform.parse().map_err(|_| field("platform"))?,
            image: ImageRef {
                reference: s.image_reference,
                measurements: s.measurements,
            },
            control_plane_count: s.control_plane_count,
            worker_count: s.worker_count,
            attestation: AttestationSpec {
                variant: s.variant.parse::<Variant>().map_err(|_| field("variant"))?,
                bootloader_version: s.bootloader_version,
                tee_version: s.tee_version,
                snp_version: s.snp_version,
                microcode_version: s.microcode_version,
                snp: s.snp,
            },
            network: NetworkConfig {
                pod_cidr: cidr(&s.pod_cidr, "pod_cidr")?,
                service_cidr: cidr(&s.service_cidr, "service_cidr")?,
                node_cidr: cidr(&s.node_cidr, "node_cidr")?,
            },
            kubernetes_version: s.kubernetes_version,
            secrets: ClusterSecrets {
                master_secret: match (&j.master_secret, j.master_secret_wo_version) {
                    (Some(h), None) => MasterSecret::Stored(secret(h, "master_secret")?),
                    (None, Some(version)) => MasterSecret::WriteOnly {
                        version,
                        secret: None,
                    },
                    _ => return Err(field("master_secret")),
                },
                master_secret_salt: secret(&j.master_secret_salt, "master_secret_salt")?,
                measurement_salt: secret(&j.measurement_salt, "measurement_salt")?,
            },
            kms: match s.kmip {
                None => KmsConfig::ClusterManaged,
                Some(k) => KmsConfig::Kmip(KmipConfig {
                    endpoint: k.endpoint,
                    server_ca_pem: k.server_ca_pem,
                    client_cert_pem: k.client_cert_pem,
                    client_key_pem: SecretBytes::new(k.client_key_pem.into_bytes()),
                    kek_id: k.kek_id,
                }),
            },
        };
        let init_secret = hex::decode(&j.init_secret)
            .ok()
            .filter(|b| !b.is_empty())
            .map(SecretBytes::new)
            .ok_or_else(|| field("init_secret"))?;
        let outputs = j.outputs.map(|o| ClusterOutputs {
            cluster_id: o.cluster_id,
            owner_id: o.owner_id,
            kubeconfig: SecretBytes::new(o.kubeconfig.into_bytes()),
            cluster_ca_certificate: o.cluster_ca_certificate,
            client_certificate: o.client_certificate,
            client_key: SecretBytes::new(o.client_key.into_bytes()),
            host: o.host,
            init_secret: init_secret.clone(),
        });
        Ok(Self {
            spec,
            init_secret,
            outputs,
            upgrade: j.upgrade,
        })
    }

    fn encode(&self) -> JournalJson {
        let s = &self.spec;
        let a = &s.attestation;
        JournalJson {
            version: JOURNAL_VERSION,
            cluster_name: s.name.clone(),
            master_secret: match &s.secrets.master_secret {
                MasterSecret::Stored(m) => Some(hex::encode(m.expose())),
                MasterSecret::WriteOnly { .. } => None,
            },
            master_secret_wo_version: match &s.secrets.master_secret {
                MasterSecret::Stored(_) => None,
                MasterSecret::WriteOnly { version, .. } => Some(*version),
            },
            master_secret_salt: hex::encode(s.secrets.master_secret_salt.expose()),
            measurement_salt: hex::encode(s.secrets.measurement_salt.expose()),
            init_secret: hex::encode(self.init_secret.expose()),
            spec: SpecJson {
                platform: s.platform.as_str().to_owned(),
                image_reference: s.image.reference.clone(),
                measurements: s.image.measurements.clone(),
                control_plane_count: s.control_plane_count,
                worker_count: s.worker_count,
                variant: a.variant.as_str().to_owned(),
                bootloader_version: a.bootloader_version,
                tee_version: a.tee_version,
                snp_version: a.snp_version,
                microcode_version: a.microcode_version,
                snp: a.snp.clone(),
                pod_cidr: s.network.pod_cidr.to_string(),
                service_cidr: s.network.service_cidr.to_string(),
                node_cidr: s.network.node_cidr.to_string(),
                kubernetes_version: s.kubernetes_version.clone(),
                kmip: match &s.kms {
                    KmsConfig::ClusterManaged => None,
                    KmsConfig::Kmip(k) => Some(KmipJson {
                        endpoint: k.endpoint.clone(),
                        server_ca_pem: k.server_ca_pem.clone(),
                        client_cert_pem: k.client_cert_pem.clone(),
                        client_key_pem: lossy(&k.client_key_pem),
                        kek_id: k.kek_id.clone(),
                    }),
                },
            },
            outputs: self.outputs.as_ref().map(|o| OutputsJson {
                cluster_id: o.cluster_id.clone(),
                owner_id: o.owner_id.clone(),
                kubeconfig: lossy(&o.kubeconfig),
                cluster_ca_certificate: o.cluster_ca_certificate.clone(),
                client_certificate: o.client_certificate.clone(),
                client_key: lossy(&o.client_key),
                host: o.host.clone(),
            }),
            upgrade: self.upgrade.clone(),
        }
    }

    /// Writes the journal into `root` (which must exist): mode 0600, atomically, synced.
    pub fn store(&self, root: &Path) -> Result<(), JournalError> {
        let path = Self::path(root);
        let bytes = serde_json::to_vec_pretty(&self.encode()).map_err(|_| JournalError::Field {
            path: path.clone(),
            field: "measurements",
        })?;
        // Random, exclusively created temporary: a planted one fails the write, not leaks it.
        constellation_common::secret_file::write_private_atomic(&path, &bytes).map_err(|e| {
            JournalError::Io {
                path: path.clone(),
                source: e.into(),
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use constellation_attestation::Measurement;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn spec() -> ClusterSpec {
        ClusterSpec {
            name: "demo".into(),
            platform: Platform::Local,
            image: ImageRef {
                reference: "/img".into(),
                measurements: Measurements([(4, Measurement::enforce([7; 32]))].into()),
            },
            control_plane_count: 1,
            worker_count: 2,
            attestation: AttestationSpec {
                variant: Variant::QemuVtpm,
                bootloader_version: None,
                tee_version: Some(3),
                snp_version: None,
                microcode_version: None,
                snp: SnpSettings::default(),
            },
            network: NetworkConfig {
                pod_cidr: "10.244.0.0/16".parse().unwrap(),
                service_cidr: "10.96.0.0/12".parse().unwrap(),
                node_cidr: "192.168.178.0/24".parse().unwrap(),
            },
            kubernetes_version: "v1.31.1".into(),
            secrets: ClusterSecrets {
                master_secret: MasterSecret::Stored(SecretBytes::new(vec![1; 32])),
                master_secret_salt: SecretBytes::new(vec![2; 32]),
                measurement_salt: SecretBytes::new(vec![3; 32]),
            },
            kms: KmsConfig::ClusterManaged,
        }
    }

    #[test]
    fn round_trips_with_mode_0600_and_no_secret_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
        let mut j = Journal::new(spec(), SecretBytes::new(vec![9; 32]));
        j.store(dir.path()).unwrap();
        let mode = std::fs::metadata(Journal::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Journal::load(dir.path()).unwrap().unwrap(), j);
        j.outputs = Some(ClusterOutputs {
            cluster_id: "ab".into(),
            owner_id: "cd".into(),
            kubeconfig: SecretBytes::new(b"kubeconfig".to_vec()),
            cluster_ca_certificate: "ca".into(),
            client_certificate: "cert".into(),
            client_key: SecretBytes::new(b"key".to_vec()),
            host: "127.0.0.1:6443".into(),
            init_secret: SecretBytes::new(vec![9; 32]),
        });
        j.store(dir.path()).unwrap();
        let back = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, j);
        // The platform is recorded (a qemu cluster's journal must not read back as local).
        let mut qemu = j.clone();
        qemu.spec.platform = Platform::Qemu;
        qemu.store(dir.path()).unwrap();
        assert_eq!(
            Journal::load(dir.path()).unwrap().unwrap().spec.platform,
            Platform::Qemu
        );
        // A journal of an older provider has no platform: it was local.
        let path = Journal::path(dir.path());
        let mut old: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        old["spec"].as_object_mut().unwrap().remove("platform");
        std::fs::write(&path, old.to_string()).unwrap();
        assert_eq!(
            Journal::load(dir.path()).unwrap().unwrap().spec.platform,
            Platform::Local
        );
        let debug = format!("{back:?}");
        assert!(!debug.contains(&hex::encode([1u8; 32])), "{debug}");
        assert!(!debug.contains("key"), "{debug}");
    }

    #[test]
    fn a_damaged_journal_is_an_error_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            Journal::path(dir.path()),
            format!("{{\"master_secret\": \"{}", "ab".repeat(32)),
        )
        .unwrap();
        let e = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        assert!(!e.contains(&"ab".repeat(32)), "{e}");
        let mut json = Journal::new(spec(), SecretBytes::new(vec![9; 32])).encode();
        json.master_secret = Some("zz".into());
        std::fs::write(
            Journal::path(dir.path()),
            serde_json::to_vec(&json).unwrap(),
        )
        .unwrap();
        let e = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("master_secret"), "{e}");
    }
}
