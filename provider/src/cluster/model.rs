//! The typed contract between the `constellation_cluster` resource and a platform backend.
//!
//! The resource turns Terraform values into a [`ClusterSpec`] (all inputs validated, secrets
//! generated when absent) and calls a [`ClusterBackend`]. The backend owns everything
//! platform-specific; what it needs to find its nodes again goes into
//! [`ClusterState::platform_state`], which the provider keeps in Terraform's private state.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::str::FromStr;

use constellation_attestation::snp::{SnpSettings, Tcb};
use constellation_attestation::{Measurements, Variant};
use constellation_common::metadata::Role;
use constellation_common::secret::SecretBytes;

use crate::diag::{AttrPath, Diagnostic};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Length of the master secret, master secret salt and measurement salt.
pub const SECRET_LEN: usize = 32;

/// The platforms a cluster can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Nodes are processes with their own swtpm.
    Local,
    /// Nodes are QEMU VMs booting the node image.
    Qemu,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Local => "local",
            Platform::Qemu => "qemu",
        }
    }

    /// The attestation variant this platform's nodes produce evidence for.
    pub fn attestation_variant(self) -> constellation_attestation::Variant {
        match self {
            Platform::Local => constellation_platform::local::NODE_VARIANT,
            Platform::Qemu => constellation_platform::qemu::NODE_VARIANT,
        }
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::image::check_platform(s)
    }
}

/// An IP network in CIDR form with no host bits set, e.g. `10.244.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not in CIDR form <address>/<prefix length>, e.g. 10.244.0.0/16")]
    Form(String),
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    Address(String),
    #[error("prefix length {found} is out of range 0..={max}")]
    Prefix { found: String, max: u8 },
    #[error("{given} has host bits set; the network is {network}")]
    HostBits { given: String, network: String },
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Form(s.to_owned()))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max && !prefix.starts_with('+'))
            .ok_or_else(|| CidrError::Prefix {
                found: prefix.to_owned(),
                max,
            })?;
        let network = Cidr {
            addr: mask(addr, prefix),
            prefix,
        };
        if network.addr != addr {
            return Err(CidrError::HostBits {
                given: s.to_owned(),
                network: network.to_string(),
            });
        }
        Ok(network)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let p = self.prefix.min(other.prefix);
        mask(self.addr, p) == mask(other.addr, p)
    }
}

/// The image the nodes boot: its reference and the measurements they must attest to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub reference: String,
    pub measurements: Measurements,
}

/// Attestation policy: variant plus, for SEV-SNP variants, the TCB minima (SVNs, 0..=255) and
/// the other SNP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationSpec {
    pub variant: Variant,
    pub bootloader_version: Option<u8>,
    pub tee_version: Option<u8>,
    pub snp_version: Option<u8>,
    pub microcode_version: Option<u8>,
    /// Minimum ABI and the launch-measurement / ID-key-digest allow-lists (validated: they
    /// make an `SnpPolicy`); its `minimum_tcb` stays unset, the four fields above carry it.
    pub snp: SnpSettings,
}

impl AttestationSpec {
    /// The SEV-SNP settings the nodes enforce (their join configuration), TCB minima included
    /// (a component left null is 0, "no minimum"); `None` for a variant without SEV-SNP.
    pub fn node_snp_settings(&self) -> Option<SnpSettings> {
        if !self.variant.facts().sev_snp {
            return None;
        }
        let tcb = [
            self.bootloader_version,
            self.tee_version,
            self.snp_version,
            self.microcode_version,
        ];
        let minimum_tcb = tcb.iter().any(Option::is_some).then(|| Tcb {
            bootloader: tcb[0].unwrap_or(0),
            tee: tcb[1].unwrap_or(0),
            snp: tcb[2].unwrap_or(0),
            microcode: tcb[3].unwrap_or(0),
        });
        Some(SnpSettings {
            minimum_tcb,
            ..self.snp.clone()
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    pub pod_cidr: Cidr,
    pub service_cidr: Cidr,
    pub node_cidr: Cidr,
}

/// Where the master secret lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsConfig {
    /// The cluster's key service holds it.
    ClusterManaged,
    /// Wrapped by a key-encryption key in an external KMS reached over KMIP.
    Kmip(KmipConfig),
}

#[derive(Clone, PartialEq, Eq)]
pub struct KmipConfig {
    /// `host:port`.
    pub endpoint: String,
    pub server_ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: SecretBytes,
    pub kek_id: String,
}

impl fmt::Debug for KmipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipConfig")
            .field("endpoint", &self.endpoint)
            .field("kek_id", &self.kek_id)
            .field("client_key_pem", &self.client_key_pem)
            .finish_non_exhaustive()
    }
}

