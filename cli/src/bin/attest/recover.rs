//! `attest recover`: after a full control-plane restart, attest a waiting control-plane node
//! (server-only aTLS against the measurements and its pinned AK) and hand it the master secret
//! and salt with `Recover`. The secrets are read from files, never taken from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use constellation_attest::bootstrapper_client::{self, attest_bootstrapper, AttestError};
use constellation_attestation::measurements::Measurements;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::{validator_for, ValidatorPolicy, Variant};
use constellation_proto::recover::RecoverRequest;
use constellation_proto::PROTOCOL_VERSION;

use crate::verdict::{report, Check};

#[derive(clap::Args)]
pub struct RecoverArgs {
    /// The node's bootstrapper endpoint, HOST:PORT (port 9000 on Constellation nodes).
    #[arg(long)]
    endpoint: String,
    /// Expected measurements, JSON `{"<index>": {"expected": "<hex>", "warnOnly": bool}}`.
    /// A waiting node is not bound yet, so PCR 15 is checked as given (zero for an image).
    #[arg(long)]
    measurements: PathBuf,
    /// The node's attestation variant (the local platform's nodes use qemu-vtpm); its
    /// attestation key is trusted because it is pinned with --ak-pub.
    #[arg(long, default_value = "qemu-vtpm")]
    variant: Variant,
    /// The node's pinned attestation key (PEM public key).
    #[arg(long = "ak-pub")]
    ak_pub: PathBuf,
    /// File holding the master secret: hex (whitespace ignored) or raw bytes.
    #[arg(long = "master-secret-file")]
    master_secret_file: PathBuf,
    /// File holding the master salt: hex (whitespace ignored) or raw bytes.
    #[arg(long = "salt-file")]
    salt_file: PathBuf,
}

/// A secret file's bytes: hex when the whole (trimmed) content is an even number of hex digits,
/// the raw content otherwise.
fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = std::str::from_utf8(&raw).ok().map(str::trim);
    match text {
        Some(t)
            if !t.is_empty() && t.len() % 2 == 0 && t.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            hex::decode(t).with_context(|| format!("{} is not hex", path.display()))
        }
        _ => Ok(raw),
    }
}

pub fn recover(a: RecoverArgs) -> anyhow::Result<ExitCode> {
    let json = std::fs::read(&a.measurements)
        .with_context(|| format!("reading {}", a.measurements.display()))?;
    let measurements = Measurements::from_json(&json)?;
    let pem = std::fs::read_to_string(&a.ak_pub)
        .with_context(|| format!("reading {}", a.ak_pub.display()))?;
    let ak = AkPublicKey::from_pem(&pem)
        .with_context(|| format!("AK public key {}", a.ak_pub.display()))?;
    let master_secret = read_secret(&a.master_secret_file)?;
    let master_salt = read_secret(&a.salt_file)?;
    let validator = validator_for(a.variant, ValidatorPolicy::pinned(vec![ak], measurements))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut checks = Vec::new();
    let extra = runtime.block_on(async {
        let (channel, ak_fingerprint) = match attest_bootstrapper(&a.endpoint, validator).await {
            Ok((channel, verdict)) => {
                checks.push(Check::pass("reachable"));
                checks.push(Check::pass("attestation"));
                (channel, hex::encode(verdict.ak_fingerprint))
            }
            Err(e @ AttestError::Unreachable { .. }) => {
                checks.push(Check::fail("reachable", e.to_string()));
                return None;
            }
            Err(e @ AttestError::Refused { .. }) => {
                checks.push(Check::pass("reachable"));
                checks.push(Check::fail("attestation", e.to_string()));
                return None;
            }
        };
        let request = RecoverRequest {
            version: PROTOCOL_VERSION,
            master_secret,
            master_salt,
            kmip: None,
        };
        match bootstrapper_client::recover(channel, request).await {
            Ok(r) => {
                checks.push(Check::pass("recover"));
                Some(serde_json::json!({
                    "endpoint": a.endpoint,
                    "ak_fingerprint": ak_fingerprint,
                    "message": r.message,
                }))
            }
            Err(e) => {
                checks.push(Check::fail("recover", e.to_string()));
                None
            }
        }
    });
    Ok(report(&checks, extra))
}
