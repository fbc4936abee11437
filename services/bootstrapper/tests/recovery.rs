//! Recovery: real bootstrapper processes with their own swtpm (local platform). After every
//! control-plane node restarted, a control plane waits for a join service or `Recover` (aTLS,
//! the node attests first); with the right master secret it unlocks its existing state disk,
//! binds PCR 15 again and serves joins; no key changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use constellation_attest::bootstrapper_client::RecoverError;
use constellation_attest::verify_cluster;
use constellation_attestation::atls;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_bootstrapper::controlplane::KMIP_WRAPPED_SECRET_TOKEN;
use constellation_bootstrapper::statedisk;
use constellation_common::metadata::{ports, Role};
use constellation_keyservice::testing::PyKmipServer;
use constellation_platform::Cloud;
use constellation_proto::init::kms_config::Backend;
use constellation_proto::init::{KmipKms, KmsConfig};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn full_control_plane_restart_then_recover_brings_the_cluster_back_with_the_same_keys() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("recover");
    let (cp, worker) = c.control_plane_and_worker();
    let ok = init(c.fresh_validator(&cp), &cp).await;
    let cluster_id = ok.cluster_id.clone();
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &worker, &cluster_id).await;

    // Both disks are keyed with the known-answer disk key (Init keys the control plane's too).
    let (cp_uuid, cp_key) = disk_key(&cp);
    let (worker_uuid, worker_key) = disk_key(&worker);
    statedisk::verify_key(&disk_of(&cp), &cp_key).unwrap();
    statedisk::verify_key(&disk_of(&worker), &worker_key).unwrap();
    assert!(!cp.dir.join("state/disk.first-boot").exists());

    // Full control-plane restart: every node powers off, the control plane boots first.
    let cp = full_restart(&mut c, &[&worker, &cp], &cp).await;
    assert!(
        !serves(&cp, ports::JOIN),
        "no join service before Recover: it holds no master secret"
    );

    // Malformed and wrong secrets: refused with a clear reason, nothing started.
    let s = recover(c.fresh_validator(&cp), &cp, &[0x11; 8], &MASTER_SALT)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("master secret"), "{}", s.message());
    let wrong = [0x44u8; 32];
    let started = Instant::now();
    let s = recover(c.fresh_validator(&cp), &cp, &wrong, &MASTER_SALT)
        .await
        .unwrap_err();
    eprintln!(
        "Recover with a wrong master secret refused in {:?}",
        started.elapsed()
    );
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("wrong master secret") && s.message().contains("state disk"),
        "{}",
        s.message()
    );
    assert!(!s.message().contains(&hex::encode(wrong)), "secret echoed");
    assert!(
        !serves(&cp, ports::JOIN),
        "nothing started after a wrong secret"
    );
    let log = std::fs::read_to_string(cp.log_path()).unwrap();
    assert!(!log.contains(&hex::encode(wrong)) && !log.contains(&hex::encode(MASTER_SECRET)));
    // KMIP credentials for a cluster whose master secret no KMS wraps: refused before any KMS
    // is contacted (nothing listens at this endpoint).
    let no_kms = kmip_recover_request(KmipKms {
        endpoint: "127.0.0.1:9".into(),
        ..Default::default()
    });
    let s = recover_with(c.fresh_validator(&cp), &cp, no_kms)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("holds no KMIP-wrapped master secret"),
        "{}",
        s.message()
    );
    assert!(!serves(&cp, ports::JOIN), "nothing started");

    // The right master secret: the node attests as unbound (PCR 15 = 0) and recovers.
    let started = Instant::now();
    let answer = recover(c.fresh_validator(&cp), &cp, &MASTER_SECRET, &MASTER_SALT)
        .await
        .unwrap_or_else(|s| panic!("Recover refused: {s:?}"));
    eprintln!("Recover took {:?}", started.elapsed());
    assert!(
        answer.message.contains(&hex::encode(&cluster_id)),
        "{answer:?}"
    );
    assert!(serves(&cp, ports::JOIN), "join service running again");
    wait_joined(&c, &all, &cp, &cluster_id).await;

    // A second Recover is refused: the node no longer attests as unbound (PCR 15 bound)...
    let config = atls::ClientConfig::server_only(c.fresh_validator(&cp)).unwrap();
    assert!(atls::channel(&cp.endpoint(ports::BOOTSTRAPPER), config)
        .await
        .is_err());
    // ...and a verifier that skips PCR 15 gets AlreadyExists.
    let mut lax = c.image.measurements.clone();
    lax.0.remove(&CLUSTER_ID_PCR);
    let lax = Arc::new(QemuVtpmValidator::new(vec![ak(&cp)], lax));
    let s = recover(lax, &cp, &MASTER_SECRET, &MASTER_SALT)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::AlreadyExists, "{s:?}");

    // The worker boots again and rejoins, unlocking its existing disk with the same key.
    let rejoin = Instant::now();
    let log_before = log_len(&worker);
    let worker = c.cloud().boot(&worker.name).unwrap();
    wait_joined(&c, &all, &worker, &cluster_id).await;
    eprintln!("worker rejoin after Recover took {:?}", rejoin.elapsed());
    assert_eq!(disk_key(&worker), (worker_uuid, worker_key.clone()));
    assert_eq!(disk_key(&cp), (cp_uuid, cp_key.clone()));
    statedisk::verify_key(&disk_of(&worker), &worker_key).unwrap();
    statedisk::verify_key(&disk_of(&cp), &cp_key).unwrap();
    let log = wait_log(&worker, "state disk unlocked").await;
    let this_boot = &log[log_before..];
    assert!(
        this_boot.contains("state disk unlocked") && !this_boot.contains("re-keyed"),
        "no new keyslot on rejoin: {this_boot}"
    );

    // Both nodes prove the same cluster ID as before.
    let member = c.member_validator(&all);
    for n in [&cp, &worker] {
        verify_cluster(&n.endpoint(ports::VERIFY), &member, Some(&cluster_id))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", n.name));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_control_plane_rejoins_through_another_recovered_control_plane() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("cprejoin");
    let cps = c.cloud().create_nodes(Role::ControlPlane, 2).unwrap();
    let (first, second) = (cps[0].clone(), cps[1].clone());
    let ok = init(c.fresh_validator(&first), &first).await;
    let cluster_id = ok.cluster_id.clone();
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &second, &cluster_id).await;

    // Everything restarts; the second control plane (it joined, it never ran Init) is recovered.
    let second = full_restart(&mut c, &[&second, &first], &second).await;
    recover(
        c.fresh_validator(&second),
        &second,
        &MASTER_SECRET,
        &MASTER_SALT,
    )
    .await
    .unwrap_or_else(|s| panic!("Recover of the joined control plane refused: {s:?}"));

    // The first control plane boots while another one serves joins: it rejoins by itself.
    let started = Instant::now();
    let log_before = log_len(&first);
    let first = c.cloud().boot(&first.name).unwrap();
    wait_joined(&c, &all, &first, &cluster_id).await;
    eprintln!(
        "control plane rejoined through the other control plane in {:?}",
        started.elapsed()
    );
    let log = wait_log(
        &first,
        "state disk unlocked with the disk key from the join ticket",
    )
    .await;
    let this_boot = &log[log_before..];
    assert!(
        this_boot.contains("waiting for Recover") && !this_boot.contains("re-keyed"),
        "{this_boot}"
    );
    let (_, key) = disk_key(&first);
    statedisk::verify_key(&disk_of(&first), &key).unwrap();

    // It no longer waits for Recover.
    let mut lax = c.image.measurements.clone();
    lax.0.remove(&CLUSTER_ID_PCR);
    let lax = Arc::new(QemuVtpmValidator::new(vec![ak(&first)], lax));
    let s = recover(lax, &first, &MASTER_SECRET, &MASTER_SALT)
        .await
        .unwrap_err();
    // A typed answer the provider branches on: nothing to do, not a failure.
    assert!(
        matches!(&s, RecoverError::NotWaiting { message } if message.contains("not waiting")),
        "{s:?}"
    );
}

