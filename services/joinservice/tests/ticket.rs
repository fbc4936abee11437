//! Join tickets end to end through the generated tonic trait method.

mod common;

use constellation_common::metadata::Role;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use constellation_attestation::FixedClock;
use constellation_common::kdf::{cluster_id, derive_key};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::disk_bindings::FileDiskBindings;
use constellation_joinservice::pki::{ClusterPki, NodeIdentity};
use constellation_joinservice::ticket::{
    AttestedPeer, DataKeyError, DataKeySource, JoinTicketConfig, JoinTicketIssuer,
};
use constellation_joinservice::token::{is_valid_token_format, TokenRegistry};
use constellation_proto::join::join_service_server::JoinService;
use constellation_proto::join::{IssueJoinTicketRequest, IssueJoinTicketResponse};
use tonic::{Code, Request, Status};

const NOW: u64 = 1_750_000_000;
const MASTER: &[u8] = b"master secret of the test cluster, 32+ bytes";
const MASTER_SALT: &[u8] = b"master salt of the test cluster, 32 bytes";
const DISK_UUID: &str = "4f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a59";

/// Derives data keys like the key service does, counting calls; can be told to fail.
#[derive(Default)]
struct FakeKeyService {
    calls: AtomicUsize,
    key_ids: Mutex<Vec<String>>,
    fail: bool,
}

#[tonic::async_trait]
impl DataKeySource for FakeKeyService {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.key_ids.lock().unwrap().push(key_id.to_owned());
        if self.fail {
            return Err(DataKeyError {
                key_id: key_id.into(),
                reason: "key service down".into(),
            });
        }
        derive_key(MASTER, MASTER_SALT, key_id, len).map_err(|e| DataKeyError {
            key_id: key_id.into(),
            reason: e.to_string(),
        })
    }
}

struct Fixture {
    issuer: JoinTicketIssuer,
    keys: Arc<FakeKeyService>,
    tokens: Arc<TokenRegistry>,
    pki: Arc<ClusterPki>,
    nodes: HashMap<String, NodeIdentity>,
    _bindings_dir: tempfile::TempDir,
}

fn fixture_with(keys: FakeKeyService) -> Fixture {
    let clock = FixedClock::at_unix(NOW);
    let pki = Arc::new(ClusterPki::generate("test-cluster", &clock).unwrap());
    let mut nodes = HashMap::new();
    for n in [
        worker("worker-0", "10.0.0.10"),
        worker("worker-1", "10.0.0.11"),
        NodeIdentity {
            role: Role::ControlPlane,
            ..worker("control-1", "10.0.0.2")
        },
    ] {
        nodes.insert(n.name.clone(), n);
    }
    let keys = Arc::new(keys);
    let tokens = Arc::new(TokenRegistry::new());
    let bindings_dir = tempfile::tempdir().unwrap();
    let issuer = JoinTicketIssuer::new(
        keys.clone(),
        Arc::new(nodes.clone()),
        Arc::new(FileDiskBindings::open(bindings_dir.path()).unwrap()),
        pki.clone(),
        tokens.clone(),
        Arc::new(clock),
        JoinTicketConfig {
            measurement_salt: SecretBytes::new(b"measurement salt".to_vec()),
            measurement_secret: SecretBytes::new(b"measurement secret".to_vec()),
            api_server_endpoint: "10.0.0.1:6443".into(),
            kubernetes_version: "v1.31.1".into(),
            token_ttl: Duration::from_secs(7200),
        },
    );
    Fixture {
        issuer,
        keys,
        tokens,
        pki,
        nodes,
        _bindings_dir: bindings_dir,
    }
}

fn fixture() -> Fixture {
    fixture_with(FakeKeyService::default())
}

fn peer(node: &str) -> AttestedPeer {
    AttestedPeer {
        ak_fingerprint: [7; 32],
        node_name: Some(node.into()),
    }
}

fn request_for(f: &Fixture, node: &str, control_plane: bool) -> IssueJoinTicketRequest {
    IssueJoinTicketRequest {
        version: 1,
        disk_uuid: DISK_UUID.into(),
        csr_pem: kubelet_csr(&f.nodes[node]).into_bytes(),
        is_control_plane: control_plane,
        node_name: node.into(),
    }
}

