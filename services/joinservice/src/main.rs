//! `constellation-joinservice`: the join service as its own daemon (see docs/daemons/joinservice.md).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use constellation_attestation::{atls, Issuer as _, SystemClock};
use constellation_common::limits::ListenerLimits;
use constellation_daemon::{health, reload, shutdown, tpm};
use constellation_joinservice::attested_peer::AttestedPeerInterceptor;
use constellation_joinservice::config::{
    load_etcd_credentials, load_state, Cli, Config, Policy, PolicyStore, PolicyValidator,
    SharedState,
};
use constellation_joinservice::disk_bindings::DiskBindings;
use constellation_joinservice::keyclient::KeyServiceClients;
use constellation_joinservice::ticket::{JoinTicketConfig, JoinTicketIssuer};
use constellation_joinservice::token::TokenRegistry;
use constellation_joinservice::{EtcdDiskBindings, FileDiskBindings};
use constellation_store::client::DEFAULT_REQUEST_TIMEOUT;
use constellation_store::{ClientTls, JoinStateCache, Store, StoreConfig};

fn main() -> ExitCode {
    constellation_daemon::main(
        "constellation-joinservice",
        "join service",
        Cli::parse().resolve(),
        |config| config.daemon.log_format,
        |config| async { run(config).await.map_err(|e| format!("{e:#}")) },
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let health = health::Health::new("state, TPM and policy not loaded yet");
    let health_listener = health::bind(config.daemon.health_listen).await?;
    tokio::spawn(health::serve(health_listener, health.clone()));
    let shutdown = shutdown::on_signal(health.clone())?;
    tracing::info!(listen = %config.listen, health = %config.daemon.health_listen,
        state_dir = %config.state_dir.display(), cluster = %config.cluster_name,
        key_services = ?config.key_service_endpoints, "join service starting");

    let interval = config.daemon.reload_interval;
    let stop = || shutdown.begun();
    let Some(state) = reload::until_loaded(
        "cluster PKI and measurement secrets",
        interval,
        stop,
        || std::future::ready(load_state(&config.state_dir, &config.cluster_name)),
    )
    .await
    else {
        return Ok(());
    };
    // The key service's master material this node holds (none on a control plane that joined
    // before control planes got it): handed to joining control planes. Never logged.
    let Some(master_material) =
        reload::until_loaded("key service master material", interval, stop, || {
            std::future::ready(
                constellation_keyservice::master_material_files(&config.state_dir)
                    .map_err(|e| e.to_string()),
            )
        })
        .await
    else {
        return Ok(());
    };
    tracing::info!(
        files = master_material.len(),
        "key service master material for joining control planes"
    );
    let Some(issuer) = reload::until_loaded("TPM", interval, stop, || {
        std::future::ready(tpm::open_issuer(&config.tcti))
    })
    .await
    else {
        return Ok(());
    };
    let Some((store, disks)) = shared_state(&config, stop).await? else {
        return Ok(());
    };
    let clock = Arc::new(SystemClock);
    let pki = Arc::new(state.pki);
    let keys = KeyServiceClients::new(
        &pki,
        &config.node_name,
        config.node_ip,
        clock.as_ref(),
        config.key_service_endpoints.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let tickets = JoinTicketIssuer::new(
        Arc::new(keys),
        store.clone(),
        disks,
        pki,
        Arc::new(TokenRegistry::default()),
        clock,
        JoinTicketConfig {
            measurement_salt: state.measurement_salt,
            measurement_secret: state.measurement_secret,
            api_server_endpoint: config.api_server_endpoint.clone(),
            kubernetes_version: config.kubernetes_version.clone(),
            token_ttl: config.token_ttl,
        },
    )
    .with_master_material(master_material);
    let validator = PolicyValidator {
        store: store.clone(),
        variant: issuer.variant(),
    };
    tracing::info!(variant = %validator.variant, "attestation variant detected from the platform");
    let atls_config = atls::ServerConfig::mutual(Arc::new(issuer), Arc::new(validator))?
        .with_limits(ListenerLimits::default());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let lookup = store.clone();
    let server = constellation_joinservice::server::serve(
        listener,
        atls_config,
        tickets,
        AttestedPeerInterceptor::new(move |ak| lookup.node_for(ak)),
        shutdown.clone().wait(),
    );
    tracing::info!(listen = %config.listen, "join service listening (mutual aTLS)");
    health.set_ready();
    let served = async {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "join service transport failed");
        }
    };
    shutdown::drain(shutdown.clone(), config.daemon.shutdown_grace, served).await;
    tracing::info!("join service stopped");
    Ok(())
}

