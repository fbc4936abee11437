//! `constellation-joinservice` as a process, with real parts: its own swtpm, a joiner with
//! another swtpm over mutual aTLS, and the key service (in-process, mutual TLS) it fetches disk
//! keys from. Config errors name the field; --help; ready only once the state folder loads; hot
//! reload of the measurements and the node directory; SIGTERM with a request in flight; no
//! secret in anything it prints.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::measurements::{Measurement, Measurements};
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_attestation::variant::VariantIssuer;
use constellation_attestation::{atls, SystemClock, Variant};
use constellation_common::kdf::DEFAULT_KEY_LEN;
use constellation_common::secret::SecretBytes;
use constellation_daemon::testing::{
    assert_help_mentions, free_addr, held_unary, run, Daemon, SwtpmProcess,
};
use constellation_daemon::tpm::open_issuer;
use constellation_joinservice::pki::ClusterPki;
use constellation_keyservice::{KeyService, MasterSecret};
use constellation_proto::join::join_service_client::JoinServiceClient;
use constellation_proto::join::{IssueJoinTicketRequest, IssueJoinTicketResponse};
use constellation_proto::PROTOCOL_VERSION;
use nix::sys::signal::Signal;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const BIN: &str = env!("CARGO_BIN_EXE_constellation-joinservice");
const PATH: &str = "/constellation.join.v1.JoinService/IssueJoinTicket";
const CLUSTER: &str = "daemon-test";
const DISK: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const SALT: &[u8] = b"daemon-test-measurement-salt-0123";
const SECRET: &[u8] = b"daemon-test-measurement-secret-456";

fn master() -> MasterSecret {
    MasterSecret::new(
        SecretBytes::new(b"join-daemon-master-secret-abcdefg".to_vec()),
        SecretBytes::new(b"join-daemon-master-salt-hijklmnop".to_vec()),
    )
    .unwrap()
}