async fn call(
    f: &Fixture,
    peer: Option<AttestedPeer>,
    req: IssueJoinTicketRequest,
) -> Result<IssueJoinTicketResponse, Status> {
    let mut request = Request::new(req);
    if let Some(p) = peer {
        request.extensions_mut().insert(p);
    }
    f.issuer
        .issue_join_ticket(request)
        .await
        .map(|r| r.into_inner())
}

/// A refused request: the expected code, a message naming `needle`, and nothing issued.
async fn assert_refused(
    f: &Fixture,
    peer: Option<AttestedPeer>,
    req: IssueJoinTicketRequest,
    code: Code,
    needle: &str,
) {
    let status = call(f, peer, req).await.unwrap_err();
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
    assert_eq!(f.keys.calls.load(Ordering::SeqCst), 0, "data key fetched");
    assert!(f.tokens.is_empty(), "token issued");
}

#[tokio::test]
async fn worker_ticket_carries_derived_disk_key_token_and_verifiable_kubelet_cert() {
    let f = fixture();
    let resp = call(
        &f,
        Some(peer("worker-0")),
        request_for(&f, "worker-0", false),
    )
    .await
    .unwrap();

    let expected_key = derive_key(MASTER, MASTER_SALT, DISK_UUID, 32).unwrap();
    assert_eq!(resp.state_disk_key, expected_key.expose());
    assert_eq!(f.keys.key_ids.lock().unwrap().as_slice(), [DISK_UUID]);
    assert_eq!(resp.measurement_salt, b"measurement salt");
    assert_eq!(resp.measurement_secret, b"measurement secret");
    assert_eq!(
        resp.cluster_id,
        cluster_id(b"measurement secret", b"measurement salt")
    );

    assert!(is_valid_token_format(&resp.bootstrap_token));
    assert_eq!(resp.bootstrap_token_expiry_unix, (NOW + 7200) as i64);
    f.tokens
        .validate(&resp.bootstrap_token, &FixedClock::at_unix(NOW + 7199))
        .unwrap();
    assert!(f
        .tokens
        .validate(&resp.bootstrap_token, &FixedClock::at_unix(NOW + 7200))
        .is_err());

    assert_eq!(resp.discovery_token_ca_cert_hash, f.pki.ca_cert_hash());
    assert_eq!(resp.ca_cert_pem, f.pki.ca_cert_pem().as_bytes());
    let ca = parse_cert(std::str::from_utf8(&resp.ca_cert_pem).unwrap());
    let kubelet = parse_cert(std::str::from_utf8(&resp.kubelet_cert_pem).unwrap());
    assert_signed_by(&kubelet, &ca);
    assert_eq!(
        subject(&kubelet),
        vec![
            (O_OID.into(), "system:nodes".into()),
            (CN_OID.into(), "system:node:worker-0".into())
        ]
    );
    assert_eq!(
        sans(&kubelet),
        (
            vec!["worker-0".to_string()],
            vec!["10.0.0.10".parse().unwrap()]
        )
    );

    assert!(resp.control_plane_files.is_empty());
    assert_eq!(resp.api_server_endpoint, "10.0.0.1:6443");
    assert_eq!(resp.kubernetes_version, "v1.31.1");
}

#[tokio::test]
async fn disk_uuid_case_does_not_change_the_disk_key() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.disk_uuid = DISK_UUID.to_uppercase();
    let resp = call(&f, Some(peer("worker-0")), req).await.unwrap();
    let expected_key = derive_key(MASTER, MASTER_SALT, DISK_UUID, 32).unwrap();
    assert_eq!(resp.state_disk_key, expected_key.expose());
}

#[tokio::test]
async fn control_plane_ticket_carries_the_shared_ca_material() {
    let f = fixture();
    let resp = call(
        &f,
        Some(peer("control-1")),
        request_for(&f, "control-1", true),
    )
    .await
    .unwrap();
    let names: Vec<&str> = resp
        .control_plane_files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "ca.crt",
            "ca.key",
            "front-proxy-ca.crt",
            "front-proxy-ca.key",
            "etcd/ca.crt",
            "etcd/ca.key",
            "sa.key",
            "sa.pub",
            "constellation/key-service-ca.crt",
            "constellation/key-service-ca.key"
        ]
    );
    for (file, shared) in resp.control_plane_files.iter().zip(f.pki.shared_files()) {
        assert_eq!(file.content, shared.content.expose(), "{}", file.name);
    }
    // The CA key handed out is the key of the CA certificate.
    let ca_key = rcgen::KeyPair::from_pem(
        std::str::from_utf8(&resp.control_plane_files[1].content).unwrap(),
    )
    .unwrap();
    use der::Encode;
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&ca_key),
        parse_cert(f.pki.ca_cert_pem())
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap()
    );
}

