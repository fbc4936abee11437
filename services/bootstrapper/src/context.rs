//! What the node's services share: the [`NodeContext`], the node's [`Binding`] to its cluster
//! and the steps every way of binding uses (extending PCR 15, reporting the phase). Init,
//! Recover, the control-plane services and the join loop all import it; it imports none of them.

use std::path::PathBuf;
use std::sync::Arc;

use constellation_attestation::measurements::{sha256, CLUSTER_ID_PCR};
use constellation_attestation::variant::VariantIssuer;
use constellation_attestation::Clock;
use constellation_common::metadata::Metadata;
use constellation_common::node_status::NodePhase;
use constellation_joinservice::{DiskBindings, EtcdDiskBindings};
use constellation_store::Store;
use tokio::sync::Mutex;

use crate::kubernetes::KubernetesInstaller;
use crate::state::NodeState;
use crate::statedisk::{self, StateDiskError};

/// Everything the node's services share.
pub struct NodeContext {
    pub name: String,
    pub node_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metadata: Arc<dyn Metadata>,
    /// Where the control planes keep what they share: which node each state disk belongs to,
    /// and what the join service serves from.
    pub shared: SharedState,
    /// The node's status file (phase and daemons' health).
    pub status: Arc<crate::daemons::StatusBoard>,
    /// The supervised service daemons (control planes only).
    pub daemons: Option<crate::daemons::NodeDaemons>,
    pub issuer: Arc<VariantIssuer>,
    pub clock: Arc<dyn Clock>,
    /// The lifecycle phase; Init holds this lock while it runs (exactly-once).
    pub phase: Arc<Mutex<NodeState>>,
    /// What bound this node to its cluster since it booted (extended PCR 15). Lock order:
    /// `phase` first, then `binding`.
    pub binding: Mutex<Binding>,
    pub installer: Box<dyn KubernetesInstaller>,
    /// The QEMU guest's devices, when the node runs in one.
    pub vm: Option<crate::vm::VmSettings>,
}

/// Where the cluster's control planes keep their shared state: the control planes' etcd
/// cluster. Each control plane runs a member ([`crate::etcd`]); the client is set once this
/// node's member runs.
#[derive(Default)]
pub struct SharedState {
    pub client: std::sync::OnceLock<Store>,
    /// Held while the member is being started (at boot, Init, a join or Recover).
    pub starting: tokio::sync::Mutex<()>,
}

impl SharedState {
    /// The etcd client, once this node's member runs.
    pub fn etcd(&self) -> Option<&Store> {
        self.client.get()
    }

    /// The disk bindings as this node reaches them; `None` while its etcd member is not started.
    pub fn disk_bindings(&self) -> Option<Arc<dyn DiskBindings>> {
        self.client
            .get()
            .map(|store| Arc::new(EtcdDiskBindings::new(store.clone())) as Arc<dyn DiskBindings>)
    }
}

/// What extended PCR 15 with the cluster ID in this boot: exactly one of them may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Nothing yet: the node waits for Init, a join ticket or Recover.
    Unbound,
    /// Init ran on this node.
    Initialized,
    /// A join service issued this node a ticket.
    Joined,
    /// The operator recovered this control plane with its master secret.
    Recovered,
    /// Recover failed after PCR 15 was extended; only a restart helps.
    Broken,
}

impl NodeContext {
    pub(crate) fn disk_path(&self) -> PathBuf {
        match &self.vm {
            Some(vm) => vm.state_device.clone(),
            None => self.state_dir.join("disk.img"),
        }
    }

    /// The device-mapper name of the state disk, from its LUKS UUID (unique per disk, so per
    /// node on a host).
    pub(crate) fn mapper_name(&self) -> Result<String, StateDiskError> {
        statedisk::mapper_name_of(&self.disk_path())
    }
}

/// Binds the node to its cluster: one extend of PCR 15 with SHA-256(cluster ID).
pub(crate) fn extend_cluster_id(
    node: &NodeContext,
    cluster_id: &[u8],
) -> Result<(), constellation_attestation::tpm::TpmError> {
    let event = sha256(cluster_id);
    node.issuer
        .with_tpm(|tpm| tpm.pcr_extend(CLUSTER_ID_PCR, &event))?;
    tracing::info!(cluster_id = %hex::encode(cluster_id), "extended PCR {CLUSTER_ID_PCR} with the cluster ID");
    Ok(())
}

/// Records the node's phase for the platform; a failure to write is logged, never fatal.
pub(crate) fn report(node: &NodeContext, phase: NodePhase) {
    node.status.set_phase(phase);
}
