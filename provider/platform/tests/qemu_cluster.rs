//! A real cluster of QEMU VMs: one control plane and one worker boot the node image under
//! OVMF with their own swtpm; the control plane is attested over aTLS (through its host
//! forward) against the image's precalculated measurements and initialized; the worker joins
//! through the control plane's join service; both attest with PCR 15 = the cluster ID; the
//! state disk files on the host hold no known secret; destroy leaves no process and no file.
//!
//! Needs `make install` (qemu-system-x86, ovmf, swtpm, busybox-static, e2fsprogs, the kernel
//! in tools/) and a built bootstrapper (`cargo build -p constellation-bootstrapper`, or
//! `$CONSTELLATION_BOOTSTRAPPER`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls::{self, ClientConfig};
use constellation_attest::verify_cluster;
use constellation_attestation::measurements::CLUSTER_ID_PCR;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_attestation::Measurements;
use constellation_common::metadata::Role;
use constellation_image::qemu::{self as image, NodeImage, NodeImageInputs};
use constellation_platform::local::ClusterSettings;
use constellation_platform::{process, Cloud, NodeRecord, QemuCloud};
use constellation_proto::init::init_response::Kind;
use constellation_proto::init::init_service_client::InitServiceClient;
use constellation_proto::init::{ClusterManagedKms, InitRequest, KmsConfig};
use constellation_proto::PROTOCOL_VERSION;

const MASTER_SECRET: [u8; 32] = [0x5a; 32];
const MASTER_SALT: [u8; 32] = [0x17; 32];
const INIT_SECRET: &[u8] = b"qemu-cluster-init-secret";
/// Bound on the worker's join after Init (TCG, two VMs on two shared cores).
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

