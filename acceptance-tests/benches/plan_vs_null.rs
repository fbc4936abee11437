//! No-op `terraform plan` on a live local cluster (1 control plane + 2 workers, the shape of
//! examples/local) versus the same plan shape (2 resources) with HashiCorp's `null` provider,
//! on the same Terraform, alternating in one run. Goal (issue 6): ours / null ≤ 1.1×.
//!
//! Needs `make install` (Terraform 1.0.3 and 1.15.5, the null provider mirror in tools/) and
//! the debug binaries (`cargo build -p terraform-provider-constellation -p
//! constellation-bootstrapper`). Environment: `PLAN_VS_NULL_RUNS` (default 10) plans per side,
//! `PLAN_VS_NULL_VERSIONS` (`1.15`, `1.0` or `both`, default `both`).
//! The cluster is destroyed at the end, also when a step fails (Drop guard).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use acceptance_tests::{provider_binary, workspace_root, Terraform, TfRun, TfVersion};

const NULL_VERSION: &str = "2.1.2";
const NULL_BINARY: &str = "terraform-provider-null_v2.1.2_x4";

/// The cluster resource name in examples/local/main.tf (its folder under .constellation).
const CLUSTER_NAME: &str = "local-demo";

/// Two resources, the second depending on the first, with a handful of attributes each.
const NULL_CONFIG: &str = r#"
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "2.1.2" }
  }
}
resource "null_resource" "image" {
  triggers = {
    platform = "local"
    version  = "v0.1.0"
  }
}
resource "null_resource" "cluster" {
  triggers = {
    name                = "NAME"
    image               = null_resource.image.id
    control_plane_count = 1
    worker_count        = 2
    kubernetes_version  = "v1.31.1"
    variant             = "qemu-vtpm"
    pod_cidr            = "10.244.0.0/16"
    service_cidr        = "10.96.0.0/12"
    node_cidr           = "192.168.178.0/24"
  }
}
output "cluster_id" { value = null_resource.cluster.id }
"#;

fn null_provider() -> PathBuf {
    workspace_root()
        .join("tools/null-mirror/registry.terraform.io/hashicorp/null")
        .join(NULL_VERSION)
        .join("linux_amd64")
        .join(NULL_BINARY)
}

/// The debug binaries and tools the bench needs, or what to run to get them.
fn preflight() -> Result<PathBuf, String> {
    let provider = provider_binary().map_err(|e| e.to_string())?;
    let boot = provider.with_file_name("constellation-bootstrapper");
    if !boot.is_file() {
        return Err(format!(
            "{} not found: run `cargo build -p constellation-bootstrapper` (or `make build`) first",
            boot.display()
        ));
    }
    let null = null_provider();
    if !null.is_file() {
        return Err(format!(
            "null provider not found at {}: run `make install`",
            null.display()
        ));
    }
    for v in versions() {
        acceptance_tests::terraform_binary(v).map_err(|e| e.to_string())?;
    }
    Ok(boot)
}

fn versions() -> Vec<TfVersion> {
    match std::env::var("PLAN_VS_NULL_VERSIONS").as_deref() {
        Ok("1.15") => vec![TfVersion::V1_15],
        Ok("1.0") => vec![TfVersion::V1_0],
        _ => vec![TfVersion::V1_15, TfVersion::V1_0],
    }
}

