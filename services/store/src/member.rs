//! The etcd member launcher: one member per control plane, its data directory on the node's
//! state folder, client and peer traffic on mutual TLS with certificates from the cluster PKI's
//! etcd CA, supervised (restarted with back-off when it exits).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::EtcdCredentials;
use nix::sys::signal::Signal;

/// Debian's `etcd-server` installs the server here (on `PATH` as `etcd`).
pub const DEFAULT_ETCD_BINARY: &str = "etcd";
/// The etcd client port on each control plane.
pub const CLIENT_PORT: u16 = 2379;
/// The etcd peer port on each control plane.
pub const PEER_PORT: u16 = 2380;
/// etcd's plain-HTTP `/health` and `/metrics` on each control plane (kubeadm's choice).
pub const METRICS_PORT: u16 = 2381;

/// First restart delay after the member exited; doubles per quick exit up to
/// [`MAX_RESTART_DELAY`].
pub const MIN_RESTART_DELAY: Duration = Duration::from_millis(200);
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A member that ran this long before exiting restarts after [`MIN_RESTART_DELAY`] again.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// Whether the member starts a new cluster or joins an existing one (etcd's
/// `--initial-cluster-state`; ignored by etcd once its data directory holds a member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// One member's settings.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// The member's name (the control plane's node name).
    pub name: String,
    /// The node's state folder; the member keeps `etcd/data` (0700) and `etcd/tls` under it.
    pub state_dir: PathBuf,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// Where etcd serves `/health` and `/metrics` over plain HTTP (no keys, no data), for
    /// readiness probes; none if `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// Every member's name and peer URL, this one included.
    pub initial_cluster: Vec<(String, String)>,
    pub cluster_state: ClusterState,
    /// Keeps members of different clusters from joining each other by mistake.
    pub cluster_token: String,
    pub binary: PathBuf,
}

/// Why a member could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {reason}")]
    WriteTls { path: PathBuf, reason: String },
}

/// The member's TLS files: the etcd CA, its certificate, its key (0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl MemberTlsFiles {
    /// Writes `credentials` into `dir` (created 0700): certificates 0644, the key 0600, each
    /// atomically.
    pub fn write(dir: &Path, credentials: &EtcdCredentials) -> Result<Self, LaunchError> {
        create_private_dir(dir)?;
        let files = Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("member.crt"),
            key: dir.join("member.key"),
        };
        for (path, bytes, mode) in [
            (&files.ca, credentials.ca_cert_pem.as_bytes(), 0o644),
            (&files.cert, credentials.cert_pem.as_bytes(), 0o644),
            (&files.key, credentials.key_pem.expose(), 0o600),
        ] {
            constellation_common::secret_file::write_atomic(path, bytes, mode).map_err(|e| {
                LaunchError::WriteTls {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        }
        Ok(files)
    }
}

/// Creates `dir` and its parents, 0700 (etcd refuses a data directory others may read).
pub fn create_private_dir(dir: &Path) -> Result<(), LaunchError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LaunchError::Io {
            path: dir.to_owned(),
            source,
        })
}

impl MemberConfig {
    pub fn data_dir(&self) -> PathBuf {
        self.state_dir.join("etcd/data")
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("etcd/tls")
    }

    /// The member's log (etcd's stderr), appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("etcd/etcd.log")
    }

    pub fn client_url(&self) -> String {
        format!("https://{}", self.client_addr)
    }

    pub fn peer_url(&self) -> String {
        format!("https://{}", self.peer_addr)
    }

    /// etcd's command line: both listeners require a client certificate from the etcd CA.
    pub fn args(&self, tls: &MemberTlsFiles) -> Vec<OsString> {
        let initial_cluster = self
            .initial_cluster
            .iter()
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let state = match self.cluster_state {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            args.push(format!("--{name}").into());
            args.push(value);
        };
        flag("name", self.name.clone().into());
        flag("data-dir", self.data_dir().into());
        flag("listen-client-urls", self.client_url().into());
        flag("advertise-client-urls", self.client_url().into());
        flag("listen-peer-urls", self.peer_url().into());
        flag("initial-advertise-peer-urls", self.peer_url().into());
        flag("initial-cluster", initial_cluster.into());
        flag("initial-cluster-token", self.cluster_token.clone().into());
        flag("initial-cluster-state", state.into());
        flag("cert-file", tls.cert.clone().into());
        flag("key-file", tls.key.clone().into());
        flag("trusted-ca-file", tls.ca.clone().into());
        flag("peer-cert-file", tls.cert.clone().into());
        flag("peer-key-file", tls.key.clone().into());
        flag("peer-trusted-ca-file", tls.ca.clone().into());
        if let Some(metrics) = self.metrics_addr {
            flag("listen-metrics-urls", format!("http://{metrics}").into());
        }
        flag("logger", "zap".into());
        flag("log-outputs", "stderr".into());
        args.push("--client-cert-auth".into());
        args.push("--peer-client-cert-auth".into());
        args
    }
}

