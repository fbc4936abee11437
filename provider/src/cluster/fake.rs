//! FAKE cluster backend, for tests only: it starts nothing and attests nothing. Compiled only
//! with the cargo feature `fake-backend`, which the acceptance tests enable for their own
//! binary `terraform-provider-constellation-fake`; the provider binary has no way to select it.
//!
//! Every Terraform command starts a new provider process, so the fake keeps each cluster
//! as a JSON record in a folder (`$CONSTELLATION_PROVIDER_FAKE_DIR`, default
//! `.constellation/fake-clusters` in the working directory). Tests simulate a dead or
//! non-attesting node by setting its `"healthy": false` in the record.

use std::path::{Path, PathBuf};

use constellation_attestation::measurements::sha256;
use constellation_attestation::snp::SnpSettings;
use constellation_attestation::{Measurements, Variant};
use constellation_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use super::model::*;
use constellation_common::metadata::Role;

pub const FAKE_DIR_ENV: &str = "CONSTELLATION_PROVIDER_FAKE_DIR";

#[derive(Debug, Clone)]
pub struct FakeClusterBackend {
    dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FakeNode {
    pub name: String,
    pub control_plane: bool,
    pub healthy: bool,
}

/// The record of one fake cluster (secrets included: this is test-only plumbing), except a
/// write-only master secret, which no record of the provider holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeRecord {
    pub name: String,
    pub image_reference: String,
    pub measurements: Measurements,
    pub variant: Variant,
    pub tcb: [Option<u8>; 4],
    /// Minimum ABI and allow-lists as configured.
    pub snp: SnpSettings,
    /// The SEV-SNP settings a real backend puts into the nodes' join configuration
    /// (`ClusterMetadata::snp_settings_json`); null for a variant without SEV-SNP.
    pub node_snp_settings: Option<SnpSettings>,
    pub cidrs: [String; 3],
    pub kubernetes_version: String,
    /// Null when the master secret is write-only.
    pub master_secret_hex: Option<String>,
    pub master_secret_wo_version: Option<u32>,
    /// Master secret salt and measurement salt.
    pub salts_hex: [String; 2],
    pub kmip: Option<[String; 5]>,
    pub cluster_id: String,
    pub init_secret_hex: String,
    pub nodes: Vec<FakeNode>,
    /// Bumped by every update, so tests can see the backend was called.
    pub generation: u64,
}

fn other(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Other(format!("fake backend: {e}"))
}

