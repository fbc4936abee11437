//! Platforms, provider side: the `Cloud` seam and its two implementations.
//!
//! - **local** ([`LocalCloud`]): a node is a bootstrapper process with its own swtpm (a real
//!   TPM 2.0), its own state folder and its own loopback address. Measured boot is emulated
//!   honestly: before a node's bootstrapper starts, the launcher extends the image's boot events
//!   (SHA-256 of the bootstrapper binary and of the image manifest) into the node's TPM, as
//!   firmware and boot loader would.
//! - **qemu** ([`QemuCloud`]): a node is a QEMU VM booting the node image with OVMF and its own
//!   swtpm vTPM; the firmware and kernel measure the boot, the state disk is a dm-crypt volume
//!   inside the guest.
//!
//! Either way the launcher records the node's attestation key (AK) public key so verifiers pin
//! it instead of trusting whatever key a node presents.

pub mod local;
pub mod process;
pub mod qemu;

pub use local::{ClusterSettings, LocalCloud, NodeRecord, PlatformError};
pub use qemu::QemuCloud;

use std::path::Path;
use std::time::Duration;

use constellation_attestation::Variant;
use constellation_common::metadata::{ports, Role};
use constellation_common::node_status::NodeStatus;

/// How far a node's current boot got, as its platform observes it. The backend reports each
/// change as a progress line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootPhase {
    /// Not running.
    Off,
    /// Started; nothing reported yet (a local node's process before its first status).
    Starting,
    /// The VM runs its firmware: OVMF measures and loads the kernel and the initrd.
    Firmware,
    /// The kernel booted and the image's init runs (modules, network, measurements printed);
    /// `kernel_ms` is the kernel's uptime when init started.
    Init { kernel_ms: u64 },
    /// The bootstrapper reported this status (listeners up, waiting for Init, joining, ...).
    Bootstrapper(NodeStatus),
}

/// Provisioning operations every platform offers. The cluster backend uses only these, so it
/// does not know whether a node is a process or a VM.
pub trait Cloud: Send + Sync + std::fmt::Debug {
    /// The cluster folder.
    fn root(&self) -> &Path;
    /// The attestation variant this platform's nodes produce evidence for; the provider
    /// validates them with it and refuses a configuration that names another.
    fn attestation_variant(&self) -> Variant;
    /// The cluster-wide settings published to the nodes.
    fn settings(&self) -> &ClusterSettings;
    /// Replaces the settings and republishes the nodes' metadata.
    fn set_settings(&mut self, settings: ClusterSettings) -> Result<(), PlatformError>;
    /// The node named `name`, if the platform knows it.
    fn node(&self, name: &str) -> Option<&NodeRecord>;
    /// Every node the platform knows of, alive or not.
    fn list_nodes(&self) -> Vec<NodeRecord>;
    /// Adds `count` node records of `role` that boot `image_dir` (not started; every node is
    /// in the metadata before any of them boots). Returns their names.
    fn add_nodes(
        &mut self,
        role: Role,
        count: usize,
        image_dir: &Path,
    ) -> Result<Vec<String>, PlatformError>;
    /// Boots (or reboots) nodes concurrently, each waited for until its bootstrapper reported;
    /// one result per name, in order.
    fn boot_many(&mut self, names: &[String]) -> Vec<Result<NodeRecord, PlatformError>>;
    /// Stops a node and removes it, its TPM state and its disk.
    fn delete_node(&mut self, name: &str) -> Result<(), PlatformError>;
    /// Stops every node and removes the cluster folder; no process or file is left.
    fn destroy(self: Box<Self>) -> Result<(), PlatformError>;
    /// How long nodes get to join after Init or a reboot (the time their boots and joins take
    /// on this platform, with room for a busy machine).
    fn join_timeout(&self) -> Duration;
    /// Whether a new cluster's workers should boot together with its control planes rather
    /// than while the first control plane is initialized. Booting control planes first gives
    /// Init the machine's cores to itself (right for nodes that start in well under a second);
    /// a platform whose boots take long and leave cores idle (a VM in its firmware uses one
    /// core) finishes sooner booting everything at once.
    fn boot_workers_with_control_planes(&self) -> bool {
        false
    }
    /// How far the node's current boot got.
    fn boot_phase(&self, node: &NodeRecord) -> BootPhase {
        match self.node_status(node) {
            Some(status) => BootPhase::Bootstrapper(status),
            None if node.is_alive() => BootPhase::Starting,
            None => BootPhase::Off,
        }
    }
    /// The status the node's current boot reported, if any.
    fn node_status(&self, node: &NodeRecord) -> Option<NodeStatus> {
        node.status()
    }
    /// The last `lines` lines of the node's console (its log), for diagnostics.
    fn console_tail(&self, node: &NodeRecord, lines: usize) -> String {
        process::log_tail(&node.log_path(), lines)
    }
    /// Creates and boots `count` nodes of `role` from the cluster's image; returns their
    /// records once each is up.
    fn create_nodes(&mut self, role: Role, count: usize) -> Result<Vec<NodeRecord>, PlatformError> {
        let image = self.settings().image_dir.clone();
        let names = self.add_nodes(role, count, &image)?;
        self.boot_many(&names).into_iter().collect()
    }
    /// Powers a node off and boots it again (same TPM, disk, address and pinned AK).
    fn restart_node(&mut self, name: &str) -> Result<NodeRecord, PlatformError> {
        self.boot_many(&[name.to_owned()])
            .pop()
            .unwrap_or_else(|| Err(PlatformError::UnknownNode(name.to_owned())))
    }
    /// Where the provider reaches the first control-plane node's bootstrapper (init endpoint).
    fn init_endpoint(&self) -> Option<String> {
        self.list_nodes()
            .into_iter()
            .find(|n| n.role == Role::ControlPlane)
            .map(|n| n.endpoint(ports::BOOTSTRAPPER))
    }
}

impl dyn Cloud {
    /// Changes cluster-wide settings (e.g. new measurements) and republishes the metadata.
    pub fn update_settings(
        &mut self,
        f: impl FnOnce(&mut ClusterSettings),
    ) -> Result<(), PlatformError> {
        let mut settings = self.settings().clone();
        f(&mut settings);
        self.set_settings(settings)
    }
}