fn kernel_package() -> PathBuf {
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

fn bootstrapper() -> PathBuf {
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
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
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
struct Cluster(Option<QemuCloud>);

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
    fn cloud(&mut self) -> &mut QemuCloud {
        self.0.as_mut().unwrap()
    }
}

fn pinned(node: &NodeRecord) -> AkPublicKey {
    AkPublicKey::from_spki_der(&hex::decode(&node.ak_spki_hex).unwrap()).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The LUKS2 UUID in a volume's primary binary header (offset 168, 40 bytes, NUL-padded).
fn luks_uuid(disk: &[u8]) -> String {
    assert_eq!(&disk[..6], b"LUKS\xba\xbe", "the state disk is a LUKS volume");
    let raw = &disk[168..208];
    String::from_utf8(raw[..raw.iter().position(|b| *b == 0).unwrap()].to_vec()).unwrap()
}

async fn init(
    node: &NodeRecord,
    measurements: &Measurements,
) -> (Vec<u8>, Duration, Duration) {
    let start = Instant::now();
    let validator = QemuVtpmValidator::new(vec![pinned(node)], measurements.clone());
    let config = ClientConfig::server_only(Arc::new(validator)).unwrap();
    let endpoint = node.endpoint(constellation_common::metadata::ports::BOOTSTRAPPER);
    let (channel, _verdict) = atls::channel(&endpoint, config)
        .await
        .unwrap_or_else(|e| panic!("control plane {} must attest: {e}", node.name));
    let attested = start.elapsed();
    let mut stream = InitServiceClient::new(channel)
        .init(InitRequest {
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
        })
        .await
        .expect("Init accepted")
        .into_inner();
    while let Some(msg) = stream.message().await.expect("Init stream") {
        if let Some(Kind::Success(s)) = msg.kind {
            return (s.cluster_id, attested, start.elapsed() - attested);
        }
    }
    panic!("Init stream ended without success")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_and_a_worker_vm_form_a_cluster_on_encrypted_disks() {
    let scratch = Scratch::new("cluster");
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
    let root = scratch.0.join("cluster");
    let cloud = QemuCloud::create(
        &root,
        ClusterSettings {
            cluster_name: "qc".into(),
            init_secret_hash: constellation_common::initsecret::hash(INIT_SECRET),
            attestation_variant: "qemu-vtpm".into(),
            measurements_json: measurements.to_json(),
            image_dir: image_dir.clone(),
        },
    )
    .unwrap();
    let mut cluster = Cluster(Some(cloud));
    let accel = if cluster.cloud().uses_kvm() { "KVM" } else { "TCG" };

    // Both VMs boot at once; the worker retries its join until the control plane serves it.
    let t_boot = Instant::now();
    let mut names = cluster.cloud().add_nodes(Role::ControlPlane, 1).unwrap();
    names.extend(cluster.cloud().add_nodes(Role::Worker, 1).unwrap());
    let booted: Vec<NodeRecord> = cluster
        .cloud()
        .boot_many(&names)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("boot: {e}")))
        .collect();
    let boot_time = t_boot.elapsed();
    let (cp, worker) = (booted[0].clone(), booted[1].clone());
    assert_eq!(
        cluster.cloud().init_endpoint(),
        Some(cp.endpoint(constellation_common::metadata::ports::BOOTSTRAPPER))
    );

    let (cluster_id, attest_time, init_time) = init(&cp, &measurements).await;
    assert_eq!(cluster_id.len(), 32);
    let cluster_hex = hex::encode(&cluster_id);

    let t_join = Instant::now();
    loop {
        let status = cluster.cloud().node_status(&worker);
        if status.as_ref().and_then(|s| s.cluster_id()) == Some(cluster_hex.as_str()) {
            break;
        }
        assert!(
            t_join.elapsed() < JOIN_TIMEOUT,
            "worker {} did not join within {JOIN_TIMEOUT:?}; status {status:?}; console:\n{}",
            worker.name,
            cluster.cloud().console_tail(&worker, 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let join_time = t_join.elapsed();
    let cp_status = cluster.cloud().node_status(&cp).expect("control plane status");
    assert_eq!(cp_status.cluster_id(), Some(cluster_hex.as_str()));

    // Both nodes attest with the image's measurements and PCR 15 = the cluster ID.
    let t_verify = Instant::now();
    let mut m = measurements.clone();
    m.0.remove(&CLUSTER_ID_PCR);
    for node in [&cp, &worker] {
        let validator = QemuVtpmValidator::new(vec![pinned(node)], m.clone());
        verify_cluster(
            &node.endpoint(constellation_common::metadata::ports::VERIFY),
            &validator,
            Some(&cluster_id),
        )
        .await
        .unwrap_or_else(|e| panic!("node {} must verify: {e}", node.name));
    }
    let verify_time = t_verify.elapsed();

    // Inside each guest the volume was opened with dm-crypt and mounted at the state folder.
    for node in [&cp, &worker] {
        let console = std::fs::read_to_string(QemuCloud::console_path(node)).unwrap();
        assert!(
            console.contains("state volume mounted"),
            "node {}: no mounted state volume; console:\n{}",
            node.name,
            cluster.cloud().console_tail(node, 30)
        );
    }

    // The disk files on the host reveal nothing: no master secret, no disk key, no cluster ID
    // (the node's state files on the volume carry it in hex), and the header is no longer the
    // first-boot one.
    for node in [&cp, &worker] {
        let disk = std::fs::read(QemuCloud::state_disk_path(node)).unwrap();
        let uuid = luks_uuid(&disk);
        let disk_key = constellation_common::kdf::derive_key(
            &MASTER_SECRET,
            &MASTER_SALT,
            &uuid,
            constellation_common::kdf::DEFAULT_KEY_LEN,
        )
        .unwrap();
        assert!(
            !contains(&disk[..4096], b"constellation-first-boot"),
            "node {}: the volume was re-keyed",
            node.name
        );
        for (what, secret) in [
            ("master secret", MASTER_SECRET.to_vec()),
            ("master secret (hex)", hex::encode(MASTER_SECRET).into_bytes()),
            ("disk key", disk_key.expose().to_vec()),
            ("disk key (hex)", hex::encode(disk_key.expose()).into_bytes()),
            ("cluster ID (hex)", cluster_hex.clone().into_bytes()),
        ] {
            assert!(
                !contains(&disk, &secret),
                "node {}: the {what} is readable in the state disk file",
                node.name
            );
        }
    }

    // Destroy leaves no QEMU, swtpm, metadata or relay process and no file.
    let pids: Vec<u32> = [&cp, &worker].iter().map(|n| n.pid).collect();
    let swtpms: Vec<_> = [&cp, &worker]
        .iter()
        .map(|n| n.swtpm.clone().expect("vTPM recorded"))
        .collect();
    cluster.0.take().unwrap().destroy().expect("destroy");
    assert!(!root.exists(), "cluster folder removed");
    assert!(
        process::pids_under(&root).is_empty(),
        "no process names the cluster folder"
    );
    for (pid, tpm) in pids.iter().zip(&swtpms) {
        assert!(!process::running(*pid, ""), "QEMU {pid} stopped");
        assert!(!tpm.is_alive(), "swtpm {} stopped", tpm.pid);
    }
    eprintln!(
        "timing ({}): image build {:.1} s; both VMs booted to their bootstrapper {:.1} s; attest {:.1} s; Init {:.1} s; worker join after Init {:.1} s; verify both {:.1} s; total {:.1} s",
        accel,
        build_time.as_secs_f64(),
        boot_time.as_secs_f64(),
        attest_time.as_secs_f64(),
        init_time.as_secs_f64(),
        join_time.as_secs_f64(),
        verify_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
