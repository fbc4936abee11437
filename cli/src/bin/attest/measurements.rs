//! `attest verify measurements`: a measurements file against its detached signature.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use constellation_attestation::signed_measurements::CosignPublicKey;

use crate::verdict::{report, Check};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The measurements file (verified byte for byte).
    #[arg(long)]
    file: PathBuf,
    /// Detached signature: base64 DER ECDSA P-256 over SHA-256 of the file.
    #[arg(long)]
    signature: PathBuf,
    /// PEM public key (cosign.pub).
    #[arg(long = "public-key")]
    public_key: PathBuf,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let file = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let sig = std::fs::read(&a.signature)
        .with_context(|| format!("reading {}", a.signature.display()))?;
    let pem = std::fs::read(&a.public_key)
        .with_context(|| format!("reading {}", a.public_key.display()))?;
    let mut checks = Vec::new();
    match CosignPublicKey::from_pem(&pem) {
        Ok(key) => {
            checks.push(Check::pass("public-key"));
            checks.push(match key.verify(&file, &sig) {
                Ok(()) => Check::pass("signature"),
                Err(e) => Check::fail("signature", e.to_string()),
            });
        }
        Err(e) => checks.push(Check::fail("public-key", e.to_string())),
    }
    let extra = serde_json::json!({ "file_sha256": hex::encode(constellation_attestation::measurements::sha256(&file)) });
    Ok(report(&checks, Some(extra)))
}
