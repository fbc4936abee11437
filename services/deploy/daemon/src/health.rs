//! HTTP health endpoints for kubelet probes and supervisors:
//! - `GET /healthz`: 200 while the process serves HTTP (liveness).
//! - `GET /readyz`: 200 once the daemon's keys and policy are loaded and its service listens,
//!   503 with the reason before that and after shutdown began (readiness).
//!
//! A deliberately small HTTP/1.1 responder (one request per connection): the probes need
//! nothing more, and it keeps the daemons free of an HTTP framework.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Longest request head read; probes send a few hundred bytes.
const MAX_REQUEST: usize = 4096;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Readiness of one daemon, shared by its tasks.
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<Mutex<Result<(), String>>>,
}

impl Health {
    /// Not ready, for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            state: Arc::new(Mutex::new(Err(reason.into()))),
        }
    }

    pub fn set_ready(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_err() {
            tracing::info!("ready");
        }
        *s = Ok(());
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.as_ref().err() != Some(&reason) {
            tracing::info!(%reason, "not ready");
        }
        *s = Err(reason);
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Binds the health server (errors here are the caller's to report).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Answers probes on `listener` until the process exits.
pub async fn serve(listener: TcpListener, health: Health) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn)).await {
                Ok(Some(head)) => respond(&head, &health),
                _ => reply(400, "bad request\n"),
            };
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

fn respond(head: &str, health: &Health) -> String {
    let mut parts = head.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != "GET" && method != "HEAD" {
        return reply(405, "only GET\n");
    }
    match target.split('?').next().unwrap_or_default() {
        "/healthz" | "/livez" => reply(200, "ok\n"),
        "/readyz" => match health.readiness() {
            Ok(()) => reply(200, "ready\n"),
            Err(reason) => reply(503, &format!("not ready: {reason}\n")),
        },
        _ => reply(404, "not found\n"),
    }
}

fn reply(status: u16, body: &str) -> String {
    let text = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Client side for tests and supervisors: the status code of `GET path` on `addr`.
pub async fn probe(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    // `connection: close`: the answer is read to EOF, and an HTTP/1.1 server that keeps the
    // connection open (etcd's /health) would otherwise never end it.
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    conn.read_to_string(&mut out).await?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_the_state() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new("keys not loaded");
        tokio::spawn(serve(listener, health.clone()));
        assert_eq!(probe(addr, "/healthz").await.unwrap().0, 200);
        let (code, body) = probe(addr, "/readyz").await.unwrap();
        assert_eq!((code, body.as_str()), (503, "not ready: keys not loaded\n"));
        health.set_ready();
        assert_eq!(probe(addr, "/readyz").await.unwrap().0, 200);
        health.set_not_ready("shutting down");
        assert_eq!(probe(addr, "/readyz").await.unwrap().0, 503);
        assert_eq!(probe(addr, "/nope").await.unwrap().0, 404);
    }
}
