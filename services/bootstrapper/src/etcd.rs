//! The control plane's etcd member, run by the node's [`Supervisor`]: the first control plane
//! creates a one-member cluster at Init; a control plane that joins is added as a learner through
//! the members already running, started with the member list etcd returned, and promoted once it
//! caught up; Recover (and a rejoin after a restart) starts the member its data directory holds;
//! a deleted control plane's member is removed. Certificates come from the cluster PKI's etcd CA
//! (every control plane holds it from Init or its join ticket); the data directory is
//! `etcd/data` (0700) in the node's state folder.
//!
//! Once its member runs, every control plane reconciles ([`spawn_reconciler`]): it publishes the
//! platform metadata's accepted measurements and node directory into etcd (only what changed),
//! which the join services follow with a watch, and removes the members of control planes the
//! platform no longer lists (never its own; a control plane that is listed but down keeps its
//! member, so a restart finds its place).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::measurements::AcceptedMeasurements;
use constellation_common::metadata::{NodeInfo, Role};
use constellation_store::keys::{self, NodeRecord};

use constellation_attestation::Clock;
use constellation_joinservice::pki::PkiError;
use constellation_joinservice::ClusterPki;
use constellation_store::client::{StoreConfig, DEFAULT_REQUEST_TIMEOUT};
use constellation_store::member::{
    create_private_dir, LaunchError, MemberTlsFiles, CLIENT_PORT, DEFAULT_ETCD_BINARY,
    METRICS_PORT, PEER_PORT,
};
use constellation_store::EtcdCredentials;
use constellation_store::{ClientTls, ClusterState, MemberConfig, Store, StoreError};

use crate::supervisor::{DaemonFile, DaemonSpec, Probe, Supervisor, SupervisorError};

/// The etcd member's daemon name (status, pid and log files).
pub const ETCD: &str = constellation_common::node_status::ETCD_DAEMON;

/// Why this node's etcd member could not be started, joined or removed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd certificates: {0}")]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the etcd server binary {0:?} is not on PATH (Debian package etcd-server)")]
    MissingBinary(String),
    #[error("no etcd member of the cluster lists node {0:?}")]
    UnknownMember(String),
    #[error("metadata: {0}")]
    Metadata(#[from] constellation_common::metadata::MetadataError),
    #[error("this node runs no supervised daemons (not a control plane)")]
    NotAControlPlane,
    #[error("etcd learner {0} was not promoted in time (it keeps replicating; the other control planes promote it once it caught up)")]
    NotPromoted(String),
}

/// This control plane's member: who it is and where it keeps its state.
#[derive(Debug, Clone)]
pub struct LocalMember {
    pub node_name: String,
    pub ip: IpAddr,
    pub state_dir: PathBuf,
    /// Keeps members of different clusters apart (the cluster name).
    pub cluster_token: String,
}

impl LocalMember {
    fn config(&self, binary: PathBuf) -> MemberConfig {
        MemberConfig {
            name: self.node_name.clone(),
            state_dir: self.state_dir.clone(),
            client_addr: SocketAddr::new(self.ip, CLIENT_PORT),
            peer_addr: SocketAddr::new(self.ip, PEER_PORT),
            metrics_addr: Some(SocketAddr::new(self.ip, METRICS_PORT)),
            initial_cluster: Vec::new(),
            cluster_state: ClusterState::New,
            cluster_token: self.cluster_token.clone(),
            binary,
        }
    }

    /// A client of `endpoints` with a fresh client certificate of this node.
    pub async fn client(
        &self,
        pki: &ClusterPki,
        clock: &dyn Clock,
        endpoints: Vec<String>,
    ) -> Result<Store, EtcdError> {
        let credentials = pki.etcd_client_cert(&self.node_name, clock)?;
        Ok(Store::connect(&StoreConfig {
            endpoints,
            tls: ClientTls { credentials },
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
        .await?)
    }
}

/// The client URL of the member on the control plane at `ip`.
pub fn client_url(ip: IpAddr) -> String {
    format!("https://{}", SocketAddr::new(ip, CLIENT_PORT))
}

/// `etcd` from `PATH`, as an absolute path (the supervisor runs binaries by path).
fn etcd_binary() -> Result<PathBuf, EtcdError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(DEFAULT_ETCD_BINARY))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| EtcdError::MissingBinary(DEFAULT_ETCD_BINARY.to_owned()))
}

