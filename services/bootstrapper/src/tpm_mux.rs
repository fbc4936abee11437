//! A TPM command multiplexer for the local platform, in part the role the kernel's
//! `/dev/tpmrm0` plays in a VM. A control plane has three TPM users (the bootstrapper, the join
//! service daemon and the verification daemon) sharing the node's swtpm, whose TCTI opens one
//! connection per command. swtpm itself has three transient object slots and forgets nothing
//! when a client dies: a daemon killed while its attestation key was loaded would leave the key
//! in a slot, and after a restart or two no client could load a key any more.
//!
//! So the bootstrapper serves the swtpm protocol on its own unix socket, forwards each command
//! whole over one connection to swtpm, and remembers which process (the socket peer's pid)
//! loaded which transient object; the objects of a process that ended are flushed. (Sessions
//! are not tracked: the TPM may hand a closed session's handle to another client.)
//!
//! The control channel (`<socket>.ctrl`) is answered here and never reaches swtpm: a client
//! must not power-cycle the TPM the node's other clients use (see [`serve_ctrl`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The multiplexer's socket next to the node's swtpm socket.
pub const MUX_SOCKET: &str = "mux.sock";

/// Where the multiplexer listens: beside the swtpm's data socket, in the same private (0700)
/// folder. The launcher chose that folder short enough for `swtpm.sock.ctrl` (a unix socket
/// path has at most 107 bytes: a deep node folder gets one under the temporary directory), so
/// `mux.sock.ctrl`, shorter, fits too.
pub fn mux_socket_beside(swtpm_socket: &Path) -> PathBuf {
    swtpm_socket.with_file_name(MUX_SOCKET)
}
/// swtpm's (and the TCTI's) suffix of the control socket.
const CTRL_SUFFIX: &str = ".ctrl";
/// Header of a TPM 2.0 command or response: tag (2), size (4), command or response code (4).
const HEADER: usize = 10;
/// Largest command or response the TPM 2.0 reference implementation handles.
const MAX_MESSAGE: usize = 4096;

const TPM_ST_NO_SESSIONS: u16 = 0x8001;
const TPM_CC_FLUSH_CONTEXT: u32 = 0x0000_0165;
/// Commands whose response's first handle is a newly loaded object.
const LOADING_COMMANDS: [u32; 5] = [
    0x0000_0131, // CreatePrimary
    0x0000_0157, // Load
    0x0000_0167, // LoadExternal
    0x0000_0191, // CreateLoaded
    0x0000_0161, // ContextLoad
];
const TRANSIENT_HANDLE_TYPE: u32 = 0x80;

/// Why the multiplexer could not start.
#[derive(Debug, thiserror::Error)]
pub enum TpmMuxError {
    #[error("TCTI {0:?} is not a swtpm unix socket (swtpm:path=...): nothing to multiplex")]
    NotSwtpm(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The TCTI of a swtpm listening on `socket`.
pub fn swtpm_tcti(socket: &Path) -> String {
    format!("swtpm:path={}", socket.display())
}

/// The socket path of a `swtpm:path=<socket>` TCTI.
pub fn swtpm_socket(tcti: &str) -> Option<PathBuf> {
    let rest = tcti.strip_prefix("swtpm:")?;
    rest.split(',')
        .find_map(|kv| kv.strip_prefix("path="))
        .map(PathBuf::from)
}

fn ctrl_path(socket: &Path) -> PathBuf {
    let mut ctrl = socket.as_os_str().to_owned();
    ctrl.push(CTRL_SUFFIX);
    PathBuf::from(ctrl)
}

/// How often the objects of ended processes are looked for.
const REAP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The transient objects each client process loaded, by pid.
type Owners = Arc<Mutex<BTreeMap<u32, BTreeSet<u32>>>>;

/// A running multiplexer (its threads live as long as the process).
#[derive(Debug, Clone)]
pub struct TpmMux {
    socket: PathBuf,
}

impl TpmMux {
    /// Serves the TPM of the swtpm TCTI `upstream_tcti` on `socket` (and `<socket>.ctrl`).
    /// Must be called within a tokio runtime (it accepts clients there).
    pub fn start(upstream_tcti: &str, socket: &Path) -> Result<Self, TpmMuxError> {
        let upstream_socket = swtpm_socket(upstream_tcti)
            .ok_or_else(|| TpmMuxError::NotSwtpm(upstream_tcti.to_owned()))?;
        let upstream = Arc::new(Mutex::new(Upstream {
            path: upstream_socket.clone(),
            stream: None,
        }));
        let data = bind(socket)?;
        let ctrl = bind(&ctrl_path(socket))?;
        let owners = Owners::default();
        let (reaper_upstream, reaper_owners) = (upstream.clone(), owners.clone());
        std::thread::Builder::new()
            .name("tpm-mux-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(REAP_INTERVAL);
                reap(&reaper_upstream, &reaper_owners);
            })
            .map_err(|source| TpmMuxError::Io {
                path: socket.to_owned(),
                source,
            })?;
        // Accepted on the runtime, which tells the peer's pid; served on a thread of its own
        // (the swtpm protocol is synchronous).
        data.set_nonblocking(true)
            .map_err(|source| TpmMuxError::Io {
                path: socket.to_owned(),
                source,
            })?;
        let data = tokio::net::UnixListener::from_std(data).map_err(|source| TpmMuxError::Io {
            path: socket.to_owned(),
            source,
        })?;
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = data.accept().await else {
                    continue;
                };
                let pid = client.peer_cred().ok().and_then(|c| c.pid());
                let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
                    tracing::warn!("TPM client without a peer pid refused");
                    continue;
                };
                let Ok(client) = client.into_std().and_then(|c| {
                    c.set_nonblocking(false)?;
                    Ok(c)
                }) else {
                    continue;
                };
                let (upstream, owners) = (upstream.clone(), owners.clone());
                let _ = std::thread::Builder::new()
                    .name("tpm-mux-client".into())
                    .spawn(move || serve_client(client, pid, &upstream, &owners));
            }
        });
        std::thread::Builder::new()
            .name("tpm-mux-ctrl".into())
            .spawn(move || {
                for client in ctrl.incoming().flatten() {
                    let _ = std::thread::Builder::new()
                        .name("tpm-mux-ctrl-client".into())
                        .spawn(move || serve_ctrl(client));
                }
            })
            .map_err(|source| TpmMuxError::Io {
                path: socket.to_owned(),
                source,
            })?;
        tracing::info!(socket = %socket.display(), upstream = %upstream_socket.display(), "TPM multiplexer serving");
        Ok(Self {
            socket: socket.to_owned(),
        })
    }

    /// The TCTI clients use.
    pub fn tcti(&self) -> String {
        swtpm_tcti(&self.socket)
    }
}

