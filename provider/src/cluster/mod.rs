//! Resource `constellation_cluster` and the backend seam behind it.

#[cfg(feature = "fake-backend")]
pub mod fake;
pub mod journal;
pub mod local;
pub mod model;
pub mod resource;

pub use model::{
    ClusterBackend, ClusterError, ClusterOutputs, ClusterReadResult, ClusterSpec, ClusterState,
    GivenSecrets, ImportId, Progress, UnhealthyNode,
};
pub use resource::ClusterResource;
