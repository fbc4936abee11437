//! Attacks on the join service by honestly attested but compromised nodes: asking for another
//! node's disk key, or for control-plane material they are not listed for.
//!
//! Every join here is a real one: a new TCP connection on loopback, mutual aTLS (both sides
//! attest with in-process software attesters, each node with its own attestation key), one
//! `IssueJoinTicket` call. Join services share their disk bindings through one folder, as the
//! control planes of a local cluster share the cluster folder.

mod common;

use constellation_common::metadata::Role;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::atls;
use constellation_attestation::measurements::Digest;
use constellation_attestation::testing::{software_policy, SoftwareIssuer, SoftwareValidator};
use constellation_attestation::SystemClock;
use constellation_common::kdf::{derive_key, DEFAULT_KEY_LEN};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::disk_bindings::{
    Claim, DiskBindings, DiskOwner, DiskUuid, FileDiskBindings, MAX_DISKS_PER_NODE,
};
use constellation_joinservice::pki::{ClusterPki, NodeIdentity};
use constellation_joinservice::ticket::{
    refusal_of, DataKeyError, DataKeySource, JoinTicketConfig, JoinTicketIssuer,
};
use constellation_joinservice::token::TokenRegistry;
use constellation_joinservice::AttestedPeerInterceptor;
use constellation_proto::join::join_refusal::Reason;
use constellation_proto::join::join_service_client::JoinServiceClient;
use constellation_proto::join::join_service_server::JoinServiceServer;
use constellation_proto::join::{
    AttestedNode, DiskOwnedByAnotherNode, IssueJoinTicketRequest, IssueJoinTicketResponse,
    RoleMismatch,
};
use constellation_proto::PROTOCOL_VERSION;
use tokio::sync::oneshot;
use tonic::{Code, Status};

const PCR: Digest = [7u8; 32];
const MASTER: &[u8] = b"master secret of the attacked cluster, 32+ bytes";
const MASTER_SALT: &[u8] = b"master salt of the attacked cluster, 32 bytes";
const WORKER_0_DISK: &str = "4f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a59";
const WORKER_1_DISK: &str = "4f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a60";
const CONTROL_0_DISK: &str = "c0c0c0c0-1d9e-4c8b-a6f5-0e1d2c3b4a59";

/// Derives disk keys as the key service does (HKDF), counting requests.
#[derive(Default)]
struct KdfKeys {
    calls: AtomicUsize,
}

#[tonic::async_trait]
impl DataKeySource for KdfKeys {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        derive_key(MASTER, MASTER_SALT, key_id, len).map_err(|e| DataKeyError {
            key_id: key_id.into(),
            reason: e.to_string(),
        })
    }
}

/// A node of the cluster: its metadata entry and its own attester.
struct Node {
    identity: NodeIdentity,
    issuer: Arc<SoftwareIssuer>,
}

impl Node {
    fn owner(&self) -> DiskOwner {
        DiskOwner {
            node_name: self.identity.name.clone(),
            ak_fingerprint: self.issuer.ak_fingerprint(),
        }
    }

    fn attested(&self) -> AttestedNode {
        AttestedNode {
            name: self.identity.name.clone(),
            ak_sha256: self.issuer.ak_fingerprint().to_vec(),
        }
    }

    /// The request this node's bootstrapper sends: its own name and listed role.
    fn request(&self, disk_uuid: &str) -> IssueJoinTicketRequest {
        IssueJoinTicketRequest {
            version: PROTOCOL_VERSION,
            disk_uuid: disk_uuid.into(),
            csr_pem: common::kubelet_csr(&self.identity).into_bytes(),
            is_control_plane: self.identity.role == Role::ControlPlane,
            node_name: self.identity.name.clone(),
        }
    }
}

/// The cluster as the platform lists it, and the folder its control planes share.
struct Cluster {
    nodes: HashMap<String, Node>,
    pki: Arc<ClusterPki>,
    server_issuer: Arc<SoftwareIssuer>,
    bindings_dir: tempfile::TempDir,
}

/// One running join service (one control plane's).
struct JoinService {
    addr: String,
    keys: Arc<KdfKeys>,
    tokens: Arc<TokenRegistry>,
    stop: Option<oneshot::Sender<()>>,
    stopped: tokio::task::JoinHandle<()>,
}

impl JoinService {
    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.stopped)
            .await
            .expect("join service stops")
            .expect("join service task");
    }
}

