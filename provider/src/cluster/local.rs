//! The local-platform backend (node processes with swtpm TPMs). The wiring point: main.rs
//! calls [`local_backend`]; until the real backend lands, every operation fails with a clear
//! error instead of pretending.

use std::sync::Arc;

use super::model::*;

/// The backend for `platform = "local"`.
pub fn local_backend() -> Arc<dyn ClusterBackend> {
    Arc::new(UnavailableBackend)
}

/// Refuses every operation: the local platform backend is not implemented yet.
#[derive(Debug, Clone, Copy)]
pub struct UnavailableBackend;

const NOT_YET: &str = "local platform backend not available yet";

fn unavailable() -> ClusterError {
    ClusterError::BackendUnavailable(NOT_YET.to_owned())
}

impl ClusterBackend for UnavailableBackend {
    fn create<'a>(
        &'a self,
        _spec: &'a ClusterSpec,
        _progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async { Err(unavailable()) })
    }

    fn read<'a>(
        &'a self,
        _state: &'a ClusterState,
    ) -> BoxFuture<'a, Result<ClusterReadResult, ClusterError>> {
        Box::pin(async { Err(unavailable()) })
    }

    fn update<'a>(
        &'a self,
        _prior: &'a ClusterState,
        _spec: &'a ClusterSpec,
        _progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<ClusterState, ClusterError>> {
        Box::pin(async { Err(unavailable()) })
    }

    fn delete<'a>(
        &'a self,
        _state: &'a ClusterState,
        _progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async { Err(unavailable()) })
    }

    fn import(&self, _id: &ImportId) -> Result<ClusterState, ClusterError> {
        Err(unavailable())
    }
}