/// A running member, restarted with back-off whenever it exits until [`stop`](Self::stop).
pub struct SupervisedMember {
    config: MemberConfig,
    pid: Arc<AtomicU32>,
    starts: Arc<AtomicU32>,
    stop: Option<tokio::sync::oneshot::Sender<Signal>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SupervisedMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisedMember")
            .field("name", &self.config.name)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl SupervisedMember {
    /// Writes the member's TLS files, creates its data directory and starts supervising it.
    pub fn start(config: MemberConfig, credentials: &EtcdCredentials) -> Result<Self, LaunchError> {
        let tls = MemberTlsFiles::write(&config.tls_dir(), credentials)?;
        create_private_dir(&config.data_dir())?;
        let args = config.args(&tls);
        let pid = Arc::new(AtomicU32::new(0));
        let starts = Arc::new(AtomicU32::new(0));
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(supervise(
            config.clone(),
            args,
            pid.clone(),
            starts.clone(),
            stop_rx,
        ));
        Ok(Self {
            config,
            pid,
            starts,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn config(&self) -> &MemberConfig {
        &self.config
    }

    /// The running etcd process, if one runs now.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    /// How often the process was started (1 + restarts).
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    /// Stops supervising and ends the process with `signal` (SIGTERM: etcd hands leadership
    /// over first; SIGKILL: a crash), waiting until it exited.
    pub async fn stop(mut self, signal: Signal) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(signal);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SupervisedMember {
    fn drop(&mut self) {
        // Dropped without stop(): the child is killed with the task (kill_on_drop).
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn supervise(
    config: MemberConfig,
    args: Vec<OsString>,
    pid: Arc<AtomicU32>,
    starts: Arc<AtomicU32>,
    mut stop: tokio::sync::oneshot::Receiver<Signal>,
) {
    let mut delay = MIN_RESTART_DELAY;
    loop {
        let started = Instant::now();
        match spawn(&config, &args) {
            Ok(mut child) => {
                starts.fetch_add(1, Ordering::SeqCst);
                let child_pid = child.id().unwrap_or(0);
                pid.store(child_pid, Ordering::SeqCst);
                tracing::info!(member = %config.name, pid = child_pid, "etcd member started");
                tokio::select! {
                    status = child.wait() => {
                        pid.store(0, Ordering::SeqCst);
                        tracing::warn!(member = %config.name, status = ?status.ok(),
                            ran = ?started.elapsed(), "etcd member exited; restarting");
                    }
                    signal = &mut stop => {
                        let signal = signal.unwrap_or(Signal::SIGTERM);
                        if let Ok(raw) = i32::try_from(child_pid) {
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal);
                        }
                        let _ = child.wait().await;
                        pid.store(0, Ordering::SeqCst);
                        tracing::info!(member = %config.name, ?signal, "etcd member stopped");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(member = %config.name, binary = %config.binary.display(),
                    error = %e, "etcd member could not start; retrying");
            }
        }
        if started.elapsed() >= STABLE_RUN {
            delay = MIN_RESTART_DELAY;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => return,
        }
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
}

fn spawn(config: &MemberConfig, args: &[OsString]) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.log_path())?;
    tokio::process::Command::new(&config.binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
}

/// How long a joining member may take to catch up before its promotion is given up.
pub const PROMOTE_WITHIN: Duration = Duration::from_secs(60);

/// Joins an existing cluster through `store`: adds the member of `config` as a learner (a learner
/// does not vote, so a member that never comes up costs no quorum), fills in
/// `config.initial_cluster` from the member list etcd returned and `config.cluster_state`, runs
/// `start` (whatever supervises the process), and promotes the member to a voter once it caught
/// up. A member that was added but could not be started is removed again, so a retry can add it
/// anew. Returns what `start` returned and the member's ID.
pub async fn join_as_learner<T, E>(
    store: &crate::Store,
    mut config: MemberConfig,
    start: impl FnOnce(&MemberConfig) -> Result<T, E>,
) -> Result<(T, u64), JoinError<E>>
where
    E: std::error::Error + 'static,
{
    let (id, members) = store.add_learner(&config.peer_url()).await?;
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
    let started = match start(&config) {
        Ok(started) => started,
        Err(e) => {
            if let Err(remove) = store.remove_member(id).await {
                tracing::warn!(member = %format!("{id:x}"), error = %remove,
                    "learner that could not start stays listed");
            }
            return Err(JoinError::Start(e));
        }
    };
    store.promote(id, Instant::now() + PROMOTE_WITHIN).await?;
    tracing::info!(member = %config.name, id = %format!("{id:x}"), "etcd member joined and promoted");
    Ok((started, id))
}

impl SupervisedMember {
    /// [`join_as_learner`] with this crate's own supervision.
    pub async fn join(
        store: &crate::Store,
        config: MemberConfig,
        credentials: &EtcdCredentials,
    ) -> Result<(Self, u64), JoinError<LaunchError>> {
        join_as_learner(store, config, |c| Self::start(c.clone(), credentials)).await
    }
}

/// Why a member could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError<E: std::error::Error + 'static> {
    /// Starting the added learner failed (it was removed again).
    #[error("starting the etcd member: {0}")]
    Start(#[source] E),
    #[error(transparent)]
    Store(#[from] crate::StoreError),
}
