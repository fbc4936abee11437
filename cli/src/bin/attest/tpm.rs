//! `attest verify tpm-quote`: a TPM 2.0 quote in tpm2-tools' formats (`tpm2_quote -m` TPMS_ATTEST,
//! `-s` TPMT_SIGNATURE) against a pinned AK (`tpm2_readpublic -f pem`), a nonce and PCR values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use constellation_attestation::measurements::{Digest, MeasurementsError};
use constellation_attestation::tpm::{verify_quote, AkPublicKey, QuoteCheck, QuoteError};
use constellation_attestation::Measurements;

use crate::verdict::{report, Check};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The quoted TPMS_ATTEST (tpm2_quote -m).
    #[arg(long)]
    message: PathBuf,
    /// The TPMT_SIGNATURE (tpm2_quote -s, default tss format).
    #[arg(long)]
    signature: PathBuf,
    /// The attestation key's public key, PEM (tpm2_readpublic -f pem).
    #[arg(long = "ak-pub")]
    ak_pub: PathBuf,
    /// The qualifying data the quote must carry (tpm2_quote -q), hex.
    #[arg(long)]
    nonce: String,
    /// A quoted SHA-256 PCR value, `INDEX=HEX`; repeat for every PCR in the quote.
    #[arg(long = "pcr", value_name = "N=HEX")]
    pcrs: Vec<String>,
    /// A measurements policy (JSON) the PCR values must also satisfy.
    #[arg(long)]
    measurements: Option<PathBuf>,
}

fn parse_pcr(arg: &str) -> anyhow::Result<(u32, Digest)> {
    let (index, value) = arg
        .split_once('=')
        .with_context(|| format!("--pcr {arg:?}: expected INDEX=HEX"))?;
    let index: u32 = index
        .trim()
        .parse()
        .with_context(|| format!("--pcr {arg:?}: index is not a number"))?;
    let value = value.trim().trim_start_matches("0x");
    let bytes = hex::decode(value).with_context(|| format!("--pcr {arg:?}: value is not hex"))?;
    let digest: Digest = bytes.try_into().map_err(|b: Vec<u8>| {
        anyhow::anyhow!("--pcr {arg:?}: expected 32 bytes, got {}", b.len())
    })?;
    Ok((index, digest))
}

/// The failed check with the values the error carries.
fn failed_check(e: &QuoteError) -> Check {
    let check = Check::fail(e.check().name(), e.to_string());
    match e {
        QuoteError::NonceMismatch { expected, found }
        | QuoteError::PcrDigestMismatch { expected, found } => check.values(expected, found),
        QuoteError::BadMagic { expected, found } => {
            check.values(format!("{expected:#010x}"), format!("{found:#010x}"))
        }
        QuoteError::NotAQuote { expected, found } => {
            check.values(format!("{expected:#06x}"), format!("{found:#06x}"))
        }
        QuoteError::PcrSelectionMismatch { expected, found } => {
            check.values(format!("{expected:?}"), format!("{found:?}"))
        }
        _ => check,
    }
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let attest = read(&args.message)?;
    let signature = read(&args.signature)?;
    let ak_pem = String::from_utf8(read(&args.ak_pub)?)
        .with_context(|| format!("{} is not PEM text", args.ak_pub.display()))?;
    let nonce = hex::decode(args.nonce.trim().trim_start_matches("0x"))
        .with_context(|| format!("--nonce {:?} is not hex", args.nonce))?;
    let mut pcrs = BTreeMap::new();
    for arg in &args.pcrs {
        let (index, value) = parse_pcr(arg)?;
        if pcrs.insert(index, value).is_some() {
            bail!("--pcr {index} given twice");
        }
    }
    let measurements = match &args.measurements {
        Some(path) => Some(
            Measurements::from_json(&read(path)?)
                .with_context(|| format!("measurements {}", path.display()))?,
        ),
        None => None,
    };

    let result = AkPublicKey::from_pem(&ak_pem)
        .and_then(|ak| verify_quote(&ak, &attest, &signature, &nonce, &pcrs));
    let quote = match result {
        Ok(quote) => quote,
        Err(e) => {
            let failed = e.check();
            let mut checks: Vec<Check> = QuoteCheck::ORDER
                .iter()
                .take_while(|&&c| c != failed)
                .map(|c| Check::pass(c.name()))
                .collect();
            checks.push(failed_check(&e));
            return Ok(report(&checks, None));
        }
    };
    let mut checks: Vec<Check> = QuoteCheck::ORDER
        .iter()
        .map(|c| Check::pass(c.name()))
        .collect();
    let mut warnings = Vec::new();
    if let Some(measurements) = measurements {
        match measurements.check(&quote.pcrs) {
            Ok(outcome) => {
                warnings = outcome.warnings.iter().map(|w| w.to_string()).collect();
                checks.push(Check::pass("measurements"));
            }
            Err(e) => {
                let check = Check::fail("measurements", e.to_string());
                let check = match &e {
                    MeasurementsError::Mismatch(list) => check.values(
                        list.iter()
                            .map(|m| format!("PCR[{}]={}", m.index, hex::encode(m.expected)))
                            .collect::<Vec<_>>()
                            .join(","),
                        list.iter()
                            .map(|m| {
                                let found = m.found.map(hex::encode);
                                format!("PCR[{}]={}", m.index, found.as_deref().unwrap_or("absent"))
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    _ => check,
                };
                checks.push(check);
            }
        }
    }
    let extra = serde_json::json!({
        "ak_fingerprint": hex::encode(quote.ak_fingerprint),
        "pcrs": quote.pcrs.iter().map(|(i, d)| (i.to_string(), hex::encode(d))).collect::<BTreeMap<_, _>>(),
        "clock": quote.attest.clock_info.clock,
        "reset_count": quote.attest.clock_info.reset_count,
        "restart_count": quote.attest.clock_info.restart_count,
        "firmware_version": format!("{:#018x}", quote.attest.firmware_version),
        "warnings": warnings,
    });
    Ok(report(&checks, Some(extra)))
}