/// How the configuration gives the master secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterSecret {
    /// `master_secret` (set or generated): kept in Terraform state and the cluster journal.
    Stored(SecretBytes),
    /// `master_secret_wo`: in no plan, state, journal or log. `secret` is present only during
    /// the apply that creates the cluster (from the configuration); afterwards only the nodes'
    /// key service (or the KMS) holds it. `version` is `master_secret_wo_version`.
    WriteOnly {
        version: u32,
        secret: Option<SecretBytes>,
    },
}

impl MasterSecret {
    /// The bytes, when this process holds them.
    pub fn bytes(&self) -> Option<&SecretBytes> {
        match self {
            MasterSecret::Stored(s) => Some(s),
            MasterSecret::WriteOnly { secret, .. } => secret.as_ref(),
        }
    }

    /// The bytes Init needs; a write-only secret is absent outside the creating apply.
    pub fn for_init(&self) -> Result<&SecretBytes, ClusterError> {
        self.bytes().ok_or_else(|| ClusterError::InvalidInput {
            attribute: AttrPath::attr(&["master_secret_wo"]),
            reason: "the cluster's master secret is write-only and master_secret_wo is null; \
                     set it to the value the cluster was created with"
                .into(),
        })
    }

    /// The master secret of a resumed create, given the one the journal recorded: a stored
    /// secret must equal the recorded one (the nodes may hold it already); a write-only one is
    /// never recorded, so its version must match and its bytes come from this configuration.
    /// `None` when they disagree.
    pub fn resume_with(&self, recorded: &MasterSecret) -> Option<MasterSecret> {
        match (self, recorded) {
            (MasterSecret::Stored(a), MasterSecret::Stored(b)) => (a == b).then(|| self.clone()),
            (
                MasterSecret::WriteOnly { version: a, .. },
                MasterSecret::WriteOnly { version: b, .. },
            ) => (a == b && self.bytes().is_some()).then(|| self.clone()),
            _ => None,
        }
    }
}

/// The three cluster secrets, each [`SECRET_LEN`] bytes (Debug prints lengths only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSecrets {
    pub master_secret: MasterSecret,
    pub master_secret_salt: SecretBytes,
    pub measurement_salt: SecretBytes,
}

/// Which of [`ClusterSpec::secrets`] the configuration set; the others were generated for
/// this apply, so a backend resuming an interrupted create may replace them with the ones it
/// recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GivenSecrets {
    pub master_secret: bool,
    pub master_secret_salt: bool,
    pub measurement_salt: bool,
}

impl GivenSecrets {
    /// All three set by the configuration (nothing may be replaced).
    pub const ALL: GivenSecrets = GivenSecrets {
        master_secret: true,
        master_secret_salt: true,
        measurement_salt: true,
    };
}

/// Everything the user asks for (Terraform inputs, validated; secrets always present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    pub platform: Platform,
    pub image: ImageRef,
    pub control_plane_count: u32,
    pub worker_count: u32,
    pub attestation: AttestationSpec,
    pub network: NetworkConfig,
    pub kubernetes_version: String,
    pub secrets: ClusterSecrets,
    pub kms: KmsConfig,
}

/// What the backend produced for a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterOutputs {
    /// Hex, derived from the measurement secret and salt.
    pub cluster_id: String,
    pub owner_id: String,
    pub kubeconfig: SecretBytes,
    /// PEM.
    pub cluster_ca_certificate: String,
    /// PEM.
    pub client_certificate: String,
    /// PEM.
    pub client_key: SecretBytes,
    /// Endpoint of the cluster API, `host:port` or URL.
    pub host: String,
    /// The init secret sent in InitRequest (its hash is in the nodes' metadata).
    pub init_secret: SecretBytes,
}

impl fmt::Debug for ClusterOutputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOutputs")
            .field("cluster_id", &self.cluster_id)
            .field("owner_id", &self.owner_id)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// A cluster as recorded in Terraform state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub spec: ClusterSpec,
    pub outputs: ClusterOutputs,
    /// Opaque to the provider (e.g. JSON of node pids, ports, attestation key fingerprints).
    /// Kept in Terraform's private state; it must not hold secrets in plain text beyond what
    /// the state file already holds.
    pub platform_state: String,
}

