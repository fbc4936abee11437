//! `constellation-keyservice` as a process: config errors name the field, --help, readiness only
//! after the master secret and TLS files load (a world-readable key is refused), data keys over
//! mutual TLS, SIGTERM with a request in flight, and no secret in anything it prints; the KMIP
//! backend against a real PyKMIP server.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use constellation_common::secret::SecretBytes;
use constellation_daemon::testing::{assert_help_mentions, free_addr, held_unary, run, Daemon};
use constellation_keyservice::cluster_managed::ClusterManagedBackend;
use constellation_keyservice::config::created_kek_name;
use constellation_keyservice::kmip::{KekSource, KmipBackend, RetryPolicy};
use constellation_keyservice::testing::{IssuedCert, PyKmipServer, TestPki};
use constellation_keyservice::tls::{mutual_tls_client_config, TlsConnector};
use constellation_keyservice::{MasterSecret, MasterSecretBackend};
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::{GetDataKeyRequest, GetDataKeyResponse};
use constellation_proto::PROTOCOL_VERSION;
use nix::sys::signal::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_constellation-keyservice");
const PATH: &str = "/constellation.keyservice.v1.KeyService/GetDataKey";

fn master() -> MasterSecret {
    MasterSecret::new(
        SecretBytes::new(b"daemon-test-master-secret-0123456".to_vec()),
        SecretBytes::new(b"daemon-test-master-salt-987654321".to_vec()),
    )
    .unwrap()
}

fn request(id: &str) -> GetDataKeyRequest {
    GetDataKeyRequest {
        version: PROTOCOL_VERSION,
        data_key_id: id.into(),
        length: 32,
    }
}

struct Pki {
    pki: TestPki,
    server: IssuedCert,
    client: IssuedCert,
}

fn pki() -> Pki {
    let pki = TestPki::new("key-service CA").unwrap();
    let server = pki.issue_server("key-service", &["127.0.0.1"]).unwrap();
    let client = pki.issue_client("join-service").unwrap();
    Pki {
        pki,
        server,
        client,
    }
}

fn write_tls(state: &Path, pki: &Pki, key_mode: u32) {
    let dir = state.join("keyservice-tls");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.crt"), pki.pki.ca_pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), &pki.server.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &pki.server.key_pem).unwrap();
    std::fs::set_permissions(
        dir.join("tls.key"),
        std::fs::Permissions::from_mode(key_mode),
    )
    .unwrap();
}

async fn write_master(state: &Path) {
    ClusterManagedBackend::new(state.join("keyservice"))
        .store(&master())
        .await
        .unwrap();
}

async fn channel(addr: std::net::SocketAddr, pki: &Pki) -> tonic::transport::Channel {
    let tls = mutual_tls_client_config(&[pki.pki.ca_der()], pki.client.chain(), pki.client.key())
        .unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(TlsConnector::new(
            tls,
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        ))
        .await
        .unwrap()
}

fn start(state: &Path) -> (Daemon, std::net::SocketAddr, std::net::SocketAddr) {
    start_with(state, &[])
}

