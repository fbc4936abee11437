//! The node's status contract: which phase the bootstrapper is in, and, when a join service
//! refused it, which check refused and why ([`Refusal`]). The bootstrapper writes it to
//! [`STATUS_FILE`] in its state folder at every phase change; the platform (and the provider
//! through it) reads it instead of searching the node's log for phrases.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;

/// The status file in the node's state folder.
pub const STATUS_FILE: &str = "status.json";

/// Where the node is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum NodePhase {
    /// The bootstrapper runs; its listeners are coming up.
    Started,
    /// A control plane with no cluster state, waiting for Init.
    WaitingForInit,
    /// A control plane that restarted after Init or a control-plane join: its state disk and
    /// cluster record are intact, but it holds no master secret. It waits for Recover (and
    /// rejoins on its own if another control plane's join service answers first).
    WaitingForRecover,
    /// Looking for a join service; `attempts` made so far.
    Joining { attempts: u32 },
    /// The last join attempt was refused by the join service at `endpoint`; the node keeps
    /// trying (a measurement update can admit it).
    JoinRefused {
        endpoint: String,
        attempts: u32,
        refusal: Refusal,
    },
    /// This node ran Init: the cluster's first control plane.
    Initialized { cluster_id: String },
    /// This node joined (or was recovered into) the cluster.
    Joined { cluster_id: String },
}

/// The name of a control plane's supervised etcd member in [`NodeStatus::daemons`].
pub const ETCD_DAEMON: &str = "etcd";

/// The name of a control plane's supervised join service in [`NodeStatus::daemons`]. On a
/// control plane that joined an etcd cluster it starts only once its etcd member was promoted
/// from learner to voter.
pub const JOIN_SERVICE_DAEMON: &str = "joinservice";

/// The name of a control plane's supervised key service in [`NodeStatus::daemons`]. It runs only
/// while the node holds the master secret (it ran Init, was recovered, or joined with the master
/// material in its join ticket).
pub const KEY_SERVICE_DAEMON: &str = "keyservice";

/// One status report of one bootstrapper process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The bootstrapper's process id: a status written by an earlier boot of the node carries
    /// another pid, so a reader can tell it is stale.
    pub pid: u32,
    #[serde(flatten)]
    pub phase: NodePhase,
    /// The service daemons the bootstrapper supervises on this node and how each is doing.
    /// Absent in status files written before daemons were supervised (read as none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemons: Vec<DaemonHealth>,
    /// A control plane running an etcd member: the members (node names) of the etcd cluster as
    /// its last reconciliation saw them. The platform waits on it before it stops a deleted
    /// control plane, so the survivors keep quorum. Empty without etcd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_members: Vec<String>,
}

/// One supervised daemon as its supervisor last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonHealth {
    /// The daemon's name (e.g. `joinservice`).
    pub name: String,
    /// The running process, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(flatten)]
    pub state: DaemonState,
    /// How often the supervisor started it again after it exited.
    pub restarts: u32,
    /// How the last process ended (`exit status: 1`, `signal: 9 (SIGKILL)`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// A supervised daemon's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum DaemonState {
    /// Started; its readiness endpoint has not answered yet.
    Starting,
    /// Its readiness endpoint answers 200.
    Ready,
    /// Its readiness endpoint answers, but not ready (the daemon's reason).
    NotReady { reason: String },
    /// It exited; the supervisor starts it again after `delay_ms` (exponential back-off).
    BackingOff { delay_ms: u64 },
    /// It could not be started at all (binary missing, configuration not writable); retried
    /// with back-off like a crash.
    FailedToStart { reason: String },
    /// The supervisor stopped it (the node shuts down).
    Stopped,
}

impl DaemonHealth {
    pub fn is_ready(&self) -> bool {
        self.state == DaemonState::Ready
    }
}

