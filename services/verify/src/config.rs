//! The configuration of `constellation-verify`: a YAML/JSON file whose every field is also a
//! flag (flags win). The verification service holds no secrets.

use std::net::SocketAddr;
use std::path::PathBuf;

use constellation_common::metadata::ports;
use constellation_daemon::config::{load_file, ConfigError};
use constellation_daemon::settings::{DaemonSettings, DaemonSettingsFile};
use serde::{Deserialize, Serialize};

/// Default TPM: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The config file's fields (all optional; see [`Config`] for the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address of the verification service (gRPC GetAttestation, plaintext: the evidence is bound to the caller's nonce). Default 0.0.0.0:30081.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// TPM to attest with, as a TCTI string (device:/dev/tpmrm0, swtpm:host=H,port=P). Default device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    #[command(flatten)]
    #[serde(default)]
    pub daemon: DaemonSettingsFile,
}

/// `constellation-verify --help`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "constellation-verify",
    version,
    about = "Constellation verification service: answers GetAttestation(nonce, user data) with this node's TPM attestation bound to both",
    long_about = None,
    after_help = "Health: GET /healthz (alive) and /readyz (TPM opened and attestation key loaded, service listening) on --health-listen.\nSignals: SIGTERM/SIGINT drain in-flight requests for --shutdown-grace-secs, then exit 0."
)]
pub struct Cli {
    /// Config file (YAML or JSON) with the fields below; flags override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: ConfigFile,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub tcti: String,
    pub daemon: DaemonSettings,
}

impl Cli {
    /// The config file with the flags over it, checked.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file: ConfigFile = load_file(self.config.as_deref())?;
        file.overlay(self.overrides).resolve()
    }
}

impl ConfigFile {
    pub fn overlay(self, flags: Self) -> Self {
        let daemon = self.daemon.clone().overlay(flags.daemon.clone());
        let mut merged = constellation_daemon::overlay!(self, flags; listen, tcti);
        merged.daemon = daemon;
        merged
    }

    pub fn resolve(self) -> Result<Config, ConfigError> {
        let tcti = self.tcti.unwrap_or_else(|| DEFAULT_TCTI.to_owned());
        if tcti.trim().is_empty() {
            return Err(constellation_daemon::config::invalid(
                "tcti",
                &tcti,
                "must name a TPM",
            ));
        }
        Ok(Config {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ports::VERIFY))),
            tcti,
            daemon: self
                .daemon
                .resolve(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT)))?,
        })
    }

    /// A complete example (the documented one).
    pub fn example() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], ports::VERIFY))),
            tcti: Some(DEFAULT_TCTI.to_owned()),
            daemon: DaemonSettingsFile {
                health_listen: Some(SocketAddr::from(([0, 0, 0, 0], HEALTH_PORT))),
                log_format: Some(constellation_daemon::logging::LogFormat::Json),
                shutdown_grace_secs: Some(10),
                reload_interval_ms: Some(1000),
            },
        }
    }
}

/// Default port of the health server.
pub const HEALTH_PORT: u16 = 30082;
