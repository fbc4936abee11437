//! Running swtpm (a software TPM 2.0) on loopback TCP: as a child owned by the caller (tests,
//! one instance each, since swtpm serves one client at a time) or detached (the local platform,
//! where the TPM must outlive the process that started it). The binary is `$SWTPM` or `swtpm`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::TpmError;

const START_ATTEMPTS: usize = 8;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const PID_FILE: &str = "swtpm.pid";
const LOG_FILE: &str = "swtpm.log";

fn binary() -> String {
    std::env::var("SWTPM").unwrap_or_else(|_| "swtpm".to_owned())
}

fn swtpm_error(message: impl Into<String>) -> TpmError {
    TpmError::Swtpm {
        binary: binary(),
        message: message.into(),
    }
}

/// Two free consecutive loopback ports (server, control = server + 1: the swtpm TCTI derives
/// the control port that way). Free now; a racing process may still take them, which the
/// callers detect and retry.
fn free_ports() -> Result<(u16, u16), TpmError> {
    let bind = |port: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    for _ in 0..64 {
        let server = bind(0)
            .and_then(|l| l.local_addr())
            .map_err(|e| TpmError::io("pick a free loopback port", e))?
            .port();
        let Some(ctrl) = server.checked_add(1) else {
            continue;
        };
        let both = bind(server).and_then(|a| bind(ctrl).map(|b| (a, b)));
        if both.is_ok() {
            return Ok((server, ctrl));
        }
    }
    Err(swtpm_error("no two consecutive free loopback ports found"))
}

fn command(state_dir: &Path, server: u16, ctrl: u16, daemon: bool) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("socket")
        .arg("--tpm2")
        .arg("--server")
        .arg(format!("type=tcp,port={server},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
        .arg("--tpmstate")
        .arg(format!("dir={}", state_dir.display()))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .arg("--pid")
        .arg(format!("file={}", state_dir.join(PID_FILE).display()))
        .arg("--log")
        .arg(format!("file={}", state_dir.join(LOG_FILE).display()));
    if daemon {
        cmd.arg("--daemon");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn prepare_state_dir(state_dir: &Path) -> Result<PathBuf, TpmError> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| TpmError::io(format!("create {}", state_dir.display()), e))?;
    // swtpm resolves the state directory itself; give it an absolute path so a detached
    // instance does not depend on our working directory.
    state_dir
        .canonicalize()
        .map_err(|e| TpmError::io(format!("resolve {}", state_dir.display()), e))
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut s);
    }
    s.trim().to_owned()
}

/// A swtpm child process on loopback, killed and reaped on drop.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    server_port: u16,
    ctrl_port: u16,
    state_dir: PathBuf,
}

