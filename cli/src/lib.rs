//! Clients of the nodes' APIs, used by the `attest` CLI, the provider and the tests: the
//! verification service ([`verify`]). The attestation crate stays the network-free trust
//! core; everything that dials a node over gRPC lives here.

pub mod verify;

pub use verify::{verify_cluster, VerifyError};
