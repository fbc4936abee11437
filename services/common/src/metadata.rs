//! The `Metadata` seam (node side): who am I, my role, my peers, where the join service is, and
//! the init-secret hash. The local platform serves it from a JSON file it rewrites atomically;
//! the QEMU platform serves the same JSON to its guests on a TCP address of their user-mode
//! network ([`TcpMetadata`]); cloud platforms answer from their metadata APIs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Well-known ports every node uses on its own address (as on a cloud VM).
pub mod ports {
    /// Bootstrapper: Init and Recover over server-attested aTLS.
    pub const BOOTSTRAPPER: u16 = 9000;
    /// Key service: mutual TLS with cluster-issued certificates (control plane only).
    pub const KEY_SERVICE: u16 = 9001;
    /// Verification service: attestation on request (every node).
    pub const VERIFY: u16 = 30081;
    /// Join service: mutual aTLS (control plane only).
    pub const JOIN: u16 = 30090;
    /// Kubernetes API server (served only where Kubernetes is installed).
    pub const KUBE_API: u16 = 6443;
}

/// Prefix of the status lines a QEMU guest's bootstrapper prints on its serial console: the
/// prefix, then the node's status (`node_status::NodeStatus`) as one line of JSON, once per
/// change. The host cannot read files inside the guest; the platform parses these lines.
pub const CONSOLE_STATUS_PREFIX: &str = "constellation-status: ";

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        }
    }
}

/// One node as the platform knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub role: Role,
    /// The node's own address (a distinct loopback address on the local platform).
    pub ip: IpAddr,
    /// The node's attestation key (SubjectPublicKeyInfo DER, hex), recorded at provisioning
    /// and pinned by verifiers.
    pub ak_spki_hex: String,
}

impl NodeInfo {
    pub fn endpoint(&self, port: u16) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        }
    }
}

/// Everything the platform publishes about a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    pub cluster_name: String,
    /// Argon2id PHC string of the init secret (never the secret itself).
    pub init_secret_hash: String,
    /// Attestation variant name, e.g. "qemu-vtpm".
    pub attestation_variant: String,
    /// Expected measurements, in the measurements JSON form.
    pub measurements_json: String,
    /// SEV-SNP settings the nodes enforce on SEV-SNP evidence, in the JSON form of the
    /// attestation crate's `SnpSettings` (minimum TCB and ABI, launch-measurement and ID-key
    /// allow-lists); empty: the defaults (and nothing for a variant without SEV-SNP).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snp_settings_json: String,
    pub nodes: Vec<NodeInfo>,
}

impl ClusterMetadata {
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Join service endpoints: every control-plane node except `except`.
    pub fn join_endpoints(&self, except: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::ControlPlane && n.name != except)
            .map(|n| n.endpoint(ports::JOIN))
            .collect()
    }
}

/// Why metadata could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed metadata: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("metadata endpoint {addr}: {source}")]
    Endpoint {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metadata endpoint {addr} sent more than {limit} bytes")]
    TooLarge {
        addr: std::net::SocketAddr,
        limit: u64,
    },
    #[error("metadata endpoint {addr}: malformed metadata: {source}")]
    MalformedEndpoint {
        addr: std::net::SocketAddr,
        source: serde_json::Error,
    },
    #[error("this node ({0}) is not in the cluster metadata")]
    UnknownSelf(String),
}

/// The node-side view of the platform's metadata.
pub trait Metadata: Send + Sync {
    /// The whole cluster as currently published (re-read on every call: peers change).
    fn cluster(&self) -> Result<ClusterMetadata, MetadataError>;
    /// This node's name.
    fn self_name(&self) -> &str;

    fn self_info(&self) -> Result<NodeInfo, MetadataError> {
        let c = self.cluster()?;
        c.node(self.self_name())
            .cloned()
            .ok_or_else(|| MetadataError::UnknownSelf(self.self_name().to_owned()))
    }
}

/// Metadata served from a JSON file (local platform).
#[derive(Debug, Clone)]
pub struct FileMetadata {
    path: PathBuf,
    name: String,
}

impl FileMetadata {
    pub fn new(path: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            name: name.into(),
        }
    }

    /// Writes metadata atomically, mode 0600 ([`crate::secret_file`]): readers never see half
    /// a file, and the pinned attestation keys it lists cannot be swapped through a planted
    /// temporary.
    pub fn write(path: &Path, m: &ClusterMetadata) -> Result<(), MetadataError> {
        let bytes = serde_json::to_vec_pretty(m).expect("metadata serializes");
        crate::secret_file::write_private_atomic(path, &bytes).map_err(|e| MetadataError::Io {
            path: path.to_owned(),
            source: e.into(),
        })
    }

    pub fn read(path: &Path) -> Result<ClusterMetadata, MetadataError> {
        let bytes = std::fs::read(path).map_err(|source| MetadataError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| MetadataError::Malformed {
            path: path.to_owned(),
            source,
        })
    }
}

impl Metadata for FileMetadata {
    fn cluster(&self) -> Result<ClusterMetadata, MetadataError> {
        Self::read(&self.path)
    }
    fn self_name(&self) -> &str {
        &self.name
    }
}

/// Metadata read from a TCP endpoint that sends the metadata JSON and closes the connection
/// (QEMU platform: a `guestfwd` on the guest's user-mode network runs `cat` of the platform's
/// metadata file on the host for every connection, so every read sees the current node list
/// and guests cannot change it).
#[derive(Debug, Clone)]
pub struct TcpMetadata {
    addr: std::net::SocketAddr,
    name: String,
}

impl TcpMetadata {
    /// Longest answer accepted (the JSON of a few hundred nodes is far smaller).
    pub const MAX_BYTES: u64 = 4 << 20;
    /// Bound on connecting and on each read.
    pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(addr: std::net::SocketAddr, name: impl Into<String>) -> Self {
        Self {
            addr,
            name: name.into(),
        }
    }

    fn fetch(&self) -> Result<Vec<u8>, MetadataError> {
        use std::io::Read;
        let addr = self.addr;
        let io = |source| MetadataError::Endpoint { addr, source };
        let stream = std::net::TcpStream::connect_timeout(&addr, Self::TIMEOUT).map_err(io)?;
        stream.set_read_timeout(Some(Self::TIMEOUT)).map_err(io)?;
        let mut bytes = Vec::new();
        stream
            .take(Self::MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > Self::MAX_BYTES {
            return Err(MetadataError::TooLarge {
                addr,
                limit: Self::MAX_BYTES,
            });
        }
        Ok(bytes)
    }
}

impl Metadata for TcpMetadata {
    fn cluster(&self) -> Result<ClusterMetadata, MetadataError> {
        let bytes = self.fetch()?;
        serde_json::from_slice(&bytes).map_err(|source| MetadataError::MalformedEndpoint {
            addr: self.addr,
            source,
        })
    }
    fn self_name(&self) -> &str {
        &self.name
    }
}
