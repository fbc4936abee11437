//! `attest verify cluster`: ask a running node's verification service for fresh evidence and
//! check it against the measurements and the node's pinned attestation key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use constellation_attest::{verify_cluster, VerifyError};
use constellation_attestation::measurements::Measurements;
use constellation_attestation::tpm::AkPublicKey;
use constellation_attestation::{validator_for, ValidatorPolicy, Variant};

use crate::verdict::{report, Check};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The node's verification service, HOST:PORT (port 30081 on Constellation nodes).
    #[arg(long)]
    endpoint: String,
    /// Expected measurements, JSON `{"<index>": {"expected": "<hex>", "warnOnly": bool}}`.
    #[arg(long)]
    measurements: PathBuf,
    /// The node's attestation variant (the local platform's nodes use qemu-vtpm); its
    /// attestation key is trusted because it is pinned with --ak-pub.
    #[arg(long, default_value = "qemu-vtpm")]
    variant: Variant,
    /// The node's pinned attestation key (PEM public key); repeat for several nodes.
    #[arg(long = "ak-pub", required = true)]
    ak_pub: Vec<PathBuf>,
    /// Expected cluster ID (hex): PCR 15 must hold exactly one extend with it.
    #[arg(long = "cluster-id")]
    cluster_id: Option<String>,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let json = std::fs::read(&a.measurements)
        .with_context(|| format!("reading {}", a.measurements.display()))?;
    // An initialized node's PCR 15 carries the cluster ID: checked separately below.
    let measurements = Measurements::from_json(&json)?.without_cluster_id()?;
    let mut aks = Vec::new();
    for path in &a.ak_pub {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        aks.push(
            AkPublicKey::from_pem(&pem)
                .with_context(|| format!("AK public key {}", path.display()))?,
        );
    }
    let cluster_id = a
        .cluster_id
        .as_deref()
        .map(hex::decode)
        .transpose()
        .context("--cluster-id is not hex")?;
    let validator = validator_for(a.variant, ValidatorPolicy::pinned(aks, measurements))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(verify_cluster(
        &a.endpoint,
        &*validator,
        cluster_id.as_deref(),
    ));
    let mut checks = Vec::new();
    let extra = match result {
        Ok(verdict) => {
            checks.push(Check::pass("reachable"));
            checks.push(Check::pass("attestation"));
            if cluster_id.is_some() {
                checks.push(Check::pass("cluster-id"));
            }
            let pcrs: BTreeMap<String, String> = verdict
                .pcrs
                .iter()
                .map(|(k, v)| (k.to_string(), hex::encode(v)))
                .collect();
            Some(serde_json::json!({
                "endpoint": a.endpoint,
                "ak_fingerprint": hex::encode(verdict.ak_fingerprint),
                "pcrs": pcrs,
                "warnings": verdict.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            }))
        }
        Err(e) => {
            match &e {
                VerifyError::Unreachable { .. } | VerifyError::Refused { .. } => {
                    checks.push(Check::fail("reachable", e.to_string()))
                }
                VerifyError::ClusterId {
                    expected, found, ..
                } => {
                    checks.push(Check::pass("reachable"));
                    checks.push(Check::pass("attestation"));
                    checks.push(
                        Check::fail("cluster-id", e.to_string())
                            .values(expected.clone(), found.clone()),
                    );
                }
                _ => {
                    checks.push(Check::pass("reachable"));
                    checks.push(Check::fail("attestation", e.to_string()));
                }
            }
            None
        }
    };
    Ok(report(&checks, extra))
}
