//! Supervision of the node's service daemons, the way kubelet runs static pods: for each daemon
//! the supervisor writes its files (typed configuration serialized, secrets; mode 0600, atomic),
//! starts its binary, polls its readiness endpoint, and starts it again whenever it exits, after
//! an exponential back-off that is bounded ([`Backoff`]) and reset once a process stayed up.
//!
//! Every change of a daemon's health goes to the `on_change` callback (the bootstrapper writes it
//! into the node's status, [`constellation_common::node_status::DaemonHealth`]).
//!
//! A daemon's pid is kept in `<run_dir>/<name>.pid`: a daemon left running by an earlier
//! bootstrapper of the node (killed without a chance to stop its children) still holds its ports,
//! so it is killed before the first start, but only if that pid still runs the same binary.
//!
//! The API is generic (any command, files and probe): the control plane's join service, key
//! service and verification service use it, and so can other node daemons.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use constellation_common::node_status::{DaemonHealth, DaemonState};
use constellation_common::secret::SecretBytes;
use constellation_common::secret_file::{self, SecretFileError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::sync::watch;

/// Why a daemon could not be supervised.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("daemon {0:?} is already supervised")]
    AlreadySupervised(String),
    #[error("daemon {name:?}: binary {path} not found (build it next to the bootstrapper, or name its directory with --daemon-dir)")]
    MissingBinary { name: String, path: PathBuf },
    #[error("daemon {name:?}: writing {path}: {source}")]
    WriteFile {
        name: String,
        path: PathBuf,
        source: SecretFileError,
    },
    #[error("daemon {name:?}: serializing its configuration: {message}")]
    Serialize { name: String, message: String },
    #[error("daemon {name:?}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("daemon {name:?} not ready within {timeout:?}: {state:?}")]
    NotReady {
        name: String,
        timeout: Duration,
        state: Option<DaemonState>,
    },
}

/// A file written before every start of a daemon (mode 0600, atomically, parents created 0700).
#[derive(Clone)]
pub struct DaemonFile {
    pub path: PathBuf,
    pub contents: SecretBytes,
}

impl DaemonFile {
    /// Raw bytes (a secret, a certificate).
    pub fn bytes(path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.into(),
            contents: SecretBytes::new(contents.into()),
        }
    }

    /// A typed value serialized as YAML (the daemons' configuration files).
    pub fn yaml<T: Serialize>(
        name: &str,
        path: impl Into<PathBuf>,
        value: &T,
    ) -> Result<Self, SupervisorError> {
        let text = serde_yaml::to_string(value).map_err(|e| SupervisorError::Serialize {
            name: name.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self::bytes(path, text.into_bytes()))
    }
}

impl std::fmt::Debug for DaemonFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents: they may be secret.
        f.debug_struct("DaemonFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How the supervisor decides a daemon is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` on `addr` answers 200 (e.g. `/readyz`).
    Http { addr: SocketAddr, path: String },
    /// The process runs: ready at once.
    Running,
}

impl Probe {
    /// `GET /readyz` on `addr`, the daemons' readiness endpoint.
    pub fn readyz(addr: SocketAddr) -> Self {
        Self::Http {
            addr,
            path: "/readyz".to_owned(),
        }
    }
}

/// One daemon: what to run and how to tell it is ready.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Short name, unique per node (status, pid and log file names).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Written before every start (a restart gets the same configuration again).
    pub files: Vec<DaemonFile>,
    pub probe: Probe,
    /// Where its stdout and stderr go (appended).
    pub log: PathBuf,
}

/// Restart delays: `initial · 2^(failures-1)`, at most `max`; a process that ran at least
/// `reset_after` counts as healthy, so its exit starts again from `initial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// kubelet's CrashLoopBackOff shape, scaled to a node's own services: 200 ms doubling to
    /// 10 s, reset after 30 s up.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The pause after `failures` (>= 1) consecutive failed runs.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

type OnChange = Box<dyn Fn(Vec<DaemonHealth>) + Send + Sync>;