/// The member as a supervised daemon: its TLS files are written (0600) before every start, and
/// it is ready when etcd's `/health` answers 200 (it has a leader).
fn daemon_spec(config: &MemberConfig, credentials: &EtcdCredentials) -> DaemonSpec {
    let tls_dir = config.tls_dir();
    let tls = MemberTlsFiles {
        ca: tls_dir.join("ca.crt"),
        cert: tls_dir.join("member.crt"),
        key: tls_dir.join("member.key"),
    };
    let files = vec![
        DaemonFile::bytes(&tls.ca, credentials.ca_cert_pem.as_bytes()),
        DaemonFile::bytes(&tls.cert, credentials.cert_pem.as_bytes()),
        DaemonFile::bytes(&tls.key, credentials.key_pem.expose()),
    ];
    let probe = match config.metrics_addr {
        Some(addr) => Probe::Http {
            addr,
            path: "/health".to_owned(),
        },
        None => Probe::Running,
    };
    DaemonSpec {
        name: ETCD.to_owned(),
        program: config.binary.clone(),
        args: config.args(&tls),
        files,
        probe,
        log: config.log_path(),
    }
}

fn start(
    supervisor: &Supervisor,
    config: &MemberConfig,
    pki: &ClusterPki,
    clock: &dyn Clock,
) -> Result<(), EtcdError> {
    let credentials = pki.etcd_member_cert(&config.name, &[config.client_addr.ip()], clock)?;
    create_private_dir(&config.data_dir())?;
    supervisor.start(daemon_spec(config, &credentials))?;
    Ok(())
}

/// Whether this node's member has been started before (its data directory holds a member): a
/// restarted control plane starts it again as it was, whatever the cluster state says.
fn has_data(state_dir: &Path) -> bool {
    state_dir.join("etcd/data/member").is_dir()
}

/// Init: starts this control plane's member as a new one-member cluster (or, after a restart,
/// the member its data directory holds).
pub fn start_first_member(
    supervisor: &Supervisor,
    me: &LocalMember,
    pki: &ClusterPki,
    clock: &dyn Clock,
) -> Result<(), EtcdError> {
    let mut config = me.config(etcd_binary()?);
    config.initial_cluster = vec![(config.name.clone(), config.peer_url())];
    start(supervisor, &config, pki, clock)
}

