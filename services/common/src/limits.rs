//! The limits every listener of a node applies, in one place, so that a flood of connections or
//! requests stalls nothing and exhausts nothing (issue 14 §5).
//!
//! [`ListenerLimits`] is applied at three points, all reached through this type:
//! - the accept loop of [`crate::tls`] (TLS, aTLS and plain TCP): at most
//!   [`ListenerLimits::max_connections`] sockets are held at once (the next connection waits in
//!   the kernel's backlog, not in our memory), and the TLS handshake (plus aTLS's nonce/evidence
//!   exchange, or the first bytes on plain TCP) must finish within
//!   [`ListenerLimits::handshake_timeout`], so a client that connects and sends nothing frees
//!   its slot;
//! - the tonic server ([`ListenerLimits::server`]): HTTP/2 streams per connection, a deadline on
//!   every request (reading the request included), small flow-control windows, and an age after
//!   which a connection is closed (an established but idle connection frees its slot); each
//!   service sets its decoding cap to [`ListenerLimits::max_message_bytes`] (tonic reserves a
//!   message's declared length once its 5-byte header passed that cap, so a stream holds at
//!   most the cap; aTLS frames grow only as their bytes arrive);
//! - [`WorkGate`] ([`ListenerLimits::work_gate`]): expensive work a request can trigger before
//!   it is authenticated (Argon2 of the init secret, a LUKS unlock for Recover, a TPM quote)
//!   runs at most [`ListenerLimits::expensive_work_permits`] at a time, and a request that
//!   cannot get a permit within [`ListenerLimits::expensive_work_wait`] is refused with
//!   `RESOURCE_EXHAUSTED` instead of queueing without bound. The permits are handed out first
//!   come, first served, so a flood of wrong secrets delays the right one by at most the work
//!   queued ahead of it.
//!
//! Worst-case memory of one listener under a flood is roughly
//! `max_connections × (TLS buffers + FLOW_CONTROL_WINDOW + max_concurrent_streams ×
//! max_message_bytes)` plus `expensive_work_permits` × the work's own memory (19 MiB for an
//! Argon2 check); with the defaults that is far below the node's memory. The figures measured
//! under a flood are in docs/SPECIFICATION.md.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::Server;

/// Default [`ListenerLimits::max_connections`]: well above the few honest clients of a node
/// (the provider, joining nodes, verifiers), and a few hundred idle sockets cost little memory.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default [`ListenerLimits::max_concurrent_streams`]: gRPC clients of these services send one
/// request at a time per connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 8;
/// Default [`ListenerLimits::handshake_timeout`]: a TLS handshake plus one TPM quote.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ListenerLimits::request_timeout`]: the slowest unary request (a join ticket with a
/// key-service round trip, a Recover with a LUKS unlock) takes well under a second.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ListenerLimits::max_message_bytes`]: the largest request (Init with KMIP
/// credentials) is a few KiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default [`ListenerLimits::max_connection_age`].
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Default [`ListenerLimits::max_connection_age_grace`]: long enough for Init's streamed
/// progress (the only response that outlives its request's deadline).
pub const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(600);
/// Default [`ListenerLimits::expensive_work_permits`]: the CI machine has two cores.
pub const DEFAULT_EXPENSIVE_WORK_PERMITS: usize = 2;
/// Default [`ListenerLimits::expensive_work_wait`].
pub const DEFAULT_EXPENSIVE_WORK_WAIT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control window per stream and per connection (the protocol's own default,
/// instead of hyper's 1 MiB): bounds what a client can make the server buffer unread.
pub const FLOW_CONTROL_WINDOW: u32 = 65_535;
/// Largest HTTP/2 header list accepted (gRPC's headers are a few hundred bytes).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// What one listener allows its clients. See the module documentation for where each limit is
/// applied; `Default` gives the documented defaults, which every node service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Sockets held at once, handshaking or established.
    pub max_connections: usize,
    /// HTTP/2 streams (concurrent requests) per connection.
    pub max_concurrent_streams: u32,
    /// Time from accept until the connection is ready for gRPC: the TLS handshake and, for
    /// aTLS, the nonce/evidence exchange; on plain TCP, until the client sends its first bytes.
    pub handshake_timeout: Duration,
    /// Deadline of one request, from its headers to the response headers (reading the request
    /// body and waiting for a [`WorkGate`] included).
    pub request_timeout: Duration,
    /// Largest gRPC request message a service decodes.
    pub max_message_bytes: usize,
    /// After this age a connection gets a GOAWAY: an idle one closes at once, a busy one after
    /// its requests finish.
    pub max_connection_age: Duration,
    /// How long a connection past its age may still finish its requests before it is closed.
    pub max_connection_age_grace: Duration,
    /// How many expensive operations of one kind run at once.
    pub expensive_work_permits: usize,
    /// How long a request waits for an expensive-work permit before it is refused.
    pub expensive_work_wait: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
            expensive_work_permits: DEFAULT_EXPENSIVE_WORK_PERMITS,
            expensive_work_wait: DEFAULT_EXPENSIVE_WORK_WAIT,
        }
    }
}