fn start_with(
    state: &Path,
    extra: &[&str],
) -> (Daemon, std::net::SocketAddr, std::net::SocketAddr) {
    let (listen, health) = (free_addr(), free_addr());
    let mut args = vec![
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--health-listen",
        &health.to_string(),
        "--reload-interval-ms",
        "100",
        "--log-format",
        "json",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start(BIN, &args);
    (daemon, listen, health)
}

/// Nothing secret in `output`: master secret and salt (raw, hex), the derived key, the TLS key.
fn assert_no_secret(output: &[u8], pki: &Pki, derived: &[u8]) {
    let m = master();
    let key_body: String = pki
        .server
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let text = String::from_utf8_lossy(output);
    for (what, needle) in [
        ("master secret", m.secret().expose().to_vec()),
        ("master salt", m.salt().expose().to_vec()),
        (
            "master secret (hex)",
            hex::encode(m.secret().expose()).into_bytes(),
        ),
        (
            "master salt (hex)",
            hex::encode(m.salt().expose()).into_bytes(),
        ),
        ("data key (hex)", hex::encode(derived).into_bytes()),
        ("TLS key (PEM body)", key_body.as_bytes()[..40].to_vec()),
    ] {
        assert!(
            !output.windows(needle.len()).any(|w| w == needle.as_slice()),
            "{what} appears in the daemon's output:\n{text}"
        );
    }
    assert!(
        !output.windows(derived.len()).any(|w| w == derived),
        "data key bytes in the output"
    );
}

#[test]
fn help_is_readable() {
    assert_help_mentions(
        BIN,
        &[
            "--state-dir",
            "--listen",
            "--kms-socket",
            "--health-listen",
            "/readyz",
            "never from flags",
        ],
    );
}

#[test]
fn bad_config_fields_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let cases = [
        (String::new(), "state_dir"),
        ("state_dir: /does/not/exist\n".to_owned(), "state_dir"),
        (
            format!("state_dir: {state}\nkms_socket: relative.sock\n"),
            "kms_socket",
        ),
        (format!("state_dir: {state}\nlisten: 1.2.3.4\n"), "listen"),
        (
            format!("state_dir: {state}\nmaster_secret: abc\n"),
            "master_secret",
        ),
        (
            format!("state_dir: {state}\ndaemon:\n  reload_interval_ms: 5\n"),
            "daemon.reload_interval_ms",
        ),
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

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_once_keys_load_and_no_secret_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (daemon, listen, health) = start(dir.path());
    daemon
        .wait_status(health, "/healthz", 200, Duration::from_secs(20))
        .await;
    let not_ready = |why: &'static str| async move {
        for _ in 0..4 {
            let (code, body) = constellation_daemon::health::probe(health, "/readyz")
                .await
                .unwrap();
            assert_eq!(code, 503, "{why}: {body}");
            assert!(
                tokio::net::TcpStream::connect(listen).await.is_err(),
                "{why}: listening"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    not_ready("empty state folder").await;
    // A TLS key every user may read is refused.
    write_tls(dir.path(), &pki, 0o644);
    write_master(dir.path()).await;
    not_ready("world-readable TLS key").await;
    assert!(
        daemon.output().contains("readable by every user"),
        "{}",
        daemon.output()
    );
    std::fs::set_permissions(
        dir.path().join("keyservice-tls/tls.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(10))
        .await;

    let mut client = KeyServiceClient::new(channel(listen, &pki).await);
    let key = client
        .get_data_key(request("disk-1"))
        .await
        .unwrap()
        .into_inner()
        .data_key;
    assert_eq!(key, master().derive("disk-1", 32).unwrap().expose());
    assert_no_secret(&daemon.output_bytes(), &pki, &key);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    write_tls(dir.path(), &pki, 0o600);
    write_master(dir.path()).await;
    let (mut daemon, listen, health) = start(dir.path());
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    let (release, held) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(held_unary::<_, GetDataKeyResponse>(
        channel(listen, &pki).await,
        PATH,
        request("disk-2"),
        held,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal(Signal::SIGTERM);
    daemon
        .wait_status(health, "/readyz", 503, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(health).await.is_ok(),
        "exited with a request in flight:\n{}",
        daemon.output()
    );
    release.send(()).unwrap();
    let key = call
        .await
        .unwrap()
        .expect("the in-flight request completes")
        .data_key;
    assert_eq!(key, master().derive("disk-2", 32).unwrap().expose());
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", daemon.output());
    assert_no_secret(&daemon.output_bytes(), &pki, &key);
}

/// The KMS v2 plugin as the API server uses it: Status, Encrypt with a uid, Decrypt with the
/// key ID and annotations Encrypt returned; the socket is 0600 and gone after SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn kms_plugin_socket_serves_the_apiserver_and_goes_away_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    write_tls(dir.path(), &pki, 0o600);
    write_master(dir.path()).await;
    let socket = dir.path().join("kms.sock");
    let (mut daemon, _listen, health) =
        start_with(dir.path(), &["--kms-socket", socket.to_str().unwrap()]);
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let dek = b"a DEK the API server wants wrapped".to_vec();
    constellation_keyservice::testing::kms_round_trip(&socket, &dek).await;
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", daemon.output());
    assert!(!socket.exists(), "the socket outlived the daemon");
    assert!(!daemon
        .output_bytes()
        .windows(dek.len())
        .any(|w| w == dek.as_slice()));
}

/// `backend: kmip`: the master secret wrapped by a KEK in a real PyKMIP server (stored as Init
/// stores it), the KMIP client certificate and key as secret files. The daemon is not ready
/// while the KMIP server is down and becomes ready, without a restart, once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn kmip_backend_unwraps_the_master_secret_through_the_kmip_server() {
    const CLUSTER: &str = "kmip-daemon";
    let mut kmip = PyKmipServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let settings = kmip.kmip_settings(
        KekSource::Create {
            name: created_kek_name(CLUSTER),
        },
        RetryPolicy::default(),
    );
    KmipBackend::new(settings, state.join("keyservice"), CLUSTER)
        .unwrap()
        .store(&master())
        .await
        .unwrap();
    let pki = pki();
    write_tls(state, &pki, 0o600);
    let files = state.join("keyservice-kmip");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("ca.crt"), kmip.pki().ca_pem()).unwrap();
    std::fs::write(files.join("client.crt"), &kmip.client_cert().cert_pem).unwrap();
    std::fs::write(files.join("client.key"), &kmip.client_cert().key_pem).unwrap();
    std::fs::set_permissions(
        files.join("client.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    kmip.stop();
    let endpoint = kmip.endpoint();
    let (daemon, listen, health) = start_with(
        state,
        &[
            "--backend",
            "kmip",
            "--cluster-name",
            CLUSTER,
            "--kmip-endpoint",
            &endpoint,
        ],
    );
    daemon
        .wait_status(health, "/healthz", 200, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = constellation_daemon::health::probe(health, "/readyz")
        .await
        .unwrap();
    assert_eq!(code, 503, "ready without the KMIP server: {body}");

    kmip.start_again().unwrap();
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(60))
        .await;
    let mut client = KeyServiceClient::new(channel(listen, &pki).await);
    let key = client
        .get_data_key(request("disk-1"))
        .await
        .unwrap()
        .into_inner()
        .data_key;
    assert_eq!(key, master().derive("disk-1", 32).unwrap().expose());
    let output = daemon.output();
    assert!(output.contains(&endpoint), "{output}");
    assert_no_secret(&daemon.output_bytes(), &pki, &key);
    let client_key_body: String = kmip
        .client_cert()
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !output.contains(&client_key_body[..40]),
        "KMIP client key printed"
    );
}

#[test]
fn kmip_config_needs_its_endpoint_and_cluster_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let (status, out) = run(BIN, &["--state-dir", state, "--backend", "kmip"]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("kmip_endpoint"), "{out}");
    let (status, out) = run(
        BIN,
        &[
            "--state-dir",
            state,
            "--backend",
            "kmip",
            "--kmip-endpoint",
            "kmip.example:5696",
        ],
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("cluster_name"), "{out}");
    let (status, out) = run(
        BIN,
        &[
            "--state-dir",
            state,
            "--backend",
            "kmip",
            "--cluster-name",
            "c",
            "--kmip-endpoint",
            "no-port",
        ],
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("kmip_endpoint") && out.contains("host:port"),
        "{out}"
    );
}

#[test]
fn reference_doc_is_current() {
    use clap::CommandFactory;
    use constellation_keyservice::config::{Cli, ConfigFile};
    let example = serde_yaml::to_string(&ConfigFile::example()).unwrap();
    let generated = constellation_daemon::docs::render(&Cli::command(), &example);
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/daemons/keyservice.md");
    constellation_daemon::docs::check_page(&page, &generated).unwrap();
}