/// A control plane that joined: adds its member through the members at `existing` (the other
/// control planes' client URLs) as a learner, starts it, and promotes it once caught up. A
/// restarted control plane whose data directory holds its member just starts it again.
///
/// The other control planes are asked one at a time (a listed control plane may not run its
/// member yet, or be down), round after round until [`JOIN_WITHIN`]: a member change is not
/// repeated blindly through a balancing client, which may send it to a member that is gone.
pub async fn join_member(
    supervisor: &Supervisor,
    me: &LocalMember,
    existing: Vec<String>,
    pki: &ClusterPki,
    clock: &dyn Clock,
) -> Result<(), EtcdError> {
    let mut config = me.config(etcd_binary()?);
    if has_data(&me.state_dir) {
        config.cluster_state = ClusterState::Existing;
        return start(supervisor, &config, pki, clock);
    }
    let deadline = std::time::Instant::now() + JOIN_WITHIN;
    let (id, members) = 'added: loop {
        let mut last = None;
        for endpoint in &existing {
            let added = match me.client(pki, clock, vec![endpoint.clone()]).await {
                Ok(store) => store
                    .add_learner(&config.peer_url())
                    .await
                    .map_err(EtcdError::from),
                Err(e) => Err(e),
            };
            match added {
                Ok(added) => break 'added added,
                // Unreachable, or a member that cannot take member changes (a learner that is
                // still catching up): the next one.
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "etcd member did not add this one; trying the next");
                    last = Some(e);
                }
            }
        }
        let error = last.unwrap_or_else(|| EtcdError::UnknownMember(me.node_name.clone()));
        if std::time::Instant::now() >= deadline {
            return Err(error);
        }
        tracing::info!(error = %error, "no etcd member took this control plane yet; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    config.initial_cluster = members
        .iter()
        .filter_map(|m| {
            let url = m.peer_urls.first()?.clone();
            // The new member has no name until it starts.
            let name = if m.id == id {
                config.name.clone()
            } else {
                m.name.clone()
            };
            Some((name, url))
        })
        .collect();
    config.cluster_state = ClusterState::Existing;
    start(supervisor, &config, pki, clock)?;
    // Promoted through whichever member takes it (etcd promotes only once the learner caught
    // up; the other control planes' reconcilers promote it too).
    let id_hex = format!("{id:x}");
    let deadline = std::time::Instant::now() + constellation_store::member::PROMOTE_WITHIN;
    loop {
        for endpoint in existing.iter().chain(std::iter::once(&config.client_url())) {
            let Ok(store) = me.client(pki, clock, vec![endpoint.clone()]).await else {
                continue;
            };
            if let Ok(members) = store.members().await {
                if members.iter().any(|m| m.id == id && !m.is_learner) {
                    tracing::info!(member = %config.name, id = %id_hex, "etcd member joined and promoted");
                    return Ok(());
                }
            }
            match store.promote(id, std::time::Instant::now()).await {
                Ok(()) => {
                    tracing::info!(member = %config.name, id = %id_hex, "etcd member joined and promoted");
                    return Ok(());
                }
                Err(e) => tracing::debug!(%endpoint, error = %e, "learner not promoted yet"),
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(EtcdError::NotPromoted(id_hex));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long a joining control plane keeps asking the others to add its member.
pub const JOIN_WITHIN: Duration = Duration::from_secs(60);

/// A deleted control plane: removes the member named `node_name` through `store`.
pub async fn remove_member(store: &Store, node_name: &str) -> Result<(), EtcdError> {
    let member = store
        .members()
        .await?
        .into_iter()
        .find(|m| m.name == node_name)
        .ok_or_else(|| EtcdError::UnknownMember(node_name.to_owned()))?;
    store.remove_member(member.id).await?;
    Ok(())
}

/// How long Init waits for the first member to be ready.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long a member restarted from its data directory is waited for.
const RESTARTED_READY_WITHIN: Duration = Duration::from_secs(3);

/// Whether this node's etcd member runs and etcd reports it healthy (it has a leader).
pub fn member_ready(supervisor: &Supervisor) -> bool {
    supervisor
        .health()
        .iter()
        .any(|h| h.name == ETCD && h.is_ready())
}

/// How this node's member comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStart {
    /// Init: a new one-member cluster.
    Init,
    /// Recover, or a restart: the member in the data directory, or (none yet) a new learner
    /// added through the other control planes' members in the background (they may be down).
    Existing,
    /// A control-plane join (a join service just bound this node's disk, so the cluster has
    /// quorum): the member in the data directory, or a new learner added and promoted before
    /// this returns, so the node's join service listens only once its member votes.
    Join,
}

/// How often each control plane publishes the metadata's policy into etcd (a write only when it
/// changed): a node the platform just added can join after at most this plus the watch.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// How often each control plane compares etcd's members with the platform's control planes.
pub const MEMBER_RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// The client URLs of the other control planes the platform lists (their members, if they run).
fn other_control_planes(node: &crate::context::NodeContext) -> Result<Vec<String>, EtcdError> {
    Ok(node
        .metadata
        .cluster()?
        .nodes
        .iter()
        .filter(|n| n.role == Role::ControlPlane && n.name != node.name)
        .map(|n| client_url(n.ip))
        .collect())
}

/// Starts (or joins) this control plane's member under the node's supervisor, waits for it to
/// be ready (saying so), connects the node's client to every control plane's member (its own
/// first) and starts the reconciler. Returns the client and the endpoints it uses.
///
/// A member that must be added through the other control planes (a control-plane join, or
/// Recover of one whose member never started) is added in the background: the other members
/// may be down (a whole control plane restarting), and neither the join nor Recover may wait
/// for them; the join service's endpoints name the other members anyway.
pub async fn start_member(
    node: &Arc<crate::context::NodeContext>,
    pki: &ClusterPki,
    cluster_name: &str,
    how: MemberStart,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<Vec<String>, EtcdError> {
    let me = node.metadata.self_info()?;
    let mut endpoints = vec![client_url(me.ip)];
    endpoints.extend(other_control_planes(node)?);
    let background = how == MemberStart::Existing
        && !has_data(&node.state_dir)
        && endpoints.len() > 1
        && node.shared.etcd().is_none();
    if !background {
        start_member_now(node, pki, cluster_name, how, say).await?;
        return Ok(endpoints);
    }
    let (node, cluster_name) = (node.clone(), cluster_name.to_owned());
    tokio::spawn(async move {
        let pki = match ClusterPki::load_from_dir(&node.state_dir.join("pki"), &cluster_name) {
            Ok(pki) => pki,
            Err(e) => {
                tracing::error!(error = %e, "etcd member not added");
                return;
            }
        };
        let say = |m: String| tracing::info!("{m}");
        if let Err(e) = start_member_now(&node, &pki, &cluster_name, how, &say).await {
            tracing::error!(error = %e, "etcd member not added");
        }
    });
    Ok(endpoints)
}

async fn start_member_now(
    node: &Arc<crate::context::NodeContext>,
    pki: &ClusterPki,
    cluster_name: &str,
    how: MemberStart,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), EtcdError> {
    let crate::context::SharedState { client, starting } = &node.shared;
    let _starting = starting.lock().await;
    if client.get().is_some() {
        return Ok(());
    }
    let supervisor = node
        .daemons
        .as_ref()
        .ok_or(EtcdError::NotAControlPlane)?
        .supervisor();
    let me = node.metadata.self_info()?;
    let member = LocalMember {
        node_name: node.name.clone(),
        ip: me.ip,
        state_dir: node.state_dir.clone(),
        cluster_token: cluster_name.to_owned(),
    };
    let others = other_control_planes(node)?;
    let clock = node.clock.as_ref();
    let restarted = has_data(&node.state_dir);
    match how {
        MemberStart::Init => start_first_member(supervisor, &member, pki, clock)?,
        MemberStart::Existing | MemberStart::Join if restarted || others.is_empty() => {
            // The member the data directory holds (a lone control plane without one starts a
            // cluster of its own, as Init would).
            let mut config = member.config(etcd_binary()?);
            config.cluster_state = ClusterState::Existing;
            if !restarted {
                config.cluster_state = ClusterState::New;
                config.initial_cluster = vec![(config.name.clone(), config.peer_url())];
            }
            start(supervisor, &config, pki, clock)?;
        }
        MemberStart::Existing | MemberStart::Join => {
            say(format!(
                "adding this control plane's etcd member as a learner through {others:?}"
            ));
            join_member(supervisor, &member, others.clone(), pki, clock).await?;
        }
    }
    let what = match (how, restarted) {
        (MemberStart::Init, _) => "started a new etcd cluster",
        (_, true) => "restarted the etcd member from its data directory",
        (_, false) => "joined the etcd cluster (learner, then promoted)",
    };
    let started = Instant::now();
    // A restarted member has no leader until enough members are back: it is not waited for
    // long (the join service becomes ready once the store answers).
    let within = if how != MemberStart::Init && restarted {
        RESTARTED_READY_WITHIN
    } else {
        READY_WITHIN
    };
    match supervisor.wait_ready(ETCD, within).await {
        Ok(()) => say(format!(
            "{what}: member {} on {} ready after {:?} (mutual TLS, etcd CA; data in {})",
            node.name,
            client_url(me.ip),
            started.elapsed(),
            node.state_dir.join("etcd/data").display()
        )),
        Err(e) => {
            // A restarted member without quorum has no leader until enough members return;
            // the supervisor keeps it running and the join service waits for the store.
            tracing::warn!("{e}");
            say(format!("{what}: member {} not ready yet: {e}", node.name));
        }
    }
    let mut endpoints = vec![client_url(me.ip)];
    endpoints.extend(others);
    let store = member.client(pki, clock, endpoints).await?;
    if client.set(store.clone()).is_ok() {
        spawn_reconciler(node.clone(), store);
    }
    Ok(())
}

/// A control plane that restarts with a member in its data directory starts that member at
/// boot, before it rejoins or is recovered: the other control planes may need it for quorum, and
/// without quorum no join service can bind a disk, so a cluster whose control planes all
/// restarted could not let any of them rejoin. (On the local platform the data directory and the
/// member's certificates are in the node's state folder, readable before the state disk is
/// unlocked, like the cluster PKI Recover needs.) Runs in the background; failures are logged,
/// and the join or Recover that follows starts the member again.
pub fn restart_member_at_boot(node: &Arc<crate::context::NodeContext>) {
    if !has_data(&node.state_dir) {
        return;
    }
    let record = match crate::state::ControlPlaneRecord::load(&node.state_dir) {
        Ok(Some(record)) => record,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "etcd member not restarted at boot");
            return;
        }
    };
    let node = node.clone();
    tokio::spawn(async move {
        let pki = match ClusterPki::load_from_dir(&node.state_dir.join("pki"), &record.cluster_name)
        {
            Ok(pki) => pki,
            Err(e) => {
                tracing::warn!(error = %e, "etcd member not restarted at boot");
                return;
            }
        };
        let say = |m: String| tracing::info!("{m}");
        if let Err(e) = start_member(
            &node,
            &pki,
            &record.cluster_name,
            MemberStart::Existing,
            &say,
        )
        .await
        {
            tracing::warn!(error = %e, "etcd member not restarted at boot");
        }
    });
}

/// How long a stopping control plane tries to leave the etcd cluster.
const LEAVE_WITHIN: Duration = Duration::from_millis(1500);

/// A control plane stopped gracefully (SIGTERM: the platform deletes or restarts it) leaves the
/// etcd cluster while it still can, when the members that stay keep a quorum of their own (a
/// majority of them answers with a leader); the last member, or one whose leaving would cost the
/// rest their quorum, stays. Without this, replacing the only control plane (a second one
/// joins, the first is deleted) would leave two members of which one is gone: no quorum, so not
/// even that member's removal could be committed. Returns whether it left; its data directory
/// is then useless (etcd refuses to start a removed member) and is removed after the member
/// stopped ([`forget_left_member`]), so a restart joins as a new member.
pub async fn leave_on_shutdown(node: &crate::context::NodeContext) -> bool {
    let Some(store) = node.shared.etcd() else {
        return false;
    };
    match tokio::time::timeout(LEAVE_WITHIN, leave(node, store)).await {
        Ok(Ok(left)) => left,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "stopping: the etcd member stays (could not leave)");
            false
        }
        Err(_) => {
            tracing::warn!(
                "stopping: the etcd member stays (leaving took longer than {LEAVE_WITHIN:?})"
            );
            false
        }
    }
}

