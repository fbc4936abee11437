//! What the QEMU cluster tests share: the node image inputs, a scratch folder, a cluster that
//! is destroyed on every path, Init through aTLS, and small byte-search helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attest::bootstrapper_client::{self, attest_bootstrapper};
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_attestation::Measurements;
use constellation_common::node_status::NodeStatus;
use constellation_image::qemu::{self as image, NodeImage, NodeImageInputs};
use constellation_platform::local::ClusterSettings;
use constellation_platform::{Cloud, NodeRecord, QemuCloud};
use constellation_proto::init::{ClusterManagedKms, InitRequest, KmsConfig};
use constellation_proto::recover::RecoverRequest;
use constellation_proto::PROTOCOL_VERSION;
use tonic::transport::Channel;

pub const MASTER_SECRET: [u8; 32] = [0x5a; 32];
pub const MASTER_SALT: [u8; 32] = [0x17; 32];
pub const INIT_SECRET: &[u8] = b"qemu-cluster-init-secret";
/// Bound on the worker's join after Init (TCG, two VMs on two shared cores).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

pub fn kernel_package() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONSTELLATION_KERNEL_DIR") {
        return dir.into();
    }
    let root = workspace().join("tools/kernel");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        dirs.len(),
        1,
        "expected exactly one unpacked kernel under {} (run `make image-kernel`), found {dirs:?}",
        root.display()
    );
    dirs[0].clone()
}

pub fn bootstrapper() -> PathBuf {
    let p = std::env::var_os("CONSTELLATION_BOOTSTRAPPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/constellation-bootstrapper"));
    assert!(
        p.is_file(),
        "bootstrapper binary {} missing: run `cargo build -p constellation-bootstrapper`",
        p.display()
    );
    p
}

/// A private scratch folder, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        use std::hash::{BuildHasher, RandomState};
        use std::os::unix::fs::PermissionsExt;
        let r = RandomState::new().hash_one(std::time::SystemTime::now());
        let dir = std::env::temp_dir().join(format!("qc-{tag}-{}-{r:08x}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Destroys the cluster on every path (a failed assertion included): no VM outlives the test.
pub struct Cluster(pub Option<QemuCloud>);

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(cloud) = self.0.take() {
            if let Err(e) = cloud.destroy() {
                eprintln!("destroying the QEMU cluster: {e}");
            }
        }
    }
}

impl Cluster {
    pub fn cloud(&mut self) -> &mut QemuCloud {
        self.0.as_mut().unwrap()
    }

    /// Boots (or reboots) the nodes `names` at once and waits until each is up; panics naming
    /// the failure.
    pub fn boot(&mut self, names: &[String]) -> Vec<NodeRecord> {
        self.cloud()
            .boot_many(names)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("boot: {e}")))
            .collect()
    }

    /// Adds `count` control planes and `workers` workers and boots them all at once.
    pub fn add_and_boot(&mut self, control_planes: usize, workers: usize) -> Vec<NodeRecord> {
        let mut names = self.add(
            constellation_common::metadata::Role::ControlPlane,
            control_planes,
        );
        names.extend(self.add(constellation_common::metadata::Role::Worker, workers));
        self.boot(&names)
    }

    /// Adds `count` node records of `role` booting the cluster's image (not started).
    pub fn add(&mut self, role: constellation_common::metadata::Role, count: usize) -> Vec<String> {
        let image = self.cloud().settings().image_dir.clone();
        self.cloud().add_nodes(role, count, &image).unwrap()
    }
}

