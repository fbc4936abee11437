//! Shared by the node tests: a local-platform cluster of real bootstrapper processes (each
//! with its own swtpm) booted from an image of this build, and helpers to wait for joins.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attest::bootstrapper_client::{self, attest_bootstrapper, RecoverError};
use constellation_attest::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_bootstrapper::statedisk;
use constellation_common::kdf;
use constellation_common::metadata::{ports, Role};
use constellation_image::LocalImage;
use constellation_platform::local::{ClusterSettings, LocalCloud, NodeRecord};
use constellation_platform::Cloud as _;
use constellation_proto::init::{InitRequest, InitSuccess, KmipKms, KmsConfig};
use constellation_proto::recover::{RecoverRequest, RecoverResponse};
use constellation_proto::PROTOCOL_VERSION;

pub const INIT_SECRET: &[u8] = b"the init secret of this test cluster";

pub struct TestCluster {
    cloud: Option<LocalCloud>,
    pub image: LocalImage,
    _dir: tempfile::TempDir,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(cloud) = self.cloud.take() {
            let _ = cloud.destroy();
        }
    }
}

impl TestCluster {
    pub fn new(name: &str) -> Self {
        Self::nested(name, "")
    }

    /// A cluster whose folder is `nested` deeper in the temporary folder (node folders too deep
    /// for a unix socket path inside them, as under a user's project folder).
    pub fn nested(name: &str, nested: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = LocalImage::assemble(
            &dir.path().join("image"),
            Path::new(env!("CARGO_BIN_EXE_constellation-bootstrapper")),
            "v0.0.0-test",
        )
        .unwrap();
        let settings = ClusterSettings {
            cluster_name: name.to_owned(),
            init_secret_hash: constellation_common::initsecret::hash(INIT_SECRET),
            attestation_variant: "qemu-vtpm".into(),
            measurements_json: image.measurements.to_json(),
            image_dir: image.dir.clone(),
        };
        let cloud = LocalCloud::create(&dir.path().join(nested).join("cluster"), settings).unwrap();
        Self {
            cloud: Some(cloud),
            image,
            _dir: dir,
        }
    }

    pub fn cloud(&mut self) -> &mut LocalCloud {
        self.cloud.as_mut().unwrap()
    }

    /// Boots one control plane and one worker.
    pub fn control_plane_and_worker(&mut self) -> (NodeRecord, NodeRecord) {
        let cp = self
            .cloud()
            .create_nodes(Role::ControlPlane, 1)
            .unwrap()
            .remove(0);
        let worker = self
            .cloud()
            .create_nodes(Role::Worker, 1)
            .unwrap()
            .remove(0);
        (cp, worker)
    }

    /// A validator for a fresh node: the image's measurements (PCR 15 = 0) and the node's AK.
    pub fn fresh_validator(&self, node: &NodeRecord) -> Arc<QemuVtpmValidator> {
        Arc::new(QemuVtpmValidator::new(
            vec![ak(node)],
            self.image.measurements.clone(),
        ))
    }

    pub fn member_validator(&self, nodes: &[NodeRecord]) -> QemuVtpmValidator {
        let mut m = self.image.measurements.clone();
        m.0.remove(&CLUSTER_ID_PCR);
        QemuVtpmValidator::new(nodes.iter().map(ak).collect(), m)
    }
}

pub fn ak(node: &NodeRecord) -> AkPublicKey {
    AkPublicKey::from_spki_der(&hex::decode(&node.ak_spki_hex).unwrap()).unwrap()
}

