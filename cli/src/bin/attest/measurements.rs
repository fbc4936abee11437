//! `attest verify measurements`: a measurements file against its detached signature, and with
//! `--last-accepted` against rollback to an older signed release.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use constellation_attestation::signed_measurements::{
    CosignPublicKey, MeasurementsVersion, SignedMeasurementsError,
};

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
    /// File with the last accepted signed `version` (e.g. `v2.14.0`): a file older than it is
    /// refused as a rollback; on accept, the file's version is written there (0600, atomically).
    /// Absent file: nothing accepted yet.
    #[arg(long = "last-accepted")]
    last_accepted: Option<PathBuf>,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let file = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let sig = std::fs::read(&a.signature)
        .with_context(|| format!("reading {}", a.signature.display()))?;
    let pem = std::fs::read(&a.public_key)
        .with_context(|| format!("reading {}", a.public_key.display()))?;
    let mut checks = Vec::new();
    let mut version = None;
    match CosignPublicKey::from_pem(&pem) {
        Ok(key) => {
            checks.push(Check::pass("public-key"));
            match &a.last_accepted {
                None => checks.push(match key.verify(&file, &sig) {
                    Ok(()) => Check::pass("signature"),
                    Err(e) => Check::fail("signature", e.to_string()),
                }),
                Some(path) => {
                    version = verify_not_rolled_back(&key, &file, &sig, path, &mut checks)?;
                }
            }
        }
        Err(e) => checks.push(Check::fail("public-key", e.to_string())),
    }
    let extra = serde_json::json!({
        "file_sha256": hex::encode(constellation_attestation::measurements::sha256(&file)),
        "version": version,
    });
    Ok(report(&checks, Some(extra)))
}

/// The signature, then the signed version against the one last accepted in `path`; an
/// accepted version is written back. Returns the file's version when it was accepted.
fn verify_not_rolled_back(
    key: &CosignPublicKey,
    file: &[u8],
    sig: &[u8],
    path: &std::path::Path,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Option<String>> {
    let last = match std::fs::read_to_string(path) {
        Ok(text) => match MeasurementsVersion::parse(text.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                checks.push(Check::fail(
                    "last-accepted",
                    format!("{}: {e}", path.display()),
                ));
                return Ok(None);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match key.verify_versioned(file, sig, last.as_ref()) {
        Ok(verified) => {
            checks.push(Check::pass("signature"));
            checks.push(Check::pass("version"));
            let version = verified.version.as_str().to_owned();
            constellation_common::secret_file::write_private_atomic(
                path,
                format!("{version}\n").as_bytes(),
            )
            .with_context(|| format!("recording the accepted version in {}", path.display()))?;
            Ok(Some(version))
        }
        Err(SignedMeasurementsError::Rollback {
            last_accepted,
            found,
        }) => {
            checks.push(Check::pass("signature"));
            checks.push(
                Check::fail(
                    "version",
                    "rollback: the file is older than the last accepted signed measurements",
                )
                .values(format!(">= {last_accepted}"), found),
            );
            Ok(None)
        }
        Err(e @ SignedMeasurementsError::Version(_)) => {
            checks.push(Check::pass("signature"));
            checks.push(Check::fail("version", e.to_string()));
            Ok(None)
        }
        Err(e) => {
            checks.push(Check::fail("signature", e.to_string()));
            Ok(None)
        }
    }
}
