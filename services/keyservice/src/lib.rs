//! The key service: data keys derived from the cluster's master secret.
//!
//! - [`master`]: the master secret and the [`MasterSecretBackend`] trait (where it comes from);
//!   backends [`cluster_managed::ClusterManagedBackend`] (a 0600 file on the state disk) and
//!   [`kmip::KmipBackend`] (wrapped by a KEK in an external KMS reached over KMIP).
//! - [`service`]: the gRPC `KeyService` (`GetDataKey` = HKDF as in `constellation_common::kdf`)
//!   and [`serve`], reachable only over mutual TLS.
//! - [`tls`]: reusable rustls plumbing for tonic (server incoming stream, client connector) and
//!   the mutual-TLS config builders.
//! - [`kmsplugin`]: the Kubernetes KMS v2 plugin (Status, Encrypt, Decrypt) over a unix socket,
//!   wrapping the apiserver's DEKs with a KEK derived from the master secret.
//! - `testing` (feature `testing`): a small rcgen PKI and a real PyKMIP server launcher.

pub mod cluster_managed;
pub mod config;
pub mod kmip;
pub mod kmsplugin;
pub mod master;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub use constellation_common::tls;

pub use master::{BackendError, MasterSecret, MasterSecretBackend};
pub use service::{serve, KeyService, ServeError};
