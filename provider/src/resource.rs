//! The interface every managed resource implements; the gRPC server dispatches to it.

use std::future::Future;
use std::pin::Pin;

use crate::diag::Diagnostics;
use crate::plan::Planned;
use crate::provider_config::ProviderConfig;
use crate::schema::Block;
use crate::value::Value;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A state (and the provider's private bytes) after apply, read or import.
#[derive(Debug, Clone, Default)]
pub struct StateOutcome {
    /// Null when the object no longer exists (Terraform then plans to create it).
    pub state: Value,
    pub private: Vec<u8>,
    pub warnings: Diagnostics,
}

/// The request of one PlanResourceChange call, decoded.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    pub prior: &'a Value,
    pub proposed: &'a Value,
    pub config: &'a Value,
}

/// The request of one ApplyResourceChange call, decoded. A null `planned` means delete.
#[derive(Debug, Clone, Copy)]
pub struct ApplyRequest<'a> {
    pub prior: &'a Value,
    pub planned: &'a Value,
    pub config: &'a Value,
    pub private: &'a [u8],
}

pub trait Resource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> &Block;
    /// Checks the configuration; unknown values are skipped.
    fn validate(&self, config: &Value) -> Diagnostics;
    fn plan(&self, req: PlanRequest<'_>) -> Result<Planned, Diagnostics>;
    fn apply<'a>(
        &'a self,
        req: ApplyRequest<'a>,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>>;
    fn read<'a>(
        &'a self,
        current: &'a Value,
        private: &'a [u8],
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>>;
    /// Builds the state from an import ID; any folder it reads must pass
    /// [`ProviderConfig::check_import_folder`].
    fn import<'a>(
        &'a self,
        id: &'a str,
        provider: &'a ProviderConfig,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>>;
}

/// A data source: read-only, computed from its configuration.
pub trait DataSource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> &Block;
    fn validate(&self, config: &Value) -> Diagnostics;
    fn read(&self, config: &Value) -> Result<Value, Diagnostics>;
}
