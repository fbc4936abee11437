//! Time from "node started" to "Init returned" for one control-plane node, and the node start
//! itself (swtpm, measured boot, bootstrapper up), each over several fresh clusters.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_common::metadata::{ports, Role};
use constellation_image::LocalImage;
use constellation_platform::local::{ClusterSettings, LocalCloud};
use constellation_platform::Cloud;
use constellation_proto::init::init_response::Kind;
use constellation_proto::init::init_service_client::InitServiceClient;
use constellation_proto::init::InitRequest;
use constellation_proto::PROTOCOL_VERSION;

const ROUNDS: usize = 5;

/// Nodes use the production state-disk KDF (argon2id, fixed costs): the figure is what a real
/// local cluster sees.
fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = LocalImage::assemble(
        &dir.path().join("image"),
        Path::new(env!("CARGO_BIN_EXE_constellation-bootstrapper")),
        "bench",
    )
    .unwrap();
    let (mut boot, mut init, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let settings = ClusterSettings {
            cluster_name: format!("bench{round}"),
            init_secret_hash: constellation_common::initsecret::hash(b"bench secret"),
            attestation_variant: "qemu-vtpm".into(),
            measurements_json: image.measurements.to_json(),
            image_dir: image.dir.clone(),
        };
        let mut cloud =
            LocalCloud::create(&dir.path().join(format!("c{round}")), settings).unwrap();
        let t0 = Instant::now();
        let cp = cloud.create_nodes(Role::ControlPlane, 1).unwrap().remove(0);
        let t1 = Instant::now();
        let ak = AkPublicKey::from_spki_der(&hex::decode(&cp.ak_spki_hex).unwrap()).unwrap();
        let validator = Arc::new(QemuVtpmValidator::new(vec![ak], image.measurements.clone()));
        rt.block_on(async {
            let config = atls::ClientConfig::server_only(validator).unwrap();
            let (channel, _) = atls::channel(&cp.endpoint(ports::BOOTSTRAPPER), config)
                .await
                .unwrap();
            let req = InitRequest {
                version: PROTOCOL_VERSION,
                master_secret: vec![1; 32],
                master_salt: vec![2; 32],
                measurement_salt: vec![3; 32],
                init_secret: b"bench secret".to_vec(),
                cluster_name: "bench".into(),
                ..Default::default()
            };
            let mut stream = InitServiceClient::new(channel)
                .init(req)
                .await
                .unwrap()
                .into_inner();
            while let Some(m) = stream.message().await.unwrap() {
                if matches!(m.kind, Some(Kind::Success(_))) {
                    break;
                }
            }
        });
        let t2 = Instant::now();
        boot.push(t1 - t0);
        init.push(t2 - t1);
        total.push(t2 - t0);
        cloud.destroy().unwrap();
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "node start (swtpm + measured boot + bootstrapper up), median of {ROUNDS}: {:?}",
        median(&mut boot)
    );
    println!(
        "attest + Init over aTLS, median of {ROUNDS}:                          {:?}",
        median(&mut init)
    );
    println!(
        "nodes started -> init returned, median of {ROUNDS} (goal < 1 s):       {:?}",
        median(&mut total)
    );
}
