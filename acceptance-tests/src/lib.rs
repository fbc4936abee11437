//! Acceptance-test harness: runs a real Terraform (1.0.3 and 1.15.5) against the built
//! provider in a fresh working directory with an offline filesystem mirror.
//!
//! The provider binary is not built by `cargo test`; `make test` runs
//! `cargo build --workspace --all-targets` first. A missing binary or Terraform fails the
//! test with a message saying what to run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub mod cluster_harness;
pub mod hcl;
pub mod secret_leaks;

/// Provider address used by every test configuration.
pub const PROVIDER_SOURCE: &str = "edgelesssys/constellation";
pub const PROVIDER_VERSION: &str = "0.1.0";
pub const PROVIDER_BINARY: &str = "terraform-provider-constellation";

/// The `terraform { required_providers { ... } }` block for test configurations.
pub const REQUIRED_PROVIDERS: &str = r#"terraform {
  required_providers {
    constellation = { source = "edgelesssys/constellation", version = "0.1.0" }
  }
}
"#;

/// The two Terraform versions every provider test runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TfVersion {
    V1_0,
    V1_15,
}

impl TfVersion {
    fn env_var(self) -> &'static str {
        match self {
            TfVersion::V1_0 => "CONSTELLATION_TERRAFORM_1_0",
            TfVersion::V1_15 => "CONSTELLATION_TERRAFORM_1_15",
        }
    }
    fn tools_path(self) -> PathBuf {
        let sub = match self {
            TfVersion::V1_0 => "terraform-1.0.3",
            TfVersion::V1_15 => "terraform-1.15.5",
        };
        workspace_root().join("tools").join(sub).join("terraform")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("Terraform {version:?} not found at {path} (set {var} or run `make install`)")]
    TerraformMissing {
        version: TfVersion,
        path: PathBuf,
        var: &'static str,
    },
    #[error("provider binary not found at {0}: run `cargo build -p terraform-provider-constellation` (or `make build`) first")]
    ProviderMissing(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The repository root (this crate lives in `<root>/acceptance-tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$CARGO_TARGET_DIR/debug/terraform-provider-constellation`, else `<root>/target/debug/...`.
pub fn provider_binary() -> Result<PathBuf, HarnessError> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join(PROVIDER_BINARY);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(HarnessError::ProviderMissing(bin))
    }
}

/// The Terraform binary of `version`: `$CONSTELLATION_TERRAFORM_1_0/_1_15`, else `tools/`.
pub fn terraform_binary(version: TfVersion) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os(version.env_var())
        .map(PathBuf::from)
        .unwrap_or_else(|| version.tools_path());
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::TerraformMissing {
            version,
            path,
            var: version.env_var(),
        })
    }
}