/// The policy (kept current) and the disk bindings, from etcd or from files
/// ([`SharedState`]); `None` when shutdown began before they loaded.
async fn shared_state(
    config: &Config,
    stop: impl Fn() -> bool,
) -> anyhow::Result<Option<(Arc<PolicyStore>, Arc<dyn DiskBindings>)>> {
    let interval = config.daemon.reload_interval;
    match &config.shared {
        SharedState::Files {
            measurements_file,
            nodes_file,
            disk_bindings_dir,
        } => {
            let (measurements_file, nodes_file) = (measurements_file.clone(), nodes_file.clone());
            let Some(policy) =
                reload::until_loaded("measurements and node directory", interval, &stop, || {
                    std::future::ready(Policy::load(&measurements_file, &nodes_file))
                })
                .await
            else {
                return Ok(None);
            };
            tracing::info!(policy = %policy.describe(), "policy loaded from files");
            let store = Arc::new(PolicyStore::new(policy));
            let reloading = store.clone();
            reload::spawn(
                "measurements and node directory",
                vec![measurements_file.clone(), nodes_file.clone()],
                interval,
                move || {
                    let policy = Policy::load(&measurements_file, &nodes_file)?;
                    let loaded = policy.describe();
                    reloading.replace(policy);
                    Ok(loaded)
                },
            )?;
            let disks = FileDiskBindings::open(disk_bindings_dir)
                .map_err(|e| anyhow::anyhow!("disk_bindings_dir: {e}"))?;
            Ok(Some((store, Arc::new(disks))))
        }
        SharedState::Etcd { endpoints } => {
            let state_dir = config.state_dir.clone();
            let Some(credentials) =
                reload::until_loaded("etcd client TLS files", interval, &stop, || {
                    std::future::ready(load_etcd_credentials(&state_dir))
                })
                .await
            else {
                return Ok(None);
            };
            let store_config = StoreConfig {
                endpoints: endpoints.clone(),
                tls: ClientTls { credentials },
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
            };
            // Ready only once the store answered: the first read of the join state.
            let Some((cache, store)) =
                reload::until_loaded("etcd join state", interval, &stop, || {
                    let store_config = store_config.clone();
                    async move {
                        let store = Store::connect(&store_config)
                            .await
                            .map_err(|e| e.to_string())?;
                        let cache = JoinStateCache::start(store.clone())
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((cache, store))
                    }
                })
                .await
            else {
                return Ok(None);
            };
            let Some(policy) =
                reload::until_loaded("measurements and node directory", interval, &stop, || {
                    std::future::ready(Policy::from_store(&cache.snapshot()))
                })
                .await
            else {
                return Ok(None);
            };
            tracing::info!(policy = %policy.describe(), endpoints = ?endpoints,
                "policy loaded from etcd");
            let policies = Arc::new(PolicyStore::new(policy));
            tokio::spawn(follow_store(cache, policies.clone()));
            Ok(Some((policies, Arc::new(EtcdDiskBindings::new(store)))))
        }
    }
}

/// Swaps the policy whenever the watched etcd view changes; a version that does not make a
/// policy (no valid measurements, a bad pinned key) is refused and the previous one kept, as a
/// bad policy file is.
async fn follow_store(cache: JoinStateCache, policies: Arc<PolicyStore>) {
    let mut revisions = cache.subscribe();
    let mut last = policies.current().describe();
    while revisions.changed().await.is_ok() {
        let state = cache.snapshot();
        match Policy::from_store(&state) {
            Ok(policy) => {
                let now = policy.describe();
                if now != last {
                    tracing::info!(policy = %now, revision = state.revision, "policy reloaded from etcd");
                    last = now;
                }
                policies.replace(policy);
            }
            Err(reason) => {
                tracing::warn!(%reason, revision = state.revision, "etcd policy refused; the previous one stays");
            }
        }
    }
}
