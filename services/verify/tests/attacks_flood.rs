//! Floods against the verification service (issue 14 §5): anyone may ask a node for evidence,
//! so silent connections must not hold the listener and a flood of requests must queue for the
//! TPM a few at a time instead of piling up blocked threads. Real swtpm.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::tpm::Swtpm;
use constellation_attestation::variant::issuer_for;
use constellation_attestation::{Issuer, Variant};
use constellation_common::limits::ListenerLimits;
use constellation_proto::verify::verify_service_client::VerifyServiceClient;
use constellation_proto::verify::GetAttestationRequest;
use constellation_proto::PROTOCOL_VERSION;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

struct Node {
    addr: SocketAddr,
    _swtpm: Swtpm,
    _dir: tempfile::TempDir,
}

async fn serve(limits: ListenerLimits) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path()).expect("swtpm must be installed");
    let issuer: Arc<dyn Issuer> = Arc::new(issuer_for(Variant::QemuVtpm, &swtpm.tcti()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(constellation_verify::serve(
        listener,
        issuer,
        limits,
        std::future::pending(),
    ));
    Node {
        addr,
        _swtpm: swtpm,
        _dir: dir,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn request() -> GetAttestationRequest {
    GetAttestationRequest {
        version: PROTOCOL_VERSION,
        nonce: vec![0x42; 32],
        user_data: Vec::new(),
    }
}

/// Threads of this process (the server runs in it), from /proc.
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_exhaust_the_verification_service() {
    const SLOTS: usize = 4;
    const IDLE: usize = 40;
    let handshake_timeout = Duration::from_millis(300);
    let node = serve(ListenerLimits {
        max_connections: SLOTS,
        handshake_timeout,
        ..ListenerLimits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(node.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let started = Instant::now();
    let answer = VerifyServiceClient::new(channel(node.addr).await)
        .get_attestation(request())
        .await
        .expect("the honest verifier is answered despite the idle connections");
    let waited = started.elapsed();
    assert!(!answer.into_inner().attestation.is_empty());
    let bound = handshake_timeout * (IDLE / SLOTS + 2) as u32 + Duration::from_secs(2);
    assert!(
        waited < bound,
        "honest request took {waited:?} (bound {bound:?})"
    );

    // Plain TCP has no TLS handshake: a connection that sends nothing within the deadline is
    // closed all the same.
    for mut tcp in idle {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection is still open: {read:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quote_flood_does_not_pile_up_blocked_threads_or_starve_the_honest_verifier() {
    const CONNECTIONS: usize = 16;
    const STREAMS: usize = 8;
    let limits = ListenerLimits::default();
    let node = serve(limits).await;
    // Warm up (the first quote loads the AK), then take the baseline.
    VerifyServiceClient::new(channel(node.addr).await)
        .get_attestation(request())
        .await
        .unwrap();
    let baseline = threads();

    // 128 requests in flight at any time for three seconds.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut flood = Vec::new();
    for _ in 0..CONNECTIONS {
        let ch = channel(node.addr).await;
        for _ in 0..STREAMS {
            let mut client = VerifyServiceClient::new(ch.clone());
            flood.push(tokio::spawn(async move {
                let mut answered = 0usize;
                while Instant::now() < deadline {
                    if client.get_attestation(request()).await.is_ok() {
                        answered += 1;
                    }
                }
                answered
            }));
        }
    }
    let mut peak_threads = 0;
    let sampler = async {
        while Instant::now() < deadline {
            peak_threads = peak_threads.max(threads());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let honest = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let answer = VerifyServiceClient::new(channel(node.addr).await)
            .get_attestation(request())
            .await;
        (answer, started.elapsed())
    };
    let ((answer, waited), ()) = tokio::join!(honest, sampler);
    answer.expect("the honest verifier is answered during the flood");
    let mut answered = 0;
    for task in flood {
        answered += task.await.unwrap();
    }
    assert!(answered > 0, "the flood itself was served too");
    // A request waits for the TPM behind at most the requests in flight before it.
    let bound = limits.expensive_work_wait;
    assert!(
        waited < bound,
        "honest request took {waited:?} during the flood (bound {bound:?})"
    );
    // Without the gate each request parks a blocking thread on the TPM: 128 more threads.
    assert!(
        peak_threads < baseline + 32,
        "threads rose from {baseline} to {peak_threads} during the flood"
    );
}