fn bind(path: &Path) -> Result<UnixListener, TpmMuxError> {
    let io = |source| TpmMuxError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// The one connection to swtpm, opened on first use and again after an error.
struct Upstream {
    path: PathBuf,
    stream: Option<UnixStream>,
}

impl Upstream {
    /// Sends one command and returns its response.
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        let result = self.try_transact(command);
        if result.is_err() {
            // A broken connection is not reused; the next command connects again.
            self.stream = None;
        }
        result
    }

    fn try_transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        if self.stream.is_none() {
            self.stream = Some(UnixStream::connect(&self.path)?);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(command)?;
        read_message(stream)?.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    }
}

/// One TPM message (command or response) framed by its header's size; `None` on a clean EOF.
fn read_message(stream: &mut UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER];
    let mut read = 0;
    while read < HEADER {
        let n = stream.read(&mut header[read..])?;
        if n == 0 {
            return if read == 0 {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        read += n;
    }
    let size = u32::from_be_bytes(header[2..6].try_into().expect("4 bytes")) as usize;
    if !(HEADER..=MAX_MESSAGE).contains(&size) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("TPM message size {size} outside {HEADER}..={MAX_MESSAGE}"),
        ));
    }
    let mut message = vec![0u8; size];
    message[..HEADER].copy_from_slice(&header);
    stream.read_exact(&mut message[HEADER..])?;
    Ok(Some(message))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    bytes
        .get(offset..offset + 4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
}

/// What `command` and its `response` did to transient objects: one loaded, one flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectChange {
    Loaded(u32),
    Flushed(u32),
}

fn object_change(command: &[u8], response: &[u8]) -> Option<ObjectChange> {
    let code = u32_at(command, 6)?;
    if code == TPM_CC_FLUSH_CONTEXT {
        return u32_at(command, HEADER).map(ObjectChange::Flushed);
    }
    if LOADING_COMMANDS.contains(&code) && u32_at(response, 6) == Some(0) {
        let handle = u32_at(response, HEADER)?;
        if handle >> 24 == TRANSIENT_HANDLE_TYPE {
            return Some(ObjectChange::Loaded(handle));
        }
    }
    None
}

/// Records a change for `pid`. A handle is the TPM's, not the client's: once flushed (by
/// anyone) or loaded again, no other process owns it.
fn record(owners: &Mutex<BTreeMap<u32, BTreeSet<u32>>>, pid: u32, change: ObjectChange) {
    let mut owners = owners.lock().unwrap_or_else(|e| e.into_inner());
    let handle = match change {
        ObjectChange::Loaded(h) | ObjectChange::Flushed(h) => h,
    };
    for handles in owners.values_mut() {
        handles.remove(&handle);
    }
    if let ObjectChange::Loaded(handle) = change {
        owners.entry(pid).or_default().insert(handle);
    }
    owners.retain(|_, handles| !handles.is_empty());
}