#[tokio::test]
async fn missing_attested_peer_is_permission_denied() {
    let f = fixture();
    let req = request_for(&f, "worker-0", false);
    assert_refused(&f, None, req, Code::PermissionDenied, "attested").await;
}

#[tokio::test]
async fn request_for_another_node_than_the_attested_one_is_denied() {
    let f = fixture();
    // worker-1 attested, asks (with a perfectly good CSR) for worker-0's ticket.
    let req = request_for(&f, "worker-0", false);
    assert_refused(
        &f,
        Some(peer("worker-1")),
        req,
        Code::PermissionDenied,
        "\"worker-1\"",
    )
    .await;
}

#[tokio::test]
async fn peer_without_node_name_is_denied() {
    let f = fixture();
    let req = request_for(&f, "worker-0", false);
    let p = AttestedPeer {
        ak_fingerprint: [0xab; 32],
        node_name: None,
    };
    assert_refused(&f, Some(p), req, Code::PermissionDenied, "abababab").await;
}

#[tokio::test]
async fn csr_naming_another_node_is_denied() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.csr_pem = kubelet_csr(&f.nodes["worker-1"]).into_bytes();
    assert_refused(
        &f,
        Some(peer("worker-0")),
        req,
        Code::PermissionDenied,
        "system:node:worker-1",
    )
    .await;
}

#[tokio::test]
async fn csr_with_a_foreign_ip_is_denied() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.csr_pem = csr(
        "system:node:worker-0",
        &["system:nodes"],
        &[],
        &["10.0.0.11".parse().unwrap()],
    )
    .into_bytes();
    assert_refused(
        &f,
        Some(peer("worker-0")),
        req,
        Code::PermissionDenied,
        "10.0.0.11",
    )
    .await;
}

#[tokio::test]
async fn garbage_csr_is_invalid_argument() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.csr_pem =
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_vec();
    assert_refused(
        &f,
        Some(peer("worker-0")),
        req,
        Code::InvalidArgument,
        "CSR",
    )
    .await;
}

#[tokio::test]
async fn worker_asking_for_control_plane_material_is_denied() {
    let f = fixture();
    let req = request_for(&f, "worker-0", true);
    assert_refused(
        &f,
        Some(peer("worker-0")),
        req,
        Code::PermissionDenied,
        "worker",
    )
    .await;
}

#[tokio::test]
async fn node_unknown_to_metadata_is_denied() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.node_name = "ghost".into();
    assert_refused(
        &f,
        Some(peer("ghost")),
        req,
        Code::PermissionDenied,
        "ghost",
    )
    .await;
}

#[tokio::test]
async fn wrong_version_is_invalid_argument() {
    let f = fixture();
    for version in [0, 2] {
        let mut req = request_for(&f, "worker-0", false);
        req.version = version;
        assert_refused(
            &f,
            Some(peer("worker-0")),
            req,
            Code::InvalidArgument,
            &format!("version {version}"),
        )
        .await;
    }
}

#[tokio::test]
async fn malformed_disk_uuid_is_invalid_argument() {
    let f = fixture();
    let mut req = request_for(&f, "worker-0", false);
    req.disk_uuid = "key-of-someone-else".into();
    assert_refused(
        &f,
        Some(peer("worker-0")),
        req,
        Code::InvalidArgument,
        "key-of-someone-else",
    )
    .await;
}

#[tokio::test]
async fn key_service_failure_is_unavailable_and_issues_no_token() {
    let f = fixture_with(FakeKeyService {
        fail: true,
        ..Default::default()
    });
    let status = call(
        &f,
        Some(peer("worker-0")),
        request_for(&f, "worker-0", false),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(f.keys.calls.load(Ordering::SeqCst), 1);
    assert!(f.tokens.is_empty());
}
