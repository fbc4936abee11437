//! Settings every daemon has, under `daemon:` in its config file.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{invalid, ConfigError};
use crate::logging::LogFormat;

/// `daemon:` section of a config file; each field is also a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettingsFile {
    /// Address of the HTTP health server (`/healthz`, `/readyz`).
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// Log format: `text` or `json`.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Seconds in-flight requests get to finish after SIGTERM before the daemon exits (1..=300).
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Milliseconds between checks of the reloadable files (and of keys not yet present) (100..=60000).
    #[arg(long, value_name = "MS")]
    pub reload_interval_ms: Option<u64>,
}

/// Resolved [`DaemonSettingsFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    pub health_listen: SocketAddr,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub reload_interval: Duration,
}

impl DaemonSettingsFile {
    /// `flags` over `self`.
    pub fn overlay(self, flags: Self) -> Self {
        crate::overlay!(self, flags; health_listen, log_format, shutdown_grace_secs, reload_interval_ms)
    }

    /// Defaults and range checks; `default_health` is the daemon's own health port.
    pub fn resolve(self, default_health: SocketAddr) -> Result<DaemonSettings, ConfigError> {
        let grace = self.shutdown_grace_secs.unwrap_or(10);
        if !(1..=300).contains(&grace) {
            return Err(invalid(
                "daemon.shutdown_grace_secs",
                grace,
                "must be within 1..=300",
            ));
        }
        let reload = self.reload_interval_ms.unwrap_or(1000);
        if !(100..=60_000).contains(&reload) {
            return Err(invalid(
                "daemon.reload_interval_ms",
                reload,
                "must be within 100..=60000",
            ));
        }
        Ok(DaemonSettings {
            health_listen: self.health_listen.unwrap_or(default_health),
            log_format: self.log_format.unwrap_or_default(),
            shutdown_grace: Duration::from_secs(grace),
            reload_interval: Duration::from_millis(reload),
        })
    }
}
