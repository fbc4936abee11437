//! Several control planes and the key service, with real bootstrapper processes and their own
//! swtpm (local platform): the key-service CA is created at Init and kept in the cluster PKI; a
//! joined control plane receives the master material in its join ticket and serves its own key
//! service (the same data keys as the Init node's), so joins go on after the Init node halts,
//! without any Recover; the key service answers only certificates from this cluster's
//! key-service CA.

use std::net::SocketAddr;
use std::time::Duration;

use constellation_attestation::SystemClock;
use constellation_bootstrapper::statedisk;
use constellation_common::kdf;
use constellation_common::metadata::{ports, Role};
use constellation_joinservice::pki::{ClusterPki, ServiceCredentials};
use constellation_keyservice::tls::{mutual_tls_client_config, TlsConnector};
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::GetDataKeyRequest;
use constellation_proto::PROTOCOL_VERSION;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

mod common;
use common::*;

/// Asks `node`'s key service for data key `id` (32 bytes), trusting `server_ca` and presenting
/// `chain`/`key`.
async fn get_data_key(
    node: &NodeRecord,
    server_ca: &[u8],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    id: &str,
) -> Result<Vec<u8>, String> {
    let tls = mutual_tls_client_config(&[CertificateDer::from(server_ca.to_vec())], chain, key)
        .map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(node.ip, ports::KEY_SERVICE);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(TlsConnector::new(
            tls,
            ServerName::IpAddress(node.ip.into()),
        ))
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    KeyServiceClient::new(channel)
        .get_data_key(GetDataKeyRequest {
            version: PROTOCOL_VERSION,
            data_key_id: id.to_owned(),
            length: 32,
        })
        .await
        .map(|r| r.into_inner().data_key)
        .map_err(|s| format!("{s:?}"))
}

fn rustls_form(
    creds: ServiceCredentials,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        creds
            .cert_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            creds.key_pkcs8_der.expose().to_vec(),
        )),
    )
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    der::pem::decode_vec(pem).unwrap().1
}