/// Everything around the daemon.
struct Fixture {
    dir: tempfile::TempDir,
    pki: ClusterPki,
    key_service: SocketAddr,
    daemon_tpm_port: u16,
    daemon_ak: AkPublicKey,
    daemon_pcr0: [u8; 32],
    joiner: Arc<VariantIssuer>,
    joiner_pcrs: BTreeMap<u32, [u8; 32]>,
    _tpms: Vec<SwtpmProcess>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = ClusterPki::generate(CLUSTER, &SystemClock).unwrap();
        // The key service the daemon fetches disk keys from (mutual TLS, key-service CA).
        let creds = pki
            .key_service_server_cert("127.0.0.1".parse().unwrap(), &SystemClock)
            .unwrap();
        let tls = constellation_keyservice::tls::mutual_tls_server_config(
            &[CertificateDer::from(pki.key_service_ca_der().to_vec())],
            creds
                .cert_chain_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                creds.key_pkcs8_der.expose().to_vec(),
            )),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key_service = listener.local_addr().unwrap();
        tokio::spawn(constellation_keyservice::serve(
            listener,
            tls,
            KeyService::new(master()),
            std::future::pending(),
        ));
        // The daemon's TPM: its AK (a primary key, so the daemon re-creates the same one) and PCR 0.
        let daemon_tpm_port = SwtpmProcess::free_ports();
        std::fs::create_dir_all(dir.path().join("tpm-daemon")).unwrap();
        let daemon_tpm = SwtpmProcess::start(&dir.path().join("tpm-daemon"), daemon_tpm_port);
        let (daemon_ak, daemon_pcr0) = {
            let issuer = open_issuer(&SwtpmProcess::tcti(daemon_tpm_port)).unwrap();
            let pcrs = issuer.with_tpm(|t| t.pcr_read(&[0])).unwrap();
            (issuer.ak_public().unwrap(), pcrs[&0])
        };
        let joiner_port = SwtpmProcess::free_ports();
        std::fs::create_dir_all(dir.path().join("tpm-joiner")).unwrap();
        let joiner_tpm = SwtpmProcess::start(&dir.path().join("tpm-joiner"), joiner_port);
        let joiner = Arc::new(open_issuer(&SwtpmProcess::tcti(joiner_port)).unwrap());
        let all: Vec<u32> = Variant::QemuVtpm.facts().quoted_pcrs.collect();
        let joiner_pcrs = joiner.with_tpm(|t| t.pcr_read(&all)).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.path().join("policy")).unwrap();
        Self {
            dir,
            pki,
            key_service,
            daemon_tpm_port,
            daemon_ak,
            daemon_pcr0,
            joiner,
            joiner_pcrs,
            _tpms: vec![daemon_tpm, joiner_tpm],
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn policy(&self, name: &str) -> PathBuf {
        self.dir.path().join("policy").join(name)
    }

    fn write_state(&self) {
        self.pki.write_to_dir(&self.state().join("pki")).unwrap();
        let dir = self.state().join("joinservice");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in [("measurement-salt", SALT), ("measurement-secret", SECRET)] {
            std::fs::write(dir.join(name), content).unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
    }

    /// Replaces a policy file the way a ConfigMap update does: a new file renamed over the old.
    fn write_policy(&self, name: &str, content: &str) {
        let tmp = self.policy(&format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.policy(name)).unwrap();
    }

    /// Measurements matching the joiner's PCRs, or with PCR 4 expected to differ.
    fn write_measurements(&self, matching: bool) {
        let mut m: BTreeMap<u32, Measurement> = self
            .joiner_pcrs
            .iter()
            .map(|(i, v)| (*i, Measurement::enforce(*v)))
            .collect();
        if !matching {
            m.insert(4, Measurement::enforce([0x11; 32]));
        }
        self.write_policy("measurements.json", &Measurements(m).to_json());
    }

    fn write_nodes(&self, with_joiner: bool) {
        let ak = hex::encode(self.joiner.ak_public().unwrap().to_spki_der());
        let text = if with_joiner {
            format!("- name: worker-0\n  role: worker\n  ip: 127.0.0.1\n  ak_spki_hex: {ak}\n")
        } else {
            "[]\n".to_owned()
        };
        self.write_policy("nodes.yaml", &text);
    }

    fn start(&self) -> (Daemon, SocketAddr, SocketAddr) {
        self.start_polling_every("100")
    }

    fn start_polling_every(&self, reload_interval_ms: &str) -> (Daemon, SocketAddr, SocketAddr) {
        let (listen, health) = (free_addr(), free_addr());
        let args: Vec<String> = vec![
            "--listen".into(),
            listen.to_string(),
            "--health-listen".into(),
            health.to_string(),
            "--state-dir".into(),
            self.state().display().to_string(),
            "--cluster-name".into(),
            CLUSTER.into(),
            "--node-name".into(),
            "control-plane-0".into(),
            "--node-ip".into(),
            "127.0.0.1".into(),
            "--key-service-endpoints".into(),
            self.key_service.to_string(),
            "--api-server-endpoint".into(),
            "127.0.0.1:6443".into(),
            "--kubernetes-version".into(),
            "v1.31.1".into(),
            "--tcti".into(),
            SwtpmProcess::tcti(self.daemon_tpm_port),
            "--measurements-file".into(),
            self.policy("measurements.json").display().to_string(),
            "--nodes-file".into(),
            self.policy("nodes.yaml").display().to_string(),
            "--disk-bindings-dir".into(),
            self.dir.path().join("disk-bindings").display().to_string(),
            "--reload-interval-ms".into(),
            reload_interval_ms.into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Daemon::start(BIN, &args), listen, health)
    }

    fn request(&self) -> IssueJoinTicketRequest {
        IssueJoinTicketRequest {
            version: PROTOCOL_VERSION,
            disk_uuid: DISK.into(),
            csr_pem: common::kubelet_csr(&common::worker("worker-0", "127.0.0.1")).into_bytes(),
            is_control_plane: false,
            node_name: "worker-0".into(),
        }
    }

    /// An attested channel to the daemon, as the joiner.
    async fn channel(&self, addr: SocketAddr) -> Result<tonic::transport::Channel, String> {
        let mut expected = BTreeMap::new();
        expected.insert(0, Measurement::enforce(self.daemon_pcr0));
        let validator =
            QemuVtpmValidator::new(vec![self.daemon_ak.clone()], Measurements(expected));
        let config = atls::ClientConfig::mutual(Arc::new(validator), self.joiner.clone()).unwrap();
        atls::channel(&addr.to_string(), config)
            .await
            .map(|(channel, _)| channel)
            .map_err(|e| e.to_string())
    }

    async fn join(&self, addr: SocketAddr) -> Result<IssueJoinTicketResponse, String> {
        let channel = self.channel(addr).await?;
        JoinServiceClient::new(channel)
            .issue_join_ticket(self.request())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.message().to_owned())
    }

    /// Joins until `want_ok` is met (the reload is polled), at most 10 s; the last result.
    async fn join_until(
        &self,
        addr: SocketAddr,
        want_ok: bool,
    ) -> Result<IssueJoinTicketResponse, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = self.join(addr).await;
            if result.is_ok() == want_ok || Instant::now() > deadline {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_disk_key(&self, ticket: &IssueJoinTicketResponse) {
        assert_eq!(
            ticket.state_disk_key,
            master().derive(DISK, DEFAULT_KEY_LEN).unwrap().expose()
        );
    }

    /// Nothing secret in `output`: measurement salt and secret, disk key, CA key.
    fn assert_no_secret(&self, output: &[u8]) {
        let disk_key = master().derive(DISK, DEFAULT_KEY_LEN).unwrap();
        let ca_key = std::fs::read_to_string(self.state().join("pki/ca.key")).unwrap();
        let ca_key_line = ca_key
            .lines()
            .find(|l| !l.starts_with("-----"))
            .unwrap()
            .to_owned();
        let text = String::from_utf8_lossy(output);
        for (what, needle) in [
            ("measurement salt", SALT.to_vec()),
            ("measurement secret", SECRET.to_vec()),
            ("measurement salt (hex)", hex::encode(SALT).into_bytes()),
            ("measurement secret (hex)", hex::encode(SECRET).into_bytes()),
            (
                "disk key (hex)",
                hex::encode(disk_key.expose()).into_bytes(),
            ),
            ("disk key", disk_key.expose().to_vec()),
            ("CA key (PEM)", ca_key_line.into_bytes()),
        ] {
            assert!(
                !output.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{what} appears in the daemon's output:\n{text}"
            );
        }
    }
}

#[test]
fn help_is_readable() {
    assert_help_mentions(
        BIN,
        &[
            "--state-dir",
            "--measurements-file",
            "--nodes-file",
            "--key-service-endpoints",
            "/readyz",
            "SIGHUP",
        ],
    );
}

#[test]
fn bad_config_fields_are_named_and_refused() {
    use constellation_joinservice::config::ConfigFile;
    let dir = tempfile::tempdir().unwrap();
    let mut good = ConfigFile::example();
    good.state_dir = Some(dir.path().to_owned());
    let good = serde_yaml::to_value(&good).unwrap();
    let edits: [(&str, Option<serde_yaml::Value>, &str); 7] = [
        ("cluster_name", None, "cluster_name"),
        (
            "key_service_endpoints",
            Some(serde_yaml::Value::Sequence(vec![])),
            "key_service_endpoints",
        ),
        (
            "api_server_endpoint",
            Some("nohost".into()),
            "api_server_endpoint",
        ),
        ("token_ttl_secs", Some(5.into()), "token_ttl_secs"),
        ("node_ip", Some("not-an-ip".into()), "node_ip"),
        ("state_dir", Some("/does/not/exist".into()), "state_dir"),
        (
            "measurement_secret",
            Some("inline secrets are not a field".into()),
            "measurement_secret",
        ),
    ];
    for (i, (key, value, field)) in edits.into_iter().enumerate() {
        let mut config = good.clone();
        let map = config.as_mapping_mut().unwrap();
        match value {
            None => {
                map.remove(key);
            }
            Some(v) => {
                map.insert(key.into(), v);
            }
        }
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let (status, out) = run(BIN, &["--config", path.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{key}: {out}");
        assert!(
            out.contains(field),
            "{key}: error does not name {field}: {out}"
        );
    }
}

async fn assert_not_ready(health: SocketAddr, listen: SocketAddr, why: &str) {
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
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_once_the_state_folder_loads() {
    let f = Fixture::new().await;
    f.write_measurements(true);
    f.write_nodes(true);
    let (daemon, listen, health) = f.start();
    daemon
        .wait_status(health, "/healthz", 200, Duration::from_secs(20))
        .await;
    assert_not_ready(health, listen, "empty state folder").await;
    f.write_state();
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    // No configuration names the variant: a TPM and no SEV-SNP guest device is qemu-vtpm.
    let detected = daemon
        .output()
        .lines()
        .find(|l| l.contains("attestation variant detected from the platform"))
        .map(str::to_owned);
    assert!(
        detected.as_deref().is_some_and(|l| l.contains("qemu-vtpm")),
        "{detected:?}"
    );
    let ticket = f.join(listen).await.expect("join after ready");
    f.assert_disk_key(&ticket);
    f.assert_no_secret(&daemon.output_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_of_measurements_and_node_directory() {
    let f = Fixture::new().await;
    f.write_state();
    f.write_measurements(false);
    f.write_nodes(true);
    let (daemon, listen, health) = f.start();
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    let refused = f
        .join(listen)
        .await
        .expect_err("PCR 4 differs from the measurements");
    assert!(!refused.is_empty());
    // New measurements: the running daemon admits the joiner, no restart.
    f.write_measurements(true);
    let ticket = f
        .join_until(listen, true)
        .await
        .expect("admitted after the measurements reload");
    f.assert_disk_key(&ticket);
    // The node leaves the directory: refused again.
    f.write_nodes(false);
    f.join_until(listen, false)
        .await
        .expect_err("refused after the node directory reload");
    // A broken measurements file is refused and the last good version kept.
    f.write_nodes(true);
    f.join_until(listen, true).await.expect("admitted again");
    f.write_policy("measurements.json", "{not json");
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.join(listen)
        .await
        .expect("the previous measurements still apply");
    let out = daemon.output();
    assert!(
        out.contains("reload failed; keeping the previous version"),
        "{out}"
    );
    f.assert_no_secret(&daemon.output_bytes());
}

/// SIGHUP reloads at once, without waiting for the next poll (here a minute away).
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_policy_at_once() {
    let f = Fixture::new().await;
    f.write_state();
    f.write_measurements(false);
    f.write_nodes(true);
    let (daemon, listen, health) = f.start_polling_every("60000");
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    f.join(listen)
        .await
        .expect_err("PCR 4 differs from the measurements");
    f.write_measurements(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.join(listen)
        .await
        .expect_err("no poll within a minute: still the old measurements");
    daemon.signal(Signal::SIGHUP);
    let ticket = f
        .join_until(listen, true)
        .await
        .expect("admitted after SIGHUP");
    f.assert_disk_key(&ticket);
    assert!(daemon.output().contains("sighup"), "{}", daemon.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let f = Fixture::new().await;
    f.write_state();
    f.write_measurements(true);
    f.write_nodes(true);
    let (mut daemon, listen, health) = f.start();
    daemon
        .wait_status(health, "/readyz", 200, Duration::from_secs(20))
        .await;
    let channel = f.channel(listen).await.unwrap();
    let (release, held) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(held_unary::<_, IssueJoinTicketResponse>(
        channel,
        PATH,
        f.request(),
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
    let ticket = call
        .await
        .unwrap()
        .expect("the in-flight join completes after SIGTERM");
    f.assert_disk_key(&ticket);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", daemon.output());
    f.assert_no_secret(&daemon.output_bytes());
}

#[test]
fn reference_doc_is_current() {
    use clap::CommandFactory;
    use constellation_joinservice::config::{Cli, ConfigFile};
    let example = serde_yaml::to_string(&ConfigFile::example()).unwrap();
    let generated = constellation_daemon::docs::render(&Cli::command(), &example);
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/daemons/joinservice.md");
    constellation_daemon::docs::check_page(&page, &generated).unwrap();
}
