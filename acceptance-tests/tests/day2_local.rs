//! Day-2 operations on a real local cluster through Terraform (1.0.3 and 1.15.5), one cluster
//! per Terraform version shared by every step:
//!
//! 1. rolling upgrade of a 1+2 cluster to another image (v1 -> v2), with a verification loop
//!    running throughout: every node that reports it joined must attest under v1's or v2's
//!    measurements with PCR 15 = the cluster ID, and the longest join outage (no control
//!    plane with its join service up, or none with its key service up) is recorded;
//! 2. the provider killed mid-upgrade (back to v1) and the next apply finishing it, with the
//!    journal's secrets, the cluster ID and every remaining disk key unchanged;
//! 3. a replacement that fails to attest (an image whose PCR 4 is not the configured one)
//!    stops the upgrade naming PCR[4]; the old nodes keep serving, the old image re-applies
//!    with no change;
//! 4. loss of a control plane (processes and folder gone) in a 2-control-plane cluster: apply
//!    replaces it through the surviving control plane;
//! 5. full restart (every process of the cluster killed): apply recovers the control planes
//!    with Recover, the workers rejoin, every node attests with PCR 15 = the same cluster ID
//!    and every state disk still opens with the key derived from the master secret.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug), swtpm and openssl.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acceptance_tests::cluster_harness::{
    assert_all_verified, cluster_in_state, journal, modified_binary, nodes, ok_or_node_logs,
    processes_mentioning, sibling_binary, verify_node, write_measurements, Cleanup, Node,
    ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::{hcl, Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_common::metadata::ports;

/// Images v1, v2 and a bad one (claiming v2's measurements) and a cluster of `var.image` with
/// `var.control_planes` control planes and two workers.
fn config() -> String {
    let mut cluster = hcl::Cluster::of_image("day2", "local", "v1");
    cluster.control_plane_count = "var.control_planes".into();
    cluster.worker_count = "2".into();
    cluster.image_reference = "local.reference[var.image]".into();
    cluster.image_measurements = "local.measurements[var.image]".into();
    format!(
        "{}{}{}{}{}{LOCALS}{}{OUTPUTS}",
        hcl::variable("image", "string", "\"v1\""),
        hcl::variable("control_planes", "number", "1"),
        hcl::image("v1", "local", "v0.1.0", "BOOT_V1"),
        hcl::image("v2", "local", "v0.2.0", "BOOT_V2"),
        hcl::image("bad", "local", "v0.2.0-bad", "BOOT_BAD"),
        cluster.hcl()
    )
}

const LOCALS: &str = r#"locals {
  reference = {
    v1  = constellation_image.v1.reference
    v2  = constellation_image.v2.reference
    bad = constellation_image.bad.reference
  }
  # The bad image claims v2's measurements: its nodes measure differently (PCR 4).
  measurements = {
    v1  = constellation_image.v1.measurements
    v2  = constellation_image.v2.measurements
    bad = constellation_image.v2.measurements
  }
}
"#;

const OUTPUTS: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = local.measurements[var.image] }
output "v1" { value = constellation_image.v1.measurements }
output "v2" { value = constellation_image.v2.measurements }
"#;

/// The node's status report of its current boot says it is part of the cluster.
fn reports_joined(root: &Path, node: &Node) -> bool {
    let Ok(bytes) = std::fs::read(
        root.join("nodes")
            .join(&node.name)
            .join("state/status.json"),
    ) else {
        return false;
    };
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    status["pid"].as_u64() == Some(u64::from(node.pid))
        && matches!(status["phase"].as_str(), Some("joined" | "initialized"))
}