async fn leave(node: &crate::context::NodeContext, store: &Store) -> Result<bool, EtcdError> {
    let members = store.members().await?;
    let Some(me) = members.iter().find(|m| m.name == node.name) else {
        return Ok(false);
    };
    let others: Vec<_> = members
        .iter()
        .filter(|m| m.id != me.id && !m.is_learner)
        .collect();
    let mut healthy = 0;
    for member in &others {
        if let Some(url) = member.client_urls.first() {
            if matches!(store.status_of(url).await, Ok((_, leader)) if leader != 0) {
                healthy += 1;
            }
        }
    }
    if others.is_empty() || healthy * 2 <= others.len() {
        tracing::info!(
            others = others.len(),
            healthy,
            "stopping: the etcd member stays (the others would have no quorum without it)"
        );
        return Ok(false);
    }
    store.remove_member(me.id).await?;
    tracing::info!(member = %node.name, "stopping: left the etcd cluster (a restart joins as a new member)");
    Ok(true)
}

/// Removes the data directory of a member that left the cluster (after it stopped).
pub fn forget_left_member(state_dir: &Path) {
    let data = state_dir.join("etcd/data");
    if let Err(e) = std::fs::remove_dir_all(&data) {
        tracing::warn!(path = %data.display(), error = %e, "the left member's data stays");
    }
}

