//! Terraform provider `edgelesssys/constellation` (plugin protocol 6 over tonic).
//!
//! Layers: [`value`] (cty values ⇄ msgpack/JSON), [`schema`], [`diag`], [`decode`] (typed
//! inputs with per-attribute diagnostics), [`plan`] (schema-driven plan rules), the
//! [`resource::Resource`] interface, the gRPC [`server`] and the go-plugin handshake in
//! [`plugin`]. Resources: [`image`] and [`cluster`];
//! data source: [`attestation_data`].

use std::sync::Arc;

pub mod attestation_data;
pub mod cluster;
pub mod decode;
pub mod diag;
pub mod image;
pub mod log;
pub mod plan;
pub mod plugin;
pub mod provider_config;
pub mod resource;
pub mod schema;
pub mod server;
pub mod value;

/// Generated tfplugin6 messages and the `Provider` service.
#[allow(clippy::all, missing_docs)]
pub mod tfplugin6 {
    tonic::include_proto!("tfplugin6");
}

/// Generated go-plugin `GRPCController` service.
#[allow(clippy::all, missing_docs)]
pub mod go_plugin {
    tonic::include_proto!("plugin");
}

pub use cluster::model::ClusterBackend;
pub use plugin::ServeError;

/// Serves the provider with `backend` behind `constellation_cluster`, until Terraform
/// shuts the plugin down.
pub async fn serve(backend: Arc<dyn ClusterBackend>) -> Result<(), ServeError> {
    plugin::serve_resources(
        vec![
            Arc::new(image::ImageResource::new()),
            Arc::new(cluster::ClusterResource::new(backend)),
        ],
        vec![Arc::new(attestation_data::AttestationDataSource::new())],
    )
    .await
}

/// A provider binary's whole life: logging, the runtime, [`serve`] with the backend `backend`
/// makes, and the exit code. The real binary passes the local backend; the acceptance tests'
/// fake-provider binary passes the fake.
pub fn run(backend: impl FnOnce() -> Arc<dyn ClusterBackend>) -> std::process::ExitCode {
    log::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(serve(backend()));
    // Terraform waits for the plugin process to exit after Shutdown (three times per plan):
    // do not wait for idle runtime threads to wind down.
    runtime.shutdown_background();
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(ServeError::NotLaunchedByTerraform) => {
            eprintln!("{}", ServeError::NotLaunchedByTerraform);
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            // Display only: no backtrace, whatever RUST_BACKTRACE says.
            tracing::error!("{e}");
            eprintln!("terraform-provider-constellation: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