fn control_plane(name: &str, ip: &str) -> NodeIdentity {
    NodeIdentity {
        role: Role::ControlPlane,
        ..common::worker(name, ip)
    }
}

impl Cluster {
    fn new(extra_workers: usize) -> Self {
        let clock = SystemClock;
        let mut identities = vec![
            control_plane("control-0", "10.0.0.2"),
            control_plane("control-1", "10.0.0.3"),
            common::worker("worker-0", "10.0.0.10"),
            common::worker("worker-1", "10.0.0.11"),
        ];
        for i in 0..extra_workers {
            identities.push(common::worker(
                &format!("worker-x{i}"),
                &format!("10.0.1.{}", i + 1),
            ));
        }
        let nodes = identities
            .into_iter()
            .map(|identity| {
                let node = Node {
                    identity,
                    issuer: SoftwareIssuer::new(PCR),
                };
                (node.identity.name.clone(), node)
            })
            .collect();
        Self {
            nodes,
            pki: Arc::new(ClusterPki::generate("attacked-cluster", &clock).expect("cluster PKI")),
            server_issuer: SoftwareIssuer::new(PCR),
            bindings_dir: tempfile::tempdir().expect("cluster folder"),
        }
    }

    fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// The binding store as a control plane opens it (each its own handle on the shared folder).
    fn bindings(&self) -> FileDiskBindings {
        FileDiskBindings::open(self.bindings_dir.path()).expect("disk bindings")
    }

    /// What Init does on the first control plane: binds its own disk to itself.
    async fn init_control_0(&self) {
        let owner = self
            .bindings()
            .claim(
                &DiskUuid::parse(CONTROL_0_DISK).unwrap(),
                &self.node("control-0").owner(),
            )
            .await
            .unwrap();
        assert_eq!(owner, Claim::BoundTo(self.node("control-0").owner()));
    }

    /// Starts a join service behind mutual aTLS on loopback, with a fresh binding-store handle.
    async fn start_join_service(&self) -> JoinService {
        let directory: HashMap<String, NodeIdentity> = self
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.identity.clone()))
            .collect();
        let names_by_ak: HashMap<Digest, String> = self
            .nodes
            .iter()
            .map(|(name, n)| (n.issuer.ak_fingerprint(), name.clone()))
            .collect();
        let keys = Arc::new(KdfKeys::default());
        let tokens = Arc::new(TokenRegistry::new());
        let issuer = JoinTicketIssuer::new(
            keys.clone(),
            Arc::new(directory),
            Arc::new(self.bindings()),
            self.pki.clone(),
            tokens.clone(),
            Arc::new(SystemClock),
            JoinTicketConfig {
                measurement_salt: SecretBytes::new(b"measurement salt".to_vec()),
                measurement_secret: SecretBytes::new(b"measurement secret".to_vec()),
                api_server_endpoint: "10.0.0.1:6443".into(),
                kubernetes_version: "v1.31.1".into(),
                token_ttl: Duration::from_secs(7200),
            },
        );
        let joiner_validator = SoftwareValidator::pinning(
            self.nodes.values().map(|n| n.issuer.public()),
            software_policy(PCR),
        );
        let atls_config = atls::ServerConfig::mutual(self.server_issuer.clone(), joiner_validator)
            .expect("server aTLS config");
        let interceptor = AttestedPeerInterceptor::new(move |ak| names_by_ak.get(ak).cloned());
        let service = JoinServiceServer::with_interceptor(issuer, interceptor);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address").to_string();
        let incoming = atls::incoming(listener, atls_config);
        let (stop, stopped_rx) = oneshot::channel::<()>();
        let stopped = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped_rx.await;
                })
                .await
                .expect("join service");
        });
        JoinService {
            addr,
            keys,
            tokens,
            stop: Some(stop),
            stopped,
        }
    }

    /// One real join of `node` (its own attestation key) at `service`.
    async fn join(
        &self,
        service: &JoinService,
        node: &str,
        request: IssueJoinTicketRequest,
    ) -> Result<IssueJoinTicketResponse, Status> {
        let server_validator =
            SoftwareValidator::new(self.server_issuer.public(), software_policy(PCR));
        let config = atls::ClientConfig::mutual(server_validator, self.node(node).issuer.clone())
            .expect("joiner aTLS config");
        let (channel, _verdict) = atls::channel(&service.addr, config)
            .await
            .expect("aTLS channel");
        JoinServiceClient::new(channel)
            .issue_join_ticket(request)
            .await
            .map(|r| r.into_inner())
    }
}