fn accepts(node: &Node, port: u16) -> bool {
    let addr = std::net::SocketAddr::new(node.ip.parse().expect("node IP"), port);
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The longest join outage the rolling upgrade may cause: the old control plane goes only once
/// its replacement serves its own key service (master material from its join ticket) and its
/// join service, so no probe round should find neither; one round of slack (~60 ms, more on a
/// loaded machine) for a probe that times out while a process is being stopped.
const MAX_JOIN_OUTAGE: Duration = Duration::from_millis(200);

/// What the verification loop saw.
#[derive(Debug, Default)]
struct Watch {
    /// Nodes that reported joined and failed attestation while still running.
    unattested: Vec<String>,
    /// Nodes seen joined and attested.
    attested: BTreeSet<String>,
    longest_outage: Duration,
    /// Every outage: when it began (since the loop started), how long, and what was missing.
    outages: Vec<(Duration, Duration, &'static str)>,
    rounds: u32,
}

/// Runs until `stop`: every round, every node that reports it joined must attest under one of
/// `measurement_files` with PCR 15 = `cluster_id`; joins count as possible while some control
/// plane accepts on its join port and some control plane on its key-service port.
fn watch(
    root: PathBuf,
    scratch: PathBuf,
    measurement_files: Vec<PathBuf>,
    cluster_id: String,
    stop: Arc<AtomicBool>,
) -> Watch {
    let mut seen = Watch::default();
    let mut outage_since: Option<(Instant, &'static str)> = None;
    let began = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        seen.rounds += 1;
        let Ok(bytes) = std::fs::read(root.join("platform.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let Ok(all): Result<Vec<Node>, _> = serde_json::from_value(state["nodes"].clone()) else {
            continue;
        };
        let control_planes: Vec<&Node> = all.iter().filter(|n| n.role == "control-plane").collect();
        let join = control_planes.iter().any(|n| accepts(n, ports::JOIN));
        let keys = control_planes
            .iter()
            .any(|n| accepts(n, ports::KEY_SERVICE));
        let missing = match (join, keys) {
            (true, true) => None,
            (false, true) => Some("no join service"),
            (true, false) => Some("no key service"),
            (false, false) => Some("neither"),
        };
        match (missing, outage_since) {
            (Some(what), None) => outage_since = Some((Instant::now(), what)),
            (None, Some((since, what))) => {
                seen.longest_outage = seen.longest_outage.max(since.elapsed());
                seen.outages.push((since - began, since.elapsed(), what));
                outage_since = None;
            }
            _ => {}
        }
        for node in all.iter().filter(|n| reports_joined(&root, n)) {
            let answers: Vec<(bool, String)> = measurement_files
                .iter()
                .map(|m| verify_node(&scratch, node, m, &cluster_id))
                .collect();
            if answers.iter().any(|(ok, _)| *ok) {
                seen.attested.insert(node.name.clone());
                continue;
            }
            // A node being stopped (replaced, or restarted for Recover) stops answering; one
            // that answers with evidence no accepted set matches is what must never happen.
            let rejected = answers.iter().all(|(_, text)| {
                serde_json::from_str::<serde_json::Value>(text)
                    .is_ok_and(|v| v["failed_check"]["name"] == "attestation")
            });
            let still_running = processes_mentioning(&format!("nodes/{} ", node.name))
                .iter()
                .any(|(pid, _)| *pid == node.pid);
            if rejected && still_running && reports_joined(&root, node) {
                seen.unattested
                    .push(format!("{}: {}", node.name, answers[0].1));
            }
        }
    }
    if let Some((since, what)) = outage_since {
        seen.longest_outage = seen.longest_outage.max(since.elapsed());
        seen.outages.push((since - began, since.elapsed(), what));
    }
    seen
}

/// Each node's state-disk UUID.
fn disk_uuids(root: &Path) -> Vec<(String, String)> {
    nodes(root)
        .into_iter()
        .map(|n| {
            let disk = root.join("nodes").join(&n.name).join("state/disk.img");
            let uuid = constellation_bootstrapper::statedisk::uuid(&disk)
                .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
            (n.name, uuid.to_string())
        })
        .collect()
}

/// Every node's state disk opens with HKDF(master secret, salt, "key-" + its UUID).
fn assert_disks_open_with_their_keys(tf: &Terraform, root: &Path) {
    let state = cluster_in_state(tf).expect("the cluster is in state");
    let secret = |k: &str| hex::decode(state[k].as_str().expect(k)).expect("hex");
    let (master, salt) = (secret("master_secret"), secret("master_secret_salt"));
    for (name, uuid) in disk_uuids(root) {
        let key = constellation_common::kdf::derive_key(
            &master,
            &salt,
            &uuid,
            constellation_common::kdf::DEFAULT_KEY_LEN,
        )
        .unwrap();
        let disk = root.join("nodes").join(&name).join("state/disk.img");
        constellation_bootstrapper::statedisk::verify_key(&disk, key.expose())
            .unwrap_or_else(|e| panic!("node {name}: its disk does not open with its key: {e}"));
    }
}

fn image_of(root: &Path, name: &str) -> PathBuf {
    nodes(root)
        .into_iter()
        .find(|n| n.name == name)
        .map(|n| n.image_dir)
        .unwrap_or_default()
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

fn run(version: TfVersion) {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    let v2 = modified_binary(&tf.scratch(), &boot, "v2");
    let bad = modified_binary(&tf.scratch(), &boot, "bad");
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        config()
            .replace("BOOT_V1", &boot.display().to_string())
            .replace("BOOT_V2", &v2.display().to_string())
            .replace("BOOT_BAD", &bad.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    let root = tf.work_dir().join(".constellation/clusters/day2");
    let marker = root.display().to_string();
    let _guard = Cleanup(&tf, &marker);

    tf.apply(&[]).ok();
    let cluster_id = tf
        .output("cluster_id")
        .as_str()
        .expect("cluster_id")
        .to_owned();
    assert_all_verified(&tf, &root, &cluster_id, 3);
    let v1_image = image_of(&root, &nodes(&root)[0].name);
    let measurement_files: Vec<PathBuf> = ["v1", "v2"]
        .iter()
        .map(|v| {
            let path = tf.scratch().join(format!("{v}.measurements.json"));
            write_measurements(&tf.output(v), &path);
            path
        })
        .collect();

    // 1. Rolling upgrade v1 -> v2 under the verification loop. The plan names the nodes it
    //    replaces, workers first.
    let before: BTreeSet<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    let plan = tf.plan(&["-var", "image=v2"]);
    assert_eq!(plan.code, 2, "{plan}");
    let text = plan.all();
    assert!(text.contains("Rolling image upgrade"), "{plan}");
    for name in &before {
        assert!(
            text.contains(name.as_str()),
            "the plan names {name}:\n{plan}"
        );
    }
    let first_cp = text
        .find("day2-control-plane-0")
        .expect("control plane named");
    assert!(
        before
            .iter()
            .filter(|n| n.contains("worker"))
            .all(|w| text.find(w.as_str()).is_some_and(|i| i < first_cp)),
        "workers are replaced first:\n{plan}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (root, scratch, files, id, stop) = (
            root.clone(),
            tf.scratch(),
            measurement_files.clone(),
            cluster_id.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || watch(root, scratch, files, id, stop))
    };
    let upgrade = tf.apply(&["-var", "image=v2"]);
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("verification loop");
    let upgrade = ok_or_node_logs(upgrade, &root);
    let after: BTreeSet<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    assert!(
        before.is_disjoint(&after),
        "every node is replaced: before {before:?}, after {after:?}"
    );
    assert_eq!(after.len(), 3);
    for name in &after {
        assert_ne!(image_of(&root, name), v1_image, "{name} runs the new image");
    }
    assert!(
        seen.unattested.is_empty(),
        "{version:?}: nodes reported joined without attesting: {:?}",
        seen.unattested
    );
    assert!(seen.rounds > 1 && !seen.attested.is_empty(), "{seen:?}");
    eprintln!(
        "{version:?}: rolling upgrade of 3 nodes took {:?} ({:.2} s per replaced node); longest \
         join outage {:?}; verification rounds {}",
        upgrade.elapsed,
        upgrade.elapsed.as_secs_f64() / 3.0,
        seen.longest_outage,
        seen.rounds
    );
    eprintln!(
        "{version:?}: outages (began after, lasted, missing): {:?}",
        seen.outages
    );
    for line in upgrade.stdout.lines().chain(upgrade.stderr.lines()) {
        if line.contains("replac") || line.contains("key service") || line.contains("recover") {
            eprintln!("{version:?}: apply: {line}");
        }
    }
    // The replacement control plane received the master material in its join ticket and
    // serves its own key service: no Recover (no restart) was needed.
    for cp in nodes(&root).iter().filter(|n| n.role == "control-plane") {
        let dir = root.join("nodes").join(&cp.name);
        assert!(
            dir.join("state/keyservice/cluster-master-secret.json")
                .exists(),
            "{} holds the master material",
            cp.name
        );
        let log = std::fs::read_to_string(dir.join("bootstrapper.log")).unwrap_or_default();
        assert!(
            !log.contains("recovered master secret"),
            "{} was recovered, not serving keys from its join ticket:\n{log}",
            cp.name
        );
        assert!(accepts(cp, ports::KEY_SERVICE), "{} serves keys", cp.name);
    }
    let control_plane_logs = || {
        let mut text = String::new();
        for cp in nodes(&root).iter().filter(|n| n.role == "control-plane") {
            let dir = root.join("nodes").join(&cp.name);
            for log in ["bootstrapper.log", "daemons/joinservice.log"] {
                let content = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
                text.push_str(&format!("--- {} {log}:\n", cp.name));
                for line in content
                    .lines()
                    .filter(|l| !l.contains("aTLS connection refused"))
                {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    };
    assert!(
        seen.longest_outage <= MAX_JOIN_OUTAGE,
        "{version:?}: joins were impossible for {:?} (outages {:?})\n{}",
        seen.longest_outage,
        seen.outages,
        control_plane_logs()
    );
    assert_eq!(tf.plan(&["-var", "image=v2"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 3);
    let j = journal(&root).expect("journal");
    assert!(j.get("upgrade").is_none(), "the upgrade is finished: {j}");

    // 2. Back to v1, the provider killed once the first replacement joined.
    let secrets_before = journal(&root).expect("journal")["master_secret"].clone();
    let mut apply = tf.spawn(&[
        "apply",
        "-auto-approve",
        "-no-color",
        "-input=false",
        "-var",
        "image=v1",
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let in_step = |root: &Path| {
        journal(root).is_some_and(|j| {
            j["upgrade"]["steps"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["phase"] == "joined" || s["phase"] == "done")
            })
        })
    };
    while !in_step(&root) {
        assert!(
            apply.running() && Instant::now() < deadline,
            "{version:?}: apply ended before the kill point:\n{}",
            apply.wait()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Only the provider dies: Terraform records the failed apply (the state keeps v2).
    for pid in apply.provider_pids() {
        kill(pid);
    }
    let killed = apply.wait();
    assert_ne!(
        killed.code, 0,
        "{version:?}: the killed apply failed:\n{killed}"
    );
    let mixed: BTreeSet<PathBuf> = nodes(&root).into_iter().map(|n| n.image_dir).collect();
    assert_eq!(mixed.len(), 2, "killed mid-upgrade: both images run");
    let resumed = ok_or_node_logs(tf.apply(&["-var", "image=v1"]), &root);
    eprintln!(
        "{version:?}: the apply after the kill finished the upgrade in {:?}",
        resumed.elapsed
    );
    for n in nodes(&root) {
        assert_eq!(n.image_dir, v1_image, "{} runs v1 again", n.name);
    }
    assert_eq!(tf.output("cluster_id").as_str(), Some(cluster_id.as_str()));
    assert_eq!(
        journal(&root).expect("journal")["master_secret"],
        secrets_before
    );
    assert_eq!(tf.plan(&["-var", "image=v1"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 3);
    assert_disks_open_with_their_keys(&tf, &root);

    // 3. A replacement that does not attest stops the upgrade, naming the PCR.
    let serving: BTreeSet<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    let refused = tf.apply(&["-var", "image=bad"]);
    assert_ne!(
        refused.code, 0,
        "the bad image must not be admitted:\n{refused}"
    );
    assert!(
        refused.all().contains("PCR[4]: expected"),
        "the error names the PCR:\n{refused}"
    );
    let still: BTreeSet<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    assert_eq!(
        still, serving,
        "the old nodes keep serving, the replacement is gone"
    );
    // The failed apply evaluated the outputs with image=bad: only they may change.
    let plan = tf.plan(&["-var", "image=v1"]);
    assert!(
        plan.code == 0
            || (plan.stdout.contains("Changes to Outputs")
                && !plan.stdout.contains("constellation_cluster.c will be")
                && !plan.stdout.contains("constellation_cluster.c must be")),
        "the old image applies with no change to the cluster:\n{plan}"
    );
    tf.apply(&["-var", "image=v1"]).ok();
    assert_all_verified(&tf, &root, &cluster_id, 3);

    // 4. Loss of a control plane: three control planes (etcd keeps its quorum after losing one
    //    of three; a two-member etcd that lost one has none), the first one's processes and
    //    folder go.
    ok_or_node_logs(tf.apply(&["-var", "control_planes=3"]), &root);
    assert_all_verified(&tf, &root, &cluster_id, 5);
    let lost = nodes(&root)
        .into_iter()
        .find(|n| n.role == "control-plane")
        .expect("a control plane");
    for (pid, _) in processes_mentioning(&format!("{marker}/nodes/{}", lost.name)) {
        kill(pid);
    }
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_dir_all(root.join("nodes").join(&lost.name)).unwrap();
    let plan = tf.plan(&["-var", "control_planes=3"]);
    assert_eq!(plan.code, 2, "a lost control plane is drift:\n{plan}");
    let repaired = ok_or_node_logs(tf.apply(&["-var", "control_planes=3"]), &root);
    eprintln!(
        "{version:?}: replacing a lost control plane took {:?}",
        repaired.elapsed
    );
    let cps: Vec<String> = nodes(&root)
        .into_iter()
        .filter(|n| n.role == "control-plane")
        .map(|n| n.name)
        .collect();
    assert_eq!(cps.len(), 3, "{cps:?}");
    assert!(!cps.contains(&lost.name));
    let plan = tf.plan(&["-var", "control_planes=3"]);
    assert_eq!(
        plan.code, 0,
        "the repaired cluster matches its configuration:\n{plan}"
    );
    assert_all_verified(&tf, &root, &cluster_id, 5);

    // 5. Full restart: every process of the cluster dies; apply recovers it.
    let disks = disk_uuids(&root);
    for (pid, _) in processes_mentioning(&marker) {
        kill(pid);
    }
    std::thread::sleep(Duration::from_millis(200));
    let plan = tf.plan(&["-var", "control_planes=3"]);
    assert_eq!(plan.code, 2, "a stopped cluster is drift:\n{plan}");
    let recovered = ok_or_node_logs(tf.apply(&["-var", "control_planes=3"]), &root);
    eprintln!(
        "{version:?}: recovering 3 control planes and 2 workers took {:?}",
        recovered.elapsed
    );
    assert_eq!(disk_uuids(&root), disks, "every node kept its disk");
    assert_all_verified(&tf, &root, &cluster_id, 5);
    assert_disks_open_with_their_keys(&tf, &root);
    for cp in nodes(&root)
        .into_iter()
        .filter(|n| n.role == "control-plane")
    {
        let log =
            std::fs::read_to_string(root.join("nodes").join(&cp.name).join("bootstrapper.log"))
                .unwrap_or_default();
        assert!(
            log.contains("recovered cluster") || log.contains("joined the cluster"),
            "{}: neither recovered nor rejoined:\n{log}",
            cp.name
        );
    }
    assert_eq!(tf.plan(&["-var", "control_planes=3"]).code, 0);
    assert!(accepts(&nodes(&root)[0], ports::VERIFY));
}

#[test]
fn day2_terraform_1_15() {
    run(TfVersion::V1_15);
}

#[test]
fn day2_terraform_1_0() {
    run(TfVersion::V1_0);
}
