//! Cross-stack: quotes produced by tpm2-tools (an independent TPM software stack) against swtpm,
//! verified by `verify_quote` and by `attest verify tpm-quote`.

// The attestation crate's swtpm and tpm2-tools helpers, shared rather than copied.
#[path = "../../attestation/tests/tpm_support/mod.rs"]
mod tpm_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use constellation_attestation::measurements::{pcr_extend, sha256, Digest};
use constellation_attestation::tpm::{verify_quote, AkKind, AkPublicKey, QuoteError, Tpm};
use tpm_support::tpm2;

const ATTRS: &str = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign";
const NONCE: &str = "c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc";
const QUOTED: [u32; 4] = [0, 1, 4, 15];

struct ToolsQuote {
    ak: AkPublicKey,
    pcrs: BTreeMap<u32, Digest>,
}

/// Extends PCRs 4 and 15 with tpm2_pcrextend, creates an AK with tpm2_createprimary, quotes
/// PCRs 0,1,4,15 with tpm2_quote into dir/{msg,sig}, writes dir/ak.pem, and reads the PCRs with
/// tpm2_pcrread. Checks the PCR values against a software replay of the extends.
fn tools_quote(tcti: &str, dir: &Path, kind: AkKind) -> ToolsQuote {
    let e4 = sha256(b"kernel");
    let e15 = sha256(b"cluster id");
    tpm2(
        tcti,
        dir,
        "tpm2_pcrextend",
        &[
            &format!("4:sha256={}", hex::encode(e4)),
            &format!("15:sha256={}", hex::encode(e15)),
        ],
    );
    let (hierarchy, alg) = match kind {
        AkKind::EcdsaP256 => ("e", "ecc256:ecdsa-sha256:null"),
        AkKind::Rsa2048 => ("o", "rsa2048:rsassa-sha256:null"),
    };
    tpm2(
        tcti,
        dir,
        "tpm2_createprimary",
        &[
            "-C", hierarchy, "-g", "sha256", "-G", alg, "-a", ATTRS, "-c", "ak.ctx",
        ],
    );
    tpm2(
        tcti,
        dir,
        "tpm2_readpublic",
        &["-c", "ak.ctx", "-f", "pem", "-o", "ak.pem"],
    );
    tpm2(
        tcti,
        dir,
        "tpm2_quote",
        &[
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,4,15",
            "-q",
            NONCE,
            "-m",
            "msg",
            "-s",
            "sig",
        ],
    );
    tpm2(
        tcti,
        dir,
        "tpm2_pcrread",
        &["sha256:0,1,4,15", "-o", "pcrs.bin"],
    );
    tpm2(tcti, dir, "tpm2_flushcontext", &["-t"]);

    let raw = std::fs::read(dir.join("pcrs.bin")).unwrap();
    assert_eq!(
        raw.len(),
        32 * QUOTED.len(),
        "tpm2_pcrread -o writes raw values"
    );
    let pcrs: BTreeMap<u32, Digest> = QUOTED
        .iter()
        .zip(raw.chunks_exact(32))
        .map(|(&i, v)| (i, v.try_into().unwrap()))
        .collect();
    assert_eq!(pcrs[&0], [0; 32]);
    assert_eq!(pcrs[&4], pcr_extend(&[0; 32], &e4));
    assert_eq!(pcrs[&15], pcr_extend(&[0; 32], &e15));

    let pem = std::fs::read_to_string(dir.join("ak.pem")).unwrap();
    let ak = AkPublicKey::from_pem(&pem).unwrap();
    assert_eq!(ak.kind(), kind);
    ToolsQuote { ak, pcrs }
}

fn cross_stack(kind: AkKind) {
    let (dir, swtpm) = tpm_support::swtpm();
    let work = dir.path();
    let q = tools_quote(&swtpm.tcti(), work, kind);
    let attest = std::fs::read(work.join("msg")).unwrap();
    let sig = std::fs::read(work.join("sig")).unwrap();
    let nonce = hex::decode(NONCE).unwrap();

    let quote = verify_quote(&q.ak, &attest, &sig, &nonce, &q.pcrs).unwrap();
    assert_eq!(quote.attest.extra_data, nonce);
    assert_eq!(quote.ak_fingerprint, q.ak.fingerprint());

    assert!(matches!(
        verify_quote(&q.ak, &attest, &sig, &[0; 32], &q.pcrs),
        Err(QuoteError::NonceMismatch { .. })
    ));
    let mut wrong = q.pcrs.clone();
    wrong.insert(15, [0; 32]);
    assert!(matches!(
        verify_quote(&q.ak, &attest, &sig, &nonce, &wrong),
        Err(QuoteError::PcrDigestMismatch { .. })
    ));

    // Our AK template is the same as tpm2_createprimary's: the same TPM gives the same key.
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.attestation_key(kind).unwrap(), q.ak);
    // And our PCR reads agree with tpm2_pcrread.
    assert_eq!(tpm.pcr_read(&QUOTED).unwrap(), q.pcrs);
}

