//! Nodes that prove themselves: real bootstrapper processes, each with its own swtpm, started
//! by the local platform; Init over aTLS; joins; the verification service.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attest::bootstrapper_client::{
    self, attest_bootstrapper, AttestError, InitError,
};
use constellation_attest::{verify_cluster, VerifyError};
use constellation_attestation::atls::{self, AtlsError};
use constellation_attestation::measurements::{Digest, Measurement, Measurements, CLUSTER_ID_PCR};
use constellation_attestation::tpm::QuoteError;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_attestation::{IssueError, Issuer, ValidationError, Validator, Variant, Verdict};
use constellation_common::kdf;
use constellation_common::metadata::{ports, Role};
use constellation_image::LocalImage;
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use constellation_proto::init::{InitRequest, InitSuccess};
use constellation_proto::PROTOCOL_VERSION;

mod common;
use common::*;

fn request(secret: &[u8]) -> InitRequest {
    InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: vec![0x11; 32],
        master_salt: vec![0x22; 32],
        measurement_salt: vec![0x33; 32],
        init_secret: secret.to_vec(),
        cluster_name: "test".into(),
        kubernetes_version: "v1.31.1".into(),
        ..Default::default()
    }
}

/// Attests the node over aTLS and sends Init; returns the success message and the log lines.
async fn init(
    validator: Arc<QemuVtpmValidator>,
    node: &NodeRecord,
    req: InitRequest,
) -> Result<(InitSuccess, Vec<String>), InitFailure> {
    init_at(validator, &node.endpoint(ports::BOOTSTRAPPER), req).await
}

/// [`init`] against any endpoint (an impostor's, say).
async fn init_at(
    validator: Arc<QemuVtpmValidator>,
    endpoint: &str,
    req: InitRequest,
) -> Result<(InitSuccess, Vec<String>), InitFailure> {
    let (channel, _) = attest_bootstrapper(endpoint, validator)
        .await
        .map_err(InitFailure::Attestation)?;
    let mut lines = Vec::new();
    let success = bootstrapper_client::init(channel, req, |l| lines.push(l.to_owned()))
        .await
        .map_err(InitFailure::Init)?;
    Ok((success, lines))
}

#[derive(Debug)]
enum InitFailure {
    Attestation(AttestError),
    Init(InitError),
}

fn expected_cluster_id() -> [u8; 32] {
    let ms = kdf::measurement_secret(&[0x11; 32], &[0x22; 32]);
    kdf::cluster_id(ms.expose(), &[0x33; 32])
}

