//! Generated gRPC code, one module per protocol (see `proto/`).
//! Every request carries a `version` so later changes stay compatible.

/// The protocol version these messages describe.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protobuf runtime of the generated messages, for encoding them outside gRPC (e.g. status
/// details).
pub use prost;

/// The generated modules nest like their protobuf packages, so a message of one protocol can
/// name another's (Recover carries Init's `KmipKms`).
#[allow(clippy::all, missing_docs)]
pub mod constellation {
    pub mod init {
        pub mod v1 {
            tonic::include_proto!("constellation.init.v1");
        }
    }
    pub mod join {
        pub mod v1 {
            tonic::include_proto!("constellation.join.v1");
        }
    }
    pub mod keyservice {
        pub mod v1 {
            tonic::include_proto!("constellation.keyservice.v1");
        }
    }
    pub mod verify {
        pub mod v1 {
            tonic::include_proto!("constellation.verify.v1");
        }
    }
    pub mod recover {
        pub mod v1 {
            tonic::include_proto!("constellation.recover.v1");
        }
    }
}
pub use constellation::{
    init::v1 as init, join::v1 as join, keyservice::v1 as keyservice, recover::v1 as recover,
    verify::v1 as verify,
};

/// The Kubernetes KMS v2 plugin API, byte-compatible with `k8s.io/kms/apis/v2` (package `v2`).
#[allow(clippy::all, missing_docs)]
pub mod kmsv2 {
    tonic::include_proto!("v2");
}
