//! The control planes' replicated state in etcd, with real bootstrapper processes (each with its
//! own swtpm) and real etcd members (Debian's etcd-server) on the local platform, in one cluster
//! of three control planes whose phases build on each other:
//!
//! (a) every control plane is an etcd member after joining; a disk bound through one control
//!     plane's join service is refused to another node by the other control planes' join
//!     services (shared state, not files: the host's `disk-bindings` folder is not used);
//! (b) the etcd leader's node is killed (SIGKILL of its bootstrapper, etcd and daemons) while
//!     workers join: joins resume within [`RESUME_WITHIN`], and every binding acknowledged before
//!     the kill is still there;
//! (c) with two of three control planes gone, joins are refused (no quorum, no split brain);
//!     once one returns (its member restarts from its data directory at boot; it is recovered)
//!     they are admitted;
//! (d) a control plane that is listed but down keeps its member; once the platform deletes it,
//!     the other control planes remove its member.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use constellation_attest::verify_cluster;
use constellation_attestation::SystemClock;
use constellation_bootstrapper::etcd::client_url;
use constellation_bootstrapper::statedisk;
use constellation_common::metadata::{ports, Role};
use constellation_common::node_status::NodePhase;
use constellation_joinservice::ClusterPki;
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use constellation_store::keys::DiskBindingRecord;
use constellation_store::{ClientTls, Store, StoreConfig};

mod common;
use common::*;

/// Joins resume this soon after the leader's node is killed: an election (etcd's default 1 s
/// election timeout), the store client's retries, and the joiners' retry back-off.
const RESUME_WITHIN: Duration = Duration::from_secs(10);

/// A client of the members on `nodes`, with a client certificate from the cluster's etcd CA
/// (read from the Init control plane's PKI).
async fn store_of(pki: &ClusterPki, nodes: &[&NodeRecord]) -> Store {
    Store::connect(&StoreConfig {
        endpoints: nodes.iter().map(|n| client_url(n.ip)).collect(),
        tls: ClientTls {
            credentials: pki.etcd_client_cert("etcd-test", &SystemClock).unwrap(),
        },
        request_timeout: Duration::from_secs(3),
    })
    .await
    .unwrap()
}

/// Member name → is a learner.
async fn members(store: &Store) -> BTreeMap<String, bool> {
    store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.is_learner))
        .collect()
}

