//! Graceful shutdown: the first SIGTERM or SIGINT marks the daemon not ready and tells its
//! servers to stop accepting; in-flight requests then get the configured grace period.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::health::Health;

/// A cloneable "shutdown began" signal for servers' `serve_with_shutdown`.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown began.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn begun(&self) -> bool {
        *self.0.borrow()
    }
}

/// Installs the SIGTERM/SIGINT handlers and returns the signal; on the first signal `health`
/// turns not ready.
pub fn on_signal(health: Health) -> std::io::Result<Shutdown> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = which,
            "shutting down: no new connections, in-flight requests finish"
        );
        health.set_not_ready("shutting down");
        let _ = tx.send(true);
        // Keep the handlers installed (a second signal must not kill the process mid-drain).
        std::future::pending::<()>().await;
        drop((term, int));
    });
    Ok(Shutdown(rx))
}

/// Waits for `servers` (each stopping on `shutdown`) after shutdown began, at most `grace`.
/// Returns whether they all finished in time.
pub async fn drain(shutdown: Shutdown, grace: Duration, servers: impl Future<Output = ()>) -> bool {
    let mut servers = std::pin::pin!(servers);
    tokio::select! {
        _ = &mut servers => return true,
        _ = shutdown.wait() => {}
    }
    match tokio::time::timeout(grace, servers).await {
        Ok(()) => {
            tracing::info!("all in-flight requests finished");
            true
        }
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "in-flight requests did not finish within the grace period"
            );
            false
        }
    }
}
