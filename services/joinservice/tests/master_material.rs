//! The key service's master material in join tickets: a node the platform lists as control
//! plane gets the master material the issuing node holds (read with the key service's own
//! `master_material_files`), so it can run a key service deriving the same data keys; workers,
//! and workers that ask as control planes, never get it; a node holding none hands none.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use constellation_attestation::FixedClock;
use constellation_common::kdf::derive_key;
use constellation_common::metadata::Role;
use constellation_common::secret::SecretBytes;
use constellation_joinservice::disk_bindings::FileDiskBindings;
use constellation_joinservice::pki::{ClusterPki, NodeIdentity};
use constellation_joinservice::ticket::{
    AttestedPeer, DataKeyError, DataKeySource, JoinTicketConfig, JoinTicketIssuer,
};
use constellation_keyservice::cluster_managed::ClusterManagedBackend;
use constellation_keyservice::{
    master_material_files, store_master_material_file, MasterSecret, MasterSecretBackend,
};
use constellation_proto::join::{IssueJoinTicketRequest, IssueJoinTicketResponse};

const MASTER: &[u8] = b"master secret of the test cluster, 32+ bytes";
const SALT: &[u8] = b"master salt of the test cluster, 32 bytes";
const DISK_UUID: &str = "4f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a59";
const CP_DISK_UUID: &str = "5f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a59";

struct Derived;

#[tonic::async_trait]
impl DataKeySource for Derived {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        derive_key(MASTER, SALT, key_id, len).map_err(|e| DataKeyError {
            key_id: key_id.into(),
            reason: e.to_string(),
        })
    }
}

struct Fixture {
    issuer: JoinTicketIssuer,
    nodes: HashMap<String, NodeIdentity>,
    _bindings: tempfile::TempDir,
}

fn fixture(material: Vec<(String, SecretBytes)>) -> Fixture {
    let clock = FixedClock::at_unix(1_750_000_000);
    let pki = Arc::new(ClusterPki::generate("test-cluster", &clock).unwrap());
    let mut nodes = HashMap::new();
    for n in [
        worker("worker-0", "10.0.0.10"),
        NodeIdentity {
            role: Role::ControlPlane,
            ..worker("control-1", "10.0.0.2")
        },
    ] {
        nodes.insert(n.name.clone(), n);
    }
    let bindings = tempfile::tempdir().unwrap();
    let issuer = JoinTicketIssuer::new(
        Arc::new(Derived),
        Arc::new(nodes.clone()),
        Arc::new(FileDiskBindings::open(bindings.path()).unwrap()),
        pki,
        Arc::new(Default::default()),
        Arc::new(clock),
        JoinTicketConfig {
            measurement_salt: SecretBytes::new(b"measurement salt".to_vec()),
            measurement_secret: SecretBytes::new(b"measurement secret".to_vec()),
            api_server_endpoint: "10.0.0.1:6443".into(),
            kubernetes_version: "v1.31.1".into(),
            token_ttl: Duration::from_secs(7200),
        },
    )
    .with_master_material(material);
    Fixture {
        issuer,
        nodes,
        _bindings: bindings,
    }
}

async fn ask(
    f: &Fixture,
    node: &str,
    control_plane: bool,
) -> Result<IssueJoinTicketResponse, String> {
    let peer = AttestedPeer {
        ak_fingerprint: [7; 32],
        node_name: Some(node.into()),
    };
    let req = IssueJoinTicketRequest {
        version: 1,
        disk_uuid: if control_plane {
            CP_DISK_UUID
        } else {
            DISK_UUID
        }
        .into(),
        csr_pem: kubelet_csr(&f.nodes[node]).into_bytes(),
        is_control_plane: control_plane,
        node_name: node.into(),
    };
    f.issuer
        .issue(Some(&peer), &req)
        .await
        .map_err(|e| e.to_string())
}

fn names(ticket: &IssueJoinTicketResponse) -> Vec<&str> {
    ticket
        .control_plane_files
        .iter()
        .map(|f| f.name.as_str())
        .collect()
}

/// A state directory whose key service stored the test cluster's master secret.
async fn state_with_master() -> tempfile::TempDir {
    let state = tempfile::tempdir().unwrap();
    let master = MasterSecret::new(
        SecretBytes::new(MASTER.to_vec()),
        SecretBytes::new(SALT.to_vec()),
    )
    .unwrap();
    ClusterManagedBackend::new(state.path().join("keyservice"))
        .store(&master)
        .await
        .unwrap();
    state
}

#[tokio::test]
async fn only_a_listed_control_plane_gets_the_master_material_and_it_derives_the_same_keys() {
    let state = state_with_master().await;
    let material = master_material_files(state.path()).unwrap();
    assert_eq!(
        material.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["keyservice/cluster-master-secret.json"]
    );
    let f = fixture(material);

    let worker = ask(&f, "worker-0", false).await.unwrap();
    assert!(
        worker.control_plane_files.is_empty(),
        "{:?}",
        names(&worker)
    );

    // A worker asking as a control plane is refused before anything is issued.
    let refused = ask(&f, "worker-0", true).await.unwrap_err();
    assert!(refused.contains("worker"), "{refused}");

    let cp = ask(&f, "control-1", true).await.unwrap();
    let got = names(&cp);
    assert!(got.contains(&"ca.key"), "{got:?}");
    assert_eq!(got.last(), Some(&"keyservice/cluster-master-secret.json"));
    let file = cp.control_plane_files.last().unwrap();
    assert_eq!(
        file.content,
        std::fs::read(state.path().join("keyservice/cluster-master-secret.json")).unwrap()
    );

    // Written on the joining control plane, the key service there loads the same master
    // secret: the same data key for the same key id.
    let joined = tempfile::tempdir().unwrap();
    store_master_material_file(joined.path(), &file.name, &file.content).unwrap();
    // Applied again (a rejoin after a restart): the same content is kept.
    store_master_material_file(joined.path(), &file.name, &file.content).unwrap();
    let path = joined.path().join("keyservice/cluster-master-secret.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let loaded = ClusterManagedBackend::new(joined.path().join("keyservice"))
        .load()
        .await
        .unwrap();
    assert_eq!(
        loaded.derive(DISK_UUID, 32).unwrap().expose(),
        derive_key(MASTER, SALT, DISK_UUID, 32).unwrap().expose()
    );
    // Other content for a file held, or a name outside the master material, is refused.
    assert!(store_master_material_file(joined.path(), &file.name, b"{}").is_err());
    assert!(store_master_material_file(joined.path(), "../../etc/passwd", b"x").is_err());
    assert!(store_master_material_file(joined.path(), "ca.key", b"x").is_err());
}

#[tokio::test]
async fn a_node_without_master_material_hands_none() {
    let empty = tempfile::tempdir().unwrap();
    let material = master_material_files(empty.path()).unwrap();
    assert!(material.is_empty());
    let f = fixture(material);
    let cp = ask(&f, "control-1", true).await.unwrap();
    let got = names(&cp);
    assert!(got.contains(&"ca.key"), "{got:?}");
    assert!(!got.iter().any(|n| n.starts_with("keyservice/")), "{got:?}");
}
