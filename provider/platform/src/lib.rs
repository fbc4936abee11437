//! Platforms, provider side: the `Cloud` seam and its default implementation, the **local**
//! platform, where a node is a bootstrapper process with its own swtpm (a real TPM 2.0), its own
//! state folder and its own loopback address.
//!
//! Measured boot is emulated honestly: before a node's bootstrapper starts, the launcher extends
//! the image's boot events (SHA-256 of the bootstrapper binary and of the image manifest) into
//! the node's TPM, as firmware and boot loader would, and records the node's attestation key
//! (AK) public key so verifiers pin it instead of trusting whatever key a node presents.

pub mod local;
pub mod process;

pub use local::{LocalCloud, NodeRecord, PlatformError};

use constellation_common::metadata::Role;

/// Provisioning operations every platform offers (local processes now; QEMU and clouds later).
pub trait Cloud {
    /// Creates and boots `count` nodes of `role`; returns their records.
    fn create_nodes(&mut self, role: Role, count: usize) -> Result<Vec<NodeRecord>, PlatformError>;
    /// Every node the platform knows of, alive or not.
    fn list_nodes(&self) -> Vec<NodeRecord>;
    /// Stops a node and removes it and its TPM state.
    fn delete_node(&mut self, name: &str) -> Result<(), PlatformError>;
    /// Where the provider reaches the first control-plane node's bootstrapper (init endpoint).
    fn init_endpoint(&self) -> Option<String>;
}