fn disk_key(uuid: &str) -> Vec<u8> {
    derive_key(MASTER, MASTER_SALT, uuid, DEFAULT_KEY_LEN)
        .unwrap()
        .expose()
        .to_vec()
}

/// Asserts a refusal because `disk` belongs to `owner`, not to `claimant`: PermissionDenied,
/// both nodes named in the message and in the status details.
fn assert_disk_owned_elsewhere(status: &Status, disk: &str, claimant: &Node, owner: &Node) {
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    for name in [&claimant.identity.name, &owner.identity.name] {
        assert!(
            status.message().contains(&format!("{name:?}")),
            "{:?} does not name {name}",
            status.message()
        );
    }
    let refusal = refusal_of(status).expect("status carries a JoinRefusal");
    assert_eq!(
        refusal.reason,
        Some(Reason::DiskOwnedByAnotherNode(DiskOwnedByAnotherNode {
            disk_uuid: disk.into(),
            claimant: Some(claimant.attested()),
            owner: Some(owner.attested()),
        }))
    );
}

#[tokio::test]
async fn a_worker_cannot_fetch_another_nodes_disk_key() {
    let cluster = Cluster::new(0);
    let service = cluster.start_join_service().await;
    let (w0, w1) = (cluster.node("worker-0"), cluster.node("worker-1"));

    let ticket = cluster
        .join(&service, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    assert_eq!(ticket.state_disk_key, disk_key(WORKER_0_DISK));
    assert_eq!(service.keys.calls.load(Ordering::SeqCst), 1);

    // worker-1 attests honestly and asks, under its own name, for worker-0's disk key, in both
    // spellings of the UUID.
    for spelling in [WORKER_0_DISK.to_owned(), WORKER_0_DISK.to_uppercase()] {
        let status = cluster
            .join(&service, "worker-1", w1.request(&spelling))
            .await
            .unwrap_err();
        assert_disk_owned_elsewhere(&status, WORKER_0_DISK, w1, w0);
    }
    // Nothing was fetched or issued for the attacker.
    assert_eq!(service.keys.calls.load(Ordering::SeqCst), 1);
    assert_eq!(service.tokens.len(), 1);

    // worker-1's own disk still works.
    let own = cluster
        .join(&service, "worker-1", w1.request(WORKER_1_DISK))
        .await
        .unwrap();
    assert_eq!(own.state_disk_key, disk_key(WORKER_1_DISK));
    service.shut_down().await;
}

#[tokio::test]
async fn a_worker_cannot_fetch_the_control_planes_disk_key() {
    let cluster = Cluster::new(0);
    cluster.init_control_0().await;
    let service = cluster.start_join_service().await;
    let status = cluster
        .join(
            &service,
            "worker-0",
            cluster.node("worker-0").request(CONTROL_0_DISK),
        )
        .await
        .unwrap_err();
    assert_disk_owned_elsewhere(
        &status,
        CONTROL_0_DISK,
        cluster.node("worker-0"),
        cluster.node("control-0"),
    );
    // Not even another control plane gets it.
    let status = cluster
        .join(
            &service,
            "control-1",
            cluster.node("control-1").request(CONTROL_0_DISK),
        )
        .await
        .unwrap_err();
    assert_disk_owned_elsewhere(
        &status,
        CONTROL_0_DISK,
        cluster.node("control-1"),
        cluster.node("control-0"),
    );
    assert_eq!(service.keys.calls.load(Ordering::SeqCst), 0);
    service.shut_down().await;
}

#[tokio::test]
async fn a_worker_claiming_control_plane_role_gets_no_ca_material() {
    let cluster = Cluster::new(0);
    let service = cluster.start_join_service().await;
    let w0 = cluster.node("worker-0");

    // The role field says control plane; the platform lists worker-0 as a worker.
    let mut request = w0.request(WORKER_0_DISK);
    request.is_control_plane = true;
    let status = cluster
        .join(&service, "worker-0", request)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("\"worker-0\""),
        "{}",
        status.message()
    );
    assert_eq!(
        refusal_of(&status).expect("JoinRefusal").reason,
        Some(Reason::RoleMismatch(RoleMismatch {
            node_name: "worker-0".into(),
            requested_control_plane: true,
            listed_control_plane: false,
        }))
    );

    // Naming a control plane in the request does not help: the name must be the attested one.
    let mut request = cluster.node("control-1").request(WORKER_0_DISK);
    request.csr_pem = common::kubelet_csr(&w0.identity).into_bytes();
    let status = cluster
        .join(&service, "worker-0", request)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("\"control-1\""),
        "{}",
        status.message()
    );

    // Neither attempt fetched a key, issued a token or bound the disk.
    assert_eq!(service.keys.calls.load(Ordering::SeqCst), 0);
    assert!(service.tokens.is_empty());
    let disk = DiskUuid::parse(WORKER_0_DISK).unwrap();
    assert_eq!(cluster.bindings().owner(&disk).unwrap(), None);

    // Asked as the worker it is, worker-0 gets a ticket without CA material...
    let ticket = cluster
        .join(&service, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    assert!(ticket.control_plane_files.is_empty());
    // ...while a listed control plane gets the CA keys, and must ask as a control plane.
    let c1 = cluster.node("control-1");
    let ticket = cluster
        .join(
            &service,
            "control-1",
            c1.request("c1c1c1c1-1d9e-4c8b-a6f5-0e1d2c3b4a59"),
        )
        .await
        .unwrap();
    assert!(ticket
        .control_plane_files
        .iter()
        .any(|f| f.name == "ca.key" && !f.content.is_empty()));
    let mut as_worker = c1.request("c1c1c1c1-1d9e-4c8b-a6f5-0e1d2c3b4a59");
    as_worker.is_control_plane = false;
    let status = cluster
        .join(&service, "control-1", as_worker)
        .await
        .unwrap_err();
    assert_eq!(
        refusal_of(&status).expect("JoinRefusal").reason,
        Some(Reason::RoleMismatch(RoleMismatch {
            node_name: "control-1".into(),
            requested_control_plane: false,
            listed_control_plane: true,
        }))
    );
    service.shut_down().await;
}

