//! `attest show snp` and `attest verify snp`: AMD SEV-SNP reports against their VCEK/VLEK
//! and AMD's pinned roots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use constellation_attestation::snp::{
    self, AttestationReport, SnpError, SnpPolicy, Tcb, VerifiedVek,
};
use constellation_attestation::{Clock, FixedClock, SystemClock};
use serde::Serialize;

use crate::verdict::{self, Check};

/// How the report file is encoded.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum ReportFormat {
    /// The binary report (longer files, e.g. Azure's with a trailing header, are fine).
    #[default]
    Raw,
    /// Base64 of the binary report (whitespace ignored).
    Base64,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The report file.
    #[arg(long)]
    report: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    format: ReportFormat,
}

pub fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_report(&args.report, args.format)?;
    let report = AttestationReport::parse(&bytes)
        .with_context(|| format!("parsing {}", args.report.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The report file.
    #[arg(long)]
    report: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    format: ReportFormat,
    /// The VCEK or VLEK certificate (PEM or DER).
    #[arg(long)]
    signer_cert: PathBuf,
    /// ASK (or ASVK) and ARK, PEM.
    #[arg(long)]
    chain: PathBuf,
    /// Check certificate validity at this RFC 3339 instant instead of now.
    #[arg(long)]
    at: Option<String>,
    /// Expected REPORT_DATA, hex, up to 64 bytes (zero-padded on the right).
    #[arg(long)]
    report_data: Option<String>,
    /// Minimum reported TCB, e.g. `bl=2,tee=0,snp=6,ucode=93` (omitted components are 0).
    #[arg(long, value_parser = parse_min_tcb)]
    min_tcb: Option<Tcb>,
    /// Allowed launch measurement, hex (48 bytes); repeat for several.
    #[arg(long)]
    measurement: Vec<String>,
    /// Allowed ID key digest, hex (48 bytes); repeat for several.
    #[arg(long)]
    id_key_digest: Vec<String>,
    /// Expected VMPL.
    #[arg(long, default_value_t = 0)]
    vmpl: u32,
    /// Accept guests whose policy allows debugging.
    #[arg(long)]
    allow_debug: bool,
    /// Verify N times in this process (first cold, including the chain; then with the
    /// verified VEK cached) and report operations per second in `extra`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

fn read_report(path: &PathBuf, format: ReportFormat) -> anyhow::Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match format {
        ReportFormat::Raw => Ok(data),
        ReportFormat::Base64 => {
            let text: Vec<u8> = data
                .into_iter()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .with_context(|| format!("decoding base64 in {}", path.display()))
        }
    }
}

fn parse_hex<const N: usize>(what: &str, s: &str, pad: bool) -> anyhow::Result<[u8; N]> {
    let bytes = hex::decode(s.trim()).with_context(|| format!("--{what}: not hex"))?;
    if bytes.len() > N || (!pad && bytes.len() != N) {
        bail!("--{what}: expected {N} bytes, found {}", bytes.len());
    }
    let mut out = [0u8; N];
    for (dst, src) in out.iter_mut().zip(bytes) {
        *dst = src;
    }
    Ok(out)
}

fn parse_min_tcb(s: &str) -> Result<Tcb, String> {
    let mut tcb = Tcb::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected NAME=N"))?;
        let value: u8 = value.trim().parse().map_err(|e| format!("{part:?}: {e}"))?;
        match key.trim() {
            "bl" | "bootloader" => tcb.bootloader = value,
            "tee" => tcb.tee = value,
            "snp" => tcb.snp = value,
            "ucode" | "microcode" => tcb.microcode = value,
            other => {
                return Err(format!(
                    "unknown TCB component {other:?} (bl, tee, snp, ucode)"
                ))
            }
        }
    }
    Ok(tcb)
}

#[derive(Serialize)]
struct Extra<'a> {
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    signer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vek: Option<&'a snp::VekExtensions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<ReportSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repeat: Option<RepeatStats>,
}

#[derive(Serialize)]
struct ReportSummary {
    version: u32,
    vmpl: u32,
    policy: u64,
    reported_tcb: Tcb,
    measurement: String,
    report_data: String,
    id_key_digest: String,
}

