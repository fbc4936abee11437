//! Quote verification cost against its floor, one aws-lc-rs ECDSA P-256 verification, in one
//! run on the same data. Goal: full `verify_quote` <= 1.25x the bare signature check.
//!
//! `cargo bench -p constellation-attestation --bench tpm` (needs swtpm: the quote is made once
//! at start by a real TPM emulator).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ParsedPublicKey, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use constellation_attestation::measurements::{sha256, Measurement, Measurements};
use constellation_attestation::tpm::{verify_quote, AkKind, Swtpm, Tpm, TpmSignature};
use constellation_attestation::variant::qemu_vtpm::{QemuVtpmIssuer, QemuVtpmValidator};
use constellation_attestation::{Issuer, Validator};

const ROUNDS: usize = 9;
const ITERATIONS: u32 = 2_000;
const GOAL: f64 = 1.25;
const PCRS: [u32; 4] = [0, 1, 4, 15];

fn pad32(v: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let v = &v[v.len().saturating_sub(32)..];
    out[32 - v.len()..].copy_from_slice(v);
    out
}

/// Median time per iteration of `f` over ROUNDS rounds of ITERATIONS calls.
fn per_op(mut f: impl FnMut()) -> Duration {
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                f();
            }
            start.elapsed() / ITERATIONS
        })
        .collect();
    rounds.sort();
    rounds[ROUNDS / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let swtpm = Swtpm::start(dir.path()).expect("swtpm must be installed");
    let nonce = sha256(b"bench nonce");
    let (ak, evidence, quote) = {
        let mut tpm = Tpm::open(&swtpm.tcti()).expect("open swtpm");
        tpm.pcr_extend(
            constellation_attestation::pcr::CLUSTER_ID,
            &sha256(b"cluster"),
        )
        .expect("extend");
        let ak = tpm.attestation_key(AkKind::EcdsaP256).expect("AK");
        let quote = tpm.quote(&nonce, &PCRS).expect("quote");
        let issuer = QemuVtpmIssuer::new(tpm, AkKind::EcdsaP256, PCRS.to_vec()).expect("issuer");
        let evidence = issuer.issue(&nonce).expect("issue");
        (ak, evidence, quote)
    };
    drop(swtpm);

    let TpmSignature::Ecdsa { r, s } = TpmSignature::parse(&quote.signature).expect("signature")
    else {
        panic!("ECC AK must give an ECDSA signature");
    };
    let mut fixed = [0u8; 64];
    fixed[..32].copy_from_slice(&pad32(&r));
    fixed[32..].copy_from_slice(&pad32(&s));
    let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ak.spki_der()).expect("key");
    let unparsed = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ak.spki_der().to_vec());
    parsed
        .verify_sig(&quote.attest, &fixed)
        .expect("baseline verifies");
    verify_quote(&ak, &quote.attest, &quote.signature, &nonce, &quote.pcrs)
        .expect("quote verifies");

    let mut measurements = Measurements::default();
    for (&i, &v) in &quote.pcrs {
        measurements.0.insert(i, Measurement::enforce(v));
    }
    let validator = QemuVtpmValidator::new(vec![ak.clone()], measurements);
    validator
        .validate(&evidence, &nonce)
        .expect("evidence validates");

    // Warm-up, then interleave nothing else: each measurement runs on the same warm data.
    let _ = per_op(|| {
        let _ = black_box(parsed.verify_sig(black_box(&quote.attest), black_box(&fixed)));
    });
    let baseline = per_op(|| {
        let _ = black_box(parsed.verify_sig(black_box(&quote.attest), black_box(&fixed)));
    });
    let baseline_unparsed = per_op(|| {
        let _ = black_box(unparsed.verify(black_box(&quote.attest), black_box(&fixed)));
    });
    let full = per_op(|| {
        let _ = black_box(verify_quote(
            black_box(&ak),
            black_box(&quote.attest),
            black_box(&quote.signature),
            black_box(&nonce),
            black_box(&quote.pcrs),
        ));
    });
    let validate = per_op(|| {
        let _ = black_box(validator.validate(black_box(&evidence), black_box(&nonce)));
    });

    let ratio = full.as_secs_f64() / baseline.as_secs_f64();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "TPM quote verification (ECC P-256 AK, 4 PCRs, median of {ROUNDS} rounds x {ITERATIONS})"
    );
    println!(
        "  aws-lc-rs P-256 verify, pre-parsed key  {:>9.2} us  (baseline)",
        us(baseline)
    );
    println!(
        "  aws-lc-rs P-256 verify, key parsed each {:>9.2} us",
        us(baseline_unparsed)
    );
    println!(
        "  verify_quote (parse+sig+nonce+pcrs)     {:>9.2} us",
        us(full)
    );
    println!(
        "  QemuVtpmValidator::validate (JSON+AK+policy) {:>4.2} us",
        us(validate)
    );
    println!(
        "  ratio verify_quote / baseline = {ratio:.3} (goal <= {GOAL}): {}",
        if ratio <= GOAL { "MET" } else { "MISSED" }
    );
}
