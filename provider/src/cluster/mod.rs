//! Resource `constellation_cluster` and the backend seam behind it.

pub mod attributes;
mod boot_progress;
pub mod codec;
#[cfg(feature = "fake-backend")]
pub mod fake;
mod initialize;
mod join_wait;
pub mod journal;
pub mod local_backend;
pub mod model;
mod node_checks;
mod reconcile;
mod recovery;
pub mod resource;
pub mod upgrade;

pub use model::{
    ClusterBackend, ClusterError, ClusterOutputs, ClusterReadResult, ClusterSpec, ClusterState,
    GivenSecrets, ImportId, Progress, UnhealthyNode,
};
pub use resource::ClusterResource;
