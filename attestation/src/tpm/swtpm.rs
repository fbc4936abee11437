//! Running swtpm (a software TPM 2.0) on unix sockets: as a child owned by the caller (tests,
//! one instance each, since swtpm serves one client at a time) or detached (the local platform,
//! where the TPM must outlive the process that started it). The binary is `$SWTPM` or `swtpm`.
//!
//! The TPM is the node's identity (its attestation key) and its measured-boot record, so only
//! the launcher's user may talk to it: the data socket and its control socket (`<data>.ctrl`,
//! where the swtpm TCTI looks for it) live in the state directory, which is made mode 0700, and
//! are created 0600; the TPM state files are 0600 too. Nothing listens on TCP.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::TpmError;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const PID_FILE: &str = "swtpm.pid";
const LOG_FILE: &str = "swtpm.log";
const SOCKET_FILE: &str = "swtpm.sock";
/// The swtpm TCTI (tpm2-tss >= 3.2) finds the control channel at the data socket plus this.
const CTRL_SUFFIX: &str = ".ctrl";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Where sockets go when the state directory's path is too long for a unix socket.
const SHORT_DIR_PREFIX: &str = "constellation-swtpm-";

fn binary() -> String {
    std::env::var("SWTPM").unwrap_or_else(|_| "swtpm".to_owned())
}

fn swtpm_error(message: impl Into<String>) -> TpmError {
    TpmError::Swtpm {
        binary: binary(),
        message: message.into(),
    }
}

fn ctrl_path(socket: &Path) -> PathBuf {
    let mut ctrl = socket.as_os_str().to_owned();
    ctrl.push(CTRL_SUFFIX);
    PathBuf::from(ctrl)
}

/// Creates `dir` (mode 0700) or makes an existing one 0700; the chmod also proves we own it.
fn make_private_dir(dir: &Path) -> Result<(), TpmError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TpmError::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| TpmError::io(format!("make {} private (0700)", dir.display()), e))
}

/// The state directory, private and absolute (swtpm resolves it itself; a detached instance must
/// not depend on our working directory).
fn prepare_state_dir(state_dir: &Path) -> Result<PathBuf, TpmError> {
    make_private_dir(state_dir)?;
    state_dir
        .canonicalize()
        .map_err(|e| TpmError::io(format!("resolve {}", state_dir.display()), e))
}

/// The data socket's path: in the state directory, or, when that path is too long for a unix
/// socket, in a fresh private directory under the temporary directory (created exclusively, so
/// nobody can have prepared it).
fn socket_path(state_dir: &Path) -> Result<PathBuf, TpmError> {
    let in_state = state_dir.join(SOCKET_FILE);
    if ctrl_path(&in_state).as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(in_state);
    }
    let dir =
        std::env::temp_dir().join(format!("{SHORT_DIR_PREFIX}{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| TpmError::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| TpmError::io(format!("make {} private (0700)", dir.display()), e))?;
    let socket = dir.join(SOCKET_FILE);
    if ctrl_path(&socket).as_os_str().len() > MAX_SOCKET_PATH {
        let _ = std::fs::remove_dir(&dir);
        return Err(swtpm_error(format!(
            "socket path {} is too long for a unix socket",
            socket.display()
        )));
    }
    Ok(socket)
}

/// Removes what a stopped swtpm may leave: its sockets, and the socket directory when it is
/// not the state directory.
fn remove_sockets(socket: &Path, state_dir: &Path) {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(ctrl_path(socket));
    if let Some(dir) = socket.parent() {
        if dir != state_dir {
            // Our private short folder: other sockets beside swtpm's (a TPM multiplexer's,
            // whose process may have been killed) go with it.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Who talks to the TPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// A TSS client on the data socket; swtpm starts the TPM itself.
    Tss,
    /// A QEMU vTPM: QEMU connects to the control socket only, hands swtpm the data channel
    /// over it and powers the TPM on (its firmware sends TPM2_Startup). swtpm exits when
    /// QEMU disconnects (`--terminate`).
    Qemu,
}

fn command(state_dir: &Path, socket: &Path, daemon: bool, client: Client) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("socket").arg("--tpm2");
    if client == Client::Tss {
        cmd.arg("--server")
            .arg(format!("type=unixio,path={},mode=0600", socket.display()));
    }
    cmd.arg("--ctrl")
        .arg(format!(
            "type=unixio,path={},mode=0600",
            ctrl_path(socket).display()
        ))
        .arg("--tpmstate")
        .arg(format!("dir={},mode=0600", state_dir.display()));
    match client {
        Client::Tss => cmd.arg("--flags").arg("not-need-init,startup-clear"),
        Client::Qemu => cmd.arg("--terminate"),
    };
    cmd.arg("--pid")
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

/// Both channels accept a connection (swtpm serves one client at a time: this one closes at
/// once).
fn ready(socket: &Path) -> bool {
    UnixStream::connect(ctrl_path(socket)).is_ok() && UnixStream::connect(socket).is_ok()
}

/// The control socket exists (a QEMU-mode swtpm: connecting would be taken as QEMU's one
/// connection, and `--terminate` would end swtpm when it closes).
fn ctrl_ready(socket: &Path) -> bool {
    ctrl_path(socket).exists()
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut s);
    }
    s.trim().to_owned()
}

/// A swtpm child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    socket: PathBuf,
    state_dir: PathBuf,
}

