//! `attest show snp` / `attest verify snp` on the real evidence: exit codes and JSON.

use std::process::Command;

use constellation_attestation::testing::real_evidence::*;
use serde_json::Value;

fn attest(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attest"))
        .args(args)
        .output()
        .expect("run attest");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().expect("exit code"), json, stderr)
}

fn verify_azure(extra: &[&str]) -> (i32, Value, String) {
    let (report, cert, chain) = (path(AZURE_REPORT), path(AZURE_VCEK_PEM), path(ASK_ARK));
    let mut args = vec![
        "verify",
        "snp",
        "--report",
        &report,
        "--signer-cert",
        &cert,
        "--chain",
        &chain,
        "--at",
        AZURE_VALID_AT,
    ];
    args.extend_from_slice(extra);
    attest(&args)
}

fn verify_aws(at: &str, extra: &[&str]) -> (i32, Value, String) {
    let (report, cert, chain) = (path(AWS_REPORT_B64), path(AWS_VLEK), path(ASVK_ARK));
    let mut args = vec![
        "verify",
        "snp",
        "--report",
        &report,
        "--format",
        "base64",
        "--signer-cert",
        &cert,
        "--chain",
        &chain,
        "--at",
        at,
    ];
    args.extend_from_slice(extra);
    attest(&args)
}

fn check_names(v: &Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn show_prints_report_fields_as_json() {
    let (code, v, _) = attest(&["show", "snp", "--report", &path(AZURE_REPORT)]);
    assert_eq!(code, 0);
    assert_eq!(v["version"], 2);
    assert_eq!(v["vmpl"], 0);
    assert_eq!(v["signing_key"], "vcek");
    assert_eq!(v["policy"]["raw"], 0x3001f);
    assert_eq!(v["reported_tcb"]["snp"], 6);
    assert!(v["measurement"].as_str().unwrap().starts_with("5677f1de"));

    let (code, v, _) = attest(&[
        "show",
        "snp",
        "--report",
        &path(AWS_REPORT_B64),
        "--format",
        "base64",
    ]);
    assert_eq!(code, 0);
    assert_eq!(v["version"], 3);
    assert_eq!(v["signing_key"], "vlek");
    assert_eq!(v["cpuid"]["family"], 0x19);
    assert_eq!(v["report_data"], AWS_REPORT_DATA);
}

#[test]
fn azure_evidence_is_accepted_with_every_check_named() {
    let (code, v, _) = verify_azure(&[
        "--min-tcb",
        "bl=2,tee=0,snp=6,ucode=93",
        "--measurement",
        "5677f1de87289e7ad2c7e99c805d0468b1a9ccd83f0d245afa5242d405da4d5725852f8c6550564870e5f3206dfb1841",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verdict"], "accept");
    let names = check_names(&v);
    for expected in [
        "parse",
        "root-pin",
        "chain",
        "validity",
        "signature",
        "tcb-consistency",
        "debug",
        "vmpl",
        "min-tcb",
        "measurement",
        "report-data",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing check {expected}: {names:?}"
        );
    }
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["ok"] == true));
    assert_eq!(v["extra"]["signer"], "vcek");
    assert_eq!(v["extra"]["root"], "Milan");
}

#[test]
fn aws_evidence_is_accepted_before_expiry_with_report_data() {
    let (code, v, _) = verify_aws(AWS_VALID_AT, &["--report-data", AWS_REPORT_DATA]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verdict"], "accept");
    assert_eq!(v["extra"]["signer"], "vlek");
}

#[test]
fn aws_evidence_is_rejected_after_expiry() {
    let (code, v, _) = verify_aws(AWS_EXPIRED_AT, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["verdict"], "reject");
    assert_eq!(v["failed_check"]["name"], "validity");
    assert!(v["failed_check"]["expected"]
        .as_str()
        .unwrap()
        .contains("2025-12-10"));
    assert!(v["failed_check"]["found"]
        .as_str()
        .unwrap()
        .starts_with("2026-11-23"));
}

#[test]
fn wrong_values_fail_the_named_check_with_expected_and_found() {
    let (code, v, _) = verify_azure(&["--measurement", &"00".repeat(48)]);
    assert_eq!(code, 1);
    assert_eq!(v["failed_check"]["name"], "measurement");
    assert_eq!(v["failed_check"]["expected"], "00".repeat(48));
    assert!(v["failed_check"]["found"]
        .as_str()
        .unwrap()
        .starts_with("5677f1de"));

    let (code, v, _) = verify_azure(&["--min-tcb", "ucode=94"]);
    assert_eq!(code, 1);
    assert_eq!(v["failed_check"]["name"], "min-tcb");

    let (code, v, _) = verify_aws(AWS_VALID_AT, &["--report-data", &"11".repeat(64)]);
    assert_eq!(code, 1);
    assert_eq!(v["failed_check"]["name"], "report-data");
    assert_eq!(v["failed_check"]["found"], AWS_REPORT_DATA);

    let (code, v, _) = verify_azure(&["--vmpl", "2"]);
    assert_eq!(code, 1);
    assert_eq!(v["failed_check"]["name"], "vmpl");
    assert_eq!(v["failed_check"]["expected"], "2");
    assert_eq!(v["failed_check"]["found"], "0");
}

#[test]
fn bad_signature_sample_fails_the_signature_check() {
    let (report, cert, chain) = (path(BADSIG_REPORT), path(VLEK_2023), path(ASVK_ARK));
    let (code, v, _) = attest(&[
        "verify",
        "snp",
        "--report",
        &report,
        "--signer-cert",
        &cert,
        "--chain",
        &chain,
        "--at",
        VLEK_2023_VALID_AT,
    ]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["failed_check"]["name"], "signature");
    // Everything before the signature passed, nothing after it ran.
    let names = check_names(&v);
    assert_eq!(names.last().map(String::as_str), Some("signature"));
    assert!(names.iter().any(|n| n == "root-pin"));
}

#[test]
fn repeat_reports_throughput() {
    let (code, v, stderr) = verify_azure(&["--repeat", "20"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["extra"]["repeat"]["iterations"], 20);
    assert_eq!(v["extra"]["repeat"]["warm_iterations"], 19);
    assert!(v["extra"]["repeat"]["warm_ops_per_sec"].as_f64().unwrap() > 0.0);
    assert!(stderr.contains("ops/s"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) = attest(&[
        "verify",
        "snp",
        "--report",
        "/nonexistent",
        "--signer-cert",
        "/nonexistent",
        "--chain",
        "/nonexistent",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent"), "{stderr}");
    let (code, _, _) = verify_azure(&["--measurement", "zz"]);
    assert_eq!(code, 2);
}