/// Why the status could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NodeStatusError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the node status: {0}")]
    Write(#[from] crate::secret_file::SecretFileError),
    #[error("{path}: malformed node status: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl NodeStatus {
    /// The status of this process in `phase`.
    pub fn now(phase: NodePhase) -> Self {
        Self {
            pid: std::process::id(),
            phase,
            daemons: Vec::new(),
            etcd_members: Vec::new(),
        }
    }

    /// This status with the etcd members this control plane sees.
    pub fn with_etcd_members(mut self, members: Vec<String>) -> Self {
        self.etcd_members = members;
        self
    }

    /// This status with the supervised daemons' health.
    pub fn with_daemons(mut self, daemons: Vec<DaemonHealth>) -> Self {
        self.daemons = daemons;
        self
    }

    /// The supervised daemon called `name`, if this node runs one.
    pub fn daemon(&self, name: &str) -> Option<&DaemonHealth> {
        self.daemons.iter().find(|d| d.name == name)
    }

    /// Every daemon in `names` runs and its readiness endpoint answers 200.
    pub fn daemons_ready(&self, names: &[&str]) -> bool {
        names
            .iter()
            .all(|name| self.daemon(name).is_some_and(DaemonHealth::is_ready))
    }

    /// Replaces the status file in `state_dir` atomically (a reader never sees half a file).
    pub fn write(&self, state_dir: &Path) -> Result<(), NodeStatusError> {
        let path = state_dir.join(STATUS_FILE);
        let bytes = serde_json::to_vec(self).map_err(|source| NodeStatusError::Malformed {
            path: path.clone(),
            source,
        })?;
        Ok(crate::secret_file::write_private_atomic(&path, &bytes)?)
    }

    /// The last status written in `state_dir`, `None` before the first.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, NodeStatusError> {
        let path = state_dir.join(STATUS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| NodeStatusError::Malformed { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NodeStatusError::Io { path, source }),
        }
    }

    /// The cluster ID once the node is part of a cluster.
    pub fn cluster_id(&self) -> Option<&str> {
        match &self.phase {
            NodePhase::Initialized { cluster_id } | NodePhase::Joined { cluster_id } => {
                Some(cluster_id)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::{PcrMismatch, RefusalCheck};

    #[test]
    fn a_refusal_round_trips_through_the_file_as_data() {
        let dir = tempfile::tempdir().unwrap();
        assert!(NodeStatus::read(dir.path()).unwrap().is_none());
        let refused = NodeStatus::now(NodePhase::JoinRefused {
            endpoint: "10.0.0.1:30090".into(),
            attempts: 3,
            refusal: Refusal {
                check: RefusalCheck::Measurements,
                mismatches: vec![PcrMismatch {
                    pcr: 4,
                    expected: "aa".into(),
                    found: Some("bb".into()),
                }],
                message: "PCR[4] differs".into(),
            },
        });
        refused.write(dir.path()).unwrap();
        assert_eq!(NodeStatus::read(dir.path()).unwrap(), Some(refused));
        let joined = NodeStatus::now(NodePhase::Joined {
            cluster_id: "c1".into(),
        });
        joined.write(dir.path()).unwrap();
        let read = NodeStatus::read(dir.path()).unwrap().unwrap();
        assert_eq!(read.cluster_id(), Some("c1"));
        assert_eq!(read.pid, std::process::id());
    }

    #[test]
    fn daemon_health_round_trips_and_old_files_without_it_still_read() {
        let dir = tempfile::tempdir().unwrap();
        // A status file as written before daemons were supervised.
        std::fs::write(
            dir.path().join(STATUS_FILE),
            br#"{"pid":7,"phase":"joined","cluster_id":"c1"}"#,
        )
        .unwrap();
        let old = NodeStatus::read(dir.path()).unwrap().unwrap();
        assert_eq!(old.cluster_id(), Some("c1"));
        assert!(old.daemons.is_empty());
        let status = NodeStatus::now(NodePhase::Initialized {
            cluster_id: "c2".into(),
        })
        .with_daemons(vec![
            DaemonHealth {
                name: "keyservice".into(),
                pid: Some(42),
                state: DaemonState::Ready,
                restarts: 0,
                last_exit: None,
            },
            DaemonHealth {
                name: "joinservice".into(),
                pid: None,
                state: DaemonState::BackingOff { delay_ms: 400 },
                restarts: 2,
                last_exit: Some("signal: 9 (SIGKILL)".into()),
            },
        ]);
        status.write(dir.path()).unwrap();
        let read = NodeStatus::read(dir.path()).unwrap().unwrap();
        assert_eq!(read, status);
        assert!(read.daemon("keyservice").unwrap().is_ready());
        assert_eq!(read.daemon("joinservice").unwrap().restarts, 2);
        assert!(read.daemon("verify").is_none());
        // Ready only when every named daemon runs and is ready: a backing-off or a missing
        // one is not.
        assert!(read.daemons_ready(&["keyservice"]));
        assert!(!read.daemons_ready(&["keyservice", "joinservice"]));
        assert!(!read.daemons_ready(&["keyservice", "verify"]));
    }

    #[test]
    fn a_damaged_status_file_is_an_error_not_a_phase() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATUS_FILE), b"{\"phase\":\"joined\"").unwrap();
        assert!(matches!(
            NodeStatus::read(dir.path()),
            Err(NodeStatusError::Malformed { .. })
        ));
    }
}