impl Swtpm {
    /// Starts swtpm with its state in `state_dir` (created if missing and made private;
    /// existing state, i.e. the TPM's seeds, is reused). Returns once the TPM accepts
    /// connections.
    pub fn start(state_dir: &Path) -> Result<Swtpm, TpmError> {
        let state_dir = prepare_state_dir(state_dir)?;
        let socket = socket_path(&state_dir)?;
        let mut child = match command(&state_dir, &socket, false, Client::Tss).spawn() {
            Ok(child) => child,
            Err(e) => {
                remove_sockets(&socket, &state_dir);
                return Err(swtpm_error(format!("cannot run: {e}")));
            }
        };
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
            if ready(&socket) {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "{} not ready after {READY_TIMEOUT:?}",
                    socket.display()
                ));
            }
            std::thread::sleep(POLL);
        };
        let swtpm = Swtpm {
            child,
            socket,
            state_dir,
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(pid = swtpm.child.id(), socket = %swtpm.socket.display(), "swtpm started");
                Ok(swtpm)
            }
            // Dropping `swtpm` kills and reaps the child and removes its sockets.
            Err(e) => Err(swtpm_error(e)),
        }
    }

    /// Starts swtpm as a daemon that outlives this process (`--daemon`, pid file in
    /// `state_dir`). Stop it with [`SwtpmHandle::stop`].
    pub fn spawn_detached(state_dir: &Path) -> Result<SwtpmHandle, TpmError> {
        Self::detached(state_dir, Client::Tss)
    }

    /// Starts swtpm detached as a QEMU vTPM backend: only the control socket
    /// ([`SwtpmHandle::ctrl_socket`], for `-chardev socket,path=...`), no data socket; the
    /// TPM state (its seeds, hence its keys) is the same as with [`Swtpm::spawn_detached`] on
    /// `state_dir`. swtpm exits when QEMU disconnects.
    pub fn spawn_detached_for_qemu(state_dir: &Path) -> Result<SwtpmHandle, TpmError> {
        Self::detached(state_dir, Client::Qemu)
    }

    fn detached(state_dir: &Path, client: Client) -> Result<SwtpmHandle, TpmError> {
        let state_dir = prepare_state_dir(state_dir)?;
        let pid_file = state_dir.join(PID_FILE);
        let _ = std::fs::remove_file(&pid_file);
        let socket = socket_path(&state_dir)?;
        // The launcher forks the daemon after binding its sockets and exits.
        let output = match command(&state_dir, &socket, true, client).output() {
            Ok(output) => output,
            Err(e) => {
                remove_sockets(&socket, &state_dir);
                return Err(swtpm_error(format!("cannot run: {e}")));
            }
        };
        if !output.status.success() {
            remove_sockets(&socket, &state_dir);
            return Err(swtpm_error(format!(
                "exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let pid = match read_pid(&pid_file) {
            Ok(pid) => pid,
            Err(e) => {
                remove_sockets(&socket, &state_dir);
                return Err(e);
            }
        };
        let handle = SwtpmHandle {
            pid,
            socket,
            state_dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = |socket: &Path| match client {
            Client::Tss => ready(socket),
            Client::Qemu => ctrl_ready(socket),
        };
        while !ready(&handle.socket) {
            if Instant::now() > deadline || !handle.is_alive() {
                let _ = handle.stop();
                return Err(swtpm_error(format!(
                    "daemon pid {} did not become ready on {}",
                    handle.pid,
                    handle.socket.display()
                )));
            }
            std::thread::sleep(POLL);
        }
        tracing::debug!(pid = handle.pid, socket = %handle.socket.display(), "detached swtpm started");
        Ok(handle)
    }

    /// The TCTI string for tss-esapi and tpm2-tools (`-T`).
    pub fn tcti(&self) -> String {
        tcti(&self.socket)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The data socket; the control socket is the same path plus `.ctrl`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The control socket (`swtpm_ioctl --unix`).
    pub fn ctrl_socket(&self) -> PathBuf {
        ctrl_path(&self.socket)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_sockets(&self.socket, &self.state_dir);
    }
}

fn tcti(socket: &Path) -> String {
    format!("swtpm:path={}", socket.display())
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
    /// The data socket; the control socket is the same path plus `.ctrl`.
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

impl SwtpmHandle {
    pub fn tcti(&self) -> String {
        tcti(&self.socket)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The control socket (`swtpm_ioctl --unix`).
    pub fn ctrl_socket(&self) -> PathBuf {
        ctrl_path(&self.socket)
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
            remove_sockets(&self.socket, &self.state_dir);
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
                    remove_sockets(&self.socket, &self.state_dir);
                    return Ok(());
                }
                std::thread::sleep(POLL);
            }
        }
        Err(swtpm_error(format!("pid {pid} survived SIGKILL")))
    }
}
