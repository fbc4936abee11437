//! Hot reload: files whose modification time, size or inode changed (ConfigMap updates swap a
//! symlink, so the inode changes too), checked every interval and on SIGHUP. A reload that
//! fails keeps the last good state and logs why.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(i64, i64, u64, u64)>);

fn stamp(path: &PathBuf) -> Stamp {
    Stamp(
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.len(), m.ino())),
    )
}

/// Calls `reload` whenever one of `files` changed (or SIGHUP arrived), every `interval`, until
/// the process exits. `reload` returns a description of what it loaded, or why it failed.
pub fn spawn(
    what: &'static str,
    files: Vec<PathBuf>,
    interval: Duration,
    reload: impl Fn() -> Result<String, String> + Send + 'static,
) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut seen: Vec<Stamp> = files.iter().map(stamp).collect();
    tokio::spawn(async move {
        loop {
            let forced = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = hup.recv() => true,
            };
            let now: Vec<Stamp> = files.iter().map(stamp).collect();
            if !forced && now == seen {
                continue;
            }
            seen = now;
            match reload() {
                Ok(loaded) => tracing::info!(what, %loaded, sighup = forced, "reloaded"),
                Err(error) => {
                    tracing::warn!(what, %error, "reload failed; keeping the previous version")
                }
            }
        }
    });
    Ok(())
}

/// Retries `load` every `interval` until it succeeds, logging each new reason once; gives up
/// only when `stop` returns true (shutdown began), with `None`.
pub async fn until_loaded<T, E, F>(
    what: &'static str,
    interval: Duration,
    stop: impl Fn() -> bool,
    mut load: impl FnMut() -> F,
) -> Option<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut last = String::new();
    loop {
        match load().await {
            Ok(value) => return Some(value),
            Err(reason) => {
                let reason = reason.to_string();
                if reason != last {
                    tracing::warn!(what, %reason, "not loaded yet; retrying");
                    last = reason;
                }
            }
        }
        if stop() {
            return None;
        }
        tokio::time::sleep(interval).await;
        if stop() {
            return None;
        }
    }
}