/// Waits up to 90 s for `needle` in `node`'s log: a joining control plane's etcd member is
/// added as a learner (one at a time) and promoted once caught up, which takes longer than other
/// steps on a loaded machine.
async fn wait_long(node: &NodeRecord, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never logged {needle:?}:\n{log}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joined_control_plane_serves_its_own_key_service_and_joins_after_the_init_node_halts() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("joinedcp");
    let cps = c.cloud().create_nodes(Role::ControlPlane, 2).unwrap();
    // Init the second control plane in the metadata: the first one joins through it, and is
    // then the first join endpoint a worker tries.
    let (joined, first) = (cps[0].clone(), cps[1].clone());
    let ok = init(c.fresh_validator(&first), &first).await;
    let cluster_id = ok.cluster_id.clone();
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &joined, &cluster_id).await;
    wait_long(&joined, "joined the etcd cluster").await;
    // A third control plane (its etcd member added after the second's), so that etcd keeps
    // its quorum when the Init node halts.
    let third = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &third, &cluster_id).await;
    wait_long(&third, "joined the etcd cluster").await;
    // The bootstrapper starts the daemons; they serve once they are ready.
    wait_daemon_log(&joined, "keyservice", "key service starting").await;
    wait_daemon_log(&joined, "joinservice", "join service listening").await;
    assert!(
        serves(&joined, ports::JOIN),
        "the joined control plane serves joins"
    );
    // Its join ticket carried the master material: its own key service, 0600 on its state
    // folder, answering the same data key as the Init node's for the same id.
    let master_file = joined
        .dir
        .join("state/keyservice/cluster-master-secret.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&master_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let pki = ClusterPki::load_from_dir(&first.dir.join("state/pki"), "test").unwrap();
    let ca = pki.key_service_ca_der().to_vec();
    let clock = SystemClock;
    let ask = |node: NodeRecord, id: &'static str| {
        let (chain, key) = rustls_form(
            pki.key_service_client_cert("tester", node.ip, &clock)
                .unwrap(),
        );
        let ca = ca.clone();
        async move { get_data_key(&node, &ca, chain, key, id).await }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let from_joined = loop {
        match ask(joined.clone(), "probe").await {
            Ok(key) => break key,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the joined control plane serves no key service: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let from_first = ask(first.clone(), "probe").await.unwrap();
    let expected = kdf::derive_key(&MASTER_SECRET, &MASTER_SALT, "probe", 32).unwrap();
    assert_eq!(from_joined, from_first);
    assert_eq!(from_joined, expected.expose());
    assert_eq!(
        ask(joined.clone(), "another id").await.unwrap(),
        ask(first.clone(), "another id").await.unwrap()
    );

    let worker = c.cloud().create_nodes(Role::Worker, 1).unwrap().remove(0);
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &worker, &cluster_id).await;
    let log = wait_daemon_log(&joined, "joinservice", "join ticket issued").await;
    assert!(
        log.lines()
            .any(|l| l.contains("join ticket issued") && l.contains(&worker.name)),
        "the worker joined through the joined control plane:\n{log}"
    );
    let (_, key) = disk_key(&worker);
    statedisk::verify_key(&disk_of(&worker), &key).unwrap();

    // The Init node halts; without any Recover, joins go on through the joined control plane,
    // with disk keys from its own key service.
    c.cloud().halt(&first.name).unwrap();
    assert!(!serves(&first, ports::KEY_SERVICE) && !serves(&first, ports::JOIN));
    let late = c.cloud().create_nodes(Role::Worker, 1).unwrap().remove(0);
    let all = c.cloud().list_nodes();
    let tail = |path: std::path::PathBuf| {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let watchdog = {
        let (joined, late) = (joined.clone(), late.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(45)).await;
            eprintln!(
                "late worker not joined after 45 s\n--- joined join service:\n{}\n--- joined key service:\n{}\n--- joined bootstrapper:\n{}\n--- late worker:\n{}",
                tail(daemon_log(&joined, "joinservice")),
                tail(daemon_log(&joined, "keyservice")),
                tail(joined.log_path()),
                tail(late.log_path()),
            );
        })
    };
    wait_joined(&c, &all, &late, &cluster_id).await;
    watchdog.abort();
    let (_, key) = disk_key(&late);
    statedisk::verify_key(&disk_of(&late), &key).unwrap();
    assert!(
        !std::fs::read_to_string(joined.log_path())
            .unwrap_or_default()
            .contains("recovered master secret"),
        "no Recover reached the joined control plane"
    );
    assert!(serves(&joined, ports::KEY_SERVICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_service_answers_only_certificates_from_the_clusters_key_service_ca() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("kscerts");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    init(c.fresh_validator(&cp), &cp).await;
    // The CA was created at Init and persisted with the cluster PKI (0600 key).
    let pki_dir = cp.dir.join("state/pki");
    let pki = ClusterPki::load_from_dir(&pki_dir, "test").unwrap();
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pki_dir.join("constellation/key-service-ca.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let ca = pki.key_service_ca_der().to_vec();
    let clock = SystemClock;
    let expected = kdf::derive_key(&MASTER_SECRET, &MASTER_SALT, "probe", 32).unwrap();

    // A client certificate from this cluster's key-service CA: the known-answer key.
    let (chain, key) = rustls_form(
        pki.key_service_client_cert("tester", cp.ip, &clock)
            .unwrap(),
    );
    let got = get_data_key(&cp, &ca, chain, key, "probe").await.unwrap();
    assert_eq!(got, expected.expose());

    // Another cluster's key-service CA: refused.
    let other = ClusterPki::generate("test", &clock).unwrap();
    let (chain, key) = rustls_form(
        other
            .key_service_client_cert("tester", cp.ip, &clock)
            .unwrap(),
    );
    let e = get_data_key(&cp, &ca, chain, key, "probe")
        .await
        .unwrap_err();
    eprintln!("other cluster's certificate: {e}");

    // This cluster's admin certificate (Kubernetes CA, client auth): refused; no Kubernetes
    // credential reaches the key service.
    let admin = pki.admin_client_cert(&clock).unwrap();
    let e = get_data_key(
        &cp,
        &ca,
        vec![CertificateDer::from(pem_der(admin.cert_pem.as_bytes()))],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pem_der(admin.key_pem.expose()))),
        "probe",
    )
    .await
    .unwrap_err();
    eprintln!("cluster admin certificate: {e}");

    // A server certificate of the key-service CA used as a client certificate: refused (EKU).
    let (chain, key) = rustls_form(pki.key_service_server_cert(cp.ip, &clock).unwrap());
    let e = get_data_key(&cp, &ca, chain, key, "probe")
        .await
        .unwrap_err();
    eprintln!("server certificate as client: {e}");

    // The refusals were the key service's: it still answers the genuine client.
    let (chain, key) = rustls_form(
        pki.key_service_client_cert("tester", cp.ip, &clock)
            .unwrap(),
    );
    let got = get_data_key(&cp, &ca, chain, key, "probe").await.unwrap();
    assert_eq!(got, expected.expose());
}
