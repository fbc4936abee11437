//! The join service: admits attested nodes and issues their join tickets (disk key, bootstrap
//! token, kubelet certificate and, for control-plane nodes, the shared CA material).
//!
//! Everything here is a library; [`server::serve`] puts it on the network behind mutual aTLS
//! under the listener limits, and the interceptor inserts the attested peer
//! ([`ticket::AttestedPeer`]) into each request's extensions.

pub mod attested_peer;
pub mod collateral_cache;
pub mod config;
pub mod disk_bindings;
pub mod keyclient;
pub mod pki;
pub mod server;
pub mod ticket;
pub mod token;

pub use attested_peer::AttestedPeerInterceptor;
pub use collateral_cache::{CollateralCache, CollateralFetcher};
pub use disk_bindings::{
    Claim, DiskBindings, DiskOwner, DiskUuid, EtcdDiskBindings, FileDiskBindings,
};
pub use pki::{ClusterPki, NodeIdentity};
pub use ticket::{AttestedPeer, DataKeySource, JoinTicketConfig, JoinTicketIssuer, NodeDirectory};
pub use token::{BootstrapToken, TokenRegistry};