impl ListenerLimits {
    /// A tonic server builder with these limits (streams, request deadline, flow-control
    /// windows, header size, connection age). Each service added to it must also get
    /// `.max_decoding_message_size(limits.max_message_bytes)`.
    pub fn server(&self) -> Server {
        Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .concurrency_limit_per_connection(self.max_concurrent_streams as usize)
            .timeout(self.request_timeout)
            .initial_stream_window_size(FLOW_CONTROL_WINDOW)
            .initial_connection_window_size(FLOW_CONTROL_WINDOW)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_connection_age(self.max_connection_age)
            .max_connection_age_grace(self.max_connection_age_grace)
    }

    /// A gate for one kind of expensive work (`work` names it in errors and logs). Clones share
    /// the permits: make one per kind of work and listener, and clone it into the handlers.
    pub fn work_gate(&self, work: &'static str) -> WorkGate {
        WorkGate {
            work,
            permits: Arc::new(Semaphore::new(self.expensive_work_permits)),
            permit_count: self.expensive_work_permits,
            max_wait: self.expensive_work_wait,
            workers: Workers::spawn(work, self.expensive_work_permits),
        }
    }

    /// The connection slots an accept loop hands out.
    pub(crate) fn connection_slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.max_connections))
    }
}

/// Why a [`WorkGate`] did not run the work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error(
        "too many requests: no {work} slot of {permits} became free within {waited:?}; try again"
    )]
    Busy {
        work: &'static str,
        permits: usize,
        waited: Duration,
    },
    #[error("the {work} task did not finish (panicked or cancelled)")]
    Aborted { work: &'static str },
}

impl From<GateError> for tonic::Status {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Busy { .. } => tonic::Status::resource_exhausted(e.to_string()),
            GateError::Aborted { .. } => tonic::Status::internal(e.to_string()),
        }
    }
}

/// At most a few expensive operations of one kind at once, first come first served, with a
/// bounded wait (see the module documentation).
#[derive(Debug, Clone)]
pub struct WorkGate {
    work: &'static str,
    permits: Arc<Semaphore>,
    permit_count: usize,
    max_wait: Duration,
    workers: Arc<Workers>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The gate's own threads, one per permit. Blocking work runs on them rather than on tokio's
/// blocking pool: the allocator keeps a freed 19 MiB Argon2 buffer in the arena of the thread
/// that used it, so work spread over the pool's many threads would leave one such buffer per
/// arena (up to 8 per core) resident; on the gate's threads it is one per permit.
struct Workers {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

impl Workers {
    /// `count` threads taking jobs until the last clone of the gate is dropped.
    fn spawn(work: &'static str, count: usize) -> Arc<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..count.max(1) {
            let queue = queue.clone();
            let spawned =
                std::thread::Builder::new()
                    .name("work-gate".into())
                    .spawn(move || loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job drops its result sender: the caller sees `Aborted`.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    });
            if let Err(error) = spawned {
                tracing::error!(work, %error, "starting a work-gate thread failed");
            }
        }
        Arc::new(Self { jobs })
    }
}

impl WorkGate {
    /// Waits (at most the gate's bound) for a permit; the work holds it until dropped.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, GateError> {
        let busy = GateError::Busy {
            work: self.work,
            permits: self.permit_count,
            waited: self.max_wait,
        };
        match tokio::time::timeout(self.max_wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a full gate.
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(work = self.work, waited = ?self.max_wait, "expensive work refused: gate full");
                Err(busy)
            }
        }
    }

    /// Runs blocking `work` on one of the gate's threads once a permit is free. The permit
    /// moves into the job, so a caller that gives up (a request deadline) does not free the
    /// slot before the work really ended.
    pub async fn run_blocking<T, F>(&self, work: F) -> Result<T, GateError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self.enter().await?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
            drop(permit);
        });
        let aborted = GateError::Aborted { work: self.work };
        self.workers.jobs.send(job).map_err(|_| aborted.clone())?;
        result.await.map_err(|_| aborted)
    }

    /// Runs async `work` while holding a permit.
    pub async fn run<T>(&self, work: impl Future<Output = T>) -> Result<T, GateError> {
        let _permit = self.enter().await?;
        Ok(work.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_gate_refuses_after_its_bounded_wait_and_frees_its_permit_after_the_work() {
        let limits = ListenerLimits {
            expensive_work_permits: 1,
            expensive_work_wait: Duration::from_millis(50),
            ..ListenerLimits::default()
        };
        let gate = limits.work_gate("test work");
        let held = gate.enter().await.unwrap();
        let refused = gate.run_blocking(|| 1).await.unwrap_err();
        assert_eq!(
            refused,
            GateError::Busy {
                work: "test work",
                permits: 1,
                waited: Duration::from_millis(50)
            }
        );
        assert_eq!(
            tonic::Status::from(refused).code(),
            tonic::Code::ResourceExhausted
        );
        drop(held);
        assert_eq!(gate.run_blocking(|| 2).await.unwrap(), 2);
        assert_eq!(gate.run(async { 3 }).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_panicking_job_is_aborted_and_the_gate_keeps_working() {
        let gate = ListenerLimits::default().work_gate("test work");
        let panicked = gate.run_blocking(|| -> u8 { panic!("boom") }).await;
        assert_eq!(panicked, Err(GateError::Aborted { work: "test work" }));
        for n in 0..4 {
            assert_eq!(gate.run_blocking(move || n).await.unwrap(), n);
        }
    }
}