#[derive(Serialize)]
struct RepeatStats {
    iterations: u32,
    cold_us: f64,
    warm_iterations: u32,
    warm_ops_per_sec: Option<f64>,
    warm_us_per_op: Option<f64>,
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let clock: Box<dyn Clock> = match &args.at {
        Some(at) => Box::new(FixedClock::at_rfc3339(at).with_context(|| format!("--at {at:?}"))?),
        None => Box::new(SystemClock),
    };
    let policy = SnpPolicy {
        allow_debug: args.allow_debug,
        vmpl: args.vmpl,
        minimum_tcb: args.min_tcb.unwrap_or_default(),
        allowed_measurements: if args.measurement.is_empty() {
            None
        } else {
            Some(
                args.measurement
                    .iter()
                    .map(|m| parse_hex::<48>("measurement", m, false))
                    .collect::<anyhow::Result<_>>()?,
            )
        },
        allowed_id_key_digests: if args.id_key_digest.is_empty() {
            None
        } else {
            Some(
                args.id_key_digest
                    .iter()
                    .map(|d| parse_hex::<48>("id-key-digest", d, false))
                    .collect::<anyhow::Result<_>>()?,
            )
        },
        report_data: args
            .report_data
            .as_deref()
            .map(|d| parse_hex::<64>("report-data", d, true))
            .transpose()?,
        ..SnpPolicy::default()
    };
    let vek_bytes = std::fs::read(&args.signer_cert)
        .with_context(|| format!("reading {}", args.signer_cert.display()))?;
    let chain =
        std::fs::read(&args.chain).with_context(|| format!("reading {}", args.chain.display()))?;
    let report_bytes = match read_report(&args.report, args.format) {
        Ok(b) => b,
        Err(e) if matches!(args.format, ReportFormat::Base64) => {
            let checks = [Check::fail("parse", format!("{e:#}"))];
            return Ok(verdict::report(&checks, None));
        }
        Err(e) => return Err(e),
    };

    let at = time::OffsetDateTime::from(clock.now())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let cold_start = Instant::now();
    let outcome = AttestationReport::parse(&report_bytes).and_then(|_| {
        let vek = VerifiedVek::new(&vek_bytes, &chain, clock.as_ref())?;
        let report = snp::verify_report(&report_bytes, &vek, &policy)?;
        Ok((vek, report))
    });
    let cold = cold_start.elapsed();

    let (checks, extra) = match &outcome {
        Ok((vek, report)) => {
            let repeat = (args.repeat > 1)
                .then(|| repeat_warm(&report_bytes, vek, &policy, args.repeat - 1, cold));
            let checks: Vec<Check> = snp::CHECKS
                .iter()
                .map(|&name| {
                    let mut c = Check::pass(name);
                    c.detail = not_requested(name, &args).map(str::to_owned);
                    c
                })
                .collect();
            let extra = Extra {
                at,
                signer: Some(vek.kind().name()),
                vek: Some(vek.extensions()),
                root: Some(vek.root_product()),
                report: Some(ReportSummary {
                    version: report.version,
                    vmpl: report.vmpl,
                    policy: report.policy.raw,
                    reported_tcb: report.reported_tcb.tcb(),
                    measurement: hex::encode(report.measurement),
                    report_data: hex::encode(report.report_data),
                    id_key_digest: hex::encode(report.id_key_digest),
                }),
                repeat: repeat.transpose()?,
            };
            (checks, extra)
        }
        Err(e) => {
            let extra = Extra {
                at,
                signer: None,
                vek: None,
                root: None,
                report: None,
                repeat: None,
            };
            (failed_checks(e), extra)
        }
    };
    Ok(verdict::report(&checks, Some(serde_json::to_value(extra)?)))
}

/// Checks before the failed one passed (verification runs in [`snp::CHECKS`] order); the
/// failed one carries the error and its expected/found values; later ones did not run.
fn failed_checks(e: &SnpError) -> Vec<Check> {
    let failed = e.check();
    let mut checks: Vec<Check> = snp::CHECKS
        .iter()
        .take_while(|&&name| name != failed)
        .map(|&name| Check::pass(name))
        .collect();
    let mut check = Check::fail(failed, e.to_string());
    if let Some((expected, found)) = e.expected_found() {
        check = check.values(expected, found);
    }
    checks.push(check);
    checks
}

/// Checks that pass trivially because no expected value was given.
fn not_requested(name: &str, args: &VerifyArgs) -> Option<&'static str> {
    let skipped = match name {
        "min-tcb" => args.min_tcb.is_none(),
        "measurement" => args.measurement.is_empty(),
        "id-key-digest" => args.id_key_digest.is_empty(),
        "report-data" => args.report_data.is_none(),
        _ => false,
    };
    skipped.then_some("not requested")
}

fn repeat_warm(
    report_bytes: &[u8],
    vek: &VerifiedVek,
    policy: &SnpPolicy,
    warm_iterations: u32,
    cold: Duration,
) -> anyhow::Result<RepeatStats> {
    let start = Instant::now();
    for _ in 0..warm_iterations {
        snp::verify_report(report_bytes, vek, policy).context("warm re-verification")?;
    }
    let warm = start.elapsed().as_secs_f64();
    let per_op = warm / f64::from(warm_iterations);
    let stats = RepeatStats {
        iterations: warm_iterations + 1,
        cold_us: cold.as_secs_f64() * 1e6,
        warm_iterations,
        warm_ops_per_sec: (warm > 0.0).then(|| 1.0 / per_op),
        warm_us_per_op: Some(per_op * 1e6),
    };
    eprintln!(
        "attest: cold (chain + report) {:.1} us; warm (cached VEK) {:.1} us/op, {:.0} ops/s over {} iterations",
        stats.cold_us,
        per_op * 1e6,
        stats.warm_ops_per_sec.unwrap_or(0.0),
        warm_iterations
    );
    Ok(stats)
}
