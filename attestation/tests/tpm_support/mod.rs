//! Shared helpers for the TPM integration tests: a private swtpm per test and tpm2-tools runs.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use constellation_attestation::tpm::Swtpm;
use tempfile::TempDir;

/// A swtpm of this test's own (state in a fresh temporary directory).
pub fn swtpm() -> (TempDir, Swtpm) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let tpm = Swtpm::start(dir.path()).unwrap_or_else(|e| {
        panic!("swtpm must be installed (apt-get install swtpm swtpm-tools): {e}")
    });
    (dir, tpm)
}

/// Runs a tpm2-tools command against `tcti` in `dir`; panics with its stderr unless it succeeds.
pub fn tpm2(tcti: &str, dir: &Path, tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .env("TPM2TOOLS_TCTI", tcti)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (apt-get install tpm2-tools): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
