//! The key layout and the typed records stored under it. Every key of ours starts with
//! [`ROOT`]; values are JSON of the record types here (measurements: the measurements JSON the
//! attestation crate reads and writes), checked on every read.
//!
//! | key | value |
//! |---|---|
//! | `/constellation/join/measurements` | the accepted measurements ([`AcceptedMeasurements`] JSON: one set, or the old and new sets during a rolling upgrade) |
//! | `/constellation/join/nodes/<node name>` | [`NodeRecord`]: a node of the node directory |
//! | `/constellation/disks/<disk UUID>` | [`DiskBindingRecord`]: the node a disk belongs to |
//! | `/constellation/node-disks/<AK SHA-256 hex>/<slot>` | [`DiskBindingRecord`]: a disk the node holds (slot < `MAX_DISKS_PER_NODE`) |
//! | `/constellation/tokens/<node name>` | [`BootstrapTokenRecord`] (leased: gone at expiry) |

use std::marker::PhantomData;

use constellation_attestation::measurements::AcceptedMeasurements as AcceptedSets;
use constellation_common::metadata::NodeInfo;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::StoreError;

/// Prefix of every key the store writes.
pub const ROOT: &str = "/constellation/";
/// Prefix of what the join service serves from and watches.
pub const JOIN_PREFIX: &str = "/constellation/join/";
/// The accepted measurements.
pub const MEASUREMENTS: &str = "/constellation/join/measurements";
/// Prefix of the node directory.
pub const NODES_PREFIX: &str = "/constellation/join/nodes/";
const DISKS_PREFIX: &str = "/constellation/disks/";
const NODE_DISKS_PREFIX: &str = "/constellation/node-disks/";
const TOKENS_PREFIX: &str = "/constellation/tokens/";

/// A key whose value is a `V`: the type says how the value is encoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key<V> {
    path: String,
    value: PhantomData<fn() -> V>,
}

impl<V> Key<V> {
    fn new(path: String) -> Self {
        Self {
            path,
            value: PhantomData,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// How a record type is written to and read from etcd.
pub trait Value: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError>;
}

/// Records stored as JSON.
pub trait JsonValue: Serialize + DeserializeOwned {}

impl<T: JsonValue> Value for T {
    fn encode(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Malformed {
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// The accepted measurements: exactly what the join service validates joiners with (the
/// attestation crate's `AcceptedMeasurements`: one set, or during a rolling image upgrade the old
/// and the new image's, the target last), in its JSON (one measurements object, or a list),
/// checked on read like any measurements document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedMeasurements(pub AcceptedSets);

impl Value for AcceptedMeasurements {
    fn encode(&self) -> Vec<u8> {
        self.0.to_json().into_bytes()
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        AcceptedSets::from_json(bytes)
            .map(Self)
            .map_err(|e| StoreError::Malformed {
                key: key.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// A node of the node directory: the platform's record of it (name, role, address, pinned
/// attestation key), what the join service checks a joiner against.
pub type NodeRecord = NodeInfo;
impl JsonValue for NodeInfo {}

/// A disk bound to a node (the same record under the disk's key and the node's slot). The join
/// service turns it into its typed `DiskOwner` and checks it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskBindingRecord {
    pub disk_uuid: String,
    pub node_name: String,
    /// Hex SHA-256 of the node's attestation key.
    pub ak_sha256: String,
}
impl JsonValue for DiskBindingRecord {}

/// A node's live bootstrap token: its ID and the SHA-256 of its secret (never the secret), so
/// any control plane can check a presented token and a node has one token across all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapTokenRecord {
    pub node_name: String,
    pub token_id: String,
    /// Hex SHA-256 of the token secret.
    pub secret_sha256: String,
    pub expires_at_unix: u64,
}
impl JsonValue for BootstrapTokenRecord {}

pub fn measurements() -> Key<AcceptedMeasurements> {
    Key::new(MEASUREMENTS.to_owned())
}

pub fn node(name: &str) -> Key<NodeRecord> {
    Key::new(format!("{NODES_PREFIX}{name}"))
}

/// The binding of the disk with UUID `disk` (the caller checked its form: a key segment).
pub fn disk(disk: &str) -> Key<DiskBindingRecord> {
    Key::new(format!("{DISKS_PREFIX}{disk}"))
}

/// Prefix of the slots of the node with attestation key `ak_fingerprint`.
pub fn node_disks_prefix(ak_fingerprint: &[u8; 32]) -> String {
    format!("{NODE_DISKS_PREFIX}{}/", hex::encode(ak_fingerprint))
}

pub fn node_disk_slot(ak_fingerprint: &[u8; 32], slot: usize) -> Key<DiskBindingRecord> {
    Key::new(format!("{}{slot}", node_disks_prefix(ak_fingerprint)))
}

pub fn bootstrap_token(node_name: &str) -> Key<BootstrapTokenRecord> {
    Key::new(format!("{TOKENS_PREFIX}{node_name}"))
}

/// A node name is a key segment: no `/`, nothing empty. Checked before a name becomes a key, so
/// one name can never address another node's key.
pub fn check_segment(what: &'static str, name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.contains('/') || name.bytes().any(|b| b.is_ascii_control()) {
        return Err(StoreError::Refused {
            operation: what,
            key: name.to_owned(),
            reason: "not usable as a key segment (empty, '/' or a control character)".into(),
        });
    }
    Ok(())
}
