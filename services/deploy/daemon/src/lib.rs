//! What the three service daemons (`constellation-joinservice`, `constellation-keyservice`,
//! `constellation-verify`) share, so each `main.rs` only wires its service:
//!
//! - [`config`]: a YAML/JSON config file whose every field a flag can override, resolved into a
//!   typed config; errors name the field ([`config::ConfigError`]).
//! - [`settings`]: the settings every daemon has (health address, log format, shutdown grace,
//!   reload interval).
//! - [`logging`]: tracing to stderr, text or JSON.
//! - [`health`]: HTTP `/healthz` (the process serves) and `/readyz` (keys and policy loaded).
//! - [`shutdown`]: SIGTERM/SIGINT, then in-flight requests get a bounded grace period.
//! - [`reload`]: files polled by modification time (and SIGHUP) for hot reload.
//! - [`secrets`]: secret files from the state folder, refused when readable by everyone.
//! - [`tpm`]: the node's TPM-backed attestation issuer, opened with retries.
//! - [`docs`]: the configuration reference rendered from the same flag definitions.

pub mod config;
pub mod docs;
pub mod health;
pub mod logging;
pub mod reload;
pub mod secrets;
pub mod settings;
pub mod shutdown;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tpm;

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// The `main` every daemon shares: a configuration error exits 2 naming the field (before any
/// logging, on stderr), then logging starts and `run` runs on a tokio runtime; its error is
/// logged as `<what> failed` and exits 1.
pub fn main<C, E: Display, R: Display, F: Future<Output = Result<(), R>>>(
    binary: &str,
    what: &str,
    config: Result<C, E>,
    log_format: impl FnOnce(&C) -> logging::LogFormat,
    run: impl FnOnce(C) -> F,
) -> ExitCode {
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(log_format(&config));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{what} failed");
            ExitCode::FAILURE
        }
    }
}
