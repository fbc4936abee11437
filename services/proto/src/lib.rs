//! Generated gRPC code, one module per protocol (see `proto/`).
//! Every request carries a `version` so later changes stay compatible.

/// The protocol version these messages describe.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protobuf runtime of the generated messages, for encoding them outside gRPC (e.g. status
/// details).
pub use prost;

#[allow(clippy::all, missing_docs)]
pub mod init {
    tonic::include_proto!("constellation.init.v1");
}
#[allow(clippy::all, missing_docs)]
pub mod join {
    tonic::include_proto!("constellation.join.v1");
}
#[allow(clippy::all, missing_docs)]
pub mod keyservice {
    tonic::include_proto!("constellation.keyservice.v1");
}
#[allow(clippy::all, missing_docs)]
pub mod verify {
    tonic::include_proto!("constellation.verify.v1");
}
#[allow(clippy::all, missing_docs)]
pub mod recover {
    tonic::include_proto!("constellation.recover.v1");
}
/// The Kubernetes KMS v2 plugin API, byte-compatible with `k8s.io/kms/apis/v2` (package `v2`).
#[allow(clippy::all, missing_docs)]
pub mod kmsv2 {
    tonic::include_proto!("v2");
}