impl FakeClusterBackend {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The folder from `$CONSTELLATION_PROVIDER_FAKE_DIR` or the working-directory default.
    pub fn from_env() -> Self {
        let dir = std::env::var_os(FAKE_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".constellation/fake-clusters"));
        Self::new(dir)
    }

    pub fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn load(&self, name: &str) -> Result<Option<FakeRecord>, ClusterError> {
        match std::fs::read(self.record_path(name)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(other(e)),
        }
    }

    fn store(&self, r: &FakeRecord) -> Result<(), ClusterError> {
        std::fs::create_dir_all(&self.dir).map_err(other)?;
        let bytes = serde_json::to_vec_pretty(r).map_err(other)?;
        std::fs::write(self.record_path(&r.name), bytes).map_err(other)
    }

    fn nodes(
        name: &str,
        cp: u32,
        workers: u32,
        existing: &[FakeNode],
        generation: u64,
    ) -> Vec<FakeNode> {
        let mut out = Vec::new();
        for (control_plane, want) in [(true, cp), (false, workers)] {
            let mut kept: Vec<FakeNode> = existing
                .iter()
                .filter(|n| n.control_plane == control_plane && n.healthy)
                .take(want as usize)
                .cloned()
                .collect();
            let mut i = 0;
            while kept.len() < want as usize {
                let role = if control_plane { "cp" } else { "worker" };
                kept.push(FakeNode {
                    name: format!("{name}-{role}-g{generation}-{i}"),
                    control_plane,
                    healthy: true,
                });
                i += 1;
            }
            out.extend(kept);
        }
        out
    }

    fn record(
        spec: &ClusterSpec,
        cluster_id: String,
        init_secret_hex: String,
        nodes: Vec<FakeNode>,
        generation: u64,
    ) -> FakeRecord {
        let a = &spec.attestation;
        let n = &spec.network;
        let s = &spec.secrets;
        FakeRecord {
            name: spec.name.clone(),
            image_reference: spec.image.reference.clone(),
            measurements: spec.image.measurements.clone(),
            variant: a.variant,
            tcb: [
                a.bootloader_version,
                a.tee_version,
                a.snp_version,
                a.microcode_version,
            ],
            snp: a.snp.clone(),
            node_snp_settings: a.node_snp_settings(),
            cidrs: [
                n.pod_cidr.to_string(),
                n.service_cidr.to_string(),
                n.node_cidr.to_string(),
            ],
            kubernetes_version: spec.kubernetes_version.clone(),
            master_secret_hex: match &s.master_secret {
                MasterSecret::Stored(secret) => Some(hex::encode(secret.expose())),
                MasterSecret::WriteOnly { .. } => None,
            },
            master_secret_wo_version: match &s.master_secret {
                MasterSecret::Stored(_) => None,
                MasterSecret::WriteOnly { version, .. } => Some(*version),
            },
            salts_hex: [
                hex::encode(s.master_secret_salt.expose()),
                hex::encode(s.measurement_salt.expose()),
            ],
            kmip: match &spec.kms {
                KmsConfig::ClusterManaged => None,
                KmsConfig::Kmip(k) => Some([
                    k.endpoint.clone(),
                    k.server_ca_pem.clone(),
                    k.client_cert_pem.clone(),
                    String::from_utf8_lossy(k.client_key_pem.expose()).into_owned(),
                    k.kek_id.clone(),
                ]),
            },
            cluster_id,
            init_secret_hex,
            nodes,
            generation,
        }
    }

    fn state(&self, r: &FakeRecord) -> Result<ClusterState, ClusterError> {
        let secret = |h: &str| hex::decode(h).map(SecretBytes::new).map_err(other);
        let cidr = |c: &str| c.parse::<Cidr>().map_err(other);
        let cp = r.nodes.iter().filter(|n| n.control_plane).count() as u32;
        let workers = r.nodes.len() as u32 - cp;
        let spec = ClusterSpec {
            name: r.name.clone(),
            platform: Platform::Local,
            image: ImageRef {
                reference: r.image_reference.clone(),
                measurements: r.measurements.clone(),
            },
            control_plane_count: cp,
            worker_count: workers,
            attestation: AttestationSpec {
                variant: r.variant,
                bootloader_version: r.tcb[0],
                tee_version: r.tcb[1],
                snp_version: r.tcb[2],
                microcode_version: r.tcb[3],
                snp: r.snp.clone(),
            },
            network: NetworkConfig {
                pod_cidr: cidr(&r.cidrs[0])?,
                service_cidr: cidr(&r.cidrs[1])?,
                node_cidr: cidr(&r.cidrs[2])?,
            },
            kubernetes_version: r.kubernetes_version.clone(),
            secrets: ClusterSecrets {
                master_secret: match (&r.master_secret_hex, r.master_secret_wo_version) {
                    (Some(h), None) => MasterSecret::Stored(secret(h)?),
                    (None, Some(version)) => MasterSecret::WriteOnly {
                        version,
                        secret: None,
                    },
                    _ => {
                        return Err(other(
                            "record needs master_secret_hex or master_secret_wo_version",
                        ))
                    }
                },
                master_secret_salt: secret(&r.salts_hex[0])?,
                measurement_salt: secret(&r.salts_hex[1])?,
            },
            kms: match &r.kmip {
                None => KmsConfig::ClusterManaged,
                Some([endpoint, ca, cert, key, kek]) => KmsConfig::Kmip(KmipConfig {
                    endpoint: endpoint.clone(),
                    server_ca_pem: ca.clone(),
                    client_cert_pem: cert.clone(),
                    client_key_pem: SecretBytes::new(key.clone().into_bytes()),
                    kek_id: kek.clone(),
                }),
            },
        };
        let host = format!("https://127.0.0.1:{}", 6443 + r.generation);
        Ok(ClusterState {
            outputs: ClusterOutputs {
                cluster_id: r.cluster_id.clone(),
                owner_id: hex::encode(sha256(format!("owner-{}", r.cluster_id).as_bytes())),
                kubeconfig: SecretBytes::new(
                    format!(
                        "apiVersion: v1\nkind: Config\n# FAKE cluster {}, not a real cluster\nclusters:\n- cluster:\n    server: {host}\n  name: {}\n",
                        r.name, r.name
                    )
                    .into_bytes(),
                ),
                cluster_ca_certificate: "-----BEGIN CERTIFICATE-----\nFAKE\n-----END CERTIFICATE-----\n".into(),
                client_certificate: "-----BEGIN CERTIFICATE-----\nFAKE-CLIENT\n-----END CERTIFICATE-----\n".into(),
                client_key: SecretBytes::new(b"-----BEGIN PRIVATE KEY-----\nFAKE\n-----END PRIVATE KEY-----\n".to_vec()),
                host,
                init_secret: secret(&r.init_secret_hex)?,
            },
            platform_state: serde_json::to_string(&r.nodes).map_err(other)?,
            spec,
        })
    }

    fn name_of(state: &ClusterState) -> &str {
        &state.spec.name
    }
}