impl Swtpm {
    /// Starts swtpm with its state in `state_dir` (created if missing; existing state, i.e. the
    /// TPM's seeds, is reused). Returns once the TPM accepts connections.
    pub fn start(state_dir: &Path) -> Result<Swtpm, TpmError> {
        let state_dir = prepare_state_dir(state_dir)?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let (server, ctrl) = free_ports()?;
            let mut child = command(&state_dir, server, ctrl, false)
                .spawn()
                .map_err(|e| swtpm_error(format!("cannot run: {e}")))?;
            let deadline = Instant::now() + READY_TIMEOUT;
            let outcome = loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        break Err(format!(
                            "exited at startup ({status}): {}",
                            stderr_of(&mut child)
                        ))
                    }
                    Ok(None) => {}
                    Err(e) => break Err(format!("cannot poll: {e}")),
                }
                if accepts(ctrl) && accepts(server) {
                    // A port taken by someone else would also accept: make sure ours is alive
                    // after its bind would have failed.
                    std::thread::sleep(POLL);
                    match child.try_wait() {
                        Ok(None) => break Ok(()),
                        Ok(Some(status)) => {
                            break Err(format!(
                                "exited at startup ({status}): {}",
                                stderr_of(&mut child)
                            ))
                        }
                        Err(e) => break Err(format!("cannot poll: {e}")),
                    }
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!(
                        "ports {server}/{ctrl} not ready after {READY_TIMEOUT:?}"
                    ));
                }
                std::thread::sleep(POLL);
            };
            match outcome {
                Ok(()) => {
                    tracing::debug!(pid = child.id(), server, ctrl, "swtpm started");
                    return Ok(Swtpm {
                        child,
                        server_port: server,
                        ctrl_port: ctrl,
                        state_dir,
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "swtpm start failed, retrying with new ports");
                    last_error = e;
                }
            }
        }
        Err(swtpm_error(format!(
            "could not start after {START_ATTEMPTS} attempts: {last_error}"
        )))
    }

    /// Starts swtpm as a daemon that outlives this process (`--daemon`, pid file in
    /// `state_dir`). Stop it with [`SwtpmHandle::stop`].
    pub fn spawn_detached(state_dir: &Path) -> Result<SwtpmHandle, TpmError> {
        let state_dir = prepare_state_dir(state_dir)?;
        let pid_file = state_dir.join(PID_FILE);
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let _ = std::fs::remove_file(&pid_file);
            let (server, ctrl) = free_ports()?;
            // The launcher forks the daemon after binding its sockets and exits: a failed bind
            // (port collision) shows up as a non-zero exit here.
            let output = command(&state_dir, server, ctrl, true)
                .output()
                .map_err(|e| swtpm_error(format!("cannot run: {e}")))?;
            if !output.status.success() {
                last_error = format!(
                    "exited with {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                continue;
            }
            let handle = SwtpmHandle {
                pid: read_pid(&pid_file)?,
                server_port: server,
                ctrl_port: ctrl,
                state_dir: state_dir.clone(),
            };
            let deadline = Instant::now() + READY_TIMEOUT;
            while !(accepts(ctrl) && accepts(server)) {
                if Instant::now() > deadline || !handle.is_alive() {
                    break;
                }
                std::thread::sleep(POLL);
            }
            if handle.is_alive() && accepts(server) {
                tracing::debug!(pid = handle.pid, server, ctrl, "detached swtpm started");
                return Ok(handle);
            }
            let _ = handle.stop();
            last_error = format!("daemon pid {} did not become ready", handle.pid);
        }
        Err(swtpm_error(format!(
            "could not start detached after {START_ATTEMPTS} attempts: {last_error}"
        )))
    }

    /// The TCTI string for tss-esapi and tpm2-tools (`-T`).
    pub fn tcti(&self) -> String {
        tcti(self.server_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (server port, control port).
    pub fn ports(&self) -> (u16, u16) {
        (self.server_port, self.ctrl_port)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tcti(server_port: u16) -> String {
    format!("swtpm:host=127.0.0.1,port={server_port}")
}

fn read_pid(pid_file: &Path) -> Result<u32, TpmError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match std::fs::read_to_string(pid_file) {
            Ok(s) if !s.trim().is_empty() => {
                return s.trim().parse().map_err(|_| {
                    swtpm_error(format!(
                        "pid file {} holds {:?}, not a pid",
                        pid_file.display(),
                        s.trim()
                    ))
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(TpmError::io(format!("read {}", pid_file.display()), e))
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Err(swtpm_error(format!(
                "pid file {} did not appear",
                pid_file.display()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// A detached swtpm: identified by its pid file, so a later process can check or stop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwtpmHandle {
    pub pid: u32,
    pub server_port: u16,
    pub ctrl_port: u16,
    pub state_dir: PathBuf,
}

impl SwtpmHandle {
    pub fn tcti(&self) -> String {
        tcti(self.server_port)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// (server port, control port).
    pub fn ports(&self) -> (u16, u16) {
        (self.server_port, self.ctrl_port)
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir.join(PID_FILE)
    }

    /// The pid in the pid file, if that process is still a running swtpm (not a zombie, not a
    /// reused pid).
    fn running_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "swtpm" {
            return None;
        }
        // /proc/<pid>/stat: "pid (comm) S ..."; the state follows the last ')'.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
        (state != 'Z' && state != 'X').then_some(pid)
    }

    pub fn is_alive(&self) -> bool {
        self.running_pid().is_some()
    }

    /// Sends SIGTERM (then SIGKILL after a grace period) and waits until it is gone.
    pub fn stop(&self) -> Result<(), TpmError> {
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        for signal in ["-TERM", "-KILL"] {
            let status = Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| TpmError::io("run kill", e))?;
            if !status.success() && self.is_alive() {
                return Err(swtpm_error(format!("kill {signal} {pid} failed: {status}")));
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !self.is_alive() {
                    let _ = std::fs::remove_file(self.pid_file());
                    return Ok(());
                }
                std::thread::sleep(POLL);
            }
        }
        Err(swtpm_error(format!("pid {pid} survived SIGKILL")))
    }
}