fn flush_command(handle: u32) -> Vec<u8> {
    let mut cmd = Vec::with_capacity(14);
    cmd.extend_from_slice(&TPM_ST_NO_SESSIONS.to_be_bytes());
    cmd.extend_from_slice(&14u32.to_be_bytes());
    cmd.extend_from_slice(&TPM_CC_FLUSH_CONTEXT.to_be_bytes());
    cmd.extend_from_slice(&handle.to_be_bytes());
    cmd
}

/// Whether process `pid` still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z') | Some('X') | None)
    })
}

/// Flushes the transient objects of processes that ended.
fn reap(upstream: &Mutex<Upstream>, owners: &Owners) {
    let dead: Vec<(u32, BTreeSet<u32>)> = {
        let mut owners = owners.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<u32> = owners.keys().copied().filter(|p| !alive(*p)).collect();
        dead.into_iter()
            .filter_map(|pid| owners.remove(&pid).map(|h| (pid, h)))
            .collect()
    };
    for (pid, handles) in dead {
        let mut upstream = upstream.lock().unwrap_or_else(|e| e.into_inner());
        for handle in handles {
            let flushed = upstream.transact(&flush_command(handle));
            tracing::info!(
                pid,
                handle = format!("{handle:#x}"),
                ok = flushed.is_ok(),
                "flushed a transient object of a TPM client that ended"
            );
        }
    }
}

fn serve_client(mut client: UnixStream, pid: u32, upstream: &Mutex<Upstream>, owners: &Owners) {
    loop {
        let command = match read_message(&mut client) {
            Ok(Some(command)) => command,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("TPM client sent a malformed command: {e}");
                break;
            }
        };
        let response = {
            let mut upstream = upstream.lock().unwrap_or_else(|e| e.into_inner());
            upstream.transact(&command)
        };
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!("TPM unreachable: {e}");
                break;
            }
        };
        if let Some(change) = object_change(&command, &response) {
            record(owners, pid, change);
        }
        if client.write_all(&response).is_err() {
            break;
        }
    }
}

/// swtpm control commands a TCTI may send (`swtpm/tpm_ioctl.h`).
const CMD_INIT: u32 = 2;
const CMD_SET_LOCALITY: u32 = 5;
const TPM_SUCCESS: u32 = 0;
const TPM_FAIL: u32 = 0x101;

/// Answers one client's control channel. Nothing reaches the real swtpm: `CMD_INIT` would
/// reset the node's TPM (its PCRs and every client's keys) and is acknowledged without effect,
/// `CMD_SET_LOCALITY` is acknowledged (every client uses locality 0), everything else fails.
fn serve_ctrl(mut client: UnixStream) {
    let mut command = [0u8; 4];
    while client.read_exact(&mut command).is_ok() {
        let command = u32::from_be_bytes(command);
        let payload = match command {
            CMD_INIT => 4,
            CMD_SET_LOCALITY => 1,
            _ => {
                tracing::debug!(command, "TPM control command refused");
                let _ = client.write_all(&TPM_FAIL.to_be_bytes());
                return;
            }
        };
        let mut ignored = [0u8; 4];
        if client.read_exact(&mut ignored[..payload]).is_err() {
            return;
        }
        tracing::debug!(command, "TPM control command acknowledged without effect");
        if client.write_all(&TPM_SUCCESS.to_be_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swtpm_socket_is_read_from_the_tcti() {
        assert_eq!(
            swtpm_socket("swtpm:path=/n/tpm/swtpm.sock"),
            Some(PathBuf::from("/n/tpm/swtpm.sock"))
        );
        assert_eq!(swtpm_socket("device:/dev/tpmrm0"), None);
        assert_eq!(
            swtpm_tcti(Path::new("/n/mux.sock")),
            "swtpm:path=/n/mux.sock"
        );
    }

    #[test]
    fn loaded_transients_are_owned_until_flushed_by_anyone() {
        let owners = Owners::default();
        let create_primary = [0x80, 0x02, 0, 0, 0, 10, 0, 0, 0x01, 0x31];
        let ok_with_handle = [0x80, 0x02, 0, 0, 0, 14, 0, 0, 0, 0, 0x80, 0, 0, 1];
        let loaded = object_change(&create_primary, &ok_with_handle);
        assert_eq!(loaded, Some(ObjectChange::Loaded(0x8000_0001)));
        let failed = [0x80, 0x02, 0, 0, 0, 14, 0, 0, 0x09, 0x02, 0x80, 0, 0, 2];
        assert_eq!(object_change(&create_primary, &failed), None);
        record(&owners, 7, loaded.unwrap());
        assert_eq!(owners.lock().unwrap()[&7], BTreeSet::from([0x8000_0001]));
        let flushed = object_change(&flush_command(0x8000_0001), &[0; 10]).unwrap();
        record(&owners, 8, flushed);
        assert!(owners.lock().unwrap().is_empty());
    }
}