/// What this control plane last published (the metadata's values).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    measurements: Option<String>,
    nodes: BTreeMap<String, NodeInfo>,
}

/// Publishes the metadata's policy into etcd every [`PUBLISH_INTERVAL`] (writes only on change)
/// and reconciles the members every [`MEMBER_RECONCILE_INTERVAL`], for as long as the process
/// runs.
pub fn spawn_reconciler(node: Arc<crate::context::NodeContext>, store: Store) {
    tokio::spawn(async move {
        let mut published: Option<Published> = None;
        let mut last_member_check = Instant::now();
        let mut last_error = String::new();
        loop {
            tokio::time::sleep(PUBLISH_INTERVAL).await;
            let mut result = publish(&node, &store, &mut published).await;
            if result.is_ok() && last_member_check.elapsed() >= MEMBER_RECONCILE_INTERVAL {
                last_member_check = Instant::now();
                result = reconcile_members(&node, &store).await;
            }
            match result {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        tracing::warn!(error = %text, "etcd reconcile failed; retrying");
                        last_error = text;
                    }
                }
            }
        }
    });
}

/// Writes the metadata's accepted measurements and node directory into etcd where they differ
/// from what is stored, unless they equal what this node published last.
async fn publish(
    node: &crate::context::NodeContext,
    store: &Store,
    published: &mut Option<Published>,
) -> Result<(), EtcdError> {
    let cluster = node.metadata.cluster()?;
    let now = Published {
        measurements: Some(cluster.measurements_json.clone()),
        nodes: cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect(),
    };
    if published.as_ref() == Some(&now) {
        return Ok(());
    }
    let mut wrote = 0usize;
    match AcceptedMeasurements::from_json(cluster.measurements_json.as_bytes()) {
        Ok(accepted) => {
            let stored = store.get(&keys::measurements()).await.ok().flatten();
            if stored.map(|s| s.0) != Some(accepted.clone()) {
                store.put_measurements(&accepted).await?;
                wrote += 1;
            }
        }
        Err(e) => {
            // Never published: the join services keep the last valid set.
            tracing::warn!(error = %e, "the platform's measurements are malformed; not published");
        }
    }
    let (stored, _) = store.list::<NodeRecord>(keys::NODES_PREFIX).await?;
    let stored: BTreeMap<String, NodeRecord> = stored
        .into_iter()
        .map(|(key, record)| (key[keys::NODES_PREFIX.len()..].to_owned(), record))
        .collect();
    for (name, info) in &now.nodes {
        if stored.get(name) != Some(info) {
            store.put_node(info).await?;
            wrote += 1;
        }
    }
    for name in stored.keys().filter(|n| !now.nodes.contains_key(*n)) {
        store.remove_node(name).await?;
        wrote += 1;
    }
    if wrote > 0 {
        tracing::info!(
            writes = wrote,
            nodes = now.nodes.len(),
            "published the join policy (accepted measurements, node directory) into etcd"
        );
    }
    *published = Some(now);
    Ok(())
}