/// A node the backend found dead, unreachable or failing attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnhealthyNode {
    pub name: String,
    pub role: Role,
    pub reason: String,
}

/// The result of a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterReadResult {
    /// The cluster exists. `state` is the refreshed state (`spec` as recorded; the provider
    /// derives the observed node counts from `unhealthy`).
    Present {
        state: Box<ClusterState>,
        unhealthy: Vec<UnhealthyNode>,
    },
    /// Nothing of the cluster is left: it leaves Terraform state and the next plan creates it.
    Gone,
}

/// The fields of a `constellation-cluster://?platform=local&name=<name>&...` import ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportId {
    pub platform: Platform,
    pub name: String,
    /// Every other query parameter, for the backend (e.g. `state_dir`).
    pub params: BTreeMap<String, String>,
}

pub const IMPORT_SCHEME: &str = "constellation-cluster";

impl FromStr for ImportId {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, ClusterError> {
        let bad = |why: String| ClusterError::ImportId {
            id: s.to_owned(),
            reason: why,
        };
        let url = url::Url::parse(s).map_err(|e| bad(e.to_string()))?;
        if url.scheme() != IMPORT_SCHEME {
            return Err(bad(format!(
                "scheme is {:?}, expected {IMPORT_SCHEME:?}",
                url.scheme()
            )));
        }
        let mut params: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if params.insert(k.to_string(), v.to_string()).is_some() {
                return Err(bad(format!("parameter {k:?} is given twice")));
            }
        }
        let platform = params
            .remove("platform")
            .ok_or_else(|| bad("parameter \"platform\" is missing".into()))?;
        let platform = platform.parse().map_err(bad)?;
        let name = params
            .remove("name")
            .ok_or_else(|| bad("parameter \"name\" is missing".into()))?;
        check_name(&name).map_err(bad)?;
        Ok(Self {
            platform,
            name,
            params,
        })
    }
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An input is unusable; `attribute` is its path, e.g. `["network_config", "pod_cidr"]`.
    #[error("{attribute}: {reason}")]
    InvalidInput { attribute: AttrPath, reason: String },
    #[error("{what} is not supported: {reason}")]
    Unsupported { what: String, reason: String },
    #[error("{0}")]
    BackendUnavailable(String),
    #[error("node {node}: {reason}")]
    Node { node: String, reason: String },
    #[error("node {node} failed attestation: {reason}")]
    Attestation { node: String, reason: String },
    /// A node was refused admission because of the configuration at `attribute` (e.g. it
    /// booted an image whose measurements differ from `image.measurements`).
    #[error("node {node} was refused admission to the cluster: {reason}")]
    Refused {
        attribute: AttrPath,
        node: String,
        reason: String,
    },
    #[error("cluster initialization failed: {0}")]
    Init(String),
    /// Init reached a node that was initialized already (the node answered ALREADY_EXISTS).
    #[error(
        "cluster initialization failed: node {node}: the node is already initialized: {message}"
    )]
    AlreadyInitialized { node: String, message: String },
    #[error("platform state is unreadable: {0}")]
    PlatformState(String),
    #[error("import ID {id:?} is invalid: {reason}")]
    ImportId { id: String, reason: String },
    #[error("cluster {name:?} not found: {reason}")]
    NotFound { name: String, reason: String },
    #[error("operation cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

impl ClusterError {
    pub fn to_diagnostic(&self, operation: &str) -> Diagnostic {
        let summary = match self {
            ClusterError::InvalidInput { .. } => "Invalid cluster configuration".to_owned(),
            ClusterError::Attestation { .. } | ClusterError::Refused { .. } => {
                format!("Cluster {operation}: attestation failed")
            }
            ClusterError::ImportId { .. } => "Invalid import ID".to_owned(),
            _ => format!("Cluster {operation} failed"),
        };
        let d = Diagnostic::error(summary, self.to_string());
        match self {
            ClusterError::InvalidInput { attribute, .. }
            | ClusterError::Refused { attribute, .. } => d.at(attribute.clone()),
            _ => d,
        }
    }
}

/// Receives progress of long steps (node started, node attested, init sent, ...).
pub trait Progress: Send + Sync {
    fn step(&self, message: &str);
}

/// Logs progress through `tracing` at INFO (Terraform shows it with `TF_LOG=INFO`).
#[derive(Debug, Clone)]
pub struct LogProgress {
    pub cluster: String,
}

