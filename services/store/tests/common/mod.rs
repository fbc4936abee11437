//! A real etcd cluster on loopback for the store's tests: members started by the crate's own
//! launcher with certificates from a fresh cluster PKI's etcd CA.

#![allow(dead_code)] // each test binary uses a part

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use constellation_attestation::SystemClock;
use constellation_joinservice::disk_bindings::DiskBindingError;
use constellation_joinservice::{ClusterPki, DiskOwner, DiskUuid};
use constellation_store::client::DEFAULT_REQUEST_TIMEOUT;
use constellation_store::member::DEFAULT_ETCD_BINARY;
use constellation_store::{
    ClientTls, ClusterState, MemberConfig, Store, StoreConfig, SupervisedMember,
};
use nix::sys::signal::Signal;

/// One cluster at a time per test binary: parallel clusters on 2 cores would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct TestCluster {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub pki: ClusterPki,
    pub configs: Vec<MemberConfig>,
    pub members: Vec<Option<SupervisedMember>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn member_config(dir: &std::path::Path, name: &str) -> MemberConfig {
    MemberConfig {
        name: name.into(),
        state_dir: dir.join(name),
        client_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        peer_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        metrics_addr: None,
        initial_cluster: Vec::new(),
        cluster_state: ClusterState::New,
        cluster_token: "store-test".into(),
        binary: DEFAULT_ETCD_BINARY.into(),
    }
}

impl TestCluster {
    /// Starts `n` members as a new cluster and waits until it accepts writes.
    pub async fn start(n: usize) -> Self {
        let serial = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let pki = ClusterPki::generate("store-test", &SystemClock).unwrap();
        let mut configs: Vec<MemberConfig> = (0..n)
            .map(|i| member_config(dir.path(), &format!("cp-{i}")))
            .collect();
        let initial: Vec<(String, String)> = configs
            .iter()
            .map(|c| (c.name.clone(), c.peer_url()))
            .collect();
        for c in &mut configs {
            c.initial_cluster = initial.clone();
        }
        let mut cluster = Self {
            _serial: serial,
            dir,
            pki,
            members: configs.iter().map(|_| None).collect(),
            configs,
        };
        for i in 0..n {
            cluster.launch(i);
        }
        let store = cluster.store(&cluster.endpoints()).await;
        wait_writable(&store, Duration::from_secs(30)).await;
        cluster
    }

    pub fn launch(&mut self, i: usize) {
        let config = self.configs[i].clone();
        let creds = self
            .pki
            .etcd_member_cert(&config.name, &[config.client_addr.ip()], &SystemClock)
            .unwrap();
        self.members[i] = Some(SupervisedMember::start(config, &creds).unwrap());
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.configs.iter().map(MemberConfig::client_url).collect()
    }

    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            credentials: self.pki.etcd_client_cert("test", &SystemClock).unwrap(),
        }
    }

    pub async fn store(&self, endpoints: &[String]) -> Store {
        Store::connect(&StoreConfig {
            endpoints: endpoints.to_vec(),
            tls: self.client_tls(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
        .await
        .unwrap()
    }

    /// The index of the member every running member names as leader.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let store = self.store(&self.endpoints()).await;
            let mut ids = Vec::new();
            let mut leaders = Vec::new();
            for (i, endpoint) in self.endpoints().iter().enumerate() {
                if self.members[i].is_none() {
                    ids.push(None);
                    continue;
                }
                match store.status_of(endpoint).await {
                    Ok((id, leader)) => {
                        ids.push(Some(id));
                        leaders.push(leader);
                    }
                    Err(_) => ids.push(None),
                }
            }
            if let Some(&leader) = leaders.first() {
                if leader != 0 && leaders.iter().all(|l| *l == leader) {
                    if let Some(i) = ids.iter().position(|id| *id == Some(leader)) {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends member `i` with `signal`, without restarting it.
    pub async fn stop(&mut self, i: usize, signal: Signal) {
        if let Some(member) = self.members[i].take() {
            member.stop(signal).await;
        }
    }
}

/// Waits until a put through `store` succeeds (the cluster has a leader and quorum).
pub async fn wait_writable(store: &Store, within: Duration) -> Duration {
    let start = Instant::now();
    let key = constellation_store::keys::node("probe");
    let record = probe_node();
    loop {
        match store.put(&key, &record).await {
            Ok(()) => return start.elapsed(),
            Err(e) => assert!(
                start.elapsed() < within,
                "not writable within {within:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn probe_node() -> constellation_store::keys::NodeRecord {
    constellation_store::keys::NodeRecord {
        name: "probe".into(),
        role: constellation_common::metadata::Role::Worker,
        ip: "10.0.0.1".parse().unwrap(),
        ak_spki_hex: "00".into(),
    }
}

/// The store error behind a join service's disk-binding error, if that is what it is.
pub fn store_error(e: &DiskBindingError) -> Option<&constellation_store::StoreError> {
    match e {
        DiskBindingError::Store(source) => source.downcast_ref(),
        _ => None,
    }
}

pub fn disk(n: u64) -> DiskUuid {
    DiskUuid::parse(&format!("00000000-0000-4000-8000-{n:012x}")).unwrap()
}

pub fn node(name: &str, ak: u64) -> DiskOwner {
    let mut ak_fingerprint = [0u8; 32];
    ak_fingerprint[..8].copy_from_slice(&ak.to_be_bytes());
    DiskOwner {
        node_name: name.into(),
        ak_fingerprint,
    }
}