pub async fn wait_joined(
    c: &TestCluster,
    nodes: &[NodeRecord],
    node: &NodeRecord,
    cluster_id: &[u8],
) {
    let validator = c.member_validator(nodes);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match verify_cluster(&node.endpoint(ports::VERIFY), &validator, Some(cluster_id)).await {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "{} did not join: {e}\n{}",
                    node.name,
                    std::fs::read_to_string(node.log_path()).unwrap_or_default()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub fn disk_of(node: &NodeRecord) -> PathBuf {
    node.dir.join("state").join("disk.img")
}

pub const MASTER_SECRET: [u8; 32] = [0x11; 32];
pub const MASTER_SALT: [u8; 32] = [0x22; 32];

/// One cluster of this file at a time: on a 2-core machine, parallel clusters turn restart and
/// rejoin timings into a test of the machine.
pub static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Init over server-attested aTLS with [`MASTER_SECRET`] and [`MASTER_SALT`] and a
/// cluster-managed master secret.
pub async fn init(validator: Arc<QemuVtpmValidator>, node: &NodeRecord) -> InitSuccess {
    init_with_kms(validator, node, None).await
}

/// [`init`] with the given KMS configuration.
pub async fn init_with_kms(
    validator: Arc<QemuVtpmValidator>,
    node: &NodeRecord,
    kms: Option<KmsConfig>,
) -> InitSuccess {
    let (channel, _) = attest_bootstrapper(&node.endpoint(ports::BOOTSTRAPPER), validator)
        .await
        .unwrap();
    let request = InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: MASTER_SECRET.to_vec(),
        master_salt: MASTER_SALT.to_vec(),
        measurement_salt: vec![0x33; 32],
        init_secret: INIT_SECRET.to_vec(),
        cluster_name: "test".into(),
        kubernetes_version: "v1.31.1".into(),
        kms,
        ..Default::default()
    };
    bootstrapper_client::init(channel, request, |_| {})
        .await
        .unwrap_or_else(|e| panic!("Init of {}: {e}", node.name))
}

pub async fn wait_log(node: &NodeRecord, needle: &str) -> String {
    wait_in_log(node, &node.log_path(), needle).await
}

/// The log of a control plane's supervised daemon (`joinservice`, `keyservice`, `verify`).
pub fn daemon_log(node: &NodeRecord, daemon: &str) -> PathBuf {
    node.dir.join("daemons").join(format!("{daemon}.log"))
}

/// [`wait_log`] in the log of the node's supervised daemon `daemon`.
pub async fn wait_daemon_log(node: &NodeRecord, daemon: &str, needle: &str) -> String {
    wait_in_log(node, &daemon_log(node, daemon), needle).await
}

async fn wait_in_log(node: &NodeRecord, path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}:\n{log}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn log_len(node: &NodeRecord) -> usize {
    std::fs::metadata(node.log_path()).map_or(0, |m| m.len() as usize)
}

/// The known-answer disk key: HKDF(master secret, salt, "key-" + disk UUID).
pub fn disk_key(node: &NodeRecord) -> (String, Vec<u8>) {
    let uuid = statedisk::uuid(&disk_of(node)).unwrap().to_string();
    let key = kdf::derive_key(&MASTER_SECRET, &MASTER_SALT, &uuid, 32).unwrap();
    (uuid, key.expose().to_vec())
}

pub fn serves(node: &NodeRecord, port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::new(node.ip, port),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Every node in `halt` powers off, then `first` boots and waits for Recover.
pub async fn full_restart(
    c: &mut TestCluster,
    halt: &[&NodeRecord],
    first: &NodeRecord,
) -> NodeRecord {
    for node in halt {
        c.cloud().halt(&node.name).unwrap();
    }
    let booted = Instant::now();
    let first = c.cloud().boot(&first.name).unwrap();
    eprintln!("{} boot took {:?}", first.name, booted.elapsed());
    wait_log(&first, "waiting for Recover").await;
    first
}

/// Attests the node as not yet bound (PCR 15 = 0), then sends Recover with the master secret.
pub async fn recover(
    validator: Arc<QemuVtpmValidator>,
    node: &NodeRecord,
    master_secret: &[u8],
    master_salt: &[u8],
) -> Result<RecoverResponse, RecoverError> {
    let request = RecoverRequest {
        version: PROTOCOL_VERSION,
        master_secret: master_secret.to_vec(),
        master_salt: master_salt.to_vec(),
        kmip: None,
    };
    recover_with(validator, node, request).await
}

/// Attests the node as not yet bound (PCR 15 = 0), then sends `request`.
pub async fn recover_with(
    validator: Arc<QemuVtpmValidator>,
    node: &NodeRecord,
    request: RecoverRequest,
) -> Result<RecoverResponse, RecoverError> {
    let (channel, _) = attest_bootstrapper(&node.endpoint(ports::BOOTSTRAPPER), validator)
        .await
        .unwrap_or_else(|e| panic!("attesting {} for Recover: {e}", node.name));
    bootstrapper_client::recover(channel, request).await
}

/// A Recover that carries KMIP client credentials instead of the master secret.
pub fn kmip_recover_request(kmip: KmipKms) -> RecoverRequest {
    RecoverRequest {
        version: PROTOCOL_VERSION,
        kmip: Some(kmip),
        ..Default::default()
    }
}