impl Progress for LogProgress {
    fn step(&self, message: &str) {
        tracing::info!(cluster = %self.cluster, "{message}");
    }
}

/// The cluster operations of one platform. Implementations must be cancel-safe at await
/// points: when Terraform sends StopProvider, the in-flight future is dropped.
pub trait ClusterBackend: Send + Sync {
    /// Provisions nodes, attests the first control plane against `spec.image.measurements`,
    /// initializes the cluster and waits for the other nodes to join. `given` says which of
    /// `spec.secrets` the configuration set: a backend that resumes an interrupted create may
    /// replace the others with the ones it recorded (the returned spec has the secrets used).
    fn create<'a>(
        &'a self,
        spec: &'a ClusterSpec,
        given: GivenSecrets,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>>;

    /// Checks every node recorded in `state` (alive, attesting). Read-only.
    fn read<'a>(
        &'a self,
        state: &'a ClusterState,
    ) -> BoxFuture<'a, Result<ClusterReadResult, ClusterError>>;

    /// Brings the cluster to `spec`: replaces unhealthy nodes, scales node groups, rolls the
    /// image/measurements or Kubernetes version. Fields that force replacement never differ
    /// between `prior.spec` and `spec`.
    fn update<'a>(
        &'a self,
        prior: &'a ClusterState,
        spec: &'a ClusterSpec,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>>;

    /// Tears every node down. Deleting a cluster that is already gone succeeds.
    fn delete<'a>(
        &'a self,
        state: &'a ClusterState,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;

    /// For the plan of an image change: the nodes a rolling upgrade of cluster `name` on
    /// `platform` to `image_reference` replaces, in order. Read-only; empty when unknown.
    fn upgrade_preview(
        &self,
        name: &str,
        platform: Platform,
        image_reference: &str,
    ) -> Vec<String> {
        let _ = (name, platform, image_reference);
        Vec::new()
    }

    /// Rebuilds the state of an existing cluster from an import ID, reading only folders
    /// `folders` allows.
    fn import(
        &self,
        id: &ImportId,
        folders: &crate::provider_config::ProviderConfig,
    ) -> Result<ClusterState, ClusterError>;
}

/// Cluster names: 1..=30 chars of `a-z`, `0-9`, `-`, starting with a letter, no trailing `-`
/// (the name prefixes node names and DNS labels).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1 to 30 characters of a-z, 0-9 and '-', start with a letter \
             and not end with '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.0.0/16");
        assert!("fd00::/64".parse::<Cidr>().is_ok());
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        assert!(matches!(
            "10.244.0.0".parse::<Cidr>(),
            Err(CidrError::Form(_))
        ));
        assert!(matches!(
            "10.300.0.0/16".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
        assert!(matches!(
            "10.0.0.0/+8".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
        match "10.244.1.0/16".parse::<Cidr>() {
            Err(CidrError::HostBits { network, .. }) => assert_eq!(network, "10.244.0.0/16"),
            other => panic!("{other:?}"),
        }
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.96.0.0/12".parse().unwrap();
        let c: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn import_ids() {
        let id: ImportId = "constellation-cluster://?platform=local&name=demo&state_dir=%2Ftmp%2Fx"
            .parse()
            .unwrap();
        assert_eq!(id.name, "demo");
        assert_eq!(id.platform, Platform::Local);
        assert_eq!(id.params["state_dir"], "/tmp/x");
        for bad in [
            "http://?platform=local&name=demo",
            "constellation-cluster://?name=demo",
            "constellation-cluster://?platform=azure&name=demo",
            "constellation-cluster://?platform=local",
            "constellation-cluster://?platform=local&name=Bad_Name",
            "constellation-cluster://?platform=local&name=a&name=b",
            "not a uri",
        ] {
            assert!(
                matches!(bad.parse::<ImportId>(), Err(ClusterError::ImportId { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_on_inputs_carry_the_path() {
        let e = ClusterError::InvalidInput {
            attribute: AttrPath::attr(&["network_config", "pod_cidr"]),
            reason: "overlaps".into(),
        };
        let d = e.to_diagnostic("create");
        assert_eq!(
            d.attribute,
            Some(AttrPath::attr(&["network_config", "pod_cidr"]))
        );
        assert!(ClusterError::Cancelled
            .to_diagnostic("create")
            .attribute
            .is_none());
    }
}
