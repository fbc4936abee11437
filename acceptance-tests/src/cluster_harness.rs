//! Helpers for tests that drive a real local cluster through Terraform: the binaries next to
//! the provider, the cluster folder's node records and journal, independent verification of
//! every node with `attest verify cluster`, and clean-up.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{provider_binary, Terraform};

/// A binary next to the provider in target/debug.
pub fn sibling_binary(name: &str) -> PathBuf {
    let provider = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let bin = provider.with_file_name(name);
    assert!(
        bin.is_file(),
        "{} not found: run `make build` first",
        bin.display()
    );
    bin
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// One node as `platform.json` in the cluster folder records it.
#[derive(Debug, serde::Deserialize)]
pub struct Node {
    pub name: String,
    pub role: String,
    pub ip: String,
    pub ak_spki_hex: String,
    pub pid: u32,
    pub swtpm: Option<SwtpmJson>,
    /// The image folder the node booted.
    pub image_dir: PathBuf,
}

#[derive(Debug, serde::Deserialize)]
pub struct SwtpmJson {
    pub socket: PathBuf,
}

#[derive(serde::Deserialize)]
pub struct PlatformJson {
    pub nodes: Vec<Node>,
}

pub fn nodes(root: &Path) -> Vec<Node> {
    let bytes = std::fs::read(root.join("platform.json")).expect("platform.json exists");
    let state: PlatformJson = serde_json::from_slice(&bytes).expect("platform.json parses");
    state.nodes
}

/// Writes measurements as Terraform outputs them (`warn_only`) into `path` in the form the
/// `attest` CLI reads (`warnOnly`).
pub fn write_measurements(measurements: &serde_json::Value, path: &Path) {
    let json: serde_json::Map<String, serde_json::Value> = measurements
        .as_object()
        .expect("measurements is a map")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!({
                    "expected": v["expected"],
                    "warnOnly": v["warn_only"],
                }),
            )
        })
        .collect();
    std::fs::write(path, serde_json::to_vec(&json).unwrap()).unwrap();
}

/// Runs `attest verify cluster` against one node (fresh evidence, its pinned AK, the
/// measurements in `measurements`, PCR 15 = `cluster_id`); the exit status and the output.
pub fn verify_node(
    scratch: &Path,
    node: &Node,
    measurements: &Path,
    cluster_id: &str,
) -> (bool, String) {
    let der = scratch.join(format!("{}.ak.der", node.name));
    let pem = scratch.join(format!("{}.ak.pem", node.name));
    std::fs::write(&der, hex::decode(&node.ak_spki_hex).expect("AK is hex")).unwrap();
    let conv = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&pem)
        .output()
        .expect("openssl must be installed");
    assert!(conv.status.success(), "openssl: {conv:?}");
    let out = Command::new(sibling_binary("attest"))
        .args([
            "verify",
            "cluster",
            "--endpoint",
            &format!("{}:30081", node.ip),
        ])
        .arg("--measurements")
        .arg(measurements)
        .arg("--ak-pub")
        .arg(&pem)
        .args(["--cluster-id", cluster_id])
        .output()
        .expect("run attest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `attest verify cluster` against every node with the `measurements` output; returns
/// each node's exit status.
pub fn verify_all(tf: &Terraform, root: &Path, cluster_id: &str) -> Vec<(String, bool, String)> {
    let measurements = tf.scratch().join("measurements.json");
    write_measurements(&tf.output("measurements"), &measurements);
    nodes(root)
        .into_iter()
        .map(|node| {
            let (ok, text) = verify_node(&tf.scratch(), &node, &measurements, cluster_id);
            (node.name, ok, text)
        })
        .collect()
}

pub fn assert_all_verified(tf: &Terraform, root: &Path, cluster_id: &str, expected_nodes: usize) {
    let results = verify_all(tf, root, cluster_id);
    assert_eq!(results.len(), expected_nodes, "{results:?}");
    for (name, ok, text) in &results {
        assert!(ok, "node {name} failed verification:\n{text}");
    }
}

/// One cluster at a time: two clusters booting at once on a small machine would make join
/// times (LUKS key slots, Argon2) a test of the machine rather than of the provider.
pub static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `journal.json` of the cluster folder, when it exists and parses.
pub fn journal(root: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(root.join("journal.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The cluster's attributes in `terraform.tfstate`, if Terraform recorded it.
pub fn cluster_in_state(tf: &Terraform) -> Option<serde_json::Value> {
    let bytes = std::fs::read(tf.work_dir().join("terraform.tfstate")).ok()?;
    let state: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    state["resources"]
        .as_array()?
        .iter()
        .find(|r| r["type"] == "constellation_cluster")?["instances"]
        .get(0)
        .map(|i| i["attributes"].clone())
}

/// A copy of the bootstrapper with bytes appended: it runs the same, but measures differently.
pub fn tampered_binary(dir: &Path, boot: &Path) -> PathBuf {
    modified_binary(dir, boot, "tampered")
}

/// A copy of the bootstrapper with `tag` appended, as `bootstrapper-<tag>` in `dir`: another
/// image version that runs the same code and measures differently (PCR 4). The service daemons
/// the bootstrapper supervises are linked next to it (an image takes them from there).
pub fn modified_binary(dir: &Path, boot: &Path, tag: &str) -> PathBuf {
    for name in constellation_image::DAEMON_FILES {
        let (source, link) = (boot.with_file_name(name), dir.join(name));
        if source.is_file() && !link.exists() {
            std::os::unix::fs::symlink(&source, &link).expect("link a daemon next to the copy");
        }
    }
    let mut binary = std::fs::read(boot).expect("read bootstrapper");
    binary.push(0);
    binary.extend_from_slice(tag.as_bytes());
    let path = dir.join(format!("bootstrapper-{tag}"));
    std::fs::write(&path, binary).expect("write modified binary");
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

/// Panics (failing the test) unless `run` succeeded, with the last lines of every node's
/// bootstrapper log and its daemons' logs under `root/nodes` (the cluster is torn down after
/// a failure, taking the logs with it).
pub fn ok_or_node_logs(run: crate::TfRun, root: &Path) -> crate::TfRun {
    if run.code == 0 {
        return run;
    }
    const TAIL: usize = 25;
    let mut logs = String::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for node in std::fs::read_dir(root.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        files.push(node.path().join("bootstrapper.log"));
        let daemons = std::fs::read_dir(node.path().join("daemons"))
            .into_iter()
            .flatten();
        files.extend(
            daemons
                .flatten()
                .map(|d| d.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log")),
        );
    }
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n");
        logs.push_str(&format!("\n==> {} <==\n{tail}\n", file.display()));
    }
    panic!("terraform {:?} failed:\n{run}\nnode logs:{logs}", run.args);
}

/// On a failed assertion, still tear the cluster down so no node process outlives the test.
pub struct Cleanup<'a>(pub &'a Terraform, pub &'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.destroy(&[]);
        for (pid, _) in processes_mentioning(self.1) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