struct Inner {
    run_dir: PathBuf,
    backoff: Backoff,
    probe_interval: Duration,
    health: Mutex<BTreeMap<String, DaemonHealth>>,
    on_change: OnChange,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Supervises daemons until [`Supervisor::shutdown`] (or until the process ends: children are
/// killed when their supervisor task is dropped).
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor keeping pid files in `run_dir` (created 0700).
    pub fn new(
        run_dir: impl Into<PathBuf>,
        backoff: Backoff,
        probe_interval: Duration,
        on_change: impl Fn(Vec<DaemonHealth>) + Send + Sync + 'static,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                run_dir: run_dir.into(),
                backoff,
                probe_interval,
                health: Mutex::new(BTreeMap::new()),
                on_change: Box::new(on_change),
                stop,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Starts supervising `spec` (its first start happens in the background).
    pub fn start(&self, spec: DaemonSpec) -> Result<(), SupervisorError> {
        if !spec.program.is_file() {
            return Err(SupervisorError::MissingBinary {
                name: spec.name,
                path: spec.program,
            });
        }
        secret_file::ensure_private_dir(&self.inner.run_dir).map_err(|source| {
            SupervisorError::WriteFile {
                name: spec.name.clone(),
                path: self.inner.run_dir.clone(),
                source,
            }
        })?;
        {
            let mut health = self.inner.lock_health();
            if health.contains_key(&spec.name) {
                return Err(SupervisorError::AlreadySupervised(spec.name));
            }
            health.insert(
                spec.name.clone(),
                DaemonHealth {
                    name: spec.name.clone(),
                    pid: None,
                    state: DaemonState::Starting,
                    restarts: 0,
                    last_exit: None,
                },
            );
        }
        self.inner.changed();
        let pid_file = self.inner.run_dir.join(format!("{}.pid", spec.name));
        kill_stale(&pid_file, &spec.program);
        let task = tokio::spawn(supervise(self.inner.clone(), spec, pid_file));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        Ok(())
    }

    /// Every supervised daemon's health, by name.
    pub fn health(&self) -> Vec<DaemonHealth> {
        self.inner.snapshot()
    }

    /// Waits until `name` is ready, at most `timeout`.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.inner.lock_health().get(name).map(|h| h.state.clone());
            if state == Some(DaemonState::Ready) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SupervisorError::NotReady {
                    name: name.to_owned(),
                    timeout,
                    state,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every daemon: SIGTERM (they drain), SIGKILL after `grace`; returns when all exited.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.inner.stop.send(true);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            if tokio::time::timeout(grace + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                tracing::warn!("a daemon's supervisor did not finish in time");
            }
        }
    }
}

impl Inner {
    fn lock_health(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DaemonHealth>> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot(&self) -> Vec<DaemonHealth> {
        self.lock_health().values().cloned().collect()
    }

    fn changed(&self) {
        (self.on_change)(self.snapshot());
    }

    /// Applies `update` to `name`'s health and reports it if anything changed.
    fn update(&self, name: &str, update: impl FnOnce(&mut DaemonHealth)) {
        let changed = {
            let mut health = self.lock_health();
            let Some(entry) = health.get_mut(name) else {
                return;
            };
            let before = entry.clone();
            update(entry);
            *entry != before
        };
        if changed {
            self.changed();
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// The supervision loop of one daemon.
async fn supervise(inner: Arc<Inner>, spec: DaemonSpec, pid_file: PathBuf) {
    let mut failures: u32 = 0;
    let mut stop = inner.stop.subscribe();
    loop {
        if inner.stopping() {
            break;
        }
        let started = Instant::now();
        match run_once(&inner, &spec, &pid_file, &mut stop).await {
            RunOutcome::Stopped => break,
            RunOutcome::Exited(how) => {
                tracing::warn!(daemon = %spec.name, exit = %how, "daemon exited; starting it again");
                if started.elapsed() >= inner.backoff.reset_after {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                inner.update(&spec.name, |h| {
                    h.pid = None;
                    h.last_exit = Some(how);
                });
            }
            RunOutcome::FailedToStart(reason) => {
                tracing::error!(daemon = %spec.name, %reason, "daemon could not be started");
                failures = failures.saturating_add(1);
                inner.update(&spec.name, |h| {
                    h.pid = None;
                    h.state = DaemonState::FailedToStart {
                        reason: reason.clone(),
                    };
                });
            }
        }
        let delay = inner.backoff.delay(failures);
        inner.update(&spec.name, |h| {
            if !matches!(h.state, DaemonState::FailedToStart { .. }) {
                h.state = DaemonState::BackingOff {
                    delay_ms: delay.as_millis() as u64,
                };
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_requested(&mut stop) => break,
        }
        inner.update(&spec.name, |h| h.restarts = h.restarts.saturating_add(1));
    }
    let _ = std::fs::remove_file(&pid_file);
    inner.update(&spec.name, |h| {
        h.pid = None;
        h.state = DaemonState::Stopped;
    });
}

/// Resolves once the supervisor stops (the guard `wait_for` returns is not held across awaits).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

enum RunOutcome {
    Stopped,
    Exited(String),
    FailedToStart(String),
}

fn write_files(spec: &DaemonSpec) -> Result<(), SupervisorError> {
    for file in &spec.files {
        let err = |source| SupervisorError::WriteFile {
            name: spec.name.clone(),
            path: file.path.clone(),
            source,
        };
        if let Some(parent) = file.path.parent() {
            if !parent.is_dir() {
                std::fs::create_dir_all(parent).map_err(|source| SupervisorError::Io {
                    name: spec.name.clone(),
                    path: parent.to_owned(),
                    source,
                })?;
                secret_file::ensure_private_dir(parent).map_err(err)?;
            }
        }
        secret_file::write_private_atomic(&file.path, file.contents.expose()).map_err(err)?;
    }
    Ok(())
}

async fn run_once(
    inner: &Inner,
    spec: &DaemonSpec,
    pid_file: &Path,
    stop: &mut watch::Receiver<bool>,
) -> RunOutcome {
    if let Err(e) = write_files(spec) {
        return RunOutcome::FailedToStart(e.to_string());
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .and_then(|out| Ok((out.try_clone()?, out)))
    {
        Ok(log) => log,
        Err(e) => return RunOutcome::FailedToStart(format!("{}: {e}", spec.log.display())),
    };
    let mut child = match tokio::process::Command::new(&spec.program)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log.0)
        .stderr(log.1)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return RunOutcome::FailedToStart(format!("{}: {e}", spec.program.display())),
    };
    let pid = child.id();
    if let Some(pid) = pid {
        if let Err(e) = secret_file::write_private_atomic(pid_file, pid.to_string().as_bytes()) {
            tracing::warn!(daemon = %spec.name, "cannot record the pid: {e}");
        }
    }
    tracing::info!(daemon = %spec.name, pid, program = %spec.program.display(), "daemon started");
    inner.update(&spec.name, |h| {
        h.pid = pid;
        h.state = DaemonState::Starting;
    });
    let mut probe = tokio::time::interval(inner.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            status = child.wait() => {
                let how = match status {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("wait failed: {e}"),
                };
                return RunOutcome::Exited(how);
            }
            _ = stop_requested(stop) => {
                terminate(&mut child, &spec.name).await;
                return RunOutcome::Stopped;
            }
            _ = probe.tick() => {
                let state = probe_state(&spec.probe).await;
                if let Some(state) = state {
                    inner.update(&spec.name, |h| {
                        if h.state != state {
                            tracing::info!(daemon = %spec.name, ?state, "daemon health changed");
                        }
                        h.state = state;
                    });
                }
            }
        }
    }
}

/// The state the probe shows; `None` while the probe gets no answer (still starting).
async fn probe_state(probe: &Probe) -> Option<DaemonState> {
    match probe {
        Probe::Running => Some(DaemonState::Ready),
        Probe::Http { addr, path } => {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                constellation_daemon::health::probe(*addr, path),
            )
            .await;
            match answer {
                Ok(Ok((200, _))) => Some(DaemonState::Ready),
                Ok(Ok((code, body))) => Some(DaemonState::NotReady {
                    reason: format!("{code}: {}", body.trim()),
                }),
                _ => None,
            }
        }
    }
}

/// SIGTERM, then SIGKILL after the daemons' drain bound.
async fn terminate(child: &mut tokio::process::Child, name: &str) {
    const GRACE: Duration = Duration::from_secs(5);
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
        tracing::warn!(daemon = %name, "daemon did not stop after SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status: {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("signal: {signal} ({})", s.as_str()),
            Err(_) => format!("signal: {signal}"),
        },
        _ => "ended".to_owned(),
    }
}

/// Kills the process a pid file names if it still runs `program` (left by an earlier
/// bootstrapper of this node).
fn kill_stale(pid_file: &Path, program: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    if exe.as_deref() != Some(program.as_path()) {
        return;
    }
    tracing::warn!(pid, program = %program.display(), "killing a daemon left by an earlier bootstrapper");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/exe")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_millis(200));
        assert_eq!(b.delay(2), Duration::from_millis(400));
        assert_eq!(b.delay(6), Duration::from_millis(6_400));
        assert_eq!(b.delay(7), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
    }

    fn shell_daemon(dir: &Path, name: &str, script: &str) -> DaemonSpec {
        DaemonSpec {
            name: name.to_owned(),
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            files: vec![DaemonFile::bytes(
                dir.join("conf/config"),
                b"secret".to_vec(),
            )],
            probe: Probe::Running,
            log: dir.join(format!("{name}.log")),
        }
    }

    #[tokio::test]
    async fn a_killed_daemon_is_started_again_with_its_files_and_a_new_pid() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<Vec<DaemonHealth>>::new()));
        let sink = seen.clone();
        let sup = Supervisor::new(
            dir.path().join("run"),
            Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                reset_after: Duration::from_secs(30),
            },
            Duration::from_millis(20),
            move |h| sink.lock().unwrap().push(h),
        );
        sup.start(shell_daemon(dir.path(), "sleeper", "exec sleep 600"))
            .unwrap();
        sup.wait_ready("sleeper", Duration::from_secs(5))
            .await
            .unwrap();
        let first = sup.health()[0].pid.unwrap();
        // The configuration was written private before the start.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("conf/config"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            sup.start(shell_daemon(dir.path(), "sleeper", "true")),
            Err(SupervisorError::AlreadySupervised(_))
        ));
        kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let h = sup.health()[0].clone();
            if h.restarts == 1 && h.is_ready() && h.pid.is_some_and(|p| p != first) {
                assert_eq!(h.last_exit.as_deref(), Some("signal: 9 (SIGKILL)"));
                break;
            }
            assert!(Instant::now() < deadline, "not restarted: {h:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(seen
            .lock()
            .unwrap()
            .iter()
            .any(|h| matches!(h[0].state, DaemonState::BackingOff { delay_ms: 50 })));
        sup.shutdown(Duration::from_secs(5)).await;
        assert_eq!(sup.health()[0].state, DaemonState::Stopped);
    }

    #[tokio::test]
    async fn a_crash_loop_backs_off_exponentially_and_a_missing_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(
            dir.path().join("run"),
            Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(80),
                reset_after: Duration::from_secs(30),
            },
            Duration::from_millis(20),
            |_| {},
        );
        sup.start(shell_daemon(dir.path(), "crasher", "exit 3"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = sup.health()[0].clone();
            if h.restarts >= 4 {
                assert_eq!(h.last_exit.as_deref(), Some("exit status: 3"));
                break;
            }
            assert!(Instant::now() < deadline, "{h:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Bounded: after a few failures the delay stays at the maximum.
        let h = sup.health()[0].clone();
        if let DaemonState::BackingOff { delay_ms } = h.state {
            assert!(delay_ms <= 80, "{delay_ms}");
        }
        let missing = DaemonSpec {
            program: dir.path().join("no-such-daemon"),
            ..shell_daemon(dir.path(), "missing", "true")
        };
        assert!(matches!(
            sup.start(missing),
            Err(SupervisorError::MissingBinary { .. })
        ));
        sup.shutdown(Duration::from_secs(5)).await;
    }
}