/// The `attest` binary of this workspace (`make build` builds it), or
/// `CONSTELLATION_ATTEST_BIN`. Missing is a failure, not a skip.
fn attest_binary() -> PathBuf {
    let path = std::env::var_os("CONSTELLATION_ATTEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/attest"));
    assert!(
        path.exists(),
        "no attest binary at {}: run `make build` (or set CONSTELLATION_ATTEST_BIN)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn attest_recover_drives_recovery_with_secrets_from_files() {
    let attest = attest_binary();
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("attestrecover");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let ok = init(c.fresh_validator(&cp), &cp).await;
    let cp = full_restart(&mut c, &[&cp], &cp).await;

    let files = tempfile::tempdir().unwrap();
    let measurements = files.path().join("measurements.json");
    std::fs::write(&measurements, c.image.measurements.to_json()).unwrap();
    let ak_pem = files.path().join("ak.pem");
    let pem = der::pem::encode_string(
        "PUBLIC KEY",
        der::pem::LineEnding::LF,
        &hex::decode(&cp.ak_spki_hex).unwrap(),
    )
    .unwrap();
    std::fs::write(&ak_pem, pem).unwrap();
    let salt = files.path().join("salt");
    std::fs::write(&salt, MASTER_SALT).unwrap(); // raw bytes
    let run = |secret: &[u8]| {
        let secret_file = files.path().join("master-secret");
        std::fs::write(&secret_file, format!("{}\n", hex::encode(secret))).unwrap(); // hex
        let out = std::process::Command::new(&attest)
            .args(["recover", "--endpoint", &cp.endpoint(ports::BOOTSTRAPPER)])
            .arg("--measurements")
            .arg(&measurements)
            .arg("--ak-pub")
            .arg(&ak_pem)
            .arg("--master-secret-file")
            .arg(&secret_file)
            .arg("--salt-file")
            .arg(&salt)
            .output()
            .unwrap();
        let verdict: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), verdict)
    };

    let wrong = [0x55u8; 32];
    let (code, verdict) = tokio::task::block_in_place(|| run(&wrong));
    assert_eq!(code, Some(1), "{verdict}");
    assert_eq!(verdict["verdict"], "reject", "{verdict}");
    assert_eq!(verdict["failed_check"]["name"], "recover", "{verdict}");
    let detail = verdict["failed_check"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("PermissionDenied") && detail.contains("wrong master secret"),
        "{detail}"
    );
    assert!(!verdict.to_string().contains(&hex::encode(wrong)));

    let (code, verdict) = tokio::task::block_in_place(|| run(&MASTER_SECRET));
    assert_eq!(code, Some(0), "{verdict}");
    assert_eq!(verdict["verdict"], "accept", "{verdict}");
    wait_joined(&c, std::slice::from_ref(&cp), &cp, &ok.cluster_id).await;

    // Now bound: the node no longer attests as waiting, so the CLI refuses before sending.
    let (code, verdict) = tokio::task::block_in_place(|| run(&MASTER_SECRET));
    assert_eq!(code, Some(1), "{verdict}");
    assert_eq!(verdict["failed_check"]["name"], "attestation", "{verdict}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kmip_cluster_restarts_with_the_same_keys_and_recovers_with_kmip_credentials_once_the_kmip_server_is_back(
) {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut kmip = PyKmipServer::start().unwrap();
    let mut c = TestCluster::new("kmip");
    let (cp, worker) = c.control_plane_and_worker();
    let client = kmip.client_cert().clone();
    let kms = KmsConfig {
        backend: Some(Backend::Kmip(KmipKms {
            endpoint: kmip.endpoint(),
            server_ca_pem: kmip.pki().ca_pem().into_bytes(),
            client_cert_pem: client.cert_pem.clone().into_bytes(),
            client_key_pem: client.key_pem.clone().into_bytes(),
            kek_id: String::new(),
        })),
    };
    let ok = init_with_kms(c.fresh_validator(&cp), &cp, Some(kms)).await;
    let cluster_id = ok.cluster_id.clone();
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &worker, &cluster_id).await;
    let keyservice_dir = cp.dir.join("state/keyservice");
    assert!(keyservice_dir
        .join("kmip-wrapped-master-secret.json")
        .exists());
    assert!(
        !keyservice_dir.join("cluster-master-secret.json").exists(),
        "with KMIP the master secret is stored only wrapped"
    );
    let (worker_uuid, worker_key) = disk_key(&worker);
    let (cp_uuid, cp_key) = disk_key(&cp);
    statedisk::verify_key(&disk_of(&worker), &worker_key).unwrap();
    // A copy of the wrapped master secret sits in the state disk's LUKS2 header (readable
    // without a key, useless without the KMS's KEK).
    let header_copy = statedisk::read_token(&disk_of(&cp), KMIP_WRAPPED_SECRET_TOKEN)
        .unwrap()
        .expect("the wrapped master secret is in the header");
    assert_eq!(
        header_copy,
        std::fs::read_to_string(keyservice_dir.join("kmip-wrapped-master-secret.json")).unwrap()
    );
    assert!(!header_copy.contains(&hex::encode(MASTER_SECRET)));
    let credentials = KmipKms {
        endpoint: kmip.endpoint(),
        server_ca_pem: kmip.pki().ca_pem().into_bytes(),
        client_cert_pem: client.cert_pem.clone().into_bytes(),
        client_key_pem: client.key_pem.clone().into_bytes(),
        kek_id: String::new(),
    };

    // The KMIP server goes down, then everything restarts.
    kmip.stop();
    let cp = full_restart(&mut c, &[&worker, &cp], &cp).await;
    let started = Instant::now();
    let s = recover(c.fresh_validator(&cp), &cp, &MASTER_SECRET, &MASTER_SALT)
        .await
        .unwrap_err();
    eprintln!(
        "Recover with the KMIP server down: {:?} after {:?}",
        s,
        started.elapsed()
    );
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("external KMS") && s.message().contains(&kmip.endpoint()),
        "{}",
        s.message()
    );
    assert!(
        !serves(&cp, ports::JOIN),
        "nothing started while the KMS is down"
    );
    let log = std::fs::read_to_string(cp.log_path()).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(&hex::encode(MASTER_SECRET)));

    // KMIP credentials instead of the secret, KMS still down: the same refusal.
    let recover_through_kms = || {
        let request = kmip_recover_request(credentials.clone());
        recover_with(c.fresh_validator(&cp), &cp, request)
    };
    let s = recover_through_kms().await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");

    // The KMIP server is back: Recover with only the KMIP credentials (no master secret) now
    // succeeds; the node unwrapped the header's copy, its disk opened, nothing changed.
    kmip.start_again().unwrap();
    // A tampered header copy does not unwrap (AES-GCM under the KEK): refused, nothing started.
    let mut tampered: serde_json::Value = serde_json::from_str(&header_copy).unwrap();
    let mut wrapped = tampered["wrapped"].as_str().unwrap().to_owned();
    let flipped = if wrapped.starts_with('0') { "1" } else { "0" };
    wrapped.replace_range(0..1, flipped);
    tampered["wrapped"] = wrapped.into();
    let disk = disk_of(&cp);
    statedisk::write_token(&disk, KMIP_WRAPPED_SECRET_TOKEN, &tampered.to_string()).unwrap();
    let s = recover_through_kms().await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("unwrap"), "{}", s.message());
    assert!(!serves(&cp, ports::JOIN), "nothing started");
    statedisk::write_token(&disk, KMIP_WRAPPED_SECRET_TOKEN, &header_copy).unwrap();
    let started = Instant::now();
    recover_through_kms()
        .await
        .unwrap_or_else(|s| panic!("Recover with KMIP credentials refused: {s:?}"));
    eprintln!("Recover with KMIP credentials took {:?}", started.elapsed());
    wait_log(
        &cp,
        "unwrapping the master secret from the state disk's header",
    )
    .await;
    wait_log(&cp, "the external KMS unwraps the same master secret").await;
    assert!(serves(&cp, ports::JOIN));
    let worker = c.cloud().boot(&worker.name).unwrap();
    wait_joined(&c, &all, &worker, &cluster_id).await;
    assert_eq!(disk_key(&worker), (worker_uuid, worker_key.clone()));
    assert_eq!(disk_key(&cp), (cp_uuid, cp_key.clone()));
    statedisk::verify_key(&disk_of(&worker), &worker_key).unwrap();
    statedisk::verify_key(&disk_of(&cp), &cp_key).unwrap();
}
