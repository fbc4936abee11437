//! `terraform-provider-constellation`: started by Terraform, never by hand.

use std::sync::Arc;

use terraform_provider_constellation::cluster::fake::{FakeClusterBackend, FAKE_BACKEND_ENV};
use terraform_provider_constellation::cluster::local::local_backend;
use terraform_provider_constellation::{serve, ClusterBackend, ServeError};

fn backend() -> Arc<dyn ClusterBackend> {
    if std::env::var(FAKE_BACKEND_ENV).as_deref() == Ok("1") {
        tracing::warn!("using the FAKE cluster backend ({FAKE_BACKEND_ENV}=1): no real nodes");
        Arc::new(FakeClusterBackend::from_env())
    } else {
        local_backend()
    }
}

fn main() -> std::process::ExitCode {
    terraform_provider_constellation::log::init();
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
