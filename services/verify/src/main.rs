//! `constellation-verify`: the verification service as its own daemon (see docs/daemons/verify.md).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use constellation_common::limits::ListenerLimits;
use constellation_daemon::{health, reload, shutdown, tpm};
use constellation_verify::config::{Cli, Config};

fn main() -> ExitCode {
    constellation_daemon::main(
        "constellation-verify",
        "verification service",
        Cli::parse().resolve(),
        |config| config.daemon.log_format,
        |config| async { run(config).await.map_err(|e| format!("{e:#}")) },
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let health = health::Health::new("TPM not opened yet");
    let health_listener = health::bind(config.daemon.health_listen).await?;
    tokio::spawn(health::serve(health_listener, health.clone()));
    let shutdown = shutdown::on_signal(health.clone())?;
    tracing::info!(listen = %config.listen, health = %config.daemon.health_listen, tcti = %config.tcti, "verification service starting");

    let stop = shutdown.clone();
    let Some(issuer) = reload::until_loaded(
        "TPM",
        config.daemon.reload_interval,
        || stop.begun(),
        || std::future::ready(tpm::open_issuer(&config.tcti)),
    )
    .await
    else {
        return Ok(());
    };
    let ak = issuer.ak_public().map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, ak_fingerprint = %hex::encode(ak.fingerprint()), "verification service listening");
    health.set_ready();
    let server = constellation_verify::serve(
        listener,
        Arc::new(issuer),
        ListenerLimits::default(),
        shutdown.clone().wait(),
    );
    let served = async {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "verification service transport failed");
        }
    };
    shutdown::drain(shutdown, config.daemon.shutdown_grace, served).await;
    tracing::info!("verification service stopped");
    Ok(())
}