/// What one Terraform command did.
#[derive(Debug, Clone)]
pub struct TfRun {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl TfRun {
    /// Panics (failing the test) with the full output unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "terraform {:?} failed:\n{self}", self.args);
        self
    }
    /// stdout and stderr together, whitespace runs collapsed to one space (Terraform wraps
    /// diagnostic text at its terminal width).
    pub fn all(&self) -> String {
        format!("{} {}", self.stdout, self.stderr)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl std::fmt::Display for TfRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// One Terraform working directory with its own provider mirror.
#[derive(Debug)]
pub struct Terraform {
    pub version: TfVersion,
    bin: PathBuf,
    root: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Terraform {
    /// A fresh directory `<tmp>/work` plus `<tmp>/mirror/registry.terraform.io/...` holding a
    /// copy of the built provider.
    pub fn new(version: TfVersion) -> Result<Self, HarnessError> {
        Self::with_provider(version, &provider_binary()?)
    }

    /// Like [`Terraform::new`] with another build of the provider, such as the FAKE-backend
    /// binary `terraform-provider-constellation-fake` of this crate (pass its
    /// `env!("CARGO_BIN_EXE_...")`).
    pub fn with_provider(version: TfVersion, provider: &Path) -> Result<Self, HarnessError> {
        let bin = terraform_binary(version)?;
        if !provider.is_file() {
            return Err(HarnessError::ProviderMissing(provider.to_owned()));
        }
        let root = tempfile::Builder::new()
            .prefix("tf-acc-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        let platform_dir = root
            .path()
            .join("mirror/registry.terraform.io")
            .join(PROVIDER_SOURCE)
            .join(PROVIDER_VERSION)
            .join("linux_amd64");
        std::fs::create_dir_all(&platform_dir).map_err(io("create mirror"))?;
        std::fs::create_dir_all(root.path().join("work")).map_err(io("create work dir"))?;
        std::fs::copy(
            provider,
            platform_dir.join(format!("{PROVIDER_BINARY}_v{PROVIDER_VERSION}")),
        )
        .map_err(io(format!("copy {}", provider.display())))?;
        Ok(Self {
            version,
            bin,
            root,
            env: Vec::new(),
        })
    }

    /// Adds an environment variable for every command (and so for the provider).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The Terraform working directory.
    pub fn work_dir(&self) -> PathBuf {
        self.root.path().join("work")
    }

    /// A scratch directory next to the working directory, for test files.
    pub fn scratch(&self) -> PathBuf {
        self.root.path().to_owned()
    }

    pub fn write_config(&self, main_tf: &str) -> Result<(), HarnessError> {
        std::fs::write(self.work_dir().join("main.tf"), main_tf).map_err(io("write main.tf"))
    }

    /// Runs `terraform <args>` in the working directory.
    pub fn run(&self, args: &[&str]) -> TfRun {
        self.spawn(args).wait()
    }

    /// Starts `terraform <args>` in the working directory without waiting for it.
    pub fn spawn(&self, args: &[&str]) -> TfChild {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(self.work_dir())
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_CLI_CONFIG_FILE", "/dev/null")
            .env("TF_IN_AUTOMATION", "1")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env_remove("TF_LOG")
            .env_remove("CONSTELLATION_BOOTSTRAPPER");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Output goes to files, not pipes: a plugin left behind by a crashed Terraform
        // keeps inherited pipes open, and waiting for their EOF would hang the test.
        let logs = self.root.path().join("logs");
        let _ = std::fs::create_dir_all(&logs);
        let (out_path, err_path) = (logs.join("stdout"), logs.join("stderr"));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let start = Instant::now();
        let child = std::fs::File::create(&out_path)
            .and_then(|o| Ok((o, std::fs::File::create(&err_path)?)))
            .and_then(|(o, e)| cmd.stdout(o).stderr(e).spawn())
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()));
        TfChild {
            args,
            child,
            start,
            out_path,
            err_path,
        }
    }

    pub fn init(&self) -> TfRun {
        let mirror = self.root.path().join("mirror");
        let flag = format!("-plugin-dir={}", mirror.display());
        self.run(&["init", "-no-color", "-input=false", &flag])
    }

    pub fn apply(&self, extra: &[&str]) -> TfRun {
        let mut args = vec!["apply", "-auto-approve", "-no-color", "-input=false"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `plan -detailed-exitcode`: 0 no changes, 1 error, 2 changes.
    pub fn plan(&self, extra: &[&str]) -> TfRun {
        let mut args = vec!["plan", "-detailed-exitcode", "-no-color", "-input=false"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn import(&self, address: &str, id: &str, extra: &[&str]) -> TfRun {
        let mut args = vec!["import", "-no-color", "-input=false"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[address, id]);
        self.run(&args)
    }

    pub fn destroy(&self, extra: &[&str]) -> TfRun {
        let mut args = vec!["destroy", "-auto-approve", "-no-color", "-input=false"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn state_rm(&self, address: &str) -> TfRun {
        self.run(&["state", "rm", "-no-color", address])
    }

    /// `terraform output -json`, parsed (sensitive outputs appear in plain text here).
    pub fn output_json(&self) -> serde_json::Value {
        let run = self.run(&["output", "-json", "-no-color"]).ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("output -json is not JSON ({e}):\n{run}"))
    }

    /// The value of one output from `terraform output -json`.
    pub fn output(&self, name: &str) -> serde_json::Value {
        self.output_json()
            .get(name)
            .and_then(|o| o.get("value"))
            .cloned()
            .unwrap_or_else(|| panic!("no output {name:?}"))
    }
}

/// A Terraform command started with [`Terraform::spawn`].
#[derive(Debug)]
pub struct TfChild {
    args: Vec<String>,
    child: Result<std::process::Child, String>,
    start: Instant,
    out_path: PathBuf,
    err_path: PathBuf,
}

impl TfChild {
    /// Terraform's pid (None if it could not be started).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().ok().map(std::process::Child::id)
    }

    /// True while Terraform runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_ok_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Pids of the provider processes this Terraform started (its descendants whose command
    /// line names the provider binary).
    pub fn provider_pids(&self) -> Vec<u32> {
        let Some(parent) = self.pid() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(PROVIDER_BINARY)
                    && descends_from(*pid, parent)
            })
            .collect()
    }

    /// SIGKILLs Terraform (it cannot clean anything up) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for Terraform to exit and collects what it printed.
    pub fn wait(mut self) -> TfRun {
        let status = match self.child.as_mut() {
            Ok(c) => c.wait().map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let elapsed = self.start.elapsed();
        let read =
            |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        match status {
            Ok(status) => TfRun {
                args: self.args,
                code: status.code().unwrap_or(-1),
                stdout: read(&self.out_path),
                stderr: read(&self.err_path),
                elapsed,
            },
            Err(e) => TfRun {
                args: self.args,
                code: -1,
                stdout: String::new(),
                stderr: e,
                elapsed,
            },
        }
    }
}

/// True if `ancestor` is `pid`'s parent, grandparent, ...
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..32 {
        match parent_of(p) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => p = parent,
            _ => return false,
        }
    }
    false
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": fields after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