#[tokio::test(flavor = "multi_thread")]
async fn init_over_atls_binds_the_node_to_the_cluster() {
    let mut c = TestCluster::new("init");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let validator = c.fresh_validator(&cp);

    // Wrong init secret: refused before anything happens.
    match init(validator.clone(), &cp, request(b"not the secret")).await {
        Err(InitFailure::Init(InitError::Refused(s))) => {
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
            assert!(s.message().contains("init secret"), "{}", s.message());
        }
        other => panic!("wrong secret accepted: {other:?}"),
    }

    let started = Instant::now();
    let (ok, lines) = init(validator.clone(), &cp, request(INIT_SECRET))
        .await
        .unwrap();
    eprintln!("init took {:?}", started.elapsed());
    assert_eq!(
        ok.cluster_id,
        expected_cluster_id().to_vec(),
        "cluster ID is the known-answer derivation"
    );
    let kubeconfig = String::from_utf8(ok.kubeconfig.clone()).unwrap();
    assert!(
        kubeconfig.contains("certificate-authority-data") && kubeconfig.contains("client-key-data")
    );
    assert!(ok.ca_cert_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    assert_eq!(ok.kubernetes_installer, "none");
    assert!(
        lines.iter().any(|l| l.contains("PCR 15")),
        "progress streamed: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains(&hex::encode([0x11u8; 32]))),
        "no secret in progress lines"
    );

    // PCR 15 = SHA-256(0^32 || SHA-256(cluster ID)), read from the node's TPM through a quote.
    let member = c.member_validator(std::slice::from_ref(&cp));
    let verdict = verify_cluster(&cp.endpoint(ports::VERIFY), &member, Some(&ok.cluster_id))
        .await
        .unwrap();
    let mut expected = [0u8; 64];
    expected[32..].copy_from_slice(&constellation_attestation::measurements::sha256(
        &ok.cluster_id,
    ));
    assert_eq!(
        verdict.pcrs[&CLUSTER_ID_PCR],
        constellation_attestation::measurements::sha256(&expected)
    );

    // A second Init is refused: the node no longer attests as fresh (PCR 15 changed)...
    match init(validator.clone(), &cp, request(INIT_SECRET)).await {
        Err(InitFailure::Attestation(AttestError::Refused {
            source: AtlsError::Rejected(ValidationError::Measurements(m)),
            ..
        })) => {
            assert!(m.to_string().contains("PCR[15]"), "{m}")
        }
        other => panic!("second init not refused by attestation: {other:?}"),
    }
    // ...and even a verifier that skips PCR 15 gets a clear "already initialized".
    let mut lax = c.image.measurements.clone();
    lax.0.remove(&CLUSTER_ID_PCR);
    let lax = Arc::new(QemuVtpmValidator::new(vec![ak(&cp)], lax));
    match init(lax, &cp, request(INIT_SECRET)).await {
        Err(InitFailure::Init(InitError::AlreadyInitialized { message })) => {
            assert!(message.contains("already"), "{message}")
        }
        other => panic!("second init accepted: {other:?}"),
    }

    // The verification service with wrong measurements: rejected.
    let mut wrong = Measurements::default();
    wrong.0.insert(
        4,
        constellation_attestation::Measurement::enforce([9u8; 32]),
    );
    let wrong = QemuVtpmValidator::new(vec![ak(&cp)], wrong);
    match verify_cluster(&cp.endpoint(ports::VERIFY), &wrong, None).await {
        Err(VerifyError::Rejected {
            source: ValidationError::Measurements(m),
            ..
        }) => assert!(m.to_string().contains("PCR[4]"), "{m}"),
        other => panic!("wrong measurements must reject the node's evidence: {other:?}"),
    }
}

/// Hands out one recorded piece of evidence, whatever it is asked to bind: an attacker
/// replaying what a genuine node once produced.
struct ReplayingIssuer(Vec<u8>);

impl Issuer for ReplayingIssuer {
    fn variant(&self) -> Variant {
        Variant::QemuVtpm
    }
    fn issue(&self, _binding: &Digest) -> Result<Vec<u8>, IssueError> {
        Ok(self.0.clone())
    }
}

/// Passes everything to the real validator and keeps a copy of the evidence it saw.
struct RecordingValidator {
    inner: Arc<QemuVtpmValidator>,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Validator for RecordingValidator {
    fn variant(&self) -> Variant {
        self.inner.variant()
    }
    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        *self.seen.lock().unwrap() = Some(evidence.to_vec());
        self.inner.validate(evidence, binding)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_evidence_of_a_genuine_node_gets_no_init_secret() {
    let mut c = TestCluster::new("replay");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    // Evidence from the real node's swtpm, genuinely accepted once (without sending Init).
    let recorder = Arc::new(RecordingValidator {
        inner: c.fresh_validator(&cp),
        seen: std::sync::Mutex::new(None),
    });
    let config = atls::ClientConfig::server_only(recorder.clone()).unwrap();
    atls::channel(&cp.endpoint(ports::BOOTSTRAPPER), config)
        .await
        .expect("the genuine node attests");
    let recorded = recorder.seen.lock().unwrap().take().expect("evidence seen");

    // An impostor endpoint presents that evidence in its own sessions; whatever reaches it
    // after the handshake is counted.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let server = atls::ServerConfig::server_only(Arc::new(ReplayingIssuer(recorded))).unwrap();
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        let mut streams = atls::incoming(listener, server);
        while let Some(Ok(mut stream)) = streams.next().await {
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            counter.fetch_add(buf.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The verifier still trusts exactly the genuine node's AK and image.
    let replayed = init_at(
        c.fresh_validator(&cp),
        &impostor.to_string(),
        request(INIT_SECRET),
    )
    .await;
    match replayed {
        Err(InitFailure::Attestation(AttestError::Refused {
            source:
                AtlsError::Rejected(ValidationError::Quote(QuoteError::NonceMismatch {
                    expected,
                    found,
                })),
            ..
        })) => assert_ne!(expected, found),
        other => panic!("replayed evidence must be rejected at the quote's nonce: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no byte of the Init request (init secret, master secret) reached the impostor"
    );
    // The genuine node is untouched and still initializes.
    init(c.fresh_validator(&cp), &cp, request(INIT_SECRET))
        .await
        .expect("the genuine node initializes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_from_a_modified_binary_fails_attestation_before_any_secret_is_sent() {
    let mut c = TestCluster::new("modified");
    let dir = tempfile::tempdir().unwrap();
    let other = tampered_image(dir.path());
    let cp = c
        .cloud()
        .create_node_from_image(Role::ControlPlane, &other.dir)
        .unwrap();
    match init(c.fresh_validator(&cp), &cp, request(INIT_SECRET)).await {
        Err(InitFailure::Attestation(AttestError::Refused {
            source: AtlsError::Rejected(ValidationError::Measurements(m)),
            ..
        })) => {
            let text = m.to_string();
            assert!(
                text.contains("PCR[4]"),
                "names the PCR of the binary: {text}"
            );
        }
        other => panic!("modified node accepted: {other:?}"),
    }
    // Nothing reached the node: it is still uninitialized (PCR 15 zero).
    let verdict = verify_cluster(
        &cp.endpoint(ports::VERIFY),
        &QemuVtpmValidator::new(vec![ak(&cp)], other.measurements.clone()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(verdict.pcrs[&CLUSTER_ID_PCR], [0u8; 32]);
}

/// An image whose bootstrapper binary differs from the real one by a few appended bytes.
fn tampered_image(dir: &Path) -> LocalImage {
    let mut binary = std::fs::read(env!("CARGO_BIN_EXE_constellation-bootstrapper")).unwrap();
    binary.extend_from_slice(b"\0tampered");
    let tampered = dir.join("constellation-bootstrapper");
    std::fs::write(&tampered, binary).unwrap();
    // The daemons a control plane supervises are the real ones, next to the binary.
    let built = Path::new(env!("CARGO_BIN_EXE_constellation-bootstrapper"))
        .parent()
        .unwrap();
    for daemon in constellation_image::DAEMON_FILES {
        std::os::unix::fs::symlink(built.join(daemon), dir.join(daemon)).unwrap();
    }
    LocalImage::assemble(&dir.join("image"), &tampered, "v0.0.0-test").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_join_with_known_answer_disk_keys_and_rejoin_after_restart() {
    let mut c = TestCluster::new("join");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let workers = c.cloud().create_nodes(Role::Worker, 2).unwrap();
    let (ok, _) = init(c.fresh_validator(&cp), &cp, request(INIT_SECRET))
        .await
        .unwrap();
    let all: Vec<NodeRecord> = c.cloud().list_nodes();
    for w in &workers {
        wait_joined(&c, &all, w, &ok.cluster_id).await;
        // The disk key is HKDF(master, salt, "key-" + disk UUID): it unlocks the worker's disk.
        let uuid = constellation_bootstrapper::statedisk::uuid(&disk_of(w))
            .unwrap()
            .to_string();
        let key = kdf::derive_key(&[0x11; 32], &[0x22; 32], &uuid, 32).unwrap();
        constellation_bootstrapper::statedisk::verify_key(&disk_of(w), key.expose()).unwrap();
        assert!(
            !w.dir.join("state/disk.first-boot").exists(),
            "first-boot key replaced"
        );
    }

    // Kill a worker and boot it again: it rejoins and unlocks the same disk with the same key.
    let w = workers[0].clone();
    let uuid_before = constellation_bootstrapper::statedisk::uuid(&disk_of(&w)).unwrap();
    c.cloud().crash(&w.name).unwrap();
    let w = c.cloud().boot(&w.name).unwrap();
    wait_joined(&c, &all, &w, &ok.cluster_id).await;
    assert_eq!(
        constellation_bootstrapper::statedisk::uuid(&disk_of(&w)).unwrap(),
        uuid_before
    );
    let log = std::fs::read_to_string(w.log_path()).unwrap();
    assert!(log.contains("state disk unlocked"), "{log}");
}

#[test]
fn the_platform_starts_and_stops_three_nodes_repeatedly_without_leaks() {
    let mut c = TestCluster::new("churn");
    let marker = c.cloud().root().display().to_string();
    for _ in 0..2 {
        let nodes = c.cloud().create_nodes(Role::Worker, 3).unwrap();
        assert!(nodes.iter().all(NodeRecord::is_alive));
        for n in &nodes {
            c.cloud().delete_node(&n.name).unwrap();
        }
        assert_eq!(
            processes_mentioning(&marker),
            BTreeMap::new(),
            "no bootstrapper or swtpm left"
        );
        for n in &nodes {
            for port in [ports::VERIFY, ports::BOOTSTRAPPER] {
                assert!(
                    std::net::TcpListener::bind((n.ip, port)).is_ok(),
                    "port {port} of {} released",
                    n.name
                );
            }
            // The node's swtpm listened on two unix sockets (data, control).
            let tpm = n.swtpm.as_ref().expect("a running node has a TPM");
            for socket in [tpm.socket.clone(), tpm.ctrl_socket()] {
                assert!(
                    !socket.exists(),
                    "swtpm socket {} of {} removed",
                    socket.display(),
                    n.name
                );
            }
        }
    }
}

/// Live processes whose command line mentions `marker` (zombies excluded).
fn processes_mentioning(marker: &str) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if constellation_platform::process::running(pid, marker) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.insert(pid, String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    out
}

/// An initialized cluster of one control plane and a worker booted from a modified binary,
/// which the join service has refused once (the worker's log says so, naming PCR[4]).
struct RefusedWorker {
    c: TestCluster,
    cp: NodeRecord,
    init: InitSuccess,
    bad: NodeRecord,
    other: LocalImage,
    _dir: tempfile::TempDir,
}

async fn cluster_with_a_refused_worker(name: &str) -> RefusedWorker {
    let mut c = TestCluster::new(name);
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let (init, _) = init(c.fresh_validator(&cp), &cp, request(INIT_SECRET))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = tampered_image(dir.path());
    let bad = c
        .cloud()
        .create_node_from_image(Role::Worker, &other.dir)
        .unwrap();
    // The join service refuses it (PCR 4 differs): the node logs the refusal and stays outside.
    // (An attempt before the join service's policy lists the new node's AK is refused for that
    // instead; the node retries.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(bad.log_path()).unwrap_or_default();
        if log.contains("PCR[4]") || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(log.contains("join attempt failed"), "{log}");
    assert!(log.contains("PCR[4]"), "the refusal names the PCR: {log}");
    RefusedWorker {
        c,
        cp,
        init,
        bad,
        other,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_from_a_modified_binary_is_refused_admission() {
    // `_cluster` keeps the nodes running until the end of the test.
    let RefusedWorker {
        c: _cluster,
        cp,
        bad,
        other,
        ..
    } = cluster_with_a_refused_worker("badjoin").await;
    let lax = QemuVtpmValidator::new(vec![ak(&bad)], other.measurements.clone());
    let verdict = verify_cluster(&bad.endpoint(ports::VERIFY), &lax, None)
        .await
        .unwrap();
    assert_eq!(
        verdict.pcrs[&CLUSTER_ID_PCR], [0u8; 32],
        "no cluster ID: nothing was issued"
    );
    assert!(
        bad.dir.join("state/disk.first-boot").exists(),
        "no disk key was received"
    );
    // ... and its first-boot key was never written to disk (it lives in the node's memory).
    assert!(!bad.dir.join("state/disk.initial-key").exists());
    let cp_log = std::fs::read_to_string(cp.log_path()).unwrap();
    assert!(!cp_log.contains("join ticket issued"), "{cp_log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn new_measurements_apply_to_the_next_join_without_a_restart() {
    let RefusedWorker {
        mut c,
        cp,
        init: ok,
        bad,
        other,
        ..
    } = cluster_with_a_refused_worker("reload").await;

    // The operator relaxes the image PCRs (4: binary, 9: manifest, which names the binary's
    // hash) to warn-only in the cluster's shared configuration. The running join service picks
    // it up for the next join: no restart, same process.
    let mut relaxed = c.image.measurements.clone();
    for pcr in [4, 9] {
        let expected = relaxed.0[&pcr].expected;
        relaxed.0.insert(pcr, Measurement::warn_only(expected));
    }
    c.cloud()
        .update_settings(|s| s.measurements_json = relaxed.to_json())
        .unwrap();
    let mut lax = other.measurements.clone();
    lax.0.remove(&CLUSTER_ID_PCR);
    let lax = QemuVtpmValidator::new(vec![ak(&bad)], lax);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match verify_cluster(&bad.endpoint(ports::VERIFY), &lax, Some(&ok.cluster_id)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "not admitted after the change: {e}\n{}",
                    std::fs::read_to_string(bad.log_path()).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        c.cloud().node(&cp.name).unwrap().pid,
        cp.pid,
        "the control plane was not restarted"
    );
    // The join service is the control plane's supervised daemon: its own log.
    let cp_log = std::fs::read_to_string(daemon_log(&cp, "joinservice")).unwrap();
    assert!(
        cp_log
            .lines()
            .any(|l| l.contains("join ticket issued") && l.contains(&bad.name)),
        "{cp_log}"
    );
}

/// A cluster deep in a project folder, as `make demo` puts it under `examples/local/`: the node
/// folders are too deep for a unix socket path (at most 107 bytes) inside them, yet the control
/// plane's TPM multiplexer and KMS v2 plugin socket work (they live beside the swtpm socket, in
/// the short private folder the launcher chose), so Init succeeds and a worker joins.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_deep_in_a_project_folder_serves_its_unix_sockets() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let deep = "project-folder-".repeat(6);
    let mut c = TestCluster::nested("deep", &deep);
    let (cp, worker) = c.control_plane_and_worker();
    assert!(
        cp.dir.join("mux.sock.ctrl").as_os_str().len() > 107,
        "the node folder is deep enough: {}",
        cp.dir.display()
    );
    let ok = common::init(c.fresh_validator(&cp), &cp).await;
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &worker, &ok.cluster_id).await;

    let config = std::fs::read_to_string(
        cp.dir
            .join("kubernetes")
            .join(constellation_bootstrapper::controlplane::ENCRYPTION_CONFIGURATION_FILE),
    )
    .unwrap();
    let socket = config
        .split("unix://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|s| s.trim_matches(|c| c == '"' || c == '\''))
        .expect("the KMS plugin endpoint")
        .to_owned();
    assert!(socket.len() <= 107, "{socket}");
    std::os::unix::net::UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("the KMS v2 plugin socket {socket} accepts: {e}"));
}
