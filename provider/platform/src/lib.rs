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

pub use local::{LocalCloud, NodeRecord, PlatformError};
pub use qemu::QemuCloud;

use constellation_common::metadata::Role;
use constellation_common::node_status::NodeStatus;

/// Provisioning operations every platform offers. The cluster backend uses only these, so it
/// does not know whether a node is a process or a VM.
pub trait Cloud {
    /// Creates and boots `count` nodes of `role`; returns their records once each is up.
    fn create_nodes(&mut self, role: Role, count: usize) -> Result<Vec<NodeRecord>, PlatformError>;
    /// Every node the platform knows of, alive or not.
    fn list_nodes(&self) -> Vec<NodeRecord>;
    /// Stops a node and removes it, its TPM state and its disk.
    fn delete_node(&mut self, name: &str) -> Result<(), PlatformError>;
    /// Powers a node off and boots it again (same TPM, disk, address and pinned AK).
    fn restart_node(&mut self, name: &str) -> Result<NodeRecord, PlatformError>;
    /// The status the node's current boot reported, if any.
    fn node_status(&self, node: &NodeRecord) -> Option<NodeStatus> {
        node.status()
    }
    /// The last `lines` lines of the node's console (its log), for diagnostics.
    fn console_tail(&self, node: &NodeRecord, lines: usize) -> String {
        process::log_tail(&node.log_path(), lines)
    }
    /// Where the provider reaches the first control-plane node's bootstrapper (init endpoint).
    fn init_endpoint(&self) -> Option<String>;
}