impl ClusterBackend for FakeClusterBackend {
    fn create<'a>(
        &'a self,
        spec: &'a ClusterSpec,
        _given: GivenSecrets,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async move {
            if self.load(&spec.name)?.is_some() {
                return Err(ClusterError::InvalidInput {
                    attribute: crate::diag::AttrPath::attr(&["name"]),
                    reason: format!("a cluster named {:?} already exists", spec.name),
                });
            }
            progress.step("fake: starting nodes");
            let nodes = Self::nodes(
                &spec.name,
                spec.control_plane_count,
                spec.worker_count,
                &[],
                0,
            );
            let cluster_id = hex::encode(constellation_common::kdf::cluster_id(
                spec.secrets.master_secret.for_init()?.expose(),
                spec.secrets.measurement_salt.expose(),
            ));
            let init_secret = hex::encode(sha256(spec.secrets.master_secret_salt.expose()));
            let r = Self::record(spec, cluster_id, init_secret, nodes, 0);
            self.store(&r)?;
            progress.step("fake: cluster initialized");
            self.state(&r)
        })
    }

    fn read<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> BoxFuture<'a, Result<ClusterReadResult, ClusterError>> {
        Box::pin(async move {
            let Some(r) = self.load(Self::name_of(state))? else {
                return Ok(ClusterReadResult::Gone);
            };
            let unhealthy = r
                .nodes
                .iter()
                .filter(|n| !n.healthy)
                .map(|n| UnhealthyNode {
                    name: n.name.clone(),
                    role: if n.control_plane {
                        Role::ControlPlane
                    } else {
                        Role::Worker
                    },
                    reason: "fake: marked unhealthy".into(),
                })
                .collect();
            let mut refreshed = self.state(&r)?;
            refreshed.spec = state.spec.clone();
            Ok(ClusterReadResult::Present {
                state: Box::new(refreshed),
                unhealthy,
            })
        })
    }

    fn update<'a>(
        &'a self,
        prior: &'a ClusterState,
        spec: &'a ClusterSpec,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async move {
            let r = self
                .load(Self::name_of(prior))?
                .ok_or_else(|| ClusterError::NotFound {
                    name: prior.spec.name.clone(),
                    reason: "no fake record".into(),
                })?;
            let generation = r.generation + 1;
            progress.step("fake: reconciling nodes");
            let nodes = Self::nodes(
                &spec.name,
                spec.control_plane_count,
                spec.worker_count,
                &r.nodes,
                generation,
            );
            let r = Self::record(spec, r.cluster_id, r.init_secret_hex, nodes, generation);
            self.store(&r)?;
            self.state(&r)
        })
    }

    fn delete<'a>(
        &'a self,
        state: &'a ClusterState,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            progress.step("fake: deleting nodes");
            match std::fs::remove_file(self.record_path(Self::name_of(state))) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(other(e)),
            }
        })
    }

    fn import(
        &self,
        id: &ImportId,
        _folders: &crate::provider_config::ProviderConfig,
    ) -> Result<ClusterState, ClusterError> {
        let r = self.load(&id.name)?.ok_or_else(|| ClusterError::NotFound {
            name: id.name.clone(),
            reason: format!("no record in {}", self.dir.display()),
        })?;
        self.state(&r)
    }
}

/// Reads a fake record (for tests that flip node health).
pub fn read_record(path: &Path) -> Result<FakeRecord, ClusterError> {
    let b = std::fs::read(path).map_err(other)?;
    serde_json::from_slice(&b).map_err(other)
}
