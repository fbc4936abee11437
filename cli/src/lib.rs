//! Clients of the nodes' APIs, used by the `attest` CLI, the provider and the tests: the
//! verification service ([`verify_client`]) and the bootstrapper's Init and Recover
//! ([`bootstrapper_client`]). The attestation crate stays the network-free trust core;
//! everything that dials a node over gRPC lives here.

pub mod bootstrapper_client;
pub mod verify_client;

pub use verify_client::{verify_cluster, VerifyError};
