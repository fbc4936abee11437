//! A real local cluster through Terraform (1.0.3 and 1.15.5): one control plane and two
//! workers, each a `constellation-bootstrapper` process with its own swtpm. Apply must attest
//! and initialize the cluster; afterwards every node is checked independently with
//! `attest verify cluster` (fresh evidence, pinned AK, image measurements, PCR 15 = cluster
//! ID); a crashed worker shows up as drift and apply repairs it; scaling workers out and in
//! works; a node booted from a modified binary is refused admission with an error naming
//! PCR[4] and the cluster stays as it was; `terraform import` from the URI gives a state with
//! no diff; destroy leaves no process, folder or port; a provider killed during apply (while
//! nodes boot, and after Init) is resumed by the next apply with the journal's secrets and
//! without a second Init.
//!
//! Needs `make build` (provider, bootstrapper and `attest` in target/debug), swtpm and openssl.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use acceptance_tests::cluster_harness::{
    assert_all_verified, cluster_in_state, journal, nodes, processes_mentioning, sibling_binary,
    tampered_binary, Cleanup, Node, PlatformJson, ONE_CLUSTER_AT_A_TIME,
};
use acceptance_tests::{hcl, Terraform, TfVersion, REQUIRED_PROVIDERS};
use constellation_common::metadata::ports;

/// One control plane and `var.workers` workers of this build's image.
fn config() -> String {
    let mut cluster = hcl::Cluster::of_image("acc", "local", "img")
        .with(&["kubeconfig_path = \"${path.module}/kubeconfig\""]);
    cluster.worker_count = "var.workers".into();
    format!(
        "{}{}{}{OUTPUTS}",
        hcl::variable("workers", "number", "2"),
        hcl::image("img", "local", "v0.1.0", "BOOT"),
        cluster.hcl()
    )
}

const OUTPUTS: &str = r#"output "cluster_id" { value = constellation_cluster.c.cluster_id }
output "measurements" { value = constellation_image.img.measurements }
"#;

