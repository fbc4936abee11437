//! Test support (feature `testing`): the daemons' integration tests start the real binaries,
//! probe their health server, signal them and read everything they printed; a real swtpm can
//! be started on ports chosen in advance (to start a daemon before its TPM exists).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A free loopback port (free now; tests bind it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A running daemon process with its stdout and stderr collected.
pub struct Daemon {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Daemon {
    /// Starts `bin` with `args` (and `RUST_LOG=debug`, so even debug lines are checked for secrets).
    pub fn start(bin: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Self { child, output }
    }

    /// Everything printed so far (lossy UTF-8).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Everything printed so far, raw.
    pub fn output_bytes(&self) -> Vec<u8> {
        self.output.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the daemon");
    }

    /// The exit status, waiting at most `timeout` (then kills it and panics).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit within {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `GET path` on `health` until it answers `status`, at most `timeout`.
    pub async fn wait_status(
        &self,
        health: SocketAddr,
        path: &str,
        status: u16,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((code, _)) = crate::health::probe(health, path).await {
                if code == status {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{path} on {health} did not answer {status} within {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `bin args` to completion: (exit status, stdout + stderr).
pub fn run(bin: &str, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// Runs `bin --help` and asserts it succeeds and mentions every one of `needles`.
pub fn assert_help_mentions(bin: &str, needles: &[&str]) {
    let (status, out) = run(bin, &["--help"]);
    assert!(status.success(), "{out}");
    for needle in needles {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

/// A swtpm process on fixed loopback ports (server `port`, control `port + 1`), killed on drop.
pub struct SwtpmProcess(Child);

impl SwtpmProcess {
    /// Two consecutive free ports for [`SwtpmProcess::start`].
    pub fn free_ports() -> u16 {
        loop {
            let port = free_port();
            if port < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
                return port;
            }
        }
    }

    /// The TCTI string for a swtpm on `port`.
    pub fn tcti(port: u16) -> String {
        format!("swtpm:host=127.0.0.1,port={port}")
    }

    /// Starts swtpm (`$SWTPM` or `swtpm`) with its state in `state_dir`, waiting until it accepts.
    pub fn start(state_dir: &Path, port: u16) -> Self {
        let binary = std::env::var("SWTPM").unwrap_or_else(|_| "swtpm".into());
        let child = Command::new(&binary)
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port + 1)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen on {port}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A unary gRPC call held in flight: the request message is sent at once, but the request
/// stream ends only when `release` fires, and tonic's unary server waits for that end before it
/// answers. So the server holds an in-flight request exactly as long as the test wants.
pub async fn held_unary<Req, Resp>(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: Req,
    release: tokio::sync::oneshot::Receiver<()>,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request).await.expect("queue the request");
    tokio::spawn(async move {
        let _ = release.await;
        drop(tx);
    });
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.client_streaming(
        tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}
