//! `constellation-verify` as a process: config errors, --help, readiness after the TPM is
//! available, SIGTERM with a request in flight. Real swtpm, real binary.

use std::time::Duration;

use constellation_daemon::testing::{
    assert_help_mentions, free_addr, held_unary, run, Daemon, SwtpmProcess,
};
use constellation_proto::verify::verify_service_client::VerifyServiceClient;
use constellation_proto::verify::{GetAttestationRequest, GetAttestationResponse};
use constellation_proto::PROTOCOL_VERSION;
use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_constellation-verify");
const PATH: &str = "/constellation.verify.v1.VerifyService/GetAttestation";

fn request() -> GetAttestationRequest {
    GetAttestationRequest {
        version: PROTOCOL_VERSION,
        nonce: vec![7; 32],
        user_data: b"daemon test".to_vec(),
    }
}

#[test]
fn help_is_readable() {
    assert_help_mentions(
        BIN,
        &[
            "--listen",
            "--tcti",
            "--health-listen",
            "--log-format",
            "/readyz",
            "SIGTERM",
        ],
    );
}

#[test]
fn bad_config_fields_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("listen: not-an-address\n", "listen"),
        ("lisen: 127.0.0.1:1\n", "lisen"),
        (
            "daemon:\n  shutdown_grace_secs: 0\n",
            "daemon.shutdown_grace_secs",
        ),
        ("tcti: ''\n", "tcti"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let (status, out) = run(BIN, &["--config", path.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{text}: {out}");
        assert!(
            out.contains(field),
            "{text}: error does not name {field}: {out}"
        );
    }
}

fn start(tpm_port: u16) -> (Daemon, std::net::SocketAddr, std::net::SocketAddr) {
    let listen = free_addr();
    let health = free_addr();
    let daemon = Daemon::start(
        BIN,
        &[
            "--listen",
            &listen.to_string(),
            "--health-listen",
            &health.to_string(),
            "--tcti",
            &SwtpmProcess::tcti(tpm_port),
            "--reload-interval-ms",
            "100",
            "--shutdown-grace-secs",
            "10",
        ],
    );
    (daemon, listen, health)
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_once_the_tpm_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let port = SwtpmProcess::free_ports();
    let (daemon, listen, health) = start(port);
    daemon
        .wait_status(health, "/healthz", 200, Duration::from_secs(20))
        .await;
    // No TPM yet: alive, not ready, and the service does not listen.
    for _ in 0..5 {
        let (code, body) = constellation_daemon::health::probe(health, "/readyz")
            .await
            .unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(tokio::net::TcpStream::connect(listen).await.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _tpm = SwtpmProcess::start(dir.path(), port);
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    let mut client = VerifyServiceClient::connect(format!("http://{listen}"))
        .await
        .unwrap();
    let resp = client
        .get_attestation(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.variant, "qemu-vtpm");
    assert!(!resp.attestation.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = SwtpmProcess::free_ports();
    let _tpm = SwtpmProcess::start(dir.path(), port);
    let (mut daemon, listen, health) = start(port);
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(30))
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (release, held) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(held_unary::<_, GetAttestationResponse>(
        channel,
        PATH,
        request(),
        held,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal(Signal::SIGTERM);
    // Draining: not ready any more, yet still running while the request is in flight.
    daemon
        .wait_status(health, "/readyz", 503, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(health).await.is_ok(),
        "the daemon exited with a request in flight:\n{}",
        daemon.output()
    );
    release.send(()).unwrap();
    let resp = call
        .await
        .unwrap()
        .expect("the in-flight request completes after SIGTERM");
    assert_eq!(resp.variant, "qemu-vtpm");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", daemon.output());
    assert!(daemon.output().contains("all in-flight requests finished"));
}

#[test]
fn reference_doc_is_current() {
    use clap::CommandFactory;
    let example =
        serde_yaml::to_string(&constellation_verify::config::ConfigFile::example()).unwrap();
    let generated =
        constellation_daemon::docs::render(&constellation_verify::config::Cli::command(), &example);
    let page =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/daemons/verify.md");
    constellation_daemon::docs::check_page(&page, &generated).unwrap();
}