#[test]
fn tpm2_tools_ecc_quote_verifies() {
    cross_stack(AkKind::EcdsaP256);
}

#[test]
fn tpm2_tools_rsa_quote_verifies() {
    cross_stack(AkKind::Rsa2048);
}

struct CliRun {
    code: i32,
    verdict: serde_json::Value,
}

fn attest_cli(dir: &Path, nonce: &str, pcrs: &BTreeMap<u32, Digest>, extra: &[&str]) -> CliRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attest"));
    cmd.current_dir(dir).args([
        "verify",
        "tpm-quote",
        "--message",
        "msg",
        "--signature",
        "sig",
        "--ak-pub",
        "ak.pem",
        "--nonce",
        nonce,
    ]);
    for (i, v) in pcrs {
        cmd.arg("--pcr").arg(format!("{i}={}", hex::encode(v)));
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    let verdict = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verdict is not JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    CliRun {
        code: out.status.code().unwrap_or(-1),
        verdict,
    }
}

fn check_names(v: &serde_json::Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn attest_cli_verifies_a_tpm2_tools_quote() {
    let (dir, swtpm) = tpm_support::swtpm();
    let work = dir.path();
    let q = tools_quote(&swtpm.tcti(), work, AkKind::EcdsaP256);

    let ok = attest_cli(work, NONCE, &q.pcrs, &[]);
    assert_eq!(ok.code, 0, "{}", ok.verdict);
    assert_eq!(ok.verdict["verdict"], "accept");
    assert_eq!(
        check_names(&ok.verdict),
        ["parse", "signature", "magic/type", "nonce", "pcr-digest"]
    );
    assert_eq!(
        ok.verdict["extra"]["ak_fingerprint"],
        hex::encode(q.ak.fingerprint())
    );

    // Wrong nonce: exit 1, failed check "nonce" with both values.
    let bad_nonce = "00".repeat(32);
    let r = attest_cli(work, &bad_nonce, &q.pcrs, &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.verdict["verdict"], "reject");
    assert_eq!(r.verdict["failed_check"]["name"], "nonce");
    assert_eq!(r.verdict["failed_check"]["expected"], bad_nonce);
    assert_eq!(r.verdict["failed_check"]["found"], NONCE);

    // Wrong PCR value: "pcr-digest".
    let mut wrong = q.pcrs.clone();
    wrong.insert(4, [1; 32]);
    let r = attest_cli(work, NONCE, &wrong, &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.verdict["failed_check"]["name"], "pcr-digest");

    // Measurements: matching -> accept; an enforced mismatch on PCR 15 -> "measurements".
    let good = format!(
        r#"{{"4": {{"expected": "{}"}}, "15": {{"expected": "{}"}}}}"#,
        hex::encode(q.pcrs[&4]),
        hex::encode(q.pcrs[&15])
    );
    std::fs::write(work.join("good.json"), good).unwrap();
    let r = attest_cli(work, NONCE, &q.pcrs, &["--measurements", "good.json"]);
    assert_eq!(r.code, 0, "{}", r.verdict);
    assert_eq!(check_names(&r.verdict).last().unwrap(), "measurements");
    let bad = format!(r#"{{"15": {{"expected": "{}"}}}}"#, "ab".repeat(32));
    std::fs::write(work.join("bad.json"), bad).unwrap();
    let r = attest_cli(work, NONCE, &q.pcrs, &["--measurements", "bad.json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.verdict["failed_check"]["name"], "measurements");
    assert_eq!(
        r.verdict["failed_check"]["expected"],
        format!("PCR[15]={}", "ab".repeat(32))
    );

    // A flipped byte of the signed message: "signature".
    let mut msg = std::fs::read(work.join("msg")).unwrap();
    let last = msg.len() - 1;
    msg[last] ^= 1;
    std::fs::write(work.join("msg"), &msg).unwrap();
    let r = attest_cli(work, NONCE, &q.pcrs, &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.verdict["failed_check"]["name"], "signature");
    assert_eq!(check_names(&r.verdict), ["parse", "signature"]);

    // Truncated message: "parse".
    std::fs::write(work.join("msg"), &msg[..20]).unwrap();
    let r = attest_cli(work, NONCE, &q.pcrs, &[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.verdict["failed_check"]["name"], "parse");

    // Usage error (bad --pcr syntax): exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_attest"))
        .current_dir(work)
        .args([
            "verify",
            "tpm-quote",
            "--message",
            "msg",
            "--signature",
            "sig",
            "--ak-pub",
            "ak.pem",
            "--nonce",
            NONCE,
            "--pcr",
            "four=00",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