/// Waits until the voting members are exactly `names`.
async fn wait_members(
    store: &Store,
    names: &[&str],
    within: Duration,
    nodes: &[NodeRecord],
) -> Duration {
    let want: BTreeMap<String, bool> = names.iter().map(|n| (n.to_string(), false)).collect();
    let start = Instant::now();
    loop {
        let now = members(store).await;
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "members {now:?}, expected {want:?} within {within:?}\n{}",
            etcd_lines(nodes)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The bootstrappers' log lines about etcd (for failure messages).
fn etcd_lines(nodes: &[NodeRecord]) -> String {
    nodes
        .iter()
        .map(|n| {
            let log = std::fs::read_to_string(n.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("etcd")).collect();
            format!("--- {}\n{}", n.name, lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn bindings(store: &Store) -> BTreeMap<String, String> {
    store
        .list::<DiskBindingRecord>("/constellation/disks/")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|(_, r)| (r.disk_uuid, r.node_name))
        .collect()
}

/// SIGKILLs every process of the node (bootstrapper, etcd, daemons, swtpm): the node is gone.
fn kill_node(node: &NodeRecord) -> Vec<u32> {
    let marker = node.dir.display().to_string();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if constellation_platform::process::running(pid, &marker) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    killed
}

async fn joined(c: &TestCluster, all: &[NodeRecord], node: &NodeRecord, cluster_id: &[u8]) -> bool {
    verify_cluster(
        &node.endpoint(ports::VERIFY),
        &c.member_validator(all),
        Some(cluster_id),
    )
    .await
    .is_ok()
}

/// Whether a line of the log at `path` contains every needle.
fn logged(path: &std::path::Path, needles: &[&str]) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

/// The control plane whose join service issued `worker`'s ticket.
fn issuer_of<'a>(cps: &'a [NodeRecord], worker: &NodeRecord) -> &'a NodeRecord {
    cps.iter()
        .find(|cp| {
            logged(
                &daemon_log(cp, "joinservice"),
                &["join ticket issued", &worker.name],
            )
        })
        .unwrap_or_else(|| panic!("no join service logged a ticket for {}", worker.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_planes_share_their_state_in_etcd_through_failover_quorum_loss_and_removal() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("etcdcps");
    let cps = c.cloud().create_nodes(Role::ControlPlane, 3).unwrap();
    let ok = init(c.fresh_validator(&cps[0]), &cps[0]).await;
    let cluster_id = ok.cluster_id.clone();
    let all = c.cloud().list_nodes();
    for cp in &cps[1..] {
        wait_joined(&c, &all, cp, &cluster_id).await;
    }
    let pki = ClusterPki::load_from_dir(&cps[0].dir.join("state/pki"), "test").unwrap();
    let store = store_of(&pki, &cps.iter().collect::<Vec<_>>()).await;
    let names: Vec<&str> = cps.iter().map(|n| n.name.as_str()).collect();

    // (a) Every control plane is a voting member (the joined ones were learners first).
    let took = wait_members(&store, &names, Duration::from_secs(60), &cps).await;
    eprintln!("(a) three voting members {took:?} after the control planes joined");
    for cp in &cps {
        let data = cp.dir.join("state/etcd/data");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&data).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700, "{}", data.display());
    }

    // A worker joins through some control plane's join service; its disk is bound in etcd.
    let w = c.cloud().create_nodes(Role::Worker, 1).unwrap().remove(0);
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &w, &cluster_id).await;
    let issuer = issuer_of(&cps, &w).clone();
    let w_disk = statedisk::uuid(&disk_of(&w)).unwrap().to_string();
    assert_eq!(bindings(&store).await.get(&w_disk), Some(&w.name));

    // Another node presents that disk (a copy of it): every other control plane refuses it.
    let w2 = c.cloud().create_nodes(Role::Worker, 1).unwrap().remove(0);
    let all = c.cloud().list_nodes();
    wait_joined(&c, &all, &w2, &cluster_id).await;
    c.cloud().halt(&w2.name).unwrap();
    std::fs::copy(disk_of(&w), disk_of(&w2)).unwrap();
    let w2 = c.cloud().boot(&w2.name).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused_by: Vec<&NodeRecord> = cps
            .iter()
            .filter(|cp| cp.name != issuer.name)
            .filter(|cp| {
                logged(
                    &daemon_log(cp, "joinservice"),
                    &[
                        "join ticket refused",
                        &w2.name,
                        &format!("disk {w_disk} belongs to"),
                    ],
                )
            })
            .collect();
        if !refused_by.is_empty() {
            eprintln!(
                "(a) {}'s disk (bound through {}) refused to {} by {:?}",
                w.name,
                issuer.name,
                w2.name,
                refused_by.iter().map(|n| &n.name).collect::<Vec<_>>()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other control planes did not refuse {}'s disk to {}: {:?}, join ports: {:?}\n{}",
            w.name,
            w2.name,
            w2.status(),
            cps.iter()
                .map(|cp| serves(cp, ports::JOIN))
                .collect::<Vec<_>>(),
            cps.iter()
                .map(|cp| std::fs::read_to_string(daemon_log(cp, "joinservice"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(&w2.name))
                    .collect::<Vec<_>>()
                    .join("\n"))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match w2.status().map(|s| s.phase) {
        Some(NodePhase::JoinRefused { refusal, .. }) => {
            assert_eq!(
                refusal.check,
                constellation_attestation::refusal::RefusalCheck::DiskBinding
            )
        }
        other => panic!("{} reports {other:?}", w2.name),
    }
    c.cloud().delete_node(&w2.name).unwrap();
    assert_eq!(bindings(&store).await.get(&w_disk), Some(&w.name));
    // Not files: the host folder the control planes shared before stays unused.
    let host_folder = c.cloud().root().join("disk-bindings");
    assert!(
        std::fs::read_dir(&host_folder).map_or(true, |mut d| d.next().is_none()),
        "{} is used",
        host_folder.display()
    );

    // (b) Leadership to a joined control plane (the Init one runs the only key service), then
    // that node is killed while workers join.
    let victim = cps[1].clone();
    let ids: BTreeMap<String, u64> = store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.id))
        .collect();
    let (_, leader) = store.status_of(&client_url(cps[0].ip)).await.unwrap();
    if leader != ids[&victim.name] {
        let leader_node = cps.iter().find(|n| ids[&n.name] == leader).unwrap();
        store_of(&pki, &[leader_node])
            .await
            .move_leader(ids[&victim.name])
            .await
            .unwrap();
    }
    let (_, leader) = store.status_of(&client_url(cps[2].ip)).await.unwrap();
    assert_eq!(leader, ids[&victim.name], "the victim leads");
    let acknowledged = bindings(&store).await;
    assert!(acknowledged.len() >= 4, "{acknowledged:?}");

    let image = c.image.dir.clone();
    let storm = c.cloud().add_nodes(Role::Worker, 3, &image).unwrap();
    for booted in c.cloud().boot_many(&storm) {
        booted.unwrap();
    }
    let killed_at = Instant::now();
    let killed = kill_node(&victim);
    eprintln!(
        "(b) killed {} (the etcd leader): pids {killed:?}",
        victim.name
    );
    let storm: Vec<NodeRecord> = storm
        .iter()
        .map(|n| c.cloud().node(n).unwrap().clone())
        .collect();
    let all = c.cloud().list_nodes();
    let mut joined_after: BTreeMap<String, Duration> = BTreeMap::new();
    while joined_after.len() < storm.len() {
        for n in &storm {
            if !joined_after.contains_key(&n.name) && joined(&c, &all, n, &cluster_id).await {
                joined_after.insert(n.name.clone(), killed_at.elapsed());
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "storm workers joined: {joined_after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = *joined_after.values().min().unwrap();
    let last = *joined_after.values().max().unwrap();
    eprintln!(
        "(b) after the leader's kill: first join admitted after {first:?}, all {} after {last:?}",
        storm.len()
    );
    assert!(first <= RESUME_WITHIN, "joins resumed only after {first:?}");
    let survivors = store_of(&pki, &[&cps[0], &cps[2]]).await;
    let failover = Instant::now();
    let after = bindings(&survivors).await;
    eprintln!(
        "(b) store readable through the survivors {:?} after",
        failover.elapsed()
    );
    for (disk, node) in &acknowledged {
        assert_eq!(after.get(disk), Some(node), "binding of {disk} lost");
    }
    for n in &storm {
        let uuid = statedisk::uuid(&disk_of(n)).unwrap().to_string();
        assert_eq!(after.get(&uuid), Some(&n.name));
    }

    // (c) Two of three control planes gone: no quorum, so no join is admitted. The worker is
    // in the node directory the join service holds (published while quorum was there), so
    // only the disk binding, which needs the store, stands between it and a ticket.
    c.cloud().halt(&cps[2].name).unwrap();
    // A worker that joined before restarts: it is in the node directory every join service
    // holds, so only the store (its disk binding) stands between it and a ticket.
    let w = c.cloud().boot(&w.name).unwrap();
    // A new worker: the platform lists it, but without quorum it reaches no node directory.
    let x = c.cloud().create_nodes(Role::Worker, 1).unwrap().remove(0);
    let all = c.cloud().list_nodes();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logged(
        &daemon_log(&cps[0], "joinservice"),
        &["join ticket refused", &w.name, "etcd unavailable"],
    ) {
        assert!(Instant::now() < deadline, "{} was never refused", w.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let issued = |node: &NodeRecord, name: &str| {
        std::fs::read_to_string(daemon_log(node, "joinservice"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("join ticket issued") && l.contains(name))
            .count()
    };
    let rejoins_before = issued(&cps[0], &w.name);
    for n in [&w, &x] {
        assert!(
            !joined(&c, &all, n, &cluster_id).await,
            "{} joined without quorum",
            n.name
        );
        eprintln!(
            "(c) without quorum {} reports {:?}",
            n.name,
            n.status().map(|s| s.phase)
        );
    }
    assert_eq!(
        issued(&cps[0], &x.name),
        0,
        "a ticket was issued without quorum"
    );
    // One returns: its member restarts from its data directory at boot (quorum is back before
    // it rejoins or is recovered), and the operator recovers it.
    let recovered_at = Instant::now();
    let returned = c.cloud().boot(&cps[2].name).unwrap();
    wait_log(&returned, "waiting for Recover").await;
    recover(
        c.fresh_validator(&returned),
        &returned,
        &MASTER_SECRET,
        &MASTER_SALT,
    )
    .await
    .unwrap();
    wait_log(
        &returned,
        "restarted the etcd member from its data directory",
    )
    .await;
    let all = c.cloud().list_nodes();
    for n in [&w, &x] {
        while !joined(&c, &all, n, &cluster_id).await {
            assert!(
                recovered_at.elapsed() < Duration::from_secs(60),
                "{} not admitted after quorum returned",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "(c) {} admitted {:?} after {} was booted again (and recovered)",
            n.name,
            recovered_at.elapsed(),
            returned.name
        );
    }
    assert!(
        issued(&cps[0], &w.name) + issued(&returned, &w.name) > rejoins_before,
        "{} rejoined with a ticket",
        w.name
    );

    // (d) The killed control plane is listed but down: its member stays.
    let survivors = store_of(&pki, &[&cps[0], &returned]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        members(&survivors).await.contains_key(&victim.name),
        "a listed control plane's member was removed while it is down"
    );
    c.cloud().delete_node(&victim.name).unwrap();
    let took = wait_members(
        &survivors,
        &[cps[0].name.as_str(), returned.name.as_str()],
        Duration::from_secs(10),
        &[cps[0].clone(), returned.clone()],
    )
    .await;
    eprintln!("(d) the deleted control plane's member was removed {took:?} after the deletion");
    let log = std::fs::read_to_string(cps[0].log_path()).unwrap()
        + &std::fs::read_to_string(returned.log_path()).unwrap();
    assert!(log.contains("etcd member removed"), "the removal is logged");
}
