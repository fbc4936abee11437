//! `constellation-keyservice`: the key service as its own daemon (see docs/daemons/keyservice.md).

use std::process::ExitCode;

use clap::Parser;
use constellation_daemon::{health, reload, shutdown};
use constellation_keyservice::config::{load_material, Cli, Config};
use constellation_keyservice::kmsplugin::{serve_unix, KmsV2Plugin};
use constellation_keyservice::KeyService;

fn main() -> ExitCode {
    constellation_daemon::main(
        "constellation-keyservice",
        "key service",
        Cli::parse().resolve(),
        |config| config.daemon.log_format,
        |config| async { run(config).await.map_err(|e| format!("{e:#}")) },
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let health = health::Health::new("master secret and TLS credentials not loaded yet");
    let health_listener = health::bind(config.daemon.health_listen).await?;
    tokio::spawn(health::serve(health_listener, health.clone()));
    let shutdown = shutdown::on_signal(health.clone())?;
    tracing::info!(listen = %config.listen, health = %config.daemon.health_listen,
        state_dir = %config.state_dir.display(), kms_socket = ?config.kms_socket, backend = ?config.backend, "key service starting");

    let stop = shutdown.clone();
    let Some(material) = reload::until_loaded(
        "master secret and TLS credentials",
        config.daemon.reload_interval,
        || stop.begun(),
        || load_material(&config.state_dir, &config.backend),
    )
    .await
    else {
        return Ok(());
    };
    let kms_plugin = match &config.kms_socket {
        Some(path) => Some((path.clone(), KmsV2Plugin::new(&material.master)?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let key_service = constellation_keyservice::serve(
        listener,
        material.tls,
        KeyService::new(material.master),
        shutdown.clone().wait(),
    );
    let wait = shutdown.clone();
    let servers = async move {
        let kms = async {
            if let Some((path, plugin)) = kms_plugin {
                if let Err(e) = serve_unix(&path, plugin, wait.wait()).await {
                    tracing::error!(error = %e, "KMS v2 plugin stopped");
                }
            }
        };
        let keys = async {
            if let Err(e) = key_service.await {
                tracing::error!(error = %e, "key service stopped");
            }
        };
        tokio::join!(keys, kms);
    };
    health.set_ready();
    shutdown::drain(shutdown, config.daemon.shutdown_grace, servers).await;
    tracing::info!("key service stopped");
    Ok(())
}
