//! What a node remembers across restarts (in its state folder): whether it was initialized or
//! joined, and which cluster; on control-plane nodes also the non-secret facts Recover needs
//! ([`ControlPlaneRecord`]). Secrets are not kept here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "node-state.json";
const CONTROL_PLANE_FILE: &str = "control-plane.json";

/// The node's lifecycle phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Fresh node: not part of any cluster yet.
    Uninitialized,
    /// This node ran Init and is the cluster's first control plane.
    Initialized { cluster_id: String },
    /// This node joined through a join service.
    Joined { cluster_id: String },
}

/// Persisted node state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    #[serde(flatten)]
    pub phase: Phase,
}

/// Why the node state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed node state: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What a control-plane node needs besides the master secret to serve the key service and the
/// join service again after a restart (Recover). Nothing here is secret: the measurement salt is
/// handed to every joining node in its join ticket, the cluster name and Kubernetes version are
/// public. The measurement secret is not stored; Recover derives it from the master secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlaneRecord {
    pub cluster_name: String,
    pub kubernetes_version: String,
    /// Hex of the 32-byte measurement salt.
    pub measurement_salt: String,
}

impl ControlPlaneRecord {
    /// Loads the record, `None` when this node never stored one (a worker, a fresh node).
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(CONTROL_PLANE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Malformed { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        save_json(dir, CONTROL_PLANE_FILE, self)
    }
}

/// Writes `value` as JSON atomically, mode 0600 ([`constellation_common::secret_file`]), so a
/// crash never leaves half a file and a planted temporary gets nothing.
fn save_json(dir: &Path, file: &str, value: &impl Serialize) -> Result<(), StateError> {
    let path = dir.join(file);
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    constellation_common::secret_file::write_private_atomic(&path, &bytes).map_err(|e| {
        StateError::Io {
            path: path.clone(),
            source: e.into(),
        }
    })
}

impl NodeState {
    /// Loads the state, or `Uninitialized` when the node never saved one.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Malformed { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                phase: Phase::Uninitialized,
            }),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Saves atomically (temp file + rename + fsync) so a crash never leaves half a file.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        save_json(dir, FILE, self)
    }

    pub fn cluster_id(&self) -> Option<&str> {
        match &self.phase {
            Phase::Uninitialized => None,
            Phase::Initialized { cluster_id } | Phase::Joined { cluster_id } => Some(cluster_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_defaults_to_uninitialized() {
        let dir = std::env::temp_dir().join(format!("node-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(NodeState::load(&dir).unwrap().phase, Phase::Uninitialized);
        let s = NodeState {
            phase: Phase::Joined {
                cluster_id: "ab".into(),
            },
        };
        s.save(&dir).unwrap();
        assert_eq!(NodeState::load(&dir).unwrap(), s);
        std::fs::write(dir.join(FILE), b"{").unwrap();
        assert!(matches!(
            NodeState::load(&dir),
            Err(StateError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn control_plane_record_round_trips() {
        let dir = std::env::temp_dir().join(format!("cp-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(ControlPlaneRecord::load(&dir).unwrap(), None);
        let r = ControlPlaneRecord {
            cluster_name: "c".into(),
            kubernetes_version: "v1.31.1".into(),
            measurement_salt: "33".repeat(32),
        };
        r.save(&dir).unwrap();
        assert_eq!(ControlPlaneRecord::load(&dir).unwrap(), Some(r));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