pub fn pinned(node: &NodeRecord) -> AkPublicKey {
    AkPublicKey::from_spki_der(&hex::decode(&node.ak_spki_hex).unwrap()).unwrap()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The LUKS2 UUID in a volume's primary binary header (offset 168, 40 bytes, NUL-padded).
pub fn luks_uuid(disk: &[u8]) -> String {
    assert_eq!(
        &disk[..6],
        b"LUKS\xba\xbe",
        "the state disk is a LUKS volume"
    );
    let raw = &disk[168..208];
    String::from_utf8(raw[..raw.iter().position(|b| *b == 0).unwrap()].to_vec()).unwrap()
}

/// A channel to `node`'s bootstrapper once it attested as not yet bound (PCR 15 still zero).
async fn attested(node: &NodeRecord, measurements: &Measurements, why: &str) -> Channel {
    let validator = QemuVtpmValidator::new(vec![pinned(node)], measurements.clone());
    let endpoint = node.endpoint(constellation_common::metadata::ports::BOOTSTRAPPER);
    let (channel, _verdict) = attest_bootstrapper(&endpoint, Arc::new(validator))
        .await
        .unwrap_or_else(|e| panic!("control plane {} must attest for {why}: {e}", node.name));
    channel
}

pub async fn init(node: &NodeRecord, measurements: &Measurements) -> (Vec<u8>, Duration, Duration) {
    let start = Instant::now();
    let channel = attested(node, measurements, "Init").await;
    let attested = start.elapsed();
    let request = InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: MASTER_SECRET.to_vec(),
        master_salt: MASTER_SALT.to_vec(),
        measurement_salt: vec![0x33; 32],
        init_secret: INIT_SECRET.to_vec(),
        cluster_name: "qc".into(),
        kubernetes_version: "v1.31.1".into(),
        kms: Some(KmsConfig {
            backend: Some(
                constellation_proto::init::kms_config::Backend::ClusterManaged(
                    ClusterManagedKms {},
                ),
            ),
        }),
        ..Default::default()
    };
    let success = bootstrapper_client::init(channel, request, |_| {})
        .await
        .unwrap_or_else(|e| panic!("Init of {}: {e}", node.name));
    (success.cluster_id, attested, start.elapsed() - attested)
}

/// Attests a control plane that waits for Recover (PCR 15 still zero) and sends it the
/// master secret; returns the node's answer.
pub async fn recover(node: &NodeRecord, measurements: &Measurements) -> String {
    let channel = attested(node, measurements, "Recover").await;
    let request = RecoverRequest {
        version: PROTOCOL_VERSION,
        master_secret: MASTER_SECRET.to_vec(),
        master_salt: MASTER_SALT.to_vec(),
        kmip: None,
    };
    bootstrapper_client::recover(channel, request)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .message
}

/// Builds the node image into `scratch` and creates an empty QEMU cluster from it; returns the
/// cluster, the image's precalculated measurements and the build time.
pub fn new_cluster(scratch: &Scratch) -> (Cluster, Measurements, Duration) {
    let t0 = Instant::now();
    let image_dir = scratch.0.join("image");
    let image = NodeImage::build(
        &image_dir,
        &NodeImageInputs::new(&kernel_package(), &bootstrapper()),
        "v-qemu-test",
    )
    .expect("node image builds");
    let measurements = image
        .precalculate(Path::new(image::OVMF_CODE))
        .expect("measurements precalculated")
        .measurements;
    let build_time = t0.elapsed();
    let cloud = QemuCloud::create(
        &scratch.0.join("cluster"),
        ClusterSettings {
            cluster_name: "qc".into(),
            init_secret_hash: constellation_common::initsecret::hash(INIT_SECRET),
            attestation_variant: "qemu-vtpm".into(),
            measurements_json: measurements.to_json(),
            image_dir,
        },
    )
    .unwrap();
    (Cluster(Some(cloud)), measurements, build_time)
}

/// Waits (bounded) until the node's status of its current boot satisfies `done`; panics naming
/// the node, its last status and its console otherwise.
pub async fn wait_status(
    cluster: &mut Cluster,
    node: &NodeRecord,
    what: &str,
    done: impl Fn(&NodeStatus) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let status = cluster.cloud().node_status(node);
        if status.as_ref().is_some_and(&done) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < JOIN_TIMEOUT,
            "node {}: {what} not reached within {JOIN_TIMEOUT:?}; status {status:?}; console:\n{}",
            node.name,
            cluster.cloud().console_tail(node, 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