#[tokio::test]
async fn disk_binding_survives_join_service_restart() {
    let cluster = Cluster::new(0);
    let first = cluster.start_join_service().await;
    let (w0, w1) = (cluster.node("worker-0"), cluster.node("worker-1"));
    cluster
        .join(&first, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    first.shut_down().await;

    // A new join service: new process state, the same cluster folder.
    let second = cluster.start_join_service().await;
    let status = cluster
        .join(&second, "worker-1", w1.request(WORKER_0_DISK))
        .await
        .unwrap_err();
    assert_disk_owned_elsewhere(&status, WORKER_0_DISK, w1, w0);
    let again = cluster
        .join(&second, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    assert_eq!(again.state_disk_key, disk_key(WORKER_0_DISK));
    second.shut_down().await;
}

#[tokio::test]
async fn the_same_node_rejoins_with_its_disk() {
    let cluster = Cluster::new(0);
    cluster.init_control_0().await;
    // Two control planes' join services, sharing the cluster folder.
    let a = cluster.start_join_service().await;
    let b = cluster.start_join_service().await;
    let w0 = cluster.node("worker-0");
    let mut keys = Vec::new();
    for service in [&a, &b, &a] {
        // After a reboot the node asks again, for the same disk, on a new connection.
        let ticket = cluster
            .join(service, "worker-0", w0.request(WORKER_0_DISK))
            .await
            .unwrap();
        keys.push(ticket.state_disk_key);
    }
    assert!(keys.iter().all(|k| *k == disk_key(WORKER_0_DISK)));
    // One live token per node and service, however often it rejoins.
    assert_eq!(a.tokens.len(), 1);
    assert_eq!(b.tokens.len(), 1);
    a.shut_down().await;
    b.shut_down().await;
}

#[tokio::test]
async fn racing_claims_through_two_control_planes_bind_a_disk_once() {
    const RACERS: usize = 8;
    const DISK: &str = "0da0da0d-1d9e-4c8b-a6f5-0e1d2c3b4a59";
    let cluster = Arc::new(Cluster::new(RACERS));
    let services = Arc::new([
        cluster.start_join_service().await,
        cluster.start_join_service().await,
    ]);
    let racers: Vec<String> = (0..RACERS).map(|i| format!("worker-x{i}")).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for (i, name) in racers.iter().enumerate() {
        let (cluster, services, barrier, name) = (
            cluster.clone(),
            services.clone(),
            barrier.clone(),
            name.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let request = cluster.node(&name).request(DISK);
            barrier.wait().await;
            let result = cluster.join(&services[i % 2], &name, request).await;
            (name, result)
        }));
    }
    let mut winners = Vec::new();
    let mut refusals = Vec::new();
    for task in tasks {
        let (name, result) = task.await.unwrap();
        match result {
            Ok(ticket) => {
                assert_eq!(ticket.state_disk_key, disk_key(DISK));
                winners.push(name);
            }
            Err(status) => refusals.push((name, status)),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let winner = cluster.node(&winners[0]);
    for (name, status) in &refusals {
        assert_disk_owned_elsewhere(status, DISK, cluster.node(name), winner);
    }
    let disk = DiskUuid::parse(DISK).unwrap();
    assert_eq!(
        cluster.bindings().owner(&disk).unwrap(),
        Some(winner.owner())
    );
    let fetched: usize = services
        .iter()
        .map(|s| s.keys.calls.load(Ordering::SeqCst))
        .sum();
    assert_eq!(fetched, 1);
}

#[test]
fn racing_claims_from_many_store_handles_agree_on_one_owner() {
    // Store level, without the network in between, so the claims collide as closely as
    // threads can make them: each thread is a control plane with its own handle.
    const THREADS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskUuid::parse("0da0da0d-1d9e-4c8b-a6f5-0e1d2c3b4a60").unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(THREADS));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (store, disk, barrier) = (
                FileDiskBindings::open(dir.path()).unwrap(),
                disk.clone(),
                barrier.clone(),
            );
            let handle = runtime.handle().clone();
            std::thread::spawn(move || {
                let me = DiskOwner {
                    node_name: format!("node-{i}"),
                    ak_fingerprint: [i as u8; 32],
                };
                barrier.wait();
                handle.block_on(async { store.claim(&disk, &me).await.unwrap() })
            })
        })
        .collect();
    let owners: Vec<Claim> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(matches!(owners[0], Claim::BoundTo(_)), "{owners:?}");
    assert!(owners.iter().all(|o| *o == owners[0]), "{owners:?}");
    // One disk record, the winner's node record (a claimant that arrives after the disk is
    // bound writes none, so how many losers wrote one depends on timing), and no temporaries
    // left by the losers.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let disk_records = names.iter().filter(|n| n.starts_with("0da0da0d-")).count();
    let node_records = names.iter().filter(|n| n.starts_with("node-")).count();
    assert_eq!(disk_records, 1, "{names:?}");
    assert!((1..=THREADS).contains(&node_records), "{names:?}");
    assert_eq!(
        disk_records + node_records,
        names.len(),
        "temporaries left: {names:?}"
    );
}