fn runs() -> usize {
    std::env::var("PLAN_VS_NULL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(10)
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// Destroys the cluster when dropped (also on panic), then kills any node process left.
struct ClusterGuard {
    tf: Terraform,
    root: String,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let destroy = self.tf.destroy(&[]);
        if destroy.code != 0 {
            eprintln!("plan_vs_null: destroy failed:\n{destroy}");
        }
        for pid in processes_mentioning(&self.root) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn must(run: TfRun, what: &str) -> Result<TfRun, String> {
    if run.code == 0 {
        Ok(run)
    } else {
        Err(format!("{what} failed:\n{run}"))
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn bench(version: TfVersion, boot: &Path, n: usize) -> Result<f64, String> {
    // Ours: a live cluster.
    let tf = Terraform::new(version).map_err(|e| e.to_string())?;
    // Exactly the demo's configuration (it declares its own required_providers).
    let example = workspace_root().join("examples/local/main.tf");
    let config = std::fs::read_to_string(&example)
        .map_err(|e| format!("read {}: {e}", example.display()))?;
    let tf = tf.env("CONSTELLATION_BOOTSTRAPPER", boot.display().to_string());
    tf.write_config(&config).map_err(|e| e.to_string())?;
    must(tf.init(), "init (constellation)")?;
    let root = tf
        .work_dir()
        .join(".constellation/clusters")
        .join(CLUSTER_NAME)
        .display()
        .to_string();
    let ours = ClusterGuard { tf, root };
    let apply = must(ours.tf.apply(&[]), "apply (1 control plane + 2 workers)")?;
    eprintln!(
        "plan_vs_null {version:?}: cluster up (apply {})",
        ms(apply.elapsed)
    );

    // Null: the same plan shape.
    let null = Terraform::new(version).map_err(|e| e.to_string())?;
    let dir = null
        .scratch()
        .join("mirror/registry.terraform.io/hashicorp/null")
        .join(NULL_VERSION)
        .join("linux_amd64");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    std::fs::copy(null_provider(), dir.join(NULL_BINARY))
        .map_err(|e| format!("copy null provider: {e}"))?;
    null.write_config(&NULL_CONFIG.replace("NAME", CLUSTER_NAME))
        .map_err(|e| e.to_string())?;
    must(null.init(), "init (null)")?;
    must(null.apply(&[]), "apply (null)")?;

    // One warm-up plan each (page cache, first plugin start), then alternate.
    let plan = |tf: &Terraform, what: &str| -> Result<Duration, String> {
        let run = tf.plan(&["-refresh=true"]);
        if run.code == 0 {
            Ok(run.elapsed)
        } else {
            Err(format!("{what}: no-op plan expected (exit 0):\n{run}"))
        }
    };
    plan(&ours.tf, "constellation")?;
    plan(&null, "null")?;
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        // Alternate which side goes first, so drift in machine load hits both equally.
        if i % 2 == 0 {
            a.push(plan(&ours.tf, "constellation")?);
            b.push(plan(&null, "null")?);
        } else {
            b.push(plan(&null, "null")?);
            a.push(plan(&ours.tf, "constellation")?);
        }
    }
    let (min_a, max_a) = (a.iter().min().copied(), a.iter().max().copied());
    let (min_b, max_b) = (b.iter().min().copied(), b.iter().max().copied());
    let (ma, mb) = (median(&mut a), median(&mut b));
    let ratio = ma.as_secs_f64() / mb.as_secs_f64();
    let range = |lo: Option<Duration>, hi: Option<Duration>| {
        format!(
            "{}..{}",
            ms(lo.unwrap_or_default()),
            ms(hi.unwrap_or_default())
        )
    };
    println!(
        "plan_vs_null terraform {:<6} n={n}: constellation median {} ({}), null median {} ({}), ratio {ratio:.2}x (goal <= 1.10x){}",
        match version {
            TfVersion::V1_0 => "1.0.3",
            TfVersion::V1_15 => "1.15.5",
        },
        ms(ma),
        range(min_a, max_a),
        ms(mb),
        range(min_b, max_b),
        if ratio <= 1.1 { "" } else { "  ABOVE GOAL" },
    );
    must(null.destroy(&[]), "destroy (null)")?;
    drop(ours);
    Ok(ratio)
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a filter that does not name this bench skips it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"plan_vs_null".contains(a.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    let boot = match preflight() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("plan_vs_null: {e}");
            return ExitCode::FAILURE;
        }
    };
    let n = runs();
    let mut failed = false;
    for v in versions() {
        if let Err(e) = bench(v, &boot, n) {
            eprintln!("plan_vs_null {v:?}: {e}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
