//! The control planes' replicated state, in a real etcd cluster (one member per control plane).
//!
//! - [`member`]: the etcd member launcher: typed [`member::MemberConfig`], the member's mutual-TLS
//!   files (certificates from the cluster PKI's etcd CA, keys 0600) and data directory under the
//!   node's state folder, and [`member::SupervisedMember`] (restart with back-off).
//! - [`client`]: [`Store`], the typed client over `etcd-client`: accepted measurements, the node
//!   directory, disk-to-node bindings (compare-and-set, first claim wins), bootstrap tokens, and
//!   etcd's member API (learner first, then promote; remove).
//! - [`keys`]: the key layout and the typed records stored under it.
//! - [`watch`]: [`JoinStateCache`], the join service's view of the measurements and the node
//!   directory, kept current by an etcd watch so an update reaches every control plane without a
//!   restart.
//!
//! The join service's `DiskBindings` and `NodeDirectory` on top of this live in
//! `constellation-joinservice` (`EtcdDiskBindings`), which depends on this crate.

pub mod client;
pub mod error;
pub mod keys;
pub mod member;
pub mod watch;

pub use client::{ClientTls, DiskClaim, EtcdCredentials, Store, StoreConfig};
pub use error::StoreError;
pub use member::{ClusterState, MemberConfig, MemberTlsFiles, SupervisedMember};
pub use watch::JoinStateCache;
