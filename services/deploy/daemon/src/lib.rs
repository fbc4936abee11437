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
