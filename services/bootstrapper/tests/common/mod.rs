//! Shared by the node tests: a local-platform cluster of real bootstrapper processes (each
//! with its own swtpm) booted from an image of this build, and helpers to wait for joins.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::cluster::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_common::metadata::ports;
use constellation_image::LocalImage;
use constellation_platform::local::{ClusterSettings, LocalCloud, NodeRecord};

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
        // Tests use the fast (insecure) LUKS key derivation; production keeps argon2id.
        std::env::set_var("CONSTELLATION_STATEDISK_INSECURE_FAST_KDF", "1");
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
        let cloud = LocalCloud::create(&dir.path().join("cluster"), settings).unwrap();
        Self {
            cloud: Some(cloud),
            image,
            _dir: dir,
        }
    }

    pub fn cloud(&mut self) -> &mut LocalCloud {
        self.cloud.as_mut().unwrap()
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
