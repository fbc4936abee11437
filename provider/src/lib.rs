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