fn run(version: TfVersion) {
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let boot = sibling_binary("constellation-bootstrapper");
    let tf = Terraform::new(version).unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{REQUIRED_PROVIDERS}{}",
        config().replace("BOOT", &boot.display().to_string())
    );
    tf.write_config(&config).unwrap();
    tf.init().ok();
    let root = tf.work_dir().join(".constellation/clusters/acc");
    let marker = root.display().to_string();

    let _guard = Cleanup(&tf, &marker);
    let apply = tf.apply(&[]).ok();
    eprintln!(
        "{version:?}: apply (1 control plane + 2 workers) took {:?}",
        apply.elapsed
    );
    let cluster_id = tf.output("cluster_id");
    let cluster_id = cluster_id
        .as_str()
        .expect("cluster_id is a string")
        .to_owned();
    assert_eq!(cluster_id.len(), 64, "{cluster_id}");
    assert!(
        cluster_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{cluster_id}"
    );
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after apply must show no changes"
    );
    assert_all_verified(&tf, &root, &cluster_id, 3);

    // A worker's process dies: refresh sees it, apply reboots it and it rejoins.
    let worker = nodes(&root)
        .into_iter()
        .find(|n| n.role == "worker")
        .expect("a worker node");
    let pid = worker.pid;
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let plan = tf.plan(&[]);
    assert_eq!(plan.code, 2, "a dead worker must show as drift:\n{plan}");
    let repair = tf.apply(&[]).ok();
    eprintln!("{version:?}: repair apply took {:?}", repair.elapsed);
    assert_eq!(
        tf.plan(&[]).code,
        0,
        "plan after repair must show no changes"
    );
    assert_all_verified(&tf, &root, &cluster_id, 3);

    // Scale out to 3 workers, then in to 1 (the highest-index workers go).
    let scale = tf.apply(&["-var", "workers=3"]).ok();
    eprintln!("{version:?}: scale 2 -> 3 workers took {:?}", scale.elapsed);
    assert_eq!(tf.plan(&["-var", "workers=3"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 4);
    let before: Vec<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    tf.apply(&["-var", "workers=1"]).ok();
    assert_eq!(tf.plan(&["-var", "workers=1"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 2);
    let after: Vec<String> = nodes(&root).into_iter().map(|n| n.name).collect();
    let removed: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
    assert_eq!(removed.len(), 2, "before {before:?}, after {after:?}");
    for name in removed {
        let left = processes_mentioning(&format!("{marker}/nodes/{name}"));
        assert!(
            left.is_empty(),
            "removed node {name} left processes: {left:?}"
        );
    }

    // A new node booted from a modified binary, while the cluster's measurements stay the
    // genuine ones: it is refused admission, the error names the PCR, nothing else changes.
    let tampered = tampered_binary(&tf.scratch(), &boot);
    let bad_config = format!(
        "{config}{}",
        BAD_IMAGE.replace("BADBOOT", &tampered.display().to_string())
    )
    .replace(
        "reference    = constellation_image.img.reference",
        "reference    = constellation_image.bad.reference",
    );
    tf.write_config(&bad_config).unwrap();
    let refused = tf.apply(&["-var", "workers=2"]);
    assert_ne!(
        refused.code, 0,
        "a tampered node must not be admitted:\n{refused}"
    );
    let text = refused.all();
    assert!(text.contains("refused admission"), "{refused}");
    assert!(
        text.contains("PCR[4]: expected"),
        "the error names the PCR that differed:\n{refused}"
    );
    assert_eq!(nodes(&root).len(), 2, "the refused node is removed again");
    assert_all_verified(&tf, &root, &cluster_id, 2);
    tf.write_config(&config).unwrap();
    tf.apply(&["-var", "workers=1"]).ok();
    assert_eq!(tf.plan(&["-var", "workers=1"]).code, 0);
    assert_all_verified(&tf, &root, &cluster_id, 2);

    // Import from the URI rebuilds a state with no diff.
    tf.state_rm("constellation_cluster.c").ok();
    let uri = format!(
        "constellation-cluster://?platform=local&name=acc&cluster_dir={}&kubeconfig_path=./kubeconfig",
        root.display()
    );
    tf.import("constellation_cluster.c", &uri, &["-var", "workers=1"])
        .ok();
    let plan = tf.plan(&["-var", "workers=1"]);
    if plan.code == 2 {
        // Terraform 1.0 drops the outputs with `state rm` and counts restoring them as a
        // change; the resource itself must still have no diff.
        assert!(
            plan.stdout.contains("Changes to Outputs")
                && !plan.stdout.contains("constellation_cluster.c will be")
                && !plan.stdout.contains("constellation_cluster.c must be"),
            "plan after import must show no resource changes:\n{plan}"
        );
        tf.apply(&["-refresh-only", "-var", "workers=1"]).ok();
    } else {
        assert_eq!(plan.code, 0, "plan after import:\n{plan}");
    }
    let plan = tf.plan(&["-var", "workers=1"]);
    assert_eq!(
        plan.code, 0,
        "plan after import must show no changes:\n{plan}"
    );
    assert_eq!(tf.output("cluster_id").as_str(), Some(cluster_id.as_str()));

    destroy_and_check(&tf, &root);

    // The provider is killed during apply, twice: while the nodes boot (resume must Init),
    // and after Init (resume must not Init again).
    kill_during_apply(&tf, &root, "nodes booting", |root| {
        nodes_of(root).is_some_and(|n| n.iter().any(|n| n.pid != 0))
    });
    kill_during_apply(&tf, &root, "after Init", |root| {
        journal(root).is_some_and(|j| j["outputs"].is_object())
    });
}

/// Destroys the cluster; no process, folder or port of it may be left.
fn destroy_and_check(tf: &Terraform, root: &Path) {
    let marker = root.display().to_string();
    let ports = ports_of(root);
    assert!(!ports.is_empty());
    let sockets = tpm_sockets_of(root);
    assert!(!sockets.is_empty());
    let destroy = tf.destroy(&[]).ok();
    eprintln!("{:?}: destroy took {:?}", tf.version, destroy.elapsed);
    assert!(!root.exists(), "destroy must remove {marker}");
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left after destroy: {left:?}");
    assert_ports_free(&ports);
    for socket in sockets {
        assert!(!socket.exists(), "TPM socket {} left", socket.display());
    }
}

/// Runs `terraform apply`, kills the provider (SIGKILL) and Terraform once `ready` holds for
/// the cluster folder, then applies again: the cluster converges with the journal's secrets,
/// Init was served once, every node verifies.
fn kill_during_apply(tf: &Terraform, root: &Path, when: &str, ready: impl Fn(&Path) -> bool) {
    let version = tf.version;
    let mut apply = tf.spawn(&["apply", "-auto-approve", "-no-color", "-input=false"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready(root) {
        assert!(
            apply.running() && Instant::now() < deadline,
            "{version:?}: apply ended before the kill point ({when}):\n{}",
            apply.wait()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let providers = apply.provider_pids();
    assert!(
        !providers.is_empty(),
        "{version:?}: no provider process found"
    );
    for pid in providers {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    apply.kill();
    let killed = apply.wait();
    eprintln!(
        "{version:?}: killed the provider during apply ({when}) after {:?}",
        killed.elapsed
    );
    assert!(
        cluster_in_state(tf).is_none(),
        "{version:?}: Terraform recorded the cluster before the kill ({when}); the test lost \
         its race:\n{killed}"
    );
    let before = journal(root).expect("the journal exists after the kill");

    let resumed = tf.apply(&[]).ok();
    eprintln!(
        "{version:?}: resuming apply ({when}) took {:?}",
        resumed.elapsed
    );
    let after = journal(root).expect("journal");
    assert_eq!(before["master_secret"], after["master_secret"], "keys kept");
    assert_eq!(before["init_secret"], after["init_secret"], "keys kept");
    let state = cluster_in_state(tf).expect("the cluster is in state now");
    for secret in ["master_secret", "master_secret_salt", "measurement_salt"] {
        assert_eq!(
            state[secret], after[secret],
            "{secret} in state = journal's"
        );
    }
    if before["outputs"].is_object() {
        assert_eq!(
            before["outputs"]["cluster_id"],
            after["outputs"]["cluster_id"]
        );
    }
    let cluster_id = tf.output("cluster_id");
    let cluster_id = cluster_id.as_str().expect("cluster_id");
    assert_eq!(Some(cluster_id), after["outputs"]["cluster_id"].as_str());
    let derived = {
        let secret = |k: &str| hex::decode(after[k].as_str().expect(k)).expect("hex");
        let measurement = constellation_common::kdf::measurement_secret(
            &secret("master_secret"),
            &secret("master_secret_salt"),
        );
        hex::encode(constellation_common::kdf::cluster_id(
            measurement.expose(),
            &secret("measurement_salt"),
        ))
    };
    assert_eq!(
        cluster_id, derived,
        "cluster ID derives from the journal's secrets"
    );
    assert_eq!(tf.plan(&[]).code, 0, "plan after the resumed apply");
    assert_all_verified(tf, root, cluster_id, 3);
    let cp = nodes(root)
        .into_iter()
        .find(|n| n.role == "control-plane")
        .expect("a control plane");
    let log = std::fs::read_to_string(root.join("nodes").join(&cp.name).join("bootstrapper.log"))
        .expect("control-plane log");
    assert_eq!(
        log.matches("initializing cluster").count(),
        1,
        "Init is served exactly once ({when}):\n{log}"
    );
    destroy_and_check(tf, root);
}

/// Every node's TPM sockets (data, control): swtpm listens on no TCP port.
fn tpm_sockets_of(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for n in nodes(root) {
        if let Some(t) = n.swtpm {
            let mut ctrl = t.socket.clone().into_os_string();
            ctrl.push(".ctrl");
            out.extend([t.socket, PathBuf::from(ctrl)]);
        }
    }
    out
}

/// Every port the cluster's nodes hold: the node ports on each node's address.
fn ports_of(root: &Path) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for n in nodes(root) {
        let ip: IpAddr = n.ip.parse().expect("node IP");
        for port in [
            ports::BOOTSTRAPPER,
            ports::KEY_SERVICE,
            ports::VERIFY,
            ports::JOIN,
        ] {
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

fn assert_ports_free(ports: &[SocketAddr]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    for addr in ports {
        while let Err(e) = TcpListener::bind(addr) {
            assert!(
                Instant::now() < deadline,
                "port {addr} is still taken after destroy: {e}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn nodes_of(root: &Path) -> Option<Vec<Node>> {
    let bytes = std::fs::read(root.join("platform.json")).ok()?;
    serde_json::from_slice::<PlatformJson>(&bytes)
        .ok()
        .map(|s| s.nodes)
}

/// A second image from the tampered binary (its own folder: another version).
const BAD_IMAGE: &str = r#"
resource "constellation_image" "bad" {
  platform          = "local"
  version           = "v0.1.0-tampered"
  bootstrapper_path = "BADBOOT"
}
"#;

#[test]
fn local_cluster_terraform_1_15() {
    run(TfVersion::V1_15);
}

#[test]
fn local_cluster_terraform_1_0() {
    run(TfVersion::V1_0);
}