/// Removes the members of control planes the platform no longer lists (never this node's own),
/// and promotes a listed control plane's learner that a restart left unpromoted.
async fn reconcile_members(
    node: &crate::context::NodeContext,
    store: &Store,
) -> Result<(), EtcdError> {
    let control_planes: BTreeSet<String> = node
        .metadata
        .cluster()?
        .nodes
        .into_iter()
        .filter(|n| n.role == Role::ControlPlane)
        .map(|n| n.name)
        .collect();
    for member in store.members().await? {
        // A member added but not started yet has no name: it is some control plane joining.
        if member.name.is_empty() || member.name == node.name {
            continue;
        }
        let id = format!("{:x}", member.id);
        if !control_planes.contains(&member.name) {
            tracing::info!(member = %member.name, %id,
                "removing the etcd member of a control plane the platform no longer lists");
            match store.remove_member(member.id).await {
                Ok(()) => tracing::info!(member = %member.name, %id, "etcd member removed"),
                // Another control plane may have removed it first.
                Err(e) => tracing::warn!(member = %member.name, %id, error = %e,
                    "etcd member not removed"),
            }
        } else if member.is_learner {
            if let Err(e) = store.promote(member.id, Instant::now()).await {
                tracing::debug!(member = %member.name, error = %e, "learner not promoted yet");
            }
        }
    }
    // The platform reads this before it stops a deleted control plane (quorum of the rest).
    let members = store.members().await?;
    node.status.set_etcd_members(
        members
            .into_iter()
            .map(|m| m.name)
            .filter(|n| !n.is_empty())
            .collect(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Backoff;
    use constellation_attestation::SystemClock;
    use constellation_joinservice::disk_bindings::DiskBindings;
    use constellation_joinservice::{Claim, DiskOwner, DiskUuid, EtcdDiskBindings};

    fn member(dir: &Path, name: &str, ip: &str) -> LocalMember {
        LocalMember {
            node_name: name.into(),
            ip: ip.parse().unwrap(),
            state_dir: dir.join(name),
            cluster_token: "bootstrapper-etcd-test".into(),
        }
    }

    /// The first control plane creates the cluster under its supervisor; a second control plane
    /// joins as learner, is promoted, serves what the first wrote, and is removed when deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_member_then_a_joining_control_plane_then_its_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = ClusterPki::generate("c", &SystemClock).unwrap();
        let supervisor = |name: &str| {
            Supervisor::new(
                tmp.path().join(name).join("run"),
                Backoff::default(),
                Duration::from_millis(50),
                |_| {},
            )
        };
        let (sup0, sup1) = (supervisor("cp-0"), supervisor("cp-1"));
        let cp0 = member(tmp.path(), "cp-0", "127.0.0.61");
        let cp1 = member(tmp.path(), "cp-1", "127.0.0.62");

        start_first_member(&sup0, &cp0, &pki, &SystemClock).unwrap();
        if let Err(e) = sup0.wait_ready(ETCD, READY_WITHIN).await {
            let log = std::fs::read_to_string(tmp.path().join("cp-0/etcd/etcd.log"));
            panic!("{e}: {log:?} {:?}", sup0.health());
        }
        let store0 = cp0
            .client(&pki, &SystemClock, vec![client_url(cp0.ip)])
            .await
            .unwrap();
        let disk = DiskUuid::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let owner = DiskOwner {
            node_name: "worker-0".into(),
            ak_fingerprint: [7; 32],
        };
        EtcdDiskBindings::new(store0.clone())
            .claim(&disk, &owner)
            .await
            .unwrap();
        let key_mode = std::fs::metadata(tmp.path().join("cp-0/etcd/tls/member.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );

        join_member(&sup1, &cp1, vec![client_url(cp0.ip)], &pki, &SystemClock)
            .await
            .unwrap();
        sup1.wait_ready(ETCD, READY_WITHIN).await.unwrap();
        let members = store0.members().await.unwrap();
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.iter().all(|m| !m.is_learner));
        let store1 = cp1
            .client(&pki, &SystemClock, vec![client_url(cp1.ip)])
            .await
            .unwrap();
        assert_eq!(
            EtcdDiskBindings::new(store1)
                .claim(
                    &disk,
                    &DiskOwner {
                        node_name: "intruder".into(),
                        ak_fingerprint: [9; 32],
                    }
                )
                .await
                .unwrap(),
            Claim::BoundTo(owner)
        );

        remove_member(&store0, "cp-1").await.unwrap();
        sup1.shutdown(Duration::from_secs(3)).await;
        assert_eq!(store0.members().await.unwrap().len(), 1);
        sup0.shutdown(Duration::from_secs(3)).await;
    }
}
