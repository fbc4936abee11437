//! A TPM command multiplexer for the local platform, in the role the kernel's `/dev/tpmrm0`
//! plays in a VM: swtpm serves one client connection at a time, but a control plane has three
//! TPM users (the bootstrapper, the join service daemon and the verification daemon). The
//! bootstrapper holds the one connection to the node's swtpm and serves the same protocol on its
//! own unix socket; each command is forwarded whole and its response returned before the next
//! client's command goes through.
//!
//! Like a resource manager it cleans up after a client: transient objects a client loaded
//! (its attestation key) are flushed when its connection closes, so a daemon killed and started
//! again does not exhaust swtpm's three transient object slots. (Sessions are not tracked: the
//! TPM may hand a closed session's handle to another client.)
//!
//! The control channel (`<socket>.ctrl`) is passed through connection by connection.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The multiplexer's socket next to the node's swtpm socket.
pub const MUX_SOCKET: &str = "tpm-mux.sock";
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

/// A running multiplexer (its threads live as long as the process).
#[derive(Debug, Clone)]
pub struct TpmMux {
    socket: PathBuf,
}

impl TpmMux {
    /// Serves the TPM of the swtpm TCTI `upstream_tcti` on `socket` (and `<socket>.ctrl`).
    pub fn start(upstream_tcti: &str, socket: &Path) -> Result<Self, TpmMuxError> {
        let upstream_socket = swtpm_socket(upstream_tcti)
            .ok_or_else(|| TpmMuxError::NotSwtpm(upstream_tcti.to_owned()))?;
        let upstream = Arc::new(Mutex::new(Upstream {
            path: upstream_socket.clone(),
            stream: None,
        }));
        let data = bind(socket)?;
        let ctrl = bind(&ctrl_path(socket))?;
        std::thread::Builder::new()
            .name("tpm-mux".into())
            .spawn(move || {
                for client in data.incoming().flatten() {
                    let upstream = upstream.clone();
                    let _ = std::thread::Builder::new()
                        .name("tpm-mux-client".into())
                        .spawn(move || serve_client(client, &upstream));
                }
            })
            .map_err(|source| TpmMuxError::Io {
                path: socket.to_owned(),
                source,
            })?;
        let upstream_ctrl = ctrl_path(&upstream_socket);
        std::thread::Builder::new()
            .name("tpm-mux-ctrl".into())
            .spawn(move || {
                for client in ctrl.incoming().flatten() {
                    let upstream_ctrl = upstream_ctrl.clone();
                    let _ = std::thread::Builder::new()
                        .name("tpm-mux-ctrl-client".into())
                        .spawn(move || pass_through(client, &upstream_ctrl));
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

/// Which transient objects `command` and its `response` loaded or flushed.
fn track(command: &[u8], response: &[u8], loaded: &mut BTreeSet<u32>) {
    let Some(code) = u32_at(command, 6) else {
        return;
    };
    if code == TPM_CC_FLUSH_CONTEXT {
        if let Some(handle) = u32_at(command, HEADER) {
            loaded.remove(&handle);
        }
        return;
    }
    if LOADING_COMMANDS.contains(&code) && u32_at(response, 6) == Some(0) {
        if let Some(handle) = u32_at(response, HEADER) {
            if handle >> 24 == TRANSIENT_HANDLE_TYPE {
                loaded.insert(handle);
            }
        }
    }
}

fn flush_command(handle: u32) -> Vec<u8> {
    let mut cmd = Vec::with_capacity(14);
    cmd.extend_from_slice(&TPM_ST_NO_SESSIONS.to_be_bytes());
    cmd.extend_from_slice(&14u32.to_be_bytes());
    cmd.extend_from_slice(&TPM_CC_FLUSH_CONTEXT.to_be_bytes());
    cmd.extend_from_slice(&handle.to_be_bytes());
    cmd
}

fn serve_client(mut client: UnixStream, upstream: &Mutex<Upstream>) {
    let mut loaded = BTreeSet::new();
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
        track(&command, &response, &mut loaded);
        if client.write_all(&response).is_err() {
            break;
        }
    }
    if !loaded.is_empty() {
        let mut upstream = upstream.lock().unwrap_or_else(|e| e.into_inner());
        for handle in &loaded {
            let flushed = upstream.transact(&flush_command(*handle));
            tracing::debug!(
                handle = format!("{handle:#x}"),
                ok = flushed.is_ok(),
                "flushed a closed client's transient object"
            );
        }
    }
}

/// Copies a control-channel connection both ways until either side closes.
fn pass_through(client: UnixStream, upstream: &Path) {
    let Ok(server) = UnixStream::connect(upstream) else {
        return;
    };
    let (Ok(mut client_read), Ok(mut server_write)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let _ = std::io::copy(&mut server_read, &mut client_write);
    let _ = client_write.shutdown(std::net::Shutdown::Write);
    let _ = forward.join();
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
            swtpm_tcti(Path::new("/n/tpm-mux.sock")),
            "swtpm:path=/n/tpm-mux.sock"
        );
    }

    #[test]
    fn loaded_transients_are_tracked_until_flushed() {
        let mut loaded = BTreeSet::new();
        let create_primary = [0x80, 0x02, 0, 0, 0, 10, 0, 0, 0x01, 0x31];
        let ok_with_handle = [0x80, 0x02, 0, 0, 0, 14, 0, 0, 0, 0, 0x80, 0, 0, 1];
        track(&create_primary, &ok_with_handle, &mut loaded);
        assert_eq!(loaded, BTreeSet::from([0x8000_0001]));
        let failed = [0x80, 0x02, 0, 0, 0, 14, 0, 0, 0x09, 0x02, 0x80, 0, 0, 2];
        track(&create_primary, &failed, &mut loaded);
        assert_eq!(loaded.len(), 1);
        track(&flush_command(0x8000_0001), &[0; 10], &mut loaded);
        assert!(loaded.is_empty());
    }
}