#[tokio::test]
async fn a_worker_cannot_grow_the_binding_store_with_made_up_disks() {
    let cluster = Cluster::new(0);
    let service = cluster.start_join_service().await;
    let w0 = cluster.node("worker-0");
    cluster
        .join(&service, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    let made_up = |i: usize| format!("0bad0bad-0000-0000-0000-{i:012}");
    // A few more disks are allowed (a node restarted before its re-key formats a new one)...
    for i in 1..MAX_DISKS_PER_NODE {
        cluster
            .join(&service, "worker-0", w0.request(&made_up(i)))
            .await
            .unwrap();
    }
    // ...then every further made-up disk is refused, naming the disks it holds.
    for i in MAX_DISKS_PER_NODE..MAX_DISKS_PER_NODE + 5 {
        let status = cluster
            .join(&service, "worker-0", w0.request(&made_up(i)))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
        assert!(
            status.message().contains(&made_up(i)) && status.message().contains(WORKER_0_DISK),
            "{}",
            status.message()
        );
    }
    // Per bound disk one disk record and one node slot; nothing for the refused ones.
    assert_eq!(
        std::fs::read_dir(cluster.bindings_dir.path())
            .unwrap()
            .count(),
        2 * MAX_DISKS_PER_NODE
    );
    assert_eq!(
        service.keys.calls.load(Ordering::SeqCst),
        MAX_DISKS_PER_NODE
    );
    // Its own disk still works.
    cluster
        .join(&service, "worker-0", w0.request(WORKER_0_DISK))
        .await
        .unwrap();
    service.shut_down().await;
}
